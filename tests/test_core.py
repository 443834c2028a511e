"""End-to-end behaviour of Runner over real servers and real worker processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import greenstalk
import pytest
from conftest import ROOT, Workers, wait_until
from fibonacci_runner import FibonacciRunner
from runners import Adder, Constructed, Driven, Empty, LateRegistration, Marks, Slow
from sleepy_runner import SleepyRunner

import packmule
from packmule import aggregate, execution
from packmule.backends import backends
from packmule.envelope import decode
from packmule.outcome import Outcome


def test_run_blocks_and_returns_the_sum(env: dict[str, str], workers: Workers) -> None:
    workers.start("runners", 2)
    assert Adder("sum").run(50) == sum(range(50))
    progress = Adder("sum").update_progress()
    assert (progress.completed, progress.total, progress.state) == (51, 51, "done")
    assert str(progress) == "51 / 51"


@pytest.mark.parametrize("runner", [Marks, Constructed])
def test_every_job_gets_a_runner_of_its_own(env: dict[str, str], workers: Workers,
                                           runner: type[Marks]) -> None:
    """One worker runs every job of the call (one head): none sees another's attributes."""
    workers.start("runners", 1)
    assert runner("fresh").run(30) == [[None, ["tube"]]] * 30


def test_sleepy_runner_run_returns_the_sum_of_its_naps(env: dict[str, str],
                                                       workers: Workers) -> None:
    workers.start("sleepy_runner", 2)
    runner = SleepyRunner("nightly")
    total = runner.run(100, 0.01)
    record = SleepyRunner.find("nightly")
    assert record is not None and record.state == "done" and record.value == total
    assert 0 < total < 1.0


def test_run_async_progress_from_another_process(env: dict[str, str], workers: Workers) -> None:
    workers.start("sleepy_runner", 2)
    ref = SleepyRunner("watched").run_async(60, 0.02)
    assert isinstance(ref, packmule.JobRef) and ref.number == 0
    watcher = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "watch_progress.py"), "watched"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=90, check=True)
    lines = [json.loads(line) for line in watcher.stdout.splitlines()]
    readings, final = lines[:-1], lines[-1]
    completed = [r[0] for r in readings]
    assert completed == sorted(completed), "progress went backwards"
    assert readings[-1] == [61, 61, "done"]
    assert final["value"] == SleepyRunner("watched").get_return_value()
    assert final["value"] > 0


def test_fibonacci_through_nested_deferred_results(env: dict[str, str],
                                                   workers: Workers) -> None:
    workers.start("fibonacci_runner", 2)
    FibonacciRunner("f").run_async(15)
    wait_until(lambda: FibonacciRunner("f").update_progress().finished, timeout=120,
               what="fib(15) to finish")
    assert FibonacciRunner("f").get_return_value() == 610


def test_fibonacci_blocking_run(env: dict[str, str], workers: Workers) -> None:
    workers.start("fibonacci_runner", 2)
    assert FibonacciRunner("g").run(8) == 21


def test_zero_jobs_finish_at_once_without_workers(env: dict[str, Any]) -> None:
    assert Empty("none").run() == 0
    assert Empty("none").update_progress().state == "done"


def test_unknown_is_not_finished(env: dict[str, str]) -> None:
    assert Adder.find("never-ran") is None
    with pytest.raises(packmule.UnknownRun):
        Adder("never-ran").get_return_value()
    assert Adder("never-ran").update_progress().state == "unknown"


def _execute_next_job(tube: str) -> greenstalk.Job:
    """Reserve one job and run it in this process, as a worker would, without deleting it."""
    address = backends().settings.beanstalkd[0]
    client = greenstalk.Client(address, encoding=None, watch=tube)
    job = client.reserve(timeout=10)
    envelope = decode(job.body)
    runner = execution.prepare(envelope, frozenset({"runners"}))
    execution.record(runner, envelope, execution.execute(runner, envelope))
    client.release(job)  # handed out again: the redelivery
    client.close()
    return job


def test_a_job_executed_twice_counts_once(env: dict[str, str], workers: Workers,
                                          tmp_path: Path) -> None:
    os.environ["PACKMULE_TEST_COUNT_FILE"] = str(tmp_path / "fired")
    env["PACKMULE_TEST_COUNT_FILE"] = str(tmp_path / "fired")
    try:
        result: dict[str, Any] = {}
        runner = Adder("twice")
        thread = threading.Thread(target=lambda: result.update(v=runner.run(5)))
        thread.start()
        wait_until(lambda: Adder("twice").update_progress().total == 6, what="jobs enqueued")
        _execute_next_job(env["PACKMULE_TUBE"])  # first execution, then "redelivered"
        workers.start("runners", 1)
        thread.join(timeout=30)
        assert result["v"] == sum(range(5))
        progress = Adder("twice").update_progress()
        assert (progress.completed, progress.total) == (6, 6)
        assert (tmp_path / "fired").read_text() == "fired\n"
    finally:
        os.environ.pop("PACKMULE_TEST_COUNT_FILE")


def test_aggregate_registered_after_its_jobs_finished_fires_once(
        env: dict[str, str], workers: Workers, tmp_path: Path) -> None:
    env["PACKMULE_TEST_COUNT_FILE"] = os.environ["PACKMULE_TEST_COUNT_FILE"] = str(
        tmp_path / "fired")
    try:
        workers.start("runners", 2)
        assert LateRegistration("late").run(20) == sum(range(20))
        assert (tmp_path / "fired").read_text() == "fired\n"
    finally:
        os.environ.pop("PACKMULE_TEST_COUNT_FILE")


def _progress_round_trips(name: str) -> int:
    store, coord = backends().store, backends().coord
    before = store.round_trips + coord.round_trips
    ProgressProbe(name).update_progress()
    return store.round_trips + coord.round_trips - before


