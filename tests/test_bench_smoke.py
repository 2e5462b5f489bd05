"""Smoke test of the benchmark harness (bench/): the pieces work, no timing asserted.

Runs the sink protocol against scripted byte streams, and the real load generator
(every message shape, with the NOOP probe alongside) against the real sink in this
process over loopback STARTTLS (a few messages, well under a second).  Postfix is not
started here (``make bench`` does); the last test runs the memory and shapes scenarios
against tls-relay at tiny sizes (a few seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from bench import (
    certs,
    loadgen,
    memory,
    messages,
    modes,
    probe,
    procs,
    pyspy,
    report,
    run,
    shapes,
    sink,
)


class FakeTransport:
    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass


def _session(chunks: list[bytes]) -> tuple[sink.Stats, bytes]:
    stats = sink.Stats()
    proto = sink.SinkProtocol(stats, None)  # type: ignore[arg-type]
    tr = FakeTransport()
    proto.connection_made(tr)
    for c in chunks:
        proto.data_received(c)
    return stats, b"".join(tr.out)


def test_sink_counts_message_ids_across_chunk_boundaries() -> None:
    msg = (
        b"MAIL FROM:<a@b>\r\nRCPT TO:<c@bench.test>\r\nDATA\r\n"
        b"Subject: x\r\nMessage-ID: <one@x>\r\n\r\nbody\r\n.\r\n"
        b"MAIL FROM:<a@b>\r\nRCPT TO:<c@bench.test>\r\nDATA\r\n"
        b"message-id: <two@x>\r\n\r\n" + b"y" * 70000 + b"\r\n.\r\nQUIT\r\n"
    )
    for step in (1, 2, 3, 5, 7, 4096, len(msg)):
        chunks = [msg[i : i + step] for i in range(0, len(msg), step)]
        stats, out = _session(chunks)
        assert sorted(stats.arrivals) == ["one@x", "two@x"], step
        assert out.count(b"250 2.0.0 Ok: queued") == 2
        assert out.endswith(b"221 2.0.0 Bye\r\n")


def test_sink_takes_bdat_chunks_across_any_split() -> None:
    """RFC 3030: the chunk's octets are counted, not searched for an end marker; a
    message may come in several chunks, the last one marked LAST."""
    one = b"Subject: x\r\nMessage-ID: <one@x>\r\n\r\n.\r\n"  # a lone period: just data
    two_a, two_b = b"message-id: <two@x>\r\n\r\n", b"y" * 70000 + b"\r\n"
    msg = (
        b"MAIL FROM:<a@b>\r\nRCPT TO:<c@bench.test>\r\nBDAT %d LAST\r\n%s" % (len(one), one)
        + b"MAIL FROM:<a@b>\r\nRCPT TO:<c@bench.test>\r\n"
        + b"BDAT %d\r\n%sBDAT %d LAST\r\n%sQUIT\r\n" % (len(two_a), two_a, len(two_b), two_b)
    )
    for step in (1, 2, 3, 5, 7, 4096, len(msg)):
        chunks = [msg[i : i + step] for i in range(0, len(msg), step)]
        stats, out = _session(chunks)
        assert sorted(stats.arrivals) == ["one@x", "two@x"], step
        assert stats.bytes == len(one) + len(two_a) + len(two_b)
        assert out.count(b"250 2.0.0 Ok: queued") == 2 and out.count(b"Ok: chunk") == 1
        assert out.endswith(b"221 2.0.0 Bye\r\n")


def test_sink_offers_chunking_unless_told_not_to() -> None:
    assert b"CHUNKING" in sink.ehlo_reply(True, True)
    assert b"CHUNKING" not in sink.ehlo_reply(True, True, chunking=False)


def test_sink_counts_duplicates_and_messages_without_id() -> None:
    one = b"MAIL FROM:<>\r\nRCPT TO:<x@y>\r\nDATA\r\nMessage-ID: <d@x>\r\n\r\nz\r\n.\r\n"
    bounce = b"MAIL FROM:<>\r\nRCPT TO:<x@y>\r\nDATA\r\nSubject: no id\r\n\r\nz\r\n.\r\n"
    stats, _ = _session([one, one, bounce])
    assert len(stats.arrivals) == 1 and stats.duplicates == 1 and stats.unknown == 1


def test_message_body_size_and_no_leading_dots() -> None:
    for size in (2048, 100 * 1024):
        hdr = messages.headers("r", 1, 2)
        body = messages.make_body(size, len(hdr))
        assert abs(len(hdr) + len(body) - size) < messages.LINE
        assert b"\r\n." not in body and body.endswith(b"\r\n")
    assert b"Message-ID: <r.1.2@loadgen.bench.invalid>" in messages.headers("r", 1, 2)


def test_percentile_and_table_render() -> None:
    assert report.pct([], 50) is None
    assert report.pct([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert report.pct([5.0], 99) == 5.0
    row: dict[str, Any] = {
        "system": "postfix",
        "size": "2k",
        "placement": "percore",
        "ok": True,
        "rep": 0,
        "accepted_per_s": 300.0,
        "delivered_per_s": 290.0,
        "acc_p50_ms": 8.0,
        "acc_p99_ms": 20.0,
        "a2d_p50_ms": 100.0,
        "a2d_p99_ms": 400.0,
        "sut_cpu_ms_per_msg": 2.5,
        "peak_rss_mib": 500.0,
        "peak_pss_mib": 90.0,
        "sink_cpu_ms_per_msg": 0.3,
        "gen_cpu_ms_per_msg": 0.3,
        "sink_connections": 100,
        "other_cpu_s": 0.0,
    }
    relay = dict(row, system="relay", delivered_per_s=580.0, sut_cpu_ms_per_msg=1.0)
    rows = report.aggregate([row, relay])
    text = report.table(rows)
    assert "| relay | 2k | percore |" in text and "2.00" in text and "0.40" in text
    assert any("PASS" in line for line in report.targets(rows, []))


def test_pyspy_summary(tmp_path: Path) -> None:
    raw = tmp_path / "p.txt"
    raw.write_text("proc;main (a.py:1);f (a.py:2) 3\nproc;main (a.py:1);g (a.py:3) 1\n")
    s = pyspy.summarize(raw)
    assert s["samples"] == 4 and s["self_pct"][0] == ("f (a.py:2)", 75.0)


def test_proc_tree_accounting_sees_this_process() -> None:
    import os

    assert os.getpid() in procs.tree(os.getppid())
    assert procs.cpu_seconds([os.getpid()]) > 0
    assert procs.rss_bytes([os.getpid()]) > 0


async def test_loadgen_to_sink_over_starttls(tmp_path: Path) -> None:
    cert, key = certs.make_cert(tmp_path / "certs")
    stats = sink.Stats()
    ctx = sink.server_context(str(cert), str(key))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: sink.SinkProtocol(stats, ctx), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        args = loadgen.build_parser().parse_args(
            [
                "--port",
                str(port),
                "--conns",
                "2",
                "--msgs",
                "3",
                "--size",
                "3k",
                "--run",
                "t",
                "--out",
                str(tmp_path / "o.json"),
                "--io-timeout",
                "10",
            ]
        )
        doc = await asyncio.wait_for(loadgen.run(args), 30)
    finally:
        server.close()
    assert doc["errors"] == [] and doc["rejected"] == []
    ids = {m[0] for m in doc["messages"]}
    assert len(ids) == 6 and ids == set(stats.arrivals)
    assert doc["handshakes"] == 2 and stats.tls_handshakes == 2 and doc["pipelining"]
    assert all(m[1] <= m[2] <= m[3] for m in doc["messages"])


def test_rate_mode_plan_is_shared_and_bounded() -> None:
    plan = loadgen.Plan(conns=2, msgs=3, rate=100.0)
    got = [plan.take(0, 0) for _ in range(7)]
    assert [g[1] for g in got if g] == list(range(6)) and got[-1] is None


def test_the_relay_is_never_skipped_for_its_layout() -> None:
    """bench skipped the relay rows silently after the issue-9 layout moved
    relay/delivery.py: whether the relay runs is decided by the binary and a real
    start, never by file names inside the package."""
    from bench import systems

    assert systems.relay_unavailable() is None


# ---------------------------------------------------------------- issue 14 scenarios
def test_sink_without_pipelining_counts_commands_sent_too_early() -> None:
    stats = sink.Stats()
    proto = sink.SinkProtocol(stats, None, pipelining=False)  # type: ignore[arg-type]
    tr = FakeTransport()
    proto.connection_made(tr)
    proto.data_received(b"EHLO x\r\n")
    assert b"PIPELINING" not in b"".join(tr.out) and b"STARTTLS" in b"".join(tr.out)
    for line in (b"MAIL FROM:<a@b>\r\n", b"RCPT TO:<c@d>\r\n", b"DATA\r\n"):
        proto.data_received(line)  # one command per round trip: nothing early
    proto.data_received(b"Message-ID: <w@x>\r\n\r\nz\r\n.\r\n")
    assert stats.early_commands == 0 and list(stats.arrivals) == ["w@x"]
    proto.data_received(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nMessage-ID: <y@x>\r\n")
    assert stats.early_commands == 3  # RCPT, DATA and the message: each before its reply


def _server(stats: sink.Stats, cert: Path, key: Path, pipelining: bool) -> Any:
    ctx = sink.server_context(str(cert), str(key))
    loop = asyncio.get_running_loop()
    return loop.create_server(lambda: sink.SinkProtocol(stats, ctx, pipelining), "127.0.0.1", 0)


def _args(port: int, out: Path, *extra: str) -> Any:
    argv = ["--port", str(port), "--conns", "2", "--msgs", "1", "--run", "s", "--out", str(out)]
    return loadgen.build_parser().parse_args([*argv, "--io-timeout", "10", *extra])


async def test_shapes_without_pipelining_reach_the_sink_while_probed(tmp_path: Path) -> None:
    """Every message shape, non-pipelining, into a sink without PIPELINING, with the
    NOOP probe on its own session alongside: all counted, round trips recorded."""
    cert, key = certs.make_cert(tmp_path / "certs")
    stats = sink.Stats()
    server = await _server(stats, cert, key, pipelining=False)
    port = server.sockets[0].getsockname()[1]
    pargs = argparse.Namespace(host="127.0.0.1", port=port, interval=0.005, rotate=3)
    pargs.io_timeout, pargs.max_seconds = 10.0, 20.0
    prober = probe.Prober(pargs)
    task = asyncio.create_task(prober.loop(await prober.open()))
    try:
        for shape in messages.SHAPES:
            extra = ("--shape", shape, "--size", "30k", "--run", shape)
            args = _args(port, tmp_path / f"{shape}.json", *extra)
            doc = await asyncio.wait_for(loadgen.run(args), 30)
            assert doc["errors"] == [] and len(doc["messages"]) == 2 and not doc["pipelining"]
        await asyncio.sleep(0.05)
    finally:
        prober.stop.set()
        await asyncio.wait_for(task, 10)
        server.close()
    assert len(stats.arrivals) == 8 and stats.early_commands == 0
    got = probe.summarize(prober.result(), 0.0)
    assert got["noops"] >= 3 and got["sessions"] >= 2 and got["errors"] == []
    assert got["rtt_max_ms"] is not None and got["rtt_max_ms"] < 10_000


def test_message_shapes_have_their_size_and_lines() -> None:
    for shape in messages.SHAPES:
        head = messages.head(shape, "r", 1, 2)
        msg = head + messages.shared_part(shape, 50_000, len(head))
        assert abs(len(msg) - 50_000) < 200 and b"\r\n." not in msg, shape
        assert msg.startswith(b"From:") and b"Message-ID: <r.1.2@" in msg[:400]
    header, _, body = (head + messages.shared_part("bigheader", 50_000, len(head))).partition(
        b"\r\n\r\n"
    )
    assert header.count(b"\r\nX-") > 3000 and body.count(b"\r\n") == 1


def test_sampler_pss_every_sample_and_memory_guard() -> None:
    import os

    fired: list[bool] = []
    s = procs.Sampler(os.getpid(), interval=0.01, pss_every=1, pss_cap=1, on_cap=lambda: None)
    s.on_cap = lambda: fired.append(True)
    s.start()
    time.sleep(0.1)
    peak = s.stop()
    assert peak.pss > 0 and peak.pss_samples == len(peak.series) >= 2
    assert peak.at_peak["anon"] > 0 and peak.capped and fired == [True]


def _run(system: str, size: str, **kw: Any) -> dict[str, Any]:
    base = {"ok": True, "system": system, "size": size, "rep": 0, "placement": "percore"}
    return {**base, "conns": 8, "msgs_per_conn": 2, **kw}


def test_memory_shapes_and_modes_reports() -> None:
    mib = 1024 * 1024
    mem = [
        _run("relay", "mem-20m", bytes=20 * mib, delivered=16, accepted=16, peak_pss_mib=120.0),
        _run("relay", "mem-100k", bytes=100 * 1024, delivered=16, accepted=16, peak_pss_mib=60.0),
    ]
    text = "\n".join(memory.report(mem, "percore"))
    assert "= 2.00 x" in text and "PASS relay peak PSS" in text and "MISS relay peak PSS 20" in text
    probe_doc = {"noops": 50, "rtt_p99_ms": 30.0, "rtt_max_ms": 4800.0, "over_100ms": 3}
    shp = _run("relay", "headeronly", bytes=19 * mib, conns=4, msgs_per_conn=1, probe=probe_doc)
    shp.update(outcomes={"552": 4}, delivered=0, accepted=0, peak_pss_mib=900.0)
    text = "\n".join(shapes.report([shp], "percore"))
    assert "4x 552" in text and "30.0 / 4800" in text and "MISS headeronly" in text
    runs = []
    for rep, (r_rate, p_rate) in enumerate(((600.0, 300.0), (500.0, 400.0), (700.0, 350.0))):
        for system, rate in (("relay", r_rate), ("postfix", p_rate)):
            runs.append(
                _run(system, "2k", rep=rep, mode="nopipe", delivered_per_s=rate,
                     sut_cpu_ms_per_msg=1.0 if system == "relay" else 2.5)
            )  # fmt: skip
    text = "\n".join(modes.report(runs, "percore"))
    assert "| 600 | 350 | 2.00 x (1.25-2.00) | 0.40 x (0.40-0.40) | 3 |" in text
    assert "PASS nopipe: delivered" in text and "PASS nopipe: CPU/msg" in text


@pytest.mark.e2e
def test_memory_and_shapes_scenarios_run_against_the_relay(tmp_path: Path) -> None:
    """bench.run end to end at tiny sizes (``--scale``): relay, sink, sampler, probe."""
    argv = ["--scenarios", "memory,shapes", "--systems", "relay", "--scale", "0.002"]
    assert run.main([*argv, "--out", str(tmp_path)]) == 0
    text = (tmp_path / "latest.md").read_text()
    assert "| relay | 8 x 2 x" in text and "| shortlines | 4 x" in text and "4x 250" in text
