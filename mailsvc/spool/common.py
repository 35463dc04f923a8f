"""What the spool's modules share: queue ids, hop names, the ``SpoolError``
of an ``OSError``, a quiet unlink. Blocking; no Twisted."""

from __future__ import annotations

import errno
import itertools
import os
import re
import secrets
import threading
import time

from mailsvc.errors import SpoolError

HOP_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")  # a hop, and its directory's name
ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a queue id
RESERVED = frozenset({"tmp", "corrupt", "spent"})  # the spool's directories that are no hop
_FULL = frozenset(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if code)

# ---------------------------------------------------------------- names

_BASE32 = "0123456789abcdefghijklmnopqrstuv"  # base32hex, lower case: sorts as ASCII
_counter = itertools.count(secrets.randbelow(32**4))
_counter_lock = threading.Lock()


def _base32(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, digit = divmod(number, 32)
        digits.append(_BASE32[digit])
    return "".join(reversed(digits))


def new_id() -> str:
    """A fresh queue ID: 20 characters of ``[0-9a-v]``, sortable by time.

    Microseconds since the epoch (11 digits), then a per-process counter
    (4 digits, starting at random), then 25 random bits (5 digits): unique
    across restarts and across processes sharing a clock.
    """
    with _counter_lock:
        count = next(_counter) % 32**4
    return (
        _base32(time.time_ns() // 1000, 11) + _base32(count, 4) + _base32(secrets.randbits(25), 5)
    )


def check_hop(hop: str) -> str:
    """Return ``hop`` if it is safe as a directory name; raise ValueError if not.

    A hop name is 1-200 of letters, digits, ``.``, ``_`` and ``-``, starting
    with a letter or digit, and is not ``tmp``, ``corrupt`` or ``spent``.
    """
    if not isinstance(hop, str) or not HOP_RE.fullmatch(hop) or hop.lower() in RESERVED:
        raise ValueError(f"not a usable hop name: {hop!r}")
    return hop


def check_id(id: str) -> str:
    if not isinstance(id, str) or not ID_RE.fullmatch(id):
        raise ValueError(f"not a queue id: {id!r}")
    return id


# ---------------------------------------------------------------- errors, files


def spool_error(text: str, error: OSError) -> SpoolError:
    return SpoolError(f"{text}: {error}", temporary_full=error.errno in _FULL)


def unlink_quietly(path) -> None:
    """Remove ``path``; nothing if it is gone or cannot be removed."""
    try:
        os.unlink(path)
    except OSError:
        pass
