"""Memory plan of the reference configuration at the real data's sizes: peak GPU memory per stage of training,
validation and inference, and host memory of the data-loader workers, the training process and get_stat.py,
against 80, 96 and 141 GB cards.

    python bench/scale.py                                    # 17.5M items / 10M users and 4.8M / 1M, 1 and 8 ranks
    python bench/scale.py --sizes 17500000:10000000 --ranks 8 --vocab 121=3000000
    python bench/scale.py --sizes 200000:100000 --ranks 1 --act-batches 2 3 --no-checks --out bench/scale.tmp.md

Where each figure comes from:
- parameters: counted exactly, HSTUModel built on the meta device with the reference ModelConfig and the real
  feature list (DESIGN §3). Vocabulary sizes of the real data are unknown beyond the official 865-user sample
  (58,734 items): each item feature's sample vocabulary is scaled by (itemnum / 58,734)^g, g chosen so that fid
  121 (49,079 values in the sample, the largest) reaches 2M values at 17.5M items; --vocab FID=N overrides. User
  features keep the sample's vocabularies (profile categories; a few MB whatever they are).
- gradients fp32 (every parameter, the embedding tables' dense), AdamW exp_avg + exp_avg_sq fp32 (fused on CUDA:
  no temporaries), DDP buckets: DistributedDataParallel with the default gradient_as_bucket_view=False keeps a flat
  bucket copy of every gradient (the 9 GB id table in a bucket of its own), so 4 bytes a parameter more.
- activations: measured, not guessed: the real model (reference widths, small vocabularies, which change no
  activation) runs forward under CPU bf16 autocast on full sequences (every position valid, R = B·N target rows)
  at --act-batches sizes (>= 2: at B=1 a few ops save differently); torch.autograd.graph.saved_tensors_hooks
  adds up the bytes of every distinct storage saved for backward (parameters excluded, autocast's bf16 weight
  copies included), fitted as a + b·B. CUDA's autocast runs layer_norm in fp32 where the CPU's keeps bf16: that
  difference (norm_attn's output, fp32 instead of bf16, B·N·D·2 bytes a layer) is added from shapes.
- the loss (loss.sampled_softmax_loss, R = B·N local rows, C = 2·R over all ranks, chunks of loss.CHUNK_LOGITS
  logits): from shapes, see loss_bytes; the largest of the curriculum's hard_k (8192) is assumed.
- embedding backward: the item tower runs three times (sequence, positives, negatives), so each table's dense
  gradient arrives three times and is summed: one extra copy of the largest table exists for a moment.
- validation and inference: item vectors (itemnum, D) fp32, as train.all_item_vectors / infer.load_candidates
  build them today (a list of chunks, then torch.cat: twice the vectors), and streamed (one chunk at a time,
  merged into a running top-k).
- host: batch tensors from shapes (collate's int64 arrays), Python object costs measured here with tracemalloc.
Prints one markdown table per configuration and writes them to bench/scale_results.md (or --out).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import platform
import sys
import time
import tracemalloc
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common import atomic_write  # noqa: E402
from loss import CHUNK_LOGITS  # noqa: E402
from model import PRESETS, HSTUModel, ModelConfig  # noqa: E402

GiB = float(1 << 30)
# feature ids of the real data (DESIGN §3) with their vocabulary sizes (values + padding) in the official
# 865-user sample's indexer.pkl (58,734 items); 111 has one value per item and is not embedded (exclude_item_feats)
SAMPLE_ITEMS = 58_734
ITEM_SPARSE = {"100": 7, "101": 45, "102": 11_137, "111": 58_735, "112": 26, "114": 18, "115": 188, "116": 19,
               "117": 286, "118": 746, "119": 1_746, "120": 1_344, "121": 49_080, "122": 11_152}
USER_SPARSE = {"103": 68, "104": 3, "105": 8, "109": 4}
USER_ARRAY = {"106": 14, "107": 18, "108": 5, "110": 3}
USER_ARRAY_LEN = 32  # dataset.MAX_USER_ARRAY_LEN, the most an array feature keeps
FID121_AT_17_5M = 2_000_000
VOCAB_EXPONENT = math.log(FID121_AT_17_5M / ITEM_SPARSE["121"]) / math.log(17_500_000 / SAMPLE_ITEMS)
HARD_K_MAX = 8192  # the curriculum's largest top-k (loss.DEFAULT_CURRICULUM)
EVAL_CHUNK = 65536  # train.all_item_vectors / infer --set-chunk
CARDS = (80, 96, 141)  # nominal GB; usable = 0.99 x nominal GiB - 1 GiB (CUDA context, cuBLAS, NCCL buffers)


def usable_gib(card: int) -> float:
    return 0.99 * card - 1.0


def real_schema(itemnum: int, overrides: dict[str, int] | None = None) -> dict:
    """The real feature list with vocabularies sized to a catalogue of itemnum items (see the module docstring)."""
    scale = (itemnum / SAMPLE_ITEMS) ** VOCAB_EXPONENT
    item = {f: min(itemnum + 1, max(v, math.ceil(v * scale))) for f, v in ITEM_SPARSE.items()}
    item["111"] = itemnum + 1
    item.update({f: int(v) for f, v in (overrides or {}).items()})
    return {"item_sparse": item, "user_sparse": dict(USER_SPARSE), "user_array": dict(USER_ARRAY)}


def count_params(cfg: ModelConfig, schema: dict, itemnum: int) -> dict[str, int]:
    """Exact parameter counts of HSTUModel, built on the meta device (no memory) -> {group: count}, with
    'total', 'id_table' (rows x id_dim), 'largest_table' (parameters of the largest embedding) and 'dense'
    (everything but the item embedding tables)."""
    with torch.device("meta"):
        model = HSTUModel(cfg, schema, itemnum)
    it = model.item_tower
    groups = {"item id table": it.id_emb.weight.numel(),
              "item feature tables": sum(p.numel() for p in it.feat_emb.parameters()),
              "item tower MLP": sum(p.numel() for p in it.mlp.parameters()),
              "user tower": sum(p.numel() for p in model.user_tower.parameters()),
              "sequence layers": sum(p.numel() for p in model.layers.parameters())}
    total = sum(p.numel() for p in model.parameters())
    groups["other (token, position, time embeddings, final norm)"] = total - sum(groups.values())
    others = [m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding) and m is not it.id_emb]
    return {**groups, "total": total, "id_table": it.id_emb.weight.numel(),
            "largest_table": max(others + [it.id_emb.weight.numel()]), "largest_other_table": max(others, default=0),
            "dense": total - groups["item id table"] - groups["item feature tables"]}


# --------------------------------------------------------------------------- activations, measured

def small_vocab(schema: dict, cap: int = 1000) -> dict:
    """The same features with vocabularies capped: activations do not depend on vocabulary sizes."""
    return {k: {f: min(v, cap) for f, v in d.items()} for k, d in schema.items()}


def synthetic_batch(cfg: ModelConfig, schema: dict, itemnum: int, b: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A full batch (collate's keys): every position valid, token 0 the user, every position with a next item
    (R = B·N target rows, the most a batch can have), timestamps spread over 60 days."""
    g = torch.Generator().manual_seed(seed)
    n = cfg.num_positions
    fids = sorted(schema["item_sparse"], key=int)
    us, ua = sorted(schema["user_sparse"], key=int), sorted(schema["user_array"], key=int)

    def ints(hi: int, *shape: int) -> torch.Tensor:
        return torch.randint(1, max(hi, 2), shape, generator=g)

    def feats() -> torch.Tensor:
        return torch.stack([ints(schema["item_sparse"][f], b, n) for f in fids], -1)  # (B, N, F)

    seq_type = torch.ones(b, n, dtype=torch.long)
    seq_type[:, 0] = 2
    seq_item = ints(itemnum + 1, b, n)
    seq_item[:, 0] = 0
    gaps = torch.rand(b, n, generator=g) * (60 * 86400 / n)
    return {"seq_type": seq_type, "seq_item": seq_item, "seq_feat": feats(), "seq_action": ints(4, b, n),
            "seq_ts": (1_700_000_000 + gaps.cumsum(1)).long(), "next_item": ints(itemnum + 1, b, n),
            "next_feat": feats(), "next_action": ints(4, b, n), "neg_item": ints(itemnum + 1, b, n),
            "neg_feat": feats(),
            "user_sparse": torch.stack([ints(schema["user_sparse"][f], b) for f in us], -1),
            "user_array": torch.stack([ints(schema["user_array"][f], b, USER_ARRAY_LEN) for f in ua], 1)}


