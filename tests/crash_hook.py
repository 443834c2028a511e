"""Test-only crash hook: kill a worker at an exact moment of recording a job's result.

Workers import it through ``fault_runners``. When :data:`CRASH_HOOK` is set
to ``POINT:FLAG`` at import time, ``packmule.execution.record`` is wrapped so
that the first worker reaching POINT while recording a job's result creates
the file FLAG and dies with SIGKILL (later executions find FLAG and go on).
Points:

- ``before-fire``: an aggregate's dependencies are all done, its parked job
  (the aggregate's, or its caller's wake-up job) is not kicked yet, its etcd
  "fired" marker not written;
- ``after-fire``: the parked job is kicked and the marker written, nothing
  after them is done (the job's own delete, its batch-mates' records);
- ``before-count``: the job's outcome is recorded, its progress count not sent
  (where packmule sends the value, its count and its batch's count in one
  write, the hook sends the value alone, as a worker killed between two
  writes of a memcached pool would leave it);
- ``after-count``: its progress count is sent (in one write with its counted
  mark and its batch's completion count), nothing after it is;
- ``after-chain``: a job that returned a deferred result (a JobRef) has its
  chain registered, and is not deleted from beanstalkd yet.

The worker calls ``execution.record_all(...)`` (and ``execution.handle`` calls
``record`` through the module's globals), so replacing the module attributes
reaches every recording; packmule itself carries no trace of the hook.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from packmule import execution
from packmule.aggregate import RunScope
from packmule.envelope import Envelope
from packmule.errors import ServerRefused
from packmule.jobref import JobRef
from packmule.runner import Runner
from packmule.store import Ask, Quiet, Reply

CRASH_HOOK = "PACKMULE_TEST_CRASH_AT"
_CRASH_POINTS = ("before-fire", "after-fire", "before-count", "after-count", "after-chain")

_record = execution.record
_record_all = execution.record_all
_fail = execution.fail
_local = threading.local()  # .armed: this thread is inside a hooked recording


def _armed() -> bool:
    return bool(getattr(_local, "armed", False))


def record(runner: Runner, envelope: Envelope, result: Any) -> None:
    """``execution.record``, dying at the point :data:`CRASH_HOOK` names."""
    assert runner._context is not None
    with _crash_hook(runner._context.scope):
        _record(runner, envelope, result)
    if isinstance(result, JobRef) and os.environ.get(CRASH_HOOK, "").startswith("after-chain:"):
        _die_once(os.environ[CRASH_HOOK].partition(":")[2])


def record_all(results: Sequence[tuple[Runner, Envelope, Any]]) -> list[Exception | None]:
    """``execution.record_all`` (a worker's batch of quick jobs), hooked like ``record``."""
    context = results[0][0]._context
    assert context is not None
    with _crash_hook(context.scope):
        return _record_all(results)


def fail(runner: Runner, envelope: Envelope, text: str) -> None:
    """``execution.fail``, never hooked: ``record`` recording a value JSON cannot
    carry as a failure is outside the recording the hook watches."""
    armed = _armed()
    _local.armed = False
    try:
        _fail(runner, envelope, text)
    finally:
        _local.armed = armed


@contextmanager
def _crash_hook(scope: RunScope) -> Iterator[None]:
    """While recording, die at the point :data:`CRASH_HOOK` names, if it names one.

    The clients' methods are wrapped on this thread's instances for the
    duration of the recording only: the protocol code itself is unchanged.
    """
    point, _, flag = os.environ.get(CRASH_HOOK, "").partition(":")
    if point not in _CRASH_POINTS or not flag or _armed():  # (a batch's record: hooked already)
        yield
        return
    coord, store, queue = scope.backends.coord, scope.backends.store, scope.backends.queue
    create, incr, in_one_write = coord.create_if_absent, store.incr, store.in_one_write
    kick = queue.kick_job

    def maybe_die_then_kick(index: int, job_id: int) -> bool:
        if _armed() and point == "before-fire":  # the firing kicks first, then writes the marker
            _die_once(flag)
        return kick(index, job_id)

    def create_then_maybe_die(key: str, value: bytes, *, lease: int = 0) -> bool:
        fired = _armed() and key.endswith("/fired")
        if fired and point == "before-fire":
            _die_once(flag)
        created = create(key, value, lease=lease)
        if fired and point == "after-fire":
            _die_once(flag)
        return created

    def maybe_die_around_incr(key: str, amount: int = 1, *,
                              quiet_first: Sequence[Quiet] = ()) -> int | None:
        counting = _armed() and any(q.key == scope.keys.completed for q in quiet_first)
        if counting and point == "before-count":
            _die_once(flag)
        result = incr(key, amount, quiet_first=quiet_first)
        if counting and point == "after-count":
            _die_once(flag)
        return result

    def maybe_die_around_one_write(commands: Sequence[Quiet | Ask]
                                   ) -> list[Reply | ServerRefused] | None:
        counting = _armed() and any(c.key == scope.keys.completed for c in commands)
        if counting and point == "before-count" and not os.path.exists(flag):
            value = commands[0]
            assert isinstance(value, Ask) and isinstance(value.value, bytes)
            store.add(value.key, value.value.rstrip(b"\n"))  # recorded, not counted
            _die_once(flag)
        result = in_one_write(commands)
        if counting and point == "after-count":
            _die_once(flag)
        return result

    coord.create_if_absent = create_then_maybe_die  # type: ignore[method-assign]
    queue.kick_job = maybe_die_then_kick  # type: ignore[method-assign]
    store.incr = maybe_die_around_incr  # type: ignore[method-assign]
    store.in_one_write = maybe_die_around_one_write  # type: ignore[method-assign]
    _local.armed = True
    try:
        yield
    finally:  # drop the instance attributes: the methods show again
        _local.armed = False
        del coord.create_if_absent
        del queue.kick_job
        del store.incr
        del store.in_one_write


def _die_once(flag: str) -> None:
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


if os.environ.get(CRASH_HOOK):
    execution.record = record
    execution.record_all = record_all
    execution.fail = fail
