"""Training loop: schedule, exact resume, checkpoints, learning beyond popularity on sample data."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import get_stat
import train
from common import DataError
from dataset import collate
from model import HSTUModel
from conftest import ROOT
from make_sample_data import generate


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    generate(str(root), users=400, items=300, seed=5, progress=False)
    get_stat.run(root / "data", root / "cache")
    return root


def args(root: Path, run: str, *extra: str) -> list[str]:
    out = root / run
    return ["--data-dir", str(root / "data"), "--cache-dir", str(root / "cache"), "--ckpt-dir", str(out / "ck"),
            "--log-dir", str(out / "logs"), "--tf-dir", str(out / "tf"), "--preset", "small", "--hidden", "32",
            "--num-layers", "1", "--num-heads", "2", "--maxlen", "20", "--batch-size", "16", "--val-users", "50",
            "--num-workers", "0", "--log-every", "1", "--device", "cpu", *extra]


def test_lr_schedule_warmup_cosine_floor():
    cfg, _ = train.parse_config(["--max-steps", "100", "--warmup-steps", "10", "--lr", "1e-3", "--preset", "small"])
    cfg, _ = train.resolve(cfg, torch.device("cpu"))
    lrs = [train.lr_at(s, cfg) for s in range(130)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:100], lrs[10:101]))  # decays monotonically
    assert lrs[55] == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half-way through the cosine
    assert lrs[100] == pytest.approx(1e-4) and lrs[129] == pytest.approx(1e-4)  # held at the floor


def _final_state(ckpt_dir: Path, step: int) -> dict:
    return checkpoint.load_checkpoint(ckpt_dir / f"global_step{step}" / "ckpt.pt")


def _loss_lines(run_dir: Path) -> list[str]:
    """The training log's per-step lines ("... step N loss X lr ...")."""
    return [l for l in (run_dir / "logs" / "train.log").read_text().splitlines() if " loss " in l]


def test_resume_equals_uninterrupted(sample):
    # 8 steps straight, against 4 steps, stop, resume, 4 more; the curriculum reaches hard negatives
    extra = ["--max-steps", "8", "--eval-every", "4", "--curriculum", "20000:64:0.5,130000:8:0.25"]
    straight = train.main(args(sample, "a", *extra))
    train.main(args(sample, "b", *extra, "--stop-at", "4"))
    first = _final_state(sample / "b" / "ck", 4)
    assert first["step"] == 4 and first["optimizer"]["state"]
    resumed = train.main(["--resume", str(sample / "b" / "ck" / "global_step4" / "ckpt.pt"),
                          "--ckpt-dir", str(sample / "b" / "ck"), "--log-dir", str(sample / "b" / "logs"),
                          "--tf-dir", str(sample / "b" / "tf")])
    assert straight["step"] == resumed["step"] == 8
    a, b = _final_state(sample / "a" / "ck", 8), _final_state(sample / "b" / "ck", 8)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["best"]["metrics"] == b["best"]["metrics"]
    log_a = [l.split(" ", 2)[2] for l in _loss_lines(sample / "a")]
    log_b = [l.split(" ", 2)[2] for l in _loss_lines(sample / "b")]
    strip = lambda lines: [" ".join(l.split()[:4]) for l in lines]  # step N loss X (throughput differs)
    assert strip(log_a) == strip(log_b) and len(log_a) == 8
    assert first["train_config"]["window"] == "all"  # maxlen 20 on this data: 'auto' tiled, and says so
    # a checkpoint from before --window existed trained the last events: resuming it keeps to them
    old = sample / "b" / "old.pt"
    torch.save({**first, "train_config": {k: v for k, v in first["train_config"].items() if k != "window"}}, old)
    assert train.parse_config(["--resume", str(old)])[0].window == "last"


def test_checkpoint_contents_and_pruning_keep_the_best(sample, monkeypatch):
    real, scores = train.validate, iter([0.1, 0.5, 0.2, 0.3, 0.1, 0.4])  # at steps 1..6: the best is step 2
    monkeypatch.setattr(train, "validate", lambda *a, **k: {**real(*a, **k), "Score": next(scores)})
    train.main(args(sample, "c", "--max-steps", "6", "--eval-every", "1", "--keep-last", "2"))
    ck = sample / "c" / "ck"
    assert sorted(p.name for p in ck.iterdir()) == ["best.json", "global_step2", "global_step5", "global_step6"]
    assert json.loads((ck / "best.json").read_text())["dir"] == "global_step2"
    assert checkpoint.resolve_model_dir(ck) == ck / "global_step2"  # ./infer.sh checkpoints takes the best
    model = torch.load(ck / "global_step6" / "model.pt", weights_only=True)
    assert model["model_config"]["hidden"] == 32 and model["stat"]["itemnum"] == 300
    state = torch.load(ck / "global_step6" / "ckpt.pt", weights_only=True)
    assert "model" not in state and state["optimizer"]["state"]  # the weights are written once, in model.pt
    for name in ("item_feat.npy", "item_raw_id.npy", "item_count.npy", "config.json"):
        assert (ck / "global_step6" / name).exists()
    assert not list(ck.glob(".global_step*"))  # no temporary folders left


