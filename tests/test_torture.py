"""A seeded randomized torture test: many runs of mixed shapes under faults.

A seed drives everything random: the shapes and sizes of the runs, which jobs
fail, die or diverge, and when the chaos thread kills a worker with SIGKILL.
``PACKMULE_TORTURE_SEED`` overrides the fixed default (CI is reproducible);
``PACKMULE_TORTURE_CLOCK_SEED=1`` adds a second run with a seed from the clock.
Thread timing still varies between two runs of one seed: the seed fixes what
is asked, not where each kill lands.

Each run is a JSON spec interpreted by ``torture_runners.Torture``; :func:`model`
computes, in plain Python, the value the run must end with. Every run must end
``done`` with exactly that value (runs that fail on purpose are fixed and kicked
first), none may stay running, and every problem is reported with the seed,
the spec, what was expected and what was found.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, Workers
from torture_runners import Torture

import packmule
from packmule.backends import backends

DEFAULT_SEED = 20240611
WORKERS = 3
MAX_KILLS = 10
MAX_CRASH_RESTARTS = 20  # workers that exited by themselves (a bug): restarted this often at most
DEADLINE_SECONDS = 60.0  # every run must have ended by then (pytest-timeout is the backstop)
END_STATES = ("done", "failed", "lost", "cancelled")


def _seeds() -> list[int]:
    seeds = [int(os.environ.get("PACKMULE_TORTURE_SEED", DEFAULT_SEED))]
    if os.environ.get("PACKMULE_TORTURE_CLOCK_SEED"):
        seeds.append(time.time_ns() % (1 << 31))
    return seeds


# The model ------------------------------------------------------------------------------------
def _leaf(i: int, spec: dict[str, Any]) -> int:
    return (i * spec["mul"] + spec["add"]) % 1009


def _leaf2(i: int, k: int, spec: dict[str, Any]) -> int:
    return (i * 7 + k * 13 + spec["add"]) % 1009


@functools.cache
def _fib(n: int, salt: int) -> int:
    return n + salt if n < 2 else _fib(n - 1, salt) + _fib(n - 2, salt)


def model_failed(spec: dict[str, Any]) -> int:
    """The failed count a done run of ``spec`` ends with: its always-failing jobs."""
    return len(set(spec.get("fail", [])))


def model(spec: dict[str, Any]) -> Any:
    """The value a run of ``spec`` must end with, computed without packmule."""
    shape = spec["shape"]
    if shape == "chain":
        return f"end-{spec['salt']}-{spec['depth']}"
    if shape == "fib":
        return _fib(spec["n"], spec["salt"])
    values = {i: _leaf(i, spec) for i in range(spec["n"])}
    if shape == "tolerant":
        failed = sorted(set(spec["fail"]))
        return [failed, sum(v for i, v in values.items() if i not in failed)]
    for i in spec.get("diverge", []):
        values[i] = _leaf2(i, 1, spec) + _leaf2(i, 2, spec)
    return sum(values.values())


# The specs ------------------------------------------------------------------------------------
def _fib_nodes(n: int) -> list[tuple[str, int]]:
    """(path, n) of every fib job below the root (``run`` enqueues fib(n-1) and fib(n-2))."""
    nodes: list[tuple[str, int]] = []

    def walk(m: int, path: str) -> None:
        nodes.append((path, m))
        if m >= 2:
            walk(m - 1, path + "0")
            walk(m - 2, path + "1")

    walk(n - 1, "0")
    walk(n - 2, "1")
    return nodes


def _labels(spec: dict[str, Any]) -> list[str]:
    """The fault labels of a spec's jobs and worker-side aggregates (see ``torture_runners``)."""
    shape = spec["shape"]
    if shape == "chain":
        return [f"step{n}" for n in range(spec["depth"] + 1)]
    if shape == "fib":
        nodes = _fib_nodes(spec["n"])
        return [f"fib{p}" for p, _ in nodes] + ["add"] + [f"add{p}" for p, m in nodes if m >= 2]
    return [f"leaf{i}" for i in range(spec["n"])] + ["total"]


