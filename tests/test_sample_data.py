"""Tests of the sample data generator: format, determinism, statistics, eval files, learnability."""
import collections
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from make_sample_data import generate  # noqa: E402

FILES = ["data/seq.jsonl", "data/seq_offsets.pkl", "data/indexer.pkl", "data/item_feat_dict.json",
         "eval/predict_seq.jsonl", "eval/predict_seq_offsets.pkl", "eval/predict_set.jsonl",
         "eval/user_action_type.json", "eval/ground_truth.json"]
USER_SPARSE, USER_ARRAY = {"103", "104", "105", "109"}, {"106", "107", "108", "110"}
ITEM_FIDS = {"100", "101", "102", "111", "112", "114", "115", "116", "117", "118", "119", "120",
             "121", "122"}
YEAR_2025 = (1735689600, 1767225600)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("small")
    generate(str(out), users=300, items=400, seed=7, progress=False)
    return out


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """2000 training users, 600 test users: enough for statistics and the learnability checks."""
    out = tmp_path_factory.mktemp("large")
    summary = generate(str(out), users=2000, items=4000, seed=3, test_users=600, progress=False, mm_emb_ids=(81,))
    return out, summary


def read_lines(path, offsets_path):
    """Lines parsed through their byte offsets; checks seek + readline gives each line."""
    offsets = pickle.load(open(offsets_path, "rb"))
    raw = open(path, "rb").read().splitlines(keepends=True)
    assert type(offsets) is list and len(offsets) == len(raw)
    lines = []
    with open(path, "rb") as f:
        for off, line in zip(offsets, raw):
            assert type(off) is int
            f.seek(off)
            assert f.readline() == line
            text = line.decode("ascii").rstrip("\n")
            obj = json.loads(text)
            assert json.dumps(obj) == text  # written like json.dumps with default separators
            lines.append(obj)
    return lines


def check_line(recs, idx, uid_ok, item_ok):
    """Format checks common to seq.jsonl and predict_seq.jsonl; returns the interactions."""
    *inter, prof = recs
    assert inter, "every line has interactions"
    uid = recs[0][0]
    assert uid_ok(uid) and all(r[0] == uid and len(r) == 6 for r in recs)
    # profile record: last, carries the last timestamp, user features typed as in the real data
    assert prof[1] is None and prof[3] is None and prof[4] is None and isinstance(prof[2], dict)
    assert set(prof[2]) >= USER_SPARSE | {"106"} and set(prof[2]) <= USER_SPARSE | USER_ARRAY
    for fid, v in prof[2].items():
        if fid in USER_ARRAY:
            assert isinstance(v, list) and 1 <= len(v) <= 3 and len(set(v)) == len(v)
            assert all(1 <= x <= len(idx["f"][fid]) for x in v)
        elif isinstance(v, int):
            assert 1 <= v <= len(idx["f"][fid])
        else:
            assert isinstance(v, str) and int(v) not in idx["f"][fid]  # cold start value
    ts = [r[5] for r in recs]
    assert ts == sorted(ts) and prof[5] == max(ts) and YEAR_2025[0] <= ts[0] < YEAR_2025[1]
    for r in inter:
        assert r[2] is None and r[4] in (0, 1, 2) and isinstance(r[5], int)
        assert item_ok(r[1]) and isinstance(r[3], dict) and set(r[3]) <= ITEM_FIDS
    return inter


