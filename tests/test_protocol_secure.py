"""The Twisted glue for STARTTLS, AUTH and submission, in memory.

``StringTransport`` (with a recorded ``startTLS``), ``task.Clock``, a real
spool and password file on disk, the real ``twisted.cred`` portal.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import ipaddress

import pytest
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword
from twisted.cred.portal import IRealm
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from zope.interface.verify import verifyObject

from mailsvc import auth as authmod
from mailsvc.interfaces import IMailUser, ISASLVerifiedCredentials
from mailsvc.limits import AuthFailures
from mailsvc.passwords import PasswordFile, SecretsFile, make_entry, write_entry
from mailsvc.protocol import ConnectionPool, SMTPServerFactory
from mailsvc.receiver import ReceiverContext, ReceiverSettings
from mailsvc.smtp import sasl
from mailsvc.smtp.server import ServerSettings
from mailsvc.spool.filespool import FileSpool
from test_protocol import TableDirectory, lines

PASSWORD = "wonderland"
TLS_CONTEXT = object()  # the glue only hands it to transport.startTLS


class TLSStringTransport(StringTransport):
    """A StringTransport that records ``startTLS`` and what was written before it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tls_context = None
        self.written_before_tls = b""

    def startTLS(self, context):
        self.tls_context = context
        self.written_before_tls = self.value()


class Harness:
    """An MX factory and a submission factory sharing a pool, an authenticator and a spool."""

    def __init__(self, tmp_path, *, max_failures=3, failure_delay=1.0, per_client=0, max_errors=0, mx_auth=False,
                 require_sender_match=True, cram=True):
        self.clock = task.Clock()
        self.spool = FileSpool(tmp_path / "spool")
        self.submitted = []
        self.password_file = tmp_path / "passwd"
        write_entry(self.password_file, "alice", make_entry("alice", PASSWORD).line())
        secrets = None
        if cram:
            write_entry(tmp_path / "cram", "alice", f"alice:{PASSWORD}")
            secrets = SecretsFile(tmp_path / "cram")
        passwords = PasswordFile(self.password_file)
        self.failures = AuthFailures(self.clock, max_failures=max_failures, window=600, delay=failure_delay, max_delay=8)
        self.authenticator = authmod.Authenticator(
            authmod.make_portal(passwords, secrets, defer.maybeDeferred),
            passwords, "mx.test", ["example.test"], self.failures, self.clock, defer.maybeDeferred,
        )
        directory = TableDirectory(aliases={"team": ["alice", "bob"], "postmaster": ["alice"]})
        base = dict(directory=directory, spool=self.spool, submit=self.submitted.append,
                    run_blocking=defer.maybeDeferred, now=lambda: 1_790_000_000.0)
        mx_context = ReceiverContext(settings=ReceiverSettings(hostname="mx.test", default_domain="example.test"), **base)
        sub_context = ReceiverContext(
            settings=ReceiverSettings(hostname="mx.test", default_domain="example.test", submission=True,
                                      require_sender_match=require_sender_match),
            **base,
        )
        mechanisms = ("SCRAM-SHA-256", "PLAIN", "LOGIN") + (("CRAM-MD5",) if cram else ())
        mx_settings = ServerSettings("mx.test", max_message_size=10_000, starttls=True,
                                     auth_mechanisms=mechanisms if mx_auth else (), max_errors=max_errors)
        sub_settings = ServerSettings("mx.test", max_message_size=10_000, starttls=True, auth_mechanisms=mechanisms,
                                      auth_required=True, max_errors=max_errors)
        self.pool = ConnectionPool(max_connections=100, max_per_client=per_client)
        common = dict(clock=self.clock, pool=self.pool, authenticator=self.authenticator)
        self.mx = SMTPServerFactory(mx_context, mx_settings, tls=TLS_CONTEXT, **common)
        self.submission = SMTPServerFactory(sub_context, sub_settings, tls=TLS_CONTEXT, **common)
        self.implicit = SMTPServerFactory(sub_context, ServerSettings(
            "mx.test", max_message_size=10_000, auth_mechanisms=mechanisms, auth_required=True), implicit_tls=True, **common)

    def connect(self, factory, host="192.0.2.7"):
        proto = factory.buildProtocol(None)
        transport = TLSStringTransport(peerAddress=IPv4Address("TCP", host, 40000),
                                       hostAddress=IPv4Address("TCP", "127.0.0.1", 587))
        proto.makeConnection(transport)
        transport.clear()
        return proto, transport


