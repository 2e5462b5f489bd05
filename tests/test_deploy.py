"""deploy/: the systemd unit as systemd itself judges it - `systemd-analyze verify` and
`systemd-analyze security --offline=yes` with a ceiling on the exposure score (Debian's
systemd package); the Kubernetes manifests against the API schemas, checkov and
`tls-relay check-config` (below)."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any, cast

import kubernetes_validate
import pytest
import yaml

from relay.config.units import parse_duration

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "systemd" / "tls-relay.service"
BIN = ROOT / ".venv" / "bin" / "tls-relay"
MAX_EXPOSURE = 20  # systemd-analyze's scale x10: 2.0, "OK"


@pytest.fixture
def unit(tmp_path: Path) -> Path:
    """The unit with its ExecStart pointing at this checkout's tls-relay (verify wants
    the command to exist)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("needs Debian's systemd (systemd-analyze)")
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace("/usr/local/bin/tls-relay", str(BIN)))
    return copy


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_systemd_verifies_the_unit(unit: Path) -> None:
    out = analyze("verify", str(unit))
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr


def test_exposure_stays_low(unit: Path) -> None:
    out = analyze("security", "--offline=yes", f"--threshold={MAX_EXPOSURE}", str(unit))
    assert out.returncode == 0, out.stdout[-2000:]


