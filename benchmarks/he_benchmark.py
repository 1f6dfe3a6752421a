"""Plaintext vs our sectioned CKKS vs NVFlare's stock HE: one round of FedAvg over the shared trunk.

Each scheme aggregates, in this process, the consortium's default trunk (``models.network.SharedTrunk``:
2000 features x [256, 64] = 529,344 parameters) of every member, weighted by its local steps:

- ``plaintext``: ``jobs.sections.weighted_update`` -> the server's ``jobs.aggregation.SectionSumAggregator``
  (float64 sums) -> ``jobs.sections.finalize`` at the member;
- ``ours``: ``weighted_update`` -> ``jobs.he.payload.encrypt_update`` (CKKS N=8192, [60, 40], 2^40: the
  ``privacy.he`` defaults) -> the server's ``CiphertextSum`` under the public context -> the member's
  ``decrypt_update`` + ``finalize``; ``--ckks N,BITS,... --scale S`` adds a candidate parameter set;
- the routes that led to ``ours``, each a step on the previous one, same parameters, same wire:
  ``ours/v1`` (TenSEAL public-key vectors, one value per slot: the format before issue 12),
  ``+seeded`` (symmetric encryption with the member's secret key, SEAL serializes the random half as
  a seed), and ``ours`` itself (+ both the real and the imaginary part of every slot);
- ``stock``: ``nvflare.app_opt.he`` (``HEModelEncryptor`` -> ``HEInTimeAccumulateWeightedAggregator`` ->
  ``HEModelShareableGenerator`` -> ``HEModelDecryptor``) with ``HEBuilder``'s N=8192, [60, 40, 40], 2^40.

Every message crosses a simulated wire: FOBS-serialized by the sender and deserialized by the receiver,
as FLARE does; its size is the bytes sent. "encrypt" is the slowest member's preparation of its update
(weighting, encryption, DXO), "add" the server's whole aggregation, "decrypt" one member's decryption and
finalization (members run theirs in parallel), "wire" all (de)serializations of the round. Local steps
are those of the default synthetic consortium (300, 800, 2000 samples; training defaults). The error is
the max abs difference of the member's final trunk from float64 FedAvg; the relative error is the worst
array's max abs difference over its largest |weight| (the first layer's weights are ~0.03, LayerNorm's ~1).
Not included: FLARE's task polling and network latency (the same for every scheme).

    .venv/bin/python benchmarks/he_benchmark.py [--members 3] [--ckks 4096,30,20 --scale 20] [--repeats 3]

"encrypt s" is the issue's "encryption per member per round" (target 0.3 s at 2k features), "B/param up"
its bytes per parameter (target 16; stock NVFlare ~63-70), "rel error" its 1e-4 bound.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import tenseal as ts
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.decomposers import common_decomposers
from nvflare.fuel.utils import fobs
from tenseal import sealapi

from jobs.aggregation import SectionSumAggregator
from jobs.he.context import make_contexts, slot_count
from jobs.he.packing import (
    add_into,
    encrypt_flat,
    flatten,
    load_chunks,
    scratch_file,
    serialize_chunks,
    unflatten,
)
from jobs.he.payload import (
    CiphertextSum,
    EncryptedSection,
    EncryptedUpdate,
    decrypt_update,
    encrypt_update,
)
from jobs.sections import finalize, sections_of, weighted_update
from models.network import SharedTrunk
from omics.synthetic import DEFAULT_SIZES
from schema.config import DataContract, HomomorphicEncryption, Training

Params = dict[str, np.ndarray]


@dataclass
class RoundFigures:
    scheme: str
    ckks: str
    encrypt_s: float = 0.0  # slowest member
    add_s: float = 0.0  # server: accept all + aggregate
    decrypt_s: float = 0.0  # one member
    wire_s: float = 0.0  # all FOBS (de)serializations of the round
    upload_bytes: int = 0  # one member's result
    download_bytes: int = 0  # the aggregate sent to one member
    max_error: float = 0.0  # vs float64 weighted FedAvg
    rel_error: float = 0.0  # worst array's max error / its max |FedAvg weight|
    note: str = ""


def local_steps(members: int) -> list[int]:
    """Optimizer steps per round of each member of the default synthetic consortium (sizes cycled)."""
    data, training = DataContract(), Training()
    train_share = 1.0 - data.val_fraction - data.test_fraction
    sizes = [DEFAULT_SIZES[i % len(DEFAULT_SIZES)] for i in range(members)]
    return [math.ceil(round(n * train_share) / training.batch_size) * training.local_epochs for n in sizes]


def member_trunks(n_features: int, widths: list[int], members: int, *, seed: int = 0) -> list[Params]:
    """The default trunk's initial weights, perturbed per member as a round of training would."""
    base = SharedTrunk(n_features, trunk_widths=widths, seed=seed).state_dict()
    rng = np.random.default_rng(seed + 1)
    return [
        {k: (v.numpy() + rng.normal(scale=0.01, size=v.shape)).astype(np.float32) for k, v in base.items()}
        for _ in range(members)
    ]


