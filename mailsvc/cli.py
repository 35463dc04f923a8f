"""The ``mailsvc`` command: queue control and sendmail.

::

    mailsvc queue list [--site HOP] [--json]     what waits, and why (like mailq)
    mailsvc queue show ID [--json]               one message: envelope, state, headers
    mailsvc queue flush [DOMAIN]                 try now what waits (for DOMAIN)
    mailsvc queue hold|release|delete ID         act on one message
    mailsvc sendmail [-t] [-i] [-f sender] [-F name] [rcpt ...]
    mailsvc turn HOST[:PORT] --user U --password-file F [--atrn|--turn]
                                                 call a provider in; receive the held mail

``list`` and ``show`` read the spool directly and change nothing: they work
with the server stopped. ``flush``, ``hold``, ``release`` and ``delete`` ask
the running server over its control socket (``mailsvc.control``).
``sendmail`` writes into the spool itself, then asks a running server to
deliver at once. Every command takes ``--config FILE`` (default: the
environment's ``MAILSVC_CONFIG``, else ``etc/mailsvc.toml``).

Installed as ``sendmail`` (a link named so), the command behaves as
``mailsvc sendmail``; named ``mailq``, as ``mailsvc queue list``.

Exit status: 0 done; 1 refused (unknown ID, server not running, bad
message); 2 or 64 bad command line; 67 unknown local user; 75 spool
failure; 78 bad config.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import sys
import time
from datetime import datetime, timezone

from twisted.internet import defer
from twisted.internet.task import react

from mailsvc import config as configuration
from mailsvc import control, sendmail
from mailsvc.envelope import RecipientState
from mailsvc.errors import ConfigError, SpoolError
from mailsvc.smtp.address import AddressError, check_mailbox

DEFAULT_CONFIG = "etc/mailsvc.toml"
EX_USAGE, EX_NOUSER, EX_TEMPFAIL, EX_CONFIG = 64, 67, 75, 78
MAX_SHOWN_HEADER_LINES = 1000


class _Failed(Exception):
    """A command failed: ``str()`` is the message, ``status`` the exit status."""

    def __init__(self, text: str, status: int = 1) -> None:
        super().__init__(text)
        self.status = status


# ---------------------------------------------------------------- entry


def main(argv: list[str] | None = None) -> int:
    """Run the ``mailsvc`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    if argv is None:
        argv = sys.argv[1:]
        called = os.path.basename(sys.argv[0])
        if called == "sendmail":
            argv = ["sendmail", *argv]
        elif called == "mailq":
            argv = ["queue", "list", *argv]
    head = argv[:2] if argv[:1] == ["--config"] else argv[:1] if argv[:1] and argv[0].startswith("--config=") else []
    if argv[len(head) : len(head) + 1] == ["sendmail"]:  # its own option syntax: not argparse
        return _sendmail_command(argv[len(head) + 1 :] + head)
    if argv[len(head) : len(head) + 1] == ["rsmtp"]:  # a BSMTP batch on stdin: mailsvc.rsmtp
        from mailsvc import rsmtp

        return rsmtp.main(argv[len(head) + 1 :] + head)
    if argv[len(head) : len(head) + 1] == ["turn"]:  # call a provider in (ATRN/TURN): mailsvc.callin
        from mailsvc import callin

        return callin.main(argv[len(head) + 1 :] + head)
    if argv[len(head) : len(head) + 1] == ["passwd"]:  # set an AUTH password: mailsvc.passwd
        from mailsvc import passwd

        return passwd.main(argv[len(head) + 1 :] + head)
    args = _parser().parse_args(argv)
    try:
        cfg = _load_config(args.config)
        return args.run(cfg, args)
    except _Failed as failure:
        _say(f"{args.name}: {failure}")
        return failure.status
    except BrokenPipeError:  # `mailsvc queue list | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", default=argparse.SUPPRESS, metavar="FILE",
        help=f"the config file (default: $MAILSVC_CONFIG, else {DEFAULT_CONFIG})",
    )
    parser = argparse.ArgumentParser(prog="mailsvc", parents=[common], description="Control mailsvc's queue; send mail.")
    parser.set_defaults(config=None)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("sendmail", help="send a message read from stdin (`mailsvc sendmail --help` for its options)")
    queue = commands.add_parser("queue", parents=[common], help="look at and act on the queue")
    actions = queue.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name, run, help, **kwargs):
        sub = actions.add_parser(name, parents=[common], help=help, **kwargs)
        sub.set_defaults(run=run, name=f"queue {name}")
        return sub

    listing = action("list", _list, "what waits in the spool, and why (the server may be stopped)")
    listing.add_argument("--site", metavar="HOP", help="only this next hop (local, relay, ...)")
    listing.add_argument("--json", action="store_true", help="JSON instead of text")
    show = action("show", _show, "one message: envelope, recipients' state and headers")
    show.add_argument("id", metavar="ID")
    show.add_argument("--json", action="store_true", help="JSON instead of text")
    flush = action("flush", _flush, "try now every waiting message (with a recipient in DOMAIN)")
    flush.add_argument("domain", nargs="?", metavar="DOMAIN")
    for name, text in (("hold", "keep a message, do not deliver it until released"),
                       ("release", "deliver a held message again"),
                       ("delete", "remove a message from the spool")):
        action(name, _remote_action, text).add_argument("id", metavar="ID")
    return parser


