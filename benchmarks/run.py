"""packmule benchmarks: one command, its own servers and workers, plain lines out.

    python benchmarks/run.py            # full run, about 5 minutes on 2 cores
    python benchmarks/run.py --quick    # fewer repetitions, no 100k run(): under a minute
    python benchmarks/run.py --profile  # also: py-spy on a worker during a 10k run,
                                        # cProfile of enqueue_each in the producer
    python benchmarks/run.py --only fairness  # section 7 alone
    python benchmarks/run.py --scale [N]      # alone: runs of N/10 and N jobs (N = 1,000,000)

Every figure is the median of several repetitions (the count is printed).
Targets print PASS or MISS; a MISS never fails the command (exit 0), only
an error does. See benchmarks/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(BENCH)]

import greenstalk  # noqa: E402
from pymemcache.client.base import Client as Memcache  # noqa: E402

import packmule  # noqa: E402
from packmule import config  # noqa: E402
from packmule import runner as runner_module  # noqa: E402
from packmule.backends import backends  # noqa: E402
from packmule.servers import LocalServers, start_local_servers  # noqa: E402

NAMESPACE = "bench"
TUBE = "bench"  # packmule workers watch it
FLOOR_TUBE = "floor"  # floor workers watch it
IDLE_TUBE = "bench-idle"  # nobody watches it: enqueue and progress benchmarks
WORKERS = 2
PYTHONPATH = os.pathsep.join([str(BENCH), str(ROOT)])


@dataclass(frozen=True)
class Plan:
    """How many repetitions of what; --quick shrinks it."""

    sizes: tuple[tuple[int, int], ...]  # (N, repetitions) for floor and run()
    fanin_runs: int
    progress_reads: int
    progress_big: int
    enqueue_reps: int
    memory_jobs: int
    fairness_reps: int  # large runs alone, fair and flat priorities alternating
    fairness_jobs: int  # the large run's size (alone, and with a small run started during it)


FULL = Plan(sizes=((1_000, 5), (10_000, 3), (100_000, 1)), fanin_runs=25,
            progress_reads=500, progress_big=100_000, enqueue_reps=3, memory_jobs=100_000,
            fairness_reps=5, fairness_jobs=20_000)
QUICK = Plan(sizes=((1_000, 3), (10_000, 1)), fanin_runs=8, progress_reads=200,
             progress_big=100_000, enqueue_reps=1, memory_jobs=20_000,
             fairness_reps=2, fairness_jobs=10_000)


# Output --------------------------------------------------------------------------------
def say(text: str = "") -> None:
    print(text, flush=True)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def verdict(ok: bool | None) -> str:
    return "SKIP" if ok is None else ("PASS" if ok else "MISS")


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def fmt_s(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds >= 0.1 else f"{seconds * 1000:.2f} ms"


@contextmanager
def deadline(seconds: int, what: str) -> Iterator[None]:
    """Raise TimeoutError if the block runs longer than ``seconds`` (a hung run)."""
    def on_alarm(_signum: int, _frame: object) -> None:
        raise TimeoutError(f"{what} took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# Processes ------------------------------------------------------------------------------
class Procs:
    """Worker processes we started; stopped by their own pid only."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], count: int,
              env: dict[str, str] | None = None) -> list[subprocess.Popen[bytes]]:
        started = [subprocess.Popen(argv, env=env or self.env, cwd=ROOT,
                                    stdout=subprocess.DEVNULL) for _ in range(count)]
        self.procs.extend(started)
        return started

    def stop_some(self, procs: list[subprocess.Popen[bytes]]) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in self.procs:
            proc.wait(timeout=10)


def rss_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of process ``pid`` in kB, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


# 1. The floor ---------------------------------------------------------------------------
class Floor:
    """Producer side of the hand-written minimal fan-out/fan-in (see floor_worker.py)."""

    def __init__(self, servers: LocalServers) -> None:
        self.beanstalkd_port = int(servers.beanstalkd_urls[0].rsplit(":", 1)[1])
        self.memcached_port = int(servers.memcached_urls[0].rsplit(":", 1)[1])
        self.queue = greenstalk.Client(("127.0.0.1", self.beanstalkd_port), encoding=None,
                                       use=FLOOR_TUBE, watch=FLOOR_TUBE + "-done")
        self.store = Memcache(("127.0.0.1", self.memcached_port), no_delay=True)

    def argv(self) -> list[str]:
        return [sys.executable, str(BENCH / "floor_worker.py"), str(self.beanstalkd_port),
                str(self.memcached_port), FLOOR_TUBE]

    def run(self, count: int) -> tuple[float, float]:
        """(wall time, time spent putting) of one fan-out/fan-in of ``count`` jobs."""
        run = uuid.uuid4().hex[:12]
        started = time.perf_counter()
        self.store.set_many({f"{run}:n": str(count), f"{run}:left": str(count)}, noreply=False)
        for index in range(count):
            self.queue.put(f"{run} {index} {index}".encode())
        put = time.perf_counter() - started
        job = self.queue.reserve(timeout=600)
        elapsed = time.perf_counter() - started
        self.queue.delete(job)
        name, total = job.body.split()
        assert name.decode() == run and int(total) == count * (count - 1) // 2, job.body
        return elapsed, put


