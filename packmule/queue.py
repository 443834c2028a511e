"""beanstalkd, as a pool of servers, over greenstalk.

Every error names the server's address. Jobs are spread over the pool by
their packmule number; a JobRef records the server so the job (an aggregate
waiting in the delayed state, a buried job) can be found again.
"""

from __future__ import annotations

import io
import itertools
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

import greenstalk

from packmule import sockets
from packmule.config import Address, format_address
from packmule.errors import JobTooBig, QueueUnavailable, ServerRefused

# beanstalkd's largest delay is 2**32 - 1 seconds; an aggregate waits as a
# delayed job for about 68 years, and firing it is an idempotent kick-job.
PARK_SECONDS = 2**31
T = TypeVar("T")
_CLIENT_ERRORS = (OSError, greenstalk.Error, greenstalk.UnknownResponseError)
# beanstalkd's answers that a command is wrong, or that it cannot take it
# (out of memory: a put is stored buried): sending it again cannot help.
_REFUSALS = (greenstalk.BadFormatError, greenstalk.ExpectedCrlfError,
             greenstalk.UnknownCommandError, greenstalk.OutOfMemoryError, greenstalk.BuriedError)
# Pipelined puts go out in chunks of about this many bytes, or this many jobs:
# one write carries hundreds of small jobs, and the replies left unread while
# it is sent (about 16 bytes a job) stay far below any socket buffer, so
# beanstalkd never stops reading because we are not reading yet.
_CHUNK_BYTES = 64 * 1024
_CHUNK_JOBS = 500
# Puts sent without waiting whose replies are read in one go once this many
# are pending on a server (about 16 bytes each: far below any socket buffer).
_UNREAD_MAX = 256


@dataclass(slots=True)
class Sent:
    """A put sent without waiting for beanstalkd's reply (see :meth:`Queue.send_put`).

    Attributes:
        read: the reply was read, or will never be (the connection broke).
        job_id: beanstalkd's id, once a reply said the job is stored.
        error: what the reply said instead of ``INSERTED`` (a refusal), or the
            outage that left it unread: the job may or may not be stored.
    """

    body_size: int
    read: bool = False
    job_id: int | None = None
    error: Exception | None = None


class naming:
    """Turn socket and protocol errors into QueueUnavailable naming ``address``.

    beanstalkd's refusals (bad format, out of memory...) become ServerRefused.

    A class, not @contextmanager: a worker enters several per job, and a
    generator-based one costs several times more. It keeps no state between
    uses, so one instance can be entered again and again (a worker keeps one
    per server and action).
    """

    def __init__(self, address: str, action: str) -> None:
        self.address, self.action = address, action

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 _tb: object) -> None:
        if err is None or isinstance(err, greenstalk.JobTooBigError) \
                or not isinstance(err, _CLIENT_ERRORS):
            return
        if isinstance(err, _REFUSALS):
            raise ServerRefused(self.address, f"beanstalkd refused {self.action}: {err!r}",
                                reply=type(err).__name__) from err
        raise QueueUnavailable(self.address, f"beanstalkd {self.action} failed: {err!r}") from err


def _wire(client: greenstalk.Client[bytes]) -> tuple[socket.socket, io.BufferedReader]:
    """The socket and reply reader inside a greenstalk 2.1.1 client (``_sock``, ``_reader``).

    The one place packmule reaches into greenstalk: it has no pipelining, its
    ``put`` waits for each reply before the next job can go, and
    :meth:`Queue.put_many` sends a whole chunk of puts in one ``sendall``
    instead (and :func:`delete_then_reserve` a delete with the next reserve).
    The reader is greenstalk's own, so no reply byte is left in a buffer the
    client does not see.
    """
    return client._sock, client._reader


