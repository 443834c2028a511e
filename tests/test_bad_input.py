"""Bad input gets a clear error, and nothing is enqueued (invariant 9).

Each case calls the public API with one bad thing and checks the error's type,
that its message names the culprit, and that beanstalkd holds no job of the
test's tube afterwards (``stats-tube``) and progress counted none.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
from fault_runners import Counted

import packmule
from packmule.backends import backends

BIG = "x" * 70_000  # over beanstalkd's max-job-size of 64 KB once encoded
NAN, INF = float("nan"), float("inf")

Call = Callable[[], Any]


class InRun(Counted):
    """Calls the test's function inside a run, where enqueue and deferred_result work."""

    def run(self, call: Callable[[Counted], Any]) -> Any:  # type: ignore[override]
        return call(self)


def inside(call: Callable[[Counted], Any], name: str = "bad") -> Call:
    """A case calling ``call(runner)`` inside ``InRun(name).run``."""
    return lambda: InRun(name).run(call)

CASES: list[tuple[str, Call, type[packmule.PackmuleError], str]] = [
    # Values JSON cannot carry: named by position, method and type.
    ("set argument", inside(lambda r: r.enqueue("echo", {1, 2})),
     packmule.EncodeError, "argument 0 of echo() (set)"),
    ("object argument", inside(lambda r: r.enqueue("echo", [1, 2], object())),
     packmule.EncodeError, "argument 1 of echo() (object)"),
    ("NaN argument", inside(lambda r: r.enqueue("echo", NAN)),
     packmule.EncodeError, "argument 0 of echo() (float)"),
    ("inf argument", inside(lambda r: r.enqueue("echo", INF)),
     packmule.EncodeError, "argument 0 of echo() (float)"),
    ("-inf nested in a list", inside(lambda r: r.enqueue("echo", [1, {"a": -INF}])),
     packmule.EncodeError, "argument 0 of echo() (list)"),
    ("one bad item of a batch", inside(lambda r: r.enqueue_each("echo", [[1, 0], [2, 0], {3}])),
     packmule.EncodeError, "argument 0 of echo() (set)"),
    ("bad aggregate argument", inside(lambda r: r.deferred_result("total", [], {1})),
     packmule.EncodeError, "argument 0 of total() (set)"),
    ("bad run_async argument", lambda: Counted("bad").run_async(NAN),
     packmule.EncodeError, "argument 0 of run() (float)"),
    ("bad run_async keyword", lambda: Counted("bad").run_async(count={1}),
     packmule.EncodeError, "keyword arguments of run()"),
    # Too big for beanstalkd: named with its size and the server's limit.
    ("70 KB argument", inside(lambda r: r.enqueue("echo", [BIG, 0])),
     packmule.JobTooBig, "max-job-size 65535"),
    ("70 KB item at the end of a batch",
     inside(lambda r: r.enqueue_each("echo", [[1, 0], [2, 0], [BIG, 0]])),
     packmule.JobTooBig, "max-job-size 65535"),
    ("70 KB run_async argument", lambda: Counted("bad").run_async(BIG),
     packmule.JobTooBig, "max-job-size 65535"),
    # Methods that are not public job methods of the runner.
    ("missing method", inside(lambda r: r.enqueue("nowhere", 1)),
     packmule.UnknownMethod, "'nowhere'"),
    ("private method", inside(lambda r: r.enqueue("_secret", "x")),
     packmule.UnknownMethod, "'_secret'"),
    ("inherited API method", inside(lambda r: r.enqueue("cancel")),
     packmule.UnknownMethod, "'cancel'"),
    ("attribute, not a method", inside(lambda r: r.enqueue("time_to_run")),
     packmule.UnknownMethod, "'time_to_run'"),
    ("missing aggregate method", inside(lambda r: r.deferred_result("nowhere", [])),
     packmule.UnknownMethod, "'nowhere'"),
    # Options and settings.
    ("unknown option", lambda: Counted("bad", colour="red"),
     packmule.ConfigurationError, "'colour'"),
    ("tube with a colon", lambda: Counted("bad", tube="a:b"),
     packmule.ConfigurationError, "'a:b'"),
    ("tube over 200 bytes", lambda: Counted("bad", tube="t" * 201),
     packmule.ConfigurationError, "tube"),
    ("empty runner name", lambda: Counted(""),
     packmule.ConfigurationError, "runner name"),
    ("time_to_run below 2 s", lambda: Counted("bad", time_to_run=1),
     packmule.ConfigurationError, "time_to_run"),
    ("time_to_run not a number", lambda: Counted("bad", time_to_run="soon"),
     packmule.ConfigurationError, "time_to_run"),
    ("negative max_retries", lambda: Counted("bad", max_retries=-1),
     packmule.ConfigurationError, "max_retries"),
    ("max_retries not a number", lambda: Counted("bad", max_retries="3"),
     packmule.ConfigurationError, "max_retries"),
    ("priority below 0", lambda: Counted("bad", priority=-1),
     packmule.ConfigurationError, "priority"),
    ("priority over the last level", lambda: Counted("bad", priority=256),
     packmule.ConfigurationError, "priority"),
    ("configured tube with a colon", lambda: packmule.configure(tube="a:b"),
     packmule.ConfigurationError, "'a:b'"),
    ("unknown setting", lambda: packmule.configure(colour="red"),
     packmule.ConfigurationError, "'colour'"),
    ("ttr below 2 s", lambda: packmule.configure(ttr_seconds=1),
     packmule.ConfigurationError, "ttr_seconds"),
    ("server URL of another scheme", lambda: packmule.configure(beanstalkd="http://127.0.0.1:1"),
     packmule.ConfigurationError, "PACKMULE_BEANSTALKD"),
]


