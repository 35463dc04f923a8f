"""Two mailsvc source trees at the same time, each under its own equal load.

``accept_deliver.py --baseline`` runs trees in turn; on a shared VM whose
speed drifts by tens of per cent within minutes, a change of a few per cent
drowns in that drift. Here both servers run *concurrently*, each with its own
``smtp-source`` (half the sessions each), so the drift hits both alike and
the ratio of their CPU per message is steady enough to decide on a change.
The absolute figures are not those of a server alone (they share the two
cores): use ``accept_deliver.py`` for those.

    .venv/bin/python bench/same_time.py --baseline DIR [--candidate DIR] [--messages N] [--rounds R]

``--candidate`` defaults to the project tree. Make a tree with
``git archive <rev> mailsvc twisted | tar -x -C DIR``. Rounds alternate which
server starts first. Prints, per round, each server's delivered rate and CPU
per message, then the medians of candidate/baseline. Nothing here asserts a
speed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _peers
from _rounds import Source
from accept_deliver import RECIPIENT, SENDER, wait_delivered

WARMUP = 300


class _Alone(_peers.Mailsvc):
    """The bench's mailsvc without submission listeners: two servers at once
    must not both want the fixed ports 2587 and 2465."""

    def _spawn(self, argv, workdir, port, env=None):
        config = Path(workdir) / "mailsvc.toml"
        config.write_text(config.read_text() + "\n[submission]\nlisten = []\nlisten_implicit_tls = []\n")
        return super()._spawn(argv, workdir, port, env)


def one_round(trees: list, messages: int, sessions: int, size: int, order: list, timeout: float) -> list:
    """Run both trees at once; return ``[(delivered msg/s, CPU ms/msg)]`` in ``trees`` order."""
    started = {}
    try:
        for i in order:
            target = _Alone(name=f"tree{i}", source=trees[i])
            target.prepare()
            workdir = Path(tempfile.mkdtemp(prefix=f"same-time-{i}-"))
            port = _peers.free_port()
            target.start(workdir, port)
            started[i] = (target, port, workdir)
        deadline = time.monotonic() + timeout
        for i in order:  # warm both up: spent files, imports, Maildir made
            target, port, workdir = started[i]
            warm = Source(port, WARMUP, sessions, size, workdir / "warmup.log", SENDER, RECIPIENT)
            wait_delivered(target, target.mail_root(), WARMUP, deadline, warm)
        cpu = {i: _peers.tree_cpu_seconds(started[i][0].pid) for i in order}
        loads = {i: Source(started[i][1], messages, sessions, size, started[i][2] / "load.log", SENDER, RECIPIENT)
                 for i in order}
        done: dict = {}
        while len(done) < len(order):
            for i in order:
                target = started[i][0]
                if i in done or not loads[i].poll():
                    continue
                if loads[i].error():
                    raise SystemExit(f"tree {trees[i] or 'project'}: {loads[i].error()}")
                if _peers.count_delivered(target.mail_root()) >= WARMUP + messages:
                    done[i] = (time.monotonic(), _peers.tree_cpu_seconds(target.pid))
            if time.monotonic() > deadline:
                raise SystemExit("a round ran past its deadline")
            time.sleep(0.2)
        return [(messages / (done[i][0] - loads[i].started), (done[i][1] - cpu[i]) * 1000 / messages)
                for i in range(len(trees))]
    finally:
        for target, _, _ in started.values():  # by PID; files kept until the end (see README)
            target.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="mailsvc source tree to compare against")
    parser.add_argument("--candidate", default=None, help="another source tree (default: the project's)")
    parser.add_argument("--messages", type=int, default=3000, help="messages per server per round (3000)")
    parser.add_argument("--sessions", type=int, default=10, help="parallel sessions per server (10)")
    parser.add_argument("--size", type=int, default=1024, help="message body bytes (1024)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (3)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a round may take (600)")
    args = parser.parse_args(argv)
    _peers.become_subreaper()
    trees = [args.baseline, args.candidate]
    names = ["baseline", "candidate"]
    cpu_ratios, rate_ratios = [], []
    print(f"# {args.messages} msgs x {args.size} B per server, {args.sessions} sessions each, both at once",
          file=sys.stderr)
    for r in range(args.rounds):
        order = [0, 1] if r % 2 == 0 else [1, 0]
        results = one_round(trees, args.messages, args.sessions, args.size, order, args.timeout)
        (base_rate, base_cpu), (cand_rate, cand_cpu) = results
        cpu_ratios.append(cand_cpu / base_cpu)
        rate_ratios.append(cand_rate / base_rate)
        print(f"round {r + 1}: " + " | ".join(
            f"{name} {rate:.0f} msg/s {cpu:.2f} CPU ms/msg" for name, (rate, cpu) in zip(names, results))
            + f" | candidate/baseline CPU {cpu_ratios[-1]:.3f}", file=sys.stderr, flush=True)
    print(f"median candidate/baseline: CPU per message {statistics.median(cpu_ratios):.3f}x, "
          f"delivered rate {statistics.median(rate_ratios):.3f}x", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
