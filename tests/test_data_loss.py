"""Values lost from memcached are reported (ResultMissing) or passed as MISSING, never wrong."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import Workers
from runners import Collector

import packmule
from packmule.backends import backends
from packmule.jobref import JobRef
from packmule.store import RunKeys


def _lose(jobs: list[JobRef], *numbers: int) -> None:
    """Delete job records and the sentinel of the server holding them, as a restart would."""
    store = backends().store
    keys = RunKeys(backends().settings.namespace, jobs[0].run)
    for number in numbers:
        index = store.server_of(keys.job(number))
        store.delete(keys.job(number))
        store.delete(keys.sentinel(index), index=index)


def test_lost_value_raises_result_missing_naming_the_job(env: dict[str, str],
                                                         workers: Workers) -> None:
    workers.start("runners", 2)
    runner = Collector("halting")
    runner.before_register = lambda jobs: _lose(jobs, jobs[3].number)
    with pytest.raises(packmule.ResultMissing) as caught:
        runner.run(8)
    assert [ref.number for ref in caught.value.jobs] == [4]
    record = Collector.find("halting")
    assert record is not None and record.state == "lost"


def test_lost_value_becomes_missing_when_not_halting(env: dict[str, str],
                                                     workers: Workers) -> None:
    workers.start("runners", 2)
    runner = Collector("tolerant", halt_on_data_loss=False)
    runner.before_register = lambda jobs: _lose(jobs, jobs[3].number)
    values: list[Any] = runner.run(8)
    assert values[3] is packmule.MISSING
    assert values[:3] + values[4:] == [0, 1, 2, 4, 5, 6, 7]
    assert Collector("tolerant").update_progress().lost == 1
