"""Golden bad-config cases: each tests/config/bad_configs/<case>/ holds a relay.yaml (plus any
policy or users file it names) and expected.txt, the exact error lines, with ``{dir}``
standing for the case directory.  Cases reference ``../_shared/*.pem``; that directory is
generated here at run time (no private keys in the repository, nothing that expires).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay import config
from relay.errors import ConfigError

CASES_DIR = Path(__file__).parent / "bad_configs"
CASES = sorted(p.name for p in CASES_DIR.iterdir() if (p / "relay.yaml").is_file())
TLS_RELAY = Path(sys.executable).parent / "tls-relay"
# A few cases also go through the real command line, as an operator would run it.
CLI_CASES = ["listener-tls-none", "policy-level-may", "cert-key-mismatch", "many-problems"]


def _write_pair(out: Path, stem: str, not_after: dt.datetime) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.test")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_after - dt.timedelta(days=30))
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    (out / f"{stem}cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (out / f"{stem}key.pem").write_bytes(key_pem)


def make_shared(root: Path) -> None:
    """root/_shared: cert.pem+key.pem (valid), other-key.pem, expired-{cert,key}.pem."""
    shared = root / "_shared"
    shared.mkdir()
    now = dt.datetime.now(dt.UTC)
    _write_pair(shared, "", now + dt.timedelta(days=30))
    _write_pair(shared, "expired-", dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
    _write_pair(shared, "other-", now + dt.timedelta(days=30))


@pytest.fixture(scope="module")
def cases_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad_configs")
    make_shared(root)
    for name in CASES:
        shutil.copytree(CASES_DIR / name, root / name)
    return root


def expected_lines(case_dir: Path) -> list[str]:
    text = (CASES_DIR / case_dir.name / "expected.txt").read_text(encoding="utf-8")
    return [line.replace("{dir}", str(case_dir)) for line in text.splitlines() if line]


def test_cases_exist() -> None:
    assert len(CASES) >= 30
    missing = [name for name in CASES if not (CASES_DIR / name / "expected.txt").is_file()]
    assert missing == []


@pytest.mark.parametrize("case", CASES)
def test_load_reports_every_problem(cases_root: Path, case: str) -> None:
    case_dir = cases_root / case
    with pytest.raises(ConfigError) as info:
        config.load(case_dir / "relay.yaml")
    assert info.value.problems == expected_lines(case_dir)


@pytest.mark.parametrize("case", CLI_CASES)
def test_check_config_exits_1_with_the_same_lines(cases_root: Path, case: str) -> None:
    case_dir = cases_root / case
    proc = subprocess.run(
        [str(TLS_RELAY), "check-config", "-c", str(case_dir / "relay.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TLS_RELAY_CONFIG": ""},
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == expected_lines(case_dir)
