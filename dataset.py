"""Datasets over seq.jsonl / predict_seq.jsonl by byte offset, and the collate function.

Workers hold only numpy arrays (offsets, the item feature table as a memmap, the negative pool); no
per-item Python dicts that would grow with the catalogue and be copied into every worker.

Per user (DESIGN §4.2) the profile record becomes the first token (type 2), item records follow (type 1),
left-padded to N = maxlen + 1 positions. Action ids are action_type + 1 (1 exposure, 2 click,
3 conversion) so that 0 can mean "none" (user token, padding, no target).
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from tqdm import tqdm

from common import data_error, safe_load_pickle
from ids import UserIds, raw_user
from records import parse_line

MAX_USER_ARRAY_LEN = 32  # longer array features are cut; real ones are short
WINDOWS = ("last", "random", "all")  # TrainDataset's ways to cut a history longer than a sequence


@dataclass
class FeatureSpec:
    """Feature columns and vocabulary sizes, from get_stat.py's stat.json (or a checkpoint's copy of it).
    Item feature columns (item_feat.npy, seq_feat, ...): the sparse fids, then each array fid's slots."""
    item_fids: list[str]
    item_vocab: np.ndarray  # (Fi,) one entry per column
    user_sparse_fids: list[str]
    user_sparse_vocab: list[int]
    user_array_fids: list[str]
    user_array_vocab: list[int]
    user_array_len: int
    itemnum: int
    item_array_fids: list[str] = field(default_factory=list)
    item_array_len: list[int] = field(default_factory=list)

    @classmethod
    def from_stat(cls, stat: dict) -> "FeatureSpec":
        sc = stat["schema"]
        item_fids = sorted(sc["item_sparse"], key=int)
        iarr = sorted(sc.get("item_array", {}), key=int)
        ilen = [int(sc["item_array_len"][f]) for f in iarr]
        vocab = [sc["item_sparse"][f] for f in item_fids] + [sc["item_array"][f] for f, n in zip(iarr, ilen) for _ in range(n)]
        us, ua = sorted(sc["user_sparse"], key=int), sorted(sc["user_array"], key=int)
        alen = max([int(v) for v in stat.get("user_array_maxlen", {}).values()] + [1])
        return cls(item_fids, np.array(vocab, np.int64), us, [sc["user_sparse"][f] for f in us],
                   ua, [sc["user_array"][f] for f in ua], min(alen, MAX_USER_ARRAY_LEN), int(stat["itemnum"]), iarr, ilen)

    @property
    def item_cols(self) -> int:
        return len(self.item_vocab)

    @staticmethod
    def _value(v, vocab: int) -> int:
        # cold-start strings, negatives and values beyond the training vocabulary all map to padding
        return v if isinstance(v, int) and 0 < v < vocab else 0

    def item_features(self, feats: dict | None) -> np.ndarray:
        out = np.zeros(self.item_cols, np.int64)
        if feats:
            for j, fid in enumerate(self.item_fids):
                out[j] = self._value(feats.get(fid, 0), int(self.item_vocab[j]))
            j = len(self.item_fids)
            for fid, n in zip(self.item_array_fids, self.item_array_len):
                v = feats.get(fid, [])
                v = v if isinstance(v, list) else [v]
                vals = [x for x in (self._value(x, int(self.item_vocab[j])) for x in v) if x][:n]
                out[j:j + len(vals)] = vals
                j += n
        return out

    def user_features(self, feats: dict | None) -> tuple[np.ndarray, np.ndarray]:
        sparse = np.zeros(len(self.user_sparse_fids), np.int64)
        arrays = np.zeros((len(self.user_array_fids), self.user_array_len), np.int64)
        feats = feats or {}
        for j, (fid, vocab) in enumerate(zip(self.user_sparse_fids, self.user_sparse_vocab)):
            v = feats.get(fid, 0)
            sparse[j] = self._value(v[0] if isinstance(v, list) and v else v, vocab)
        for j, (fid, vocab) in enumerate(zip(self.user_array_fids, self.user_array_vocab)):
            v = feats.get(fid, [])
            v = v if isinstance(v, list) else [v]
            vals = [self._value(x, vocab) for x in v[: self.user_array_len]]
            arrays[j, : len(vals)] = vals
        return sparse, arrays


