"""Relay benchmark: mailsvc relaying to Postfix's smtp-sink, side by side with Postfix.

What it measures
----------------
Each round starts Postfix's ``smtp-sink`` on a free port of 127.0.0.1 (it
takes SMTP mail and throws it away, counting every message it got), then one
server, configured to relay mail for ``sink.test`` to that sink:

* ``mailsvc`` -- ``twistd -n mailsvc`` from the project venv, with
  ``[smtp] trusted_networks = ["127.0.0.0/8"]`` and a ``[[relay.route]]``
  ``domain = "sink.test"``, ``host = "127.0.0.1:<sink port>"``,
  ``tls = "none"``. ``[relay] max_connections_per_destination`` is mailsvc's
  default unless ``--per-destination`` is given. mailsvc opens one
  connection per message (no connection reuse yet).
* ``postfix`` -- a private Postfix instance (``_peers.Postfix``) with
  ``mynetworks = 127.0.0.0/8`` and
  ``transport_maps = inline:{ sink.test=smtp:[127.0.0.1]:<sink port> }``;
  Postfix defaults otherwise (fsync, destination concurrency 20 with slow
  start, connection caching when a destination has a backlog).

Postfix's ``smtp-source`` sends N messages of SIZE bytes from
``bench@bench.test`` to ``sink@sink.test`` over S parallel sessions, and the
bench watches the sink's counter until it has all N. The count comes from
``smtp-sink -c``, which writes ``sess=A quit=B mesg=C`` (C: messages whose
final "." it received and answered) to its standard output after every
message and session; the bench reads the last complete record of that file.

Rounds run in turn (A B A B ...), each with a fresh temp dir, a fresh sink and
a fresh server process. A warm-up batch (``--warmup``) is sent and relayed
before measuring. Every process is stopped by its PID when its round ends,
also on Ctrl-C or SIGTERM; a round that fails or takes longer than
``--timeout`` seconds is an ``ERROR:`` row, left out of the medians.

How to read the table
---------------------
accepted msg/s  N / wall time of smtp-source (every message got its 250).
relayed msg/s   N / time from smtp-source's start until the sink has received
                all N (and smtp-source is done): never above accepted.
CPU ms/msg      user+sys CPU of the server's process tree (/proc), per message,
                over the measured batch. The sink's and smtp-source's CPU are
                not in it.
peak RSS MB     VmHWM of the server process; for Postfix the larger of that and
                the highest sum of PSS over its processes, sampled every 0.5 s.
src ms/msg      CPU of smtp-source per message (the load generator's share).
sink sess       SMTP sessions the sink saw in the round (warm-up included, so
                for N + W messages), counted after the server was stopped:
                N + W for one connection per message, fewer when
                connections are reused.

The summary gives medians over the finished rounds and ``mailsvc/postfix``:
mailsvc's median divided by Postfix's. Above 1 for the rates means mailsvc
is faster; above 1 for CPU and RSS means it uses more. On a small shared
machine rounds vary by tens of per cent: compare the rounds before reading
much into a ratio. This is a measuring tool; it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _peers  # noqa: E402
from _peers import TargetError  # noqa: E402
from _rounds import SMTP_SOURCE, RoundFailed, Source, Table, fmt_row  # noqa: E402

SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
POSTCONF = shutil.which("postconf") or "/usr/sbin/postconf"
SENDER = f"bench@{_peers.DOMAIN}"
RELAY_DOMAIN = "sink.test"
RECIPIENT = f"sink@{RELAY_DOMAIN}"
POLL = 0.02          # seconds between sink counts once smtp-source is done
BUSY_POLL = 0.5      # ... while smtp-source runs (reading costs the servers CPU)
SOURCE_POLL = 0.005  # seconds between checks for smtp-source's exit
RSS_SAMPLE = 0.5     # seconds between memory samples of multi-process servers

METRICS = [  # key, column title, format
    ("accepted", "accepted msg/s", "{:.0f}"),
    ("relayed", "relayed msg/s", "{:.0f}"),
    ("cpu_ms", "CPU ms/msg", "{:.2f}"),
    ("rss_mb", "peak RSS MB", "{:.1f}"),
    ("src_cpu_ms", "src ms/msg", "{:.2f}"),
    ("sink_sessions", "sink sess", "{:d}"),
]
RATIO_KEYS = ("accepted", "relayed", "cpu_ms", "rss_mb")
TABLE = Table(METRICS, RATIO_KEYS)
TARGET_NAMES = ("mailsvc", "postfix")


_COUNTERS = re.compile(rb"sess=(\d+) quit=(\d+) mesg=(\d+)\r")


class Sink:
    """``smtp-sink -c`` on 127.0.0.1:``port``: takes mail, throws it away, and
    writes its running counters to ``sink.out``."""

    def __init__(self, workdir: Path, port: int, backlog: int = 1000):
        self.port = port
        self.out = workdir / "sink.out"
        argv = [SMTP_SINK, "-c", "-h", RELAY_DOMAIN]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]  # smtp-sink refuses to run as root without it
        argv += [f"127.0.0.1:{port}", str(backlog)]
        with open(self.out, "wb") as out, open(workdir / "sink.err", "wb") as err:
            try:
                self.popen = subprocess.Popen(argv, cwd=workdir, stdin=subprocess.DEVNULL,
                                              stdout=out, stderr=err, start_new_session=True)
            except OSError as e:
                raise TargetError(f"cannot run {SMTP_SINK}: {e}") from None
        try:
            _peers.wait_for_banner(port, self.alive)
        except TargetError as e:
            why = _peers.log_tail(workdir / "sink.err", 1)
            raise TargetError(f"smtp-sink: {e}" + (f"; {why}" if why else "")) from None
        # Let the start-up check's session be counted before anyone reads counts.
        deadline = time.monotonic() + 2.0
        while self.counts()[0] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def counts(self) -> tuple[int, int]:
        """(sessions ended, messages received) from the sink's last complete record."""
        try:
            with open(self.out, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - 256))
                tail = f.read()
        except OSError:
            return 0, 0
        last = None
        for last in _COUNTERS.finditer(tail):
            pass
        if last is None:
            return 0, 0
        return int(last.group(1)), int(last.group(3))

    def messages(self) -> int:
        return self.counts()[1]

    def stop(self) -> None:
        if self.popen is not None:
            _peers.stop_pid(self.popen.pid, self.popen, grace=5.0)
            self.popen = None


