"""POP3 mailbox access, in memory: the store sessions, the wire encoding, and
the ``mailsvc.pop3`` protocol on a ``StringTransport`` with ``task.Clock``.

The stores are the real Maildir and mbox stores in ``tmp_path``; the portal
is ``mailsvc.auth``'s checkers over a real password file; blocking calls run
at once (``defer.maybeDeferred``). STLS is recorded by the transport
(``TLSStringTransport``), never performed.
"""

from __future__ import annotations

import base64
import io
import os

import pytest
from twisted.cred.portal import IRealm
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.mail import pop3 as twisted_pop3
from zope.interface.verify import verifyObject

from mailsvc import auth as authmod
from mailsvc import config
from mailsvc.errors import ConfigError
from mailsvc.interfaces import IMailboxAccess, IMailboxSession, IMailUser
from mailsvc.limits import AuthFailures
from mailsvc.passwords import PasswordFile, make_entry, write_entry
from mailsvc.pop3 import (
    IN_USE,
    MailboxRealm,
    MessageEncoder,
    POP3Factory,
    POP3Mailbox,
    pop3_authenticator,
    pop3_listeners,
)
from mailsvc.store.access import MailboxLocked, WireForm, wireSize
from mailsvc.store.maildir import MaildirStore
from mailsvc.store.mbox import MboxStore
from test_protocol_secure import scram_client_final

PASSWORD = "tiger lily"
TLS_CONTEXT = object()  # the protocol only hands it to transport.startTLS

FIRST = b"From: alice@example.test\r\nSubject: one\r\n\r\nHello Bob.\r\n.starts with a dot\r\n.\r\nbye\r\n"
SECOND = b"From: carol@example.test\r\nSubject: two\r\n\r\nFrom here on, mbox would quote this.\r\n>From there too.\r\nlast\r\n"


def stored(message: bytes, recipient: str = "bob@example.test") -> bytes:
    """What local delivery writes for ``message`` (LF line ends, two headers on top)."""
    head = f"Return-Path: <alice@example.test>\nDelivered-To: {recipient}\n".encode()
    return head + message.replace(b"\r\n", b"\n")


def deliver(store, message: bytes, mailbox: str = "bob") -> str:
    return store.deliver(mailbox, ["Return-Path: <alice@example.test>", f"Delivered-To: {mailbox}@example.test"],
                         io.BytesIO(message))


def read(session, index: int) -> bytes:
    """Message ``index`` of a session, the file closed after."""
    with session.read(index) as f:
        return f.read()


def make_store(tmp_path, kind: str):
    if kind == "maildir":
        return MaildirStore(str(tmp_path / "mail"), hostname="mx.test")
    return MboxStore(str(tmp_path / "mail"), lockTimeout=0.5)


def wire(data: bytes) -> bytes:
    """The wire form (CRLF) of stored bytes, as a reference."""
    return data.replace(b"\n", b"\r\n")


def stuffed(data: bytes) -> bytes:
    """A reference for rfc1939 3 byte-stuffing of wire bytes, with the terminator."""
    lines = data.split(b"\r\n")
    body = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)
    return body + (b".\r\n" if data.endswith(b"\r\n") or not data else b"\r\n.\r\n")


# ---------------------------------------------------------------- wire form and encoder


def test_wire_form_turns_lf_into_crlf_across_any_chunking():
    """LF becomes CRLF, a stored CRLF is not doubled, a bare CR passes, whatever the chunking."""
    data = b"a\nb\r\nc\rd\n\n\r"
    expected = b"a\r\nb\r\nc\rd\r\n\r\n\r"
    for split in range(len(data) + 1):
        form = WireForm()
        assert form.feed(data[:split]) + form.feed(data[split:]) + form.end() == expected
    assert wireSize(io.BytesIO(data)) == len(expected)


def test_encoder_stuffs_dots_at_every_chunk_boundary():
    """A line starting with a dot is stuffed even when a chunk starts with it,
    and the first line too; the terminator follows a CRLF."""
    data = b".first\nx\n.\n..two\nend"
    for split in range(len(data) + 1):
        encoder = MessageEncoder()
        out = encoder.feed(data[:split]) + encoder.feed(data[split:]) + encoder.end()
        assert out == b"..first\r\nx\r\n..\r\n...two\r\nend\r\n.\r\n", split


