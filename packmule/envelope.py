"""The job message on beanstalkd, and the strict JSON used for every value.

A job body (format 2) is two lines: the *head*, one JSON object with what
the jobs of one call share (runner, run, batch, method, options...), then
the job's own number, the time it was put and its arguments as a JSON
array::

    {"packmule":2,"runner":"app.jobs:Reindex","name":"nightly",...}
    17 1796028235.782 ["doc-17"]

A worker decodes each distinct head once and keeps it (:func:`decode`):
for the thousands of jobs of a fan-out only the second line is new, so a
job costs a worker a split, two numbers and a small JSON array, not a whole
envelope's JSON and its checks. The head's JSON has no raw newline (JSON
escapes them), so the first newline ends it. Bodies of format 1 (one JSON
object, written by earlier packmule versions) are still read.

Decoding checks the shape and refuses anything else with
:class:`DecodeError`, so a foreign or corrupt job is buried with a reason
instead of being half-executed. JSON only: no pickle, no eval. ``NaN`` and
infinities are refused because JSON has no spelling for them and a silent
``null`` would be a wrong value.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from json.encoder import (  # type: ignore[attr-defined]
    c_make_encoder,
    encode_basestring,
    encode_basestring_ascii,
)
from typing import TYPE_CHECKING, Any

from packmule import markers
from packmule.errors import DecodeError, EncodeError

if TYPE_CHECKING:
    from packmule.signing import Signer

FORMAT = 2  # what bodies are written in; format 1 is still read
# One encoder for every value: json.dumps with options builds a new encoder per call.
# Its default is called only for what JSON has no type for: packmule's markers pass.
_STRICT = json.JSONEncoder(allow_nan=False, separators=(",", ":"), default=markers.to_json)


@dataclass(slots=True)
class Envelope:
    """One job as carried by beanstalkd (not frozen: a worker builds one per job, and
    a frozen dataclass pays for every field it sets).

    Attributes:
        runner: ``module:QualName`` of the runner class.
        name: the run's name (with the class, its identity).
        run: the run id (one per `run`/`run_async`).
        job: the job number within the run (0 = the run's root job).
        batch: the batch the job is counted in.
        method: the runner method to call.
        args: positional arguments, strict JSON.
        options: runner options given to the constructor.
        aggregate: true for an aggregate (its dependencies live in memcached).
        kwargs: keyword arguments (only the root job of `run_async` has them).
        lease: the etcd lease of the run, which its markers are attached to.
        enqueued: when it was put (epoch seconds), for the queue-wait metric; 0
            when unknown (a body written before packmule carried it).
        head: what the jobs sharing this one's head share, decoded once (None
            for a body of format 1): a worker keeps per head what it derives
            from it (the runner class, the run's scope).
    """

    runner: str
    name: str
    run: str
    job: int
    batch: str
    method: str
    args: list[Any] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    aggregate: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)
    lease: int = 0
    enqueued: float = 0.0
    head: Head | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class Head:
    """The decoded head of a format-2 body: the fields the jobs of one call share.

    Compared and hashed by identity: a worker keeps one per distinct head
    and keys what it derives from it by this object.
    """

    runner: str
    name: str
    run: str
    batch: str
    method: str
    options: dict[str, Any]
    aggregate: bool
    kwargs: dict[str, Any]
    lease: int

    def envelope(self, job: int, args: list[Any], enqueued: float) -> Envelope:
        """The envelope of one job under this head."""
        return Envelope(self.runner, self.name, self.run, job, self.batch, self.method, args,
                        self.options, self.aggregate, self.kwargs, self.lease, enqueued, self)


def stamp(when: float) -> bytes:
    """``when`` (epoch seconds) as a body's ``enqueued`` value: milliseconds are enough."""
    return b"%.3f" % when


# _STRICT's C encoder, made once, without the check for circular references: what
# JSONEncoder.encode does per call around it (a closure, an encoder made with its
# arguments parsed, a dict) costs more than encoding a job's arguments or value.
# A circular reference then ends in RecursionError, and _STRICT is asked again to
# name it. Holding no per-call state, it is safe to share between threads.
_ESCAPE = encode_basestring_ascii if _STRICT.ensure_ascii else encode_basestring  # a str's JSON
_ENCODE = None if c_make_encoder is None else c_make_encoder(
    None, _STRICT.default, _ESCAPE,
    None, _STRICT.key_separator, _STRICT.item_separator, _STRICT.sort_keys, _STRICT.skipkeys,
    _STRICT.allow_nan)


def dumps(value: Any, *, what: str = "value") -> bytes:
    """Encode ``value`` as strict JSON bytes.

    Raises:
        EncodeError: naming ``what`` and the reason (a type JSON cannot carry,
            NaN or infinity, a circular reference, nesting too deep).
    """
    if _ENCODE is not None:
        try:
            return "".join(_ENCODE(value, 0)).encode()
        except (TypeError, ValueError, RecursionError):
            pass  # _STRICT says why (it looks for circular references)
    try:
        return _STRICT.encode(value).encode()
    except (TypeError, ValueError, RecursionError) as err:
        raise EncodeError(f"{what} cannot be encoded as JSON: {err}") from err


def loads(data: bytes) -> Any:
    """Decode JSON bytes written by :func:`dumps`."""
    return json.loads(data)


def check_args(method: str, args: tuple[Any, ...] | list[Any]) -> None:
    """Raise EncodeError naming the first argument of ``method`` JSON cannot carry."""
    for index, arg in enumerate(args):
        dumps(arg, what=f"argument {index} of {method}() ({type(arg).__name__})")


def encode_args(method: str, args: tuple[Any, ...] | list[Any]) -> bytes:
    """``args`` as a JSON array, encoded once: the form a job body carries them in.

    Raises:
        EncodeError: naming the first argument JSON cannot carry, as check_args does.
    """
    try:
        if _ENCODE is None:
            return _STRICT.encode(args).encode()
        return "".join(_ENCODE(args, 0)).encode()
    except (TypeError, ValueError, RecursionError) as err:
        check_args(method, args)  # names the argument at fault
        raise EncodeError(f"arguments of {method}() cannot be encoded as JSON: {err}") from err


def encode_each(method: str, items: Iterable[Any], extra: tuple[Any, ...] = ()) -> list[bytes]:
    """``encode_args(method, (item, *extra))`` of each item, in order: an enqueue_each's jobs.

    For the few arguments of a job, a call costs more than the encoding: the
    arguments all jobs share (``extra``) are encoded once, and each item on
    its own, in comprehensions over blocks of items; an item that is exactly
    an int or a str (the usual fan-out over ids) costs no encoder call. The
    bytes are those of ``encode_args``: a JSON array joins its items with a
    comma.

    Raises:
        EncodeError: as encode_args, for the first item whose arguments JSON
            cannot carry. An error raised by ``items`` itself passes unchanged.
    """
    try:
        tail = encode_args(method, extra)[1:]  # b"]", or the shared arguments and b"]"
    except EncodeError:  # no fast path: each job's own encoding names the argument
        return [encode_args(method, (item, *extra)) for item in items]
    tail = tail if tail == b"]" else b"," + tail
    encoded: list[bytes] = []
    remaining = iter(items)
    while block := list(itertools.islice(remaining, _ENCODE_BLOCK)):
        encoded += _encode_block(method, block, extra, tail)
    return encoded


# Items encoded per comprehension by encode_each: few enough to hold at once.
_ENCODE_BLOCK = 4096


def _encode_block(method: str, block: list[Any], extra: tuple[Any, ...], tail: bytes) -> list[bytes]:
    """The arguments of the jobs of ``block``'s items (see encode_each)."""
    kinds = set(map(type, block))
    try:
        if kinds == {int}:  # not bool, nor an int subclass with its own str()
            return [b"[%d%b" % (item, tail) for item in block]
        if kinds == {str}:
            return [b"[%b%b" % (_ESCAPE(item).encode(), tail) for item in block]
        if _ENCODE is not None:
            join, encoder = "".join, _ENCODE
            return [b"[%b%b" % (join(encoder(item, 0)).encode(), tail) for item in block]
    except (TypeError, ValueError, RecursionError):
        pass  # one job's arguments cannot be encoded: each job's own encoding names them
    return [encode_args(method, (item, *extra)) for item in block]


_BODY = b"%b%d %b %b"  # head (with its newline), number, enqueued, arguments


class BodyTemplate:
    """The bodies of jobs that differ only in their number and arguments.

    An enqueue_each of thousands of jobs would otherwise encode the runner,
    run, options and the rest again for every job, and its arguments twice
    (once to refuse a bad value before anything is counted, once in the
    body). This encodes the head once and writes each job's line after it,
    with its already encoded arguments, signed when a signer is given: every
    job body is made here, so none leaves unsigned (see :mod:`packmule.signing`).
    """

    def __init__(self, envelope: Envelope, *, signer: Signer | None = None) -> None:
        """Fields shared by the jobs; ``envelope.job`` and ``envelope.args`` are ignored."""
        e = envelope
        head: dict[str, Any] = {"packmule": FORMAT, "runner": e.runner, "name": e.name, "run": e.run,
                "batch": e.batch, "method": e.method, "options": e.options, "lease": e.lease}
        # Left out when at their defaults: every byte of a body is copied, logged in
        # beanstalkd's binlog and read again, for each of thousands of jobs.
        if e.aggregate:
            head["aggregate"] = True
        if e.kwargs:
            head["kwargs"] = e.kwargs
        self._head = dumps(head, what=f"job {e.method}") + b"\n"
        self._enqueued = stamp(e.enqueued)
        self._signer = signer
        self._fixed = (len(self._head) + len(b"  ")
                       + (0 if signer is None else len(signer.sign(b""))))  # its prefix

    def body(self, number: int, args: bytes, enqueued: bytes = b"") -> bytes:
        """The body of job ``number``; ``args`` from :func:`encode_args`, signed if a signer is set.

        ``enqueued`` is the put's time from :func:`stamp` (one per call, as a
        template serves many calls); by default the template envelope's.
        """
        body = _BODY % (self._head, number, enqueued or self._enqueued, args)
        return body if self._signer is None else self._signer.sign(body)

    def bodies(self, numbers: Iterable[int], args: Iterable[bytes], enqueued: bytes) -> list[bytes]:
        """``[self.body(n, a, enqueued) for n, a in zip(numbers, args)]``, without a call per body."""
        head = self._head
        bodies = [_BODY % (head, number, enqueued, job_args)
                  for number, job_args in zip(numbers, args, strict=True)]
        return bodies if self._signer is None else [self._signer.sign(body) for body in bodies]

    def size(self, number: int, args: bytes, enqueued: bytes = b"") -> int:
        """``len(self.body(number, args, enqueued))``, without building (or signing) the body."""
        return self._fixed + len(str(number)) + len(args) + len(enqueued or self._enqueued)


# The head's fields and their types (``lease``: an int, not a bool).
_HEAD_TYPES: dict[str, type] = {
    "runner": str, "name": str, "run": str, "batch": str, "method": str,
    "options": dict, "aggregate": bool, "kwargs": dict, "lease": int,
}
_FORMAT_1_FIELDS = ("runner", "name", "run", "job", "batch", "method", "args", "options",
                    "aggregate", "kwargs", "lease")
# Fields added since format 1 began: a body without them still decodes (a job
# enqueued by an older packmule, drained by a newer worker), with the default.
_OPTIONAL_FIELDS: dict[str, tuple[type, ...]] = {"enqueued": (float, int)}


def decode(body: bytes) -> Envelope:
    """Decode a job body, refusing anything packmule did not write.

    A head seen before is not decoded again: its checked fields are kept
    (up to ``HEADS_KEPT`` heads) and the job's line alone is read.

    Raises:
        DecodeError: the body is not one packmule wrote (not JSON, another
            format, a missing or mistyped field, named).
    """
    header, newline, line = body.partition(b"\n")
    if not newline:
        return _decode_format_1(body)
    head = _heads.get(header) or _decode_head(header)
    number, _, rest = line.partition(b" ")
    enqueued, _, args_json = rest.partition(b" ")
    try:
        text = args_json.decode()
        args, end = _ARRAY.raw_decode(text)
        when = float(enqueued)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise DecodeError(f"job body's line {_clip(line)} is not '<job> <enqueued> <JSON "
                          f"arguments>': {err!r}") from err
    if not (number.isdigit() and isinstance(args, list) and end == len(text)
            and math.isfinite(when)):
        raise DecodeError(f"job body's line {_clip(line)} is not '<job> <enqueued> <JSON "
                          "arguments>'")
    if markers.MARK_BYTES in args_json:
        args = markers.restore(args)
    return head.envelope(int(number), args, when)


# raw_decode: json.loads of a few bytes spends more in Python around the scanner than in it.
_ARRAY = json.JSONDecoder()
HEADS_KEPT = 4096
_heads: dict[bytes, Head] = {}  # decoded heads by their bytes (one entry per call enqueuing)


def _decode_head(header: bytes) -> Head:
    """Check and decode a body's head, and keep it for the next jobs with the same one."""
    data = _json_object(header)
    if data.get("packmule") != FORMAT:
        raise DecodeError(f"job body is not a packmule envelope (format {FORMAT}, or 1)")
    data.setdefault("aggregate", False)
    data.setdefault("kwargs", {})
    _check_fields(data, _HEAD_TYPES)
    kwargs = markers.restore(data["kwargs"]) if markers.MARK_BYTES in header else data["kwargs"]
    head = Head(data["runner"], data["name"], data["run"], data["batch"], data["method"],
                data["options"], data["aggregate"], kwargs, data["lease"])
    if len(_heads) >= HEADS_KEPT:
        _heads.clear()
    _heads[header] = head
    return head


def _decode_format_1(body: bytes) -> Envelope:
    """A body of format 1: the whole envelope as one JSON object."""
    data = _json_object(body)
    if data.get("packmule") != 1:
        raise DecodeError(f"job body is not a packmule envelope (format {FORMAT}, or 1)")
    _check_fields(data, {**_HEAD_TYPES, "job": int, "args": list})
    optional = {}
    for name, kinds in _OPTIONAL_FIELDS.items():
        if name in data:
            if not isinstance(data[name], kinds) or isinstance(data[name], bool):
                raise DecodeError(f"job envelope field {name!r} is not a number")
            optional[name] = data[name]
    if markers.MARK_BYTES in body:
        data["args"], data["kwargs"] = markers.restore(data["args"]), markers.restore(data["kwargs"])
    return Envelope(**{name: data[name] for name in _FORMAT_1_FIELDS}, **optional)


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        decoded = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise DecodeError(f"job body is not JSON packmule can read: {err!r}") from err
    if not isinstance(decoded, dict):
        raise DecodeError(f"job body is not a packmule envelope (format {FORMAT}, or 1)")
    return decoded


def _check_fields(data: dict[str, Any], types: dict[str, type]) -> None:
    for name, kind in types.items():
        value = data.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise DecodeError(f"job envelope field {name!r} is missing or not a {kind.__name__}")
    if ":" not in data["runner"]:
        raise DecodeError(f"job envelope runner {data['runner']!r} is not 'module:Class'")


def _clip(line: bytes) -> str:
    return repr(line[:80]) + ("..." if len(line) > 80 else "")