# ------------------------------------------------------------------- targets

OPTIONAL_MAILSVC = [  # (table, key, TOML value): used when this mailsvc knows the key
    ("smtp", "max_connections_per_client", "0"),    # 20 sessions from one address
    ("smtp", "starttls", "false"),                  # no certificate to make at start
    ("submission", "listen", "[]"),                 # no fixed ports 2587/2465
    ("submission", "listen_implicit_tls", "[]"),
]

PROBE = r"""
import json, sys
from mailsvc import config
path, texts = sys.argv[1], json.loads(sys.stdin.read())
out = []
for text in texts:
    try:
        out.append(config.loads(text, path).relay.max_connections_per_destination)
    except Exception as e:
        out.append(f"{type(e).__name__}: {e}")
print(json.dumps(out))
"""


class MailsvcRelay(_peers.Mailsvc):
    """``twistd -n mailsvc`` relaying ``sink.test`` to the sink by a static route."""

    sink_port = 0
    per_destination: int | None = None  # None: mailsvc's default
    optional: tuple = ()
    effective_per_destination: int | None = None

    def prepare(self) -> None:
        super().prepare()
        python = _peers.MAIN_VENV / "bin" / "python"
        # Which optional keys this mailsvc knows: check each one in a config.
        tmp = Path(tempfile.gettempdir()) / "mailsvc-relay-probe"
        path = tmp / "etc" / "mailsvc.toml"
        texts = [self._config(tmp, 2525, 2526, items)
                 for items in ([], *([item] for item in OPTIONAL_MAILSVC))]
        try:
            r = subprocess.run([str(python), "-c", PROBE, str(path)], input=json.dumps(texts),
                               capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.SubprocessError) as e:
            raise TargetError(f"cannot check the bench config with mailsvc: {e}") from None
        try:
            answers = json.loads(r.stdout)
            if not isinstance(answers, list) or len(answers) != len(texts):
                raise ValueError(answers)
        except ValueError:
            last = (r.stderr.strip().splitlines()[-1:] or ["?"])[0]
            raise TargetError(f"cannot check the bench config with mailsvc: {last}") from None
        if not isinstance(answers[0], int):
            raise TargetError(f"mailsvc refuses the bench config: {answers[0]}")
        self.optional = tuple(item for item, answer in zip(OPTIONAL_MAILSVC, answers[1:])
                              if isinstance(answer, int))
        self.effective_per_destination = answers[0]

    def _config(self, workdir: Path, port: int, sink_port: int, optional) -> str:
        q = json.dumps  # a JSON string is a valid TOML basic string here
        extra: dict[str, list[str]] = {}
        for table, key, value in optional:
            extra.setdefault(table, []).append(f"{key} = {value}\n")
        relay = []
        if self.per_destination is not None:
            relay.append(f"max_connections_per_destination = {self.per_destination}\n")
        tables = [
            ("server", [f"hostname = {q('mailsvc.' + _peers.DOMAIN)}\n",
                        f"spool_dir = {q(str(workdir / 'spool'))}\n",
                        f"control_socket = {q(str(workdir / 'run' / 'mailsvc.sock'))}\n"]),
            ("smtp", [f"listen = [{q(f'tcp:{port}:interface=127.0.0.1')}]\n",
                      "max_connections = 200\n",
                      'trusted_networks = ["127.0.0.0/8"]\n']),
            ("local", [f"domains = [{q(_peers.DOMAIN)}]\n",
                       f"users = [{q(_peers.USER)}]\n",
                       f"aliases = {{ postmaster = [{q(_peers.USER)}] }}\n"]),
            ("store", ['type = "maildir"\n', f"path = {q(str(workdir / 'mail'))}\n"]),
            ("relay", relay),
        ]
        names = [name for name, _ in tables]
        tables += [(t, []) for t in extra if t not in names]
        out = []
        for name, lines in tables:
            if not lines + extra.get(name, []):
                continue
            out.append(f"[{name}]\n" + "".join(lines + extra.get(name, [])))
        # The route last: keys after [[relay.route]] would belong to it.
        if sink_port:
            out.append("[[relay.route]]\n"
                       f"domain = {q(RELAY_DOMAIN)}\n"
                       f"host = {q(f'127.0.0.1:{sink_port}')}\n"
                       'tls = "none"\n')
        return "\n".join(out)

    def start(self, workdir: Path, port: int) -> None:
        # The config in <workdir>/etc: mailsvc's base_dir is then <workdir>.
        (workdir / "etc").mkdir(exist_ok=True)
        config = workdir / "etc" / "mailsvc.toml"
        config.write_text(self._config(workdir, port, self.sink_port, self.optional))
        argv = [str(_peers.MAIN_VENV / "bin" / "twistd"), "-n", "--pidfile=", "mailsvc",
                "--config", str(config)]
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        self._spawn(argv, workdir, port, env)


