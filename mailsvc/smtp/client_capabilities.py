"""What the server offers, read from its EHLO reply: the service extensions
(rfc5321 4.1.1.1), with the SIZE limit (rfc1870) and AUTH mechanisms
(rfc4954) among them. Pure functions over the client machine's
``extensions`` (keyword, upper case → its parameters)."""

from __future__ import annotations

from mailsvc.smtp.client_events import ESMTP_KEYWORD
from mailsvc.smtp.replies import Reply


def extensions_from_ehlo(reply: Reply) -> dict[str, str]:
    """EHLO keywords and their parameters (rfc5321 4.1.1.1: ehlo-line), from
    every line but the first (the greeting). Lines that are not a keyword are
    skipped; the first use of a keyword wins."""
    found: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if ESMTP_KEYWORD.match(keyword):
            found.setdefault(keyword.upper(), params.strip())
    return found


def size_limit(extensions: dict[str, str]) -> int:
    """The server's SIZE limit in octets (rfc1870 4); 0 when it gives none."""
    value = extensions.get("SIZE", "")
    return int(value) if value.isdigit() else 0


def offers_auth(extensions: dict[str, str], mechanism: str) -> bool:
    """True when the server lists SASL ``mechanism`` (upper case) after its
    AUTH keyword (rfc4954 3)."""
    return mechanism in extensions.get("AUTH", "").upper().split()
