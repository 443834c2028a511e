"""Many runs at once: fairness between runs sharing workers, priority levels, delayed jobs.

Real workers, real servers. Fairness is asserted by order, not by time: a
small run started while a large one is in flight must end while most of the
large run is still to do.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Workers, wait_until
from runners import Slow
from scale_runners import Doomed, Logged

import packmule
from packmule.backends import backends
from packmule.runner import job_priority


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


def test_a_priority_outside_the_levels_names_the_range(env: dict[str, str]) -> None:
    for bad in (-1, 256, 65536, True, "1"):
        with pytest.raises(packmule.ConfigurationError, match=r"priority.*0\.\.255"):
            Logged("bad", priority=bad)
