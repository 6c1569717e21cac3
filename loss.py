"""Sampled softmax over mixed negatives (global + in-batch) with log-q correction and hard-negative mining, and
the full-catalogue softmax for catalogues small enough to score whole.

Shapes: R target rows (positions whose next token is an item, padding excluded), D hidden,
C = 2R candidate columns (the R global negatives, then the R in-batch positives).
Memory: the logits are built chunk_rows rows at a time (by default as many rows as make CHUNK_LOGITS) and,
when there is more than one chunk, each is checkpointed, so neither forward nor backward ever holds more
than one (chunk_rows, C) block of logits (and its mask).

Log-q correction (sampled_softmax_loss's log_q_mode). The loss stands in for the full softmax
-log p(pos) = log Z - s_pos with Z = exp(s_pos) + Σ_{j ≠ pos} exp(s_j) over the catalogue. The positive's term
is known exactly; the rest of Z is estimated by importance sampling from the columns, each drawn by a known
sampler: Σ_{j ≠ pos} exp(s_j) ≈ Σ_columns exp(s_c - log E_c), E_c = the expected number of times the column's
item appears among the columns. So each negative column subtracts log E_c and the positive subtracts nothing:
it is not sampled but present with probability 1 (Bengio & Senecal 2008; Blanc & Rendle 2018 write the
corrected logits as (o_y, o_s - ln(m q_s)); Khrylchenko et al. 2025, "Correcting the LogQ Correction", make the
same point against the usual in-batch correction of the positive). The two samplers here:
- in-batch columns are the positives of the batch's rows, i.e. draws from the distribution of target items,
  q_b(i) ∝ count(i) (alpha = 1: the proposal itself, not a smoothed version of it);
- global columns are uniform draws from the active pool of P items (dataset.ActivePool): q_g(i) = [i in pool]/P.
With n_b in-batch and n_g global columns (N = n_b + n_g, after `columns` and `negatives`):
- 'source': each column by its own sampler, E_c = N·q_b(i) (in-batch) or N·q_g(i) = N/P (global). Each
  source alone estimates Σ exp(s_j) over its sampler's support without bias; weighted by its share of the
  columns, the sum is unbiased for Z when the pool covers the catalogue. Items outside the pool are reached by
  the in-batch columns only, at weight n_b/N: with a pool smaller than the catalogue 'source' under-counts them.
- 'mixture': every column by the mixture, E_c = n_b·q_b(i) + n_g·q_g(i) (the balance heuristic of multiple
  importance sampling, whose variance is close to the best of any weighting; Veach & Guibas 1995): unbiased
  for Z over the union of both supports. An item can arrive from either sampler, and in one merged pool of
  columns this is the probability with which it is there.
- 'all': the historical correction: every logit, the positive's too, minus log_q[item] (log_q any normalised
  log-popularity, q ∝ count^0.75 by default), whatever sampler drew the column; shifts common to every logit
  cancel, so no count term appears. It penalises a rare global negative as if the popularity sampler had drawn it.
- 'none': no correction.
Item id 0 columns are masked in every mode, and masking (the row's own sequence) happens after correction.
Hard negatives (top-k) are picked by corrected logit in every mode.
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
LOG_Q_MODES = ("all", "source", "mixture", "none")  # see the module notes
NEGATIVES = ("mixed", "in-batch", "global")  # which sources' columns are negatives
FULL_SOFTMAX_FACTOR = 2.0  # full_softmax_fits: the full softmax may score this many times the sampled columns


def log_q_from_counts(counts: np.ndarray | Tensor, alpha: float = 0.75) -> Tensor:
    """(itemnum+1,) event counts -> (itemnum+1,) float32 log q with q ∝ max(count, 1)^alpha, sum(q) = 1.
    Zero counts (row 0, unseen items) count as 1 so no entry is -inf."""
    c = torch.as_tensor(counts).double().clamp(min=1.0)  # (itemnum+1,)
    logits = alpha * torch.log(c)
    return (logits - torch.logsumexp(logits, 0)).float()


def log_q_uniform(pool_items: np.ndarray | Tensor, num_items: int) -> Tensor:
    """(num_items,) float32 log-probability of each item under a uniform draw from pool_items (P distinct ids,
    e.g. ActivePool.items): -log P on the pool, -inf elsewhere. The global sampler's log_q_global."""
    pool = torch.as_tensor(np.asarray(pool_items), dtype=torch.long)
    if pool.numel() == 0 or int(pool.min()) < 0 or int(pool.max()) >= num_items:
        raise ValueError(f"pool of {pool.numel()} items: expected ids in 0..{num_items - 1}, at least one")
    out = torch.full((num_items,), float("-inf"))
    out[pool] = -math.log(torch.unique(pool).numel())
    return out


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


