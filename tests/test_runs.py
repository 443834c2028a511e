"""Run records: transitions by transaction, runs by id, identities, loss seen by readers, leases.

Transitions are driven directly against real etcd where a race or an order
must be forced; whole runs go through real workers.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from conftest import Workers, wait_until
from fault_runners import LongJob
from ident_pkg import NestedY
from ident_pkg.sub import Y as FlatY
from runners import Adder, Slow
from runs_runners import Echo

import packmule
from packmule import config, runs
from packmule.backends import backends
from packmule.outcome import Outcome
from packmule.store import RunKeys


def _start(name: str, **options: Any) -> runs.RunRecord:
    return runs.start(backends(), Echo.class_path(), name, **options)


def _revision(run: str) -> int:
    coord = backends().coord
    return coord.get_with_revisions([coord.run_key(run)])[0][1]


def _cancel_flag(run: str) -> bytes | None:
    return backends().store.get(RunKeys(backends().settings.namespace, run).cancelled)


# Identities ------------------------------------------------------------------------------
def test_classes_whose_dotted_names_collide_keep_their_own_runs(env: dict[str, str]) -> None:
    assert NestedY.class_path() == "ident_pkg:sub.Y" and FlatY.class_path() == "ident_pkg.sub:Y"
    assert NestedY("same").run(1) == ["nested", 1]
    assert FlatY("same").run(2) == ["flat", 2]
    nested, flat = NestedY.find("same"), FlatY.find("same")
    assert nested is not None and nested.value == ["nested", 1]
    assert flat is not None and flat.value == ["flat", 2]
    assert (nested.runner, nested.name) == ("ident_pkg:sub.Y", "same")
    assert NestedY("same").get_return_value() == ["nested", 1]
    assert NestedY.find_run(flat.run) is None  # a run belongs to one class
    assert packmule.Runner.find_run(flat.run) == flat


def test_a_name_with_a_slash_is_no_prefix_of_another_name(env: dict[str, str]) -> None:
    assert Echo("a/b").run("slashed") == "slashed"
    assert Echo.find("a") is None
    assert Echo("a").run("plain") == "plain"
    assert Echo("a/b").get_return_value() == "slashed"
    assert Echo("a").get_return_value() == "plain"
    assert Echo("a%2Fb").update_progress().state == "unknown"


# Runs by id --------------------------------------------------------------------------------
def test_the_name_finds_the_latest_started_and_an_older_finish_hides_nothing(
        env: dict[str, str]) -> None:
    older, newer = _start("two"), _start("two")
    assert runs.finish(backends(), older.run, Outcome.done("older"))
    found = Echo.find("two")
    assert found is not None and (found.run, found.state) == (newer.run, "running")
    older_now = Echo.find_run(older.run)
    assert older_now is not None and (older_now.state, older_now.value) == ("done", "older")
    with pytest.raises(packmule.ResultPending):
        Echo("two").get_return_value()
    assert runs.finish(backends(), newer.run, Outcome.done("newer"))
    assert Echo("two").get_return_value() == "newer"
    assert runs.history(backends(), Echo.class_path(), "two") == [older.run, newer.run]


@pytest.mark.timeout(120)
def test_overlapping_runs_of_one_name_each_end_done_with_their_own_value(
        env: dict[str, str], workers: Workers) -> None:
    workers.start("runners", 2)
    values: dict[int, Any] = {}

    def one(count: int) -> None:
        values[count] = Adder("shared").run(count, 0.01)

    threads = [threading.Thread(target=one, args=(count,)) for count in range(3, 9)]
    for thread in threads:
        thread.start()
    ref = Adder("shared").run_async(20, 0.01)
    for thread in threads:
        thread.join(timeout=90)
    assert values == {count: sum(range(count)) for count in range(3, 9)}
    wait_until(lambda: (Adder.find_run(ref.run) or runs.RunRecord("", 0, "")).state != "running",
               timeout=60, what="the run_async run to end")
    ids = runs.history(backends(), Adder.class_path(), "shared")
    assert len(ids) == 7 and ref.run in ids
    records = [Adder.find_run(run) for run in ids]
    assert all(r is not None and r.state == "done" for r in records), records
    assert sorted(r.value for r in records if r) == sorted([*values.values(), sum(range(20))])
    latest = Adder.find("shared")
    assert latest is not None and latest.run == ids[-1]
    last = Adder("shared").run_async(4)  # started last: the name finds it at once
    found = Adder.find("shared")
    assert found is not None and found.run == last.run


# Transitions -------------------------------------------------------------------------------
def test_an_ended_run_refuses_every_transition_and_nothing_is_written(
        env: dict[str, str]) -> None:
    b = backends()
    done = _start("done")
    assert runs.finish(b, done.run, Outcome.done(7))
    failed = _start("failed")
    assert runs.finish(b, failed.run, Outcome.failed(3, "boom", own=False))
    lost = _start("lost")
    assert runs.finish(b, lost.run, Outcome.missing([4], "gone"))
    cancelled = _start("cancelled")
    assert runs.cancel(b, cancelled.run)
    for record in (done, failed, lost, cancelled):
        before, revision = runs.read_run(b, record.run), _revision(record.run)
        assert not runs.finish(b, record.run, Outcome.failed(9, "late", own=False))
        assert not runs.finish(b, record.run, Outcome.missing([9], "late"))
        assert not runs.cancel(b, record.run)
        assert not runs.resume(b, record.run)  # failed, but not resumable
        if record is not failed:
            assert not runs.finish(b, record.run, Outcome.done("late"))
        assert runs.read_run(b, record.run) == before and _revision(record.run) == revision
    assert not runs.finish(b, failed.run, Outcome.done("late"))  # not resumable: refused
    assert Echo("done").get_return_value() == 7


def test_a_resumable_failure_resumes_by_kick_and_may_complete(env: dict[str, str]) -> None:
    b = backends()
    first = _start("resumed")
    assert runs.finish(b, first.run, Outcome.failed(3, "boom", own=False), resumable=True)
    assert runs.resume(b, first.run)
    assert Echo("resumed").update_progress().state == "running"
    assert not runs.resume(b, first.run)  # running: nothing to resume
    assert runs.finish(b, first.run, Outcome.done("fixed"))
    assert Echo("resumed").get_return_value() == "fixed"
    second = _start("completed", resumable=True)
    assert runs.finish(b, second.run, Outcome.failed(2, "boom", own=False))
    assert runs.finish(b, second.run, Outcome.done("after a kick"))  # the resumed run completed
    assert not runs.finish(b, second.run, Outcome.failed(2, "again", own=False))
    assert Echo("completed").get_return_value() == "after a kick"


def test_cancel_of_an_ended_run_keeps_its_outcome(env: dict[str, str]) -> None:
    assert Echo("ended").run(5) == 5
    record = Echo.find("ended")
    assert record is not None
    assert Echo("ended").cancel() is False
    assert Echo("ended").get_return_value() == 5
    assert _cancel_flag(record.run) is None
    with pytest.raises(packmule.UnknownRun):
        Echo("never").cancel()


def test_cancel_of_a_running_run_wins_over_its_finish(env: dict[str, str]) -> None:
    record = _start("running")
    assert Echo("running").cancel() is True
    assert _cancel_flag(record.run) == b"1"
    assert not runs.finish(backends(), record.run, Outcome.done(1))
    with pytest.raises(packmule.RunCancelled):
        Echo("running").get_return_value()


@pytest.mark.timeout(60)
def test_a_finish_racing_a_cancel_exactly_one_wins(env: dict[str, str]) -> None:
    records = [_start(f"race{n}") for n in range(15)]
    barrier = threading.Barrier(2)
    results: dict[str, list[bool]] = {"finish": [], "cancel": []}

    def racer(kind: str) -> None:
        for record in records:
            barrier.wait(timeout=20)
            if kind == "finish":
                won = runs.finish(backends(), record.run, Outcome.done(record.run))
            else:
                won = runs.cancel(backends(), record.run)
            results[kind].append(won)

    threads = [threading.Thread(target=racer, args=(kind,)) for kind in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=50)
    assert len(results["finish"]) == len(results["cancel"]) == len(records)
    for record, finished, cancelled in zip(records, results["finish"], results["cancel"],
                                           strict=True):
        assert finished != cancelled, record.run
        final = runs.read_run(backends(), record.run)
        assert final is not None
        assert (final.state, final.value) == (("done", record.run) if finished
                                              else ("cancelled", None))
        assert (_cancel_flag(record.run) is not None) == cancelled


# Loss seen by readers -------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_readers_see_a_running_runs_lost_state_and_record_it_once(
        env: dict[str, str], workers: Workers) -> None:
    workers.start("runners", 1)
    runner = Slow("lossy")
    ref = runner.run_async(30, 0.2)
    wait_until(lambda: runner.update_progress().completed >= 2, what="some jobs")
    store = backends().store
    keys = RunKeys(backends().settings.namespace, ref.run)
    for index in range(len(store.names)):
        store.delete(keys.sentinel(index), index=index)  # as a restart would
    wait_until(lambda: runner.update_progress().state == "lost", timeout=10, what="lost")
    with pytest.raises(packmule.ResultMissing, match=ref.run):
        runner.get_return_value()
    found = Slow.find("lossy")
    assert found is not None and found.state == "lost"
    assert not runs.finish(backends(), ref.run, Outcome.done(6.0))  # a worker's late "done"
    after = Slow.find_run(ref.run)
    assert after is not None and after.state == "lost"


def test_a_reader_of_a_running_run_sees_a_workers_loss_report(env: dict[str, str]) -> None:
    record = _start("reported")
    coord = backends().coord
    coord.create_if_absent(coord.run_lost_key(record.run),
                           b'{"jobs": [12], "why": "the batch is gone"}', lease=record.lease)
    with pytest.raises(packmule.ResultMissing, match="the batch is gone") as caught:
        Echo("reported").get_return_value()
    assert [ref.number for ref in caught.value.jobs] == [12]
    lost = Echo.find_run(record.run)
    assert lost is not None and (lost.state, lost.lost_jobs) == ("lost", [12])


# Leases -------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_a_run_longer_than_its_ttl_lives_until_ttl_after_its_end(
        env: dict[str, str], workers: Workers) -> None:
    packmule.configure(result_ttl_seconds=3)
    env["PACKMULE_RESULT_TTL_SECONDS"] = "3"
    workers.start("runners", 1)
    runner = Slow("long")
    ref = runner.run_async(16, 0.5)  # about 8 s on one worker
    wait_until(lambda: runner.update_progress().state != "running", timeout=60,
               what="the run to end")
    assert runner.get_return_value() == 8.0
    assert runner.update_progress().state == "done"
    wait_until(lambda: Slow.find_run(ref.run) is None, timeout=20,
               what="the record to expire after its TTL")
    assert Slow.find("long") is None


@pytest.mark.timeout(60)
def test_a_single_job_longer_than_the_ttl_keeps_its_run_alive(
        env: dict[str, str], workers: Workers) -> None:
    packmule.configure(result_ttl_seconds=3)
    env["PACKMULE_RESULT_TTL_SECONDS"] = "3"
    workers.start("fault_runners", 1)
    runner = LongJob("one-long-job")
    runner.run_async(7.0)
    wait_until(lambda: runner.update_progress().state != "running", timeout=40,
               what="the run to end")
    assert runner.get_return_value() == 7.0


def test_every_setting_reads_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACKMULE_RESULT_TTL_SECONDS", "60")
    monkeypatch.setenv("PACKMULE_HEALTH_CHECK_SECONDS", "0.5, 4")
    monkeypatch.setenv("PACKMULE_TTR_SECONDS", "12.5")
    monkeypatch.setenv("PACKMULE_ETCD", "etcd://10.0.0.8:2379")
    config.reset()
    try:
        current = config.settings()
        assert current.result_ttl_seconds == 60 and current.ttr_seconds == 12.5
        assert current.health_check_seconds == (0.5, 4.0)
        assert current.etcd == (("10.0.0.8", 2379),)
        for variable, bad in (("PACKMULE_RESULT_TTL_SECONDS", "a week"),
                              ("PACKMULE_HEALTH_CHECK_SECONDS", "1")):
            monkeypatch.setenv(variable, bad)
            config.reset()
            with pytest.raises(packmule.ConfigurationError, match=variable):
                config.settings()
            monkeypatch.delenv(variable)
    finally:
        config.reset()
