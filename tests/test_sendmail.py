"""``mailsvc sendmail``: the pure parts (options, lines, header, fix-ups,
recipients), queueing into a FileSpool, and real runs of the ``mailsvc``
script against a real ``twistd mailsvc``, running or stopped."""

from __future__ import annotations

import io
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from mailsvc import config as configuration
from mailsvc import sendmail
from mailsvc.directory import ConfigDirectory
from mailsvc.envelope import Recipient
from mailsvc.spool import FileSpool
from realserver import RealServer, start_server  # noqa: F401 (fixture)

MAILSVC = Path(sys.prefix) / "bin" / "mailsvc"
LOGIN = pwd.getpwuid(os.getuid()).pw_name
T = 1_763_891_234.0


def fired(d):
    """The result of a Deferred that has already fired (a Failure re-raised)."""
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def files_in(root: Path) -> list[str]:
    """Every file under ``root``, relative to it, but spent files kept for
    reuse (``spent/``, mailsvc.spool.recycle): they are no message's."""
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] != "spent"
    )


def lines_of(data: bytes, dot_ends: bool = True) -> list[bytes]:
    """``read_lines`` over ``data``, as a list."""
    return list(sendmail.read_lines(io.BytesIO(data), dot_ends))


def header_of(data: bytes) -> sendmail.Header:
    """The header ``read_header`` finds at the start of ``data``."""
    return sendmail.read_header(sendmail.read_lines(io.BytesIO(data)))


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    "argv, expected",
    [
        pytest.param(["bob"], dict(recipients=["bob"]), id="plain"),
        pytest.param(["-t"], dict(extract=True), id="t"),
        pytest.param(["-i", "bob"], dict(dot_ends=False, recipients=["bob"]), id="i"),
        pytest.param(["-oi", "bob"], dict(dot_ends=False, recipients=["bob"]), id="oi"),
        pytest.param(["-ti"], dict(extract=True, dot_ends=False), id="grouped"),
        pytest.param(["-f", "a@b.test", "x"], dict(sender="a@b.test", recipients=["x"]), id="f-separate"),
        pytest.param(["-fa@b.test", "x"], dict(sender="a@b.test", recipients=["x"]), id="f-attached"),
        pytest.param(["-r", "a@b.test", "x"], dict(sender="a@b.test", recipients=["x"]), id="r"),
        # What Debian's cron runs: sendmail -FCronDaemon -i -B8BITMIME -oem user
        pytest.param(
            ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"],
            dict(full_name="CronDaemon", dot_ends=False, recipients=["root"]),
            id="cron",
        ),
        pytest.param(["-F", "Full Name", "-bm", "-odi", "x"], dict(full_name="Full Name", recipients=["x"]), id="ignored"),
        pytest.param(["x", "-t", "--", "-y"], dict(extract=True, recipients=["x", "-y"]), id="options-anywhere"),
        pytest.param(["--config", "c.toml", "x"], dict(config="c.toml", recipients=["x"]), id="config"),
        pytest.param(["-C", "c.toml", "x"], dict(config="c.toml", recipients=["x"]), id="C"),
        pytest.param(["-v", "x"], dict(verbose=True, recipients=["x"]), id="verbose"),
    ],
)
def test_parse_args(argv, expected):
    """The sendmail command line, getopt style, as cron and scripts write it."""
    assert sendmail.parse_args(argv) == sendmail.SendmailOptions(**expected)


@pytest.mark.parametrize("argv", [["-bs"], ["-q"], ["-Z"], ["-f"], ["--verbose"], ["-bp"], ["-I"]])
def test_parse_args_refuses(argv):
    """Unknown or unsupported options are usage errors."""
    with pytest.raises(sendmail.UsageError):
        sendmail.parse_args(argv)


# ---------------------------------------------------------------- lines


def test_lf_and_crlf_lines():
    """LF and CRLF both end lines; a last line without a line end counts."""
    assert lines_of(b"a\nb\r\nc") == [b"a", b"b", b"c"]
    assert lines_of(b"") == []
    assert lines_of(b"\n\r\n") == [b"", b""]


def test_lone_dot_ends_input_unless_i():
    """A line holding only '.' ends the input; with -i it is an ordinary line."""
    assert lines_of(b"a\n.\nb\n") == [b"a"]
    assert lines_of(b"a\n.\nb\n", dot_ends=False) == [b"a", b".", b"b"]
    assert lines_of(b"a\n..\n") == [b"a", b".."]


