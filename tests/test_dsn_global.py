"""Internationalized delivery reports (rfc6533), as a mail reader parses them.

A report on a message received with SMTPUTF8, or naming an address that is
not ASCII, is a multipart/report of message/global-delivery-status with
``utf-8`` typed addresses, returns the original as message/global or
message/global-headers, and is queued with SMTPUTF8. All-ASCII mail keeps
the rfc3464 report.
"""

from __future__ import annotations

import email
import email.policy
import io
import re

import pytest

from mailsvc.delivery.bounce import DOUBLE_BOUNCE, Bouncer
from mailsvc.delivery.dsn import RecipientOutcome, build_dsn
from mailsvc.delivery.relayoutcome import envelope_transaction
from mailsvc.envelope import Envelope, Recipient
from mailsvc.smtp.client_commands import mail_command
from mailsvc.spool.filespool import FileSpool
from test_bounce import queue, system
from test_protocol import TableDirectory

NOW = 1763899999.0
HEADERS = "From: Jörg <jörg@bücher.test>\r\nTo: bob@remote.test\r\nSubject: Grüße\r\n".encode()
ORIGINAL = HEADERS + "\r\nBis später!\r\n".encode()
ASCII_ORIGINAL = b"From: alice@example.test\r\nSubject: lunch\r\n\r\nnoon?\r\n"
SMTPUTF8 = Envelope(sender="alice@example.test", recipients=(), parameters=(("SMTPUTF8", ""),), received_at=NOW - 60)
ASCII = Envelope(sender="alice@example.test", recipients=(), received_at=NOW - 60)
JOERG = Recipient("jörg@bücher.test", "Jörg@Bücher.test")
BOB = Recipient("bob@remote.test", "Bob@Remote.test")


def failed(recipient, status="5.1.1", diagnostic="550 5.1.1 unknown user"):
    return RecipientOutcome(recipient, status, diagnostic, "mx.remote.test")


def build(envelope=SMTPUTF8, outcomes=None, original=ORIGINAL, **kwargs):
    outcomes = (failed(BOB),) if outcomes is None else outcomes
    return build_dsn("mail.example.test", envelope, outcomes, io.BytesIO(original), NOW, **kwargs)


def parse(data):
    """The report parsed as a mail reader would: its header fields are UTF-8 (rfc6532 3)."""
    return email.message_from_string(data.decode("utf-8"), policy=email.policy.SMTPUTF8)


def raw_part(data, index):
    """The header section and body of part ``index`` as written on the wire."""
    head, _, rest = data.partition(b"\r\n\r\n")
    boundary = re.search(rb'boundary="([^"]+)"', head).group(1)
    part = rest.split(b"\r\n--" + boundary)[index + 1]
    headers, _, body = part.lstrip(b"\r\n").partition(b"\r\n\r\n")
    return headers, body


def global_blocks(data):
    """The field groups of the message/global-delivery-status part: per-message, then per recipient."""
    assert parse(data).get_payload()[1].get_content_type() == "message/global-delivery-status"
    body = raw_part(data, 1)[1].decode("utf-8")  # rfc6533 6.4: UTF-8
    return [email.message_from_string(block, policy=email.policy.default) for block in body.split("\r\n\r\n") if block]


def decode_unitext(value):
    """rfc6533 3's utf-8-addr-unitext decoded, strictly: only QUCHAR and \\x{HEX}."""
    out = []
    for escape, char in re.findall(r"(\\x\{[0-9A-F]{2,6}\})|(.)", value, re.S):
        if escape:
            point = int(escape[3:-1], 16)
            assert escape[3] != "0" or len(escape) == 6, f"leading zero in {escape}"
            assert not 0xD800 <= point <= 0xDFFF
            out.append(chr(point))
        else:
            assert ord(char) >= 0x80 or (0x21 <= ord(char) <= 0x7E and char not in "\\+="), f"raw {char!r}"
            out.append(char)
    return "".join(out)