def test_auto_window_tiles_histories_a_sequence_holds_under_half_of(sample):
    """--window auto: 'all' exactly when the last maxlen events of each history hold under half of the events
    (counted here from the raw file), with a note; the run then trains one sequence per run of maxlen + 1."""
    lines = (sample / "data" / "seq.jsonl").read_text().splitlines()
    lengths = np.array([sum(r[1] is not None for r in json.loads(line)) for line in lines])  # events per user
    seq_len = json.loads((sample / "cache" / "stat.json").read_text())["seq_len"]
    for maxlen in range(1, lengths.max() + 2):
        kept = np.minimum(lengths, maxlen).sum() / lengths.sum()
        assert train.pick_window("auto", seq_len, maxlen) == ("all" if kept < 0.5 else "last"), maxlen
        assert train.pick_window("last", seq_len, maxlen) == "last"
        for window in ("all", "last"):
            hint = train.history_hint(seq_len, maxlen, window)
            assert (hint is None) == (kept >= 0.5), maxlen
            assert hint is None or f"are {kept:.0%} of the events" in hint
    assert train.pick_window("auto", None, 1) == "last"  # a cache without the histogram
    assert np.minimum(lengths, 20).sum() < lengths.sum() / 2
    train.main(args(sample, "hint", "--max-steps", "1"))  # maxlen 20
    log = (sample / "hint" / "logs" / "train.log").read_text()
    train_lines = train.split_users(len(lines), 50, 42)[0]
    sequences = np.maximum(-(-lengths[train_lines] // 21), 1).sum()
    assert f"window=all train_sequences={sequences} " in log and "note: the last 20 events of each history (--maxlen) are" in log


def test_window_all_refuses_a_cache_without_matching_line_lengths(sample, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(sample / "cache", cache)
    line_len = np.load(cache / "line_len.npy")

    def load(window: str):
        cfg, _ = train.parse_config([*args(sample, "nolen", "--window", window), "--cache-dir", str(cache)])
        return train.load_data(*train.resolve(cfg, torch.device("cpu")))

    np.save(cache / "line_len.npy", line_len[:-1])
    with pytest.raises(DataError, match=f"line_len.npy: {len(line_len) - 1} lines where seq.jsonl has {len(line_len)}"):
        load("all")
    (cache / "line_len.npy").unlink()  # a cache from before get_stat kept it
    with pytest.raises(DataError, match="line_len.npy: missing .* --window all needs it: run get_stat.py again"):
        load("all")
    run = load("last")  # needs no lengths
    assert len(run.train_ds) == len(run.train_ds.lines)


def test_a_new_run_never_mixes_with_an_earlier_runs_checkpoints(sample, capsys):
    run = args(sample, "twice", "--max-steps", "2")
    train.main(run)
    before = {p: p.stat().st_mtime_ns for p in (sample / "twice" / "ck").rglob("*")}
    with pytest.raises(SystemExit) as e:
        train.main(run)
    assert e.value.code == 2 and "already holds checkpoints of an earlier run" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in (sample / "twice" / "ck").rglob("*")} == before


def test_resaving_a_step_replaces_it_only_once_the_new_one_is_complete(sample, monkeypatch):
    train.main(args(sample, "resave", "--max-steps", "2", "--eval-every", "1"))
    ck = sample / "resave" / "ck"
    old = (ck / "global_step2" / "model.pt").read_bytes()

    def dies(*a, **k):
        raise KeyboardInterrupt  # killed while writing the new folder's contents
    monkeypatch.setattr(checkpoint.np, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(ck, 2, {}, {}, {}, sample / "cache", {}, np.zeros(3))
    assert (ck / "global_step2" / "model.pt").read_bytes() == old and not list(ck.glob(".global_step*"))
    monkeypatch.undo()
    # killed between renaming the old folder aside and the new one in: recover() brings the old one back
    (ck / "global_step2").rename(ck / ".global_step2.replaced")
    assert checkpoint.find_checkpoint("latest", str(ck)) == ck / ".global_step2.replaced" / "ckpt.pt"
    checkpoint.recover(ck)
    assert (ck / "global_step2" / "model.pt").read_bytes() == old
    checkpoint.save_checkpoint(ck, 2, {"step": 2}, {}, {}, sample / "cache", {}, np.zeros(3))
    assert (ck / "global_step2" / "model.pt").read_bytes() != old and not list(ck.glob(".global_step*"))


def _logged_losses(run_dir: Path) -> list[float]:
    return [float(l.split(" loss ")[1].split()[0]) for l in _loss_lines(run_dir)]


def test_amp_on_a_cpu_trains_in_bf16_close_to_fp32(sample):
    """--amp on reaches the CPU step (autocast, the full softmax's bf16 logits): from the same seed its losses
    track the fp32 run's to bf16 precision without being the fp32 run."""
    extra = ["--max-steps", "4", "--eval-every", "4", "--full-softmax", "on"]
    for run, amp in (("fp32", "off"), ("bf16", "on")):
        train.main(args(sample, run, *extra, "--amp", amp))
    fp32, bf16 = _logged_losses(sample / "fp32"), _logged_losses(sample / "bf16")
    assert len(fp32) == len(bf16) == 4
    assert np.allclose(bf16, fp32, rtol=2e-2) and bf16 != fp32, (fp32, bf16)


def test_learns_beyond_popularity(tmp_path):
    # interests over latent topics are learnable; popularity alone is not enough (DESIGN §5)
    generate(str(tmp_path), users=1500, items=600, seed=11, progress=False)
    get_stat.run(tmp_path / "data", tmp_path / "cache")
    out = train.main(args(tmp_path, "run", "--max-steps", "300", "--eval-every", "300", "--batch-size", "32", "--hidden", "64",
                          "--num-layers", "2", "--val-users", "250", "--maxlen", "30"))
    best, pop = out["best"]["metrics"], out["best"]["popularity"]
    assert best["Score"] > 1.3 * pop["Score"], (best, pop)  # seen: 0.064 against 0.025


def test_help_and_bad_resume_path(tmp_path):
    h = subprocess.run([sys.executable, str(ROOT / "main.py"), "--help"], capture_output=True, text=True)
    assert h.returncode == 0 and "--max-steps" in h.stdout and "--resume" in h.stdout
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", str(tmp_path / "none.pt")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "checkpoint not found" in r.stderr and "Traceback" not in r.stderr


KILL_DURING_SAVE = """
import os, signal, sys
import torch
sys.path.insert(0, {root!r})
import train
real_save = torch.save

def save(obj, path, *a, **k):  # die half-way through writing checkpoint {step}: model.pt done, ckpt.pt not
    real_save(obj, path, *a, **k)
    if "global_step{step}" in str(path) and str(path).endswith("model.pt"):
        os.kill(os.getpid(), signal.SIGKILL)

torch.save = save
train.main({argv!r})
"""


def test_sigkill_during_checkpoint_then_resume_latest(sample):
    extra = ["--max-steps", "8", "--eval-every", "2"]
    train.main(args(sample, "straight", *extra))
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE.format(root=str(ROOT), step=6,
                                                                           argv=args(sample, "k", *extra))],
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    ck = sample / "k" / "ck"
    assert list(ck.glob(".global_step6.*")) and not (ck / "global_step6").exists()  # the half-written one
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", "latest", "--ckpt-dir", str(ck),
                        "--log-dir", str(sample / "k" / "logs"), "--tf-dir", str(sample / "k" / "tf")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stderr + r.stdout and "global_step4" in r.stderr + r.stdout
    assert not list(ck.glob(".global_step*"))  # the partial folder was cleared
    a, b = _final_state(sample / "straight" / "ck", 8), _final_state(ck, 8)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["best"]["metrics"] == b["best"]["metrics"]


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_non_finite_loss(sample, monkeypatch, mode):
    real = train.train_loss
    poisoned = {3, 4}  # steps (0-based) whose loss is NaN

    def loss_with_nan(model, batch, log_q, cfg, step, *rest):
        loss = real(model, batch, log_q, cfg, step, *rest)
        return loss * float("nan") if step in poisoned else loss

    monkeypatch.setattr(train, "train_loss", loss_with_nan)
    run = args(sample, f"nan_{mode}", "--max-steps", "6", "--eval-every", "2", "--on-nonfinite", mode)
    if mode == "stop":
        with pytest.raises(train.NonFiniteError, match=r"step 4: non-finite .* last good checkpoint is .*global_step2"):
            train.train(*train.parse_config(run))  # main() would turn it into one line and exit code 2
        return
    out = train.main(run)
    assert out["step"] == 6 and out["best"]["nonfinite_skipped"] == 2
    state = _final_state(sample / f"nan_{mode}" / "ck", 6)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_code_executing_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    subprocess.run([sys.executable, "-c", f"""
import os, torch
class Evil:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
torch.save({{"train_config": Evil()}}, {str(evil)!r})
"""], check=True)
    for cmd in ([str(ROOT / "train.py"), "--resume", str(evil)],
                [str(ROOT / "infer.py"), "--model-dir", str(tmp_path), "--eval-dir", str(tmp_path)]):
        if cmd[0].endswith("infer.py"):
            evil.rename(tmp_path / "model.pt")
        r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True)
        assert r.returncode == 2 and "refused: rebuilding it would run code" in r.stderr, r.stderr[-1500:]
        assert "Traceback" not in r.stderr and not marker.exists()


def test_validation_and_popularity_equal_a_brute_force_ranking(sample):
    """validate (items streamed in chunks of 7) and the popularity baseline, at k = 50, against the full (users x items)
    score matrix of a tiny model, targets and histories read here from seq.jsonl with json."""
    cfg, _ = train.parse_config(args(sample, "bf", "--val-users", "40"))
    cfg, mcfg = train.resolve(cfg, torch.device("cpu"))
    run = train.load_data(cfg, mcfg)
    torch.manual_seed(1)
    model = HSTUModel(run.mcfg, run.stat["schema"], run.stat["itemnum"]).eval()
    torch.nn.init.normal_(model.item_tower.id_emb.weight)  # ids matter, as after training
    trained = run.item_count > 0
    loader = torch.utils.data.DataLoader(run.val_ds, batch_size=16, collate_fn=collate)
    got = train.validate(model, loader, run.item_feat, trained, torch.device("cpu"), False, item_chunk=7, k=50)
    pop = train.popularity_baseline(run.val_ds, run.item_count, k=50)

    lines = (sample / "data" / "seq.jsonl").read_text().splitlines()
    n = run.stat["itemnum"]
    ids = torch.arange(1, n + 1)
    with torch.no_grad():
        items = model.item_vectors(torch.where(torch.from_numpy(trained[1:]), ids, 0),
                                   torch.from_numpy(np.asarray(run.item_feat[1:], np.int64)))  # (n, D)
        users = model.user_vectors(collate([run.val_ds[j] for j in range(len(run.val_ds))]))  # (U, D)
    scores = users @ items.T  # (U, n): column c is item c + 1
    counts = run.item_count[1:].astype(np.float64)
    by_hand = np.zeros(n + 1, np.int64)  # events of the training users only: no validation event in log-q or the pool
    for line in run.train_ds.lines:
        np.add.at(by_hand, [r[1] for r in json.loads(lines[line]) if r[1] is not None], 1)
    assert run.item_count.tolist() == by_hand.tolist()
    hits, ndcg, phits, pndcg, validated = 0.0, 0.0, 0.0, 0.0, 0
    for j, line in enumerate(run.val_ds.lines):
        recs = [r for r in json.loads(lines[line]) if r[1] is not None]
        clicks = [k for k, r in enumerate(recs) if r[4] > 0]
        if not clicks:
            continue  # no click or conversion: not validated
        validated += 1
        target, seen = recs[clicks[-1]][1], {r[1] for r in recs[:clicks[-1]]}
        if target in seen:
            continue  # filtered out with the history: a miss for both
        s = scores[j].clone()
        s[[i - 1 for i in seen]] = float("-inf")
        rank = int((s > s[target - 1]).sum()) + 1
        pop_order = [i for i in (np.argsort(-counts, kind="stable") + 1).tolist() if i not in seen]
        prank = pop_order.index(target) + 1
        for r, acc in ((rank, "model"), (prank, "pop")):
            if r <= 50:
                if acc == "model":
                    hits, ndcg = hits + 1, ndcg + 1 / np.log2(r + 1)
                else:
                    phits, pndcg = phits + 1, pndcg + 1 / np.log2(r + 1)
    assert got["users"] == pop["users"] == validated > 20
    assert got["HR@50"] == pytest.approx(hits / validated) and got["NDCG@50"] == pytest.approx(ndcg / validated)
    assert pop["HR@50"] == pytest.approx(phits / validated) and pop["NDCG@50"] == pytest.approx(pndcg / validated)
    assert got["HR@50"] >= 0.05 and pop["HR@50"] >= 0.05  # both find targets: the comparison is not of zeros
