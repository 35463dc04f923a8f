"""What policies answer, and how a chain of them is asked.

A policy (``mailsvc.interfaces.IPolicy``) returns ``None`` (no opinion), a
``Verdict``, or a Deferred of either. The chain stops at the first reject or
defer; headers from accepting verdicts are collected.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.internet import defer

from mailsvc.smtp.replies import Reply


@dataclass(frozen=True)
class Verdict:
    """A policy's answer: ``reply`` is None to accept, else the refusal.

    ``headers`` (complete ``Name: value`` lines, no line ends) are added on
    top of the message when it is accepted (end-of-data hook only).
    """

    reply: Reply | None = None
    headers: tuple[str, ...] = ()

    @classmethod
    def accept(cls, *headers: str) -> "Verdict":
        """Accept, optionally adding header lines."""
        for header in headers:
            if "\r" in header or "\n" in header or ":" not in header:
                raise ValueError(f"not a header line: {header!r}")
        return cls(None, tuple(headers))

    @classmethod
    def reject(cls, text: str, code: int = 550, status: str = "5.7.1") -> "Verdict":
        """Refuse for good (5xx)."""
        if not 500 <= code <= 599:
            raise ValueError("a rejection needs a 5xx code")
        return cls(Reply.of(code, status, text))

    @classmethod
    def defer(cls, text: str, code: int = 451, status: str = "4.7.1") -> "Verdict":
        """Refuse for now (4xx); the client tries again later."""
        if not 400 <= code <= 499:
            raise ValueError("a deferral needs a 4xx code")
        return cls(Reply.of(code, status, text))


@dataclass
class SessionInfo:
    """What policies may know about the session they judge."""

    client_address: str
    client_port: int = 0
    server_address: str = ""
    helo: str = ""
    extended: bool = False
    tls: bool = False
    user: str | None = None  # the authenticated user, once AUTH exists
    trusted: bool = False  # client is in smtp.trusted_networks
    extra: dict = field(default_factory=dict)  # free room for policies


_ACCEPTED = Verdict()


def ask(policies, hook: str, *args) -> defer.Deferred:
    """Ask each policy's ``hook(*args)`` in order.

    Fires with a ``Verdict``: the first refusal, or an acceptance carrying
    every header the policies added. While the answers are plain values
    (``None`` or a ``Verdict``) no generator runs; the first other answer
    (a Deferred...) hands the rest to ``_ask_slowly``.
    """
    headers: list[str] = []
    remaining = iter(policies)
    for policy in remaining:
        try:
            verdict = getattr(policy, hook)(*args)
        except BaseException:
            return defer.fail()
        if verdict is None:
            continue
        if type(verdict) is not Verdict:
            return _ask_slowly(defer.maybeDeferred(lambda v=verdict: v), remaining, hook, args, headers)
        if verdict.reply is not None:
            return defer.succeed(verdict)
        headers.extend(verdict.headers)
    return defer.succeed(Verdict(None, tuple(headers)) if headers else _ACCEPTED)


@defer.inlineCallbacks
def _ask_slowly(first: defer.Deferred, remaining, hook: str, args: tuple, headers: list):
    """``ask`` from the first answer that was not a plain value on."""
    verdict = yield first
    while True:
        if verdict is not None:
            if verdict.reply is not None:
                return verdict
            headers.extend(verdict.headers)
        policy = next(remaining, None)
        if policy is None:
            return Verdict(None, tuple(headers))
        verdict = yield defer.maybeDeferred(getattr(policy, hook), *args)