def make_spec(rng: random.Random, shape: str, *, folder: Path, kick_tube: str | None = None,
              depth: int | None = None) -> dict[str, Any]:
    """A random spec of ``shape``; with ``kick_tube``, some jobs are broken until fixed."""
    spec: dict[str, Any] = {"shape": shape, "dir": str(folder), "salt": rng.randrange(1000),
                            "mul": rng.randrange(1, 1000), "add": rng.randrange(1000)}
    if shape == "chain":
        spec["depth"] = depth or rng.randint(50, 500)
    elif shape == "fib":
        spec["n"] = rng.randint(6, 10)
    elif shape == "fanout":
        spec["n"] = rng.randint(50, 400) if kick_tube is None else rng.randint(20, 100)
        spec["pause"] = rng.choice([0, 0, 0.005, 0.02])
    elif shape == "tolerant":
        spec["n"] = rng.randint(20, 100)
        spec["fail"] = sorted(rng.sample(range(spec["n"]), rng.randint(1, 5)))
    elif shape == "diverge":
        spec["n"] = rng.randint(5, 30)
        spec["diverge"] = sorted(rng.sample(range(spec["n"]), rng.randint(1, 3)))
    labels = _labels(spec)
    spec["die"] = rng.sample(labels, rng.randint(0, 2))
    if kick_tube is not None:
        spec["tube"] = kick_tube
        # Broken jobs are never below one another: each runs and is buried before the fix.
        candidates = labels if shape == "fanout" else [x for x in labels if not x.startswith("add")]
        count = rng.randint(1, 3) if shape == "fanout" else 1
        spec["broken"] = rng.sample([x for x in candidates if x != "total"], count)
    return spec


@dataclass
class Plan:
    """One run: its spec, how it is started, and what the test saw of it."""

    name: str
    spec: dict[str, Any]
    blocking: bool
    expected: Any
    thread: threading.Thread | None = None
    outcome: dict[str, Any] = field(default_factory=dict)
    phase: str = "running"  # kick runs: "failing" until kicked, then "kicked"
    ended: bool = False
    ended_after: float = 0.0  # seconds from the start, for the report
    notes: list[str] = field(default_factory=list)

    @property
    def kick(self) -> bool:
        return "broken" in self.spec

    def runner(self) -> Torture:
        options: dict[str, Any] = {"max_retries": 5 if self.spec["shape"] == "diverge" else 0}
        if self.kick:
            options["tube"] = self.spec["tube"]
        return Torture(self.name, **options)


def make_plans(rng: random.Random, folder: Path, tube: str) -> list[Plan]:
    """Every shape at least once, kick runs both async and blocking, then random extras."""
    wanted: list[tuple[str, bool, bool]] = [  # (shape, blocking, kicked)
        ("fanout", False, False), ("fib", False, False), ("chain", False, False),
        ("tolerant", False, False), ("diverge", False, False), ("fanout", True, False),
        ("fib", True, False), ("chain", True, False), ("tolerant", True, False),
        ("diverge", True, False), ("fanout", False, True), (rng.choice(["fib", "chain"]), False, True),
        (rng.choice(["fanout", "fib", "chain"]), True, True),
    ]
    shapes = ["fanout", "fib", "chain", "tolerant", "diverge"]
    wanted += [(rng.choice(shapes), rng.random() < 0.3, False) for _ in range(4)]
    plans: list[Plan] = []
    for index, (shape, blocking, kicked) in enumerate(wanted):
        kick_tube = f"{tube}-k{index}" if kicked else None
        depth = 500 if index == 2 else None  # one chain is always 500 deep
        spec = make_spec(rng, shape, folder=folder, kick_tube=kick_tube, depth=depth)
        mode = "run" if blocking else "async"
        plans.append(Plan(f"{index}-{shape}-{mode}{'-kick' if kicked else ''}", spec, blocking,
                          model(spec), phase="failing" if kicked else "running"))
    return plans


# Starting, faults, watching ---------------------------------------------------------------------
def _start(plan: Plan) -> None:
    runner = plan.runner()
    if not plan.blocking:
        runner.run_async(plan.spec)
        return

    def target() -> None:
        try:
            plan.outcome["value"] = runner.run(plan.spec)
        except BaseException as err:  # handed to the test thread
            plan.outcome["error"] = err

    plan.thread = threading.Thread(target=target, daemon=True, name=plan.name)
    plan.thread.start()