@pytest.mark.parametrize("data", [b"a\rb\n", b"a\r", b"ok\n\r\n\rx\n", b"x\r\r\n"])
def test_bare_cr_is_refused(data):
    """A CR not followed by LF is refused (rfc5322 2.3; DESIGN rule 2)."""
    with pytest.raises(sendmail.InputError, match="bare CR"):
        lines_of(data)


def test_line_length_limit():
    """998 octets is fine; 999 is refused (rfc5322 2.1.1), with either line end."""
    assert lines_of(b"x" * 998 + b"\r\n") == [b"x" * 998]
    for end in (b"\n", b"\r\n", b""):
        with pytest.raises(sendmail.InputError, match="longer than 998"):
            lines_of(b"ok\n" + b"x" * 999 + end)
    with pytest.raises(sendmail.InputError):
        lines_of(b"x" * 100_000)


# ---------------------------------------------------------------- header


def test_read_header_fields_and_continuations():
    """Fields keep their continuation lines; the empty line is consumed and
    the body is left on the line iterator."""
    lines = sendmail.read_lines(io.BytesIO(b"To: a@b.test,\n  c@d.test\nSubject: hi\n\nbody\n"))
    header = sendmail.read_header(lines)
    assert header.fields == [[b"To: a@b.test,", b"  c@d.test"], [b"Subject: hi"]]
    assert header.body_head == []
    assert list(lines) == [b"body"]
    assert header.values("to") == ["a@b.test,  c@d.test"]


def test_read_header_without_empty_line_and_mbox_postmark():
    """A leading 'From ' line is dropped; a line that is not a field starts the body."""
    header = header_of(b"From someone Mon Jan 1\nSubject: x\nnot a header line\nmore\n")
    assert header.fields == [[b"Subject: x"]]
    assert header.body_head == [b"not a header line"]
    assert header_of(b"just text\n").fields == []


def test_header_recipients_for_t():
    """-t: To, Cc and Bcc, display names and groups understood, in order."""
    header = header_of(
        b"To: Alice <alice@example.test>, bob\nCc: undisclosed-recipients:;\n"
        b"Bcc: secret@far.example\nSubject: x\nCC: team@example.test\n\n"
    )
    assert sendmail.header_recipients(header) == ["alice@example.test", "bob", "team@example.test", "secret@far.example"]
    with pytest.raises(sendmail.InputError):
        sendmail.header_recipients(header_of(b"To: bad@@address\n\n"))


def test_fix_header_removes_bcc_and_adds_what_is_missing():
    """Bcc (and its continuation) goes; From, Date and Message-ID are added
    when missing (rfc5322 3.6, rfc6409 8.2/8.3)."""
    header = header_of(b"Subject: x\nBcc: a@b.test,\n c@d.test\nTo: e@f.test\n\n")
    lines = sendmail.fix_header(
        header, sender="root@mx.test", full_name="Cron Daemon", message_id="ID1", hostname="mx.test", now=T
    )
    assert lines[:3] == [b"Subject: x", b"To: e@f.test", b"From: Cron Daemon <root@mx.test>"]
    assert lines[3].startswith(b"Date: ") and b"2025" in lines[3]
    assert lines[4] == b"Message-ID: <ID1@mx.test>"
    assert len(lines) == 5


def test_fix_header_keeps_what_is_there():
    """Existing From, Date and Message-ID (any case) are kept as they are."""
    header = header_of(b"FROM: me@x.test\ndate: Mon, 1 Jan 2024 00:00:00 +0000\nMessage-Id: <a@b>\n\n")
    lines = sendmail.fix_header(header, sender="s@mx.test", full_name="", message_id="I", hostname="mx.test", now=T)
    assert lines == [b"FROM: me@x.test", b"date: Mon, 1 Jan 2024 00:00:00 +0000", b"Message-Id: <a@b>"]


# ---------------------------------------------------------------- recipients and queueing


@pytest.fixture
def directory(tmp_path):
    """The config directory of a RealServer-style config (alice, bob, carol; team alias)."""
    server = RealServer(tmp_path / "srv")
    return ConfigDirectory(configuration.load(server.write_config()).local)


