"""``mailsvc passwd USER``: set or remove a local user's SMTP AUTH password.

::

    mailsvc passwd alice                 asks twice on the terminal (getpass)
    mailsvc passwd alice --stdin         reads one line from standard input
    mailsvc passwd alice --delete        removes alice's password (and CRAM-MD5 secret)
    mailsvc passwd alice --config F      the config naming the files (default: $MAILSVC_CONFIG,
                                         else etc/mailsvc.toml)

The password goes into ``[auth] password_file`` as a salted scrypt hash and
SCRAM-SHA-256 keys (``mailsvc.passwords``); when ``[auth]
cram_md5_secrets_file`` is set, the password itself also goes there, since
CRAM-MD5 cannot work from a hash (``--no-cram-md5`` leaves the user out of
it). Files are replaced atomically with mode 0600; a running server sees the
change at the next AUTH, without a restart.

Exit status: 0 done; 1 refused (passwords differ, empty password); 2 bad
command line; 67 no such local user; 74 cannot write; 78 bad config.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys

from mailsvc import config as configuration
from mailsvc.aliases import normalName
from mailsvc.errors import ConfigError
from mailsvc.passwords import make_entry, write_entry

DEFAULT_CONFIG = "etc/mailsvc.toml"
EX_NOUSER, EX_IOERR, EX_CONFIG = 67, 74, 78


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailsvc passwd", description="Set a local user's SMTP AUTH password.")
    parser.add_argument("user", help="a local user name, as in [local] users")
    parser.add_argument("--config", default=None, help="the config file (default: $MAILSVC_CONFIG or etc/mailsvc.toml)")
    parser.add_argument("--stdin", action="store_true", help="read the password from the first line of standard input")
    parser.add_argument("--delete", action="store_true", help="remove the user's password instead")
    parser.add_argument(
        "--no-cram-md5", action="store_true", help="do not put the password in the CRAM-MD5 secrets file"
    )
    return parser


def _read_password(from_stdin: bool, stdin, prompt=getpass.getpass) -> str | None:
    """The new password, or None (and a message) when it cannot be had."""
    if from_stdin:
        line = stdin.readline()
        return line.removesuffix("\n").removesuffix("\r")
    first = prompt("New password: ")
    second = prompt("Retype new password: ")
    if first != second:
        print("mailsvc passwd: the passwords differ; nothing changed", file=sys.stderr)
        return None
    return first


def main(argv: list[str] | None = None, stdin=None, prompt=getpass.getpass) -> int:
    """Run ``mailsvc passwd`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    path = args.config or os.environ.get("MAILSVC_CONFIG") or DEFAULT_CONFIG
    try:
        cfg = configuration.load(path)
    except ConfigError as error:
        print(f"mailsvc passwd: config error: {error}", file=sys.stderr)
        return EX_CONFIG
    user = normalName(args.user)  # as [local] users are kept
    if user not in cfg.local.users:
        print(f"mailsvc passwd: {args.user}: no such local user (see [local] users)", file=sys.stderr)
        return EX_NOUSER
    auth = cfg.auth
    secrets_file = None if args.no_cram_md5 else auth.cram_md5_secrets_file
    try:
        if args.delete:
            write_entry(auth.password_file, user, None)
            if auth.cram_md5_secrets_file:
                write_entry(auth.cram_md5_secrets_file, user, None)
            print(f"mailsvc passwd: removed the password of {user} ({auth.password_file})")
            return 0
        password = _read_password(args.stdin, stdin or sys.stdin, prompt)
        if password is None:
            return 1
        if not password:
            print("mailsvc passwd: empty password refused; nothing changed", file=sys.stderr)
            return 1
        if "\n" in password or "\r" in password or "\0" in password:
            print("mailsvc passwd: a password may not hold CR, LF or NUL", file=sys.stderr)
            return 1
        write_entry(auth.password_file, user, make_entry(user, password).line())
        if secrets_file is not None:
            write_entry(secrets_file, user, f"{user}:{password}")
        elif auth.cram_md5_secrets_file:
            write_entry(auth.cram_md5_secrets_file, user, None)  # no stale CRAM-MD5 secret left behind
    except OSError as error:
        print(f"mailsvc passwd: cannot write: {error}", file=sys.stderr)
        return EX_IOERR
    where = str(auth.password_file) + (f" and {secrets_file}" if secrets_file else "")
    print(f"mailsvc passwd: password set for {user} ({where})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
