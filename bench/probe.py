"""Latency probe: one SMTP session sending NOOP every 10 ms, recording each round trip.

Role: while other clients send messages of some shape (bench.shapes), show how long an
unrelated session waits for the SUT's replies.  A server whose event loop is busy with
one message's content answers the probe late: the longest round trip is the stall.

Run as its own process (``python -m bench.probe --port P --out FILE``), so that the load
generator's own work (TLS encryption of large messages) does not delay the probe's
clock.  It opens a STARTTLS session (bench.loadgen.open_starttls), prints ``READY``,
then sends NOOP, waits for the reply, and sends the next one at the next 10 ms tick
(at once when the reply came after the tick: NOOPs are never pipelined).  It answers
``stop`` on stdin by writing the JSON result and ``ok``; ``quit`` or EOF ends it.

Per NOOP: send time (CLOCK_MONOTONIC) and round trip.  Also: how late the probe's own
timer fired (its CPU share, not the SUT's), the time to open each session.  A session
is replaced by a fresh one (opened alongside, so the 10 ms rhythm goes on) every
``--rotate`` NOOPs, under the SUT's per-session command cap (tls-relay:
limits.max_commands = 1000).  Bounded: ``--max-seconds``, at most 20 session errors.
Loopback only.  Not: a load generator.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from bench import aio
from bench.loadgen import Smtp, SmtpError, client_context, open_starttls
from bench.report import pct
from bench.systems import PY, LineProcess, taskset

MAX_ERRORS = 20


class Prober:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ctx: ssl.SSLContext = client_context()
        self.rtts: list[tuple[float, float]] = []  # (send time, round trip) in s
        self.connect_s: list[float] = []
        self.errors: list[str] = []
        self.late_max = 0.0  # how late the probe's own timer fired, at worst
        self.stop = asyncio.Event()
        self.closing: set[asyncio.Task[None]] = set()

    async def open(self) -> Smtp:
        t = time.monotonic()
        smtp, _ = await open_starttls(
            self.args.host, self.args.port, self.ctx, self.args.io_timeout, {}, 0
        )
        self.connect_s.append(time.monotonic() - t)
        return smtp

    async def noop(self, smtp: Smtp) -> None:
        t = time.monotonic()
        code, text = await smtp.cmd(b"NOOP\r\n", self.args.io_timeout)
        self.rtts.append((round(t, 4), round(time.monotonic() - t, 6)))
        if code != 250:
            raise SmtpError(f"NOOP: {text[:100]!r}")

    async def tick(self, due: float) -> float:
        """Wait for *due* (or stop); the next due time."""
        delay = due - time.monotonic()
        if delay <= 0:
            return time.monotonic() + float(self.args.interval)  # behind: now
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), delay)
        self.late_max = max(self.late_max, time.monotonic() - due)
        return due + float(self.args.interval)

    async def loop(self, smtp: Smtp) -> None:
        deadline = time.monotonic() + self.args.max_seconds
        nxt: asyncio.Task[Smtp] | None = None
        count, due = 0, time.monotonic()
        while not self.stop.is_set() and time.monotonic() < deadline:
            if count >= self.args.rotate and nxt is None:
                nxt = asyncio.create_task(self.open())
            if nxt is not None and nxt.done():
                smtp, count = self.switch(nxt, smtp, count)
                nxt = None
            try:
                await self.noop(smtp)
                count += 1
            except (SmtpError, OSError, TimeoutError, ssl.SSLError) as exc:
                self.errors.append(f"NOOP: {type(exc).__name__}: {exc}")
                if len(self.errors) >= MAX_ERRORS:
                    break
                smtp, count = await self.reopen(smtp)
            due = await self.tick(due)
        if nxt is not None:
            nxt.cancel()
        await quit_session(smtp)

    def switch(self, opened: asyncio.Task[Smtp], old: Smtp, count: int) -> tuple[Smtp, int]:
        """To the session *opened* alongside (the old one quits in the background)."""
        try:
            fresh = opened.result()
        except (SmtpError, OSError, TimeoutError, ssl.SSLError) as exc:
            self.errors.append(f"opening a session: {type(exc).__name__}: {exc}")
            return old, count
        task = asyncio.create_task(quit_session(old))
        self.closing.add(task)
        task.add_done_callback(self.closing.discard)
        return fresh, 0

    async def reopen(self, old: Smtp) -> tuple[Smtp, int]:
        await old.close()
        try:
            return await self.open(), 0
        except (SmtpError, OSError, TimeoutError, ssl.SSLError) as exc:
            self.errors.append(f"reopening: {type(exc).__name__}: {exc}")
            await asyncio.sleep(0.2)
            return old, self.args.rotate  # next round tries again (bounded by MAX_ERRORS)

    def result(self) -> dict[str, Any]:
        return {
            "interval": self.args.interval,
            "rtts": self.rtts,
            "connect_s": self.connect_s,
            "errors": self.errors[:MAX_ERRORS],
            "timer_late_max_s": self.late_max,
        }


async def quit_session(smtp: Smtp) -> None:
    with contextlib.suppress(SmtpError, OSError, TimeoutError, ssl.SSLError):
        await smtp.cmd(b"QUIT\r\n", 2.0)
    await smtp.close()


async def control(prober: Prober, task: asyncio.Task[None], out: Path) -> None:
    """stdin: ``stop`` -> write the result, answer ``ok``; ``quit``/EOF -> return."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        if line == "quit":
            break
        if line == "stop":
            prober.stop.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), 10.0)
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(prober.result()))
            os.replace(tmp, out)
        sys.stdout.write("ok\n" if line == "stop" else f"error unknown command {line!r}\n")
        sys.stdout.flush()
    prober.stop.set()


