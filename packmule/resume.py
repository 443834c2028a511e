"""How a blocking run that failed is left resumable by a kick.

A run started with ``run_async`` resumes by itself: its root job is
chained to what ``run`` returned, so once a kicked job succeeds, the
aggregates fire again and the root job finishes with the value. A blocking
``run()`` has no root job: its ``run`` method ran in the caller, which
raised ``RunFailed`` and is gone. Its continuation is known only when the
failed wait was the run's value: ``run`` returned the JobRef being waited
for, or failed in ``return self.deferred_result(...)`` (or ``return
self.wait(...)``, through any helpers that ``return`` such a call). Then
the run is handed to the workers: the aggregate's job is parked like a
worker's aggregate, and the run's root is chained to it, so a kick finishes
the run with that value. In any other shape the code after the failed wait
is unknown, and the run stays failed: run it again.
"""

from __future__ import annotations

import dis
from collections.abc import Collection
from types import CodeType
from typing import Any

from packmule import aggregate
from packmule.aggregate import ROOT_JOB, Batches, RunScope
from packmule.jobref import JobRef


def returned_directly(err: BaseException, code: CodeType, waits: Collection[CodeType]) -> bool:
    """Whether ``err`` left ``code`` through ``return <call>`` statements only, from a wait.

    Walks ``err``'s traceback from the frame running ``code`` down to the
    first frame running one of ``waits`` (deferred_result, wait): each frame
    in between must have been calling in a ``return`` statement, so the
    wait's value would have been ``code``'s return value.
    """
    tb = err.__traceback__
    while tb is not None and tb.tb_frame.f_code is not code:
        tb = tb.tb_next
    while tb is not None and tb.tb_frame.f_code not in waits:
        if not _returning_call(tb.tb_frame.f_code, tb.tb_lasti):
            return False
        tb = tb.tb_next
    return tb is not None


def _returning_call(code: CodeType, offset: int) -> bool:
    """Whether the instruction at ``offset`` is a call whose result is returned at once."""
    instructions = list(dis.get_instructions(code))
    index = max((i for i, ins in enumerate(instructions) if ins.offset <= offset), default=-1)
    if index < 0 or index + 1 >= len(instructions):
        return False
    return (instructions[index].opname.startswith("CALL")
            and instructions[index + 1].opname == "RETURN_VALUE")


def park_caller_aggregate(scope: RunScope, number: int, record: dict[str, Any],
                          parked: tuple[int, int]) -> None:
    """Give a caller's aggregate to the workers: its job, parked at ``parked``, fires with it.

    The description now names the parked job, so a later firing (a kicked
    dependency completing) kicks it. Then fire once more: if the kick came
    before the job was parked, its firing found nothing to kick.
    """
    record.update(srv=parked[0], bid=parked[1])
    aggregate.store_description(scope, number, record)
    aggregate.try_fire(scope, number)


def chain_root(scope: RunScope, batches: Batches, target: JobRef) -> None:
    """Make the run's root finish with ``target``'s outcome, as a run_async run's root does."""
    scope.backends.store.add(scope.keys.batch_done("root"), b"0")
    aggregate.register_chain(scope, batches, ROOT_JOB, "root", target)
