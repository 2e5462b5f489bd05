"""The per-delivery TLS audit trail: evidence that each delivered recipient travelled
encrypted, and how.

Role: :mod:`.trail` appends one JSON line per recipient an MX accepted, durably and
hash-chained, before the queue records the recipient as delivered; :mod:`.reader`
lists the records and verifies the chain (``tls-relay audit``, ``audit verify``).
Not: deciding or performing deliveries (relay.delivery), spool state (relay.queue).
"""
