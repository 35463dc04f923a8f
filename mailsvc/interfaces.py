"""Every extension point of mailsvc, as a zope interface.

Implementations are found as Twisted plugins (``twisted.plugin.getPlugins``
over the ``twisted.plugins`` package) and chosen by name in the config. A
plugin module is a file in a ``twisted/plugins/`` folder (with no
``__init__.py``) anywhere on ``sys.path``, holding module-level objects that
provide one of the ``I*Factory`` interfaces below. See ``README.md``,
"Extending mailsvc".

Values passed across these interfaces (``Envelope``, ``Recipient``,
``LocalMailbox``, ``QueuedMessage``) live in ``mailsvc.envelope``; errors in
``mailsvc.errors``.
"""

from __future__ import annotations

from twisted.cred.credentials import ICredentials
from zope.interface import Attribute, Interface

# ---------------------------------------------------------------- storage


class IMailboxStore(Interface):
    """Mailboxes that local delivery writes into (Maildir, mbox, ...).

    Methods are blocking; the local delivery agent calls them in a thread.
    """

    def deliver(mailbox, headers, source):
        """Store one message in ``mailbox`` durably, then return.

        :param str mailbox: the mailbox name (a local user name).
        :param headers: header lines (``str``, no line end) to put before the
            message, in order (``Return-Path:``, ``Delivered-To:``).
        :param source: a binary file object positioned at the start of the
            message in wire form (CRLF line ends, no dot-stuffing). The store
            converts it to its own form (Maildir and mbox files use LF).
        :return: a ``str`` naming where it was stored (e.g. the file path).
        :raise mailsvc.errors.TemporaryDeliveryError: trying later may help
            (disk full, permissions, lock held).
        :raise mailsvc.errors.PermanentDeliveryError: it will not.

        When this returns, the message is on disk (fsync'd). When it raises,
        nothing partial is visible in the mailbox.
        """

    def exists(mailbox):
        """Whether ``mailbox`` has been created in this store (bool)."""


class IFlushingMailboxStore(IMailboxStore):
    """A store whose deliveries can share fsyncs with the spool's commits
    and with each other (group commit; ``mailsvc.durable``).

    The local delivery agent runs ``deliverSteps`` through the server's
    flush worker (``mailsvc.flushworker``) instead of ``deliver`` in a thread
    of its own: the steps run on the reactor thread, and their fsyncs are
    done in one thread, shared. So the steps must never block, other than
    by yielding a ``Flush``, and a long copy should yield an empty ``Flush``
    now and then. A store that may block (locks, network) implements only
    ``IMailboxStore``.
    """

    def deliverSteps(mailbox, headers, source):
        """``deliver`` as a generator: it yields a ``mailsvc.durable.Flush``
        each time it needs files or directories on disk, is resumed once they
        are (or has the ``OSError`` thrown in), and returns what ``deliver``
        returns; the same errors, the same guarantees."""


class IMailboxAccess(Interface):
    """The read side of a mailbox store: what mailbox access (POP3, rfc1939)
    needs. A store that provides it besides ``IMailboxStore`` can be served
    by ``mailsvc.pop3``; one that does not cannot, and start-up with a
    ``[pop3]`` listener stops saying so. Both built-in stores provide it.

    Blocking, like ``IMailboxStore``: the POP3 glue calls it in a thread.
    """

    def open(mailbox):
        """Begin a reading session on ``mailbox``; return an ``IMailboxSession``.

        Takes the mailbox's session lock (one session at a time, whatever
        process asks; delivery is not blocked by it) and lists the messages
        in it now. A mailbox never delivered to is opened empty.

        :param str mailbox: the mailbox name (a local user name).
        :raise mailsvc.store.access.MailboxLocked: another session holds it
            (POP3 answers ``-ERR [IN-USE]``, rfc2449 8.1.2).
        :raise OSError: it cannot be read.
        """


