"""POP3 mailbox access (rfc1939) on ``twisted.mail.pop3``, over our stores.

Users read what local delivery wrote, with the password they submit mail
with. The pieces:

- ``POP3Server``: a subclass of ``twisted.mail.pop3.POP3`` (its line
  handling, autologout timer, pipelined-command queue and ``FileSender``
  streaming are reused) with CAPA (rfc2449: TOP, UIDL, RESP-CODES,
  AUTH-RESP-CODE, PIPELINING, USER, SASL, STLS), STLS (rfc2595), SASL AUTH
  (rfc5034, with the mechanisms of ``mailsvc.smtp.sasl``: SCRAM-SHA-256,
  PLAIN, LOGIN, CRAM-MD5) and USER/PASS. Plaintext logins (USER/PASS and
  any AUTH) need TLS unless ``allow_plaintext_without_tls``: before it CAPA
  offers neither USER nor SASL and they get ``-ERR [AUTH]``. Failed logins
  count per client address (``mailsvc.limits.AuthFailures``): each ``-ERR``
  waits longer, then the address is refused and the connection closed.
- ``MailboxRealm``: the ``twisted.cred`` realm handing out
  ``twisted.mail.pop3.IMailbox`` avatars; the portal uses the checkers of
  ``mailsvc.auth`` (the same password file as SMTP AUTH). The avatar is a
  ``POP3Mailbox`` over an ``IMailboxSession`` of the store
  (``mailsvc.interfaces.IMailboxAccess``); a mailbox already being read
  gives ``-ERR [IN-USE]`` (rfc2449 8.1.2).
- rfc1939 6: deletions happen only at QUIT (the UPDATE state, in a
  thread); a connection lost before QUIT removes nothing.
- Messages go out as stored (``mailsvc.store.access.WireForm``: LF to
  CRLF), dot-stuffed with ``mailsvc.smtp.stuffing.DotStuffer``.
- ``pop3_listeners``: the STLS and implicit-TLS (rfc8314) listeners of
  ``[pop3]``, sharing one connection count.

The package: ``encoding`` (stored bytes to the wire), ``mailbox`` (avatar and
realm), ``server`` (the protocol), ``login`` (USER/PASS/APOP and SASL AUTH,
mixed into the protocol), ``transfer`` (RETR and TOP, mixed in too),
``replies`` (``-ERR`` texts with response codes), ``listeners`` (factory and
endpoints).

Where ``twisted.mail.pop3.POP3`` is broken (Twisted 24-26 on Python 3),
``mailsvc.pop3.server`` works around it in the subclass (with its mixins
from ``login`` and ``transfer``) rather than patching it:

1. ``state_COMMAND`` builds its error reply with ``b"".join(e.args)``, but
   on Python 3 a ``ValueError`` or ``TypeError`` carries ``str`` arguments:
   "USER" with no name, "DELE x", "TOP 1" or "AUTH PLAIN <initial
   response>" raise a second ``TypeError`` out of ``dataReceived`` and the
   reactor drops the connection. We parse and check every command ourselves
   and answer a clear ``-ERR``.
2. SASL AUTH cannot log anyone in: ``state_AUTH`` splits the decoded
   answer at white space (the CRAM-MD5 shape) and never calls
   ``setResponse``, so PLAIN gets garbage credentials; rfc5034's initial
   response and ``*`` (cancel) are not handled. Ours runs the
   ``mailsvc.smtp.sasl`` exchanges.
3. ``transformChunk`` dot-stuffs each 16 KiB chunk on its own: a line
   starting with ``.`` at a chunk boundary (or the first line) is not
   stuffed, so a lone ``.`` there ends the response early. ``TOP``'s
   ``_HeadersPlusNLines`` misses a blank line split across two chunks.
   Ours keeps the state across chunks.
4. ``do_DELE`` passes ``int(i) - 1`` unchecked: ``DELE 0`` deletes the
   last message (index -1); deleting twice says ``+OK``. LIST, UIDL and
   STAT list and count deleted messages (rfc1939 5 says they must not).
5. CAPA offers ``PIPELINE`` (rfc2449 says PIPELINING), joke capabilities
   and USER whatever the TLS state; there is no STLS.
6. ``do_QUIT`` calls ``sync()`` without waiting for or checking it, so a
   failed removal is answered ``+OK``.
7. The greeting's APOP timestamp comes from ``smtp.messageid()`` (a
   blocking ``getfqdn()``); APOP needs stored plaintext passwords, which we
   do not keep, so we offer no APOP and send no timestamp.
8. ``TimeoutMixin`` and ``task.coiterate`` use the global reactor: our
   timer runs on the factory's clock and listings are written directly.
9. ``twisted.mail.pop3`` imports ``twisted.mail.smtp``, which imports the
   global reactor at module level: ``mailsvc.tap`` imports this package only
   inside ``build``, and only when a POP3 listener is configured.
"""

from mailsvc.pop3.encoding import MessageEncoder, TopLimit
from mailsvc.pop3.listeners import POP3Connections, POP3Factory, pop3_authenticator, pop3_listeners
from mailsvc.pop3.mailbox import MailboxRealm, POP3Mailbox
from mailsvc.pop3.replies import IN_USE
from mailsvc.pop3.server import POP3Server

__all__ = [
    "IN_USE",
    "MailboxRealm",
    "MessageEncoder",
    "POP3Connections",
    "POP3Factory",
    "POP3Mailbox",
    "POP3Server",
    "TopLimit",
    "pop3_authenticator",
    "pop3_listeners",
]
