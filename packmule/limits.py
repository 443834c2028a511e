"""Hard time limits: a job of a runner with ``time_limit`` runs in a process of its own.

The worker forks a process per such job (from its fork server, see
:mod:`packmule.forks`), keeps the job alive in beanstalkd meanwhile
(``touch``, from its keep-alive thread: the job's process may hold its GIL
in C code for as long as it likes, the worker's is free), and kills the
process at the limit: the job then fails with :class:`TimeLimitExceeded`
like a job that raised (retries apply, then ``handle_error``, then burial).
A job process that dies fails its job with :class:`JobProcessDied`.

The job's process does everything the worker would do with the job
(decode, run, record its value, fail it, retry it) on its own connections,
but beanstalkd accepts ``release``, ``bury`` and ``delete`` of a reserved
job only on the connection that reserved it: the worker's. So the job's
process asks the worker for each of these (:class:`ParentClient`) and waits
for the answer, and their order is the same as in the worker.

The trade-off: a fork per job (about a millisecond, and its connections made
anew: a few more), and nothing a job leaves in memory reaches the next job:
each starts from the worker as it was when it started.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import greenstalk

from packmule import forks
from packmule.errors import (
    JobProcessDied,
    PackmuleError,
    ServerUnavailable,
    TimeLimitExceeded,
)

# How often the worker looks up from waiting on a job's process: a cancelled
# run's interruption (raised in the worker's thread) lands between two looks.
_LOOK_SECONDS = 0.25

# What a job's process runs: the worker's own handling, given the stand-in
# connection, the pool index of the server and the job; (outcome, attempt).
Handle = Callable[[Any, int, greenstalk.Job[bytes]], tuple[str, int | None]]


@dataclass(frozen=True)
class Ended:
    """How a job ended in its own process: the outcome the worker reports."""

    outcome: str
    attempt: int | None


class ParentClient:
    """Stands in, in a job's process, for the worker's reserving connection.

    Each call asks the worker to make it and waits for the answer. A job
    that is gone (``NOT_FOUND``) raises greenstalk's NotFoundError, as the
    connection would.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def _call(self, op: str, **args: Any) -> dict[str, Any]:
        forks.send(self._sock, {"op": op, **args})
        frame = forks.receive(self._sock, None)
        if frame is None:
            raise ConnectionError("the worker closed the job process's socket")
        if frame[0].get("error") == "not_found":
            raise greenstalk.NotFoundError(f"job not found ({op})")
        return frame[0]

    def delete(self, _job: Any) -> None:
        self._call("delete")

    def release(self, _job: Any, *, priority: int = greenstalk.DEFAULT_PRIORITY,
                delay: int = 0) -> None:
        self._call("release", priority=priority, delay=delay)

    def bury(self, _job: Any, *, priority: int = greenstalk.DEFAULT_PRIORITY) -> None:
        self._call("bury", priority=priority)

    def kick_job(self, _job: Any) -> None:
        self._call("kick_job")

    def stats_job(self, _job: Any) -> dict[str, Any]:
        stats: dict[str, Any] = self._call("stats_job")["stats"]
        return stats


def child_main(handle: Handle) -> forks.ChildMain:
    """The body of a job's process: read the job, handle it, say how it ended."""
    def main(sock: socket.socket) -> None:
        frame = forks.receive(sock, None)
        if frame is None:
            return  # the worker gave up on the job before sending it
        message, body = frame
        try:
            outcome, attempt = handle(ParentClient(sock), message["index"],
                                      greenstalk.Job(message["job"], body))
        except ServerUnavailable as err:  # the worker treats it as its own outage
            text = str(err).removeprefix(f"{err.address}: ")
            forks.send(sock, {"op": "outage", "address": err.address, "message": text})
            return
        forks.send(sock, {"op": "ended", "outcome": outcome, "attempt": attempt})
    return main


def run_limited(server: forks.ForkServer, client: greenstalk.Client[bytes],
                job: greenstalk.Job[bytes], *, index: int, limit: float, what: str,
                exclusive: Callable[[], AbstractContextManager[Any]]) -> Ended:
    """Run ``job`` in a process of its own, at most ``limit`` seconds; how it ended.

    Serves the process's requests on ``client`` (the reserving connection),
    each under ``exclusive()`` (the keep-alive touches the same connection
    meanwhile). The process is killed and reaped whatever happens, an
    exception in this thread (a cancelled run's interruption) included.

    Raises:
        TimeLimitExceeded: past ``limit``, naming ``what`` (the job) and the limit.
        JobProcessDied: the process died first (its exit code or signal named).
        ServerUnavailable: the process met an outage (the job goes back, as in the worker).
    """
    pid, sock = server.spawn()
    try:
        forks.send(sock, {"index": index, "job": job.id}, job.body)
        deadline = time.monotonic() + limit
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeLimitExceeded(f"{what} ran past its time limit of {limit:g} s "
                                        "(time_limit); its process was killed")
            try:
                frame = forks.receive(sock, min(remaining, _LOOK_SECONDS))
            except TimeoutError:
                continue
            if frame is None:
                status = forks.describe_exit(server.reap(pid, kill=False))
                pid = 0
                raise JobProcessDied(f"{what}: its process died ({status}) before the job ended")
            message = frame[0]
            if message["op"] == "ended":
                return Ended(message["outcome"], message["attempt"])
            if message["op"] == "outage":
                raise ServerUnavailable(message["address"], message["message"])
            with exclusive():
                reply = _apply(client, job, message)
            forks.send(sock, reply)
    finally:
        sock.close()
        if pid:
            server.reap(pid, kill=True, wait=False)


def _apply(client: greenstalk.Client[bytes], job: greenstalk.Job[bytes],
           message: dict[str, Any]) -> dict[str, Any]:
    """Make a job process's request on the reserving connection; the reply to send back."""
    op = message["op"]
    calls: dict[str, Callable[[], Any]] = {
        "delete": lambda: client.delete(job),
        "bury": lambda: client.bury(job, priority=int(message["priority"])),
        "release": lambda: client.release(job, priority=int(message["priority"]),
                                          delay=int(message["delay"])),
        "kick_job": lambda: client.kick_job(job), "stats_job": lambda: client.stats_job(job)}
    if op not in calls:
        raise PackmuleError(f"a job process asked for {op!r}, which is not a job command")
    try:
        result = calls[op]()
    except greenstalk.NotFoundError:
        return {"error": "not_found"}
    return {"stats": dict(result)} if op == "stats_job" else {}
