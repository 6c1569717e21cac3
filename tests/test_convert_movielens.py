"""convert_movielens.py: exact output on a tiny hand-made MovieLens, both layouts agree, synthetic timestamps,
rating actions, bad input refused cleanly, get_stat reads the result, and the real ML-1M (when present)."""
from __future__ import annotations

import gzip
import itertools
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

import convert_movielens
import get_stat
from common import DataError
from conftest import ROOT, SHARED
from evaluate import load_ground_truth

ML1M = SHARED.parent / "ml-1m"
FILES = ["data/seq.jsonl", "data/seq_offsets.pkl", "data/indexer.pkl", "data/item_feat_dict.json",
         "eval/predict_seq.jsonl", "eval/predict_seq_offsets.pkl", "eval/predict_set.jsonl",
         "eval/user_action_type.json", "eval/ground_truth.json"]

USERS = ["1::F::1::10::48067", "2::M::56::16::70072", "3::M::25::15::55117-1234", "4::F::45::7::02460",
         "5::M::18::4::99999"]  # user 5 has no rating: left out
MOVIES = ["1::Toy Story (1995)::Animation|Children's|Comedy",
          "2::Jumanji (1995)::Adventure|Children's|Fantasy",
          "5::Misérables, Les (1995)::Drama|Musical",
          "7::Café au Lait (1993)::Comedy",
          "10::Heat (1995)::Action|Crime|Thriller",
          "12::Metropolis (1927)::Sci-Fi",
          "20::Never Rated (1990)::Drama"]  # no rating: not an item, its year and genre not in the vocabularies
# (user, movie, rating, ts) in file order: not time order, with ties broken by this order.
RATINGS = [(1, 10, 5, 1000), (1, 1, 3, 900), (1, 5, 4, 1000), (1, 7, 5, 1200),
           (2, 2, 4, 500), (2, 12, 2, 600), (2, 1, 5, 600), (2, 5, 1, 700),
           (3, 7, 5, 300), (3, 12, 4, 200),  # user 3: two events (a short user)
           (4, 1, 1, 100), (4, 2, 2, 110), (4, 10, 3, 120)]
# Re-ids by hand. Items: movies 1, 2, 5, 7, 10, 12 -> 1..6. Years 1927, 1993, 1995 -> 1, 2, 3. Genres as
# strings: Action 1, Adventure 2, Animation 3, Children's 4, Comedy 5, Crime 6, Drama 7, Fantasy 8, Musical 9,
# Sci-Fi 10, Thriller 11. User 1: gender F -> 1, age 1 -> 1 (of 1, 25, 45, 56), occupation 10 -> 2 (of 7, 10,
# 15, 16), zip "48" -> 2 (of "02", "48", "55", "70"). User 1 in time order: 1 (900), 10 (1000), 5 (1000, after
# 10 in the file), 7 (1200, the target).
USER1_LINE = ('[[1,1,null,{"10":3,"11":[3,4,5]},1,900],[1,5,null,{"10":3,"11":[1,6,11]},1,1000],'
              '[1,3,null,{"10":3,"11":[7,9]},1,1000],[1,null,{"1":1,"2":1,"3":2,"4":2},null,null,1000]]')


def write_grouplens(src: Path, ratings=RATINGS, extra_rating_lines: list[str] | None = None) -> Path:
    src.mkdir(parents=True, exist_ok=True)
    (src / "users.dat").write_bytes("".join(u + "\n" for u in USERS).encode("latin-1"))
    (src / "movies.dat").write_bytes("".join(m + "\n" for m in MOVIES).encode("latin-1"))  # ISO-8859-1 bytes
    lines = [f"{u}::{m}::{r}::{t}" for u, m, r, t in ratings] + (extra_rating_lines or [])
    (src / "ratings.dat").write_text("".join(l + "\n" for l in lines))
    return src


