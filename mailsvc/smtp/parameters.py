"""MAIL and RCPT parameters (ESMTP, rfc5321 4.1.1.11): checked and normalised.

Pure functions used by the server machine: each returns ``None`` when the
parameters are acceptable (upper-casing the values it normalises in place)
or the ``Reply`` that refuses the command.
"""

from __future__ import annotations

from mailsvc.smtp import xtext
from mailsvc.smtp.address import AddressError, check_mailbox
from mailsvc.smtp.replies import SYNTAX, Reply

BODY_VALUES = frozenset({"7BIT", "8BITMIME"})  # rfc6152 2
RET_VALUES = frozenset({"FULL", "HDRS"})  # rfc3461 4.3
NOTIFY_VALUES = frozenset({"SUCCESS", "FAILURE", "DELAY"})  # rfc3461 4.1
MAX_ENVID = 100  # rfc3461 4.4
MAX_ORCPT = 500  # rfc3461 4.2


def _syntax(text: str, code: int = 501) -> Reply:
    return Reply.of(code, SYNTAX, text)


def check_mail_parameters(
    parameters: dict, *, extended: bool, max_size: int, auth: bool, smtputf8: bool = False
) -> Reply | None:
    """SIZE (rfc1870), BODY (rfc6152), RET/ENVID (rfc3461) and, when offered,
    AUTH= (``auth``, rfc4954 5) and SMTPUTF8 (``smtputf8``, rfc6531 3.4);
    anything else is 555."""
    if parameters and not extended:
        # rfc5321 4.1.1.11 / rfc1869 4.4: parameters need EHLO.
        return _syntax("MAIL parameters need EHLO", 555)
    for key, value in parameters.items():
        if key == "SIZE":
            # rfc1870 6: SIZE=<octets>; too big is 552 5.3.4.
            if value is None or not value.isdigit() or len(value) > 20:
                return _syntax("SIZE needs a number of octets")
            if max_size and int(value) > max_size:
                return Reply.of(552, "5.3.4", f"Message size exceeds the limit of {max_size} octets")
        elif key == "RET":
            if value is None or value.upper() not in RET_VALUES:
                return _syntax("RET must be FULL or HDRS")
            parameters[key] = value.upper()
        elif key == "ENVID":
            if value is None or len(value) > MAX_ENVID or not xtext.is_xtext(value):
                return _syntax(f"ENVID must be xtext of at most {MAX_ENVID} characters")
        elif key == "BODY":
            if value is None or value.upper() not in BODY_VALUES:
                return _syntax("BODY must be 7BIT or 8BITMIME")
            parameters[key] = value.upper()
        elif key == "SMTPUTF8" and smtputf8:
            if value is not None:
                return _syntax("SMTPUTF8 takes no value")  # rfc6531 3.4
        elif key == "AUTH" and auth:
            # rfc4954 5: AUTH=<> or an xtext-encoded mailbox.
            if value != "<>" and not _auth_mailbox(value):
                return _syntax("AUTH must be <> or an xtext-encoded mailbox")
        else:
            return _syntax(f"Unsupported MAIL parameter: {key}", 555)
    return None


def _auth_mailbox(value: str | None) -> bool:
    if value is None or not xtext.is_xtext(value):
        return False
    try:
        check_mailbox(xtext.decode(value))
    except (AddressError, ValueError):
        return False
    return True


def check_rcpt_parameters(parameters: dict, *, extended: bool) -> Reply | None:
    """rfc3461 4.1 NOTIFY and 4.2 ORCPT; anything else is 555."""
    if not extended:
        return _syntax("RCPT parameters need EHLO", 555)
    for key, value in parameters.items():
        if key == "NOTIFY":
            words = (value or "").upper().split(",")
            if words != ["NEVER"] and not (set(words) <= NOTIFY_VALUES and len(set(words)) == len(words)):
                return _syntax("NOTIFY must be NEVER, or a list of SUCCESS, FAILURE, DELAY")
            parameters[key] = ",".join(words)
        elif key == "ORCPT":
            kind, semi, address = (value or "").partition(";")
            if kind.lower() == "utf-8":
                # rfc6533 3: utf-8-addr-xtext, or -unitext once SMTPUTF8 is in use.
                if len(value.encode()) > MAX_ORCPT or not xtext.is_utf8_address(address):
                    return _syntax("ORCPT=utf-8; must be followed by an address, non-ASCII as \\x{HEX}")
            elif not semi or not kind or len(value) > MAX_ORCPT or not xtext.is_xtext(address):
                return _syntax("ORCPT must be addr-type;xtext, as rfc822;user@domain")
        else:
            return _syntax(f"Unsupported RCPT parameter: {key}", 555)
    return None


def original_recipient(orcpt: str) -> str:
    """The address an ORCPT value (already checked) names: rfc3461 4.2's
    xtext, or rfc6533 3's utf-8 forms for ``utf-8;``."""
    kind, _, address = orcpt.partition(";")
    if kind.lower() == "utf-8":
        return xtext.decode_utf8_address(address)
    return xtext.decode(address)
