"""Inference: the top-K candidates for every test user, from one checkpoint folder and the eval data.

    python infer.py --model-dir checkpoints/global_stepN [--eval-dir ./eval] [--result-dir ./results] [--topk 10]
    ./infer.sh checkpoints/global_stepN [TOPK]        # the same, then evaluate.py when ground truth exists

Reads EVAL_DIR/predict_seq.jsonl (+ predict_seq_offsets.pkl), user_action_type.json and, if present,
predict_set.jsonl (the candidates; without it every training item is a candidate). User vectors take each
user's target action type as the condition; exact top-K by chunked matrix product; items already in the
user's history are skipped unless --keep-history. Writes RESULT_DIR/result.json
({"top10s": [[creative ids]], "user": [raw user ids]}, aligned, in predict_seq order, whatever K is) and
RESULT_DIR/results.csv (user, rank, creative_id, score), both atomically.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from common import DataError, atomic_write, data_error, env_default, exit_on_data_error
from dataset import EvalDataset, FeatureSpec, SeqReader, collate
from model import HSTUModel, ModelConfig
from retrieval import topk_chunked

Tensor = torch.Tensor


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=env_default("MODEL_OUTPUT_PATH", ""),
                   help="checkpoint folder checkpoints/global_stepN (env MODEL_OUTPUT_PATH)")
    p.add_argument("--eval-dir", default=env_default("EVAL_DATA_PATH", "./eval"),
                   help="evaluation data folder (env EVAL_DATA_PATH, default ./eval)")
    p.add_argument("--result-dir", default=env_default("EVAL_RESULT_PATH", "./results"),
                   help="where result.json and results.csv go (env EVAL_RESULT_PATH, default ./results)")
    p.add_argument("--topk", type=int, default=10, help="items per user (default 10; the key stays 'top10s')")
    p.add_argument("--keep-history", action="store_true", help="do not filter out items already in the history")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=256, help="users per batch (default 256)")
    p.add_argument("--item-chunk", type=int, default=65536, help="candidates scored at once: bounds memory (default 65536)")
    p.add_argument("--set-chunk", type=int, default=65536, help="predict_set lines parsed and encoded at once (default 65536)")
    p.add_argument("--num-workers", type=int, default=min(4, max((os.cpu_count() or 1) - 1, 0)),
                   help="processes reading predict_seq (default: min(4, CPUs - 1))")
    return p


def load_model(model_dir: Path, device: torch.device) -> tuple[HSTUModel, FeatureSpec, np.ndarray, np.ndarray]:
    """-> (model in eval mode, feature spec, item_feat (itemnum+1, Fi), item_raw_id (itemnum+1,)) from the folder."""
    path = model_dir / "model.pt"
    if not path.exists():
        raise data_error(path, None, "not found: expected a checkpoint folder checkpoints/global_stepN/")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    cfg, stat = ModelConfig.from_dict(ck["model_config"]), ck["stat"]
    if cfg.mm_dims:
        raise data_error(path, None, "the model takes multimodal item inputs (mm_dims); inference does not provide them")
    spec = FeatureSpec.from_stat(stat)
    model = HSTUModel(cfg, stat["schema"], stat["itemnum"])
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:  # a checkpoint from another version of model.py
        raise data_error(path, None, "weights do not match this model.py: " + " ".join(str(e).split())[:300]) from None
    item_feat = np.load(model_dir / "item_feat.npy", mmap_mode="r")  # a catalogue-sized table: not read into memory
    item_raw_id = np.load(model_dir / "item_raw_id.npy")
    n = spec.itemnum + 1
    if item_feat.shape != (n, spec.item_cols) or item_raw_id.shape != (n,):
        raise data_error(model_dir, None, f"item_feat.npy {item_feat.shape} / item_raw_id.npy {item_raw_id.shape} "
                         f"do not match the model ({n} rows, {spec.item_cols} feature columns)")
    return model.to(device).eval(), spec, item_feat, item_raw_id


class RawIds:
    """Raw creative id -> re-id by binary search on a sorted copy: no Python dict of the catalogue."""

    def __init__(self, item_raw_id: np.ndarray):
        self.order = np.argsort(item_raw_id, kind="stable")  # (I+1,)
        self.sorted = item_raw_id[self.order]

    def reid(self, raw: np.ndarray) -> np.ndarray:
        """(n,) raw ids -> (n,) re-ids, 0 where the id is not a training item."""
        p = np.minimum(np.searchsorted(self.sorted, raw), len(self.sorted) - 1)
        return np.where((self.sorted[p] == raw) & (raw > 0), self.order[p], 0)


def iter_predict_set(path: Path, chunk: int) -> Iterator[tuple[np.ndarray, list[dict]]]:
    """Stream predict_set.jsonl -> (creative ids (n,) int64, feature dicts) per `chunk` lines, each line validated."""
    what = 'expected {"creative_id": int, "retrieval_id": int, "features": {fid: value}}'
    cids, feats = [], []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue  # blank lines (a trailing newline) carry nothing
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise data_error(path, lineno, f"invalid JSON ({e}); {what}") from None
            if not isinstance(obj, dict):
                raise data_error(path, lineno, what)
            cid, fe, rid = obj.get("creative_id"), obj.get("features") or {}, obj.get("retrieval_id", 0)
            if type(cid) is not int or cid <= 0:
                raise data_error(path, lineno, f"creative_id must be a positive int, got {cid!r}")
            if type(rid) is not int or not isinstance(fe, dict):
                raise data_error(path, lineno, what)
            cids.append(cid)
            feats.append(fe)
            if len(cids) == chunk:
                yield np.array(cids, np.int64), feats
                cids, feats = [], []
    if cids:
        yield np.array(cids, np.int64), feats


@torch.no_grad()
def encode_items(model: HSTUModel, ids: np.ndarray, feats: np.ndarray, device: torch.device) -> Tensor:
    """(n,) re-ids (0 = cold), (n, Fi) feature ids -> (n, D) float32 candidate vectors."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        v = model.item_vectors(torch.from_numpy(ids).to(device), torch.from_numpy(feats).to(device))
    return v.float()


