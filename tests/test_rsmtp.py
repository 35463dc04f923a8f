"""``mailsvc rsmtp``: BSMTP batches into the spool through the receiving path.

Most tests call ``mailsvc.rsmtp.main`` in this process on a config in
``tmp_path`` and look at the spool; the last ones run the real thing: a
batch made by the UUCP agent of a running ``twistd mailsvc`` (its command
writes the batch to a file) is fed to ``mailsvc rsmtp`` of a second
instance, which delivers it into its Maildir.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from twisted.internet import defer

from mailsvc import batchreader, bsmtp, rsmtp
from mailsvc.envelope import Envelope, Recipient
from mailsvc.errors import SpoolError
from mailsvc.policy import Verdict
from mailsvc.smtp.data import DataReader
from mailsvc.spool import FileSpool
from tests.realserver import start_server  # noqa: F401 (a fixture)

CONFIG = """\
[server]
hostname = "rx.test"
spool_dir = "{root}/spool"
[local]
domains = ["example.test"]
users = ["alice", "bob"]
aliases = {{ postmaster = ["alice"] }}
[store]
path = "{root}/mail"
[[uucp.site]]
name = "faraway"
domains = ["faraway.example"]
"""

MESSAGE = b"Subject: test\r\n\r\nhello\r\n.dot line\r\n"


def write_config(root: Path) -> Path:
    """A config for ``rsmtp`` with its spool and mail under ``root``."""
    path = root / "mailsvc.toml"
    path.write_text(CONFIG.format(root=root), encoding="utf-8")
    return path


def run(root: Path, batch: bytes, *args: str) -> tuple[int, str]:
    """``mailsvc rsmtp --config <root>/mailsvc.toml`` on ``batch``: (status, stderr)."""
    config = write_config(root)
    err = io.StringIO()
    status = rsmtp.main(["--config", str(config), *args], stdin=io.BytesIO(batch), stderr=err)
    return status, err.getvalue()


def queued(root: Path) -> list:
    """The messages in the spool, oldest first."""
    return FileSpool(root / "spool").queued()


def content(root: Path, message) -> bytes:
    """What delivery would read for ``message``: prepended headers and data."""
    with FileSpool(root / "spool").open(message) as source:
        return source.read()


def transaction(sender: str, *recipients: str, body: bytes = MESSAGE) -> bytes:
    """One BSMTP transaction (MAIL, RCPT..., DATA, stuffed body, ".")."""
    commands = f"MAIL FROM:<{sender}>\r\n" + "".join(f"RCPT TO:<{r}>\r\n" for r in recipients)
    stuffed = bsmtp.BatchWriter("x")
    stuffed.begin()
    stuffed.message(Envelope(sender, ()), [Recipient(r) for r in recipients])
    return commands.encode() + b"DATA\r\n" + stuffed.data(body) + stuffed.end_message()


def test_three_transactions_middle_one_broken(tmp_path):
    """A batch of three transactions whose second names an unknown local user:
    the first and third are queued, the error names line 11, and the exit
    status is 65 (EX_DATAERR)."""
    batch = (
        b"EHLO faraway.example\r\n"  # line 1
        + transaction("a@faraway.example", "alice@example.test")  # lines 2-8
        + transaction("b@faraway.example", "nobody@example.test", body=b"second\r\n")  # lines 9-13
        + transaction("c@faraway.example", "bob@example.test", body=b"third\r\n")  # lines 14-18
        + b"QUIT\r\n"
    )
    status, err = run(tmp_path, batch)
    assert status == batchreader.EX_DATAERR
    assert "line 11: RCPT TO:<nobody@example.test>: 550 5.1.1" in err
    assert "line 12: DATA: 554" in err  # no valid recipient: the message is skipped, not read as commands
    assert "the message of lines 13 to 14 is skipped" in err
    messages = queued(tmp_path)
    assert [m.envelope.sender for m in messages] == ["a@faraway.example", "c@faraway.example"]
    assert [r.mailbox for m in messages for r in m.envelope.recipients] == ["alice", "bob"]
    assert content(tmp_path, messages[0]).endswith(b"\r\n" + MESSAGE)
    assert "2 message(s) queued from 3 transaction(s)" in err


def test_all_queued_exit_zero_and_received_line(tmp_path):
    """A clean batch: exit 0, nothing on stderr; the message is stored as sent
    (dot-stuffing undone), with a ``Received: from <EHLO name> (uucp) ... with
    BSMTP`` line, under the hop of each recipient (local, uucp site, relay)."""
    batch = bsmtp.batch_bytes(
        "faraway.example",
        [
            bsmtp.BatchMessage(
                Envelope("a@faraway.example", ()),
                (Recipient("alice@example.test"), Recipient("z@faraway.example"), Recipient("y@elsewhere.test")),
                [MESSAGE],
                len(MESSAGE),
            )
        ],
    )
    status, err = run(tmp_path, batch)
    assert (status, err) == (0, "")
    hops = {m.hop: m for m in queued(tmp_path)}
    assert set(hops) == {"local", "uucp.faraway", "relay"}
    data = content(tmp_path, hops["local"])
    received, rest = data.split(b"\r\n", 1)
    assert received.startswith(b"Received: from faraway.example (uucp) by rx.test (mailsvc) with BSMTP id ")
    assert rest == MESSAGE
    assert hops["local"].envelope.protocol == "BSMTP"


def test_batch_without_ehlo_is_accepted(tmp_path):
    """Many generators write no HELO: an implicit EHLO opens the session, and
    the Received line honestly says the batch named no one (``from uucp``)."""
    batch = transaction("a@faraway.example", "bob@example.test") + b"QUIT\r\n"
    status, err = run(tmp_path, batch)
    assert (status, err) == (0, "")
    [message] = queued(tmp_path)
    assert content(tmp_path, message).startswith(b"Received: from uucp by rx.test (mailsvc) with BSMTP id ")


def test_missing_terminator_loses_only_the_last(tmp_path):
    """The last message has no "." line: it is not queued, the error says so
    with its line, the earlier one is queued, nothing half-written is left."""
    batch = transaction("a@x.test", "bob@example.test") + b"MAIL FROM:<b@x.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nhalf\r\n"
    status, err = run(tmp_path, batch)
    assert status == batchreader.EX_DATAERR
    assert "line 12: end of input inside the message begun at line 11" in err
    assert [m.envelope.sender for m in queued(tmp_path)] == ["a@x.test"]
    assert os.listdir(tmp_path / "spool" / "tmp") == []


def test_bad_command_and_bare_lf_do_not_stop_the_batch(tmp_path):
    """An unknown command and a line ending in a bare LF are reported with their
    line numbers; the transactions around them are queued."""
    batch = (
        b"EHLO f\r\n"
        b"FROB\r\n"
        + transaction("a@x.test", "bob@example.test")
        + b"NOOP\n"
        + transaction("b@x.test", "alice@example.test")
        + b"QUIT\r\n"
    )
    status, err = run(tmp_path, batch)
    assert status == batchreader.EX_DATAERR
    assert "line 2: FROB: 500 5.5.2" in err
    assert "line 11: NOOP: refused: the line ends with a bare LF" in err
    assert len(queued(tmp_path)) == 2


def test_body_after_refused_mail_is_never_read_as_commands(tmp_path):
    """MAIL refused (bad syntax): the RCPT and DATA fail, and the message after
    DATA, though it holds SMTP commands, is skipped to its "." line."""
    batch = (
        b"MAIL FROM:<bad address>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
        b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nsmuggled\r\n.\r\n"
        + transaction("good@x.test", "bob@example.test")
    )
    status, err = run(tmp_path, batch)
    assert status == batchreader.EX_DATAERR
    assert "line 1: MAIL FROM:<bad address>: 501" in err
    assert [m.envelope.sender for m in queued(tmp_path)] == ["good@x.test"]


def test_transaction_without_data_is_dropped_and_the_next_one_kept(tmp_path):
    """A MAIL inside a transaction that never reached DATA: the old one is
    reported as dropped, the new one goes through."""
    batch = b"MAIL FROM:<a@x.test>\r\nRCPT TO:<bob@example.test>\r\n" + transaction("b@x.test", "alice@example.test")
    status, err = run(tmp_path, batch)
    assert status == batchreader.EX_DATAERR
    assert "line 3: the transaction begun at line 1 has no DATA; it is dropped" in err
    assert [m.envelope.sender for m in queued(tmp_path)] == ["b@x.test"]


def test_concatenated_batches(tmp_path):
    """Input after QUIT is a new session: both batches are queued."""
    one = bsmtp.batch_bytes("a.example", [bsmtp.BatchMessage(Envelope("a@x.test", ()), (Recipient("bob@example.test"),), [b"1\r\n"])])
    two = bsmtp.batch_bytes("b.example", [bsmtp.BatchMessage(Envelope("b@x.test", ()), (Recipient("bob@example.test"),), [b"2\r\n"])])
    status, err = run(tmp_path, one + b"\r\n" + two)
    assert (status, err) == (0, "")
    senders = sorted(m.envelope.sender for m in queued(tmp_path))
    assert senders == ["a@x.test", "b@x.test"]


def test_data_bare_lf_refused_and_big_message_streamed(tmp_path):
    """A message holding a bare LF is refused at its end (550 5.5.2, the
    smuggling rule); a 2 MB message in the same batch is queued whole."""
    big = b"".join(b"%07d " % i + b"x" * 70 + b"\r\n" for i in range(26000))
    batch = transaction("a@x.test", "bob@example.test", body=b"bad\nline\r\n") + transaction(
        "b@x.test", "bob@example.test", body=big
    )
    status, err = run(tmp_path, batch)
    assert status == batchreader.EX_DATAERR
    assert "550 5.5.2" in err
    [message] = queued(tmp_path)
    assert content(tmp_path, message).split(b"\r\n", 1)[1] == big


def context_for(tmp_path, spool=None, policies=()):
    """A receiving context and machine settings, as ``rsmtp.build`` makes them."""
    from mailsvc import config

    context, settings = rsmtp.build(config.load(write_config(tmp_path)))
    if spool is not None:
        context.spool = spool
    context.policies = list(policies)
    return context, settings


class BrokenSpool:
    """A spool whose every new message fails (a full disk)."""

    def newMessage(self):
        raise SpoolError("disk full", temporary_full=True)


def test_spool_failure_is_temporary(tmp_path):
    """The spool refuses (452 4.3.1): exit 75, so that uuxqt may run the batch again."""
    context, settings = context_for(tmp_path, spool=BrokenSpool())
    err = []
    result = batchreader.BatchReader(context, settings, say=err.append).read(io.BytesIO(transaction("a@x.test", "bob@example.test")))
    assert result.exit_status == batchreader.EX_TEMPFAIL
    assert any("452 4.3.1" in line for line in err)
    assert result.queued == []


class SlowPolicy:
    """A policy whose RCPT hook answers later (a DNS lookup, say)."""

    def __getattr__(self, name):
        return lambda *args: None

    def rcpt(self, session, recipient, parameters):
        return defer.Deferred()


def test_asynchronous_policy_stops_the_batch_as_temporary(tmp_path):
    """No reactor runs in rsmtp: a Deferred that does not fire at once cannot be
    waited for; the batch stops with status 75 (and nothing half-queued)."""
    context, settings = context_for(tmp_path, policies=[SlowPolicy()])
    err = []
    result = batchreader.BatchReader(context, settings, say=err.append).read(io.BytesIO(transaction("a@x.test", "bob@example.test")))
    assert result.exit_status == batchreader.EX_TEMPFAIL
    assert "asynchronously" in err[0]
    assert queued(tmp_path) == []


class RejectingPolicy:
    """A policy refusing mail from one sender at end of data, adding a header otherwise."""

    def __getattr__(self, name):
        return lambda *args: None

    def endOfData(self, session, envelope):
        if envelope.sender == "spam@x.test":
            return Verdict.reject("no thanks", 554, "5.7.1")
        return Verdict.accept("X-Checked: yes")


def test_policies_apply_as_over_smtp(tmp_path):
    """The same policy hooks as SMTP: a refusal at end of data is reported,
    an added header is kept after our Received line."""
    context, settings = context_for(tmp_path, policies=[RejectingPolicy()])
    err = []
    batch = transaction("spam@x.test", "bob@example.test") + transaction("ok@x.test", "bob@example.test")
    result = batchreader.BatchReader(context, settings, say=err.append).read(io.BytesIO(batch))
    assert result.exit_status == batchreader.EX_DATAERR
    assert err[0].startswith("line 8: end of the message begun at line 3: 554 5.7.1 no thanks")
    [message] = queued(tmp_path)
    assert message.envelope.prepend_headers[1] == "X-Checked: yes"
    assert message.envelope.prepend_headers[0].startswith("Received: from uucp ")


def test_usage_and_config_errors(tmp_path):
    """A bad option exits 64; a config that cannot be read exits 78 naming it."""
    err = io.StringIO()
    assert rsmtp.main(["--frob"], stdin=io.BytesIO(b""), stderr=err) == rsmtp.EX_USAGE
    err = io.StringIO()
    assert rsmtp.main(["--config", str(tmp_path / "none.toml")], stdin=io.BytesIO(b""), stderr=err) == rsmtp.EX_CONFIG
    assert "none.toml" in err.getvalue()


def test_verbose_writes_replies(tmp_path):
    """--verbose shows the machine's replies and a summary on stderr."""
    status, err = run(tmp_path, transaction("a@x.test", "bob@example.test"), "--verbose")
    assert status == 0
    assert "250 2.0.0 Ok: queued as " in err and "1 message(s) queued from 1 transaction(s)" in err


