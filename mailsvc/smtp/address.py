"""Syntax of MAIL and RCPT arguments: paths, mailboxes and ESMTP parameters.

rfc5321 4.1.2 gives the grammar; 4.5.3.1 the size limits. Source routes
(``<@a,@b:user@c>``) are accepted and their route dropped (rfc5321 4.1.2,
C). Parsing never raises anything but ``AddressError``.

With ``utf8=True`` the grammar is rfc6531 3.3's: local parts may hold
UTF-8 characters (``atext =/ UTF8-non-ascii``, ``qtextSMTP =/
UTF8-non-ascii``), domains may be U-labels (``sub-domain =/ U-label``,
checked by IDNA 2008 with UTS 46 mapping), and ESMTP values may be UTF-8
(``esmtp-value =/ UTF8-non-ascii``). Without it, any non-ASCII character is
refused with X.6.7 (rfc6531 3.5).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import idna

from mailsvc.smtp.replies import shown

# rfc5322 3.2.3 atext, as rfc5321 4.1.2 uses it for Atom.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_STRING = re.compile(rf"{_ATOM}(?:\.{_ATOM})*\Z")
# rfc5321 4.1.2 QcontentSMTP inside DQUOTEs.
_QUOTED_STRING = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"\Z')
# rfc6532 3.1 UTF8-non-ascii, less what is never a character of an address:
# C1 controls, and U+FFFD, which stands for octets that were not UTF-8.
_NON_ASCII = r"[^\x00-\x9f\ufffd\ud800-\udfff]"
_UTF8_ATOM = rf"(?:[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~-]|{_NON_ASCII})+"
_UTF8_DOT_STRING = re.compile(rf"{_UTF8_ATOM}(?:\.{_UTF8_ATOM})*\Z")
_UTF8_QUOTED_STRING = re.compile(rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|{_NON_ASCII}|\\[\x20-\x7e])*"\Z')
_SUB_DOMAIN = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"{_SUB_DOMAIN}(?:\.{_SUB_DOMAIN})*\Z")
_ADDRESS_LITERAL = re.compile(r"\[[\x21-\x5a\x5e-\x7e]+\]\Z")
_ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_ESMTP_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+\Z")
_UTF8_ESMTP_VALUE = re.compile(rf"(?:[\x21-\x3c\x3e-\x7e]|{_NON_ASCII})+\Z")

MAX_LOCAL_PART = 64  # rfc5321 4.5.3.1.1
MAX_DOMAIN = 255  # rfc5321 4.5.3.1.2
MAX_PATH = 256  # rfc5321 4.5.3.1.3


class AddressError(ValueError):
    """A path or parameter is malformed. ``str()`` says what is wrong;
    ``status`` is the rfc3463 code to answer with."""

    def __init__(self, text: str, status: str = "") -> None:
        super().__init__(text)
        self.status = status


@dataclass(frozen=True)
class PathArgument:
    """The parsed argument of MAIL FROM: or RCPT TO:.

    ``address`` is the mailbox without angle brackets, ``""`` for the null
    reverse-path ``<>``. ``parameters`` maps upper-cased keywords to their
    value (``None`` for a keyword without ``=value``).
    """

    address: str
    parameters: dict[str, str | None]


def is_valid_domain(domain: str, *, utf8: bool = False) -> bool:
    """Whether ``domain`` is an rfc5321 Domain or address literal; with
    ``utf8``, U-labels are allowed too (rfc6531 3.3)."""
    if domain.isascii():
        if len(domain) > MAX_DOMAIN:
            return False
        return bool(_DOMAIN.match(domain) or _ADDRESS_LITERAL.match(domain))
    if not utf8:
        return False
    try:
        a_labels = ascii_domain(domain)
    except AddressError:
        return False
    return len(a_labels) <= MAX_DOMAIN and bool(_DOMAIN.match(a_labels))


def ascii_domain(domain: str) -> str:
    """``domain`` in lower case with its U-labels as A-labels (rfc5890 2.3.2.1),
    the form it is compared and looked up in; a trailing dot dropped.

    :raise AddressError: (X.1.2) a non-ASCII name that is not a valid IDN.
    """
    name = domain.rstrip(".")
    if name.isascii():
        return name.lower()
    try:
        # IDNA 2008 (rfc5891) with UTS 46 mapping, so that "BÜCHER" is "bücher".
        return idna.encode(name, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError, ValueError):
        raise AddressError(f"bad internationalized domain: {shown(domain)}", "5.1.2") from None


def domain_key(domain: str) -> str:
    """``domain`` as domains are compared (``ascii_domain``), or ``""`` for
    a non-ASCII name that is no IDN (it matches no configured domain)."""
    if domain.isascii():
        return domain.lower().removesuffix(".")
    try:
        return ascii_domain(domain)
    except AddressError:
        return ""


def check_mailbox(mailbox: str, *, utf8: bool = False) -> None:
    """Raise ``AddressError`` unless ``mailbox`` is ``Local-part@Domain``
    (rfc5321 4.1.2; with ``utf8``, rfc6531 3.3's extended form)."""
    if not utf8 and not mailbox.isascii():
        # rfc6531 3.5: X.6.7, non-ASCII addresses not permitted.
        raise AddressError("non-ASCII address requires SMTPUTF8", "5.6.7")
    local, at, domain = mailbox.rpartition("@")
    if not at:
        raise AddressError(f"address has no domain: {shown(mailbox)}")
    if not local:
        raise AddressError(f"address has an empty local part: {shown(mailbox)}")
    if len(local.encode("utf-8", "surrogatepass")) > MAX_LOCAL_PART:
        raise AddressError(f"local part longer than {MAX_LOCAL_PART} octets")
    if local.isascii():
        if not (_DOT_STRING.match(local) or _QUOTED_STRING.match(local)):
            raise AddressError(f"bad local part: {local}")
    elif not (_UTF8_DOT_STRING.match(local) or _UTF8_QUOTED_STRING.match(local)):
        raise AddressError(f"bad local part: {shown(local)}")
    if not is_valid_domain(domain, utf8=utf8):
        raise AddressError(f"bad domain: {shown(domain)}")


def _split_path(text: str) -> tuple[str, str]:
    """Split ``<path> params`` into the bracketed path and the rest."""
    if not text.startswith("<"):
        raise AddressError("address must be in angle brackets, as <user@domain>")
    if '"' not in text:
        # No quoted local part: the first '>' closes the path.
        index = text.find(">")
        if index < 0:
            raise AddressError("missing '>' after the address")
        rest = text[index + 1 :]
        if rest and not rest.startswith(" "):
            raise AddressError("expected a space after the address")
        return text[1:index], rest.strip(" ")
    in_quotes = escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\" and in_quotes:
            escaped = True
        elif char == '"':
            in_quotes = not in_quotes
        elif char == ">" and not in_quotes:
            rest = text[index + 1 :]
            if rest and not rest.startswith(" "):
                raise AddressError("expected a space after the address")
            return text[1:index], rest.strip(" ")
    raise AddressError("missing '>' after the address")


def parse_parameters(text: str, *, utf8: bool = False) -> dict[str, str | None]:
    """Parse ``KEY=value KEY2`` (rfc5321 4.1.2 Mail-parameters; with
    ``utf8``, values may hold UTF-8, rfc6531 3.3)."""
    value_pattern = _UTF8_ESMTP_VALUE if utf8 else _ESMTP_VALUE
    parameters: dict[str, str | None] = {}
    for item in text.split(" "):
        if not item:
            continue
        keyword, eq, value = item.partition("=")
        if not _ESMTP_KEYWORD.match(keyword):
            raise AddressError(f"bad parameter name: {shown(keyword)}", "5.5.4")
        if eq and not value_pattern.match(value):
            raise AddressError(f"bad value for parameter {keyword.upper()}", "5.5.4")
        key = keyword.upper()
        if key in parameters:
            raise AddressError(f"parameter {key} given twice", "5.5.4")
        parameters[key] = value if eq else None
    return parameters


def parse_path_argument(
    argument: str, keyword: str, *, null_allowed: bool, postmaster_allowed: bool, utf8: bool = False
) -> PathArgument:
    """Parse ``FROM:<path> params`` (``keyword="FROM"``) or ``TO:<path> params``.

    :param null_allowed: ``<>`` is accepted (reverse-path, rfc5321 4.5.5).
    :param postmaster_allowed: bare ``<Postmaster>`` is accepted (rfc5321 4.1.1.3).
    :param utf8: rfc6531 3.3's grammar (the server offers SMTPUTF8); whether
        this transaction may use it is the caller's question (the MAIL parameter).
    :raise AddressError: with the reason.
    """
    head, colon, rest = argument.partition(":")
    if not colon or head.strip().upper() != keyword:
        raise AddressError(f"expected {keyword}:<address>", "5.5.4")
    rest = rest.lstrip(" ")  # tolerate "MAIL FROM: <a@b>", as most servers do
    path, params_text = _split_path(rest)
    if len(path.encode("utf-8", "surrogatepass")) + 2 > MAX_PATH:
        raise AddressError(f"path longer than {MAX_PATH} octets")
    if ":" in path and path.startswith("@"):
        # rfc5321 4.1.2 A-d-l, and C: accept a source route, ignore it.
        route, _, path = path.partition(":")
        for hop in route.split(","):
            if not (hop.startswith("@") and is_valid_domain(hop[1:], utf8=utf8)):
                raise AddressError(f"bad source route: {shown(route)}")
    if path == "":
        if not null_allowed:
            raise AddressError("the null address <> is not a recipient")
        address = ""
    elif postmaster_allowed and path.lower() == "postmaster":
        address = path
    else:
        check_mailbox(path, utf8=utf8)
        address = path
    return PathArgument(address, parse_parameters(params_text, utf8=utf8))