def test_twisted_transform_chunk_misses_a_dot_at_a_chunk_start():
    """Why we do not use POP3.transformChunk (workaround 3): it stuffs each
    chunk alone, so a lone '.' line opening a chunk ends the response early."""
    assert twisted_pop3.POP3().transformChunk(b".\nrest\n") == b".\r\nrest\r\n"
    encoder = MessageEncoder()
    assert encoder.feed(b"x\n") + encoder.feed(b".\nrest\n") == b"x\r\n..\r\nrest\r\n"


@pytest.mark.parametrize(
    "lines, expected",
    [
        (0, b"A: 1\r\nB: 2\r\n\r\n.\r\n"),
        (1, b"A: 1\r\nB: 2\r\n\r\n..one\r\n.\r\n"),
        (2, b"A: 1\r\nB: 2\r\n\r\n..one\r\n\r\n.\r\n"),
        (9, b"A: 1\r\nB: 2\r\n\r\n..one\r\n\r\nthree\r\n.\r\n"),
    ],
)
def test_top_cuts_after_n_body_lines_across_any_chunking(lines, expected):
    """TOP n (rfc1939 7): the headers, the blank line, n body lines, for every chunk boundary."""
    data = b"A: 1\nB: 2\n\n.one\n\nthree\n"
    for split in range(len(data) + 1):
        encoder = MessageEncoder(lines)
        out = encoder.feed(data[:split]) + encoder.feed(data[split:]) + encoder.end()
        assert out == expected, split


# ---------------------------------------------------------------- store sessions


@pytest.mark.parametrize("kind", ["maildir", "mbox"])
def test_session_lists_and_reads_exactly_the_stored_bytes(tmp_path, kind):
    """Both stores provide IMailboxAccess; a session lists the messages in
    arrival order with their wire sizes and stable UIDs, and reads back each
    as stored (mbox quoting undone)."""
    store = make_store(tmp_path, kind)
    verifyObject(IMailboxAccess, store)
    deliver(store, FIRST)
    deliver(store, SECOND)
    session = store.open("bob")
    verifyObject(IMailboxSession, session)
    infos = session.list()
    assert [i.size for i in infos] == [len(wire(stored(FIRST))), len(wire(stored(SECOND)))]
    assert [read(session, n) for n in (0, 1)] == [stored(FIRST), stored(SECOND)]
    uids = [i.uid for i in infos]
    assert len(set(uids)) == 2 and all(0 < len(u) <= 70 and u.isprintable() and " " not in u for u in uids)
    session.close()
    again = store.open("bob")
    assert [i.uid for i in again.list()] == uids
    again.close()


def test_maildir_session_moves_new_to_cur_and_marks_seen(tmp_path):
    """Opening moves new/ to cur/ as <unique>,S=<size>,W=<wire size>:2,;
    markSeen adds the S flag; the UID does not change."""
    store = make_store(tmp_path, "maildir")
    path = deliver(store, FIRST)
    unique = os.path.basename(path)
    session = store.open("bob")
    cur = tmp_path / "mail" / "bob" / "cur"
    assert os.listdir(tmp_path / "mail" / "bob" / "new") == []
    size, wire_size = len(stored(FIRST)), len(wire(stored(FIRST)))
    assert os.listdir(cur) == [f"{unique},S={size},W={wire_size}:2,"]
    uid = session.list()[0].uid
    assert uid == unique
    session.markSeen(0)
    assert os.listdir(cur)[0].endswith(":2,S")
    assert read(session, 0) == stored(FIRST)
    session.close()
    again = store.open("bob")
    assert again.list()[0].uid == uid
    again.close()


@pytest.mark.parametrize("kind", ["maildir", "mbox"])
def test_second_session_is_refused_until_the_first_ends(tmp_path, kind):
    """One session per mailbox (flock): a second open raises MailboxLocked,
    in the same process too; after close it succeeds. Delivery goes on meanwhile."""
    store = make_store(tmp_path, kind)
    deliver(store, FIRST)
    first = store.open("bob")
    with pytest.raises(MailboxLocked):
        store.open("bob")
    deliver(store, SECOND)  # not blocked by the session
    first.close()
    second = store.open("bob")
    assert len(second.list()) == 2
    second.close()