def talk(proto, transport, data: bytes) -> str:
    proto.dataReceived(data)
    out = transport.value().decode()
    transport.clear()
    return out


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def tls_session(h, factory=None):
    """A submission connection after EHLO, STARTTLS (recorded) and EHLO again."""
    proto, t = h.connect(factory or h.submission)
    talk(proto, t, b"EHLO c.test\r\nSTARTTLS\r\n")
    assert t.tls_context is TLS_CONTEXT
    return proto, t


PLAIN_OK = b"AUTH PLAIN " + b64(b"\0alice\0" + PASSWORD.encode()) + b"\r\n"
PLAIN_BAD = b"AUTH PLAIN " + b64(b"\0alice\0nope") + b"\r\n"


# ------------------------------------------------------------------ STARTTLS


def test_starttls_writes_220_in_clear_then_switches(tmp_path):
    """The 220 is written before startTLS; input pipelined after STARTTLS is
    never answered (rfc3207 4.2, CVE-2011-0411); SessionInfo.tls is set."""
    h = Harness(tmp_path)
    proto, t = h.connect(h.submission)
    out = talk(proto, t, b"EHLO c.test\r\nSTARTTLS\r\nRSET\r\nMAIL FROM:<alice@example.test>\r\n")
    assert t.written_before_tls.endswith(b"220 2.0.0 Ready to start TLS\r\n")
    assert lines(out)[-1] == "220 2.0.0 Ready to start TLS"
    assert proto.session.info.tls and proto.session.info.helo == ""
    assert talk(proto, t, b"NOOP\r\n") == "250 2.0.0 Ok\r\n"


def test_auth_is_offered_only_after_tls(tmp_path):
    """Submission: no AUTH in EHLO and 538 before STARTTLS; AUTH listed after it."""
    h = Harness(tmp_path)
    proto, t = h.connect(h.submission)
    out = talk(proto, t, b"EHLO c.test\r\n")
    assert "250-STARTTLS" in lines(out) and not [l for l in lines(out) if "AUTH" in l]
    assert talk(proto, t, PLAIN_OK).startswith("538 5.7.11 ")
    talk(proto, t, b"STARTTLS\r\n")
    out = talk(proto, t, b"EHLO c.test\r\n")
    assert "250-AUTH SCRAM-SHA-256 PLAIN LOGIN CRAM-MD5" in lines(out) and "250-STARTTLS" not in lines(out)


