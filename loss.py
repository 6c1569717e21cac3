"""Sampled softmax over mixed negatives (global + in-batch) with log-q correction and hard-negative mining.

Shapes: R target rows (positions whose next token is an item, padding excluded), D hidden,
C = 2R candidate columns (the R global negatives, then the R in-batch positives).
Memory: the logits are built chunk_rows rows at a time and each chunk is checkpointed, so neither
forward nor backward ever holds more than one (chunk_rows, 2R) block of logits.
"""
from __future__ import annotations

import math
from collections import defaultdict
from functools import partial

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

Tensor = torch.Tensor

DEFAULT_CURRICULUM = "20000:8192:0.5,130000:128:0.25"


def log_q_from_counts(counts: np.ndarray | Tensor, alpha: float = 0.75) -> Tensor:
    """(itemnum+1,) event counts -> (itemnum+1,) float32 log q with q ∝ max(count, 1)^alpha, sum(q) = 1.
    Zero counts (row 0, unseen items) count as 1 so no entry is -inf."""
    c = torch.as_tensor(np.asarray(counts) if not isinstance(counts, Tensor) else counts).double().clamp(min=1.0)
    logits = alpha * torch.log(c)
    return (logits - torch.logsumexp(logits, 0)).float()


def parse_curriculum(table: str) -> list[tuple[int, int, float]]:
    """"step:k:share,..." -> [(step, k, share)], steps strictly increasing, k >= 1, 0 <= share <= 1."""
    points: list[tuple[int, int, float]] = []
    for item in str(table).split(","):
        parts = item.strip().split(":")
        if len(parts) != 3:
            raise ValueError(f"curriculum entry {item.strip()!r} of {table!r}: expected 'step:k:share'")
        try:
            step, k, share = int(parts[0]), int(parts[1]), float(parts[2])
        except ValueError:
            raise ValueError(f"curriculum entry {item.strip()!r} of {table!r}: expected int:int:float") from None
        if step < 0 or k < 1 or not 0.0 <= share <= 1.0:
            raise ValueError(f"curriculum entry {item.strip()!r}: need step >= 0, k >= 1, 0 <= share <= 1")
        if points and step <= points[-1][0]:
            raise ValueError(f"curriculum {table!r}: steps must be strictly increasing")
        points.append((step, k, share))
    return points


def curriculum(step: int, total_steps: int, table: str = DEFAULT_CURRICULUM,
               ref_steps: int = 130000) -> tuple[int | None, float]:
    """Hard-negative schedule -> (hard_k, global_share). Before the first point: (None, share0), i.e. all
    negatives (warm phase). Between points k moves geometrically and share linearly; after the last
    point its values hold. The table is written for a ref_steps-long run; a shorter run scales every
    step by total_steps / ref_steps so it still reaches the hard phase."""
    if total_steps < 1 or ref_steps < 1:
        raise ValueError(f"total_steps ({total_steps}) and ref_steps ({ref_steps}) must be >= 1")
    points = parse_curriculum(table)
    scale = total_steps / ref_steps if total_steps < ref_steps else 1.0
    steps = [s * scale for s, _, _ in points]
    if step < steps[0]:
        return None, points[0][2]
    for i in range(len(points) - 1):
        if step < steps[i + 1]:
            t = (step - steps[i]) / (steps[i + 1] - steps[i])
            (_, k0, h0), (_, k1, h1) = points[i], points[i + 1]
            k = round(math.exp(math.log(k0) + t * (math.log(k1) - math.log(k0))))
            return int(k), h0 + t * (h1 - h0)
    return points[-1][1], points[-1][2]


def _split_k(hard_k: int, global_share: float) -> tuple[int, int]:
    # how many of the kept negatives come from the global columns and from the in-batch columns
    kg = int(round(hard_k * global_share))
    return kg, max(hard_k - kg, 0)


def _chunk_loss(q: Tensor, pos: Tensor, pos_ids: Tensor, rseq: Tensor, cand: Tensor, cand_ids: Tensor,
                cand_seq: Tensor, keys: Tensor, log_q: Tensor, *, inv_tau: float, num_global: int,
                kg: int | None, ki: int | None) -> Tensor:
    """Sum over the chunk's rows of logsumexp([pos, kept negs]) - pos. q, pos (r, D); cand (C, D)."""
    with torch.autocast(device_type=q.device.type, enabled=False):  # logits in (at least) fp32
        q, pos = q.to(cand.dtype), pos.to(cand.dtype)
        pos_logit = (q * pos).sum(-1) * inv_tau - log_q[pos_ids]  # (r,)
        logits = (q @ cand.T) * inv_tau - log_q[cand_ids][None]  # (r, C)
        # false negatives: the column's item is one of the positives of the row's sequence;
        # keys = sorted unique seq * V + item over all rows, so membership is a binary search
        key = rseq[:, None] * log_q.numel() + cand_ids[None]  # (r, C)
        idx = torch.searchsorted(keys, key).clamp_(max=keys.numel() - 1)
        masked = (keys[idx] == key) | (rseq[:, None] == cand_seq[None]) | (cand_ids == 0)[None]
        logits = logits.masked_fill(masked, float("-inf"))
        if kg is not None:
            g = logits[:, :num_global].topk(min(kg, num_global), dim=1).values  # masked ones stay -inf
            b = logits[:, num_global:].topk(min(ki, logits.shape[1] - num_global), dim=1).values
            logits = torch.cat([g, b], dim=1)
        terms = torch.cat([pos_logit[:, None], logits], dim=1)  # (r, 1 + kept)
        return (torch.logsumexp(terms, dim=1) - pos_logit).sum()


