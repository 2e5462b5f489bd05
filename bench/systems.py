"""The processes of one benchmark run: the sink, and each system under test (SUT).

Role: start/stop with pinning (``taskset``), wait until they listen, and expose the
root pid whose process tree is accounted (bench.procs).  Every start has a matching
stop that is safe to call twice and after a failed start; stop escalates to SIGKILL of
the process group / tree, so nothing outlives a run.
Not: measuring (bench.run) or generating load (bench.loadgen).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import postfix, procs

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent


def taskset(cpus: set[int] | None, cmd: list[str]) -> list[str]:
    if cpus is None:
        return cmd
    return ["taskset", "-c", ",".join(map(str, sorted(cpus))), *cmd]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_smtp(port: int, timeout: float = 30.0) -> None:
    """Until a connection to 127.0.0.1:port gets a 220 greeting."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.settimeout(5)
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"nothing greets on 127.0.0.1:{port} after {timeout}s ({last})")


def _kill_group(proc: subprocess.Popen[Any], grace: float) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


class LineProcess:
    """A bench child process driven by one-line requests on its stdin, one-line answers
    on its stdout; its first line must start with ``READY``."""

    def __init__(self, cmd: list[str], workdir: Path, errname: str) -> None:
        self.cmd = cmd
        self.workdir = workdir
        self.errname = errname
        self.proc: subprocess.Popen[bytes] | None = None
        self._buf = b""

    def start_process(self, timeout: float = 15.0) -> str:
        """Start it; the READY line."""
        self.proc = subprocess.Popen(
            self.cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(self.workdir / self.errname, "wb"),  # noqa: SIM115
            cwd=ROOT,
            start_new_session=True,
            bufsize=0,
        )
        line = self._readline(timeout)
        if not line.startswith("READY"):
            raise RuntimeError(f"{self.cmd[-1]}: did not start: {line!r}")
        return line

    def _readline(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{self.errname}: no answer within {timeout}s")
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise RuntimeError(f"{self.errname}: the process exited")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def request(self, cmd: str, timeout: float = 15.0) -> str:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(cmd.encode() + b"\n")
        return self._readline(timeout)

    def stop(self, grace: float = 5.0) -> None:
        """``quit``, then SIGTERM/SIGKILL of its process group; safe to call twice."""
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write(b"quit\n")
                self.proc.stdin.close()
            self.proc.wait(grace)
        except (OSError, subprocess.TimeoutExpired):
            pass
        _kill_group(self.proc, 2)
        self.proc = None


class Sink(LineProcess):
    """bench.sink as a child process.  *pipelining*, *chunking*: whether its EHLO
    offers PIPELINING and CHUNKING."""

    def __init__(
        self,
        cert: Path,
        key: Path,
        cpus: set[int] | None,
        workdir: Path,
        pipelining: bool = True,
        chunking: bool = True,
    ) -> None:
        cmd = [PY, "-m", "bench.sink", "--cert", str(cert), "--key", str(key)]
        if not pipelining:
            cmd.append("--no-pipelining")
        if not chunking:
            cmd.append("--no-chunking")
        super().__init__(taskset(cpus, cmd), workdir, "sink.err")
        self.port = 0

    def start(self) -> int:
        self.port = int(self.start_process().split()[1])
        return self.port

    def count(self) -> int:
        return int(self.request("count").split()[1])

    def reset(self) -> None:
        self.request("reset")

    def dump(self, path: Path) -> dict[str, Any]:
        self.request(f"dump {path}", timeout=60)
        doc: dict[str, Any] = json.loads(path.read_text())
        return doc


class SUT:
    name = "?"
    port = 0
    root_pid: int | None = None

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def log_tail(self) -> str:
        return ""


class PostfixSUT(SUT):
    def __init__(
        self,
        workdir: Path,
        sink_port: int,
        cert: Path,
        key: Path,
        reuse: bool,
        cpus: set[int] | None,
    ) -> None:
        self.name = "postfix" if reuse else "postfix-noreuse"
        self.port = free_port()
        self.inst = postfix.PostfixInstance(
            workdir / "postfix", self.port, sink_port, cert, key, reuse=reuse, cpus=cpus
        )

    def start(self) -> None:
        self.root_pid = self.inst.start()
        wait_smtp(self.port)

    def stop(self) -> None:
        self.inst.stop()

    def log_tail(self) -> str:
        try:
            lines = self.inst.maillog.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        interesting = [x for x in lines if "warning" in x or "fatal" in x or "status=" in x]
        return "\n".join((interesting or lines)[-15:])


# The plain relay: bench.test routed to the sink, MTA-STS and DANE off (no lookups).
ROUTED = """\
  routes:
    - {{domains: ["bench.test"], via: "[127.0.0.1]:{sink_port}"}}
  # any DNS lookup stays on loopback (and fails fast): nothing leaves 127.0.0.0/8
  resolver: {{nameservers: [127.0.0.1], port: {dns_port}, timeout: 1s}}"""

# relay-dane: bench.test's MX found through a validating resolver (a DNSSEC lab on
# loopback), its TLSA record matched on every session, MTA-STS looked up (no policy).
RESOLVED = """\
  port: {sink_port}
  resolver: {{nameservers: [127.0.0.1], port: {dns_port}, timeout: 2s}}"""

RELAY_CONFIG = """\
# tls-relay as benchmarked (bench/systems.py): same role as the Postfix anchor.
hostname: relay.bench.invalid
listeners:
  - {{address: "127.0.0.1:{port}", tls: starttls}}
tls: {{cert: "{cert}", key: "{key}"}}
clients: {{networks: [127.0.0.0/8]}}
limits: {{max_message_size: 50MiB}}
spool: {{path: "{spool}"}}
queue: {{retry: [1s], max_lifetime: 1h, shutdown_grace: 2s}}
delivery:
{delivery}
policy:
  default: {{level: encrypt}}
  mta_sts: {policies}
  dane: {policies}
# the per-delivery audit trail (relay-noaudit turns it off to measure its cost)
audit: {{enabled: {audit}}}
# one process per CPU it may use: 1 when pinned (percore), 2 on the whole machine
workers: auto
"""


def relay_binary() -> Path:
    cand = Path(PY).parent / "tls-relay"
    return cand if cand.exists() else ROOT / ".venv" / "bin" / "tls-relay"


class RelaySUT(SUT):
    name = "relay"

    def __init__(
        self,
        workdir: Path,
        sink_port: int,
        cert: Path,
        key: Path,
        cpus: set[int] | None,
        extra_env: dict[str, str] | None = None,
        dnssec_port: int | None = None,
        audit: bool = True,
    ) -> None:
        """*dnssec_port*: a validating resolver on loopback (relay-dane): MX lookup,
        MTA-STS and DANE on; else bench.test is routed and both are off."""
        self.workdir = workdir / "relay"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config = self.workdir / "relay.yaml"
        delivery = ROUTED if dnssec_port is None else RESOLVED
        self.config.write_text(
            RELAY_CONFIG.format(
                port=self.port,
                cert=cert,
                key=key,
                spool=self.workdir / "spool",
                delivery=delivery.format(
                    sink_port=sink_port,
                    dns_port=free_port() if dnssec_port is None else dnssec_port,
                ),
                policies="false" if dnssec_port is None else "true",
                audit="true" if audit else "false",
            )
        )
        self.cmd = taskset(cpus, [str(relay_binary()), "serve", "-c", str(self.config)])
        self.env = dict(os.environ, **(extra_env or {}))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=open(self.workdir / "relay.out", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=self.env,
            start_new_session=True,
        )
        self.root_pid = self.proc.pid
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"tls-relay serve exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                wait_smtp(self.port, timeout=0.5)
                return
            except RuntimeError:
                continue
        raise RuntimeError(f"tls-relay serve does not greet on {self.port}:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None:
            pids = procs.tree(self.proc.pid)
            _kill_group(self.proc, 10)
            for pid in pids:  # workers that left the process group, if any
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                    cwd = os.readlink(f"/proc/{pid}/cwd")
                except OSError:
                    continue
                if str(self.config).encode() in cmdline or cwd.startswith(str(self.workdir)):
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
            self.proc = None

    def log_tail(self) -> str:
        try:
            lines = (self.workdir / "relay.out").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-15:])


