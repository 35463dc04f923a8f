"""Submission, TLS and AUTH against the real ``twistd mailsvc`` process.

Real clients: Python's smtplib (``starttls()``, ``login()``, ``SMTP_SSL``),
swaks (``--tls``, ``--tls-on-connect``, ``--auth`` PLAIN/LOGIN/CRAM-MD5) and
msmtp (Debian's, a real submission client). Certificates come from a
throwaway CA made with trustme in the test's directory. swaks and msmtp
must be installed (``.ci/run`` installs them and the Perl modules swaks needs
for TLS and CRAM-MD5): these tests fail, never skip, without them.
"""

from __future__ import annotations

import io
import os
import smtplib
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trustme

from mailsvc import passwd
from realserver import RealServer, client_context, tool, wait_for

PASSWORD = "correct horse battery staple"
TOOL_TIMEOUT = 30
MESSAGE = b"From: Alice <alice@example.test>\r\nTo: Bob <bob@example.test>\r\nSubject: submitted\r\n\r\nHello Bob.\r\n"


@pytest.fixture
def ca() -> trustme.CA:
    """A throwaway certificate authority."""
    return trustme.CA()


@pytest.fixture
def secure_server(tmp_path, ca):
    """A running server whose certificate (for mx.test, localhost and
    127.0.0.1) comes from ``ca``; alice has a password (and a CRAM-MD5
    secret); AUTH failures are limited to 3 with a short delay. Stopped by
    its PID at the end."""
    servers: list[RealServer] = []

    def start(**auth) -> RealServer:
        options = {
            "cram_md5_secrets_file": str(tmp_path / f"s{len(servers)}" / "auth" / "cram"),
            "mechanisms": ["SCRAM-SHA-256", "PLAIN", "LOGIN", "CRAM-MD5"],
            "max_failures": 3,
            "failure_delay": 0.05,
        }
        options.update(auth)
        server = RealServer(tmp_path / f"s{len(servers)}", sections={"auth": options})
        servers.append(server)
        cert = ca.issue_cert("mx.test", "localhost", "127.0.0.1")
        server.cert_file.parent.mkdir(parents=True)
        cert.private_key_pem.write_to_path(str(server.key_file))
        server.cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        server.write_config()
        assert passwd.main(["alice", "--config", str(server.config_path), "--stdin"], stdin=io.StringIO(PASSWORD + "\n")) == 0
        return server.start()

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


def swaks(port: int, *args: str) -> subprocess.CompletedProcess:
    """swaks against 127.0.0.1:``port``; its output as text."""
    return subprocess.run(
        [tool("swaks"), "--server", f"127.0.0.1:{port}", "--timeout", "10", *args],
        capture_output=True, text=True, timeout=TOOL_TIMEOUT, stdin=subprocess.DEVNULL,
    )


def delivered(server: RealServer, user: str, count: int = 1) -> list[bytes]:
    return [path.read_bytes() for path in server.wait_for_mail(user, count)]


# ------------------------------------------------------------------ smtplib


def test_smtplib_starttls_and_login_send_anywhere(secure_server, ca):
    """smtplib on the submission port: no AUTH before STARTTLS; the
    certificate verifies against the CA; login() then sendmail() to a local
    and a foreign address; Received says ESMTPSA; Date and Message-ID were added."""
    server = secure_server()
    with smtplib.SMTP("127.0.0.1", server.submission_port, local_hostname="laptop.test", timeout=10) as client:
        client.ehlo()
        assert client.has_extn("starttls") and not client.has_extn("auth")
        client.starttls(context=client_context(ca))
        client.ehlo()
        assert not client.has_extn("starttls")
        assert client.esmtp_features["auth"].split() == ["SCRAM-SHA-256", "PLAIN", "LOGIN", "CRAM-MD5"]
        assert client.login("alice", PASSWORD)[0] == 235
        assert client.sendmail("alice@example.test", ["bob@example.test", "someone@far.test"], MESSAGE) == {}
    [data] = delivered(server, "bob")
    head = data.split(b"\n\n", 1)[0].decode()
    assert " with ESMTPSA id " in head and "from laptop.test ([127.0.0.1])" in head
    assert "\nDate: " in head and "\nMessage-ID: <" in head and "@mx.test>" in head
    server.wait_for_log("to=<someone@far.test>")


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_smtplib_implicit_tls_each_mechanism(secure_server, ca, mechanism):
    """SMTP_SSL on the implicit-TLS port (rfc8314): AUTH at once, by each mechanism smtplib knows."""
    server = secure_server()
    with smtplib.SMTP_SSL("127.0.0.1", server.implicit_tls_port, context=client_context(ca), timeout=10) as client:
        client.ehlo()
        assert not client.has_extn("starttls")
        client.user, client.password = "alice@example.test", PASSWORD
        method = {"PLAIN": client.auth_plain, "LOGIN": client.auth_login, "CRAM-MD5": client.auth_cram_md5}[mechanism]
        assert client.auth(mechanism, method)[0] == 235
        assert client.sendmail("alice@example.test", ["bob@example.test"], MESSAGE) == {}
    delivered(server, "bob")


