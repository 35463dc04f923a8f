"""8-bit to 7-bit conversion of a MIME message, for a peer without 8BITMIME.

rfc6152 3: a server that received 8-bit data and must hand it to a server
without 8BITMIME either converts it to 7-bit MIME (rfc2045) or returns it
with 5.6.3. ``downgrade`` converts what MIME allows and raises
``CannotDowngrade`` for the rest, so the caller bounces.

What it does, over the message's bytes (a small MIME walker; no
``email.generator``, so nothing is refolded or re-serialized):

- The message must be MIME (a ``MIME-Version`` header) unless its body is
  7-bit already (then it is copied as it is).
- Each leaf part whose body holds 8-bit octets, or that is declared
  ``8bit`` or ``binary``, is re-encoded: ``text/*`` as quoted-printable,
  anything else as base64 (rfc2045 6.7, 6.8: lines of at most 76
  characters); its ``Content-Transfer-Encoding`` field is replaced (or
  added at the end of the part's header section).
- ``multipart/*`` parts are walked; ``message/rfc822`` parts too (their
  inner message is converted the same way). rfc2045 6.4: a composite type
  is only ever 7bit, 8bit or binary, so a container that was ``8bit`` or
  ``binary`` becomes ``7bit``. An 8-bit preamble or epilogue is dropped
  (rfc2046 5.1.1: both are to be ignored).
- 8-bit octets in any header section cannot be fixed without rfc2047
  encoded words, which is not done: ``CannotDowngrade``. So are a non-MIME
  8-bit message, 8-bit octets in a part already declared base64 or
  quoted-printable or in an encoding we do not know, and a message over
  ``limit`` octets.

Everything else is kept byte for byte: header lines other than the changed
``Content-Transfer-Encoding`` fields, 7-bit parts, boundaries, line ends.
The message is read whole (at most ``limit`` octets): simple first.
"""

from __future__ import annotations

import base64
import re
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import BinaryIO

_8BIT = re.compile(rb"[\x80-\xff]")
_CRLF = b"\r\n"
# rfc2045 6.7: encoded lines of at most 76 characters; base64: 57 octets a line.
_QP_LINE = 76
_B64_OCTETS = 57
# rfc2045 6.7 (2): printable characters stand for themselves, except "=".
_QP_LITERAL = frozenset(range(33, 127)) - {ord("=")}