def load_candidates(model: HSTUModel, eval_dir: Path, spec: FeatureSpec, item_feat: np.ndarray,
                    item_raw_id: np.ndarray, device: torch.device, chunk: int) -> tuple[np.ndarray, Tensor]:
    """-> (creative ids (M,), vectors (M, D)). A training item (its raw id is in item_raw_id) gets its id
    embedding and its training features, as the model saw it; a cold item gets id 0 and its own features,
    with unseen or string values as padding. Duplicate creative ids keep their first line."""
    path = eval_dir / "predict_set.jsonl"
    cids, vecs = [], []
    if path.exists():
        index = RawIds(item_raw_id)
        for c, fe in iter_predict_set(path, chunk):
            reid = index.reid(c)  # (n,)
            feats = np.asarray(item_feat[reid], dtype=np.int64)  # (n, Fi); row 0 is all padding
            for j in np.flatnonzero(reid == 0):
                feats[j] = spec.item_features(fe[j])
            cids.append(c)
            vecs.append(encode_items(model, reid, feats, device))
    else:
        print(f"infer: no {path.name} in {eval_dir}: every training item is a candidate", file=sys.stderr)
        reids = np.flatnonzero(item_raw_id > 0)  # items without a raw id could not be reported
        for s in range(0, len(reids), chunk):
            r = reids[s:s + chunk]
            cids.append(item_raw_id[r])
            vecs.append(encode_items(model, r, np.asarray(item_feat[r], dtype=np.int64), device))
    if not cids:
        raise data_error(path, None, "no candidates")
    all_c, all_v = np.concatenate(cids), torch.cat(vecs)
    _, first = np.unique(all_c, return_index=True)
    if len(first) < len(all_c):
        print(f"infer: warning: {len(all_c) - len(first)} duplicate creative ids in {path.name}; "
              "the first line of each is used", file=sys.stderr)
        keep = np.sort(first)
        all_c, all_v = all_c[keep], all_v[torch.from_numpy(keep).to(all_v.device)]
    return all_c, all_v


