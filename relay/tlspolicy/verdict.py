"""TLS policy: the outbound TLS verdict, as pure functions of values.

Role: from the configured policy (:func:`requirement`) and what the MX peer offered and
proved in the handshake (:class:`Observed`), decide whether a message may be handed to
that MX (:func:`decide` → :class:`Verdict`).  Certificate name matching per RFC 6125
(:func:`name_matches`) and TLS version ordering (:func:`version_rank`) live here too.

Not: sockets, TLS handshakes, DNS, clocks or logging.  The delivery module performs the
handshake and reports facts; this module only judges them.  A failed verdict is always a
reason to defer and try the next MX, never to bounce, never to fall back to plaintext.
Precedence (SPEC.md, RFC 8461 §2, RFC 7672): a secure TLSA RRset with usable records for
the MX host makes DANE the source for that host - the peer must match them - and MTA-STS
is not consulted for it (only unusable records: TLS without authentication, which every
level demands anyway); otherwise an MTA-STS
policy in mode enforce raises the requirement to `verify` for the MX host name.  The
configured level stays a floor under both: DANE adds its check to a `verify` or
`secure` floor, it never replaces it.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import re
import ssl
from dataclasses import dataclass

from relay.config import PolicyConfig, TlsLevel
from relay.domains import Domain, dns_name, normalize_domain
from relay.errors import InvalidDomain
from relay.tlspolicy.dane import TlsaSet, TlsaStatus, authenticate
from relay.tlspolicy.mtasts import Mode, StsPolicy


class PolicySource(enum.StrEnum):
    """Where the requirement for one MX host comes from (logs, `tls-relay policy`)."""

    STATIC = "static"  # the configured floor alone
    MTA_STS = "mta-sts"  # an MTA-STS policy in mode enforce raised (or confirmed) it
    DANE = "dane"


@dataclass(frozen=True)
class Requirement:
    level: TlsLevel
    min_version: ssl.TLSVersion
    mx_host: str  # name to match for `verify` (and SNI)
    secure_names: tuple[str, ...]  # for `secure`: the domain + `match` (".x" = any subdomain)
    source: str  # "static policy domains['example.com']" or "static policy default"
    policy_source: PolicySource = PolicySource.STATIC
    # MTA-STS enforce (RFC 8461 4.2): the certificate must also be valid for the MX host
    # name, even where `secure` is satisfied by another name (a `match` entry).
    mx_name_required: bool = False
    # The configured level, when DANE raised `level` above it (None: same as level).
    floor: TlsLevel | None = None
    tlsa: TlsaSet | None = None  # the secure TLSA RRset of this MX host, when DANE applies
    dane_names: tuple[str, ...] = ()  # DANE-TA reference identifiers (RFC 7672 3.2.2)

    @property
    def webpki_level(self) -> TlsLevel:
        """What the CA store and names must prove: the level itself, or under DANE
        the configured floor (`verify`/`secure` stay required beside the TLSA match)."""
        if self.level <= TlsLevel.SECURE:
            return self.level
        floor = self.floor if self.floor is not None else self.level
        return floor if floor <= TlsLevel.SECURE else TlsLevel.ENCRYPT


@dataclass(frozen=True)
class Observed:
    """Facts from one connection attempt, reported by delivery."""

    starttls_offered: bool
    starttls_code: int | None = None  # reply code to STARTTLS (None: not sent / implicit TLS)
    handshake_error: str | None = None  # str(exc) when the handshake failed
    chain_verified: bool = False  # handshake done with CERT_REQUIRED against the CA bundle
    tls_version: str | None = None  # "TLSv1.3"
    cipher: str | None = None
    cert_names: tuple[str, ...] = ()  # dNSName SANs of the peer cert (CN only if no SAN)
    cert_fingerprint: str | None = None  # sha256 hex
    implicit_tls: bool = False
    peer_chain: tuple[bytes, ...] = ()  # DER as sent by the peer, leaf first (for DANE)
    at: datetime.datetime | None = None  # when the handshake completed (UTC)


@dataclass(frozen=True)
class Verdict:
    """``ok``: deliver over this session.  ``level_met``: the highest level the session
    satisfies (also when not ok, e.g. ENCRYPT when VERIFY was required and the name did
    not match); None when no usable TLS session was established."""

    ok: bool
    level_met: TlsLevel | None
    reason: str
    result_type: str | None = None  # RFC 8460 4.3 failure type, when not ok


def requirement(
    policy: PolicyConfig,
    domain: Domain,
    mx_host: str,
    sts: StsPolicy | None = None,
    tlsa: TlsaSet | None = None,
    mx_secure: bool = False,
) -> Requirement:
    """What delivery of mail for *domain* through *mx_host* requires.  The configured
    level is the floor.  A secure TLSA RRset with usable records (*tlsa*) makes DANE the
    source (RFC 7672; MTA-STS is then not consulted, RFC 8461 §2); otherwise an MTA-STS
    policy in mode enforce (*sts*) raises the level to a WebPKI-valid certificate for
    the MX host name (RFC 8461 4.2) - ``verify``.  *mx_secure*: the MX RRset was validated, so the
    recipient domain is a DANE-TA name too (RFC 7672 3.2.2).  Whether the MX host is
    allowed at all is the caller's question (mx_allowed).  *domain* and the policy's
    keys and ``match`` entries are all in the one normal form (relay.domains)."""
    configured, source = policy.for_domain(domain)
    names = (domain, *configured.match)
    req = Requirement(
        level=configured.level,
        min_version=configured.min_version,
        mx_host=dns_name(mx_host),
        secure_names=tuple(dict.fromkeys(names)),
        source=source,
    )
    if tlsa is not None and tlsa.usable:
        return _dane_requirement(req, domain, tlsa, mx_secure)
    if tlsa is not None:
        # Kept for the reason a dane-only refusal gives.  A secure RRset with only
        # unusable records means TLS without authentication (RFC 7672 3.1.3), which
        # every level already demands: it neither authenticates nor exempts from MTA-STS.
        req = dataclasses.replace(req, tlsa=tlsa)
    if sts is None or sts.mode is not Mode.ENFORCE:
        return req
    return dataclasses.replace(
        req,
        level=max(req.level, TlsLevel.VERIFY),
        source=f"MTA-STS policy of {domain} (enforce)"
        if req.level < TlsLevel.VERIFY
        else f"{source} and MTA-STS policy of {domain} (enforce)",
        policy_source=PolicySource.MTA_STS,
        mx_name_required=True,
    )


def with_requiretls(req: Requirement) -> Requirement:
    """RFC 8689 4.2.1: a REQUIRETLS message needs an authenticated server - its DANE
    match, or else a WebPKI-valid certificate for the MX host name (``verify`` plus the
    MX-name rule of MTA-STS).  Whether the server offers REQUIRETLS is asked of its
    EHLO by delivery."""
    if req.level >= TlsLevel.DANE:
        return req
    return dataclasses.replace(
        req,
        level=max(req.level, TlsLevel.VERIFY),
        mx_name_required=True,
        source=f"{req.source} and REQUIRETLS (RFC 8689)",
    )


def _dane_requirement(
    req: Requirement, domain: Domain, tlsa: TlsaSet, mx_secure: bool
) -> Requirement:
    """DANE for this host: its usable TLSA records must match; the configured level
    stays the floor beside them."""
    dane_names = (req.mx_host, domain) if mx_secure and domain != req.mx_host else (req.mx_host,)
    floor_text = "" if req.level == TlsLevel.ENCRYPT else f"{req.source} and "
    return dataclasses.replace(
        req,
        level=max(req.level, TlsLevel.DANE),
        floor=req.level,
        source=f"{floor_text}DANE TLSA at {tlsa.name}",
        policy_source=PolicySource.DANE,
        tlsa=tlsa,
        dane_names=dane_names,
    )


# ---- TLS versions --------------------------------------------------------------------------

_TLS_RE = re.compile(r"^TLSv(\d+)(?:[._](\d+))?$", re.IGNORECASE)
_SSL_RANKS = {"sslv2": 2, "sslv3": 3}


def version_rank(v: str) -> int:
    """Order protocol names: SSLv2 < SSLv3 < TLSv1 < TLSv1.1 < TLSv1.2 < TLSv1.3 (< TLSv1.4).
    Accepts ``ssl.TLSVersion`` names too ("TLSv1_2").  Unknown names rank 0, below all."""
    text = v.strip()
    match = _TLS_RE.match(text)
    if match:
        return 100 * int(match.group(1)) + int(match.group(2) or 0) + 100
    return _SSL_RANKS.get(text.lower(), 0)


def _version_name(v: ssl.TLSVersion) -> str:
    if v is ssl.TLSVersion.MINIMUM_SUPPORTED:
        return "SSLv3"
    if v is ssl.TLSVersion.MAXIMUM_SUPPORTED:
        return "TLSv1.3"
    return v.name.replace("_", ".")  # TLSv1_2 -> TLSv1.2


# ---- certificate names (RFC 6125 §6.4) ---------------------------------------------------------


def _a_labels(name: str) -> str | None:
    """Case-folded A-label form of *name* (RFC 6125 §6.4.2: compare A-labels), or None
    if it is not a valid host name."""
    name = dns_name(name)
    if not name or any(not label for label in name.split(".")):
        return None
    labels = []
    for label in name.split("."):
        if label == "*" or label.isascii():
            labels.append(label)
            continue
        try:  # the same IDNA 2008 / UTS #46 form as every other name here
            labels.append(normalize_domain(label))
        except InvalidDomain:
            return None
    return ".".join(labels)


def name_matches(cert_name: str, wanted: str) -> bool:
    """Does the certificate's DNS name *cert_name* cover the host name *wanted*?

    RFC 6125 §6.4.3: a wildcard is accepted only as the whole leftmost label ("*.x.y"),
    matches exactly one label (never across dots, never the bare parent), and is refused
    directly under a single-label suffix ("*.com").  Partial wildcards ("f*.x.y") and
    wildcards anywhere else never match.  Comparison is case-insensitive on A-labels.
    """
    presented = _a_labels(cert_name)
    reference = _a_labels(wanted)
    if presented is None or reference is None or "*" in reference:
        return False
    if "*" not in presented:
        return presented == reference
    first, _, rest = presented.partition(".")
    if first != "*" or "*" in rest or rest.count(".") < 1:
        return False  # partial, misplaced or too-broad wildcard
    label, dot, ref_rest = reference.partition(".")
    return bool(label) and bool(dot) and ref_rest == rest


def _secure_name_matches(cert_name: str, entry: str) -> bool:
    """`secure` entries: "example.com" is matched as a host name; ".example.com" accepts
    any name strictly below example.com, including a wildcard covering only such names."""
    if not entry.startswith("."):
        return name_matches(cert_name, entry)
    parent = _a_labels(entry[1:])
    presented = _a_labels(cert_name)
    if parent is None or presented is None:
        return False
    if presented.startswith("*."):
        # "*.S" covers one label below S: all below `parent` iff S is parent or below it.
        suffix = presented[2:]
        if "*" in suffix or suffix.count(".") < 1:
            return False
        return suffix == parent or suffix.endswith("." + parent)
    return "*" not in presented and presented.endswith("." + parent)


# ---- the verdict -----------------------------------------------------------------------------


def _fail(reason: str, result_type: str, level_met: TlsLevel | None = None) -> Verdict:
    return Verdict(False, level_met, reason, result_type)


def _names_text(names: tuple[str, ...]) -> str:
    return ", ".join(names) if names else "(none)"


STARTTLS_NOT_SUPPORTED = "starttls-not-supported"  # RFC 8460 4.3 result types
CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
CERTIFICATE_EXPIRED = "certificate-expired"
CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
VALIDATION_FAILURE = "validation-failure"
TLSA_INVALID = "tlsa-invalid"
DANE_REQUIRED = "dane-required"
# The result types that say the server could not be authenticated: for REQUIRETLS a
# reason to return the message; anything else (a 454, a reset) may pass later.
AUTHENTICATION = frozenset(
    {CERTIFICATE_HOST_MISMATCH, CERTIFICATE_EXPIRED, CERTIFICATE_NOT_TRUSTED}
    | {TLSA_INVALID, DANE_REQUIRED}
)


def _handshake_result_type(error: str) -> str:
    """The RFC 8460 type of a failed handshake, from OpenSSL's reason text."""
    text = error.lower()
    if "expired" in text:
        return CERTIFICATE_EXPIRED
    if "certificate verif" in text or "unable to get" in text or "self-signed" in text:
        return CERTIFICATE_NOT_TRUSTED
    return VALIDATION_FAILURE


