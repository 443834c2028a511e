"""A recursive runner: each job enqueues two more and defers their sum.

    packmule worker --import fibonacci_runner   # with examples/ on PYTHONPATH
    python examples/fibonacci_runner.py 15      # prints 610
"""

from __future__ import annotations

import sys
from typing import Any

from packmule import Runner


class FibonacciRunner(Runner):
    """fib(n) computed by a tree of jobs joined by nested deferred results."""

    def run(self, n: int = 15) -> Any:
        return self.enqueue("fib", n)

    def fib(self, n: int) -> Any:
        if n < 2:
            return n
        children = [self.enqueue("fib", n - 1), self.enqueue("fib", n - 2)]
        return self.deferred_result("add", children)

    def add(self, values: list[int]) -> int:
        return sum(values)


if __name__ == "__main__":
    print(FibonacciRunner("example").run(int(sys.argv[1]) if len(sys.argv) > 1 else 15))