def typed(value):
    """``(type, address)`` of an rfc3464 address field, the utf-8 form decoded."""
    kind, _, address = value.partition(";")
    address = address.strip()
    return kind, decode_unitext(address) if kind == "utf-8" else address


def test_smtputf8_message_gets_a_global_report():
    """SMTPUTF8 mail: report-type global-delivery-status, global status part, headers as message/global-headers."""
    message = parse(build())
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "global-delivery-status"
    assert [part.get_content_type() for part in message.iter_parts()] == [
        "text/plain",
        "message/global-delivery-status",
        "message/global-headers",
    ]
    assert message.defects == []


def test_ascii_addresses_in_a_global_report_stay_rfc822():
    """rfc3464 rfc822 type is still used for an ASCII address in a global report."""
    bob = global_blocks(build())[1]
    assert bob["Final-Recipient"] == "rfc822; bob@remote.test"
    assert bob["Original-Recipient"] == "rfc822; Bob@Remote.test"
    assert bob["Action"] == "failed" and bob["Status"] == "5.1.1"


def test_utf8_recipient_and_orcpt_are_typed_utf8():
    """rfc6533 3: Final-Recipient and Original-Recipient of a UTF-8 address are 'utf-8; <address>'."""
    chinese = Recipient("用户@例子.测试")
    blocks = global_blocks(build(envelope=ASCII, outcomes=(failed(JOERG), failed(chinese))))
    assert blocks[1]["Final-Recipient"] == "utf-8; jörg@bücher.test"
    assert blocks[1]["Original-Recipient"] == "utf-8; Jörg@Bücher.test"
    assert blocks[2]["Final-Recipient"] == "utf-8; 用户@例子.测试"
    assert "Original-Recipient" not in blocks[2]


def test_non_ascii_recipient_makes_a_report_global_without_smtputf8():
    """An ASCII envelope without SMTPUTF8 but a UTF-8 recipient still gets the global report."""
    message = parse(build(envelope=ASCII, outcomes=(failed(JOERG),)))
    assert message.get_param("report-type") == "global-delivery-status"
    assert message.get_payload()[1]["Content-Transfer-Encoding"] == "8bit"


def test_non_ascii_orcpt_alone_makes_a_report_global():
    """Only the ORCPT is not ASCII: it is kept whole, so the report is global."""
    outcome = failed(Recipient("bob@remote.test", "böb@remote.test"))
    blocks = global_blocks(build(envelope=ASCII, outcomes=(outcome,), original=ASCII_ORIGINAL))
    assert blocks[1]["Original-Recipient"] == "utf-8; böb@remote.test"
    assert blocks[1]["Final-Recipient"] == "rfc822; bob@remote.test"


def test_utf8_sender_gets_the_report_addressed_in_utf8():
    """A UTF-8 envelope sender: the report is global and To: carries the address raw (rfc6532)."""
    envelope = ASCII.evolve(sender="jörg@bücher.test")
    data = build(envelope=envelope)
    message = parse(data)
    assert message.get_param("report-type") == "global-delivery-status"
    assert message["To"].addresses[0].addr_spec == "jörg@bücher.test"
    assert "To: <jörg@bücher.test>\r\n".encode() in data  # not an rfc2047 encoded-word
    data.decode("utf-8")  # the whole report is valid UTF-8


def test_ret_full_returns_message_global():
    """RET=FULL: the original, byte for byte, as message/global (rfc6532 3.7), readable with its UTF-8 headers."""
    data = build(ret="FULL")
    third = parse(data).get_payload()[2]
    assert third.get_content_type() == "message/global"
    assert third["Content-Transfer-Encoding"] == "8bit"
    inner = third.get_payload()[0]
    assert inner["Subject"] == "Grüße"
    assert inner["From"].addresses[0].addr_spec == "jörg@bücher.test"
    assert raw_part(data, 2)[1] == ORIGINAL
    assert "The message you sent follows." in parse(data).get_payload()[0].get_content()


