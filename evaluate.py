"""Evaluation of result.json against ground truth: HitRate@K, NDCG@K and the competition Score.

    python evaluate.py [--result results/result.json] [--ground-truth eval/ground_truth.json] [--k 10 50]
                       [--baseline popularity --model-dir checkpoints/global_stepN] [--out metrics.json]

One target per user: NDCG@K = 1/log2(rank+1) when the target is at rank <= K (ranks from 1), else 0.
Score = 0.31·HR@10 + 0.69·NDCG@10. "weighted": the final round's weighted means (conversion targets
weigh 2.5, clicks 1). Also per target action type and, with --model-dir, for targets the model was never
trained on ("cold target": new to the catalogue, or in the indexer but never in seq.jsonl) and the others
("warm target"). Ground-truth users missing from the result are misses.

--baseline popularity ranks the candidates (predict_set, or every training item without it) by how often
each creative id occurs in all predict_seq histories (the only popularity the eval folder holds: the
checkpoint has no training counts), filters each user's history out, and is scored the same way.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from checkpoint import resolve_model_dir, train_data_dir
from common import HelpFormatter, atomic_save_json, data_error, env_default, exit_on_data_error
from dataset import SeqReader, split_records
from ids import UserIds, raw_user, user_ids_for
from metrics import popularity_topk, summarise, target_ranks

WEIGHTS = {2: 2.5}  # conversion targets; every other action type weighs 1
GROUPS = {1: "click", 2: "conversion"}


def load_json(path: Path) -> object:
    if not path.exists():
        raise data_error(path, None, "file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise data_error(path, None, f"invalid JSON ({e})") from None


def load_result(path: Path) -> dict[str, list[int]]:
    """result.json {"top10s": [[creative ids]], "user": [raw user ids]} -> {user: ranked creative ids}."""
    obj = load_json(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("top10s"), list) or not isinstance(obj.get("user"), list):
        raise data_error(path, None, 'expected {"top10s": [[creative ids]], "user": [raw user ids]}')
    if len(obj["top10s"]) != len(obj["user"]):
        raise data_error(path, None, f"{len(obj['top10s'])} rows in top10s but {len(obj['user'])} users")
    bad = next((j for j, top in enumerate(obj["top10s"]) if not isinstance(top, list)), None)
    if bad is not None:
        raise data_error(path, None, f"top10s[{bad}] is not a list of creative ids")
    return {str(u): top for u, top in zip(obj["user"], obj["top10s"])}


def load_ground_truth(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """ground_truth.json {"user": {"creative_id": int, "action_type": int}} -> (users, targets (U,), actions (U,))."""
    obj = load_json(path)
    if not isinstance(obj, dict):
        raise data_error(path, None, 'expected {"raw user id": {"creative_id": int, "action_type": int}}')
    users, targets, actions = [], [], []
    for u, t in obj.items():
        if not isinstance(t, dict) or type(t.get("creative_id")) is not int or type(t.get("action_type")) is not int:
            raise data_error(path, None, f"user {u!r}: expected {{\"creative_id\": int, \"action_type\": int}}, got {t!r}")
        users.append(u)
        targets.append(t["creative_id"])
        actions.append(t["action_type"])
    return users, np.array(targets, np.int64), np.array(actions, np.int64)


def evaluate(result: dict[str, list[int]], users: list[str], targets: np.ndarray, actions: np.ndarray,
             ks: list[int], cold: np.ndarray | None = None) -> dict[str, dict]:
    """{"all", "weighted", "click", "conversion", ..., "cold target"} -> metrics; "missing": users absent from the
    result. `cold` (U,) bool marks targets that are no trained item (new to the catalogue or never in seq.jsonl)."""
    ranks = target_ranks([result.get(u) for u in users], targets)
    out = {"all": summarise(ranks, ks),
           "weighted": summarise(ranks, ks, np.array([WEIGHTS.get(a, 1.0) for a in actions.tolist()]))}
    for a in sorted(set(actions.tolist())):
        out[GROUPS.get(a, f"action_{a}")] = summarise(ranks[actions == a], ks)
    if cold is not None:
        out["cold target"] = summarise(ranks[cold], ks)
        out["warm target"] = summarise(ranks[~cold], ks)
    out["missing"] = sum(u not in result for u in users)
    return out


def trained_items(model_dir: Path) -> np.ndarray:
    """Raw creative ids of the items the checkpoint was trained on (events in seq.jsonl), sorted."""
    raw = np.load(model_dir / "item_raw_id.npy")
    counts = model_dir / "item_count.npy"  # absent in checkpoints of older versions: every item counts as trained
    trained = np.load(counts) > 0 if counts.exists() else np.ones(len(raw), bool)
    return np.sort(raw[trained & (raw > 0)])


def popularity_result(model_dir: Path, eval_dir: Path, k: int, user_ids: UserIds | None) -> dict[str, list[int]]:
    """The most frequent creative ids of all predict_seq histories among the candidates, history filtered."""
    from infer import iter_predict_set  # the same streaming, validated reader as inference

    item_raw_id = np.load(model_dir / "item_raw_id.npy")
    itemnum = len(item_raw_id) - 1
    reader = SeqReader(eval_dir / "predict_seq.jsonl", eval_dir / "predict_seq_offsets.pkl")
    users, hists = [], []
    for line in range(len(reader)):
        records = reader.read(line)
        ids = np.array([r[1] for r in split_records(records)[0]], np.int64)
        hists.append(np.where(ids <= itemnum, item_raw_id[np.minimum(ids, itemnum)], ids))  # re-id -> raw id
        users.append(raw_user(records[0][0], user_ids, reader.path, line + 1))
    seen, counts = np.unique(np.concatenate(hists + [np.zeros(0, np.int64)]), return_counts=True)
    path = eval_dir / "predict_set.jsonl"
    cands = (np.concatenate([c for c, _ in iter_predict_set(path, 65536)]) if path.exists()
             else item_raw_id[item_raw_id > 0])
    cands = cands[np.sort(np.unique(cands, return_index=True)[1])]  # first occurrence, file order
    pop = np.zeros(len(cands), np.int64)  # (M,) occurrences of each candidate
    if len(seen):
        p = np.minimum(np.searchsorted(seen, cands), len(seen) - 1)
        pop = np.where(seen[p] == cands, counts[p], 0)
    return dict(zip(users, popularity_topk(cands, pop, hists, k)))


def table(reports: dict[str, dict], ks: list[int]) -> str:
    """Side by side: one column group per source (model, baseline), one column per user group."""
    cols = [(name, g) for name, rep in reports.items() for g in rep]
    w = max(11, *(len(g) + 2 for _, g in cols))
    first = [n if j == 0 else "" for n, rep in reports.items() for j in range(len(rep))]  # source over its group
    rows = [f"{'':9}" + "".join(f"{n:>{w}}" for n in first), f"{'':9}" + "".join(f"{g:>{w}}" for _, g in cols)]
    for m in [f"{x}@{k}" for k in ks for x in ("HR", "NDCG")] + ["MRR", "Score", "users"]:
        fmt = "d" if m == "users" else ".4f"
        rows.append(f"{m:9}" + "".join(f"{reports[n][g][m]:>{w}{fmt}}" for n, g in cols))
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    eval_default = env_default("EVAL_DATA_PATH", "./eval")
    p.add_argument("--result", default=str(Path(env_default("EVAL_RESULT_PATH", "./results")) / "result.json"),
                   help="result.json of infer.py ($EVAL_RESULT_PATH/result.json)")
    p.add_argument("--ground-truth", default=str(Path(eval_default) / "ground_truth.json"),
                   help="ground_truth.json ($EVAL_DATA_PATH/ground_truth.json)")
    p.add_argument("--k", type=int, nargs="+", default=[10], help="cut-offs (10 is always included: Score uses it)")
    p.add_argument("--baseline", choices=["popularity"], help="also score a baseline (see above)")
    p.add_argument("--model-dir", default=env_default("MODEL_OUTPUT_PATH", ""),
                   help="checkpoint folder (env MODEL_OUTPUT_PATH): the baseline's id tables, and the trained items "
                        "for the 'cold target' / 'warm target' groups")
    p.add_argument("--eval-dir", default=None, help="eval data for the baseline (default: the ground truth's folder)")
    p.add_argument("--indexer", default="", help="indexer.pkl mapping predict_seq's integer user re-ids back to raw "
                   "ids, for the baseline (default: the eval folder's, else the training data's)")
    p.add_argument("--out", default=None, help="metrics JSON (default: metrics.json beside the result)")
    return p


@exit_on_data_error
def main(argv: list[str] | None = None) -> dict:
    p = build_parser()
    args = p.parse_args(argv)
    ks = sorted(set(args.k) | {10})
    if min(ks) < 1:
        p.error("--k values must be >= 1")
    if args.baseline and not args.model_dir:
        p.error("--baseline needs --model-dir (or MODEL_OUTPUT_PATH)")
    gt_path = Path(args.ground_truth)
    users, targets, actions = load_ground_truth(gt_path)
    result = load_result(Path(args.result))
    longest = max((len(t) for t in result.values()), default=0)
    if max(ks) > longest:
        print(f"evaluate: note: result lists have at most {longest} items; @{max(ks)} sees only those", file=sys.stderr)
    cold, model_dir = None, resolve_model_dir(Path(args.model_dir)) if args.model_dir else None
    if model_dir is not None:
        cold = ~np.isin(targets, trained_items(model_dir))
    reports = {"model": evaluate(result, users, targets, actions, ks, cold)}
    if args.baseline:
        eval_dir = Path(args.eval_dir) if args.eval_dir else gt_path.parent
        reader = SeqReader(eval_dir / "predict_seq.jsonl", eval_dir / "predict_seq_offsets.pkl")
        user_ids = user_ids_for(reader.read(0)[0][0] if len(reader) else "", args.indexer, eval_dir,
                                env_default("TRAIN_DATA_PATH", "") or train_data_dir(model_dir))
        pop = popularity_result(model_dir, eval_dir, longest or max(ks), user_ids)  # lists as long as the model's
        reports["popularity"] = evaluate(pop, users, targets, actions, ks, cold)
        reports["popularity"]["source"] = "creative-id counts over all predict_seq histories"
    print(table({n: {g: v for g, v in r.items() if isinstance(v, dict)} for n, r in reports.items()}, ks))
    missing = reports["model"]["missing"]
    if missing:
        print(f"evaluate: {missing} of {len(users)} ground-truth users are missing from the result (counted as misses)")
    out = Path(args.out) if args.out else Path(args.result).parent / "metrics.json"
    atomic_save_json(reports, out)
    print(f"evaluate: wrote {out}")
    return reports


if __name__ == "__main__":
    main()
