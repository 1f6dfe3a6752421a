"""What a member's FLARE process loads to start: no DP library with DP off, no attribution library before
the last round (each costs seconds and ~40-120 MB in every member process)."""

from __future__ import annotations

import subprocess
import sys


def test_the_client_script_starts_without_opacus_or_captum():
    # nor scikit-survival: models.metrics loads it for a C-index, so only a member with a survival endpoint
    probe = "import sys, jobs.client; print(sorted({'opacus', 'captum', 'scanpy', 'sksurv'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300)
    assert done.stdout.strip().splitlines()[-1] == "[]"
