"""get_stat.py: counts equal a plain-Python pass, offsets round-trip, real files parse, bad input is refused."""
from __future__ import annotations

import dataclasses
import json
import pickle
import random
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

import get_stat
from common import DataError, load_stat, safe_load_pickle
from conftest import ROOT, item_rec, profile_rec, write_data
from records import parse_line
from test_records import _corrupt, awkward_file


def _random_lines(rng: np.random.Generator, users: int, itemnum: int) -> list[list]:
    lines = []
    for u in range(1, users + 1):
        n = int(rng.integers(1, 30))
        ts = np.sort(rng.integers(1_700_000_000, 1_700_900_000, size=n))
        recs = [item_rec(u, int(rng.integers(1, itemnum + 1)), int(rng.choice(3, p=[.9, .08, .02])), int(t))
                for t in ts]
        if u % 7 == 0:  # some items lack a feature, some users lack a profile
            recs[0][3] = {"100": 2}
        if u % 5:
            recs.append(profile_rec(u, int(ts[-1]), {"103": u % 4 + 1, "106": [1, 2][: u % 2 + 1]}))
        lines.append(recs)
    return lines


def test_counts_equal_plain_python(tmp_path):
    rng = np.random.default_rng(0)
    itemnum = 60
    lines = _random_lines(rng, 200, itemnum)
    data = write_data(tmp_path / "data", lines, itemnum)
    stat = get_stat.run(data, tmp_path / "cache", chunk_bytes=1000)  # many small chunks: boundaries tested
    cache = tmp_path / "cache"

    count, last_ts, actions, feats = Counter(), {}, Counter(), {}
    for recs in lines:
        for r in recs:
            if r[1] is not None:
                count[r[1]] += 1
                last_ts[r[1]] = max(last_ts.get(r[1], 0), r[5])
                actions[r[4]] += 1
                feats[r[1]] = r[3]
    item_count = np.load(cache / "item_count.npy")
    assert item_count.tolist() == [count.get(i, 0) for i in range(itemnum + 1)]
    assert np.load(cache / "item_last_ts.npy").tolist() == [last_ts.get(i, 0) for i in range(itemnum + 1)]
    assert stat["action_counts"] == {str(a): actions[a] for a in range(3)}
    assert stat["num_events"] == sum(count.values()) and stat["num_users"] == 200
    lens = [sum(r[1] is not None for r in recs) for recs in lines]
    assert stat["seq_len"]["max"] == max(lens) and stat["seq_len"]["min"] == min(lens)
    assert stat["seq_len"]["mean"] == pytest.approx(np.mean(lens))
    item_feat = np.load(cache / "item_feat.npy")
    assert list(stat["schema"]["item_sparse"]) == ["100", "101"]
    for i, f in feats.items():  # the last record of each item wins
        assert item_feat[i].tolist() == [f.get("100", 0), f.get("101", 0)]
    assert stat["schema"]["user_sparse"] == {"103": 5} and stat["schema"]["user_array"] == {"106": 3}
    assert stat["user_array_maxlen"] == {"106": 2}
    assert np.load(cache / "item_raw_id.npy")[1:].tolist() == [20_000_000_000 + i for i in range(1, itemnum + 1)]


def test_offsets_round_trip_and_second_run_is_noop(tmp_path, capsys):
    lines = _random_lines(np.random.default_rng(1), 50, 20)
    data = write_data(tmp_path / "data", lines, 20)
    get_stat.run(data, tmp_path / "cache", chunk_bytes=1000)
    offsets = safe_load_pickle(data / "seq_offsets.pkl")
    assert isinstance(offsets, list) and len(offsets) == 50
    with open(data / "seq.jsonl", "rb") as f:
        for k, off in enumerate(offsets):
            f.seek(off)
            assert json.loads(f.readline()) == lines[k]
    before = (tmp_path / "cache" / "stat.json").stat().st_mtime_ns
    capsys.readouterr()
    get_stat.run(data, tmp_path / "cache")
    assert "up to date" in capsys.readouterr().out
    assert (tmp_path / "cache" / "stat.json").stat().st_mtime_ns == before


