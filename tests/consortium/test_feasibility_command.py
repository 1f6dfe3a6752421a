"""`consortium feasibility`: a protocol is refused before anything runs when it holds code or names an
unknown column (exit 2, nothing written); in FLARE's simulator one round's summed counts equal the
counts pandas makes directly on the members' obs."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from consortium.audit import verify_log
from consortium.cli import main
from schema.config import load_config
from tests.helpers import relocated_config, run_notebook

PROTOCOL = """
name: older-adults
columns: {age: numeric, sex: [F, M]}
inclusion:
  - {name: adult, where: "age >= 50"}
  - {name: women or over 65, where: "sex == 'F' or age > 65"}
exclusion:
  - {name: very old, where: "age > 75"}
bands: {age: [65]}
strata: [[sex], [age, sex]]
"""


@pytest.mark.parametrize(
    "where",
    ["__import__('os').system('touch /tmp/pwned')", "age.__class__ > 1", "weight > 70", "sex == 'X'"],
    ids=["python-code", "dunder", "unknown-column", "unknown-level"],
)
def test_a_bad_protocol_is_refused_before_anything_runs(tiny_consortium: Path, tmp_path: Path, where: str):
    protocol = tmp_path / "protocol.yaml"
    protocol.write_text(PROTOCOL.replace('"age >= 50"', json.dumps(where)))
    out = tmp_path / "out"
    code = main(["feasibility", "--config", str(tiny_consortium), "--protocol", str(protocol), "--out", str(out)])
    assert code == 2
    assert not out.exists()


def test_a_column_a_member_lacks_is_refused(tiny_consortium: Path, tmp_path: Path):
    protocol = tmp_path / "protocol.yaml"
    protocol.write_text(
        PROTOCOL.replace("{age: numeric,", "{age: numeric, ecog: numeric,").replace('"age >= 50"', '"ecog <= 1"')
    )
    out = tmp_path / "out"
    code = main(["feasibility", "--config", str(tiny_consortium), "--protocol", str(protocol), "--out", str(out)])
    assert code == 2
    assert not out.exists()


def expected_counts(obs: pd.DataFrame) -> dict[str, int]:
    """The funnel, relaxation gains and strata of PROTOCOL, counted directly with pandas."""
    age, sex = obs["age"], obs["sex"].astype(str)
    passes = {
        "adult": (age >= 50).to_numpy(),
        "women or over 65": ((sex == "F") | (age > 65)).to_numpy(),
        "very old": (age.notna() & ~(age > 75)).to_numpy(),
    }
    eligible = np.logical_and.reduce(list(passes.values()))
    counts = {"screened": len(obs)}
    running = np.ones(len(obs), dtype=bool)
    for name, ok in passes.items():
        running &= ok
        counts[f"after {name}"] = int(running.sum())
    for name in passes:
        others = np.logical_and.reduce([ok for other, ok in passes.items() if other != name])
        counts[f"without {name}"] = int(others.sum() - eligible.sum())
    band = np.where(age < 65, "<65", ">=65")
    for level in ("F", "M"):
        counts[f"sex={level}"] = int((eligible & (sex == level).to_numpy()).sum())
        for b in ("<65", ">=65"):
            counts[f"age={b}, sex={level}"] = int((eligible & (sex == level).to_numpy() & (band == b)).sum())
    return counts


@pytest.mark.slow
def test_one_round_in_the_simulator_gives_the_pandas_counts(tiny_consortium: Path, tmp_path: Path, capsys):
    config = load_config(tiny_consortium)
    names = [m.name for m in config.members]
    capacity = dict(zip(names, (30.0, 20.0), strict=True))
    config_path = relocated_config(
        tiny_consortium, tmp_path, feasibility={"screening_capacity": capacity, "target": 40}
    )
    protocol = tmp_path / "protocol.yaml"
    protocol.write_text(PROTOCOL)
    out = tmp_path / "run"
    args = ["feasibility", "--config", str(config_path), "--protocol", str(protocol), "--env", "sim", "--no-he"]
    code = main([*args, "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    document = json.loads((out / "feasibility.json").read_text())
    by_member = {m.name: expected_counts(ad.read_h5ad(m.data, backed="r").obs) for m in config.members}
    total = {label: sum(counts[label] for counts in by_member.values()) for label in by_member[names[0]]}
    cells = {row["label"]: row for row in document["cells"]}
    assert set(total) <= set(cells)
    compared = 0
    for label, value in total.items():
        shown = cells[label]["total"]
        if isinstance(shown, int):  # a small or withheld cell shows '<5' or '*'
            assert shown == value, label
            compared += 1
        for member in names:
            member_shown = cells[label]["members"][member]
            if isinstance(member_shown, int):
                assert member_shown == by_member[member][label], (member, label)
    assert compared >= 6
    assert cells["screened"]["total"] == sum(len(ad.read_h5ad(m.data, backed="r").obs) for m in config.members)
    assert document["he"] is False and document["layout_digest"]
    scenarios = document["enrollment"]["scenarios"]
    assert (
        scenarios[0]["scenario"] == "protocol" and scenarios[0]["low"] < scenarios[0]["median"] < scenarios[0]["high"]
    )
    assert (out / "report.md").read_text().startswith("# Protocol feasibility: older-adults")
    assert (out / "plots" / "funnel.png").stat().st_size > 0 and (out / "plots" / "enrollment.png").stat().st_size > 0
    table = printed.split("protocol older-adults: released counts")[1].split("\nfeasibility: ")[0].splitlines()
    assert max(len(line) for line in table) <= 80
    assert "after very old" in printed
    events = [json.loads(line)["event"] for line in (out / "audit.jsonl").read_text().splitlines()]
    assert events[-1] == "feasibility_released" and "job_submitted" in events
    assert verify_log(out / "audit.jsonl").ok
    notebook = Path(__file__).resolve().parents[2] / "notebooks" / "use_cases.ipynb"
    shown = run_notebook(notebook, tmp_path / "use_cases.ipynb", feasibility_dir=str(out))
    assert not shown["errors"] and shown["images"] == 2 and "after very old" in shown["text"]
    before = sorted(p.name for p in out.iterdir())
    assert main([*args, "--out", str(out)]) != 0  # a folder holds one run: refused, named by its command
    err = capsys.readouterr().err
    assert "the results of 'consortium feasibility'" in err and "'consortium feasibility' does not write" in err
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.slow
def test_under_he_in_poc_the_server_holds_ciphertext_and_only_the_total_is_released(
    tiny_consortium: Path, tmp_path: Path
):
    from consortium.processes import stop_processes_under
    from consortium.results import read_records
    from jobs.store import read_aggregate

    config = load_config(tiny_consortium)
    protocol = tmp_path / "protocol.yaml"
    protocol.write_text(PROTOCOL)
    out = tmp_path / "run"
    args = ["feasibility", "--config", str(tiny_consortium), "--protocol", str(protocol), "--env", "poc", "--he"]
    assert main([*args, "--out", str(out)]) == 0
    document = json.loads((out / "feasibility.json").read_text())
    assert document["he"] is True and all("members" not in row for row in document["cells"])
    by_member = [expected_counts(ad.read_h5ad(m.data, backed="r").obs) for m in config.members]
    cells = {row["label"]: row["total"] for row in document["cells"]}
    assert cells["after very old"] == sum(counts["after very old"] for counts in by_member)

    # the operator's server stored the sum as ciphertext, and what each member sent carried no count in clear
    stored = next(out.glob("flare/**/FL_global_model.sections"))
    assert read_aggregate(stored).encrypted is not None and read_aggregate(stored).params is None
    records = read_records(out / "flare")
    assert sorted(records) == sorted(m.name for m in config.members)
    for (record,) in records.values():
        assert "counts" not in record and record["bytes_received"] > 10_000  # CKKS ciphertext, not 19 float64s
    assert stop_processes_under(out / "flare") == 0


def test_a_single_cell_member_counts_each_patient_once(tmp_path: Path):
    from jobs.site_feasibility import member_obs

    obs = pd.DataFrame(
        {"donor": ["p1", "p1", "p2", "p3", "p3", "p3"], "age": [50.0, 50.0, 30.0, 80.0, 80.0, 80.0]},
        index=[f"c{i}" for i in range(6)],
    )
    ad.AnnData(X=np.zeros((6, 2), dtype=np.float32), obs=obs).write_h5ad(tmp_path / "cells.h5ad")
    patients = member_obs(tmp_path / "cells.h5ad", sample_column="donor")
    assert patients["donor"].tolist() == ["p1", "p2", "p3"] and patients["age"].tolist() == [50.0, 30.0, 80.0]
    assert len(member_obs(tmp_path / "cells.h5ad")) == 6
