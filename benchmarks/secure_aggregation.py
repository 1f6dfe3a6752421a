"""What secure aggregation costs: POC rounds with and without the pairwise masks, side by side in one run.

    python benchmarks/secure_aggregation.py --out DIR [--members 3,16] [--features 2000] [--rounds 4] [--repeats 2]

For each member count, the synthetic consortium (``consortium synth`` sizes) runs on POC with HE, masks off
then on, ``--repeats`` times in alternation (so drift on this shared machine hits both arms alike), with
``benchmarks/overhead.py``'s ``run_case``: steady round (median of the steady rounds), the slowest member's
compute in it, the last round, bytes per shared parameter (upload), the whole run. It prints a table per
member count and the ratio of the steady rounds' medians (masks on / off); ``--no-he`` runs the plaintext
job (masks over fixed-point words) instead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import consortium_of, run_case

from schema.config import dump_config, load_config


def with_masks(config_path: Path, *, on: bool) -> Path:
    """A copy of the consortium.yaml beside it with ``privacy.secure_aggregation`` set."""
    config = load_config(config_path)
    privacy = config.privacy.model_copy(update={"secure_aggregation": on})
    path = config_path.with_name(f"consortium-masks-{'on' if on else 'off'}.yaml")
    dump_config(config.model_copy(update={"privacy": privacy}), path)
    return path


def compare(root: Path, *, members: int, features: int, rounds: int, repeats: int, he: bool) -> dict[str, Any]:
    base = consortium_of(root, members=members, features=features, seed=0, ports=(8342, 8343))
    arms: dict[str, list[dict]] = {"off": [], "on": []}
    for repeat in range(repeats):
        for arm in ("off", "on"):
            path = with_masks(base, on=arm == "on")
            out = root / f"{members}x{features}-{arm}-{repeat}"
            case = run_case(path, env="poc", he=he, rounds=rounds, out=out)
            arms[arm].append(case)
            print(f"{members} members, masks {arm}, repeat {repeat}: {json.dumps(case)}", flush=True)
    summary = {}
    for arm, cases in arms.items():
        summary[arm] = {
            key: statistics.median(c[key] for c in cases if c[key] is not None)
            for key in ("steady_round_s", "steady_compute_s", "last_round_s", "wall_s", "bytes_per_parameter")
        }
    summary["ratio_steady_round"] = summary["on"]["steady_round_s"] / summary["off"]["steady_round_s"]
    return {"members": members, "features": features, "he": he, "summary": summary, "cases": arms}


def print_table(result: dict[str, Any]) -> None:
    s = result["summary"]
    print(f"\n{result['members']} members x {result['features']} features, POC, HE {'on' if result['he'] else 'off'}")
    print("| figure (median over repeats) | masks off | masks on |")
    print("|---|---|---|")
    for label, key, unit in (
        ("steady round", "steady_round_s", " s"),
        ("slowest member's compute in it", "steady_compute_s", " s"),
        ("last round", "last_round_s", " s"),
        ("whole run", "wall_s", " s"),
        ("bytes per shared parameter", "bytes_per_parameter", ""),
    ):
        print(f"| {label} | {s['off'][key]:.2f}{unit} | {s['on'][key]:.2f}{unit} |")
    print(f"steady round, masks on / off: {s['ratio_steady_round']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--members", default="3", help="comma-separated member counts, e.g. 3,16")
    parser.add_argument("--features", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=4, help="at least 3 (round 0, steady rounds, the last)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-he", action="store_true", help="the plaintext job (masks over fixed-point words)")
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be at least 3")
    out = (args.out or Path(tempfile.mkdtemp(prefix="secagg-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for members in (int(m) for m in args.members.split(",")):
        results.append(
            compare(
                out, members=members, features=args.features, rounds=args.rounds, repeats=args.repeats,
                he=not args.no_he,
            )
        )  # fmt: skip
        print_table(results[-1])
    (out / "secure_aggregation.json").write_text(json.dumps(results, indent=2))
    print(f"\nfigures in {out / 'secure_aggregation.json'}")


if __name__ == "__main__":
    main()
