"""xtext (rfc3461 4): how DSN parameters carry any octet in an ESMTP value.

``+XX`` (two upper-case hex digits) stands for one octet; every other
character must be printable ASCII other than ``+`` and ``=``.
"""

from __future__ import annotations

import re

_VALID = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")
_HEX = re.compile(r"\+([0-9A-F]{2})")


def is_xtext(text: str) -> bool:
    """Whether ``text`` is well-formed xtext."""
    return bool(_VALID.match(text))


def decode(text: str) -> str:
    """The string ``text`` stands for (its octets read as UTF-8, as rfc6533 allows)."""
    pieces = _HEX.split(text)  # literal, hex, literal, hex, ..., literal
    octets = b"".join(bytes.fromhex(p) if i % 2 else p.encode("utf-8") for i, p in enumerate(pieces))
    return octets.decode("utf-8", "replace")


def encode(text: str) -> str:
    """``text`` as xtext: UTF-8 octets outside ``!``..``~``, and ``+`` and ``=``, as ``+XX``."""
    out = []
    for octet in text.encode("utf-8"):
        if 0x21 <= octet <= 0x7E and octet not in (0x2B, 0x3D):
            out.append(chr(octet))
        else:
            out.append(f"+{octet:02X}")
    return "".join(out)
