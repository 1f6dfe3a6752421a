"""A member's side of secure aggregation in a FLARE job: mask what it sends, re-send, reveal its self mask.

:class:`MemberMasks` (a client component, id :data:`COMPONENT_ID`) holds the member's pairwise masker
(its kit's mask keys, :mod:`jobs.he.mask_files`), its self masks and the round's sum-ready update. The
job's result filter (:class:`jobs.he.filters.EncryptSections` under HE, :class:`MaskWords` without) hands
it each ``train`` result; :class:`SecureAggregationTasks` answers the server's ``secagg_resend`` task (the
same update masked for the server's shorter lists), and the component itself answers the server's
``secagg_reveal`` aux message (the self-mask seed of the one exchange the server opens). The client script
knows none of this.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping

import numpy as np
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.filter import Filter
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from jobs.he.context import WorkspaceContext
from jobs.he.mask_files import load_masker
from jobs.he.masked_words import WORDS_KEY, mask_update
from jobs.he.masks import (
    MaskRefused,
    MaskSource,
    PairwiseMasker,
    RoundBinding,
    SectionPairs,
    apply_masks,
    ciphertext_masks,
    mask_ciphertexts,
)
from jobs.he.payload import WIRE_BYTES_META, dxo_or_none, encrypt_update
from jobs.he.self_mask import SelfMask
from jobs.sections import SECTIONS_META, sections_of
from jobs.secure_aggregation import HEADER, SEED_META, checked_holders, predicted_holders, read_header, refusal_reply
from schema.names import CLIENT_CONTEXT_FILE, SECAGG_RESEND_TASK, SECAGG_REVEAL_TOPIC, TRAIN_TASK

COMPONENT_ID = "secure_aggregation"
REVEAL_FORMAT = "consortium-mask-reveal/1"
REVEAL_META = "secagg_format"


class MemberMasks(FLComponent):
    """The member's masks and its round's update.

    Parameters
    ----------
    he
        The job encrypts (masks go on the ciphertexts' ``c0``); otherwise fixed-point words modulo 2^64.
    holders
        Each endpoint's members (``consortium.yaml``): whom an endpoint's sections are masked with.
    min_members
        ``training.min_members``: lists shorter than ``max(3, min_members)`` are refused.
    key_folder
        Simulated members only: the folder holding ``<site>/mask_key.x25519``; empty: the kit's ``startup/``.
    """

    def __init__(
        self,
        he: bool = False,
        holders: dict | None = None,
        min_members: int | None = None,
        key_folder: str = "",
        tenseal_context_file: str = CLIENT_CONTEXT_FILE,
    ) -> None:
        super().__init__()
        self.he, self.min_members, self.key_folder = bool(he), min_members, key_folder
        self.tenseal_context_file = tenseal_context_file
        self.holders = {str(k): [str(m) for m in v] for k, v in (holders or {}).items()}
        self._he = WorkspaceContext(tenseal_context_file, private=True) if self.he else None
        self._lock = threading.Lock()
        self._masker: PairwiseMasker | None = None
        self._self_masks: SelfMask | None = None
        self._binding: RoundBinding | None = None
        self._update: tuple[dict, dict] | None = None
        self._chunks: dict[str, int] = {}  # each section's ciphertext chunks in the last update (HE)
        self._ahead: tuple[RoundBinding, dict] | None = None
        self._drawing: threading.Thread | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if self._he is not None:
            self._he.on_event(event_type, fl_ctx)
        if event_type == EventType.START_RUN:
            engine = fl_ctx.get_engine()
            engine.register_aux_message_handler(topic=SECAGG_REVEAL_TOPIC, message_handle_func=self.on_reveal)
        if event_type == EventType.AFTER_TASK_DATA_FILTER and fl_ctx.get_prop(FLContextKey.TASK_NAME) == TRAIN_TASK:
            data = fl_ctx.get_prop(FLContextKey.TASK_DATA)
            with self._lock:
                self._binding, self._update, self._ahead = None, None, None
                if data is not None:
                    self._binding = self.binding_of(data, fl_ctx)[0]
                    self._draw_ahead(self._binding, fl_ctx)

    def _draw_ahead(self, binding: RoundBinding, fl_ctx: FLContext) -> None:
        """Under HE, draw this round's masks while the member trains: they depend on the round's plan and
        the sections' sizes (last round's), not on the update (:func:`jobs.he.masks.ciphertext_masks`)."""
        if self._he is None or not self._chunks:
            return
        try:
            masker, self_masks = self._load(fl_ctx)
            context = self._he.get(fl_ctx)
        except (ValueError, OSError) as exc:  # said again, with its fix, when the update is masked
            self.log_warning(fl_ctx, f"masks not drawn ahead: {exc}")
            return
        shapes = dict(self._chunks)

        def draw() -> None:
            ready = {}
            for section, n_chunks in shapes.items():
                among = tuple(predicted_holders(section, binding.members, self.holders))
                sources = [SectionPairs(masker, among), self_masks]
                try:
                    masks = ciphertext_masks(context, sources, binding, section=section, n_chunks=n_chunks)
                except MaskRefused:
                    return  # refused again, with the reason, when the update is masked
                ready[(section, among, n_chunks)] = masks
            self._ahead = (binding, ready)

        self._drawing = threading.Thread(target=draw, name="masks-ahead", daemon=True)
        self._drawing.start()

    def _drawn(self, binding: RoundBinding, section: str, among: list[str], n_chunks: int):
        """Masks drawn ahead for this section, or None."""
        if self._drawing is not None:
            self._drawing.join()
            self._drawing = None
        if self._ahead is None or self._ahead[0] != binding:
            return None
        return self._ahead[1].get((section, tuple(among), n_chunks))

    def binding_of(self, data: Shareable, fl_ctx: FLContext) -> tuple[RoundBinding, dict | None]:
        round_ = data.get_header(AppConstants.CURRENT_ROUND)
        if not isinstance(round_, int):
            raise MaskRefused(f"the task names no round ({round_!r}); masks are bound to one")
        return read_header(data.get_header(HEADER), job=fl_ctx.get_job_id(), round_=round_)

    def _load(self, fl_ctx: FLContext) -> tuple[PairwiseMasker, SelfMask]:
        if self._masker is None:
            name = fl_ctx.get_identity_name()
            if self.key_folder:
                folder = os.path.join(self.key_folder, name)
            else:
                folder = fl_ctx.get_engine().get_workspace().get_startup_kit_dir()
            self._masker = load_masker(folder, name, min_members=self.min_members)
            self._self_masks = SelfMask(name)
            self.log_info(fl_ctx, f"loaded the mask keys of '{name}' from {folder}")
        return self._masker, self._self_masks

    def seal(self, params: Mapping[str, np.ndarray], meta: Mapping, fl_ctx: FLContext) -> DXO:
        """The ``train`` result's sum-ready update, kept for a re-send and masked for the round's first exchange."""
        with self._lock:
            if self._binding is None:
                raise MaskRefused("the train task carried no secure-aggregation plan; the server's job is not ours")
            self._update = ({k: np.asarray(v) for k, v in params.items()}, dict(meta))
            return self._masked(self._binding, None, fl_ctx)

    def resend(self, binding: RoundBinding, sections: dict | None, fl_ctx: FLContext) -> DXO:
        with self._lock:
            if self._update is None or self._binding is None or self._binding.round != binding.round:
                raise MaskRefused(f"round {binding.round}: no update of this round kept here to send again")
            return self._masked(binding, sections, fl_ctx)

    def reveal(self, binding: RoundBinding, fl_ctx: FLContext) -> str:
        _, self_masks = self._load(fl_ctx)
        return self_masks.reveal(binding).hex()

    def on_reveal(self, topic: str, request: Shareable, fl_ctx: FLContext) -> Shareable:
        """The server's ``secagg_reveal`` aux message: this member's self-mask seed of the exchange it opens.

        Only the server asks: a request from a member of the consortium (aux messages may pass between
        clients) is refused. Whoever asked, a member reveals one exchange per round and masks nothing more
        in that round (:class:`jobs.he.self_mask.SelfMask`).
        """
        try:
            asker = str((request.get_peer_props() or {}).get(ReservedKey.IDENTITY_NAME, ""))
            members = {m for names in self.holders.values() for m in names}
            if asker in members or asker == fl_ctx.get_identity_name():
                raise MaskRefused(f"'{asker}' asked for a self-mask seed; only the server may")
            binding, _ = self.binding_of(request, fl_ctx)
            if asker in binding.members:
                raise MaskRefused(f"'{asker}' asked for a self-mask seed; only the server may")
            seed = self.reveal(binding, fl_ctx)
        except MaskRefused as exc:
            self.log_error(fl_ctx, f"MaskRefused: {exc}")
            return refusal_reply(str(exc))
        self.log_info(fl_ctx, f"round {binding.round}: self mask of exchange {binding.exchange} revealed")
        dxo = DXO(data_kind=DataKind.METRICS, data={}, meta={REVEAL_META: REVEAL_FORMAT, SEED_META: seed})
        return dxo.to_shareable()

    def _masked(self, binding: RoundBinding, told: dict | None, fl_ctx: FLContext) -> DXO:
        masker, self_masks = self._load(fl_ctx)
        masker.check(binding)
        self_masks.check(binding)
        params, meta = self._update
        described = sections_of(meta)
        sources: dict[str, list[MaskSource]] = {}
        for name in described:
            if told is None:
                among = predicted_holders(name, binding.members, self.holders)
            elif name not in told:
                raise MaskRefused(f"exchange {binding.exchange}: the server lists no holders for '{name}', sent here")
            else:
                among = checked_holders(
                    name, me=masker.name, binding=binding, told=told[name], holders=self.holders,
                    min_members=self.min_members,
                )  # fmt: skip
            if among is None:
                self.log_warning(fl_ctx, f"'{name}' left out: the server's holders {told[name]} are too few to mask")
                continue
            sources[name] = [SectionPairs(masker, among), self_masks]
        kept_meta = {**meta, SECTIONS_META: {n: s.to_meta() for n, s in described.items() if n in sources}}
        kept = {k: v for k, v in params.items() if any(k in described[n].keys for n in sources)}
        if self._he is None:
            dxo = mask_update(kept, meta=kept_meta, sources=sources, binding=binding)
            dxo.meta[WIRE_BYTES_META] = sum(w.nbytes for w in dxo.data[WORDS_KEY].values())
            return dxo
        context = self._he.get(fl_ctx)
        update = encrypt_update(context, kept, meta=kept_meta)
        for name, part in update.sections.items():
            among = sources[name][0].among
            drawn = self._drawn(binding, name, among, len(part.chunks)) if told is None else None
            if drawn is None:
                part.chunks = mask_ciphertexts(context, sources[name], binding, section=name, chunks=part.chunks)
            else:
                part.chunks = apply_masks(context, part.chunks, drawn, section=name)
        self._chunks = {name: len(part.chunks) for name, part in update.sections.items()}
        return update.to_dxo()


def member_masks(fl_ctx: FLContext) -> MemberMasks:
    component = fl_ctx.get_engine().get_component(COMPONENT_ID)
    if not isinstance(component, MemberMasks):
        raise MaskRefused(f"no '{COMPONENT_ID}' component in this member's job; the job was not built by jobs.recipe")
    return component


class SecureAggregationTasks(Executor):
    """The member's executor of ``secagg_resend`` (the client script never sees it)."""

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        masks = member_masks(fl_ctx)
        try:
            binding, sections = masks.binding_of(shareable, fl_ctx)
            if task_name == SECAGG_RESEND_TASK:
                dxo = masks.resend(binding, sections, fl_ctx)
                self.log_info(fl_ctx, f"round {binding.round}: update masked again for exchange {binding.exchange}")
            else:
                return make_reply(ReturnCode.TASK_UNKNOWN)
        except MaskRefused as exc:
            self.log_error(fl_ctx, f"MaskRefused: {exc}")
            return refusal_reply(str(exc))
        return dxo.to_shareable()


class MaskWords(Filter):
    """Task-result filter of a plaintext job with secure aggregation: the update leaves as masked words."""

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        dxo = dxo_or_none(shareable)
        if dxo is None or dxo.data_kind == DataKind.METRICS:
            return shareable
        if dxo.data_kind != DataKind.WEIGHTS or not sections_of(dxo.meta):
            raise ValueError(f"MaskWords got a {dxo.data_kind} result without sections meta; use weighted_update")
        try:
            masked = member_masks(fl_ctx).seal(dxo.data, dxo.meta, fl_ctx)
        except MaskRefused as exc:
            self.log_error(fl_ctx, f"MaskRefused: {exc}")
            return refusal_reply(str(exc))
        masked.update_shareable(shareable)
        return shareable
