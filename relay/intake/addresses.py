"""Envelope addresses: RFC 5321 path syntax for MAIL FROM and RCPT TO (pure).

Role: parse the argument of MAIL and RCPT (:func:`parse_mail`, :func:`parse_rcpt`):
split it into path and ESMTP parameters, check the parameters we advertise (SIZE,
BODY, SMTPUTF8), validate the path (RFC 5321 section 4.1.2 grammar, section 4.5.3.1
length limits) and return either the normalised result or the
:class:`~relay.intake.replies.Reply` to refuse it with.  Stricter than the RFC where a
relay should be:

* source routes (``<@a,@b:user@c>``), ``%`` hacks and ``!`` bang paths are refused,
  not silently stripped: they ask the next hop to relay further than we decided;
* every address needs a domain (no ``<postmaster>``: we deliver nothing locally);
* recipients may not be IP address literals (``user@[192.0.2.1]``): delivery and the
  TLS policy work per domain;
* ``RCPT TO:<>`` is refused; ``MAIL FROM:<>`` (the null reverse-path) is allowed;
* non-ASCII (RFC 6531) only when MAIL carried the SMTPUTF8 parameter.

Normalisation: the domain takes its one normal form (relay.domains: IDNA A-labels,
lower case; a domain IDNA refuses gets 553), a quoted local part that needs no quotes
is unquoted; the local part's case is kept (RFC 5321 2.4: it is case-sensitive).
Not: DNS lookups or any decision about *whether* the client may relay.
"""

from __future__ import annotations

import ipaddress
import re
import string
from dataclasses import dataclass

from relay.domains import normalize_domain
from relay.errors import InvalidDomain
from relay.intake import replies
from relay.intake.replies import Reply

MAX_LOCAL_PART = 64  # RFC 5321 4.5.3.1.1, octets
MAX_DOMAIN = 255  # RFC 5321 4.5.3.1.2, octets
MAX_PATH = 256  # RFC 5321 4.5.3.1.3, octets including the angle brackets
MAX_LABEL = 63  # RFC 1035 2.3.4

# RFC 5322 atext without "%" and "!" (percent hack and bang paths, see the docstring).
_ATEXT = frozenset(string.ascii_letters + string.digits + "#$&'*+-/=?^_`{|}~")
_LDH = frozenset(string.ascii_letters + string.digits + "-")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")  # RFC 5321 esmtp-keyword
_HACK_CHARS = frozenset("%!")


def _bad(sender: bool, code: int, text: str) -> Reply:
    # RFC 3463: X.1.7 bad sender address syntax, X.1.3 bad destination address syntax.
    return Reply(code, "5.1.7" if sender else "5.1.3", text)


def _path_end(text: str) -> int:
    """Index of the ``>`` closing the path that opens *text*, or -1; quotes respected."""
    quoted = escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return index
    return -1


def split_argument(arg: str | None, keyword: str) -> tuple[str, list[str]] | Reply:
    """``"FROM:<a@b> SIZE=10"`` with keyword ``"FROM:"`` -> ``("<a@b>", ["SIZE=10"])``.

    A space after the colon is tolerated (common in the wild); angle brackets are not
    optional (RFC 5321 4.1.2: Path = "<" ... ">").
    """
    syntax = Reply(501, "5.5.4", f"Syntax: {keyword}<address> [parameters]")
    if not arg or arg[: len(keyword)].upper() != keyword:
        return syntax
    rest = arg[len(keyword) :].lstrip(" ")
    if not rest.startswith("<"):
        return syntax
    end = _path_end(rest)
    if end < 0:
        return syntax
    path, tail = rest[: end + 1], rest[end + 1 :]
    if tail and not tail.startswith(" "):
        return syntax
    return path, [word for word in tail.split(" ") if word]


