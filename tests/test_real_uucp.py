"""The UUCP agent against Taylor UUCP's real ``uux`` (Debian package ``uucp``).

A private UUCP configuration lives in a temporary directory (``config``
naming its own spool, log and ``sys`` files; the system ``faraway``), given
to ``uux`` with ``-I``. The agent runs ``uux -I <config> -r -z - faraway!rsmtp``:
``-r`` only queues the job, so no ``uucico`` is started and no daemon is
left behind. ``uustat`` then shows the queued ``rsmtp`` job with the size of
the batch, and the job's data file holds the batch byte for byte, which
``mailsvc rsmtp`` queues as a receiving site would.

``uux`` missing is a failure, not a skip: ``.ci/run`` installs it.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest

from mailsvc import bsmtp, rsmtp
from mailsvc.config import UucpSiteConfig
from mailsvc.delivery.uucp import UucpAgent
from mailsvc.envelope import Envelope, Recipient
from mailsvc.errors import TemporaryDeliveryError
from mailsvc.spool import FileSpool

HOP = "uucp.faraway"
DATA = b"Subject: by uux\r\n\r\nhello over UUCP\r\n.a dot line\r\n"
COMMAND_TIMEOUT = 30  # seconds for uux / uustat


def reactor():
    """The reactor trial runs (imported late: no module-level reactor import)."""
    from twisted.internet import reactor

    return reactor


def tool(name: str) -> str:
    """The path of a Taylor UUCP program; fails (not skips) when missing."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/lib/uucp")
    assert path, f"{name} is not installed: apt-get install uucp (Taylor UUCP), as .ci/run does"
    return path


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that contain ``text`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path("/proc", entry, "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{entry}: {cmdline}")
    return found


class TaylorUUCPTests(unittest.TestCase):
    """uux takes the agent's batch as an rsmtp job for the site."""

    timeout = 90

    def setUp(self):
        self.uux, self.uustat_path = tool("uux"), tool("uustat")
        # Not tmp_path: a setuid uux started by root works as the uucp user,
        # which must reach the config and write the spool; pytest's tmp
        # directories are private (0700) to us.
        self.root = Path(tempfile.mkdtemp(prefix="mailsvc-uucp-"))
        self.addCleanup(shutil.rmtree, self.root, True)
        os.chmod(self.root, 0o755)
        uucp_dir = self.root / "uucp"
        (uucp_dir / "spool").mkdir(parents=True)
        (uucp_dir / "pub").mkdir()
        os.chmod(uucp_dir, 0o777)
        os.chmod(uucp_dir / "spool", 0o777)
        os.chmod(uucp_dir / "pub", 0o777)
        self.config = uucp_dir / "config"
        files = {
            "config": "\n".join(
                [
                    "nodename here",
                    f"spool {uucp_dir / 'spool'}",
                    f"pubdir {uucp_dir / 'pub'}",
                    f"logfile {uucp_dir / 'Log'}",
                    f"statfile {uucp_dir / 'Stats'}",
                    f"debugfile {uucp_dir / 'Debug'}",
                    f"sysfile {uucp_dir / 'sys'}",
                    f"portfile {uucp_dir / 'port'}",
                    f"dialfile {uucp_dir / 'dial'}",
                    f"callfile {uucp_dir / 'call'}",
                    f"passwdfile {uucp_dir / 'passwd'}",
                    "",
                ]
            ),
            # The site: never called from here (uux -r only queues the job).
            "sys": "system faraway\ntime never\n",
            "port": "",
            "dial": "",
            "call": "",
            "passwd": "",
        }
        for name, text in files.items():
            (uucp_dir / name).write_text(text, encoding="ascii")
            os.chmod(uucp_dir / name, 0o644)
        self.uucp_dir = uucp_dir
        self.spool = FileSpool(self.root / "mailspool")

    def tearDown(self):
        # uux -r starts no uucico: nothing may be left running on our config.
        left = processes_mentioning(str(self.uucp_dir))
        self.assertEqual(left, [], "UUCP processes left running")

    def agent(self, site: str = "faraway") -> UucpAgent:
        """The agent, with the command of the config's default but our -I config."""
        command = (self.uux, "-I", str(self.config), "-r", "-z", "-", "{site}!rsmtp")
        return UucpAgent(
            UucpSiteConfig(name=site, domains=("faraway.example",), command=command),
            self.spool,
            reactor(),
            timeout=COMMAND_TIMEOUT,
            hostname="here.test",
            window=0,
        )

    def commit(self):
        """A message for bob@faraway.example under the site's hop."""
        writer = self.spool.newMessage()
        writer.write(DATA)
        envelope = Envelope(sender="alice@here.test", recipients=(), prepend_headers=("Received: from x by here.test",))
        [message] = writer.commit(envelope, {HOP: (Recipient("bob@faraway.example"),)})
        return message

    def jobs(self) -> str:
        """``uustat -I <config> -s faraway``: the jobs queued for the site."""
        proc = subprocess.run(
            [self.uustat_path, "-I", str(self.config), "-s", "faraway"],
            capture_output=True, timeout=COMMAND_TIMEOUT, text=True,
        )
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return proc.stdout

    @defer.inlineCallbacks
    def test_uux_queues_the_batch_as_an_rsmtp_job(self):
        """uux exits 0 (delivered); uustat lists one ``rsmtp`` job for faraway
        whose input is the batch; its data file is the batch byte for byte,
        and ``mailsvc rsmtp`` on it queues the message as sent."""
        message = self.commit()
        with self.spool.open(message) as source:
            sent = source.read()
        batch = bsmtp.batch_bytes(
            "here.test", [bsmtp.BatchMessage(message.envelope, message.envelope.recipients, [sent], len(sent))]
        )
        result = yield self.agent().deliver(message)
        self.assertEqual(result, {"bob@faraway.example": None})

        jobs = self.jobs()
        self.assertEqual(len(jobs.splitlines()), 1, jobs)
        self.assertRegex(jobs, rf"^faraway\.\S+ faraway \S+ .* Executing rsmtp \(sending {len(batch)} bytes\)")

        # The job: an "E" (execute) line naming the data file that is rsmtp's stdin.
        [control] = [p for p in (self.uucp_dir / "spool" / "faraway").rglob("C.*") if p.is_file()]
        fields = control.read_text().split()
        self.assertEqual((fields[0], fields[-1]), ("E", "rsmtp"), fields)
        [data_file] = list((self.uucp_dir / "spool" / "faraway").rglob(fields[1]))
        self.assertEqual(data_file.read_bytes(), batch)

        # What the receiving site's uuxqt would do: run rsmtp on it.
        (self.root / "rx").mkdir()
        config = self.root / "rx" / "mailsvc.toml"
        config.write_text(
            f'[server]\nhostname = "faraway.example"\nspool_dir = "{self.root / "rx" / "spool"}"\n'
            f'[local]\ndomains = ["faraway.example"]\nusers = ["bob"]\naliases = {{ postmaster = ["bob"] }}\n'
            f'[store]\npath = "{self.root / "rx" / "mail"}"\n'
        )
        err = io.StringIO()
        status = rsmtp.main(["--config", str(config)], stdin=io.BytesIO(data_file.read_bytes()), stderr=err)
        self.assertEqual((status, err.getvalue()), (0, ""))
        [queued] = FileSpool(self.root / "rx" / "spool").queued()
        with FileSpool(self.root / "rx" / "spool").open(queued) as source:
            received, rest = source.read().split(b"\r\n", 1)
        self.assertTrue(received.startswith(b"Received: from here.test (uucp) by faraway.example"), received)
        self.assertEqual(rest, sent)

    @defer.inlineCallbacks
    def test_unknown_system_is_a_temporary_error_with_uux_message(self):
        """uux refuses a site it does not know: non-zero exit, and its message
        is in the temporary error; nothing is queued."""
        message = self.commit()
        result = yield self.agent(site="nowhere").deliver(message)
        error = result["bob@faraway.example"]
        self.assertIsInstance(error, TemporaryDeliveryError)
        self.assertRegex(str(error), r"exited with status \d+: \S*uux: nowhere: System not found")
        self.assertEqual(self.jobs(), "")
