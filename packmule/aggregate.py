"""The aggregate protocol: count completions, detect "all done", fire once.

Jobs are counted in *batches*: the jobs one context (a caller's run, or
one job's execution) enqueues between two `deferred_result` calls. A batch
has a completion counter ``d:B`` (incremented by every completion attempt)
and, once a `deferred_result` closes it, a record ``b:B`` with its size and
the *waiters* on it. An aggregate waits on the batches its jobs are in.

Both sides write first, then read: a completion increments ``d:B`` then
reads ``b:B``; a registration writes ``b:B`` then reads ``d:B``. Whoever
comes second sees the batch complete, so the last completion is never
missed (no registration race), and when both see it the etcd marker
records the firing once. A redelivered job increments ``d:B`` again, so the
counter may run ahead of the values: the aggregate's consumer (the blocked
caller, or the aggregate's parked job once kicked) reads the values once
and :func:`settle` says whether a missing one means memcached lost state
(its sentinel is gone or it evicted keys: a loss, reported) or a job not
done yet (wait: its completion fires, and kicks, again).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from operator import itemgetter
from types import EllipsisType
from typing import Any, cast

from packmule import runs
from packmule.backends import Backends
from packmule.envelope import dumps, loads
from packmule.errors import EncodeError, EnqueueError, ResultMissing, ServerError, ServerRefused
from packmule.jobref import JobRef
from packmule.markers import MARK_BYTES, MISSING, Failure, restore
from packmule.outcome import Outcome
from packmule.store import Ask, Quiet, Reply, RunKeys

ROOT_JOB = 0
Waiter = list[Any]  # ["a", aggregate] or ["c", chained job, source job, chained job's batch]


@dataclass
class RunScope:
    """One run, as one context sees it: ids, keys, clients and options."""

    run: str
    lease: int
    identity: str
    backends: Backends
    count_progress: bool = True
    keys: RunKeys = field(init=False, repr=False)
    # What follows an outcome's add in its completion's write, by (batch, the
    # counter it counts in, batch record read): the same for every job of a batch.
    _completion_tails: dict[tuple[str, str | None, bool], list[Quiet | Ask]] = field(
        init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.keys = RunKeys(self.backends.settings.namespace, self.run)

    def completion_tail(self, batch: str, counter: str | None,
                        read_batch: bool) -> list[Quiet | Ask]:
        """The commands a completion in ``batch`` sends after its outcome (see
        _record_in_one_write): ``counter`` counted, the batch counted and maybe read."""
        key = (batch, counter, read_batch)
        tail = self._completion_tails.get(key)
        if tail is None:
            if len(self._completion_tails) >= 1000:
                self._completion_tails.clear()
            keys = self.keys
            tail = self._completion_tails[key] = [
                *([Quiet("incr", counter)] if counter else []), Ask("incr", keys.batch_done(batch)),
                *([Ask("get", keys.batch(batch))] if read_batch else [])]
        return tail

    def ref(self, number: int, batch: str = "") -> JobRef:
        """The JobRef of job ``number`` of this run."""
        queue = self.backends.queue
        return JobRef(number, queue.names[queue.server_for(number)], self.run, batch)


class Batches:
    """The batches of one context: the open one and the sizes of all.

    In a job (``replayable``), each allocation of job numbers is recorded
    under the job's own key with a signature of the call (method and
    arguments), so a redelivered job that makes the same calls again gets
    the same numbers and batches: its children and aggregates are the same
    jobs again (counted once, fired once), not a second set. An execution
    that makes a different call (a retry taking another path, a fix deployed
    before a kick) gets fresh numbers from there on: it never receives the
    value of a job it did not enqueue.
    """

    def __init__(self, scope: RunScope, origin: str, *, replayable: bool = False) -> None:
        self.scope = scope
        self.origin = origin
        self.replayable = replayable
        self.current: str | None = None
        self.sizes: dict[str, int] = {}
        self._allocations = 0
        self._diverged = False  # this execution's calls left the recorded ones
        # Not replayable: job numbers [_next, _end) taken ahead from the run's
        # sequence and counted in its total, so a loop of enqueues does not
        # pay a round trip each; the rest is uncounted by release().
        self._next = self._end = 0
        self._taken = 0  # numbers this context used: the next block's size, up to BLOCK

    def reserve(self, count: int, signature: str = "") -> tuple[int, str]:
        """Number ``count`` new jobs and count them in the open batch: ``(first, batch)``.

        ``signature`` identifies the call (see :func:`call_signature`); a
        recorded allocation is replayed only for the same count and signature.
        """
        if not self.replayable:
            first, current = self._next, self.current
            if current is None or first + count > self._end:  # a new block or batch
                return self._take(count), self._join(count)
            self._next = first + count  # a loop of single enqueues: numbers taken ahead
            self._taken += count
            self.sizes[current] += count
            return first, current
        self._allocations += 1
        store = self.scope.backends.store
        key = self.scope.keys.allocation(self.origin, self._allocations)
        if not self._diverged:
            raw = store.get(key)
            replayed = self._replay(raw, count, signature)
            if replayed:
                return replayed
            self._diverged = raw is not None
        first, batch = allocate(self.scope, count), self._join(count)
        record = dumps([first, count, batch, signature])
        if self._diverged:
            store.set(key, record)  # a later execution making this one's calls replays them
        elif not store.add(key, record):  # a twin execution recorded first: use its numbers
            replayed = self._replay(store.get(key), count, signature, instead_of=(batch, count))
            if replayed:
                return replayed
            self._diverged = True
        return first, batch

    def _replay(self, raw: bytes | None, count: int, signature: str, *,
                instead_of: tuple[str, int] | None = None) -> tuple[int, str] | None:
        """The recorded ``(first, batch)`` if ``raw`` records this same call, else None.

        ``instead_of``: an allocation just made that the replay replaces (its
        jobs will never be put): uncounted from its batch and the run's total.
        """
        if raw is None:
            return None
        first, recorded, batch, *rest = loads(raw)
        if (recorded, rest) != (count, [signature]):
            return None
        if instead_of is not None:
            self.sizes[instead_of[0]] -= instead_of[1]
            self.scope.backends.store.decr_quietly(self.scope.keys.total, instead_of[1])
        self.current = batch
        self.sizes[batch] = self.sizes.get(batch, 0) + count
        return first, batch

    def _take(self, count: int) -> int:
        """The first of ``count`` new job numbers, from the block taken ahead or a new one.

        A new block is as large as the numbers used so far (at least
        ``count``, at most BLOCK more), so the total counted ahead never
        exceeds the jobs this context enqueued, nor them plus BLOCK.
        """
        first, end = self._next, self._end
        if count > end - first:
            size = max(count, min(BLOCK, self._taken))
            first = allocate(self.scope, size, counted=size - (end - first))
            self._end = first + size
        self._next = first + count
        self._taken += count
        return first

    def release(self) -> None:
        """Uncount the numbers taken ahead and not used: the run's total is exact again.

        Called before the context waits or its run ends (a later enqueue
        takes a new block).
        """
        if self._end > self._next:
            self.scope.backends.store.decr_quietly(self.scope.keys.total, self._end - self._next)
        self._next = self._end = 0

    def _join(self, count: int) -> str:
        if self.current is None:
            self.current = f"{self.origin}.{uuid.uuid4().hex[:10]}"
            self.scope.backends.store.add(self.scope.keys.batch_done(self.current), b"0")
            self.sizes[self.current] = 0
        self.sizes[self.current] += count
        return self.current

    def close(self, batch: str) -> int:
        """Close ``batch`` (later jobs go to a new one); its size.

        Raises:
            EnqueueError: the batch is not this context's: an aggregate can
                only wait on jobs enqueued in the same run method or job.
        """
        if batch not in self.sizes:
            raise EnqueueError(
                f"deferred_result: batch {batch!r} was not enqueued in this context; "
                "wait only on jobs enqueued by the same run() or job"
            )
        if batch == self.current:
            self.current = None
        return self.sizes[batch]


def call_signature(method: str, *parts: bytes) -> str:
    """A short digest of one enqueue or deferred_result call: its method and encoded arguments."""
    digest = hashlib.blake2b(method.encode(), digest_size=8)
    for part in parts:
        digest.update(b"\0")
        digest.update(part)
    return digest.hexdigest()


# The most job numbers a caller takes ahead of its enqueues (see Batches._take).
BLOCK = 256


def allocate(scope: RunScope, count: int, *, counted: int | None = None) -> int:
    """Allocate ``count`` job numbers; the first one.

    The run's total grows by ``counted`` (``count`` unless given; less when
    numbers taken ahead before are given up), sent before the allocation in
    the same write, so the jobs are counted before any of them can finish.
    """
    store, keys = scope.backends.store, scope.keys
    counted = count if counted is None else counted
    total = [Quiet("incr" if counted > 0 else "decr", keys.total, abs(counted))] if counted else []
    last = store.incr(keys.sequence, count, quiet_first=total)
    if last is None:
        raise ResultMissing(f"run {scope.run}: memcached lost the run's state (job sequence)")
    return last - count + 1


def as_ranges(numbers: Iterable[int]) -> list[list[int]]:
    """Compress job numbers into ``[first, last]`` runs, keeping their order."""
    ranges: list[list[int]] = []
    for n in numbers:
        if ranges and ranges[-1][1] + 1 == n:
            ranges[-1][1] = n
        else:
            ranges.append([n, n])
    return ranges


def from_ranges(ranges: list[list[int]]) -> list[int]:
    """The job numbers :func:`as_ranges` compressed."""
    return [n for first, last in ranges for n in range(first, last + 1)]


def add_waiter(scope: RunScope, batch: str, size: int, waiter: Waiter) -> None:
    """Record ``waiter`` on ``batch`` (closing it at ``size``), with add or cas.

    A waiter already there (a redelivered job registering its chain or
    aggregate again) is not added twice: every copy would be woken, and
    down a chain the copies multiply.
    """
    store, key = scope.backends.store, scope.keys.batch(batch)
    while True:
        if store.add(key, dumps({"k": size, "w": [waiter]})):
            return
        data, token = store.gets(key)
        if data is None or token is None:
            continue
        record = loads(data)
        if waiter in record["w"]:
            return
        record["w"].append(waiter)
        if store.cas(key, dumps(record), token):
            return


def batches_state(scope: RunScope, batches: list[str],
                  found: dict[str, bytes] | None = None) -> str:
    """``done``, ``pending`` or ``lost`` for these batches together.

    ``found``: their records and counters, if read already.
    """
    if not batches:
        return "done"
    keys = scope.keys
    wanted = [keys.batch(b) for b in batches] + [keys.batch_done(b) for b in batches]
    found = scope.backends.store.get_many(wanted) if found is None else found
    if any(key not in found for key in wanted):
        return "lost"
    done = all(int(found[keys.batch_done(b)]) >= loads(found[keys.batch(b)])["k"] for b in batches)
    return "done" if done else "pending"


def report_loss(scope: RunScope, jobs: list[int], why: str) -> None:
    """Tell every waiter of the run (through etcd) that memcached lost its state."""
    coord = scope.backends.coord
    coord.create_if_absent(coord.run_lost_key(scope.run),
                           dumps({"jobs": jobs[:100], "why": why}), lease=scope.lease)


def complete(scope: RunScope, job: int, batch: str, outcome: Outcome, *,
             written: Recorded | None = None) -> Outcome:
    """Record how ``job`` ended and wake whoever waits on its batch. Idempotent.

    The first outcome recorded wins, except that a failure is replaced by a
    value (a buried job kicked after a fix). Returns the recorded outcome.
    ``written``: what the job's write said, if it went in a shared write
    (see :func:`complete_all`).

    A completion can complete chained jobs (a job that returned this job's
    JobRef), which can complete theirs: they are worked off a list, never by
    recursion, so a chain of any depth costs no stack.
    """
    recorded = _work_off(scope, [(job, batch, outcome)], written)
    assert recorded is not None
    return recorded


def _work_off(scope: RunScope, pending: list[Completion],
              written: Recorded | None = None) -> Outcome | None:
    """Complete ``pending`` and the chained completions they lead to; the first's outcome."""
    done: set[int] = set()  # a job woken twice here (a waiter's copies) completes once
    recorded: Outcome | None = None
    while pending:
        completion = pending.pop()
        if completion[0] in done:
            continue
        done.add(completion[0])
        effective = _complete_one(scope, *completion, pending, written)
        written = None
        recorded = recorded or effective
    return recorded


