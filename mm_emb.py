"""Multimodal item embeddings (creative_emb): conversion into per-item tables in the cache folder, and lookups.

Sources, in TRAIN_DATA_PATH/creative_emb/ (the dim is read from the name, every vector is checked against it):
  emb_{fid}_{dim}.pkl   a pickle {raw creative id (int): vector (list of floats or numpy array)} (fid 81)
  emb_{fid}_{dim}/      part files (any name not starting with '.' or '_', with or without .json) of JSON lines
                        {"anonymous_cid": raw creative id, "emb": [dim floats]}
Written to the cache folder on first use, per feature id (each file renamed into place once complete):
  emb_table_{fid}_{dim}.mmap   raw float32 (itemnum+1, dim): row = item re-id; row 0 and items without a vector zero
  emb_mask_{fid}_{dim}.npy     bool (itemnum+1,): which rows have a vector
  emb_cold_{fid}_{dim}.mmap    raw float32 (C, dim): vectors of creative ids the indexer does not know (items
                               unseen in training, i.e. cold candidates at inference), in file order
  emb_cold_{fid}_{dim}.npy     int64 (U, 2): (raw creative id, row in the cold table), sorted by id
  emb_table_{fid}_{dim}.json   sidecar: shape, counts and a fingerprint (name, size, mtime of each source file and
                               a digest of the re-id map); a table whose fingerprint matches is reused, otherwise
                               rebuilt. Written last, so its presence means the files beside it are complete.

Conversion streams: JSON part files are parsed 64 MB at a time (polars; a strict Python parser re-reads a block
polars rejects, to name the bad line), rows are written into a memmap on a temp file, so memory is bounded by the
block, the (itemnum+1,) mask and the re-id map, never by the table (17.5M x 4096 floats is 290 GB on disk). The
pickle layout cannot be streamed: it is unpickled whole (32 floats an item for fid 81). Re-ids come from
item_raw_id.npy (get_stat.py's inverse of indexer['i']) by binary search, not from a dict of the catalogue.
Cold items are kept in a side table rather than looked up by rescanning the sources at inference: it costs at
most the cold items' share of the source (as binary floats, about a fifth of the JSON text) and keeps in memory
only their ids. An item without a vector reads as an all-zero row, which the item tower treats as absent.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
from tqdm import tqdm

from common import atomic_save_json, atomic_save_npy, data_error, iter_line_blocks, safe_load_pickle
from ids import RawIds

TABLE_VERSION = 1
SOURCE_RE = re.compile(r"^emb_(\d+)_(\d+)(\.pkl)?$")
JSON_SCHEMA = {"anonymous_cid": pl.Int64, "emb": pl.List(pl.Float32)}
CHUNK_BYTES = 64 << 20  # JSON text parsed at once
PKL_BATCH = 65536  # pickle entries written at once


def emb_dir_of(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / "creative_emb"


# --------------------------------------------------------------------------- sources

def find_source(emb_dir: str | os.PathLike, fid: str) -> tuple[Path, int]:
    """-> (emb_{fid}_{dim}.pkl or emb_{fid}_{dim}/, dim) in the creative_emb folder."""
    emb_dir = Path(emb_dir)
    if not emb_dir.is_dir():
        raise data_error(emb_dir, None, f"not found: multimodal feature {fid} needs a creative_emb folder with "
                         f"emb_{fid}_{{dim}}.pkl or emb_{fid}_{{dim}}/ part files")
    found, names = [], []
    for p in sorted(emb_dir.iterdir()):
        m = SOURCE_RE.match(p.name)
        if m:
            names.append(p.name)
            if m.group(1) == fid and (p.is_file() if m.group(3) else p.is_dir()):
                found.append((p, int(m.group(2))))
    if not found:
        raise data_error(emb_dir, None, f"no emb_{fid}_{{dim}}.pkl or emb_{fid}_{{dim}}/ for multimodal feature {fid} "
                         f"(present: {', '.join(names) or 'none'})")
    if len(found) > 1:
        raise data_error(emb_dir, None, f"several sources for feature {fid}: {', '.join(p.name for p, _ in found)}")
    if found[0][1] < 1:
        raise data_error(found[0][0], None, "the dim in the name must be >= 1")
    return found[0]


def source_files(src: Path) -> list[Path]:
    """The pickle itself, or the part files of a folder (hidden and '_SUCCESS'-style marker files skipped)."""
    if src.is_file():
        return [src]
    files = sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith((".", "_")))
    if not files:
        raise data_error(src, None, "no part files (JSON lines {\"anonymous_cid\": ..., \"emb\": [...]}) in the folder")
    return files


def id_map_digest(item_raw_id: np.ndarray) -> str:
    """Digest of the re-id -> raw id map: a table built for another indexer is never reused."""
    return hashlib.sha1(memoryview(np.ascontiguousarray(item_raw_id, dtype=np.int64))).hexdigest()


# --------------------------------------------------------------------------- parsing

def _strict_block(body: bytes, path: Path, first_line: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Line-by-line parse of a block polars refused or found irregular: the first bad line is a DataError."""
    what = f'expected {{"anonymous_cid": creative id (int > 0), "emb": [{dim} floats]}}'
    cids, vecs = [], []
    for i, line in enumerate(body.split(b"\n")):
        if not line.strip():
            continue
        ln = first_line + i
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise data_error(path, ln, f"invalid JSON ({e}); {what}") from None
        if not isinstance(obj, dict) or "anonymous_cid" not in obj or "emb" not in obj:
            raise data_error(path, ln, what)
        cid, emb = obj["anonymous_cid"], obj["emb"]
        if type(cid) is not int or cid <= 0:
            raise data_error(path, ln, f"anonymous_cid must be a positive int, got {cid!r}")
        if not isinstance(emb, list):
            raise data_error(path, ln, f"creative id {cid}: emb must be a list of {dim} floats, got {type(emb).__name__}")
        if len(emb) != dim:
            raise data_error(path, ln, f"creative id {cid}: vector of length {len(emb)}, expected {dim} "
                             f"(the dim in {path.parent.name})")
        vecs.append(_vector(emb, dim, path, ln, cid))
        cids.append(cid)
    return np.array(cids, np.int64), np.array(vecs, np.float32).reshape(-1, dim)