def test_real_line_and_indexer_parse(shared_fixtures, tmp_path):
    first, second = (shared_fixtures / "seq.txt").read_text().split("\n", 1)
    records = parse_line(first, "seq.txt", 1)
    assert len(records) == 98 and records[-1][1] is None and isinstance(records[-1][2]["106"], list)
    with pytest.raises(DataError, match=r"seq.txt:2: invalid JSON"):
        parse_line(second, "seq.txt", 2)
    indexer = safe_load_pickle(shared_fixtures / "indexer.pkl")
    assert len(indexer["u"]) == 865 and len(indexer["i"]) == 58734 and len(indexer["f"]) == 22
    assert len(safe_load_pickle(shared_fixtures / "seq_offsets.pkl")) == 865
    # the same line through get_stat's fast path, with the real indexer
    data = tmp_path / "data"
    data.mkdir()
    (data / "seq.jsonl").write_text(first + "\n")
    (data / "indexer.pkl").write_bytes((shared_fixtures / "indexer.pkl").read_bytes())
    stat = get_stat.run(data, tmp_path / "cache")
    assert stat["num_events"] == 97 and stat["itemnum"] == 58734
    assert set(stat["schema"]["item_sparse"]) == set(records[0][3]) | {"115"}
    assert stat["schema"]["item_sparse"]["121"] == len(indexer["f"]["121"]) + 1


class _Evil:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"i": _Evil()}))
    with pytest.raises(DataError, match="unsafe or invalid pickle"):
        safe_load_pickle(tmp_path / "evil.pkl")
    assert not (tmp_path / "PWNED").exists()


GOOD = json.dumps([item_rec(1, 2, 0, 100), profile_rec(1, 100)])
BAD_LINES = {
    "invalid JSON": ('[[1, 2, null, {"100": 1}, 0, 100], [1, nul', r"seq.jsonl:2: invalid JSON"),
    "wrong record length": ('[[1, 2, null, {"100": 1}, 0]]', r"seq.jsonl:2: record 0: expected a record of 6 fields"),
    "wrong type": ('[[1, "x", null, {"100": 1}, 0, 100]]', r"seq.jsonl:2: record 0: item_id must be a positive int"),
    "bad action": ('[[1, 2, null, {"100": 1}, 7, 100]]', r"seq.jsonl:2: record 0: action_type must be 0, 1 or 2"),
    "empty line": ("", r"seq.jsonl:2: empty line"),
    "item beyond indexer": ('[[1, 99, null, {"100": 1}, 0, 100]]', r"seq.jsonl:2: item id 99 is beyond the indexer"),
    "item id 0": ('[[1, 0, null, {"100": 1}, 0, 100]]', r"seq.jsonl:2: record 0: item_id must be a positive int"),
    "user id 0": ('[[0, 2, null, {"100": 1}, 0, 100]]', r"seq.jsonl:2: record 0: user_id must be a positive int"),
    "float feature": ('[[1, 2, null, {"100": 1.5}, 0, 100]]', r"seq.jsonl:2: record 0: item_feature feature 100 has a value of type float"),
    "dict feature": ('[[1, 2, null, {"100": {"a": 1}}, 0, 100]]', r"seq.jsonl:2: record 0: item_feature feature 100 has a value of type dict"),
    "interaction with user features": ('[[1, 2, {"103": 1}, {"100": 1}, 0, 100]]', r"seq.jsonl:2: record 0: an interaction record must have user_feature null"),
}


def test_truncated_last_line_and_empty_file(tmp_path):
    data = write_data(tmp_path / "data", [], 5, users=2, raw_lines=[GOOD, GOOD[:-9]])
    with pytest.raises(DataError, match=r"seq.jsonl:2: invalid JSON .* the line may be truncated"):
        get_stat.run(data, tmp_path / "cache")
    (data / "seq.jsonl").write_text("")
    with pytest.raises(DataError, match=r"seq.jsonl: empty file"):
        get_stat.run(data, tmp_path / "cache")


