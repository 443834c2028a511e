"""The producer side: bodies encoded once, puts pipelined per server, over a 2-server pool.

Its own servers (two beanstalkd, so a pool; one memcached; etcd), because one
test puts a server into drain mode, which only a restart undoes.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import greenstalk
import pytest
from conftest import Workers, isolated_settings
from runners import Adder, Driven

import packmule
from packmule import puts
from packmule import queue as queue_module
from packmule.backends import backends
from packmule.envelope import (
    FORMAT,
    BodyTemplate,
    Envelope,
    decode,
    dumps,
    encode_args,
    encode_each,
    stamp,
)
from packmule.errors import DecodeError
from packmule.jobref import JobRef
from packmule.queue import Queue
from packmule.servers import LocalServers, start_local_servers

BIG = "x" * 70_000  # over the servers' max-job-size of 65535 once encoded


@pytest.fixture(scope="module")
def pool() -> Iterator[LocalServers]:
    with start_local_servers(beanstalkd=2, memcached=1) as started:
        yield started


@pytest.fixture
def pool_env(pool: LocalServers) -> Iterator[dict[str, str]]:
    """Settings for one test on the pool: a fresh namespace and tube."""
    with isolated_settings(pool) as variables:
        yield variables


def _in_tube(index: int, tube: str) -> int:
    return backends().queue.tube_stats(index, tube).get("total-jobs", 0)


def test_template_bodies_are_the_head_then_the_jobs_line() -> None:
    envelope = Envelope("mod:Cls", 'n "quoted"\n 100% \u00e9\u2603', "run-1", 7, "caller.ab", "echo",
                        [1, "a \u2603\n", {"k": [None, True, 1.5]}], {"tube": "t", "priority": 3},
                        aggregate=True, kwargs={"a": "%d"}, lease=42, enqueued=1.5)
    template = BodyTemplate(envelope)
    body = template.body(7, encode_args("echo", envelope.args))
    head = {name: getattr(envelope, name) for name in ("runner", "name", "run", "batch", "method",
                                                       "options", "lease", "aggregate", "kwargs")}
    assert body == dumps({"packmule": FORMAT, **head}) + b"\n7 1.500 " + dumps(envelope.args)
    assert len(body) == template.size(7, encode_args("echo", envelope.args))
    assert decode(body) == envelope
    # A head leaves out what is at its default.
    plain = Envelope("mod:Cls", "n", "run-1", 0, "caller.ab", "echo", [], {"tube": "t"}, lease=4)
    plain_body = BodyTemplate(plain).body(3, b"[]", stamp(1.0))
    assert b"aggregate" not in plain_body and b"kwargs" not in plain_body
    assert decode(plain_body) == Envelope("mod:Cls", "n", "run-1", 3, "caller.ab", "echo", [],
                                          {"tube": "t"}, False, {}, 4, 1.0)
    # The next job of the same head: its head is the first one's, decoded once.
    second = decode(template.body(8, b'["x"]', stamp(2.0)))
    assert (second.job, second.args, second.enqueued) == (8, ["x"], 2.0)
    assert second.head is decode(body).head is not None


ITEMS = [0, -7, 2**70, True, None, 1.5, "", "doc-\u00e9\u2603\n\"", [1, [2]], {"k": "v"},
         packmule.MISSING, (3, 4)]


@pytest.mark.parametrize("extra", [(), (1,), ("a", [None], {"b": 2.5})])
@pytest.mark.parametrize("items", [range(5_000), [f"id-{i}" for i in range(50)], ITEMS,
                                   [True, 1], [10**5000]],
                         ids=["ints", "strs", "mixed", "bool-int", "too-long-int"])
def test_encode_each_is_encode_args_of_each_job(items: list[object], extra: tuple[object, ...]) -> None:
    if items == [10**5000]:  # past int's digit limit: refused as encode_args refuses it
        with pytest.raises(packmule.EncodeError, match=r"argument 0 of echo\(\) \(int\)"):
            encode_each("echo", items, extra)
        return
    assert encode_each("echo", iter(items), extra) == [encode_args("echo", (item, *extra))
                                                       for item in items]


def test_encode_each_names_the_argument_at_fault_and_lets_the_items_errors_pass() -> None:
    with pytest.raises(packmule.EncodeError, match=r"argument 0 of echo\(\) \(set\)"):
        encode_each("echo", [*range(5_000), {1}])
    with pytest.raises(packmule.EncodeError, match=r"argument 2 of echo\(\) \(object\)"):
        encode_each("echo", [1], (2, object()))
    assert encode_each("echo", [], (object(),)) == []  # no job: nothing to encode

    def failing() -> Iterator[int]:
        yield 1
        raise ValueError("the items' own error")

    with pytest.raises(ValueError, match="the items' own error"):
        encode_each("echo", failing())


def test_bodies_of_format_1_still_decode() -> None:
    """Jobs put by an older packmule, still in beanstalkd, are run by a newer worker."""
    old = (b'{"packmule":1,"runner":"mod:Cls","name":"n","run":"r","job":3,"batch":"b",'
           b'"method":"echo","args":[1],"options":{},"aggregate":false,"kwargs":{},"lease":5,'
           b'"enqueued":2.5}')
    assert decode(old) == Envelope("mod:Cls", "n", "r", 3, "b", "echo", [1], {}, False, {}, 5, 2.5)


@pytest.mark.parametrize("line", [b"", b"7", b"7 1.0", b"x 1.0 []", b"-7 1.0 []", b"7 nan []",
                                  b"7 1.0 {}", b"7 1.0 [1] ", b"7 1.0 [1", b"7 1.0 [1]\n"])
def test_a_jobs_line_that_is_not_number_time_arguments_is_refused(line: bytes) -> None:
    head = BodyTemplate(Envelope("mod:Cls", "n", "r", 0, "b", "echo")).body(0, b"[]").split(b"\n")[0]
    with pytest.raises(DecodeError, match="is not '<job> <enqueued> <JSON arguments>'"):
        decode(head + b"\n" + line)


def test_put_many_replies_match_bodies_in_order(pool_env: dict[str, str]) -> None:
    queue, tube = backends().queue, pool_env["PACKMULE_TUBE"]
    bodies = [b"job %d " % n + b"y" * (n % 300) for n in range(1_200)]  # several chunks
    stored: list[int] = []
    queue.put_many(0, tube, bodies, priority=10, delay=0, ttr=60, stored=stored)
    assert len(stored) == len(bodies) and stored == sorted(stored)
    client = greenstalk.Client(queue.addresses[0], encoding=None)
    try:
        assert all(client.peek(job_id).body == body for job_id, body in zip(stored, bodies, strict=True))
    finally:
        client.close()


def test_a_refused_put_counts_the_rest_of_its_chunk_and_the_one_in_flight_and_stops(
        pool_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    queue, tube = backends().queue, pool_env["PACKMULE_TUBE"]
    monkeypatch.setattr(queue_module, "_CHUNK_BYTES", 1 << 20)  # chunks of 500 jobs
    bodies = [b"small"] * 5 + [BIG.encode()] + [b"small"] * 1_104  # chunks: 500, 500, 110
    stored: list[int] = []
    with pytest.raises(packmule.JobTooBig, match=queue.names[0]):
        queue.put_many(0, tube, bodies, priority=10, delay=0, ttr=60, stored=stored)
    # The first chunk's 499 others were stored, after the refusal too, and the second
    # chunk, written before the first one's replies were read; the third never went.
    assert len(stored) == 999 == _in_tube(0, tube)
    # beanstalkd skipped the refused body: the connection still speaks the protocol.
    assert queue.put(0, tube, b"after", priority=10, delay=0, ttr=60) > stored[-1]


def test_a_batch_is_size_checked_exactly_though_from_its_longest_arguments(
        pool_env: dict[str, str]) -> None:
    """The longest arguments (job 9's) with the longest number (10) would be one byte over:
    each job is then sized, and the batch passes if none is really over the limit."""
    queue, enqueued = backends().queue, stamp(1.0)
    template = BodyTemplate(Envelope("mod:Cls", "n", "r", 0, "b", "echo"))
    limit = queue.max_job_size(0)
    fitting = b"x" * (limit - template.size(9, b"", enqueued))
    assert template.size(9, fitting, enqueued) == limit
    assert puts.check_sizes(queue, 0, "echo", template, range(9, 11), [fitting, b"[1]"],
                            enqueued) == limit + 1
    with pytest.raises(packmule.JobTooBig, match=f"of {limit + 1} bytes exceeds max-job-size {limit} "):
        puts.check_sizes(queue, 0, "echo", template, range(9, 11), [fitting + b"x", b"[1]"],
                         enqueued)


def test_enqueue_each_across_the_pool_keeps_order(pool_env: dict[str, str]) -> None:
    tube, count = pool_env["PACKMULE_TUBE"], 3_000
    refs: list[JobRef] = []
    Driven("pool").run(lambda r: refs.extend(r.enqueue_each("echo", [(i, 0) for i in range(count)])))
    queue = backends().queue
    numbers = [ref.number for ref in refs]
    assert numbers == list(range(numbers[0], numbers[0] + count))
    assert [ref.server for ref in refs] == [queue.names[n % 2] for n in numbers]
    assert Driven("pool").update_progress().total == count
    item_of = {ref.number: i for i, ref in enumerate(refs)}
    for index in (0, 1):
        assert _in_tube(index, tube) == count // 2
        seen = _drain(queue, index, tube)
        assert [job for job, _ in seen] == sorted(job for job, _ in seen), "put out of order"
        assert all(args == [[item_of[job], 0]] for job, args in seen)


def _drain(queue: Queue, index: int, tube: str) -> list[tuple[int, list[object]]]:
    """(job number, args) of every ready job on server ``index``, in beanstalkd id order."""
    client = greenstalk.Client(queue.addresses[index], encoding=None, watch=tube)
    found: list[tuple[int, int, list[object]]] = []
    try:
        while True:
            try:
                job = client.reserve(timeout=0)
            except greenstalk.TimedOutError:
                break
            envelope = decode(job.body)
            found.append((job.id, envelope.job, envelope.args))
            client.delete(job)
    finally:
        client.close()
    return [(number, args) for _, number, args in sorted(found)]


def test_a_too_big_job_in_a_pool_batch_is_refused_before_any_put(
        pool_env: dict[str, str]) -> None:
    tube = pool_env["PACKMULE_TUBE"]
    with pytest.raises(packmule.JobTooBig, match="max-job-size 65535"):
        Driven("big").run(
            lambda r: r.enqueue_each("echo", [(i, 0) for i in range(1_000)] + [(BIG, 0)]))
    assert _in_tube(0, tube) == _in_tube(1, tube) == 0
    assert Driven("big").update_progress().total == 0


def test_a_run_across_the_pool_sums_every_job(pool_env: dict[str, str]) -> None:
    workers = Workers(pool_env)
    try:
        workers.start("runners", 2)
        assert Adder("pool-run").run(2_000) == sum(range(2_000))
    finally:
        workers.stop()


def test_a_server_failing_mid_batch_uncounts_exactly_the_unput_jobs(
        pool: LocalServers, pool_env: dict[str, str]) -> None:
    tube, queue = pool_env["PACKMULE_TUBE"], backends().queue

    def put_while_draining(runner: Adder) -> None:
        (warm,) = runner.enqueue_each("echo", [(0, 0)])  # the run exists; numbers go on from here
        drained = queue.names.index(warm.server)  # the batch below puts on the other server first
        os.kill(_server_pid(queue, drained), signal.SIGUSR1)  # drain mode: it refuses every put
        try:
            with pytest.raises(packmule.QueueUnavailable, match="draining") as caught:
                runner.enqueue_each("echo", [(i, 0) for i in range(100)])
            assert caught.value.address == queue.names[drained]
            assert _in_tube(1 - drained, tube) == 50 and _in_tube(drained, tube) == 1
            assert runner.update_progress().total == 51
        finally:
            pool.restart_beanstalkd(drained)

    Driven("drained").run(put_while_draining)
    assert Driven("drained").update_progress().total == 51


def _server_pid(queue: Queue, index: int) -> int:
    client = greenstalk.Client(queue.addresses[index], encoding=None)
    try:
        return int(client.stats()["pid"])
    finally:
        client.close()


# A loop of single enqueues (the README's shape): no round trip per call --------------------
def test_a_loop_of_enqueue_takes_job_numbers_in_blocks_not_a_round_trip_each(
        pool_env: dict[str, str]) -> None:
    def loop(runner: Adder) -> tuple[int, int, list[int]]:
        store = backends().store
        runner.enqueue("echo", [0, 0])
        before = store.round_trips
        refs = [runner.enqueue("echo", [i, 0]) for i in range(1, 1_001)]
        trips = store.round_trips - before
        return trips, runner.update_progress().total, [ref.number for ref in refs]

    trips, total_while_looping, numbers = Driven("blocks").run(loop)
    # Blocks of 1, 2, 4 ... 256 numbers, each taken (and counted) in one round trip.
    assert trips <= 12, f"{trips} memcached round trips for 1,000 enqueue calls"
    assert len(set(numbers)) == 1_000
    # Counted ahead by at most a block while the loop runs, never behind; exact once it ends.
    assert 1_001 <= total_while_looping <= 1_001 + 256
    assert Driven("blocks").update_progress().total == 1_001


def test_puts_refused_after_their_enqueue_returned_fail_the_next_wait_naming_the_job(
        pool: LocalServers, pool_env: dict[str, str]) -> None:
    tube, queue = pool_env["PACKMULE_TUBE"], backends().queue

    def loop_while_draining(runner: Adder) -> None:
        warm = runner.enqueue("echo", [0, 0])  # the run exists; numbers go on from here
        drained = queue.names.index(warm.server)
        os.kill(_server_pid(queue, drained), signal.SIGUSR1)  # drain mode: it refuses every put
        try:
            # Replies are read later: the calls return, half of the jobs are refused.
            refs = [runner.enqueue("echo", [i, 0]) for i in range(1, 11)]
            first_refused = next(ref for ref in refs if ref.server == queue.names[drained])
            with pytest.raises(packmule.QueueUnavailable,
                               match=rf"job {first_refused.number} echo\(\): .*draining") as caught:
                runner.deferred_result("total", refs)
            assert caught.value.address == queue.names[drained]
            with pytest.raises(packmule.EnqueueError, match="was never put"):
                runner.deferred_result("total", refs)  # it would wait for ever
            assert _in_tube(1 - drained, tube) == 5 and _in_tube(drained, tube) == 1
        finally:
            pool.restart_beanstalkd(drained)

    Driven("drained-loop").run(loop_while_draining)
    assert Driven("drained-loop").update_progress().total == 6, "the refused jobs are uncounted"


def test_single_enqueues_to_two_tubes_interleave_on_one_connection(
        pool_env: dict[str, str]) -> None:
    """Puts sent without waiting, then a put to another tube: its `use` must not read
    an earlier put's reply as its own."""
    tube = pool_env["PACKMULE_TUBE"]
    other = f"{tube}-other"

    def outer(first: Adder) -> None:
        def inner(second: Adder) -> None:
            for i in range(10):
                first.enqueue("echo", [i, 0])
                second.enqueue("echo", [i, 0])

        Driven("inner", tube=other).run(inner)

    Driven("outer").run(outer)
    assert _in_tube(0, tube) + _in_tube(1, tube) == 10
    assert _in_tube(0, other) + _in_tube(1, other) == 10
    assert Driven("outer").update_progress().total == Driven("inner").update_progress().total == 10


def test_a_loop_of_enqueue_refuses_a_bad_call_as_its_first_call_would(
        pool_env: dict[str, str]) -> None:
    """After a method's first call, a loop's next calls of it take a shorter path: it still
    refuses what JSON cannot carry or beanstalkd would not take, naming it, counting nothing."""
    tube = pool_env["PACKMULE_TUBE"]

    def loop(runner: Adder) -> list[int]:
        refs = [runner.enqueue("echo", [0, 0])]
        with pytest.raises(packmule.EncodeError, match=r"argument 0 of echo\(\) \(set\)"):
            runner.enqueue("echo", {1})
        refs.append(runner.enqueue("echo", [1, 0]))
        with pytest.raises(packmule.JobTooBig, match=r"job echo\(\) of .* max-job-size 65535"):
            runner.enqueue("echo", [BIG, 0])
        refs.append(runner.enqueue("echo", [2, 0]))
        with pytest.raises(packmule.UnknownMethod, match="'nowhere'"):
            runner.enqueue("nowhere", 1)
        refs.append(runner.enqueue("".join(["ec", "ho"]), [3, 0]))  # equal, not the same str
        refs.append(runner.enqueue("echo", [4, 0]))
        return [ref.number for ref in refs]

    numbers = Driven("loop-refusals").run(loop)
    assert Driven("loop-refusals").update_progress().total == 5
    queue = backends().queue
    seen = sorted(_drain(queue, 0, tube) + _drain(queue, 1, tube))
    assert seen == [(number, [[i, 0]]) for i, number in enumerate(numbers)]


def test_arguments_encode_as_dumps_does_and_a_circular_one_is_named() -> None:
    values = [1, -2.5, 'a \u2603\n"', None, True, {"k": [1, {"n": None}], 2: "int key"}, [],
              packmule.MISSING, 10**30]
    assert encode_args("echo", values) == encode_args("echo", tuple(values)) == dumps(values)
    circular: list[object] = []
    circular.append(circular)
    with pytest.raises(packmule.EncodeError, match=r"argument 1 of echo\(\) \(list\).*Circular"):
        encode_args("echo", (1, circular))
