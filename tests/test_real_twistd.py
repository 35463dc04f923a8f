"""The ``twistd mailsvc`` process itself: its help, start-up on a bad config,
shutdown on SIGTERM with clients connected, and what it logs."""

from __future__ import annotations

import re
import signal
import smtplib
import socket
import subprocess

import pytest

from realserver import TWISTD, RawSMTP, RealServer, real_server, start_server  # noqa: F401 (fixtures)

EX_CONFIG = 78
# twistd stops cleanly on SIGTERM, then ends itself with that same signal
# (twisted.application.app._exitWithSignal), so the status is -SIGTERM.
STOPPED_BY_SIGTERM = -signal.SIGTERM


def test_help(tmp_path):
    """``twistd mailsvc --help`` exits 0 and documents --config."""
    result = subprocess.run(
        [str(TWISTD), "mailsvc", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout
    assert "mailsvc" in result.stdout


@pytest.mark.parametrize(
    "options, key",
    [
        pytest.param({"sections": {"smtp": {"max_recipents": 5}}}, "[smtp] max_recipents", id="unknown-key"),
        pytest.param({"sections": {"smtp": {"listen": ["tcpx:2525"]}}}, "[smtp] listen[0]", id="bad-endpoint"),
        pytest.param(
            {"sections": {"local": {"aliases_file": "/nonexistent/mailsvc-test/aliases"}}},
            "[local] aliases_file",
            id="missing-aliases-file",
        ),
        pytest.param({"store_type": "no-such-store"}, "[store] type", id="unknown-store-plugin"),
    ],
)
def test_bad_config_stops_startup(tmp_path, options, key):
    """A bad config: twistd exits within a few seconds with status 78, having
    written exactly one line, which names the offending key; it never listens."""
    server = RealServer(tmp_path / "server", **options)
    server.launch()
    try:
        status = server.wait_exit(timeout=15)
    finally:
        server.stop()
    assert status == EX_CONFIG, server.tail()
    output = [line for line in (server.stderr() + server.log()).splitlines() if line.strip()]
    naming = [line for line in output if key in line]
    assert len(naming) == 1, output
    assert naming[0].startswith("mailsvc: config error: "), naming
    assert [line for line in server.stderr().splitlines() if line.strip()] == naming, server.stderr()
    assert "Traceback" not in server.stderr() + server.log()
    assert f"starting on {server.port}" not in server.log()


@pytest.mark.parametrize("which", ["smtp", "submission"])
def test_a_port_in_use_stops_startup(tmp_path, which):
    """A listening port that is taken: twistd exits (status 71, EX_OSERR)
    with one line naming the config key and the reason, instead of running
    without its port while looking alive."""
    server = RealServer(tmp_path / "server")
    port = server.port if which == "smtp" else server.submission_port
    key = "[smtp] listen[0]" if which == "smtp" else "[submission] listen[0]"
    squatter = socket.socket()
    try:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen(1)
        server.launch()
        try:
            status = server.wait_exit(timeout=30)
        finally:
            server.stop()
    finally:
        squatter.close()
    assert status == 71, server.tail()
    lines = [line for line in server.stderr().splitlines() if key in line]
    assert len(lines) == 1, server.stderr()
    assert lines[0].startswith(f"mailsvc: {key}: cannot listen on tcp:{port}")
    assert "in use" in lines[0]


def test_sigterm_says_421_to_connected_clients(real_server):
    """SIGTERM while one client is in the middle of a transaction and another
    in the middle of DATA: each reads ``421 4.3.2`` and is disconnected, the
    process shuts down cleanly and exits, and the half-received message leaves nothing
    in the spool or the mailboxes."""
    with RawSMTP(real_server.port) as in_mail, RawSMTP(real_server.port) as in_data:
        for client in (in_mail, in_data):
            assert client.reply()[0] == 220
            assert client.command("EHLO term.test")[0] == 250
            assert client.command("MAIL FROM:<x@remote.test>")[0] == 250
            assert client.command("RCPT TO:<alice@example.test>")[0] == 250
        assert in_data.command("DATA")[0] == 354
        in_data.send(b"Subject: cut short\r\n\r\nfirst line\r\n")
        real_server.wait_for(
            lambda: real_server.spool_files(), message="the message being received, in spool/tmp"
        )
        real_server.proc.send_signal(signal.SIGTERM)
        for client in (in_mail, in_data):
            code, text = client.reply()
            assert (code, text) == (421, "4.3.2 Service shutting down; try again later")
            assert client.read_to_end() == b""
        assert real_server.wait_exit(timeout=15) == STOPPED_BY_SIGTERM
    assert "Server Shut Down." in real_server.log()
    assert real_server.spool_files() == []
    assert real_server.maildir("alice") == []
    assert "accepted id=" not in real_server.log()


def test_log_lines_per_connection_message_and_delivery(real_server):
    """The log holds one line per connection (naming the client's address and
    port), one ``accepted id=`` line per message and one ``delivered id=`` line
    per recipient delivered."""
    sent = []  # (client port, queue id, recipients)
    for recipients in (["alice@example.test"], ["team@example.test", "carol@example.test"]):
        with smtplib.SMTP("127.0.0.1", real_server.port, local_hostname="log.test", timeout=10) as client:
            port = client.sock.getsockname()[1]
            client.ehlo()
            assert client.mail("x@remote.test")[0] == 250
            for recipient in recipients:
                assert client.rcpt(recipient)[0] == 250
            code, text = client.data(b"Subject: logged\r\n\r\nlogged\r\n")
            assert code == 250, text
            queue_id = re.fullmatch(rb"2\.0\.0 Ok: queued as (\S+)", text).group(1).decode()
            sent.append((port, queue_id))
    real_server.wait_for_log("delivered id=", count=4)
    real_server.wait_idle()
    assert real_server.stop() == STOPPED_BY_SIGTERM
    log = real_server.log()
    (port1, id1), (port2, id2) = sent
    for port in (port1, port2):
        assert len(re.findall(rf"connect from \[127\.0\.0\.1\]:{port}\n", log)) == 1, log
    assert len(re.findall(rf"accepted id={id1} from=<x@remote\.test> to=<alice@example\.test> ", log)) == 1
    assert (
        len(
            re.findall(
                rf"accepted id={id2} from=<x@remote\.test>"
                r" to=<alice@example\.test>,<bob@example\.test>,<carol@example\.test> ",
                log,
            )
        )
        == 1
    ), log
    delivered = re.findall(r"delivered id=(\S+) to=<([^>]+)> hop=local", log)
    assert sorted(delivered) == sorted(
        [(id1, "alice@example.test"), (id2, "alice@example.test"), (id2, "bob@example.test"), (id2, "carol@example.test")]
    ), log
    assert log.count("accepted id=") == 2
    for user, count in (("alice", 2), ("bob", 1), ("carol", 1)):
        assert len(real_server.maildir(user)) == count


# twistd's text log line: RFC 3339 time to the second, [namespace#level], text.
LOG_LINE = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[mailsvc\.protocol#info\] connect from \[127\.0\.0\.1\]:%d"


def say_hello(port: int) -> int:
    """One SMTP session with a NOOP; returns our (client) port."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="log.test", timeout=10) as client:
        assert client.noop()[0] == 250
        return client.sock.getsockname()[1]


def test_the_log_file_has_twistds_lines_and_sigusr1_rotates_it(real_server):
    """mailsvc writes twistd's text log itself (mailsvc.logobserver): the
    same lines in the --logfile, and SIGUSR1 rotates it as twistd does."""
    first = say_hello(real_server.port)
    log = real_server.wait_for_log("disconnect from [127.0.0.1]")
    assert re.search(LOG_LINE % first + "\n", log), log
    assert "twistd" in log and "starting up" in log  # twistd's own lines, same file
    rotated = real_server.log_path.with_name(real_server.log_path.name + ".1")
    real_server.proc.send_signal(signal.SIGUSR1)
    real_server.wait_for(rotated.exists, timeout=10, message="the log rotated")
    second = say_hello(real_server.port)
    log = real_server.wait_for_log("disconnect from [127.0.0.1]", this_run=False)
    assert re.search(LOG_LINE % second + "\n", log) and not re.search(LOG_LINE % first, log), log
    assert re.search(LOG_LINE % first, rotated.read_text())
    assert real_server.running


class StdoutServer(RealServer):
    """``twistd -n`` with no --logfile, as ``make run``: the log is standard output."""

    def __init__(self, root, **options) -> None:
        super().__init__(root, **options)
        self.log_path = self.stdout_path

    def command(self, *twistd_args: str) -> list[str]:
        return [arg for arg in super().command(*twistd_args) if not arg.startswith("--logfile=")]


def test_without_a_log_file_the_log_is_standard_output(tmp_path):
    server = StdoutServer(tmp_path / "server")
    try:
        server.start()
        port = say_hello(server.port)
        log = server.wait_for_log("disconnect from [127.0.0.1]")
        assert re.search(LOG_LINE % port + "\n", log), log
    finally:
        server.stop()
