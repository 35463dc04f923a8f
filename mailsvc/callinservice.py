"""``[[callin]]``: call a provider in with ATRN or TURN on a schedule.

``CallInService`` does, inside the running server, what ``mailsvc turn``
does by hand (``mailsvc.callin.call_in``): ``FIRST_DELAY`` seconds after
start (or ``interval``, when shorter), then every ``interval`` seconds, it connects to the provider, says
ATRN or TURN and receives the held mail through the server's receiving path
(``mailsvc.callin.receiving_factory``), each committed message handed at
once to the running queue runner (``submit``). Each run logs one line with
its outcome. Two runs of one entry never overlap: a run that lasts longer
than ``interval`` delays the next one (``task.LoopingCall`` waits for it and
skips the missed ticks). A failure is logged and the next run happens as
usual; nothing is raised into the reactor. Stopping the service cancels the
wait for the first run and a run in progress (whatever was not acknowledged
with 250 stays held at the provider).
"""

from __future__ import annotations

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from mailsvc import callin
from mailsvc.errors import ConfigError, SpoolError
from mailsvc.tls import TLSError
from mailsvc.turnconfig import CallInConfig

FIRST_DELAY = 5.0  # seconds after start: let the listeners and the runner start first


class CallInService(service.Service):
    """Runs one ``[[callin]]`` entry every ``entry.interval`` seconds.

    :param entry: the ``CallInConfig``.
    :param cfg: the whole ``Config`` (receiving path, our EHLO name).
    :param reactor: the clock and connector (``call_in``'s reactor).
    :param submit: the queue runner's ``submit``.
    :param call: ``mailsvc.callin.call_in`` (tests pass a fake).
    :param receiving: ``mailsvc.callin.receiving_factory`` (tests pass a fake).
    :param first_delay: seconds before the first run (0: at start; at most ``interval``).
    """

    def __init__(self, entry: CallInConfig, cfg, reactor, submit, *, call=callin.call_in,
                 receiving=callin.receiving_factory, first_delay: float = FIRST_DELAY) -> None:
        self.log = Logger(namespace="mailsvc.callin")
        self.entry = entry
        self.cfg = cfg
        self.reactor = reactor
        self.submit = submit
        self.call = call
        self.receiving = receiving
        self.first_delay = first_delay
        self.name = f"callin {entry.host}:{entry.port}"
        self.runs = 0  # runs started
        self._loop: task.LoopingCall | None = None
        self._first = None
        self._current: defer.Deferred | None = None

    # ---------------------------------------------------------- service

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.reactor
        self._first = self.reactor.callLater(min(self.first_delay, self.entry.interval), self._begin)

    def stopService(self):
        super().stopService()
        if self._first is not None and self._first.active():
            self._first.cancel()
        self._first = None
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._current is not None:
            self._current.cancel()  # the run logs its own end

    def _begin(self) -> None:
        self._first = None
        self._loop.start(self.entry.interval, now=True)  # never fails: _tick catches everything

    def _tick(self) -> defer.Deferred:
        # Returning the run's Deferred makes LoopingCall wait for it: no overlap.
        self._current = defer.ensureDeferred(self.run_once())
        self._current.addErrback(self._unexpected)
        self._current.addBoth(self._done)
        return self._current

    def _done(self, result):
        self._current = None
        return None

    def _unexpected(self, failure) -> None:
        if failure.check(defer.CancelledError):
            self.log.info("{name}: stopped during the call-in", name=self.name)
        else:
            self.log.failure("{name}: call-in failed unexpectedly", failure, name=self.name)

    # ---------------------------------------------------------- one run

    def options(self) -> callin.CallInOptions:
        """The ``CallInOptions`` of this entry, the password read now.

        :raise CallInFailed: the password file cannot be read or is empty,
            or the CA file is unusable.
        """
        entry = self.entry
        try:
            with open(entry.password_file, encoding="utf-8") as f:
                password = f.readline().rstrip("\r\n")
        except OSError as e:
            raise callin.CallInFailed(f"cannot read the password file: {e}", callin.EX_USAGE) from None
        if not password:
            raise callin.CallInFailed(f"the password file is empty: {entry.password_file}", callin.EX_USAGE)
        tls = None
        if entry.tls != "none":
            cafile = str(entry.ca_file) if entry.ca_file is not None else None
            insecure = entry.tls == "opportunistic" and cafile is None
            try:
                tls = callin.tls_options(entry.host, cafile=cafile, insecure=insecure, tls_name=entry.tls_name)
            except (OSError, TLSError) as e:
                raise callin.CallInFailed(f"cannot use the CA file: {e}", callin.EX_USAGE) from None
        return callin.CallInOptions(
            user=entry.user, password=password, command=entry.command, domains=entry.domains,
            starttls=entry.tls != "none", tls_policy=entry.tls, tls_options=tls,
            helo_name=self.cfg.server.hostname,
        )

    async def run_once(self) -> str:
        """Call in once; log and return the one-line outcome. Never raises
        (but ``CancelledError`` when the service stops)."""
        self.runs += 1
        ids: list[str] = []

        def submit(message) -> None:
            if message.id not in ids:
                ids.append(message.id)
            self.submit(message)

        try:
            options = self.options()
            factory = self.receiving(self.cfg, self.reactor, submit)
            result = await self.call(self.reactor, self.entry.host, self.entry.port, options, factory)
        except callin.CallInFailed as e:
            kept = f" ({len(ids)} message(s) were received and kept)" if ids else ""
            return self._say(f"{self.entry.command} failed: {e}{kept}", warn=True)
        except (ConfigError, SpoolError) as e:
            return self._say(f"cannot receive: {e}", warn=True)
        except defer.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - never crash the server; say it and try next time
            return self._say(f"{self.entry.command} failed: {type(e).__name__}: {e}", warn=True)
        if result.no_mail:
            return self._say(f"no mail waiting ({result.no_mail})")
        count = len(ids)
        received = f"{count} message{'s' if count != 1 else ''} received"
        if not result.quit:
            return self._say(f"the connection broke before QUIT; {received} and kept", warn=True)
        return self._say(received)

    def _say(self, text: str, warn: bool = False) -> str:
        line = f"{self.name}: {text}"
        (self.log.warn if warn else self.log.info)("{line}", line=line)
        return line
