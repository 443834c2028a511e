"""Runners for tests of run records (tests/test_runs.py)."""

from __future__ import annotations

from typing import Any

from packmule import Runner


class Echo(Runner):
    """A run without jobs that returns its argument."""

    def run(self, value: Any = None) -> Any:
        return value
