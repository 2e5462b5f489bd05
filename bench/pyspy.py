"""py-spy around one relay run (``python -m bench.run --profile``): where the time goes.

Role: start ``py-spy record`` on the SUT's root (all subprocesses, raw collapsed stacks,
``--profile-rate`` Hz, C frames too with ``--profile-native``), stop it with SIGINT, and
summarize the stacks: share of samples by thread kind, per leaf function (self) and per
function anywhere on the stack (total).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from bench.systems import PY, taskset


def start(
    pid: int, wd: Path, cpu: int | None, ctx: argparse.Namespace
) -> subprocess.Popen[bytes] | None:
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
        str(ctx.profile_rate),
        # --native must stop the process for each sample; else py-spy need not
        *(["--native"] if ctx.profile_native else ["--nonblocking"]),
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


def stop(spy: subprocess.Popen[bytes], wd: Path) -> dict[str, Any]:

    try:
        os.killpg(spy.pid, signal.SIGINT)
        spy.wait(30)
    except (OSError, subprocess.TimeoutExpired):
        spy.kill()
    return summarize(wd / "pyspy.txt")


def summarize(path: Path, top: int = 25) -> dict[str, Any]:
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
            "executor threads"
            if any("concurrent/futures/thread.py" in f for f in frames)
            else "event loop thread"  # uvloop's run_forever is C: asyncio.run's frame shows
            if any("run_forever" in f or "asyncio/runners.py" in f for f in frames)
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
