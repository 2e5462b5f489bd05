"""``tls-relay queue ...``: look at and steer the spool, safe while ``serve`` runs.

Role: list and show messages, and change them the way an operator needs (retry
now, hold, release, delete, bounce).  Every change takes the message's lock
first, so it never races a delivery: if ``serve`` is delivering the message right
now the command is refused with a clear message (exit 1) and nothing changes.
After a change it sends b"kick" on the spool's control socket so a running relay
rescans at once.
Not: delivering anything, or deciding retry times (the scheduler reads what is
written here).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from relay.config import Config
from relay.errors import MessageBusy, MessageNotFound, RelayError
from relay.queue import bounce
from relay.queue.envelope import Attempt, AttemptOutcome, QueueEnvelope, RcptState
from relay.queue.spool import Spool

PREFIX = "tls-relay queue"
OPERATOR_REASON = "bounced by operator"


@dataclass
class _Ctx:
    cfg: Config
    spool: Spool
    clock: Callable[[], float]
    out: TextIO

    def say(self, line: str = "") -> None:
        print(line, file=self.out)


def run(
    cfg: Config,
    args: argparse.Namespace,
    *,
    clock: Callable[[], float] = time.time,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run one ``queue`` subcommand; 0 on success, 1 with a message on stderr."""
    ctx = _Ctx(cfg, Spool(cfg.spool.path, clock=clock), clock, out or sys.stdout)
    command = _COMMANDS.get(args.queue_command)
    try:
        if command is None:
            raise RelayError(f"unknown queue command {args.queue_command!r}")
        return command(ctx, args)
    except BrokenPipeError:
        return _pipe_closed()
    except MessageNotFound:
        print(f"{PREFIX}: no such message: {getattr(args, 'id', None)}", file=err or sys.stderr)
    except (RelayError, OSError) as exc:
        print(f"{PREFIX}: {exc}", file=err or sys.stderr)
    return 1


def _pipe_closed() -> int:
    """The reader went away (``queue list | head``): end quietly, as a tool killed by
    SIGPIPE does.  stdout is pointed at /dev/null so the interpreter's last flush at
    exit cannot raise BrokenPipeError again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 128 + signal.SIGPIPE


# -- reading ---------------------------------------------------------------------


def _ids(spool: Spool, held: bool) -> list[str]:
    try:
        return spool.ids(held)
    except FileNotFoundError:
        return []  # no spool yet: nothing queued


def _envelopes(ctx: _Ctx) -> Iterator[QueueEnvelope]:
    for qid in sorted(_ids(ctx.spool, False) + _ids(ctx.spool, True)):
        try:
            yield ctx.spool.load(qid)
        except MessageNotFound:
            continue  # delivered or deleted while we looked
        except RelayError as exc:
            print(f"{PREFIX}: {qid}: {exc}", file=sys.stderr)


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _span(seconds: float) -> str:
    """Compact, rounded down: 45s, 12m, 3h, 2d."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _next(env: QueueEnvelope, rcpt_state: RcptState, next_attempt: float) -> float | None:
    """When a recipient is tried next; None when it is final."""
    return None if rcpt_state.final else max(next_attempt, env.created)


def _as_json(env: QueueEnvelope) -> dict[str, Any]:
    return {
        "id": env.id,
        "sender": env.sender,
        "created": _iso(env.created),
        "held": env.held,
        "size": env.size,
        "bounce": env.bounce,
        "recipients": [
            {
                "address": r.address,
                "state": str(r.state),
                "attempts": r.attempts,
                "next_attempt": _iso(_next(env, r.state, r.next_attempt)),
                "last_reason": r.last_reason,
            }
            for r in env.recipients
        ],
    }


def _list(ctx: _Ctx, args: argparse.Namespace) -> int:
    envs = list(_envelopes(ctx))
    if getattr(args, "json", False):
        ctx.say(json.dumps([_as_json(e) for e in envs], indent=2))
        return 0
    now = ctx.clock()
    for env in envs:
        flags = "  HELD" if env.held else ""
        flags += "  (bounce)" if env.bounce else ""
        ctx.say(f"{env.id}  {_span(now - env.created):>4}  {env.size:>9}  <{env.sender}>{flags}")
        for r in env.recipients:
            nxt = _next(env, r.state, r.next_attempt)
            when = (
                "" if nxt is None else f"  next {'now' if nxt <= now else 'in ' + _span(nxt - now)}"
            )
            reason = f"  {r.last_reason}" if r.last_reason else ""
            ctx.say(f"    {r.address}  {r.state}  attempts={r.attempts}{when}{reason}")
    held = sum(e.held for e in envs)
    ctx.say(f"{len(envs)} message(s), {held} held" if envs else "queue is empty")
    return 0


