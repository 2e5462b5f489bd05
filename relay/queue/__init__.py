"""The queue: durable storage of accepted mail and the decision of when to try it.

Role: the spool (:mod:`.spool`, its file format and envelope in :mod:`.envelope`,
the in-memory handoff of just-stored messages in :mod:`.fresh`, crash recovery in
:mod:`.recovery`), the queue manager (:mod:`.scheduler`) that hands due recipients to
delivery and records each outcome durably (:mod:`.outcomes`), the pure retry schedule
(:mod:`.retry`), delivery status notifications (:mod:`.bounce`) and the operator's
``tls-relay queue`` commands (:mod:`.cli`).

Not: SMTP in either direction, MX lookups or TLS decisions; the one durable write
helper it builds on is :mod:`relay.safeio`.
"""
