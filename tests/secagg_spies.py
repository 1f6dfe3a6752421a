"""Test-only FLARE filters that play the parties of the secure-aggregation threat model.

:class:`KeepPlain` (a member's result filter, put before the job's own) keeps what the member is about to
send, in the clear: the ground truth. :class:`CuriousOperator` (a server result filter) keeps every
ciphertext the operator receives, as a curious operator (or a leaked copy of its job store) would;
:class:`ShortListServer` tells the members a round of two. The filters
write plain ``.npy`` / ``.bin`` files, read back with NumPy; nothing is pickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants
from nvflare.job_config.defs import FilterType

from jobs.he.masked_words import WORDS_KEY, is_masked_dxo
from jobs.he.payload import EncryptedUpdate, dxo_or_none, is_encrypted_dxo
from jobs.member_masks import member_masks
from jobs.secure_aggregation import HEADER, plan_header
from jobs.workflow import SumScatterAndGather
from schema.names import SECAGG_RESEND_TASK, TRAIN_TASK


class KeepPlain(Filter):
    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        dxo = dxo_or_none(shareable)
        if dxo is None:
            return shareable
        round_ = member_masks(fl_ctx)._binding.round
        folder = Path(self.folder) / "plain" / f"{fl_ctx.get_identity_name()}-r{round_}"
        folder.mkdir(parents=True, exist_ok=True)
        for key, value in dxo.data.items():
            np.save(folder / f"{key}.npy", np.asarray(value, dtype=np.float64))
        return shareable


class CuriousOperator(Filter):
    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        dxo = dxo_or_none(shareable)
        if dxo is None:
            return shareable
        site = shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, "unknown")
        round_ = shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND)
        base = Path(self.folder) / "received"
        base.mkdir(parents=True, exist_ok=True)
        count = len(list(base.glob(f"{site}-r{round_}-*")))
        folder = base / f"{site}-r{round_}-{count}"
        if is_masked_dxo(dxo):  # without HE: the masked words of each section
            folder.mkdir()
            for name, words in dxo.data[WORDS_KEY].items():
                np.save(folder / f"{name.replace(':', '_')}.npy", words)
            return shareable
        if not is_encrypted_dxo(dxo):
            folder.mkdir()  # a plaintext update: kept as it came
            for key, value in dxo.data.items():
                np.save(folder / f"{key}.npy", np.asarray(value))
            return shareable
        update = EncryptedUpdate.from_dxo(dxo)
        folder.mkdir()
        for name, part in update.sections.items():
            safe = name.replace(":", "_")
            for index, chunk in enumerate(part.chunks):
                (folder / f"{safe}-{index}.bin").write_bytes(bytes(chunk))
            (folder / f"{safe}.layout.json").write_text(json.dumps(part.layout.to_meta()))
        return shareable


class ShortListServer(SumScatterAndGather):
    """A server that tells the members a round of two (isolating one member with one colluder)."""

    def _prepare_train_task_data(self, client_task, fl_ctx: FLContext) -> None:
        super()._prepare_train_task_data(client_task, fl_ctx)
        two = sorted(c.name for c in self._engine.get_clients())[:2]
        client_task.task.data.set_header(HEADER, plan_header(two, exchange=0, sections=None))


def spying(build, spy: Path):
    """``build`` (``jobs.recipe.build_recipe``) with the spies added: each member keeps its update before the
    job's own filter encrypts or masks it; the operator keeps what it receives, in both exchanges."""

    def spied(config, **kwargs):
        recipe = build(config, **kwargs)
        members = recipe.fed_job._deploy_map["@ALL"].app_config
        chain = next(filters for tasks, filters in members.task_result_filters if tasks == {TRAIN_TASK})
        chain.insert(0, KeepPlain(str(spy)))
        for task in (TRAIN_TASK, SECAGG_RESEND_TASK):
            recipe.fed_job.to_server(CuriousOperator(str(spy)), filter_type=FilterType.TASK_RESULT, tasks=[task])
        return recipe

    return spied
