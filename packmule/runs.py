"""A run's lifecycle: its durable record in etcd, its lease, cancellation, loss checks.

Each run's record lives under its id (``/<namespace>/run/<run id>``) and is
indexed under its identity (``/<namespace>/runs/<class path>/<name>/<run
id>``): the latest *started* run of a (runner class, name) is the index key
etcd created last, so two runs of one name both proceed, each reachable by
its id. Record, index key and the run's aggregate markers live on the run's
etcd lease, kept alive while the run is active (a worker executing its jobs,
a caller waiting on it) and refreshed once more when it ends: they stay
``result_ttl_seconds`` after the end, and "finished" is never confused with
"unknown".

Every change of a record is a transaction on the revision it read, and only
these transitions exist::

    running -> done | failed | lost | cancelled   (finish, cancel, a loss seen)
    failed  -> running | done                     (resume, and its completion; if resumable)

An ended run's outcome is never overwritten otherwise.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Collection
from contextlib import suppress
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote

from packmule import leftovers
from packmule.backends import Backends
from packmule.envelope import dumps, loads
from packmule.errors import PackmuleError, ServerError
from packmule.outcome import Outcome
from packmule.store import RunKeys

log = logging.getLogger("packmule.runs")

COUNTERS = ("total", "completed", "failed", "handled", "lost")
_cancel_cache: dict[str, tuple[float, bool]] = {}
_alive_cache: dict[str, float] = {}  # run id -> when this process last refreshed its lease


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
        started: when it started (epoch seconds).
        finished: when it ended (epoch seconds), 0 while running.
        runner: the runner's class path, ``module:QualName``.
        name: the run's name.
        resumable: for a failure, whether kicking its buried job resumes the
            run (a `run_async` run: its root job is a worker's); a blocking
            ``run()`` whose caller raised is not.
        method: for a failure, the method of the job that failed.
        signer: the key id of the secret its starter signs jobs with, "" if
            unsigned: a worker refusing one of the run's jobs for its signature
            fails the run only if the job is signed as its starter signs (see
            :func:`packmule.execution.refuse`).
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
    runner: str = ""
    name: str = ""
    resumable: bool = False

    @property
    def identity(self) -> str:
        """``module:QualName/name``: the runner class and the run's name."""
        return f"{self.runner}/{self.name}"
    method: str = ""
    signer: str = ""


def start(backends: Backends, runner: str, name: str, *, resumable: bool = False) -> RunRecord:
    """Begin a new run of (``runner`` class path, ``name``): counters, sentinels, record.

    memcached is written first: a reader that finds the record running also
    finds its sentinels, and does not take the run for lost.
    """
    coord, store = backends.coord, backends.store
    record = RunRecord(uuid.uuid4().hex[:16], coord.grant_lease(backends.settings.result_ttl_seconds),
                       "running", started=time.time(), runner=runner, name=name,
                       resumable=resumable,
                       signer=backends.signer.key_id if backends.signer is not None else "")
    keys = RunKeys(backends.settings.namespace, record.run)
    store.set_many({getattr(keys, counter): b"0" for counter in ("sequence", *COUNTERS)})
    for index in range(len(store.names)):
        baseline = dumps({"evictions": store.evictions(index)})
        store.set(keys.sentinel(index), baseline, index=index)
    index_key = coord.runs_prefix(runner, name) + record.run
    if not coord.create_all_if_absent({coord.run_key(record.run): _encode(record),
                                       index_key: b""}, lease=record.lease):
        raise PackmuleError(f"run id {record.run} of {record.identity} is taken (64 random bits)")
    return record


def read_run(backends: Backends, run: str) -> RunRecord | None:
    """The record of run ``run`` as stored, or None if none is known (or it expired)."""
    raw = backends.coord.get(backends.coord.run_key(run))
    return None if raw is None else _decode(raw)


def latest_run(backends: Backends, runner: str, name: str) -> str | None:
    """The id of the latest started run of (``runner``, ``name``); None if none is known.

    One etcd range read of one key, however many runs the name has.
    """
    prefix = backends.coord.runs_prefix(runner, name)
    key = backends.coord.newest_key(prefix)
    return None if key is None else key[len(prefix):]


