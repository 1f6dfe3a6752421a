"""The operator's ports on this machine, checked before a POC system starts (and by the run plan)."""

from __future__ import annotations

import socket

from consortium.flare_env import FederatedRunError
from schema.config import ConsortiumConfig


def check_ports_free(config: ConsortiumConfig) -> None:
    """A clear error when the operator's ports are taken (another FLARE server?), before anything starts."""
    for field_name in ("fl_port", "admin_port"):
        port = getattr(config.operator, field_name)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                raise FederatedRunError(
                    f"{config.source}: operator.{field_name} = {port} is already in use on this machine "
                    "(another FLARE server?); stop it or pick free ports in consortium.yaml"
                ) from None
