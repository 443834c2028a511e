"""The floor: a careful hand-written fan-out/fan-in worker over beanstalkd and memcached.

    python floor_worker.py BEANSTALKD_PORT MEMCACHED_PORT TUBE [JOBS] [--plain]

(with JOBS, it exits after that many jobs: instructions.py counts them;
-1 for no limit.) ``--plain``: the same work written the plain way, one
library call per command (greenstalk reserve and delete, pymemcache set and
decr): what hand-written code usually looks like, for reference.

A job body is ``RUN INDEX``. The worker stores the job's value under
``RUN:v:INDEX`` and decrements ``RUN:left``; the worker that brings it to 0
puts ``RUN`` on the tube ``TUBE-done``, which wakes the caller (see
``Floor`` in run.py): the caller reads every value and calls the aggregate,
as packmule's caller does. The value is ``time.time()`` when the job
returns, so the caller can tell how long the fan-in took.

The least any fan-out/fan-in over these two servers must do, with the
fewest round trips the protocols allow: jobs are asked for up to 16 at a
time (``reserve-with-timeout 0`` each, after one blocking reserve when none
is in hand; after a batch that found fewer ready, twice as many as it found
plus one), the batch's values set (noreply) in one write with one decrement
per run, the next batch asked for while memcached answers, and the batch's
deletes sent with the next reserves (as packmule's worker does with quick
jobs): a batch costs two round trips but one wait. The caller is woken on
a connection of its own. No ids of its own, no
retries, no idempotence, no progress, no failure handling. greenstalk and
pymemcache open the connections; the hot commands are written by hand
because neither library can send two commands in one write.
"""

from __future__ import annotations

import socket
import sys
import time
from typing import Any

import greenstalk
from pymemcache.client.base import Client

HOST = "127.0.0.1"
BATCH = 16  # jobs asked for at once, as packmule's worker does with quick jobs (packmule.pace)


def connect_memcached(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def plain(queue: greenstalk.Client[bytes], memcached_port: int, jobs: int) -> None:
    """The same work, one library call per command: three round trips a job, one write unanswered."""
    store = Client((HOST, memcached_port), no_delay=True)  # pymemcache's default: set is noreply
    while jobs != 0:
        jobs -= 1
        job = queue.reserve()
        run, index = job.body.split()
        store.set(b"%b:v:%b" % (run, index), repr(time.time()).encode())
        if store.decr(b"%b:left" % run, 1, noreply=False) == 0:
            queue.put(run)
        queue.delete(job)


def main() -> None:
    args = [arg for arg in sys.argv[1:] if arg != "--plain"]
    beanstalkd_port, memcached_port, tube = int(args[0]), int(args[1]), args[2]
    jobs = int(args[3]) if len(args) > 3 else -1
    queue = greenstalk.Client((HOST, beanstalkd_port), encoding=None, watch=tube,
                              use=tube + "-done")
    queue._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if "--plain" in sys.argv:
        plain(queue, memcached_port, jobs)
        return
    send, reader = queue._sock.sendall, queue._reader

    def reserved() -> tuple[bytes, bytes] | None:
        """The job a reserve's reply hands out: (id, body), or None if it timed out."""
        reply = reader.readline()
        if reply == b"TIMED_OUT\r\n":
            return None
        _, job_id, size = reply.split()
        return job_id, reader.read(int(size) + 2)[:-2]

    store = connect_memcached(memcached_port)
    # The caller is woken on a connection of its own, so the wake-up never waits
    # behind the reserves in flight (as packmule's worker wakes it through etcd).
    waking = greenstalk.Client((HOST, beanstalkd_port), encoding=None, use=tube + "-done")
    waking._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    found = 0  # how many jobs the last batch's reserves found ready
    finished = b""  # the deletes of the last batch, sent with the next reserves
    held: list[tuple[bytes, bytes]] = []  # the next batch, asked for while the last was recorded
    while jobs != 0:
        if not held:  # wait for one job
            send(finished + b"reserve\r\n")
            read_deletes(reader, finished)
            job = reserved()
            assert job is not None
            finished, held = b"", [job]
        batch, held = held[:jobs] if jobs > 0 else held, []
        jobs -= len(batch)
        # Each job "returns" now: its value set (noreply), its run's count taken down
        # once per run in the batch.
        sets, runs = [], {}
        for _, body in batch:
            run, index = body.split()
            value = repr(time.time()).encode()
            sets.append(b"set %b:v:%b 0 0 %d noreply\r\n%b\r\n" % (run, index, len(value), value))
            runs[run] = runs.get(run, 0) + 1
        store.sendall(b"".join(sets) + b"".join(b"decr %b:left %d\r\n" % item
                                                 for item in runs.items()))
        if jobs != 0:  # the next batch, while memcached answers: one wait a batch
            # (a tube found nearly empty is asked for a little, then twice as much)
            ask = min(BATCH, 2 * found + 1, BATCH if jobs < 0 else jobs)
            send(finished + b"reserve-with-timeout 0\r\n" * ask)
        lefts = store.recv(256)
        while lefts.count(b"\r\n") < len(runs):
            lefts += store.recv(256)
        for run, left in zip(runs, lefts.split(b"\r\n"), strict=False):
            if left == b"0":
                waking.put(run)
        if jobs != 0:
            read_deletes(reader, finished)
            finished = b""
            held = [job for job in (reserved() for _ in range(ask)) if job is not None]
            found = len(held)
        finished += b"".join(b"delete %b\r\n" % job_id for job_id, _ in batch)
    send(finished)


def read_deletes(reader: Any, deletes: bytes) -> None:
    """Read the replies of the deletes sent."""
    for _ in range(deletes.count(b"delete ")):
        assert reader.readline() == b"DELETED\r\n"


if __name__ == "__main__":
    main()
