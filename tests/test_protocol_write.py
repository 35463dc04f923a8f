"""Replies sent on the socket at once (``mailsvc.sockets.write_now``), on real
127.0.0.1 connections watched by a real epoll reactor that the test turns by hand.

What a client sees must be what ``transport.write`` gives: the same bytes, in
the same order, nothing in clear after STARTTLS, nothing after an abort, and a
broken connection reported by Twisted as it always is.
"""

from __future__ import annotations

import select
import socket
import struct

import pytest
import trustme
from twisted.internet.address import IPv4Address
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport

from mailsvc.sockets import idle_tcp_socket, write_now
from mailsvc.tls import ServerTLSContext
from test_protocol import Harness


class Recorder(Protocol):
    """Remembers what it read and how its connection ended."""

    def connectionMade(self):
        self.received, self.lost = b"", []

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.lost.append(reason)


class Network:
    """Accepted 127.0.0.1 connections handed to a private ``EPollReactor``
    (never run: ``turn`` runs one iteration), with the client ends as plain sockets."""

    def __init__(self):
        self.reactor = EPollReactor()
        self.clients = []

    def connect(self, factory, client_rcvbuf=None, server_sndbuf=None):
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.socket()
            if client_rcvbuf:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, client_rcvbuf)
            client.connect(listener.getsockname())
            accepted, _ = listener.accept()
        self.clients.append(client)
        with accepted:
            if server_sndbuf:
                accepted.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, server_sndbuf)
            accepted.setblocking(False)
            transport = self.reactor.adoptStreamConnection(accepted.fileno(), socket.AF_INET, factory)
        client.settimeout(5)
        return transport, client

    def turn(self, times=1):
        for _ in range(times):
            self.reactor.iterate(0)

    def close(self):
        for client in self.clients:
            client.close()
        self.reactor.disconnectAll()
        # The reactor is never run, so nothing else closes its waker's pipe.
        self.reactor.removeReader(self.reactor.waker)
        self.reactor.waker.connectionLost(None)


@pytest.fixture
def net():
    network = Network()
    yield network
    network.close()


def recorder_factory():
    return Factory.forProtocol(Recorder)


def pending(client) -> bytes:
    """What the client can read now, without waiting."""
    readable, _, _ = select.select([client], [], [], 0)
    return client.recv(65536) if readable else b""


def test_a_fresh_connection_is_written_directly(net):
    """A plain TCP connection with nothing queued qualifies for the direct send.

    This reads Twisted's private write state: if an upgrade renames it, this
    test fails, while the server falls back to ``transport.write`` (slower, still right)."""
    transport, _ = net.connect(recorder_factory())
    assert idle_tcp_socket(transport) is transport.socket


def test_greeting_and_replies_need_no_reactor_turn(net, tmp_path):
    """The SMTP server's 220 and its replies are on the wire as soon as they
    are made; the reactor is never asked to watch for writability."""
    h = Harness(tmp_path)
    transport, client = net.connect(h.factory)
    assert pending(client) == b"220 mx.test ESMTP mailsvc\r\n"
    assert transport not in net.reactor.getWriters()
    client.sendall(b"HELO c.test\r\nNOOP\r\n")
    net.turn()
    assert pending(client) == b"250 mx.test greets c.test\r\n250 2.0.0 Ok\r\n"
    client.sendall(b"QUIT\r\n")
    net.turn(3)
    assert client.recv(100).startswith(b"221 2.0.0 ")
    assert client.recv(100) == b""  # then the server closes


def test_queued_bytes_keep_their_place(net):
    """Bytes already in Twisted's buffer go first; a direct send never overtakes them."""
    transport, client = net.connect(recorder_factory())
    transport.write(b"one ")
    write_now(transport, b"two")
    assert pending(client) == b""
    net.turn()
    assert pending(client) == b"one two"
    assert transport not in net.reactor.getWriters()


def test_what_the_kernel_does_not_take_is_queued_in_order(net):
    """A reply larger than the socket buffers: the kernel takes a part, Twisted
    sends the rest, and a later write comes after all of it."""
    transport, client = net.connect(recorder_factory(), client_rcvbuf=4096, server_sndbuf=4096)
    big = bytes(range(256)) * 4096  # 1 MiB, far more than the kernel holds
    write_now(transport, big)
    assert transport in net.reactor.getWriters()  # the rest waits in Twisted's buffer
    write_now(transport, b"END")
    received = b""
    while len(received) < len(big) + 3:
        net.turn()
        received += pending(client)
    assert received == big + b"END"


def test_closing_connection_is_left_to_twisted(net):
    """After loseConnection nothing bypasses Twisted: a late write is sent
    before the close, as ``transport.write`` does."""
    transport, client = net.connect(recorder_factory())
    transport.loseConnection()
    assert idle_tcp_socket(transport) is None
    write_now(transport, b"late")
    net.turn(2)
    assert client.recv(100) == b"late"
    assert client.recv(100) == b""


def test_aborted_connection_sends_nothing(net):
    """After abortConnection a write reaches nobody, as with ``transport.write``."""
    transport, client = net.connect(recorder_factory())
    transport.abortConnection()
    write_now(transport, b"never")
    net.turn(2)
    with pytest.raises(ConnectionResetError):
        client.recv(100)


def test_reset_connection_is_reported_by_twisted(net):
    """The client resets the connection; a write then raises nothing and the
    protocol hears connectionLost once, from Twisted."""
    transport, client = net.connect(recorder_factory())
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    net.clients.remove(client)
    proto = transport.protocol
    write_now(transport, b"x" * 100)
    write_now(transport, b"y" * 100)
    net.turn(3)
    assert len(proto.lost) == 1 and proto.received == b""


def test_tls_connection_is_written_through_tls(net, tmp_path):
    """After startTLS every byte goes through the TLS layer: nothing in clear on the wire."""
    issued = trustme.CA().issue_cert("mx.test")
    issued.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    issued.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    transport, client = net.connect(recorder_factory())
    transport.startTLS(ServerTLSContext(tmp_path / "cert.pem", tmp_path / "key.pem"))
    assert idle_tcp_socket(transport) is None
    write_now(transport, b"secret reply\r\n")
    net.turn()
    assert b"secret" not in pending(client)  # the server waits for a ClientHello first


def test_other_transports_get_their_own_write():
    """A transport that is not Twisted's TCP one is only ever written with ``write``."""
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
    assert idle_tcp_socket(transport) is None
    write_now(transport, b"250 ok\r\n")
    assert transport.value() == b"250 ok\r\n"


def test_unknown_twisted_state_means_the_buffered_write(net):
    """Should the private state not be there (another Twisted), the direct send is not used."""
    transport, client = net.connect(recorder_factory())
    saved = transport._tempDataLen
    del transport._tempDataLen
    try:
        assert idle_tcp_socket(transport) is None
    finally:
        transport._tempDataLen = saved
    write_now(transport, b"ok")
    assert pending(client) == b"ok"