Completion = tuple[int, str, Outcome]  # (job, its batch, how it ended)
Completing = tuple[RunScope, int, str, Outcome]  # (its run, job, its batch, how it ended)


def complete_all(completions: Sequence[Completing]) -> list[Exception | None]:
    """Complete several jobs (a worker's batch of quick jobs), their writes in one.

    memcached is woken once for the batch, not once per job: each job's
    outcome is added as :func:`_record_in_one_write` adds it, and the jobs
    of one batch counting in one counter are counted together, one ``incr``
    of the progress and one of the batch for all of them. When each of them
    recorded its outcome first (the rule), the batch's waiters are looked at
    once, with the count after the last, as that job's own completion would
    have; otherwise each job reads the count as if those before it in the
    write had counted one by one, and what follows for each (a twin's count
    taken back, waiters woken) is :func:`complete`'s. A job whose write
    cannot share (a large value, keys spread over a pool, a run's own
    method) is completed on its own. Returns, per job, the error
    :func:`complete` would raise (EncodeError, ServerRefused: the job fails
    for good) or None; an outage raises (every job is handed out again).
    """
    writes: list[_Write | Exception | None] = []
    for scope, job, batch, outcome in completions:
        try:
            writes.append(_completion_write(scope, job, batch, outcome))
        except EncodeError as err:
            writes.append(err)
    replies, firsts = _shared_write(completions, writes)
    notified = {position for members, _, _ in firsts for position in members}
    errors: list[Exception | None] = [None] * len(completions)
    for members, done, raw in firsts:  # the rule first: it wakes the waiters soonest
        scope, job, batch, _ = completions[members[-1]]
        try:
            _work_off(scope, _notify(scope, job, batch, done, raw))
        except (EncodeError, ServerRefused) as err:  # a chained job's, as complete() raises
            errors[members[-1]] = err
    for position, ((scope, job, batch, outcome), write) in enumerate(zip(completions, writes,
                                                                         strict=True)):
        if isinstance(write, Exception):
            errors[position] = write
        elif position not in notified:
            try:
                written = None if write is None or position not in replies else _written(
                    scope, job, outcome, write, *replies[position])
                complete(scope, job, batch, outcome, written=written)
            except (EncodeError, ServerRefused) as err:
                errors[position] = err
    return errors


