"""Training: one end-to-end stage (eval -> save -> step -> log), exact resume.

    python -u main.py [options]                        # what run.sh calls
    python -u train.py --resume checkpoints/global_stepN/ckpt.pt
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

import checkpoint
from common import DataError, HelpFormatter, env_default, exit_on_data_error, load_stat
from dataset import (WINDOWS, ActivePool, EpochSampler, EvalDataset, FeatureSpec, RankBatches, SeqReader,
                     TrainDataset, collate, split_users, training_item_stats)
from distributed import Dist, all_true, barrier, cleanup, gather_rows, mean_over_ranks, row_counts, setup
from id_update import RowWiseAdamW, step_rows
from loss import (DEFAULT_CURRICULUM, LOG_Q_MODES, NEGATIVES, candidate_columns, curriculum, full_softmax_fits,
                  full_softmax_loss, log_q_from_counts, log_q_uniform, sampled_softmax_loss)
from metrics import popularity_topk, summarise, target_ranks
from mm_emb import MMFeatures, emb_dir_of, ensure_tables, with_mm
from model import PRESETS, HSTUModel, ModelConfig, param_groups
from retrieval import merge_topk, topk_chunked

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
    linear_dim: int = opt(None, "HSTU: per-head width of U and V, the gated output path (0: hidden / heads) "
                          "(default: the preset's)")
    maxlen: int = opt(None, "items per training sequence (default: the preset's)")
    dropout: float = opt(None, "dropout on each layer's residual branch (default: the preset's)")
    id_dropout: float = opt(None, "share of item tokens and candidates whose id embedding is dropped in training, so "
                            "the feature-only path that items never trained on take is trained too (default: the "
                            "preset's)")
    emb_dropout: float = opt(None, "dropout on the item and user towers' concatenated inputs (the embeddings; "
                             "--dropout does not reach them) (default: the preset's)")
    attn_norm: str = opt(None, "HSTU attention divided by the constant N ('n') or by the keys each query sees "
                         "('valid') (default: the preset's)", choices=["n", "valid"])
    rab_time: str = opt(None, "HSTU time bias from the query token's own time ('input') or the time of the item "
                        "it predicts ('target', the HSTU paper's) (default: the preset's)", choices=["input", "target"])
    num_time_buckets: int = opt(None, "log buckets of |dt| for the HSTU time bias (default: the preset's)")
    id_dim: int = opt(None, "width of the item-id embedding (default: the preset's)")
    id_init_std: float = opt(None, "std of the item-id embedding's initialisation, 0 = zeros (default: the preset's)")
    item_feats: bool = opt(None, "item features in the item tower (--no-item-feats: ids and dense inputs only) "
                           "(default: the preset's)")
    exclude_item_feats: tuple[str, ...] = opt(None, "item sparse feature ids the item tower leaves out (111 has one "
                                              "value per item: an id in disguise) (default: the preset's)",
                                              nargs="*", type=str)
    mm_emb_id: tuple[int, ...] = opt((), "multimodal item inputs: creative_emb feature ids, e.g. --mm-emb-id 81 82 "
                                     "(read from DATA_DIR/creative_emb, converted once into tables in --cache-dir); "
                                     "default none", nargs="*", type=int)
    # optimisation
    max_steps: int = opt(None, "length of training in steps; the schedule and curriculum follow it (default: "
                         "130000 for reference; for small, --epochs over the training sequences)")
    epochs: float = opt(None, "length of training in passes over the training sequences (with --window all, "
                        "every run of every history), when --max-steps is not "
                        "given (default: 20 for small, where the run follows the data; reference runs 130000 steps)")
    window: str = opt("auto", "how a history longer than a sequence trains: its 'last' --maxlen + 1 events; "
                      "'all' of them, cut into runs of --maxlen + 1 from the end, each a sequence of the epoch "
                      "(every event trains once an epoch); one 'random' run drawn anew every epoch; 'auto': 'all' "
                      "when the last --maxlen events of each history are under half of the events (get_stat's "
                      "histogram), else 'last'",
                      choices=["auto", *WINDOWS])
    batch_size: int = opt(None, "sequences per step (default: 232 for reference, 64 for small)")
    lr: float = opt(None, "peak learning rate, embeddings get half (default: 1e-3 for reference, 2e-3 for small)")
    weight_decay: float = opt(0.01, "AdamW weight decay (not on embeddings, biases, norms)")
    emb_lr_scale: float = opt(0.5, "learning rate of the embedding tables as a fraction of --lr")
    id_update: str = opt("dense", "item-id table update: 'dense' (its gradient and AdamW over every row, each step) "
                         "or 'rowwise' (only the rows a step looks up: lazy AdamW, no catalogue-sized gradient or "
                         "all-reduce; for catalogues of millions of items, see bench/embedding_grad_results.md)",
                         choices=["dense", "rowwise"])
    schedule: str = opt("cosine", "after warm-up: 'cosine' to --min-lr-ratio x lr at max-steps, or 'constant'",
                        choices=["cosine", "constant"])
    warmup_steps: int = opt(None, "linear warm-up steps (default: 2%% of max-steps)")
    min_lr_ratio: float = opt(0.1, "cosine floor as a fraction of --lr; held after max-steps")
    grad_clip: float = opt(1.0, "gradient-norm clipping")
    # loss
    temperature: float = opt(None, "softmax temperature on cosine similarities (default: 0.01 for reference, "
                             "0.1 for small: a narrow model cannot spread its cosines over a 0.01 scale)")
    log_q_alpha: float = opt(None, "log-q: q proportional to count^alpha; 0 disables it (default: 0.75 for "
                             "--log-q-mode all, 1 for source and mixture, where q is the in-batch sampler itself)")
    log_q_mode: str = opt("mixture", "log-q correction: 'mixture' (every negative by the mixture of both "
                          "samplers), 'source' (each negative by the sampler that drew it: in-batch by q, global by "
                          "1 / pool size), 'all' (the reference's: every logit minus log q, the positive's too), "
                          "'none'",
                          choices=list(LOG_Q_MODES))
    negatives: str = opt("mixed", "negative columns: 'mixed' (global and in-batch), 'in-batch' or 'global'",
                         choices=list(NEGATIVES))
    full_softmax: str = opt("auto", "cross-entropy over every item instead of sampled columns: 'on', 'off', or "
                            "'auto' (on when the catalogue is at most twice the sampled columns and no "
                            "hard-negative curriculum is set; see loss.full_softmax_fits)",
                            choices=["auto", "on", "off"])
    curriculum: str = opt(None, "hard-negative curriculum 'step:k:share,...' for a 130k-step run, scaled to "
                          f"shorter runs; 'none' keeps every negative (default: {DEFAULT_CURRICULUM} for reference, "
                          "none for small, where hard negatives cost time and lowered validation scores)")
    max_candidates: int = opt(0, "sample this many candidate columns per step (half global negatives, half in-batch "
                              "positives), shared by all rows; 0 keeps all 2 x target rows. On a small catalogue "
                              "a few thousand suffice and cut the loss's cost many-fold")
    neg_active_days: float = opt(30.0, "global negatives: items active in the last N days of the data (0: all)")
    # evaluation, checkpoints, logging
    val_users: int = opt(1000, "users validated on their last click/conversion, ranked against every item")
    val_split: str = opt("users", "'users': the validation users are held out of training whole; 'last': every "
                         "user trains without that last item (leave-one-out, as public benchmarks do)",
                         choices=["users", "last"])
    eval_every: int = opt(None, "validate every N steps (default: max-steps / 10)")
    save_every: int = opt(None, "checkpoint every N steps (default: eval-every); a new best is always saved")
    val_item_chunk: int = opt(65536, "items encoded and ranked at once in validation: bounds its memory")
    keep_last: int = opt(3, "checkpoints kept besides the best one")
    log_every: int = opt(20, "log loss/lr/throughput every N steps")
    stop_at: int = opt(None, "end this run at this step with a checkpoint, as if interrupted (resume later)")
    # system
    device: str = opt("auto", "cpu, cuda, cuda:N or auto")
    compile: bool = opt(False, "torch.compile the sequence encoder (static shapes; the first steps compile)")
    amp: str = opt("auto", "bfloat16 autocast: 'on', 'off', or 'auto' (on for CUDA). Under it the full softmax's "
                   "logits matmul runs in bf16 too (its softmax stays fp32). On a CPU with AVX512-BF16 'on' made a "
                   "MovieLens-sized step 1.24x faster (bench/train_step_results.md)", choices=["auto", "on", "off"])
    num_workers: int = opt(None, "data-loading worker processes (default: the CPU cores per local rank - 1, at "
                           "most 8)")
    dist_timeout_min: float = opt(120.0, "torchrun only: minutes a rank waits for the others (rank 0 validates "
                                  "and writes checkpoints alone) before the run fails")
    seed: int = opt(42, "seed for initialisation, data order and negatives")
    resume: str = opt(None, "a ckpt.pt (or its folder) to continue from exactly; 'latest': the newest complete "
                      "checkpoint in --ckpt-dir")
    on_nonfinite: str = opt("stop", "a non-finite loss or gradient norm: 'stop' the run (the last checkpoint stays "
                            "good) or 'skip' the step (no update; counted and logged)", choices=["stop", "skip"])


# options that may differ on resume; everything else comes from the checkpoint
RESUME_OVERRIDES = {"data_dir", "cache_dir", "ckpt_dir", "log_dir", "tf_dir", "max_steps", "eval_every",
                    "save_every", "keep_last", "log_every", "stop_at", "device", "num_workers", "resume",
                    "on_nonfinite", "compile", "dist_timeout_min", "val_item_chunk"}
TRAIN_PRESETS = {"reference": dict(max_steps=130_000, batch_size=232, lr=1e-3, temperature=0.01,
                                   curriculum=DEFAULT_CURRICULUM),
                 "small": dict(epochs=20.0, batch_size=64, lr=2e-3, temperature=0.1, curriculum="none")}
MODEL_OPTIONS = ("model", "hidden", "num_layers", "num_heads", "linear_dim", "maxlen", "dropout", "id_dropout", "emb_dropout",
                 "attn_norm", "rab_time", "num_time_buckets", "id_dim", "id_init_std", "item_feats", "exclude_item_feats")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    for f in fields(TrainConfig):
        # defaults stay out of the namespace (SUPPRESS) so that parse_config sees what was given; --help shows them
        help_text = f.metadata["help"]
        if f.name in MODEL_OPTIONS:  # "the preset's": say what each preset has
            values = {n: getattr(PRESETS[n], f.name) for n in ("small", "reference")}
            text = {n: " ".join(v) if isinstance(v, tuple) else str(v) for n, v in values.items()}
            shown = text["small"] if len(set(text.values())) == 1 else ", ".join(f"{v} for {n}" for n, v in text.items())
            help_text = help_text.replace("the preset's", shown)
        if "default" not in help_text and f.default not in (None, False):
            shown = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
            help_text += f" (default: {shown if shown != '' else 'none'})"
        kw = dict(help=help_text.replace("%", "%%").replace("%%%%", "%%"), default=argparse.SUPPRESS)
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
        path = checkpoint.find_checkpoint(given["resume"], given.get("ckpt_dir", TrainConfig.ckpt_dir))
        given["resume"] = str(path)
        state = checkpoint.load_checkpoint(path)
        # a checkpoint from before --window trained the last events: resuming it under 'auto' could tile
        cfg = TrainConfig(**{"window": "last", **state["train_config"]})
        ignored = sorted(set(given) - RESUME_OVERRIDES)
        if ignored:
            print(f"resume: the checkpoint's settings are kept for {', '.join(ignored)}", file=sys.stderr)
        cfg = dataclasses.replace(cfg, stop_at=None, **{k: v for k, v in given.items() if k in RESUME_OVERRIDES})
    else:
        cfg = TrainConfig(**given)
    return cfg, state


class NonFiniteError(DataError):
    """A non-finite loss or gradient: the run stops with one line (exit code 2), its checkpoints intact."""


def resolve(cfg: TrainConfig, device: torch.device, train_sequences: int | None = None) -> tuple[TrainConfig, ModelConfig]:
    """Fill the defaults that depend on the preset, the machine and the run length. A run sized in epochs gets
    its steps (and the intervals that follow them) once `train_sequences` is known; calling it again with the
    result changes nothing else."""
    preset = cfg.preset if cfg.preset != "auto" else ("reference" if device.type == "cuda" else "small")
    over = {k: getattr(cfg, k) for k in MODEL_OPTIONS if getattr(cfg, k) is not None}
    mcfg = dataclasses.replace(PRESETS[preset], **over)
    t = {k: v for k, v in TRAIN_PRESETS[preset].items() if getattr(cfg, k) is None}
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # processes on this machine (torchrun)
    cfg = dataclasses.replace(cfg, preset=preset, **t, num_workers=cfg.num_workers if cfg.num_workers is not None
                              else min(max((os.cpu_count() or 1) // local_ranks - 1, 0), 8))
    if cfg.max_steps is None and train_sequences is not None:
        cfg = dataclasses.replace(cfg, max_steps=max(math.ceil(cfg.epochs * train_sequences / cfg.batch_size), 1))
    if cfg.max_steps is None:
        return cfg, mcfg  # sized in epochs: the steps follow once the data is read
    eval_every = cfg.eval_every or max(cfg.max_steps // 10, 1)
    return dataclasses.replace(
        cfg, eval_every=eval_every, save_every=cfg.save_every or eval_every,
        warmup_steps=cfg.warmup_steps if cfg.warmup_steps is not None else max(cfg.max_steps // 50, 1)), mcfg


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then constant or cosine to min_lr_ratio·lr at max_steps, then held at that floor."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
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
               step: int, d: Dist = Dist(), log_q_global: torch.Tensor | None = None,
               item_table: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
    """The loss of one (local) batch. log_q (itemnum+1,) of the in-batch sampler, log_q_global that of the
    global negatives (see loss.py); item_table (ids, features, dense rows) of every item: the full-catalogue
    softmax instead of the sampled columns."""
    core = model.module if isinstance(model, DistributedDataParallel) else model
    out = model(batch)  # (B, N, D); through the DDP wrapper, which syncs gradients in backward
    target = batch["next_item"] > 0  # (B, N): positions whose next token is an item
    b, n = target.shape
    row_seq = torch.arange(b, device=out.device)[:, None].expand(b, n)[target]  # (R,)
    pos_ids, neg_ids = batch["next_item"][target], batch["neg_item"][target]  # (R,)
    sizes = row_counts(pos_ids.numel(), out.device, d)  # (W,) target rows of every rank
    if item_table is not None:  # every item a negative: nothing sampled, nothing gathered across ranks
        loss = full_softmax_loss(out[target], pos_ids, core.item_vectors(*item_table), row_seq,
                                 temperature=cfg.temperature)  # item vectors (M+1, D)
    else:
        loss = sampled_loss(core, batch, out, target, row_seq, pos_ids, neg_ids, sizes, log_q, log_q_global, cfg,
                            step, d)
    # DDP averages gradients over ranks: weighting by this rank's share of all rows (times W) makes the
    # average the gradient of the mean over the global batch, as in one process
    return loss * (sizes[d.rank] * d.world / max(sum(sizes), 1)) if d.enabled else loss


def sampled_loss(core: HSTUModel, batch: dict, out: torch.Tensor, target: torch.Tensor, row_seq: torch.Tensor,
                 pos_ids: torch.Tensor, neg_ids: torch.Tensor, sizes: list[int], log_q: torch.Tensor,
                 log_q_global: torch.Tensor | None, cfg: TrainConfig, step: int, d: Dist) -> torch.Tensor:
    """Sampled softmax over in-batch and global columns, gathered from every rank."""
    mm = {k: batch[k][target] if k in batch else None for k in ("next_mm", "neg_mm")}  # (R, sum of mm dims)
    id_rows = batch.get("id_rows")  # --id-update rowwise
    pos = core.item_vectors(pos_ids, batch["next_feat"][target], mm["next_mm"], id_rows)  # (R, D)
    neg = core.item_vectors(neg_ids, batch["neg_feat"][target], mm["neg_mm"], id_rows)  # (R, D)
    hard_k, share = hard_negatives(step, cfg)
    row_seq = row_seq + d.rank * target.shape[0]  # sequence numbers unique across ranks
    gathered = tuple(gather_rows(t, sizes, d) for t in (pos, pos_ids, row_seq, neg, neg_ids)) if d.enabled else None
    # the same columns on every rank and after a resume: drawn from (seed, step), not from a running RNG
    columns = candidate_columns(sum(sizes), cfg.max_candidates or None, out.device,
                                torch.Generator().manual_seed(cfg.seed * 1_000_003 + step))
    return sampled_softmax_loss(out[target], pos, pos_ids, row_seq, neg, neg_ids, log_q, temperature=cfg.temperature,
                                hard_k=hard_k, global_share=share, columns=columns, gathered=gathered,
                                log_q_mode=cfg.log_q_mode, log_q_global=log_q_global, negatives=cfg.negatives)


def in_batch_log_q(cfg: TrainConfig, item_count: np.ndarray) -> torch.Tensor:
    """(itemnum+1,) log q of the in-batch columns' sampler, from the training counts (zeros without log-q)."""
    alpha = cfg.log_q_alpha if cfg.log_q_alpha is not None else (0.75 if cfg.log_q_mode == "all" else 1.0)
    return log_q_from_counts(item_count, alpha) if alpha > 0 else torch.zeros(len(item_count))