def sampled_softmax_loss(query: Tensor, pos: Tensor, pos_ids: Tensor, row_seq: Tensor, neg: Tensor,
                         neg_ids: Tensor, log_q: Tensor, temperature: float = 0.01, hard_k: int | None = None,
                         global_share: float = 0.5, chunk_rows: int = 2048) -> Tensor:
    """Mean over rows of the sampled softmax loss (scalar).

    query (R, D) normalised outputs at target rows; pos (R, D) their positives' vectors, pos_ids (R,);
    row_seq (R,) sequence index of each row; neg (R, D) one global negative per row, neg_ids (R,);
    log_q (itemnum+1,). Logit = cos / temperature - log_q[item], positives included. Masked columns:
    in-batch positives of the row's own sequence, any column whose item is a positive of the row's
    sequence, and item id 0. hard_k: keep the top hard_k negatives per row, round(hard_k * global_share)
    of them from the global columns and the rest from the in-batch ones (fewer if fewer are valid)."""
    r_total = query.shape[0]
    if r_total == 0:
        return query.sum() * 0.0
    dtype = torch.promote_types(query.dtype, torch.float32)
    with torch.autocast(device_type=query.device.type, enabled=False):
        cand = torch.cat([neg, pos], dim=0).to(dtype)  # (C, D)
    cand_ids = torch.cat([neg_ids, pos_ids]).long()  # (C,)
    row_seq = row_seq.long()
    cand_seq = torch.cat([torch.full_like(row_seq, -1), row_seq])  # global columns belong to no sequence
    log_q = log_q.to(device=query.device, dtype=dtype)
    keys = torch.unique(row_seq * log_q.numel() + pos_ids.long())  # sorted
    kg, ki = _split_k(hard_k, global_share) if hard_k is not None else (None, None)
    fn = partial(_chunk_loss, inv_tau=1.0 / temperature, num_global=r_total, kg=kg, ki=ki)
    use_ckpt = torch.is_grad_enabled() and any(t.requires_grad for t in (query, pos, neg))
    total = query.new_zeros((), dtype=dtype)
    for s in range(0, r_total, chunk_rows):
        e = min(s + chunk_rows, r_total)
        args = (query[s:e], pos[s:e], pos_ids[s:e].long(), row_seq[s:e], cand, cand_ids, cand_seq, keys, log_q)
        total = total + (checkpoint(fn, *args, use_reentrant=False) if use_ckpt else fn(*args))
    return total / r_total


def sampled_softmax_loss_reference(query: Tensor, pos: Tensor, pos_ids: Tensor, row_seq: Tensor, neg: Tensor,
                                   neg_ids: Tensor, log_q: Tensor, temperature: float = 0.01,
                                   hard_k: int | None = None, global_share: float = 0.5,
                                   chunk_rows: int = 2048) -> Tensor:
    """Brute-force oracle for sampled_softmax_loss: dense logits, python loops for masks and top-k."""
    r_total = query.shape[0]
    dtype = torch.promote_types(query.dtype, torch.float32)
    q, p, n = query.to(dtype), pos.to(dtype), neg.to(dtype)
    lq = log_q.to(dtype)
    cand = torch.cat([n, p])  # (2R, D)
    cand_ids = [int(i) for i in torch.cat([neg_ids, pos_ids])]
    seqs = [int(s) for s in row_seq]
    full = q @ cand.T / temperature - lq[torch.tensor(cand_ids)][None]  # (R, 2R)
    pos_logit = (q * p).sum(-1) / temperature - lq[pos_ids.long()]  # (R,)
    seq_items: dict[int, set[int]] = defaultdict(set)
    for s, i in zip(seqs, pos_ids.tolist()):
        seq_items[s].add(int(i))
    losses = []
    for r in range(r_total):
        groups: tuple[list[Tensor], list[Tensor]] = ([], [])  # (global, in-batch)
        for c, cid in enumerate(cand_ids):
            in_batch = c >= r_total
            if cid == 0 or cid in seq_items[seqs[r]] or (in_batch and seqs[c - r_total] == seqs[r]):
                continue
            groups[int(in_batch)].append(full[r, c])
        kept = list(groups[0]) + list(groups[1])
        if hard_k is not None:
            kg, ki = _split_k(hard_k, global_share)
            top = [sorted(g, key=lambda t: float(t), reverse=True)[:kk] for g, kk in zip(groups, (kg, ki))]
            kept = top[0] + top[1]
        losses.append(torch.logsumexp(torch.stack([pos_logit[r]] + kept), 0) - pos_logit[r])
    return torch.stack(losses).mean() if losses else query.sum() * 0.0
