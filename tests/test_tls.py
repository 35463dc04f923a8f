"""``mailsvc.tls`` and the ``[tls]``/``[auth]``/``[submission]`` config: certificates, contexts, keys."""

from __future__ import annotations

import pytest
import trustme
from cryptography import x509
from OpenSSL import SSL

from mailsvc import config, listeners, tls
from mailsvc.errors import ConfigError


def test_self_signed_certificate_is_made_once(tmp_path):
    """Neither file: both are made (key 0600, CN and SAN = the host name); then they are kept."""
    cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    assert tls.ensure_certificate(cert, key, "mail.example.test")
    assert key.stat().st_mode & 0o777 == 0o600
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    assert parsed.subject.rfc4514_string() == "CN=mail.example.test"
    san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mail.example.test"]
    before = cert.read_bytes()
    assert not tls.ensure_certificate(cert, key, "mail.example.test")
    assert cert.read_bytes() == before
    tls.ServerTLSContext(cert, key)  # usable


def test_half_a_pair_is_not_overwritten(tmp_path):
    """Only the certificate exists: refuse, naming key_file, rather than replace it."""
    cert = tmp_path / "cert.pem"
    cert.write_text("mine")
    with pytest.raises(tls.TLSError) as info:
        tls.ensure_certificate(cert, tmp_path / "key.pem", "mx.test")
    assert info.value.key == "key_file" and cert.read_text() == "mine"


def test_context_loads_a_chain_and_requires_tls12(tmp_path):
    """A trustme chain loads; the context refuses anything older than TLS 1.2 (or 1.3 when asked)."""
    ca = trustme.CA()
    issued = ca.issue_cert("mx.test")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    assert handshake(tls.ServerTLSContext(cert, key), SSL.TLS1_2_VERSION) == "TLSv1.2"
    assert handshake(tls.ServerTLSContext(cert, key), SSL.TLS1_3_VERSION) == "TLSv1.3"
    assert handshake(tls.ServerTLSContext(cert, key, "1.3"), SSL.TLS1_2_VERSION) is None
    assert handshake(tls.ServerTLSContext(cert, key), SSL.TLS1_1_VERSION) is None


def handshake(server_context: tls.ServerTLSContext, client_max_version: int) -> str | None:
    """A TLS handshake in memory with a client capped at ``client_max_version``;
    the version agreed, or None when it fails."""
    client_context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client_context.set_max_proto_version(client_max_version)
    client_context.set_min_proto_version(SSL.TLS1_VERSION)
    client = SSL.Connection(client_context, None)
    server = SSL.Connection(server_context.getContext(), None)
    client.set_connect_state()
    server.set_accept_state()
    for _ in range(10):
        for one, other in ((client, server), (server, client)):
            try:
                one.do_handshake()
            except SSL.WantReadError:
                pass
            except SSL.Error:
                return None
            try:
                other.bio_write(one.bio_read(65536))
            except SSL.WantReadError:
                pass
        if client.get_protocol_version_name() != "Unknown" and server.get_protocol_version_name() != "Unknown":
            try:
                client.do_handshake()
                server.do_handshake()
                return server.get_protocol_version_name()
            except SSL.WantReadError:
                continue
            except SSL.Error:
                return None
    return None


def test_mismatched_or_bad_files_are_named(tmp_path):
    """Not PEM → cert_file; a key of another certificate → key_file."""
    ca = trustme.CA()
    one, two = ca.issue_cert("a.test"), ca.issue_cert("b.test")
    cert, key, junk = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "junk.pem"
    one.cert_chain_pems[0].write_to_path(str(cert))
    two.private_key_pem.write_to_path(str(key))
    junk.write_text("junk")
    with pytest.raises(tls.TLSError) as info:
        tls.ServerTLSContext(junk, key)
    assert info.value.key == "cert_file"
    with pytest.raises(tls.TLSError) as info:
        tls.ServerTLSContext(cert, key)
    assert info.value.key == "key_file"


def load(tmp_path, text: str) -> config.Config:
    path = tmp_path / "etc" / "mailsvc.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return config.load(path)


def test_defaults_of_the_new_tables(tmp_path):
    """An empty file: the defaults written in etc/mailsvc.toml, paths from base_dir."""
    cfg = load(tmp_path, "")
    assert cfg.tls.cert_file == tmp_path / "var/tls/cert.pem" and cfg.tls.generate_self_signed
    assert cfg.auth.mechanisms == ("SCRAM-SHA-256", "PLAIN", "LOGIN") and cfg.auth.cram_md5_secrets_file is None
    assert cfg.auth.password_file == tmp_path / "var/auth/passwd" and not cfg.auth.allow_plaintext_without_tls
    assert cfg.submission.listen == ("tcp:2587:interface=127.0.0.1",)
    assert cfg.submission.listen_implicit_tls == ("tcp:2465:interface=127.0.0.1",)
    assert cfg.submission.require_sender_match and cfg.submission.add_missing_headers
    assert (cfg.smtp.starttls, cfg.smtp.auth, cfg.smtp.max_connections_per_client, cfg.smtp.max_errors) == (True, False, 20, 10)


