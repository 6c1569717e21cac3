"""Preprocess: one streaming pass over seq.jsonl with polars.

Writes to the cache folder (atomically, each file renamed into place):
  stat.json         schema (feature ids and vocabulary sizes), counts, sequence-length statistics
  item_count.npy    (itemnum+1,) int64   events per item over all action types (log-q correction)
  item_last_ts.npy  (itemnum+1,) int64   each item's last timestamp (pool of active global negatives)
  item_feat.npy     (itemnum+1, F) int32 item sparse features, columns in sorted fid order, 0 = missing
  item_raw_id.npy   (itemnum+1,) int64   raw creative id of each re-id (for results in raw ids)
and seq_offsets.pkl beside seq.jsonl when it is missing. Memory is bounded by the chunk size and the
per-item arrays, never by the number of users. A second run on unchanged inputs does nothing.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import polars as pl
from tqdm import tqdm

from common import (STAT_FILE, atomic_save_json, atomic_save_npy, atomic_save_pickle, data_error, env_default,
                    exit_on_data_error, iter_line_blocks, load_stat, safe_load_pickle)
from records import FEATURE_ANY_RE, FEATURE_ARRAY_RE, FEATURE_INT_RE, LINE_RE, RECORD_FIELDS_RE, RECORD_SPAN_RE, parse_line

STAT_VERSION = 2  # 2: item array features (schema item_array / item_array_len)
MAX_ITEM_ARRAY_LEN = 16  # slots kept per array-valued item feature; longer lists are cut
CACHE_FILES = ("item_count.npy", "item_last_ts.npy", "item_feat.npy", "item_raw_id.npy", STAT_FILE)


def _fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_line_chunks(path: Path, chunk_bytes: int):
    """Yield (first_line_no, line_start_offsets, lines) over whole lines, chunk by chunk (bounded memory)."""
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                     desc=f"reading {path.name}", mininterval=1.0) as bar:
        pos, line_no = 0, 1
        for body in iter_line_blocks(f, chunk_bytes):
            nl = np.flatnonzero(np.frombuffer(body, dtype=np.uint8) == 10)
            starts = np.concatenate([[0], nl[:-1] + 1]) if body.endswith(b"\n") else np.concatenate([[0], nl + 1])
            if pos == 0 and body.startswith(b"\xef\xbb\xbf"):
                body = b"   " + body[3:]  # a BOM: keep byte offsets, drop the mark
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as e:
                bad = int(np.searchsorted(starts, e.start, side="right"))
                raise data_error(path, line_no + bad - 1, f"not UTF-8 ({e.reason})") from None
            lines = text.split("\n")
            if body.endswith(b"\n"):
                lines.pop()
            yield line_no, starts + pos, lines
            pos += len(body)
            line_no += len(lines)
            bar.update(len(body))


def _canonical_lines(lines: list[str], ok: np.ndarray, path: Path, first: int) -> list[str]:
    """Lines the fast regex rejects are checked by the strict parser: a clear error, or re-serialised."""
    import json

    lines = list(lines)
    for i in np.flatnonzero(~ok):
        records = parse_line(lines[i], str(path), first + int(i))  # raises for invalid lines
        lines[i] = json.dumps(records)
    return lines


def parse_chunk(lines: list[str], path: Path, first: int) -> pl.DataFrame:
    """One row per record: line, user, item, ufeat, ifeat, action, ts (nulls where the record has none)."""
    s = pl.Series("line", lines)
    ok = s.str.contains(LINE_RE).fill_null(False).to_numpy()
    if not ok.all():
        s = pl.Series("line", _canonical_lines(lines, ok, path, first))
    df = pl.DataFrame({"line": s, "ln": np.arange(first, first + len(lines), dtype=np.int64)})
    df = (df.select("ln", pl.col("line").str.extract_all(RECORD_SPAN_RE).alias("rec")).explode("rec")
          .select("ln", pl.col("rec").str.extract_groups(RECORD_FIELDS_RE).alias("g")).unnest("g"))
    df.columns = ["ln", "user", "item", "ufeat", "ifeat", "action", "ts"]
    df = df.with_columns(
        pl.col("item").replace("null", None).cast(pl.Int64),
        pl.col("action").replace("null", None).cast(pl.Int64),
        pl.col("ts").cast(pl.Int64),
        pl.col("ufeat").replace("null", None),
        pl.col("ifeat").replace("null", None),
    )
    # what the regex cannot say (field combinations, ranges): the strict parser names the first bad line
    item, act = pl.col("item"), pl.col("action")
    interaction_bad = item.is_not_null() & ((item <= 0) | act.is_null() | (act < 0) | (act > 2)
                                            | pl.col("ufeat").is_not_null())
    profile_bad = item.is_null() & (pl.col("ifeat").is_not_null() | act.is_not_null())
    user_bad = ~pl.col("user").str.starts_with('"') & (pl.col("user").cast(pl.Int64, strict=False) <= 0)
    bad = df.filter(interaction_bad | profile_bad | user_bad)
    if len(bad):
        ln = int(bad["ln"][0])
        parse_line(s[ln - first], str(path), ln)
        raise data_error(path, ln, "invalid record")  # not reached: the parser is stricter than these checks
    return df


class Stats:
    """Accumulators over chunks; per-item arrays are sized by the indexer, never by users."""

    def __init__(self, itemnum: int):
        self.itemnum = itemnum
        self.item_count = np.zeros(itemnum + 1, np.int64)
        self.item_last_ts = np.zeros(itemnum + 1, np.int64)
        self.item_feat: dict[str, np.ndarray] = {}  # fid -> (itemnum+1,) int32
        self.item_array: dict[str, np.ndarray] = {}  # fid -> (itemnum+1, MAX_ITEM_ARRAY_LEN) int32, right-padded
        self.item_array_len: dict[str, int] = {}
        self.user_max: dict[str, int] = {}
        self.user_array_len: dict[str, int] = {}
        self.action_counts = np.zeros(3, np.int64)
        self.lengths: list[np.ndarray] = []
        # tolerated oddities, counted for the summary (see README, troubleshooting)
        self.users: list[pl.Series] = []  # each line's user id, to count duplicate users
        self.unordered_users = 0  # lines whose item timestamps go backwards (kept in file order)
        self.min_ts, self.max_ts = None, None
        self.num_events = 0

    def update(self, df: pl.DataFrame, path: Path) -> None:
        items = df.filter(pl.col("item").is_not_null())
        ids = items["item"].to_numpy()
        if len(ids) and ids.max() > self.itemnum:
            bad = items.filter(pl.col("item") > self.itemnum).row(0, named=True)
            raise data_error(path, bad["ln"], f"item id {bad['item']} is beyond the indexer's {self.itemnum} items")
        self.item_count += np.bincount(ids, minlength=self.itemnum + 1)
        last = items.group_by("item").agg(pl.col("ts").max(), pl.col("ifeat").last())
        li, lt = last["item"].to_numpy(), last["ts"].to_numpy()
        self.item_last_ts[li] = np.maximum(self.item_last_ts[li], lt)
        self.action_counts += np.bincount(items["action"].to_numpy(), minlength=3)[:3]
        self.num_events += len(ids)
        ts = df["ts"]
        self.min_ts = min(ts.min(), self.min_ts if self.min_ts is not None else ts.min())
        self.max_ts = max(ts.max(), self.max_ts if self.max_ts is not None else ts.max())
        per_line = df.group_by("ln").agg(
            pl.col("item").count().alias("n"), pl.col("user").first(),
            (pl.col("ts").filter(pl.col("item").is_not_null()).diff() < 0).any().alias("unordered"))
        self.lengths.append(per_line["n"].to_numpy().astype(np.int32))
        self.users.append(per_line["user"])
        self.unordered_users += int(per_line["unordered"].sum())

        # item features: the last record of each item in this chunk wins
        pairs = (last.select("item", pl.col("ifeat").str.extract_all(FEATURE_INT_RE).alias("kv")).explode("kv")
                 .drop_nulls("kv")
                 .select("item", pl.col("kv").str.extract_groups(FEATURE_INT_RE).alias("g")).unnest("g"))
        pairs.columns = ["item", "fid", "value"]
        for col in self.item_feat.values():  # a feature absent from the item's last record is missing
            col[li] = 0
        for (fid,), g in pairs.with_columns(pl.col("value").cast(pl.Int64)).group_by("fid"):
            col = self.item_feat.setdefault(fid, np.zeros(self.itemnum + 1, np.int32))
            col[g["item"].to_numpy()] = np.maximum(g["value"].to_numpy(), 0)
        # array-valued item features (e.g. a movie's genres): one column per list slot
        arrays = (last.select("item", pl.col("ifeat").str.extract_all(FEATURE_ARRAY_RE).alias("kv")).explode("kv")
                  .drop_nulls("kv")
                  .select("item", pl.col("kv").str.extract_groups(FEATURE_ARRAY_RE).alias("g")).unnest("g"))
        arrays.columns = ["item", "fid", "values"]
        for col in self.item_array.values():
            col[li] = 0
        for (fid,), g in arrays.group_by("fid"):
            v = (g.select("item", pl.col("values").str.extract_all(r"-?\d+").list.eval(pl.element().cast(pl.Int64)))
                 .with_columns(pos=pl.int_ranges(pl.col("values").list.len())).explode(["values", "pos"])
                 .drop_nulls("values").filter(pl.col("pos") < MAX_ITEM_ARRAY_LEN))
            col = self.item_array.setdefault(fid, np.zeros((self.itemnum + 1, MAX_ITEM_ARRAY_LEN), np.int32))
            col[v["item"].to_numpy(), v["pos"].to_numpy()] = np.maximum(v["values"].to_numpy(), 0)
            self.item_array_len[fid] = max(self.item_array_len.get(fid, 1), int(v["pos"].max() or 0) + 1)

        # user features: max value (vocabulary) and max list length of array features
        uf = (df.filter(pl.col("ufeat").is_not_null())
              .select(pl.col("ufeat").str.extract_all(FEATURE_ANY_RE).alias("kv")).explode("kv").drop_nulls("kv")
              .select(pl.col("kv").str.extract_groups(FEATURE_ANY_RE).alias("g")).unnest("g"))
        uf.columns = ["fid", "value"]
        agg = (uf.with_columns(pl.col("value").str.starts_with("[").alias("arr"),
                               pl.col("value").str.extract_all(r"-?\d+").alias("nums"))
               .with_columns(pl.col("nums").list.len().alias("n"),
                             pl.col("nums").list.eval(pl.element().cast(pl.Int64)).list.max().alias("mx"))
               .group_by("fid").agg(pl.col("mx").max(), pl.col("arr").any(), pl.col("n").max()))
        for fid, mx, arr, n in agg.iter_rows():
            self.user_max[fid] = max(self.user_max.get(fid, 0), int(mx or 0))
            if arr:
                self.user_array_len[fid] = max(self.user_array_len.get(fid, 0), int(n))


def _vocab(indexer_f: dict, fid: str, seen_max: int) -> int:
    return max(len(indexer_f.get(fid, {})), seen_max) + 1  # +1: index 0 is padding


def run(data_dir: Path, cache_dir: Path, chunk_bytes: int = 64 << 20, force: bool = False) -> dict:
    seq_path, offsets_path, indexer_path = data_dir / "seq.jsonl", data_dir / "seq_offsets.pkl", data_dir / "indexer.pkl"
    for p in (seq_path, indexer_path):
        if not p.exists():
            raise data_error(p, None, "file not found")
    sources = {"seq": _fingerprint(seq_path), "indexer": _fingerprint(indexer_path)}
    if not force and all((cache_dir / f).exists() for f in CACHE_FILES) and offsets_path.exists():
        stat = load_stat(cache_dir)
        if stat.get("version") == STAT_VERSION and stat.get("sources") == sources:
            print(f"get_stat: cache in {cache_dir} is up to date, nothing to do")
            return stat

    t0 = time.time()
    indexer = safe_load_pickle(indexer_path)
    if not isinstance(indexer, dict) or not {"i", "f"} <= set(indexer):
        raise data_error(indexer_path, None, "expected a dict with keys 'u', 'i', 'f'")
    itemnum = len(indexer["i"])
    stats = Stats(itemnum)
    offsets = []
    for first, starts, lines in read_line_chunks(seq_path, chunk_bytes):
        offsets.append(starts)
        stats.update(parse_chunk(lines, seq_path, first), seq_path)
    offsets = np.concatenate(offsets) if offsets else np.zeros(0, np.int64)
    if len(offsets) == 0:
        raise data_error(seq_path, None, "empty file; expected one JSON line per user")

    if offsets_path.exists():
        given = np.asarray(safe_load_pickle(offsets_path), dtype=np.int64)
        if len(given) != len(offsets) or not np.array_equal(given, offsets):
            diff = int(np.flatnonzero(given[:len(offsets)] != offsets[:len(given)])[0]) + 1 \
                if not np.array_equal(given[:len(offsets)], offsets[:len(given)]) else min(len(given), len(offsets)) + 1
            raise data_error(offsets_path, None, f"does not match {seq_path.name} ({len(given)} offsets for "
                             f"{len(offsets)} lines, first difference at line {diff}); delete it to rebuild")
    else:
        atomic_save_pickle(offsets.tolist(), offsets_path)

    # item_feat.npy columns: the sparse features, then each array feature's slots (see FeatureSpec)
    item_fids = sorted(stats.item_feat, key=int)
    array_fids = sorted(set(stats.item_array) - set(item_fids), key=int)
    item_feat = np.concatenate([stats.item_feat[fid][:, None] for fid in item_fids]
                               + [stats.item_array[fid][:, :stats.item_array_len[fid]] for fid in array_fids]
                               + [np.zeros((itemnum + 1, 0), np.int32)], axis=1)
    raw_id = np.zeros(itemnum + 1, np.int64)
    for raw, re_id in indexer["i"].items():
        if 0 < re_id <= itemnum and isinstance(raw, int):
            raw_id[re_id] = raw
    lengths = np.concatenate(stats.lengths)
    f = indexer["f"]
    user_fids = sorted(stats.user_max, key=int)
    stat = {
        "version": STAT_VERSION,
        "sources": sources,
        "itemnum": itemnum,
        "num_users": int(len(lengths)),
        "num_events": int(stats.num_events),
        "num_active_items": int((stats.item_count > 0).sum()),
        "action_counts": {str(a): int(c) for a, c in enumerate(stats.action_counts)},
        "seq_len": {"min": int(lengths.min()), "mean": float(lengths.mean()), "p50": float(np.percentile(lengths, 50)),
                    "p95": float(np.percentile(lengths, 95)), "max": int(lengths.max())},
        "min_ts": int(stats.min_ts), "max_ts": int(stats.max_ts),
        "schema": {
            "item_sparse": {fid: _vocab(f, fid, int(stats.item_feat[fid].max())) for fid in item_fids},
            "item_array": {fid: _vocab(f, fid, int(stats.item_array[fid].max())) for fid in array_fids},
            "item_array_len": {fid: stats.item_array_len[fid] for fid in array_fids},
            "user_sparse": {fid: _vocab(f, fid, stats.user_max[fid]) for fid in user_fids
                            if fid not in stats.user_array_len},
            "user_array": {fid: _vocab(f, fid, stats.user_max[fid]) for fid in user_fids if fid in stats.user_array_len},
        },
        "user_array_maxlen": dict(sorted(stats.user_array_len.items(), key=lambda kv: int(kv[0]))),
        "tolerated": {
            "users_without_items": int((lengths == 0).sum()),
            "duplicate_users": int(len(lengths) - pl.concat(stats.users).n_unique()),
            "unordered_users": stats.unordered_users,
            "features_not_in_indexer": sorted(set(item_fids + array_fids + user_fids) - set(f), key=int),
        },
    }
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_save_npy(stats.item_count, cache_dir / "item_count.npy")
    atomic_save_npy(stats.item_last_ts, cache_dir / "item_last_ts.npy")
    atomic_save_npy(item_feat, cache_dir / "item_feat.npy")
    atomic_save_npy(raw_id, cache_dir / "item_raw_id.npy")
    atomic_save_json(stat, cache_dir / STAT_FILE)  # last: its presence means the cache is complete
    mb = sources["seq"]["size"] / 2**20
    dt = time.time() - t0
    print(summary(stat) + f"\n  {mb:.1f} MB in {dt:.1f}s ({mb / max(dt, 1e-9):.1f} MB/s) -> {cache_dir}")
    return stat


def summary(stat: dict) -> str:
    a, s, sc = stat["action_counts"], stat["seq_len"], stat["schema"]
    n = max(stat["num_events"], 1)
    return (f"get_stat: {stat['num_users']:,} users, {stat['num_events']:,} events, "
            f"{stat['num_active_items']:,}/{stat['itemnum']:,} items seen\n"
            f"  actions: exposure {int(a['0']) / n:.1%}, click {int(a['1']) / n:.1%}, conversion {int(a['2']) / n:.1%}\n"
            f"  events per user: min {s['min']}, mean {s['mean']:.1f}, p95 {s['p95']:.0f}, max {s['max']}\n"
            f"  features: item {list(sc['item_sparse'])}, item arrays {list(sc['item_array'])}, user {list(sc['user_sparse'])}, "
            f"user arrays {list(sc['user_array'])}" + "".join(
                f"\n  note: {TOLERATED[k]}: {v}" for k, v in stat.get("tolerated", {}).items() if v))


TOLERATED = {
    "users_without_items": "users with a profile but no items (nothing to train on or validate)",
    "duplicate_users": "lines repeating an earlier line's user id (each line is its own sequence)",
    "unordered_users": "lines whose timestamps go backwards (kept in file order)",
    "features_not_in_indexer": "feature ids absent from indexer.pkl (vocabulary from the data's largest value)",
}


@exit_on_data_error
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=env_default("TRAIN_DATA_PATH", "./data"),
                   help="training data folder with seq.jsonl and indexer.pkl (env TRAIN_DATA_PATH)")
    p.add_argument("--cache-dir", default=env_default("USER_CACHE_PATH", "./cache"),
                   help="where statistics are written (env USER_CACHE_PATH)")
    p.add_argument("--chunk-mb", type=int, default=64, help="bytes of seq.jsonl parsed at once; bounds memory")
    p.add_argument("--force", action="store_true", help="recompute even if the cache is up to date")
    args = p.parse_args(argv)
    run(Path(args.data_dir), Path(args.cache_dir), args.chunk_mb << 20, args.force)


if __name__ == "__main__":
    os.environ.setdefault("POLARS_MAX_THREADS", str(os.cpu_count() or 1))
    main()
