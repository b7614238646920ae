"""PLISM constants, slide names and the pair groups (which pairs count in which group)."""

from __future__ import annotations

import itertools
import re
from typing import Any, Iterable, List, Sequence, Tuple, Union

from ...errors import EvaluationInputError
from ..common import import_optional

TOP_K: Tuple[int, ...] = (1, 3, 5, 10)
"""The k values of the benchmark's top-k accuracies."""

PLISM_STAININGS: Tuple[str, ...] = (
    "GIV", "GIVH", "GM", "GMH", "GV", "GVH", "HR", "HRH", "KR", "KRH", "LM", "LMH", "MY",
)  # fmt: skip
"""The 13 staining codes of PLISM slide names."""

PLISM_SCANNERS: Tuple[str, ...] = ("AT2", "GT450", "P", "S210", "S360", "S60", "SQ")
"""The 7 scanner codes of PLISM slide names."""

PLISM_NUM_TILES = 8_139
"""Tiles per slide used by the leaderboard (plism-benchmark's subset of the 16,278 extracted)."""

PLISM_TILES_PER_SLIDE = 16_278
"""Tiles extracted from each PLISM slide; the benchmark's subsets index into them."""

SLIDE_PATTERN = r"^(?P<staining>[A-Za-z0-9]+)_(?P<scanner>[A-Za-z0-9]+)"
"""Default slide-name pattern: ``<staining>_<scanner>``, anything after is ignored
(``GIVH_AT2``, ``GIVH_AT2_to_GMH_S60.tif``). The benchmark splits names on ``_`` the same way."""

GROUPS: Tuple[str, ...] = ("cross-scanner", "cross-staining", "cross-both", "all")
"""Pair groups, in the benchmark's order. As in plism-benchmark, *cross-scanner* is every pair
with the same staining and *cross-staining* every pair with the same scanner, so a replicate
pair (same staining and scanner, absent from PLISM) counts in both, and in ``all``."""

UPSTREAM_GROUP_NAMES = {
    "cross-scanner": "inter-scanner",
    "cross-staining": "inter-staining",
    "cross-both": "inter-scanner, inter-staining",
    "all": "all",
}
"""plism-benchmark's names of the groups (its ``results.csv`` index)."""


def metric_names(ks: Sequence[int] = TOP_K) -> List[str]:
    """Column names of the metrics: ``cosine_similarity``, then ``top_{k}_accuracy`` per k."""
    return ["cosine_similarity"] + [f"top_{k}_accuracy" for k in ks]


def parse_slide_name(name: str, pattern: Union[str, "re.Pattern[str]"] = SLIDE_PATTERN) -> Tuple[str, str]:
    """Read the staining and scanner codes from a slide name.

    Args:
        name: e.g. ``"GIVH_AT2"`` or ``"GIVH_AT2_to_GMH_S60.tif"``.
        pattern: a regex with named groups ``staining`` and ``scanner``, matched with ``re.match``
            at the start of the name. Default: ``<staining>_<scanner>``.

    Returns:
        ``(staining, scanner)``.

    Raises:
        EvaluationInputError (a ValueError): the name does not match, or the pattern lacks the named groups.
    """
    regex = re.compile(pattern) if isinstance(pattern, str) else pattern
    missing = {"staining", "scanner"} - set(regex.groupindex)
    if missing:
        raise EvaluationInputError(f"slide-name pattern {regex.pattern!r} needs the named groups {sorted(missing)}")
    match = regex.match(name)
    if match is None or not match.group("staining") or not match.group("scanner"):
        raise EvaluationInputError(
            f"slide {name!r} does not match the slide-name pattern {regex.pattern!r}; name slides "
            f"'<staining>_<scanner>...' (PLISM: 'GIVH_AT2') or pass slide_pattern= with named groups "
            f"'staining' and 'scanner'"
        )
    return match.group("staining"), match.group("scanner")


def pair_group(staining_a: str, scanner_a: str, staining_b: str, scanner_b: str) -> str:
    """``cross-scanner``, ``cross-staining``, ``cross-both`` or ``replicate`` for one slide pair.

    A ``replicate`` pair counts in the cross-scanner and cross-staining aggregates (see ``GROUPS``).
    """
    same_staining, same_scanner = staining_a == staining_b, scanner_a == scanner_b
    if same_staining and same_scanner:
        return "replicate"
    if same_staining:
        return "cross-scanner"
    if same_scanner:
        return "cross-staining"
    return "cross-both"


def slide_pairs(names: Iterable[str], *, slide_pattern: Union[str, "re.Pattern[str]"] = SLIDE_PATTERN) -> Any:
    """All unordered pairs of slides with their staining, scanner and group.

    Args:
        names: slide names (at least two, unique).
        slide_pattern: see ``parse_slide_name``.

    Returns:
        A pandas DataFrame with columns ``slide_a``, ``slide_b``, ``staining_a``, ``scanner_a``,
        ``staining_b``, ``scanner_b``, ``group``; ``C(len(names), 2)`` rows in sorted name order.

    Raises:
        EvaluationInputError (a ValueError): fewer than two slides, a duplicate name, or an unparsable name.
    """
    pd = import_optional("pandas", "PLISM pair tables")
    names = sorted(names)
    if len(names) < 2:
        raise EvaluationInputError(f"PLISM metrics compare pairs of slides; got {len(names)} slide(s)")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise EvaluationInputError(f"duplicate slide names: {duplicates}")
    meta = {name: parse_slide_name(name, slide_pattern) for name in names}
    rows = []
    for slide_a, slide_b in itertools.combinations(names, 2):
        (st_a, sc_a), (st_b, sc_b) = meta[slide_a], meta[slide_b]
        rows.append((slide_a, slide_b, st_a, sc_a, st_b, sc_b, pair_group(st_a, sc_a, st_b, sc_b)))
    columns = ["slide_a", "slide_b", "staining_a", "scanner_a", "staining_b", "scanner_b", "group"]
    return pd.DataFrame(rows, columns=columns)


__all__ = [
    "GROUPS",
    "PLISM_NUM_TILES",
    "PLISM_SCANNERS",
    "PLISM_STAININGS",
    "PLISM_TILES_PER_SLIDE",
    "SLIDE_PATTERN",
    "TOP_K",
    "UPSTREAM_GROUP_NAMES",
    "metric_names",
    "pair_group",
    "parse_slide_name",
    "slide_pairs",
]
