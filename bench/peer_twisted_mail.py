"""A bench peer: Twisted's own ``twisted.mail.smtp.ESMTP`` with a Maildir handler.

``python bench/peer_twisted_mail.py PORT MAILDIR`` listens on 127.0.0.1:PORT
and stores every message for any recipient into the Maildir MAILDIR with
Python's ``mailbox.Maildir`` (the same handler as the aiosmtpd peer): no
queue, no fsync, the whole message held in memory until its end. It logs as
twistd would (``textFileLogObserver`` on stdout). Run by ``accept_deliver.py``
(target ``twisted``) from the project venv: nothing to install.
"""

from __future__ import annotations

import mailbox
import sys

from twisted.internet import defer
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.mail import smtp
from zope.interface import implementer


@implementer(smtp.IMessage)
class MaildirMessage:
    """Collects the lines of one message; stores them at the end of data."""

    def __init__(self, maildir: mailbox.Maildir) -> None:
        self.maildir = maildir
        self.lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)

    def eomReceived(self):
        self.lines.append(b"")
        self.maildir.add(b"\n".join(self.lines))
        return defer.succeed(None)

    def connectionLost(self) -> None:
        self.lines = []


@implementer(smtp.IMessageDelivery)
class MaildirDelivery:
    """Accepts any sender and recipient; each recipient gets its copy."""

    def __init__(self, maildir: mailbox.Maildir) -> None:
        self.maildir = maildir

    def receivedHeader(self, helo, origin, recipients) -> bytes:
        return b"Received: from " + helo[0] + b" by twisted.bench.test"

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        return lambda: MaildirMessage(self.maildir)


class Factory(smtp.SMTPFactory):
    protocol = smtp.ESMTP
    domain = b"twisted.bench.test"

    def __init__(self, maildir: mailbox.Maildir) -> None:
        super().__init__()
        self.maildir = maildir

    def buildProtocol(self, addr):
        p = super().buildProtocol(addr)
        p.delivery = MaildirDelivery(self.maildir)
        return p


def main(argv: list[str]) -> int:
    from twisted.internet import reactor

    port, path = int(argv[1]), argv[2]
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    maildir = mailbox.Maildir(path, create=True)
    reactor.listenTCP(port, Factory(maildir), interface="127.0.0.1", backlog=1024)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