def use_full_softmax(cfg: TrainConfig, mcfg: ModelConfig, itemnum: int) -> bool:
    """--full-softmax: decided once per run from the batch's capacity (not per batch), so a resumed run
    trains the same loss."""
    if cfg.full_softmax != "auto":
        return cfg.full_softmax == "on"
    return (cfg.curriculum == "none" and cfg.id_update == "dense"
            and full_softmax_fits(itemnum, cfg.batch_size * (mcfg.maxlen + 1), cfg.max_candidates or None))


def item_table(item_feat: np.ndarray, trained: np.ndarray, mm: MMFeatures | None, device: torch.device) -> tuple:
    """(ids, features, dense rows) of items 0..itemnum on the device, for the full softmax's item tower; an
    item without training events enters by its features (id 0), as validation and inference encode it."""
    ids = torch.from_numpy(np.where(trained, np.arange(len(item_feat)), 0)).to(device)
    feats = torch.from_numpy(np.asarray(item_feat, dtype=np.int64)).to(device)
    rows = torch.from_numpy(mm.range(0, len(item_feat))).to(device) if mm is not None else None
    return ids, feats, rows


# --------------------------------------------------------------------------- validation

@torch.no_grad()
def item_vector_chunks(model: HSTUModel, item_feat: np.ndarray, trained: np.ndarray, device: torch.device,
                       chunk: int, mm: MMFeatures | None = None, amp: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
    """(first item re-id, (n, D) float32 vectors) for items 1..itemnum, chunk by chunk, encoded under bf16
    autocast with `amp`. An item the run never trained on is encoded as a cold item is at inference: id 0
    and its features."""
    if mm is not None:  # dense rows are wide: keep a chunk's rows near 256 MB
        chunk = max(1, min(chunk, (256 << 20) // (4 * mm.dim)))
    for s in range(1, len(item_feat), chunk):
        e = min(s + chunk, len(item_feat))
        ids = torch.from_numpy(np.where(trained[s:e], np.arange(s, e), 0)).to(device)
        feats = torch.from_numpy(np.asarray(item_feat[s:e], dtype=np.int64)).to(device)
        rows = torch.from_numpy(mm.range(s, e)).to(device) if mm is not None else None  # (n, sum of mm dims)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            vecs = model.item_vectors(ids, feats, rows)
        yield s, vecs.float()


@torch.no_grad()
def validate(model: HSTUModel, loader: DataLoader, item_feat: np.ndarray, trained: np.ndarray, device: torch.device,
             amp: bool, mm: MMFeatures | None = None, item_chunk: int = 65536, k: int = 10) -> dict[str, float]:
    """Every item ranked for the validation users, their history filtered out. Items are encoded and merged
    into a running top-k chunk by chunk, so no more than one chunk of item vectors exists at once."""
    was_training = model.training
    model.eval()
    users, history, targets = [], [], []
    for batch in loader:
        batch = to_device(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            users.append(model.user_vectors(batch).float())  # scores in fp32: bf16 ties would rank arbitrarily
        history.append(batch["history"])
        targets.append(batch["target"].cpu().numpy())
    u = torch.cat(users)  # (U, D)
    width = max(h.shape[1] for h in history)
    hist = torch.cat([torch.nn.functional.pad(h, (0, width - h.shape[1])) for h in history])  # (U, H) re-ids, 0 pad
    best_s = torch.full((len(u), k), float("-inf"), device=device)
    best_i = torch.full((len(u), k), -1, dtype=torch.long, device=device)
    chunks = item_vector_chunks(model, item_feat, trained, device, item_chunk, mm, amp)
    for start, vecs in chunks:  # scored outside autocast: bf16 scores would tie and reorder neighbours
        local = hist - start  # positions within this chunk; anything outside it is no exclusion
        exclude = torch.where((hist > 0) & (local >= 0) & (local < len(vecs)), local, -1)
        s, i = topk_chunked(u, vecs, k, exclude)
        best_s, best_i = merge_topk(best_s, best_i, s, torch.where(i >= 0, i + start, -1))
    model.train(was_training)
    target = np.concatenate(targets)
    keep = target > 0  # users without a click or conversion to hold out are not validated
    return summarise(target_ranks(best_i.cpu().numpy()[keep], target[keep]), (k,))


def popularity_baseline(val: EvalDataset, counts: np.ndarray, k: int = 10) -> dict[str, float]:
    """The most-popular items by training counts (no validation target among them), history filtered."""
    samples = [val[i] for i in range(len(val))]
    samples = [s for s in samples if s["target"] > 0]
    items = np.arange(1, len(counts))
    tops = popularity_topk(items, counts[1:], [s["history"] for s in samples], k)
    return summarise(target_ranks(tops, np.array([s["target"] for s in samples], np.int64)), (k,))


# --------------------------------------------------------------------------- setting up a run

@dataclass
class RunData:
    """What a run reads: statistics, tables, datasets, and the training-only item counts."""
    stat: dict
    mcfg: ModelConfig
    mm: MMFeatures | None
    item_feat: np.ndarray  # (itemnum+1, Fi) memmap
    item_count: np.ndarray  # (itemnum+1,) events in what training reads (validation held out)
    train_ds: TrainDataset
    val_ds: EvalDataset
    full_softmax: bool = False  # the loss: every item a negative (see use_full_softmax)


def load_data(cfg: TrainConfig, mcfg: ModelConfig) -> RunData:
    stat = load_stat(cfg.cache_dir)
    cache, data = Path(cfg.cache_dir), Path(cfg.data_dir)
    spec = FeatureSpec.from_stat(stat)
    mcfg, mm = multimodal(cfg, mcfg, data, cache)
    reader = SeqReader(data / "seq.jsonl", data / "seq_offsets.pkl")
    item_feat = np.load(cache / "item_feat.npy", mmap_mode="r")
    train_lines, val_lines = split_users(len(reader), cfg.val_users, cfg.seed, cfg.val_split)
    # held-out validation events feed neither log-q nor the negative pool: counts of what training reads
    item_count, item_last_ts, lengths = training_item_stats(
        reader, np.load(cache / "item_count.npy"), np.load(cache / "item_last_ts.npy"),
        line_lengths(cache / "line_len.npy", len(reader)), val_lines, cfg.val_split)
    pool = ActivePool(item_count, item_last_ts, cfg.neg_active_days)
    window = pick_window(cfg.window, stat.get("seq_len"), mcfg.maxlen)
    if window == "all" and lengths is None:
        raise DataError(f"{cache / 'line_len.npy'}: missing (a cache from an older get_stat.py), and --window all "
                        "needs it: run get_stat.py again")
    train_ds = TrainDataset(reader, train_lines, item_feat, spec, pool, mcfg.maxlen, cfg.seed,
                            holdout_last=cfg.val_split == "last", window=window,
                            lengths=lengths[train_lines] if window == "all" else None)
    val_ds = EvalDataset(reader, val_lines, item_feat, np.load(cache / "item_raw_id.npy"), spec, mcfg.maxlen,
                         holdout_last=True, trained=item_count > 0)
    full = use_full_softmax(cfg, mcfg, stat["itemnum"])
    if full and (cfg.curriculum != "none" or cfg.id_update != "dense"):
        raise DataError("--full-softmax on scores every item: it takes neither a hard-negative curriculum "
                        "(--curriculum none) nor --id-update rowwise (every row gets a gradient anyway)")
    info("loss: full-catalogue softmax" if full else
         f"loss: sampled softmax, log-q {cfg.log_q_mode}, negatives {cfg.negatives}")
    return RunData(stat, mcfg, mm, item_feat, item_count, train_ds, val_ds, full)


def line_lengths(path: Path, num_lines: int) -> np.ndarray | None:
    """get_stat's items per line (a memmap), None for a cache written before it kept them."""
    if not path.exists():
        return None
    lengths = np.load(path, mmap_mode="r")
    if len(lengths) != num_lines:
        raise DataError(f"{path}: {len(lengths)} lines where seq.jsonl has {num_lines}: run get_stat.py again")
    return lengths


def events_kept(seq_len: dict | None, maxlen: int) -> float | None:
    """Share of the events that the last `maxlen` of each history hold (get_stat's histogram of events per
    user); None for a cache written before the histogram was kept."""
    if not seq_len or "hist" not in seq_len:
        return None
    hist = np.asarray(seq_len["hist"], np.int64)
    events = np.arange(len(hist))
    return float(np.minimum(events, maxlen) @ hist / max(int(events @ hist), 1))


def pick_window(window: str, seq_len: dict | None, maxlen: int) -> str:
    """--window auto: 'all' when the last maxlen events hold under half of the events, else 'last'."""
    if window != "auto":
        return window
    kept = events_kept(seq_len, maxlen)
    return "all" if kept is not None and kept < 0.5 else "last"


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


def train_loader(cfg: TrainConfig, run: RunData, step: int, d: Dist, device: torch.device) -> DataLoader:
    """Batches from `step` on: each step consumes exactly batch_size samples, so the data position is a
    function of the step. The loader's own generator: iter() would otherwise draw from the global RNG that
    drives dropout, and a resumed run (which creates its iterator after restoring that RNG) would drift."""
    n = len(run.train_ds)
    sampler = EpochSampler(n, cfg.seed, *divmod(step * cfg.batch_size, n))
    local_batch = cfg.batch_size // d.world
    if d.enabled:
        sampler = RankBatches(sampler, local_batch, d.rank, d.world)
    return DataLoader(with_mm(run.train_ds, run.mm), batch_size=local_batch, sampler=sampler, collate_fn=collate,
                      num_workers=cfg.num_workers, pin_memory=device.type == "cuda", drop_last=True,
                      persistent_workers=cfg.num_workers > 0, prefetch_factor=4 if cfg.num_workers else None,
                      generator=torch.Generator())


@dataclass
class Optimizers:
    """AdamW over the parameters; with --id-update rowwise the id table is left out of it (no dense gradient)
    and updated by `id_rows` instead."""
    adamw: torch.optim.AdamW
    id_rows: RowWiseAdamW | None = None


def build_model(cfg: TrainConfig, run: RunData, device: torch.device) -> tuple[HSTUModel, Optimizers]:
    model = HSTUModel(run.mcfg, run.stat["schema"], run.stat["itemnum"]).to(device)
    id_rows = None
    if cfg.id_update == "rowwise":
        model.item_tower.id_emb.weight.requires_grad_(False)  # out of AdamW, DDP and autograd
        id_rows = RowWiseAdamW(model.item_tower.id_emb.weight, betas=(0.9, 0.98))
    groups = param_groups(model, cfg.lr, cfg.weight_decay, cfg.emb_lr_scale)
    for g in groups:
        g["lr_scale"] = g["lr"] / cfg.lr
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), fused=device.type == "cuda")
    return model, Optimizers(adamw, id_rows)


def restore(state: dict, model: HSTUModel, optim: Optimizers, device: torch.device) -> tuple[int, dict]:
    """A checkpoint's weights, optimizer and RNG state -> (step, best)."""
    model.load_state_dict(state["model"])
    optim.adamw.load_state_dict(state["optimizer"])
    if optim.id_rows is not None:
        optim.id_rows.load_state_dict(state["id_optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], state["best"]


def save(cfg: TrainConfig, run: RunData, model: HSTUModel, optim: Optimizers, step: int, best: dict,
         metrics: dict | None) -> Path:
    """global_step{step}/ (see checkpoint.py): weights once, in model.pt; then best.json and pruning."""
    root = Path(cfg.ckpt_dir)
    meta = {"model_config": run.mcfg.to_dict(), "step": step, "metrics": metrics,
            "stat": {k: run.stat[k] for k in ("itemnum", "schema", "user_array_maxlen")}}
    state = {"optimizer": optim.adamw.state_dict(), "best": best, "train_config": dataclasses.asdict(cfg),
             "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if optim.id_rows is not None:
        state["id_optimizer"] = optim.id_rows.state_dict()
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    path = checkpoint.save_checkpoint(root, step, meta, weights, state, Path(cfg.cache_dir),
                                      checkpoint.config_json(cfg, run.mcfg), run.item_count)
    if best.get("step") is not None:
        checkpoint.save_best(root, best["step"], best["metrics"])
    checkpoint.prune_checkpoints(root, cfg.keep_last, best.get("step"))
    return path


# --------------------------------------------------------------------------- the loop

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


def optimise(model, optim: Optimizers, batch: dict, loss_inputs: tuple, cfg: TrainConfig, step: int,
             d: Dist, amp: bool, best: dict) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One step: lr from the schedule, loss, backward, clipping, and the update unless anything is non-finite.
    loss_inputs: train_loss's (log_q, log_q_global, item_table).
    -> (loss, grad norm, lr) as tensors still on the device (no sync but the finiteness check)."""
    lr = lr_at(step, cfg)
    for g in optim.adamw.param_groups:
        g["lr"] = lr * g["lr_scale"]
    optim.adamw.zero_grad(set_to_none=True)  # before the forward: the last step's gradients are not held through it
    table = optim.id_rows.weight if optim.id_rows is not None else None
    if table is not None:  # a leaf of the step's rows collects the id table's gradient
        uniq = step_rows(batch, len(table) - 1, d)
        rows = table.index_select(0, uniq.clamp(max=len(table) - 1)).requires_grad_()
        batch = {**batch, "id_rows": (uniq, rows)}
    with torch.autocast(batch["seq_type"].device.type, dtype=torch.bfloat16, enabled=amp):
        loss = train_loss(model, batch, loss_inputs[0], cfg, step, d, *loss_inputs[1:])
    loss.backward()
    if table is not None:
        rows.grad = mean_over_ranks(rows.grad, d)  # what DDP does for the parameters
    params = [*model.parameters(), *([rows] if table is not None else [])]
    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    # the one sync every step: a non-finite update must never reach AdamW, whose moments it would poison
    # for good (the gradient norm is non-finite whenever any gradient is)
    if all_true(torch.isfinite(loss.detach() + gnorm), d):
        optim.adamw.step()
        if table is not None:
            real = (uniq > 0) & (uniq < len(table))  # not the padding row, not the filler ids
            optim.id_rows.step(uniq[real], rows.grad[real], lr * cfg.emb_lr_scale)
        return loss, gnorm, lr
    if cfg.on_nonfinite == "stop":
        steps = checkpoint.checkpoint_steps(Path(cfg.ckpt_dir))
        last = Path(cfg.ckpt_dir) / f"global_step{steps[-1]}" if steps else "none"
        raise NonFiniteError(f"step {step + 1}: non-finite loss ({loss.item()}) or gradient norm ({gnorm.item()}); "
                             f"the last good checkpoint is {last}. Lower --lr, or rerun with --on-nonfinite skip")
    optim.adamw.zero_grad(set_to_none=True)
    best["nonfinite_skipped"] = best.get("nonfinite_skipped", 0) + 1
    info(f"step {step + 1}: non-finite loss or gradient norm, step skipped ({best['nonfinite_skipped']} so far)")
    return loss, gnorm, lr


def evaluate_step(cfg: TrainConfig, run: RunData, core: HSTUModel, val_loader: DataLoader, device: torch.device,
                  amp: bool, step: int, best: dict, tb) -> tuple[dict, bool]:
    """Validation at `step` -> (metrics, whether it is the best so far)."""
    metrics = validate(core, val_loader, run.item_feat, run.item_count > 0, device, amp, run.mm, cfg.val_item_chunk)
    for k, v in metrics.items():
        tb.add_scalar(f"val/{k}", v, step)
    is_best = metrics["Score"] > best.get("score", -1.0)
    if is_best:
        best.update(score=metrics["Score"], step=step, metrics=metrics)
    pop = best["popularity"]
    info(f"step {step}: val HR@10 {metrics['HR@10']:.4f} NDCG@10 {metrics['NDCG@10']:.4f} "
         f"Score {metrics['Score']:.4f} | popularity Score {pop['Score']:.4f}")
    return metrics, is_best


def fit(cfg: TrainConfig, run: RunData, model, core: HSTUModel, optim: Optimizers, step: int, best: dict,
        resumed: bool, d: Dist, device: torch.device) -> tuple[int, dict | None]:
    """eval -> save -> step -> log, from `step` to the end (or --stop-at) -> (the last step, its validation)."""
    amp = cfg.amp == "on" or (cfg.amp == "auto" and device.type == "cuda")
    log_q = in_batch_log_q(cfg, run.item_count).to(device)
    log_q_global = log_q_uniform(run.train_ds.pool.items, len(run.item_count)).to(device)  # the global sampler's
    table = item_table(run.item_feat, run.item_count > 0, run.mm, device) if run.full_softmax else None
    val_loader = DataLoader(with_mm(run.val_ds, run.mm), batch_size=256, collate_fn=collate,
                            num_workers=min(cfg.num_workers, 2), generator=torch.Generator())
    from torch.utils.tensorboard import SummaryWriter
    tb = SummaryWriter(cfg.tf_dir) if d.main else None
    end = min(cfg.max_steps, cfg.stop_at) if cfg.stop_at is not None else cfg.max_steps
    it = iter(train_loader(cfg, run, step, d, device))
    bar = tqdm(total=end, initial=step, desc="train", dynamic_ncols=True, mininterval=1.0, disable=not d.main)
    t_last, step_last, metrics, first = time.time(), step, None, step
    while True:
        fresh = step > 0 and not (resumed and step == first)  # the resumed step was validated and saved already
        is_best = False
        if fresh and d.main and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            metrics, is_best = evaluate_step(cfg, run, core, val_loader, device, amp, step, best, tb)
        if fresh and d.main and (step % cfg.save_every == 0 or step >= end or is_best):
            info(f"saved {save(cfg, run, core, optim, step, best, metrics)}")
        barrier(d)  # the other ranks wait while rank 0 validates and saves
        if step >= end:
            break
        loss, gnorm, lr = optimise(model, optim, to_device(next(it), device), (log_q, log_q_global, table), cfg, step,
                                   d, amp, best)
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == end:
            loss_v, gnorm_v = mean_over_ranks(loss.detach(), d).item(), gnorm.item()
            now = time.time()
            sps = (step - step_last) * cfg.batch_size / max(now - t_last, 1e-9)
            t_last, step_last = now, step
            for k, v in {"loss": loss_v, "lr": lr, "grad_norm": gnorm_v, "seqs_per_s": sps,
                         "hard_k": hard_negatives(step, cfg)[0] or 0}.items():
                if tb:
                    tb.add_scalar(f"train/{k}", v, step)
            bar.set_postfix(loss=f"{loss_v:.3f}", seq_s=f"{sps:.0f}")
            log.info(f"step {step} loss {loss_v:.4f} lr {lr:.2e} grad_norm {gnorm_v:.3f} seq/s {sps:.0f}")
    bar.close()
    if tb:
        tb.close()
    return step, metrics


def prepare_outputs(cfg: TrainConfig, d: Dist, resuming: bool) -> None:
    """Rank 0: writable folders, train.log, and a checkpoint folder this run may write into."""
    if not d.main:
        return
    checkpoint.check_writable(cfg.ckpt_dir, cfg.log_dir, cfg.tf_dir)
    setup_logging(cfg)
    checkpoint.recover(Path(cfg.ckpt_dir))
    if not resuming:
        checkpoint.check_fresh(cfg.ckpt_dir)


def train(cfg: TrainConfig, state: dict | None = None) -> dict:
    global _MAIN
    d, device = setup(cfg.device, cfg.dist_timeout_min)
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
    prepare_outputs(cfg, d, state is not None)
    torch.manual_seed(cfg.seed)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # leave a core to each loader worker: oversubscribed OpenMP threads spin and slow steps down many-fold
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // d.world - cfg.num_workers))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run = load_data(cfg, mcfg)
    cfg = dataclasses.replace(cfg, window=run.train_ds.window)  # 'auto' decided: checkpoints keep the choice
    cfg, _ = resolve(cfg, device, len(run.train_ds))  # a run sized in epochs gets its steps
    model, optim = build_model(cfg, run, device)
    if d.main:
        checkpoint.check_space(cfg.ckpt_dir, model, cfg.keep_last)
    step, best = restore(state, model, optim, device) if state is not None else (0, {})
    if state is not None:
        info(f"resumed from {cfg.resume} at step {step}")
    core = model  # what validation and checkpoints use; `model` may become compiled and DDP-wrapped
    if cfg.compile:
        model = torch.compile(model, dynamic=False)  # batches have one shape (drop_last, fixed N)
    if d.enabled:
        # gradients live in DDP's buckets instead of beside them: one copy of them, not two
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        gradient_as_bucket_view=True)
    info(f"{run.mcfg.model} preset={cfg.preset} params={sum(p.numel() for p in core.parameters()) / 1e6:.2f}M "
         f"device={device} ranks={d.world} train_users={len(run.train_ds.lines)} val_users={len(run.val_ds)} "
         f"window={cfg.window} train_sequences={len(run.train_ds)} "
         f"steps={cfg.max_steps} ({cfg.max_steps * cfg.batch_size / max(len(run.train_ds), 1):.1f} epochs) "
         f"batch={cfg.batch_size}")
    hint = history_hint(run.stat.get("seq_len"), run.mcfg.maxlen, cfg.window)
    if hint:
        info(hint)
    if not best.get("popularity") and d.main:
        best["popularity"] = popularity_baseline(run.val_ds, run.item_count)
    step, metrics = fit(cfg, run, model, core, optim, step, best, state is not None, d, device)
    summary(best)
    return {"step": step, "best": best, "last_metrics": metrics, "model": core}


def history_hint(seq_len: dict | None, maxlen: int, window: str) -> str | None:
    """A line for a run whose sequences hold under half of the events (get_stat's histogram of events per
    user), since the defaults are sized for short histories: what `window` does with the rest. Measured on
    MovieLens-1M (27% at maxlen 50): 'all' reached 92% of the tuned profile's Score, 'last' 81%."""
    kept = events_kept(seq_len, maxlen)
    if kept is None or kept >= 0.5:
        return None
    where = (f"note: the last {maxlen} events of each history (--maxlen) are {kept:.0%} of the events (half the "
             f"users have more than {seq_len['p50']:.0f}, mean {seq_len['mean']:.0f}, max {seq_len['max']})")
    if window == "all":
        return f"{where}: each history trains as runs of {maxlen + 1} (--window all), every event once an epoch"
    return (f"{where}. --window all (what --window auto picks here) trains every event, each history cut into "
            f"runs of {maxlen + 1}: on MovieLens-1M (27%) it reached 92% of the tuned profile's Score, the last "
            f"events 81% (BENCHMARKS.md)")


def summary(best: dict) -> None:
    if best.get("nonfinite_skipped"):
        info(f"{best['nonfinite_skipped']} steps were skipped for a non-finite loss or gradient norm")
    if best.get("metrics"):
        m, pop = best["metrics"], best["popularity"]
        info(f"best validation (step {best['step']}): HR@10 {m['HR@10']:.4f} NDCG@10 {m['NDCG@10']:.4f} "
             f"Score {m['Score']:.4f} | popularity: HR@10 {pop['HR@10']:.4f} NDCG@10 {pop['NDCG@10']:.4f} "
             f"Score {pop['Score']:.4f}")


@exit_on_data_error
def main(argv: list[str] | None = None) -> dict:
    cfg, state = parse_config(argv)
    return train(cfg, state)


if __name__ == "__main__":
    main()
