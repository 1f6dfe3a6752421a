"""report.md says why, with numbers, when pooled falls below federated beyond the paired interval."""

from __future__ import annotations

from consortium.report_markdown import render_markdown


def _report(gain: bool) -> dict:
    diff = {"estimate": 0.141, "ci": [0.03, 0.27] if gain else [-0.01, 0.29], "gain": gain}
    task = {
        "metric": "auroc",
        "federated": 0.81,
        "local": 0.63,
        "pooled": 0.67,
        "ci": {"federated": [0.66, 0.94]},
        "difference": {"federated-pooled": diff},
    }
    return {
        "job_id": "j1",
        "consortium": "c",
        "env": "sim",
        "timing": {"rounds": 2, "seconds_total": 10.0, "bytes_received_per_round": 100},
        "privacy": {"he": False, "dp": False},
        "members": {"pharma-a": {"tasks": {"a_response": task}}},
        "endpoints": {"a_response": {"members": ["pharma-a"], "metric": "auroc"}},
        "summary": {"paired_gains": {"federated-local": 0, "federated-pooled": int(gain), "tasks": 9}},
        "biomarkers": {"statistics": {}, "model": {}},
        "tracking": {"uri": "sqlite:///x", "experiment": "e"},
    }


def test_pooled_below_federated_is_explained_with_numbers():
    text = render_markdown(_report(gain=True))
    assert "pharma-a a_response: federated - pooled 0.141 [0.030, 0.270]" in text
    assert "about 0.23 such cases are expected by chance alone" in text


def test_no_explanation_without_such_a_case():
    assert "expected by chance" not in render_markdown(_report(gain=False))
