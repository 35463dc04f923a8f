"""The rules that never bend, on the real process (DESIGN.md rule 1: nothing
is lost), and third-party plugins found on sys.path.

A store plugin that blocks in ``deliver`` lets a test kill -9 the server after
``250 queued`` and before any delivery, for sure. The plugins are written by
the tests into ``<tmp>/plugins/twisted/plugins/`` (no ``__init__.py`` in
``twisted/``, as Twisted wants) and found through the server's PYTHONPATH.
"""

from __future__ import annotations

import re
import smtplib
import textwrap
from pathlib import Path

import pytest

from realserver import RawSMTP, RealServer, real_server, start_server  # noqa: F401 (fixtures)

SLOW_STORE = '''
"""A mailbox store for tests whose deliver() blocks for a minute."""

import time

from twisted.plugin import IPlugin
from zope.interface import implementer

from mailsvc.interfaces import IMailboxStore, IMailboxStoreFactory


@implementer(IMailboxStore)
class SlowStore:
    """Never delivers: deliver() sleeps 60 s (kill -9 ends it), then fails."""

    def deliver(self, mailbox, headers, source):
        time.sleep(60)
        raise RuntimeError("the slow-test store never delivers")

    def exists(self, mailbox):
        return False


@implementer(IPlugin, IMailboxStoreFactory)
class SlowStoreFactory:
    name = "slow-test"
    description = "A store whose deliveries block for 60 s (tests only)"

    def makeStore(self, options):
        return SlowStore()


slowStore = SlowStoreFactory()
'''

MEMO_STORE = '''
"""A mailbox store for tests: each mailbox is one file, <path>/<mailbox>.eml."""

import os
import shutil

from twisted.plugin import IPlugin
from zope.interface import implementer

from mailsvc.errors import ConfigError
from mailsvc.interfaces import IMailboxStore, IMailboxStoreFactory


@implementer(IMailboxStore)
class MemoStore:
    """Writes the message (headers, then the source as given) to <path>/<mailbox>.eml."""

    def __init__(self, path):
        self.path = path

    def deliver(self, mailbox, headers, source):
        os.makedirs(self.path, exist_ok=True)
        target = os.path.join(self.path, mailbox + ".eml")
        with open(target + ".tmp", "wb") as out:
            for line in headers:
                out.write(line.encode("utf-8") + b"\\r\\n")
            shutil.copyfileobj(source, out)
            out.flush()
            os.fsync(out.fileno())
        os.rename(target + ".tmp", target)
        return target

    def exists(self, mailbox):
        return os.path.exists(os.path.join(self.path, mailbox + ".eml"))


@implementer(IPlugin, IMailboxStoreFactory)
class MemoStoreFactory:
    name = "memo-test"
    description = "One file per mailbox, <path>/<mailbox>.eml (tests only)"

    def makeStore(self, options):
        unknown = set(options) - {"path"}
        if unknown:
            raise ConfigError(f"[store] {sorted(unknown)[0]}: unknown option for memo-test")
        return MemoStore(options["path"])


memoStore = MemoStoreFactory()
'''

DENY_POLICY = '''
"""A policy for tests: refuses senders whose address contains a word."""

from twisted.plugin import IPlugin
from zope.interface import implementer

from mailsvc.errors import ConfigError
from mailsvc.interfaces import IPolicy, IPolicyFactory
from mailsvc.policy import Verdict


@implementer(IPolicy)
class DenyWordPolicy:
    def __init__(self, word):
        self.word = word

    def connect(self, session):
        return None

    def helo(self, session, name):
        return None

    def mail(self, session, sender, parameters):
        if self.word in sender.lower():
            return Verdict.reject(f"<{sender}>: no {self.word} here", code=554, status="5.7.1")
        return None

    def rcpt(self, session, recipient, parameters):
        return None

    def endOfData(self, session, envelope):
        return None


@implementer(IPlugin, IPolicyFactory)
class DenyWordPolicyFactory:
    name = "deny-test"
    description = "Refuses senders whose address contains `word` (tests only)"

    def makePolicy(self, options):
        word = options.get("word")
        if not isinstance(word, str) or not word:
            raise ConfigError("[[policy]] word: deny-test needs a word")
        return DenyWordPolicy(word.lower())


denyPolicy = DenyWordPolicyFactory()
'''


