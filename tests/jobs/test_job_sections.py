"""Sections of an update: weighted by the site, only added at the server, finalized by whoever holds the sum."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.sections import (
    SECTIONS_META,
    SUM_SCALES,
    Section,
    add_sections,
    finalize,
    section_of,
    sections_of,
    select,
    weighted_update,
)


def _update(seed: int, *, head: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = {
        "trunk.0.weight": rng.normal(size=(4, 3)),
        "trunk.0.bias": rng.normal(size=4),
        "stats.os.n": np.array([40.0 + seed, 38.0]),
        "stats.os.sum_sq": rng.uniform(1e5, 1e6, size=3),
        "consensus.os.score": rng.dirichlet(np.ones(3)),
    }
    if head:
        params["heads.os.0.weight"] = rng.normal(size=(2, 4))
    return params


def _summed(updates: list[dict[str, np.ndarray]], steps: list[float]) -> tuple[dict, dict]:
    """What the server does: add the weighted arrays and the sections' weights."""
    total: dict[str, np.ndarray] = {}
    sections = None
    for params, n in zip(updates, steps, strict=True):
        weights = {"trunk": n, "head:os": n} if any(k.startswith("heads.") for k in params) else {"trunk": n}
        weighted, meta = weighted_update(params, weights=weights)
        sections = add_sections(sections, sections_of(meta))
        for key, value in weighted.items():
            total[key] = total.get(key, 0.0) + value
    return total, {SECTIONS_META: {name: s.to_meta() for name, s in sections.items()}}


def test_keys_fall_into_sections():
    assert section_of("trunk.4.bias") == ("trunk", "mean")
    assert section_of("heads.os.0.weight") == ("head:os", "mean")
    assert section_of("stats.a_response.sum_x") == ("stats:a_response", "sum")
    assert section_of("consensus.os.score") == ("consensus:os", "sum")


@pytest.mark.parametrize("key", ["optimizer.state", "target_mean", "_module.trunk.0.weight", "trunkX.0.weight"])
def test_a_key_outside_the_known_prefixes_is_refused(key):
    with pytest.raises(ValueError, match=rf"key '{key}' belongs to no section"):
        section_of(key)
    with pytest.raises(ValueError, match="belongs to no section"):
        weighted_update({"trunk.0.bias": np.zeros(2), key: np.zeros(2)}, weights={"trunk": 1.0})


def test_weighted_update_multiplies_means_and_scales_sums():
    params = _update(1)
    weighted, meta = weighted_update(params, weights={"trunk": 12.0, "head:os": 12.0})
    np.testing.assert_array_equal(weighted["trunk.0.weight"], 12.0 * params["trunk.0.weight"])
    np.testing.assert_array_equal(weighted["heads.os.0.weight"], 12.0 * params["heads.os.0.weight"])
    np.testing.assert_allclose(weighted["stats.os.sum_sq"], params["stats.os.sum_sq"] / SUM_SCALES["stats"], rtol=1e-15)
    # attribution vectors (entries ~ 1/p) grow above the CKKS noise, statistics shrink into its headroom
    np.testing.assert_allclose(weighted["consensus.os.score"], params["consensus.os.score"] * 1e3, rtol=1e-15)
    assert SUM_SCALES["stats"] > 1 > SUM_SCALES["consensus"]
    assert all(v.dtype == np.float64 for v in weighted.values())
    sections = meta[SECTIONS_META]
    assert sections["trunk"] == {
        "keys": ["trunk.0.weight", "trunk.0.bias"],
        "weight": 12.0,
        "reduce": "mean",
        "contributors": 1,
    }
    assert sections["head:os"]["keys"] == ["heads.os.0.weight"] and sections["head:os"]["weight"] == 12.0
    assert sections["stats:os"] == {
        "keys": ["stats.os.n", "stats.os.sum_sq"],
        "weight": 1.0,
        "reduce": "sum",
        "contributors": 1,
    }
    assert sections["consensus:os"]["reduce"] == "sum"