def test_the_embedded_config_is_the_defaults():
    """etc/mailsvc.toml sets each new key to its default."""
    cfg = config.load("etc/mailsvc.toml")
    assert cfg.tls.min_version == "1.2" and cfg.auth.max_failures == 10 and cfg.auth.failure_window == 900
    assert cfg.submission.listen_implicit_tls == ("tcp:2465:interface=127.0.0.1",)


@pytest.mark.parametrize(
    "text, message",
    [
        ('[tls]\nmin_version = "1.0"', '[tls] min_version: must be "1.2" or "1.3"; got "1.0"'),
        ("[tls]\ngenerate_self_signed = 1", "[tls] generate_self_signed: expected true or false, got 1"),
        ("[tls]\ncert = 'x'", "[tls] cert: unknown key (did you mean cert_file?)"),
        ('[auth]\nmechanisms = ["GSSAPI"]', '[auth] mechanisms[0]: unknown mechanism "GSSAPI"'),
        ('[auth]\nmechanisms = ["CRAM-MD5"]', "[auth] mechanisms: CRAM-MD5 needs cram_md5_secrets_file"),
        ("[auth]\nmax_failures = -1", "[auth] max_failures: expected an integer >= 0, got -1"),
        ("[auth]\nfailure_delay = -1", "[auth] failure_delay: expected a number of seconds >= 0, got -1"),
        ("[auth]\nfailure_window = 0", "[auth] failure_window: expected a positive number of seconds, got 0"),
        ('[submission]\nlisten = ["nonsense:1"]', '[submission] listen[0]: not a valid endpoint: "nonsense:1"'),
        ('[submission]\nlisten_implicit_tls = ["ssl:465"]', "[submission] listen_implicit_tls[0]: give a plain endpoint"),
        ("[submission]\nrequire_sender_match = 'yes'", '[submission] require_sender_match: expected true or false, got "yes"'),
        ("[smtp]\nmax_errors = -2", "[smtp] max_errors: expected an integer >= 0, got -2"),
        ("[smtp]\nmax_connections_per_client = 'x'", '[smtp] max_connections_per_client: expected an integer >= 0, got "x"'),
        ("[smtp]\nstarttls = 0", "[smtp] starttls: expected true or false, got 0"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, message):
    """DESIGN rule 6: one line naming the table and key."""
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert message in str(info.value)


def test_cram_md5_with_its_file_is_accepted(tmp_path):
    """CRAM-MD5 in mechanisms with cram_md5_secrets_file set (the file may not exist yet)."""
    cfg = load(tmp_path, '[auth]\ncram_md5_secrets_file = "var/cram"\nmechanisms = ["plain", "cram-md5"]')
    assert cfg.auth.mechanisms == ("PLAIN", "CRAM-MD5") and cfg.auth.cram_md5_secrets_file == tmp_path / "var/cram"


def test_start_up_tls_errors_name_the_key(tmp_path):
    """listeners.tls_context: a missing file with no self-signed fallback, or a bad one, names the key."""
    cfg = load(tmp_path, "[tls]\ngenerate_self_signed = false")
    with pytest.raises(ConfigError, match=r"mailsvc.toml: \[tls\] cert_file: file not found: "):
        listeners.tls_context(cfg)
    (tmp_path / "var/tls").mkdir(parents=True)
    (tmp_path / "var/tls/cert.pem").write_text("x")
    (tmp_path / "var/tls/key.pem").write_text("x")
    with pytest.raises(ConfigError, match=r"\[tls\] cert_file: .*not a usable PEM certificate"):
        listeners.tls_context(cfg)
    fresh = load(tmp_path / "other", "")
    assert isinstance(listeners.tls_context(fresh), tls.ServerTLSContext)
    assert (tmp_path / "other/var/tls/key.pem").exists()


def test_context_provides_the_connection_creator_interface(tmp_path):
    """Twisted's TLS takes it without a legacy-factory warning (warnings are errors here)."""
    from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
    from twisted.internet.protocol import Factory
    from twisted.protocols.tls import TLSMemoryBIOFactory
    from zope.interface.verify import verifyObject

    tls.ensure_certificate(tmp_path / "c.pem", tmp_path / "k.pem", "mx.test")
    context = tls.ServerTLSContext(tmp_path / "c.pem", tmp_path / "k.pem")
    assert verifyObject(IOpenSSLServerConnectionCreator, context)
    TLSMemoryBIOFactory(context, False, Factory())
    assert isinstance(context.serverConnectionForTLS(None), SSL.Connection)