def parse_params(words: list[str]) -> dict[str, str | None] | Reply:
    """ESMTP parameters (RFC 5321 4.1.2 esmtp-param) -> {KEYWORD: value or None}."""
    result: dict[str, str | None] = {}
    for word in words:
        if not word:
            continue  # several spaces between parameters
        key, eq, value = word.partition("=")
        if not _KEYWORD.match(key) or (eq and not value):
            return Reply(501, "5.5.4", f"Syntax error in parameter {word[:40]!r}")
        # esmtp-value = 1*(%d33-60 / %d62-126)
        if any(not (33 <= ord(ch) <= 126) or ch == "=" for ch in value):
            return Reply(501, "5.5.4", f"Syntax error in parameter {key}")
        key = key.upper()
        if key in result:
            return Reply(501, "5.5.4", f"Duplicate parameter {key}")
        result[key] = value if eq else None
    return result


def parse_reverse_path(path: str, *, smtputf8: bool = False) -> str | Reply:
    """MAIL FROM path -> normalised sender; ``<>`` (RFC 5321 4.5.5 null path) -> ``""``."""
    if path == "<>":
        return ""
    return _parse_path(path, smtputf8=smtputf8, sender=True)


def parse_forward_path(path: str, *, smtputf8: bool = False) -> str | Reply:
    """RCPT TO path -> normalised recipient address."""
    if path == "<>":
        return _bad(False, 501, "Null recipient <> is not a valid address")
    return _parse_path(path, smtputf8=smtputf8, sender=False)


