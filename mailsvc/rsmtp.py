"""``mailsvc rsmtp``: a BSMTP batch (rfc2442) on standard input, into the spool.

What ``uuxqt`` runs when a UUCP neighbour sends us mail (rfc976: the job
``rsmtp`` with the batch as its input). Each transaction of the batch goes
through the same receiving path as SMTP (``mailsvc.receiver``: policies,
recipient directory, router, spool commit, all built from the config as the
server builds them: ``build``) as from a trusted local client: mail for
other domains is accepted and relayed. The running server's queue runner
delivers what was committed on its next scan.

The batch is read by ``mailsvc.batchreader.BatchReader`` (how errors are
handled and the batch is kept in step: see there); every reply of 400 or
more is reported on standard error with the line it answers, and the batch
goes on.

Exit status: 0 when every transaction was queued whole; 75 (EX_TEMPFAIL)
when something failed that may work later (the spool: 451, 452), so that
``uuxqt`` may run the batch again (the transactions already queued are then
queued twice: at least once, never lost); 65 (EX_DATAERR) when only
permanent errors happened (unknown users, bad commands, a message without
its ``.``); 64 bad command line; 78 bad config.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import BinaryIO, TextIO

from twisted.internet import defer

from mailsvc import config as configuration
from mailsvc.batchreader import EX_OK, EX_TEMPFAIL, BatchReader
from mailsvc.delivery.router import Router
from mailsvc.errors import ConfigError, SpoolError
from mailsvc.receiver import ReceiverContext, ReceiverSettings
from mailsvc.smtp.server import ServerSettings

DEFAULT_CONFIG = "etc/mailsvc.toml"
EX_USAGE, EX_CONFIG = 64, 78


# ---------------------------------------------------------------- building


def build(cfg: configuration.Config) -> tuple[ReceiverContext, ServerSettings]:
    """The receiving context and machine settings for ``cfg``, as the server
    builds them (``mailsvc.tap.build``), with synchronous blocking calls.

    :raise ConfigError: a plugin named in the config is missing.
    :raise SpoolError: the spool directory cannot be used.
    """
    from mailsvc.interfaces import IPolicyFactory, IRecipientDirectoryFactory
    from mailsvc.spool.filespool import FileSpool
    from mailsvc.tap import find_plugin

    where = cfg.path.name
    directory = find_plugin(
        IRecipientDirectoryFactory, cfg.local.directory, f"{where}: [local] directory"
    ).makeDirectory(cfg)
    policies = [
        find_plugin(IPolicyFactory, p.name, f"{where}: [[policy]][{i}] name").makePolicy(dict(p.options))
        for i, p in enumerate(cfg.policies)
    ]
    try:
        spool = FileSpool(cfg.server.spool_dir, log=lambda text: _say(f"warning: {text}"))
    except OSError as e:
        raise SpoolError(f"cannot use the spool {cfg.server.spool_dir}: {e}") from e
    smtp = cfg.smtp
    context = ReceiverContext(
        settings=ReceiverSettings.from_config(cfg),
        directory=directory,
        spool=spool,
        submit=lambda message: None,  # the running server's next scan finds it
        run_blocking=defer.maybeDeferred,
        policies=policies,
        router=Router.from_config(cfg),
    )
    settings = ServerSettings(
        hostname=cfg.server.hostname,
        max_message_size=smtp.max_message_size,
        max_recipients=smtp.max_recipients,
        smtputf8=smtp.smtputf8,  # rfc6531: batches may carry MAIL ... SMTPUTF8
    )
    return context, settings


# ---------------------------------------------------------------- command


_stderr: TextIO | None = None


def _say(text: str) -> None:
    stream = _stderr or sys.stderr
    stream.write(f"mailsvc rsmtp: {text}\n")
    stream.flush()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailsvc rsmtp",
        description="Queue the mail of a BSMTP batch (rfc2442) read on standard input.",
    )
    parser.add_argument(
        "--config", metavar="FILE", default=None,
        help=f"the config file (default: $MAILSVC_CONFIG, else {DEFAULT_CONFIG})",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="write the SMTP replies and a summary to stderr")
    return parser


def main(argv: list[str] | None = None, *, stdin: BinaryIO | None = None, stderr: TextIO | None = None) -> int:
    """Run ``mailsvc rsmtp`` with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    ``stdin`` (binary) and ``stderr`` (text) default to the process's own.
    """
    global _stderr
    _stderr = stderr
    try:
        try:
            args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
        except SystemExit as e:
            return EX_OK if e.code == 0 else EX_USAGE
        path = args.config or os.environ.get("MAILSVC_CONFIG") or DEFAULT_CONFIG
        try:
            cfg = configuration.load(path)
            context, settings = build(cfg)
        except ConfigError as e:
            _say(f"config error: {e}")
            return EX_CONFIG
        except SpoolError as e:
            _say(str(e))
            return EX_TEMPFAIL
        stream = _stderr or sys.stderr
        trace = (lambda out: stream.write(out.decode("utf-8", "replace"))) if args.verbose else None
        reader = BatchReader(context, settings, say=_say, trace=trace)
        result = reader.read(stdin if stdin is not None else sys.stdin.buffer)
        if result.problems or args.verbose:
            failed = len(result.problems)
            _say(
                f"{len(result.queued)} message(s) queued from {result.transactions} transaction(s);"
                f" {failed} problem(s); exit status {result.exit_status}"
            )
        return result.exit_status
    finally:
        _stderr = None


if __name__ == "__main__":
    sys.exit(main())
