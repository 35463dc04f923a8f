"""The client machine's reply handlers: one method per reply awaited.

``ReplyHandlers`` is the half of ``mailsvc.smtp.client.ClientConnection``
that reads each server reply, matched to the command it answers by counting,
never by its text (rfc2920 3.1), and read by its first digit (rfc5321 4.2.1,
4.3.2): it moves the session on (EHLO, HELO if EHLO gets a 5xx, rfc5321 3.2;
STARTTLS, rfc3207 4; AUTH, rfc4954 4; TURN/ATRN, rfc821 4.1.1, rfc2645;
MAIL, RCPT, DATA, BDAT, rfc5321 3.3, rfc3030 2) and queues the events it
makes; 421 ends the session at any point (rfc5321 3.8). It works on the
connection's state; it has no state of its own.
"""

from __future__ import annotations

from mailsvc.smtp import client_events as ev
from mailsvc.smtp.client_capabilities import extensions_from_ehlo
from mailsvc.smtp.client_chunking import ChunkWriter
from mailsvc.smtp.client_state import ReplyDue, State
from mailsvc.smtp.client_transaction import NO_RECIPIENTS
from mailsvc.smtp.replies import Reply
from mailsvc.smtp.stuffing import DotStuffer


class ReplyHandlers:
    """Reply handlers, mixed into ``ClientConnection`` (which owns every
    attribute used here: ``state``, ``extensions``, ``extended``,
    ``_due``, ``_events``, ``_exchange``, ``_stuffer``, ``_chunks``,
    ``_auth_answers``, ``_needs_reset``, and the calls ``_send``,
    ``_send_hello``, ``_write_unsent``, ``_close``, ``_finish``)."""

    def _on_reply(self, reply: Reply) -> None:
        if not self._due:
            # A reply nobody asked for: 421 is the server leaving, anything
            # else means the two sides are out of step.
            if reply.code == 421:
                self._close(ev.ConnectionFailed(reply))
            else:
                self._close(ev.ProtocolError(f"reply when none was due: {reply}"))
            return
        tag = self._due.popleft()
        if tag is ReplyDue.QUIT:
            self._close(ev.Closed(reply))
            return
        if reply.code == 421 and tag is not ReplyDue.GREETING:
            self._close(ev.ConnectionFailed(reply))  # rfc5321 3.8
            return
        _REPLY_HANDLERS[tag](self, reply)
        if self.state is State.TRANSACTION:
            self._write_unsent()

    def _unexpected(self, reply: Reply) -> None:
        self._close(ev.ConnectionFailed(reply))

    def _on_greeting(self, reply: Reply) -> None:
        digit = reply.code // 100
        if digit == 2:
            self._send_hello(ReplyDue.EHLO)  # rfc5321 3.2: EHLO first
        elif reply.code == 421:
            self._close(ev.GreetingRefused(reply))
        elif digit in (4, 5):
            # rfc5321 3.1: after a 554 greeting the server waits for QUIT.
            self.state = State.REFUSED
            self._events.append(ev.GreetingRefused(reply))
        else:
            self._unexpected(reply)

    def _on_ehlo(self, reply: Reply) -> None:
        digit = reply.code // 100
        if digit == 2:
            self.extensions = extensions_from_ehlo(reply)
            self.extended = True
            self.state = State.READY
            self._events.append(ev.Ready(dict(self.extensions), True, reply))
        elif digit == 5:
            self._send_hello(ReplyDue.HELO)  # rfc5321 3.2: fall back to HELO
        elif digit == 4:
            self.state = State.REFUSED
            self._events.append(ev.HelloRefused(reply))
        else:
            self._unexpected(reply)

    def _on_helo(self, reply: Reply) -> None:
        digit = reply.code // 100
        if digit == 2:
            self.extensions, self.extended = {}, False
            self.state = State.READY
            self._events.append(ev.Ready({}, False, reply))
        elif digit in (4, 5):
            self.state = State.REFUSED
            self._events.append(ev.HelloRefused(reply))
        else:
            self._unexpected(reply)

    def _on_starttls(self, reply: Reply) -> None:
        digit = reply.code // 100
        if digit == 2:
            self.state = State.TLS_HANDSHAKE
            self._events.append(ev.TLSReady(reply))
        elif digit in (4, 5):
            self.state = State.READY
            self._events.append(ev.TLSRefused(reply))
        else:
            self._unexpected(reply)

    def _on_auth(self, reply: Reply) -> None:
        digit = reply.code // 100
        if reply.code == 235:
            self.state = State.READY
            self._auth_answers.clear()
            self._events.append(ev.AuthSucceeded(reply))
        elif reply.code == 334:
            # LOGIN: each challenge gets the next answer, by order, not by
            # its text ("Username:", "Password:" vary). PLAIN went with an
            # initial response, and a third LOGIN challenge is out of step:
            # cancel (rfc4954 4: "*" gets 501).
            answer = self._auth_answers.popleft() if self._auth_answers else b"*\r\n"
            self._send(ReplyDue.AUTH, answer)
        elif digit in (4, 5):
            self.state = State.READY
            self._auth_answers.clear()
            self._events.append(ev.AuthFailed(reply))
        else:
            self._unexpected(reply)

    def _on_turn(self, reply: Reply) -> None:
        digit = reply.code // 100
        if digit == 2:
            # rfc821 4.1.1: "program-A becomes the receiver-SMTP"; it sends 220 next.
            self.state = State.TURNED
            self._due.clear()
            self._events.append(ev.Turned(reply))
        elif digit in (4, 5):
            self.state = State.READY
            self._events.append(ev.TurnRefused(reply))
        else:
            self._unexpected(reply)

    def _on_rset(self, reply: Reply) -> None:
        if reply.code // 100 == 2:
            self._needs_reset = False
        else:
            self._unexpected(reply)  # rfc5321 4.3.2: RSET only ever succeeds

    def _on_mail(self, reply: Reply) -> None:
        exchange = self._exchange
        assert exchange is not None
        digit = reply.code // 100
        if digit == 2:
            self._needs_reset = True
        elif digit in (4, 5):
            exchange.mail_refusal = reply
            if not self._due:  # not pipelined: nothing else was sent
                self._finish(ev.TransactionFailed(reply))
        else:
            self._unexpected(reply)

    def _on_rcpt(self, reply: Reply) -> None:
        exchange = self._exchange
        assert exchange is not None
        address = exchange.transaction.recipients[exchange.rcpt_index][0]
        exchange.rcpt_index += 1
        if reply.code // 100 not in (2, 4, 5):
            self._unexpected(reply)
        elif exchange.mail_refusal is None:
            # rfc2920 3.1: after a refused MAIL the RCPT replies mean nothing.
            result = ev.RecipientResult(address, reply)
            if result.accepted:
                exchange.accepted.append(address)
            self._events.append(result)
        if exchange.chunking and exchange.rcpt_index == len(exchange.transaction.recipients):
            self._recipients_done()

    def _recipients_done(self) -> None:
        """BDAT: every RCPT is answered. There is no DATA to ask (rfc3030 2):
        with a recipient, the chunks may go; without one, the transaction
        ends here, and RSET comes before the next MAIL."""
        exchange = self._exchange
        assert exchange is not None
        if exchange.mail_refusal is not None:
            self._finish(ev.TransactionFailed(exchange.mail_refusal))
        elif not exchange.accepted:
            self._finish(ev.MessageResult(NO_RECIPIENTS, ()))
        else:
            self.state = State.DATA
            self._chunks = ChunkWriter()
            self._events.append(ev.StartData(None))

    def _on_bdat(self, reply: Reply) -> None:
        """The reply to a BDAT chunk that was not the last (rfc3030 2: 250)."""
        exchange = self._exchange
        assert exchange is not None
        digit = reply.code // 100
        if digit == 2:
            pass
        elif digit in (4, 5):
            if exchange.chunk_refusal is None:
                # rfc3030 2: the transaction failed; no more chunks are sent.
                # Those already pipelined are answered too, then it ends.
                exchange.chunk_refusal = reply
                self._chunks = None
                if self.state is State.DATA:
                    self.state = State.DATA_END
        else:
            self._unexpected(reply)
            return
        if exchange.chunk_refusal is not None and not self._due:
            self._finish(self._outcome(exchange.chunk_refusal))

    def _on_data(self, reply: Reply) -> None:
        exchange = self._exchange
        assert exchange is not None
        digit = reply.code // 100
        if digit == 3 and exchange.accepted and exchange.mail_refusal is None:
            self.state = State.DATA
            self._stuffer = DotStuffer()
            self._events.append(ev.StartData(reply))
        elif digit == 3:
            # rfc2920 3.1: DATA accepted with no recipient: "the client SMTP
            # should send a single dot"; the server then sends nothing to
            # anybody (rfc2920 3.2 (4)).
            self._send(ReplyDue.DOT, b".\r\n")
        elif digit in (4, 5):
            # rfc2920 3.1: DATA "properly rejected": RSET before the next MAIL.
            self._finish(self._outcome(reply))
        else:
            self._unexpected(reply)

    def _on_dot(self, reply: Reply) -> None:
        if reply.code // 100 in (2, 4, 5):
            self._needs_reset = False  # the server ended its transaction
            self._finish(self._outcome(NO_RECIPIENTS))
        else:
            self._unexpected(reply)

    def _outcome(self, reply: Reply) -> ev.ClientEvent:
        exchange = self._exchange
        assert exchange is not None
        return exchange.outcome(reply)

    def _on_end(self, reply: Reply) -> None:
        exchange = self._exchange
        if reply.code // 100 not in (2, 4, 5):
            self._unexpected(reply)
        elif exchange is not None and exchange.chunk_refusal is not None:
            # An earlier chunk was refused: that is the outcome; the server
            # may still hold the transaction (rfc3030 2), so RSET comes next.
            if not self._due:
                self._finish(self._outcome(exchange.chunk_refusal))
        else:
            # rfc5321 4.1.1.4: end of data clears the transaction. After a
            # refused BDAT LAST the server's state is less certain (rfc3030
            # 2: "the transaction should be considered failed"): RSET first.
            self._needs_reset = exchange is not None and exchange.chunking and reply.code >= 400
            self._finish(self._outcome(reply))


_REPLY_HANDLERS = {
    ReplyDue.GREETING: ReplyHandlers._on_greeting,
    ReplyDue.EHLO: ReplyHandlers._on_ehlo,
    ReplyDue.HELO: ReplyHandlers._on_helo,
    ReplyDue.STARTTLS: ReplyHandlers._on_starttls,
    ReplyDue.AUTH: ReplyHandlers._on_auth,
    ReplyDue.TURN: ReplyHandlers._on_turn,
    ReplyDue.RSET: ReplyHandlers._on_rset,
    ReplyDue.MAIL: ReplyHandlers._on_mail,
    ReplyDue.RCPT: ReplyHandlers._on_rcpt,
    ReplyDue.DATA: ReplyHandlers._on_data,
    ReplyDue.DOT: ReplyHandlers._on_dot,
    ReplyDue.END: ReplyHandlers._on_end,
    ReplyDue.BDAT: ReplyHandlers._on_bdat,
}