def test_mx_without_auth_offers_starttls_and_refuses_relay(tmp_path):
    """The MX listener: STARTTLS, no AUTH (502), and no relaying even over TLS."""
    h = Harness(tmp_path)
    proto, t = h.connect(h.mx)
    talk(proto, t, b"EHLO c.test\r\nSTARTTLS\r\n")
    out = talk(proto, t, b"EHLO c.test\r\n" + PLAIN_OK + b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@far.test>\r\n")
    assert lines(out)[-3:] == ["502 5.5.1 AUTH not implemented", "250 2.1.0 Sender ok",
                               "550 5.7.1 <x@far.test>: relay access denied"]


# ------------------------------------------------------------------ AUTH


def test_submission_needs_auth_then_relays_with_esmtpsa(tmp_path):
    """530 before AUTH; after AUTH PLAIN the user sends to a foreign domain;
    the Received line says ESMTPSA (rfc3848) and Date/Message-ID are added (rfc6409 8)."""
    h = Harness(tmp_path)
    proto, t = tls_session(h)
    assert talk(proto, t, b"EHLO c.test\r\nMAIL FROM:<alice@example.test>\r\n").endswith("530 5.7.0 Authentication required\r\n")
    assert talk(proto, t, PLAIN_OK) == "235 2.7.0 Authentication successful\r\n"
    assert proto.session.info.user == "alice"
    out = talk(proto, t, b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<x@far.test>\r\nDATA\r\nSubject: hi\r\n\r\nbody\r\n.\r\n")
    assert lines(out)[-1].startswith("250 2.0.0 Ok: queued as ")
    [queued] = h.spool.queued()
    assert queued.hop == "relay"
    received, *added = queued.envelope.prepend_headers
    assert " with ESMTPSA id " in received
    assert [header.split(":")[0] for header in added] == ["Date", "Message-ID"]
    assert added[1].endswith("@mx.test>") and queued.id in added[1]


def test_existing_date_and_message_id_are_kept(tmp_path):
    """rfc6409 8: only missing fields are added; fields in any case count."""
    h = Harness(tmp_path)
    proto, t = tls_session(h)
    talk(proto, t, b"EHLO c\r\n" + PLAIN_OK)
    talk(proto, t, b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
                   b"DATE: Mon, 1 Jan 2024 00:00:00 +0000\r\nmessage-id: <x@y>\r\n\r\nDate: in the body\r\n.\r\n")
    [queued] = h.spool.queued()
    assert len(queued.envelope.prepend_headers) == 1


def test_mx_messages_get_no_fix_ups(tmp_path):
    """Only submission adds Date/Message-ID; the MX passes messages as they are."""
    h = Harness(tmp_path)
    proto, t = h.connect(h.mx)
    talk(proto, t, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
    [queued] = h.spool.queued()
    assert len(queued.envelope.prepend_headers) == 1 and " with ESMTP id " in queued.envelope.prepend_headers[0]


@pytest.mark.parametrize(
    "sender, expected",
    [
        ("alice@example.test", "250"),
        ("ALICE@example.test", "250"),
        ("team@example.test", "250"),  # an alias that includes alice
        ("bob@example.test", "553"),
        ("alice@elsewhere.test", "553"),
        ("", "553"),
    ],
)
def test_sender_must_be_the_users_own(tmp_path, sender, expected):
    """rfc6409 6.1 (require_sender_match): 553 5.7.1 for an address the user does not own."""
    h = Harness(tmp_path)
    proto, t = tls_session(h)
    talk(proto, t, b"EHLO c\r\n" + PLAIN_OK)
    out = talk(proto, t, f"MAIL FROM:<{sender}>\r\n".encode())
    assert out[:3] == expected, out
    if expected == "553":
        assert out.startswith("553 5.7.1 ")


def test_sender_match_can_be_turned_off(tmp_path):
    """require_sender_match = false: any sender after AUTH."""
    h = Harness(tmp_path, require_sender_match=False)
    proto, t = tls_session(h)
    talk(proto, t, b"EHLO c\r\n" + PLAIN_OK)
    assert talk(proto, t, b"MAIL FROM:<bob@example.test>\r\n").startswith("250 ")


def test_auth_login_and_user_at_domain(tmp_path):
    """LOGIN with the user name written as alice@example.test."""
    h = Harness(tmp_path)
    proto, t = tls_session(h)
    talk(proto, t, b"EHLO c\r\n")
    assert talk(proto, t, b"AUTH LOGIN\r\n") == "334 VXNlcm5hbWU6\r\n"
    assert talk(proto, t, b64(b"alice@example.test") + b"\r\n") == "334 UGFzc3dvcmQ6\r\n"
    assert talk(proto, t, b64(PASSWORD.encode()) + b"\r\n").startswith("235 ")
    assert proto.session.info.user == "alice"


def test_auth_cram_md5_through_the_portal(tmp_path):
    """CRAM-MD5: the challenge is <random.time@mx.test>; the answer is checked with the secrets file."""
    h = Harness(tmp_path)
    proto, t = tls_session(h)
    talk(proto, t, b"EHLO c\r\n")
    out = talk(proto, t, b"AUTH CRAM-MD5\r\n")
    challenge = base64.b64decode(out[4:].strip())
    assert challenge.startswith(b"<") and challenge.endswith(b"@mx.test>")
    digest = hmac.new(PASSWORD.encode(), challenge, hashlib.md5).hexdigest()
    assert talk(proto, t, b64(f"alice {digest}".encode()) + b"\r\n").startswith("235 ")


def scram_client_final(password: str, client_first_bare: str, server_first: str) -> str:
    """What an rfc5802 client answers to ``server_first``."""
    attributes = dict(part.split("=", 1) for part in server_first.split(","))
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attributes["s"]), int(attributes["i"]))
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    without_proof = f"c=biws,r={attributes['r']}"
    auth_message = f"{client_first_bare},{server_first},{without_proof}".encode()
    signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature))
    return f"{without_proof},p={base64.b64encode(proof).decode()}"


