"""Preprocess: one streaming pass over seq.jsonl, split at line boundaries into byte ranges parsed in parallel.

Writes to the cache folder (atomically, each file renamed into place):
  stat.json         schema (feature ids and vocabulary sizes), counts, sequence-length statistics
  item_count.npy    (itemnum+1,) int64   events per item over all action types (log-q correction)
  item_last_ts.npy  (itemnum+1,) int64   each item's last timestamp (pool of active global negatives)
  item_feat.npy     (itemnum+1, F) int32 item sparse features, columns in sorted fid order, 0 = missing
  item_raw_id.npy   (itemnum+1,) int64   raw creative id of each re-id (for results in raw ids)
  line_len.npy      (lines,) int32       items per line, in file order (training's `--window all` tiles)
and seq_offsets.pkl beside seq.jsonl when it is missing (else it is checked against the file). A second
run on unchanged inputs does nothing. The outputs are those of json.loads line by line (tests/test_get_stat.py
holds that reference): item features are those of each item's last record in the file; the schema's feature
ids come from every record.

Parsing: each line by msgspec's typed decoding (records.RAW_LINE_DECODER, item features kept as raw text),
then numpy over the columns of a block of lines; each distinct item feature text of a block is decoded once,
all of them in one call (FeatureTable). A line the fast path cannot vouch for is decided by the strict parser
(strict_line): its error message, or its records. Processes (--workers) each scan one byte range; their
results merge in file order, and an error names the file's first bad line whichever process met it.
Memory per process: one block of text and its records, plus the per-item arrays (about 8 + 8 + 4 per
feature bytes an item: some 1.2 GB at 17.5M items and 13 features); nothing grows with the number of users:
line offsets and user ids go to temporary files in the cache folder (the duplicate-user count is exact, one
hash partition of the ids in memory at a time), sequence lengths into a histogram (exact percentiles) and,
streamed through temporary files, into line_len.npy.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import multiprocessing as mp
import os
import pickle
import shutil
import tempfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor, wait
from operator import itemgetter
from pathlib import Path
from typing import Annotated, Optional

import msgspec
import numpy as np
from msgspec.structs import astuple
from tqdm import tqdm

from common import (STAT_FILE, DataError, atomic_save_json, atomic_save_npy, atomic_write, data_error, env_default,
                    exit_on_data_error, iter_int_list_pickle, iter_line_blocks, load_stat, safe_load_pickle,
                    write_int_list_pickle)
from records import RAW_LINE_DECODER, DecodeError, decode_features, keys_ok, parse_line_strict

STAT_VERSION = 3  # 3: fast parser; feature ids of the schema from every record (not chunk by chunk)
MAX_ITEM_ARRAY_LEN = 16  # slots kept per array-valued item feature; longer lists are cut
CACHE_FILES = ("item_count.npy", "item_last_ts.npy", "item_feat.npy", "item_raw_id.npy", "line_len.npy", STAT_FILE)
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
MIN_RANGE_BYTES = 128 << 20  # by default, no more processes than ranges of this size (starting one costs ~0.5 s)
USERS_PER_PARTITION_BYTES = 256 << 20  # one user-id partition per this much of seq.jsonl (duplicate count)
MISSING = INT64_MIN  # in a FeatureTable: no int value
_PRESENT_INT = Annotated[int, msgspec.Meta(ge=INT64_MIN + 1, le=INT32_MAX)]  # an item feature value other than MISSING


def _fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _fid_key(fid: str) -> tuple[int, str]:
    return int(fid), fid  # numeric order; "0100" and "100" are distinct ids, ordered alike every run


# --------------------------------------------------------------------------- strict path

def storage_problem(records: list[list], itemnum: int) -> str | None:
    """What a valid line may hold but the outputs cannot: items beyond the indexer, timestamps beyond int64,
    item feature values beyond int32 (item_feat.npy; negative ones are padding), user feature values beyond int64."""
    for k, (_, item, ufeat, ifeat, _, ts) in enumerate(records):
        if item is not None and item > itemnum:
            return f"item id {item} is beyond the indexer's {itemnum} items"
        if not INT64_MIN <= ts <= INT64_MAX:
            return f"record {k}: timestamp {ts} does not fit in 64 bits"
        for what, feats, lo, bits in (("item_feature", ifeat, None, 32), ("user_feature", ufeat, INT64_MIN, 64)):
            for fid, v in (feats or {}).items():
                vals = v if isinstance(v, list) else [v] if isinstance(v, int) else []
                for x in vals:
                    if x >= 2**(bits - 1) or (lo is not None and x < lo):
                        return f"record {k}: {what} feature {fid} value {x} does not fit in {bits} bits"
    return None


def strict_line(line: bytes, path: Path, lineno: int, itemnum: int) -> list[list]:
    """The reference for one line: parse_line_strict, then storage_problem; raises DataError."""
    records = parse_line_strict(line, str(path), lineno)
    problem = storage_problem(records, itemnum)
    if problem:
        raise data_error(path, lineno, problem)
    return records


# --------------------------------------------------------------------------- one byte range

class RangeStats:
    """Accumulators over the blocks of one byte range; per-item arrays are sized by the indexer, never by users."""

    def __init__(self, itemnum: int):
        self.itemnum = itemnum
        self.lines = 0
        self.error: tuple[int, bytes] | None = None  # (line number within the range, the line): the first bad one
        self.item_count = np.zeros(itemnum + 1, np.int64)
        self.item_last_ts = np.zeros(itemnum + 1, np.int64)
        self.item_feat: dict[str, np.ndarray] = {}  # fid -> (itemnum+1,) int32, from each item's last record here
        self.item_array: dict[str, np.ndarray] = {}  # fid -> (itemnum+1, MAX_ITEM_ARRAY_LEN) int32, right-padded
        self.item_sparse: set[str] = set()  # fids with an int value on some item record
        self.item_list_len: dict[str, int] = {}  # fid -> longest list value on an item record
        self.user_max: dict[str, int] = {}
        self.user_list_len: dict[str, int] = {}
        self.user_scalar: set[str] = set()  # user fids with an int (not list) value somewhere
        self.action_counts = np.zeros(3, np.int64)
        self.len_hist = np.zeros(1, np.int64)  # items per line -> number of lines
        self.unordered = 0  # lines whose item timestamps go backwards (kept in file order)
        self.min_ts, self.max_ts = INT64_MAX, INT64_MIN
        self.num_events = 0

    def merge(self, later: "RangeStats") -> "RangeStats":
        """Fold in the range that follows this one in the file: counts add up, and an item's features are
        those of its last record, so the later range wins for every item it holds."""
        seen = later.item_count > 0
        for mine, theirs in ((self.item_feat, later.item_feat), (self.item_array, later.item_array)):
            for fid in set(mine) | set(theirs):
                col = mine.get(fid)
                if col is None:
                    col = mine[fid] = np.zeros_like(theirs[fid])
                col[seen] = theirs[fid][seen] if fid in theirs else 0
        self.item_count += later.item_count
        np.maximum(self.item_last_ts, later.item_last_ts, out=self.item_last_ts)
        self.item_sparse |= later.item_sparse
        self.user_scalar |= later.user_scalar
        for mine, theirs in ((self.item_list_len, later.item_list_len), (self.user_max, later.user_max),
                             (self.user_list_len, later.user_list_len)):
            for k, v in theirs.items():
                mine[k] = max(mine.get(k, v), v)
        self.action_counts += later.action_counts
        n = max(len(self.len_hist), len(later.len_hist))
        self.len_hist = np.pad(self.len_hist, (0, n - len(self.len_hist))) + np.pad(later.len_hist, (0, n - len(later.len_hist)))
        self.unordered += later.unordered
        self.min_ts, self.max_ts = min(self.min_ts, later.min_ts), max(self.max_ts, later.max_ts)
        self.num_events += later.num_events
        self.lines += later.lines
        return self


class UserKeys:
    """Each line's user id, spilled to partition files by hash: the duplicate count is then exact with one
    partition in memory at a time (see count_duplicates)."""

    def __init__(self, folder: Path, rank: int, partitions: int):
        self.folder, self.rank, self.partitions = folder, rank, partitions
        self.buf: list[list[str]] = [[] for _ in range(partitions)]
        self.n = 0

    def add(self, users: list) -> None:
        for u in users:  # int 5 and string "5" are different users
            key = str(u) if isinstance(u, int) else json.dumps(u)
            self.buf[zlib.crc32(key.encode()) % self.partitions if self.partitions > 1 else 0].append(key)
        self.n += len(users)
        if self.n > 200_000:
            self.flush()

    def flush(self) -> None:
        for p, keys in enumerate(self.buf):
            if keys:
                with open(self.folder / f"users.{self.rank}.{p}", "a", encoding="ascii") as f:
                    f.write("\n".join(keys) + "\n")
                keys.clear()
        self.n = 0


def count_duplicates(folder: Path, ranks: int, partitions: int) -> int:
    """Lines whose user id an earlier line already had: per partition, keys minus distinct keys."""
    dup = 0
    for p in range(partitions):
        n, distinct = 0, set()
        for r in range(ranks):
            f = folder / f"users.{r}.{p}"
            if f.exists():
                keys = f.read_text(encoding="ascii").split("\n")[:-1]
                n += len(keys)
                distinct.update(keys)
        dup += n - len(distinct)
    return dup


def _line_bounds(body: bytes) -> tuple[np.ndarray, np.ndarray]:
    nl = np.flatnonzero(np.frombuffer(body, np.uint8) == 10)
    ends = nl if body.endswith(b"\n") else np.append(nl, len(body))
    return np.concatenate([[0], nl + 1])[:len(ends)], ends


def _decode_text(text: bytes):
    """One item_feature text -> its value (a dict, or None) when valid and storable (ints within int32 or
    negative), else False. The strict way, for the texts FeatureTable's types do not cover."""
    try:
        value = decode_features(text)
    except ValueError:
        return False
    for v in (value or {}).values():
        if any(x > INT32_MAX for x in (v if isinstance(v, list) else [v] if isinstance(v, int) else [])):
            return False
    return value


