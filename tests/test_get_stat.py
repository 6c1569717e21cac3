"""get_stat.py: counts equal a plain-Python pass, offsets round-trip, real files parse, bad input is refused."""
from __future__ import annotations

import dataclasses
import json
import pickle
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

import get_stat
from common import DataError, load_stat, safe_load_pickle
from conftest import ROOT, item_rec, profile_rec, write_data
from records import parse_line


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
