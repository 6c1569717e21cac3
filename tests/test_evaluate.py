"""evaluate.py: metrics against hand-computed values (ranks, weights, action types, missing users), the
popularity baseline, and the command line."""
from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest

import evaluate
from metrics import summarise, target_ranks

# four users: a hits at rank 1 (click), b at rank 3 (conversion), c misses (click), d has no result (conversion)
RESULT = {"top10s": [[11, 12, 13], [21, 22, 23], [31, 32, 33]], "user": ["a", "b", "c"]}
GT = {"a": {"creative_id": 11, "action_type": 1}, "b": {"creative_id": 23, "action_type": 2},
      "c": {"creative_id": 99, "action_type": 1}, "d": {"creative_id": 41, "action_type": 2}}
LOG4 = 1 / math.log2(4)  # NDCG of rank 3


def run(tmp_path, result=RESULT, gt=GT, *extra: str) -> tuple[dict, dict]:
    (tmp_path / "result.json").write_text(json.dumps(result))
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    rep = evaluate.main(["--result", str(tmp_path / "result.json"), "--ground-truth", str(tmp_path / "gt.json"), *extra])
    return rep, json.loads((tmp_path / "metrics.json").read_text())


def test_hand_computed_metrics(tmp_path, capsys):
    rep, saved = run(tmp_path, RESULT, GT, "--k", "2", "10")
    m = rep["model"]
    assert m["missing"] == 1 and "1 of 4 ground-truth users are missing" in capsys.readouterr().out
    a = m["all"]
    assert a["users"] == 4
    assert a["HR@10"] == pytest.approx(2 / 4) and a["NDCG@10"] == pytest.approx((1 + LOG4) / 4)
    assert a["HR@2"] == pytest.approx(1 / 4) and a["NDCG@2"] == pytest.approx(1 / 4)
    assert a["Score"] == pytest.approx(0.31 * 0.5 + 0.69 * (1 + LOG4) / 4)
    assert a["MRR"] == pytest.approx((1 + 1 / 3) / 4)  # ranks 1 and 3, two misses
    w = m["weighted"]  # weights a 1, b 2.5, c 1, d 2.5: total 7
    assert w["HR@10"] == pytest.approx((1 + 2.5) / 7) and w["NDCG@10"] == pytest.approx((1 + 2.5 * LOG4) / 7)
    assert w["Score"] == pytest.approx(0.31 * 3.5 / 7 + 0.69 * (1 + 2.5 * LOG4) / 7)
    assert m["click"]["users"] == 2 and m["click"]["HR@10"] == pytest.approx(0.5) and m["click"]["NDCG@10"] == pytest.approx(0.5)
    assert m["conversion"]["users"] == 2 and m["conversion"]["NDCG@10"] == pytest.approx(LOG4 / 2)
    assert saved == json.loads(json.dumps(rep))  # metrics.json beside the result holds the same


def test_metrics_equal_a_direct_computation():
    """Array and list paths of metrics.target_ranks/summarise against a loop written from the definitions."""
    rng = np.random.default_rng(0)
    top = rng.integers(1, 30, (200, 10))  # repeats within a row: the first occurrence counts
    target = rng.integers(1, 30, 200)
    users = [str(j) for j in range(200)]
    result = {u: row.tolist() for u, row in zip(users, top)}
    hr = {k: 0.0 for k in (5, 10)}
    ndcg = {k: 0.0 for k in (5, 10)}
    for row, t in zip(top.tolist(), target.tolist()):
        rank = row.index(t) + 1 if t in row else None
        for k in (5, 10):
            if rank is not None and rank <= k:
                hr[k] += 1 / 200
                ndcg[k] += 1 / math.log2(rank + 1) / 200
    by_list = evaluate.evaluate(result, users, target, np.ones(200, np.int64), [5, 10])["all"]
    by_array = summarise(target_ranks(top, target), (5, 10))
    for m in (by_list, by_array):
        for k in (5, 10):
            assert m[f"HR@{k}"] == pytest.approx(hr[k]) and m[f"NDCG@{k}"] == pytest.approx(ndcg[k])
        assert m["Score"] == pytest.approx(0.31 * hr[10] + 0.69 * ndcg[10])


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path, {"top10s": [[1]], "user": ["a", "b"]}, GT)
    assert "result.json: 1 rows in top10s but 2 users" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(tmp_path, RESULT, {"a": {"creative_id": "11"}})
    assert "gt.json: user 'a'" in capsys.readouterr().err


def test_popularity_baseline_counts_histories_filters_and_restricts(tmp_path):
    """Histories (re-ids 1..3 are training items 501..503; 900 is an unseen raw id): counts 503 x3, 900 x2,
    501 x1, 502 x1 (a tie broken by predict_set order); 777 is not a candidate; each history filtered."""
    model = tmp_path / "ck"
    model.mkdir()
    np.save(model / "item_raw_id.npy", np.array([0, 501, 502, 503], np.int64))
    (model / "model.pt").touch()  # a checkpoint folder; the baseline reads only its id table
    ev = tmp_path / "eval"
    ev.mkdir()
    def rec(u, i):
        return [u, i, None, {}, 0, 1]
    lines = [[rec("x", 3), rec("x", 900), ["x", None, {}, None, None, 1]],
             [rec("y", 3), rec("y", 3), rec("y", 777), rec("y", 777), rec("y", 777), rec("y", 777)],
             [rec("z", 900), rec("z", 1), rec("z", 2)]]
    text = [json.dumps(l) + "\n" for l in lines]
    (ev / "predict_seq.jsonl").write_text("".join(text))
    (ev / "predict_seq_offsets.pkl").write_bytes(pickle.dumps(np.cumsum([0] + [len(t) for t in text[:-1]]).tolist()))
    cands = [502, 501, 900, 503, 600]
    (ev / "predict_set.jsonl").write_text("".join(json.dumps({"creative_id": c, "retrieval_id": j, "features": {}}) + "\n"
                                                  for j, c in enumerate(cands)))
    pop = evaluate.popularity_result(model, ev, 3, None)
    assert pop == {"x": [502, 501, 600], "y": [900, 502, 501], "z": [503, 600]}
    gt = {"x": {"creative_id": 501, "action_type": 1}, "z": {"creative_id": 503, "action_type": 2}}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "result.json").write_text(json.dumps({"top10s": [[1, 2, 3]], "user": ["x"]}))
    rep = evaluate.main(["--result", str(tmp_path / "result.json"), "--ground-truth", str(tmp_path / "gt.json"),
                         "--baseline", "popularity", "--model-dir", str(model), "--eval-dir", str(ev)])
    assert rep["popularity"]["all"]["HR@10"] == pytest.approx(1.0)
    assert rep["popularity"]["all"]["NDCG@10"] == pytest.approx((1 / math.log2(3) + 1) / 2)
    assert rep["model"]["all"]["HR@10"] == 0 and rep["model"]["missing"] == 1