def _say(text: str) -> None:
    sys.stderr.write(f"mailsvc: {text}\n")


def _load_config(path: str | None) -> configuration.Config:
    path = path or os.environ.get("MAILSVC_CONFIG") or DEFAULT_CONFIG
    try:
        return configuration.load(path)
    except ConfigError as error:
        raise _Failed(f"config error: {error}", EX_CONFIG) from None


def _spool(cfg: configuration.Config):
    """The FileSpool, or None when it was never created (so: empty). Reading
    it creates nothing, except ``tmp/`` in a spool that lacks it."""
    from mailsvc.spool import FileSpool

    directory = cfg.server.spool_dir
    if not (directory / "tmp").is_dir():
        return None
    return FileSpool(directory, log=lambda text: _say(f"warning: {text}"))


# ---------------------------------------------------------------- list, show


def _entries(spool, messages_held) -> list[dict]:
    """JSON-ready descriptions of ``(QueuedMessage, held)`` pairs."""
    out = []
    for message, held in messages_held:
        env = message.envelope
        out.append({
            "id": message.id,
            "hop": message.hop,
            "held": held,
            "size": spool.size(message),
            "received_at": env.received_at,
            "arrival": datetime.fromtimestamp(env.received_at, timezone.utc).isoformat(),
            "sender": env.sender,
            "recipients": [
                {
                    "address": r.address,
                    "original": r.original,
                    "mailbox": r.mailbox,
                    "state": r.state.value,
                    "attempts": r.attempts,
                    "next_attempt": r.next_attempt,
                    "last_error": r.last_error,
                }
                for r in env.recipients
            ],
        })
    return out


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _text_entry(entry: dict, now: float) -> list[str]:
    held = "  (held)" if entry["held"] else ""
    lines = [
        f"{entry['id']:<20}  {entry['hop']:<6} {entry['size']:>9}  {_when(entry['received_at'])}  "
        f"<{entry['sender']}>{held}"
    ]
    for r in entry["recipients"]:
        to = f"<{r['address']}>"
        if r["original"] and r["original"].lower() != r["address"].lower():
            to += f" (to <{r['original']}>)"
        state = f"    {to}  {r['state']}  attempts {r['attempts']}"
        if r["state"] == RecipientState.PENDING.value:
            state += "  next " + ("now" if r["next_attempt"] <= now else _when(r["next_attempt"]))
        lines.append(state)
        if r["last_error"]:
            lines.append(f"        last error: {r['last_error']}")
    return lines


def _list(cfg, args) -> int:
    """``queue list``: every queued and held message, oldest first."""
    spool = _spool(cfg)
    pairs = []
    if spool is not None:
        pairs = [(m, False) for m in spool.queued()] + [(m, True) for m in spool.held()]
        pairs.sort(key=lambda pair: (pair[0].id, pair[0].hop))
    if args.site:
        pairs = [pair for pair in pairs if pair[0].hop == args.site]
    entries = _entries(spool, pairs) if pairs else []
    if args.json:
        print(json.dumps({"messages": entries}, indent=2))
        return 0
    if not entries:
        print("Mail queue is empty")
        return 0
    now = time.time()
    print(f"{'ID':<20}  {'HOP':<6} {'SIZE':>9}  {'ARRIVAL':<19}  SENDER")
    for entry in entries:
        print("\n".join(_text_entry(entry, now)))
    held = sum(e["held"] for e in entries)
    pending = sum(r["state"] == "pending" for e in entries for r in e["recipients"])
    total = sum(e["size"] for e in entries)
    count = len(entries)
    print(
        f"-- {count} message{'s' if count != 1 else ''} ({held} held), "
        f"{pending} recipient{'s' if pending != 1 else ''} pending, {total} octets"
    )
    return 0


