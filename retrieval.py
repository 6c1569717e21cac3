"""Exact top-K retrieval over a full candidate set, in bounded memory, and the merge of two top-K lists.

`topk_chunked` never holds more than (users × item chunk) scores, whatever the catalogue size, and
equals a full `torch.topk` over the whole score matrix (`topk_reference`, kept for tests) up to the
order of tied scores. bench/retrieval.py measures it against faiss and the naive full matrix.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def _mask_excluded(scores: Tensor, exclude: Tensor | None, start: int) -> None:
    """Set scores[i, p - start] = -inf for every candidate position p in exclude[i] within the chunk."""
    if exclude is None:
        return
    local = exclude - start  # (U, H)
    ok = (exclude >= 0) & (local >= 0) & (local < scores.shape[1])
    rows = torch.arange(scores.shape[0], device=scores.device).unsqueeze(1).expand_as(local)
    scores[rows[ok], local[ok]] = float("-inf")


# CPU tiling: a (user block x item block) score tile of 512 x 1024 floats (2 MiB) stays in cache between
# the matmul that writes it and the reductions that read it (the fastest of the tiles tried with
# bench/retrieval.py). Module constants so tests can shrink them; they change speed only, never results.
CPU_USER_BLOCK = 512
CPU_ITEM_BLOCK = 1024


@torch.no_grad()
def topk_chunked(users: Tensor, items: Tensor, k: int, exclude: Tensor | None = None,
                 item_chunk: int = 65536) -> tuple[Tensor, Tensor]:
    """users (U, D), items (M, D), exclude (U, H) candidate positions to skip (-1 = none).
    Returns (scores (U, k), positions (U, k)) best first; a position is -1 when fewer than k remain.
    Scores are computed in float32; at most (U x item_chunk) of them exist at once."""
    if users.device.type == "cpu":
        best_s, best_i = _topk_cpu(users, items, k, exclude, item_chunk)
    else:
        best_s, best_i = _topk_device(users, items, k, exclude, item_chunk)
    best_i[torch.isinf(best_s)] = -1
    return best_s, best_i


def _topk_device(users: Tensor, items: Tensor, k: int, exclude: Tensor | None,
                 item_chunk: int) -> tuple[Tensor, Tensor]:
    """GPU: one large (U, chunk) score block at a time; a few big kernels beat any clever skipping,
    which would need a host sync per chunk."""
    U, M = users.shape[0], items.shape[0]
    best_s = torch.full((U, k), float("-inf"), device=users.device)
    best_i = torch.full((U, k), -1, dtype=torch.long, device=users.device)
    for start in range(0, M, item_chunk):
        chunk = items[start:start + item_chunk]
        s = (users @ chunk.T).float()  # (U, c)
        _mask_excluded(s, exclude, start)
        cs, ci = s.topk(min(k, s.shape[1]), dim=1)
        merged_s = torch.cat([best_s, cs], 1)
        merged_i = torch.cat([best_i, ci + start], 1)
        best_s, order = merged_s.topk(k, dim=1)
        best_i = merged_i.gather(1, order)
    return best_s, best_i


def _topk_cpu(users: Tensor, items: Tensor, k: int, exclude: Tensor | None,
              item_chunk: int) -> tuple[Tensor, Tensor]:
    """CPU: user blocks run in parallel threads, each single-threaded over cache-sized item blocks.
    One coarse task per thread instead of many small multi-threaded ops: on a busy machine, an op
    split over threads waits for its slowest thread on every call (we measured 10x slowdowns)."""
    U = users.shape[0]
    workers = max(1, torch.get_num_threads())
    # equal blocks, a multiple of the thread count, none above CPU_USER_BLOCK: no thread idles at the end
    n_blocks = workers * max(1, -(-U // (workers * CPU_USER_BLOCK)))
    ub = max(1, -(-U // n_blocks))
    blocks = [(a, min(a + ub, U)) for a in range(0, U, ub)] or [(0, 0)]

    def run(ab: tuple[int, int]) -> tuple[Tensor, Tensor]:
        a, b = ab
        return _topk_cpu_block(users[a:b].float(), items, k, None if exclude is None else exclude[a:b], item_chunk)

    if len(blocks) == 1 or workers == 1:
        res = [run(ab) for ab in blocks]
    else:
        from concurrent.futures import ThreadPoolExecutor
        torch.set_num_threads(1)  # torch ops release the GIL: the threads run truly in parallel
        try:
            with ThreadPoolExecutor(min(workers, len(blocks))) as pool:
                res = list(pool.map(run, blocks))
        finally:
            torch.set_num_threads(workers)
    return torch.cat([r[0] for r in res]), torch.cat([r[1] for r in res])


def _topk_cpu_block(users: Tensor, items: Tensor, k: int, exclude: Tensor | None,
                    item_chunk: int) -> tuple[Tensor, Tensor]:
    """users (u, D) float32 -> (scores (u, k), positions (u, k)). After the first item blocks most rows
    hold a k-th best score that no score of the next block beats; a row max (one cheap pass) finds
    them, and only the other rows pay for a topk and a merge."""
    u, M = users.shape[0], items.shape[0]
    best_s = torch.full((u, k), float("-inf"))
    best_i = torch.full((u, k), -1, dtype=torch.long)
    thr = best_s[:, k - 1]  # a view: each row's current k-th best score
    ic = max(1, min(item_chunk, CPU_ITEM_BLOCK))
    buf = torch.empty(u, ic)
    starts = list(range(0, M, ic))
    ex_rows = ex_pos = bounds = None
    if exclude is not None:
        # (row, position) pairs sorted by position: each item block masks one contiguous slice of them
        ok = exclude >= 0
        ex_rows = torch.arange(u).unsqueeze(1).expand_as(exclude)[ok]
        ex_pos, order = exclude[ok].sort()
        ex_rows = ex_rows[order]
        bounds = torch.searchsorted(ex_pos, torch.tensor(starts + [M], dtype=ex_pos.dtype)).tolist()
    for j, start in enumerate(starts):
        chunk = items[start:start + ic]
        s = buf[:, :chunk.shape[0]]  # (u, c)
        torch.mm(users, chunk.T.float(), out=s)
        if bounds is not None and bounds[j + 1] > bounds[j]:
            lo, hi = bounds[j], bounds[j + 1]
            s[ex_rows[lo:hi], ex_pos[lo:hi] - start] = float("-inf")
        rows = (s.amax(1) > thr).nonzero().squeeze(1)  # (r,) rows this block can improve
        if rows.numel() == 0:
            continue
        sub = s if rows.numel() == u else s.index_select(0, rows)
        cs, ci = sub.topk(min(k, sub.shape[1]), dim=1)
        merged_s = torch.cat([best_s.index_select(0, rows), cs], 1)
        merged_i = torch.cat([best_i.index_select(0, rows), ci + start], 1)
        new_s, order = merged_s.topk(k, dim=1)
        best_s.index_copy_(0, rows, new_s)
        best_i.index_copy_(0, rows, merged_i.gather(1, order))
    return best_s, best_i


@torch.no_grad()
def topk_reference(users: Tensor, items: Tensor, k: int, exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The naive oracle: the whole (U, M) score matrix, then one topk."""
    s = (users @ items.T).float()
    _mask_excluded(s, exclude, 0)
    return s.topk(min(k, s.shape[1]), dim=1)


def merge_topk(best_s: Tensor, best_i: Tensor, s: Tensor, i: Tensor) -> tuple[Tensor, Tensor]:
    """Two (U, k) top lists (scores best first, ids) -> the (U, k) best of both: a running top-k over streamed
    item chunks."""
    k = best_s.shape[1]
    merged_s, order = torch.cat([best_s, s], 1).topk(k, dim=1)
    return merged_s, torch.cat([best_i, i], 1).gather(1, order)