async def main_async(args: argparse.Namespace) -> None:
    if not args.host.startswith("127."):
        raise SystemExit("probe talks to 127.0.0.0/8 only")
    prober = Prober(args)
    smtp = await prober.open()
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    task = asyncio.create_task(prober.loop(smtp))
    try:
        await asyncio.wait_for(control(prober, task, Path(args.out)), args.max_seconds + 60)
    except TimeoutError:
        sys.stderr.write("probe: max lifetime reached\n")
    prober.stop.set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(task, 10.0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="NOOP latency probe (one STARTTLS session)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", required=True, help="JSON result file, written on 'stop'")
    p.add_argument("--interval", type=float, default=0.01, help="seconds between NOOPs")
    p.add_argument("--rotate", type=int, default=800, help="NOOPs per session")
    p.add_argument("--io-timeout", type=float, default=60.0)
    p.add_argument("--max-seconds", type=float, default=1800.0)
    p.add_argument("--no-uvloop", action="store_true")
    args = p.parse_args(argv)
    aio.run(main_async(args), not args.no_uvloop)


# ---------------------------------------------------------------------------- driver side
class Probe(LineProcess):
    """bench.probe as a child process of the driver."""

    def __init__(self, port: int, cpus: set[int] | None, workdir: Path, max_seconds: float) -> None:
        self.out = workdir / "probe.json"
        cmd = [PY, "-m", "bench.probe", "--port", str(port), "--out", str(self.out)]
        cmd += ["--max-seconds", str(max_seconds)]
        super().__init__(taskset(cpus, cmd), workdir, "probe.err")

    def start(self) -> None:
        self.start_process(timeout=30.0)

    def collect(self) -> dict[str, Any]:
        """Stop probing; the raw result (see Prober.result)."""
        self.request("stop", timeout=30.0)
        doc: dict[str, Any] = json.loads(self.out.read_text())
        return doc


def summarize(doc: dict[str, Any], t0: float) -> dict[str, Any]:
    """Round trips in ms: count, p50, p99, max, how many over 100 ms, the 5 worst with
    their send time relative to *t0* (the load generator's start)."""
    rtts = [r for _, r in doc["rtts"]]
    ms = [1000 * r for r in rtts]
    worst = sorted(doc["rtts"], key=lambda x: -x[1])[:5]
    return {
        "noops": len(ms),
        "rtt_p50_ms": pct(ms, 50),
        "rtt_p99_ms": pct(ms, 99),
        "rtt_max_ms": max(ms, default=None),
        "over_100ms": sum(1 for x in ms if x > 100),
        "worst": [(round(t - t0, 2), round(1000 * r, 1)) for t, r in worst],
        "sessions": len(doc["connect_s"]),
        "connect_max_ms": 1000 * max(doc["connect_s"], default=0.0),
        "timer_late_max_ms": 1000 * doc["timer_late_max_s"],
        "errors": doc["errors"],
    }


if __name__ == "__main__":
    main()