def _headers(spool, message) -> list[str]:
    """The header lines of ``message`` as delivered (trace first), without line ends."""
    lines = []
    try:
        with spool.open(message) as data:
            for raw in data:
                line = raw.rstrip(b"\r\n")
                if not line or len(lines) >= MAX_SHOWN_HEADER_LINES:
                    break
                lines.append(line.decode("utf-8", "replace"))
    except OSError as e:
        raise _Failed(f"cannot read message {message.id}: {e.strerror}") from None
    return lines


def _show(cfg, args) -> int:
    """``queue show ID``: the envelope and state per hop, then the headers."""
    spool = _spool(cfg)
    try:
        found = spool.find(args.id) if spool is not None else []
    except ValueError:
        raise _Failed(f"{args.id!r} is not a queue ID") from None
    if not found:
        raise _Failed(f"no message {args.id} in the queue")
    entries = _entries(spool, found)
    for entry, (message, _) in zip(entries, found):
        env = message.envelope
        entry.update(helo=env.helo, client_address=env.client_address, protocol=env.protocol,
                     parameters=dict(env.parameters))
    headers = _headers(spool, found[0][0])
    if args.json:
        print(json.dumps({"id": args.id, "messages": entries, "headers": headers}, indent=2))
        return 0
    now = time.time()
    for entry in entries:
        origin = entry["protocol"]
        if entry["helo"] or entry["client_address"]:
            origin = f"{entry['helo'] or 'unknown'} [{entry['client_address']}] with {origin}"
        parameters = " ".join(f"{k}={v}" for k, v in entry["parameters"].items()) or "-"
        print(f"id:          {entry['id']}")
        print(f"hop:         {entry['hop']}{' (held)' if entry['held'] else ''}")
        print(f"arrival:     {_when(entry['received_at'])}")
        print(f"size:        {entry['size']} octets")
        print(f"sender:      <{entry['sender']}>")
        print(f"received:    {origin}")
        print(f"parameters:  {parameters}")
        print("recipients:")
        print("\n".join(_text_entry(entry, now)[1:]))
        print()
    print("headers:")
    for line in headers:
        print(f"    {line}")
    return 0


# ---------------------------------------------------------------- server actions


def _call(cfg, command, **arguments) -> dict:
    """Send ``command`` to the running server (under ``react``); return its answer."""
    outcome: dict = {}

    async def run(reactor):
        try:
            outcome["answer"] = await control.call(reactor, cfg.server.control_socket, command, **arguments)
        except (control.ServerUnreachable, control.UnknownMessage, control.NotHeld) as e:
            outcome["error"] = _Failed(str(e))
        except SpoolError as e:
            outcome["error"] = _Failed(f"the server's spool failed: {e}", EX_TEMPFAIL)
        except Exception as e:  # noqa: BLE001 - any other trouble: say it, exit 1
            outcome["error"] = _Failed(f"{type(e).__name__}: {e}")

    _react(run)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["answer"]


