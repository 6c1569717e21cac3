"""bench/gpu_check.sh: the dry run (CPU, tiny sizes) goes end to end and every section reports; a failing or hanging
section is recorded and the run goes on; the correctness comparisons it makes fail on wrong answers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "bench"))
import gpu_check  # noqa: E402  (bench/gpu_check.py)
import retrieval  # noqa: E402

CPU = torch.device("cpu")


def run_script(*args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, dict, str]:
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), *args], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHON": sys.executable})
    out = Path(args[args.index("--out") + 1])
    return r, json.loads((out / "gpu_check_results.json").read_text()), (out / "gpu_check_results.md").read_text()


def test_dry_run_every_section_reports_and_passes(tmp_path):
    r, res, md = run_script("--dry-run", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sections = res["sections"]
    assert list(sections) == list(gpu_check.SECTIONS)  # every section, in order
    for name, rec in sections.items():
        want = "skipped" if name == "movielens" else "ok"  # no --ml1m
        assert rec["status"] == want, (name, rec.get("error"), rec.get("log_tail"))
        assert rec.get("md"), name  # reported something
        assert all(c["ok"] for c in rec.get("checks", [])), (name, rec["checks"])
        assert f"## {gpu_check.SECTIONS[name][0]}" in md
    n_checks = {n: len(sections[n].get("checks", [])) for n in ("forward_backward", "topk", "resume", "loss")}
    assert n_checks == {"forward_backward": 4, "topk": 2, "resume": 2, "loss": 2}, n_checks
    assert "skipped" in sections["cuda_tests"]["figures"]["summary"]  # no CUDA here: the CUDA tests skip
    fig = sections["train_step"]["figures"]
    assert fig["search"]["batch"] == 32 and fig["best"]["batch"] == 8  # the dry run's cap, its reference batch
    assert {(r["id_update"], r["compile"]) for r in fig["rows"]} == {(u, c) for u in ("dense", "rowwise")
                                                                   for c in (False, True)}
    assert all("step_s" in r for r in fig["rows"])
    assert sections["retrieval"]["figures"]["float32"]["done"] == gpu_check.SIZES["dry"]["retr"][0]
    assert sections["dataloader"]["figures"]["step_rate"] > 0
    assert "| correctness checks pass on CPU (dry run) |" in md


def test_failed_and_hung_sections_are_recorded_and_the_run_goes_on(tmp_path):
    # env cannot even import torch in 0.5 s (a hang, as far as the driver can tell); movielens gets a bad folder
    r, res, md = run_script("--dry-run", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
                            "--sections", "env,movielens", "--section-timeout", "env=0.5",
                            "--ml1m", str(tmp_path / "no_such_folder"))
    assert r.returncode == 1
    env, ml = res["sections"]["env"], res["sections"]["movielens"]
    assert env["status"] == "timeout" and "time limit" in env["error"]
    assert ml["status"] == "failed" and "no_such_folder: not a folder" in ml["error"], ml
    assert "**timeout**" in md and "**failed**" in md


def test_forward_backward_check_fails_on_a_changed_weight():
    same = gpu_check.forward_backward_check(CPU, batch_size=2, itemnum=500, amp=False, sets=gpu_check.DRY_MODEL)
    assert same["loss_rel"] == 0 and same["grad_norm_rel"] == 0 and same["tensor_rel"] == 0
    assert all(c["ok"] for c in gpu_check.forward_backward_ok(same))
    broken = gpu_check.forward_backward_check(CPU, batch_size=2, itemnum=500, amp=False, sets=gpu_check.DRY_MODEL,
                                              perturb=0.2)
    verdict = {c["name"].split(":")[0]: c["ok"] for c in gpu_check.forward_backward_ok(broken)}
    assert not verdict["gradient direction"] and not verdict["worst tensor's gradient"], broken


@pytest.mark.usefixtures("one_thread")
def test_compare_topk_fails_on_wrong_answers():
    u, it, ex = gpu_check.topk_vectors(32, 2000, 16)
    ref = retrieval.topk_reference(u, it, 10, ex)
    assert gpu_check.compare_topk(u, it, ex, ref, ref)["ok"]
    s, i = ref[0].clone(), ref[1].clone()
    i[3, 2] = i[3, 9] + 0  # a worse item at rank 3 (the row's scores are distinct)
    assert not gpu_check.compare_topk(u, it, ex, ref, (s, i))["ok"]
    assert not gpu_check.compare_topk(u, it, ex, ref, (ref[0] + 1e-3, ref[1]))["ok"]  # scores off
    # excluded items returned: the answer without exclusions (better items, so only the exclusion check sees it)
    unexcluded = gpu_check.compare_topk(u, it, ex, ref, retrieval.topk_reference(u, it, 10))
    assert unexcluded["excluded_returned"] and not unexcluded["ok"]
    # ranked on scores rounded to bf16 (what a top-K that let a caller's bf16 autocast reach its matmul returns)
    scores = (u.bfloat16() @ it.bfloat16().T).float()
    rows = torch.arange(len(u))[:, None].expand_as(ex)
    scores[rows[ex >= 0], ex[ex >= 0]] = float("-inf")
    assert not gpu_check.compare_topk(u, it, ex, ref, scores.topk(10, dim=1))["ok"]
    # topk_chunked called inside autocast (as validation does) is exact all the same
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gpu_check.compare_topk(u, it, ex, ref, retrieval.topk_chunked(u, it, 10, ex, 512))["ok"]


def test_weight_diff_and_resume_verdicts():
    a = {"w": torch.ones(3, 4), "b": torch.zeros(4)}
    same = gpu_check.weight_diff(a, {k: v.clone() for k, v in a.items()})
    assert same["equal"] and same["max_abs"] == 0
    b = {"w": a["w"].clone(), "b": a["b"].clone()}
    b["w"][1, 2] += 2.0 ** -20  # exact in fp32
    d = gpu_check.weight_diff(b, a)
    assert not d["equal"] and d["worst"] == "w" and d["max_abs"] == 2.0 ** -20
    verdict = gpu_check.resume_ok({"deterministic": d, "default": d})
    assert not verdict[0]["ok"] and verdict[1]["ok"]  # exact is required in deterministic mode only
    b["w"] *= 1.01  # 1% off: beyond RESUME_TOL, unless two uninterrupted runs already differ by a tenth of that
    off = gpu_check.weight_diff(b, a)
    assert not gpu_check.resume_ok({"deterministic": same, "default": off})[1]["ok"]
    assert not gpu_check.resume_ok({"deterministic": same, "default": {**off, "noise": same}})[1]["ok"]
    noisy = {**off, "noise": {**same, "worst_rel": 2e-3}}
    assert gpu_check.resume_ok({"deterministic": same, "default": noisy})[1]["ok"]


def test_largest_batch_search_doubles_then_bisects(monkeypatch):
    import train_step  # bench/train_step.py
    setup = train_step.prepare_synthetic("reference", 8, 300, CPU, 1, **gpu_check.DRY_MODEL)
    tried = []

    def fake_step(model, optim, batch, *args):  # "out of memory" above 40 sequences
        tried.append(len(batch["seq_type"]))
        if len(batch["seq_type"]) > 40:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(train_step, "optimise", fake_step)
    best, trials = train_step.find_max_batch(setup, amp=False, cap=1024)
    assert best == 40
    assert [(b, ok) for b, ok, _ in trials] == [(8, True), (16, True), (32, True), (64, False), (48, False), (40, True)]
    assert train_step.find_max_batch(setup, amp=False, cap=24)[0] == 24  # the cap, when everything fits
