"""Hard time limits: jobs of a runner with ``time_limit`` run in processes of their own."""

from __future__ import annotations

import os
import signal
from contextlib import suppress
from pathlib import Path

import pytest
from conftest import Workers, wait_until
from ops_runners import Limited, LimitedBroken, LimitedFan, Spinner

import packmule
from packmule import RunFailed
from packmule.backends import backends


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
    assert Limited("within", time_limit=30).run(0.1) == 0.1  # an option like the others
    LimitedFan("fan", time_limit=30).run_async(3)
    wait_until(lambda: LimitedFan("fan").update_progress().finished, what="the fan-out run's end")
    assert LimitedFan("fan").get_return_value() == 3.0
    pids = {int(line) for line in _lines(executions)}
    assert len(_lines(executions)) == 4 and worker.pid not in pids and len(pids) == 4


def test_a_job_raising_in_its_own_process_is_retried_then_buried(
        env: dict[str, str], workers: Workers) -> None:
    workers.start("ops_runners")
    with pytest.raises(RunFailed, match="ValueError: job 1 is broken") as caught:
        LimitedBroken("raising").run()
    assert "raise ValueError" in caught.value.traceback  # the user's frame, from the job process
    progress = LimitedBroken("raising").update_progress()
    assert (progress.completed, progress.failed) == (2, 1)
    wait_until(lambda: (stats := backends().queue.tube_stats(0, env["PACKMULE_TUBE"]))
               .get("current-jobs-buried") == 1 and stats.get("current-jobs-reserved") == 0,
               what="the failed job buried by its worker")


def test_a_job_holding_its_gil_past_its_ttr_is_not_handed_out_twice(
        executions: Path, workers: Workers) -> None:
    workers.start("ops_runners", 2)
    seconds = Spinner("gil").run(3.0)
    assert seconds >= 3  # one match held the GIL longer than the job's time-to-run (2 s)
    assert len(_lines(executions)) == 1


def test_time_limit_is_checked_like_the_other_options(env: dict[str, str]) -> None:
    for bad in (0, -1, "soon", True, 2**31):
        with pytest.raises(packmule.ConfigurationError, match="time_limit"):
            Limited("bad", time_limit=bad)
    assert Limited("good", time_limit=0.5).time_limit == 0.5


def test_a_worker_whose_fork_server_died_hands_the_job_back_and_stops(
        executions: Path, workers: Workers) -> None:
    [first] = workers.start("ops_runners")
    fork_server = wait_until(lambda: _children(first.pid), what="the worker's fork server")
    assert isinstance(fork_server, set) and len(fork_server) == 1
    os.kill(fork_server.pop(), signal.SIGKILL)
    Limited("orphan").run_async(0.1)
    assert first.wait(timeout=30) == 1  # stopped, to be restarted
    assert Limited("orphan").update_progress().failed == 0
    workers.start("ops_runners")
    wait_until(lambda: Limited("orphan").update_progress().finished, what="the run's end")
    assert Limited("orphan").get_return_value() == 0.1


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        with suppress(OSError):
            if entry.name.isdigit() and int(
                    (entry / "stat").read_text().rpartition(")")[2].split()[1]) == pid:
                found.add(int(entry.name))
    return found
