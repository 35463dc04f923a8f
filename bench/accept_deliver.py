"""Accept-and-deliver benchmark: mailsvc side by side with other mail servers.

What it measures
----------------
Each target server is started as a real process on 127.0.0.1 (a free port),
with a fresh spool and Maildir, configured to deliver mail for
``sink@bench.test`` locally. Postfix's ``smtp-source`` then sends N messages of
SIZE bytes over S parallel SMTP sessions (one message per connection, as
smtp-source does by default), and the bench polls the Maildir until all N
messages are there. Targets:

* ``mailsvc``  -- ``twistd -n mailsvc`` from the project venv (Maildir store;
  fsyncs the spool before saying 250, by design).
* ``aiosmtpd`` -- ``python -m aiosmtpd -c aiosmtpd.handlers.Mailbox``: a
  stock aiosmtpd with Python's ``mailbox.Maildir`` (no spool, no fsync),
  installed by the bench into ``bench/.venv-peers``.
* ``twisted``  -- ``twisted.mail.smtp.ESMTP`` with a ``mailbox.Maildir``
  handler (``bench/peer_twisted_mail.py``, from the project venv; no queue,
  no fsync).
* ``postfix``  -- a private Postfix instance (own config and queue dir,
  virtual(8) Maildir delivery, Postfix defaults otherwise: fsync, in_flow_delay).
* ``mailsvc-rN`` (with ``--receivers N``) -- mailsvc with ``[server]
  receiver_processes = N``: SMTP in N child processes, delivery in the main one.

Rounds run in turn (A B C A B C ...), each with a new server process. A small
warm-up batch (``--warmup``) is sent and delivered before measuring.

How to read the table
---------------------
accepted msg/s   N / wall time of smtp-source (all N got "250" and QUIT).
delivered msg/s  N / time from smtp-source start until N files are in the
                 Maildir (new/ or cur/) and smtp-source has finished, so
                 never above accepted; lower when delivery lags behind
                 acceptance (a queue).
CPU ms/msg       user+sys CPU of the server (its process and all children,
                 from /proc/<pid>/stat) over the measured batch, per message.
src ms/msg       the same for smtp-source (os.wait4 rusage): if it gets close
                 to the wall time per message, the load generator is the limit.
peak RSS MB      VmHWM (peak resident set) of the server process. For a
                 multi-process server (Postfix) the larger of that and the
                 highest sum of PSS over its processes, sampled every 0.5 s
                 (PSS splits shared pages between the processes sharing them).

The summary gives medians over the rounds that finished, and rows
``mailsvc/<peer>``: mailsvc's median divided by the peer's. For the two rates,
above 1 means mailsvc is faster; for CPU and RSS, above 1 means it uses more.
A round that fails or takes longer than ``--timeout`` seconds is shown as an
error row and left out of the medians. Numbers from a 2-core machine are noisy:
compare rounds and look at the spread before reading much into a ratio.

This is a measuring tool; it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _peers  # noqa: E402
from _peers import TargetError  # noqa: E402
from _rounds import SMTP_SOURCE, RoundFailed, Source, Table, fmt_row  # noqa: E402

POLL = 0.02          # seconds between Maildir counts once smtp-source is done
SOURCE_POLL = 0.005  # seconds between checks for smtp-source's exit
RSS_SAMPLE = 0.5     # seconds between memory samples of multi-process servers

METRICS = [  # key, column title, format
    ("accepted", "accepted msg/s", "{:.0f}"),
    ("delivered", "delivered msg/s", "{:.0f}"),
    ("cpu_ms", "CPU ms/msg", "{:.2f}"),
    ("rss_mb", "peak RSS MB", "{:.1f}"),
    ("src_cpu_ms", "src ms/msg", "{:.2f}"),
]
RATIO_KEYS = ("accepted", "delivered", "cpu_ms", "rss_mb")
TABLE = Table(METRICS, RATIO_KEYS)
SENDER, RECIPIENT = f"bench@{_peers.DOMAIN}", f"{_peers.USER}@{_peers.DOMAIN}"


def wait_delivered(target, mail: Path, expected: int, deadline: float, source=None,
                   rss=None) -> float | None:
    """Poll until ``expected`` messages are in the Maildir; return that moment.

    Also reaps ``source`` when it exits and samples tree memory into ``rss``.
    Raises RoundFailed on a dead server, a failed smtp-source or the deadline.
    While smtp-source runs, the Maildir is counted only now and then (counting
    costs CPU that the servers would miss); after it, every POLL seconds.
    """
    next_count = next_rss = 0.0
    while True:
        now = time.monotonic()
        running = source is not None and not source.poll()
        if source is not None and source.error():
            raise RoundFailed(source.error())
        if now >= next_count or not running:
            if _peers.count_delivered(mail) >= expected and not running:
                # Delivered means in the Maildir and acknowledged to the
                # client, so delivered never beats accepted.
                return max(now, source.ended) if source is not None else now
            next_count = now + 0.5
        if rss is not None and now >= next_rss:
            rss.append(_peers.tree_pss_kb(target.pid))
            next_rss = now + RSS_SAMPLE
        if not target.alive():
            raise RoundFailed("server died during the run")
        if now > deadline:
            n = _peers.count_delivered(mail)
            what = " (smtp-source still running)" if running else ""
            raise RoundFailed(f"timed out: {n}/{expected} delivered{what}")
        time.sleep(SOURCE_POLL if running else POLL)


def run_round(target, rnd: int, args, base: Path, prepared: dict) -> dict:
    row = {"target": target.name, "round": rnd, "ok": False, "error": None}
    row.update({k: None for k, _, _ in METRICS})
    if prepared[target.name] is not None:
        row["error"] = prepared[target.name]
        return row
    workdir = base / f"{target.name}-{rnd}"
    workdir.mkdir()
    source = None
    try:
        port = _peers.free_port()
        target.start(workdir, port)
        mail = target.mail_root()
        deadline = time.monotonic() + args.timeout
        if args.warmup:
            source = Source(port, args.warmup, min(args.sessions, args.warmup), args.size,
                            workdir / "smtp-source-warmup.log", SENDER, RECIPIENT)
            wait_delivered(target, mail, args.warmup, deadline, source)
        cpu0 = _peers.tree_cpu_seconds(target.pid)
        rss: list[int] | None = [] if target.multi_process else None
        source = Source(port, args.messages, args.sessions, args.size,
                        workdir / "smtp-source.log", SENDER, RECIPIENT)
        delivered_at = wait_delivered(target, mail, args.warmup + args.messages, deadline,
                                      source, rss)
        cpu1 = _peers.tree_cpu_seconds(target.pid)
        n = args.messages
        row.update(
            ok=True,
            accepted=n / (source.ended - source.started),
            delivered=n / (delivered_at - source.started),
            cpu_ms=(cpu1 - cpu0) * 1000 / n,
            rss_mb=max([_peers.peak_rss_kb(target.pid), *(rss or ())]) / 1024,
            src_cpu_ms=source.cpu * 1000 / n,
        )
    except (TargetError, RoundFailed) as e:
        row["error"] = str(e)
    finally:
        if source is not None:
            source.stop()
        target.stop()
        # The round's files stay until the whole run ends (main removes the
        # base dir): deleting thousands of files slows the creation of new
        # ones for minutes on ext4 without a journal (the kernel skips every
        # recently freed inode of a block group), which would handicap
        # whichever target runs next.
    return row


# ----------------------------------------------------------------- output

def show(row: dict) -> str:
    return TABLE.row(row)


# ------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring / bench/README.md.")
    p.add_argument("--messages", type=int, default=2000, help="messages per round (2000)")
    p.add_argument("--sessions", type=int, default=20, help="parallel SMTP sessions (20)")
    p.add_argument("--size", type=int, default=1024, help="message body bytes (1024)")
    p.add_argument("--rounds", type=int, default=2, help="rounds per target (2)")
    p.add_argument("--warmup", type=int, default=20,
                   help="messages sent and delivered before measuring (20; 0 = none)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds one round may take before it is stopped (120)")
    p.add_argument("--targets", default=",".join(_peers.TARGETS),
                   help="comma-separated, from: " + ", ".join(_peers.TARGETS))
    p.add_argument("--baseline", action="append", default=[], metavar="[NAME=]DIR",
                   help="also run the mailsvc source tree in DIR as target NAME (default "
                        "mailsvc-base): a before/after comparison in one sitting; repeatable")
    p.add_argument("--receivers", action="append", default=[], type=int, metavar="N",
                   help="also run mailsvc with [server] receiver_processes = N as target "
                        "mailsvc-rN (README \"Several processes\"); repeatable")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temp dirs (logs, mail)")
    args = p.parse_args(argv)
    for k in ("messages", "sessions", "size", "rounds"):
        if getattr(args, k) < 1:
            p.error(f"--{k} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be 0 or more")
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in names if t not in _peers.TARGETS]
    if unknown or not names:
        p.error(f"unknown target(s) {unknown}; choose from {', '.join(_peers.TARGETS)}")
    args.sources = {}
    for i, spec in enumerate(args.baseline):
        name, sep, where = spec.rpartition("=")
        name = name if sep else ("mailsvc-base" if i == 0 else f"mailsvc-base{i + 1}")
        if name in names or name in args.sources or name in _peers.TARGETS:
            p.error(f"--baseline: target name {name!r} is taken")
        args.sources[name] = Path(where)
    if any(n < 1 for n in args.receivers):
        p.error("--receivers must be at least 1")
    args.receiver_targets = {f"mailsvc-r{n}": n for n in dict.fromkeys(args.receivers)}
    at = names.index("mailsvc") + 1 if "mailsvc" in names else 0
    names[at:at] = [*args.sources, *args.receiver_targets]
    args.names = names
    return args


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)  # also when started with SIGINT ignored
    _peers.become_subreaper()
    out = sys.stderr if args.json else sys.stdout

    def say(line=""):
        print(line, file=out, flush=True)

    if not os.path.exists(SMTP_SOURCE):
        print(f"error: {SMTP_SOURCE} not found (apt-get install postfix)", file=sys.stderr)
        return 2
    def target(name: str):
        if name in args.sources:
            return _peers.Mailsvc(name=name, source=args.sources[name])
        if name in args.receiver_targets:
            return _peers.Mailsvc(name=name, receiver_processes=args.receiver_targets[name])
        return _peers.TARGETS[name]()

    targets = [target(n) for n in args.names]
    prepared: dict[str, str | None] = {}
    for t in targets:
        try:
            t.prepare()
            prepared[t.name] = None
        except TargetError as e:
            prepared[t.name] = str(e)

    base = Path(tempfile.mkdtemp(prefix="mailsvc-bench-"))
    say(f"# accept+deliver: {args.messages} msgs x {args.size} B, {args.sessions} sessions, "
        f"{args.rounds} rounds, warm-up {args.warmup}; {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}" + (f"; temp dir {base}" if args.keep else ""))
    say(fmt_row(TABLE.head, TABLE.widths))
    rows: list[dict] = []
    interrupted = False
    try:
        for rnd in range(1, args.rounds + 1):
            for t in targets:
                row = run_round(t, rnd, args, base, prepared)
                rows.append(row)
                say(show(row))
    except KeyboardInterrupt:
        interrupted = True
        say("# interrupted: stopping servers")
    finally:
        for t in targets:
            t.stop()
        if not args.keep:
            _peers.remove_tree(base)

    medians, ratios = TABLE.summarize(rows, args.names)
    for line in TABLE.summary(medians, ratios):
        say(line)
    if args.json:
        params = {k: getattr(args, k) for k in
                  ("messages", "sessions", "size", "rounds", "warmup", "timeout")}
        params["targets"] = args.names
        print(json.dumps({"params": params, "rounds": rows, "summary": medians,
                          "ratios_mailsvc_over": ratios}, indent=2))
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
