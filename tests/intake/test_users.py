"""relay.users: scrypt hashes, the users file, and UserDb.verify."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml

from relay.errors import UsersFileError
from relay.intake import users


def test_hash_format_and_verify() -> None:
    stored = users.hash_password("correct horse")
    assert stored.startswith("$scrypt$ln=14,r=8,p=1$")
    assert "correct horse" not in stored
    assert users.verify_hash(stored, "correct horse")
    assert not users.verify_hash(stored, "Correct horse")
    assert users.hash_password("correct horse") != stored  # random salt


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "hunter2",
        "$scrypt$ln=14,r=8,p=1$!!!$AAAA",
        "$scrypt$ln=40,r=8,p=1$AAAA$AAAA",  # absurd cost: refused, not computed
        "$bcrypt$ln=14,r=8,p=1$AAAA$AAAA",
    ],
)
def test_malformed_hashes_never_verify(stored: str) -> None:
    assert not users.is_valid_hash(stored)
    assert not users.verify_hash(stored, "hunter2")


def test_set_password_creates_file_0600_without_plaintext(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "users.yaml"
    users.set_password(path, "alice", "s3cret-pw")
    users.set_password(path, "bob", "other-pw")
    users.set_password(path, "alice", "new-pw")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert "s3cret-pw" not in text and "new-pw" not in text and "other-pw" not in text
    assert set(yaml.safe_load(text)["users"]) == {"alice", "bob"}
    db = users.UserDb.load(path)
    assert len(db) == 2 and "alice" in db
    assert db.verify("alice", "new-pw")
    assert not db.verify("alice", "s3cret-pw")
    assert db.verify("bob", "other-pw")
    assert not db.verify("carol", "new-pw")
    assert not list(path.parent.glob(".tmp-*"))


@pytest.mark.parametrize(
    ("user", "password"), [("alice", ""), ("al ice", "pw"), ("a:b", "pw"), ("", "pw")]
)
def test_set_password_refuses(tmp_path: Path, user: str, password: str) -> None:
    with pytest.raises(UsersFileError):
        users.set_password(tmp_path / "users.yaml", user, password)
    assert not (tmp_path / "users.yaml").exists()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("users: [alice]\n", "'users' must be a mapping"),
        ("people: {}\n", "single key 'users'"),
        ("users: {alice: hunter2}\n", 'users["alice"] is not a $scrypt$ hash'),
        ("users: {alice: [\n", "not valid YAML"),
    ],
)
def test_load_rejects_malformed_files(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "users.yaml"
    path.write_text(text)
    with pytest.raises(UsersFileError) as info:
        users.UserDb.load(path)
    assert str(info.value).startswith(f"{path}: ")
    assert fragment in str(info.value)
    assert "hunter2" not in str(info.value)  # a pasted plaintext password is never echoed


@pytest.mark.parametrize("text", ["", "users:\n", "users: {}\n"])
def test_empty_files_mean_no_users(tmp_path: Path, text: str) -> None:
    path = tmp_path / "users.yaml"
    path.write_text(text)
    db = users.UserDb.load(path)
    assert len(db) == 0
    assert not db.verify("alice", "anything")


def test_load_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(UsersFileError, match="cannot read users file"):
        users.UserDb.load(tmp_path / "absent.yaml")
