"""relay.internals: the borrowed private names, checked at start-up."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from relay import internals
from relay.errors import RelayError
from tests.fixtures.relay_proc import BIN, RelayFactory

ROOT = Path(__file__).resolve().parent.parent


def test_installed_libraries_have_everything_borrowed() -> None:
    assert internals.problems() == []
    internals.require()


def test_a_missing_name_is_named_with_library_version_and_range(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Thing:
        def __init__(self) -> None:
            self.present = 1

    items = (
        internals.Borrowed(Thing, "absent", False, "a method the relay calls"),
        internals.Borrowed(Thing, "present", True, "set in __init__"),
        internals.Borrowed(Thing, "_gone", True, "an attribute the relay reads"),
    )
    monkeypatch.setitem(internals.BORROWED, "aiosmtplib", items)
    found = internals.problems()
    assert len(found) == 2
    assert found[0].startswith("aiosmtplib 5.")
    assert "Thing.absent" in found[0] and "(a method the relay calls)" in found[0]
    assert "install aiosmtplib>=5.1.3,<5.2" in found[0]
    assert "Thing._gone" in found[1]
    with pytest.raises(RelayError, match=r"Thing\.absent"):
        internals.require()


def test_tested_ranges_are_the_pins_in_pyproject() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {d.split(">=")[0].strip(): d.split(";")[0].strip() for d in deps}
    for dist, spec in internals.TESTED.items():
        if dist == "python":
            continue
        assert pins[dist].replace(" ", "") == f"{dist}{spec}", dist


SITECUSTOMIZE = """\
import aiosmtpd.smtp
del aiosmtpd.smtp.SMTP._set_rset_state  # as if a new aiosmtpd had renamed it
"""


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_serve_and_check_config_refuse_a_library_without_a_borrowed_name(
    command: str, relay: RelayFactory, tmp_path: Path
) -> None:
    """End to end: the real commands stop at once with the sentence, exit 1."""
    proc = relay(start=False)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path])}
    done = subprocess.run(
        [str(BIN), command, "-c", str(proc.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "aiosmtpd 1.4.6 lacks SMTP._set_rset_state" in done.stderr
    assert "install aiosmtpd>=1.4.6,<1.5" in done.stderr
    assert "Traceback" not in done.stderr
