"""Counting TLS sessions for RFC 8460 reports: per UTC day, policy domain and policy.

Role: :class:`TlsCounts` adds each session's result to in-memory counters and writes
them every few seconds to ``DIR/YYYY-MM-DD.PROC.json`` (PROC: the worker), atomically
but without fsync: a crash loses at most the last seconds of counts, never a file.
At start it reads its own files back, so a restart loses none.  :func:`load_day`
merges every process's file of one day for the report.
Not: what a policy object says (relay.tlsrpt.report builds it), sending.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLUSH_EVERY = 5.0  # seconds of counts a crash may lose
VERSION = 1

FailureKey = tuple[str, str | None, str | None, str | None]  # type, sending, mx, receiving


@dataclass
class PolicyCounts:
    policy: dict[str, Any]  # RFC 8460 4.3 "policy": type, strings, domain, mx-host
    success: int = 0
    failures: dict[FailureKey, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The form kept on disk and shown by ``tls-reports list --json``."""
        return {
            "policy": self.policy,
            "success": self.success,
            "failures": [
                {
                    "result-type": k[0],
                    "sending-mta-ip": k[1],
                    "receiving-mx-hostname": k[2],
                    "receiving-ip": k[3],
                    "count": n,
                }
                for k, n in self.failures.items()
            ],
        }

    def add(self, other: PolicyCounts) -> None:
        self.success += other.success
        for key, n in other.failures.items():
            self.failures[key] = self.failures.get(key, 0) + n


def _day(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.UTC).date().isoformat()


def _key(policy: Mapping[str, Any]) -> str:
    return json.dumps(policy, sort_keys=True, separators=(",", ":"))


class TlsCounts:
    """See the module docstring.  ``proc`` names this process's files (a worker)."""

    def __init__(self, root: Path, proc: str = "0", clock: Callable[[], float] = time.time):
        self.root = root
        self.proc = proc
        self._clock = clock
        self._days: dict[str, dict[str, PolicyCounts]] = {}
        self._dirty: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def setup(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o750)
        for path in self.root.glob(f"????-??-??.{self.proc}.json"):
            self._days[path.name[:10]] = _read(path)

    # ---- counting --------------------------------------------------------------------------

    def success(self, policy: Mapping[str, Any]) -> None:
        self._entry(policy).success += 1

    def failure(
        self,
        policy: Mapping[str, Any],
        result_type: str,
        sending_ip: str | None,
        mx_host: str | None,
        receiving_ip: str | None,
    ) -> None:
        entry = self._entry(policy)
        key: FailureKey = (result_type, sending_ip, mx_host, receiving_ip)
        entry.failures[key] = entry.failures.get(key, 0) + 1

    def _entry(self, policy: Mapping[str, Any]) -> PolicyCounts:
        day = _day(self._clock())
        self._dirty.add(day)
        entries = self._days.setdefault(day, {})
        key = _key(policy)
        if key not in entries:
            entries[key] = PolicyCounts(dict(policy))
        return entries[key]

    # ---- writing -----------------------------------------------------------------------------

    def flush(self) -> None:
        for day in sorted(self._dirty):
            _write(self.root / f"{day}.{self.proc}.json", day, self._days.get(day, {}))
        self._dirty.clear()
        today = _day(self._clock())
        for day in [d for d in self._days if d < today]:
            del self._days[day]  # written; a finished day does not change any more

    def start(self) -> None:
        self._task = asyncio.create_task(self._flusher())

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            try:
                self.flush()
            except OSError:
                continue  # the next tick tries again; counts stay in memory

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        with contextlib.suppress(OSError):
            self.flush()


def _write(path: Path, day: str, entries: Mapping[str, PolicyCounts]) -> None:
    doc = {
        "version": VERSION,
        "day": day,
        "policies": [e.to_json() for e in entries.values()],
    }
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, separators=(",", ":")))
    os.replace(tmp, path)  # atomic; no fsync: seconds of counts are what a crash may cost


def _read(path: Path) -> dict[str, PolicyCounts]:
    try:
        doc = json.loads(path.read_text())
        entries: dict[str, PolicyCounts] = {}
        for item in doc["policies"]:
            counts = PolicyCounts(dict(item["policy"]), int(item["success"]))
            for f in item["failures"]:
                key: FailureKey = (
                    f["result-type"],
                    f.get("sending-mta-ip"),
                    f.get("receiving-mx-hostname"),
                    f.get("receiving-ip"),
                )
                counts.failures[key] = int(f["count"])
            entries[_key(counts.policy)] = counts
        return entries
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # unreadable: counted as nothing, never a crash


def days(root: Path) -> list[str]:
    """Days that have counts, oldest first."""
    return sorted({p.name[:10] for p in root.glob("????-??-??.*.json")})


def load_day(root: Path, day: str) -> dict[str, list[PolicyCounts]]:
    """Every process's counts of *day*, merged, by policy domain."""
    merged: dict[str, PolicyCounts] = {}
    for path in sorted(root.glob(f"{day}.*.json")):
        for key, counts in _read(path).items():
            if key in merged:
                merged[key].add(counts)
            else:
                merged[key] = counts
    by_domain: dict[str, list[PolicyCounts]] = {}
    for counts in merged.values():
        by_domain.setdefault(str(counts.policy.get("policy-domain")), []).append(counts)
    return by_domain


def remove_day(root: Path, day: str) -> None:
    for path in root.glob(f"{day}.*.json"):
        path.unlink(missing_ok=True)
