"""SASL mechanisms for SMTP AUTH, server side, as pure code: no I/O, no Twisted.

rfc4954 carries SASL in SMTP: the server sends challenges (334 + base64), the
client answers with base64 lines. This module holds what every mechanism
needs and nothing about sockets or password files:

- ``decode`` / ``encode``: the strict base64 of rfc4954 4 (``=`` is an empty
  initial response; anything outside the alphabet or padding in the middle is
  an error).
- One exchange class per mechanism: ``Plain`` (rfc4616), ``Login`` (the
  de-facto "Username:"/"Password:" dialogue), ``CramMD5`` (rfc2195: the
  challenge ``<random.timestamp@host>``, the answer ``user hex(HMAC-MD5)``)
  and ``ScramSHA256`` (rfc5802 with rfc7677's SHA-256, no channel binding).
- ``start(initial)`` and ``respond(data)`` return the next ``Step``: a
  ``Challenge`` to send, a ``Lookup`` (SCRAM needs the user's salt before it
  can answer), or the credentials to check (``PasswordCredentials``,
  ``CramMD5Credentials``, ``ScramCredentials``). A malformed message raises
  ``SASLError``, whose ``kind`` says which reply fits (rfc4954 4, 6).

Checking credentials against stored secrets is ``mailsvc.auth``'s job,
through ``twisted.cred``; the verification math lives here (``cram_md5_digest``,
``scram_keys``, ``ScramCredentials.verify``) so that it can be tested alone.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field

# rfc4954 4: 12288 octets is enough for every deployed mechanism.
MAX_RESPONSE_LINE = 12288
# rfc4616 2: authzid, authcid and passwd are at most 255 octets each.
MAX_PLAIN_FIELD = 255

# Mechanisms that send the password itself: they need TLS (rfc4954 4, last note).
PLAINTEXT_MECHANISMS = frozenset({"PLAIN", "LOGIN"})


class SASLError(Exception):
    """A client message the mechanism cannot accept.

    ``kind`` is ``"encoding"`` (not base64: 501 5.5.2), ``"sequence"`` (an
    initial response the mechanism does not take: 501 5.7.0) or ``"syntax"``
    (a malformed message: 535 5.7.8, as for bad credentials, so that a
    prober learns nothing more).
    """

    def __init__(self, text: str, kind: str = "syntax") -> None:
        super().__init__(text)
        self.kind = kind


def decode(text: str) -> bytes:
    """The octets of a client response (rfc4954 4): strict base64, ``=`` for empty.

    :raise SASLError: (``kind="encoding"``) on any character outside the
        alphabet, padding anywhere but at the end, or a bad length.
    """
    if text == "=":
        return b""
    if not text or len(text) % 4 or not text.isascii():
        raise SASLError("not base64", "encoding")
    try:
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, ValueError):
        raise SASLError("not base64", "encoding") from None


def encode(data: bytes) -> str:
    """A server challenge in base64 (``""`` for an empty one: "334 ")."""
    return base64.b64encode(data).decode("ascii")


# ---------------------------------------------------------------- steps


@dataclass(frozen=True)
class Challenge:
    """Send ``data`` to the client as ``334 <base64>`` and wait for its answer."""

    data: bytes


@dataclass(frozen=True)
class Lookup:
    """The mechanism needs the stored SCRAM keys of ``username`` to go on:
    call ``ScramSHA256.keys_found(keys or None)``."""

    username: str


@dataclass(frozen=True)
class PasswordCredentials:
    """A name and password in clear (PLAIN, LOGIN). ``authzid`` is the identity
    asked to act as (``""``: the same as ``authcid``)."""

    authcid: str
    password: str = field(repr=False)
    authzid: str = ""


@dataclass(frozen=True)
class CramMD5Credentials:
    """A CRAM-MD5 answer: ``username`` and the hex ``digest`` of ``challenge``."""

    username: str
    challenge: bytes
    digest: str

    def verify(self, secret: bytes) -> bool:
        """Whether ``digest`` is HMAC-MD5(``secret``, ``challenge``) (rfc2195 2)."""
        return hmac.compare_digest(cram_md5_digest(secret, self.challenge), self.digest)


@dataclass(frozen=True)
class ScramCredentials:
    """A finished SCRAM exchange: the proof was checked against the stored
    keys; ``verified`` says whether it matched."""

    username: str
    verified: bool
    authzid: str = ""


Step = Challenge | Lookup | PasswordCredentials | CramMD5Credentials | ScramCredentials


class Exchange:
    """One SASL exchange, server side. Subclasses are the mechanisms.

    ``client_first`` mechanisms may take an initial response with AUTH;
    server-first ones refuse it (rfc4954 4: 501 5.7.0).
    """

    name = ""
    client_first = True

    def start(self, initial: bytes | None) -> Step:
        """Begin, with the decoded initial response (``None`` if none was sent)."""
        raise NotImplementedError

    def respond(self, data: bytes) -> Step:
        """The client's decoded answer to the last challenge."""
        raise NotImplementedError