def train_forward(model: HSTUModel, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What train.train_loss runs before the loss: the sequence, then the positives' and negatives' vectors."""
    out = model(batch)  # (B, N, D)
    target = batch["next_item"] > 0
    pos = model.item_vectors(batch["next_item"][target], batch["next_feat"][target])  # (R, D)
    neg = model.item_vectors(batch["neg_item"][target], batch["neg_feat"][target])  # (R, D)
    return out, pos, neg


def saved_bytes(model: HSTUModel, batch: dict, amp: bool) -> dict[str, int]:
    """Bytes saved for backward by train_forward -> {"sequence": ..., "item vectors": ...}: every distinct storage
    once (views and tensors saved by several ops count once), parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, str]] = {}
    keep: list[torch.Tensor] = []  # holds every saved tensor, so no storage address is freed and reused meanwhile
    part = ["sequence"]

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = (s.nbytes(), part[0])
            keep.append(t)
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = model(batch)
        part[0] = "item vectors"
        target = batch["next_item"] > 0
        model.item_vectors(batch["next_item"][target], batch["next_feat"][target])
        model.item_vectors(batch["neg_item"][target], batch["neg_feat"][target])
    del out
    res = {"sequence": 0, "item vectors": 0}
    for nbytes, name in seen.values():
        res[name] += nbytes
    return res