class FeatureTable:
    """The distinct item feature texts of a block as a (D, F) int64 matrix over the F feature ids known so far:
    each text's int value of each feature (negative ones: -1 or below, padding) or MISSING (absent, a string, a
    list; lists are kept apart). Texts whose values are all ints are decoded in C all at once (a msgspec Struct
    with a field per feature id, read back as tuples, no per-value Python); the others one by one (_decode_text
    decides them; a feature id not seen yet grows the type)."""

    def __init__(self):
        self.fids: list[str] = []  # in order of appearance
        self._build()

    def _build(self) -> None:
        names = ["f" + fid for fid in self.fids]
        self.type = msgspec.defstruct("ItemIntFeatures", [(n, _PRESENT_INT, MISSING) for n in names], gc=False,
                                      rename=dict(zip(names, self.fids)), forbid_unknown_fields=True)
        self.many = msgspec.json.Decoder(list[self.type])
        self.one = msgspec.json.Decoder(Optional[self.type])
        self.missing = (MISSING,) * len(self.fids)

    def decode(self, texts: list[bytes]) -> tuple[np.ndarray, np.ndarray, dict]:
        """(ints (D, F), refused (D,) bool, list values {(row, fid): list}) of distinct texts."""
        refused, lists = np.zeros(len(texts), bool), {}
        null = texts.index(b"null") if b"null" in texts else len(texts)  # at most once: the texts are distinct
        try:
            rows = self.many.decode(b"[" + b",".join(texts[:null] + texts[null + 1:]) + b"]")
            values = itertools.chain.from_iterable(map(astuple, rows))
            ints = np.fromiter(values, np.int64, len(rows) * len(self.fids)).reshape(len(rows), len(self.fids))
            return np.insert(ints, null, MISSING, axis=0) if null < len(texts) else ints, refused, lists
        except DecodeError:
            pass
        out, known, grown = [], set(self.fids), False
        for r, t in enumerate(texts):
            try:
                row = self.one.decode(t)
                out.append(astuple(row) if row is not None else self.missing)
                continue
            except DecodeError:
                pass
            value = _decode_text(t)  # a dict, None, or False (refused)
            refused[r] = value is False
            value = value or {}
            new = [k for k in value if k not in known]
            self.fids += new
            known.update(new)
            grown |= bool(new)
            out.append(tuple(max(v, -1) if type(v) is int else MISSING for v in map(value.get, self.fids)))
            lists.update(((r, k), v) for k, v in value.items() if type(v) is list)
        if grown:  # read them all again with the grown type
            self._build()
            return self.decode(texts)
        return self._matrix(out), refused, lists

    def _matrix(self, rows: list[tuple]) -> np.ndarray:
        return np.array(rows, np.int64).reshape(len(rows), len(self.fids))

    def learn(self, ints: np.ndarray, refused: np.ndarray, lists: dict, st: RangeStats) -> None:
        """The schema: feature ids with an int value anywhere; the longest list value of each feature id."""
        present = (ints[~refused] != MISSING).any(axis=0)
        st.item_sparse.update(fid for fid, p in zip(self.fids, present) if p)
        for (_, fid), v in lists.items():
            st.item_list_len[fid] = max(st.item_list_len.get(fid, 0), len(v))