def write_chrono(src: Path, no_time_users: set[int] = frozenset()) -> Path:
    """The same data in the chrono layout: rows in (user, time, file order), pos from 0 per user."""
    src.mkdir(parents=True, exist_ok=True)
    (src / "users.dat").write_bytes("".join(u + "\n" for u in USERS).encode("latin-1"))
    (src / "movies.dat").write_bytes("".join(m + "\n" for m in MOVIES).encode("latin-1"))
    order = sorted(range(len(RATINGS)), key=lambda j: (RATINGS[j][0], RATINGS[j][3], j))
    rows, pos = ["user_id,movie_id,pos,rating,timestamp"], {}
    for j in order:
        u, m, r, t = RATINGS[j]
        k = pos[u] = pos.get(u, -1) + 1
        rows.append(f"{u},{m},{k},," if u in no_time_users else f"{u},{m},{k},{r},{t}")
    with gzip.open(src / "interactions_chrono.csv.gz", "wt") as f:
        f.write("\n".join(rows) + "\n")
    return src


def lines_at_offsets(path: Path, offsets_path: Path) -> list[str]:
    offsets = pickle.loads(offsets_path.read_bytes())
    with open(path, "rb") as f:
        text = f.read()
        assert offsets[0] == 0 and len(offsets) == text.count(b"\n")
        out = []
        for o in offsets:
            assert o == 0 or text[o - 1:o] == b"\n"  # each offset is a line start
            f.seek(o)
            out.append(f.readline().decode())
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("ml")
    summary = convert_movielens.convert(write_grouplens(root / "src"), root / "out")
    return root / "out", summary


def test_exact_lines_and_protocol(converted):
    out, summary = converted
    data, ev = out / "data", out / "eval"
    lines = lines_at_offsets(data / "seq.jsonl", data / "seq_offsets.pkl")
    assert lines[0] == USER1_LINE + "\n"
    elines = lines_at_offsets(ev / "predict_seq.jsonl", ev / "predict_seq_offsets.pkl")
    assert elines[0] == ('[["1",1,null,{"10":3,"11":[3,4,5]},1,900],["1",5,null,{"10":3,"11":[1,6,11]},1,1000],'
                         '["1",3,null,{"10":3,"11":[7,9]},1,1000],["1",null,{"1":1,"2":1,"3":2,"4":2},null,null,1000]]\n')
    assert len(lines) == len(elines) == 4  # user 5 (no ratings) is left out

    indexer = pickle.loads((data / "indexer.pkl").read_bytes())
    assert indexer["u"] == {"1": 1, "2": 2, "3": 3, "4": 4}
    assert indexer["i"] == {1: 1, 2: 2, 5: 3, 7: 4, 10: 5, 12: 6}
    assert indexer["f"]["10"] == {1927: 1, 1993: 2, 1995: 3}
    assert indexer["f"]["11"]["Action"] == 1 and indexer["f"]["11"]["Thriller"] == 11 and len(indexer["f"]["11"]) == 11
    assert indexer["f"]["4"] == {"02": 1, "48": 2, "55": 3, "70": 4}
    assert indexer["f"]["1"] == {"F": 1, "M": 2} and indexer["f"]["2"] == {1: 1, 25: 2, 45: 3, 56: 4}
    raw_of = {v: k for k, v in indexer["i"].items()}
    item_feat = json.loads((data / "item_feat_dict.json").read_text())
    assert item_feat["4"] == {"10": 2, "11": [5]}  # movie 7, "Café au Lait (1993)", Comedy

    # History + target = the user's events in (time, file order); the target is the last and not in the history.
    users, targets, actions = load_ground_truth(ev / "ground_truth.json")
    gt = dict(zip(users, targets.tolist()))
    uat = json.loads((ev / "user_action_type.json").read_text())
    assert uat == dict(zip(users, actions.tolist())) == {"1": 1, "2": 1, "3": 1, "4": 1}
    for line, eline in zip(lines, elines):
        recs, erecs = json.loads(line), json.loads(eline)
        u = recs[-1][0]
        raw_u = next(k for k, v in indexer["u"].items() if v == u)
        assert recs[-1][1] is None and erecs[-1][0] == raw_u and all(r[0] == u for r in recs)
        hist = [raw_of[r[1]] for r in recs[:-1]]
        assert [r[1:] for r in erecs] == [r[1:] for r in recs]
        mine = sorted((j for j in range(len(RATINGS)) if RATINGS[j][0] == int(raw_u)), key=lambda j: (RATINGS[j][3], j))
        assert hist + [gt[raw_u]] == [RATINGS[j][1] for j in mine]
        assert gt[raw_u] not in hist
        assert recs[-1][5] == recs[-2][5]  # profile carries the last written event's time
        for r in recs[:-1]:
            assert r[3] == item_feat[str(r[1])] and r[2] is None and r[4] == 1
    assert gt == {"1": 7, "2": 5, "3": 7, "4": 10}

    # predict_set: every item once, creative id -> retrieval id as in the indexer, training features.
    cands = [json.loads(l) for l in (ev / "predict_set.jsonl").read_text().splitlines()]
    assert {c["creative_id"]: c["retrieval_id"] for c in cands} == indexer["i"]
    assert all(c["features"] == item_feat[str(c["retrieval_id"])] for c in cands)
    assert len(cands) == len(item_feat) == 6

    assert summary["users"] == 4 and summary["items"] == 6 and summary["events"] == 13
    assert summary["train_events"] == 9 and summary["synthetic_timestamp_users"] == 0
    assert summary["users_fewer_than_3_events"] == 1 and summary["layout"] == "grouplens"
    assert json.loads((out / "conversion.json").read_text())["events"] == 13


