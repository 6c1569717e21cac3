"""MovieLens-1M side by side with a peer library: RecTools' SASRec and HSTU trained on exactly our split, under
the same CPU budget, scored by our evaluate.py, in one table with the published figures and ours.

    python bench/peers.py SRC [--out bench/peers.tmp] [--models popular sasrec hstu] [--epochs 101]
                          [--minutes 60] [--threads 1] [--val-every 5] [--ours NAME=metrics.json ...]

SRC is a MovieLens-1M folder (converted here with convert_movielens.py into OUT/ml-1m, once) or a folder that
convert_movielens.py already wrote (data/ and eval/). RecTools (pip install "rectools[torch]") is a
benchmark-only dependency: install it in a separate environment with the same torch; the split itself
(`peer_split`) needs only this project's packages.

The split is ours, event for event: the peer trains on data/seq.jsonl, which holds every event of each user but
the last (the test target, only in eval/ground_truth.json); each user's validation target (dataset.holdout_index,
the trainer's own choice: the last of seq.jsonl) is held out of training by RecTools' leave_one_out_mask, checked
here to pick exactly those events. Validation (HR@10 over every item, history filtered, as ours) chooses the
epoch; the test ranking sees the whole seq.jsonl history (the validation item included, as our predict_seq),
ranks every item the peer trained, filters the history and is scored by `evaluate.py --k 10 50 200`.

The settings are the HSTU paper's ML-1M configs (configs/ml-1m/{sasrec,hstu}-sampled-softmax-n128-final.gin, as
RecTools' HSTU tutorial reproduces them): width 50, 2 blocks, 1 head, dropout 0.2, maxlen 200, batch 128, Adam
lr 1e-3, sampled softmax over 128 uniform negatives, cosine similarity, temperature 0.05, item ids only, item
embeddings scaled by sqrt(50) before the positions are added, 101 epochs. Training stops at --epochs or --minutes (wall clock, validation included), whichever comes first;
the default, 60 minutes on 1 thread, is one CPU-hour, the budget of our CPU profile (bench/movielens.sh run with
OMP_NUM_THREADS=1, two models side by side on two cores).
HSTU's relative time bias needs a query time: RecTools trains and validates with the target's own time (as the
paper); at test it gets the time of the user's last history event, since our eval files do not reveal the
target's (hstu_notime, without the time bias, needs none).
Writes OUT/<model>/{result.json, metrics.json, run.json} and the table to bench/peers_results.md (--results).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
import warnings
from datetime import date, timedelta
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common import atomic_save_json, atomic_write, data_error, safe_load_pickle  # noqa: E402
from dataset import holdout_index, split_records  # noqa: E402
from records import parse_line  # noqa: E402

KS = (10, 50, 200)
# (name, HR@10, NDCG@10, HR@50, NDCG@50, HR@200): the HSTU paper (Zhai et al., ICML 2024, ML-1M; @50/@200 as
# quoted in RecTools' HSTU tutorial) and RecTools' own reproduction there (100 epochs on a GPU, the paper's data).
PUBLISHED = [("SASRec (published, HSTU paper)", .2853, .1603, None, None, None),
             ("HSTU (published, HSTU paper)", .3097, .1720, .5754, .2307, .7716),
             ("HSTU-large (published, HSTU paper)", .3294, .1893, .5935, .2481, .7839),
             ("RecTools HSTU (published by RecTools, 100 epochs, GPU)", .3077, .1724, .5818, .2330, .7829),
             ("RecTools HSTU-large (published by RecTools, 100 epochs, GPU)", .3291, .1871, .6007, .2471, .7957)]
# The HSTU paper's ML-1M configs (SASRec and HSTU share all but the encoder); HSTU-large: 8 blocks, 2 heads.
# Item embeddings scaled by sqrt(width) before the positions are added, as the paper's input preprocessor does
# for both (RecTools' HSTU sets it by itself; its SASRec default does not, and then the positions, initialised
# 4x larger than the items, drown them and SASRec sits at popularity for epochs).
PAPER = dict(session_max_len=200, n_factors=50, n_heads=1, n_blocks=2, dropout_rate=0.2, lr=1e-3, batch_size=128,
             loss="sampled_softmax", n_negatives=128, lightning_module_kwargs={"logits_t": 0.05},
             similarity_module_kwargs={"distance": "cosine"}, pos_encoding_kwargs={"use_scale_factor": True})
MODELS = {"sasrec": ("SASRecModel", {}),
          "hstu": ("HSTUModel", {"relative_time_attention": True, "relative_pos_attention": True}),
          "hstu_large": ("HSTUModel", {"relative_time_attention": True, "relative_pos_attention": True,
                                       "n_blocks": 8, "n_heads": 2}),
          # no relative time bias: no query time needed, so nothing differs between training and test
          "hstu_notime": ("HSTUModel", {"relative_time_attention": False, "relative_pos_attention": True}),
          "popular": ("PopularModel", None)}


def peer_split(data_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """data/seq.jsonl (+ indexer.pkl) -> the events a peer library trains and validates on, one row an event, each
    user's rows in file (= time) order: "user" (raw id, str), "item" (raw creative id), "ts" (s), "val" (bool:
    the user's validation target, dataset.holdout_index). Users without items have no rows. Raises DataError
    where a peer's leave-one-out (the last event by time, ties in row order) would pick another event: a
    validation target that is not the user's last item, or time going back within a user."""
    data_dir = Path(data_dir)
    path = data_dir / "seq.jsonl"
    if not path.is_file():
        raise data_error(path, None, "file not found (convert_movielens.py writes it)")
    indexer = safe_load_pickle(data_dir / "indexer.pkl")
    raw_user = {r: u for u, r in indexer["u"].items()}
    raw_item = {r: i for i, r in indexer["i"].items()}
    users, items, ts, val = [], [], [], []
    with open(path, "rb") as f:
        for ln, text in enumerate(f, 1):
            records = parse_line(text, str(path), ln)
            evs, _ = split_records(records)
            if not evs:
                continue
            t = holdout_index(evs)
            if t != len(evs) - 1:
                raise data_error(path, ln, f"the validation target is item {t + 1} of {len(evs)}, not the last: "
                                 "a peer's leave-one-out would hold out another event")
            times = [r[5] for r in evs]
            if any(b < a for a, b in zip(times, times[1:])):
                raise data_error(path, ln, "timestamps go back in time: a peer would reorder the events")
            user = records[0][0]
            if user not in raw_user:
                raise data_error(path, ln, f"user {user} is not in indexer.pkl")
            missing = next((r[1] for r in evs if r[1] not in raw_item), None)
            if missing is not None:
                raise data_error(path, ln, f"item {missing} is not in indexer.pkl")
            users += [raw_user[user]] * len(evs)
            items += [raw_item[r[1]] for r in evs]
            ts += times
            val += [False] * (len(evs) - 1) + [True]
    return {"user": np.array(users, dtype=object), "item": np.array(items, np.int64),
            "ts": np.array(ts, np.int64), "val": np.array(val, bool)}


