"""The benchmark's report: medians over repetitions, the Markdown tables, paired ratios.

Rows are grouped by (system, size, placement, client mode); a ratio "xPF" is against the
``postfix`` row of the same size, placement and mode.  Paired ratios (``paired``) take
each repetition with its own partner, run back to back: on a machine whose speed
drifts, only those mean anything; they are printed as "median x (min-max)".
"""

from __future__ import annotations

import importlib.metadata
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.loads import PLACEMENTS, SIZES, SYSTEMS


def pct(values: list[float], q: float) -> float | None:
    """Percentile with linear interpolation (q in 0..100); None for no data."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = (
        "accepted_per_s",
        "delivered_per_s",
        "acc_p50_ms",
        "acc_p99_ms",
        "a2d_p50_ms",
        "a2d_p99_ms",
        "sut_cpu_ms_per_msg",
        "peak_rss_mib",
        "peak_pss_mib",
        "sink_cpu_ms_per_msg",
        "gen_cpu_ms_per_msg",
        "sink_connections",
        "other_cpu_s",
        "sut_util",
    )
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for r in results:
        if r.get("rate"):
            continue
        key = (r["system"], r["size"], r["placement"], r.get("mode", "pipe"))
        groups.setdefault(key, []).append(r)
    rows = []
    for (system, size, placement, mode), rs in groups.items():
        ok = [r for r in rs if r["ok"]]
        row: dict[str, Any] = {
            "system": system,
            "size": size,
            "placement": placement,
            "mode": mode,
            "reps": len(rs),
            "ok_reps": len(ok),
            "failed": [r.get("error", "") for r in rs if not r["ok"]],
        }
        for k in keys:
            row[k] = median(ok, k)
        row["delivered_per_s_all"] = [r.get("delivered_per_s") for r in ok]
        rows.append(row)
    by = {(r["system"], r["size"], r["placement"], r["mode"]): r for r in rows}
    for r in rows:
        pf = by.get(("postfix", r["size"], r["placement"], r["mode"])) or {}
        r["e2e_vs_postfix"] = ratio(r.get("delivered_per_s"), pf.get("delivered_per_s"))
        r["acc_vs_postfix"] = ratio(r.get("accepted_per_s"), pf.get("accepted_per_s"))
        r["cpu_vs_postfix"] = ratio(r.get("sut_cpu_ms_per_msg"), pf.get("sut_cpu_ms_per_msg"))
    order = {s: i for i, s in enumerate(SYSTEMS)}
    sizes = list(SIZES)
    rows.sort(
        key=lambda r: (
            sizes.index(r["size"]) if r["size"] in sizes else 99,
            PLACEMENTS.index(r["placement"]),
            r["mode"] != "pipe",
            r["mode"],
            order.get(r["system"], 99),
        )
    )
    return rows


def size_label(r: dict[str, Any]) -> str:
    mode = r.get("mode", "pipe")
    return r["size"] if mode == "pipe" else f"{r['size']} {mode}"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def num(v: float | None, fmt: str = ".0f") -> str:
    return "-" if v is None else format(v, fmt)


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "system",
        "size",
        "placement",
        "accepted msg/s",
        "delivered msg/s",
        "accept p50/p99 ms",
        "acc→dlv p50/p99 ms",
        "SUT CPU ms/msg",
        "SUT cores busy",
        "peak RSS MiB",
        "sink CPU ms/msg",
        "out conns",
        "dlv xPF",
        "CPU xPF",
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        if not r["ok_reps"]:
            lines.append(
                f"| {r['system']} | {size_label(r)} | {r['placement']} | FAILED: "
                + " / ".join(e[:120] for e in r["failed"])
                + " |"
                + " |" * 10
            )
            continue
        note = "" if r["ok_reps"] == r["reps"] else f" ({r['reps'] - r['ok_reps']} FAILED)"
        show_ratio = r["system"] not in ("postfix", "direct")
        lines.append(
            "| "
            + " | ".join(
                (
                    r["system"] + note,
                    size_label(r),
                    r["placement"],
                    num(r["accepted_per_s"]),
                    num(r["delivered_per_s"]),
                    f"{num(r['acc_p50_ms'], '.1f')} / {num(r['acc_p99_ms'], '.1f')}",
                    f"{num(r['a2d_p50_ms'], '.1f')} / {num(r['a2d_p99_ms'], '.1f')}",
                    num(r["sut_cpu_ms_per_msg"], ".2f"),
                    num(r["sut_util"], ".2f"),
                    num(r["peak_rss_mib"], ".0f")
                    + ("" if r["peak_pss_mib"] is None else f" (PSS {r['peak_pss_mib']:.0f})"),
                    num(r["sink_cpu_ms_per_msg"], ".2f"),
                    num(r["sink_connections"]),
                    num(r["e2e_vs_postfix"], ".2f") if show_ratio else "",
                    num(r["cpu_vs_postfix"], ".2f") if show_ratio else "",
                )
            )
            + " |"
        )
    return "\n".join(lines)


def halfload_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "system",
        "offered msg/s",
        "accepted msg/s",
        "accept p50/p99 ms",
        "acc→dlv p50/p99 ms",
        "schedule lag p99 ms",
        "SUT CPU ms/msg",
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        if not r["ok"]:
            lines.append(
                f"| {r['system']} | {num(r['rate'])} | FAILED: {r.get('error', '')[:150]} |"
            )
            continue
        lines.append(
            "| "
            + " | ".join(
                (
                    r["system"],
                    num(r["rate"]),
                    num(r["accepted_per_s"]),
                    f"{num(r['acc_p50_ms'], '.1f')} / {num(r['acc_p99_ms'], '.1f')}",
                    f"{num(r['a2d_p50_ms'], '.1f')} / {num(r['a2d_p99_ms'], '.1f')}",
                    num(r["lag_p99_ms"], ".1f"),
                    num(r["sut_cpu_ms_per_msg"], ".2f"),
                )
            )
            + " |"
        )
    return "\n".join(lines)


def verdict(name: str, value: float | None, ok: bool | None, fmt: str, extra: str = "") -> str:
    """One target line: PASS / MISS / n/a, the name, the value (and *extra*)."""
    word = "n/a" if value is None or ok is None else ("PASS" if ok else "MISS")
    return f"- {word:4} {name}: {'-' if value is None else format(value, fmt)}{extra}"


def targets(rows: list[dict[str, Any]], half: list[dict[str, Any]]) -> list[str]:
    by = {(r["system"], r["size"], r["placement"]): r for r in rows if r["mode"] == "pipe"}
    out: list[str] = []

    def check(name: str, value: float | None, ok: bool | None, fmt: str) -> None:
        out.append(verdict(name, value, ok, fmt))

    def g(size: str, place: str, key: str) -> float | None:
        r = by.get(("relay", size, place))
        return None if r is None else r.get(key)

    for name, size, place, key, bound in (
        ("2 KiB per core, delivered msg/s ≥ 2.0 x Postfix", "2k", "percore", "e2e", 2.0),
        ("2 KiB per core, CPU s/msg ≤ 0.5 x Postfix", "2k", "percore", "cpu", 0.5),
        ("2 KiB whole machine, delivered msg/s ≥ 1.5 x Postfix", "2k", "machine", "e2e", 1.5),
        ("100 KiB per core, delivered msg/s ≥ 1.0 x Postfix", "100k", "percore", "e2e", 1.0),
    ):
        v = g(size, place, f"{key}_vs_postfix")
        check(name, v, v is not None and (v >= bound if key == "e2e" else v <= bound), ".2f")
    big = [r for r in rows if r["system"] == "relay" and r["size"] == "10m"]
    if big:
        allok = all(r["ok_reps"] == r["reps"] for r in big)
        out.append(f"- {'PASS' if allok else 'MISS'} 10 MiB: every accepted message delivered")
        rss = max((r["peak_rss_mib"] or 0) for r in big)
        check("10 MiB, relay peak RSS < 400 MiB (4 in flight)", rss, rss < 400, ".0f")
    else:
        check("10 MiB relay rows", None, None, "")
    hr = [r for r in half if r["system"] == "relay" and r["ok"]]
    v = hr[0]["acc_p99_ms"] if hr else None
    check("p99 accept latency at half the relay's max < 50 ms", v, v is not None and v < 50, ".1f")
    return out


def machine_info(cpus: list[int]) -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    pf = subprocess.run(["postconf", "-dh", "mail_version"], capture_output=True, text=True)
    try:
        uv: str | None = importlib.metadata.version("uvloop")
    except importlib.metadata.PackageNotFoundError:
        uv = None
    return {
        "cpu_model": model,
        "cpus": cpus,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postfix": pf.stdout.strip(),
        "uvloop": uv,
        "openssl": __import__("ssl").OPENSSL_VERSION,
    }


def pairs_of(
    results: list[dict[str, Any]], system: str, base: str
) -> dict[tuple[str, str, str], list[tuple[dict[str, Any], dict[str, Any]]]]:
    """(size, placement, mode) -> [(run of *system*, run of *base*) per repetition], good
    runs only, in the order of the size/placement/mode rows."""
    ok = {
        (r["system"], r["size"], r["placement"], r.get("mode", "pipe"), r["rep"]): r
        for r in results
        if r["ok"] and not r.get("rate")
    }
    out: dict[tuple[str, str, str], list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for (sysname, size, place, mode, rep), r in sorted(ok.items(), key=lambda kv: kv[0][4]):
        partner = ok.get((base, size, place, mode, rep))
        if sysname == system and partner is not None:
            out.setdefault((size, place, mode), []).append((r, partner))
    return out


def ratios(pairs: list[tuple[dict[str, Any], dict[str, Any]]], key: str) -> list[float | None]:
    return [ratio(a.get(key), b.get(key)) for a, b in pairs]


def paired(results: list[dict[str, Any]], system: str, base: str) -> list[str]:
    """*system* against *base*, each repetition with its own partner (same size, placement,
    mode and repetition, run back to back): median ratio and its min-max, as only ratios
    from paired runs mean anything on a machine whose speed drifts."""
    lines = ["", f"{system} / {base}, paired per repetition (median, min-max):"]
    for (size, place, mode), pairs in pairs_of(results, system, base).items():
        rate = spread(ratios(pairs, "delivered_per_s"))
        cpu = spread(ratios(pairs, "sut_cpu_ms_per_msg"))
        label = size_label({"size": size, "mode": mode})
        lines.append(
            f"  {label} {place}: delivered msg/s {rate}, CPU per message {cpu}"
            f" ({len(pairs)} pair(s))"
        )
    return lines if len(lines) > 2 else []


def spread(values: list[float | None]) -> str:
    got = sorted(v for v in values if v is not None)
    if not got:
        return "-"
    return f"{statistics.median(got):.2f} x ({got[0]:.2f}-{got[-1]:.2f})"


def cpu_breakdown(results: list[dict[str, Any]]) -> list[str]:
    """Where each SUT's CPU went in its first good 2 KiB run (ms per delivered message,
    by process name; a multi-threaded process split into main thread / other threads)."""
    out = []
    for system in SYSTEMS:
        for place in PLACEMENTS:
            rs = [
                r
                for r in results
                if r["ok"]
                and r["system"] == system
                and r["size"] == "2k"
                and r.get("mode", "pipe") == "pipe"
                and r["placement"] == place
                and not r.get("rate")
                and r.get("sut_cpu_by_name_s")
            ]
            if not rs:
                continue
            r = rs[0]
            parts = [
                f"{name} {1000 * sec / r['delivered']:.2f}"
                for name, sec in list(r["sut_cpu_by_name_s"].items())[:8]
            ]
            out.append(f"- {system} ({place}): " + ", ".join(parts))
            break
    if out:
        out.insert(0, "")
        out.insert(1, "SUT CPU by process/thread, 2 KiB, ms per message (first good run):")
    return out


def progress(i: int, total: int, r: dict[str, Any], started: float) -> None:
    if r["ok"]:
        msg = (
            f"acc {num(r['accepted_per_s'])}/s dlv {num(r['delivered_per_s'])}/s"
            f" p99 {num(r['acc_p99_ms'], '.1f')}ms cpu {num(r['sut_cpu_ms_per_msg'], '.2f')}ms/msg"
        )
    else:
        msg = "FAILED " + r.get("error", "")[:300]
    print(
        f"[{i}/{total} {time.time() - started:4.0f}s] {r['system']:15} {size_label(r):4}"
        f" {r['placement']:7} rep{r['rep']}: {msg}",
        file=sys.stderr,
        flush=True,
    )
