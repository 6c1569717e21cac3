"""Exact top-K retrieval on the CPU: ours (retrieval.topk_chunked: int8 screen, exact float64 re-rank)
against faiss IndexFlatIP and a naive full score matrix + torch.topk, side by side at each thread count.

    python bench/retrieval.py [--users 10000] [--items 1000000] [--dim 64] [--k 10] [--threads 1 2]
                              [--repeats 2] [--naive-users 1000] [--append]

Random L2-normalised float32 vectors from a fixed seed. For each thread count the methods run in turn,
--repeats rounds, each method's fastest round counts (rounds interleave the methods, so a change of load
on a shared machine hits them alike); its process CPU seconds (all threads) are shown too: less sensitive
to other load, but they count threads that spin while they wait for each other. The naive method holds
the whole (users, items) score matrix (40 GB at the default size), so it runs on the first --naive-users
users and its time is scaled linearly to all users (stated in the table). Results are compared as score
sets: the exact (float64) scores of each method's returned items, sorted, must match ours within 1e-5, so
ties broken differently still count as the same result. faiss is optional (pip install faiss-cpu);
without it its row says so. Writes one table per thread count to bench/retrieval_results.md (or --out).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from retrieval import topk_chunked, topk_reference  # noqa: E402


def exact_scores(users: np.ndarray, items: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """(U, D), (M, D), (U, k) positions -> (U, k) float64 scores, sorted descending (-inf for -1)."""
    s = np.einsum("ud,ukd->uk", users.astype(np.float64), items[np.maximum(idx, 0)].astype(np.float64))
    s[idx < 0] = -np.inf
    return -np.sort(-s, axis=1)


def same(users: np.ndarray, items: np.ndarray, ours: np.ndarray, other: np.ndarray) -> bool:
    a, b = exact_scores(users, items, ours), exact_scores(users, items, other)
    return bool(np.allclose(a, b, atol=1e-5, rtol=0))


def bench_threads(args: argparse.Namespace, threads: int, users: torch.Tensor, items: torch.Tensor) -> list[str]:
    """One table: ours, faiss and naive at `threads` threads, --repeats interleaved rounds."""
    torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]  # other work on the machine slows every method; recorded
    un, it = users.numpy(), items.numpy()
    n = min(args.naive_users, args.users)
    try:
        import faiss
    except ImportError:
        faiss = None
    index = None
    if faiss is not None:
        faiss.omp_set_num_threads(threads)  # the same threads for both
        index = faiss.IndexFlatIP(args.dim)
        index.add(it)
    best = {"ours": float("inf"), "faiss": float("inf"), "naive": float("inf")}
    cpu = dict(best)  # process CPU seconds of each method's fastest round: less sensitive to other load
    out = {}
    for r in range(args.repeats):
        runs = [("ours", lambda: topk_chunked(users, items, args.k, item_chunk=args.item_chunk)[1].numpy()),
                ("naive", lambda: topk_reference(users[:n], items, args.k)[1].numpy())]
        if index is not None:
            runs.insert(1, ("faiss", lambda: index.search(un, args.k)[1]))
        for name, fn in runs:
            t, c = time.perf_counter(), time.process_time()
            out[name] = fn()
            t, c = time.perf_counter() - t, time.process_time() - c
            if t < best[name]:
                best[name], cpu[name] = t, c
            print(f"{threads} thread(s), round {r + 1}: {name} {t:.2f}s (CPU {c:.2f}s)", flush=True)
    ours = out["ours"]
    rows: list[tuple[str, float | None, float | None, str, str]] = [  # (method, seconds, CPU s, same, note)
        ("ours: retrieval.topk_chunked", best["ours"], cpu["ours"], "yes (reference)",
         "int8 screen with a proven error bound, exact float64 re-rank")]
    if index is None:
        rows.append(("faiss IndexFlatIP", None, None, "-", "skipped: faiss not importable (pip install faiss-cpu)"))
    else:
        rows.append(("faiss IndexFlatIP", best["faiss"], cpu["faiss"], "yes" if same(un, it, ours, out["faiss"]) else "NO",
                     f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads"))
    scale = args.users / max(n, 1)
    note = f"measured on {n} users ({best['naive']:.2f}s), scaled x{scale:g}" if n < args.users else ""
    rows.append(("naive: full score matrix + torch.topk", best["naive"] * scale, cpu["naive"] * scale,
                 "yes" if same(un[:n], it, ours[:n], out["naive"]) else "NO", note))

    cmd = " ".join(["python bench/retrieval.py", *args.given])
    lines = [
        f"# Exact top-{args.k} retrieval on the CPU, {threads} thread(s)",
        "",
        f"{args.users:,} users x {args.items:,} items, dim {args.dim}, random L2-normalised float32 (seed {args.seed}); "
        f"best of {args.repeats} interleaved round(s); {time.strftime('%Y-%m-%d')}.",
        "",
        f"- command: `{cmd}`",
        f"- torch {torch.__version__}, {torch.get_num_threads()} threads; CPU count {os.cpu_count()} "
        f"({platform.processor() or platform.machine()}); 1-min load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after",
        "",
        "| method | seconds | ratio to ours | CPU seconds | same results | note |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for name, sec, c, ok, note in rows:
        s = f"{sec:.2f}" if sec is not None else "-"
        r = f"{sec / best['ours']:.2f}" if sec is not None else "-"
        lines.append(f"| {name} | {s} | {r} | {c:.2f} | {ok} | {note} |" if c is not None else f"| {name} | - | - | - | {ok} | {note} |")
    return lines


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--naive-users", type=int, default=1000, help="users for the naive full matrix (time scaled)")
    p.add_argument("--item-chunk", type=int, default=65536, help="topk_chunked's item_chunk")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds; each method's fastest counts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts, one table each")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "retrieval_results.md"))
    p.add_argument("--append", action="store_true", help="add the tables to --out instead of replacing it")
    args = p.parse_args(argv)
    args.given = sys.argv[1:] if argv is None else argv

    g = torch.Generator().manual_seed(args.seed)
    users = torch.nn.functional.normalize(torch.randn(args.users, args.dim, generator=g), dim=1)  # (U, D)
    items = torch.nn.functional.normalize(torch.randn(args.items, args.dim, generator=g), dim=1)  # (M, D)
    tables = ["\n".join(bench_threads(args, t, users, items)) + "\n" for t in args.threads]
    text = "\n".join(tables)
    print(text)
    with open(args.out, "a" if args.append else "w") as f:
        f.write(("\n" if args.append else "") + text)
    return text


if __name__ == "__main__":
    main()