@pytest.mark.parametrize("password, expected", [(PASSWORD, "235"), ("wrong", "535")])
def test_auth_scram_sha256_through_the_portal(tmp_path, password, expected):
    """SCRAM-SHA-256 against the keys in the password file: 334 server-first,
    334 v=signature, empty line, 235; a wrong password gets 535 and no signature."""
    h = Harness(tmp_path, failure_delay=0)
    proto, t = tls_session(h)
    talk(proto, t, b"EHLO c\r\n")
    bare = "n=alice,r=fyko+d2lbbFgONRv9qkxdawL"
    out = talk(proto, t, b"AUTH SCRAM-SHA-256 " + b64(f"n,,{bare}".encode()) + b"\r\n")
    server_first = base64.b64decode(out[4:].strip()).decode()
    assert server_first.startswith("r=fyko+d2lbbFgONRv9qkxdawL") and ",i=4096" in server_first
    out = talk(proto, t, b64(scram_client_final(password, bare, server_first).encode()) + b"\r\n")
    if expected == "235":
        assert base64.b64decode(out[4:].strip()).startswith(b"v=")
        out = talk(proto, t, b"=\r\n")
    assert out[:3] == expected


def test_authzid_of_another_user_fails(tmp_path):
    """PLAIN with an authzid naming someone else: no proxy logins (535)."""
    h = Harness(tmp_path, failure_delay=0)
    proto, t = tls_session(h)
    talk(proto, t, b"EHLO c\r\n")
    assert talk(proto, t, b"AUTH PLAIN " + b64(b"bob\0alice\0" + PASSWORD.encode()) + b"\r\n").startswith("535 5.7.8")
    assert talk(proto, t, b"AUTH PLAIN " + b64(b"alice@example.test\0alice\0" + PASSWORD.encode()) + b"\r\n").startswith("235")


def test_failed_auth_is_delayed_then_421(tmp_path):
    """Each 535 waits longer (1 s, 2 s); the third failure from the address gets
    421 4.7.0 and the close; a new connection is refused AUTH at once."""
    h = Harness(tmp_path, max_failures=3, failure_delay=1.0)
    proto, t = tls_session(h)
    talk(proto, t, b"EHLO c\r\n")
    assert talk(proto, t, PLAIN_BAD) == ""  # held back
    assert t.producerState == "paused"
    h.clock.advance(1)
    assert t.value().startswith(b"535 5.7.8 ")
    t.clear()
    assert talk(proto, t, PLAIN_BAD) == ""
    h.clock.advance(1.5)
    assert t.value() == b""
    h.clock.advance(0.5)
    assert t.value().startswith(b"535 5.7.8 ")
    t.clear()
    out = talk(proto, t, PLAIN_BAD)
    assert out == "421 4.7.0 Too many failed authentication attempts; try again later\r\n" and t.disconnecting
    proto2, t2 = tls_session(h)
    assert talk(proto2, t2, b"EHLO c\r\n" + PLAIN_OK).endswith("421 4.7.0 Too many failed authentication attempts; try again later\r\n")
    other, t3 = h.connect(h.submission, host="192.0.2.99")  # another address is not affected
    talk(other, t3, b"EHLO c\r\nSTARTTLS\r\n")
    assert talk(other, t3, b"EHLO c\r\n" + PLAIN_OK).endswith("235 2.7.0 Authentication successful\r\n")


