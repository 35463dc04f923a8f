"""``[server] receiver_processes``: SMTP served by child processes of the
real ``twistd mailsvc``, mail delivered by the main one."""

from __future__ import annotations

import io
import os
import re
import signal
import smtplib
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import trustme

from mailsvc import passwd
from realserver import RealServer, client_context, start_server, wait_for  # noqa: F401 (fixtures)

RECEIVERS = 2
MESSAGE = b"From: x@remote.test\r\nSubject: through a receiver\r\n\r\nHello.\r\n"
PASSWORD = "correct horse battery staple"


def receiver_pids(server: RealServer) -> list[int]:
    """The PIDs of the server's receiver processes (its children running mailsvc.receiverchild)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                argv = cmdline.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if parent == server.pid and b"mailsvc.receiverchild" in argv:
            pids.append(int(entry))
    return sorted(pids)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie is gone too (its parent, the test's twistd, may be dead).
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.fixture
def receivers_server(start_server):
    server = start_server(sections={"server": {"receiver_processes": RECEIVERS}})
    wait_for(lambda: len(receiver_pids(server)) == RECEIVERS, message="the receiver processes", details=server.tail)
    server.wait_for_log("serving 3 listener(s)", count=RECEIVERS)
    return server


def send(port: int, number: int) -> str:
    """One message to alice; the queue ID of the 250."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname=f"client{number}.test", timeout=10) as client:
        client.ehlo()
        assert client.mail("x@remote.test")[0] == 250
        assert client.rcpt("alice@example.test")[0] == 250
        code, text = client.data(MESSAGE + f"number {number}\r\n".encode())
        assert code == 250, text
        return re.fullmatch(rb"2\.0\.0 Ok: queued as (\S+)", text).group(1).decode()


def test_receivers_take_the_mail_and_the_main_process_delivers_it(receivers_server):
    """40 messages over 8 concurrent clients: each gets its 250 from a
    receiver process, and every one is delivered once, by the main process."""
    server = receivers_server
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda n: send(server.port, n), range(40)))
    assert len(set(ids)) == 40
    mail = server.wait_for_mail("alice", 40)
    assert len(mail) == 40
    bodies = sorted(int(path.read_bytes().rsplit(b"number ", 1)[1]) for path in mail)
    assert bodies == list(range(40))
    log = server.wait_for_log("delivered id=", count=40)
    for id in ids:
        # Accepted in a receiver ("[receiver N ...]"), delivered by the main process.
        assert re.search(rf"\[receiver [12] mailsvc\.receiver#info\] accepted id={id} ", log), log
        assert re.search(rf"\[mailsvc\.delivery\.runner#info\] delivered id={id} to=<alice@example\.test>", log), log
    server.wait_idle()
    assert server.spool_files() == []


def test_etrn_through_a_receiver_is_answered_by_the_queue(receivers_server):
    """ETRN (rfc1985) reaches the queue runner in the main process."""
    with smtplib.SMTP("127.0.0.1", receivers_server.port, timeout=10) as client:
        client.ehlo()
        assert client.docmd("ETRN", "far.test") == (251, b"2.0.0 OK, no messages waiting for node far.test")
        code, text = client.docmd("ETRN", "example.test")
        assert code == 459 and b"delivered here" in text
        assert client.docmd("ETRN", "#nosuchqueue")[0] == 458
    receivers_server.wait_for_log("ETRN far.test from [127.0.0.1]: 0 message(s) started")


