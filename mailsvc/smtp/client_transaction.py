"""The client machine's bookkeeping of the transaction in progress (rfc5321
3.3): what MAIL, each RCPT and the BDAT chunks were answered, and the event
that reports the transaction once it is over."""

from __future__ import annotations

from mailsvc.smtp import client_events as ev
from mailsvc.smtp.client_events import Transaction
from mailsvc.smtp.replies import Reply

NO_RECIPIENTS = Reply.of(554, "5.5.1", "No recipient was accepted")


class TransactionProgress:
    """The bookkeeping of the transaction in progress."""

    def __init__(self, transaction: Transaction) -> None:
        self.transaction = transaction
        self.mail_refusal: Reply | None = None
        self.accepted: list[str] = []
        self.rcpt_index = 0  # the recipient whose RCPT reply is due next
        self.chunking = False  # the body goes as BDAT chunks (rfc3030)
        self.chunk_refusal: Reply | None = None  # the first BDAT chunk refused

    def outcome(self, reply: Reply) -> ev.ClientEvent:
        """The event that ends the transaction with ``reply`` as its final
        word: a refused MAIL outweighs it (rfc2920 3.1)."""
        if self.mail_refusal is not None:
            return ev.TransactionFailed(self.mail_refusal)
        return ev.MessageResult(reply, tuple(self.accepted))
