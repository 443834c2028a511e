"""Settings: every field from its PACKMULE_* variable, documented, and server URLs read strictly."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

import packmule
from packmule import config
from packmule.config import Secret, Settings


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No PACKMULE_* variable but the test's own; settings read afresh."""
    for variable in list(os.environ):
        if variable.startswith("PACKMULE_"):
            monkeypatch.delenv(variable)
    config.reset()
    yield monkeypatch
    config.reset()


def _other_value(name: str, default: Any) -> tuple[str, Any]:
    """A text for a variable and the value it must give, unlike ``default``."""
    if isinstance(default, tuple) and isinstance(default[0], tuple):  # server addresses
        return "10.1.2.3:1234,10.1.2.4", (("10.1.2.3", 1234), ("10.1.2.4", default[0][1]))
    if isinstance(default, tuple):
        return "0.3,3", (0.3, 3.0)
    if isinstance(default, Secret) and name != "secret":  # one password or token, commas and all
        return "pass,word", Secret(("pass,word",))
    if isinstance(default, Secret):  # comma-separated secrets, in order
        return "a-secret-of-24-chars-1,a-secret-of-24-chars-2", Secret(
            ("a-secret-of-24-chars-1", "a-secret-of-24-chars-2"))
    if isinstance(default, bool):
        return ("false", False) if default else ("true", True)
    if isinstance(default, str):
        return "other", "other"
    if isinstance(default, int):
        return str(default + 1), default + 1
    return str(default + 0.5), default + 0.5


# Settings that exclude each other are read in separate environments.
_APART = ({"secret_file"}, {"secret"})


@pytest.mark.parametrize("left_out", _APART, ids=["with secret", "with secret_file"])
def test_every_setting_is_read_from_its_variable(clean_environment: pytest.MonkeyPatch,
                                                 left_out: set[str], tmp_path: Path) -> None:
    secrets = tmp_path / "other"
    secrets.write_text("a-secret-from-a-file-of-32-chars\n")
    clean_environment.chdir(tmp_path)  # "other", the secret file's name, is found here
    expected = {}
    for setting in fields(Settings):
        if setting.name in left_out:
            continue
        text, value = _other_value(setting.name, setting.default)
        clean_environment.setenv(f"PACKMULE_{setting.name.upper()}", text)
        expected[setting.name] = value
    config.reset()
    current = config.settings()
    assert {name: getattr(current, name) for name in expected} == expected


def test_every_setting_is_in_the_readme_table() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [f.name for f in fields(Settings) if f"| `PACKMULE_{f.name.upper()}`" not in readme]
    assert not missing, f"README's settings table lacks {missing}"


@pytest.mark.parametrize("url", [
    "beanstalk//127.0.0.1:11300",  # the colon forgotten: not a host called "beanstalk"
    "beanstalk:/127.0.0.1:11300",
    "beanstalk://127.0.0.1:11300/tube",
    "beanstalk://127.0.0.1:11300?timeout=1",
    "beanstalk://user@127.0.0.1:11300",
    "127.0.0.1:113OO",
    "memcached://127.0.0.1:11211",  # another server's scheme
])
def test_a_server_url_with_a_typo_is_refused(clean_environment: pytest.MonkeyPatch,
                                              url: str) -> None:
    clean_environment.setenv("PACKMULE_BEANSTALKD", url)
    with pytest.raises(packmule.ConfigurationError, match="PACKMULE_BEANSTALKD") as caught:
        config.settings()
    assert url in str(caught.value)
    with pytest.raises(packmule.ConfigurationError, match="PACKMULE_BEANSTALKD"):
        packmule.configure(beanstalkd=url)


def test_good_server_urls_still_read(clean_environment: pytest.MonkeyPatch) -> None:
    clean_environment.setenv("PACKMULE_BEANSTALKD",
                             "beanstalk://a:1, beanstalkd://b/ ,tcp://c:3,d:4,e")
    assert config.settings().beanstalkd == (("a", 1), ("b", 11300), ("c", 3), ("d", 4),
                                            ("e", 11300))


@pytest.mark.parametrize("value", ["0", "257", "-1"])
def test_a_batch_size_out_of_range_is_refused(clean_environment: pytest.MonkeyPatch,
                                              value: str) -> None:
    clean_environment.setenv("PACKMULE_BATCH_JOBS", value)
    with pytest.raises(packmule.ConfigurationError, match=f"batch_jobs: {value} is not between"):
        config.settings()


@pytest.mark.parametrize("concurrency", ["1", "2"])
def test_a_worker_with_a_bad_setting_says_which_and_exits(clean_environment: pytest.MonkeyPatch,
                                                          concurrency: str) -> None:
    """A worker started with a setting out of range names it in one line, no traceback
    (and a supervisor starts no child to fail the same way)."""
    clean_environment.setenv("PACKMULE_BATCH_JOBS", "0")
    result = subprocess.run([sys.executable, "-m", "packmule", "worker", "--import", "runners",
                             "--concurrency", concurrency], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env=dict(os.environ))
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == "Error: batch_jobs: 0 is not between 1 and 256"
