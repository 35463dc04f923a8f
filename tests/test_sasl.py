"""``mailsvc.smtp.sasl``: strict base64 and each mechanism, with the RFCs' own vectors."""

from __future__ import annotations

import base64

import pytest

from mailsvc.smtp import sasl


@pytest.mark.parametrize(
    "text, expected",
    [("=", b""), ("dGVzdAB0ZXN0ADEyMzQ=", b"test\0test\x001234"), ("AAAA", b"\0\0\0")],
)
def test_decode_accepts_base64_and_the_empty_response(text, expected):
    """rfc4954 4: base64, and "=" for an empty response."""
    assert sasl.decode(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "=AAA", "AAA=BBBB", "AB$=", "YQ==YQ==", "élan===", "A A="])
def test_decode_refuses_anything_not_strict_base64(text):
    """rfc4954 4: characters outside the alphabet and padding in the middle MUST be rejected."""
    with pytest.raises(sasl.SASLError) as info:
        sasl.decode(text)
    assert info.value.kind == "encoding"


# ------------------------------------------------------------------ PLAIN


@pytest.mark.parametrize(
    "message, authzid, authcid, password",
    [
        (b"\0tim\0tanstaaftanstaaf", "", "tim", "tanstaaftanstaaf"),  # rfc4616 4
        (b"Ursel\0Kurt\0xipj3plmq", "Ursel", "Kurt", "xipj3plmq"),  # rfc4616 4
        ("\0jos\u00e9\0p\u00e4ss".encode(), "", "jos\u00e9", "p\u00e4ss"),  # UTF-8
    ],
)
def test_plain_forms(message, authzid, authcid, password):
    """rfc4616 2: [authzid] NUL authcid NUL passwd, with and without authzid."""
    creds = sasl.parse_plain(message)
    assert (creds.authzid, creds.authcid, creds.password) == (authzid, authcid, password)


@pytest.mark.parametrize("message", [b"tim\0pw", b"\0\0pw", b"\0tim\0", b"a\0b\0c\0d", b"\0" + b"x" * 256 + b"\0pw", b"\0\xff\0pw"])
def test_plain_refuses_malformed_messages(message):
    """Too few or too many NULs, an empty name or password, an over-long field, bad UTF-8."""
    with pytest.raises(sasl.SASLError):
        sasl.parse_plain(message)


def test_plain_exchange_with_and_without_initial_response():
    """With an initial response PLAIN ends at once; without, it asks with an empty challenge."""
    assert sasl.Plain().start(b"\0a\0b") == sasl.PasswordCredentials("a", "b")
    exchange = sasl.Plain()
    assert exchange.start(None) == sasl.Challenge(b"")
    assert exchange.respond(b"\0a\0b") == sasl.PasswordCredentials("a", "b")


# ------------------------------------------------------------------ LOGIN


def test_login_asks_for_name_then_password():
    """LOGIN: "Username:" then "Password:"; an initial response is the user name."""
    exchange = sasl.Login()
    assert exchange.start(None) == sasl.Challenge(b"Username:")
    assert exchange.respond(b"alice") == sasl.Challenge(b"Password:")
    assert exchange.respond(b"secret") == sasl.PasswordCredentials("alice", "secret")
    exchange = sasl.Login()
    assert exchange.start(b"alice") == sasl.Challenge(b"Password:")


def test_login_refuses_empty_answers():
    """An empty user name or password is not credentials."""
    with pytest.raises(sasl.SASLError):
        sasl.Login().start(b"")


# ------------------------------------------------------------------ CRAM-MD5


RFC2195_CHALLENGE = b"<1896.697170952@postoffice.reston.mci.net>"


def test_cram_md5_rfc2195_vector():
    """rfc2195 2: tim / tanstaaftanstaaf over <1896.697170952@postoffice.reston.mci.net>
    gives "tim b913a602c7eda7a495b4e6e7334d3890"."""
    assert sasl.cram_md5_digest(b"tanstaaftanstaaf", RFC2195_CHALLENGE) == "b913a602c7eda7a495b4e6e7334d3890"
    exchange = sasl.CramMD5(RFC2195_CHALLENGE)
    assert exchange.start(None) == sasl.Challenge(RFC2195_CHALLENGE)
    creds = exchange.respond(b"tim b913a602c7eda7a495b4e6e7334d3890")
    assert creds == sasl.CramMD5Credentials("tim", RFC2195_CHALLENGE, "b913a602c7eda7a495b4e6e7334d3890")
    assert creds.verify(b"tanstaaftanstaaf") and not creds.verify(b"wrong")