def _show(ctx: _Ctx, args: argparse.Namespace) -> int:
    env = ctx.spool.load(args.id)
    try:
        headers = bounce.original_headers(ctx.spool.read_data(env.id)).decode("utf-8", "replace")
    except RelayError as exc:
        headers = f"({exc})\r\n"
    if getattr(args, "json", False):
        raw = _as_json(env) | {"mail_options": env.mail_options, "headers": headers}
        raw["client"] = vars(env.client) if env.client else None
        for out, r in zip(raw["recipients"], env.recipients, strict=True):
            out["history"] = [vars(a) for a in r.history]
        ctx.say(json.dumps(raw, indent=2))
        return 0
    now = ctx.clock()
    ctx.say(
        f"id:       {env.id}{'  (held)' if env.held else ''}{'  (bounce)' if env.bounce else ''}"
    )
    ctx.say(f"created:  {_iso(env.created)} ({_span(now - env.created)} ago)")
    ctx.say(f"sender:   <{env.sender}>  {' '.join(env.mail_options)}".rstrip())
    ctx.say(f"size:     {env.size}")
    if env.client:
        c = env.client
        ctx.say(f"client:   {c.ip}:{c.port} helo={c.helo} user={c.user} listener={c.listener}")
        ctx.say(f"tls:      {c.tls_version} {c.tls_cipher}")
    ctx.say("headers:")
    for line in headers.splitlines():
        ctx.say(f"  {line}")
    ctx.say("recipients:")
    for r in env.recipients:
        nxt = _next(env, r.state, r.next_attempt)
        ctx.say(f"  {r.address}  {r.state}  attempts={r.attempts}  next={_iso(nxt) or '-'}")
        for a in r.history:
            where = f" mx={a.mx} ip={a.ip} tls={a.tls}" if a.mx else ""
            ctx.say(f"    {_iso(a.at)} {a.outcome}{where}: {a.reason}")
    return 0


# -- changing ----------------------------------------------------------------------


@contextmanager
def _locked(ctx: _Ctx, qid: str) -> Iterator[QueueEnvelope]:
    """The message, loaded under its lock; MessageBusy if `serve` is delivering it."""
    if not ctx.spool.exists(qid):
        raise MessageNotFound(qid)
    with ctx.spool.lock(qid):
        yield ctx.spool.load(qid)


def _kick(ctx: _Ctx) -> None:
    if not ctx.spool.kick():
        ctx.say("note: no running relay answered; it picks the change up when it (re)starts")


def _retry(ctx: _Ctx, args: argparse.Namespace) -> int:
    if args.all == bool(args.id):
        raise RelayError("give either a queue id or --all")
    if args.id:
        held = _retry_one(ctx, args.id)
        ctx.say(
            f"{args.id}: due now"
            + (f" but held; `queue release {args.id}` to send" if held else "")
        )
    else:
        done = busy = 0
        for qid in _ids(ctx.spool, False):
            try:
                _retry_one(ctx, qid)
                done += 1
            except MessageNotFound:
                continue
            except MessageBusy:  # being delivered right now anyway
                busy += 1
        ctx.say(
            f"{done} message(s) due now" + (f", {busy} being delivered already" if busy else "")
        )
    _kick(ctx)
    return 0


def _retry_one(ctx: _Ctx, qid: str) -> bool:
    with _locked(ctx, qid) as env:
        now = ctx.clock()
        for r in env.recipients:
            if not r.state.final:
                r.next_attempt = now
        ctx.spool.update(env)
        return env.held


def _hold(ctx: _Ctx, args: argparse.Namespace) -> int:
    with _locked(ctx, args.id) as env:
        if env.held:
            ctx.say(f"{env.id}: already held")
            return 0
        ctx.spool.hold(env.id)
    ctx.say(f"{env.id}: held")
    return 0


def _release(ctx: _Ctx, args: argparse.Namespace) -> int:
    with _locked(ctx, args.id) as env:
        if not env.held:
            ctx.say(f"{env.id}: not held")
            return 0
        ctx.spool.release(env.id)
    ctx.say(f"{env.id}: released")
    _kick(ctx)
    return 0


def _delete(ctx: _Ctx, args: argparse.Namespace) -> int:
    with _locked(ctx, args.id) as env:
        ctx.spool.remove(env.id)
    ctx.say(f"{env.id}: deleted (no bounce sent)")
    return 0


def _bounce(ctx: _Ctx, args: argparse.Namespace) -> int:
    with _locked(ctx, args.id) as env:
        now = ctx.clock()
        pending = [r for r in env.recipients if not r.state.final]
        for r in pending:
            r.record(Attempt(at=now, outcome=AttemptOutcome.OPERATOR, reason=OPERATOR_REASON))
        wanted = [r for r in pending if bounce.wants_notice(r, bounce.DsnKind.FAILED)]
        if not env.sender or env.bounce:  # RFC 3464: never a DSN for a null sender
            note = "no DSN (null sender)"
        elif not wanted:
            note = "no DSN (NOTIFY=NEVER or nothing pending)"
        else:
            # The DSN is stored before the recipients are marked bounced (never lost).
            dsn_env, blob = bounce.dsn_message(
                env,
                wanted,
                ctx.cfg.hostname,
                now,
                ctx.spool.read_data(env.id),
                bounce.DsnKind.FAILED,
                ctx.spool.new_id(),
            )
            ctx.spool.store(dsn_env, blob)
            note = f"DSN {dsn_env.id} queued to <{env.sender}>"
        for r in pending:
            r.state = RcptState.BOUNCED
        ctx.spool.update(env)
        if env.done:
            ctx.spool.remove(env.id)
    ctx.say(f"{env.id}: bounced {len(pending)} recipient(s); {note}")
    _kick(ctx)
    return 0


_COMMANDS: dict[str, Callable[[_Ctx, argparse.Namespace], int]] = {
    "list": _list,
    "show": _show,
    "retry": _retry,
    "hold": _hold,
    "release": _release,
    "delete": _delete,
    "bounce": _bounce,
}
