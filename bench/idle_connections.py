"""Many idle SMTP connections to mailsvc: memory held, and the cap.

```
.venv/bin/python bench/idle_connections.py                   # 10000 idle, cap 10000
.venv/bin/python bench/idle_connections.py --connections 2000 --cap 2000
```

Starts mailsvc as ``accept_deliver.py`` does, with ``[smtp] max_connections``
= ``--cap``, no per-client limit (every connection comes from 127.0.0.1) and
a listen backlog of 1024; the file-descriptor limit of this script, which the
server inherits, is raised to the hard limit. Then it opens ``--connections``
sockets (at most ``--in-flight`` connecting at once), reads each one's 220
greeting and leaves it idle. Then ``--extra`` more connections past the cap,
each of which should be answered 421; then, with every idle one still open,
checks the server still answers (it closes ten idle ones and sends one
message through a fresh connection). Prints the server's RSS before, with
all connections open (per connection too) and its peak, and what the extra
connections were told. Prints, asserts nothing.

Stays below the server's command timeout (``[smtp] command_timeout``,
300 s by default), which would close the idle connections.
"""

from __future__ import annotations

import argparse
import collections
import resource
import selectors
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _peers  # noqa: E402
from big_message import Client  # noqa: E402


def raise_fd_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit towards ``wanted`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = hard if hard != resource.RLIM_INFINITY else max(wanted, soft)
    if new > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def open_idle(port: int, count: int, in_flight: int, timeout: float) -> tuple[list[socket.socket], collections.Counter]:
    """Open ``count`` connections and read their greetings (first line of
    each, by reply code); return the sockets still open and the codes."""
    sel = selectors.DefaultSelector()
    opened: list[socket.socket] = []
    codes: collections.Counter = collections.Counter()
    pending = 0
    started = 0
    deadline = time.monotonic() + timeout
    buffers: dict[socket.socket, bytes] = {}
    while len(opened) + sum(codes[c] for c in codes if c != "220") < count:
        while started < count and pending < in_flight:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            sel.register(s, selectors.EVENT_READ)
            buffers[s] = b""
            pending += 1
            started += 1
        if time.monotonic() > deadline:
            codes["timed out"] += pending
            break
        for key, _ in sel.select(timeout=1.0):
            s = key.fileobj
            try:
                data = s.recv(512)
            except OSError as e:
                data, codes[f"error {e.errno}"] = b"", codes[f"error {e.errno}"] + 1
            buffers[s] += data
            if b"\n" in buffers[s] or not data:
                sel.unregister(s)
                pending -= 1
                code = buffers.pop(s)[:3].decode(errors="replace") or "closed"
                codes[code] += 1
                if code == "220":
                    opened.append(s)
                else:
                    s.close()
    sel.close()
    return opened, codes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=10_000, help="idle connections (10000)")
    p.add_argument("--cap", type=int, default=10_000, help="[smtp] max_connections (10000)")
    p.add_argument("--extra", type=int, default=20, help="connections past the cap (20)")
    p.add_argument("--in-flight", type=int, default=200, help="connects at once (200)")
    p.add_argument("--hold", type=float, default=5.0, help="seconds to hold them idle (5)")
    p.add_argument("--timeout", type=float, default=240)
    p.add_argument("--baseline", type=Path, help="run the mailsvc source tree in DIR instead")
    args = p.parse_args(argv)
    limit = raise_fd_limit(args.connections + args.extra + 200)
    if limit < args.connections + args.extra + 100:
        print(f"error: file descriptor limit {limit} is too low", file=sys.stderr)
        return 2
    _peers.become_subreaper()
    target = _peers.Mailsvc(name="mailsvc" if args.baseline is None else "mailsvc-base",
                            source=args.baseline, max_connections=args.cap, backlog=1024,
                            smtp_extra={"max_connections_per_client": "0"})
    target.prepare()
    base = Path(tempfile.mkdtemp(prefix="mailsvc-idle-"))
    idle: list[socket.socket] = []
    try:
        port = _peers.free_port()
        target.start(base, port)
        time.sleep(0.5)
        before = _peers._status_kb(target.pid, "VmRSS")
        t0 = time.monotonic()
        idle, codes = open_idle(port, args.connections, args.in_flight, args.timeout)
        opened_s = time.monotonic() - t0
        time.sleep(args.hold)
        alive_after_hold = target.alive()
        held = _peers._status_kb(target.pid, "VmRSS")
        extra, extra_codes = open_idle(port, args.extra, args.extra, 30)
        for s in extra:
            s.close()
        for s in idle[:10]:
            s.close()
        del idle[:10]
        time.sleep(0.5)
        try:
            client = Client(port)
            client.send_message(1000)
            client.close()
            still_serving = "yes (250 for a message)"
        except (OSError, SystemExit) as e:
            still_serving = f"NO: {e}"
        peak = _peers.peak_rss_kb(target.pid)
        per = (held - before) / max(len(idle) + 10, 1)
        print(f"# {target.name}: {args.connections} idle connections, cap {args.cap}, "
              f"fd limit {limit}")
        print(f"greetings         {dict(codes)} in {opened_s:.1f} s")
        print(f"RSS before        {before / 1024:8.1f} MB")
        print(f"RSS all open      {held / 1024:8.1f} MB  ({per:.1f} KB per connection)")
        print(f"RSS peak (VmHWM)  {peak / 1024:8.1f} MB")
        print(f"past the cap      {dict(extra_codes)} for {args.extra} more connections")
        print(f"server alive      {alive_after_hold and target.alive()}; still serving: {still_serving}")
    finally:
        for s in idle:
            s.close()
        target.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
