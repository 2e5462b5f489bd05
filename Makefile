# tls-relay: `make run` and `make test` work on a fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CONFIG  ?= config/relay.yaml
DEBS    := postfix swaks msmtp curl unbound nsd ldnsutils systemd

.PHONY: run test check lint bench deps exim venv clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# checkov checks deploy/kubernetes in the tests (tests/test_deploy.py).  Its own venv: it
# pins many libraries (a fresh install takes about half a minute) that must not decide ours.
CHECKOV_VENV  := .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed

$(CHECKOV_STAMP): tests/requirements-checkov.txt
	$(PY) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q --upgrade pip
	$(CHECKOV_VENV)/bin/pip install -q -r tests/requirements-checkov.txt
	touch $(CHECKOV_STAMP)

# Debian packages for the real-peer tests: Postfix as the receiving MX; swaks, msmtp and
# curl as clients;
# the DNSSEC lab for DANE tests (nsd + validating unbound over zones signed with ldnsutils),
# and systemd-analyze to check the unit under deploy/systemd.
deps:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "please install:$$missing (Debian packages)"; exit 1; fi; \
	fi

# Exim as the second receiving MX (tests/fixtures/exim.py).  Installing exim4 would remove
# Postfix (one mail-transport-agent per system), so Debian's packages are unpacked into
# var/exim/root, with any library they need that is not installed, and the system user
# compiled into the binary is added.  Needs root, like `deps`; without root the Exim
# tests skip (in CI, CI=true, they fail).
EXIM_STAMP := var/exim/.unpacked
EXIM_DEBS  := exim4-daemon-light exim4-base

exim: $(EXIM_STAMP)

$(EXIM_STAMP):
	@if [ "$$(id -u)" != 0 ]; then echo "make exim: needs root; the Exim tests will skip"; exit 0; fi; \
	set -e; rm -rf var/exim; mkdir -p var/exim/debs; cd var/exim/debs; \
	get() { apt-get download -qq -o APT::Sandbox::User=root "$$@" 2>/dev/null || \
	  { apt-get update -qq && apt-get download -qq -o APT::Sandbox::User=root "$$@"; }; }; \
	get $(EXIM_DEBS); \
	libs=$$(dpkg-deb -f exim4-daemon-light_*.deb Depends | tr ',' '\n' | sed -n 's/^ *\(lib[^ (|]*\).*/\1/p'); \
	need=""; for l in $$libs; do dpkg -s $$l >/dev/null 2>&1 || need="$$need $$l"; done; \
	if [ -n "$$need" ]; then echo "make exim: unpacking$$need too"; get $$need; fi; \
	for deb in *.deb; do dpkg-deb -x $$deb ../root; done; \
	chmod u-s ../root/usr/sbin/exim4; \
	getent passwd Debian-exim >/dev/null || useradd --system --user-group --no-create-home \
	  --home-dir /nonexistent --shell /usr/sbin/nologin Debian-exim; \
	touch ../.unpacked

var/certs/cert.pem: | $(STAMP)
	$(BIN)/tls-relay gen-cert --hostname localhost --out var/certs

run: $(STAMP) var/certs/cert.pem
	$(BIN)/tls-relay serve -c $(CONFIG)

# The tests run in TEST_WORKERS pytest-xdist processes (0: serially, in this one).  Most of
# their time is spent waiting on subprocesses (the relay, Postfix, Exim, nsd/unbound), so 4 fit
# on 2 cores; worksteal lets an idle worker take queued tests from a busy one, so the slow
# e2e files do not pile up on one worker.
TEST_WORKERS ?= 4

test: $(STAMP) $(CHECKOV_STAMP) deps $(EXIM_STAMP)
	$(BIN)/python -m pytest -q -ra --durations=25 -n $(TEST_WORKERS) --dist worksteal

# `make check` is what CI runs (.ci/run): lint and types, then the tests.
check: lint test

lint: $(STAMP)
	$(BIN)/ruff check relay tests bench
	$(BIN)/ruff format --check relay tests bench
	$(BIN)/mypy

bench: $(STAMP) deps
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) var .pytest_cache .mypy_cache