Said = Reply | ServerRefused  # a reply read with refusals in place (see Store.in_one_write)
SharedReplies = tuple[Said, Said, Said | EllipsisType]
Firsts = list[tuple[list[int], int | None, bytes | EllipsisType | None]]


def _shared_write(completions: Sequence[Completing], writes: Sequence[_Write | Exception | None],
                  ) -> tuple[dict[int, SharedReplies], Firsts]:
    """Send the completions that can share one write.

    Returns the replies by position, (added, done, raw), of the jobs to
    complete one by one, and the groups (positions, done, raw) of a batch
    counter whose jobs all recorded their outcome first.
    """
    groups: dict[tuple[str | None, str, str | None], list[int]] = {}
    adding: dict[int, Ask] = {}
    batch_keys: dict[tuple[str, str, bool], tuple[str, str | None]] = {}  # (done, read) keys
    for position, write in enumerate(writes):
        scope, job, batch, _ = completions[position]
        if type(write) is _Write and job != ROOT_JOB:
            keys = batch_keys.get((scope.run, batch, write.read_batch))
            if keys is None:
                keys = batch_keys[scope.run, batch, write.read_batch] = (
                    scope.keys.batch_done(batch),
                    scope.keys.batch(batch) if write.read_batch else None)
            groups.setdefault((write.counter, *keys), []).append(position)
            adding[position] = Ask("add", write.key, write.data)
    if not groups:
        return {}, []
    adds = [position for members in groups.values() for position in members]
    commands: list[Quiet | Ask] = [adding[position] for position in adds]
    for (counter, done_key, read), members in groups.items():
        commands += [*([Quiet("incr", counter, len(members))] if counter else []),
                     Ask("incr", done_key, len(members)), *([Ask("get", read)] if read else [])]
    replies = completions[0][0].backends.store.in_one_write(commands)
    if replies is None:
        return {}, []
    added = dict(zip(adds, replies, strict=False))
    found: dict[int, SharedReplies] = {}
    firsts: Firsts = []
    at = len(adds)
    for (_, _, read), members in groups.items():
        done, raw = replies[at], replies[at + 1] if read else ...
        at += 2 if read else 1
        if (all(added[position] is True for position in members)
                and not isinstance(done, ServerRefused | bool | bytes)
                and not isinstance(raw, ServerRefused | bool | int)):
            firsts.append((members, done, raw))
            continue
        for behind, position in enumerate(reversed(members)):
            found[position] = (added[position],
                               done - behind if isinstance(done, int) else done, raw)
    return found, firsts