def history(backends: Backends, runner: str, name: str) -> list[str]:
    """The ids of every known run of (``runner``, ``name``), oldest started first (O(runs))."""
    prefix = backends.coord.runs_prefix(runner, name)
    return [key[len(prefix):] for key in backends.coord.keys_by_creation(prefix)]


def recent(backends: Backends, *, states: Collection[str] = (), runner: str = "",
           limit: int = 50) -> list[RunRecord]:
    """The latest started runs, newest first: those in ``states`` (all if empty) of ``runner``.

    ``runner`` is a class path or a bare class name (see :func:`runner_matches`).
    Records are read in pages, newest first by etcd's creation revision
    (a record keeps it through every transition, so it is the start order),
    until ``limit`` match: O(runs read), for tools, never on a job's path.
    States are as stored: a running run whose state memcached lost reads
    ``running`` until a reader observes it (:func:`observe`).
    """
    coord, before = backends.coord, 0
    found: list[RunRecord] = []
    page = max(limit, 100)
    while len(found) < limit:
        batch = coord.newest_values(coord.run_key(""), limit=page, created_before=before)
        for _, raw, _ in batch:
            record = _decode(raw)
            if (not states or record.state in states) and runner_matches(record.runner, runner):
                found.append(record)
        if len(batch) < page:
            break
        before = batch[-1][2]
    return found[:limit]


def count_states(backends: Backends) -> dict[str, int]:
    """How many kept run records are in each state (as recorded): one listing, O(runs), for tools."""
    found: dict[str, int] = {}
    for raw in backends.coord.get_prefix(backends.coord.run_key("")).values():
        state = str(loads(raw)["state"])
        found[state] = found.get(state, 0) + 1
    return found


def runner_matches(path: str, wanted: str) -> bool:
    """Whether class path ``path`` is ``wanted``: the same path, or its bare class name ("" matches all)."""
    return not wanted or path == wanted or path.partition(":")[2] == wanted


def runner_paths(backends: Backends, runner: str, name: str) -> list[str]:
    """The class paths matching ``runner`` that have a known run named ``name``.

    A class path (``module:QualName``) is returned as it is: a reader needs no
    import. A bare class name is looked up in the index of runs (a keys-only
    listing, O(runs)); two modules may hold a class of that name, so the
    caller decides what to do with several.
    """
    if ":" in runner:
        return [runner]
    index = backends.coord.runs_index()
    encoded = quote(name, safe="")
    paths = set()
    for key in backends.coord.keys_by_creation(index):
        path, _, rest = key[len(index):].partition("/")
        if runner_matches(path, runner) and rest.rpartition("/")[0] == encoded:
            paths.add(path)
    return sorted(paths)


def observe(backends: Backends, run: str, *,
            missing: Callable[[], list[int] | None] | None = None,
            ) -> tuple[RunRecord | None, dict[str, int] | None]:
    """The run's record and its progress counters, after checking a running run for loss.

    For a running run, reads the loss report workers leave in etcd and each
    memcached server's sentinel and eviction count (O(servers), never
    O(jobs)); when its state is lost, the record goes running -> lost by
    transaction, naming the jobs ``missing()`` gives (else those reported),
    so every later reader sees ``lost``. Counters are None if memcached lost them.
    """
    coord = backends.coord
    (raw, _), (report_raw, _) = coord.get_with_revisions(
        [coord.run_key(run), coord.run_lost_key(run)])
    if raw is None:
        return None, None
    record = _decode(raw)
    if record.state != "running":
        return record, record.counts or counts(backends, run)
    found, whole = _live(backends, run)
    if whole and report_raw is None:
        return record, found
    report = None if report_raw is None else dict(loads(report_raw))
    why = report["why"] if report else "memcached lost the run's state (restart or eviction)"
    jobs = missing() if missing else None
    if jobs is None:
        jobs = list(report["jobs"]) if report else []
    now, changed = _end(backends, run, Outcome.missing(jobs, why), found or {}, None)
    if changed:  # its parked aggregates can never fire now (best effort: their notes may be lost)
        with suppress(ServerError):
            leftovers.remove_parked(backends, run)
    return now, found


