"""NVFlare settings that have no public knob in the pinned version, set where they apply.

The in-process Client API executor waits for the client script's result by sleeping 0.5 s between
looks (``_RESULT_POLL_INTERVAL`` in ``nvflare/app_common/executors/client_api/in_process_backend.py``,
NVFlare 2.9.0): on average a quarter of a second added to every round, up to half a second, for each
member. There is no public setting for it, so it is set here, in the member's own process, only for
the version it was read from (``setup.cfg`` pins ``nvflare==2.9.0``); with any other version the
default stays and a warning says so. ``tests/test_architecture.py`` allows this private name here only.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

PINNED_NVFLARE = "2.9.0"
RESULT_POLL_SECONDS = 0.02


def shorten_result_polling(*, seconds: float = RESULT_POLL_SECONDS) -> bool:
    """Make this process's in-process executor look for the script's result every ``seconds``.

    The executor reads the module constant at each look, so setting it from the client script (which
    runs in the executor's process) takes effect from the first round. Returns whether it was set."""
    import nvflare
    from nvflare.app_common.executors.client_api import in_process_backend

    if nvflare.__version__ != PINNED_NVFLARE or not hasattr(in_process_backend, "_RESULT_POLL_INTERVAL"):
        log.warning(
            "NVFlare %s is not the %s this tuning was read from: the executor's result polling stays at its default",
            nvflare.__version__,
            PINNED_NVFLARE,
        )
        return False
    in_process_backend._RESULT_POLL_INTERVAL = float(seconds)
    return True
