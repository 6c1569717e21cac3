"""Inference: the top-K candidates for every test user, from one checkpoint folder and the eval data.

    python infer.py --model-dir checkpoints/global_stepN [--eval-dir ./eval] [--result-dir ./results] [--topk 10]
    ./infer.sh checkpoints [TOPK]       # the best checkpoint of a run, then evaluate.py when ground truth exists

Reads EVAL_DIR/predict_seq.jsonl (+ predict_seq_offsets.pkl), user_action_type.json and, if present,
predict_set.jsonl (the candidates; without it every training item is a candidate). User ids may be raw id
strings or integer re-ids (then mapped back through indexer['u']: results always name raw ids). User vectors
take each user's target action type as the condition; exact top-K by chunked matrix product; items already in the
user's history are skipped unless --keep-history. Writes RESULT_DIR/result.json
({"top10s": [[creative ids]], "user": [raw user ids]}, aligned, in predict_seq order, whatever K is) and
RESULT_DIR/results.csv (user, rank, creative_id, score), both atomically.

A model trained with --mm-emb-id also needs its multimodal vectors: the feature ids come from the checkpoint,
the vectors from a creative_emb folder (--mm-emb-dir; default EVAL_DIR/creative_emb, else
$TRAIN_DATA_PATH/creative_emb), converted into tables in --cache-dir ($USER_CACHE_PATH) unless the tables
there are up to date (then, e.g. after training on this machine, nothing is converted again).
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

from checkpoint import resolve_model_dir, train_data_dir
from common import DataError, HelpFormatter, atomic_write, data_error, env_default, exit_on_data_error, safe_torch_load
from dataset import EvalDataset, FeatureSpec, SeqReader, collate
from distributed import barrier, cleanup, setup
from ids import RawIds, user_ids_for
from mm_emb import MMFeatures, emb_dir_of, ensure_tables, has_table, with_mm
from model import HSTUModel, ModelConfig
from retrieval import topk_chunked

Tensor = torch.Tensor


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model-dir", default=env_default("MODEL_OUTPUT_PATH", ""),
                   help="a checkpoint folder (checkpoints/global_stepN), or a checkpoints folder: then its best "
                        "validation checkpoint (best.json) (env MODEL_OUTPUT_PATH)")
    p.add_argument("--eval-dir", default=env_default("EVAL_DATA_PATH", "./eval"),
                   help="evaluation data folder (env EVAL_DATA_PATH)")
    p.add_argument("--result-dir", default=env_default("EVAL_RESULT_PATH", "./results"),
                   help="where result.json and results.csv go (env EVAL_RESULT_PATH)")
    p.add_argument("--topk", type=int, default=10, help="items per user (the key stays 'top10s')")
    p.add_argument("--keep-history", action="store_true", help="do not filter out items already in the history")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--batch-size", type=int, default=256, help="users per batch")
    p.add_argument("--item-chunk", type=int, default=65536, help="candidates scored at once: bounds memory")
    p.add_argument("--set-chunk", type=int, default=65536, help="predict_set lines parsed and encoded at once")
    p.add_argument("--num-workers", type=int, default=min(4, max((os.cpu_count() or 1) - 1, 0)),
                   help="processes reading predict_seq (min(4, CPUs - 1))")
    p.add_argument("--indexer", default="",
                   help="indexer.pkl whose 'u' map turns integer user re-ids in predict_seq back into raw user ids "
                        "(default: EVAL_DIR/indexer.pkl, else the training data's; needed only for re-ids)")
    p.add_argument("--mm-emb-dir", default="",
                   help="models trained with --mm-emb-id only: the creative_emb folder with the vectors (of training "
                        "and cold candidate items; default: EVAL_DIR/creative_emb, else $TRAIN_DATA_PATH/creative_emb). "
                        "The feature ids come from the checkpoint")
    p.add_argument("--cache-dir", default=env_default("USER_CACHE_PATH", "./cache"),
                   help="models trained with --mm-emb-id only: where the multimodal tables are built, or reused when "
                        "up to date, e.g. the ones training built (env USER_CACHE_PATH)")
    return p


def load_model(model_dir: Path, device: torch.device) -> tuple[HSTUModel, FeatureSpec, np.ndarray, np.ndarray, np.ndarray]:
    """-> (model in eval mode, feature spec, item_feat (itemnum+1, Fi), item_raw_id (itemnum+1,), trained
    (itemnum+1,) bool: items with training events) from a checkpoint folder."""
    path = model_dir / "model.pt"
    if not path.exists():
        raise data_error(path, None, "not found: expected a checkpoint folder checkpoints/global_stepN/")
    ck = safe_torch_load(path)
    cfg, stat = ModelConfig.from_dict(ck["model_config"]), ck["stat"]
    if cfg.mm_dims and not cfg.mm_fids:
        raise data_error(path, None, "the model takes dense item inputs (mm_dims) without their creative_emb feature "
                         "ids (mm_fids): inference cannot tell which vectors to read")
    spec = FeatureSpec.from_stat(stat)
    model = HSTUModel(cfg, stat["schema"], stat["itemnum"])
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:  # a checkpoint from another version of model.py
        raise data_error(path, None, "weights do not match this model.py: " + " ".join(str(e).split())[:300]) from None
    item_feat = np.load(model_dir / "item_feat.npy", mmap_mode="r")  # a catalogue-sized table: not read into memory
    item_raw_id = np.load(model_dir / "item_raw_id.npy")
    n = spec.itemnum + 1
    counts = model_dir / "item_count.npy"  # absent in checkpoints of older versions: every item counts as trained
    trained = np.load(counts) > 0 if counts.exists() else np.ones(n, bool)
    if item_feat.shape != (n, spec.item_cols) or item_raw_id.shape != (n,) or trained.shape != (n,):
        raise data_error(model_dir, None, f"item_feat.npy {item_feat.shape} / item_raw_id.npy {item_raw_id.shape} / "
                         f"item_count.npy {trained.shape} do not match the model ({n} rows, {spec.item_cols} columns)")
    return model.to(device).eval(), spec, item_feat, item_raw_id, trained


def load_multimodal(cfg: ModelConfig, mm_emb_dir: str, eval_dir: Path, cache_dir: Path,
                    item_raw_id: np.ndarray) -> MMFeatures | None:
    """The tables of a model trained with --mm-emb-id (its mm_fids), built from a creative_emb folder into the
    cache folder, or reused there when up to date (the same source files and indexer, e.g. training's tables)."""
    if not cfg.mm_fids:
        return None
    if mm_emb_dir:
        src = Path(mm_emb_dir)
    else:
        options = [eval_dir / "creative_emb", emb_dir_of(env_default("TRAIN_DATA_PATH", "./data"))]
        src = next((p for p in options if p.is_dir()), None)
        if src is None:
            if all(has_table(cache_dir, f, d, item_raw_id) for f, d in zip(cfg.mm_fids, cfg.mm_dims)):
                print(f"infer: no creative_emb folder; using the multimodal tables in {cache_dir}", file=sys.stderr)
                return MMFeatures(cache_dir, cfg.mm_fids, cfg.mm_dims)
            raise data_error(options[0], None, f"not found (nor {options[1]}): the model reads multimodal features "
                             f"{' '.join(cfg.mm_fids)}; give their creative_emb folder with --mm-emb-dir")
    fids, dims = ensure_tables(src, cache_dir, cfg.mm_fids, item_raw_id)
    if dims != cfg.mm_dims:
        raise data_error(src, None, f"multimodal dims {dims} (from the names) differ from the model's {cfg.mm_dims}")
    return MMFeatures(cache_dir, fids, dims)


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
def encode_items(model: HSTUModel, ids: np.ndarray, feats: np.ndarray, device: torch.device,
                 mm: np.ndarray | None = None) -> Tensor:
    """(n,) re-ids (0 = cold), (n, Fi) feature ids, (n, sum of mm dims) dense rows -> (n, D) float32 vectors."""
    rows = torch.from_numpy(mm).to(device) if mm is not None else None
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        v = model.item_vectors(torch.from_numpy(ids).to(device), torch.from_numpy(feats).to(device), rows)
    return v.float()


def count_lines(path: Path) -> int:
    """Newlines in a file, read in blocks (an upper bound of its lines: blank lines count too)."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            n, last = n + block.count(b"\n"), block[-1:]
    return n + (last != b"\n")


def load_candidates(model: HSTUModel, eval_dir: Path, spec: FeatureSpec, item_feat: np.ndarray,
                    item_raw_id: np.ndarray, trained: np.ndarray, device: torch.device, chunk: int,
                    mm: MMFeatures | None = None) -> tuple[np.ndarray, Tensor]:
    """-> (creative ids (M,), vectors (M, D)), the vectors written chunk by chunk into one preallocated buffer
    (no second copy of the catalogue). An item the model was trained on gets its id embedding and its training
    features, as the model saw it; any other item (new to the catalogue, or in the indexer but never in the
    training data) is cold: id 0 and the features of its predict_set line, unseen or string values as
    padding. Duplicate creative ids keep their first line. With multimodal inputs a training item gets its
    table row, a cold item its own vector where the source has one (else a zero row, read as absent)."""
    path = eval_dir / "predict_set.jsonl"
    if path.exists():
        index, total = RawIds(item_raw_id), count_lines(path)
        chunks = ((c, index.reid(c), fe) for c, fe in iter_predict_set(path, chunk))
    else:
        print(f"infer: no {path.name} in {eval_dir}: every training item is a candidate", file=sys.stderr)
        reids = np.flatnonzero(item_raw_id > 0)  # items without a raw id could not be reported
        total = len(reids)
        chunks = ((item_raw_id[r], r, None) for r in (reids[s:s + chunk] for s in range(0, total, chunk)))
    cids = np.zeros(total, np.int64)
    vecs = torch.empty(total, model.cfg.hidden, device=device)  # float32: scores stay exact
    n = 0
    for c, reid, fe in chunks:
        cold = ~trained[reid] | (reid == 0)
        feats = np.asarray(item_feat[reid], dtype=np.int64)  # (n, Fi); row 0 is all padding
        if fe is not None:  # predict_set: a cold item's own features
            for j in np.flatnonzero(cold):
                feats[j] = spec.item_features(fe[j])
        ids = np.where(cold, 0, reid)
        step = max(1, (256 << 20) // (4 * mm.dim)) if mm is not None else len(ids)  # dense rows: ~256 MB at once
        for s in range(0, len(ids), step):
            e = min(s + step, len(ids))
            rows = mm.vectors(reid[s:e], c[s:e]) if mm is not None else None  # table row, or by raw id if new
            vecs[n + s:n + e] = encode_items(model, ids[s:e], feats[s:e], device, rows)
        cids[n:n + len(c)] = c
        n += len(c)
    if n == 0:
        raise data_error(path, None, "no candidates")
    cids, vecs = cids[:n], vecs[:n]
    _, first = np.unique(cids, return_index=True)
    if len(first) < n:
        print(f"infer: warning: {n - len(first)} duplicate creative ids in {path.name}; "
              "the first line of each is used", file=sys.stderr)
        keep = np.sort(first)
        for s in range(0, len(keep), chunk):  # in place: keep[j] >= j, so no row is read after it is overwritten
            vecs[s:s + chunk] = vecs[torch.from_numpy(keep[s:s + chunk]).to(device)]
        cids, vecs = cids[keep], vecs[:len(keep)]
    return cids, vecs


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


def retrieve(model: HSTUModel, loader: DataLoader, cids: np.ndarray, cand: Tensor, args: argparse.Namespace,
             device: torch.device, shard, bar: tqdm, world: int) -> None:
    """Top-K of every user the loader yields -> shard lines [raw user id, creative ids, scores]."""
    cand_order = np.argsort(cids, kind="stable")
    cand_sorted = cids[cand_order]
    for batch in loader:
        uid = batch["user_id"]  # raw user ids, str
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
            shard.write(json.dumps([user, cids[pos[i][ok]].tolist(), np.round(scores[i][ok], 6).tolist()]) + "\n")
        bar.update(len(uid) * world)  # the ranks advance together


@exit_on_data_error
def main(argv: list[str] | None = None) -> dict:
    """Run inference; returns {"users": n, "result": path, "csv": path, "missing_action": n, "model_dir": path}."""
    args = build_parser().parse_args(argv)
    if not args.model_dir:
        build_parser().error("--model-dir is required (or set MODEL_OUTPUT_PATH)")
    if args.topk < 1:
        build_parser().error("--topk must be >= 1")
    d, device = setup(args.device)  # under torchrun each rank takes a share of the users
    eval_dir, result_dir = Path(args.eval_dir), Path(args.result_dir)
    model_dir = resolve_model_dir(Path(args.model_dir))
    model, spec, item_feat, item_raw_id, trained = load_model(model_dir, device)
    mm = load_multimodal(model.cfg, args.mm_emb_dir, eval_dir, Path(args.cache_dir), item_raw_id)
    cids, cand = load_candidates(model, eval_dir, spec, item_feat, item_raw_id, trained, device, args.set_chunk, mm)

    actions = load_target_actions(eval_dir / "user_action_type.json")
    reader = SeqReader(eval_dir / "predict_seq.jsonl", eval_dir / "predict_seq_offsets.pkl")
    user_ids = user_ids_for(reader.read(0)[0][0] if len(reader) else "", args.indexer, eval_dir,
                            env_default("TRAIN_DATA_PATH", "") or train_data_dir(model_dir))
    lines = np.array_split(np.arange(len(reader)), d.world)[d.rank]  # under torchrun: this rank's users
    data = EvalDataset(reader, lines, item_feat, item_raw_id, spec, model.cfg.maxlen, target_action=actions,
                       trained=trained, user_ids=user_ids)
    loader = DataLoader(with_mm(data, mm), batch_size=args.batch_size, collate_fn=collate, num_workers=args.num_workers)
    if d.main:
        print(f"infer: {model_dir}: {len(reader)} users, {len(cids)} candidates, top-{args.topk}, device {device}, "
              f"ranks {d.world}" + (f", user re-ids mapped by {user_ids.source}" if user_ids else ""), file=sys.stderr)
    bar = tqdm(total=len(reader), unit="user", desc="infer", dynamic_ncols=True, mininterval=1.0, disable=not d.main)
    try:
        with atomic_write(shard_path(result_dir, d.rank), "w") as shard:
            retrieve(model, loader, cids, cand, args, device, shard, bar, d.world)
    except DataError as e:
        raise _one_line(e) from None
    finally:
        bar.close()  # ends the bar's line, so an error message starts a line of its own
    barrier(d)
    out = merge_shards(result_dir, d.world, actions) if d.main else {}
    barrier(d)  # no rank leaves (and no caller reads result.json) before it is complete
    cleanup(d)
    if d.main:
        if out["missing_action"]:
            absent = "" if (eval_dir / "user_action_type.json").exists() else " (the file is absent)"
            print(f"infer: warning: {out['missing_action']} of {out['users']} users are missing from "
                  f"user_action_type.json{absent} and get the click condition", file=sys.stderr)
        print(f"infer: wrote {out['result']} and {out['csv']}", file=sys.stderr)
        out["model_dir"] = str(model_dir)
    return out


def shard_path(result_dir: Path, rank: int) -> Path:
    return result_dir / f".result.rank{rank}.jsonl"


def merge_shards(result_dir: Path, world: int, actions: dict[str, int]) -> dict:
    """The ranks' shards ([user, top ids, scores] per line, users in predict_seq order within a shard and
    shards in rank order) -> result.json and results.csv, written atomically; the shards are removed."""
    users, missing = [], 0
    with contextlib.ExitStack() as stack:
        fj = stack.enter_context(atomic_write(result_dir / "result.json", "w"))
        fc = stack.enter_context(atomic_write(result_dir / "results.csv", "w"))
        table = csv.writer(fc, lineterminator="\n")
        table.writerow(["user", "rank", "creative_id", "score"])
        fj.write('{"top10s": [')  # rows are streamed; the user list follows them
        for rank in range(world):
            with open(shard_path(result_dir, rank)) as shard:
                for line in shard:
                    user, top, scores = json.loads(line)
                    fj.write(("," if users else "") + json.dumps(top))
                    table.writerows([user, r + 1, c, f"{s:.6f}"] for r, (c, s) in enumerate(zip(top, scores)))
                    users.append(user)
                    missing += user not in actions
        fj.write('], "user": ' + json.dumps(users) + "}\n")
    for rank in range(world):
        shard_path(result_dir, rank).unlink()
    return {"users": len(users), "result": str(result_dir / "result.json"), "csv": str(result_dir / "results.csv"),
            "missing_action": missing}


if __name__ == "__main__":
    main()