def _complete_one(scope: RunScope, job: int, batch: str, outcome: Outcome,
                  pending: list[Completion], written: Recorded | None = None) -> Outcome:
    """Record one job's outcome (unless ``written``) and notify its batch; chained
    completions go to ``pending``."""
    quick = written or _record_in_one_write(scope, job, batch, outcome)
    effective, revived, done, raw = quick or _record_then_count(scope, job, batch, outcome,
                                                                counts=_counts(scope, job))
    if revived is not None:  # a kicked job succeeded: its run, failed by it, is running again
        runs.resume(scope.backends, scope.run)
    pending.extend(_notify(scope, job, batch, done, raw))
    if job == ROOT_JOB:
        runs.finish(scope.backends, scope.run, effective)
    return effective


COUNTED = b"\n"
# (the outcome that stands, a failure it replaced, the batch's completions, its record or ...)
Recorded = tuple[Outcome, Outcome | None, int | None, bytes | EllipsisType | None]


def _counts(scope: RunScope, job: int) -> bool:
    """Whether ``job`` counts in its run's progress (the run's own method does not)."""
    return job != ROOT_JOB and scope.count_progress


@dataclass(slots=True)
class _Write:
    """What a completion's write says (see :meth:`Store.in_one_write`), and how to read
    its replies."""

    key: str  # the job's record
    data: bytes  # the outcome as recorded
    counter: str | None  # the progress counter it counts in
    read_batch: bool  # whether the batch record is read (its size unknown yet)