class ProgressProbe(Adder):
    """Enqueues jobs no worker runs, and measures a progress read of its running run."""

    def run(self, count: int = 10, pause: float = 0.0) -> int:
        self.enqueue_each("echo", [(i, 0) for i in range(count)])
        assert self.update_progress().total == count
        return _progress_round_trips(self.name)


def test_progress_costs_the_same_at_10_and_10000_jobs(env: dict[str, str]) -> None:
    small, large = ProgressProbe("small").run(10), ProgressProbe("large").run(10_000)
    assert small == large
    # etcd: the newest run id, then its record with any loss report; memcached (one
    # server): the counters with the run's sentinel, and its eviction count.
    assert small <= 4


def test_flushing_memcached_mid_run_raises_result_missing(env: dict[str, str],
                                                          workers: Workers) -> None:
    workers.start("runners", 2)
    flusher = threading.Thread(target=lambda: (
        wait_until(lambda: Slow("flushed").update_progress().completed >= 3, what="some jobs"),
        backends().store.flush_all()))
    started = time.monotonic()
    flusher.start()
    with pytest.raises(packmule.ResultMissing) as caught:
        Slow("flushed").run(30, 0.2)
    flusher.join()
    assert caught.value.jobs, "ResultMissing must name jobs"
    assert time.monotonic() - started < 20


def test_a_value_is_recorded_counted_and_its_batch_counted_in_one_round_trip(
        env: dict[str, str]) -> None:
    """A completion's memcached writes and its batch read travel in one write; a job that
    runs twice still counts once."""
    def complete_by_hand(runner: Driven) -> tuple[int, int]:
        ref = runner.enqueue("echo", [3, 0])  # no worker runs it: completed here
        assert runner._context is not None
        scope = runner._context.scope
        store = scope.backends.store
        before = store.round_trips
        aggregate.complete(scope, ref.number, ref.batch, Outcome.done(3))
        trips = store.round_trips - before
        aggregate.complete(scope, ref.number, ref.batch, Outcome.done(3))  # it ran again
        return trips, runner.update_progress().completed

    trips, completed = Driven("one-trip").run(complete_by_hand)
    assert trips == 1, f"{trips} memcached round trips to complete one job"
    assert completed == 1


def test_twins_of_a_failing_job_count_one_failure_and_a_kick_takes_it_back(
        env: dict[str, str]) -> None:
    """Two executions of one job (a redelivery, a job put twice) that both fail count
    one failure, recorded and counted in one write like a value (the torture test,
    seed 9, caught twins counting it twice when the count and its mark went apart);
    the kicked job's value then replaces the failure and uncounts it."""
    def fail_twice_then_succeed(runner: Driven) -> list[tuple[int, int]]:
        ref = runner.enqueue("echo", [3, 0])  # no worker runs it: completed here
        assert runner._context is not None
        scope = runner._context.scope
        counts = []
        for _ in range(2):
            failure = Outcome.failed(ref.number, "Traceback ...\nValueError: broken", own=True,
                                     method="echo")
            before = scope.backends.store.round_trips
            aggregate.complete(scope, ref.number, ref.batch, failure)
            assert scope.backends.store.round_trips - before <= 3  # one write, and the twin's reads
            progress = runner.update_progress()
            counts.append((progress.completed, progress.failed))
        aggregate.complete(scope, ref.number, ref.batch, Outcome.done(3))  # kicked after a fix
        progress = runner.update_progress()
        counts.append((progress.completed, progress.failed))
        return counts

    assert Driven("twins").run(fail_twice_then_succeed) == [(0, 1), (0, 1), (1, 0)]


def test_values_read_in_order_come_back_exact_whatever_they_hold(env: dict[str, str]) -> None:
    """An aggregate's values are read in order, split by C code when the reply is the
    expected one; a key not found, an empty value, or values holding line breaks and
    memcached's own words are read back exactly, in two chunks of a get."""
    store = backends().store
    keys = [f"{env['PACKMULE_NAMESPACE']}:in-order:{i}" for i in range(7000)]
    tricky = {keys[1]: b"a\r\nEND\r\n", keys[2]: b"", keys[6999]: b"VALUE x 0 1\r\nEND\r\n"}
    values = {key: tricky.get(key, b'{"v":%d}' % i) for i, key in enumerate(keys) if i != 3}
    store.set_many(values)
    assert store.get_in_order(keys) == [values.get(key) for key in keys]
    plain = [key for key in keys if key in values and key not in tricky]
    assert store.get_in_order(plain) == [values[key] for key in plain]
    assert store.get_in_order([]) == []
    # A value forging the next key's reply, that key missing: as many lines as expected.
    forged = [f"{env['PACKMULE_NAMESPACE']}:forged:{i}" for i in range(3)]
    store.set_many({forged[0]: b"x", forged[1]: f"x\r\nVALUE {forged[2]} 0 1\r\nz".encode()})
    assert store.get_in_order(forged) == [b"x", f"x\r\nVALUE {forged[2]} 0 1\r\nz".encode(),
                                          None]


def test_values_read_in_order_span_reads_and_a_refused_get_is_said_at_once(
        env: dict[str, str]) -> None:
    """Values far larger than one read come back whole; a get memcached refuses (a key
    over its 250 bytes) raises its words at once, and the connection stays in step."""
    store = backends().store
    big = {f"{env['PACKMULE_NAMESPACE']}:big:{i}": b"%d" % i * 20_000 for i in range(200)}
    store.set_many(big)
    assert store.get_in_order(list(big)) == list(big.values())
    with pytest.raises(packmule.ServerRefused, match="bad command line format"):
        store.get_in_order(["x" * 300, *big])
    assert store.get_in_order(list(big)[:2]) == list(big.values())[:2]
