"""Load, in a thread, the modules a later step needs, while this process only waits on FLARE.

The shared model's MLflow export loads torch's exporter (~1 s, with the modules it pulls in); loaded
while the simulator runs, that time is off the run's critical path. Only modules are imported (Python
serializes each module's import, so a step that imports one while the thread is at it waits for it).
"""

from __future__ import annotations

import importlib
import logging
import threading

log = logging.getLogger(__name__)

RELEASE_MODULES = (
    "mlflow.pytorch",
    "torch.export._trace",  # loaded by mlflow's pt2 export of the shared model (~1 s)
    "matplotlib.backends.backend_agg",  # the plots' PNG canvas
)
"""What the report's plots and the shared model's MLflow export load on first use."""


class Warmup:
    """Import ``modules`` in a daemon thread once :meth:`start` is called; :meth:`wait` for it."""

    def __init__(self, modules: tuple[str, ...] = RELEASE_MODULES) -> None:
        self.modules = modules
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._load, name="warmup", daemon=True)
            self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def _load(self) -> None:
        for name in self.modules:
            try:
                importlib.import_module(name)
            except Exception as exc:  # the step that needs it imports it again and fails in its own words
                log.debug("warm-up of %s failed: %s", name, exc)