def _text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLError(f"{what} is not UTF-8") from None


# ---------------------------------------------------------------- PLAIN


def parse_plain(message: bytes) -> PasswordCredentials:
    """rfc4616 2: ``[authzid] NUL authcid NUL passwd``, UTF-8, no empty authcid or passwd.

    :raise SASLError: the message is not of that form.
    """
    parts = message.split(b"\0")
    if len(parts) != 3:
        raise SASLError("PLAIN needs authzid NUL authcid NUL passwd")
    authzid, authcid, passwd = parts
    if not authcid or not passwd:
        raise SASLError("PLAIN needs a user name and a password")
    if any(len(p) > MAX_PLAIN_FIELD for p in parts):
        raise SASLError(f"PLAIN fields are at most {MAX_PLAIN_FIELD} octets")
    return PasswordCredentials(_text(authcid, "authcid"), _text(passwd, "passwd"), _text(authzid, "authzid"))


class Plain(Exchange):
    """rfc4616 PLAIN: one message, with the initial response or after an empty 334."""

    name = "PLAIN"

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Challenge(b"")  # rfc4954 4: "334 " and the client sends the message
        return parse_plain(initial)

    def respond(self, data: bytes) -> Step:
        return parse_plain(data)


# ---------------------------------------------------------------- LOGIN


class Login(Exchange):
    """LOGIN (draft-murchison-sasl-login): "Username:" then "Password:".
    A user name sent as the initial response skips the first question."""

    name = "LOGIN"

    def __init__(self) -> None:
        self._username: str | None = None

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Challenge(b"Username:")
        return self.respond(initial)

    def respond(self, data: bytes) -> Step:
        if self._username is None:
            if not data or len(data) > MAX_PLAIN_FIELD:
                raise SASLError("LOGIN needs a user name")
            self._username = _text(data, "user name")
            return Challenge(b"Password:")
        if not data or len(data) > MAX_PLAIN_FIELD:
            raise SASLError("LOGIN needs a password")
        return PasswordCredentials(self._username, _text(data, "password"))


# ---------------------------------------------------------------- CRAM-MD5


def cram_md5_challenge(hostname: str, random: int | None = None, timestamp: int | None = None) -> bytes:
    """rfc2195 2: ``<random.timestamp@hostname>``, an rfc822 msg-id."""
    random = secrets.randbits(63) if random is None else random
    timestamp = int(time.time()) if timestamp is None else timestamp
    return f"<{random}.{timestamp}@{hostname}>".encode("ascii")


def cram_md5_digest(secret: bytes, challenge: bytes) -> str:
    """HMAC-MD5 of ``challenge`` keyed with ``secret``, in lower-case hex (rfc2195 2, rfc2104)."""
    return hmac.new(secret, challenge, hashlib.md5).hexdigest()


class CramMD5(Exchange):
    """rfc2195 CRAM-MD5: the server speaks first, the client answers ``user digest``."""

    name = "CRAM-MD5"
    client_first = False

    def __init__(self, challenge: bytes) -> None:
        self.challenge = challenge

    def start(self, initial: bytes | None) -> Step:
        if initial is not None:
            raise SASLError("CRAM-MD5 takes no initial response", "sequence")
        return Challenge(self.challenge)

    def respond(self, data: bytes) -> Step:
        username, _, digest = _text(data, "response").rpartition(" ")
        digest = digest.lower()
        if not username or len(digest) != 32 or any(c not in "0123456789abcdef" for c in digest):
            raise SASLError("CRAM-MD5 needs 'user hexdigest'")
        return CramMD5Credentials(username, self.challenge, digest)


# ---------------------------------------------------------------- SCRAM-SHA-256


@dataclass(frozen=True)
class ScramKeys:
    """What a server stores for SCRAM-SHA-256 (rfc5802 3): not the password,
    and not enough to log in as the user (``stored_key`` is a hash of the
    client key)."""

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


def scram_keys(password: str, salt: bytes, iterations: int = 4096) -> ScramKeys:
    """rfc5802 3 with SHA-256 (rfc7677): SaltedPassword = Hi(password, salt, i),
    StoredKey = H(HMAC(SaltedPassword, "Client Key")), ServerKey = HMAC(SaltedPassword, "Server Key").

    The password is used as UTF-8 without SASLprep (fine for ASCII passwords).
    """
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    return ScramKeys(salt, iterations, hashlib.sha256(client_key).digest(), server_key)


def _scram_attributes(message: str) -> list[tuple[str, str]]:
    out = []
    for part in message.split(","):
        key, eq, value = part.partition("=")
        if len(key) != 1 or not eq:
            raise SASLError("malformed SCRAM message")
        out.append((key, value))
    return out


def _scram_name(value: str) -> str:
    """rfc5802 5.1: ``=2C`` is a comma, ``=3D`` an equals sign; any other ``=`` is an error."""
    if value.replace("=2C", "").replace("=3D", "").count("="):
        raise SASLError("malformed SCRAM user name")
    return value.replace("=2C", ",").replace("=3D", "=")


