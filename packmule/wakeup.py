"""A blocked caller's fast wake-up: a job of its own, kicked when its aggregate fires.

etcd's "fired" marker records a firing, and its watch wakes the caller;
but an etcd write waits for a disk sync (1-2 ms on an SSD), half of the
fan-in of a small run. So before a caller registers its aggregate it parks
a tiny job, delayed for decades, on a tube of its own, and the aggregate's
record names it as an aggregate's parked job: whoever fires the aggregate
kicks it (one idempotent beanstalkd command) before writing the marker,
and a thread of the caller, blocked in ``reserve`` on that tube, wakes it.

The wake-up only makes the caller faster. The marker is written and
watched as before: if the wake-up job is lost (a beanstalkd restarted
without its binlog, a connection broken), the watch still wakes the
caller. The thread takes the job and deletes it, so the tube is gone once
the wait is over; the job is noted as parked (see :mod:`packmule.leftovers`),
so a caller killed while waiting leaves nothing a purge or a cancel misses.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from contextlib import suppress

import greenstalk

from packmule import leftovers, sockets
from packmule.aggregate import RunScope
from packmule.errors import ServerError
from packmule.queue import PARK_SECONDS, naming

log = logging.getLogger(__name__)
_BODY = b"wake"
_TTR_SECONDS = 60  # the thread deletes the job as soon as it has it


def tube(run: str, number: int) -> str:
    """The tube of the wake-up job of aggregate ``number`` of ``run`` (unique: run ids are)."""
    return f"packmule.wake.{run}.{number}"


class WakeUp:
    """The wake-up of one caller's aggregate: its job parked, then a thread waiting for it.

    One connection of its own: the job is put on it (so no other connection
    is left using the wake-up tube, which would keep the tube listed), then
    it waits in ``reserve`` with no socket timeout, as long as the run takes.
    """

    def __init__(self, scope: RunScope) -> None:
        self._scope = scope
        self._parked = (-1, 0)
        self._tube = ""
        self._sock: sockets.TimedSocket | None = None
        self._client: greenstalk.Client[bytes] | None = None
        self._on_wake: Callable[[], None] = lambda: None
        self._thread = threading.Thread(target=self._wait, name="packmule-wake-up", daemon=True)

    def park(self, number: int, _batch: str = "") -> tuple[int, int]:
        """Park the wake-up job of aggregate ``number``: ``(server index, job id)``.

        Raises:
            QueueUnavailable: the server is unreachable (naming it).
            ServerRefused: the server refused the job.
        """
        scope = self._scope
        index = scope.backends.queue.server_for(number)
        settings = scope.backends.settings
        name = scope.backends.queue.names[index]
        with naming(name, "connect"):
            self._sock = sockets.connect(settings.beanstalkd[index],
                                         settings.socket_timeout_seconds)
        self._client = greenstalk.Client(self._sock, encoding=None)
        with naming(name, "put"):
            self._client.use(tube(scope.run, number))
            job_id = self._client.put(_BODY, priority=0, delay=PARK_SECONDS, ttr=_TTR_SECONDS)
        self._parked = index, job_id
        leftovers.note_parked(scope.backends, scope.run, number, self._parked)
        return self._parked

    def start(self, number: int, on_wake: Callable[[], None]) -> bool:
        """Wait in a thread for the job parked for ``number``; False if none is parked."""
        if self._sock is None:
            return False
        self._tube, self._on_wake = tube(self._scope.run, number), on_wake
        self._sock.set_kernel_timeout(0)  # 0: none, so the reserve waits as long as the run
        self._thread.start()
        return True

    def _wait(self) -> None:
        assert self._client is not None
        try:
            self._client.watch(self._tube)
            self._client.ignore("default")
            job = self._client.reserve()
        except Exception as err:  # stopped, or the server went: the marker's checks wake
            log.debug("wake-up on %s ended: %r", self._tube, err)
            return
        self._on_wake()
        with suppress(Exception):
            self._client.delete(job)

    def stop(self) -> None:
        """End the wait and close. Unless the thread has the job already, kick it, so the
        thread takes and deletes it; a job gone (its run was cancelled) or a server gone
        leaves the thread blocked, and closing its socket ends it."""
        if self._client is None or self._sock is None:
            return
        if self._thread.ident is None:  # never waited (the registration failed after the park)
            with suppress(Exception):
                self._client.delete(self._parked[1])
        elif self._thread.is_alive() and self._kicked_or_taken():
            self._thread.join(timeout=1.0)
        with suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._client.close()
        if self._thread.is_alive():
            self._thread.join(timeout=1.0)

    def _kicked_or_taken(self) -> bool:
        """Kick the job; whether the thread has it now or takes it at once."""
        queue, (index, job_id) = self._scope.backends.queue, self._parked
        try:
            return queue.kick_job(index, job_id) or queue.job_state(index, job_id) in (
                "ready", "reserved")
        except ServerError:
            return False