def _completion_write(scope: RunScope, job: int, batch: str, outcome: Outcome) -> _Write | None:
    """What the one write that records, counts and reads ``job``'s completion says (see
    :func:`_record_in_one_write`); None if its outcome is too large for it."""
    store, keys = scope.backends.store, scope.keys
    key, counts = keys.job(job), _counts(scope, job)
    data = outcome.encode() + (COUNTED if counts else b"")
    if len(data) > 1000 and len(data) > store.value_limit(key):
        return None
    counter = _counter(keys, outcome) if counts else None
    return _Write(key, data, counter, batch not in scope.backends.batch_sizes)


def _written(scope: RunScope, job: int, outcome: Outcome, write: _Write,
             added: Said, done: Said, raw: Said | EllipsisType) -> Recorded:
    """What ``write``'s replies say (its add, its batch's count and record): the
    outcome that stands, counts made right.

    Raises:
        ServerRefused: the outcome was refused (memcached full): it is not counted.
    """
    if isinstance(added, ServerRefused):
        if write.counter:
            scope.backends.store.decr_quietly(write.counter)
        raise added
    for said in (done, raw):
        if isinstance(said, ServerRefused):
            raise said
    assert isinstance(done, int | None) and isinstance(raw, bytes | EllipsisType | None)
    if added:
        return outcome, None, done, raw
    return (*_reconcile(scope, job, outcome, write.data, counts=_counts(scope, job)), done, raw)


def _record_in_one_write(scope: RunScope, job: int, batch: str,
                         outcome: Outcome) -> Recorded | None:
    """An outcome recorded, counted, its batch counted and read: one write, one round trip.

    The progress count (completed, or failed for the job's own failure) and
    the "counted" mark travel with the outcome, before knowing whether this
    execution recorded it first; if an earlier one did (a redelivery, a twin
    failing at the same time, a kicked failure), :func:`_reconcile` sets the
    counts right after, so a job that runs twice counts once. The batch
    record is read in the same write unless its size is known (then only
    once it may be done). None, nothing sent: an outcome over the server's
    item size (the slower path names it), or keys spread over a memcached
    pool (see :func:`_record_then_count`).
    """
    write = _completion_write(scope, job, batch, outcome)
    if write is None:
        return None
    commands = [Ask("add", write.key, write.data),
                *scope.completion_tail(batch, write.counter, write.read_batch)]
    replies = scope.backends.store.in_one_write(commands)
    if replies is None:
        return None
    return _written(scope, job, outcome, write, replies[0], replies[1],
                    replies[2] if write.read_batch else ...)


def _reconcile(scope: RunScope, job: int, outcome: Outcome, data: bytes, *,
               counts: bool) -> tuple[Outcome, Outcome | None]:
    """An earlier execution recorded ``job``: which outcome stands, and the counts made right.

    ``data`` was counted as if it were the first record. The earlier record
    stands if it is a value, or if ours is a failure too (the first failure
    wins): our count is taken back, and the earlier record counted and marked
    if it never was. A failure is replaced by a value (a buried job kicked
    after a fix): ``(value, the failure)``, the failure uncounted.
    """
    store, key = scope.backends.store, scope.keys.job(job)
    while True:
        old, token = store.gets(key)
        if old is None or token is None:  # gone meanwhile (evicted): ours is the record
            if store.add(key, data):
                return outcome, None
            continue
        prior, was_counted = Outcome.decode(old), old.endswith(COUNTED)
        if prior.ok or not outcome.ok:
            if counts:
                _recount(scope, key, ours=outcome, unmarked=None if was_counted else prior)
            return prior, None
        if store.cas(key, data, token):
            revived = prior if was_counted else None
            if counts and revived is not None and revived.own:
                store.decr_quietly(scope.keys.failed)
            return outcome, revived


def _counter(keys: RunKeys, outcome: Outcome) -> str | None:
    """The progress counter ``outcome`` counts in: completed, failed (its own failure), or none."""
    return keys.completed if outcome.ok else keys.failed if outcome.own else None


def _recount(scope: RunScope, key: str, *, ours: Outcome, unmarked: Outcome | None) -> None:
    """Take back the count ``ours`` made with its write; count and mark ``unmarked`` (the
    record that stands, if its own execution died before counting it)."""
    store = scope.backends.store
    taken = _counter(scope.keys, ours)
    owed = None if unmarked is None else _counter(scope.keys, unmarked)
    if unmarked is not None:
        store.append_quietly(key, COUNTED)
    if taken == owed:  # ours stands for it
        return
    if taken:
        store.decr_quietly(taken)
    if owed:
        store.incr_quietly(owed)


