"""run.sh never generates the sample data into a folder that holds anything: a mistyped path to real data
stops it with a clear message, every file left as it was."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT


def snapshot(folder) -> dict:
    return {p: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


@pytest.mark.parametrize("occupied", ["train", "eval"])
def test_sample_data_only_into_missing_or_empty_folders(tmp_path, occupied):
    data, ev = tmp_path / "data", tmp_path / "eval"
    (tmp_path / occupied if occupied == "eval" else data).mkdir()
    target = data if occupied == "train" else ev
    (target / "seqs.jsonl").write_text("[[1, 2, null, {}, 1, 5]]\n")  # a dataset, but not named seq.jsonl
    (target / ".hidden").write_text("x")
    before = snapshot(tmp_path)
    env = {**os.environ, "PYTHON": sys.executable, "TRAIN_DATA_PATH": str(data), "EVAL_DATA_PATH": str(ev),
           "USER_CACHE_PATH": str(tmp_path / "cache"), "TRAIN_CKPT_PATH": str(tmp_path / "ck")}
    r = subprocess.run(["bash", str(ROOT / "run.sh")], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and f"{target} is not empty" in r.stderr and "Nothing was changed" in r.stderr
    assert snapshot(tmp_path) == before  # nothing generated, moved or overwritten
