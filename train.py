"""Training: one end-to-end stage (eval -> save -> step -> log), exact resume.

    python -u main.py [options]                        # what run.sh calls
    python -u train.py --resume checkpoints/global_stepN/ckpt.pt
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from common import DataError, env_default, exit_on_data_error, load_stat, safe_torch_load
from dataset import (ActivePool, EpochSampler, EvalDataset, FeatureSpec, RankBatches, SeqReader, TrainDataset, collate,
                     split_users)
from distributed import Dist, all_true, barrier, cleanup, gather_rows, mean_over_ranks, row_counts, setup
from loss import DEFAULT_CURRICULUM, candidate_columns, curriculum, log_q_from_counts, sampled_softmax_loss
from mm_emb import MMFeatures, emb_dir_of, ensure_tables, with_mm
from model import PRESETS, HSTUModel, ModelConfig, param_groups
from retrieval import rank_metrics, topk_chunked

log = logging.getLogger("train")


def opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # paths (DESIGN §2: an option beats the environment variable)
    data_dir: str = opt(env_default("TRAIN_DATA_PATH", "./data"), "training data folder (env TRAIN_DATA_PATH)")
    cache_dir: str = opt(env_default("USER_CACHE_PATH", "./cache"), "get_stat.py output (env USER_CACHE_PATH)")
    ckpt_dir: str = opt(env_default("TRAIN_CKPT_PATH", "./checkpoints"), "checkpoints (env TRAIN_CKPT_PATH)")
    log_dir: str = opt(env_default("TRAIN_LOG_PATH", "./logs"), "folder of train.log (env TRAIN_LOG_PATH)")
    tf_dir: str = opt(env_default("TRAIN_TF_EVENTS_PATH", "./tf_events"), "TensorBoard events (env TRAIN_TF_EVENTS_PATH)")
    # model
    preset: str = opt("auto", "model size: 'reference' (the competition model), 'small' (CPU), "
                      "'auto' = reference on CUDA, small otherwise", choices=["auto", "reference", "small"])
    model: str = opt(None, "sequence encoder: hstu or sasrec (default: the preset's)", choices=["hstu", "sasrec"])
    hidden: int = opt(None, "model width D (default: the preset's)")
    num_layers: int = opt(None, "number of layers (default: the preset's)")
    num_heads: int = opt(None, "attention heads (default: the preset's)")
    maxlen: int = opt(None, "items per training sequence (default: the preset's)")
    dropout: float = opt(None, "dropout on each layer's residual branch (default: the preset's)")
    mm_emb_id: tuple[int, ...] = opt((), "multimodal item inputs: creative_emb feature ids, e.g. --mm-emb-id 81 82 "
                                     "(read from DATA_DIR/creative_emb, converted once into tables in --cache-dir); "
                                     "default none", nargs="*", type=int)
    # optimisation
    max_steps: int = opt(None, "length of training in steps; the schedule and curriculum follow it "
                         "(default: 130000 for reference, 500 for small)")
    batch_size: int = opt(None, "sequences per step (default: 232 for reference, 64 for small)")
    lr: float = opt(None, "peak learning rate, embeddings get half (default: 1e-3 for reference, 2e-3 for small)")
    weight_decay: float = opt(0.01, "AdamW weight decay (not on embeddings, biases, norms)")
    warmup_steps: int = opt(None, "linear warm-up steps (default: 2%% of max-steps)")
    min_lr_ratio: float = opt(0.1, "cosine floor as a fraction of --lr; held after max-steps")
    grad_clip: float = opt(1.0, "gradient-norm clipping")
    # loss
    temperature: float = opt(None, "softmax temperature on cosine similarities (default: 0.01 for reference, "
                             "0.1 for small: a narrow model cannot spread its cosines over a 0.01 scale)")
    log_q_alpha: float = opt(0.75, "log-q correction: q proportional to count^alpha; 0 disables it")
    curriculum: str = opt(None, "hard-negative curriculum 'step:k:share,...' for a 130k-step run, scaled to "
                          f"shorter runs; 'none' keeps every negative (default: {DEFAULT_CURRICULUM} for reference, "
                          "none for small, where hard negatives cost time and lowered validation scores)")
    max_candidates: int = opt(0, "sample this many candidate columns per step (half global negatives, half in-batch "
                              "positives), shared by all rows; 0 keeps all 2 x target rows. On a small catalogue "
                              "a few thousand suffice and cut the loss's cost many-fold")
    neg_active_days: float = opt(30.0, "global negatives: items active in the last N days of the data (0: all)")
    # evaluation, checkpoints, logging
    val_users: int = opt(1000, "users validated on their last click/conversion (or last item)")
    val_split: str = opt("users", "'users': the validation users are held out of training whole; 'last': every "
                         "user trains without that last item (leave-one-out, as public benchmarks do)",
                         choices=["users", "last"])
    eval_every: int = opt(None, "validate every N steps (default: max-steps / 10)")
    save_every: int = opt(None, "checkpoint every N steps (default: eval-every)")
    keep_last: int = opt(3, "checkpoints kept besides the best one")
    log_every: int = opt(20, "log loss/lr/throughput every N steps")
    stop_at: int = opt(None, "end this run at this step with a checkpoint, as if interrupted (resume later)")
    # system
    device: str = opt("auto", "cpu, cuda, cuda:N or auto")
    compile: bool = opt(False, "torch.compile the sequence encoder (static shapes; the first steps compile)")
    num_workers: int = opt(None, "data-loading worker processes (default: from the CPU count)")
    seed: int = opt(42, "seed for initialisation, data order and negatives")
    resume: str = opt(None, "a ckpt.pt (or its folder) to continue from exactly; 'latest': the newest complete "
                      "checkpoint in --ckpt-dir")
    on_nonfinite: str = opt("stop", "a non-finite loss or gradient norm: 'stop' the run (the last checkpoint stays "
                            "good) or 'skip' the step (no update; counted and logged)", choices=["stop", "skip"])


# options that may differ on resume; everything else comes from the checkpoint
RESUME_OVERRIDES = {"data_dir", "cache_dir", "ckpt_dir", "log_dir", "tf_dir", "max_steps", "eval_every",
                    "save_every", "keep_last", "log_every", "stop_at", "device", "num_workers", "resume",
                    "on_nonfinite", "compile"}
TRAIN_PRESETS = {"reference": dict(max_steps=130_000, batch_size=232, lr=1e-3, temperature=0.01,
                                   curriculum=DEFAULT_CURRICULUM),
                 "small": dict(max_steps=500, batch_size=64, lr=2e-3, temperature=0.1, curriculum="none")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        kw = dict(help=f.metadata["help"], default=argparse.SUPPRESS)
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        kind = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
        if f.type in ("bool", bool):
            p.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction, **kw)
            continue
        if "nargs" in f.metadata:  # a list option (--mm-emb-id 81 82): its element type is declared with it
            kw["nargs"], kind = f.metadata["nargs"], f.metadata["type"]
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, **kw)
    return p


def parse_config(argv: list[str] | None = None) -> tuple[TrainConfig, dict | None]:
    """-> (config, checkpoint state or None). Explicit options beat the checkpoint's where allowed."""
    given = vars(build_parser().parse_args(argv))
    state = None
    if given.get("resume"):
        path = find_checkpoint(given["resume"], given.get("ckpt_dir", TrainConfig.ckpt_dir))
        given["resume"] = str(path)
        state = load_checkpoint(path)
        cfg = TrainConfig(**state["train_config"])
        ignored = sorted(set(given) - RESUME_OVERRIDES)
        if ignored:
            print(f"resume: the checkpoint's settings are kept for {', '.join(ignored)}", file=sys.stderr)
        cfg = dataclasses.replace(cfg, stop_at=None, **{k: v for k, v in given.items() if k in RESUME_OVERRIDES})
    else:
        cfg = TrainConfig(**given)
    return cfg, state


