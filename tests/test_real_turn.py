"""Turn-around over real sockets: two ``twistd mailsvc`` processes, a
provider holding mail for ``customer.example`` and the customer's own
server, with ``mailsvc turn`` (ATRN and TURN, TLS on and off), fetchmail as
a real ODMR client, ETRN to a static route, and kill -9 of the provider in
the middle of a reversed delivery.

Every process is started by the test and stopped by its PID (``RealServer``
fixtures; ``subprocess.run`` with a timeout for the commands). fetchmail is
a Debian package that ``.ci/run`` installs: its absence is a failure.
"""

from __future__ import annotations

import base64
import io
import shutil
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from mailsvc import passwd
from mailsvc.tls import self_signed
from realserver import RawSMTP, RealServer, start_server, toml_value  # noqa: F401 (fixture)

MAILSVC = Path(sys.prefix) / "bin" / "mailsvc"
PASSWORD = "turn-around-pw"
SITE = {"name": "customer", "domains": ["customer.example"], "users": ["custuser"]}
COMMAND_TIMEOUT = 60


def provider_sections(root: Path, *, tls: bool = True, routes=(), **extra) -> dict:
    """A provider that holds customer.example for custuser (PLAIN, and
    CRAM-MD5 for fetchmail); without ``tls``: no STARTTLS anywhere, AUTH in clear
    on the MX listener too."""
    sections = {
        "server": {"control_socket": str(root / "mailsvc.sock")},
        "local": {"users": ["alice", "bob", "carol", "custuser"]},
        "hold": {"site": [SITE]},
        "auth": {"mechanisms": ["PLAIN", "CRAM-MD5"], "cram_md5_secrets_file": str(root / "auth" / "cram")},
        "relay": {"route": list(routes)},
    }
    if not tls:
        sections["smtp"] = {"starttls": False, "auth": True}
        sections["auth"]["allow_plaintext_without_tls"] = True
    for name, keys in extra.items():
        sections.setdefault(name, {}).update(keys)
    return sections


def start_provider(start_server, tmp_path, **options) -> RealServer:
    """Start the provider and give custuser its password (read again by the running server)."""
    server = start_server("provider", sections=provider_sections(tmp_path / "provider", **options))
    assert passwd.main(["custuser", "--config", str(server.config_path), "--stdin"],
                       stdin=io.StringIO(PASSWORD + "\n")) == 0
    return server


def start_customer(start_server, tmp_path) -> RealServer:
    """The customer's own mailsvc: customer.example is local (users u and v)."""
    root = tmp_path / "customer"
    return start_server("customer", sections={
        "server": {"hostname": "customer.example", "control_socket": str(root / "mailsvc.sock")},
        "local": {"domains": ["customer.example"], "users": ["u", "v"], "aliases": {"postmaster": ["u"]}},
    })


def hold_mail(provider: RealServer, count: int = 1, to: str = "u@customer.example") -> None:
    """Send ``count`` messages for ``to`` to the provider's MX (anyone may: we are its MX); wait until held."""
    with smtplib.SMTP("127.0.0.1", provider.port, timeout=10) as client:
        for n in range(count):
            client.sendmail("sender@far.test", [to], f"Subject: held {n}\r\n\r\nKept for you ({n}).\r\n")
    provider.wait_for(lambda: len(held(provider)) >= count, message=f"{count} held message(s)")


def held(server: RealServer) -> list[str]:
    """The control files under the provider's hold.customer hop."""
    return [f for f in server.spool_files() if f.startswith("hold.customer/C.")]


def turn(customer: RealServer, *args: str) -> subprocess.CompletedProcess:
    """Run ``mailsvc turn`` with the customer's config; bounded."""
    password_file = customer.root / "provider.password"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    return subprocess.run(
        [str(MAILSVC), "turn", *args, "--user", "custuser", "--password-file", str(password_file),
         "--config", str(customer.config_path), "--timeout", "30"],
        capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
    )


