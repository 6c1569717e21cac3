"""Benchmark: converting a creative_emb part-file folder into the item table (mm_emb.ensure_table).

    python bench/mm_convert.py [--items 1000000] [--dim 1024] [--workdir DIR] [--no-baseline]

Writes a folder emb_82_{dim}/ of part files of JSON lines {"anonymous_cid": ..., "emb": [...]} (float32 values
written as json.dumps writes them, about 21 characters each: 1M x 1024 is ~21 GB of text), with an indexer that
knows 95% of the ids (the rest are cold items). Each method runs in its own process; reported: source MB/s,
seconds, peak memory (anonymous memory sampled every 50 ms, the process's own; the high-water RSS also counts the
table's file pages, which the kernel writes back and evicts at will). The baseline is the reference's loader:
json.loads every line into a dict of numpy vectors (the whole table in memory). Prints a markdown table and
writes it to bench/mm_convert_results.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FID = 82


def generate(folder: Path, items: int, dim: int, parts: int) -> np.ndarray:
    """The part files (a pool of formatted vectors reused under distinct ids: generation is not what is measured)
    -> item_raw_id (itemnum+1,) of an indexer that knows 95% of the ids."""
    rng = np.random.default_rng(0)
    pool = [json.dumps((0.05 * rng.standard_normal(dim)).astype(np.float32).tolist()) for _ in range(257)]
    cids = 20_000_000_000 + rng.permutation(items) * 3
    folder.mkdir(parents=True, exist_ok=True)
    for k, chunk in enumerate(np.array_split(cids, parts)):
        with open(folder / f"part-{k:05d}", "w") as f:
            for j, c in enumerate(chunk.tolist()):
                f.write(f'{{"anonymous_cid": {c}, "emb": {pool[(c // 3) % 257]}}}\n')
    known = np.sort(cids[rng.random(items) < 0.95])
    return np.concatenate([[0], known]).astype(np.int64)


def anon_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


def reference_loader(folder: Path) -> int:
    """What the competition reference does: every vector into a dict in memory."""
    emb = {}
    for p in sorted(folder.iterdir()):
        with open(p, encoding="utf-8") as f:
            for line in f:
                d = json.loads(line.strip())
                emb[d["anonymous_cid"]] = np.array(d["emb"], dtype=np.float32)
    return len(emb)


def child(method: str, work: Path, dim: int) -> None:
    import mm_emb  # imported before the clock starts (polars)

    peak = [anon_kb()]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], anon_kb())

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    if method == "mm_emb":
        meta = mm_emb.ensure_table(work / "creative_emb", work / "cache", FID, np.load(work / "item_raw_id.npy"),
                                   progress=False)
        n = meta["vectors"]
    else:
        n = reference_loader(work / "creative_emb" / f"emb_{FID}_{dim}")
    dt = time.perf_counter() - t0
    done.set()
    peak[0] = max(peak[0], anon_kb())
    print(json.dumps({"seconds": dt, "vectors": n, "peak_anon_mb": peak[0] / 1024,
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--parts", type=int, default=8)
    p.add_argument("--workdir", default=None, help="where the generated files are kept (default: a temp folder, "
                   "deleted afterwards)")
    p.add_argument("--no-baseline", action="store_true", help="skip the reference loader (it holds every vector)")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child[0], Path(a.child[1]), int(a.child[2]))
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_mm_convert."))
    src = work / "creative_emb" / f"emb_{FID}_{a.dim}"
    try:
        if not src.exists():
            t0 = time.perf_counter()
            raw = generate(src, a.items, a.dim, a.parts)
            np.save(work / "item_raw_id.npy", raw)
            print(f"generated {a.items:,} x {a.dim} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        shutil.rmtree(work / "cache", ignore_errors=True)  # convert from scratch
        mb = sum(f.stat().st_size for f in src.iterdir()) / 2**20
        res = {}
        for method in ["mm_emb"] + ([] if a.no_baseline else ["reference_dict"]):
            out = subprocess.run([sys.executable, __file__, "--child", method, str(work), str(a.dim)], check=True,
                                 capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            res[method] = json.loads(out.stdout.strip().splitlines()[-1])
        table_gb = (len(np.load(work / "item_raw_id.npy")) * a.dim * 4) / 2**30
        rows = [f"| {m} | {r['seconds']:.1f} | {mb / r['seconds']:.1f} | {r['vectors'] / r['seconds'] / 1e3:.1f} | "
                f"{r['peak_anon_mb']:.0f} | {r['maxrss_mb']:.0f} |" for m, r in res.items()]
        table = "\n".join([
            f"Converting {a.items:,} vectors of dim {a.dim} ({mb:,.0f} MB of JSON lines in {a.parts} part files; "
            f"table {table_gb:.1f} GB) on {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "", "| method | seconds | source MB/s | k vectors/s | peak anon MB | max RSS MB (incl. table pages) |",
            "|---|---|---|---|---|---|", *rows])
        print(table)
        cmd = " ".join(["python bench/mm_convert.py", f"--items {a.items}", f"--dim {a.dim}"]
                       + (["--no-baseline"] if a.no_baseline else []))
        (ROOT / "bench" / "mm_convert_results.md").write_text(f"# bench/mm_convert.py\n\nCommand: `{cmd}`\n\n{table}\n")
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