def delete_then_reserve(client: greenstalk.Client[bytes], job_ids: Sequence[int],
                        timeout: int | None, *,
                        attempts: Sequence[Callable[[int], None]] | None = None
                        ) -> greenstalk.Job[bytes] | None:
    """Delete finished jobs and reserve the next one in a single write.

    A worker would otherwise wait for ``DELETED`` before asking for its next
    job: one round trip per job saved, and beanstalkd often answers all in
    one packet. Returns None if no job came within ``timeout`` seconds (or,
    with ``timeout`` None, only deletes). A job already gone (``NOT_FOUND``)
    is fine: it was handed out again after its time-to-run and its other
    execution deleted it.

    With ``attempts`` (one per job), a ``stats-job`` goes before each delete
    in the same write, and each is called with how many times its job was
    reserved (its attempt; 0 if it was gone) as soon as that reply is in,
    before the wait for the next job: the worker's log line of the job,
    without a round trip of its own (greenstalk's ``stats_job`` costs about
    half a job).

    :func:`send_delete_then_reserve` and :func:`read_delete_then_reserve`
    are its two halves, for a worker that does something else in between
    and asks for several jobs.
    """
    send_delete_then_reserve(client, job_ids, timeout, stats=attempts is not None)
    jobs = read_delete_then_reserve(client, len(job_ids), 0 if timeout is None else 1,
                                    attempts=attempts)
    return jobs[0] if jobs else None


def send_delete_then_reserve(client: greenstalk.Client[bytes], job_ids: Sequence[int],
                             timeout: int | None, *, stats: bool = False, count: int = 1) -> None:
    """Write the deletes of ``job_ids`` (each after its ``stats-job`` with ``stats``) and
    ``count`` reserves; nothing else may use ``client`` until
    :func:`read_delete_then_reserve` has read the replies."""
    line = b"stats-job %d\r\ndelete %d\r\n" if stats else b"delete %d\r\n"
    deletes = b"".join([line % ((job_id, job_id) if stats else job_id) for job_id in job_ids])
    reserve = b"" if timeout is None else b"reserve-with-timeout %d\r\n" % timeout * count
    _wire(client)[0].sendall(deletes + reserve)


def read_delete_then_reserve(client: greenstalk.Client[bytes], deletes: int, reserves: int, *,
                             attempts: Sequence[Callable[[int], None]] | None = None
                             ) -> list[greenstalk.Job[bytes]]:
    """Read the replies of :func:`send_delete_then_reserve` (``deletes`` and ``reserves``
    commands; ``attempts``, one per delete, if stats were asked): the jobs reserved."""
    reader = _wire(client)[1]
    for position in range(deletes):
        count = _read_reserves(reader) if attempts else 0
        deleted = reader.readline()
        if deleted not in (b"DELETED\r\n", b"NOT_FOUND\r\n"):
            raise ConnectionError(f"unexpected reply to delete: {deleted!r}")
        if attempts:
            attempts[position](count)
    jobs = []
    for _ in range(reserves):
        job = _read_reserved(reader)
        if job is not None:
            jobs.append(job)
    return jobs


def _read_reserved(reader: io.BufferedReader) -> greenstalk.Job[bytes] | None:
    """The job a reserve's reply hands out, or None if it timed out."""
    reply = reader.readline()
    if reply.startswith(b"RESERVED "):
        _, job, size = reply.split()
        data = reader.read(int(size) + 2)
        if len(data) != int(size) + 2:
            raise ConnectionError("beanstalkd closed the connection mid-job")
        return greenstalk.Job(int(job), data[:-2])
    if reply in (b"TIMED_OUT\r\n", b"DEADLINE_SOON\r\n"):
        return None
    raise ConnectionError(f"unexpected reply to reserve: {reply!r}")


def _read_reserves(reader: io.BufferedReader) -> int:
    """The ``reserves`` count of a ``stats-job`` reply (a YAML dict); 0 for ``NOT_FOUND``."""
    head = reader.readline()
    if head == b"NOT_FOUND\r\n":
        return 0
    if not head.startswith(b"OK "):
        raise ConnectionError(f"unexpected reply to stats-job: {head!r}")
    size = int(head[3:]) + 2
    data = reader.read(size)
    if len(data) != size:
        raise ConnectionError("beanstalkd closed the connection mid-reply")
    start = data.find(b"\nreserves: ")
    return int(data[start + 11:data.index(b"\n", start + 1)]) if start >= 0 else 0


