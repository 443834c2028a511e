"""Every run ends, within seconds of the cause, in exactly one true state (DESIGN invariants 4, 10, 12).

Each test reproduces an edge where a run used to end wrong or never end,
against real servers and real workers.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import Workers, wait_until
from ending_runners import Chain, ChainStraggler, Diverging

import packmule
from packmule.backends import backends
from packmule.store import RunKeys


def _in_thread(call: Any) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as err:  # handed to the test thread
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


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
    thread, outcome = _in_thread(lambda: ChainStraggler("twin").run(str(gate), str(note)))
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
