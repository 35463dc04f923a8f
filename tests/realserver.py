"""The real ``twistd mailsvc`` process, for the real-socket tests.

Not a test module: the ``test_real_*`` files import ``RealServer`` and the
fixtures below. A ``RealServer`` owns a directory: it writes a config file
there (a free loopback port, ``mx.test``, the domain ``example.test`` with
alice, bob and carol, a spool and mailboxes inside the directory, a queue
runner that scans every second; free ports too for the submission and
implicit-TLS listeners, whose certificate and password file live in the
directory), starts ``<venv>/bin/twistd -n mailsvc`` with
``subprocess.Popen`` and waits, bounded, until the port answers.

Every process is stopped by its own PID: ``stop()`` sends SIGTERM, waits,
then SIGKILL; ``kill9()`` sends SIGKILL at once. The fixtures stop every
server they started, whatever the test did.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import pytest

# The twistd of the interpreter running the tests (the project's venv).
TWISTD = Path(sys.prefix) / "bin" / "twistd"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
POLL = 0.05

LOCAL_DOMAIN = "example.test"
HOSTNAME = "mx.test"


def tool(name: str) -> str:
    """The path of a real client or peer program; fails (never skips) when it
    is missing, since .ci/run installs every one."""
    path = shutil.which(name)
    assert path, f"{name} is not installed (.ci/run installs it)"
    return path


def client_context(ca) -> ssl.SSLContext:
    """A client TLS context that trusts the ``trustme.CA`` ``ca`` only and checks host names."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def toml_value(value) -> str:
    """``value`` (str, bool, int, float, list, dict) written as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, os.PathLike)):
        # JSON string escapes are valid TOML basic-string escapes.
        return json.dumps(os.fspath(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, message: str = "condition",
             details: Callable[[], str] | None = None):
    """Poll ``predicate`` until it returns something true; return that.

    :raise AssertionError: after ``timeout`` seconds, naming ``message``
        and adding ``details()`` (e.g. the server's log) when given.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            extra = f"\n{details()}" if details is not None else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {message}{extra}")
        time.sleep(POLL)


class RealServer:
    """One ``twistd mailsvc`` process and the directory it works in.

    :param root: its directory (created): config, logs, ``spool/``, ``mail/``.
    :param store_type: ``[store] type``.
    :param sections: extra keys per config table, e.g.
        ``{"smtp": {"max_message_size": 1000}}``; a value of ``None`` removes a key.
    :param policies: ``[[policy]]`` tables, in order.
    :param plugin_dirs: directories put first on the server's PYTHONPATH
        (each holding a ``twisted/plugins/`` folder of third-party plugins).
    """

    def __init__(
        self,
        root: Path,
        *,
        store_type: str = "maildir",
        sections: Mapping[str, Mapping[str, object]] | None = None,
        policies: Iterable[Mapping[str, object]] = (),
        plugin_dirs: Iterable[Path] = (),
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.submission_port = free_port()  # [submission] listen (STARTTLS + AUTH)
        self.implicit_tls_port = free_port()  # [submission] listen_implicit_tls (rfc8314)
        self.atrn_port = free_port()  # [atrn] listen (rfc2645; used only with [[hold.site]])
        self.cert_file = self.root / "tls" / "cert.pem"
        self.key_file = self.root / "tls" / "key.pem"
        self.password_file = self.root / "auth" / "passwd"
        self.spool_dir = self.root / "spool"
        self.mail_dir = self.root / "mail"
        self.config_path = self.root / "mailsvc.toml"
        self.log_path = self.root / "twistd.log"
        self.stdout_path = self.root / "stdout.txt"
        self.stderr_path = self.root / "stderr.txt"
        self.store_type = store_type
        self.sections = {name: dict(keys) for name, keys in (sections or {}).items()}
        self.policies = [dict(p) for p in policies]
        self.plugin_dirs = [Path(p) for p in plugin_dirs]
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self._log_mark = 0  # size of the log when the current run started

    # ---------------------------------------------------------- config

    def config(self) -> dict[str, dict[str, object]]:
        """The config tables this server is started with."""
        tables: dict[str, dict[str, object]] = {
            "server": {"hostname": HOSTNAME, "spool_dir": str(self.spool_dir)},
            "smtp": {
                "listen": [f"tcp:{self.port}:interface=127.0.0.1"],
                "command_timeout": 30,
                "data_timeout": 30,
            },
            "local": {
                "domains": [LOCAL_DOMAIN],
                "users": ["alice", "bob", "carol"],
                "aliases": {"postmaster": ["alice"], "team": ["alice", "bob"]},
            },
            "store": {"type": self.store_type, "path": str(self.mail_dir)},
            "delivery": {"scan_interval": 1, "retry_first": 1},
            "submission": {
                "listen": [f"tcp:{self.submission_port}:interface=127.0.0.1"],
                "listen_implicit_tls": [f"tcp:{self.implicit_tls_port}:interface=127.0.0.1"],
            },
            "tls": {"cert_file": str(self.cert_file), "key_file": str(self.key_file)},
            "auth": {"password_file": str(self.password_file)},
            "atrn": {"listen": [f"tcp:{self.atrn_port}:interface=127.0.0.1"]},
        }
        for name, keys in self.sections.items():
            table = tables.setdefault(name, {})
            for key, value in keys.items():
                if value is None:
                    table.pop(key, None)
                else:
                    table[key] = value
        return tables

    def write_config(self) -> Path:
        """Write the config file; return its path."""
        out = []
        for name, table in self.config().items():
            out.append(f"[{name}]")
            out.extend(f"{key} = {toml_value(value)}" for key, value in table.items())
            out.append("")
        for policy in self.policies:
            out.append("[[policy]]")
            out.extend(f"{key} = {toml_value(value)}" for key, value in policy.items())
            out.append("")
        self.config_path.write_text("\n".join(out), encoding="utf-8")
        return self.config_path

    # ---------------------------------------------------------- process

    def command(self, *twistd_args: str) -> list[str]:
        """The twistd command line for this server (``-n``, no pid file, our log)."""
        return [
            str(TWISTD), "-n", "--pidfile=", f"--logfile={self.log_path}",
            *twistd_args, "mailsvc", "--config", str(self.config_path),
        ]

    def environment(self) -> dict[str, str]:
        """The server's environment: ours, with the plugin dirs first on PYTHONPATH."""
        env = dict(os.environ)
        paths = [str(p) for p in self.plugin_dirs]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        if paths:
            env["PYTHONPATH"] = os.pathsep.join(paths)
        return env

    def launch(self) -> subprocess.Popen:
        """Write the config and start twistd; do not wait for it to listen."""
        if self.running:
            raise RuntimeError("this server is already running")
        self.write_config()
        self._log_mark = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.returncode = None
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.root,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        return self.proc

    def start(self) -> "RealServer":
        """Start twistd and wait (at most ``START_TIMEOUT``) until the port answers.

        :raise AssertionError: the process exited, or never listened; the
            message holds the tail of its log and its stderr. The process is
            stopped before raising.
        """
        self.launch()
        deadline = time.monotonic() + START_TIMEOUT
        listening = f"starting on {self.port}"
        while True:
            if self.proc.poll() is not None:
                self.returncode = self.proc.returncode
                raise AssertionError(
                    f"twistd exited with status {self.returncode} before listening\n{self.tail()}"
                )
            # The log line proves the port is ours, the connection that it is served.
            if listening in self.log(this_run=True) and self._answers():
                return self
            if time.monotonic() >= deadline:
                self.kill9()
                raise AssertionError(
                    f"twistd did not listen on 127.0.0.1:{self.port} within {START_TIMEOUT:g} s\n{self.tail()}"
                )
            time.sleep(POLL)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                return sock.recv(512).startswith(b"220 ")
        except OSError:
            return False

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the process to exit by itself; return its status.

        :raise AssertionError: it is still running after ``timeout`` (it is then killed).
        """
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise AssertionError(f"twistd still running after {timeout:g} s\n{self.tail()}") from None
        return self.returncode

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.returncode = self.proc.returncode
        return self.returncode

    def kill9(self) -> int | None:
        """SIGKILL now (a crash), and reap it."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
        self.returncode = self.proc.wait()
        return self.returncode

    def restart(self, *, store_type: str | None = None, plugin_dirs: Iterable[Path] | None = None) -> "RealServer":
        """Stop (if running) and start again: same port, spool and mailboxes."""
        self.stop()
        if store_type is not None:
            self.store_type = store_type
        if plugin_dirs is not None:
            self.plugin_dirs = [Path(p) for p in plugin_dirs]
        return self.start()

    # ---------------------------------------------------------- looking

    def log(self, this_run: bool = False) -> str:
        """The twistd log (every run, or only the current one)."""
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return ""
        if this_run:
            data = data[self._log_mark :]
        return data.decode("utf-8", "replace")

    def stderr(self) -> str:
        """What the process wrote to its stderr."""
        try:
            return self.stderr_path.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 30) -> str:
        """The end of the log and of stderr, for failure messages."""
        log = "\n".join(self.log().splitlines()[-lines:])
        return f"--- log ({self.log_path}):\n{log}\n--- stderr:\n{self.stderr()[-3000:]}"

    def maildir(self, user: str) -> list[Path]:
        """The files in ``<mail>/<user>/new/``, sorted by name."""
        new = self.mail_dir / user / "new"
        return sorted(p for p in new.iterdir() if p.is_file()) if new.is_dir() else []

    def spool_files(self) -> list[str]:
        """Every file in the spool, as paths relative to it (``local/C.<id>``...),
        but spent files kept for reuse (``spent/``, mailsvc.spool.recycle)."""
        if not self.spool_dir.exists():
            return []
        root = self.spool_dir
        return sorted(
            str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] != "spent"
        )

    def wait_for(self, predicate: Callable[[], object], timeout: float = 10.0, message: str = "condition"):
        """Poll ``predicate`` until true (at most ``timeout`` s); the log goes in the failure."""
        return wait_for(predicate, timeout, message, details=self.tail)

    def wait_for_mail(self, user: str, count: int = 1, timeout: float = 10.0) -> list[Path]:
        """Wait until ``user``'s new/ holds at least ``count`` files; return them."""
        return self.wait_for(
            lambda: (files := self.maildir(user)) and len(files) >= count and files,
            timeout,
            f"{count} message(s) in {user}'s Maildir",
        )

    def wait_for_log(self, text: str, count: int = 1, timeout: float = 10.0, this_run: bool = True) -> str:
        """Wait until the log holds ``text`` at least ``count`` times; return the log."""
        return self.wait_for(
            lambda: (log := self.log(this_run)).count(text) >= count and log,
            timeout,
            f"{count} x {text!r} in the log",
        )

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until the spool holds no committed message (every delivery done)."""
        self.wait_for(
            lambda: not [f for f in self.spool_files() if "/C." in f or "/D." in f],
            timeout,
            "an empty spool",
        )


# ---------------------------------------------------------------- raw client


class RawSMTP:
    """A bare SMTP client on a socket: sends exactly the bytes given, reads whole replies.

    For what smtplib will not do (bare LF, a half-sent message). Bounded:
    every read times out after ``timeout`` seconds.
    """

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        # Each send() leaves at once, so the server sees the pieces we choose.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = b""

    def __enter__(self) -> "RawSMTP":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; unread: {self._buffer!r}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line

    def reply(self) -> tuple[int, str]:
        """The next reply: its code and its text lines joined by newlines."""
        texts = []
        while True:
            line = self._line()
            texts.append(line[4:].decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(texts)

    def command(self, line: str | bytes) -> tuple[int, str]:
        """Send one command line (CRLF added) and read its reply."""
        if isinstance(line, str):
            line = line.encode()
        self.send(line + b"\r\n")
        return self.reply()

    def read_to_end(self) -> bytes:
        """Everything the server sends until it closes the connection."""
        chunks = [self._buffer]
        self._buffer = b""
        while chunk := self.sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def start_server(tmp_path):
    """A function that starts a ``RealServer`` in ``tmp_path/<name>``.

    Takes ``RealServer``'s keyword arguments. Every server it started is
    stopped (by its PID) when the test ends, passed or failed.
    """
    servers: list[RealServer] = []

    def start(name: str = "server", **options) -> RealServer:
        server = RealServer(tmp_path / name, **options)
        servers.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def real_server(start_server) -> RealServer:
    """A running server with the default test config."""
    return start_server()
