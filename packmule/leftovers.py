"""What a run leaves in beanstalkd: parked aggregates and buried jobs, listed per run.

beanstalkd cannot list one run's jobs, so packmule notes them in memcached
as they are made:

- a worker-side aggregate waits as a job delayed for 2**31 seconds until it
  fires (``p:<chunk>``, by aggregate number). A run that ends without firing
  it (cancelled, lost) would leave it there for decades: it is removed when
  the run is cancelled or lost;
- a job that failed for good is buried (``x``: one JSON line each, with its
  job number, method and when). A failed run keeps both on purpose: kicking
  its buried jobs after a fix resumes it (``packmule kick --run``);
  ``packmule purge --run`` removes what an ended run left.

Notes are best effort (written without waiting): a note lost with
memcached's state only means a job an operator must remove by tube.

The buried notes are also the run's index of failures (:func:`failures`):
each names its job, whose outcome record holds the traceback, and its
beanstalkd id, which says whether it is still buried.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from packmule.backends import Backends
from packmule.envelope import dumps, loads
from packmule.outcome import Outcome
from packmule.store import RunKeys

CHUNK = 10_000  # aggregates per note key: ~12 bytes each, far below memcached's 1 MB


@dataclass(frozen=True)
class Buried:
    """A job of a run that failed for good and waits in beanstalkd's buried state."""

    server: int  # pool index of its beanstalkd server
    job_id: int  # beanstalkd's id there
    job: int  # packmule's job number in the run
    method: str
    at: float  # when it was buried (epoch seconds)


@dataclass(frozen=True)
class FailedJob:
    """An entry of a run's index of failures: a job that failed for good, and where it stands.

    Attributes:
        job: packmule's job number in the run.
        method: the job's method.
        at: when it was buried (epoch seconds; the last time, if it failed again after a kick).
        traceback: the text of its failure; "" once it succeeded, or if memcached lost its record.
        state: ``buried`` (waits for a kick), ``kicked`` (back in the queue: ready, reserved
            or delayed for a retry), ``done`` (it succeeded after a kick) or ``removed``
            (gone from beanstalkd without a value: purged, or deleted by hand).
    """

    job: int
    method: str
    at: float
    traceback: str
    state: str


def note_parked(backends: Backends, run: str, number: int, parked: tuple[int, int]) -> None:
    """Note that aggregate ``number`` is parked as job ``parked = (server index, job id)``."""
    key = RunKeys(backends.settings.namespace, run).parked(number // CHUNK)
    backends.store.append_creating(key, b"%d:%d " % parked)


def note_parked_unless_dropped(backends: Backends, run: str, number: int,
                               parked: tuple[int, int]) -> bool:
    """Note a parked job; False if the run was cancelled or purged (then delete the job).

    A cancel or a purge sets the run's flag, then deletes the jobs noted as
    parked. The note is applied before the flag is read here, so either
    that deletion finds this job, or this read finds the flag.
    """
    note_parked(backends, run, number, parked)
    keys, store = RunKeys(backends.settings.namespace, run), backends.store
    note = keys.parked(number // CHUNK)
    if store.server_of(note) != store.server_of(keys.cancelled):
        store.get(note)  # (its server answers after applying the note sent before)
    return not dropped(backends, run)


def dropped(backends: Backends, run: str) -> bool:
    """Whether ``run`` was cancelled or purged: its flag, read now (runs.is_cancelled caches).

    A job parked again after the run's parked jobs were deleted reads it, to
    delete itself: whoever sets the flag deletes the parked jobs only after.
    """
    return backends.store.get(RunKeys(backends.settings.namespace, run).cancelled) is not None


def note_buried(backends: Backends, run: str, where: tuple[int, int], job: int,
                method: str) -> None:
    """Note that job ``job`` of ``run`` is buried at ``where = (server index, job id)``."""
    line = dumps({"srv": where[0], "bid": where[1], "job": job, "m": method, "at": time.time()})
    backends.store.append_creating(RunKeys(backends.settings.namespace, run).buried, line + b"\n")


def parked_keys(keys: RunKeys, last: int) -> list[str]:
    """The keys of a run's parked notes, for job numbers up to ``last`` (its sequence)."""
    return [keys.parked(chunk) for chunk in range(last // CHUNK + 1)]


def parked_jobs(backends: Backends, run: str) -> set[tuple[int, int]]:
    """Every ``(server index, job id)`` noted for ``run`` (some may have fired and gone)."""
    keys = RunKeys(backends.settings.namespace, run)
    last = int(backends.store.get(keys.sequence) or 0)
    found = backends.store.get_many(parked_keys(keys, last))
    return {(int(server), int(job)) for notes in found.values()
            for server, job in (note.split(b":") for note in notes.split())}


def buried_jobs(backends: Backends, run: str) -> list[Buried]:
    """The jobs of ``run`` noted as buried, oldest first, one per job (some may be kicked since)."""
    raw = backends.store.get(RunKeys(backends.settings.namespace, run).buried) or b""
    latest: dict[int, Buried] = {}
    for line in raw.splitlines():
        note = loads(line)
        latest[note["job"]] = Buried(note["srv"], note["bid"], note["job"], note["m"], note["at"])
    return sorted(latest.values(), key=lambda buried: buried.at)


def failures(backends: Backends, run: str, *, limit: int = 100) -> list[FailedJob]:
    """The run's jobs that failed for good, oldest first (the latest ``limit``), without a tube scan.

    Two memcached reads (the notes, then the jobs' outcome records, which
    hold the tracebacks) and one beanstalkd ``stats-job`` per job not done.
    """
    buried = buried_jobs(backends, run)[-limit:] if limit > 0 else []
    keys = RunKeys(backends.settings.namespace, run)
    records = backends.store.get_many([keys.job(b.job) for b in buried])
    return [_failed_job(backends, b, records.get(keys.job(b.job))) for b in buried]


def _failed_job(backends: Backends, buried: Buried, record: bytes | None) -> FailedJob:
    """Where one noted job stands: its outcome record first, else its state in beanstalkd."""
    outcome = None if record is None else Outcome.decode(record)
    if outcome is not None and outcome.ok:
        return FailedJob(buried.job, buried.method, buried.at, "", "done")
    state = backends.queue.job_state(buried.server, buried.job_id)
    return FailedJob(buried.job, buried.method, buried.at,
                     "" if outcome is None else outcome.traceback,
                     "removed" if state is None else "buried" if state == "buried" else "kicked")


def kick_buried(backends: Backends, run: str) -> list[Buried]:
    """Kick ``run``'s buried jobs back to ready; those that were still buried."""
    queue = backends.queue
    return [buried for buried in buried_jobs(backends, run)
            if queue.kick_job(buried.server, buried.job_id)]


def remove_parked(backends: Backends, run: str) -> int:
    """Delete ``run``'s parked jobs from beanstalkd; how many were still there."""
    queue = backends.queue
    return sum(queue.delete(server, job) for server, job in sorted(parked_jobs(backends, run)))


def remove_all(backends: Backends, run: str) -> tuple[int, int]:
    """Delete ``run``'s parked and buried jobs: ``(parked removed, buried removed)``."""
    queue = backends.queue
    buried = sum(queue.delete(b.server, b.job_id) for b in buried_jobs(backends, run))
    return remove_parked(backends, run), buried
