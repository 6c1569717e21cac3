import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loss import (candidate_columns, curriculum, full_softmax_fits, full_softmax_loss,  # noqa: E402
                  full_softmax_loss_reference, log_q_from_counts, log_q_uniform, parse_curriculum,
                  sampled_softmax_loss, sampled_softmax_loss_reference)

D = 8
ITEMNUM = 30


pytestmark = pytest.mark.usefixtures("one_thread")


def make_rows(seed: int, num_seqs: int = 5, id_range: int = ITEMNUM, dtype=torch.float64):
    """Random target rows of a batch: rows_per_seq in 2..6, ids from 1..id_range (small range = many duplicates)."""
    g = torch.Generator().manual_seed(seed)
    row_seq = torch.cat([torch.full((int(torch.randint(2, 7, (1,), generator=g)),), s) for s in range(num_seqs)])
    r = row_seq.numel()

    def unit(n):
        return F.normalize(torch.randn(n, D, generator=g, dtype=dtype), dim=-1).requires_grad_()

    pos_ids = torch.randint(1, id_range + 1, (r,), generator=g)
    neg_ids = torch.randint(1, id_range + 1, (r,), generator=g)
    log_q = torch.log_softmax(torch.randn(ITEMNUM + 1, generator=g, dtype=dtype), 0)
    return dict(query=unit(r), pos=unit(r), pos_ids=pos_ids, row_seq=row_seq, neg=unit(r), neg_ids=neg_ids,
                log_q=log_q)


def value_and_grads(fn, rows, **kw):
    for k in ("query", "pos", "neg"):
        rows[k].grad = None
    loss = fn(**rows, **kw)
    loss.backward()
    # a tensor no kept logit depends on gets no gradient in the oracle (None), zeros in the fast path
    return loss.detach(), [torch.zeros_like(rows[k]) if rows[k].grad is None else rows[k].grad.clone()
                           for k in ("query", "pos", "neg")]


def assert_same(rows, **kw):
    v1, g1 = value_and_grads(sampled_softmax_loss, rows, **kw)
    v2, g2 = value_and_grads(sampled_softmax_loss_reference, rows, **kw)
    torch.testing.assert_close(v1, v2, rtol=1e-10, atol=1e-10)
    for a, b, name in zip(g1, g2, ("query", "pos", "neg")):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)
    return v1


@pytest.mark.parametrize("with_log_q", [True, False])
@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 2048])
@pytest.mark.parametrize("hard", [None, (4, 0.5), (7, 0.25), (3, 0.0), (5, 1.0), (1000, 0.5)])
def test_chunked_matches_reference(with_log_q, chunk_rows, hard):
    for seed, id_range in ((0, ITEMNUM), (1, 6)):  # id_range 6: many duplicate ids across sequences
        rows = make_rows(seed, id_range=id_range)
        if not with_log_q:
            rows["log_q"] = torch.zeros(ITEMNUM + 1, dtype=torch.float64)
        kw = dict(chunk_rows=chunk_rows, temperature=0.05)
        if hard is not None:
            kw.update(hard_k=hard[0], global_share=hard[1])
        v = assert_same(rows, **kw)
        assert torch.isfinite(v) and v > 0


def test_default_temperature_and_duplicates_really_masked():
    rows = make_rows(2, id_range=4)
    assert_same(rows)  # temperature 0.01
    assert_same(rows, hard_k=3, global_share=0.5, chunk_rows=4)


def test_hand_computed_small_case():
    # two sequences, one row each, all ids distinct: every column is a negative except the row's own positive
    g = torch.Generator().manual_seed(0)
    q, p, n = (F.normalize(torch.randn(2, D, generator=g, dtype=torch.float64), dim=-1) for _ in range(3))
    lq = torch.log_softmax(torch.randn(ITEMNUM + 1, generator=g, dtype=torch.float64), 0)
    pos_ids, neg_ids, seq = torch.tensor([1, 2]), torch.tensor([3, 4]), torch.tensor([0, 1])
    tau = 0.1
    expect = []
    for r in range(2):
        pl = q[r] @ p[r] / tau - lq[pos_ids[r]]
        negs = [q[r] @ n[c] / tau - lq[neg_ids[c]] for c in range(2)] + [q[r] @ p[1 - r] / tau - lq[pos_ids[1 - r]]]
        expect.append(torch.logsumexp(torch.stack([pl] + negs), 0) - pl)
    expect = torch.stack(expect).mean()
    for fn in (sampled_softmax_loss, sampled_softmax_loss_reference):
        torch.testing.assert_close(fn(q, p, pos_ids, seq, n, neg_ids, lq, temperature=tau), expect)
    # same sequence for both rows: the other row's positive is no longer a negative
    pl = [q[r] @ p[r] / tau - lq[pos_ids[r]] for r in range(2)]
    expect = torch.stack([torch.logsumexp(torch.stack([pl[r]] + [q[r] @ n[c] / tau - lq[neg_ids[c]] for c in range(2)]),
                                          0) - pl[r] for r in range(2)]).mean()
    same = torch.tensor([4, 4])
    torch.testing.assert_close(sampled_softmax_loss(q, p, pos_ids, same, n, neg_ids, lq, temperature=tau), expect)
    # hard_k picks per group: share 1.0 -> the hardest global negative only, 0.0 -> the in-batch one only,
    # k = 1 at share 0.5 rounds half up -> the global one
    g_best = [max(q[r] @ n[c] / tau - lq[neg_ids[c]] for c in range(2)) for r in range(2)]
    b_only = [q[r] @ p[1 - r] / tau - lq[pos_ids[1 - r]] for r in range(2)]
    for k, share, negs in ((1, 1.0, g_best), (5, 0.0, b_only), (1, 0.5, g_best)):
        expect = torch.stack([torch.logsumexp(torch.stack([pl[r], negs[r]]), 0) - pl[r] for r in range(2)]).mean()
        for fn in (sampled_softmax_loss, sampled_softmax_loss_reference):
            got = fn(q, p, pos_ids, seq, n, neg_ids, lq, temperature=tau, hard_k=k, global_share=share)
            torch.testing.assert_close(got, expect)