def test_failures_age_out(tmp_path):
    """After the window, an address may try again."""
    h = Harness(tmp_path, max_failures=1, failure_delay=0)
    proto, t = tls_session(h)
    assert talk(proto, t, b"EHLO c\r\n" + PLAIN_BAD).endswith("421 4.7.0 Too many failed authentication attempts; try again later\r\n")
    h.clock.advance(601)
    proto, t = tls_session(h)
    assert talk(proto, t, b"EHLO c\r\n" + PLAIN_OK).endswith("235 2.7.0 Authentication successful\r\n")


def test_implicit_tls_listener_starts_with_tls(tmp_path):
    """rfc8314: no STARTTLS offered, AUTH offered at once, sessions count as TLS (ESMTPSA)."""
    h = Harness(tmp_path)
    proto, t = h.connect(h.implicit)
    out = talk(proto, t, b"EHLO c\r\n")
    assert "250-STARTTLS" not in lines(out) and any(l.startswith("250-AUTH ") for l in lines(out))
    assert proto.session.info.tls
    talk(proto, t, PLAIN_OK + b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<x@far.test>\r\nDATA\r\nx\r\n.\r\n")
    [queued] = h.spool.queued()
    assert " with ESMTPSA " in queued.envelope.prepend_headers[0]


def test_connections_per_client_are_capped_across_listeners(tmp_path):
    """max_per_client counts every listener: the third gets 421 4.7.0; others are not affected."""
    h = Harness(tmp_path, per_client=2)
    h.connect(h.mx)
    h.connect(h.submission)
    proto = h.submission.buildProtocol(None)
    t = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 1), hostAddress=IPv4Address("TCP", "127.0.0.1", 587))
    proto.makeConnection(t)
    assert t.value() == b"421 4.7.0 Too many connections from your address; try again later\r\n" and t.disconnecting
    proto.connectionLost(None)
    assert h.pool.per_client.count("192.0.2.7") == 2
    h.connect(h.mx, host="192.0.2.8")
    assert h.pool.per_client.count("192.0.2.8") == 1


def test_error_limit_closes_through_the_glue(tmp_path):
    """max_errors bad commands: 421 4.7.0 and the connection is closed."""
    h = Harness(tmp_path, max_errors=2)
    proto, t = h.connect(h.mx)
    out = talk(proto, t, b"BOGUS\r\nBOGUS\r\nNOOP\r\n")
    assert lines(out) == ["500 5.5.2 Command unrecognized: BOGUS", "500 5.5.2 Command unrecognized: BOGUS",
                          "421 4.7.0 Too many errors; closing connection"]
    assert t.disconnecting


