"""The server machine's command handlers: one method per verb.

``CommandParser`` is the half of ``mailsvc.smtp.server.ServerConnection``
that reads one command line and either answers it (syntax 501, sequence 503,
unknown 500, 530 before AUTH...) or returns the event it makes. It works on
the connection's state; it has no state of its own.
"""

from __future__ import annotations

import re

from mailsvc.smtp import events as ev
from mailsvc.smtp.address import AddressError, parse_path_argument
from mailsvc.smtp.help import help_reply
from mailsvc.smtp.parameters import check_mail_parameters, check_rcpt_parameters
from mailsvc.smtp.replies import BAD_SEQUENCE, OK, SYNTAX, Reply
from mailsvc.smtp.server_state import AUTH_REQUIRED, MAIL_VERBS, NEEDS_AUTH, NOT_IMPLEMENTED, ODMR_VERBS, State

# rfc2645 5.2.1 ABNF: domain = sub-domain 1*("." sub-domain), letters, digits, hyphens.
_ATRN_DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+\Z")


class CommandParser:
    """Command handlers, mixed into ``ServerConnection`` (which owns every
    attribute used here: ``state``, ``settings``, ``extended``, ``tls``,
    ``authenticated``, ``_accepted``, ``_attempted``, ``_send``...)."""

    def _command(self, raw: bytes) -> ev.Event | None:
        """Parse one command line; answer it or return the event it makes."""
        if b"\r" in raw or b"\n" in raw:
            # rfc5321 2.3.8: never take a bare CR or LF as a line end.
            self._send(Reply.of(500, "5.5.2", "Bare CR or LF in command line; lines must end with CRLF"))
            return None
        line = raw.decode("utf-8", "replace")
        verb, _, argument = line.partition(" ")
        verb = verb.upper()
        argument = argument.strip(" ")
        if self.state is State.REFUSED and verb != "QUIT":
            self._send(Reply.of(503, BAD_SEQUENCE, "Service refused; only QUIT is allowed"))
            return None
        if self.settings.odmr and verb not in ODMR_VERBS:
            # rfc2645 5.4: an ODMR listener may refuse everything else with 502.
            self._send(Reply.of(502, "5.5.1", f"{verb or 'Command'} not available on the On-Demand Mail Relay service"))
            return None
        if verb in NEEDS_AUTH and self.settings.auth_required and not self.authenticated:
            self._send(AUTH_REQUIRED)
            return None
        handler = _HANDLERS.get(verb)
        if handler is not None:
            return handler(self, verb, argument)
        if verb in MAIL_VERBS:
            return self._mail(verb, argument)
        if verb == "ETRN" and self.settings.etrn:
            return self._etrn(verb, argument)
        if verb == "BDAT" and self.settings.chunking:
            return self._bdat(verb, argument)
        if verb == "ATRN" and self.settings.odmr:
            return self._atrn(verb, argument)
        if verb in NOT_IMPLEMENTED:
            self._send(Reply.of(502, "5.5.1", f"{verb} not implemented"))
            return None
        shown = verb if verb.isascii() and verb.isprintable() and len(verb) <= 20 else "?"
        self._send(Reply.of(500, "5.5.2", f"Command unrecognized: {shown}" if verb else "Empty command"))
        return None

    def _syntax(self, text: str, status: str = SYNTAX, code: int = 501) -> None:
        self._send(Reply.of(code, status, text))

    def _hello(self, verb: str, argument: str) -> ev.Event | None:
        # rfc5321 4.1.1.1: EHLO/HELO take the client's domain or address literal.
        if not argument or " " in argument or not (argument.isascii() and argument.isprintable()):
            self._syntax(f"Syntax: {verb} hostname")
            return None
        return ev.Hello(argument, verb == "EHLO")

    def _hello_bytes(self, hello: ev.Hello) -> bytes:
        """``bytes(self._hello_reply(hello))``; the EHLO keyword lines are made
        once per settings and TLS state (the name has no spaces or CR/LF:
        ``_hello``)."""
        if not hello.extended:
            return bytes(self._hello_reply(hello))
        cache = self.settings.ehlo_keywords
        keywords = cache.get(self.tls)
        if keywords is None:
            wire = bytes(self._hello_reply(ev.Hello("x", True)))
            keywords = cache[self.tls] = wire[wire.index(b"\r\n") + 2 :]
        return f"250-{self.settings.hostname} greets {hello.name}\r\n".encode() + keywords

    def _hello_reply(self, hello: ev.Hello) -> Reply:
        greeting = f"{self.settings.hostname} greets {hello.name}"
        if not hello.extended:
            return Reply.of(250, "", greeting)
        size = self.settings.max_message_size
        keywords = [
            "PIPELINING",  # rfc2920
            f"SIZE {size}" if size else "SIZE",  # rfc1870
            "8BITMIME",  # rfc6152 (rfc6531 3.1 (8): needed by SMTPUTF8)
            *(["SMTPUTF8"] if self.settings.smtputf8 else []),  # rfc6531 3.1
            "ENHANCEDSTATUSCODES",  # rfc2034
            "DSN",  # rfc3461
            *(["CHUNKING"] if self.settings.chunking else []),  # rfc3030
            *self.settings.extensions,
            *(["ETRN"] if self.settings.etrn else []),  # rfc1985 2
            *(["ATRN"] if self.settings.odmr else []),  # rfc2645 5.1.1
            *(["STARTTLS"] if self.settings.starttls and not self.tls else []),  # rfc3207 4.2
            *([f"AUTH {' '.join(self.offered_mechanisms)}"] if self.offered_mechanisms else []),  # rfc4954 3
            "HELP",
        ]
        return Reply.of(250, "", greeting, *keywords)

    def _mail(self, verb: str, argument: str) -> ev.Event | None:
        if self.state is State.GREETED:
            self._send(Reply.of(503, BAD_SEQUENCE, "Send HELO or EHLO first"))
            return None
        if self.state in (State.MAIL, State.BDAT):
            self._send(Reply.of(503, BAD_SEQUENCE, "Sender already given; RSET first"))
            return None
        utf8 = self.settings.smtputf8
        try:
            path = parse_path_argument(argument, "FROM", null_allowed=True, postmaster_allowed=False, utf8=utf8)
        except AddressError as error:
            self._address_error(error, "5.1.7", 550)  # rfc3463: bad sender address syntax
            return None
        refusal = check_mail_parameters(
            path.parameters,
            extended=self.extended,
            max_size=self.settings.max_message_size,
            auth=bool(self.settings.auth_mechanisms),
            smtputf8=utf8,
        )
        if refusal is not None:
            self._send(refusal)
            return None
        if not path.address.isascii() and "SMTPUTF8" not in path.parameters:
            # rfc6531 3.5: 550 5.6.7 for a MAIL that needs SMTPUTF8 and lacks it.
            self._send(Reply.of(550, "5.6.7", "Must declare SMTPUTF8 to send a non-ASCII address"))
            return None
        self._reset_transaction()
        return ev.MailFrom(path.address, path.parameters, verb)

    def _address_error(self, error: AddressError, status: str, utf8_code: int) -> None:
        if error.status == "5.6.7":
            # rfc6531 3.5: non-ASCII not permitted: 550 for MAIL, 553 for RCPT.
            self._send(Reply.of(utf8_code, "5.6.7", str(error)))
        else:
            self._syntax(f"Syntax error: {error}", error.status or status)

    def _rcpt(self, verb: str, argument: str) -> ev.Event | None:
        if self.state is not State.MAIL:
            self._send(Reply.of(503, BAD_SEQUENCE, "Need MAIL before RCPT"))
            return None
        try:
            path = parse_path_argument(
                argument, "TO", null_allowed=False, postmaster_allowed=True, utf8=self.smtputf8_transaction
            )
        except AddressError as error:
            self._address_error(error, "5.1.3", 553)  # rfc3463: bad destination syntax
            return None
        if path.parameters:
            refusal = check_rcpt_parameters(path.parameters, extended=self.extended)
            if refusal is not None:
                self._send(refusal)
                return None
        if self._accepted >= self.settings.max_recipients:
            # rfc5321 4.5.3.1.10: "452 too many recipients"; the client sends the rest later.
            self._send(Reply.of(452, "4.5.3", f"Too many recipients ({self.settings.max_recipients} at most)"))
            return None
        self._attempted += 1
        return ev.RcptTo(path.address, path.parameters)

    def _data(self, verb: str, argument: str) -> ev.Event | None:
        if argument:
            self._syntax("DATA takes no argument")
        elif self.state is not State.MAIL:
            self._send(Reply.of(503, BAD_SEQUENCE, "Need MAIL before DATA"))
        elif self._accepted == 0 and self._attempted == 0:
            self._send(Reply.of(503, BAD_SEQUENCE, "Need RCPT before DATA"))
        elif self._accepted == 0:
            # rfc2920 3.1: DATA after every RCPT failed gets 554.
            self._send(Reply.of(554, "5.5.1", "No valid recipients"))
        else:
            return ev.DataCommand()
        return None

    def _bdat(self, verb: str, argument: str) -> ev.Event | None:
        # rfc3030 2: bdat-cmd = "BDAT" SP chunk-size [ SP end-marker ]; the
        # octets follow the command line whatever the reply will be.
        words = argument.split(" ")
        size_text = words[0]
        if (
            len(words) > 2
            or not (size_text.isascii() and size_text.isdigit())
            or len(size_text) > 15
            or (len(words) == 2 and words[1].upper() != "LAST")
        ):
            # Without a size there is no telling where the data ends: what
            # follows is read as commands (rfc3030 2, last note).
            self._syntax("Syntax: BDAT chunk-size [LAST]")
            return None
        return self._start_chunk(int(size_text), len(words) == 2)

    def _rset(self, verb: str, argument: str) -> ev.Event | None:
        if argument:
            self._syntax("RSET takes no argument")
            return None
        self._reset_transaction()  # rfc5321 4.1.1.5
        self._send(OK)
        return ev.Reset()

    def _noop(self, verb: str, argument: str) -> ev.Event | None:
        self._send(OK)  # rfc5321 4.1.1.9: any argument is ignored
        return None

    def _quit(self, verb: str, argument: str) -> ev.Event | None:
        if argument:
            self._syntax("QUIT takes no argument")
            return None
        # rfc5321 4.1.1.10: 221, then close.
        self._send(self.settings.goodbye)
        self._enter_closed()
        return ev.Quit()

    def _help(self, verb: str, argument: str) -> ev.Event | None:
        self._send(help_reply(argument))  # rfc5321 4.1.1.8
        return None

    def _vrfy(self, verb: str, argument: str) -> ev.Event | None:
        argument, utf8 = self._query_argument(argument)
        if not argument:
            self._syntax("Syntax: VRFY user-or-address [SMTPUTF8]" if self.settings.smtputf8 else "Syntax: VRFY user-or-address")
            return None
        return ev.Verify(argument, utf8)  # rfc5321 3.5.1, 4.1.1.6

    def _expn(self, verb: str, argument: str) -> ev.Event | None:
        argument, utf8 = self._query_argument(argument)
        if not argument:
            self._syntax("Syntax: EXPN list [SMTPUTF8]" if self.settings.smtputf8 else "Syntax: EXPN list")
            return None
        return ev.Expand(argument, utf8)  # rfc5321 3.5.2, 4.1.1.7

    def _query_argument(self, argument: str) -> tuple[str, bool]:
        """VRFY/EXPN's string and whether it ends with ``SP "SMTPUTF8"``
        (rfc6531 3.7.4.2), when SMTPUTF8 is offered."""
        string, space, last = argument.rpartition(" ")
        if self.settings.smtputf8 and space and last.upper() == "SMTPUTF8":
            return string.rstrip(" "), True
        return argument, False

    def _turn(self, verb: str, argument: str) -> ev.Event | None:
        if argument:
            self._syntax("TURN takes no argument")
            return None
        if self.state is State.MAIL:
            # rfc821 4.3: 503 is TURN's error reply; no role change mid-transaction.
            self._send(Reply.of(503, BAD_SEQUENCE, "TURN is not allowed during a mail transaction"))
            return None
        return ev.Turn()  # rfc821 4.1.1

    def _atrn(self, verb: str, argument: str) -> ev.Event | None:
        # rfc2645 5.2.1: ATRN [SP domain *("," domain)], only once authenticated (530).
        if not self.authenticated:
            self._send(Reply.of(530, "5.7.0", "Authentication required: ATRN is for an authenticated customer only"))
            return None
        if self.state is not State.READY:
            self._send(Reply.of(503, BAD_SEQUENCE, "Send EHLO first" if self.state is State.GREETED else "ATRN is not allowed now"))
            return None
        domains: list[str] = []
        for name in (argument.split(",") if argument else []):
            name = name.strip().lower().removesuffix(".")
            if not _ATRN_DOMAIN.match(name) or len(name) > 253:
                self._syntax("Syntax: ATRN [domain[,domain...]]")
                return None
            if name not in domains:
                domains.append(name)
        return ev.Atrn(tuple(domains))

    def _etrn(self, verb: str, argument: str) -> ev.Event | None:
        # rfc1985 5: ETRN [option]node, never inside a transaction.
        if self.state is State.MAIL:
            self._send(Reply.of(503, BAD_SEQUENCE, "ETRN is not allowed during a mail transaction"))
            return None
        if self.state is State.GREETED:
            self._send(Reply.of(503, BAD_SEQUENCE, "Send HELO or EHLO first"))
            return None
        option, node = (argument[:1], argument[1:]) if argument[:1] in ("@", "#") else ("", argument)
        if not node or " " in node or len(node) > 255 or not (node.isascii() and node.isprintable()):
            # rfc1985 5.1: 500/501 for syntax; 501 5.5.4 for the parameter.
            self._syntax("Syntax: ETRN [@|#]node")
            return None
        return ev.Etrn(node, option)

    def _starttls(self, verb: str, argument: str) -> ev.Event | None:
        if self.tls:
            self._send(Reply.of(503, BAD_SEQUENCE, "TLS already active"))
        elif argument:
            self._syntax("Syntax: STARTTLS (no parameters allowed)")  # rfc3207 4
        elif not self.settings.starttls:
            self._send(Reply.of(454, "4.7.0", "TLS not available"))  # rfc3207 4
        else:
            return ev.StartTLS()
        return None

    def _auth(self, verb: str, argument: str) -> ev.Event | None:
        settings = self.settings
        if not settings.auth_mechanisms:
            self._send(Reply.of(502, "5.5.1", "AUTH not implemented"))
            return None
        words = argument.split(" ")
        if not argument or len(words) > 2:
            self._syntax("Syntax: AUTH mechanism [initial-response]")
        elif self.authenticated:
            self._send(Reply.of(503, BAD_SEQUENCE, "Already authenticated"))  # rfc4954 4
        elif self.state is State.MAIL:
            self._send(Reply.of(503, BAD_SEQUENCE, "AUTH is not allowed during a mail transaction"))
        elif self.state is not State.READY or not self.extended:
            self._send(Reply.of(503, BAD_SEQUENCE, "Send EHLO first"))
        elif words[0].upper() not in settings.auth_mechanisms:
            self._send(Reply.of(504, "5.5.4", "Unrecognized authentication mechanism"))
        elif words[0].upper() not in self.offered_mechanisms:
            # rfc4954 6: 538, for a mechanism that needs an encrypted connection.
            self._send(Reply.of(538, "5.7.11", "Encryption required for requested authentication mechanism"))
        else:
            return ev.Auth(words[0].upper(), words[1] if len(words) == 2 else None)
        return None

    def _auth_response(self, raw: bytes) -> ev.Event | None:
        """One line inside an AUTH exchange: ``*`` cancels, anything else is for the mechanism."""
        line = raw.decode("ascii", "replace")
        if line == "*":
            # rfc4954 4: the client cancels; the server MUST answer 501.
            self.state = State.READY
            self._send(Reply.of(501, "5.7.0", "Authentication cancelled"))
            return ev.AuthCancelled()
        return ev.AuthResponse(line)


_HANDLERS = {
    "MAIL": CommandParser._mail,  # the other MAIL_VERBS are looked up after these
    "HELO": CommandParser._hello,
    "EHLO": CommandParser._hello,
    "RCPT": CommandParser._rcpt,
    "DATA": CommandParser._data,
    "RSET": CommandParser._rset,
    "NOOP": CommandParser._noop,
    "QUIT": CommandParser._quit,
    "HELP": CommandParser._help,
    "VRFY": CommandParser._vrfy,
    "EXPN": CommandParser._expn,
    "TURN": CommandParser._turn,
    "STARTTLS": CommandParser._starttls,
    "AUTH": CommandParser._auth,
}
