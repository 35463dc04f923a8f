"""MX resolution: ordering, implicit and null MX, loops to ourselves, DNS failures.

The first tests ask a real ``twisted.names`` DNS server on 127.0.0.1 through
the real client resolver (trial test cases, so the reactor runs); the rest use
an in-memory resolver to pin down the ordering and filtering logic.
"""

import random

from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol
from twisted.names import authority, client, dns, server
from twisted.names import error as dns_error
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailsvc.delivery.mx import Host, MXResolver, MXResult
from mailsvc.errors import PermanentDeliveryError, TemporaryDeliveryError

SOA = dns.Record_SOA(mname=b"ns.test", rname=b"hostmaster.test", serial=1, minimum=60, expire=60)


def mx(preference, name):
    """An MX record for ``name`` (bytes or str)."""
    return dns.Record_MX(preference, name)


ZONE = {
    "two.test": [mx(20, "mx2.two.test"), mx(10, "mx1.two.test")],
    "mx1.two.test": [dns.Record_A("192.0.2.1")],
    "mx2.two.test": [dns.Record_A("192.0.2.2")],
    "equal.test": [mx(10, f"{letter}.equal.test") for letter in "abcdef"],
    **{f"{letter}.equal.test": [dns.Record_A(f"192.0.2.{30 + i}")] for i, letter in enumerate("abcdef")},
    "bare.test": [dns.Record_A("192.0.2.10"), dns.Record_AAAA("2001:db8::10")],
    "v6.test": [mx(10, "mx.v6.test")],
    "mx.v6.test": [dns.Record_A("192.0.2.20"), dns.Record_AAAA("2001:db8::20")],
    "nullmx.test": [mx(0, b"")],
    "loop-best.test": [mx(10, "mail.ours.test"), mx(20, "backup.other.test")],
    "loop-second.test": [mx(10, "primary.other.test"), mx(20, "mail.ours.test"), mx(30, "third.other.test")],
    "mail.ours.test": [dns.Record_A("192.0.2.99")],
    "primary.other.test": [dns.Record_A("192.0.2.41")],
    "backup.other.test": [dns.Record_A("192.0.2.42")],
    "third.other.test": [dns.Record_A("192.0.2.43")],
    "noaddr.test": [mx(10, "ghost.noaddr.test"), mx(20, "real.noaddr.test")],
    "real.noaddr.test": [dns.Record_A("192.0.2.50")],
    "allghosts.test": [mx(10, "ghost.allghosts.test")],
    "textonly.test": [dns.Record_TXT(b"v=spf1 -all")],
}


class DictAuthority(authority.FileAuthority):
    """An authority for the zone ``test`` serving the records of a dict.

    A lookup of ``servfail.test`` fails with an unexpected error, which the
    server answers with SERVFAIL.
    """

    def loadFile(self, zone):
        """Take the records from ``zone`` (name -> records) instead of a file."""
        self.soa = (b"test", SOA)
        self.records = {name.encode("ascii"): records for name, records in zone.items()}

    def _lookup(self, name, cls, type, timeout=None):
        if name.lower() == b"servfail.test":
            return defer.fail(RuntimeError("the zone is broken"))
        return super()._lookup(name, cls, type, timeout)


class Silent(DatagramProtocol):
    """A UDP endpoint that reads queries and never answers."""

    def datagramReceived(self, data, addr):
        pass


def global_reactor():
    """The reactor trial runs (imported late: no module-level reactor import)."""
    from twisted.internet import reactor

    return reactor


