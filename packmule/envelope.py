"""The job message on beanstalkd, and the strict JSON used for every value.

A job body is one JSON object (the *envelope*). Decoding checks its shape
and refuses anything else with :class:`DecodeError`, so a foreign or
corrupt job is buried with a reason instead of being half-executed.
JSON only: no pickle, no eval. ``NaN`` and infinities are refused because
JSON has no spelling for them and a silent ``null`` would be a wrong value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from packmule import markers
from packmule.errors import DecodeError, EncodeError

if TYPE_CHECKING:
    from packmule.signing import Signer

FORMAT = 1
# One encoder for every value: json.dumps with options builds a new encoder per call.
# Its default is called only for what JSON has no type for: packmule's markers pass.
_STRICT = json.JSONEncoder(allow_nan=False, separators=(",", ":"), default=markers.to_json)


@dataclass
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


def stamp(when: float) -> bytes:
    """``when`` (epoch seconds) as a body's ``enqueued`` value: milliseconds are enough."""
    return b"%.3f" % when


def dumps(value: Any, *, what: str = "value") -> bytes:
    """Encode ``value`` as strict JSON bytes.

    Raises:
        EncodeError: naming ``what`` and the reason (a type JSON cannot carry,
            NaN or infinity, a circular reference).
    """
    try:
        return _STRICT.encode(value).encode()
    except (TypeError, ValueError) as err:
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
        return _STRICT.encode(args).encode()
    except (TypeError, ValueError) as err:
        check_args(method, args)  # names the argument at fault
        raise EncodeError(f"arguments of {method}() cannot be encoded as JSON: {err}") from err


class BodyTemplate:
    """The bodies of jobs that differ only in their number and arguments.

    An enqueue_each of thousands of jobs would otherwise encode the runner,
    run, options and the rest again for every job, and its arguments twice
    (once to refuse a bad value before anything is counted, once in the
    body). This encodes the shared fields once and splices in each job's
    number and its already encoded arguments. The bytes are those of the
    whole envelope as one JSON object, ``{"packmule": FORMAT, **fields}``
    (a test holds them equal), signed when a signer is given: every job body
    is made here, so none leaves unsigned (see :mod:`packmule.signing`).
    """

    def __init__(self, envelope: Envelope, *, signer: Signer | None = None) -> None:
        """Fields shared by the jobs; ``envelope.job`` and ``envelope.args`` are ignored."""
        e, what = envelope, f"job {envelope.method}"
        head = dumps({"packmule": FORMAT, "runner": e.runner, "name": e.name, "run": e.run},
                     what=what)
        middle = dumps({"batch": e.batch, "method": e.method}, what=what)
        tail = dumps({"options": e.options, "aggregate": e.aggregate, "kwargs": e.kwargs,
                      "lease": e.lease}, what=what)
        self._head = head[:-1] + b',"job":'
        self._middle = b"," + middle[1:-1] + b',"args":'
        self._tail = b"," + tail[1:-1] + b',"enqueued":'
        self._enqueued = dumps(e.enqueued)
        self._signer = signer
        self._fixed = (len(self._head) + len(self._middle) + len(self._tail) + len(b"}")
                       + (0 if signer is None else len(signer.sign(b""))))  # its prefix

    def body(self, number: int, args: bytes, enqueued: bytes = b"") -> bytes:
        """The body of job ``number``; ``args`` from :func:`encode_args`, signed if a signer is set.

        ``enqueued`` is the put's time from :func:`stamp` (one per call, as a
        template serves many calls); by default the template envelope's.
        """
        body = b"%b%d%b%b%b%b}" % (self._head, number, self._middle, args, self._tail,
                                   enqueued or self._enqueued)
        return body if self._signer is None else self._signer.sign(body)

    def size(self, number: int, args: bytes, enqueued: bytes = b"") -> int:
        """``len(self.body(number, args, enqueued))``, without building (or signing) the body."""
        return self._fixed + len(str(number)) + len(args) + len(enqueued or self._enqueued)


_FIELD_TYPES = {
    "runner": str,
    "name": str,
    "run": str,
    "job": int,
    "batch": str,
    "method": str,
    "args": list,
    "options": dict,
    "aggregate": bool,
    "kwargs": dict,
    "lease": int,
}
# Fields added since format 1 began: a body without them still decodes (a job
# enqueued by an older packmule, drained by a newer worker), with the default.
_OPTIONAL_FIELDS: dict[str, tuple[type, ...]] = {"enqueued": (float, int)}


def decode(body: bytes) -> Envelope:
    """Decode a job body, refusing anything packmule did not write.

    Raises:
        DecodeError: the body is not JSON, not an object, of another format
            version, or has a missing or mistyped field (named).
    """
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise DecodeError(f"job body is not JSON packmule can read: {err!r}") from err
    if not isinstance(data, dict) or data.get("packmule") != FORMAT:
        raise DecodeError("job body is not a packmule envelope (format 1)")
    for name, kind in _FIELD_TYPES.items():
        if not isinstance(data.get(name), kind):
            raise DecodeError(f"job envelope field {name!r} is missing or not a {kind.__name__}")
    if ":" not in data["runner"]:
        raise DecodeError(f"job envelope runner {data['runner']!r} is not 'module:Class'")
    optional = {}
    for name, kinds in _OPTIONAL_FIELDS.items():
        if name in data:
            if not isinstance(data[name], kinds) or isinstance(data[name], bool):
                raise DecodeError(f"job envelope field {name!r} is not a number")
            optional[name] = data[name]
    if markers.MARK_BYTES in body:
        data["args"], data["kwargs"] = markers.restore(data["args"]), markers.restore(data["kwargs"])
    return Envelope(**{name: data[name] for name in _FIELD_TYPES}, **optional)
