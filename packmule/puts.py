"""How a run's jobs are put on beanstalkd: their priority, size, server, and settling.

A job's priority carries its runner's level and its place in its run (so
runs sharing workers share them fairly); its size is checked against its
server's limit before anything is put; its server is its number modulo the
pool; and a caller's puts sent without waiting for their replies are
settled (replies read, refusals raised naming the job, unput jobs
uncounted) before anything can depend on them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import repeat
from typing import TYPE_CHECKING

from packmule.errors import JobTooBig, ServerError, ServerRefused
from packmule.jobref import JobRef
from packmule.queue import Queue, jobs_per_chunk

if TYPE_CHECKING:
    from packmule.aggregate import RunScope
    from packmule.envelope import BodyTemplate
    from packmule.runner import Context

# A job's beanstalkd priority (32 bits, lower first) is its runner's level
# above its position in its run: levels stay strictly ordered, and within a
# level the runs sharing a tube interleave. Positions past 2**24 share the last.
PRIORITY_LEVELS = 256
POSITION_BITS = 24
_LAST_POSITION = (1 << POSITION_BITS) - 1


def job_priority(level: int, number: int) -> int:
    """The beanstalkd priority of job ``number`` of a run whose runner has ``level``.

    beanstalkd hands out the lowest priority first, and FIFO among equals.
    With the job's number (its position in its run, 0 for a run_async root)
    below the level, the k-th job of every run of a level goes before the
    (k+1)-th of any: runs in step alternate, and a run started while another
    is far ahead catches up with it instead of waiting behind its backlog.
    Costs nothing per job: no state, no extra round trip.
    """
    return (level << POSITION_BITS) | (number if number < _LAST_POSITION else _LAST_POSITION)


def priorities(level: int, numbers: range) -> Sequence[int]:
    """``[job_priority(level, n) for n in numbers]``, a range when it can be: no call per job."""
    if not numbers or numbers[-1] < _LAST_POSITION:
        base = level << POSITION_BITS
        return range(base + numbers.start, base + numbers.stop, numbers.step)
    return [job_priority(level, number) for number in numbers]


def by_server(queue: Queue, first: int, count: int) -> dict[int, range]:
    """The numbers of jobs ``first``... ``first + count - 1`` by pool index, each in order.

    A job's server is its number modulo the pool's size (``Queue.server_for``).
    """
    servers = len(queue.names)
    return {queue.server_for(start): range(start, first + count, servers)
            for start in range(first, first + min(servers, count))}


def settle(context: Context, *, wait: bool = True) -> None:
    """Take stock of the caller's puts sent without waiting (see ``Runner._enqueue_one``).

    With ``wait``, every reply is read first; else only those read already.
    A job found not stored is uncounted and noted (a deferred_result over it
    is refused: it would wait for ever). Called before anything can depend on
    those jobs: a deferred_result or wait, the run's end.

    Raises:
        The first refusal or outage a reply said (ServerRefused,
        QueueUnavailable, JobTooBig), naming the job and its method.
    """
    pending = context.sent
    if not pending:
        return
    if wait:
        context.scope.backends.queue.catch_up()
    first: tuple[int, str, Exception] | None = None
    while pending and pending[0][3].read:  # in the order sent (read so, per server)
        batch, number, method, sent = pending.popleft()
        if sent.error is None:  # stored (a job not stored always has an error)
            continue
        if sent.job_id is None:
            uncount(context, batch, 1)
            if context.unput is None:
                context.unput = {}
            context.unput[number] = f"{type(sent.error).__name__}: {sent.error}"
        if first is None:
            first = number, method, sent.error
    if first is not None:
        raise _naming_job(*first) from first[2]


def _naming_job(number: int, method: str, err: Exception) -> Exception:
    """``err``, its message naming the job it concerns."""
    job = f"job {number} {method}()"
    if isinstance(err, ServerRefused):
        said = str(err).removeprefix(f"{err.address}: ")
        return ServerRefused(err.address, f"{job}: {said}", reply=err.reply)
    if isinstance(err, ServerError):
        return type(err)(err.address, f"{job}: {str(err).removeprefix(f'{err.address}: ')}")
    return JobTooBig(f"{job}: {err}") if isinstance(err, JobTooBig) else err


def uncount(context: Context, batch: str, unput: int) -> None:
    """Take back the count of jobs that were never put (too big, or a server failed)."""
    if unput:
        context.batches.sizes[batch] -= unput
        if not context.batches.replayable:  # a job's next attempt replays these numbers
            context.scope.backends.store.decr_quietly(context.scope.keys.total, unput)


def check_size(queue: Queue, index: int, method: str, size: int) -> None:
    """JobTooBig, naming the size and the limit, if a body of ``size`` bytes is over it."""
    limit = queue.max_job_size(index)
    if size > limit:
        raise JobTooBig(f"job {method}() of {size} bytes exceeds max-job-size {limit} "
                        f"of {queue.names[index]}")


def check_sizes(queue: Queue, index: int, method: str, template: BodyTemplate, numbers: range,
                args: Sequence[bytes], enqueued: bytes) -> int:
    """JobTooBig, as check_size, if a body of job ``numbers[i]`` with ``args[i]`` is over
    server ``index``'s limit; else a size none of them exceeds.

    The longest arguments with the longest number bound every body at no
    Python call per job; only when that bound is over the limit is each job
    sized, so that a refusal names the size of a real body, and a batch that
    fits exactly is not refused.
    """
    bound = template.size(numbers[-1], max(args, key=len), enqueued)
    if bound > queue.max_job_size(index):
        check_size(queue, index, method, max(map(template.size, numbers, args, repeat(enqueued))))
    return bound


def put_each(queue: Queue, tube: str, template: BodyTemplate, method: str, first: int,
             encoded: list[bytes], *, level: int, enqueued: bytes, delay: int, ttr: float,
             stored: list[int]) -> None:
    """Put jobs ``first``... with the ``encoded`` arguments, in order per server.

    Every job is size-checked on its server before the first is put; then
    each server's jobs are pipelined, their bodies built a chunk at a time
    as they are sent (a million jobs never have their bodies in memory at
    once). Each stored job's id is appended to ``stored`` (see Queue.put_chunks).
    """
    servers = by_server(queue, first, len(encoded))
    args = {index: encoded if len(numbers) == len(encoded)
            else encoded[numbers.start - first::numbers.step] for index, numbers in servers.items()}
    bounds = {index: check_sizes(queue, index, method, template, numbers, args[index], enqueued)
              for index, numbers in servers.items()}
    for index, numbers in servers.items():
        chunks = _chunks(template, numbers, args[index], enqueued, level=level,
                         size=jobs_per_chunk(bounds[index]))
        queue.put_chunks(index, tube, chunks, delay=delay, ttr=ttr, stored=stored)


def _chunks(template: BodyTemplate, numbers: range, args: Sequence[bytes], enqueued: bytes, *,
            level: int, size: int) -> Iterator[tuple[list[bytes], Sequence[int]]]:
    """The bodies and priorities of jobs ``numbers`` (with ``args``), ``size`` at a time."""
    for start in range(0, len(numbers), size):
        chunk = numbers[start:start + size]
        yield template.bodies(chunk, args[start:start + size], enqueued), priorities(level, chunk)


def refs(scope: RunScope, first: int, count: int, batch: str) -> list[JobRef]:
    """The JobRefs of jobs ``first``... ``first + count - 1`` of ``batch``, in order."""
    queue = scope.backends.queue
    if len(queue.names) == 1:  # one server: no lookup per job
        server, run = queue.names[0], scope.run
        return [JobRef(number, server, run, batch) for number in range(first, first + count)]
    return [scope.ref(number, batch) for number in range(first, first + count)]