def test_the_unit_says_what_an_operator_expects() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    service = parser["Service"]
    assert service["User"] == "tls-relay" and service["Type"] == "simple"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["ExecStart"].endswith("tls-relay serve")
    assert service["ProtectSystem"] == "strict" and service["NoNewPrivileges"] == "yes"
    assert service["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"


# --- deploy/kubernetes ------------------------------------------------------------------
# The manifests against the Kubernetes API schemas (kubernetes-validate, offline, strict:
# an unknown field fails), against checkov's policies (zero failures; every skip named in
# the manifest with its reason), the relay config in the ConfigMap through check-config,
# and what an operator relies on, read from the YAML.

K8S = ROOT / "deploy" / "kubernetes"
# The oldest minor still widely run (managed clusters' extended support) and the newest
# that kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", "1.37.0")
CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"  # `make test` installs it
# checkov without the network: no policy or guideline download, no version check.
CHECKOV_ENV = {"BC_SKIP_MAPPING": "TRUE", "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true"}
SKIP_ANNOTATION = re.compile(r"^checkov\.io/skip\d+$")


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def manifests() -> list[dict[str, Any]]:
    return [d for p in manifest_files() for d in yaml.safe_load_all(p.read_text()) if d]


def one(kind: str, name: str = "tls-relay") -> dict[str, Any]:
    found = [d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def relay_yaml() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(one("ConfigMap", "tls-relay-config")["data"]["relay.yaml"])
    return doc


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = one("StatefulSet")["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    (only,) = pod_spec()["containers"]
    return cast(dict[str, Any], only)


def port_number(name_or_number: str | int) -> int:
    if isinstance(name_or_number, int):
        return name_or_number
    (number,) = [p["containerPort"] for p in container()["ports"] if p["name"] == name_or_number]
    return cast(int, number)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(version: str) -> None:
    docs = manifests()
    assert docs
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']} ({version}): {exc.message}")


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in manifest_files()]
    (image,) = kustomization["images"]
    assert image["name"] == container()["image"].split(":")[0]


@pytest.fixture(scope="module")
def checkov_report() -> dict[str, Any]:
    """One checkov run for the module (it takes a few seconds)."""
    if not CHECKOV.exists():
        pytest.fail(f"{CHECKOV} is missing: `make test` installs it (target .venv-checkov)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BC_", "PRISMA_"))}
    command = [str(CHECKOV), "-d", str(K8S.relative_to(ROOT)), "--framework", "kubernetes"]
    out = subprocess.run(
        [*command, "--skip-download", "--output", "json"],
        cwd=ROOT,
        env=env | CHECKOV_ENV,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    report = json.loads(out.stdout)
    assert isinstance(report, dict), out.stdout[:2000]  # one framework: one report
    return cast(dict[str, Any], report)


def test_checkov_finds_nothing(checkov_report: dict[str, Any]) -> None:
    summary = checkov_report["summary"]
    failed = [
        f"{c['check_id']} {c['check_name']} ({c['resource']})"
        for c in checkov_report["results"]["failed_checks"]
    ]
    assert summary["failed"] == 0 and not failed, failed
    assert summary["parsing_errors"] == 0 and summary["passed"] > 50


def test_every_checkov_skip_is_named_with_a_reason(checkov_report: dict[str, Any]) -> None:
    annotated = {}
    for doc in manifests():
        for key, value in (doc["metadata"].get("annotations") or {}).items():
            if SKIP_ANNOTATION.match(key):
                check_id, _, reason = value.partition("=")
                assert len(reason.strip()) > 20, f"{key}: say why {check_id} is skipped"
                annotated[check_id] = reason
    skipped = {c["check_id"] for c in checkov_report["results"]["skipped_checks"]}
    assert skipped == set(annotated)  # no skip without a reason, no stale annotation
    assert skipped == {"CKV_K8S_43"}  # image digest: the operator pins it (kustomization)


def _write_mounted_files(root: Path, secrets: dict[str, dict[str, str]]) -> None:
    """Lay out what the container sees under ``root``: the projected ConfigMap and
    Secret items at their mount path, the spool and /tmp as empty directories."""
    configmaps = {d["metadata"]["name"]: d["data"] for d in manifests() if d["kind"] == "ConfigMap"}
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    for mount in container()["volumeMounts"]:
        target = root / mount["mountPath"].lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        projected = volumes.get(mount["name"], {}).get("projected", {"sources": []})
        for source in projected["sources"]:
            kind, ref = next(iter(source.items()))
            data = configmaps[ref["name"]] if kind == "configMap" else secrets[ref["name"]]
            for item in ref["items"]:
                (target / item["path"]).write_text(data[item["key"]])


def _rebased(value: Any, root: Path) -> Any:
    """Every absolute path in the config, moved under ``root``."""
    if isinstance(value, dict):
        return {k: _rebased(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_rebased(v, root) for v in value]
    if isinstance(value, str) and value.startswith("/"):
        return str(root / value.lstrip("/"))
    return value


def test_the_configmap_config_passes_check_config(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    subprocess.run(
        [str(BIN), "gen-cert", "--hostname", "localhost", "--out", str(certs)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    root = tmp_path / "root"
    _write_mounted_files(
        root,
        {
            "tls-relay-cert": {
                "tls.crt": (certs / "cert.pem").read_text(),
                "tls.key": (certs / "key.pem").read_text(),
            },
            "tls-relay-users": {"users.yaml": "users: {}\n"},
        },
    )
    cfg = _rebased(relay_yaml(), root)
    # check-config probes the resolver for DANE; in the pod that is the cluster DNS
    # (not on loopback: no query).  Here it must not leave the machine: a closed port.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    cfg["delivery"]["resolver"] = {"nameservers": ["127.0.0.1"], "port": closed, "timeout": "1s"}
    config = root / "etc" / "tls-relay" / "relay.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = subprocess.run(
        [str(BIN), "check-config", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_each_replica_keeps_its_own_spool() -> None:
    sts = one("StatefulSet")["spec"]
    (claim,) = sts["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    (mount,) = [m for m in container()["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert mount["mountPath"] == relay_yaml()["spool"]["path"]
    assert "readOnly" not in mount
    assert sts["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }
    assert sts["serviceName"] == one("Service", "tls-relay-pods")["metadata"]["name"]


def test_probes_ask_the_metrics_address() -> None:
    host, port = relay_yaml()["metrics"]["address"].rsplit(":", 1)
    assert host == "0.0.0.0"  # the kubelet probes the pod's IP address, not its loopback
    metrics_port = int(port)
    expected = {
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
        "startupProbe": "/healthz",
    }
    for probe, path in expected.items():
        get = container()[probe]["httpGet"]
        assert (get["path"], port_number(get["port"])) == (path, metrics_port), probe


def test_termination_grace_covers_the_drain() -> None:
    shutdown_grace = parse_duration(relay_yaml()["queue"]["shutdown_grace"])
    pre_stop = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod_spec()["terminationGracePeriodSeconds"] > shutdown_grace + float(pre_stop[1])


def test_the_pod_runs_unprivileged() -> None:
    uid = re.search(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert uid is not None
    pod = pod_spec()["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert (pod["runAsUser"], pod["runAsGroup"]) == (int(uid[1]), int(uid[2]))
    ctx = container()["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod_spec()["automountServiceAccountToken"] is False
    resources = container()["resources"]
    for kind in ("requests", "limits"):
        assert set(resources[kind]) >= {"cpu", "memory"}, kind
    assert "@" not in container()["image"] and ":" in container()["image"]


def test_service_maps_587_and_465_to_the_listeners() -> None:
    listeners = {int(x["address"].rsplit(":", 1)[1]): x["tls"] for x in relay_yaml()["listeners"]}
    service = one("Service")["spec"]
    ports = {p["port"]: listeners[port_number(p["targetPort"])] for p in service["ports"]}
    assert ports == {587: "starttls", 465: "implicit"}
    pod_labels = one("StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= pod_labels.items()


def test_disruption_budget_and_network_policy_cover_the_pods() -> None:
    pod_labels = one("StatefulSet")["spec"]["template"]["metadata"]["labels"]
    pdb = one("PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["maxUnavailable"] == 1
    policy = one("NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    ingress = {p["port"]: rule["from"] for rule in policy["ingress"] for p in rule["ports"]}
    assert set(ingress) == {port_number(p["name"]) for p in container()["ports"]}
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    assert ingress[port_number("metrics")] == [{"namespaceSelector": {"matchLabels": monitoring}}]
    egress = {(p["protocol"], p["port"]) for rule in policy["egress"] for p in rule["ports"]}
    assert egress == {("UDP", 53), ("TCP", 53), ("TCP", 25), ("TCP", 443)}