class PostfixRelay(_peers.Postfix):
    """The private Postfix of ``_peers`` with a transport map to the sink."""

    sink_port = 0
    concurrency: int | None = None  # None: Postfix's default
    effective_concurrency: str = "?"

    def prepare(self) -> None:
        super().prepare()
        if self.concurrency is not None:
            self.effective_concurrency = str(self.concurrency)
            return
        try:
            r = subprocess.run([POSTCONF, "-d", "-h", "default_destination_concurrency_limit"],
                               capture_output=True, timeout=30, check=False)
            self.effective_concurrency = r.stdout.decode().strip() or "?"
        except (OSError, subprocess.SubprocessError):
            pass

    def start(self, workdir: Path, port: int) -> None:
        self.main_cf_extra = {
            "mynetworks": "127.0.0.0/8",
            "transport_maps": f"inline:{{ {RELAY_DOMAIN}=smtp:[127.0.0.1]:{self.sink_port} }}",
        }
        if self.concurrency is not None:
            self.main_cf_extra["smtp_destination_concurrency_limit"] = str(self.concurrency)
        super().start(workdir, port)


TARGETS = {"mailsvc": MailsvcRelay, "postfix": PostfixRelay}


# --------------------------------------------------------------------- rounds

def wait_relayed(target, sink: Sink, expected: int, deadline: float, source=None,
                 rss=None) -> float:
    """Poll until the sink has ``expected`` messages (and smtp-source is done);
    return that moment. Reaps ``source`` and samples tree memory into ``rss``.
    Raises RoundFailed on a dead server or sink, a failed smtp-source, or the
    deadline."""
    next_count = next_rss = 0.0
    while True:
        now = time.monotonic()
        running = source is not None and not source.poll()
        if source is not None and source.error():
            raise RoundFailed(source.error())
        if now >= next_count or not running:
            if sink.messages() >= expected and not running:
                return max(now, source.ended) if source is not None else now
            next_count = now + BUSY_POLL
        if rss is not None and now >= next_rss:
            rss.append(_peers.tree_pss_kb(target.pid))
            next_rss = now + RSS_SAMPLE
        if not target.alive():
            raise RoundFailed("server died during the run")
        if not sink.alive():
            raise RoundFailed("smtp-sink died during the run")
        if now > deadline:
            what = " (smtp-source still running)" if running else ""
            raise RoundFailed(f"timed out: {sink.messages()}/{expected} relayed{what}")
        time.sleep(SOURCE_POLL if running else POLL)


