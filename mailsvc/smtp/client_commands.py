"""The command lines the client machine writes that carry more than a verb:
EHLO/HELO, MAIL and RCPT with their ESMTP parameters (SIZE, BODY, SMTPUTF8,
DSN's RET/ENVID/NOTIFY/ORCPT, AUTH=), AUTH PLAIN and LOGIN, and ATRN.

Pure functions: each returns the CRLF-ended line as bytes (or, for MAIL's
parameters, the reply refusing the message); malformed input from the
caller raises ``ValueError``.
"""

from __future__ import annotations

import base64
import collections

from mailsvc.smtp.client_capabilities import size_limit
from mailsvc.smtp.client_events import Transaction
from mailsvc.smtp.replies import Reply

# The EHLO keyword a MAIL/RCPT parameter needs; any other parameter needs the
# keyword of its own name. rfc3461 4 (DSN), rfc4954 5 (AUTH=), rfc6531 3.4.
PARAMETER_EXTENSION = {
    "RET": "DSN",
    "ENVID": "DSN",
    "NOTIFY": "DSN",
    "ORCPT": "DSN",
    "AUTH": "AUTH",
    "SMTPUTF8": "SMTPUTF8",
}


def hello_command(verb: str, helo_name: str) -> bytes:
    """``EHLO name`` or ``HELO name`` (rfc5321 4.1.1.1)."""
    return f"{verb} {helo_name}\r\n".encode("ascii")


def mail_command(sender: str, params: dict) -> bytes:
    """``MAIL FROM:<sender>`` and its parameters (rfc5321 4.1.1.2)."""
    return _command(f"MAIL FROM:<{sender}>", params)


def rcpt_command(address: str, params: dict) -> bytes:
    """``RCPT TO:<address>`` and its parameters (rfc5321 4.1.1.3)."""
    return _command(f"RCPT TO:<{address}>", params)


def _command(head: str, params: dict) -> bytes:
    """A command line with its ESMTP parameters (rfc5321 4.1.2 Mail-parameters)."""
    if not params:
        return (head + "\r\n").encode("utf-8")
    parts = [head] + [key if value is None else f"{key}={value}" for key, value in params.items()]
    return (" ".join(parts) + "\r\n").encode("utf-8")


def offered_parameters(params: dict, extensions: dict[str, str]) -> dict:
    """Only the parameters of extensions the server offers (rfc5321 4.1.1.3:
    the client "MUST NOT transmit parameters other than those associated
    with a service extension offered by the server")."""
    if not params:
        return {}
    return {k: v for k, v in params.items() if PARAMETER_EXTENSION.get(k, k) in extensions}


def mail_parameters(tx: Transaction, extensions: dict[str, str]) -> tuple[dict, Reply | None]:
    """MAIL's parameters for this server, or the reply refusing the message."""
    params = offered_parameters(tx.mail_params, extensions)
    if tx.size is not None and "SIZE" in extensions:
        limit = size_limit(extensions)
        if limit and tx.size > limit:
            # rfc1870 6.2 (2): past the fixed maximum the message is undeliverable.
            text = f"Message size {tx.size} exceeds the server's limit of {limit} octets"
            return {}, Reply.of(552, "5.3.4", text)
        params["SIZE"] = str(tx.size)  # rfc1870 6
    if tx.body_8bit:
        if "8BITMIME" not in extensions:
            # rfc6152 3: no 8-bit content to a server without 8BITMIME;
            # the caller downgrades or bounces.
            return {}, Reply.of(554, "5.6.3", "The server does not offer 8BITMIME")
        params["BODY"] = "8BITMIME"  # rfc6152 3
    need = tx.smtputf8_need
    if need:
        if "SMTPUTF8" not in extensions:
            # rfc6531 3.2, 3.5: nothing internationalized to a server without SMTPUTF8.
            return {}, Reply.of(553, "5.6.7", f"The server does not offer SMTPUTF8, which the message needs: {need}")
        params["SMTPUTF8"] = None  # rfc6531 3.4
    # Asked for but not needed: sent only when offered (offered_parameters);
    # rfc6531 3.4, the server without it gets the message without it.
    return params, None


def auth_plain_command(authcid: str, password: str, authzid: str = "") -> bytes:
    """AUTH PLAIN with an initial response (rfc4954 4, rfc4616 2)."""
    fields = [authzid, authcid, password]
    if any("\0" in f for f in fields) or not authcid or not password:
        raise ValueError("AUTH PLAIN needs a user and a password without NUL")
    message = "\0".join(fields).encode("utf-8")
    response = base64.b64encode(message).decode("ascii") or "="
    return f"AUTH PLAIN {response}\r\n".encode("ascii")


def auth_login_answers(username: str, password: str) -> collections.deque[bytes]:
    """The lines answering AUTH LOGIN's two 334 challenges
    (draft-murchison-sasl-login): the user name, then the password."""
    if not username or not password or any(c in f for f in (username, password) for c in "\0\r\n"):
        raise ValueError("AUTH LOGIN needs a user and a password without NUL, CR or LF")
    return collections.deque(base64.b64encode(text.encode("utf-8")) + b"\r\n" for text in (username, password))


def atrn_command(domains=()) -> bytes:
    """``ATRN [domain,...]`` (rfc2645 5.2.1)."""
    names = [d.strip() for d in domains]
    if any(not d or not d.isascii() or any(c in d for c in ", \r\n") for d in names):
        raise ValueError(f"bad ATRN domain list: {domains!r}")
    return ("ATRN " + ",".join(names) if names else "ATRN").encode("ascii") + b"\r\n"
