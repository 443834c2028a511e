"""A blocked caller's fast wake-up: a job of its own, kicked when its aggregate fires.

etcd's "fired" marker records a firing, and its watch wakes the caller;
but an etcd write waits for a disk sync (1-2 ms on an SSD), half of the
fan-in of a small run. So before a caller registers its aggregate it parks
a tiny job, delayed for decades, on a tube of its own, and the aggregate's
record names it as an aggregate's parked job: whoever fires the aggregate
kicks it (one idempotent beanstalkd command) before writing the marker,
and the ``reserve`` the caller left pending on that tube answers.

The wake-up only makes the caller faster. The marker is written as
before: if the wake-up job is lost (a beanstalkd restarted without its
binlog, a connection broken), the caller finds the marker at its next
health check. The caller takes the job and deletes it, so the tube is gone
once the wait is over; the job is noted as parked (see
:mod:`packmule.leftovers`), so a caller killed while waiting leaves
nothing a purge or a cancel misses.
"""

from __future__ import annotations

import logging
import select
import time
from contextlib import suppress

import greenstalk

from packmule import leftovers, sockets
from packmule.aggregate import RunScope
from packmule.errors import ServerError
from packmule.queue import PARK_SECONDS, naming

log = logging.getLogger(__name__)
_BODY = b"wake"  # (its length is in the RESERVED reply wait() looks for)
_TTR_SECONDS = 60  # the caller deletes the job as soon as it has it


def tube(run: str, number: int) -> str:
    """The tube of the wake-up job of aggregate ``number`` of ``run`` (unique: run ids are)."""
    return f"packmule.wake.{run}.{number}"


class WakeUp:
    """The wake-up of one caller's aggregate: its job, and a ``reserve`` left pending for it.

    One connection of its own: the job is put on it (so no other connection
    is left using the wake-up tube, which would keep the tube listed), then
    it watches the tube and asks for the job. The caller's own thread waits
    on the connection between its checks (:meth:`wait`): no thread of ours
    stands between the kick and the caller.
    """

    def __init__(self, scope: RunScope) -> None:
        self._scope = scope
        self._parked = (-1, 0)
        self._tube = ""
        self._sock: sockets.TimedSocket | None = None
        self._replies = b""  # what beanstalkd answered so far (a few short lines)
        self._broken = False  # the connection failed: wait() only sleeps
        self._poller = select.poll()
        self.woken = False

    def park(self, number: int, _batch: str = "") -> tuple[int, int]:
        """Park the wake-up job of aggregate ``number`` and ask for it: ``(server index, job id)``.

        ``(-1, 0)`` if its server cannot take it (unreachable, refusing): the
        caller is then woken by the marker alone, as the wake-up only makes
        it faster.
        """
        backends = self._scope.backends
        index = backends.queue.server_for(number)
        name, wake_tube = backends.queue.names[index], tube(self._scope.run, number)
        try:
            with naming(name, "connect"):
                sock = sockets.connect(backends.settings.beanstalkd[index],
                                       backends.settings.socket_timeout_seconds)
        except ServerError as err:
            log.warning("no wake-up job for aggregate %s of run %s: %s", number, self._scope.run,
                        err)
            return self._parked
        client = greenstalk.Client(sock, encoding=None)
        try:
            with naming(name, "put"):
                client.use(wake_tube)
                job_id = client.put(_BODY, priority=0, delay=PARK_SECONDS, ttr=_TTR_SECONDS)
        except ServerError as err:
            sock.close()
            log.warning("no wake-up job for aggregate %s of run %s: %s", number, self._scope.run,
                        err)
            return self._parked
        self._sock, self._parked, self._tube = sock, (index, job_id), wake_tube
        self._poller.register(sock, select.POLLIN)
        try:  # replies read by wait(); greenstalk's reader has nothing left buffered
            self._send(b"watch %b\r\nignore default\r\nreserve\r\n" % wake_tube.encode())
        except OSError:
            self._broken = True  # the marker's checks wake the caller; stop() deletes the job
        leftovers.note_parked(backends, self._scope.run, number, self._parked)
        return self._parked

    def wait(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for the job; whether it came (its delete is sent then)."""
        deadline = time.monotonic() + seconds
        while not self.woken and self._read(deadline):
            if self._answered(b"RESERVED %d 4" % self._parked[1]):
                self.woken = True
                with suppress(OSError):  # (if the connection broke, the job goes back)
                    self._send(b"delete %d\r\n" % self._parked[1])
        if not self.woken:  # no connection, or a broken one: a pause all the same
            time.sleep(max(0.0, deadline - time.monotonic()))
        return self.woken

    def stop(self) -> None:
        """End the wait and close, leaving no job. Unless the job came, kick it and take it;
        a job gone (its run was cancelled) or a server gone: the pending reserve dies
        with the connection."""
        if self._sock is None:
            return
        try:
            if not self.woken and not self._broken and self._kicked_or_taken():
                self.wait(1.0)
            deadline = time.monotonic() + 1.0
            while self.woken and not self._answered(b"DELETED", b"NOT_FOUND") and \
                    self._read(deadline):
                pass  # its delete's reply: then the tube is gone
        finally:
            self._sock.close()
            if not self._answered(b"DELETED", b"NOT_FOUND"):  # (connection broken, server slow)
                self._delete_elsewhere()

    @property
    def parked(self) -> bool:
        """Whether the job is parked and asked for (else only the marker wakes the caller)."""
        return self._sock is not None and not self._broken

    def _answered(self, *replies: bytes) -> bool:
        return any(reply + b"\r\n" in self._replies for reply in replies)

    def _read(self, deadline: float) -> bool:
        """Add what beanstalkd answers before ``deadline`` to the replies; False if nothing
        (a connection that failed, or never was, answers nothing)."""
        left = deadline - time.monotonic()
        if self._sock is None or self._broken or left <= 0 or not self._poller.poll(left * 1000):
            return False
        try:
            data = self._sock.recv(4096)
        except OSError:
            data = b""
        self._broken = not data  # the server went: the marker's checks wake the caller
        self._replies += data
        return bool(data)

    def _send(self, data: bytes) -> None:
        assert self._sock is not None
        self._sock.sendall(data)

    def _delete_elsewhere(self) -> None:
        """Delete the job on the pool's connection, if it is still there, and ours.

        Its id is checked to be on our tube: a server restarted without its
        binlog numbers its jobs from 1 again. A job still reserved by our
        closed connection goes back to ready as beanstalkd sees it close.
        """
        queue, (index, job_id) = self._scope.backends.queue, self._parked
        deadline = time.monotonic() + 1.0
        with suppress(ServerError):
            while (stats := queue.job_stats(index, job_id)) is not None \
                    and stats.get("tube") == self._tube:
                if stats.get("state") != "reserved":
                    queue.delete(index, job_id)
                    return
                if time.monotonic() > deadline:
                    return
                time.sleep(0.005)

    def _kicked_or_taken(self) -> bool:
        """Kick the job; whether the pending reserve has it now or takes it at once."""
        queue, (index, job_id) = self._scope.backends.queue, self._parked
        try:
            return queue.kick_job(index, job_id) or queue.job_state(index, job_id) in (
                "ready", "reserved")
        except ServerError:
            return False
