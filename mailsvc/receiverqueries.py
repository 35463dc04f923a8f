"""The receiver's answers to VRFY, EXPN (rfc5321 3.5) and TURN.

``QueryAnswers`` is mixed into ``mailsvc.receiver.ReceivingSession``, whose
``context`` (settings, directory) it reads; it keeps no state. rfc6531
3.7.4.2: a mailbox that needs UTF-8 is shown only to ``VRFY ... SMTPUTF8``
and ``EXPN ... SMTPUTF8``.
"""

from __future__ import annotations

from twisted.internet import defer

from mailsvc.envelope import LocalMailbox
from mailsvc.smtp import events as ev
from mailsvc.smtp.address import AddressError, check_mailbox
from mailsvc.smtp.replies import Reply


class QueryAnswers:
    """VRFY, EXPN and TURN for a ``ReceivingSession`` (which owns ``context``)."""

    @defer.inlineCallbacks
    def on_verify(self, event: ev.Verify):
        """VRFY (rfc5321 3.5.1): 250 with the mailbox, 550 unknown, 553 bad syntax,
        or 252 when config says never to tell."""
        mode = self.context.settings.vrfy
        if mode == "off":
            return Reply.of(502, "5.5.1", "VRFY disabled")
        if mode == "always-252":
            # rfc5321 3.5.3: 252 when the server will not verify.
            return Reply.of(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
        address = yield self._local_address(event.argument)
        if address is None:
            return Reply.of(553, "5.1.3", f"Cannot parse {event.argument[:64]!r} as a user or local address")
        mailboxes = yield defer.maybeDeferred(self.context.directory.resolve, address)
        if not mailboxes:
            return Reply.of(550, "5.1.1", f"<{address}>: no such user here")
        text = _mailbox_text(mailboxes[0], event.utf8) if len(mailboxes) == 1 else f"<{address}>"  # a list receives mail
        if not (event.utf8 or text.isascii()):
            # rfc6531 3.7.4.2: 252 (or 550) X.6.8 when only UTF-8 can show the mailbox.
            return Reply.of(252, "2.6.8", "The mailbox needs UTF-8 to be shown: VRFY ... SMTPUTF8; mail to it is accepted")
        return Reply.of(250, "2.1.5", text, utf8=event.utf8)

    @defer.inlineCallbacks
    def on_expand(self, event: ev.Expand):
        """EXPN (rfc5321 3.5.2): the members of a list, one per line."""
        if not self.context.settings.expn:
            return Reply.of(502, "5.5.1", "EXPN disabled")
        address = yield self._local_address(event.argument)
        if address is None:
            return Reply.of(553, "5.1.3", f"Cannot parse {event.argument[:64]!r} as a list name")
        members = yield defer.maybeDeferred(self.context.directory.expand, address)
        if not members:
            return Reply.of(550, "5.1.1", f"<{address}>: not a mailing list")
        if not (event.utf8 or all(member.isascii() for member in members)):
            # rfc6531 3.7.4.2: 550 X.6.8 when only UTF-8 can show the members.
            return Reply.of(550, "5.6.8", "Members need UTF-8 to be shown: EXPN ... SMTPUTF8")
        return Reply.of(250, "2.1.5", *(f"<{member}>" for member in members), utf8=event.utf8)

    def on_turn(self, event: ev.Turn) -> Reply:
        """TURN (rfc821 4.1.1): not offered until authenticated turn-around exists."""
        return Reply.of(502, "5.5.1", "TURN not available")

    @defer.inlineCallbacks
    def _local_address(self, argument: str):
        """``user``, ``user@domain`` or ``<user@domain>`` → an address in a
        local domain (the first local domain for a bare user), or None."""
        text = argument.strip()
        if text.startswith("<") and text.endswith(">"):
            text = text[1:-1]
        if "@" not in text:
            domain = self.context.settings.default_domain
            if not text or not domain:
                return None
            text = f"{text}@{domain}"
        try:
            check_mailbox(text, utf8=True)  # rfc6531 3.7.4.2: the string may be UTF-8
        except AddressError:
            return None
        domain = text.rpartition("@")[2].lower()
        local = yield defer.maybeDeferred(self.context.directory.isLocalDomain, domain)
        return text if local else None


def _mailbox_text(mailbox: LocalMailbox, utf8: bool) -> str:
    """rfc6531 3.7.4.2: ``User Name <Mailbox>`` or ``<Mailbox>``; a full name
    that is not ASCII is left out when UTF-8 may not be shown."""
    name = mailbox.full_name if utf8 or mailbox.full_name.isascii() else ""
    return f"{name} <{mailbox.address}>" if name else f"<{mailbox.address}>"
