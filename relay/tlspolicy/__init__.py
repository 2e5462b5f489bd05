"""TLS policy: what outbound TLS a destination requires, and whether a session meets it.

Role: the pure verdict (:mod:`.verdict`: the requirement for a domain and MX host from
the configured floor, and ``decide(requirement, observed)``), the client TLS contexts
and the facts a handshake proved (:mod:`.contexts`), and the explanation
``tls-relay policy DOMAIN`` prints (:mod:`.explain`).  MTA-STS, DANE and TLS reports
will live here too.

Not: sockets or SMTP (relay.delivery opens sessions and asks here), clocks, or
retries: a failed verdict is reported, and the caller defers.
"""