def _parse_path(path: str, *, smtputf8: bool, sender: bool) -> str | Reply:
    if not (path.startswith("<") and path.endswith(">")):
        return _bad(sender, 501, "Address must be enclosed in <>")
    try:
        octets = len(path.encode("utf-8"))
    except UnicodeEncodeError:  # undecodable bytes arrive as lone surrogates
        return _bad(sender, 501, "Address is not valid UTF-8")
    if octets > MAX_PATH:
        return _bad(sender, 553, f"Path longer than {MAX_PATH} octets")
    inner = path[1:-1]
    if inner.startswith("@"):
        return _bad(sender, 553, "Source routes are not accepted")
    if not inner.isascii() and not smtputf8:
        # RFC 6531 3.7.4.1: non-ASCII address without SMTPUTF8
        return Reply(553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter")
    split = _split_mailbox(inner, sender)
    if isinstance(split, Reply):
        return split
    local = _check_local(split[0], smtputf8=smtputf8, sender=sender)
    if isinstance(local, Reply):
        return local
    domain = _check_domain(split[1], smtputf8=smtputf8, sender=sender)
    if isinstance(domain, Reply):
        return domain
    return f"{local}@{domain}"


def _split_mailbox(inner: str, sender: bool) -> tuple[str, str] | Reply:
    if inner.startswith('"'):
        close = _closing_quote(inner)
        if close < 0:
            return _bad(sender, 501, "Unterminated quoted local part")
        local, rest = inner[: close + 1], inner[close + 1 :]
        if not rest.startswith("@"):
            return _bad(sender, 553, "Address must include a domain")
        return local, rest[1:]
    local, at, domain = inner.rpartition("@")
    if not at:
        return _bad(sender, 553, "Address must include a domain")
    if "@" in local:
        return _bad(sender, 501, "Bad local part syntax")
    return local, domain


def _closing_quote(text: str) -> int:
    escaped = False
    for index, char in enumerate(text[1:], start=1):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            return index
    return -1


def _is_text_char(char: str, smtputf8: bool) -> bool:
    # RFC 6531 3.3: UTF8-non-ascii is allowed in atext and qtextSMTP.
    return smtputf8 and not char.isascii() and char.isprintable()


def _check_local(local: str, *, smtputf8: bool, sender: bool) -> str | Reply:
    if local.startswith('"'):
        content = _unquote(local[1:-1], smtputf8)
        if content is None:
            return _bad(sender, 501, "Bad quoted local part")
        normal = content if _is_dot_string(content, smtputf8) else _quote(content)
    elif _is_dot_string(local, smtputf8):
        content = normal = local
    elif _HACK_CHARS & set(local):
        return _bad(sender, 553, "Percent hack and bang paths are not accepted")
    else:
        return _bad(sender, 501, "Bad local part syntax")
    if not content:
        return _bad(sender, 553, "Empty local part")
    if _HACK_CHARS & set(content):
        return _bad(sender, 553, "Percent hack and bang paths are not accepted")
    if len(normal.encode("utf-8")) > MAX_LOCAL_PART:
        return _bad(sender, 553, f"Local part longer than {MAX_LOCAL_PART} octets")
    return normal


def _is_dot_string(text: str, smtputf8: bool) -> bool:
    """RFC 5321 Dot-string = Atom *("." Atom), Atom = 1*atext."""
    if not text:
        return False
    for atom in text.split("."):
        if not atom or not all(ch in _ATEXT or _is_text_char(ch, smtputf8) for ch in atom):
            return False
    return True


def _unquote(body: str, smtputf8: bool) -> str | None:
    """Content of a Quoted-string (RFC 5321 qtextSMTP / quoted-pairSMTP), or None."""
    out: list[str] = []
    escaped = False
    for char in body:
        printable = 32 <= ord(char) <= 126 or _is_text_char(char, smtputf8)
        if not printable:
            return None
        if escaped:
            out.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            return None
        else:
            out.append(char)
    return None if escaped else "".join(out)


def _quote(content: str) -> str:
    escaped = content.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _check_domain(domain: str, *, smtputf8: bool, sender: bool) -> str | Reply:
    if not domain:
        return _bad(sender, 553, "Address must include a domain")
    if domain.startswith("["):
        if not sender:
            return _bad(sender, 553, "IP address literals are not accepted for recipients")
        return _address_literal(domain, sender)
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        return _bad(sender, 553, f"Domain longer than {MAX_DOMAIN} octets")
    if domain.isascii() and not all(_is_label(label, smtputf8) for label in domain.split(".")):
        return _bad(sender, 501, "Bad domain syntax")
    try:
        # The one normal form (IDNA 2008 A-labels after UTS #46 mapping, lower case):
        # a U-label or fullwidth spelling of a configured domain is that domain, under
        # its policy, routes and limits; what IDNA refuses is refused here.
        return normalize_domain(domain)
    except InvalidDomain as exc:
        return _bad(sender, 553, f"Bad domain {domain!r}: {exc.__cause__ or exc}")


def _is_label(label: str, smtputf8: bool) -> bool:
    """RFC 5321 sub-domain = Let-dig [Ldh-str]; RFC 6531 allows U-labels."""
    if not label or len(label.encode("utf-8")) > MAX_LABEL:
        return False
    if label.startswith("-") or label.endswith("-"):
        return False
    return all(ch in _LDH or (_is_text_char(ch, smtputf8) and ch.isalnum()) for ch in label)


def _address_literal(domain: str, sender: bool) -> str | Reply:
    """RFC 5321 4.1.3: ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``; general literals refused."""
    if not domain.endswith("]"):
        return _bad(sender, 501, "Bad address literal")
    body = domain[1:-1]
    if "%" in body:  # IPv6 zone ids mean nothing off this host
        return _bad(sender, 501, "Bad address literal")
    try:
        if body[:5].upper() == "IPV6:":
            return f"[IPv6:{ipaddress.IPv6Address(body[5:]).compressed}]"
        return f"[{ipaddress.IPv4Address(body)}]"
    except ValueError:
        return _bad(sender, 501, "Bad address literal")


# -- whole commands -------------------------------------------------------------------
MAIL_PARAMETERS = ("BODY", "SIZE", "SMTPUTF8", "REQUIRETLS", "RET", "ENVID")  # + RFC 3461
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*")  # RFC 3461 4: xtext
_NOTIFY = {"SUCCESS", "FAILURE", "DELAY"}


@dataclass(frozen=True)
class MailCommand:
    sender: str  # "" for the null reverse-path
    options: tuple[str, ...]  # normalised parameters, "KEY" or "KEY=value"
    smtputf8: bool


def _command(
    arg: str | None, keyword: str, extended: bool
) -> tuple[str, dict[str, str | None]] | Reply:
    split = split_argument(arg, keyword)
    if isinstance(split, Reply):
        return split
    params = parse_params(split[1])
    if isinstance(params, Reply):
        return params
    if params and not extended:
        return replies.PARAM_UNKNOWN.with_text("Parameters need EHLO")
    return split[0], params


def _mail_params_refusal(params: dict[str, str | None], max_size: int) -> Reply | None:
    for key, value in params.items():
        if key not in MAIL_PARAMETERS:
            return replies.PARAM_UNKNOWN.with_text(f"MAIL parameter {key} not supported")
        if key == "BODY" and (value or "").upper() not in ("7BIT", "8BITMIME"):
            return replies.PARAM_SYNTAX.with_text("BODY must be 7BIT or 8BITMIME")
        if key in ("SMTPUTF8", "REQUIRETLS") and value is not None:
            return replies.PARAM_SYNTAX.with_text(f"{key} takes no value")
        if key == "RET" and (value or "").upper() not in ("FULL", "HDRS"):
            return replies.PARAM_SYNTAX.with_text("RET must be FULL or HDRS")  # RFC 3461 4.3
        if key == "ENVID" and (not value or len(value) > 100 or not _XTEXT.fullmatch(value)):
            return replies.PARAM_SYNTAX.with_text("ENVID must be xtext, at most 100 chars")
        if key == "SIZE" and (value is None or not value.isdigit() or len(value) > 20):
            return replies.PARAM_SYNTAX.with_text("SIZE needs a number")
        if key == "SIZE" and int(value or 0) > max_size:
            return replies.SIZE_EXCEEDED  # RFC 1870 6.1: 552 at MAIL for a declared size
    return None


def parse_mail(arg: str | None, *, extended: bool, max_size: int) -> MailCommand | Reply:
    """The argument of MAIL (``FROM:<path> [params]``) -> MailCommand, or the refusal."""
    command = _command(arg, "FROM:", extended)
    if isinstance(command, Reply):
        return command
    path, params = command
    refusal = _mail_params_refusal(params, max_size)
    if refusal is not None:
        return refusal
    smtputf8 = "SMTPUTF8" in params
    sender = parse_reverse_path(path, smtputf8=smtputf8)
    if isinstance(sender, Reply):
        return sender
    options = tuple(key if value is None else f"{key}={value}" for key, value in params.items())
    return MailCommand(sender, options, smtputf8)


def parse_rcpt(arg: str | None, *, extended: bool, smtputf8: bool) -> tuple[str, list[str]] | Reply:
    """The argument of RCPT (``TO:<path> [NOTIFY=...] [ORCPT=...]``) -> the recipient and
    its DSN parameters (RFC 3461 4.1, 4.2), or the refusal."""
    command = _command(arg, "TO:", extended)
    if isinstance(command, Reply):
        return command
    path, params = command
    options: list[str] = []
    for key, value in params.items():
        if key == "NOTIFY":
            words = {w.strip().upper() for w in (value or "").split(",")}
            if words != {"NEVER"} and not (words and words <= _NOTIFY):
                return replies.PARAM_SYNTAX.with_text(
                    "NOTIFY must be NEVER, or SUCCESS, FAILURE and DELAY"
                )
            options.append(f"NOTIFY={','.join(sorted(words))}")
        elif key == "ORCPT":
            kind, semi, addr = (value or "").partition(";")
            if (
                not semi
                or not kind
                or not addr
                or len(value or "") > 500
                or not _XTEXT.fullmatch(addr)
            ):
                return replies.PARAM_SYNTAX.with_text("ORCPT must be addr-type;xtext")
            options.append(f"ORCPT={kind};{addr}")
        else:
            return replies.PARAM_UNKNOWN.with_text(f"RCPT parameter {key} not supported")
    address = parse_forward_path(path, smtputf8=smtputf8)
    return address if isinstance(address, Reply) else (address, options)