def fedavg(trunks: list[Params], steps: list[int]) -> Params:
    total = float(sum(steps))
    return {k: sum(n * t[k].astype(np.float64) for t, n in zip(trunks, steps, strict=True)) / total for k in trunks[0]}


class Wire:
    """FOBS both ways, timed: what a FLARE cell does to every message."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def send(self, shareable: Shareable) -> tuple[Shareable, int]:
        started = time.perf_counter()
        data = fobs.dumps(shareable)
        received = fobs.loads(data)
        self.seconds += time.perf_counter() - started
        return received, len(data)


def timed(fn: Callable, *args, **kwargs):
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - started


class QuietEngine:
    """Stands in for FLARE's engine: the stock components fire events through it; nobody listens here."""

    def fire_event(self, event_type: str, fl_ctx: FLContext) -> None:
        pass


def server_ctx() -> FLContext:
    fl_ctx = FLContext()
    fl_ctx.put(ReservedKey.ENGINE, QuietEngine(), private=True, sticky=False)
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, 0, private=True, sticky=False)
    fl_ctx.set_peer_context(FLContext())
    return fl_ctx


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Silence C++ writes to stdout (TenSEAL warns once per vector longer than one ciphertext)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
            ctypes.CDLL(None).fflush(None)
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def as_result(dxo: DXO, site: str) -> Shareable:
    shareable = dxo.to_shareable()
    shareable.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    shareable.add_cookie(AppConstants.CONTRIBUTION_ROUND, 0)
    return shareable


def score(figures: RoundFigures, received: Params, expected: Params) -> RoundFigures:
    errors = {k: float(np.max(np.abs(np.asarray(received[k]).reshape(v.shape) - v))) for k, v in expected.items()}
    figures.max_error = max(errors.values())
    figures.rel_error = max(errors[k] / float(np.max(np.abs(v))) for k, v in expected.items())
    return figures


def run_plaintext(trunks: list[Params], steps: list[int]) -> RoundFigures:
    figures, wire, fl_ctx = RoundFigures("plaintext", "-"), Wire(), server_ctx()
    aggregator = SectionSumAggregator(he=False)
    results = []
    for i, (trunk, n) in enumerate(zip(trunks, steps, strict=True)):
        (params, meta), seconds = timed(weighted_update, trunk, weights={"trunk": n})
        figures.encrypt_s = max(figures.encrypt_s, seconds)
        received, figures.upload_bytes = wire.send(as_result(DXO(DataKind.WEIGHTS, data=params, meta=meta), f"m{i}"))
        results.append(received)
    started = time.perf_counter()
    for received in results:
        assert aggregator.accept(received, fl_ctx)
    aggregate = aggregator.aggregate(fl_ctx)
    figures.add_s = time.perf_counter() - started
    task, figures.download_bytes = wire.send(aggregate)
    dxo = from_shareable(task)
    plain, figures.decrypt_s = timed(finalize, dxo.data, dxo.meta)
    figures.wire_s = wire.seconds
    return score(figures, plain, fedavg(trunks, steps))