def test_deterministic(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        generate(str(tmp_path / name), users=300, items=400, seed=seed, progress=False)
    for f in FILES:
        a, b, c = ((tmp_path / n / f).read_bytes() for n in "abc")
        assert a == b, f
    assert (tmp_path / "a" / FILES[0]).read_bytes() != (tmp_path / "c" / FILES[0]).read_bytes()
    # atomic writes leave no temp files behind
    assert sorted(os.listdir(tmp_path / "a" / "data")) == sorted(f[5:] for f in FILES[:4])
    assert sorted(os.listdir(tmp_path / "a" / "eval")) == sorted(f[5:] for f in FILES[4:])


def test_training_format(small):
    idx = pickle.load(open(small / "data/indexer.pkl", "rb"))
    assert type(idx) is dict and set(idx) == {"u", "i", "f"}
    assert all(type(idx[k]) is dict for k in "uif") and all(type(v) is dict for v in idx["f"].values())
    assert set(idx["f"]) == ITEM_FIDS | USER_SPARSE | USER_ARRAY
    assert len(idx["u"]) == 300 and len(idx["i"]) == 400 and len(idx["f"]["111"]) == 400
    assert sorted(idx["i"].values()) == list(range(1, 401))
    assert all(isinstance(k, str) and k.startswith("user_") for k in idx["u"])
    assert all(isinstance(k, int) and k >= 20_000_000_000 for k in idx["i"])
    assert all(k // 10**8 == int(f) for f, d in idx["f"].items() for k in d)
    ifd = json.load(open(small / "data/item_feat_dict.json"))
    assert set(ifd) == {str(i) for i in range(1, 401)}
    lines = read_lines(small / "data/seq.jsonl", small / "data/seq_offsets.pkl")
    assert len(lines) == 300 and [ln[0][0] for ln in lines] == list(range(1, 301))
    lengths = []
    for recs in lines:
        inter = check_line(recs, idx, lambda u: isinstance(u, int), lambda i: 1 <= i <= 400)
        lengths.append(len(inter))
        for r in inter:
            assert r[3] == ifd[str(r[1])]  # features on the record = the item's feature dict
            assert all(isinstance(v, int) and 1 <= v <= len(idx["f"][f]) for f, v in r[3].items())
    assert min(lengths) >= 10 and max(lengths) <= 100 and max(lengths) - min(lengths) > 50
    # some item features are missing on some items, like the real data
    has = collections.Counter(f for d in ifd.values() for f in d)
    assert has["111"] == has["100"] == 400 and 0.15 < has["115"] / 400 < 0.35
    assert 0.75 < has["117"] / 400 < 0.95


def test_eval_files(small):
    idx = pickle.load(open(small / "data/indexer.pkl", "rb"))
    gt = json.load(open(small / "eval/ground_truth.json"))
    uat = json.load(open(small / "eval/user_action_type.json"))
    cands = [json.loads(ln) for ln in open(small / "eval/predict_set.jsonl")]
    assert [c["retrieval_id"] for c in cands] == list(range(1, len(cands) + 1))
    cand_ids = {c["creative_id"] for c in cands}
    new_items = cand_ids - set(idx["i"])
    assert set(idx["i"]) <= cand_ids and new_items and len(cand_ids) == len(cands)
    cand_strings = [v for c in cands for v in c["features"].values() if isinstance(v, str)]
    assert cand_strings and all(c["creative_id"] in new_items
                                for c in cands if any(isinstance(v, str) for v in c["features"].values()))
    # targets: one click/conversion per test user, in the candidate set, same action everywhere
    assert len(gt) == 30 and set(gt) == set(uat) and not set(gt) & set(idx["u"])
    for uid, t in gt.items():
        assert t["action_type"] in (1, 2) and uat[uid] == t["action_type"]
        assert t["creative_id"] in cand_ids
    lines = read_lines(small / "eval/predict_seq.jsonl", small / "eval/predict_seq_offsets.pkl")
    itemnum = len(idx["i"])
    seen, unseen, cold = 0, 0, 0
    for recs in lines:
        inter = check_line(recs, idx, lambda u: u in gt, lambda i: 1 <= i <= itemnum or i in new_items)
        for r in inter:
            unseen += r[1] > itemnum
            seen += r[1] <= itemnum
            cold += sum(isinstance(v, str) for v in r[3].values())
    assert [ln[0][0] for ln in lines] == list(gt)
    assert 0 < unseen < 0.15 * (seen + unseen) and cold > 0


def test_action_mix_and_popularity(large):
    out, summary = large
    counts = collections.Counter()
    for ln in open(out / "data/seq.jsonl"):
        for r in json.loads(ln)[:-1]:
            counts[r[1]] += 1
            counts["a%d" % r[4]] += 1
    n = counts["a0"] + counts["a1"] + counts["a2"]
    assert n == summary["events"] and [counts["a0"], counts["a1"], counts["a2"]] == summary["action_counts"]
    assert 0.87 < counts["a0"] / n < 0.93 and 0.06 < counts["a1"] / n < 0.10
    assert 0.012 < counts["a2"] / n < 0.03
    per_item = sorted((c for k, c in counts.items() if isinstance(k, int)), reverse=True)
    assert sum(per_item[:400]) > 0.4 * sum(per_item)  # top 10% of 4000 items


def test_learnable(large):
    """Most frequent topic-feature (101) of a user's clicks -> that value's most popular items
    must beat global popularity on the held-out targets by a wide margin."""
    out, _ = large
    idx = pickle.load(open(out / "data/indexer.pkl", "rb"))
    ifd = json.load(open(out / "data/item_feat_dict.json"))
    raw_of = {v: k for k, v in idx["i"].items()}
    count = collections.Counter(r[1] for ln in open(out / "data/seq.jsonl") for r in json.loads(ln)[:-1])
    top10 = [raw_of[i] for i, _ in count.most_common(10)]
    by_value = collections.defaultdict(list)
    for i, _ in count.most_common():
        by_value[ifd[str(i)].get("101")].append(raw_of[i])
    gt = json.load(open(out / "eval/ground_truth.json"))
    hit_pop = hit_topic = 0
    for ln in open(out / "eval/predict_seq.jsonl"):
        recs = json.loads(ln)[:-1]
        vals = [r[3].get("101") for r in recs if r[4] > 0] or [r[3].get("101") for r in recs]
        v = collections.Counter(vals).most_common(1)[0][0]
        target = gt[recs[0][0]]["creative_id"]
        hit_pop += target in top10
        hit_topic += target in (by_value.get(v, []) + top10)[:10]
    hr_pop, hr_topic = hit_pop / len(gt), hit_topic / len(gt)
    print(f"HR@10 popularity {hr_pop:.3f}, topic heuristic {hr_topic:.3f}")
    assert hr_topic >= 2 * hr_pop and hr_topic > 0.1


def test_vectors_separate_items_of_one_topic_feature_value(large):
    """The mean vector (81) of a test user's clicked history must prefer their target to another item with the
    same topic feature (101) far more often than chance: only the style, which no sparse feature reveals,
    separates the two. Topic alone (vectors without a style) gave 0.60; with styles 0.75."""
    out, _ = large
    vec = {k: np.asarray(v) for k, v in pickle.load(open(out / "data/creative_emb/emb_81_32.pkl", "rb")).items()}
    topic_feat = {}
    for ln in open(out / "eval/predict_set.jsonl"):
        d = json.loads(ln)
        topic_feat[d["creative_id"]] = d["features"].get("101")
    same_value = collections.defaultdict(list)
    for c, v in topic_feat.items():
        if c in vec:
            same_value[v].append(c)
    raw_of = {v: k for k, v in pickle.load(open(out / "data/indexer.pkl", "rb"))["i"].items()}
    gt = json.load(open(out / "eval/ground_truth.json"))
    rng, wins, n = np.random.default_rng(0), 0, 0
    for ln in open(out / "eval/predict_seq.jsonl"):
        recs = json.loads(ln)[:-1]
        clicked = [vec[c] for c in (raw_of.get(r[1], r[1]) for r in recs if r[4] > 0) if c in vec]
        target = gt[recs[0][0]]["creative_id"]
        others = [c for c in same_value[topic_feat[target]] if c != target]
        if clicked and target in vec and others:
            u, other = np.mean(clicked, 0), others[rng.integers(len(others))]
            wins += u @ vec[target] > u @ vec[other]
            n += 1
    print(f"{n} users: the target wins {wins / n:.3f}")
    assert n > 300 and wins / n > 0.68


def test_cli(tmp_path):
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "make_sample_data.py")
    res = subprocess.run([sys.executable, script, "--out", str(tmp_path), "--users", "20",
                          "--items", "50", "--seed", "1"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "20 users" in res.stdout and str(tmp_path) in res.stdout
    assert all((tmp_path / f).exists() for f in FILES)
    assert len(json.load(open(tmp_path / "eval/ground_truth.json"))) == 2
