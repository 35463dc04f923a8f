"""The relay's SMTPUTF8 (rfc6531): what a peer without it gets, what one with
it gets, and the A-label form of internationalized domains.

Uses the in-memory harness of ``test_relay_agent`` (``Relay``, scripted
peers, ``task.Clock``). A message "needs" SMTPUTF8, as Postfix decides it,
when an address of the transaction is not ASCII, or when the sender gave
SMTPUTF8 and the header section has non-ASCII octets.
"""

from __future__ import annotations

import random

from test_mx import FakeResolver
from test_relay_agent import HEADERS, PASSED_ON, RELAYED, Peer, Relay, Scripted, result_of
from twisted.names import dns

from mailsvc.delivery.mx import MXResolver
from mailsvc.delivery.relay import RelayAgent
from mailsvc.errors import PermanentDeliveryError
from mailsvc.relayconfig import RelayConfig, RouteConfig

UTF8 = (("SMTPUTF8", ""),)  # as the receiver queues MAIL ... SMTPUTF8
UTF8_8BIT = (("SMTPUTF8", ""), ("BODY", "8BITMIME"))
NO_UTF8 = ["PIPELINING", "SIZE 100000000", "8BITMIME"]
WITH_UTF8 = ["PIPELINING", "SIZE 100000000", "8BITMIME", "SMTPUTF8"]
UTF8_SUBJECT = "From: carol@example.test\r\nTo: alice@remote.test\r\nSubject: Grüße\r\n\r\nHallo.\r\n".encode()


def commands(script, verb):
    """The commands a scripted peer got that start with ``verb``."""
    return [c for c in script.get("commands", []) if c.startswith(verb)]


# ---------------------------------------------------------------- not needed: sent anyway


def test_ascii_message_with_smtputf8_goes_to_a_peer_without_it(tmp_path):
    """rfc6531 3.4: SMTPUTF8 given, but the envelope and the header section are
    ASCII: a peer without SMTPUTF8 gets the message, MAIL without the parameter."""
    relay = Relay(tmp_path)
    script = relay.net.add("192.0.2.25", 25, Scripted(extensions=NO_UTF8)).script
    message = relay.queue(HEADERS + b"x\r\n", parameters=UTF8)
    assert result_of(relay.deliver(message)) == {"alice@remote.test": RELAYED}
    size = len(relay.wire(message))
    assert commands(script, "MAIL") == [f"MAIL FROM:<carol@example.test> SIZE={size}"]
    assert script["messages"] == [relay.wire(message)]


def test_smtputf8_is_passed_on_to_a_peer_that_offers_it(tmp_path):
    """The sender gave SMTPUTF8: a peer offering it gets it on MAIL, needed or not."""
    relay = Relay(tmp_path)
    script = relay.net.add("192.0.2.25", 25, Scripted(extensions=WITH_UTF8)).script
    message = relay.queue(HEADERS + b"x\r\n", parameters=UTF8)
    assert result_of(relay.deliver(message)) == {"alice@remote.test": RELAYED}
    assert commands(script, "MAIL") == [f"MAIL FROM:<carol@example.test> SMTPUTF8 SIZE={len(relay.wire(message))}"]


def test_no_smtputf8_asked_none_sent(tmp_path):
    """Without SMTPUTF8 from the sender an ASCII message gets none, even from a peer offering it."""
    relay = Relay(tmp_path)
    script = relay.net.add("192.0.2.25", 25, Scripted(extensions=WITH_UTF8)).script
    message = relay.queue(HEADERS + b"x\r\n")
    assert result_of(relay.deliver(message)) == {"alice@remote.test": RELAYED}
    assert "SMTPUTF8" not in commands(script, "MAIL")[0]


def test_utf8_in_the_body_only_does_not_need_smtputf8(tmp_path):
    """Only the header section counts: an 8-bit body with ASCII headers goes to a
    peer without SMTPUTF8 as 8BITMIME (rfc6152), without SMTPUTF8."""
    relay = Relay(tmp_path)
    script = relay.net.add("192.0.2.25", 25, Scripted(extensions=NO_UTF8)).script
    message = relay.queue(HEADERS + "Grüße, Jörg\r\n".encode(), parameters=UTF8_8BIT)
    assert result_of(relay.deliver(message)) == {"alice@remote.test": RELAYED}
    assert commands(script, "MAIL") == [f"MAIL FROM:<carol@example.test> SIZE={len(relay.wire(message))} BODY=8BITMIME"]
    assert script["messages"] == [relay.wire(message)]


