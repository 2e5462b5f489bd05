"""Reading the audit trail: list its records, verify its hash chain.

Role: :func:`verify` walks every day file in order and checks that each line is a JSON
record whose ``prev`` is the SHA-256 of the line before it (the first line of a day:
of the previous day's last line), naming the first line that breaks the chain;
:func:`records` lists records from a day on, optionally for one recipient domain.
The first line of the oldest file may name any ``prev``: days removed by retention
cannot be told from a start; its hash is reported so it can be compared with a copy.
Not: writing (relay.audit.trail).  Deleting the newest lines of the newest file is not
detectable from the trail alone (keep a copy of ``verify``'s last hash elsewhere).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.audit.trail import day_files, line_hash
from relay.domains import domain_of
from relay.errors import InvalidDomain


@dataclass(frozen=True)
class Verified:
    ok: bool
    lines: int  # lines checked
    files: int
    problem: str | None = None  # "FILE:LINE: what is wrong"
    first_prev: str | None = None  # `prev` of the oldest line kept
    last_hash: str | None = None  # hash of the newest line: the chain's head


def verify(root: Path) -> Verified:
    """Walk the chain under a shared lock, so a write in progress is not half seen."""
    lock = root / ".lock"
    if not lock.exists():
        return _verify(root)
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        return _verify(root)
    finally:
        os.close(fd)


def _verify(root: Path) -> Verified:
    files = day_files(root)
    prev: str | None = None
    first_prev: str | None = None
    count = 0
    for path in files:
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            last = data.count(b"\n") + 1
            return Verified(False, count, len(files), f"{path}:{last}: incomplete last line")
        for number, line in enumerate(data.splitlines(), 1):
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
                stated = record["prev"]
            except (ValueError, KeyError, TypeError):
                return Verified(False, count, len(files), f"{where}: not an audit record")
            if prev is None:
                first_prev = stated
            elif stated != prev:
                problem = (
                    f"{where}: chain broken: prev is {stated}, but the line before hashes to "
                    f"{prev} (a line was edited, removed or inserted here or before)"
                )
                return Verified(False, count, len(files), problem)
            prev = line_hash(line)
            count += 1
    return Verified(True, count, len(files), None, first_prev, prev)


def records(
    root: Path, since: str | None = None, domain: str | None = None
) -> Iterator[dict[str, Any]]:
    """Records of the days from *since* (YYYY-MM-DD) on, for recipients in *domain*."""
    for path in day_files(root):
        if since is not None and path.stem < since:
            continue
        for line in path.read_bytes().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # `verify` names it; listing goes on
            if not isinstance(record, dict):
                continue
            if domain is not None and _domain(record) != domain:
                continue
            yield record


def _domain(record: dict[str, Any]) -> str | None:
    try:
        return domain_of(str(record.get("recipient", "")))
    except InvalidDomain:
        return None
