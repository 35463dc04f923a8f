"""twistd's text log, written for less CPU.

Under ``twistd``, every log line goes through ``textFileLogObserver``: its
text is rendered by a ``string.Formatter`` written in Python (a pass per field,
a call wrapper around each value) and its timestamp by three ``datetime``
conversions and a ``strftime``. That is 30-60 us a line on the machines we
measure on, and a mail server writes four lines per message or more (connect,
queued, delivered, disconnect): ~15% of the CPU a message costs.

``classic_text`` writes the very same line: the text with ``str.format`` (C),
the timestamp once per second. Whatever it cannot render the same way (a
traceback, a ``{f()}`` call, a missing key, a bytes format) goes through
Twisted's own ``formatEventAsClassicLogText``. Events are not touched:
structured observers still see ``log_format`` and its fields.

``observer_for`` offers it to twistd for the two logs twistd would write as
text to a file, ``--logfile PATH`` (rotated as twistd does: at 1 MB and on
SIGUSR1) and standard output under ``-n``, and offers nothing for
``--syslog`` or ``--logger``, which twistd keeps handling. twistd takes an
``ILogObserver`` component of the application in place of its own
(``twisted.application.app.AppLogger.start``); ``tap.MailService`` sets it.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Mapping
from typing import Any

from twisted.logger import FileLogObserver, eventAsText, formatEventAsClassicLogText, formatTime
from twisted.python import logfile

__all__ = ["classic_text", "event_text", "observer_for", "text_file_observer"]


class _Timestamps:
    """``formatTime`` of a ``log_time``, computed once per second.

    twistd's format (RFC 3339, ``%Y-%m-%dT%H:%M:%S%z``) shows whole seconds,
    and a UTC offset changes only on a whole second, so every time within one
    second has the same text.
    """

    def __init__(self) -> None:
        self._last: tuple[int, str] = (-1, "")  # one tuple: threads may log too

    def __call__(self, when: float | None) -> str:
        if when is None:
            return formatTime(when)
        second, text = self._last
        if int(when // 1) != second:
            text = formatTime(when)
            self._last = (int(when // 1), text)
        return text


_timestamp = _Timestamps()


def _fast_text(event: Mapping[str, Any]) -> str:
    """The event's text by ``str.format``, or "" where Twisted's formatter
    must do it (a traceback, flattened or bytes formats, a format that
    ``str.format`` refuses: ``{f()}``, a missing key; or no text at all)."""
    format = event.get("log_format")
    if format.__class__ is str and "log_failure" not in event and "log_flattened" not in event:
        try:
            return format.format_map(event)
        except Exception:  # noqa: BLE001 - Twisted's formatter says what went wrong
            pass
    return ""


def event_text(event: Mapping[str, Any]) -> str:
    """The text of ``event`` (traceback included), as Twisted's
    ``eventAsText`` without timestamp and system."""
    return _fast_text(event) or eventAsText(event, includeTimestamp=False, includeSystem=False)


def classic_text(event: Mapping[str, Any]) -> str | None:
    """The line ``textFileLogObserver`` writes for ``event``, or None for none."""
    text = _fast_text(event)
    if text:
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
        elif system.__class__ is not str:
            return formatEventAsClassicLogText(event, formatTime=_timestamp)
        line = f"{_timestamp(event.get('log_time'))} [{system}] {text}"
        if "\n" in line:
            line = line.replace("\n", "\n\t")
        return line + "\n"
    return formatEventAsClassicLogText(event, formatTime=_timestamp)


def text_file_observer(out: Any) -> FileLogObserver:
    """``textFileLogObserver(out)`` as twistd makes it, writing with ``classic_text``."""
    return FileLogObserver(out, classic_text)


def observer_for(twistd_options: Mapping[str, Any] | None) -> Callable[[], Any] | None:
    """What twistd should log through, as a factory, or None for twistd's own.

    Mirrors ``twisted.scripts._twistd_unix.UnixAppLogger._getLogObserver``
    for its two text logs; the other cases (syslog, a ``--logger``, a daemon
    told to log to stdout, which twistd refuses) stay with twistd.
    """
    if twistd_options is None or twistd_options.get("logger") or twistd_options.get("syslog"):
        return None
    path = twistd_options.get("logfile") or ""
    daemon = not twistd_options.get("nodaemon")
    if path == "-" or not path:
        if daemon:
            if path == "-":
                return None  # twistd exits: "Daemons cannot log to stdout"
            path = "twistd.log"
        else:
            return lambda: text_file_observer(sys.stdout)

    def open_log_file() -> FileLogObserver:
        log_file = logfile.LogFile.fromFullPath(path)
        # As twistd: SIGUSR1 rotates, unless a handler is set already.
        if not signal.getsignal(signal.SIGUSR1):

            def rotate(signum, frame):
                from twisted.internet import reactor

                reactor.callFromThread(log_file.rotate)

            signal.signal(signal.SIGUSR1, rotate)
        return text_file_observer(log_file)

    return open_log_file
