"""The dashboard, as a user meets it: ``packmule web`` in its own process, real servers and workers.

The pages are driven in headless Chromium (Debian's ``chromium`` and
``chromium-driver``) through selenium; a screenshot of each page is kept
in the test's temporary folder. The guards (host, token, same-origin
POSTs) and ``/metrics`` are checked over plain HTTP.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import ROOT, Workers, wait_until
from fault_runners import Counted, Flaky
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from packmule.backends import backends

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


@contextmanager
def dashboard(env: dict[str, str], *args: str) -> Iterator[str]:
    """``packmule web`` on a free loopback port, through the real command; yields its base URL."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "packmule", "web", "--port", str(port), *args],
                            env={**os.environ, **env}, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _status(f"{base}/static/packmule.js") == 200 or proc.poll() is not None,
                   timeout=30, what="the dashboard to answer")
        assert proc.poll() is None, "the dashboard exited"
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    """Headless Chromium from Debian, with a fresh profile; never one downloaded by selenium."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.exists():
            raise RuntimeError(f"{path} is missing: install the Debian package {package} "
                               "(make test does)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                     "--window-size=1280,1000", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(argument)
    service = Service(executable_path=str(CHROMEDRIVER),
                      log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _text(driver: WebDriver, selector: str) -> str:
    """The text shown in ``selector``, read in one step (the live parts are replaced each second)."""
    text = driver.execute_script(
        "const found = document.querySelector(arguments[0]); return found ? found.innerText : ''",
        selector)
    return str(text).strip()


def _click(driver: WebDriver, element_id: str) -> None:
    """Click a button, again if the live update replaced it between finding and clicking."""
    def clicked() -> bool:
        try:
            driver.find_element(By.ID, element_id).click()
            return True
        except StaleElementReferenceException:
            return False

    wait_until(clicked, timeout=10, what=f"a click on #{element_id}")


@pytest.mark.timeout(180)
def test_a_user_watches_a_run_finish_then_kicks_a_failed_run_to_completion(
        env: dict[str, str], workers: Workers, browser: WebDriver, tmp_path: Path) -> None:
    fix = tmp_path / "fixed"
    env["PACKMULE_TEST_FIX_FILE"] = str(fix)
    workers.start("fault_runners", 2)
    with dashboard(env) as base:
        # The runs page, open before the run starts: its row appears, advances, turns done.
        browser.get(f"{base}/")
        browser.execute_script("window.loadedOnce = true")
        run = Counted("live").run_async(40, 0.1).run
        row = f"tr[data-run='{run}']"
        seen: list[str] = []

        def progressed_to_done() -> bool:
            # Two reads of a row a live update may replace in between: done once both agree.
            progress, state = _text(browser, f"{row} .progress"), _text(browser, f"{row} .state")
            if progress and (not seen or seen[-1] != progress):
                seen.append(progress)
            return state == "done" and progress == "41 / 41"

        wait_until(progressed_to_done, timeout=90, what="the run's row to turn done")
        assert seen[-1] == "41 / 41" and len(seen) >= 3, seen  # several readings on the way
        assert int(seen[0].split(" / ")[0]) < 41
        assert browser.execute_script("return window.loadedOnce") is True  # never reloaded
        assert _text(browser, f"{row} td:nth-child(2)") == "fault_runners:Counted"
        browser.save_screenshot(str(tmp_path / "runs.png"))

        # A failed run: its traceback on its page; after the fix, a click on kick resumes it.
        failed = Flaky("broken").run_async(5, 2).run
        wait_until(lambda: Flaky("broken").update_progress().state == "failed", timeout=30,
                   what="the run to fail")
        browser.get(f"{base}/runs/{failed}")
        assert _text(browser, "#state") == "failed"
        assert "ValueError: job 2 is broken" in _text(browser, "#failure")
        assert "ValueError: job 2 is broken" in _text(browser, "#failed-jobs")
        assert "maybe()" in _text(browser, "#failed-jobs")
        wait_until(lambda: "#" in _text(browser, "#tree"), timeout=20, what="the aggregate tree")
        assert "total() over 5 job(s): failed" in _text(browser, "#tree")
        browser.save_screenshot(str(tmp_path / "run-failed.png"))
        fix.touch()
        _click(browser, "kick")
        wait_until(lambda: _text(browser, "#said") == "kicked 1 buried job(s)", timeout=20,
                   what="the kick to be confirmed")
        wait_until(lambda: _text(browser, "#state") == "done", timeout=60,
                   what="the kicked run to complete on the page")
        assert _text(browser, "#value") == "10"
        assert _text(browser, "#progress") == "6 / 6"
        wait_until(lambda: "total() over 5 job(s): done" in _text(browser, "#tree"), timeout=20,
                   what="the aggregate to read done")
        browser.save_screenshot(str(tmp_path / "run-done.png"))

        browser.get(f"{base}/tubes")
        tube = env["PACKMULE_TUBE"]
        wait_until(lambda: _text(browser, f"tr[data-tube='{tube}']"), timeout=10,
                   what="the tube's row")
        browser.save_screenshot(str(tmp_path / "tubes.png"))
        browser.get(f"{base}/workers")
        pids = sorted(str(proc.pid) for proc in workers.procs)
        wait_until(lambda: sorted(_text(browser, f"#workers tbody tr:nth-child({n}) td:nth-child(3)")
                                  for n in (1, 2)) == pids, timeout=30, what="both workers listed")
        browser.save_screenshot(str(tmp_path / "workers.png"))
    assert all((tmp_path / f"{page}.png").stat().st_size > 1000
               for page in ("runs", "run-failed", "run-done", "tubes", "workers"))


def _request(base: str, method: str, path: str, *, body: str = "",
             headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    host = base.removeprefix("http://")
    connection = http.client.HTTPConnection(host, timeout=10)
    connection.request(method, path, body=body.encode(), headers={
        "Content-Type": "application/x-www-form-urlencoded", **(headers or {})})
    return connection.getresponse()


def _csrf(base: str, path: str, headers: dict[str, str] | None = None) -> str:
    page = _request(base, "GET", path, headers=headers).read().decode()
    marker = 'name="csrf" value="'
    return page[page.index(marker) + len(marker):].split('"', 1)[0]


def test_actions_are_refused_across_sites_and_to_foreign_host_names(
        env: dict[str, str], workers: Workers, tmp_path: Path) -> None:
    env["PACKMULE_TEST_FIX_FILE"] = str(tmp_path / "fixed")
    workers.start("fault_runners", 1)
    run = Flaky("guarded").run_async(5, 2).run
    wait_until(lambda: Flaky("guarded").update_progress().state == "failed", timeout=30,
               what="the run to fail")
    with dashboard(env) as base:
        token = _csrf(base, f"/runs/{run}")
        kick = f"/runs/{run}/kick"
        assert _request(base, "POST", kick, body="csrf=wrong").status == 403
        assert _request(base, "POST", kick, body=f"csrf={token}",
                        headers={"Origin": "http://evil.example"}).status == 403
        assert _request(base, "POST", kick, body=f"csrf={token}",
                        headers={"Sec-Fetch-Site": "cross-site"}).status == 403
        # DNS rebinding: a foreign name resolving to loopback is not served at all.
        assert _request(base, "GET", "/", headers={"Host": "evil.example"}).status == 400
        assert Flaky("guarded").update_progress().state == "failed"  # nothing was kicked
        done = _request(base, "POST", kick, body=f"csrf={token}",
                        headers={"Origin": base, "Sec-Fetch-Site": "same-origin"})
        assert (done.status, done.getheader("Location")) == (303, f"/runs/{run}?said=kicked&n=1")
        page = _request(base, "GET", "/")
        assert page.getheader("X-Frame-Options") == "DENY"
        assert "frame-ancestors 'none'" in (page.getheader("Content-Security-Policy") or "")


def test_a_token_is_needed_when_set_and_beyond_loopback(env: dict[str, str]) -> None:
    refused = subprocess.run([sys.executable, "-m", "packmule", "web", "--host", "0.0.0.0"],
                             env={**os.environ, **env, "PACKMULE_WEB_TOKEN": ""}, cwd=ROOT,
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode == 1
    assert "needs a token: set PACKMULE_WEB_TOKEN" in refused.stderr

    secret = "s3cret-token-for-the-test"
    with dashboard({**env, "PACKMULE_WEB_TOKEN": secret}) as base:
        first = _request(base, "GET", "/")
        assert (first.status, first.getheader("Location")) == (303, "/login")
        assert _request(base, "GET", "/metrics").status == 401
        assert _request(base, "GET", "/metrics",
                        headers={"Authorization": f"Bearer {secret}"}).status == 200
        csrf = _csrf(base, "/login")
        wrong = _request(base, "POST", "/login", body=f"csrf={csrf}&token=guess")
        assert wrong.status == 401
        signed = _request(base, "POST", "/login", body=f"csrf={csrf}&token={secret}")
        cookie = (signed.getheader("Set-Cookie") or "").split(";")[0]
        assert signed.status == 303 and cookie.startswith("packmule_session=")
        assert secret not in cookie
        assert _request(base, "GET", "/", headers={"Cookie": cookie}).status == 200


def test_metrics_give_queue_depths_per_tube_and_runs_by_state(
        env: dict[str, str], workers: Workers, tmp_path: Path) -> None:
    env["PACKMULE_TEST_FIX_FILE"] = str(tmp_path / "fixed")
    workers.start("fault_runners", 1)
    assert Counted("scraped").run(3) == 3
    Flaky("scraped").run_async(5, 2)
    wait_until(lambda: Flaky("scraped").update_progress().state == "failed", timeout=30,
               what="the run to fail")
    wait_until(lambda: backends().queue.tube_stats(0, env["PACKMULE_TUBE"]).get(
        "current-jobs-buried") == 1, timeout=10, what="its job to be buried")
    with dashboard(env) as base, urllib.request.urlopen(f"{base}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    tube, server = env["PACKMULE_TUBE"], env["PACKMULE_BEANSTALKD"].removeprefix("beanstalk://")
    assert f'packmule_queue_jobs{{server="{server}",state="buried",tube="{tube}"}} 1.0' in text
    assert f'packmule_queue_jobs{{server="{server}",state="delayed",tube="{tube}"}} 1.0' in text
    assert 'packmule_runs{state="done"} 1.0' in text
    assert 'packmule_runs{state="failed"} 1.0' in text
    assert 'packmule_runs{state="running"} 0.0' in text