def _chunks(bodies: Iterable[bytes], priorities: Iterable[int],
            ) -> Iterator[tuple[list[bytes], list[int]]]:
    """``bodies`` and their priorities, in order, in chunks of about ``_CHUNK_BYTES`` or
    ``_CHUNK_JOBS``; each body is taken only when its chunk is next (built lazily, if lazy)."""
    chunk: list[bytes] = []
    chunk_priorities: list[int] = []
    size = 0
    for body, priority in zip(bodies, priorities, strict=False):  # priorities may repeat forever
        chunk.append(body)
        chunk_priorities.append(priority)
        size += len(body)
        if size >= _CHUNK_BYTES or len(chunk) >= _CHUNK_JOBS:
            yield chunk, chunk_priorities
            chunk, chunk_priorities, size = [], [], 0
    if chunk:
        yield chunk, chunk_priorities


def _put_commands(tail: bytes, bodies: Sequence[bytes], priorities: Sequence[int]) -> bytes:
    """The ``put`` commands of ``bodies`` (``tail``: `` <delay> <ttr> ``), for one write.

    One formatting of the whole chunk, its values interleaved by C iterators:
    no Python step per job.
    """
    values = tuple(itertools.chain.from_iterable(zip(priorities, map(len, bodies), bodies,
                                                     strict=True)))
    return (b"put %d" + tail + b"%d\r\n%b\r\n") * len(bodies) % values


