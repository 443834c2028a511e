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
fewest round trips the protocols allow: the finished job's delete goes in
one write with the next reserve, the value's ``set`` (noreply) in one write
with the decrement, and the next reserve is written while memcached
answers (as packmule's worker does), so a job costs two round trips but one
wait. No ids of its own, no
retries, no idempotence, no progress, no failure handling. greenstalk and
pymemcache open the connections; the hot commands are written by hand
because neither library can send two commands in one write.
"""

from __future__ import annotations

import socket
import sys
import time

import greenstalk
from pymemcache.client.base import Client

HOST = "127.0.0.1"


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
    finished = b""  # the delete of the last finished job, sent with the next reserve
    job = None  # the next job, asked for while the last value was recorded
    while jobs != 0:
        jobs -= 1
        if job is None:
            send(finished + b"reserve\r\n")
            if finished:
                assert reader.readline() == b"DELETED\r\n"
            finished, job = b"", reserved()
        assert job is not None
        job_id, body = job
        run, index = body.split()
        value = repr(time.time()).encode()  # the job "returns" now
        store.sendall(b"set %b:v:%b 0 0 %d noreply\r\n%b\r\ndecr %b:left 1\r\n"
                      % (run, index, len(value), value, run))
        if jobs != 0:  # the next job, while memcached answers: one wait a job
            send(finished + b"reserve-with-timeout 0\r\n")
        left = store.recv(64)
        while not left.endswith(b"\r\n"):
            left += store.recv(64)
        job = None
        if jobs != 0:
            if finished:
                assert reader.readline() == b"DELETED\r\n"
            finished, job = b"", reserved()
        if left == b"0\r\n":
            queue.put(run)
        finished += b"delete %b\r\n" % job_id
    send(finished)

if __name__ == "__main__":
    main()