def test_utf8_headers_without_smtputf8_asked_go_as_before(tmp_path):
    """8-bit headers from a sender that did not give SMTPUTF8 (legacy mail) are
    not taken for an SMTPUTF8 message: sent as 8BITMIME, as before."""
    relay = Relay(tmp_path)
    script = relay.net.add("192.0.2.25", 25, Scripted(extensions=NO_UTF8)).script
    message = relay.queue(UTF8_SUBJECT, parameters=(("BODY", "8BITMIME"),))
    assert result_of(relay.deliver(message)) == {"alice@remote.test": RELAYED}
    assert "SMTPUTF8" not in commands(script, "MAIL")[0]


# ---------------------------------------------------------------- needed: 5.6.7 or SMTPUTF8


def test_utf8_recipient_to_a_peer_without_smtputf8_is_5_6_7(tmp_path):
    """rfc6531 3.2, 3.5: a UTF-8 recipient to a peer without SMTPUTF8 fails for
    good with 5.6.7 saying why; no MAIL is sent, no other MX is tried."""
    relay = Relay(tmp_path, mx={"remote.test": [("mx1.remote.test", ["192.0.2.1"]), ("mx2.remote.test", ["192.0.2.2"])]})
    script = relay.net.add("192.0.2.1", 25, Scripted(extensions=NO_UTF8)).script
    message = relay.queue(HEADERS + b"x\r\n", recipients=("jörg@remote.test",), parameters=UTF8)
    error = result_of(relay.deliver(message))["jörg@remote.test"]
    assert isinstance(error, PermanentDeliveryError) and error.status == "5.6.7"
    assert str(error) == (
        "5.6.7 host mx1.remote.test does not offer SMTPUTF8, which the message needs:"
        " a recipient address is not ASCII"
    )
    assert [c.split()[0] for c in script["commands"]] == ["EHLO"]
    assert relay.net.attempts == [("192.0.2.1", 25)]


def test_utf8_subject_to_a_peer_without_smtputf8_is_5_6_7(tmp_path):
    """SMTPUTF8 given and a UTF-8 Subject (rfc6532): 5.6.7 from a peer without
    SMTPUTF8, even one without 8BITMIME (not converted to 7-bit first)."""
    relay = Relay(tmp_path)
    script = relay.net.add("192.0.2.25", 25, Scripted(extensions=["PIPELINING"])).script
    message = relay.queue(UTF8_SUBJECT, parameters=UTF8_8BIT)
    error = result_of(relay.deliver(message))["alice@remote.test"]
    assert isinstance(error, PermanentDeliveryError) and error.status == "5.6.7"
    assert str(error) == (
        "5.6.7 host mx.remote.test does not offer SMTPUTF8, which the message needs: its header section is not ASCII"
    )
    assert "messages" not in script and list((relay.spool.directory / "tmp").iterdir()) == []


def test_utf8_sender_to_a_peer_without_smtputf8_is_5_6_7(tmp_path):
    """A UTF-8 sender needs SMTPUTF8 too."""
    relay = Relay(tmp_path)
    relay.net.add("192.0.2.25", 25, Scripted(extensions=NO_UTF8))
    message = relay.queue(HEADERS + b"x\r\n", sender="jörg@example.test", parameters=UTF8)
    error = result_of(relay.deliver(message))["alice@remote.test"]
    assert error.status == "5.6.7" and error.text.endswith("needs: the sender address is not ASCII")


def test_utf8_recipient_delivered_to_a_peer_with_smtputf8(tmp_path):
    """A peer offering SMTPUTF8 gets SMTPUTF8 on MAIL and the recipient in raw
    UTF-8 on RCPT (rfc6531 3.2), then the message as it is."""
    relay = Relay(tmp_path)
    script = relay.net.add("192.0.2.25", 25, Scripted(extensions=WITH_UTF8)).script
    message = relay.queue(UTF8_SUBJECT, recipients=("jörg@remote.test",), parameters=UTF8_8BIT)
    assert result_of(relay.deliver(message)) == {"jörg@remote.test": RELAYED}
    size = len(relay.wire(message))
    assert commands(script, "MAIL") == [f"MAIL FROM:<carol@example.test> SMTPUTF8 SIZE={size} BODY=8BITMIME"]
    assert commands(script, "RCPT") == ["RCPT TO:<jörg@remote.test>"]  # the peer decoded it as UTF-8
    assert script["messages"] == [relay.wire(message)]


def test_need_is_per_domain(tmp_path):
    """Each domain's transaction is judged on its own addresses: the ASCII
    domain gets the message without SMTPUTF8 while the UTF-8 recipient of the
    other domain, at a peer without it, fails with 5.6.7."""
    mx = {"remote.test": [("mx.remote.test", ["192.0.2.1"])], "other.test": [("mx.other.test", ["192.0.2.2"])]}
    relay = Relay(tmp_path, mx=mx)
    ascii_peer = relay.net.add("192.0.2.1", 25, Scripted(extensions=NO_UTF8)).script
    relay.net.add("192.0.2.2", 25, Scripted(extensions=NO_UTF8))
    message = relay.queue(HEADERS + b"x\r\n", recipients=("alice@remote.test", "jörg@other.test"), parameters=UTF8)
    results = result_of(relay.deliver(message))
    assert results["alice@remote.test"] == RELAYED
    assert results["jörg@other.test"].status == "5.6.7"
    assert "SMTPUTF8" not in commands(ascii_peer, "MAIL")[0]


