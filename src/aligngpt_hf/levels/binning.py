"""Bucketing alignment scores into levels: equal-count (`quantile`) or equal-width (`uniform`), ties kept together.

Why a tolerance: the same image-caption pair scored in another batch, or with another kernel, differs by float noise;
an exact comparison would give identical pairs different levels. Scores within `tie_tolerance` share a level.
"""

from __future__ import annotations

import numpy as np

BINNINGS = ("quantile", "uniform")
DEFAULT_TIE_TOLERANCE = 1e-4  # cosine scores closer than this are float noise (batching, fp32 vs bf16 kernels)


def tie_groups(sorted_scores: np.ndarray, tolerance: float) -> np.ndarray:
    """Group id per sorted score: a group starts at a score and takes every following score within `tolerance` of
    that first one (anchored, so a dense run of scores never chains into one huge group)."""
    groups = np.empty(sorted_scores.size, dtype=np.int64)
    group, anchor = -1, -np.inf
    for position, score in enumerate(sorted_scores.tolist()):
        if score - anchor > tolerance:
            group, anchor = group + 1, score
        groups[position] = group
    return groups


def assign_levels(scores, num_levels: int = 8, binning: str = "quantile", tie_tolerance: float = DEFAULT_TIE_TOLERANCE,
                  return_ties: bool = False):
    """Bucket scores into levels 0..N-1 (0 = lowest scores); return (levels, edges of length N+1) [, ties].

    Scores within `tie_tolerance` of each other are ties (float noise: the same pair scored in another batch) and
    always share a level. `quantile`: rank by (score, original index) and give rank r the level
    floor(r * N / count), a tie group taking the level of its middle rank, so level sizes differ by at most one plus
    the size of a tie group; edges[k] is the lowest score of level k (edges[N] the maximum). `uniform`: N
    equal-width bins between min and max score; a tie group takes the bin of its mean score. `ties` (with
    `return_ties`) counts the tie groups that straddled a level boundary and were kept together.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if binning not in BINNINGS:
        raise ValueError(f"binning must be one of {BINNINGS}, got {binning!r}")
    if int(num_levels) != num_levels or num_levels < 2:
        raise ValueError(f"num_levels must be an integer >= 2, got {num_levels!r}")
    if not tie_tolerance >= 0:
        raise ValueError(f"tie_tolerance must be >= 0, got {tie_tolerance!r}")
    num_levels = int(num_levels)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError("no scores to bucket: the dataset is empty (or every record was skipped)")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinity; skipped records must be removed before bucketing")
    if num_levels > scores.size:
        raise ValueError(f"num_levels={num_levels} is larger than the number of scored pairs ({scores.size}): "
                         "every level needs at least one pair; lower --num-levels or add data")
    order = np.lexsort((np.arange(scores.size), scores))
    sorted_scores = scores[order]
    groups = tie_groups(sorted_scores, tie_tolerance)
    starts = np.searchsorted(groups, groups, side="left")
    ends = np.searchsorted(groups, groups, side="right") - 1
    if binning == "quantile" and groups[-1] == 0:  # one tie group: every pair in one level, the others empty
        raise ValueError(f"all {scores.size} scores are equal within tie_tolerance={tie_tolerance} "
                         f"({sorted_scores[0]}..{sorted_scores[-1]}): every pair would get the same level; the scorer "
                         "gives no signal on this data (check --scorer), or lower --tie-tolerance")
    if binning == "quantile":
        positional = np.arange(scores.size, dtype=np.int64) * num_levels // scores.size
        sorted_levels = ((starts + ends) // 2) * num_levels // scores.size
    else:
        low, high = float(scores.min()), float(scores.max())
        if high - low <= tie_tolerance:
            raise ValueError(f"all {scores.size} scores are equal within tie_tolerance={tie_tolerance} ({low}..{high});"
                             " uniform bins are undefined, use quantile")
        edges = np.linspace(low, high, num_levels + 1)
        positional = np.searchsorted(edges[1:-1], sorted_scores, side="right").astype(np.int64)
        means = np.bincount(groups, weights=sorted_scores) / np.bincount(groups)
        sorted_levels = np.searchsorted(edges[1:-1], means[groups], side="right").astype(np.int64)
    levels = np.empty(scores.size, dtype=np.int64)
    levels[order] = sorted_levels
    if binning == "quantile":
        level_starts = np.searchsorted(sorted_levels, np.arange(num_levels), side="left")
        edges = np.append(sorted_scores[np.minimum(level_starts, scores.size - 1)], sorted_scores[-1])
    split = np.unique(groups[positional != positional[starts]])
    ties = {"tie_tolerance": float(tie_tolerance), "num_tie_groups_across_boundary": int(split.size),
            "num_pairs_in_those_groups": int(np.isin(groups, split).sum())}
    return (levels, edges, ties) if return_ties else (levels, edges)
