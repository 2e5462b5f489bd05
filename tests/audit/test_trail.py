"""relay.audit: the hash-chained trail on a real file system - chain across days,
tampering found (edit, delete, insert), a torn last line, group commit, and several
processes appending to one chain under the lock."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
from pathlib import Path
from typing import Any

import pytest

from relay.audit.reader import records, verify
from relay.audit.trail import GENESIS, AuditTrail, line_hash


def rec(n: int, day: str = "2026-12-01", rcpt: str = "a@example.test") -> dict[str, Any]:
    return {"time": f"{day}T10:00:{n % 60:02d}.000Z", "queue_id": f"Q{n}", "recipient": rcpt}


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def test_chain_within_and_across_days(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path)
    trail.setup()
    trail.write([rec(1), rec(2)])
    trail.write([rec(3, "2026-12-02"), rec(4, "2026-12-02", "b@other.test")])
    day1, day2 = tmp_path / "2026-12-01.jsonl", tmp_path / "2026-12-02.jsonl"
    first, second = lines(day1)
    assert json.loads(first)["prev"] == GENESIS
    assert json.loads(second)["prev"] == line_hash(first)
    assert json.loads(lines(day2)[0])["prev"] == line_hash(second)  # across the day
    result = verify(tmp_path)
    assert (result.ok, result.lines, result.files) == (True, 4, 2)
    assert result.last_hash == line_hash(lines(day2)[1])
    assert [r["queue_id"] for r in records(tmp_path, since="2026-12-02")] == ["Q3", "Q4"]
    assert [r["queue_id"] for r in records(tmp_path, domain="other.test")] == ["Q4"]


@pytest.mark.parametrize("tamper", ["edit", "delete", "insert", "swap"])
def test_tampering_is_named_at_the_first_broken_line(tmp_path: Path, tamper: str) -> None:
    trail = AuditTrail(tmp_path)
    trail.setup()
    trail.write([rec(n) for n in range(5)])
    path = tmp_path / "2026-12-01.jsonl"
    got = lines(path)
    if tamper == "edit":
        got[2] = got[2].replace(b"a@example.test", b"x@example.test")
    elif tamper == "delete":
        del got[2]
    elif tamper == "insert":
        got.insert(2, got[1])
    else:
        got[1], got[2] = got[2], got[1]
    path.write_bytes(b"\n".join(got) + b"\n")
    result = verify(tmp_path)
    assert not result.ok and result.problem is not None
    line = 4 if tamper == "edit" else 3 if tamper != "swap" else 2
    assert result.problem.startswith(f"{path}:{line}: chain broken"), result.problem


def test_a_deleted_middle_day_breaks_the_chain(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path)
    trail.setup()
    for day in ("2026-11-30", "2026-12-01", "2026-12-02"):
        trail.write([rec(1, day)])
    (tmp_path / "2026-12-01.jsonl").unlink()
    result = verify(tmp_path)
    assert not result.ok and "2026-12-02.jsonl:1: chain broken" in str(result.problem)


def test_a_torn_last_line_is_cut_before_the_next_append(tmp_path: Path) -> None:
    """A crash mid-write leaves a line without newline; it was never acknowledged."""
    trail = AuditTrail(tmp_path)
    trail.setup()
    trail.write([rec(1)])
    path = tmp_path / "2026-12-01.jsonl"
    with path.open("ab") as fh:
        fh.write(b'{"time":"2026-12-01T10:00:02.000Z","queue_id":"Q2","rec')
    assert not verify(tmp_path).ok  # named as incomplete until the next append
    trail.write([rec(3)])
    assert verify(tmp_path).ok
    assert [json.loads(x)["queue_id"] for x in lines(path)] == ["Q1", "Q3"]


async def test_appends_are_grouped_and_all_durable(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path)
    trail.setup()
    calls: list[int] = []
    write = trail.write

    def counting(batch: Any) -> None:
        calls.append(len(batch))
        write(batch)

    trail.write = counting  # type: ignore[method-assign]
    await asyncio.gather(*(trail.append([rec(n)]) for n in range(50)))
    assert sum(calls) == 50 and len(calls) < 50  # records that waited went together
    assert verify(tmp_path).lines == 50
    trail.close()


async def test_a_failed_write_is_an_error_for_every_waiting_append(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path / "missing")  # setup() not called: no directory
    with pytest.raises(Exception, match="cannot write the audit trail"):
        await trail.append([rec(1)])
    trail.close()


def _writer(root: str, worker: int, count: int) -> None:
    trail = AuditTrail(Path(root))
    for n in range(count):
        trail.write([rec(n, rcpt=f"w{worker}-{n}@example.test")])


def test_several_processes_append_to_one_chain(tmp_path: Path) -> None:
    """Workers (relay.workers) share the trail: the flock makes it one chain."""
    AuditTrail(tmp_path).setup()
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 40)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    result = verify(tmp_path)
    assert (result.ok, result.lines) == (True, 120), result.problem


def test_a_reply_with_an_undecodable_byte_is_recorded_not_an_error(tmp_path: Path) -> None:
    """aiosmtplib keeps a reply byte it cannot decode as a lone surrogate."""
    trail = AuditTrail(tmp_path)
    trail.setup()
    trail.write([{**rec(1), "reply": "250 ok \udcff"}, rec(2)])
    assert verify(tmp_path).lines == 2
    assert next(records(tmp_path))["reply"] == "250 ok \udcff"


def test_a_record_stamped_before_midnight_never_forks_the_chain(tmp_path: Path) -> None:
    """Another worker (or a clock step) started the new day first: the late record joins
    the newest file instead of appending behind it."""
    trail = AuditTrail(tmp_path)
    trail.setup()
    trail.write([rec(1, "2026-12-01")])
    trail.write([rec(2, "2026-12-02")])
    trail.write([rec(3, "2026-12-01")])  # late
    assert verify(tmp_path).ok
    assert len(lines(tmp_path / "2026-12-02.jsonl")) == 2


def test_a_torn_line_in_the_previous_days_file_is_cut_too(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path)
    trail.setup()
    trail.write([rec(1, "2026-12-01")])
    with (tmp_path / "2026-12-01.jsonl").open("ab") as fh:
        fh.write(b'{"time":"2026-12-01T23:59:59')  # crash at 23:59
    trail.write([rec(2, "2026-12-02")])  # after the restart, the next day
    assert verify(tmp_path).ok
