"""A private Postfix instance configured as a TLS-enforcing relay: the benchmark's anchor.

Role: write main.cf/master.cf into ``<base>/etc``, queue under ``<base>/queue``, data
under ``<base>/data``, log to ``<base>/maillog``; start it with ``postfix -c <base>/etc
start`` (optionally under ``taskset`` so the master and every daemon it forks inherit
the CPU affinity); find the master pid for CPU/RSS accounting (bench.procs); stop it
(``postfix stop``, then SIGKILL of whatever is left of its process tree).

Configuration, as issue 5 asks:
- smtpd on 127.0.0.1:PORT only, ``smtpd_tls_security_level = encrypt`` (STARTTLS
  required before MAIL), the same ECDSA P-256 certificate as tls-relay;
- ``mynetworks = 127.0.0.0/8`` may relay; no local delivery at all;
- ``smtp_tls_security_level = encrypt`` to the sink, bench domain routed with
  ``transport_maps = inline:{bench.test=smtp:[127.0.0.1]:SINK}`` and ``relayhost`` to
  the sink too (so even a bounce never leaves loopback); DNS off for the SMTP client;
- ``smtp_tls_connection_reuse = yes`` with tlsproxy in master.cf (``reuse=False`` gives
  the other setting: every delivery is a new TCP+TLS connection);
- ``smtpd_peername_lookup = no`` (no reverse DNS of 127.0.0.1: keeps all traffic on
  loopback; tls-relay does no rDNS either);
- ``message_size_limit`` raised to 50 MiB (the default, 10 240 000 bytes, is below the
  10 MiB benchmark size); everything else is Debian's default (process limits,
  ``max_use``, ``max_idle``, qmgr concurrency, fsync of the queue file before 250).
No chroot (each daemon runs from the private queue directory).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from bench import procs

POSTFIX = "/usr/sbin/postfix"
DAEMONS = "/usr/lib/postfix/sbin"

MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
{listen} inet n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
{tlsproxy}tlsproxy  unix  -       -       n       -       0       tlsproxy
"""

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {base}/queue
data_directory = {base}/data
mail_owner = postfix
setgid_group = postdrop
maillog_file = {base}/maillog
maillog_file_prefixes = {base}
myhostname = postfix.bench.invalid
mydomain = bench.invalid
myorigin = $myhostname
mydestination =
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
biff = no
smtputf8_enable = no
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_peername_lookup = no
message_size_limit = 52428800
transport_maps = inline:{{ bench.test=smtp:[127.0.0.1]:{sink_port} }}
relayhost = [127.0.0.1]:{sink_port}
smtp_dns_support_level = disabled

# inbound: STARTTLS required before MAIL, same ECDSA P-256 certificate as tls-relay
smtpd_tls_security_level = encrypt
smtpd_tls_chain_files = {key}, {cert}
smtpd_tls_received_header = yes
smtpd_tls_loglevel = 0

# outbound: TLS required (certificate not checked), optional connection reuse via tlsproxy
smtp_tls_security_level = encrypt
smtp_tls_connection_reuse = {reuse}
smtp_tls_loglevel = 0
"""


class PostfixError(RuntimeError):
    pass


class PostfixInstance:
    def __init__(
        self,
        base: Path,
        port: int,
        sink_port: int,
        cert: Path,
        key: Path,
        reuse: bool = True,
        cpus: set[int] | None = None,
    ) -> None:
        self.base = Path(base)
        self.etc = self.base / "etc"
        self.port = port
        self.sink_port = sink_port
        self.cert = Path(cert)
        self.key = Path(key)
        self.reuse = reuse
        self.cpus = cpus
        self.master_pid: int | None = None

    @property
    def maillog(self) -> Path:
        return self.base / "maillog"

    def write_config(self) -> None:
        for sub in ("etc", "queue", "data"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        # Postfix daemons run as the mail_owner: the tree must be reachable, data writable.
        os.chmod(self.base, 0o755)
        shutil.chown(self.base / "data", "postfix", "postfix")
        # the key must be readable by smtpd (runs as root at open time, but be explicit)
        (self.etc / "main.cf").write_text(
            MAIN_CF.format(
                base=self.base,
                sink_port=self.sink_port,
                cert=self.cert,
                key=self.key,
                reuse="yes" if self.reuse else "no",
            )
        )
        (self.etc / "master.cf").write_text(
            MASTER_CF.format(
                listen=f"127.0.0.1:{self.port}",
                tlsproxy="" if self.reuse else "#",
            )
        )
        for name in ("dynamicmaps.cf",):
            src = Path("/etc/postfix") / name
            if src.exists():
                shutil.copy(src, self.etc / name)
        if Path("/etc/postfix/dynamicmaps.cf.d").is_dir():
            shutil.copytree(
                "/etc/postfix/dynamicmaps.cf.d", self.etc / "dynamicmaps.cf.d", dirs_exist_ok=True
            )

    def _cmd(self, *args: str) -> list[str]:
        cmd = [POSTFIX, "-c", str(self.etc), *args]
        if self.cpus is not None:
            cmd = ["taskset", "-c", ",".join(map(str, sorted(self.cpus))), *cmd]
        return cmd

    def start(self, timeout: float = 30.0) -> int:
        self.write_config()
        env = dict(os.environ, MAIL_CONFIG=str(self.etc))
        r = subprocess.run(
            self._cmd("start"), capture_output=True, text=True, timeout=timeout, env=env
        )
        if r.returncode != 0:
            raise PostfixError(
                f"postfix start failed ({r.returncode}): {r.stderr.strip()} {self._why()}"
            )
        pidfile = self.base / "queue" / "pid" / "master.pid"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                pid = int(pidfile.read_text().split()[0])
                if Path(f"/proc/{pid}").exists():
                    self.master_pid = pid
                    break
            except (OSError, ValueError, IndexError):
                pass
            time.sleep(0.05)
        else:
            raise PostfixError(f"no master pid in {pidfile} after {timeout}s")
        return self.master_pid

    def _why(self) -> str:
        """Postfix prints its fatal messages only to a terminal: rerun `check` under one."""
        try:
            r = subprocess.run(
                ["script", "-qec", f"{POSTFIX} -c {self.etc} check", "/dev/null"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            return r.stdout.strip()[-2000:]
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"(could not run postfix check: {exc})"

    def stop(self, timeout: float = 15.0) -> None:
        """``postfix stop``, wait for the master to exit, then SIGKILL any leftover."""
        pids = procs.tree(self.master_pid) if self.master_pid else []
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            subprocess.run(
                [POSTFIX, "-c", str(self.etc), "stop"],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        deadline = time.monotonic() + timeout
        while self.master_pid and time.monotonic() < deadline:
            if not _alive(self.master_pid):
                break
            time.sleep(0.05)
        for pid in [*pids, *(procs.tree(self.master_pid) if self.master_pid else [])]:
            if _alive(pid) and _owned_by_us(pid, self.base):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        self.master_pid = None


def _alive(pid: int) -> bool:
    st = procs._stat(pid)
    return st is not None and st[2] != "Z"


def _owned_by_us(pid: int, base: Path) -> bool:
    """Only ever kill a process that is a Postfix daemon of *this* instance."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return str(base) in cwd or str(base).encode() in cmdline


def available() -> str | None:
    """None if Postfix can be used here, else why not."""
    if not Path(POSTFIX).exists() or not Path(DAEMONS, "master").exists():
        return "Debian's postfix package is not installed (make deps)"
    if os.geteuid() != 0:
        return "Postfix's master must start as root"
    return None