def plugin_dir(root: Path, **modules: str) -> Path:
    """A sys.path entry holding ``twisted/plugins/<name>.py`` for each module given."""
    folder = root / "plugins" / "twisted" / "plugins"
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in modules.items():
        (folder / f"{name}.py").write_text(textwrap.dedent(source))
    assert not list((root / "plugins" / "twisted").rglob("__init__.py"))
    return root / "plugins"


def queue_id(reply_text: bytes | str) -> str:
    """The queue ID in a ``250 2.0.0 Ok: queued as ID`` reply text."""
    if isinstance(reply_text, bytes):
        reply_text = reply_text.decode()
    return re.fullmatch(r"2\.0\.0 Ok: queued as ([0-9a-v]{20})", reply_text).group(1)


def send_raw_message(server: RealServer, message: bytes) -> str:
    """Send ``message`` (wire form, no final dot) to alice over a raw socket; return its queue ID."""
    with RawSMTP(server.port) as raw:
        assert raw.reply()[0] == 220
        assert raw.command("EHLO crash.test")[0] == 250
        assert raw.command("MAIL FROM:<x@remote.test>")[0] == 250
        assert raw.command("RCPT TO:<alice@example.test>")[0] == 250
        assert raw.command("DATA")[0] == 354
        raw.send(message + b".\r\n")
        code, text = raw.reply()
        assert code == 250, (code, text)
        return queue_id(text)


def test_kill9_after_250_then_delivered_exactly_once(start_server, tmp_path):
    """kill -9 right after ``250 queued``, before delivery (the store blocks):
    the spool still holds the message's C. and D. files; after a restart with
    the Maildir store it is delivered exactly once, byte-exact, and the spool
    empties."""
    plugins = plugin_dir(tmp_path, slowstore=SLOW_STORE)
    server = start_server(store_type="slow-test", plugin_dirs=[plugins])
    message = (
        b"From: x@remote.test\r\nTo: alice@example.test\r\nSubject: survives a crash\r\n\r\n"
        b"line one\r\n..stuffed dot\r\n" + b"z" * 998 + b"\r\n\xc3\xa9t\xc3\xa9\r\n"
    )
    id = send_raw_message(server, message)
    server.kill9()

    assert server.spool_files() == [f"local/C.{id}", f"local/D.{id}"]
    assert server.maildir("alice") == []

    server.restart(store_type="maildir")
    [path] = server.wait_for_mail("alice")
    server.wait_idle()
    assert server.spool_files() == []
    assert server.maildir("alice") == [path]
    head = b"Return-Path: <x@remote.test>\nDelivered-To: alice@example.test\n"
    data = path.read_bytes()
    assert data.startswith(head)
    received, rest = data[len(head) :].split(b"\n", 1)
    assert re.fullmatch(
        rb"Received: from crash\.test \(\[127\.0\.0\.1\]\) by mx\.test \(mailsvc\) with ESMTP id "
        + id.encode()
        + rb" for <alice@example\.test>; .+",
        received,
    ), received
    assert rest == message.replace(b"\r\n", b"\n").replace(b"\n..", b"\n.")
    log = server.log(this_run=True)
    assert "recovered 1 queued messages" in log
    assert log.count(f"delivered id={id} to=<alice@example.test>") == 1


