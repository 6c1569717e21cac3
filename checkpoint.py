"""Checkpoints: writing, finding, loading, pruning, and the folder checks that run before training.

    CKPT_DIR/global_step{N}/  model.pt   weights, model config, feature schema (all that inference needs)
                              ckpt.pt    optimizer, step, best, RNG state, training config (resume; no weights)
                              item_feat.npy, item_raw_id.npy   the item tables of the run (linked from the cache)
                              item_count.npy   events per item in what training read (0: never trained on)
                              config.json
    CKPT_DIR/best.json        {"step": N, "dir": "global_stepN", "metrics": {...}}: the best validation

A folder is written under a temporary name and renamed into place, so a crash never leaves a half-written
global_stepN. Re-saving an existing step renames the old folder aside first and deletes it only once the new
one is in place; a crash in between leaves `.global_stepN.replaced`, which `recover` renames back.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from common import DataError, atomic_save_json, safe_torch_load

PREFIX = "global_step"
ITEM_TABLES = ("item_feat.npy", "item_raw_id.npy")  # from the cache, linked: inference needs them


def step_of(path: Path) -> int | None:
    name = path.name
    return int(name[len(PREFIX):]) if name.startswith(PREFIX) and name[len(PREFIX):].isdigit() else None


def checkpoint_steps(root: Path) -> list[int]:
    """Steps of the complete checkpoints in root, ascending."""
    return sorted(s for p in Path(root).glob(PREFIX + "*") if (s := step_of(p)) is not None and (p / "ckpt.pt").exists())


def _replaced(root: Path, step: int) -> Path:
    return root / f".{PREFIX}{step}.replaced"


def save_checkpoint(root: Path, step: int, model_meta: dict, weights: dict, train_state: dict, cache_dir: Path,
                    config: dict, item_count: np.ndarray) -> Path:
    """Write root/global_step{step}/ atomically (see the module docstring) and return it. item_count: the
    events per item that training read (validation held out): which items the model was trained on."""
    final = root / f"{PREFIX}{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{PREFIX}{step}.", dir=root))
    try:
        torch.save({"model": weights, **model_meta}, tmp / "model.pt")
        torch.save({**train_state, "step": step}, tmp / "ckpt.pt")
        for name in ITEM_TABLES:
            src = cache_dir / name
            try:
                os.link(src, tmp / name)  # same file system: no copy of a catalogue-sized table
            except OSError:
                shutil.copyfile(src, tmp / name)
        np.save(tmp / "item_count.npy", item_count)
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        if final.exists():  # the old folder goes only once the new one is complete
            old = _replaced(root, step)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_best(root: Path, step: int, metrics: dict) -> None:
    atomic_save_json({"step": step, "dir": f"{PREFIX}{step}", "metrics": metrics}, root / "best.json")


def prune_checkpoints(root: Path, keep_last: int, best_step: int | None) -> None:
    """Keep the newest keep_last checkpoints and the best one."""
    steps = checkpoint_steps(root)
    for s in steps[:-keep_last] if keep_last > 0 else steps:
        if s != best_step:
            shutil.rmtree(root / f"{PREFIX}{s}", ignore_errors=True)


def recover(root: Path) -> None:
    """Before training: a folder renamed aside by an interrupted re-save comes back; temp folders of a write
    that was killed (never complete, never resumed from) are removed."""
    for p in Path(root).glob(f".{PREFIX}*.replaced"):
        final = root / p.name[1:-len(".replaced")]
        if final.exists():
            shutil.rmtree(p, ignore_errors=True)
        else:
            os.replace(p, final)
    for p in Path(root).glob(f".{PREFIX}*"):
        if not p.name.endswith(".replaced"):
            shutil.rmtree(p, ignore_errors=True)


def find_checkpoint(resume: str, ckpt_dir: str) -> Path:
    """--resume value -> a ckpt.pt path. 'latest': the highest complete global_stepN in ckpt_dir (or the old
    folder of an interrupted re-save of it, which `recover` will rename back)."""
    if resume == "latest":
        root = Path(ckpt_dir)
        found = {s: root / f"{PREFIX}{s}" for s in checkpoint_steps(root)}
        for p in root.glob(f".{PREFIX}*.replaced"):
            s = step_of(Path(p.name[1:-len(".replaced")]))
            if s is not None and s not in found and (p / "ckpt.pt").exists():
                found[s] = p
        if not found:
            raise DataError(f"{ckpt_dir}: --resume latest found no checkpoint ({PREFIX}N/ckpt.pt)")
        return found[max(found)] / "ckpt.pt"
    path = Path(resume)
    path = path / "ckpt.pt" if path.is_dir() else path
    if not path.exists():
        raise DataError(f"{path}: checkpoint not found")
    return path


def load_checkpoint(path: Path) -> dict:
    """ckpt.pt, with the weights of the model.pt beside it -> the whole training state."""
    state = safe_torch_load(path)  # RNG and data-order state are tensors and plain values
    if not isinstance(state, dict) or not {"train_config", "optimizer", "step"} <= set(state):
        raise DataError(f"{path}: not a training checkpoint (ckpt.pt of this project); model.pt is for inference")
    if "model" not in state:  # weights are stored once, in model.pt
        weights = safe_torch_load(path.parent / "model.pt")
        if not isinstance(weights, dict) or "model" not in weights:
            raise DataError(f"{path.parent / 'model.pt'}: missing or not a model checkpoint (resume needs its weights)")
        state["model"] = weights["model"]
        state.setdefault("model_config", weights.get("model_config"))
    return state


def resolve_model_dir(path: Path) -> Path:
    """A checkpoint folder, or a checkpoints root: then its best checkpoint (best.json), else its newest."""
    if (path / "model.pt").exists():
        return path
    best = path / "best.json"
    if best.exists():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            chosen = path / json.loads(best.read_text())["dir"]
            if (chosen / "model.pt").exists():
                return chosen
    steps = checkpoint_steps(path)
    if steps:
        return path / f"{PREFIX}{steps[-1]}"
    raise DataError(f"{path}: no model.pt: expected a checkpoint folder ({PREFIX}N) or a checkpoints folder holding them")


def train_data_dir(model_dir: Path) -> str | None:
    """The training data folder recorded in a checkpoint's config.json (for its indexer.pkl), if any."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return json.loads((model_dir / "config.json").read_text())["data_dir"]
    return None


