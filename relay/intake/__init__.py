"""Intake: the SMTP server side, from an accepted TCP connection to a spooled message.

Role: listen (:mod:`.listener`), run each client's SMTP session over TLS only
(:mod:`.session` on :mod:`.commandloop`: the command guard, STARTTLS, limits), admit
connections and decide who may relay (:mod:`.gate`), authenticate users inside TLS
(:mod:`.auth`, :mod:`.users`), parse MAIL/RCPT paths (:mod:`.addresses`), read DATA
(:mod:`.datareader`), check and annotate the message (:mod:`.message`), word every
reply (:mod:`.replies`) and hold the server certificate (:mod:`.tlscontext`).  A
message leaves intake through ``Spool.store_soon``; 250 is sent only once it is durable.

Not: storage formats (relay.queue), delivery, or any decision about destinations.
"""
