"""Every run ends, within seconds of the cause, in exactly one true state (DESIGN invariants 4, 10, 12).

Each test reproduces an edge where a run used to end wrong or never end,
against real servers and real workers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, Workers, in_thread, wait_until
from ending_runners import (
    Chain,
    ChainStraggler,
    Diverging,
    FlakyChain,
    FlakyPlusOne,
    KeepsFailures,
    LateAggregate,
    ReturnsASet,
)
from fault_runners import Flaky
from runners import Slow

import packmule
from packmule.backends import backends
from packmule.outcome import Outcome
from packmule.store import RunKeys


def test_a_chain_500_deep_completes_and_the_worker_survives(env: dict[str, str],
                                                            workers: Workers) -> None:
    (worker,) = workers.start("ending_runners", 1)
    assert Chain("deep").run(500) == "bottom"
    assert Chain("again").run(3, 7) == 7  # the same worker goes on
    assert worker.poll() is None


def test_a_failure_at_the_bottom_of_a_deep_chain_fails_the_run(env: dict[str, str],
                                                               workers: Workers) -> None:
    (worker,) = workers.start("ending_runners", 1)
    with pytest.raises(packmule.RunFailed, match="the bottom of the chain is broken"):
        Chain("broken").run(400, "raise")
    record = Chain.find("broken")
    assert record is not None and record.state == "failed"
    assert worker.poll() is None


def test_a_chain_waits_for_a_source_counted_early_by_a_twin(env: dict[str, str],
                                                            workers: Workers,
                                                            tmp_path: Path) -> None:
    workers.start("ending_runners", 3)
    gate, note = tmp_path / "gate", tmp_path / "note"
    thread, outcome = in_thread(lambda: ChainStraggler("twin").run(str(gate), str(note)))
    wait_until(note.exists, what="the head job to return its chain")
    record = ChainStraggler.find("twin")
    assert record is not None
    keys = RunKeys(backends().settings.namespace, record.run)
    wait_until(lambda: backends().store.get(keys.batch(note.read_text())), what="the chain")
    gate.touch()
    thread.join(30)
    assert outcome == {"value": 2}
    assert ChainStraggler("twin").update_progress().state == "done"


def test_a_retry_that_enqueues_differently_gets_fresh_numbers(env: dict[str, str],
                                                              workers: Workers,
                                                              tmp_path: Path) -> None:
    workers.start("ending_runners", 2)
    # First attempt: value(1) and total([1]) = 101, then it raises. The retry
    # enqueues value(1) (the same call: replayed) and value(10) (a new call:
    # it must not take the number of the first attempt's aggregate).
    assert Diverging("retry").run(str(tmp_path / "marker")) == 111


def test_a_runner_no_worker_imports_fails_the_run_naming_the_module(env: dict[str, str],
                                                                    workers: Workers) -> None:
    workers.start("runners", 1)  # imports tests/runners.py, not ending_runners
    runner = Chain("nowhere")
    runner.run_async(1)
    wait_until(lambda: runner.update_progress().state == "failed", timeout=20,
               what="the run to fail")
    with pytest.raises(packmule.RunFailed) as caught:
        runner.get_return_value()
    message = str(caught.value)
    assert "'ending_runners' is not in this worker's --import list (runners)" in message
    with pytest.raises(packmule.RunFailed, match="--import ending_runners"):
        Chain("blocking").run(1)


def test_a_runner_defined_in_a_script_is_refused_at_enqueue(env: dict[str, str]) -> None:
    script = type("Script", (Chain,), {"__module__": "__main__"})
    with pytest.raises(packmule.EnqueueError, match=r"__main__.*--import"):
        script("s").run(1)
    stats = backends().queue.tube_stats(0, env["PACKMULE_TUBE"])
    assert stats.get("total-jobs", 0) == 0


def _kick(env: dict[str, str]) -> str:
    kicked = _cli(env, "kick", "--tube", env["PACKMULE_TUBE"])
    assert kicked.returncode == 0, kicked.stderr
    return kicked.stdout


def test_a_kick_resumes_a_failed_blocking_run(env: dict[str, str], workers: Workers,
                                              tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    fix = tmp_path / "fixed"
    env["PACKMULE_TEST_FIX_FILE"] = str(fix)
    monkeypatch.setenv("PACKMULE_TEST_FIX_FILE", str(fix))
    workers.start("fault_runners", 2, "--import", "ending_runners")
    with pytest.raises(packmule.RunFailed, match="job 2 is broken"):
        Flaky("blocking").run(5, 2)
    with pytest.raises(packmule.RunFailed, match="job 2 is broken"):
        FlakyPlusOne("plus-one").run(5, 2)
    with pytest.raises(packmule.RunFailed, match="step 5 is broken"):
        FlakyChain("chain").run(20, 5)  # run() returned a JobRef: the run's value is its value
    for runner in (Flaky("blocking"), FlakyPlusOne("plus-one"), FlakyChain("chain")):
        assert runner.update_progress().state == "failed"

    fix.touch()
    assert "kicked 3 buried job(s)" in _kick(env)
    wait_until(lambda: FlakyChain("chain").update_progress().state == "done", timeout=30,
               what="the kicked blocking chain to finish")
    assert FlakyChain("chain").get_return_value() == "bottom"
    wait_until(lambda: Flaky("blocking").update_progress().state == "done", timeout=30,
               what="the kicked blocking run to finish")
    assert Flaky("blocking").get_return_value() == sum(range(5))
    progress = Flaky("blocking").update_progress()
    assert (progress.failed, progress.completed) == (0, 6)
    # run() went on after the aggregate (+ 1): what it would have returned is
    # unknown, so that run stays failed, though its job now has a value.
    record = FlakyPlusOne.find("plus-one")
    assert record is not None
    keys = RunKeys(backends().settings.namespace, record.run)
    wait_until(lambda: Outcome.decode(backends().store.get(keys.job(3)) or b'{"f":0,"tb":"","own":false}').ok,
               timeout=30, what="the other kicked job (job 3) to succeed")
    assert FlakyPlusOne("plus-one").update_progress().state == "failed"
    with pytest.raises(packmule.RunFailed):
        FlakyPlusOne("plus-one").get_return_value()


def _jobs(env: dict[str, str]) -> dict[str, int]:
    stats = backends().queue.tube_stats(0, env["PACKMULE_TUBE"])
    return {state: stats.get(f"current-jobs-{state}", 0)
            for state in ("ready", "reserved", "delayed", "buried")}


def test_cancel_removes_the_runs_parked_aggregates(env: dict[str, str],
                                                   workers: Workers) -> None:
    workers.start("runners", 2)
    runner = Slow("parked")
    runner.run_async(40, 0.1)
    wait_until(lambda: _jobs(env)["delayed"] == 1, timeout=20,
               what="the run's aggregate to be parked")
    runner.cancel()
    wait_until(lambda: not any(_jobs(env).values()), timeout=20,
               what="the cancelled run to leave nothing in beanstalkd")
    assert Slow("parked").update_progress().state == "cancelled"


@pytest.mark.timeout(60)
def test_an_aggregate_parked_after_its_run_was_cancelled_removes_itself(
        env: dict[str, str], workers: Workers, tmp_path: Path) -> None:
    """The cancel deleted the run's parked jobs before its root job parked one."""
    workers.start("ending_runners", 2)
    go = tmp_path / "go"
    LateAggregate("late").run_async(str(go))
    wait_until(lambda: LateAggregate("late").update_progress().failed == 1, timeout=20,
               what="the job to fail")
    assert LateAggregate("late").cancel()
    go.touch()
    wait_until(lambda: _jobs(env)["reserved"] == 0, timeout=20, what="the root job to end")
    assert _jobs(env) == {"ready": 0, "reserved": 0, "delayed": 0, "buried": 1}