def jobs_per_chunk(body_size: int) -> int:
    """How many puts of bodies of at most ``body_size`` bytes make a chunk (see put_chunks)."""
    return max(1, min(_CHUNK_JOBS, _CHUNK_BYTES // max(body_size, 1)))


def connect(address: Address, timeout_seconds: float, *,
            coalesce: bool = False) -> greenstalk.Client[bytes]:
    """A greenstalk client with a socket timeout, so a dead server cannot hang us.

    ``coalesce``, for a producer's connection: see :meth:`sockets.TimedSocket.set_kernel_timeout`.
    """
    with naming(format_address(address), "connect"):
        return greenstalk.Client(sockets.connect(address, timeout_seconds, coalesce=coalesce),
                                 encoding=None)


class Queue:
    """Producer side of the pool: put, kick, inspect. Not thread-safe."""

    def __init__(self, addresses: tuple[Address, ...], *, timeout_seconds: float) -> None:
        self.addresses = addresses
        self.names = [format_address(a) for a in addresses]
        self._timeout = timeout_seconds
        self._clients: dict[int, greenstalk.Client[bytes]] = {}
        self._using: dict[int, str] = {}
        self._max_size: dict[int, int] = {}
        self._unread: dict[int, list[Sent]] = {}  # puts sent without waiting, per server

    def server_for(self, number: int) -> int:
        """The pool index that job ``number`` goes to."""
        return number % len(self.addresses)

    def _client(self, index: int) -> greenstalk.Client[bytes]:
        if index not in self._clients:
            self._clients[index] = connect(self.addresses[index], self._timeout, coalesce=True)
            self._using[index] = "default"
        return self._clients[index]

    @contextmanager
    def _session(self, index: int, action: str) -> Iterator[greenstalk.Client[bytes]]:
        """A client for server ``index``; a broken one is dropped so the next use reconnects.

        Replies of puts sent without waiting are read first, so every reply
        answers its own command.
        """
        if self._unread.get(index):
            self._read_unread(index)
        try:
            with naming(self.names[index], action):
                yield self._client(index)
        except QueueUnavailable:
            self._drop(index)
            raise

    def _retrying(self, index: int, action: str, command: Callable[[greenstalk.Client[bytes]], T]) -> T:
        """Run a command that is safe to repeat, reconnecting once if the socket went stale.

        After a server restart the first command on an old connection fails
        even though the server is back. Never used for ``put``: a put whose
        reply was lost may have been stored, and a second one would double it.
        """
        try:
            with self._session(index, action) as client:
                return command(client)
        except QueueUnavailable:
            with self._session(index, action) as client:
                return command(client)

    def _found(self, index: int, action: str,
               command: Callable[[greenstalk.Client[bytes]], object]) -> bool:
        """Run a repeatable command on one job; False if beanstalkd has no such job."""
        def attempt(client: greenstalk.Client[bytes]) -> bool:
            try:
                command(client)
                return True
            except greenstalk.NotFoundError:
                return False

        return self._retrying(index, action, attempt)

    def _drop(self, index: int) -> None:
        for sent in self._unread.pop(index, []):  # replies that will never come
            sent.read = True
            sent.error = sent.error or QueueUnavailable(
                self.names[index], "beanstalkd's connection closed before it answered a put")
        client = self._clients.pop(index, None)
        self._using.pop(index, None)
        if client is not None:
            with suppress(OSError):
                client.close()

    def max_job_size(self, index: int) -> int:
        """The server's ``max-job-size`` (its ``-z``), asked once per server."""
        if index not in self._max_size:
            stats = self._retrying(index, "stats", lambda client: client.stats())
            self._max_size[index] = int(stats["max-job-size"])
        return self._max_size[index]

    def put(
        self, index: int, tube: str, body: bytes, *, priority: int, delay: float, ttr: float
    ) -> int:
        """Put ``body`` on server ``index``; returns beanstalkd's job id.

        Raises:
            JobTooBig: the server refused the size (Runner checks it first, naming the limit).
            ServerRefused: the server refused the job (out of memory, a bad command).
            QueueUnavailable: the server is unreachable or draining.
        """
        stored: list[int] = []
        self.put_many(index, tube, [body], priority=priority, delay=delay, ttr=ttr, stored=stored)
        return stored[0]

    def put_many(self, index: int, tube: str, bodies: Iterable[bytes], *,
                 priority: int | Iterable[int], delay: float, ttr: float,
                 stored: list[int]) -> None:
        """Put ``bodies`` on server ``index`` in order, pipelined: one write per chunk.

        ``priority`` is one for all, or one per body (see ``puts.job_priority``).
        Both may be lazy: a chunk's bodies are taken as it is sent, so a
        million jobs never need to be in memory at once. See :meth:`put_chunks`.
        """
        priorities = itertools.repeat(priority) if isinstance(priority, int) else priority
        self.put_chunks(index, tube, _chunks(bodies, priorities), delay=delay, ttr=ttr,
                        stored=stored)

    def put_chunks(self, index: int, tube: str,
                   chunks: Iterable[tuple[Sequence[bytes], Sequence[int]]], *, delay: float,
                   ttr: float, stored: list[int]) -> None:
        """Put each chunk's bodies, with their priorities, on server ``index`` in order.

        ``chunks`` may be lazy: each is taken as it is sent. One made by the
        caller costs no Python call per job (see ``jobs_per_chunk`` for its size).

        A put per round trip costs a send, a wait and a receive per job; here a
        chunk of up to hundreds of puts goes out in one ``sendall`` and its
        replies are read after, in order. The id of each job beanstalkd stored
        is appended to ``stored`` as its reply is read, so after an error
        ``len(stored)`` is how many were put: a job whose reply never came
        may or may not be stored, and is not counted. A put is never retried,
        for that reason: a second one could store the job twice.

        A refused job does not stop its chunk (beanstalkd goes on with the
        next command). Each chunk is written before the replies of the one
        before it are read, so the server is never idle waiting for the
        producer, nor the producer for the server; after a refusal the chunk
        already written is read too (its jobs counted in ``stored``), then
        the first refusal is raised and no later chunk is sent.

        Raises:
            JobTooBig: the server refused a job's size (Runner checks it first, naming the limit).
            ServerRefused: the server refused a job (out of memory, a bad command).
            QueueUnavailable: the server is unreachable, or draining.
        """
        tail = b" %d %d " % (int(delay), int(ttr))
        with self._session(index, "put") as client:
            if self._using.get(index) != tube:
                client.use(tube)
                self._using[index] = tube
            sock, reader = _wire(client)
            in_flight: Sequence[bytes] = ()  # the chunk written, its replies not read yet
            refusal: Exception | None = None
            try:
                for chunk, priorities in chunks:
                    sock.sendall(_put_commands(tail, chunk, priorities))
                    refusal = self._read_puts(index, reader, in_flight, stored)
                    in_flight = chunk
                    if refusal is not None:
                        break
                last = self._read_puts(index, reader, in_flight, stored)
                refusal = refusal or last
            except BaseException:
                self._drop(index)  # replies left unread would answer the next command
                raise
        if refusal is not None:
            raise refusal

    def _read_puts(self, index: int, reader: io.BufferedReader, chunk: Sequence[bytes],
                   stored: list[int]) -> Exception | None:
        """Read the replies of a chunk of puts, in order; the first refusal, if any.

        The replies are read with no Python call per job, and when all say
        ``INSERTED`` (the rule) their ids are taken in one go. Replies read
        before an error reading the next are still taken.
        """
        replies: list[bytes] = []
        try:  # extend keeps what it took before an error
            replies.extend(itertools.islice(iter(reader.readline, None), len(chunk)))
        except BaseException:
            self._take_replies(index, replies, chunk, stored)
            raise
        return self._take_replies(index, replies, chunk, stored)

    def _take_replies(self, index: int, replies: list[bytes], chunk: Sequence[bytes],
                      stored: list[int]) -> Exception | None:
        """Put replies (to the first bodies of ``chunk``) into ``stored``; the first refusal."""
        words = b"".join(replies).split()
        if len(words) == 2 * len(replies) and words[::2].count(b"INSERTED") == len(replies):
            stored.extend(map(int, words[1::2]))
            return None
        refusal: Exception | None = None
        for reply, body in zip(replies, chunk, strict=False):
            if reply[:9] == b"INSERTED ":
                stored.append(int(reply[9:]))
            else:  # called for every refusal: a BURIED one is counted in stored
                error = self._refusal(index, len(body), reply, stored)
                refusal = refusal or error
        return refusal

    def send_put(self, index: int, tube: str, body: bytes, *, priority: int, delay: float,
                 ttr: float) -> Sent:
        """Put ``body`` on server ``index`` without waiting for the reply; what it said, later.

        A loop of single puts would otherwise wait a round trip per job. The
        reply is read with the next command on that server, by
        :meth:`catch_up`, or here once hundreds are pending, and fills the
        returned :class:`Sent` (which never raises: its holder reads it).
        Not sent, and raises, only if the put cannot be written: then the
        server is unreachable (QueueUnavailable) and nothing is pending.
        """
        pending = self._unread.get(index)
        if pending is None or len(pending) >= _UNREAD_MAX or self._using.get(index) != tube:
            pending = self._ready_to_send(index, tube)
        try:  # not inside naming(): an object and two calls per put, for the rare error
            self._clients[index]._sock.sendall(b"put %d %d %d %d\r\n%b\r\n"
                                               % (priority, delay, ttr, len(body), body))
        except BaseException:  # a put half written, or a connection gone: start afresh
            self._drop(index)
            with naming(self.names[index], "put"):
                raise
        sent = Sent(len(body))
        pending.append(sent)
        return sent

    def _ready_to_send(self, index: int, tube: str) -> list[Sent]:
        """Connect to server ``index`` and use ``tube`` for :meth:`send_put`; its pending puts.

        Pending replies are read first when there are many, or when ``use``
        is to be sent (it reads one reply: theirs come before). A server
        connected has a list of pending puts (empty or not) for as long as
        its connection lasts.
        """
        pending = self._unread.get(index)
        if pending and (len(pending) >= _UNREAD_MAX or self._using.get(index) != tube):
            self._read_unread(index)
        try:
            with naming(self.names[index], "put"):
                client = self._client(index)
                if self._using.get(index) != tube:
                    client.use(tube)
                    self._using[index] = tube
        except BaseException:
            self._drop(index)
            raise
        return self._unread.setdefault(index, [])

    def catch_up(self) -> None:
        """Read the replies of every put sent without waiting, on every server."""
        for index in [i for i, pending in self._unread.items() if pending]:
            self._read_unread(index)

    def _read_unread(self, index: int) -> None:
        """Read server ``index``'s pending put replies into their Sent; never raises.

        A broken connection is dropped: its pending puts are read as failed.
        """
        pending = self._unread[index]
        self._unread[index] = []
        reader = _wire(self._clients[index])[1]
        try:
            with naming(self.names[index], "put"):
                for sent in pending:
                    reply = reader.readline()
                    if reply[:9] == b"INSERTED ":
                        sent.job_id = int(reply[9:])
                    else:
                        stored: list[int] = []
                        sent.error = self._refusal(index, sent.body_size, reply, stored)
                        sent.job_id = stored[0] if stored else None
                    sent.read = True
        except (QueueUnavailable, ConnectionError) as err:
            unread = [sent for sent in pending if not sent.read]
            for sent in unread:
                sent.error = err if isinstance(err, QueueUnavailable) else QueueUnavailable(
                    self.names[index], f"beanstalkd put failed: {err!r}")
            self._unread[index] = unread
            self._drop(index)

    def _refusal(self, index: int, size: int, reply: bytes, stored: list[int]) -> Exception:
        """The error for a put's reply other than ``INSERTED``.

        ``BURIED id`` means beanstalkd stored the job but, out of memory, buried
        it: it is counted in ``stored`` (a kick would run it) and still an error.
        """
        if not reply.endswith(b"\r\n"):  # the rest of the chunk's replies are lost with it
            raise ConnectionError("beanstalkd closed the connection before answering every put")
        status, *values = reply.split()
        name = self.names[index]
        if status == b"JOB_TOO_BIG":
            return JobTooBig(f"job of {size} bytes refused by {name}")
        words = reply.strip().decode(errors="replace")
        if status == b"BURIED" and values:
            stored.append(int(values[0]))
            return ServerRefused(name, f"beanstalkd is out of memory: it stored job "
                                       f"{int(values[0])} buried, not ready", reply=words)
        if status == b"DRAINING":  # going away: an outage, not a judgement of the job
            return QueueUnavailable(name, "beanstalkd is draining: it takes no new jobs")
        if status == b"INTERNAL_ERROR":  # its own fault: may pass
            return QueueUnavailable(name, f"beanstalkd failed a put: {words}")
        return ServerRefused(name, f"beanstalkd refused a put: {words}", reply=words)

    def kick_job(self, index: int, job_id: int) -> bool:
        """Move a delayed or buried job to ready; False if it is in neither state.

        Idempotent: kicking a job already ready, reserved or deleted is a no-op.
        """
        return self._found(index, "kick-job", lambda client: client.kick_job(job_id))

    def kick_buried(self, index: int, tube: str, limit: int) -> list[int]:
        """Kick up to ``limit`` buried jobs of ``tube`` one by one; returns their ids.

        Never the bound ``kick`` command: with nothing buried it kicks
        *delayed* jobs, which would start parked aggregates and retries early.
        """
        kicked: list[int] = []
        with self._session(index, "kick") as client:
            client.use(tube)
            self._using[index] = tube
            while len(kicked) < limit:
                try:
                    job = client.peek_buried()
                except greenstalk.NotFoundError:
                    break
                client.kick_job(job)
                kicked.append(job.id)
        return kicked

    def delete(self, index: int, job_id: int) -> bool:
        """Delete job ``job_id`` wherever it is; False if it is gone already."""
        return self._found(index, "delete", lambda client: client.delete(job_id))

    def tube_stats(self, index: int, tube: str) -> dict[str, int]:
        """``stats-tube`` of ``tube`` on server ``index`` (zeros for an unused tube)."""
        def stats_tube(client: greenstalk.Client[bytes]) -> dict[str, Any]:
            try:
                return dict(client.stats_tube(tube))
            except greenstalk.NotFoundError:
                return {}

        stats = self._retrying(index, "stats-tube", stats_tube)
        return {k: int(v) for k, v in stats.items() if isinstance(v, int | str) and str(v).isdigit()}

    def tubes(self, index: int) -> list[str]:
        """The tubes server ``index`` knows (``list-tubes``: those with jobs or watchers)."""
        return sorted(self._retrying(index, "list-tubes", lambda client: client.tubes()))

    def job_state(self, index: int, job_id: int) -> str | None:
        """``ready``, ``reserved``, ``delayed`` or ``buried``; None if the job is gone."""
        stats = self.job_stats(index, job_id)
        return None if stats is None else str(stats["state"])

    def job_stats(self, index: int, job_id: int) -> dict[str, Any] | None:
        """beanstalkd's ``stats-job`` of a job (its ``state``, ``tube``...); None if it is gone."""
        def stats(client: greenstalk.Client[bytes]) -> dict[str, Any] | None:
            try:
                return dict(client.stats_job(job_id))
            except greenstalk.NotFoundError:
                return None

        return self._retrying(index, "stats-job", stats)

    def close(self) -> None:
        """Close every connection."""
        for index in list(self._clients):
            self._drop(index)