@pytest.mark.parametrize("kind", ["maildir", "mbox"])
def test_delete_takes_effect_only_at_commit(tmp_path, kind):
    """rfc1939 6: delete marks; close (connection lost) removes nothing;
    commit removes the marked messages and keeps the others byte for byte."""
    store = make_store(tmp_path, kind)
    for message in (FIRST, SECOND, FIRST.replace(b"one", b"three")):
        deliver(store, message)
    session = store.open("bob")
    session.delete(1)
    assert session.list()[1].deleted
    session.close()
    session = store.open("bob")
    assert [i.deleted for i in session.list()] == [False, False, False]
    session.delete(0)
    session.delete(2)
    session.undelete()
    session.delete(1)
    assert session.commit() == 1
    session.close()  # harmless after commit
    after = store.open("bob")
    assert [read(after, n) for n in range(len(after.list()))] == [
        stored(FIRST), stored(FIRST.replace(b"one", b"three"))]
    after.close()


def test_mbox_commit_keeps_mail_delivered_during_the_session(tmp_path):
    """The mbox is rewritten without the deleted message, new mail included,
    by rename (a new inode); the lock file is gone."""
    store = make_store(tmp_path, "mbox")
    deliver(store, FIRST)
    deliver(store, SECOND)
    path = tmp_path / "mail" / "bob"
    inode = path.stat().st_ino
    session = store.open("bob")
    deliver(store, FIRST.replace(b"one", b"late"))
    session.delete(0)
    assert session.commit() == 1
    assert path.stat().st_ino != inode and oct(path.stat().st_mode & 0o777) == "0o600"
    assert not (tmp_path / "mail" / "bob.lock").exists()
    assert [p.name for p in (tmp_path / "mail").iterdir()] == ["bob"]
    after = store.open("bob")
    assert [read(after, n) for n in range(2)] == [stored(SECOND), stored(FIRST.replace(b"one", b"late"))]
    assert path.read_bytes().count(b"\n>From there too.") == 0 and b"\n>>From there too." in path.read_bytes()
    after.close()


def test_mbox_commit_refuses_a_file_changed_by_another_program(tmp_path):
    """If another program rewrote the mbox during the session, commit removes
    nothing and says so; the file stays as that program left it."""
    store = make_store(tmp_path, "mbox")
    deliver(store, FIRST)
    deliver(store, SECOND)
    path = tmp_path / "mail" / "bob"
    session = store.open("bob")
    changed = path.read_bytes()[10:]
    path.write_bytes(changed)  # in place: same inode, messages moved
    session.delete(0)
    with pytest.raises(OSError, match="changed by another program"):
        session.commit()
    assert path.read_bytes() == changed
    store.open("bob").close()  # the session lock was released


# ---------------------------------------------------------------- protocol harness


class TLSStringTransport(StringTransport):
    """A StringTransport that records ``startTLS``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tls_context = None

    def startTLS(self, context):
        self.tls_context = context


class Harness:
    """A store with bob's mail, the password file, and POP3 factories (STLS and implicit TLS)."""

    def __init__(self, tmp_path, kind="maildir", *, plaintext=False, max_failures=3, delay=0.0, mechanisms=None):
        self.clock = task.Clock()
        self.store = make_store(tmp_path, kind)
        self.password_file = tmp_path / "passwd"
        write_entry(self.password_file, "bob", make_entry("bob", PASSWORD).line())
        passwords = PasswordFile(self.password_file)
        self.failures = AuthFailures(self.clock, max_failures=max_failures, window=600, delay=delay, max_delay=8)
        smtp_auth = authmod.Authenticator(
            authmod.make_portal(passwords, None, defer.maybeDeferred),
            passwords, "mx.test", ["example.test"], self.failures, self.clock, defer.maybeDeferred,
        )
        self.auth = pop3_authenticator(smtp_auth, self.store, defer.maybeDeferred)
        options = dict(hostname="mx.test", clock=self.clock, plaintext_without_tls=plaintext,
                       mechanisms=mechanisms or ("SCRAM-SHA-256", "PLAIN", "LOGIN"))
        self.factory = POP3Factory(self.auth, tls=TLS_CONTEXT, **options)
        self.implicit = POP3Factory(self.auth, implicit_tls=True, connections=self.factory.connections, **options)

    def connect(self, factory=None, client="192.0.2.7") -> "Client":
        return Client(factory or self.factory, client)