def test_tolerated_oddities_are_counted(tmp_path, capsys):
    """Kept as they are, but counted in stat.json and the summary: a user without items, a user on two lines,
    timestamps going backwards, a feature id the indexer does not know."""
    lines = [[item_rec(1, 2, 0, 100), profile_rec(1, 100)],
             [profile_rec(2, 100)],
             [item_rec(3, 2, 0, 300), item_rec(3, 3, 1, 200), profile_rec(3, 300)],
             [item_rec(1, 4, 0, 500, {"100": 1, "150": 2}), profile_rec(1, 500)]]
    data = write_data(tmp_path / "data", lines, 5, users=3)
    stat = get_stat.run(data, tmp_path / "cache", chunk_bytes=200)
    assert stat["tolerated"] == {"users_without_items": 1, "duplicate_users": 1, "unordered_users": 1,
                                 "features_not_in_indexer": ["150"]}
    out = capsys.readouterr().out
    assert "users with a profile but no items (nothing to train on or validate): 1" in out and "timestamps go backwards" in out


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_bad_lines_are_one_line_errors_and_write_nothing(tmp_path, kind):
    line, message = BAD_LINES[kind]
    data = write_data(tmp_path / "data", [], 5, users=3, raw_lines=[GOOD, line, GOOD])
    with pytest.raises(DataError, match=message):
        get_stat.run(data, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    assert not (data / "seq_offsets.pkl").exists()


def test_cli_data_error_has_no_traceback(tmp_path):
    data = write_data(tmp_path / "data", [], 5, users=2, raw_lines=[GOOD, BAD_LINES["invalid JSON"][0]])
    missing = subprocess.run([sys.executable, str(ROOT / "get_stat.py"), "--data-dir", str(tmp_path / "nope"),
                              "--cache-dir", str(tmp_path / "c")], capture_output=True, text=True)
    assert missing.returncode == 2 and "nope/seq.jsonl: file not found" in missing.stderr
    bad = subprocess.run([sys.executable, str(ROOT / "get_stat.py"), "--data-dir", str(data),
                          "--cache-dir", str(tmp_path / "c")], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith(f"error: {data / 'seq.jsonl'}:2: invalid JSON")


def test_mismatched_offsets_are_refused(tmp_path):
    lines = _random_lines(np.random.default_rng(2), 10, 20)
    data = write_data(tmp_path / "data", lines, 20)
    with open(data / "seq_offsets.pkl", "wb") as f:
        pickle.dump([0, 5, 10], f)
    with pytest.raises(DataError, match=r"seq_offsets.pkl: does not match seq.jsonl \(3 offsets for 10 lines"):
        get_stat.run(data, tmp_path / "cache")


@pytest.mark.parametrize("workers", [1, 3])
def test_given_offsets_are_checked_in_any_pickle_shape(tmp_path, workers):
    """A given seq_offsets.pkl is compared batch by batch (any pickle protocol; batches longer than one
    comparison piece); the first difference and both counts are named; a missing one is written as a plain list."""
    lines = [[item_rec(u, u % 20 + 1, 0, 100)] for u in range(1, 3001)]
    data = write_data(tmp_path / "data", lines, 20)
    get_stat.run(data, tmp_path / "cache", chunk_bytes=20000, workers=workers)
    offsets = safe_load_pickle(data / "seq_offsets.pkl")
    assert pickle.loads((data / "seq_offsets.pkl").read_bytes()) == offsets and len(offsets) == 3000
    cases = {"same": offsets, "one changed": offsets[:2100] + [offsets[2100] + 1] + offsets[2101:],
             "one more": offsets + [10**9], "one fewer": offsets[:-1], "first changed": [1] + offsets[1:]}
    expect = {"one changed": "3000 offsets for 3000 lines, first difference at line 2101",
              "one more": "3001 offsets for 3000 lines, first difference at line 3001",
              "one fewer": "2999 offsets for 3000 lines, first difference at line 3000",
              "first changed": "3000 offsets for 3000 lines, first difference at line 1"}
    for protocol in (0, 2, 3, 5):
        for name, given in cases.items():
            (data / "seq_offsets.pkl").write_bytes(pickle.dumps(given, protocol=protocol))
            if name == "same":
                get_stat.run(data, tmp_path / "cache", force=True, workers=workers)
            else:
                with pytest.raises(DataError, match=re.escape(expect[name])):
                    get_stat.run(data, tmp_path / "cache", force=True, workers=workers)


def test_percentiles_from_histogram_are_numpys():
    """Exactly np.percentile's floats (its interpolation rounds differently above and below the midpoint)."""
    rng = np.random.default_rng(0)
    cases = [rng.integers(0, rng.integers(1, 120), n) for n in [1, 2, 3, 7, 20, 101, 1000, 4321]]
    cases += [np.array([30, 66]), np.array([91, 157, 157])]
    cases += [np.sort(rng.integers(0, 200, 2)).repeat(rng.integers(1, 40, 2)) for _ in range(500)]
    for lengths in cases:
        hist = np.bincount(lengths)
        for q in (0, 5, 50, 95, 99, 100):
            assert get_stat._percentile(hist, q) == float(np.percentile(lengths, q)), (lengths, q)


@pytest.mark.parametrize("workers,chunk_bytes", [(1, 1 << 20), (1, 150), (2, 1 << 20)])
def test_a_feature_absent_from_the_last_record_is_missing(tmp_path, workers, chunk_bytes):
    """Item 1 has feature 100 in the first half of the file only: its last record (second half: another block,
    or another process where 100 never appears) has none, so item_feat says 0 (missing), not the earlier value."""
    first = [[item_rec(u, 1, 0, 100, {"100": 2, "101": 4})] for u in range(10, 20)]
    second = [[item_rec(u, 1, 0, 200, {"101": 5, "102": 7})] for u in range(20, 30)]  # lines of the same length
    data = write_data(tmp_path / "data", first + second, 3)
    assert get_stat.line_ranges(data / "seq.jsonl", 2)[1][0] == (data / "seq.jsonl").stat().st_size // 2
    stat = get_stat.run(data, tmp_path / "cache", chunk_bytes=chunk_bytes, workers=workers)
    assert list(stat["schema"]["item_sparse"]) == ["100", "101", "102"]
    assert np.load(tmp_path / "cache" / "item_feat.npy").tolist() == [[0, 0, 0], [0, 5, 7], [0, 0, 0], [0, 0, 0]]


def test_fast_path_serves_ordinary_lines(tmp_path, monkeypatch):
    """The reference equality would also hold if every line went the strict way: make that fail loudly."""
    lines = _random_lines(np.random.default_rng(3), 50, 20)
    data = write_data(tmp_path / "data", lines, 20)

    def refuse(*a):
        raise AssertionError("strict path taken")

    monkeypatch.setattr(get_stat, "strict_line", refuse)
    assert get_stat.run(data, tmp_path / "cache", chunk_bytes=3000, workers=1)["num_users"] == 50


def test_crlf_bom_and_spacing_are_accepted(tmp_path):
    recs = [item_rec(1, 2, 1, 100), profile_rec(1, 100)]
    compact = json.dumps(recs, separators=(",", ":"))
    data = write_data(tmp_path / "data", [], 5, users=2, raw_lines=["\ufeff" + GOOD + "\r", compact])
    stat = get_stat.run(data, tmp_path / "cache")
    assert stat["num_events"] == 2 and stat["action_counts"] == {"0": 1, "1": 1, "2": 0}
    assert load_stat(tmp_path / "cache")["num_users"] == 2


def test_item_array_features(tmp_path):
    """A multi-valued item feature (e.g. genres) gets one column per slot after the sparse columns, its
    vocabulary in schema item_array, and reaches the item tower as a mean of its values' embeddings."""
    import torch

    from dataset import FeatureSpec
    from model import PRESETS, ItemTower

    genres = {1: [3, 1], 2: [2], 3: [1, 2, 4], 4: []}
    lines = [[item_rec(u, i, 1, 1_700_000_000 + 10 * u + i, {"100": i % 3 + 1, "111": genres[i]})
              for i in (1, 2, 3, 4)] + [profile_rec(u, 1_700_000_100)] for u in (1, 2)]
    data = write_data(tmp_path / "data", lines, itemnum=5)
    stat = get_stat.run(data, tmp_path / "cache", chunk_bytes=300)
    sc = stat["schema"]
    assert sc["item_sparse"] == {"100": 4} and sc["item_array"] == {"111": 5} and sc["item_array_len"] == {"111": 3}
    feat = np.load(tmp_path / "cache" / "item_feat.npy")
    assert feat.tolist() == [[0, 0, 0, 0], [2, 3, 1, 0], [3, 2, 0, 0], [1, 1, 2, 4], [2, 0, 0, 0], [0, 0, 0, 0]]
    spec = FeatureSpec.from_stat(stat)
    assert spec.item_cols == 4
    # inference-time features: values beyond the vocabulary or cold strings are dropped, the rest packed
    assert spec.item_features({"100": 2, "111": [4, 9, "x", 1, 2]}).tolist() == [2, 4, 1, 2]

    cfg = dataclasses.replace(PRESETS["small"], exclude_item_feats=())
    tower = ItemTower(cfg, sc, itemnum=5)
    emb = tower.array_emb[0].weight
    with torch.no_grad():
        emb.normal_()
        emb[0].zero_()
    x = torch.tensor([[0, 3, 1, 0], [0, 1, 3, 0]])  # the same set of values in another order
    tower.mlp = torch.nn.Identity()  # look at the concatenated inputs
    cat = tower(torch.zeros(2, dtype=torch.long), x)
    pooled = cat[:, -cfg.feat_dim:]
    torch.testing.assert_close(pooled[0], (emb[3] + emb[1]) / 2)
    torch.testing.assert_close(pooled[0], pooled[1])


# --------------------------------------------------------------------------- plain-json reference

def _reference(seq: bytes, itemnum: int, indexer_f: dict) -> dict:
    """Every output of get_stat from json.loads, line by line, in plain Python (the definition)."""
    count, last_ts, actions, last_feat = Counter(), {}, Counter(), {}
    lengths, users, unordered, all_ts = [], [], 0, []
    sparse, lists, user_max, user_lists, user_scalar = set(), {}, {}, {}, set()
    for text in seq.decode("utf-8").lstrip("\ufeff").split("\n"):
        if not text.strip():
            continue
        recs = json.loads(text)
        user = recs[0][0]
        users.append((type(user).__name__, user))
        item_ts = [r[5] for r in recs if r[1] is not None]
        lengths.append(len(item_ts))
        unordered += any(b < a for a, b in zip(item_ts, item_ts[1:]))
        for u, item, ufeat, ifeat, action, ts in recs:
            all_ts.append(ts)
            if item is None:
                for fid, v in (ufeat or {}).items():
                    if isinstance(v, str):
                        continue  # cold-start strings are padding
                    vals = v if isinstance(v, list) else [v]
                    user_max[fid] = max([user_max.get(fid, 0), 0] + vals)
                    if isinstance(v, list):
                        user_lists[fid] = max(user_lists.get(fid, 0), len(v))
                    else:
                        user_scalar.add(fid)
                continue
            count[item] += 1
            last_ts[item] = max(last_ts.get(item, 0), ts)
            actions[action] += 1
            last_feat[item] = ifeat or {}
            for fid, v in (ifeat or {}).items():
                if isinstance(v, int):
                    sparse.add(fid)
                elif isinstance(v, list):
                    lists[fid] = max(lists.get(fid, 0), len(v))
    key = lambda f: (int(f), f)
    item_fids = sorted(sparse, key=key)
    array_fids = sorted(set(lists) - sparse, key=key)
    array_len = {f: min(max(lists[f], 1), get_stat.MAX_ITEM_ARRAY_LEN) for f in array_fids}
    feat = np.zeros((itemnum + 1, len(item_fids) + sum(array_len.values())), np.int64)
    for item, d in last_feat.items():
        for j, f in enumerate(item_fids):
            v = d.get(f)
            feat[item, j] = max(v, 0) if isinstance(v, int) else 0
        j = len(item_fids)
        for f in array_fids:
            v = d.get(f)
            if isinstance(v, list):
                vals = [max(x, 0) for x in v[:array_len[f]]]
                feat[item, j:j + len(vals)] = vals
            j += array_len[f]
    vocab = lambda f, seen: max(len(indexer_f.get(f, {})), seen) + 1
    cols = {f: feat[:, j] for j, f in enumerate(item_fids)}
    j, arrays = len(item_fids), {}
    for f in array_fids:
        arrays[f] = feat[:, j:j + array_len[f]]
        j += array_len[f]
    user_fids = sorted(user_max, key=key)
    stat = {
        "itemnum": itemnum, "num_users": len(lengths), "num_events": sum(count.values()),
        "num_active_items": len(count), "action_counts": {str(a): actions[a] for a in range(3)},
        "seq_len": {"min": min(lengths), "mean": float(np.mean(lengths)), "p50": float(np.percentile(lengths, 50)),
                    "p95": float(np.percentile(lengths, 95)), "max": max(lengths),
                    "hist": [lengths.count(n) for n in range(max(lengths) + 1)]},
        "min_ts": min(all_ts), "max_ts": max(all_ts),
        "schema": {
            "item_sparse": {f: vocab(f, int(cols[f].max())) for f in item_fids},
            "item_array": {f: vocab(f, int(arrays[f].max())) for f in array_fids},
            "item_array_len": array_len,
            "user_sparse": {f: vocab(f, user_max[f]) for f in user_fids if f not in user_lists},
            "user_array": {f: vocab(f, user_max[f]) for f in user_fids if f in user_lists},
        },
        "user_array_maxlen": {f: max(user_lists[f], 1 if f in user_scalar else 0) for f in sorted(user_lists, key=key)},
        "tolerated": {
            "users_without_items": lengths.count(0),
            "duplicate_users": len(users) - len(set(users)),
            "unordered_users": unordered,
            "features_not_in_indexer": sorted(set(item_fids + array_fids + user_fids) - set(indexer_f), key=key),
        },
    }
    arrays = {"item_count": [count.get(i, 0) for i in range(itemnum + 1)],
              "item_last_ts": [last_ts.get(i, 0) for i in range(itemnum + 1)], "item_feat": feat.tolist(),
              "line_len": lengths}
    return {"stat": stat, **arrays}


def _run(data, cache, chunk_bytes, workers):
    kwargs = {} if workers is None else {"workers": workers}
    return get_stat.run(data, cache, chunk_bytes=chunk_bytes, force=True, **kwargs)


def _check_against_reference(data, cache, stat) -> None:
    seq = (data / "seq.jsonl").read_bytes()
    indexer = safe_load_pickle(data / "indexer.pkl")
    ref = _reference(seq, len(indexer["i"]), indexer["f"])
    got = {k: v for k, v in stat.items() if k not in ("version", "sources")}
    for k in ref["stat"]:
        assert got[k] == ref["stat"][k], k
    for name in ("item_count", "item_last_ts", "item_feat", "line_len"):
        assert np.load(cache / f"{name}.npy").tolist() == ref[name], name
    offsets = safe_load_pickle(data / "seq_offsets.pkl")
    starts = [0] + [i + 1 for i, b in enumerate(seq) if b == 10 and i + 1 < len(seq)]
    assert offsets == starts


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("chunk_bytes,workers,partition_bytes", [(1 << 20, None, None), (700, None, 5000),
                                                                 (700, 2, 3000), (3000, 3, None)])
def test_awkward_lines_equal_plain_json_reference(tmp_path, monkeypatch, seed, chunk_bytes, workers, partition_bytes):
    """Strings with quotes, braces, escapes and non-ASCII text, odd spacing, duplicate keys, string user ids:
    every output equals the plain-json reference, for any chunk size, number of processes and of user-id
    partitions (the duplicate count)."""
    if partition_bytes:
        monkeypatch.setattr(get_stat, "USERS_PER_PARTITION_BYTES", partition_bytes)
    itemnum = 12
    data = write_data(tmp_path / "data", [[item_rec(1, 1, 0, 1)]], itemnum)
    (data / "seq.jsonl").write_bytes(awkward_file(seed, 150, itemnum))
    stat = _run(data, tmp_path / "cache", chunk_bytes, workers)
    _check_against_reference(data, tmp_path / "cache", stat)


@pytest.mark.parametrize("seed", range(8))
def test_corrupted_line_gets_the_strict_verdict(tmp_path, seed):
    """One line of an awkward file corrupted at random: get_stat either refuses with the strict message for
    the file's first line the strict path refuses (its line number in the whole file, from any process), or
    gives the reference's outputs. Also values the outputs cannot hold (beyond int32 / int64 / the indexer)."""
    rng = random.Random(seed)
    itemnum = 12
    lines = [l for l in awkward_file(seed, 60, itemnum).split(b"\n") if l]
    for k in rng.sample(range(len(lines)), 2):
        if rng.random() < 0.3:  # a valid line the outputs cannot hold
            recs = json.loads(lines[k].decode("utf-8").lstrip("\ufeff"))
            rec = recs[0]
            rec[rng.choice([1, 5])] = rng.choice([itemnum + 1, 2**63, -(2**63) - 1]) if rec[1] else rec[5]
            if rec[3] is not None:
                rec[3]["100"] = rng.choice([2**31, [1, 2**31], -(2**40), 2**64])
            lines[k] = json.dumps(recs).encode()
        else:
            lines[k] = _corrupt(rng, lines[k])
    data = write_data(tmp_path / "data", [[item_rec(1, 1, 0, 1)]], itemnum)
    (data / "seq.jsonl").write_bytes(b"".join(l + b"\n" for l in lines))
    want = None
    for n, line in enumerate(lines, 1):
        try:
            get_stat.strict_line(line, data / "seq.jsonl", n, itemnum)
        except DataError as e:
            want = str(e)
            break
    for workers in (1, 3):
        if want is None:
            _check_against_reference(data, tmp_path / "cache", _run(data, tmp_path / "cache", 500, workers))
            (data / "seq_offsets.pkl").unlink()
        else:
            with pytest.raises(DataError) as e:
                _run(data, tmp_path / "cache", 500, workers)
            assert str(e.value) == want
            assert not (data / "seq_offsets.pkl").exists()


def _unusual(rng: random.Random, line: bytes, itemnum: int) -> bytes:
    """A valid line holding what the outputs cannot: an item beyond the indexer, a timestamp beyond int64,
    an item feature beyond int32 (negative ones are fine: padding), a user feature beyond int64."""
    recs = json.loads(line.decode("utf-8").lstrip("\ufeff"))
    rec = rng.choice(recs)
    r = rng.random()
    if r < 0.25 and rec[1] is not None:
        rec[1] = rng.choice([itemnum + 1, 2**63, 2**70])
    elif r < 0.5:
        rec[5] = rng.choice([2**63, -(2**63) - 1, 2**63 - 1, -(2**63)])
    elif rec[1] is not None:
        rec[3] = {**(rec[3] or {}), "100": rng.choice([2**31, 2**31 - 1, [1, 2**31], -(2**40), -(2**70), 2**64])}
    else:
        rec[2] = {**(rec[2] or {}), "103": rng.choice([2**63, 2**63 - 1, [1, -(2**63) - 1], -(2**63)])}
    return json.dumps(recs).encode()


@pytest.mark.parametrize("seed", range(3))
def test_scan_verdict_per_line_equals_strict(tmp_path, seed):
    """Hundreds of corrupted or unusual lines, each between two good ones, through the fast scan in this process:
    refused with the strict message exactly when strict_line refuses the line, else all its events counted."""
    rng = random.Random(1000 + seed)
    itemnum = 20
    lines = [l for l in awkward_file(seed, 120, itemnum).split(b"\n") if l]
    path = tmp_path / "seq.jsonl"
    events = lambda recs: sum(r[1] is not None for r in recs)
    around = events(parse_line(lines[0], "x", 1)) + events(parse_line(lines[-1], "x", 1))
    verdicts = Counter()
    for k in range(3 * (len(lines) - 2)):
        line = lines[1 + k // 3]
        odd = _unusual(rng, line, itemnum) if rng.random() < 0.3 else _corrupt(rng, line)
        path.write_bytes(b"\n".join([lines[0], odd, lines[-1]]) + b"\n")
        try:
            want, recs = None, get_stat.strict_line(odd, path, 2, itemnum)
        except DataError as e:
            want, recs = str(e), None
        folder = tmp_path / f"tmp{k}"
        folder.mkdir()
        try:
            got, st = None, get_stat.scan_file(path, itemnum, 1 << 20, 1, folder)[0]
        except DataError as e:
            got = str(e)
        assert got == want, odd
        verdicts[want is None] += 1
        if want is None:
            assert st.lines == 3 and st.num_events == around + events(recs)
    assert verdicts[True] > 20 and verdicts[False] > 100


@pytest.mark.parametrize("workers", [1, 2])
def test_feature_kinds_by_their_values(tmp_path, workers):
    """A feature with only 0 or negative ints is sparse (all padding), one with strings only is not in the schema,
    one with lists only is an array feature, one with both ints and lists is sparse; ints below -2**63 are
    padding too (the strict path). Checked against the plain-json reference."""
    lines = []
    for u in range(1, 41):
        feats = {"100": -u, "101": "cold", "102": [u % 3, 1], "103": 0, "104": [1] if u % 2 else 5}
        if u == 7:
            feats["100"] = -(2**70)
        lines.append(json.dumps([item_rec(u, u % 5 + 1, 0, 100 + u, feats), profile_rec(u, 100 + u, {"106": [u % 4]})]))
    data = write_data(tmp_path / "data", [], 6, users=40, raw_lines=lines)
    stat = _run(data, tmp_path / "cache", 600, workers)
    assert list(stat["schema"]["item_sparse"]) == ["100", "103", "104"] and list(stat["schema"]["item_array"]) == ["102"]
    _check_against_reference(data, tmp_path / "cache", stat)