class ScramSHA256(Exchange):
    """rfc5802 / rfc7677 SCRAM-SHA-256 without channel binding (gs2 ``n`` or ``y``).

    client-first ``n,,n=user,r=cnonce`` → ``Lookup(user)``; ``keys_found()`` →
    server-first ``r=cnonce+snonce,s=salt,i=4096``; client-final
    ``c=biws,r=...,p=proof`` → server-final ``v=signature`` as a challenge
    (SMTP has no "success with data": the client answers it with an empty
    line, rfc4954 4) → ``ScramCredentials``.
    """

    name = "SCRAM-SHA-256"

    def __init__(self, nonce: str | None = None, fake_salt_key: bytes = b"") -> None:
        self._server_nonce = nonce or secrets.token_urlsafe(18)
        self._fake_salt_key = fake_salt_key or secrets.token_bytes(16)
        self._stage = "client-first"
        self._gs2 = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""
        self._username = ""
        self._authzid = ""
        self._keys: ScramKeys | None = None
        self._result: ScramCredentials | None = None

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Challenge(b"")
        return self.respond(initial)

    def respond(self, data: bytes) -> Step:
        text = _text(data, "SCRAM message")
        if self._stage == "client-first":
            return self._client_first(text)
        if self._stage == "client-final":
            return self._client_final(text)
        if self._stage == "server-final" and self._result is not None:
            if data:
                raise SASLError("SCRAM expects an empty answer to the server-final message")
            return self._result
        raise SASLError("SCRAM exchange out of step")

    def _client_first(self, text: str) -> Step:
        flag, _, rest = text.partition(",")
        authzid, comma, bare = rest.partition(",")
        if flag not in ("n", "y") or not comma:
            # "p=..." asks for channel binding, which we do not offer (no -PLUS).
            raise SASLError("SCRAM channel binding is not supported")
        if authzid and not authzid.startswith("a="):
            raise SASLError("malformed SCRAM gs2 header")
        attributes = _scram_attributes(bare)
        if len(attributes) < 2 or attributes[0][0] != "n" or attributes[1][0] != "r" or not attributes[1][1]:
            raise SASLError("SCRAM client-first needs n= and r=")
        if attributes[0][1] == "" or any(k == "m" for k, _ in attributes):
            raise SASLError("SCRAM client-first: empty user or mandatory extension")
        self._gs2 = f"{flag},{authzid},"
        self._authzid = _scram_name(authzid[2:]) if authzid else ""
        self._username = _scram_name(attributes[0][1])
        self._client_first_bare = bare
        self._nonce = attributes[1][1] + self._server_nonce
        self._stage = "lookup"
        return Lookup(self._username)

    def keys_found(self, keys: ScramKeys | None) -> Challenge:
        """Go on with the user's stored keys; ``None`` (no such user) goes on
        with a made-up salt, so that the reply does not tell which users exist."""
        if self._stage != "lookup":
            raise RuntimeError("keys_found() out of step")
        if keys is None:
            salt = hmac.new(self._fake_salt_key, self._username.encode("utf-8"), hashlib.sha256).digest()[:16]
            keys = ScramKeys(salt, 4096, b"", b"")
        self._keys = keys
        salt = base64.b64encode(keys.salt).decode("ascii")
        self._server_first = f"r={self._nonce},s={salt},i={keys.iterations}"
        self._stage = "client-final"
        return Challenge(self._server_first.encode("ascii"))

    def _client_final(self, text: str) -> Step:
        without_proof, sep, proof_text = text.rpartition(",p=")
        if not sep:
            raise SASLError("SCRAM client-final needs p=")
        attributes = _scram_attributes(without_proof)
        values = dict(attributes)
        if [k for k, _ in attributes[:2]] != ["c", "r"]:
            raise SASLError("SCRAM client-final needs c= and r=")
        if values["r"] != self._nonce:
            raise SASLError("SCRAM nonce mismatch")
        if values["c"] != base64.b64encode(self._gs2.encode("utf-8")).decode("ascii"):
            raise SASLError("SCRAM channel binding mismatch")
        try:
            proof = base64.b64decode(proof_text, validate=True)
        except binascii.Error:
            raise SASLError("SCRAM proof is not base64") from None
        keys = self._keys
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode("utf-8")
        verified = False
        if keys.stored_key and len(proof) == len(keys.stored_key):
            signature = hmac.new(keys.stored_key, auth_message, hashlib.sha256).digest()
            client_key = bytes(a ^ b for a, b in zip(proof, signature))
            verified = hmac.compare_digest(hashlib.sha256(client_key).digest(), keys.stored_key)
        self._result = ScramCredentials(self._username, verified, self._authzid)
        if not verified:
            return self._result  # no server signature for a failed proof
        server_signature = hmac.new(keys.server_key, auth_message, hashlib.sha256).digest()
        self._stage = "server-final"
        return Challenge(b"v=" + base64.b64encode(server_signature))


MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256")
