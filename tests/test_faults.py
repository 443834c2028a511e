"""Faults against real servers and real worker processes.

Workers are killed with SIGKILL at random moments and at the worst moment,
beanstalkd and memcached are restarted under a run, jobs outlive their
time-to-run, forged jobs are put in the tube, jobs fail, are kicked, and runs
are cancelled. Every wait has a deadline; side effects are counted in files
named by environment variables (see ``fault_runners``).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import greenstalk
import pytest
from conftest import ROOT, Workers, in_thread, wait_until
from crash_hook import CRASH_HOOK
from fault_runners import Counted, Flaky, Handled, LongJob, Straggler, Tolerant, TolerantInWorker

import packmule
from packmule.backends import backends
from packmule.envelope import BodyTemplate, Envelope
from packmule.servers import LocalServers


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def counts(env: dict[str, str], tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Files counting aggregate calls and job executions, named in the workers' environment.

    Also in this process's: a caller-side aggregate runs here.
    """
    fired, executed = tmp_path / "fired", tmp_path / "executed"
    for name, path in (("PACKMULE_TEST_COUNT_FILE", fired), ("PACKMULE_TEST_EXEC_FILE", executed)):
        env[name] = str(path)
        monkeypatch.setenv(name, str(path))
    return fired, executed


def _tube(env: dict[str, str]) -> dict[str, int]:
    """``stats-tube`` of the test's tube; a stale connection (server restart) is retried once."""
    queue = backends().queue
    try:
        return queue.tube_stats(0, env["PACKMULE_TUBE"])
    except packmule.QueueUnavailable:
        return queue.tube_stats(0, env["PACKMULE_TUBE"])


def _drained(env: dict[str, str]) -> bool:
    """No job of the tube is ready or reserved (parked aggregates stay delayed)."""
    stats = _tube(env)
    return stats.get("current-jobs-ready", 0) == 0 and stats.get("current-jobs-reserved", 0) == 0




def _finished(runner: packmule.Runner, *, timeout: float) -> packmule.Progress:
    value = wait_until(lambda: (p := runner.update_progress()).finished and p, timeout=timeout,
                       what=f"run {runner.identity} to finish")
    assert isinstance(value, packmule.Progress)
    return value


# 1. Exactly-once aggregate under repeated SIGKILL ------------------------------------------
@pytest.mark.timeout(120)
def test_killing_workers_at_random_moments_fires_the_aggregate_once(
        env: dict[str, str], workers: Workers, tmp_path: Path,
        counts: tuple[Path, Path]) -> None:
    fired, _ = counts
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    alive = workers.start("fault_runners", 2)
    runner = Counted("killed")
    runner.run_async(2000, 0.004)
    # Kills start once the fan-out is on the queue: a root job killed during its
    # fan-out runs again; test_a_fan_out_job_killed_before_its_delete_... covers that.
    wait_until(lambda: runner.update_progress().total >= 2001, timeout=30, what="the fan-out")
    for kill in range(12):
        # A random moment, not a synchronisation: whatever the victim is doing then, it dies.
        time.sleep(rng.uniform(0.03, 0.2))
        assert runner.update_progress().completed < 1900, f"run nearly done after {kill} kills"
        victim = alive.pop(rng.randrange(len(alive)))
        workers.kill9(victim)
        alive += workers.start("fault_runners", 1)
    progress = _finished(runner, timeout=60)
    assert progress.state == "done", f"seed {seed}"
    assert runner.get_return_value() == sum(range(2000))
    wait_until(lambda: _drained(env), timeout=30, what="redelivered jobs to run again")
    assert _lines(fired) == ["fired"], f"aggregate calls after 12 kills (seed {seed})"
    progress = runner.update_progress()
    # A kill can land between recording a job and counting it; exact counts under
    # such a kill are asserted by test_a_job_killed_around_its_count_counts_once.
    assert (progress.total, progress.failed) == (2001, 0)
    assert abs(progress.completed - 2001) <= 12, f"{progress} (seed {seed})"


