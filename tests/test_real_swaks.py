"""swaks, a real SMTP client from Debian, against the real ``twistd mailsvc``.

swaks must be installed (``.ci/run`` installs it): these tests fail, never
skip, without it.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from realserver import RealServer, real_server, start_server  # noqa: F401 (fixtures)

SWAKS_TIMEOUT = 30


def swaks(server: RealServer, *args: str) -> subprocess.CompletedProcess:
    """Run swaks against ``server`` with ``args``; return its result (output as text)."""
    path = shutil.which("swaks")
    assert path, "swaks is not installed (apt-get install swaks; .ci/run does it)"
    return subprocess.run(
        [path, "--server", f"127.0.0.1:{server.port}", "--timeout", "10", *args],
        capture_output=True,
        text=True,
        timeout=SWAKS_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


def sent_lines(output: str) -> list[str]:
    """The transcript lines swaks shows: ``-> ...`` sent, ``<- ...``/``<** ...`` received."""
    return [line for line in output.splitlines() if line.startswith((" ->", "<-", "<**"))]


def data_sent(output: str) -> bytes:
    """The message swaks says it sent after 354, dots unstuffed, with LF line ends."""
    lines = sent_lines(output)
    start = next(i for i, line in enumerate(lines) if line.startswith("<-  354 ")) + 1
    end = lines.index(" -> .", start)
    body = [line[4:] for line in lines[start:end]]
    assert all(line.startswith(" -> ") for line in lines[start:end])
    return "".join((line[1:] if line.startswith(".") else line) + "\n" for line in body).encode()


def delivered_message(path) -> bytes:
    """A Maildir file without the three trace lines delivery put on top."""
    return path.read_bytes().split(b"\n", 3)[3]


def test_swaks_installed():
    """The real-client tests need swaks at hand."""
    assert shutil.which("swaks"), "swaks is not installed (apt-get install swaks; .ci/run does it)"


def test_swaks_message_lands_in_maildir(real_server):
    """swaks --to alice: exit 0; the message is in alice's Maildir with its
    Subject and body, and a Received line naming swaks' HELO, [127.0.0.1] and
    "with ESMTP"."""
    result = swaks(
        real_server,
        "--to", "alice@example.test",
        "--from", "x@remote.test",
        "--helo", "swaks-client.test",
        "--h-Subject", "hello from swaks",
        "--body", "A body line.\nAnother line.",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    queue_id = re.search(r"<-  250 2\.0\.0 Ok: queued as (\S+)", result.stdout).group(1)
    [path] = real_server.wait_for_mail("alice")
    data = path.read_bytes().decode()
    lines = data.split("\n")
    assert lines[0] == "Return-Path: <x@remote.test>"
    assert lines[1] == "Delivered-To: alice@example.test"
    assert re.fullmatch(
        r"Received: from swaks-client\.test \(\[127\.0\.0\.1\]\) by mx\.test \(mailsvc\) with ESMTP"
        rf" id {queue_id} for <alice@example.test>; .+",
        lines[2],
    ), lines[2]
    assert "\nSubject: hello from swaks\n" in data
    assert "\n\nA body line.\nAnother line.\n" in data
    assert delivered_message(path) == data_sent(result.stdout)


def test_swaks_pipelining(real_server):
    """swaks --pipeline sends MAIL, both RCPTs and DATA in one go; the replies
    come back in order (the unknown recipient's 550 in its place) and the one
    good recipient gets the message."""
    result = swaks(
        real_server,
        "--pipeline",
        "--to", "bob@example.test,nobody@example.test",
        "--from", "x@remote.test",
        "--body", "pipelined",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = sent_lines(result.stdout)
    start = lines.index(" -> MAIL FROM:<x@remote.test>")
    assert lines[start : start + 8] == [
        " -> MAIL FROM:<x@remote.test>",
        " -> RCPT TO:<bob@example.test>",
        " -> RCPT TO:<nobody@example.test>",
        " -> DATA",
        "<-  250 2.1.0 Sender ok",
        "<-  250 2.1.5 Recipient ok",
        "<** 550 5.1.1 <nobody@example.test>: no such user here",
        "<-  354 End data with <CR><LF>.<CR><LF>",
    ], result.stdout
    [path] = real_server.wait_for_mail("bob")
    assert delivered_message(path) == data_sent(result.stdout)
    assert b"\n\npipelined\n" in delivered_message(path)
    real_server.wait_idle()
    assert real_server.maildir("alice") == []


def test_swaks_unknown_user_quit_after_rcpt(real_server):
    """swaks --quit-after RCPT to an unknown user shows 550 5.1.1 and exits 24
    (no recipient accepted); nothing is queued."""
    result = swaks(
        real_server,
        "--to", "nobody@example.test",
        "--from", "x@remote.test",
        "--quit-after", "RCPT",
    )
    assert result.returncode == 24, result.stdout + result.stderr
    assert "<** 550 5.1.1 <nobody@example.test>: no such user here" in result.stdout
    assert " -> DATA" not in result.stdout
    assert real_server.spool_files() == []


def test_swaks_data_with_dots(real_server, tmp_path):
    """swaks --data @file: swaks dot-stuffs lines starting with '.', the server
    unstuffs them, and the Maildir copy holds the lines as written."""
    message = (
        "From: x@remote.test\n"
        "To: carol@example.test\n"
        "Subject: dots\n"
        "\n"
        ".starts with a dot\n"
        "..starts with two dots\n"
        ". dot and space\n"
        "...\n"
        "middle\n"
        ".\tdot tab\n"
        "last\n"
    )
    data_file = tmp_path / "message.txt"
    data_file.write_text(message)
    result = swaks(
        real_server,
        "--to", "carol@example.test",
        "--from", "x@remote.test",
        "--data", f"@{data_file}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = sent_lines(result.stdout)
    # swaks stuffed the dots on the wire.
    assert " -> ..starts with a dot" in lines and " -> ...starts with two dots" in lines
    assert " -> ...." in lines
    [path] = real_server.wait_for_mail("carol")
    # swaks ends the data with an empty line of its own before the final dot.
    assert delivered_message(path) == data_sent(result.stdout) == message.encode() + b"\n"
