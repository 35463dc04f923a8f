"""The password file and the CRAM-MD5 secrets file: formats, hashing, reading.

Password file (``[auth] password_file``), one user per line::

    alice:$scrypt$ln=14,r=8,p=1$<salt>$<hash>:$scram-sha-256$4096$<salt>$<StoredKey>$<ServerKey>

- the first field is the local user name (lower case);
- the second a salted ``hashlib.scrypt`` hash of the password, for PLAIN and
  LOGIN: a stolen file does not give the passwords away cheaply;
- the third, optional, the rfc5802 SCRAM-SHA-256 keys (salted PBKDF2): a
  stolen file does not let anyone log in with SCRAM either.

Base64 fields are standard base64. ``#`` starts a comment line.

CRAM-MD5 secrets file (``[auth] cram_md5_secrets_file``), ``user:secret``
per line. CRAM-MD5 (rfc2195) needs the secret itself on the server: this
file is plaintext-equivalent, which is why it is separate and optional.

Files are re-read when they change (size, mtime or inode), so ``mailsvc
passwd`` takes effect without a restart. Reading blocks: callers run it in a
thread. Writing (``write_entry``) is atomic: a temporary file, fsync, rename.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mailsvc.smtp.sasl import ScramKeys, scram_keys

SCRYPT_LOG_N = 14  # N = 16384: 16 MiB and some tens of milliseconds per check
SCRYPT_R = 8
SCRYPT_P = 1
SCRAM_ITERATIONS = 4096  # rfc7677 4: at least 4096
_MAXMEM = 64 * 1024 * 1024


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, salt: bytes | None = None, log_n: int = SCRYPT_LOG_N) -> str:
    """``$scrypt$ln=…,r=…,p=…$salt$hash`` for ``password`` (a fresh 16-octet salt)."""
    salt = secrets.token_bytes(16) if salt is None else salt
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=2**log_n, r=SCRYPT_R, p=SCRYPT_P, maxmem=_MAXMEM, dklen=32)
    return f"$scrypt$ln={log_n},r={SCRYPT_R},p={SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, hashed: str) -> bool:
    """Whether ``password`` matches ``hashed`` (from ``hash_password``). Constant-time compare."""
    try:
        _, scheme, params, salt, digest = hashed.split("$")
        if scheme != "scrypt":
            return False
        values = dict(item.split("=", 1) for item in params.split(","))
        n, r, p = 2 ** int(values["ln"]), int(values["r"]), int(values["p"])
        salt_bytes, expected = base64.b64decode(salt, validate=True), base64.b64decode(digest, validate=True)
        if n > 2**20 or r > 32 or p > 16:
            return False  # refuse parameters that would eat the machine
        actual = hashlib.scrypt(password.encode("utf-8"), salt=salt_bytes, n=n, r=r, p=p, maxmem=_MAXMEM * 16, dklen=len(expected))
    except (ValueError, KeyError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def format_scram(keys: ScramKeys) -> str:
    """``$scram-sha-256$iterations$salt$StoredKey$ServerKey``."""
    return f"$scram-sha-256${keys.iterations}${_b64(keys.salt)}${_b64(keys.stored_key)}${_b64(keys.server_key)}"


def parse_scram(text: str) -> ScramKeys | None:
    """The keys in a ``format_scram`` field, or None if it is not one."""
    try:
        _, scheme, iterations, salt, stored, server = text.split("$")
        if scheme != "scram-sha-256":
            return None
        return ScramKeys(
            base64.b64decode(salt, validate=True),
            int(iterations),
            base64.b64decode(stored, validate=True),
            base64.b64decode(server, validate=True),
        )
    except ValueError:
        return None


@dataclass(frozen=True)
class PasswordEntry:
    """One user of the password file."""

    name: str
    hashed: str
    scram: ScramKeys | None = None

    def line(self) -> str:
        """The entry as a line of the file (no line end)."""
        return f"{self.name}:{self.hashed}" + (f":{format_scram(self.scram)}" if self.scram else "")


def make_entry(name: str, password: str) -> PasswordEntry:
    """A new entry for ``name``: scrypt hash and SCRAM-SHA-256 keys, fresh salts."""
    return PasswordEntry(name.lower(), hash_password(password), scram_keys(password, secrets.token_bytes(16), SCRAM_ITERATIONS))


def parse_password_line(line: str) -> PasswordEntry | None:
    """A ``PasswordEntry`` from a line, None for a blank or comment line.

    :raise ValueError: the line is malformed.
    """
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    fields = line.split(":")
    if len(fields) not in (2, 3) or not fields[0] or not fields[1].startswith("$scrypt$"):
        raise ValueError("expected user:$scrypt$...[:$scram-sha-256$...]")
    scram = None
    if len(fields) == 3:
        scram = parse_scram(fields[2])
        if scram is None:
            raise ValueError("the third field is not $scram-sha-256$...")
    return PasswordEntry(fields[0].lower(), fields[1], scram)


class _WatchedFile:
    """A text file parsed again whenever it changes; missing = empty."""

    def __init__(self, path: Path, parse_line: Callable, log: Callable[[str], None] | None = None) -> None:
        self.path = Path(path)
        self._parse_line = parse_line
        self._log = log or (lambda text: None)
        self._stamp: tuple | None = ()
        self._entries: dict = {}

    def entries(self) -> dict:
        """name → parsed entry, as the file says now."""
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            self._stamp = stamp
            self._entries = {} if stamp is None else self._read()
        return self._entries

    def _read(self) -> dict:
        entries = {}
        try:
            text = self.path.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as error:
            self._log(f"{self.path}: cannot read: {error}")
            return {}
        for number, line in enumerate(text.splitlines(), 1):
            try:
                entry = self._parse_line(line)
            except ValueError as error:
                self._log(f"{self.path}:{number}: ignored: {error}")
                continue
            if entry is not None:
                entries[entry[0] if isinstance(entry, tuple) else entry.name] = entry
        return entries


class PasswordFile(_WatchedFile):
    """The password file, read when it changes. ``lookup(name)`` → ``PasswordEntry`` or None."""

    def __init__(self, path: Path, log: Callable[[str], None] | None = None) -> None:
        super().__init__(path, parse_password_line, log)

    def lookup(self, name: str) -> PasswordEntry | None:
        """The entry of ``name`` (lower-cased), or None."""
        return self.entries().get(name.lower())


def parse_secret_line(line: str) -> tuple[str, bytes] | None:
    """``user:secret`` → (user, secret octets); None for blank and comment lines."""
    stripped = line.rstrip("\r\n")
    if not stripped.strip() or stripped.lstrip().startswith("#"):
        return None
    name, colon, secret = stripped.partition(":")
    if not colon or not name.strip() or not secret:
        raise ValueError("expected user:secret")
    return name.strip().lower(), secret.encode("utf-8")


class SecretsFile(_WatchedFile):
    """The CRAM-MD5 secrets file. ``secret(name)`` → octets or None."""

    def __init__(self, path: Path, log: Callable[[str], None] | None = None) -> None:
        super().__init__(path, parse_secret_line, log)

    def secret(self, name: str) -> bytes | None:
        """The secret of ``name`` (lower-cased), or None."""
        entry = self.entries().get(name.lower())
        return None if entry is None else entry[1]


def write_entry(path: Path, name: str, line: str | None) -> None:
    """Set (or with ``line=None`` remove) the line of ``name`` in the file at ``path``.

    Other lines are kept as they are. The file is replaced atomically, mode
    0600, its directory created (0700) if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        old = path.read_text("utf-8").splitlines()
    except FileNotFoundError:
        old = []
    key = name.lower()
    out, done = [], False
    for existing in old:
        field = existing.split(":", 1)[0].strip().lower()
        if field == key and not existing.lstrip().startswith("#"):
            if line is not None and not done:
                out.append(line)
            done = True
        else:
            out.append(existing)
    if line is not None and not done:
        out.append(line)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(item + "\n" for item in out))
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
