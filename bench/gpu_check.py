"""GPU check: correctness on CUDA first, then the reference configuration's figures, in about ten minutes of one
GPU. bench/gpu_check.sh runs this file; see it for the options. Every section runs in its own process under its
own time limit (a hang or a CUDA error ends that section only), writes its figures into one markdown file
(OUT/gpu_check_results.md, rewritten after every section, with OUT/gpu_check_results.json beside it) and the
run goes on whatever happened to it. Sections, in order:

- env: the machine, the packages, the card.
- cuda_tests: `pytest -m cuda tests/test_cuda.py` (skipped without CUDA).
- forward_backward: one batch of the reference configuration, forward + backward of train.train_loss under bf16
  autocast on CUDA against fp32 on the CPU, from the same weights: loss and gradients within TOL.
- topk: retrieval.topk_chunked on the GPU against retrieval.topk_reference on the CPU, on the same vectors, as
  infer.py calls it (fp32) and as train.validate calls it (inside bf16 autocast, TF32 on).
- resume: main.py (train.main) for a few steps straight against --stop-at + --resume latest: the final weights
  bit for bit under torch.use_deterministic_algorithms(True) (CUBLAS_WORKSPACE_CONFIG=:4096:8); in the default
  (non-deterministic) mode within RESUME_TOL or 10x what two uninterrupted runs differ by, the larger.
- train_step: bench/train_step.py on the reference preset at the real catalogue (17.5M items, synthetic full
  batches): seq/s, ms/step, peak memory and MFU (against --peak-tflops), eager and compiled, at B = 232 and at
  the largest batch that fits; the row-wise id update; a validation pass with the training state resident.
- loss: loss.sampled_softmax_loss against bench/loss.py's dense form at the reference size, on the device: time,
  peak memory, value and gradients.
- retrieval: exact top-10 for 1M users x 1M items x 512 on the GPU (retrieval.topk_chunked, user blocks).
- dataloader: bench/dataloader.py with the machine's cores against the step rate measured in train_step.
- movielens: bench/movielens.sh with PROFILE=gpu for the time left (STEPS from a measured step time), HR@10 and
  NDCG@10 at the end; skipped without --ml1m.

--dry-run runs every section on the CPU at tiny sizes (the same code paths; its figures say nothing about speed).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.append(str(BENCH))  # train_step, dataloader, scale; after the root, whose loss.py and retrieval.py win
sys.path.insert(0, str(ROOT))
import retrieval  # noqa: E402
import train_step  # noqa: E402  (bench/train_step.py)
from common import atomic_save_json, atomic_write  # noqa: E402
from distributed import Dist  # noqa: E402
from train import to_device, train_loss  # noqa: E402

# ---- tolerances and targets --------------------------------------------------------------------------------------
# One batch, bf16 autocast against fp32. The loss's logits are fp32 either way (loss.py leaves autocast); the
# model's matmuls round their inputs to bf16 (2^-9 relative). Measured with CPU bf16 autocast, which rounds more
# than CUDA's (it keeps layer norms in bf16), on the reference model (16 layers, B=8) and smaller ones: loss
# 3-5e-4 relative, gradient norm 3e-4-3e-3, cosine >= 0.9994, worst tensor 0.03-0.06 (a time-bias table).
# The bounds are several times those; a 20% change of one weight matrix breaks them.
TOL = {"loss_rel": 5e-3, "grad_norm_rel": 2e-2, "grad_cos": 0.995, "tensor_rel": 0.2}
TOPK_EPS = 2e-5  # score units (cosines of unit vectors): fp32 rounding of a 512-term dot product is ~1e-6
RESUME_TOL = 1e-3  # default mode: worst relative L2 difference of any weight tensor (or 10x run-to-run, if more)
LOSS_TOL = {"value_rel": 1e-4, "grad_rel": 1e-3}  # ours vs dense, both fp32 (TF32 on, as train.py sets)
H200_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100/H200 SXM
MFU_TARGET = 0.30
MEMORY_CARD_GB = 96
DRY_MODEL = {"hidden": 32, "num_layers": 1, "num_heads": 2, "maxlen": 20}  # the reference preset, shrunk
RESUME_CURRICULUM = "20000:64:0.5,130000:8:0.25"  # reaches hard negatives within a few steps

# sizes: the device run, and the dry run (CPU, tiny)
SIZES = {
    "full": dict(fb_batch=32, fb_items=100_000, topk=(512, 1_000_000, 512), resume_data=(1000, 1000),
                 resume_model=dict(hidden=64, num_layers=2, num_heads=2, maxlen=30, batch_size=32), resume_workers=2,
                 step_items=17_500_000, step_batch=232, step_steps=20, step_warmup=3, step_cap=16384,
                 loss=(232, 102, 512, 1_000_000), loss_repeats=3, retr=(1_000_000, 1_000_000, 512, 65536, 65536),
                 loader_users=3000, loader_batches=40, loader_batch=232, ml_overhead_s=60.0, ml_min_steps=60,
                 ml_max_steps=None),
    "dry": dict(fb_batch=4, fb_items=2000, topk=(64, 5000, 32), resume_data=(200, 300),
                resume_model=dict(hidden=32, num_layers=1, num_heads=2, maxlen=20, batch_size=16), resume_workers=0,
                step_items=3000, step_batch=8, step_steps=2, step_warmup=1, step_cap=32,
                loss=(8, 16, 32, 5000), loss_repeats=1, retr=(3000, 5000, 32, 1024, 2048),
                loader_users=300, loader_batches=5, loader_batch=16, ml_overhead_s=30.0, ml_min_steps=6,
                ml_max_steps=12),
}
# bench/movielens.sh's gpu profile, here only to time a step of it before choosing STEPS
ML_GPU_PROFILE = dict(preset="small", batch_size=128, hidden=256, num_layers=8, num_heads=4, maxlen=200,
                      max_candidates=0, dropout=0.2, lr=1e-3, temperature=0.05, curriculum="none", neg_active_days=0)
ML_DRY_ARGS = ["--device", "cpu", "--hidden", "32", "--num-layers", "1", "--num-heads", "2", "--maxlen", "20",
               "--batch-size", "16", "--num-workers", "0", "--val-users", "300"]


def check(name: str, ok: bool, detail: str) -> dict:
    return {"name": name, "ok": bool(ok), "detail": detail}


def md_table(header: list[str], rows: list[list], right: tuple[int, ...] = ()) -> str:
    """A markdown table; columns whose index is in `right` are right-aligned (figures)."""
    align = ["---:" if i in right else "---" for i in range(len(header))]
    return "\n".join(["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
                     + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- correctness: forward + backward -------------------------------------------------------------------------------

def loss_and_grads(model, batch: dict, setup, device: torch.device, amp: bool) -> tuple[float, dict]:
    """train.train_loss of one batch at step 0, then backward -> (loss, {parameter: gradient, float64 on the CPU})."""
    model.zero_grad(set_to_none=True)
    log_q, log_q_global = setup.log_q.to(device), setup.log_q_global.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        loss = train_loss(model, batch, log_q, setup.cfg, 0, Dist(), log_q_global, None)
    loss.backward()
    grads = {n: p.grad.detach().double().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def forward_backward_check(device: torch.device, preset: str = "reference", batch_size: int = 32,
                           itemnum: int = 100_000, amp: bool = True, seed: int = 0, sets: dict | None = None,
                           perturb: float = 0.0) -> dict:
    """One synthetic full batch, forward + backward of train.train_loss: on the CPU in fp32, and on `device`
    (under bf16 autocast when amp) from a copy of the same weights. Dropout off (its masks differ by device).
    perturb: scale the device copy's first layer weights by (1 + perturb) - for tests that this check can fail.
    -> figures: losses, gradient norms, their relative differences, the gradients' cosine, the worst tensor."""
    cpu = torch.device("cpu")
    setup = train_step.prepare_synthetic(preset, batch_size, itemnum, cpu, 1, seed=seed, dropout=0.0,
                                         id_dropout=0.0, emb_dropout=0.0, **(sets or {}))
    model, _ = train_step.build(setup, seed)
    batch = setup.batches[0]
    dev_model = copy.deepcopy(model).to(device)
    if perturb:
        with torch.no_grad():
            next(dev_model.layers.parameters()).mul_(1 + perturb)
    loss_c, grads_c = loss_and_grads(model, batch, setup, cpu, amp=False)
    loss_d, grads_d = loss_and_grads(dev_model, to_device(batch, device), setup, device, amp=amp)
    if set(grads_c) != set(grads_d):
        raise RuntimeError(f"different parameters got gradients: {sorted(set(grads_c) ^ set(grads_d))}")
    norm_c = math.sqrt(sum(float(g.square().sum()) for g in grads_c.values()))
    norm_d = math.sqrt(sum(float(g.square().sum()) for g in grads_d.values()))
    dot = sum(float((grads_c[n] * grads_d[n]).sum()) for n in grads_c)
    big = max(float(g.norm()) for g in grads_c.values())
    worst = max(((float((grads_d[n] - g).norm()) / float(g.norm()), n) for n, g in grads_c.items()
                 if float(g.norm()) > 1e-3 * big), default=(0.0, "-"))  # tiny gradients are all rounding
    return dict(loss_cpu=loss_c, loss_dev=loss_d, loss_rel=abs(loss_d - loss_c) / abs(loss_c),
                grad_norm_cpu=norm_c, grad_norm_dev=norm_d, grad_norm_rel=abs(norm_d - norm_c) / norm_c,
                grad_cos=dot / max(norm_c * norm_d, 1e-300), tensor_rel=worst[0], tensor_name=worst[1],
                tensors=len(grads_c), params=sum(p.numel() for p in model.parameters()),
                rows=int((batch["next_item"] > 0).sum()), n=batch["seq_type"].shape[1], hidden=setup.mcfg.hidden,
                layers=setup.mcfg.num_layers)


