"""``mailsvc.passwords``: scrypt hashes, SCRAM keys, the files and their atomic rewrite."""

from __future__ import annotations

import os

import pytest

from mailsvc.passwords import (
    PasswordFile,
    SecretsFile,
    hash_password,
    make_entry,
    parse_password_line,
    verify_password,
    write_entry,
)
from mailsvc.smtp.sasl import scram_keys


def test_hash_is_salted_and_verifies():
    """Two hashes of one password differ (fresh salts); each verifies it and nothing else."""
    first, second = hash_password("pw", log_n=10), hash_password("pw", log_n=10)
    assert first != second and first.startswith("$scrypt$ln=10,r=8,p=1$")
    assert verify_password("pw", first) and verify_password("pw", second)
    assert not verify_password("pW", first) and not verify_password("", first)


@pytest.mark.parametrize("hashed", ["", "plain", "$scrypt$ln=10$x$y", "$md5$ln=10,r=8,p=1$AAAA$AAAA",
                                    "$scrypt$ln=30,r=8,p=1$AAAA$AAAA", "$scrypt$ln=10,r=8,p=1$!!$AAAA"])
def test_malformed_or_greedy_hashes_never_verify(hashed):
    """Unknown schemes, bad base64, and parameters that would eat the machine are refused."""
    assert not verify_password("pw", hashed)


def test_entry_lines_round_trip():
    """A made entry is one line that parses back to the same entry, SCRAM keys included."""
    entry = make_entry("Alice", "pw")
    assert entry.name == "alice"
    parsed = parse_password_line(entry.line())
    assert parsed == entry and verify_password("pw", parsed.hashed)
    assert parsed.scram == scram_keys("pw", entry.scram.salt, 4096)
    assert parse_password_line("# comment") is None and parse_password_line("  ") is None
    for bad in ("alice", "alice:plain", "alice:$scrypt$x:garbage", ":$scrypt$x"):
        with pytest.raises(ValueError):
            parse_password_line(bad)


def test_password_file_is_reread_when_it_changes(tmp_path):
    """A missing file is empty; a written one is read; a rewrite is seen; bad lines are skipped and logged."""
    logged = []
    path = tmp_path / "passwd"
    passwords = PasswordFile(path, log=logged.append)
    assert passwords.lookup("alice") is None
    write_entry(path, "alice", make_entry("alice", "one").line())
    assert verify_password("one", passwords.lookup("ALICE").hashed)
    with open(path, "a") as f:
        f.write("garbage line\n")
    write_entry(path, "alice", make_entry("alice", "two").line())
    assert verify_password("two", passwords.lookup("alice").hashed)
    assert logged and "ignored" in logged[-1]


def test_write_entry_replaces_only_that_user_atomically(tmp_path):
    """Other lines and comments stay; the file is 0600 in a 0700 directory; no temporary file is left."""
    path = tmp_path / "auth" / "passwd"
    write_entry(path, "alice", "alice:A")
    write_entry(path, "bob", "bob:B")
    with open(path, "a") as f:
        f.write("# alice: a comment\n")
    write_entry(path, "ALICE", "alice:A2")
    assert path.read_text() == "alice:A2\nbob:B\n# alice: a comment\n"
    write_entry(path, "bob", None)
    assert path.read_text() == "alice:A2\n# alice: a comment\n"
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    assert os.listdir(path.parent) == ["passwd"]


def test_secrets_file(tmp_path):
    """user:secret lines; the secret may hold colons; names are case-insensitive."""
    path = tmp_path / "cram"
    path.write_text("# c\nAlice:pa:ss\nbroken\n")
    logged = []
    secrets = SecretsFile(path, log=logged.append)
    assert secrets.secret("alice") == b"pa:ss" and secrets.secret("bob") is None
    assert len(logged) == 1
