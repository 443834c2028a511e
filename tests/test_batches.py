"""Quick jobs in batches (packmule.pace): what a batch holds is never held for long or lost."""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Any

import pytest
from conftest import Workers, wait_until
from runners import Batched, Driven, Stalling

import packmule
from packmule import aggregate
from packmule.backends import backends
from packmule.keepalive import KeepAlive
from packmule.outcome import Outcome
from packmule.queue import connect


@pytest.mark.timeout(30)
def test_the_keepalive_hands_back_a_batchs_jobs_not_started_at_their_priorities(
        env: dict[str, str]) -> None:
    """A job of a batch that runs a while: the jobs held behind it go back to the tube."""
    tube = env["PACKMULE_TUBE"]
    client, other = (connect(backends().settings.beanstalkd[0], 5.0) for _ in range(2))
    client.use(tube)
    client.watch(tube)
    client.ignore("default")
    ids = [client.put(b"job", priority=priority) for priority in (5, 7, 9)]
    in_hand, *held = (client.reserve(timeout=1) for _ in ids)
    keepalive = KeepAlive()
    waiting = deque(held)
    with keepalive.watching(client, in_hand, 60, lambda: False, held=waiting):
        wait_until(lambda: all(other.stats_job(job.id)["state"] == "ready" for job in held),
                   timeout=5, what="the held jobs handed back")
        assert not waiting
        states = {job_id: other.stats_job(job_id) for job_id in ids}
    assert states[in_hand.id]["state"] == "reserved"  # the job in hand stays with its worker
    assert [int(states[job.id]["pri"]) for job in held] == [7, 9]
    client.close()
    other.close()


@pytest.mark.timeout(90)
def test_jobs_held_behind_a_job_that_runs_a_while_are_done_by_another_worker(
        env: dict[str, str], workers: Workers, tmp_path: Path) -> None:
    """One worker takes quick jobs in batches, one of which sleeps: a second worker, started
    once it sleeps, does every quick job before it wakes (none waits in the first's batch)."""
    flags = str(tmp_path / "slow")
    workers.start("runners", 1)
    runner = Batched("held")
    runner.run_async(60, 40, flags, 8.0)
    wait_until(lambda: Path(flags + ".started").exists(), timeout=30, what="the slow job")
    workers.start("runners", 1)
    wait_until(lambda: runner.update_progress().completed >= 100, timeout=30,
               what="every quick job done")
    assert not Path(flags + ".ended").exists(), "quick jobs waited for the slow one"
    wait_until(lambda: runner.update_progress().finished, timeout=30, what="the run's end")
    assert runner.get_return_value() == 101


@pytest.mark.timeout(90)
def test_a_worker_killed_mid_batch_hands_its_batch_out_again_and_each_job_counts_once(
        env: dict[str, str], workers: Workers, tmp_path: Path) -> None:
    """kill -9 while a job of a batch stalls: the values run before it were not recorded
    yet, nor its jobs deleted; another worker runs them again, and the run ends exact."""
    flags = str(tmp_path / "stall")
    (first,) = workers.start("runners", 1)
    runner = Stalling("killed-mid-batch")
    runner.run_async(200, 150, flags)
    wait_until(lambda: Path(flags + ".started").exists(), timeout=30, what="the stalled job")
    workers.kill9(first)
    workers.start("runners", 1)
    wait_until(lambda: runner.update_progress().finished, timeout=60, what="the run's end")
    assert runner.get_return_value() == 200
    progress = runner.update_progress()
    assert (progress.completed, progress.failed, progress.state) == (201, 0, "done")


@pytest.mark.timeout(90)
def test_a_value_that_cannot_be_recorded_fails_its_job_alone_in_a_batch(
        env: dict[str, str], workers: Workers) -> None:
    """Values of a batch are recorded in one write: one JSON cannot carry fails its job only."""
    workers.start("runners", 1)
    started = time.monotonic()
    with pytest.raises(packmule.RunFailed) as caught:
        Batched("unrecordable").run(150, 0, bad=120)
    assert caught.value.method == "quick" and "cannot be recorded" in str(caught.value)
    assert time.monotonic() - started < 60
    progress = Batched("unrecordable").update_progress()
    assert (progress.failed, progress.completed) == (1, 149)
    assert Batched("after").run(150, 0) == 150, "the worker must go on"


def test_a_batch_of_completions_counts_each_job_once_in_one_write(env: dict[str, str]) -> None:
    """A worker's batch is completed in one memcached write, the jobs of one batch counted
    together; a job in it twice (a redelivered twin) still counts once, and the aggregate
    over them fires with every value."""
    seen: dict[str, int] = {}

    def complete_in_one_batch(runner: Driven) -> Any:
        refs = [runner.enqueue("echo", [number, 0]) for number in range(6)]
        assert runner._context is not None
        scope = runner._context.scope
        done = [(scope, ref.number, ref.batch, Outcome.done(number))
                for number, ref in enumerate(refs[:5])]
        before = scope.backends.store.round_trips
        assert aggregate.complete_all([*done, done[2]]) == [None] * 6
        seen["round trips"] = scope.backends.store.round_trips - before
        seen["completed"] = runner.update_progress().completed
        aggregate.complete(scope, refs[5].number, refs[5].batch, Outcome.done(5))
        return runner.deferred_result("total", refs)

    assert Driven("one-write").run(complete_in_one_batch) == 15
    # the write; the twin's read of the record, and its count taken back
    assert seen == {"round trips": 3, "completed": 5}
    progress = Driven("one-write").update_progress()
    assert (progress.completed, progress.failed, progress.state) == (7, 0, "done")  # 6 + aggregate