def test_headers_only_returns_message_global_headers():
    """RET=HDRS, a delay report, or a too-large original: the header section as message/global-headers."""
    for kwargs in ({}, {"ret": "HDRS"}, {"action": "delayed", "ret": "FULL"}, {"ret": "FULL", "full_limit": len(ORIGINAL) - 1}):
        data = build(**kwargs)
        third = parse(data).get_payload()[2]
        assert third.get_content_type() == "message/global-headers"
        assert third.get_payload()[0]["Subject"] == "Grüße"
        assert raw_part(data, 2)[1] == HEADERS


@pytest.mark.parametrize("action", ["failed", "delayed", "delivered", "relayed"])
def test_every_kind_of_report_can_be_global(action):
    """Delay and success reports follow the same rule as bounces."""
    data = build(envelope=ASCII, outcomes=(RecipientOutcome(JOERG, "2.0.0" if action in ("delivered", "relayed") else "4.4.1"),),
                 action=action, retry_until=NOW + 3600)
    block = global_blocks(data)[1]
    assert block["Action"] == action
    assert block["Final-Recipient"] == "utf-8; jörg@bücher.test"


def test_all_ascii_mail_keeps_the_rfc3464_report():
    """No SMTPUTF8, no UTF-8 address: message/delivery-status and text/rfc822-headers, 7-bit, as before."""
    data = build(envelope=ASCII, original=ASCII_ORIGINAL)
    message = parse(data)
    assert message.get_param("report-type") == "delivery-status"
    assert [part.get_content_type() for part in message.iter_parts()] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert data.isascii()
    assert b"global" not in data and b"utf-8;" not in data


def test_human_part_is_readable_utf8():
    """The text part names the UTF-8 recipient as it is (text/plain; charset=utf-8)."""
    text = parse(build(outcomes=(failed(JOERG),))).get_payload()[0]
    assert text.get_content_type() == "text/plain"
    assert text.get_param("charset") == "utf-8"
    assert "<jörg@bücher.test>: not delivered (status 5.1.1)" in text.get_content()


def test_utf8_diagnostic_is_kept():
    """In message/global-delivery-status the SMTP reply may be UTF-8; it is not turned into '?'."""
    block = global_blocks(build(outcomes=(failed(JOERG, diagnostic="550 5.1.1 Benutzer unbekannt: jörg"),)))[1]
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 Benutzer unbekannt: jörg"


@pytest.mark.parametrize(
    "address, written",
    [
        ("jö\\rg@x.test", r"jö\x{5C}rg@x.test"),
        ("jö\x01rg@x.test", r"jö\x{01}rg@x.test"),
        ("jö\x00rg@x.test", r"jö\x{00}rg@x.test"),
        ("jö\x7frg@x.test", r"jö\x{7F}rg@x.test"),
        ("jö rg@x.test", r"jö\x{20}rg@x.test"),
        ("jörg+tag@x.test", r"jörg\x{2B}tag@x.test"),
        ("jörg=1@x.test", r"jörg\x{3D}1@x.test"),
        ("jö\u0085rg@x.test", r"jö\x{85}rg@x.test"),  # NEL: a C1 control, a line break to some
        ("jö\u00a0rg@x.test", r"jö\x{A0}rg@x.test"),  # no-break space
        ("jö\u2028rg@x.test", r"jö\x{2028}rg@x.test"),  # line separator
        ("jö\u202erg@x.test", r"jö\x{202E}rg@x.test"),  # right-to-left override
        ("سلام\u200cدنیا@x.test", "سلام\u200cدنیا@x.test"),  # ZWNJ: part of the spelling, kept
    ],
)
def test_specials_in_utf8_addresses_are_escaped(address, written):
    """rfc6533 3: what QUCHAR does not allow (controls, SP, '\\', '+', '=') is written \\x{HEX}, never raw."""
    data = build(outcomes=(failed(Recipient(address)),))
    block = global_blocks(data)[1]
    assert block["Final-Recipient"] == f"utf-8; {written}"
    assert typed(block["Final-Recipient"]) == ("utf-8", address)
    status = raw_part(data, 1)[1]
    assert re.search(rb"[\x00-\x09\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|(?<!\r)\n", status) is None
    assert re.search(rb"\\(?!x\{[0-9A-F]+\})", status) is None


