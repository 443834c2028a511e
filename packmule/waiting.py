"""How a caller blocked in `deferred_result` waits for its aggregate.

Two phases. First the aggregate fires: its wake-up job, kicked by the
firer, wakes the caller (see :mod:`packmule.wakeup`; without one, an etcd
watch on its marker does: the event itself says "fired"), and between
wake-ups a doubling pause checks that the run was not cancelled and that
memcached did not lose its state, so neither hangs the caller. Then the
caller reads the values once and settles the aggregate; if a redelivered
job made its batch look complete before another job recorded its value,
the caller polls for that value with a short doubling pause (a fault path).

A server restarting is down for a moment: both phases ride it out for
``server_grace_seconds``, then raise the error naming the server. A server
that refuses a request is not down: its refusal is raised at once.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from packmule import aggregate, runs
from packmule.aggregate import RunScope
from packmule.errors import ResultMissing, RunCancelled, RunFailed, ServerUnavailable
from packmule.outcome import Outcome
from packmule.retry import doubling
from packmule.wakeup import WakeUp

T = TypeVar("T")
STRAGGLER_PAUSES = (0.01, 2.0)


def until_fired(scope: RunScope, number: int, then: Callable[[], T], *,
                waker: WakeUp | None = None) -> T:
    """Block until aggregate ``number`` fires, then return ``then()``.

    ``waker``: the aggregate's wake-up, parked (see :mod:`packmule.wakeup`);
    stopped here, whatever happens.
    Waiting on it, the caller sets no etcd watch: its event would come as
    the caller reads the values, and its thread compete for a CPU with the
    read (a wake-up lost is a fault: the pauses' checks find the marker).
    Raises if the run is cancelled or lost. A watch is stopped after ``then``
    (reading the values): stopping it, too, wakes etcd's client threads.
    """
    coord = scope.backends.coord
    fired = coord.marker_prefix(scope.run, number) + "fired"
    seen: set[str] = set()
    pause: Callable[[float], object]
    if waker is not None and waker.parked:
        pause, stop_watch = waker.wait, _no_watch
    else:
        wake = threading.Event()
        pause = _waiting_on(wake)
        stop_watch = coord.watch_prefixes([fired, coord.run_lost_key(scope.run)], wake, seen)

    def check() -> bool | None:
        if fired in seen or (waker is not None and waker.woken) or coord.get(fired) is not None:
            return True
        _raise_if_stopped(scope, number)
        return None

    try:
        _poll(scope, check, doubling(*scope.backends.settings.health_check_seconds), pause)
        return then()
    finally:
        stop_watch()
        if waker is not None:
            waker.stop()


def _no_watch() -> None:
    """Stop no watch (a caller waiting on its wake-up job sets none)."""


def _waiting_on(wake: threading.Event) -> Callable[[float], object]:
    """A pause that ends early when ``wake`` is set (and clears it for the next)."""
    def pause(seconds: float) -> None:
        wake.wait(seconds)
        wake.clear()

    return pause


def settled_values(scope: RunScope, record: dict[str, Any]) -> list[Any]:
    """The values to call a fired aggregate with; raise how it failed instead.

    Raises:
        RunFailed: a dependency failed (the aggregate does not allow failures).
        ResultMissing: memcached lost values and the runner halts on loss.
    """
    def check() -> list[Any] | None:
        gathered = aggregate.gather(scope, record)
        verdict = aggregate.settle(scope, record, gathered)
        if isinstance(verdict, Outcome):
            raise error_for(scope, verdict)
        if verdict == aggregate.WAIT:
            _raise_if_stopped(scope, None)
            return None
        return gathered.values

    return _poll(scope, check, doubling(*STRAGGLER_PAUSES))


def error_for(scope: RunScope, outcome: Outcome) -> RunFailed | ResultMissing:
    """The exception a caller raises for a failed outcome."""
    if outcome.lost:
        return ResultMissing(outcome.traceback, [scope.ref(n) for n in outcome.lost_jobs])
    return RunFailed(scope.ref(outcome.job), outcome.traceback, method=outcome.method,
                     run=scope.run)


def _poll(scope: RunScope, check: Callable[[], T | None], pauses: list[float],
          pause: Callable[[float], object] = time.sleep) -> T:
    """Call ``check`` until it returns a value, with ``pause`` (which may end early) between.

    An outage is ridden out for ``server_grace_seconds``; a server's refusal
    (:class:`ServerRefused`) is raised at once: asking again cannot help.
    """
    down_since: float | None = None
    grace = scope.backends.settings.server_grace_seconds
    for step in itertools.count():
        runs.keep_alive(scope.backends, scope.run, scope.lease)  # the run is active
        try:
            result = check()
            if result is not None:
                return result
            down_since = None
        except ServerUnavailable:
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since > grace:
                raise
        pause(pauses[min(step, len(pauses) - 1)])
    raise AssertionError("unreachable")


def _raise_if_stopped(scope: RunScope, number: int | None) -> None:
    """Raise ResultMissing if memcached lost the run's state (recording it lost), or RunCancelled."""
    record, _ = runs.observe(scope.backends, scope.run, missing=lambda: _missing(scope, number))
    if record is None:
        raise ResultMissing(f"run {scope.run} of {scope.identity}: its etcd record is gone")
    if record.state == "lost":
        raise ResultMissing(record.traceback,
                            [scope.ref(n) for n in record.lost_jobs or [number or 0]])
    if record.state == "cancelled" or runs.is_cancelled(scope.backends, scope.run):
        raise RunCancelled(f"run {scope.run} of {scope.identity} was cancelled")


def _missing(scope: RunScope, number: int | None) -> list[int] | None:
    """The jobs aggregate ``number`` lacks, or None if its description is gone too."""
    record = aggregate.aggregate_record(scope, number) if number is not None else None
    return None if record is None else aggregate.gather(scope, record).missing