def _decode_lines(body: bytes, starts: list[int], ends: list[int], path: Path, itemnum: int):
    """(records of the lines in order, records per line, index of the first bad line or None). A line the
    fast decoder cannot read goes to strict_line; its item features become JSON text again (json.dumps, which
    json.loads reads back as the same value)."""
    mv = memoryview(body)
    records, lens, bad = [], [], None
    for j, (s, e) in enumerate(zip(starts, ends)):
        try:
            recs = RAW_LINE_DECODER.decode(mv[s:e])
        except DecodeError:
            recs = None
        if not recs:
            try:
                strict = strict_line(body[s:e], path, 0, itemnum)
            except DataError:
                bad = j
                break
            recs = [(u, i, uf, json.dumps(f).encode(), a, t) for u, i, uf, f, a, t in strict]
        records.extend(recs)
        lens.append(len(recs))
    return records, lens, bad


def _wrong_records(cols: dict, st: RangeStats) -> np.ndarray:
    """Records that make their line invalid or unstorable, beyond what typed decoding checked (see
    records.shape_ok): item null <=> action null, a profile's item_feature null, an interaction's
    user_feature null; items within the indexer; feature ids and values (refused texts)."""
    prof, pidx, iidx, ufeat = cols["prof"], cols["pidx"], cols["iidx"], cols["ufeat"]
    texts = cols["texts"]
    wrong = [np.flatnonzero(prof != np.isnan(cols["action"])), iidx[cols["item"][iidx] > st.itemnum]]
    if ufeat.count(None) != len(iidx) + sum(ufeat[k] is None for k in pidx.tolist()):
        wrong.append(np.array([k for k in iidx.tolist() if ufeat[k] is not None], np.int64))
    wrong.append(np.array([k for k in pidx.tolist() if texts[k] != b"null" or not keys_ok([ufeat[k]])], np.int64))
    if cols["refused"]:
        wrong.append(np.array([k for k, t in enumerate(texts) if t in cols["refused"]], np.int64))
    return np.concatenate(wrong)


