"""dataset.py: exact tensors for a hand-written user, negatives, eval conditioning, cold start, resume order."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

import get_stat
from common import DataError, load_stat
from conftest import item_rec, profile_rec, write_data
from dataset import (ActivePool, EpochSampler, EvalDataset, FeatureSpec, SeqReader, TrainDataset, collate,
                     split_users, training_item_stats)
from ids import UserIds

ITEMNUM = 12


@pytest.fixture
def small(tmp_path):
    lines = [
        # user 1: three items, the profile last
        [item_rec(1, 5, 0, 1000), item_rec(1, 7, 1, 2000), item_rec(1, 5, 2, 3000), profile_rec(1, 3000)],
        [item_rec(2, i, 0, 100 * i) for i in range(1, 12)] + [profile_rec(2, 1100)],
        [item_rec(3, 9, 1, 50), item_rec(3, 12, 0, 60), profile_rec(3, 60, {"103": 9, "106": [2, 1, 2]})],
    ]
    data = write_data(tmp_path / "data", lines, ITEMNUM)
    get_stat.run(data, tmp_path / "cache")
    stat = load_stat(tmp_path / "cache")
    c = tmp_path / "cache"
    return dict(data=data, stat=stat, spec=FeatureSpec.from_stat(stat),
                reader=SeqReader(data / "seq.jsonl", data / "seq_offsets.pkl"),
                item_feat=np.load(c / "item_feat.npy"), item_raw_id=np.load(c / "item_raw_id.npy"),
                pool=ActivePool(np.load(c / "item_count.npy"), np.load(c / "item_last_ts.npy"), 0))


def test_train_sample_exact(small):
    ds = TrainDataset(small["reader"], np.arange(3), small["item_feat"], small["spec"], small["pool"], maxlen=4, seed=0)
    s = ds[0]  # N = 5 positions; user token + items 5, 7 as inputs; targets 5, 7, 5
    assert s["seq_type"].tolist() == [0, 0, 2, 1, 1]
    assert s["seq_item"].tolist() == [0, 0, 0, 5, 7]
    assert s["seq_action"].tolist() == [0, 0, 0, 1, 2]
    assert s["seq_ts"].tolist() == [0, 0, 1000, 1000, 2000]
    assert s["next_item"].tolist() == [0, 0, 5, 7, 5]
    assert s["next_action"].tolist() == [0, 0, 1, 2, 3]
    assert s["next_feat"].tolist() == [[0, 0], [0, 0], [3, 1], [2, 3], [3, 1]]  # item % 3 + 1, item % 5 + 1
    assert s["seq_feat"][3].tolist() == [3, 1] and s["seq_feat"][2].tolist() == [0, 0]
    assert s["user_sparse"].tolist() == [2] and s["user_array"].tolist() == [[1, 2, 0]]
    neg = s["neg_item"]
    assert (neg[:2] == 0).all() and (neg[2:] > 0).all() and not np.isin(neg[2:], [5, 7]).any()

    long = ds[1]  # 11 items, N = 5: the last 5 are targets, the user token is kept first
    assert long["seq_type"].tolist() == [2, 1, 1, 1, 1]
    assert long["seq_item"].tolist() == [0, 7, 8, 9, 10]
    assert long["next_item"].tolist() == [7, 8, 9, 10, 11]
    assert long["seq_ts"].tolist() == [700, 700, 800, 900, 1000]

    other = ds[2]  # a value beyond the indexer but seen in the data widens the vocabulary
    assert other["user_sparse"].tolist() == [9] and other["user_array"].tolist() == [[2, 1, 2]]
    assert small["stat"]["schema"]["user_sparse"] == {"103": 10}


def test_random_window_trains_every_event_of_a_long_history(small):
    """--window random: a run of N consecutive events of the (held-out-trimmed) history, drawn per epoch;
    over epochs every event is a target, never the held-out one; short histories train as with 'last'."""
    kw = dict(maxlen=4, seed=0, holdout_last=True)
    last = TrainDataset(small["reader"], np.arange(3), small["item_feat"], small["spec"], small["pool"], **kw)
    rand = TrainDataset(small["reader"], np.arange(3), small["item_feat"], small["spec"], small["pool"],
                        window="random", **kw)
    history = [r[1] for r in small["reader"].read(1) if r[1] is not None][:-1]  # user 2: items 1..10 train
    runs = [history[e - 5:e] for e in range(5, len(history) + 1)]
    windows, targets = set(), set()
    for epoch in range(40):
        s = rand[epoch * 3 + 1]
        assert s["next_item"].tolist() in runs  # N = 5 consecutive targets, none past the held-out item
        assert s["seq_item"].tolist() == [0] + s["next_item"].tolist()[:-1] and s["seq_type"][0] == 2
        assert not np.isin(s["neg_item"], history).any()
        windows.add(tuple(s["next_item"].tolist()))
        targets |= set(s["next_item"].tolist())
        for short in (0, 2):  # histories within N: the same sample as 'last', negatives included
            a, b = rand[epoch * 3 + short], last[epoch * 3 + short]
            assert all(np.array_equal(a[k], b[k]) for k in a)
    assert targets == set(history) and len(windows) == len(history) - 4
    assert np.array_equal(rand[4]["next_item"], rand[4]["next_item"])  # a pure function of (seed, epoch, line)
    assert last[1]["next_item"].tolist() == history[-5:]
    with pytest.raises(ValueError, match="window"):
        TrainDataset(small["reader"], np.arange(3), small["item_feat"], small["spec"], small["pool"], maxlen=4,
                     seed=0, window="first")


def test_all_window_trains_every_event_once_an_epoch(small):
    """--window all: each (held-out-trimmed) history cut into runs of N back from its end, one sample each;
    an epoch's samples hold every training event exactly once as a target, the latest run is 'last's sample,
    negatives included, and a stale line count is refused."""
    kw = dict(maxlen=4, seed=0, holdout_last=True)
    histories = [[r[1] for r in small["reader"].read(line) if r[1] is not None] for line in range(3)]
    histories = [histories[0][:2], histories[1][:-1], []]  # held out: user 1's last click, user 2's last item, user 3's only click
    lengths = np.array([len(h) for h in histories])
    last = TrainDataset(small["reader"], np.arange(3), small["item_feat"], small["spec"], small["pool"], **kw)
    tiled = TrainDataset(small["reader"], np.arange(3), small["item_feat"], small["spec"], small["pool"],
                         window="all", lengths=lengths, **kw)
    runs = {0: [histories[0]], 1: [histories[1][5:], histories[1][:5]], 2: [[]]}  # 10 items: two runs of 5
    assert len(tiled) == 4 and tiled.tile_line.tolist() == [0, 1, 1, 2]
    for epoch in range(3):
        got: dict[int, list] = {0: [], 1: [], 2: []}
        for k in range(4):
            s = tiled[epoch * 4 + k]
            line = int(tiled.tile_line[k])
            targets = s["next_item"][s["next_item"] > 0].tolist()
            got[line].append(targets)
            assert s["seq_item"].tolist() == [0] + s["next_item"].tolist()[:-1] or len(targets) < 5
            assert not np.isin(s["neg_item"], histories[line] or [-1]).any()
            if targets == histories[line][-5:]:
                b = last[epoch * 3 + line]
                assert all(np.array_equal(s[key], b[key]) for key in s), (epoch, line)
        assert got == runs
    with pytest.raises(DataError, match="seq.jsonl:2: 10 items where the cache's line_len.npy counts 11"):
        TrainDataset(small["reader"], np.arange(3), small["item_feat"], small["spec"], small["pool"],
                     window="all", lengths=lengths + 1, **kw)[1]


def test_negatives_never_in_user_items_and_deterministic(small):
    ds = TrainDataset(small["reader"], np.arange(3), small["item_feat"], small["spec"], small["pool"], maxlen=20, seed=3)
    for key in range(3 * 50):
        s = ds[key]
        user_items = {r[1] for r in small["reader"].read(key % 3) if r[1] is not None}
        negs = s["neg_item"][s["next_item"] > 0]
        assert len(negs) and not (set(negs.tolist()) & user_items)
    assert np.array_equal(ds[7]["neg_item"], ds[7]["neg_item"])
    assert not np.array_equal(ds[0]["neg_item"], ds[3]["neg_item"])  # another epoch, other negatives


def test_eval_sample_condition_history_and_cold_start(small, tmp_path):
    spec = small["spec"]
    lines = [[["user_a", 5, None, {"100": 3, "101": 1}, 0, 10], ["user_a", 20_000_000_099, None,
              {"100": "1009999", "101": 2}, 1, 20], ["user_a", None, {"103": "new", "106": [1]}, None, None, 20]]]
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "predict_seq.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    with open(folder / "predict_seq_offsets.pkl", "wb") as f:
        pickle.dump([0], f)
    reader = SeqReader(folder / "predict_seq.jsonl", folder / "predict_seq_offsets.pkl")
    ds = EvalDataset(reader, np.arange(1), small["item_feat"], small["item_raw_id"], spec, maxlen=4,
                     target_action={"user_a": 2})
    s = ds[0]
    assert s["user_id"] == "user_a"
    assert s["seq_type"].tolist() == [0, 0, 2, 1, 1]
    assert s["seq_item"].tolist() == [0, 0, 0, 5, 0]  # the unseen item is id padding ...
    assert s["seq_feat"][4].tolist() == [0, 2]  # ... with its features; the cold string is padding
    assert s["next_action"].tolist() == [0, 0, 1, 2, 3]  # the condition (conversion) at the last position
    assert s["user_sparse"].tolist() == [0]
    assert s["history"].tolist() == [5] and s["history_raw"].tolist() == [20_000_000_005, 20_000_000_099]
    missing = EvalDataset(reader, np.arange(1), small["item_feat"], small["item_raw_id"], spec, maxlen=4)[0]
    assert missing["next_action"][-1] == 2  # absent from user_action_type: the click condition

    val = EvalDataset(small["reader"], np.arange(3), small["item_feat"], small["item_raw_id"], spec, maxlen=4,
                      holdout_last=True)
    v = val[0]
    assert v["target"] == 5 and v["seq_item"].tolist() == [0, 0, 0, 5, 7]
    assert v["next_action"].tolist() == [0, 0, 1, 2, 3] and v["history"].tolist() == [5, 7]
    batch = collate([val[0], val[1], val[2]])
    assert batch["seq_item"].shape == (3, 5) and batch["history"].shape == (3, 10)
    # user 2 has exposures only: no target a test user could have (a click or conversion), so not validated
    assert batch["user_id"] == ["1", "2", "3"] and batch["target"].tolist() == [5, 0, 9]
    assert val[2]["history"].tolist() == [] and val[2]["next_action"][-1] == 2  # the last click, not exposure 12


def test_sampler_resumes_mid_epoch(small):
    full = EpochSampler(7, seed=1)
    it = iter(full)
    order = [next(it) for _ in range(20)]
    assert sorted(k % 7 for k in order[:7]) == list(range(7)) and order[:7] != order[7:14]
    resumed = iter(EpochSampler(7, seed=1, start_epoch=1, start_index=3))
    assert [next(resumed) for _ in range(10)] == order[10:20]


def test_split_users_disjoint():
    train, val = split_users(100, 10, seed=0)
    assert len(val) == 10 and len(train) == 90 and not set(train) & set(val)
    assert np.array_equal(split_users(100, 10, seed=0)[1], val)


def test_offsets_from_another_file_are_refused(small, tmp_path):
    with open(tmp_path / "off.pkl", "wb") as f:
        pickle.dump([0, 7, 20], f)
    reader = SeqReader(small["data"] / "seq.jsonl", tmp_path / "off.pkl")
    with pytest.raises(DataError, match=r"seq.jsonl:2: offset 7 is not the start of a line"):
        reader.read(1)


def test_active_pool_falls_back_when_too_small():
    count = np.array([0, 5, 5, 5, 0, 5])
    last = np.array([0, 100, 200, 10 * 86400, 0, 10 * 86400])
    assert ActivePool(count, last, active_days=1, min_size=2).items.tolist() == [3, 5]
    assert ActivePool(count, last, active_days=1, min_size=3).items.tolist() == [1, 2, 3, 5]


def test_leave_one_out_split(small):
    """val_split 'last': every user trains, but never on the item validation asks for (nor after it)."""
    train, val = split_users(3, 2, seed=0, mode="last")
    assert train.tolist() == [0, 1, 2] and len(val) == 2
    ds = TrainDataset(small["reader"], train, small["item_feat"], small["spec"], small["pool"], maxlen=4, seed=0,
                      holdout_last=True)
    vds = EvalDataset(small["reader"], train, small["item_feat"], small["item_raw_id"], small["spec"], maxlen=4,
                      holdout_last=True)
    assert ds[0]["next_item"].tolist() == [0, 0, 0, 5, 7]  # user 1's last item (5, a conversion) is held out
    assert vds[0]["target"] == 5 and vds[0]["history"].tolist() == [5, 7]
    assert ds[2]["next_item"].tolist() == [0, 0, 0, 0, 0]  # user 3's only click is its first item
    assert vds[2]["target"] == 9 and vds[2]["history"].tolist() == []


def _eval_folder(tmp_path, lines: list[list]) -> SeqReader:
    folder = tmp_path / "eval"
    folder.mkdir(exist_ok=True)
    text = [json.dumps(l) + "\n" for l in lines]
    (folder / "predict_seq.jsonl").write_text("".join(text))
    with open(folder / "predict_seq_offsets.pkl", "wb") as f:
        pickle.dump(np.cumsum([0] + [len(t) for t in text[:-1]]).tolist(), f)
    return SeqReader(folder / "predict_seq.jsonl", folder / "predict_seq_offsets.pkl")


def test_integer_user_ids_map_to_raw_ids_for_the_condition(small, tmp_path):
    # write_data's indexer maps "u1".."u3" to re-ids 1..3; predict_seq may name users by either form
    reader = _eval_folder(tmp_path, [[item_rec(2, 5, 1, 10), profile_rec(2, 10)],
                                     [item_rec(3, 7, 1, 10), ["u3", None, None, None, None, 10]],
                                     [item_rec(9, 7, 1, 10), profile_rec(9, 10)]])
    users = UserIds.from_indexer(small["data"] / "indexer.pkl")
    ds = EvalDataset(reader, np.arange(3), small["item_feat"], small["item_raw_id"], small["spec"], maxlen=4,
                     target_action={"u2": 2, "3": 2}, user_ids=users)
    assert ds[0]["user_id"] == "u2" and ds[0]["next_action"][-1] == 3  # the raw id's condition (conversion)
    assert ds[1]["user_id"] == "u3" and ds[1]["next_action"][-1] == 2  # "u3" (a string) as it is; "3" is not it
    with pytest.raises(DataError, match=r"predict_seq.jsonl:3: user re-id 9 is not in .*indexer.pkl"):
        ds[2]
    bare = EvalDataset(reader, np.arange(3), small["item_feat"], small["item_raw_id"], small["spec"], maxlen=4)
    with pytest.raises(DataError, match=r"predict_seq.jsonl:1: user id 2 is an integer re-id and no indexer"):
        bare[0]


def test_items_never_trained_enter_by_their_own_features(small, tmp_path):
    # item 7 is in the indexer but (say) never trained on: its feature row must not be used, nor its id
    reader = _eval_folder(tmp_path, [[["a", 7, None, {"100": 2, "101": 4}, 1, 10], ["a", 5, None, {"100": 1}, 1, 20]]])
    trained = np.ones(ITEMNUM + 1, bool)
    trained[7] = False
    s = EvalDataset(reader, np.arange(1), small["item_feat"], small["item_raw_id"], small["spec"], maxlen=4,
                    trained=trained)[0]
    assert s["seq_item"].tolist() == [0, 0, 0, 0, 5]
    assert s["seq_feat"][3].tolist() == [2, 4] and s["seq_feat"][4].tolist() == small["item_feat"][5].tolist()
    assert s["history"].tolist() == [7, 5]  # still filtered out of the results


def test_training_item_stats_hold_validation_out(small):
    """Against counts written out by hand from the fixture's three lines."""
    count, last_ts = np.load(small["data"].parent / "cache" / "item_count.npy"), \
        np.load(small["data"].parent / "cache" / "item_last_ts.npy")
    line_len = np.load(small["data"].parent / "cache" / "line_len.npy")
    assert line_len.tolist() == [3, 11, 2]
    c, t, n = training_item_stats(small["reader"], count, last_ts, line_len, np.array([2]), "users")  # user 3 validates
    expect = np.zeros(ITEMNUM + 1, np.int64)
    np.add.at(expect, [5, 7, 5] + list(range(1, 12)), 1)  # users 1 and 2 whole
    assert c.tolist() == expect.tolist() and t.tolist() == last_ts.tolist() and n is line_len
    c, t, n = training_item_stats(small["reader"], count, last_ts, None, np.array([0]), "last")
    # 'last': user 1 without its last click/conversion (the 3rd item), user 2 without its last item (no
    # click), user 3 without item 9 (its only click) and what follows it
    expect = np.zeros(ITEMNUM + 1, np.int64)
    np.add.at(expect, [5, 7] + list(range(1, 11)), 1)
    ts = np.zeros(ITEMNUM + 1, np.int64)
    ts[[5, 7]] = [1000, 2000]
    ts[1:11] = np.maximum(ts[1:11], 100 * np.arange(1, 11))
    assert c.tolist() == expect.tolist() and t.tolist() == ts.tolist() and n.tolist() == [2, 10, 0]