@pytest.mark.parametrize("hard_k", [None, 3])
def test_masked_columns_are_excluded(hard_k):
    rows = make_rows(3, num_seqs=4)
    # item 7 is a positive of every sequence, so a global negative with id 7 is masked for every row
    for s in range(4):
        rows["pos_ids"][(rows["row_seq"] == s).nonzero()[0]] = 7
    rows["neg_ids"][2] = 7
    rows["neg_ids"][4] = 0  # a padding id is never a negative either
    kw = dict(hard_k=hard_k, chunk_rows=5)
    assert_same(rows, **kw)
    base, grads = value_and_grads(sampled_softmax_loss, rows, **kw)
    assert grads[2][2].abs().max() == 0 and grads[2][4].abs().max() == 0  # no gradient reaches masked columns
    with torch.no_grad():
        rows["neg"][2] = rows["query"][0]  # cos = 1: would be the hardest negative of row 0 if not masked
        rows["neg"][4] = rows["query"][1]
    torch.testing.assert_close(sampled_softmax_loss(**rows, **kw), base, rtol=0, atol=0)
    # control: the same change on an unmasked column does change the loss
    with torch.no_grad():
        rows["neg"][3] = rows["query"][0]
    assert (sampled_softmax_loss(**rows, **kw) - base).abs() > 1e-3


def test_hard_k_keeps_top_negatives():
    rows = make_rows(4)
    full = sampled_softmax_loss(**rows, temperature=0.05)
    big = sampled_softmax_loss(**rows, temperature=0.05, hard_k=10_000)
    torch.testing.assert_close(big, full)  # k above the number of candidates = all negatives
    vals = [sampled_softmax_loss(**rows, temperature=0.05, hard_k=k).item() for k in (1, 2, 4, 8, 16)]
    assert all(a <= b + 1e-12 for a, b in zip(vals, vals[1:])) and vals[-1] <= full.item() + 1e-12
    # share 1.0 / 0.0 keep one group only: each is below the full loss and together they bound it
    only_global = sampled_softmax_loss(**rows, temperature=0.05, hard_k=10_000, global_share=1.0)
    only_batch = sampled_softmax_loss(**rows, temperature=0.05, hard_k=10_000, global_share=0.0)
    assert only_global < full and only_batch < full and full < only_global + only_batch