def test_predict_set_reads_with_infer(converted):
    infer = pytest.importorskip("infer")
    out, _ = converted
    cids = [c for chunk, _ in infer.iter_predict_set(out / "eval" / "predict_set.jsonl", 4) for c in chunk.tolist()]
    assert cids == [1, 2, 5, 7, 10, 12]


def test_chrono_layout_gives_identical_files(converted, tmp_path):
    out, _ = converted
    summary = convert_movielens.convert(write_chrono(tmp_path / "src"), tmp_path / "out")
    assert summary["layout"] == "chrono" and summary["synthetic_timestamp_users"] == 0
    for name in FILES:
        assert (tmp_path / "out" / name).read_bytes() == (out / name).read_bytes(), name


def test_chrono_synthetic_timestamps(tmp_path, capsys):
    summary = convert_movielens.convert(write_chrono(tmp_path / "src", no_time_users={3, 4}), tmp_path / "out")
    assert "2 with synthetic timestamps" in capsys.readouterr().out
    conv = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert conv["synthetic_timestamp_users"] == summary["synthetic_timestamp_users"] == 2
    assert "synthetic" in conv["synthetic_timestamps"]
    lines = (tmp_path / "out" / "data" / "seq.jsonl").read_text().splitlines()
    start = 500  # the earliest real timestamp (user 2)
    for u in (3, 4):
        recs = json.loads(lines[u - 1])
        ts = [r[5] for r in recs[:-1]]
        assert ts[0] == start and all(b > a for a, b in itertools.pairwise(ts))
        assert recs[-1][5] == ts[-1]
    # users with real times are unchanged
    assert lines[0] == USER1_LINE


def test_rating_actions(tmp_path):
    out = tmp_path / "out"
    summary = convert_movielens.convert(write_grouplens(tmp_path / "src"), out, rating_actions=True)
    recs = json.loads((out / "data" / "seq.jsonl").read_text().splitlines()[0])
    assert [r[4] for r in recs[:-1]] == [1, 2, 1]  # ratings 3, 5, 4
    gt = json.loads((out / "eval" / "ground_truth.json").read_text())
    assert gt["1"] == {"creative_id": 7, "action_type": 2}  # rating 5
    assert gt["2"] == {"creative_id": 5, "action_type": 1}  # rating 1
    assert json.loads((out / "eval" / "user_action_type.json").read_text()) == {"1": 2, "2": 1, "3": 2, "4": 1}
    assert summary["actions"]["mode"] == "rating"
    assert summary["action_counts"] == {"1": 9, "2": 4}
    # chrono rows without a rating stay clicks
    convert_movielens.convert(write_chrono(tmp_path / "c", no_time_users={1}), tmp_path / "o2", rating_actions=True)
    recs = json.loads((tmp_path / "o2" / "data" / "seq.jsonl").read_text().splitlines()[0])
    assert [r[4] for r in recs[:-1]] == [1, 1, 1]


