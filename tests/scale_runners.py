"""Runners and task functions for tests of many runs (fairness, levels, delays, multi-step).

Workers import this module by name (``--import scale_runners``). Side
effects go to the file named by ``PACKMULE_TEST_EXEC_FILE``, one line each.
"""

from __future__ import annotations

import os
import time
from typing import Any

from packmule import Runner


def _append(line: str) -> None:
    path = os.environ.get("PACKMULE_TEST_EXEC_FILE")
    if path:
        with open(path, "a") as out:
            out.write(line + "\n")


class Logged(Runner):
    """``count`` jobs, each logging ``<name> <index>`` as it runs; the aggregate sums them."""

    def run(self, count: int = 10) -> Any:
        jobs = self.enqueue_each("log", range(count))
        return self.deferred_result("total", jobs)

    def log(self, index: int) -> int:
        _append(f"{self.name} {index}")
        return index

    def total(self, values: list[int]) -> int:
        return sum(values)


class Doomed(Runner):
    """One job that always fails at once (no retries)."""

    max_retries = 0

    def run(self) -> Any:
        return self.deferred_result("first", [self.enqueue("fail")])

    def fail(self) -> None:
        raise ValueError("doomed")

    def first(self, values: list[Any]) -> Any:
        return values[0]


class Later(Runner):
    """One job now and one delayed job; the aggregate returns their values in order."""

    def run(self, seconds: float, started: float) -> Any:
        now = self.enqueue("stamp", "now")
        later = self.enqueue_in(seconds, "stamp", "later")
        return self.deferred_result("both", [now, later], started)

    def stamp(self, label: str) -> list[Any]:
        return [label, time.time()]

    def both(self, values: list[Any], started: float) -> list[Any]:
        return [label for label, _ in values] + [values[1][1] - started]


# Multi-step task functions: plain module-level functions, allow-listed by --import scale_runners.
def square(number: int) -> int:
    _append(f"square {number}")
    return number * number


def broken_square(number: int, broken: int) -> int:
    """Fails for ``broken`` until the file named by ``PACKMULE_TEST_FIX_FILE`` exists."""
    fix = os.environ.get("PACKMULE_TEST_FIX_FILE")
    if number == broken and not (fix and os.path.exists(fix)):
        raise ValueError(f"square of {number} is broken")
    return number * number


def first_step(values: list[int], label: str) -> list[Any]:
    _append(f"step {label}")
    return [sum(values), label]


def then(previous: list[Any], label: str) -> list[Any]:
    _append(f"step {label}")
    return [*previous, label]


def broken_step(previous: Any) -> Any:
    raise RuntimeError("this step is broken")
