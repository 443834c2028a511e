"""The worker loop: reserve, decode, execute under a keep-alive, record, delete.

Signal handlers only set flags: the first SIGTERM/SIGINT lets the current
job finish, the second exits at once (beanstalkd hands that job out again
after its time-to-run). A job that cannot be decoded, or names a module
outside ``--import``, is buried with the reason logged and never executed.

No job can stop a worker: whatever a job raises (SystemExit and
KeyboardInterrupt included: the worker's own signals never raise), and
whatever fails while handling it (a value no server or JSON takes, an
error path that raises), the job is failed, buried and logged. Only an
outage (a server unreachable or silent) leaves a job to be handed out again.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from types import FrameType
from typing import Any

import greenstalk

from packmule import execution, leftovers, runs
from packmule.backends import backends
from packmule.config import Settings, format_address, settings
from packmule.envelope import Envelope, decode
from packmule.errors import (
    EncodeError,
    JobCancelled,
    PackmuleError,
    ServerError,
    ServerRefused,
    ServerUnavailable,
)
from packmule.queue import PARK_SECONDS, connect, delete_then_reserve, naming
from packmule.retry import backoff_seconds

log = logging.getLogger("packmule.worker")
# A job naming a runner this worker cannot load goes back this many times
# (for a worker that can) before it fails its run.
UNRUNNABLE_RESERVES = 3


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


class Worker:
    """Reserves jobs from the tubes of every beanstalkd server of the pool."""

    def __init__(self, *, imports: list[str], tubes: list[str], burst: bool = False,
                 config: Settings | None = None) -> None:
        self.settings = config or settings()
        self.allowed = frozenset(imports)
        self.tubes = tubes or [self.settings.tube]
        self._names = [format_address(a) for a in self.settings.beanstalkd]  # for errors
        self.burst = burst
        self.stopping = False
        self._clients: dict[int, greenstalk.Client[bytes]] = {}
        self._keepalive = KeepAlive()
        self._next = 0
        # (server index, job id) of the last finished job: its delete is sent
        # with the next reserve on that server (one write, one round trip).
        self._finished: tuple[int, int] | None = None
        self._index = 0  # pool index of the server the job in hand came from

    def run(self) -> None:
        """Work until asked to stop (or, with ``burst``, until the tubes are empty)."""
        for module in self.allowed:
            __import__(module)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        log.info("worker %d watching %s on %s", os.getpid(), self.tubes, self._names)
        failures = 0
        while not self.stopping:
            try:
                if not self.loop_once() and self.burst:
                    break
                failures = 0
            except ServerError as err:
                failures += 1
                self._close_clients()
                pause = backoff_seconds(failures, base=0.2, cap=5.0)
                log.warning("%s; retrying in %.1f s", err, pause)
                time.sleep(pause)
        with suppress(ServerError):
            self._delete_finished()

    def _close_clients(self) -> None:
        """Close the reserving connections (their reserved jobs go back to ready)."""
        self._finished = None  # handed out again: its next execution finds it recorded
        for client in self._clients.values():
            with suppress(OSError):
                client.close()
        self._clients.clear()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.stopping:
            os._exit(128 + signum)
        self.stopping = True

    def loop_once(self) -> bool:
        """Reserve and handle one job; False if none came within the timeout."""
        reserved = self._reserve()
        if reserved is None:
            return False
        index, job = reserved
        self._index = index
        with naming(self._names[index], "job handling"):
            if self._handle(self._clients[index], job):
                self._finished = (index, job.id)
        return True

    def _client(self, index: int) -> greenstalk.Client[bytes]:
        if index not in self._clients:
            client = connect(self.settings.beanstalkd[index], self.settings.socket_timeout_seconds
                             + 2)
            for tube in self.tubes:
                client.watch(tube)
            if "default" not in self.tubes:
                client.ignore("default")
            self._clients[index] = client
        return self._clients[index]

    def _reserve(self) -> tuple[int, greenstalk.Job[bytes]] | None:
        servers = len(self.settings.beanstalkd)
        for attempt in range(servers):
            index = (self._next + attempt) % servers
            timeout = 1 if attempt == servers - 1 else 0
            with naming(self._names[index], "reserve"):
                job = self._reserve_on(index, timeout)
            if job is not None:
                self._next = index + 1
                return index, job
        return None

    def _reserve_on(self, index: int, timeout: int) -> greenstalk.Job[bytes] | None:
        """Reserve from server ``index``, sending the last finished job's delete along."""
        client = self._client(index)
        if self._finished is not None and self._finished[0] == index:
            job_id, self._finished = self._finished[1], None
            return delete_then_reserve(client, job_id, timeout)
        self._delete_finished()
        try:
            return client.reserve(timeout=timeout)
        except (greenstalk.TimedOutError, greenstalk.DeadlineSoonError):
            return None

    def _delete_finished(self) -> None:
        """Delete the last finished job on its own (stopping, or next reserve elsewhere)."""
        if self._finished is None:
            return
        (index, job_id), self._finished = self._finished, None
        with naming(self._names[index], "delete"), \
                suppress(greenstalk.NotFoundError):
            self._clients[index].delete(job_id)

    def _handle(self, client: greenstalk.Client[bytes], job: greenstalk.Job[bytes]) -> bool:
        """Handle one job; True if it finished and is left for the loop to delete.

        Only an outage leaves by an exception: the loop then reconnects and
        the job is handed out again.
        """
        try:
            envelope = decode(job.body)
        except Exception as err:  # a foreign or corrupt job: bury it, go on
            # Not only DecodeError: json raises RecursionError on deep nesting.
            log.error("burying job %s: %s: %s", job.id, type(err).__name__, err)
            client.bury(job)
            return False
        try:
            runner = execution.prepare(envelope, self.allowed)
        except ServerUnavailable:
            raise
        except BaseException as err:  # a runner this worker cannot run: another may
            self._unrunnable(client, job, envelope, err)
            return False
        try:
            return self._execute(client, job, runner, envelope)
        except ServerUnavailable:
            raise
        except JobCancelled:  # the keep-alive's interruption can land just after the job ran
            client.delete(job)
        except BaseException as err:  # e.g. a value no server takes, an error path that raised
            # One job's trouble must not stop the worker (every worker would meet
            # the job in turn): fail it, so a waiting caller hears of it, and bury it.
            self._bury_failed(client, job, runner, envelope, execution.user_traceback(err))
        return False

    def _unrunnable(self, client: greenstalk.Client[bytes], job: greenstalk.Job[bytes],
                    envelope: Envelope, err: BaseException) -> None:
        """A job whose runner this worker cannot load: hand it back a few times, then fail it.

        Workers with other ``--import`` lists may share the tube (a rolling
        deploy), so the job first goes back for another worker. Once it has
        come back ``UNRUNNABLE_RESERVES`` times, its run is told why and the
        job is buried (a kick after starting the right workers resumes it).
        A job naming no run that exists (forged or stale) is only buried.
        """
        reason = f"{type(err).__name__}: {err}"
        reserves = int(client.stats_job(job)["reserves"])
        if reserves < UNRUNNABLE_RESERVES:
            log.warning("job %s %s() of %s: this worker cannot run it (%s); handing it back "
                        "(%d/%d)", envelope.job, envelope.method, envelope.runner, reason,
                        reserves, UNRUNNABLE_RESERVES)
            client.release(job, delay=1)
            return
        recorded = execution.fail_unrunnable(envelope, reason)
        log.error("burying job %s %s() of %s%s: %s", envelope.job, envelope.method,
                  envelope.runner, "" if recorded else " (no such run)", reason)
        client.bury(job)
        if recorded:
            self._note_buried(job, envelope)

    def _execute(self, client: greenstalk.Client[bytes], job: greenstalk.Job[bytes],
                 runner: Any, envelope: Any) -> bool:
        if execution.cancelled(runner):
            client.delete(job)
            return False
        ttr = runner.time_to_run or self.settings.ttr_seconds
        try:
            # The keep-alive thread must use its own connections: backends() there.
            with self._keepalive.watching(
                    client, job, ttr, lambda: runs.job_cancelled(backends(), envelope.run, envelope.lease)):
                result = execution.execute(runner, envelope)
        except JobCancelled:
            client.delete(job)
            return False
        except ServerUnavailable:
            raise
        except BaseException as err:  # anything the job raised is the job's failure
            self._on_job_error(client, job, runner, envelope, err)
            return False
        if isinstance(result, execution.Verdict):
            client.release(job, delay=PARK_SECONDS)
            if result.recheck and execution.recorded(runner, envelope):
                # NOT_FOUND: the straggler's own kick came first; the job is ready already.
                with suppress(greenstalk.NotFoundError):
                    client.kick_job(job)
            return False
        try:
            execution.record(runner, envelope, result)
        except (EncodeError, ServerRefused) as err:  # the same value again would fail again
            self._bury_failed(client, job, runner, envelope, "its return value cannot be "
                              f"recorded: {type(err).__name__}: {err}")
            return False
        return True

    def _on_job_error(self, client: greenstalk.Client[bytes], job: greenstalk.Job[bytes],
                      runner: Any, envelope: Any, err: BaseException) -> None:
        """Retry the job later; else let ``handle_error`` supply its value; else bury it.

        A server's refusal is not retried: the same request would be refused again.
        """
        attempts = int(client.stats_job(job)["reserves"])
        limit = self.settings.max_retries if runner.max_retries is None else runner.max_retries
        if attempts <= limit and not isinstance(err, ServerRefused):
            pause = backoff_seconds(attempts, base=self.settings.retry_base_seconds,
                                    cap=self.settings.retry_max_seconds)
            log.warning("job %s %s() of run %s raised %r; retry %d/%d in %.1f s", envelope.job,
                        envelope.method, envelope.run, err, attempts, limit, pause)
            client.release(job, delay=math.ceil(pause))
            return
        if execution.handle(runner, envelope, err):
            client.delete(job)
            return
        self._bury_failed(client, job, runner, envelope, execution.user_traceback(err))

    def _bury_failed(self, client: greenstalk.Client[bytes], job: greenstalk.Job[bytes],
                     runner: Any, envelope: Any, text: str) -> None:
        """Record the job as failed with ``text`` (its traceback), log it at ERROR, bury it.

        Buried, not deleted: once the cause is fixed, a kick runs it again and
        its run resumes. If even the failure cannot be recorded (memcached
        full), the job is buried all the same; an outage leaves it to be
        handed out again.
        """
        log.error("job %s %s() of run %s failed for good, burying:\n%s", envelope.job,
                  envelope.method, envelope.run, text)
        try:
            execution.fail(runner, envelope, text)
        except ServerUnavailable:
            raise
        except BaseException as second:
            log.error("job %s %s(): recording its failure failed too: %s: %s", envelope.job,
                      envelope.method, type(second).__name__, second)
        client.bury(job)
        self._note_buried(job, envelope)

    def _note_buried(self, job: greenstalk.Job[bytes], envelope: Envelope) -> None:
        """Note the buried job under its run, for ``kick --run`` and ``purge`` (best effort)."""
        try:
            leftovers.note_buried(backends(), envelope.run, (self._index, job.id), envelope.job,
                                  envelope.method)
        except ServerRefused as err:  # e.g. the run's notes outgrew memcached's item size
            log.warning("job %s: not noted as buried: %s", envelope.job, err)
