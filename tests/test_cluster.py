"""Scale-out: a 3-member etcd cluster and pools of 2 beanstalkd and 2 memcached, under faults.

One set of servers for the module (``start_local_servers(beanstalkd=2,
memcached=2, etcd=3)``); each test kills servers by pid and starts them
again on the same ports before it ends. Workers are real processes.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import Workers, in_thread, isolated_settings, wait_until
from fibonacci_runner import FibonacciRunner
from runners import Adder, Slow
from runs_runners import Echo

import packmule
from packmule.backends import backends
from packmule.servers import LocalServers, start_local_servers
from packmule.store import RunKeys

# Short enough that an unreachable server is reported within seconds, by workers and callers.
TIMEOUT_SECONDS = 3


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalServers]:
    with start_local_servers(beanstalkd=2, memcached=2, etcd=3) as started:
        yield started


@pytest.fixture
def cluster_env(cluster: LocalServers) -> Iterator[dict[str, str]]:
    with isolated_settings(cluster) as variables:
        packmule.configure(socket_timeout_seconds=TIMEOUT_SECONDS)
        yield {**variables, "PACKMULE_SOCKET_TIMEOUT_SECONDS": str(TIMEOUT_SECONDS)}


@pytest.fixture
def pool_workers(cluster_env: dict[str, str]) -> Iterator[Workers]:
    pool = Workers(cluster_env)
    yield pool
    pool.stop()


def _address(url: str) -> str:
    return url.split("://", 1)[1]




# etcd: 3 members --------------------------------------------------------------------------
def _progress(runner: packmule.Runner) -> packmule.Progress:
    """The runner's progress, read again while etcd elects a leader or its client moves on.

    A read fails (CoordinatorUnavailable) while the members elect a leader,
    and once per member the client finds dead before it moves to another.
    """
    def read() -> packmule.Progress | None:
        try:
            return runner.update_progress()
        except packmule.CoordinatorUnavailable:
            return None

    value = wait_until(read, timeout=30, what="etcd to serve reads again")
    assert isinstance(value, packmule.Progress)
    return value


@pytest.mark.timeout(240)
def test_a_run_outlives_its_etcd_leader_and_resumes_after_a_lost_quorum(
        cluster: LocalServers, cluster_env: dict[str, str], pool_workers: Workers) -> None:
    pool_workers.start("fibonacci_runner", 2)
    runner = FibonacciRunner("cluster")
    runner.run_async(16)  # 3,193 jobs, 1,596 of them aggregates: one etcd marker each
    wait_until(lambda: runner.update_progress().completed >= 300, timeout=60, what="300 jobs")
    first = cluster.etcd_leader()
    cluster.kill_server("etcd", first)
    # Until the other two elect a leader (~1-2 s) a read may fail: the election is an outage.
    done = _progress(runner).completed
    wait_until(lambda: _progress(runner).completed >= done + 300, timeout=60,
               what="300 more jobs without the old leader")
    second = cluster.etcd_leader()
    progress = _progress(runner)
    assert progress.state == "running" and progress.completed < progress.total - 500, progress
    cluster.kill_server("etcd", second)  # one member of three left: no quorum
    try:
        with pytest.raises(packmule.CoordinatorUnavailable) as caught:
            runner.update_progress()
        assert all(_address(url) in str(caught.value) for url in cluster.etcd_urls)
    finally:
        cluster.start_server("etcd", first)  # quorum is back
    try:
        wait_until(lambda: _progress(runner).finished, timeout=120,
                   what="the run to end once quorum is back")
        assert runner.get_return_value() == 987
    finally:
        cluster.start_server("etcd", second)
    assert FibonacciRunner("after").run(6) == 8  # the whole cluster serves again


# beanstalkd: a pool of 2 ----------------------------------------------------------------------
def _memcached_items(index: int) -> int:
    stats = backends().store._call(index, "stats", lambda client: client.stats())
    return int(stats[b"curr_items"])


@pytest.mark.timeout(60)
def test_a_run_spreads_over_both_beanstalkd_and_both_memcached(
        cluster_env: dict[str, str], pool_workers: Workers) -> None:
    tube, queue = cluster_env["PACKMULE_TUBE"], backends().queue
    items = [_memcached_items(index) for index in (0, 1)]
    pool_workers.start("runners", 2)
    assert Adder("spread").run(200) == sum(range(200))
    assert all(queue.tube_stats(index, tube).get("total-jobs", 0) >= 90 for index in (0, 1))
    assert all(_memcached_items(index) >= items[index] + 50 for index in (0, 1))


@pytest.mark.timeout(120)
def test_one_beanstalkd_down_is_named_at_enqueue_and_workers_go_on_with_the_other(
        cluster: LocalServers, cluster_env: dict[str, str], pool_workers: Workers) -> None:
    pool_workers.start("runners", 2, "--import", "runs_runners")
    assert Adder("before").run(20) == sum(range(20))  # each worker has used both servers
    down = _address(cluster.beanstalkd_urls[1])
    cluster.kill_server("beanstalkd", 1)
    try:
        with pytest.raises(packmule.QueueUnavailable) as caught:
            Adder("during").run(10)  # job 1 goes to server 1
        assert caught.value.address == down and down in str(caught.value)
        for value in range(4):  # a run_async root is job 0: server 0
            ref = Echo(f"alone-{value}").run_async(value)
            wait_until(lambda r=ref: (Echo.find_run(r.run) or packmule.RunRecord("", 0, "")).state
                       == "done", timeout=30, what="a run on the live server")
            assert Echo(f"alone-{value}").get_return_value() == value
    finally:
        cluster.start_server("beanstalkd", 1)
    assert Adder("after").run(20) == sum(range(20))


# memcached: a pool of 2 -----------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_a_memcached_server_down_then_back_empty_gives_result_missing_never_a_rehash(
        cluster: LocalServers, cluster_env: dict[str, str], pool_workers: Workers) -> None:
    pool_workers.start("runners", 2)
    runner = Slow("forgotten")
    thread, outcome = in_thread(lambda: runner.run(200, 0.02))
    wait_until(lambda: Slow("forgotten").update_progress().completed >= 20, timeout=30,
               what="20 jobs")
    down = _address(cluster.memcached_urls[1])
    cluster.kill_server("memcached", 1)
    try:
        with pytest.raises(packmule.StoreUnavailable) as caught:
            Slow("forgotten").update_progress()
        assert caught.value.address == down
    finally:
        cluster.start_server("memcached", 1)  # back, and empty
    thread.join(timeout=60)
    assert not thread.is_alive(), "the blocked caller still waits 60 s after memcached came back"
    error = outcome.get("error")
    assert isinstance(error, packmule.ResultMissing), repr(outcome)
    # Named: the jobs whose values were on the lost server, or the job whose completion
    # found its batch's counter gone with it (whichever noticed first).
    assert error.jobs and all(1 <= ref.number <= 201 for ref in error.jobs), error
    store, keys = backends().store, RunKeys(backends().settings.namespace, error.jobs[0].run)
    moved = [keys.job(n) for n in range(1, 202) if store.server_of(keys.job(n)) == 1]
    assert store.get_at(0, moved) == {}, "values of the lost server were written to the other"
    assert Slow("forgotten").update_progress().state == "lost"