def test_logits_fp32_under_autocast():
    rows = make_rows(5, dtype=torch.float32)
    ref = sampled_softmax_loss(**rows, chunk_rows=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        args = {k: (v.detach().to(torch.bfloat16) if k in ("query", "pos", "neg") else v) for k, v in rows.items()}
        out = sampled_softmax_loss(**args, chunk_rows=4)
    assert out.dtype == torch.float32
    # only the bf16 rounding of the inputs remains (cos error ~1e-2 / tau = 0.01 -> ~1 logit unit at worst)
    assert abs(out.item() - ref.item()) < 0.1 * abs(ref.item())


def test_empty_rows():
    rows = make_rows(6)
    empty = {k: (v[:0] if k != "log_q" else v) for k, v in rows.items()}
    out = sampled_softmax_loss(**empty)
    assert out.item() == 0.0


def test_curriculum_values():
    assert curriculum(0, 130000) == (None, 0.5)
    assert curriculum(19999, 130000) == (None, 0.5)
    assert curriculum(20000, 130000) == (8192, 0.5)
    k, share = curriculum(75000, 130000)  # halfway: geometric mean of k, mean of share
    assert k == 1024 and share == pytest.approx(0.375)
    assert curriculum(130000, 130000) == (128, 0.25)
    assert curriculum(500000, 1000000) == (128, 0.25)  # longer runs keep the table as written
    ks = [curriculum(s, 130000)[0] for s in range(20000, 130001, 5000)]
    assert all(a >= b for a, b in zip(ks, ks[1:]))
    # a 13k-step run: every table step scaled by 0.1
    assert curriculum(1999, 13000) == (None, 0.5)
    assert curriculum(2000, 13000) == (8192, 0.5)
    assert curriculum(7500, 13000)[0] == 1024
    assert curriculum(13000, 13000) == (128, 0.25)
    assert curriculum(50, 100, "10:64:1.0") == (64, 1.0) and curriculum(5, 100, "10:64:1.0", ref_steps=100)[0] is None
    assert parse_curriculum(" 1:2:0.5 , 3:4:0.25") == [(1, 2, 0.5), (3, 4, 0.25)]


@pytest.mark.parametrize("bad", ["", "abc", "100:8", "100:8:0.5:1", "x:8:0.5", "100:0:0.5", "100:8:1.5",
                                 "100:8:0.5,50:4:0.2", "100:8:0.5,100:4:0.2", "-1:8:0.5"])
def test_curriculum_parse_errors(bad):
    with pytest.raises(ValueError, match="curriculum"):
        curriculum(0, 1000, bad)


def test_log_q_from_counts():
    counts = np.array([0, 0, 1, 10, 1000, 3], dtype=np.int64)
    lq = log_q_from_counts(counts)
    assert lq.shape == (6,) and lq.dtype == torch.float32 and torch.isfinite(lq).all()
    assert torch.exp(lq.double()).sum().item() == pytest.approx(1.0, abs=1e-6)
    assert lq[1] == lq[2]  # count 0 counts as 1
    assert lq[4] - lq[3] == pytest.approx(0.75 * np.log(100), rel=1e-5)  # q ∝ count^0.75
    assert (torch.argsort(lq[2:]) == torch.argsort(torch.tensor([1, 10, 1000, 3]))).all()
    torch.testing.assert_close(log_q_from_counts(torch.from_numpy(counts)), lq)
    flat = log_q_from_counts(counts, alpha=0.0)
    torch.testing.assert_close(flat, torch.full((6,), -float(np.log(6))))


def test_backward_keeps_no_full_logit_matrix():
    # every tensor autograd saves for backward is recorded; checkpointed chunks save only their inputs
    rows = make_rows(7, num_seqs=64)
    r = rows["query"].shape[0]
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def dense(**a):  # what the hook sees when the full matrix is kept
        return torch.logsumexp(a["query"] @ torch.cat([a["neg"], a["pos"]]).T, dim=1).sum()

    full = r * 2 * r * 8  # bytes of the (R, 2R) float64 logits
    for fn in (sampled_softmax_loss, dense):
        storages.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = fn(**rows, chunk_rows=16) if fn is sampled_softmax_loss else fn(**rows)
        loss.backward()
        if fn is sampled_softmax_loss:
            assert sum(storages.values()) < full / 4  # the chunks' logits do not stay alive until backward
        else:
            assert sum(storages.values()) >= full


@pytest.mark.parametrize("num_candidates", [1, 9, 10_000])
def test_candidate_subset_equals_brute_force(num_candidates):
    """--max-candidates: a shared random subset of the columns; the positive still enters every row once."""
    rows = make_rows(3, num_seqs=6, id_range=12)
    r, tau = rows["query"].shape[0], 0.1
    cols = candidate_columns(r, num_candidates, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert (cols is None) == (num_candidates >= 2 * r)
    keep_g, keep_b = cols if cols is not None else (torch.arange(r), torch.arange(r))
    assert len(keep_g) + len(keep_b) == min(num_candidates, 2 * r)
    fast = sampled_softmax_loss(**rows, temperature=tau, columns=cols)

    q, p, n, lq, seq, pid, nid = (rows[k] for k in ("query", "pos", "neg", "log_q", "row_seq", "pos_ids", "neg_ids"))
    losses = []
    for i in range(r):
        own = {int(pid[j]) for j in range(r) if seq[j] == seq[i]}
        terms = [q[i] @ p[i] / tau - lq[pid[i]]]
        for vecs, ids in ((n[keep_g], nid[keep_g]), (p[keep_b], pid[keep_b])):
            terms += [q[i] @ v / tau - lq[c] for v, c in zip(vecs, ids) if int(c) not in own]
        t = torch.stack(terms)
        losses.append(torch.logsumexp(t, 0) - t[0])
    ref = torch.stack(losses).mean()
    torch.testing.assert_close(fast, ref)
    inputs = [rows["query"], rows["pos"], rows["neg"]]
    grads = [torch.autograd.grad(x, inputs, allow_unused=True) for x in (fast, ref)]
    for x, a, b in zip(inputs, *grads):  # with one column there is no global negative: neg gets no gradient
        torch.testing.assert_close(torch.zeros_like(x) if a is None else a, torch.zeros_like(x) if b is None else b)


@pytest.mark.parametrize("hard_k", [None, 6])
def test_rows_split_across_ranks_with_gathered_columns_equal_one_process(hard_k):
    """What each DDP rank computes: its own rows against every rank's columns. Weighted by row counts, the
    ranks' losses (and so their gradients) add up to the single-process loss."""
    rows = make_rows(4, num_seqs=7)
    r = rows["query"].shape[0]
    cut = int((rows["row_seq"] < 3).sum())  # rank 0: sequences 0-2, rank 1: the rest
    cols = candidate_columns(r, 2 * r - 5, torch.device("cpu"), torch.Generator().manual_seed(1))
    single = sampled_softmax_loss(**rows, temperature=0.05, hard_k=hard_k, columns=cols)
    gathered = tuple(rows[k] for k in ("pos", "pos_ids", "row_seq", "neg", "neg_ids"))
    split = sum(sampled_softmax_loss(**{k: v[sl] if k != "log_q" else v for k, v in rows.items()}, temperature=0.05,
                                     hard_k=hard_k, columns=cols, gathered=gathered) * (sl.stop - sl.start) / r
                for sl in (slice(0, cut), slice(cut, r)))
    torch.testing.assert_close(split, single)
    inputs = [rows["query"], rows["pos"], rows["neg"]]
    for a, b in zip(torch.autograd.grad(split, inputs), torch.autograd.grad(single, inputs)):
        torch.testing.assert_close(a, b)


# ---- log-q per source ---------------------------------------------------------------------------------------------

def with_pool(rows: dict, seed: int, float_pool: bool = False) -> dict:
    """The rows' global negatives drawn from a pool (a third of the items left out, so in-batch positives outside
    the pool occur) and one padding negative; log_q_global the pool's per-item log q, or -log P as one float
    (the pool then counts as the whole catalogue)."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randperm(ITEMNUM, generator=g)[: 2 * ITEMNUM // 3] + 1
    r = rows["query"].shape[0]
    rows["neg_ids"] = pool[torch.randint(0, len(pool), (r,), generator=g)]
    rows["neg_ids"][1] = 0
    rows["log_q_global"] = -float(np.log(ITEMNUM)) if float_pool else log_q_uniform(pool, ITEMNUM + 1).double()
    return rows


@pytest.mark.parametrize("mode", ["source", "mixture", "none", "all"])
@pytest.mark.parametrize("negatives", ["mixed", "in-batch", "global"])
@pytest.mark.parametrize("hard", [None, (5, 0.5), (3, 0.0)])
@pytest.mark.parametrize("subset", [False, True])
def test_log_q_modes_match_reference(mode, negatives, hard, subset):
    for seed, id_range, float_pool in ((10, ITEMNUM, False), (11, 6, False), (12, ITEMNUM, True)):
        rows = with_pool(make_rows(seed, id_range=id_range), seed, float_pool)
        r = rows["query"].shape[0]
        kw = dict(chunk_rows=3, temperature=0.05, log_q_mode=mode, negatives=negatives)
        if subset:
            kw["columns"] = candidate_columns(r, 2 * r - 7, torch.device("cpu"), torch.Generator().manual_seed(seed))
        if hard is not None:
            kw.update(hard_k=hard[0], global_share=hard[1])
        v = assert_same(rows, **kw)
        assert torch.isfinite(v) and v > 0
        torch.testing.assert_close(sampled_softmax_loss(**rows, **{**kw, "chunk_rows": 2048}), v)


def test_log_q_source_and_mixture_by_hand():
    """Two one-row sequences, distinct ids: row r's negatives are both global columns and the other row's
    in-batch column. N = 4 columns (2 global, 2 in-batch), pool of P = 10 items."""
    g = torch.Generator().manual_seed(1)
    q, p, n = (F.normalize(torch.randn(2, D, generator=g, dtype=torch.float64), dim=-1) for _ in range(3))
    lq = torch.log_softmax(torch.randn(ITEMNUM + 1, generator=g, dtype=torch.float64), 0)
    pos_ids, neg_ids, seq, tau = torch.tensor([1, 2]), torch.tensor([3, 4]), torch.tensor([0, 1]), 0.1
    pool = torch.tensor([2, 3, 4, 5, 6, 7, 8, 9, 10, 11])  # item 1 is outside the pool, item 2 inside
    lg = log_q_uniform(pool, ITEMNUM + 1).double()
    qb = lq.exp()
    for mode in ("source", "mixture"):
        losses = []
        for r in range(2):
            pl = q[r] @ p[r] / tau  # the positive: no correction
            o = 1 - r  # the other row
            if mode == "source":
                cg = [torch.log(4 * torch.tensor(0.1, dtype=torch.float64))] * 2
                cb = torch.log(4 * qb[pos_ids[o]])
            else:
                cg = [torch.log(2 * qb[neg_ids[c]] + 2 * 0.1) for c in range(2)]
                in_pool = 0.1 if int(pos_ids[o]) in pool.tolist() else 0.0
                cb = torch.log(2 * qb[pos_ids[o]] + 2 * in_pool)
            negs = [q[r] @ n[c] / tau - cg[c] for c in range(2)] + [q[r] @ p[o] / tau - cb]
            losses.append(torch.logsumexp(torch.stack([pl] + negs), 0) - pl)
        expect = torch.stack(losses).mean()
        for fn in (sampled_softmax_loss, sampled_softmax_loss_reference):
            got = fn(q, p, pos_ids, seq, n, neg_ids, lq, temperature=tau, log_q_mode=mode, log_q_global=lg)
            torch.testing.assert_close(got, expect, msg=f"{fn.__name__} {mode}")


def test_log_q_mode_identities():
    rows = with_pool(make_rows(13), 13)
    kw = dict(temperature=0.05, chunk_rows=4)
    loss = lambda **a: sampled_softmax_loss(**{**rows, **a}, **kw)  # noqa: E731
    # one source only: its mixture is that source alone
    for negatives in ("in-batch", "global"):
        torch.testing.assert_close(loss(log_q_mode="mixture", negatives=negatives),
                                   loss(log_q_mode="source", negatives=negatives))
    # both samplers uniform over the same (whole) catalogue: the mixture is each source
    flat = torch.full((ITEMNUM + 1,), -float(np.log(ITEMNUM)), dtype=torch.float64)
    a = loss(log_q=flat, log_q_global=-float(np.log(ITEMNUM)), log_q_mode="mixture")
    torch.testing.assert_close(a, loss(log_q=flat, log_q_global=-float(np.log(ITEMNUM)), log_q_mode="source"))
    # ...and unlike 'all' it is not 'none': the count term log(N / P) is not a shift common to the positive
    assert (a - loss(log_q_mode="none")).abs() > 1e-3
    torch.testing.assert_close(loss(log_q=flat, log_q_mode="all"), loss(log_q_mode="none"))
    # the pool's membership matters to the mixture, not to 'source' (global columns are all in the pool)
    wide = -float(np.log(len(rows["log_q_global"]) - 1))
    one = loss(log_q_mode="source", log_q_global=float(rows["log_q_global"][rows["neg_ids"][0]]))
    torch.testing.assert_close(one, loss(log_q_mode="source"))
    assert (loss(log_q_mode="mixture", log_q_global=wide) - loss(log_q_mode="mixture")).abs() > 1e-3


@pytest.mark.parametrize("mode", ["all", "source", "mixture"])
@pytest.mark.parametrize("hard_k", [None, 4])
def test_negatives_drop_the_other_source(mode, hard_k):
    """negatives='in-batch' / 'global' equal the mixed loss with the other source's columns left out and every
    hard negative taken from the kept source, whatever global_share says."""
    rows = with_pool(make_rows(14), 14)
    r = rows["query"].shape[0]
    kw = dict(temperature=0.05, log_q_mode=mode, hard_k=hard_k, chunk_rows=5)
    none, every = torch.arange(0), torch.arange(r)
    for negatives, cols, share in (("in-batch", (none, every), 0.0), ("global", (every, none), 1.0)):
        dropped = sampled_softmax_loss(**rows, **kw, negatives=negatives, global_share=0.5)
        torch.testing.assert_close(dropped, sampled_softmax_loss(**rows, **kw, columns=cols, global_share=share))
        assert (dropped - sampled_softmax_loss(**rows, **kw)).abs() > 1e-3


@pytest.mark.parametrize("mode", ["source", "mixture"])
@pytest.mark.parametrize("negatives", ["mixed", "global"])
@pytest.mark.parametrize("hard_k", [None, 6])
def test_log_q_modes_across_ranks(mode, negatives, hard_k):
    """Each rank's rows against every rank's columns: the weighted sum equals one process and the oracle."""
    rows = with_pool(make_rows(15, num_seqs=7), 15)
    r = rows["query"].shape[0]
    cut = int((rows["row_seq"] < 3).sum())
    cols = candidate_columns(r, 2 * r - 5, torch.device("cpu"), torch.Generator().manual_seed(2))
    kw = dict(temperature=0.05, hard_k=hard_k, columns=cols, log_q_mode=mode, negatives=negatives)
    single = sampled_softmax_loss(**rows, **kw)
    gathered = tuple(rows[k] for k in ("pos", "pos_ids", "row_seq", "neg", "neg_ids"))
    local = lambda sl: {k: v[sl] if k not in ("log_q", "log_q_global") else v for k, v in rows.items()}  # noqa: E731
    parts = [(fn(**local(sl), **kw, gathered=gathered) * (sl.stop - sl.start) / r)
             for sl in (slice(0, cut), slice(cut, r)) for fn in (sampled_softmax_loss, sampled_softmax_loss_reference)]
    split, split_ref = parts[0] + parts[2], parts[1] + parts[3]
    torch.testing.assert_close(split, single)
    torch.testing.assert_close(split_ref, single)
    inputs = [rows["query"], rows["pos"], rows["neg"]]
    for a, b in zip(torch.autograd.grad(split, inputs), torch.autograd.grad(single, inputs)):
        torch.testing.assert_close(a, b)


def test_corrected_negatives_estimate_the_full_softmax_normaliser():
    """What the corrections are for. One row (positive a) against n_g global columns drawn uniformly from a pool
    and n_b in-batch columns drawn from q_b (the positives of other one-row sequences, the row's own column
    left out): Ẑ = Σ_columns exp(logit) = exp(s_a)·(exp(loss) - 1). With 'mixture', E[Ẑ] is the full softmax's
    Σ_{j ≠ a} exp(s_j) (full_softmax_loss gives it); with 'source', (n_g·Σ_{pool} + n_b·Σ_{all}) / N, which equals
    it only when the pool is the whole catalogue."""
    m, n_g, n_b, trials, a = 12, 5, 6, 800, 3
    g = torch.Generator().manual_seed(3)
    items = F.normalize(torch.randn(m + 1, D, generator=g, dtype=torch.float64), dim=-1)
    query = F.normalize(torch.randn(1, D, generator=g, dtype=torch.float64), dim=-1)
    counts = torch.randint(1, 50, (m + 1,), generator=g).double()
    counts[0] = 0
    log_q = torch.log(counts / counts.sum()).clamp(min=-50)  # the in-batch sampler; item 0 is never drawn
    expo = torch.exp(query[0] @ items.T)  # (m+1,) exp(s_j), temperature 1
    z_all = expo[1:].sum() - expo[a]
    cols = (torch.arange(n_g), torch.arange(1, n_b + 1))  # the row's own in-batch column (0) is left out
    full = full_softmax_loss(query, torch.tensor([a]), items, torch.tensor([0]), temperature=1.0)
    z_full = expo[a] * torch.expm1(full)
    torch.testing.assert_close(z_full, z_all)
    for pool_size in (8, m):
        pool = torch.arange(1, pool_size + 1)
        z_pool = expo[pool].sum() - (expo[a] if a <= pool_size else 0)
        lg = log_q_uniform(pool, m + 1).double()
        for mode, expect in (("mixture", z_all), ("source", (n_g * z_pool + n_b * z_all) / (n_g + n_b))):
            est = []
            for _ in range(trials):
                g_ids = pool[torch.randint(0, pool_size, (n_g,), generator=g)]
                b_ids = torch.multinomial(counts, n_b, replacement=True, generator=g)
                all_ids = torch.cat([torch.tensor([a]), b_ids])
                gathered = (items[all_ids], all_ids, torch.arange(n_b + 1), items[g_ids], g_ids)
                loss = sampled_softmax_loss(query, items[[a]], torch.tensor([a]), torch.tensor([0]), items[g_ids],
                                            g_ids, log_q, temperature=1.0, columns=cols,
                                            gathered=gathered, log_q_mode=mode, log_q_global=lg)
                est.append(expo[a] * torch.expm1(loss))
            est = torch.stack(est)
            mean, se = est.mean(), est.std() / trials ** 0.5
            assert abs(mean - expect) < 4 * se, (mode, pool_size, float(mean), float(expect), float(se))
            if mode == "source" and pool_size < m:  # the test can tell: the bias is many standard errors
                assert abs(mean - z_all) > 4 * se


@pytest.mark.filterwarnings("ignore:Anomaly Detection")
def test_padding_column_correction_stays_finite():
    """A padding global column has no pool probability (-inf log q): its correction is set to 0, so no inf enters
    the matmul and no NaN any backward step (anomaly mode checks each one), though the column is masked anyway."""
    rows = with_pool(make_rows(17), 17)
    assert rows["neg_ids"][1] == 0 and rows["log_q_global"][0] == -np.inf
    with torch.autograd.detect_anomaly():
        for chunk_rows in (4, 2048):
            value_and_grads(sampled_softmax_loss, rows, log_q_mode="source", chunk_rows=chunk_rows)


def test_log_q_option_errors():
    rows = make_rows(16)
    with pytest.raises(ValueError, match="log_q_mode"):
        sampled_softmax_loss(**rows, log_q_mode="pool")
    with pytest.raises(ValueError, match="negatives"):
        sampled_softmax_loss(**rows, negatives="random")
    for mode in ("source", "mixture"):
        with pytest.raises(ValueError, match="log_q_global"):
            sampled_softmax_loss(**rows, log_q_mode=mode)
        sampled_softmax_loss(**rows, log_q_mode=mode, negatives="in-batch")  # no global columns: not needed


def test_log_q_uniform():
    lg = log_q_uniform(np.array([3, 1, 4]), 6)
    assert lg.dtype == torch.float32
    torch.testing.assert_close(lg, torch.tensor([-np.inf, -np.log(3), -np.inf, -np.log(3), -np.log(3), -np.inf],
                                                dtype=torch.float32))
    torch.testing.assert_close(log_q_uniform(torch.tensor([2, 2, 1]), 4)[1:3], torch.full((2,), -float(np.log(2))))
    for bad in (np.array([], np.int64), np.array([1, 6]), np.array([-1, 2])):
        with pytest.raises(ValueError, match="pool"):
            log_q_uniform(bad, 6)


# ---- full-catalogue softmax ---------------------------------------------------------------------------------------

def make_full(seed: int, id_range: int = ITEMNUM, dtype=torch.float64):
    rows = make_rows(seed, id_range=id_range, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 100)
    items = F.normalize(torch.randn(ITEMNUM + 1, D, generator=g, dtype=dtype), dim=-1).requires_grad_()
    return dict(query=rows["query"], pos_ids=rows["pos_ids"], item_vectors=items, row_seq=rows["row_seq"])


def full_value_and_grads(fn, rows, **kw):
    for k in ("query", "item_vectors"):
        rows[k].grad = None
    loss = fn(**rows, **kw)
    loss.backward()
    return loss.detach(), [rows[k].grad.clone() for k in ("query", "item_vectors")]


@pytest.mark.parametrize("mask_seq_positives", [True, False])
@pytest.mark.parametrize("chunk_rows", [1, 4, None])
def test_full_softmax_matches_reference(mask_seq_positives, chunk_rows):
    for seed, id_range in ((20, ITEMNUM), (21, 5)):  # id_range 5: a sequence has the same item at several rows
        rows = make_full(seed, id_range)
        kw = dict(temperature=0.05, mask_seq_positives=mask_seq_positives, chunk_rows=chunk_rows)
        v1, g1 = full_value_and_grads(full_softmax_loss, rows, **kw)
        v2, g2 = full_value_and_grads(full_softmax_loss_reference, rows, **kw)
        torch.testing.assert_close(v1, v2, rtol=1e-10, atol=1e-10)
        for a, b, name in zip(g1, g2, ("query", "item_vectors")):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)
        assert g1[1][0].abs().max() == 0  # padding gets no gradient
        assert torch.isfinite(v1) and v1 > 0


@pytest.mark.parametrize("chunk_rows", [4, None])
def test_full_softmax_under_bf16_autocast_is_the_fp32_loss_to_bf16_precision(chunk_rows):
    """Under CPU autocast the logits matmul runs in bf16 (the fast path on AVX512-BF16) and everything after it
    in fp32: value and gradients agree with the float64 reference to bf16's precision, and do differ from it
    (the matmul did run in bf16)."""
    rows = make_full(25, dtype=torch.float32)
    kw = dict(temperature=0.05, chunk_rows=chunk_rows)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v1, g1 = full_value_and_grads(full_softmax_loss, rows, **kw)
    assert v1.dtype == torch.float32
    ref = {k: v.detach().double().requires_grad_() if torch.is_floating_point(v) else v for k, v in rows.items()}
    v2, g2 = full_value_and_grads(full_softmax_loss_reference, ref, **kw)
    torch.testing.assert_close(v1.double(), v2, rtol=1e-2, atol=0)
    assert (v1.double() - v2).abs() > 1e-5 * v2  # bf16 is ~1e-4 off here; fp32 would agree to ~1e-7
    for a, b, name in zip(g1, g2, ("query", "item_vectors")):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=0.03 * b.abs().max().item(), msg=name)
    assert g1[1][0].abs().max() == 0  # padding gets no gradient


def test_full_softmax_refuses_a_second_backward_through_one_graph():
    """The fused backward turns the saved softmax into the gradient in place: a second pass through the same graph
    (retain_graph) must fail loudly, not return a wrong gradient."""
    rows = make_full(27)
    loss = full_softmax_loss(**rows, temperature=0.05)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_full_softmax_is_cross_entropy_without_mask():
    rows = make_full(22)
    logits = rows["query"] @ rows["item_vectors"][1:].T / 0.05  # (R, M): items 1..M
    expect = F.cross_entropy(logits, rows["pos_ids"] - 1)
    got = full_softmax_loss(**rows, temperature=0.05, mask_seq_positives=False, chunk_rows=3)
    torch.testing.assert_close(got, expect)
    inputs = [rows["query"], rows["item_vectors"]]
    for a, b in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(expect, inputs)):
        torch.testing.assert_close(a, b)
    # masking the sequences' other positives removes negatives: a lower loss, other than plain CE
    masked = full_softmax_loss(**rows, temperature=0.05, chunk_rows=3)
    assert masked < got - 1e-3


def test_full_softmax_equals_sampled_over_the_whole_catalogue():
    """Global columns = every item once, no in-batch columns, no correction: the sampled loss is the full one."""
    rows = make_full(23, id_range=8)
    v, q, pid, seq = rows["item_vectors"], rows["query"], rows["pos_ids"], rows["row_seq"]
    all_ids = torch.arange(1, ITEMNUM + 1)
    lq = torch.zeros(ITEMNUM + 1, dtype=torch.float64)
    for hard_k in (None, 10_000):
        sampled = sampled_softmax_loss(q, v[pid], pid, seq, v[pid], pid, lq, temperature=0.05, chunk_rows=4,
                                       hard_k=hard_k, gathered=(v[pid], pid, seq, v[all_ids], all_ids),
                                       negatives="global", log_q_mode="none")
        full = full_softmax_loss(q, pid, v, seq, temperature=0.05, chunk_rows=4)
        torch.testing.assert_close(sampled, full)
        for a, b in zip(torch.autograd.grad(sampled, [q, v]), torch.autograd.grad(full, [q, v])):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mask_seq_positives", [True, False])
def test_full_softmax_padding_is_no_negative(mask_seq_positives):
    rows = make_full(24, id_range=6)
    kw = dict(temperature=0.05, chunk_rows=5, mask_seq_positives=mask_seq_positives)
    base = full_softmax_loss(**rows, **kw)
    with torch.no_grad():  # cos = 1 with row 0's query: it would be row 0's hardest negative if it were one
        rows["item_vectors"][0] = rows["query"][0]
    torch.testing.assert_close(full_softmax_loss(**rows, **kw), base, rtol=0, atol=0)
    with torch.no_grad():  # control: the same change on an item no sequence has as a positive
        other = next(i for i in range(1, ITEMNUM + 1) if i not in rows["pos_ids"].tolist())
        rows["item_vectors"][other] = rows["query"][0]
    assert (full_softmax_loss(**rows, **kw) - base).abs() > 1e-3


def test_full_softmax_backward_keeps_no_full_logit_matrix():
    g, r, m = torch.Generator().manual_seed(25), 400, 2000
    def unit(n):
        return F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=-1).requires_grad_()

    rows = dict(query=unit(r), pos_ids=torch.randint(1, m + 1, (r,), generator=g), item_vectors=unit(m + 1),
                row_seq=torch.arange(r) // 8)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    full = r * (m + 1) * 8  # bytes of the (R, M+1) float64 logits
    for chunk_rows, small in ((16, True), (10_000, False)):
        storages.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = full_softmax_loss(**rows, chunk_rows=chunk_rows)
        loss.backward()
        assert (sum(storages.values()) < full / 4) == small


def test_full_softmax_fp32_under_autocast_and_empty():
    rows = make_full(26, dtype=torch.float32)
    ref = full_softmax_loss(**rows, chunk_rows=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        args = {k: (v.detach().to(torch.bfloat16) if k in ("query", "item_vectors") else v) for k, v in rows.items()}
        out = full_softmax_loss(**args, chunk_rows=4)
    assert out.dtype == torch.float32 and abs(out.item() - ref.item()) < 0.1 * abs(ref.item())
    empty = {**rows, "query": rows["query"][:0], "pos_ids": rows["pos_ids"][:0], "row_seq": rows["row_seq"][:0]}
    out = full_softmax_loss(**empty)
    out.backward()
    assert out.item() == 0.0
    with pytest.raises(ValueError, match="row_seq"):
        full_softmax_loss(**{**rows, "row_seq": None})
    full_softmax_loss(**{**rows, "row_seq": None}, mask_seq_positives=False)


def test_full_softmax_fits_rule():
    assert full_softmax_fits(3706, 64 * 200)  # MovieLens-1M at batch 64, maxlen 200: 3.7k items vs 25.6k columns
    assert full_softmax_fits(3706, 64 * 200, num_columns=2048)  # ... and against --max-candidates 2048 (x2)
    assert not full_softmax_fits(17_500_000, 232 * 102)  # the competition's catalogue
    assert full_softmax_fits(4000, 1000) and not full_softmax_fits(4001, 1000)  # C = 2R, factor 2
    assert full_softmax_fits(2000, 1000, factor=1.0) and not full_softmax_fits(2001, 1000, factor=1.0)
    assert full_softmax_fits(1000, 10**6, num_columns=500) and not full_softmax_fits(1001, 10**6, num_columns=500)
    assert not full_softmax_fits(4001, 1000, num_columns=10**6)  # more candidates than 2R: all 2R columns
    with pytest.raises(ValueError):
        full_softmax_fits(0, 10)
