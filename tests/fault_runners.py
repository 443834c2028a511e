"""Runners for the fault tests; workers import this module by name.

Side effects the tests count go to files named by environment variables
(a test puts them into the ``env`` dict before starting workers):

- ``PACKMULE_TEST_COUNT_FILE``: one ``fired`` line per aggregate call.
- ``PACKMULE_TEST_EXEC_FILE``: one line per execution of a counted job.
- ``PACKMULE_TEST_FIX_FILE``: while this file is absent, "broken" jobs raise.

Importing it installs the crash hook of :mod:`crash_hook` when
``PACKMULE_TEST_CRASH_AT`` is set.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import crash_hook  # noqa: F401  (wraps packmule.execution.record when its variable is set)

from packmule import Failure, Runner


def _append(variable: str, line: str) -> None:
    """Append ``line`` to the file named by ``variable``, if it is set."""
    path = os.environ.get(variable)
    if path:
        with open(path, "a") as out:
            out.write(line + "\n")


def _fixed() -> bool:
    path = os.environ.get("PACKMULE_TEST_FIX_FILE")
    return bool(path) and Path(path).exists()


class Counted(Runner):
    """Fan out ``count`` jobs returning their input, sum them; the aggregate is counted.

    A 2 s time-to-run (the least allowed) so a job whose worker died is handed
    out again quickly.
    """

    time_to_run = 2

    def run(self, count: int = 10, pause: float = 0.0) -> Any:
        jobs = self.enqueue_each("echo", [(i, pause) for i in range(count)])
        return self.deferred_result("total", jobs)

    def echo(self, pair: list[Any]) -> int:
        _append("PACKMULE_TEST_EXEC_FILE", f"echo {pair[0]}")
        if pair[1]:
            time.sleep(pair[1])
        return int(pair[0])

    def total(self, values: list[int]) -> int:
        _append("PACKMULE_TEST_COUNT_FILE", "fired")
        return sum(values)

    def _secret(self, text: str) -> str:
        """Private: never callable as a job, not even by a forged envelope."""
        _append("PACKMULE_TEST_EXEC_FILE", f"secret {text}")
        return text


class LongJob(Runner):
    """One job that runs for several times its time-to-run."""

    time_to_run = 2

    def run(self, seconds: float = 6.0) -> Any:
        return self.deferred_result("first", [self.enqueue("long", seconds)])

    def long(self, seconds: float) -> float:
        _append("PACKMULE_TEST_EXEC_FILE", f"long {os.getpid()}")
        time.sleep(seconds)
        return seconds

    def first(self, values: list[float]) -> float:
        _append("PACKMULE_TEST_COUNT_FILE", "fired")
        return values[0]


class Flaky(Runner):
    """Jobs ``0..count-1``; job ``broken`` raises until the fix file exists."""

    time_to_run = 2
    max_retries = 0

    def run(self, count: int = 5, broken: int = 2) -> Any:
        jobs = self.enqueue_each("maybe", range(count), broken)
        return self.deferred_result("total", jobs)

    def maybe(self, number: int, broken: int) -> int:
        _append("PACKMULE_TEST_EXEC_FILE", f"maybe {number}")
        if number == broken and not _fixed():
            raise ValueError(f"job {number} is broken")
        return number

    def total(self, values: list[int]) -> int:
        _append("PACKMULE_TEST_COUNT_FILE", "fired")
        return sum(values)


class Handled(Flaky):
    """A failing job's value comes from ``handle_error``."""

    def handle_error(self, exc: BaseException, method: str, args: list[Any]) -> Any:
        return 1000 + int(args[0])


class Tolerant(Flaky):
    """The aggregate accepts failures and receives ``packmule.Failure`` in their slots."""

    def run(self, count: int = 5, broken: int = 2) -> Any:
        jobs = self.enqueue_each("maybe", range(count), broken)
        return self.deferred_result("summary", jobs, allow_failures=True)

    def summary(self, values: list[Any]) -> list[Any]:
        _append("PACKMULE_TEST_COUNT_FILE", "fired")
        return values


class TolerantInWorker(Tolerant):
    """Same as Tolerant, but the aggregate runs in a worker: failures become text."""

    def summary(self, values: list[Any]) -> list[Any]:
        _append("PACKMULE_TEST_COUNT_FILE", "fired")
        return [f"failed {v.job}: {v.traceback.strip().splitlines()[-1]}"
                if isinstance(v, Failure) else v for v in values]


class Straggler(Runner):
    """Its aggregate fires while its last job is still running, as after a redelivery.

    A job that runs twice counts twice in its batch's completion counter, so
    the counter can reach the batch's size while another job of the batch is
    still running. ``run`` makes that happen on purpose: once the quick jobs
    recorded their values it adds the twin's count itself, then registers the
    aggregate, which fires at once; the gated job finishes only once the
    file ``gate`` exists. The aggregate must still get every value.
    """

    time_to_run = 2

    def run(self, gate: str) -> Any:
        jobs = [self.enqueue("quick", 1), self.enqueue("quick", 2), self.enqueue("gated", 3, gate)]
        assert self._context is not None
        scope = self._context.scope
        store = scope.backends.store
        deadline = time.monotonic() + 20
        while len(store.get_many([scope.keys.job(ref.number) for ref in jobs[:2]])) < 2:
            assert time.monotonic() < deadline, "the quick jobs never finished"
            time.sleep(0.01)
        store.incr(scope.keys.batch_done(jobs[0].batch))  # the twin's count
        return self.deferred_result("total", jobs)

    def quick(self, value: int) -> int:
        return value

    def gated(self, value: int, gate: str) -> int:
        deadline = time.monotonic() + 20
        while not Path(gate).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return value

    def total(self, values: list[int]) -> int:
        _append("PACKMULE_TEST_COUNT_FILE", "fired")
        return sum(values)
