"""A masked round's plan without FLARE: sections held by some members, a second exchange, refusals."""

from __future__ import annotations

import numpy as np
import pytest
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants

from jobs.he.fixed_point import error_bound
from jobs.he.masked_words import WordSum, mask_update
from jobs.he.masks import MaskRefused, PairwiseMasker, RoundBinding, SectionPairs, new_private_key, public_bytes
from jobs.he.self_mask import RevealedSelfMask, SelfMask
from jobs.member_masks import MemberMasks
from jobs.sections import weighted_update
from jobs.secure_aggregation import (
    HEADER,
    REFUSAL_HEADER,
    SEED_META,
    checked_holders,
    plan_header,
    predicted_holders,
    read_header,
    section_endpoint,
    seen_holders,
)

MEMBERS = ["m-a", "m-b", "m-c", "m-d"]
HOLDERS = {"shared": ["m-a", "m-b", "m-c", "m-d"], "pair": ["m-a", "m-b"]}


@pytest.fixture(scope="module")
def maskers() -> dict[str, PairwiseMasker]:
    keys = {name: new_private_key() for name in MEMBERS}
    public = {name: public_bytes(key) for name, key in keys.items()}
    return {name: PairwiseMasker(name, keys[name], public, min_members=3) for name in MEMBERS}


def _update(member: str, *, stats: bool) -> tuple[dict, dict]:
    rng = np.random.default_rng(MEMBERS.index(member))
    params = {"trunk.0.weight": rng.normal(size=(16, 8)), "heads.shared.0.weight": rng.normal(size=(4, 16))}
    if member in HOLDERS["pair"]:
        params["heads.pair.0.weight"] = rng.normal(size=(4, 16))
    if stats:
        params["stats.shared.sum"] = rng.normal(size=40) * 10
    weights = {name: 3.0 for name in ("trunk", "head:shared", "head:pair")}
    return weighted_update(params, weights={k: v for k, v in weights.items()})


def _send(maskers, selves, binding, updates, told=None) -> tuple[WordSum, dict[str, list[str]]]:
    total, sent = WordSum(), {}
    for name in binding.members:
        params, meta = updates[name]
        sources = {}
        for section in meta["consortium_sections"]:
            if told is None:
                among = predicted_holders(section, binding.members, HOLDERS)
            else:
                among = checked_holders(
                    section, me=name, binding=binding, told=told[section], holders=HOLDERS, min_members=3
                )
            sources[section] = [SectionPairs(maskers[name], among), selves[name]]
        total.add(mask_update(params, meta=meta, sources=sources, binding=binding))
        sent[name] = sorted(sources)
    return total, sent


def _exact(updates, members) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name in members:
        for key, value in updates[name][0].items():
            out[key] = out.get(key, 0) + value
    return out


def test_sections_held_by_some_members_cancel_over_their_holders(maskers):
    updates = {name: _update(name, stats=True) for name in MEMBERS}
    selves = {name: SelfMask(name) for name in MEMBERS}
    binding = RoundBinding.of("job-x", 0, MEMBERS)
    total, sent = _send(maskers, selves, binding, updates)
    holders = seen_holders(sent)
    assert holders["head:pair"] == ["m-a", "m-b"] == predicted_holders("head:pair", MEMBERS, HOLDERS)
    seeds = {name: RevealedSelfMask(selves[name].reveal(binding)) for name in MEMBERS}
    result = total.result(unmask={s: [seeds[m] for m in h] for s, h in holders.items()}, binding=binding)
    exact = _exact(updates, MEMBERS)
    for key, value in result.data.items():
        assert np.max(np.abs(value - exact[key])) <= error_bound(4), key


def test_a_section_withheld_is_masked_again_for_the_holders_seen(maskers):
    """m-d sends no statistics (below the small-cell rule): the first sum of 'stats:shared' stays masked;
    the second exchange, for the holders the server saw, opens it exactly."""
    updates = {name: _update(name, stats=name != "m-d") for name in MEMBERS}
    selves = {name: SelfMask(name) for name in MEMBERS}
    first = RoundBinding.of("job-x", 1, MEMBERS)
    total, sent = _send(maskers, selves, first, updates)
    holders = seen_holders(sent)
    assert holders["stats:shared"] == ["m-a", "m-b", "m-c"] != predicted_holders("stats:shared", MEMBERS, HOLDERS)
    # the server cannot open exchange 0's statistics: m-d's pair masks toward the holders do not cancel
    opened = total.result(unmask={}, binding=first)
    exact = _exact(updates, MEMBERS)
    assert np.median(np.abs(opened.data["stats.shared.sum"] - exact["stats.shared.sum"])) > 1e3

    second = RoundBinding.of("job-x", 1, MEMBERS, exchange=1)
    total, sent = _send(maskers, selves, second, updates, told=holders)
    assert seen_holders(sent) == holders
    seeds = {name: RevealedSelfMask(selves[name].reveal(second)) for name in MEMBERS}
    result = total.result(unmask={s: [seeds[m] for m in h] for s, h in holders.items()}, binding=second)
    for key, value in result.data.items():
        assert np.max(np.abs(value - exact[key])) <= error_bound(4), key
    # each member revealed exchange 1, so none masks (or reveals) exchange 0 of this round any more
    with pytest.raises(MaskRefused, match="already revealed"):
        selves["m-a"].check(first)


