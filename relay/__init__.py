"""tls-relay: an outbound SMTP smarthost that accepts and delivers mail over TLS only."""

__version__ = "0.1.0"