def test_one_event_user_is_kept_with_a_warning(tmp_path, capsys):
    summary = convert_movielens.convert(write_grouplens(tmp_path / "src", ratings=RATINGS + [(5, 12, 4, 50)]),
                                        tmp_path / "out")
    assert summary["users"] == 5 and summary["users_fewer_than_3_events"] == 2
    assert "2 users have fewer than 3 events" in capsys.readouterr().err
    last = (tmp_path / "out" / "data" / "seq.jsonl").read_text().splitlines()[-1]
    assert json.loads(last) == [[5, None, {"1": 2, "2": 2, "3": 1, "4": 5}, None, None, 50]]  # profile only
    assert json.loads((tmp_path / "out" / "eval" / "ground_truth.json").read_text())["5"]["creative_id"] == 12


def test_malformed_line_exits_2_without_output(tmp_path):
    src = write_grouplens(tmp_path / "src")
    lines = (src / "ratings.dat").read_text().splitlines()
    lines[2] = "1::5::4"  # line 3: a field missing
    (src / "ratings.dat").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(ROOT / "convert_movielens.py"), str(src), str(out)],
                       check=False, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 2
    err = p.stderr.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "ratings.dat:3:" in err and "malformed" in err
    assert not out.exists()


@pytest.mark.parametrize("extra, where, what", [
    (["9::1::4::100"], "ratings.dat:14:", "user 9 is not in users.dat"),
    (["1::99::4::100"], "ratings.dat:14:", "movie 99 is not in movies.dat"),
])
def test_unknown_ids_are_data_errors(tmp_path, extra, where, what):
    src = write_grouplens(tmp_path / "src", extra_rating_lines=extra)
    with pytest.raises(DataError, match=what) as e:
        convert_movielens.convert(src, tmp_path / "out")
    assert where in str(e.value)
    assert not (tmp_path / "out").exists()


def test_missing_and_bad_side_files(tmp_path):
    src = write_grouplens(tmp_path / "src")
    (src / "users.dat").unlink()
    with pytest.raises(DataError, match="users.dat: file not found"):
        convert_movielens.convert(src, tmp_path / "out")
    src = write_grouplens(tmp_path / "src2")
    (src / "movies.dat").write_bytes(b"1::Toy Story (1995)::Comedy\n1::Again (1995)::Comedy\n")
    with pytest.raises(DataError, match=r"movies.dat:2: duplicate MovieID 1"):
        convert_movielens.convert(src, tmp_path / "out")
    src = write_chrono(tmp_path / "src3")
    with gzip.open(src / "interactions_chrono.csv.gz", "wt") as f:
        f.write("user_id,movie_id,pos,rating,timestamp\n1,1,0,3,900\n1,10,1,5,\n")
    with pytest.raises(DataError, match=r"interactions_chrono.csv.gz:3: timestamp is empty"):
        convert_movielens.convert(src, tmp_path / "out")
    with pytest.raises(DataError, match="not a MovieLens-1M folder"):
        convert_movielens.convert(tmp_path, tmp_path / "out")


def test_get_stat_reads_converted(converted, tmp_path):
    out, _ = converted
    data = tmp_path / "data"
    data.mkdir()
    for name in ("seq.jsonl", "seq_offsets.pkl", "indexer.pkl", "item_feat_dict.json"):
        (data / name).write_bytes((out / "data" / name).read_bytes())
    stat = get_stat.run(data, tmp_path / "cache")
    assert stat["itemnum"] == 6 and stat["num_users"] == 4 and stat["num_events"] == 9
    assert stat["schema"]["user_sparse"].keys() == {"1", "2", "3", "4"}


@pytest.mark.skipif(not ML1M.exists(), reason="MovieLens-1M not available")
def test_real_ml1m(tmp_path):
    t0 = time.time()
    summary = convert_movielens.convert(ML1M, tmp_path)
    dt = time.time() - t0
    print(f"ML-1M conversion: {dt:.1f}s")
    assert dt < 60
    assert summary["users"] == 6040 and summary["items"] == 3706 and summary["layout"] == "chrono"
    assert summary["train_events"] + 6040 == summary["events"] == 1_000_209
    assert summary["synthetic_timestamp_users"] == 3041  # users 3000-6040 have no times
    train = 0
    with open(tmp_path / "data" / "seq.jsonl") as f:
        for line in f:
            train += len(json.loads(line)) - 1
    assert train + 6040 == 1_000_209
    assert len(json.loads((tmp_path / "eval" / "ground_truth.json").read_text())) == 6040
    assert len(pickle.loads((tmp_path / "data" / "seq_offsets.pkl").read_bytes())) == 6040
