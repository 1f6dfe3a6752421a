"""The ``privacy`` block of ``report.json``: HE, DP and secure aggregation, each with what it protects.

Secure aggregation (issue 26, docs/governance.md) is stated with its threat model in one sentence, what the
aggregate itself reveals to a member, why it is off where it is, and without HE the quantization of the
fixed-point words it masks (:mod:`jobs.he.fixed_point`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jobs.he.fixed_point import FRACTION_BITS, error_bound, value_limit
from jobs.he.masks import FLOOR_MEMBERS, required_members
from schema.config import ConsortiumConfig


def privacy(config: ConsortiumConfig, *, he: bool, records: Mapping[str, list[dict]]) -> dict[str, Any]:
    """The report's ``privacy`` block (:class:`schema.report.Privacy`); secure aggregation as the config says
    (:meth:`schema.config.ConsortiumConfig.secure_aggregation`)."""
    secure_aggregation = config.secure_aggregation()
    epsilon = {site: r[-1].get("epsilon") for site, r in records.items() if r and r[-1].get("epsilon") is not None}
    dp = config.privacy.dp
    masked = " (under the pairwise masks without HE when secure aggregation is on)" if not he else ""
    return {
        "he": he,
        "he_scheme": f"CKKS N={config.privacy.he.poly_modulus_degree}, coeff_mod_bit_sizes="
        f"{config.privacy.he.coeff_mod_bit_sizes}"
        if he
        else None,
        "dp": dp.enabled,
        "epsilon_spent": epsilon or None,
        "epsilon_target": dp.epsilon if dp.enabled else None,
        "delta": dp.delta if dp.enabled else None,
        "shared": (
            f"under HE when it is on{masked}: the trunk and the heads of shared endpoints every round (with a "
            "survival endpoint and covariates, the pieces of one Newton step of the covariates' Cox model); in the "
            "last round each endpoint's summed association statistics and attribution vectors. One small-cell "
            f"rule: a member with fewer than {config.data.min_cell_count} samples in a class, labelled samples or "
            "events (samples, not cells) sends nothing for that endpoint: no statistics, attribution, validation "
            "or test figures. In plaintext, outside HE, the masks and the DP budget: per-round training loss and "
            "validation figures, step counts, final test figures with their intervals and sample counts per split"
        ),
        "operator_reads": _operator_reads(he=he, masked=secure_aggregation),
        "min_members": config.statistics_min_members(),
        "dp_guarantee": _dp_guarantee(config),
        "secure_aggregation": secure_aggregation_state(config, he=he, enabled=secure_aggregation),
    }


def _operator_reads(*, he: bool, masked: bool) -> str:
    if he and masked:
        return (
            "ciphertexts only, each under pairwise masks: the operator cannot read any member's update, statistics "
            "or their sum, and a member's secret key opens only the sum, never one member's ciphertext"
        )
    if he:
        return (
            "ciphertexts only: the operator cannot read any member's update, statistics or their sum; but every "
            "member holds the secret key, so one member colluding with it decrypts each member's ciphertext"
        )
    if masked:
        return (
            "masked 64-bit words, uniform for each member: the operator reads the sum of the members' updates and "
            "statistics, never one member's"
        )
    return "everything in plaintext: the operator reads each member's update and statistics as they arrive"


def secure_aggregation_state(config: ConsortiumConfig, *, he: bool, enabled: bool) -> dict[str, Any]:
    """``privacy.secure_aggregation``: on or off (and why off), the threat model in one sentence, what the
    aggregate reveals to a member and, without HE, the quantization of the masked words."""
    per_round, members = config.min_members(), len(config.members)
    state: dict[str, Any] = {
        "enabled": enabled,
        "why_off": None if enabled else _why_off(config),
        "members_per_round": per_round,
        "colluders_tolerated": required_members(per_round) - 2 if enabled else 0,
        "threat_model": _threat_model(he=he, enabled=enabled, colluders=required_members(per_round) - 2),
        "aggregate_reveals": aggregate_reveals(per_round, endpoints_of_two=_endpoints_of_two(config)),
        "quantization": None,
    }
    if enabled and not he:
        state["quantization"] = {
            "fraction_bits": FRACTION_BITS,
            "members": members,
            "error_bound_sum": error_bound(members),
            "value_limit": value_limit(),
        }
    return state


def _why_off(config: ConsortiumConfig) -> str:
    per_round = config.min_members()
    if per_round < FLOOR_MEMBERS:
        return (
            f"fewer than {FLOOR_MEMBERS} members per round: a round may close with {per_round} "
            f"(training.min_members; the consortium has {len(config.members)}), and with two each member reads "
            "the other's update from the aggregate, masked or not"
        )
    return "privacy.secure_aggregation: false in consortium.yaml"


def _threat_model(*, he: bool, enabled: bool, colluders: int) -> str:
    who = f"up to {colluders} member{'s' if colluders != 1 else ''} (training.min_members - 2)"
    if enabled and he:
        return (
            f"Pairwise masks under the CKKS encryption: the operator together with {who} learns nothing of another "
            "member's update beyond what the aggregate itself reveals."
        )
    if enabled:
        return (
            "Pairwise masks over 64-bit fixed-point words: the operator sees only the sum, and together with "
            f"{who} learns nothing of another member's update beyond what the aggregate itself reveals."
        )
    if he:
        return (
            "No masks: the operator alone reads only ciphertexts, but with any one member (each holds the CKKS "
            "secret key) it decrypts every member's update."
        )
    return "No masks and no HE: the operator reads every member's update as it arrives."


def _endpoints_of_two(config: ConsortiumConfig) -> list[str]:
    return sorted(name for name, info in config.endpoints().items() if len(info["members"]) == 2)


def aggregate_reveals(per_round: int, *, endpoints_of_two: list[str] | None = None) -> str:
    """What the aggregate of a round of ``per_round`` members tells a member, whatever is masked or encrypted;
    ``endpoints_of_two``: shared endpoints two members hold, whose sections are summed over those two only."""
    if per_round <= 1:
        return "with one member in a round the aggregate is that member's own update"
    if per_round == 2:
        return (
            "with two members in a round, the aggregate minus a member's own update is the other member's "
            "update: each reads the other's exactly"
        )
    others = "the other two" if per_round == 3 else f"the other {per_round - 1}"
    text = (
        f"a member reads the aggregate minus its own update: with {per_round} members in a round, the sum of "
        f"{others} members' updates, not any one of them"
    )
    if endpoints_of_two:
        names = ", ".join(endpoints_of_two)
        which = f"endpoints {names} are" if len(endpoints_of_two) > 1 else f"endpoint {names} is"
        text += (
            f"; but {which} held by two members, and each holder reads the other's head, statistics and "
            "attribution for it from that endpoint's sum"
        )
    return text


def _dp_guarantee(config: ConsortiumConfig) -> str | None:
    if not config.privacy.dp.enabled:
        return None
    survival = sorted({t.name for t in config.tasks if t.type == "survival"})
    text = "DP-SGD (Opacus) over all planned rounds: (epsilon, delta) for the model updates"
    if survival:
        text += (
            f". Not a formal guarantee for survival endpoints {survival}: the Cox partial likelihood couples "
            "the samples of a batch. The association statistics are exact sums, not DP-protected"
        )
    return text
