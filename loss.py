"""Sampled softmax over mixed negatives (global + in-batch) with log-q correction and hard-negative mining.

Shapes: R target rows (positions whose next token is an item, padding excluded), D hidden,
C = 2R candidate columns (the R global negatives, then the R in-batch positives).
Memory: the logits are built chunk_rows rows at a time (by default as many rows as make CHUNK_LOGITS) and,
when there is more than one chunk, each is checkpointed, so neither forward nor backward ever holds more
than one (chunk_rows, C) block of logits (and its mask).
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
CHUNK_LOGITS = 1 << 26  # logits per chunk of rows: bounds the loss's memory (see sampled_softmax_loss)


def log_q_from_counts(counts: np.ndarray | Tensor, alpha: float = 0.75) -> Tensor:
    """(itemnum+1,) event counts -> (itemnum+1,) float32 log q with q ∝ max(count, 1)^alpha, sum(q) = 1.
    Zero counts (row 0, unseen items) count as 1 so no entry is -inf."""
    c = torch.as_tensor(counts).double().clamp(min=1.0)  # (itemnum+1,)
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
    short = total_steps < ref_steps
    steps = [s * total_steps / ref_steps if short else float(s) for s, _, _ in points]  # multiply first: exact
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
    # (round half up, not Python's half-to-even: k=1 at share 0.5 keeps one global negative)
    kg = int(math.floor(hard_k * global_share + 0.5))
    return kg, max(hard_k - kg, 0)


def _masked_columns(rseq: Tensor, row_seq: Tensor, pos_u: Tensor, cand_u: Tensor, num_items: int,
                    has_pad: bool) -> Tensor:
    """(r, C) bool: column c is masked for row i iff its item is a positive of row i's sequence (this covers
    every in-batch column of the same sequence, the row's own positive included) or it is item id 0.
    Built per chunk at sequence level: P (S_c, U) = which items each of the chunk's S_c sequences has as
    positives, so nothing larger than (r, C) exists. rseq (r,) chunk rows' sequences; row_seq (R,),
    pos_u (R,) compact item index of every row's positive; cand_u (C,) compact item index of each column."""
    seqs, local = torch.unique(rseq, return_inverse=True)  # (S_c,), (r,)
    j = torch.searchsorted(seqs, row_seq).clamp_(max=seqs.numel() - 1)  # (R,)
    hit = seqs[j] == row_seq  # rows (of the whole batch) that belong to one of the chunk's sequences
    member = torch.zeros(seqs.numel(), num_items, dtype=torch.bool, device=rseq.device)  # (S_c, U)
    member[j[hit], pos_u[hit]] = True
    if has_pad:
        member[:, 0] = True  # compact index 0 is item id 0 when present (unique() sorts)
    return member[:, cand_u][local]  # (S_c, C) -> (r, C)


def _chunk_loss(q: Tensor, pos: Tensor, cand: Tensor, rseq: Tensor, row_seq: Tensor, pos_u: Tensor, cand_u: Tensor,
                *, inv_tau: float, num_global: int, num_items: int, has_pad: bool, kg: int | None,
                ki: int | None) -> Tensor:
    """Sum over the chunk's rows of logsumexp([pos, kept negs]) - pos.
    q (r, D); pos (r, D+1) and cand (C, D+1) = [vector, -log_q[item]], so one matmul gives cos/τ - log_q."""
    with torch.autocast(device_type=q.device.type, enabled=False):  # logits in (at least) fp32
        r = q.shape[0]
        qa = torch.cat([q.to(cand.dtype) * inv_tau, q.new_ones(r, 1, dtype=cand.dtype)], dim=1)  # (r, D+1)
        pos_logit = (qa * pos).sum(1)  # (r,)
        logits = qa @ cand.T  # (r, C)
        # the row's own positive is among its sequence's positives: it enters once, as pos_logit
        masked = _masked_columns(rseq, row_seq, pos_u, cand_u, num_items, has_pad)  # (r, C)
        logits.masked_fill_(masked, float("-inf"))  # in place: the matmul's backward needs only its inputs
        if kg is None:
            return (torch.logaddexp(torch.logsumexp(logits, dim=1), pos_logit) - pos_logit).sum()
        # masked columns stay -inf through top-k, so a short group contributes only what it has
        g = logits[:, :num_global].topk(min(kg, num_global), dim=1).values
        b = logits[:, num_global:].topk(min(ki, logits.shape[1] - num_global), dim=1).values
        terms = torch.cat([pos_logit[:, None], g, b], dim=1)  # (r, 1 + kept)
        return (torch.logsumexp(terms, dim=1) - pos_logit).sum()