def test_mx_with_auth_lets_users_relay(tmp_path):
    """[smtp] auth = true: an authenticated user may relay on the MX port too."""
    h = Harness(tmp_path, mx_auth=True)
    proto, t = tls_session(h, h.mx)
    out = talk(proto, t, b"EHLO c\r\n" + PLAIN_OK + b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@far.test>\r\n")
    assert lines(out)[-1] == "250 2.1.5 Recipient ok"


# ------------------------------------------------------------------ cred pieces


def test_cred_pieces_provide_their_interfaces(tmp_path):
    """verifyObject for the realm, the avatar, the checkers and the credentials."""
    passwords = PasswordFile(tmp_path / "none")
    assert verifyObject(IRealm, authmod.MailUserRealm())
    assert verifyObject(IMailUser, authmod.MailUser("alice"))
    for checker in (authmod.PasswordFileChecker(passwords, defer.maybeDeferred),
                    authmod.CramMD5Checker(None, defer.maybeDeferred), authmod.SASLVerifiedChecker()):
        assert verifyObject(ICredentialsChecker, checker)
    answer = sasl.CramMD5Credentials("tim", b"<1@x>", "0" * 32)
    assert verifyObject(IUsernameHashedPassword, authmod.CramMD5Answer("tim", answer))
    assert verifyObject(ISASLVerifiedCredentials, authmod.SASLVerified("tim", True))


def test_password_checker_reads_the_file_as_it_changes(tmp_path):
    """A password set after start works at the next AUTH (no restart); unknown users fail."""
    from twisted.cred.credentials import UsernamePassword
    from twisted.cred.error import UnauthorizedLogin

    path = tmp_path / "passwd"
    checker = authmod.PasswordFileChecker(PasswordFile(path), defer.maybeDeferred)
    failure = checker.requestAvatarId(UsernamePassword("bob", "pw"))
    assert isinstance(failure.result.value, UnauthorizedLogin)
    failure.addErrback(lambda f: None)
    write_entry(path, "bob", make_entry("bob", "pw").line())
    assert checker.requestAvatarId(UsernamePassword("bob", "pw")).result == "bob"
    wrong = checker.requestAvatarId(UsernamePassword("bob", "other"))
    assert isinstance(wrong.result.value, UnauthorizedLogin)
    wrong.addErrback(lambda f: None)


def test_passwd_command_writes_hashes_and_secrets(tmp_path):
    """``mailsvc passwd`` (mailsvc.passwd.main): hash in the password file, the
    secret in the CRAM-MD5 file when configured, mode 0600; unknown users 67."""
    from mailsvc import passwd

    config = tmp_path / "etc" / "mailsvc.toml"
    config.parent.mkdir()
    config.write_text('[auth]\npassword_file = "var/pw"\ncram_md5_secrets_file = "var/cram"\n'
                      'mechanisms = ["PLAIN", "CRAM-MD5"]\n')
    assert passwd.main(["alice", "--config", str(config), "--stdin"], stdin=io.StringIO("s3cret\n")) == 0
    pw = (tmp_path / "var" / "pw").read_text()
    assert pw.startswith("alice:$scrypt$ln=14,r=8,p=1$") and "s3cret" not in pw and ":$scram-sha-256$4096$" in pw
    assert (tmp_path / "var" / "cram").read_text() == "alice:s3cret\n"
    assert (tmp_path / "var" / "pw").stat().st_mode & 0o777 == 0o600
    assert PasswordFile(tmp_path / "var" / "pw").lookup("ALICE").name == "alice"
    assert passwd.main(["mallory", "--config", str(config), "--stdin"], stdin=io.StringIO("x\n")) == 67
    def answers(*typed):
        it = iter(typed)
        return lambda prompt: next(it)

    assert passwd.main(["bob", "--config", str(config)], prompt=answers("a", "b")) == 1
    assert passwd.main(["bob", "--config", str(config), "--stdin"], stdin=io.StringIO("\n")) == 1
    assert passwd.main(["bob", "--config", str(config)], prompt=answers("pw2", "pw2")) == 0
    assert passwd.main(["alice", "--config", str(config), "--delete"]) == 0
    assert [line.split(":")[0] for line in (tmp_path / "var" / "pw").read_text().splitlines()] == ["bob"]
    assert (tmp_path / "var" / "cram").read_text() == "bob:pw2\n"


def test_trusted_network_still_relays(tmp_path):
    """The old rule stands: a trusted network relays on the MX without AUTH."""
    h = Harness(tmp_path)
    h.mx.context.settings = ReceiverSettings(hostname="mx.test", trusted_networks=(ipaddress.ip_network("192.0.2.0/24"),))
    proto, t = h.connect(h.mx)
    out = talk(proto, t, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@far.test>\r\n")
    assert lines(out)[-1] == "250 2.1.5 Recipient ok"
