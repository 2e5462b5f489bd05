"""Latency and memory under message shapes (issue 14, second target).

For each shape, 4 clients (``--shape-conns``) each send one message of that shape
(bench.messages) to the relay while one probe client, on its own STARTTLS session,
sends NOOP every 10 ms and records each round trip (bench.probe).  A relay whose event
loop chews on one message's content answers every other session late: the longest
probe round trip is that stall.  Shapes:

    shortlines  a 25 MiB message of 'a' CRLF lines (8.7 million lines)
    bigheader   a ~19 MiB header block (1.25 million 16-byte fields), a one-line body
    headeronly  the same header block and no body (4 in parallel, as the issue says)
    plain       (opt-in) 25 MiB of ordinary 78-byte lines: the control, size without shape

A reply other than 250 (say 552 for a header block over a limit) is a legitimate outcome:
the report lists the reply codes; what was accepted must still reach the sink.  Also
reported: the relay's peak PSS (every 50 ms), its growth over the PSS when the load
started, and that growth per MiB of message data sent (how many times over the relay
holds what it is sent).
Target: no probe round trip over 100 ms.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from bench.loads import MIB, Load
from bench.report import num, progress, verdict
from bench.runone import run_one

SHAPES = {
    name: Load(
        name,
        size,
        4,
        1,
        shape=name,
        pss_every=1,
        probe=True,
        rejects_ok=True,
        data_timeout=600.0,
    )
    for name, size in (
        ("shortlines", 25 * MIB),
        ("bigheader", 19 * MIB),
        ("headeronly", 19 * MIB),
        ("plain", 25 * MIB),
    )
}
DEFAULT = ("shortlines", "bigheader", "headeronly")
STALL_LIMIT_MS = 100.0


def loads(names: list[str], scale: float) -> list[Load]:
    bad = [n for n in names if n not in SHAPES]
    if bad:
        raise ValueError(f"unknown shape(s) {bad} (choose from {', '.join(SHAPES)})")
    return [
        dataclasses.replace(SHAPES[n], size=max(4096, int(SHAPES[n].size * scale))) for n in names
    ]


def run(
    ctx: argparse.Namespace, names: list[str], placement: str, started: float
) -> list[dict[str, Any]]:
    out = []
    todo = [dataclasses.replace(x, conns=ctx.shape_conns) for x in loads(names, ctx.scale)]
    for i, load in enumerate(todo, 1):
        r = run_one(ctx, "relay", load, placement, 0)
        out.append(r)
        progress(i, len(todo), r, started)
    return out


def replies(r: dict[str, Any]) -> str:
    """'4x 250' / '4x 552' / '2x 250, 2x error' (errors: sessions that broke off)."""
    got = r.get("outcomes") or {}
    text = ", ".join(f"{n}x {code}" for code, n in sorted(got.items()))
    if r.get("gen_errors"):
        text += f" ({r['gen_errors'][0][:80]})"
    return text or "-"


def row(r: dict[str, Any]) -> str:
    what = f"{r['conns']} x {r['bytes'] / MIB:.1f} MiB"
    if not r["ok"] and "probe" not in r:
        return f"| {r['size']} | {what} | FAILED: {r.get('error', '')[:200]} |" + " |" * 6
    p = r.get("probe") or {}
    sent_mib = r["conns"] * r["msgs_per_conn"] * r["bytes"] / MIB
    pss, start = r.get("peak_pss_mib"), r.get("pss_start_mib")
    growth = pss - start if pss is not None and start is not None else None
    worst = p.get("worst") or []
    cells = (
        r["size"] + ("" if r["ok"] else " (FAILED)"),
        what,
        replies(r),
        f"{r.get('delivered', 0)} / {r.get('accepted', 0)}",
        f"{num(p.get('rtt_p99_ms'), '.1f')} / {num(p.get('rtt_max_ms'), '.0f')}",
        f"{p.get('over_100ms', '-')} of {p.get('noops', '-')}",
        f"{worst[0][0]:.1f}" if worst else "-",
        f"{num(pss)} (+{num(growth)})",
        num(growth / sent_mib if growth is not None and sent_mib else None, ".1f"),
    )
    return "| " + " | ".join(cells) + " |"


def report(runs: list[dict[str, Any]], placement: str) -> list[str]:
    if not runs:
        return []
    head = (
        "shape",
        "messages",
        "replies to end-of-data",
        "delivered / accepted",
        "probe NOOP RTT p99 / max ms",
        "NOOPs > 100 ms",
        "worst NOOP sent at s",
        "relay peak PSS MiB (+ growth)",
        "growth / MiB sent",
    )
    lines = [
        "",
        f"Message shapes ({placement}): {runs[0]['conns']} clients, one message each, while a"
        " probe session sends NOOP every 10 ms (round trip = how long another session waits):",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
        *(row(r) for r in runs),
    ]
    late = max((r.get("probe") or {}).get("timer_late_max_ms") or 0.0 for r in runs)
    lines.append(
        f"(probe's own timer fired at most {late:.1f} ms late: the probe's CPU share, not the"
        " relay's; 'sent at' is seconds after the generator started)"
    )
    goals = [
        verdict(
            f"{r['size']}: no probe round trip over {STALL_LIMIT_MS:.0f} ms (max ms)",
            (r.get("probe") or {}).get("rtt_max_ms"),
            r["ok"] and ((r.get("probe") or {}).get("rtt_max_ms") or 0) <= STALL_LIMIT_MS,
            ".0f",
        )
        for r in runs
    ]
    return [*lines, "", "Targets (issue 14, message shapes):", *goals]
