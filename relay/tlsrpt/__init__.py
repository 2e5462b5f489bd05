"""TLS reporting (RFC 8460) as a sending MTA.

Role: :mod:`.counts` counts successful and failed TLS sessions per UTC day, policy
domain and policy, durably and cheaply; :mod:`.report` builds the RFC 8460 JSON, its
gzip file and the mail that carries it (pure); :mod:`.sender` sends the reports of
finished days to the ``rua`` of domains that publish ``_smtp._tls`` (mail through the
relay's own queue, HTTPS POSTs retried for a day); :mod:`.cli` is ``tls-relay
tls-reports``.
Not: deciding TLS verdicts (relay.tlspolicy) or delivering (relay.delivery).
"""