def run_round(target, rnd: int, args, base: Path, prepared: dict, live: list) -> dict:
    row = {"target": target.name, "round": rnd, "ok": False, "error": None,
           "sink_messages": None, "expected": args.warmup + args.messages}
    row.update({k: None for k, _, _ in METRICS})
    if prepared[target.name] is not None:
        row["error"] = prepared[target.name]
        return row
    workdir = base / f"{target.name}-{rnd}"
    workdir.mkdir()
    sink = source = None
    live.append(target)
    try:
        sink = Sink(workdir, _peers.free_port())
        live.append(sink)
        sessions0 = sink.counts()[0]  # the start-up check's session
        target.sink_port = sink.port
        port = _peers.free_port()
        target.start(workdir, port)
        deadline = time.monotonic() + args.timeout
        if args.warmup:
            source = Source(port, args.warmup, min(args.sessions, args.warmup), args.size,
                            workdir / "smtp-source-warmup.log", SENDER, RECIPIENT)
            live.append(source)
            wait_relayed(target, sink, args.warmup, deadline, source)
        cpu0 = _peers.tree_cpu_seconds(target.pid)
        rss: list[int] | None = [] if target.multi_process else None
        source = Source(port, args.messages, args.sessions, args.size,
                        workdir / "smtp-source.log", SENDER, RECIPIENT)
        live.append(source)
        relayed_at = wait_relayed(target, sink, args.warmup + args.messages, deadline,
                                  source, rss)
        cpu1 = _peers.tree_cpu_seconds(target.pid)
        n = args.messages
        row.update(
            ok=True,
            accepted=n / (source.ended - source.started),
            relayed=n / (relayed_at - source.started),
            cpu_ms=(cpu1 - cpu0) * 1000 / n,
            rss_mb=max([_peers.peak_rss_kb(target.pid), *(rss or ())]) / 1024,
            src_cpu_ms=source.cpu * 1000 / n,
        )
        target.stop()  # closes cached connections: the sink counts their sessions
        time.sleep(0.2)
        sessions1, row["sink_messages"] = sink.counts()
        row["sink_sessions"] = sessions1 - sessions0
    except (TargetError, RoundFailed) as e:
        tail = _peers.log_tail(workdir / "server.log", 1)[:300]
        row["error"] = f"{e}; server log: {tail}" if tail and isinstance(e, RoundFailed) else str(e)
        if sink is not None:
            row["sink_messages"] = sink.messages()
    finally:
        for proc in (source, target, sink):
            if proc is not None:
                proc.stop()
        live.clear()
        if not args.keep:
            _peers.remove_tree(workdir)
    return row


# --------------------------------------------------------------------- output

def show(row: dict) -> str:
    line = TABLE.row(row)
    if row["ok"] and row["sink_messages"] is not None and row["sink_messages"] != row["expected"]:
        line += (f"  (the sink got {row['sink_messages']} messages,"
                 f" {row['expected']} were sent)")
    return line