class IMailboxSession(Interface):
    """One reading session on one mailbox, from ``IMailboxAccess.open``.

    Messages are numbered from 0 in arrival order and keep their number for
    the whole session, deleted or not. Deleting only marks a message; it is
    removed at ``commit`` (POP3's UPDATE state, rfc1939 6). ``list``,
    ``delete`` and ``undelete`` only look at memory; the others do I/O.
    """

    def list():
        """Every message of the session, deleted ones included: a sequence of
        ``mailsvc.store.access.MessageInfo`` (``uid``: unique and stable
        across sessions, 1 to 70 characters 0x21-0x7E, rfc1939 7 UIDL;
        ``size``: octets in wire form, CRLF line ends, before dot-stuffing;
        ``deleted``)."""

    def read(index):
        """A binary file object reading message ``index`` as stored: its
        exact octets without the store's framing (mbox ``From `` line and
        ``>From`` quoting undone), LF line ends. The caller closes it; it
        stays readable after ``commit`` or ``close``.

        :raise IndexError: no such message.
        """

    def markSeen(index):
        """Record that message ``index`` was retrieved (Maildir: the ``S``
        flag, in ``cur/``); a store without flags does nothing."""

    def delete(index):
        """Mark message ``index`` for removal at ``commit``.

        :raise IndexError: no such message.
        """

    def undelete():
        """Unmark every message (POP3 RSET)."""

    def commit():
        """Remove the marked messages durably, all or none where the store
        allows it (an mbox file is rewritten and renamed into place), then
        end the session (release the lock). Returns how many were removed.

        :raise OSError: nothing or not all could be removed; the session is
            ended all the same.
        """

    def close():
        """End the session without removing anything (the connection was
        lost before QUIT). Safe to call more than once, and after ``commit``."""


class IMailboxStoreFactory(Interface):
    """A plugin that makes mailbox stores of one kind."""

    name = Attribute("The name config uses to select it, e.g. 'maildir'.")
    description = Attribute("One line for humans.")

    def makeStore(options):
        """Return an ``IMailboxStore``.

        :param options: a mapping from the config's ``[store]`` table with
            ``type`` removed; ``path`` already resolved to an absolute path.
        :raise mailsvc.errors.ConfigError: on a bad option (naming it).
        """


# ---------------------------------------------------------------- recipients


class IRecipientDirectory(Interface):
    """Who receives mail here: local domains, users, aliases and lists.

    Used by RCPT (is this a recipient?), VRFY, EXPN, and to expand aliases
    before a message is queued. Methods may return their value or a Deferred
    that fires with it.
    """

    def isLocalDomain(domain):
        """True if mail for ``domain`` (lower case, no trailing dot) is delivered here."""

    def resolve(address):
        """The final local mailboxes for ``address``.

        :param str address: ``local@domain`` with a local domain.
        :return: a tuple of ``mailsvc.envelope.LocalMailbox``, aliases
            expanded recursively and duplicates removed; ``()`` when
            ``address`` is not a recipient here. Local parts match without
            regard to case. ``postmaster`` always resolves (rfc5321 4.5.1).
        """

    def expand(address):
        """For EXPN: the member addresses of list ``address``, or ``None``
        when ``address`` is not a list (alias)."""


class IRecipientDirectoryFactory(Interface):
    """A plugin that makes recipient directories."""

    name = Attribute("The name config uses to select it, e.g. 'config'.")
    description = Attribute("One line for humans.")

    def makeDirectory(config):
        """Return an ``IRecipientDirectory`` for a ``mailsvc.config.Config``."""


# ---------------------------------------------------------------- policy


class IPolicy(Interface):
    """Hooks on an SMTP session, called in order at each stage.

    Each hook returns ``None`` (no opinion: go on), or a
    ``mailsvc.policy.Verdict`` (accept, reject with a code, defer with a
    code, and optionally header lines to add), or a Deferred firing with one
    of those. The first reject or defer wins and is sent to the client.
    ``session`` is a ``mailsvc.policy.SessionInfo``.
    """

    def connect(session):
        """A client connected (before the greeting)."""

    def helo(session, name):
        """The client said HELO or EHLO ``name``."""

    def mail(session, sender, parameters):
        """MAIL FROM: ``sender`` (``""`` for ``<>``), ``parameters`` a dict."""

    def rcpt(session, recipient, parameters):
        """RCPT TO: ``recipient`` (already accepted by the directory and relay rules)."""

    def endOfData(session, envelope):
        """The whole message arrived; ``envelope`` is a ``mailsvc.envelope.Envelope``.
        Headers in an accepting verdict are added on top of the message."""


class IPolicyFactory(Interface):
    """A plugin that makes policies."""

    name = Attribute("The name config uses to select it.")
    description = Attribute("One line for humans.")

    def makePolicy(options):
        """Return an ``IPolicy``; ``options`` is the plugin's config table."""


# ---------------------------------------------------------------- authentication


