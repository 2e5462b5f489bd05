"""The benchmark's certificate: ECDSA P-256 for localhost, shared by SUTs and sink."""

from __future__ import annotations

from pathlib import Path

from relay.certs import gen_cert


def make_cert(out: Path) -> tuple[Path, Path]:
    """``out/cert.pem`` and ``out/key.pem``, made as ``tls-relay gen-cert`` makes them."""
    return gen_cert("localhost", out)
