"""The ``[tls]``, ``[auth]`` and ``[submission]`` config tables (see ``mailsvc.config``).

Each ``read_*`` takes the ``mailsvc.configtable.Table`` being read (typed getters
that fail naming the key) and returns a frozen value; ``mailsvc.config``
calls them. Every key and its default is documented in ``etc/mailsvc.toml``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mailsvc.configtable import show
from mailsvc.smtp.sasl import MECHANISMS

TLS_MIN_VERSIONS = ("1.2", "1.3")
DEFAULT_MECHANISMS = ("SCRAM-SHA-256", "PLAIN", "LOGIN")


@dataclass(frozen=True)
class TLSConfig:
    """``[tls]``: the server certificate (STARTTLS and implicit TLS)."""

    cert_file: Path = Path("var/tls/cert.pem")
    key_file: Path = Path("var/tls/key.pem")
    generate_self_signed: bool = True
    min_version: str = "1.2"


@dataclass(frozen=True)
class AuthConfig:
    """``[auth]``: SMTP AUTH (rfc4954): password files, mechanisms, failure limits."""

    password_file: Path = Path("var/auth/passwd")
    cram_md5_secrets_file: Path | None = None
    mechanisms: tuple[str, ...] = DEFAULT_MECHANISMS
    allow_plaintext_without_tls: bool = False
    max_failures: int = 10
    failure_window: float = 900
    failure_delay: float = 1.0
    max_failure_delay: float = 30


@dataclass(frozen=True)
class SubmissionConfig:
    """``[submission]``: the message submission listeners (rfc6409, rfc8314)."""

    listen: tuple[str, ...] = ("tcp:2587:interface=127.0.0.1",)
    listen_implicit_tls: tuple[str, ...] = ("tcp:2465:interface=127.0.0.1",)
    require_sender_match: bool = True
    add_missing_headers: bool = True


def read_tls(t, base: Path) -> TLSConfig:
    """``[tls]``."""
    version = t.data.get("min_version", TLSConfig.min_version)
    if version not in TLS_MIN_VERSIONS:
        t.fail("min_version", f'must be "1.2" or "1.3"; got {show(version)}')
    return TLSConfig(
        cert_file=t.path("cert_file", str(TLSConfig.cert_file), base),
        key_file=t.path("key_file", str(TLSConfig.key_file), base),
        generate_self_signed=t.boolean("generate_self_signed", TLSConfig.generate_self_signed),
        min_version=version,
    )


def read_auth(t, base: Path) -> AuthConfig:
    """``[auth]``."""
    default = AuthConfig()
    mechanisms = []
    for index, name in enumerate(t.strings("mechanisms", list(default.mechanisms))):
        upper = name.upper()
        if upper not in MECHANISMS:
            t.fail(f"mechanisms[{index}]", f"unknown mechanism {show(name)} (known: {', '.join(MECHANISMS)})")
        if upper not in mechanisms:
            mechanisms.append(upper)
    secrets = None
    if t.data.get("cram_md5_secrets_file", ""):
        secrets = t.path("cram_md5_secrets_file", "", base)
    if "CRAM-MD5" in mechanisms and secrets is None:
        t.fail("mechanisms", "CRAM-MD5 needs cram_md5_secrets_file (its secrets cannot be hashed)")
    auth = AuthConfig(
        password_file=t.path("password_file", str(default.password_file), base),
        cram_md5_secrets_file=secrets,
        mechanisms=tuple(mechanisms),
        allow_plaintext_without_tls=t.boolean("allow_plaintext_without_tls", default.allow_plaintext_without_tls),
        max_failures=t.integer("max_failures", default.max_failures, minimum=0),
        failure_window=t.seconds("failure_window", default.failure_window),
        failure_delay=_non_negative(t, "failure_delay", default.failure_delay),
        max_failure_delay=_non_negative(t, "max_failure_delay", default.max_failure_delay),
    )
    return auth


def _non_negative(t, key: str, default: float) -> float:
    value = t.data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        t.fail(key, f"expected a number of seconds >= 0, got {show(value)}")
    return value


def read_submission(t) -> SubmissionConfig:
    """``[submission]``."""
    default = SubmissionConfig()
    endpoints = {
        "listen": t.endpoints("listen", default.listen),
        "listen_implicit_tls": t.endpoints("listen_implicit_tls", default.listen_implicit_tls, "tcp:465"),
    }
    return SubmissionConfig(
        listen=endpoints["listen"],
        listen_implicit_tls=endpoints["listen_implicit_tls"],
        require_sender_match=t.boolean("require_sender_match", default.require_sender_match),
        add_missing_headers=t.boolean("add_missing_headers", default.add_missing_headers),
    )
