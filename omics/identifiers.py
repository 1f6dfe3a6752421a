"""Feature identifier kinds: gene symbols or Ensembl gene IDs, never mixed in one file."""

from __future__ import annotations

import re
from collections.abc import Iterable
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
