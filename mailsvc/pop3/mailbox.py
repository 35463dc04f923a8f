"""The POP3 avatar over a store's reading session, and the realm that opens it."""

from __future__ import annotations

from collections.abc import Callable

from twisted.cred.portal import IRealm
from twisted.logger import Logger
from twisted.mail import pop3
from zope.interface import implementer

from mailsvc.store.access import MessageInfo

log = Logger(namespace="mailsvc.pop3")


# ---------------------------------------------------------------- mailbox and realm


@implementer(pop3.IMailbox)
class POP3Mailbox:
    """``twisted.mail.pop3.IMailbox`` over an ``IMailboxSession``.

    Listing and marking work on the session's memory; reading, marking
    seen and committing run through ``run_blocking`` (a thread). ``logout``
    ends the session without removing anything, after any of those still
    running.
    """

    loginDelay = 0
    messageExpiration = None

    def __init__(self, name: str, session, run_blocking: Callable) -> None:
        self.name = name
        self.session = session
        self.run_blocking = run_blocking
        self._running = 0
        self._closeWhenIdle = False

    # ------------------------------------------------------ twisted's IMailbox

    def listMessages(self, i=None):
        """Sizes in octets (0 for a deleted message), or the size of message ``i``."""
        messages = self.messages()
        if i is None:
            return [0 if m.deleted else m.size for m in messages]
        info = self._info(i)
        return 0 if info.deleted else info.size

    def getMessage(self, i):
        """A Deferred firing with a binary file of message ``i`` as stored."""
        self._info(i)
        return self._run(self.session.read, i)

    def getUidl(self, i):
        return self._info(i).uid

    def deleteMessage(self, i):
        self._info(i)
        self.session.delete(i)

    def undeleteMessages(self):
        self.session.undelete()

    def sync(self):
        """rfc1939 6 UPDATE: a Deferred firing with how many messages were removed."""
        return self._run(self.session.commit)

    # ------------------------------------------------------ ours

    def messages(self) -> list[MessageInfo]:
        """Every message of the session (``MessageInfo``), deleted ones included."""
        return list(self.session.list())

    def markSeen(self, i):
        """A Deferred: the store records that message ``i`` was retrieved."""
        return self._run(self.session.markSeen, i)

    def logout(self) -> None:
        """The connection ended: close the session (nothing removed unless QUIT committed)."""
        if self._running:
            self._closeWhenIdle = True
        else:
            self._close()

    def _info(self, i) -> MessageInfo:
        messages = self.messages()
        if not isinstance(i, int) or not 0 <= i < len(messages):
            raise ValueError(f"no message {i!r}")
        return messages[i]

    def _run(self, f, *args):
        self._running += 1
        d = self.run_blocking(f, *args)

        def finished(result):
            self._running -= 1
            if self._closeWhenIdle and not self._running:
                self._close()
            return result

        return d.addBoth(finished)

    def _close(self) -> None:
        self._closeWhenIdle = False
        try:
            self.session.close()
        except OSError:
            log.failure("closing the mailbox of {user}", user=self.name)


@implementer(IRealm)
class MailboxRealm:
    """An authenticated user gets a ``POP3Mailbox`` over a session of their
    mailbox in ``store`` (an ``IMailboxAccess``), opened through ``run_blocking``."""

    def __init__(self, store, run_blocking: Callable) -> None:
        self.store = store
        self.run_blocking = run_blocking

    def requestAvatar(self, avatarId, mind, *interfaces):
        if pop3.IMailbox not in interfaces:
            raise NotImplementedError("this realm only hands out POP3 mailboxes")
        name = avatarId.decode("utf-8") if isinstance(avatarId, bytes) else avatarId
        d = self.run_blocking(self.store.open, name)

        def opened(session):
            mailbox = POP3Mailbox(name, session, self.run_blocking)
            return pop3.IMailbox, mailbox, mailbox.logout

        return d.addCallback(opened)