class Client:
    """One connection: ``send`` a line (or raw bytes), get what the server wrote since."""

    def __init__(self, factory, client):
        self.transport = TLSStringTransport(peerAddress=IPv4Address("TCP", client, 40000))
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        self.greeting = self.take()

    def take(self) -> bytes:
        """Everything written so far (streamed messages pumped through), then cleared."""
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()
        out = self.transport.value()
        self.transport.clear()
        return out

    def send(self, line: bytes | str, raw: bool = False) -> bytes:
        data = line.encode() if isinstance(line, str) else line
        self.protocol.dataReceived(data if raw else data + b"\r\n")
        return self.take()

    def lines(self, line) -> list[bytes]:
        return self.send(line).split(b"\r\n")[:-1]

    def stls(self) -> None:
        assert self.send("STLS") == b"+OK Begin TLS negotiation now\r\n"
        assert self.transport.tls_context is TLS_CONTEXT

    def login(self) -> bytes:
        self.send("USER bob")
        return self.send(f"PASS {PASSWORD}")

    def lose(self) -> None:
        self.protocol.connectionLost(None)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def harness(tmp_path):
    """A maildir harness with FIRST and SECOND delivered to bob."""
    h = Harness(tmp_path)
    deliver(h.store, FIRST)
    deliver(h.store, SECOND)
    return h


# ---------------------------------------------------------------- protocol: TLS and login


def test_capa_before_and_after_stls(harness):
    """rfc2449/rfc2595: before TLS, CAPA offers STLS but neither USER nor SASL;
    after STLS, USER and SASL with [auth] mechanisms, and no STLS."""
    c = harness.connect()
    assert c.greeting == b"+OK mx.test POP3 server ready\r\n"
    before = c.lines("CAPA")
    assert before[0].startswith(b"+OK") and before[-1] == b"."
    assert set(before[1:-1]) == {b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING", b"STLS",
                                 b"IMPLEMENTATION mailsvc"}
    c.stls()
    after = c.lines("CAPA")
    assert b"USER" in after and b"SASL SCRAM-SHA-256 PLAIN LOGIN" in after and b"STLS" not in after
    assert c.send("STLS").startswith(b"-ERR TLS is already active")


def test_plaintext_logins_refused_before_tls(harness):
    """USER, PASS and AUTH before STLS get a clear -ERR [AUTH]; nothing counts as a failure."""
    c = harness.connect()
    assert c.send("USER bob") == b"-ERR [AUTH] Plaintext login refused before TLS: send STLS first\r\n"
    assert c.send(f"PASS {PASSWORD}").startswith(b"-ERR [AUTH] Plaintext login refused")
    assert c.send("AUTH PLAIN " + b64(b"\0bob\0" + PASSWORD.encode())).startswith(
        b"-ERR [AUTH] Authentication refused before TLS")
    assert c.send("STAT").startswith(b"-ERR STAT is not allowed before login")
    assert harness.failures.count("192.0.2.7") == 0


def test_input_after_stls_in_the_same_read_is_discarded(harness):
    """rfc2595 (as rfc3207 4.2): a command smuggled after STLS in clear is never run."""
    c = harness.connect()
    out = c.send(b"STLS\r\nUSER bob\r\nPASS " + PASSWORD.encode() + b"\r\nSTA", raw=True)
    assert out == b"+OK Begin TLS negotiation now\r\n"
    assert c.send("T") == b"-ERR Unknown command T\r\n"  # the partial "STA" was dropped too
    assert c.send("STAT").startswith(b"-ERR STAT is not allowed before login")


