"""Signed jobs against real servers and real workers (README "Security").

A forged job (a packmule envelope naming an allowed runner and a public
method) runs on a worker without a secret and is buried, unrun, by one with
a secret; rotation, tampering and the mixed cases (a signing producer with
a worker that has no secret, and the reverse) behave as the README says.
Each execution writes a line to a file, so a test sees exactly what ran.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import greenstalk
import pytest
from conftest import ROOT, Workers, wait_until
from trust_runners import Marked, Nested

import packmule
from packmule import config, signing
from packmule.backends import backends
from packmule.envelope import BodyTemplate, Envelope, encode_args
from packmule.errors import ConfigurationError, RunFailed
from packmule.store import refused_jobs_key

OLD = "old-secret-0123456789abcdef"
NEW = "new-secret-fedcba9876543210"


def start_worker(workers: Workers, log: Path, **variables: str) -> subprocess.Popen[bytes]:
    """A worker through the real CLI with extra ``PACKMULE_*`` variables; its log in ``log``."""
    env = {**os.environ, **workers.env, **variables}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "packmule", "--log-level", "INFO", "worker",
             "--import", "trust_runners", "--tube", workers.env["PACKMULE_TUBE"]],
            env=env, cwd=ROOT, stderr=out)
    workers.procs.append(proc)
    return proc


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def forged(path: Path, number: int, *, run: str = "f0rged0000000000") -> bytes:
    """A job anyone reaching beanstalkd could put: the right envelope, an allowed call."""
    envelope = Envelope("trust_runners:Marked", "forged", run, 1, "x", "mark")
    return BodyTemplate(envelope).body(1, encode_args("mark", [str(path), number]))


def put(env: dict[str, str], body: bytes, *, priority: int = 65536) -> None:
    address = backends().settings.beanstalkd[0]
    with greenstalk.Client(address, encoding=None, use=env["PACKMULE_TUBE"]) as client:
        client.put(body, priority=priority, ttr=5)


def buried(env: dict[str, str]) -> int:
    return int(backends().queue.tube_stats(0, env["PACKMULE_TUBE"]).get("current-jobs-buried", 0))


def refused_count() -> int:
    raw = backends().store.get(refused_jobs_key(backends().settings.namespace))
    return int(raw or 0)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.timeout(60)
def test_a_forged_job_runs_on_a_worker_without_a_secret(
        env: dict[str, str], workers: Workers, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    start_worker(workers, tmp_path / "worker.log")
    put(env, forged(marks, 99))
    wait_until(lambda: lines(marks) == ["mark 99"], timeout=20, what="the forged job to run")
    log = (tmp_path / "worker.log").read_text()
    assert "jobs are not signed" in log, "a worker without a secret says so at start"


@pytest.mark.timeout(60)
def test_a_forged_job_is_buried_unrun_by_a_worker_with_a_secret(
        env: dict[str, str], workers: Workers, tmp_path: Path) -> None:
    marks, log = tmp_path / "marks", tmp_path / "worker.log"
    proc = start_worker(workers, log, PACKMULE_SECRET=NEW)
    put(env, forged(marks, 99))
    wait_until(lambda: buried(env) == 1, timeout=20, what="the forged job to be buried")
    assert not marks.exists(), "a forged job ran on a worker with a secret"
    assert refused_count() == 1, "the refusal is counted"
    text = log.read_text()
    assert "refused: signature missing" in text
    assert NEW not in text, "the secret appears in the worker's log"
    packmule.configure(secret=NEW)
    assert Marked("after").run(str(tmp_path / "after")) == 3, "the worker goes on"
    assert proc.poll() is None


@pytest.mark.timeout(90)
def test_the_old_secret_is_accepted_during_rotation_and_refused_after(
        env: dict[str, str], workers: Workers, tmp_path: Path) -> None:
    packmule.configure(secret=OLD)  # this producer has not been given the new secret yet
    rotating = start_worker(workers, tmp_path / "rotating.log", PACKMULE_SECRET=f"{NEW},{OLD}")
    assert Marked("during").run(str(tmp_path / "during")) == 3
    assert Nested("during").run(3) == 8, "the worker's own jobs, signed with NEW, run too"
    stop_worker(rotating)
    start_worker(workers, tmp_path / "after.log", PACKMULE_SECRET=NEW)
    with pytest.raises(RunFailed, match="signature unknown key") as failed:
        Marked("after").run(str(tmp_path / "after"))
    assert signing.key_id(OLD.encode()).decode() in str(failed.value)
    assert not (tmp_path / "after").exists(), "a job signed with a retired secret ran"
    record = Marked.find_run(failed.value.run)
    assert record is not None and record.state == "failed"


@pytest.mark.timeout(60)
def test_a_tampered_or_unsigned_copy_of_a_real_job_is_refused_and_its_run_goes_on(
        env: dict[str, str], workers: Workers, tmp_path: Path) -> None:
    """Copies of a real run's job: the run neither runs them nor fails because of them."""
    marks, log = tmp_path / "marks", tmp_path / "worker.log"
    packmule.configure(secret=NEW)
    ref = Marked("real").run_async(str(marks), 2)
    address = backends().settings.beanstalkd[0]
    with greenstalk.Client(address, encoding=None, use=env["PACKMULE_TUBE"]) as client:
        body = client.peek_ready().body
    assert body.startswith(b"pm1:") and b'",2]' in body
    put(env, body.replace(b'",2]', b'",5]'), priority=0)  # the MAC no longer matches
    put(env, signing.unsigned(body).replace(b'",2]', b'",5]'), priority=0)  # no signature
    start_worker(workers, log, PACKMULE_SECRET=NEW)
    wait_until(lambda: Marked.find_run(ref.run).state != "running",  # type: ignore[union-attr]
               timeout=30, what="the run to end")
    assert Marked("real").get_return_value() == 1
    assert sorted(lines(marks)) == ["mark 0", "mark 1"], "a tampered copy ran"
    assert buried(env) == 2
    text = log.read_text()
    assert "refused: signature invalid" in text and "refused: signature missing" in text


