#!/usr/bin/env bash
# MovieLens-1M under the HSTU paper's protocol (last item = test, second-to-last = validation, ranked
# against all items, history filtered): convert -> get_stat -> train -> infer -> evaluate, for HSTU and
# SASRec with the same item tower, loss and schedule (the cpu profile gives HSTU its own shape).
#
#   bench/movielens.sh ML1M_DIR [OUT_DIR]           # ML1M_DIR: ratings.dat/users.dat/movies.dat (GroupLens)
#                                                   # or interactions_chrono.csv.gz + users.dat + movies.dat
# Environment: MODELS ("hstu sasrec"), PROFILE (cpu: about an hour a model on 2 cores with AVX-512, HSTU 70 min;
# gpu: a larger model, longer), STEPS (override the profile's steps; 3960: HSTU's hour with AVX-512), PYTHON. Extra
# training options: TRAIN_ARGS; NAME names the run folder (default: the model). An ablation at the same
# schedule, cut at its first validation (a sixth of the steps: 750 at the cpu profile's 4,500):
#   NAME=hstu_no_feats MODELS=hstu TRAIN_ARGS="--stop-at 750 --no-item-feats" bench/movielens.sh ML1M_DIR
# Results: OUT_DIR/<name>/metrics.json and a summary line per run in OUT_DIR/summary.md.
set -euo pipefail
if [ $# -lt 1 ]; then sed -n '2,13p' "$0"; exit 2; fi
SRC="$1"; OUT="${2:-movielens_runs}"
PYTHON="${PYTHON:-python}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
ML="$OUT/ml-1m"
[ -f "$ML/data/seq.jsonl" ] || "$PYTHON" -u convert_movielens.py "$SRC" "$ML"
"$PYTHON" -u get_stat.py --data-dir "$ML/data" --cache-dir "$ML/cache"

case "${PROFILE:-cpu}" in
  # width 64, maxlen 200 (as the paper's ML-1M runs), ids as wide as the model, lr 2e-3 (both won at
  # the step-500 cut, BENCHMARKS.md); 3,706 items: the full softmax (2,048 sampled columns with --full-softmax off).
  # HSTU: 1 head, 3 layers. One head halves its element-wise (B, H, N, N) work, which pays for the third layer
  # (a better Score than HSTU's 2 x 2 at every seed). U and V of width 128 (--linear-dim): as many weights as
  # SASRec's layers, +0.006 Score at every seed, at 1.13x SASRec's step time (BENCHMARKS.md)
  cpu) PROFILE_ARGS=(--preset small --hidden 64 --batch-size 64 --device cpu --max-candidates 2048
                     --num-workers 0 --id-dim 64 --lr 2e-3)
       HSTU_ARGS=(--num-heads 1 --num-layers 3 --linear-dim 128) SASREC_ARGS=(--num-heads 2 --num-layers 2)
       STEPS="${STEPS:-4500}" ;;
  gpu) PROFILE_ARGS=(--preset small --hidden 256 --batch-size 128 --device cuda --max-candidates 0 --lr 1e-3)
       HSTU_ARGS=(--num-layers 8 --num-heads 4) SASREC_ARGS=(--num-layers 8 --num-heads 4)
       STEPS="${STEPS:-10000}" ;;
  *) echo "PROFILE must be cpu or gpu" >&2; exit 2 ;;
esac

for MODEL in ${MODELS:-hstu sasrec}; do
  RUN="$OUT/${NAME:-$MODEL}"
  case "$MODEL" in
    hstu) MODEL_ARGS=("${HSTU_ARGS[@]}") ;;
    sasrec) MODEL_ARGS=("${SASREC_ARGS[@]}") ;;
    *) echo "MODELS must list hstu and/or sasrec, got $MODEL" >&2; exit 2 ;;
  esac
  start=$(date +%s)
  "$PYTHON" -u main.py --data-dir "$ML/data" --cache-dir "$ML/cache" --ckpt-dir "$RUN/ckpt" --log-dir "$RUN/logs" \
    --tf-dir "$RUN/tf" --model "$MODEL" "${PROFILE_ARGS[@]}" "${MODEL_ARGS[@]}" --maxlen 200 --dropout 0.2 \
    --temperature 0.05 --curriculum none --neg-active-days 0 --val-split last --val-users 6040 \
    --max-steps "$STEPS" --eval-every $((STEPS / 6)) --keep-last 1 ${TRAIN_ARGS:-}
  train_s=$(( $(date +%s) - start ))
  # the checkpoint chosen on validation (second-to-last items; best.json): the test items were never seen
  best=$("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['step'])" "$RUN/ckpt/best.json")
  "$PYTHON" -u infer.py --model-dir "$RUN/ckpt" --eval-dir "$ML/eval" --result-dir "$RUN" --topk 200
  "$PYTHON" -u evaluate.py --result "$RUN/result.json" --ground-truth "$ML/eval/ground_truth.json" --k 10 50 200 \
    --out "$RUN/metrics.json"
  "$PYTHON" - "$RUN/metrics.json" "${NAME:-$MODEL}" "$best" "$train_s" >> "$OUT/summary.md" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))["model"]["all"]
print(f"| {sys.argv[2]} | {m['HR@10']:.4f} | {m['NDCG@10']:.4f} | {m['HR@50']:.4f} | {m['NDCG@50']:.4f} | "
      f"{m['HR@200']:.4f} | {m['MRR']:.4f} | step {sys.argv[3]} | {int(sys.argv[4]) / 60:.0f} min |")
PY
  tail -1 "$OUT/summary.md"
done