class SeqReader:
    """Random access to the lines of a JSONL file by byte offset; the file is opened lazily in each
    process (a handle inherited through fork would share its position between workers)."""

    def __init__(self, path: str | os.PathLike, offsets_path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise data_error(self.path, None, "file not found")
        self.offsets = np.asarray(safe_load_pickle(offsets_path), dtype=np.int64)
        size = self.path.stat().st_size
        if len(self.offsets) and (self.offsets.max() >= size or np.any(np.diff(self.offsets) <= 0)):
            raise data_error(offsets_path, None, f"offsets do not match {self.path.name} ({size} bytes); "
                             "rebuild them (delete the file and run get_stat.py)")
        self._fh, self._pid = None, None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self):
        return {**self.__dict__, "_fh": None, "_pid": None}

    def read(self, idx: int) -> list[list]:
        if self._fh is None or self._pid != os.getpid():
            self._fh, self._pid = open(self.path, "rb"), os.getpid()
        off = int(self.offsets[idx])
        # a line starts after a newline: catches an offsets file from another version of the data
        self._fh.seek(max(off - 1, 0))
        if off > 0 and self._fh.read(1) != b"\n":
            raise data_error(self.path, idx + 1, f"offset {off} is not the start of a line: the offsets file "
                             "belongs to another version of this file; delete it and run get_stat.py")
        line = self._fh.readline()
        return parse_line(line, str(self.path), idx + 1)


def split_records(records: list[list]) -> tuple[list[list], dict | None]:
    """Interaction records in file order, and the user-profile features (the last profile record wins)."""
    items = [r for r in records if r[1] is not None]
    profile = None
    for r in records:
        if r[1] is None:
            profile = r[2]
    return items, profile


class ActivePool:
    """Items eligible as global negatives: seen in training and active (last event) within the last
    `active_days` of the data. Falls back to every seen item when that would leave too few, so that data
    from another period never ends up with an empty pool (a pitfall of the reference)."""

    def __init__(self, item_count: np.ndarray, item_last_ts: np.ndarray, active_days: float, min_size: int = 1000):
        seen = np.flatnonzero(item_count > 0)
        seen = seen[seen > 0]
        if len(seen) == 0:
            raise ValueError("no items in the training data: cannot sample global negatives")
        cutoff = item_last_ts[seen].max() - active_days * 86400
        pool = seen[item_last_ts[seen] >= cutoff] if active_days > 0 else seen
        self.items = pool if len(pool) >= min(min_size, len(seen)) else seen  # (P,) int64

    def sample(self, rng: np.random.Generator, n: int, exclude: np.ndarray) -> np.ndarray:
        """n items from the pool, none of them in `exclude` (the user's own items)."""
        out = np.empty(0, np.int64)
        for _ in range(20):
            cand = self.items[rng.integers(0, len(self.items), size=2 * n + 8)]
            out = np.concatenate([out, cand[~np.isin(cand, exclude)]])
            if len(out) >= n:
                return out[:n]
        # a user who has seen (nearly) the whole pool: the loss masks any of their positives anyway
        return np.concatenate([out, self.items[rng.integers(0, len(self.items), size=n)]])[:n]


def holdout_index(items: list[list]) -> int:
    """Index of the validation target in a user's item records: like the test protocol, the last click or
    conversion (the last item if there is none). The items before it are the history."""
    return next((j for j in range(len(items) - 1, -1, -1) if items[j][4] > 0), len(items) - 1)


