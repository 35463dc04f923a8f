"""What the benchmarks share: the smtp-source load, and the table of rounds.

``accept_deliver.py`` and ``relay.py`` each define their METRICS (key, column
title, format) and which of them get a mailsvc/peer ratio; ``Table`` prints
rows, medians and ratios for any such list.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import time
from pathlib import Path

import _peers

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"


class RoundFailed(Exception):
    """A round could not finish (dead server, failed load, deadline)."""


class Source:
    """One run of Postfix's smtp-source, a child in its own session, reaped with wait4."""

    def __init__(self, port: int, messages: int, sessions: int, size: int, log: Path,
                 sender: str, recipient: str):
        argv = [SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-l", str(size),
                "-f", sender, "-t", recipient, f"127.0.0.1:{port}"]
        self.log = log
        with open(log, "wb") as out:
            self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        self.started = time.monotonic()
        self.ended: float | None = None
        self.status: int | None = None
        self.cpu = 0.0

    def poll(self) -> bool:
        """True once smtp-source has exited (then ended, status and cpu are set)."""
        if self.ended is not None:
            return True
        pid, status, ru = os.wait4(self.popen.pid, os.WNOHANG)
        if pid == 0:
            return False
        self.ended = time.monotonic()
        self.status = os.waitstatus_to_exitcode(status)
        self.popen.returncode = self.status  # so Popen will not wait for it again
        self.cpu = ru.ru_utime + ru.ru_stime
        return True

    def error(self) -> str | None:
        """Why smtp-source failed, or None while it runs or once it finished well."""
        if self.status in (None, 0):
            return None
        return f"smtp-source exit {self.status}: {_peers.log_tail(self.log, 1)}"

    def stop(self) -> None:
        """Kill it if it still runs, and reap it."""
        if self.ended is None:
            try:
                os.kill(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                os.waitpid(self.popen.pid, 0)
            except ChildProcessError:
                pass
            self.ended = time.monotonic()


def fmt_row(cells, widths) -> str:
    """Target and round left-aligned, figures right-aligned."""
    return "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)
                     for i, (c, w) in enumerate(zip(cells, widths)))


class Table:
    """Rows, medians and mailsvc/peer ratios for ``metrics`` (key, title, format)."""

    def __init__(self, metrics, ratio_keys):
        self.metrics = metrics
        self.ratio_keys = ratio_keys
        self.head = ["target", "round"] + [title for _, title, _ in metrics]
        self.widths = [16, 5] + [max(len(title), 8) for _, title, _ in metrics]

    def row(self, row: dict) -> str:
        """One round: its figures, or its error."""
        if not row["ok"]:
            return fmt_row([row["target"], row["round"]], self.widths[:2]) + "  ERROR: " + row["error"]
        return fmt_row([row["target"], row["round"]] +
                       [f.format(row[k]) for k, _, f in self.metrics], self.widths)

    def summarize(self, rows: list[dict], names: list[str]) -> tuple[dict, dict]:
        """Medians of each target's finished rounds, and mailsvc's ratio to each peer."""
        medians = {}
        for name in names:
            ok = [r for r in rows if r["target"] == name and r["ok"]]
            total = sum(1 for r in rows if r["target"] == name)
            medians[name] = {"rounds_ok": len(ok), "rounds": total}
            for k, _, _ in self.metrics:
                medians[name][k] = statistics.median(r[k] for r in ok) if ok else None
        ratios = {}
        base = medians.get("mailsvc")
        for name in names:
            if name == "mailsvc" or base is None:
                continue
            ratios[name] = {
                k: (base[k] / medians[name][k]
                    if base[k] is not None and medians[name][k] else None)
                for k in self.ratio_keys}
        return medians, ratios

    def summary(self, medians: dict, ratios: dict) -> list[str]:
        """The summary lines: medians per target, then the ratios."""
        out = ["", "summary: medians of finished rounds"]
        out.append(fmt_row(["target", "ok"] + [t for _, t, _ in self.metrics], self.widths))
        for name, m in medians.items():
            cells = []
            for k, _, f in self.metrics:
                v = m[k]
                if isinstance(v, float) and f == "{:d}":
                    v = round(v)  # a median of counts may fall between two
                cells.append(f.format(v) if v is not None else "-")
            out.append(fmt_row([name, f"{m['rounds_ok']}/{m['rounds']}"] + cells, self.widths))
        for name, r in ratios.items():
            cells = [f"{r[k]:.2f}x" if r.get(k) is not None else "-" for k, _, _ in self.metrics]
            out.append(fmt_row([f"mailsvc/{name}", ""] + cells, self.widths))
        return out
