"""What pairwise masks cost a member: seconds to mask its encrypted trunk, against seconds to encrypt it.

    python benchmarks/masks.py [--features 2000] [--members 3 16] [--repeats 3]

The trunk is :func:`models.network.build_trunk` at ``--features`` inputs (the consortium's default
widths); its values are packed as the job packs them (:func:`jobs.he.packing.encrypt_flat`: N values a
ciphertext at the default CKKS chain). For each member count it times one member masking every chunk
(:func:`jobs.he.masks.mask_ciphertexts`: its n - 1 pairwise PRG streams and its self mask, and opening
and rewriting the seeded bytes), the server taking the n revealed self masks from the sum
(:mod:`jobs.he.self_mask`) and, for the plaintext variant, a member quantizing and masking the same
values modulo 2^64 (:mod:`jobs.he.fixed_point`). It prints medians over ``--repeats`` and the bytes per
parameter with and without masks. The key agreement (once per job) is timed apart.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import tenseal as ts

from jobs.he import fixed_point
from jobs.he.context import make_contexts
from jobs.he.masks import PairwiseMasker, RoundBinding, mask_ciphertexts, new_private_key, public_bytes
from jobs.he.packing import chunk_capacity, encrypt_flat, load_chunks, serialize_chunks
from jobs.he.self_mask import RevealedSelfMask, SelfMask
from models.network import build_trunk
from schema.config import HomomorphicEncryption


def _median_seconds(run, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=2000)
    parser.add_argument("--members", type=int, nargs="+", default=[3, 16])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    settings = HomomorphicEncryption()
    client, public = make_contexts(settings)
    context, server = ts.context_from(client), ts.context_from(public)
    n_params = sum(p.numel() for p in build_trunk(args.features).parameters())
    values = np.random.default_rng(0).normal(scale=0.05, size=n_params)
    encrypt_s, chunks = _median_seconds(lambda: encrypt_flat(context, values), args.repeats)
    n_chunks, plain_bytes = len(chunks), sum(len(c) for c in chunks)
    print(
        f"trunk at {args.features} features: {n_params:,} parameters; CKKS N={settings.poly_modulus_degree} "
        f"{settings.coeff_mod_bit_sizes} scale 2^{settings.global_scale_bits}: {n_chunks} ciphertexts of "
        f"{chunk_capacity(context)} values"
    )
    print(
        f"encrypt (no masks): {encrypt_s:.3f} s per trunk, {1e3 * encrypt_s / n_chunks:.2f} ms per ciphertext, "
        f"{plain_bytes / n_params:.2f} bytes per parameter"
    )
    for count in args.members:
        names = [f"site-{i + 1}" for i in range(count)]
        keys = {name: new_private_key() for name in names}
        public = {name: public_bytes(key) for name, key in keys.items()}
        started = time.perf_counter()
        masker = PairwiseMasker(names[0], keys[names[0]], public, min_members=3)
        agree_s = time.perf_counter() - started
        binding = RoundBinding.of("benchmark", 1, names)
        sources = [masker, SelfMask(names[0])]  # what a member adds: pairwise masks and its self mask
        mask_s, masked = _median_seconds(
            lambda sources=sources, binding=binding: mask_ciphertexts(
                context, sources, binding, section="trunk", chunks=chunks
            ),
            args.repeats,
        )
        words = fixed_point.quantize(values)
        fixed_s, _ = _median_seconds(
            lambda sources=sources, binding=binding: fixed_point.mask_words(
                sources, binding, section="trunk", words=fixed_point.quantize(values)
            ),
            args.repeats,
        )
        summed = serialize_chunks(load_chunks(server, masked))  # a sum is a full ciphertext (no seed)
        revealed = [RevealedSelfMask(bytes(32)) for _ in names]  # the round's self-mask seeds, as revealed
        unmask_s, _ = _median_seconds(
            lambda revealed=revealed, binding=binding, summed=summed: mask_ciphertexts(
                server, revealed, binding, section="trunk", chunks=summed, subtract=True
            ),
            args.repeats,
        )
        masked_bytes = sum(len(c) for c in masked)
        print(
            f"{count:>2} members: mask {mask_s:.3f} s per trunk ({1e3 * mask_s / n_chunks:.2f} ms per ciphertext, "
            f"{100 * mask_s / encrypt_s:.0f}% of encryption), {masked_bytes / n_params:.2f} bytes per parameter; "
            f"fixed point mod 2^64 (quantize + mask {words.size:,} words): {fixed_s:.3f} s; "
            f"key agreement with {count - 1} members: {1e3 * agree_s:.1f} ms (once per job); "
            f"server removes {count} revealed self masks from the sum: {unmask_s:.3f} s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
