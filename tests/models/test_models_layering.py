from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_models_imports_no_nvflare_and_no_anndata():
    # a fresh interpreter: the test session itself has anndata loaded by other fixtures
    code = (
        "import sys\n"
        "import models.attribution, models.baselines, models.classical, models.losses, models.metrics\n"
        "import models.network, models.privacy, models.training, models.uncertainty\n"
        "print(sorted(m for m in ('nvflare', 'anndata', 'scanpy') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "[]"