@pytest.mark.timeout(60)
def test_a_signing_producer_with_a_worker_without_a_secret_runs(
        env: dict[str, str], workers: Workers, tmp_path: Path) -> None:
    """The first step of turning signing on: producers sign, workers do not check yet."""
    packmule.configure(secret=NEW)
    start_worker(workers, tmp_path / "worker.log")
    assert Marked("mixed").run(str(tmp_path / "marks")) == 3
    assert Nested("mixed").run(2) == 4


@pytest.mark.timeout(60)
def test_an_unsigned_producer_with_a_worker_with_a_secret_fails_its_run_saying_why(
        env: dict[str, str], workers: Workers, tmp_path: Path) -> None:
    """Every job of the run is refused alike, so the run ends failed (invariant 10)."""
    marks = tmp_path / "marks"
    start_worker(workers, tmp_path / "worker.log", PACKMULE_SECRET=NEW)
    with pytest.raises(RunFailed, match="signature missing"):
        Marked("unsigned").run(str(marks))
    assert not marks.exists()
    ref = Nested("unsigned").run_async(2)
    wait_until(lambda: Nested.find_run(ref.run).state == "failed",  # type: ignore[union-attr]
               timeout=30, what="the run_async run to fail")


@pytest.mark.timeout(60)
def test_accept_unsigned_runs_unsigned_jobs_but_never_a_wrong_signature(
        env: dict[str, str], workers: Workers, tmp_path: Path) -> None:
    """Rolling signing out: workers get the secret with accept_unsigned, then without it."""
    marks = tmp_path / "marks"
    start_worker(workers, tmp_path / "worker.log", PACKMULE_SECRET=NEW,
                 PACKMULE_ACCEPT_UNSIGNED="true")
    assert Marked("rolling").run(str(marks)) == 3
    wrong = signing.Signer([OLD]).sign(forged(marks, 99))
    put(env, wrong)
    wait_until(lambda: buried(env) == 1, timeout=20, what="the wrongly signed job to be buried")
    assert "mark 99" not in lines(marks)


def test_secrets_never_show_in_settings_or_errors(
        env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    packmule.configure(secret=[NEW, OLD], etcd_tls=True, etcd_user="packmule",
                       etcd_password="etcd-password-xyz")
    shown = repr(packmule.settings()) + str(packmule.settings()) + repr(backends())
    for secret in (NEW, OLD, "etcd-password-xyz"):
        assert secret not in shown
    assert "Secret(<2 hidden>)" in shown
    with pytest.raises(ConfigurationError) as short:
        packmule.configure(secret="too-short-1")
    assert "too-short-1" not in str(short.value) and "16" in str(short.value)
    monkeypatch.setenv("PACKMULE_SECRET", f"{NEW}, too-short-2")
    config.reset()
    with pytest.raises(ConfigurationError) as from_env:
        packmule.settings()
    assert "too-short-2" not in str(from_env.value) and NEW not in str(from_env.value)


def test_secrets_come_from_the_environment_or_a_file_and_the_first_signs(
        env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = forged(tmp_path / "marks", 1)
    monkeypatch.setenv("PACKMULE_SECRET", f"{NEW},{OLD}")
    config.reset()
    signer = signing.from_settings(packmule.settings())
    assert signer is not None and signer.key_id == signing.key_id(NEW.encode()).decode()
    assert signing.Signer([OLD, NEW]).verify(signer.sign(body)) == body, "any secret verifies"
    with pytest.raises(signing.SignatureError, match="unknown key"):
        signing.Signer([OLD]).verify(signing.Signer([NEW]).sign(body))
    secrets = tmp_path / "secrets"
    secrets.write_text(f"# rotated 2024-05-01\n{OLD}\n\n{NEW}\n")
    monkeypatch.delenv("PACKMULE_SECRET")
    monkeypatch.setenv("PACKMULE_SECRET_FILE", str(secrets))
    config.reset()
    assert config.signing_secrets(packmule.settings()) == (OLD, NEW)
    with pytest.raises(ConfigurationError, match="both set"):
        packmule.configure(secret=NEW)
    monkeypatch.setenv("PACKMULE_SECRET_FILE", str(tmp_path / "absent"))
    config.reset()
    with pytest.raises(ConfigurationError, match="secret_file: cannot read"):
        packmule.settings()


@pytest.mark.parametrize("secret", [NEW, "k" * 64, "long-" * 40, "non-ascii-é-secret-☃"])
def test_the_mac_is_hmac_sha256_of_the_exact_bytes(secret: str, tmp_path: Path) -> None:
    import hmac

    body = forged(tmp_path / "marks", 3)
    signed = signing.Signer([secret]).sign(body)
    mac = hmac.new(secret.encode(), body, "sha256").hexdigest().encode()
    assert signed == b"pm1:" + signing.key_id(secret.encode()) + b":" + mac + b":" + body
    assert signing.unsigned(signed) == body and signing.unsigned(body) == body
