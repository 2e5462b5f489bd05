"""TLS policy: what outbound TLS a destination requires, and whether a session meets it.

Role: the pure verdict (:mod:`.verdict`: the requirement for a domain and MX host from
the configured floor, and ``decide(requirement, observed)``), the client TLS contexts
and the facts a handshake proved (:mod:`.contexts`), MTA-STS (RFC 8461: parsing in
:mod:`.mtasts`, the HTTPS fetch in :mod:`.stsfetch`, the durable cache and refresh in
:mod:`.ststore`), and the explanation ``tls-relay policy DOMAIN`` prints
(:mod:`.explain`).  DANE and TLS reports will live here too.

Not: SMTP (relay.delivery opens sessions and asks here), or retries: a failed verdict
is reported, and the caller defers.  The verdict itself reads no clock and no socket.
"""
