"""Multi-step tasks: parallel jobs over plain functions, then finalization steps in order.

Real workers (``--import scale_runners``, the module of the task functions),
real servers. A task is a run: its counts are its progress, found by its id.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Workers, wait_until
from scale_runners import Logged, broken_square, broken_step, first_step, square, then

import packmule
from packmule import MultiStepTask
from packmule.backends import backends


@pytest.fixture
def log(env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "log"
    env["PACKMULE_TEST_EXEC_FILE"] = str(path)
    return path


def _ended(task: MultiStepTask, timeout: float = 60) -> MultiStepTask:
    wait_until(lambda: task.finished, timeout=timeout, what=f"task {task.name} to end")
    return task


@pytest.mark.timeout(90)
def test_steps_run_in_order_after_every_parallel_job_each_given_the_previous_value(
        env: dict[str, str], workers: Workers, log: Path) -> None:
    workers.start("scale_runners", 2)
    with MultiStepTask.create("ordered") as task:
        for number in range(10):
            task.add_job(square, number)
        task.add_finalization_job(first_step, "a")
        task.add_finalization_job(then, "b")
        task.add_finalization_job(then, "c")
    found = _ended(MultiStepTask.find(task.id))
    assert found.get_return_value() == [sum(n * n for n in range(10)), "a", "b", "c"]
    assert (found.completed_count, found.failed_count, found.total_job_count) == (13, 0, 13)
    lines = log.read_text().splitlines()
    assert lines[-3:] == ["step a", "step b", "step c"]
    assert sorted(lines[:-3]) == sorted(f"square {n}" for n in range(10))


@pytest.mark.timeout(60)
def test_counts_grow_as_jobs_are_added_and_the_task_waits_for_close(
        env: dict[str, str], workers: Workers, log: Path) -> None:
    task = MultiStepTask.create("counted")
    refs = [task.add_job(square, n) for n in range(4)]
    assert [ref.run for ref in refs] == [task.id] * 4
    assert (task.total_job_count, task.completed_count, task.finished) == (4, 0, False)
    workers.start("scale_runners", 1)
    wait_until(lambda: task.completed_count == 4, timeout=30, what="the parallel jobs")
    assert not task.finished  # not closed: more jobs may come
    task.add_job(square, 4)
    task.close()
    _ended(task)
    assert task.get_return_value() == [0, 1, 4, 9, 16]  # no step: the parallel values
    assert (task.completed_count, task.total_job_count) == (6, 6)
    with pytest.raises(packmule.EnqueueError, match="before close"):
        task.add_job(square, 5)


def test_an_unknown_id_is_a_clear_error(env: dict[str, str]) -> None:
    with pytest.raises(packmule.UnknownRun, match="no multi-step task 'f00d' is known"):
        MultiStepTask.find("f00d")
    assert Logged("plain").run(0) == 0  # a run of another runner is no task
    record = Logged.find("plain")
    assert record is not None
    with pytest.raises(packmule.UnknownRun, match="multi-step task"):
        MultiStepTask.find(record.run)


@pytest.mark.timeout(60)
def test_a_failing_parallel_job_fails_the_task_and_no_step_runs(
        env: dict[str, str], workers: Workers, log: Path) -> None:
    workers.start("scale_runners", 2)
    with MultiStepTask.create("bad-job", max_retries=0) as task:
        for number in range(5):
            task.add_job(broken_square, number, 3)
        task.add_finalization_job(first_step, "never")
    _ended(task)
    assert (task.progress().state, task.failed_count, task.completed_count) == ("failed", 1, 4)
    with pytest.raises(packmule.RunFailed, match="square of 3 is broken") as caught:
        task.get_return_value()
    assert caught.value.job is not None and caught.value.job.number == 4
    assert "step never" not in (log.read_text() if log.exists() else "")


@pytest.mark.timeout(60)
def test_a_failing_step_fails_the_task_after_the_steps_before_it(
        env: dict[str, str], workers: Workers, log: Path) -> None:
    workers.start("scale_runners", 2)
    with MultiStepTask.create("bad-step", max_retries=0) as task:
        task.add_job(square, 2)
        task.add_finalization_job(first_step, "a")
        task.add_finalization_job(broken_step)
        task.add_finalization_job(then, "never")
    _ended(task)
    assert (task.progress().state, task.failed_count, task.completed_count) == ("failed", 1, 2)
    assert task.total_job_count == 4
    with pytest.raises(packmule.RunFailed, match="this step is broken"):
        task.get_return_value()
    assert log.read_text().splitlines() == ["square 2", "step a"]


@pytest.mark.timeout(60)
def test_a_function_outside_the_workers_imports_fails_the_task_naming_its_module(
        env: dict[str, str], workers: Workers, log: Path) -> None:
    workers.start("runners", 1)  # not scale_runners
    with MultiStepTask.create("not-allowed") as task:
        task.add_job(square, 2)
    _ended(task)
    with pytest.raises(packmule.RunFailed, match="--import scale_runners"):
        task.get_return_value()
    assert not log.exists()


def test_only_plain_module_level_functions_are_accepted(env: dict[str, str]) -> None:
    def nested(x: int) -> int:
        return x

    with MultiStepTask.create("refused") as task:
        for bad in (nested, lambda x: x, print, Logged.log, "scale_runners:square"):
            with pytest.raises(packmule.EnqueueError, match="plain module-level function"):
                task.add_job(bad, 1)  # type: ignore[arg-type]
        with pytest.raises(packmule.EncodeError):
            task.add_finalization_job(then, {1, 2})
        assert task.total_job_count == 0


@pytest.mark.timeout(60)
def test_a_block_left_by_an_exception_cancels_the_task(env: dict[str, str]) -> None:
    with pytest.raises(KeyError), MultiStepTask.create("abandoned") as task:
        task.add_job(square, 1)
        raise KeyError("caller failed")
    assert task.progress().state == "cancelled"
    with pytest.raises(packmule.RunCancelled):
        task.get_return_value()


@pytest.mark.timeout(60)
def test_the_example(env: dict[str, str], workers: Workers) -> None:
    import multi_step

    workers.start("multi_step", 2)
    assert multi_step.main() == "poems: 18 words"


@pytest.mark.timeout(60)
def test_kicking_the_buried_job_after_a_fix_resumes_the_task(
        env: dict[str, str], workers: Workers, log: Path, tmp_path: Path) -> None:
    fix = tmp_path / "fixed"
    env["PACKMULE_TEST_FIX_FILE"] = str(fix)
    workers.start("scale_runners", 2)
    with MultiStepTask.create("kicked", max_retries=0) as task:
        for number in range(4):
            task.add_job(broken_square, number, 1)
        task.add_finalization_job(first_step, "a")
    assert _ended(task).progress().state == "failed"
    fix.touch()
    assert backends().queue.kick_buried(0, env["PACKMULE_TUBE"], 10) != []
    wait_until(lambda: task.progress().state == "done", timeout=30, what="the task to resume")
    assert task.get_return_value() == [0 + 1 + 4 + 9, "a"]
    assert (task.completed_count, task.failed_count, task.total_job_count) == (5, 0, 5)