def test_smtputf8_kept_when_a_bad_parameter_is_dropped(tmp_path):
    """An ENVID we cannot repeat is dropped, not SMTPUTF8: the UTF-8 headers
    still keep the message from a peer without SMTPUTF8."""
    relay = Relay(tmp_path)
    relay.net.add("192.0.2.25", 25, Scripted(extensions=NO_UTF8 + ["DSN"]))
    message = relay.queue(UTF8_SUBJECT, parameters=UTF8_8BIT + (("ENVID", "a=b"),))
    assert result_of(relay.deliver(message))["alice@remote.test"].status == "5.6.7"


def test_end_to_end_with_our_server_offering_smtputf8(tmp_path):
    """Our own server glue with SMTPUTF8 on takes a UTF-8 Subject message and
    queues it with SMTPUTF8 kept, byte for byte."""
    relay = Relay(tmp_path)
    peer = relay.net.add("192.0.2.25", 25, Peer(tmp_path / "peer", relay.clock, smtputf8=True))
    message = relay.queue(UTF8_SUBJECT, parameters=UTF8_8BIT)
    assert result_of(relay.deliver(message)) == {"alice@remote.test": PASSED_ON}
    [(envelope, data)] = peer.received()
    assert data == relay.wire(message)
    assert envelope.parameter("SMTPUTF8") is not None


# ---------------------------------------------------------------- internationalized domains


def test_u_label_domain_is_looked_up_and_grouped_as_a_label(tmp_path):
    """rfc6531 3.2: the MX of bücher.example is asked for as xn--bcher-kva.example;
    recipients written with the U-label, upper case or the A-label share one
    transaction; the addresses go as they were written."""
    relay = Relay(tmp_path, mx={"xn--bcher-kva.example": [("mx.bcher.example", ["192.0.2.25"])]})
    script = relay.net.add("192.0.2.25", 25, Scripted(extensions=WITH_UTF8)).script
    recipients = ("jörg@bücher.example", "ana@BÜCHER.example", "li@xn--bcher-kva.example")
    message = relay.queue(HEADERS + b"x\r\n", recipients=recipients, parameters=UTF8)
    assert result_of(relay.deliver(message)) == dict.fromkeys(recipients, RELAYED)
    assert relay.mx.asked == ["xn--bcher-kva.example"]
    assert commands(script, "RCPT") == [f"RCPT TO:<{r}>" for r in recipients]
    assert len(commands(script, "MAIL")) == 1


def test_route_in_a_labels_serves_a_u_label_domain(tmp_path):
    """A [[relay.route]] is configured in A-labels (configtable.checkDomain); mail
    to the U-label form of its domain takes it, not the MX."""
    relay = Relay(tmp_path, routes=(RouteConfig(domain="xn--bcher-kva.example", host="192.0.2.9", tls="none"),))
    script = relay.net.add("192.0.2.9", 25, Scripted(extensions=WITH_UTF8)).script
    message = relay.queue(HEADERS + b"x\r\n", recipients=("jörg@bücher.example",), parameters=UTF8)
    assert result_of(relay.deliver(message)) == {"jörg@bücher.example": RELAYED}
    assert relay.mx.asked == [] and commands(script, "RCPT") == ["RCPT TO:<jörg@bücher.example>"]


def test_invalid_idn_fails_5_1_3(tmp_path):
    """A domain that is no valid IDN (IDNA 2008 has no symbols) fails for good
    with 5.1.3 through the real MXResolver; DNS is not asked."""
    relay = Relay(tmp_path)
    dns_resolver = FakeResolver({("xn--n3h.example", dns.A): [dns.Record_A("192.0.2.25")]})
    relay.agent = RelayAgent(
        RelayConfig(connect_timeout=10), MXResolver(dns_resolver, rng=random.Random(1)),
        relay.net.connect, relay.clock, relay.spool, "relay.example.test",
    )
    message = relay.queue(HEADERS + b"x\r\n", recipients=("snow@☃.example",), parameters=UTF8)
    error = result_of(relay.deliver(message))["snow@☃.example"]
    assert isinstance(error, PermanentDeliveryError) and error.status == "5.1.3"
    assert str(error) == "5.1.3 bad destination domain '☃.example'"
    assert dns_resolver.asked == [] and relay.net.attempts == []
