"""Delivery status notifications: the rfc3464 report as a mail reader parses it."""

import email
import email.policy
import email.utils
import io
import re

import pytest

from mailsvc.delivery import dsn
from mailsvc.delivery.dsn import RecipientOutcome, build_dsn, should_bounce, wants_dsn
from mailsvc.envelope import Envelope, Recipient

NOW = 1763899999.0
ARRIVED = 1763891234.0
HEADERS = (
    b"Received: from client.example.test by mail.example.test\r\n"
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@remote.test\r\n"
    b"Subject: lunch\r\n"
    b"Message-ID: <1@example.test>\r\n"
)
BODY = b"Shall we meet at noon?\r\n\r\n-- \r\nAlice\r\n"
ORIGINAL = HEADERS + b"\r\n" + BODY
ENVELOPE = Envelope(
    sender="alice@example.test",
    recipients=(),
    helo="client.example.test",
    received_at=ARRIVED,
)
BOB = Recipient("bob@remote.test", "Bob@Remote.test")
CAROL = Recipient("carol@remote.test")
BOB_FAILED = RecipientOutcome(BOB, "5.1.1", "550 5.1.1 <bob@remote.test>: no such user", "mx.remote.test")
CAROL_FAILED = RecipientOutcome(CAROL, "5.2.2", "5.2.2 mailbox full")


def build(outcomes=(BOB_FAILED,), original=ORIGINAL, envelope=ENVELOPE, **kwargs):
    """A report from mail.example.test on ``outcomes``, as bytes."""
    return build_dsn("mail.example.test", envelope, outcomes, io.BytesIO(original), NOW, **kwargs)


def parse(data):
    """The report parsed as a mail reader would."""
    return email.message_from_bytes(data, policy=email.policy.default)


def status_blocks(data):
    """The field groups of the message/delivery-status part: per-message, then per recipient."""
    part = parse(data).get_payload()[1]
    assert part.get_content_type() == "message/delivery-status"
    return part.get_payload()


def returned_bytes(data):
    """The raw bytes of the third part's body, as written in the report."""
    head, _, rest = data.partition(b"\r\n\r\n")
    boundary = re.search(rb'boundary="([^"]+)"', head).group(1)
    third = rest.split(b"\r\n--" + boundary)[3]
    return third.partition(b"\r\n\r\n")[2]


def test_structure_is_multipart_report_of_three_parts():
    """The report is multipart/report; report-type=delivery-status with text, status and headers parts."""
    message = parse(build())
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert [part.get_content_type() for part in message.iter_parts()] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert message.defects == []


def test_top_level_headers():
    """From MAILER-DAEMON (Mail Delivery System) to the envelope sender, auto-replied, dated, with an ID."""
    message = parse(build())
    assert message["From"].addresses[0].display_name == "Mail Delivery System"
    assert message["From"].addresses[0].addr_spec == "MAILER-DAEMON@mail.example.test"
    assert message["To"].addresses[0].addr_spec == "alice@example.test"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert message["Date"].datetime.timestamp() == NOW
    assert message["Message-ID"].endswith("@mail.example.test>")


def test_to_is_the_envelope_sender_not_the_header_from():
    """The report goes to the reverse-path, whatever From: the original had."""
    envelope = ENVELOPE.evolve(sender="bounces+123@lists.example.test")
    message = parse(build(envelope=envelope))
    assert message["To"].addresses[0].addr_spec == "bounces+123@lists.example.test"


@pytest.mark.parametrize(
    "action, subject",
    [
        ("failed", "Undelivered Mail Returned to Sender"),
        ("delayed", "Delayed Mail (still being retried)"),
        ("delivered", "Successful Mail Delivery Report"),
        ("relayed", "Successful Mail Delivery Report"),
    ],
)
def test_subject_and_action_per_kind(action, subject):
    """Each kind of report has its subject, and every recipient its Action."""
    data = build(action=action)
    assert parse(data)["Subject"] == subject
    assert status_blocks(data)[1]["Action"] == action


