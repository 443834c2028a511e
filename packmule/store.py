"""memcached, as a pool of servers: a run's records, counters and values.

Keys are spread over the pool by rendezvous hashing done here, not by
pymemcache's HashClient, so a dead server is an error naming it and never a
silent remapping of its keys to another server (which would look like data
loss, or worse, like fresh state).

Writes that decide correctness wait for memcached's reply (pymemcache's
default is ``noreply``, under which ``add`` always says True). Only progress
counters are written without a reply.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple, TypeVar, overload

from pymemcache.client.base import Client
from pymemcache.exceptions import (
    MemcacheClientError,
    MemcacheError,
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
    MemcacheUnknownError,
)

from packmule.config import Address, format_address
from packmule.errors import ServerRefused, StoreUnavailable
from packmule.sockets import KernelTimedSockets

T = TypeVar("T")
# Keys in one command of many (a get, a delete): its line stays near 150 KB.
KEYS_PER_COMMAND = 5000
# What memcached 1.6 adds to key and value to size an item against its item
# size (-I): a 48-byte header, the key's terminator, the value's CRLF, the
# 8-byte CAS and 4 bytes of flags (59 measured without flags); plus room for
# the byte packmule appends to a job's record once counted.
ITEM_OVERHEAD = 64 + 8


def refused_jobs_key(namespace: str) -> str:
    """Counter: jobs workers refused for their signature, all runs together (for metrics)."""
    return f"{namespace}:refused"


@dataclass(frozen=True)
class RunKeys:
    """Builds every memcached key of one run (the one place keys are spelled)."""

    namespace: str
    run: str
    _prefix: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_prefix", f"{self.namespace}:{self.run}:")

    def _key(self, *parts: object) -> str:
        return self._prefix + ":".join(map(str, parts))

    # The keys of every job's completion are spelled out: they are built per job.

    @property
    def sequence(self) -> str:
        """Counter: ``incr`` on it allocates job numbers (never decremented)."""
        return self._key("seq")

    @property
    def total(self) -> str:
        """Counter: jobs counted in the run's progress (aggregates included)."""
        return self._key("total")

    @property
    def completed(self) -> str:
        """Counter: jobs that finished with a value."""
        return f"{self._prefix}completed"

    @property
    def failed(self) -> str:
        """Counter: jobs that failed for good (buried)."""
        return self._key("failed")

    @property
    def handled(self) -> str:
        """Counter: jobs whose error ``handle_error`` turned into a value."""
        return self._key("handled")

    @property
    def lost(self) -> str:
        """Counter: values found lost and passed on as MISSING."""
        return self._key("lost")

    @property
    def cancelled(self) -> str:
        """Flag: the run was cancelled."""
        return self._key("cancelled")

    def job(self, number: int) -> str:
        """A job's record: its outcome once it finished."""
        return f"{self._prefix}j:{number}"

    def jobs(self, numbers: Iterable[int]) -> list[str]:
        """The records of ``numbers`` (:meth:`job` of each), made in one go for thousands."""
        prefix = f"{self._prefix}j:"
        return [prefix + str(number) for number in numbers]

    def allocation(self, origin: str, index: int) -> str:
        """The job numbers a job's ``index``-th enqueue got, replayed if it runs again."""
        return self._key("n", origin, index)

    def batch(self, batch: str) -> str:
        """A batch's record: its size once closed, and who waits on it."""
        return f"{self._prefix}b:{batch}"

    def batch_done(self, batch: str) -> str:
        """Counter: completions counted in a batch (redeliveries may count twice)."""
        return f"{self._prefix}d:{batch}"

    def aggregate(self, number: int) -> str:
        """An aggregate's description: method, dependencies, where its job is parked."""
        return self._key("a", number)

    @property
    def buried(self) -> str:
        """Notes of the run's buried jobs, a JSON line each (see packmule.leftovers)."""
        return self._key("x")

    def parked(self, chunk: int) -> str:
        """Notes of the run's parked aggregate jobs, ``server:job`` each (see packmule.leftovers)."""
        return self._key("p", chunk)

    def aggregates(self, chunk: int) -> str:
        """Notes of the run's aggregate numbers, ``number `` each, by chunk (see packmule.tree)."""
        return self._key("g", chunk)

    def aggregate_part(self, number: int, part: int) -> str:
        """Part ``part`` of a long dependency list of aggregate ``number``."""
        return self._key("ap", number, part)

    def sentinel(self, index: int) -> str:
        """The run's sentinel on memcached server ``index``: gone means that server lost state."""
        return self._key("s", index)