# ------------------------------------------------------------------ swaks


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_swaks_starttls_auth(secure_server, mechanism):
    """swaks --tls --auth MECH on the submission port: 220 to STARTTLS, 235, 250 queued."""
    server = secure_server()
    result = swaks(
        server.submission_port, "--tls", "--auth", mechanism, "--auth-user", "alice", "--auth-password", PASSWORD,
        "--from", "alice@example.test", "--to", "bob@example.test", "--h-Subject", f"swaks {mechanism}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<-  220 2.0.0 Ready to start TLS" in result.stdout
    assert "<~  235 2.7.0 Authentication successful" in result.stdout
    [data] = delivered(server, "bob")
    assert f"Subject: swaks {mechanism}".encode() in data and b" with ESMTPSA " in data


def test_swaks_tls_on_connect(secure_server):
    """swaks --tls-on-connect (implicit TLS, rfc8314) with AUTH PLAIN to a foreign address."""
    server = secure_server()
    result = swaks(
        server.implicit_tls_port, "--tls-on-connect", "--auth", "PLAIN", "--auth-user", "alice",
        "--auth-password", PASSWORD, "--from", "alice@example.test", "--to", "x@far.test",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<~  235 " in result.stdout and "<~  250 2.0.0 Ok: queued as" in result.stdout


def test_swaks_wrong_password_is_535(secure_server):
    """swaks with a wrong password: 535 5.7.8 and a failing exit status."""
    server = secure_server()
    result = swaks(server.submission_port, "--tls", "--auth", "PLAIN", "--auth-user", "alice",
                   "--auth-password", "wrong", "--from", "alice@example.test", "--to", "bob@example.test")
    assert result.returncode != 0
    assert "535 5.7.8 Authentication credentials invalid" in result.stdout


# ------------------------------------------------------------------ msmtp


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit-tls"])
def test_msmtp_submits(secure_server, ca, tmp_path, implicit):
    """msmtp, a real submission client: STARTTLS (or implicit TLS), the CA as
    trust file, AUTH chosen by msmtp, a message to a local and a foreign user."""
    server = secure_server()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    config = tmp_path / "msmtprc"
    config.write_text(
        "defaults\n"
        "tls on\n"
        f"tls_trust_file {ca_file}\n"
        "auth on\n"
        "account submission\n"
        "host 127.0.0.1\n"
        f"port {server.implicit_tls_port if implicit else server.submission_port}\n"
        f"tls_starttls {'off' if implicit else 'on'}\n"
        "user alice\n"
        f"password {PASSWORD}\n"
        "from alice@example.test\n"
        "domain laptop.test\n"
        "account default : submission\n"
    )
    config.chmod(0o600)
    result = subprocess.run(
        [tool("msmtp"), "-C", str(config), "-v", "bob@example.test", "someone@far.test"],
        input=MESSAGE.replace(b"\r\n", b"\n"), capture_output=True, timeout=TOOL_TIMEOUT,
    )
    output = (result.stdout + result.stderr).decode("utf-8", "replace")
    assert result.returncode == 0, output
    assert "235 2.7.0" in output
    assert "AUTH SCRAM-SHA-256" in output  # msmtp picks the best mechanism offered
    [data] = delivered(server, "bob")
    assert b"Subject: submitted" in data and b" with ESMTPSA " in data and b"\nMessage-ID: <" in data


# ------------------------------------------------------------------ refusals


def test_no_relay_without_auth_on_any_listener(secure_server, ca):
    """MX: a foreign recipient gets 550 5.7.1; submission (clear, after
    STARTTLS, implicit TLS): MAIL without AUTH gets 530 5.7.0."""
    server = secure_server()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as mx:
        mx.ehlo()
        assert mx.mail("x@remote.test")[0] == 250
        assert mx.rcpt("someone@far.test") == (550, b"5.7.1 <someone@far.test>: relay access denied")
    with smtplib.SMTP("127.0.0.1", server.submission_port, timeout=10) as clear:
        clear.ehlo()
        assert clear.mail("alice@example.test") == (530, b"5.7.0 Authentication required")
        assert clear.rcpt("someone@far.test")[0] == 530
        clear.starttls(context=client_context(ca))
        clear.ehlo()
        assert clear.mail("alice@example.test") == (530, b"5.7.0 Authentication required")
    with smtplib.SMTP_SSL("127.0.0.1", server.implicit_tls_port, context=client_context(ca), timeout=10) as implicit:
        implicit.ehlo()
        assert implicit.mail("alice@example.test") == (530, b"5.7.0 Authentication required")
    assert server.spool_files() == []


def test_auth_is_not_offered_before_tls(secure_server):
    """Plain-text submission: EHLO lists no AUTH; AUTH PLAIN gets 538 5.7.11;
    the password never crosses in clear."""
    server = secure_server()
    with smtplib.SMTP("127.0.0.1", server.submission_port, timeout=10) as client:
        client.ehlo()
        assert not client.has_extn("auth")
        code, text = client.docmd("AUTH", "PLAIN AGFsaWNlAHg=")
        assert (code, text) == (538, b"5.7.11 Encryption required for requested authentication mechanism")


def test_brute_force_meets_the_limit(secure_server, ca):
    """A bounded guessing loop (20 tries at most, reconnecting when closed):
    after max_failures (3) the server says 421 4.7.0 and closes; later
    connections from the address get 421 at AUTH, even with the right password."""
    server = secure_server()
    replies = []
    for attempt in range(20):
        with smtplib.SMTP_SSL("127.0.0.1", server.implicit_tls_port, context=client_context(ca), timeout=10) as client:
            client.ehlo()
            code, text = client.docmd("AUTH", "PLAIN " + _plain("alice", f"guess{attempt}"))
            replies.append(code)
            if code == 421:
                with pytest.raises(smtplib.SMTPServerDisconnected):
                    client.noop()
                break
    assert replies[:3] == [535, 535, 421], replies
    with smtplib.SMTP_SSL("127.0.0.1", server.implicit_tls_port, context=client_context(ca), timeout=10) as client:
        client.ehlo()
        assert client.docmd("AUTH", "PLAIN " + _plain("alice", PASSWORD))[0] == 421
    server.wait_for_log("auth failed mechanism=PLAIN client=[127.0.0.1]", count=3)


def _plain(user: str, password: str) -> str:
    import base64

    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def test_connections_per_client_limit(tmp_path):
    """[smtp] max_connections_per_client = 2: a third connection from
    127.0.0.1 gets 421 4.7.0 and is closed; after one closes, a new one is served."""
    server = RealServer(tmp_path / "server", sections={"smtp": {"max_connections_per_client": 2}})
    try:
        server.start()
        # start() proved the port answers with a connection of its own: it
        # counts against the limit until the server has seen it close.
        wait_for(lambda: "disconnect from [127.0.0.1]" in server.log(this_run=True), 10, "the start-up probe released")
        first, second = (socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(2))
        for sock in (first, second):
            assert sock.recv(512).startswith(b"220 ")
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as third:
            assert third.recv(512) == b"421 4.7.0 Too many connections from your address; try again later\r\n"
            assert third.recv(512) == b""
        first.close()

        def served():
            with socket.create_connection(("127.0.0.1", server.submission_port), timeout=10) as sock:
                return sock.recv(512).startswith(b"220 ")

        wait_for(served, 10, "a connection served after one closed")
        second.close()
    finally:
        server.stop()


# ------------------------------------------------------------------ start-up


def test_first_start_makes_a_self_signed_certificate(tmp_path):
    """The default config: no certificate on disk → one is made for the host
    name (key mode 0600), STARTTLS works with it, and it is kept on restart."""
    server = RealServer(tmp_path / "server")
    try:
        assert not server.cert_file.exists()
        server.start()
        assert server.cert_file.exists() and server.key_file.stat().st_mode & 0o777 == 0o600
        assert "self-signed certificate for mx.test" in server.log()
        assert "Warning" not in server.stderr()
        context = ssl.create_default_context(cafile=str(server.cert_file))  # trust it alone
        context.check_hostname = False  # it names mx.test, not 127.0.0.1: checked below
        with smtplib.SMTP("127.0.0.1", server.submission_port, timeout=10) as client:
            client.ehlo()
            client.starttls(context=context)
            certificate = client.sock.getpeercert()
        assert certificate["subject"] == ((("commonName", "mx.test"),),)
        assert certificate["subjectAltName"] == (("DNS", "mx.test"),)
        before = server.cert_file.read_bytes()
        server.restart()
        assert server.cert_file.read_bytes() == before
    finally:
        server.stop()


def test_bad_certificate_stops_start_up_naming_the_key(tmp_path):
    """A certificate file that is not PEM (and no self-signed fallback): exit 78,
    one line naming [tls] cert_file."""
    server = RealServer(tmp_path / "server", sections={"tls": {"generate_self_signed": False}})
    server.cert_file.parent.mkdir(parents=True)
    server.cert_file.write_text("not a certificate\n")
    server.key_file.write_text("not a key\n")
    server.launch()
    assert server.wait_exit() == 78
    assert "config error: mailsvc.toml: [tls] cert_file: " in server.stderr()


def test_mailsvc_passwd_command_takes_effect_without_restart(secure_server, ca):
    """``mailsvc passwd carol --stdin`` (the installed command) while the
    server runs: carol can log in at once."""
    server = secure_server()
    command = Path(sys.prefix) / "bin" / "mailsvc"
    result = subprocess.run(
        [str(command), "passwd", "carol", "--config", str(server.config_path), "--stdin"],
        input=b"carols password\n", capture_output=True, timeout=TOOL_TIMEOUT, env=dict(os.environ),
    )
    assert result.returncode == 0, result.stderr
    with smtplib.SMTP_SSL("127.0.0.1", server.implicit_tls_port, context=client_context(ca), timeout=10) as client:
        client.ehlo()
        assert client.login("carol", "carols password")[0] == 235
