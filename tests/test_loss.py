import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loss import (candidate_columns, curriculum, log_q_from_counts, parse_curriculum, sampled_softmax_loss,  # noqa: E402
                  sampled_softmax_loss_reference)

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
    return loss.detach(), [rows[k].grad.clone() for k in ("query", "pos", "neg")]


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
