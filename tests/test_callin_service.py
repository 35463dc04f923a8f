"""``CallInService``: [[callin]] on a schedule, with a task.Clock and a fake ``call_in``."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from twisted.internet import defer, task
from twisted.logger import Logger

from mailsvc.callin import EX_REFUSED, CallInFailed, CallInResult
from mailsvc.callinservice import CallInService
from mailsvc.config import loads
from mailsvc.turnconfig import CallInConfig


@dataclass
class Message:
    id: str


class FakeCallIn:
    """Stands for ``call_in``: records each call; its Deferred is fired by the test."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.pending: list[defer.Deferred] = []

    async def __call__(self, reactor, host, port, options, factory):
        self.calls.append((host, port, options, factory))
        d = defer.Deferred()
        self.pending.append(d)
        return await d


@pytest.fixture
def setup(tmp_path):
    password = tmp_path / "pw"
    password.write_text("secret\n")
    entry = CallInConfig(host="provider.example", port=2366, user="custuser", password_file=password,
                         domains=("customer.example",), interval=60, tls="none")
    cfg = loads("", tmp_path / "etc" / "mailsvc.toml")
    clock = task.Clock()
    fake = FakeCallIn()
    submitted: list = []
    factories: list = []

    def receiving(cfg_, clock_, submit):
        assert cfg_ is cfg and clock_ is clock
        factories.append(submit)
        return f"factory {len(factories)}"

    service = CallInService(entry, cfg, clock, submitted.append, call=fake, receiving=receiving)
    events: list = []
    service.log = Logger(namespace="test", observer=events.append)
    service.events, service.fake, service.clock, service.factories, service.submitted = events, fake, clock, factories, submitted
    return service


def lines(service) -> list[str]:
    return [e["line"] for e in service.events if "line" in e]


def test_runs_first_after_five_seconds_then_every_interval(setup):
    """First run 5 s after start, then every interval; options from the entry; one log line per run."""
    service = setup
    service.startService()
    service.clock.advance(4.9)
    assert service.fake.calls == []
    service.clock.advance(0.1)
    (host, port, options, factory), = service.fake.calls
    assert (host, port, factory) == ("provider.example", 2366, "factory 1")
    assert (options.user, options.password, options.command, options.domains) == ("custuser", "secret", "ATRN", ("customer.example",))
    assert (options.tls_policy, options.starttls, options.tls_options, options.helo_name) == ("none", False, None, "mail.example.test")
    submit = service.factories[0]
    submit(Message("A1")), submit(Message("A2"))
    assert [m.id for m in service.submitted] == ["A1", "A2"]  # straight to the runner
    service.fake.pending[0].callback(CallInResult(quit=True))
    assert lines(service) == ["callin provider.example:2366: 2 messages received"]
    service.clock.advance(59.9)
    assert len(service.fake.calls) == 1
    service.clock.advance(0.1)
    assert len(service.fake.calls) == 2
    service.fake.pending[1].callback(CallInResult(no_mail="453 4.2.0 You have no mail", quit=True))
    assert lines(service)[-1] == "callin provider.example:2366: no mail waiting (453 4.2.0 You have no mail)"
    service.stopService()
    service.clock.advance(600)
    assert len(service.fake.calls) == 2 and not service.clock.getDelayedCalls()


def test_short_interval_starts_sooner(setup):
    service = setup
    service.entry = CallInConfig(**{**service.entry.__dict__, "interval": 1})
    service.startService()
    service.clock.advance(1)
    assert len(service.fake.calls) == 1
    service.stopService()


def test_no_overlap(setup):
    """A run longer than the interval: no second run meanwhile; the next one at the next tick after it ends."""
    service = setup
    service.startService()
    service.clock.advance(5)
    for _ in range(5):
        service.clock.advance(60)
    assert len(service.fake.calls) == 1
    service.fake.pending[0].callback(CallInResult(quit=True))
    assert len(service.fake.calls) == 1
    service.clock.advance(60)
    assert len(service.fake.calls) == 2
    service.stopService()


