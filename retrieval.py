"""Exact top-K retrieval over a full candidate set, in bounded memory, and the merge of two top-K lists.

`topk_chunked` never holds more than (users × item chunk) scores, whatever the catalogue size, and
equals a full top-K over the whole score matrix (`topk_reference`, the oracle kept for tests) up to the
order of tied scores. Most scores are only screened in low precision (int8 on the CPU, bf16 on a GPU),
with a proven bound on their error: an item is dropped only when even its score plus the bound cannot
reach the k-th best exact score; the survivors are scored exactly (float64) and ranked on those scores.
bench/retrieval.py measures it against faiss and the naive full matrix.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

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


# CPU tiling: a (user block x item block) tile of int32 scores (4 MiB) that the int8 matmul writes and a
# max over each sub-block of items reads back; smaller tiles pay more Python per score, larger ones fall
# out of cache, larger sub-blocks make each one that passes the screen dearer to look into (the fastest
# tried with bench/retrieval.py). The items that pass wait up to CPU_MERGE_EVERY item blocks to be scored
# exactly and merged together. Module constants so tests can shrink them; they change speed only.
CPU_USER_BLOCK = 512
CPU_ITEM_BLOCK = 2048
CPU_SUB_BLOCK = 64
CPU_MERGE_EVERY = 8
# GPU: per item chunk, the k + DEVICE_EXTRA best bf16 scores of each user are re-scored exactly; the
# extra ones are the margin that lets the bf16 bound prove that no other item of the chunk is needed.
DEVICE_EXTRA = 16
# Slack on every bound for the float64 arithmetic that computes the bounds and the exact scores
# (relative errors ~D·2^-53, far below 2^-30 for any D the int32 sums allow).
_F64_SLACK = 2.0 ** -30
_I32_MIN, _I32_MAX = -2 ** 31, 2 ** 31 - 1
_INT8_MAX_DIM = 65536  # 127² · D stays far inside int32, so _I32_MIN can mark excluded items
# bf16 screen: rounding u and v to bf16 (relative 2^-8 each) moves u_i·v_i by at most (2^-7 + 2^-16)·|u_i·v_i|,
# and float32 sums of D products move by at most γ_D = D·2^-24/(1 - D·2^-24) of Σ|u'_i·v'_i| (any order);
# by Cauchy-Schwarz Σ|u_i·v_i| <= |u|·|v|. Inputs are capped at 2^40 so nothing overflows, and products
# flushed to zero (subnormals) move a score by less than _BF16_ABS.
_BF16_MAX_ABS = 2.0 ** 40
_BF16_ABS = 2.0 ** -60


@torch.no_grad()
def topk_chunked(users: Tensor, items: Tensor, k: int, exclude: Tensor | None = None,
                 item_chunk: int = 65536) -> tuple[Tensor, Tensor]:
    """users (U, D), items (M, D), exclude (U, H) candidate positions to skip (-1 = none).
    Returns (scores (U, k) float32, positions (U, k)) best first; a position is -1 when fewer than k remain.
    The ranking is exact (float64 scores of every item that could be in the top k, returned as float32);
    at most (U x item_chunk) scores exist at once. A caller's autocast does not reach it (validation runs
    under bf16 autocast on CUDA): the bounds assume the matmuls run as written."""
    with torch.autocast(users.device.type, enabled=False):
        if users.device.type == "cpu":
            best_s, best_i = _topk_cpu(users, items, k, exclude, item_chunk)
        else:
            best_s, best_i = _topk_device(users, items, k, exclude, item_chunk)
    best_i[torch.isinf(best_s)] = -1
    return best_s.float(), best_i


def _merge(best_s: Tensor, best_i: Tensor, rows: Tensor, cand_s: Tensor, cand_i: Tensor) -> None:
    """Rows `rows` of (best_s, best_i) (n, k) keep the best k of themselves and (cand_s, cand_i) (r, c)."""
    merged_s = torch.cat([best_s.index_select(0, rows), cand_s], 1)
    merged_i = torch.cat([best_i.index_select(0, rows), cand_i], 1)
    new_s, order = merged_s.topk(best_s.shape[1], dim=1)
    best_s.index_copy_(0, rows, new_s)
    best_i.index_copy_(0, rows, merged_i.gather(1, order))


def _topk_exact(users: Tensor, items: Tensor, k: int, exclude: Tensor | None,
                item_chunk: int) -> tuple[Tensor, Tensor]:
    """Every score in float64, chunk by chunk (any device; float64 matmuls never use TF32): the path for
    inputs no low-precision bound covers, and for the rows a GPU bound could not settle."""
    U, M = users.shape[0], items.shape[0]
    u = users.double()  # (U, D)
    best_s = torch.full((U, k), float("-inf"), dtype=torch.float64, device=users.device)
    best_i = torch.full((U, k), -1, dtype=torch.long, device=users.device)
    every = torch.arange(U, device=users.device)
    for start in range(0, M, item_chunk):
        s = u @ items[start:start + item_chunk].double().T  # (U, c)
        _mask_excluded(s, exclude, start)
        cs, ci = s.topk(min(k, s.shape[1]), dim=1)
        _merge(best_s, best_i, every, cs, ci + start)
    return best_s, best_i


# --------------------------------------------------------------------------- GPU: bf16 screen

def _mm_bf16(a: Tensor, b: Tensor) -> Tensor:
    """a (U, D), b (c, D) bf16 -> (U, c) float32 sums of the exact products (bf16 x bf16 fits float32).
    CUDA: a bf16 GEMM with float32 output and accumulation. Elsewhere (and as a fallback) the same sums
    from float32 copies; bf16 values are exact in TF32 too, so allow_tf32 cannot change them."""
    if a.device.type == "cuda":
        try:
            return torch.mm(a, b.T, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    return a.float() @ b.float().T


def _topk_device(users: Tensor, items: Tensor, k: int, exclude: Tensor | None,
                 item_chunk: int) -> tuple[Tensor, Tensor]:
    """GPU: one large (U, chunk) bf16 score block at a time, no host sync until the end. The k + DEVICE_EXTRA
    best bf16 scores of each row are re-scored exactly and merged; every other item of the chunk scores at
    most the last of them plus the bf16 bound (`missed`). A row whose final k-th score does not beat its
    `missed` is recomputed exactly: rare on real data, the rule on adversarial ties, always exact."""
    U, M, D = users.shape[0], items.shape[0], users.shape[1]
    if not _bf16_boundable(users, items):
        return _topk_exact(users, items, k, exclude, item_chunk)
    eps = _bf16_eps(D)
    u64 = users.double()  # (U, D)
    ub = users.bfloat16()
    un = u64.norm(dim=1)  # (U,)
    best_s = torch.full((U, k), float("-inf"), dtype=torch.float64, device=users.device)
    best_i = torch.full((U, k), -1, dtype=torch.long, device=users.device)
    missed = torch.full((U,), float("-inf"), dtype=torch.float64, device=users.device)
    every = torch.arange(U, device=users.device)
    for start in range(0, M, item_chunk):
        chunk = items[start:start + item_chunk]  # (c, D)
        lp = _mm_bf16(ub, chunk.bfloat16())  # (U, c)
        _mask_excluded(lp, exclude, start)
        cs, ci = lp.topk(min(k + DEVICE_EXTRA, lp.shape[1]), dim=1)  # (U, kk)
        exact = torch.bmm(chunk[ci].double(), u64.unsqueeze(2)).squeeze(2)  # (U, kk)
        exact[torch.isinf(cs)] = float("-inf")  # excluded items stay out (bf16 scores are finite)
        _merge(best_s, best_i, every, exact, ci + start)
        if cs.shape[1] < lp.shape[1]:  # items of the chunk were left unscored
            bound = eps * un * chunk.double().norm(dim=1).max() + _BF16_ABS  # (U,)
            missed = torch.maximum(missed, cs[:, -1].double() + bound)
    unsure = (missed > float("-inf")) & (missed >= best_s[:, -1])
    redo = unsure.nonzero().squeeze(1)  # the one host sync
    if redo.numel():
        s, i = _topk_exact(users[redo], items, k, None if exclude is None else exclude[redo], item_chunk)
        best_s[redo], best_i[redo] = s, i
    return best_s, best_i


def _bf16_eps(D: int) -> float:
    """|_mm_bf16(u, v) - u·v| <= eps·|u|·|v| (+ _BF16_ABS), see the constants above."""
    gamma = D * 2.0 ** -24 / (1 - D * 2.0 ** -24)
    return 2.0 ** -7 + 2.0 ** -16 + gamma * (1 + 2.0 ** -8) ** 2 + _F64_SLACK


def _bf16_boundable(users: Tensor, items: Tensor) -> bool:
    """Finite inputs below _BF16_MAX_ABS: bf16 copies and float32 sums of them cannot overflow."""
    top = max(users.abs().amax().item() if users.numel() else 0.0, items.abs().amax().item() if items.numel() else 0.0)
    return math.isfinite(top) and top <= _BF16_MAX_ABS


# --------------------------------------------------------------------------- CPU: int8 screen

class _Int8Items(NamedTuple):
    """The catalogue as int8: items ≈ scale · q with one scale for all items, so a user's int32 scores
    I = uq · q rank like real ones and a row max screens a whole tile. |v - scale·q| <= resid, |v| <= norm
    for every item v."""
    items: Tensor  # (M, D) the originals, any float dtype
    q: Tensor  # (M, D) int8
    scale: float
    resid: float
    norm: float


def _quantize_items(items: Tensor, pmap=map, parts: int = 1, rows: int = 4096) -> _Int8Items | None:
    """None when no int8 bound applies (non-finite values, or D too large for exact int32 sums). `parts`
    row ranges go through `pmap` (a thread pool's map: each thread one range, single-threaded ops)."""
    M, D = items.shape
    if D > _INT8_MAX_DIM:
        return None
    step = -(-max(M, 1) // (parts * rows)) * rows
    ranges = [(a, min(a + step, M)) for a in range(0, M, step)]
    top = max([0.0] + [max(-lo.item(), hi.item()) for lo, hi in pmap(lambda r: torch.aminmax(items[r[0]:r[1]]), ranges)])
    if not math.isfinite(top):  # nan or inf if any value is
        return None
    scale = float(torch.tensor(top / 127 if top > 0 else 1.0, dtype=torch.float32))  # exact in float32
    q = torch.empty(M, D, dtype=torch.int8)
    stats = list(pmap(lambda r: _quantize_rows(items, q, scale, r[0], r[1], rows), ranges))
    widen = 1 + (D + 4) * 2.0 ** -23
    resid, norm = max([0.0] + [s[0] for s in stats]) * widen, max([0.0] + [s[1] for s in stats]) * widen
    # + 2^-23·norm: float64 items differ from their float32 copies by up to 2^-24 of their norm
    return _Int8Items(items, q, scale, resid + math.sqrt(D) * 2.0 ** -17 * scale + 2.0 ** -23 * norm, norm)


def _quantize_rows(items: Tensor, q: Tensor, scale: float, a: int, b: int, rows: int) -> tuple[float, float]:
    """q[a:b] = round(items[a:b] / scale); returns the largest residue norm and item norm, computed in float32
    in cache-sized chunks. _quantize_items widens them by their float32 rounding error (a proof, not a
    margin): |fl(scale·q) - scale·q| + |fl(v - .) - (v - .)| <= 2^-17·scale per value, and a norm of D
    float32 squares is within D·2^-23 of the exact one."""
    resid = norm = 0.0
    for c in range(a, b, rows):
        v = items[c:min(c + rows, b)].float()  # (r, D)
        t = (v * (1 / scale)).round_().clamp_(-127, 127)
        q[c:c + len(v)] = t
        t.mul_(scale).sub_(v)  # -residue
        resid = max(resid, t.norm(dim=1).max().item())
        norm = max(norm, v.norm(dim=1).max().item())
    return resid, norm


@functools.lru_cache(maxsize=None)
def _int_mm_exact() -> bool:
    """Whether torch._int_mm sums int8 products exactly in int32 here. Kernels without VNNI may add pairs
    of products in saturating int16 (127·127·2 > 2^15); extreme values and long sums would show it."""
    if not hasattr(torch, "_int_mm"):
        return False
    g = torch.Generator().manual_seed(0)
    a = torch.cat([torch.full((8, 4096), 127), torch.full((8, 4096), -127), torch.randint(-127, 128, (16, 4096), generator=g)])
    b = torch.cat([torch.full((8, 4096), 127), torch.full((8, 4096), -127), torch.randint(-127, 128, (16, 4096), generator=g)])
    a, b = a.to(torch.int8), b.to(torch.int8)
    try:
        for d in (64, 4096, 37):
            got = torch._int_mm(a[:, :d].contiguous(), b[:, :d].contiguous().T)
            if not torch.equal(got.long(), a[:, :d].long() @ b[:, :d].long().T):
                return False
    except RuntimeError:
        return False
    return True


def _int8_mm(a: Tensor, b: Tensor, out: Tensor) -> None:
    """out (u, c) int32 = a (u, D) int8 @ b (c, D) int8 transposed, exactly (else in float64: exact too)."""
    if _int_mm_exact():
        torch._int_mm(a, b.T, out=out)
    else:
        out.copy_(a.double() @ b.double().T)


def _quantize_users(u64: Tensor, items: _Int8Items) -> tuple[Tensor, Tensor, Tensor]:
    """u64 (u, D) float64 -> (uq (u, D) int8, scale (u,), bound (u,)): with one scale per user,
    u·v = scale·(uq·q) + su·uq·rv + ru·v (ru, rv the rounding residues), so by Cauchy-Schwarz
    |u·v - scale·I| <= |su·uq|·resid + |ru|·norm; the bound adds slack for float64 arithmetic."""
    top = u64.abs().amax(1)  # (u,)
    su = torch.where(top > 0, top / 127, torch.ones_like(top))  # any scale works: the bound uses ru
    qu = torch.round(u64 / su.unsqueeze(1)).clamp_(-127, 127)  # (u, D) integral float64
    approx = su.unsqueeze(1) * qu
    bound = (approx.norm(dim=1) * items.resid + (u64 - approx).norm(dim=1) * items.norm) * (1 + _F64_SLACK)
    bound += _F64_SLACK * u64.norm(dim=1) * items.norm
    return qu.to(torch.int8), su * items.scale, bound


def _int_threshold(kth: Tensor, inv: Tensor, off: Tensor) -> Tensor:
    """(r,) float64 -> (r,) int32: the least integer I with I·scale + bound > kth (inv = 1/scale,
    off = bound/scale), the int32 score an item needs to possibly beat the k-th best (ties with it may
    go). Rows without k scores yet get _I32_MAX: they take the exact path, never the screen."""
    t = torch.floor(kth * inv - off).add_(1).clamp_(_I32_MIN + 1, _I32_MAX)
    return t.masked_fill_(torch.isinf(kth), _I32_MAX).to(torch.int32)


def _topk_cpu(users: Tensor, items: Tensor, k: int, exclude: Tensor | None,
              item_chunk: int) -> tuple[Tensor, Tensor]:
    """CPU: the item quantization and then the user blocks run in parallel threads, each thread
    single-threaded. Coarse tasks instead of many small multi-threaded ops: on a busy machine, an op split
    over threads waits for its slowest thread on every call (we measured 10x slowdowns)."""
    workers = max(1, torch.get_num_threads())
    if workers == 1:
        out = _topk_cpu_threads(users, items, k, exclude, item_chunk, map, 1)
    else:
        from concurrent.futures import ThreadPoolExecutor
        torch.set_num_threads(1)  # torch ops release the GIL: the threads run truly in parallel
        try:
            with ThreadPoolExecutor(workers) as pool:
                out = _topk_cpu_threads(users, items, k, exclude, item_chunk, pool.map, workers)
        finally:
            torch.set_num_threads(workers)
    return out if out is not None else _topk_exact(users, items, k, exclude, item_chunk)


def _topk_cpu_threads(users: Tensor, items: Tensor, k: int, exclude: Tensor | None, item_chunk: int,
                      pmap, workers: int) -> tuple[Tensor, Tensor] | None:
    """None when the int8 bound does not apply to these inputs."""
    U = users.shape[0]
    prep = _quantize_items(items, pmap, workers) if bool(torch.isfinite(users).all()) else None
    if prep is None:
        return None
    # equal blocks, a multiple of the thread count, none above CPU_USER_BLOCK: no thread idles at the end
    n_blocks = workers * max(1, -(-U // (workers * CPU_USER_BLOCK)))
    ub = max(1, -(-U // n_blocks))
    blocks = [(a, min(a + ub, U)) for a in range(0, U, ub)] or [(0, 0)]

    def run(ab: tuple[int, int]) -> tuple[Tensor, Tensor]:
        a, b = ab
        return _topk_cpu_block(users[a:b], prep, k, None if exclude is None else exclude[a:b], item_chunk)

    res = list(pmap(run, blocks))
    return torch.cat([r[0] for r in res]), torch.cat([r[1] for r in res])


def _exclusion_slices(exclude: Tensor | None, starts: list[int], M: int) -> tuple[Tensor, Tensor, list[int]] | None:
    """exclude (u, H) -> (rows, positions) of its valid entries sorted by position, and for each item
    block the bounds of its slice of them."""
    if exclude is None:
        return None
    ok = (exclude >= 0) & (exclude < M)
    rows = torch.arange(exclude.shape[0]).unsqueeze(1).expand_as(exclude)[ok]
    pos, order = exclude[ok].sort()
    bounds = torch.searchsorted(pos, torch.tensor(starts + [M], dtype=pos.dtype)).tolist()
    return rows[order], pos, bounds


def _topk_cpu_block(users: Tensor, items: _Int8Items, k: int, exclude: Tensor | None,
                    item_chunk: int) -> tuple[Tensor, Tensor]:
    """users (u, D) -> (scores (u, k) float64, positions (u, k)). Per item block: int32 scores by an int8
    matmul, excluded items set to _I32_MIN; the max of each CPU_SUB_BLOCK items screens out the (row,
    sub-block) pairs where no item can beat the row's k-th best (after the first blocks, nearly all). The
    others wait (with their int32 scores) for the next merge, every few blocks: there the items at or
    above their row's threshold, by then maybe higher, are scored exactly and merged. Rows still short of
    k scores (the first block, or many exclusions) score the whole block exactly at once."""
    u, M = users.shape[0], items.q.shape[0]
    u64 = users.double()  # (u, D)
    uq, scale, bound = _quantize_users(u64, items)
    inv, off = 1 / scale, bound / scale  # (u,) the threshold in int32 units
    best_s = torch.full((u, k), float("-inf"), dtype=torch.float64)
    best_i = torch.full((u, k), -1, dtype=torch.long)
    need = torch.full((u,), _I32_MAX, dtype=torch.int32)  # (u,) int32 score an item needs; only rises
    open_rows = torch.arange(u)  # rows short of k exact scores
    ic = max(1, min(item_chunk, CPU_ITEM_BLOCK))
    sub = max(1, min(CPU_SUB_BLOCK, ic))
    starts = list(range(0, M, ic))
    ex = _exclusion_slices(exclude, starts, M)
    buf = torch.empty(u, ic, dtype=torch.int32)
    pending: list[tuple[Tensor, Tensor, Tensor]] = []  # (rows (n,), first positions (n,), scores (n, sub))
    waiting = 0  # (row, sub-block) pairs in pending
    for j, start in enumerate(starts):
        c = min(ic, M - start)
        s = buf if c == ic else torch.empty(u, c, dtype=torch.int32)  # (u, c)
        _int8_mm(uq, items.q[start:start + c], s)
        if ex is not None and ex[2][j + 1] > ex[2][j]:
            lo, hi = ex[2][j], ex[2][j + 1]
            s[ex[0][lo:hi], ex[1][lo:hi] - start] = _I32_MIN
        blocks = s if c % sub == 0 else torch.nn.functional.pad(s, (0, -c % sub), value=_I32_MIN)
        blocks = blocks.view(u, blocks.shape[1] // sub, sub)  # (u, nb, sub)
        ri, bi = (blocks.amax(2) >= need.unsqueeze(1)).nonzero(as_tuple=True)  # (n,) pairs to look into
        if ri.numel():
            pair = ri * blocks.shape[1] + bi
            pending.append((ri, start + bi * sub, blocks.view(-1, sub).index_select(0, pair)))
            waiting += ri.numel()
        if pending and (len(pending) >= CPU_MERGE_EVERY or waiting >= u or j == len(starts) - 1):
            rows = _merge_candidates(u64, items.items, pending, need, best_s, best_i)
            need[rows] = _int_threshold(best_s[:, -1].index_select(0, rows), inv.index_select(0, rows),
                                        off.index_select(0, rows))
            pending, waiting = [], 0
        if open_rows.numel():
            exact = u64[open_rows] @ items.items[start:start + c].double().T  # (o, c)
            exact[s.index_select(0, open_rows) == _I32_MIN] = float("-inf")
            cs, ci = exact.topk(min(k, c), dim=1)
            _merge(best_s, best_i, open_rows, cs, ci + start)
            need[open_rows] = _int_threshold(best_s[open_rows, -1], inv[open_rows], off[open_rows])
            open_rows = open_rows[torch.isinf(best_s[open_rows, -1])]
    return best_s, best_i


def _merge_candidates(u64: Tensor, items: Tensor, pending: list[tuple[Tensor, Tensor, Tensor]], need: Tensor,
                      best_s: Tensor, best_i: Tensor) -> Tensor:
    """pending: (rows (n,), positions of their first items (n,), int32 scores (n, sub)) of the sub-blocks
    that passed the screen. Score exactly the items at or above their row's current threshold and merge
    them into (best_s, best_i). Returns the rows merged (possibly none)."""
    ri, first, scores = (torch.cat(x) for x in zip(*pending)) if len(pending) > 1 else pending[0]
    pi, col = (scores >= need.index_select(0, ri).unsqueeze(1)).nonzero(as_tuple=True)  # (m,)
    row, pos = ri.index_select(0, pi), first.index_select(0, pi) + col
    if len(pending) > 1:  # each block's pairs are in row order, the blocks after one another
        row, order = row.sort(stable=True)
        pos = pos.index_select(0, order)
    exact = (u64.index_select(0, row) * items.index_select(0, pos).double()).sum(1)  # (m,)
    rows, group, counts = torch.unique_consecutive(row, return_inverse=True, return_counts=True)  # (r,)
    if not rows.numel():
        return rows
    slot = torch.arange(row.numel()) - (counts.cumsum(0) - counts)[group]  # rank within its row
    width = int(counts.max())
    cand_s = torch.full((rows.numel(), width), float("-inf"), dtype=torch.float64)
    cand_i = torch.full((rows.numel(), width), -1, dtype=torch.long)
    cand_s[group, slot] = exact
    cand_i[group, slot] = pos
    _merge(best_s, best_i, rows, cand_s, cand_i)
    return rows


@torch.no_grad()
def topk_reference(users: Tensor, items: Tensor, k: int, exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The naive oracle: the whole (U, M) score matrix in the inputs' dtype (float64 inputs give a float64
    ranking), then one topk; scores returned as float32."""
    s = users @ items.T
    _mask_excluded(s, exclude, 0)
    best_s, best_i = s.topk(min(k, s.shape[1]), dim=1)
    return best_s.float(), best_i


def merge_topk(best_s: Tensor, best_i: Tensor, s: Tensor, i: Tensor) -> tuple[Tensor, Tensor]:
    """Two (U, k) top lists (scores best first, ids) -> the (U, k) best of both, in place in (best_s, best_i):
    a running top-k over streamed item chunks."""
    _merge(best_s, best_i, torch.arange(len(best_s), device=best_s.device), s, i)
    return best_s, best_i
