"""Shared test helpers: tiny hand-written datasets in the competition format."""
from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data" / "tencentgr_1k_partial"


def item_rec(user: int, item: int, action: int, ts: int, feats: dict | None = None) -> list:
    return [user, item, None, feats if feats is not None else {"100": item % 3 + 1, "101": item % 5 + 1}, action, ts]


def profile_rec(user: int, ts: int, feats: dict | None = None) -> list:
    return [user, None, feats if feats is not None else {"103": user % 4 + 1, "106": [1, 2]}, None, None, ts]


def write_data(folder: Path, lines: list[list], itemnum: int, users: int | None = None,
               raw_lines: list[str] | None = None) -> Path:
    """seq.jsonl (+ indexer.pkl) from records; `raw_lines` are written verbatim instead (bad input)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = raw_lines if raw_lines is not None else [json.dumps(l) for l in lines]
    (folder / "seq.jsonl").write_text("".join(t + "\n" for t in text))
    f = {"100": {1000 + v: v for v in range(1, 4)}, "101": {1010 + v: v for v in range(1, 6)},
         "103": {1030 + v: v for v in range(1, 5)}, "106": {1060 + v: v for v in range(1, 3)}}
    indexer = {"u": {f"u{u}": u for u in range(1, (users or len(text)) + 1)},
               "i": {20_000_000_000 + i: i for i in range(1, itemnum + 1)}, "f": f}
    with open(folder / "indexer.pkl", "wb") as fh:
        pickle.dump(indexer, fh)
    return folder


@pytest.fixture
def shared_fixtures() -> Path:
    if not SHARED.exists():
        pytest.skip("real-format fixtures not available")
    return SHARED


def _torch_threads(k: int):
    n = torch.get_num_threads()
    torch.set_num_threads(k)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_thread():
    """For tests of tiny tensors: intra-op threads only add sync overhead (and stall on a busy CPU)."""
    yield from _torch_threads(1)


@pytest.fixture
def two_threads():
    """For the CPU top-K path, which runs its user blocks in threads: two keep that path exercised."""
    yield from _torch_threads(2)
