"""Process-tree accounting from /proc: CPU seconds, RSS, PSS, CPU affinity.

Method (no cgroups needed, works as root or not, for Postfix and tls-relay alike):

- The system under test is the tree rooted at one process: Postfix's ``master``
  (pid from ``<queue_directory>/pid/master.pid``; every Postfix daemon is its child) or
  the ``tls-relay serve`` process (and any workers it forks).
- The tree is found by walking /proc/*/stat and following ppid links from the root.
- CPU of the tree at an instant = sum over its live processes of
  utime + stime + cutime + cstime (/proc/PID/stat fields 14-17, in clock ticks).
  cutime/cstime hold the CPU of children that exited and were reaped by that process,
  so a Postfix smtpd/cleanup/smtp that exits during the run (max_idle, max_use) is still
  counted: its time moves from its own utime/stime into the master's cutime/cstime.
  Threads are included (stat is per process).  CPU of a run = CPU(after) - CPU(before).
  Not counted: a descendant reaped by a process outside the tree (a double-forked
  daemon reparented to init) -- neither Postfix nor tls-relay does that.
- RSS = sum of VmRSS (``/proc/PID/statm`` resident pages) over the live processes,
  sampled every 50 ms by a thread; the peak of that sum is reported.  Shared pages
  (libc, libcrypto, Postfix's shared libraries) are counted once per process, which
  overstates a multi-process server; the proportional set size (PSS, from
  ``smaps_rollup``, shared pages divided among their users) is sampled every 0.5 s and
  reported too; the memory scenarios (bench.memory, bench.shapes) sample it every 50 ms
  (``pss_every=1``), keep its time series, and record at the peak how it splits into
  anonymous memory (heap: message copies), file pages and shmem.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'
    rp = raw.rfind(b")")
    return [
        raw[: raw.find(b" ")].decode(),
        raw[raw.find(b"(") + 1 : rp].decode(),
        *raw[rp + 2 :].decode().split(),
    ]


def all_ppids() -> dict[int, int]:
    """pid -> ppid for every process on the machine."""
    out: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = _stat(int(name))
        if st is not None:
            out[int(name)] = int(st[3])
    return out


def tree(root: int, ppids: dict[int, int] | None = None) -> list[int]:
    """root and all its live descendants (root first)."""
    ppids = ppids if ppids is not None else all_ppids()
    if root not in ppids:
        return []
    children: dict[int, list[int]] = {}
    for pid, ppid in ppids.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime + cutime + cstime summed over *pids* (see module doc)."""
    ticks = 0
    for pid in pids:
        st = _stat(pid)
        if st is None:
            continue
        ticks += int(st[13]) + int(st[14]) + int(st[15]) + int(st[16])
    return ticks / TICK


def tree_cpu(root: int) -> float:
    return cpu_seconds(tree(root))


