"""The relay agent's STARTTLS, AUTH and BDAT.

In memory first (``tests/test_relay_agent.py``'s network of ``iosim`` pumps
and scripted peers): BDAT framing and flow control, AUTH PLAIN and LOGIN,
the refusals that need no TLS, and ``ca_file`` in the config.

Then real sockets on 127.0.0.1 (trial test cases, so the reactor runs): our
own server glue with STARTTLS (and a submission listener with AUTH) as the
peer, certificates from a throwaway trustme CA; the agent's connector sends
every host name to 127.0.0.1, so the certificate is checked for the route's
name while the bytes go to the loopback. Every listener and connection is
closed at the end; every test is bounded by trial's ``timeout``.
"""

from __future__ import annotations

import base64
import dataclasses
import shutil
import tempfile
from pathlib import Path

import pytest
import trustme
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import TestCase

from mailsvc import auth as authmod
from mailsvc import config as configuration
from mailsvc.relayconfig import RelayConfig, RouteConfig
from mailsvc.delivery.relay import RelayAgent
from mailsvc.envelope import Delivered, Envelope, Recipient
from mailsvc.errors import ConfigError, PermanentDeliveryError, TemporaryDeliveryError
from mailsvc.limits import AuthFailures
from mailsvc.passwords import PasswordFile, make_entry, write_entry
from mailsvc.protocol import SMTPServerFactory
from mailsvc.receiver import ReceiverContext, ReceiverSettings
from mailsvc.smtp.client import ClientSettings
from mailsvc.smtp.server import ServerSettings
from mailsvc.spool.filespool import FileSpool
from mailsvc.tls import ClientTLSContext, ServerTLSContext, TLSError, self_signed
from test_relay_agent import HEADERS, NOW, FakeMX, Peer, PeerDirectory, Relay, Scripted, ScriptedPeer, result_of

RELAYED = Delivered.RELAYED
PASSWORD = "sesame-открой"
TIMEOUT = 30


# ================================================================ in memory: BDAT


class ChunkingPeer(ScriptedPeer):
    """A scripted peer that takes BDAT (rfc3030): "BDAT n [LAST]" then n
    octets; each chunk is answered 250 (or ``bdat_refusal`` for the chunk
    numbered ``refuse_chunk``); records the chunk sizes and the message."""

    def __init__(self, script):
        super().__init__(script)
        self.need = 0
        self.last = False
        self.body = b""
        self.chunk_no = 0

    def dataReceived(self, data):
        self.buffer += data
        while True:
            if self.need:
                piece, self.buffer = self.buffer[: self.need], self.buffer[self.need :]
                self.body += piece
                self.need -= len(piece)
                if self.need:
                    return
                self._chunk_done()
                continue
            if b"\r\n" not in self.buffer:
                return
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            text = line.decode()
            self.script.setdefault("commands", []).append(text)
            if text.upper() in ("RSET",) or text.upper().startswith("MAIL "):
                self.body, self.failed, self.chunk_no = b"", False, 0  # rfc5321 4.1.1.5
            if text.upper().startswith("BDAT "):
                words = text.split()
                self.need, self.last = int(words[1]), len(words) > 2 and words[2].upper() == "LAST"
                self.script.setdefault("chunks", []).append(self.need)
                if not self.need:
                    self._chunk_done()
                continue
            self.transport.write(self.answer(text) + b"\r\n")

    def _chunk_done(self):
        self.chunk_no += 1
        if self.chunk_no == self.script.get("refuse_chunk"):
            self.transport.write(self.script.get("bdat_refusal", b"552 5.3.4 too big") + b"\r\n")
            self.failed = True
        elif getattr(self, "failed", False):
            self.transport.write(b"503 5.5.1 transaction failed\r\n")
        elif self.last:
            self.script.setdefault("messages", []).append(self.body)
            self.transport.write(b"250 2.0.0 queued\r\n")
        else:
            self.transport.write(b"250 2.0.0 chunk taken\r\n")
        if self.last:
            self.body, self.failed, self.chunk_no, self.mail = b"", False, 0, False


