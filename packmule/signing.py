"""Signed job bodies: who may make a worker run something.

Anyone who can reach beanstalkd can put a job, and a job names a runner
class, a method and its arguments. With a shared secret configured, every
body a producer makes carries an HMAC-SHA256 of its exact bytes, and a
worker with the secret runs only bodies whose MAC it can check.

The signed form is a short prefix before the envelope's JSON::

    pm1:<key id>:<MAC>:{"packmule":2,...}\n<job> <enqueued> <arguments>

``key id`` (8 hex digits, derived from the secret by an HMAC, so it says
nothing the MAC does not) names the secret that signed, so a worker holding
several (rotation) checks one MAC, not one per secret. ``MAC`` is the
HMAC-SHA256 of the body's bytes after the prefix, in 64 hex digits. The body
itself begins ``{"packmule":2``, which keeps a MAC made for a job from
passing for anything else signed with the same secret. Signing and checking
cost about a microsecond each (``make bench`` measures it).

A signature says who made a body, not when: a reader of beanstalkd can put
a copy of a job it saw, and the same call runs again (as a redelivery would;
it counts once).
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
from collections.abc import Sequence

from packmule.config import Settings, signing_secrets
from packmule.errors import ConfigurationError, DecodeError

VERSION = b"pm1:"
_KEY_ID_HEX = 8
_MAC_HEX = 64
_MAC_AT = len(VERSION) + _KEY_ID_HEX + 1
_BODY_AT = _MAC_AT + _MAC_HEX + 1  # where the envelope's JSON starts in a signed body


class SignatureError(DecodeError):
    """A job body whose signature is missing, made with an unknown secret, or wrong.

    The worker buries such a job and never runs it.

    Attributes:
        reason: ``missing``, ``unknown key`` or ``invalid``.
        key_id: the key id the body names ("" when it carries no signature).
    """

    def __init__(self, reason: str, key_id: str, message: str) -> None:
        super().__init__(f"signature {reason}: {message}")
        self.reason = reason
        self.key_id = key_id


class _Key:
    """HMAC-SHA256 with one secret, its two padded states hashed once (RFC 2104).

    ``hmac.digest`` sets the key up again on every call, which is most of its
    cost for a body of a few hundred bytes; copying the prepared states
    halves the time per job. A test holds the MACs equal to ``hmac``'s.
    """

    def __init__(self, secret: bytes) -> None:
        if len(secret) > _BLOCK:
            secret = hashlib.sha256(secret).digest()
        padded = secret.ljust(_BLOCK, b"\0")
        self._inner = hashlib.sha256(bytes(byte ^ 0x36 for byte in padded))
        self._outer = hashlib.sha256(bytes(byte ^ 0x5C for byte in padded))

    def mac(self, data: bytes) -> bytes:
        """The HMAC of ``data``, in hex digits."""
        inner = self._inner.copy()
        inner.update(data)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return binascii.hexlify(outer.digest())


_BLOCK = 64  # SHA-256's block size


def key_id(secret: bytes) -> bytes:
    """The public name of ``secret``: 8 hex digits of an HMAC made with it."""
    return hmac.digest(secret, b"packmule key id", "sha256").hex()[:_KEY_ID_HEX].encode()


class Signer:
    """Signs bodies with the first secret; checks them with any of them."""

    def __init__(self, secrets: Sequence[str]) -> None:
        """``secrets``: at least one; the first signs.

        Raises:
            ConfigurationError: none given, or two share a key id (a 1 in 4
                billion chance per pair: pick another secret).
        """
        if not secrets:
            raise ConfigurationError("secret: a Signer needs at least one secret")
        keys = [secret.encode() for secret in secrets]
        self._keys = {key_id(key): _Key(key) for key in keys}
        if len(self._keys) < len(keys):
            raise ConfigurationError("secret: two secrets share a key id; replace one")
        self._key = self._keys[key_id(keys[0])]
        self.key_id = key_id(keys[0]).decode()
        self._head = VERSION + key_id(keys[0]) + b":"

    def sign(self, body: bytes) -> bytes:
        """``body`` (an envelope's JSON) in its signed form."""
        return b"%b%b:%b" % (self._head, self._key.mac(body), body)

    def verify(self, signed: bytes) -> bytes:
        """The envelope's JSON inside ``signed``, once its MAC is checked.

        Raises:
            SignatureError: no signature, a key id naming no secret held
                here, or a MAC that does not match the bytes (tampered or forged).
        """
        if not signed.startswith(VERSION) or signed[_BODY_AT - 1:_BODY_AT] != b":":
            raise SignatureError("missing", "", "the job carries no signature")
        named = signed[len(VERSION):_MAC_AT - 1]
        key = self._keys.get(named)
        if key is None:
            raise SignatureError("unknown key", named.decode(errors="replace"),
                                 f"signed with key {named.decode(errors='replace')!r}, "
                                 "not a secret this worker holds")
        body = signed[_BODY_AT:]
        if not hmac.compare_digest(key.mac(body), signed[_MAC_AT:_BODY_AT - 1]):
            raise SignatureError("invalid", named.decode(), "the MAC does not match the body "
                                 "(tampered with, or forged)")
        return body


def unsigned(body: bytes) -> bytes:
    """The envelope's JSON of ``body``, a signature (if any) cut off unchecked.

    What a worker without a secret runs: signed bodies too, as it runs unsigned ones.
    """
    if body.startswith(VERSION) and body[_BODY_AT - 1:_BODY_AT] == b":":
        return body[_BODY_AT:]
    return body


def signed_with(body: bytes) -> str:
    """The key id a body names ("" if it carries no signature); nothing is checked."""
    if body.startswith(VERSION) and body[_BODY_AT - 1:_BODY_AT] == b":":
        return body[len(VERSION):_MAC_AT - 1].decode(errors="replace")
    return ""


def from_settings(settings: Settings) -> Signer | None:
    """The signer for ``settings``, or None when no secret is configured.

    Reads ``secret_file`` if set: build one per process or client, not per job.
    """
    secrets = signing_secrets(settings)
    return Signer(secrets) if secrets else None
