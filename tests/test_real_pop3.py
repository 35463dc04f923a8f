"""POP3 against the real ``twistd mailsvc`` process, with real clients.

Python's poplib (``stls()`` on the STLS port, ``POP3_SSL`` on the implicit
TLS port), Debian's fetchmail (STLS, certificate checked, into an MDA) and
curl (``pop3://`` with ``--ssl-reqd``). Certificates come from a throwaway
CA made with trustme. fetchmail and curl must be installed (``.ci/run``
installs them): these tests fail, never skip, without them. Every server is
stopped by its PID; every client run is bounded by a timeout.
"""

from __future__ import annotations

import email
import io
import os
import poplib
import smtplib
import socket
import subprocess
import textwrap

import pytest
import trustme

from mailsvc import passwd
from realserver import RealServer, client_context, free_port, tool

EX_CONFIG = 78
WRITE_ONLY_STORE = '''
from twisted.plugin import IPlugin
from zope.interface import implementer
from mailsvc.interfaces import IMailboxStore, IMailboxStoreFactory


@implementer(IMailboxStore)
class WriteOnlyStore:
    def deliver(self, mailbox, headers, source):
        return "nowhere"

    def exists(self, mailbox):
        return True


@implementer(IPlugin, IMailboxStoreFactory)
class WriteOnlyStoreFactory:
    name = "write-only-test"
    description = "a third-party store without IMailboxAccess"

    def makeStore(self, options):
        return WriteOnlyStore()


writeOnlyStore = WriteOnlyStoreFactory()
'''

PASSWORD = "correct horse battery staple"
TOOL_TIMEOUT = 60
MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: Bob <bob@example.test>\r\n"
    b"Subject: for POP3\r\n"
    b"Message-ID: <pop3-test@example.test>\r\n"
    b"Date: Mon, 21 Sep 2026 12:00:00 +0000\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
    b".a line that starts with a dot\r\n"
    b".\r\n"
    b"From the mbox point of view, a From line.\r\n"
    b"The end.\r\n"
)


@pytest.fixture
def ca() -> trustme.CA:
    """A throwaway certificate authority."""
    return trustme.CA()


@pytest.fixture
def pop3_server(tmp_path, ca):
    """A function starting a server with POP3 on (STLS and implicit TLS on
    free ports), a CA-issued certificate for mx.test, localhost and
    127.0.0.1, and bob's password; failed logins limited to 3. Every server
    is stopped by its PID at the end."""
    servers: list[RealServer] = []

    def start(store_type: str = "maildir", **pop3) -> RealServer:
        root = tmp_path / f"s{len(servers)}"
        server = RealServer(root, store_type=store_type, sections={
            "auth": {"max_failures": 3, "failure_delay": 0.05},
            "pop3": {"listen": [f"tcp:{free_port()}:interface=127.0.0.1"],
                     "listen_implicit_tls": [f"tcp:{free_port()}:interface=127.0.0.1"], **pop3},
        })
        servers.append(server)
        server.pop3_port = int(server.sections["pop3"]["listen"][0].split(":")[1])
        server.pop3s_port = int(server.sections["pop3"]["listen_implicit_tls"][0].split(":")[1])
        cert = ca.issue_cert("mx.test", "localhost", "127.0.0.1", common_name="mx.test")
        server.cert_file.parent.mkdir(parents=True)
        cert.private_key_pem.write_to_path(str(server.key_file))
        server.cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        server.write_config()
        status = passwd.main(["bob", "--config", str(server.config_path), "--stdin"], stdin=io.StringIO(PASSWORD + "\n"))
        assert status == 0
        server.start()
        server.wait_for_log(f"starting on {server.pop3s_port}")
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


def send_to_bob(server: RealServer, count: int = 1, message: bytes = MESSAGE) -> None:
    """Deliver ``count`` copies of ``message`` to bob through the MX port and wait for them."""
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        for _ in range(count):
            assert client.sendmail("alice@example.test", ["bob@example.test"], message) == {}
    if server.store_type == "maildir":
        server.wait_for_mail("bob", count)
    else:
        server.wait_idle()


