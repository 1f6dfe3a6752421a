"""Release rules: small cells shown as <k, complementary suppression that no subtraction undoes (per member
and in total), and Laplace noise stated in the output."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from omics.feasibility import count_feasibility, feasibility_layout, round_summed_counts, scenario_fractions
from omics.feasibility_release import (
    TOTAL,
    add_laplace_noise,
    determined_cells,
    noise_sensitivity,
    release_feasibility,
    release_json,
    suppression_pattern,
)
from schema.protocol import protocol_from_text

K = 5
PROTOCOL = protocol_from_text(
    """
columns: {age: numeric, sex: [F, M], ecog: numeric, egfr: numeric, region: [EU, US]}
inclusion:
  - {name: adult, where: "age >= 18"}
  - {name: fit, where: "ecog in [0, 1]"}
exclusion:
  - {name: renal, where: "egfr < 30"}
bands: {age: [50]}
strata: [[age, sex], [sex], [region]]
"""
)
LAYOUT = feasibility_layout(PROTOCOL)
LABELS = [cell.label for cell in LAYOUT.cells]


def _member(n: int, *, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "age": rng.integers(10, 90, n).astype(float),
            "sex": rng.choice(["F", "M"], n),
            "ecog": rng.integers(0, 3, n),
            "egfr": rng.uniform(10, 90, n),
            "region": rng.choice(["EU", "US"], n),
        }
    )


def _tiny() -> pd.DataFrame:
    """12 patients: 9 adults, 3 of them fit ('after fit' = 3), 2 of those without renal disease."""
    age = [30, 40, 50, 60, 70, 35, 45, 55, 65, 10, 12, 14]
    ecog = [0, 1, 0, 2, 2, 2, 2, 3, 3, 0, 0, 1]
    egfr = [60, 70, 20, 60, 60, 60, 60, 60, 60, 60, 60, 60]
    sex = ["F", "M", "F", "M", "F", "M", "F", "M", "F", "M", "F", "M"]
    region = ["EU"] * 6 + ["US"] * 6
    return pd.DataFrame({"age": age, "sex": sex, "ecog": ecog, "egfr": egfr, "region": region}).astype({"age": float})


def _identities(tables: list[str]) -> list[dict[tuple[str, str], int]]:
    """Every subtraction a reader can do, written from what the rows mean (not from the layout): the last
    criterion's gain is the last funnel drop, each stratification adds up to the eligible count, the
    age x sex cells add up to the sex margin, and the total is the members' sum."""
    found = []
    for t in tables:
        found.append({(t, "without renal"): 1, (t, "after renal"): 1, (t, "after fit"): -1})
        for prefix in ("age=", "sex=", "region="):
            cells = {(t, label): 1 for label in LABELS if label.startswith(prefix)}
            found.append({**cells, (t, "after renal"): -1})
        for sex in ("F", "M", "missing"):
            cells = {(t, label): 1 for label in LABELS if label.startswith("age=") and label.endswith(f"sex={sex}")}
            found.append({**cells, (t, f"sex={sex}"): -1})
    if len(tables) > 1:
        for label in LABELS:
            found.append({(TOTAL, label): 1, **{(t, label): -1 for t in tables[1:]}})
    return found


def _recover(released: dict[str, list], tables: list[str]) -> dict[tuple[str, str], int]:
    """Try every subtraction: solve any identity with one hidden term, and repeat with what that gives."""
    known = {(t, label): v for t in tables for label, v in zip(LABELS, released[t], strict=True) if isinstance(v, int)}
    recovered, progress = {}, True
    while progress:
        progress = False
        for identity in _identities(tables):
            hidden = [key for key in identity if key not in known]
            if len(hidden) == 1:
                (key,) = hidden
                value = -sum(c * known[k] for k, c in identity.items() if k != key) * identity[key]
                known[key] = recovered[key] = value
                progress = True
    return recovered


def _consortium() -> dict[str, np.ndarray]:
    members = {"tiny": _tiny(), "mid": _member(40, seed=1), "big": _member(300, seed=2)}
    return {name: count_feasibility(obs, PROTOCOL) for name, obs in members.items()}


def test_three_patients_passing_a_criterion_show_as_below_five_and_no_subtraction_recovers_them():
    counts = _consortium()
    tiny = dict(zip(LABELS, counts["tiny"].tolist(), strict=True))
    assert (tiny["after adult"], tiny["after fit"], tiny["after renal"], tiny["without renal"]) == (9, 3, 2, 1)
    total = sum(counts.values())
    release = release_feasibility(total, LAYOUT, min_cell_count=K, members=counts)
    shown = dict(zip(LABELS, release.members["tiny"].shown, strict=True))
    assert shown["after fit"] == "<5" and shown["after renal"] == "<5" and shown["screened"] == "12"
    released = {TOTAL: release.total.to_json(), **{m: t.to_json() for m, t in release.members.items()}}
    tables = [TOTAL, *counts]
    assert _recover(released, tables) == {}
    # and the integer audit (inequalities and what '<5' and '*' say included) pins no hidden cell either
    stacked = np.array([total, *counts.values()])
    small = np.array([release.total.small, *(t.small for t in release.members.values())])
    withheld = np.array([release.total.withheld, *(t.withheld for t in release.members.values())])
    assert determined_cells(stacked, small, withheld, LAYOUT, min_cell_count=K) == []
    assert withheld.sum() >= 1  # complementary cells were needed
    for row, table in enumerate(released.values()):  # what is shown is the truth or a mark
        for value, truth in zip(table, stacked[row], strict=True):
            assert value == truth or (value == "<5" and truth < K) or (value == "*" and truth >= K)


