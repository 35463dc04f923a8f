"""``mailsvc sendmail``: a message from stdin into the spool, as ``/usr/sbin/sendmail``.

The pieces are pure where they can be: ``parse_args`` reads the sendmail
command line, ``read_lines`` turns the input into lines (LF or CRLF; bare
CR and over-long lines refused), ``read_header`` separates the header
section, ``header_recipients`` reads To/Cc/Bcc for ``-t``, ``fix_header``
removes Bcc and adds what is missing (rfc6409 8, rfc5322 3.6).
``queue_message`` streams the result into a spool writer and commits it;
``mailsvc.cli`` strings them together.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import format_datetime, formataddr, getaddresses

from twisted.internet import defer

from mailsvc.delivery import router
from mailsvc.envelope import Envelope, Recipient
from mailsvc.smtp.address import AddressError, check_mailbox

MAX_LINE = 998  # rfc5322 2.1.1: at most 998 characters, excluding the CRLF
MAX_HEADER_SECTION = 1024 * 1024  # bounded memory: the header is read whole

# rfc5322 2.2 / 3.6.8: a field name is printable US-ASCII but ":", then ":".
_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")

# Options of Postfix's sendmail(1) that take a value (getopt "B:C:F:L:N:O:R:V:X:b:e:f:h:o:p:q:r:").
_WITH_VALUE = frozenset("BCFLNORVXbefhopqr")
# Options taking no value; those with no effect here are accepted and ignored.
_FLAGS = frozenset("GIUcimntvx")


class InputError(ValueError):
    """The message (or a recipient address) cannot be accepted (exit status 1)."""


class UsageError(ValueError):
    """The command line is wrong (exit status 64, EX_USAGE)."""


class UnknownUser(LookupError):
    """A local recipient does not exist (exit status 67, EX_NOUSER)."""


@dataclass
class SendmailOptions:
    """What the sendmail command line asked for."""

    recipients: list[str] = field(default_factory=list)
    extract: bool = False  # -t: recipients from To/Cc/Bcc
    dot_ends: bool = True  # a lone "." line ends input, unless -i / -oi
    sender: str | None = None  # -f / -r
    full_name: str | None = None  # -F
    config: str | None = None  # -C / --config
    verbose: bool = False  # -v: say the queue ID on stderr


def parse_args(argv: Iterable[str]) -> SendmailOptions:
    """Parse a sendmail command line, as getopt(3) would (options anywhere, ``--`` ends them).

    Accepted and ignored: ``-B``, ``-N``, ``-R``, ``-V``, ``-L``, ``-O``,
    ``-h``, ``-p``, ``-o`` other than ``-oi``, ``-e``, ``-bm``, and the flags
    ``-G -U -c -m -n -x``. :raise UsageError: an unknown or unsupported option.
    """
    options = SendmailOptions()
    args = list(argv)
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if arg == "--":
            options.recipients.extend(args[index:])
            break
        if arg == "--config" or arg.startswith("--config="):
            if "=" in arg:
                options.config = arg.partition("=")[2]
            elif index < len(args):
                options.config, index = args[index], index + 1
            else:
                raise UsageError("--config needs a file name")
            continue
        if not arg.startswith("-") or arg == "-":
            options.recipients.append(arg)
            continue
        if arg.startswith("--"):
            raise UsageError(f"unknown option {arg}")
        letters = arg[1:]
        while letters:
            letter, letters = letters[0], letters[1:]
            if letter in _FLAGS:
                if letter == "t":
                    options.extract = True
                elif letter == "i":
                    options.dot_ends = False
                elif letter == "v":
                    options.verbose = True
                elif letter == "I":
                    raise UsageError("-I (newaliases) is not supported: aliases live in the config")
                continue
            if letter not in _WITH_VALUE:
                raise UsageError(f"unknown option -{letter}")
            if letters:
                value, letters = letters, ""
            elif index < len(args):
                value, index = args[index], index + 1
            else:
                raise UsageError(f"option -{letter} needs a value")
            _apply(options, letter, value)
    return options


def _apply(options: SendmailOptions, letter: str, value: str) -> None:
    if letter in "fr":
        options.sender = value
    elif letter == "F":
        options.full_name = value
    elif letter == "C":
        options.config = value
    elif letter == "o" and value == "i":
        options.dot_ends = False
    elif letter == "b" and value != "m":
        raise UsageError(f"-b{value} is not supported (only -bm, deliver mail)")
    elif letter == "q":
        raise UsageError("-q is not supported: use `mailsvc queue flush`")
    elif letter == "X":
        raise UsageError("-X (traffic log) is not supported")


# ---------------------------------------------------------------- reading


def read_lines(stream, dot_ends: bool = True) -> Iterator[bytes]:
    """The lines of ``stream`` (binary), without their line ends.

    A line ends with LF or CRLF; the last may have no line end. With
    ``dot_ends``, a line holding only ``.`` ends the input (sendmail's
    habit; ``-i`` turns it off). Streams: one line in memory at a time.

    :raise InputError: a bare CR (rfc5322 2.3; DESIGN rule 2: it would be read
        differently by different software) or a line longer than 998
        octets (rfc5322 2.1.1).
    """
    number = 0
    while True:
        raw = stream.readline(MAX_LINE + 3)
        if not raw:
            return
        number += 1
        line = raw
        if raw.endswith(b"\n"):
            line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
        if len(line) > MAX_LINE:
            raise InputError(f"line {number} is longer than {MAX_LINE} octets (rfc5322 2.1.1)")
        if b"\r" in line:
            raise InputError(f"line {number} holds a bare CR (carriage return without line feed)")
        if dot_ends and line == b".":
            return
        yield line


@dataclass
class Header:
    """A message's header section, as read by ``read_header``.

    ``fields``: each field as the list of its physical lines (first line,
    then continuation lines), without line ends. ``body_head``: lines read
    past the header that belong to the body (a first body line met without
    an empty line before it).
    """

    fields: list[list[bytes]]
    body_head: list[bytes]

    def names(self) -> set[str]:
        """The field names present, lower case."""
        return {_name(f) for f in self.fields}

    def values(self, name: str) -> list[str]:
        """The unfolded values of every field called ``name`` (rfc5322 2.2.3)."""
        return [
            b"".join(f)[len(name) + 1 :].decode("utf-8", "surrogateescape").strip()
            for f in self.fields
            if _name(f) == name.lower()
        ]


def _name(field_lines: list[bytes]) -> str:
    return field_lines[0].partition(b":")[0].decode("ascii").lower()


def read_header(lines: Iterator[bytes]) -> Header:
    """Read the header section from ``lines``, leaving the body on it.

    The section ends at the first empty line (consumed), or at the first line
    that is neither a field nor a continuation line (it becomes the body's
    first line). A leading ``From `` line (an mbox postmark) is dropped.

    :raise InputError: the header section is larger than 1 MiB.
    """
    fields: list[list[bytes]] = []
    size = 0
    first = True
    for line in lines:
        if first and line.startswith(b"From "):
            first = False
            continue
        first = False
        if not line:
            return Header(fields, [])
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        elif _FIELD.match(line):
            fields.append([line])
        else:
            return Header(fields, [line])
        size += len(line) + 2
        if size > MAX_HEADER_SECTION:
            raise InputError("the header section is larger than 1 MiB")
    return Header(fields, [])


def header_recipients(header: Header) -> list[str]:
    """The addresses in To, Cc and Bcc (for ``-t``), in order, groups flattened.

    :raise InputError: one of them is not a usable address.
    """
    values = [v for name in ("to", "cc", "bcc") for v in header.values(name)]
    return parse_addresses(values)


def parse_addresses(texts: Iterable[str]) -> list[str]:
    """The addresses in ``texts`` (rfc5322 address lists, or bare addresses).

    A bare local part (``alice``) is kept as it is: the caller qualifies it.
    :raise InputError: an address is malformed.
    """
    found = []
    for name, address in getaddresses(list(texts)):
        if not address:
            continue  # an empty group such as "undisclosed-recipients:;"
        if "@" in address:
            try:
                check_mailbox(address, utf8=True)  # rfc6531 3.3: UTF-8 addresses are queued with SMTPUTF8
            except AddressError as e:
                raise InputError(f"bad address <{address}>: {e}") from None
        elif not re.fullmatch(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+", address):
            raise InputError(f"bad address <{address}>")
        found.append(address)
    return found


def fix_header(
    header: Header,
    *,
    sender: str,
    full_name: str,
    message_id: str,
    hostname: str,
    now: float,
) -> list[bytes]:
    """The header lines to write: Bcc removed (rfc5322 3.6.3, its first
    way), then ``From``, ``Date`` and ``Message-ID`` added when missing
    (rfc5322 3.6 requires From and Date; rfc6409 8.2, 8.3 let a submission
    agent add Date and Message-ID).

    ``sender`` is the ``From`` address, ``message_id`` the left part of the
    new Message-ID (the queue ID), ``now`` the POSIX time for Date (local time).
    """
    out = [line for f in header.fields if _name(f) != "bcc" for line in f]
    present = header.names()
    if "from" not in present:
        out.append(b"From: " + formataddr((full_name, sender)).encode("utf-8"))
    if "date" not in present:
        date = format_datetime(datetime.fromtimestamp(now, timezone.utc).astimezone())
        out.append(b"Date: " + date.encode("ascii"))
    if "message-id" not in present:
        out.append(f"Message-ID: <{message_id}@{hostname}>".encode("ascii"))
    return out


def received_header(login: str, hostname: str, message_id: str, now: float) -> str:
    """The trace line of a locally submitted message (rfc5321 4.4)."""
    date = format_datetime(datetime.fromtimestamp(now, timezone.utc).astimezone())
    return f"Received: (from {login}) by {hostname} (mailsvc) with local id {message_id}; {date}"


def qualify(address: str, domain: str) -> str:
    """``address``, with ``@domain`` added when it is a bare local part."""
    return address if "@" in address else f"{address}@{domain}"


@defer.inlineCallbacks
def resolve(directory, addresses: Iterable[str]):
    """The envelope recipients for ``addresses`` (qualified), as the server's
    receiver makes them: local users and aliases expanded to mailboxes (one
    copy per mailbox), other domains left for the relay hop.

    :raise UnknownUser: a local address that is nobody's.
    """
    recipients: list[Recipient] = []
    known: set[str] = set()
    for address in addresses:
        found = yield router.recipients_for(directory, address)
        if found is None:
            raise UnknownUser(f"<{address}>: no such user here")
        for recipient in found:
            if recipient.address.lower() not in known:  # rfc5321 3.3: one copy each
                known.add(recipient.address.lower())
                recipients.append(recipient)
    return recipients


def queue_message(
    spool,
    header: Header,
    body: Iterable[bytes],
    recipients: list[Recipient],
    *,
    sender: str,
    from_address: str,
    full_name: str,
    login: str,
    hostname: str,
    now: float,
) -> list:
    """Queue the message: ``header`` fixed up (``fix_header``), an empty
    line, the body, all with CRLF line ends, streamed into a new spool
    message, committed under the hops of ``recipients``. Blocking.

    ``sender`` is the envelope sender (``""`` for ``<>``), ``from_address``
    the address for a missing From. The envelope gets a ``Received:`` trace
    line and, if the data has 8-bit octets, ``BODY=8BITMIME`` (rfc6152);
    ``SMTPUTF8`` (rfc6531 3.4) if an address or a header line is not ASCII,
    as Postfix's sendmail detects it.

    :return: the ``QueuedMessage`` per hop.
    :raise InputError: the body was refused while read; nothing is queued.
    :raise mailsvc.errors.SpoolError: the spool failed; nothing is queued.
    """
    writer = spool.newMessage()
    try:
        lines = fix_header(
            header, sender=from_address, full_name=full_name, message_id=writer.id, hostname=hostname, now=now
        )
        eight_bit = False
        chunk = bytearray()
        for line in _chain(lines, [b""], header.body_head, body):
            chunk += line
            chunk += b"\r\n"
            eight_bit = eight_bit or not line.isascii()
            if len(chunk) >= 65536:
                writer.write(bytes(chunk))
                chunk.clear()
        writer.write(bytes(chunk))
        parameters = [("BODY", "8BITMIME")] if eight_bit else []
        addresses = [sender, *(r.address for r in recipients)]
        if not all(a.isascii() for a in addresses) or not all(line.isascii() for line in lines):
            parameters.append(("SMTPUTF8", ""))
        envelope = Envelope(
            sender=sender,
            recipients=tuple(recipients),
            parameters=tuple(parameters),
            protocol="local",
            received_at=now,
            prepend_headers=(received_header(login, hostname, writer.id, now),),
        )
        return writer.commit(envelope, router.routes(recipients))
    except BaseException:
        writer.abort()
        raise


def _chain(*parts: Iterable[bytes]) -> Iterator[bytes]:
    for part in parts:
        yield from part
