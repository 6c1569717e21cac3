#!/usr/bin/env bash
# Preprocess (get_stat.py) and train (main.py). With no $TRAIN_DATA_PATH/seq.jsonl, generates the built-in
# sample data there (and its evaluation set in $EVAL_DATA_PATH) first; only into folders that are missing or
# empty, so that a mistyped path to real data stops here instead of filling another folder.
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

# a folder that exists and holds anything at all (hidden files too)
occupied() { [ -e "$1" ] && [ -n "$(ls -A "$1" 2>/dev/null || echo x)" ]; }

if [ ! -f "$TRAIN_DATA_PATH/seq.jsonl" ]; then
  for dir in "$TRAIN_DATA_PATH" "$EVAL_DATA_PATH"; do
    if occupied "$dir"; then
      echo "run.sh: error: $TRAIN_DATA_PATH/seq.jsonl not found, and $dir is not empty, so the sample data is" \
           "not generated there. Check TRAIN_DATA_PATH / EVAL_DATA_PATH (a typo?), or point them at missing or" \
           "empty folders for the sample. Nothing was changed." >&2
      exit 2
    fi
  done
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
"$PYTHON" -u main.py "$@"
