"""``mailsvc queue``: list and show read a spool built here (in process);
flush, hold, release and delete act on a real ``twistd mailsvc`` through
its control socket (the ``mailsvc`` script, in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailsvc import cli
from mailsvc.envelope import Envelope, Recipient, RecipientState
from mailsvc.spool import FileSpool
from realserver import RealServer, start_server  # noqa: F401 (fixture)

MAILSVC = Path(sys.prefix) / "bin" / "mailsvc"
NOW = time.time()
LATER = NOW + 3600
BOB = Recipient("bob@example.test", "team@example.test", "bob")
ALICE = Recipient("alice@example.test", "alice@example.test", "alice")
FAR = Recipient("dave@far.example", "dave@far.example")
DATA = b"Subject: queued for a while\r\nFrom: carol@example.test\r\n\r\nbody\r\n"


def files_in(root: Path) -> list[str]:
    """Every file under ``root``, relative to it, but spent files kept for
    reuse (``spent/``, mailsvc.spool.recycle): they are no message's."""
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] != "spent"
    )


def commit(spool_dir, routes, data=DATA, sender="carol@example.test"):
    """Queue one message into the spool at ``spool_dir``; return its QueuedMessages."""
    writer = FileSpool(spool_dir).newMessage()
    writer.write(data)
    envelope = Envelope(
        sender=sender, recipients=(), helo="client.test", client_address="192.0.2.7",
        received_at=NOW - 60, prepend_headers=("Received: from client.test by mx.test",),
    )
    return writer.commit(envelope, routes)


def waiting(*recipients):
    """``recipients`` tried once and due again in an hour."""
    return tuple(r.evolve(attempts=1, next_attempt=LATER, last_error="451 4.3.0 try later") for r in recipients)


@pytest.fixture
def config(tmp_path):
    """A written config (not started) whose spool is ``tmp_path/srv/spool``."""
    server = RealServer(tmp_path / "srv")
    server.write_config()
    return server


def run_main(capsys, *argv) -> tuple[int, str, str]:
    """``cli.main(argv)`` in process: (status, stdout, stderr)."""
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


# ---------------------------------------------------------------- list


def test_list_empty_spool_creates_nothing(config, capsys):
    """With no spool yet: 'Mail queue is empty', an empty JSON list, and no
    directory is created (listing is read-only)."""
    assert run_main(capsys, "queue", "list", "--config", str(config.config_path)) == (0, "Mail queue is empty\n", "")
    status, out, _ = run_main(capsys, "queue", "list", "--json", "--config", str(config.config_path))
    assert status == 0 and json.loads(out) == {"messages": []}
    assert not config.spool_dir.exists()


def test_list_shows_what_waits_and_why(config, capsys):
    """Text: one line per message (id, hop, size, sender, held mark), one per
    recipient with state, attempts, next attempt and last error; a summary."""
    [local] = commit(config.spool_dir, {"local": waiting(BOB) + (ALICE.evolve(state=RecipientState.DELIVERED, attempts=1),)})
    [held] = commit(config.spool_dir, {"relay": waiting(FAR)})
    FileSpool(config.spool_dir).hold("relay", held.id)
    status, out, err = run_main(capsys, "queue", "list", "--config", str(config.config_path))
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "HOP", "SIZE", "ARRIVAL", "SENDER"]
    assert lines[1].startswith(local.id) and "local" in lines[1] and str(len(DATA)) in lines[1]
    assert lines[1].endswith("<carol@example.test>")
    assert lines[2].split()[:6] == ["<bob@example.test>", "(to", "<team@example.test>)", "pending", "attempts", "1"]
    assert "next " + time.strftime("%Y-%m-%d %H:%M", time.localtime(LATER)) in lines[2]
    assert lines[3].strip() == "last error: 451 4.3.0 try later"
    assert lines[4].split() == ["<alice@example.test>", "delivered", "attempts", "1"]
    assert lines[5].startswith(held.id) and lines[5].endswith("(held)") and "relay" in lines[5]
    assert lines[-1] == f"-- 2 messages (1 held), 2 recipients pending, {2 * len(DATA)} octets"


