"""Relaying between real processes on 127.0.0.1: mailsvc to mailsvc, through a
real DNS server, to scripted peers, across a kill -9, and to and from Postfix.

Every process the tests start is stopped by its PID whatever happens: the
mailsvc servers by the ``start_server`` fixture, the DNS server and Postfix
by fixtures here. Every wait is bounded.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from realserver import RealServer, free_port, start_server, wait_for  # noqa: F401 (fixture)

SENDER = "carol@example.test"

# A message with what relaying must keep intact: lines that start with a dot,
# a lone dot, a long (but legal) line.
MESSAGE = (
    b"From: Carol <carol@example.test>\r\n"
    b"To: Alice <alice@remote.test>\r\n"
    b"Subject: relayed\r\n"
    b"Message-ID: <relay-test@example.test>\r\n"
    b"Date: Mon, 21 Sep 2026 12:00:00 +0000\r\n"
    b"\r\n"
    b"First line.\r\n"
    b".a line that starts with a dot\r\n"
    b".\r\n"
    b"..two dots\r\n"
    + b"x" * 990 + b"\r\n"
    b"The end.\r\n"
)

# Headers a delivery adds on top of the message: trace and the local delivery's own.
_ADDED = (b"Return-Path:", b"Delivered-To:", b"X-Original-To:", b"Received:")


def body_of_delivered(path: Path) -> bytes:
    """A Maildir file (LF line ends) with the added header lines removed, in wire form (CRLF)."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    while lines and lines[0].startswith(_ADDED):
        lines.pop(0)
        while lines and lines[0][:1] in (b" ", b"\t"):  # its folded continuation
            lines.pop(0)
    return b"\r\n".join(lines)


def without_trace(data: bytes) -> bytes:
    """Message data (CRLF) with the Received: lines on top removed."""
    while data.startswith(b"Received: "):
        data = data.split(b"\r\n", 1)[1]
    return data


def send(port: int, recipients, message: bytes = MESSAGE, sender: str = SENDER) -> None:
    """Hand ``message`` to the SMTP server on 127.0.0.1:``port`` with smtplib."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        refused = client.sendmail(sender, list(recipients), message)
        assert not refused


def relay_sections(**relay):
    """Config tables for a mailsvc that may relay for 127.0.0.0/8 (tables merged over the defaults)."""
    return {"smtp": {"trusted_networks": ["127.0.0.0/8"]}, "relay": relay}


def route(domain: str, port: int, host: str = "127.0.0.1", **extra) -> dict:
    """One ``[[relay.route]]`` table."""
    return {"domain": domain, "host": host, "port": port, **extra}


def remote_server(start_server, name="b") -> RealServer:
    """mailsvc B: local domain remote.test (alice, bob, carol)."""
    return start_server(
        name,
        sections={"server": {"hostname": "mx.remote.test"}, "local": {"domains": ["remote.test"]}},
    )


def only_report(server: RealServer, user: str) -> email.message.Message:
    """The one delivery report in ``user``'s Maildir, parsed."""
    [path] = server.wait_for_mail(user, timeout=15)
    report = email.message_from_bytes(path.read_bytes(), policy=email.policy.compat32)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    return report


def status_fields(report: email.message.Message) -> dict[str, str]:
    """The per-recipient fields of the (first recipient of the) report's message/delivery-status part."""
    [status] = [part for part in report.walk() if part.get_content_type() == "message/delivery-status"]
    blocks = status.get_payload()
    assert len(blocks) >= 2  # per-message fields, then one block per recipient
    return {key: re.sub(r"\r?\n(?=[ \t])", "", value) for key, value in blocks[1].items()}  # unfolded


# ---------------------------------------------------------------- a DNS server

DNS_SERVER = '''
"""A twisted.names DNS server for the zone "test" on 127.0.0.1 (UDP, a free port).

argv[1]: JSON {name: [["MX", preference, exchange] | ["A", address], ...]}.
Prints its port on stdout once listening, then serves until killed.
"""

import json
import sys

from twisted.internet import reactor
from twisted.names import authority, dns, server

SOA = dns.Record_SOA(mname=b"ns.test", rname=b"hostmaster.test", serial=1, minimum=60, expire=60)


def record(spec):
    if spec[0] == "MX":
        return dns.Record_MX(spec[1], spec[2].encode("ascii"))
    return dns.Record_A(spec[1])


class DictAuthority(authority.FileAuthority):
    def loadFile(self, zone):
        self.soa = (b"test", SOA)
        self.records = {name.encode("ascii"): [record(r) for r in rs] for name, rs in zone.items()}


factory = server.DNSServerFactory(authorities=[DictAuthority(json.loads(sys.argv[1]))])
port = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
print(port.getHost().port, flush=True)
reactor.run()
'''


