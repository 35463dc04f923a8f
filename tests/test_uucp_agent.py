"""The UUCP agent with real child processes on the real reactor.

Each test commits messages to a FileSpool in a temporary directory and lets
``UucpAgent`` run a small command (a Python one-liner, ``sh``): exit 0 means
delivered, anything else a temporary error naming the status and the first
line of stderr; a command that hangs is killed at the timeout. Trial test
cases, so the reactor runs; every child is waited for (and killed by its PID
by the agent on timeout).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from twisted.internet import defer, task
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailsvc import bsmtp
from mailsvc.config import UucpSiteConfig
from mailsvc.delivery import uucp
from mailsvc.delivery.runner import QueueRunner
from mailsvc.delivery.uucp import UucpAgent
from mailsvc.envelope import Envelope, Recipient, RecipientState
from mailsvc.errors import TemporaryDeliveryError
from mailsvc.interfaces import IDeliveryAgent
from mailsvc.spool import FileSpool, RetrySchedule

HOP = "uucp.faraway"
DATA = b"Subject: hi\r\n\r\nhello\r\n.a line with a dot\r\n"
# Copies its stdin to the file named by its first argument (after an optional pause).
COPY = (
    "import sys, time, shutil\n"
    "time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 0)\n"
    "with open(sys.argv[1], 'wb') as out: shutil.copyfileobj(sys.stdin.buffer, out, 65536)\n"
)


def reactor():
    """The reactor trial runs (imported late: no module-level reactor import)."""
    from twisted.internet import reactor

    return reactor


class AgentTests(unittest.TestCase):
    """UucpAgent end to end with a child process."""

    timeout = 60

    def setUp(self):
        self.root = Path(tempfile.mkdtemp(prefix="mailsvc-uucp-agent-"))
        self.addCleanup(shutil.rmtree, self.root, True)
        self.spool = FileSpool(self.root / "spool")
        self.out = self.root / "batch"

    def site(self, command, **limits) -> UucpSiteConfig:
        """The site ``faraway`` with ``command``."""
        return UucpSiteConfig(name="faraway", domains=("faraway.example",), command=tuple(command), **limits)

    def agent(self, command, window=0.0, timeout=30, **limits) -> UucpAgent:
        """An agent for ``faraway`` running ``command``."""
        return UucpAgent(self.site(command, **limits), self.spool, reactor(), timeout=timeout, hostname="here.test", window=window)

    def copy_command(self, pause: float = 0.0) -> list[str]:
        """A command writing its stdin to ``self.out``."""
        return [sys.executable, "-c", COPY, str(self.out), str(pause)]

    def commit(self, data: bytes = DATA, recipients=("bob@faraway.example",), sender="alice@example.test", parameters=()):
        """Commit one message under the site's hop; return its QueuedMessage."""
        writer = self.spool.newMessage()
        writer.write(data)
        envelope = Envelope(
            sender=sender,
            recipients=(),
            parameters=tuple(parameters),
            prepend_headers=("Received: from client by here.test (mailsvc) with ESMTP id x",),
        )
        [message] = writer.commit(envelope, {HOP: tuple(Recipient(r) for r in recipients)})
        return message

    def expected_batch(self, *messages) -> bytes:
        """The batch the agent should write for ``messages``."""
        items = []
        for message in messages:
            with self.spool.open(message) as source:
                data = source.read()
            items.append(bsmtp.BatchMessage(message.envelope, message.envelope.recipients, [data], len(data)))
        return bsmtp.batch_bytes("here.test", items)

    # ---------------------------------------------------------------- tests

    def test_is_a_delivery_agent(self):
        """UucpAgent provides IDeliveryAgent."""
        verifyObject(IDeliveryAgent, self.agent(["true"]))

    @defer.inlineCallbacks
    def test_exit_zero_delivers_and_the_batch_is_exact(self):
        """The command gets the BSMTP batch on stdin, byte for byte; status 0
        marks every recipient delivered."""
        message = self.commit(recipients=("bob@faraway.example", "carol@faraway.example"))
        result = yield self.agent(self.copy_command()).deliver(message)
        self.assertEqual(result, {"bob@faraway.example": None, "carol@faraway.example": None})
        self.assertEqual(self.out.read_bytes(), self.expected_batch(message))

    @defer.inlineCallbacks
    def test_smtputf8_goes_in_the_batch_when_needed(self):
        """SMTPUTF8 messages in one batch (rfc6531 with rfc2442): a UTF-8
        recipient and a UTF-8 Subject keep SMTPUTF8 on MAIL, the recipient in
        raw UTF-8; an all-ASCII one that had it goes without it."""
        utf8 = (("SMTPUTF8", ""),)
        to_joerg = self.commit(recipients=("jörg@faraway.example",), parameters=utf8)
        subject = self.commit("Subject: Grüße\r\n\r\nhello\r\n".encode(), parameters=utf8 + (("BODY", "8BITMIME"),))
        plain = self.commit(parameters=utf8)
        agent = self.agent(self.copy_command(), window=0.2)
        results = yield defer.gatherResults([agent.deliver(m) for m in (to_joerg, subject, plain)])
        self.assertEqual(results, [{"jörg@faraway.example": None}, {"bob@faraway.example": None}, {"bob@faraway.example": None}])
        batch = self.out.read_bytes()
        self.assertEqual(batch, self.expected_batch(to_joerg, subject, plain))
        mails = [line for line in batch.split(b"\r\n") if line.startswith(b"MAIL ")]
        self.assertEqual([line.split(b" ")[2:-1] for line in mails], [[b"SMTPUTF8"], [b"BODY=8BITMIME", b"SMTPUTF8"], []])
        self.assertIn("RCPT TO:<jörg@faraway.example>\r\n".encode(), batch)

    @defer.inlineCallbacks
    def test_site_name_replaces_placeholder(self):
        """``{site}`` in the command is replaced by the site's name."""
        message = self.commit()
        script = 'import sys; open(sys.argv[1], "w").write(sys.argv[2]); sys.stdin.buffer.read()'
        result = yield self.agent([sys.executable, "-c", script, str(self.out), "{site}!rsmtp"]).deliver(message)
        self.assertEqual(result, {"bob@faraway.example": None})
        self.assertEqual(self.out.read_text(), "faraway!rsmtp")

    @defer.inlineCallbacks
    def test_exit_one_is_temporary_with_stderr(self):
        """A non-zero exit is a temporary error naming the status and the
        first line of stderr."""
        message = self.commit()
        command = ["sh", "-c", 'cat >/dev/null; echo "uux: faraway: unknown system" >&2; echo second line >&2; exit 1']
        result = yield self.agent(command).deliver(message)
        error = result["bob@faraway.example"]
        self.assertIsInstance(error, TemporaryDeliveryError)
        self.assertIn("exited with status 1: uux: faraway: unknown system", str(error))
        self.assertNotIn("second line", str(error).replace("echo second line", ""))

    @defer.inlineCallbacks
    def test_timeout_kills_and_is_temporary(self):
        """A command that does not exit within the timeout is killed (by its
        PID, SIGKILL); every recipient gets a temporary error."""
        message = self.commit()
        script = "import sys, time; sys.stderr.write('waiting\\n'); sys.stderr.flush(); time.sleep(60)"
        started = reactor().seconds()
        result = yield self.agent([sys.executable, "-c", script], timeout=1).deliver(message)
        error = result["bob@faraway.example"]
        self.assertIsInstance(error, TemporaryDeliveryError)
        self.assertIn("did not exit within 1 s and was killed: waiting", str(error))
        self.assertLess(reactor().seconds() - started, 20)

    @defer.inlineCallbacks
    def test_five_megabyte_message_is_streamed(self):
        """A 5 MB message goes through a slow reader whole, written to the pipe
        a piece at a time (no piece much larger than a 64 KiB read)."""
        big = b"".join(b".%07d " % i + b"y" * 70 + b"\r\n" for i in range(65000))
        self.assertGreater(len(big), 5_000_000)
        message = self.commit(big)
        pieces = []
        real = bsmtp.write_batch

        def recording(*args):
            for piece in real(*args):
                pieces.append(len(piece))
                yield piece

        self.patch(uucp.bsmtp, "write_batch", recording)
        result = yield self.agent(self.copy_command(pause=0.5)).deliver(message)
        self.assertEqual(result, {"bob@faraway.example": None})
        self.assertLessEqual(max(pieces), 2 * uucp.CHUNK_SIZE)
        self.assertGreater(len(pieces), 70)
        self.patch(uucp.bsmtp, "write_batch", real)
        self.assertEqual(self.out.read_bytes(), self.expected_batch(message))

    @defer.inlineCallbacks
    def test_exit_zero_without_reading_is_temporary(self):
        """A command that exits 0 without reading its input has not taken the
        batch: temporary error."""
        message = self.commit(b"z" * 998 + b"\r\n" * 1 + (b"w" * 98 + b"\r\n") * 20000)
        result = yield self.agent(["true"]).deliver(message)
        error = result["bob@faraway.example"]
        self.assertIsInstance(error, TemporaryDeliveryError)
        self.assertIn("without reading the whole batch", str(error))

    @defer.inlineCallbacks
    def test_missing_command_is_temporary(self):
        """A command that is not installed: temporary, named."""
        message = self.commit()
        result = yield self.agent(["no-such-uux-here", "-"]).deliver(message)
        self.assertIn("command not found: no-such-uux-here", str(result["bob@faraway.example"]))

    @defer.inlineCallbacks
    def test_message_gone_from_the_spool_is_temporary(self):
        """A message whose data vanished (deleted meanwhile) is not sent; the others are."""
        gone, kept = self.commit(), self.commit(sender="b@example.test")
        self.spool.remove(gone)
        agent = self.agent(self.copy_command(), window=0.2)
        results = yield defer.gatherResults([agent.deliver(gone), agent.deliver(kept)])
        self.assertIn("cannot read the message from the spool", str(results[0]["bob@faraway.example"]))
        self.assertEqual(results[1], {"bob@faraway.example": None})
        self.assertEqual(self.out.read_bytes(), self.expected_batch(kept))

    @defer.inlineCallbacks
    def test_messages_within_the_window_share_a_batch(self):
        """Messages arriving within the window go in one batch (one command
        run); the batch's result is each message's result."""
        messages = [self.commit(f"Subject: {i}\r\n\r\n{i}\r\n".encode(), sender=f"s{i}@example.test") for i in range(3)]
        agent = self.agent(self.copy_command(), window=0.3)
        results = yield defer.gatherResults([agent.deliver(m) for m in messages])
        self.assertEqual(results, [{"bob@faraway.example": None}] * 3)
        self.assertEqual(agent.runs, 1)
        self.assertEqual(self.out.read_bytes(), self.expected_batch(*messages))

    @defer.inlineCallbacks
    def test_batch_limits(self):
        """``max_messages`` and ``max_bytes`` cut batches: 3 messages with
        max_messages=2 make two command runs; a failing run fails only its own."""
        messages = [self.commit(sender=f"s{i}@example.test") for i in range(3)]
        outs = self.root / "outs"
        outs.mkdir()
        script = (
            "import os, sys; data = sys.stdin.buffer.read();"
            "open(os.path.join(sys.argv[1], str(os.getpid())), 'wb').write(data);"
            "sys.exit(1 if data.count(b'MAIL FROM') == 1 else 0)"
        )
        agent = self.agent([sys.executable, "-c", script, str(outs)], window=5, max_messages=2)
        results = yield defer.gatherResults([agent.deliver(m) for m in messages])
        self.assertEqual(agent.runs, 2)
        self.assertEqual(results[:2], [{"bob@faraway.example": None}] * 2)
        self.assertIsInstance(results[2]["bob@faraway.example"], TemporaryDeliveryError)
        small = self.agent(self.copy_command(), window=5, max_bytes=1)
        result = yield small.deliver(messages[0])  # bigger than max_bytes: sent at once, alone
        self.assertEqual(result, {"bob@faraway.example": None})

    @defer.inlineCallbacks
    def test_only_pending_recipients_once_each(self):
        """Recipients already delivered are not sent again; duplicates once."""
        message = self.commit(recipients=("bob@faraway.example", "carol@faraway.example", "bob@faraway.example"))
        done = message.envelope.recipients[1].evolve(state=RecipientState.DELIVERED)
        message = message.evolve(envelope=message.envelope.evolve(recipients=(message.envelope.recipients[0], done, message.envelope.recipients[2])))
        result = yield self.agent(self.copy_command()).deliver(message)
        self.assertEqual(result, {"bob@faraway.example": None})
        self.assertEqual(self.out.read_bytes().count(b"RCPT TO:"), 1)

    @defer.inlineCallbacks
    def test_queue_runner_defers_with_the_command_error(self):
        """Through the queue runner: a failing command leaves the message queued
        with the error as last_error, to be retried like any deferred message."""
        self.commit()
        command = ["sh", "-c", "cat >/dev/null; echo 'uux: spool full' >&2; exit 75"]
        runner = QueueRunner(self.spool, {HOP: self.agent(command)}, reactor(), RetrySchedule(first=300), scan_interval=3600)
        yield runner.start()
        for _ in range(200):
            [message] = self.spool.queued()
            if message.envelope.recipients[0].attempts:
                break
            yield task.deferLater(reactor(), 0.05, lambda: None)
        yield runner.stop()
        recipient = message.envelope.recipients[0]
        self.assertEqual((recipient.state, recipient.attempts), (RecipientState.PENDING, 1))
        self.assertIn("exited with status 75: uux: spool full", recipient.last_error)