def peak_bytes(prof) -> int:
    """Peak of the live allocations a torch.profiler run (profile_memory=True) recorded, in bytes."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def forward_peak_bytes(model: HSTUModel, batch: dict, amp: bool) -> int:
    """Directly measured: the peak of CPU allocator bytes live during train_forward (profiler memory events),
    above what was live when it started. An independent check of saved_bytes (which misses transients)."""
    from torch.profiler import ProfilerActivity, profile

    model.train()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            res = train_forward(model, batch)
    del res
    return peak_bytes(prof)


@dataclasses.dataclass
class ActFit:
    """Activation bytes a + b·B (per part), measured at `batches`; `points` keeps the raw measurements."""
    intercept: dict[str, float]
    slope: dict[str, float]
    points: dict[int, dict[str, int]]
    amp: bool
    peak: tuple[int, int] | None = None  # (B, allocator peak bytes of the forward at B), when measured

    def at(self, b: float) -> dict[str, float]:
        return {k: self.intercept[k] + self.slope[k] * b for k in self.slope}


def fit_activations(cfg: ModelConfig, schema: dict, batches: tuple[int, ...] = (1, 2), amp: bool = True,
                    itemnum: int = 1000, seed: int = 0) -> ActFit:
    """Measure saved bytes at each batch size (the model built once, small vocabularies) and fit a + b·B by
    least squares; with more than two sizes, the residuals show how linear it is."""
    torch.manual_seed(seed)
    schema = small_vocab(schema)
    model = HSTUModel(cfg, schema, itemnum)
    points = {b: saved_bytes(model, synthetic_batch(cfg, schema, itemnum, b, seed), amp) for b in batches}
    xs = list(points)
    mx = sum(xs) / len(xs)
    sxx = sum((x - mx) ** 2 for x in xs) or 1.0
    slope, intercept = {}, {}
    for k in points[xs[0]]:
        ys = [points[x][k] for x in xs]
        my = sum(ys) / len(ys)
        slope[k] = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
        intercept[k] = my - slope[k] * mx
    return ActFit(intercept, slope, points, amp)


def cuda_layernorm_extra(cfg: ModelConfig, b: float) -> float:
    """Bytes CUDA autocast adds over the CPU's: norm_attn's output in fp32 instead of bf16 in every HSTU layer."""
    return 2.0 * b * cfg.num_positions * cfg.hidden * cfg.num_layers if cfg.model == "hstu" else 0.0


# --------------------------------------------------------------------------- the loss, from shapes

def loss_bytes(rows: int, rows_all: int, dim: int, candidates: int | None = None, hard_k: int | None = HARD_K_MAX,
               chunk_logits: int = CHUNK_LOGITS) -> dict[str, float]:
    """Peak bytes of sampled_softmax_loss forward + backward for `rows` local target rows (R), `rows_all` over all
    ranks, candidates C = 2·rows_all (or `candidates`), fp32 logits -> {"inputs": ..., "chunk": ..., "total": ...}.
    inputs: the query rows' copy out[target] (R, D), pos and neg vectors (R, D) each and, with several ranks,
    their gathered copies (rows_all, D) each; cand (C, D+1) and its gradient, pos_aug (R, D+1) and its gradient;
    int64 ids (C + 3 R_all a few times). chunk (r = min(R, chunk rows) rows): forward keeps the logits (r, C) fp32,
    the mask (r, C) bool and logsumexp's (r, C) temporary; backward recomputes them and its logsumexp backward
    holds (x - lse), its exp and the product at once (C++ temporaries live to the end of the expression):
    (4 + 1 + 4 + 4 + 4) r·C bytes in all; hard negatives add top-k values and indices (12 bytes) and the kept
    terms (4 bytes) per row per k."""
    c = candidates or 2 * rows_all
    chunk_rows = max(256, chunk_logits // max(c, 1))
    r = min(rows, chunk_rows)
    inputs = (4 * rows * dim * 3 + (8 * rows_all * dim if rows_all > rows else 0)
              + 2 * 4 * c * (dim + 1) + 2 * 4 * rows * (dim + 1) + 3 * 8 * (c + 3 * rows_all))
    chunk = 17 * r * c + (16 * r * hard_k if hard_k else 0)
    return {"inputs": float(inputs), "chunk": float(chunk), "total": float(inputs + chunk), "chunk_rows": r}


def loss_peak_measured(rows: int, dim: int, chunk_rows: int | None = None, hard_k: int | None = None,
                       seed: int = 0) -> int:
    """Directly measured peak (profiler memory events) of one sampled_softmax_loss forward + backward on random
    inputs, above the inputs themselves (the R x D vectors are made before): a check of loss_bytes' chunk term."""
    from torch.profiler import ProfilerActivity, profile

    from loss import sampled_softmax_loss
    g = torch.Generator().manual_seed(seed)
    q, p, n = (torch.nn.functional.normalize(torch.randn(rows, dim, generator=g), dim=-1).requires_grad_()
               for _ in range(3))
    ids = torch.randint(1, 50 * rows, (rows,), generator=g)
    neg_ids = torch.randint(1, 50 * rows, (rows,), generator=g)
    row_seq = torch.arange(rows) // 50
    log_q = torch.zeros(50 * rows + 1)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = sampled_softmax_loss(q, p, ids, row_seq, n, neg_ids, log_q, hard_k=hard_k, chunk_rows=chunk_rows)
        loss.backward()
    return peak_bytes(prof)


