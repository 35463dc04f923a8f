"""Socket options shared by the SMTP server and client connections."""

from __future__ import annotations


def disable_nagle(transport) -> None:
    """Ask a TCP transport for TCP_NODELAY; anything else is left alone.

    SMTP is request and reply, and both sides write whole commands and
    replies. With Nagle's algorithm a small write that follows another one
    still unacknowledged (the end of data after the body; a late reply after
    an early one in a PIPELINING group) waits for the peer's ACK, which the
    peer, waiting for that very write, delays: up to 40 ms on Linux, once per
    message. Postfix sets TCP_NODELAY for the same reason.
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass  # not a TCP socket after all, or already closed