def _masked_columns(rseq: Tensor, row_seq: Tensor, pos_u: Tensor, cand_u: Tensor | None, num_items: int,
                    has_pad: bool) -> Tensor:
    """(r, C) bool: column c is masked for row i iff its item is a positive of row i's sequence (this covers
    every in-batch column of the same sequence, the row's own positive included) or it is item id 0.
    Built per chunk at sequence level: P (S_c, U) = which items each of the chunk's S_c sequences has as
    positives, so nothing larger than (r, C) exists. rseq (r,) chunk rows' sequences; row_seq (R,),
    pos_u (R,) compact item index of every row's positive; cand_u (C,) compact item index of each column
    (None: column c is compact item c, C = num_items)."""
    seqs, local = torch.unique(rseq, return_inverse=True)  # (S_c,), (r,)
    j = torch.searchsorted(seqs, row_seq).clamp_(max=seqs.numel() - 1)  # (R,)
    hit = seqs[j] == row_seq  # rows (of the whole batch) that belong to one of the chunk's sequences
    member = torch.zeros(seqs.numel(), num_items, dtype=torch.bool, device=rseq.device)  # (S_c, U)
    member[j[hit], pos_u[hit]] = True
    if has_pad:
        member[:, 0] = True  # compact index 0 is item id 0 when present (unique() sorts)
    return (member if cand_u is None else member[:, cand_u])[local]  # (S_c, C) -> (r, C)