@pytest.mark.parametrize(("command", "tls"), [("ATRN", True), ("ATRN", False), ("TURN", True), ("TURN", False)])
def test_mailsvc_turn_receives_the_held_mail(start_server, tmp_path, command, tls):
    """The customer runs `mailsvc turn`: EHLO, STARTTLS (the provider's
    self-signed certificate checked with --cafile, or none), AUTH PLAIN,
    ATRN (port 366's stand-in) or TURN (on the submission port with TLS, on
    the MX port without). The held mail arrives in the customer's Maildir
    through its own receiving path; the provider's hold hop empties."""
    provider = start_provider(start_server, tmp_path, tls=tls)
    customer = start_customer(start_server, tmp_path)
    hold_mail(provider, 2)
    if command == "ATRN":
        target = f"127.0.0.1:{provider.atrn_port}"
    else:
        target = f"127.0.0.1:{provider.submission_port if tls else provider.port}"
    tls_args = ["--cafile", str(provider.cert_file), "--tls-name", "mx.test"] if tls else ["--no-tls"]
    result = turn(customer, target, f"--{command.lower()}", *tls_args)
    assert result.returncode == 0, result.stderr + provider.tail()
    assert "2 messages received from 127.0.0.1" in result.stdout
    files = customer.wait_for_mail("u", 2)
    texts = sorted(path.read_bytes() for path in files)
    assert b"Kept for you (0)." in texts[0] and b"Kept for you (1)." in texts[1]
    assert all(b"by customer.example (mailsvc) with ESMTP" + (b"S" if tls else b" ") in t for t in texts)
    provider.wait_for(lambda: not held(provider), message="the hold hop to empty")
    assert f"{command} by custuser" in provider.wait_for_log("still held")


def test_refusals_over_sockets(start_server, tmp_path):
    """No AUTH: TURN and ATRN get 530. A domain not owned: ATRN 450, exit 1,
    nothing sent. Nothing held: 453, exit 0 ("no mail waiting")."""
    provider = start_provider(start_server, tmp_path)
    customer = start_customer(start_server, tmp_path)
    with RawSMTP(provider.port) as raw:
        raw.reply()
        raw.command("EHLO raw.test")
        code, text = raw.command("TURN")
        assert code == 530 and "TURN is honoured only after AUTH" in text
    with RawSMTP(provider.atrn_port) as raw:
        raw.reply()
        code, text = raw.command("EHLO raw.test")
        assert "ATRN" in text.split("\n") and "AUTH CRAM-MD5" in text.split("\n")
        assert raw.command("ATRN customer.example")[0] == 530
        assert raw.command("MAIL FROM:<a@b.test>")[0] == 502
    tls_args = ["--cafile", str(provider.cert_file), "--tls-name", "mx.test"]
    target = f"127.0.0.1:{provider.atrn_port}"
    result = turn(customer, target, *tls_args)
    assert result.returncode == 0 and "no mail waiting" in result.stdout and "453" in result.stdout
    hold_mail(provider, 1)
    result = turn(customer, target, "--domains", "customer.example,elsewhere.example", *tls_args)
    assert result.returncode == 1 and "450 4.7.1 ATRN refused: custuser has no access to elsewhere.example" in result.stderr
    assert len(held(provider)) == 1
    result = turn(customer, target, "--insecure")  # the certificate unchecked: still TLS, still works
    assert result.returncode == 0 and "1 message received" in result.stdout


