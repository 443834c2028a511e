"""etcd: the once-only decisions, durable run records, and wake-ups.

etcd is used once per aggregate (the "fired" marker) and a few times per
run (its record, its lease kept alive), never once per job: an etcd write
costs about a millisecond, a whole job about a tenth of that.

A lock alone cannot give exactly-once firing, since its holder can die
half-way; the marker is a create-if-absent transaction, so the decision
survives any crash and every later attempt sees it. Markers and records are
attached to the run's lease, so they expire with the run's record.

etcd may be reached over TLS (a CA, a client certificate) and with a user
and password (see :class:`Security`). etcd forgets an authentication token
after a while unused (``--auth-token-ttl``, 5 min), or when the user's
password or roles change: the client then authenticates again and repeats
the request once, so an idle worker does not fail its next job.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import etcd3
import etcd3.watch
import grpc

from packmule.config import Address, Secret, Settings, etcd_uses_tls, format_address
from packmule.errors import ConfigurationError, CoordinatorUnavailable, ServerError, ServerRefused

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


def _what_failed(code: grpc.StatusCode | None, details: str, *, prefix: str, tls: bool) -> str:
    """What an etcd error says failed, in the words of the settings that fix it."""
    lowered = details.lower()
    if "handshake" in lowered or "certificate" in lowered or "tsi_" in lowered:
        return ("the TLS handshake failed (certificate): check etcd_ca_file (the CA that "
                "signed etcd's certificate) and etcd_cert_file/etcd_key_file (the client's)")
    if "authentication failed" in lowered or "user name is empty" in lowered:
        return "authentication failed: check etcd_user and etcd_password"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return (f"permission denied: grant the etcd user's role read-write on the keys "
                f"under {prefix!r} (the namespace)")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, None):
        return "unreachable" if tls else "unreachable (or it serves TLS only: use etcds:// URLs)"
    return ""


# How etcd says a token must be renewed (the Go client renews on both).
_RENEW = ("invalid auth token", "revision of auth store is old")


@dataclass(frozen=True)
class Security:
    """How to reach etcd: TLS files and credentials (see Settings for each).

    The password is a :class:`~packmule.config.Secret`, never shown.
    """

    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    user: str = ""
    password: Secret = field(default_factory=Secret)

    @classmethod
    def of(cls, settings: Settings) -> Security:
        """The security settings of ``settings``."""
        return cls(etcd_uses_tls(settings), settings.etcd_ca_file, settings.etcd_cert_file,
                   settings.etcd_key_file, settings.etcd_user, settings.etcd_password)

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials from the files (None without TLS); the system's CAs by default.

        Raises:
            ConfigurationError: a file cannot be read, naming its setting.
        """
        if not self.tls:
            return None
        found = {name: _read_file(f"etcd_{name}", getattr(self, name))
                 for name in ("ca_file", "cert_file", "key_file")}
        return grpc.ssl_channel_credentials(found["ca_file"], found["key_file"],
                                            found["cert_file"])


def _read_file(setting: str, path: str) -> bytes | None:
    """The bytes of the file ``path`` (None if no path); ConfigurationError naming ``setting``."""
    if not path:
        return None
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as err:
        raise ConfigurationError(f"{setting}: cannot read {path!r}: {err.strerror}") from None


class _Renewing:
    """The etcd client, made anew (authenticating again) when etcd forgot its token.

    Calls pass through; one that fails because the token is no longer valid
    is repeated once on a new client. A generator's items are read inside
    the call, so its errors are seen here too. Watches of the old client end
    with it: a waiting caller also polls, so it is woken later, never lost.
    """

    def __init__(self, connect: Callable[[], Any]) -> None:
        self._connect = connect
        self.client = connect()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.client, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return _read(attribute(*args, **kwargs))
            except (etcd3.exceptions.Etcd3Exception, grpc.RpcError) as err:
                if not any(words in _status(err)[1] for words in _RENEW):
                    raise
            old, self.client = self.client, self._connect()
            with suppress(Exception):
                old.close()
            return _read(getattr(self.client, name)(*args, **kwargs))

        return call


def _read(result: Any) -> Any:
    return list(result) if isinstance(result, types.GeneratorType) else result


