"""report.md lists losses as it lists gains, with numbers, and names genes by their symbols."""

from __future__ import annotations

import pytest

from consortium.report_markdown import render_markdown, verdict, with_ci


def _report(estimate: float, ci: list[float]) -> dict:
    diff = {"estimate": estimate, "ci": ci, "gain": ci[0] > 0, "loss": ci[1] < 0}
    task = {
        "metric": "auroc",
        "federated": 0.81,
        "local": 0.63,
        "pooled": 0.67,
        "ci": {"federated": [0.66, 0.94]},
        "difference": {"federated-pooled": diff},
    }
    other = {**task, "difference": {"federated-pooled": {"estimate": 0.01, "ci": [-0.1, 0.1], "gain": False}}}
    return {
        "job_id": "j1",
        "consortium": "c",
        "env": "sim",
        "timing": {"rounds": 2, "seconds_total": 10.0, "bytes_received_per_round": 100},
        "privacy": {"he": False, "dp": False},
        "members": {"pharma-a": {"tasks": {"a_response": task}}, "pharma-b": {"tasks": {"b_response": other}}},
        "endpoints": {
            "a_response": {"type": "binary", "members": ["pharma-a"], "metric": "auroc"},
            "b_response": {"type": "binary", "members": ["pharma-b"], "metric": "auroc"},
        },
        "biomarkers": {
            "statistics": {"a_response": [{"feature": "ENSG00000105369", "symbol": "CD79A"}]},
            "markers": {"a_response": [{"feature": "ENSG00000105369", "symbol": "CD79A"}]},
            "markers_down": {"a_response": [{"feature": "ENSG00000090382", "symbol": "LYZ"}]},
            "model": {"a_response": [{"feature": "ENSG00000000003", "symbol": ""}]},
        },
        "tracking": {"uri": "sqlite:///x", "experiment": "e"},
    }


def test_pooled_below_federated_is_listed_as_a_gain_and_explained():
    text = render_markdown(_report(0.141, [0.03, 0.27]))
    assert "Gains: federated above another arm beyond the paired interval:" in text
    assert "- pharma-a a_response: federated - pooled +0.141 [0.030, 0.270]" in text
    assert "about 0.05 gains and as many losses per comparison are expected by chance alone" in text
    assert "the pooled arm trains one network for every member's endpoints" in text
    assert "| federated - pooled | 2 | 1 | 0 |" in text


def test_federated_below_pooled_is_listed_as_a_loss():
    text = render_markdown(_report(-0.12, [-0.238, -0.003]))
    assert "Losses: federated below another arm beyond the paired interval:" in text
    assert "- pharma-a a_response: federated - pooled -0.120 [-0.238, -0.003]" in text
    assert "-0.120 [-0.238, -0.003] (loss)" in text  # in the table of differences too
    assert "| federated - pooled | 2 | 0 | 1 |" in text
    assert "Gains: federated above no other arm." in text
    assert "pooled arm trains one network" not in text


def test_features_by_symbol_up_and_down_apart():
    text = render_markdown(_report(0.01, [-0.1, 0.1]))
    assert "statistics, higher in the positive class (top 10 by statistic): CD79A" in text
    assert "statistics, lower in the positive class: LYZ" in text
    assert "model (top 10): ENSG00000000003" in text  # no symbol known: the id
    assert "ENSG00000105369" not in text and "ENSG00000090382" not in text


@pytest.mark.parametrize(
    ("diff", "word"),
    [
        ({"ci": [0.01, 0.2], "gain": True}, "gain"),
        ({"ci": [-0.2, -0.01], "gain": False}, "loss"),  # a report written before "loss" was recorded
        ({"ci": [-0.2, 0.1], "gain": False, "loss": False}, "no difference shown"),
    ],
)
def test_verdict(diff, word):
    assert verdict(diff) == word


def test_with_ci_formats_missing_and_signed_values():
    assert with_ci(None, [0.1, 0.2]) == "n/a" and with_ci(float("nan"), None) == "n/a"
    assert with_ci(0.5, None) == "0.500" and with_ci(0.05, [-0.01, 0.1], sign=True) == "+0.050 [-0.010, 0.100]"


def test_calibration_of_binary_endpoints_has_its_own_table():
    report = _report(0.1, [0.02, 0.2])
    assert "## Calibration" not in render_markdown(report)  # no calibration figures: no empty table
    task = report["members"]["pharma-a"]["tasks"]["a_response"]
    task["other_metrics"] = {
        "federated": {"auprc": 0.7, "brier": 0.1812, "calibration_slope": 0.734, "calibration_in_the_large": -0.021}
    }
    markdown = render_markdown(report)
    assert "## Calibration of the federated model's probabilities" in markdown
    assert "| pharma-a | a_response | 0.181 | 0.734 | -0.021 |" in markdown
    assert "| pharma-b | b_response |" not in markdown.split("## Calibration")[1].split("##")[0]


def _secure_aggregation(*, enabled: bool, he: bool) -> dict:
    state = {
        "enabled": enabled,
        "why_off": None if enabled else "fewer than 3 members per round: a round may close with 2",
        "members_per_round": 3 if enabled else 2,
        "colluders_tolerated": 1 if enabled else 0,
        "threat_model": "Pairwise masks ...: the operator together with up to 1 member learns nothing of another "
        "member's update beyond what the aggregate itself reveals."
        if enabled
        else "No masks and no HE: the operator reads every member's update as it arrives.",
        "aggregate_reveals": "a member reads the aggregate minus its own update: the sum of the other two"
        if enabled
        else "with two members in a round, the aggregate minus a member's own update is the other member's update",
        "quantization": None,
    }
    if enabled and not he:
        state["quantization"] = {
            "fraction_bits": 32,
            "members": 3,
            "error_bound_sum": 3 * 2.0**-33,
            "value_limit": 2.0**25,
        }
    return state


@pytest.mark.parametrize(("enabled", "he"), [(True, True), (True, False), (False, True), (False, False)])
def test_secure_aggregation_is_stated_within_80_columns(enabled, he):
    report = _report(0.01, [-0.1, 0.1])
    report["privacy"] = {"he": he, "dp": False, "secure_aggregation": _secure_aggregation(enabled=enabled, he=he)}
    text = render_markdown(report)
    block = text.split("- secure aggregation:")[1].split("\n\n")[0]
    lines = ("- secure aggregation:" + block).splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    joined = " ".join(line.strip() for line in lines)
    if enabled:
        assert joined.startswith("- secure aggregation: on. Pairwise masks")
        assert "learns nothing of another member's update beyond what the aggregate itself reveals." in joined
        assert "- what the aggregate itself reveals: a member reads the aggregate minus its own update" in joined
    else:
        assert joined.startswith("- secure aggregation: off, fewer than 3 members per round")
        assert "the other member's update" in joined
    quantization = "- quantization: 32 fractional bits; a summed value is within 3.5e-10 of the exact sum (3 members)"
    assert (quantization in joined) == (enabled and not he)


def test_a_report_without_secure_aggregation_still_renders():
    text = render_markdown(_report(0.01, [-0.1, 0.1]))  # written before secure aggregation existed
    assert "homomorphic encryption: off; DP-SGD: off" in text and "secure aggregation" not in text
