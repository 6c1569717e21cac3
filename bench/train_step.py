"""Training-step throughput: sequences/s of one full step (train.optimise: forward, loss, backward, gradient
clipping, AdamW, as train.py runs it) of a preset model, eager and with torch.compile(model), its model FLOP
utilisation, its peak GPU memory, and the largest batch that fits.

    python bench/train_step.py                                   # small (B=64) and reference (B=8 on a CPU)
    python bench/train_step.py --preset small --batch-size 64 --steps 20 --no-compile
    python bench/train_step.py --preset reference --synthetic-items 17500000 --precision bf16 --find-max-batch \\
        --peak-tflops 989 --val-pass                             # on a GPU: the real catalogue, H200 bf16 peak
    python bench/train_step.py --preset small --batch-size 8 --steps 2 --warmup 1 --users 300 --out bench/train_step.tmp/r.md
    python bench/train_step.py --preset small --data movielens_runs/ml-1m --no-compile --max-candidates 2048 \
        --set maxlen=200 --variant sasrec:model=sasrec,num_heads=2 --variant hstu:num_heads=1,num_layers=3 --rounds 2

The last command is a smoke run. Batches come from the training dataset (dataset.TrainDataset + collate, as
train.py builds them) over generated sample data (make_sample_data.generate, then get_stat.run), or with
--synthetic-items M from bench/scale.py's synthetic batches: every position valid (R = B x N target rows, the most
a batch has), item ids uniform over M items, the real feature list with vocabularies sized to M (scale.real_schema)
- the model then has the real catalogue's tables. Batches are built once before timing and cycled, so data loading
is not measured (bench/dataloader.py measures it). Every configuration starts from the same seed. The first
--warmup steps are not timed (torch.compile compiles in the first one; their time is reported). --precision bf16
runs the steps under bf16 autocast (train.py's setting on CUDA). The loss is train.py's for the configuration:
the full-catalogue softmax where train.use_full_softmax picks it, else the sampled softmax. --data takes the
batches from a dataset instead (a folder with data/ and cache/, such as bench/movielens.sh's conversion), and each
--variant adds a row group of its own options, measured in turn, --rounds times over: model shapes side by side.

Model FLOPs per step are estimated analytically: 6 x (parameters of the dense layers) x (tokens they see: B x N
for the sequence layers, B x N + 2R for the item tower (+ M+1 items with the full softmax), B for the user
tower), + attention 2 B N^2 (D + value width, D unless --linear-dim) per layer x 3 for the backward, + the loss's
logits 2 R C (D + 1) x 3, where R is the batch's target rows and C its candidates (2R, --max-candidates, or M+1 items). The loss's checkpoint
recomputation is not counted (model FLOPs, not hardware FLOPs). Utilisation = achieved FLOP/s over the measured
rate of a large matmul on the same device (fp32 on a CPU, bf16 on CUDA); MFU = achieved FLOP/s over --peak-tflops
(the card's dense bf16 peak, e.g. 989 for an H100/H200 SXM). Peak memory (CUDA) is torch.cuda.max_memory_allocated
over the warm-up and timed steps (and max_memory_reserved, the allocator's footprint); --val-pass also measures
a validation pass (train.validate over --synthetic-items items, 1,000 users) with the training state resident, as
it is when train.py validates. --find-max-batch searches
the largest batch (a multiple of 8) whose steps run without running out of memory, for the first preset,
precision and id update, and measures it too. Prints a markdown table and writes it to bench/train_step_results.md
(or --out); --json also writes every figure.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import os
import platform
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # compile workers would compete for the CPUs measured

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "bench"))  # bench/scale.py; bench/loss.py must not shadow loss.py, hence last
sys.path.insert(0, str(ROOT))
from common import atomic_save_json, atomic_write, load_stat  # noqa: E402
from dataset import ActivePool, EpochSampler, FeatureSpec, SeqReader, TrainDataset, collate  # noqa: E402
from distributed import Dist  # noqa: E402
from loss import log_q_uniform  # noqa: E402
from model import HSTUModel  # noqa: E402
from train import (TrainConfig, build_model, in_batch_log_q, item_table, optimise, resolve, to_device,  # noqa: E402
                   use_full_softmax, validate)

GiB = float(1 << 30)


def sample_data(workdir: Path, users: int, items: int, seed: int = 42) -> tuple[Path, Path]:
    """Generated sample data and its get_stat cache under workdir (reused when already there) -> (data, cache)."""
    import get_stat
    import make_sample_data
    root = workdir / f"u{users}_i{items}_s{seed}"
    data, cache = root / "data", root / "cache"
    if not (data / "seq.jsonl").exists():
        make_sample_data.generate(str(root), users=users, items=items, seed=seed, progress=False)
    get_stat.run(data, cache)  # a no-op when the cache is up to date
    return data, cache


def train_dataset(data: Path, cache: Path, maxlen: int, seed: int = 42) -> tuple[TrainDataset, dict]:
    """The training dataset over every user, built as train.py builds it (30-day negative pool)."""
    stat = load_stat(cache)
    reader = SeqReader(data / "seq.jsonl", data / "seq_offsets.pkl")
    item_count = np.load(cache / "item_count.npy")
    pool = ActivePool(item_count, np.load(cache / "item_last_ts.npy"), 30.0)
    ds = TrainDataset(reader, np.arange(len(reader)), np.load(cache / "item_feat.npy", mmap_mode="r"),
                      FeatureSpec.from_stat(stat), pool, maxlen, seed)
    return ds, stat


def linear_params(module: nn.Module) -> int:
    return sum(p.numel() for m in module.modules() if isinstance(m, nn.Linear) for p in m.parameters())


def step_flops(model: HSTUModel, batch: dict, max_candidates: int, full_items: int = 0) -> tuple[float, int]:
    """Analytic model FLOPs of one training step (forward + backward) -> (flops, target rows R).
    full_items: the full softmax's M+1 columns (every item through the item tower), 0 for the sampled loss."""
    b, n = batch["seq_type"].shape
    d = model.cfg.hidden
    r = int((batch["next_item"] > 0).sum())
    c = full_items or (min(max_candidates, 2 * r) if max_candidates else 2 * r)
    item_rows = b * n + (full_items if full_items else 2 * r)
    dense = 6 * (sum(linear_params(layer) for layer in model.layers) * b * n
                 + linear_params(model.item_tower) * item_rows + linear_params(model.user_tower) * b)
    # QK^T over the D query/key dimensions, A·V over the value width (HSTU's H·dv, D unless --linear-dim)
    widths = sum(d + layer.num_heads * getattr(layer, "value_dim", d // layer.num_heads) for layer in model.layers)
    attention = 3 * 2 * b * n * n * widths
    logits = 3 * 2 * r * c * (d + 1)
    return float(dense + attention + logits), r


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 3) -> float:
    """FLOP/s of an (n, n) @ (n, n) matmul, the best of `repeats`."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    (a @ b).sum().item()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


@dataclasses.dataclass
class Setup:
    """One configuration's inputs: train.py's config, the batches, and what train.optimise's loss takes."""
    cfg: TrainConfig
    mcfg: object
    batches: list[dict]
    stat: dict  # the "schema" and "itemnum" train.build_model reads
    log_q: torch.Tensor  # the in-batch sampler's log q (itemnum+1,)
    device: torch.device
    make_batch: Callable[[int, int], dict]  # (batch size, index) -> a batch on the device
    log_q_global: torch.Tensor | None = None  # the global negatives' sampler's
    item_table: tuple | None = None  # (ids, features, dense rows) of every item: the full softmax
    item_feat: np.ndarray | None = None  # (itemnum+1, Fi): validation's item features (synthetic data)
    source: str = ""

    @property
    def full_items(self) -> int:
        return len(self.item_table[0]) if self.item_table is not None else 0


def config(preset: str, batch_size: int, device: torch.device, max_candidates: int = 0, seed: int = 42,
           **overrides) -> tuple[TrainConfig, object]:
    """train.py's resolved config for a preset, with TrainConfig fields overridden (e.g. hidden=32, id_update=...)."""
    overrides.setdefault("max_steps", 1000)  # the lr schedule needs a length; throughput does not depend on it
    return resolve(TrainConfig(preset=preset, batch_size=batch_size, device=str(device),
                               max_candidates=max_candidates, seed=seed, **overrides), device)


def prepare(preset: str, batch_size: int, data: Path, cache: Path, device: torch.device, num_batches: int,
            max_candidates: int = 0, seed: int = 42, **overrides) -> Setup:
    """Batches from the training dataset over (data, cache), train.py's loss inputs for it."""
    cfg, mcfg = config(preset, batch_size, device, max_candidates, seed, **overrides)
    ds, stat = train_dataset(data, cache, mcfg.maxlen, seed)
    order = iter(EpochSampler(len(ds), seed))

    def make_batch(b: int, i: int) -> dict:
        return to_device(collate([ds[next(order)] for _ in range(b)]), device)

    item_count = np.load(cache / "item_count.npy")
    table = None
    if use_full_softmax(cfg, mcfg, stat["itemnum"]):
        table = item_table(np.load(cache / "item_feat.npy", mmap_mode="r"), item_count > 0, None, device)
    return Setup(cfg, mcfg, [make_batch(batch_size, i) for i in range(num_batches)], stat,
                 in_batch_log_q(cfg, item_count).to(device), device, make_batch,
                 log_q_uniform(ds.pool.items, len(item_count)).to(device), table, source="sample data")


_ITEM_FEAT: dict = {}


def synthetic_item_feat(schema: dict, itemnum: int, seed: int) -> np.ndarray:
    """(itemnum+1, Fi) item features within each vocabulary, fids in the schema's order (row 0: padding); kept
    for the next configuration (at 17.5M items it takes seconds to draw)."""
    key = (itemnum, seed)
    if key not in _ITEM_FEAT:
        rng = np.random.default_rng(seed)
        vocab = [schema["item_sparse"][f] for f in sorted(schema["item_sparse"], key=int)]
        feat = np.stack([rng.integers(1, max(v, 2), itemnum + 1) for v in vocab], 1)
        feat[0] = 0
        _ITEM_FEAT.clear()
        _ITEM_FEAT[key] = feat
    return _ITEM_FEAT[key]


def prepare_synthetic(preset: str, batch_size: int, itemnum: int, device: torch.device, num_batches: int,
                      max_candidates: int = 0, seed: int = 42, with_item_feat: bool = False, **overrides) -> Setup:
    """Full synthetic batches (bench/scale.py) over a catalogue of itemnum items with the real feature list."""
    import scale
    cfg, mcfg = config(preset, batch_size, device, max_candidates, seed, **overrides)
    schema = scale.real_schema(itemnum)

    def make_batch(b: int, i: int) -> dict:
        return to_device(scale.synthetic_batch(mcfg, schema, itemnum, b, seed + i), device)

    counts = np.zeros(itemnum + 1, np.int64)
    counts[1:] = np.maximum(1e7 / np.arange(1, itemnum + 1), 1).astype(np.int64)  # Zipf-like training counts
    full = use_full_softmax(cfg, mcfg, itemnum)
    item_feat = synthetic_item_feat(schema, itemnum, seed) if with_item_feat or full else None
    table = item_table(item_feat, counts > 0, None, device) if full else None
    stat = {"schema": schema, "itemnum": itemnum}
    return Setup(cfg, mcfg, [make_batch(batch_size, i) for i in range(num_batches)], stat,
                 in_batch_log_q(cfg, counts).to(device), device, make_batch,
                 log_q_uniform(np.arange(1, itemnum + 1), itemnum + 1).to(device), table, item_feat,
                 source=f"synthetic, {itemnum:,} items")


def build(setup: Setup, seed: int):
    """train.build_model on the device (parameters created there: no host copy of a catalogue-sized table)."""
    torch.manual_seed(seed)
    run = types.SimpleNamespace(mcfg=setup.mcfg, stat=setup.stat)  # the parts of a train.RunData build_model reads
    with torch.device(setup.device):
        return build_model(setup.cfg, run, setup.device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(setup: Setup, steps: int, warmup: int, compile: bool = False, amp: bool = False,
            seed: int = 42, backend: str = "inductor", val_pass: bool = False) -> dict:
    """Run warmup + steps training steps -> {seconds per step, sequences/s, warm-up seconds, flops per step,
    peak GiB (CUDA), ...}."""
    cfg, device = setup.cfg, setup.device
    cuda = device.type == "cuda"
    model, optim = build(setup, seed)
    run_model = torch.compile(model, dynamic=False, backend=backend) if compile else model  # as train.py
    loss_inputs = (setup.log_q, setup.log_q_global, setup.item_table)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def one_step(step: int) -> None:  # train.py's step
        optimise(run_model, optim, setup.batches[step % len(setup.batches)], loss_inputs, cfg, step, Dist(), amp, {})

    sync()
    t0 = time.perf_counter()
    for s in range(warmup):
        one_step(s)
    sync()
    t1 = time.perf_counter()
    for s in range(warmup, warmup + steps):
        one_step(s)
    sync()
    t2 = time.perf_counter()
    peak = torch.cuda.max_memory_allocated(device) / GiB if cuda else None
    reserved = torch.cuda.max_memory_reserved(device) / GiB if cuda else None  # the allocator's footprint
    flops, rows = zip(*(step_flops(model, setup.batches[s % len(setup.batches)], cfg.max_candidates,
                                   setup.full_items) for s in range(warmup, warmup + steps)))
    per_step = (t2 - t1) / steps
    res = dict(step_s=per_step, seqs_per_s=len(setup.batches[0]["seq_type"]) / per_step, warmup_s=t1 - t0,
               flops=float(np.mean(flops)), rows=float(np.mean(rows)), peak_gib=peak, reserved_gib=reserved,
               params=sum(p.numel() for p in model.parameters()))
    if val_pass:
        res.update(validation_pass(setup, model))
    model = optim = run_model = None  # freed before the next configuration builds its own
    free_memory()
    return res


def validation_pass(setup: Setup, model: HSTUModel, users: int = 1000, seed: int = 7) -> dict:
    """train.validate over every item of the synthetic catalogue for `users` synthetic users (histories of 100
    items), with the training state (weights, gradients, AdamW moments) resident -> {val_s, val_peak_gib}."""
    import scale
    if setup.item_feat is None:
        raise ValueError("a validation pass needs synthetic data with item features (prepare_synthetic)")
    itemnum, device = setup.stat["itemnum"], setup.device
    g = torch.Generator().manual_seed(seed)
    loader = []
    for start in range(0, users, 256):  # train.py's validation batch
        b = min(256, users - start)
        batch = scale.synthetic_batch(setup.mcfg, setup.stat["schema"], itemnum, b, seed + start)
        batch["history"] = torch.randint(1, itemnum + 1, (b, 100), generator=g)
        batch["target"] = torch.randint(1, itemnum + 1, (b,), generator=g)
        loader.append(batch)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    validate(model, loader, setup.item_feat, np.ones(itemnum + 1, bool), device, amp=cuda,
             item_chunk=setup.cfg.val_item_chunk)
    if cuda:
        torch.cuda.synchronize(device)
    return dict(val_s=time.perf_counter() - t,
                val_peak_gib=torch.cuda.max_memory_allocated(device) / GiB if cuda else None,
                val_reserved_gib=torch.cuda.max_memory_reserved(device) / GiB if cuda else None)


def fits(setup: Setup, model, optim, b: int, amp: bool) -> tuple[bool, float | None]:
    """Two training steps at batch b with an existing model -> (no out-of-memory error, peak GiB on CUDA)."""
    cuda = setup.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(setup.device)
    ok = True
    try:
        for step in range(2):
            optimise(model, optim, setup.make_batch(b, step), (setup.log_q, setup.log_q_global, setup.item_table),
                     setup.cfg, step, Dist(), amp, {})
        if cuda:
            torch.cuda.synchronize(setup.device)
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError, or a library's failed allocation (cuBLAS's)
        if not isinstance(e, torch.cuda.OutOfMemoryError) and "ALLOC_FAILED" not in str(e) \
                and "out of memory" not in str(e):
            raise
        ok = False  # the failed step's tensors go with the exception, at the end of this clause
    peak = torch.cuda.max_memory_allocated(setup.device) / GiB if cuda and ok else None
    optim.adamw.zero_grad(set_to_none=True)
    free_memory()
    return ok, peak


def find_max_batch(setup: Setup, amp: bool, cap: int, multiple: int = 8, seed: int = 42) -> tuple[int, list]:
    """The largest batch (a multiple of `multiple`, at most cap) whose two steps run without running out of
    memory: doubling from the setup's batch size, then bisection to within 1/16 -> (batch, [(B, fits, peak GiB)])."""
    model, optim = build(setup, seed)
    trials = []

    def trial(b: int) -> bool:
        ok, peak = fits(setup, model, optim, b, amp)
        trials.append((b, ok, peak))
        print(f"  batch {b}: {'fits' if ok else 'out of memory'}{f', peak {peak:.1f} GiB' if peak else ''}", flush=True)
        return ok

    lo, hi = 0, None  # the largest batch that fits, the smallest that does not
    b = min(setup.cfg.batch_size, cap)
    while hi is None:
        if trial(b):
            lo = b
            if b >= cap:
                break
            b = min(2 * b, cap)
        else:
            hi = b
    while hi is not None and hi - lo > max(multiple, lo // 16):
        mid = (lo + hi) // 2 // multiple * multiple
        if mid <= lo:
            break
        if trial(mid):
            lo = mid
        else:
            hi = mid
    model = optim = None
    free_memory()
    return lo, trials


def parse_sets(items: list[str]) -> dict:
    """--set KEY=VALUE ... -> TrainConfig overrides, each value converted to its field's type."""
    kinds = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.replace("-", "_")
        if not sep or key not in kinds:
            raise SystemExit(f"error: --set {item}: expected KEY=VALUE with KEY a train.py option")
        kind = kinds[key]
        out[key] = (int(value) if kind.startswith("int") else float(value) if kind.startswith("float")
                    else value.lower() in ("1", "true", "yes", "on") if kind.startswith("bool") else value)
    return out


def parse_variants(items: list[str], common: dict) -> list[tuple[str, dict]]:
    """--variant NAME:KEY=VALUE,... -> [(name, overrides on top of --set)]; without any, one unnamed variant."""
    out = []
    for item in items:
        name, sep, body = item.partition(":")
        if not sep or not name:
            raise SystemExit(f"error: --variant {item}: expected NAME:KEY=VALUE,...")
        out.append((name, {**common, **parse_sets([kv for kv in body.split(",") if kv])}))
    return out or [("", common)]


def run_config(setup: Setup, args, prec: str, comp: bool, deadline: float | None, compile_s: list[float]) -> dict:
    """One measured configuration -> its result, {"error": ...} or {"skipped": ...} (the time budget)."""
    left = None if deadline is None else deadline - time.time()
    if left is not None and (left < 10 or (comp and compile_s and left < 1.5 * max(compile_s))):
        return {"skipped": f"time budget ({left:.0f} s left)"}
    try:
        res = measure(setup, args.steps, args.warmup, compile=comp, amp=prec == "bf16", backend=args.compile_backend,
                      val_pass=args.val_pass and not comp)
        if comp:
            compile_s.append(res["warmup_s"])
        return res
    except Exception as e:  # noqa: BLE001 - a failed configuration is a result, not the end of the run
        if comp:
            import torch._dynamo as dynamo
            dynamo.reset()
        free_memory()
        return {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["small", "reference"], choices=["small", "reference"],
                   help="model presets, one row group each")
    p.add_argument("--batch-size", type=int, nargs="+", default=None,
                   help="sequences per step, one per --preset (default: the preset's training batch, 64 small / "
                        "232 reference; 8 for reference on a CPU)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens in the first)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also run with torch.compile(model) (--no-compile: eager only)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend ('eager': trace only)")
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=None,
                   help="fp32 and/or bf16 autocast (default: fp32 on a CPU, both on CUDA)")
    p.add_argument("--id-update", nargs="+", choices=["dense", "rowwise"], default=["dense"],
                   help="train.py's --id-update, one row group each")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other train.py option for every configuration, e.g. --set hidden=32 (repeatable)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="a named set of train.py options on top of --set, e.g. sasrec:model=sasrec,num_heads=2 "
                        "(repeatable): each is a row group, the variants measured in turn, --rounds times")
    p.add_argument("--rounds", type=int, default=1, help="times every variant is measured, alternating")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
    p.add_argument("--max-candidates", type=int, default=0, help="train.py's --max-candidates (0: all 2R columns)")
    p.add_argument("--batches", type=int, default=8, help="distinct batches built before timing, cycled")
    p.add_argument("--users", type=int, default=2000, help="users of the generated sample data")
    p.add_argument("--items", type=int, default=4000, help="items of the generated sample data")
    p.add_argument("--synthetic-items", type=int, default=0,
                   help="synthetic full batches over a catalogue of this many items instead of sample data")
    p.add_argument("--find-max-batch", action="store_true",
                   help="also search the largest batch that fits, and measure it")
    p.add_argument("--max-batch-cap", type=int, default=16384, help="the largest batch --find-max-batch tries")
    p.add_argument("--val-pass", action="store_true",
                   help="after each eager configuration, time a validation pass and take its peak memory "
                        "(needs --synthetic-items)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the card's dense bf16 peak in TFLOP/s for the MFU column (H100/H200 SXM: 989)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole run: configurations that would not fit are skipped (and said so)")
    p.add_argument("--workdir", default=None, help="where the sample data is kept (default: a temp folder)")
    p.add_argument("--data", default=None, help="batches from this dataset instead of sample data: a folder with "
                   "data/ and cache/ (bench/movielens.sh's OUT_DIR/ml-1m)")
    p.add_argument("--matmul-n", type=int, default=None, help="matmul size for the peak rate (default: 2048 on a "
                   "CPU, 8192 on CUDA)")
    p.add_argument("--out", default=str(ROOT / "bench" / "train_step_results.md"), help="where the table is written")
    p.add_argument("--append", action="store_true", help="add the table to --out instead of replacing it")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    return p