class CannotDowngrade(Exception):
    """The message cannot be made 7-bit; ``reason`` says why (for the bounce)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def downgrade(source: BinaryIO, dest: BinaryIO, limit: int) -> None:
    """Write ``source``'s message to ``dest`` with every 8-bit part re-encoded
    to 7-bit (see the module docstring).

    :param limit: the most octets read; a larger message is not converted.
    :raise CannotDowngrade: the message cannot be made 7-bit.
    """
    data = source.read(limit + 1)
    if len(data) > limit:
        raise CannotDowngrade(f"too large to convert (more than {limit} octets)")
    dest.write(downgrade_bytes(data))


def downgrade_bytes(data: bytes) -> bytes:
    """The 7-bit form of the message ``data`` (wire form, CRLF line ends).

    :raise CannotDowngrade: it cannot be made 7-bit.
    """
    out = _entity(data, "text/plain", message=True)
    if _8BIT.search(out):
        # A safety net: whatever the walk left 8-bit cannot be encoded by MIME.
        raise CannotDowngrade("8-bit octets where MIME cannot encode them")
    return out


# ---------------------------------------------------------------- entities


def _split(data: bytes) -> tuple[bytes, bytes, bytes] | None:
    """``(header section, blank line, body)`` of an entity; ``None`` when
    there is no blank line (all header, no body). The header section keeps
    the line end of its last line."""
    if data.startswith((b"\r\n", b"\n")):
        blank = data[: 2 if data.startswith(b"\r\n") else 1]
        return b"", blank, data[len(blank) :]
    found = re.search(rb"\n(\r?\n)", data)
    if found is None:
        return None
    return data[: found.start() + 1], found.group(1), data[found.end() :]


def _fields(header: bytes) -> list[bytes]:
    """The header section as a list of fields, each with its continuation
    lines and line ends (rfc5322 2.2.3), so that joining gives it back."""
    fields: list[bytes] = []
    for line in header.splitlines(keepends=True):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def _name(field: bytes) -> bytes:
    return field.partition(b":")[0].strip().lower()


def _with_cte(header: bytes, encoding: str) -> bytes:
    """``header`` with its Content-Transfer-Encoding field(s) replaced by one
    saying ``encoding`` (added at the end when there was none)."""
    line = b"Content-Transfer-Encoding: " + encoding.encode("ascii") + _CRLF
    out, done = [], False
    for field in _fields(header):
        if _name(field) == b"content-transfer-encoding":
            if not done:
                out.append(line)
                done = True
            continue
        out.append(field)
    if not done:
        if out and not out[-1].endswith(b"\n"):
            out[-1] += _CRLF
        out.append(line)
    return b"".join(out)


def _entity(data: bytes, default_type: str, message: bool = False) -> bytes:
    """One entity, converted: a body part, or with ``message`` a whole
    message (the top one or a message/rfc822 part's), which must be MIME to
    be changed."""
    parts = _split(data)
    header, blank, body = parts if parts is not None else (data, b"", b"")
    if _8BIT.search(header):
        raise CannotDowngrade("8-bit octets in a header field (rfc2047 encoding is not done)")
    if parts is None:
        return data
    fields = BytesHeaderParser(policy=compat32).parsebytes(header + b"\r\n")
    fields.set_default_type(default_type)
    cte = (fields.get("Content-Transfer-Encoding") or "7bit").strip().lower()
    eight_bit_body = _8BIT.search(body) is not None
    if message and "MIME-Version" not in fields:
        if eight_bit_body:
            raise CannotDowngrade("8-bit text in a message that is not MIME")
        return data
    ctype = fields.get_content_type()
    maintype = ctype.partition("/")[0]
    if maintype == "multipart" or ctype == "message/rfc822":
        if not eight_bit_body and cte not in ("8bit", "binary"):
            return data
        if cte not in ("7bit", "8bit", "binary"):
            raise CannotDowngrade(f"a {ctype} part declared {cte} (rfc2045 6.4)")
        if maintype == "multipart":
            boundary = fields.get_param("boundary")
            if not isinstance(boundary, str) or not boundary:
                raise CannotDowngrade(f"a {ctype} part without a boundary")
            digest = ctype == "multipart/digest"
            body = _multipart(body, boundary.encode("ascii", "replace"), "message/rfc822" if digest else "text/plain")
        else:
            body = _entity(body, "text/plain", message=True)
        if cte != "7bit":
            header = _with_cte(header, "7bit")  # rfc2045 6.4: 7bit, 8bit or binary; now 7bit
        return header + blank + body
    if maintype == "message" and eight_bit_body:
        raise CannotDowngrade(f"8-bit octets in a {ctype} part (it must be 7bit)")
    if not eight_bit_body and cte not in ("8bit", "binary"):
        return data
    if cte in ("quoted-printable", "base64"):
        raise CannotDowngrade(f"8-bit octets in a part declared {cte}")
    if cte not in ("7bit", "8bit", "binary"):
        raise CannotDowngrade(f"8-bit octets in a part with the unknown encoding {cte!r}")
    if maintype == "text":
        return _with_cte(header, "quoted-printable") + blank + quoted_printable(body)
    return _with_cte(header, "base64") + blank + base64_lines(body)


def _multipart(body: bytes, boundary: bytes, default_type: str) -> bytes:
    """A multipart body with each of its parts converted (rfc2046 5.1.1).

    The CRLF before a delimiter line belongs to the delimiter, not to the
    part; delimiters, preamble and epilogue are kept as they were (an 8-bit
    preamble or epilogue is dropped). Without a close delimiter the last
    part runs to the end of the body."""
    dash = b"--" + boundary
    delimiters = []  # (start, end) of each delimiter line, line end included
    closed = False
    position = 0
    for line in body.splitlines(keepends=True):
        start, position = position, position + len(line)
        text = line.rstrip(b"\r\n")
        if not text.startswith(dash):
            continue
        rest = text[len(dash) :]
        closing = rest.startswith(b"--")
        if rest[2 if closing else 0 :].strip(b" \t"):
            continue  # a longer line that only starts like the boundary
        delimiters.append((start, position))
        if closing:
            closed = True
            break
    if not delimiters:
        raise CannotDowngrade("a multipart body without its boundary")
    preamble = body[: delimiters[0][0]]
    out = [b"" if _8BIT.search(preamble) else preamble]
    for (start, end), (next_start, _) in zip(delimiters, delimiters[1:]):
        out.append(body[start:end])
        part_end = next_start
        for ending in (b"\r\n", b"\n"):
            if body[end:part_end].endswith(ending):
                part_end -= len(ending)
                break
        out.append(_entity(body[end:part_end], default_type))
        out.append(body[part_end:next_start])
    out.append(body[delimiters[-1][0] : delimiters[-1][1]])
    rest = body[delimiters[-1][1] :]
    if closed:
        out.append(b"" if _8BIT.search(rest) else rest)  # the epilogue
    elif rest:
        out.append(_entity(rest, default_type))
    return b"".join(out)


# ---------------------------------------------------------------- encodings


def quoted_printable(body: bytes) -> bytes:
    """``body`` in quoted-printable (rfc2045 6.7): CRLF pairs stay line
    breaks; every other octet outside printable ASCII, and "=", is ``=XX``;
    a space or tab at the end of a line is encoded; lines are cut with soft
    line breaks so that none is longer than 76 characters."""
    lines = body.split(_CRLF)
    return _CRLF.join(_qp_line(line) for line in lines)


def _qp_line(line: bytes) -> bytes:
    tokens = []
    last = len(line) - 1
    for i, octet in enumerate(line):
        if octet in _QP_LITERAL or (octet in (9, 32) and i != last):
            tokens.append(bytes((octet,)))
        else:
            tokens.append(b"=%02X" % octet)
    out, current = [], b""
    for token in tokens:
        # At most 75 characters and the soft line break "=" (rfc2045 6.7 (5)).
        if len(current) + len(token) > _QP_LINE - 1:
            out.append(current + b"=")
            current = b""
        current += token
    out.append(current)
    return _CRLF.join(out)


def base64_lines(body: bytes) -> bytes:
    """``body`` in base64 (rfc2045 6.8), 76 characters a line, CRLF between
    lines, and a final CRLF when ``body`` ended with one."""
    lines = [base64.b64encode(body[i : i + _B64_OCTETS]) for i in range(0, len(body), _B64_OCTETS)]
    return _CRLF.join(lines) + (_CRLF if body.endswith(_CRLF) else b"")