def test_line_ends_in_an_orcpt_cannot_add_fields():
    """A decoded ORCPT holding CR LF stays one field: escaped, it reads back as it was."""
    original = "jörg\r\nAction: delivered\r\n\r\nX-Injected: yes@x.test"
    block = global_blocks(build(outcomes=(failed(Recipient("jörg@x.test", original)),)))[1]
    assert block.get_all("Action") == ["failed"]
    assert "X-Injected" not in block
    assert typed(block["Original-Recipient"]) == ("utf-8", original)


def test_ascii_address_with_specials_in_a_global_report_is_escaped_too():
    """An ASCII address with a backslash or a control goes as utf-8 with \\x{HEX}, not raw as rfc822."""
    blocks = global_blocks(build(outcomes=(failed(Recipient('"a\\b"@x.test')), failed(Recipient("a\tb@x.test")))))
    assert blocks[1]["Final-Recipient"] == 'utf-8; "a\\x{5C}b"@x.test'
    assert blocks[2]["Final-Recipient"] == "utf-8; a\\x{09}b@x.test"


def test_lone_surrogate_becomes_a_replacement_character():
    """An octet that was not UTF-8 (a surrogate escape) cannot be named: U+FFFD, and the report is valid UTF-8."""
    data = build(envelope=SMTPUTF8.evolve(sender="j\udcf6rg@x.test"), outcomes=(failed(Recipient("j\udcf6rg@y.test", "j\udcf6@y.test")),))
    data.decode("utf-8")
    block = global_blocks(data)[1]
    assert block["Final-Recipient"] == "utf-8; j\ufffdrg@y.test"
    assert block["Original-Recipient"] == "utf-8; j\ufffd@y.test"


def test_long_utf8_address_is_cut_between_characters():
    """An over-long (decoded ORCPT) address is folded within 998 octets a line, never inside a \\x{HEX}."""
    original = "日本" * 200 + "\\" * 100 + "@x.test"
    data = build(outcomes=(failed(Recipient("a@x.test", original)),))
    status = raw_part(data, 1)[1]
    assert max(len(line) for line in status.split(b"\r\n")) <= 998
    assert re.search(rb"\\(?!x\{5C\})", status) is None
    status.decode("utf-8")  # no character cut in two


# The report as queued by the Bouncer: its envelope.


def bouncer(tmp_path, queued):
    spool = FileSpool(tmp_path / "spool")
    directory = TableDirectory(users=("carol",), aliases={"postmaster": ["carol"]})
    return spool, Bouncer(spool, directory, "mx.test", submit=queued.append, now=lambda: NOW)


def report_on(tmp_path, envelope, original=ORIGINAL):
    """Bounce every recipient of ``envelope``: the queued report and its bytes."""
    queued = []
    spool, b = bouncer(tmp_path, queued)
    writer = spool.newMessage()
    writer.write(original)
    message = writer.commit(envelope, {"relay": envelope.recipients})[0]
    result = []
    b.report(message, list(envelope.recipients), "failed").addCallback(result.append)
    [[report]] = result
    assert queued == [report]
    with spool.open(report) as f:
        return report, f.read()


def failing(address, original=""):
    return Recipient(address, original, last_error="5.1.1 host mx.far.test said: 550 5.1.1 unknown")