def test_fetchmail_odmr_client(start_server, tmp_path):
    """fetchmail --protocol ODMR against our ATRN listener (EHLO, AUTH
    CRAM-MD5 before TLS, ATRN customer.example), relaying the reversed
    session to the customer's mailsvc (--smtphost): the mail arrives there."""
    fetchmail = shutil.which("fetchmail")
    assert fetchmail, "fetchmail is not installed (.ci/run installs the Debian package)"
    provider = start_provider(start_server, tmp_path)
    customer = start_customer(start_server, tmp_path)
    hold_mail(provider, 2)
    rc = tmp_path / "fetchmailrc"
    rc.write_text(f'poll 127.0.0.1 protocol ODMR port {provider.atrn_port} user "custuser" password "{PASSWORD}"\n')
    rc.chmod(0o600)
    home = tmp_path / "fetchmail-home"
    home.mkdir()
    result = subprocess.run(
        [fetchmail, "-f", str(rc), "--nosyslog", "--nodetach", "-v", "--protocol", "ODMR",
         "--port", str(provider.atrn_port), "--fetchdomains", "customer.example",
         "--smtphost", f"127.0.0.1/{customer.port}", "--pidfile", str(home / "pid"), "127.0.0.1"],
        capture_output=True, text=True, timeout=COMMAND_TIMEOUT, env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode in (0, 1), result.stdout + result.stderr  # 1: fetchmail's "no new mail" after ODMR
    assert "Turnaround now" in result.stdout + result.stderr, result.stdout + result.stderr
    customer.wait_for_mail("u", 2)
    provider.wait_for(lambda: not held(provider), message="the hold hop to empty")


def test_etrn_sends_held_mail_to_the_static_route(start_server, tmp_path):
    """ETRN customer.example on the provider's MX: the held mail goes over a
    new connection to the [[relay.route]] for customer.example (the
    customer's mailsvc); 253 with the count. Without a route: 458."""
    customer = start_customer(start_server, tmp_path)
    route = {"domain": "customer.example", "host": f"127.0.0.1:{customer.port}", "tls": "none"}
    provider = start_provider(start_server, tmp_path, routes=[route])
    hold_mail(provider, 2)
    with RawSMTP(provider.port) as raw:
        raw.reply()
        code, text = raw.command("EHLO raw.test")
        assert "ETRN" in text.split("\n")
        assert raw.command("ETRN customer.example") == (253, "2.0.0 OK, 2 pending messages for node customer.example started")
        assert raw.command("ETRN elsewhere.test")[0] == 251
    customer.wait_for_mail("u", 2)
    provider.wait_for(lambda: not held(provider), message="the hold hop to empty")


def test_etrn_without_route_is_458(start_server, tmp_path):
    """A held domain with no route: ETRN says 458 and the mail stays held."""
    provider = start_provider(start_server, tmp_path)
    hold_mail(provider, 1)
    with RawSMTP(provider.port) as raw:
        raw.reply()
        raw.command("EHLO raw.test")
        code, text = raw.command("ETRN customer.example")
        assert code == 458 and "call in with ATRN or TURN" in text
    assert len(held(provider)) == 1


def _read_until(raw: RawSMTP, end: bytes) -> bytes:
    while end not in raw._buffer:
        chunk = raw.sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed; have {raw._buffer[-200:]!r}")
        raw._buffer += chunk
    data, raw._buffer = raw._buffer.split(end, 1)
    return data + end


def test_kill9_during_turn_delivery_loses_nothing(start_server, tmp_path):
    """The test plays the customer by hand: ATRN, 250, then the server role.
    It acknowledges the first message, then the provider is killed with
    SIGKILL while the second waits for its 250. After a restart the second
    is still held (the first is not), and a real call-in brings it."""
    provider = start_provider(start_server, tmp_path, tls=False)
    hold_mail(provider, 2)
    login = base64.b64encode(f"\0custuser\0{PASSWORD}".encode()).decode()
    with RawSMTP(provider.atrn_port, timeout=20) as raw:
        raw.reply()
        raw.command("EHLO customer.example")
        assert raw.command(f"AUTH PLAIN {login}")[0] == 235
        assert raw.command("ATRN customer.example")[0] == 250
        raw.send(b"220 customer.example ESMTP hand-made\r\n")
        subjects = []
        for n in range(2):
            line = _read_until(raw, b"\r\n")
            if n == 0:
                assert line.startswith(b"EHLO ")
                raw.send(b"250 customer.example\r\n")  # no PIPELINING: one command at a time
                line = _read_until(raw, b"\r\n")
            assert line.startswith(b"MAIL FROM:<sender@far.test>")
            raw.send(b"250 ok\r\n")
            assert _read_until(raw, b"\r\n").startswith(b"RCPT TO:<u@customer.example>")
            raw.send(b"250 ok\r\n")
            assert _read_until(raw, b"\r\n") == b"DATA\r\n"
            raw.send(b"354 go\r\n")
            data = _read_until(raw, b"\r\n.\r\n")
            subjects.append(data.split(b"Subject: ")[1].split(b"\r\n")[0])
            if n == 0:
                raw.send(b"250 2.0.0 taken\r\n")
                provider.wait_for(lambda: len(held(provider)) == 1, message="the first message to leave the hold hop")
        provider.kill9()  # the second message's data is sent; its 250 never was
    assert len(held(provider)) == 1
    provider.start()
    (left,) = held(provider)
    show = subprocess.run([str(MAILSVC), "queue", "show", left.rsplit("/C.", 1)[1], "--config",
                           str(provider.config_path)], capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    assert subjects[1].decode() in show.stdout and subjects[0].decode() not in show.stdout
    customer = start_customer(start_server, tmp_path)
    result = turn(customer, f"127.0.0.1:{provider.atrn_port}", "--no-tls")
    assert result.returncode == 0 and "1 message received" in result.stdout, result.stderr
    (path,) = customer.wait_for_mail("u", 1)
    assert b"Subject: " + subjects[1] in path.read_bytes()


def test_untrusted_provider_certificate_is_refused(start_server, tmp_path):
    """The provider's certificate checked against another CA file, or for
    another name: the call-in stops before AUTH with status 1 and says why
    (mailsvc.tls.ClientTLSContext, shared with the relay client); nothing
    held moves."""
    provider = start_provider(start_server, tmp_path)
    customer = start_customer(start_server, tmp_path)
    hold_mail(provider, 1)
    target = f"127.0.0.1:{provider.atrn_port}"
    other = tmp_path / "other-cert.pem"
    other.write_bytes(self_signed("mx.test")[0])  # the right name, another key: not the provider's
    result = turn(customer, target, "--cafile", str(other), "--tls-name", "mx.test")
    assert result.returncode == 1, result.stderr
    assert "TLS with the provider failed: certificate of mx.test is not trusted" in result.stderr
    result = turn(customer, target, "--cafile", str(provider.cert_file), "--tls-name", "wrong.test")
    assert result.returncode == 1, result.stderr
    assert "certificate for wrong.test does not match: it is for mx.test" in result.stderr
    assert len(held(provider)) == 1


class CallInCustomer(RealServer):
    """The customer's mailsvc with ``[[callin]]`` tables appended to its config."""

    def __init__(self, root: Path, callins, **options) -> None:
        super().__init__(root, **options)
        self.callins = [dict(c) for c in callins]

    def write_config(self) -> Path:
        path = super().write_config()
        out = []
        for entry in self.callins:
            out.append("[[callin]]")
            out.extend(f"{key} = {toml_value(value)}" for key, value in entry.items())
            out.append("")
        with open(path, "a", encoding="utf-8") as f:
            f.write("\n" + "\n".join(out))
        return path


def test_callin_schedule_receives_the_held_mail(start_server, tmp_path):
    """The customer's config has a [[callin]] (ATRN, TLS checked with the
    provider's certificate, every second): the running customer server calls
    in by itself and the held mail arrives in its Maildir, without `mailsvc
    turn`; mail held later comes on a later run."""
    provider = start_provider(start_server, tmp_path)
    hold_mail(provider, 2)
    root = tmp_path / "customer"
    root.mkdir()
    password_file = root / "provider.password"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    customer = CallInCustomer(root, [{
        "host": f"127.0.0.1:{provider.atrn_port}", "mode": "atrn", "user": "custuser",
        "password_file": str(password_file), "domains": ["customer.example"], "interval": 1,
        "tls": "required", "ca_file": str(provider.cert_file), "tls_name": "mx.test",
    }], sections={
        "server": {"hostname": "customer.example", "control_socket": str(root / "mailsvc.sock")},
        "local": {"domains": ["customer.example"], "users": ["u", "v"], "aliases": {"postmaster": ["u"]}},
    })
    try:
        customer.start()
        files = customer.wait_for_mail("u", 2, timeout=30)
        texts = sorted(path.read_bytes() for path in files)
        assert b"Kept for you (0)." in texts[0] and b"Kept for you (1)." in texts[1]
        assert all(b"by customer.example (mailsvc) with ESMTPS" in t for t in texts)
        provider.wait_for(lambda: not held(provider), message="the hold hop to empty")
        customer.wait_for_log(f"callin 127.0.0.1:{provider.atrn_port}: 2 messages received", timeout=30)
        hold_mail(provider, 1, to="v@customer.example")  # the next runs bring later mail too
        customer.wait_for_mail("v", 1, timeout=30)
        provider.wait_for(lambda: not held(provider), message="the hold hop to empty again")
        assert customer.running
    finally:
        customer.stop()
    assert "Server Shut Down." in customer.log(this_run=True), customer.tail()