# 2. A crash between "last dependency done" and "aggregate fired" -----------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("point", ["before-fire", "after-fire"])
@pytest.mark.parametrize("where", ["worker", "caller"])
def test_crash_between_last_completion_and_firing_is_repaired(
        env: dict[str, str], workers: Workers, tmp_path: Path,
        counts: tuple[Path, Path], point: str, where: str) -> None:
    fired, _ = counts
    flag = tmp_path / "crashed"
    env[CRASH_HOOK] = f"{point}:{flag}"
    procs = workers.start("fault_runners", 2)
    runner = Counted(f"crash-{where}")
    if where == "worker":
        runner.run_async(20)
        progress = _finished(runner, timeout=30)
        assert progress.state == "done"
        value = runner.get_return_value()
    else:
        value = runner.run(20)
    assert value == sum(range(20))
    # The caller may wake (on its wake-up job, kicked first) before the marker is written.
    wait_until(flag.exists, timeout=10, what="the crash hook to run")
    wait_until(lambda: [p.poll() for p in procs].count(-9) == 1, timeout=10,
               what="the worker to die by SIGKILL")
    assert [p.poll() for p in procs].count(None) == 1
    assert _lines(fired) == ["fired"]
    progress = runner.update_progress()
    assert (progress.completed, progress.total) == (21, 21)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("point", ["before-count", "after-count"])
def test_a_job_killed_around_its_count_counts_once(
        env: dict[str, str], workers: Workers, tmp_path: Path,
        counts: tuple[Path, Path], point: str) -> None:
    """Invariant 2: the worker dies once the job's outcome is recorded, before or
    just after its progress count is sent; the job runs again and counts once."""
    fired, executed = counts
    flag = tmp_path / "crashed"
    env[CRASH_HOOK] = f"{point}:{flag}"
    workers.start("fault_runners", 2)
    runner = Counted("uncounted")
    assert runner.run(20) == sum(range(20))
    assert flag.exists(), "the crash hook never ran"
    assert len(_lines(executed)) == 21  # the killed job ran again
    assert _lines(fired) == ["fired"]
    progress = runner.update_progress()
    assert (progress.completed, progress.total) == (21, 21), "a job that ran twice counts once"


@pytest.mark.timeout(60)
def test_a_fan_out_job_killed_before_its_delete_fires_its_aggregate_once(
        env: dict[str, str], workers: Workers, tmp_path: Path,
        counts: tuple[Path, Path]) -> None:
    """Invariant 1 seen from the user: run() fanned out and deferred; its worker dies after.

    The root job is handed out again and runs ``run`` again; the aggregate method
    written once in ``run`` must still be called once.
    """
    fired, _ = counts
    flag = tmp_path / "crashed"
    env[CRASH_HOOK] = f"after-chain:{flag}"
    workers.start("fault_runners", 2)
    runner = Counted("refanned")
    runner.run_async(20)
    progress = _finished(runner, timeout=30)
    assert flag.exists(), "the crash hook never ran"
    assert (progress.state, runner.get_return_value()) == ("done", sum(range(20)))
    wait_until(lambda: _drained(env), timeout=30, what="the tube to drain")
    progress = runner.update_progress()
    assert _lines(fired) == ["fired"], f"the aggregate method ran more than once ({progress})"
    assert (progress.completed, progress.total) == (21, 21)


# 3. beanstalkd restarts mid-run --------------------------------------------------------------
@pytest.mark.timeout(90)
def test_beanstalkd_restart_mid_run_completes_with_the_exact_value(
        env: dict[str, str], workers: Workers, servers: LocalServers,
        counts: tuple[Path, Path]) -> None:
    fired, _ = counts
    workers.start("fault_runners", 2)
    runner = Counted("bounced")
    runner.run_async(400, 0.005)
    wait_until(lambda: runner.update_progress().total >= 401, timeout=30, what="the fan-out")
    wait_until(lambda: runner.update_progress().completed >= 50, timeout=30, what="50 jobs")
    servers.restart_beanstalkd()
    assert runner.update_progress().completed < 400, "the restart came too late to matter"
    progress = _finished(runner, timeout=60)
    assert progress.state == "done"
    assert runner.get_return_value() == sum(range(400))
    assert _lines(fired) == ["fired"]