def encrypt_unguarded(context: ts.Context, params: Params, *, meta: dict) -> EncryptedUpdate:
    """``encrypt_update`` without its headroom guard: to measure a parameter set the guard refuses."""
    sections = {}
    for name, section in sections_of(meta).items():
        flat, layout = flatten({k: params[k] for k in section.keys})
        sections[name] = EncryptedSection(encrypt_flat(context, flat), layout)
    return EncryptedUpdate(sections=sections, meta=dict(meta))


def run_ours(
    trunks: list[Params], steps: list[int], *, he: HomomorphicEncryption, scheme: str = "ours"
) -> RoundFigures:
    ckks = f"N={he.poly_modulus_degree} {list(he.coeff_mod_bit_sizes)} 2^{he.global_scale_bits}"
    figures, wire = RoundFigures(scheme, ckks), Wire()
    client_bytes, server_bytes = make_contexts(he)
    member, server = ts.context_from(client_bytes), ts.context_from(server_bytes)
    encrypt = encrypt_update
    try:  # the member with the most steps sends the largest values: the guard's worst case
        params, meta = weighted_update(trunks[int(np.argmax(steps))], weights={"trunk": max(steps)})
        encrypt_update(member, params, meta=meta)
    except ValueError as exc:
        figures.note = f"encrypt_update refuses ({exc}); measured without its guard"
        encrypt = encrypt_unguarded
    results = []
    for trunk, n in zip(trunks, steps, strict=True):
        started = time.perf_counter()
        params, meta = weighted_update(trunk, weights={"trunk": n})
        shareable = encrypt(member, params, meta=meta).to_dxo().to_shareable()
        figures.encrypt_s = max(figures.encrypt_s, time.perf_counter() - started)
        received, figures.upload_bytes = wire.send(shareable)
        results.append(received)
    started = time.perf_counter()
    total = CiphertextSum(server)
    for received in results:
        total.add(EncryptedUpdate.from_dxo(from_shareable(received)))
    aggregate = total.result().to_dxo().to_shareable()
    figures.add_s = time.perf_counter() - started
    task, figures.download_bytes = wire.send(aggregate)
    started = time.perf_counter()
    update = EncryptedUpdate.from_dxo(from_shareable(task))
    plain = finalize(decrypt_update(member, update), update.meta)
    figures.decrypt_s = time.perf_counter() - started
    figures.wire_s = wire.seconds
    return score(figures, plain, fedavg(trunks, steps))


def tenseal_public_chunks(context: ts.Context, flat: np.ndarray) -> list[bytes]:
    """Route ``ours/v1``: TenSEAL public-key CKKS vectors, one value per slot (the format before issue 12)."""
    slots = slot_count(context)
    return [ts.ckks_vector(context, flat[i : i + slots]).serialize() for i in range(0, flat.size, slots)]


def tenseal_sum(context: ts.Context, updates: list[list[bytes]]) -> list[bytes]:
    total = [ts.ckks_vector_from(context, c) for c in updates[0]]
    for chunks in updates[1:]:
        for vector, chunk in zip(total, chunks, strict=True):
            vector.add_(ts.ckks_vector_from(context, chunk))
    return [v.serialize() for v in total]


def tenseal_decrypt(context: ts.Context, chunks: list[bytes], n_values: int) -> np.ndarray:
    return np.concatenate([np.asarray(ts.ckks_vector_from(context, c).decrypt()) for c in chunks])[:n_values]


def seeded_real_chunks(context: ts.Context, flat: np.ndarray) -> list[bytes]:
    """Route ``+seeded``: symmetric CKKS with the member's secret key (seeded serialization), real slots only."""
    seal_context, slots = context.seal_context().data, slot_count(context)
    encoder = sealapi.CKKSEncoder(seal_context)
    encryptor = sealapi.Encryptor(seal_context, context.secret_key().data)
    chunks = []
    with scratch_file() as scratch:
        for i in range(0, flat.size, slots):
            plain = sealapi.Plaintext()
            encoder.encode(flat[i : i + slots].tolist(), context.global_scale, plain)
            encryptor.encrypt_symmetric(plain).save(scratch.path)
            chunks.append(scratch.read())
    return chunks