def main(argv: list[str] | None = None) -> str:
    p = build_parser()
    args = p.parse_args(argv)

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    else:  # train.py's settings
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    sizes = args.batch_size or [{"small": 64, "reference": 232 if device.type == "cuda" else 8}[pr] for pr in args.preset]
    if len(sizes) != len(args.preset):
        p.error("give one --batch-size per --preset")
    if args.val_pass and not args.synthetic_items:
        p.error("--val-pass needs --synthetic-items")
    variants = parse_variants(args.variant, parse_sets(args.set))
    load_before = os.getloadavg()[0]
    t_start = time.time()
    deadline = None if args.time_budget is None else t_start + args.time_budget
    if args.synthetic_items:
        make = lambda pr, b, idu, over: prepare_synthetic(  # noqa: E731
            pr, b, args.synthetic_items, device, args.batches, args.max_candidates, with_item_feat=args.val_pass,
            id_update=idu, **over)
    else:
        if args.data:
            import get_stat
            data, cache = Path(args.data) / "data", Path(args.data) / "cache"
            if not (data / "seq.jsonl").is_file():
                p.error(f"--data {args.data}: no data/seq.jsonl there (expected bench/movielens.sh's OUT_DIR/ml-1m)")
            get_stat.run(data, cache)  # a no-op when the cache is up to date
        else:
            data, cache = sample_data(Path(args.workdir or tempfile.mkdtemp(prefix="bench_train_step.")), args.users,
                                      args.items)
        make = lambda pr, b, idu, over: prepare(pr, b, data, cache, device, args.batches,  # noqa: E731
                                                args.max_candidates, id_update=idu, **over)

    mm_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    mm_n = args.matmul_n or (2048 if device.type == "cpu" else 8192)
    rate0 = matmul_rate(device, mm_dtype, mm_n)
    print(f"matmul {mm_n}^3 {str(mm_dtype).split('.')[-1]}: {rate0 / 1e9:.1f} GFLOP/s", flush=True)

    precisions = args.precision or (["fp32"] + (["bf16"] if device.type == "cuda" else []))
    compiles = [False] + ([True] if args.compile else [])
    rows, compile_s, searches = [], [], []
    given = sys.argv[1:] if argv is None else argv
    run = dict(args=args, cmd=" ".join(["python bench/train_step.py", *given]), device=device, mm_n=mm_n,
               mm_dtype=mm_dtype, load_before=load_before, t_start=t_start, rows=rows, searches=searches)

    def run_group(setup: Setup, preset: str, idu: str, precs: list[str], note: str = "") -> None:
        for prec in precs:
            for comp in compiles:
                res = run_config(setup, args, prec, comp, deadline, compile_s)
                print(f"{preset} {idu} B={setup.cfg.batch_size} {prec} compile={comp}: {res}", flush=True)
                rows.append(dict(preset=preset, id_update=idu, batch=setup.cfg.batch_size, precision=prec,
                                 compile=comp, source=setup.source, note=note, **res))
                write(run, [rate0, rate0], False)

    for preset, bsz in zip(args.preset, sizes):
        for idu in args.id_update:
            setups = [(f"{preset}: {name}" if name else preset, make(preset, bsz, idu, over)) for name, over in variants]
            for _ in range(args.rounds):  # alternated, so that a change in the machine's load hits every variant
                for label, setup in setups:
                    run_group(setup, label, idu, precisions)
            setups = None  # drop the models and batches, so that free_memory can release them
            free_memory()
    if args.find_max_batch:  # last, so that a time budget cuts it rather than the configurations above
        preset, idu, prec = args.preset[0], args.id_update[0], precisions[0]
        print(f"{preset} {idu}: searching the largest batch that fits ({prec})", flush=True)
        try:
            bmax, trials = find_max_batch(make(preset, sizes[0], idu, variants[0][1]), prec == "bf16",
                                          args.max_batch_cap)
            searches.append(dict(preset=preset, id_update=idu, precision=prec, batch=bmax, trials=trials,
                                 cap=args.max_batch_cap))
        except Exception as e:  # noqa: BLE001 - recorded; the measured rows stay
            bmax = 0
            searches.append(dict(preset=preset, id_update=idu, precision=prec, batch=0, trials=[],
                                 cap=args.max_batch_cap, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
        free_memory()
        if bmax:
            run_group(make(preset, bmax, idu, variants[0][1]), preset, idu, [prec], f"largest batch that fits ({prec})")
    table = write(run, [rate0, matmul_rate(device, mm_dtype, mm_n)], True)
    print(table)
    return table


def write(run: dict, rates: list[float], final: bool) -> str:
    """The table and the JSON so far: rewritten after every configuration, so a run stopped from outside still
    leaves what it measured ("complete": false in the JSON)."""
    args, device = run["args"], run["device"]
    info = dict(device=device.type, device_name=torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"CPU count {os.cpu_count()} ({platform.processor() or platform.machine()}), "
                f"{torch.get_num_threads()} thread(s)", matmul_rate=max(rates), matmul_rates=rates,
                matmul_n=run["mm_n"], matmul_dtype=str(run["mm_dtype"]).split(".")[-1], peak_tflops=args.peak_tflops,
                load_before=run["load_before"], load_after=os.getloadavg()[0], seconds=time.time() - run["t_start"],
                torch=torch.__version__, total_gib=(torch.cuda.get_device_properties(device).total_memory / GiB
                                                    if device.type == "cuda" else None))
    table = results_table(run["rows"], run["searches"], info, args, run["cmd"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if final or not args.append:  # --append: once, at the end
        before = out.read_text() + "\n" if args.append and out.exists() else ""
        with atomic_write(out, "w") as f:
            f.write(before + table)
    if args.json:
        atomic_save_json(dict(info=info, rows=run["rows"], searches=run["searches"], complete=final), args.json)
    return table


def results_table(rows: list[dict], searches: list[dict], info: dict, args, cmd: str) -> str:
    rate, peak = info["matmul_rate"], info["peak_tflops"]
    source = (f"synthetic full batches over {args.synthetic_items:,} items (R = B x N, the real feature list)"
              if args.synthetic_items else f"the training dataset of {Path(args.data).name}" if args.data else
              f"the training dataset over generated sample data ({args.users:,} users, {args.items:,} items, "
              "10-100 events a user, so R < B x N)")
    card = f", {info['total_gib']:.1f} GiB" if info["total_gib"] else ""
    lines = [
        "# Training step throughput (train.optimise: forward, loss, backward, clipping, AdamW)",
        "",
        f"Batches: {source}; {args.batches} distinct batches cycled; {args.warmup} untimed warm-up steps, then "
        f"{args.steps} timed; max-candidates {args.max_candidates or 'all (2R)'}.",
        "",
        f"- command: `{cmd}`",
        f"- date: {datetime.date.today().isoformat()}; torch {info['torch']}; {info['device']}: "
        f"{info['device_name']}{card}; 1-min load average {info['load_before']:.1f} before the run, "
        f"{info['load_after']:.1f} after; {info['seconds']:.0f} s in all",
        f"- measured matmul rate ({info['matmul_n']}^3, {info['matmul_dtype']}): {info['matmul_rates'][0] / 1e9:.1f} "
        f"GFLOP/s before, {info['matmul_rates'][1] / 1e9:.1f} after; utilisation is over the better, "
        f"{rate / 1e9:.1f} GFLOP/s" + (f"; MFU is over the card's bf16 peak, {peak:g} TFLOP/s" if peak else ""),
    ]
    for s in searches:
        tried = ", ".join(f"{b} {'fits' if ok else 'OOM'}" + (f" ({pk:.1f} GiB)" if pk else "")
                          for b, ok, pk in s["trials"])
        lines.append(f"- largest batch that fits ({s['preset']}, id update {s['id_update']}, {s['precision']}, eager, "
                     f"two steps each, multiples of 8, at most {s['cap']:,}): **{s['batch']}**; tried {tried}"
                     + (f"; the search failed: {s['error']}" if s.get("error") else ""))
    lines += [
        "",
        "| preset | id update | params | B | mean R | precision | torch.compile | ms/step | seq/s | vs eager | warm-up s "
        "| GFLOP/step | TFLOP/s | MFU | utilisation | peak GiB (reserved) | validation s | validation peak GiB (reserved) "
        "| note |",
        "| --- | --- | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | --- |",
    ]
    fmt = lambda v, spec=".1f": "-" if v is None else format(v, spec)  # noqa: E731
    both = lambda a, b: "-" if a is None else f"{a:.1f} ({b:.1f})"  # noqa: E731
    eager = {}
    for r in rows:
        comp = "yes" if r["compile"] else "no"
        head = f"| {r['preset']} | {r['id_update']} "
        if "error" in r or "skipped" in r:
            what = f"failed: {r['error']}" if "error" in r else f"skipped: {r['skipped']}"
            note = "; ".join(x for x in (r["note"], what) if x)
            lines.append(head + f"| - | {r['batch']} | - | {r['precision']} | {comp} " + "| - " * 11 + f"| {note} |")
            continue
        key = (r["preset"], r["id_update"], r["batch"], r["precision"])
        if not r["compile"]:
            eager[key] = r
        base = eager.get(key)
        ratio = r["seqs_per_s"] / base["seqs_per_s"] if base else None
        achieved = r["flops"] / r["step_s"]
        mfu = f"{100 * achieved / (peak * 1e12):.1f}%" if peak else "-"
        note = "; ".join(x for x in (r["note"], "compiles in the first warm-up step" if r["compile"] else "") if x)
        lines.append(
            head + f"| {r['params'] / 1e6:,.2f}M | {r['batch']} | {r['rows']:,.0f} | {r['precision']} | {comp} | "
            f"{1e3 * r['step_s']:.1f} | {r['seqs_per_s']:,.1f} | {fmt(ratio, '.2f')} | {r['warmup_s']:.1f} | "
            f"{r['flops'] / 1e9:,.1f} | {achieved / 1e12:.2f} | {mfu} | {100 * achieved / rate:.1f}% | "
            f"{both(r['peak_gib'], r.get('reserved_gib'))} | {fmt(r.get('val_s'))} | "
            f"{both(r.get('val_peak_gib'), r.get('val_reserved_gib'))} | {note} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