def test_resolve_local_alias_and_remote(directory):
    """Aliases expand to mailboxes (once each); other domains go to the relay hop."""
    recipients = fired(sendmail.resolve(directory, ["team@example.test", "alice@example.test", "x@far.example"]))
    assert [(r.address, r.mailbox) for r in recipients] == [
        ("alice@example.test", "alice"), ("bob@example.test", "bob"), ("x@far.example", ""),
    ]
    with pytest.raises(sendmail.UnknownUser, match="nobody@example.test"):
        fired(sendmail.resolve(directory, ["nobody@example.test"]))


def test_queue_message_writes_crlf_and_trace(tmp_path):
    """The spool gets the fixed header, an empty line and the body with CRLF;
    the envelope holds the local Received: line, protocol 'local'."""
    spool = FileSpool(tmp_path)
    lines = sendmail.read_lines(io.BytesIO(b"Subject: s\nBcc: x@y.test\n\nline 1\nline 2\n"))
    header = sendmail.read_header(lines)
    [message] = sendmail.queue_message(
        spool, header, lines, [Recipient("bob@example.test", "bob@example.test", "bob")],
        sender="", from_address="cron@mx.test", full_name="", login="cron", hostname="mx.test", now=T,
    )
    env = message.envelope
    assert (env.sender, env.protocol, env.parameters) == ("", "local", ())
    [received] = env.prepend_headers
    assert received.startswith(f"Received: (from cron) by mx.test (mailsvc) with local id {message.id}; ")
    data = (tmp_path / "local" / f"D.{message.id}").read_bytes()
    assert data.startswith(b"Subject: s\r\nFrom: cron@mx.test\r\nDate: ")
    assert f"Message-ID: <{message.id}@mx.test>\r\n\r\nline 1\r\nline 2\r\n".encode() in data
    assert b"Bcc" not in data and b"\n" not in data.replace(b"\r\n", b"")


def queued_parameters(tmp_path, data: str, recipient: str = "x@far.example", sender: str = "a@b.test"):
    lines = sendmail.read_lines(io.BytesIO(data.encode()))
    [message] = sendmail.queue_message(
        FileSpool(tmp_path), sendmail.read_header(lines), lines, [Recipient(recipient)],
        sender=sender, from_address="a@b.test", full_name="", login="a", hostname="mx.test", now=T,
    )
    assert message.hop == "relay"
    return message.envelope.parameters


def test_queue_message_marks_8bit(tmp_path):
    """8-bit octets in the body give BODY=8BITMIME (rfc6152)."""
    assert queued_parameters(tmp_path, "Subject: s\n\nçà\n") == (("BODY", "8BITMIME"),)


@pytest.mark.parametrize(
    "data, recipient, sender, body",
    [
        ("Subject: é\n\nhi\n", "x@far.example", "a@b.test", (("BODY", "8BITMIME"),)),  # a UTF-8 header (rfc6532)
        ("Subject: s\n\nhi\n", "jörg@far.example", "a@b.test", ()),
        ("Subject: s\n\nhi\n", "x@bücher.example", "a@b.test", ()),
        ("Subject: s\n\nhi\n", "x@far.example", "zoë@b.test", ()),
    ],
)
def test_queue_message_marks_smtputf8(tmp_path, data, recipient, sender, body):
    """A UTF-8 address or header gives SMTPUTF8 (rfc6531 3.4), as Postfix's
    sendmail detects it; 8-bit data gives BODY=8BITMIME besides."""
    assert queued_parameters(tmp_path, data, recipient, sender) == (*body, ("SMTPUTF8", ""))


def test_ascii_message_has_no_smtputf8(tmp_path):
    assert queued_parameters(tmp_path, "Subject: s\n\nhi\n") == ()


def test_parse_addresses_takes_utf8_and_refuses_bad_ones():
    assert sendmail.parse_addresses(["Jörg <jörg@bücher.example>"]) == ["jörg@bücher.example"]
    with pytest.raises(sendmail.InputError):
        sendmail.parse_addresses(["jörg@bü_cher.example"])


def test_bad_body_queues_nothing(tmp_path):
    """A bare CR met in the body, after writing began: nothing is left in the spool."""
    lines = sendmail.read_lines(io.BytesIO(b"Subject: s\n\n" + b"fine\n" * 20000 + b"bad\rline\n"))
    header = sendmail.read_header(lines)
    with pytest.raises(sendmail.InputError):
        sendmail.queue_message(
            FileSpool(tmp_path), header, lines, [Recipient("x@far.example")],
            sender="a@b.test", from_address="a@b.test", full_name="", login="a", hostname="mx.test", now=T,
        )
    assert files_in(tmp_path) == []