def training_item_stats(reader: SeqReader, item_count: np.ndarray, item_last_ts: np.ndarray,
                        line_len: np.ndarray | None, val_lines: np.ndarray,
                        val_split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Events per item, each item's last timestamp and items per line in what training reads, from get_stat's
    figures over all of seq.jsonl (line_len: items per line, None if unknown), so that held-out validation
    events feed neither log-q nor the negative pool (which takes only items with a training event). 'users':
    minus the validation users' lines (a read of those lines; the last timestamps stay those of the whole
    file, so an item's activity window may end at a validation event), line_len as given. 'last': every line
    without its held-out part (a read of every line: seconds for a public benchmark, a full pass at the real
    scale), exact counts, times and lengths."""
    def read(lines: np.ndarray):  # -> item records per line, with a progress bar for long reads
        for line in tqdm(lines, desc="holding out validation events", unit="user", mininterval=1.0,
                         disable=len(lines) < 10000):
            yield split_records(reader.read(int(line)))[0]

    if val_split == "users":
        count = item_count.copy()
        for items in read(val_lines):
            np.subtract.at(count, np.array([r[1] for r in items], np.int64), 1)
        return count, item_last_ts, line_len
    count, last_ts = np.zeros_like(item_count), np.zeros_like(item_last_ts)
    lengths = np.zeros(len(reader), np.int64)
    for line, items in enumerate(read(np.arange(len(reader)))):
        kept = items[:holdout_index(items)]
        lengths[line] = len(kept)
        np.add.at(count, np.array([r[1] for r in kept], np.int64), 1)
        np.maximum.at(last_ts, np.array([r[1] for r in kept], np.int64), np.array([r[5] for r in kept], np.int64))
    return count, last_ts, lengths


class TrainDataset(Dataset):
    """Next-item training samples. Indices come from EpochSampler as epoch * len(self) + sample (a line, or a
    run of one with 'all'), so that the global negatives are a pure function of (seed, epoch, line[, run]):
    resuming reproduces them exactly.
    With `holdout_last`, each user's validation target (holdout_index) and what follows it are left out.
    `window`: which N events of a longer history train: the 'last' ones; a 'random' run of N consecutive
    events, drawn anew every epoch (its end uniform over N..len); or 'all' of them, the history cut into runs
    of N back from its end (tiles: the last is 'last's sample), each a sample, so that an epoch trains every
    event once. 'all' takes `lengths`, the items per line of `lines` that training reads (after the held-out
    part), and samples are indexed by tile rather than line."""

    def __init__(self, reader: SeqReader, lines: np.ndarray, item_feat: np.ndarray, spec: FeatureSpec,
                 pool: ActivePool, maxlen: int, seed: int, holdout_last: bool = False, window: str = "last",
                 lengths: np.ndarray | None = None):
        if window not in WINDOWS:
            raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
        self.reader, self.lines, self.item_feat, self.spec = reader, lines, item_feat, spec
        self.pool, self.N, self.seed, self.holdout_last, self.window = pool, maxlen + 1, seed, holdout_last, window
        self.tile_line, self.tile_end, self.tile_len = (tiles(lines, lengths, self.N) if window == "all"
                                                        else (lines, None, None))

    def __len__(self) -> int:
        return len(self.tile_line)

    def __getitem__(self, key: int) -> dict[str, np.ndarray]:
        epoch, k = divmod(int(key), len(self.tile_line))
        line = int(self.tile_line[k])
        items, profile = split_records(self.reader.read(line))
        if self.holdout_last and items:
            items = items[:holdout_index(items)]
        rng = np.random.default_rng([self.seed, epoch, line])
        end = len(items)
        if self.window == "random" and end > self.N:
            end = int(rng.integers(self.N, end + 1))
        elif self.tile_end is not None:
            if len(items) != self.tile_len[k]:
                raise data_error(self.reader.path, line + 1, f"{len(items)} items where the cache's line_len.npy "
                                 f"counts {self.tile_len[k]}: seq.jsonl changed after get_stat.py; run it again")
            end = int(self.tile_end[k])
            if end < len(items):  # an earlier run draws its own negatives; the last one is 'last's sample
                rng = np.random.default_rng([self.seed, epoch, line, end])
        hist = items[max(end - self.N, 0):end]  # the user token always stays first
        L = len(hist)
        ids = np.array([r[1] for r in hist], np.int64)
        act = np.array([r[4] + 1 for r in hist], np.int64)
        ts = np.array([r[5] for r in hist], np.int64)
        ids[ids > self.spec.itemnum] = 0  # cannot happen after get_stat's check; keep gathers in range

        N, s = self.N, self.N - L  # s = first valid position (left padding)
        out = _empty_sequence(N, self.spec, profile)
        if L:
            out["seq_type"][s:] = [2] + [1] * (L - 1)
            out["seq_item"][s + 1:] = ids[:-1]
            out["seq_action"][s + 1:] = act[:-1]
            out["seq_ts"][s:] = np.concatenate([ts[:1], ts[:-1]])
            out["next_item"][s:] = ids
            out["next_action"][s:] = act
            out["next_ts"][s:] = ts
            user_items = np.fromiter((r[1] for r in items), np.int64, len(items))
            out["neg_item"][s:] = self.pool.sample(rng, L, user_items)
            out["neg_item"][out["next_item"] == 0] = 0
        out["seq_feat"] = self.item_feat[out["seq_item"]].astype(np.int64)
        out["next_feat"] = self.item_feat[out["next_item"]].astype(np.int64)
        out["neg_feat"] = self.item_feat[out["neg_item"]].astype(np.int64)
        return out


def tiles(lines: np.ndarray, lengths: np.ndarray, N: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each history of lengths[i] items cut into runs of N back from its end -> (line, end, the line's length)
    of every run, a line's runs from the latest; an empty history is one (empty) run."""
    lengths = np.asarray(lengths, np.int64)
    count = np.maximum(-(-lengths // N), 1)  # (L,) runs per line
    first = np.repeat(np.cumsum(count) - count, count)  # (T,) index of its line's first run
    length = np.repeat(lengths, count)  # (T,)
    return np.repeat(lines, count), length - N * (np.arange(len(first)) - first), length


def _empty_sequence(N: int, spec: FeatureSpec, profile: dict | None) -> dict[str, np.ndarray]:
    out = {k: np.zeros(N, np.int64) for k in
           ("seq_item", "seq_type", "seq_action", "seq_ts", "next_item", "next_action", "next_ts", "neg_item")}
    out["user_sparse"], out["user_array"] = spec.user_features(profile)
    return out


class EvalDataset(Dataset):
    """User vectors for retrieval: the whole history as input, the target action as the condition at the
    last position. With `holdout_last` (validation on training lines) the user's last click or conversion
    is held out as the target and its action is the condition, the items before it the history, as for a
    test user (a user with no click or conversion has no target: 0, left out of the metrics); otherwise
    (predict_seq) `target_action` maps raw user id -> action type (default 1, a click), and `user_ids` maps
    integer user re-ids back to raw ids (see ids.raw_user).
    A history item the model was never trained on (`trained[id]` False, or an id beyond the indexer: new to
    the catalogue) enters by its features alone: id 0 and the features of its own record."""

    def __init__(self, reader: SeqReader, lines: np.ndarray, item_feat: np.ndarray, item_raw_id: np.ndarray,
                 spec: FeatureSpec, maxlen: int, holdout_last: bool = False,
                 target_action: dict[str, int] | None = None, trained: np.ndarray | None = None,
                 user_ids: UserIds | None = None):
        self.reader, self.lines, self.item_feat, self.item_raw_id = reader, lines, item_feat, item_raw_id
        self.spec, self.N, self.holdout_last, self.target_action = spec, maxlen + 1, holdout_last, target_action or {}
        self.trained = trained if trained is not None else np.ones(spec.itemnum + 1, bool)
        self.user_ids = user_ids

    def __len__(self) -> int:
        return len(self.lines)

    def _target(self, items: list[list], user: str) -> tuple[int, int, list[list]]:
        """-> (target re-id or 0, condition action id, history items)."""
        if not self.holdout_last:
            return 0, int(self.target_action.get(user, 1)) + 1, items
        t = holdout_index(items)
        if items and items[t][4] > 0:
            return items[t][1], items[t][4] + 1, items[:t]
        return 0, 2, items[:t]  # nothing a test user could have as a target: not validated

    def __getitem__(self, k: int) -> dict:
        line = int(self.lines[k])
        records = self.reader.read(line)
        items, profile = split_records(records)
        user = records[0][0]
        user = str(user) if self.holdout_last else raw_user(user, self.user_ids, self.reader.path, line + 1)
        target, cond, items = self._target(items, user)
        itemnum = self.spec.itemnum
        # the full history (not just the last N) is returned for filtering already-seen items
        known = [r[1] for r in items if r[1] <= itemnum]
        raw = [int(self.item_raw_id[r[1]]) if r[1] <= itemnum else r[1] for r in items]

        hist = items[-(self.N - 1):]  # user token + up to N-1 items; the output at the last one is the user vector
        L = len(hist) + 1
        N, s = self.N, self.N - L
        out = _empty_sequence(N, self.spec, profile)
        out["seq_type"][s:] = [2] + [1] * (L - 1)
        feat = np.zeros((N, self.spec.item_cols), np.int64)
        for j, r in enumerate(hist):
            p = s + 1 + j
            cold = r[1] > itemnum or not self.trained[r[1]]  # never trained: id padding, features from the record
            out["seq_item"][p] = 0 if cold else r[1]
            feat[p] = self.spec.item_features(r[3]) if cold else self.item_feat[r[1]]
            out["seq_action"][p] = r[4] + 1
            out["seq_ts"][p] = r[5]
            out["next_action"][p - 1] = r[4] + 1
            out["next_ts"][p - 1] = r[5]
        out["seq_ts"][s] = hist[0][5] if hist else (records[-1][5] if records else 0)
        out["next_ts"][N - 1] = out["seq_ts"][N - 1]  # the time of the item to predict is unknown: the last one's
        out["next_action"][N - 1] = cond
        out["seq_feat"] = feat
        out.update(user_id=user, target=target, history=np.array(known, np.int64),
                   history_raw=np.array(raw, np.int64))
        for key in ("next_item", "neg_item"):
            del out[key]
        return out


def collate(samples: list[dict]) -> dict:
    """Stack fixed-shape arrays; pad the variable-length histories with 0; keep strings as lists."""
    out = {}
    for key, first in samples[0].items():
        if isinstance(first, str):
            out[key] = [s[key] for s in samples]
        elif key.startswith("history"):
            m = max(max(len(s[key]) for s in samples), 1)
            arr = np.zeros((len(samples), m), np.int64)
            for i, s in enumerate(samples):
                arr[i, : len(s[key])] = s[key]
            out[key] = torch.from_numpy(arr)
        else:
            out[key] = torch.from_numpy(np.stack([np.asarray(s[key]) for s in samples]))
    return out


class EpochSampler(Sampler[int]):
    """Shuffles every epoch from (seed, epoch) and can start mid-epoch, so that the data order after a
    resume is exactly the order of an uninterrupted run. Yields epoch * n + i (see TrainDataset)."""

    def __init__(self, n: int, seed: int, start_epoch: int = 0, start_index: int = 0):
        self.n, self.seed, self.start_epoch, self.start_index = n, seed, start_epoch, start_index

    def __iter__(self):
        epoch, first = self.start_epoch, self.start_index
        while True:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            for i in order[first:]:
                yield epoch * self.n + int(i)
            epoch, first = epoch + 1, 0

    def __len__(self) -> int:
        return self.n


def split_users(num_lines: int, num_val: int, seed: int, mode: str = "users") -> tuple[np.ndarray, np.ndarray]:
    """(train lines, validation lines), deterministic for a seed. 'users': the validation users are held out
    whole (at most a fifth of them); 'last': every user trains (without their last item, see TrainDataset)
    and num_val of them are validated on that item (the leave-one-out protocol of public benchmarks)."""
    perm = np.random.default_rng([seed, 12345]).permutation(num_lines)
    if mode == "last":
        return np.arange(num_lines), np.sort(perm[:num_val])
    num_val = min(num_val, num_lines // 5)
    return np.sort(perm[num_val:]), np.sort(perm[:num_val])


class RankBatches(Sampler[int]):
    """Rank `rank`'s share of every global batch drawn from `sampler`: positions [rank·b, (rank+1)·b) of
    each block of world·b indices. Together the ranks see exactly the batches one process would."""

    def __init__(self, sampler: Sampler[int], local_batch: int, rank: int, world: int):
        self.sampler, self.b, self.rank, self.world = sampler, local_batch, rank, world

    def __iter__(self):
        it, size = iter(self.sampler), self.b * self.world
        while len(block := list(itertools.islice(it, size))) == size:
            yield from block[self.rank * self.b:(self.rank + 1) * self.b]

    def __len__(self) -> int:
        return len(self.sampler) // self.world
