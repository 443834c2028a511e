"""etcd: the once-only decisions, durable run records, and wake-ups.

etcd is used once per aggregate (the "fired" marker) and a few times per
run (its record), never once per job: an etcd write costs about a
millisecond, a whole job about a tenth of that.

A lock alone cannot give exactly-once firing, since its holder can die
half-way; the marker is a create-if-absent transaction, so the decision
survives any crash and every later attempt sees it. Markers and records are
attached to the run's lease, so they expire with the run's record.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

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
        endpoints = [etcd3.Endpoint(host, port, secure=False) for host, port in addresses]
        self._client = etcd3.MultiEndpointEtcd3Client(
            endpoints, timeout=timeout_seconds, failover=True
        )

    @contextmanager
    def _naming(self, action: str) -> Iterator[None]:
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
        return CoordinatorUnavailable(self.names, f"etcd {action} failed: {err!r}")

    # Keys -----------------------------------------------------------------
    def run_key(self, run_identity: str) -> str:
        """The durable record of the latest run of a (runner class, name)."""
        return f"{self.prefix}/runs/{run_identity}"

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

    def put(self, key: str, value: bytes, *, lease: int = 0) -> None:
        """Write ``key``."""
        with self._naming("put"):
            self._client.put(key, value, lease=lease or None)

    def get(self, key: str) -> bytes | None:
        """The value of ``key``, or None."""
        with self._naming("get"):
            value, _ = self._client.get(key)
        return None if value is None else bytes(value)

    def get_prefix(self, prefix: str) -> dict[str, bytes]:
        """Every key under ``prefix`` with its value."""
        with self._naming("get"):
            return {meta.key.decode(): bytes(value)
                    for value, meta in self._client.get_prefix(prefix)}

    def grant_lease(self, ttl_seconds: int) -> int:
        """A new lease of ``ttl_seconds``; its id."""
        with self._naming("lease"):
            return int(self._client.lease(ttl_seconds).id)

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
