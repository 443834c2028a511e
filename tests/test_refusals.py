"""A refusal is not an outage; no job can kill a worker; failures are named and buried.

Invariants 4, 6, 9, 10 and 13 at their edges: a server that answers "no"
(a value over memcached's item size, a full ``-M`` memcached, a request over
etcd's size) fails that call at once with the server's words, while only an
unreachable or silent server is retried; a job whose value cannot be stored,
or which raises anything at all (SystemExit included), is failed, buried and
logged, and its worker goes on; the caller's RunFailed names the job, its
method and its run, with a traceback that starts at the user's code.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, Workers, in_thread, wait_until
from edge_runners import Edgy, Scattered
from runners import Driven

import packmule
from packmule import aggregate
from packmule.backends import backends
from packmule.errors import ServerRefused, ServerUnavailable
from packmule.jobref import JobRef
from packmule.runner import Runner
from packmule.servers import HOST, _binary
from packmule.store import Quiet, RunKeys, Store

MB = 1024 * 1024


def _tube(env: dict[str, str]) -> dict[str, int]:
    return backends().queue.tube_stats(0, env["PACKMULE_TUBE"])


def _buried(env: dict[str, str]) -> int:
    return _tube(env).get("current-jobs-buried", 0)


def _logged_worker(workers: Workers, log: Path) -> subprocess.Popen[bytes]:
    """One worker of ``edge_runners`` whose log (INFO and up) goes to ``log``."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "packmule", "--log-level", "INFO", "worker",
             "--import", "edge_runners", "--tube", workers.env["PACKMULE_TUBE"]],
            env={**os.environ, **workers.env}, cwd=ROOT, stderr=out)
    workers.procs.append(proc)
    return proc




def _kick(env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-m", "packmule", "kick", "--tube", env["PACKMULE_TUBE"]],
                   env={**os.environ, **env}, cwd=ROOT, capture_output=True, timeout=30,
                   check=True)


# 1. Refusals are named with the server's words; outages stay outages ------------------------
@pytest.mark.timeout(30)
def test_a_value_over_memcached_item_size_is_refused_naming_size_limit_and_server(
        env: dict[str, str]) -> None:
    store = backends().store
    key = "refusal:item"
    limit = store.value_limit(key)
    assert 1_000_000 < limit < MB  # 1 MB less the item header and the key
    store.set(key, b"x" * limit)  # the largest value fits: the limit is not a guess
    assert store.get(key) == b"x" * limit
    with pytest.raises(ServerRefused) as caught:
        store.set(key, b"x" * (limit + 1))
    message = str(caught.value)
    assert str(limit + 1) in message and str(limit) in message and key in message
    assert caught.value.address == store.names[0] and store.names[0] in message
    with pytest.raises(ServerRefused):
        store.add("refusal:other", b"x" * (2 * MB))
    assert store.get(key) == b"x" * limit, "a refusal left the connection out of step"


@pytest.mark.timeout(30)
def test_memcached_answers_of_no_are_refusals_with_its_words(env: dict[str, str]) -> None:
    store = backends().store
    store.set("refusal:text", b"not a number")
    with pytest.raises(ServerRefused, match="non-numeric"):
        store.incr("refusal:text")
    counter = Quiet("incr", "refusal:counter")
    with pytest.raises(ServerRefused, match="non-numeric") as caught:
        store.incr("refusal:text", quiet_first=[counter])  # the pipelined (raw) reply path
    assert not isinstance(caught.value, ServerUnavailable)
    assert store.incr("refusal:missing") is None, "the connection is usable after a refusal"


