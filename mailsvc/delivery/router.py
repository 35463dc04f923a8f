"""Which next hop a recipient goes to.

Three kinds of hop: ``local`` (a mailbox here, found by the recipient
directory), a fixed hop configured for a domain (a UUCP site, a site whose
mail is held for TURN/ATRN), and ``relay`` (everything else, for the relay
agent). A hop is the name of a spool directory and of the agent that serves it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from twisted.internet import defer
from twisted.python.failure import Failure

from mailsvc.envelope import Recipient
from mailsvc.smtp.address import domain_key

LOCAL = "local"
RELAY = "relay"


class Router:
    """Recipients → spool hops. ``domain_hops`` maps a recipient domain to a
    fixed hop (e.g. ``{"site.example": "uucp.site"}``); we are that domain's
    MX, so mail for it is accepted from anyone (it is not relaying)."""

    def __init__(self, domain_hops: Mapping[str, str] | None = None) -> None:
        self.domain_hops = {d.lower().rstrip("."): hop for d, hop in (domain_hops or {}).items()}

    @classmethod
    def from_config(cls, cfg) -> "Router":
        """The router ``cfg`` describes: each ``[[uucp.site]]`` domain to its
        site's hop (``uucp.<name>``), each ``[[hold.site]]`` domain to its
        site's (``hold.<name>``: kept until the site calls in)."""
        hops = {domain: site.hop for site in cfg.uucp_sites for domain in site.domains}
        hops.update({domain: site.hop for site in getattr(cfg, "hold_sites", ()) for domain in site.domains})
        return cls(hops)

    def hop_for(self, recipient: Recipient) -> str:
        """The spool hop of ``recipient``."""
        if recipient.mailbox:
            return LOCAL
        # Configured domains are A-labels (rfc6531 3.2); a bad IDN matches none.
        return self.domain_hops.get(domain_key(recipient.address.rpartition("@")[2]), RELAY)

    def routes(self, recipients: Iterable[Recipient]) -> dict[str, tuple[Recipient, ...]]:
        """Group recipients by hop, keeping their order."""
        if type(recipients) is tuple and len(recipients) == 1:  # the common case: nothing to group
            return {self.hop_for(recipients[0]): recipients}
        grouped: dict[str, list[Recipient]] = {}
        for recipient in recipients:
            grouped.setdefault(self.hop_for(recipient), []).append(recipient)
        return {hop: tuple(members) for hop, members in grouped.items()}


DEFAULT_ROUTER = Router()  # local or relay, nothing configured


def hop_for(recipient: Recipient) -> str:
    """The hop of ``recipient`` with no domain configured: local or relay."""
    return DEFAULT_ROUTER.hop_for(recipient)


def routes(recipients: Iterable[Recipient]) -> dict[str, tuple[Recipient, ...]]:
    """Group recipients by hop with no domain configured."""
    return DEFAULT_ROUTER.routes(recipients)


def recipients_for(directory, address: str, original: str = "") -> defer.Deferred:
    """The envelope recipients that mail to ``address`` becomes.

    Fires with a list of local ``Recipient`` (aliases expanded), or
    ``[Recipient(address)]`` for a domain that is not local (the caller
    decides whether it may relay), or ``None`` for an unknown local user.
    A bare ``postmaster`` is local (rfc5321 4.1.1.3).
    """
    try:
        found = find_recipients(directory, address, original)
    except BaseException:
        return defer.fail()
    return found if isinstance(found, defer.Deferred) else defer.succeed(found)


def find_recipients(directory, address: str, original: str = ""):
    """``recipients_for`` without a Deferred while the directory answers
    with plain values: the answer itself, or a Deferred of it once a
    directory call answers with a Deferred (or a ``Failure``). A directory
    call that raises raises here."""
    original = original or address
    _, at, domain = address.rpartition("@")
    if not at:
        address, domain = "postmaster", ""
    domain = domain.lower().rstrip(".")
    if domain:
        is_local = directory.isLocalDomain(domain)
        if _later(is_local):
            return _deferred(is_local).addCallback(_in_domain, directory, address, original)
        if not is_local:
            return [Recipient(address=address, original=original)]
    return _resolve(directory, address, original)


def _in_domain(is_local, directory, address: str, original: str):
    if not is_local:
        return [Recipient(address=address, original=original)]
    return _resolve(directory, address, original)


def _resolve(directory, address: str, original: str):
    mailboxes = directory.resolve(address)
    if _later(mailboxes):
        return _deferred(mailboxes).addCallback(_recipients, original)
    return _recipients(mailboxes, original)


def _recipients(mailboxes, original: str):
    if not mailboxes:
        return None
    return [_local_recipient(m.address, original, m.mailbox) for m in mailboxes]


# Local recipients made by _recipients, kept: a Recipient is frozen, so one
# serves every message to the same address, and making one (a frozen
# dataclass of nine fields) costs more than the rest of a RCPT lookup.
# Bounded: ``original`` is what the client says.
_made: dict[tuple[str, str, str], Recipient] = {}
_MAX_MADE = 4096


def _local_recipient(address: str, original: str, mailbox: str) -> Recipient:
    key = (address, original, mailbox)
    recipient = _made.get(key)
    if recipient is None:
        if len(_made) >= _MAX_MADE:
            _made.clear()
        recipient = _made[key] = Recipient(address=address, original=original, mailbox=mailbox)
    return recipient


_LATER = (defer.Deferred, Failure)  # answers that maybeDeferred does not wrap in succeed()
# Plain answers of a directory (ConfigDirectory's): no isinstance against
# _LATER for them, which costs a call (Deferred is an abc.ABCMeta class).
_PLAIN = frozenset({bool, tuple, list, type(None)})


def _later(answer) -> bool:
    """Whether a directory's ``answer`` comes later (a Deferred) or is a Failure."""
    return type(answer) not in _PLAIN and isinstance(answer, _LATER)


def _deferred(answer) -> defer.Deferred:
    return answer if isinstance(answer, defer.Deferred) else defer.fail(answer)