def test_per_message_fields():
    """Reporting-MTA, Received-From-MTA and Arrival-Date come first; no envelope ID when none was given."""
    fields = status_blocks(build())[0]
    assert fields["Reporting-MTA"] == "dns; mail.example.test"
    assert fields["Received-From-MTA"] == "dns; client.example.test"
    assert email.utils.parsedate_to_datetime(fields["Arrival-Date"]).timestamp() == ARRIVED
    assert "Original-Envelope-Id" not in fields


def test_envelope_id_given_or_from_envelope():
    """Original-Envelope-Id is the envid argument, else the envelope's ENVID decoded from xtext."""
    assert status_blocks(build(envid="Q1+x"))[0]["Original-Envelope-Id"] == "Q1+x"
    envelope = ENVELOPE.evolve(parameters=(("ENVID", "QQ+2B314"),))
    assert status_blocks(build(envelope=envelope))[0]["Original-Envelope-Id"] == "QQ+314"


def test_per_recipient_fields():
    """Each recipient has its block: recipients, Action, Status, Remote-MTA, Diagnostic-Code, date."""
    blocks = status_blocks(build(outcomes=(BOB_FAILED, CAROL_FAILED)))
    assert len(blocks) == 3
    bob, carol = blocks[1], blocks[2]
    assert bob["Original-Recipient"] == "rfc822; Bob@Remote.test"
    assert bob["Final-Recipient"] == "rfc822; bob@remote.test"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx.remote.test"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@remote.test>: no such user"
    assert email.utils.parsedate_to_datetime(bob["Last-Attempt-Date"]).timestamp() == NOW
    assert "Will-Retry-Until" not in bob
    assert carol["Final-Recipient"] == "rfc822; carol@remote.test"
    assert carol["Status"] == "5.2.2"
    assert "Original-Recipient" not in carol
    assert "Remote-MTA" not in carol
    # Not an SMTP reply: our own diagnostic, with an X- type (rfc3464 2.1.2).
    assert carol["Diagnostic-Code"] == "X-mailsvc; 5.2.2 mailbox full"


def test_long_diagnostic_folded_and_readable():
    """A long multi-line reply is folded under 78 columns and reads back whole."""
    reply = "550-5.7.1 this message was refused\r\n550 5.7.1 " + " ".join(["because"] * 40)
    data = build(outcomes=(RecipientOutcome(BOB, "5.7.1", reply, "mx.remote.test"),))
    status_part = data.split(b"message/delivery-status")[1]
    assert max(len(line) for line in status_part.split(b"\r\n")) <= 78
    expected = "smtp; 550-5.7.1 this message was refused 550 5.7.1 " + " ".join(["because"] * 40)
    assert status_blocks(data)[1]["Diagnostic-Code"] == expected


def test_delayed_has_will_retry_until():
    """A delay report says until when we retry; failures never carry that field (rfc3464 2.3.9)."""
    until = NOW + 4 * 86400
    delayed = status_blocks(build(action="delayed", retry_until=until))[1]
    assert email.utils.parsedate_to_datetime(delayed["Will-Retry-Until"]).timestamp() == until
    assert "Will-Retry-Until" not in status_blocks(build(retry_until=until))[1]


def test_bad_status_replaced_by_the_action_default():
    """A status that is not x.y.z becomes the generic one for the action."""
    outcome = RecipientOutcome(BOB, "bogus", "oops")
    assert status_blocks(build(outcomes=(outcome,)))[1]["Status"] == "5.0.0"
    assert status_blocks(build(outcomes=(outcome,), action="delayed"))[1]["Status"] == "4.0.0"


def test_human_part_explains_per_recipient():
    """The text part names each recipient, its status and the remote server's reply."""
    text = parse(build(outcomes=(BOB_FAILED, CAROL_FAILED))).get_payload()[0].get_content()
    assert "<bob@remote.test>: not delivered (status 5.1.1)" in text
    assert "mx.remote.test said: 550 5.1.1 <bob@remote.test>: no such user" in text
    assert "<carol@remote.test>: not delivered (status 5.2.2)" in text
    assert "mailbox full" in text


