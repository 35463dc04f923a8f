"""TLS for the SMTP server: the server context, and a self-signed certificate on first start.

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
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
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
