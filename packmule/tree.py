"""A run's tree of aggregates, read for operators (the dashboard's run page, ``show --aggregates``).

Every aggregate is noted under its run when it is registered
(:func:`packmule.aggregate.note_aggregate`). For each, this shows only what
is exact and cheap to read: its method, how many jobs it waits on, whether
etcd marked it fired, and how it ended (its outcome record). Aggregates
nest by the job that registered them: one registered inside job ``j``
sits under the aggregate that waits on ``j`` (fibonacci: each ``add()``
under the ``add()`` its ``fib()`` job feeds); one registered by the run
itself (``run()`` or its root job) is a root.

Cost, whatever the number of jobs: one memcached read per 10,000
aggregates for the notes, one read of their descriptions (plus the parts
of a long dependency list), one of their outcomes, and one etcd range read
of the fired markers. Only the first ``limit`` aggregates are read.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

from packmule.aggregate import NOTE_CHUNK, ROOT_JOB, from_ranges
from packmule.backends import Backends
from packmule.envelope import loads
from packmule.outcome import Outcome
from packmule.store import RunKeys


@dataclass
class AggregateNode:
    """One aggregate of a run.

    Attributes:
        number: its job number in the run.
        method: the method it calls with the values ("wait" for ``Runner.wait``).
        jobs: how many jobs it waits on.
        fired: etcd marked it fired (every job it waits on was counted).
        state: ``waiting``, ``fired`` (its values are being gathered or its
            method runs), ``done``, ``failed``, ``lost``, or ``unknown`` (memcached
            lost its description).
        created_by: the job that registered it; None for the run itself.
        children: the aggregates registered by the jobs it waits on.
    """

    number: int
    method: str
    jobs: int
    fired: bool
    state: str
    created_by: int | None
    children: list[AggregateNode] = field(default_factory=list)


@dataclass
class Tree:
    """The aggregates of a run, nested; ``shown`` of ``total`` noted ones."""

    roots: list[AggregateNode]
    total: int
    shown: int


def read_tree(backends: Backends, run: str, *, limit: int = 1000) -> Tree:
    """The tree of ``run``'s first ``limit`` aggregates (by number)."""
    numbers = aggregate_numbers(backends, run)
    shown = numbers[:limit]
    keys = RunKeys(backends.settings.namespace, run)
    store = backends.store
    descriptions = store.get_many([keys.aggregate(n) for n in shown])
    outcomes = store.get_many([keys.job(n) for n in shown])
    fired = _fired(backends, run)
    records: dict[int, dict[str, Any]] = {}
    nodes: dict[int, AggregateNode] = {}
    for number in shown:
        raw = descriptions.get(keys.aggregate(number))
        records[number] = {} if raw is None else dict(loads(raw))
        nodes[number] = _node(number, records[number], fired, outcomes.get(keys.job(number)))
    return Tree(_nest(nodes, _feeds(backends, keys, records, nodes)), len(numbers), len(shown))


def aggregate_numbers(backends: Backends, run: str) -> list[int]:
    """Every aggregate number noted for ``run``, in order (the notes may repeat one)."""
    keys = RunKeys(backends.settings.namespace, run)
    last = backends.store.get(keys.sequence)
    chunks = range(int(last or 0) // NOTE_CHUNK + 1)
    found = backends.store.get_many([keys.aggregates(chunk) for chunk in chunks])
    return sorted({int(number) for notes in found.values() for number in notes.split()})


def _fired(backends: Backends, run: str) -> set[int]:
    """The aggregates etcd marked fired: one range read of the run's markers."""
    coord = backends.coord
    prefix = coord.markers_prefix(run)
    return {int(key[len(prefix):].partition("/")[0]) for key in coord.keys_by_creation(prefix)
            if key.endswith("/fired")}


def _node(number: int, record: dict[str, Any], fired: set[int],
          outcome_raw: bytes | None) -> AggregateNode:
    """One aggregate as its description, marker and outcome record tell it."""
    origin = str(record.get("own", "")).partition(".")[0]
    created_by = int(origin) if origin.isdigit() and int(origin) != ROOT_JOB else None
    jobs = int(record.get("k", len(from_ranges(record.get("deps", [])))))
    if outcome_raw is not None:
        outcome = Outcome.decode(outcome_raw)
        state = "done" if outcome.ok else "lost" if outcome.lost else "failed"
    elif not record:
        state = "unknown"
    else:
        state = "fired" if number in fired else "waiting"
    return AggregateNode(number, str(record.get("m", "")) or "?", jobs, number in fired, state,
                         created_by)


def _feeds(backends: Backends, keys: RunKeys, records: dict[int, dict[str, Any]],
           nodes: dict[int, AggregateNode]) -> dict[int, int]:
    """For each job that registered an aggregate, the first aggregate waiting on it."""
    origins = sorted({n.created_by for n in nodes.values() if n.created_by is not None})
    if not origins:
        return {}
    parted = [n for n, r in records.items() if "parts" in r]
    parts = backends.store.get_many([keys.aggregate_part(n, p) for n in parted
                                     for p in range(records[n]["parts"])])
    feeds: dict[int, int] = {}
    for number, record in records.items():
        ranges = record.get("deps", [])
        if "parts" in record:
            ranges = [r for p in range(record["parts"])
                      for r in loads(parts.get(keys.aggregate_part(number, p), b"[]"))]
        for first, last in ranges:
            for origin in origins[bisect.bisect_left(origins, first):
                                  bisect.bisect_right(origins, last)]:
                feeds.setdefault(origin, number)
    return feeds


def _nest(nodes: dict[int, AggregateNode], feeds: dict[int, int]) -> list[AggregateNode]:
    """Attach each node under the aggregate its creating job feeds; the rest are roots."""
    roots: list[AggregateNode] = []
    for number, node in nodes.items():
        job = node.created_by
        parent = None if job is None else feeds.get(job, job if job in nodes else None)
        if parent is None or parent == number or parent not in nodes:
            roots.append(node)
        else:
            nodes[parent].children.append(node)
    return roots