def seal_sum(context: ts.Context, updates: list[list[bytes]]) -> list[bytes]:
    total = None
    for chunks in updates:
        total = add_into(context, total, load_chunks(context, chunks))
    return serialize_chunks(total)


def seeded_real_decrypt(context: ts.Context, chunks: list[bytes], n_values: int) -> np.ndarray:
    seal_context = context.seal_context().data
    encoder, decryptor = sealapi.CKKSEncoder(seal_context), sealapi.Decryptor(seal_context, context.secret_key().data)
    values = []
    for vector in load_chunks(context, chunks):
        plain = sealapi.Plaintext()
        decryptor.decrypt(vector, plain)
        values.append(np.asarray(encoder.decode_double(plain)))
    return np.concatenate(values)[:n_values]


ROUTES = {
    "ours/v1": (tenseal_public_chunks, tenseal_sum, tenseal_decrypt),
    "+seeded": (seeded_real_chunks, seal_sum, seeded_real_decrypt),
}


def run_route(trunks: list[Params], steps: list[int], *, route: str, he: HomomorphicEncryption) -> RoundFigures:
    """One round through a superseded route's packing, on the same wire and DXO as ``ours``."""
    encrypt_chunks, sum_chunks, decrypt_chunks = ROUTES[route]
    ckks = f"N={he.poly_modulus_degree} {list(he.coeff_mod_bit_sizes)} 2^{he.global_scale_bits}"
    figures, wire = RoundFigures(route, ckks), Wire()
    client_bytes, server_bytes = make_contexts(he)
    member, server = ts.context_from(client_bytes), ts.context_from(server_bytes)
    results = []
    for trunk, n in zip(trunks, steps, strict=True):
        started = time.perf_counter()
        params, meta = weighted_update(trunk, weights={"trunk": n})
        sections = {}
        for name, section in sections_of(meta).items():
            flat, layout = flatten({k: params[k] for k in section.keys})
            sections[name] = EncryptedSection(encrypt_chunks(member, flat), layout)
        shareable = EncryptedUpdate(sections=sections, meta=dict(meta)).to_dxo().to_shareable()
        figures.encrypt_s = max(figures.encrypt_s, time.perf_counter() - started)
        received, figures.upload_bytes = wire.send(shareable)
        results.append(received)
    started = time.perf_counter()
    updates = [EncryptedUpdate.from_dxo(from_shareable(r)) for r in results]
    summed = {
        name: EncryptedSection(sum_chunks(server, [u.sections[name].chunks for u in updates]), part.layout)
        for name, part in updates[0].sections.items()
    }
    meta = {"consortium_sections": {}}
    for name, section in sections_of(updates[0].meta).items():
        total_weight = sum(sections_of(u.meta)[name].weight for u in updates)
        meta["consortium_sections"][name] = {**section.to_meta(), "weight": total_weight}
    aggregate = EncryptedUpdate(sections=summed, meta=meta).to_dxo().to_shareable()
    figures.add_s = time.perf_counter() - started
    task, figures.download_bytes = wire.send(aggregate)
    started = time.perf_counter()
    update = EncryptedUpdate.from_dxo(from_shareable(task))
    plain: Params = {}
    for part in update.sections.values():
        flat = decrypt_chunks(member, part.chunks, part.layout.total)
        plain.update(unflatten(flat, part.layout, dtype=np.float64))
    plain = finalize(plain, update.meta)
    figures.decrypt_s = time.perf_counter() - started
    figures.wire_s = wire.seconds
    return score(figures, plain, fedavg(trunks, steps))


