"""What the benchmark runs: the systems, placements, loads and client modes.

A ``Load`` is one run's traffic: C connections x M messages of S bytes of one shape
(bench.messages), in one client mode, with what the driver measures on top (PSS every
sample, a NOOP probe) and whether a 5xx for a message is an outcome or a failure.
"""

from __future__ import annotations

from dataclasses import dataclass

KIB, MIB = 1024, 1024 * 1024
SYSTEMS = ("direct", "postfix", "postfix-noreuse", "relay", "relay-noaudit", "relay-dane")
PLACEMENTS = ("percore", "machine")

# Client modes (issue 14): how the generator talks to the SUT and the sink to the SUT.
MODES = {
    "pipe": "pipelining client, sink offers PIPELINING and CHUNKING",
    "nopipe": "non-pipelining client, sink without PIPELINING and CHUNKING",
    "nopipe-client": "non-pipelining client, sink offers PIPELINING and CHUNKING",
    "pipe-data": "pipelining client, sink offers PIPELINING, not CHUNKING (DATA)",
}


@dataclass(frozen=True)
class Load:
    name: str  # the row's size label: 2k, 100k, 10m, mem-20m, shortlines, ...
    size: int  # bytes per message (about)
    conns: int
    msgs: int  # per connection
    shape: str = "plain"  # bench.messages.SHAPES
    mode: str = "pipe"  # MODES
    pss_every: int = 10  # sample PSS every Nth 50 ms tick (1: every 50 ms)
    probe: bool = False  # a NOOP probe session alongside (bench.probe)
    rejects_ok: bool = False  # a reply other than 250 is an outcome to report, not a failure
    data_timeout: float = 120.0  # end-of-data dot -> reply, per message

    @property
    def client_pipelining(self) -> bool:
        return self.mode in ("pipe", "pipe-data")

    @property
    def sink_pipelining(self) -> bool:
        return self.mode != "nopipe"

    @property
    def sink_chunking(self) -> bool:
        return self.mode in ("pipe", "nopipe-client")

    @property
    def label(self) -> str:
        return self.name if self.mode == "pipe" else f"{self.name} {self.mode}"


SIZES = {
    "2k": Load("2k", 2 * KIB, 16, 200),
    "100k": Load("100k", 100 * KIB, 8, 50),
    "10m": Load("10m", 10 * MIB, 4, 8),  # 32 messages: 8 were too few to judge a lever
}
