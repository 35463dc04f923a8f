"""The client machine's settings, states, and what each reply due answers
(see ``mailsvc.smtp.client``), with the timeout that applies while it is due."""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True)
class ClientSettings:
    """What the machine needs to know about the client it speaks for."""

    helo_name: str  # rfc5321 4.1.1.1: our domain or address literal
    pipelining: bool = True  # use PIPELINING when the server offers it
    chunking: bool = True  # use CHUNKING (BDAT, rfc3030) when the server offers it
    tls: bool = False  # the transport is TLS from the start (rfc8314 implicit TLS)

    def __post_init__(self) -> None:
        name = self.helo_name
        if not name or " " in name or not (name.isascii() and name.isprintable()):
            raise ValueError(f"bad HELO name: {name!r}")


class State(enum.Enum):
    """Where the session stands; see ``ClientConnection``."""

    GREETING = "greeting"  # waiting for 220
    HELLO = "hello"  # EHLO or HELO sent
    READY = "ready"  # idle: send_message, start_tls or quit
    STARTTLS = "starttls"  # STARTTLS sent
    TLS_HANDSHAKE = "tls-handshake"  # 220 to STARTTLS; waiting for tls_started()
    TRANSACTION = "transaction"  # MAIL, RCPT, DATA (or RSET) replies due
    DATA = "data"  # 354 came (or, with BDAT, a recipient was accepted): send_data() / end_data()
    DATA_END = "data-end"  # end of data sent; the final reply is due
    QUIT = "quit"  # QUIT sent
    AUTH = "auth"  # AUTH sent; 235 or a refusal is due
    TURN = "turn"  # TURN or ATRN sent
    TURNED = "turned"  # 250 to TURN/ATRN: roles reversed, the machine is done
    REFUSED = "refused"  # greeting or HELO refused: only quit()
    CLOSED = "closed"


class ReplyDue(enum.Enum):
    """What a reply due answers."""

    GREETING = "greeting"
    EHLO = "EHLO"
    HELO = "HELO"
    STARTTLS = "STARTTLS"
    RSET = "RSET"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    DOT = "dot"  # the lone "." after 354 with no recipient (rfc2920 3.1)
    END = "end"  # end of data (or BDAT ... LAST)
    BDAT = "BDAT"  # a BDAT chunk that is not the last (rfc3030 2)
    QUIT = "QUIT"
    AUTH = "AUTH"
    TURN = "TURN"  # TURN or ATRN

    # These key the tables of the machine, looked up for every reply: the
    # members are singletons compared by identity, so the identity hash (in C)
    # serves, not Enum's own (a Python call).
    __hash__ = object.__hash__


# rfc5321 4.5.3.2: which timeout applies while each reply is due. Commands
# that 4.5.3.2 does not name get the 5-minute per-command one ("mail").
TIMEOUT_PHASES = {
    ReplyDue.GREETING: "greeting",
    ReplyDue.RCPT: "rcpt",
    ReplyDue.DATA: "data-init",
    ReplyDue.DOT: "data-end",
    ReplyDue.END: "data-end",
    ReplyDue.BDAT: "data-block",
    # rfc2645 5.2.1: the ATRN timeout "MUST be at least 10 minutes" (the
    # provider reads its queue first): the 10-minute phase.
    ReplyDue.TURN: "data-end",
}