@pytest.mark.timeout(60)
def test_an_aggregate_parked_again_after_its_run_was_purged_removes_itself(
        env: dict[str, str], workers: Workers, tmp_path: Path) -> None:
    """The aggregate settles its dependency's failure (the run fails), and is held
    before it parks again: the purge finds it reserved, not parked."""
    held = tmp_path / "held"
    held.mkdir()
    env["PACKMULE_TEST_PAUSE_REPARK"] = str(held)
    workers.start("ending_runners", 2)
    (tmp_path / "go").touch()  # the root job defers at once
    run = LateAggregate("purged").run_async(str(tmp_path / "go")).run
    wait_until(lambda: (held / "paused").exists(), timeout=20,
               what="the aggregate to settle the failure")
    wait_until(lambda: LateAggregate("purged").update_progress().state == "failed", timeout=20,
               what="the run to fail")
    purged = _cli(env, "purge", "--run", run)
    assert purged.returncode == 0, purged.stderr
    (held / "go").touch()
    wait_until(lambda: _jobs(env)["reserved"] == 0, timeout=20, what="the aggregate's job")
    assert _jobs(env) == {"ready": 0, "reserved": 0, "delayed": 0, "buried": 0}
    # Nor did it run again, finding its description gone and recording a loss where the
    # purge had removed everything.
    keys = RunKeys(env["PACKMULE_NAMESPACE"], run)
    assert backends().store.get_many([keys.job(n) for n in range(5)]) == {}


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "packmule", *args], env={**os.environ, **env},
                          cwd=ROOT, capture_output=True, text=True, timeout=30)


