"""The router: recipients to spool hops."""

from __future__ import annotations

from mailsvc.delivery.router import LOCAL, RELAY, Router, routes
from mailsvc.envelope import Recipient


def test_local_fixed_and_relay_hops():
    """A mailbox is local; a configured domain has its hop (any case, trailing dot); the rest relays."""
    router = Router({"Site.Example": "uucp.site"})
    assert router.hop_for(Recipient("a@example.test", mailbox="a")) == LOCAL
    assert router.hop_for(Recipient("x@SITE.example.")) == "uucp.site"
    assert router.hop_for(Recipient("x@sub.site.example")) == RELAY


def test_routes_group_in_order():
    """routes() groups recipients by hop and keeps their order within each hop."""
    router = Router({"site.example": "uucp.site"})
    rs = [Recipient("a@example.test", mailbox="a"), Recipient("x@site.example"), Recipient("y@far.test"), Recipient("z@site.example")]
    assert router.routes(rs) == {LOCAL: (rs[0],), "uucp.site": (rs[1], rs[3]), RELAY: (rs[2],)}
    assert routes(rs) == {LOCAL: (rs[0],), RELAY: (rs[1], rs[2], rs[3])}


def test_a_u_label_recipient_goes_to_the_hop_of_its_a_label_domain():
    """Configured domains are A-labels (checkDomain); a recipient's U-label
    domain, in any case, finds their hop; a name that is no IDN relays."""
    routes = Router({"xn--bcher-kva.example": "uucp.site"})
    assert routes.hop_for(Recipient("j\u00f6rg@B\u00dcCHER.example")) == "uucp.site"
    assert routes.hop_for(Recipient("a@xn--bcher-kva.example.")) == "uucp.site"
    assert routes.hop_for(Recipient("a@b\u00fc_x.example")) == "relay"
