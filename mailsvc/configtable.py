"""What every config table reader shares: typed getters that fail naming the key.

``mailsvc.config`` reads the file and the core tables; the other
``*config`` modules read theirs with the same ``Table`` and helpers.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

from mailsvc.errors import ConfigError
from mailsvc.smtp.address import AddressError, ascii_domain

# rfc1035 2.3.1 / rfc1123 2.1: letters, digits, hyphens; labels of at most
# 63 octets, at most 253 in all (without the trailing dot).
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z")
SITE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}\Z")  # a UUCP node name, safe as a spool hop
_NO_REACTOR = object()  # parsing an endpoint string only stores the reactor


def checkDomain(name: str) -> str | None:
    """``name`` lower-cased without a trailing dot if it is a sane domain name, else None.
    An internationalized name is given in A-labels (rfc5890), the form
    domains are compared in (``mailsvc.smtp.address.ascii_domain``)."""
    if not isinstance(name, str):
        return None
    if not name.isascii():
        try:
            name = ascii_domain(name)
        except AddressError:
            return None
    domain = name.lower().removesuffix(".")
    if len(domain) > 253 or not _DOMAIN.match(domain):
        return None
    return domain


def show(value: object) -> str:
    """A TOML value as an error message shows it: strings quoted, arrays named."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def resolve(base: Path, value: str) -> Path:
    """``value`` as an absolute path, relative ones taken from ``base``."""
    return Path(os.path.normpath(base / value))


class Table:
    """One TOML table being read: typed getters that fail naming the key."""

    def __init__(self, fileName: str, title: str, data: object, allowed: tuple[str, ...] | None) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{fileName}: {title}: expected a table, got {show(data)}")
        self.fileName, self.title, self.data = fileName, title, data
        for key in data if allowed is not None else ():
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, 1)
                self.fail(key, "unknown key" + (f" (did you mean {close[0]}?)" if close else ""))

    def fail(self, key: str, problem: str):
        """Stop with ``<file>: <table> <key>: <problem>``."""
        raise ConfigError(f"{self.fileName}: {self.title} {key}: {problem}")

    def string(self, key: str, default: str) -> str:
        """A non-empty string."""
        value = self.data.get(key, default)
        if not isinstance(value, str) or not value:
            self.fail(key, f"expected a non-empty string, got {show(value)}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        """true or false."""
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            self.fail(key, f"expected true or false, got {show(value)}")
        return value

    def integer(self, key: str, default: int, minimum: int = 1) -> int:
        """An integer (not a bool) at least ``minimum``."""
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            self.fail(key, f"expected {wanted}, got {show(value)}")
        return value

    def seconds(self, key: str, default: float) -> float:
        """A positive, finite number of seconds (integer or float)."""
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            self.fail(key, f"expected a positive number of seconds, got {show(value)}")
        return value

    def strings(self, key: str, default: list[str]) -> tuple[str, ...]:
        """An array of strings; a bad element is named ``key[i]``."""
        value = self.data.get(key, default)
        if not isinstance(value, list):
            self.fail(key, f"expected an array of strings, got {show(value)}")
        for index, item in enumerate(value):
            if not isinstance(item, str):
                self.fail(f"{key}[{index}]", f"expected a string, got {show(item)}")
        return tuple(value)

    def path(self, key: str, default: str, base: Path) -> Path:
        """A path string, made absolute against ``base``."""
        return resolve(base, self.string(key, default))

    def text(self, key: str, base: Path) -> tuple[Path, str]:
        """The path named by ``key`` and the UTF-8 text of that file."""
        path = self.path(key, "", base)
        try:
            return path, path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            self.fail(key, f"file not found: {path}")
        except OSError as e:
            self.fail(key, f"cannot read {path}: {e.strerror}")
        except UnicodeDecodeError:
            self.fail(key, f"{path}: not UTF-8 text")

    def endpoints(self, key: str, default, implicit_tls_example: str = "") -> tuple[str, ...]:
        """An array of Twisted server endpoint strings, each checked by parsing
        it. With ``implicit_tls_example`` (e.g. ``"tcp:465"``) the list is of
        implicit-TLS listeners: TLS comes from ``[tls]``, so ``ssl:`` and
        ``tls:`` endpoints are refused."""
        values = self.strings(key, list(default))
        for index, description in enumerate(values):
            if implicit_tls_example and description.split(":", 1)[0] in ("ssl", "tls"):
                self.fail(
                    f"{key}[{index}]",
                    f"give a plain endpoint such as {implicit_tls_example}; TLS is added from [tls] ({show(description)})",
                )
            problem = checkEndpoint(description)
            if problem is not None:
                self.fail(f"{key}[{index}]", f"not a valid endpoint: {show(description)} ({problem})")
        return values

    def domains(self, key: str, taken: dict[str, str] | None = None, owner: str = "") -> tuple[str, ...]:
        """An array of domain names, checked and lower-cased. With ``taken``
        (domain → who has it), a domain someone else has is refused, and the
        ones read here are recorded as ``owner``'s."""
        domains = []
        for index, text in enumerate(self.strings(key, [])):
            domain = checkDomain(text)
            if domain is None:
                self.fail(f"{key}[{index}]", f"not a valid domain name: {show(text)}")
            if taken is not None:
                if domain in taken:
                    self.fail(f"{key}[{index}]", f"{domain} already goes to {taken[domain]}")
                taken[domain] = owner
            domains.append(domain)
        return tuple(domains)

    def site_name(self, names: set[str], kind: str = "site") -> str:
        """``name``: a site name that is safe as a spool hop and not in ``names``
        (the sites read so far); it is added to ``names``."""
        name = self.string("name", "")
        if not SITE_NAME.match(name):
            self.fail("name", f"a {kind} name is lower-case letters, digits, - and _; got {show(name)}")
        if name in names:
            self.fail("name", f"site {name} is defined twice")
        names.add(name)
        return name


def checkEndpoint(description: str) -> str | None:
    """Why ``description`` is not a Twisted server endpoint string, or None if it is one."""
    from twisted.internet.endpoints import serverFromString

    try:
        endpoint = serverFromString(_NO_REACTOR, description)
    except Exception as e:  # the parsers raise ValueError, TypeError, ImportError...
        return str(e) or type(e).__name__
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 <= port <= 65535:
        return f"port {port} is out of range"
    return None