# ----------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring / bench/README.md.")
    p.add_argument("--messages", type=int, default=2000, help="messages per round (2000)")
    p.add_argument("--sessions", type=int, default=20, help="parallel SMTP sessions (20)")
    p.add_argument("--size", type=int, default=1024, help="message body bytes (1024)")
    p.add_argument("--rounds", type=int, default=2, help="rounds per target (2)")
    p.add_argument("--warmup", type=int, default=20,
                   help="messages sent and relayed before measuring (20; 0 = none)")
    p.add_argument("--timeout", type=float, default=180.0,
                   help="seconds one round may take before it is stopped (180)")
    p.add_argument("--targets", default=",".join(TARGET_NAMES),
                   help="comma-separated, from: " + ", ".join(TARGET_NAMES))
    p.add_argument("--per-destination", type=int, default=None, metavar="N",
                   help="mailsvc [relay] max_connections_per_destination "
                        "(default: mailsvc's own default)")
    p.add_argument("--postfix-concurrency", type=int, default=None, metavar="N",
                   help="Postfix smtp_destination_concurrency_limit (default: Postfix's)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--keep", action="store_true",
                   help="keep the temp dirs (configs, logs, sink counters)")
    args = p.parse_args(argv)
    for k in ("messages", "sessions", "size", "rounds"):
        if getattr(args, k) < 1:
            p.error(f"--{k} must be at least 1")
    for k in ("per_destination", "postfix_concurrency"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be 0 or more")
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        p.error(f"unknown target(s) {unknown}; choose from {', '.join(TARGET_NAMES)}")
    args.names = names
    return args


_stopping = False


def _terminate(signum, frame):
    """First signal: stop the run (KeyboardInterrupt). Later ones are ignored,
    so that they cannot cut short the stopping of the servers."""
    global _stopping
    if _stopping:
        return
    _stopping = True
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    global _stopping
    args = parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)  # also when started with SIGINT ignored
    _peers.become_subreaper()
    out = sys.stderr if args.json else sys.stdout

    def say(line=""):
        print(line, file=out, flush=True)

    for tool in (SMTP_SOURCE, SMTP_SINK):
        if not os.path.exists(tool):
            print(f"error: {tool} not found (apt-get install postfix)", file=sys.stderr)
            return 2
    targets = []
    for name in args.names:
        t = TARGETS[name]()
        if name == "mailsvc":
            t.per_destination = args.per_destination
        else:
            t.concurrency = args.postfix_concurrency
        targets.append(t)
    prepared: dict[str, str | None] = {}
    for t in targets:
        try:
            t.prepare()
            prepared[t.name] = None
        except TargetError as e:
            prepared[t.name] = str(e)

    settings = {}
    for t in targets:
        if t.name == "mailsvc":
            settings["mailsvc max_connections_per_destination"] = t.effective_per_destination
        else:
            settings["postfix smtp_destination_concurrency_limit"] = t.effective_concurrency
    load_before = os.getloadavg()
    base = Path(tempfile.mkdtemp(prefix="mailsvc-relay-"))
    say(f"# relay to smtp-sink: {args.messages} msgs x {args.size} B, {args.sessions} sessions, "
        f"{args.rounds} rounds, warm-up {args.warmup}; {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, load {load_before[0]:.2f}"
        + (f"; temp dir {base}" if args.keep else ""))
    say("# " + ", ".join(f"{k} {v}" for k, v in settings.items()))
    say(fmt_row(TABLE.head, TABLE.widths))
    rows: list[dict] = []
    live: list = []
    interrupted = False
    try:
        for rnd in range(1, args.rounds + 1):
            for t in targets:
                row = run_round(t, rnd, args, base, prepared, live)
                rows.append(row)
                say(show(row))
    except KeyboardInterrupt:
        interrupted = True
        say("# interrupted: stopping servers")
    finally:
        _stopping = True  # from here on, signals do not interrupt the clean-up
        for proc in [*live, *targets]:
            proc.stop()
        if not args.keep:
            _peers.remove_tree(base)

    medians, ratios = TABLE.summarize(rows, args.names)
    for line in TABLE.summary(medians, ratios):
        say(line)
    load_after = os.getloadavg()
    say(f"# load average before {load_before[0]:.2f}, after "
        f"{load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f} (1, 5, 15 min)")
    if args.json:
        params = {k: getattr(args, k) for k in
                  ("messages", "sessions", "size", "rounds", "warmup", "timeout",
                   "per_destination", "postfix_concurrency")}
        params["targets"] = args.names
        print(json.dumps({"params": params, "settings": settings,
                          "loadavg": {"before": load_before, "after": load_after},
                          "rounds": rows, "summary": medians,
                          "ratios_mailsvc_over": ratios}, indent=2))
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
