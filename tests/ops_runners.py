"""Runners for the operations tests (registry, logs, metrics, time limits); workers import this."""

from __future__ import annotations

import math
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


class Echo(Runner):
    """``count`` jobs returning their input; their sum (the aggregate runs in the caller)."""

    def run(self, count: int = 5) -> Any:
        return self.deferred_result("total", self.enqueue_each("echo", range(count)))

    def echo(self, value: int) -> int:
        return value

    def total(self, values: list[int]) -> int:
        return sum(values)


class Limited(Runner):
    """Jobs under a hard time limit of 2 s, retried once."""

    time_limit = 2
    max_retries = 1

    def run(self, seconds: float) -> Any:
        return self.deferred_result("first", [self.enqueue("nap", seconds)])

    def nap(self, seconds: float) -> float:
        _count("PACKMULE_TEST_EXEC_FILE")
        time.sleep(seconds)
        return seconds

    def fan(self, count: int) -> Any:
        """Fans out from the job's own process and defers the sum there (etcd included)."""
        return self.deferred_result("total", self.enqueue_each("nap", [0.0] * count))

    def total(self, values: list[float]) -> float:
        return float(len(values))

    def first(self, values: list[Any]) -> Any:
        return values[0]


class LimitedFan(Limited):
    """A run_async whose root and fan-out jobs all run in processes of their own."""

    def run(self, count: int) -> Any:  # type: ignore[override]
        return self.enqueue("fan", count)


class Spinner(Runner):
    """A job holding its GIL in a regex longer than its time-to-run, under a generous limit."""

    time_limit = 60
    time_to_run = 2

    def run(self, seconds: float) -> Any:
        return self.deferred_result("first", [self.enqueue("spin", seconds)])

    def spin(self, seconds: float) -> float:
        """One catastrophic regex match of about ``seconds`` (1 to 2 times), GIL held throughout."""
        _count("PACKMULE_TEST_EXEC_FILE")
        size, took = 12, 0.0
        while took < 0.05:  # calibrate: each extra "a" doubles the time
            size += 1
            took = _match_seconds(size)
        size += max(0, math.ceil(math.log2(seconds / took)))
        return _match_seconds(size)

    def first(self, values: list[Any]) -> Any:
        return values[0]


def _match_seconds(size: int) -> float:
    started = time.monotonic()
    re.match(r"(a+)+$", "a" * size + "b")
    return time.monotonic() - started


def _count(variable: str) -> None:
    path = os.environ.get(variable)
    if path:
        with open(path, "a") as out:
            out.write(f"{os.getpid()}\n")
