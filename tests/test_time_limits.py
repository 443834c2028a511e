"""Hard time limits: jobs of a runner with ``time_limit`` run in processes of their own."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Workers, wait_until
from ops_runners import Limited, LimitedFan, Spinner

import packmule
from packmule import RunFailed


@pytest.fixture
def executions(env: dict[str, str], tmp_path: Path) -> Path:
    """A file the test runners append a line to per execution, named in the workers' env."""
    path = tmp_path / "executions"
    env["PACKMULE_TEST_EXEC_FILE"] = str(path)
    return path


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_a_job_past_its_limit_is_stopped_retried_and_fails_its_run_naming_the_limit(
        executions: Path, workers: Workers) -> None:
    workers.start("ops_runners")
    with pytest.raises(RunFailed) as caught:
        Limited("past").run(30)
    assert "TimeLimitExceeded" in str(caught.value)
    assert "nap() of run" in str(caught.value) and "time limit of 2 s" in str(caught.value)
    assert len(_lines(executions)) == 2  # the first attempt and its one retry, each stopped
    assert Limited("past").update_progress().failed == 1


def test_jobs_within_their_limit_run_fan_out_and_aggregate_in_their_own_processes(
        executions: Path, workers: Workers) -> None:
    [worker] = workers.start("ops_runners")
    assert Limited("within").run(0.1) == 0.1
    LimitedFan("fan").run_async(3)
    wait_until(lambda: LimitedFan("fan").update_progress().finished, what="the fan-out run's end")
    assert LimitedFan("fan").get_return_value() == 3.0
    pids = {int(line) for line in _lines(executions)}
    assert len(_lines(executions)) == 4 and worker.pid not in pids and len(pids) == 4


def test_a_job_holding_its_gil_past_its_ttr_is_not_handed_out_twice(
        executions: Path, workers: Workers) -> None:
    workers.start("ops_runners", 2)
    seconds = Spinner("gil").run(5.0)
    assert seconds > 2  # the match held the GIL longer than the job's time-to-run
    assert len(_lines(executions)) == 1


def test_time_limit_is_checked_like_the_other_options(env: dict[str, str]) -> None:
    for bad in (0, -1, "soon", True, 2**31):
        with pytest.raises(packmule.ConfigurationError, match="time_limit"):
            Limited("bad", time_limit=bad)
    assert Limited("good", time_limit=0.5).time_limit == 0.5
