"""Client modes for 2 KiB per core (issue 14): pipelining and not, relay / Postfix paired.

Modes (bench.loads.MODES): ``pipe`` = the table's load generator (PIPELINING for
MAIL/RCPT/DATA) into a sink that offers PIPELINING; ``nopipe`` = a generator that sends
one command per round trip (``loadgen --no-pipelining``, as smtplib, PHPMailer and most
application libraries) and a sink whose EHLO leaves PIPELINING out (so the SUT's
delivery side cannot pipeline either); ``nopipe-client`` = only the generator.

Each repetition runs relay and Postfix back to back, the order alternating (relay first
on even repetitions), in every mode; runs the table already made (its ``pipe`` rows,
same repetition) are reused.  The report: per mode, median delivered msg/s of each,
and the paired ratios relay / Postfix (delivered msg/s, CPU per message) as
"median x (min-max)" over the repetitions, with the issue's targets.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from typing import Any

from bench.loads import MODES, SIZES
from bench.report import num, pairs_of, progress, ratios, spread, verdict
from bench.runone import run_one

PAIR = ("relay", "postfix")


def run(
    ctx: argparse.Namespace,
    done: list[dict[str, Any]],
    placement: str,
    started: float,
) -> list[dict[str, Any]]:
    """The runs the modes need that *done* (the table's runs) does not have."""
    have = {
        (r["system"], r["size"], r["placement"], r.get("mode", "pipe"), r["rep"])
        for r in done
        if not r.get("rate")
    }
    todo = []
    for rep in range(ctx.mode_reps):
        for mode in ctx.modes:
            for system in PAIR if rep % 2 == 0 else PAIR[::-1]:
                if (system, "2k", placement, mode, rep) not in have:
                    todo.append((system, mode, rep))
    out = []
    for i, (system, mode, rep) in enumerate(todo, 1):
        load = dataclasses.replace(SIZES["2k"], mode=mode)
        r = run_one(ctx, system, load, placement, rep)
        out.append(r)
        progress(i, len(todo), r, started)
    return out


def report(results: list[dict[str, Any]], placement: str) -> list[str]:
    pairs = pairs_of(results, "relay", "postfix")
    head = (
        "client mode",
        "relay dlv msg/s",
        "postfix dlv msg/s",
        "delivered relay/PF",
        "CPU per msg relay/PF",
        "pairs",
    )
    lines = [
        "",
        f"Client modes, 2 KiB, {placement}: relay / Postfix paired per repetition"
        " (median x (min-max) of the per-repetition ratios):",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    goals = []
    for mode, what in MODES.items():
        ps = pairs.get(("2k", placement, mode))
        if not ps:
            continue
        rate, cpu = ratios(ps, "delivered_per_s"), ratios(ps, "sut_cpu_ms_per_msg")
        relay = statistics.median(a["delivered_per_s"] for a, _ in ps)
        postfix = statistics.median(b["delivered_per_s"] for _, b in ps)
        cells = (what, num(relay), num(postfix), spread(rate), spread(cpu), str(len(ps)))
        lines.append("| " + " | ".join(cells) + " |")
        goals += targets(mode, rate, cpu, len(ps))
    lines += contention(results, placement)
    lines += early_commands(results)
    if len(lines) == 5:
        return []
    return [*lines, "", "Targets (issue 14, 2 KiB per core, client modes):", *goals]


def targets(mode: str, rate: list[float | None], cpu: list[float | None], n: int) -> list[str]:
    r = statistics.median(x for x in rate if x is not None) if any(rate) else None
    c = statistics.median(x for x in cpu if x is not None) if any(cpu) else None
    few = "" if n >= 3 else f" (only {n} pair(s); the target needs ≥ 3)"
    return [
        verdict(f"{mode}: delivered ≥ 2.0 x Postfix", r, r is not None and r >= 2.0, ".2f", few),
        verdict(f"{mode}: CPU/msg ≤ 0.5 x Postfix", c, c is not None and c <= 0.5, ".2f", few),
    ]


def early_commands(results: list[dict[str, Any]]) -> list[str]:
    """A SUT that pipelined to the sink although its EHLO did not offer PIPELINING."""
    bad = [
        r
        for r in results
        if r["ok"] and r.get("mode") == "nopipe" and (r.get("sink_early_commands") or 0) > 0
    ]
    return [
        f"Note: {r['system']} rep {r['rep']} sent {r['sink_early_commands']} command(s) to the"
        " sink before the previous reply, although the sink did not offer PIPELINING"
        for r in bad
    ]


def contention(results: list[dict[str, Any]], placement: str) -> list[str]:
    """How much of the SUT's own CPU other processes took (other jobs on the machine):
    a SUT of many processes gets a larger share of a contended core than one of one."""
    shares = {
        system: [
            r["sut_core_other_frac"]
            for r in results
            if r["ok"]
            and r["system"] == system
            and r["size"] == "2k"
            and "sut_core_other_frac" in r
        ]
        for system in PAIR
    }
    if placement != "percore" or not all(shares.values()):
        return []
    text = ", ".join(f"{s} runs {100 * statistics.median(v):.0f}%" for s, v in shares.items())
    return [f"Share of the SUT's own CPU taken by other processes (median): {text}."]
