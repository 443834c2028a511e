"""Runners for the tests of runs that must end, and end right; workers import this module."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pause_hook  # noqa: F401  (holds a re-park when its variable is set)

from packmule import JobRef, Runner


def _wait_for(condition: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class Chain(Runner):
    """A chain of ``depth`` jobs, each returning the next one's JobRef; the last returns ``bottom``."""

    max_retries = 0

    def run(self, depth: int, bottom: Any = "bottom") -> Any:
        return self.enqueue("step", depth, bottom)

    def step(self, n: int, bottom: Any) -> Any:
        if n > 0:
            return self.enqueue("step", n - 1, bottom)
        if bottom == "raise":
            raise ValueError("the bottom of the chain is broken")
        return bottom


class ChainStraggler(Runner):
    """A chain whose source batch is counted complete (a twin count) before its source finished.

    ``head`` enqueues a quick job and a gated one in one batch, waits until
    the quick one recorded its value, adds the count a redelivered twin would
    add, writes the batch's name to ``note`` and returns the gated job's
    JobRef: the chain sees its batch complete while the gated job still runs.
    """

    time_to_run = 2

    def run(self, gate: str, note: str) -> Any:
        return self.enqueue("head", gate, note)

    def head(self, gate: str, note: str) -> JobRef:
        quick, gated = self.enqueue("quick", 1), self.enqueue("gated", 2, gate)
        assert self._context is not None
        scope = self._context.scope
        store = scope.backends.store
        _wait_for(lambda: store.get(scope.keys.job(quick.number)) is not None, "the quick job")
        store.incr(scope.keys.batch_done(gated.batch))  # the twin's count
        Path(note).write_text(gated.batch)
        return gated

    def quick(self, value: int) -> int:
        return value

    def gated(self, value: int, gate: str) -> int:
        _wait_for(lambda: Path(gate).exists(), "the gate")
        return value


class Diverging(Runner):
    """A job whose first attempt enqueues, defers, then raises; its retry enqueues differently."""

    time_to_run = 2
    max_retries = 1

    def run(self, marker: str) -> Any:
        return self.enqueue("fan", marker)

    def fan(self, marker: str) -> JobRef:
        first = self.enqueue("value", 1)
        if not Path(marker).exists():
            Path(marker).write_text("first attempt")
            self.deferred_result("total", [first])
            raise RuntimeError("the first attempt fails after enqueueing")
        second = self.enqueue("value", 10)
        return self.deferred_result("total", [first, second])  # type: ignore[no-any-return]

    def value(self, value: int) -> int:
        return value

    def total(self, values: list[int]) -> int:
        return sum(values) + 100


class FlakyPlusOne(Runner):
    """Like fault_runners.Flaky, but run() goes on after its aggregate: not resumable by a kick."""

    max_retries = 0

    def run(self, count: int = 5, broken: int = 2) -> Any:
        jobs = self.enqueue_each("maybe", range(count), broken)
        return self.deferred_result("total", jobs) + 1

    def maybe(self, number: int, broken: int) -> int:
        fix = os.environ.get("PACKMULE_TEST_FIX_FILE", "")
        if number == broken and not Path(fix).exists():
            raise ValueError(f"job {number} is broken")
        return number

    def total(self, values: list[int]) -> int:
        return sum(values)


class ReturnsASet(Runner):
    """run() returns a value JSON cannot carry."""

    def run(self) -> Any:
        return {1, 2, 3}


class KeepsFailures(Runner):
    """An allow_failures aggregate in the caller; run() returns the values, markers included."""

    max_retries = 0

    def run(self, count: int = 4, broken: int = 1) -> Any:
        jobs = self.enqueue_each("maybe", range(count), broken)
        return self.deferred_result("values", jobs, allow_failures=True)

    def maybe(self, number: int, broken: int) -> int:
        if number == broken:
            raise ValueError(f"job {number} is broken")
        return number

    def values(self, values: list[Any]) -> list[Any]:
        return values


class FlakyChain(Runner):
    """A chain whose step ``broken`` raises until the fix file exists."""

    max_retries = 0

    def run(self, depth: int, broken: int) -> Any:
        return self.enqueue("step", depth, broken)

    def step(self, n: int, broken: int) -> Any:
        fix = os.environ.get("PACKMULE_TEST_FIX_FILE", "")
        if n == broken and not Path(fix).exists():
            raise ValueError(f"step {n} is broken")
        return self.enqueue("step", n - 1, broken) if n > 0 else "bottom"


class LateAggregate(Runner):
    """run() enqueues a job that fails for good, and defers on it only once the file
    ``go`` exists: the run has failed (and may be purged or cancelled) by then."""

    max_retries = 0

    def run(self, go: str) -> Any:
        jobs = [self.enqueue("boom")]
        _wait_for(lambda: Path(go).exists(), "the test's go-ahead")
        return self.deferred_result("total", jobs)

    def boom(self) -> int:
        raise ValueError("boom")

    def total(self, values: list[int]) -> int:
        return sum(values)
