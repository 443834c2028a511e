"""A worker's side of the beanstalkd pool: reserving jobs, and deleting them once done.

The worker loop (packmule.worker) asks this for its next job and tells it
when one is done; this keeps what saves round trips out of the loop:

- A done job's delete is not sent on its own: it goes in one write with the
  next reserve on its server (one write, one round trip).
- On a one-server pool, the next job is asked for while the last one's value
  is recorded (:meth:`Reservations.send_prefetch`): beanstalkd answers while
  memcached does, so a job costs the worker one wait, not two. A job asked
  for that way comes without a reserve of its own, so the delete of the job
  before it still waits; the keep-alive sends it if the job runs a while
  (see packmule.keepalive), and the next write takes it along otherwise.
- The pool's servers are reserved from in turn. One that cannot be reached
  is left aside for a pause doubling up to 5 s while the worker goes on
  with the others; only when every server is down does the error reach the
  loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass

import greenstalk

from packmule.config import Settings, format_address
from packmule.envelope import Envelope
from packmule.errors import QueueUnavailable
from packmule.queue import (
    connect,
    delete_then_reserve,
    naming,
    read_delete_then_reserve,
    send_delete_then_reserve,
)
from packmule.retry import backoff_seconds

log = logging.getLogger("packmule.worker")

Job = greenstalk.Job[bytes]
Client = greenstalk.Client[bytes]


@dataclass
class Finished:
    """A job done: its delete, and its log line with its attempt, go with the next write."""

    index: int
    job_id: int
    envelope: Envelope
    seconds: float


class Reservations:
    """The reserving connections of one worker process, one per server of the pool.

    ``report`` is called once per done job, when its delete is sent, with its
    attempt (how often it was reserved; 0 if unknown). With INFO logging the
    attempt is read by a ``stats-job`` in the delete's write, for the job's
    log line; otherwise nothing more is asked.
    """

    def __init__(self, settings: Settings, tubes: list[str],
                 report: Callable[[Finished, int], None]) -> None:
        self.settings = settings
        self.tubes = tubes
        self.names = [format_address(a) for a in settings.beanstalkd]  # for errors
        # Per server, what turns its errors into QueueUnavailable naming it: made
        # once, as several are entered per job.
        self._reserving = [naming(name, "reserve") for name in self.names]
        self._report = report
        self._clients: dict[int, Client] = {}
        self._next = 0
        # Unreachable servers: index -> (failures in a row, when to try it again).
        self._down: dict[int, tuple[int, float]] = {}
        self.finished: Finished | None = None  # its delete waits for the next write
        # The next job, asked for while the last one was recorded (send_prefetch),
        # and what that write asked besides: the last job's delete, its attempt.
        self._prefetched: Job | None = None
        self._prefetch_deletes = False
        self._prefetch_report: Callable[[int], None] | None = None

    def client(self, index: int) -> Client:
        """The connection to server ``index``, opened (watching the tubes) if need be."""
        if index not in self._clients:
            client = connect(self.settings.beanstalkd[index], self.settings.socket_timeout_seconds
                             + 2)
            for tube in self.tubes:
                client.watch(tube)
            if "default" not in self.tubes:
                client.ignore("default")
            self._clients[index] = client
        return self._clients[index]

    def reserve(self) -> tuple[int, Job] | None:
        """The next job and its server's index; None if no server had one within ~1 s."""
        prefetched = self._prefetched
        if prefetched is not None:  # asked for while the last job was recorded
            self._prefetched = None
            return 0, prefetched
        servers = len(self.settings.beanstalkd)
        order = [(self._next + attempt) % servers for attempt in range(servers)] if servers > 1 \
            else [0]
        up = self._up(order) if self._down else order
        for position, index in enumerate(up):
            try:
                with self._reserving[index]:
                    job = self._reserve_on(index, 1 if position == len(up) - 1 else 0)
            except QueueUnavailable as err:  # the server named: a delete sent along may fail
                self._skip(self.names.index(err.address) if err.address in self.names
                           else index, err)
                continue
            self._down.pop(index, None)
            if job is not None:
                self._next = index + 1
                return index, job
        return None

    def done(self, finished: Finished) -> None:
        """``finished`` is done: its delete goes with the next write on its server.

        The job before it went with this one's reserve, unless this one was
        asked for early and no later write took that delete along.
        """
        self.delete_finished()
        self.finished = finished

    def delete_finished(self) -> None:
        """Delete the last finished job on its own (stopping, or the next reserve elsewhere)."""
        finished = self.finished
        if finished is None:
            return
        self.finished = None
        with naming(self.names[finished.index], "delete"):
            delete_then_reserve(self._clients[finished.index], finished.job_id, None,
                                reserves=self._reporter(finished))

    def pending_delete(self, index: int) -> Finished | None:
        """The last job done, if its delete still waits, on server ``index``'s connection."""
        finished = self.finished
        return finished if finished is not None and finished.index == index else None

    def deleted_meanwhile(self, finished: Finished) -> None:
        """``finished`` was deleted by the keep-alive while the job in hand ran."""
        if self.finished is finished:
            self.finished = None
            self._report(finished, 0)

    def send_prefetch(self, client: Client) -> bool:
        """Ask for the next job (with the last one's delete) while the job in hand is recorded.

        The next job is in hand when the recording returns
        (:meth:`read_prefetch`, which must read the replies before the
        connection serves anything else). Asked for only once the job's method
        returned, with a zero timeout, so a worker never holds a job it will
        not start at once; only on a one-server pool (a pool's servers are
        reserved from in turn). True if sent.
        """
        if self._prefetched is not None or len(self.settings.beanstalkd) != 1:
            return False
        finished, self.finished = self.finished, None
        self._prefetch_report = None if finished is None else self._reporter(finished)
        self._prefetch_deletes = finished is not None
        with self._reserving[0]:  # an outage, whatever the job in hand does
            send_delete_then_reserve(client, None if finished is None else finished.job_id, 0,
                                     stats=self._prefetch_report is not None)
        return True

    def read_prefetch(self, client: Client) -> None:
        """Read the replies of :meth:`send_prefetch`: the next job, if one was ready."""
        with self._reserving[0]:
            self._prefetched = read_delete_then_reserve(client, self._prefetch_deletes, True,
                                                        reserves=self._prefetch_report)

    @property
    def holding(self) -> bool:
        """Whether a job was asked for early and not handed out yet."""
        return self._prefetched is not None

    def close(self) -> None:
        """Close every connection: the jobs they hold reserved go back to ready.

        The last job done was recorded: if handed out again, its next
        execution finds its value and counts nothing twice.
        """
        if self.finished is not None:
            self._report(self.finished, 0)
            self.finished = None
        self._prefetched = None
        for client in self._clients.values():
            with suppress(OSError):
                client.close()
        self._clients.clear()

    def _reporter(self, finished: Finished) -> Callable[[int], None] | None:
        """What to call with a done job's attempt, read along with its delete.

        Only its log line shows the attempt: without INFO logging, report it
        now and ask beanstalkd for nothing more.
        """
        if log.isEnabledFor(logging.INFO):
            return lambda reserves: self._report(finished, reserves)
        self._report(finished, 0)
        return None

    def _up(self, order: list[int]) -> list[int]:
        """The servers of ``order`` not left aside, or all of them if every one is."""
        now = time.monotonic()
        return [index for index in order if self._down.get(index, (0, 0.0))[1] <= now] or order

    def _skip(self, index: int, err: QueueUnavailable) -> None:
        """Leave server ``index`` aside for a while; raise ``err`` if every server is aside."""
        failures = self._down.get(index, (0, 0.0))[0] + 1
        pause = backoff_seconds(failures, base=0.5, cap=5.0)
        self._down[index] = (failures, time.monotonic() + pause)
        client = self._clients.pop(index, None)
        if client is not None:
            with suppress(OSError):
                client.close()
        if self.finished is not None and self.finished.index == index:
            self.finished = None  # handed out again: its next execution finds it recorded
        self._prefetched = None  # (only ever on a one-server pool: its connection is gone)
        if len(self._down) == len(self.settings.beanstalkd):
            raise err
        log.warning("%s; working with the other servers, trying it again in %.1f s", err, pause)

    def _reserve_on(self, index: int, timeout: int) -> Job | None:
        """Reserve from server ``index``, sending the last finished job's delete along."""
        client = self.client(index)
        finished = self.finished
        if finished is not None and finished.index == index:
            self.finished = None
            return delete_then_reserve(client, finished.job_id, timeout,
                                       reserves=self._reporter(finished))
        self.delete_finished()
        try:
            return client.reserve(timeout=timeout)
        except (greenstalk.TimedOutError, greenstalk.DeadlineSoonError):
            return None
