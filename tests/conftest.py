"""Shared pytest fixtures.  Peer fixtures live in tests/fixtures/ and are registered
here once (pytest_plugins), so a test names them as arguments and imports only the
helper types it uses."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme
import uvloop

pytest_plugins = [
    "tests.fixtures.badpeers",  # peers: fault and attack MX peers, stopped after the test
    "tests.fixtures.dns",  # dns_server: authoritative DNS on loopback
    "tests.fixtures.dnssec",  # dnssec_lab: nsd + validating unbound over a signed zone
    "tests.fixtures.intake",  # intake: in-process listeners on the product's TLS context
    "tests.fixtures.postfix",  # postfix_mx: Debian's Postfix as the receiving MX
    "tests.fixtures.exim",  # exim_mx: Debian's Exim (`make exim`); after postfix, which it imports
    "tests.fixtures.relay_proc",  # relay: `tls-relay serve` as a subprocess
]


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    """A throwaway certificate authority for the whole test session."""
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    """The test CA's certificate as a PEM file (`delivery.ca_file` for MX peers)."""
    path = tmp_path / "mx-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def server_cert(ca: trustme.CA, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(cert.pem, key.pem) for 'localhost' signed by the test CA."""
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_path = tmp_path / "cert.pem"
    key_path = tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    for pem in cert.cert_chain_pems[1:]:
        with cert_path.open("ab") as fh:
            fh.write(pem.bytes())
    cert.private_key_pem.write_to_path(str(key_path))
    yield cert_path, key_path


# Real-peer tests skip on a developer box without Postfix or root, but CI must run
# them: there (CI=true, as .ci/run is invoked) such a skip is turned into a failure.
REAL_PEER_SKIPS = ("needs Debian", "needs root", "mounting a tmpfs needs root", "cannot mount")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if os.environ.get("CI") and report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        if any(marker in reason for marker in REAL_PEER_SKIPS):
            report.outcome = "failed"
            report.longrepr = f"real-peer test skipped in CI: {reason}"


# The relay runs on uvloop (`serve`'s default) and can run on the standard loop
# (TLS_RELAY_LOOP=asyncio).  Tests of the in-process listener and of delivery run on
# both, so a difference between the loops (a transport that is not an
# asyncio.Transport, a callback that never comes) cannot hide again.
BOTH_LOOPS = ("tests/intake/", "tests/delivery/")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    if any(part in item.nodeid for part in BOTH_LOOPS):
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}