# 2. packmule run() -----------------------------------------------------------------------
def packmule_run(count: int) -> float:
    return packmule_phases(count)[0]


def packmule_phases(count: int) -> tuple[float, float, float, float]:
    """One run() of ``count`` no-op jobs: (wall, enqueue_each, until the aggregate, after).

    The phases: run() entry to enqueue_each returning; then until the aggregate
    method is called in the caller (jobs run, fan-in); then the sum and
    recording the run's end.
    """
    from bench_runners import Fanout

    runner = Fanout("fanout")
    started = time.perf_counter()
    total = runner.run(count)
    ended = time.perf_counter()
    assert total == count * (count - 1) // 2, total
    began, enqueued, aggregated = runner.marks
    return ended - started, enqueued - began, aggregated - enqueued, ended - aggregated


# CPU accounting ------------------------------------------------------------------------
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def server_pids() -> dict[str, list[int]]:
    """Our child server processes by name (beanstalkd, memcached, etcd)."""
    found: dict[str, list[int]] = {}
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        ppid = int(text.rpartition(")")[2].split()[1])
        if ppid == me and name in ("beanstalkd", "memcached", "etcd"):
            found.setdefault(name, []).append(int(entry.name))
    return found


class CpuMeter:
    """CPU seconds used by each group of processes between start() and stop()."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.used: dict[str, float] = dict.fromkeys(groups, 0.0)
        self._before: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        return {name: sum(cpu_seconds(p) for p in pids) for name, pids in self.groups.items()}

    def start(self) -> None:
        self._before = self._now()

    def stop(self) -> None:
        for name, value in self._now().items():
            self.used[name] += value - self._before[name]

    def line(self, jobs: int) -> str:
        parts = [f"{name} {self.used[name] / jobs * 1e6:.0f}" for name in self.groups]
        total = sum(self.used.values()) / jobs * 1e6
        return f"{' | '.join(parts)} | total {total:.0f} us"


def bench_run_times(plan: Plan, floor: Floor, floor_pids: list[int],
                    worker_pids: list[int]) -> dict[int, tuple[float, float]]:
    say("== 1-2. fan-out/fan-in wall time: floor (greenstalk+pymemcache) vs packmule run()")
    say(f"   {WORKERS} worker processes each, started before the clock; no-op jobs; "
        "runs alternate floor/packmule")
    servers = server_pids()
    results: dict[int, tuple[float, float]] = {}
    for count, reps in plan.sizes:
        floors: list[tuple[float, float]] = []
        runs: list[tuple[float, float, float, float]] = []
        floor_cpu = CpuMeter({"producer": [os.getpid()], "workers": floor_pids, **servers})
        run_cpu = CpuMeter({"producer": [os.getpid()], "workers": worker_pids, **servers})
        with deadline(900, f"N={count}"):
            for _ in range(reps):
                floor_cpu.start()
                floors.append(floor.run(count))
                floor_cpu.stop()
                run_cpu.start()
                runs.append(packmule_phases(count))
                run_cpu.stop()
        f = statistics.median(x[0] for x in floors)
        p = statistics.median(x[0] for x in runs)
        results[count] = (f, p)
        say(f"floor     N={count:<7} median {fmt_s(f):>10}  {count / f:9.0f} jobs/s  "
            f"({reps} runs: {', '.join(f'{x[0]:.3f}' for x in floors)})")
        say(f"packmule  N={count:<7} median {fmt_s(p):>10}  {count / p:9.0f} jobs/s  "
            f"({reps} runs: {', '.join(f'{x[0]:.3f}' for x in runs)})  "
            f"{p / f:.2f}x floor  {p / count * 1e6:.0f} us/job")
        say(f"   phases, floor:    puts {fmt_s(statistics.median(x[1] for x in floors))}, "
            f"then until done {fmt_s(statistics.median(x[0] - x[1] for x in floors))}")
        say(f"   phases, packmule: enqueue_each {fmt_s(statistics.median(x[1] for x in runs))}, "
            f"then until the aggregate is called {fmt_s(statistics.median(x[2] for x in runs))}, "
            f"aggregate + run end {fmt_s(statistics.median(x[3] for x in runs))}")
        say(f"   cpu/job, floor:    {floor_cpu.line(count * reps)}")
        say(f"   cpu/job, packmule: {run_cpu.line(count * reps)}")
    return results


# 3. Fan-in latency ------------------------------------------------------------------------
def bench_fanin(plan: Plan) -> float:
    from bench_runners import FanInClock

    say("== 3. fan-in latency: last child returned -> aggregate method starts (N=100)")
    caller: list[float] = []
    with deadline(300, "fan-in"):
        for _ in range(plan.fanin_runs):
            caller.append(FanInClock("fanin").run(100))
        worker: list[float] = []
        for _ in range(plan.fanin_runs):
            runner = FanInClock("fanin-async")
            runner.run_async(100)
            while not runner.update_progress().finished:
                time.sleep(0.005)
            worker.append(float(runner.get_return_value()))
    for label, values in (("caller (run)", caller), ("worker (run_async)", worker)):
        say(f"fan-in {label:<19} median {statistics.median(values) * 1000:6.2f} ms  "
            f"p95 {p95(values) * 1000:6.2f} ms  max {max(values) * 1000:6.2f} ms  "
            f"({len(values)} runs)")
    return statistics.median(caller)


# 4. Progress reads -------------------------------------------------------------------------
def bench_progress(plan: Plan) -> tuple[float, float]:
    from bench_runners import Driven

    say("== 4. update_progress() wall time (no workers on the tube; totals from enqueue_each)")
    sizes = (1_000, plan.progress_big)
    result: list[list[float]] = []

    def with_runs(pending: list[int], readers: list[Driven]) -> None:
        """Open one run per size, nested, so all are running while they are read."""
        if not pending:
            result.extend(read_progress(plan, readers))
            return
        count = pending[0]

        def inside(runner: Driven) -> None:
            runner.enqueue_each("echo", range(count))
            reader = Driven(f"progress-{count}")  # another instance: reads like another process
            assert reader.update_progress().total == count, reader.update_progress()
            with_runs(pending[1:], [*readers, reader])

        Driven(f"progress-{count}", tube=IDLE_TUBE).run(inside)

    with deadline(600, "progress reads"):
        with_runs(list(sizes), [])
    medians = [statistics.median(t) for t in result]
    return medians[0], medians[1]


def read_progress(plan: Plan, readers: list[Any]) -> list[list[float]]:
    """Time ``plan.progress_reads`` reads of each reader, interleaved; print the figures."""
    store, coord = backends().store, backends().coord
    times: list[list[float]] = [[] for _ in readers]
    trips_before, etcd_before = store.round_trips, coord.round_trips
    for _ in range(plan.progress_reads):  # interleaved, so both sizes see the same noise
        for index, reader in enumerate(readers):
            started = time.perf_counter()
            reader.update_progress()
            times[index].append(time.perf_counter() - started)
    trips = (store.round_trips - trips_before) / plan.progress_reads / len(readers)
    etcd_trips = (coord.round_trips - etcd_before) / plan.progress_reads / len(readers)
    for reader, values in zip(readers, times, strict=True):
        say(f"progress  run of {reader.update_progress().total:<7} median "
            f"{statistics.median(values) * 1e6:7.0f} us  p95 {p95(values) * 1e6:7.0f} us  "
            f"({plan.progress_reads} reads, {trips:.0f} memcached + {etcd_trips:.0f} etcd "
            "round trip(s) each)")
    return times


# 5. Enqueue throughput and memory ------------------------------------------------------------
def bench_enqueue(plan: Plan) -> tuple[float, float]:
    from bench_runners import Driven

    say("== 5. enqueue throughput, 10,000 jobs, no workers, each in a fresh run")
    count = 10_000
    loops, eaches = [], []

    def timed_loop(runner: Driven) -> float:
        runner.enqueue("echo", -1)  # the run's first batch and template, off the clock
        started = time.perf_counter()
        for index in range(count):
            runner.enqueue("echo", index)
        return count / (time.perf_counter() - started)

    def timed_each(runner: Driven) -> float:
        runner.enqueue("echo", -1)
        started = time.perf_counter()
        runner.enqueue_each("echo", range(count))
        return count / (time.perf_counter() - started)

    with deadline(600, "enqueue"):
        for rep in range(plan.enqueue_reps):  # run() started the run (etcd lease, counters)
            loops.append(Driven(f"enqueue-loop-{rep}", tube=IDLE_TUBE).run(timed_loop))
            eaches.append(Driven(f"enqueue-each-{rep}", tube=IDLE_TUBE).run(timed_each))
    loop, each = statistics.median(loops), statistics.median(eaches)
    say(f"enqueue       loop  median {loop:8.0f} jobs/s  ({1e6 / loop:.0f} us/job, "
        f"{len(loops)} runs)")
    say(f"enqueue_each  batch median {each:8.0f} jobs/s  ({1e6 / each:.0f} us/job, "
        f"{len(eaches)} runs)  {each / loop:.2f}x loop")
    return loop, each


# 6. Signing ---------------------------------------------------------------------------------
SIGNING_JOBS, SIGNING_REPS = 10_000, 5


def bench_signing() -> float:
    """Seconds per job to sign a body (producer) and verify it (worker), median of the reps."""
    from packmule.envelope import BodyTemplate, Envelope, encode_args
    from packmule.signing import Signer

    say(f"== 6. signing: sign and verify {SIGNING_JOBS:,} job bodies (HMAC-SHA256), one process")
    signer = Signer(["bench-secret-" + "7" * 32])
    envelope = Envelope("bench_runners:Fanout", "bench", uuid.uuid4().hex[:16], 0, "caller.1",
                        "echo", [], {"tube": TUBE}, lease=7587000000000000000)
    bodies = [BodyTemplate(envelope).body(n, encode_args("echo", [n]))
              for n in range(SIGNING_JOBS)]
    costs = []
    for _ in range(SIGNING_REPS):
        started = time.perf_counter()
        for body in bodies:
            signer.verify(signer.sign(body))
        costs.append((time.perf_counter() - started) / SIGNING_JOBS)
    cost = statistics.median(costs)
    say(f"signing   sign + verify median {cost * 1e6:.2f} us/job  ({SIGNING_REPS} runs; "
        f"bodies of {len(bodies[-1])} B, +{len(signer.sign(bodies[-1])) - len(bodies[-1])} B "
        "signed)")
    return cost


def producer_memory(env: dict[str, str], count: int) -> dict[str, float]:
    """Peak memory of a fresh producer process enqueueing ``count`` jobs with enqueue_each."""
    reports = {}
    for mode in ("rss", "tracemalloc"):
        out = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--producer-memory", str(count),
             "--memory-mode", mode], env=env, cwd=ROOT, check=True, capture_output=True,
            timeout=600)
        reports.update(json.loads(out.stdout.decode().strip().splitlines()[-1]))
    return reports


def producer_memory_child(count: int, mode: str) -> None:
    """In a child process: enqueue ``count`` jobs and print the peak memory as JSON."""
    from bench_runners import Driven

    packmule.configure(tube=IDLE_TUBE)

    def measure(runner: Driven) -> dict[str, float]:
        runner.enqueue("echo", -1)  # imports done, connections and the run made
        before = rss_kb(os.getpid())[0]
        if mode == "tracemalloc":
            import tracemalloc

            tracemalloc.start()
            runner.enqueue_each("echo", range(count))
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            return {"tracemalloc_peak_mb": peak / 2**20}
        runner.enqueue_each("echo", range(count))
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking parent.
        return {"rss_before_mb": before / 1024, "rss_peak_mb": rss_kb(os.getpid())[1] / 1024}

    print(json.dumps(Driven(f"memory-{mode}", tube=IDLE_TUBE).run(measure)))


# 7. Fairness between runs ---------------------------------------------------------------------
@contextmanager
def priorities(mode: str) -> Iterator[None]:
    """``fair``: packmule's per-job priorities; ``flat``: every job of a level alike (FIFO).

    Patched in this process only: the producer computes a job's priority as it puts it.
    """
    fair = runner_module.job_priority
    if mode == "flat":
        runner_module.job_priority = lambda level, number: level << runner_module.POSITION_BITS
    try:
        yield
    finally:
        runner_module.job_priority = fair


def small_during_large(large: int, small: int = 20) -> tuple[float, int]:
    """(wall time of a ``small``-job run() started while a ``large`` one is under way,
    jobs of the large run still to do when the small one returned)."""
    from bench_runners import Fanout

    big = threading.Thread(target=lambda: Fanout("fair-large").run(large))
    big.start()
    reader = Fanout("fair-large")
    while (progress := reader.update_progress()).state != "running" \
            or progress.completed < large // 5:  # its enqueue_each is over by then
        time.sleep(0.005)
    started = time.perf_counter()
    Fanout("fair-small").run(small)
    wall = time.perf_counter() - started
    progress = reader.update_progress()
    big.join(timeout=600)
    return wall, progress.total - progress.completed


def bench_fairness(plan: Plan, worker_pids: list[int]) -> tuple[float, float]:
    say(f"== 7. fairness: a large run alone (N={plan.fairness_jobs}), per-job priorities (fair) "
        "vs one priority for all (flat), alternating; then a 20-job run started during it")
    count = plan.fairness_jobs
    walls: dict[str, list[float]] = {"fair": [], "flat": []}
    meters = {mode: CpuMeter({"producer": [os.getpid()], "workers": worker_pids})
              for mode in walls}
    with deadline(1200, "fairness"):
        for _ in range(plan.fairness_reps):
            for mode, times in walls.items():
                with priorities(mode):
                    meters[mode].start()
                    times.append(packmule_run(count))
                    meters[mode].stop()
        small = {}
        for mode in walls:
            with priorities(mode):
                small[mode] = small_during_large(count)
    fair, flat = (statistics.median(walls[mode]) for mode in ("fair", "flat"))
    for mode, times in walls.items():
        say(f"large run alone, {mode}: median {fmt_s(statistics.median(times))}  "
            f"{count / statistics.median(times):7.0f} jobs/s  ({len(times)} runs: "
            f"{', '.join(f'{t:.3f}' for t in times)})  cpu/job {meters[mode].line(count * len(times))}")
    say(f"fairness costs the large run {(fair / flat - 1) * 100:+.1f}% wall time")
    for mode, (wall, left) in small.items():
        say(f"20-job run started during a large one, {mode}: {fmt_s(wall)}; "
            f"the large run still had {left} of {count + 1} jobs to do when it returned")
    return fair / flat, small["fair"][0]


# 8. Scale up: a million jobs ------------------------------------------------------------------
def scale_child(count: int) -> None:
    """In a fresh process: one ``Fanout.run(count)``; print wall time, phases and memory as JSON."""
    from bench_runners import Fanout

    packmule_run(200)  # imports, connections, a run: the baseline is a warm producer
    before = rss_kb(os.getpid())[0]
    wall, enqueue, until_aggregate, after = packmule_phases(count)
    print(json.dumps({"wall": wall, "enqueue": enqueue, "until_aggregate": until_aggregate,
                      "aggregate": after, "rss_before_mb": before / 1024,
                      "rss_peak_mb": rss_kb(os.getpid())[1] / 1024}))
    del Fanout


def scale_run(env: dict[str, str], count: int) -> tuple[dict[str, float], list[tuple[int, float]]]:
    """Run ``count`` jobs in a child producer; its report, and (completed, read time) of the
    progress reads made here every ~0.5 s while it ran."""
    from bench_runners import Fanout

    child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--scale-child",
                              str(count)], env=env, cwd=ROOT, stdout=subprocess.PIPE)
    reader, reads = Fanout("fanout"), []
    while child.poll() is None:
        started = time.perf_counter()
        progress = reader.update_progress()
        elapsed = time.perf_counter() - started
        if progress.state == "running" and progress.total == count + 1:
            reads.append((progress.completed, elapsed))
        time.sleep(0.5)
    out, _ = child.communicate(timeout=60)
    if child.returncode:
        raise RuntimeError(f"the producer of {count} jobs failed ({child.returncode})")
    return json.loads(out.decode().strip().splitlines()[-1]), reads


def run_scale(jobs: int) -> int:
    """``--scale``: runs of jobs/10 then ``jobs`` jobs, each in a fresh producer; the figures."""
    say(f"packmule scale-up {time.strftime('%Y-%m-%d %H:%M')}  python {sys.version.split()[0]}  "
        f"{os.cpu_count()} cpu  load average before: {load_average()}")
    # memcached keeps every value of both runs (~150 B an item): -m sized for them, -M kept.
    with start_local_servers(memcached_mb=max(256, jobs // 2500)) as servers:
        env = {**os.environ, **servers.env(), "PACKMULE_NAMESPACE": NAMESPACE,
               "PYTHONPATH": PYTHONPATH, "PACKMULE_TUBE": TUBE}
        os.environ.update({k: v for k, v in env.items() if k.startswith("PACKMULE_")})
        config.reset()
        packmule.configure(tube=TUBE)
        procs = Procs(env)
        try:
            workers = procs.start([sys.executable, "-m", "packmule", "--log-level", "WARNING",
                                   "worker", "--import", "bench_runners", "--tube", TUBE], WORKERS)
            with deadline(120, "warm-up"):
                packmule_run(200)
            results = {}
            for count in (jobs // 10, jobs):
                with deadline(7200, f"scale N={count}"):
                    results[count] = scale_run(env, count)
                report_scale(count, *results[count], workers, server_pids())
        finally:
            procs.stop()
    small, big = results[jobs // 10][0], results[jobs][0]
    growth = big["wall"] / small["wall"]
    reads = {count: statistics.median(t for _, t in results[count][1]) for count in results}
    say("== targets")
    say(f"{verdict(growth <= 11)}  N={jobs} within 11x of N={jobs // 10}: {growth:.2f}x")
    say(f"{verdict(big['rss_peak_mb'] < 300)}  producer peak < 300 MB at N={jobs}: "
        f"{big['rss_peak_mb']:.0f} MB")
    say(f"{verdict(reads[jobs] <= 1.2 * reads[jobs // 10])}  progress read at N={jobs} within "
        f"1.2x of N={jobs // 10}: {reads[jobs] / reads[jobs // 10]:.2f}x")
    say(f"load average after: {load_average()}")
    return 0


def report_scale(count: int, report: dict[str, float], reads: list[tuple[int, float]],
                 workers: list[subprocess.Popen[bytes]], servers: dict[str, list[int]]) -> None:
    say(f"== N={count}: run() {report['wall']:.1f} s ({count / report['wall']:.0f} jobs/s): "
        f"enqueue_each {report['enqueue']:.1f} s, then until the aggregate "
        f"{report['until_aggregate']:.1f} s, aggregate + run end {report['aggregate']:.2f} s")
    say(f"   producer VmRSS {report['rss_before_mb']:.0f} MB before, VmHWM "
        f"{report['rss_peak_mb']:.0f} MB peak (enqueue_each, the wait, the aggregate's "
        f"{count} values)")
    if reads:
        times = [t for _, t in reads]
        quarters = []
        for quarter in range(4):
            inside = [t for done, t in reads if quarter <= 4 * done / count < quarter + 1]
            quarters.append(f"{statistics.median(inside) * 1e6:.0f}" if inside else "-")
        say(f"   progress reads during the run: {len(times)}, median "
            f"{statistics.median(times) * 1e6:.0f} us, p95 {p95(times) * 1e6:.0f} us; by quarter "
            f"of the run: {', '.join(quarters)} us")
    sizes = [tuple(kb / 1024 for kb in rss_kb(w.pid)) for w in workers]
    say(f"   workers VmRSS/VmHWM {', '.join(f'{now:.0f}/{peak:.0f}' for now, peak in sizes)} MB")
    peaks = {name: max(rss_kb(pid)[1] for pid in pids) / 1024 for name, pids in servers.items()}
    say(f"   servers VmHWM {', '.join(f'{name} {mb:.0f}' for name, mb in peaks.items())} MB")


# Profiles ------------------------------------------------------------------------------------
def collapse(raw: str, skip: Callable[[list[str]], bool]) -> tuple[Counter[str], Counter[str], int]:
    """Inclusive and self sample counts per function from py-spy's raw (collapsed) output."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = [_short(f) for f in stack.split(";")]
        if skip(frames):
            continue
        count = int(count_text)
        total += count
        for name in set(frames):
            inclusive[name] += count
        own[frames[-1]] += count
    return inclusive, own, total


