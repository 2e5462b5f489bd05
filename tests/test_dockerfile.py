"""The Dockerfile cannot be built here (no engine), but it must pass hadolint."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_dockerfile_passes_hadolint() -> None:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([exe, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_with_spool_volume() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "USER 10025" in text
    assert 'VOLUME ["/var/spool/tls-relay"]' in text
    assert 'ENTRYPOINT ["tls-relay"]' in text