class Chaos:
    """Kills a random worker at seeded random moments, replaces every dead worker."""

    def __init__(self, workers: Workers, rng: random.Random, extra: list[str]) -> None:
        self.workers, self.rng, self.extra = workers, rng, extra
        self.alive = workers.start("torture_runners", WORKERS, *extra)
        self.kills = self.crashes = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="chaos")

    def _loop(self) -> None:
        next_kill = time.monotonic() + self.rng.uniform(0.3, 1.5)
        while not self.stop.wait(0.05):
            for proc in [p for p in self.alive if p.poll() is not None]:  # a job killed it
                self.alive.remove(proc)
                if proc.returncode != -9:
                    self.crashes += 1
                if self.crashes <= MAX_CRASH_RESTARTS:  # past it, a crash loop only floods the log
                    self.alive += self.workers.start("torture_runners", 1, *self.extra)
            if self.kills < MAX_KILLS and self.alive and time.monotonic() >= next_kill:
                victim = self.alive.pop(self.rng.randrange(len(self.alive)))
                self.workers.kill9(victim)
                self.kills += 1
                self.alive += self.workers.start("torture_runners", 1, *self.extra)
                next_kill = time.monotonic() + self.rng.uniform(0.3, 1.5)

    def deaths(self) -> tuple[int, list[int]]:
        """Workers killed by SIGKILL so far, and the exit codes of any that exited otherwise."""
        codes = [p.poll() for p in self.workers.procs]
        return codes.count(-9), [c for c in codes if c is not None and c != -9]


def _buried(tube: str) -> int:
    return backends().queue.tube_stats(0, tube).get("current-jobs-buried", 0)


def _kick(plan: Plan, env: dict[str, str]) -> None:
    """Fix the broken jobs and kick them through the real CLI."""
    (Path(plan.spec["dir"]) / f"fix-{plan.name}").touch()
    kicked = subprocess.run([sys.executable, "-m", "packmule", "kick", "--tube", plan.spec["tube"]],
                            env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True,
                            timeout=30, check=False)
    plan.notes.append(f"kick: {kicked.stdout.strip()} {kicked.stderr.strip()[-300:]}")


def _watch(plans: list[Plan], env: dict[str, str]) -> None:
    """Advance every run until all ended or the deadline passed."""
    started = time.monotonic()
    while time.monotonic() < started + DEADLINE_SECONDS and not all(p.ended for p in plans):
        for plan in plans:
            if not plan.ended:
                _poll(plan, env, started)
        time.sleep(0.1)  # a polling pace (the loop ends on the conditions), not a wait


def _poll(plan: Plan, env: dict[str, str], started: float) -> None:
    """Advance ``plan``: kick it once it failed for good, mark it ended once it did."""
    _advance(plan, env)
    if plan.ended:
        plan.ended_after = time.monotonic() - started


def _advance(plan: Plan, env: dict[str, str]) -> None:
    record = Torture.find(plan.name)
    state = record.state if record else "unknown"
    thread_done = plan.thread is None or not plan.thread.is_alive()
    if plan.phase == "failing":
        if state == "done":
            plan.notes.append("done before its broken jobs were fixed")
            plan.ended = True
        elif state == "failed" and thread_done and _buried(plan.spec["tube"]) >= len(plan.spec["broken"]):
            _kick(plan, env)
            plan.phase = "kicked"
        return
    if plan.phase == "kicked":
        plan.ended = state == "done"  # after a kick only "done" ends it: "failed" is the past
        return
    plan.ended = thread_done and state in END_STATES


def _problems(plan: Plan) -> list[str]:
    """What is wrong with ``plan``'s end; empty if it ended done with the model's value."""
    runner = plan.runner()
    record = Torture.find(plan.name)
    problems: list[str] = []
    if not plan.ended:
        problems.append(f"did not end in {DEADLINE_SECONDS} s (phase {plan.phase}, state "
                        f"{record.state if record else None}, progress {runner.update_progress()})")
    elif record is None or record.state != "done":
        problems.append(f"ended {record.state if record else None}: "
                        f"{(record.traceback if record else '')[-600:]}")
    else:
        try:
            got = runner.get_return_value()
        except packmule.PackmuleError as err:
            got = err
        if got != plan.expected:
            problems.append(f"get_return_value() = {got!r}")
        failed = runner.update_progress().failed
        if failed != model_failed(plan.spec):
            problems.append(f"ended done with {failed} failed jobs, not {model_failed(plan.spec)}")
    if plan.blocking:
        problems += _caller_problems(plan)
    return problems


