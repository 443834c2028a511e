"""Many runs at once: fairness between runs sharing workers, priority levels, delayed jobs.

Real workers, real servers. Fairness is asserted by order, not by time: a
small run started while a large one is in flight must end while most of the
large run is still to do.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Workers, wait_until
from runners import Driven, Slow
from runs_runners import Echo
from scale_runners import Doomed, Later, Logged

import packmule
from packmule.backends import backends
from packmule.puts import job_priority, priorities


@pytest.mark.timeout(120)
def test_a_small_run_started_during_a_large_one_does_not_wait_for_it(
        env: dict[str, str], workers: Workers) -> None:
    workers.start("runners", 2)
    big = Slow("big")
    big.run_async(400, 0.02)
    wait_until(lambda: big.update_progress().completed >= 20, timeout=60,
               what="the large run to keep both workers busy")
    assert Slow("small").run(20, 0.02) == 0.4
    progress = big.update_progress()
    assert progress.total - progress.completed >= 150, f"the small run waited: large at {progress}"
    wait_until(lambda: big.update_progress().finished, timeout=90, what="the large run to end")
    assert big.get_return_value() == 8.0
    assert big.update_progress().completed == 401


@pytest.mark.timeout(120)
def test_priority_levels_are_honoured_whatever_the_positions(
        env: dict[str, str], workers: Workers, tmp_path: Path) -> None:
    log = tmp_path / "log"
    env["PACKMULE_TEST_EXEC_FILE"] = str(log)
    Logged("later", priority=2).run_async(3)  # put first, one level lower
    Logged("sooner", priority=1).run_async(300)  # its positions go far past the other's
    workers.start("scale_runners", 1)
    for name in ("later", "sooner"):
        wait_until(lambda n=name: Logged(n).update_progress().finished, timeout=90,
                   what=f"run {name} to end")
    lines = log.read_text().splitlines()
    assert len(lines) == 303
    assert [line.split()[0] for line in lines] == ["sooner"] * 300 + ["later"] * 3
    assert Logged("sooner").get_return_value() == sum(range(300))


@pytest.mark.timeout(60)
def test_a_buried_job_keeps_its_level_and_position(env: dict[str, str], workers: Workers) -> None:
    workers.start("scale_runners", 1)
    with pytest.raises(packmule.RunFailed):
        Doomed("buried", priority=7).run()
    queue, tube = backends().queue, env["PACKMULE_TUBE"]
    wait_until(lambda: queue.tube_stats(0, tube).get("current-jobs-buried") == 1, timeout=10,
               what="the failed job to be buried")
    client = queue._client(0)
    client.use(tube)
    assert int(client.stats_job(client.peek_buried())["pri"]) == job_priority(7, 1)
    assert job_priority(7, 1) == (7 << 24) + 1 and job_priority(0, 2**30) == 2**24 - 1


def test_a_batchs_priorities_made_at_once_are_its_jobs_own() -> None:
    """enqueue_each makes a chunk's priorities in one go (a range): the same as job by job."""
    for numbers in (range(1, 600, 3), range(2**24 - 5, 2**24 + 5, 2), range(0), range(2**30, 2**30 + 2)):
        assert list(priorities(7, numbers)) == [job_priority(7, n) for n in numbers]


def test_a_priority_outside_the_levels_names_the_range(env: dict[str, str]) -> None:
    for bad in (-1, 256, 65536, True, "1"):
        with pytest.raises(packmule.ConfigurationError, match=r"priority.*0\.\.255"):
            Logged("bad", priority=bad)


# Delayed jobs --------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_a_delayed_job_is_counted_at_once_and_runs_after_its_delay(
        env: dict[str, str], workers: Workers) -> None:
    workers.start("scale_runners", 2)
    queue, tube = backends().queue, env["PACKMULE_TUBE"]
    started = time.time()
    thread = threading.Thread(target=lambda: values.append(Later("later").run(3, started)))
    values: list[Any] = []
    thread.start()
    wait_until(lambda: Later("later").update_progress().completed == 1, timeout=20,
               what="the job without delay to finish")
    progress = Later("later").update_progress()
    assert (progress.total, progress.state) == (3, "running")  # two jobs and the aggregate
    assert queue.tube_stats(0, tube).get("current-jobs-delayed") == 1
    thread.join(timeout=30)
    labels_and_wait = values[0]
    assert labels_and_wait[:2] == ["now", "later"]
    assert labels_and_wait[2] >= 3, "the delayed job ran before its delay"
    assert Later("later").update_progress().completed == 3


@pytest.mark.parametrize("seconds", [-1, float("nan"), 2**31, "1", True])
def test_a_bad_delay_is_refused_and_nothing_is_enqueued(env: dict[str, str],
                                                        seconds: Any) -> None:
    def enqueue(runner: packmule.Runner) -> None:
        runner.enqueue_in(seconds, "echo", [1, 0])

    with pytest.raises(packmule.EnqueueError, match="enqueue_in"):
        Driven("bad-delay").run(enqueue)
    assert Driven("bad-delay").update_progress().total == 0


# Runs by id --------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_the_last_runs_of_a_name_stay_listed_and_reachable_by_id_until_their_ttl(
        env: dict[str, str]) -> None:
    packmule.configure(result_ttl_seconds=3)
    for value in range(4):
        assert Echo("listed").run(value) == value
    records = Echo.find_runs("listed")
    assert [record.value for record in records] == [3, 2, 1, 0]  # newest first
    assert [record.value for record in Echo.find_runs("listed", limit=2)] == [3, 2]
    for record in records:
        by_id = Echo.find_run(record.run)
        assert by_id is not None and (by_id.state, by_id.value) == ("done", record.value)
    assert Echo.find_runs("other") == [] and Logged.find_runs("listed") == []
    wait_until(lambda: Echo.find_runs("listed") == [], timeout=20,
               what="the records to expire after their TTL")
    assert Echo.find_run(records[0].run) is None
