import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loss import log_q_from_counts, sampled_softmax_loss  # noqa: E402
from model import (PRESETS, HSTULayer, HSTUModel, ItemTower, ModelConfig, hstu_layer_reference,  # noqa: E402
                   param_groups, time_buckets)

# fids are deliberately not the real ones (except the excluded 111) so nothing relies on hard-coded ids
SCHEMA = {"item_sparse": {"100": 7, "111": 5, "90": 9},
          "user_sparse": {"3": 4, "1": 6},
          "user_array": {"8": 10}}
ITEMNUM = 40
DAY = 86400
BATCH_KEYS = {"seq_item", "seq_type", "seq_feat", "seq_action", "seq_ts", "next_item", "next_feat", "next_action",
              "next_ts", "neg_item", "neg_feat", "user_sparse", "user_array"}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_batch(schema: dict, itemnum: int, batch: int, n: int, seed: int = 0, min_len: int = 2,
               array_len: int = 3) -> dict[str, torch.Tensor]:
    """Random batch with exactly the collate keys of the spec: left-padded, user token first."""
    g = torch.Generator().manual_seed(seed)
    fi, us, ua = (len(schema[k]) for k in ("item_sparse", "user_sparse", "user_array"))
    item_vocab = [schema["item_sparse"][f] for f in sorted(schema["item_sparse"])]
    # a fixed feature table so an item's features are a function of its id (like item_feat.npy)
    table = torch.stack([torch.randint(0, v, (itemnum + 1,), generator=g) for v in item_vocab], 1)  # (I+1, Fi)
    table[0] = 0

    def z(*shape):
        return torch.zeros(*shape, dtype=torch.long)

    b = {k: z(batch, n) for k in ("seq_item", "seq_type", "seq_action", "seq_ts", "next_item", "next_action",
                                  "next_ts", "neg_item")}
    for u in range(batch):
        length = int(torch.randint(min_len, n + 1, (1,), generator=g))  # tokens incl. the user token
        s = n - length
        items = torch.randint(1, itemnum + 1, (length - 1,), generator=g)
        ts = 1_700_000_000 + torch.cumsum(torch.randint(0, 3 * DAY, (length - 1,), generator=g), 0)
        b["seq_type"][u, s] = 2
        b["seq_type"][u, s + 1:] = 1
        b["seq_item"][u, s + 1:] = items
        b["seq_action"][u, s + 1:] = torch.randint(1, 4, (length - 1,), generator=g)
        b["seq_ts"][u, s + 1:] = ts
        b["seq_ts"][u, s] = ts[0]
        b["next_item"][u, s:n - 1] = items
        b["next_action"][u, s:n - 1] = b["seq_action"][u, s + 1:]
        b["next_ts"][u, s:n - 1] = ts
        b["next_ts"][u, n - 1] = ts[-1]
        b["neg_item"][u, s:n - 1] = torch.randint(1, itemnum + 1, (length - 1,), generator=g)
    b["seq_feat"], b["next_feat"], b["neg_feat"] = (table[b[k]] for k in ("seq_item", "next_item", "neg_item"))
    user_vocab = [schema["user_sparse"][f] for f in sorted(schema["user_sparse"])]
    b["user_sparse"] = torch.stack([torch.randint(1, v, (batch,), generator=g) for v in user_vocab], 1)
    arr_vocab = [schema["user_array"][f] for f in sorted(schema["user_array"])]
    arr = torch.stack([torch.randint(1, v, (batch, array_len), generator=g) for v in arr_vocab], 1)  # (B, Ua, A)
    keep = torch.arange(array_len)[None, None] < torch.randint(1, array_len + 1, (batch, ua, 1), generator=g)
    b["user_array"] = arr * keep  # right-padded with 0
    assert set(b) == BATCH_KEYS and b["seq_feat"].shape == (batch, n, fi) and b["user_sparse"].shape == (batch, us)
    return b


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(id_dim=8, feat_dim=4, hidden=16, num_layers=2, num_heads=2, maxlen=15, emb_dropout=0.0,
                dropout=0.0, num_time_buckets=16)
    base.update(kw)
    return ModelConfig(**base)


def batch_loss(model: HSTUModel, batch: dict, log_q: torch.Tensor, **kw) -> torch.Tensor:
    target = batch["next_item"] > 0  # (B, N)
    out = model(batch)  # (B, N, D)
    row_seq = torch.arange(target.shape[0])[:, None].expand_as(target)[target]
    pos = model.item_vectors(batch["next_item"][target], batch["next_feat"][target])
    neg = model.item_vectors(batch["neg_item"][target], batch["neg_feat"][target])
    return sampled_softmax_loss(out[target], pos, batch["next_item"][target], row_seq, neg,
                                batch["neg_item"][target], log_q, **kw)


