"""The worker's side of beanstalkd: a finished job's delete rides on the next reserve."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import greenstalk
import pytest
from conftest import Workers, wait_until
from fault_runners import LongJob
from runners import Adder, Driven

from packmule.backends import backends
from packmule.jobref import JobRef
from packmule.queue import connect, delete_then_reserve
from packmule.worker import Worker


def _client(env: dict[str, str]) -> greenstalk.Client[bytes]:
    client = connect(backends().settings.beanstalkd[0], 5.0)
    client.use(env["PACKMULE_TUBE"])
    client.watch(env["PACKMULE_TUBE"])
    client.ignore("default")
    return client


def _gone(client: greenstalk.Client[bytes], job_id: int) -> bool:
    try:
        client.peek(job_id)
    except greenstalk.NotFoundError:
        return True
    return False


def test_delete_then_reserve_deletes_and_hands_out_the_next_job(env: dict[str, str]) -> None:
    client = _client(env)
    first, second = client.put(b"one"), client.put(b"two")
    reserved = client.reserve(timeout=1)
    assert (reserved.id, reserved.body) == (first, b"one")
    following = delete_then_reserve(client, [first], timeout=1)
    assert following is not None and (following.id, following.body) == (second, b"two")
    assert _gone(client, first)
    assert delete_then_reserve(client, [second], timeout=0) is None  # nothing left: timed out
    assert _gone(client, second)
    assert delete_then_reserve(client, [second], timeout=0) is None  # gone already: fine
    client.put(b"three")  # the connection is still in step
    assert client.reserve(timeout=1).body == b"three"
    client.close()


def test_a_worker_deletes_its_last_job_before_it_stops(env: dict[str, str]) -> None:
    """Burst mode stops on an empty tube; every finished job is deleted, none left reserved."""
    refs: list[JobRef] = []

    def enqueue_then_work(runner: Adder) -> None:
        refs.extend(runner.enqueue_each("echo", [[1, 0], [2, 0], [3, 0]]))
        Worker(imports=["runners"], tubes=[env["PACKMULE_TUBE"]], burst=True).run()

    Driven("burst").run(enqueue_then_work)
    stats = backends().queue.tube_stats(0, env["PACKMULE_TUBE"])
    assert stats.get("total-jobs", 0) == len(refs)
    for state in ("ready", "reserved", "delayed", "buried"):  # the worker's connection is open
        assert stats.get(f"current-jobs-{state}", 0) == 0, state
    assert Driven("burst").update_progress().completed == len(refs)


@pytest.mark.timeout(60)
def test_sigterm_lets_the_current_job_finish_then_the_worker_exits(
        env: dict[str, str], workers: Workers, tmp_path: Path) -> None:
    """The first SIGTERM: the job in hand finishes, is recorded and deleted, the worker exits 0."""
    executed = tmp_path / "executed"
    env["PACKMULE_TEST_EXEC_FILE"] = str(executed)
    (worker,) = workers.start("fault_runners", 1)
    runner = LongJob("sigterm")
    runner.run_async(1.5)
    wait_until(lambda: executed.exists(), timeout=20, what="the long job to start")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0
    assert executed.read_text().count("long") == 1
    stats = backends().queue.tube_stats(0, env["PACKMULE_TUBE"])
    assert stats.get("current-jobs-reserved", 0) == 0  # deleted, not handed back
    assert stats.get("current-jobs-ready", 0) == 1  # the run's aggregate, kicked, waits for a worker
    workers.start("fault_runners", 1)
    wait_until(lambda: runner.update_progress().state == "done", timeout=20,
               what="the run to finish with a new worker")
    assert runner.get_return_value() == 1.5
    assert executed.read_text().count("long") == 1, "the finished job ran again"


@pytest.mark.timeout(60)
def test_a_second_sigterm_exits_at_once_and_the_job_runs_again(
        env: dict[str, str], workers: Workers, tmp_path: Path) -> None:
    executed = tmp_path / "executed"
    env["PACKMULE_TEST_EXEC_FILE"] = str(executed)
    (worker,) = workers.start("fault_runners", 1)
    runner = LongJob("twice")
    runner.run_async(30)
    wait_until(lambda: executed.exists(), timeout=20, what="the long job to start")
    worker.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 128 + signal.SIGTERM
    stats = wait_until(lambda: (s := backends().queue.tube_stats(0, env["PACKMULE_TUBE"]))
                       .get("current-jobs-ready", 0) == 1 and s, timeout=10,
                       what="the interrupted job to be handed back")
    assert isinstance(stats, dict) and stats.get("current-jobs-reserved", 0) == 0
