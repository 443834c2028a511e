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
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import greenstalk

from packmule.errors import JobCancelled, PackmuleError

log = logging.getLogger("packmule.worker")


@dataclass
class _Watched:
    client: greenstalk.Client[bytes]
    job: greenstalk.Job[bytes]
    interval: float
    cancelled: Callable[[], bool]
    target: int
    due: float


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
    """

    TICK = 0.1  # the shortest interval is 0.5 s (time_to_run >= 2 s, touched every third)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: _Watched | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="packmule-keepalive")
        self._thread.start()

    def watching(self, client: greenstalk.Client[bytes], job: greenstalk.Job[bytes],
                 ttr_seconds: float, cancelled: Callable[[], bool]) -> KeepAlive:
        """Keep ``job`` alive while the with-block this opens runs.

        A plain context manager, not @contextmanager's generator: one per job.
        """
        interval = max(0.5, ttr_seconds / 3)
        self._watched = _Watched(client, job, interval, cancelled, threading.get_ident(),
                                 time.monotonic() + interval)
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
                if watched is not None and time.monotonic() >= watched.due:
                    self._touch(watched)
                    watched.due = time.monotonic() + watched.interval

    def _touch(self, watched: _Watched) -> None:
        try:
            watched.client.touch(watched.job)
            if watched.cancelled():
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(watched.target), ctypes.py_object(JobCancelled))
                self._watched = None
        except (OSError, greenstalk.Error, PackmuleError) as err:
            log.warning("keep-alive of job %s failed: %r", watched.job.id, err)


class Unwatched:
    """The keep-alive of a job's own process: none, its worker keeps the job alive."""

    def watching(self, *_args: Any) -> AbstractContextManager[None]:
        return nullcontext()

    def exclusive(self) -> AbstractContextManager[None]:
        return nullcontext()
