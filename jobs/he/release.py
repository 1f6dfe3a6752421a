"""A member's release of the final shared trunk: decrypt the aggregate the operator's server stored.

The server persisted ``FL_global_model.ckks`` (``sum w_i x_i`` under CKKS and ``sum w_i``) and cannot
read it; any member can, with the secret context in its kit's ``startup/client_context.tenseal``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from jobs.he.context import CLIENT_CONTEXT_FILE
from jobs.he.store import decrypt_aggregate_file


def decrypt_global_trunk(
    config: Any,
    run: Any,
    *,
    member: str | None = None,
    client_context: bytes | Path | None = None,
) -> dict[str, torch.Tensor]:
    """The final global trunk of an HE run, decrypted with a member's secret context.

    Parameters
    ----------
    config
        The consortium (``consortium.config.ConsortiumConfig``).
    run
        The finished run (``jobs.runner.FederatedRun``): ``global_model`` is the stored aggregate,
        ``kits`` the POC startup kits by site name.
    member
        Whose kit holds the secret context; default the first member of ``config``.
    client_context
        The secret context itself (bytes, or the path of a ``client_context.tenseal``), for a run whose
        kits are elsewhere (production: the member's own kit).

    Returns
    -------
    dict of str to torch.Tensor
        ``trunk.*`` tensors (float32), loadable into ``models.SharedTrunk``.
    """
    if run.global_model is None or not Path(run.global_model).is_file():
        raise FileNotFoundError(
            f"job {run.job_id}: no encrypted aggregate (FL_global_model.ckks) under {run.result_dir}; "
            "did the HE job finish its last round?"
        )
    if client_context is None:
        member = member or config.members[0].name
        kit = (getattr(run, "kits", None) or {}).get(member)
        if kit is None:
            raise FileNotFoundError(
                f"job {run.job_id}: no startup kit of member '{member}' is known for this run; pass "
                f"client_context=<that member's startup/{CLIENT_CONTEXT_FILE}>"
            )
        client_context = Path(kit) / "startup" / CLIENT_CONTEXT_FILE
    if isinstance(client_context, (str, Path)):
        path = Path(client_context)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; the member's secret context is installed by 'consortium keys'")
        client_context = path.read_bytes()
    trunk = decrypt_aggregate_file(run.global_model, client_context=client_context)
    return {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in trunk.items()}