def _session_problem(req: Requirement, obs: Observed) -> tuple[str, str] | None:
    """Why there is no acceptable TLS session at all (and its RFC 8460 type), or None."""
    if not obs.implicit_tls and not obs.starttls_offered:
        why = "STARTTLS not offered by MX (downgrade or misconfiguration); refusing plaintext"
        return why, STARTTLS_NOT_SUPPORTED
    if (
        not obs.implicit_tls
        and obs.starttls_code is not None
        and not 200 <= obs.starttls_code < 300
    ):
        # RFC 3207 §4: 454 = TLS not available; any non-2xx means no TLS, so no mail.
        why = f"MX answered {obs.starttls_code} to STARTTLS; refusing to continue in plaintext"
        return why, STARTTLS_NOT_SUPPORTED
    if obs.handshake_error is not None:
        why = f"TLS handshake with MX failed: {obs.handshake_error}"
        return why, _handshake_result_type(obs.handshake_error)
    if obs.tls_version is None:
        return "no TLS session was established with MX; refusing plaintext", VALIDATION_FAILURE
    wanted = _version_name(req.min_version)
    if version_rank(obs.tls_version) < version_rank(wanted):
        why = f"MX negotiated {obs.tls_version}, below the required minimum {wanted}"
        return why, VALIDATION_FAILURE
    return None