def test_without_complementary_suppression_a_subtraction_would_recover_the_small_count():
    """The attack works: primary suppression alone leaves the tiny member's counts recoverable."""
    counts = _consortium()
    total = sum(counts.values())
    tables = [TOTAL, *counts]
    vectors = [total, *counts.values()]
    naive = {t: [int(v) if v >= K else "<5" for v in vector] for t, vector in zip(tables, vectors, strict=True)}
    recovered = _recover(naive, tables)
    assert recovered[("tiny", "after fit")] == 3


def test_a_members_own_table_alone_is_protected():
    counts = count_feasibility(_tiny(), PROTOCOL)
    release = release_feasibility(counts, LAYOUT, min_cell_count=K)
    assert release.members == {} and _recover({TOTAL: release.total.to_json()}, [TOTAL]) == {}
    small, withheld = suppression_pattern(counts, LAYOUT, min_cell_count=K)
    assert determined_cells(counts, small, withheld, LAYOUT, min_cell_count=K) == []
    # after fit 3, after renal 2, without adult 3, without fit 6, without renal 1: every small one hidden
    assert release.total.shown[:7] == ("12", "9", "<5", "<5", "<5", "6", "<5")


def test_the_total_must_be_the_members_sum():
    counts = _consortium()
    with pytest.raises(ValueError, match="not the sum"):
        release_feasibility(counts["big"], LAYOUT, min_cell_count=K, members=counts)


def test_laplace_noise_is_seeded_scaled_by_the_sensitivity_and_stated():
    counts = _consortium()
    total = sum(counts.values())
    assert noise_sensitivity(LAYOUT) == 1 + 3 + 3
    for obs in (_tiny(), _member(50, seed=4)):  # no single patient moves the vector by more
        counts_ = count_feasibility(obs, PROTOCOL)
        moves = [np.abs(counts_ - count_feasibility(obs.drop(index=i), PROTOCOL)).sum() for i in obs.index]
        assert max(moves) <= noise_sensitivity(LAYOUT)
    first = release_feasibility(total, LAYOUT, min_cell_count=K, noise_epsilon=1.4, seed=7)
    again = release_feasibility(total, LAYOUT, min_cell_count=K, noise_epsilon=1.4, seed=7)
    assert first.total.shown == again.total.shown
    assert first.noise == {"mechanism": "laplace", "epsilon": 1.4, "sensitivity": 7, "scale": pytest.approx(5.0)}
    assert "Laplace noise (epsilon 1.4 per table, sensitivity 7, scale 5)" in first.statement()
    big = np.full(len(LAYOUT), 10_000)
    draws = np.concatenate([add_laplace_noise(big, LAYOUT, epsilon=1.4, seed=s) - big for s in range(300)])
    assert abs(draws.mean()) < 0.5 and draws.std() == pytest.approx(np.sqrt(2) * 5.0, rel=0.08)
    assert all(v == "<5" or v == "*" or int(v) >= K for v in first.total.shown)


def test_the_release_as_json_rows_and_forecast_fractions_only_from_released_cells():
    counts = _consortium()
    release = release_feasibility(sum(counts.values()), LAYOUT, min_cell_count=K, members=counts)
    payload = release_json(release, LAYOUT)
    assert payload["layout_digest"] == feasibility_layout(PROTOCOL).digest() and payload["noise"] is None
    after_fit = payload["cells"][2]
    assert after_fit["label"] == "after fit" and after_fit["members"]["tiny"] == "<5"
    assert isinstance(after_fit[TOTAL], int) and payload["release_rule"].startswith("Counts below 5 are shown as <5")
    tiny = scenario_fractions(release.members["tiny"].values, LAYOUT)
    assert tiny["protocol"] is None and tiny["without fit"] is None  # both rest on a withheld count
    total = scenario_fractions(release.total.values, LAYOUT)
    assert total["protocol"] == pytest.approx(sum(counts.values())[3] / sum(counts.values())[0])


def test_a_sum_decrypted_from_ckks_rounds_back_to_counts():
    summed = sum(_consortium().values()).astype(float) + 1e-4
    assert round_summed_counts(summed).tolist() == sum(_consortium().values()).tolist()
    with pytest.raises(ValueError, match="cell 1 is 2.5000, not a count"):
        round_summed_counts(np.array([1.0, 2.5]))


@pytest.mark.parametrize("seed", [3, 18, 33])
def test_random_consortia_release_nothing_recoverable(seed):
    """Consortia of 1 to 5 members of 3 to 120 patients (seeds that needed several audit rounds)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(3, 120, rng.integers(1, 6))
    counts = {f"m{i}": count_feasibility(_member(int(n), seed=seed * 10 + i), PROTOCOL) for i, n in enumerate(sizes)}
    total = sum(counts.values())
    release = release_feasibility(total, LAYOUT, min_cell_count=K, members=counts)
    released = {TOTAL: release.total.to_json(), **{m: t.to_json() for m, t in release.members.items()}}
    assert _recover(released, [TOTAL, *counts]) == {}
    stacked = np.array([total, *counts.values()])
    small = np.array([release.total.small, *(t.small for t in release.members.values())])
    withheld = np.array([release.total.withheld, *(t.withheld for t in release.members.values())])
    assert determined_cells(stacked, small, withheld, LAYOUT, min_cell_count=K) == []
    assert np.array_equal(small, stacked < K)
