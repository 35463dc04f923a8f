"""Which next hop a recipient goes to.

For now two hops: ``local`` (a mailbox here, found by the recipient
directory) and ``relay`` (anything else a trusted client may send; its agent
comes with the outbound work, until then such mail waits in the spool).
"""

from __future__ import annotations

from collections.abc import Iterable

from mailsvc.envelope import Recipient

LOCAL = "local"
RELAY = "relay"


def hop_for(recipient: Recipient) -> str:
    """The spool hop of ``recipient``: local when it has a mailbox here."""
    return LOCAL if recipient.mailbox else RELAY


def routes(recipients: Iterable[Recipient]) -> dict[str, tuple[Recipient, ...]]:
    """Group recipients by hop, keeping their order."""
    grouped: dict[str, list[Recipient]] = {}
    for recipient in recipients:
        grouped.setdefault(hop_for(recipient), []).append(recipient)
    return {hop: tuple(members) for hop, members in grouped.items()}
