"""Preprocessing throughput: get_stat.py against a plain-Python json.loads pass computing the same counts.

    python bench/preprocess.py --users 200000 [--workdir DIR]

Generates the sample data at that size (kept in --workdir for reruns), runs each method in its own process
(so peak memory is its own), checks that both computed the same item counts, prints a markdown table and
writes it to bench/preprocess_results.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def plain_python(data: Path, out: Path) -> None:
    """The baseline: json.loads every line, count in Python (what a reader would write first)."""
    import pickle
    itemnum = len(pickle.load(open(data / "indexer.pkl", "rb"))["i"])
    count, last_ts = np.zeros(itemnum + 1, np.int64), np.zeros(itemnum + 1, np.int64)
    actions, lengths = [0, 0, 0], []
    with open(data / "seq.jsonl", "rb") as f:
        for line in f:
            n = 0
            for _, item, _, _, action, ts in json.loads(line):
                if item is not None:
                    count[item] += 1
                    last_ts[item] = max(last_ts[item], ts)
                    actions[action] += 1
                    n += 1
            lengths.append(n)
    np.save(out, count)


def child(method: str, data: Path, cache: Path) -> None:
    t0 = time.perf_counter()
    if method == "get_stat":
        import get_stat
        get_stat.run(data, cache, force=True)
    else:
        plain_python(data, cache / "plain_count.npy")
    dt = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": dt, "peak_mb": peak_mb}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=200_000)
    p.add_argument("--workdir", default=None, help="where the generated data is kept (default: a temp folder)")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child[0], Path(a.child[1]), Path(a.child[2]))
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_preprocess."))
    data, cache = work / f"u{a.users}" / "data", work / f"u{a.users}" / "cache"
    if not (data / "seq.jsonl").exists():
        subprocess.run([sys.executable, str(ROOT / "make_sample_data.py"), "--out", str(data.parent),
                        "--users", str(a.users)], check=True)
    (data / "seq_offsets.pkl").unlink(missing_ok=True)  # get_stat rebuilds it: part of the pass
    cache.mkdir(parents=True, exist_ok=True)
    mb = (data / "seq.jsonl").stat().st_size / 2**20
    res = {}
    for method in ("plain_python", "get_stat"):
        out = subprocess.run([sys.executable, __file__, "--child", method, str(data), str(cache)],
                             check=True, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        res[method] = json.loads(out.stdout.strip().splitlines()[-1])
    stat = json.loads((cache / "stat.json").read_text())
    same = np.array_equal(np.load(cache / "plain_count.npy"), np.load(cache / "item_count.npy"))
    events = stat["num_events"]
    base = res["plain_python"]["seconds"]
    rows = [f"| {m} | {r['seconds']:.1f} | {mb / r['seconds']:.1f} | {events / r['seconds'] / 1e6:.2f} | "
            f"{r['peak_mb']:.0f} | {base / r['seconds']:.2f}x |" for m, r in res.items()]
    table = "\n".join([
        f"Preprocessing {a.users:,} users, {events:,} events, {mb:.0f} MB of seq.jsonl "
        f"({os.cpu_count()} CPUs, Python {platform.python_version()}); same item counts: {same}",
        "", "| method | seconds | MB/s | M events/s | peak MB | speed vs plain |", "|---|---|---|---|---|---|", *rows])
    print(table)
    (ROOT / "bench" / "preprocess_results.md").write_text(
        f"# bench/preprocess.py\n\nCommand: `python bench/preprocess.py --users {a.users}`\n\n{table}\n")


if __name__ == "__main__":
    main()