def _record_then_count(scope: RunScope, job: int, batch: str, outcome: Outcome, *,
                       counts: bool) -> Recorded:
    """Record an outcome (waiting for the reply), then send its counts with its batch's.

    A failure's count depends on what was recorded before, and with a pool
    of memcached servers the keys may live apart.
    """
    effective, revived, counted = _record(scope, job, outcome)
    counting: list[Quiet] = []
    if not counted and counts:
        # The record ends with a newline once counted (JSON ignores it): a job that
        # dies between recording and counting is counted when it runs again.
        counting = [*_count(scope, effective, revived), Quiet("append", scope.keys.job(job), COUNTED)]
    done = scope.backends.store.incr(scope.keys.batch_done(batch), quiet_first=counting)
    return effective, revived, done, ...


def _record(scope: RunScope, job: int, outcome: Outcome) -> tuple[Outcome, Outcome | None, bool]:
    """Store ``outcome`` unless one is recorded; ``(recorded, revived failure, counted)``."""
    store, key = scope.backends.store, scope.keys.job(job)
    data = outcome.encode()
    while not store.add(key, data):
        old, token = store.gets(key)
        if old is None or token is None:
            continue
        prior = Outcome.decode(old)
        if prior.ok or not outcome.ok:
            return prior, None, old.endswith(COUNTED)
        if store.cas(key, data, token):
            return outcome, (prior if old.endswith(COUNTED) else None), False
    return outcome, None, False


def _count(scope: RunScope, outcome: Outcome, revived: Outcome | None) -> list[Quiet]:
    """The progress counter writes for a newly recorded outcome."""
    keys = scope.keys
    if outcome.ok:
        revived_failure = revived is not None and revived.own
        return [Quiet("incr", keys.completed)] + ([Quiet("decr", keys.failed)] if revived_failure else [])
    return [Quiet("incr", keys.failed)] if outcome.own else []


def _notify(scope: RunScope, job: int, batch: str, done: int | None,
            raw: bytes | EllipsisType | None) -> list[Completion]:
    """Wake the waiters of ``batch`` if its ``done`` completions may complete it.

    ``raw`` is the batch record read with the count (None: not closed yet),
    or ``...`` if it was not read. Returns the completions of chained jobs
    that can now finish.
    """
    if done is None:
        report_loss(scope, [job], f"the completion counter of batch {batch} is gone")
        return []
    sizes = scope.backends.batch_sizes
    if done < sizes.get(batch, 0):
        return []  # a closed batch's size never changes: skip the read until it may be done
    if raw is ...:
        raw = scope.backends.store.get(scope.keys.batch(batch))
    if raw is None:
        return []
    record = loads(raw)
    if len(sizes) > 100_000:
        sizes.clear()
    sizes[batch] = record["k"]
    if done < record["k"]:
        return []
    chained = (trigger(scope, waiter, batch) for waiter in record["w"])
    return [completion for completion in chained if completion is not None]


def trigger(scope: RunScope, waiter: Waiter, batch: str | None = None) -> Completion | None:
    """Act for a waiter whose batches look complete.

    An aggregate is fired (if it is ready). A chained job can finish once its
    source recorded an outcome: its completion is returned for the caller to
    record. A batch counted complete while its source has no outcome yet
    (a redelivered sibling counted twice) is not a loss: the source's own
    completion triggers the waiter again. Only memcached having lost the
    run's state makes the missing value a loss. ``batch``: the batch whose
    completion triggers the waiter, if one does.
    """
    if waiter[0] == "a":
        try_fire(scope, waiter[1], batch)
        return None
    _, chained, source, chained_batch = waiter
    raw = scope.backends.store.get(scope.keys.job(source))
    if raw is not None:
        outcome = Outcome.decode(raw)
        return chained, chained_batch, (outcome if outcome.ok else replace(outcome, own=False))
    if runs.state_lost(scope.backends, scope.run):
        return chained, chained_batch, Outcome.missing([source], "the value of a chained job is gone")
    return None


def register_chain(scope: RunScope, batches: Batches, job: int, batch: str, ref: JobRef) -> None:
    """Make ``job`` finish with ``ref``'s outcome (a job returned a deferred result)."""
    waiter: Waiter = ["c", job, ref.number, batch]
    add_waiter(scope, ref.batch, batches.close(ref.batch), waiter)
    state = batches_state(scope, [ref.batch])
    if state == "done":
        completion = trigger(scope, waiter)
        if completion is not None:
            complete(scope, *completion)
    elif state == "lost":
        report_loss(scope, [ref.number], "the batch of a chained job is gone")


