"""Where mailsvc's time goes under the accept_deliver load: py-spy, summarised.

Starts mailsvc as ``accept_deliver.py`` does (``_peers.Mailsvc``, or a
baseline source tree with ``--baseline DIR``), sends a warm-up, then runs
``smtp-source`` while ``py-spy record`` samples the server, and prints:

* ``gil``  (default): only samples of threads holding the GIL, i.e. where
  the Python CPU goes; shares by category (logging, SMTP machine, spool,
  Maildir, Deferreds, reactor I/O...) and the top functions by self time.
* ``wall``: every thread, idle ones included (``py-spy --idle``): where the
  threads wait (fsync of files and directories, thread-pool queues).

```
.venv/bin/python bench/profile_accept.py                       # 3000 msgs, gil
.venv/bin/python bench/profile_accept.py --mode wall --messages 2000
.venv/bin/python bench/profile_accept.py --raw /tmp/prof.txt   # keep py-spy's raw stacks
```

Shares are of the samples taken; py-spy samples at ``--rate`` per second
(``--nonblocking``, so the server is not paused). A measuring tool: it
asserts nothing.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _peers  # noqa: E402
from _rounds import Source  # noqa: E402
from accept_deliver import RECIPIENT, SENDER, wait_delivered  # noqa: E402

PY_SPY = _peers.MAIN_VENV / "bin" / "py-spy"

# category: substrings of a frame ("function (file)"), first match wins,
# looked for from the leaf up.
CATEGORIES = [
    ("logging", ("twisted/logger", "formatTime", "constantly/")),
    ("fsync", ("fsync", "_sync_dirs", "_fsync", "fsyncDirectory")),
    ("spool", ("mailsvc/spool/",)),
    ("maildir/store", ("mailsvc/store/",)),
    ("smtp machine", ("mailsvc/smtp/",)),
    ("receiver/policy", ("mailsvc/receiver.py", "mailsvc/policy.py", "mailsvc/delivery/router")),
    ("runner/agents", ("mailsvc/delivery/",)),
    ("protocol glue", ("mailsvc/protocol.py",)),
    ("deferreds", ("twisted/internet/defer.py",)),
    ("threads", ("twisted/_threads", "twisted/python/threadpool", "threading.py",
                 "twisted/internet/threads.py", "queue.py")),
    ("reactor I/O", ("twisted/internet/", "twisted/python/log.py", "twisted/python/context.py")),
]


def user_sys(pid: int) -> tuple[float, float]:
    """utime and stime of ``pid`` in seconds (/proc/<pid>/stat fields 14, 15)."""
    fields = _peers._stat_fields(pid) or ["0"] * 20
    return int(fields[11]) / _peers.CLK_TCK, int(fields[12]) / _peers.CLK_TCK


def categorise(stack: list[str]) -> str:
    for frame in reversed(stack):
        for name, needles in CATEGORIES:
            if any(n in frame for n in needles):
                return name
    return "other"


def summarise(raw: Path, top: int) -> list[str]:
    """Shares by category and the top leaf functions of py-spy's raw output."""
    by_cat: collections.Counter = collections.Counter()
    by_leaf: collections.Counter = collections.Counter()
    by_inclusive: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack_text, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        stack = stack_text.split(";")
        total += n
        by_cat[categorise(stack)] += n
        by_leaf[stack[-1]] += n
        for frame in set(stack):
            if "mailsvc/" in frame:
                by_inclusive[frame] += n
    if not total:
        return ["no samples"]
    out = [f"{total} samples", "", "by category (leaf-most match):"]
    out += [f"  {name:16} {n / total:6.1%}" for name, n in by_cat.most_common()]
    out += ["", f"top {top} mailsvc functions by inclusive samples:"]
    out += [f"  {n / total:6.1%}  {name}" for name, n in by_inclusive.most_common(top)]
    out += ["", f"top {top} functions by self samples:"]
    out += [f"  {n / total:6.1%}  {leaf}" for leaf, n in by_leaf.most_common(top)]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=3000)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--mode", choices=("gil", "wall"), default="gil")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--lines", action="store_true", help="keep line numbers in frames")
    p.add_argument("--raw", type=Path, help="also keep py-spy's raw stacks here")
    p.add_argument("--baseline", type=Path,
                   help="profile the mailsvc source tree in DIR instead (see accept_deliver.py)")
    args = p.parse_args(argv)
    _peers.become_subreaper()
    target = _peers.Mailsvc() if args.baseline is None else _peers.Mailsvc(
        name="mailsvc-base", source=args.baseline)
    target.prepare()
    base = Path(tempfile.mkdtemp(prefix="mailsvc-profile-"))
    spy = source = None
    try:
        port = _peers.free_port()
        target.start(base, port)
        deadline = time.monotonic() + 600
        if args.warmup:
            source = Source(port, args.warmup, args.sessions, args.size, base / "warmup.log",
                            SENDER, RECIPIENT)
            wait_delivered(target, target.mail_root(), args.warmup, deadline, source)
        raw = args.raw or base / "raw.txt"
        flags = ["--nonblocking"] + ([] if args.lines else ["--nolineno"]) + [ "-r", str(args.rate), "-f", "raw", "-o", str(raw)]
        flags += ["--gil"] if args.mode == "gil" else ["--idle"]
        spy = subprocess.Popen([str(PY_SPY), "record", *flags, "--pid", str(target.pid)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # py-spy attaches
        cpu0 = _peers.tree_cpu_seconds(target.pid)
        us0 = user_sys(target.pid)
        source = Source(port, args.messages, args.sessions, args.size, base / "source.log",
                        SENDER, RECIPIENT)
        done = wait_delivered(target, target.mail_root(), args.warmup + args.messages,
                              deadline, source)
        cpu = _peers.tree_cpu_seconds(target.pid) - cpu0
        user, system = (b - a for a, b in zip(us0, user_sys(target.pid)))
        spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
        spy.wait(timeout=60)
        print(f"# {target.name}: {args.messages} msgs in {done - source.started:.2f}s "
              f"({args.messages / (done - source.started):.0f}/s delivered), "
              f"{cpu * 1000 / args.messages:.2f} ms CPU/msg (user {user * 1000 / args.messages:.2f}, "
              f"sys {system * 1000 / args.messages:.2f}); py-spy --{args.mode}")
        for line in summarise(raw, args.top):
            print(line)
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
            spy.wait()
        if source is not None:
            source.stop()
        target.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
