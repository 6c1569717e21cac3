"""Training-step throughput: sequences/s of one full step (forward, loss, backward, gradient clipping, AdamW step,
as train.py runs it) of a preset model, eager and with torch.compile(model), and its model FLOP utilisation.

    python bench/train_step.py                                   # small (B=64) and reference (B=8 on a CPU)
    python bench/train_step.py --preset small --batch-size 64 --steps 20 --no-compile
    python bench/train_step.py --preset small --batch-size 8 --steps 2 --warmup 1 --users 300 --out bench/train_step.tmp/r.md

The last command is a smoke run. Batches come from the training dataset (dataset.TrainDataset + collate, as
train.py builds them) over generated sample data (make_sample_data.generate, then get_stat.run), loaded once
before timing and cycled, so data loading is not measured (bench/dataloader.py measures it). Every configuration
starts from the same seed. The first --warmup steps are not timed (torch.compile compiles in the first one; their
time is reported). On CUDA the steps also run under bf16 autocast (train.py's setting there).

Model FLOPs per step are estimated analytically: 6 x (parameters of the dense layers) x (tokens they see: B x N
for the sequence layers, B x N + 2R for the item tower, B for the user tower), + attention 4 B N^2 D per layer
x 3 for the backward, + the loss's logits 2 R C (D + 1) x 3, where R is the batch's target rows and C its
candidates (2R, or --max-candidates). The loss's checkpoint recomputation is not counted (model FLOPs, not
hardware FLOPs). Utilisation = achieved FLOP/s over the measured rate of a large matmul on the same device
(fp32 on a CPU, bf16 on CUDA) with the same threads. Prints a markdown table and writes it to
bench/train_step_results.md (or --out).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # compile workers would compete for the CPUs measured

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common import load_stat  # noqa: E402
from dataset import ActivePool, EpochSampler, FeatureSpec, SeqReader, TrainDataset, collate  # noqa: E402
from model import HSTUModel, param_groups  # noqa: E402
from train import TrainConfig, in_batch_log_q, lr_at, resolve, to_device, train_loss  # noqa: E402


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


def step_flops(model: HSTUModel, batch: dict, max_candidates: int) -> tuple[float, int]:
    """Analytic model FLOPs of one training step (forward + backward) -> (flops, target rows R)."""
    b, n = batch["seq_type"].shape
    d = model.cfg.hidden
    r = int((batch["next_item"] > 0).sum())
    c = min(max_candidates, 2 * r) if max_candidates else 2 * r
    dense = 6 * (sum(linear_params(layer) for layer in model.layers) * b * n
                 + linear_params(model.item_tower) * (b * n + 2 * r) + linear_params(model.user_tower) * b)
    attention = 3 * 4 * b * n * n * d * len(model.layers)
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
    cfg: TrainConfig
    mcfg: object
    batches: list[dict]
    stat: dict
    log_q: torch.Tensor
    device: torch.device


def prepare(preset: str, batch_size: int, data: Path, cache: Path, device: torch.device, num_batches: int,
            max_candidates: int = 0, seed: int = 42) -> Setup:
    cfg, mcfg = resolve(TrainConfig(preset=preset, batch_size=batch_size, device=str(device),
                                    max_candidates=max_candidates, seed=seed), device)
    ds, stat = train_dataset(data, cache, mcfg.maxlen, seed)
    order = iter(EpochSampler(len(ds), seed))
    batches = [to_device(collate([ds[next(order)] for _ in range(batch_size)]), device) for _ in range(num_batches)]
    log_q = in_batch_log_q(cfg, np.load(cache / "item_count.npy")).to(device)
    return Setup(cfg, mcfg, batches, stat, log_q, device)


def measure(setup: Setup, steps: int, warmup: int, compile: bool = False, amp: bool = False,
            seed: int = 42) -> dict:
    """Run warmup + steps training steps -> {seconds per step, sequences/s, warm-up seconds, flops per step, ...}."""
    cfg, device = setup.cfg, setup.device
    torch.manual_seed(seed)
    model = HSTUModel(setup.mcfg, setup.stat["schema"], setup.stat["itemnum"]).to(device)
    groups = param_groups(model, cfg.lr, cfg.weight_decay)
    for g in groups:
        g["lr_scale"] = g["lr"] / cfg.lr
    optim = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), fused=device.type == "cuda")
    run_model = torch.compile(model) if compile else model
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def one_step(step: int) -> None:  # train.py's step
        batch = setup.batches[step % len(setup.batches)]
        lr = lr_at(step, cfg)
        for g in optim.param_groups:
            g["lr"] = lr * g["lr_scale"]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = train_loss(run_model, batch, setup.log_q, cfg, step)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if not torch.isfinite(loss.detach() + gnorm).item():
            raise RuntimeError(f"step {step}: non-finite loss or gradient norm")
        optim.step()

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
    flops, rows = zip(*(step_flops(model, setup.batches[s % len(setup.batches)], cfg.max_candidates)
                        for s in range(warmup, warmup + steps)))
    per_step = (t2 - t1) / steps
    return dict(step_s=per_step, seqs_per_s=cfg.batch_size / per_step, warmup_s=t1 - t0,
                flops=float(np.mean(flops)), rows=float(np.mean(rows)),
                params=sum(p.numel() for p in model.parameters()))


def main(argv: list[str] | None = None) -> str:
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
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
    p.add_argument("--max-candidates", type=int, default=0, help="train.py's --max-candidates (0: all 2R columns)")
    p.add_argument("--batches", type=int, default=8, help="distinct batches loaded before timing, cycled")
    p.add_argument("--users", type=int, default=2000, help="users of the generated sample data")
    p.add_argument("--items", type=int, default=4000, help="items of the generated sample data")
    p.add_argument("--workdir", default=None, help="where the sample data is kept (default: a temp folder)")
    p.add_argument("--matmul-n", type=int, default=None, help="matmul size for the peak rate (default: 2048 on a "
                   "CPU, 8192 on CUDA)")
    p.add_argument("--out", default=str(ROOT / "bench" / "train_step_results.md"), help="where the table is written")
    p.add_argument("--append", action="store_true", help="add the table to --out instead of replacing it")
    args = p.parse_args(argv)

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    sizes = args.batch_size or [{"small": 64, "reference": 232 if device.type == "cuda" else 8}[pr] for pr in args.preset]
    if len(sizes) != len(args.preset):
        p.error("give one --batch-size per --preset")
    load_before = os.getloadavg()[0]
    t_start = time.time()
    data, cache = sample_data(Path(args.workdir or tempfile.mkdtemp(prefix="bench_train_step.")), args.users, args.items)

    mm_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    mm_n = args.matmul_n or (2048 if device.type == "cpu" else 8192)
    rate0 = matmul_rate(device, mm_dtype, mm_n)
    print(f"matmul {mm_n}^3 {str(mm_dtype).split('.')[-1]}: {rate0 / 1e9:.1f} GFLOP/s", flush=True)

    precisions = ["fp32"] + (["bf16"] if device.type == "cuda" else [])
    results = []  # (preset, B, precision, compiled, result or error)
    for preset, bsz in zip(args.preset, sizes):
        setup = prepare(preset, bsz, data, cache, device, args.batches, args.max_candidates)
        for prec in precisions:
            for comp in [False] + ([True] if args.compile else []):
                try:
                    res = measure(setup, args.steps, args.warmup, compile=comp, amp=prec == "bf16")
                except Exception as e:  # noqa: BLE001 - a compile failure is a result, not the end of the run
                    if not comp:
                        raise
                    res = {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"}
                    import torch._dynamo as dynamo
                    dynamo.reset()
                print(f"{preset} B={bsz} {prec} compile={comp}: {res}", flush=True)
                results.append((preset, bsz, prec, comp, res))
        del setup
    rate1 = matmul_rate(device, mm_dtype, mm_n)
    rate = max(rate0, rate1)

    given = sys.argv[1:] if argv is None else argv
    cmd = " ".join(["python bench/train_step.py", *given])
    if device.type == "cuda":
        dev = f"{torch.cuda.get_device_name(device)}"
    else:
        dev = f"CPU count {os.cpu_count()} ({platform.processor() or platform.machine()}), {torch.get_num_threads()} thread(s)"
    lines = [
        "# Training step throughput (forward, loss, backward, clipping, AdamW)",
        "",
        f"Batches from the training dataset over generated sample data ({args.users:,} users, {args.items:,} items, "
        f"10-100 events a user, so R < B x N); {args.batches} distinct batches cycled; {args.warmup} untimed "
        f"warm-up steps, then {args.steps} timed; max-candidates {args.max_candidates or 'all (2R)'}.",
        "",
        f"- command: `{cmd}`",
        f"- date: {datetime.date.today().isoformat()}; torch {torch.__version__}; {device.type}: {dev}; 1-min load "
        f"average {load_before:.1f} before the run, {os.getloadavg()[0]:.1f} after; {time.time() - t_start:.0f} s in all",
        f"- measured matmul rate ({mm_n}^3, {str(mm_dtype).split('.')[-1]}): {rate0 / 1e9:.1f} GFLOP/s before, "
        f"{rate1 / 1e9:.1f} after; utilisation is over the better, {rate / 1e9:.1f} GFLOP/s",
        "",
        "| preset | params | B | mean R | precision | torch.compile | ms/step | seq/s | vs eager | warm-up s | "
        "GFLOP/step | GFLOP/s | utilisation | note |",
        "| --- | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    eager = {}
    for preset, bsz, prec, comp, r in results:
        if "error" in r:
            lines.append(f"| {preset} | - | {bsz} | - | {prec} | yes | - | - | - | - | - | - | - | failed: {r['error']} |")
            continue
        if not comp:
            eager[(preset, prec)] = r
        base = eager.get((preset, prec))
        ratio = f"{r['seqs_per_s'] / base['seqs_per_s']:.2f}" if base else "-"
        achieved = r["flops"] / r["step_s"]
        note = "compiles in the first warm-up step" if comp else ""
        lines.append(f"| {preset} | {r['params'] / 1e6:.2f}M | {bsz} | {r['rows']:,.0f} | {prec} | {'yes' if comp else 'no'} | "
                     f"{1e3 * r['step_s']:.1f} | {r['seqs_per_s']:.1f} | {ratio} | {r['warmup_s']:.1f} | "
                     f"{r['flops'] / 1e9:.2f} | {achieved / 1e9:.1f} | {100 * achieved / rate:.1f}% | {note} |")
    table = "\n".join(lines) + "\n"
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a" if args.append else "w") as f:
        f.write(("\n" if args.append else "") + table)
    return table


if __name__ == "__main__":
    main()
