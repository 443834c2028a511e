"""Keeping a reserved job alive in beanstalkd (``touch``) while it runs.

beanstalkd hands a reserved job out again once its time-to-run passes
without a ``touch``; a worker touches the job it is still working on, so a
long job is never run twice by mistake. While a job holds the GIL in C code
(a long regex), no thread of its process runs: only a job run in a process
of its own (a runner with ``time_limit``, see packmule.limits) is touched then.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import greenstalk

from packmule.errors import JobCancelled, PackmuleError

log = logging.getLogger("packmule.worker")
_NOTHING_HELD: deque[greenstalk.Job[bytes]] = deque(maxlen=0)  # (never added to)


class Done(Protocol):
    """A finished job whose delete waits (packmule.reserving's Finished)."""

    @property
    def job_id(self) -> int: ...


class Ran(Protocol):
    """A job of a batch that ran, its value not recorded yet (packmule.worker's Unrecorded)."""

    @property
    def job(self) -> greenstalk.Job[bytes]: ...


@dataclass(slots=True)
class _Watched:
    client: greenstalk.Client[bytes]
    job: greenstalk.Job[bytes]
    interval: float
    cancelled: Callable[[], bool]
    target: int
    due: float
    delete: Sequence[Done]  # finished jobs still to delete on this connection
    held: deque[greenstalk.Job[bytes]]  # jobs asked for with this one, not started yet
    unrecorded: Sequence[Ran]  # jobs run before it, recorded after it


class KeepAlive:
    """Touches the reserved job while it runs, on the connection that reserved it.

    One thread per worker, which wakes every ``TICK`` seconds and touches the
    job being watched once its interval has passed. Arming is a plain
    assignment and never wakes the thread: a thread started per job, and
    later a condition notified twice per job, each cost a large share of a
    worker's CPU. beanstalkd accepts `touch` only on the reserving
    connection, so touches happen under a lock and disarming waits for a
    touch in flight: the loop never shares the socket. If the job's run is
    cancelled, the job is interrupted with JobCancelled.

    The worker's last finished jobs may still wait for their deletes, which
    go with the next write on the connection (see packmule.reserving):
    given as ``delete``, they are deleted here at the first tick the job runs
    through, so a job that takes its time never leaves the ones before it
    reserved (a crash would hand them out again). ``deleted`` then says so.

    A job of a batch (quick jobs asked for together, see packmule.pace) may
    take its time too: at that first tick, the jobs of its batch not started
    yet (``held``) go back to the tube for other workers, and the jobs run
    before it, whose values are recorded with its own (``unrecorded``), are
    touched with it.
    """

    TICK = 0.1  # the shortest interval is 0.5 s (time_to_run >= 2 s, touched every third)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: _Watched | None = None
        self.deleted = False  # whether the ``delete`` was done while the last job ran
        self._thread = threading.Thread(target=self._run, daemon=True, name="packmule-keepalive")
        self._thread.start()

    def watching(self, client: greenstalk.Client[bytes], job: greenstalk.Job[bytes],
                 ttr_seconds: float, cancelled: Callable[[], bool], *,
                 delete: Sequence[Done] = (),
                 held: deque[greenstalk.Job[bytes]] | None = None,
                 unrecorded: Sequence[Ran] = ()) -> KeepAlive:
        """Keep ``job`` alive while the with-block this opens runs (see the class).

        ``ttr_seconds``: the shortest time-to-run of ``job`` and ``unrecorded``.
        The sequences are the worker's own, read only here (and not changed
        by the worker while the block runs): nothing is copied per job.
        A plain context manager, not @contextmanager's generator: one per job.
        """
        interval = max(0.5, ttr_seconds / 3)
        self.deleted = False
        self._watched = _Watched(client, job, interval, cancelled, threading.get_ident(),
                                 time.monotonic() + interval, delete,
                                 _NOTHING_HELD if held is None else held, unrecorded)
        return self

    def __enter__(self) -> None:
        return None

    def __exit__(self, *_exc: object) -> None:
        with self._lock:
            self._watched = None

    def exclusive(self) -> AbstractContextManager[Any]:
        """Hold off touches: for a command on the reserving connection while watching."""
        return self._lock

    def _run(self) -> None:
        while True:
            time.sleep(self.TICK)
            with self._lock:
                watched = self._watched
                if watched is not None and watched.delete:
                    self._delete(watched)
                if watched is not None and watched.held:
                    self._hand_back(watched)
                if watched is not None and time.monotonic() >= watched.due:
                    self._touch(watched)
                    watched.due = time.monotonic() + watched.interval

    def _delete(self, watched: _Watched) -> None:
        deleting, watched.delete = watched.delete, ()
        for done in deleting:
            job_id = done.job_id
            try:
                watched.client.delete(job_id)
            except greenstalk.NotFoundError:  # handed out again meanwhile, and done
                pass
            except (OSError, greenstalk.Error) as err:  # the worker's own delete tries again
                log.warning("deleting finished job %s failed: %r", job_id, err)
                return
        self.deleted = True

    def _hand_back(self, watched: _Watched) -> None:
        """Release the jobs of the batch not started yet, each at its own priority."""
        while watched.held:
            job = watched.held.popleft()
            try:
                priority = int(watched.client.stats_job(job)["pri"])
                watched.client.release(job, priority=priority)
            except greenstalk.NotFoundError:  # its time-to-run passed: it is ready already
                pass
            except (OSError, greenstalk.Error) as err:  # it goes back after its time-to-run
                log.warning("handing back job %s failed: %r", job.id, err)

    def _touch(self, watched: _Watched) -> None:
        try:
            for ran in watched.unrecorded:
                watched.client.touch(ran.job)
            watched.client.touch(watched.job)
            if watched.cancelled():
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(watched.target), ctypes.py_object(JobCancelled))
                self._watched = None
        except (OSError, greenstalk.Error, PackmuleError) as err:
            log.warning("keep-alive of job %s failed: %r", watched.job.id, err)


class Unwatched:
    """The keep-alive of a job's own process: none, its worker keeps the job alive."""

    deleted = False

    def watching(self, *_args: Any, **_kwargs: Any) -> AbstractContextManager[None]:
        return nullcontext()

    def exclusive(self) -> AbstractContextManager[None]:
        return nullcontext()
