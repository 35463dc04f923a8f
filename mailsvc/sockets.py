"""Socket options and writes shared by the SMTP server and client connections."""

from __future__ import annotations

from twisted.internet import tcp


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


def write_now(transport, data: bytes) -> None:
    """``transport.write(data)``, sent on the socket at once when that is the same thing.

    ``transport.write`` only buffers: the reactor then watches the socket for
    writability (one ``epoll_ctl``), sends on its next turn, and stops
    watching (another ``epoll_ctl``). For a reply of a few dozen bytes on a
    socket with nothing queued, sending right away puts the same bytes on the
    wire in the same order, without those two system calls and the extra
    dispatch. Whatever the kernel does not take (a partial send, EAGAIN), and
    any error (EPIPE, ECONNRESET...), goes to ``transport.write`` as before:
    Twisted then sends it, or finds the connection lost, exactly as it would
    have.
    """
    sock = idle_tcp_socket(transport)
    if sock is not None:
        try:
            sent = sock.send(data)
        except OSError:
            sent = 0  # EAGAIN, or an error that Twisted's own send will meet and report
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


_TCP_WRITE = tcp.Connection.write


def idle_tcp_socket(transport):
    """The socket of a plain TCP ``transport`` with nothing queued to send, else None.

    Twisted has no public way to ask "is anything buffered, or is a close,
    a half-close, an abort or a producer pending?", so this reads the private
    state of ``twisted.internet.abstract.FileDescriptor`` and
    ``tcp.Connection``, here and nowhere else. A send on the socket is only
    the same as ``transport.write`` when none of these holds; if a Twisted
    upgrade renames any of them, the AttributeError means None: every write
    goes through ``transport.write``, slower but right
    (``tests/test_protocol_write.py`` fails to tell us).
    """
    # Only Twisted's own TCP write (tcp.Server, tcp.Client, unix.Server):
    # implicit-TLS listeners hand us a TLSMemoryBIOProtocol instead.
    if getattr(type(transport), "write", None) is not _TCP_WRITE:
        return None
    try:
        if (
            transport.TLS  # after STARTTLS: bytes must go through the TLS layer
            or not transport.connected
            or transport.disconnecting  # loseConnection pending
            or transport._aborting
            or transport._writeDisconnecting  # loseWriteConnection pending
            or transport._writeDisconnected
            or transport.producer is not None  # a producer wants to hear about the buffer
            or transport.dataBuffer  # queued bytes go first
            or transport._tempDataLen
        ):
            return None
        return transport.socket
    except AttributeError:
        return None
