"""deploy/: the systemd unit as systemd itself judges it - `systemd-analyze verify` and
`systemd-analyze security --offline=yes` with a ceiling on the exposure score (Debian's
systemd package)."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "systemd" / "tls-relay.service"
BIN = ROOT / ".venv" / "bin" / "tls-relay"
MAX_EXPOSURE = 20  # systemd-analyze's scale x10: 2.0, "OK"


@pytest.fixture
def unit(tmp_path: Path) -> Path:
    """The unit with its ExecStart pointing at this checkout's tls-relay (verify wants
    the command to exist)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("needs Debian's systemd (systemd-analyze)")
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace("/usr/local/bin/tls-relay", str(BIN)))
    return copy


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_systemd_verifies_the_unit(unit: Path) -> None:
    out = analyze("verify", str(unit))
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr


def test_exposure_stays_low(unit: Path) -> None:
    out = analyze("security", "--offline=yes", f"--threshold={MAX_EXPOSURE}", str(unit))
    assert out.returncode == 0, out.stdout[-2000:]


def test_the_unit_says_what_an_operator_expects() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    service = parser["Service"]
    assert service["User"] == "tls-relay" and service["Type"] == "simple"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["ExecStart"].endswith("tls-relay serve")
    assert service["ProtectSystem"] == "strict" and service["NoNewPrivileges"] == "yes"
    assert service["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
