"""relay.tlsrpt.sender against a real HTTPS endpoint on loopback: a refused POST is
retried with backoff and given up after a day; days are removed once handled, and kept
when the TLS-RPT lookup fails."""

from __future__ import annotations

from pathlib import Path

import trustme

from relay.config import TlsReportsConfig
from relay.tlsrpt import counts, report
from relay.tlsrpt.counts import TlsCounts
from relay.tlsrpt.sender import POST_GIVE_UP, ReportSender
from tests.e2e.test_tls_reports_e2e import ReportEndpoint
from tests.tlsrpt.test_counts_and_report import DAY1, Clock

CFG = TlsReportsConfig("Corp", "tls@corp.test", "tlsrpt@corp.test")


def counted(root: Path, clock: Clock, *domains: str) -> None:
    c = TlsCounts(root, "0", clock)
    c.setup()
    for domain in domains:
        c.success(report.policy_object(domain))
    c.flush()


async def test_a_refused_post_is_retried_then_given_up(
    tmp_path: Path, ca: trustme.CA, ca_file: Path
) -> None:
    clock = Clock(DAY1)
    counted(tmp_path, clock, "x.test")
    with ReportEndpoint(ca) as endpoint:
        endpoint.status = 503
        uri = f"https://127.0.0.1:{endpoint.port}/tlsrpt"

        async def txt(name: str) -> tuple[str, ...] | None:
            return (f"v=TLSRPTv1; rua={uri}",) if name == "_smtp._tls.x.test" else ()

        async def lookup(host: str) -> tuple[str, ...]:
            return ("127.0.0.1",)

        mailed: list[bytes] = []
        sender = ReportSender(
            tmp_path,
            CFG,
            "relay.corp.test",
            txt,
            lookup,
            lambda s, r, d: mailed.append(d),
            ca_file,
            clock,
        )
        clock.now += 86400  # the day is over
        lines = await sender.send_due()
        assert lines == [f"2026-12-01 x.test: POST to {uri} queued"]
        assert counts.days(tmp_path) == [] and len(endpoint.posts) == 1
        await sender.retry_posts()
        assert len(endpoint.posts) == 1  # backing off: not yet
        clock.now += 61
        endpoint.status = 201
        await sender.retry_posts()
        assert len(endpoint.posts) == 2 and not list((tmp_path / "posts").glob("*.json"))

        counted(tmp_path, Clock(clock.now), "x.test")
        endpoint.status = 500
        clock.now += 86400
        await sender.send_due()
        clock.now += POST_GIVE_UP
        await sender.retry_posts()  # a day later: dropped, not kept forever
        assert not list((tmp_path / "posts").glob("*.json"))
        assert mailed == []


async def test_a_failed_tlsrpt_lookup_keeps_the_day(tmp_path: Path, ca_file: Path) -> None:
    clock = Clock(DAY1)
    counted(tmp_path, clock, "x.test")

    async def txt(name: str) -> tuple[str, ...] | None:
        return None  # SERVFAIL

    async def lookup(host: str) -> tuple[str, ...]:
        return ()

    sender = ReportSender(
        tmp_path, CFG, "r.test", txt, lookup, lambda s, r, d: None, ca_file, clock
    )
    clock.now += 86400
    assert "lookup failed; kept for later" in (await sender.send_due())[0]
    assert counts.days(tmp_path) == ["2026-12-01"]


async def test_each_domain_is_sent_once_even_when_another_waits(
    tmp_path: Path, ca_file: Path
) -> None:
    clock = Clock(DAY1)
    counted(tmp_path, clock, "a.test", "b.test", "c.test")
    answers: dict[str, tuple[str, ...] | None] = {
        "_smtp._tls.a.test": ("v=TLSRPTv1; rua=mailto:tls@a.test",),
        "_smtp._tls.b.test": None,  # SERVFAIL for now
        "_smtp._tls.c.test": ("v=TLSRPTv1; rua=mailto:bad\r\nBcc: x@evil.test",),
    }

    async def txt(name: str) -> tuple[str, ...] | None:
        return answers[name]

    async def lookup(host: str) -> tuple[str, ...]:
        return ()

    mailed: list[list[str]] = []
    sender = ReportSender(
        tmp_path, CFG, "r.test", txt, lookup, lambda s, r, d: mailed.append(r), ca_file, clock
    )
    clock.now += 86400
    lines = await sender.send_due()
    assert "2026-12-01 c.test: not an address in its rua" in lines[2]
    await sender.send_due()
    assert mailed == [["tls@a.test"]]  # not again while b.test waits
    assert counts.days(tmp_path) == ["2026-12-01"]
    answers["_smtp._tls.b.test"] = ("v=TLSRPTv1; rua=mailto:tls@b.test",)
    await sender.send_due()
    assert mailed == [["tls@a.test"], ["tls@b.test"]]
    assert counts.days(tmp_path) == []


async def test_a_day_is_not_sent_before_every_process_wrote_it_out(
    tmp_path: Path, ca_file: Path
) -> None:
    clock = Clock(DAY1)
    counted(tmp_path, clock, "a.test")

    async def txt(name: str) -> tuple[str, ...] | None:
        return ("v=TLSRPTv1; rua=mailto:tls@a.test",)

    async def lookup(host: str) -> tuple[str, ...]:
        return ()

    mailed: list[list[str]] = []
    sender = ReportSender(
        tmp_path, CFG, "r.test", txt, lookup, lambda s, r, d: mailed.append(r), ca_file, clock
    )
    clock.now = DAY1 + 12 * 3600 + 1  # one second after midnight
    assert await sender.send_due() == [] and mailed == []
    clock.now += 60
    assert len(await sender.send_due()) == 1 and mailed == [["tls@a.test"]]
