"""One benchmark run: fresh sink + fresh system under test, warm-up, measured load, drain.

Role: ``run_one(ctx, system, load, placement, rep)`` -> a dict of per-run figures (the
JSON's ``runs``).  Steps: start the sink (without PIPELINING for the ``nopipe`` mode) and
the SUT, pinned for ``percore``; a 10-message warm-up that must be delivered; sink reset;
then, with the memory sampler (bench.procs, and the optional NOOP probe, bench.probe,
and py-spy) running, the load generator; then wait until every accepted Message-ID is
counted at the sink (bounded drain); stop everything.  A run in which an accepted
message never arrives fails loudly (``ok`` false, ``error`` says why).
Not: the order of runs or the report (bench.run, bench.report).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import procs, pyspy
from bench.loads import MIB, Load
from bench.probe import Probe
from bench.probe import summarize as summarize_probe
from bench.report import pct
from bench.systems import PY, ROOT, SUT, PostfixSUT, RelaySUT, Sink, dane_lab, taskset

WARM = Load("warm", 2048, 2, 5)


class RunFailed(Exception):
    pass


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
    load: Load,
    tag: str,
    out: Path,
    cpus: set[int] | None,
    rate: float | None = None,
    timeout: float = 600.0,
) -> dict[str, Any]:
    cmd = [PY, "-m", "bench.loadgen", "--port", str(port), "--run", tag, "--out", str(out)]
    cmd += ["--conns", str(load.conns), "--msgs", str(load.msgs), "--size", str(load.size)]
    cmd += ["--shape", load.shape, "--data-timeout", str(load.data_timeout)]
    cmd += ["--max-seconds", str(timeout)]
    if not load.client_pipelining:
        cmd.append("--no-pipelining")
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


def outcomes(lg: dict[str, Any]) -> dict[str, int]:
    """How the generator's messages ended: reply code -> count ("error" for a session
    that broke off)."""
    codes = collections.Counter("250" for _ in lg["messages"])
    codes.update(str(r[2])[:3] if str(r[2])[:3].isdigit() else "other" for r in lg["rejected"])
    if lg["errors"]:
        codes["error"] += lg["offered"] - sum(codes.values())
    return dict(codes)


class Run:
    """One run; ``execute()`` never raises for a failed run (the result says so)."""

    def __init__(
        self,
        ctx: argparse.Namespace,
        system: str,
        load: Load,
        placement: str,
        rep: int,
        rate: float | None = None,
        profile: bool = False,
    ) -> None:
        self.ctx, self.system, self.load, self.rate, self.profile = ctx, system, load, rate, profile
        pinned = placement == "percore"
        self.cpu_h = {ctx.cpus[0]} if pinned else None
        self.cpu_s = {ctx.cpus[1]} if pinned else None
        label = f"{system}-{load.name}-{load.mode}-{placement}-{rep}"
        self.label = label + (f"-rate{rate:.0f}" if rate else "")
        self.wd = Path(tempfile.mkdtemp(prefix=self.label + "-", dir=ctx.tmp))
        os.chmod(self.wd, 0o755)  # Postfix daemons (user postfix) must reach their queue
        self.res: dict[str, Any] = {
            "system": system,
            "size": load.name,
            "bytes": load.size,
            "shape": load.shape,
            "mode": load.mode,
            "placement": placement,
            "rep": rep,
            "conns": load.conns,
            "msgs_per_conn": load.msgs,
            "rate": rate,
            "ok": False,
        }
        self.sink = Sink(
            ctx.cert, ctx.key, self.cpu_h, self.wd, load.sink_pipelining, load.sink_chunking
        )
        self.stack = contextlib.ExitStack()  # a DNSSEC lab, for relay-dane
        self.sut: SUT | None = None
        self.sampler: procs.Sampler | None = None
        self.probe: Probe | None = None
        self.spy: subprocess.Popen[bytes] | None = None

    def execute(self) -> dict[str, Any]:
        os.sched_setaffinity(0, self.cpu_h or self.ctx.all_cpus)
        try:
            port = self._start()
            self._warmup(port)
            self._measure(port)
            self.res["ok"] = True
        except (RunFailed, RuntimeError, OSError, subprocess.SubprocessError, ValueError) as exc:
            self.res["error"] = f"{type(exc).__name__}: {exc}"
            if self.sut is not None:
                self.res["log_tail"] = self.sut.log_tail()
        finally:
            self._teardown()
        return self.res

    def _start(self) -> int:
        sink_port = self.sink.start()
        if self.system == "direct":
            return sink_port
        c, wd, cpus = self.ctx, self.wd, self.cpu_s
        env = {"PYTHONPATH": str(c.relay_path)} if getattr(c, "relay_path", None) else None
        if self.system.startswith("postfix"):
            sut: SUT = PostfixSUT(wd, sink_port, c.cert, c.key, self.system == "postfix", cpus)
        elif self.system == "relay":
            sut = RelaySUT(wd, sink_port, c.cert, c.key, cpus, env)
        elif self.system == "relay-noaudit":
            sut = RelaySUT(wd, sink_port, c.cert, c.key, cpus, env, audit=False)
        elif self.system == "relay-dane":
            lab = self.stack.enter_context(dane_lab(wd, sink_port, c.cert))
            sut = RelaySUT(wd, sink_port, c.cert, c.key, cpus, env, dnssec_port=lab.port)
        else:
            raise RunFailed(f"unknown system {self.system}")
        self.sut = sut
        sut.start()
        return sut.port

    def _warmup(self, port: int) -> None:
        """Daemons spawned, imports done, first TLS contexts built; must be delivered."""
        warm = dataclasses.replace(WARM, mode=self.load.mode)
        rep = self.res["rep"]
        lg = run_loadgen(port, warm, f"warm{rep}", self.wd / "warm.json", self.cpu_h, timeout=60)
        got, _ = wait_count(self.sink, len(lg["messages"]), 20)
        if not lg["messages"] or got < len(lg["messages"]):
            raise RunFailed(
                f"warm-up: {len(lg['messages'])} of 10 accepted, {got} delivered;"
                f" errors {lg['errors'][:3]} rejected {lg['rejected'][:3]}"
            )
        self.sink.reset()

    def _kill_sut(self) -> None:
        """The memory guard (Sampler's on_cap): SIGKILL to the SUT's process group."""
        root = self.sut.root_pid if self.sut else None
        if root is not None:
            with contextlib.suppress(OSError):
                if os.getpgid(root) == root:
                    os.killpg(root, signal.SIGKILL)

    def _start_watchers(self, root: int | None, port: int) -> None:
        if root:
            self.sampler = procs.Sampler(
                root,
                cpus=self.cpu_s,
                pss_every=self.load.pss_every,
                pss_cap=getattr(self.ctx, "pss_cap", None),
                on_cap=self._kill_sut,
            )
            self.sampler.start()
            if self.profile:
                cpu = min(self.cpu_h) if self.cpu_h else None
                self.spy = pyspy.start(root, self.wd, cpu, self.ctx)
        if self.load.probe:
            self.probe = Probe(port, self.cpu_h, self.wd, self.ctx.run_timeout + 700)
            self.probe.start()

    def _stop_watchers(self, root: int | None, t0: float) -> None:
        res = self.res
        if self.sampler is not None and root:
            mem = self.sampler.stop()
            res["peak_rss_mib"] = mem.rss / MIB
            res["peak_pss_mib"] = mem.pss / MIB
            res["pss_start_mib"] = mem.series[0][1] / MIB if mem.series else None
            split = {k: v / MIB for k, v in mem.at_peak.items() if k not in ("pss", "procs")}
            res["peak_pss_split_mib"] = split
            res["pss_samples"] = mem.pss_samples
            res["max_procs"] = mem.max_procs
            res["repinned"] = self.sampler.repinned
            res["sut_procs"] = sorted(set(procs.names(procs.tree(root)).values()))
            if self.load.pss_every == 1:  # the memory scenarios: the curve, in MiB
                res["pss_series"] = [(round(t - t0, 2), round(b / MIB, 1)) for t, b in mem.series]
            if mem.capped:
                raise RunFailed(f"PSS over the {self.ctx.pss_cap / MIB:.0f} MiB guard: SUT killed")
        if self.probe is not None:
            res["probe"] = summarize_probe(self.probe.collect(), t0)
        if self.spy is not None:
            res["profile"] = pyspy.stop(self.spy, self.wd)

    def _measure(self, port: int) -> None:
        root = self.sut.root_pid if self.sut else None
        self._start_watchers(root, port)
        cpu0 = procs.tree_cpu(root) if root else 0.0
        by0 = procs.breakdown(root) if root else {}
        busy0 = cpu_busy()
        lg = run_loadgen(
            port,
            self.load,
            self.label,
            self.wd / "gen.json",
            self.cpu_h,
            rate=self.rate,
            timeout=self.ctx.run_timeout,
        )
        gen_seconds = lg["t_end"] - lg["t0"]
        drain_timeout = min(max(self.ctx.drain_timeout, 2 * gen_seconds), 600.0)
        _, t_drained = wait_count(self.sink, len(lg["messages"]), drain_timeout)
        cpu1 = procs.tree_cpu(root) if root else 0.0
        if root:
            self.res["sut_cpu_by_name_s"] = procs.diff(procs.breakdown(root), by0)
        busy1 = cpu_busy()
        self._stop_watchers(root, lg["t0"])
        sk = self.sink.dump(self.wd / "sink.json")
        cpu = (cpu1 - cpu0) if root else None
        self._record(lg, sk, cpu, busy0, busy1, t_drained)
        self._check(lg, drain_timeout)

    def _record(
        self,
        lg: dict[str, Any],
        sk: dict[str, Any],
        cpu: float | None,
        busy0: dict[str, float],
        busy1: dict[str, float],
        t_drained: float,
    ) -> None:
        arrivals: dict[str, float] = sk["arrivals"]
        accepted = {m[0]: m for m in lg["messages"]}
        lost = [mid for mid in accepted if mid not in arrivals]
        acc_lat = [(m[3] - m[2]) * 1000 for m in lg["messages"]]
        a2d = [(arrivals[mid] - m[3]) * 1000 for mid, m in accepted.items() if mid in arrivals]
        t0 = lg["t0"]
        last_acc = max((m[3] for m in lg["messages"]), default=t0)
        last_arr = max((arrivals[mid] for mid in accepted if mid in arrivals), default=t0)
        delivered = len(accepted) - len(lost)
        self.res.update(
            offered=lg["offered"],
            accepted=len(accepted),
            rejected=len(lg["rejected"]),
            rejected_samples=lg["rejected"][:3],
            gen_errors=lg["errors"][:5],
            outcomes=outcomes(lg),
            delivered=delivered,
            lost=len(lost),
            lost_samples=lost[:5],
            extra_at_sink=len([mid for mid in arrivals if mid not in accepted]),
            duplicates=sk["duplicates"],
            unknown_at_sink=sk["unknown"],
            accepted_per_s=len(accepted) / (last_acc - t0) if last_acc > t0 else None,
            delivered_per_s=delivered / (last_arr - t0) if last_arr > t0 else None,
            acc_p50_ms=pct(acc_lat, 50),
            acc_p99_ms=pct(acc_lat, 99),
            a2d_p50_ms=pct(a2d, 50),
            a2d_p99_ms=pct(a2d, 99),
            lag_p99_ms=(pct(lg["lag"], 99) or 0) * 1000 if lg["lag"] else None,
            sut_cpu_s=cpu,
            sut_cpu_ms_per_msg=cpu * 1000 / delivered if cpu is not None and delivered else None,
            sink_cpu_ms_per_msg=sk["cpu_seconds"] * 1000 / max(len(arrivals), 1),
            gen_cpu_ms_per_msg=lg["cpu_seconds"] * 1000 / max(len(accepted), 1),
            sink_connections=sk["connections"],
            sink_tls_handshakes=sk["tls_handshakes"],
            sink_early_commands=sk.get("early_commands"),
            gen_seconds=lg["t_end"] - t0,
            e2e_seconds=last_arr - t0,
            drain_seconds=t_drained - lg["t_end"],
            machine_busy_s=busy1["all"] - busy0["all"],
            cpu_busy_s={k: round(busy1[k] - busy0[k], 3) for k in busy1},
            message_bytes=lg["message_bytes"],
            pipelining=lg["pipelining"],
        )
        self._interference(lg, sk, cpu, t_drained)

    def _interference(
        self, lg: dict[str, Any], sk: dict[str, Any], cpu: float | None, t_drained: float
    ) -> None:
        """CPU used on this machine by anything but SUT, generator and sink during the
        run (other jobs, the driver): a large value means noisy neighbours."""
        res = self.res
        res["other_cpu_s"] = (
            res["machine_busy_s"] - (cpu or 0) - lg["cpu_seconds"] - sk["cpu_seconds"]
        )
        wall = t_drained - lg["t0"]
        if cpu is not None and res["e2e_seconds"] > 0:
            res["sut_util"] = cpu / wall  # CPU-seconds per wall second (1.0 = one core)
        if self.cpu_s and cpu is not None:
            # busy time of the SUT's own CPU not spent by the SUT: interference on its core
            busy = res["cpu_busy_s"][f"cpu{min(self.cpu_s)}"]
            res["sut_core_other_s"] = busy - cpu
            res["sut_core_busy_frac"] = busy / wall
            res["sut_core_other_frac"] = (busy - cpu) / wall  # others' share of the SUT's CPU

    def _check(self, lg: dict[str, Any], drain_timeout: float) -> None:
        res, problems = self.res, []
        if res["lost"]:
            problems.append(
                f"LOST {res['lost']} of {res['accepted']} accepted messages: never counted"
                f" at the sink within the {drain_timeout:.0f}s drain (e.g. {res['lost_samples']})"
            )
        if lg["errors"] and not self.load.rejects_ok:
            problems.append(f"generator errors: {lg['errors'][:3]}")
        if lg["rejected"] and not self.load.rejects_ok:
            problems.append(f"{len(lg['rejected'])} rejected: {lg['rejected'][:2]}")
        if problems:
            raise RunFailed("; ".join(problems))

    def _teardown(self) -> None:
        if self.spy is not None and self.spy.poll() is None:
            self.spy.kill()
        if self.sampler is not None and self.sampler.is_alive():
            self.sampler.stop()
        try:
            if self.probe is not None:
                self.probe.stop()
            if self.sut is not None:
                self.sut.stop()
        finally:
            self.sink.stop()
            self.stack.close()
            os.sched_setaffinity(0, self.ctx.all_cpus)
        if self.res["ok"] and not self.ctx.keep:
            shutil.rmtree(self.wd, ignore_errors=True)
        else:
            self.res["workdir"] = str(self.wd)


def run_one(
    ctx: argparse.Namespace,
    system: str,
    load: Load,
    placement: str,
    rep: int,
    rate: float | None = None,
    profile: bool = False,
) -> dict[str, Any]:
    return Run(ctx, system, load, placement, rep, rate, profile).execute()