def run_stock(trunks: list[Params], steps: list[int]) -> RoundFigures:
    from nvflare.app_opt.he import decomposers
    from nvflare.app_opt.he.intime_accumulate_model_aggregator import HEInTimeAccumulateWeightedAggregator
    from nvflare.app_opt.he.model_decryptor import HEModelDecryptor
    from nvflare.app_opt.he.model_encryptor import HEModelEncryptor
    from nvflare.app_opt.he.model_shareable_generator import HEModelShareableGenerator
    from nvflare.lighter.impl.he import HEBuilder

    decomposers.register()
    builder = HEBuilder()  # what POC/provisioning would write
    builder.initialize(None, None)
    ckks = f"N={builder.poly_modulus_degree} {builder.coeff_mod_bit_sizes} 2^{builder.scale_bits}"
    figures, wire, fl_ctx = RoundFigures("stock", ckks), Wire(), server_ctx()
    client_ctx = ts.context_from(builder.get_serialized_context(is_client=True))
    server_context = ts.context_from(builder.get_serialized_context(is_client=False))
    encrypt = HEModelEncryptor(weigh_by_local_iter=True)
    encrypt.tenseal_context, encrypt.encrypt_layers = client_ctx, [True]  # what START_RUN would load
    decrypt = HEModelDecryptor()
    decrypt.tenseal_context = client_ctx
    aggregator = HEInTimeAccumulateWeightedAggregator(expected_data_kind=DataKind.WEIGHTS, weigh_by_local_iter=False)
    generator = HEModelShareableGenerator()
    generator.tenseal_context = server_context
    aggregator.handle_event(EventType.START_RUN, fl_ctx)
    results = []
    for i, (trunk, n) in enumerate(zip(trunks, steps, strict=True)):
        dxo = DXO(DataKind.WEIGHTS, data=dict(trunk), meta={MetaKey.NUM_STEPS_CURRENT_ROUND: n})
        with quiet_stdout():
            encrypted, seconds = timed(encrypt.process, as_result(dxo, f"m{i}"), fl_ctx)
        figures.encrypt_s = max(figures.encrypt_s, seconds)
        received, figures.upload_bytes = wire.send(encrypted)  # FOBS attaches the context to every layer
        results.append(received)
    started = time.perf_counter()
    for received in results:
        assert aggregator.accept(received, fl_ctx)
    aggregate = aggregator.aggregate(fl_ctx)
    fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable({}, {}), private=True, sticky=False)
    task = generator.learnable_to_shareable(generator.shareable_to_learnable(aggregate, fl_ctx), fl_ctx)
    figures.add_s = time.perf_counter() - started
    task, figures.download_bytes = wire.send(task)
    plain, figures.decrypt_s = timed(decrypt.process, task, fl_ctx)
    figures.wire_s = wire.seconds
    return score(figures, from_shareable(plain).data, fedavg(trunks, steps))


def median_figures(runs: list[RoundFigures]) -> RoundFigures:
    """Median of each timing over repeats (bytes do not vary; the worst error is kept)."""
    out = runs[0]
    for name in ("encrypt_s", "add_s", "decrypt_s", "wire_s"):
        setattr(out, name, float(np.median([getattr(r, name) for r in runs])))
    out.max_error = max(r.max_error for r in runs)
    out.rel_error = max(r.rel_error for r in runs)
    return out


