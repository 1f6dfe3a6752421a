"""What a member's FLARE process loads to start: no DP library with DP off, no attribution or plotting
library (each costs seconds and ~30-120 MB in every member process; the whole job's are in
``tests/jobs/test_member_memory.py``)."""

from __future__ import annotations

import subprocess
import sys


def test_the_client_script_starts_without_opacus_captum_or_matplotlib():
    # nor scikit-survival: models.metrics loads it for a C-index, so only a member with a survival endpoint;
    # nor statsmodels: only a binary endpoint's calibration slope loads it (its Logit module alone)
    heavy = "{'opacus', 'captum', 'scanpy', 'sksurv', 'matplotlib', 'IPython', 'statsmodels'}"
    probe = f"import sys, jobs.client; print(sorted({heavy} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300)
    assert done.stdout.strip().splitlines()[-1] == "[]"
