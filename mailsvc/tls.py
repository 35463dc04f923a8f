"""TLS: the server context, a self-signed certificate on first start, and the client context.

- ``ensure_certificate(cert_file, key_file, hostname)``: when neither file
  exists, make a self-signed certificate for ``hostname`` with
  ``cryptography`` (no shelling out) so that ``make run`` has TLS out of the
  box. Clients will not trust it; put a real certificate and key at those
  paths (or point the config at them) for production.
- ``ServerTLSContext``: a pyOpenSSL context factory for
  ``ITLSTransport.startTLS`` (STARTTLS, rfc3207) and
  ``TLSMemoryBIOFactory`` (implicit TLS, rfc8314): the certificate chain and
  key from PEM files, TLS 1.2 or newer (rfc8314 4.1, rfc7525), no
  compression, the server's cipher order.
- ``ClientTLSContext``: the relay client's side of STARTTLS (and
  ``mailsvc turn``'s): TLS 1.2 or newer; with ``verify``, the chain checked
  against the system's CAs or a CA file and the peer's name against the
  certificate with ``service_identity`` (rfc7817); without, opportunistic
  (any certificate). A failed check aborts the handshake with a
  ``CertificateRejected`` whose text says why; ``describe_tls_failure``
  turns any handshake failure into words.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator
from zope.interface import implementer

TLS_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}
SELF_SIGNED_DAYS = 3650


class TLSError(Exception):
    """The certificate or key cannot be used; the text says why, ``key``
    names the config key at fault (``cert_file`` or ``key_file``)."""

    def __init__(self, text: str, key: str = "cert_file") -> None:
        super().__init__(text)
        self.key = key


def ensure_certificate(cert_file: Path, key_file: Path, hostname: str) -> bool:
    """Make a self-signed certificate and key for ``hostname`` if neither file exists.

    The key is written with mode 0600. Returns True when files were made,
    False when both were there already.

    :raise TLSError: only one of the two exists, or they cannot be written.
    """
    cert_file, key_file = Path(cert_file), Path(key_file)
    if cert_file.exists() and key_file.exists():
        return False
    if cert_file.exists() or key_file.exists():
        missing = key_file if cert_file.exists() else cert_file
        raise TLSError(
            f"{missing} is missing (the other file of the pair exists; not overwriting it)",
            "key_file" if missing == key_file else "cert_file",
        )
    cert_pem, key_pem = self_signed(hostname)
    try:
        for path, data, mode in ((key_file, key_pem, 0o600), (cert_file, cert_pem, 0o644)):
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.name}.tmp")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
    except OSError as error:
        raise TLSError(f"cannot write the self-signed certificate: {error}") from None
    return True


def self_signed(hostname: str, days: int = SELF_SIGNED_DAYS) -> tuple[bytes, bytes]:
    """A self-signed certificate for ``hostname`` (its CN and subjectAltName)
    and its P-256 key, both PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    try:
        alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        alt = x509.DNSName(hostname)
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLSContext:
    """A server-side pyOpenSSL connection creator (and old-style context
    factory, ``getContext()``), its context built once.

    :param cert_file: PEM: the certificate, then any intermediates.
    :param key_file: PEM: its private key (unencrypted).
    :param min_version: ``"1.2"`` or ``"1.3"``.
    :raise TLSError: a file cannot be read, or the key does not match.
    """

    def __init__(self, cert_file: Path, key_file: Path, min_version: str = "1.2") -> None:
        self.cert_file, self.key_file = Path(cert_file), Path(key_file)
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(TLS_VERSIONS[min_version])
        context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION)
        context.set_session_id(b"mailsvc")
        try:
            context.use_certificate_chain_file(str(self.cert_file))
        except SSL.Error as error:
            raise TLSError(f"{self.cert_file}: not a usable PEM certificate ({_reason(error)})") from None
        try:
            context.use_privatekey_file(str(self.key_file))
        except SSL.Error as error:
            raise TLSError(f"{self.key_file}: not a usable PEM private key ({_reason(error)})", "key_file") from None
        try:
            context.check_privatekey()
        except SSL.Error:
            raise TLSError(f"{self.key_file} is not the key of {self.cert_file}", "key_file") from None
        self._context = context

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        """A new server-side connection for one TLS session (``IOpenSSLServerConnectionCreator``)."""
        return SSL.Connection(self._context, None)

    def getContext(self) -> SSL.Context:
        """The context (the same one each time: settings are shared, sessions too)."""
        return self._context


def _reason(error: SSL.Error) -> str:
    try:
        return "; ".join(part[2] for part in error.args[0]) or "unknown error"
    except (IndexError, TypeError):
        return str(error) or "unknown error"


# ---------------------------------------------------------------- the client side


class CertificateRejected(Exception):
    """The peer's certificate failed our check; the text says why, for the
    person who reads the deferral."""


# X509_V_ERR_* (openssl/x509_vfy.h): the ones a mail relay meets.
_VERIFY_ERRORS = {
    2: "unable to get the issuer certificate",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in the chain",
    20: "unknown CA (unable to get the local issuer certificate)",
    21: "unable to verify the first certificate",
    23: "certificate revoked",
    26: "unsuitable certificate purpose",
}