def test_user_pass_over_tls_then_a_whole_session(harness):
    """USER/PASS after STLS; STAT, LIST, UIDL, TOP, RETR (CRLF, dot-stuffed,
    exactly the stored bytes), DELE, RSET, QUIT; the deleted message is gone
    from the Maildir, the other is in cur/ with the S flag."""
    c = harness.connect()
    c.stls()
    sizes = [len(wire(stored(FIRST))), len(wire(stored(SECOND)))]
    assert c.login() == f"+OK bob has 2 messages ({sum(sizes)} octets)\r\n".encode()
    assert c.send("STAT") == b"+OK 2 %d\r\n" % sum(sizes)
    assert c.lines("LIST")[1:] == [b"1 %d" % sizes[0], b"2 %d" % sizes[1], b"."]
    assert c.send("LIST 2") == b"+OK 2 %d\r\n" % sizes[1]
    uids = c.lines("UIDL")[1:-1]
    assert len(uids) == 2 and uids[0].startswith(b"1 ") and c.send("UIDL 1") == b"+OK " + uids[0] + b"\r\n"
    top = c.send("TOP 1 1")
    assert top == b"+OK Top of message follows\r\n" + wire(stored(FIRST)).split(b"\r\n\r\n")[0] + b"\r\n\r\nHello Bob.\r\n.\r\n"
    retr = c.send("RETR 1")
    assert retr == b"+OK %d octets\r\n" % sizes[0] + stuffed(wire(stored(FIRST)))
    assert b"\r\n..starts with a dot\r\n..\r\nbye\r\n.\r\n" in retr
    assert c.send("DELE 2") == b"+OK Message 2 deleted\r\n"
    assert c.send("DELE 2") == b"-ERR Message 2 is deleted\r\n"
    assert c.send("RETR 2") == b"-ERR Message 2 is deleted\r\n"
    assert c.lines("LIST")[1:] == [b"1 %d" % sizes[0], b"."]
    assert c.send("STAT") == b"+OK 1 %d\r\n" % sizes[0]
    assert c.send("RSET").startswith(b"+OK bob has 2 messages")
    assert c.send("DELE 2") == b"+OK Message 2 deleted\r\n"
    assert c.send("QUIT") == b"+OK mx.test POP3 server signing off (1 messages deleted)\r\n"
    assert c.transport.disconnecting
    c.lose()
    cur = os.listdir(harness.store.path + "/bob/cur")
    assert len(cur) == 1 and cur[0].endswith(":2,S")
    with open(os.path.join(harness.store.path, "bob", "cur", cur[0]), "rb") as f:
        assert f.read() == stored(FIRST)


def test_lost_connection_removes_nothing_and_releases_the_lock(harness):
    """rfc1939 6: DELE then a lost connection (no QUIT): both messages stay,
    and the next session opens the mailbox."""
    c = harness.connect()
    c.stls()
    c.login()
    c.send("DELE 1")
    c.send("DELE 2")
    c.lose()
    again = harness.connect()
    again.stls()
    assert again.login().startswith(b"+OK bob has 2 messages")


def test_quit_says_so_when_removal_fails(harness):
    """rfc1939 6: if the UPDATE cannot remove the deleted messages, QUIT
    answers -ERR (workaround 6) and the session still ends."""
    c = harness.connect(harness.implicit)
    c.login()
    session = c.protocol.mbox.session
    closed = []

    def failing_commit():
        session.close()
        closed.append(True)
        raise OSError(5, "Input/output error")

    session.commit = failing_commit
    c.send("DELE 1")
    assert c.send("QUIT") == b"-ERR [SYS/TEMP] Some deleted messages were not removed\r\n"
    assert closed and c.transport.disconnecting
    c.lose()
    assert harness.connect(harness.implicit).login().startswith(b"+OK bob has 2 messages")


def test_second_session_gets_in_use(harness):
    """rfc2449 8.1.2: a second login while the mailbox is being read gets
    -ERR [IN-USE]; it is not a failed login; after QUIT it works."""
    first = harness.connect()
    first.stls()
    first.login()
    second = harness.connect()
    second.stls()
    assert second.login() == b"-ERR " + IN_USE + b"\r\n"
    assert harness.failures.count("192.0.2.7") == 0
    first.send("QUIT")
    first.lose()
    assert second.send("USER bob") == b"+OK Send PASS\r\n"
    assert second.send(f"PASS {PASSWORD}").startswith(b"+OK bob has 2 messages")


def test_auth_plain_with_and_without_initial_response(harness):
    """rfc5034: AUTH PLAIN <initial response>; AUTH PLAIN then "+ " and the
    answer; a login name may carry a local domain; '*' cancels."""
    c = harness.connect(harness.implicit)
    assert c.send("AUTH PLAIN " + b64(b"\0bob@example.test\0" + PASSWORD.encode())).startswith(b"+OK bob has 2")
    c.lose()
    c = harness.connect(harness.implicit)
    assert c.send("AUTH PLAIN") == b"+ \r\n"
    assert c.send("*") == b"-ERR Authentication cancelled\r\n"
    assert c.send("AUTH plain") == b"+ \r\n"
    assert c.send(b64(b"\0bob\0" + PASSWORD.encode())).startswith(b"+OK bob has 2")


