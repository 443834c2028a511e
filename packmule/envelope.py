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
from typing import Any

from packmule.errors import DecodeError, EncodeError

FORMAT = 1


@dataclass(frozen=True)
class Envelope:
    """One job as carried by beanstalkd.

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


def dumps(value: Any, *, what: str = "value") -> bytes:
    """Encode ``value`` as strict JSON bytes.

    Raises:
        EncodeError: naming ``what`` and the reason (a type JSON cannot carry,
            NaN or infinity, a circular reference).
    """
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError) as err:
        raise EncodeError(f"{what} cannot be encoded as JSON: {err}") from err


def loads(data: bytes) -> Any:
    """Decode JSON bytes written by :func:`dumps`."""
    return json.loads(data)


def check_args(method: str, args: tuple[Any, ...] | list[Any]) -> None:
    """Raise EncodeError naming the first argument of ``method`` JSON cannot carry."""
    for index, arg in enumerate(args):
        dumps(arg, what=f"argument {index} of {method}() ({type(arg).__name__})")


def encode(envelope: Envelope) -> bytes:
    """The job body for ``envelope``; arguments must already be checked."""
    # vars(), not dataclasses.asdict(): asdict deep-copies the arguments, a
    # third of enqueue_each's time.
    return dumps({"packmule": FORMAT, **vars(envelope)}, what=f"job {envelope.method}")


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
    return Envelope(**{name: data[name] for name in _FIELD_TYPES})
