"""The operator's server writes every TLS connection it refuses into its log: a forged certificate is seen.

NVFlare 2.9 refuses a client whose certificate the consortium's CA did not sign (mutual TLS), but
says nothing: the handshake fails inside asyncio, which logs an ``OSError`` on a transport only in
its debug mode. The standard library's public hook is :attr:`ssl.SSLContext.sslobject_class`, the
class every ``wrap_bio`` builds (asyncio's TLS transports use it); the standard library sets it the
same way, on the class. :class:`LogRefusedConnections` is a server component (``local/resources.json``
of the operator's kit, written by ``provisioning.policies``): the server builds it before it starts
listening, and from then on every refused handshake of a TLS *server* in that process is logged as::

    refused a TLS connection: certificate verify failed: self-signed certificate (...)

A client's own failed connections (the server's role as a client, if any) are not logged here.
"""

from __future__ import annotations

import logging
import ssl

from nvflare.apis.fl_component import FLComponent

log = logging.getLogger(__name__)

REFUSAL_MESSAGE = "refused a TLS connection"


def refusal_reason(exc: ssl.SSLError) -> str:
    """Why a handshake failed, in OpenSSL's words (the verification message when there is one)."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    return str(exc.reason or exc).replace("_", " ").lower()


class RefusalLoggingSSLObject(ssl.SSLObject):
    """An :class:`ssl.SSLObject` that logs, on the server side, a handshake it refuses."""

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise  # not a failure: the handshake waits for more bytes
        except ssl.SSLError as exc:
            if self.server_side:
                log.warning(
                    "%s: %s (a client certificate that this consortium's CA did not sign, or none); "
                    "nothing was read from it",
                    REFUSAL_MESSAGE,
                    refusal_reason(exc),
                )
            raise


def log_refused_connections() -> None:
    """From now on, every TLS server of this process logs the handshakes it refuses."""
    ssl.SSLContext.sslobject_class = RefusalLoggingSSLObject


class LogRefusedConnections(FLComponent):
    """Server component (``local/resources.json``) that turns on :func:`log_refused_connections`."""

    def __init__(self) -> None:
        super().__init__()
        log_refused_connections()