@pytest.fixture
def dns_server(tmp_path):
    """A function starting a real twisted.names DNS server for a zone; returns
    its port. Every server started is killed by its PID at the end."""
    procs: list[subprocess.Popen] = []

    def start(zone: dict) -> int:
        script = tmp_path / "dns_server.py"
        script.write_text(DNS_SERVER)
        with open(tmp_path / "dns.err", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, str(script), json.dumps(zone)],
                stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
            )
        procs.append(proc)
        ready = threading.Event()
        line: list[bytes] = []

        def read():
            line.append(proc.stdout.readline())
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        assert ready.wait(15), "the DNS server did not start within 15 s"
        assert line[0].strip().isdigit(), f"DNS server: {(tmp_path / 'dns.err').read_text()}"
        return int(line[0])

    try:
        yield start
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)
            proc.stdout.close()


# ---------------------------------------------------------------- a scripted SMTP peer


class ScriptedPeer(socketserver.ThreadingTCPServer):
    """A small SMTP server on 127.0.0.1 in threads, for behaviour mailsvc will
    not show: ``rcpt(n, address)`` gives the reply to the n-th RCPT (from 1);
    ``stall_first`` never answers the end of data of the first session.

    Records ``sessions``, ``rcpts`` and the ``messages`` it said 250 to (data unstuffed).
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, rcpt=lambda n, address: "250 2.1.5 ok", stall_first=False):
        super().__init__(("127.0.0.1", 0), _PeerSession)
        self.port = self.server_address[1]
        self.rcpt_reply = rcpt
        self.stall_first = stall_first
        self.lock = threading.Lock()
        self.sessions = 0
        self.rcpts: list[str] = []
        self.messages: list[bytes] = []
        self.stalled = threading.Event()  # the first session's data is all in
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self):
        self.shutdown()
        self.server_close()
        self.thread.join(5)


class _PeerSession(socketserver.StreamRequestHandler):
    timeout = 30  # every read on the connection is bounded

    def reply(self, text: str) -> None:
        self.wfile.write(text.encode() + b"\r\n")

    def handle(self):
        server: ScriptedPeer = self.server
        with server.lock:
            server.sessions += 1
            session = server.sessions
        self.reply("220 peer.test ESMTP scripted")
        accepted = 0
        in_mail = False
        while line := self.rfile.readline(2000):
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                self.reply("250-peer.test\r\n250-PIPELINING\r\n250-SIZE 10000000\r\n250 8BITMIME")
            elif verb == b"MAIL":
                in_mail, accepted = True, 0
                self.reply("250 2.1.0 ok")
            elif verb == b"RCPT":
                address = line.decode().partition("<")[2].partition(">")[0]
                with server.lock:
                    server.rcpts.append(address)
                    n = len(server.rcpts)
                text = server.rcpt_reply(n, address) if in_mail else "503 5.5.1 MAIL first"
                accepted += text.startswith("2")
                self.reply(text)
            elif verb == b"DATA":
                if not accepted:
                    self.reply("554 5.5.1 no valid recipients")
                    continue
                self.reply("354 go ahead")
                data = []
                while (chunk := self.rfile.readline(2000)) != b".\r\n":
                    if not chunk:
                        return
                    data.append(chunk[1:] if chunk.startswith(b".") else chunk)
                if server.stall_first and session == 1:
                    server.stalled.set()
                    self.rfile.read(1)  # until the client is gone (or the timeout)
                    return
                with server.lock:
                    server.messages.append(b"".join(data))
                in_mail = False
                self.reply("250 2.0.0 ok, queued")
            elif verb == b"RSET":
                in_mail, accepted = False, 0
                self.reply("250 2.0.0 ok")
            elif verb == b"QUIT":
                self.reply("221 2.0.0 bye")
                return
            else:
                self.reply("250 2.0.0 ok")


@pytest.fixture
def scripted_peer():
    """A function starting a ``ScriptedPeer``; every one is stopped at the end."""
    peers: list[ScriptedPeer] = []

    def start(**options) -> ScriptedPeer:
        peer = ScriptedPeer(**options)
        peers.append(peer)
        return peer

    try:
        yield start
    finally:
        for peer in peers:
            peer.stop()


# ---------------------------------------------------------------- tests: mailsvc to mailsvc


def test_static_route_to_another_mailsvc(start_server):
    """(a) A relays for a trusted client through a [[relay.route]] to B, which
    delivers into its Maildir: a small message and a 3 MB one (streamed over
    real TCP) arrive byte for byte (only the trace and delivery headers
    added), and A's spool empties."""
    b = remote_server(start_server)
    a = start_server("a", sections=relay_sections(route=[route("remote.test", b.port, tls="none")]))
    send(a.port, ["alice@remote.test"])
    [path] = b.wait_for_mail("alice", timeout=15)
    assert body_of_delivered(path) == MESSAGE
    head = path.read_bytes().split(b"\n\n", 1)[0]
    assert head.startswith(b"Return-Path: <carol@example.test>\nDelivered-To: alice@remote.test\n")
    assert b"by mx.remote.test (mailsvc)" in head and b"by mx.test (mailsvc)" in head

    line = b".0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n"
    big = MESSAGE.replace(b"Subject: relayed", b"Subject: big") + line * (3 * 1024 * 1024 // len(line))
    send(a.port, ["bob@remote.test"], big)
    [path] = b.wait_for_mail("bob", timeout=20)
    assert body_of_delivered(path) == big
    a.wait_idle(timeout=10)
    assert a.log().count("relayed id=") == 2


def test_mx_failover_through_a_real_dns_server(start_server, dns_server):
    """(b) remote.test has two MX in a real DNS server; the better one (127.0.0.2)
    refuses connections, so A delivers through the second (B on 127.0.0.1)."""
    b = remote_server(start_server)
    dns_port = dns_server({
        "remote.test": [["MX", 10, "mx1.remote.test"], ["MX", 20, "mx2.remote.test"]],
        "mx1.remote.test": [["A", "127.0.0.2"]],
        "mx2.remote.test": [["A", "127.0.0.1"]],
    })
    a = start_server("a", sections=relay_sections(resolver=f"127.0.0.1:{dns_port}", port=b.port))
    send(a.port, ["alice@remote.test"])
    [path] = b.wait_for_mail("alice", timeout=15)
    assert body_of_delivered(path) == MESSAGE
    log = a.wait_for_log("relayed id=", timeout=5)
    assert f"mx1.remote.test[127.0.0.2]:{b.port} failed" in log
    assert f"to mx2.remote.test[127.0.0.1]:{b.port}" in log


def test_null_mx_bounces_to_the_local_sender(start_server, dns_server):
    """(c) nullmx.test publishes a null MX (rfc7505): the local sender gets a
    bounce with Status 5.1.10, and nothing is sent anywhere."""
    dns_port = dns_server({"nullmx.test": [["MX", 0, ""]]})
    a = start_server("a", sections=relay_sections(resolver=f"127.0.0.1:{dns_port}"))
    send(a.port, ["someone@nullmx.test"])
    report = only_report(a, "carol")
    fields = status_fields(report)
    assert fields["Action"] == "failed"
    assert fields["Status"] == "5.1.10"
    assert fields["Final-Recipient"] == "rfc822; someone@nullmx.test"
    assert "null MX" in fields["Diagnostic-Code"]
    a.wait_idle(timeout=10)


def test_451_three_times_then_delivered(start_server, scripted_peer):
    """(d) A peer answers 451 to RCPT three times, then 250: with retries every
    second, A delivers on the fourth attempt, once."""
    peer = scripted_peer(rcpt=lambda n, address: "250 2.1.5 ok" if n >= 4 else "451 4.7.1 greylisted, come back")
    a = start_server(
        "a",
        sections={
            **relay_sections(route=[route("remote.test", peer.port)]),
            "delivery": {"retry_first": 1, "retry_max": 1, "scan_interval": 1},
        },
    )
    send(a.port, ["alice@remote.test"])
    wait_for(lambda: peer.messages, timeout=20, message="the message at the peer", details=a.tail)
    a.wait_idle(timeout=10)
    assert peer.rcpts == ["alice@remote.test"] * 4
    assert [without_trace(m) for m in peer.messages] == [MESSAGE]


def test_550_bounces_as_an_rfc3464_report(start_server, scripted_peer):
    """(e) A peer refuses the recipient with 550: the local sender gets an
    rfc3464 report naming the peer (Remote-MTA) and quoting its words."""
    peer = scripted_peer(rcpt=lambda n, address: "550 5.1.1 <alice@remote.test>: no such mailbox here (scripted)")
    a = start_server("a", sections=relay_sections(route=[route("remote.test", peer.port)]))
    send(a.port, ["alice@remote.test"])
    report = only_report(a, "carol")
    fields = status_fields(report)
    assert fields["Action"] == "failed"
    assert fields["Status"] == "5.1.1"
    assert fields["Remote-MTA"] == "dns; 127.0.0.1"
    assert fields["Diagnostic-Code"] == "smtp; 550 5.1.1 <alice@remote.test>: no such mailbox here (scripted)"
    human = report.get_payload(0).get_payload(decode=True).decode()
    assert "127.0.0.1 said: 550 5.1.1 <alice@remote.test>: no such mailbox here (scripted)" in " ".join(human.split())
    a.wait_idle(timeout=10)
    assert peer.messages == []


def test_kill_9_during_delivery_then_sent_again(start_server, scripted_peer):
    """(f) A is killed (SIGKILL) while the peer holds back its reply to the end
    of data; after a restart the message is sent again and arrives: never lost."""
    peer = scripted_peer(stall_first=True)
    a = start_server("a", sections=relay_sections(route=[route("remote.test", peer.port)]))
    send(a.port, ["alice@remote.test"])
    assert peer.stalled.wait(15), "the message never reached the peer"
    a.kill9()
    assert any(f.startswith("relay/C.") for f in a.spool_files())
    a.restart()
    wait_for(lambda: peer.messages, timeout=15, message="the message sent again", details=a.tail)
    a.wait_idle(timeout=10)
    assert [without_trace(m) for m in peer.messages] == [MESSAGE]
    assert peer.sessions == 2


# ---------------------------------------------------------------- Postfix

POSTFIX = "/usr/sbin/postfix"
POSTFIX_DAEMONS = "/usr/lib/postfix/sbin"

MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PrivatePostfix:
    """Debian's Postfix as a private instance in ``root``: its own main.cf and
    queue, smtpd on 127.0.0.1:``port`` only, mail for ``sink@pf.test``
    delivered by virtual(8) into ``root/mail/sink/``, mail for
    ``example.test`` sent (transport_maps) to mailsvc on ``mailsvc_port``.

    Stopped with ``postfix -c DIR stop``, then its master PID killed if it lingers.
    """

    def __init__(self, root: Path, mailsvc_port: int) -> None:
        self.root = root
        self.port = free_port()
        self.conf = root / "etc"
        self.queue = root / "queue"
        self.mail = root / "mail"
        self.log_path = root / "postfix.log"
        self.mailsvc_port = mailsvc_port
        self.master: int | None = None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAIL_")}
        env["MAIL_CONFIG"] = str(self.conf)
        return env

    def start(self) -> None:
        pw = pwd.getpwnam("postfix")
        data = self.root / "data"
        for d in (self.conf, self.queue, data, self.mail):
            d.mkdir(parents=True, exist_ok=True)
        os.chown(data, pw.pw_uid, pw.pw_gid)
        os.chown(self.mail, pw.pw_uid, pw.pw_gid)
        p = self.root  # every directory above must be reachable by the postfix user
        while p != p.parent:
            if os.stat(p).st_mode & 0o005 != 0o005:
                os.chmod(p, os.stat(p).st_mode | 0o005)
            p = p.parent
        main_cf = {
            "compatibility_level": "3.6",
            "config_directory": self.conf,
            "queue_directory": self.queue,
            "data_directory": data,
            "maillog_file": self.log_path,
            "maillog_file_prefixes": self.root,
            "myhostname": "postfix.pf.test",
            "mydomain": "pf.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "relayhost": "",
            "transport_maps": f"inline:{{ example.test=smtp:[127.0.0.1]:{self.mailsvc_port} }}",
            "smtp_dns_support_level": "disabled",
            "smtpd_peername_lookup": "no",
            "biff": "no",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "virtual_mailbox_domains": "pf.test",
            "virtual_mailbox_base": self.mail,
            "virtual_mailbox_maps": "inline:{ sink@pf.test=sink/ }",
            "virtual_uid_maps": f"static:{pw.pw_uid}",
            "virtual_gid_maps": f"static:{pw.pw_gid}",
            "virtual_minimum_uid": str(min(pw.pw_uid, 100)),
            "shlib_directory": "/usr/lib/postfix",
            "daemon_directory": POSTFIX_DAEMONS,
            "command_directory": "/usr/sbin",
            "meta_directory": "/etc/postfix",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "import_environment": "MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C",
        }
        (self.conf / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main_cf.items()))
        (self.conf / "master.cf").write_text(MASTER_CF.format(port=self.port))
        try:
            result = subprocess.run([POSTFIX, "-c", str(self.conf), "start"], env=self.env(),
                                    capture_output=True, timeout=30)
        finally:
            self._find_master()
        assert result.returncode == 0, f"postfix start exited {result.returncode}: {result.stderr!r}\n{self.tail()}"
        wait_for(self._answers, 15, "Postfix's 220 greeting", details=self.tail)

    def _find_master(self, wait: float = 10) -> None:
        pidfile = self.queue / "pid" / "master.pid"
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                self.master = int(pidfile.read_text().split()[0])
                return
            except (OSError, ValueError, IndexError):
                time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                return sock.recv(512).startswith(b"220 ")
        except OSError:
            return False

    def alive(self) -> bool:
        if self.master is None:
            return False
        try:
            with open(f"/proc/{self.master}/stat") as f:
                return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
        except OSError:
            return False

    def stop(self) -> None:
        """``postfix stop``; SIGKILL to the master if it is still there after 10 s."""
        if self.master is None:
            self._find_master(wait=0)
        try:
            subprocess.run([POSTFIX, "-c", str(self.conf), "stop"], env=self.env(), capture_output=True, timeout=20)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 10
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.alive():
            os.kill(self.master, signal.SIGKILL)

    def tail(self) -> str:
        try:
            return "--- postfix log:\n" + "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "--- no postfix log"

    def maildir(self) -> list[Path]:
        new = self.mail / "sink" / "new"
        return sorted(new.iterdir()) if new.is_dir() else []


