"""A job's outcome as recorded in memcached, and the markers aggregates receive."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from packmule.envelope import dumps, loads
from packmule.markers import MARK_BYTES, MISSING, Failure, restore

__all__ = ["MISSING", "Failure", "Outcome"]


@dataclass(slots=True)
class Outcome:
    """How a job ended: with a value, or failed.

    Never changed once made (``dataclasses.replace`` makes another), but not
    frozen: every job makes one, and a frozen dataclass costs five times as
    much to make.

    Attributes:
        ok: True for a value.
        value: the value (JSON) when ok.
        job: for a failure, the job that failed first (itself, or a dependency).
        traceback: for a failure, the text of the traceback or of the loss.
        own: for a failure, True when this job itself raised (counted failed);
            False when the failure came from a dependency.
        lost: True when the failure is memcached having lost state.
        lost_jobs: for a loss, numbers of the jobs whose state was lost.
        method: for a failure, the method of the job that failed (for messages).
    """

    ok: bool
    value: Any = None
    job: int = 0
    traceback: str = ""
    own: bool = False
    lost: bool = False
    lost_jobs: tuple[int, ...] = ()
    method: str = ""

    @classmethod
    def done(cls, value: Any) -> Outcome:
        """A value."""
        return cls(True, value)

    @classmethod
    def failed(cls, job: int, traceback: str, *, own: bool, method: str = "") -> Outcome:
        """A failure of ``job`` (``own``: this very job raised), whose method was ``method``."""
        return cls(False, job=job, traceback=traceback, own=own, method=method)

    @classmethod
    def missing(cls, jobs: list[int], why: str) -> Outcome:
        """A loss of state in memcached, naming the jobs concerned."""
        return cls(False, traceback=why, lost=True, lost_jobs=tuple(jobs[:100]))

    def encode(self, *, what: str = "return value") -> bytes:
        """Record form; raises EncodeError naming ``what`` if the value is not JSON."""
        if self.ok:
            return dumps({"v": self.value}, what=what)
        return dumps({"f": self.job, "tb": self.traceback, "own": self.own,
                      "lost": list(self.lost_jobs) if self.lost else None, "m": self.method})

    @classmethod
    def decode(cls, data: bytes) -> Outcome:
        """The outcome a record holds (packmule's markers in its value restored)."""
        outcome = cls.from_record(loads(data))
        if outcome.ok and MARK_BYTES in data:
            return cls(True, restore(outcome.value))
        return outcome

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Outcome:
        """The outcome of a decoded record (see :meth:`encode`)."""
        if "v" in record:
            return cls(True, record["v"])
        lost = record.get("lost")
        return cls(False, job=record["f"], traceback=record["tb"], own=record["own"],
                   lost=lost is not None, lost_jobs=tuple(lost or ()), method=record.get("m", ""))
