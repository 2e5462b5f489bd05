"""Interop (issue 15): the receiving MTAs people run - Postfix and Exim from Debian - as
the MX behind `tls-relay serve`, at every TLS level a loopback MX with a test CA can meet
(encrypt, verify, secure), with SMTPUTF8, 8BITMIME, DSN and CHUNKING all offered or all
withheld at the receiver.  One MX and one relay per (MTA, offered) pair, several messages each:

- plain, to a domain at each level: delivered, the level met in the delivery log line,
  its lines that start with a period intact (BDAT sends them as they are, DATA
  dot-stuffs them: RFC 3030, RFC 5321 4.5.2), and BDAT used exactly when offered;
- SMTPUTF8 declared, ASCII only: delivered either way (the declaration is not needed);
- a UTF-8 address: delivered when offered, else bounced (DSN to the sender);
- BODY=8BITMIME with an 8-bit body: as is when offered, else converted to 7 bit and
  decoding back to the same text;
- NOTIFY=SUCCESS,FAILURE ORCPT ENVID RET=HDRS: passed on when DSN is offered (the MX
  itself then reports the delivery), else the relay's own "relayed" DSN.

Every DSN goes to the sender's domain, which the same MX receives.  Only 127.0.0.1.
The README's "Works with" rows for these MTAs are checked against MTAS and COVERS.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import re
import smtplib
import ssl
import time
from collections.abc import Iterator, Sequence
from email.message import Message
from pathlib import Path
from typing import Protocol

import pytest
import trustme

from tests.e2e.test_delivery_e2e import delivery_config, delivery_lines
from tests.fixtures import postfix
from tests.fixtures.dns import DnsServer
from tests.fixtures.exim import exim_instance
from tests.fixtures.postfix import Delivered, postfix_instance
from tests.fixtures.relay_proc import HOST, RelayFactory, RelayProcess

pytestmark = [pytest.mark.e2e]

# MTA -> (its MX host name, how the README names it)
MTAS = {
    "postfix": ("mx.postfix.test", "Postfix 3.7 (Debian)"),
    "exim": ("mx.exim.test", "Exim 4.96 (Debian)"),
}
LEVELS = ("encrypt", "verify", "secure")  # recipient domain <level>.test gets that level
EXTENSIONS = {"smtputf8", "8bitmime", "dsn", "chunking"}
COVERS = (
    "levels encrypt/verify/secure, each with SMTPUTF8, 8BITMIME, DSN and CHUNKING"
    " offered or withheld"
)
DOTS = b"hi\r\n.one period\r\n..two\r\n.\r\n. \r\nend\r\n"  # RFC 5321 4.5.2 at work
SENDER = "app@sender.test"
UTF8_RCPT = "jürgen@verify.test"
TEXT = "Grüße aus Köln: naïve café, 東京.\r\n"
ENVID = "matrix-envid"


class Mx(Protocol):
    port: int

    def wait_messages(self, count: int, timeout: float = ...) -> list[Delivered]: ...

    def log_text(self) -> str: ...


@contextlib.contextmanager
def receiving_mx(mta: str, ca: trustme.CA, offered: bool) -> Iterator[Mx]:
    """Postfix or Exim, certificate for its MX name and for secure.test (the `secure`
    level wants the recipient domain), SMTPUTF8/8BITMIME/DSN advertised or not."""
    names = (MTAS[mta][0], "secure.test")
    if mta == "exim":
        switches = {"smtputf8": offered, "eightbitmime": offered, "dsn": offered}
        switches["chunking"] = offered
        with exim_instance(ca, names=names, **switches) as mx:
            yield mx
        return
    if not postfix.available():
        pytest.skip("needs Debian's postfix binaries and root")
    main = {"smtputf8_enable": "no", "smtpd_discard_ehlo_keywords": "8bitmime, dsn, chunking"}
    with postfix_instance(ca, names=names, main={} if offered else main) as mx:
        yield mx


def advertised(port: int, ca: trustme.CA) -> set[str]:
    """The EHLO keywords the MX offers inside TLS (what the relay will see)."""
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.check_hostname = False
    with smtplib.SMTP(HOST, port, local_hostname="probe.test", timeout=15) as client:
        client.starttls(context=ctx)
        client.ehlo("probe.test")
        return set(client.esmtp_features)


def route_to(dns: DnsServer, mx_name: str) -> None:
    dns.add(mx_name, "A", "127.0.0.1")
    for domain in (*(f"{level}.test" for level in LEVELS), "sender.test"):
        dns.add(domain, "MX", f"10 {mx_name}.")


def message(msgid: str, rcpt: str, subject: str, extra: str = "", body: bytes = b"hi\r\n") -> bytes:
    head = f"From: <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\n"
    head += f"Message-ID: <{msgid}@matrix.test>\r\n{extra}\r\n"
    return head.encode() + body


def submit_all(proc: RelayProcess) -> None:
    """Every message of the matrix, over one STARTTLS session with Python's smtplib."""
    plain = [f"plain@{level}.test" for level in LEVELS]
    eight = "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
    eight += "Content-Transfer-Encoding: 8bit\r\n"
    sends: list[tuple[list[str], bytes, list[str], list[str]]] = [
        (plain, message("plain", plain[0], "plain", body=DOTS), [], []),
        (["ascii@verify.test"], message("ascii", "ascii@verify.test", "ascii"), ["SMTPUTF8"], []),
        ([UTF8_RCPT], message("utf8", UTF8_RCPT, "utf8"), ["SMTPUTF8"], []),
        (
            ["eight@verify.test"],
            message("eight", "eight@verify.test", "eight", eight, TEXT.encode()),
            ["BODY=8BITMIME"],
            [],
        ),
        (
            ["dsn@verify.test"],
            message("dsn", "dsn@verify.test", "dsn"),
            ["RET=HDRS", f"ENVID={ENVID}"],
            ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;orig@verify.test"],
        ),
    ]
    with smtplib.SMTP(HOST, proc.starttls_port, timeout=15) as client:
        client.starttls(context=proc.client_context())
        for rcpts, data, mail_options, rcpt_options in sends:
            assert client.sendmail(SENDER, rcpts, data, mail_options, rcpt_options) == {}


