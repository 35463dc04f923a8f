"""Internationalized delivery reports (rfc6533): when a report is one, and
how it writes its addresses.

rfc6531 3.2: "If an SMTPUTF8-aware SMTP server advertises the DSN extension,
it MUST implement RFC 6533." A report is *global* when the message was
received with SMTPUTF8, or when an address it names (the envelope sender,
a reported recipient or its ORCPT) is not ASCII: an ASCII report could not
carry those addresses. A global report (built by ``mailsvc.delivery.dsn``)
is a multipart/report of ``message/global-delivery-status`` (rfc6533 6.4:
its fields may hold UTF-8), with the original returned as
``message/global`` (rfc6532 3.7) or ``message/global-headers`` (rfc6533
6.3), and is queued as SMTPUTF8 mail (``mailsvc.delivery.bounce``).

Addresses in it are typed ``utf-8`` (rfc6533 3), in the utf-8-addr-unitext
form: the address itself, but for the characters written as
EmbeddedUnicodeChar ``\\x{HEX}``. rfc6533 3's ABNF::

    utf-8-type-addr     = "utf-8;" utf-8-enc-addr
    utf-8-addr-unitext  = 1*(QUCHAR / EmbeddedUnicodeChar)
    QCHAR               = %x21-2a / %x2c-3c / %x3e-5b / %x5d-7e
                        ; ASCII printable characters except CTLs, SP, '\\', '+', '='
    QUCHAR              = QCHAR / UTF8-2 / UTF8-3 / UTF8-4
    EmbeddedUnicodeChar = %x5C.78 "{" HEXPOINT "}"

HEXPOINT is upper-case hex without leading zeros, two digits at least
(``\\x{2B}``, ``\\x{E9}``, ``\\x{2028}``), never a surrogate. Only the
standard library is used.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

from mailsvc.envelope import Envelope

STATUS_TYPE = b"message/global-delivery-status"  # rfc6533 6.4
# rfc6522 3: the report-type parameter is the subtype of the second part.
REPORT_TYPE = "global-delivery-status"
FULL_TYPE = b"message/global"  # rfc6532 3.7, in place of message/rfc822
HEADERS_TYPE = b"message/global-headers"  # rfc6533 6.3, in place of text/rfc822-headers

# Non-ASCII characters that QUCHAR allows raw but that are written as
# \x{HEX} all the same, so that the field reads back as written: controls
# (C1), white space and line or paragraph separators (a field value is
# unfolded and split at white space), and format characters, which are
# invisible or reorder what is shown (bidi overrides); but for ZWNJ and ZWJ,
# which some scripts need.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})
_KEPT_FORMAT = frozenset({"\u200c", "\u200d"})


def is_global(envelope: Envelope, outcomes: Iterable) -> bool:
    """Whether the report on ``outcomes`` (``RecipientOutcome``) of
    ``envelope`` must be a global one (rfc6533; module docstring)."""
    if envelope.parameter("SMTPUTF8") is not None or not envelope.sender.isascii():
        return True
    return any(not o.recipient.address.isascii() or not o.recipient.original.isascii() for o in outcomes)


def typed_address(address: str) -> str:
    """An Original-Recipient or Final-Recipient value for a global report.

    ``rfc822; <address>`` for printable ASCII without ``\\`` (rfc3464 2.3.1:
    still allowed in a global report), else ``utf-8; <unitext>`` (rfc6533 3),
    where no control character or ``\\`` is ever left raw.
    """
    if address and all(0x21 <= ord(c) <= 0x7E and c != "\\" for c in address):
        return f"rfc822; {address}"
    return f"utf-8; {unitext(address)}"


def unitext(address: str) -> str:
    """``address`` as rfc6533 3's utf-8-addr-unitext.

    ASCII but QCHAR (controls, space, ``\\``, ``+``, ``=``) is written as
    ``\\x{HEX}``, as are the non-ASCII characters named above; other
    characters stay as they are. A lone surrogate (an octet that was not
    UTF-8) has no code point to name: it becomes U+FFFD.

    rfc6533 3's HEXPOINT lists the two-digit ASCII forms 01-09, 10-19, 20,
    2B, 3D, 5C and 7F ("all xtext-specials"); the other controls (00, 0A-0F,
    1A-1F) are written the same way, two digits, rather than dropped.
    """
    return "".join(_unichar(c) for c in address)


def _unichar(c: str) -> str:
    point = ord(c)
    if point < 0x80:
        if 0x21 <= point <= 0x7E and c not in "\\+=":
            return c  # QCHAR
        return f"\\x{{{point:02X}}}"
    if 0xD800 <= point <= 0xDFFF:
        return "\ufffd"  # HEXPOINT excludes surrogates; UTF-8 cannot carry one
    if unicodedata.category(c) in _ESCAPED_CATEGORIES and c not in _KEPT_FORMAT:
        return f"\\x{{{point:02X}}}"
    return c


def pieces(word: str, limit: int) -> list[str]:
    """``word`` (a field value without spaces) cut into pieces of at most
    ``limit`` octets of UTF-8, each of whole characters and whole
    ``\\x{HEX}``, for folding (a line is at most 998 octets: rfc6532 3.4)."""
    cut, piece, size = [], [], 0
    for token in _TOKEN.findall(word):
        octets = len(token.encode("utf-8", "replace"))
        if piece and size + octets > limit:
            cut.append("".join(piece))
            piece, size = [], 0
        piece.append(token)
        size += octets
    return cut + ["".join(piece)]


_TOKEN = re.compile(r"\\x\{[0-9A-F]+\}|.", re.S)