def rss_bytes(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as fh:
                total += int(fh.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            pass
    return total


def pss_bytes(pids: Iterable[int]) -> int:
    return pss_detail(pids)["pss"]


_ROLLUP = {b"Pss:": "pss", b"Pss_Anon:": "anon", b"Pss_File:": "file", b"Pss_Shmem:": "shmem"}


def pss_detail(pids: Iterable[int]) -> dict[str, int]:
    """Summed over *pids*, in bytes, from /proc/PID/smaps_rollup: ``pss`` and its split
    into ``anon`` (heap, stacks: where message copies live), ``file`` (mapped files:
    code, libraries) and ``shmem``; ``procs`` = how many were read."""
    out = dict.fromkeys(("pss", "anon", "file", "shmem", "procs"), 0)
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
                lines = fh.readlines()
        except OSError:
            continue
        out["procs"] += 1
        for line in lines:
            key = _ROLLUP.get(line.split(b" ", 1)[0])
            if key is not None:
                with contextlib.suppress(ValueError, IndexError):
                    out[key] += int(line.split()[1]) * 1024
    return out


def names(pids: Iterable[int]) -> dict[int, str]:
    out = {}
    for pid in pids:
        st = _stat(pid)
        if st is not None:
            out[pid] = st[1]
    return out


def pin(pids: Iterable[int], cpus: set[int]) -> list[int]:
    """Set the affinity of every pid (all threads) to *cpus*; return pids that were off."""
    moved = []
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            try:
                if os.sched_getaffinity(tid) != cpus:
                    os.sched_setaffinity(tid, cpus)
                    if pid not in moved:
                        moved.append(pid)
            except OSError:
                pass
    return moved


@dataclass
class MemPeak:
    rss: int = 0
    pss: int = 0
    samples: int = 0
    pss_samples: int = 0
    max_procs: int = 0
    at_peak: dict[str, int] = field(default_factory=dict)  # pss_detail() at the PSS peak
    series: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, PSS)
    capped: bool = False  # PSS went over the cap; on_cap() was called


class Sampler(threading.Thread):
    """Samples the tree's summed RSS every *interval* s and its PSS every *pss_every*-th
    sample (1 = every sample, for the memory scenarios); rescans /proc for new
    descendants every *rescan* samples.  Optionally re-pins stray processes to *cpus*
    (a no-op when everything inherited the affinity).  *pss_cap*: when the PSS goes
    over it, *on_cap* is called once (a guard: the driver kills the SUT before it takes
    the machine's memory).  Bounded: stops by itself after *max_seconds*."""

    def __init__(
        self,
        root: int,
        interval: float = 0.05,
        rescan: int = 5,
        cpus: set[int] | None = None,
        pss_every: int = 10,
        pss_cap: int | None = None,
        on_cap: Callable[[], None] | None = None,
        max_seconds: float = 3600.0,
    ) -> None:
        super().__init__(name=f"sampler-{root}", daemon=True)
        self.root = root
        self.interval = interval
        self.rescan = rescan
        self.cpus = cpus
        self.pss_every = max(1, pss_every)
        self.pss_cap = pss_cap
        self.on_cap = on_cap
        self.max_seconds = max_seconds
        self.peak = MemPeak()
        self.repinned: list[int] = []
        self._stop_evt = threading.Event()

    def run(self) -> None:
        pids: list[int] = []
        i = 0
        deadline = time.monotonic() + self.max_seconds
        while not self._stop_evt.is_set() and time.monotonic() < deadline:
            if i % self.rescan == 0:
                pids = tree(self.root)
                if self.cpus is not None:
                    self.repinned += self.pin_now(pids)
            rss = rss_bytes(pids)
            p = self.peak
            p.samples += 1
            p.rss = max(p.rss, rss)
            p.max_procs = max(p.max_procs, len(pids))
            if i % self.pss_every == 0:
                self._sample_pss(pids)
            i += 1
            self._stop_evt.wait(self.interval)

    def _sample_pss(self, pids: list[int]) -> None:
        p = self.peak
        detail = pss_detail(pids)
        p.pss_samples += 1
        if len(p.series) < 100_000:
            p.series.append((round(time.monotonic(), 3), detail["pss"]))
        if detail["pss"] > p.pss:
            p.pss = detail["pss"]
            p.at_peak = detail
        if self.pss_cap is not None and detail["pss"] > self.pss_cap and not p.capped:
            p.capped = True
            if self.on_cap is not None:
                self.on_cap()

    def pin_now(self, pids: list[int]) -> list[int]:
        assert self.cpus is not None
        return pin(pids, self.cpus)

    def stop(self) -> MemPeak:
        self._stop_evt.set()
        self.join(timeout=5)
        return self.peak


def _task_ticks(pid: int, tid: int) -> int:
    try:
        with open(f"/proc/{pid}/task/{tid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return 0
    f = raw[raw.rfind(b")") + 2 :].split()
    return int(f[11]) + int(f[12])  # utime, stime


def breakdown(root: int) -> dict[str, float]:
    """CPU seconds so far by process name over the tree, with each multi-threaded
    process split into its main thread (the event loop, for tls-relay) and its other
    threads (executor threads: fsync, DNS, ...).  Exited children are lumped into
    "(exited children)" through the root's cutime/cstime.  Take a difference of two
    calls for one run."""
    out: dict[str, float] = {}
    for pid in tree(root):
        st = _stat(pid)
        if st is None:
            continue
        name = st[1]
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            key = name if tid == pid else f"{name} (other threads)"
            out[key] = out.get(key, 0.0) + _task_ticks(pid, tid) / TICK
        if pid == root:
            out["(exited children)"] = (int(st[15]) + int(st[16])) / TICK
    return out


def diff(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    keys = set(after) | set(before)
    d = {k: round(after.get(k, 0.0) - before.get(k, 0.0), 3) for k in keys}
    return dict(sorted(((k, v) for k, v in d.items() if v > 0), key=lambda kv: -kv[1]))
