"""Runners whose jobs misbehave at the edges; workers import this module by name.

``PACKMULE_TEST_FIX_FILE``: while this file is absent, the bad jobs stay bad;
once it exists they return a plain value, so a kick resumes their run.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path
from typing import Any

from packmule import Runner


def _fixed() -> bool:
    path = os.environ.get("PACKMULE_TEST_FIX_FILE")
    return bool(path) and Path(path).exists()


class Edgy(Runner):
    """``run(kind)``: two good jobs and one job that goes wrong the way ``kind`` says.

    No retries and the shortest time-to-run, so a failure is prompt.
    """

    time_to_run = 2
    max_retries = 0

    def run(self, kind: str, size: int = 0) -> Any:
        jobs = [self.enqueue("good", 1), self.enqueue("bad", kind, size), self.enqueue("good", 2)]
        return self.deferred_result("total", jobs)

    def good(self, value: int) -> int:
        return value

    def bad(self, kind: str, size: int) -> Any:
        if _fixed():
            return 10
        return BAD[kind](size)

    def total(self, values: list[Any]) -> int:
        return sum(values)


def _recurse(depth: int) -> int:
    return _recurse(depth + 1) + 1


class Unprintable(Exception):
    """An exception whose text itself raises."""

    def __str__(self) -> str:
        raise RuntimeError("no text for you")


def _raise(error: BaseException) -> Any:
    raise error


BAD: dict[str, Any] = {
    "big": lambda size: "x" * size,  # over memcached's item size
    "set": lambda size: {1, 2},  # JSON cannot carry it
    "datetime": lambda size: datetime.datetime(2024, 1, 1),
    "exit": lambda size: sys.exit(3),
    "keyboard": lambda size: _raise(KeyboardInterrupt()),
    "recursion": lambda size: _recurse(0),
    "memory": lambda size: _raise(MemoryError()),
    "unprintable": lambda size: _raise(Unprintable()),
    "boom": lambda size: _raise(ValueError("boom")),
    "fine": lambda size: 10,
}


class BadlyHandled(Edgy):
    """``handle_error`` supplies a value JSON cannot carry: the error path itself fails."""

    def handle_error(self, exc: BaseException, method: str, args: list[Any]) -> Any:
        return {"not", "json"}


class ExitingHandler(Edgy):
    """``handle_error`` itself exits."""

    def handle_error(self, exc: BaseException, method: str, args: list[Any]) -> Any:
        sys.exit(4)


class Scattered(Runner):
    """An aggregate over every other job: its dependency list is all single-job ranges."""

    def run(self, count: int) -> Any:
        jobs = self.enqueue_each("square", range(count))
        return self.deferred_result("total", jobs[::2])

    def square(self, number: int) -> int:
        return number * number

    def total(self, values: list[int]) -> int:
        return sum(values)