def test_auth_login_and_listing_mechanisms(harness):
    """AUTH with no argument lists the mechanisms; LOGIN asks name then password."""
    c = harness.connect(harness.implicit)
    assert c.lines("AUTH") == [b"+OK Supported mechanisms follow", b"SCRAM-SHA-256", b"PLAIN", b"LOGIN", b"."]
    assert c.send("AUTH GSSAPI") == b"-ERR Unsupported SASL mechanism\r\n"
    assert c.send("AUTH LOGIN") == b"+ " + b64(b"Username:").encode() + b"\r\n"
    assert c.send(b64(b"bob")) == b"+ " + b64(b"Password:").encode() + b"\r\n"
    assert c.send(b64(PASSWORD.encode())).startswith(b"+OK bob has 2")


@pytest.mark.parametrize("password, good", [(PASSWORD, True), ("wrong", False)])
def test_auth_scram_sha256(harness, password, good):
    """SCRAM-SHA-256 against the stored keys: server-first, then v=signature,
    an empty line, +OK; a wrong password gets -ERR [AUTH] and no signature."""
    c = harness.connect(harness.implicit)
    bare = "n=bob,r=rOprNGfwEbeRWgbNEkqO"
    out = c.send("AUTH SCRAM-SHA-256 " + b64(f"n,,{bare}".encode()))
    server_first = base64.b64decode(out[2:].strip()).decode()
    assert out.startswith(b"+ ") and server_first.startswith("r=rOprNGfwEbeRWgbNEkqO")
    out = c.send(b64(scram_client_final(password, bare, server_first).encode()))
    if good:
        assert base64.b64decode(out[2:].strip()).startswith(b"v=")
        assert c.send("").startswith(b"+OK bob has 2")
    else:
        assert out == b"-ERR [AUTH] Authentication failed\r\n"


def test_failed_logins_are_delayed_then_the_address_is_refused(tmp_path):
    """Like SMTP AUTH: each -ERR [AUTH] waits longer (1 s, 2 s); the third
    failure closes the connection; a new one from that address is refused at
    PASS, another address is not."""
    h = Harness(tmp_path, max_failures=3, delay=1.0)
    c = h.connect(h.implicit)
    c.send("USER bob")
    assert c.send("PASS nope") == b""
    h.clock.advance(1)
    assert c.take() == b"-ERR [AUTH] Authentication failed\r\n"
    assert c.send("AUTH PLAIN " + b64(b"\0bob\0nope")) == b""
    h.clock.advance(2)
    assert c.take() == b"-ERR [AUTH] Authentication failed\r\n"
    c.send("USER bob")
    assert c.send("PASS still-wrong").startswith(b"-ERR [SYS/TEMP] Too many failed logins")
    assert c.transport.disconnecting
    again = h.connect(h.implicit)
    again.send("USER bob")
    assert again.send(f"PASS {PASSWORD}").startswith(b"-ERR [SYS/TEMP] Too many failed logins")
    other = h.connect(h.implicit, client="198.51.100.1")
    assert other.login().startswith(b"+OK bob has 0 messages")


def test_plaintext_allowed_by_config(tmp_path):
    """allow_plaintext_without_tls: USER and SASL are offered and work before TLS (STLS still offered)."""
    h = Harness(tmp_path, plaintext=True)
    c = h.connect()
    capa = c.lines("CAPA")
    assert b"USER" in capa and b"STLS" in capa and any(line.startswith(b"SASL ") for line in capa)
    assert c.login().startswith(b"+OK bob has 0 messages")


