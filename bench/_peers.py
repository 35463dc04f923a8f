"""Targets for ``accept_deliver.py``: how to start, watch and stop each server.

Every target is started as a real process listening on 127.0.0.1 only, with
its own fresh directory for each round, and delivers mail for
``sink@bench.test`` into a Maildir under that directory. Each target knows its
root process; CPU and memory are read from ``/proc`` for that process and its
descendants (helpers below).

Processes are only ever stopped by the PIDs recorded here: SIGTERM, a grace
period, then SIGKILL.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
MAIN_VENV = ROOT / ".venv"
PEER_VENV = BENCH_DIR / ".venv-peers"
PEER_PACKAGES = ["aiosmtpd"]

DOMAIN = "bench.test"
USER = "sink"
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 30.0


class TargetError(Exception):
    """A target could not be prepared or started; the message says why."""


# --------------------------------------------------------------- /proc helpers

def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may contain spaces or parentheses: split after the last ')'.
    rest = data[data.rindex(")") + 2:].split()
    return rest  # rest[0] is field 3 (state)


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    f = _stat_fields(pid)
    return f is not None and f[0] not in ("Z", "X")


def descendants(root: int) -> list[int]:
    """``root`` and every live process below it."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        f = _stat_fields(int(name))
        if f is not None:
            children.setdefault(int(f[1]), []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_seconds(pid: int) -> float:
    """user+sys of ``pid`` plus that of its children it has waited for."""
    f = _stat_fields(pid)
    if f is None:
        return 0.0
    # fields 14..17 (utime, stime, cutime, cstime) are rest[11:15]
    return sum(int(x) for x in f[11:15]) / CLK_TCK


def tree_cpu_seconds(root: int) -> float:
    """CPU of a process tree. Children that exited and were reaped are in their
    parent's cutime/cstime, so the difference of two readings is the CPU spent
    between them, even when worker processes come and go."""
    return sum(cpu_seconds(p) for p in descendants(root))


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def peak_rss_kb(pid: int) -> int:
    return _status_kb(pid, "VmHWM")


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def tree_pss_kb(root: int) -> int:
    """Proportional set size of a process tree: pages shared by several of
    its processes are split between them, so the sum is not inflated."""
    return sum(_pss_kb(p) for p in descendants(root))


# ---------------------------------------------------------- process helpers

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def become_subreaper() -> None:
    """Adopt orphaned descendants (Postfix's master daemonizes), so that they
    can be reaped here rather than left as zombies where init does not reap."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def reap(pids) -> None:
    """Collect the exit status of any of ``pids`` that ended as our children."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def stop_pid(pid: int, popen: subprocess.Popen | None = None, grace: float = 10.0) -> None:
    """SIGTERM ``pid``, wait up to ``grace`` s, then SIGKILL it."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if popen is not None and popen.poll() is not None:
            return
        if popen is None and not alive(pid):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if popen is not None:
                if popen.poll() is not None:
                    return
            elif not alive(pid):
                return
            time.sleep(0.05)


def wait_for_banner(port: int, proc_alive, timeout: float = START_TIMEOUT) -> None:
    """Wait until something on 127.0.0.1:``port`` greets with 220."""
    deadline = time.monotonic() + timeout
    last = "nothing listening"
    while time.monotonic() < deadline:
        if not proc_alive():
            raise TargetError("server exited during start-up")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.settimeout(5)
                line = s.recv(512)
                if line.startswith(b"220"):
                    try:
                        s.sendall(b"QUIT\r\n")
                        s.recv(512)
                    except OSError:
                        pass
                    return
                last = f"greeting {line[:60]!r}"
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    raise TargetError(f"no 220 greeting on port {port} after {timeout:.0f}s ({last})")


def log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


def count_delivered(mail_root: Path) -> int:
    """Files in every ``new/`` and ``cur/`` directory below ``mail_root``."""
    n = 0
    for dirpath, dirnames, filenames in os.walk(mail_root):
        if os.path.basename(dirpath) in ("new", "cur"):
            n += len(filenames)
            dirnames[:] = []
    return n


# ------------------------------------------------------------------ targets

class Target:
    """One server under test. ``start`` then ``stop``, once per round."""

    name = "?"
    pid: int | None = None
    multi_process = False  # True: sample the memory of the whole process tree

    def prepare(self) -> None:
        """One-time set-up before the first round; raise TargetError if unusable."""

    def start(self, workdir: Path, port: int) -> None:
        raise NotImplementedError

    def mail_root(self) -> Path:
        return self.workdir / "mail"

    def alive(self) -> bool:
        return self.pid is not None and alive(self.pid)

    def stop(self) -> None:
        raise NotImplementedError

    def failure(self, why: str) -> TargetError:
        tail = log_tail(self.workdir / "server.log", 1)[:300]
        return TargetError(f"{why}; log: {tail}" if tail else why)


class _PopenTarget(Target):
    """A server that runs in the foreground as our direct child."""

    popen: subprocess.Popen | None = None

    def _spawn(self, argv: list[str], workdir: Path, port: int, env=None) -> None:
        self.workdir = workdir
        log = open(workdir / "server.log", "wb")
        try:
            self.popen = subprocess.Popen(
                argv, cwd=workdir, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        except OSError as e:
            raise TargetError(f"cannot run {argv[0]}: {e}") from None
        finally:
            log.close()
        self.pid = self.popen.pid
        try:
            wait_for_banner(port, lambda: self.popen.poll() is None)
        except TargetError as e:
            rc = self.popen.poll()
            raise self.failure(f"{e}" + (f" (exit {rc})" if rc is not None else "")) from None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self) -> None:
        if self.popen is not None:
            stop_pid(self.popen.pid, self.popen)
            self.popen = None


class Mailsvc(_PopenTarget):
    """``twistd -n mailsvc`` from the project venv, Maildir store."""

    name = "mailsvc"

    def __init__(self, name: str = "mailsvc", source: Path | None = None,
                 max_connections: int = 200, smtp_extra: dict[str, str] | None = None,
                 backlog: int | None = None, receiver_processes: int = 0) -> None:
        # source: another mailsvc source tree (with mailsvc/ and twisted/plugins/)
        # run with the project venv, e.g. a "before" snapshot made with
        # ``git archive HEAD mailsvc twisted | tar -x -C DIR``.
        self.name = name
        self.source = Path(source).resolve() if source is not None else None
        self.max_connections = max_connections
        # More [smtp] keys (TOML values as text). The whole load comes from
        # 127.0.0.1: no per-client cap (Postfix's is off here too), else a new
        # connection may be refused while the server still counts a closed one.
        self.smtp_extra = {"max_connections_per_client": "0", **(smtp_extra or {})}
        self.backlog = backlog  # the listening socket's backlog (Twisted's default: 50)
        # [server] receiver_processes: SMTP in that many child processes.
        self.receiver_processes = receiver_processes
        self.multi_process = receiver_processes > 0

    def prepare(self) -> None:
        twistd = MAIN_VENV / "bin" / "twistd"
        if not twistd.exists():
            raise TargetError(f"{twistd} not found (make the project venv first)")
        if self.source is not None and not (self.source / "mailsvc" / "tap.py").exists():
            raise TargetError(f"{self.source} is not a mailsvc source tree")

    def start(self, workdir: Path, port: int) -> None:
        q = json.dumps  # a JSON string is a valid TOML basic string here
        backlog = f":backlog={self.backlog}" if self.backlog else ""
        config = workdir / "mailsvc.toml"
        config.write_text(
            "[server]\n"
            f"hostname = {q('mailsvc.' + DOMAIN)}\n"
            f"spool_dir = {q(str(workdir / 'spool'))}\n"
            + (f"receiver_processes = {self.receiver_processes}\n" if self.receiver_processes else "")
            + "\n[smtp]\n"
            f"listen = [{q(f'tcp:{port}:interface=127.0.0.1' + backlog)}]\n"
            f"max_connections = {self.max_connections}\n"
            + "".join(f"{k} = {v}\n" for k, v in self.smtp_extra.items()) +
            "\n[local]\n"
            f"domains = [{q(DOMAIN)}]\n"
            f"users = [{q(USER)}]\n"
            f"aliases = {{ postmaster = [{q(USER)}] }}\n"
            "\n[store]\n"
            'type = "maildir"\n'
            f"path = {q(str(workdir / 'mail'))}\n")
        argv = [str(MAIN_VENV / "bin" / "twistd"), "-n", "--pidfile=", "mailsvc",
                "--config", str(config)]
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        if self.source is not None:
            env["PYTHONPATH"] = str(self.source)  # before the project on sys.path
        self._spawn(argv, workdir, port, env)


class Aiosmtpd(_PopenTarget):
    """``python -m aiosmtpd`` with its stock ``handlers.Mailbox`` (mailbox.Maildir,
    no fsync), from a venv the bench makes in ``bench/.venv-peers``."""

    name = "aiosmtpd"

    def prepare(self) -> None:
        python = PEER_VENV / "bin" / "python"
        check = [str(python), "-c", "import aiosmtpd"]
        if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
            return
        print(f"# setting up {PEER_VENV} (pip install {' '.join(PEER_PACKAGES)})",
              file=sys.stderr)
        try:
            if not python.exists():
                subprocess.run(["python3", "-m", "venv", str(PEER_VENV)],
                               check=True, capture_output=True, timeout=120)
            subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES],
                           check=True, capture_output=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            out = getattr(e, "stderr", b"") or b""
            last = out.decode(errors="replace").strip().splitlines()[-1:] or [str(e)]
            raise TargetError(f"cannot install aiosmtpd into {PEER_VENV}: {last[0]}") from None

    def start(self, workdir: Path, port: int) -> None:
        maildir = workdir / "mail" / USER
        maildir.parent.mkdir(parents=True, exist_ok=True)
        argv = [str(PEER_VENV / "bin" / "python"), "-m", "aiosmtpd", "-n",
                "-l", f"127.0.0.1:{port}", "-c", "aiosmtpd.handlers.Mailbox", str(maildir)]
        self._spawn(argv, workdir, port)


class TwistedMail(_PopenTarget):
    """``twisted.mail.smtp.ESMTP`` with a ``mailbox.Maildir`` handler (no queue,
    no fsync): ``bench/peer_twisted_mail.py``, run with the project venv."""

    name = "twisted"

    def prepare(self) -> None:
        python = MAIN_VENV / "bin" / "python"
        check = [str(python), "-c", "import twisted.mail.smtp"]
        if not python.exists() or subprocess.run(check, capture_output=True).returncode != 0:
            raise TargetError(f"{python} cannot import twisted.mail.smtp")

    def start(self, workdir: Path, port: int) -> None:
        maildir = workdir / "mail" / USER
        maildir.parent.mkdir(parents=True, exist_ok=True)
        argv = [str(MAIN_VENV / "bin" / "python"), str(BENCH_DIR / "peer_twisted_mail.py"),
                str(port), str(maildir)]
        self._spawn(argv, workdir, port, dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))


class Postfix(Target):
    """Debian's Postfix in a private instance: own config and queue directory,
    smtpd on 127.0.0.1:<port> only, virtual(8) delivery into a Maildir.
    Postfix's own defaults otherwise (fsync on, in_flow_delay 1s)."""

    name = "postfix"
    multi_process = True
    _starting: Path | None = None  # queue dir of an instance being started
    POSTFIX = "/usr/sbin/postfix"
    DAEMONS = "/usr/lib/postfix/sbin"
    # main.cf settings added to (or replacing) the ones below, e.g. by relay.py.
    main_cf_extra: dict[str, str] | None = None

    def prepare(self) -> None:
        if not (os.path.exists(self.POSTFIX) and os.path.isdir(self.DAEMONS)):
            raise TargetError("postfix is not installed (apt-get install postfix)")
        if os.geteuid() != 0:
            raise TargetError("postfix needs root to start a private instance")
        import pwd
        try:
            pw = pwd.getpwnam("postfix")
        except KeyError:
            raise TargetError("no 'postfix' user on this machine") from None
        self.uid, self.gid = pw.pw_uid, pw.pw_gid

    def start(self, workdir: Path, port: int) -> None:
        self.workdir = workdir
        self.pid = None
        conf = workdir / "etc"
        queue = workdir / "queue"
        data = workdir / "data"
        mail = workdir / "mail"
        for d in (conf, queue, data, mail):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(workdir, 0o755)
        os.chown(data, self.uid, self.gid)
        os.chown(mail, self.uid, self.gid)
        # Every path above must be reachable by the postfix user.
        p = workdir
        while p != p.parent:
            if os.stat(p).st_mode & 0o005 != 0o005:
                os.chmod(p, os.stat(p).st_mode | 0o005)
            p = p.parent
        main_cf = {
            "compatibility_level": "3.6",
            "config_directory": str(conf),
            "queue_directory": str(queue),
            "data_directory": str(data),
            "maillog_file": str(workdir / "server.log"),
            "maillog_file_prefixes": str(workdir),
            "myhostname": "postfix." + DOMAIN,
            "mydomain": DOMAIN,
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "relayhost": "",
            "biff": "no",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "virtual_mailbox_domains": DOMAIN,
            "virtual_mailbox_base": str(mail),
            "virtual_mailbox_maps": f"inline:{{ {USER}@{DOMAIN}={USER}/ }}",
            "virtual_alias_maps": f"inline:{{ postmaster@{DOMAIN}={USER}@{DOMAIN} }}",
            "virtual_uid_maps": f"static:{self.uid}",
            "virtual_gid_maps": f"static:{self.gid}",
            "virtual_minimum_uid": str(min(self.uid, 100)),
            "smtpd_client_connection_count_limit": "0",
            "smtpd_client_connection_rate_limit": "0",
            "smtpd_client_message_rate_limit": "0",
            "default_process_limit": "200",
            "shlib_directory": "/usr/lib/postfix",
            "daemon_directory": self.DAEMONS,
            "command_directory": "/usr/sbin",
            "meta_directory": "/etc/postfix",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "import_environment": "MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C",
        }
        main_cf.update(self.main_cf_extra or {})
        (conf / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main_cf.items()))
        (conf / "master.cf").write_text(MASTER_CF.format(port=port))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAIL_")}
        env["MAIL_CONFIG"] = str(conf)
        self._starting = queue
        try:
            r = subprocess.run([self.POSTFIX, "-c", str(conf), "start"], env=env,
                               capture_output=True, timeout=60)
        except subprocess.TimeoutExpired:
            r = None
        self._find_master(queue)
        if r is None:
            raise self.failure("postfix start timed out after 60s")
        if r.returncode != 0:
            # postfix(1) writes to stderr only on a terminal; else to the log.
            out = (r.stderr or r.stdout).decode(errors="replace").strip().splitlines()
            raise self.failure(f"postfix start exited {r.returncode}"
                               + (f": {out[-1]}" if out else ""))
        try:
            wait_for_banner(port, self.alive)
        except TargetError as e:
            raise self.failure(str(e)) from None

    def _find_master(self, queue: Path, wait: float = 10) -> None:
        pidfile = queue / "pid" / "master.pid"
        deadline = time.monotonic() + wait
        while True:
            try:
                pid = int(pidfile.read_text().split()[0])
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == "master":
                        self.pid = pid
                        return
            except (OSError, ValueError, IndexError):
                pass
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    def stop(self) -> None:
        if self.pid is None and self._starting is not None:
            # Interrupted between "postfix start" and reading its pid file.
            self._find_master(self._starting, wait=0)
        self._starting = None
        if self.pid is None:
            return
        master, self.pid = self.pid, None
        tree = descendants(master) if alive(master) else []
        # master turns SIGTERM into an orderly stop of all its children.
        stop_pid(master)
        for pid in tree[1:]:
            stop_pid(pid, grace=2.0)
        reap(tree or [master])


MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

TARGETS = {t.name: t for t in (Mailsvc, Aiosmtpd, TwistedMail, Postfix)}


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