def test_ret_hdrs_returns_only_headers():
    """With RET=HDRS (the default) the third part holds the header section and no body."""
    for ret in (None, "HDRS", "hdrs"):
        data = build(ret=ret)
        third = parse(data).get_payload()[2]
        assert third.get_content_type() == "text/rfc822-headers"
        assert returned_bytes(data) == HEADERS
        assert b"noon" not in data


def test_ret_full_returns_the_whole_message():
    """With RET=FULL a failure report carries the original, byte for byte, as message/rfc822."""
    data = build(ret="FULL")
    third = parse(data).get_payload()[2]
    assert third.get_content_type() == "message/rfc822"
    inner = third.get_content()
    assert inner["Subject"] == "lunch"
    assert inner.get_content().replace("\r\n", "\n") == "Shall we meet at noon?\n\n-- \nAlice\n"
    assert returned_bytes(data) == ORIGINAL
    assert "The message you sent follows." in parse(data).get_payload()[0].get_content()


def test_ret_full_taken_from_the_envelope():
    """Without a ret argument the envelope's RET parameter decides."""
    envelope = ENVELOPE.evolve(parameters=(("RET", "FULL"),))
    assert parse(build(envelope=envelope)).get_payload()[2].get_content_type() == "message/rfc822"


def test_ret_full_ignored_when_nothing_failed():
    """Only failure reports return the body (rfc3461 4.3); a delay report gets headers."""
    data = build(action="delayed", ret="FULL")
    assert parse(data).get_payload()[2].get_content_type() == "text/rfc822-headers"
    assert returned_bytes(data) == HEADERS


def test_ret_full_too_large_falls_back_to_headers():
    """An original over the FULL cap is returned as headers only (rfc3461 6.2)."""
    data = build(ret="FULL", full_limit=len(ORIGINAL) - 1)
    message = parse(data)
    assert message.get_payload()[2].get_content_type() == "text/rfc822-headers"
    assert returned_bytes(data) == HEADERS
    assert "The headers of the message you sent follow." in message.get_payload()[0].get_content()
    exact = build(ret="FULL", full_limit=len(ORIGINAL))
    assert returned_bytes(exact) == ORIGINAL


def test_header_section_capped_at_whole_lines():
    """Headers beyond the cap are cut at the last whole line that fits."""
    first_two = HEADERS.split(b"\r\n", 2)
    limit = len(first_two[0]) + len(first_two[1]) + 4 + 3  # two lines and a bit of the third
    data = build(headers_limit=limit)
    assert returned_bytes(data) == first_two[0] + b"\r\n" + first_two[1] + b"\r\n"


class CountingReader(io.BytesIO):
    """A BytesIO that remembers how far it was read."""

    def furthest(self):
        return self.tell()


def test_reads_no_more_than_needed():
    """HDRS stops reading at the blank line; FULL reads at most the cap plus one octet."""
    big = HEADERS + b"\r\n" + b"x" * 1_000_000
    source = CountingReader(big)
    build_dsn("mail.example.test", ENVELOPE, (BOB_FAILED,), source, NOW)
    assert source.furthest() == len(HEADERS) + 2
    source = CountingReader(big)
    build_dsn("mail.example.test", ENVELOPE, (BOB_FAILED,), source, NOW, ret="FULL", full_limit=5000)
    assert source.furthest() == 5001


def test_eight_bit_original_survives():
    """An 8-bit original is returned byte for byte, marked 8bit, and reads back as UTF-8."""
    original = (
        b"From: Jos\xc3\xa9 <jose@example.test>\r\nSubject: caf\xc3\xa9\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
        b"\r\nD\xc3\xa9j\xc3\xa0 vu \xe2\x82\xac\r\n"
    )
    data = build(original=original, ret="FULL")
    assert returned_bytes(data) == original
    message = parse(data)
    assert message["Content-Transfer-Encoding"] == "8bit"
    third = message.get_payload()[2]
    assert third["Content-Transfer-Encoding"] == "8bit"
    assert third.get_content().get_content().rstrip() == "Déjà vu €"
    headers_only = build(original=original)
    assert returned_bytes(headers_only) == original.split(b"\r\n\r\n")[0] + b"\r\n"