def randomise(module: torch.nn.Module, seed: int) -> None:
    # zero-initialised tables (rab, FiLM) and unit norms would hide bugs: give every parameter a value
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


@pytest.mark.parametrize("rel_pos, attn_norm, query_times, linear_dim", [
    (True, "n", False, 0), (False, "n", False, 0), (True, "valid", False, 0), (True, "n", True, 0),
    (True, "n", False, 6)])  # U and V wider than Q and K (dv 6, dh 4)
def test_hstu_layer_fast_path_matches_loop_reference(rel_pos, attn_norm, query_times, linear_dim):
    torch.manual_seed(0)
    cfg = tiny_cfg(hidden=8, maxlen=6, num_time_buckets=8, rel_pos_bias=rel_pos, attn_norm=attn_norm,
                   linear_dim=linear_dim)
    layer = HSTULayer(cfg).double()
    randomise(layer, 1)
    b, n = 3, 6  # narrower than N = 7: a batch may carry fewer positions
    x = torch.randn(b, n, cfg.hidden, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(b, n) < 0.7
    mask[:, -1] = True
    ts = torch.randint(0, 60 * DAY, (b, n))  # spans more than the 30-day range of the buckets
    ts[0, :3] = 1000  # equal times -> bucket 0
    assert time_buckets(ts, 8, 30 * DAY).unique().numel() >= 4
    # the queries' own times, or later ones (the time of the item each predicts, as rab_time "target" passes)
    qts = ts + torch.randint(0, 5 * DAY, (b, n)) if query_times else None
    buckets = time_buckets(ts, 8, 30 * DAY, qts) if query_times else None
    grad_out = torch.randn(b, n, cfg.hidden, dtype=torch.float64)
    results = []
    for fn in (lambda: layer(x, mask, ts, buckets), lambda: hstu_layer_reference(layer, x, mask, ts, qts)):
        layer.zero_grad()
        x.grad = None
        y = fn()
        (y * grad_out).sum().backward()
        results.append((y.detach(), x.grad.clone(), {k: p.grad.clone() for k, p in layer.named_parameters()}))
    (y1, gx1, gp1), (y2, gx2, gp2) = results
    torch.testing.assert_close(y1, y2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx1, gx2, rtol=1e-10, atol=1e-10)
    for k in gp1:
        torch.testing.assert_close(gp1[k], gp2[k], rtol=1e-10, atol=1e-10, msg=k)
    assert gp1["ts_bias.weight"].abs().sum() > 0  # the time bias really takes part


@pytest.mark.skipif(not torch.cuda.is_available() and shutil.which("c++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_hstu_layer_matches_reference():
    """The fused path (torch.compile of the layer, as --compile runs it) against the loop reference, forward
    and backward; on CUDA under bf16 autocast, within bf16 tolerance."""
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = tiny_cfg(hidden=32, maxlen=15, num_time_buckets=8)
    layer = HSTULayer(cfg).to(device)
    randomise(layer, 1)
    x = torch.randn(3, 16, cfg.hidden, device=device, requires_grad=True)
    mask = torch.rand(3, 16, device=device) < 0.8
    mask[:, -1] = True
    ts = torch.randint(0, 60 * DAY, (3, 16), device=device)
    grad_out = torch.randn(3, 16, cfg.hidden, device=device)
    compiled = torch.compile(layer, dynamic=False)
    tol = dict(rtol=2e-2, atol=2e-2) if device.type == "cuda" else dict(rtol=1e-4, atol=1e-5)
    results = []
    for fn in (lambda: compiled(x, mask, ts), lambda: hstu_layer_reference(layer, x, mask, ts)):
        layer.zero_grad()
        x.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and len(results) == 0):
            y = fn()
        (y.float() * grad_out).sum().backward()
        results.append((y.detach().float(), x.grad.clone(), {k: p.grad.clone() for k, p in layer.named_parameters()}))
    (y1, gx1, gp1), (y2, gx2, gp2) = results
    torch.testing.assert_close(y1, y2, **tol)
    torch.testing.assert_close(gx1, gx2, **tol)
    for k in gp1:
        torch.testing.assert_close(gp1[k], gp2[k], **tol, msg=k)


def test_time_buckets():
    ts = torch.tensor([[0, 1, 60, 3600, DAY, 29 * DAY, 30 * DAY, 400 * DAY]])
    bk = time_buckets(ts, 64, 30 * DAY)[0, 0]
    assert bk[0] == 0 and bk[-2] == 63 and bk[-1] == 63 and bk[-3] < 63
    assert (bk.diff() >= 0).all() and bk.unique().numel() == len(bk) - 1
    assert (time_buckets(ts, 64, 30 * DAY) == time_buckets(ts, 64, 30 * DAY).transpose(1, 2)).all()


@pytest.mark.parametrize("kind", ["hstu", "sasrec"])
def test_causality(kind):
    torch.manual_seed(0)
    cfg = tiny_cfg(model=kind)
    model = HSTUModel(cfg, SCHEMA, ITEMNUM).eval()
    randomise(model, 2)
    batch = make_batch(SCHEMA, ITEMNUM, 4, cfg.num_positions, min_len=6)
    t = cfg.num_positions - 3  # an item token in every row
    changed = {k: v.clone() for k, v in batch.items()}
    changed["seq_item"][:, t] = changed["seq_item"][:, t] % ITEMNUM + 1
    changed["seq_feat"][:, t] = (changed["seq_feat"][:, t] + 1) % 5
    changed["seq_action"][:, t] = changed["seq_action"][:, t] % 3 + 1
    changed["seq_ts"][:, t] += 7 * DAY
    changed["next_action"][:, t] = changed["next_action"][:, t] % 3 + 1
    with torch.no_grad():
        a, b = model(batch), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert (a[:, t:] - b[:, t:]).abs().amax() > 1e-3  # the change did reach later positions


@pytest.mark.parametrize("kind", ["hstu", "sasrec"])
def test_padding_invariance(kind):
    torch.manual_seed(0)
    cfg = tiny_cfg(model=kind)
    model = HSTUModel(cfg, SCHEMA, ITEMNUM).eval()
    randomise(model, 3)
    batch = make_batch(SCHEMA, ITEMNUM, 5, 10, seed=1)  # width 10 < N = 16
    valid = batch["seq_type"] > 0
    assert (~valid).any()
    with torch.no_grad():
        ref = model(batch)
        # garbage in padded tokens (their type stays 0 = padding)
        junk = {k: v.clone() for k, v in batch.items()}
        pad = ~valid
        g = torch.Generator().manual_seed(5)
        junk["seq_item"][pad] = torch.randint(1, ITEMNUM + 1, (int(pad.sum()),), generator=g)
        junk["seq_feat"][pad] = torch.randint(1, 5, (int(pad.sum()), 3), generator=g)
        junk["seq_action"][pad] = 3
        junk["next_action"][pad] = 2
        junk["seq_ts"][pad] = torch.randint(0, 2_000_000_000, (int(pad.sum()),), generator=g)
        out = model(junk)
        torch.testing.assert_close(out[valid], ref[valid], rtol=0, atol=1e-6)
        # more left padding: same valid tokens at the right end of a wider batch
        extra = 6
        wide = {k: (torch.cat([torch.zeros_like(v[:, :extra]), v], 1) if k.startswith(("seq_", "next_", "neg_"))
                    else v) for k, v in batch.items()}
        out = model(wide)[:, extra:]
        torch.testing.assert_close(out[valid], ref[valid], rtol=0, atol=1e-6)


def test_forward_and_vectors_on_spec_batch():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = HSTUModel(cfg, SCHEMA, ITEMNUM).eval()
    batch = make_batch(SCHEMA, ITEMNUM, 6, cfg.num_positions)
    assert set(batch) == BATCH_KEYS
    with torch.no_grad():
        out = model(batch)
        assert out.shape == (6, cfg.num_positions, cfg.hidden) and torch.isfinite(out).all()
        valid = batch["seq_type"] > 0
        torch.testing.assert_close(out[valid].norm(dim=-1), torch.ones(int(valid.sum())))
        # an eval batch has only seq_*, user_* and next_action
        eval_batch = {k: v for k, v in batch.items() if k.startswith(("seq_", "user_")) or k == "next_action"}
        torch.testing.assert_close(model.user_vectors(eval_batch), out[:, -1])
        # the condition at the last position steers the user vector
        cond = {**eval_batch, "next_action": eval_batch["next_action"].clone()}
        cond["next_action"][:, -1] = 3
        assert (model.user_vectors(cond) - out[:, -1]).abs().amax() > 1e-4
        iv = model.item_vectors(batch["next_item"], batch["next_feat"])  # (B, N, D)
        assert iv.shape == out.shape
        torch.testing.assert_close(iv.norm(dim=-1), torch.ones(iv.shape[:2]))
    with pytest.raises(ValueError):
        model(make_batch(SCHEMA, ITEMNUM, 2, cfg.num_positions + 1))


def test_item_tower_drops_excluded_columns_and_takes_dense_inputs():
    torch.manual_seed(0)
    cfg = tiny_cfg(mm_dims=(5, 3))
    tower = ItemTower(cfg, SCHEMA, ITEMNUM).eval()
    assert tower.feat_fids == ["90", "100"]  # sorted numerically like get_stat.py, minus "111"
    ids = torch.randint(1, ITEMNUM + 1, (4, 7))
    feats = torch.randint(1, 5, (4, 7, 3))
    mm = [torch.randn(4, 7, 5), torch.randn(4, 7, 3)]
    with torch.no_grad():
        v = tower(ids, feats, mm)
        assert v.shape == (4, 7, cfg.hidden)
        f2 = feats.clone()
        f2[..., 2] = 4  # column of fid "111": ignored
        torch.testing.assert_close(tower(ids, f2, mm), v)
        f2[..., 0] = (f2[..., 0] + 1) % 9  # fid "90": used
        assert (tower(ids, f2, mm) - v).abs().amax() > 1e-5
        assert (tower(ids, feats, [mm[0], mm[1] + 1]) - v).abs().amax() > 1e-5
    with pytest.raises(ValueError):
        tower(ids, feats)  # dense inputs configured but missing


def test_param_groups_cover_every_parameter_once():
    model = HSTUModel(tiny_cfg(), SCHEMA, ITEMNUM)
    groups = param_groups(model, lr=1e-3, weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    by_name = {g["name"]: g for g in groups}
    where = {id(p): g["name"] for g in groups for p in g["params"]}
    assert by_name["embedding"]["lr"] == 5e-4 and by_name["embedding"]["weight_decay"] == 0.0
    assert by_name["no_decay"]["lr"] == 1e-3 and by_name["no_decay"]["weight_decay"] == 0.0
    assert by_name["decay"]["lr"] == 1e-3 and by_name["decay"]["weight_decay"] == 0.1
    for name, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            expect = ("embedding" if isinstance(mod, torch.nn.Embedding) else
                      "no_decay" if isinstance(mod, torch.nn.LayerNorm) or pname == "bias" else "decay")
            assert where[id(p)] == expect, f"{name}.{pname}"
    assert where[id(model.item_tower.id_emb.weight)] == "embedding"
    assert where[id(model.layers[0].ts_bias.weight)] == "embedding"
    assert where[id(model.layers[0].uvqk.weight)] == "decay"
    torch.optim.AdamW(groups)


def test_one_batch_overfits():
    torch.manual_seed(0)
    cfg = tiny_cfg(hidden=32, id_dim=16, feat_dim=8)
    model = HSTUModel(cfg, SCHEMA, ITEMNUM)
    batch = make_batch(SCHEMA, ITEMNUM, 8, cfg.num_positions, seed=3, min_len=8)
    log_q = log_q_from_counts(torch.bincount(batch["next_item"].flatten(), minlength=ITEMNUM + 1))
    opt = torch.optim.AdamW(param_groups(model, 3e-3, 0.0))
    losses = []
    for _ in range(100):
        loss = batch_loss(model, batch, log_q, temperature=0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])


def test_presets():
    small = PRESETS["small"]
    assert (small.hidden, small.num_layers, small.maxlen) == (64, 2, 50)
    ref = PRESETS["reference"]
    assert (ref.hidden, ref.num_layers, ref.num_heads, ref.num_positions, ref.exclude_item_feats) == (
        512, 16, 8, 102, ("111",))
    assert ModelConfig.from_dict(ref.to_dict()) == ref
    assert ModelConfig.from_dict({**small.to_dict(), "exclude_item_feats": ["111"], "mm_dims": [32]}).mm_dims == (32,)
    with pytest.raises(ValueError):
        ModelConfig(hidden=10, num_heads=3)
    with pytest.raises(ValueError):
        ModelConfig.from_dict({"nope": 1})
    model = HSTUModel(small, SCHEMA, ITEMNUM)
    batch = make_batch(SCHEMA, ITEMNUM, 16, small.num_positions)
    loss = batch_loss(model, batch, torch.zeros(ITEMNUM + 1))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.layers.parameters())


def test_rab_time_target_reads_the_predicted_items_time():
    """rab_time 'target': the time bias takes each query's next_ts; 'input' ignores next_ts."""
    batch = make_batch(SCHEMA, ITEMNUM, 4, 10, seed=3)
    later = {**batch, "next_ts": batch["next_ts"] + 7 * DAY}
    for mode, moves in (("target", True), ("input", False)):
        torch.manual_seed(0)
        model = HSTUModel(tiny_cfg(rab_time=mode), SCHEMA, ITEMNUM).eval()
        randomise(model, 2)
        with torch.no_grad():
            diff = (model(batch) - model(later)).abs().amax()
        assert (diff > 1e-4) == moves, mode