def test_global_report_is_queued_with_smtputf8(tmp_path):
    """The report on an SMTPUTF8 message goes from <> with SMTPUTF8 (and BODY=8BITMIME: it is 8-bit)."""
    envelope = Envelope(sender="carol@example.test", recipients=(failing("jörg@far.test"),), parameters=(("SMTPUTF8", ""),))
    report, data = report_on(tmp_path, envelope)
    assert report.envelope.sender == ""
    assert report.envelope.parameter("SMTPUTF8") == ""
    assert report.envelope.parameter("BODY") == "8BITMIME"
    assert parse(data).get_param("report-type") == "global-delivery-status"
    assert global_blocks(data)[1]["Final-Recipient"] == "utf-8; jörg@far.test"


def test_global_report_to_a_utf8_sender_is_relayed_with_smtputf8(tmp_path):
    """A UTF-8 sender far away: the report is relayed as 'MAIL FROM:<> SMTPUTF8' to that address."""
    envelope = Envelope(sender="jörg@bücher.test", recipients=(failing("bob@far.test"),))
    report, data = report_on(tmp_path, envelope, ASCII_ORIGINAL)
    assert report.hop == "relay"
    assert [r.address for r in report.envelope.recipients] == ["jörg@bücher.test"]
    assert report.envelope.parameter("SMTPUTF8") == ""
    assert parse(data)["To"].addresses[0].addr_spec == "jörg@bücher.test"
    transaction, addresses, errors = envelope_transaction(report.envelope, ["jörg@bücher.test"], len(data))
    assert (addresses, errors) == (["jörg@bücher.test"], {})
    assert mail_command(transaction.sender, transaction.mail_params) == b"MAIL FROM:<> SMTPUTF8\r\n"


def test_ascii_report_is_queued_as_before(tmp_path):
    """All-ASCII mail: the report's envelope has no SMTPUTF8 (nor any other parameter)."""
    envelope = Envelope(sender="carol@example.test", recipients=(failing("bob@far.test"),))
    report, data = report_on(tmp_path, envelope, ASCII_ORIGINAL)
    assert report.envelope.parameters == ()
    assert parse(data).get_param("report-type") == "delivery-status"


def test_double_bounce_of_a_global_report_stays_global(tmp_path):
    """A global report that failed goes to postmaster marked as a double bounce, with SMTPUTF8."""
    envelope = Envelope(sender="", recipients=(failing("jörg@bücher.test"),), parameters=(("SMTPUTF8", ""),))
    report, data = report_on(tmp_path, envelope)
    assert report.envelope.parameter(DOUBLE_BOUNCE) == "yes"
    assert report.envelope.parameter("SMTPUTF8") == ""
    assert [r.mailbox for r in report.envelope.recipients] == ["carol"]


def test_local_sender_receives_the_global_bounce(tmp_path):
    """End to end: an SMTPUTF8 message to a refusing mailbox; the sender's copy is the global report."""
    spool, store, runner = system(tmp_path, refuse={"bob"})
    runner.submit(queue(spool, "carol@example.test", "bob", parameters=(("SMTPUTF8", ""),)))
    [bounce] = store.messages["carol"]
    report = parse(bounce)
    assert report.get_param("report-type") == "global-delivery-status"
    text, status, returned = report.iter_parts()
    assert status.get_content_type() == "message/global-delivery-status"
    assert returned.get_content_type() == "message/global-headers"
    assert b"Final-Recipient: rfc822; bob@example.test" in bounce
    assert spool.queued() == []


def test_bad_addresses_do_not_stop_the_report(tmp_path):
    """A recipient with a backslash and an ORCPT with a NUL: the report is still queued, both escaped."""
    r = failing("jö\\rg@far.test", "jö\x00rg@far.test")
    envelope = Envelope(sender="carol@example.test", recipients=(r,))
    report, data = report_on(tmp_path, envelope)
    assert report.envelope.parameter("SMTPUTF8") == ""
    block = global_blocks(data)[1]
    assert block["Final-Recipient"] == "utf-8; jö\\x{5C}rg@far.test"
    assert block["Original-Recipient"] == "utf-8; jö\\x{00}rg@far.test"
