"""retrieval.topk_chunked: exact top-K on the CPU (int8 screen) and the GPU algorithm (bf16 screen, run on the
CPU), against an independent float64 oracle, on inputs built to break a low-precision screen."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import retrieval


pytestmark = pytest.mark.usefixtures("two_threads")  # the CPU top-K path runs blocks in threads


@pytest.fixture
def tiny_tiles(monkeypatch):
    """Many user blocks (threads), item blocks and sub-blocks, none dividing the sizes used here."""
    monkeypatch.setattr(retrieval, "CPU_USER_BLOCK", 4)
    monkeypatch.setattr(retrieval, "CPU_ITEM_BLOCK", 12)
    monkeypatch.setattr(retrieval, "CPU_SUB_BLOCK", 5)


def run_path(path: str, users, items, k, exclude=None, item_chunk=65536, monkeypatch=None):
    """'cpu': the CPU algorithm; 'device': the GPU algorithm on the CPU (same code, CPU tensors)."""
    if path == "device":
        monkeypatch.setattr(retrieval, "_topk_cpu", retrieval._topk_device)
    return retrieval.topk_chunked(users, items, k, exclude, item_chunk=item_chunk)


def assert_exact(users, items, k, exclude, s, i):
    """The float64 oracle, computed here with numpy: each row's returned scores are the k best exact scores
    (ties in any order), each position really has its score, none twice, none excluded, -1 / -inf exactly
    where fewer than k items remain."""
    u, v = users.double().numpy(), items.double().numpy()
    full = u @ v.T  # (U, M)
    U, M = full.shape
    banned = [set() if exclude is None else {p for p in exclude[r].tolist() if 0 <= p < M} for r in range(U)]
    for r in range(U):
        full[r, list(banned[r])] = -np.inf
    assert s.shape == i.shape == (U, k) and s.dtype == torch.float32 and i.dtype == torch.long
    s, i = s.numpy(), i.numpy()
    for r in range(U):
        n = min(k, M - len(banned[r]))
        want = -np.sort(-full[r])[:n]  # (n,) the best n exact scores
        assert (i[r, n:] == -1).all() and np.isneginf(s[r, n:]).all(), r
        got = i[r, :n]
        assert (got >= 0).all() and len(set(got.tolist())) == n and not set(got.tolist()) & banned[r], r
        mine = full[r, got]  # exact scores of the returned items, in returned order
        scale = max(1e-300, float(np.abs(want).max(initial=0)))
        assert np.allclose(mine, want, rtol=0, atol=1e-12 * scale), (r, mine - want)  # the same k, best first
        assert np.array_equal(s[r, :n], mine.astype(np.float32)), r  # scores are the exact ones, as float32


def near_ties(g: torch.Generator, U: int, M: int, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Users near one direction, items whose scores all lie within ~1e-4 of each other (far inside the int8
    and bf16 error bounds), exact duplicates among them, and some items of other norms."""
    base = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
    users = base + 1e-3 * torch.randn(U, D, generator=g)
    items = base + 1e-5 * torch.randn(M, D, generator=g)
    items[M // 2:M // 2 + 7] = items[3]  # duplicates of one item, in other blocks
    items[::11] *= 1 + 1e-4 * torch.rand(len(items[::11]), 1, generator=g)  # slightly longer: near the top
    return users, items


# --------------------------------------------------------------------------- results equal the oracle

@pytest.mark.parametrize("path", ["cpu", "device"])
@pytest.mark.parametrize("with_exclude", [False, True])
@pytest.mark.parametrize("item_chunk", [3, 7, 1000])  # smaller than k, not dividing M, larger than M
def test_topk_chunked_equals_full_topk(path, with_exclude, item_chunk, monkeypatch, tiny_tiles):
    g = torch.Generator().manual_seed(item_chunk)
    U, M, D, k = 23, 101, 8, 5
    users, items = torch.randn(U, D, generator=g), torch.randn(M, D, generator=g)
    items[40:44] = items[3]  # exact ties across chunks
    exclude = torch.randint(-1, M + 5, (U, 9), generator=g) if with_exclude else None  # -1 and >= M are no-ops
    s, i = run_path(path, users, items, k, exclude, item_chunk, monkeypatch)
    assert_exact(users, items, k, exclude, s, i)
    ref_s, _ = retrieval.topk_reference(users, items, k, exclude)  # the float32 oracle agrees too
    assert torch.allclose(s, ref_s, atol=1e-5)


def test_topk_chunked_fewer_candidates_than_k():
    users, items = torch.randn(3, 4), torch.randn(4, 4)
    exclude = torch.tensor([[0, 1], [-1, -1], [0, 0]])
    s, i = retrieval.topk_chunked(users, items, 6, exclude, item_chunk=3)
    assert (i >= 0).sum(1).tolist() == [2, 4, 3] and torch.isinf(s[i < 0]).all()


@pytest.mark.parametrize("path", ["cpu", "device"])
def test_adversarial_near_ties(path, monkeypatch, tiny_tiles):
    """Scores within 1e-4 of each other: the screens keep nearly everything, the exact scores decide."""
    g = torch.Generator().manual_seed(1)
    U, M, D, k = 19, 233, 16, 7
    users, items = near_ties(g, U, M, D)
    exclude = torch.randint(-1, M, (U, 30), generator=g)
    exclude[2] = torch.arange(30)  # one row loses a whole prefix
    s, i = run_path(path, users, items, k, exclude, 50, monkeypatch)
    assert_exact(users, items, k, exclude, s, i)


@pytest.mark.parametrize("path", ["cpu", "device"])
def test_unnormalised_vectors_of_many_norms(path, monkeypatch, tiny_tiles):
    """Norms over 12 orders of magnitude, including zero vectors: the int8 scales are per user and global
    for the items, so small items and small users are the hard cases for the bound."""
    g = torch.Generator().manual_seed(2)
    U, M, D, k = 17, 300, 24, 6
    users = torch.randn(U, D, generator=g) * 10 ** (torch.rand(U, 1, generator=g) * 12 - 6)
    items = torch.randn(M, D, generator=g) * 10 ** (torch.rand(M, 1, generator=g) * 12 - 6)
    users[5] = 0
    items[7] = 0
    items[100:110] = items[200] * 1.0000001  # near-duplicates of one item
    s, i = run_path(path, users, items, k, None, 64, monkeypatch)
    assert_exact(users, items, k, None, s, i)


@pytest.mark.parametrize("path", ["cpu", "device"])
def test_k_above_the_candidates_and_all_excluded(path, monkeypatch, tiny_tiles):
    """Rows with fewer than k items left, and one with none: positions -1, scores -inf, the rest exact."""
    g = torch.Generator().manual_seed(3)
    U, M, D, k = 9, 31, 8, 12
    users, items = torch.randn(U, D, generator=g), torch.randn(M, D, generator=g)
    exclude = torch.full((U, M + 3), -1)
    exclude[0, :M] = torch.arange(M)  # everything excluded
    exclude[1, :M - 3] = torch.arange(M - 3)  # 3 left
    exclude[2, :25] = torch.arange(25).flip(0)  # 6 left
    exclude[3, :] = 4  # one item excluded many times
    s, i = run_path(path, users, items, k, exclude, 10, monkeypatch)
    assert (i[0] == -1).all() and torch.isneginf(s[0]).all()
    assert (i[1] >= 0).sum() == 3 and (i[2] >= 0).sum() == 6
    assert_exact(users, items, k, exclude, s, i)
    s2, i2 = run_path(path, users, items[:5], 8, None, 2, monkeypatch)  # k > M, nothing excluded
    assert_exact(users, items[:5], 8, None, s2, i2)


@pytest.mark.parametrize("path", ["cpu", "device"])
def test_realistic_sizes_and_bf16_items(path, monkeypatch):
    """Normalised vectors at the default tile sizes, U not a multiple of the user block, items in bf16 (as
    validation passes them under autocast)."""
    g = torch.Generator().manual_seed(4)
    U, M, D, k = 600, 9000, 32, 10
    users = torch.nn.functional.normalize(torch.randn(U, D, generator=g), dim=1)
    items = torch.nn.functional.normalize(torch.randn(M, D, generator=g), dim=1)
    exclude = torch.randint(-1, M, (U, 40), generator=g)
    s, i = run_path(path, users, items, k, exclude, 4096, monkeypatch)
    assert_exact(users, items, k, exclude, s, i)
    s, i = run_path(path, users[:50], items.bfloat16(), k, None, 4096, monkeypatch)
    assert_exact(users[:50], items.bfloat16(), k, None, s, i)


def test_empty_inputs():
    for U, M in [(0, 10), (4, 0)]:
        s, i = retrieval.topk_chunked(torch.randn(U, 8), torch.randn(M, 8), 3)
        assert s.shape == i.shape == (U, 3) and (i == -1).all() and torch.isneginf(s).all()


# --------------------------------------------------------------------------- the screens prune, with proven bounds

def test_int8_bound_holds_at_its_worst_case():
    """|u·v - scale·(uq·q)| <= bound for every pair, including residues aligned with the other vector
    (Cauchy-Schwarz tight: each term of the bound is needed) and vectors of very different norms."""
    g = torch.Generator().manual_seed(5)
    D = 16

    def errors(users, items):
        q = retrieval._quantize_items(items)
        uq, scale, bound = retrieval._quantize_users(users.double(), q)
        approx = scale.unsqueeze(1) * (uq.long() @ q.q.long().T).double()  # (U, M)
        err = (users.double() @ items.double().T - approx).abs()
        assert (err <= bound.unsqueeze(1)).all()
        return err / bound.unsqueeze(1)

    def aligned(n, s):  # every residue +0.4999·s, scale s
        x = (torch.randint(-60, 60, (n, D), generator=g) + 0.4999) * s
        x[:, 0] = 127 * s
        return x

    mixed = torch.randn(200, D, generator=g) * 10 ** (torch.rand(200, 1, generator=g) * 4 - 5)  # below 127·0.01
    others = torch.cat([torch.randn(30, D, generator=g), torch.randn(30, D, generator=g) * 1e-4, torch.zeros(1, D)])
    ratio = errors(torch.cat([torch.ones(1, D), others]), torch.cat([aligned(50, 0.01), mixed]))
    assert ratio[0, :50].max() > 0.9  # item residues aligned with the user: the item term is needed
    exact_items = torch.cat([torch.ones(1, D), -torch.ones(1, D)]) * 1.27  # exact in int8
    ratio = errors(torch.cat([aligned(3, 0.003), others]), exact_items)
    assert ratio[:3].max() > 0.9  # the users' residues aligned with the items: the user term is needed


def test_bf16_bound_holds_at_its_worst_case():
    """Values just below a bf16 rounding midpoint, all products positive: the bf16 errors add up to nearly
    the whole bound, and never beyond it."""
    g = torch.Generator().manual_seed(9)
    D = 64
    near = 1 + 2.0 ** -8 * (1 - 2.0 ** -10)  # rounds down to 1: relative error ~2^-8
    u = (near * 2.0 ** torch.randint(-3, 4, (5, D), generator=g)).float()
    v = (near * 2.0 ** torch.randint(-3, 4, (7, D), generator=g)).float()
    u, v = torch.cat([u, torch.randn(20, D, generator=g)]), torch.cat([v, torch.randn(20, D, generator=g) * 1e-3])
    lp = retrieval._mm_bf16(u.bfloat16(), v.bfloat16()).double()
    err = (lp - u.double() @ v.double().T).abs()
    bound = retrieval._bf16_eps(D) * u.double().norm(dim=1, keepdim=True) * v.double().norm(dim=1) + retrieval._BF16_ABS
    assert (err <= bound).all()
    sums = u.double().abs() @ v.double().abs().T  # Cauchy-Schwarz is tight only for parallel vectors: compare
    assert (err[:5, :7] / (retrieval._bf16_eps(D) * sums[:5, :7])).min() > 0.9  # with the sum of |u_i·v_i|


def test_int_threshold_is_the_least_passing_score():
    g = torch.Generator().manual_seed(8)
    kth = torch.randn(1000, generator=g, dtype=torch.float64)
    inv = 10 ** (torch.rand(1000, generator=g, dtype=torch.float64) * 6)
    off = torch.rand(1000, generator=g, dtype=torch.float64) * 100
    kth[:10] = (torch.arange(10, dtype=torch.float64) + off[:10]) / inv[:10]  # x exactly an integer
    t = retrieval._int_threshold(kth, inv, off).double()
    x = kth * inv - off  # an item passes when I > x
    assert ((t - 1 <= x) & (x < t)).all()
    t = retrieval._int_threshold(torch.tensor([float("-inf"), 1e300, -1e300], dtype=torch.float64),
                                 torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    assert t.tolist() == [2 ** 31 - 1, 2 ** 31 - 1, -2 ** 31 + 1]  # unfilled rows never screen; clamped


def test_bf16_bound_prunes_on_normalised_data_and_falls_back_on_ties(monkeypatch):
    """The GPU algorithm re-scores exactly only k + DEVICE_EXTRA items per chunk and proves the rest cannot
    matter; where it cannot (near-ties), it recomputes the row exactly. Both are counted here."""
    calls = []
    exact = retrieval._topk_exact
    monkeypatch.setattr(retrieval, "_topk_exact", lambda u, *a: calls.append(u.shape[0]) or exact(u, *a))
    monkeypatch.setattr(retrieval, "_topk_cpu", retrieval._topk_device)
    g = torch.Generator().manual_seed(6)
    users = torch.nn.functional.normalize(torch.randn(40, 32, generator=g), dim=1)
    items = torch.nn.functional.normalize(torch.randn(20000, 32, generator=g), dim=1)
    s, i = retrieval.topk_chunked(users, items, 10, item_chunk=5000)
    assert calls == []  # every row proven from the bf16 bound alone
    assert_exact(users, items, 10, None, s, i)
    users, items = near_ties(g, 12, 300, 16)
    s, i = retrieval.topk_chunked(users, items, 5, item_chunk=100)
    assert calls and calls[0] > 0  # rows recomputed exactly
    assert_exact(users, items, 5, None, s, i)
    # near-ties in the first chunk only, far better than anything after it: the proof must remember them
    users, items = near_ties(g, 12, 300, 16)
    items[100:] = -items[100:]
    s, i = retrieval.topk_chunked(users, items, 5, item_chunk=100)
    assert calls[-1] > 0
    assert_exact(users, items, 5, None, s, i)
    big, few = torch.randn(5, 8, generator=g) * 1e13, torch.randn(30, 8, generator=g)  # beyond the bf16 range
    s, i = retrieval.topk_chunked(big, few, 4, item_chunk=7)
    assert calls[-1] == 5  # all exact
    assert_exact(big, few, 4, None, s, i)


def test_int8_screen_prunes_on_normalised_data(monkeypatch):
    """On L2-normalised random vectors the CPU algorithm scores only a small share of the pairs exactly
    (the point of the int8 screen), and the result is exact."""
    scored = []
    merge = retrieval._merge_candidates

    def counting(u64, items, pending, need, best_s, best_i):
        scored.append(sum(int((scores >= need[ri].unsqueeze(1)).sum()) for ri, _, scores in pending))
        return merge(u64, items, pending, need, best_s, best_i)

    monkeypatch.setattr(retrieval, "_merge_candidates", counting)
    g = torch.Generator().manual_seed(7)
    U, M, D = 256, 40000, 32
    users = torch.nn.functional.normalize(torch.randn(U, D, generator=g), dim=1)
    items = torch.nn.functional.normalize(torch.randn(M, D, generator=g), dim=1)
    s, i = retrieval.topk_chunked(users, items, 10)
    assert sum(scored) < 0.01 * U * M
    assert_exact(users, items, 10, None, s, i)


def test_int8_matmul_is_checked_and_has_an_exact_fallback(monkeypatch, tiny_tiles):
    assert retrieval._int_mm_exact()  # this machine's int8 kernel sums exactly (else the fallback runs)
    g = torch.Generator().manual_seed(10)
    a, b = torch.randint(-127, 128, (9, 300), generator=g), torch.randint(-127, 128, (11, 300), generator=g)
    a[0], b[0] = 127, -127
    for exact in (True, False):
        monkeypatch.setattr(retrieval, "_int_mm_exact", lambda: exact)
        out = torch.empty(9, 11, dtype=torch.int32)
        retrieval._int8_mm(a.to(torch.int8), b.to(torch.int8), out)
        assert torch.equal(out.long(), a @ b.T)
    users, items = torch.randn(13, 8, generator=g), torch.randn(70, 8, generator=g)
    s, i = retrieval.topk_chunked(users, items, 4)
    assert_exact(users, items, 4, None, s, i)
