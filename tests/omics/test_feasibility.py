"""Site-side feasibility counts on hand-countable members: every funnel, relaxation and stratum count."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from omics.feasibility import check_obs, count_feasibility, feasibility_layout, scenario_fractions
from schema.protocol import ProtocolError, protocol_from_text

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
NAN = float("nan")
# id: (age, sex, ecog, egfr, region) -- what each patient does, by hand:
MEMBER_A = {
    1: (15, "F", 0, 60, "EU"),  # fails adult
    2: (25, "M", 0, 60, "EU"),  # eligible
    3: (35, "F", 1, 20, "US"),  # excluded: renal
    4: (45, "F", 2, 60, "EU"),  # fails fit
    5: (55, "M", 1, 70, "US"),  # eligible
    6: (65, "F", 0, NAN, "EU"),  # renal unknown (egfr missing): not confirmed eligible
    7: (70, "M", 3, 20, "US"),  # fails fit (and renal)
    8: (NAN, "F", 0, 60, "EU"),  # age missing: fails adult
    9: (30, "F", 1, 45, "US"),  # eligible
    10: (17, "M", 1, 80, "EU"),  # fails adult only
}
MEMBER_B = {
    1: (40, "F", 0, 50, "EU"),  # eligible
    2: (60, "M", 1, 35, "US"),  # eligible
    3: (20, None, 0, 90, "EU"),  # eligible, sex missing
    4: (80, "F", 4, 10, "US"),  # fails fit, renal
    5: (50, "M", 0, 29.9, "EU"),  # excluded: renal
    6: (18, "F", 1, 30, "US"),  # eligible (both bounds are inclusive / strict as written)
}
EXPECTED_A = {
    "screened": 10,
    "after adult": 7,  # 2 3 4 5 6 7 9
    "after fit": 5,  # 2 3 5 6 9
    "after renal": 3,  # 2 5 9
    "without adult": 3,  # fit and not renal: 1 2 5 8 9 10 -> 6, minus 3
    "without fit": 1,  # adult and not renal: 2 4 5 9 -> 4, minus 3
    "without renal": 2,  # adult and fit: 5, minus 3 (the last drop)
    "age=<50, sex=F": 1,
    "age=<50, sex=M": 1,
    "age=>=50, sex=M": 1,
    "sex=F": 1,
    "sex=M": 2,
    "region=EU": 1,
    "region=US": 2,
}
EXPECTED_B = {
    "screened": 6,
    "after adult": 6,
    "after fit": 5,  # 1 2 3 5 6
    "after renal": 4,  # 1 2 3 6
    "without adult": 0,
    "without fit": 0,  # patient 4 fails renal too
    "without renal": 1,
    "age=<50, sex=F": 2,
    "age=<50, sex=missing": 1,
    "age=>=50, sex=M": 1,
    "sex=F": 2,
    "sex=M": 1,
    "sex=missing": 1,
    "region=EU": 2,
    "region=US": 2,
}


def _obs(rows: dict) -> pd.DataFrame:
    obs = pd.DataFrame.from_dict(rows, orient="index", columns=["age", "sex", "ecog", "egfr", "region"])
    return obs.astype({"age": float, "egfr": float})


def _by_label(counts: np.ndarray) -> dict[str, int]:
    return {cell.label: int(v) for cell, v in zip(feasibility_layout(PROTOCOL).cells, counts, strict=True)}


@pytest.mark.parametrize(("rows", "expected"), [(MEMBER_A, EXPECTED_A), (MEMBER_B, EXPECTED_B)])
def test_every_funnel_relaxation_and_stratum_count_of_a_hand_countable_member(rows, expected):
    counts = _by_label(count_feasibility(_obs(rows), PROTOCOL))
    assert {k: v for k, v in counts.items() if v or k in expected} == expected
    assert len(counts) == 1 + 3 + 3 + 9 + 3 + 3


def test_the_layout_is_the_protocols_so_members_vectors_add_up():
    layout = feasibility_layout(PROTOCOL)
    a, b = count_feasibility(_obs(MEMBER_A), PROTOCOL), count_feasibility(_obs(MEMBER_B), PROTOCOL)
    total = _by_label(a + b)
    assert total["after renal"] == 7 and total["without adult"] == 3 and total["sex=missing"] == 1
    assert [c["section"] for c in layout.describe()][:7] == ["funnel"] * 4 + ["relaxation"] * 3
    assert layout.describe()[8] == {"section": "stratum", "label": "age=<50, sex=M", "columns": ["age", "sex"],
                                    "levels": ["<50", "M"]}  # fmt: skip
    for vector in (a, b, a + b):  # the identities the release rules rely on hold for members and sums
        assert all(sum(c * vector[i] for i, c in eq.items()) == 0 for eq in layout.equalities)
        assert all(sum(c * vector[i] for i, c in iq.items()) <= 0 for iq in layout.inequalities)


def test_missing_values_follow_three_valued_logic():
    protocol = protocol_from_text(
        """
columns: {egfr: numeric, sex: [F, M]}
inclusion: [{name: known, where: "not (egfr < 30)"}, {name: female, where: "sex != 'M'"}]
exclusion: [{name: renal, where: "egfr < 30 or egfr is missing"}]
"""
    )
    obs = pd.DataFrame({"egfr": [NAN, 50.0, 10.0, 40.0], "sex": ["F", "F", "F", None]})
    funnel = count_feasibility(obs, protocol)[:4].tolist()
    # not(unknown) is unknown: patient 1 fails 'known'; sex missing fails 'female'; 'renal' keeps patient 2
    assert funnel == [4, 2, 1, 1]


def test_categorical_levels_booleans_and_numbers_compare_as_text():
    protocol = protocol_from_text(
        "columns: {stage: [1, 2, 3], smoker: [yes, no]}\n"
        "inclusion: [{name: early, where: 'stage in [1, 2]'}, {name: nonsmoker, where: 'smoker == false'}]"
    )
    obs = pd.DataFrame({"stage": pd.Categorical([1, 2, 3, 1]), "smoker": [False, False, False, True]})
    assert count_feasibility(obs, protocol)[:3].tolist() == [4, 3, 2]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"drop": "egfr"}, "protocol names column 'egfr', which is not in obs"),
        ({"age": ["old"] * 6}, "obs column 'age' is declared numeric in the protocol but holds object values"),
        ({"region": ["EU", "US", "EU", "Asia", "EU", "US"]}, r"holds level\(s\) \['Asia'\] that the protocol does not"),
    ],
)
def test_a_member_whose_obs_does_not_fit_the_protocol_gets_an_error_naming_the_column(change, message):
    obs = _obs(MEMBER_B)
    obs = obs.drop(columns=change["drop"]) if "drop" in change else obs.assign(**change)
    with pytest.raises(ProtocolError, match=message) as caught:
        check_obs(obs, PROTOCOL, path="b.h5ad")
    assert str(caught.value).startswith("b.h5ad: ")


def test_scenario_fractions_for_the_enrollment_model():
    counts = count_feasibility(_obs(MEMBER_A), PROTOCOL)
    fractions = scenario_fractions(counts, feasibility_layout(PROTOCOL))
    assert fractions == {"protocol": 0.3, "without adult": 0.6, "without fit": 0.4, "without renal": 0.5}
