"""relay.gate: client addresses, relay networks, connection caps, AUTH throttling."""

from __future__ import annotations

import ipaddress

import pytest

from relay.config import Limits
from relay.intake.gate import Gate, client_address, in_networks

NETS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))


@pytest.mark.parametrize(
    ("host", "normal", "inside"),
    [
        ("127.0.0.1", "127.0.0.1", True),
        ("::ffff:127.0.0.1", "127.0.0.1", True),  # IPv4-mapped on a dual-stack socket
        ("::1", "::1", False),
        ("2001:db8::5", "2001:db8::5", True),
        ("fe80::1%eth0", "fe80::1", False),
        ("10.99.1.1", "10.99.1.1", False),
        ("::ffff:10.0.0.1", "10.0.0.1", False),
    ],
)
def test_client_address_and_networks(host: str, normal: str, inside: bool) -> None:
    addr = client_address(host)
    assert str(addr) == normal
    assert in_networks(addr, NETS) is inside


def test_no_networks_means_nobody() -> None:
    gate = Gate(Limits(), ())
    assert not gate.may_relay_unauthenticated(client_address("127.0.0.1"))


def test_connection_caps() -> None:
    gate = Gate(Limits(max_connections=3, max_connections_per_ip=2))
    a, b, c = (client_address(x) for x in ("127.0.0.1", "::ffff:127.0.0.1", "127.0.0.2"))
    assert gate.admit(a) and gate.admit(b)
    assert not gate.admit(a)  # per IP: the mapped form counts as the same client
    assert gate.admit(c)
    assert not gate.admit(client_address("127.0.0.3"))  # global
    gate.release(a)
    assert gate.admit(a) and gate.connections == 3
    gate.release(client_address("127.0.0.9"))  # never admitted: no effect
    assert gate.connections == 3


def test_auth_failures_slide_out_of_the_window() -> None:
    now = [1000.0]
    gate = Gate(Limits(max_auth_failures=2, auth_failure_window=60), clock=lambda: now[0])
    ip = client_address("192.0.2.1")
    assert gate.auth_failed(ip) == 1 and not gate.auth_blocked(ip)
    now[0] += 30
    assert gate.auth_failed(ip) == 2 and gate.auth_blocked(ip)
    assert not gate.auth_blocked(client_address("192.0.2.2"))
    now[0] += 31  # the first failure is older than the window now
    assert gate.auth_failures(ip) == 1 and not gate.auth_blocked(ip)
    now[0] += 60
    assert gate.auth_failures(ip) == 0
