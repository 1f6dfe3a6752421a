"""report.json's privacy block states secure aggregation: on or off (and why), the threat model in one sentence,
what the aggregate reveals to a member and, without HE, the quantization and its error bound."""

from __future__ import annotations

import pytest

from consortium.report_privacy import privacy
from consortium.statistics_release import data_residency
from jobs.he.fixed_point import FRACTION_BITS, error_bound
from schema.config import ConsortiumConfig
from schema.report import Privacy


def _config(n_members: int, *, min_members: int | None = None, secure_aggregation: bool | None = None):
    members = [
        {"name": f"m{i}", "org": f"Org_{i}", "data": f"m{i}.h5ad", "tasks": [{"name": "resp", "type": "binary"}]}
        for i in range(n_members)
    ]
    for member in members:
        member["tasks"][0]["column"] = "response"
    raw = {
        "name": "tiny",
        "operator": {"org": "op"},
        "panel": {"features": [f"G{i}" for i in range(5)]},
        "members": members,
        "training": {"min_members": min_members},
        "privacy": {"secure_aggregation": secure_aggregation},
    }
    return ConsortiumConfig.model_validate(raw)


@pytest.mark.parametrize("he", [True, False])
def test_on_by_default_with_three_members(he):
    block = privacy(_config(3), he=he, records={})
    state = Privacy.model_validate(block).secure_aggregation
    assert state.enabled and state.why_off is None
    assert state.members_per_round == 3 and state.colluders_tolerated == 1
    assert "together with up to 1 member (training.min_members - 2) learns nothing of another member's" in (
        state.threat_model
    )
    assert state.threat_model.endswith("update beyond what the aggregate itself reveals.")
    assert "the sum of the other two members' updates, not any one of them" in state.aggregate_reveals
    if he:
        assert state.threat_model.startswith("Pairwise masks under the CKKS encryption")
        assert state.quantization is None  # CKKS has its own error; no fixed-point words
        assert "a member's secret key opens only the sum" in block["operator_reads"]
    else:
        assert state.threat_model.startswith("Pairwise masks over 64-bit fixed-point words: the operator sees only")
        assert state.quantization.fraction_bits == FRACTION_BITS == 32
        assert state.quantization.members == 3
        assert state.quantization.error_bound_sum == error_bound(3) == pytest.approx(3 * 2.0**-33)
        assert "the operator reads the sum" in block["operator_reads"] and "plaintext" not in block["operator_reads"]


def test_colluders_follow_min_members():
    state = privacy(_config(6, min_members=4), he=False, records={})["secure_aggregation"]
    assert state["enabled"] and state["colluders_tolerated"] == 2 and "up to 2 members" in state["threat_model"]
    assert state["quantization"]["members"] == 6 and state["quantization"]["error_bound_sum"] == error_bound(6)
    assert "with 4 members in a round, the sum of the other 3 members' updates" in state["aggregate_reveals"]


@pytest.mark.parametrize("he", [True, False])
def test_off_with_two_members_says_why_and_what_the_sum_reveals(he):
    block = privacy(_config(2), he=he, records={})
    state = Privacy.model_validate(block).secure_aggregation
    assert not state.enabled and state.colluders_tolerated == 0 and state.quantization is None
    assert state.why_off.startswith("fewer than 3 members per round: a round may close with 2")
    assert "the aggregate minus a member's own update is the other member's update" in state.aggregate_reveals
    if he:
        assert "with any one member (each holds the CKKS secret key) it decrypts every member's update" in (
            state.threat_model
        )
        assert "one member colluding with it decrypts each member's ciphertext" in block["operator_reads"]
    else:
        assert state.threat_model == "No masks and no HE: the operator reads every member's update as it arrives."
        assert block["operator_reads"].startswith("everything in plaintext")


def test_off_by_choice_with_three_members():
    config = _config(3, secure_aggregation=False)
    state = privacy(config, he=False, records={})["secure_aggregation"]
    assert not state["enabled"] and state["why_off"] == "privacy.secure_aggregation: false in consortium.yaml"
    assert "in plaintext" in data_residency(config, he=False)[0]["crossed"]
    assert "reads only their sum" in data_residency(_config(3), he=False)[0]["crossed"]


def test_an_endpoint_two_members_hold_is_named():
    config = _config(3)
    raw = config.model_dump(mode="json", exclude_none=True)
    raw["members"][2]["tasks"] = [{"name": "own", "type": "binary", "column": "response"}]
    state = privacy(ConsortiumConfig.model_validate(raw), he=True, records={})["secure_aggregation"]
    assert state["enabled"] and "the sum of the other two members' updates" in state["aggregate_reveals"]
    assert (
        "but endpoint resp is held by two members, and each holder reads the other's head"
        in (state["aggregate_reveals"])
    )
    assert "held by two" not in privacy(config, he=True, records={})["secure_aggregation"]["aggregate_reveals"]
