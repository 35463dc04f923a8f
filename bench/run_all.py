"""Run every benchmark in turn: accept_deliver.py, then relay.py (``make bench``).

Arguments are passed on to both, so only the options they share make sense
here: ``--messages``, ``--sessions``, ``--size``, ``--rounds``, ``--warmup``,
``--timeout``, ``--keep``. Exit status: 0 when both ran, else the first
non-zero one.

Each benchmark runs in its own session, so a Ctrl-C at the terminal reaches
only this script, which passes it on once: the benchmark then stops its
servers by PID and prints what it has; the next one is not started.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
BENCHMARKS = ["accept_deliver.py", "relay.py"]

_child: subprocess.Popen | None = None
_signalled: int | None = None
_forwarded = False


def _forward(signum, frame):
    """Pass the first signal on to the running benchmark; ignore later ones
    (they would cut short its stopping of the servers)."""
    global _signalled
    if _signalled is None:
        _signalled = signum
        _pass_on()


def _pass_on() -> None:
    global _forwarded
    if not _forwarded and _child is not None and _child.poll() is None:
        _forwarded = True
        _child.send_signal(signal.SIGINT if _signalled == signal.SIGINT else signal.SIGTERM)


def main(argv: list[str]) -> int:
    global _child
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _forward)
    status = 0
    for name in BENCHMARKS:
        if _signalled is not None:
            break
        print(f"\n## {name} {' '.join(argv)}".rstrip(), flush=True)
        _child = subprocess.Popen([sys.executable, str(BENCH_DIR / name), *argv],
                                  start_new_session=True)
        if _signalled is not None:
            _pass_on()  # a signal came while it was being started
        rc = _child.wait()  # signal handlers run; wait() resumes after them (PEP 475)
        _child = None
        if rc != 0 and status == 0:
            status = rc
    return 130 if _signalled is not None and status == 0 else status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
