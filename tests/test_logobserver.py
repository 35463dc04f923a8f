"""mailsvc.logobserver: the same lines as twistd's text log, and the same
choice of where they go."""

from __future__ import annotations

import io
import signal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import FileLogObserver, Logger, formatEventAsClassicLogText, formatTime
from twisted.python import logfile
from twisted.scripts.twistd import ServerOptions

from mailsvc.logobserver import classic_text, observer_for

CONFIG = str(Path(__file__).resolve().parent.parent / "etc" / "mailsvc.toml")


def events_of(emit) -> list[dict]:
    """The events ``emit(log)`` sends through a twisted.logger Logger."""
    events: list[dict] = []
    emit(Logger(namespace="mailsvc.test", observer=lambda event: events.append(dict(event))))
    return events


def failed(log):
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("could not {what}", what="divide")


@pytest.mark.parametrize(
    "emit",
    [
        pytest.param(lambda log: log.info("accepted id={id} from=<{sender}>", id="X1", sender="a{b}c@x"), id="braces-in-value"),
        pytest.param(lambda log: log.info("two\nlines {x!r}", x="a\nb"), id="newlines"),
        pytest.param(lambda log: log.info("{seconds:g} s, {a.real}, {b[0]}", seconds=1.5, a=3, b=[9]), id="specs"),
        pytest.param(lambda log: log.warn("literal {{braces}}"), id="literal-braces"),
        pytest.param(lambda log: log.info("ünïcode {v}", v="ç"), id="unicode"),
        pytest.param(lambda log: log.info("a call: {f()}", f=lambda: 3), id="twisted-call-syntax"),
        pytest.param(lambda log: log.info("missing {nothing}"), id="missing-key"),
        pytest.param(lambda log: log.info(""), id="empty"),
        pytest.param(failed, id="failure-with-traceback"),
        pytest.param(lambda log: log.info("set {v}", v=1, log_system="pop3,4,127.0.0.1"), id="log_system"),
        pytest.param(lambda log: log.info("odd {v}", v=b"x", log_system=3), id="log_system-not-str"),
    ],
)
def test_a_line_is_the_one_twistd_writes(emit):
    [event] = events_of(emit)
    assert classic_text(event) == formatEventAsClassicLogText(event)


@pytest.mark.parametrize(
    "event",
    [
        pytest.param({"log_format": "no level {x}", "x": 1, "log_time": 1.0}, id="no-level-or-namespace"),
        pytest.param({"log_format": b"bytes format", "log_time": 1.0}, id="bytes-format"),
        pytest.param({"log_format": "no time"}, id="no-time"),
        pytest.param({"message": ("legacy",), "log_time": 1.0}, id="no-format"),
    ],
)
def test_odd_events_are_written_as_twistd_writes_them(event):
    assert classic_text(event) == formatEventAsClassicLogText(event)


@given(
    values=st.lists(st.text(), min_size=3, max_size=3),
    spec=st.sampled_from(["{a} {b} {c}", "<{a}>\n{b!r}:{c:>5}", "{{a}} {a}{b}{c}", "x"]),
)
def test_any_text_is_written_as_twistd_writes_it(values, spec):
    a, b, c = values
    [event] = events_of(lambda log: log.info(spec, a=a, b=b, c=c))
    assert classic_text(event) == formatEventAsClassicLogText(event)


def test_the_timestamp_follows_the_clock_second_by_second():
    """The timestamp is computed once per second; each is still the right one."""
    for when in (100.0, 100.2, 100.999, 101.0, 99.5, 86400 * 365.25 * 50 + 0.5, 101.7):
        event = {"log_format": "t", "log_time": when, "log_namespace": "n", "log_level": None}
        assert classic_text(event).startswith(formatTime(when) + " ")


def test_the_fields_stay_in_the_event_for_structured_observers():
    [event] = events_of(lambda log: log.info("id={id}", id="X1"))
    before = dict(event)
    classic_text(event)
    assert event == before and event["log_format"] == "id={id}" and event["id"] == "X1"


def twistd_options(*argv: str):
    """twistd's own parsed command line; our Options are its subOptions."""
    options = ServerOptions()
    options.parseOptions([*argv, "mailsvc", "--config", CONFIG])
    assert options.subOptions.parent is options
    return options.subOptions.parent