def test_kick_and_purge_act_on_one_runs_leftovers(env: dict[str, str], workers: Workers,
                                                  tmp_path: Path) -> None:
    fix = tmp_path / "fixed"
    env["PACKMULE_TEST_FIX_FILE"] = str(fix)
    workers.start("fault_runners", 2)
    kept, dropped = Flaky("kept").run_async(5, 2).run, Flaky("dropped").run_async(5, 2).run
    for name in ("kept", "dropped"):
        wait_until(lambda n=name: Flaky(n).update_progress().state == "failed", timeout=20,
                   what=f"run {name} to fail")

    # Each failed run keeps its buried job and its parked aggregate, for a kick (the
    # aggregate, kicked by the failure, may still be on its way back to parked).
    wait_until(lambda: _jobs(env) == {"ready": 0, "reserved": 0, "delayed": 2, "buried": 2},
               timeout=20, what="both runs' buried job and parked aggregate")
    fix.touch()
    assert f"run {kept}: kicked 1 buried job(s)" in _cli(env, "kick", "--run", kept).stdout
    wait_until(lambda: Flaky("kept").update_progress().state == "done", timeout=30,
               what="the kicked run to finish")
    assert Flaky("kept").get_return_value() == sum(range(5))
    assert Flaky.find("dropped") is not None and Flaky("dropped").update_progress().failed == 1

    purged = _cli(env, "purge", "--run", dropped)
    assert f"run {dropped} (failed): removed 1 parked and 1 buried job(s)" in purged.stdout
    assert _jobs(env) == {"ready": 0, "reserved": 0, "delayed": 0, "buried": 0}
    unknown = _cli(env, "purge", "--run", "nosuchrun")
    assert unknown.returncode != 0 and "unknown run 'nosuchrun'" in unknown.stderr


def test_a_run_value_json_cannot_carry_is_refused_not_recorded_as_text(
        env: dict[str, str]) -> None:
    with pytest.raises(packmule.EncodeError, match=r"ReturnsASet\.run\(\) returned .* set"):
        ReturnsASet("set").run()
    with pytest.raises(packmule.RunFailed, match="set is not JSON serializable"):
        ReturnsASet("set").get_return_value()
    assert ReturnsASet("set").update_progress().state == "failed"


def test_packmules_markers_in_a_run_value_read_back_as_markers(env: dict[str, str],
                                                               workers: Workers) -> None:
    workers.start("ending_runners", 2)
    values = KeepsFailures("markers").run()
    assert values[0] == 0 and values[2:] == [2, 3]
    assert isinstance(values[1], packmule.Failure) and "job 1 is broken" in values[1].traceback
    assert KeepsFailures("markers").get_return_value() == values  # as another process reads it