def counts(backends: Backends, run: str) -> dict[str, int] | None:
    """The run's progress counters in one read; None if memcached lost them."""
    keys = RunKeys(backends.settings.namespace, run)
    names = {getattr(keys, name): name for name in COUNTERS}
    found = backends.store.get_many(names)
    if keys.total not in found:
        return None
    return {names[key]: int(value) for key, value in found.items()}


def counts_of(backends: Backends, run_ids: Collection[str]) -> dict[str, dict[str, int] | None]:
    """The progress counters of several runs in one read per memcached server (see :func:`counts`)."""
    namespace = backends.settings.namespace
    names = {getattr(RunKeys(namespace, run), counter): (run, counter)
             for run in run_ids for counter in COUNTERS}
    found: dict[str, dict[str, int]] = {}
    for key, value in backends.store.get_many(names).items():
        run, counter = names[key]
        found.setdefault(run, {})[counter] = int(value)
    return {run: found[run] if "total" in found.get(run, {}) else None for run in run_ids}


def finish(backends: Backends, run: str, outcome: Outcome, *,
           resumable: bool | None = None) -> bool:
    """Record how ``run`` ended; True if this call recorded it.

    Allowed from ``running`` (any end), and from a resumable ``failed`` to
    ``done`` (the run resumed by a kick completed). Anything else is refused,
    nothing written: an ended run keeps its outcome, a cancelled run stays
    cancelled. ``resumable`` sets the record's flag (kept if None). The
    run's lease is refreshed, so the record stays ``result_ttl_seconds``
    from the end.
    """
    final = counts(backends, run) or {}
    if outcome.ok and final:
        # Every job of a finished run ended: a worker killed between counting a
        # job and marking it counted (two unanswered writes) counted it twice.
        final["completed"] = min(final["completed"], final["total"] - final.get("failed", 0))
    return _end(backends, run, outcome, final, resumable)[1]


def cancel(backends: Backends, run: str) -> bool:
    """Cancel ``run`` if it is running: etcd (running -> cancelled), then the flag workers read.

    Returns False if the run had already ended: its outcome stays, and no
    cancel flag is set. A cancelled run's flag is set again (it may have
    failed to be written the first time). The counters at that moment are
    kept in the record, so it reads ``4 / 15`` once memcached forgot the run.
    A run this call cancelled has its parked aggregates removed from
    beanstalkd: they can never fire now.
    """
    final = counts(backends, run) or {}
    now, changed = _transition(backends, run, lambda current: replace(
        current, state="cancelled", finished=time.time(), counts=final)
        if current.state == "running" else None)
    if now is not None and now.state == "cancelled":
        backends.store.set(RunKeys(backends.settings.namespace, run).cancelled, b"1")
    if changed:
        leftovers.remove_parked(backends, run)
    return changed


def resume(backends: Backends, run: str) -> bool:
    """Take a failed, resumable run back to ``running`` (its buried job was kicked).

    Returns False, nothing written, for any other state or a run that is not resumable.
    """
    now, changed = _transition(backends, run, lambda current: replace(
        current, state="running", job=None, traceback="", counts={}, finished=0.0)
        if current.state == "failed" and current.resumable else None)
    if changed and now is not None:
        backends.coord.refresh_lease(now.lease)
    return changed


def keep_alive(backends: Backends, run: str, lease: int) -> None:
    """Keep ``run``'s lease alive: at most one refresh per quarter of its TTL per process.

    Called for each job a worker executes and each pause of a waiting caller,
    it costs etcd one refresh (about a millisecond) per run and interval, not
    one per job. A failed refresh is logged, not raised: the lease has three
    quarters of its time left, and the next interval tries again.
    """
    now = time.monotonic()
    last = _alive_cache.get(run)
    if not lease or (last is not None and now - last < backends.settings.result_ttl_seconds / 4):
        return
    if len(_alive_cache) > 10_000:
        _alive_cache.clear()
    _alive_cache[run] = now
    try:
        backends.coord.refresh_lease(lease)
    except ServerError as err:
        log.warning("keeping the lease of run %s alive failed: %s", run, err)