def unstamped(lines: list[bytes]) -> bytes:
    """A retrieved message (poplib's lines) in wire form without the header
    lines delivery added on top (Return-Path, Delivered-To, Received)."""
    lines = list(lines)
    while lines and lines[0].startswith((b"Return-Path:", b"Delivered-To:", b"Received:")):
        lines.pop(0)
        while lines and lines[0][:1] in (b" ", b"\t"):
            lines.pop(0)
    return b"".join(line + b"\r\n" for line in lines)


def stls_client(server: RealServer, ca) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", server.pop3_port, timeout=10)
    client.stls(context=client_context(ca))
    return client


# ---------------------------------------------------------------- poplib


def test_poplib_stls_session(pop3_server, ca):
    """poplib: CAPA before STLS has STLS and no USER; USER is refused in
    clear; after stls(), USER/PASS, LIST, UIDL, TOP, RETR give the message as
    sent (dots unstuffed by poplib); DELE + QUIT empties the Maildir."""
    server = pop3_server()
    send_to_bob(server, 2)
    client = poplib.POP3("127.0.0.1", server.pop3_port, timeout=10)
    try:
        assert client.getwelcome() == b"+OK mx.test POP3 server ready"
        capa = client.capa()
        assert "STLS" in capa and "USER" not in capa and "SASL" not in capa
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\] Plaintext login refused before TLS"):
            client.user("bob")
        client.stls(context=client_context(ca))
        capa = client.capa()
        assert "USER" in capa and "PLAIN" in capa["SASL"] and "STLS" not in capa
        client.user("bob")
        assert client.pass_(PASSWORD).startswith(b"+OK bob has 2 messages")
        _, listing, _ = client.list()
        assert len(listing) == 2
        _, uids, _ = client.uidl()
        assert len({u.split()[1] for u in uids}) == 2
        _, top, _ = client.top(1, 0)
        assert top[-1] == b"" and b"Subject: for POP3" in top
        _, lines, octets = client.retr(1)
        assert unstamped(lines) == MESSAGE
        assert octets == int(listing[0].split()[1])  # poplib counts the CRLFs, as LIST does
        client.dele(1)
        client.dele(2)
        assert client.quit().startswith(b"+OK mx.test POP3 server signing off (2 messages deleted)")
    finally:
        client.close()
    assert not os.listdir(server.mail_dir / "bob" / "cur") and not os.listdir(server.mail_dir / "bob" / "new")
    server.wait_for_log("pop3 quit user=bob removed=2")


def test_poplib_implicit_tls_and_in_use(pop3_server, ca):
    """POP3_SSL on the implicit-TLS port (rfc8314); a second session meanwhile
    gets -ERR [IN-USE]; a dropped connection (no QUIT) removes nothing."""
    server = pop3_server()
    send_to_bob(server)
    first = poplib.POP3_SSL("127.0.0.1", server.pop3s_port, context=client_context(ca), timeout=10)
    try:
        assert "STLS" not in first.capa()
        first.user("bob@example.test")
        first.pass_(PASSWORD)
        first.dele(1)
        second = stls_client(server, ca)
        try:
            second.user("bob")
            with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
                second.pass_(PASSWORD)
        finally:
            second.close()
    finally:
        first.close()  # poplib's close() sends no QUIT: the connection is just gone
    server.wait_for_log("pop3 disconnect from [127.0.0.1]", count=2)
    again = stls_client(server, ca)
    try:
        again.user("bob")
        assert again.pass_(PASSWORD).startswith(b"+OK bob has 1 messages")
        again.quit()
    finally:
        again.close()