# --------------------------------------------------------------------------- host: Python object costs, measured

def python_costs(n: int = 200_000) -> dict[str, float]:
    """Bytes per entry (tracemalloc) of what get_stat.py and the loaders hold as Python objects: indexer.pkl's
    dicts (raw user id str -> int, raw creative id -> int, raw feature value -> int) and offsets as a list of ints
    (seq_offsets.pkl is a pickled list; offsets of a 100-250 GB file exceed 2^30, so each is a 32-byte int)."""
    def per_entry(make) -> float:
        tracemalloc.start()
        obj = make()
        size = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del obj
        return size / n

    return {"user dict (str -> int)": per_entry(lambda: {f"user_{i:08d}": i + 1 for i in range(n)}),
            "item dict (int -> int)": per_entry(lambda: {20_000_000_000 + 7919 * i: i + 1 for i in range(n)}),
            "feature dict (int -> int)": per_entry(lambda: {1_210_000_000 + 7919 * i: i + 1 for i in range(n)}),
            "offsets list (ints)": per_entry(lambda: [100_000_000_000 + 2_000 * i for i in range(n)])}


def polars_user_bytes(n: int = 200_000) -> float:
    import polars as pl
    return pl.Series("u", [f"user_{i:08d}" for i in range(n)]).estimated_size() / n


# --------------------------------------------------------------------------- the plan

@dataclasses.dataclass
class Size:
    items: int
    users: int
    ranks: int
    batch: int = 232  # global batch (train.TRAIN_PRESETS["reference"])
    workers: int = 8  # data-loader workers a rank (train.py: min(CPUs - 1, 8))
    prefetch: int = 4  # train.py's prefetch_factor
    test_users: int | None = None  # predict_seq users (default: a tenth of the users)
    mm_dim: int = 0  # summed width of multimodal inputs (0: none)


def sample_bytes(cfg: ModelConfig, schema: dict, mm_dim: int = 0) -> int:
    """Bytes of one TrainDataset sample after collate: 7 (N,) int64 arrays, seq/next/neg features (N, F) int64,
    user features, and with multimodal inputs their float32 rows for seq, next and neg."""
    n, f = cfg.num_positions, len(schema["item_sparse"])
    return 8 * (7 * n + 3 * n * f + len(schema["user_sparse"]) + len(schema["user_array"]) * USER_ARRAY_LEN) \
        + 4 * 3 * n * mm_dim


def gpu_rows(cfg: ModelConfig, pc: dict, size: Size, fit: ActFit, planned: bool) -> list[tuple[str, float, float]]:
    """(stage, bytes it adds, peak bytes at that stage) on the busiest rank (rank 0, which also validates)."""
    w, d, n = size.ranks, cfg.hidden, cfg.num_positions
    b_local = size.batch / w
    p4 = 4.0 * pc["total"]
    act = sum(fit.at(b_local).values()) + cuda_layernorm_extra(cfg, b_local)
    loss = loss_bytes(int(b_local * n), size.batch * n, d)["total"]
    vec = 4.0 * size.items * d  # every item's vector, fp32
    chunk = 4.0 * EVAL_CHUNK * d + 4.0 * 256 * EVAL_CHUNK  # one chunk of vectors + a (256 users, chunk) score block
    test_users = size.test_users or size.users // 10
    users_vec = 4.0 * d * test_users / w + 12.0 * 10 * test_users / w  # user vectors + running top-10 (score, id)
    unique_rows = 3 * size.batch * n  # ids a step looks up, an upper bound on the unique rows
    rows: list[tuple[str, float]] = [("parameters, fp32", p4)]
    if not planned:
        rows += [("+ gradients, fp32, every table dense (alive through the next forward: zero_grad follows it)", p4),
                 ("+ AdamW exp_avg + exp_avg_sq, fp32", 2 * p4)]
        if w > 1:
            rows.append(("+ DDP gradient buckets (gradient_as_bucket_view=False: a flat copy of every gradient)", p4))
        transient = 4.0 * pc["largest_table"]
    else:
        g = 4.0 * (pc["total"] - pc["id_table"])
        rows += [("+ AdamW moments, fp32 (the id table's kept by the row-wise update)", 2 * p4),
                 ("+ gradients but the id table's; the step's unique id rows (U x D fp32, local + all-reduced)",
                  g + 2 * 4.0 * unique_rows * cfg.id_dim)]
        if w > 1:
            rows.append(("+ DDP gradient buckets, the id table left out of DDP", g))
        transient = 4.0 * pc["largest_other_table"]
    rows.append((f"+ activations, B={b_local:g} a rank x N={n}, bf16 autocast (measured)", act))
    rows.append(("+ the loss's chunk or a table's second dense gradient in backward, the larger", max(loss, transient)))
    out, peak = [], 0.0
    for name, add in rows:
        peak += add
        out.append((name, add, peak))
    out.append(("= training step peak", 0.0, peak))
    resident = sum(add for name, add in rows[:-2])  # training state that stays on the GPU while rank 0 validates
    if not planned:
        out.append(("validation today: training state + every item's vector fp32, chunks then torch.cat (x2)",
                    2 * vec + chunk, resident + 2 * vec + chunk))
        out.append(("inference today: parameters + every item's vector fp32 x2 (x3 if predict_set repeats ids)",
                    2 * vec + chunk, p4 + 2 * vec + chunk))
    out.append(("validation streamed: training state + one chunk of item vectors, running top-k", chunk,
                resident + chunk))
    out.append((f"inference streamed: parameters + {test_users / w:,.0f} user vectors + one chunk of item vectors",
                users_vec + chunk, p4 + users_vec + chunk))
    return out