def _chunk_loss(q: Tensor, pos: Tensor, rseq: Tensor, cand: Tensor, row_seq: Tensor, pos_u: Tensor, cand_u: Tensor,
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


def _check_options(log_q_mode: str, negatives: str, log_q_global: Tensor | float | None) -> None:
    if log_q_mode not in LOG_Q_MODES:
        raise ValueError(f"log_q_mode {log_q_mode!r}: expected one of {', '.join(LOG_Q_MODES)}")
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives {negatives!r}: expected one of {', '.join(NEGATIVES)}")
    if log_q_mode in ("source", "mixture") and negatives != "in-batch" and log_q_global is None:
        raise ValueError(f"log_q_mode {log_q_mode!r} with global negatives needs log_q_global (the pool's log q)")


def _kept_columns(neg: Tensor, neg_ids: Tensor, pos: Tensor, pos_ids: Tensor, columns: tuple[Tensor, Tensor] | None,
                  negatives: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(global vectors, ids, in-batch vectors, ids) of the columns: the `columns` subset, less a dropped source."""
    if columns is not None:
        keep_g, keep_b = columns
        neg, neg_ids, pos, pos_ids = neg[keep_g], neg_ids[keep_g], pos[keep_b], pos_ids[keep_b]
    if negatives == "in-batch":
        neg, neg_ids = neg[:0], neg_ids[:0]
    elif negatives == "global":
        pos, pos_ids = pos[:0], pos_ids[:0]
    return neg, neg_ids, pos, pos_ids


def _log_q_corrections(mode: str, log_q: Tensor, log_q_global: Tensor | float | None, g_ids: Tensor, b_ids: Tensor,
                       pos_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """What each logit loses: (C,) for the columns (global, then in-batch) and (R,) for the positives.
    'all': log_q[item] on every logit; 'source': log(N·q_source(item)); 'mixture': log(n_g·q_g + n_b·q_b);
    'none': 0 (module notes). g_ids (n_g,), b_ids (n_b,) the columns' item ids; pos_ids (R,)."""
    dev = pos_ids.device
    lq = log_q.to(device=dev, dtype=dtype)
    ids = torch.cat([g_ids, b_ids])  # (C,)
    if mode == "all":
        return lq[ids], lq[pos_ids]
    no_pos = torch.zeros(pos_ids.shape, device=dev, dtype=dtype)  # the positive is not sampled: no correction
    n_g, n_b = g_ids.numel(), b_ids.numel()
    if mode == "none" or n_g + n_b == 0:
        return torch.zeros(ids.shape, device=dev, dtype=dtype), no_pos
    lg = torch.as_tensor(log_q_global if n_g else 0.0, dtype=dtype).to(dev)  # (itemnum+1,) or a scalar
    glob = (lambda i: lg[i]) if lg.ndim else (lambda i: lg.expand(i.shape))  # noqa: E731
    if mode == "source":
        col = torch.cat([glob(g_ids), lq[b_ids]]) + math.log(n_g + n_b)
    else:  # mixture: the log of the item's expected count among the columns, summed over both samplers
        terms = ([glob(ids) + math.log(n_g)] if n_g else []) + ([lq[ids] + math.log(n_b)] if n_b else [])
        col = torch.logaddexp(*terms) if len(terms) == 2 else terms[0]
    # padding columns are masked anyway; a -inf correction there (0 is in no pool) would make the matmul +inf
    return col.masked_fill(ids == 0, 0.0), no_pos


def sampled_softmax_loss(query: Tensor, pos: Tensor, pos_ids: Tensor, row_seq: Tensor, neg: Tensor,
                         neg_ids: Tensor, log_q: Tensor, temperature: float = 0.01, hard_k: int | None = None,
                         global_share: float = 0.5, chunk_rows: int | None = None,
                         columns: tuple[Tensor, Tensor] | None = None,
                         gathered: tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None = None,
                         log_q_mode: str = "all", log_q_global: Tensor | float | None = None,
                         negatives: str = "mixed") -> Tensor:
    """Mean over rows of the sampled softmax loss (scalar).

    query (R, D) normalised outputs at target rows; pos (R, D) their positives' vectors, pos_ids (R,);
    row_seq (R,) sequence index of each row; neg (R, D) one global negative per row, neg_ids (R,);
    log_q (itemnum+1,) log-probability of each item under the in-batch sampler (log_q_from_counts).
    Candidate columns: the R global negatives and the R in-batch positives, or only `columns` = (global rows
    kept, in-batch rows kept) of them (see candidate_columns); negatives 'in-batch' / 'global' drop the other
    source's columns (hard_k then counts that source's negatives only, whatever global_share says).
    Logit = cos / temperature - correction (log_q_mode, see the module notes): 'all' log_q[item] on every logit,
    positives included; 'source' / 'mixture' the log of each negative's expected count under its own sampler /
    under both, the positive uncorrected; 'none'. log_q_global: the global sampler's log-probability of each
    item, (itemnum+1,) (log_q_uniform: -log P on the pool, -inf elsewhere) or one float for every item (-log P
    when the pool is the whole catalogue), on the loss's device; needed by 'source' and 'mixture' when there
    are global columns. For 'source' / 'mixture' log_q should be the in-batch sampler itself, alpha = 1.
    Masked columns: any column whose item is a positive of the row's sequence (every in-batch column of the
    same sequence included), and item id 0.
    hard_k: keep the top hard_k negatives per row, round(hard_k * global_share) of them from the global
    columns and the rest from the in-batch ones (fewer if fewer are valid).
    gathered: (pos, pos_ids, row_seq, neg, neg_ids) of every rank's rows (row_seq numbered across ranks, the
    local rows' row_seq in the same numbering): the columns and the false-negative sets then come from the
    whole global batch, as in one process, while the rows stay local."""
    _check_options(log_q_mode, negatives, log_q_global)
    r_total = query.shape[0]
    if r_total == 0:
        return query.sum() * 0.0
    dtype = torch.promote_types(query.dtype, torch.float32)
    all_pos, all_pos_ids, all_row_seq, col_neg, col_neg_ids = gathered or (pos, pos_ids, row_seq, neg, neg_ids)
    col_neg, col_neg_ids, col_pos, col_pos_ids = _kept_columns(col_neg, col_neg_ids, all_pos, all_pos_ids, columns,
                                                               negatives)
    global_share = {"in-batch": 0.0, "global": 1.0}.get(negatives, global_share)
    num_global = col_neg_ids.numel()
    cand_ids = torch.cat([col_neg_ids, col_pos_ids]).long()  # (C,) global negatives, then in-batch positives
    items, inverse = torch.unique(torch.cat([cand_ids, all_pos_ids.long()]), return_inverse=True)  # compact ids
    cand_u, pos_u = inverse[:cand_ids.numel()], inverse[cand_ids.numel():]  # (C,), (R_all,)
    col_corr, pos_corr = _log_q_corrections(log_q_mode, log_q, log_q_global, cand_ids[:num_global],
                                            cand_ids[num_global:], pos_ids.long(), dtype)  # (C,), (R,)
    with torch.autocast(device_type=query.device.type, enabled=False):
        cand = torch.cat([torch.cat([col_neg, col_pos], dim=0).to(dtype), -col_corr[:, None]], dim=1)  # (C, D+1)
        pos_aug = torch.cat([pos.to(dtype), -pos_corr[:, None]], dim=1)  # (R, D+1)
    row_seq, all_row_seq = row_seq.long(), all_row_seq.long()
    if chunk_rows is None:  # chunks of ~64M logits (256 MB in fp32): one chunk, no recompute, when all fit
        chunk_rows = max(256, CHUNK_LOGITS // max(cand_ids.numel(), 1))
    kg, ki = _split_k(hard_k, global_share) if hard_k is not None else (None, None)
    common = dict(inv_tau=1.0 / temperature, num_global=num_global, num_items=items.numel(),
                  has_pad=bool(items[0] == 0), kg=kg, ki=ki)
    fn = partial(_chunk_loss, **common)
    return _sum_chunks(fn, (query, pos_aug, row_seq), (cand, all_row_seq, pos_u, cand_u), chunk_rows) / r_total


def _sum_chunks(fn, by_row: tuple[Tensor, ...], shared: tuple[Tensor, ...], chunk_rows: int) -> Tensor:
    """Σ over chunks of rows of fn(*(t[s:e] for t in by_row), *shared); by_row[0] is the (R, D) query.
    One chunk: plain autograd (nothing to save by recomputing); several: each chunk checkpointed, so backward
    recomputes its logits instead of keeping every chunk's alive."""
    query = by_row[0]
    r_total = query.shape[0]
    use_ckpt = r_total > chunk_rows and torch.is_grad_enabled() and any(t.requires_grad for t in by_row + shared)
    total = query.new_zeros((), dtype=torch.promote_types(query.dtype, torch.float32))
    for s in range(0, r_total, chunk_rows):
        args = (*(t[s:s + chunk_rows] for t in by_row), *shared)
        total = total + (checkpoint(fn, *args, use_reentrant=False) if use_ckpt else fn(*args))
    return total


def sampled_softmax_loss_reference(query: Tensor, pos: Tensor, pos_ids: Tensor, row_seq: Tensor, neg: Tensor,
                                   neg_ids: Tensor, log_q: Tensor, temperature: float = 0.01,
                                   hard_k: int | None = None, global_share: float = 0.5, chunk_rows: int = 2048,
                                   columns: tuple[Tensor, Tensor] | None = None,
                                   gathered: tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None = None,
                                   log_q_mode: str = "all", log_q_global: Tensor | float | None = None,
                                   negatives: str = "mixed") -> Tensor:
    """Brute-force oracle for sampled_softmax_loss: a python list of the columns, each one's correction written
    out from its definition (expected counts as sums of probabilities, math.log), python loops for masks and
    top-k. chunk_rows is accepted and ignored."""
    _check_options(log_q_mode, negatives, log_q_global)
    dtype = torch.promote_types(query.dtype, torch.float32)
    all_pos, all_pos_ids, all_row_seq, all_neg, all_neg_ids = gathered or (pos, pos_ids, row_seq, neg, neg_ids)
    keep_g, keep_b = columns if columns is not None else (range(len(all_neg_ids)), range(len(all_pos_ids)))
    keep_g = [] if negatives == "in-batch" else [int(c) for c in keep_g]
    keep_b = [] if negatives == "global" else [int(c) for c in keep_b]
    share = {"in-batch": 0.0, "global": 1.0}.get(negatives, global_share)
    # (vector, item id, from the in-batch sampler, sequence of the in-batch column)
    cols = ([(all_neg[c].to(dtype), int(all_neg_ids[c]), False, None) for c in keep_g]
            + [(all_pos[c].to(dtype), int(all_pos_ids[c]), True, int(all_row_seq[c])) for c in keep_b])
    n_g, n_b = len(keep_g), len(keep_b)

    def p_batch(i: int) -> float:
        return math.exp(float(log_q[i]))

    def p_global(i: int) -> float:
        return math.exp(float(log_q_global if not torch.is_tensor(log_q_global) or log_q_global.ndim == 0
                              else log_q_global[i]))

    def correction(i: int, in_batch: bool) -> float:
        if log_q_mode == "all":
            return float(log_q[i])
        if log_q_mode == "none" or i == 0:  # padding columns are masked whatever their logit
            return 0.0
        if log_q_mode == "source":  # expected count of i among N draws from the column's own sampler
            return math.log((n_g + n_b) * (p_batch(i) if in_batch else p_global(i)))
        return math.log(n_b * p_batch(i) + n_g * p_global(i))  # mixture: expected count over both samplers

    seq_items: dict[int, set[int]] = defaultdict(set)
    for s, i in zip(all_row_seq.tolist(), all_pos_ids.tolist()):
        seq_items[int(s)].add(int(i))
    losses = []
    for r in range(query.shape[0]):
        q, seq = query[r].to(dtype), int(row_seq[r])
        pos_corr = float(log_q[int(pos_ids[r])]) if log_q_mode == "all" else 0.0
        pos_logit = q @ pos[r].to(dtype) / temperature - pos_corr
        groups: tuple[list[Tensor], list[Tensor]] = ([], [])  # (global, in-batch)
        for vec, cid, in_batch, cseq in cols:
            if cid == 0 or cid in seq_items[seq] or (in_batch and cseq == seq):
                continue
            groups[int(in_batch)].append(q @ vec / temperature - correction(cid, in_batch))
        kept = list(groups[0]) + list(groups[1])
        if hard_k is not None:
            kg, ki = _split_k(hard_k, share)
            top = [sorted(g, key=lambda t: float(t.detach()), reverse=True)[:kk] for g, kk in zip(groups, (kg, ki))]
            kept = top[0] + top[1]
        losses.append(torch.logsumexp(torch.stack([pos_logit] + kept), 0) - pos_logit)
    return torch.stack(losses).mean() if losses else query.sum() * 0.0


# ---- full-catalogue softmax --------------------------------------------------------------------------------------

def full_softmax_fits(num_items: int, rows: int, num_columns: int | None = None,
                      factor: float = FULL_SOFTMAX_FACTOR) -> bool:
    """Whether the full-catalogue softmax is cheap enough to replace the sampled one: num_items <= factor · C,
    C = the sampled loss's columns: 2·rows, or num_columns (--max-candidates) when fewer; rows = the target rows
    of the global batch (all ranks). Decide once per run (e.g. from batch size x positions), not per batch, so
    that a run and its resumption train the same loss.
    Why: per step the sampled loss scores R × C logits and the full softmax R × num_items; the item tower runs
    2R rows (positives and global negatives) against num_items + 1. Matmul time and activation memory (any D, any
    device) therefore scale by num_items / C for the logits and at most that for the tower, so the rule bounds
    the full softmax's loss cost to about `factor` times the sampled loss's; its logits are chunked besides
    (CHUNK_LOGITS a chunk). Measured on the CPU (bench/loss_results.md), the full softmax costs no more per logit
    than the sampled loss (0.87-0.97x the sampled time at equal logit counts, D = 512, before it was fused; 0.68x
    since), so the cost ratio is at most the logit ratio. factor 2: every item a negative, none twice, is worth
    up to twice the logits of a sample (on MovieLens-1M all 2R columns against 2,048 gave +10% validation
    HR@10, BENCHMARKS.md); it picks the full softmax for MovieLens-1M (3,706 items) even at 2,048 sampled
    columns, and keeps the sampled loss for catalogues of millions."""
    if num_items < 1 or rows < 0:
        raise ValueError(f"num_items ({num_items}) must be >= 1 and rows ({rows}) >= 0")
    c = min(num_columns, 2 * rows) if num_columns else 2 * rows
    return num_items <= factor * c


class _FullSoftmaxChunk(torch.autograd.Function):
    """Σ over rows of logsumexp(logits) - logits[pos], logits = (q·inv_tau) @ items.T with masked columns -inf.
    Fused by hand because autograd's log-softmax + NLL (F.cross_entropy) was the loss's largest cost on a CPU: it
    keeps the log-probabilities, builds a dense one-hot gradient and exponentiates again in backward. Here the
    forward turns the logits into the softmax in place and keeps only that; the backward subtracts the one-hot
    and runs the two matmuls: one (r, M+1) fp32 block kept (no mask, no dense one-hot gradient beside it) and a
    few passes fewer over it (bench/loss.py --section full times the two side by side)."""

    @staticmethod
    def forward(ctx, q: Tensor, items: Tensor, pos: Tensor, masked: Tensor | None, inv_tau: float) -> Tensor:
        qs = (q * inv_tau).to(items.dtype)  # (r, D); items (M+1, D), maybe bf16: the matmul runs in it
        logits = (qs @ items.T).to(torch.promote_types(items.dtype, torch.float32))  # (r, M+1)
        rows = torch.arange(q.shape[0], device=q.device)
        pos_logit = logits[rows, pos]  # (r,) the target is never masked
        if masked is None:
            logits[:, 0] = float("-inf")
        else:
            logits.masked_fill_(masked, float("-inf"))
        top = logits.amax(dim=1, keepdim=True)  # (r, 1) finite: the positive is there
        prob = logits.sub_(top).exp_()  # (r, M+1) in place: the logits are not needed again
        total = prob.sum(dim=1, keepdim=True)  # (r, 1)
        prob.div_(total)
        ctx.save_for_backward(qs, items, pos, prob)
        ctx.inv_tau, ctx.q_dtype, ctx.done = inv_tau, q.dtype, False
        return (top.squeeze(1) + total.squeeze(1).log() - pos_logit).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        if ctx.done:  # the saved softmax became the gradient in place: a second backward would be wrong
            raise RuntimeError("full_softmax_loss: backward through the same graph twice is not supported")
        ctx.done = True
        qs, items, pos, prob = ctx.saved_tensors
        prob[torch.arange(prob.shape[0], device=prob.device), pos] -= 1.0  # d loss / d logits = softmax - onehot
        g_logits = prob.mul_(grad).to(items.dtype)  # (r, M+1)
        g_q = (g_logits @ items).mul_(ctx.inv_tau).to(ctx.q_dtype)  # (r, D)
        g_items = g_logits.T @ qs  # (M+1, D)
        return g_q, g_items, None, None, None


def _full_chunk_loss(q: Tensor, pos: Tensor, rseq: Tensor, items: Tensor, row_seq: Tensor, pos_ids: Tensor, *,
                     inv_tau: float, mask_seq: bool) -> Tensor:
    """Sum over the chunk's rows of logsumexp([pos, every unmasked item]) - pos. q (r, D); pos (r,) the chunk's
    positive ids; items (M+1, D); row_seq (R,), pos_ids (R,) of every row (for the sequences' positives)."""
    with torch.autocast(device_type=q.device.type, enabled=False):  # the softmax in (at least) fp32
        masked = None
        if mask_seq:  # every other positive of the row's sequence, and item 0
            masked = _masked_columns(rseq, row_seq, pos_ids, None, items.shape[0], has_pad=True)  # (r, M+1)
            masked[torch.arange(q.shape[0], device=q.device), pos] = False  # the row's own positive: the target
        return _FullSoftmaxChunk.apply(q, items, pos, masked, inv_tau)


def full_softmax_loss(query: Tensor, pos_ids: Tensor, item_vectors: Tensor, row_seq: Tensor | None = None,
                      temperature: float = 0.01, mask_seq_positives: bool = True,
                      chunk_rows: int | None = None) -> Tensor:
    """Mean over rows of the cross-entropy over the whole catalogue (scalar): every item is a negative and
    nothing is sampled, so there is no log-q.

    query (R, D) normalised outputs at target rows; pos_ids (R,) their positives, ids in 1..M; item_vectors
    (M+1, D) the vectors of every item, row i = item id i (row 0, padding, is never a logit: its vector may be
    anything and gets no gradient); row_seq (R,) sequence index of each row, needed with mask_seq_positives.
    Logit = cos / temperature. mask_seq_positives: the other positives of the row's sequence are not negatives
    (false negatives, as sampled_softmax_loss masks them); False gives SASRec-style cross-entropy over items
    1..M. Memory: chunk_rows rows at a time (default: CHUNK_LOGITS logits per chunk), each checkpointed when
    there is more than one, so no more than one (chunk_rows, M+1) block of logits and mask exists at once,
    forward or backward; gradients reach query and item_vectors."""
    r_total = query.shape[0]
    if r_total == 0:
        return query.sum() * 0.0 + item_vectors.sum() * 0.0
    if mask_seq_positives and row_seq is None:
        raise ValueError("full_softmax_loss: mask_seq_positives needs row_seq (the sequence of each row)")
    dev = query.device.type
    # under autocast the logits matmul, the loss's largest cost, runs in its dtype (bf16: the fast path on GPUs and
    # on CPUs with AVX512-BF16); the log-softmax, its mask and the loss stay fp32 either way
    dtype = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
             else torch.promote_types(query.dtype, torch.float32))
    with torch.autocast(device_type=dev, enabled=False):
        items = item_vectors.to(dtype)  # (M+1, D)
    pos_ids = pos_ids.long()
    row_seq = (row_seq if row_seq is not None else torch.zeros_like(pos_ids)).long()
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_LOGITS // items.shape[0])
    fn = partial(_full_chunk_loss, inv_tau=1.0 / temperature, mask_seq=mask_seq_positives)
    return _sum_chunks(fn, (query, pos_ids, row_seq), (items, row_seq, pos_ids), chunk_rows) / r_total


def full_softmax_loss_reference(query: Tensor, pos_ids: Tensor, item_vectors: Tensor, row_seq: Tensor | None = None,
                                temperature: float = 0.01, mask_seq_positives: bool = True,
                                chunk_rows: int | None = None) -> Tensor:
    """Brute-force oracle for full_softmax_loss: dense (R, M+1) logits, python loops for each row's negatives.
    chunk_rows is accepted and ignored."""
    dtype = torch.promote_types(query.dtype, torch.float32)
    logits = query.to(dtype) @ item_vectors.to(dtype).T / temperature  # (R, M+1)
    seqs = row_seq.tolist() if row_seq is not None else [0] * len(pos_ids)
    seq_items: dict[int, set[int]] = defaultdict(set)
    for s, i in zip(seqs, pos_ids.tolist()):
        seq_items[s].add(i)
    losses = []
    for r, p in enumerate(pos_ids.tolist()):
        skip = (seq_items[seqs[r]] if mask_seq_positives else {p}) | {0}
        negs = [logits[r, j] for j in range(logits.shape[1]) if j not in skip]
        losses.append(torch.logsumexp(torch.stack([logits[r, p]] + negs), 0) - logits[r, p])
    return torch.stack(losses).mean() if losses else query.sum() * 0.0
