"""A run's lifecycle: its durable record in etcd, cancellation, loss checks.

The record (``/<namespace>/runs/<runner class>/<name>``) says which run is
the latest of a (runner class, name), whether it is running or how it ended
(value or failure, final counts). It lives on the run's etcd lease, so it
stays for ``result_ttl_seconds`` and "finished" is never confused with
"unknown".
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from packmule.backends import Backends
from packmule.envelope import dumps, loads
from packmule.outcome import Outcome
from packmule.store import RunKeys

COUNTERS = ("total", "completed", "failed", "handled", "lost")
_cancel_cache: dict[str, tuple[float, bool]] = {}


@dataclass(frozen=True)
class RunRecord:
    """What etcd knows of a run.

    Attributes:
        run: the run id.
        lease: the etcd lease its keys live on.
        state: ``running``, ``done``, ``failed``, ``lost`` or ``cancelled``.
        value: the result, when done.
        job: for a failure, the job that failed.
        traceback: for a failure or loss, its text.
        lost_jobs: for a loss, the jobs concerned.
        counts: the final progress counters, once finished.
        method: for a failure, the method of the job that failed.
    """

    run: str
    lease: int
    state: str
    value: Any = None
    job: int | None = None
    traceback: str = ""
    lost_jobs: list[int] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    started: float = 0.0
    finished: float = 0.0
    method: str = ""


def start(backends: Backends, identity: str) -> RunRecord:
    """Begin a new run of ``identity``: counters, sentinels, record. Returns its record."""
    coord, store = backends.coord, backends.store
    record = RunRecord(uuid.uuid4().hex[:16], coord.grant_lease(backends.settings.result_ttl_seconds),
                       "running", started=time.time())
    keys = RunKeys(backends.settings.namespace, record.run)
    store.set_many({getattr(keys, name): b"0" for name in ("sequence", *COUNTERS)})
    for index in range(len(store.names)):
        baseline = dumps({"evictions": store.evictions(index)})
        store.set(keys.sentinel(index), baseline, index=index)
    write(backends, identity, record)
    return record


def write(backends: Backends, identity: str, record: RunRecord) -> None:
    """Store ``record`` as the latest of ``identity``."""
    coord = backends.coord
    coord.put(coord.run_key(identity), dumps(record.__dict__), lease=record.lease)


def read(backends: Backends, identity: str) -> RunRecord | None:
    """The latest run of ``identity``, or None if none is known."""
    raw = backends.coord.get(backends.coord.run_key(identity))
    return None if raw is None else RunRecord(**loads(raw))


def counts(backends: Backends, run: str) -> dict[str, int] | None:
    """The run's progress counters in one read; None if memcached lost them."""
    keys = RunKeys(backends.settings.namespace, run)
    names = {getattr(keys, name): name for name in COUNTERS}
    found = backends.store.get_many(names)
    if keys.total not in found:
        return None
    return {names[key]: int(value) for key, value in found.items()}


def finish(backends: Backends, identity: str, run: str, lease: int, outcome: Outcome) -> None:
    """Record how run ``run`` ended, unless a newer run of ``identity`` started since."""
    current = read(backends, identity)
    if current is not None and current.run != run:
        return
    if current is not None and current.state == "cancelled":
        return
    state = "done" if outcome.ok else ("lost" if outcome.lost else "failed")
    final = counts(backends, run) or {}
    if state == "done" and final:
        # Every job of a finished run ended: a worker killed between counting a
        # job and marking it counted (two unanswered writes) counted it twice.
        final["completed"] = min(final["completed"], final["total"] - final.get("failed", 0))
    # A fresh lease: the record stays result_ttl_seconds from the end, not the start.
    lease = backends.coord.grant_lease(backends.settings.result_ttl_seconds)
    write(backends, identity, RunRecord(
        run, lease, state, value=outcome.value, job=None if outcome.ok else outcome.job,
        traceback=outcome.traceback, lost_jobs=list(outcome.lost_jobs),
        counts=final, started=current.started if current else 0.0,
        finished=time.time(), method=outcome.method))


def cancel(backends: Backends, identity: str, record: RunRecord) -> None:
    """Mark ``record``'s run cancelled, in memcached (for workers) and etcd."""
    backends.store.set(RunKeys(backends.settings.namespace, record.run).cancelled, b"1")
    write(backends, identity, RunRecord(**{**record.__dict__, "state": "cancelled",
                                           "finished": time.time()}))


def is_cancelled(backends: Backends, run: str) -> bool:
    """Whether ``run`` was cancelled, cached briefly to keep it off the per-job path."""
    now = time.monotonic()
    cached = _cancel_cache.get(run)
    if cached and now - cached[0] < backends.settings.cancel_check_seconds:
        return cached[1]
    flag = backends.store.get(RunKeys(backends.settings.namespace, run).cancelled) is not None
    if len(_cancel_cache) > 10_000:
        _cancel_cache.clear()
    _cancel_cache[run] = (now, flag)
    return flag


def state_lost(backends: Backends, run: str) -> bool:
    """Whether memcached may have lost some of ``run``'s keys.

    True when a server's sentinel for the run is gone (restart, flush) or the
    server evicted items since the run started (run memcached with ``-M``).
    """
    store = backends.store
    keys = RunKeys(backends.settings.namespace, run)
    for index in range(len(store.names)):
        raw = store.get_at(index, [keys.sentinel(index)]).get(keys.sentinel(index))
        if raw is None or store.evictions(index) > loads(raw)["evictions"]:
            return True
    return False


def lost_report(backends: Backends, run: str) -> dict[str, Any] | None:
    """What a worker reported when it found the run's state gone, if it did."""
    raw = backends.coord.get(backends.coord.run_lost_key(run))
    return None if raw is None else dict(loads(raw))
