"""Delivery: one message's recipients for one domain, to that domain's MX hosts, over TLS.

Role: find the next hops (:mod:`.mx`: MX records, routes), hold concurrency slots and
walk the hosts in order (:mod:`.deliverer`), reuse idle TLS sessions (:mod:`.pool`),
open a session that is TLS before anything else (:mod:`.session`), run one SMTP
transaction (:mod:`.transaction`) with the bytes put on the wire by :mod:`.wiredata`,
and classify every reply where it is seen (:mod:`.outcome`: delivered, transient,
permanent).  Any TLS or policy failure is transient; nothing is ever sent in plaintext.

Not: retry timing, spool state or bounces (relay.queue); what TLS a host requires and
whether a handshake meets it (relay.tlspolicy).
"""
