"""`JobRef`: the handle `enqueue` and `deferred_result` return."""

from __future__ import annotations

from dataclasses import dataclass, field


# slots: an enqueue_each of a million keeps a million. init=False: the dataclass's own
# __init__ of a frozen class sets each field through object.__setattr__, which costs
# three times what the slots' own setters below do (a loop of enqueues makes one a call).
@dataclass(frozen=True, slots=True, init=False)
class JobRef:
    """A job of a run: its packmule number and the beanstalkd server it went to.

    The number is packmule's own (beanstalkd ids restart at 1 when a server
    restarts without a binlog, and are unique only per server), allocated per
    run from 1; the run's own root job is number 0. It survives retries and
    server restarts.

    Attributes:
        number: the job's number within its run.
        server: ``host:port`` of the beanstalkd server holding it ("" for an
            aggregate that runs in the caller's process).
        run: the id of the run the job belongs to.
        batch: the enqueue batch the job was counted in (see aggregate.py).
    """

    number: int
    server: str
    run: str = field(default="", repr=False, compare=True)
    batch: str = field(default="", repr=False, compare=False)

    def __init__(self, number: int, server: str, run: str = "", batch: str = "") -> None:
        _set_number(self, number)
        _set_server(self, server)
        _set_run(self, run)
        _set_batch(self, batch)

    def __repr__(self) -> str:
        return f"JobRef({self.number}, {self.server!r})"

    def to_json(self) -> list[object]:
        """A JSON-encodable form, for return values and records."""
        return ["JobRef", self.number, self.server, self.run, self.batch]

    @classmethod
    def from_json(cls, value: object) -> JobRef | None:
        """The JobRef encoded by :meth:`to_json`, or None if ``value`` is not one."""
        if isinstance(value, list) and len(value) == 5 and value[0] == "JobRef":
            _, number, server, run, batch = value
            return cls(int(number), str(server), str(run), str(batch))
        return None


# The slots' setters, which the frozen class's __setattr__ does not pass through.
_set_number, _set_server, _set_run, _set_batch = (
    vars(JobRef)[name].__set__ for name in ("number", "server", "run", "batch"))