class Quiet(NamedTuple):
    """A write nobody waits for (a progress counter, a marker): incr, decr or append.

    (A NamedTuple, not a frozen dataclass: a completion builds several.)
    """

    command: str
    key: str
    value: int | bytes = 1

    def line(self, ttl: int) -> bytes:
        """The command in memcached's text protocol, with ``noreply``."""
        if isinstance(self.value, bytes):
            return (f"{self.command} {self.key} 0 {ttl} {len(self.value)} noreply\r\n".encode()
                    + self.value + b"\r\n")
        return f"{self.command} {self.key} {self.value} noreply\r\n".encode()


class Ask(NamedTuple):
    """A command whose reply is read, for :meth:`Store.in_one_write`: add, incr or get."""

    command: str
    key: str
    value: int | bytes = 1

    def line(self, ttl: int) -> bytes:
        """The command in memcached's text protocol."""
        if self.command == "get":
            return f"get {self.key}\r\n".encode()
        if isinstance(self.value, bytes):
            return (f"{self.command} {self.key} 0 {ttl} {len(self.value)}\r\n".encode()
                    + self.value + b"\r\n")
        return f"{self.command} {self.key} {self.value}\r\n".encode()


Reply = bool | int | bytes | None  # add: stored?; incr: the new value or None; get: value or None