def test_kill9_in_the_middle_of_data_leaves_nothing(real_server):
    """kill -9 while a message is half received (body lines sent, no final
    dot): after a restart nothing is delivered and the spool holds no file at
    all (tmp/ empty, no C./D.)."""
    raw = RawSMTP(real_server.port)
    try:
        assert raw.reply()[0] == 220
        assert raw.command("EHLO crash.test")[0] == 250
        assert raw.command("MAIL FROM:<x@remote.test>")[0] == 250
        assert raw.command("RCPT TO:<alice@example.test>")[0] == 250
        assert raw.command("DATA")[0] == 354
        # More than the spool writer's buffer, so part of it reaches the disk.
        raw.send(b"Subject: half\r\n\r\n" + (b"y" * 98 + b"\r\n") * 3000)
        temp = real_server.wait_for(
            lambda: [p for p in (real_server.spool_dir / "tmp").iterdir() if p.stat().st_size > 0],
            message="data written to spool/tmp",
        )
        assert len(temp) == 1
        real_server.kill9()
    finally:
        raw.close()
    assert real_server.spool_files() == [f"tmp/{temp[0].name}"]

    real_server.restart()
    real_server.wait_for_log("recovered 0 queued messages")
    assert real_server.spool_files() == []
    assert list((real_server.spool_dir / "tmp").iterdir()) == []
    assert real_server.maildir("alice") == []
    assert "accepted id=" not in real_server.log()


def test_third_party_store_plugin_from_sys_path(start_server, tmp_path):
    """A store plugin in a twisted/plugins/ folder on PYTHONPATH, chosen by
    name (``[store] type = "memo-test"``), receives the delivery:
    <path>/alice.eml holds the trace headers and the message."""
    plugins = plugin_dir(tmp_path, memostore=MEMO_STORE)
    server = start_server(store_type="memo-test", plugin_dirs=[plugins])
    message = b"Subject: via a plugin\r\n\r\nhello plugin\r\n"
    with smtplib.SMTP("127.0.0.1", server.port, local_hostname="plugin.test", timeout=10) as client:
        client.ehlo()
        client.mail("x@remote.test")
        client.rcpt("alice@example.test")
        code, text = client.data(message)
    assert code == 250, text
    id = queue_id(text)
    server.wait_idle()
    memo = server.mail_dir / "alice.eml"
    data = memo.read_bytes()
    head = b"Return-Path: <x@remote.test>\r\nDelivered-To: alice@example.test\r\nReceived: from plugin.test "
    assert data.startswith(head), data
    received, rest = data.split(b"\r\n", 3)[2:]
    assert f" id {id} for <alice@example.test>; ".encode() in received
    assert rest == message
    assert sorted(p.name for p in server.mail_dir.iterdir()) == ["alice.eml"]


def test_third_party_policy_plugin(start_server, tmp_path):
    """A policy plugin on PYTHONPATH, chosen by ``[[policy]] name = "deny-test"``
    with its option ``word = "spam"``: its MAIL hook's Verdict.reject reaches
    smtplib as is (554 5.7.1 and its text); other senders pass and are delivered."""
    plugins = plugin_dir(tmp_path, denypolicy=DENY_POLICY)
    server = start_server(plugin_dirs=[plugins], policies=[{"name": "deny-test", "word": "spam"}])
    with smtplib.SMTP("127.0.0.1", server.port, local_hostname="policy.test", timeout=10) as client:
        with pytest.raises(smtplib.SMTPSenderRefused) as caught:
            client.sendmail("Spammer@remote.test", ["alice@example.test"], b"Subject: buy\r\n\r\nbuy\r\n")
        assert caught.value.smtp_code == 554
        assert caught.value.smtp_error == b"5.7.1 <Spammer@remote.test>: no spam here"
        client.rset()
        assert client.sendmail("friend@remote.test", ["alice@example.test"], b"Subject: hi\r\n\r\nhi\r\n") == {}
    [path] = server.wait_for_mail("alice")
    assert path.read_bytes().startswith(b"Return-Path: <friend@remote.test>\n")
    server.wait_idle()
    assert len(server.maildir("alice")) == 1