def test_cram_md5_challenge_is_a_msg_id():
    """rfc2195 2: <random.timestamp@hostname>."""
    assert sasl.cram_md5_challenge("mx.test", 1896, 697170952) == b"<1896.697170952@mx.test>"
    made = sasl.cram_md5_challenge("mx.test")
    assert made.startswith(b"<") and made.endswith(b"@mx.test>") and made != sasl.cram_md5_challenge("mx.test")


@pytest.mark.parametrize("answer", [b"tim", b"tim xyz", b" b913a602c7eda7a495b4e6e7334d3890", b"tim b913a602c7eda7a495b4e6e7334d389"])
def test_cram_md5_refuses_malformed_answers(answer):
    """The answer is "user SP 32-hex-digits"."""
    with pytest.raises(sasl.SASLError):
        sasl.CramMD5(RFC2195_CHALLENGE).respond(answer)


def test_cram_md5_refuses_an_initial_response():
    """rfc4954 4: an initial response to a server-first mechanism is 501 5.7.0."""
    with pytest.raises(sasl.SASLError) as info:
        sasl.CramMD5(RFC2195_CHALLENGE).start(b"tim 00")
    assert info.value.kind == "sequence"


# ------------------------------------------------------------------ SCRAM-SHA-256

# rfc7677 3: user "user", password "pencil".
CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
CLIENT_FINAL = f"c=biws,r={CLIENT_NONCE}{SERVER_NONCE},p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_scram_sha256_rfc7677_vector():
    """rfc7677 3's whole exchange: server-first and server-final exactly as printed there."""
    exchange = sasl.ScramSHA256(nonce=SERVER_NONCE)
    assert exchange.start(f"n,,n=user,r={CLIENT_NONCE}".encode()) == sasl.Lookup("user")
    first = exchange.keys_found(sasl.scram_keys("pencil", SALT, 4096))
    assert first.data == f"r={CLIENT_NONCE}{SERVER_NONCE},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096".encode()
    assert exchange.respond(CLIENT_FINAL.encode()) == sasl.Challenge(SERVER_FINAL)
    assert exchange.respond(b"") == sasl.ScramCredentials("user", True)


def test_scram_wrong_password_is_not_verified():
    """A proof made with another password fails, and no server signature is sent."""
    exchange = sasl.ScramSHA256(nonce=SERVER_NONCE)
    exchange.start(f"n,,n=user,r={CLIENT_NONCE}".encode())
    exchange.keys_found(sasl.scram_keys("not pencil", SALT, 4096))
    assert exchange.respond(CLIENT_FINAL.encode()) == sasl.ScramCredentials("user", False)


def test_scram_unknown_user_gets_a_stable_fake_salt():
    """No such user: the exchange goes on with a salt that does not tell so, and fails."""
    salts = []
    for _ in range(2):
        exchange = sasl.ScramSHA256(nonce=SERVER_NONCE, fake_salt_key=b"k")
        exchange.start(f"n,,n=nobody,r={CLIENT_NONCE}".encode())
        salts.append(exchange.keys_found(None).data.split(b",")[1])
        assert exchange.respond(CLIENT_FINAL.replace("biws", "biws").encode()).verified is False
    assert salts[0] == salts[1]


@pytest.mark.parametrize(
    "first",
    [b"p=tls-unique,,n=user,r=abc", b"n,,r=abc", b"n,,n=user", b"x,,n=user,r=abc", b"n,,n=us=er,r=abc", b"n,,m=ext,n=user,r=a"],
)
def test_scram_refuses_malformed_client_first(first):
    """Channel binding asked (p=), missing n= or r=, bad gs2 flag, bad name escape, mandatory extension."""
    with pytest.raises(sasl.SASLError):
        sasl.ScramSHA256().start(first)


def test_scram_refuses_a_wrong_nonce():
    """The client-final nonce must be the combined one."""
    exchange = sasl.ScramSHA256(nonce=SERVER_NONCE)
    exchange.start(f"n,,n=user,r={CLIENT_NONCE}".encode())
    exchange.keys_found(sasl.scram_keys("pencil", SALT, 4096))
    with pytest.raises(sasl.SASLError):
        exchange.respond(CLIENT_FINAL.replace(SERVER_NONCE, "other").encode())
