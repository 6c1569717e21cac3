"""Multimodal item embeddings: creative_emb conversion (both layouts), coverage and cold items, input errors,
reuse of up-to-date tables, the path into the item tower, and sample data -> get_stat -> train -> infer."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import get_stat
import mm_emb
import train
from common import DataError, load_stat
from conftest import ROOT
from dataset import EvalDataset, FeatureSpec, SeqReader
from make_sample_data import generate
from model import ItemTower, ModelConfig

DIM = 8
RAW = 20_000_000_000 + np.arange(0, 30, 3)  # raw creative ids of items 1..10
ITEM_RAW_ID = np.concatenate([[0], RAW]).astype(np.int64)  # (itemnum+1,) as get_stat.py writes it
COLD = [19_999_999_999, 30_000_000_000]  # creative ids the indexer does not know
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add overhead


def vectors(seed: int = 0) -> dict[int, list[float]]:
    """Items 1, 2, 4, 5, 7, 9 and the two cold ids have vectors; 3, 6, 8, 10 do not."""
    rng = np.random.default_rng(seed)
    ids = [int(RAW[i - 1]) for i in (1, 2, 4, 5, 7, 9)] + COLD
    return {c: np.round(rng.standard_normal(DIM), 5).tolist() for c in ids}


def write_pkl(folder: Path, vecs: dict, fid: int = 81, as_numpy: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    obj = {c: np.asarray(v, np.float32) if as_numpy else v for c, v in vecs.items()}
    path = folder / f"emb_{fid}_{DIM}.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=4))
    return path


def write_parts(folder: Path, vecs: dict, fid: int = 81, lines: list[str] | None = None) -> Path:
    """The same vectors as JSON lines over two part files (no .json ending), plus marker files to skip."""
    sub = folder / f"emb_{fid}_{DIM}"
    sub.mkdir(parents=True, exist_ok=True)
    rows = lines if lines is not None else [json.dumps({"anonymous_cid": c, "emb": v}) for c, v in vecs.items()]
    half = len(rows) // 2
    (sub / "part-00000").write_text("".join(r + "\n" for r in rows[:half]))
    (sub / "part-00001").write_text("".join(r + "\n" for r in rows[half:]))
    (sub / "_SUCCESS").write_text("")
    (sub / ".part-00000.crc").write_text("garbage")
    return sub


def read_table(cache: Path, fid: int = 81) -> tuple[np.ndarray, np.ndarray]:
    table = np.array(mm_emb.open_tables(cache, [fid])[0])
    return table, np.load(cache / f"emb_mask_{fid}_{DIM}.npy")


# --------------------------------------------------------------------------- conversion

def test_both_layouts_convert_to_the_same_table(tmp_path, capsys):
    vecs = vectors()
    write_pkl(tmp_path / "a", vecs)
    write_parts(tmp_path / "b", vecs)
    write_pkl(tmp_path / "c", vecs, as_numpy=True)  # how the real emb_81_32.pkl stores them
    for src in "abc":
        meta = mm_emb.ensure_table(tmp_path / src, tmp_path / f"cache_{src}", 81, ITEM_RAW_ID, progress=False)
        assert meta["shape"] == [11, DIM] and meta["present"] == 6 and meta["cold_ids"] == 2
    assert "6/10 items have a vector (60.0%); 2 creative ids not in the indexer" in capsys.readouterr().err
    table, mask = read_table(tmp_path / "cache_a")
    for src in "bc":
        t2, m2 = read_table(tmp_path / f"cache_{src}")
        assert np.array_equal(table, t2) and np.array_equal(mask, m2)
    assert table.dtype == np.float32 and table.shape == (11, DIM)
    assert mask.tolist() == [False, True, True, False, True, True, False, True, False, True, False]
    assert not table[~mask].any()  # row 0 and items without a vector are zero
    for re_id in np.flatnonzero(mask):
        assert np.array_equal(table[re_id], np.float32(vecs[int(RAW[re_id - 1])]))
    # cold items: their own vectors by raw id; an id nobody has gets zero and found=False
    cold, found = mm_emb.cold_vectors(tmp_path / "cache_b", 81, DIM, np.array([COLD[1], 5, COLD[0]]))
    assert found.tolist() == [True, False, True]
    assert np.array_equal(cold[0], np.float32(vecs[COLD[1]])) and not cold[1].any()


def test_code_carrying_pickle_is_refused_even_with_arrays_allowed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    (tmp_path / "e").mkdir()
    (tmp_path / "e" / f"emb_81_{DIM}.pkl").write_bytes(pickle.dumps({1: Evil()}))
    with pytest.raises(DataError, match="refusing to load"):
        mm_emb.ensure_table(tmp_path / "e", tmp_path / "cache", 81, ITEM_RAW_ID, progress=False)
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("layout", ["json", "pkl"])
def test_wrong_vector_length_is_one_line_error(tmp_path, layout):
    vecs = vectors()
    bad_cid = int(RAW[3])
    vecs[bad_cid] = vecs[bad_cid][:DIM - 1]
    if layout == "pkl":
        path = write_pkl(tmp_path / "src", vecs)
        where = f"{path}: creative id {bad_cid}: vector of length {DIM - 1}, expected {DIM}"
    else:
        sub = write_parts(tmp_path / "src", vecs)
        # vectors in insertion order, 4 in part-00000: the bad one (4th) is its line 3
        where = f"{sub / 'part-00000'}:3: creative id {bad_cid}: vector of length {DIM - 1}, expected {DIM}"
    with pytest.raises(DataError) as e:
        mm_emb.ensure_table(tmp_path / "src", tmp_path / "cache", 81, ITEM_RAW_ID, progress=False)
    assert str(e.value).startswith(where) and "\n" not in str(e.value)
    assert not list((tmp_path / "cache").glob("*.mmap")) and not list((tmp_path / "cache").glob(".*.tmp"))  # nothing left


@pytest.mark.parametrize("line, what", [
    ('{"anonymous_cid": 5, "emb": [1, 2', "invalid JSON"),
    ('{"anonymous_cid": "x", "emb": [1, 2, 3, 4, 5, 6, 7, 8]}', "anonymous_cid must be a positive int"),
    ('{"anonymous_cid": 5, "emb": [1, 2, 3, 4, 5, 6, 7, NaN]}', "non-finite"),
    ('{"anonymous_cid": 5, "emb": [1, 2, 3, 4, 5, 6, 7, "a"]}', "must hold 8 numbers"),
])
def test_bad_json_lines_name_file_and_line(tmp_path, line, what):
    good = [json.dumps({"anonymous_cid": c, "emb": v}) for c, v in vectors().items()]
    sub = write_parts(tmp_path / "src", {}, lines=good[:3] + [line] + good[3:])  # line 4 of part-00000
    with pytest.raises(DataError, match=rf"^{sub / 'part-00000'}:4: .*{what}"):
        mm_emb.ensure_table(tmp_path / "src", tmp_path / "cache", 81, ITEM_RAW_ID, progress=False)


def test_missing_source_is_clear(tmp_path):
    write_pkl(tmp_path / "src", vectors())
    with pytest.raises(DataError, match=r"no emb_82_\{dim\}\.pkl or emb_82_\{dim\}/ .*present: emb_81_8\.pkl"):
        mm_emb.ensure_table(tmp_path / "src", tmp_path / "cache", 82, ITEM_RAW_ID, progress=False)


def test_table_is_reused_when_up_to_date_and_rebuilt_otherwise(tmp_path, monkeypatch):
    vecs = vectors()
    sub = write_parts(tmp_path / "src", vecs)
    cache = tmp_path / "cache"
    mm_emb.ensure_table(tmp_path / "src", cache, 81, ITEM_RAW_ID, progress=False)
    built = []
    real = mm_emb.convert
    monkeypatch.setattr(mm_emb, "convert", lambda *a, **k: built.append(1) or real(*a, **k))
    mm_emb.ensure_table(tmp_path / "src", cache, 81, ITEM_RAW_ID, progress=False)
    assert built == []  # up to date: nothing converted
    # a changed source file (one more vector, for item 3) -> rebuilt, with it
    new = np.arange(DIM, dtype=np.float32).tolist()
    with open(sub / "part-00001", "a") as f:
        f.write(json.dumps({"anonymous_cid": int(RAW[2]), "emb": new}) + "\n")
    meta = mm_emb.ensure_table(tmp_path / "src", cache, 81, ITEM_RAW_ID, progress=False)
    table, mask = read_table(cache)
    assert built == [1] and meta["present"] == 7 and mask[3] and table[3].tolist() == new
    # another indexer (re-id map) -> rebuilt; a damaged table file -> rebuilt
    mm_emb.ensure_table(tmp_path / "src", cache, 81, ITEM_RAW_ID[::-1].copy(), progress=False)
    assert built == [1, 1]
    with open(cache / f"emb_table_81_{DIM}.mmap", "r+b") as f:
        f.truncate(10)
    mm_emb.ensure_table(tmp_path / "src", cache, 81, ITEM_RAW_ID[::-1].copy(), progress=False)
    assert built == [1, 1, 1]


def test_concurrent_callers_convert_once(tmp_path, monkeypatch):
    # e.g. the ranks of a torchrun job: one converts, the others wait on the lock and reuse its table
    write_parts(tmp_path / "src", vectors())
    built = []
    real = mm_emb.convert
    monkeypatch.setattr(mm_emb, "convert", lambda *a, **k: built.append(1) or real(*a, **k))
    threads = [threading.Thread(target=mm_emb.ensure_table, args=(tmp_path / "src", tmp_path / "cache", 81, ITEM_RAW_ID),
                                kwargs={"progress": False}) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert built == [1] and read_table(tmp_path / "cache")[1].sum() == 6


# --------------------------------------------------------------------------- into the model

def test_tables_reach_the_item_tower_and_missing_rows_contribute_zero(tmp_path):
    write_parts(tmp_path / "src", vectors())
    cache = tmp_path / "cache"
    fids, dims = mm_emb.ensure_tables(tmp_path / "src", cache, [81], ITEM_RAW_ID, progress=False)
    mm = mm_emb.MMFeatures(cache, fids, dims)
    mm = pickle.loads(pickle.dumps(mm))  # as a DataLoader worker gets it: no arrays inside
    assert mm._tables is None and mm.dim == DIM
    torch.manual_seed(0)
    cfg = ModelConfig(id_dim=4, feat_dim=4, hidden=8, num_layers=1, num_heads=2, emb_dropout=0.0, mm_dims=dims,
                      mm_fids=fids)
    tower = ItemTower(cfg, {"item_sparse": {"100": 5}}, itemnum=10).eval()
    ids = torch.arange(0, 11)
    feats = torch.ones(11, 1, dtype=torch.long)

    def encode() -> torch.Tensor:
        with torch.no_grad():
            return tower(ids, feats, torch.from_numpy(mm.rows(ids.numpy())))  # (11, D)

    before = encode()
    with torch.no_grad():  # the tower's LayerNorm bias: moves every item with a vector, none without
        tower.mm_proj[0][1].bias.add_(1.0)
    moved = (encode() - before).abs().amax(-1) > 1e-6
    assert moved.tolist() == mm_emb.open_tables(cache, fids)[0].any(-1).tolist()  # items 1, 2, 4, 5, 7, 9
    # a changed row changes that item's vector only
    before = encode()
    rows = np.memmap(cache / f"emb_table_81_{DIM}.mmap", dtype=np.float32, mode="r+", shape=(11, DIM))
    rows[4] += 1.0
    rows.flush()
    mm._pid = None  # reopen, as a fresh process would
    changed = (encode() - before).abs().amax(-1) > 1e-6
    assert changed.tolist() == [i == 4 for i in range(11)]


# --------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mm_sample")
    generate(str(root), users=300, items=200, seed=3, progress=False, mm_emb_ids=(81, 82))
    get_stat.run(root / "data", root / "cache")
    return root


def test_sample_data_writes_both_layouts_without_changing_the_rest(sample, tmp_path):
    emb = sample / "data" / "creative_emb"
    assert (emb / "emb_81_32.pkl").is_file()
    parts = sorted(p.name for p in (emb / "emb_82_1024").iterdir())
    assert len(parts) > 1 and all(p.startswith("part-") and not p.endswith(".json") for p in parts)
    generate(str(tmp_path), users=300, items=200, seed=3, progress=False)  # same seed, no vectors
    assert not (tmp_path / "data" / "creative_emb").exists()
    for sub in ("data", "eval"):
        for p in (tmp_path / sub).iterdir():
            assert p.read_bytes() == (sample / sub / p.name).read_bytes(), p.name
    raw = np.load(sample / "cache" / "item_raw_id.npy")
    meta = mm_emb.ensure_table(emb, sample / "cache", 82, raw, progress=False)
    assert 0.75 < meta["present"] / 200 < 0.95 and meta["cold_ids"] > 0  # eval-only items have vectors too


def test_train_and_infer_with_multimodal_inputs(sample):
    out = sample / "run"
    argv = ["--data-dir", str(sample / "data"), "--cache-dir", str(sample / "cache"), "--ckpt-dir", str(out / "ck"),
            "--log-dir", str(out / "logs"), "--tf-dir", str(out / "tf"), "--preset", "small", "--hidden", "16",
            "--num-layers", "1", "--num-heads", "2", "--maxlen", "12", "--batch-size", "8", "--val-users", "30",
            "--num-workers", "0", "--device", "cpu", "--max-steps", "3", "--mm-emb-id", "81"]
    train.main(argv)
    ck = torch.load(out / "ck" / "global_step3" / "model.pt", weights_only=True)
    assert tuple(ck["model_config"]["mm_fids"]) == ("81",) and tuple(ck["model_config"]["mm_dims"]) == (32,)
    assert ck["model"]["item_tower.mm_proj.0.0.weight"].shape == (16, 32)  # Linear(32 -> feat_dim 16)
    # inference: the fids come from the checkpoint, the vectors from the eval folder or the training data
    r = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--model-dir", str(out / "ck" / "global_step3"),
                        "--eval-dir", str(sample / "eval"), "--result-dir", str(out / "res"),
                        "--cache-dir", str(sample / "cache"), "--num-workers", "0", "--device", "cpu"],
                       capture_output=True, text=True, env={**os.environ, "TRAIN_DATA_PATH": str(sample / "data"),
                                                            "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "res" / "result.json").read_text())
    assert len(res["user"]) == len(res["top10s"]) == 30 and all(len(t) == 10 for t in res["top10s"])


def test_cold_candidates_take_their_own_vectors_at_inference(sample):
    """load_candidates with multimodal inputs: changing one creative_emb vector (a cold candidate's, then a
    training item's) changes that candidate's vector and no other."""
    import infer
    from model import HSTUModel
    cache = sample / "cache"
    raw = np.load(cache / "item_raw_id.npy")
    fids, dims = mm_emb.ensure_tables(sample / "data" / "creative_emb", cache, [81], raw, progress=False)
    mm = mm_emb.MMFeatures(cache, fids, dims)
    stat = load_stat(cache)
    torch.manual_seed(0)
    cfg = ModelConfig(id_dim=4, feat_dim=4, hidden=8, num_layers=1, num_heads=2, maxlen=10, emb_dropout=0.0,
                      dropout=0.0, mm_dims=dims, mm_fids=fids)
    model = HSTUModel(cfg, stat["schema"], stat["itemnum"]).eval()
    spec, item_feat = FeatureSpec.from_stat(stat), np.load(cache / "item_feat.npy")
    trained = np.load(cache / "item_count.npy") > 0

    def candidates() -> tuple[np.ndarray, torch.Tensor]:
        mm._pid = None  # reopen the tables, as a fresh process would
        return infer.load_candidates(model, sample / "eval", spec, item_feat, raw, trained, torch.device("cpu"), 64, mm)

    cids, before = candidates()
    index = np.load(cache / "emb_cold_81_32.npy")  # (U, 2) raw id, row of the cold table
    cold = next(j for j, c in enumerate(cids) if c not in set(raw.tolist()) and c in set(index[:, 0].tolist()))
    row = int(index[index[:, 0] == cids[cold], 1][0])
    table = np.memmap(cache / "emb_cold_81_32.mmap", dtype=np.float32, mode="r+").reshape(-1, 32)
    table[row] += 1.0
    table.flush()
    _, after = candidates()
    changed = ((after - before).abs().amax(1) > 1e-6).nonzero().flatten().tolist()
    assert changed == [cold]
    warm = next(j for j, c in enumerate(cids) if c in set(raw.tolist()) and trained[raw.tolist().index(c)]
                and mm_emb.open_tables(cache, fids)[0][raw.tolist().index(c)].any())
    main = np.memmap(cache / "emb_table_81_32.mmap", dtype=np.float32, mode="r+").reshape(-1, 32)
    main[raw.tolist().index(cids[warm])] += 1.0
    main.flush()
    _, again = candidates()
    assert ((again - after).abs().amax(1) > 1e-6).nonzero().flatten().tolist() == [warm]


def test_eval_rows_align_with_a_history_longer_than_maxlen(sample):
    """WithMM over EvalDataset with maxlen 3: the rows of the last 3 history items, computed here from the
    predict_seq line itself (json), the re-id table and the cold table, without dataset.py's alignment."""
    cache = sample / "cache"
    raw = np.load(cache / "item_raw_id.npy")
    fids, dims = mm_emb.ensure_tables(sample / "data" / "creative_emb", cache, [81], raw, progress=False)
    mm = mm_emb.MMFeatures(cache, fids, dims)
    path = sample / "eval" / "predict_seq.jsonl"
    reader = SeqReader(path, sample / "eval" / "predict_seq_offsets.pkl")
    spec = FeatureSpec.from_stat(load_stat(cache))
    ds = mm_emb.WithMM(EvalDataset(reader, np.arange(len(reader)), np.load(cache / "item_feat.npy"), raw, spec,
                                   maxlen=3), mm)
    table = np.fromfile(cache / "emb_table_81_32.mmap", dtype=np.float32).reshape(-1, 32)
    index = np.load(cache / "emb_cold_81_32.npy")
    cold_rows = np.fromfile(cache / "emb_cold_81_32.mmap", dtype=np.float32).reshape(-1, 32)
    long_users = cold_seen = 0
    for k, line in enumerate(path.read_text().splitlines()):
        items = [r[1] for r in json.loads(line) if r[1] is not None]
        long_users += len(items) > 3
        expect = np.zeros((4, 32), np.float32)  # N = 4: padding, then the user token, then items
        for p, item in zip(range(4 - len(items[-3:]), 4), items[-3:]):
            if item < len(raw):
                expect[p] = table[item]
            elif item in index[:, 0]:
                expect[p] = cold_rows[index[index[:, 0] == item, 1][0]]
                cold_seen += 1
        assert np.array_equal(ds[k]["seq_mm"], expect), k
    assert long_users > 10 and cold_seen > 0
