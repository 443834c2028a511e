"""`Progress`: completed, failed and total jobs of a run, read in O(1)."""

from __future__ import annotations

from dataclasses import dataclass

from packmule.backends import Backends
from packmule.runs import latest_run, observe


@dataclass(frozen=True)
class Progress:
    """A run's progress. ``str()`` reads like ``53 / 101``.

    Attributes:
        completed: jobs finished with a value (aggregates included).
        total: jobs counted so far; grows while jobs enqueue more jobs. While
            a run's loop of ``enqueue`` runs, it may count up to 256 jobs
            ahead of those enqueued (numbers are taken in blocks), never
            behind; exact once the run waits or ends.
        failed: jobs that failed for good (buried).
        handled: jobs whose error ``handle_error`` turned into a value.
        lost: values memcached lost, passed on as ``packmule.MISSING``.
        state: ``unknown``, ``running``, ``done``, ``failed``, ``lost`` or
            ``cancelled``; ``lost`` too while running if the counters are gone.
    """

    completed: int = 0
    total: int = 0
    failed: int = 0
    handled: int = 0
    lost: int = 0
    state: str = "unknown"

    def __str__(self) -> str:
        text = f"{self.completed} / {self.total}"
        return f"{text} ({self.failed} failed)" if self.failed else text

    @property
    def finished(self) -> bool:
        """True once the run ended, however it ended."""
        return self.state not in ("unknown", "running")


def read_progress(backends: Backends, runner: str, name: str) -> Progress:
    """The latest started run's progress, in a constant number of round trips.

    Two etcd reads (the newest run id, then its record with any loss report)
    and, while the run is running, one read and one ``stats`` per memcached
    server (counters and loss check together): a run whose state memcached
    lost reads ``lost`` (and is recorded lost).
    """
    run = latest_run(backends, runner, name)
    return run_progress(backends, run) if run is not None else Progress()


def run_progress(backends: Backends, run: str) -> Progress:
    """The progress of run ``run`` (by its id), as :func:`read_progress` reads it.

    ``unknown`` if no such run is known (never started, or expired).
    """
    record, found = observe(backends, run)
    if record is None:
        return Progress()
    if found is None:
        return Progress(state="lost" if record.state == "running" else record.state)
    return Progress(found.get("completed", 0), found.get("total", 0), found.get("failed", 0),
                    found.get("handled", 0), found.get("lost", 0), record.state)
