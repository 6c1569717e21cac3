"""Ranking metrics and the most-popular baseline, shared by validation (train.py) and evaluate.py.

One target per user: HitRate@k, NDCG@k = 1/log2(rank + 1) when the target is at rank <= k (ranks from 1),
MRR over the retrieved list, and the competition Score = 0.31·HR@10 + 0.69·NDCG@10.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def target_ranks(topk: Sequence[Sequence[int]] | np.ndarray, target: np.ndarray) -> np.ndarray:
    """Ranked lists (U, <=K) and one target a user (U,) -> (U,) rank of the first occurrence of the target,
    from 1; 0 = not retrieved."""
    ranks = np.zeros(len(target), np.int64)
    if isinstance(topk, np.ndarray) and topk.ndim == 2:
        hit = topk == np.asarray(target)[:, None]  # (U, K)
        return np.where(hit.any(1), hit.argmax(1) + 1, 0)
    for j, (top, t) in enumerate(zip(topk, np.asarray(target).tolist())):
        if top is not None and t in top:
            ranks[j] = list(top).index(t) + 1
    return ranks


def summarise(ranks: np.ndarray, ks: Iterable[int] = (10,), weights: np.ndarray | None = None) -> dict[str, float]:
    """Weighted means over users (plain means without weights) of HR@k, NDCG@k, MRR, and Score (needs k = 10).
    MRR is over the retrieved list: a target beyond it counts 0."""
    ranks = np.asarray(ranks)
    w = np.ones(len(ranks)) if weights is None else np.asarray(weights, np.float64)
    w = w / w.sum() if len(ranks) else w
    out: dict[str, float] = {"users": int(len(ranks))}
    for k in sorted(set(ks)):
        hit = (ranks > 0) & (ranks <= k)
        out[f"HR@{k}"] = float((w * hit).sum())
        out[f"NDCG@{k}"] = float((w * np.where(hit, 1.0 / np.log2(np.maximum(ranks, 1) + 1.0), 0.0)).sum())
    out["MRR"] = float((w * np.where(ranks > 0, 1.0 / np.maximum(ranks, 1), 0.0)).sum())
    if "HR@10" in out:
        out["Score"] = 0.31 * out["HR@10"] + 0.69 * out["NDCG@10"]
    return out


def popularity_topk(candidates: np.ndarray, counts: np.ndarray, histories: Iterable[np.ndarray], k: int) -> list[list[int]]:
    """The most-popular baseline: candidates (M,) ids ranked by counts (M,) (ties keep the candidates' order),
    then for each user the first k not in their history (ids of the same kind as the candidates)."""
    ranked = np.asarray(candidates)[np.argsort(-np.asarray(counts), kind="stable")].tolist()
    out = []
    for h in histories:
        seen, top = set(np.asarray(h).tolist()), []
        for c in ranked:  # stops after at most k + len(history) candidates
            if c not in seen:
                top.append(c)
                if len(top) == k:
                    break
        out.append(top)
    return out