@implementer(IOpenSSLClientConnectionCreator)
class ClientTLSContext:
    """A client-side pyOpenSSL connection creator for STARTTLS (rfc3207):
    TLS 1.2 or newer (rfc8314 4.1), no compression, no renegotiation; its
    context built once, shared by every connection made with it.

    With ``verify`` (a route with ``tls = "required"``): the chain must lead
    to a CA of ``ca_file`` (PEM, one certificate or more) or, without one,
    of the system's store; then the certificate must name one of ``names``,
    checked with ``service_identity`` (rfc6125 6, as rfc7817 3 asks:
    DNS-IDs, a wildcard only as the whole left-most label; IP addresses for
    an address literal). ``names`` are rfc7817 3's reference identifiers:
    the host name the connection was opened to (and possibly the
    recipient's domain). Any failure aborts the handshake, before a byte of
    mail, with a ``CertificateRejected`` that says why.

    Without ``verify`` (opportunistic, like Postfix's ``may``): any
    certificate is taken; the session is encrypted against a passive
    listener only. ``names[0]``, when given and not an address, goes as SNI.

    :raise TLSError: ``ca_file`` holds no usable certificate (key ``ca_file``).
    """

    def __init__(self, names=(), verify: bool = True, ca_file: Path | None = None, min_version: str = "1.2") -> None:
        self.names = tuple(names)
        self.verify = verify
        if verify and not self.names:
            raise ValueError("a checked TLS session needs the names to check")
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_min_proto_version(TLS_VERSIONS[min_version])
        context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
        if verify:
            try:
                if ca_file is not None:
                    context.load_verify_locations(str(ca_file))
                else:
                    context.set_default_verify_paths()
            except SSL.Error as error:
                raise TLSError(f"{ca_file}: no usable CA certificate ({_reason(error)})", "ca_file") from None
            context.set_verify(SSL.VERIFY_PEER, self._check_chain)
            context.set_info_callback(self._info)
        else:
            context.set_verify(SSL.VERIFY_NONE)
        self._context = context
        first = self.names[0].rstrip(".") if self.names else ""
        try:
            self._sni = first.encode("idna") if first and not _is_address(first) else b""
        except UnicodeError:
            self._sni = b""  # not a name SNI can carry (rfc6066 3): none sent

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        """A new client-side connection for one TLS session (``IOpenSSLClientConnectionCreator``)."""
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if self._sni:
            connection.set_tlsext_host_name(self._sni)
        return connection

    def _check_chain(self, connection, certificate, errno: int, depth: int, ok: int) -> bool:
        """OpenSSL's verdict on each certificate of the chain; the first
        refusal aborts the handshake with a reason a person can read."""
        if ok:
            return True
        try:
            why = _VERIFY_ERRORS.get(errno, f"verification error {errno}")
            subject = _common_name(certificate.to_cryptography())
            detail = f" at depth {depth} ({subject})" if depth and subject else ""
            _reject(connection, f"certificate of {self.names[0]} is not trusted: {why}{detail}")
        except Exception:  # noqa: BLE001 - never raise into OpenSSL
            pass
        return False

    def _info(self, connection, where: int, ret: int) -> None:
        """At the end of the handshake: does the certificate name the peer?
        (Twisted's ``ClientTLSOptions`` does the same for one name.)"""
        if not where & SSL.SSL_CB_HANDSHAKE_DONE:
            return
        try:
            self._check_names(connection)
        except CertificateRejected as rejected:
            _reject(connection, str(rejected))
        except Exception as error:  # noqa: BLE001 - never raise into OpenSSL
            _reject(connection, f"cannot check the certificate of {self.names[0]}: {error}")

    def _check_names(self, connection) -> None:
        """rfc7817 3: one of ``names`` must match (service_identity, rfc6125 6).

        :raise CertificateRejected: none does.
        """
        from service_identity import CertificateError, VerificationError
        from service_identity.pyopenssl import verify_hostname, verify_ip_address

        for name in self.names:
            try:
                if _is_address(name):
                    verify_ip_address(connection, name)
                else:
                    verify_hostname(connection, name)
                return
            except (VerificationError, CertificateError):
                continue
        shown = " or ".join(self.names)
        raise CertificateRejected(f"certificate for {shown} does not match: it is for {_presented(connection)}")


def _reject(connection, text: str) -> None:
    """Abort the TLS session of ``connection`` with ``CertificateRejected(text)``
    as the reason its protocol's ``connectionLost`` gets."""
    from twisted.python.failure import Failure

    connection.get_app_data().failVerification(Failure(CertificateRejected(text)))


def _presented(connection) -> str:
    """The names the peer's certificate carries (subjectAltName; else its CN)."""
    from cryptography import x509

    certificate = connection.get_peer_certificate(as_cryptography=True)
    if certificate is None:
        return "nothing (no certificate)"
    try:
        alt = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = []
    else:
        names = alt.get_values_for_type(x509.DNSName) + [str(a) for a in alt.get_values_for_type(x509.IPAddress)]
    if names:
        return ", ".join(names)
    common = _common_name(certificate)
    return f"CN={common} (no subjectAltName)" if common else "no name at all"


def _common_name(certificate) -> str:
    """The subject's CN of a ``cryptography`` certificate, or ``""``."""
    from cryptography.x509.oid import NameOID

    common = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(common[0].value) if common else ""


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def describe_tls_failure(reason) -> str:
    """Why a TLS session failed, from the ``Failure`` its protocol got:
    our certificate check's words, OpenSSL's reason, or the connection's."""
    if reason is None:
        return "connection closed"
    value = reason.value
    if isinstance(value, CertificateRejected):
        return str(value)
    if isinstance(value, SSL.Error):
        return _reason(value)
    return reason.getErrorMessage() or type(value).__name__