def test_bad_commands_get_a_clear_error_and_the_session_goes_on(harness):
    """Workaround 1: bad arguments never kill the connection; DELE 0 is not
    'the last message' (workaround 4); bare LF is refused; APOP is not offered."""
    c = harness.connect(harness.implicit)
    assert c.send("USER") == b"-ERR Usage: USER name\r\n"
    assert c.send("APOP bob 0123456789abcdef").startswith(b"-ERR APOP is not supported")
    assert c.send("FROB") == b"-ERR Unknown command FROB\r\n"
    assert c.send(b"\xff\xfe") == b"-ERR Unknown command\r\n"
    assert c.send(b"USER bob\nPASS x") == b"-ERR Bare CR or LF in command line\r\n"
    c.login()
    assert c.send("RETR x") == b"-ERR A message number is needed\r\n"
    assert c.send("RETR") == b"-ERR A message number is needed\r\n"
    assert c.send("DELE 0") == b"-ERR No such message: 0\r\n"
    assert c.send("DELE 3") == b"-ERR No such message: 3\r\n"
    assert c.send("TOP 1") == b"-ERR Usage: TOP message-number lines\r\n"
    assert c.send("STAT now") == b"-ERR STAT takes no argument\r\n"
    assert c.send("USER bob") == b"-ERR USER is not allowed after login\r\n"
    assert c.send("NOOP") == b"+OK \r\n"
    assert c.send("QUIT").startswith(b"+OK mx.test POP3 server signing off (0 messages deleted)")
    c.lose()
    assert len(os.listdir(harness.store.path + "/bob/cur")) == 2


def test_pipelined_commands_are_answered_in_order(harness):
    """rfc2449 6.6 PIPELINING: several commands in one write, a RETR among them."""
    c = harness.connect(harness.implicit)
    out = c.send(b"USER bob\r\nPASS " + PASSWORD.encode() + b"\r\nSTAT\r\nRETR 2\r\nDELE 1\r\nQUIT\r\n", raw=True)
    replies = out.split(b"\r\n")
    assert replies[0] == b"+OK Send PASS" and replies[1].startswith(b"+OK bob has 2")
    assert replies[2].startswith(b"+OK 2 ") and replies[3].startswith(b"+OK %d octets" % len(wire(stored(SECOND))))
    assert out.endswith(b"\r\n.\r\n+OK Message 1 deleted\r\n+OK mx.test POP3 server signing off (1 messages deleted)\r\n")


def test_autologout_timer_closes_without_update(harness):
    """rfc1939 3: after the idle timeout the connection is closed; DELE'd
    messages stay (no UPDATE)."""
    c = harness.connect(harness.implicit)
    c.login()
    c.send("DELE 1")
    harness.clock.advance(599)
    assert not c.transport.disconnecting
    harness.clock.advance(1)
    assert c.take().startswith(b"-ERR Autologout") and c.transport.disconnecting
    c.lose()
    assert len(os.listdir(harness.store.path + "/bob/cur")) == 2


@pytest.mark.parametrize("kind", ["maildir", "mbox"])
def test_large_message_with_dot_lines_streams_exactly(tmp_path, kind):
    """A message of many 16 KiB chunks whose lines all start with dots (so
    some start a chunk), and 'From ' lines: RETR streams it stuffed, exactly
    the stored bytes in wire form; its LIST size is the wire size; TOP works too."""
    h = Harness(tmp_path, kind)
    body = b"".join(b"." * (n % 7 + 1) + b"x" * (n % 50) + b"\r\n" + b"From line %d\r\n" % n for n in range(3000))
    message = b"Subject: big\r\n\r\n" + body
    deliver(h.store, message)
    c = h.connect(h.implicit)
    c.login()
    assert c.send("LIST 1") == b"+OK 1 %d\r\n" % len(wire(stored(message)))
    retr = c.send("RETR 1")
    assert retr == b"+OK %d octets\r\n" % len(wire(stored(message))) + stuffed(wire(stored(message)))
    top = c.send("TOP 1 2")
    assert top.endswith(b"Subject: big\r\n\r\n..\r\nFrom line 0\r\n.\r\n")


def test_mbox_session_over_pop3(tmp_path):
    """The mbox store through the protocol: RETR gives the original bytes
    (>From quoting undone), DELE + QUIT rewrites the file without it."""
    h = Harness(tmp_path, "mbox")
    deliver(h.store, FIRST)
    deliver(h.store, SECOND)
    c = h.connect(h.implicit)
    assert c.login().startswith(b"+OK bob has 2 messages")
    retr = c.send("RETR 2")
    assert retr == b"+OK %d octets\r\n" % len(wire(stored(SECOND))) + stuffed(wire(stored(SECOND)))
    assert b"\r\nFrom here on, mbox would quote this.\r\n>From there too.\r\n" in retr
    c.send("DELE 1")
    assert c.send("QUIT").endswith(b"(1 messages deleted)\r\n")
    c.lose()
    data = (tmp_path / "mail" / "bob").read_bytes()
    assert data.startswith(b"From alice@example.test ") and data.count(b"\nFrom ") == 0
    assert b"Subject: two" in data and b"Subject: one" not in data