# 4. memcached restarts under a blocked caller ---------------------------------------------
@pytest.mark.timeout(60)
def test_memcached_restart_mid_run_raises_result_missing_naming_jobs(
        env: dict[str, str], workers: Workers, servers: LocalServers) -> None:
    workers.start("fault_runners", 2)
    runner = Counted("forgotten")
    thread, outcome = in_thread(lambda: runner.run(200, 0.02))
    wait_until(lambda: Counted("forgotten").update_progress().completed >= 10, timeout=30,
               what="10 jobs")
    servers.restart_memcached()
    thread.join(timeout=15)  # "within seconds": a bound, not a speed measurement
    assert not thread.is_alive(), "the blocked caller still waits 15 s after memcached restarted"
    error = outcome.get("error")
    assert isinstance(error, packmule.ResultMissing), repr(outcome)
    assert error.jobs, f"ResultMissing must name jobs: {error}"
    assert all(ref.run == error.jobs[0].run for ref in error.jobs)


# 5. Long jobs are kept alive ---------------------------------------------------------------
@pytest.mark.timeout(60)
def test_a_job_running_three_times_its_ttr_runs_once(
        env: dict[str, str], workers: Workers, tmp_path: Path,
        counts: tuple[Path, Path]) -> None:
    fired, executed = counts
    workers.start("fault_runners", 2)
    assert LongJob("long").run(3 * LongJob.time_to_run + 0.5) == 6.5  # type: ignore[operator]
    assert len(_lines(executed)) == 1, _lines(executed)
    assert _lines(fired) == ["fired"]


# 6. Forged and corrupt jobs are buried -----------------------------------------------------
def _forged(runner: str, method: str, args: list[Any], **options: Any) -> bytes:
    return json.dumps({
        "packmule": 1, "runner": runner, "name": "forged", "run": "f0rged", "job": 1,
        "batch": "caller.x", "method": method, "args": args, "options": options,
        "aggregate": False, "kwargs": {}, "lease": 0,
    }).encode()


def _forged_now(runner: str, method: str, args: list[Any]) -> bytes:
    """A forged body of the format packmule writes today (a head, then the job's line)."""
    head = Envelope(runner, "forged", "f0rged", 1, "caller.x", method, args)
    return BodyTemplate(head).body(1, json.dumps(args).encode())


@pytest.mark.timeout(60)
def test_forged_and_corrupt_jobs_are_buried_and_the_worker_goes_on(
        env: dict[str, str], workers: Workers, tmp_path: Path,
        counts: tuple[Path, Path]) -> None:
    _, executed = counts
    touched = tmp_path / "touched"
    bodies = [
        _forged("os:system", "system", [f"touch {touched}"]),
        _forged("subprocess:run", "run", [["touch", str(touched)]]),
        _forged("fault_runners:os.system", "system", [f"touch {touched}"]),
        _forged("fault_runners:Counted", "_secret", ["private"]),
        _forged("fault_runners:Counted", "cancel", []),
        _forged("fault_runners:Counted", "echo", [[1, 0]], colour="red"),
        # A raising job whose max_retries is text: the retry decision itself raises.
        _forged("fault_runners:Flaky", "maybe", [2, 2], max_retries="3"),
        b"\x00\xffnot json at all",
        b"[" * 30_000,  # json raises RecursionError, not ValueError
        b'{"packmule": 1, "runner": "fault_runners:Counted"}',
        _forged_now("os:system", "system", [f"touch {touched}"]),
        _forged_now("fault_runners:Counted", "_secret", ["private"]),
        b'{"packmule": 2, "runner": "fault_runners:Counted"}\n1 0 []',
        _forged_now("fault_runners:Counted", "echo", [[1, 0]]).replace(b"\n1 ", b"\n1 x "),
    ]
    address = backends().settings.beanstalkd[0]
    with greenstalk.Client(address, encoding=None, use=env["PACKMULE_TUBE"]) as client:
        for body in bodies:
            client.put(body, ttr=2)
    (worker,) = workers.start("fault_runners", 1)
    wait_until(lambda: _tube(env).get("current-jobs-buried", 0) == len(bodies), timeout=20,
               what="every forged job to be buried")
    assert worker.poll() is None, "a forged job killed the worker"
    assert Counted("after").run(3) == 3, "the worker must go on to run normal jobs"
    assert not touched.exists(), "a forged job ran a command"
    assert not any("secret" in line for line in _lines(executed))
    assert _tube(env).get("current-jobs-buried", 0) == len(bodies)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("context", ["caller", "worker"])
