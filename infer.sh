#!/usr/bin/env bash
# Top-K retrieval for every test user from one checkpoint, then evaluation when the eval folder has ground
# truth.   Usage: ./infer.sh MODEL_DIR [TOPK]
#   MODEL_DIR  a checkpoint folder (checkpoints/global_stepN), or a checkpoints folder (checkpoints): then the
#              checkpoint that validated best (becomes MODEL_OUTPUT_PATH)
#   TOPK       items per user (default 10)
# Environment: EVAL_DATA_PATH (default ./eval), EVAL_RESULT_PATH (default ./results), PYTHON (default python).
set -euo pipefail
if [ $# -lt 1 ] || [ $# -gt 2 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  echo "usage: $0 MODEL_DIR [TOPK]" >&2
  echo "  MODEL_DIR: a checkpoint folder such as checkpoints/global_stepN (holds model.pt), or the checkpoints" >&2
  echo "             folder of a run (its best checkpoint is used)" >&2
  echo "  TOPK: items per user (default 10)" >&2
  echo "  reads \$EVAL_DATA_PATH (default ./eval), writes \$EVAL_RESULT_PATH (default ./results)" >&2
  exit 2
fi
if [ ! -f "$1/model.pt" ] && [ ! -f "$1/best.json" ] && ! compgen -G "$1/global_step*/model.pt" > /dev/null; then
  echo "infer.sh: $1: no model.pt: MODEL_DIR must be a checkpoint folder (checkpoints/global_stepN) or a" \
       "checkpoints folder holding them" >&2
  exit 2
fi
# resolve paths before changing into the project folder, so relative paths mean what the caller meant
abspath() { (cd "$(dirname "$1")" && echo "$(pwd)/$(basename "$1")"); }
export MODEL_OUTPUT_PATH="$(abspath "$1")"
TOPK="${2:-10}"
export EVAL_DATA_PATH="$(abspath "${EVAL_DATA_PATH:-./eval}")"
mkdir -p "${EVAL_RESULT_PATH:-./results}"
export EVAL_RESULT_PATH="$(abspath "${EVAL_RESULT_PATH:-./results}")"
PYTHON="${PYTHON:-python}"
cd "$(dirname "$0")"

"$PYTHON" -u infer.py --topk "$TOPK"
if [ -f "$EVAL_DATA_PATH/ground_truth.json" ]; then
  "$PYTHON" -u evaluate.py --k 10 "$TOPK" --baseline popularity
fi