class Chunking(Scripted):
    def buildProtocol(self, addr):
        return ChunkingPeer(self.script)


def big_message(size: int) -> bytes:
    """Headers, then lines (some starting with a dot) up to about ``size`` octets."""
    line = b".a line that starts with a dot and must not be stuffed with BDAT\r\n"
    return HEADERS + line * (size // len(line))


@pytest.mark.parametrize("pipelining", [True, False])
def test_bdat_five_megabytes_byte_exact(tmp_path, pipelining):
    """A peer offering CHUNKING gets the message in 64 KiB BDAT chunks, the
    last with LAST, no dot-stuffing, byte for byte; without PIPELINING each
    chunk waits for its 250 (the body producer stops and starts again)."""
    relay = Relay(tmp_path)
    extensions = ["SIZE 100000000", "8BITMIME", "CHUNKING"] + (["PIPELINING"] if pipelining else [])
    script = relay.net.add("192.0.2.25", 25, Chunking(extensions=extensions)).script
    message = relay.queue(big_message(5_000_000))
    assert result_of(relay.deliver(message)) == {"alice@remote.test": RELAYED}
    assert script["messages"] == [relay.wire(message)]
    size = len(relay.wire(message))
    assert sum(script["chunks"]) == size and max(script["chunks"]) == 64 * 1024
    assert script["commands"][-1].endswith(" LAST") and "DATA" not in script["commands"]
    assert relay.net.clients[0].largest <= 64 * 1024 + 64  # one chunk at a time, never the whole


def test_bdat_to_our_server_glue(tmp_path):
    """Our real server glue with CHUNKING (over a FileSpool) takes a 3 MB
    message in BDAT chunks from our relay agent, byte for byte."""
    relay = Relay(tmp_path)
    peer = Peer(tmp_path / "peer", relay.clock)
    peer.factory.server_settings = dataclasses.replace(peer.factory.server_settings, chunking=True)
    relay.net.add("192.0.2.25", 25, peer)
    message = relay.queue(big_message(3_000_000))
    assert result_of(relay.deliver(message)) == {"alice@remote.test": Delivered.PASSED_ON}
    [(_, data)] = peer.received()
    assert data == relay.wire(message)
    assert relay.net.clients[0].largest <= 64 * 1024 + 64


def test_bdat_refused_chunk_fails_the_recipients_and_the_next_message_resets(tmp_path):
    """A 552 to the second chunk fails the message for its recipients with the
    peer's words; the connection carries the next message after RSET."""
    relay = Relay(tmp_path)
    script = relay.net.add("192.0.2.25", 25, Chunking(
        extensions=["PIPELINING", "CHUNKING", "SIZE 100000000"], refuse_chunk=2)).script
    message = relay.queue(big_message(300_000))
    error = result_of(relay.deliver(message))["alice@remote.test"]
    assert isinstance(error, PermanentDeliveryError)
    assert str(error) == "5.3.4 host mx.remote.test said: 552 5.3.4 too big"
    script["refuse_chunk"] = None
    second = relay.queue(HEADERS + b"small\r\n")
    assert result_of(relay.deliver(second)) == {"alice@remote.test": RELAYED}
    assert "RSET" in script["commands"] and len(relay.net.attempts) == 1
    assert script["messages"] == [relay.wire(second)]


# ================================================================ in memory: AUTH


class AuthPeer(ScriptedPeer):
    """A scripted peer that takes AUTH PLAIN (with an initial response) and
    LOGIN; ``password`` is the one it accepts; ``auth_log`` records what it
    decoded."""

    def dataReceived(self, data):
        if getattr(self, "login", None) is not None and not self.in_data:
            self.buffer += data
            while b"\r\n" in self.buffer and self.login is not None:
                line, self.buffer = self.buffer.split(b"\r\n", 1)
                self.login.append(base64.b64decode(line).decode())
                if len(self.login) == 1:
                    self.transport.write(b"334 UGFzc3dvcmQ6\r\n")
                else:
                    self.transport.write(self._verdict("LOGIN", *self.login) + b"\r\n")
                    self.login = None
            rest, self.buffer = self.buffer, b""
            if rest:
                super().dataReceived(rest)
            return
        super().dataReceived(data)

    def answer(self, line):
        words = line.split()
        if words[0].upper() == "AUTH" and words[1].upper() == "PLAIN":
            _, user, password = base64.b64decode(words[2]).decode().split("\0")
            return self._verdict("PLAIN", user, password)
        if words[0].upper() == "AUTH" and words[1].upper() == "LOGIN":
            self.login = []
            return b"334 VXNlcm5hbWU6"
        return super().answer(line)

    def _verdict(self, mechanism, user, password):
        self.script.setdefault("auth_log", []).append((mechanism, user, password))
        if password == self.script.get("password", PASSWORD):
            return b"235 2.7.0 Authentication successful"
        return b"535 5.7.8 Authentication credentials invalid"


class Auth(Scripted):
    def buildProtocol(self, addr):
        return AuthPeer(self.script)


def auth_relay(tmp_path, extensions, **route):
    """A relay whose smarthost smart.test:587 needs AUTH as "us" (tls none:
    the scripted peer has no TLS, and clear text is said explicitly)."""
    password = tmp_path / "smarthost.password"
    password.write_text(PASSWORD + "\n")
    options = dict(domain="*", host="smart.test", port=587, tls="none", username="us", password_file=password)
    options.update(route)
    relay = Relay(tmp_path / "relay", smarthost=RouteConfig(**options))
    script = relay.net.add("smart.test", 587, Auth(extensions=extensions)).script
    return relay, script


@pytest.mark.parametrize(("offered", "mechanism"), [("AUTH PLAIN LOGIN", "PLAIN"), ("AUTH LOGIN", "LOGIN")])
def test_auth_to_the_smarthost(tmp_path, offered, mechanism):
    """AUTH PLAIN when offered, else LOGIN, with the password file's first
    line, before MAIL; then the message goes."""
    relay, script = auth_relay(tmp_path, ["PIPELINING", offered])
    message = relay.queue(HEADERS + b"x\r\n", recipients=("someone@far.test",))
    assert result_of(relay.deliver(message)) == {"someone@far.test": RELAYED}
    assert script["auth_log"] == [(mechanism, "us", PASSWORD)]
    commands = script["commands"]
    assert commands[1].startswith(f"AUTH {mechanism}") and commands[2].startswith("MAIL FROM:")


def test_auth_refused_defers_with_the_reply(tmp_path):
    """535 5.7.8: deferred (4.7.8, Postfix's soft bounce), the reply quoted;
    no MAIL is sent and the connection is left with QUIT."""
    relay, script = auth_relay(tmp_path, ["AUTH PLAIN"])
    script["password"] = "something else"
    message = relay.queue(HEADERS + b"x\r\n", recipients=("someone@far.test",))
    error = result_of(relay.deliver(message))["someone@far.test"]
    assert isinstance(error, TemporaryDeliveryError) and error.status == "4.7.8"
    assert error.text == "smart.test:587: AUTH PLAIN as us refused: 535 5.7.8 Authentication credentials invalid"
    assert not any(c.startswith("MAIL") for c in script["commands"]) and script["commands"][-1] == "QUIT"


def test_auth_not_offered_defers(tmp_path):
    """A smarthost that offers no AUTH PLAIN or LOGIN: 4.7.0, saying what it offers."""
    relay, script = auth_relay(tmp_path, ["PIPELINING", "AUTH CRAM-MD5"])
    message = relay.queue(HEADERS + b"x\r\n", recipients=("someone@far.test",))
    error = result_of(relay.deliver(message))["someone@far.test"]
    assert isinstance(error, TemporaryDeliveryError) and error.status == "4.7.0"
    assert error.text == "smart.test:587: AUTH PLAIN or LOGIN not offered (AUTH: CRAM-MD5)"


def test_unreadable_password_file_defers(tmp_path):
    """The password file gone since start-up: 4.3.5, nothing is dialled."""
    relay, _ = auth_relay(tmp_path, ["AUTH PLAIN"])
    (tmp_path / "smarthost.password").unlink()
    message = relay.queue(HEADERS + b"x\r\n", recipients=("someone@far.test",))
    error = result_of(relay.deliver(message))["someone@far.test"]
    assert isinstance(error, TemporaryDeliveryError) and error.status == "4.3.5"
    assert relay.net.attempts == []


class RefusesTLSPeer(ScriptedPeer):
    """Offers STARTTLS and answers it 454 (rfc3207 4: TLS not available)."""

    def answer(self, line):
        if line.upper() == "STARTTLS":
            return b"454 4.7.0 TLS not available due to temporary reason"
        return super().answer(line)


class RefusesTLS(Scripted):
    def buildProtocol(self, addr):
        return RefusesTLSPeer(self.script)


def test_starttls_refused_by_the_peer(tmp_path):
    """STARTTLS offered but refused (454): a route that requires TLS defers
    with 4.7.5; an MX host (opportunistic) gets the message in clear."""
    route = RouteConfig(domain="remote.test", host="mx.partner.test", tls="required")
    relay = Relay(tmp_path, routes=(route,))
    relay.net.add("mx.partner.test", 25, RefusesTLS(extensions=["STARTTLS"]))
    message = relay.queue(HEADERS + b"x\r\n")
    error = result_of(relay.deliver(message))["alice@remote.test"]
    assert isinstance(error, TemporaryDeliveryError) and error.status == "4.7.5"
    assert error.text == (
        "mx.partner.test:25: STARTTLS refused: 454 4.7.0 TLS not available due to temporary reason"
        " (TLS is required for this route)"
    )

    relay = Relay(tmp_path / "2")
    script = relay.net.add("192.0.2.25", 25, RefusesTLS(extensions=["STARTTLS"])).script
    message = relay.queue(HEADERS + b"x\r\n")
    assert result_of(relay.deliver(message)) == {"alice@remote.test": RELAYED}
    assert script["commands"][:3] == ["EHLO relay.example.test", "STARTTLS", "MAIL FROM:<carol@example.test>"]


# ================================================================ config


def test_ca_file_in_config(tmp_path):
    """[relay] ca_file is the smarthost's and the routes' default; a route may
    name its own; a missing file or one without a certificate stops start-up
    naming the key."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "other.pem"))
    (tmp_path / "etc").mkdir()
    text = (
        '[relay]\nsmarthost = "smart.test:587"\ntls = "required"\nca_file = "ca.pem"\n'
        '[[relay.route]]\ndomain = "a.test"\nhost = "mx.a.test"\n'
        '[[relay.route]]\ndomain = "b.test"\nhost = "mx.b.test"\nca_file = "other.pem"\n'
    )
    cfg = configuration.loads(text, tmp_path / "etc" / "mailsvc.toml")
    assert cfg.relay.smarthost.ca_file == tmp_path / "ca.pem" and cfg.relay.smarthost.tls == "required"
    assert [r.ca_file for r in cfg.relay.routes] == [tmp_path / "ca.pem", tmp_path / "other.pem"]
    with pytest.raises(ConfigError, match=r"\[relay\] ca_file: file not found"):
        configuration.loads('[relay]\nca_file = "nope.pem"\n', tmp_path / "etc" / "mailsvc.toml")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"\[\[relay.route\]\]\[0\] ca_file: .*no PEM certificate"):
        configuration.loads('[[relay.route]]\ndomain = "a.test"\nhost = "mx.a.test"\nca_file = "junk.pem"\n',
                            tmp_path / "etc" / "mailsvc.toml")


def test_client_context_refuses_a_bad_ca_file(tmp_path):
    """ClientTLSContext with a CA file OpenSSL cannot use: TLSError naming ca_file."""
    (tmp_path / "junk.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(TLSError) as raised:
        ClientTLSContext(("mx.test",), ca_file=tmp_path / "junk.pem")
    assert raised.value.key == "ca_file"


# ================================================================ real sockets: TLS


def global_reactor():
    """The reactor trial runs (imported late: no module-level reactor import)."""
    from twisted.internet import reactor

    return reactor


class BrokenTLSPeer(ScriptedPeer):
    """Offers STARTTLS, says 220, then writes what is not TLS and hangs up;
    counts its connections. Without STARTTLS it takes mail."""

    def answer(self, line):
        if line.upper() == "STARTTLS":
            self.script["starttls"] = self.script.get("starttls", 0) + 1
            self.transport.write(b"220 2.0.0 go ahead\r\n")
            self.transport.write(b"this is not TLS at all\r\n" * 4)
            self.transport.loseConnection()
            return b""
        return super().answer(line)


class BrokenTLS(Scripted):
    def buildProtocol(self, addr):
        return BrokenTLSPeer(self.script)


class RealTLSTests(TestCase):
    """The relay agent to our own server over real sockets with STARTTLS."""

    timeout = TIMEOUT

    def setUp(self):
        self.reactor = global_reactor()
        self.root = self.mktemp_path()
        self.ca = trustme.CA()
        self.ca_file = self.root / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.factories = []

    def mktemp_path(self):
        """A fresh directory, removed at the end (not trial's mktemp(): it
        is relative to the current directory, the repository under pytest)."""
        path = Path(tempfile.mkdtemp(prefix="mailsvc-relay-tls-"))
        self.addCleanup(shutil.rmtree, path, True)
        return path

    # ---------------------------------------------------------- the peer

    def certificate(self, *names, self_signed_for=None):
        """Write a certificate (from the CA for ``names``, or self-signed) and its key; the ServerTLSContext."""
        cert_file, key_file = self.root / f"cert{len(self.factories)}.pem", self.root / f"key{len(self.factories)}.pem"
        if self_signed_for:
            cert_pem, key_pem = self_signed(self_signed_for)
            cert_file.write_bytes(cert_pem)
            key_file.write_bytes(key_pem)
        else:
            issued = self.ca.issue_cert(*names)
            issued.private_key_pem.write_to_path(str(key_file))
            cert_file.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
        return ServerTLSContext(cert_file, key_file)

    def peer(self, tls_context, *, submission=False, chunking=False):
        """Our server glue for remote.test on 127.0.0.1 (STARTTLS; with
        ``submission``, AUTH required, as alice with PASSWORD; with
        ``chunking``, BDAT); its spool and port."""
        name = f"peer{len(self.factories)}"
        spool = FileSpool(self.root / name / "spool")
        context = ReceiverContext(
            settings=ReceiverSettings(hostname="mx.remote.test", default_domain="remote.test", submission=submission),
            directory=PeerDirectory(), spool=spool, submit=lambda message: None,
            run_blocking=defer.maybeDeferred, now=lambda: NOW,
        )
        authenticator = None
        settings = ServerSettings("mx.remote.test", max_message_size=10_000_000, starttls=True, chunking=chunking)
        if submission:
            password_file = self.root / name / "passwd"
            write_entry(password_file, "alice", make_entry("alice", PASSWORD).line())
            passwords = PasswordFile(password_file)
            failures = AuthFailures(self.reactor, max_failures=0, window=600, delay=0, max_delay=0)
            authenticator = authmod.Authenticator(
                authmod.make_portal(passwords, None, defer.maybeDeferred), passwords, "mx.remote.test",
                ["remote.test"], failures, self.reactor, defer.maybeDeferred,
            )
            settings = ServerSettings("mx.remote.test", max_message_size=10_000_000, starttls=True,
                                      auth_mechanisms=("PLAIN", "LOGIN"), auth_required=True, chunking=chunking)
        factory = SMTPServerFactory(context, settings, self.reactor, tls=tls_context, authenticator=authenticator)
        return self.listen(factory), spool

    def listen(self, factory):
        port = self.reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.factories.append(factory)
        self.addCleanup(self.closed, factory, port)
        return port.getHost().port

    async def closed_async(self, factory, port):
        await port.stopListening()
        for _ in range(200):  # bounded: the peer's side of each connection is gone
            if not getattr(factory, "connections", ()):
                break
            await task.deferLater(self.reactor, 0.01, lambda: None)

    def closed(self, factory, port):
        return defer.Deferred.fromCoroutine(self.closed_async(factory, port))

    # ---------------------------------------------------------- the agent

    def agent(self, port, **config):
        """A RelayAgent (real reactor) whose every connection goes to 127.0.0.1:``port``; our spool."""
        spool = FileSpool(self.root / f"relay{len(self.factories)}")

        def connect(host, _port, factory):
            return TCP4ClientEndpoint(self.reactor, "127.0.0.1", port, timeout=5).connect(factory)

        defaults = dict(greeting_timeout=10, mail_timeout=10, rcpt_timeout=10, data_init_timeout=10,
                        data_block_timeout=10, data_end_timeout=10, connect_timeout=5)
        defaults.update(config)
        mx = FakeMX({"remote.test": [("mx.remote.test", ["127.0.0.1"])]})
        agent = RelayAgent(RelayConfig(**defaults), mx, connect, self.reactor, spool, "relay.example.test")
        self.addCleanup(agent.close, 5)
        return agent, spool

    def queue(self, spool, data=HEADERS + b"over TLS\r\n", recipients=("alice@remote.test",)):
        writer = spool.newMessage()
        writer.write(data)
        envelope = Envelope(sender="carol@example.test", recipients=(), helo="client.example.test",
                            client_address="127.0.0.1", received_at=NOW)
        [message] = writer.commit(envelope, {"relay": tuple(Recipient(address=a) for a in recipients)})
        return message

    def received(self, spool):
        """The Received: line the peer put on each message it queued."""
        lines = []
        for message in spool.queued():
            with spool.open(message) as f:
                lines.append(f.readline().decode())
        return lines

    def route(self, port, host="mx.remote.test", domain="remote.test", **extra):
        return RouteConfig(domain=domain, host=host, port=port, **extra)

    # ---------------------------------------------------------- tests

    async def test_required_tls_good_certificate_is_delivered_over_esmtps(self):
        """tls = "required", a certificate from the CA of ca_file naming the
        route's host: delivered, and the peer's Received: says ESMTPS (rfc3848)."""
        port, peer_spool = self.peer(self.certificate("mx.remote.test"))
        agent, spool = self.agent(port, routes=(self.route(port, tls="required", ca_file=self.ca_file),))
        results = await agent.deliver(self.queue(spool))
        self.assertEqual(results, {"alice@remote.test": Delivered.PASSED_ON})
        [line] = self.received(peer_spool)
        self.assertIn("from relay.example.test", line)
        self.assertIn(" with ESMTPS id ", line)

    async def test_certificate_for_another_name_is_4_7_5(self):
        """The certificate names mx.remote.test; the route says wrong.remote.test:
        deferred with 4.7.5, saying which names did not match; nothing queued."""
        port, peer_spool = self.peer(self.certificate("mx.remote.test"))
        route = self.route(port, host="wrong.remote.test", tls="required", ca_file=self.ca_file)
        agent, spool = self.agent(port, routes=(route,))
        error = (await agent.deliver(self.queue(spool)))["alice@remote.test"]
        self.assertIsInstance(error, TemporaryDeliveryError)
        self.assertEqual(error.status, "4.7.5")
        self.assertEqual(
            error.text,
            f"wrong.remote.test:{port}: TLS handshake failed: certificate for wrong.remote.test or"
            " remote.test does not match: it is for mx.remote.test",
        )
        self.assertEqual(self.received(peer_spool), [])

    async def test_domain_of_the_route_is_a_reference_identifier(self):
        """rfc7817 3 (a): a certificate naming the route's domain (not its host) is good too."""
        port, _ = self.peer(self.certificate("remote.test"))
        route = self.route(port, host="relay-in.partner.test", tls="required", ca_file=self.ca_file)
        agent, spool = self.agent(port, routes=(route,))
        self.assertEqual(await agent.deliver(self.queue(spool)), {"alice@remote.test": Delivered.PASSED_ON})

    async def test_self_signed_certificate_is_4_7_5(self):
        """A self-signed certificate for the right name, checked against the CA file: not trusted."""
        port, peer_spool = self.peer(self.certificate(self_signed_for="mx.remote.test"))
        agent, spool = self.agent(port, routes=(self.route(port, tls="required", ca_file=self.ca_file),))
        error = (await agent.deliver(self.queue(spool)))["alice@remote.test"]
        self.assertEqual(error.status, "4.7.5")
        self.assertIn("certificate of mx.remote.test is not trusted: self-signed certificate", error.text)
        self.assertEqual(self.received(peer_spool), [])

    async def test_unknown_ca_against_the_system_store_is_4_7_5(self):
        """No ca_file: the system's CAs, which do not know trustme's: deferred with 4.7.5."""
        port, peer_spool = self.peer(self.certificate("mx.remote.test"))
        agent, spool = self.agent(port, routes=(self.route(port, tls="required"),))
        error = (await agent.deliver(self.queue(spool)))["alice@remote.test"]
        self.assertIsInstance(error, TemporaryDeliveryError)
        self.assertEqual(error.status, "4.7.5")
        self.assertIn("certificate of mx.remote.test is not trusted: unknown CA", error.text)

    async def test_opportunistic_takes_any_certificate(self):
        """MX delivery (opportunistic): a self-signed certificate for another
        name is still used: delivered over TLS (Received: ESMTPS)."""
        port, peer_spool = self.peer(self.certificate(self_signed_for="somewhere.else.test"))
        agent, spool = self.agent(port)
        results = await agent.deliver(self.queue(spool))
        self.assertEqual(results, {"alice@remote.test": Delivered.PASSED_ON})
        [line] = self.received(peer_spool)
        self.assertIn(" with ESMTPS id ", line)

    async def test_opportunistic_handshake_failure_retries_in_clear_once(self):
        """A peer whose "TLS" is garbage: the same host again at once without
        STARTTLS, and the message goes; STARTTLS was tried once."""
        peer = BrokenTLS(extensions=["PIPELINING", "STARTTLS"])
        port = self.listen(peer)
        agent, spool = self.agent(port)
        message = self.queue(spool)
        self.assertEqual(await agent.deliver(message), {"alice@remote.test": RELAYED})
        self.assertEqual(peer.script["starttls"], 1)
        with spool.open(message) as f:
            self.assertEqual(peer.script["messages"], [f.read()])

    async def test_required_tls_handshake_failure_is_not_retried_in_clear(self):
        """The same garbage on a route that requires TLS: 4.7.5, no mail in clear."""
        peer = BrokenTLS(extensions=["STARTTLS"])
        port = self.listen(peer)
        agent, spool = self.agent(port, routes=(self.route(port, tls="required", ca_file=self.ca_file),))
        error = (await agent.deliver(self.queue(spool)))["alice@remote.test"]
        self.assertEqual(error.status, "4.7.5")
        self.assertIn("TLS handshake failed", error.text)
        self.assertNotIn("messages", peer.script)

    async def test_auth_to_our_submission_listener_is_esmtpsa(self):
        """Our submission listener as the smarthost: STARTTLS (required,
        checked), AUTH PLAIN as alice, then the message, for any domain;
        the peer's Received: says ESMTPSA."""
        port, peer_spool = self.peer(self.certificate("mx.remote.test"), submission=True)
        password = self.root / "smarthost.password"
        password.write_text(PASSWORD + "\n")
        smarthost = self.route(port, domain="*", tls="required", ca_file=self.ca_file, username="alice",
                               password_file=password)
        agent, spool = self.agent(port, smarthost=smarthost)
        results = await agent.deliver(self.queue(spool, recipients=("alice@remote.test", "someone@far.test")))
        self.assertEqual(set(results), {"alice@remote.test", "someone@far.test"})
        self.assertTrue(all(not isinstance(r, Exception) for r in results.values()), results)
        lines = self.received(peer_spool)  # one transaction per domain, over one connection
        self.assertEqual(len(lines), 2)
        self.assertTrue(all(" with ESMTPSA id " in line for line in lines), lines)

    async def test_wrong_password_to_our_submission_listener_is_deferred(self):
        """The wrong password: 535 from our server, the message deferred (4.7.8) with that reply."""
        port, peer_spool = self.peer(self.certificate("mx.remote.test"), submission=True)
        password = self.root / "smarthost.password"
        password.write_text("not the password\n")
        smarthost = self.route(port, domain="*", tls="required", ca_file=self.ca_file, username="alice",
                               password_file=password)
        agent, spool = self.agent(port, smarthost=smarthost)
        error = (await agent.deliver(self.queue(spool)))["alice@remote.test"]
        self.assertIsInstance(error, TemporaryDeliveryError)
        self.assertEqual(error.status, "4.7.8")
        self.assertIn("AUTH PLAIN as alice refused: 535 5.7.8", error.text)
        self.assertEqual(self.received(peer_spool), [])

    async def large_message_over_tls(self, chunking, pipelining=True):
        port, peer_spool = self.peer(self.certificate("mx.remote.test"), chunking=chunking)
        agent, spool = self.agent(port, routes=(self.route(port, tls="required", ca_file=self.ca_file),))
        agent._settings = ClientSettings("relay.example.test", pipelining=pipelining)
        data = big_message(2_000_000)
        message = self.queue(spool, data)
        self.assertEqual(await agent.deliver(message), {"alice@remote.test": Delivered.PASSED_ON})
        [queued] = list(peer_spool.queued())
        with peer_spool.open(queued) as f:
            self.assertEqual(f.read().split(b"\r\n", 1)[1], data)

    async def test_large_message_over_tls_with_data(self):
        """Two megabytes over TLS to our server without CHUNKING (DATA,
        dot-stuffed, through the TLS transport's pull-to-push producer): byte for byte."""
        await self.large_message_over_tls(chunking=False)

    async def test_large_message_over_tls_with_bdat(self):
        """The same to our server with CHUNKING: BDAT chunks, pipelined, over TLS: byte for byte."""
        await self.large_message_over_tls(chunking=True)

    async def test_large_message_over_tls_with_bdat_one_chunk_at_a_time(self):
        """BDAT without PIPELINING over TLS: the body producer stops while
        each chunk's 250 is due and starts again (through the TLS
        transport's pull-to-push wrapper): byte for byte."""
        await self.large_message_over_tls(chunking=True, pipelining=False)

    async def test_submission_with_bdat_and_auth(self):
        """Our submission listener with CHUNKING as the smarthost: STARTTLS,
        AUTH, BDAT; the message arrives whole, Received: says ESMTPSA."""
        port, peer_spool = self.peer(self.certificate("mx.remote.test"), submission=True, chunking=True)
        password = self.root / "smarthost.password"
        password.write_text(PASSWORD + "\n")
        smarthost = self.route(port, domain="*", tls="required", ca_file=self.ca_file, username="alice",
                               password_file=password)
        agent, spool = self.agent(port, smarthost=smarthost)
        data = big_message(300_000)
        results = await agent.deliver(self.queue(spool, data, recipients=("someone@far.test",)))
        self.assertEqual(results, {"someone@far.test": Delivered.PASSED_ON})  # our server offers DSN
        [queued] = list(peer_spool.queued())
        with peer_spool.open(queued) as f:
            received, rest = f.read().split(b"\r\n", 1)
        self.assertIn(b" with ESMTPSA id ", received)
        # The submission listener adds Date: and Message-ID: (rfc6409 8.2, 8.3) before the body.
        self.assertTrue(rest.endswith(data.split(b"\r\n\r\n", 1)[1]))