def test_round_trip_gives_the_weighted_mean_and_the_sum():
    updates, steps = [_update(1), _update(2), _update(3, head=False)], [10.0, 30.0, 60.0]
    total, meta = _summed(updates, steps)
    plain = finalize(total, meta)

    assert set(plain) == set(updates[0])
    trunk_mean = sum(n * u["trunk.0.weight"] for u, n in zip(updates, steps, strict=True)) / 100.0
    np.testing.assert_allclose(plain["trunk.0.weight"], trunk_mean, rtol=1e-12, atol=1e-14)
    # the shared head is averaged over the two members holding it, with their weights only
    head_mean = (10.0 * updates[0]["heads.os.0.weight"] + 30.0 * updates[1]["heads.os.0.weight"]) / 40.0
    np.testing.assert_allclose(plain["heads.os.0.weight"], head_mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(plain["stats.os.sum_sq"], sum(u["stats.os.sum_sq"] for u in updates), rtol=1e-12)
    np.testing.assert_allclose(plain["stats.os.n"], [41.0 + 42.0 + 43.0, 3 * 38.0], rtol=1e-12)

    sections = sections_of(meta)
    assert (sections["trunk"].weight, sections["trunk"].contributors) == (100.0, 3)
    assert (sections["head:os"].weight, sections["head:os"].contributors) == (40.0, 2)
    assert (sections["stats:os"].weight, sections["stats:os"].contributors) == (3.0, 3)


def test_finalize_leaves_a_plain_model_alone_and_needs_every_named_key():
    initial = {"trunk.0.bias": np.arange(3.0)}
    assert np.array_equal(finalize(initial, None)["trunk.0.bias"], np.arange(3.0))
    assert np.array_equal(finalize(initial, {"NUM_STEPS_CURRENT_ROUND": 3})["trunk.0.bias"], np.arange(3.0))
    _, meta = weighted_update({"trunk.0.bias": np.ones(3), "trunk.0.weight": np.ones(2)}, weights={"trunk": 2.0})
    with pytest.raises(ValueError, match="section 'trunk' names 'trunk.0.weight', which the aggregate does not hold"):
        finalize(initial, meta)


def test_add_sections_sums_weights_and_refuses_other_keys():
    first = {"trunk": Section("trunk", ("trunk.a", "trunk.b"), 5.0, "mean")}
    total = add_sections(add_sections(None, first), {"trunk": Section("trunk", ("trunk.a", "trunk.b"), 7.0, "mean")})
    assert total["trunk"] == Section("trunk", ("trunk.a", "trunk.b"), 12.0, "mean", contributors=2)
    assert first["trunk"].weight == 5.0  # the caller's dict is not changed
    with pytest.raises(ValueError, match="section 'trunk' arrives with other keys or reduction than before"):
        add_sections(total, {"trunk": Section("trunk", ("trunk.a",), 1.0, "mean")})
    with pytest.raises(ValueError, match="other keys or reduction"):
        add_sections(total, {"trunk": Section("trunk", ("trunk.a", "trunk.b"), 1.0, "sum")})


@pytest.mark.parametrize("weight", [0.0, -3.0, float("nan"), float("inf")])
def test_weights_must_be_positive(weight):
    with pytest.raises(ValueError, match=rf"section 'trunk': weight {weight}; it must be a positive number"):
        weighted_update({"trunk.0.bias": np.ones(2)}, weights={"trunk": weight})
    meta = {"keys": ["trunk.0.bias"], "weight": weight, "reduce": "mean"}
    with pytest.raises(ValueError, match="it must be a positive number"):
        Section.from_meta("trunk", meta)


def test_a_mean_section_needs_its_weight_and_finite_values():
    with pytest.raises(ValueError, match="no weight for mean section 'head:os'; give the site's local steps"):
        weighted_update({"trunk.0.bias": np.ones(2), "heads.os.0.bias": np.ones(1)}, weights={"trunk": 4.0})
    with pytest.raises(ValueError, match=r"'trunk.0.bias' holds NaN or inf"):
        weighted_update({"trunk.0.bias": np.array([1.0, np.nan])}, weights={"trunk": 4.0})
    with pytest.raises(ValueError, match="reduce='max'; expected 'mean' or 'sum'"):
        Section.from_meta("trunk", {"keys": ["trunk.0.bias"], "weight": 1.0, "reduce": "max"})
    forged = {SECTIONS_META: {"extra:os": {"keys": ["stats.os.n"], "weight": 1.0, "reduce": "sum"}}}
    with pytest.raises(ValueError, match="sum section 'extra:os': unknown kind 'extra'"):
        finalize({"stats.os.n": np.ones(2)}, forged)


def test_select_groups_statistics_by_endpoint():
    params = {
        "stats.os.n": np.ones(2),
        "stats.resp.sum_x": np.zeros(3),
        "consensus.os.score": np.ones(3),
        "trunk.0.bias": np.ones(1),
    }
    stats = select(params, "stats")
    assert set(stats) == {"os", "resp"} and set(stats["resp"]) == {"sum_x"}
    assert set(select(params, "consensus")) == {"os"}