@pytest.fixture
def sigusr1(monkeypatch):
    """SIGUSR1's handler as it was before the test, restored after; the log
    files the test opened are closed."""
    before = signal.getsignal(signal.SIGUSR1)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    opened = []
    open_log_file = logfile.LogFile.fromFullPath
    monkeypatch.setattr(
        logfile.LogFile, "fromFullPath", lambda path: opened.append(open_log_file(path)) or opened[-1]
    )
    yield
    signal.signal(signal.SIGUSR1, before)
    for log_file in opened:
        log_file.close()


def test_a_log_file_is_written_and_rotated_on_sigusr1(tmp_path, sigusr1, monkeypatch):
    path = tmp_path / "mail.log"
    factory = observer_for(twistd_options("-n", f"--logfile={path}"))
    observer = factory()
    assert isinstance(observer, FileLogObserver)
    [event] = events_of(lambda log: log.info("hello {who}", who="there"))
    observer(event)
    assert path.read_text() == formatEventAsClassicLogText(event)
    # twistd's handler: the rotation is made on the reactor thread.
    calls = []
    from twisted.internet import reactor

    monkeypatch.setattr(reactor, "callFromThread", lambda f, *a: calls.append(f) or f(*a))
    signal.raise_signal(signal.SIGUSR1)
    assert len(calls) == 1
    assert (tmp_path / "mail.log.1").read_text() == formatEventAsClassicLogText(event)
    observer(event)
    assert path.read_text() == formatEventAsClassicLogText(event)


def test_a_set_sigusr1_handler_is_kept(tmp_path, sigusr1):
    mine = lambda signum, frame: None  # noqa: E731
    signal.signal(signal.SIGUSR1, mine)
    observer_for(twistd_options("-n", f"--logfile={tmp_path / 'mail.log'}"))()
    assert signal.getsignal(signal.SIGUSR1) is mine


def test_no_log_file_under_n_is_standard_output(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    observer = observer_for(twistd_options("-n"))()
    [event] = events_of(lambda log: log.info("to stdout"))
    observer(event)
    assert out.getvalue() == formatEventAsClassicLogText(event)
    assert observer_for(twistd_options("-n", "--logfile=-")) is not None


def test_a_daemon_logs_to_twistd_log_by_default(tmp_path, monkeypatch, sigusr1):
    monkeypatch.chdir(tmp_path)
    observer = observer_for(twistd_options())()
    [event] = events_of(lambda log: log.info("daemon"))
    observer(event)
    assert (tmp_path / "twistd.log").read_text() == formatEventAsClassicLogText(event)


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["--syslog"], id="syslog"),
        pytest.param(["-n", "--logger=twisted.logger.textFileLogObserver"], id="logger"),
        pytest.param(["--logfile=-"], id="daemon-to-stdout-refused-by-twistd"),
    ],
)
def test_twistd_keeps_what_it_does_not_write_as_text(argv):
    assert observer_for(twistd_options(*argv)) is None


def test_no_twistd_no_observer():
    """makeService called from Python (no twistd options): nothing to offer."""
    assert observer_for(None) is None



def test_twistd_finds_the_observer_on_its_application(tmp_path, monkeypatch, sigusr1):
    """makeService offers the observer; the service tree sets it on the
    application twistd makes, where AppLogger.start looks (and keeps one
    that is there already)."""
    from twisted.application import service
    from twisted.logger import ILogObserver

    from mailsvc import tap

    monkeypatch.setattr(tap, "build", lambda cfg, reactor: tap.MailService())
    top = tap.makeService(twistd_options("-n", f"--logfile={tmp_path / 'mail.log'}").subOptions)
    application = service.Application("mailsvc")
    top.setServiceParent(application)
    observer = application.getComponent(ILogObserver)
    assert isinstance(observer, FileLogObserver) and observer.formatEvent is classic_text
    assert list(service.IServiceCollection(application)) == [top]

    theirs = service.Application("mailsvc")
    theirs.setComponent(ILogObserver, print)
    again = tap.MailService()
    again.log_observer = lambda: pytest.fail("an observer was set already")
    again.setServiceParent(theirs)
    assert theirs.getComponent(ILogObserver) is print
