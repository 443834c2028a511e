"""Runners for the operations tests (registry, logs, metrics, time limits); workers import this."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from packmule import Runner


def _wait_for(path: str, timeout: float = 60.0) -> None:
    """Return once ``path`` exists (a test's gate); raise after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {path} never opened")
        time.sleep(0.02)


class Gated(Runner):
    """One job that holds until a gate file exists, and ``count`` quick ones; their sum."""

    def run(self, gate: str, count: int = 3) -> Any:
        jobs = [self.enqueue("hold", gate), *self.enqueue_each("echo", range(count))]
        return self.deferred_result("total", jobs)

    def hold(self, gate: str) -> int:
        _wait_for(gate)
        return 0

    def echo(self, value: int) -> int:
        return value

    def total(self, values: list[int]) -> int:
        return sum(values)


class Broken(Runner):
    """``count`` jobs, of which job ``broken`` raises; no retries."""

    max_retries = 0

    def run(self, count: int = 3, broken: int = 1) -> Any:
        jobs = self.enqueue_each("maybe", range(count), broken)
        return self.deferred_result("total", jobs)

    def maybe(self, number: int, broken: int) -> int:
        if number == broken:
            raise ValueError(f"job {number} is broken")
        return number

    def total(self, values: list[int]) -> int:
        return sum(values)


class Limited(Runner):
    """Jobs under a hard time limit: ``nap`` sleeps, ``spin`` holds the GIL in a regex."""

    time_limit = 2.0
    time_to_run = 2
    max_retries = 1

    def run(self, seconds: float, method: str = "nap") -> Any:
        return self.deferred_result("total", [self.enqueue(method, seconds)])

    def nap(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def spin(self, seconds: float) -> float:
        """A catastrophic regex: the GIL is held in C code for ``seconds`` or so."""
        _count("PACKMULE_TEST_EXEC_FILE")
        started = time.monotonic()
        size = 1
        while time.monotonic() - started < seconds:
            re.match(r"(a+)+$", "a" * size + "b")  # doubles in time with each extra "a"
            size += 1
        return seconds

    def fan(self, count: int) -> list[int]:
        """Enqueues ``count`` jobs from the job's own process and defers their values."""
        return self.deferred_result("gather", self.enqueue_each("nap", [0.0] * count))

    def gather(self, values: list[float]) -> float:
        return sum(values)

    def total(self, values: list[Any]) -> Any:
        return values[0]


def _count(variable: str) -> None:
    path = os.environ.get(variable)
    if path:
        with open(path, "a") as out:
            out.write(f"{os.getpid()}\n")
