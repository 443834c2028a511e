"""etcd: the once-only decisions, durable run records, and wake-ups.

etcd is used once per aggregate (the "fired" marker) and a few times per
run (its record, its lease kept alive), never once per job: an etcd write
costs about a millisecond, a whole job about a tenth of that.

A lock alone cannot give exactly-once firing, since its holder can die
half-way; the marker is a create-if-absent transaction, so the decision
survives any crash and every later attempt sees it. Markers and records are
attached to the run's lease, so they expire with the run's record.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any
from urllib.parse import quote

import etcd3
import etcd3.watch
import grpc

from packmule.config import Address, format_address
from packmule.errors import CoordinatorUnavailable, ServerError, ServerRefused

if not hasattr(etcd3.watch, "six"):
    # python3-etcd3 0.13 still calls six.itervalues() when a watch stream ends
    # (server restart, client close) without importing six; the NameError kills
    # its watch thread. Provide the one function it uses.
    etcd3.watch.six = type("six", (), {"itervalues": staticmethod(lambda d: iter(d.values()))})

# gRPC status codes by which etcd says a request is wrong, not that it is away:
# "request is too large" (INVALID_ARGUMENT, over --max-request-bytes, 1.5 MiB by
# default), "database space exceeded" and gRPC's own message limit
# (RESOURCE_EXHAUSTED), "requested lease not found" (NOT_FOUND)... The rest
# (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED, INTERNAL, UNKNOWN, ABORTED) and
# socket errors are outages.
_REFUSALS = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.UNIMPLEMENTED,
})


# A member whose request failed as an outage (unreachable, "leader changed") is
# passed over for this long, then asked again. python-etcd3's default, 300 s,
# would leave a client that saw every member fail once (an election, a lost
# quorum; any restart of a lone etcd) refusing to send anything for 5 minutes.
MEMBER_RETRY_SECONDS = 1.0


def _status(err: BaseException) -> tuple[grpc.StatusCode | None, str]:
    """The gRPC status code and details behind ``err``, if it carries one.

    python-etcd3 replaces some gRPC errors with its own (FAILED_PRECONDITION
    becomes PreconditionFailedError), raised while handling the original.
    """
    for candidate in (err, err.__context__):
        code = getattr(candidate, "code", None)
        if isinstance(candidate, grpc.RpcError) and callable(code):
            details = getattr(candidate, "details", lambda: "")
            return code(), str(details() or "")
    return None, ""


class Coordinator:
    """A client of the etcd cluster (fails over between its members)."""

    def __init__(self, addresses: tuple[Address, ...], *, namespace: str,
                 timeout_seconds: float) -> None:
        self.names = ", ".join(format_address(a) for a in addresses)
        self.prefix = f"/{namespace}"
        self.round_trips = 0  # counted for tests of O(1) reads
        endpoints = [etcd3.Endpoint(host, port, secure=False, time_retry=MEMBER_RETRY_SECONDS)
                     for host, port in addresses]
        self._client = etcd3.MultiEndpointEtcd3Client(
            endpoints, timeout=timeout_seconds, failover=True
        )

    @contextmanager
    def _naming(self, action: str) -> Iterator[None]:
        self.round_trips += 1
        try:
            yield
        except (etcd3.exceptions.Etcd3Exception, grpc.RpcError, OSError, ValueError) as err:
            raise self._error(action, err) from err

    def _error(self, action: str, err: BaseException) -> ServerError:
        """ServerRefused if etcd answered that the request is wrong, else CoordinatorUnavailable."""
        code, details = _status(err)
        if code is not None and code in _REFUSALS:
            return ServerRefused(self.names, f"etcd refused {action} ({code.name}): {details}",
                                 reply=details)
        said = f" ({code.name}: {details})" if code is not None else ""  # "leader changed"...
        return CoordinatorUnavailable(self.names, f"etcd {action} failed: {err!r}{said}")

    # Keys -----------------------------------------------------------------
    def run_key(self, run: str) -> str:
        """The durable record of one run, by its id."""
        return f"{self.prefix}/run/{run}"

    def runs_prefix(self, runner: str, name: str) -> str:
        """Prefix of the index of the runs of (runner class path, name), one key per run.

        The name is percent-encoded (``/`` included), so no name's prefix is
        another's; a class path (``module:QualName``) holds no ``/``.
        """
        return f"{self.prefix}/runs/{runner}/{quote(name, safe='')}/"

    def marker_prefix(self, run: str, aggregate: int) -> str:
        """Prefix of one aggregate's markers (``fired``: its batches are all complete)."""
        return f"{self.prefix}/r/{run}/a/{aggregate}/"

    def run_lost_key(self, run: str) -> str:
        """Written when memcached is found to have lost this run's state."""
        return f"{self.prefix}/r/{run}/lost"

    # Operations -----------------------------------------------------------
    def create_if_absent(self, key: str, value: bytes, *, lease: int = 0) -> bool:
        """Create ``key`` unless it exists; True if this call created it."""
        with self._naming("create"):
            return bool(self._client.put_if_not_exists(key, value, lease=lease or None))

    def create_all_if_absent(self, values: dict[str, bytes], *, lease: int = 0) -> bool:
        """Create every key of ``values`` in one transaction, unless one exists; True if created."""
        txn = self._client.transactions
        with self._naming("create"):
            succeeded, _ = self._client.transaction(
                compare=[txn.version(key) == 0 for key in values],
                success=[txn.put(key, value, lease or None) for key, value in values.items()],
                failure=[])
        return bool(succeeded)

    def replace_if(self, key: str, value: bytes, revision: int, *, lease: int = 0) -> bool:
        """Write ``key`` only if it was last changed at ``revision``; True if written.

        ``lease`` is the lease the key stays on: a put without it would detach
        the key from its lease (etcd keeps no lease across a put).
        """
        txn = self._client.transactions
        with self._naming("replace"):
            succeeded, _ = self._client.transaction(
                compare=[txn.mod(key) == revision],
                success=[txn.put(key, value, lease or None)], failure=[])
        return bool(succeeded)

    def put(self, key: str, value: bytes, *, lease: int = 0) -> None:
        """Write ``key``."""
        with self._naming("put"):
            self._client.put(key, value, lease=lease or None)

    def get(self, key: str) -> bytes | None:
        """The value of ``key``, or None."""
        with self._naming("get"):
            value, _ = self._client.get(key)
        return None if value is None else bytes(value)

    def get_with_revisions(self, keys: Sequence[str]) -> list[tuple[bytes | None, int]]:
        """``(value, mod revision)`` of each key, in one round trip; ``(None, 0)`` if absent.

        The reads are one transaction, so they see one revision of the store.
        """
        txn = self._client.transactions
        with self._naming("get"):
            _, responses = self._client.transaction(
                compare=[], success=[txn.get(key) for key in keys], failure=[])
        found: list[tuple[bytes | None, int]] = []
        for kvs in responses:
            found.append((bytes(kvs[0][0]), int(kvs[0][1].mod_revision)) if kvs else (None, 0))
        return found

    def newest_key(self, prefix: str) -> str | None:
        """The key under ``prefix`` created last (by etcd's create revision), or None.

        One range read of one key whatever the number of keys under ``prefix``.
        """
        with self._naming("get"):
            found = list(self._client.get_prefix(prefix, sort_order="descend",
                                                 sort_target="create", limit=1, keys_only=True))
        return found[0][1].key.decode() if found else None

    def keys_by_creation(self, prefix: str) -> list[str]:
        """Every key under ``prefix``, oldest first (an O(keys) listing, for tools)."""
        with self._naming("get"):
            return [meta.key.decode() for _, meta in self._client.get_prefix(
                prefix, sort_order="ascend", sort_target="create", keys_only=True)]

    def get_prefix(self, prefix: str) -> dict[str, bytes]:
        """Every key under ``prefix`` with its value."""
        with self._naming("get"):
            return {meta.key.decode(): bytes(value)
                    for value, meta in self._client.get_prefix(prefix)}

    def grant_lease(self, ttl_seconds: int) -> int:
        """A new lease of ``ttl_seconds``; its id."""
        with self._naming("lease"):
            return int(self._client.lease(ttl_seconds).id)

    def refresh_lease(self, lease: int) -> bool:
        """Restart ``lease``'s time-to-live at its granted length; False if it already expired."""
        with self._naming("lease refresh"):
            replies = list(self._client.refresh_lease(lease))
        return bool(replies) and int(replies[0].TTL) > 0

    def watch_prefixes(self, prefixes: list[str], wake: threading.Event,
                       seen: set[str] | None = None) -> Callable[[], None]:
        """Set ``wake`` on any change under ``prefixes``; returns the cancel function.

        The keys of the events are added to ``seen``, so a caller waiting for
        one key needs no read after the wake-up. A change made before the
        watch started is not missed as long as the caller reads after starting it.
        """
        def on_event(response: Any) -> None:
            if seen is not None:
                seen.update(event.key.decode() for event in getattr(response, "events", ()))
            wake.set()

        ids: list[int] = []

        def cancel() -> None:
            for watch_id in ids:
                with suppress(Exception):
                    self._client.cancel_watch(watch_id)

        try:
            with self._naming("watch"):
                for prefix in prefixes:
                    ids.append(self._client.add_watch_prefix_callback(prefix, on_event))
        except ServerError:
            cancel()
            raise
        return cancel

    def close(self) -> None:
        """Close the gRPC channel."""
        self._client.close()
