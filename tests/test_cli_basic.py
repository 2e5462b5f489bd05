"""The command line as an operator runs it: check-config, gen-cert, passwd (subprocesses)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import yaml

from relay.intake import users

TLS_RELAY = str(Path(sys.executable).parent / "tls-relay")


def run(
    *args: str, stdin: str = "", env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "TLS_RELAY_CONFIG"}
    return subprocess.run(
        [TLS_RELAY, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
        cwd=cwd,
    )


def good_config(tmp_path: Path, cert: tuple[Path, Path]) -> Path:
    path = tmp_path / "relay.yaml"
    doc = {
        "hostname": "relay.test",
        "listeners": [{"address": "127.0.0.1:2525", "tls": "starttls"}],
        "tls": {"cert": str(cert[0]), "key": str(cert[1])},
        "clients": {"networks": ["127.0.0.0/8"], "users_file": "users.yaml"},
        "spool": {"path": "spool"},
    }
    path.write_text(yaml.safe_dump(doc))
    (tmp_path / "users.yaml").write_text("users: {}\n")
    return path


def test_check_config_prints_summary(tmp_path: Path, server_cert: tuple[Path, Path]) -> None:
    path = good_config(tmp_path, server_cert)
    proc = run("check-config", "-c", str(path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{path.resolve()}: OK\n")
    assert "hostname: relay.test" in proc.stdout
    assert "listeners: 127.0.0.1:2525 (starttls)" in proc.stdout


def test_tls_relay_config_env_is_honoured(tmp_path: Path, server_cert: tuple[Path, Path]) -> None:
    path = good_config(tmp_path, server_cert)
    proc = run("check-config", env={"TLS_RELAY_CONFIG": str(path)}, cwd=tmp_path.parent)
    assert proc.returncode == 0, proc.stderr
    assert "hostname: relay.test" in proc.stdout
    # -c wins over the environment
    proc = run(
        "check-config", "-c", str(tmp_path / "absent.yaml"), env={"TLS_RELAY_CONFIG": str(path)}
    )
    assert proc.returncode == 1
    assert "absent.yaml" in proc.stderr


def test_gen_cert_then_check_config(tmp_path: Path) -> None:
    proc = run("gen-cert", "--hostname", "relay.test", "--out", str(tmp_path / "certs"))
    assert proc.returncode == 0, proc.stderr
    cert, key = tmp_path / "certs" / "cert.pem", tmp_path / "certs" / "key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    proc = run("check-config", "-c", str(good_config(tmp_path, (cert, key))))
    assert proc.returncode == 0, proc.stderr


def test_passwd_reads_stdin_and_stores_only_a_hash(
    tmp_path: Path, server_cert: tuple[Path, Path]
) -> None:
    path = good_config(tmp_path, server_cert)
    (tmp_path / "users.yaml").unlink()  # passwd creates it
    proc = run("passwd", "alice", "-c", str(path), stdin="Tr0ub4dor&3\n")
    assert proc.returncode == 0, proc.stderr
    assert "Tr0ub4dor" not in proc.stdout + proc.stderr
    users_file = tmp_path / "users.yaml"
    text = users_file.read_text()
    assert "Tr0ub4dor" not in text
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o600
    assert users.UserDb.load(users_file).verify("alice", "Tr0ub4dor&3")
    # and the result is a valid config again
    assert run("check-config", "-c", str(path)).returncode == 0


def test_passwd_refuses_empty_password(tmp_path: Path, server_cert: tuple[Path, Path]) -> None:
    path = good_config(tmp_path, server_cert)
    proc = run("passwd", "alice", "-c", str(path), stdin="\n")
    assert proc.returncode == 1
    assert "empty password" in proc.stderr
    assert yaml.safe_load((tmp_path / "users.yaml").read_text()) == {"users": {}}


def test_passwd_without_users_file_in_config(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text("hostname: relay.test\n")
    proc = run("passwd", "alice", "-c", str(path), stdin="pw\n")
    assert proc.returncode == 1
    assert "clients.users_file: required key is missing" in proc.stderr


def test_policy_refuses_an_invalid_domain_and_shows_the_normal_form(
    tmp_path: Path, server_cert: tuple[Path, Path]
) -> None:
    path = good_config(tmp_path, server_cert)
    doc = yaml.safe_load(path.read_text())
    doc["delivery"] = {"routes": [{"domains": ["xn--bcher-kva.test"], "via": "[127.0.0.1]:2525"}]}
    path.write_text(yaml.safe_dump(doc))
    bad = run("policy", "xn--zz.test", "-c", str(path))
    assert bad.returncode == 1
    assert "'xn--zz.test' is not a valid domain name" in bad.stderr
    assert "Traceback" not in bad.stderr
    good = run("policy", "BÜCHER.test", "-c", str(path))  # routed: no DNS lookup
    assert good.returncode == 0, good.stderr
    assert "domain: xn--bcher-kva.test" in good.stdout
