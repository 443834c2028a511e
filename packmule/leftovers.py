"""What a run leaves in beanstalkd: its parked aggregate jobs, listed so they can be removed.

A worker-side aggregate waits as a job delayed for 2**31 seconds until it
fires. A run that ends without firing it (cancelled, lost) would leave it
there for decades: beanstalkd cannot list one run's jobs, so each parked
job is noted in memcached (``p:<chunk>``, by aggregate number) as it is
parked, and removed when the run is cancelled or lost. A failed run keeps
them on purpose: kicking its buried job after a fix fires them.
"""

from __future__ import annotations

from packmule.backends import Backends
from packmule.store import RunKeys

CHUNK = 10_000  # aggregates per note key: ~12 bytes each, far below memcached's 1 MB


def note_parked(backends: Backends, run: str, number: int, parked: tuple[int, int]) -> None:
    """Note that aggregate ``number`` is parked as job ``parked = (server index, job id)``."""
    key = RunKeys(backends.settings.namespace, run).parked(number // CHUNK)
    backends.store.append_creating(key, b"%d:%d " % parked)


def parked_jobs(backends: Backends, run: str) -> set[tuple[int, int]]:
    """Every ``(server index, job id)`` noted for ``run`` (some may have fired and gone)."""
    keys = RunKeys(backends.settings.namespace, run)
    last = backends.store.get(keys.sequence)
    chunks = range(int(last or 0) // CHUNK + 1)
    found = backends.store.get_many([keys.parked(chunk) for chunk in chunks])
    return {(int(server), int(job)) for notes in found.values()
            for server, job in (note.split(b":") for note in notes.split())}


def remove_parked(backends: Backends, run: str) -> int:
    """Delete ``run``'s parked jobs from beanstalkd; how many were still there."""
    queue = backends.queue
    return sum(queue.delete(server, job) for server, job in sorted(parked_jobs(backends, run)))