def host_rows(cfg: ModelConfig, schema: dict, pc: dict, size: Size, costs: dict[str, float],
              user_str: float) -> list[tuple[str, float, str]]:
    """(what, bytes, note) of host memory: data-loader workers, the training process, get_stat.py."""
    w, items, users = size.ranks, size.items, size.users
    f = len(schema["item_sparse"])
    b_local = size.batch // w
    batch = b_local * sample_bytes(cfg, schema, size.mm_dim)
    in_flight = size.prefetch * batch
    node = w * size.workers * in_flight
    p4 = 4.0 * pc["total"]
    offsets = users * (costs["offsets list (ints)"] + 8)
    vocab = sum(v for k, v in schema["item_sparse"].items() if k != "111") + sum(schema["user_sparse"].values())
    indexer = (users * costs["user dict (str -> int)"] + items * costs["item dict (int -> int)"]
               + vocab * costs["feature dict (int -> int)"])
    per_item = 8.0 * 2 * (items + 1) + 2 * 4.0 * f * (items + 1) + 8.0 * (items + 1)
    per_user = 2 * 8.0 * users + users * costs["offsets list (ints)"] + 4.0 * users + 2 * users * user_str
    mm = f" and {size.mm_dim} multimodal floats x 3 a position" if size.mm_dim else ""
    return [
        (f"worker: one batch, B={b_local} a rank (collate's int64 arrays{mm})", batch,
         f"{sample_bytes(cfg, schema, size.mm_dim) / 1024:.1f} KiB a sequence"),
        (f"worker: batches in flight (prefetch_factor {size.prefetch}), in shared memory (/dev/shm)", in_flight,
         "plus the interpreter; arrays inherited by fork (offsets, lines, negative pool) stay shared"),
        (f"node: {w} rank(s) x {size.workers} workers in flight, in /dev/shm", node,
         "a container's /dev/shm must hold this (Docker's default is 64 MB)"),
        ("node, the same with one 1024-wide multimodal input (--mm-emb-id 82)",
         w * size.workers * size.prefetch * b_local * sample_bytes(cfg, schema, size.mm_dim + 1024),
         "seq, next and neg rows of float32 at every position"),
        ("item_feat.npy memmap, (itemnum+1) x F int32", 4.0 * (items + 1) * f,
         "page cache, shared by every worker and rank; read at random"),
        ("training process: seq_offsets.pkl as a Python list, then int64 (transient, every rank)", offsets,
         f"{costs['offsets list (ints)']:.0f} B an offset as a list (measured) + 8"),
        ("training process: per-item arrays (item_count, item_last_ts, item_raw_id, pool, log_q temporaries)",
         8.0 * (items + 1) * 4 + 8.0 * 3 * (items + 1), "int64 each, log_q's float64 intermediates"),
        ("training process: user order (split_users permutation, lines, the epoch's permutation)", 8.0 * 3 * users, ""),
        ("rank 0 saving a checkpoint: weights copied to the host + the largest optimizer tensor being written",
         p4 + 4.0 * pc["largest_table"], "torch.save copies each GPU storage to the host as it writes it"),
        (f"resume: ckpt.pt loaded to the host (weights + AdamW moments) on every rank, x {w}",
         w * 3 * p4, "torch.load(map_location='cpu'); with mmap=True the ranks would share the file's pages"),
        ("get_stat: indexer.pkl unpickled (user, item and feature dicts)", indexer,
         f"{costs['user dict (str -> int)']:.0f} / {costs['item dict (int -> int)']:.0f} / "
         f"{costs['feature dict (int -> int)']:.0f} B an entry (measured)"),
        ("get_stat: per-item arrays (counts, last ts, raw ids int64; item_feat columns + the table int32)", per_item,
         "the columns and the concatenated table both exist at the end"),
        ("get_stat: per-user (offsets int64 x2 + as a list, lengths, user ids twice for n_unique)", per_user,
         f"user ids {user_str:.0f} B each in polars (estimated_size)"),
        ("get_stat: total (+ the 64 MB chunk's polars frames, ~0.8 GB measured in bench/preprocess_results.md)",
         indexer + per_item + per_user + 0.8e9, ""),
    ]