@pytest.mark.parametrize(("error", "logged"), [
    (CallInFailed("ATRN refused: 502 5.7.1 no", EX_REFUSED), "ATRN failed: ATRN refused: 502 5.7.1 no"),
    (RuntimeError("boom"), "ATRN failed: RuntimeError: boom"),
])
def test_failure_is_logged_and_the_next_run_happens(setup, error, logged):
    service = setup
    service.startService()
    service.clock.advance(5)
    service.fake.pending[0].errback(error)
    assert lines(service) == [f"callin provider.example:2366: {logged}"]
    assert service.events[-1]["log_level"].name == "warn"
    service.clock.advance(60)
    assert len(service.fake.calls) == 2
    service.fake.pending[1].callback(CallInResult(quit=True))
    assert lines(service)[-1] == "callin provider.example:2366: 0 messages received"
    service.stopService()


def test_broken_connection_and_bad_password_file(setup):
    """Broken before QUIT: what arrived is counted; an empty password file: logged, no call, next run still."""
    service = setup
    service.startService()
    service.clock.advance(5)
    service.factories[0](Message("B1"))
    service.fake.pending[0].callback(CallInResult(quit=False))
    assert lines(service)[-1] == "callin provider.example:2366: the connection broke before QUIT; 1 message received and kept"
    service.entry.password_file.write_text("")
    service.clock.advance(60)
    assert len(service.fake.calls) == 1
    assert "the password file is empty" in lines(service)[-1]
    service.entry.password_file.write_text("again\n")
    service.clock.advance(60)
    assert len(service.fake.calls) == 2 and service.fake.calls[1][2].password == "again"
    service.stopService()


def test_stop_during_a_run_cancels_it(setup):
    service = setup
    service.startService()
    service.clock.advance(5)
    service.stopService()
    assert service.fake.pending[0].called  # cancelled
    assert any("stopped during the call-in" in e.get("log_format", "") for e in service.events)
    service.clock.advance(600)
    assert len(service.fake.calls) == 1 and not service.clock.getDelayedCalls()


def test_stop_before_the_first_run(setup):
    service = setup
    service.startService()
    service.stopService()
    service.clock.advance(600)
    assert service.fake.calls == [] and not service.clock.getDelayedCalls()


def test_tls_options_follow_the_entry(setup, tmp_path):
    """required: checked (system CAs or ca_file); opportunistic without ca_file: unchecked."""
    service = setup
    for tls in ("required", "opportunistic"):
        service.entry = CallInConfig(**{**service.entry.__dict__, "tls": tls, "tls_name": "mx.provider.example"})
        options = service.options()
        assert options.tls_policy == tls and options.starttls and options.tls_options is not None


def test_build_adds_one_service_per_callin(tmp_path, monkeypatch):
    """tap.build: a CallInService per [[callin]], stopped before the runner (added last)."""
    from twisted.internet.testing import MemoryReactorClock

    from mailsvc import tap

    monkeypatch.setattr(tap, "_dns_resolver", lambda server: object())  # no resolver on the global reactor
    (tmp_path / "pw").write_text("x\n")
    text = "".join(f'[[callin]]\nhost = "p{n}.example"\nuser = "u"\npassword_file = "{tmp_path / "pw"}"\n' for n in (1, 2))
    cfg = loads(f'[server]\nspool_dir = "{tmp_path / "spool"}"\ncontrol_socket = "{tmp_path / "s.sock"}"\n'
                f'[store]\npath = "{tmp_path / "mail"}"\n' + text, tmp_path / "etc" / "mailsvc.toml")
    top = tap.build(cfg, MemoryReactorClock())
    services = list(top)
    assert [s.name for s in services[-2:]] == ["callin p1.example:366", "callin p2.example:366"]
    assert all(isinstance(s, CallInService) for s in services[-2:])
