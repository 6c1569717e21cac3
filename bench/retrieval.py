"""Exact top-K retrieval on the CPU: ours (retrieval.topk_chunked) against faiss IndexFlatIP and a naive
full score matrix + torch.topk.

    python bench/retrieval.py [--users 10000] [--items 1000000] [--dim 64] [--k 10] [--naive-users 2000]

Random L2-normalised float32 vectors from a fixed seed. The naive method holds the whole (users, items)
score matrix (40 GB at the default size), so it runs on the first --naive-users users and its time is
scaled linearly to all users (stated in the table). Results are compared as score sets: the exact
(float64) scores of each method's returned items, sorted, must match ours within 1e-5, so ties broken
differently still count as the same result. faiss is optional (pip install faiss-cpu); without it its
row says so. Writes the table to bench/retrieval_results.md (or --out).
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


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--naive-users", type=int, default=2000, help="users for the naive full matrix (time scaled)")
    p.add_argument("--item-chunk", type=int, default=65536, help="topk_chunked's item_chunk")
    p.add_argument("--repeats", type=int, default=1, help="runs per method; the fastest counts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch and faiss threads (default: torch's default)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "retrieval_results.md"))
    p.add_argument("--append", action="store_true", help="add the table to --out instead of replacing it")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]  # other work on the machine slows every method alike; recorded
    g = torch.Generator().manual_seed(args.seed)
    users = torch.nn.functional.normalize(torch.randn(args.users, args.dim, generator=g), dim=1)  # (U, D)
    items = torch.nn.functional.normalize(torch.randn(args.items, args.dim, generator=g), dim=1)  # (M, D)
    un, it = users.numpy(), items.numpy()
    rows: list[tuple[str, float | None, str, str]] = []  # (method, seconds, same, note)

    t_ours, (_, ours) = timed(lambda: topk_chunked(users, items, args.k, item_chunk=args.item_chunk), args.repeats)
    ours = ours.numpy()
    rows.append(("ours: retrieval.topk_chunked", t_ours, "yes (reference)", ""))
    print(f"ours: {t_ours:.2f}s", flush=True)

    try:
        import faiss
    except ImportError:
        faiss = None
    if faiss is None:
        rows.append(("faiss IndexFlatIP", None, "-", "skipped: faiss not importable (pip install faiss-cpu)"))
    else:
        faiss.omp_set_num_threads(torch.get_num_threads())  # the same threads for both
        index = faiss.IndexFlatIP(args.dim)
        index.add(it)
        t_f, (_, fi) = timed(lambda: index.search(un, args.k), args.repeats)
        rows.append(("faiss IndexFlatIP", t_f, "yes" if same(un, it, ours, fi) else "NO",
                     f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads"))
        print(f"faiss: {t_f:.2f}s", flush=True)
        del index

    n = min(args.naive_users, args.users)
    t_n, (_, ni) = timed(lambda: topk_reference(users[:n], items, args.k), args.repeats)
    scale = args.users / max(n, 1)
    note = f"measured on {n} users ({t_n:.2f}s), scaled x{scale:g}" if n < args.users else ""
    rows.append(("naive: full score matrix + torch.topk", t_n * scale,
                 "yes" if same(un[:n], it, ours[:n], ni.numpy()) else "NO", note))
    print(f"naive: {t_n:.2f}s on {n} users", flush=True)

    given = sys.argv[1:] if argv is None else argv
    cmd = " ".join(["python bench/retrieval.py", *given])
    lines = [
        f"# Exact top-{args.k} retrieval on the CPU",
        "",
        f"{args.users:,} users x {args.items:,} items, dim {args.dim}, random L2-normalised float32 (seed {args.seed}); "
        f"best of {args.repeats} run(s).",
        "",
        f"- command: `{cmd}`",
        f"- torch {torch.__version__}, {torch.get_num_threads()} threads; CPU count {os.cpu_count()} "
        f"({platform.processor() or platform.machine()}); 1-min load average {load_before:.1f} before the run, "
        f"{os.getloadavg()[0]:.1f} after",
        "",
        "| method | seconds | ratio to ours | same results | note |",
        "| --- | ---: | ---: | --- | --- |",
    ]
    for name, sec, ok, note in rows:
        s = f"{sec:.2f}" if sec is not None else "-"
        r = f"{sec / t_ours:.2f}" if sec is not None else "-"
        lines.append(f"| {name} | {s} | {r} | {ok} | {note} |")
    table = "\n".join(lines) + "\n"
    print(table)
    with open(args.out, "a" if args.append else "w") as f:
        f.write(("\n" if args.append else "") + table)
    return table


if __name__ == "__main__":
    main()
