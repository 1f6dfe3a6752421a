"""A TLS server with the consortium's mutual TLS logs the client certificates it refuses, and only those."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

import pytest

from jobs.tls_refusals import REFUSAL_MESSAGE, LogRefusedConnections, RefusalLoggingSSLObject
from tests.certificates import certificate


@pytest.fixture()
def pki(tmp_path: Path) -> Path:
    """A consortium CA, the server's certificate, a member's and a forger's (self-signed, same name)."""
    ca = certificate("ca", tmp_path)
    certificate("localhost", tmp_path, issuer=ca)
    certificate("pharma-b", tmp_path, issuer=ca)
    forged = tmp_path / "forged"
    forged.mkdir()
    certificate("pharma-b", forged)
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