def _react(run) -> None:
    """Run ``run(reactor)`` (a coroutine function) under ``react``, which always exits."""
    try:
        react(lambda reactor: defer.ensureDeferred(run(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            raise _Failed(f"internal error (status {e.code})") from None


def _flush(cfg, args) -> int:
    """``queue flush [DOMAIN]``."""
    arguments = {"domain": args.domain} if args.domain else {}
    count = _call(cfg, control.Flush, **arguments)["count"]
    where = f" for {args.domain}" if args.domain else ""
    print(f"{count} message{'s' if count != 1 else ''}{where} being tried now")
    return 0


_DONE = {"hold": "held", "release": "released", "delete": "deleted"}


def _remote_action(cfg, args) -> int:
    """``queue hold|release|delete ID``."""
    verb = args.name.split()[1]
    hops = _call(cfg, control.COMMANDS[verb], id=args.id)["hops"]
    print(f"{args.id}: {_DONE[verb]} ({', '.join(hops)})")
    return 0


# ---------------------------------------------------------------- sendmail


def _sendmail_command(argv: list[str]) -> int:
    """``mailsvc sendmail ...``: see ``mailsvc.sendmail``."""
    if argv in (["-h"], ["--help"]):  # alone: with a value, -h is sendmail's hop count
        print(_SENDMAIL_HELP)
        return 0
    try:
        options = sendmail.parse_args(argv)
        cfg = _load_config(options.config)
        return _sendmail(cfg, options, sys.stdin.buffer)
    except sendmail.UsageError as e:
        _say(f"sendmail: {e}")
        return EX_USAGE
    except _Failed as failure:
        _say(f"sendmail: {failure}")
        return failure.status


_SENDMAIL_HELP = """\
usage: mailsvc sendmail [options] [recipient ...] < message

Queue the message read from stdin (LF or CRLF line ends), as /usr/sbin/sendmail.
  -t                 also send to the To, Cc and Bcc addresses (Bcc is removed)
  -i, -oi            a line holding only '.' does not end the message
  -f SENDER          the envelope sender (default: <login>@<[server] hostname>)
  -F NAME            the full name for a From line added when missing
  -C FILE, --config FILE
                     the config file (default: $MAILSVC_CONFIG, else etc/mailsvc.toml)
  -v                 say the queue ID on stderr
Accepted and ignored: -B -N -R -V -L -O -h -p -e -o* -bm -G -U -c -m -n -x.
Exit status: 0 queued, 1 bad message, 64 bad options, 67 unknown local user,
75 spool failure, 78 bad config."""


def _login() -> tuple[str, str]:
    """The login name and full name (GECOS) of the user running us."""
    try:
        entry = pwd.getpwuid(os.getuid())
    except KeyError:
        return str(os.getuid()), ""
    return entry.pw_name, entry.pw_gecos.split(",")[0]


def _sender(options, login: str, hostname: str) -> str:
    """The envelope sender: ``-f``, or ``<login>@<hostname>``; ``""`` for ``-f '<>'``."""
    if options.sender is None:
        return f"{login}@{hostname}"
    text = options.sender.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    if not text:
        return ""  # the null reverse-path (rfc5321 4.5.5)
    text = sendmail.qualify(text, hostname)
    try:
        check_mailbox(text)
    except AddressError as e:
        raise sendmail.UsageError(f"bad sender -f {options.sender}: {e}") from None
    return text


def _sendmail(cfg, options, stdin) -> int:
    """Read, resolve, queue, then ask a running server to deliver now."""
    from mailsvc.interfaces import IRecipientDirectoryFactory
    from mailsvc.spool import FileSpool
    from mailsvc.tap import find_plugin

    login, gecos = _login()
    hostname = cfg.server.hostname
    sender = _sender(options, login, hostname)
    own = sender in ("", f"{login}@{hostname}")  # the login's full name fits only its own address
    lines = sendmail.read_lines(stdin, options.dot_ends)
    try:
        header = sendmail.read_header(lines)
        addresses = sendmail.parse_addresses(options.recipients)
        if options.extract:
            addresses += sendmail.header_recipients(header)
    except sendmail.InputError as e:
        raise _Failed(f"{e}; nothing was queued") from None
    if not addresses:
        raise _Failed("no recipients: name them as arguments, or use -t")
    domain = cfg.local.domains[0]
    addresses = [sendmail.qualify(a, domain) for a in addresses]
    try:
        directory = find_plugin(
            IRecipientDirectoryFactory, cfg.local.directory, f"{cfg.path.name}: [local] directory"
        ).makeDirectory(cfg)
    except ConfigError as e:
        raise _Failed(f"config error: {e}", EX_CONFIG) from None
    outcome: dict = {}

    async def run(reactor):
        try:
            recipients = await sendmail.resolve(directory, addresses)
            spool = FileSpool(cfg.server.spool_dir, log=lambda text: _say(f"warning: {text}"))
            queued = sendmail.queue_message(
                spool, header, lines, recipients,
                sender=sender, from_address=sender or f"{login}@{hostname}",
                full_name=options.full_name if options.full_name is not None else gecos if own else "",
                login=login, hostname=hostname, now=time.time(),
            )
        except sendmail.UnknownUser as e:
            outcome["error"] = _Failed(str(e), EX_NOUSER)
            return
        except sendmail.InputError as e:
            outcome["error"] = _Failed(f"{e}; nothing was queued")
            return
        except (SpoolError, OSError) as e:
            outcome["error"] = _Failed(f"cannot queue the message: {e}", EX_TEMPFAIL)
            return
        outcome["id"] = queued[0].id
        try:  # deliver now if the server runs; else its next start finds it
            await control.call(reactor, cfg.server.control_socket, control.Flush, id=queued[0].id)
        except Exception:  # noqa: BLE001 - queued is queued: the server's scan will find it
            pass

    _react(run)
    if "error" in outcome:
        raise outcome["error"]
    if options.verbose:
        _say(f"sendmail: queued as {outcome['id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