def test_poplib_reads_an_mbox(pop3_server, ca):
    """With the mbox store: RETR gives back the message as sent (the From
    line quoting undone), DELE + QUIT rewrites the mbox without it."""
    server = pop3_server("mbox")
    send_to_bob(server, 2)
    mbox = server.mail_dir / "bob"
    assert mbox.read_bytes().count(b"\nFrom ") == 1 and b"\n>From the mbox" in mbox.read_bytes()
    client = stls_client(server, ca)
    try:
        client.user("bob")
        client.pass_(PASSWORD)
        _, lines, _ = client.retr(2)
        assert unstamped(lines) == MESSAGE
        client.dele(1)
        client.quit()
    finally:
        client.close()
    data = mbox.read_bytes()
    assert data.startswith(b"From alice@example.test ") and data.count(b"\nFrom ") == 0
    assert data.count(b"Subject: for POP3") == 1


def test_brute_force_meets_the_limit(pop3_server, ca):
    """A password-guessing loop: three failures (each -ERR [AUTH]), then the
    address is refused (-ERR [SYS/TEMP], connection closed), even with the
    right password; the failures are logged with the address."""
    server = pop3_server()
    outcomes = []
    for guess in ["123456", "password", "qwerty", "letmein", PASSWORD]:
        client = stls_client(server, ca)
        try:
            client.user("bob")
            try:
                client.pass_(guess)
                outcomes.append("ok")
            except poplib.error_proto as error:
                outcomes.append(error.args[0].decode())
        finally:
            client.close()
    assert outcomes[:2] == ["-ERR [AUTH] Authentication failed"] * 2
    assert all(o.startswith("-ERR [SYS/TEMP] Too many failed logins") for o in outcomes[2:])
    log = server.log()
    assert log.count("pop3 auth failed mechanism=USER client=[127.0.0.1]") == 3