class NonFiniteError(DataError):
    """A non-finite loss or gradient: the run stops with one line (exit code 2), its checkpoints intact."""


def find_checkpoint(resume: str, ckpt_dir: str) -> Path:
    """--resume value -> a ckpt.pt path. 'latest': the highest global_stepN/ckpt.pt in ckpt_dir (only complete
    folders have that name: they are renamed into place once fully written)."""
    if resume == "latest":
        steps = sorted((int(p.parent.name[len("global_step"):]), p) for p in Path(ckpt_dir).glob("global_step*/ckpt.pt")
                       if p.parent.name[len("global_step"):].isdigit())
        if not steps:
            raise DataError(f"{ckpt_dir}: --resume latest found no checkpoint (global_stepN/ckpt.pt)")
        return steps[-1][1]
    path = Path(resume)
    path = path / "ckpt.pt" if path.is_dir() else path
    if not path.exists():
        raise DataError(f"{path}: checkpoint not found")
    return path


def load_checkpoint(path: Path) -> dict:
    state = safe_torch_load(path)  # RNG and data-order state are tensors and plain values
    if not isinstance(state, dict) or not {"train_config", "model", "optimizer", "step"} <= set(state):
        raise DataError(f"{path}: not a training checkpoint (ckpt.pt of this project); model.pt is for inference")
    return state