def register_aggregate(
    scope: RunScope, batches: Batches, deps: list[JobRef], *,
    park: Callable[[int, str], tuple[int, int]] | None, allow_failures: bool, halt: bool,
    signature: str = "", method: str = "",
) -> tuple[JobRef, dict[str, Any]]:
    """Register an aggregate over ``deps``; its JobRef and the description stored.

    ``park`` puts the aggregate's job on beanstalkd in the delayed state and
    returns ``(server index, job id)``: firing kicks it. A blocked caller's
    aggregate parks the job that wakes the caller instead (see
    :mod:`packmule.wakeup`); without ``park`` only the etcd marker's watch
    wakes it. ``method`` is for operators
    (the run's tree of aggregates), as is the note of its number.
    """
    sizes = {ref.batch: batches.close(ref.batch) for ref in deps}
    number, own_batch = batches.reserve(1, signature)
    known = aggregate_record(scope, number)  # registered by an earlier execution
    if known is not None:
        server, job_id = known["srv"], known["bid"]
    else:
        server, job_id = park(number, own_batch) if park else (-1, 0)
    record = {"deps": as_ranges(ref.number for ref in deps), "batches": list(sizes),
              "af": allow_failures, "halt": halt, "srv": server, "bid": job_id, "own": own_batch,
              "m": method, "k": len(deps)}
    store_description(scope, number, record)
    note_aggregate(scope, number)
    for batch, size in sizes.items():
        add_waiter(scope, batch, size, ["a", number])
    try_fire(scope, number)
    return scope.ref(number, own_batch), record


NOTE_CHUNK = 10_000  # aggregate numbers per note key: ~7 bytes each, far below 1 MB


