"""A member site continuing an interrupted federation (no FLARE processes): from the trainer it saved after
the round before, it sends exactly what an uninterrupted site sends, private heads and DP budget included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel

from jobs.recipe import server_model
from jobs.sections import PUBLISHED_META, sections_of
from jobs.site import MemberSite
from jobs.site_outputs import CHECKPOINTS_KEPT, SiteOutputs
from models.network import SharedModel
from schema.config import load_config

ROUNDS = 4


@pytest.fixture(scope="module")
def config(shared_consortium: Path):
    return load_config(shared_consortium)


@pytest.fixture(scope="module")
def dp_config(config):
    privacy = config.privacy.model_copy(update={"dp": config.privacy.dp.model_copy(update={"enabled": True})})
    return config.model_copy(update={"privacy": privacy})


def initial(config) -> FLModel:
    state = SharedModel(**server_model(config)["args"]).state_dict()
    return FLModel(params={k: v.numpy() for k, v in state.items()}, current_round=0, total_rounds=ROUNDS)


def following(sent: FLModel, *, current: int, total_rounds: int) -> FLModel:
    """The next round's global model of a one-member federation: the member's own update, as FLARE hands it."""
    params = {k: v.numpy() for k, v in sent.params.items() if k.startswith(("trunk.", "heads."))}
    sections = {n: s.to_meta() for n, s in sections_of(sent.meta).items() if n.startswith(("trunk", "head:"))}
    return FLModel(
        params=params, meta={"consortium_sections": sections}, current_round=current, total_rounds=total_rounds
    )


def run_rounds(site: MemberSite, first: FLModel, *, rounds: range, total_rounds: int) -> list[FLModel]:
    sent, received = [], first
    for current in rounds:
        sent.append(site.train_round(received))
        received = following(sent[-1], current=current + 1, total_rounds=total_rounds)
    return sent


def straight_and_resumed(config, tmp_path: Path, *, member: str, stop_after: int):
    straight = MemberSite(config, member, outputs=SiteOutputs(tmp_path / "straight"))
    expected = run_rounds(straight, initial(config), rounds=range(ROUNDS), total_rounds=ROUNDS)

    outputs = SiteOutputs(tmp_path / "resumed")
    before = run_rounds(
        MemberSite(config, member, outputs=outputs), initial(config), rounds=range(stop_after + 1), total_rounds=ROUNDS
    )
    # the continuing job: FLARE numbers its rounds from stop_after + 1 and counts only the rest
    again = MemberSite(config, member, outputs=outputs, first_round=stop_after + 1)
    remaining = ROUNDS - stop_after - 1
    after = run_rounds(
        again,
        following(before[-1], current=stop_after + 1, total_rounds=remaining),
        rounds=range(stop_after + 1, ROUNDS),
        total_rounds=remaining,
    )
    return straight, expected, again, before + after


def test_a_continuing_site_sends_what_an_uninterrupted_one_sends(config, tmp_path):
    straight, expected, again, got = straight_and_resumed(config, tmp_path, member="pharma-b", stop_after=1)
    for round_, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert set(want.params) == set(have.params), round_
        for key in want.params:
            assert torch.equal(want.params[key], have.params[key]), (round_, key)
    final_want, final_have = straight.model.state_dict(), again.model.state_dict()
    for key in final_want:  # private heads and label scaling too
        assert torch.equal(final_want[key], final_have[key]), key
    published = got[-1].meta[PUBLISHED_META]
    assert published["round"] == ROUNDS - 1 and published["total_rounds"] == ROUNDS
    assert published["test"] == expected[-1].meta[PUBLISHED_META]["test"]
    assert again.trainer.epochs_done == ROUNDS * config.training.local_epochs


def test_a_continuing_dp_site_spends_the_same_budget(dp_config, tmp_path):
    _, expected, again, got = straight_and_resumed(dp_config, tmp_path, member="pharma-b", stop_after=0)
    epsilons = [m.meta[PUBLISHED_META]["epsilon"] for m in got]
    assert epsilons == [m.meta[PUBLISHED_META]["epsilon"] for m in expected]
    assert 0 < epsilons[0] < epsilons[-1] <= dp_config.privacy.dp.epsilon * 1.01
    for key in expected[-1].params:
        assert torch.equal(expected[-1].params[key], got[-1].params[key]), key


def test_the_site_keeps_the_last_checkpoints_only_and_none_for_the_last_round(config, tmp_path):
    outputs = SiteOutputs(tmp_path / "site")
    run_rounds(
        MemberSite(config, "pharma-a", outputs=outputs), initial(config), rounds=range(ROUNDS), total_rounds=ROUNDS
    )
    assert sorted(outputs.checkpoints()) == list(range(ROUNDS - 1 - CHECKPOINTS_KEPT, ROUNDS - 1))
    state = outputs.load_checkpoint(round_=ROUNDS - 2)
    # the trainer, and the Cox coefficients of the covariates this member reached (jobs.site.COX_STATE)
    assert set(state) == {"model", "optimizer", "rng_state", "epochs_done", "accountant", "cox_fit"}
    assert any(k.startswith("heads.a_response.") for k in state["model"])  # the private head stays here
    assert outputs.load_checkpoint(round_=ROUNDS - 1) is None


def test_a_site_without_a_checkpoint_continues_with_the_global_model_and_fresh_private_heads(config, tmp_path, caplog):
    site = MemberSite(config, "pharma-a", outputs=SiteOutputs(tmp_path / "empty"), first_round=2)
    sent = site.train_round(following(site_update(config, tmp_path), current=2, total_rounds=2))
    assert sent.current_round == 2
    assert "no saved trainer before round 2" in caplog.text


def site_update(config, tmp_path: Path) -> FLModel:
    return MemberSite(config, "pharma-a", outputs=SiteOutputs(tmp_path / "other")).train_round(initial(config))


def test_dp_on_one_side_only_is_refused(config, dp_config, tmp_path):
    outputs = SiteOutputs(tmp_path / "site")
    run_rounds(MemberSite(config, "pharma-b", outputs=outputs), initial(config), rounds=range(2), total_rounds=ROUNDS)
    again = MemberSite(dp_config, "pharma-b", outputs=outputs, first_round=2)
    with pytest.raises(ValueError, match="disagree on DP"):
        again.train_round(following(site_update(config, tmp_path), current=2, total_rounds=2))