def candidate_columns(r_total: int, num_candidates: int | None, device: torch.device,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor] | None:
    """Which global negatives and which in-batch positives are columns: None = all 2R; else a uniform sample
    of num_candidates // 2 global and the rest in-batch, shared by every row. `generator` (CPU): training
    seeds one from (seed, step), so every rank and a resumed run draw the same columns."""
    if num_candidates is None or num_candidates >= 2 * r_total:
        return None
    kg = min(num_candidates // 2, r_total)
    keep_g = torch.randperm(r_total, generator=generator)[:kg].to(device)
    keep_b = torch.randperm(r_total, generator=generator)[:num_candidates - kg].to(device)
    return keep_g, keep_b


def sampled_softmax_loss(query: Tensor, pos: Tensor, pos_ids: Tensor, row_seq: Tensor, neg: Tensor,
                         neg_ids: Tensor, log_q: Tensor, temperature: float = 0.01, hard_k: int | None = None,
                         global_share: float = 0.5, chunk_rows: int | None = None,
                         columns: tuple[Tensor, Tensor] | None = None,
                         gathered: tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """Mean over rows of the sampled softmax loss (scalar).

    query (R, D) normalised outputs at target rows; pos (R, D) their positives' vectors, pos_ids (R,);
    row_seq (R,) sequence index of each row; neg (R, D) one global negative per row, neg_ids (R,);
    log_q (itemnum+1,). Candidate columns: the R global negatives and the R in-batch positives, or only
    `columns` = (global rows kept, in-batch rows kept) of them (see candidate_columns).
    Logit = cos / temperature - log_q[item], positives included. Masked columns: any column whose item is
    a positive of the row's sequence (every in-batch column of the same sequence included), and item id 0.
    hard_k: keep the top hard_k negatives per row, round(hard_k * global_share) of them from the global
    columns and the rest from the in-batch ones (fewer if fewer are valid).
    gathered: (pos, pos_ids, row_seq, neg, neg_ids) of every rank's rows (row_seq numbered across ranks, the
    local rows' row_seq in the same numbering): the columns and the false-negative sets then come from the
    whole global batch, as in one process, while the rows stay local."""
    r_total = query.shape[0]
    if r_total == 0:
        return query.sum() * 0.0
    dtype = torch.promote_types(query.dtype, torch.float32)
    all_pos, all_pos_ids, all_row_seq, col_neg, col_neg_ids = gathered or (pos, pos_ids, row_seq, neg, neg_ids)
    col_pos, col_pos_ids = all_pos, all_pos_ids
    if columns is not None:
        keep_g, keep_b = columns
        col_neg, col_neg_ids, col_pos, col_pos_ids = col_neg[keep_g], col_neg_ids[keep_g], col_pos[keep_b], col_pos_ids[keep_b]
    num_global = col_neg_ids.numel()
    cand_ids = torch.cat([col_neg_ids, col_pos_ids]).long()  # (C,) global negatives, then in-batch positives
    items, inverse = torch.unique(torch.cat([cand_ids, all_pos_ids.long()]), return_inverse=True)  # compact ids
    cand_u, pos_u = inverse[:cand_ids.numel()], inverse[cand_ids.numel():]  # (C,), (R_all,)
    lq = log_q.to(device=query.device, dtype=dtype)
    with torch.autocast(device_type=query.device.type, enabled=False):
        cand = torch.cat([torch.cat([col_neg, col_pos], dim=0).to(dtype), -lq[cand_ids][:, None]], dim=1)  # (C, D+1)
        pos_aug = torch.cat([pos.to(dtype), -lq[pos_ids.long()][:, None]], dim=1)  # (R, D+1)
    row_seq, all_row_seq = row_seq.long(), all_row_seq.long()
    if chunk_rows is None:  # chunks of ~64M logits (256 MB in fp32): one chunk, no recompute, when all fit
        chunk_rows = max(256, CHUNK_LOGITS // max(cand_ids.numel(), 1))
    kg, ki = _split_k(hard_k, global_share) if hard_k is not None else (None, None)
    common = dict(inv_tau=1.0 / temperature, num_global=num_global, num_items=items.numel(),
                  has_pad=bool(items[0] == 0), kg=kg, ki=ki)
    # one chunk: plain autograd (nothing to save by recomputing); several: checkpoint each chunk
    use_ckpt = r_total > chunk_rows and torch.is_grad_enabled() and any(t.requires_grad for t in (query, pos, neg, cand))
    total = query.new_zeros((), dtype=dtype)
    for s in range(0, r_total, chunk_rows):
        e = min(s + chunk_rows, r_total)
        fn = partial(_chunk_loss, **common)
        args = (query[s:e], pos_aug[s:e], cand, row_seq[s:e], all_row_seq, pos_u, cand_u)
        # checkpoint: backward recomputes this chunk's logits instead of keeping every chunk's alive
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
            top = [sorted(g, key=lambda t: float(t.detach()), reverse=True)[:kk] for g, kk in zip(groups, (kg, ki))]
            kept = top[0] + top[1]
        losses.append(torch.logsumexp(torch.stack([pos_logit[r]] + kept), 0) - pos_logit[r])
    return torch.stack(losses).mean() if losses else query.sum() * 0.0
