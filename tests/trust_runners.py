"""Runners for the signing tests; workers import this module by name.

A job's execution leaves a line in the file it is given, so a test sees
exactly which calls ran, forged ones included.
"""

from __future__ import annotations

from typing import Any

from packmule import Runner


class Marked(Runner):
    """Fans out jobs that each write a line, then sums their numbers in an aggregate."""

    def run(self, path: str, count: int = 3) -> Any:
        jobs = [self.enqueue("mark", path, number) for number in range(count)]
        return self.deferred_result("total", jobs)

    def mark(self, path: str, number: int) -> int:
        with open(path, "a") as out:
            out.write(f"mark {number}\n")
        return number

    def total(self, values: list[int]) -> int:
        return sum(values)


class Nested(Runner):
    """Jobs that fan out and defer inside workers: parked aggregates, chained results."""

    def run(self, depth: int = 3) -> Any:
        return self.enqueue("tree", depth)

    def tree(self, depth: int) -> Any:
        if depth == 0:
            return 1
        return self.deferred_result("add", [self.enqueue("tree", depth - 1) for _ in range(2)])

    def add(self, values: list[int]) -> int:
        return sum(values)