def test_submission_starttls_and_auth_in_a_receiver(tmp_path):
    """The submission listener in a receiver: STARTTLS with the server's
    certificate, AUTH against the password file, then relaying."""
    ca = trustme.CA()
    server = RealServer(tmp_path / "s", sections={"server": {"receiver_processes": 1}})
    cert = ca.issue_cert("localhost", "127.0.0.1")
    server.cert_file.parent.mkdir(parents=True)
    cert.private_key_pem.write_to_path(str(server.key_file))
    server.cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    server.write_config()
    assert passwd.main(["alice", "--config", str(server.config_path), "--stdin"], stdin=io.StringIO(PASSWORD + "\n")) == 0
    try:
        server.start()
        with smtplib.SMTP("127.0.0.1", server.submission_port, timeout=10) as client:
            client.starttls(context=client_context(ca))
            assert client.login("alice", PASSWORD)[0] == 235
            assert client.sendmail("alice@example.test", ["bob@example.test"], MESSAGE) == {}
        server.wait_for_mail("bob")
        assert re.search(r"\[receiver 1 mailsvc\.receiver#info\] accepted id=\S+ from=<alice@example\.test>", server.log())
    finally:
        server.stop()


def test_a_receiver_that_dies_is_started_again(receivers_server):
    server = receivers_server
    victim, survivor = receiver_pids(server)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(receiver_pids(server)) == RECEIVERS and victim not in receiver_pids(server),
             timeout=15, message="a new receiver process", details=server.tail)
    assert survivor in receiver_pids(server)
    server.wait_for_log("ended (", count=1)
    assert re.search(r"receiver process \d ended \(.*\); starting it again in 1 s", server.log()), server.tail()
    for n in range(6):
        send(server.port, n)
    server.wait_for_mail("alice", 6)


def test_a_receiver_started_again_runs_the_config_the_server_runs(receivers_server):
    """The config file is edited while the server runs (max_recipients 1);
    a receiver started again after that still runs the config the main
    process loaded (both recipients taken): changes wait for a restart, as
    they do for the main process, instead of splitting the server in two."""
    server = receivers_server
    server.sections.setdefault("smtp", {})["max_recipients"] = 1
    server.write_config()
    for victim in receiver_pids(server):
        os.kill(victim, signal.SIGKILL)
    server.wait_for_log("starting it again in 1 s", count=RECEIVERS)
    server.wait_for_log("serving 3 listener(s)", count=RECEIVERS * 2)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        assert client.sendmail("x@remote.test", ["alice@example.test", "bob@example.test"], MESSAGE) == {}
    server.wait_for_mail("alice")
    server.wait_for_mail("bob")
    assert "config error" not in server.log() + server.stderr()


def test_sigterm_stops_the_receivers_with_the_server(receivers_server):
    server = receivers_server
    pids = receiver_pids(server)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo()
        server.proc.send_signal(signal.SIGTERM)
        # A receiver says 421 to its connected client (rfc5321 3.8).
        code, text = client.getreply()
        assert (code, text) == (421, b"4.3.2 Service shutting down; try again later")
    assert server.wait_exit(timeout=40) == -signal.SIGTERM
    wait_for(lambda: all(gone(pid) for pid in pids), timeout=10, message="the receivers gone")
    assert "Server Shut Down." in server.log()


def test_receivers_stop_when_the_main_process_is_killed(receivers_server):
    """SIGKILL to the main process: its receivers see their channel close
    and stop (mail they committed is in the spool for the next start)."""
    server = receivers_server
    pids = receiver_pids(server)
    server.kill9()
    wait_for(lambda: all(gone(pid) for pid in pids), timeout=15, message="the receivers gone")


@pytest.mark.parametrize(
    "sections, problem",
    [
        pytest.param({"server": {"receiver_processes": -1}}, "expected an integer >= 0", id="negative"),
        pytest.param({"server": {"receiver_processes": 65}}, "at most 64", id="too-many"),
        pytest.param(
            {"server": {"receiver_processes": 2}, "hold": {"site": [{"name": "c", "domains": ["c.test"], "users": ["u"]}]}},
            "must be 0 when a [[hold.site]] exists", id="with-hold-sites",
        ),
    ],
)
def test_bad_receiver_processes_stop_startup(tmp_path, sections, problem):
    server = RealServer(tmp_path / "s", sections=sections)
    server.write_config()
    result = subprocess.run(server.command(), cwd=server.root, capture_output=True, text=True, timeout=60,
                            env=server.environment())
    assert result.returncode == 78
    assert f"[server] receiver_processes: {problem}" in result.stderr, result.stderr
