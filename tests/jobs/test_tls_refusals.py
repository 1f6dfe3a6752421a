"""A TLS server with the consortium's mutual TLS logs the client certificates it refuses, and only those."""

from __future__ import annotations

import asyncio
import datetime
import logging
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from jobs.tls_refusals import REFUSAL_MESSAGE, LogRefusedConnections, RefusalLoggingSSLObject


def _certificate(name: str, folder: Path, *, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None):
    """A certificate for ``name``, signed by ``issuer`` (a CA) or by itself; written as ``name.crt/.key``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if name == "localhost":
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    (folder / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert, key


@pytest.fixture()
def pki(tmp_path: Path) -> Path:
    """A consortium CA, the server's certificate, a member's and a forger's (self-signed, same name)."""
    ca = _certificate("ca", tmp_path)
    _certificate("localhost", tmp_path, issuer=ca)
    _certificate("pharma-b", tmp_path, issuer=ca)
    forged = tmp_path / "forged"
    forged.mkdir()
    _certificate("pharma-b", forged)
    return tmp_path


def _server_context(pki: Path) -> ssl.SSLContext:
    """What NVFlare's ``get_ssl_context(..., ssl_server=True)`` builds for mutual TLS."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(pki / "ca.crt")
    ctx.load_cert_chain(pki / "localhost.crt", pki / "localhost.key")
    return ctx


async def _exchange(pki: Path, client_cert: Path) -> bytes:
    """Connect to an asyncio TLS server holding ``client_cert``; what the server answered (b'' if refused)."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ok:" + await reader.read(5))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=_server_context(pki))
    port = server.sockets[0].getsockname()[1]
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.crt"))
    client.load_cert_chain(client_cert, client_cert.with_suffix(".key"))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="localhost")
        writer.write(b"hello")
        answer = await reader.read(64)
        writer.close()
        return answer
    except (ssl.SSLError, ConnectionError):
        return b""
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture()
def logging_component(monkeypatch):
    monkeypatch.setattr(ssl.SSLContext, "sslobject_class", ssl.SSLObject)  # restored after the test
    LogRefusedConnections()
    assert ssl.SSLContext.sslobject_class is RefusalLoggingSSLObject


def test_a_forged_certificate_is_refused_and_logged(pki: Path, logging_component, caplog):
    with caplog.at_level(logging.WARNING, logger="jobs.tls_refusals"):
        answer = asyncio.run(_exchange(pki, pki / "forged" / "pharma-b.crt"))
    assert answer == b""
    refusals = [r.getMessage() for r in caplog.records if REFUSAL_MESSAGE in r.getMessage()]
    assert len(refusals) == 1, caplog.text
    assert "certificate verify failed" in refusals[0]


def test_a_member_certificate_is_served_and_not_logged(pki: Path, logging_component, caplog):
    with caplog.at_level(logging.WARNING, logger="jobs.tls_refusals"):
        answer = asyncio.run(_exchange(pki, pki / "pharma-b.crt"))
    assert answer == b"ok:hello"
    assert REFUSAL_MESSAGE not in caplog.text


def test_without_the_component_a_refusal_is_silent(pki: Path, monkeypatch, caplog):
    """What NVFlare does alone: the refusal happens and nothing says so (why the component exists)."""
    monkeypatch.setattr(ssl.SSLContext, "sslobject_class", ssl.SSLObject)
    with caplog.at_level(logging.DEBUG):
        answer = asyncio.run(_exchange(pki, pki / "forged" / "pharma-b.crt"))
    assert answer == b""
    assert REFUSAL_MESSAGE not in caplog.text