def conversion_dir(src: Path, out: Path) -> Path:
    """A folder convert_movielens.py wrote (SRC itself, or OUT/ml-1m converted from SRC now or earlier)."""
    if (src / "data" / "seq.jsonl").is_file() and (src / "eval" / "ground_truth.json").is_file():
        return src
    conv = out / "ml-1m"
    if not (conv / "eval" / "ground_truth.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "convert_movielens.py"), str(src), str(conv)], check=True)
    return conv


def build_dataset(split: dict[str, np.ndarray]):
    """The events as a RecTools Dataset (ids raw, weight 1), checked: RecTools' leave_one_out_mask holds out
    exactly our validation targets."""
    import pandas as pd
    from rectools import Columns
    from rectools.dataset import Dataset
    from rectools.models.nn.transformers.utils import leave_one_out_mask

    df = pd.DataFrame({Columns.User: split["user"], Columns.Item: split["item"], Columns.Weight: 1.0,
                       Columns.Datetime: pd.to_datetime(split["ts"], unit="s")})
    dataset = Dataset.construct(df)
    raw = dataset.get_raw_interactions()
    theirs = raw[leave_one_out_mask(raw)]
    ours = df[split["val"]]
    if set(zip(theirs[Columns.User], theirs[Columns.Item])) != set(zip(ours[Columns.User], ours[Columns.Item])):
        raise RuntimeError("RecTools' leave-one-out mask differs from our validation targets")
    return dataset


def val_metrics(pl_module, k: int = 10) -> dict[str, float]:
    """HR@k, NDCG@k of a RecTools transformer (its lightning module) on the validation targets: every trained item
    ranked, the input history filtered out (a target in it is a miss), rank = 1 + items scored above the target."""
    import torch

    tm = pl_module.torch_model
    loader = pl_module.data_preparator.get_dataloader_val()
    was_training = tm.training
    tm.eval()
    hits = ndcg = n = 0.0
    with torch.no_grad():
        item_embs = tm.item_model.get_all_embeddings()  # (I + 1, D), row 0 = padding
        for batch in loader:
            sess = tm.encode_sessions(batch, item_embs)[:, -1:, :]  # (B, 1, D)
            logits = tm.similarity_module(sess, item_embs)[:, 0, :]  # (B, I + 1)
            logits.scatter_(1, batch["x"], -torch.inf)  # the history; x's left padding is item 0, the pad token
            logits[:, 0] = -torch.inf
            score = logits.gather(1, batch["y"][:, -1:])  # (B, 1); -inf when the target is in the history
            rank = (logits > score).sum(1) + torch.where(score[:, 0].isinf(), logits.shape[1], 1)  # (B,) from 1
            hit = rank <= k
            hits += float(hit.sum())
            ndcg += float((hit / torch.log2(rank.double() + 1)).sum())
            n += len(rank)
    tm.train(was_training)
    return {f"HR@{k}": hits / max(n, 1), f"NDCG@{k}": ndcg / max(n, 1), "users": int(n)}


def make_callback(every: int, log: list):
    """Validates every `every` epochs and at the end of training (a --minutes stop mid-epoch included), keeps
    the best weights by HR@10 and puts them back when training ends."""
    from pytorch_lightning.callbacks import Callback

    class BestOnValidation(Callback):
        def __init__(self) -> None:
            self.best, self.state, self.t0, self.validated_step = -1.0, None, None, -1

        def _validate(self, trainer, pl_module) -> None:
            if trainer.global_step == self.validated_step:
                return
            m = val_metrics(pl_module)
            self.validated_step = trainer.global_step
            step, per_epoch = trainer.global_step, max(trainer.num_training_batches, 1)
            row = {"step": step, "epochs": round(step / per_epoch, 2),
                   "minutes": round((time.time() - self.t0) / 60, 2), **m,
                   "train_loss": float(trainer.callback_metrics.get("train_loss", float("nan")))}
            log.append(row)
            print(f"  step {row['step']} (epoch {row['epochs']}), {row['minutes']:.1f} min: train loss "
                  f"{row['train_loss']:.4f}, validation HR@10 {m['HR@10']:.4f} NDCG@10 {m['NDCG@10']:.4f}", flush=True)
            if m["HR@10"] > self.best:
                self.best = m["HR@10"]
                self.state = copy.deepcopy(pl_module.torch_model.state_dict())

        def on_train_start(self, trainer, pl_module) -> None:
            self.t0 = time.time()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            if (trainer.current_epoch + 1) % every == 0:
                self._validate(trainer, pl_module)

        def on_train_end(self, trainer, pl_module) -> None:
            self._validate(trainer, pl_module)
            pl_module.torch_model.load_state_dict(self.state)

    return BestOnValidation()


def train_transformer(name: str, dataset, args: argparse.Namespace) -> tuple[object, dict]:
    """Fit one RecTools transformer under the budget -> (model, run info)."""
    import pytorch_lightning as pl
    from pytorch_lightning import Trainer
    import rectools.models as rm
    from rectools.models.nn.item_net import IdEmbeddingsItemNet
    from rectools.models.nn.transformers.utils import leave_one_out_mask

    cls_name, extra = MODELS[name]
    settings = {**PAPER, **extra, "loss": args.loss}
    if args.loss == "softmax":
        del settings["n_negatives"]
    pl.seed_everything(args.seed, workers=True)
    model = getattr(rm, cls_name)(**settings, epochs=args.epochs, item_net_block_types=(IdEmbeddingsItemNet,),
                                  get_val_mask_func=leave_one_out_mask, recommend_torch_device="cpu",
                                  dataloader_num_workers=0, deterministic=True)
    log: list[dict] = []
    # the trainer RecTools would build, plus the wall-clock budget and our validation (its val-loss loop off)
    model._trainer = Trainer(max_epochs=args.epochs, max_time=timedelta(minutes=args.minutes), accelerator="cpu",
                             devices=1, deterministic=True, enable_progress_bar=False, enable_model_summary=False,
                             logger=False, enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
                             callbacks=[make_callback(args.val_every, log)])
    t0 = time.time()
    model.fit(dataset)
    train_s = time.time() - t0
    trainer = model.fit_trainer
    per_epoch = trainer.num_training_batches
    best = max(log, key=lambda r: r["HR@10"])
    info = {"model": cls_name, "settings": {**settings, "item_net_block_types": ["IdEmbeddingsItemNet"],
                                            "get_val_mask_func": "leave_one_out_mask"},
            "steps": trainer.global_step, "steps_per_epoch": per_epoch,
            "epochs_done": round(trainer.global_step / max(per_epoch, 1), 2), "epochs_budget": args.epochs,
            "minutes_budget": args.minutes, "val_every": args.val_every,
            "stopped_by_time": trainer.global_step < args.epochs * per_epoch,
            "train_minutes": round(train_s / 60, 2), "best": best, "validation": log,
            "trained_users": int(model.data_preparator.train_dataset.user_id_map.size),
            "trained_items": int(len(model.data_preparator.get_known_item_ids()))}
    return model, info


def recommend(name: str, model, dataset, split: dict[str, np.ndarray], k: int) -> dict[str, list]:
    """Top-k for every user with a history, the history filtered -> result.json's {"top10s", "user"}."""
    import pandas as pd
    from rectools import Columns

    users = pd.unique(split["user"])
    if name.startswith("hstu"):
        # the query time: the user's last history event (the target's own time is not in our eval files)
        last = pd.DataFrame({Columns.User: split["user"], Columns.Datetime: split["ts"]}).groupby(
            Columns.User, sort=False)[Columns.Datetime].max()
        context = pd.DataFrame({Columns.User: last.index, Columns.Weight: 1.0,
                                Columns.Datetime: pd.to_datetime(last.to_numpy(), unit="s")})
        reco = model.recommend(users=users, dataset=dataset, k=k, filter_viewed=True, context=context)
    else:
        reco = model.recommend(users=users, dataset=dataset, k=k, filter_viewed=True)
    reco = reco.sort_values([Columns.User, Columns.Rank], kind="stable")
    lists = reco.groupby(Columns.User, sort=False)[Columns.Item].agg(list)
    return {"top10s": [[int(i) for i in top] for top in lists.to_list()], "user": [str(u) for u in lists.index]}


def score(result_path: Path, eval_dir: Path, out: Path) -> dict:
    """Our evaluate.py on a result.json -> metrics["model"]["all"]."""
    subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--result", str(result_path), "--ground-truth",
                    str(eval_dir / "ground_truth.json"), "--k", *map(str, KS), "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["model"]["all"]


def fmt(x) -> str:
    return "" if x is None else f"{x:.4f}"


def table(rows: list[tuple[str, dict | None, str]]) -> str:
    """rows: (name, metrics or None, trained) -> markdown."""
    lines = ["| model | HR@10 | NDCG@10 | HR@50 | NDCG@50 | HR@200 | MRR | trained |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, m, trained in rows:
        m = m or {}
        cells = [fmt(m.get(c)) for c in ("HR@10", "NDCG@10", "HR@50", "NDCG@50", "HR@200", "MRR")]
        lines.append(f"| {name} | {' | '.join(cells)} | {trained} |")
    return "\n".join(lines)


LABELS = {"popular": "RecTools popularity", "sasrec": "RecTools SASRec", "hstu": "RecTools HSTU",
          "hstu_large": "RecTools HSTU-large", "hstu_notime": "RecTools HSTU, no time bias"}


def run_model(name: str, dataset, split, conv: Path, args, context: dict) -> dict:
    """Train, recommend, score one model -> its run.json (metrics included), written beside result.json."""
    run = Path(args.out) / name
    load0 = os.getloadavg()[0]
    print(f"{name}: training", flush=True)
    if name == "popular":
        from rectools.models import PopularModel
        t0 = time.time()
        model = PopularModel().fit(dataset)  # counts over every seq.jsonl event, as our popularity baseline
        info = {"model": "PopularModel", "settings": {}, "train_minutes": round((time.time() - t0) / 60, 2)}
        known = set(split["item"].tolist())
    else:
        model, info = train_transformer(name, dataset, args)
        known = set(model.data_preparator.get_known_item_ids().tolist())
    targets = [t["creative_id"] for t in json.loads((conv / "eval" / "ground_truth.json").read_text()).values()]
    info["untrained_test_targets"] = sum(t not in known for t in targets)  # the peer cannot rank these: misses
    t0 = time.time()
    result = recommend(name, model, dataset, split, args.topk)
    info["recommend_seconds"] = round(time.time() - t0, 1)
    info["recommended_users"] = len(result["user"])
    atomic_save_json(result, run / "result.json")
    info["metrics"] = score(run / "result.json", conv / "eval", run / "metrics.json")
    info.update(context, threads=args.threads, topk=args.topk, load_before=load0, load_after=os.getloadavg()[0])
    atomic_save_json(info, run / "run.json")
    m = info["metrics"]
    print(f"{name}: test HR@10 {m['HR@10']:.4f} NDCG@10 {m['NDCG@10']:.4f} HR@200 {m['HR@200']:.4f}", flush=True)
    return info


def trained_text(i: dict) -> str:
    if "epochs_done" not in i:
        return f"counts, {i['train_minutes'] * 60:.0f} s"
    stop = ", stopped by --minutes" if i["stopped_by_time"] else ""
    return (f"{i['epochs_done']:g} epochs ({i['steps']} steps{stop}), best on validation at epoch "
            f"{i['best']['epochs']:g}; {i['train_minutes']:.1f} min, {i['threads']} thread(s)")


def cpu_name() -> str:
    try:
        line = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name"))
        return line.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def run_lines(name: str, i: dict) -> str:
    done = (f"{i['epochs_done']:g} of {i['epochs_budget']} epochs ({i['steps']} steps, {i['steps_per_epoch']} an "
            f"epoch), {i['train_minutes']:.1f} min training of {i['minutes_budget']:g} allowed" if "epochs_done" in i
            else "popularity counts")
    val = ", ".join(f"epoch {r['epochs']:g}: {r['HR@10']:.4f} / {r['NDCG@10']:.4f}" for r in i.get("validation", []))
    out = [f"- **{name}**: `{i['command']}` ({i['date']}; 1-min load average {i['load_before']:.1f} before, "
           f"{i['load_after']:.1f} after)",
           f"  - {done}; top-{i['topk']} for {i['recommended_users']:,} users in {i['recommend_seconds']:.0f} s; "
           f"{i['untrained_test_targets']} test targets are items it never trained on (always misses)"]
    if val:
        out.append(f"  - validation HR@10 / NDCG@10: {val}")
    if i["settings"]:
        out.append(f"  - settings: `{json.dumps(i['settings'], sort_keys=True)}`")
    return "\n".join(out)


def report(infos: dict, ours: list[tuple[str, dict, str]], conv: Path, command: str) -> str:
    rows = [(n, dict(zip(("HR@10", "NDCG@10", "HR@50", "NDCG@50", "HR@200"), v)), "") for n, *v in PUBLISHED]
    rows += [(f"**{LABELS[n]}**", i["metrics"], trained_text(i)) for n, i in infos.items()]
    rows += [(f"ours, {n}", m, f"from {path}") for n, m, path in ours]
    c = json.loads((conv / "conversion.json").read_text()) if (conv / "conversion.json").is_file() else {}
    data = (f"{c['users']:,} users, {c['items']:,} items, {c['events']:,} events ({c['layout']} layout)" if c
            else "(no conversion.json)")
    first = next(iter(infos.values()), {})
    return f"""# bench/peers.py: MovieLens-1M, RecTools side by side

Table written by `{command}`.

- Machine: {os.cpu_count()} CPUs ({cpu_name()}); {first.get('versions', '')}.
- Data: {data}. Each user's last event is the test target (never trained on), the second-to-last the
  validation target (held out of training, chooses the epoch: the best validation HR@10 is kept). Test:
  every item the peer trained ranked, the history filtered, scored by our evaluate.py.

{table(rows)}

Runs (each model's own command, budget, epochs, wall time, validation and settings; RecTools constructor
arguments, item ids only, uniform negatives):

{chr(10).join(run_lines(n, i) for n, i in infos.items())}
"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="MovieLens-1M folder, or a folder convert_movielens.py wrote")
    p.add_argument("--out", default=str(ROOT / "bench" / "peers.tmp"), help="run folder (conversion, results)")
    p.add_argument("--models", nargs="+", default=["popular", "sasrec", "hstu"], choices=list(MODELS))
    p.add_argument("--epochs", type=int, default=101, help="epochs at most (the paper's 101)")
    p.add_argument("--minutes", type=float, default=60.0, help="wall-clock training budget a model, in minutes")
    p.add_argument("--threads", type=int, default=1, help="torch threads (set OMP_NUM_THREADS to the same)")
    p.add_argument("--val-every", type=int, default=5, help="validate every N epochs (and at the end)")
    p.add_argument("--loss", default="sampled_softmax", choices=["sampled_softmax", "softmax"],
                   help="the paper's sampled softmax (128 uniform negatives), or RecTools' default full softmax "
                        "over the catalogue")
    p.add_argument("--topk", type=int, default=200)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--ours", action="append", default=[], metavar="NAME=PATH",
                   help="a row for our run: its metrics.json from evaluate.py (repeatable)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: the table from the --models runs already in --out (e.g. run side by side)")
    p.add_argument("--results", default=str(ROOT / "bench" / "peers_results.md"), help="where the table is written")
    args = p.parse_args(argv)
    ours = []
    for spec in args.ours:
        name, sep, path = spec.partition("=")
        if not sep or not Path(path).is_file():
            p.error(f"--ours {spec!r}: expected NAME=PATH of an existing metrics.json")
        ours.append((name, json.loads(Path(path).read_text())["model"]["all"], path))
    if args.epochs < 1 or args.minutes <= 0 or args.threads < 1 or args.val_every < 1:
        p.error("--epochs, --threads and --val-every must be >= 1, --minutes > 0")
    command = (f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} python "
               + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]))

    conv = conversion_dir(Path(args.src), Path(args.out))
    if args.report_only:
        missing = [n for n in args.models if not (Path(args.out) / n / "run.json").is_file()]
        if missing:
            p.error(f"no run.json in {args.out} for {', '.join(missing)}: run them first")
        infos = {n: json.loads((Path(args.out) / n / "run.json").read_text()) for n in args.models}
    else:
        infos = train_all(args, conv, command)
    text = report(infos, ours, conv, command)
    print(text)
    with atomic_write(Path(args.results)) as f:
        f.write(text.encode())
    print(f"wrote {args.results}")


def train_all(args, conv: Path, command: str) -> dict[str, dict]:
    import pytorch_lightning
    import rectools
    import torch

    torch.set_num_threads(args.threads)
    # the peer's own deprecation and serializer warnings, and Lightning's per-fit banner, are noise here
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*(Pydantic serializer|LeafSpec|does not have many workers).*")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    context = {"command": command, "date": date.today().isoformat(),
               "versions": f"rectools {rectools.__version__}, pytorch-lightning {pytorch_lightning.__version__}, "
                           f"torch {torch.__version__}, Python {platform.python_version()}"}
    split = peer_split(conv / "data")
    n_users = len(set(split["user"].tolist()))
    print(f"peer split: {len(split['item']):,} events of {n_users:,} users ({int(split['val'].sum()):,} "
          f"validation targets held out of training)", flush=True)
    dataset = build_dataset(split)
    return {name: run_model(name, dataset, split, conv, args, context) for name in args.models}


if __name__ == "__main__":
    main()
