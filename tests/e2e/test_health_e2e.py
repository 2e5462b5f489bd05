"""End to end: `/healthz` and `/readyz` of `tls-relay serve` on its metrics address.
The spool's queue directory sits on a tmpfs the test remounts read-only and then
shrinks below the free space the relay needs (needs root, as in CI)."""

from __future__ import annotations

import http.client
import subprocess

import pytest

from tests.e2e.test_intake_durability import tiny_tmpfs
from tests.fixtures.net import free_port, wait_port
from tests.fixtures.relay_proc import HOST, RelayFactory

pytestmark = [pytest.mark.e2e]


def get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def remount(path: object, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


def test_healthz_and_readyz_follow_the_spool(relay: RelayFactory) -> None:
    port = free_port()
    proc = relay(start=False, extra_config={"metrics": {"address": f"{HOST}:{port}"}})
    with tiny_tmpfs(proc.spool_dir / "queue", size="256m") as queue:
        proc.start()
        wait_port(HOST, port, timeout=10)
        assert get(port, "/healthz") == (200, "ok\n")
        assert get(port, "/readyz") == (200, "ready\n")
        remount(queue, "ro")
        status, body = get(port, "/readyz")
        assert status == 503 and "is not writable" in body
        assert get(port, "/healthz")[0] == 200  # alive, just not ready
        remount(queue, "rw,size=1m")
        status, body = get(port, "/readyz")
        assert status == 503 and "MiB free, below the 100 MiB it needs" in body
        remount(queue, "size=256m")
        assert get(port, "/readyz") == (200, "ready\n")
        assert proc.stop() == 0
