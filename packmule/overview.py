"""What operators read and do: runs listed and shown, tubes, workers; kick, cancel, purge a run.

The command line (:mod:`packmule.cli_ops`) and the dashboard
(:mod:`packmule.web`) both call these, so a page and a command always
agree, and ``--json`` has one form, documented in ``docs/monitoring.md``.
Nothing here imports a runner class: every run's record carries its
runner's class path, so reading needs no ``--import``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from packmule import leftovers, runs
from packmule.aggregate import NOTE_CHUNK
from packmule.backends import Backends
from packmule.envelope import loads
from packmule.errors import PackmuleError, UnknownRun
from packmule.leftovers import FailedJob
from packmule.registry import WorkerInfo, list_workers
from packmule.runs import COUNTERS, RunRecord
from packmule.store import RunKeys
from packmule.tree import Tree, aggregate_numbers, read_tree

ENDED = ("done", "failed", "lost", "cancelled")
STATES = ("running", *ENDED)


@dataclass(frozen=True)
class RunSummary:
    """One run as listed: who, where it stands, when.

    Attributes:
        run: the run id.
        runner: the runner's class path, ``module:QualName``.
        name: the run's name.
        state: ``running``, ``done``, ``failed``, ``lost`` or ``cancelled``.
        counts: ``total``, ``completed``, ``failed``, ``handled`` and ``lost`` jobs
            (zeros when memcached forgot a running run's counters).
        started: epoch seconds.
        finished: epoch seconds, None while running.
        duration_seconds: from start to end, or to now while running.
        resumable: a failed run that kicking its buried jobs resumes.
    """

    run: str
    runner: str
    name: str
    state: str
    counts: dict[str, int]
    started: float
    finished: float | None
    duration_seconds: float
    resumable: bool

    @property
    def progress(self) -> str:
        """``53 / 101``, with ``(1 failed)`` when some failed."""
        text = f"{self.counts['completed']} / {self.counts['total']}"
        return f"{text} ({self.counts['failed']} failed)" if self.counts["failed"] else text

    @property
    def percent(self) -> float:
        """Completed and failed jobs, in percent of the total (100 for an empty run that ended)."""
        total = self.counts["total"]
        if not total:
            return 0.0 if self.state == "running" else 100.0
        return min(100.0, 100.0 * (self.counts["completed"] + self.counts["failed"]) / total)

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` form of a run (see docs/monitoring.md)."""
        return asdict(self)


@dataclass(frozen=True)
class RunDetail:
    """One run as shown: its summary, value or failure, failed and lost jobs, aggregates.

    Attributes:
        summary: as listed.
        value: the run's value (JSON) when done.
        failure: for a failed or lost run, ``job`` (None for a loss), ``method``
            and ``traceback`` (for a loss, why).
        failed_jobs: the index of its failures, oldest first (the latest 100).
        lost_jobs: for a loss, the jobs whose state memcached lost.
        aggregates: its tree of aggregates, when asked for.
    """

    summary: RunSummary
    value: Any = None
    failure: dict[str, Any] | None = None
    failed_jobs: list[FailedJob] = field(default_factory=list)
    lost_jobs: list[int] = field(default_factory=list)
    aggregates: Tree | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` form of ``show`` (see docs/monitoring.md)."""
        shown = {**self.summary.to_json(), "value": self.value, "failure": self.failure,
                 "failed_jobs": [asdict(job) for job in self.failed_jobs],
                 "lost_jobs": self.lost_jobs}
        if self.aggregates is not None:
            shown["aggregates"] = asdict(self.aggregates)
        return shown


@dataclass(frozen=True)
class TubeStats:
    """One tube on one beanstalkd server: its jobs by state, and the workers watching it."""

    server: str
    tube: str
    ready: int
    reserved: int
    delayed: int
    buried: int
    watching: int

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` form of a tube (see docs/monitoring.md)."""
        return asdict(self)


def summarize(record: RunRecord, counts: dict[str, int] | None) -> RunSummary:
    """A run's summary from its record and its counters (the record's own once it ended)."""
    ended = record.state != "running"
    found = (record.counts if ended and record.counts else counts) or {}
    finished = record.finished if ended and record.finished else None
    return RunSummary(record.run, record.runner, record.name, record.state,
                      {name: int(found.get(name, 0)) for name in COUNTERS}, record.started,
                      finished, max(0.0, (finished or time.time()) - record.started),
                      record.state == "failed" and record.resumable)


def list_runs(backends: Backends, *, states: tuple[str, ...] = (), runner: str = "",
              limit: int = 50) -> list[RunSummary]:
    """The latest started runs, newest first, filtered by state and runner.

    Running runs' counters come in one read for all; one whose counters
    memcached lost is observed, so it reads (and is recorded) ``lost``.
    """
    stored = (*states, "running") if "lost" in states else states  # a running one may be lost
    records = runs.recent(backends, states=stored, runner=runner, limit=limit)
    live = runs.counts_of(backends, [r.run for r in records if r.state == "running"])
    summaries = []
    for record in records:
        counts = live.get(record.run)
        if record.state == "running" and counts is None:
            record, counts = _observed(backends, record)
        if not states or record.state in states:
            summaries.append(summarize(record, counts))
    return summaries


def _observed(backends: Backends, record: RunRecord) -> tuple[RunRecord, dict[str, int] | None]:
    now, counts = runs.observe(backends, record.run)
    return (record if now is None else now), counts


def run_id_of(backends: Backends, runner: str, name: str) -> str:
    """The id of the latest started run of ``runner`` (class path or bare class name) and ``name``.

    Raises:
        UnknownRun: no run of that runner and name is known.
        PackmuleError: a bare class name matches classes of several modules.
    """
    paths = runs.runner_paths(backends, runner, name)
    if len(paths) > 1:
        raise PackmuleError(f"{runner!r} names several runner classes with runs named {name!r}: "
                            f"{', '.join(paths)}; give the class path")
    run = runs.latest_run(backends, paths[0], name) if paths else None
    if run is None:
        raise UnknownRun(f"no run of {runner} named {name!r} is known")
    return run


def detail(backends: Backends, run: str, *, aggregates: bool = False) -> RunDetail:
    """Run ``run`` as shown, after checking a running run for loss.

    Raises:
        UnknownRun: no run of that id is known (never started, or its record expired).
    """
    record, counts = runs.observe(backends, run)
    if record is None:
        raise UnknownRun(f"unknown run {run!r} (never started, or its record expired)")
    failure = None
    if record.state in ("failed", "lost"):
        failure = {"job": record.job if record.state == "failed" else None,
                   "method": record.method, "traceback": record.traceback}
    return RunDetail(summarize(record, counts), record.value if record.state == "done" else None,
                     failure, leftovers.failures(backends, run), list(record.lost_jobs),
                     read_tree(backends, run) if aggregates else None)


def progress(backends: Backends, run: str | None) -> RunSummary | None:
    """The summary of ``run`` after a loss check (O(1) round trips); None if unknown."""
    record, counts = runs.observe(backends, run) if run else (None, None)
    return None if record is None else summarize(record, counts)


def kick(backends: Backends, run: str) -> list[int]:
    """Kick ``run``'s buried jobs back to ready; the numbers of those that were still buried."""
    _known(backends, run)
    return [buried.job for buried in leftovers.kick_buried(backends, run)]