def test_list_json_round_trips(config, capsys):
    """--json: every field, parsed back; --site keeps one hop."""
    local, relay = commit(config.spool_dir, {"local": waiting(BOB), "relay": (FAR,)})
    status, out, _ = run_main(capsys, "queue", "list", "--json", "--config", str(config.config_path))
    assert status == 0
    messages = json.loads(out)["messages"]
    assert [(m["id"], m["hop"], m["held"]) for m in messages] == [(local.id, "local", False), (relay.id, "relay", False)]
    first = messages[0]
    assert first["size"] == len(DATA)
    assert first["sender"] == "carol@example.test"
    assert first["received_at"] == pytest.approx(NOW - 60)
    assert first["recipients"] == [{
        "address": "bob@example.test", "original": "team@example.test", "mailbox": "bob",
        "state": "pending", "attempts": 1, "next_attempt": pytest.approx(LATER),
        "last_error": "451 4.3.0 try later",
    }]
    status, out, _ = run_main(capsys, "queue", "list", "--json", "--site", "relay", "--config", str(config.config_path))
    assert [m["hop"] for m in json.loads(out)["messages"]] == ["relay"]


def test_list_changes_nothing(config, capsys):
    """Listing and showing leave every file as it was (names and times)."""
    [message] = commit(config.spool_dir, {"local": waiting(BOB)})
    before = {p: os.stat(p).st_mtime_ns for p in config.spool_dir.rglob("*")}
    run_main(capsys, "queue", "list", "--config", str(config.config_path))
    run_main(capsys, "queue", "show", message.id, "--config", str(config.config_path))
    assert {p: os.stat(p).st_mtime_ns for p in config.spool_dir.rglob("*")} == before


def test_config_from_environment(config, capsys, monkeypatch):
    """Without --config, $MAILSVC_CONFIG names the file."""
    commit(config.spool_dir, {"local": waiting(BOB)})
    monkeypatch.setenv("MAILSVC_CONFIG", str(config.config_path))
    status, out, _ = run_main(capsys, "queue", "list", "--json")
    assert status == 0 and len(json.loads(out)["messages"]) == 1


def test_bad_config_exits_78(tmp_path, capsys):
    """A missing config file: one line naming it, status 78."""
    status, out, err = run_main(capsys, "queue", "list", "--config", str(tmp_path / "nope.toml"))
    assert status == 78 and "config error" in err and "nope.toml" in err


# ---------------------------------------------------------------- show


def test_show_envelope_state_and_headers(config, capsys):
    """show: the envelope, the recipients' state and the headers (trace first)."""
    [message] = commit(config.spool_dir, {"local": waiting(BOB)})
    status, out, _ = run_main(capsys, "queue", "show", message.id, "--config", str(config.config_path))
    assert status == 0
    assert f"id:          {message.id}" in out
    assert "sender:      <carol@example.test>" in out
    assert "received:    client.test [192.0.2.7] with ESMTP" in out
    assert "last error: 451 4.3.0 try later" in out
    headers = out.split("headers:\n")[1].splitlines()
    assert [h.strip() for h in headers] == [
        "Received: from client.test by mx.test", "Subject: queued for a while", "From: carol@example.test",
    ]


def test_show_json(config, capsys):
    """show --json: every hop of the message, and its headers, parsed back."""
    local, relay = commit(config.spool_dir, {"local": waiting(BOB), "relay": (FAR,)})
    FileSpool(config.spool_dir).hold("relay", relay.id)
    status, out, _ = run_main(capsys, "queue", "show", local.id, "--json", "--config", str(config.config_path))
    assert status == 0
    shown = json.loads(out)
    assert shown["id"] == local.id
    assert [(m["hop"], m["held"]) for m in shown["messages"]] == [("local", False), ("relay", True)]
    assert shown["messages"][0]["helo"] == "client.test"
    assert shown["messages"][1]["recipients"][0]["address"] == "dave@far.example"
    assert shown["headers"][1] == "Subject: queued for a while"


@pytest.mark.parametrize("bad_id", ["0000000000000000000a", "no/such"])
def test_show_unknown_id_exits_1(config, capsys, bad_id):
    """An unknown or malformed ID: a clear message naming it, status 1."""
    commit(config.spool_dir, {"local": waiting(BOB)})
    status, out, err = run_main(capsys, "queue", "show", bad_id, "--config", str(config.config_path))
    assert status == 1 and out == ""
    assert err.startswith("mailsvc: queue show: ") and bad_id in err


# ---------------------------------------------------------------- against a real server


