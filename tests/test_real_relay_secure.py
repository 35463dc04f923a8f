"""STARTTLS and AUTH between two real ``twistd mailsvc`` processes on 127.0.0.1.

mailsvc A relays for a trusted client through ``[relay] smarthost`` with
``tls = "required"``, ``ca_file`` and AUTH, to mailsvc B's submission
listener, whose certificate (for 127.0.0.1 and mx.remote.test) comes from a
throwaway trustme CA. The config keys go through start-up as a user writes
them. Both processes are stopped by their PID whatever happens; every wait
is bounded.
"""

from __future__ import annotations

import io
import smtplib

import pytest
import trustme

from mailsvc import passwd
from realserver import RealServer

PASSWORD = "correct horse battery staple"
MESSAGE = (
    b"From: Carol <carol@example.test>\r\n"
    b"To: Alice <alice@remote.test>\r\n"
    b"Subject: through a smarthost\r\n"
    b"Message-ID: <smarthost-test@example.test>\r\n"
    b"Date: Mon, 21 Sep 2026 12:00:00 +0000\r\n"
    b"\r\n"
    b".a line that starts with a dot\r\n"
    + b"body line\r\n" * 20000
)


@pytest.fixture
def servers(tmp_path):
    """``(make, ca)``: ``make(name, sections)`` writes a server's config and,
    for B, its certificate and alice's password, then starts it. Every
    server made is stopped by its PID at the end."""
    ca = trustme.CA()
    started: list[RealServer] = []

    def make(name: str, sections: dict, certificate: bool = False) -> RealServer:
        server = RealServer(tmp_path / name, sections=sections)
        started.append(server)
        if certificate:
            issued = ca.issue_cert("127.0.0.1", "mx.remote.test")
            server.cert_file.parent.mkdir(parents=True)
            issued.private_key_pem.write_to_path(str(server.key_file))
            server.cert_file.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
        server.write_config()
        if certificate:
            stdin = io.StringIO(PASSWORD + "\n")
            assert passwd.main(["alice", "--config", str(server.config_path), "--stdin"], stdin=stdin) == 0
        return server.start()

    try:
        yield make, ca
    finally:
        for server in started:
            server.stop()


def remote(make):
    """mailsvc B: remote.test; its submission listener lets alice send as anyone."""
    return make("b", {
        "server": {"hostname": "mx.remote.test"},
        "local": {"domains": ["remote.test"]},
        "submission": {"require_sender_match": False},
    }, certificate=True)


def relay(make, ca, tmp_path, b: RealServer, password: str) -> RealServer:
    """mailsvc A: relays for 127.0.0.0/8 through B's submission port (TLS required, AUTH as alice)."""
    ca_file = tmp_path / "relay-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    password_file = tmp_path / "smarthost.password"
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    return make("a", {
        "smtp": {"trusted_networks": ["127.0.0.0/8"]},
        "relay": {
            "smarthost": f"127.0.0.1:{b.submission_port}",
            "tls": "required",
            "ca_file": str(ca_file),
            "username": "alice",
            "password_file": str(password_file),
        },
    })


def send(port: int, recipients) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.sendmail("carol@example.test", list(recipients), MESSAGE) == {}


def test_smarthost_with_required_tls_and_auth(servers, tmp_path):
    """A → B's submission port: STARTTLS with the certificate checked for
    127.0.0.1 against ca_file, AUTH PLAIN as alice, BDAT (B offers
    CHUNKING); the message arrives byte for byte and B's Received: line
    says ESMTPSA."""
    make, ca = servers
    b = remote(make)
    a = relay(make, ca, tmp_path, b, PASSWORD)
    send(a.port, ["alice@remote.test"])
    [path] = b.wait_for_mail("alice", timeout=20)
    data = path.read_bytes()
    head, body = data.split(b"\n\n", 1)
    assert b"by mx.remote.test (mailsvc) with ESMTPSA id" in head
    assert body == MESSAGE.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n")
    a.wait_idle(timeout=10)
    assert "relayed id=" in a.log()


def test_smarthost_wrong_password_defers(servers, tmp_path):
    """The wrong password: B says 535; A defers (4.7.8, B's reply quoted),
    keeps the message, and B gets nothing."""
    make, ca = servers
    b = remote(make)
    a = relay(make, ca, tmp_path, b, "not the password")
    send(a.port, ["alice@remote.test"])
    log = a.wait_for_log("deferred id=", timeout=20)
    assert "4.7.8 127.0.0.1:" in log and "AUTH PLAIN as alice refused: 535 5.7.8" in log
    assert b.maildir("alice") == []
    assert any("/C." in f for f in a.spool_files())