def job_cancelled(backends: Backends, run: str, lease: int) -> bool:
    """Whether a job in progress must stop (its run was cancelled); keeps the run's lease alive.

    For the keep-alive of a running job: a single job may outlast the lease's TTL.
    """
    keep_alive(backends, run, lease)
    return is_cancelled(backends, run)


def is_cancelled(backends: Backends, run: str) -> bool:
    """Whether ``run`` was cancelled, cached briefly to keep it off the per-job path."""
    now = time.monotonic()
    cached = _cancel_cache.get(run)
    if cached and now - cached[0] < backends.settings.cancel_check_seconds:
        return cached[1]
    flag = leftovers.dropped(backends, run)
    if len(_cancel_cache) > 10_000:
        _cancel_cache.clear()
    _cancel_cache[run] = (now, flag)
    return flag


def state_lost(backends: Backends, run: str) -> bool:
    """Whether memcached may have lost some of ``run``'s keys.

    True when a server's sentinel for the run is gone (restart, flush) or the
    server evicted items since the run started (run memcached with ``-M``).
    """
    return not _live(backends, run, with_counters=False)[1]


def _live(backends: Backends, run: str, *,
          with_counters: bool = True) -> tuple[dict[str, int] | None, bool]:
    """``(counters or None, whole)``: one read and at most one ``stats`` per memcached server.

    ``whole`` is False when a server's sentinel for the run is gone or the
    server evicted items since the run started.
    """
    store, keys = backends.store, RunKeys(backends.settings.namespace, run)
    names = {getattr(keys, name): name for name in COUNTERS} if with_counters else {}
    wanted = {index: [keys.sentinel(index)] for index in range(len(store.names))}
    for key in names:
        wanted[store.server_of(key)].append(key)
    found: dict[str, bytes] = {}
    whole = True
    for index, group in wanted.items():
        got = store.get_at(index, group)
        found.update(got)
        raw = got.get(keys.sentinel(index))
        whole = whole and raw is not None and store.evictions(index) <= loads(raw)["evictions"]
    if keys.total not in found:
        return None, whole
    return {names[key]: int(found[key]) for key in names if key in found}, whole


def _end(backends: Backends, run: str, outcome: Outcome, final: dict[str, int],
         resumable: bool | None) -> tuple[RunRecord | None, bool]:
    """Transition ``run`` to how ``outcome`` ends it, if allowed (see :func:`finish`)."""
    state = "done" if outcome.ok else ("lost" if outcome.lost else "failed")

    def ended(current: RunRecord) -> RunRecord | None:
        resuming = current.state == "failed" and current.resumable and outcome.ok
        if current.state != "running" and not resuming:
            return None
        return replace(current, state=state, value=outcome.value,
                       job=None if outcome.ok else outcome.job, traceback=outcome.traceback,
                       lost_jobs=list(outcome.lost_jobs), counts=final, finished=time.time(),
                       method="" if outcome.ok else outcome.method,
                       resumable=current.resumable if resumable is None else resumable)

    now, changed = _transition(backends, run, ended)
    if changed and now is not None:
        backends.coord.refresh_lease(now.lease)  # the TTL counts from the end
    return now, changed


def _transition(backends: Backends, run: str, change: Callable[[RunRecord], RunRecord | None],
                ) -> tuple[RunRecord | None, bool]:
    """Apply ``change`` to ``run``'s record by a transaction on the revision read.

    ``change`` returns the new record, or None to refuse (nothing is
    written). Returns the record as it now stands (None if there is none)
    and whether this call changed it. A lost compare means another
    transition came first: read again and decide again. The loop ends
    because every transition but a resume ends the run, and a resume needs
    a kick.
    """
    coord, key = backends.coord, backends.coord.run_key(run)
    while True:
        [(raw, revision)] = coord.get_with_revisions([key])
        if raw is None:
            return None, False
        current = _decode(raw)
        new = change(current)
        if new is None:
            return current, False
        if coord.replace_if(key, _encode(new), revision, lease=current.lease):
            return new, True


def _encode(record: RunRecord) -> bytes:
    return dumps(record.__dict__, what=f"the record of run {record.run}")


def _decode(raw: bytes) -> RunRecord:
    return RunRecord(**loads(raw))
