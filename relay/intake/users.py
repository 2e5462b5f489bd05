"""Users: the file of SMTP AUTH users, salted scrypt hashes, password checks.

File format (YAML, mode 0600, written by ``tls-relay passwd USER``)::

    users:
      alice: "$scrypt$ln=14,r=8,p=1$<salt, base64>$<hash, base64>"

``ln`` is log2 of the scrypt cost N; salt is 16 random bytes; hash is 32 bytes
(hashlib.scrypt, a memory-hard KDF, RFC 7914).  Base64 is standard with padding.
An empty file or ``users: {}`` means no users.

Role: hash and verify passwords, load the file into a :class:`UserDb`, and write it
back atomically.  Not: networking or SASL parsing (the listener does that), and never
logging or storing a plaintext password.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from relay.errors import UsersFileError
from relay.safeio import atomic_write

SCHEME = "scrypt"
LN, R, P = 14, 8, 1  # N = 2**14, 16 MiB of memory per hash
SALT_BYTES = 16
HASH_BYTES = 32
_MAXMEM = 64 * 1024 * 1024
_HASH_RE = re.compile(r"\$scrypt\$ln=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)")
_BAD_NAME = re.compile(r"[\s:]")


@dataclass(frozen=True)
class _Params:
    ln: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scrypt(password: str, salt: bytes, ln: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=1 << ln, r=r, p=p, maxmem=_MAXMEM, dklen=HASH_BYTES
    )


def hash_password(password: str) -> str:
    """A fresh ``$scrypt$...`` string for *password* with a random 16-byte salt."""
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password, salt, LN, R, P)
    return f"${SCHEME}$ln={LN},r={R},p={P}${_b64(salt)}${_b64(digest)}"


def _parse(stored: str) -> _Params | None:
    match = _HASH_RE.fullmatch(stored)
    if match is None:
        return None
    ln, r, p = (int(x) for x in match.group(1, 2, 3))
    # Bound the cost so a tampered file cannot make one login eat the machine.
    if not (1 <= ln <= 20 and 1 <= r <= 32 and 1 <= p <= 16):
        return None
    try:
        salt = base64.b64decode(match.group(4), validate=True)
        digest = base64.b64decode(match.group(5), validate=True)
    except binascii.Error:
        return None
    return _Params(ln, r, p, salt, digest) if salt and digest else None


def is_valid_hash(stored: str) -> bool:
    """True if *stored* is a hash string this module can verify."""
    return _parse(stored) is not None


def verify_hash(stored: str, password: str) -> bool:
    """True if *password* matches *stored*; False for a malformed hash."""
    params = _parse(stored)
    if params is None:
        return False
    candidate = _scrypt(password, params.salt, params.ln, params.r, params.p)
    return hmac.compare_digest(candidate[: len(params.digest)], params.digest)


def check_user_name(user: str) -> None:
    """Raise UsersFileError for a name that SASL or the file could not carry."""
    if not user or _BAD_NAME.search(user) or not user.isprintable():
        raise UsersFileError(
            f"user name must be non-empty, printable, without spaces or ':' (got {user!r})"
        )


def _read_mapping(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsersFileError(f"{path}: cannot read users file: {exc.strerror or exc}") from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsersFileError(f"{path}: not valid YAML: {exc}") from exc
    return _users_from_doc(path, doc)


def _users_from_doc(path: Path, doc: object) -> dict[str, str]:
    if doc is None:
        return {}
    if not isinstance(doc, Mapping) or set(doc) - {"users"}:
        raise UsersFileError(f"{path}: must be a mapping with a single key 'users'")
    users = doc.get("users") or {}
    if not isinstance(users, Mapping):
        raise UsersFileError(f"{path}: 'users' must be a mapping of user names to hashes")
    result: dict[str, str] = {}
    for name, stored in users.items():
        if not isinstance(name, str) or _BAD_NAME.search(name) or not name:
            raise UsersFileError(f"{path}: users: bad user name {name!r}")
        if not isinstance(stored, str) or not is_valid_hash(stored):
            # Never echo the value: it might be a plaintext password someone pasted.
            raise UsersFileError(
                f'{path}: users["{name}"] is not a $scrypt$ hash; set it with tls-relay passwd'
            )
        result[name] = stored
    return result


def check_file(path: Path) -> str | None:
    """The problem with the users file at *path* as a sentence, or None if it loads."""
    try:
        _read_mapping(path)
    except UsersFileError as exc:
        return str(exc).removeprefix(f"{path}: ")
    return None


class UserDb:
    """Users and their hashes, loaded once; ``verify`` is what AUTH calls."""

    def __init__(self, users: Mapping[str, str], source: Path | None = None) -> None:
        self._users = dict(users)
        self.source = source
        # Unknown users still cost one scrypt run, so timing does not reveal who exists.
        self._dummy = hash_password(secrets.token_hex(16))

    @classmethod
    def load(cls, path: Path) -> UserDb:
        return cls(_read_mapping(path), source=path)

    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, user: object) -> bool:
        return user in self._users

    def verify(self, user: str, password: str) -> bool:
        stored = self._users.get(user)
        if stored is None:
            verify_hash(self._dummy, password)
            return False
        return verify_hash(stored, password)


def _dump(users: Mapping[str, str]) -> bytes:
    header = "# tls-relay users file: written by `tls-relay passwd USER`; scrypt hashes only.\n"
    body = yaml.safe_dump({"users": dict(sorted(users.items()))}, default_flow_style=False)
    return (header + body).encode("utf-8")


def set_password(path: Path, user: str, password: str) -> None:
    """Add or change *user* in the users file at *path* (created if missing)."""
    check_user_name(user)
    if not password:
        raise UsersFileError("refusing an empty password")
    users = _read_mapping(path) if path.exists() else {}
    users[user] = hash_password(password)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, _dump(users), 0o600)
    except OSError as exc:
        raise UsersFileError(f"{path}: cannot write users file: {exc.strerror or exc}") from exc
