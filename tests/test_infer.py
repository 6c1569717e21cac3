"""infer.py: history filtering, result files (against an independent top-K), cold start, user ids,
conditions, input errors, and the whole chain sample data -> get_stat -> checkpoint -> infer -> evaluate."""
from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import get_stat
import infer
from common import load_stat
from conftest import ROOT
from dataset import EvalDataset, SeqReader, collate
from make_sample_data import generate
from model import HSTUModel, ModelConfig
import train

TINY = ModelConfig(id_dim=8, feat_dim=4, hidden=16, num_layers=1, num_heads=2, maxlen=20, num_time_buckets=8,
                   emb_dropout=0.0, dropout=0.0)


pytestmark = pytest.mark.usefixtures("two_threads")  # the CPU top-K path runs blocks in threads


def test_history_positions():
    cids = np.array([50, 10, 30, 20], np.int64)  # candidate creative ids in predict_set order
    order = np.argsort(cids, kind="stable")
    hist = torch.tensor([[10, 99, 0], [20, 50, 30]])
    assert infer.history_positions(hist, order, cids[order]).tolist() == [[1, -1, -1], [3, 0, 2]]


def test_raw_ids_lookup():
    raw = np.array([0, 700, 300, 500], np.int64)
    assert infer.RawIds(raw).reid(np.array([300, 700, 400, 0, 900, 500])).tolist() == [2, 1, 0, 0, 0, 3]


# --------------------------------------------------------------------------- a checkpoint and eval data

def save_tiny(root: Path, mcfg: ModelConfig, stat: dict, model: HSTUModel, item_count=None) -> Path:
    """train.save of `model` as step 7 into root/ck; item_count: the training counts (default get_stat's)."""
    cfg = train.TrainConfig(ckpt_dir=str(root / "ck"), cache_dir=str(root / "cache"), data_dir=str(root / "data"))
    (root / "ck").mkdir(exist_ok=True)
    counts = np.load(root / "cache" / "item_count.npy") if item_count is None else item_count
    run = train.RunData(stat, mcfg, None, None, counts, None, None)
    return train.save(cfg, run, model, train.Optimizers(torch.optim.AdamW(model.parameters())), 7, {}, None)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Sample data (300 users) -> get_stat -> a tiny model saved by train.save."""
    root = tmp_path_factory.mktemp("infer")
    generate(str(root), users=300, items=400, seed=5, progress=False)
    get_stat.run(root / "data", root / "cache")
    stat = load_stat(root / "cache")
    torch.manual_seed(0)
    model = HSTUModel(TINY, stat["schema"], stat["itemnum"])
    torch.nn.init.normal_(model.item_tower.id_emb.weight)  # as after training: item ids matter
    ckpt = save_tiny(root, TINY, stat, model)
    return dict(root=root, eval=root / "eval", ckpt=ckpt, stat=stat)


def run_infer(world: dict, out: Path, *extra: str, eval_dir: Path | None = None) -> dict:
    return infer.main(["--model-dir", str(world["ckpt"]), "--eval-dir", str(eval_dir or world["eval"]),
                       "--result-dir", str(out), "--num-workers", "0", "--batch-size", "16", *extra])


def copy_eval(world: dict, dest: Path) -> Path:
    shutil.copytree(world["eval"], dest)
    return dest


def history_raw_ids(eval_dir: Path, item_raw_id: np.ndarray) -> dict[str, set[int]]:
    """Independently of dataset.py: each user's history as raw creative ids."""
    out, itemnum = {}, len(item_raw_id) - 1
    for line in (eval_dir / "predict_seq.jsonl").read_text().splitlines():
        recs = json.loads(line)
        out[str(recs[0][0])] = {int(item_raw_id[r[1]]) if r[1] <= itemnum else r[1] for r in recs if r[1] is not None}
    return out


