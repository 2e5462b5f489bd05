"""Memory with large messages (issue 14, first target): peak PSS, 20 MiB against 100 KiB.

The load: 8 connections x 2 messages of 20 MiB each (the second message of every
connection goes out while the first ones are being delivered), and the same with
100 KiB messages.  During each run the SUT's proportional set size (PSS, summed over
all its processes from /proc/PID/smaps_rollup) is sampled every 50 ms (bench.procs);
the report shows the peak, how it splits into anonymous memory (heap: message copies)
and file pages at that moment, and the ratio of the two peaks.  Every accepted message
must be counted at the sink, as in every run.

Target: relay peak < 150 MiB with 20 MiB messages, and within 1.5 x of the 100 KiB run.
Postfix (it streams through its queue files) is run for reference.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from bench.loads import KIB, MIB, Load
from bench.report import num, progress, verdict
from bench.runone import run_one

LOADS = (
    Load("mem-20m", 20 * MIB, 8, 2, pss_every=1, data_timeout=300.0),
    Load("mem-100k", 100 * KIB, 8, 2, pss_every=1),
)
BIG, SMALL = (x.name for x in LOADS)
PEAK_LIMIT_MIB, RATIO_LIMIT = 150.0, 1.5


def loads(scale: float) -> list[Load]:
    """The two loads, message sizes multiplied by *scale* (1.0 = the issue's)."""
    return [dataclasses.replace(x, size=max(1024, int(x.size * scale))) for x in LOADS]


def run(
    ctx: argparse.Namespace, systems: list[str], placement: str, started: float
) -> list[dict[str, Any]]:
    out = []
    todo = [(s, x) for s in systems for x in loads(ctx.scale)]
    for i, (system, load) in enumerate(todo, 1):
        r = run_one(ctx, system, load, placement, 0)
        out.append(r)
        progress(i, len(todo), r, started)
    return out


def row(r: dict[str, Any]) -> str:
    size = f"{r['bytes'] / MIB:.1f} MiB" if r["bytes"] >= MIB else f"{r['bytes'] // KIB} KiB"
    load = f"{r['conns']} x {r['msgs_per_conn']} x {size}"
    if not r["ok"]:
        return f"| {r['system']} | {load} | FAILED: {r.get('error', '')[:200]} | | | | |"
    split = r.get("peak_pss_split_mib") or {}
    cells = (
        r["system"],
        load,
        f"{r['delivered']} / {r['accepted']}",
        f"{num(r.get('peak_pss_mib'))} (start {num(r.get('pss_start_mib'))})",
        f"{num(split.get('anon'))} / {num(split.get('file'))}",
        num(r.get("peak_rss_mib")),
        num(r.get("e2e_seconds"), ".1f"),
    )
    return "| " + " | ".join(cells) + " |"


def report(runs: list[dict[str, Any]], placement: str) -> list[str]:
    if not runs:
        return []
    head = (
        "system",
        "load (conns x msgs x size)",
        "delivered / accepted",
        "peak PSS MiB (at the start)",
        "anon / file MiB at peak",
        "peak RSS MiB",
        "send→last delivery s",
    )
    lines = [
        "",
        f"Memory with large messages ({placement}; PSS summed over the SUT's processes,"
        " sampled every 50 ms):",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
        *(row(r) for r in runs),
        "",
    ]
    for system in dict.fromkeys(r["system"] for r in runs):
        lines.append(ratio_line(runs, system))
    return [*lines, "", "Targets (issue 14, memory):", *targets(runs)]


def peaks(runs: list[dict[str, Any]], system: str) -> tuple[float | None, float | None]:
    """(peak PSS MiB of the 20 MiB run, of the 100 KiB run) for *system*, good runs only."""
    by = {r["size"]: r for r in runs if r["system"] == system and r["ok"]}
    big, small = by.get(BIG, {}), by.get(SMALL, {})
    return big.get("peak_pss_mib"), small.get("peak_pss_mib")


def ratio_line(runs: list[dict[str, Any]], system: str) -> str:
    big, small = peaks(runs, system)
    r = big / small if big is not None and small else None
    return (
        f"{system}: peak PSS {num(big)} MiB with 20 MiB messages / {num(small)} MiB with"
        f" 100 KiB = {num(r, '.2f')} x"
    )


def targets(runs: list[dict[str, Any]]) -> list[str]:
    big, small = peaks(runs, "relay")
    ratio = big / small if big is not None and small else None
    bad = [r for r in runs if r["system"] == "relay" and not r["ok"]]
    return [
        verdict(
            f"relay peak PSS with 20 MiB messages < {PEAK_LIMIT_MIB:.0f} MiB",
            big,
            big is not None and big < PEAK_LIMIT_MIB,
            ".0f",
        ),
        verdict(
            f"relay peak PSS 20 MiB / 100 KiB ≤ {RATIO_LIMIT} x",
            ratio,
            ratio is not None and ratio <= RATIO_LIMIT,
            ".2f",
        ),
        f"- {'MISS' if bad else 'PASS'} relay memory runs completed, nothing lost",
    ]
