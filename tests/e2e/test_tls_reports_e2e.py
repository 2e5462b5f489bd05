"""End to end: RFC 8460 TLS reports from `tls-relay serve` - sessions counted while mail
flows (Debian's Postfix as the MX, one domain failing its `verify` level), then
`tls-relay tls-reports send --include-today` mails the report through the relay's own
queue to a Postfix mailbox and POSTs it to a real HTTPS endpoint; both are parsed back
and checked against RFC 8460's schema.  Only 127.0.0.1 is used."""

from __future__ import annotations

import asyncio
import email
import gzip
import json
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trustme
from aiohttp import web

from tests.e2e.test_delivery_e2e import add_postfix_mx, delivery_config, submit_smtputf8
from tests.e2e.test_queue_e2e import queue_json, wait_for
from tests.fixtures.dns import DnsServer
from tests.fixtures.postfix import PostfixMx
from tests.fixtures.relay_proc import RelayFactory, RelayProcess
from tests.tlsrpt.test_counts_and_report import check_schema

pytestmark = [pytest.mark.e2e, pytest.mark.postfix]


class ReportEndpoint:
    """HTTPS on 127.0.0.1 (trustme certificate) recording each POST's type and body."""

    def __init__(self, ca: trustme.CA) -> None:
        self.posts: list[tuple[str, bytes]] = []
        self.status = 201  # what each POST is answered
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("127.0.0.1").configure_cert(self._ctx)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _post(self, request: web.Request) -> web.Response:
        self.posts.append((request.content_type, await request.read()))
        return web.Response(status=self.status)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/tlsrpt", self._post)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._ctx)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def __enter__(self) -> ReportEndpoint:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@pytest.fixture
def endpoint(ca: trustme.CA) -> Iterator[ReportEndpoint]:
    with ReportEndpoint(ca) as server:
        yield server


def cli(proc: RelayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return proc.command("tls-reports", *args)


def pending(proc: RelayProcess) -> dict[str, Any]:
    out = cli(proc, "list", "--json")
    assert out.returncode == 0, out.stderr
    return {item["domain"]: item for item in json.loads(out.stdout)}


def test_counted_sessions_are_reported_by_mail_and_https(
    relay: RelayFactory,
    postfix_mx: PostfixMx,
    dns_server: DnsServer,
    ca_file: Any,
    endpoint: ReportEndpoint,
) -> None:
    add_postfix_mx(dns_server, "example.test", "reports.test")
    dns_server.add("bad.test", "MX", "10 mx.bad.test.")
    dns_server.add("mx.bad.test", "A", "127.0.0.1")  # Postfix: its certificate is not for it
    rua = f"mailto:tls@reports.test,https://127.0.0.1:{endpoint.port}/tlsrpt"
    dns_server.add("_smtp._tls.example.test", "TXT", f'"v=TLSRPTv1; rua={rua}"')
    cfg = delivery_config(dns_server, postfix_mx.port, ca_file)
    cfg["tls_reports"] = {
        "organization": "Corp",
        "contact": "tls@corp.test",
        "from": "tlsrpt@relay.test",
    }
    proc = relay(extra_config=cfg)
    submit_smtputf8(proc, "app@corp.test", "a@example.test", "counted")
    submit_smtputf8(proc, "app@corp.test", "b@bad.test", "failing")
    postfix_mx.wait_messages(1, timeout=30)

    def both_counted() -> dict[str, Any] | None:
        got = pending(proc)
        return got if {"example.test", "bad.test"} <= set(got) else None

    got = wait_for(both_counted, "sessions to be counted")  # within the 5 s flush
    (ok,) = got["example.test"]["policies"]
    assert ok["policy"] == {"policy-type": "no-policy-found", "policy-domain": "example.test"}
    assert (ok["success"], ok["failures"]) == (1, [])
    (bad,) = got["bad.test"]["policies"]
    assert bad["failures"][0]["result-type"] == "certificate-host-mismatch"
    assert bad["failures"][0]["receiving-mx-hostname"] == "mx.bad.test"
    assert bad["failures"][0]["sending-mta-ip"] == "127.0.0.1"

    sent = cli(proc, "send", "--include-today")
    assert sent.returncode == 0, sent.stderr
    assert "example.test: mailed to tls@reports.test (queued)" in sent.stdout
    assert "bad.test: publishes no TLS-RPT record; nothing sent" in sent.stdout

    def mailed() -> Any:
        return next((m for m in postfix_mx.messages() if m.recipient == "tls@reports.test"), None)

    report_mail = wait_for(mailed, "the mailed report at Postfix")
    msg = email.message_from_bytes(report_mail.raw)
    assert (
        msg.get_content_type() == "multipart/report" and msg["TLS-Report-Domain"] == "example.test"
    )
    part = next(p for p in msg.walk() if p.get_content_type() == "application/tlsrpt+gzip")
    doc = json.loads(gzip.decompress(part.get_payload(decode=True)))
    check_schema(doc)
    assert doc["organization-name"] == "Corp" and doc["contact-info"] == "tls@corp.test"
    assert doc["policies"][0]["summary"]["total-successful-session-count"] == 1

    assert wait_for(lambda: endpoint.posts or None, "the HTTPS POST")
    content_type, body = endpoint.posts[0]
    assert content_type == "application/tlsrpt+gzip"
    assert json.loads(gzip.decompress(body))["report-id"] == doc["report-id"]

    # The report's own delivery is not counted (no report loops, RFC 8460 3).
    def report_sent() -> bool:
        return all(item["sender"] != "tlsrpt@relay.test" for item in queue_json(proc))

    wait_for(report_sent, "the report to leave the queue")
    time.sleep(6)  # past the next flush
    assert "reports.test" not in pending(proc)