@pytest.fixture
def postfix():
    """A function starting a ``PrivatePostfix`` (FAILS when Postfix is not
    installed); it is stopped at the end of the test in all cases.

    Its directory is made with ``mkdtemp`` in the system temp directory, not
    under pytest's ``tmp_path``: the postfix user must traverse every parent,
    and any pytest run starting meanwhile puts ``/tmp/pytest-of-<user>``
    back to mode 0700. It is removed at the end.
    """
    started: list[PrivatePostfix] = []
    roots: list[Path] = []

    def start(mailsvc_port: int) -> PrivatePostfix:
        assert os.path.exists(POSTFIX) and os.path.isdir(POSTFIX_DAEMONS), (
            "Postfix is not installed: apt-get install postfix (the test needs /usr/sbin/postfix)"
        )
        root = Path(tempfile.mkdtemp(prefix="mailsvc-test-postfix-"))
        roots.append(root)
        root.chmod(0o755)
        instance = PrivatePostfix(root, mailsvc_port)
        started.append(instance)
        instance.start()
        return instance

    try:
        yield start
    finally:
        for instance in started:
            instance.stop()
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)


def test_postfix_both_ways(start_server, postfix):
    """(g) mailsvc relays to a real Postfix (delivered by virtual(8) into a
    Maildir), and Postfix relays to mailsvc (delivered into its Maildir):
    both arrive byte for byte."""
    a = start_server("a", sections=relay_sections())  # its route to Postfix is set below
    pf = postfix(a.port)
    a.sections["relay"] = {"route": [route("pf.test", pf.port)]}
    a.restart()

    message = MESSAGE.replace(b"alice@remote.test", b"sink@pf.test")
    send(a.port, ["sink@pf.test"], message)
    [path] = wait_for(pf.maildir, 20, "the message in Postfix's Maildir", details=lambda: pf.tail() + "\n" + a.tail())
    assert body_of_delivered(path) == message
    assert b"by mx.test (mailsvc)" in path.read_bytes()
    a.wait_idle(timeout=10)

    back = MESSAGE.replace(b"alice@remote.test", b"alice@example.test")
    send(pf.port, ["alice@example.test"], back, sender="sink@pf.test")
    [path] = wait_for(lambda: a.maildir("alice"), 20, "the message from Postfix in alice's Maildir",
                      details=lambda: pf.tail() + "\n" + a.tail())
    data = path.read_bytes()
    assert b"by postfix.pf.test (Postfix)" in data
    # Postfix adds its Received: line; nothing else of the message changes.
    assert body_of_delivered(path) == back