# --------------------------------------------------------------------------- report

def fits(peak: float, card: int) -> str:
    use = usable_gib(card) * GiB
    return "no" if peak > use else ("tight" if peak > 0.9 * use else "yes")


def gib(x: float) -> str:
    return f"{x / GiB:,.2f}" if x < 10 * GiB else f"{x / GiB:,.1f}"


def gpu_table(rows: list[tuple[str, float, float]]) -> list[str]:
    head = "| stage | adds GiB | peak GiB | " + " | ".join(f"{c} GB" for c in CARDS) + " |"
    out = [head, "| --- | ---: | ---: |" + " :---: |" * len(CARDS)]
    for name, add, peak in rows:
        bold = name.startswith("=")
        cells = [f"**{fits(peak, c)}**" if bold else fits(peak, c) for c in CARDS]
        out.append(f"| {name} | {gib(add) if add else ''} | {'**' + gib(peak) + '**' if bold else gib(peak)} | "
                   + " | ".join(cells) + " |")
    return out


def verdict(rows: list[tuple[str, float, float]]) -> str:
    """One line: which of the stage peaks fit which card."""
    parts = []
    for name, _, peak in rows:
        if name.startswith("=") or name.split(":")[0] in ("validation today", "inference today", "validation streamed",
                                                           "inference streamed"):
            label = "training" if name.startswith("=") else name.split(":")[0]
            ok = [f"{c} (tight)" if fits(peak, c) == "tight" else str(c) for c in CARDS if fits(peak, c) != "no"]
            parts.append(f"{label} {gib(peak)} GiB: " + (f"fits {', '.join(ok)} GB" if ok else "fits none"))
    return "; ".join(parts)


SUMMARY = (("today", "= training step peak", "training"), ("today", "validation today", "validation"),
           ("today", "inference today", "inference"), ("planned", "= training step peak", "training, planned"),
           ("planned", "validation streamed", "validation, streamed"),
           ("planned", "inference streamed", "inference, streamed"))


def summary_table(results: dict) -> list[str]:
    """Peak GiB of each stage of each configuration, with the cards (nominal GB) it fits."""
    head = "| items / users / ranks | " + " | ".join(label for _, _, label in SUMMARY) + " |"
    out = ["## Summary: peak GiB on the busiest GPU, and the cards it fits", "", head,
           "| --- |" + " ---: |" * len(SUMMARY)]
    for (items, users, w), res in results.items():
        cells = []
        for which, prefix, _ in SUMMARY:
            peak = next(pk for name, _, pk in res[which] if name.startswith(prefix))
            ok = [f"{c} tight" if fits(peak, c) == "tight" else str(c) for c in CARDS if fits(peak, c) != "no"]
            cells.append(f"{gib(peak)} ({'/'.join(ok) if ok else 'none'})")
        out.append(f"| {items / 1e6:g}M / {users / 1e6:g}M / {w} | " + " | ".join(cells) + " |")
    return out + [""]


def conclusions(results: dict) -> list[str]:
    """What the largest configuration's tables say, in sentences (numbers from the tables)."""
    (items, users, w), res = max(results.items(), key=lambda kv: (kv[0][0], kv[0][2]))
    pc = res["params"]

    def peak(which: str, prefix: str) -> float:
        return next(pk for name, _, pk in res[which] if name.startswith(prefix))

    def cards(x: float) -> str:
        ok = [str(c) for c in CARDS if fits(x, c) != "no"]
        return f"fits the {'/'.join(ok)} GB card{'s' if len(ok) > 1 else ''}" if ok else "fits no card"

    table = 4.0 * pc["id_table"]
    dense_table = table * (2 + (w > 1))  # its gradient, its DDP bucket, its second gradient in backward
    train, val, inf = peak("today", "="), peak("today", "validation today"), peak("today", "inference today")
    vec = 4.0 * items * PRESETS["reference"].hidden
    return ["## What fits and what does not", "",
            f"- At {items / 1e6:g}M items on {w} rank(s): training today peaks at {gib(train)} GiB and {cards(train)}; "
            f"the id table's dense gradient, " + ("its DDP bucket " if w > 1 else "") + "and its second gradient in "
            f"backward are {gib(dense_table)} GiB of that ({dense_table / train:.0%}).",
            f"- The first validation, hours in, adds every item's vector twice ({gib(2 * vec)} GiB): {gib(val)} GiB, "
            f"which {cards(val)}. Inference without predict_set needs {gib(inf)} GiB ({cards(inf)}).",
            f"- Planned (row-wise id-table update, item vectors streamed a chunk at a time): training "
            f"{gib(peak('planned', '='))} GiB, validation {gib(peak('planned', 'validation streamed'))} GiB, inference "
            f"{gib(peak('planned', 'inference streamed'))} GiB: all of them fit an 80 GB card."
            if all(fits(pk, 80) != "no" for _, _, pk in res["planned"]) else
            "- Planned: see the planned table (not everything fits an 80 GB card).",
            "- Cheaper steps on the way, from the same tables: write the item vectors into one preallocated tensor "
            f"instead of a list and torch.cat (halves {gib(2 * vec)} GiB); call optim.zero_grad(set_to_none=True) "
            f"before the forward instead of after it ({gib(4.0 * pc['total'])} GiB of stale gradients leave the "
            f"forward's peak); DistributedDataParallel(gradient_as_bucket_view=True) (no bucket copy, "
            f"{gib(4.0 * pc['total'])} GiB). On the host, resuming loads ckpt.pt on every rank: "
            f"torch.load(..., mmap=True) lets the ranks share one copy in the page cache.", ""]


