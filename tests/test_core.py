"""End-to-end behaviour of Runner over real servers and real worker processes."""

from __future__ import annotations

from typing import Any

from conftest import Workers
from runners import Adder, Empty


def test_run_blocks_and_returns_the_sum(env: dict[str, str], workers: Workers) -> None:
    workers.start("runners", 2)
    assert Adder("sum").run(50) == sum(range(50))
    progress = Adder("sum").update_progress()
    assert (progress.completed, progress.total, progress.state) == (51, 51, "done")
    assert str(progress) == "51 / 51"


def test_zero_jobs_finish_at_once_without_workers(env: dict[str, Any]) -> None:
    assert Empty("none").run() == 0