# ---------------------------------------------------------------- the command, for real


def run_sendmail(server: RealServer, *args: str, data: bytes) -> subprocess.CompletedProcess:
    """Run ``mailsvc sendmail ARGS`` with ``data`` on stdin and the server's config; bounded."""
    return subprocess.run(
        [str(MAILSVC), "sendmail", "--config", str(server.config_path), *args],
        input=data, capture_output=True, timeout=30, cwd=server.root,
    )


def sections(tmp_path):
    """Config for these servers: an hourly scan (only a flush delivers at
    once) and a control socket of their own."""
    return {
        "delivery": {"scan_interval": 3600},
        "server": {"control_socket": str(tmp_path / "srv" / "ctl.sock")},
    }


def test_sendmail_to_a_running_server_is_delivered_now(start_server, tmp_path):
    """`mailsvc sendmail -f a@b.test alice@example.test < msg`: exit 0, and
    the running server (which scans only hourly) delivers it at once, with
    the local Received: line, the added headers and the sender as Return-Path."""
    server = start_server("srv", sections=sections(tmp_path))
    result = run_sendmail(server, "-f", "a@b.test", "alice@example.test", data=b"Subject: now\n\nhello\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == result.stderr == b""
    [mail] = server.wait_for_mail("alice")
    text = mail.read_bytes()
    assert text.startswith(b"Return-Path: <a@b.test>\n")
    assert f"Received: (from {LOGIN}) by mx.test (mailsvc) with local id ".encode() in text
    assert b"Subject: now\nFrom: a@b.test\nDate: " in text
    assert b"Message-ID: <" in text and text.endswith(b"\n\nhello\n")
    server.wait_idle()


def test_sendmail_with_the_server_stopped_is_delivered_at_start(tmp_path):
    """With the server stopped: -t reads To/Bcc, the message is queued (exit
    0) with Bcc removed and the default sender <login>@<hostname>; starting
    the server delivers it to both."""
    server = RealServer(tmp_path / "srv", sections=sections(tmp_path))
    server.write_config()
    result = run_sendmail(
        server, "-t", "-i", "-FCron Daemon",
        data=b"To: alice@example.test\r\nBcc: bob\r\nSubject: later\r\n\r\n.\r\nafter the dot\r\n",
    )
    assert result.returncode == 0, result.stderr
    assert len([f for f in server.spool_files() if "/C." in f]) == 1
    try:
        server.start()
        [to_alice] = server.wait_for_mail("alice")
        [to_bob] = server.wait_for_mail("bob")
        server.wait_idle()
    finally:
        server.stop()
    for mail in (to_alice, to_bob):
        text = mail.read_bytes()
        assert f"Return-Path: <{LOGIN}@mx.test>".encode() in text
        assert f"From: Cron Daemon <{LOGIN}@mx.test>".encode() in text
        assert b"Bcc" not in text
        assert text.endswith(b"\n\n.\nafter the dot\n")


@pytest.mark.parametrize(
    "args, data, status, message",
    [
        pytest.param(["nobody@example.test"], b"Subject: x\n\nhi\n", 67, b"<nobody@example.test>: no such user here", id="unknown-user"),
        pytest.param(["alice"], b"Subject: x\n\nbare\rcr\n", 1, b"bare CR", id="bare-cr"),
        pytest.param(["alice"], b"Subject: x\n\n" + b"y" * 999 + b"\n", 1, b"longer than 998", id="long-line"),
        pytest.param([], b"Subject: x\n\nhi\n", 1, b"no recipients", id="no-recipient"),
        pytest.param(["-bs"], b"", 64, b"not supported", id="usage"),
    ],
)
def test_sendmail_refusals_queue_nothing(tmp_path, args, data, status, message):
    """Refused input: the documented exit status, a message on stderr, and
    nothing in the spool."""
    server = RealServer(tmp_path / "srv", sections=sections(tmp_path))
    server.write_config()
    result = run_sendmail(server, *args, data=data)
    assert result.returncode == status, result.stderr
    assert message in result.stderr and result.stderr.startswith(b"mailsvc: sendmail: ")
    assert [f for f in server.spool_files() if not f.startswith("tmp/")] == []