def precheck(req: Requirement) -> Verdict | None:
    """A verdict that needs no connection: `dane-only` without a usable TLSA RRset can
    never be met (RFC 8460 ``dane-required``), so no connection is made at all."""
    if req.level >= TlsLevel.DANE and (req.tlsa is None or not req.tlsa.usable):
        if req.tlsa is None:
            found = (
                "not looked up: DANE is off, the host's addresses are not DNSSEC-secure, "
                "or the domain is routed"
            )
        elif req.tlsa.status is TlsaStatus.SECURE:
            found = f"{len(req.tlsa.records)} record(s), none usable (DANE-TA or DANE-EE)"
        else:
            found = req.tlsa.detail or req.tlsa.status.value
        return _fail(
            f"level {req.level.label} required ({req.source}) but {req.mx_host} has no usable "
            f"DNSSEC-validated TLSA RRset ({found})",
            DANE_REQUIRED,
        )
    return None


def _webpki(req: Requirement, obs: Observed, level: TlsLevel) -> Verdict:
    """The CA-store and name part of the verdict, for *level* (encrypt..secure)."""
    # Like Postfix: `verify` checks the MX host name; `secure` checks the recipient
    # domain / match list *instead*, so a spoofed MX name cannot satisfy it.
    names = _names_text(obs.cert_names)
    secure_ok = any(_secure_name_matches(n, e) for n in obs.cert_names for e in req.secure_names)
    mx_ok = False
    if not obs.chain_verified:
        met = TlsLevel.ENCRYPT
        verify_problem = "certificate chain could not be verified against the CA bundle"
        secure_problem = verify_problem
    else:
        mx_ok = any(name_matches(n, req.mx_host) for n in obs.cert_names)
        met = TlsLevel.SECURE if secure_ok else TlsLevel.VERIFY if mx_ok else TlsLevel.ENCRYPT
        verify_problem = f"certificate names ({names}) do not match MX host {req.mx_host}"
        secure_problem = (
            f"certificate names ({names}) match none of {_names_text(req.secure_names)}"
        )
    if req.mx_name_required and met >= TlsLevel.VERIFY and not mx_ok:
        why = f"certificate names ({names}) do not match MX host {req.mx_host}"
        return _fail(
            f"{req.source} requires the MX host name, but {why}", CERTIFICATE_HOST_MISMATCH, met
        )
    if met < level:
        problem = verify_problem if level == TlsLevel.VERIFY else secure_problem
        kind = CERTIFICATE_NOT_TRUSTED if not obs.chain_verified else CERTIFICATE_HOST_MISMATCH
        return _fail(f"level {level.label} required ({req.source}) but {problem}", kind, met)
    return Verdict(True, met, f"{obs.tls_version} session meets level {level.label}")


def decide(req: Requirement, obs: Observed) -> Verdict:
    """Deliver over this session or not, with a one-sentence reason."""
    refused = precheck(req)
    if refused is not None:
        return refused
    session_problem = _session_problem(req, obs)
    if session_problem is not None:
        return _fail(*session_problem)
    webpki = _webpki(req, obs, req.webpki_level)
    if req.level < TlsLevel.DANE or req.tlsa is None:  # (precheck refused DANE without)
        if not webpki.ok:
            return webpki
        met = webpki.level_met
        assert met is not None
        return Verdict(
            True, met, f"{obs.tls_version} session meets level {req.level.label} (met {met.label})"
        )
    at = obs.at or datetime.datetime.now(datetime.UTC)
    check = authenticate(req.tlsa.usable, obs.peer_chain, req.dane_names, at)
    if not check.ok:
        return _fail(
            f"{check.reason} ({req.source})", check.result_type or TLSA_INVALID, webpki.level_met
        )
    if not webpki.ok:  # the configured floor still applies under DANE
        return webpki
    return Verdict(True, TlsLevel.DANE, f"{obs.tls_version} session meets DANE: {check.reason}")