def mailsvc(server: RealServer, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run the installed ``mailsvc`` script with the server's config; bounded."""
    return subprocess.run(
        [str(MAILSVC), *args, "--config", str(server.config_path)],
        capture_output=True, text=True, timeout=timeout, cwd=server.root,
    )


def started(start_server, tmp_path, routes_list):
    """Queue ``routes_list`` into a new server's spool, then start it (scan: hourly).

    Returns the server and the QueuedMessages per commit.
    """
    spool_dir = tmp_path / "srv" / "spool"
    queued = [commit(spool_dir, routes) for routes in routes_list]
    server = start_server("srv", sections={
        "delivery": {"scan_interval": 3600},
        "server": {"control_socket": str(tmp_path / "srv" / "run" / "ctl.sock")},
    })
    return server, queued


def test_flush_delivers_now(start_server, tmp_path):
    """`queue flush` tries at once what is due only in an hour: it lands in
    the Maildir and leaves the spool; flush DOMAIN tries only that domain."""
    server, [[far], [local]] = started(start_server, tmp_path, [{"relay": waiting(FAR)}, {"local": waiting(ALICE)}])
    result = mailsvc(server, "queue", "flush", "example.test")
    assert (result.returncode, result.stdout) == (0, "1 message for example.test being tried now\n"), result.stderr
    server.wait_for_mail("alice")
    server.wait_for(lambda: f"local/C.{local.id}" not in server.spool_files(), message="the local message to leave")
    assert f"relay/C.{far.id}" in server.spool_files()


def test_hold_release_delete(start_server, tmp_path):
    """hold: H. replaces C., a flush does not deliver it; release: back to C.,
    the next flush delivers it; delete: gone; a second delete and an unknown
    ID fail with status 1 and a clear message."""
    server, [[kept], [gone]] = started(start_server, tmp_path, [{"local": waiting(ALICE)}, {"local": waiting(BOB)}])
    result = mailsvc(server, "queue", "hold", kept.id)
    assert (result.returncode, result.stdout) == (0, f"{kept.id}: held (local)\n"), result.stderr
    assert f"local/H.{kept.id}" in server.spool_files()
    listing = json.loads(mailsvc(server, "queue", "list", "--json").stdout)["messages"]
    assert [(m["id"], m["held"]) for m in listing] == [(kept.id, True), (gone.id, False)]

    result = mailsvc(server, "queue", "delete", gone.id)
    assert (result.returncode, result.stdout) == (0, f"{gone.id}: deleted (local)\n"), result.stderr
    assert not [f for f in server.spool_files() if gone.id in f]
    result = mailsvc(server, "queue", "delete", gone.id)
    assert result.returncode == 1
    assert result.stderr == f"mailsvc: queue delete: no message {gone.id} in the queue\n"

    assert mailsvc(server, "queue", "flush").stdout == "0 messages being tried now\n"
    time.sleep(0.5)
    assert server.maildir("alice") == [] and server.maildir("bob") == []

    result = mailsvc(server, "queue", "release", kept.id)
    assert (result.returncode, result.stdout) == (0, f"{kept.id}: released (local)\n"), result.stderr
    assert f"local/C.{kept.id}" in server.spool_files()
    assert mailsvc(server, "queue", "flush").stdout == "1 message being tried now\n"
    server.wait_for_mail("alice")
    server.wait_idle()

    result = mailsvc(server, "queue", "hold", "0000000000000000000a")
    assert result.returncode == 1 and "no message 0000000000000000000a in the queue" in result.stderr


def test_held_message_survives_a_restart(start_server, tmp_path):
    """A held message stays held across a restart: recovery keeps H. and D.,
    the runner does not deliver it; released, it is delivered."""
    server, [[message]] = started(start_server, tmp_path, [{"local": (ALICE,)}])
    server.wait_for_mail("alice")  # the first one is due now: delivered
    [[held]] = [commit(server.spool_dir, {"local": waiting(ALICE)})]
    server.restart()
    assert mailsvc(server, "queue", "hold", held.id).returncode == 0
    server.restart()
    assert sorted(server.spool_files()) == [f"local/D.{held.id}", f"local/H.{held.id}"]
    assert mailsvc(server, "queue", "release", held.id).returncode == 0
    assert mailsvc(server, "queue", "flush").returncode == 0
    server.wait_for_mail("alice", count=2)


def test_server_not_running(config):
    """flush/hold/release/delete with no server: a clear message naming the
    socket, status 1; list still works."""
    socket_path = config.config()["server"].get("control_socket") or str(config.root.parent / "var/run/mailsvc.sock")
    for args in (["queue", "flush"], ["queue", "hold", "0000000000000000000a"], ["queue", "delete", "x"]):
        result = mailsvc(config, *args)
        assert result.returncode == 1, result
        assert result.stderr == (
            f"mailsvc: {' '.join(args[:2])}: cannot reach the server at {socket_path}: is it running?\n"
        )
    assert mailsvc(config, "queue", "list").stdout == "Mail queue is empty\n"