def cancel(backends: Backends, run: str) -> bool:
    """Cancel ``run`` if it is running, and remove its parked aggregates; False if it had ended."""
    _known(backends, run)
    return runs.cancel(backends, run)


@dataclass(frozen=True)
class Purged:
    """What :func:`purge` removed: jobs from beanstalkd, keys sent for deletion to memcached."""

    run: str
    state: str
    parked: int
    buried: int
    keys: int

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` form of ``purge`` (see docs/monitoring.md)."""
        return asdict(self)


def purge(backends: Backends, run: str) -> Purged:
    """Remove what an ended run left: its parked and buried jobs, then its memcached keys.

    A failed run keeps its buried jobs so a kick can resume it; purge it
    once you give up on it. Its record in etcd stays (with its final
    counts) until it expires. Left in memcached: the records of replayed
    job numbers (one per enqueue call inside a job), which expire on their
    own after ``state_ttl_seconds``, and its cancelled flag, set first: a job of
    it parked again meanwhile (an aggregate settling a failure) deletes itself.

    Raises:
        UnknownRun: no such run. PackmuleError: it is still running (cancel it first).
    """
    record = _known(backends, run)
    if record.state == "running":
        raise PackmuleError(f"run {run} is still running: cancel it first")
    keys = RunKeys(backends.settings.namespace, run)
    backends.store.set(keys.cancelled, b"1")  # first: a job parked again from now drops itself
    parked, buried = leftovers.remove_all(backends, run)
    named = _state_keys(backends, run)
    backends.store.delete_many(named)
    return Purged(run, record.state, parked, buried, len(named))


def _state_keys(backends: Backends, run: str) -> list[str]:
    """The memcached keys of ``run`` that can be named: O(jobs), read once per purge."""
    keys = RunKeys(backends.settings.namespace, run)
    store = backends.store
    last = int(store.get(keys.sequence) or 0)
    numbers = aggregate_numbers(backends, run)
    descriptions = store.get_many([keys.aggregate(n) for n in numbers])
    named = [keys.sequence, keys.buried, keys.batch("root"),
             keys.batch_done("root"),
             *(getattr(keys, counter) for counter in COUNTERS),
             *(keys.sentinel(index) for index in range(len(store.names))),
             *leftovers.parked_keys(keys, last),
             *(keys.aggregates(chunk) for chunk in range(last // NOTE_CHUNK + 1)),
             *(keys.job(n) for n in range(last + 1))]
    for number in numbers:
        named.append(keys.aggregate(number))
        raw = descriptions.get(keys.aggregate(number))
        record = {} if raw is None else loads(raw)
        named.extend(keys.aggregate_part(number, part) for part in range(record.get("parts", 0)))
        for batch in {*record.get("batches", []), record.get("own", "")} - {""}:
            named.extend((keys.batch(batch), keys.batch_done(batch)))
    return named


def tubes(backends: Backends) -> list[TubeStats]:
    """Every tube of every beanstalkd server, with its jobs by state.

    Parked aggregates count as ``delayed``: each waits there until it fires.

    Raises:
        QueueUnavailable: naming a server that cannot be reached.
    """
    queue = backends.queue
    found = []
    for index, server in enumerate(queue.names):
        for tube in queue.tubes(index):
            stats = queue.tube_stats(index, tube)
            jobs = {state: stats.get(f"current-jobs-{state}", 0)
                    for state in ("ready", "reserved", "delayed", "buried")}
            found.append(TubeStats(server, tube, **jobs, watching=stats.get("current-watching", 0)))
    return found


def workers(backends: Backends) -> list[WorkerInfo]:
    """The live workers (the registry: one etcd range read), by host then pid."""
    return list_workers(backends)


def worker_json(info: WorkerInfo) -> dict[str, Any]:
    """The ``--json`` form of a worker (see docs/monitoring.md)."""
    return asdict(info)


def _known(backends: Backends, run: str) -> RunRecord:
    record = runs.read_run(backends, run)
    if record is None:
        raise UnknownRun(f"unknown run {run!r} (never started, or its record expired)")
    return record


def format_duration(seconds: float) -> str:
    """``0.4 s``, ``42 s``, ``3 min 2 s``, ``5 h 3 min``, ``2 d 4 h``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    for unit, size, smaller, small_size in (("d", 86400, "h", 3600), ("h", 3600, "min", 60),
                                            ("min", 60, "s", 1)):
        if whole >= size:
            return f"{whole // size} {unit} {whole % size // small_size} {smaller}"
    return f"{whole} s"


def format_time(epoch: float | None) -> str:
    """Local time ``2024-05-01 12:00:03``; "" for None."""
    return "" if epoch is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))
