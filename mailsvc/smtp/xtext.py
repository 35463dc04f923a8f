"""xtext (rfc3461 4): how DSN parameters carry any octet in an ESMTP value.

``+XX`` (two upper-case hex digits) stands for one octet; every other
character must be printable ASCII other than ``+`` and ``=``.
"""

from __future__ import annotations

import re

_VALID = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")
_HEX = re.compile(r"\+([0-9A-F]{2})")
# rfc6533 3: utf-8-addr-xtext is QCHAR (printable ASCII but "+", "=" and
# "\") and EmbeddedUnicodeChar ("\x{HEX}"); utf-8-addr-unitext adds UTF-8
# characters. "+XX" is taken too, as xtext (rfc3461 4), for lenient senders.
_UTF8_ADDRESS = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e]|\\x\{[0-9A-Fa-f]{1,6}\}|\+[0-9A-F]{2}|[^\x00-\x7f])+\Z")
_EMBEDDED = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


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


def is_utf8_address(text: str) -> bool:
    """Whether ``text`` is rfc6533 3's utf-8-addr-xtext or -unitext (the
    value of ``ORCPT=utf-8;...``) naming Unicode code points only."""
    if not _UTF8_ADDRESS.match(text):
        return False
    try:
        decode_utf8_address(text)
    except ValueError:
        return False
    return True


def decode_utf8_address(text: str) -> str:
    """The address a utf-8-addr-xtext/-unitext stands for: ``+XX`` octets,
    then each ``\\x{HEX}`` as its code point (rfc6533 3).

    :raise ValueError: a ``\\x{HEX}`` that is not a Unicode scalar value.
    """
    return _EMBEDDED.sub(_code_point, decode(text) if "+" in text else text)


def _code_point(match: re.Match) -> str:
    value = int(match.group(1), 16)
    if value > 0x10FFFF or 0xD800 <= value <= 0xDFFF:
        raise ValueError(f"not a Unicode character: {match.group()}")
    return chr(value)