class Store:
    """A memcached pool. Not thread-safe: one per thread or process."""

    def __init__(
        self, addresses: tuple[Address, ...], *, timeout_seconds: float, ttl_seconds: int
    ) -> None:
        self.names = [format_address(a) for a in addresses]
        self.ttl = ttl_seconds
        # Lines of commands carrying no value, by (type, command).
        self._lines: dict[tuple[type, Quiet | Ask], bytes] = {}
        self._clients = [
            Client(a, connect_timeout=timeout_seconds, timeout=None, no_delay=True,
                   default_noreply=False, socket_module=KernelTimedSockets(timeout_seconds))
            for a in addresses
        ]
        self.round_trips = 0  # counted for tests and benchmarks of O(1) reads
        self._item_size: dict[int, int] = {}  # each server's item_size_max, asked once

    def server_of(self, key: str) -> int:
        """Pool index holding ``key`` (rendezvous hashing: stable as the pool grows)."""
        if len(self.names) == 1:
            return 0
        data = key.encode()
        scores = [zlib.crc32(name.encode() + data) for name in self.names]
        return scores.index(max(scores))

    def _call(self, index: int, action: str, command: Callable[[Client], T]) -> T:
        """Run ``command`` on server ``index``, naming the server in any error.

        A socket that broke since its last use (the server restarted) is
        reconnected and the command sent once more: every command packmule
        sends tolerates being applied twice (add and cas then say "not
        stored", a counter runs ahead, which the protocol allows).

        Raises:
            ServerRefused: memcached answered ``SERVER_ERROR`` (object too
                large, out of memory under ``-M``) or ``CLIENT_ERROR``, or
                pymemcache refused the key: the same command would fail again.
            StoreUnavailable: the server is unreachable, silent, or out of step.
        """
        self.round_trips += 1
        for attempt in (1, 2):
            try:
                return command(self._clients[index])
            except (MemcacheUnexpectedCloseError, ConnectionError) as err:
                if attempt == 2:
                    raise StoreUnavailable(self.names[index],
                                           f"memcached {action} failed: {err!r}") from err
            except (MemcacheServerError, MemcacheClientError) as err:
                # pymemcache closed the socket: the next command reconnects.
                words = _words(err)
                raise ServerRefused(self.names[index], f"memcached refused {action}: {words}",
                                    reply=words) from err
            except (MemcacheError, OSError) as err:
                raise StoreUnavailable(self.names[index],
                                       f"memcached {action} failed: {err!r}") from err
        raise AssertionError("unreachable")

    def value_limit(self, key: str) -> int:
        """The largest value, in bytes, the server holding ``key`` stores under it.

        Its item size (``-I``, 1 MB by default) less the key and the item's
        overhead, so a value over it is refused before it is sent.
        """
        index = self.server_of(key)
        if index not in self._item_size:
            stats = self._call(index, "stats settings", lambda c: c.stats("settings"))
            self._item_size[index] = int(stats[b"item_size_max"])
        return self._item_size[index] - ITEM_OVERHEAD - len(key)

    def _check_size(self, key: str, value: bytes) -> None:
        """ServerRefused naming the size, the limit and the server, if ``value`` is too big.

        Values of a few hundred bytes (nearly all) skip the check and its one
        ``stats settings`` per server; memcached's own refusal still covers a
        server run with a tiny ``-I``.
        """
        if len(value) <= 1000:
            return
        limit = self.value_limit(key)
        if len(value) > limit:
            raise ServerRefused(
                self.names[self.server_of(key)],
                f"memcached cannot store {len(value)} bytes under {key}: its item size "
                f"(-I) leaves at most {limit} bytes for a value there",
                reply="object too large for cache")

    def _keyed(self, key: str, action: str, command: Callable[[Client], T]) -> T:
        return self._call(self.server_of(key), action, command)

    def add(self, key: str, value: bytes) -> bool:
        """Store ``value`` only if ``key`` is absent; True if this call stored it."""
        self._check_size(key, value)
        return bool(self._keyed(key, "add", lambda c: c.add(key, value, expire=self.ttl,
                                                             noreply=False)))

    def set(self, key: str, value: bytes, *, index: int | None = None) -> None:
        """Store ``value`` (on server ``index`` if given, else where ``key`` hashes)."""
        where = self.server_of(key) if index is None else index
        self._check_size(key, value)
        if not self._call(where, "set", lambda c: c.set(key, value, expire=self.ttl,
                                                         noreply=False)):
            raise ServerRefused(self.names[where], f"memcached did not store {key}",
                                reply="NOT_STORED")

    def set_many(self, values: dict[str, bytes]) -> None:
        """Store several keys, one pipelined round trip per server."""
        for key, value in values.items():
            self._check_size(key, value)
        for index, keys in self._by_server(values).items():
            group = {k: values[k] for k in keys}
            failed = self._call(index, "set", lambda c, g=group: c.set_many(  # type: ignore[misc]
                g, expire=self.ttl, noreply=False))
            if failed:
                raise ServerRefused(self.names[index], f"memcached did not store {failed[:3]}",
                                    reply="NOT_STORED")

    def get(self, key: str) -> bytes | None:
        """The value of ``key``, or None if absent (never stored, expired or lost)."""
        value = self._keyed(key, "get", lambda c: c.get(key))
        return value if value is None else bytes(value)

    def gets(self, key: str) -> tuple[bytes | None, bytes | None]:
        """``(value, cas token)``, or ``(None, None)`` if absent."""
        value, token = self._keyed(key, "gets", lambda c: c.gets(key))
        return (None, None) if value is None else (bytes(value), token)

    def cas(self, key: str, value: bytes, token: bytes) -> bool:
        """Replace ``key`` if unchanged since ``gets`` gave ``token``; else False."""
        self._check_size(key, value)
        return bool(self._keyed(key, "cas", lambda c: c.cas(key, value, token, expire=self.ttl,
                                                             noreply=False)))

    def incr(self, key: str, amount: int = 1, *, quiet_first: Sequence[Quiet] = ()) -> int | None:
        """Add to a counter; the new value, or None if the counter does not exist.

        ``quiet_first`` are sent before the increment, without waiting for
        their replies. Those on the counter's server travel in the same packet
        (memcached applies one connection's commands in order), so a job's
        completion costs one round trip instead of three sends.
        """
        index = self.server_of(key)
        same: list[Quiet] = []
        elsewhere: list[Quiet] = []
        for write in quiet_first:
            (same if self.server_of(write.key) == index else elsewhere).append(write)
        self.send_quietly(elsewhere)
        if not same:
            result = self._call(index, "incr", lambda c: c.incr(key, amount, noreply=False))
            return None if result is None else int(result)
        command = b"".join(q.line(self.ttl) for q in same) + f"incr {key} {amount}".encode()
        reply = self._call(index, "incr", lambda c: c.raw_command(command))
        if reply == b"NOT_FOUND":
            return None
        if not reply.isdigit():  # not a reply to incr: the stream is out of step
            # (an error line of a quiet write raised ServerRefused in _call already)
            self._clients[index].close()
            raise StoreUnavailable(self.names[index], f"memcached incr of {key}: {reply!r}")
        return int(reply)

    def in_one_write(self, commands: Sequence[Quiet | Ask]) -> list[Reply | ServerRefused] | None:
        """Send ``commands`` in one write and read the replies of the Asks, in order.

        memcached applies one connection's commands in order, so a completion
        can record a value, count it and read its batch in one round trip
        (and a batch of completions theirs: see aggregate.complete_all).
        Only for commands whose keys all live on one server, and values of
        at most 1,000 bytes (no item size is smaller): None, nothing sent,
        if the keys are spread over the pool.

        An Ask memcached refused (``SERVER_ERROR``, e.g. out of memory under
        ``-M``: it goes on with the next command) has a ServerRefused for its
        reply, and the other replies are read: each completion of a shared
        write stands or fails on its own.

        Raises:
            StoreUnavailable: as for any command.
        """
        index = self.server_of(commands[0].key)
        if len(self.names) > 1 and any(self.server_of(c.key) != index for c in commands[1:]):
            return None
        lines, ttl = self._lines, self.ttl  # (lists, not generators: this is once per job)
        payload = b"".join([command.line(ttl) if type(command.value) is bytes  # (a value: new)
                            else lines.get((type(command), command)) or self._line(command)
                            for command in commands])
        asks = [command for command in commands if type(command) is Ask]
        name = self.names[index]
        return self._call(index, asks[0].command, lambda c: _exchange(c, payload, asks, name))

    def _line(self, command: Quiet | Ask) -> bytes:
        """``command``'s line, kept if it carries no value: a completion's counts
        and its batch's read are the same line for every job of the batch."""
        line = command.line(self.ttl)
        if type(command.value) is not bytes:
            if len(self._lines) >= 10_000:
                self._lines.clear()
            self._lines[type(command), command] = line  # the type too: an Ask equals a Quiet
        return line

    def send_quietly(self, writes: Sequence[Quiet]) -> None:
        """Send progress counters and markers without waiting for replies."""
        for write in writes:
            if write.command == "append":
                assert isinstance(write.value, bytes)
                self.append_quietly(write.key, write.value)
            elif write.command == "decr":
                self.decr_quietly(write.key, int(write.value))
            else:
                self.incr_quietly(write.key, int(write.value))

    def incr_quietly(self, key: str, amount: int = 1) -> None:
        """Add to a progress counter without waiting for a reply (it decides nothing)."""
        self._keyed(key, "incr", lambda c: c.incr(key, amount, noreply=True))

    def append_quietly(self, key: str, data: bytes) -> None:
        """Append ``data`` to an existing value without waiting (a marker, not state)."""
        self._keyed(key, "append", lambda c: c.append(key, data, expire=self.ttl, noreply=True))

    def append_creating(self, key: str, data: bytes) -> None:
        """Append ``data`` to ``key``, creating it if absent, without waiting for replies.

        An ``add`` of nothing then an ``append``, in order on one connection:
        whichever comes first creates the key, and the append always lands.
        """
        def both(client: Client) -> None:
            client.add(key, b"", expire=self.ttl, noreply=True)
            client.append(key, data, expire=self.ttl, noreply=True)

        self._keyed(key, "append", both)

    def decr_quietly(self, key: str, amount: int = 1) -> None:
        """Subtract from a progress counter without waiting (memcached stops at 0)."""
        self._keyed(key, "decr", lambda c: c.decr(key, amount, noreply=True))

    def delete(self, key: str, *, index: int | None = None) -> bool:
        """Remove ``key`` (from server ``index`` if given); True if it was there."""
        where = self.server_of(key) if index is None else index
        return bool(self._call(where, "delete", lambda c: c.delete(key, noreply=False)))

    def delete_many(self, keys: Iterable[str]) -> None:
        """Remove ``keys`` (absent ones are fine), pipelined: one write per server and chunk."""
        for index, group in self._by_server(keys).items():
            for start in range(0, len(group), KEYS_PER_COMMAND):
                chunk = group[start:start + KEYS_PER_COMMAND]
                self._call(index, "delete", lambda c, k=chunk: c.delete_many(k, noreply=False))  # type: ignore[misc]

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """Values of the present ``keys``: one round trip per server holding some."""
        found: dict[str, bytes] = {}
        for index, group in self._by_server(keys).items():
            for start in range(0, len(group), KEYS_PER_COMMAND):
                found.update(self.get_at(index, group[start:start + KEYS_PER_COMMAND]))
        return found

    def get_in_order(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of ``keys`` in their order, None where a key is not found.

        For thousands of small values (an aggregate's records): on a
        one-server pool, no dictionary is made between the reply and the
        list (see :meth:`_Replies.in_order`).
        """
        if len(self._clients) > 1:
            found = self.get_many(keys)
            return [found.get(key) for key in keys]
        values: list[bytes | None] = []
        for start in range(0, len(keys), KEYS_PER_COMMAND):
            chunk = keys[start:start + KEYS_PER_COMMAND]
            values += self._call(0, "get", partial(_read_in_order, keys=chunk))
        return values

    def get_at(self, index: int, keys: list[str]) -> dict[str, bytes]:
        """Values of ``keys`` read from server ``index`` regardless of hashing.

        The reply is parsed here, not by pymemcache, whose parser costs
        several microseconds a value: an aggregate over 10,000 jobs reads
        10,000 of them while its caller waits.
        """
        if not keys:
            return {}
        wanted = {key.encode(): key for key in keys}
        payload = b"get " + b" ".join(wanted) + b"\r\n"
        found = self._call(index, "get", lambda c: _exchange(c, payload))
        return {wanted[key]: value for key, value in found.items()}

    def evictions(self, index: int) -> int:
        """How many items server ``index`` evicted since it started (its ``stats``)."""
        stats = self._call(index, "stats", lambda c: c.stats())
        return int(stats.get(b"evictions", stats.get("evictions", 0)))

    def flush_all(self) -> None:
        """Forget everything on every server (tests of data loss)."""
        for index in range(len(self._clients)):
            self._call(index, "flush_all", lambda c: c.flush_all(noreply=False))

    def _by_server(self, keys: Iterable[str]) -> dict[int, list[str]]:
        groups: dict[int, list[str]] = {}
        for key in keys:
            groups.setdefault(self.server_of(key), []).append(key)
        return groups

    def close(self) -> None:
        """Close every connection."""
        for client in self._clients:
            client.close()


@overload
def _exchange(client: Client, payload: bytes) -> dict[bytes, bytes]: ...
@overload
def _exchange(client: Client, payload: bytes, asks: list[Ask],
              server: str) -> list[Reply | ServerRefused]: ...


def _exchange(client: Client, payload: bytes, asks: list[Ask] | None = None,
              server: str = "") -> Any:
    """Send ``payload`` on ``client``'s socket and read the replies of ``asks``, in order
    (without ``asks``: the values of one ``get``, by key), a ``SERVER_ERROR`` reply
    as a ServerRefused naming ``server`` in its place.

    pymemcache reads every reply of its own commands in full, so nothing is
    left in the socket between commands, and this leaves nothing either.
    """
    if client.sock is None:
        client._connect()
    sock = client.sock
    try:
        sock.sendall(payload)
        replies = _Replies(sock)
        if asks is None:
            return replies.values()
        adds = next((at for at, ask in enumerate(asks) if ask.command != "add"), len(asks))
        stored: list[Reply | ServerRefused] = [True] * adds if replies.all_stored(adds) else []
        return stored + [replies.reply_or_refusal(ask, server) for ask in asks[len(stored):]]
    except BaseException:
        client.close()  # replies left unread would answer the next command
        raise


def _read_in_order(client: Client, keys: Sequence[str]) -> list[bytes | None]:
    """Send the ``get`` of ``keys``; their values in order (see _Replies.in_order)."""
    if client.sock is None:
        client._connect()
    try:
        client.sock.sendall(("get " + " ".join(keys) + "\r\n").encode())
        return _Replies(client.sock).in_order(keys)
    except BaseException:
        client.close()  # replies left unread would answer the next command
        raise


class _Replies:
    """Reads memcached replies from a socket, in order, parsing them in place."""

    def __init__(self, sock: Any) -> None:
        self.sock, self.buf, self.pos = sock, b"", 0

    def _line(self) -> bytes:
        while (end := self.buf.find(b"\r\n", self.pos)) < 0:
            self._more()
        line, self.pos = self.buf[self.pos:end], end + 2
        return line

    def _more(self) -> None:
        # 64 KB: a larger buffer is mapped and unmapped by malloc, two system calls a read.
        data = self.sock.recv(65536)
        if not data:
            raise MemcacheUnexpectedCloseError()
        self.buf = self.buf[self.pos:] + data
        self.pos = 0

    def all_stored(self, count: int) -> bool:
        """Whether the next ``count`` replies all say ``STORED`` (then they are read).

        A batch's adds are answered so as a rule: one comparison, not a
        parse per reply. More is read only while what came is the start of
        those replies, so no reply that will not come is waited for.
        """
        expected = _STORED * count
        while len(self.buf) - self.pos < len(expected) and expected.startswith(
                self.buf[self.pos:]):
            self._more()
        if not self.buf.startswith(expected, self.pos):
            return False
        self.pos += len(expected)
        return True

    def reply(self, ask: Ask) -> Reply:
        """The reply to one Ask: add -> stored?, incr -> the value or None, get -> the value or None."""
        if ask.command == "get":
            found = self.values()
            return found[next(iter(found))] if found else None
        line = self._line()
        known = _REPLIES[ask.command]
        if line in known:
            return known[line]
        if ask.command == "incr" and line.isdigit():
            return int(line)
        raise _unexpected(line, f"memcached {ask.command} of {ask.key}")

    def reply_or_refusal(self, ask: Ask, server: str) -> Reply | ServerRefused:
        """:meth:`reply`, or, if ``server`` refused the command, a ServerRefused saying so."""
        try:
            return self.reply(ask)
        except MemcacheServerError as err:
            words = _words(err)
            return ServerRefused(server, f"memcached refused {ask.command}: {words}",
                                 reply=words)

    def in_order(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of a ``get`` of ``keys``, in their order, None for a key not found.

        The reply is read to its apparent end and split by C code: when it
        holds every key, in order, each value of its declared length (the
        rule for an aggregate's records, JSON without line breaks), that is
        the whole parse, with no Python step per value. Otherwise (a key not
        found, a value with a line break) it is parsed value by value by
        :meth:`values`, which reads on if the end was not the real one.
        """
        self._read_to_end()
        parts = self.buf.split(b"\r\n")
        count = len(keys)
        if len(parts) == 2 * count + 2:
            words = b" ".join(parts[0:-2:2]).split(b" ")
            values = parts[1:-2:2]
            if len(words) == 4 * count and words[0::4].count(b"VALUE") == count \
                    and b" ".join(words[1::4]) == " ".join(keys).encode() \
                    and b" ".join(words[3::4]) == " ".join(map(str, map(len, values))).encode():
                self.pos = len(self.buf)
                return list(values)
        found = self.values()
        return [found.get(key.encode()) for key in keys]

    def _read_to_end(self) -> None:
        """Read until the reply seems whole: it ends with ``END``, or its last line is an error.

        The chunks are joined once (adding each to the buffer would copy it
        again for every read). A value may end the same way: the caller
        checks what it parses, and :meth:`values` reads on if need be.
        """
        chunks = [self.buf[self.pos:]]
        tail, size = chunks[0][-_TAIL:], len(chunks[0])
        while not _whole(tail, size):
            data = self.sock.recv(65536)
            if not data:
                raise MemcacheUnexpectedCloseError()
            chunks.append(data)
            tail, size = (tail + data)[-_TAIL:], size + len(data)
        self.buf, self.pos = b"".join(chunks), 0

    def values(self) -> dict[bytes, bytes]:
        """The values a ``get`` of one or more keys found, by key.

        One regular expression match per value (a few hundred nanoseconds):
        an aggregate's caller reads thousands while it waits.
        """
        found: dict[bytes, bytes] = {}
        while True:
            head = _VALUE.match(self.buf, self.pos)
            if head is None:
                if self.buf.startswith(b"END\r\n", self.pos):
                    self.pos += 5
                    return found
                if self.buf.find(b"\r\n", self.pos) >= 0:  # a whole line, neither
                    raise _unexpected(self._line(), "memcached get")
                self._more()
                continue
            start = head.end()
            end = start + int(head[2])
            if len(self.buf) < end + 2:
                self._more()
                continue
            found[head[1]] = self.buf[start:end]
            self.pos = end + 2


_STORED = b"STORED\r\n"
_TAIL = 512  # bytes kept to see how a reply ends: more than memcached's error lines


def _whole(tail: bytes, size: int) -> bool:
    """Whether a multi-get reply of ``size`` bytes ending with ``tail`` seems whole (see
    _Replies._read_to_end): ``END``, or a last line that is an error (memcached stops there)."""
    if not tail.endswith(b"\r\n"):
        return False
    if tail.endswith(b"\r\nEND\r\n") or (size == 5 and tail == b"END\r\n"):
        return True
    _, newline, last = tail[:-2].rpartition(b"\r\n")
    whole_line = bool(newline) or size == len(tail)  # the line starts inside ``tail``
    return whole_line and last.startswith((b"SERVER_ERROR", b"CLIENT_ERROR", b"ERROR"))


_VALUE = re.compile(rb"VALUE (\S+) \d+ (\d+)(?: \d+)?\r\n")


def _unexpected(line: bytes, what: str) -> MemcacheError:
    """A refusal memcached stated (raised as ServerRefused), or a stream out of step."""
    if line.startswith((b"SERVER_ERROR", b"CLIENT_ERROR")):
        return MemcacheServerError(line.partition(b" ")[2])
    return MemcacheUnknownError(f"{what}: {line!r}")


_REPLIES: dict[str, dict[bytes, Reply]] = {
    "add": {b"STORED": True, b"NOT_STORED": False},
    "incr": {b"NOT_FOUND": None},
}


def _words(err: MemcacheError) -> str:
    """What memcached said (pymemcache keeps the reply's bytes after ``SERVER_ERROR``)."""
    said = err.args[0] if err.args else err
    return said.decode(errors="replace") if isinstance(said, bytes) else str(said)