@pytest.fixture
def full_memcached() -> Iterator[str]:
    """A memcached of 2 MB that refuses writes when full (``-M``): ``host:port``."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    user = ["-u", "root"] if os.geteuid() == 0 else []
    proc = subprocess.Popen([_binary("memcached"), "-l", HOST, "-p", str(port), "-U", "0", "-M",
                             "-m", "2", *user], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def serves() -> bool:
            try:
                with socket.create_connection((HOST, port), timeout=0.5):
                    return True
            except OSError:
                return False

        wait_until(serves, timeout=10, what="the small memcached to serve")
        yield f"{HOST}:{port}"
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.timeout(30)
def test_a_full_memcached_is_a_refusal_not_an_outage(full_memcached: str) -> None:
    host, port = full_memcached.rsplit(":", 1)
    store = Store(((host, int(port)),), timeout_seconds=2.0, ttl_seconds=60)
    with pytest.raises(ServerRefused) as caught:
        for number in range(100):  # 100 x 100 KB into 2 MB
            store.set(f"fill:{number}", b"x" * 100_000)
    assert "out of memory" in str(caught.value)
    assert caught.value.address == full_memcached
    store.close()


@pytest.mark.timeout(30)
def test_etcd_refusals_carry_its_words_and_unreachable_stays_an_outage(
        env: dict[str, str]) -> None:
    coord = backends().coord
    with pytest.raises(ServerRefused, match="request is too large") as caught:
        coord.put(f"{coord.prefix}/big", b"x" * (1_600_000))  # etcd's limit is 1.5 MiB
    assert caught.value.address == coord.names
    with pytest.raises(ServerRefused, match="larger than max"):
        coord.put(f"{coord.prefix}/bigger", b"x" * (3 * MB))  # over gRPC's own limit
    lease = coord.grant_lease(60)
    coord._client.revoke_lease(lease)
    with pytest.raises(ServerRefused, match="lease not found"):
        coord.put(f"{coord.prefix}/leased", b"1", lease=lease)
    coord.put(f"{coord.prefix}/small", b"1")  # the client is fine after refusals
    packmule.configure(etcd="etcd://127.0.0.1:1", socket_timeout_seconds=1.0)
    with pytest.raises(packmule.CoordinatorUnavailable) as outage:
        backends().coord.get("/anything")
    assert isinstance(outage.value, ServerUnavailable)


# 2. A job whose value a server refuses, or JSON cannot carry, fails at once ----------------
@pytest.mark.timeout(60)
def test_a_value_over_the_item_size_fails_the_blocking_run_at_once(
        env: dict[str, str], workers: Workers, tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    worker = _logged_worker(workers, log)
    runner = Edgy("too-big")
    thread, outcome = in_thread(lambda: runner.run("big", 2 * MB))
    thread.join(timeout=30)
    assert not thread.is_alive(), "run() still waits 30 s after a value memcached refuses"
    error = outcome.get("error")
    assert isinstance(error, packmule.RunFailed), repr(outcome)
    limit = backends().store.value_limit(RunKeys(backends().settings.namespace, error.run).job(2))
    assert error.job is not None and error.job.number == 2 and error.method == "bad"
    stored = re.search(r"cannot store (\d+) bytes", str(error))
    assert stored and int(stored.group(1)) > 2 * MB and str(limit) in str(error), str(error)
    assert backends().store.names[0] in str(error)
    wait_until(lambda: _buried(env) == 1, timeout=10, what="the job to be buried")
    progress = runner.update_progress()
    assert (progress.state, progress.failed, progress.completed) == ("failed", 1, 2)
    assert worker.poll() is None
    assert Edgy("after").run("fine") == 13, "the worker must go on"
    assert " ERROR " in log.read_text() and "bad()" in log.read_text()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["big", "set", "datetime"])
def test_a_value_that_cannot_be_recorded_buries_the_job_and_a_kick_resumes_the_run(
        env: dict[str, str], workers: Workers, tmp_path: Path, kind: str) -> None:
    fix = tmp_path / "fixed"
    env["PACKMULE_TEST_FIX_FILE"] = str(fix)
    log = tmp_path / "worker.log"
    worker = _logged_worker(workers, log)
    runner = Edgy(f"unrecordable-{kind}")
    runner.run_async(kind, 2 * MB)
    wait_until(lambda: runner.update_progress().state == "failed", timeout=30,
               what=f"the run with a {kind} value to fail")
    wait_until(lambda: _buried(env) == 1, timeout=10, what="the job to be buried, not deleted")
    with pytest.raises(packmule.RunFailed) as caught:
        runner.get_return_value()
    assert caught.value.method == "bad" and "bad()" in str(caught.value)
    assert runner.update_progress().failed == 1
    text = log.read_text()
    assert " ERROR " in text and "bad()" in text, text
    fix.touch()
    _kick(env)
    wait_until(lambda: runner.update_progress().state == "done", timeout=30,
               what="the kicked run to finish")
    assert runner.get_return_value() == 13
    progress = runner.update_progress()
    assert (progress.failed, progress.completed) == (0, progress.total)
    assert worker.poll() is None


# 4. No job, however bad, kills a worker -----------------------------------------------------
# (kind, what the failure's last line says)
FATAL = [
    ("exit", "SystemExit: 3"),
    ("keyboard", "KeyboardInterrupt"),
    ("recursion", "RecursionError"),
    ("memory", "MemoryError"),
    ("unprintable", "Unprintable"),
]


@pytest.mark.timeout(120)
def test_no_job_kills_its_worker(env: dict[str, str], workers: Workers, tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    worker = _logged_worker(workers, log)
    for buried, (kind, said) in enumerate(FATAL, 1):
        with pytest.raises(packmule.RunFailed) as caught:
            Edgy(f"fatal-{kind}").run(kind)
        assert said in str(caught.value), f"{kind}: {caught.value}"
        assert caught.value.method == "bad"
        wait_until(lambda n=buried: _buried(env) == n, timeout=10,  # type: ignore[misc]
                   what=f"the {kind} job to be buried")
        assert worker.poll() is None, f"a job doing {kind!r} killed the worker"
        assert Edgy(f"fatal-{kind}").update_progress().failed == 1
    assert Edgy("survivor").run("fine") == 13
    text = log.read_text()
    for kind, said in FATAL:
        assert said in text, f"{kind} not logged"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("runner_name", ["BadlyHandled", "ExitingHandler"])
def test_an_error_path_that_fails_itself_buries_the_job_and_the_worker_goes_on(
        env: dict[str, str], workers: Workers, tmp_path: Path, runner_name: str) -> None:
    import edge_runners

    cls: type[Edgy] = getattr(edge_runners, runner_name)
    worker = _logged_worker(workers, tmp_path / "worker.log")
    with pytest.raises(packmule.RunFailed) as caught:
        cls("handled-badly").run("boom")
    assert caught.value.method == "bad"
    wait_until(lambda: _buried(env) == 1, timeout=10, what="the job to be buried")
    progress = cls("handled-badly").update_progress()
    assert (progress.failed, progress.handled) == (1, 0)
    assert worker.poll() is None
    assert Edgy("after").run("fine") == 13


# 5. Errors name the job's method and run; tracebacks start at the user's code ---------------
@pytest.mark.timeout(60)
def test_run_failed_names_job_method_and_run_and_starts_at_user_code(
        env: dict[str, str], workers: Workers, tmp_path: Path) -> None:
    _logged_worker(workers, tmp_path / "worker.log")
    runner = Edgy("named")
    with pytest.raises(packmule.RunFailed) as caught:
        runner.run("boom")
    record = Edgy.find("named")
    assert record is not None
    error = caught.value
    assert str(error).startswith(f"job 2 bad() of run {record.run} failed: ValueError: boom")
    assert (error.method, error.run, error.job and error.job.number) == ("bad", record.run, 2)
    frames = [line for line in error.traceback.splitlines() if line.startswith('  File "')]
    assert frames and "edge_runners.py" in frames[0], error.traceback
    assert not any("/packmule/" in frame for frame in frames), error.traceback

    runner.run_async("boom")
    wait_until(lambda: runner.update_progress().finished, timeout=30, what="the run to fail")
    record = Edgy.find("named")
    assert record is not None
    with pytest.raises(packmule.RunFailed) as caught:
        runner.get_return_value()
    assert str(caught.value).startswith(f"job 2 bad() of run {record.run} failed: "
                                        "ValueError: boom"), str(caught.value)
    assert caught.value.method == "bad" and caught.value.run == record.run


# 3. An aggregate's description over the item size ------------------------------------------
@pytest.mark.timeout(60)
def test_an_aggregate_over_200k_scattered_jobs_is_stored_and_read_back(
        env: dict[str, str]) -> None:
    Driven("scattered").run(_store_and_read_200k_scattered_deps)


def _store_and_read_200k_scattered_deps(runner: Runner) -> None:
    context = runner._current_context()
    scope, batches = context.scope, context.batches
    count = 200_000
    # Two interleaved batches (odd and even numbers): not one contiguous range anywhere.
    deps = [JobRef(n, "", scope.run, "odd" if n % 2 else "even")
            for n in [*range(1, count, 2), *range(2, count + 1, 2)]]
    store = scope.backends.store
    for batch in ("odd", "even"):
        batches.sizes[batch] = count // 2
        store.set(scope.keys.batch_done(batch), b"0")
    ref, _ = aggregate.register_aggregate(scope, batches, deps, park=None,
                                          allow_failures=False, halt=True)
    record = aggregate.aggregate_record(scope, ref.number)
    assert record is not None
    assert len(store.get(scope.keys.aggregate(ref.number)) or b"") < 10_000, \
        "the description read on every try_fire carries the whole dependency list"
    gathered = aggregate.gather(scope, record)
    assert gathered.missing == [ref.number for ref in deps]
    # A lost part is a loss naming the aggregate, never a shorter list of values.
    store.delete(scope.keys.aggregate_part(ref.number, 1))
    with pytest.raises(packmule.ResultMissing) as caught:
        aggregate.gather(scope, record)
    assert [job.number for job in caught.value.jobs] == [ref.number]


@pytest.mark.timeout(60)
def test_aggregates_over_scattered_jobs_still_sum_in_caller_and_worker(
        env: dict[str, str], workers: Workers, monkeypatch: pytest.MonkeyPatch) -> None:
    workers.start("edge_runners", 2)
    monkeypatch.setattr(aggregate, "DEPS_PER_PART", 7)  # this caller stores its list in parts
    expected = sum(n * n for n in range(0, 60, 2))
    assert Scattered("caller").run(60) == expected
    Scattered("worker").run_async(60)
    wait_until(lambda: Scattered("worker").update_progress().finished, timeout=30,
               what="the worker-side aggregate")
    assert Scattered("worker").get_return_value() == expected