def by_id(got: Sequence[Delivered]) -> dict[str, list[Delivered]]:
    """Messages by the local part of their Message-ID; DSNs (from <>) under "dsn:<action>"."""
    out: dict[str, list[Delivered]] = {}
    for item in got:
        if item.return_path == "<>":
            key = f"dsn:{report(item)[1][0]['Action']}"
        else:
            key = str(item.message["Message-ID"]).strip("<>").split("@")[0]
        out.setdefault(key, []).append(item)
    return out


def report(item: Delivered) -> tuple[Message, list[Message], Message]:
    """A DSN's per-message fields, per-recipient fields and returned part (RFC 3464)."""
    msg = email.message_from_bytes(item.raw, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/report", item.raw
    parts = msg.get_payload()
    assert isinstance(parts, list)
    status = next(p for p in parts if p.get_content_type().endswith("delivery-status"))
    blocks = status.get_payload()  # RFC 3464 2.1: 7-bit text, parsed into field blocks
    assert isinstance(blocks, list), status
    returned = next(
        p for p in parts if p.get_content_type() in ("text/rfc822-headers", "message/rfc822")
    )
    return blocks[0], blocks[1:], returned


@pytest.mark.parametrize("offered", [True, False], ids=["offered", "withheld"])
@pytest.mark.parametrize("mta", list(MTAS))
def test_relay_delivers_to_the_mta(
    mta: str,
    offered: bool,
    relay: RelayFactory,
    dns_server: DnsServer,
    ca: trustme.CA,
    ca_file: Path,
) -> None:
    with receiving_mx(mta, ca, offered) as mx:
        assert advertised(mx.port, ca) & EXTENSIONS == (EXTENSIONS if offered else set())
        version = MTAS[mta][1].split()[1]  # the README's, as the MTA logs it when starting
        assert re.search(rf"(version|exim) {re.escape(version)}[. ]", mx.log_text()), version
        route_to(dns_server, MTAS[mta][0])
        levels = {f"{level}.test": {"level": level} for level in LEVELS}
        policy = {"default": {"level": "verify"}, "domains": levels}
        proc = relay(extra_config=delivery_config(dns_server, mx.port, ca_file, policy))
        submit_all(proc)
        try:
            got = by_id(mx.wait_messages(8, timeout=30))
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nrelay log:\n{proc.log_text()}") from None
        check_levels(proc, got, MTAS[mta][0])
        check_smtputf8(proc, got, offered)
        check_8bitmime(proc, got, offered)
        check_dsn(proc, got, offered, MTAS[mta][0])
        assert sum(len(v) for v in got.values()) == 8, sorted(got)
        assert proc.stop() == 0  # its pooled sessions end: Postfix logs their counts
        check_chunking(mta, mx, got, offered)


def check_levels(proc: RelayProcess, got: dict[str, list[Delivered]], mx_name: str) -> None:
    assert sorted(m.recipient for m in got["plain"]) == sorted(f"plain@{lv}.test" for lv in LEVELS)
    for level in LEVELS:
        (line,) = delivery_lines(proc, rcpt=f"plain@{level}.test")
        assert f"mx={mx_name} ip=127.0.0.1" in line and "outcome=delivered" in line, line
        assert f"level_required={level} level_met={level} " in line, line
        assert re.search(r" tls=TLSv1\.[23] cipher=\S+ cert_sha256=[0-9a-f]{64} ", line), line


def check_chunking(mta: str, mx: Mx, got: dict[str, list[Delivered]], offered: bool) -> None:
    """The periods arrived as sent; the MTA's own log shows BDAT exactly when offered."""
    for item in got["plain"]:
        body = item.raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1]
        assert body == DOTS.replace(b"\r\n", b"\n"), item.raw
    log = mx.log_text()
    for _ in range(100):  # bounded: Postfix logs a session's counts when it ends
        if mta != "postfix" or log.count(" connect from ") == log.count(" disconnect from "):
            break
        time.sleep(0.1)
        log = mx.log_text()
    if mta == "postfix":  # smtpd's per-session command counts
        used = re.findall(r" (bdat|data)=\d+", log)
        assert set(used) == {"bdat" if offered else "data"}, used
    else:  # Exim logs "K" in a message's <= line when it came by CHUNKING
        arrivals = [ln for ln in log.splitlines() if " <= " in ln and "relay.test" in ln]
        assert arrivals and all((" K " in ln or ln.endswith(" K")) is offered for ln in arrivals), (
            arrivals
        )


