"""Benchmark harness: tls-relay against Postfix, side by side (issue 5).

Pieces (each runs as its own process so it can be pinned to a CPU):
- ``bench.loadgen``: STARTTLS SMTP load generator (C connections x M messages of size S).
- ``bench.sink``: STARTTLS SMTP sink that counts Message-IDs and discards the bytes.
- ``bench.postfix``: a private Postfix instance (own config dir and queue under a tmp dir).
- ``bench.probe``: a NOOP latency probe on its own session.
- ``bench.run``: the driver (``python -m bench.run``), prints the report, writes JSON; one
  run in ``bench.runone``, the issue-14 scenarios in ``bench.modes``, ``bench.memory``,
  ``bench.shapes``, the tables in ``bench.report``, accounting in ``bench.procs``.

Everything binds 127.0.0.0/8 only, and every run is bounded in count and time.
"""