# ---------------------------------------------------------------- real processes

MAILSVC = Path(sys.prefix) / "bin" / "mailsvc"


def unstuffed_data(batch: bytes) -> bytes:
    """The message data of the one transaction in ``batch``, unstuffed."""
    after = batch.split(b"\r\nDATA\r\n", 1)[1]
    content, rest = DataReader().feed(after)
    assert rest == b"QUIT\r\n"
    return content


def test_real_batch_from_the_uucp_agent_into_another_instance(start_server, tmp_path):
    """Instance A (twistd) spools mail for faraway.example under uucp.faraway;
    its UUCP agent hands the BSMTP batch to a command that writes it to a
    file. ``mailsvc rsmtp --config <B>`` feeds the file to instance B, whose
    queue runner delivers it into bob's Maildir, byte for byte."""
    import smtplib

    outbox = tmp_path / "outbox"
    outbox.mkdir()
    write = 'import os, sys; open(os.path.join(sys.argv[1], "batch.%d" % os.getpid()), "wb").write(sys.stdin.buffer.read())'
    a = start_server(
        "a",
        sections={
            "server": {"hostname": "a.test"},
            "uucp": {"site": [{"name": "faraway", "domains": ["faraway.example"], "command": [sys.executable, "-c", write, str(outbox)]}]},
        },
    )
    b = start_server("b", sections={"server": {"hostname": "b.test"}, "local": {"domains": ["faraway.example"]}})
    body = b"Subject: over uucp\r\n\r\nline one\r\n.starts with a dot\r\n" + b"x" * 900 + b"\r\n"
    with smtplib.SMTP("127.0.0.1", a.port, timeout=10) as client:
        client.sendmail("alice@example.test", ["bob@faraway.example"], body)
    batches = a.wait_for(lambda: sorted(outbox.iterdir()), message="a batch file from the UUCP agent")
    a.wait_idle()  # the command exited 0: delivered, removed from A's spool
    [batch_file] = batches
    batch = batch_file.read_bytes()
    assert batch.startswith(b"EHLO a.test\r\nMAIL FROM:<alice@example.test>")
    assert batch.endswith(b".\r\nQUIT\r\n")

    proc = subprocess.run(
        [str(MAILSVC), "rsmtp", "--config", str(b.write_config())],
        input=batch, capture_output=True, timeout=60, cwd=tmp_path,
    )
    assert (proc.returncode, proc.stderr) == (0, b"")
    [delivered] = b.wait_for_mail("bob", timeout=15)
    stored = delivered.read_bytes()
    head, _, rest = stored.partition(b"\nReceived: from a.test (uucp) by b.test (mailsvc) with BSMTP id ")
    assert head == b"Return-Path: <alice@example.test>\nDelivered-To: bob@faraway.example"
    _, _, after_ours = rest.partition(b"\n")
    # What A sent (its own Received line, then the message) arrives unchanged, in Maildir's LF form.
    sent = unstuffed_data(batch)
    assert sent.endswith(body) and sent.startswith(b"Received: ")
    assert after_ours == sent.replace(b"\r\n", b"\n")
