"""One big message through mailsvc: how much does the server's memory grow?

```
.venv/bin/python bench/big_message.py                  # 100 MB, one message
.venv/bin/python bench/big_message.py --mb 20 --keep
```

Starts mailsvc as ``accept_deliver.py`` does (``[smtp] max_message_size``
raised to fit), sends one small message to warm it up, then one message of
``--mb`` megabytes, generated on the fly by a raw-socket SMTP client (78-octet
lines, never held whole on either side), and waits until it is in the
Maildir. Meanwhile the server's resident set (VmRSS) is sampled every 50 ms.

Prints the server's RSS before the big message, its peak during it (the
largest of the samples and of VmHWM, the kernel's high-water mark), the
growth, the seconds to the 250 and to delivery, and the size of the
delivered file. DESIGN rule 3 says memory per connection does not grow with
message size; the performance issue asks for growth <= 16 MB at 100 MB. This
script prints, it asserts nothing.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _peers  # noqa: E402

LINE = b"X" * 76 + b"\r\n"


def rss_kb(pid: int, key: str = "VmRSS") -> int:
    return _peers._status_kb(pid, key)


class Sampler(threading.Thread):
    """Samples a process's VmRSS until stopped; keeps the largest."""

    def __init__(self, pid: int, every: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak = max(self.peak, rss_kb(self.pid))
            self._halt.wait(self.every)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return self.peak


class Client:
    """A minimal SMTP client on a socket; replies read line by line."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=600)
        self.file = self.sock.makefile("rb")
        self.expect(b"220")

    def expect(self, code: bytes) -> bytes:
        while True:
            line = self.file.readline()
            if not line:
                raise SystemExit(f"connection closed, wanted {code.decode()}")
            if line[3:4] != b"-":
                if not line.startswith(code):
                    raise SystemExit(f"wanted {code.decode()}, got {line.decode(errors='replace').strip()}")
                return line

    def command(self, text: str, code: bytes) -> bytes:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.expect(code)

    def send_message(self, size: int) -> tuple[float, bytes]:
        """One message of about ``size`` octets; returns (seconds to 250, reply)."""
        self.command("EHLO bench.test", b"250")
        self.command(f"MAIL FROM:<bench@{_peers.DOMAIN}> SIZE={size + 200}", b"250")
        self.command(f"RCPT TO:<{_peers.USER}@{_peers.DOMAIN}>", b"250")
        self.command("DATA", b"354")
        started = time.monotonic()
        self.sock.sendall(b"Subject: big\r\n\r\n")
        chunk = LINE * (1024 * 1024 // len(LINE))  # about 1 MB of whole lines
        sent = 0
        while sent + len(chunk) <= size:
            self.sock.sendall(chunk)
            sent += len(chunk)
        rest = (size - sent) // len(LINE)
        self.sock.sendall(LINE * rest + b".\r\n")
        reply = self.expect(b"250")
        return time.monotonic() - started, reply

    def close(self) -> None:
        try:
            self.command("QUIT", b"221")
        finally:
            self.file.close()
            self.sock.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=100, help="message size in MB (100)")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    p.add_argument("--baseline", type=Path, help="run the mailsvc source tree in DIR instead")
    args = p.parse_args(argv)
    size = int(args.mb * 1024 * 1024)
    _peers.become_subreaper()
    target = _peers.Mailsvc(name="mailsvc" if args.baseline is None else "mailsvc-base",
                            source=args.baseline,
                            smtp_extra={"max_message_size": str(size + 1024 * 1024)})
    target.prepare()
    base = Path(tempfile.mkdtemp(prefix="mailsvc-big-"))
    try:
        port = _peers.free_port()
        target.start(base, port)
        mail = target.mail_root()
        warm = Client(port)
        warm.send_message(10_000)
        warm.close()
        deadline = time.monotonic() + args.timeout
        while _peers.count_delivered(mail) < 1:
            if time.monotonic() > deadline:
                raise SystemExit("warm-up message not delivered")
            time.sleep(0.05)
        time.sleep(0.5)
        before = rss_kb(target.pid)
        hwm_before = rss_kb(target.pid, "VmHWM")
        sampler = Sampler(target.pid)
        sampler.start()
        client = Client(port)
        accept_s, reply = client.send_message(size)
        client.close()
        started = time.monotonic() - accept_s
        while _peers.count_delivered(mail) < 2:
            if time.monotonic() > deadline or not target.alive():
                raise SystemExit("big message not delivered in time")
            time.sleep(0.05)
        delivered_s = time.monotonic() - started
        peak = sampler.stop()
        hwm = rss_kb(target.pid, "VmHWM")
        if hwm > hwm_before:  # a new high-water mark: between two samples, maybe
            peak = max(peak, hwm)
        newest = max((p for p in mail.rglob("new/*")), key=lambda p: p.stat().st_size)
        print(f"# {target.name}: one message of {size / 2**20:.0f} MB "
              f"({size // len(LINE)} lines of {len(LINE)} octets)")
        print(f"RSS before        {before / 1024:8.1f} MB  (VmHWM {hwm_before / 1024:.1f} MB)")
        print(f"RSS peak during   {peak / 1024:8.1f} MB")
        print(f"growth            {(peak - before) / 1024:8.1f} MB")
        print(f"250 after         {accept_s:8.2f} s   ({reply.decode(errors='replace').strip()})")
        print(f"delivered after   {delivered_s:8.2f} s")
        print(f"delivered file    {newest.stat().st_size / 2**20:8.1f} MB  ({newest.name})")
    finally:
        target.stop()
        if args.keep:
            print(f"# kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
