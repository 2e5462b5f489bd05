"""The benchmark's certificate: ECDSA P-256 for localhost, shared by SUTs and sink."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from pathlib import Path

from bench.systems import PY


def make_cert(out: Path) -> tuple[Path, Path]:
    """ECDSA P-256 via ``tls-relay gen-cert`` (the relay's own), else cryptography."""
    out.mkdir(parents=True, exist_ok=True)
    exe = Path(PY).parent / "tls-relay"
    if exe.exists():
        r = subprocess.run(
            [str(exe), "gen-cert", "--hostname", "localhost", "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if r.returncode == 0 and (out / "cert.pem").exists():
            return out / "cert.pem", out / "key.pem"
    return self_signed(out)


def self_signed(out: Path) -> tuple[Path, Path]:
    """ECDSA P-256 self-signed pair for localhost, written to *out*."""
    out.mkdir(parents=True, exist_ok=True)
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
        .sign(key, hashes.SHA256())
    )
    (out / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(out / "key.pem", 0o600)
    return out / "cert.pem", out / "key.pem"