def test_postfix_both_ways_with_smtputf8(start_server, postfix):
    """SMTPUTF8 (rfc6531) between mailsvc and a real Postfix: jörg at
    mailsvc writes to Postfix, which takes MAIL ... SMTPUTF8 from mailsvc's
    relay; Postfix relays a message for jörg back, which mailsvc takes with
    SMTPUTF8 and delivers into his Maildir. UTF-8 headers arrive unchanged."""
    joerg = "j\u00f6rg"
    a = start_server("a", sections={**relay_sections(), "local": {"users": ["alice", "bob", joerg]}})
    pf = postfix(a.port)
    a.sections["relay"] = {"route": [route("pf.test", pf.port)]}
    a.restart()
    subject = "Subject: Gr\u00fc\u00dfe \u2603\r\n".encode()

    message = subject + f"From: {joerg}@example.test\r\nTo: sink@pf.test\r\n\r\nHall\u00f6\r\n".encode()
    with smtplib.SMTP("127.0.0.1", a.port, timeout=10) as client:
        client.ehlo("client.test")
        assert not client.sendmail(f"{joerg}@example.test", ["sink@pf.test"], message, mail_options=["SMTPUTF8"])
    [path] = wait_for(pf.maildir, 20, "the message in Postfix's Maildir", details=lambda: pf.tail() + "\n" + a.tail())
    data = path.read_bytes()
    assert f"Return-Path: <{joerg}@example.test>".encode() in data
    assert subject.replace(b"\r\n", b"\n") in data
    assert " with UTF8SMTP".encode() in data  # Postfix's Received: line says it came with SMTPUTF8
    a.wait_idle(timeout=10)

    back = subject + (
        f"From: sink@pf.test\r\nTo: {joerg}@example.test\r\nMessage-ID: <utf8@pf.test>\r\n"
        "Date: Mon, 21 Sep 2026 12:00:00 +0000\r\n\r\nzur\u00fcck\r\n"
    ).encode()
    with smtplib.SMTP("127.0.0.1", pf.port, timeout=10) as client:
        client.ehlo("client.test")
        assert not client.sendmail("sink@pf.test", [f"{joerg}@example.test"], back, mail_options=["SMTPUTF8"])
    [path] = wait_for(lambda: a.maildir(joerg), 20, "the message from Postfix in jörg's Maildir",
                      details=lambda: pf.tail() + "\n" + a.tail())
    data = path.read_bytes()
    assert b"by postfix.pf.test (Postfix)" in data
    assert b"by mx.test (mailsvc) with UTF8SMTP id " in data
    assert f"Delivered-To: {joerg}@example.test\n".encode() in data
    assert body_of_delivered(path) == back


