"""The envelope of a message: what SMTP says about it, apart from its bytes.

These small frozen values cross every boundary of mailsvc: the receiver builds
them, the spool writes them to a control file, the queue runner and the
delivery agents read them back. They hold no I/O and no Twisted.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


def _evolve(value, changes: dict):
    """``dataclasses.replace(value, **changes)``, in less time.

    The queue runner copies a message and a recipient for each delivery.
    ``replace`` walks the class's field list in Python; these classes keep
    every field, and only fields, in their instance ``__dict__`` (each one
    an ``__init__`` argument), so a merge of that dict with ``changes`` is
    the same list of arguments. ``__init__`` still runs: an unknown field
    is still a ``TypeError``.
    """
    return type(value)(**{**value.__dict__, **changes})


class Delivered(enum.Enum):
    """How a delivery agent succeeded, for the success report (rfc3461 5.2).

    An agent's ``None`` means ``DELIVERED``.
    """

    DELIVERED = "delivered"  # final delivery here: report "delivered" if asked
    RELAYED = "relayed"  # passed to a next hop that does not do DSN: report "relayed" if asked
    PASSED_ON = "passed-on"  # passed to a DSN-capable next hop with NOTIFY: it reports, not us


class RecipientState(enum.Enum):
    """Where one recipient of a queued message stands."""

    PENDING = "pending"  # not yet delivered; try at next_attempt
    DELIVERED = "delivered"  # done, successfully
    FAILED = "failed"  # failed for good (bounces come with the outbound issue)


@dataclass(frozen=True)
class Recipient:
    """One envelope recipient and its delivery state.

    ``address`` is where the message goes (after alias expansion: a final
    mailbox address such as ``alice@example.test``); ``original`` is what the
    client said in RCPT TO (rfc3461 ORCPT), kept for trace and bounces.
    ``mailbox`` names the local mailbox for local recipients (the user name),
    or is empty for recipients that are not local.
    """

    address: str
    original: str = ""
    mailbox: str = ""
    state: RecipientState = RecipientState.PENDING
    attempts: int = 0
    next_attempt: float = 0.0  # POSIX time of the next try
    last_error: str = ""  # the last error text, e.g. "451 4.3.0 disk full"
    # rfc3461 4.1 NOTIFY as the client gave it ("NEVER", "SUCCESS,DELAY"...);
    # "" when not given (then failures and delays are reported).
    notify: str = ""
    # A delay warning (rfc3464 Action: delayed) was sent for this recipient.
    warned: bool = False

    def evolve(self, **changes) -> "Recipient":
        """A copy with some fields changed (see ``_evolve``)."""
        return _evolve(self, changes)


@dataclass(frozen=True)
class Envelope:
    """Everything known about a message except its data.

    ``sender`` is the reverse-path without angle brackets; ``""`` is the null
    sender ``<>`` (rfc5321 4.5.5). ``parameters`` holds the MAIL parameters
    kept for the message (``BODY``, ``SIZE``, later ``RET``/``ENVID``), upper
    case keys. ``helo``, ``client_address`` and ``protocol`` describe where the
    message came from (for ``Received:`` and logs). ``received_at`` is the POSIX
    time the message was accepted.
    """

    sender: str
    recipients: tuple[Recipient, ...]
    parameters: tuple[tuple[str, str], ...] = ()
    helo: str = ""
    client_address: str = ""
    protocol: str = "ESMTP"
    received_at: float = 0.0
    # Header lines (each a complete "Name: value" without the line end) that
    # delivery puts before the data, in order: the Received: trace and any
    # header added by a policy at end of data.
    prepend_headers: tuple[str, ...] = field(default=())

    def parameter(self, name: str, default: str | None = None) -> str | None:
        """The value of MAIL parameter ``name`` (case-insensitive), or ``default``."""
        name = name.upper()
        for key, value in self.parameters:
            if key == name:
                return value
        return default

    def evolve(self, **changes) -> "Envelope":
        """A copy with some fields changed (see ``_evolve``)."""
        return _evolve(self, changes)


@dataclass(frozen=True)
class LocalMailbox:
    """A final local recipient found by a recipient directory.

    ``address`` is the address the copy is delivered to (it goes in
    ``Delivered-To:``), ``mailbox`` the store's name for the mailbox (a user
    name), ``full_name`` a human name for VRFY replies (may be empty).
    """

    address: str
    mailbox: str
    full_name: str = ""


@dataclass(frozen=True)
class QueuedMessage:
    """A committed message as the spool hands it to the queue runner.

    ``hop`` is the next-hop name the spool filed it under (``"local"`` for
    local delivery); ``(hop, id)`` names it in the spool. Its bytes are read
    with ``ISpool.open(message)``.
    """

    hop: str
    id: str
    envelope: Envelope

    def evolve(self, **changes) -> "QueuedMessage":
        """A copy with some fields changed (see ``_evolve``)."""
        return _evolve(self, changes)
