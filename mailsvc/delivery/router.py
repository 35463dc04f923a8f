"""Which next hop a recipient goes to.

For now two hops: ``local`` (a mailbox here, found by the recipient
directory) and ``relay`` (anything else a trusted client may send; its agent
comes with the outbound work, until then such mail waits in the spool).
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet import defer

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


@defer.inlineCallbacks
def recipients_for(directory, address: str, original: str = ""):
    """The envelope recipients that mail to ``address`` becomes.

    Fires with a list of local ``Recipient`` (aliases expanded), or
    ``[Recipient(address)]`` for a domain that is not local (the caller
    decides whether it may relay), or ``None`` for an unknown local user.
    A bare ``postmaster`` is local (rfc5321 4.1.1.3).
    """
    original = original or address
    _, at, domain = address.rpartition("@")
    if not at:
        address, domain = "postmaster", ""
    domain = domain.lower().rstrip(".")
    if domain and not (yield defer.maybeDeferred(directory.isLocalDomain, domain)):
        return [Recipient(address=address, original=original)]
    mailboxes = yield defer.maybeDeferred(directory.resolve, address)
    if not mailboxes:
        return None
    return [Recipient(address=m.address, original=original, mailbox=m.mailbox) for m in mailboxes]