def _vector(v, dim: int, path: Path, line: int | None, cid) -> np.ndarray:
    what = f"creative id {cid}: "
    try:
        a = np.asarray(v, dtype=np.float32)
    except (ValueError, TypeError):
        raise data_error(path, line, what + f"the vector must hold {dim} numbers") from None
    if a.shape != (dim,):
        n = a.shape[0] if a.ndim == 1 else "x".join(map(str, a.shape))
        raise data_error(path, line, what + f"vector of length {n}, expected {dim} (the dim in the file name)")
    if not np.isfinite(a).all():
        raise data_error(path, line, what + "the vector holds a non-finite value (NaN, inf, or beyond float32)")
    return a


def _fast_block(body: bytes, path: Path, first_line: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """polars parse of whole lines; anything irregular is handed to the strict parser."""
    try:
        df = pl.read_ndjson(io.BytesIO(body), schema=JSON_SCHEMA)
        cid, emb = df["anonymous_cid"], df["emb"]
        if len(df) == 0:
            return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
        if cid.null_count() == 0 and emb.null_count() == 0 and cid.min() > 0 and (emb.list.len() == dim).all():
            flat = emb.explode()
            if flat.null_count() == 0:
                vecs = flat.to_numpy().reshape(-1, dim)
                if np.isfinite(vecs).all():
                    return cid.to_numpy().astype(np.int64, copy=False), vecs
    except pl.exceptions.PolarsError:
        pass
    return _strict_block(body, path, first_line, dim)


def iter_json_part(path: Path, dim: int, bar: tqdm) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream one part file -> (raw ids (n,), vectors (n, dim) float32) per block of whole lines."""
    with open(path, "rb") as f:
        line_no = 1
        for body in iter_line_blocks(f, CHUNK_BYTES):
            yield _fast_block(body, path, line_no, dim)
            line_no += body.count(b"\n")
            bar.update(len(body))


def iter_pickle(path: Path, dim: int, bar: tqdm) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    obj = safe_load_pickle(path, allow_numpy_arrays=True)  # the real file holds numpy float32 vectors
    if not isinstance(obj, dict):
        raise data_error(path, None, f"expected a dict {{creative id (int): vector of {dim} floats}}, "
                         f"got {type(obj).__name__}")
    bar.unit, bar.unit_scale = "vectors", False
    bar.reset(total=len(obj))
    it = iter(obj.items())
    while True:
        batch = [kv for _, kv in zip(range(PKL_BATCH), it)]
        if not batch:
            break
        for cid, _ in batch:
            if type(cid) is not int or cid <= 0:
                raise data_error(path, None, f"key {cid!r}: creative ids must be positive ints")
        try:
            vecs = np.asarray([v for _, v in batch], dtype=np.float32)
            ok = vecs.shape == (len(batch), dim) and bool(np.isfinite(vecs).all())
        except (ValueError, TypeError):  # ragged lengths or non-numbers
            ok = False
        if not ok:  # find and name the first bad entry
            vecs = np.stack([_vector(v, dim, path, None, cid) for cid, v in batch])
        yield np.array([c for c, _ in batch], np.int64), vecs
        bar.update(len(batch))


# --------------------------------------------------------------------------- conversion

def table_paths(cache_dir: Path, fid: str, dim: int) -> dict[str, Path]:
    s = f"{fid}_{dim}"
    return {"table": cache_dir / f"emb_table_{s}.mmap", "mask": cache_dir / f"emb_mask_{s}.npy",
            "cold": cache_dir / f"emb_cold_{s}.mmap", "cold_index": cache_dir / f"emb_cold_{s}.npy",
            "meta": cache_dir / f"emb_table_{s}.json"}


def _fingerprint(fid: str, dim: int, files: list[Path], item_raw_id: np.ndarray) -> dict:
    # names, not paths: the same files reached through another folder (or a copy made with cp -p) are reused
    return {"version": TABLE_VERSION, "fid": fid, "dim": dim, "rows": int(len(item_raw_id)),
            "id_map": id_map_digest(item_raw_id),
            "sources": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def _complete(meta: dict, paths: dict[str, Path]) -> bool:
    fp = meta["fingerprint"]
    return (all(p.exists() for p in paths.values())
            and paths["table"].stat().st_size == fp["rows"] * fp["dim"] * 4
            and paths["cold"].stat().st_size == meta["cold_rows"] * fp["dim"] * 4)


def ensure_table(emb_dir: str | os.PathLike, cache_dir: str | os.PathLike, fid: str | int, item_raw_id: np.ndarray,
                 progress: bool = True) -> dict:
    """Build (or reuse, when up to date) the tables of one feature; -> the sidecar dict."""
    fid, cache_dir = str(fid), Path(cache_dir)
    src, dim = find_source(emb_dir, fid)
    files = source_files(src)
    fp = _fingerprint(fid, dim, files, item_raw_id)
    paths = table_paths(cache_dir, fid, dim)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # one converter at a time (the ranks of a torchrun job, training beside inference): the others wait here,
    # then find the table up to date. A file lock, not a collective: a conversion can outlast any timeout.
    with open(cache_dir / f".emb_table_{fid}_{dim}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if paths["meta"].exists():
            try:
                meta = json.loads(paths["meta"].read_text())
                if meta.get("fingerprint") == fp and _complete(meta, paths):
                    return meta
            except (json.JSONDecodeError, KeyError, TypeError):
                pass  # unreadable sidecar: rebuild
        return convert(src, dim, files, cache_dir, fid, item_raw_id, fp, progress)


def convert(src: Path, dim: int, files: list[Path], cache_dir: Path, fid: str, item_raw_id: np.ndarray, fp: dict,
            progress: bool = True) -> dict:
    t0 = time.time()
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = table_paths(cache_dir, fid, dim)
    paths["meta"].unlink(missing_ok=True)  # from here on the old files are not valid together
    rows = len(item_raw_id)
    index = RawIds(item_raw_id)
    mask = np.zeros(rows, bool)  # (itemnum+1,)
    cold_ids: list[np.ndarray] = []
    tmp_table, tmp_cold = (_temp_beside(paths[k]) for k in ("table", "cold"))
    total = sum(p.stat().st_size for p in files)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"creative_emb {fid} (dim {dim})", mininterval=1.0,
               disable=not progress)
    n_vectors = 0
    try:
        # a sparse file of zeros: rows never written (row 0, items without a vector) read as zero without being
        # written. Opened on a temp file and renamed once complete, so no reader sees a half-written table.
        table = np.memmap(tmp_table, dtype=np.float32, mode="w+", shape=(rows, dim))
        with open(tmp_cold, "wb") as cold_f:
            parts = (iter_pickle(p, dim, bar) if src.is_file() else iter_json_part(p, dim, bar) for p in files)
            for gen in parts:
                for raw, vecs in gen:
                    reid = index.reid(raw)
                    known = reid > 0
                    table[reid[known]] = vecs[known]  # duplicates: the later line wins
                    mask[reid[known]] = True
                    if not known.all():
                        cold_f.write(np.ascontiguousarray(vecs[~known]).tobytes())
                        cold_ids.append(raw[~known])
                    n_vectors += len(raw)
        table.flush()
        del table
        ids = np.concatenate(cold_ids) if cold_ids else np.zeros(0, np.int64)
        # one row per cold id, the last occurrence (as for training items), sorted by id for binary search
        uniq, last_rev = np.unique(ids[::-1], return_index=True)
        cold_index = np.stack([uniq, len(ids) - 1 - last_rev], axis=1).astype(np.int64)  # (U, 2)
        os.replace(tmp_table, paths["table"])
        os.replace(tmp_cold, paths["cold"])
    except BaseException:
        tmp_table.unlink(missing_ok=True)
        tmp_cold.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    atomic_save_npy(mask, paths["mask"])
    atomic_save_npy(cold_index, paths["cold_index"])
    present = int(mask.sum())
    dt = time.time() - t0
    meta = {"fingerprint": fp, "shape": [rows, dim], "present": present, "vectors": n_vectors,
            "cold_rows": int(len(ids)), "cold_ids": int(len(uniq)), "seconds": round(dt, 2)}
    atomic_save_json(meta, paths["meta"])  # last: the table is complete
    mb = total / 2**20
    print(f"mm_emb: feature {fid} (dim {dim}): {present:,}/{rows - 1:,} items have a vector "
          f"({present / max(rows - 1, 1):.1%}); {len(uniq):,} creative ids not in the indexer (cold items) kept in "
          f"{paths['cold'].name}; {mb:.1f} MB in {dt:.1f}s ({mb / max(dt, 1e-9):.1f} MB/s) -> {paths['table']}",
          file=sys.stderr)
    return meta


def _temp_beside(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def ensure_tables(emb_dir: str | os.PathLike, cache_dir: str | os.PathLike, fids, item_raw_id: np.ndarray,
                  progress: bool = True) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Tables for every requested feature id -> (fids as strings, their dims)."""
    fids = tuple(str(f) for f in fids)
    if len(set(fids)) != len(fids):
        raise data_error(emb_dir, None, f"multimodal feature ids repeat: {' '.join(fids)}")
    dims = tuple(ensure_table(emb_dir, cache_dir, f, item_raw_id, progress)["shape"][1] for f in fids)
    return fids, dims


# --------------------------------------------------------------------------- reading

def _meta(cache_dir: Path, fid: str, dim: int | None) -> tuple[dict, dict[str, Path]]:
    if dim is None:
        found = sorted(cache_dir.glob(f"emb_table_{fid}_*.json"))
        if len(found) != 1:
            raise data_error(cache_dir, None, f"expected one emb_table_{fid}_{{dim}}.json, found {len(found)}: "
                             "build the tables first (mm_emb.ensure_tables)")
        dim = int(found[0].stem.rsplit("_", 1)[1])
    paths = table_paths(cache_dir, fid, dim)
    if not paths["meta"].exists():
        raise data_error(paths["meta"], None, "missing: the multimodal table was not built (or not completely)")
    return json.loads(paths["meta"].read_text()), paths


def open_tables(cache_dir: str | os.PathLike, fids, dims=None) -> list[np.memmap]:
    """Read-only memmaps (itemnum+1, dim) float32, one per feature id. Open them in the process that reads
    them (see MMFeatures): a memmap pickled into a DataLoader worker would be copied whole."""
    cache_dir = Path(cache_dir)
    out = []
    for j, fid in enumerate(fids):
        meta, paths = _meta(cache_dir, str(fid), None if dims is None else int(dims[j]))
        rows, dim = meta["shape"]
        out.append(np.memmap(paths["table"], dtype=np.float32, mode="r", shape=(rows, dim)))
    return out


def open_cold(cache_dir: str | os.PathLike, fid, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (index (U, 2) int64 [raw id, row] sorted by raw id, rows (C, dim) float32 read-only)."""
    meta, paths = _meta(Path(cache_dir), str(fid), int(dim))
    n = meta["cold_rows"]
    rows = (np.memmap(paths["cold"], dtype=np.float32, mode="r", shape=(n, dim)) if n
            else np.zeros((0, dim), np.float32))  # an empty file cannot be mapped
    return np.load(paths["cold_index"]), rows


def cold_vectors(cache_dir: str | os.PathLike, fid, dim: int, raw_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectors of creative ids the indexer does not know (cold candidates) -> ((n, dim) float32, found (n,) bool);
    rows of ids the source has no vector for are zero."""
    index, rows = open_cold(cache_dir, fid, dim)
    return _cold_lookup(index, rows, np.asarray(raw_ids, np.int64))


def _cold_lookup(index: np.ndarray, rows: np.ndarray, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros((len(raw), rows.shape[1]), np.float32)
    if len(index) == 0 or len(raw) == 0:
        return out, np.zeros(len(raw), bool)
    p = np.minimum(np.searchsorted(index[:, 0], raw), len(index) - 1)
    found = index[p, 0] == raw
    out[found] = rows[index[p[found], 1]]
    return out, found


class MMFeatures:
    """The dense inputs of the item tower: rows of every table, concatenated (sum of dims) in the order of the
    model's mm_dims. Picklable without its arrays: the memmaps are (re)opened lazily in each process."""

    def __init__(self, cache_dir: str | os.PathLike, fids, dims):
        self.cache_dir, self.fids, self.dims = Path(cache_dir), tuple(str(f) for f in fids), tuple(int(d) for d in dims)
        self.dim = sum(self.dims)
        self._tables, self._cold, self._pid = None, None, None

    def __getstate__(self):
        return {**self.__dict__, "_tables": None, "_cold": None, "_pid": None}

    def _open(self) -> None:
        if self._pid != os.getpid():
            self._tables = open_tables(self.cache_dir, self.fids, self.dims)
            self._cold = [open_cold(self.cache_dir, f, d) for f, d in zip(self.fids, self.dims)]
            self._pid = os.getpid()

    @property
    def itemnum(self) -> int:
        self._open()
        return self._tables[0].shape[0] - 1

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """(...) item re-ids -> (..., sum of dims) float32; id 0 and items without a vector are zero."""
        self._open()
        flat = np.asarray(ids, np.int64).reshape(-1)
        out = np.empty((len(flat), self.dim), np.float32)
        c = 0
        for t, d in zip(self._tables, self.dims):
            out[:, c:c + d] = t[flat]
            c += d
        return out.reshape(*np.shape(ids), self.dim)

    def range(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 (contiguous reads: the whole catalogue for validation) -> (n, sum of dims)."""
        self._open()
        return np.concatenate([np.asarray(t[start:stop]) for t in self._tables], axis=1)

    def cold_rows(self, raw_ids: np.ndarray) -> np.ndarray:
        """(n,) raw creative ids not in the indexer -> (n, sum of dims); zero where the source had no vector."""
        self._open()
        raw = np.asarray(raw_ids, np.int64).reshape(-1)
        return np.concatenate([_cold_lookup(idx, r, raw)[0] for idx, r in self._cold], axis=1)

    def vectors(self, reid: np.ndarray, raw: np.ndarray) -> np.ndarray:
        """Candidates: (n,) re-ids (0 = cold) and raw ids -> (n, sum of dims), cold items by their raw id."""
        out = self.rows(reid)
        cold = np.flatnonzero(np.asarray(reid) == 0)
        if len(cold):
            out[cold] = self.cold_rows(np.asarray(raw)[cold])
        return out


class WithMM:
    """Wraps a map-style dataset: adds the dense rows `seq_mm`, `next_mm`, `neg_mm` of shape (N, sum of dims)
    for the `seq_item`, `next_item`, `neg_item` of its samples. In an evaluation sample (it has `history_raw`)
    a history item unseen in training (id 0) gets its own vector, by raw creative id."""

    def __init__(self, base, mm: MMFeatures):
        self.base, self.mm = base, mm

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, k):
        out = self.base[k]
        for key in ("seq", "next", "neg"):
            if f"{key}_item" in out:
                out[f"{key}_mm"] = self.mm.rows(out[f"{key}_item"])  # (N, sum of dims)
        if "history_raw" in out:
            # EvalDataset puts the last items of the history on the last positions, in order
            pos = np.flatnonzero(out["seq_type"] == 1)
            raw = out["history_raw"][len(out["history_raw"]) - len(pos):]
            cold = out["seq_item"][pos] == 0
            if cold.any():
                out["seq_mm"][pos[cold]] = self.mm.cold_rows(raw[cold])
        return out


def with_mm(ds, mm: MMFeatures | None):
    return ds if mm is None else WithMM(ds, mm)



def has_table(cache_dir: str | os.PathLike, fid, dim: int, item_raw_id: np.ndarray) -> bool:
    """A complete table of feature `fid` for this re-id map in the cache (whatever its source)."""
    paths = table_paths(Path(cache_dir), str(fid), int(dim))
    try:
        meta = json.loads(paths["meta"].read_text())
        fp = meta["fingerprint"]
        return (fp["version"] == TABLE_VERSION and fp["rows"] == len(item_raw_id)
                and fp["id_map"] == id_map_digest(item_raw_id) and _complete(meta, paths))
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return False