def check_smtputf8(proc: RelayProcess, got: dict[str, list[Delivered]], offered: bool) -> None:
    (ascii_only,) = got["ascii"]  # declared SMTPUTF8, needs none of it: delivered either way
    assert ascii_only.recipient == "ascii@verify.test"
    if offered:
        (utf8,) = got["utf8"]
        assert utf8.recipient == UTF8_RCPT and UTF8_RCPT.encode() in utf8.raw
        return
    assert "utf8" not in got
    (line,) = delivery_lines(proc, rcpt=f'"{UTF8_RCPT}"')  # logged quoted
    assert "outcome=bounced" in line and "lacks SMTPUTF8" in line, line
    (failed,) = got["dsn:failed"]
    _, (rcpt,), returned = report(failed)
    assert failed.recipient == SENDER and rcpt["Status"] == "5.6.7", rcpt  # RFC 6531
    assert rcpt["Final-Recipient"] == "utf-8; j\\x{FC}rgen@verify.test"  # RFC 6533 3
    assert b"<utf8@matrix.test>" in returned.get_payload(decode=True)


def check_8bitmime(proc: RelayProcess, got: dict[str, list[Delivered]], offered: bool) -> None:
    (eight,) = got["eight"]
    cte = str(eight.message["Content-Transfer-Encoding"]).lower()
    if offered:  # as is
        assert cte == "8bit" and TEXT.encode().replace(b"\r\n", b"\n") in eight.raw
    else:  # RFC 6152 §3: made 7-bit, the same text once decoded
        assert cte in ("quoted-printable", "base64") and eight.raw.isascii(), eight.raw
    assert ("converted_to_7bit" in proc.log_text()) is not offered
    text = eight.message.get_content()
    assert text.replace("\r\n", "\n") == TEXT.replace("\r\n", "\n")


def check_dsn(
    proc: RelayProcess, got: dict[str, list[Delivered]], offered: bool, mx_name: str
) -> None:
    (dsn,) = got["dsn"]
    assert dsn.recipient == "dsn@verify.test"
    # Offered: the parameters went on and the MX reports the delivery; else the relay
    # says it relayed the message to a server that will not (RFC 3461 §6.2.3).
    (notice,) = got["dsn:delivered" if offered else "dsn:relayed"]
    assert notice.recipient == SENDER
    fields, rcpts, returned = report(notice)
    assert str(fields["Reporting-MTA"]) == f"dns; {mx_name if offered else 'relay.test'}"
    assert str(fields["Original-Envelope-Id"]) == ENVID
    (rcpt,) = rcpts
    assert re.sub(r"\s", "", str(rcpt["Original-Recipient"])).lower() == "rfc822;orig@verify.test"
    assert str(rcpt["Status"]).startswith("2.")
    assert returned.get_content_type() == "text/rfc822-headers"  # RET=HDRS
    assert b"<dsn@matrix.test>" in returned.get_payload(decode=True)
    relayed = [ln for ln in proc.log_text().splitlines() if "dsn_queued" in ln and "relayed" in ln]
    assert len(relayed) == (0 if offered else 1), relayed


def test_the_readme_lists_these_mtas() -> None:
    """README "Works with": one row per MTA of the matrix, saying what it covers."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rows = [ln for ln in readme.splitlines() if "| receiving MX |" in ln]
    for _, title in MTAS.values():
        (row,) = [ln for ln in rows if ln.startswith(f"| {title} |")]
        assert f"{COVERS} (`{Path(__file__).name}`)" in row, row
