"""Configuration: relay.yaml and its TLS policy, validated once at load into frozen objects.

Role: :mod:`~relay.config.model` holds the typed settings (:class:`Config`, the TLS
levels, the policy); :mod:`~relay.config.load` reads relay.yaml and collects every
problem into one :class:`~relay.errors.ConfigError` (``FILE: key.path: problem (got
VALUE)``), helped by :mod:`~relay.config.checks` (generic value checks, YAML reading),
:mod:`~relay.config.policy` (the ``policy:`` section or file) and
:mod:`~relay.config.units` (durations and sizes); :mod:`~relay.config.summary` words
what ``check-config`` prints.  The settings types are re-exported here, so the rest of
the relay writes ``from relay.config import Config, TlsLevel``.

Not: opening sockets, reading the users database for AUTH, or any decision at run
time - the parts that use a setting decide what it means.
"""

from relay.config.load import load, load_policy, load_users_file_path
from relay.config.model import (
    AuditConfig,
    Clients,
    Config,
    DeliveryConfig,
    DomainPolicy,
    IPNetwork,
    Limits,
    ListenerConfig,
    ListenerTls,
    MetricsConfig,
    PolicyConfig,
    QueueConfig,
    ResolverConfig,
    Route,
    RouteAuth,
    ServerTls,
    SpoolConfig,
    TlsLevel,
    TlsReportsConfig,
)
from relay.config.summary import summary

__all__ = [
    "AuditConfig",
    "Clients",
    "Config",
    "DeliveryConfig",
    "DomainPolicy",
    "IPNetwork",
    "Limits",
    "ListenerConfig",
    "ListenerTls",
    "MetricsConfig",
    "PolicyConfig",
    "QueueConfig",
    "ResolverConfig",
    "Route",
    "RouteAuth",
    "ServerTls",
    "SpoolConfig",
    "TlsLevel",
    "TlsReportsConfig",
    "load",
    "load_policy",
    "load_users_file_path",
    "summary",
]
