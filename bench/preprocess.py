"""Preprocessing throughput: get_stat.py with 1 and 2 processes against a plain-Python json.loads pass computing
the same counts, side by side in one run.

    python bench/preprocess.py --users 1000000 [--items 4000] [--workers 1 2] [--workdir DIR]

Generates the sample data at that size (kept in --workdir for reruns), runs each method in its own process
(so that peak memory is its own; a get_stat run's workers are measured apart, the largest of them reported),
checks that every get_stat run wrote the same outputs (all cache files, stat.json but its fingerprints,
seq_offsets.pkl) and that they equal the plain pass's (item counts, last timestamps, action counts, events,
sequence lengths), prints a markdown table and writes it to bench/preprocess_results.md (keeping the file's
"## Earlier runs" section).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "preprocess_results.md"


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
    np.savez(out, count=count, last_ts=last_ts, actions=np.array(actions), lengths=np.array(lengths))


def child(method: str, data: Path, cache: Path) -> None:
    t0, c0 = time.perf_counter(), time.process_time()
    if method == "plain_python":
        plain_python(data, cache / "plain.npz")
    else:
        import get_stat
        get_stat.run(data, cache, force=True, workers=int(method.split(":")[1]))
    dt = time.perf_counter() - t0
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"seconds": dt, "cpu_s": time.process_time() - c0 + kids.ru_utime + kids.ru_stime,
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "worker_peak_mb": kids.ru_maxrss / 1024}))


def same_outputs(caches: list[Path], offsets: list[Path]) -> bool:
    """Every run wrote the same files (stat.json apart from its fingerprints)."""
    first = caches[0]
    for c in caches[1:]:
        for f in ("item_count.npy", "item_last_ts.npy", "item_feat.npy", "item_raw_id.npy", "line_len.npy"):
            if not np.array_equal(np.load(first / f), np.load(c / f)):
                return False
        a, b = (json.loads((x / "stat.json").read_text()) for x in (first, c))
        if {**a, "sources": None} != {**b, "sources": None}:
            return False
    return all(o.read_bytes() == offsets[0].read_bytes() for o in offsets)


def equals_plain(plain: Path, cache: Path) -> bool:
    p = np.load(plain)
    stat = json.loads((cache / "stat.json").read_text())
    lengths = p["lengths"]
    s = stat["seq_len"]
    return (np.array_equal(p["count"], np.load(cache / "item_count.npy"))
            and np.array_equal(p["last_ts"], np.load(cache / "item_last_ts.npy"))
            and np.array_equal(lengths, np.load(cache / "line_len.npy"))
            and stat["action_counts"] == {str(a): int(c) for a, c in enumerate(p["actions"])}
            and stat["num_events"] == int(p["count"].sum()) and stat["num_users"] == len(lengths)
            and [s["min"], s["max"], s["mean"], s["p50"], s["p95"]] == [
                int(lengths.min()), int(lengths.max()), float(lengths.mean()),
                float(np.percentile(lengths, 50)), float(np.percentile(lengths, 95))])


def _shown_args(args: list[str]) -> list[str]:
    """The command's arguments without --workdir (where the data is kept; no effect on the figures)."""
    out, skip = [], False
    for x in args:
        if skip or x == "--workdir" or x.startswith("--workdir="):
            skip = x == "--workdir"
            continue
        out.append(x)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=200_000)
    p.add_argument("--items", type=int, default=4000, help="catalogue of the generated data")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="get_stat process counts to measure")
    p.add_argument("--workdir", default=None, help="where the generated data is kept (default: a temp folder)")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child[0], Path(a.child[1]), Path(a.child[2]))
    load_before, t_start = os.getloadavg(), time.time()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_preprocess."))
    base = work / (f"u{a.users}" + (f"_i{a.items}" if a.items != 4000 else ""))
    data = base / "data"
    if not (data / "seq.jsonl").exists():
        subprocess.run([sys.executable, str(ROOT / "make_sample_data.py"), "--out", str(base),
                        "--users", str(a.users), "--items", str(a.items)], check=True)
    mb = (data / "seq.jsonl").stat().st_size / 2**20
    res, caches, offsets = {}, [], []
    for method in ["plain_python"] + [f"get_stat:{w}" for w in a.workers]:
        cache = base / ("cache_" + method.replace(":", "_"))
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        (data / "seq_offsets.pkl").unlink(missing_ok=True)  # get_stat rebuilds it: part of the pass
        out = subprocess.run([sys.executable, __file__, "--child", method, str(data), str(cache)],
                             check=True, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        res[method] = json.loads(out.stdout.strip().splitlines()[-1])
        if method != "plain_python":
            caches.append(cache)
            offsets.append(cache / "seq_offsets.pkl")
            shutil.move(data / "seq_offsets.pkl", offsets[-1])
    stat = json.loads((caches[0] / "stat.json").read_text())
    same = same_outputs(caches, offsets) and all(equals_plain(base / "cache_plain_python" / "plain.npz", c) for c in caches)
    events = stat["num_events"]
    base_s = res["plain_python"]["seconds"]
    rows = [f"| {m.split(':')[0]} | {m.split(':')[1] if ':' in m else 1} | {r['seconds']:.1f} | {mb / r['seconds']:.1f} | "
            f"{events / r['seconds'] / 1e6:.2f} | {r['cpu_s']:.1f} | {r['peak_mb']:.0f} | "
            f"{r['worker_peak_mb']:.0f} | {base_s / r['seconds']:.2f}x |" if m != "plain_python" else
            f"| plain_python | 1 | {r['seconds']:.1f} | {mb / r['seconds']:.1f} | {events / r['seconds'] / 1e6:.2f} | "
            f"{r['cpu_s']:.1f} | {r['peak_mb']:.0f} | - | 1.00x |" for m, r in res.items()]
    import msgspec
    load_after = os.getloadavg()
    table = "\n".join([
        f"Preprocessing {a.users:,} users, {events:,} events, {a.items:,} items, {mb:.0f} MB of seq.jsonl; "
        f"identical outputs (every get_stat run, and the plain pass's counts): {same}", "",
        f"- command: `python bench/preprocess.py {' '.join(_shown_args(sys.argv[1:]))}`",
        f"- date: {datetime.date.today().isoformat()}; {os.cpu_count()} CPUs ({platform.machine()}), Python "
        f"{platform.python_version()}, msgspec {msgspec.__version__}, numpy {np.__version__}; 1/5/15-min load average "
        f"{' '.join(f'{x:.1f}' for x in load_before)} before, {' '.join(f'{x:.1f}' for x in load_after)} after; "
        f"{time.time() - t_start:.0f} s in all",
        "- CPU s: user + system time of the run and its worker processes; peak MB: resident set of the run's "
        "own process, and of its largest worker", "",
        "| method | processes | seconds | MB/s | M events/s | CPU s | peak MB | worker peak MB | speed vs plain |",
        "|---|---|---|---|---|---|---|---|---|", *rows])
    print(table)
    old = RESULTS.read_text() if RESULTS.exists() else ""
    history = old[old.index("\n## Earlier runs"):] if "\n## Earlier runs" in old else ""
    RESULTS.write_text(f"# bench/preprocess.py\n\n{table}\n{history}")


if __name__ == "__main__":
    main()
