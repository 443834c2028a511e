"""The worker loop: reserve, decode, execute under a keep-alive, record, delete.

Signal handlers only set flags: the first SIGTERM/SIGINT lets the current
job finish, the second exits at once (beanstalkd hands that job out again
after its time-to-run). A job that cannot be decoded, or names a module
outside ``--import``, is buried with the reason logged and never executed;
so is, on a worker with a secret, a job whose signature is missing or wrong
(see :mod:`packmule.signing`).

No job can stop a worker: whatever a job raises (SystemExit and
KeyboardInterrupt included: the worker's own signals never raise), and
whatever fails while handling it (a value no server or JSON takes, an
error path that raises), the job is failed, buried and logged. Only an
outage (a server unreachable or silent) leaves a job to be handed out again.

Each job is logged at INFO once handled, one line with its run, job,
method, duration, outcome and attempt (structured: see packmule.logs), and
counted in the worker's metrics when they are served (packmule.metrics). A
runner with a ``time_limit`` has its jobs run in processes of their own
(packmule.limits).

Jobs are reserved, and deleted once done, through packmule.reserving, which
spares the round trips (a delete rides with the next reserve; the next job
is asked for while the last one's value is recorded). Quick jobs are asked
for a few at a time (packmule.pace): the values of such a batch are
recorded in one write once its last job has run, then its jobs deleted in
the next.

beanstalkd's release and bury set a job's priority anew: each passes the one
the job was put with (``puts.job_priority``), so a retried, parked or
buried-then-kicked job keeps its level and its place among runs.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass
from types import FrameType
from typing import Any

import greenstalk

from packmule import execution, leftovers, limits, runs, signing
from packmule.backends import backends
from packmule.config import Settings, settings
from packmule.envelope import Envelope, decode
from packmule.errors import (
    ForkServerGone,
    JobCancelled,
    JobStopped,
    ServerError,
    ServerRefused,
    ServerUnavailable,
)
from packmule.forks import ForkServer
from packmule.keepalive import KeepAlive, Unwatched
from packmule.metrics import WorkerMetrics
from packmule.pace import Pace
from packmule.queue import PARK_SECONDS, naming
from packmule.registry import Heartbeat
from packmule.reserving import Finished, Reservations
from packmule.retry import backoff_seconds
from packmule.signing import SignatureError

log = logging.getLogger("packmule.worker")
# A job naming a runner this worker cannot load goes back this many times
# (for a worker that can) before it fails its run.
UNRUNNABLE_RESERVES = 3

# How a job's handling ended, as the log line and the metrics name it.
DONE, HANDLED, RETRIED, FAILED = "done", "handled", "retried", "failed"
CANCELLED, PARKED, UNRUNNABLE, CORRUPT = "cancelled", "parked", "unrunnable", "corrupt"
REFUSED = "refused"  # its signature is missing or wrong: buried, never run
RAN = "ran"  # its value waits to be recorded with the rest of its batch's


@dataclass(slots=True)
class Unrecorded:
    """A job of a batch that ran; its value is recorded with the batch's last one's."""

    index: int  # its server's
    job: greenstalk.Job[bytes]
    runner: Any
    envelope: Envelope
    result: Any
    seconds: float  # how long it took to run


class Worker:
    """Reserves jobs from the tubes of every beanstalkd server of the pool.

    With ``metrics_address`` (host, port), serves its Prometheus metrics there.
    """

    def __init__(self, *, imports: list[str], tubes: list[str], burst: bool = False,
                 config: Settings | None = None,
                 metrics_address: tuple[str, int] | None = None) -> None:
        self.settings = config or settings()
        self.allowed = frozenset(imports)
        self.tubes = tubes or [self.settings.tube]
        self.burst = burst
        self.stopping = False
        self._pool = Reservations(self.settings, self.tubes, self._report_finished)
        self._handling = [naming(name, "job handling") for name in self._pool.names]
        self._keepalive: KeepAlive | Unwatched = KeepAlive()
        self.signer = signing.from_settings(self.settings)
        self._index = 0  # pool index of the server the job in hand came from
        self._attempt: int | None = None  # the job in hand's, once known
        self._started = 0.0  # when the job in hand was handed out (perf_counter)
        self._pace = Pace(self.settings.batch_jobs)
        self._unrecorded: list[Unrecorded] = []  # the batch's jobs run, values not recorded
        self._unrecorded_ttr = math.inf  # their shortest time-to-run
        # For the registry's heartbeat thread, which reads them: plain assignments per job.
        self._in_hand: tuple[Envelope, float] | None = None  # the job and when it started
        self.done = 0
        self.failed = 0
        self._metrics_address = metrics_address
        self.metrics = WorkerMetrics() if metrics_address else None
        self._forks: ForkServer | None = None  # for jobs under a time limit, once running
        self._in_child = False  # True in a job's own process
        self.exit_code = 0  # 1: stopped because it cannot go on (its fork server died)

    def run(self) -> None:
        """Work until asked to stop (or, with ``burst``, until the tubes are empty)."""
        for module in self.allowed:
            __import__(module)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        # Forked first: before this process opens a connection or starts a thread.
        self._forks = ForkServer(limits.child_main(self._handle_in_child))
        self._forks.start()
        if self.metrics is not None and self._metrics_address is not None:
            self.metrics.serve(self._metrics_address[1], self._metrics_address[0])
        log.info("worker %d watching %s on %s", os.getpid(), self.tubes, self._pool.names)
        if self.signer is None:
            log.warning("jobs are not signed (no secret): this worker runs any job put on %s",
                        self.tubes)
        elif self.settings.accept_unsigned:
            log.warning("accept_unsigned: this worker also runs jobs without a signature")
        heartbeat = Heartbeat(self.settings, tubes=self.tubes, imports=sorted(self.allowed),
                              snapshot=self._snapshot)
        heartbeat.start()
        try:
            self._loop()
        finally:
            heartbeat.stop()
            self._forks.stop()
            why = "its fork server died" if self.exit_code else \
                "asked to" if self.stopping else "tubes empty"
            log.info("worker %d stopped (%s): %d jobs done, %d failed", os.getpid(), why,
                     self.done, self.failed)

    def _snapshot(self) -> tuple[dict[str, Any] | None, int, int]:
        """The job in hand, jobs done and failed: what the registry's record shows."""
        in_hand = self._in_hand
        job = None if in_hand is None else {
            "run": in_hand[0].run, "job": in_hand[0].job, "method": in_hand[0].method,
            "since": in_hand[1]}
        return job, self.done, self.failed

    def _loop(self) -> None:
        failures = 0
        while not self.stopping:
            try:
                if not self.loop_once() and self.burst:
                    break
                failures = 0
            except ServerError as err:
                failures += 1
                self._pool.close()  # the jobs it held, and those unrecorded, are handed out again
                self._unrecorded, self._unrecorded_ttr = [], math.inf
                pause = backoff_seconds(failures, base=0.2, cap=5.0)
                log.warning("%s; retrying in %.1f s", err, pause)
                time.sleep(pause)
        with suppress(ServerError):
            if self._unrecorded:  # stopped between a batch's jobs
                self._record_rest(prefetch=False)
            self._pool.delete_finished()
        if self._pool.holding:  # a job asked for, never started: back to the tube
            self._pool.close()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.stopping:
            os._exit(128 + signum)
        self.stopping = True

    def loop_once(self) -> bool:
        """Reserve and handle one job; False if none came within the timeout."""
        reserved = self._pool.reserve()
        if reserved is None:
            return False
        index, job = reserved
        self._index, self._attempt = index, None
        self._started = started = time.perf_counter()
        with self._handling[index]:
            try:
                outcome = self._handle(self._pool.client(index), job)
            finally:
                in_hand, self._in_hand = self._in_hand, None
            seconds = time.perf_counter() - started
            if in_hand is not None:
                self._pace.ran((in_hand[0].runner, in_hand[0].method), seconds)
            if in_hand is not None and outcome != RAN:  # else logged already (a corrupt job)
                self._settle(index, job, in_hand[0], outcome, seconds, self._attempt)
            if self._unrecorded and (self.stopping or not self._pool.holding):
                self._record_rest(prefetch=True)  # the batch's last job was not a value
        return True

    def _settle(self, index: int, job: greenstalk.Job[bytes], envelope: Envelope, outcome: str,
                seconds: float, attempt: int | None = None) -> None:
        """A job handled: DONE, its delete waits for the next write; else it is reported."""
        if outcome == DONE:
            self._pool.done(Finished(index, job.id, envelope, seconds))
        else:
            self._report(envelope, outcome, seconds, attempt)

    def _report(self, envelope: Envelope, outcome: str, seconds: float,
                attempt: int | None) -> None:
        """Count a handled job (registry, metrics) and log its line."""
        if outcome in (DONE, HANDLED):
            self.done += 1
        elif outcome == FAILED:
            self.failed += 1
        if self.metrics is not None:
            self.metrics.ended(envelope.runner, envelope.method, outcome, seconds)
        if log.isEnabledFor(logging.INFO):
            log.info("job %s %s() of run %s %s in %.3f s, attempt %s", envelope.job,
                     envelope.method, envelope.run, outcome, seconds, attempt or "?",
                     extra={"run": envelope.run, "job": envelope.job, "method": envelope.method,
                            "runner": envelope.runner, "duration": round(seconds, 6),
                            "outcome": outcome, "attempt": attempt})

    def _report_finished(self, finished: Finished, reserves: int) -> None:
        """Report a job done once its delete was sent; ``reserves`` 0 if unknown."""
        self._report(finished.envelope, DONE, finished.seconds, reserves or None)

    def _handle(self, client: greenstalk.Client[bytes], job: greenstalk.Job[bytes]) -> str:
        """Handle one job; how it ended (DONE: it is left for the loop to delete).

        Only an outage leaves by an exception: the loop then reconnects and
        the job is handed out again.
        """
        try:
            envelope = decode(self._checked(job.body))
        except SignatureError as err:
            self._refuse(client, job, err)
            return REFUSED
        except Exception as err:  # a foreign or corrupt job: bury it, go on
            # Not only DecodeError: json raises RecursionError on deep nesting.
            log.error("burying job %s: %s: %s", job.id, type(err).__name__, err)
            client.bury(job)
            return CORRUPT
        self._in_hand = (envelope, time.time())
        if self.metrics is not None:
            self.metrics.started(envelope)
        try:
            runner = execution.prepare(envelope, self.allowed, keep_alive=not self._in_child)
        except ServerUnavailable:
            raise
        except BaseException as err:  # a runner this worker cannot run: another may
            return self._unrunnable(client, job, envelope, err)
        try:
            if self._unrecorded and not self._pace.quick((envelope.runner, envelope.method)):
                # This one may take a while: their values wait for nothing, and no more
                # jobs are asked for to wait behind it.
                self._record_rest(prefetch=False)
            if runner.time_limit and self._forks is not None:
                return self._execute_limited(client, job, runner, envelope)
            return self._execute(client, job, runner, envelope)
        except ServerUnavailable:
            raise
        except JobCancelled:  # the keep-alive's interruption can land just after the job ran
            client.delete(job)
            return CANCELLED
        except BaseException as err:  # e.g. a value no server takes, an error path that raised
            # One job's trouble must not stop the worker (every worker would meet
            # the job in turn): fail it, so a waiting caller hears of it, and bury it.
            self._bury_failed(client, job, runner, envelope, execution.user_traceback(err))
            return FAILED

    def _handle_in_child(self, client: Any, index: int,
                         job: greenstalk.Job[bytes]) -> tuple[str, int | None]:
        """Handle a job in its own process (packmule.limits); its outcome and attempt.

        ``client`` stands in for the worker's reserving connection. This
        process is a fork of the worker's fork server: its keep-alive,
        metrics and job processes are the worker's, not its own.
        """
        self._forks, self._keepalive, self.metrics = None, Unwatched(), None
        self._in_child = True
        self._index, self._attempt = index, None
        return self._handle(client, job), self._attempt

    def _checked(self, body: bytes) -> bytes:
        """The envelope's JSON of ``body``, its signature checked if this worker has a secret.

        Raises:
            SignatureError: the signature is missing (unless ``accept_unsigned``) or wrong.
        """
        if self.signer is None:
            return signing.unsigned(body)
        try:
            return self.signer.verify(body)
        except SignatureError as err:
            if err.reason == "missing" and self.settings.accept_unsigned:
                return body
            raise

    def _refuse(self, client: greenstalk.Client[bytes], job: greenstalk.Job[bytes],
                err: SignatureError) -> None:
        """Bury a job refused for its signature, log it at ERROR and count it; never run it.

        Its run fails only if the job is signed as the run's starter signs (see
        :func:`packmule.execution.refuse`): then the run's own jobs are refused alike.
        """
        log.error("burying job %s: refused: %s", job.id, err)
        try:
            run = execution.refuse(job.body, err)
        except ServerUnavailable:
            raise
        except Exception as second:  # the job is buried all the same
            log.error("job %s: counting its refusal failed: %s: %s", job.id,
                      type(second).__name__, second)
            run = None
        if run is not None:
            log.error("job %s is signed as its run %s was started: the run fails", job.id, run)
        client.bury(job)

    def _unrunnable(self, client: greenstalk.Client[bytes], job: greenstalk.Job[bytes],
                    envelope: Envelope, err: BaseException) -> str:
        """A job whose runner this worker cannot load: hand it back a few times, then fail it.

        Workers with other ``--import`` lists may share the tube (a rolling
        deploy), so the job first goes back for another worker. Once it has
        come back ``UNRUNNABLE_RESERVES`` times, its run is told why and the
        job is buried (a kick after starting the right workers resumes it).
        A job naming no run that exists (forged or stale) is only buried.
        """
        reason = f"{type(err).__name__}: {err}"
        stats = client.stats_job(job)
        reserves, priority = int(stats["reserves"]), int(stats["pri"])
        self._attempt = reserves
        if reserves < UNRUNNABLE_RESERVES:
            log.warning("job %s %s() of %s: this worker cannot run it (%s); handing it back "
                        "(%d/%d)", envelope.job, envelope.method, envelope.runner, reason,
                        reserves, UNRUNNABLE_RESERVES)
            client.release(job, priority=priority, delay=1)
            return UNRUNNABLE
        recorded = execution.fail_unrunnable(envelope, reason)
        log.error("burying job %s %s() of %s%s: %s", envelope.job, envelope.method,
                  envelope.runner, "" if recorded else " (no such run)", reason)
        client.bury(job, priority=priority)
        if recorded:
            self._note_buried(job, envelope)
        return FAILED

    def _execute(self, client: greenstalk.Client[bytes], job: greenstalk.Job[bytes],
                 runner: Any, envelope: Any) -> str:
        if execution.cancelled(runner):
            client.delete(job)
            return CANCELLED
        finished = self._pool.pending_delete(self._index)
        try:
            with self._watching(client, job, runner, envelope, finished):
                result = execution.execute(runner, envelope)
        except JobCancelled:
            client.delete(job)
            return CANCELLED
        except ServerUnavailable:
            raise
        except BaseException as err:  # anything the job raised is the job's failure
            return self._on_job_error(client, job, runner, envelope, err)
        finally:
            self._note_deleted(finished)
        if isinstance(result, execution.Verdict):
            client.release(job, priority=runner._job_priority(envelope.job), delay=PARK_SECONDS)
            if leftovers.dropped(backends(), envelope.run):  # parked again after a purge
                with suppress(greenstalk.NotFoundError):  # (the purge deleted it meanwhile)
                    client.delete(job)
                return CANCELLED
            if execution.ready(runner, envelope):
                # NOT_FOUND: the straggler's own kick came first; the job is ready already.
                with suppress(greenstalk.NotFoundError):
                    client.kick_job(job)
            return PARKED
        self._unrecorded.append(Unrecorded(self._index, job, runner, envelope, result,
                                           time.perf_counter() - self._started))
        if self._pool.holding and not self.stopping:
            self._unrecorded_ttr = min(self._unrecorded_ttr,
                                       runner.time_to_run or self.settings.ttr_seconds)
            return RAN  # recorded with the batch's next jobs
        return self._record_batch(client, prefetch=True)

    def _record_batch(self, client: greenstalk.Client[bytes], *, prefetch: bool) -> str:
        """Record the values of the jobs run since the last write, in one write.

        With ``prefetch``, the next jobs are asked for while memcached
        records them (see reserving). Each job but the last is settled here:
        done, or failed and buried if its value cannot be recorded; the last
        one's outcome (DONE or FAILED) is returned.
        """
        batch, self._unrecorded, self._unrecorded_ttr = self._unrecorded, [], math.inf
        prefetching = prefetch and not (self.stopping or self._in_child) and \
            self._pool.send_prefetch(client, self._pace.batch())
        try:
            errors = execution.record_all([(item.runner, item.envelope, item.result)
                                           for item in batch])
        finally:
            if prefetching:
                self._pool.read_prefetch(client)
        outcome = DONE
        for item, error in zip(batch, errors, strict=True):
            outcome = DONE if error is None else self._unrecordable(client, item, error)
            if item is not batch[-1]:
                self._settle(item.index, item.job, item.envelope, outcome, item.seconds)
        return outcome

    def _record_rest(self, *, prefetch: bool) -> None:
        """Record the batch's values run so far: its last job ended otherwise (failed,
        parked...), or the next one may take a while, or the worker stops."""
        last = self._unrecorded[-1]
        outcome = self._record_batch(self._pool.client(last.index), prefetch=prefetch)
        self._settle(last.index, last.job, last.envelope, outcome, last.seconds)

    def _unrecordable(self, client: greenstalk.Client[bytes], item: Unrecorded,
                      err: Exception) -> str:
        """Fail and bury a job whose value cannot be recorded: the same value would fail again."""
        self._bury_failed(client, item.job, item.runner, item.envelope, "its return value "
                          f"cannot be recorded: {type(err).__name__}: {err}")
        return FAILED

    def _watching(self, client: greenstalk.Client[bytes], job: greenstalk.Job[bytes], runner: Any,
                  envelope: Envelope, finished: list[Finished]) -> AbstractContextManager[Any]:
        """The keep-alive of the job in hand, and of its batch if it runs a while: deleting
        ``finished``, handing back the jobs not started, touching those unrecorded."""
        ttr = min(runner.time_to_run or self.settings.ttr_seconds, self._unrecorded_ttr)
        # The keep-alive thread must use its own connections: backends() there.
        return self._keepalive.watching(
            client, job, ttr, lambda: runs.job_cancelled(backends(), envelope.run, envelope.lease),
            delete=finished, held=self._pool.held, unrecorded=self._unrecorded)

    def _note_deleted(self, finished: list[Finished]) -> None:
        """Tell the pool if the keep-alive deleted ``finished`` while the job in hand ran."""
        if finished and self._keepalive.deleted:
            self._pool.deleted_meanwhile(finished)

    def _execute_limited(self, client: greenstalk.Client[bytes], job: greenstalk.Job[bytes],
                         runner: Any, envelope: Envelope) -> str:
        """Run the job in a process of its own, killed past ``runner.time_limit``.

        This thread serves that process's commands on the reserving connection
        while the keep-alive touches the job: the process may hold its own GIL
        in C code for as long as it likes. A job stopped at its limit, or whose
        process died, fails like a job that raised (retries apply).
        """
        assert self._forks is not None
        what = f"job {envelope.job} {envelope.method}() of run {envelope.run}"
        finished = self._pool.pending_delete(self._index)
        try:
            with self._watching(client, job, runner, envelope, finished):
                ended = limits.run_limited(self._forks, client, job, index=self._index,
                                           limit=runner.time_limit, what=what,
                                           exclusive=self._keepalive.exclusive)
        except JobStopped as err:
            return self._on_job_error(client, job, runner, envelope, err)
        except ForkServerGone as err:  # not the job's fault: another worker takes it
            log.error("%s: handing job %s back and stopping this worker", err, envelope.job)
            client.release(job, priority=runner._job_priority(envelope.job))
            self.stopping, self.exit_code = True, 1
            return UNRUNNABLE
        finally:
            self._note_deleted(finished)
        self._attempt = ended.attempt
        return ended.outcome

    def _on_job_error(self, client: greenstalk.Client[bytes], job: greenstalk.Job[bytes],
                      runner: Any, envelope: Any, err: BaseException) -> str:
        """Retry the job later; else let ``handle_error`` supply its value; else bury it.

        A server's refusal is not retried: the same request would be refused again.
        """
        attempts = self._attempt = int(client.stats_job(job)["reserves"])
        limit = self.settings.max_retries if runner.max_retries is None else runner.max_retries
        fields = {"run": envelope.run, "job": envelope.job, "method": envelope.method,
                  "runner": envelope.runner, "attempt": attempts}
        if attempts <= limit and not isinstance(err, ServerRefused):
            pause = backoff_seconds(attempts, base=self.settings.retry_base_seconds,
                                    cap=self.settings.retry_max_seconds)
            log.warning("job %s %s() of run %s raised %r; retry %d/%d in %.1f s", envelope.job,
                        envelope.method, envelope.run, err, attempts, limit, pause,
                        extra={**fields, "error": repr(err), "retry_in": round(pause, 3)})
            client.release(job, priority=runner._job_priority(envelope.job),
                           delay=math.ceil(pause))
            return RETRIED
        if execution.handle(runner, envelope, err):
            log.info("job %s %s() of run %s raised %r; handle_error supplied its value",
                     envelope.job, envelope.method, envelope.run, err,
                     extra={**fields, "error": repr(err)})
            client.delete(job)
            return HANDLED
        self._bury_failed(client, job, runner, envelope, execution.user_traceback(err))
        return FAILED

    def _bury_failed(self, client: greenstalk.Client[bytes], job: greenstalk.Job[bytes],
                     runner: Any, envelope: Any, text: str) -> None:
        """Record the job as failed with ``text`` (its traceback), log it at ERROR, bury it.

        Buried, not deleted: once the cause is fixed, a kick runs it again and
        its run resumes. If even the failure cannot be recorded (memcached
        full), the job is buried all the same; an outage leaves it to be
        handed out again.
        """
        log.error("job %s %s() of run %s failed for good, burying:\n%s", envelope.job,
                  envelope.method, envelope.run, text,
                  extra={"run": envelope.run, "job": envelope.job, "method": envelope.method,
                         "runner": envelope.runner, "attempt": self._attempt})
        try:
            execution.fail(runner, envelope, text)
        except ServerUnavailable:
            raise
        except BaseException as second:
            log.error("job %s %s(): recording its failure failed too: %s: %s", envelope.job,
                      envelope.method, type(second).__name__, second)
        client.bury(job, priority=runner._job_priority(envelope.job))
        self._note_buried(job, envelope)

    def _note_buried(self, job: greenstalk.Job[bytes], envelope: Envelope) -> None:
        """Note the buried job under its run, for ``kick --run`` and ``purge`` (best effort)."""
        try:
            leftovers.note_buried(backends(), envelope.run, (self._index, job.id), envelope.job,
                                  envelope.method)
        except ServerRefused as err:  # e.g. the run's notes outgrew memcached's item size
            log.warning("job %s: not noted as buried: %s", envelope.job, err)
