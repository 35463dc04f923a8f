"""What an SMTP client session tells its caller.

``SendResult``: the peer's replies to one transaction. ``SMTPSessionError``:
why the session ended before the step asked for was done. Both come from
``mailsvc.clientprotocol.SMTPClientProtocol``; the relay agent and the
turn-around role read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mailsvc.clientsession import OpeningFailed
from mailsvc.smtp.replies import Reply


class SMTPSessionError(Exception):
    """The session ended before the step asked for was done.

    ``reply`` is the peer's reply that ended it (a refused greeting or
    HELO, a 421), or ``None`` (connection lost, timeout, garbled reply);
    ``reason`` says what happened in words. ``data_sent`` is true when the
    end of data had been sent: the peer may have taken the message.
    ``partial`` holds the replies to the transaction in progress so far.
    ``opening`` is the ``OpeningFailed`` when STARTTLS or AUTH did not go
    as the ``SessionSecurity`` demands; ``tls_failed`` is true when the
    TLS handshake (or the certificate check) failed.
    """

    def __init__(
        self,
        reason: str,
        reply: Reply | None = None,
        data_sent: bool = False,
        *,
        opening: OpeningFailed | None = None,
        tls_failed: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply
        self.data_sent = data_sent
        self.opening = opening
        self.tls_failed = tls_failed
        # What the peer had said to the transaction in progress, if any.
        self.partial: SendResult | None = None

    @property
    def transient(self) -> bool:
        """False only when the peer refused with a 5xx reply."""
        return self.reply is None or self.reply.code < 500


@dataclass
class SendResult:
    """What the peer said to one transaction.

    ``refusal`` is set when the message went to nobody for a reason that
    applies to every recipient: MAIL refused, or the machine's own refusal
    (``synthetic``: too big for the peer's SIZE, 8-bit body without
    8BITMIME). Otherwise ``recipients`` maps each address to its RCPT reply
    and ``reply`` is the reply to the end of data (or the refusal of DATA),
    which applies to the ``accepted`` recipients.
    """

    refusal: Reply | None = None
    synthetic: bool = False
    recipients: dict[str, Reply] = field(default_factory=dict)
    reply: Reply | None = None
    accepted: tuple[str, ...] = ()