def test_connection_limits(harness):
    """Connections per client address are capped over both listeners."""
    harness.factory.connections.per_client.limit = 2
    a, b = harness.connect(), harness.connect(harness.implicit)
    third = harness.connect()
    assert third.greeting.startswith(b"-ERR [SYS/TEMP] Too many connections from your address")
    assert third.transport.disconnecting
    a.lose()
    assert harness.connect().greeting.startswith(b"+OK")
    b.lose()


def test_realm_and_mailbox_provide_twisted_interfaces(harness):
    """The realm is an IRealm for POP3 mailboxes only; the avatar is a twisted.mail.pop3.IMailbox; deleted messages have size 0
    there (its contract); out-of-range indexes raise ValueError."""
    realm = MailboxRealm(harness.store, defer.maybeDeferred)
    verifyObject(IRealm, realm)
    with pytest.raises(NotImplementedError):
        realm.requestAvatar("bob", None, IMailUser)
    d = realm.requestAvatar("bob", None, twisted_pop3.IMailbox)
    interface, mailbox, logout = d.result
    assert interface is twisted_pop3.IMailbox and isinstance(mailbox, POP3Mailbox)
    verifyObject(twisted_pop3.IMailbox, mailbox)
    mailbox.deleteMessage(0)
    assert mailbox.listMessages()[0] == 0 and mailbox.listMessages(1) > 0
    with pytest.raises(ValueError):
        mailbox.getUidl(2)
    logout()


# ---------------------------------------------------------------- config and start-up


def test_pop3_config_defaults_and_errors(tmp_path):
    """[pop3]: off by default; keys read and checked, naming the key."""
    path = tmp_path / "etc" / "mailsvc.toml"
    path.parent.mkdir()
    path.write_text("")
    cfg = config.load(path)
    assert not cfg.pop3.enabled and cfg.pop3.idle_timeout == 600
    assert cfg.pop3.plaintext_allowed(cfg.auth) is False
    path.write_text('[pop3]\nlisten = ["tcp:1110"]\nallow_plaintext_without_tls = true\n')
    cfg = config.load(path)
    assert cfg.pop3.enabled and cfg.pop3.plaintext_allowed(cfg.auth)
    for text, message in [
        ('[pop3]\nlisten = ["nonsense:1"]', '[pop3] listen[0]: not a valid endpoint: "nonsense:1"'),
        ('[pop3]\nlisten_implicit_tls = ["ssl:995"]', "[pop3] listen_implicit_tls[0]: give a plain endpoint"),
        ("[pop3]\nidle_timeout = 60", "[pop3] idle_timeout: rfc1939 3 wants at least 600 seconds"),
        ("[pop3]\nallow_plaintext = true", "[pop3] allow_plaintext: unknown key (did you mean allow_plaintext_without_tls?)"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=__import__("re").escape(message)):
            config.load(path)


def test_shipped_config_serves_pop3_on_loopback():
    """etc/mailsvc.toml (make run) turns POP3 on at 127.0.0.1:2110 (STLS) and 2995 (implicit TLS)."""
    cfg = config.load("etc/mailsvc.toml")
    assert cfg.pop3.listen == ("tcp:2110:interface=127.0.0.1",)
    assert cfg.pop3.listen_implicit_tls == ("tcp:2995:interface=127.0.0.1",)


def test_a_store_without_read_access_stops_start_up(tmp_path):
    """A third-party store lacking IMailboxAccess cannot be served: with POP3
    on, start-up stops naming [pop3] listen; with POP3 off, nothing is built."""
    path = tmp_path / "etc" / "mailsvc.toml"
    path.parent.mkdir()
    path.write_text('[store]\ntype = "custom"\n[pop3]\nlisten = ["tcp:1110"]\n')
    cfg = config.load(path)
    with pytest.raises(ConfigError, match=r"\[pop3\] listen: the 'custom' store cannot be read by POP3"):
        pop3_listeners(cfg, task.Clock(), object(), defer.maybeDeferred)
    path.write_text("")
    assert pop3_listeners(config.load(path), task.Clock(), object(), defer.maybeDeferred) == []
