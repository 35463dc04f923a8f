"""End to end: Alice writes to Bob, who reads it over POP3, across two real servers.

- mailsvc A (``mx.alice.test``, local domain ``alice.test``): Alice's
  server. She submits on its submission port with STARTTLS and AUTH
  (smtplib), to ``bob@bob.test``.
- a real twisted.names DNS server on 127.0.0.1 (``test_real_relay``'s
  fixture): ``bob.test MX 10 mx.bob.test``, ``mx.bob.test A 127.0.0.1``.
  A's ``[relay] resolver`` points at it, ``[relay] port`` at B's SMTP port.
- mailsvc B (``mx.bob.test``, local domain ``bob.test``, POP3 on): Bob's
  server. It receives the relayed message and delivers it into bob's
  Maildir; Bob reads it with poplib after STLS and deletes it.

The body Bob reads is, byte for byte, what Alice sent. Every process is
stopped by its PID; every wait is bounded.
"""

from __future__ import annotations

import io
import poplib
import smtplib
import ssl

import pytest
import trustme

from mailsvc import passwd
from realserver import RealServer, free_port
from test_real_relay import dns_server  # noqa: F401 (fixture)

ALICE_PASSWORD = "alice's long passphrase"
BOB_PASSWORD = "bob's other passphrase"

MESSAGE = (
    b"From: Alice <alice@alice.test>\r\n"
    b"To: Bob <bob@bob.test>\r\n"
    b"Subject: lunch?\r\n"
    b"Message-ID: <lunch-1@alice.test>\r\n"
    b"Date: Tue, 22 Sep 2026 09:30:00 +0000\r\n"
    b"\r\n"
    b"Hi Bob,\r\n"
    b"\r\n"
    b".. a line with two dots, and next a lone one:\r\n"
    b".\r\n"
    b"From here, see you at noon.\r\n"
    + b"-" * 900 + b"\r\n"
    b"Alice\r\n"
)

# Header lines the servers add on top: trace (both), then B's local delivery.
_ADDED = (b"Return-Path:", b"Delivered-To:", b"Received:")


@pytest.fixture
def servers(tmp_path):
    """A function starting a ``RealServer`` whose certificate comes from one
    throwaway CA and whose ``user`` has ``password``; all are stopped at the end."""
    ca = trustme.CA()
    started: list[RealServer] = []

    def start(name: str, hostname: str, domain: str, user: str, password: str, **sections) -> RealServer:
        server = RealServer(tmp_path / name, sections={
            "server": {"hostname": hostname},
            "local": {"domains": [domain]},
            **sections,
        })
        started.append(server)
        cert = ca.issue_cert(hostname, "127.0.0.1", common_name=hostname)
        server.cert_file.parent.mkdir(parents=True)
        cert.private_key_pem.write_to_path(str(server.key_file))
        server.cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        server.write_config()
        assert passwd.main([user, "--config", str(server.config_path), "--stdin"],
                           stdin=io.StringIO(password + "\n")) == 0
        return server.start()

    start.context = ssl.create_default_context()
    ca.configure_trust(start.context)
    try:
        yield start
    finally:
        for server in started:
            server.stop()


def without_added_headers(lines: list[bytes]) -> bytes:
    """The retrieved message in wire form, without the trace and delivery headers on top."""
    lines = list(lines)
    while lines and lines[0].startswith(_ADDED):
        lines.pop(0)
        while lines and lines[0][:1] in (b" ", b"\t"):
            lines.pop(0)
    return b"".join(line + b"\r\n" for line in lines)


def test_alice_writes_bob_reads_over_pop3(servers, dns_server):  # noqa: F811 (fixture)
    """Alice submits with STARTTLS + AUTH on A; A finds B through the MX in
    the DNS server and relays; B delivers to bob's Maildir; Bob reads it over
    POP3 with STLS: the bytes match what Alice sent; DELE + QUIT empties it."""
    pop3_port = free_port()
    b = servers("b", "mx.bob.test", "bob.test", "bob", BOB_PASSWORD,
                pop3={"listen": [f"tcp:{pop3_port}:interface=127.0.0.1"]})
    b.wait_for_log(f"starting on {pop3_port}")
    dns_port = dns_server({
        "bob.test": [["MX", 10, "mx.bob.test"]],
        "mx.bob.test": [["A", "127.0.0.1"]],
    })
    a = servers("a", "mx.alice.test", "alice.test", "alice", ALICE_PASSWORD,
                relay={"resolver": f"127.0.0.1:{dns_port}", "port": b.port})

    with smtplib.SMTP("127.0.0.1", a.submission_port, local_hostname="laptop.alice.test", timeout=10) as client:
        client.starttls(context=servers.context)
        client.ehlo()
        client.login("alice", ALICE_PASSWORD)
        assert client.sendmail("alice@alice.test", ["bob@bob.test"], MESSAGE) == {}

    b.wait_for_mail("bob", timeout=20)
    log = a.wait_for_log("relayed id=", timeout=5)
    assert f"to mx.bob.test[127.0.0.1]:{b.port}" in log
    a.wait_idle(timeout=10)

    bob = poplib.POP3("127.0.0.1", pop3_port, timeout=10)
    try:
        bob.stls(context=servers.context)
        bob.user("bob@bob.test")
        assert bob.pass_(BOB_PASSWORD).startswith(b"+OK bob has 1 messages")
        _, lines, _ = bob.retr(1)
        head = b"\n".join(lines).split(b"\n\n", 1)[0]
        assert head.startswith(b"Return-Path: <alice@alice.test>\nDelivered-To: bob@bob.test\n")
        assert b"by mx.alice.test (mailsvc)" in head and b"by mx.bob.test (mailsvc)" in head
        assert b"with ESMTPSA" in head
        assert without_added_headers(lines) == MESSAGE
        bob.dele(1)
        assert bob.quit().endswith(b"(1 messages deleted)")
    finally:
        bob.close()
    assert b.maildir("bob") == [] and not list((b.mail_dir / "bob" / "cur").iterdir())
