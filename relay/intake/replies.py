"""SMTP replies the listener sends, as named constants.

Role: one place for the code, enhanced status code (RFC 3463) and text of every
reply tls-relay itself composes, so tests and handlers name a reply instead of
repeating its text.  Not: parsing replies from other servers (relay.delivery.outcome
does that) and not the protocol logic deciding *when* to send them (relay.intake.session).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str  # RFC 3463 class.subject.detail, "" when the reply carries none
    text: str

    def __str__(self) -> str:
        if self.enhanced:
            return f"{self.code} {self.enhanced} {self.text}"
        return f"{self.code} {self.text}"

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.enhanced, text)


# -- session ------------------------------------------------------------------
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing connection")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_COMMANDS = Reply(421, "4.7.0", "Too many commands, closing connection")
TOO_MANY_BOGUS = Reply(502, "5.5.1", "Too many unrecognized commands, goodbye")
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0", "Too many authentication failures, try again later")
# RFC 3207 section 4: commands other than EHLO/HELO/NOOP/RSET/QUIT/STARTTLS need TLS first.
STARTTLS_FIRST = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
TLS_ACTIVE = Reply(503, "5.5.1", "TLS already active")
SYNTAX_STARTTLS = Reply(501, "5.5.4", "Syntax: STARTTLS")
BAD_SEQUENCE_HELO = Reply(503, "5.5.1", "Send EHLO first")
INTERNAL_ERROR = Reply(451, "4.3.0", "Internal error, try again later")

# -- AUTH (RFC 4954) ------------------------------------------------------------
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_INVALID = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_UNAVAILABLE = Reply(502, "5.5.1", "AUTH not available")
AUTH_ALREADY = Reply(503, "5.5.1", "Already authenticated")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH not permitted during a mail transaction")
AUTH_SYNTAX = Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
AUTH_BAD_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode response")
AUTH_ABORTED = Reply(501, "5.7.0", "Authentication aborted")  # the client sent "*"
AUTH_LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication exchange line is too long")

# -- envelope -----------------------------------------------------------------
MAIL_OK = Reply(250, "2.1.0", "Ok")
RCPT_OK = Reply(250, "2.1.5", "Ok")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
PARAM_UNKNOWN = Reply(555, "5.5.4", "Parameter not recognized or not implemented")
PARAM_SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters")
SIZE_EXCEEDED = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")

# -- data -----------------------------------------------------------------------
# Bare CR / bare LF / NUL: the same stance as Postfix's smtpd_forbid_bare_newline=reject.
BARE_NEWLINE = Reply(550, "5.6.0", "Bare CR, bare LF or NUL in message data; use CRLF line endings")
TOO_MUCH_DATA = Reply(552, "5.3.4", "Message too big for system")
HEADER_TOO_LARGE = Reply(552, "5.3.4", "Message header block exceeds 1 MiB")
SPOOL_FULL = Reply(452, "4.3.1", "Insufficient system storage")
SPOOL_FAILED = Reply(451, "4.3.0", "Local error in processing, try again later")