def test_an_aggregate_fired_before_a_value_is_recorded_waits_for_it(
        env: dict[str, str], workers: Workers, tmp_path: Path,
        counts: tuple[Path, Path], context: str) -> None:
    """Invariant 1 under a twin count: the batch looks complete while a job still runs;
    the aggregate fires, finds the value missing, and is called once the value is there."""
    fired, _ = counts
    gate = tmp_path / "gate"
    workers.start("fault_runners", 3)
    runner = Straggler(f"straggler-{context}")
    if context == "caller":
        thread, outcome = in_thread(lambda: runner.run(str(gate)))
    else:
        runner.run_async(str(gate))
    run = wait_until(lambda: Straggler.find(runner.name), timeout=10, what="the run to start")
    coord = backends().coord
    marker = wait_until(lambda: coord.get_prefix(f"{coord.prefix}/r/{run.run}/a/"),
                        timeout=20, what="the aggregate to fire")
    assert any(key.endswith("/fired") for key in marker)
    time.sleep(0.5)  # the aggregate has been gathering (caller) or parked again (worker)
    assert _lines(fired) == [], "the aggregate was called without the gated job's value"
    gate.touch()
    if context == "caller":
        thread.join(timeout=20)
        assert outcome.get("value") == 6, outcome
    else:
        assert _finished(runner, timeout=20).state == "done"
        assert runner.get_return_value() == 6
    assert _lines(fired) == ["fired"]


# 7. Failures: retried, buried, counted, reported; handled; tolerated; kicked --------------
@pytest.mark.timeout(60)
def test_a_raising_job_is_retried_then_buried_and_the_caller_gets_run_failed(
        env: dict[str, str], workers: Workers, tmp_path: Path,
        counts: tuple[Path, Path]) -> None:
    fired, executed = counts
    workers.start("fault_runners", 2)
    runner = Flaky("failing", max_retries=2)
    thread, outcome = in_thread(lambda: runner.run(5, 2))
    thread.join(timeout=30)  # retries back off ~0 s then ~1-2 s: the failure is prompt
    assert not thread.is_alive(), "run() still blocks 30 s after the job failed for good"
    error = outcome.get("error")
    assert isinstance(error, packmule.RunFailed), repr(outcome)
    assert error.job is not None and error.job.number == 3  # items 0..4 are jobs 1..5
    assert "ValueError: job 2 is broken" in error.traceback
    assert "Traceback" in error.traceback
    assert _lines(executed).count("maybe 2") == 3  # the first run and two retries
    assert _lines(fired) == []
    progress = Flaky("failing").update_progress()
    assert (progress.state, progress.failed, progress.completed) == ("failed", 1, 4)
    wait_until(lambda: _tube(env).get("current-jobs-buried", 0) == 1, timeout=10,
               what="the failed job to be buried")


