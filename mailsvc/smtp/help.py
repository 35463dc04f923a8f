"""HELP texts (rfc5321 4.1.1.8: 214 with information, 504 for unknown topics)."""

from __future__ import annotations

from mailsvc.smtp.replies import Reply

_TOPICS = {
    "HELO": ["HELO <hostname>: identify yourself (rfc5321 4.1.1.1)."],
    "EHLO": ["EHLO <hostname>: identify yourself and list the extensions (rfc5321 4.1.1.1)."],
    "MAIL": [
        "MAIL FROM:<sender> [SIZE=n] [BODY=7BIT|8BITMIME] [SMTPUTF8]: start a transaction (rfc5321 4.1.1.2).",
        "SMTPUTF8 (rfc6531) lets the addresses and headers of this message use UTF-8.",
    ],
    "RCPT": ["RCPT TO:<recipient>: add a recipient (rfc5321 4.1.1.3)."],
    "DATA": ["DATA: send the message, end it with a line holding only '.' (rfc5321 4.1.1.4)."],
    "RSET": ["RSET: abort the transaction (rfc5321 4.1.1.5)."],
    "VRFY": ["VRFY <user> [SMTPUTF8]: ask whether a user or mailbox exists (rfc5321 4.1.1.6; rfc6531 3.7.4.2)."],
    "EXPN": ["EXPN <list> [SMTPUTF8]: ask for the members of a mailing list (rfc5321 4.1.1.7; rfc6531 3.7.4.2)."],
    "HELP": ["HELP [command]: this text (rfc5321 4.1.1.8)."],
    "NOOP": ["NOOP [anything]: do nothing, answer 250 (rfc5321 4.1.1.9)."],
    "QUIT": ["QUIT: close the session (rfc5321 4.1.1.10)."],
    "SEND": [
        "SEND FROM:<sender>: rfc821 3.4 delivery to a user's terminal.",
        "This server has no terminals: SEND delivers to the mailbox, as MAIL does.",
    ],
    "SOML": [
        "SOML FROM:<sender>: rfc821 3.4 'send or mail'.",
        "This server has no terminals: SOML delivers to the mailbox, as MAIL does.",
    ],
    "SAML": [
        "SAML FROM:<sender>: rfc821 3.4 'send and mail'.",
        "This server has no terminals: SAML delivers to the mailbox, as MAIL does.",
    ],
    "TURN": ["TURN: rfc821 role reversal, for an authenticated client whose domains' mail is held here."],
    "ETRN": ["ETRN [@|#]node: rfc1985; start delivering the mail queued for a domain (@: and its subdomains; #: a queue)."],
    "ATRN": ["ATRN [domain,...]: rfc2645 authenticated TURN, on the On-Demand Mail Relay port."],
}

_SUMMARY = [
    "mailsvc: commands:",
    "  HELO EHLO MAIL RCPT DATA RSET NOOP QUIT",
    "  HELP VRFY EXPN SEND SOML SAML TURN",
    "HELP <command> for more.",
]


def help_reply(topic: str) -> Reply:
    """The reply to HELP ``topic`` (``""`` for the summary)."""
    if not topic:
        return Reply.of(214, "2.0.0", *_SUMMARY)
    lines = _TOPICS.get(topic.strip().upper())
    if lines is None:
        return Reply.of(504, "5.5.4", f"No help for {topic[:40]!r}; try HELP")
    return Reply.of(214, "2.0.0", *lines)
