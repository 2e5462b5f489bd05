"""`/metrics` of `tls-relay serve` with `workers: 2`: whichever worker answers a scrape,
it reports the sum over both (prometheus-client's multiprocess mode), with mail to a
real Postfix MX, SIGHUP reloads, and a worker killed and replaced.

Scrapes are parsed with prometheus-client's own parser.  Only loopback is contacted.
"""

from __future__ import annotations

import http.client
import os
import signal
from pathlib import Path

import pytest
import yaml
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.test_queue_e2e import DOMAIN, message, route_to, send, wait_for
from tests.e2e.test_workers_e2e import workers_of
from tests.fixtures.net import free_port
from tests.fixtures.postfix import PostfixMx
from tests.fixtures.relay_proc import HOST, RelayFactory, RelayProcess

pytestmark = [pytest.mark.e2e, pytest.mark.postfix]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
MAX_MESSAGES = 40  # sent one connection each until both workers have taken some


def scrape(port: int) -> Samples:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        text = response.read().decode()
    finally:
        conn.close()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of *name* over every sample whose labels include *labels*."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def accepted_by(proc: RelayProcess, pid: int) -> float:
    """What one worker counted itself: its own counter file, merged alone."""
    path = proc.spool_dir / "metrics" / f"counter_{pid}.db"
    if not path.exists():
        return 0
    for metric in MultiProcessCollector.merge([str(path)], accumulate=False):  # type: ignore[no-untyped-call]
        if metric.name == "tls_relay_messages_accepted":
            return sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return 0


def start(relay: RelayFactory, mx: PostfixMx, port: int) -> RelayProcess:
    metrics = {"metrics": {"address": f"{HOST}:{port}"}, "workers": 2}
    proc = relay(extra_config={**route_to(mx), **metrics})
    wait_for(lambda: proc.log_text().count("relay_started") == 2 or None, "both workers")
    return proc


def send_until_both_workers_took_mail(proc: RelayProcess) -> int:
    """Mail over one connection each until each worker counted some (bounded)."""
    pids = workers_of(proc)
    assert len(pids) == 2
    for n in range(1, MAX_MESSAGES + 1):
        send(proc, "app@corp.test", [f"m{n}@{DOMAIN}"], message(f"metrics {n}"))
        if n >= 4 and all(accepted_by(proc, pid) > 0 for pid in pids):
            return n
    raise AssertionError(f"one worker took all {MAX_MESSAGES} connections")


def test_two_workers_are_summed_in_every_scrape(relay: RelayFactory, postfix_mx: PostfixMx) -> None:
    port = free_port()
    proc = start(relay, postfix_mx, port)
    sent = send_until_both_workers_took_mail(proc)
    postfix_mx.wait_messages(sent)
    delivered = "tls_relay_deliveries_total"
    wait_for(lambda: total(scrape(port), delivered, outcome="delivered") == sent or None, "all")
    for _ in range(4):  # several connections: either worker may answer, each says the same
        got = scrape(port)
        assert total(got, "tls_relay_messages_accepted_total") == sent
        assert total(got, delivered, outcome="delivered") == sent
        assert total(got, "tls_relay_sessions_total") == sent
        assert total(got, "tls_relay_inbound_tls_sessions_total", version="TLSv1.3") == sent
        outbound = total(got, "tls_relay_outbound_tls_sessions_total", policy="static")
        assert 2 <= outbound <= sent  # at least one per worker; pooled sessions count once
        assert total(got, "tls_relay_queue_messages") == 0
        assert total(got, "tls_relay_certificate_expiry_timestamp_seconds", certificate="cert") > 0
    assert proc.stop() == 0


def test_reloads_and_a_dead_worker(relay: RelayFactory, postfix_mx: PostfixMx) -> None:
    port = free_port()
    proc = start(relay, postfix_mx, port)
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: proc.log_text().count("reload_done") == 2 or None, "both reloads")
    after = scrape(port)
    assert total(after, "tls_relay_reloads_total", result="ok") == 2  # one per worker
    assert total(after, "tls_relay_config_last_reload_successful") == 1

    config = yaml.safe_load(proc.config_path.read_text())
    proc.config_path.write_text(yaml.safe_dump({**config, "hostname": "not a name!"}))
    proc.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: proc.log_text().count("reload_kept") == 2 or None, "both refusals")
    broken = scrape(port)
    assert total(broken, "tls_relay_reloads_total", result="failed") == 2
    assert total(broken, "tls_relay_config_last_reload_successful") == 0

    sent = send_until_both_workers_took_mail(proc)
    victim = workers_of(proc)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: (victim not in workers_of(proc) and len(workers_of(proc)) == 2) or None, "")
    wait_for(lambda: proc.log_text().count("relay_started") == 3 or None, "the replacement")
    replaced = scrape(port)
    assert total(replaced, "tls_relay_messages_accepted_total") == sent  # its counts stay
    assert not Path(proc.spool_dir / "metrics" / f"gauge_livesum_{victim}.db").exists()
    assert proc.stop() == 0
