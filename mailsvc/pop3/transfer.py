"""POP3 message transfer: RETR (rfc1939 5) and TOP (rfc1939 7), the stored
message streamed to the client dot-stuffed, through ``mailsvc.pop3.encoding``.

``MessageTransfer`` is mixed into ``mailsvc.pop3.server.POP3Server``, which
owns ``mbox``, ``transport``, ``_highest`` and the ``_longOperation`` and
``_unexpected`` it calls.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.protocols import basic

from mailsvc.pop3.encoding import MessageEncoder, _EncodedReader

log = Logger(namespace="mailsvc.pop3")


class MessageTransfer:
    """RETR and TOP, mixed into ``POP3Server``."""

    def do_RETR(self, number: int):
        return self._sendMessage(number, None)

    def do_TOP(self, number: int, lines: int):
        return self._sendMessage(number, lines)

    def _sendMessage(self, number: int, bodyLines: int | None):
        """RETR or TOP: the message streamed with ``basic.FileSender`` through
        a ``MessageEncoder`` (workaround 3); RETR marks it seen."""
        size = self.mbox.messages()[number].size
        opened = self.mbox.getMessage(number)

        def send(source):
            encoder = MessageEncoder(bodyLines)
            self.successResponse(f"{size} octets" if bodyLines is None else "Top of message follows")
            transfer = basic.FileSender().beginFileTransfer(_EncodedReader(source, encoder), self.transport)

            def sent(_):
                self.transport.write(encoder.end())
                if bodyLines is None:
                    self._highest = max(self._highest, number + 1)
                    return self.mbox.markSeen(number).addErrback(
                        lambda f: log.failure("cannot mark message {n} seen", f, n=number + 1)
                    )
                return None

            def stopped(failure):
                log.info("pop3 transfer to [{client}] stopped: {why}", client=self.client_address,
                         why=failure.getErrorMessage())

            def closeSource(result):
                source.close()
                return result

            return transfer.addCallbacks(sent, stopped).addBoth(closeSource)

        def cannotRead(failure):
            log.failure("pop3 cannot read message {n} of {user}", failure, n=number + 1, user=self.mbox.name)
            self.failResponse(f"[SYS/TEMP] Cannot read message {number + 1} now")

        opened.addCallbacks(send, cannotRead)
        opened.addErrback(self._unexpected)
        return self._longOperation(opened)
