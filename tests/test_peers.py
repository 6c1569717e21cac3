"""bench/peers.py's peer_split (the events a peer library trains and validates on): exactly our split, computed
independently from the raw ratings; bad input refused. Needs no peer library."""
from __future__ import annotations

import csv
import gzip
import importlib.util

import numpy as np
import pytest

import convert_movielens
from common import DataError
from conftest import ROOT, item_rec, profile_rec, write_data
from test_convert_movielens import ML1M, RATINGS, write_grouplens

spec = importlib.util.spec_from_file_location("peers", ROOT / "bench" / "peers.py")
peers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peers)


def expected_split(events: dict[int, list[tuple[int, int]]]) -> list[tuple[str, int, int, bool]]:
    """{user: [(movie, ts)] in time order} -> (user, movie, ts, val) rows: all but the last event (the test
    target), the second-to-last marked as the validation target."""
    rows = []
    for u in sorted(events):
        evs = events[u][:-1]
        rows += [(str(u), m, t, j == len(evs) - 1) for j, (m, t) in enumerate(evs)]
    return rows


def as_rows(split: dict[str, np.ndarray]) -> list[tuple[str, int, int, bool]]:
    return list(zip(split["user"].tolist(), split["item"].tolist(), split["ts"].tolist(), split["val"].tolist()))


def test_tiny_movielens_split_is_ours(tmp_path):
    convert_movielens.convert(write_grouplens(tmp_path / "src"), tmp_path / "out")
    events: dict[int, list[tuple[int, int]]] = {}
    for j in sorted(range(len(RATINGS)), key=lambda j: (RATINGS[j][0], RATINGS[j][3], j)):  # ties: file order
        u, m, _, t = RATINGS[j]
        events.setdefault(u, []).append((m, t))
    split = peers.peer_split(tmp_path / "out" / "data")
    assert as_rows(split) == expected_split(events)
    # user 1's test target (movie 7) is in no row; user 3 (two events) keeps one: its validation target
    assert (split["user"] == "3").sum() == 1 and split["val"][split["user"] == "3"].all()


def test_refuses_what_a_peer_would_split_differently(tmp_path):
    # the validation target is the last click, an impression (action 0) follows it: leave-one-out would differ
    d = write_data(tmp_path / "a", [[item_rec(1, 1, 1, 10), item_rec(1, 2, 0, 20), profile_rec(1, 20)]], itemnum=2)
    with pytest.raises(DataError, match=r"seq.jsonl:1: .*not the last"):
        peers.peer_split(d)
    d = write_data(tmp_path / "b", [[item_rec(1, 1, 1, 10), item_rec(1, 2, 1, 20), profile_rec(1, 20)],
                                    [item_rec(2, 1, 1, 30), item_rec(2, 2, 1, 20), profile_rec(2, 30)]], itemnum=2)
    with pytest.raises(DataError, match=r"seq.jsonl:2: timestamps go back"):
        peers.peer_split(d)
    with pytest.raises(DataError, match="file not found"):
        peers.peer_split(tmp_path / "missing")


@pytest.mark.skipif(not (ML1M / "interactions_chrono.csv.gz").is_file(), reason="MovieLens-1M not present")
def test_real_movielens_split_is_ours(tmp_path):
    convert_movielens.convert(ML1M, tmp_path / "out")
    events: dict[int, list[tuple[int, int]]] = {}
    with gzip.open(ML1M / "interactions_chrono.csv.gz", "rt", newline="") as f:
        rows = sorted((int(r["user_id"]), int(r["pos"]), int(r["movie_id"])) for r in csv.DictReader(f))
    for u, _, m in rows:
        events.setdefault(u, []).append((m, 0))
    split = peers.peer_split(tmp_path / "out" / "data")
    assert len(split["item"]) == 1_000_209 - 6_040 and split["val"].sum() == 6_040
    want = [(u, m, v) for u, m, _, v in expected_split(events)]
    assert list(zip(split["user"].tolist(), split["item"].tolist(), split["val"].tolist())) == want
