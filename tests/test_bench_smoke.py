"""Smoke test of the benchmark harness (bench/): the pieces work, no timing asserted.

Runs the sink protocol against scripted byte streams, and the real load generator
against the real sink in this process over loopback STARTTLS (a few messages, well
under a second).  Postfix and tls-relay are not started here (``make bench`` does).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from bench import loadgen, procs, run, sink


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


def test_sink_counts_duplicates_and_messages_without_id() -> None:
    one = b"MAIL FROM:<>\r\nRCPT TO:<x@y>\r\nDATA\r\nMessage-ID: <d@x>\r\n\r\nz\r\n.\r\n"
    bounce = b"MAIL FROM:<>\r\nRCPT TO:<x@y>\r\nDATA\r\nSubject: no id\r\n\r\nz\r\n.\r\n"
    stats, _ = _session([one, one, bounce])
    assert len(stats.arrivals) == 1 and stats.duplicates == 1 and stats.unknown == 1


def test_message_body_size_and_no_leading_dots() -> None:
    for size in (2048, 100 * 1024):
        hdr = loadgen.headers("r", 1, 2)
        body = loadgen.make_body(size, len(hdr))
        assert abs(len(hdr) + len(body) - size) < loadgen.LINE
        assert b"\r\n." not in body and body.endswith(b"\r\n")
    assert b"Message-ID: <r.1.2@loadgen.bench.invalid>" in loadgen.headers("r", 1, 2)


def test_percentile_and_table_render() -> None:
    assert run.pct([], 50) is None
    assert run.pct([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert run.pct([5.0], 99) == 5.0
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
    rows = run.aggregate([row, relay])
    text = run.table(rows)
    assert "| relay | 2k | percore |" in text and "2.00" in text and "0.40" in text
    assert any("PASS" in line for line in run.targets(rows, []))


def test_pyspy_summary(tmp_path: Path) -> None:
    raw = tmp_path / "p.txt"
    raw.write_text("proc;main (a.py:1);f (a.py:2) 3\nproc;main (a.py:1);g (a.py:3) 1\n")
    s = run.summarize_pyspy(raw)
    assert s["samples"] == 4 and s["self_pct"][0] == ("f (a.py:2)", 75.0)


def test_proc_tree_accounting_sees_this_process() -> None:
    import os

    assert os.getpid() in procs.tree(os.getppid())
    assert procs.cpu_seconds([os.getpid()]) > 0
    assert procs.rss_bytes([os.getpid()]) > 0


async def test_loadgen_to_sink_over_starttls(tmp_path: Path) -> None:
    cert, key = run.self_signed(tmp_path / "certs")
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