def _fold_item_features(items: np.ndarray, iidx: np.ndarray, cols: dict, ft: FeatureTable, st: RangeStats) -> None:
    """Each item's last record in this block sets its features (a later block wins); a feature absent from that
    record (or not an int there) is missing."""
    last_items, first_rev = np.unique(items[::-1], return_index=True)
    rows = cols["rows"][iidx[len(items) - 1 - first_rev]]  # (L,) distinct text of each item's last record
    ints = cols["ints"][rows]  # (L, F)
    for j, fid in enumerate(ft.fids):
        if fid in st.item_sparse:
            col = st.item_feat.get(fid)
            if col is None:
                col = st.item_feat[fid] = np.zeros(st.itemnum + 1, np.int32)
            col[last_items] = np.maximum(ints[:, j], 0)  # MISSING and negatives: 0
    array_fids = set(st.item_array) | {fid for _, fid in cols["lists"]}  # list values: rare (genres)
    at = {}  # distinct text -> positions among the last records
    for r, k in enumerate(rows.tolist() if array_fids else ()):
        at.setdefault(k, []).append(r)
    for fid in array_fids:
        slots = np.zeros((len(rows), MAX_ITEM_ARRAY_LEN), np.int32)
        for (k, f), v in cols["lists"].items():
            if f == fid and v and k in at:
                head = np.maximum(np.array(v[:MAX_ITEM_ARRAY_LEN], np.float64), 0)
                slots[at[k], :len(head)] = head
        if fid not in st.item_array:
            st.item_array[fid] = np.zeros((st.itemnum + 1, MAX_ITEM_ARRAY_LEN), np.int32)
        st.item_array[fid][last_items] = slots