def config_section(cfg: ModelConfig, size: Size, fit: ActFit, costs: dict, user_str: float,
                   overrides: dict[str, int]) -> tuple[list[str], dict]:
    schema = real_schema(size.items, overrides)
    pc = count_params(cfg, schema, size.items)
    today, planned = gpu_rows(cfg, pc, size, fit, False), gpu_rows(cfg, pc, size, fit, True)
    b_local = size.batch // size.ranks
    lines = [f"## {size.items / 1e6:g}M items, {size.users / 1e6:g}M users, {size.ranks} rank(s) "
             f"(B = {size.batch} a step, {b_local} a rank)", "",
             f"Parameters: {pc['total']:,} ({4 * pc['total'] / GiB:.2f} GiB fp32): "
             + ", ".join(f"{k} {v:,}" for k, v in pc.items() if " " in k)
             + ".", "",
             "Vocabularies assumed (values + padding): "
             + ", ".join(f"{f} {v:,}" for f, v in sorted(schema["item_sparse"].items(), key=lambda kv: int(kv[0])))
             + " (111 is not embedded).", "",
             "### GPU today (train.py as it is)", "", *gpu_table(today), "", f"Today: {verdict(today)}.", "",
             "### GPU planned (row-wise id-table update, see bench/embedding_grad_results.md; streamed item vectors)",
             "", *gpu_table(planned), "", f"Planned: {verdict(planned)}.", "",
             "### Host", "", "| what | GiB | note |", "| --- | ---: | --- |"]
    lines += [f"| {what} | {gib(x)} | {note} |" for what, x, note in host_rows(cfg, schema, pc, size, costs, user_str)]
    return lines + [""], {"params": pc, "today": today, "planned": planned}


