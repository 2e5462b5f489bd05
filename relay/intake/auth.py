"""SMTP AUTH exchange for the listener: SASL PLAIN and LOGIN (RFC 4954, RFC 4616).

Role: run one AUTH command once the session has decided AUTH may be attempted -
read the initial response or answer 334 challenges, decode the credentials, verify
them against the users database *in a thread* (scrypt is CPU- and memory-heavy and
must not stall other sessions), and on failure count it against the client IP and
answer 535 only after a delay that grows with recent failures (slows guessing).

Not: deciding whether AUTH is allowed (TLS, EHLO, transaction state, the per-IP
block - relay.intake.session does that), nor remembering who authenticated.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import logging
from typing import Protocol

from relay.intake import replies
from relay.intake.gate import Gate, IPAddress
from relay.intake.replies import Reply
from relay.intake.users import UserDb
from relay.log import event

log = logging.getLogger("relay.listener")

MECHANISMS = ("LOGIN", "PLAIN")
DELAY_STEP = 0.5  # seconds added per recent failure before answering 535
DELAY_MAX = 3.0


class Conversation(Protocol):
    """What the exchange needs from the SMTP session."""

    async def reply(self, reply: Reply) -> None: ...

    async def read_line(self) -> bytes | None: ...  # None: over the line limit (discarded)

    async def close_with(self, reply: Reply) -> None: ...


class PasswordChecker:
    """The users database and the threads that check passwords against it.

    scrypt is deliberately slow; it runs in this small executor of its own, so an AUTH
    flood queues here and never occupies the default executor that the spool's writes
    and the scheduler's reads run in."""

    def __init__(self, users: UserDb, executor: concurrent.futures.Executor) -> None:
        self.users = users
        self._executor = executor

    async def verify(self, user: str, password: str) -> bool:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.users.verify, user, password)


class AuthExchange:
    def __init__(self, passwords: PasswordChecker, gate: Gate, addr: IPAddress) -> None:
        self._passwords = passwords
        self._gate = gate
        self._addr = addr

    async def run(self, talk: Conversation, mechanism: str, initial: str) -> str | None:
        """The authenticated user name, or None (every reply already sent)."""
        credentials = await self._read(talk, mechanism.upper(), initial)
        if credentials is None:
            return None
        user, password = credentials
        if not self._gate.auth_begin(self._addr):
            event(log, "auth_refused", logging.WARNING, client=self._addr, user=user)
            await talk.close_with(replies.TOO_MANY_AUTH_FAILURES)
            return None
        ok = False
        try:
            ok = await self._passwords.verify(user, password)
        finally:  # a check cut short (the client left) counts as a failure
            failures = self._gate.auth_end(self._addr, failed=not ok)
        if ok:
            event(log, "auth_ok", client=self._addr, user=user)
            await talk.reply(replies.AUTH_OK)
            return user
        event(log, "auth_failed", logging.WARNING, client=self._addr, user=user, n=failures)
        await asyncio.sleep(min(failures * DELAY_STEP, DELAY_MAX))
        await talk.reply(replies.AUTH_INVALID)
        return None

    async def _read(
        self, talk: Conversation, mechanism: str, initial: str
    ) -> tuple[str, str] | None:
        if mechanism == "PLAIN":  # RFC 4616: authzid NUL authcid NUL passwd
            blob = await _response(talk, initial, "")
            if blob is None:
                return None
            parts = blob.split(b"\x00")
            if len(parts) != 3 or (parts[0] and parts[0] != parts[1]):
                await talk.reply(replies.AUTH_INVALID)  # no acting as someone else
                return None
            raw_user, raw_password = parts[1], parts[2]
        elif mechanism == "LOGIN":
            user_blob = await _response(talk, initial, "Username:")
            password_blob = None if user_blob is None else await _response(talk, "", "Password:")
            if user_blob is None or password_blob is None:
                return None
            raw_user, raw_password = user_blob, password_blob
        else:
            await talk.reply(replies.AUTH_BAD_MECHANISM)
            return None
        try:
            return raw_user.decode("utf-8"), raw_password.decode("utf-8")
        except UnicodeDecodeError:
            await talk.reply(replies.AUTH_BAD_BASE64)
            return None


async def _response(talk: Conversation, initial: str, challenge: str) -> bytes | None:
    """Initial response or the answer to a 334 challenge, decoded; None if answered."""
    if initial == "=":
        return b""  # RFC 4954 4: "=" is an empty initial response
    if initial:
        try:
            return base64.b64decode(initial, validate=True)
        except binascii.Error:
            await talk.reply(replies.AUTH_BAD_BASE64)
            return None
    # RFC 4954 4: "334 " and the base64 challenge; the trailing space is mandatory.
    await talk.reply(Reply(334, "", base64.b64encode(challenge.encode()).decode("ascii")))
    line = await talk.read_line()
    if line is None:  # RFC 4954 4: 500 5.5.6, and the session goes on
        await talk.reply(replies.AUTH_LINE_TOO_LONG)
        return None
    line = line.strip()
    if line == b"*":  # RFC 4954 4: the client cancels the exchange
        await talk.reply(replies.AUTH_ABORTED)
        return None
    try:
        return base64.b64decode(line, validate=True)
    except binascii.Error:
        await talk.reply(replies.AUTH_BAD_BASE64)
        return None
