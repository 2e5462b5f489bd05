"""The typed settings: frozen dataclasses every other part of the relay is built from.

Role: :class:`Config` and its sections, the outbound :class:`TlsLevel` (an IntEnum, so
``observed < required`` reads as English) and the TLS policy (:class:`PolicyConfig`).
Instances are made only by :mod:`relay.config.load` (and by tests); nothing here reads
files or checks values.
Not: parsing YAML, reporting problems, or deciding anything at delivery time.
"""

from __future__ import annotations

import enum
import ipaddress
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from relay.domains import Domain

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

KIB = 1024
MIB = 1024 * 1024


class ListenerTls(enum.Enum):
    STARTTLS = "starttls"  # plaintext greeting, STARTTLS required before MAIL
    IMPLICIT = "implicit"  # TLS from the first byte (RFC 8314)


class TlsLevel(enum.IntEnum):
    """Outbound TLS levels; ordered so ``observed < required`` reads as English.

    There is deliberately no NONE/MAY: a config asking for plaintext is rejected.
    """

    ENCRYPT = 1  # STARTTLS completed, certificate not checked
    VERIFY = 2  # + chain valid, name matches the MX host name
    SECURE = 3  # + name matches the recipient domain or a `match` entry
    DANE = 4  # TLSA from a DNSSEC-validated answer (RFC 7672)
    DANE_ONLY = 5

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


@dataclass(frozen=True)
class ListenerConfig:
    host: str  # "0.0.0.0", "::", "127.0.0.1"
    port: int
    tls: ListenerTls

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ServerTls:
    cert: Path
    key: Path
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    # A second pair for clients that only do RSA (old printers); OpenSSL serves the one
    # the client can use.  Both set or neither.
    rsa_cert: Path | None = None
    rsa_key: Path | None = None


@dataclass(frozen=True)
class Clients:
    networks: tuple[IPNetwork, ...] = ()
    users_file: Path | None = None


@dataclass(frozen=True)
class Limits:
    max_message_size: int = 25 * MIB
    max_recipients: int = 100
    max_connections: int = 500
    max_connections_per_ip: int = 50
    max_commands: int = 1000  # per session, so NOOP loops cannot hold a slot forever
    max_auth_failures: int = 5  # per client IP within auth_failure_window, then refused
    auth_failure_window: float = 300.0
    # RFC 5321 4.5.3.2: server timeout 5 minutes waiting for the next command,
    # and the DATA block must keep moving (we bound the whole DATA phase).
    command_timeout: float = 300.0
    data_timeout: float = 600.0


@dataclass(frozen=True)
class SpoolConfig:
    path: Path


@dataclass(frozen=True)
class QueueConfig:
    retry: tuple[float, ...] = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)
    max_lifetime: float = 5 * 86400.0  # RFC 5321 4.5.4.1: give up after 4-5 days
    delay_warning: float | None = None  # send a "delayed" DSN after this long; off by default
    shutdown_grace: float = 30.0  # SIGTERM: how long in-flight deliveries may finish


@dataclass(frozen=True)
class ResolverConfig:
    nameservers: tuple[str, ...]
    port: int = 53
    timeout: float = 5.0


@dataclass(frozen=True)
class RouteAuth:
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Route:
    domains: tuple[str, ...]  # normalised (relay.domains); ".example.com" matches subdomains
    host: str
    port: int
    implicit_tls: bool = False
    auth: RouteAuth | None = None


@dataclass(frozen=True)
class DeliveryConfig:
    port: int = 25
    mta_sts_port: int = 443  # port of https://mta-sts.DOMAIN (labs and tests override it)
    resolver: ResolverConfig | None = None  # None: the system resolver
    concurrency: int = 200
    per_domain_concurrency: int = 20
    routes: tuple[Route, ...] = ()
    max_mx_hosts: int = 5
    connection_reuse: bool = True
    max_messages_per_connection: int = 100
    ca_file: Path | None = None  # CA bundle for verify/secure; None: the system bundle
    # RFC 5321 4.5.3.2 client timeouts, plus an overall deadline per attempt.
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    attempt_deadline: float = 600.0


@dataclass(frozen=True)
class DomainPolicy:
    level: TlsLevel = TlsLevel.ENCRYPT
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    match: tuple[str, ...] = ()  # extra names for `secure`; ".example.com" = any subdomain


@dataclass(frozen=True)
class PolicyConfig:
    default: DomainPolicy = DomainPolicy()
    mta_sts: bool = True
    dane: bool = True
    domains: Mapping[Domain, DomainPolicy] = field(default_factory=dict)  # keys normalised
    # RFC 8689 4.2.2: `TLS-Required: No` relaxes MTA-STS and DANE for that message
    honor_tls_required_no: bool = True
    source: Path | None = None  # file it came from, None if inline

    def for_domain(self, domain: Domain) -> tuple[DomainPolicy, str]:
        """The configured policy for *domain* and where it came from."""
        if domain in self.domains:
            return self.domains[domain], f"static policy domains[{domain!r}]"
        return self.default, "static policy default"


@dataclass(frozen=True)
class MetricsConfig:
    host: str
    port: int


@dataclass(frozen=True)
class AuditConfig:
    """The per-delivery TLS audit trail: one hash-chained JSON line per delivered
    recipient, in ``path/YYYY-MM-DD.jsonl`` (relay.audit)."""

    path: Path
    enabled: bool = True


@dataclass(frozen=True)
class TlsReportsConfig:
    """RFC 8460 TLS reports this relay sends, as a sending MTA (relay.tlsrpt)."""

    organization: str  # organization-name
    contact: str  # contact-info
    sender: str  # `from:` of mailed reports


@dataclass(frozen=True)
class Config:
    source: Path
    hostname: str
    listeners: tuple[ListenerConfig, ...]
    tls: ServerTls
    clients: Clients
    limits: Limits
    spool: SpoolConfig
    queue: QueueConfig
    delivery: DeliveryConfig
    policy: PolicyConfig
    metrics: MetricsConfig | None = None
    audit: AuditConfig | None = None  # None only where a Config is built by hand
    tls_reports: TlsReportsConfig | None = None  # None: nothing counted or sent
    log_level: str = "INFO"
    workers: int | None = 1  # serve processes; None = "auto", one per usable CPU