def test_big_message_streams_over_tls(pop3_server, ca):
    """A 3 MB message (dot lines all through it) over implicit TLS: RETR
    streams it with flow control and it arrives whole; TOP 1 0 stops early."""
    server = pop3_server()
    line = b".0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n"
    big = MESSAGE.replace(b"Subject: for POP3", b"Subject: big") + line * (3 * 1024 * 1024 // len(line))
    send_to_bob(server, message=big)
    client = poplib.POP3_SSL("127.0.0.1", server.pop3s_port, context=client_context(ca), timeout=30)
    try:
        client.user("bob")
        client.pass_(PASSWORD)
        _, lines, _ = client.retr(1)
        assert unstamped(lines) == big
        _, top, _ = client.top(1, 0)
        assert b"Subject: big" in top and len(top) < 20
        client.quit()
    finally:
        client.close()


# ---------------------------------------------------------------- fetchmail


def test_fetchmail_retrieves_over_stls_into_an_mda(pop3_server, ca, tmp_path):
    """Debian's fetchmail, STLS with the certificate checked against the CA,
    USER/PASS, each message piped to an MDA (cat >> FILE), then deleted."""
    fetchmail = tool("fetchmail")
    server = pop3_server()
    send_to_bob(server, 2)
    home = tmp_path / "home"
    home.mkdir()
    ca_file = home / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    out = home / "delivered.mbox"
    rc = home / "fetchmailrc"
    rc.write_text(
        "set no bouncemail\n"
        f'poll 127.0.0.1 with proto POP3 port {server.pop3_port} auth password timeout 20\n'
        f'  user "bob" there with password "{PASSWORD}" is "{os.environ.get("USER", "root")}" here\n'
        f'  options fetchall sslproto "tls1.2+" sslcertck sslcertfile "{ca_file}" sslcommonname "mx.test"\n'
        f'  mda "cat >> {out}"\n'
    )
    rc.chmod(0o600)
    result = subprocess.run(
        [fetchmail, "--fetchmailrc", str(rc), "--idfile", str(home / "fetchids"), "--pidfile", str(home / "pid"),
         "--nosyslog", "--nodetach", "-v"],
        capture_output=True, text=True, timeout=TOOL_TIMEOUT, stdin=subprocess.DEVNULL,
        env={**os.environ, "HOME": str(home), "FETCHMAILHOME": str(home)},
    )
    assert result.returncode == 0, result.stdout + result.stderr + server.tail()
    assert "STLS" in result.stdout + result.stderr
    data = out.read_bytes()
    assert data.count(b"Subject: for POP3") == 2
    body = MESSAGE.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n")
    assert data.count(body) == 2  # fetchmail hands the MDA LF line ends, dots unstuffed
    assert not os.listdir(server.mail_dir / "bob" / "cur")
    server.wait_for_log("pop3 quit user=bob removed=2")


# ---------------------------------------------------------------- curl


def test_curl_lists_and_retrieves(pop3_server, ca, tmp_path):
    """curl pop3:// with --ssl-reqd (STLS): the listing, then message 1 as sent."""
    curl = tool("curl")
    server = pop3_server()
    send_to_bob(server, 2)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    common = [curl, "--silent", "--show-error", "--max-time", "20", "--ssl-reqd", "--cacert", str(ca_file),
              "--user", f"bob:{PASSWORD}"]
    listing = subprocess.run([*common, f"pop3://127.0.0.1:{server.pop3_port}/"],
                             capture_output=True, timeout=TOOL_TIMEOUT, stdin=subprocess.DEVNULL)
    assert listing.returncode == 0, listing.stderr.decode() + server.tail()
    rows = listing.stdout.decode().split("\r\n")[:-1]
    assert [row.split()[0] for row in rows] == ["1", "2"]
    message = subprocess.run([*common, f"pop3s://127.0.0.1:{server.pop3s_port}/1"],
                             capture_output=True, timeout=TOOL_TIMEOUT, stdin=subprocess.DEVNULL)
    assert message.returncode == 0, message.stderr.decode() + server.tail()
    parsed = email.message_from_bytes(message.stdout)
    assert parsed["Subject"] == "for POP3" and message.stdout.endswith(MESSAGE.split(b"\r\n\r\n", 1)[1])
    assert int(rows[0].split()[1]) == len(message.stdout)
    assert server.log().count("pop3 login user=bob mechanism=PLAIN") == 2  # curl chose SASL PLAIN


def test_pop3_ports_speak_pop3_only_after_tls_on_995(pop3_server):
    """The implicit-TLS port says nothing in clear (rfc8314: TLS first); the
    STLS port greets in clear."""
    server = pop3_server()
    with socket.create_connection(("127.0.0.1", server.pop3_port), timeout=5) as sock:
        assert sock.recv(100).startswith(b"+OK ")
    with socket.create_connection(("127.0.0.1", server.pop3s_port), timeout=5) as sock:
        sock.settimeout(0.5)
        with pytest.raises(socket.timeout):
            sock.recv(100)


# ---------------------------------------------------------------- a store POP3 cannot read


def test_a_store_without_read_access_stops_start_up(tmp_path):
    """A third-party store plugin that lacks IMailboxAccess, with a [pop3]
    listener: twistd exits 78 with one line naming [pop3] listen and the
    store; without [pop3] it starts and serves SMTP as before."""
    plugins = tmp_path / "plugins"
    (plugins / "twisted" / "plugins").mkdir(parents=True)
    (plugins / "twisted" / "plugins" / "writeonly.py").write_text(textwrap.dedent(WRITE_ONLY_STORE))
    server = RealServer(tmp_path / "server", store_type="write-only-test", plugin_dirs=[plugins],
                        sections={"pop3": {"listen": [f"tcp:{free_port()}:interface=127.0.0.1"]}})
    server.launch()
    try:
        status = server.wait_exit(timeout=15)
    finally:
        server.stop()
    assert status == EX_CONFIG, server.tail()
    [line] = [line for line in server.stderr().splitlines() if line.strip()]
    assert line.startswith("mailsvc: config error: mailsvc.toml: [pop3] listen: the 'write-only-test' store "
                           "cannot be read by POP3"), line
    del server.sections["pop3"]
    server.start()
    server.stop()