def _caller_problems(plan: Plan) -> list[str]:
    """A blocking run() returns the model's value; a kicked one raised RunFailed first."""
    if plan.thread is not None and plan.thread.is_alive():
        return ["run() still blocks"]
    error = plan.outcome.get("error")
    if plan.kick:
        if not isinstance(error, packmule.RunFailed):
            return [f"run() did not raise RunFailed before the kick: {plan.outcome!r}"]
        return []
    if error is not None:
        return [f"run() raised {type(error).__name__}: {error}"]
    if plan.outcome.get("value") != plan.expected:
        return [f"run() returned {plan.outcome.get('value')!r}"]
    return []


def _cancel_leftovers(plans: list[Plan]) -> None:
    """Cancel the runs that did not end, so no blocked run() outlives the test."""
    for plan in plans:
        if not plan.ended:
            with contextlib.suppress(packmule.PackmuleError):  # UnknownRun: it never started
                plan.runner().cancel()
    for plan in plans:
        if plan.thread is not None:
            plan.thread.join(timeout=10)


def _aggregate_calls(folder: Path, deaths: int) -> list[str]:
    """Aggregate methods called more often than the worker deaths can explain."""
    path = folder / "calls"
    calls = Counter(path.read_text().splitlines() if path.exists() else [])
    return [f"aggregate {line!r} called {count} times with {deaths} worker deaths"
            for line, count in calls.items() if count > 1 + deaths]


def _report(seed: int, plans: list[Plan], failures: dict[str, list[str]], extra: list[str]) -> str:
    lines = [f"torture seed {seed} (rerun: PACKMULE_TORTURE_SEED={seed}): "
             f"{len(failures)} of {len(plans)} runs wrong", *extra]
    for plan in plans:
        if plan.name in failures:
            lines += [f"- run {plan.name}: expected {plan.expected!r}",
                      *(f"    {problem}" for problem in failures[plan.name]),
                      *(f"    note: {note}" for note in plan.notes),
                      f"    spec: {json.dumps(plan.spec)}"]
    return "\n".join(lines)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("seed", _seeds(), ids=lambda seed: f"seed{seed}")
def test_torture_mixed_runs_under_kills_end_with_the_models_values(
        env: dict[str, str], workers: Workers, tmp_path: Path, seed: int) -> None:
    print(f"torture seed {seed}")
    rng = random.Random(seed)
    plans = make_plans(rng, tmp_path, env["PACKMULE_TUBE"])
    env["PACKMULE_TORTURE_WORKER"] = "1"
    extra = [arg for plan in plans if plan.kick for arg in ("--tube", plan.spec["tube"])]
    chaos = Chaos(workers, random.Random(rng.randrange(1 << 30)), extra)
    for plan in plans:
        _start(plan)
    chaos.thread.start()
    try:
        _watch(plans, env)
    finally:
        chaos.stop.set()
        chaos.thread.join(timeout=20)
    deaths, exits = chaos.deaths()
    summary = (f"{chaos.kills} kills, {deaths} SIGKILL deaths; runs ended after "
               + ", ".join(f"{p.name} {p.ended_after:.1f} s" for p in plans if p.ended))
    print(summary)
    extra_problems = _aggregate_calls(tmp_path, deaths)
    if exits:
        extra_problems.append(f"{len(exits)} workers exited by themselves, with codes {set(exits)}"
                              f"{' (no more restarted)' if chaos.crashes > MAX_CRASH_RESTARTS else ''}")
    failures = {plan.name: problems for plan in plans if (problems := _problems(plan))}
    _cancel_leftovers(plans)
    assert not failures and not extra_problems, _report(seed, plans, failures,
                                                        [*extra_problems, summary])
