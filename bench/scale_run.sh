#!/usr/bin/env bash
# The whole pipeline at a real catalogue size on this machine: sample data with ITEMS items and USERS users
# -> get_stat.py -> a few hundred training steps (small preset, validation over every item) -> inference
# (every candidate of predict_set.jsonl) -> evaluation, with the wall time and peak RSS of each stage
# (/usr/bin/time -v), appended as a table to bench/scale_run_results.md.
#
#   bench/scale_run.sh WORK_DIR [USERS] [ITEMS] [STEPS]     # defaults: 100000 users, 4000 items, 300 steps
#   bench/scale_run.sh /scratch/scale 2000000 4800000 300   # the 4.8M-item catalogue of the real 1M-user data
#
# Extra training options: TRAIN_ARGS (e.g. "--id-update rowwise"). WORK_DIR gets the data (about 10 KB a
# user) and is left in place; delete it afterwards.
set -euo pipefail
if [ $# -lt 1 ]; then sed -n '2,11p' "$0"; exit 2; fi
WORK="$1"; USERS="${2:-100000}"; ITEMS="${3:-4000}"; STEPS="${4:-300}"
PYTHON="${PYTHON:-python}"
cd "$(dirname "$0")/.."
OUT_MD="${OUT_MD:-bench/scale_run_results.md}"
mkdir -p "$WORK"
ROWS=()

stage() {  # stage NAME COMMAND...: run it under /usr/bin/time, keep its log, record wall time and peak RSS
  local name="$1"; shift
  /usr/bin/time -v -o "$WORK/$name.time" "$@" > "$WORK/$name.log" 2>&1 || { tail -20 "$WORK/$name.log"; exit 1; }
  local wall rss
  wall=$(grep "Elapsed (wall clock)" "$WORK/$name.time" | awk '{print $NF}')
  rss=$(grep "Maximum resident set size" "$WORK/$name.time" | awk '{printf "%.0f", $NF / 1024}')
  ROWS+=("| $name | $wall | $rss |")
  echo "scale_run: $name: $wall, peak RSS $rss MB"
}

TEST_USERS="${TEST_USERS:-10000}"
[ -f "$WORK/s/data/seq.jsonl" ] || stage generate "$PYTHON" -u make_sample_data.py --out "$WORK/s" --users "$USERS" \
  --items "$ITEMS" --test-users "$TEST_USERS"
stage get_stat "$PYTHON" -u get_stat.py --data-dir "$WORK/s/data" --cache-dir "$WORK/cache" --force
rm -rf "$WORK/ck"
stage train "$PYTHON" -u main.py --data-dir "$WORK/s/data" --cache-dir "$WORK/cache" --ckpt-dir "$WORK/ck" \
  --log-dir "$WORK/logs" --tf-dir "$WORK/tf" --preset small --device cpu --max-steps "$STEPS" \
  --eval-every "$STEPS" --val-users 1000 ${TRAIN_ARGS:-}
stage infer "$PYTHON" -u infer.py --model-dir "$WORK/ck" --eval-dir "$WORK/s/eval" --result-dir "$WORK/res" --device cpu
stage evaluate "$PYTHON" -u evaluate.py --result "$WORK/res/result.json" --ground-truth "$WORK/s/eval/ground_truth.json" \
  --model-dir "$WORK/ck"

seq_mb=$(du -m "$WORK/s/data/seq.jsonl" | cut -f1)
score=$("$PYTHON" -c "import json, sys; m = json.load(open(sys.argv[1]))['model']['all']; print(f\"{m['Score']:.4f}\")" \
        "$WORK/res/metrics.json")
{
  echo
  echo "## $USERS users, $ITEMS items, $STEPS steps ($(date -u +%F), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg))"
  echo
  echo "Command: \`bench/scale_run.sh WORK_DIR $USERS $ITEMS $STEPS\`${TRAIN_ARGS:+ with TRAIN_ARGS=\"$TRAIN_ARGS\"};" \
       "seq.jsonl $seq_mb MB, $TEST_USERS test users, test Score $score."
  echo
  echo "| stage | wall (h:mm:ss) | peak RSS MB |"
  echo "| --- | ---: | ---: |"
  printf '%s\n' "${ROWS[@]}"
} | tee -a "$OUT_MD"
