"""The floor: a hand-written minimal fan-out/fan-in worker, greenstalk + pymemcache only.

    python floor_worker.py BEANSTALKD_PORT MEMCACHED_PORT TUBE

A job body is ``RUN INDEX VALUE``. The worker stores the value under
``RUN:v:INDEX``, decrements ``RUN:left``; the worker that brings it to 0 reads
every value with get_many, sums them and puts ``RUN SUM`` on the tube
``TUBE-done``. No retries, no idempotence, no failure handling: the least
any fan-out/fan-in over these two servers must do.
"""

from __future__ import annotations

import sys

import greenstalk
from pymemcache.client.base import Client

HOST = "127.0.0.1"
CHUNK = 5000


def main() -> None:
    beanstalkd_port, memcached_port, tube = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    queue = greenstalk.Client((HOST, beanstalkd_port), encoding=None, watch=tube, use=tube + "-done")
    store = Client((HOST, memcached_port), no_delay=True)  # pymemcache's default: set is noreply
    while True:
        job = queue.reserve()
        run, index, value = job.body.split()
        run_s = run.decode()
        store.set(f"{run_s}:v:{index.decode()}", value)
        left = store.decr(f"{run_s}:left", 1, noreply=False)
        if left == 0:
            count = int(store.get(f"{run_s}:n"))
            keys = [f"{run_s}:v:{i}" for i in range(count)]
            total = 0
            for start in range(0, count, CHUNK):
                found = store.get_many(keys[start:start + CHUNK])
                total += sum(int(v) for v in found.values())
            queue.put(f"{run_s} {total}".encode())
        queue.delete(job)


if __name__ == "__main__":
    main()