def _short(frame: str) -> str:
    """``func (path/to/module.py:12)`` -> ``to/module.py:func``; the line number is dropped."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{'/'.join(path.split('/')[-2:])}:{name}"


# Phases of Worker._handle, by the frame that marks each (first match wins).
PHASES = (
    ("reserve (waiting for a job + the reserve round trip)", "packmule/worker.py:Worker._reserve"),
    ("decode envelope + build runner (prepare)", "packmule/execution.py:prepare"),
    ("decode envelope + build runner (decode)", "packmule/envelope.py:decode"),
    ("cancelled? check", "packmule/execution.py:cancelled"),
    ("keep-alive arm/disarm", "packmule/keepalive.py:KeepAlive.watching"),
    ("the job method itself (execute)", "packmule/execution.py:execute"),
    ("record: store.add job outcome", "packmule/store.py:Store.add"),
    ("record: progress + batch counters (one packet) + batch record", "packmule/aggregate.py:_notify"),
    ("record: other", "packmule/execution.py:record"),
    ("beanstalkd delete", "greenstalk/__init__.py:Client.delete"),
)


def profile_worker(worker_pid: int, count: int, *, wall: bool) -> None:
    """py-spy a worker during one run() of ``count`` jobs.

    ``wall``: every sample (py-spy --idle), waits for replies and for a CPU
    included; else only samples where the worker was on a CPU.
    """
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        say("profile: py-spy not found (pip install py-spy); skipped")
        return
    view = "wall" if wall else "cpu"
    out = Path(f"/tmp/packmule-bench-pyspy-{os.getpid()}-{view}.txt")
    # --nonblocking: the worker is not paused per sample (blocking mode at 500 Hz doubled
    # the run time); the price is a few torn stacks, counted and left out below.
    proc = subprocess.Popen([spy, "record", "--pid", str(worker_pid), "--rate", "250",
                             "--nonblocking", *(["--idle"] if wall else []), "--format", "raw",
                             "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # py-spy attaches
    cpu_before = cpu_seconds(worker_pid)
    elapsed = packmule_run(count)
    cpu_used = cpu_seconds(worker_pid) - cpu_before
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if not out.exists():
        say(f"profile: py-spy wrote nothing: {err.decode()[-500:]}")
        return
    lines = out.read_text().splitlines()
    # The main thread's stacks start at runpy; KeepAlive threads start at Thread._bootstrap.
    main = [line for line in lines if line.startswith("_run_module_as_main")]
    torn = sum(int(line.rpartition(" ")[2]) for line in lines
               if not line.startswith(("_run_module_as_main", "Thread._bootstrap")))
    loop = "packmule/worker.py:Worker.loop_once"
    inclusive, own, total = collapse("\n".join(main), lambda frames: loop not in frames)
    say(f"== profile: py-spy (250 Hz, {view} view) on worker pid {worker_pid} during run() of "
        f"{count} jobs ({elapsed:.2f} s wall, this worker used {cpu_used:.2f} s CPU); {total} "
        f"samples in the worker loop ({torn} torn stacks left out); raw stacks in {out}")
    phases: Counter[str] = Counter()
    for line in main:
        stack, _, count_text = line.rpartition(" ")
        frames = {_short(f) for f in stack.split(";")}
        if loop not in frames:
            continue
        phase = next((label for label, marker in PHASES if marker in frames), "loop: other")
        phases[phase] += int(count_text)
    # us per job this worker handled (about count / WORKERS of them)
    per_job = (elapsed if wall else cpu_used) / (count / WORKERS) * 1e6
    say(f"   where the worker's {view} time goes (~{per_job:.0f} us of {view} time per job):")
    for label, hits in phases.most_common():
        say(f"   {hits / total:6.1%}  ~{hits / total * per_job:4.0f} us  {label}")
    handling = total - inclusive["packmule/worker.py:Worker._reserve"]
    say("   inclusive % of job handling (loop_once minus _reserve = 100%):")
    reserve = "packmule/worker.py:Worker._reserve"
    in_handling = Counter({name: hits - _under(main, name, reserve)
                           for name, hits in inclusive.items()
                           if hits < total and name != reserve})
    for name, hits in in_handling.most_common(24):
        say(f"   {hits / handling:6.1%}  {name}")
    say("   self % of all loop samples (leaf frames):")
    for name, hits in own.most_common(12):
        say(f"   {hits / total:6.1%}  {name}")


def _under(lines: list[str], name: str, ancestor: str) -> int:
    """Samples in which ``name`` appears below ``ancestor``."""
    hits = 0
    for line in lines:
        stack, _, count = line.rpartition(" ")
        frames = [_short(f) for f in stack.split(";")]
        if ancestor in frames and name in frames[frames.index(ancestor):]:
            hits += int(count)
    return hits


def profile_fanin(env: dict[str, str], procs: Procs, runs: int) -> None:
    """Split the fan-in latency (N=100, caller context) along its path, from timestamps.

    Extra workers import benchmarks/fanin_probe.py, which wraps a few packmule
    functions; so does this process, for the rest of its life (run this last).
    """
    from bench_runners import FanInTrace

    folder = Path(tempfile.mkdtemp(prefix="packmule-bench-trace-"))
    tube = "bench-trace"
    traced_env = {**env, "PACKMULE_BENCH_TRACE": str(folder)}
    os.environ["PACKMULE_BENCH_TRACE"] = str(folder)
    import fanin_probe

    problem = fanin_probe.install()
    if problem:
        say(f"profile: fan-in trace skipped: {problem}")
        return
    started = procs.start([sys.executable, "-m", "packmule", "--log-level", "WARNING", "worker",
                           "--import", "fanin_probe", "--import", "bench_runners",
                           "--tube", tube], WORKERS, traced_env)
    windows = []
    try:
        with deadline(300, "fan-in trace"):
            for index in range(runs + 3):
                begin = time.time()
                called, last = FanInTrace("trace", tube=tube).run(100)
                if index >= 3:  # warm-up: imports, connections
                    windows.append((begin, time.time(), called, last))
    finally:
        procs.stop_some(started)
    events: list[tuple[int, str, float, float]] = []
    for trace in folder.iterdir():
        for line in trace.read_text().splitlines():
            name, start_text, end_text = line.split()
            events.append((int(trace.name), name, float(start_text), float(end_text)))
    shutil.rmtree(folder, ignore_errors=True)
    me = os.getpid()
    segments: dict[str, list[float]] = {}
    caller_fired = 0
    for begin, end, called, last in windows:
        mine = [e for e in events if begin <= e[2] <= end]
        creates = [e for e in mine if e[1] == "create_if_absent" and e[0] != me]
        firing = [c for c in mine if c[1] == "complete" and c[0] != me and creates
                  and any(x[0] == c[0] and c[2] <= x[2] <= c[3] for x in creates)]
        if not firing:
            caller_fired += 1  # every job finished before registration: the caller fired
            continue
        complete = firing[-1]
        inside = [e for e in mine if e[0] == complete[0] and complete[2] <= e[2] <= complete[3]]
        state = next(e for e in inside if e[1] == "batches_state")
        create = next(e for e in inside if e[1] == "create_if_absent")
        wake = min((e[2] for e in mine if e[0] == me and e[1] == "wake" and e[2] >= create[2]),
                   default=None)
        gather = next((e for e in mine if e[0] == me and e[1] == "gather"), None)
        if wake is None or gather is None:
            continue
        points = [
            ("last job returned -> its completion starts (worker)", last, complete[2]),
            ("completion: outcome add, counters, batch and aggregate records", complete[2],
             state[2]),
            ("batches complete? (worker)", state[2], state[3]),
            ("-> etcd create starts", state[3], create[2]),
            ("etcd create_if_absent 'fired' marker", create[2], create[3]),
            ("etcd watch delivers the event to the caller", create[3], wake),
            ("caller: wake-up -> gather starts (watch stopped)", wake, gather[2]),
            ("caller: gather, read all N outcomes once", gather[2], gather[3]),
            ("caller: settle -> aggregate method called", gather[3], called),
            ("total (traced; tracing adds a little)", last, called),
        ]
        for label, a, b in points:
            segments.setdefault(label, []).append(b - a)
    say(f"== profile: fan-in path, N=100, caller context, {len(windows)} traced runs "
        f"({caller_fired} fired by the caller itself, left out); medians:")
    for label, values in segments.items():
        say(f"   {statistics.median(values) * 1000:6.2f} ms  {label}")


def profile_enqueue_each(count: int) -> None:
    from bench_runners import Driven

    profiler = cProfile.Profile()

    def profiled(runner: Driven) -> float:
        runner.enqueue("echo", -1)
        started = time.perf_counter()
        profiler.enable()
        runner.enqueue_each("echo", range(count))
        profiler.disable()
        return time.perf_counter() - started

    elapsed = Driven("profile-enqueue", tube=IDLE_TUBE).run(profiled)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(14)
    say(f"== profile: cProfile of enqueue_each({count}) in the producer "
        f"({elapsed:.2f} s under the profiler), top by own time:")
    for line in text.getvalue().splitlines():
        if line.strip() and not line.startswith(("   Ordered", "   List")):
            say("   " + line.strip())


# Main ----------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, under a minute")
    parser.add_argument("--profile", action="store_true", help="also profile a worker and enqueue")
    parser.add_argument("--only", choices=["fairness"],
                        help="run one section (with the plan of --quick or the full one)")
    parser.add_argument("--scale", type=int, nargs="?", const=1_000_000, metavar="N",
                        help="only the scale-up: runs of N/10 and N jobs (default 1,000,000)")
    parser.add_argument("--scale-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--producer-memory", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--memory-mode", default="rss", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.producer_memory:
        producer_memory_child(args.producer_memory, args.memory_mode)
        return 0
    if args.scale_child:
        scale_child(args.scale_child)
        return 0
    if args.scale:
        return run_scale(args.scale)
    plan = QUICK if args.quick else FULL
    began = time.perf_counter()
    say(f"packmule benchmarks {time.strftime('%Y-%m-%d %H:%M')}  python "
        f"{sys.version.split()[0]}  {os.cpu_count()} cpu  {'--quick' if args.quick else 'full'}  "
        f"load average before: {load_average()}")
    with start_local_servers() as servers:
        env = {**os.environ, **servers.env(), "PACKMULE_NAMESPACE": NAMESPACE,
               "PYTHONPATH": PYTHONPATH}
        os.environ.update({k: v for k, v in env.items() if k.startswith("PACKMULE_")})
        config.reset()
        packmule.configure(tube=TUBE)
        procs = Procs(env)
        try:
            return run_all(plan, args, servers, env, procs, began)
        finally:
            procs.stop()


def run_all(plan: Plan, args: argparse.Namespace, servers: LocalServers, env: dict[str, str],
            procs: Procs, began: float) -> int:
    floor = Floor(servers)
    floor_workers = procs.start(floor.argv(), WORKERS)
    workers = procs.start([sys.executable, "-m", "packmule", "--log-level", "WARNING", "worker",
                           "--import", "bench_runners", "--tube", TUBE], WORKERS)
    with deadline(120, "warm-up"):  # imports, connections: before any clock
        floor.run(200)
        packmule_run(200)
    if args.only == "fairness":
        fairness, small_fair = bench_fairness(plan, [p.pid for p in workers])
        say(f"{verdict(fairness <= 1.05)}  fairness costs a large run < 5%: "
            f"{(fairness - 1) * 100:+.1f}% (a 20-job run started during it took {fmt_s(small_fair)})")
        return 0
    times = bench_run_times(plan, floor, [p.pid for p in floor_workers],
                            [p.pid for p in workers])
    worker_rss = [rss_kb(p.pid) for p in workers]
    floor_rss = [rss_kb(p.pid) for p in floor_workers]
    fanin = bench_fanin(plan)
    if args.profile:
        profile_worker(workers[0].pid, 10_000, wall=True)
        profile_worker(workers[0].pid, 10_000, wall=False)
    progress_small, progress_big = bench_progress(plan)
    loop, each = bench_enqueue(plan)
    memory = producer_memory(env, plan.memory_jobs)
    signing = bench_signing()
    say(f"== producer peak memory, enqueue_each of {plan.memory_jobs} jobs in a fresh process")
    say(f"producer  VmRSS {memory['rss_before_mb']:.1f} MB before -> "
        f"VmHWM {memory['rss_peak_mb']:.1f} MB peak (+{memory['rss_peak_mb'] - memory['rss_before_mb']:.1f}"
        f" MB); tracemalloc peak {memory['tracemalloc_peak_mb']:.1f} MB "
        f"({memory['tracemalloc_peak_mb'] * 2**20 / plan.memory_jobs:.0f} B/job)")
    biggest = max(n for n, _ in plan.sizes)
    say(f"== worker resident memory after the N={biggest} runs")
    for label, sizes in (("packmule worker", worker_rss), ("floor worker", floor_rss)):
        say(f"{label:<16} VmRSS {', '.join(f'{r / 1024:.1f}' for r, _ in sizes)} MB  "
            f"(VmHWM {', '.join(f'{h / 1024:.1f}' for _, h in sizes)} MB)")
    fairness, small_fair = bench_fairness(plan, [p.pid for p in workers])
    if args.profile:
        profile_enqueue_each(10_000)
        profile_fanin(env, procs, plan.fanin_runs)

    say("== targets")
    floor10k, run10k = times[10_000]
    ratio = run10k / floor10k
    say(f"{verdict(ratio <= 1.5)}  run() at N=10,000 within 1.5x of the floor: {ratio:.2f}x")
    if 100_000 in times:
        growth = times[100_000][1] / run10k
        floor_growth = times[100_000][0] / floor10k  # the machine's own drift, for context
        say(f"{verdict(growth <= 11)}  run() at N=100,000 within 11x of N=10,000: {growth:.2f}x "
            f"(the floor in the same run: {floor_growth:.2f}x)")
    else:
        say(f"{verdict(None)}  run() at N=100,000 within 11x of N=10,000: not run with --quick")
    say(f"{verdict(fanin < 0.005)}  fan-in median < 5 ms: {fanin * 1000:.2f} ms")
    growth = progress_big / progress_small
    say(f"{verdict(growth <= 1.2)}  progress read at {plan.progress_big} within 1.2x of 1,000: "
        f"{growth:.2f}x")
    say(f"{verdict(each >= 2 * loop)}  enqueue_each >= 2x enqueue loop: {each / loop:.2f}x")
    say(f"{verdict(fairness <= 1.05)}  fairness costs a large run < 5%: {(fairness - 1) * 100:+.1f}% "
        f"(a 20-job run started during it took {fmt_s(small_fair)})")
    worst = max(r for r, _ in worker_rss) / 1024
    peak = max(h for _, h in worker_rss) / 1024
    say(f"{verdict(signing < 5e-6)}  signing: sign + verify < 5 us/job: {signing * 1e6:.2f} us")
    say(f"{verdict(worst < 80)}  worker RSS < 80 MB: {worst:.1f} MB after the runs "
        f"(peak VmHWM during them {peak:.1f} MB: {verdict(peak < 80)} if judged by the peak)")
    say(f"done in {time.perf_counter() - began:.0f} s; load average after: {load_average()} "
        "(other work on the machine skews wall times; the cpu/job lines much less)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
