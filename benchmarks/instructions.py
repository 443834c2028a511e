"""Instructions per job, counted by valgrind (callgrind): repeatable on a busy machine.

    python benchmarks/instructions.py            # the worker and the producer's loop
    python benchmarks/instructions.py --jobs 500 # fewer jobs (the difference of two sizes)

Wall and CPU times move with whatever else the machine runs; the number of
instructions a process executes in user space barely does. Each figure is
the difference between two runs of a process under callgrind, one handling
``--jobs`` more jobs than the other, divided by that difference: start-up,
imports and connections cancel out. What it does not count is the
kernel's work (system calls, waking other processes), which the waits and
``of which in the kernel`` lines of run.py show, nor other threads than the
main one.

- worker: one packmule worker (``--burst``) or one floor worker handles the
  jobs of a loop-of-enqueue run (no-op jobs returning the time), then exits.
- producer: a loop of ``enqueue`` calls in a run, on a tube nobody watches.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from run import IDLE_TUBE, NAMESPACE, PYTHONPATH, ROOT, Floor, say  # noqa: E402

import packmule  # noqa: E402
from packmule import config  # noqa: E402
from packmule.servers import start_local_servers  # noqa: E402

TUBE = "bench-count"
BASE = 200  # jobs of the smaller run of each pair


def callgrind(argv: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
    """Start ``argv`` under callgrind; the process and the file its counts go to."""
    out = Path(tempfile.mkstemp(prefix="packmule-callgrind-")[1])
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                             "--separate-threads=yes", "--dump-instr=no", *argv], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, out


def total_instructions(out: Path) -> int:
    """Instructions of the main thread: the ``summary:`` line of its callgrind file.

    Other threads (etcd's gRPC client, the keep-alive) run for as long as the
    process does, which callgrind stretches 50-fold: their count follows the
    clock, not the jobs.
    """
    main = Path(f"{out}-01")
    for line in main.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {main}")


def packmule_worker(env: dict[str, str], jobs: int) -> int:
    """Instructions of a packmule worker handling the ``jobs`` jobs of one run."""
    from bench_runners import Loop

    result: dict[str, float] = {}
    runner = Loop(f"count-{jobs}-{time.time()}", tube=TUBE)
    thread = threading.Thread(target=lambda: result.update(lag=runner.run(jobs)), daemon=True)
    thread.start()
    time.sleep(0.5 + jobs / 5000)  # the loop puts the jobs (a worker joining later changes nothing)
    proc, out = callgrind([sys.executable, "-m", "packmule", "--log-level", "WARNING", "worker",
                           "--import", "bench_runners", "--tube", TUBE, "--burst"], env)
    thread.join(600)
    proc.wait(600)
    assert "lag" in result, "the run did not finish"
    return total_instructions(out)


def floor_worker(floor: Floor, env: dict[str, str], jobs: int) -> int:
    """Instructions of a floor worker handling ``jobs`` jobs."""
    thread = threading.Thread(target=floor.run, args=(jobs,), daemon=True)
    proc, out = callgrind(floor.argv(jobs), env)
    thread.start()
    thread.join(600)
    proc.wait(600)
    return total_instructions(out)


def producer(env: dict[str, str], jobs: int) -> int:
    """Instructions of a process whose run() makes ``jobs`` enqueue calls in a loop."""
    code = ("import sys; sys.path[:0] = [{bench!r}]\n"
            "import packmule; from bench_runners import Driven\n"
            "packmule.configure(tube={tube!r})\n"
            "Driven('count-producer').run(lambda r: [r.enqueue('stamp', i) for i in range({n})])\n")
    proc, out = callgrind([sys.executable, "-c", code.format(bench=str(BENCH), tube=IDLE_TUBE,
                                                             n=jobs)], env)
    proc.wait(600)
    return total_instructions(out)


def per_job(measure: object, jobs: int, reps: int) -> list[float]:
    """Instructions per job: the difference of a run of BASE + jobs and one of BASE jobs."""
    found = []
    for _ in range(reps):
        small = measure(BASE)  # type: ignore[operator]
        large = measure(BASE + jobs)  # type: ignore[operator]
        found.append((large - small) / jobs)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--jobs", type=int, default=1000, help="the difference of the two sizes")
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    say(f"instructions per job (callgrind), {args.reps} pair(s) of runs differing by {args.jobs} "
        f"jobs; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with start_local_servers() as servers:
        env = {**os.environ, **servers.env(), "PACKMULE_NAMESPACE": NAMESPACE,
               "PYTHONPATH": PYTHONPATH}
        os.environ.update({k: v for k, v in env.items() if k.startswith("PACKMULE_")})
        config.reset()
        packmule.configure(tube=TUBE)
        floor, plain = Floor(servers), Floor(servers, plain=True)
        figures = {
            "floor worker": per_job(lambda n: floor_worker(floor, env, n), args.jobs, args.reps),
            "plain floor worker": per_job(lambda n: floor_worker(plain, env, n), args.jobs,
                                          args.reps),
            "packmule worker": per_job(lambda n: packmule_worker(env, n), args.jobs, args.reps),
            "producer, loop of enqueue": per_job(lambda n: producer(env, n), args.jobs,
                                                 args.reps),
        }
    for label, values in figures.items():
        say(f"{label:<26} {min(values):9,.0f} instructions/job  "
            f"(pairs: {', '.join(f'{v:,.0f}' for v in values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