def test_holders_the_server_shortens_below_the_floor_are_left_out(maskers):
    binding = RoundBinding.of("job-x", 2, MEMBERS, exchange=1)
    told = ["m-a", "m-b"]  # the server claims m-c and m-d sent no statistics
    assert checked_holders("stats:shared", me="m-a", binding=binding, told=told, holders=HOLDERS, min_members=3) is None
    # the same two members for an endpoint only they hold: what consortium.yaml predicts, so kept
    kept = checked_holders("head:pair", me="m-a", binding=binding, told=told, holders=HOLDERS, min_members=3)
    assert kept == told
    three = ["m-a", "m-b", "m-c"]
    assert checked_holders("stats:shared", me="m-a", binding=binding, told=three, holders=HOLDERS, min_members=3)
    with pytest.raises(MaskRefused, match="leave out 'm-d'"):
        checked_holders("trunk", me="m-d", binding=binding, told=three, holders=HOLDERS, min_members=3)
    with pytest.raises(MaskRefused, match="not in the round's list"):
        checked_holders("trunk", me="m-a", binding=binding, told=[*three, "m-x"], holders=HOLDERS, min_members=3)


def test_a_member_refuses_a_short_list_before_masking(maskers):
    member = MemberMasks(he=False, holders=HOLDERS, min_members=3)
    member._masker, member._self_masks = maskers["m-a"], SelfMask("m-a")
    member._update = _update("m-a", stats=False)
    member._binding = RoundBinding.of("job-x", 0, ["m-a", "m-b"])  # a server isolating m-a with one colluder
    with pytest.raises(MaskRefused, match="fewer than 3"):
        member._masked(member._binding, None, None)
    with pytest.raises(MaskRefused, match="no update of this round"):
        member.resend(RoundBinding.of("job-x", 5, MEMBERS, exchange=1), None, None)


def test_the_plan_header_is_parsed_never_evaluated():
    header = plan_header(["m-b", "m-a", "m-c"], exchange=1, sections={"trunk": ["m-c", "m-a", "m-b"]})
    binding, sections = read_header(header, job="job-x", round_=3)
    assert binding.members == ("m-a", "m-b", "m-c") and binding.exchange == 1 and binding.round == 3
    assert sections == {"trunk": ["m-a", "m-b", "m-c"]}
    for bad in (None, "__import__('os')", {"members": "m-a"}, {"members": ["m-a"], "exchange": "1"}):
        with pytest.raises(MaskRefused):
            read_header(bad, job="job-x", round_=3)
    with pytest.raises(MaskRefused, match="repeats"):
        read_header({"members": ["m-a", "m-a", "m-b"]}, job="job-x", round_=3)
    assert [section_endpoint(s) for s in ("trunk", "head:pfs", "scaling:target_age", "scaling:features")] == [
        None, "pfs", "age", None,
    ]  # fmt: skip


def _reveal_request(asker: str, *, round_: int, members: list[str]):
    request = Shareable()
    request.set_header(HEADER, plan_header(members, exchange=0, sections=None))
    request.set_header(AppConstants.CURRENT_ROUND, round_)
    request.set_peer_props({ReservedKey.IDENTITY_NAME: asker})
    return request


def test_the_reveal_answers_the_server_once_a_round_and_never_a_member(maskers):
    """The ``secagg_reveal`` aux message: aux messages may pass between clients, so a member that asks
    another for its seed is refused; the server gets the seed of one exchange per round."""
    member = MemberMasks(he=False, holders=HOLDERS, min_members=3)
    selves = SelfMask("m-a")
    member._masker, member._self_masks = maskers["m-a"], selves
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, "m-a", private=False)
    fl_ctx.set_prop(ReservedKey.RUN_NUM, "job-x", private=False)

    def ask(asker: str, round_: int) -> Shareable:
        return member.on_reveal("secagg_reveal", _reveal_request(asker, round_=round_, members=MEMBERS), fl_ctx)

    binding = RoundBinding.of("job-x", 4, MEMBERS)
    sent = selves.mask(binding, section="trunk", chunk=0, modulus=2**64, count=8)  # m-a masked round 4
    refused = ask("m-b", 4)  # a member of the consortium plays the server
    assert "only the server may" in refused.get_header(REFUSAL_HEADER)
    reply = ask("consortium-server", 4)  # nothing was revealed to m-b: the server still gets the seed
    assert reply.get_header(REFUSAL_HEADER) is None
    seed = RevealedSelfMask(bytes.fromhex(from_shareable(reply).meta[SEED_META]))
    assert np.array_equal(seed.mask(binding, section="trunk", chunk=0, modulus=2**64, count=8), sent)
    with pytest.raises(MaskRefused, match="already revealed"):
        selves.check(binding)  # revealed: m-a masks nothing more in round 4