def checks_section(cfg: ModelConfig, fit: ActFit, loss_checks: list[tuple]) -> list[str]:
    lines = ["## How the estimates were checked", "",
             f"Activations (bf16 autocast on this CPU, saved-tensor bytes, reference widths: D={cfg.hidden}, "
             f"{cfg.num_layers} layers, H={cfg.num_heads}, N={cfg.num_positions}):", "",
             "| B | sequence MB | item vectors MB | fit MB | fit / measured |", "| ---: | ---: | ---: | ---: | ---: |"]
    for b, pt in fit.points.items():
        est = sum(fit.at(b).values())
        lines.append(f"| {b} | {pt['sequence'] / 1e6:.2f} | {pt['item vectors'] / 1e6:.2f} | {est / 1e6:.2f} | "
                     f"{est / sum(pt.values()):.3f} |")
    if fit.peak is not None:
        b, peak = fit.peak
        lines += ["", f"Allocator peak of the same forward at B={b} (profiler memory events, transients included): "
                  f"{peak / 1e6:.2f} MB, {peak / sum(fit.at(b).values()):.3f} x the fit."]
    per = sum(fit.slope.values()) + cuda_layernorm_extra(cfg, 1)
    lines += ["", f"Fit: {sum(fit.intercept.values()) / 1e6:.1f} MB + {sum(fit.slope.values()) / 1e6:.2f} MB a "
              f"sequence (of which item vectors {fit.slope['item vectors'] / 1e6:.2f}), plus CUDA's fp32 layer_norm "
              f"{cuda_layernorm_extra(cfg, 1) / 1e6:.2f} MB a sequence: {per / 1e6:.2f} MB a sequence on a GPU, "
              f"{per * 232 / GiB:.2f} GiB at B=232. (At B=1 a few ops save differently, so the fit uses B >= 2.)", "",
              "Loss (loss_bytes from shapes against the profiler's peak of one forward + backward on this CPU):", "",
              "| R | D | chunk rows | hard_k | estimate MB | measured MB | measured / estimate |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for rows, dim, cr, hk, est, meas in loss_checks:
        lines.append(f"| {rows:,} | {dim} | {cr or 'one chunk'} | {hk or 'all'} | {est / 1e6:.1f} | {meas / 1e6:.1f} | "
                     f"{meas / est:.2f} |")
    return lines + ["", "The chunk term takes 17 bytes a logit: logsumexp's backward holds (x - lse), its exp and the "
                    "product at once (C++ temporaries live to the end of the expression) beside the saved logits "
                    "and mask. The hard-negative path measures less than the estimate (conservative).", ""]


def loss_checks() -> list[tuple]:
    out = []
    for rows, dim, cr, hk in [(2000, 64, None, None), (4000, 128, 500, None), (4000, 128, 500, 256)]:
        est = loss_bytes(rows, rows, dim, hard_k=hk, chunk_logits=(cr or 1 << 40) * 2 * rows)["total"]
        est -= 4.0 * rows * dim * 3  # query, pos, neg exist before the loss runs (made before the profiler starts)
        out.append((rows, dim, cr, hk, est, loss_peak_measured(rows, dim, cr, hk)))
    return out


def parse_sizes(text: list[str]) -> list[tuple[int, int]]:
    out = []
    for t in text:
        items, _, users = t.partition(":")
        out.append((int(float(items)), int(float(users))))
    return out


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["17500000:10000000", "4800000:1000000"],
                   help="ITEMS:USERS of each data size (default: the two sizes of the real data)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 8], help="GPUs (DDP ranks) of each configuration")
    p.add_argument("--batch-size", type=int, default=232, help="global batch (the reference's 232)")
    p.add_argument("--workers", type=int, default=8, help="data-loader workers a rank (train.py: min(CPUs - 1, 8))")
    p.add_argument("--mm-dim", type=int, default=0, help="summed multimodal width for the host rows (0: none)")
    p.add_argument("--test-users", type=int, default=None, help="predict_seq users (default: a tenth of the users)")
    p.add_argument("--vocab", nargs="*", default=[], help="FID=N vocabulary overrides, e.g. 121=3000000")
    p.add_argument("--act-batches", type=int, nargs="+", default=[2, 3, 4],
                   help="batch sizes at which activations are measured (fitted as a + b·B)")
    p.add_argument("--no-checks", action="store_true", help="skip the loss estimate's check against the profiler")
    p.add_argument("--out", default=str(ROOT / "bench" / "scale_results.md"), help="where the tables are written")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    overrides = {k: int(v) for k, _, v in (x.partition("=") for x in args.vocab)}
    load0, t0 = os.getloadavg()[0], time.time()
    cfg = PRESETS["reference"]
    fit = fit_activations(cfg, real_schema(1000), tuple(args.act_batches))
    if not args.no_checks:  # the allocator's view of the largest measured forward, a check of the saved bytes
        small, b = small_vocab(real_schema(1000)), max(args.act_batches)
        torch.manual_seed(0)
        fit.peak = (b, forward_peak_bytes(HSTUModel(cfg, small, 1000), synthetic_batch(cfg, small, 1000, b), True))
    costs, user_str = python_costs(), polars_user_bytes()
    checks = [] if args.no_checks else loss_checks()
    given = sys.argv[1:] if argv is None else argv
    lines = ["# Memory plan: the reference configuration at the real data's sizes", "",
             f"- command: `{' '.join(['python bench/scale.py', *given])}`",
             f"- date: {datetime.date.today().isoformat()}; torch {torch.__version__}; CPU count {os.cpu_count()} "
             f"({platform.processor() or platform.machine()}), 1 thread; 1-min load average {load0:.1f} before, "
             f"{{load1}} after; {{secs}} s in all",
             "- cards: usable = 0.99 x nominal GiB - 1 GiB (CUDA context, cuBLAS workspace, NCCL buffers): "
             + ", ".join(f"{c} GB -> {usable_gib(c):.1f} GiB" for c in CARDS)
             + "; 'tight' = above 90% of that (allocator fragmentation can tip it over)",
             f"- model: the reference preset ({cfg.hidden} wide, {cfg.num_layers} layers, {cfg.num_heads} heads, "
             f"N = {cfg.num_positions}, id_dim {cfg.id_dim}, feat_dim {cfg.feat_dim}); fp32 master weights, bf16 "
             "autocast; AdamW fused on CUDA; R = B·N target rows (full sequences), C = 2R over all ranks, hard_k "
             f"{HARD_K_MAX} (the curriculum's largest); test users a tenth of the users unless --test-users", ""]
    sections, results = [], {}
    for items, users in parse_sizes(args.sizes):
        for w in args.ranks:
            size = Size(items, users, w, args.batch_size, args.workers, test_users=args.test_users, mm_dim=args.mm_dim)
            sec, res = config_section(cfg, size, fit, costs, user_str, overrides)
            sections += sec
            results[(items, users, w)] = res
    lines += (summary_table(results) + conclusions(results) + sections
              + (checks_section(cfg, fit, checks) if checks else []))
    text = "\n".join(lines) + "\n"
    text = text.replace("{load1}", f"{os.getloadavg()[0]:.1f}").replace("{secs}", f"{time.time() - t0:.0f}")
    print(text)
    with atomic_write(args.out, "w") as f:
        f.write(text)
    return text


if __name__ == "__main__":
    main()
