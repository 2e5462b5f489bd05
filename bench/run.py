"""``python -m bench.run`` (``make bench``): tls-relay against Postfix, one table.

For every (repetition, placement, size) the systems run one after the other, never
two at once, in alternating order (reversed on odd repetitions):

    direct           generator -> sink (the harness ceiling)
    postfix          Postfix, smtp_tls_connection_reuse = yes (tlsproxy)
    postfix-noreuse  Postfix, smtp_tls_connection_reuse = no
    relay            tls-relay serve

Each run starts a fresh sink and a fresh SUT (empty queue), sends a 10-message warm-up
(so Postfix's daemons and Python's imports are up), resets the sink, then measures:
generator -> SUT -> sink, until every accepted message is counted at the sink.  A run
in which an accepted message never arrives (bounded drain) fails loudly: the run is
marked FAILED, the table says so and the exit status is 1.

Placements: ``percore`` = SUT pinned to the second CPU (all its processes, via taskset
inheritance, checked by the sampler), generator + sink + this driver on the first CPU;
``machine`` = nothing pinned.

Then the half-load run: the relay (and Postfix, for comparison) at an open-loop offered
load of half the relay's measured maximum accepted rate (2 KiB, per core), reporting
the p99 accept latency.  Results: a Markdown table on stdout and JSON under
``bench/results/``.  CPU and RSS accounting: see bench/procs.py.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import postfix, procs
from bench.systems import PY, ROOT, SUT, PostfixSUT, RelaySUT, Sink, relay_unavailable, taskset

KIB, MIB = 1024, 1024 * 1024
SIZES: dict[str, tuple[int, int, int]] = {  # name -> (bytes, connections, msgs/connection)
    "2k": (2 * KIB, 16, 200),
    "100k": (100 * KIB, 8, 50),
    "10m": (10 * MIB, 4, 2),
}
SYSTEMS = ("direct", "postfix", "postfix-noreuse", "relay", "relay-noaudit", "relay-dane")
PLACEMENTS = ("percore", "machine")
RESULTS = ROOT / "bench" / "results"


class RunFailed(Exception):
    pass


# ---------------------------------------------------------------------------- helpers
def pct(values: list[float], q: float) -> float | None:
    """Percentile with linear interpolation (q in 0..100); None for no data."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def cpu_busy() -> dict[str, float]:
    """Busy CPU seconds so far from /proc/stat: "all" and per CPU ("cpu0", "cpu1", ...)."""
    out = {}
    with open("/proc/stat") as fh:
        for line in fh:
            if not line.startswith("cpu"):
                break
            name, *vals = line.split()
            f = [int(x) for x in vals]
            idle = f[3] + (f[4] if len(f) > 4 else 0)
            out["all" if name == "cpu" else name] = (sum(f[:8]) - idle) / procs.TICK
    return out


def run_loadgen(
    port: int,
    size: int,
    conns: int,
    msgs: int,
    tag: str,
    out: Path,
    cpus: set[int] | None,
    rate: float | None = None,
    timeout: float = 600.0,
) -> dict[str, Any]:
    cmd = [
        PY,
        "-m",
        "bench.loadgen",
        "--port",
        str(port),
        "--conns",
        str(conns),
        "--msgs",
        str(msgs),
        "--size",
        str(size),
        "--run",
        tag,
        "--out",
        str(out),
        "--max-seconds",
        str(timeout),
    ]
    if rate:
        cmd += ["--rate", f"{rate:.3f}"]
    r = subprocess.run(
        taskset(cpus, cmd), cwd=ROOT, capture_output=True, text=True, timeout=timeout + 60
    )
    if r.returncode != 0 or not out.exists():
        raise RunFailed(f"loadgen failed ({r.returncode}): {r.stderr[-2000:]}")
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


