"""relay.config.load on good configs: how YAML maps onto the frozen dataclasses.

Bad configs live in tests/config/bad_configs/ (see test_bad_configs.py).
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay import certs, config
from relay.config import Config, ListenerTls, TlsLevel
from relay.domains import is_dns_name, normalize_domain
from relay.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write_config(dirpath: Path, cert: tuple[Path, Path], **sections: Any) -> Path:
    """A minimal valid config in *dirpath*, with *sections* replacing or adding keys."""
    doc: dict[str, Any] = {
        "hostname": "relay.test",
        "listeners": [{"address": "127.0.0.1:2525", "tls": "starttls"}],
        "tls": {"cert": str(cert[0]), "key": str(cert[1])},
        "spool": {"path": "spool"},
    }
    doc.update(sections)
    path = dirpath / "relay.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def load_with(tmp_path: Path, cert: tuple[Path, Path], **sections: Any) -> Config:
    return config.load(write_config(tmp_path, cert, **sections))


def test_minimal_config_gets_defaults(tmp_path: Path, server_cert: tuple[Path, Path]) -> None:
    cfg = load_with(tmp_path, server_cert)
    assert cfg.source == (tmp_path / "relay.yaml").resolve()
    assert cfg.hostname == "relay.test"
    assert cfg.listeners == (config.ListenerConfig("127.0.0.1", 2525, ListenerTls.STARTTLS),)
    assert cfg.tls.min_version == ssl.TLSVersion.TLSv1_2
    assert cfg.spool.path == (tmp_path / "spool").resolve()
    assert cfg.clients == config.Clients()
    assert cfg.limits == config.Limits()
    assert cfg.queue == config.QueueConfig()
    assert cfg.delivery == config.DeliveryConfig()
    assert cfg.policy == config.PolicyConfig()
    assert cfg.metrics is None and cfg.log_level == "INFO"


def test_full_config(tmp_path: Path, server_cert: tuple[Path, Path]) -> None:
    (tmp_path / "ca.pem").write_bytes(server_cert[0].read_bytes())
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    cfg = load_with(
        config_dir,
        server_cert,
        hostname="Relay.Example.COM.",
        listeners=[
            {"address": "[::1]:587", "tls": "starttls"},
            {"address": "localhost:465", "tls": "implicit"},
            {"address": "0.0.0.0:587", "tls": "starttls"},
        ],
        tls={"cert": str(server_cert[0]), "key": str(server_cert[1]), "min_version": "TLSv1.3"},
        clients={"networks": ["10.0.0.0/8", "::1/128", "192.0.2.7"]},
        limits={
            "max_message_size": "512KiB",
            "max_recipients": 5,
            "max_connections": 10,
            "max_connections_per_ip": 2,
            "max_commands": 50,
            "max_auth_failures": 3,
            "auth_failure_window": "10m",
            "command_timeout": "1m",
            "data_timeout": 120,
        },
        spool={"path": "../var/spool"},
        queue={
            "retry": ["2s", "5s"],
            "max_lifetime": "1h",
            "delay_warning": "30m",
            "shutdown_grace": 0,
        },
        delivery={
            "port": 2526,
            "resolver": {"nameservers": ["127.0.0.1", "::1"], "port": 5353, "timeout": "2s"},
            "concurrency": 4,
            "per_domain_concurrency": 2,
            "max_mx_hosts": 3,
            "connection_reuse": False,
            "max_messages_per_connection": 7,
            "ca_file": "../ca.pem",
            "connect_timeout": "5s",
            "command_timeout": "30s",
            "attempt_deadline": "2m",
            "routes": [
                {"domains": ["Partner.TEST", ".partner.test"], "via": "[MX.partner.test]:2525"},
                {
                    "domains": ["other.test"],
                    "via": "127.0.0.1:465",
                    "tls": "implicit",
                    "auth": {"username": "relay", "password": "pw"},
                },
            ],
        },
        metrics={"address": "127.0.0.1:9465"},
        log_level="debug",
        policy={"domains": {"other.test": {"level": "verify"}}},  # the route logs in
    )
    assert cfg.hostname == "relay.example.com"
    assert [(x.host, x.port, x.tls) for x in cfg.listeners] == [
        ("::1", 587, ListenerTls.STARTTLS),
        ("localhost", 465, ListenerTls.IMPLICIT),
        ("0.0.0.0", 587, ListenerTls.STARTTLS),
    ]
    assert cfg.listeners[0].address == "[::1]:587"
    assert cfg.tls.min_version == ssl.TLSVersion.TLSv1_3
    assert cfg.clients.networks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("192.0.2.7/32"),
    )
    assert cfg.limits == config.Limits(512 * 1024, 5, 10, 2, 50, 3, 600.0, 60.0, 120.0)
    assert cfg.spool.path == (tmp_path / "var" / "spool").resolve()
    assert cfg.queue == config.QueueConfig((2.0, 5.0), 3600.0, 1800.0, 0.0)
    d = cfg.delivery
    assert d.resolver == config.ResolverConfig(("127.0.0.1", "::1"), 5353, 2.0)
    assert (d.port, d.concurrency, d.per_domain_concurrency, d.max_mx_hosts) == (2526, 4, 2, 3)
    assert (d.connection_reuse, d.max_messages_per_connection) == (False, 7)
    assert d.ca_file == (tmp_path / "ca.pem").resolve()
    assert (d.connect_timeout, d.command_timeout, d.attempt_deadline) == (5.0, 30.0, 120.0)
    assert d.routes[0] == config.Route(("partner.test", ".partner.test"), "mx.partner.test", 2525)
    assert d.routes[1].implicit_tls and d.routes[1].auth == config.RouteAuth("relay", "pw")
    assert "pw" not in repr(d.routes[1])
    assert cfg.metrics == config.MetricsConfig("127.0.0.1", 9465)
    assert cfg.log_level == "DEBUG"


def test_policy_file_relative_to_config(tmp_path: Path, server_cert: tuple[Path, Path]) -> None:
    (tmp_path / "pol").mkdir()
    (tmp_path / "pol" / "tls.yaml").write_text(
        "default: {level: verify, min_version: TLSv1.3}\n"
        "mta_sts: false\n"
        "domains:\n"
        "  Example.COM: {level: secure, match: ['.Example.com']}\n"
        "  partner.test: {level: encrypt, min_version: TLSv1.2}\n"
    )
    cfg = load_with(tmp_path, server_cert, policy="pol/tls.yaml")
    policy = cfg.policy
    assert policy.source == (tmp_path / "pol" / "tls.yaml").resolve()
    assert policy.default == config.DomainPolicy(TlsLevel.VERIFY, ssl.TLSVersion.TLSv1_3)
    assert (policy.mta_sts, policy.dane) == (False, True)
    assert set(policy.domains) == {"example.com", "partner.test"}
    assert policy.domains["example.com"].match == (".example.com",)
    # a domain entry without min_version inherits the default's
    assert policy.domains["example.com"].min_version == ssl.TLSVersion.TLSv1_3
    assert policy.domains["partner.test"].min_version == ssl.TLSVersion.TLSv1_2
    assert policy.for_domain(normalize_domain("EXAMPLE.com.")) == (
        policy.domains["example.com"],
        "static policy domains['example.com']",
    )
    assert policy.for_domain("elsewhere.test")[1] == "static policy default"
    with pytest.raises(TypeError):
        policy.domains["x.test"] = policy.default  # type: ignore[index]


def test_domain_keys_may_be_written_either_way(
    tmp_path: Path, server_cert: tuple[Path, Path]
) -> None:
    """Policy keys, `match` entries and route domains take the one normal form at load."""
    cfg = load_with(
        tmp_path,
        server_cert,
        policy={"domains": {"Bücher.test.": {"level": "secure", "match": [".Straße.de"]}}},
        delivery={
            "routes": [
                {
                    "domains": ["\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com", ".bücher.test"],
                    "via": "[h.test]:25",
                }
            ]
        },
    )
    assert set(cfg.policy.domains) == {"xn--bcher-kva.test"}
    assert cfg.policy.domains["xn--bcher-kva.test"].match == (".xn--strae-oqa.de",)
    assert cfg.delivery.routes[0].domains == ("example.com", ".xn--bcher-kva.test")


def test_two_spellings_of_one_policy_domain_are_an_error(
    tmp_path: Path, server_cert: tuple[Path, Path]
) -> None:
    path = write_config(
        tmp_path,
        server_cert,
        policy={"domains": {"xn--bcher-kva.test": {"level": "secure"}, "bücher.test": {}}},
    )
    with pytest.raises(ConfigError) as info:
        config.load(path)
    (problem,) = info.value.problems
    assert 'policy.domains["xn--bcher-kva.test"]: the same domain as' in problem
    assert 'policy.domains["b\\u00fccher.test"] (both are xn--bcher-kva.test)' in problem


def test_inline_policy(tmp_path: Path, server_cert: tuple[Path, Path]) -> None:
    cfg = load_with(tmp_path, server_cert, policy={"domains": {"a.test": {"level": "verify"}}})
    assert cfg.policy.source is None
    assert cfg.policy.domains["a.test"].level == TlsLevel.VERIFY
    assert cfg.policy.default.level == TlsLevel.ENCRYPT


def test_load_policy_standalone(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("default: {level: secure}\n")
    assert config.load_policy(path).default.level == TlsLevel.SECURE
    path.write_text("default: {level: may}\n")
    with pytest.raises(ConfigError) as info:
        config.load_policy(path)
    assert info.value.problems == [
        f"{path}: default.level: plaintext is never allowed; "
        "use encrypt, verify, secure or dane-only (got 'may')"
    ]


def test_hostname_defaults_to_fqdn(tmp_path: Path, server_cert: tuple[Path, Path]) -> None:
    path = write_config(tmp_path, server_cert)
    doc = yaml.safe_load(path.read_text())
    del doc["hostname"]
    path.write_text(yaml.safe_dump(doc))
    fqdn = socket.getfqdn()
    if not is_dns_name(fqdn):
        pytest.skip(f"this machine's name {fqdn!r} is not a DNS name")
    assert config.load(path).hostname == fqdn


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("localhost", True),
        ("relay.example.com", True),
        ("relay.example.com.", True),
        ("a-b.c", True),
        ("x" * 63 + ".test", True),
        ("x" * 64 + ".test", False),
        ("-a.test", False),
        ("a_b.test", False),
        ("a..test", False),
        ("127.0.0.1", False),
        ("", False),
    ],
)
def test_is_dns_name(name: str, ok: bool) -> None:
    assert is_dns_name(name) is ok


def test_users_file_is_checked(tmp_path: Path, server_cert: tuple[Path, Path]) -> None:
    (tmp_path / "users.yaml").write_text("users: {}\n")
    cfg = load_with(tmp_path, server_cert, clients={"users_file": "users.yaml"})
    assert cfg.clients.users_file == (tmp_path / "users.yaml").resolve()


def test_load_users_file_path_is_lenient(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text("clients: {users_file: etc/users.yaml}\nlisteners: nonsense\n")
    assert config.load_users_file_path(path) == (tmp_path / "etc" / "users.yaml").resolve()
    path.write_text("hostname: x\n")
    with pytest.raises(ConfigError, match=r"clients\.users_file: required key is missing"):
        config.load_users_file_path(path)
    with pytest.raises(ConfigError, match="cannot read file"):
        config.load_users_file_path(tmp_path / "absent.yaml")


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path / "absent.yaml")
    assert info.value.problems == [
        f"{tmp_path / 'absent.yaml'}: cannot read file "
        f"'{tmp_path / 'absent.yaml'}': No such file or directory"
    ]


@pytest.mark.parametrize("doc", ["", "[1, 2]\n", "just a string\n"])
def test_config_must_be_a_mapping(tmp_path: Path, doc: str) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(doc)
    with pytest.raises(ConfigError):
        config.load(path)


def test_summary(tmp_path: Path, server_cert: tuple[Path, Path]) -> None:
    cfg = load_with(
        tmp_path,
        server_cert,
        clients={"networks": ["127.0.0.0/8"]},
        delivery={"routes": [{"domains": ["p.test"], "via": "[mx.p.test]:2525"}]},
        policy={"domains": {"a.test": {"level": "verify"}}},
    )
    text = config.summary(cfg)
    for fragment in (
        "hostname: relay.test",
        "127.0.0.1:2525 (starttls)",
        f"spool: {tmp_path.resolve() / 'spool'}",
        "1 network may relay",
        "users file none",
        "policy: default encrypt (TLSv1.2), 1 domain (inline)",
        "route: p.test via [mx.p.test]:2525 (starttls)",
        "mta-sts: on (policies from port 443, cached under the spool)",
        "workers: 1",
    ):
        assert fragment in text
    quiet = load_with(tmp_path, server_cert, policy={"mta_sts": False, "dane": False})
    assert "dane: off" in config.summary(quiet)


@pytest.mark.parametrize(("raw", "workers"), [(1, 1), (4, 4), ("auto", None)])
def test_workers(
    tmp_path: Path, server_cert: tuple[Path, Path], raw: object, workers: int | None
) -> None:
    cfg = load_with(tmp_path, server_cert, workers=raw)
    assert cfg.workers == workers
    assert ("auto (one per usable CPU)" if workers is None else f"workers: {workers}") in (
        config.summary(cfg)
    )


def test_bundled_config_is_valid(tmp_path: Path) -> None:
    """config/relay.yaml as `make run` uses it, once gen-cert has made var/certs."""
    shutil.copytree(REPO / "config", tmp_path / "config")
    certs.gen_cert("localhost", tmp_path / "var" / "certs")
    cfg = config.load(tmp_path / "config" / "relay.yaml")
    assert cfg.hostname == "localhost"
    assert [x.address for x in cfg.listeners] == ["127.0.0.1:2525", "127.0.0.1:2465"]
    assert [x.tls for x in cfg.listeners] == [ListenerTls.STARTTLS, ListenerTls.IMPLICIT]
    assert cfg.spool.path == (tmp_path / "var" / "spool").resolve()
    assert cfg.clients.users_file == (tmp_path / "config" / "users.yaml").resolve()
    assert cfg.queue.retry == (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)
    assert cfg.policy.default.level == TlsLevel.ENCRYPT
    assert cfg.policy.mta_sts and cfg.policy.dane


def test_an_rsa_pair_beside_the_ecdsa_one(tmp_path: Path) -> None:
    """tls.rsa_cert / tls.rsa_key (issue 15): checked like the first pair, both or
    neither, RSA beside a non-RSA first certificate (OpenSSL keeps one per key type)."""
    ec_pair = certs.gen_cert("relay.test", tmp_path / "c")
    rsa_pair = certs.gen_cert("relay.test", tmp_path / "c", rsa_key=True)
    both = {"cert": str(ec_pair[0]), "key": str(ec_pair[1])}
    both |= {"rsa_cert": str(rsa_pair[0]), "rsa_key": str(rsa_pair[1])}
    cfg = config.load(write_config(tmp_path, ec_pair, tls=both))
    assert (cfg.tls.rsa_cert, cfg.tls.rsa_key) == rsa_pair
    cases = {
        "only one": ({**both, "rsa_key": None}, "tls.rsa_key: required with tls.rsa_cert"),
        "ecdsa as rsa": (
            {**both, "rsa_cert": str(ec_pair[0]), "rsa_key": str(ec_pair[1])},
            "tls.rsa_cert: must hold an RSA key (it holds ECDSA)",
        ),
        "two rsa": (
            {**both, "cert": str(rsa_pair[0]), "key": str(rsa_pair[1])},
            "tls.cert: is an RSA certificate too",
        ),
        "mismatch": (
            {**both, "rsa_key": str(ec_pair[1])},
            "tls.rsa_key: key does not match the certificate",
        ),
    }
    for name, (tls, expected) in cases.items():
        tls = {k: v for k, v in tls.items() if v is not None}
        with pytest.raises(ConfigError) as info:
            config.load(write_config(tmp_path, ec_pair, tls=tls))
        assert any(expected in p for p in info.value.problems), (name, info.value.problems)