def load_target_actions(path: Path) -> dict[str, int]:
    """user_action_type.json: {"raw user id": 1 (click) or 2 (conversion)}."""
    if not path.exists():
        return {}  # every user is then counted in main's warning
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise data_error(path, None, f"invalid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise data_error(path, None, 'expected {"raw user id": 1 or 2}')
    for user, a in obj.items():
        if a not in (1, 2) or type(a) is not int:
            raise data_error(path, None, f"user {user!r}: action type must be 1 (click) or 2 (conversion), got {a!r}")
    return obj


def history_positions(history_raw: Tensor, cand_order: np.ndarray, cand_sorted: np.ndarray) -> Tensor:
    """(B, H) raw creative ids (0 = padding) -> (B, H) candidate positions, -1 where not a candidate."""
    h = history_raw.numpy()
    p = np.minimum(np.searchsorted(cand_sorted, h), len(cand_sorted) - 1)
    return torch.from_numpy(np.where((cand_sorted[p] == h) & (h > 0), cand_order[p], -1))


def _one_line(e: DataError) -> DataError:
    """A DataError raised in a loader worker comes back with the worker's traceback: keep its last line."""
    last = str(e).strip().splitlines()[-1]
    return DataError(last.split("DataError: ", 1)[-1])


@exit_on_data_error
def main(argv: list[str] | None = None) -> dict:
    """Run inference; returns {"users": n, "result": path, "csv": path, "missing_action": n}."""
    args = build_parser().parse_args(argv)
    if not args.model_dir:
        build_parser().error("--model-dir is required (or set MODEL_OUTPUT_PATH)")
    if args.topk < 1:
        build_parser().error("--topk must be >= 1")
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    eval_dir, result_dir = Path(args.eval_dir), Path(args.result_dir)
    model, spec, item_feat, item_raw_id = load_model(Path(args.model_dir), device)
    cids, cand = load_candidates(model, eval_dir, spec, item_feat, item_raw_id, device, args.set_chunk)
    cand_order = np.argsort(cids, kind="stable")
    cand_sorted = cids[cand_order]

    actions = load_target_actions(eval_dir / "user_action_type.json")
    reader = SeqReader(eval_dir / "predict_seq.jsonl", eval_dir / "predict_seq_offsets.pkl")
    data = EvalDataset(reader, np.arange(len(reader)), item_feat, item_raw_id, spec, model.cfg.maxlen,
                       target_action=actions)
    loader = DataLoader(data, batch_size=args.batch_size, collate_fn=collate, num_workers=args.num_workers)
    print(f"infer: {len(data)} users, {len(cids)} candidates, top-{args.topk}, device {device}", file=sys.stderr)

    users, missing = [], 0
    with contextlib.ExitStack() as stack:
        fj = stack.enter_context(atomic_write(result_dir / "result.json", "w"))
        fc = stack.enter_context(atomic_write(result_dir / "results.csv", "w"))
        table = csv.writer(fc, lineterminator="\n")
        table.writerow(["user", "rank", "creative_id", "score"])
        fj.write('{"top10s": [')  # rows are streamed; the user list follows them
        bar = tqdm(total=len(data), unit="user", desc="infer", dynamic_ncols=True, mininterval=1.0)
        try:
            for batch in loader:
                uid = batch["user_id"]  # raw user ids, str
                missing += sum(u not in actions for u in uid)
                exclude = None if args.keep_history else history_positions(batch["history_raw"], cand_order,
                                                                            cand_sorted).to(device)
                batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v) and not k.startswith("history")}
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    u = model.user_vectors(batch)
                # float32 scores outside autocast: bf16 scores would tie neighbouring candidates
                scores, pos = topk_chunked(u.float(), cand, args.topk, exclude, item_chunk=args.item_chunk)
                scores, pos = scores.cpu().numpy(), pos.cpu().numpy()  # (B, K)
                for i, user in enumerate(uid):
                    ok = pos[i] >= 0  # fewer than K remain only when the candidates run out
                    top = cids[pos[i][ok]].tolist()
                    fj.write(("," if users else "") + json.dumps(top))
                    table.writerows([user, r + 1, c, f"{s:.6f}"] for r, (c, s) in enumerate(zip(top, scores[i][ok])))
                    users.append(user)
                bar.update(len(uid))
        except DataError as e:
            raise _one_line(e) from None
        finally:
            bar.close()  # ends the bar's line, so an error message starts a line of its own
        fj.write('], "user": ' + json.dumps(users) + "}\n")
    if missing:
        absent = "" if (eval_dir / "user_action_type.json").exists() else " (the file is absent)"
        print(f"infer: warning: {missing} of {len(users)} users are missing from user_action_type.json{absent} "
              "and get the click condition", file=sys.stderr)
    print(f"infer: wrote {result_dir / 'result.json'} and {result_dir / 'results.csv'}", file=sys.stderr)
    return {"users": len(users), "result": str(result_dir / "result.json"), "csv": str(result_dir / "results.csv"),
            "missing_action": missing}


if __name__ == "__main__":
    main()
