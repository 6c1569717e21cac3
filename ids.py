"""Id maps between the raw ids of the data (creative ids, user ids) and the re-ids the model uses.

Both are numpy lookups, not Python dicts: at 17.5M items and 10M users a dict costs gigabytes, and a numpy
array is shared by forked loader workers without being copied.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from common import DataError, data_error, safe_load_pickle


class RawIds:
    """Raw creative id -> re-id by binary search on a sorted copy of item_raw_id (get_stat.py's inverse of
    indexer['i'], row = re-id, 0 where an id has no raw id)."""

    def __init__(self, item_raw_id: np.ndarray):
        self.order = np.argsort(item_raw_id, kind="stable")  # (I+1,)
        self.sorted = np.asarray(item_raw_id, np.int64)[self.order]

    def reid(self, raw: np.ndarray) -> np.ndarray:
        """(n,) raw ids -> (n,) re-ids, 0 where the id is not in the indexer."""
        raw = np.asarray(raw, np.int64)
        p = np.minimum(np.searchsorted(self.sorted, raw), len(self.sorted) - 1)
        return np.where((self.sorted[p] == raw) & (raw > 0), self.order[p], 0)


class UserIds:
    """User re-id (the integer of seq.jsonl's user field) -> raw user id (the key of indexer['u'], a string),
    for predict_seq files that carry re-ids: results, user_action_type.json and ground truth use raw ids.
    `raw` is a fixed-width string array indexed by re-id ('' where the indexer has none)."""

    def __init__(self, raw: np.ndarray, source: str):
        self.raw, self.source = raw, source

    @classmethod
    def from_indexer(cls, path: str | os.PathLike) -> "UserIds":
        indexer = safe_load_pickle(path)
        users = indexer.get("u") if isinstance(indexer, dict) else None
        if not isinstance(users, dict):
            raise data_error(path, None, "expected a dict with key 'u' (raw user id -> re-id)")
        bad = next(((u, r) for u, r in users.items() if type(r) is not int or r < 1), None)
        if bad is not None:
            raise data_error(path, None, f"indexer['u'][{bad[0]!r}] = {bad[1]!r}: re-ids must be ints >= 1")
        raw = np.full(max(users.values(), default=0) + 1, "", dtype=f"<U{max(map(len, map(str, users)), default=1)}")
        raw[np.fromiter(users.values(), np.int64, len(users))] = [str(u) for u in users]
        return cls(raw, str(path))

    def raw_of(self, user: int, path: str | os.PathLike, line: int) -> str:
        if 0 < user < len(self.raw) and self.raw[user]:
            return str(self.raw[user])
        raise data_error(path, line, f"user re-id {user} is not in {self.source} ('u' maps {int((self.raw != '').sum())} "
                         "users): the predict_seq file and the indexer are from different datasets")


def raw_user(user: int | str, user_ids: UserIds | None, path: str | os.PathLike, line: int) -> str:
    """A predict_seq user field (line `line`, 1-based) -> the raw user id: a string as it is, an integer re-id
    through indexer['u'] (an error without one: a re-id in results would match no ground truth)."""
    if isinstance(user, str):
        return user
    if user_ids is None:
        raise data_error(path, line, f"user id {user} is an integer re-id and no indexer.pkl maps it back to the raw "
                         "user id (give one with --indexer)")
    return user_ids.raw_of(user, path, line)


def user_ids_for(first_user: int | str, explicit: str, eval_dir: Path, train_data_dir: str | None) -> UserIds | None:
    """The re-id map a predict_seq file needs: None when its (first) user id is a raw string and no --indexer
    is given; else indexer['u'] from --indexer, the eval folder or the training data folder."""
    if isinstance(first_user, str) and not explicit:
        return None
    return UserIds.from_indexer(find_indexer(explicit, eval_dir, train_data_dir))


def find_indexer(explicit: str, eval_dir: Path, train_data_dir: str | None) -> Path:
    """indexer.pkl for mapping user re-ids back: --indexer, else the eval folder's, else the training data's."""
    options = [Path(explicit)] if explicit else [eval_dir / "indexer.pkl"] + (
        [Path(train_data_dir) / "indexer.pkl"] if train_data_dir else [])
    found = next((p for p in options if p.is_file()), None)
    if found is None:
        raise DataError(f"{eval_dir / 'predict_seq.jsonl'}: user ids are integer re-ids; mapping them back to raw ids "
                        f"needs indexer.pkl (looked for {', '.join(map(str, options))}); give it with --indexer")
    return found