def test_seven_bit_report_declares_no_8bit():
    """A report with nothing 8-bit in it carries no 8bit transfer encoding."""
    assert b"Content-Transfer-Encoding" not in build()


def test_non_ascii_recipient_and_reply():
    """A non-ASCII recipient makes the report an rfc6533 one: the address and the
    reply read back whole from the status fields, and from the text part."""
    outcome = RecipientOutcome(Recipient("josé@remote.test"), "5.1.1", "550 5.1.1 unknown: josé", "mx.remote.test")
    data = build(outcomes=(outcome,))
    status = parse(data).get_payload()[1]
    assert status.get_content_type() == "message/global-delivery-status"
    fields = email.message_from_string(status.get_content().decode("utf-8").split("\n\n")[1], policy=email.policy.default)
    assert fields["Final-Recipient"] == "utf-8; josé@remote.test"
    assert fields["Diagnostic-Code"] == "smtp; 550 5.1.1 unknown: josé"
    text = parse(data).get_payload()[0]
    assert text["Content-Transfer-Encoding"] == "quoted-printable"
    assert "<josé@remote.test>: not delivered" in text.get_content()


def test_line_ends_are_crlf():
    """Every line of the report ends in CRLF, even when the original had bare LF or CR."""
    original = b"Subject: bare\nX-Odd: a\rb\n\nline one\nline two"
    data = build(original=original, ret="FULL")
    assert re.search(rb"[^\r]\n|\r[^\n]", data) is None
    assert returned_bytes(data) == b"Subject: bare\r\nX-Odd: a\r\nb\r\n\r\nline one\r\nline two\r\n"
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


def test_boundary_never_in_content(monkeypatch):
    """A boundary that happens to occur in the original is not used."""
    tokens = iter(["aa", "bb"])
    monkeypatch.setattr(dsn.secrets, "token_hex", lambda n: next(tokens))
    data = build(original=b"X-Trap: =_mailsvc_aa\r\n\r\nbody\r\n")
    assert b'boundary="=_mailsvc_bb"' in data
    assert len(parse(data).get_payload()) == 3


def test_unknown_action_refused():
    """Only the rfc3464 actions this server reports are accepted."""
    with pytest.raises(ValueError):
        build(action="exploded")


def test_null_sender_gets_no_bounce():
    """No report ever goes to the null sender <> (rfc5321 4.5.5); others get one."""
    assert should_bounce(ENVELOPE.evolve(sender="")) is False
    assert should_bounce(ENVELOPE) is True


@pytest.mark.parametrize(
    "action, notify, wanted",
    [
        ("failed", None, True),
        ("delayed", None, True),
        ("delivered", None, False),
        ("relayed", None, False),
        ("failed", "NEVER", False),
        ("delayed", "never", False),
        ("delivered", "SUCCESS", True),
        ("relayed", "Success,Failure", True),
        ("failed", "SUCCESS", False),
        ("failed", "SUCCESS,FAILURE", True),
        ("delayed", "FAILURE", False),
        ("delayed", "FAILURE, DELAY", True),
    ],
)
def test_wants_dsn_follows_notify(action, notify, wanted):
    """rfc3461 4.1: NOTIFY says which reports the sender wants; absent means FAILURE,DELAY."""
    assert wants_dsn(action, notify) is wanted


def test_empty_original_leaves_out_the_third_part():
    """With nothing to return the report has two parts and does not promise a copy."""
    message = parse(build(original=b""))
    assert [part.get_content_type() for part in message.iter_parts()] == ["text/plain", "message/delivery-status"]
    assert "follow" not in message.get_payload()[0].get_content()
