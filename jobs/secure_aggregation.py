"""Secure aggregation's round plan, shared by the members and the server: who masks which section with whom.

Each task of a masked round carries a header (:data:`HEADER`)::

    {"members": [...], "exchange": k, "sections": {section: [holders]} | None}

``members`` is the round's list (every member masks for it, or refuses it: :mod:`jobs.he.masks`);
``sections`` is absent in a round's first exchange: each member then predicts a section's holders from
``consortium.yaml`` (:func:`predicted_holders`: an endpoint's sections are masked among the round's members
holding that endpoint, everything else among all of them). When what arrived differs from the prediction
(a member below the small-cell rule sends nothing for an endpoint, or a member dropped out), the server asks
again (exchange ``k + 1``) with the holders it saw, and a member checks them (:func:`checked_holders`):
a section whose holders the server shortened below what the prediction gives must keep at least
``max(3, min_members)`` holders, or the member leaves that section out rather than mask it for so few.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.shareable import Shareable, make_reply

from jobs.he.masks import MaskRefused, RoundBinding, required_members

HEADER = "consortium_secagg"
SEED_META = "secagg_seed"
REFUSAL_HEADER = "consortium_secagg_refused"
"""A member's reply that refuses to mask carries why, so the server's error names the cause."""
MAX_EXCHANGES = 4
"""Exchanges a round may take (the first, and re-sends after dropouts or sections below the small-cell rule)."""
_ENDPOINT_KINDS = ("head", "stats", "consensus", "coxfit")


def section_endpoint(section: str) -> str | None:
    """The endpoint a section belongs to (``head:e``, ``stats:e``, ``scaling:target_e``, ...), else None."""
    kind, _, name = section.partition(":")
    if kind in _ENDPOINT_KINDS and name:
        return name
    if kind == "scaling" and name.startswith("target_"):
        return name[len("target_") :]
    return None


def predicted_holders(section: str, members: Sequence[str], holders: Mapping[str, Sequence[str]]) -> list[str]:
    """The round's members expected to send ``section``: an endpoint's holders among them, else all of them."""
    endpoint = section_endpoint(section)
    if endpoint is None or endpoint not in holders:
        return sorted(members)
    return sorted(set(members) & set(holders[endpoint]))


def checked_holders(
    section: str,
    *,
    me: str,
    binding: RoundBinding,
    told: Sequence[str],
    holders: Mapping[str, Sequence[str]],
    min_members: int | None,
) -> list[str] | None:
    """The holders the server gave for a section this member sends, or None when it must leave it out.

    Refuses (:class:`MaskRefused`) a list without this member or with members outside the round's list.
    """
    listed = sorted({str(m) for m in told})
    if me not in listed:
        raise MaskRefused(f"section '{section}': the server's holders {listed} leave out '{me}', which sends it")
    stray = sorted(set(listed) - set(binding.members))
    if stray:
        raise MaskRefused(f"section '{section}': holders {stray} are not in the round's list {list(binding.members)}")
    if listed == predicted_holders(section, binding.members, holders):
        return listed
    return listed if len(listed) >= required_members(min_members) else None


def plan_header(members: Iterable[str], *, exchange: int, sections: Mapping[str, Sequence[str]] | None) -> dict:
    """The header the server puts on a masked round's task."""
    plan = {"members": sorted(members), "exchange": int(exchange)}
    if sections is not None:
        plan["sections"] = {name: sorted(h) for name, h in sorted(sections.items())}
    return plan


def read_header(value: object, *, job: str, round_: int) -> tuple[RoundBinding, dict[str, list[str]] | None]:
    """The round binding and explicit section holders of a task's header; parsed, never evaluated."""
    if not isinstance(value, Mapping) or not isinstance(value.get("members"), list):
        raise MaskRefused(f"round {round_}: the task carries no member list ({HEADER} header); the server is not ours")
    exchange = value.get("exchange", 0)
    if not isinstance(exchange, int):
        raise MaskRefused(f"round {round_}: exchange {exchange!r} is not an integer")
    binding = RoundBinding.of(job, round_, [str(m) for m in value["members"]], exchange=exchange)
    sections = value.get("sections")
    if sections is None:
        return binding, None
    if not isinstance(sections, Mapping) or not all(isinstance(h, list) for h in sections.values()):
        raise MaskRefused(f"round {round_}: the section holders are not a mapping of lists")
    return binding, {str(name): [str(m) for m in h] for name, h in sections.items()}


def seen_holders(sent: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
    """Per section, who sent it, from each contributor's section names (the server's view)."""
    out: dict[str, set[str]] = {}
    for member, sections in sent.items():
        for section in sections:
            out.setdefault(section, set()).add(member)
    return {name: sorted(members) for name, members in sorted(out.items())}


def refusal_reply(reason: str) -> Shareable:
    """The reply of a member that will not mask for what the server asked: an error, with the reason."""
    reply = make_reply(ReturnCode.EXECUTION_EXCEPTION)
    reply.set_header(REFUSAL_HEADER, str(reason)[:500])
    return reply
