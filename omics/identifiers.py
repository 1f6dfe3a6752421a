"""Feature identifier kinds: gene symbols or Ensembl gene IDs, never mixed in one file."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Literal

IdKind = Literal["symbol", "ensembl"]
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{11}(\.\d+)?$")


def identifier_kind(feature_id: str) -> IdKind:
    return "ensembl" if _ENSEMBL.match(feature_id) else "symbol"


def count_kinds(feature_ids: Iterable[str]) -> dict[IdKind, int]:
    counts: dict[IdKind, int] = {"symbol": 0, "ensembl": 0}
    for feature_id in feature_ids:
        counts[identifier_kind(str(feature_id))] += 1
    return counts


def kind_problem(
    feature_ids: Sequence[str], *, id_kind: str, panel: Sequence[str], symbol_column: str | None = None
) -> tuple[str, str] | None:
    """``(problem, fix)`` when the member's identifiers are not of the consortium's ``id_kind`` (``None``
    when they are). The fix names the setting that mends it: ``panel.id_kind`` when the panel lists the
    member's kind too, ``var_id_column`` when the file has a column of symbols, else mapping the features.

    >>> print(kind_problem(["ENSG00000141510"], id_kind="symbol", panel=["ENSG00000141510"])[1])
    set `panel.id_kind: ensembl` in consortium.yaml: the panel lists Ensembl IDs too
    """
    kinds = count_kinds(feature_ids)
    present = [kind for kind, n in kinds.items() if n]
    if len(present) > 1:
        return (
            f"mixed identifier kinds: {kinds['symbol']} gene symbols and {kinds['ensembl']} Ensembl IDs",
            f"map every feature to {id_kind} IDs",
        )
    if not present or present[0] == id_kind:
        return None
    kind = present[0]
    problem = f"features are {kind} IDs but the consortium panel uses {id_kind} IDs (panel.id_kind: {id_kind})"
    panel_kinds = count_kinds(panel)
    if panel_kinds[kind] > panel_kinds[id_kind]:
        return problem, f"set `panel.id_kind: {kind}` in consortium.yaml: the panel lists {_label(kind)} too"
    if id_kind == "symbol" and symbol_column:
        return problem, (
            f"set `var_id_column: {symbol_column}` for this member in consortium.yaml: that var column holds "
            "the gene symbols the panel uses"
        )
    return problem, (
        f"map the features to {id_kind} IDs before joining; or, if the consortium works in {_label(kind)}, list "
        f"the panel in them and set `panel.id_kind: {kind}`"
    )


def _label(kind: str) -> str:
    return "Ensembl IDs" if kind == "ensembl" else "gene symbols"