def print_table(rows: list[RoundFigures], *, n_params: int) -> None:
    header = (
        f"{'scheme':<10} {'CKKS':<26} {'encrypt s':>9} {'add s':>6} {'decrypt s':>9} {'wire s':>6} "
        f"{'up MB/member':>12} {'B/param up':>10} {'down MB':>8} {'max error':>9} {'rel error':>9}"
    )
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print(
            f"{r.scheme:<10} {r.ckks:<26} {r.encrypt_s:9.2f} {r.add_s:6.2f} {r.decrypt_s:9.2f} {r.wire_s:6.2f} "
            f"{r.upload_bytes / 1e6:12.2f} {r.upload_bytes / n_params:10.2f} {r.download_bytes / 1e6:8.2f} "
            f"{r.max_error:9.1e} {r.rel_error:9.1e}"
        )
    by_name = {r.scheme: r for r in rows if r.scheme != "candidate"}
    plain, ours, stock = by_name["plaintext"], by_name["ours"], by_name["stock"]
    print(
        f"\nupload per member: ours/plaintext {ours.upload_bytes / plain.upload_bytes:.1f}x, "
        f"stock/plaintext {stock.upload_bytes / plain.upload_bytes:.1f}x, stock/ours "
        f"{stock.upload_bytes / ours.upload_bytes:.1f}x (plaintext is float64 sums: 8 B/param; fp32 is 4)"
    )
    steps = [r for r in rows if r.scheme in ("ours/v1", "+seeded", "ours")]
    for before, after in zip(steps, steps[1:], strict=False):
        print(
            f"step {before.scheme} -> {after.scheme}: bytes x{after.upload_bytes / before.upload_bytes:.2f}, "
            f"encrypt x{after.encrypt_s / before.encrypt_s:.2f}, "
            f"rel error {before.rel_error:.1e} -> {after.rel_error:.1e}"
        )
    for r in rows:
        if r.scheme == "candidate":
            print(f"candidate {r.ckks}: {r.upload_bytes / ours.upload_bytes:.2f}x the bytes of the default")
    for r in rows:
        if r.note:
            print(f"note, {r.scheme} {r.ckks}: {r.note}")


def parse_ckks(text: str, *, scale: int | None) -> HomomorphicEncryption:
    """``"4096,30,20"`` and a scale in bits -> checked CKKS settings (the same checks as consortium.yaml)."""
    try:
        degree, *bits = (int(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"--ckks {text!r}: give N and the prime bit sizes, e.g. 4096,30,20 --scale 20") from None
    if scale is None:
        raise SystemExit(f"--ckks {text}: give its scale too, e.g. --scale 20 (bits of 2^scale)")
    try:
        return HomomorphicEncryption(poly_modulus_degree=degree, coeff_mod_bit_sizes=bits, global_scale_bits=scale)
    except ValueError as exc:
        raise SystemExit(f"--ckks {text} --scale {scale}: {exc}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--features", type=int, default=2000)
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 64])
    parser.add_argument("--repeats", type=int, default=3, help="timings are the median over repeats")
    parser.add_argument("--ckks", help="a candidate CKKS parameter set for ours: N,BITS,... e.g. 4096,30,20")
    parser.add_argument("--scale", type=int, help="bits of the candidate's scale (2^scale), e.g. 20")
    args = parser.parse_args()
    candidate = parse_ckks(args.ckks, scale=args.scale) if args.ckks else None
    logging.basicConfig(level=logging.ERROR)  # FLARE components log every step at INFO
    logging.getLogger().setLevel(logging.ERROR)
    common_decomposers.register()
    trunks = member_trunks(args.features, args.widths, args.members)
    n_params = sum(v.size for v in trunks[0].values())
    steps = local_steps(args.members)
    print(
        f"trunk: {args.features} features x {args.widths} = {n_params:,} parameters in {len(trunks[0])} arrays; "
        f"{args.members} members, local steps {steps}; timings: median of {args.repeats} runs"
    )
    default = HomomorphicEncryption()
    schemes: list[Callable[[], RoundFigures]] = [
        lambda: run_plaintext(trunks, steps),
        lambda: run_route(trunks, steps, route="ours/v1", he=default),
        lambda: run_route(trunks, steps, route="+seeded", he=default),
        lambda: run_ours(trunks, steps, he=default),
        lambda: run_stock(trunks, steps),
    ]
    if candidate is not None:
        schemes.append(lambda: run_ours(trunks, steps, he=candidate, scheme="candidate"))
    rows = [median_figures([scheme() for _ in range(args.repeats)]) for scheme in schemes]
    print_table(rows, n_params=n_params)


if __name__ == "__main__":
    main()