def wait_count(sink: Sink, want: int, timeout: float) -> tuple[int, float]:
    """Poll the sink until it counted *want* messages; (count, when) at the end."""
    deadline = time.monotonic() + timeout
    n = sink.count()
    while n < want and time.monotonic() < deadline:
        time.sleep(0.02)
        n = sink.count()
    return n, time.monotonic()


# ---------------------------------------------------------------------------- one run
def run_one(
    ctx: argparse.Namespace,
    system: str,
    size_name: str,
    placement: str,
    rep: int,
    rate: float | None = None,
    n_total: int | None = None,
    profile: bool = False,
) -> dict[str, Any]:
    size, conns, msgs = SIZES[size_name]
    if n_total is not None:
        msgs = max(1, n_total // conns)
    pinned = placement == "percore"
    cpu_h = {ctx.cpus[0]} if pinned else None
    cpu_s = {ctx.cpus[1]} if pinned else None
    label = f"{system}-{size_name}-{placement}-{rep}" + (f"-rate{rate:.0f}" if rate else "")
    wd = Path(tempfile.mkdtemp(prefix=label + "-", dir=ctx.tmp))
    os.chmod(wd, 0o755)  # Postfix daemons (user postfix) must reach their queue below it
    os.sched_setaffinity(0, cpu_h or ctx.all_cpus)
    res: dict[str, Any] = {
        "system": system,
        "size": size_name,
        "bytes": size,
        "placement": placement,
        "rep": rep,
        "conns": conns,
        "msgs_per_conn": msgs,
        "rate": rate,
        "ok": False,
    }
    sink = Sink(ctx.cert, ctx.key, cpu_h, wd)
    stack = contextlib.ExitStack()  # a DNSSEC lab, for relay-dane
    sut: SUT | None = None
    sampler: procs.Sampler | None = None
    spy: subprocess.Popen[bytes] | None = None
    try:
        sink_port = sink.start()
        if system == "direct":
            port = sink_port
        else:
            if system.startswith("postfix"):
                sut = PostfixSUT(wd, sink_port, ctx.cert, ctx.key, system == "postfix", cpu_s)
            elif system == "relay":
                sut = RelaySUT(wd, sink_port, ctx.cert, ctx.key, cpu_s)
            elif system == "relay-noaudit":
                sut = RelaySUT(wd, sink_port, ctx.cert, ctx.key, cpu_s, audit=False)
            elif system == "relay-dane":
                lab = stack.enter_context(dane_lab(wd, sink_port, ctx.cert))
                sut = RelaySUT(wd, sink_port, ctx.cert, ctx.key, cpu_s, dnssec_port=lab.port)
            else:
                raise RunFailed(f"unknown system {system}")
            sut.start()
            port = sut.port
        # warm-up: daemons spawned, imports done, first TLS contexts built
        warm = run_loadgen(port, 2 * KIB, 2, 5, f"warm{rep}", wd / "warm.json", cpu_h, timeout=60)
        got, _ = wait_count(sink, len(warm["messages"]), 20)
        if not warm["messages"] or got < len(warm["messages"]):
            raise RunFailed(
                f"warm-up: {len(warm['messages'])} of 10 accepted, {got} delivered;"
                f" errors {warm['errors'][:3]} rejected {warm['rejected'][:3]}"
            )
        sink.reset()
        root = sut.root_pid if sut else None
        if root:
            sampler = procs.Sampler(root, cpus=cpu_s)
            sampler.start()
            if profile:
                spy = start_pyspy(root, wd, ctx.cpus[0] if pinned else None)
        cpu0 = procs.tree_cpu(root) if root else 0.0
        by0 = procs.breakdown(root) if root else {}
        busy0 = cpu_busy()
        lg = run_loadgen(
            port,
            size,
            conns,
            msgs,
            f"{label}",
            wd / "gen.json",
            cpu_h,
            rate=rate,
            timeout=ctx.run_timeout,
        )
        accepted = {m[0]: m for m in lg["messages"]}
        gen_seconds = lg["t_end"] - lg["t0"]
        drain_timeout = min(max(ctx.drain_timeout, 2 * gen_seconds), 600.0)
        got, t_drained = wait_count(sink, len(accepted), drain_timeout)
        cpu1 = procs.tree_cpu(root) if root else 0.0
        if root:
            res["sut_cpu_by_name_s"] = procs.diff(procs.breakdown(root), by0)
        busy1 = cpu_busy()
        if sampler:
            mem = sampler.stop()
            res["peak_rss_mib"] = mem.rss / MIB
            res["peak_pss_mib"] = mem.pss / MIB
            res["max_procs"] = mem.max_procs
            res["repinned"] = sampler.repinned
            res["sut_procs"] = sorted(set(procs.names(procs.tree(root)).values()))
        if spy is not None:
            res["profile"] = stop_pyspy(spy, wd)
        sk = sink.dump(wd / "sink.json")
        arrivals: dict[str, float] = sk["arrivals"]
        lost = [mid for mid in accepted if mid not in arrivals]
        extra = [mid for mid in arrivals if mid not in accepted]
        acc_lat = [(m[3] - m[2]) * 1000 for m in lg["messages"]]
        a2d = [(arrivals[mid] - m[3]) * 1000 for mid, m in accepted.items() if mid in arrivals]
        t0 = lg["t0"]
        last_acc = max((m[3] for m in lg["messages"]), default=t0)
        last_arr = max((arrivals[mid] for mid in accepted if mid in arrivals), default=t0)
        delivered = len(accepted) - len(lost)
        res.update(
            offered=lg["offered"],
            accepted=len(accepted),
            rejected=len(lg["rejected"]),
            rejected_samples=lg["rejected"][:3],
            gen_errors=lg["errors"][:5],
            delivered=delivered,
            lost=len(lost),
            lost_samples=lost[:5],
            extra_at_sink=len(extra),
            duplicates=sk["duplicates"],
            unknown_at_sink=sk["unknown"],
            accepted_per_s=len(accepted) / (last_acc - t0) if last_acc > t0 else None,
            delivered_per_s=delivered / (last_arr - t0) if last_arr > t0 else None,
            acc_p50_ms=pct(acc_lat, 50),
            acc_p99_ms=pct(acc_lat, 99),
            a2d_p50_ms=pct(a2d, 50),
            a2d_p99_ms=pct(a2d, 99),
            lag_p99_ms=(pct(lg["lag"], 99) or 0) * 1000 if lg["lag"] else None,
            sut_cpu_s=(cpu1 - cpu0) if root else None,
            sut_cpu_ms_per_msg=(cpu1 - cpu0) * 1000 / delivered if root and delivered else None,
            sink_cpu_ms_per_msg=sk["cpu_seconds"] * 1000 / max(len(arrivals), 1),
            gen_cpu_ms_per_msg=lg["cpu_seconds"] * 1000 / max(len(accepted), 1),
            sink_connections=sk["connections"],
            sink_tls_handshakes=sk["tls_handshakes"],
            gen_seconds=gen_seconds,
            e2e_seconds=last_arr - t0,
            drain_seconds=t_drained - lg["t_end"],
            machine_busy_s=busy1["all"] - busy0["all"],
            cpu_busy_s={k: round(busy1[k] - busy0[k], 3) for k in busy1},
            message_bytes=lg["message_bytes"],
            pipelining=lg["pipelining"],
        )
        # CPU used on this machine by anything but SUT, generator and sink during the
        # run (other jobs, the driver): a large value means noisy neighbours.
        res["other_cpu_s"] = (
            res["machine_busy_s"] - (res["sut_cpu_s"] or 0) - lg["cpu_seconds"] - sk["cpu_seconds"]
        )
        if root and res["e2e_seconds"] > 0:
            # CPU-seconds of the SUT per wall second of the run (1.0 = one core saturated)
            res["sut_util"] = (cpu1 - cpu0) / (t_drained - t0)
        if pinned and root:
            # busy time of the SUT's own CPU not spent by the SUT: interference on its core
            res["sut_core_other_s"] = res["cpu_busy_s"][f"cpu{ctx.cpus[1]}"] - (cpu1 - cpu0)
            res["sut_core_busy_frac"] = res["cpu_busy_s"][f"cpu{ctx.cpus[1]}"] / (t_drained - t0)
        problems = []
        if lost:
            problems.append(
                f"LOST {len(lost)} of {len(accepted)} accepted messages: never counted at the"
                f" sink within the {drain_timeout:.0f}s drain (e.g. {lost[:3]})"
            )
        if lg["errors"]:
            problems.append(f"generator errors: {lg['errors'][:3]}")
        if lg["rejected"]:
            problems.append(f"{len(lg['rejected'])} rejected: {lg['rejected'][:2]}")
        if problems:
            raise RunFailed("; ".join(problems))
        res["ok"] = True
    except (RunFailed, RuntimeError, OSError, subprocess.SubprocessError, ValueError) as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"
        if sut is not None:
            res["log_tail"] = sut.log_tail()
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        try:
            if sut is not None:
                sut.stop()
        finally:
            sink.stop()
            stack.close()
            os.sched_setaffinity(0, ctx.all_cpus)
        if res["ok"] and not ctx.keep:
            shutil.rmtree(wd, ignore_errors=True)
        else:
            res["workdir"] = str(wd)
    return res


def dane_lab(wd: Path, sink_port: int, cert: Path) -> contextlib.AbstractContextManager[Any]:
    """A DNSSEC lab (nsd + validating unbound, tests/fixtures/dnssec.py) where bench.test's
    MX is the sink, with a DANE-EE TLSA record for the sink's certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from tests.fixtures.dnssec import running_lab

    leaf = x509.load_pem_x509_certificates(cert.read_bytes())[0]
    spki = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    records = [
        "bench.test. 300 IN MX 10 mx.bench.test.",
        "mx.bench.test. 300 IN A 127.0.0.1",
        f"_{sink_port}._tcp.mx.bench.test. 300 IN TLSA 3 1 1 {hashlib.sha256(spki).hexdigest()}",
    ]
    (wd / "dnssec").mkdir()
    return running_lab(wd / "dnssec", secure=records)


# ---------------------------------------------------------------------------- py-spy
def start_pyspy(pid: int, wd: Path, cpu: int | None) -> subprocess.Popen[bytes] | None:
    exe = Path(PY).parent / "py-spy"
    if not exe.exists():
        return None
    cmd = [
        str(exe),
        "record",
        "--pid",
        str(pid),
        "--format",
        "raw",
        "--rate",
        "100",
        "--nonblocking",
        "--subprocesses",
        "--output",
        str(wd / "pyspy.txt"),
    ]
    return subprocess.Popen(
        taskset({cpu} if cpu is not None else None, cmd),
        stdout=subprocess.DEVNULL,
        stderr=open(wd / "pyspy.err", "wb"),
        start_new_session=True,
    )


def stop_pyspy(spy: subprocess.Popen[bytes], wd: Path) -> dict[str, Any]:
    import signal

    try:
        os.killpg(spy.pid, signal.SIGINT)
        spy.wait(30)
    except (OSError, subprocess.TimeoutExpired):
        spy.kill()
    return summarize_pyspy(wd / "pyspy.txt")


def summarize_pyspy(path: Path, top: int = 25) -> dict[str, Any]:
    """Collapsed stacks -> share of samples per leaf function (self) and per function
    anywhere on the stack (total)."""
    self_c: dict[str, int] = {}
    total_c: dict[str, int] = {}
    kind_c: dict[str, int] = {}
    n = 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {"error": f"no py-spy output at {path}"}
    for line in lines:
        stack, _, count = line.rpartition(" ")
        try:
            c = int(count)
        except ValueError:
            continue
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        n += c
        kind = (
            "event loop thread"
            if any("run_forever" in f for f in frames)
            else "executor threads"
            if any("concurrent/futures/thread.py" in f for f in frames)
            else "other"
        )
        kind_c[kind] = kind_c.get(kind, 0) + c
        leaf = frames[-1]
        self_c[leaf] = self_c.get(leaf, 0) + c
        for f in set(frames[1:]):  # skip the thread/process root frame
            total_c[f] = total_c.get(f, 0) + c

    def share(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / n, 1)) for k, v in sorted(d.items(), key=lambda x: -x[1])[:top]]

    return {
        "samples": n,
        "by_thread_pct": share(kind_c),
        "self_pct": share(self_c),
        "total_pct": share(total_c),
        "raw": str(path),
    }


# ---------------------------------------------------------------------------- output
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
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in results:
        if r.get("rate"):
            continue
        groups.setdefault((r["system"], r["size"], r["placement"]), []).append(r)
    rows = []
    for (system, size, placement), rs in groups.items():
        ok = [r for r in rs if r["ok"]]
        row: dict[str, Any] = {
            "system": system,
            "size": size,
            "placement": placement,
            "reps": len(rs),
            "ok_reps": len(ok),
            "failed": [r.get("error", "") for r in rs if not r["ok"]],
        }
        for k in keys:
            row[k] = median(ok, k)
        row["delivered_per_s_all"] = [r.get("delivered_per_s") for r in ok]
        rows.append(row)
    by = {(r["system"], r["size"], r["placement"]): r for r in rows}
    for r in rows:
        pf = by.get(("postfix", r["size"], r["placement"]))
        r["e2e_vs_postfix"] = _ratio(r.get("delivered_per_s"), pf and pf.get("delivered_per_s"))
        r["acc_vs_postfix"] = _ratio(r.get("accepted_per_s"), pf and pf.get("accepted_per_s"))
        r["cpu_vs_postfix"] = _ratio(
            r.get("sut_cpu_ms_per_msg"), pf and pf.get("sut_cpu_ms_per_msg")
        )
    order = {s: i for i, s in enumerate(SYSTEMS)}
    rows.sort(
        key=lambda r: (
            list(SIZES).index(r["size"]),
            PLACEMENTS.index(r["placement"]),
            order.get(r["system"], 99),
        )
    )
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _f(v: float | None, fmt: str = ".0f") -> str:
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
                f"| {r['system']} | {r['size']} | {r['placement']} | FAILED: "
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
                    r["size"],
                    r["placement"],
                    _f(r["accepted_per_s"]),
                    _f(r["delivered_per_s"]),
                    f"{_f(r['acc_p50_ms'], '.1f')} / {_f(r['acc_p99_ms'], '.1f')}",
                    f"{_f(r['a2d_p50_ms'], '.1f')} / {_f(r['a2d_p99_ms'], '.1f')}",
                    _f(r["sut_cpu_ms_per_msg"], ".2f"),
                    _f(r["sut_util"], ".2f"),
                    _f(r["peak_rss_mib"], ".0f")
                    + ("" if r["peak_pss_mib"] is None else f" (PSS {r['peak_pss_mib']:.0f})"),
                    _f(r["sink_cpu_ms_per_msg"], ".2f"),
                    _f(r["sink_connections"]),
                    _f(r["e2e_vs_postfix"], ".2f") if show_ratio else "",
                    _f(r["cpu_vs_postfix"], ".2f") if show_ratio else "",
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
                f"| {r['system']} | {_f(r['rate'])} | FAILED: {r.get('error', '')[:150]} |"
            )
            continue
        lines.append(
            "| "
            + " | ".join(
                (
                    r["system"],
                    _f(r["rate"]),
                    _f(r["accepted_per_s"]),
                    f"{_f(r['acc_p50_ms'], '.1f')} / {_f(r['acc_p99_ms'], '.1f')}",
                    f"{_f(r['a2d_p50_ms'], '.1f')} / {_f(r['a2d_p99_ms'], '.1f')}",
                    _f(r["lag_p99_ms"], ".1f"),
                    _f(r["sut_cpu_ms_per_msg"], ".2f"),
                )
            )
            + " |"
        )
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]], half: list[dict[str, Any]]) -> list[str]:
    by = {(r["system"], r["size"], r["placement"]): r for r in rows}
    out = []

    def check(name: str, value: float | None, ok: bool | None, fmt: str) -> None:
        verdict = "n/a" if value is None or ok is None else ("PASS" if ok else "MISS")
        out.append(f"- {verdict:4} {name}: {'-' if value is None else format(value, fmt)}")

    def g(size: str, place: str, key: str) -> float | None:
        r = by.get(("relay", size, place))
        return None if r is None else r.get(key)

    v = g("2k", "percore", "e2e_vs_postfix")
    check("2 KiB per core, delivered msg/s ≥ 2.0 x Postfix", v, v and v >= 2.0, ".2f")
    v = g("2k", "percore", "cpu_vs_postfix")
    check("2 KiB per core, CPU s/msg ≤ 0.5 x Postfix", v, v is not None and v <= 0.5, ".2f")
    v = g("2k", "machine", "e2e_vs_postfix")
    check("2 KiB whole machine, delivered msg/s ≥ 1.5 x Postfix", v, v and v >= 1.5, ".2f")
    v = g("100k", "percore", "e2e_vs_postfix")
    check("100 KiB per core, delivered msg/s ≥ 1.0 x Postfix", v, v and v >= 1.0, ".2f")
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
        import uvloop

        uv = uvloop.__version__
    except ImportError:
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


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--sizes", default="2k,100k,10m", help="comma list of 2k,100k,10m")
    p.add_argument("--placements", default="percore,machine")
    p.add_argument(
        "--systems",
        default="auto",
        help="comma list of direct,postfix,postfix-noreuse,relay; auto = all that"
        " are available (relay only once tls-relay serve delivers)",
    )
    p.add_argument("--quick", action="store_true", help="= --reps 1 --sizes 2k")
    p.add_argument("--no-halfload", action="store_true")
    p.add_argument(
        "--profile",
        action="store_true",
        help="extra relay 2k run under py-spy (not in the table); top functions",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="min seconds to wait for accepted mail at the sink (≥ 2x send time)",
    )
    p.add_argument("--run-timeout", type=float, default=300.0, help="bound on one load run")
    p.add_argument("--keep", action="store_true", help="keep every run's work directory")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.sizes = 1, "2k"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    placements = [s for s in args.placements.split(",") if s]
    for s in sizes:
        if s not in SIZES:
            sys.exit(f"unknown size {s!r} (choose from {', '.join(SIZES)})")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 and "percore" in placements:
        print("only one CPU: skipping the per-core placement", file=sys.stderr)
        placements = [p for p in placements if p != "percore"]
    args.cpus = cpus[:1] + cpus[-1:] if len(cpus) >= 2 else cpus * 2
    args.all_cpus = set(cpus)

    skipped: dict[str, str] = {}
    systems = list(SYSTEMS) if args.systems == "auto" else [s for s in args.systems.split(",") if s]
    why = postfix.available()
    if why:
        for s in ("postfix", "postfix-noreuse"):
            if s in systems:
                systems.remove(s)
                skipped[s] = why
    for name in ("relay", "relay-noaudit", "relay-dane"):
        why = relay_unavailable(dnssec=name == "relay-dane")
        if name in systems and why:
            systems.remove(name)
            skipped[name] = why
    args.tmp = Path(tempfile.mkdtemp(prefix="tls-relay-bench-"))
    os.chmod(args.tmp, 0o755)
    started = time.time()
    results: list[dict[str, Any]] = []
    half: list[dict[str, Any]] = []
    profile: dict[str, Any] | None = None
    try:
        args.cert, args.key = make_cert(args.tmp / "certs")
        if "relay" in systems and args.systems == "auto":
            probe = run_one(args, "relay", "2k", placements[0], -1, n_total=16)
            if not probe["ok"]:
                skipped["relay"] = "probe run failed: " + probe.get("error", "?")[:300]
                systems.remove("relay")
                print(f"relay skipped: {skipped['relay']}", file=sys.stderr)
        for s, why in skipped.items():
            print(f"skipping {s}: {why}", file=sys.stderr)
        total = args.reps * len(placements) * len(sizes) * len(systems)
        i = 0
        for rep in range(args.reps):
            order = systems if rep % 2 == 0 else systems[::-1]
            for placement in placements:
                for size in sizes:
                    for system in order:
                        i += 1
                        r = run_one(args, system, size, placement, rep)
                        results.append(r)
                        progress(i, total, r, started)
        if not args.no_halfload and "2k" in sizes:
            half = halfload(args, results, systems, placements, started)
        if args.profile and "relay" in systems:
            pr = run_one(args, "relay", "2k", placements[0], 99, profile=True)
            profile = pr.get("profile") or {"error": pr.get("error")}
    finally:
        if not args.keep and all(r["ok"] for r in results + half):
            shutil.rmtree(args.tmp, ignore_errors=True)
    rows = aggregate(results)
    info = machine_info(cpus)
    text = [
        f"## tls-relay vs Postfix ({dt.date.today()}, {info['cpu_model']}, {len(cpus)} CPUs,"
        f" Python {info['python']}, Postfix {info['postfix']}, uvloop {info['uvloop']})",
        "",
        f"Median of {args.reps} repetition(s). Sizes: 2k = 16 conns x 200 msgs, 100k = 8 x 50,"
        " 10m = 4 x 2. percore: SUT on one CPU, generator+sink on the other; machine: unpinned.",
        "",
        table(rows),
    ]
    if half:
        text += [
            "",
            "Half load (open loop, 2 KiB, per core; rate = ½ of the relay's max accepted"
            " msg/s, or Postfix's when the relay was not run):",
            "",
            halfload_table(half),
        ]
    text += ["", "Targets (issue 5):", *targets(rows, half)]
    text += cpu_breakdown(results)
    if skipped:
        text += ["", *(f"Skipped {s}: {w}" for s, w in skipped.items())]
    failed = [r for r in results + half if not r["ok"]]
    noisy = [r for r in results if r["ok"] and r.get("other_cpu_s", 0) > 0.15 * r["e2e_seconds"]]
    if noisy:
        text += [
            "",
            f"Note: {len(noisy)} run(s) saw other CPU load > 15% of a core"
            " (other jobs on the machine); see other_cpu_s in the JSON.",
        ]
    text += paired(results, "relay-dane", "relay")
    text += paired(results, "relay", "relay-noaudit")
    if profile:
        text += [
            "",
            "py-spy, relay 2 KiB (wall-clock samples of non-idle threads; fsync counts):",
            "  " + ", ".join(f"{k} {p:.0f}%" for k, p in profile.get("by_thread_pct", [])),
            *(f"  {p:5.1f}%  {f}" for f, p in profile.get("self_pct", [])[:15]),
        ]
    print("\n".join(text))
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    doc = {
        "machine": info,
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
        "runs": results,
        "halfload": half,
        "profile": profile,
        "skipped": skipped,
        "table": "\n".join(text),
        "wall_seconds": time.time() - started,
    }
    path = args.out / f"bench-{stamp}.json"
    path.write_text(json.dumps(doc, indent=1, default=str))
    (args.out / "latest.md").write_text("\n".join(text) + "\n")
    print(f"\nJSON: {path}  ({time.time() - started:.0f}s)")
    if failed:
        print("\nFAILED RUNS:", file=sys.stderr)
        for r in failed:
            print(
                f"  {r['system']} {r['size']} {r['placement']} rep {r['rep']}: {r['error']}"
                f"\n    work dir kept: {r.get('workdir')}",
                file=sys.stderr,
            )
        return 1
    return 0


def paired(results: list[dict[str, Any]], system: str, base: str) -> list[str]:
    """*system* against *base*, each repetition with its own partner (same size, placement
    and repetition, run back to back): median ratio and its min-max, as only ratios from
    paired runs mean anything on a machine whose speed drifts."""
    ok = {
        (r["system"], r["size"], r["placement"], r["rep"]): r
        for r in results
        if r["ok"] and not r.get("rate")
    }
    lines = ["", f"{system} / {base}, paired per repetition (median, min-max):"]
    for size in SIZES:
        for place in PLACEMENTS:
            pairs = [
                (ok[(system, size, place, rep)], ok[(base, size, place, rep)])
                for (sysname, sz, pl, rep) in ok
                if (sysname, sz, pl) == (system, size, place) and (base, size, place, rep) in ok
            ]
            if not pairs:
                continue
            rate = [_ratio(a["delivered_per_s"], b["delivered_per_s"]) for a, b in pairs]
            cpu = [_ratio(a["sut_cpu_ms_per_msg"], b["sut_cpu_ms_per_msg"]) for a, b in pairs]
            lines.append(
                f"  {size} {place}: delivered msg/s {_spread(rate)}, CPU per message "
                f"{_spread(cpu)} ({len(pairs)} pair(s))"
            )
    return lines if len(lines) > 2 else []


def _spread(values: list[float | None]) -> str:
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
            f"acc {_f(r['accepted_per_s'])}/s dlv {_f(r['delivered_per_s'])}/s"
            f" p99 {_f(r['acc_p99_ms'], '.1f')}ms cpu {_f(r['sut_cpu_ms_per_msg'], '.2f')}ms/msg"
        )
    else:
        msg = "FAILED " + r.get("error", "")[:300]
    print(
        f"[{i}/{total} {time.time() - started:4.0f}s] {r['system']:15} {r['size']:4}"
        f" {r['placement']:7} rep{r['rep']}: {msg}",
        file=sys.stderr,
        flush=True,
    )


def halfload(
    args: argparse.Namespace,
    results: list[dict[str, Any]],
    systems: list[str],
    placements: list[str],
    started: float,
) -> list[dict[str, Any]]:
    place = "percore" if "percore" in placements else placements[0]
    base = "relay" if "relay" in systems else "postfix"
    maxes = [
        r["accepted_per_s"]
        for r in results
        if r["ok"] and r["system"] == base and r["size"] == "2k" and r["placement"] == place
    ]
    if not maxes:
        return []
    rate = statistics.median(maxes) / 2
    n = int(min(3200, max(320, rate * 10)))
    out = []
    for system in [s for s in ("relay", "postfix") if s in systems]:
        r = run_one(args, system, "2k", place, 0, rate=rate, n_total=n)
        r["rate_basis"] = base
        out.append(r)
        progress(len(out), 2, r, started)
    return out


def make_cert(out: Path) -> tuple[Path, Path]:
    """ECDSA P-256 via ``tls-relay gen-cert`` (the relay's own), else cryptography."""
    out.mkdir(parents=True, exist_ok=True)
    exe = Path(PY).parent / "tls-relay"
    if exe.exists():
        r = subprocess.run(
            [str(exe), "gen-cert", "--hostname", "localhost", "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if r.returncode == 0 and (out / "cert.pem").exists():
            return out / "cert.pem", out / "key.pem"
    return self_signed(out)


def self_signed(out: Path) -> tuple[Path, Path]:
    """ECDSA P-256 self-signed pair for localhost, written to *out*."""
    out.mkdir(parents=True, exist_ok=True)
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
        .sign(key, hashes.SHA256())
    )
    (out / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(out / "key.pem", 0o600)
    return out / "cert.pem", out / "key.pem"


if __name__ == "__main__":
    sys.exit(main())