def relay_unavailable(dnssec: bool = False) -> str | None:
    """None if ``tls-relay serve`` looks runnable, else why not (checked by a real start
    in bench.run before the relay rows are attempted); *dnssec*: the DANE row also needs
    the DNSSEC lab's Debian packages."""
    if not relay_binary().exists():
        return f"{relay_binary()} not found (make venv)"
    if dnssec:
        from tests.fixtures import dnssec as lab

        if not lab.available():
            return "needs nsd, unbound and ldnsutils (make deps)"
    return None


def dane_lab(wd: Path, sink_port: int, cert: Path) -> contextlib.AbstractContextManager[Any]:
    """A DNSSEC lab (nsd + validating unbound, tests/fixtures/dnssec.py) where bench.test's
    MX is the sink, with a DANE-EE TLSA record for the sink's certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from tests.fixtures.dnssec import running_lab

    leaf = x509.load_pem_x509_certificates(cert.read_bytes())[0]
    spki = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    records = [
        "bench.test. 300 IN MX 10 mx.bench.test.",
        "mx.bench.test. 300 IN A 127.0.0.1",
        f"_{sink_port}._tcp.mx.bench.test. 300 IN TLSA 3 1 1 {hashlib.sha256(spki).hexdigest()}",
    ]
    (wd / "dnssec").mkdir()
    return running_lab(wd / "dnssec", secure=records)