def check_fresh(ckpt_dir: str) -> None:
    """A new run never mixes with an earlier run's checkpoints (pruning would delete the new ones, and
    --resume latest or best.json would pick the old): it needs an empty or new folder."""
    steps = checkpoint_steps(Path(ckpt_dir))
    if steps:
        raise DataError(f"{ckpt_dir}: already holds checkpoints of an earlier run ({PREFIX}{steps[-1]} and "
                        f"{len(steps) - 1} more): continue it with --resume latest, or train into another --ckpt-dir "
                        "(TRAIN_CKPT_PATH). Nothing was changed")


def check_writable(*dirs: str) -> None:
    for d in dirs:
        try:
            Path(d).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=d):
                pass
        except OSError as e:
            raise DataError(f"{d}: output folder is not writable ({e.strerror})") from None


def check_space(ckpt_dir: str, model: torch.nn.Module, keep_last: int) -> None:
    """Fail at the start, not hours later, when the checkpoint folder cannot hold the checkpoints kept:
    each is the weights plus AdamW's two moments, in fp32."""
    need = 3 * 4 * sum(p.numel() for p in model.parameters()) * (keep_last + 2)  # + the best + one being written
    free = shutil.disk_usage(ckpt_dir).free
    if free < need:
        raise DataError(f"{ckpt_dir}: {free / 2**30:.1f} GiB free, checkpoints need about {need / 2**30:.1f} GiB "
                        "(--keep-last + 2 of them); free space or lower --keep-last")


def config_json(train_cfg, model_cfg) -> dict:
    return {"train": dataclasses.asdict(train_cfg), "model": model_cfg.to_dict(),
            "data_dir": str(Path(train_cfg.data_dir).resolve())}