def test_result_files_order_contents_and_filtering(world, tmp_path):
    info = run_infer(world, tmp_path / "res", "--topk", "7")
    res = json.loads((tmp_path / "res" / "result.json").read_text())
    lines = (world["eval"] / "predict_seq.jsonl").read_text().splitlines()
    assert set(res) == {"top10s", "user"} and info["users"] == len(lines)
    assert res["user"] == [str(json.loads(l)[0][0]) for l in lines]  # predict_seq order, raw ids
    cands = {json.loads(l)["creative_id"] for l in (world["eval"] / "predict_set.jsonl").read_text().splitlines()}
    assert all(len(row) == 7 == len(set(row)) and set(row) <= cands for row in res["top10s"])
    hist = history_raw_ids(world["eval"], np.load(world["ckpt"] / "item_raw_id.npy"))
    assert not any(set(row) & hist[u] for u, row in zip(res["user"], res["top10s"]))
    with open(tmp_path / "res" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7 * len(lines)
    for j, u in enumerate(res["user"]):  # the table is the same ranking, scores descending
        mine = rows[7 * j: 7 * j + 7]
        assert [r["user"] for r in mine] == [u] * 7 and [int(r["rank"]) for r in mine] == list(range(1, 8))
        assert [int(r["creative_id"]) for r in mine] == res["top10s"][j]
        scores = [float(r["score"]) for r in mine]
        assert scores == sorted(scores, reverse=True)

    # without filtering, history items do come back: the filter above was doing something
    run_infer(world, tmp_path / "keep", "--topk", "7", "--keep-history")
    keep = json.loads((tmp_path / "keep" / "result.json").read_text())
    assert any(set(row) & hist[u] for u, row in zip(keep["user"], keep["top10s"]))


def test_rows_match_a_direct_computation(world, tmp_path):
    """Every user recomputed by hand: the full score vector over the predict_set candidates (their vectors
    built here from the file), the history masked by raw id, one topk."""
    run_infer(world, tmp_path / "res", "--topk", "5", "--item-chunk", "33")
    res = json.loads((tmp_path / "res" / "result.json").read_text())
    model, spec, item_feat, item_raw_id, trained = infer.load_model(world["ckpt"], torch.device("cpu"))
    ev = world["eval"]
    actions = json.loads((ev / "user_action_type.json").read_text())
    reader = SeqReader(ev / "predict_seq.jsonl", ev / "predict_seq_offsets.pkl")
    ds = EvalDataset(reader, np.arange(len(reader)), item_feat, item_raw_id, spec, TINY.maxlen, target_action=actions,
                     trained=trained)
    cset = [json.loads(l) for l in (ev / "predict_set.jsonl").read_text().splitlines()]
    counts = np.load(world["ckpt"] / "item_count.npy")
    raw_to_reid = {int(r): j for j, r in enumerate(item_raw_id) if j > 0 and counts[j] > 0}  # trained items only
    ids = np.array([raw_to_reid.get(c["creative_id"], 0) for c in cset])
    feats = np.stack([item_feat[i] if i else spec.item_features(c["features"]) for i, c in zip(ids, cset)])
    assert (ids == 0).sum() > len(cset) // 20  # new items and items never in the training data are cold
    hist = history_raw_ids(ev, item_raw_id)
    with torch.no_grad():
        cand = model.item_vectors(torch.from_numpy(ids), torch.from_numpy(feats.astype(np.int64)))  # (M, D)
        users = model.user_vectors(collate([ds[j] for j in range(len(ds))]))  # (U, D)
    scores = users @ cand.T  # (U, M)
    assert res["user"] == [str(json.loads(l)[0][0]) for l in (ev / "predict_seq.jsonl").read_text().splitlines()]
    for j, u in enumerate(res["user"]):
        s = scores[j].clone()
        s[[c["creative_id"] in hist[u] for c in cset]] = float("-inf")
        top = s.topk(5)
        assert res["top10s"][j] == [cset[p]["creative_id"] for p in top.indices.tolist()], u
        assert top.values[4] > s.topk(6).values[5] + 1e-6, u  # no tie at the cut: the list is the only answer


def test_cold_candidates_and_cold_history_map_to_padding(world):
    model, spec, item_feat, item_raw_id, trained = infer.load_model(world["ckpt"], torch.device("cpu"))
    folder = world["root"] / "cold"
    folder.mkdir()
    known = int(np.flatnonzero(trained[1:])[2] + 1)  # a training item
    unseen = int(np.flatnonzero(~trained[1:])[0] + 1)  # in the indexer, never in the training data
    lines = [{"creative_id": int(item_raw_id[known]), "retrieval_id": 1, "features": {"100": "999999"}},
             {"creative_id": 91_000_000_001, "retrieval_id": 2, "features": {"100": "cold", "101": 2, "102": [1]}},
             {"creative_id": 91_000_000_002, "retrieval_id": 3, "features": {"101": 10**9}},
             {"creative_id": int(item_raw_id[unseen]), "retrieval_id": 4, "features": {"101": 3}}]
    (folder / "predict_set.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    cids, vecs = infer.load_candidates(model, folder, spec, item_feat, item_raw_id, trained, torch.device("cpu"), 2)
    fi = spec.item_fids
    cold1, cold3 = np.zeros((1, len(fi)), np.int64), np.zeros((1, len(fi)), np.int64)
    cold1[0, fi.index("101")] = 2  # the string and the list are padding, the known value stays
    cold3[0, fi.index("101")] = 3  # the unseen item: its predict_set features, not its (padding) training row

    def enc(i: int, f: np.ndarray) -> torch.Tensor:
        return infer.encode_items(model, np.array([i]), f, torch.device("cpu"))

    expect = torch.cat([enc(known, np.asarray(item_feat[[known]], np.int64)), enc(0, cold1),
                        enc(0, np.zeros((1, len(fi)), np.int64)), enc(0, cold3)])
    assert cids.tolist() == [l["creative_id"] for l in lines] and torch.allclose(vecs, expect, atol=1e-6)


def test_integer_user_ids_give_the_same_results_under_raw_ids(world, tmp_path, capsys):
    """The same sample with predict_seq naming users by re-id (indexer['u'] covers them): identical result.json,
    whether the indexer comes from --indexer or from the eval folder; an indexer without them is an error."""
    run_infer(world, tmp_path / "raw")
    generate(str(tmp_path / "re"), users=300, items=400, seed=5, progress=False, eval_user_ids="reid")
    ev = tmp_path / "re" / "eval"
    first = json.loads((ev / "predict_seq.jsonl").read_text().splitlines()[0])[0][0]
    assert isinstance(first, int) and first > 300
    run_infer(world, tmp_path / "by_option", "--indexer", str(tmp_path / "re" / "data" / "indexer.pkl"), eval_dir=ev)
    expect = (tmp_path / "raw" / "result.json").read_text()
    assert (tmp_path / "by_option" / "result.json").read_text() == expect
    with pytest.raises(SystemExit):  # the checkpoint's own training indexer has no test users
        run_infer(world, tmp_path / "bad", eval_dir=ev)
    assert f"predict_seq.jsonl:1: user re-id {first} is not in" in capsys.readouterr().err
    shutil.copy(tmp_path / "re" / "data" / "indexer.pkl", ev / "indexer.pkl")
    info = run_infer(world, tmp_path / "by_folder", eval_dir=ev)
    assert (tmp_path / "by_folder" / "result.json").read_text() == expect and info["missing_action"] == 0
    rep = evaluate.main(["--result", str(tmp_path / "by_folder" / "result.json"), "--ground-truth",
                         str(ev / "ground_truth.json"), "--baseline", "popularity", "--model-dir", str(world["ckpt"])])
    assert rep["model"]["missing"] == 0 and rep["popularity"]["missing"] == 0


def test_missing_action_type_gets_click_and_one_warning(world, tmp_path, capsys):
    ev = copy_eval(world, tmp_path / "eval")
    actions = json.loads((ev / "user_action_type.json").read_text())
    first = json.loads((ev / "predict_seq.jsonl").read_text().splitlines()[0])[0][0]
    del actions[first]
    (ev / "user_action_type.json").write_text(json.dumps(actions))
    capsys.readouterr()
    info = run_infer(world, tmp_path / "a", "--topk", "10", eval_dir=ev)
    err = capsys.readouterr().err
    warn = [l for l in err.splitlines() if "user_action_type" in l]
    assert info["missing_action"] == 1 and len(warn) == 1 and f"1 of {info['users']} users" in warn[0]
    a = json.loads((tmp_path / "a" / "result.json").read_text())
    (ev / "user_action_type.json").write_text(json.dumps({**actions, first: 1}))  # explicitly a click
    run_infer(world, tmp_path / "b", "--topk", "10", eval_dir=ev)
    b = json.loads((tmp_path / "b" / "result.json").read_text())
    (ev / "user_action_type.json").write_text(json.dumps({**actions, first: 2}))
    run_infer(world, tmp_path / "c", "--topk", "10", eval_dir=ev)
    assert a == b
    scores = [[r["score"] for r in csv.DictReader(open(tmp_path / x / "results.csv")) if r["user"] == first]
              for x in "abc"]
    assert scores[0] == scores[1] != scores[2]  # the condition reaches the model


@pytest.mark.parametrize("bad, what", [('{"creative_id": 5, "features": {', "invalid JSON"),
                                       ('{"creative_id": "5", "features": {}}', "creative_id must be a positive int"),
                                       ('[5]', "expected {")])
def test_bad_predict_set_line_is_a_one_line_error(world, tmp_path, capsys, bad, what):
    ev = copy_eval(world, tmp_path / "eval")
    lines = (ev / "predict_set.jsonl").read_text().splitlines()
    lines[2] = bad
    (ev / "predict_set.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as e:
        run_infer(world, tmp_path / "res", eval_dir=ev)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith(f"error: {ev / 'predict_set.jsonl'}:3: ") and what in err[-1]
    assert not (tmp_path / "res" / "result.json").exists()


def test_bad_predict_seq_line_in_a_worker_is_one_line(world, tmp_path, capsys):
    ev = copy_eval(world, tmp_path / "eval")
    lines = (ev / "predict_seq.jsonl").read_text().splitlines()
    lines[1] = '[["u", 3, null, {}, 7, 1]]'  # action 7
    text = "".join(l + "\n" for l in lines)
    (ev / "predict_seq.jsonl").write_text(text)
    offsets = np.cumsum([0] + [len(l) + 1 for l in lines[:-1]]).tolist()
    (ev / "predict_seq_offsets.pkl").write_bytes(pickle.dumps(offsets))
    with pytest.raises(SystemExit):
        infer.main(["--model-dir", str(world["ckpt"]), "--eval-dir", str(ev), "--result-dir", str(tmp_path / "r"),
                    "--num-workers", "1"])
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error")]
    assert len(err) == 1 and "predict_seq.jsonl:2: record 0: action_type must be 0, 1 or 2" in err[0]


def test_without_predict_set_every_training_item_is_a_candidate(world, tmp_path):
    ev = copy_eval(world, tmp_path / "eval")
    (ev / "predict_set.jsonl").unlink()
    run_infer(world, tmp_path / "res", "--topk", "3", eval_dir=ev)
    res = json.loads((tmp_path / "res" / "result.json").read_text())
    raw = set(np.load(world["ckpt"] / "item_raw_id.npy")[1:].tolist())
    assert all(len(r) == 3 and set(r) <= raw for r in res["top10s"])


# --------------------------------------------------------------------------- end to end

def test_end_to_end_infer_then_evaluate(world, tmp_path):
    out = tmp_path / "res"
    run_infer(world, out)
    rep = evaluate.main(["--result", str(out / "result.json"), "--ground-truth", str(world["eval"] / "ground_truth.json"),
                         "--k", "10", "5", "--baseline", "popularity", "--model-dir", str(world["ckpt"])])
    saved = json.loads((out / "metrics.json").read_text())
    gt = json.loads((world["eval"] / "ground_truth.json").read_text())
    for name in ("model", "popularity"):
        assert set(saved[name]) >= {"all", "weighted", "click", "conversion", "missing"}
        assert saved[name]["all"]["users"] == len(gt) and saved[name]["missing"] == 0
        m = saved[name]["all"]
        assert 0 <= m["NDCG@5"] <= m["NDCG@10"] <= m["HR@10"] <= 1 and m["HR@5"] <= m["HR@10"]
        assert m["Score"] == pytest.approx(0.31 * m["HR@10"] + 0.69 * m["NDCG@10"])
    assert rep["model"]["all"] == saved["model"]["all"]


def test_infer_sh(world, tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "EVAL_DATA_PATH": str(world["eval"]),
           "EVAL_RESULT_PATH": str(tmp_path / "res")}
    usage = subprocess.run(["bash", str(ROOT / "infer.sh")], capture_output=True, text=True, env=env)
    assert usage.returncode == 2 and "usage:" in usage.stderr
    run = subprocess.run(["bash", str(ROOT / "infer.sh"), str(world["ckpt"]), "5"], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "res" / "result.json").exists() and (tmp_path / "res" / "results.csv").exists()
    metrics = json.loads((tmp_path / "res" / "metrics.json").read_text())
    assert "HR@5" in metrics["model"]["all"] and "popularity" in metrics
    assert all(len(r) == 5 for r in json.loads((tmp_path / "res" / "result.json").read_text())["top10s"])


def test_checkpoint_from_another_model_version_is_a_one_line_error(world, tmp_path, capsys):
    ck = tmp_path / "ck"
    shutil.copytree(world["ckpt"], ck)
    state = torch.load(ck / "model.pt", weights_only=True)
    state["model"]["extra.weight"] = torch.zeros(1)
    torch.save(state, ck / "model.pt")
    with pytest.raises(SystemExit):
        infer.main(["--model-dir", str(ck), "--eval-dir", str(world["eval"]), "--result-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.pt: weights do not match this model.py" in err[0] and "extra.weight" in err[0]