def forward_backward_ok(r: dict) -> list[dict]:
    return [check("loss: bf16 device vs fp32 CPU", r["loss_rel"] <= TOL["loss_rel"],
                  f"relative difference {r['loss_rel']:.2e} (tolerance {TOL['loss_rel']:g})"),
            check("gradient norm: bf16 device vs fp32 CPU", r["grad_norm_rel"] <= TOL["grad_norm_rel"],
                  f"relative difference {r['grad_norm_rel']:.2e} (tolerance {TOL['grad_norm_rel']:g})"),
            check("gradient direction: bf16 device vs fp32 CPU", r["grad_cos"] >= TOL["grad_cos"],
                  f"cosine {r['grad_cos']:.5f} (at least {TOL['grad_cos']:g})"),
            check("worst tensor's gradient: bf16 device vs fp32 CPU", r["tensor_rel"] <= TOL["tensor_rel"],
                  f"relative L2 error {r['tensor_rel']:.2e} in {r['tensor_name']} (tolerance {TOL['tensor_rel']:g})")]


# ---- correctness: top-K --------------------------------------------------------------------------------------------

def topk_vectors(users: int, items: int, dim: int, history: int = 50, seed: int = 0):
    """Unit user and item vectors and (users, history) exclusions (-1 = none): random positions, and for every
    other user its three best items (so exclusion changes that user's answer)."""
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(users, dim, generator=g), dim=1)
    it = F.normalize(torch.randn(items, dim, generator=g), dim=1)
    ex = torch.randint(0, items, (users, history), generator=g)
    ex[:, 1::4] = -1
    best = retrieval.topk_reference(u[::2], it, 3)[1]  # (users/2, 3)
    ex[::2, :3] = best
    return u, it, ex


def compare_topk(u: torch.Tensor, it: torch.Tensor, ex: torch.Tensor, ref: tuple, got: tuple) -> dict:
    """Two top-K answers for the same vectors, judged by exact (float64) scores: the same positions, or positions
    as good within TOPK_EPS (ties), scores right within TOPK_EPS, no excluded position returned."""
    ref_s, ref_i = ref
    got_s, got_i = (t.cpu() for t in got)
    u64, it64 = u.double(), it.double()

    def exact(pos: torch.Tensor) -> torch.Tensor:  # (U, k) float64 scores of the picked positions
        return (it64[pos.clamp(min=0)] * u64[:, None, :]).sum(-1).masked_fill(pos < 0, float("-inf"))

    e_ref, e_got = exact(ref_i), exact(got_i)
    finite = torch.isfinite(e_ref) & torch.isfinite(e_got)
    gap = float((e_ref - e_got)[finite].max()) if finite.any() else 0.0  # > 0: the CPU's pick was better
    err = float((got_s.double() - e_got)[finite].abs().max()) if finite.any() else 0.0
    hit = bool(((got_i[:, :, None] == ex[:, None, :]) & (ex[:, None, :] >= 0) & (got_i[:, :, None] >= 0)).any())
    return dict(same_positions=float((ref_i == got_i).float().mean()), rank_gap=max(gap, 0.0), score_err=err,
                excluded_returned=hit, missing=int(((got_i < 0) & (ref_i >= 0)).sum()),
                ok=gap <= TOPK_EPS and err <= TOPK_EPS and not hit and bool(((got_i < 0) == (ref_i < 0)).all()))


def topk_check(device: torch.device, users: int = 512, items: int = 1_000_000, dim: int = 512, k: int = 10,
               item_chunk: int = 65536, modes: tuple[str, ...] = ("infer", "validate"), seed: int = 0) -> dict:
    """retrieval.topk_chunked on `device` against retrieval.topk_reference on the CPU (fp32), same vectors ->
    {mode: comparison}. 'infer': fp32 vectors, no autocast, TF32 off (infer.py's call). 'validate': inside bf16
    autocast with TF32 on (train.validate's call on CUDA, with train.py's TF32 setting)."""
    u, it, ex = topk_vectors(users, items, dim, seed=seed)
    ref = retrieval.topk_reference(u, it, k, ex)
    ud, itd, exd = u.to(device), it.to(device), ex.to(device)
    out = {}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for mode in modes:
            torch.backends.cuda.matmul.allow_tf32 = mode == "validate"
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "validate"):
                got = retrieval.topk_chunked(ud, itd, k, exd, item_chunk=item_chunk)
            out[mode] = compare_topk(u, it, ex, ref, got)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return out


# ---- correctness: resume -------------------------------------------------------------------------------------------

