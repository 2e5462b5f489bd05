"""``python -m bench.run`` (``make bench``): tls-relay against Postfix, one report.

Scenarios (``--scenarios``, default all four; ``--quick`` = the table only):

table   For every (repetition, placement, size) the systems run one after the other,
        never two at once, in alternating order (reversed on odd repetitions):
            direct           generator -> sink (the harness ceiling)
            postfix          Postfix, smtp_tls_connection_reuse = yes (tlsproxy)
            postfix-noreuse  Postfix, smtp_tls_connection_reuse = no
            relay            tls-relay serve (also relay-noaudit, relay-dane)
        then the half-load run: relay and Postfix at an open-loop offered load of half
        the relay's measured maximum accepted rate (2 KiB, per core), p99 accept latency.
modes   2 KiB per core in each client mode (bench.modes: pipelining generator, and a
        non-pipelining generator with a sink without PIPELINING), relay and Postfix
        paired per repetition (``--mode-reps``, at least 3), ratios median (min-max).
memory  peak PSS of the SUT with 8 x 2 messages of 20 MiB against 8 x 2 of 100 KiB
        (bench.memory), relay and Postfix.
shapes  4 clients x one message of a hard shape (short lines, huge header block, header
        only) while a probe session sends NOOP every 10 ms (bench.shapes), relay only.

Each run starts a fresh sink and a fresh SUT (empty queue), sends a 10-message warm-up,
resets the sink, then measures: generator -> SUT -> sink, until every accepted message
is counted at the sink (bench.runone).  A run in which an accepted message never
arrives (bounded drain) fails loudly: the run is marked FAILED, the report says so and
the exit status is 1.  Placements: ``percore`` = SUT pinned to the second CPU (all its
processes, via taskset inheritance, checked by the sampler), generator + sink + probe +
this driver on the first CPU; ``machine`` = nothing pinned.  The modes, memory and
shapes scenarios run per core (on the whole machine when there is one CPU).
Results: Markdown on stdout and ``bench/results/latest.md``, JSON under ``bench/results/``.
CPU and memory accounting: see bench/procs.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import memory, modes, postfix, report, shapes
from bench.certs import make_cert
from bench.loads import MIB, MODES, SIZES, SYSTEMS
from bench.runone import run_one
from bench.systems import ROOT, relay_unavailable

RESULTS = ROOT / "bench" / "results"
SCENARIOS = ("table", "modes", "memory", "shapes")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--scenarios", default=None, help=f"comma list of {','.join(SCENARIOS)}")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--sizes", default="2k,100k,10m", help="comma list of 2k,100k,10m")
    p.add_argument("--placements", default="percore,machine")
    p.add_argument(
        "--systems",
        default="auto",
        help="comma list of direct,postfix,postfix-noreuse,relay,relay-noaudit,relay-dane;"
        " auto = all that are available (relay only once tls-relay serve delivers)",
    )
    p.add_argument("--quick", action="store_true", help="= --reps 1 --sizes 2k --scenarios table")
    p.add_argument("--no-halfload", action="store_true")
    p.add_argument("--modes", default="pipe,nopipe", help=f"comma list of {','.join(MODES)}")
    p.add_argument("--mode-reps", type=int, default=3, help="paired repetitions per mode")
    p.add_argument("--memory-systems", default="relay,postfix")
    p.add_argument("--shapes", default=",".join(shapes.DEFAULT), help="see bench/shapes.py")
    p.add_argument("--shape-conns", type=int, default=4, help="clients per shape, 1 message each")
    p.add_argument("--scale", type=float, default=1.0, help="message sizes of memory/shapes")
    p.add_argument("--pss-cap-mib", type=float, default=None, help="kill a SUT above this PSS")
    p.add_argument(
        "--relay-path",
        type=Path,
        default=None,
        help="run tls-relay serve with the relay package from this directory (its"
        " PYTHONPATH), e.g. `git archive REV relay | tar -x -C DIR`: a baseline",
    )
    p.add_argument("--profile", action="store_true", help="extra relay run under py-spy")
    p.add_argument("--profile-size", default="2k", help="its message size (as --sizes)")
    p.add_argument(
        "--profile-msgs", type=int, default=None, help="messages per connection of that run"
    )
    p.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--profile-native", action="store_true", help="py-spy --native: C frames too")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="min s to wait at the sink")
    p.add_argument("--run-timeout", type=float, default=300.0, help="bound on one load run")
    p.add_argument("--keep", action="store_true", help="keep every run's work directory")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.sizes = 1, "2k"
        args.scenarios = args.scenarios or "table"
    if args.relay_path:
        args.relay_path = args.relay_path.resolve()
    args.scenarios = [s for s in (args.scenarios or ",".join(SCENARIOS)).split(",") if s]
    args.modes = [m for m in args.modes.split(",") if m]
    for name, got, known in (
        ("scenario", args.scenarios, SCENARIOS),
        ("mode", args.modes, MODES),
        ("size", args.sizes.split(","), SIZES),
        ("shape", args.shapes.split(","), shapes.SHAPES),
    ):
        if bad := [x for x in got if x and x not in known]:
            p.error(f"unknown {name} {bad} (choose from {', '.join(known)})")
    return args


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 4096 * MIB


def prepare(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """CPUs, placements, work dir, certificate; the systems to run and those skipped."""
    cpus = sorted(os.sched_getaffinity(0))
    args.placements = [s for s in args.placements.split(",") if s]
    if len(cpus) < 2 and "percore" in args.placements:
        print("only one CPU: skipping the per-core placement", file=sys.stderr)
        args.placements = [p for p in args.placements if p != "percore"] or ["machine"]
    args.cpus = cpus[:1] + cpus[-1:] if len(cpus) >= 2 else cpus * 2
    args.all_cpus = set(cpus)
    args.place = "percore" if "percore" in args.placements else args.placements[0]
    cap = args.pss_cap_mib * MIB if args.pss_cap_mib else min(8192 * MIB, 0.6 * mem_available())
    args.pss_cap = int(cap)
    skipped: dict[str, str] = {}
    auto = args.systems == "auto"
    systems = list(SYSTEMS) if auto else [s for s in args.systems.split(",") if s]
    why = postfix.available()
    for s in ("postfix", "postfix-noreuse"):
        if why and s in systems:
            systems.remove(s)
            skipped[s] = why
    for name in ("relay", "relay-noaudit", "relay-dane"):
        why = relay_unavailable(dnssec=name == "relay-dane")
        if name in systems and why:
            systems.remove(name)
            skipped[name] = why
    if args.relay_path and not (args.relay_path / "relay" / "__init__.py").exists():
        sys.exit(f"--relay-path {args.relay_path}: no relay/__init__.py there")
    args.tmp = Path(tempfile.mkdtemp(prefix="tls-relay-bench-"))
    os.chmod(args.tmp, 0o755)
    args.cert, args.key = make_cert(args.tmp / "certs")
    if "relay" in systems and auto:
        probe = run_one(args, "relay", dataclasses.replace(SIZES["2k"], msgs=1), args.place, -1)
        if not probe["ok"]:
            skipped["relay"] = "probe run failed: " + probe.get("error", "?")[:300]
            systems.remove("relay")
    for s, why in skipped.items():
        print(f"skipping {s}: {why}", file=sys.stderr)
    return systems, skipped


def table_runs(
    args: argparse.Namespace, systems: list[str], started: float
) -> list[dict[str, Any]]:
    sizes = [s for s in args.sizes.split(",") if s]
    total = args.reps * len(args.placements) * len(sizes) * len(systems)
    results: list[dict[str, Any]] = []
    for rep in range(args.reps):
        order = systems if rep % 2 == 0 else systems[::-1]
        for placement in args.placements:
            for size in sizes:
                for system in order:
                    r = run_one(args, system, SIZES[size], placement, rep)
                    results.append(r)
                    report.progress(len(results), total, r, started)
    return results


def halfload(
    args: argparse.Namespace, results: list[dict[str, Any]], systems: list[str], started: float
) -> list[dict[str, Any]]:
    place, base = args.place, "relay" if "relay" in systems else "postfix"
    maxes = [
        r["accepted_per_s"]
        for r in results
        if r["ok"]
        and r["system"] == base
        and r["size"] == "2k"
        and r["mode"] == "pipe"
        and r["placement"] == place
    ]
    if not maxes:
        return []
    rate = statistics.median(maxes) / 2
    n = int(min(3200, max(320, rate * 10)))
    load = dataclasses.replace(SIZES["2k"], msgs=max(1, n // SIZES["2k"].conns))
    out = []
    for system in [s for s in ("relay", "postfix") if s in systems]:
        r = run_one(args, system, load, place, 0, rate=rate)
        r["rate_basis"] = base
        out.append(r)
        report.progress(len(out), 2, r, started)
    return out


def execute(args: argparse.Namespace, systems: list[str], started: float) -> dict[str, Any]:
    """Every scenario asked for; their runs by kind."""
    out: dict[str, Any] = {"runs": [], "halfload": [], "memory": [], "shapes": []}
    out["profile"] = None
    sc, place = args.scenarios, args.place
    if "table" in sc:
        out["runs"] = table_runs(args, systems, started)
        if not args.no_halfload and "2k" in args.sizes.split(","):
            out["halfload"] = halfload(args, out["runs"], systems, started)
    if "modes" in sc and {"relay", "postfix"} <= set(systems):
        out["runs"] += modes.run(args, out["runs"], place, started)
    if "memory" in sc:
        mem_systems = [s for s in args.memory_systems.split(",") if s in systems]
        out["memory"] = memory.run(args, mem_systems, place, started)
    if "shapes" in sc and "relay" in systems:
        out["shapes"] = shapes.run(args, args.shapes.split(","), place, started)
    if args.profile and "relay" in systems:
        load = SIZES[args.profile_size]
        load = dataclasses.replace(load, msgs=args.profile_msgs or load.msgs)
        pr = run_one(args, "relay", load, place, 99, profile=True)
        out["profile"] = pr.get("profile") or {"error": pr.get("error")}
    return out


def render(args: argparse.Namespace, got: dict[str, Any], info: dict[str, Any]) -> list[str]:
    rows, half, results = report.aggregate(got["runs"]), got["halfload"], got["runs"]
    text = [
        f"## tls-relay vs Postfix ({dt.date.today()}, {info['cpu_model']},"
        f" {len(info['cpus'])} CPUs, Python {info['python']}, Postfix {info['postfix']},"
        f" uvloop {info['uvloop']})",
        "",
        "Load average (1/5/15 min) at the start {} and at the end {}.".format(*got["loadavg"]),
    ]
    if args.relay_path:
        text += ["", f"tls-relay run from {args.relay_path} (--relay-path)."]
    if rows:
        reps = max(r["reps"] for r in rows)
        text += [
            "",
            f"Median of {reps} repetition(s). Sizes: "
            + ", ".join(f"{k} = {v.conns} conns x {v.msgs} msgs" for k, v in SIZES.items())
            + ". percore: SUT on one CPU, generator+sink on the other; machine: unpinned."
            " The sink offers PIPELINING and CHUNKING (as Postfix and Exim do); 'nopipe':"
            " non-pipelining generator, sink without PIPELINING and CHUNKING.",
            "",
            report.table(rows),
        ]
    if half:
        text += [
            "",
            "Half load (open loop, 2 KiB, per core; rate = ½ of the relay's max accepted"
            " msg/s, or Postfix's when the relay was not run):",
            "",
            report.halfload_table(half),
        ]
    if rows:
        text += ["", "Targets (issue 5):", *report.targets(rows, half)]
        text += report.cpu_breakdown(results)
    text += notes(got, results)
    text += modes.report(results, args.place) if "modes" in args.scenarios else []
    text += memory.report(got["memory"], args.place)
    text += shapes.report(got["shapes"], args.place)
    return text + pyspy_lines(got["profile"], args.profile_size)


def notes(got: dict[str, Any], results: list[dict[str, Any]]) -> list[str]:
    text = [""] + [f"Skipped {s}: {w}" for s, w in got["skipped"].items()]
    noisy = [r for r in results if r["ok"] and r.get("other_cpu_s", 0) > 0.15 * r["e2e_seconds"]]
    if noisy:
        text.append(
            f"Note: {len(noisy)} run(s) saw other CPU load > 15% of a core"
            " (other jobs on the machine); see other_cpu_s in the JSON."
        )
    text += report.paired(results, "relay-dane", "relay")
    text += report.paired(results, "relay", "relay-noaudit")
    return text if len(text) > 1 else []


def pyspy_lines(profile: dict[str, Any] | None, size: str) -> list[str]:
    if not profile:
        return []
    return [
        "",
        f"py-spy, relay {size} (wall-clock samples of non-idle threads; fsync counts):",
        "  " + ", ".join(f"{k} {p:.0f}%" for k, p in profile.get("by_thread_pct", [])),
        *(f"  {p:5.1f}%  {f}" for f, p in profile.get("self_pct", [])[:15]),
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    load0 = os.getloadavg()
    got: dict[str, Any] = {"runs": [], "halfload": [], "memory": [], "shapes": []}
    try:
        systems, skipped = prepare(args)
        got.update(execute(args, systems, started))
    finally:
        every = got["runs"] + got["halfload"] + got["memory"] + got["shapes"]
        if not args.keep and all(r["ok"] for r in every):
            shutil.rmtree(args.tmp, ignore_errors=True)
    got["skipped"] = skipped
    got["loadavg"] = [" / ".join(f"{x:.2f}" for x in la) for la in (load0, os.getloadavg())]
    info = report.machine_info(sorted(args.all_cpus))
    text = render(args, got, info)
    print("\n".join(text))
    path = save(args, got, info, text, started)
    print(f"\nJSON: {path}  ({time.time() - started:.0f}s)")
    failed = [r for r in every if not r["ok"]]
    for r in failed:
        print(
            f"FAILED: {r['system']} {report.size_label(r)} {r['placement']} rep {r['rep']}:"
            f" {r['error']}\n    work dir kept: {r.get('workdir')}",
            file=sys.stderr,
        )
    return 1 if failed else 0


def save(
    args: argparse.Namespace,
    got: dict[str, Any],
    info: dict[str, Any],
    text: list[str],
    started: float,
) -> Path:
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    doc = {
        "machine": info,
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": report.aggregate(got["runs"]),
        **got,
        "table": "\n".join(text),
        "wall_seconds": time.time() - started,
    }
    path: Path = args.out / f"bench-{stamp}.json"
    path.write_text(json.dumps(doc, indent=1, default=str))
    (args.out / "latest.md").write_text("\n".join(text) + "\n")
    return path


if __name__ == "__main__":
    sys.exit(main())
