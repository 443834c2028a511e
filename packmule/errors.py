"""The whole exception tree of packmule.

Every error a user can meet derives from :class:`PackmuleError`, and no
third-party exception escapes the public API: client errors are wrapped here,
with the server address or the offending value in the message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from packmule.jobref import JobRef


class PackmuleError(Exception):
    """Base of every packmule error."""


class ConfigurationError(PackmuleError):
    """A setting has a value packmule cannot use; the message names both."""


class ServerStartError(PackmuleError):
    """A local server (tests, demo, benchmarks) could not be started."""


class EnqueueError(PackmuleError):
    """A job could not be enqueued; nothing was put on the queue."""


class UnknownMethod(EnqueueError):
    """The method named for a job is not a public method of the runner."""


class EncodeError(EnqueueError):
    """An argument or return value cannot be encoded as strict JSON."""


class JobTooBig(EnqueueError):
    """The encoded job is larger than the queue server accepts."""


class ServerError(PackmuleError):
    """A server could not be reached or refused a command.

    Attributes:
        address: ``host:port`` of the server concerned.
    """

    def __init__(self, address: str, message: str) -> None:
        super().__init__(f"{address}: {message}")
        self.address = address


class ServerUnavailable(ServerError):
    """A server is unreachable or silent: an outage, retried (a restart passes)."""


class ServerRefused(ServerError):
    """A server answered that a request is wrong (too large, bad data, full under ``-M``).

    Not an outage: the same request would be refused again, so it fails the
    call or the job at once, never retried.

    Attributes:
        address: ``host:port`` of the server concerned.
        reply: the server's own words.
    """

    def __init__(self, address: str, message: str, *, reply: str = "") -> None:
        super().__init__(address, message)
        self.reply = reply


class QueueUnavailable(ServerUnavailable):
    """beanstalkd is unreachable or silent."""


class StoreUnavailable(ServerUnavailable):
    """memcached is unreachable or silent."""


class CoordinatorUnavailable(ServerUnavailable):
    """etcd is unreachable or silent."""


class ResultError(PackmuleError):
    """A result cannot be given."""


class ResultPending(ResultError):
    """The run or job has not finished yet."""


class UnknownRun(ResultError):
    """No record of this run exists (never started, or its record expired)."""


class RunCancelled(ResultError):
    """The run was cancelled before it finished."""


class ResultMissing(ResultError):
    """State that a result depends on was lost from memcached.

    Attributes:
        jobs: the jobs whose values or counters were lost (possibly a sample).
    """

    def __init__(self, message: str, jobs: Sequence[JobRef] = ()) -> None:
        shown = ", ".join(repr(job) for job in list(jobs)[:10])
        more = f" and {len(jobs) - 10} more" if len(jobs) > 10 else ""
        super().__init__(f"{message}: {shown}{more}" if jobs else message)
        self.jobs = list(jobs)


class RunFailed(ResultError):
    """A job of the run failed for good (it was buried).

    The message reads ``job 4 snooze() of run <run id> failed: ValueError: boom``,
    then the traceback.

    Attributes:
        job: the job that failed first.
        traceback: the text of its traceback, from the user's first frame.
        method: the method of that job ("" if unknown).
        run: the id of the run.
    """

    def __init__(self, job: JobRef | None, traceback: str, *, method: str = "",
                 run: str = "") -> None:
        last = traceback.strip().splitlines()[-1] if traceback.strip() else "failed"
        run = run or (job.run if job is not None else "")
        who = "a job" if job is None else f"job {job.number}"
        called = f" {method}()" if method else ""
        of_run = f" of run {run}" if run else ""
        super().__init__(f"{who}{called}{of_run} failed: {last}\n{traceback}")
        self.job = job
        self.traceback = traceback
        self.method = method
        self.run = run


class DecodeError(PackmuleError):
    """A job in the tube is foreign or corrupt; the worker buries it."""


class JobCancelled(PackmuleError):
    """Raised inside a running job whose run was cancelled."""


class JobStopped(PackmuleError):
    """A job run in a process of its own (a runner with ``time_limit``) did not finish there.

    Failed like a job that raised: retried, then ``handle_error``, then buried.
    """


class TimeLimitExceeded(JobStopped):
    """A job ran past its runner's ``time_limit``; its process was killed. Names the limit."""


class JobProcessDied(JobStopped):
    """A job's own process died before the job ended (a signal, ``os._exit``, a crash)."""
