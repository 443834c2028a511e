"""packmule's own markers in values: MISSING and Failure, and how they travel as JSON.

An ``allow_failures`` aggregate receives :class:`Failure` in a failed job's
slot, a non-halting one :data:`MISSING` in a lost one; whatever it returns
may hold them. They travel as small tagged objects (``{"$packmule":
"Failure", ...}``) and are restored where values reach users (aggregate
values, job arguments, a run's value), so a run's value reads back with
the same types the caller got, never as a string.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MARK = "$packmule"
MARK_BYTES = b'"$packmule"'  # present in an encoded value only if it holds a marker


class _Missing:
    """The type of :data:`MISSING`."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "packmule.MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Any = _Missing()
"""Passed to an aggregate in place of a value memcached lost, when the
runner's ``halt_on_data_loss`` is False. Falsy, and never equal to a value."""


@dataclass(frozen=True)
class Failure:
    """Passed to an ``allow_failures`` aggregate in place of a failed job's value.

    Attributes:
        job: the number of the job that failed.
        traceback: the text of its last traceback.
    """

    job: int
    traceback: str


def to_json(value: Any) -> Any:
    """The JSON form of a marker (the encoder's ``default``); TypeError for any other type."""
    if value is MISSING:
        return {MARK: "MISSING"}
    if isinstance(value, Failure):
        return {MARK: "Failure", "job": value.job, "traceback": value.traceback}
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def restore(value: Any) -> Any:
    """``value`` with the markers' JSON forms turned back into markers (a new value)."""
    if isinstance(value, list):
        return [restore(item) for item in value]
    if not isinstance(value, dict):
        return value
    if value.get(MARK) == "MISSING":
        return MISSING
    if value.get(MARK) == "Failure":
        return Failure(int(value["job"]), str(value["traceback"]))
    return {key: restore(item) for key, item in value.items()}
