"""Sending RFC 8460 reports of finished UTC days, by mail and by HTTPS.

Role: :meth:`ReportSender.send_due` takes each day with counts (before today, or today
too when asked), merges every process's counts, and for each policy domain that
publishes one ``v=TLSRPTv1`` record in ``_smtp._tls.DOMAIN`` builds the report: a
``mailto:`` address gets a message through the relay's own queue (*submit*), an
``https:`` URI a POST of the gzip file, queued under ``DIR/posts/`` and retried with
backoff for a day (:meth:`retry_posts`).  A day's counts are removed once every domain
of it was handled; a DNS failure keeps the day for the next run.  The reports'
own deliveries are not counted (the deliverer skips mail from ``tls_reports.from``).
:func:`send_after` picks the time after midnight (UTC) a day's reports leave: random
within a window, fixed per day and host, so not every relay in the world posts at 00:00.
Not: counting (relay.tlsrpt.counts) or the report's format (relay.tlsrpt.report).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from relay.config import TlsReportsConfig
from relay.log import event
from relay.safeio import atomic_write
from relay.tlspolicy.contexts import trust_store_context
from relay.tlspolicy.stsfetch import RelayResolver
from relay.tlsrpt import counts, report

log = logging.getLogger("relay.tlsrpt")

WINDOW = 4 * 3600.0  # reports leave within this many seconds after the day ends
POST_TIMEOUT = 30.0
POST_BACKOFF = (60.0, 300.0, 900.0, 3600.0)  # then hourly
POST_GIVE_UP = 86400.0  # RFC 8460 5.4: a report nobody takes within a day is dropped
SETTLE = 3 * counts.FLUSH_EVERY  # after midnight, until every process wrote the day out

Txt = Callable[[str], Awaitable[tuple[str, ...] | None]]
Lookup = Callable[[str], Awaitable[tuple[str, ...]]]
Submit = Callable[[str, list[str], bytes], None]


def send_after(day: str, hostname: str) -> float:
    """The UNIX time at which *day*'s reports may leave (midnight after it + a fixed
    random share of WINDOW)."""
    _, end = report.day_range(day)
    digest = hashlib.sha256(f"{hostname}/{day}".encode()).digest()
    return end.timestamp() + int.from_bytes(digest[:4]) / 2**32 * WINDOW


class ReportSender:
    def __init__(
        self,
        root: Path,
        cfg: TlsReportsConfig,
        submitter: str,
        txt: Txt,
        lookup: Lookup,
        submit: Submit,
        ca_file: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = root
        self.posts = root / "posts"
        self.cfg = cfg
        self.submitter = submitter  # the relay's host name (RFC 8460 5.1 "sender")
        self._txt = txt
        self._lookup = lookup
        self._submit = submit
        self._context = trust_store_context(ca_file)
        self._clock = clock

    # ---- reports ---------------------------------------------------------------------------

    async def send_due(self, include_today: bool = False, wait: bool = False) -> list[str]:
        """Send the reports that are due; one line per report or skipped domain.
        *wait*: only days past their :func:`send_after` time (serve); else every
        finished day (the command line) - but never one that ended less than a flush
        ago, whose last counts may still be on their way to disk."""
        now = self._clock()
        today = dt.datetime.fromtimestamp(now, dt.UTC).date().isoformat()
        done: list[str] = []
        for day in counts.days(self.root):
            if day > today or (day == today and not include_today):
                continue
            ended = report.day_range(day)[1].timestamp()
            if day < today and now < ended + SETTLE:
                continue
            if wait and day < today and now < send_after(day, self.submitter):
                continue
            done += await self._send_day(day)
        await self.retry_posts()
        return done

    async def _send_day(self, day: str) -> list[str]:
        """Each domain of *day* once: a handled domain is recorded in ``sent/DAY`` so a
        later run (after a DNS failure of another domain) does not send it again."""
        lines: list[str] = []
        complete = True
        handled = _handled(self.root, day)
        for domain, policies in sorted(counts.load_day(self.root, day).items()):
            if domain in handled:
                continue
            try:
                line, finished = await self._send_domain(day, domain, policies)
            except Exception as exc:  # one domain's trouble never holds up the others
                line, finished = f"failed: {exc}", False
                event(log, "tls_report_failed", logging.WARNING, domain=domain, day=day, error=exc)
            lines.append(f"{day} {domain}: {line}")
            if finished:
                _mark_handled(self.root, day, domain)
            else:
                complete = False
        if complete:
            counts.remove_day(self.root, day)
            (self.root / "sent" / day).unlink(missing_ok=True)
        return lines

    async def _send_domain(
        self, day: str, domain: str, policies: list[counts.PolicyCounts]
    ) -> tuple[str, bool]:
        records = await self._txt(f"_smtp._tls.{domain}")
        if records is None:
            return "_smtp._tls lookup failed; kept for later", False
        rua = report.parse_tlsrpt(records)
        if not rua:
            return "publishes no TLS-RPT record; nothing sent", True
        unique = uuid.uuid4().hex
        report_id = f"{day}.{domain}.{unique}@{self.submitter}"
        doc = report.build(self.cfg.organization, self.cfg.contact, day, report_id, policies)
        body = report.gzipped(doc)
        return "; ".join(self._deliver(uri, domain, day, unique, body) for uri in rua), True

    def _deliver(self, uri: str, domain: str, day: str, unique: str, body: bytes) -> str:
        if uri.startswith("mailto:"):
            to = uri[len("mailto:") :].split("?")[0]
            if not _is_address(to):
                return f"not an address in its rua: {to!r}; skipped"
            data = report.mail(
                self.cfg.sender, to, self.submitter, domain, day, unique, body, self._clock()
            )
            self._submit(self.cfg.sender, [to], data)
            event(log, "tls_report_queued", domain=domain, day=day, to=to, report_id=unique)
            return f"mailed to {to} (queued)"
        self._queue_post(uri, domain, day, unique, body)
        return f"POST to {uri} queued"

    # ---- HTTPS posts, retried for a day ------------------------------------------------------

    def _queue_post(self, uri: str, domain: str, day: str, report_id: str, body: bytes) -> None:
        self.posts.mkdir(parents=True, exist_ok=True)
        now = self._clock()
        doc = {
            "uri": uri,
            "domain": domain,
            "day": day,
            "report_id": report_id,
            "created": now,
            "next": now,
            "attempts": 0,
            "body": base64.b64encode(body).decode(),
        }
        _write_json(self.posts / f"{uuid.uuid4().hex}.json", doc)

    async def retry_posts(self) -> None:
        """POST every due queued report once; give up on those older than a day."""
        if not self.posts.is_dir():
            return
        connector = aiohttp.TCPConnector(
            resolver=RelayResolver(self._lookup), ssl=self._context, use_dns_cache=False
        )
        timeout = aiohttp.ClientTimeout(total=POST_TIMEOUT)
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, trust_env=False
        ) as client:
            for path in sorted(self.posts.glob("*.json")):
                await self._post_one(client, path)

    async def _post_one(self, client: aiohttp.ClientSession, path: Path) -> None:
        try:
            doc: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        now = self._clock()
        if doc["next"] > now:
            return
        problem = await _post(client, doc["uri"], base64.b64decode(doc["body"]))
        fields = {"uri": doc["uri"], "domain": doc["domain"], "day": doc["day"]}
        if problem is None:
            event(log, "tls_report_posted", report_id=doc["report_id"], **fields)
            path.unlink(missing_ok=True)
            return
        if now - doc["created"] >= POST_GIVE_UP:
            event(log, "tls_report_given_up", logging.WARNING, error=problem, **fields)
            path.unlink(missing_ok=True)
            return
        doc["attempts"] += 1
        doc["next"] = now + POST_BACKOFF[min(doc["attempts"], len(POST_BACKOFF)) - 1]
        _write_json(path, doc)
        event(log, "tls_report_post_failed", logging.WARNING, error=problem, **fields)


async def _post(client: aiohttp.ClientSession, uri: str, body: bytes) -> str | None:
    headers = {"Content-Type": report.MEDIA_TYPE, "User-Agent": "tls-relay (TLS-RPT)"}
    try:
        async with client.post(uri, data=body, headers=headers, allow_redirects=False) as r:
            if 200 <= r.status < 300:
                return None
            return f"HTTP {r.status}"
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return str(exc) or type(exc).__name__


def _is_address(text: str) -> bool:
    local, at, domain = text.rpartition("@")
    return (
        bool(at and local and domain)
        and text.isprintable()
        and not any(c.isspace() or c in "<>," for c in text)
    )


def _handled(root: Path, day: str) -> set[str]:
    try:
        return set((root / "sent" / day).read_text().split())
    except FileNotFoundError:
        return set()


def _mark_handled(root: Path, day: str, domain: str) -> None:
    (root / "sent").mkdir(exist_ok=True)
    with (root / "sent" / day).open("a") as fh:
        fh.write(domain + "\n")


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    """A queued report is kept like any file the relay must not lose (relay.safeio)."""
    atomic_write(path, json.dumps(doc).encode(), 0o640)


async def run(sender: ReportSender, every: float = 600.0) -> None:
    """serve's loop: send what is due (after each day's window) and retry posts."""
    while True:
        try:
            await sender.send_due(wait=True)
        except Exception:  # never let the loop die: reports would stop silently
            log.exception("tls_report_error")
        await asyncio.sleep(every)