class IMailUser(Interface):
    """The avatar an SMTP AUTH login gets from the ``twisted.cred`` portal of
    ``mailsvc.auth`` (rfc4954): who is sending. A realm that provides it can
    be given to ``mailsvc.auth.make_portal`` to map logins differently."""

    name = Attribute("The local user name (str, lower case), as in [local] users.")


class ISASLVerifiedCredentials(ICredentials):
    """Credentials whose proof a SASL mechanism already checked against keys
    the server stores (SCRAM-SHA-256, rfc5802: the exchange needs the salt
    and keys half-way, before any checker could be asked). A checker for them
    only reads ``verified``."""

    username = Attribute("The user name the client gave (str).")
    verified = Attribute("True when the client's proof matched the stored keys.")


# ---------------------------------------------------------------- spool


class IMessageWriter(Interface):
    """A message being received into the spool, not yet committed."""

    id = Attribute("The queue ID (str) the message will have once committed.")
    size = Attribute("Octets written so far (int).")

    def write(data):
        """Append ``data`` (bytes, wire form: CRLF, no dot-stuffing).

        :raise mailsvc.errors.SpoolError: the data could not be written.
        """

    def commit(envelope, routes):
        """Make the message durable, under every hop in ``routes``.

        :param envelope: the ``Envelope`` (its ``recipients`` are ignored).
        :param routes: a mapping from hop name (``"local"``, ...) to the tuple
            of ``Recipient`` filed under that hop.
        :return: a list of ``QueuedMessage``, one per hop.
        :raise mailsvc.errors.SpoolError: nothing was committed and nothing
            half-written is left behind.

        Data and control files are written under temporary names, fsync'd,
        renamed, and their directories fsync'd before this returns
        (rfc5321 4.1.1.4, 6.1: accepting is taking responsibility).
        """

    def commit_steps(envelope, routes):
        """``commit`` as a generator of ``mailsvc.durable.Flush`` requests
        (for the flush worker, which shares fsyncs among commits in flight);
        returns what ``commit`` returns, raises what it raises."""

    def abort():
        """Forget the message: remove what was written. Safe to call twice."""


class ISpool(Interface):
    """The durable queue. The receiver writes it; the queue runner reads it."""

    def newMessage():
        """Begin a message: return an ``IMessageWriter``."""

    def recover():
        """On start: remove temporary files a crash left behind, return every
        committed ``QueuedMessage``."""

    def queued():
        """Every committed ``QueuedMessage`` now in the spool (a list)."""

    def open(message):
        """A binary file object reading the message to deliver: its
        ``prepend_headers`` (CRLF-terminated) then its data, in wire form."""

    def update(message):
        """Durably replace the recipients' state of ``message`` (a
        ``QueuedMessage``) with the one given."""

    def remove(message):
        """Remove ``message`` (every recipient is done)."""

    def held():
        """Every ``QueuedMessage`` on hold (a list). ``queued()`` and
        ``recover()`` do not list them; ``recover()`` keeps them."""

    def find(id):
        """The message with queue ID ``id`` in every hop that has it, queued
        or held: a list of ``(QueuedMessage, held)`` pairs, ``[]`` if none.

        :raise ValueError: ``id`` is not a queue ID.
        """

    def size(message):
        """The size in octets of the data of ``message`` (0 if it is gone)."""

    def hold(hop, id):
        """Put the queued message ``id`` of ``hop`` on hold: it is kept but
        not delivered until released; a later ``update`` of it fails.

        :raise mailsvc.errors.SpoolError: it is not queued there.
        """

    def release(hop, id):
        """Take the message ``id`` of ``hop`` off hold; return its ``QueuedMessage``.

        :raise mailsvc.errors.SpoolError: it is not on hold there.
        """

    def delete(hop, id):
        """Remove the message ``id`` of ``hop``, queued or held, at once.

        :raise mailsvc.errors.SpoolError: there is no such message there.
        """


# ---------------------------------------------------------------- delivery


class IDeliveryAgent(Interface):
    """Carries a queued message one step on (into a mailbox, to a peer...)."""

    def deliver(message):
        """Try every PENDING recipient of ``message`` (a ``QueuedMessage``).

        :return: a Deferred firing with a mapping from recipient address to
            ``None`` (delivered), a ``mailsvc.envelope.Delivered`` (delivered,
            saying which success report is due: rfc3461 5.2), or a
            ``mailsvc.errors.DeliveryError`` (its ``permanent`` says whether
            to retry). It never errbacks for a per-recipient failure.
        """
