"""relay.delivery.downgrade: 8-bit body parts made 7-bit for a next hop without 8BITMIME
(RFC 6152 §3), parsed back with the email package; headers kept byte for byte."""

from __future__ import annotations

import email

from relay.delivery.downgrade import needs_8bitmime, to_7bit

HEAD = (
    b"From: a@b.test\r\nTo: c@d.test\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
    b"MIME-Version: 1.0\r\n"
)
MULTI = HEAD + (
    b'Content-Type: multipart/mixed; boundary="XX"\r\n\r\n'
    b"--XX\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    b"Gr\xc3\xbc\xc3\x9fe aus M\xc3\xbcnchen\r\n.leading dot\r\n"
    b"--XX\r\nContent-Type: application/octet-stream\r\n\r\n\x00\xff\xfe binary\r\n"
    b"--XX\r\nContent-Type: text/plain\r\n\r\nplain ascii stays\r\n--XX--\r\n"
)


def parts(data: bytes) -> list[tuple[str, str | None, bytes]]:
    msg = email.message_from_bytes(data)
    return [
        (p.get_content_type(), p.get("Content-Transfer-Encoding"), p.get_payload(decode=True))
        for p in msg.walk()
        if not p.is_multipart()
    ]


def test_8bit_parts_become_quoted_printable_or_base64() -> None:
    out = to_7bit(MULTI)
    assert out is not None and out.isascii()
    assert out.startswith(HEAD)  # headers as they were, not refolded
    text, binary, ascii_part = parts(out)
    assert text == (
        "text/plain",
        "quoted-printable",
        b"Gr\xc3\xbc\xc3\x9fe aus M\xc3\xbcnchen\r\n.leading dot",
    )
    assert binary == ("application/octet-stream", "base64", b"\x00\xff\xfe binary")
    assert ascii_part[1] is None and ascii_part[2] == b"plain ascii stays"
    assert max(len(line) for line in out.split(b"\r\n")) <= 998


def test_what_cannot_or_need_not_be_converted() -> None:
    assert to_7bit(b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n\r\nx\r\n") is None  # 8-bit header
    seven = HEAD + b"\r\nhello\r\n"
    assert to_7bit(seven) == seven
    assert needs_8bitmime(["BODY=8BITMIME"], seven)
    assert needs_8bitmime([], b"Subject: x\r\n\r\nCaf\xc3\xa9\r\n")  # undeclared 8-bit
    assert not needs_8bitmime(["SMTPUTF8"], seven)


def test_a_plain_message_gets_mime_version_with_its_new_encoding() -> None:
    out = to_7bit(b"From: a@b.test\r\nSubject: x\r\n\r\nCaf\xc3\xa9\r\n")
    assert out is not None
    msg = email.message_from_bytes(out)
    assert msg["MIME-Version"] == "1.0" and msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert msg.get_payload(decode=True) == b"Caf\xc3\xa9\r\n"


def test_a_multipart_labelled_8bit_says_7bit_once_its_parts_are() -> None:
    """RFC 2045 6.4: a composite's encoding is its parts'; after the conversion a
    multipart (or message/rfc822) still labelled 8bit would claim what is no longer there."""
    labelled = MULTI.replace(
        b'boundary="XX"\r\n', b'boundary="XX"\r\nContent-Transfer-Encoding: 8bit\r\n', 1
    )
    out = to_7bit(labelled)
    assert out is not None and out.isascii()
    assert email.message_from_bytes(out)["Content-Transfer-Encoding"] == "7bit"
    assert [p[1] for p in parts(out)] == ["quoted-printable", "base64", None]