def _jobs_in_tube(tube: str) -> int:
    return backends().queue.tube_stats(0, tube).get("total-jobs", 0)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("name", "call", "error", "named"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_nothing_is_enqueued(
        env: dict[str, str], name: str, call: Call, error: type[packmule.PackmuleError],
        named: str) -> None:
    tube = env["PACKMULE_TUBE"]
    with pytest.raises(error) as caught:
        call()
    assert named in str(caught.value)
    assert _jobs_in_tube(tube) == 0, "a refused call left a job on beanstalkd"
    for runner in (Counted("bad"), InRun("bad")):
        progress = runner.update_progress()
        assert progress.total == 0, f"a refused call left jobs counted: {progress}"
        assert progress.state != "running", "a refused call left a run that looks alive"


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("setting", "error"), [
    ("beanstalkd", packmule.QueueUnavailable),
    ("memcached", packmule.StoreUnavailable),
    ("etcd", packmule.CoordinatorUnavailable),
])
def test_an_unreachable_server_is_named_by_its_address(
        env: dict[str, str], setting: str, error: type[packmule.ServerError]) -> None:
    scheme = {"beanstalkd": "beanstalk", "memcached": "memcached", "etcd": "etcd"}[setting]
    packmule.configure(**{setting: f"{scheme}://127.0.0.1:1"}, socket_timeout_seconds=2.0)
    with pytest.raises(error) as caught:
        InRun("unreachable").run(lambda r: r.enqueue("echo", [1, 0]))
    assert caught.value.address == "127.0.0.1:1"
    assert "127.0.0.1:1" in str(caught.value)
    with pytest.raises(error) as caught:
        Counted("unreachable").run_async(3)
    assert caught.value.address == "127.0.0.1:1"
    if setting == "beanstalkd":  # etcd and memcached answer: the refused run is not "running"
        assert Counted("unreachable").update_progress().state != "running"


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("setting", "error"), [
    ("beanstalkd", packmule.QueueUnavailable),
    ("memcached", packmule.StoreUnavailable),
])
def test_a_silent_server_times_out_naming_it(
        env: dict[str, str], setting: str, error: type[packmule.ServerError]) -> None:
    """A server that accepts connections but never answers fails within the timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        scheme = {"beanstalkd": "beanstalk", "memcached": "memcached"}[setting]
        packmule.configure(**{setting: f"{scheme}://{address}"}, socket_timeout_seconds=0.5)
        started = time.monotonic()
        with pytest.raises(error) as caught:
            InRun("silent").run(lambda r: r.enqueue("echo", [1, 0]))
        assert time.monotonic() - started < 5
    assert caught.value.address == address
    assert "TimeoutError" in str(caught.value), str(caught.value)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("call", [
    lambda: Counted("outside").enqueue("echo", [1, 0]),
    lambda: Counted("outside").enqueue_each("echo", [[1, 0]]),
    lambda: Counted("outside").deferred_result("total", []),
], ids=["enqueue", "enqueue_each", "deferred_result"])
def test_enqueue_outside_a_run_is_refused_pointing_to_run(env: dict[str, str], call: Call) -> None:
    """A job enqueued outside run() would start a run nothing could ever finish."""
    with pytest.raises(packmule.EnqueueError, match=r"Counted\(name\)\.run\(\.\.\.\) or \.run_async"):
        call()
    assert _jobs_in_tube(env["PACKMULE_TUBE"]) == 0
    assert Counted.find("outside") is None