@pytest.mark.timeout(60)
def test_handle_error_supplies_the_value_of_a_failing_job(
        env: dict[str, str], workers: Workers, tmp_path: Path,
        counts: tuple[Path, Path]) -> None:
    fired, _ = counts
    workers.start("fault_runners", 2)
    assert Handled("rescued").run(5, 2) == 0 + 1 + 1002 + 3 + 4
    progress = Handled("rescued").update_progress()
    assert (progress.state, progress.handled, progress.failed) == ("done", 1, 0)
    assert (progress.completed, progress.total) == (6, 6)
    assert _tube(env).get("current-jobs-buried", 0) == 0
    assert _lines(fired) == ["fired"]


@pytest.mark.timeout(60)
def test_allow_failures_passes_failure_objects(env: dict[str, str], workers: Workers,
                                               counts: tuple[Path, Path]) -> None:
    workers.start("fault_runners", 2)
    values = Tolerant("tolerant").run(5, 2)
    assert values[:2] + values[3:] == [0, 1, 3, 4]
    assert isinstance(values[2], packmule.Failure)
    assert values[2].job == 3 and "ValueError: job 2 is broken" in values[2].traceback
    assert Tolerant("tolerant").update_progress().failed == 1

    TolerantInWorker("tolerant-w").run_async(5, 2)
    assert _finished(TolerantInWorker("tolerant-w"), timeout=30).state == "done"
    assert TolerantInWorker("tolerant-w").get_return_value() == [
        0, 1, "failed 3: ValueError: job 2 is broken", 3, 4]


@pytest.mark.timeout(60)
def test_kicking_a_buried_job_after_a_fix_resumes_the_run(
        env: dict[str, str], workers: Workers, tmp_path: Path,
        counts: tuple[Path, Path]) -> None:
    fired, executed = counts
    fix = tmp_path / "fixed"
    env["PACKMULE_TEST_FIX_FILE"] = str(fix)
    workers.start("fault_runners", 2)
    runner = Flaky("kicked")
    runner.run_async(5, 2)
    wait_until(lambda: _tube(env).get("current-jobs-buried", 0) == 1, timeout=20,
               what="the failing job to be buried")
    progress = wait_until(lambda: (p := runner.update_progress()).state == "failed" and p,
                          timeout=10, what="the run to fail")
    assert isinstance(progress, packmule.Progress) and progress.failed == 1
    with pytest.raises(packmule.RunFailed):
        runner.get_return_value()

    fix.touch()
    kicked = subprocess.run([sys.executable, "-m", "packmule", "kick", "--tube",
                             env["PACKMULE_TUBE"]], env={**os.environ, **env}, cwd=ROOT,
                            capture_output=True, text=True, timeout=30, check=True)
    assert "kicked 1 buried job(s)" in kicked.stdout
    progress = wait_until(lambda: (p := runner.update_progress()).state == "done" and p,
                          timeout=30, what="the kicked run to finish")
    assert isinstance(progress, packmule.Progress)
    assert runner.get_return_value() == sum(range(5))
    assert (progress.failed, progress.completed, progress.total) == (0, 6, 6)
    assert _lines(fired) == ["fired"]
    assert _lines(executed).count("maybe 2") == 2


# 8. Cancel --------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_cancel_drops_remaining_jobs_and_the_aggregate_never_fires(
        env: dict[str, str], workers: Workers, tmp_path: Path,
        counts: tuple[Path, Path]) -> None:
    fired, executed = counts
    workers.start("fault_runners", 2)
    runner = Counted("cancelled")
    runner.run_async(100, 0.05)
    wait_until(lambda: runner.update_progress().completed >= 5, timeout=30, what="5 jobs")
    runner.cancel()
    wait_until(lambda: _drained(env), timeout=30, what="the cancelled run's jobs to be dropped")
    ran = len(_lines(executed))
    assert ran < 100, "cancelled jobs still ran"
    with pytest.raises(packmule.RunCancelled):
        Counted("cancelled").get_return_value()
    assert Counted("cancelled").update_progress().state == "cancelled"
    # The workers stay up and idle; nothing they do later fires the aggregate.
    assert Counted("next").run(3) == 3
    assert _lines(fired) == ["fired"]  # the "next" run's aggregate only
    assert len([line for line in _lines(executed)]) == ran + 3