class RealDNSTests(TestCase):
    """MXResolver against a real DNS server on 127.0.0.1 over UDP."""

    def setUp(self):
        reactor = global_reactor()
        factory = server.DNSServerFactory(authorities=[DictAuthority(ZONE)])
        port = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.dns = client.Resolver(
            servers=[("127.0.0.1", port.getHost().port)], timeout=(2,), reactor=reactor
        )

    def resolver(self, **kwargs):
        """An MXResolver asking the test server."""
        kwargs.setdefault("rng", random.Random(1))
        return MXResolver(self.dns, **kwargs)

    async def resolve_error(self, domain, **kwargs):
        """The DeliveryError that resolving ``domain`` fails with."""
        try:
            result = await self.resolver(**kwargs).resolve(domain)
        except (PermanentDeliveryError, TemporaryDeliveryError) as e:
            return e
        self.fail(f"resolved {domain} to {result}")

    @defer.inlineCallbacks
    def test_two_mx_ordered_by_preference(self):
        """The MX with the lower preference comes first, each with its address."""
        result = yield self.resolver().resolve("two.test")
        self.assertEqual(
            result,
            MXResult([Host("mx1.two.test", 10, ["192.0.2.1"]), Host("mx2.two.test", 20, ["192.0.2.2"])]),
        )
        self.assertEqual(result.targets(), [("mx1.two.test", "192.0.2.1"), ("mx2.two.test", "192.0.2.2")])

    @defer.inlineCallbacks
    def test_equal_preferences_shuffled_by_seeded_random(self):
        """MX of equal preference come in the order the injected Random gives."""
        names = sorted(f"{letter}.equal.test" for letter in "abcdef")
        orders = set()
        for seed in range(4):
            expected = list(names)
            random.Random(seed).shuffle(expected)
            result = yield self.resolver(rng=random.Random(seed)).resolve("equal.test")
            self.assertEqual([host.name for host in result.hosts], expected)
            orders.add(tuple(expected))
        self.assertGreater(len(orders), 1)

    @defer.inlineCallbacks
    def test_no_mx_falls_back_to_the_domain_addresses(self):
        """Without MX records the domain itself is the implicit MX (rfc5321 5.1)."""
        result = yield self.resolver().resolve("Bare.Test.")
        self.assertEqual(result, MXResult([Host("bare.test", 0, ["192.0.2.10", "2001:db8::10"])], implicit=True))

    @defer.inlineCallbacks
    def test_aaaa_addresses_gathered(self):
        """An MX host's A and AAAA addresses are both listed."""
        result = yield self.resolver().resolve("v6.test")
        self.assertEqual(result.hosts, [Host("mx.v6.test", 10, ["192.0.2.20", "2001:db8::20"])])

    async def test_null_mx(self):
        """A single MX "0 ." means the domain takes no mail: 5.1.10 (rfc7505)."""
        error = await self.resolve_error("nullmx.test")
        self.assertIsInstance(error, PermanentDeliveryError)
        self.assertEqual(error.status, "5.1.10")

    async def test_nxdomain(self):
        """A domain that does not exist fails for good with 5.1.2."""
        error = await self.resolve_error("nosuch.test")
        self.assertIsInstance(error, PermanentDeliveryError)
        self.assertEqual(error.status, "5.1.2")

    async def test_no_mx_and_no_address(self):
        """A domain with neither MX nor address records is undeliverable: 5.1.2."""
        error = await self.resolve_error("textonly.test")
        self.assertIsInstance(error, PermanentDeliveryError)
        self.assertEqual(error.status, "5.1.2")

    async def test_our_host_as_best_mx_loops(self):
        """When we are the best MX nothing is left to try: 5.4.6 (rfc5321 5.1)."""
        error = await self.resolve_error("loop-best.test", our_hostnames={"MAIL.ours.test."})
        self.assertIsInstance(error, PermanentDeliveryError)
        self.assertEqual(error.status, "5.4.6")

    @defer.inlineCallbacks
    def test_our_host_as_second_mx_keeps_only_the_better(self):
        """When we are the second MX only the better one is kept, not the third."""
        result = yield self.resolver(our_hostnames={"mail.ours.test"}).resolve("loop-second.test")
        self.assertEqual(result.hosts, [Host("primary.other.test", 10, ["192.0.2.41"])])

    @defer.inlineCallbacks
    def test_our_address_counts_as_ourselves(self):
        """An MX whose address is one of ours is dropped like one named as ours."""
        result = yield self.resolver(our_hostnames={"192.0.2.99"}).resolve("loop-second.test")
        self.assertEqual([host.name for host in result.hosts], ["primary.other.test"])

    @defer.inlineCallbacks
    def test_mx_without_address_skipped(self):
        """An MX host with no address is left out; the others remain."""
        result = yield self.resolver().resolve("noaddr.test")
        self.assertEqual(result.hosts, [Host("real.noaddr.test", 20, ["192.0.2.50"])])

    async def test_every_mx_without_address(self):
        """When no MX host has an address the delivery is deferred: 4.4.3."""
        error = await self.resolve_error("allghosts.test")
        self.assertIsInstance(error, TemporaryDeliveryError)
        self.assertEqual(error.status, "4.4.3")

    async def test_servfail(self):
        """A SERVFAIL answer defers the delivery: 4.4.3."""
        error = await self.resolve_error("servfail.test")
        self.assertIsInstance(error, TemporaryDeliveryError)
        self.assertEqual(error.status, "4.4.3")
        self.assertIn("SERVFAIL", error.text)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    async def test_timeout(self):
        """A name server that never answers defers the delivery: 4.4.3."""
        reactor = global_reactor()
        port = reactor.listenUDP(0, Silent(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.dns = client.Resolver(servers=[("127.0.0.1", port.getHost().port)], reactor=reactor)
        error = await self.resolve_error("two.test", timeout=(0.1, 0.2))
        self.assertIsInstance(error, TemporaryDeliveryError)
        self.assertEqual(error.status, "4.4.3")
        self.assertIn("timed out", error.text)


# ---------------------------------------------------------------- in memory


def rr(name, payload):
    """A resource record header for ``payload`` owned by ``name``."""
    return dns.RRHeader(name=name, type=payload.TYPE, payload=payload)


class FakeResolver:
    """Answers from a dict ``(name, type) -> list of payloads | exception``, at once.

    Names and types not in the dict have no records (an empty answer).
    """

    def __init__(self, answers):
        self.answers = answers
        self.asked = []

    def _answer(self, name, type):
        self.asked.append((name, type))
        found = self.answers.get((name, type), [])
        if isinstance(found, Exception):
            return defer.fail(found)
        return defer.succeed(([rr(name, p) if not isinstance(p, dns.RRHeader) else p for p in found], [], []))

    def lookupMailExchange(self, name, timeout=None):
        return self._answer(name, dns.MX)

    def lookupAddress(self, name, timeout=None):
        return self._answer(name, dns.A)

    def lookupIPV6Address(self, name, timeout=None):
        return self._answer(name, dns.AAAA)


class InMemoryTests(SynchronousTestCase):
    """The ordering and filtering logic of MXResolver with a resolver that answers at once."""

    def resolve(self, answers, domain, **kwargs):
        """The Deferred from resolving ``domain`` against ``answers``."""
        kwargs.setdefault("rng", random.Random(3))
        return MXResolver(FakeResolver(answers), **kwargs).resolve(domain)

    def error(self, answers, domain, **kwargs):
        """The DeliveryError resolving ``domain`` fails with."""
        return self.failureResultOf(self.resolve(answers, domain, **kwargs)).value

    def test_groups_by_preference_then_shuffles_within(self):
        """Preference groups keep their order; only equal preferences are shuffled."""
        answers = {
            ("d.test", dns.MX): [mx(5, "a"), mx(30, "z"), mx(5, "b"), mx(5, "c"), mx(30, "y")],
            **{(n, dns.A): [dns.Record_A("192.0.2.1")] for n in "abczy"},
        }
        seen = set()
        for seed in range(10):
            result = self.successResultOf(self.resolve(answers, "d.test", rng=random.Random(seed)))
            prefs = [host.preference for host in result.hosts]
            self.assertEqual(prefs, [5, 5, 5, 30, 30])
            self.assertEqual({h.name for h in result.hosts[:3]}, {"a", "b", "c"})
            seen.add(tuple(h.name for h in result.hosts))
        self.assertGreater(len(seen), 1)

    def test_order_independent_of_answer_order(self):
        """The same seed gives the same order whatever order DNS listed the records in."""
        records = [mx(10, n) for n in "pqrs"]
        addresses = {(n, dns.A): [dns.Record_A("192.0.2.1")] for n in "pqrs"}
        first = self.successResultOf(self.resolve({("d.test", dns.MX): records, **addresses}, "d.test"))
        second = self.successResultOf(self.resolve({("d.test", dns.MX): records[::-1], **addresses}, "d.test"))
        self.assertEqual(first, second)

    def test_duplicate_exchange_keeps_best_preference(self):
        """An exchange listed twice is tried once, at its better preference."""
        answers = {
            ("d.test", dns.MX): [mx(20, "mx.d.test"), mx(10, "mx.d.test")],
            ("mx.d.test", dns.A): [dns.Record_A("192.0.2.1")],
        }
        result = self.successResultOf(self.resolve(answers, "d.test"))
        self.assertEqual(result.hosts, [Host("mx.d.test", 10, ["192.0.2.1"])])

    def test_cname_in_answers_ignored(self):
        """Records other than MX in the answer (a CNAME before it) are not exchanges."""
        answers = {
            ("d.test", dns.MX): [dns.Record_CNAME("real.test"), rr("real.test", mx(10, "mx.real.test"))],
            ("mx.real.test", dns.A): [dns.Record_CNAME("host.test"), rr("host.test", dns.Record_A("192.0.2.7"))],
        }
        result = self.successResultOf(self.resolve(answers, "d.test"))
        self.assertEqual(result.hosts, [Host("mx.real.test", 10, ["192.0.2.7"])])

    def test_addresses_deduplicated_a_before_aaaa(self):
        """A host's addresses come once each, A records before AAAA."""
        answers = {
            ("d.test", dns.MX): [mx(10, "mx.d.test")],
            ("mx.d.test", dns.A): [dns.Record_A("192.0.2.1"), dns.Record_A("192.0.2.1"), dns.Record_A("192.0.2.2")],
            ("mx.d.test", dns.AAAA): [dns.Record_AAAA("2001:db8::1")],
        }
        result = self.successResultOf(self.resolve(answers, "d.test"))
        self.assertEqual(result.hosts[0].addresses, ["192.0.2.1", "192.0.2.2", "2001:db8::1"])

    def test_null_mx_among_others_is_skipped(self):
        """A "." exchange next to real MX (against rfc7505 3) is not a host; the others stay."""
        answers = {
            ("d.test", dns.MX): [mx(0, b""), mx(10, "mx.d.test")],
            ("mx.d.test", dns.A): [dns.Record_A("192.0.2.1")],
        }
        result = self.successResultOf(self.resolve(answers, "d.test"))
        self.assertEqual([h.name for h in result.hosts], ["mx.d.test"])

    def test_null_mx_with_other_preference_is_not_null(self):
        """Only preference 0 with "." is the null MX; "10 ." alone is an MX without address."""
        error = self.error({("d.test", dns.MX): [mx(10, b"")]}, "d.test")
        self.assertIsInstance(error, TemporaryDeliveryError)
        self.assertEqual(error.status, "4.4.3")

    def test_our_name_skips_address_lookups(self):
        """MX dropped for being ours are not looked up at all."""
        answers = {
            ("d.test", dns.MX): [mx(10, "good.test"), mx(20, "me.test"), mx(30, "worse.test")],
            ("good.test", dns.A): [dns.Record_A("192.0.2.1")],
        }
        fake = FakeResolver(answers)
        result = self.successResultOf(MXResolver(fake, our_hostnames=["me.test"]).resolve("d.test"))
        self.assertEqual([h.name for h in result.hosts], ["good.test"])
        self.assertNotIn(("me.test", dns.A), fake.asked)
        self.assertNotIn(("worse.test", dns.A), fake.asked)

    def test_implicit_mx_is_ourselves(self):
        """A domain without MX whose own name is ours loops: 5.4.6."""
        answers = {("me.test", dns.A): [dns.Record_A("192.0.2.1")]}
        error = self.error(answers, "me.test", our_hostnames={"me.test"})
        self.assertIsInstance(error, PermanentDeliveryError)
        self.assertEqual(error.status, "5.4.6")

    def test_implicit_mx_address_lookup_fails_for_now(self):
        """No MX, and the address lookups time out: deferred (4.4.3), not bounced."""
        answers = {
            ("d.test", dns.A): defer.TimeoutError("slow"),
            ("d.test", dns.AAAA): defer.TimeoutError("slow"),
        }
        error = self.error(answers, "d.test")
        self.assertIsInstance(error, TemporaryDeliveryError)
        self.assertEqual(error.status, "4.4.3")

    def test_one_address_lookup_failing_keeps_the_other(self):
        """A failed AAAA lookup does not hide the A addresses found."""
        answers = {
            ("d.test", dns.MX): [mx(10, "mx.d.test")],
            ("mx.d.test", dns.A): [dns.Record_A("192.0.2.1")],
            ("mx.d.test", dns.AAAA): dns_error.DNSServerError("servfail"),
        }
        result = self.successResultOf(self.resolve(answers, "d.test"))
        self.assertEqual(result.hosts, [Host("mx.d.test", 10, ["192.0.2.1"])])

    def test_refused_is_temporary(self):
        """A REFUSED answer to the MX query defers (4.4.3)."""
        error = self.error({("d.test", dns.MX): dns_error.DNSQueryRefusedError("no")}, "d.test")
        self.assertIsInstance(error, TemporaryDeliveryError)
        self.assertEqual(error.status, "4.4.3")

    def test_address_literal(self):
        """An address literal is used as it is, without DNS (rfc5321 4.1.3)."""
        fake = FakeResolver({})
        result = self.successResultOf(MXResolver(fake).resolve("[192.0.2.1]"))
        self.assertEqual(result, MXResult([Host("192.0.2.1", 0, ["192.0.2.1"])]))
        result = self.successResultOf(MXResolver(fake).resolve("[IPv6:2001:DB8::1]"))
        self.assertEqual(result.targets(), [("2001:db8::1", "2001:db8::1")])
        self.assertEqual(fake.asked, [])

    def test_bad_address_literal(self):
        """A malformed address literal fails for good with 5.1.3."""
        for literal in ("[192.0.2.300]", "[2001:db8::1]", "[IPv6:192.0.2.1]", "[192.0.2.1"):
            error = self.error({}, literal)
            self.assertIsInstance(error, PermanentDeliveryError, literal)
            self.assertEqual(error.status, "5.1.3", literal)

    def test_address_literal_of_ours(self):
        """An address literal naming one of our addresses loops: 5.4.6."""
        error = self.error({}, "[192.0.2.1]", our_hostnames={"[192.0.2.1]"})
        self.assertEqual(error.status, "5.4.6")

    def test_internationalised_domain_asked_in_ascii(self):
        """A non-ASCII domain is looked up in its IDNA (ASCII) form."""
        fake = FakeResolver({("xn--bcher-kva.test", dns.A): [dns.Record_A("192.0.2.5")]})
        result = self.successResultOf(MXResolver(fake).resolve("Bücher.test"))
        self.assertEqual(result.hosts, [Host("xn--bcher-kva.test", 0, ["192.0.2.5"])])

    def test_u_label_upper_case_and_a_label_give_the_same_lookup(self):
        """rfc6531 3.2: a U-label, in any case or with an ideographic full stop
        (UTS 46 mapping), and its A-label, in any case, ask DNS the same name."""
        answers = {
            ("xn--bcher-kva.test", dns.MX): [mx(10, "mx.xn--bcher-kva.test")],
            ("mx.xn--bcher-kva.test", dns.A): [dns.Record_A("192.0.2.5")],
        }
        expected = MXResult([Host("mx.xn--bcher-kva.test", 10, ["192.0.2.5"])])
        for domain in ("bücher.test", "BÜCHER.Test", "bücher\u3002test", "xn--bcher-kva.test", "XN--BCHER-KVA.TEST."):
            fake = FakeResolver(answers)
            self.assertEqual(self.successResultOf(MXResolver(fake).resolve(domain)), expected, domain)
            self.assertEqual(fake.asked[0], ("xn--bcher-kva.test", dns.MX), domain)

    def test_idna_2008_not_2003(self):
        """IDNA 2008 (rfc5891, UTS 46 non-transitional): ß is kept as ß (xn--fa-hia),
        where IDNA 2003 made it "ss"."""
        fake = FakeResolver({("xn--fa-hia.test", dns.A): [dns.Record_A("192.0.2.6")]})
        result = self.successResultOf(MXResolver(fake).resolve("faß.test"))
        self.assertEqual(result.hosts, [Host("xn--fa-hia.test", 0, ["192.0.2.6"])])

    def test_invalid_idn_is_5_1_3(self):
        """A name that is no valid IDN fails for good with 5.1.3, without DNS: a
        symbol (valid in IDNA 2003, not in 2008), a leading hyphen, an empty
        label, a joiner out of context (rfc5892), a label over 63 octets."""
        for domain in ("☃.test", "-bücher.test", "bücher..test", "a\u200db.test", "ü" + "x" * 60 + ".test"):
            fake = FakeResolver({})
            error = self.failureResultOf(MXResolver(fake).resolve(domain)).value
            self.assertIsInstance(error, PermanentDeliveryError, domain)
            self.assertEqual(error.status, "5.1.3", domain)
            self.assertEqual(error.text, f"bad destination domain {domain!r}")
            self.assertEqual(fake.asked, [])

    def test_ascii_names_are_taken_as_they_are(self):
        """An ASCII name is only lower-cased (Postfix converts only non-ASCII
        names): a label with an underscore, which IDNA 2008 refuses, is still
        looked up; an empty label is still 5.1.3."""
        fake = FakeResolver({("my_host.test", dns.A): [dns.Record_A("192.0.2.7")]})
        result = self.successResultOf(MXResolver(fake).resolve("My_Host.test"))
        self.assertEqual(result.hosts, [Host("my_host.test", 0, ["192.0.2.7"])])
        self.assertEqual(self.error({}, "a..test").status, "5.1.3")

    def test_empty_domain(self):
        """An empty domain fails for good with 5.1.3."""
        self.assertEqual(self.error({}, " . ").status, "5.1.3")