def note_aggregate(scope: RunScope, number: int) -> None:
    """Note ``number`` among the run's aggregates, so operators can list them (packmule.tree).

    Once per registration, never per job, and without waiting: a note lost
    with memcached's state only hides the aggregate from the tree. A
    registration run again notes it again; readers drop the repeat.
    """
    scope.backends.store.append_creating(scope.keys.aggregates(number // NOTE_CHUNK),
                                         b"%d " % number)


# Ranges of job numbers per memcached item of a long dependency list: at most
# ~25 bytes a range, so a part stays near half of memcached's default 1 MB item.
DEPS_PER_PART = 20_000


def store_description(scope: RunScope, number: int, record: dict[str, Any]) -> None:
    """Store an aggregate's description; a long dependency list goes in parts.

    An aggregate over ~50k scattered jobs (every other job, interleaved
    batches) has as many ranges, over memcached's item size in one value.
    Its parts are written first, and the description names how many there
    are (``parts``) instead of holding them, so :func:`try_fire`, which reads
    the description on every completion of its batches, stays one small read.
    """
    store, keys = scope.backends.store, scope.keys
    ranges = record["deps"]
    if len(ranges) <= DEPS_PER_PART:
        store.set(keys.aggregate(number), dumps(record))
        return
    starts = range(0, len(ranges), DEPS_PER_PART)
    store.set_many({keys.aggregate_part(number, part): dumps(ranges[start:start + DEPS_PER_PART])
                    for part, start in enumerate(starts)})
    short = {key: value for key, value in record.items() if key != "deps"}
    store.set(keys.aggregate(number), dumps({**short, "parts": len(starts), "n": number}))


def aggregate_record(scope: RunScope, number: int) -> dict[str, Any] | None:
    """The description :func:`register_aggregate` stored, or None if lost.

    A long dependency list is not in it: :func:`dependencies` reads it.
    """
    raw = scope.backends.store.get(scope.keys.aggregate(number))
    return None if raw is None else dict(loads(raw))


def dependencies(scope: RunScope, record: dict[str, Any]) -> list[int]:
    """The job numbers an aggregate waits on, in order, from its description.

    Raises:
        ResultMissing: naming the aggregate, if a part of its list is gone.
    """
    if "deps" in record:
        return from_ranges(record["deps"])
    names = [scope.keys.aggregate_part(record["n"], part) for part in range(record["parts"])]
    found = scope.backends.store.get_many(names)
    if len(found) < len(names):
        raise ResultMissing(f"run {scope.run}: memcached lost part of the dependency list "
                            f"of aggregate {record['n']}", [scope.ref(record["n"])])
    return [n for name in names for n in from_ranges(loads(found[name]))]


def try_fire(scope: RunScope, number: int, batch: str | None = None) -> None:
    """Fire aggregate ``number`` if its batches are complete. Idempotent.

    ``batch``: the batch whose completion asks (see :func:`trigger`).

    Firing only says "every dependency was counted": whoever consumes the
    aggregate (the blocked caller, or the aggregate's own job) reads the
    values once and settles it (see :func:`settle`), so the outcomes are
    read once per fan-in, not twice.
    """
    keys = scope.keys
    # The batch whose completion triggered this is read with the description:
    # an aggregate waiting on that batch alone needs no second read.
    hint = [] if batch is None else [keys.batch(batch), keys.batch_done(batch)]
    found = scope.backends.store.get_many([keys.aggregate(number), *hint])
    if keys.aggregate(number) not in found:
        report_loss(scope, [number], "the aggregate's description is gone")
        return
    record = dict(loads(found[keys.aggregate(number)]))
    if runs.is_cancelled(scope.backends, scope.run):
        return
    batches = record["batches"]
    state = batches_state(scope, batches, found if batches == [batch] else None)
    if state == "lost":
        report_loss(scope, [number], "the completion counters of its batches are gone")
    elif state == "done":
        _fire(scope, number, record)


@dataclass
class Gathered:
    """What an aggregate's dependencies left, in the order of its jobs."""

    values: list[Any]  # values; MISSING for a lost one, Failure for a failed one
    missing: list[int]  # jobs with no outcome: not finished yet, or lost
    failure: Outcome | None  # the first failure, if any


def gather(scope: RunScope, record: dict[str, Any]) -> Gathered:
    """Read every dependency's outcome, a chunk of keys at a time (flat memory).

    Raises:
        ResultMissing: part of the aggregate's dependency list is gone.
    """
    deps = dependencies(scope, record)
    gathered = Gathered([], [], None)
    for start in range(0, len(deps), GATHER_CHUNK):
        _gather_chunk(scope, deps[start:start + GATHER_CHUNK], gathered)
    return gathered


GATHER_CHUNK = 5000


def _gather_chunk(scope: RunScope, numbers: list[int], gathered: Gathered) -> None:
    found = scope.backends.store.get_in_order(scope.keys.jobs(numbers))
    present = cast("list[bytes]", found) if None not in found else [
        raw for raw in found if raw is not None]
    # One JSON array for the whole chunk: a json.loads per record costs more than the read.
    joined = b"[" + b",".join(present) + b"]"
    records = loads(joined) if MARK_BYTES not in joined else restore(loads(joined))
    values = gathered.values
    if len(present) == len(numbers) and b'{"f":' not in joined:  # values only: no step each
        values += map(itemgetter("v"), records)
        return
    next_record = iter(records).__next__
    for number, raw in zip(numbers, found, strict=True):
        if raw is None:
            gathered.missing.append(number)
            values.append(MISSING)
            continue
        record = next_record()
        if "v" in record:  # a value (see Outcome.encode): no Outcome built for each of thousands
            values.append(record["v"])
            continue
        outcome = Outcome.from_record(record)
        values.append(Failure(outcome.job, outcome.traceback))
        gathered.failure = gathered.failure or outcome


WAIT = "wait"


def settle(scope: RunScope, record: dict[str, Any], gathered: Gathered) -> Outcome | str | None:
    """How a fired aggregate stands, once its values are gathered.

    Returns None (call the method with ``gathered.values``; lost values, if
    the runner does not halt on loss, are counted and passed as MISSING),
    :data:`WAIT` (a dependency has not recorded its outcome yet: a redelivered
    job counted twice in its batch; its completion will fire again), or the
    failed Outcome the aggregate ends with (a failure, or a loss that halts).
    """
    if gathered.missing and not runs.state_lost(scope.backends, scope.run):
        return WAIT
    if gathered.missing and record["halt"]:
        return Outcome.missing(gathered.missing, "memcached lost the values of jobs")
    if gathered.failure is not None and not record["af"]:
        first = gathered.failure
        return replace(first, own=False)
    if gathered.missing:
        scope.backends.store.incr_quietly(scope.keys.lost, len(gathered.missing))
    return None


def _fire(scope: RunScope, number: int, record: dict[str, Any]) -> None:
    """Kick the aggregate's parked job, then record the firing in etcd.

    The kick goes first: the job (the aggregate's, or the one waking its
    caller) is on its way while etcd syncs the marker to disk. A firer that
    dies between the two has not finished its job: run again, it fires again.
    A kick that fails (its beanstalkd is down) still leaves the marker, which
    a waiting caller finds at its next check.
    """
    coord = scope.backends.coord
    marker = coord.marker_prefix(scope.run, number) + "fired"
    if record["srv"] >= 0:
        try:  # idempotent: the parked job moves to ready once; later kicks find it gone
            scope.backends.queue.kick_job(record["srv"], record["bid"])
        except ServerError:
            # Its server is down: a waiting caller still finds the marker, and this job,
            # run again, kicks anew.
            coord.create_if_absent(marker, b"1", lease=scope.lease)
            raise
    coord.create_if_absent(marker, b"1", lease=scope.lease)
