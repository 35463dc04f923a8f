"""Errors that cross module boundaries, with the SMTP status they map to."""

from __future__ import annotations


class DeliveryError(Exception):
    """A delivery attempt for one recipient failed.

    ``status`` is an rfc3463 enhanced status code (``"4.3.1"``), ``text`` a
    sentence a person can read. Subclasses say whether trying again may help.
    """

    permanent = False

    def __init__(self, text: str, status: str = "") -> None:
        super().__init__(text)
        self.text = text
        self.status = status or ("5.0.0" if self.permanent else "4.0.0")

    def __str__(self) -> str:
        return f"{self.status} {self.text}"


class TemporaryDeliveryError(DeliveryError):
    """Trying again later may succeed (disk full, permissions, peer busy)."""

    permanent = False


class PermanentDeliveryError(DeliveryError):
    """Trying again will not help (no such mailbox, message refused)."""

    permanent = True


class SpoolError(Exception):
    """The spool could not store or change a message.

    ``temporary_full`` is true when the cause is lack of space (rfc5321
    4.2.2: 452 4.3.1), false for other I/O errors (451 4.3.0).
    """

    def __init__(self, text: str, temporary_full: bool = False) -> None:
        super().__init__(text)
        self.temporary_full = temporary_full


class ConfigError(Exception):
    """The configuration is wrong. The text names the key and the problem."""