def _scan_block(body: bytes, st: RangeStats, path: Path, users: UserKeys,
                ft: FeatureTable) -> tuple[np.ndarray, np.ndarray] | None:
    """Fold one block of whole lines into `st`; returns (the line starts within the block, items per line), or
    None after setting st.error (the block's first bad line)."""
    starts, ends = _line_bounds(body)
    records, lens, bad = _decode_lines(body, starts.tolist(), ends.tolist(), path, st.itemnum)
    nlines = len(lens)
    item, ufeat, ifeat, action, ts = (list(map(itemgetter(k), records)) for k in range(1, 6))
    it = np.array(item, np.float64)  # None -> nan: a profile record
    prof = np.isnan(it)
    texts = list(map(bytes, ifeat))
    distinct = list(dict.fromkeys(texts))  # item features repeat: each distinct text is decoded once
    ints, refused, lists = ft.decode(distinct)
    row_of = dict(zip(distinct, range(len(distinct))))
    cols = dict(item=it, action=np.array(action, np.float64), ufeat=ufeat, texts=texts, ints=ints, lists=lists,
                rows=np.fromiter(map(row_of.__getitem__, texts), np.int64, len(texts)),
                refused={distinct[r] for r in np.flatnonzero(refused)},
                prof=prof, pidx=np.flatnonzero(prof), iidx=np.flatnonzero(~prof))
    line_of = np.repeat(np.arange(nlines), lens)  # (n,) line of each record
    wrong = line_of[_wrong_records(cols, st)].tolist()
    if wrong or bad is not None:
        j = min(wrong + ([bad] if bad is not None else []))
        st.error = (st.lines + j + 1, body[starts[j]:ends[j]])
        return None

    iidx = cols["iidx"]
    items = it[iidx].astype(np.int64)  # (E,) exact: within the indexer (checked)
    ts = np.array(ts, np.int64)
    its = ts[iidx]
    np.add.at(st.item_count, items, 1)
    np.maximum.at(st.item_last_ts, items, its)
    st.action_counts += np.bincount(cols["action"][iidx].astype(np.int64), minlength=3)[:3]
    st.num_events += len(items)
    if len(ts):
        st.min_ts, st.max_ts = min(st.min_ts, int(ts.min())), max(st.max_ts, int(ts.max()))
    li = line_of[iidx]
    line_len = np.bincount(li, minlength=nlines)
    hist = np.bincount(line_len)  # lines by number of items
    if len(hist) > len(st.len_hist):
        st.len_hist = np.pad(st.len_hist, (0, len(hist) - len(st.len_hist)))
    st.len_hist[:len(hist)] += hist
    back = (np.diff(its) < 0) & (li[1:] == li[:-1])
    st.unordered += len(np.unique(li[1:][back]))
    users.add([records[k][0] for k in (np.cumsum(lens) - lens).tolist()])
    if len(items):
        ft.learn(ints, refused, lists, st)
        _fold_item_features(items, iidx, cols, ft, st)
    _user_features([ufeat[k] for k in cols["pidx"].tolist()], st)
    st.lines += nlines
    return starts, line_len


def _user_features(profiles: list[dict | None], st: RangeStats) -> None:
    """Largest value (vocabulary) of each user feature, and the longest list of array-valued ones."""
    for d in filter(None, profiles):
        for fid, v in d.items():
            if type(v) is int:
                m = v
                st.user_scalar.add(fid)
            elif type(v) is list:
                m = max(v, default=0)
                st.user_list_len[fid] = max(st.user_list_len.get(fid, 0), len(v))
            else:
                continue  # cold-start strings are padding
            st.user_max[fid] = max(st.user_max.get(fid, 0), m)


def scan_range(path: Path, start: int, end: int, chunk_bytes: int, itemnum: int, folder: Path, rank: int,
               partitions: int, progress=None) -> RangeStats:
    """Statistics of the lines in [start, end) of `path` (both at line starts); their byte offsets go to
    folder/offsets.RANK (int64), their numbers of items to folder/lengths.RANK (int32), their user ids to
    folder/users.RANK.P. Stops at the first bad line, or when progress(bytes done) returns False."""
    st = RangeStats(itemnum)
    users = UserKeys(folder, rank, partitions)
    ft = FeatureTable()
    gc_was = gc.isenabled()
    gc.disable()  # records are not cyclic; collecting while millions are alive costs more than parsing
    try:
        with open(path, "rb") as f, open(folder / f"offsets.{rank}", "wb") as out, \
                open(folder / f"lengths.{rank}", "wb") as lengths:
            f.seek(start)
            pos = start
            for body in iter_line_blocks(f, chunk_bytes, end - start):
                block = _scan_block(body, st, path, users, ft)
                if block is None:
                    break
                (block[0] + pos).astype(np.int64).tofile(out)
                block[1].astype(np.int32).tofile(lengths)
                pos += len(body)
                if progress is not None and not progress(len(body)):
                    break  # stopped from outside: the result is not used
        users.flush()
    finally:
        if gc_was:
            gc.enable()
    return st


