#!/usr/bin/env bash
# Preprocess (get_stat.py) and train (main.py). With no data at $TRAIN_DATA_PATH, generates the
# built-in sample data there (and its evaluation set in $EVAL_DATA_PATH) first.
# Extra arguments go to main.py, e.g. ./run.sh --max-steps 500
set -euo pipefail
cd "$(dirname "$0")"
export TRAIN_DATA_PATH="${TRAIN_DATA_PATH:-./data}"
export TRAIN_CKPT_PATH="${TRAIN_CKPT_PATH:-./checkpoints}"
export TRAIN_LOG_PATH="${TRAIN_LOG_PATH:-./logs}"
export TRAIN_TF_EVENTS_PATH="${TRAIN_TF_EVENTS_PATH:-./tf_events}"
export USER_CACHE_PATH="${USER_CACHE_PATH:-./cache}"
export EVAL_DATA_PATH="${EVAL_DATA_PATH:-./eval}"
PYTHON="${PYTHON:-python}"

if [ ! -f "$TRAIN_DATA_PATH/seq.jsonl" ]; then
  echo "run.sh: no $TRAIN_DATA_PATH/seq.jsonl: generating the built-in sample data" \
       "(training data in $TRAIN_DATA_PATH, evaluation set in $EVAL_DATA_PATH)"
  tmp="$(mktemp -d "${TMPDIR:-/tmp}/sample.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  "$PYTHON" -u make_sample_data.py --out "$tmp"
  mkdir -p "$TRAIN_DATA_PATH" "$EVAL_DATA_PATH"
  mv "$tmp"/data/* "$TRAIN_DATA_PATH"/
  mv "$tmp"/eval/* "$EVAL_DATA_PATH"/
fi

"$PYTHON" -u get_stat.py
if [ -f main.py ]; then
  "$PYTHON" -u main.py "$@"
fi
