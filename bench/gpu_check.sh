#!/usr/bin/env bash
# GPU check: correctness on CUDA first, then the reference configuration's figures, in about ten minutes of one
# GPU, every figure into one results file (bench/gpu_check.py says what each section measures).
#
#   bash bench/gpu_check.sh [--dry-run] [--out DIR] [--ml1m DIR] [--minutes N] [--work DIR] [--sections a,b,...]
#
#   --dry-run    the CPU, tiny sizes, the same code paths (a minute or two): proves the script runs end to end
#   --out DIR    where gpu_check_results.md, .json and gpu_check_logs.txt go (default bench/, which gets the
#                .md alone, the others going to --work); rewritten after every section, so a run cut short
#                still leaves what it measured
#   --ml1m DIR   MovieLens-1M (ratings.dat, users.dat, movies.dat, or interactions_chrono.csv.gz + users.dat +
#                movies.dat): the last section trains the gpu profile of bench/movielens.sh for the time left
#   --minutes N  the whole run's budget (default 10); each section also has its own time limit
#   --work DIR   scratch: generated data, checkpoints, one log per section (default bench/gpu_check.tmp/)
#   --peak-tflops X   the card's dense bf16 peak for MFU (default 989, H100/H200 SXM)
# Each section runs in its own process; one that fails or hangs is recorded with its error and the run goes on.
# Exit code 0 when every section ran and every check passed, 1 otherwise, 2 without CUDA (and no --dry-run).
# PYTHON picks the interpreter (default: python3, else python); it needs requirements.txt's packages (a GPU
# machine without a network can install polars and the rest from wheels carried along, pip install --no-index).
#
# On one H200, ten minutes: bash bench/gpu_check.sh --out OUT_DIR --ml1m ML1M_DIR --minutes 9
# Relative paths are the caller's (the sections themselves run in the repository root).
set -euo pipefail
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
exec "$PYTHON" -u "$(dirname "$0")/gpu_check.py" "$@"