# --------------------------------------------------------------------------- all ranges

def line_ranges(path: Path, n: int) -> list[tuple[int, int]]:
    """Split the file into n byte ranges of about equal size that start at line starts (empty ones dropped)."""
    size = path.stat().st_size
    cuts = [0]
    with open(path, "rb") as f:
        for k in range(1, n):
            f.seek(max(size * k // n - 1, cuts[-1]))
            f.readline()  # to the end of the line the cut falls into
            cuts.append(min(f.tell(), size))
    cuts.append(size)
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


_SHARED = None  # in a worker process: (bytes done, stop flag), shared with the parent


def _worker_init(done, stop) -> None:
    global _SHARED
    _SHARED = done, stop


def _worker_progress(n: int) -> bool:
    done, stop = _SHARED
    with done.get_lock():
        done.value += n
    return not stop.value  # the parent has stopped (another range's error): no need to go on


def _worker(args) -> str:
    path, start, end, chunk_bytes, itemnum, folder, rank, partitions = args
    st = scan_range(path, start, end, chunk_bytes, itemnum, folder, rank, partitions, _worker_progress)
    out = folder / f"stats.{rank}.pkl"
    with open(out, "wb") as f:  # a file, not the result pipe: the parent loads the ranges one at a time
        pickle.dump(st, f, protocol=pickle.HIGHEST_PROTOCOL)
    return str(out)


def scan_file(path: Path, itemnum: int, chunk_bytes: int, workers: int, folder: Path) -> tuple[RangeStats, int, int]:
    """All ranges, merged in file order -> (stats, ranges, user partitions). Raises DataError for the file's
    first bad line (strict_line's message, with its line number in the whole file)."""
    size = path.stat().st_size
    ranges = line_ranges(path, workers) or [(0, 0)]
    partitions = max(1, min(1024, size // USERS_PER_PARTITION_BYTES))
    jobs = [(path, a, b, chunk_bytes, itemnum, folder, r, partitions) for r, (a, b) in enumerate(ranges)]
    total, lines_before = None, 0
    with tqdm(total=size, unit="B", unit_scale=True, desc=f"reading {path.name}", mininterval=1.0) as bar, \
            contextlib.ExitStack() as stack:
        if len(jobs) == 1:
            parts = iter([scan_range(*jobs[0], progress=lambda n: bar.update(n) or True)])
        else:
            ctx = mp.get_context("spawn")  # not fork: the caller may hold threads (torch, polars)
            done, stop = ctx.Value("q", 0), ctx.Value("b", 0)
            pool = stack.enter_context(ProcessPoolExecutor(len(jobs), ctx, _worker_init, (done, stop)))
            stack.callback(setattr, stop, "value", 1)  # on the way out, early or not, stop the others
            parts = _load_in_order([pool.submit(_worker, job) for job in jobs], done, bar)
        for part in parts:
            if part.error is not None:
                local, line = part.error
                strict_line(line, path, lines_before + local, itemnum)  # raises with the message
                raise RuntimeError(f"{path}:{lines_before + local}: the fast parser refused a line the strict "
                                   "parser accepts (a bug: please report it with this line)")
            lines_before += part.lines
            total = part if total is None else total.merge(part)
    return total, len(ranges), partitions


def _load_in_order(futures: list, done, bar):
    """Each range's stats in file order, as soon as it is there (a worker that dies raises BrokenProcessPool)."""
    for fut in futures:
        while not fut.done():
            wait([fut], timeout=0.5)
            bar.update(done.value - bar.n)
        with open(fut.result(), "rb") as f:
            part = pickle.load(f)
        os.unlink(f.name)
        yield part
    bar.update(done.value - bar.n)


def check_or_write_offsets(offsets_path: Path, seq_path: Path, folder: Path, ranks: int) -> None:
    """seq_offsets.pkl: written from the ranges' offsets when missing, else compared with them, batch by batch."""
    def ours():
        for r in range(ranks):
            with open(folder / f"offsets.{r}", "rb") as f:
                while len(a := np.fromfile(f, np.int64, count=1 << 20)):
                    yield a

    if not offsets_path.exists():
        with atomic_write(offsets_path) as f:
            write_int_list_pickle(f, ours())
        return
    n_given = n_mine = 0
    diff = None
    given, mine = _rebatch(iter_int_list_pickle(offsets_path)), _rebatch(ours())
    while (a := next(given, None)) is not None and (b := next(mine, None)) is not None:
        m = min(len(a), len(b))  # pieces of equal length but for the last one of either
        if diff is None and not np.array_equal(a[:m], b[:m]):
            diff = n_mine + int(np.flatnonzero(a[:m] != b[:m])[0]) + 1
        n_given, n_mine = n_given + len(a), n_mine + len(b)
    n_given += (len(a) if a is not None else 0) + sum(map(len, given))  # what one has beyond the other
    n_mine += sum(map(len, mine))
    if diff is None and n_given != n_mine:
        diff = min(n_given, n_mine) + 1
    if diff is not None:
        raise data_error(offsets_path, None, f"does not match {seq_path.name} ({n_given} offsets for "
                         f"{n_mine} lines, first difference at line {diff}); delete it to rebuild")


def write_line_lengths(folder: Path, ranks: int, lines: int, path: Path) -> None:
    """line_len.npy from the ranges' spilled lengths, streamed: memory stays one buffer, whatever the users."""
    with atomic_write(path) as out:
        np.lib.format.write_array_header_1_0(out, {"descr": np.dtype(np.int32).str, "fortran_order": False,
                                                   "shape": (lines,)})
        for r in range(ranks):
            with open(folder / f"lengths.{r}", "rb") as f:
                shutil.copyfileobj(f, out)


def _rebatch(arrays, size: int = 1 << 16):
    """The same ints in pieces of exactly `size` (the last one shorter), so that two streams line up."""
    buf = np.zeros(0, np.int64)
    for a in arrays:
        buf = np.concatenate([buf, a])
        while len(buf) >= size:
            yield buf[:size]
            buf = buf[size:]
    if len(buf):
        yield buf


def _percentile(hist: np.ndarray, q: float) -> float:
    """np.percentile(lengths, q) (linear interpolation, its exact arithmetic) from lengths' histogram."""
    cum = np.cumsum(hist)
    n = int(cum[-1])
    vi = (n - 1) * (np.float64(q) / 100)
    lo = int(np.floor(vi))
    a, b = (int(np.searchsorted(cum, k, side="right")) for k in (lo, min(lo + 1, n - 1)))
    g = vi - lo
    d = np.float64(b - a)
    return float(b - d * (1 - g) if g >= 0.5 else a + d * g)


def _vocab(indexer_f: dict, fid: str, seen_max: int) -> int:
    return max(len(indexer_f.get(fid, {})), seen_max) + 1  # +1: index 0 is padding


def _item_table(st: RangeStats) -> tuple[list[str], list[str], dict[str, int], np.ndarray]:
    """item_feat.npy: the sparse features, then each array feature's slots (see dataset.FeatureSpec)."""
    item_fids = sorted(st.item_sparse, key=_fid_key)
    array_fids = sorted(set(st.item_list_len) - st.item_sparse, key=_fid_key)
    array_len = {f: min(max(st.item_list_len[f], 1), MAX_ITEM_ARRAY_LEN) for f in array_fids}
    zeros = np.zeros(st.itemnum + 1, np.int32)
    cols = [st.item_feat.get(f, zeros)[:, None] for f in item_fids]
    cols += [st.item_array[f][:, :array_len[f]] if f in st.item_array else np.zeros((st.itemnum + 1, array_len[f]), np.int32)
             for f in array_fids]
    table = np.concatenate(cols + [np.zeros((st.itemnum + 1, 0), np.int32)], axis=1)
    return item_fids, array_fids, array_len, table


def make_stat(st: RangeStats, itemnum: int, f: dict, table: tuple, duplicates: int, sources: dict) -> dict:
    item_fids, array_fids, array_len, feat = table
    hist = st.len_hist
    nz = np.flatnonzero(hist)
    n = int(hist.sum())
    user_fids = sorted(st.user_max, key=_fid_key)
    user_arrays = {k: max(v, 1 if k in st.user_scalar else 0) for k, v in st.user_list_len.items()}
    col = {fid: j for j, fid in enumerate(item_fids)}
    starts = len(item_fids) + np.cumsum([0] + [array_len[f] for f in array_fids])
    return {
        "version": STAT_VERSION,
        "sources": sources,
        "itemnum": itemnum,
        "num_users": n,
        "num_events": int(st.num_events),
        "num_active_items": int((st.item_count > 0).sum()),
        "action_counts": {str(a): int(c) for a, c in enumerate(st.action_counts)},
        "seq_len": {"min": int(nz[0]), "mean": float(int(np.arange(len(hist)) @ hist) / n),
                    "p50": _percentile(hist, 50), "p95": _percentile(hist, 95), "max": int(nz[-1]),
                    "hist": hist[:nz[-1] + 1].tolist()},  # users by number of events: what a window keeps
        "min_ts": int(st.min_ts), "max_ts": int(st.max_ts),
        "schema": {
            "item_sparse": {fid: _vocab(f, fid, int(feat[:, col[fid]].max())) for fid in item_fids},
            "item_array": {fid: _vocab(f, fid, int(feat[:, starts[k]:starts[k + 1]].max(initial=0)))
                           for k, fid in enumerate(array_fids)},
            "item_array_len": array_len,
            "user_sparse": {fid: _vocab(f, fid, st.user_max[fid]) for fid in user_fids if fid not in user_arrays},
            "user_array": {fid: _vocab(f, fid, st.user_max[fid]) for fid in user_fids if fid in user_arrays},
        },
        "user_array_maxlen": dict(sorted(user_arrays.items(), key=lambda kv: _fid_key(kv[0]))),
        "tolerated": {
            "users_without_items": int(hist[0]),
            "duplicate_users": duplicates,
            "unordered_users": int(st.unordered),
            "features_not_in_indexer": sorted(set(item_fids + array_fids + user_fids) - set(f), key=_fid_key),
        },
    }


def default_workers(size: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, size // MIN_RANGE_BYTES))


def run(data_dir: Path, cache_dir: Path, chunk_bytes: int = 16 << 20, force: bool = False,
        workers: int | None = None) -> dict:
    """Preprocess data_dir into cache_dir with `workers` processes (default: one per core, ranges of at
    least MIN_RANGE_BYTES); returns stat.json's content."""
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
    size = sources["seq"]["size"]
    workers = default_workers(size) if workers is None else max(1, workers)
    made = not cache_dir.exists()
    cache_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".get_stat.", dir=cache_dir))  # spilled offsets and user ids
    try:
        st, ranks, partitions = scan_file(seq_path, itemnum, chunk_bytes, workers, folder)
        if st.lines == 0:
            raise data_error(seq_path, None, "empty file; expected one JSON line per user")
        check_or_write_offsets(offsets_path, seq_path, folder, ranks)
        duplicates = count_duplicates(folder, ranks, partitions)
        write_line_lengths(folder, ranks, st.lines, cache_dir / "line_len.npy")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        if made and not any(cache_dir.iterdir()):
            cache_dir.rmdir()
        raise
    shutil.rmtree(folder, ignore_errors=True)

    raw_id = np.zeros(itemnum + 1, np.int64)
    for raw, re_id in indexer["i"].items():
        if 0 < re_id <= itemnum and isinstance(raw, int):
            raw_id[re_id] = raw
    table = _item_table(st)
    stat = make_stat(st, itemnum, indexer["f"], table, duplicates, sources)
    atomic_save_npy(st.item_count, cache_dir / "item_count.npy")
    atomic_save_npy(st.item_last_ts, cache_dir / "item_last_ts.npy")
    atomic_save_npy(table[3], cache_dir / "item_feat.npy")
    atomic_save_npy(raw_id, cache_dir / "item_raw_id.npy")
    atomic_save_json(stat, cache_dir / STAT_FILE)  # last: its presence means the cache is complete
    mb = size / 2**20
    dt = time.time() - t0
    print(summary(stat) + f"\n  {mb:.1f} MB in {dt:.1f}s ({mb / max(dt, 1e-9):.1f} MB/s, {ranks} process(es)) -> {cache_dir}")
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
    p.add_argument("--chunk-mb", type=int, default=16, help="bytes of seq.jsonl parsed at once per process; bounds memory")
    p.add_argument("--workers", type=int, default=None,
                   help=f"processes (default: one per core, each on at least {MIN_RANGE_BYTES >> 20} MB of the file)")
    p.add_argument("--force", action="store_true", help="recompute even if the cache is up to date")
    args = p.parse_args(argv)
    run(Path(args.data_dir), Path(args.cache_dir), args.chunk_mb << 20, args.force, args.workers)


if __name__ == "__main__":
    main()