def resolve(cfg: TrainConfig, device: torch.device) -> tuple[TrainConfig, ModelConfig]:
    """Fill the defaults that depend on the preset and on the run length."""
    preset = cfg.preset if cfg.preset != "auto" else ("reference" if device.type == "cuda" else "small")
    over = {k: getattr(cfg, k) for k in ("model", "hidden", "num_layers", "num_heads", "maxlen", "dropout")
            if getattr(cfg, k) is not None}
    mcfg = dataclasses.replace(PRESETS[preset], **over)
    t = {k: v for k, v in TRAIN_PRESETS[preset].items() if getattr(cfg, k) is None}
    cfg = dataclasses.replace(cfg, preset=preset, **t)
    eval_every = cfg.eval_every or max(cfg.max_steps // 10, 1)
    cfg = dataclasses.replace(
        cfg, eval_every=eval_every, save_every=cfg.save_every or eval_every,
        warmup_steps=cfg.warmup_steps if cfg.warmup_steps is not None else max(cfg.max_steps // 50, 1),
        num_workers=cfg.num_workers if cfg.num_workers is not None else min(max((os.cpu_count() or 1) - 1, 0), 8))
    return cfg, mcfg


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, cosine to min_lr_ratio·lr at max_steps, then held at that floor."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = min((step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1), 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * t))


def hard_negatives(step: int, cfg: TrainConfig) -> tuple[int | None, float]:
    if cfg.curriculum == "none":
        return None, 0.5
    return curriculum(step, cfg.max_steps, cfg.curriculum)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_loss(model: HSTUModel | DistributedDataParallel, batch: dict, log_q: torch.Tensor, cfg: TrainConfig,
               step: int, d: Dist = Dist()) -> torch.Tensor:
    core = model.module if isinstance(model, DistributedDataParallel) else model
    out = model(batch)  # (B, N, D); through the DDP wrapper, which syncs gradients in backward
    target = batch["next_item"] > 0  # (B, N): positions whose next token is an item
    b, n = target.shape
    row_seq = torch.arange(b, device=out.device)[:, None].expand(b, n)[target]  # (R,)
    pos_ids, neg_ids = batch["next_item"][target], batch["neg_item"][target]  # (R,)
    mm = {k: batch[k][target] if k in batch else None for k in ("next_mm", "neg_mm")}  # (R, sum of mm dims)
    pos = core.item_vectors(pos_ids, batch["next_feat"][target], mm["next_mm"])  # (R, D)
    neg = core.item_vectors(neg_ids, batch["neg_feat"][target], mm["neg_mm"])  # (R, D)
    hard_k, share = hard_negatives(step, cfg)
    sizes = row_counts(pos_ids.numel(), out.device, d)  # (W,) target rows of every rank
    row_seq = row_seq + d.rank * b  # sequence numbers unique across ranks
    gathered = tuple(gather_rows(t, sizes, d) for t in (pos, pos_ids, row_seq, neg, neg_ids)) if d.enabled else None
    # the same columns on every rank and after a resume: drawn from (seed, step), not from a running RNG
    columns = candidate_columns(sum(sizes), cfg.max_candidates or None, out.device,
                                torch.Generator().manual_seed(cfg.seed * 1_000_003 + step))
    loss = sampled_softmax_loss(out[target], pos, pos_ids, row_seq, neg, neg_ids, log_q, temperature=cfg.temperature,
                                hard_k=hard_k, global_share=share, columns=columns, gathered=gathered)
    # DDP averages gradients over ranks: weighting by this rank's share of all rows (times W) makes the
    # average the gradient of the mean over the global batch, as in one process
    return loss * (sizes[d.rank] * d.world / max(sum(sizes), 1)) if d.enabled else loss


@torch.no_grad()
def all_item_vectors(model: HSTUModel, item_feat: np.ndarray, device: torch.device, chunk: int = 65536,
                     mm: MMFeatures | None = None) -> torch.Tensor:
    """(itemnum, D) vectors of items 1..itemnum: row p is item p + 1."""
    out = []
    if mm is not None:  # dense rows are wide: keep a chunk's rows near 256 MB
        chunk = max(1024, min(chunk, (256 << 20) // (4 * mm.dim)))
    for s in range(1, len(item_feat), chunk):
        e = min(s + chunk, len(item_feat))
        ids = torch.arange(s, e, device=device)
        feats = torch.from_numpy(np.asarray(item_feat[s:e], dtype=np.int64)).to(device)
        rows = torch.from_numpy(mm.range(s, e)).to(device) if mm is not None else None  # (n, sum of mm dims)
        out.append(model.item_vectors(ids, feats, rows).float())
    return torch.cat(out)


@torch.no_grad()
def validate(model: HSTUModel, loader: DataLoader, item_feat: np.ndarray, device: torch.device,
             amp: bool, mm: MMFeatures | None = None) -> dict[str, float]:
    """Full-catalogue retrieval for the validation users, their history filtered out."""
    model.eval()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        items = all_item_vectors(model, item_feat, device, mm=mm)
    tops, targets = [], []
    for batch in loader:
        batch = to_device(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            users = model.user_vectors(batch)
        # scores in fp32: bf16 ties would make the ranking arbitrary
        _, top = topk_chunked(users.float(), items, 10, exclude=batch["history"] - 1)
        tops.append((top + 1).cpu().numpy())
        targets.append(batch["target"].cpu().numpy())
    model.train()
    return rank_metrics(np.concatenate(tops), np.concatenate(targets))


def popularity_baseline(val: EvalDataset, counts: np.ndarray) -> dict[str, float]:
    """The most-popular items, each user's history filtered out. Counts exclude the held-out targets,
    which get_stat.py counted with everything else."""
    samples = [val[i] for i in range(len(val))]
    targets = [s["target"] for s in samples]
    counts = counts - np.bincount(targets, minlength=len(counts))
    order = np.argsort(-counts[1:], kind="stable") + 1
    tops = []
    for s in samples:
        seen = set(s["history"].tolist())
        top = []
        for it in order:
            if it not in seen:
                top.append(it)
                if len(top) == 10:
                    break
        tops.append(top + [0] * (10 - len(top)))
    return rank_metrics(np.array(tops), np.array(targets))


def save_checkpoint(cfg: TrainConfig, mcfg: ModelConfig, stat: dict, model: HSTUModel, optim: torch.optim.Optimizer,
                    step: int, best: dict, metrics: dict | None) -> Path:
    """checkpoints/global_step{N}/ with model.pt (weights + everything inference needs), ckpt.pt (all state)
    and the item tables; written in a temp folder that is renamed into place, so a crash leaves none half-done."""
    root = Path(cfg.ckpt_dir)
    final = root / f"global_step{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".global_step{step}.", dir=root))
    try:
        weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        meta = {"model_config": mcfg.to_dict(), "stat": {k: stat[k] for k in ("itemnum", "schema", "user_array_maxlen")},
                "step": step, "metrics": metrics}
        torch.save({"model": weights, **meta}, tmp / "model.pt")
        state = {"model": weights, "optimizer": optim.state_dict(), "step": step, "best": best,
                 "train_config": dataclasses.asdict(cfg), "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [], **meta}
        torch.save(state, tmp / "ckpt.pt")
        for name in ("item_feat.npy", "item_raw_id.npy"):  # inference needs nothing but this folder
            src = Path(cfg.cache_dir) / name
            try:
                os.link(src, tmp / name)  # same file system: no copy of a catalogue-sized table
            except OSError:
                shutil.copyfile(src, tmp / name)
        (tmp / "config.json").write_text(json.dumps({"train": dataclasses.asdict(cfg), "model": mcfg.to_dict()}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(root, cfg.keep_last, best.get("step"))
    return final


def prune_checkpoints(root: Path, keep_last: int, best_step: int | None) -> None:
    steps = sorted(int(p.name[len("global_step"):]) for p in root.glob("global_step*") if p.name[11:].isdigit())
    for s in steps[:-keep_last] if keep_last > 0 else steps:
        if s != best_step:
            shutil.rmtree(root / f"global_step{s}", ignore_errors=True)


def setup_logging(cfg: TrainConfig) -> None:
    Path(cfg.log_dir).mkdir(parents=True, exist_ok=True)
    log.setLevel(logging.INFO)
    log.handlers.clear()
    fh = logging.FileHandler(Path(cfg.log_dir) / "train.log")
    fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(fh)


_MAIN = True  # rank 0 (or a single process): the one that prints, logs and writes


def info(msg: str) -> None:
    if _MAIN:
        tqdm.write(msg)
        log.info(msg)


def check_writable(*dirs: str) -> None:
    for d in dirs:
        try:
            Path(d).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=d):
                pass
        except OSError as e:
            raise DataError(f"{d}: output folder is not writable ({e.strerror})") from None


def check_checkpoint_space(ckpt_dir: str, model: torch.nn.Module, keep_last: int) -> None:
    """Fail at the start, not hours later, when the checkpoint folder cannot hold the checkpoints kept:
    each is the weights twice (model.pt, ckpt.pt) plus AdamW's two moments, in fp32."""
    need = 4 * 4 * sum(p.numel() for p in model.parameters()) * (keep_last + 2)  # + the best + one being written
    free = shutil.disk_usage(ckpt_dir).free
    if free < need:
        raise DataError(f"{ckpt_dir}: {free / 2**30:.1f} GiB free, checkpoints need about {need / 2**30:.1f} GiB "
                        "(--keep-last + 2 of them); free space or lower --keep-last")


def remove_partial_checkpoints(ckpt_dir: str) -> None:
    # temp folders of a checkpoint write that was killed: never complete, never resumed from
    for p in Path(ckpt_dir).glob(".global_step*"):
        shutil.rmtree(p, ignore_errors=True)


def multimodal(cfg: TrainConfig, mcfg: ModelConfig, data: Path, cache: Path) -> tuple[ModelConfig, MMFeatures | None]:
    """--mm-emb-id (or a resumed model's mm_fids): build or reuse the tables in the cache folder -> (the model
    config with mm_fids/mm_dims set, the features the loaders read), or (mcfg, None) without multimodal inputs."""
    fids = mcfg.mm_fids or tuple(str(f) for f in cfg.mm_emb_id or ())
    if not fids:
        return mcfg, None
    fids, dims = ensure_tables(emb_dir_of(data), cache, fids, np.load(cache / "item_raw_id.npy"))
    if mcfg.mm_dims and dims != mcfg.mm_dims:
        raise DataError(f"{emb_dir_of(data)}: multimodal dims {dims} differ from the checkpoint's {mcfg.mm_dims}")
    per_batch = 3 * cfg.batch_size * mcfg.num_positions * sum(dims) * 4  # seq, next and neg rows, float32
    info(f"multimodal inputs: {', '.join(f'{f} (dim {d})' for f, d in zip(fids, dims))}; "
         f"{per_batch / 2**20:.0f} MB of dense rows a batch")
    return dataclasses.replace(mcfg, mm_fids=fids, mm_dims=dims), MMFeatures(cache, fids, dims)


def train(cfg: TrainConfig, state: dict | None = None) -> dict:
    global _MAIN
    d, device = setup(cfg.device)
    _MAIN = d.main
    try:
        return _train(cfg, state, d, device)
    finally:
        cleanup(d)


def _train(cfg: TrainConfig, state: dict | None, d: Dist, device: torch.device) -> dict:
    cfg, mcfg = resolve(cfg, device)
    if state is not None:
        mcfg = ModelConfig.from_dict(state["model_config"])
    if cfg.batch_size % d.world:
        raise DataError(f"--batch-size {cfg.batch_size} (the global batch) must be divisible by the {d.world} ranks")
    if d.main:
        check_writable(cfg.ckpt_dir, cfg.log_dir, cfg.tf_dir)
        setup_logging(cfg)
    torch.manual_seed(cfg.seed)
    amp = device.type == "cuda"
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # leave a core to each loader worker: oversubscribed OpenMP threads spin and slow steps down many-fold
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // d.world - cfg.num_workers))
    if amp:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    stat = load_stat(cfg.cache_dir)
    cache, data = Path(cfg.cache_dir), Path(cfg.data_dir)
    spec = FeatureSpec.from_stat(stat)
    mcfg, mm = multimodal(cfg, mcfg, data, cache)
    reader = SeqReader(data / "seq.jsonl", data / "seq_offsets.pkl")
    item_feat = np.load(cache / "item_feat.npy", mmap_mode="r")
    item_count = np.load(cache / "item_count.npy")
    train_lines, val_lines = split_users(len(reader), cfg.val_users, cfg.seed, cfg.val_split)
    pool = ActivePool(item_count, np.load(cache / "item_last_ts.npy"), cfg.neg_active_days)
    train_ds = TrainDataset(reader, train_lines, item_feat, spec, pool, mcfg.maxlen, cfg.seed,
                            holdout_last=cfg.val_split == "last")
    val_ds = EvalDataset(reader, val_lines, item_feat, np.load(cache / "item_raw_id.npy"), spec, mcfg.maxlen,
                         holdout_last=True)
    # loaders get their own generators: iter() would otherwise draw from the global RNG that drives dropout,
    # and a resumed run (which creates its iterator after restoring that RNG) would drift from the original
    val_loader = DataLoader(with_mm(val_ds, mm), batch_size=256, collate_fn=collate, num_workers=min(cfg.num_workers, 2),
                            generator=torch.Generator())

    model = HSTUModel(mcfg, stat["schema"], stat["itemnum"]).to(device)
    if d.main:
        check_checkpoint_space(cfg.ckpt_dir, model, cfg.keep_last)
        remove_partial_checkpoints(cfg.ckpt_dir)
    groups = param_groups(model, cfg.lr, cfg.weight_decay)
    for g in groups:
        g["lr_scale"] = g["lr"] / cfg.lr
    optim = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), fused=device.type == "cuda")
    log_q = (log_q_from_counts(item_count, cfg.log_q_alpha) if cfg.log_q_alpha > 0
             else torch.zeros(len(item_count))).to(device)

    step, best = 0, {}
    if state is not None:
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optimizer"])
        step, best = state["step"], state["best"]
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        info(f"resumed from {cfg.resume} at step {step}")

    # each step consumes exactly batch_size samples, so the data position is a function of the step
    consumed = step * cfg.batch_size
    sampler = EpochSampler(len(train_ds), cfg.seed, *divmod(consumed, len(train_ds)))
    local_batch = cfg.batch_size // d.world
    if d.enabled:
        sampler = RankBatches(sampler, local_batch, d.rank, d.world)
    loader = DataLoader(with_mm(train_ds, mm), batch_size=local_batch, sampler=sampler, collate_fn=collate,
                        num_workers=cfg.num_workers, pin_memory=device.type == "cuda", drop_last=True,
                        persistent_workers=cfg.num_workers > 0, prefetch_factor=4 if cfg.num_workers else None,
                        generator=torch.Generator())
    from torch.utils.tensorboard import SummaryWriter
    tb = SummaryWriter(cfg.tf_dir) if d.main else None
    core = model  # what validation and checkpoints use; `model` may become compiled and DDP-wrapped
    if cfg.compile:
        model = torch.compile(model, dynamic=False)  # batches have one shape (drop_last, fixed N)
    if d.enabled:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    n_params = sum(p.numel() for p in model.parameters())
    info(f"{mcfg.model} preset={cfg.preset} params={n_params / 1e6:.2f}M device={device} ranks={d.world} "
         f"train_users={len(train_lines)} val_users={len(val_lines)} steps={cfg.max_steps} batch={cfg.batch_size}")
    if not best.get("popularity") and d.main:
        best["popularity"] = popularity_baseline(val_ds, item_count)
    pop = best.get("popularity")

    end = min(cfg.max_steps, cfg.stop_at) if cfg.stop_at is not None else cfg.max_steps
    it = iter(loader)
    bar = tqdm(total=end, initial=step, desc="train", dynamic_ncols=True, mininterval=1.0, disable=not d.main)
    t_last, step_last, metrics = time.time(), step, None
    resumed_at = step if state is not None else None
    while True:
        last = step >= end
        if (step % cfg.eval_every == 0 or step == cfg.max_steps) and step != resumed_at and step > 0 and d.main:
            metrics = validate(core, val_loader, item_feat, device, amp, mm)
            for k, v in metrics.items():
                tb.add_scalar(f"val/{k}", v, step)
            if metrics["Score"] > best.get("score", -1.0):
                best.update(score=metrics["Score"], step=step, metrics=metrics)
            info(f"step {step}: val HR@10 {metrics['HR@10']:.4f} NDCG@10 {metrics['NDCG@10']:.4f} "
                 f"Score {metrics['Score']:.4f} | popularity Score {pop['Score']:.4f}")
        if (step % cfg.save_every == 0 or last) and step > 0 and step != resumed_at and d.main:
            path = save_checkpoint(cfg, mcfg, stat, core, optim, step, best, metrics)
            info(f"saved {path}")
        barrier(d)  # the other ranks wait while rank 0 validates and saves
        if last:
            break
        batch = to_device(next(it), device)
        lr = lr_at(step, cfg)
        for g in optim.param_groups:
            g["lr"] = lr * g["lr_scale"]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = train_loss(model, batch, log_q, cfg, step, d)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        # the one sync every step: a non-finite update must never reach AdamW, whose moments it would poison
        # for good (the gradient norm is non-finite whenever any gradient is)
        if not all_true(torch.isfinite(loss.detach() + gnorm), d):
            if cfg.on_nonfinite == "stop":
                last_ckpt = max(Path(cfg.ckpt_dir).glob("global_step*/ckpt.pt"), default=None,
                                key=lambda p: int(p.parent.name[len("global_step"):]))
                raise NonFiniteError(f"step {step + 1}: non-finite loss ({loss.item()}) or gradient norm "
                                     f"({gnorm.item()}); the last good checkpoint is {last_ckpt or 'none'}. "
                                     "Lower --lr, or rerun with --on-nonfinite skip")
            optim.zero_grad(set_to_none=True)
            best["nonfinite_skipped"] = best.get("nonfinite_skipped", 0) + 1
            info(f"step {step + 1}: non-finite loss or gradient norm, step skipped ({best['nonfinite_skipped']} so far)")
        else:
            optim.step()
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == end:
            loss_v, gnorm_v = mean_over_ranks(loss.detach(), d).item(), gnorm.item()
            now = time.time()
            sps = (step - step_last) * cfg.batch_size / max(now - t_last, 1e-9)
            t_last, step_last = now, step
            hard_k, _ = hard_negatives(step, cfg)
            for k, v in {"loss": loss_v, "lr": lr, "grad_norm": gnorm_v, "seqs_per_s": sps,
                         "hard_k": hard_k or 0}.items():
                if tb:
                    tb.add_scalar(f"train/{k}", v, step)
            bar.set_postfix(loss=f"{loss_v:.3f}", seq_s=f"{sps:.0f}")
            log.info(f"step {step} loss {loss_v:.4f} lr {lr:.2e} grad_norm {gnorm_v:.3f} seq/s {sps:.0f}")
    bar.close()
    if tb:
        tb.close()
    if best.get("nonfinite_skipped"):
        info(f"{best['nonfinite_skipped']} steps were skipped for a non-finite loss or gradient norm")
    if best.get("metrics"):
        m = best["metrics"]
        info(f"best validation (step {best['step']}): HR@10 {m['HR@10']:.4f} NDCG@10 {m['NDCG@10']:.4f} "
             f"Score {m['Score']:.4f} | popularity: HR@10 {pop['HR@10']:.4f} NDCG@10 {pop['NDCG@10']:.4f} "
             f"Score {pop['Score']:.4f}")
    return {"step": step, "best": best, "last_metrics": metrics, "model": core}


@exit_on_data_error
def main(argv: list[str] | None = None) -> dict:
    cfg, state = parse_config(argv)
    return train(cfg, state)


if __name__ == "__main__":
    main()