def train_args(data: Path, cache: Path, run: Path, device: str, model: dict, workers: int, steps: int) -> list[str]:
    """main.py options of one short run into `run` (every step logged, a validation and checkpoint halfway)."""
    opts = ["--data-dir", str(data), "--cache-dir", str(cache), "--ckpt-dir", str(run / "ck"),
            "--log-dir", str(run / "logs"), "--tf-dir", str(run / "tf"), "--preset", "small", "--device", device,
            "--max-steps", str(steps), "--eval-every", str(steps // 2), "--val-users", "50", "--log-every", "1",
            "--num-workers", str(workers), "--curriculum", RESUME_CURRICULUM]
    for k, v in model.items():
        opts += ["--" + k.replace("_", "-"), str(v)]
    return opts


def run_main(argv: list[str]) -> None:
    """main.py in this process (main.py is train.main): a data error's exit becomes an exception."""
    import train
    try:
        train.main(argv)
    except SystemExit as e:
        if e.code:
            raise RuntimeError(f"main.py {' '.join(argv[:2])}...: exit code {e.code}") from None


def final_weights(run: Path, step: int) -> dict:
    import checkpoint
    return checkpoint.load_checkpoint(run / "ck" / f"global_step{step}" / "ckpt.pt")["model"]


def weight_diff(a: dict, b: dict) -> dict:
    """-> {max_abs, worst_rel (relative L2 of the worst tensor), worst (its name), equal (bit for bit)}."""
    if set(a) != set(b):
        raise RuntimeError(f"different weights: {sorted(set(a) ^ set(b))}")
    worst, name, max_abs, equal = 0.0, "-", 0.0, True
    for k in a:
        x, y = a[k].double(), b[k].double()
        equal &= torch.equal(a[k], b[k])
        max_abs = max(max_abs, float((x - y).abs().max()) if x.numel() else 0.0)
        rel = float((x - y).norm() / y.norm().clamp(min=1e-30)) if x.numel() else 0.0
        if rel > worst:
            worst, name = rel, k
    return dict(max_abs=max_abs, worst_rel=worst, worst=name, equal=equal)


def straight_and_resumed(root: Path, data: Path, cache: Path, device: str, model: dict, workers: int,
                         steps: int, again: bool = False) -> dict:
    """`steps` steps straight, and steps/2, stop (--stop-at), --resume latest, the rest -> weight_diff (resumed vs
    straight); again: one more straight run, its weight_diff against the first under "noise" (run-to-run)."""
    import shutil
    shutil.rmtree(root, ignore_errors=True)  # a fresh checkpoint folder for each run (main.py insists)
    a, b, c = root / "straight", root / "resumed", root / "again"
    run_main(train_args(data, cache, a, device, model, workers, steps))
    run_main(train_args(data, cache, b, device, model, workers, steps) + ["--stop-at", str(steps // 2)])
    run_main(["--resume", "latest", "--ckpt-dir", str(b / "ck"), "--log-dir", str(b / "logs"),
              "--tf-dir", str(b / "tf"), "--device", device, "--num-workers", str(workers)])
    out = weight_diff(final_weights(b, steps), final_weights(a, steps))
    if again:
        run_main(train_args(data, cache, c, device, model, workers, steps))
        out["noise"] = weight_diff(final_weights(c, steps), final_weights(a, steps))
    return out


def resume_check(work: Path, device: str, sizes: dict, steps: int = 8) -> dict:
    """The resume comparison under torch.use_deterministic_algorithms(True) (exact expected; if an op refuses,
    its error is kept and the runs repeat with warn_only=True, the warned ops listed), then in the default mode
    (within resume_tolerance of a second uninterrupted run's difference)."""
    import get_stat
    import make_sample_data
    users, items = sizes["resume_data"]
    root = work / "resume"
    if not (root / "data" / "data" / "seq.jsonl").exists():
        make_sample_data.generate(str(root / "data"), users=users, items=items, seed=3, progress=False)
    data, cache = root / "data" / "data", root / "data" / "cache"
    get_stat.run(data, cache)
    args = (data, cache, device, sizes["resume_model"], sizes["resume_workers"], steps)
    out = {"steps": steps, "cublas_workspace": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}
    try:
        torch.use_deterministic_algorithms(True)
        try:
            out["deterministic"] = straight_and_resumed(root / "det", *args)
        except RuntimeError as e:  # an op without a deterministic implementation says which it is
            if "determinis" not in str(e):
                raise
            out["refused"] = str(e).strip().splitlines()[0][:300]
            torch.use_deterministic_algorithms(True, warn_only=True)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out["deterministic"] = straight_and_resumed(root / "det_warn", *args, again=True)
            out["nondeterministic_ops"] = sorted({str(w.message).splitlines()[0][:200] for w in caught
                                                  if "deterministic" in str(w.message)})
    finally:
        torch.use_deterministic_algorithms(False)
    out["default"] = straight_and_resumed(root / "default", *args, again=True)
    return out


def resume_tolerance(d: dict) -> float:
    """What CUDA allows a resumed run: RESUME_TOL, or 10x the difference between two uninterrupted runs."""
    return max(RESUME_TOL, 10 * d["noise"]["worst_rel"]) if "noise" in d else RESUME_TOL


def resume_ok(r: dict) -> list[dict]:
    det, dflt = r["deterministic"], r["default"]

    def within(d: dict) -> str:
        noise = f"; two uninterrupted runs differ by {d['noise']['worst_rel']:.2e}" if "noise" in d else ""
        return (f"worst tensor {d['worst']} relative L2 {d['worst_rel']:.2e}, max |diff| {d['max_abs']:.2e} "
                f"(tolerance {resume_tolerance(d):.2g}{noise}); bit for bit: {'yes' if d['equal'] else 'no'}")

    if "refused" in r:
        det_check = check("resume, deterministic algorithms (warn only)", det["worst_rel"] <= resume_tolerance(det),
                          f"an op refused deterministic mode ({r['refused']}); with warn_only: {within(det)}")
    else:
        det_check = check("resume, deterministic algorithms: bit for bit", det["equal"],
                          "every weight equal" if det["equal"] else
                          f"max |diff| {det['max_abs']:.2e}, worst tensor {det['worst']} ({det['worst_rel']:.2e})")
    return [det_check, check("resume, default mode: within tolerance", dflt["worst_rel"] <= resume_tolerance(dflt),
                             within(dflt))]


# ---- sections: each takes the run's context and returns {status, md, figures, checks} ---------------------------

def run_bounded(cmd: list[str], timeout: float, env: dict | None = None) -> int | None:
    """A command in its own process group, its output into ours; the whole group killed after `timeout` s
    -> its exit code, or None when it ran out of time."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        kill_group(proc)
        return None


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process's group (it and what it started), SIGKILL 10 s later if it is still there."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=10)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def remaining(ctx: dict) -> float:
    return ctx["deadline"] - time.time()


def fmt_gib(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def sec_env(ctx: dict) -> dict:
    import importlib
    pkgs, missing = [], []
    for name in ("torch", "numpy", "polars", "tqdm", "tensorboard", "pytest"):
        try:
            pkgs.append(f"{name} {importlib.import_module(name).__version__}")
        except ImportError:
            missing.append(name)
    mem = next((int(l.split()[1]) / 2**20 for l in Path("/proc/meminfo").read_text().splitlines()
                if l.startswith("MemTotal:")), 0.0) if Path("/proc/meminfo").exists() else 0.0
    lines = [f"- Python {platform.python_version()} ({sys.executable}); {', '.join(pkgs)}"
             + (f"; **missing: {', '.join(missing)}**" if missing else ""),
             f"- CPU: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), {mem:.0f} GiB memory, "
             f"1-min load average {os.getloadavg()[0]:.1f}"]
    figures = {"cpus": os.cpu_count(), "missing": missing}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        figures.update(device_name=p.name, total_gib=p.total_memory / 2**30)
        lines.append(f"- GPU: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}, "
                     f"{p.multi_processor_count} multiprocessors; CUDA {torch.version.cuda}, cuDNN "
                     f"{torch.backends.cudnn.version()}; {torch.cuda.device_count()} device(s)")
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            lines.append(f"- nvidia-smi: {smi.stdout.strip() or smi.stderr.strip()}")
        except (OSError, subprocess.TimeoutExpired) as e:
            lines.append(f"- nvidia-smi: {e}")
    else:
        lines.append("- GPU: none (torch.cuda.is_available() is False)")
    checks = [check("packages the project needs", not missing, "all importable" if not missing else
                    f"missing: {', '.join(missing)} (carry their wheels)")]
    if not ctx["dry"]:
        checks.append(check("CUDA available", torch.cuda.is_available(), torch.version.cuda or "no CUDA build"))
    return {"md": "\n".join(lines), "figures": figures, "checks": checks}


def sec_cuda_tests(ctx: dict) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(remaining(ctx) - 5, 5))
    print(r.stdout + r.stderr, flush=True)  # into this section's log
    out = (r.stdout + r.stderr).strip().splitlines()
    summary = next((l.strip("= ") for l in reversed(out) if any(w in l for w in ("passed", "failed", "skipped",
                                                                                   "error", "no tests"))), "?")
    counts = {w: int(n) for n, w in (t.split()[:2] for t in summary.split(" in ")[0].split(", ") if " " in t)
              if n.isdigit()}
    failed = [l for l in out if l.startswith(("FAILED", "ERROR"))]
    lines = [f"- command: `{' '.join(['python'] + cmd[1:])}` -> exit code {r.returncode}", f"- result: {summary}"]
    lines += [f"  - {l[:300]}" for l in failed]
    cuda = torch.cuda.is_available()
    ok = r.returncode == 0 and (counts.get("passed", 0) > 0 if cuda else counts.get("failed", 0) == 0)
    return {"md": "\n".join(lines), "figures": {"summary": summary, **counts},
            "checks": [check("CUDA tests (pytest -m cuda)", ok, summary + ("" if cuda else " (no CUDA here)"))]}


def sec_forward_backward(ctx: dict) -> dict:
    size = SIZES[ctx["size"]]
    device = torch.device(ctx["device"])
    sets = DRY_MODEL if ctx["dry"] else {}
    torch.backends.cuda.matmul.allow_tf32 = True  # train.py's setting
    r = forward_backward_check(device, "reference", size["fb_batch"], size["fb_items"], amp=True, sets=sets)
    prec = f"{device.type} bf16 autocast"
    md = [f"One synthetic full batch of the reference configuration (B={size['fb_batch']}, N={r['n']}, "
          f"D={r['hidden']}, {r['layers']} layers, {r['params'] / 1e6:.1f}M parameters, {size['fb_items']:,} items, "
          f"R={r['rows']:,} target rows; dropout off), train.train_loss at step 0, forward + backward: on the CPU "
          f"in fp32, and on {device.type} under bf16 autocast from the same weights. {r['tensors']} gradient "
          "tensors compared.", "",
          md_table(["quantity", "CPU fp32", prec, "difference", "tolerance"],
                   [["loss", f"{r['loss_cpu']:.6f}", f"{r['loss_dev']:.6f}", f"{r['loss_rel']:.2e} relative",
                     f"{TOL['loss_rel']:g}"],
                    ["gradient norm, all parameters", f"{r['grad_norm_cpu']:.6f}", f"{r['grad_norm_dev']:.6f}",
                     f"{r['grad_norm_rel']:.2e} relative", f"{TOL['grad_norm_rel']:g}"],
                    ["gradient cosine, all parameters", "", "", f"{r['grad_cos']:.6f}", f">= {TOL['grad_cos']:g}"],
                    [f"worst tensor ({r['tensor_name']}), relative L2 error", "", "", f"{r['tensor_rel']:.2e}",
                     f"{TOL['tensor_rel']:g}"]], right=(1, 2, 3, 4))]
    return {"md": "\n".join(md), "figures": r, "checks": forward_backward_ok(r)}


def sec_topk(ctx: dict) -> dict:
    users, items, dim = SIZES[ctx["size"]]["topk"]
    device = torch.device(ctx["device"])
    res = topk_check(device, users, items, dim, item_chunk=65536 if not ctx["dry"] else 1024)
    names = {"infer": "as infer.py calls it: fp32, no autocast, TF32 off",
             "validate": "as train.validate calls it on CUDA: inside bf16 autocast, TF32 on"}
    rows = [[names[m], f"{100 * r['same_positions']:.2f}%", f"{r['rank_gap']:.2e}", f"{r['score_err']:.2e}",
             "yes" if r["excluded_returned"] else "no", "yes" if r["ok"] else "**no**"] for m, r in res.items()]
    md = [f"{users:,} users x {items:,} items x {dim}, k = 10, unit vectors; 50 exclusions a user (every other "
          f"user's three best items among them). retrieval.topk_chunked on {device.type} against "
          "retrieval.topk_reference on the CPU (fp32), judged by exact float64 scores: 'rank gap' is how much better "
          f"the CPU's pick at a rank is (ties: 0), 'score error' the returned scores' error; both within "
          f"{TOPK_EPS:g} to pass.", "",
          md_table(["call", "same positions", "rank gap", "score error", "excluded item returned", "equal"], rows,
                   right=(1, 2, 3))]
    if not res["validate"]["ok"]:
        md += ["", "train.validate runs topk_chunked inside its bf16 autocast block, so on CUDA the score matmul "
               "runs in bf16 and the scores are rounded to bf16 (about 3 significant digits) before ranking: "
               "validation ranks near-ties arbitrarily. infer.py calls it outside autocast."]
    checks = [check(f"top-K {names[m]}", r["ok"], f"rank gap {r['rank_gap']:.2e}, score error {r['score_err']:.2e}, "
                    f"{100 * r['same_positions']:.2f}% same positions") for m, r in res.items()]
    return {"md": "\n".join(md), "figures": res, "checks": checks}


def sec_resume(ctx: dict) -> dict:
    size = SIZES[ctx["size"]]
    r = resume_check(Path(ctx["work"]), ctx["device"], size)
    m = size["resume_model"]
    md = [f"main.py (train.main, in this process) on generated sample data ({size['resume_data'][0]} users, "
          f"{size['resume_data'][1]} items), small preset at width {m['hidden']}, {m['num_layers']} layer(s), "
          f"B={m['batch_size']}, {size['resume_workers']} loader workers, on {ctx['device']}: {r['steps']} steps "
          f"straight against {r['steps'] // 2} steps, --stop-at, --resume latest, {r['steps'] // 2} more (a "
          "curriculum that reaches hard negatives on the way); the final checkpoints' weights compared. "
          f"CUBLAS_WORKSPACE_CONFIG={r['cublas_workspace']}.", ""]
    rows = []
    for mode, label in (("deterministic", "torch.use_deterministic_algorithms(True)"), ("default", "default")):
        d = r[mode]
        noise = f"{d['noise']['worst_rel']:.2e}" if "noise" in d else "-"
        rows.append([label, "yes" if d["equal"] else "no", f"{d['max_abs']:.2e}", f"{d['worst_rel']:.2e}", d["worst"],
                     noise, f"{resume_tolerance(d):.2g}" if mode == "default" or "refused" in r else "exact"])
    md.append(md_table(["mode", "bit for bit", "max abs diff", "worst tensor relative L2", "worst tensor",
                        "two straight runs differ by", "tolerance"], rows, right=(2, 3, 5)))
    if "refused" in r:
        md += ["", f"Deterministic mode refused an op: `{r['refused']}`; the deterministic row ran with "
               "warn_only=True. Ops without a deterministic implementation:"] + [f"- {w}" for w in
                                                                                  r["nondeterministic_ops"]]
    return {"md": "\n".join(md), "figures": r, "checks": resume_ok(r)}


def step_rows(fig: dict, batch: int | None = None, compiled: bool | None = None, id_update: str = "dense",
              note: bool = False) -> list[dict]:
    """train_step's measured rows (no errors or skips) of one configuration."""
    return [r for r in fig.get("rows", []) if "step_s" in r and r["id_update"] == id_update
            and (batch is None or r["batch"] == batch) and (compiled is None or r["compile"] == compiled)
            and bool(r["note"]) == note]


def sec_train_step(ctx: dict) -> dict:
    size, dry = SIZES[ctx["size"]], ctx["dry"]
    work = Path(ctx["work"])
    argv = ["--preset", "reference", "--batch-size", str(size["step_batch"]), "--synthetic-items",
            str(size["step_items"]), "--precision", "bf16", "--id-update", "dense", "rowwise", "--find-max-batch",
            "--max-batch-cap", str(size["step_cap"]), "--val-pass", "--peak-tflops", str(ctx["peak_tflops"]),
            "--steps", str(size["step_steps"]), "--warmup", str(size["step_warmup"]), "--batches", "4",
            "--device", ctx["device"], "--time-budget", f"{max(remaining(ctx) - 20, 30):.0f}",
            "--out", str(work / "train_step.md"), "--json", str(work / "train_step.json")]
    if dry:  # tiny model, and torch.compile traced by dynamo but not compiled by inductor (minutes on a CPU)
        argv += ["--compile-backend", "eager", "--matmul-n", "256"] + [f"--set={k}={v}" for k, v in DRY_MODEL.items()]
    (work / "train_step.json").unlink(missing_ok=True)
    # its own process, stopped short of this section's limit: what it measured by then stays (it writes as it goes)
    rc = run_bounded([sys.executable, "-u", str(BENCH / "train_step.py"), *argv], remaining(ctx) - 10)
    if not (work / "train_step.json").exists():
        raise RuntimeError(f"bench/train_step.py {'ran out of time' if rc is None else f'exited with {rc}'} "
                           "before its first configuration")
    fig = json.loads((work / "train_step.json").read_text())
    figures = step_figures(fig, size["step_batch"], ctx["peak_tflops"])
    md = [(work / "train_step.md").read_text().split("\n", 1)[1].strip(), ""]  # the table without its title
    for idu in ("dense", "rowwise"):
        b = figures["best"] if idu == "dense" else figures["best_rowwise"]
        md.append(f"- reference step, B={size['step_batch']}, bf16, --id-update {idu}: best MFU " + (
            f"**{100 * b['mfu']:.1f}%** ({'compiled' if b['compile'] else 'eager'}, {1e3 * b['step_s']:.1f} ms/step, "
            f"{b['seqs_per_s']:,.0f} seq/s) against {ctx['peak_tflops']:g} TFLOP/s; target {100 * MFU_TARGET:.0f}%"
            if b else "not measured"))
    search = figures["search"]
    md += [f"- memory, --id-update dense (allocator footprint, max_memory_reserved): training "
           f"{fmt_gib(figures['train_peak_gib'])} GiB, a validation pass with the training state resident "
           f"{fmt_gib(figures['val_peak_gib'])} GiB, against {figures['usable_gib']:.1f} GiB usable on a "
           f"{MEMORY_CARD_GB} GB card (bench/scale.py's usable_gib)",
           f"- largest batch that fits on this card ({search.get('precision', '-')}, dense id update): "
           f"{search.get('batch', '-')}"]
    if not fig["complete"]:
        md.append(f"- bench/train_step.py was stopped at this section's time limit "
                  f"({'exit code ' + str(rc) if rc is not None else 'timeout'}): the rows above are what it measured")
    failed = [r for r in fig["rows"] if "error" in r] + [s for s in fig["searches"] if s.get("error")]
    checks = [check("training step configurations run", not failed and fig["complete"],
                    "; ".join(f"B={r.get('batch')} {r['id_update']}: {r['error']}" for r in failed)
                    or f"{len(fig['rows'])} configurations" + ("" if fig["complete"] else ", then stopped"))]
    return {"md": "\n".join(md), "figures": figures, "checks": checks}


def step_figures(fig: dict, batch: int, peak_tflops: float) -> dict:
    """bench/train_step.py's JSON -> MFU of every row, the best at the reference batch per id update, the
    training and validation memory of the reference batch (dense id update), the largest batch."""
    import scale
    for r in fig["rows"]:
        if "step_s" in r:
            r["mfu"] = r["flops"] / r["step_s"] / (peak_tflops * 1e12)
    ref = step_rows(fig, batch)
    best = {idu: max(step_rows(fig, batch, id_update=idu), key=lambda r: r["mfu"], default=None)
            for idu in ("dense", "rowwise")}
    return dict(rows=fig["rows"], search=fig["searches"][0] if fig["searches"] else {}, best=best["dense"],
                best_rowwise=best["rowwise"], usable_gib=scale.usable_gib(MEMORY_CARD_GB),
                train_peak_gib=max((r["reserved_gib"] for r in ref if r.get("reserved_gib") is not None), default=None),
                val_peak_gib=max((r["val_reserved_gib"] for r in ref if r.get("val_reserved_gib") is not None),
                                 default=None),
                step_seqs_per_s=max((r["seqs_per_s"] for r in ref), default=None))


def load_bench_loss():
    """bench/loss.py as a module of its own name (it would shadow the project's loss.py as 'loss')."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_loss", BENCH / "loss.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def time_loss(fn, inputs: dict, kw: dict, device: torch.device, repeats: int, default_device: bool) -> dict:
    """Forward + backward of a loss implementation: warm-up, then `repeats` timed runs -> seconds (the fastest),
    peak GiB above what was allocated before (CUDA), the loss value and the three leaves' gradients (CPU)."""
    leaves = ("query", "pos", "neg")

    def once() -> torch.Tensor:
        for k in leaves:
            inputs[k].grad = None
        if default_device:  # bench/loss.py's dense form makes its mask with torch.zeros(...) and no device
            with torch.device(device):
                loss = fn(**inputs, **kw)
        else:
            loss = fn(**inputs, **kw)
        loss.backward()
        return loss.detach()

    once()
    for k in leaves:
        inputs[k].grad = None
    sync(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        loss = once()
        sync(device)
        times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if cuda else None
    return dict(seconds=min(times), peak_gib=peak, loss=float(loss),
                grads=[inputs[k].grad.detach().cpu() for k in leaves])


def sec_loss(ctx: dict) -> dict:
    import loss as project_loss
    bl = load_bench_loss()
    b, n, d, m = SIZES[ctx["size"]]["loss"]
    device = torch.device(ctx["device"])
    torch.backends.cuda.matmul.allow_tf32 = True  # train.py's setting
    cpu_inputs = bl.make_inputs(b, n, d, m, 1.0, 0)
    inputs = {k: v.detach().to(device).requires_grad_(v.requires_grad) for k, v in cpu_inputs.items()}
    rows, checks, figures = [], [], {}
    cases = [("all negatives", {}), ("hard_k=8192, share 0.5", {"hard_k": 8192, "global_share": 0.5})]
    for label, kw in cases:
        res = {}
        for impl, fn in (("ours", project_loss.sampled_softmax_loss), ("dense", bl.dense_loss)):
            try:
                res[impl] = time_loss(fn, inputs, {"temperature": 0.01, **kw}, device,
                                      SIZES[ctx["size"]]["loss_repeats"], impl == "dense")
            except Exception as e:  # noqa: BLE001 - out of memory, say: a result
                res[impl] = {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        ok, cmp = False, "-"
        if all("error" not in r for r in res.values()):
            ids = (cpu_inputs["pos_ids"], cpu_inputs["neg_ids"])
            dv = abs(res["ours"]["loss"] - res["dense"]["loss"]) / abs(res["dense"]["loss"])
            dg = bl.grad_diff(bl.item_grads(res["ours"]["grads"], *ids), bl.item_grads(res["dense"]["grads"], *ids))
            ok = dv <= LOSS_TOL["value_rel"] and dg <= LOSS_TOL["grad_rel"]
            cmp = f"value {dv:.1e}, gradients {dg:.1e}"
        checks.append(check(f"loss ({label}): ours equals the dense form", ok, cmp if cmp != "-" else
                            "; ".join(f"{k}: {v['error']}" for k, v in res.items() if "error" in v)))
        for impl, r in res.items():
            r.pop("grads", None)
            if "error" in r:
                rows.append([label, impl, "-", "-", "-", f"failed: {r['error']}"])
            else:
                ratio = (f"{r['seconds'] / res['dense']['seconds']:.2f}" if "seconds" in res["dense"] else "-")
                rows.append([label, impl, f"{1e3 * r['seconds']:.1f}", ratio, fmt_gib(r["peak_gib"]),
                             f"{r['loss']:.6f}" + (f" ({cmp})" if impl == "ours" else "")])
        figures[label] = res
    md = [f"B={b} sequences x N={n} target rows each (R={b * n:,}), D={d}, candidates the R global negatives and the "
          f"R in-batch positives (C={2 * b * n:,}), item ids Zipf over {m:,} items (bench/loss.py's make_inputs), "
          f"temperature 0.01, on {device.type}: loss.sampled_softmax_loss (chunked, checkpointed) against "
          "bench/loss.py's dense form (the full (R, C) fp32 logits and mask), forward + backward, fp32 with TF32 "
          f"as train.py sets it; the fastest of {SIZES[ctx['size']]['loss_repeats']} after a warm-up; peak = "
          "max_memory_allocated above the inputs. Tolerance: value "
          f"{LOSS_TOL['value_rel']:g}, gradients {LOSS_TOL['grad_rel']:g} (relative, per item).", "",
          md_table(["negatives", "implementation", "fwd+bwd ms", "time vs dense", "peak GiB", "loss"], rows,
                   right=(2, 3, 4))]
    return {"md": "\n".join(md), "figures": figures, "checks": checks}


def retrieve_all(users: torch.Tensor, items: torch.Tensor, k: int, block: int, chunk: int, until: float) -> dict:
    """topk_chunked over user blocks (a block x chunk score matrix at a time) until done or `until` (epoch s)
    -> {users done, seconds, the answers (positions, scores) of the users done}."""
    device = users.device
    pos = torch.empty(len(users), k, dtype=torch.long, device=device)
    val = torch.empty(len(users), k, device=device)
    sync(device)
    t = time.perf_counter()
    done = 0
    for start in range(0, len(users), block):
        val[start:start + block], pos[start:start + block] = retrieval.topk_chunked(users[start:start + block],
                                                                                    items, k, item_chunk=chunk)
        done = min(start + block, len(users))
        if time.time() > until:
            break
    sync(device)
    return dict(done=done, seconds=time.perf_counter() - t, pos=pos[:done], val=val[:done])


def sec_retrieval(ctx: dict) -> dict:
    n_users, n_items, dim, block, chunk = SIZES[ctx["size"]]["retr"]
    device = torch.device(ctx["device"])
    g = torch.Generator(device=device).manual_seed(0)
    users = F.normalize(torch.randn(n_users, dim, device=device, generator=g), dim=1)
    items = F.normalize(torch.randn(n_items, dim, device=device, generator=g), dim=1)
    rows, checks, figures = [], [], {}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    for name, dtype in (("fp32 (TF32 off; exact, as infer.py)", torch.float32), ("bf16 vectors", torch.bfloat16)):
        left = remaining(ctx) - 10
        if left < 5:
            rows.append([name, "-", "-", "-", "-", "skipped: no time left"])
            continue
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            r = retrieve_all(users.to(dtype), items.to(dtype), 10, block, chunk, time.time() + left / 2)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        full_s = r["seconds"] * n_users / r["done"]
        flops = 2.0 * n_users * n_items * dim
        note = "; ".join(x for x in (
            "" if dtype == torch.float32 else "scores rounded to bf16 before ranking: near-ties in any order",
            "" if r["done"] == n_users else f"cut at {r['done']:,} users by the time limit; total extrapolated") if x)
        rows.append([name, f"{r['done']:,}", f"{r['seconds']:.1f}", f"{full_s:.1f}", f"{flops / full_s / 1e12:.1f}",
                     note])
        figures[str(dtype).split(".")[-1]] = dict(done=r["done"], seconds=r["seconds"], full_s=full_s)
        if dtype == torch.float32:  # the first users against the full score matrix, float64
            m = min(256, r["done"])
            ref = retrieval.topk_reference(users[:m].double(), items.double(), 10)
            cmp = compare_topk(users[:m].cpu(), items.cpu(), torch.full((m, 1), -1),
                               (ref[0].float().cpu(), ref[1].cpu()), (r["val"][:m], r["pos"][:m]))
            checks.append(check("exact top-10 of the first users (fp32 blocks vs float64 full matrix)", cmp["ok"],
                                f"{m} users: rank gap {cmp['rank_gap']:.2e}, score error {cmp['score_err']:.2e}"))
        del r
    md = [f"{n_users:,} users x {n_items:,} items x {dim}, unit vectors, k = 10, no exclusions: "
          f"retrieval.topk_chunked on {device.type} over blocks of {block:,} users (item_chunk {chunk:,}: a "
          f"{block:,} x {chunk:,} fp32 score matrix at a time). TFLOP/s counts the score matmul only.", "",
          md_table(["vectors", "users done", "seconds", "all users, s", "TFLOP/s", "note"], rows, right=(1, 2, 3, 4))]
    return {"md": "\n".join(md), "figures": figures, "checks": checks}


def sec_dataloader(ctx: dict) -> dict:
    import dataloader
    size, work = SIZES[ctx["size"]], Path(ctx["work"])
    cpus = os.cpu_count() or 1
    default_workers = min(max(cpus - 1, 0), 8)  # train.py's default --num-workers on one GPU
    workers = sorted({0, default_workers} if ctx["dry"] else {max(cpus // 4, 1), default_workers, max(cpus - 1, 1)})
    step = (ctx["prior"].get("train_step") or {}).get("figures", {}).get("step_seqs_per_s")
    argv = ["--users", str(size["loader_users"]), "--preset", "reference", "--batch-size", str(size["loader_batch"]),
            "--workers", *map(str, workers), "--batches", str(size["loader_batches"]), "--warmup", "3",
            "--samples", "300", "--workdir", str(work / "data"), "--out", str(work / "dataloader.md"),
            "--json", str(work / "dataloader.json")]
    if step:
        argv += ["--step-rate", f"{step:.1f}", "--step-note", "the train_step section's reference step at "
                 f"B={size['step_batch']}, bf16 (the faster of eager and compiled; full synthetic sequences)"]
    else:  # measured by bench/dataloader.py itself on the device (eager, its own batches)
        argv += ["--device", ctx["device"], "--step-steps", "3" if ctx["dry"] else "10"]
    table = dataloader.main(argv)
    fig = json.loads((work / "dataloader.json").read_text())
    rate = fig["rates"].get(str(default_workers), fig["rates"][str(max(workers))])["seqs_per_s"]
    best = max(r["seqs_per_s"] for r in fig["rates"].values())
    fig.update(default_workers=default_workers, keeps_up=rate >= fig["step_rate"],
               ratio=rate / fig["step_rate"], best_ratio=best / fig["step_rate"])
    md = [table.split("\n", 1)[1].strip(), "",
          f"- does it keep up? at train.py's default of {default_workers} workers on this machine: "
          f"{rate:,.0f} seq/s against the step's {fig['step_rate']:,.0f} ({fig['ratio']:.2f}x): "
          f"**{'yes' if fig['keeps_up'] else 'no'}**; the best worker count gives {fig['best_ratio']:.2f}x. "
          f"Sample data has {fig['mean_events']:.0f} events a user on average (the real data: up to 100), and the "
          "loader ran alone here, without a training process beside it."]
    return {"md": "\n".join(md), "figures": fig, "checks": []}


def sec_movielens(ctx: dict) -> dict:
    if not ctx.get("ml1m"):
        return {"status": "skipped", "md": "Skipped: no MovieLens-1M folder given (--ml1m DIR: ratings.dat, users.dat, "
                "movies.dat, or interactions_chrono.csv.gz + users.dat + movies.dat).", "figures": {}, "checks": []}
    src = Path(ctx["ml1m"])
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: not a folder (--ml1m: the MovieLens-1M files)")
    size, dry, device = SIZES[ctx["size"]], ctx["dry"], torch.device(ctx["device"])
    out = Path(ctx["work"]) / "movielens"
    ml = out / "ml-1m"
    env = {**os.environ, "PYTHON": sys.executable}
    # the same conversion and statistics bench/movielens.sh starts with (it then finds them done)
    if not (ml / "data" / "seq.jsonl").exists():
        subprocess.run([sys.executable, "-u", "convert_movielens.py", str(src), str(ml)], cwd=ROOT, check=True, env=env)
    subprocess.run([sys.executable, "-u", "get_stat.py", "--data-dir", str(ml / "data"), "--cache-dir",
                    str(ml / "cache")], cwd=ROOT, check=True, env=env)
    # the step time of the gpu profile on this data, to size STEPS to the time left
    prof = dict(ML_GPU_PROFILE)
    if dry:
        prof.update(hidden=32, num_layers=1, num_heads=2, maxlen=20, batch_size=16)
    preset, batch = prof.pop("preset"), prof.pop("batch_size")
    setup = train_step.prepare(preset, batch, ml / "data", ml / "cache", device, 4, **prof)
    step_s = train_step.measure(setup, 3 if dry else 10, 2, amp=device.type == "cuda")["step_s"]
    del setup
    budget = remaining(ctx) - size["ml_overhead_s"]
    steps = min(int(0.8 * budget / step_s), size["ml_max_steps"] or 10**9) // 6 * 6
    shrunk = " (dry run: TRAIN_ARGS shrink it, on the CPU)" if dry else ""
    head = (f"bench/movielens.sh with PROFILE=gpu, MODELS=hstu{shrunk}: a measured {1e3 * step_s:.1f} ms a step "
            f"(batches preloaded), {remaining(ctx):.0f} s left, of which {size['ml_overhead_s']:.0f} s are kept for "
            "start-up, validations, inference and evaluation, and 80% of the rest trains")
    if steps < size["ml_min_steps"]:
        return {"status": "skipped", "md": f"{head}: {steps} steps, fewer than {size['ml_min_steps']}: skipped.",
                "figures": {"step_s": step_s, "steps": steps}, "checks": []}
    env.update(PROFILE="gpu", MODELS="hstu", STEPS=str(steps), TRAIN_ARGS=" ".join(ML_DRY_ARGS) if dry else "")
    t = time.time()
    rc = run_bounded(["bash", "bench/movielens.sh", str(src), str(out)], remaining(ctx) - 3, env)
    if rc != 0:
        raise RuntimeError(f"bench/movielens.sh {'ran out of time' if rc is None else f'exited with {rc}'} "
                           "(its output is in this section's log)")
    m = json.loads((out / "hstu" / "metrics.json").read_text())["model"]["all"]
    summary = (out / "summary.md").read_text().strip().splitlines()[-1]
    md = [f"{head}: STEPS={steps}; {time.time() - t:.0f} s in all.", "",
          "| model | HR@10 | NDCG@10 | HR@50 | NDCG@50 | HR@200 | MRR | best (validation) | training |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |", summary]
    return {"md": "\n".join(md), "figures": {"step_s": step_s, "steps": steps, **m}, "checks": []}


SECTIONS = {  # name: (title, function, time cap on the GPU s, in a dry run s)
    "env": ("Machine", sec_env, 60, 60),
    "cuda_tests": ("Correctness: CUDA tests (pytest -m cuda)", sec_cuda_tests, 120, 90),
    "forward_backward": ("Correctness: forward + backward, bf16 on the device vs fp32 on the CPU",
                         sec_forward_backward, 120, 90),
    "topk": ("Correctness: GPU top-K vs CPU top-K", sec_topk, 90, 60),
    "resume": ("Correctness: resumed run vs uninterrupted run", sec_resume, 150, 90),
    "train_step": ("Reference configuration: training step", sec_train_step, 270, 120),
    "loss": ("Loss at the reference size: ours vs the dense form", sec_loss, 90, 60),
    "retrieval": ("Retrieval: exact top-10, 1M users x 1M items", sec_retrieval, 90, 60),
    "dataloader": ("Data loader against the step", sec_dataloader, 90, 90),
    "movielens": ("MovieLens-1M, gpu profile, for the time left", sec_movielens, None, None),
}
RESERVE_S = 25  # kept for each later section (but movielens) when a section's limit is set
CORRECTNESS = ("env", "cuda_tests", "forward_backward", "topk", "resume")


# ---- the driver: one process per section -------------------------------------------------------------------------

def child(name: str, ctx_path: Path) -> int:
    """Run one section in this process; its result goes to WORK/sections/NAME.json."""
    ctx = json.loads(ctx_path.read_text())
    if ctx["device"] == "cpu" and "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    try:
        res = SECTIONS[name][1](ctx)
        res.setdefault("status", "ok")
    except Exception as e:  # noqa: BLE001 - recorded with its error; the run goes on with the next section
        traceback.print_exc()
        res = {"status": "failed", "error": f"{type(e).__name__}: {str(e).strip()[:500]}",
               "md": "```\n" + traceback.format_exc(limit=6)[-3000:] + "```", "figures": {}, "checks": []}
    atomic_save_json(res, Path(ctx["sections"]) / f"{name}.json")
    return 1 if res["status"] == "failed" else 0


def run_child(name: str, ctx: dict, timeout: float, env: dict, log: Path) -> tuple[int | None, str]:
    """The section in a process of its own session, output teed to `log` and to stdout ('[name] ...'), killed
    (its whole process group) after `timeout` s -> (exit code or None on timeout, the output's last lines)."""
    ctx_path = Path(ctx["sections"]) / f"{name}.ctx.json"
    atomic_save_json(ctx, ctx_path)
    proc = subprocess.Popen([sys.executable, "-u", str(Path(__file__).resolve()), "--child", name, "--ctx",
                             str(ctx_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    tail: list[str] = []

    def tee() -> None:
        with open(log, "w") as f:
            for line in proc.stdout:
                f.write(line)
                shown = line.rstrip("\n").rsplit("\r", 1)[-1]  # a progress bar's last state
                print(f"[{name}] {shown}", flush=True)
                tail.append(shown)
                del tail[:-40]

    reader = threading.Thread(target=tee, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = None
        kill_group(proc)
    reader.join(timeout=10)
    return rc, "\n".join(tail[-15:])


def section_env(name: str, dry: bool) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if dry:  # the CPU only, one thread (tiny tensors; a busy machine stalls multi-threaded ops)
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    else:
        env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(os.cpu_count() or 1))
    if name == "resume":  # cuBLAS's deterministic workspace; read when the CUDA context starts
        env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return env


def headline(name: str, rec: dict) -> str:
    """One line of a section's result for the summary."""
    f, checks = rec.get("figures") or {}, rec.get("checks") or []
    if rec["status"] in ("failed", "timeout"):
        return rec.get("error", "")[:200]
    if rec["status"] == "skipped":
        return (rec.get("md") or "").splitlines()[0][:200] if rec.get("md") else ""
    bad = [c["name"] for c in checks if not c["ok"]]
    text = (f"{len(checks) - len(bad)}/{len(checks)} checks pass" + (f"; failing: {'; '.join(bad)}" if bad else "")
            if checks else "")
    if name == "train_step" and f.get("best"):
        b = f["best"]
        text += (f"; B={b['batch']}: {100 * b['mfu']:.1f}% MFU, {b['seqs_per_s']:,.0f} seq/s, training "
                 f"{fmt_gib(f['train_peak_gib'])} GiB, validation {fmt_gib(f['val_peak_gib'])} GiB; largest batch "
                 f"{f['search'].get('batch', '-')}")
    elif name == "retrieval" and f.get("float32"):
        text += f"; fp32: {f['float32']['full_s']:.1f} s for all users"
    elif name == "dataloader" and f.get("step_rate"):
        text += (f"keeps up: {'yes' if f['keeps_up'] else 'no'} ({f['ratio']:.2f}x the step at "
                 f"{f['default_workers']} workers)")
    elif name == "movielens" and "HR@10" in f:
        text += f"HR@10 {f['HR@10']:.4f}, NDCG@10 {f['NDCG@10']:.4f} after {f['steps']} steps"
    elif name == "env":
        text += f"; {f.get('device_name', 'no GPU')}, {f.get('cpus')} CPU cores"
    elif name == "cuda_tests":
        text += f"; {f.get('summary', '')}"
    return text.strip("; ")


def targets(records: dict, dry: bool) -> list[list[str]]:
    """The issue's targets: [target, measured, met]."""
    where = "CPU (dry run)" if dry else "CUDA"
    corr = [c for n in CORRECTNESS if n in records for c in records[n].get("checks", [])]
    broken = [n for n in CORRECTNESS if n in records and records[n]["status"] in ("failed", "timeout")]
    bad = [c["name"] for c in corr if not c["ok"]] + [f"{n} ({records[n]['status']})" for n in broken]
    rows = [[f"correctness checks pass on {where}", f"{len(corr) - len(bad)}/{len(corr)} pass"
             + (f"; failing: {'; '.join(bad)}" if bad else ""), "yes" if corr and not bad else "**no**"]]
    ts = (records.get("train_step") or {}).get("figures") or {}
    if ts.get("best"):
        b, rw = ts["best"], ts.get("best_rowwise")
        met = "yes" if b["mfu"] >= MFU_TARGET else ("only with --id-update rowwise" if rw and rw["mfu"] >= MFU_TARGET
                                                   else "**no**")
        rows.append([f"reference step >= {100 * MFU_TARGET:.0f}% MFU in bf16",
                     f"{100 * b['mfu']:.1f}% ({'compiled' if b['compile'] else 'eager'}, B={b['batch']}, dense id "
                     "update)" + (f"; {100 * rw['mfu']:.1f}% with --id-update rowwise" if rw else ""),
                     "n/a (dry run)" if dry else met])
        train_peak, val_peak, usable = ts.get("train_peak_gib"), ts.get("val_peak_gib"), ts.get("usable_gib")
        if train_peak is not None and val_peak is not None:
            met = max(train_peak, val_peak) <= usable
            rows.append([f"reference memory fits a {MEMORY_CARD_GB} GB card with room for validation",
                         f"training {train_peak:.1f} GiB, validation {val_peak:.1f} GiB, usable {usable:.1f} GiB",
                         "yes" if met else "**no**"])
        else:
            rows.append([f"reference memory fits a {MEMORY_CARD_GB} GB card with room for validation",
                         "not measured (CPU)" if dry else "not measured", "n/a (dry run)" if dry else "**no**"])
    else:
        rows.append([f"reference step >= {100 * MFU_TARGET:.0f}% MFU in bf16", "not measured", "**no**"])
    dl = (records.get("dataloader") or {}).get("figures") or {}
    if dl.get("step_rate"):
        rows.append(["data loader keeps up with the step (train.py's default workers)", f"{dl['ratio']:.2f}x",
                     "yes" if dl["keeps_up"] else "**no**"])
    return rows


def collect_logs(logs: Path, order: list[str], path: Path, keep: int = 3000) -> None:
    """Every section's log in one file (a progress bar's last state per line, a section's last `keep` lines)."""
    parts = []
    for n in order:
        f = logs / f"{n}.log"
        if f.exists():
            lines = [line.rsplit("\r", 1)[-1] for line in f.read_text(errors="replace").split("\n")]
            parts.append(f"===== {n} =====\n" + "\n".join(lines[-keep:]))
    with atomic_write(path, "w") as fh:
        fh.write("\n".join(parts) + "\n")


def write_results(out: Path, side: Path, records: dict, order: list[str], head: list[str], dry: bool) -> None:
    """OUT/gpu_check_results.md; the JSON beside it (`side`: OUT, or the scratch folder when OUT is bench/)."""
    lines = head + ["", "## Summary", "",
                    md_table(["section", "status", "seconds", "result"],
                             [[SECTIONS[n][0], records[n]["status"] if records[n]["status"] == "ok" else
                               f"**{records[n]['status']}**", f"{records[n].get('seconds', 0):.0f}",
                               headline(n, records[n]).replace("|", "/")] for n in order if n in records],
                             right=(2,)),
                    "", "## Targets", "", md_table(["target", "measured", "met"], targets(records, dry))]
    for n in order:
        if n not in records:
            continue
        r = records[n]
        lines += ["", f"## {SECTIONS[n][0]}", ""]
        if r["status"] in ("failed", "timeout"):
            lines += [f"**{r['status']}**: {r.get('error', '')}", "", "```", r.get("log_tail", ""), "```"]
        if r.get("md"):
            lines.append(r["md"])
        if r.get("checks"):
            lines += [""] + [f"- check: {c['name']}: **{'pass' if c['ok'] else 'FAIL'}** ({c['detail']})"
                             for c in r["checks"]]
    with atomic_write(out / "gpu_check_results.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    atomic_save_json({"dry_run": dry, "sections": records, "targets": targets(records, dry)},
                     side / "gpu_check_results.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the CPU, tiny sizes: proves the script runs end to end")
    p.add_argument("--out", default=str(BENCH), help="folder of gpu_check_results.md, .json and gpu_check_logs.txt "
                   "(default: bench/, which gets the .md alone; the others go to --work)")
    p.add_argument("--ml1m", default=None, help="MovieLens-1M folder for the last section (skipped without it)")
    p.add_argument("--minutes", type=float, default=10.0, help="time for the whole run; the last section gets "
                   "what is left (default 10)")
    p.add_argument("--work", default=str(BENCH / "gpu_check.tmp"), help="scratch folder: data, checkpoints, logs")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset, in the fixed order")
    p.add_argument("--section-timeout", action="append", default=[], metavar="NAME=S",
                   help="override one section's time limit in seconds (repeatable)")
    p.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS,
                   help=f"the card's dense bf16 peak for MFU (default {H200_BF16_TFLOPS:g}: H100/H200 SXM)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--ctx", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = [s for s in args.sections.split(",") if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; the sections are {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args.child, Path(args.ctx))
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device here; --dry-run runs the check on the CPU at tiny sizes", file=sys.stderr)
        return 2
    t0 = time.time()
    deadline = t0 + 60 * args.minutes
    out, work = Path(args.out).resolve(), Path(args.work).resolve()
    if args.ml1m:
        args.ml1m = str(Path(args.ml1m).resolve())  # the sections run in the repository root
    sections, logs = work / "sections", work / "logs"
    side = work if out.resolve() == BENCH.resolve() else out  # bench/ gets the results file alone
    for folder in (out, sections, logs):
        folder.mkdir(parents=True, exist_ok=True)
    for old in sections.glob("*.json"):  # results of an earlier run must not pass for this one's
        old.unlink()
    overrides = {k: float(v) for k, _, v in (s.partition("=") for s in args.section_timeout)}
    order = [s for s in SECTIONS if s in args.sections.split(",")]
    load0 = os.getloadavg()[0]
    given = sys.argv[1:] if argv is None else argv
    device = "cpu" if args.dry_run else "cuda"
    records: dict[str, dict] = {}

    def head() -> list[str]:  # no CUDA call in this process: a context here would hold memory all run long
        gpu = ((records.get("env") or {}).get("figures") or {}).get("device_name", "GPU" if device == "cuda" else "CPU")
        machine = f"{gpu}, {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})"
        return ["# GPU check: correctness on CUDA, then the reference configuration's figures", "",
                ("Dry run: every section on the CPU at tiny sizes, through the same code paths; its figures prove "
                 "that the script runs end to end and say nothing about speed." if args.dry_run else
                 "One GPU, sections in order, each in its own process under its own time limit (bench/gpu_check.py "
                 "says what each one measures)."), "",
                f"- command: `bash bench/gpu_check.sh {' '.join(given)}`",
                f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; machine: {machine}; torch "
                f"{torch.__version__}; 1-min load average {load0:.1f} before the run, {os.getloadavg()[0]:.1f} "
                f"now; {time.time() - t0:.0f} s of a budget of {60 * args.minutes:.0f} s"]

    for i, name in enumerate(order):
        title, _, cap, dry_cap = SECTIONS[name]
        cap = dry_cap if args.dry_run else cap
        later = sum(RESERVE_S for n in order[i + 1:] if SECTIONS[n][2] is not None)
        limit = overrides.get(name, min(cap or 1e9, deadline - time.time() - later))
        print(f"== {name}: {title} (limit {limit:.0f} s)", flush=True)
        skip = ("no MovieLens-1M folder given (--ml1m DIR)" if name == "movielens" and not args.ml1m else
                f"{limit:.0f} s left for it" if limit < 5 and name not in overrides else None)
        if skip:
            records[name] = {"status": "skipped", "md": f"Skipped: {skip}.", "seconds": 0.0}
            write_results(out, side, records, order, head(), args.dry_run)
            continue
        ctx = dict(device=device, dry=args.dry_run, size="dry" if args.dry_run else "full", work=str(work),
                   sections=str(sections), deadline=time.time() + limit, ml1m=args.ml1m,
                   peak_tflops=args.peak_tflops, prior={n: {"status": r["status"], "figures": r.get("figures", {})}
                                                        for n, r in records.items()})
        t = time.time()
        rc, tail = run_child(name, ctx, limit, section_env(name, args.dry_run), logs / f"{name}.log")
        res_path = sections / f"{name}.json"
        if rc is None:
            rec = {"status": "timeout", "error": f"stopped at its time limit of {limit:.0f} s", "log_tail": tail}
        elif res_path.exists():
            rec = json.loads(res_path.read_text())
            rec["log_tail"] = tail
        else:
            rec = {"status": "failed", "error": f"exit code {rc} without a result", "log_tail": tail}
        rec["seconds"] = time.time() - t
        records[name] = rec
        print(f"== {name}: {rec['status']} in {rec['seconds']:.0f} s: {headline(name, rec)}", flush=True)
        collect_logs(logs, order, side / "gpu_check_logs.txt")
        write_results(out, side, records, order, head(), args.dry_run)
    bad = [n for n, r in records.items() if r["status"] in ("failed", "timeout")
           or any(not c["ok"] for c in r.get("checks", []))]
    print(f"results: {out / 'gpu_check_results.md'} (and {side}/gpu_check_results.json, gpu_check_logs.txt); "
          f"{time.time() - t0:.0f} s; "
          + (f"failed or failing checks: {', '.join(bad)}" if bad else "every section ran and every check passed"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
