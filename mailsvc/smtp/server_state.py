"""The server machine's settings, states and command sets (see ``mailsvc.smtp.server``)."""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

from mailsvc.smtp.replies import Reply

MAX_COMMAND_LINE = 512  # rfc5321 4.5.3.1.4, CRLF included
AUTH_PARAMETER_ROOM = 500  # rfc4954 3: AUTH= makes MAIL lines 500 octets longer
MAX_AUTH_LINE = 12288  # rfc4954 4: room for any deployed SASL response
SMTPUTF8_PARAMETER_ROOM = 10  # rfc6531 3.1 (5): MAIL lines 10 octets longer


@dataclass(frozen=True)
class ServerSettings:
    """What the machine needs to know about the server it speaks for."""

    hostname: str
    max_message_size: int = 0  # rfc1870 SIZE; 0 = no limit
    max_recipients: int = 100  # rfc5321 4.5.3.1.8 requires at least 100
    # Extra EHLO keywords offered by the glue.
    extensions: tuple[str, ...] = ()
    # rfc3207: offer STARTTLS (before TLS only). Off: STARTTLS gets 454 4.7.0.
    starttls: bool = False
    # rfc4954: SASL mechanisms offered once TLS is active; none = no AUTH (502).
    auth_mechanisms: tuple[str, ...] = ()
    # Offer them before TLS too (otherwise AUTH before TLS gets 538 5.7.11).
    auth_without_tls: bool = False
    # rfc6409 4.3 / rfc4954 6: mail commands before AUTH get 530 5.7.0.
    auth_required: bool = False
    # 5xx replies to bad or out-of-sequence commands before 421 4.7.0 and close; 0 = no limit.
    max_errors: int = 0
    # rfc1985: offer ETRN (an ``Etrn`` decision); off: ETRN gets 502.
    etrn: bool = False
    # rfc2645: an On-Demand Mail Relay listener: EHLO offers ATRN, ATRN is an
    # ``Atrn`` decision (530 before AUTH), and every command but EHLO, HELO,
    # AUTH, ATRN, STARTTLS, NOOP, RSET, HELP and QUIT gets 502 (rfc2645 5.4).
    odmr: bool = False
    # Offer the AUTH mechanisms that never send the password (CRAM-MD5,
    # SCRAM-SHA-256) before TLS too; PLAIN and LOGIN still wait for TLS.
    # rfc2645 5.1.2: ODMR clients (fetchmail) use CRAM-MD5 without TLS.
    challenge_auth_without_tls: bool = False
    # rfc3030: offer CHUNKING (BDAT); off: BDAT gets 502.
    chunking: bool = False
    # rfc6531: offer SMTPUTF8: UTF-8 addresses in MAIL/RCPT with MAIL's
    # SMTPUTF8 parameter, VRFY/EXPN ... SMTPUTF8. Off: non-ASCII gets X.6.7.
    smtputf8: bool = False

    # Replies that depend only on the settings, made once (not fields).
    @functools.cached_property
    def greeting(self) -> Reply:
        """rfc5321 4.3.1: the 220 greeting."""
        return Reply.of(220, "", f"{self.hostname} ESMTP mailsvc")

    @functools.cached_property
    def goodbye(self) -> Reply:
        """rfc5321 4.1.1.10: the 221 to QUIT."""
        return Reply.of(221, "2.0.0", f"{self.hostname} closing connection")

    @functools.cached_property
    def ehlo_keywords(self) -> dict:
        """The wire form of the EHLO reply's keyword lines, by whether TLS is
        active; filled by the machine (``CommandParser._hello_bytes``)."""
        return {}


class State(enum.Enum):
    """Where the session stands (rfc5321 4.1.4 command order)."""

    NEW = "new"  # before the greeting
    GREETED = "greeted"  # 220 sent, no HELO/EHLO yet
    READY = "ready"  # HELO/EHLO done, no transaction
    MAIL = "mail"  # MAIL accepted; RCPTs may follow
    DATA = "data"  # reading message data
    BDAT = "bdat"  # a BDAT transaction (rfc3030): between chunks, or reading one
    AUTH = "auth"  # inside an AUTH exchange: lines are SASL responses
    TLS_PENDING = "tls-pending"  # 220 to STARTTLS queued; waiting for tls_started()
    TURNED = "turned"  # 250 to TURN/ATRN sent: roles reversed, nothing more is parsed (h11's SWITCHED_PROTOCOL)
    REFUSED = "refused"  # 554 greeting: only QUIT is served (rfc5321 3.1)
    CLOSED = "closed"


# Verbs that start a transaction: MAIL (rfc5321) and rfc821 3.4's SEND, SOML,
# SAML. This server has no terminals, so all four deliver to mailboxes.
MAIL_VERBS = frozenset({"MAIL", "SEND", "SOML", "SAML"})
# Verbs known but not offered (rfc5321 4.2.4: 502 "not implemented").
# BDAT, ETRN and ATRN are served when the settings offer them (``chunking``,
# ``etrn``, ``odmr``).
NOT_IMPLEMENTED = frozenset({"BDAT", "ETRN", "ATRN"})
# rfc2645 5.1, 5.2, 5.4: what an ODMR listener serves; the rest gets 502.
ODMR_VERBS = frozenset({"EHLO", "HELO", "AUTH", "ATRN", "QUIT", "STARTTLS", "NOOP", "RSET", "HELP"})
# rfc4954 6: "530 5.7.0 Authentication required" for any command but AUTH,
# EHLO, HELO, NOOP, RSET and QUIT (and STARTTLS and HELP, which lead to it).
NEEDS_AUTH = frozenset({"MAIL", "SEND", "SOML", "SAML", "RCPT", "DATA", "VRFY", "EXPN", "TURN"})
# Replies that count as a client error for the max_errors limit.
ERROR_CODES = frozenset({500, 501, 502, 503, 504, 530, 538, 555})
TOO_MANY_ERRORS = Reply.of(421, "4.7.0", "Too many errors; closing connection")
AUTH_REQUIRED = Reply.of(530, "5.7.0", "Authentication required")