class Coordinator:
    """A client of the etcd cluster (fails over between its members)."""

    def __init__(self, addresses: tuple[Address, ...], *, namespace: str,
                 timeout_seconds: float, security: Security | None = None) -> None:
        """Connect (and authenticate, with a user) to the cluster at ``addresses``.

        Raises:
            ConfigurationError: a TLS file cannot be read.
            ServerRefused: etcd refused the credentials (naming what failed).
            CoordinatorUnavailable: etcd cannot be reached, or the TLS handshake failed.
        """
        self.names = ", ".join(format_address(a) for a in addresses)
        self.prefix = f"/{namespace}"
        self.round_trips = 0  # counted for tests of O(1) reads
        security = security or Security()
        self._tls = security.tls
        credentials = security.credentials()

        def connect() -> Any:
            endpoints = [etcd3.Endpoint(host, port, secure=security.tls, creds=credentials,
                                        time_retry=MEMBER_RETRY_SECONDS)
                         for host, port in addresses]
            user = security.user or None
            password = security.password.values[0] if security.password else None
            return etcd3.MultiEndpointEtcd3Client(endpoints, timeout=timeout_seconds,
                                                  failover=True, user=user, password=password)

        with self._naming("authenticate" if security.user else "connect"):
            self._client = _Renewing(connect)

    @contextmanager
    def _naming(self, action: str) -> Iterator[None]:
        self.round_trips += 1
        try:
            yield
        except (etcd3.exceptions.Etcd3Exception, grpc.RpcError, OSError, ValueError) as err:
            raise self._error(action, err) from err

    def _error(self, action: str, err: BaseException) -> ServerError:
        """ServerRefused if etcd answered that the request is wrong, else CoordinatorUnavailable.

        The message says what failed: the TLS handshake, the authentication,
        a permission, or the server being unreachable.
        """
        code, details = _status(err)
        what = _what_failed(code, details, prefix=self.prefix, tls=self._tls)
        words = details or repr(err)
        said = f"{what}: {words}" if what else words
        if code is not None and code in _REFUSALS:
            return ServerRefused(self.names, f"etcd refused {action} ({code.name}): {said}",
                                 reply=details)
        status = f" ({code.name})" if code is not None else ""  # UNAVAILABLE: leader changed...
        return CoordinatorUnavailable(self.names, f"etcd {action} failed{status}: {said}")

    # Keys -----------------------------------------------------------------
    def run_key(self, run: str) -> str:
        """The durable record of one run, by its id."""
        return f"{self.prefix}/run/{run}"

    def runs_prefix(self, runner: str, name: str) -> str:
        """Prefix of the index of the runs of (runner class path, name), one key per run.

        The name is percent-encoded (``/`` included), so no name's prefix is
        another's; a class path (``module:QualName``) holds no ``/``.
        """
        return f"{self.runs_index()}{runner}/{quote(name, safe='')}/"

    def runs_index(self) -> str:
        """Prefix of the whole index: ``<class path>/<encoded name>/<run id>`` under it."""
        return f"{self.prefix}/runs/"

    def marker_prefix(self, run: str, aggregate: int) -> str:
        """Prefix of one aggregate's markers (``fired``: its batches are all complete)."""
        return f"{self.markers_prefix(run)}{aggregate}/"

    def markers_prefix(self, run: str) -> str:
        """Prefix of the markers of all of ``run``'s aggregates."""
        return f"{self.prefix}/r/{run}/a/"

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

    def newest_values(self, prefix: str, *, limit: int,
                      created_before: int = 0) -> list[tuple[str, bytes, int]]:
        """Up to ``limit`` keys under ``prefix``, created last first: ``(key, value, create revision)``.

        ``created_before`` (a create revision; 0: no bound) pages through a
        long listing: pass the last revision of the previous page. For tools.
        """
        bound = {"max_create_revision": created_before - 1} if created_before else {}
        with self._naming("get"):
            return [(meta.key.decode(), bytes(value), int(meta.create_revision))
                    for value, meta in self._client.get_prefix(
                        prefix, sort_order="descend", sort_target="create", limit=limit, **bound)]

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

    def revoke_lease(self, lease: int) -> None:
        """Revoke ``lease``: every key on it goes at once. An unknown (expired) lease is fine."""
        with suppress(ServerRefused), self._naming("lease revoke"):
            self._client.revoke_lease(lease)

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

        client: list[Any] = []  # the client that holds the watches (a renewal makes another)

        def cancel() -> None:
            for watch_id in ids:
                with suppress(Exception):
                    client[0].cancel_watch(watch_id)

        try:
            with self._naming("watch"):
                for prefix in prefixes:
                    ids.append(self._client.add_watch_prefix_callback(prefix, on_event))
                    client[:] = [self._client.client]
        except ServerError:
            cancel()
            raise
        return cancel

    def close(self) -> None:
        """Close the gRPC channel."""
        self._client.close()
