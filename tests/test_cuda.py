"""CUDA correctness, marked `cuda` and skipped without a CUDA device (bench/gpu_check.sh runs them first, with
`pytest -m cuda`): one batch forward + backward under bf16 autocast on CUDA against fp32 on the CPU, and the GPU
top-K against the CPU's on the same vectors, as infer.py and train.validate call it. The comparisons are
bench/gpu_check.py's (tests/test_gpu_check.py checks on the CPU that they fail on wrong answers); the script's
sections run the same ones at the reference size."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "bench"))
import gpu_check  # noqa: E402  (bench/gpu_check.py)

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


def test_forward_backward_bf16_on_cuda_matches_fp32_on_cpu():
    # the reference model at 4 layers (the script's section runs all 16 at B=32), full sequences of N=102
    r = gpu_check.forward_backward_check(CUDA, "reference", batch_size=8, itemnum=20_000, sets={"num_layers": 4})
    failing = [c for c in gpu_check.forward_backward_ok(r) if not c["ok"]]
    assert not failing, failing


def test_fp32_on_cuda_equals_fp32_on_cpu_exactly():
    # no autocast, so nothing but summation order differs: the check's tolerances must not hide anything
    r = gpu_check.forward_backward_check(CUDA, "reference", batch_size=4, itemnum=20_000, amp=False,
                                         sets={"num_layers": 2})
    assert r["loss_rel"] < 1e-4 and r["grad_norm_rel"] < 1e-3 and r["grad_cos"] > 0.99999, r


def test_topk_on_cuda_equals_cpu_as_infer_calls_it():
    r = gpu_check.topk_check(CUDA, users=256, items=200_000, dim=128, item_chunk=16384, modes=("infer",))
    assert r["infer"]["ok"], r


def test_topk_on_cuda_equals_cpu_as_validation_calls_it():
    # train.validate calls topk_chunked inside its bf16 autocast block, with train.py's TF32 setting
    r = gpu_check.topk_check(CUDA, users=256, items=200_000, dim=128, item_chunk=16384, modes=("validate",))
    assert r["validate"]["ok"], r
