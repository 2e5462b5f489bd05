"""The queue and the audit trail: one record per delivered recipient, on disk before
the spool records the recipient (a crash may repeat a line, never lose one), and a
trail that cannot be written never undoes a delivery."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from relay.audit.reader import records, verify
from relay.audit.trail import AuditTrail
from relay.queue.envelope import RcptState
from relay.queue.scheduler import Scheduler
from relay.queue.spool import Spool
from tests.queue.test_scheduler import CFG, Clock, FakeDeliverer, NoJitter, make_env, settle

DATA = b"From: app@corp.test\r\nMessage-ID:\r\n <1@corp.test>\r\n\r\nhello\r\n"


async def run_one(tmp_path: Path, trail: AuditTrail, fake: FakeDeliverer, *rcpts: str) -> Spool:
    clock = Clock()
    spool = Spool(tmp_path / "sp", clock=clock)
    spool.setup()
    env = make_env(spool, *rcpts)
    spool.store(env, DATA)
    sched = Scheduler(spool, fake, CFG, "relay.test", clock=clock, rand=NoJitter(), audit=trail)
    await sched.start()
    await settle(sched)
    await sched.stop(0)
    return spool


async def test_one_record_per_delivered_recipient_written_before_the_spool(
    tmp_path: Path,
) -> None:
    trail = AuditTrail(tmp_path / "audit")
    trail.setup()
    seen_at_update: list[list[str]] = []
    fake = FakeDeliverer(script={"b@x.test": [("transient", "451 4.3.0 later")]})
    spool_update = Spool.update

    def update(self: Spool, env: Any) -> None:
        seen_at_update.append([r["recipient"] for r in records(trail.root)])
        spool_update(self, env)

    Spool.update = update  # type: ignore[method-assign]
    try:
        spool = await run_one(tmp_path, trail, fake, "a@x.test", "b@x.test")
    finally:
        Spool.update = spool_update  # type: ignore[method-assign]
    (env,) = [spool.load(q) for q in spool.ids()]
    a, b = env.recipients
    assert (a.state, b.state) == (RcptState.DELIVERED, RcptState.DEFERRED)
    assert seen_at_update and seen_at_update[0] == ["a@x.test"]  # audit first
    (record,) = records(trail.root)
    assert record["message_id"] == "<1@corp.test>"  # folded header, unfolded
    assert (record["sender"], record["queue_id"]) == ("app@corp.test", env.id)
    assert (record["mx_host"], record["reply"]) == ("mx.test", "250 2.0.0 ok")
    assert record["time"].endswith("Z") and verify(trail.root).ok
    trail.close()


async def test_a_trail_that_cannot_be_written_keeps_the_delivery_and_logs_the_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trail = AuditTrail(tmp_path / "audit")  # never set up: no directory to write in
    with caplog.at_level(logging.ERROR):
        spool = await run_one(tmp_path, trail, FakeDeliverer(), "a@x.test")
    assert spool.ids() == []  # delivered and removed: the MX has it, nothing is resent
    (line,) = [r.getMessage() for r in caplog.records if "audit_write_failed" in r.getMessage()]
    assert "a@x.test" in line and "cannot write the audit trail" in line
    assert "\n" not in line  # one log line per record
    trail.close()


async def test_notify_success_to_a_next_hop_without_dsn_sends_a_relayed_notice(
    tmp_path: Path,
) -> None:
    clock = Clock()
    spool = Spool(tmp_path / "sp", clock=clock)
    spool.setup()
    e = make_env(spool, "a@x.test", "b@x.test")
    e.recipients[0].options = ["NOTIFY=SUCCESS"]
    spool.store(e, DATA)
    fake = FakeDeliverer()
    sched = Scheduler(spool, fake, CFG, "relay.test", clock=clock, rand=NoJitter())
    await sched.start()
    await settle(sched)
    await sched.stop(0)
    (notice,) = [c for c in fake.calls if c.sender == ""]  # the DSN, delivered in turn
    assert notice.rcpts == ["app@corp.test"]
    report = notice.data.split(b"message/delivery-status")[1]
    assert b"Action: relayed" in report and b"a@x.test" in report and b"b@x.test" not in report
