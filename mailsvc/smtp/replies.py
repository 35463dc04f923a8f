"""SMTP replies: a code, an enhanced status code, and text lines.

rfc5321 4.2: a reply is a three-digit code and text; multi-line replies repeat
the code with a hyphen on every line but the last. rfc2034 3 (with rfc3463
codes): every 2xx, 4xx and 5xx line carries the enhanced status code, except
the greeting and the success reply to HELO/EHLO; 3xx lines never do.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    """One SMTP reply. ``enhanced`` is ``""`` where rfc2034 3 leaves it out.

    ``utf8`` lets UTF-8 text go on the wire as it is; otherwise non-ASCII
    characters are sent as ``\\x{HEX}`` (``shown``): rfc6531 3.7.4.2 allows
    UTF-8 in replies only where the client asked for it (VRFY/EXPN SMTPUTF8).
    """

    code: int
    enhanced: str
    lines: tuple[str, ...]
    utf8: bool = False

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"reply code out of range: {self.code}")
        if self.enhanced and self.enhanced[0] != str(self.code)[0]:
            # rfc2034 3: the class of the status code agrees with the reply code.
            raise ValueError(f"{self.enhanced} does not agree with {self.code}")
        for line in self.lines:
            if "\r" in line or "\n" in line:
                raise ValueError("reply text may not contain CR or LF")

    @classmethod
    def of(cls, code: int, enhanced: str, *lines: str, utf8: bool = False) -> "Reply":
        """A reply from a code, an enhanced code and one or more text lines."""
        return cls(code, enhanced, tuple(lines) or ("",), utf8)

    @property
    def positive(self) -> bool:
        """True for 2xx and 3xx replies."""
        return self.code < 400

    @property
    def transient(self) -> bool:
        """True for 4xx replies."""
        return 400 <= self.code < 500

    def __bytes__(self) -> bytes:
        # Computed once per Reply (the constant ones are sent in every session);
        # kept outside the fields, so equality and hashing ignore it.
        wire = self.__dict__.get("_wire")
        if wire is None:
            wire = self._wire_form()
            object.__setattr__(self, "_wire", wire)
        return wire

    def _wire_form(self) -> bytes:
        out = []
        last = len(self.lines) - 1
        for index, line in enumerate(self.lines):
            sep = " " if index == last else "-"
            if not (self.utf8 or line.isascii()):
                line = shown(line)
            text = f"{self.enhanced} {line}" if self.enhanced else line
            line_out = f"{self.code}{sep}{text}"
            # rfc4954 4: an empty AUTH challenge is "334 ", the space kept.
            out.append((line_out if self.code == 334 else line_out.rstrip(" ")) + "\r\n")
        return "".join(out).encode("utf-8")

    def __str__(self) -> str:
        text = " / ".join(self.lines)
        return f"{self.code} {self.enhanced} {text}" if self.enhanced else f"{self.code} {text}"


def shown(text: str) -> str:
    """``text`` fit for a reply: non-ASCII characters as ``\\x{HEX}``
    (rfc6533 3's EmbeddedUnicodeChar). rfc6531 3.7.4.2: no UTF-8 in replies
    but a few (VRFY/EXPN with SMTPUTF8); the address stays recognisable."""
    if text.isascii():
        return text
    return "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in text)



# Replies that do not depend on the session. rfc5321 4.2.2, 4.2.3; rfc3463 / rfc5248.
OK = Reply.of(250, "2.0.0", "Ok")
SENDER_OK = Reply.of(250, "2.1.0", "Sender ok")
RECIPIENT_OK = Reply.of(250, "2.1.5", "Recipient ok")
START_DATA = Reply.of(354, "", "End data with <CR><LF>.<CR><LF>")
BAD_SEQUENCE = "5.5.1"
SYNTAX = "5.5.4"