def test_utf8_message_to_a_peer_without_smtputf8_bounces_as_a_global_report(start_server, scripted_peer):
    """A message that needs SMTPUTF8 (a UTF-8 recipient) meets a peer without
    it: never sent (rfc6531 3.2), it bounces with 5.6.7, and the local UTF-8
    sender gets an rfc6533 report: message/global-delivery-status naming the
    recipient as utf-8, the original returned as message/global-headers."""
    joerg, zoe = "j\u00f6rg", "zo\u00eb@remote.test"
    peer = scripted_peer()
    a = start_server("a", sections={
        **relay_sections(route=[route("remote.test", peer.port)]),
        "local": {"users": ["alice", "bob", joerg]},
    })
    message = f"From: {joerg}@example.test\r\nTo: {zoe}\r\nSubject: Gr\u00fc\u00dfe\r\n\r\nHallo\r\n".encode()
    with smtplib.SMTP("127.0.0.1", a.port, timeout=10) as client:
        client.ehlo("client.test")
        assert not client.sendmail(f"{joerg}@example.test", [zoe], message, mail_options=["SMTPUTF8"])
    [path] = a.wait_for_mail(joerg, timeout=15)
    data = path.read_bytes()
    assert data.startswith(b"Return-Path: <>\n")
    report = email.message_from_bytes(data, policy=email.policy.compat32)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "global-delivery-status"
    text, status, original = report.get_payload()
    assert status.get_content_type() == "message/global-delivery-status"
    assert f"Final-Recipient: utf-8; {zoe}".encode() in data
    assert b"Status: 5.6.7" in data
    assert b"does not offer SMTPUTF8" in data
    assert original.get_content_type() == "message/global-headers"
    assert "Subject: Gr\u00fc\u00dfe".encode() in data  # the original's header, raw UTF-8
    a.wait_idle(timeout=10)
    assert peer.messages == [] and peer.rcpts == []
