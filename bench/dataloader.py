"""Data-loading throughput: sequences/s of the training dataset (dataset.TrainDataset through a DataLoader with
collate and EpochSampler, built as train.py builds it) with 0, 2 and 4 worker processes, against the rate at which
the training step consumes sequences, measured in the same run.

    python bench/dataloader.py [--users 20000] [--preset small] [--batch-size 64] [--workers 0 2 4]
    python bench/dataloader.py --users 500 --batches 5 --samples 200 --step-steps 2 --out bench/dataloader.tmp/r.md

The second command is a smoke run. The data is generated (make_sample_data.generate, then get_stat.run) into
--workdir (a temp folder by default; reused when already there). Reported: the dataset's own cost per sample
(__getitem__ in this process, no DataLoader; with the share of it spent reading and parsing the JSON line), the
loader's sequences/s for each worker count (persistent workers, prefetch_factor 4 as in train.py; time to the
first batch reported apart, then --warmup batches untimed, then --batches timed), and the training step's
sequences/s (bench/train_step.py's measurement: eager, batches preloaded, on --device; bf16 autocast on CUDA)
unless --step-rate gives it (with --step-note saying where it comes from).
Prints a markdown table and writes it to bench/dataloader_results.md (or --out).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))
import train_step  # noqa: E402  (bench/train_step.py)
from dataset import EpochSampler, collate  # noqa: E402
from model import PRESETS  # noqa: E402


def per_sample_cost(ds, n: int, seed: int) -> tuple[float, float, float]:
    """-> (µs per __getitem__, µs of it reading + parsing the line, µs per sequence of collate), in this process."""
    order = iter(EpochSampler(len(ds), seed + 1))
    keys = [next(order) for _ in range(n + 50)]
    for k in keys[:50]:  # warm-up: file pages, first-call costs
        ds[k]
    keys = keys[50:]
    t = time.perf_counter()
    samples = [ds[k] for k in keys]
    t_item = (time.perf_counter() - t) / n
    lines = [int(ds.lines[k % len(ds.lines)]) for k in keys]
    t = time.perf_counter()
    for line in lines:
        ds.reader.read(line)
    t_read = (time.perf_counter() - t) / n
    t = time.perf_counter()
    collate(samples)
    t_collate = (time.perf_counter() - t) / n
    return 1e6 * t_item, 1e6 * t_read, 1e6 * t_collate


def loader_rate(ds, batch_size: int, workers: int, batches: int, warmup: int, seed: int) -> dict:
    loader = DataLoader(ds, batch_size=batch_size, sampler=EpochSampler(len(ds), seed), collate_fn=collate,
                        num_workers=workers, drop_last=True, persistent_workers=workers > 0,
                        prefetch_factor=4 if workers else None, generator=torch.Generator())
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    t1 = time.perf_counter()
    for _ in range(warmup):
        next(it)
    t2 = time.perf_counter()
    for _ in range(batches):
        next(it)
    t3 = time.perf_counter()
    del it, loader  # stops the workers
    return dict(first_s=t1 - t0, seqs_per_s=batches * batch_size / (t3 - t2))


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=20_000, help="users of the generated sample data")
    p.add_argument("--items", type=int, default=4000, help="items of the generated sample data")
    p.add_argument("--preset", default="small", choices=["small", "reference"],
                   help="model preset: its maxlen shapes the samples, and its training step is the consumer")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per batch (small preset's training batch)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4], help="DataLoader worker counts to measure")
    p.add_argument("--batches", type=int, default=100, help="timed batches per worker count")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches after the first one")
    p.add_argument("--samples", type=int, default=2000, help="samples timed for the per-sample cost")
    p.add_argument("--step-rate", type=float, default=None,
                   help="training step consumption in sequences/s (default: measured here)")
    p.add_argument("--step-note", default="given (--step-rate)", help="where --step-rate comes from, for the table")
    p.add_argument("--step-steps", type=int, default=20, help="timed training steps when measuring the step rate")
    p.add_argument("--device", default="cpu", help="where the training step is measured (cpu, cuda, cuda:N)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process (the training step)")
    p.add_argument("--seed", type=int, default=42, help="data order and negatives")
    p.add_argument("--workdir", default=None, help="where the sample data is kept (default: a temp folder)")
    p.add_argument("--out", default=str(BENCH / "dataloader_results.md"), help="where the table is written")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    t_start = time.time()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_dataloader."))
    data, cache = train_step.sample_data(work, args.users, args.items, args.seed)
    maxlen = PRESETS[args.preset].maxlen
    ds, stat = train_step.train_dataset(data, cache, maxlen, args.seed)
    mb = (data / "seq.jsonl").stat().st_size / 2**20

    us_item, us_read, us_collate = per_sample_cost(ds, args.samples, args.seed)
    print(f"__getitem__ {us_item:.0f} us (read+parse {us_read:.0f} us), collate {us_collate:.0f} us/seq", flush=True)
    rates = {}
    for w in args.workers:
        rates[w] = loader_rate(ds, args.batch_size, w, args.batches, args.warmup, args.seed)
        print(f"{w} workers: {rates[w]}", flush=True)

    if args.step_rate is None:
        device = torch.device(args.device)
        setup = train_step.prepare(args.preset, args.batch_size, data, cache, device, 8)
        step = train_step.measure(setup, args.step_steps, 3, amp=device.type == "cuda")
        step_rate, step_note = step["seqs_per_s"], (f"measured here: {args.preset} preset, B={args.batch_size}, eager, "
                                                    f"{args.step_steps} steps, batches preloaded, {device}")
    else:
        step_rate, step_note = args.step_rate, args.step_note
    print(f"training step: {step_rate:.1f} seq/s", flush=True)

    cpus = os.cpu_count() or 1
    given = sys.argv[1:] if argv is None else argv
    cmd = " ".join(["python bench/dataloader.py", *given])
    item_rate = 1e6 / (us_item + us_collate)
    lines = [
        "# Training data loading: TrainDataset + collate through a DataLoader, against the training step",
        "",
        f"Generated sample data: {stat['num_users']:,} users, {stat['num_events']:,} events, {mb:.0f} MB of seq.jsonl; "
        f"{args.preset} preset (N = {maxlen + 1} positions), batches of {args.batch_size}; {args.batches} timed "
        f"batches per worker count after the first and {args.warmup} untimed.",
        "",
        f"- command: `{cmd}`",
        f"- date: {datetime.date.today().isoformat()}; torch {torch.__version__}, {torch.get_num_threads()} thread(s) "
        f"in the main process (1 per worker); CPU count {cpus} ({platform.processor() or platform.machine()}); "
        f"1-min load average {load_before:.1f} before the run, {os.getloadavg()[0]:.1f} after; "
        f"{time.time() - t_start:.0f} s in all",
        f"- dataset per sample (0 workers, no DataLoader): __getitem__ {us_item:.0f} µs, of which reading and parsing "
        f"the JSON line {us_read:.0f} µs ({100 * us_read / us_item:.0f}%); collate {us_collate:.0f} µs per sequence; "
        f"together at most {item_rate:,.0f} sequences/s per process",
        f"- training step consumption: {step_rate:.1f} sequences/s ({step_note})",
        f"- with {cpus} CPU cores, more than {max(cpus - 1, 1)}-{cpus} worker(s) cannot help on this machine: workers, "
        "the training process and anything else running share the cores (here the timed loader runs without a "
        "training step beside it, so it has the cores a real run would share)",
        "",
        "| workers | seq/s | vs step consumption | time to first batch s | note |",
        "| ---: | ---: | ---: | ---: | --- |",
    ]
    for w, r in rates.items():
        note = "main process" if w == 0 else ("more workers than CPU cores" if w > cpus else
                                              ("as many workers as CPU cores" if w == cpus else ""))
        lines.append(f"| {w} | {r['seqs_per_s']:,.0f} | {r['seqs_per_s'] / step_rate:.1f}x | {r['first_s']:.2f} | {note} |")
    table = "\n".join(lines) + "\n"
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            step_rate=step_rate, step_note=step_note, cpus=cpus, us_item=us_item, us_read=us_read,
            us_collate=us_collate, mean_events=stat["num_events"] / max(stat["num_users"], 1),
            rates={str(w): r for w, r in rates.items()}), indent=1))
    return table


if __name__ == "__main__":
    main()
