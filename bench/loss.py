"""Sampled softmax loss on the CPU: ours (loss.sampled_softmax_loss: logits built chunk_rows rows at a time,
each chunk checkpointed) against a dense implementation of the same math (the full (R, C) fp32 logits and mask).

    python bench/loss.py [--batch 232] [--rows-per-seq 102] [--dim 512] [--catalogue 1000000] [--hard-k 8192]
    python bench/loss.py --batch 16 --rows-per-seq 32 --dim 64 --hard-k 256 --out bench/loss_smoke.tmp/results.md
    python bench/loss.py --section full [--full-cases 64:200:64:3706:2048,32:102:512:6528,32:102:512:20000]

The second command is a smoke run (seconds). At the default (reference) size every one of the B x N positions is a
target row (R = 23,664), and the candidates are the R global negatives and the R in-batch positives (C = 2R);
item ids are drawn from a catalogue with Zipf popularity (so duplicates occur, within and across sequences), and
log q comes from those popularities (loss.log_q_from_counts, alpha 0.75). Masked for each row: every in-batch
column of its own sequence, every column whose item is a positive of its sequence, and item id 0.

The dense version is first checked against loss.sampled_softmax_loss_reference (the brute-force oracle) on a
small float64 case, values and gradients, so it is a valid stand-in. Each implementation then runs forward +
backward in its own process; peak memory is that process's high-water RSS minus its RSS once the inputs are
built (the inputs are the same in both, from --seed), so the two figures are comparable. The processes save
their loss value and gradients, which are compared here (value within 1e-5 relative).

If the dense version would not fit in the memory available (its peak is predicted from a small calibration run),
both run at the largest batch that fits, and ours also at the full size; the table says so. Prints a markdown
table and writes it to bench/loss_results.md (or --out).

--section full: the full-catalogue softmax (loss.full_softmax_loss, every item a negative) against the sampled loss
at the same rows, per case B:N:D:M[:max_candidates] (B x N target rows, D hidden, M items; the sampled loss with
all 2R columns and, if given, with max_candidates of them as --max-candidates draws them). Same processes and
measures as above; the full softmax's inputs are the queries and an (M+1, D) item table (its gradient counted in
the peak), the sampled loss's the queries and the R positive and R negative vectors. Each run's section of the
results file is replaced, the other kept.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common import atomic_write  # noqa: E402
from loss import (FULL_SOFTMAX_FACTOR, _masked_columns, candidate_columns, full_softmax_fits, full_softmax_loss,  # noqa: E402
                  full_softmax_loss_reference, log_q_from_counts, sampled_softmax_loss, sampled_softmax_loss_reference)

Tensor = torch.Tensor


def dense_loss(query: Tensor, pos: Tensor, pos_ids: Tensor, row_seq: Tensor, neg: Tensor, neg_ids: Tensor,
               log_q: Tensor, temperature: float = 0.01, hard_k: int | None = None,
               global_share: float = 0.5) -> Tensor:
    """The same loss written densely: (R, C) logits in fp32 (or the inputs' wider dtype), an (R, C) bool mask,
    logsumexp over [positive, unmasked negatives] (or over [positive, top-k of each column group])."""
    r = query.shape[0]
    dtype = torch.promote_types(query.dtype, torch.float32)
    q, p, n, lq = query.to(dtype), pos.to(dtype), neg.to(dtype), log_q.to(dtype)
    pos_ids, neg_ids, row_seq = pos_ids.long(), neg_ids.long(), row_seq.long()
    cand, cand_ids = torch.cat([n, p]), torch.cat([neg_ids, pos_ids])  # (C, D), (C,): global, then in-batch
    logits = torch.addmm(-lq[cand_ids][None], q / temperature, cand.T)  # (R, C) = cos / tau - log q
    pos_logit = (q * p).sum(1) / temperature - lq[pos_ids]  # (R,)
    # the mask, densely: item ids made compact, a (sequences, items) table of each sequence's positives
    items, inv = torch.unique(torch.cat([cand_ids, pos_ids]), return_inverse=True)
    cand_u, pos_u = inv[:cand_ids.numel()], inv[cand_ids.numel():]
    seq_pos = torch.zeros(int(row_seq.max()) + 1, items.numel(), dtype=torch.bool)
    seq_pos[row_seq, pos_u] = True
    mask = seq_pos[row_seq[:, None], cand_u[None, :]]  # (R, C): the column's item is a positive of the row's sequence
    mask[:, r:] |= row_seq[:, None] == row_seq[None, :]  # in-batch columns of the row's own sequence
    mask |= (cand_ids == 0)[None]  # padding id
    logits.masked_fill_(mask, float("-inf"))  # in place: addmm's backward needs only its inputs
    if hard_k is None:
        lse = torch.logaddexp(torch.logsumexp(logits, dim=1), pos_logit)  # = logsumexp([pos, negatives])
    else:
        kg = int(math.floor(hard_k * global_share + 0.5))
        ki = max(hard_k - kg, 0)
        g = logits[:, :r].topk(min(kg, r), dim=1).values
        b = logits[:, r:].topk(min(ki, r), dim=1).values
        lse = torch.logsumexp(torch.cat([pos_logit[:, None], g, b], dim=1), dim=1)
    return (lse - pos_logit).mean()


def full_autograd_loss(query: Tensor, pos_ids: Tensor, item_vectors: Tensor, row_seq: Tensor, temperature: float,
                       mask_seq_positives: bool = True, chunk_rows: int | None = None) -> Tensor:
    """The full softmax as plain autograd ops, the formulation loss.full_softmax_loss fuses by hand: dense (R, M+1)
    logits, the same mask, F.cross_entropy (log-softmax + NLL). chunk_rows is accepted and ignored."""
    logits = query @ item_vectors.T / temperature  # (R, M+1)
    rows = torch.arange(len(pos_ids))
    if mask_seq_positives:
        masked = _masked_columns(row_seq, row_seq, pos_ids, None, item_vectors.shape[0], has_pad=True)
        masked[rows, pos_ids] = False
    else:
        masked = torch.zeros_like(logits, dtype=torch.bool)
        masked[:, 0] = True
    return F.cross_entropy(logits.masked_fill(masked, float("-inf")), pos_ids)


IMPLS = {"ours": sampled_softmax_loss, "dense": dense_loss, "reference": sampled_softmax_loss_reference,
         "full": full_softmax_loss, "full_reference": full_softmax_loss_reference, "full_autograd": full_autograd_loss}
LEAVES = {k: ("query", "item_vectors") for k in ("full", "full_reference", "full_autograd")}  # else query, pos, neg


def make_inputs(batch: int, rows_per_seq: int, dim: int, catalogue: int, zipf: float, seed: int,
                dtype=torch.float32, pad_share: float = 0.0) -> dict:
    """Target rows of a batch: every position a target row (rows grouped by sequence), item ids with Zipf
    popularity over a random ranking of 1..catalogue, one unit vector per distinct item (an item's vector is the
    same wherever it appears) and random unit queries; query/pos/neg are leaves that get gradients.
    pad_share: that share of the global negatives is item id 0 (masked) - for the small oracle check."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    r = batch * rows_per_seq
    p = 1.0 / np.arange(1, catalogue + 1) ** zipf
    p /= p.sum()
    ranking = rng.permutation(catalogue) + 1  # ranking[k] = the item id of popularity rank k
    draw = lambda m: ranking[rng.choice(catalogue, m, p=p)]  # noqa: E731
    pos_ids, neg_ids = draw(r), draw(r)
    if pad_share > 0:
        neg_ids[rng.random(r) < pad_share] = 0
    counts = np.zeros(catalogue + 1, np.int64)
    counts[ranking] = np.maximum(np.round(p * 1e9), 1)  # expected event counts of a 1e9-event log
    log_q = log_q_from_counts(counts, 0.75).to(dtype)  # (catalogue + 1,)
    ids, inv = np.unique(np.concatenate([pos_ids, neg_ids]), return_inverse=True)
    table = F.normalize(torch.randn(len(ids), dim, generator=g, dtype=dtype), dim=1)  # (U, D) item vectors
    inv = torch.from_numpy(inv)
    query = F.normalize(torch.randn(r, dim, generator=g, dtype=dtype), dim=1)
    return dict(query=query.requires_grad_(), pos=table[inv[:r]].clone().requires_grad_(),
                pos_ids=torch.from_numpy(pos_ids), row_seq=torch.arange(batch).repeat_interleave(rows_per_seq),
                neg=table[inv[r:]].clone().requires_grad_(), neg_ids=torch.from_numpy(neg_ids), log_q=log_q)


def full_inputs(inputs: dict, catalogue: int, dim: int, seed: int) -> dict:
    """full_softmax_loss's inputs from make_inputs': the same queries, positives and sequences, and an
    (M+1, D) table of unit item vectors (a leaf that gets gradients; row 0 is padding)."""
    g = torch.Generator().manual_seed(seed + 1)
    dtype = inputs["query"].dtype
    table = F.normalize(torch.randn(catalogue + 1, dim, generator=g, dtype=dtype), dim=1)
    return dict(query=inputs["query"], pos_ids=inputs["pos_ids"], item_vectors=table.requires_grad_(),
                row_seq=inputs["row_seq"])


def value_and_grads(impl: str, inputs: dict, **kw) -> tuple[Tensor, list[Tensor]]:
    leaves = LEAVES.get(impl, ("query", "pos", "neg"))
    for k in leaves:
        inputs[k].grad = None
    loss = IMPLS[impl](**inputs, **kw)
    loss.backward()
    return loss.detach(), [inputs[k].grad for k in leaves]


def item_grads(grads: list[Tensor], pos_ids: Tensor, neg_ids: Tensor) -> list[Tensor]:
    """[query grad, per-item grad]: the pos and neg row gradients summed per item id. Rows of the same item share
    its vector, so which of two tied duplicate columns top-k keeps moves gradient between their rows but not
    between items: the per-item sum is what is unique."""
    ids, inv = torch.unique(torch.cat([pos_ids, neg_ids]), return_inverse=True)
    g = torch.zeros(ids.numel(), grads[1].shape[1], dtype=torch.float64)
    g.index_add_(0, inv, torch.cat([grads[1], grads[2]]).double())
    return [grads[0].double(), g]


def grad_diff(a: list[Tensor], b: list[Tensor]) -> float:
    """Largest |difference| of any gradient entry over the largest |entry| of that gradient (worst of them)."""
    return max(float((x.double() - y.double()).abs().max() / y.double().abs().max().clamp(min=1e-300))
               for x, y in zip(a, b))


def oracle_check(args) -> list[str]:
    """dense == reference (and ours == reference) on a small float64 case, plain and hard-negative."""
    lines = []
    inputs = make_inputs(6, 9, 16, 60, args.zipf, args.seed, dtype=torch.float64, pad_share=0.1)
    for hard in (None, (16, 0.5), (5, 0.25)):
        kw = dict(temperature=args.temperature)
        if hard:
            kw.update(hard_k=hard[0], global_share=hard[1])
        v_ref, g_ref = value_and_grads("reference", inputs, **kw)
        for impl in ("dense", "ours"):
            extra = dict(chunk_rows=7) if impl == "ours" else {}
            v, g = value_and_grads(impl, inputs, **kw, **extra)
            ids = (inputs["pos_ids"], inputs["neg_ids"])
            dv, dg = abs(float(v - v_ref)) / abs(float(v_ref)), grad_diff(item_grads(g, *ids), item_grads(g_ref, *ids))
            ok = dv < 1e-10 and dg < 1e-9
            if not ok and impl == "dense":
                raise SystemExit(f"dense != reference ({hard}): value rel diff {dv:.2e}, grad rel diff {dg:.2e}")
            name = "all negatives" if hard is None else f"hard_k={hard[0]}, global_share={hard[1]}"
            lines.append(f"{impl}, {name}: value {dv:.0e}, gradients {dg:.0e} -> {'equal' if ok else 'DIFFERENT'}")
    return lines


def full_oracle_check(args) -> list[str]:
    """loss.full_softmax_loss == loss.full_softmax_loss_reference on a small float64 case (query and item-table
    gradients), with and without the sequences' other positives masked."""
    lines = []
    inputs = full_inputs(make_inputs(6, 9, 16, 60, args.zipf, args.seed, dtype=torch.float64), 60, 16, args.seed)
    for mask in (True, False):
        v_ref, g_ref = value_and_grads("full_reference", inputs, temperature=args.temperature, mask_seq_positives=mask)
        for impl in ("full", "full_autograd"):
            v, g = value_and_grads(impl, inputs, temperature=args.temperature, mask_seq_positives=mask, chunk_rows=7)
            dv, dg = abs(float(v - v_ref)) / abs(float(v_ref)), grad_diff(g, g_ref)
            ok = dv < 1e-10 and dg < 1e-9
            lines.append(f"{impl}, {'sequence positives masked' if mask else 'plain cross-entropy'}: value {dv:.0e}, "
                         f"gradients {dg:.0e} -> {'equal' if ok else 'DIFFERENT'}")
    return lines


# ---- child process: one implementation, one size ---------------------------------------------------------------

def proc_status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset the high-water RSS (VmHWM) to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(spec: dict) -> None:
    torch.set_num_threads(spec["threads"])
    res: dict = {}
    try:
        impl = spec["impl"]
        full = impl.startswith("full")
        inputs = make_inputs(spec["batch"], spec["rows_per_seq"], spec["dim"], spec["catalogue"], spec["zipf"],
                             spec["seed"])
        if full:
            inputs = full_inputs(inputs, spec["catalogue"], spec["dim"], spec["seed"])
        leaves = LEAVES.get(impl, ("query", "pos", "neg"))
        kw = dict(temperature=spec["temperature"])
        if spec["hard_k"]:
            kw.update(hard_k=spec["hard_k"], global_share=spec["global_share"])
        if impl in ("ours", "full"):
            kw["chunk_rows"] = spec["chunk_rows"]
        if spec.get("max_candidates"):  # as train.py draws them: a shared uniform subset of the 2R columns
            kw["columns"] = candidate_columns(inputs["query"].shape[0], spec["max_candidates"], torch.device("cpu"),
                                              torch.Generator().manual_seed(spec["seed"]))
        # warm-up on a tiny case, untimed: one-time costs (the first checkpoint() imports torch._dynamo, ~2 s)
        tiny = make_inputs(2, 4, 8, 100, spec["zipf"], spec["seed"])
        tiny = full_inputs(tiny, 100, 8, spec["seed"]) if full else tiny
        tiny_kw = {**kw, "columns": None} if "columns" in kw else kw
        IMPLS[impl](**tiny, **{**tiny_kw, **({"chunk_rows": 3} if impl in ("ours", "full") else {})}).backward()
        del tiny
        gc.collect()
        if spec.get("mem_growth"):  # a failed allocation (reported) rather than the OOM killer picking a process
            cap = proc_status_kb("VmSize") * 1024 + int(spec["mem_growth"])
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
            try:  # and should memory run out anyway, this process is the one to go
                Path("/proc/self/oom_score_adj").write_text("1000")
            except OSError:
                pass
        base_kb = proc_status_kb("VmRSS")
        resettable = reset_peak()
        maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        times, fwd_times = [], []
        for _ in range(spec["repeats"]):
            for k in leaves:
                inputs[k].grad = None
            t0 = time.perf_counter()
            loss = IMPLS[spec["impl"]](**inputs, **kw)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            fwd_times.append(t1 - t0)
            times.append(t2 - t0)
        peak_kb = proc_status_kb("VmHWM") if resettable else None
        if peak_kb is None:  # ru_maxrss cannot be reset: valid only if the run's peak is above the inputs' build
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            res["note"] = f"peak from ru_maxrss (before the run: {maxrss_before / 1024:.0f} MB)"
        res.update(seconds=min(times), fwd_seconds=min(fwd_times), peak_mb=(peak_kb - base_kb) / 1024,
                   base_mb=base_kb / 1024, loss=float(loss), rows=inputs["query"].shape[0])
        grads = [inputs[k].grad for k in leaves]
        torch.save({"loss": loss.detach(), "grads": grads if full else item_grads(grads, inputs["pos_ids"],
                                                                                  inputs["neg_ids"])},
                   spec["grads_path"])
    except (RuntimeError, MemoryError) as e:
        res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    print(json.dumps(res), flush=True)


def run_child(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "PYTHONUNBUFFERED": "1"})
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        return {"error": f"exit code {out.returncode}: {(out.stderr.strip().splitlines() or ['?'])[-1][:200]}"}
    return json.loads(lines[-1])


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def write_section(path: Path, table: str) -> None:
    """Replace the section of `path` whose first line is table's first line (a '# ' heading; a section runs to the
    next '# ' heading), or append it; the other sections stay as they are."""
    head = table.splitlines()[0]
    sections: list[list[str]] = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        if line.startswith("# ") or not sections:
            sections.append([])
        sections[-1].append(line)
    texts = ["\n".join(sec).strip("\n") + "\n" for sec in sections]
    hit = [i for i, sec in enumerate(sections) if sec and sec[0] == head]
    if hit:
        texts[hit[0]] = table
    else:
        texts.append(table)
    with atomic_write(path, "w") as f:
        f.write("\n".join(texts))


# ---- full-catalogue softmax against the sampled loss ---------------------------------------------------------------

FULL_CASES = "64:200:64:3706:2048,32:102:512:6528,32:102:512:20000"
FULL_TITLE = "# Full-catalogue softmax against the sampled loss, CPU"


def full_main(args, argv: list[str] | None) -> str:
    load_before = os.getloadavg()[0]
    t_start = time.time()
    checks = full_oracle_check(args)
    print("\n".join(checks), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_loss."))
    rows, verdicts = [], []  # (case, method, R, columns, result); the automatic choice per case
    for case in args.full_cases.split(","):
        b, n, d, m, *mc = (int(x) for x in case.split(":"))
        base = dict(batch=b, rows_per_seq=n, dim=d, catalogue=m, zipf=args.zipf, seed=args.seed, hard_k=0,
                    temperature=args.temperature, chunk_rows=None, threads=args.threads, global_share=0.5,
                    repeats=args.repeats, grads_path=str(tmp / "g.pt"))
        runs = [("sampled: all 2R columns", {"impl": "ours"})]
        if mc:
            runs.append((f"sampled: {mc[0]:,} columns (--max-candidates)", {"impl": "ours", "max_candidates": mc[0]}))
        runs += [("full: every item (sequence positives masked)", {"impl": "full"}),
                 ("full, unfused: autograd log-softmax + NLL", {"impl": "full_autograd"})]
        for name, extra in runs:
            res = run_child({**base, **extra})
            print(f"{case} {name}: {res}", flush=True)
            cols = m if extra["impl"].startswith("full") else extra.get("max_candidates") or 2 * b * n
            rows.append((case, name, b * n, cols, res))
        fits = full_softmax_fits(m, b * n, mc[0] if mc else None)
        verdicts.append(f"{case}: full_softmax_fits({m:,}, {b * n:,}{f', {mc[0]:,}' if mc else ''}) = {fits}")
    (tmp / "g.pt").unlink(missing_ok=True)
    tmp.rmdir()
    by = {(case, name.split(":")[0]): res for case, name, _, _, res in rows if "error" not in res}
    fused = [f"{case}: time {by[case, 'full']['seconds'] / by[case, 'full, unfused']['seconds']:.2f}x, peak "
             f"{by[case, 'full']['peak_mb'] / max(by[case, 'full, unfused']['peak_mb'], 1e-9):.2f}x"
             for case in dict.fromkeys(c for c, _ in by) if (case, "full") in by and (case, "full, unfused") in by]
    cmd = " ".join(["python bench/loss.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [FULL_TITLE, "",
             "Per case (B x N target rows, every position a target; D hidden; M items, ids Zipf(s="
             f"{args.zipf:g}) over 1..M), forward + backward, fp32, temperature {args.temperature:g}: "
             "loss.sampled_softmax_loss (log q on every logit, the columns the R global negatives and R in-batch "
             "positives, or a --max-candidates subset of them) against loss.full_softmax_loss (every item a "
             "negative, the sequences' other positives masked), each with its default chunking (CHUNK_LOGITS logits "
             f"a chunk). {args.repeats} timed run(s) per process after an untimed tiny warm-up, the fastest counts; "
             "peak memory as in the section above (each run in its own process). The losses differ by "
             "design (different negatives): no value comparison.", "",
             f"- command: `{cmd}`",
             f"- date: {datetime.date.today().isoformat()}; torch {torch.__version__}, {args.threads} thread(s) per "
             f"process; CPU count {os.cpu_count()} ({platform.processor() or platform.machine()}); 1-min load average "
             f"{load_before:.1f} before the run, {os.getloadavg()[0]:.1f} after; {time.time() - t_start:.0f} s in all",
             "- check against loss.full_softmax_loss_reference (float64, B=6, N=9, D=16, 60 items; relative "
             "differences): " + "; ".join(checks),
             f"- the automatic choice (loss.full_softmax_fits, factor {FULL_SOFTMAX_FACTOR:g}: full when M <= factor x "
             "the sampled columns): " + "; ".join(verdicts),
             "- the fused full softmax (loss.full_softmax_loss) against the same loss as plain autograd ops: "
             + "; ".join(fused), "",
             "| case B:N:D:M | method | R | columns | logits | fwd+bwd s | fwd s | time vs sampled 2R | "
             "s per G logits | peak MB | peak vs sampled 2R | loss |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    ref = {}
    for case, name, r, cols, res in rows:
        if "error" in res:
            lines.append(f"| {case} | {name} | {r:,} | {cols:,} | {r * cols / 1e6:,.0f}M | - | - | - | - | - | - | "
                         f"failed: {res['error']} |")
            continue
        ref.setdefault(case, res)  # the first run of a case is the sampled loss with all 2R columns
        t_ratio, m_ratio = res["seconds"] / ref[case]["seconds"], res["peak_mb"] / max(ref[case]["peak_mb"], 1e-9)
        lines.append(f"| {case} | {name} | {r:,} | {cols:,} | {r * cols / 1e6:,.0f}M | {res['seconds']:.3g} | "
                     f"{res['fwd_seconds']:.3g} | {t_ratio:.2f} | {res['seconds'] / (r * cols / 1e9):.3g} | "
                     f"{res['peak_mb']:,.0f} | {m_ratio:.2f} | {res['loss']:.4f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    write_section(Path(args.out), table)
    return table


# ---- main --------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=232, help="sequences B (reference: 232)")
    p.add_argument("--rows-per-seq", type=int, default=102, help="target rows per sequence N (reference: 102)")
    p.add_argument("--dim", type=int, default=512, help="hidden size D (reference: 512)")
    p.add_argument("--catalogue", type=int, default=1_000_000, help="item ids are drawn from 1..catalogue")
    p.add_argument("--zipf", type=float, default=1.0, help="popularity exponent s: P(rank k) ~ 1 / k^s")
    p.add_argument("--temperature", type=float, default=0.01, help="softmax temperature (reference: 0.01)")
    p.add_argument("--chunk-rows", type=int, default=2048, help="ours: rows of logits built at once")
    p.add_argument("--hard-k", type=int, default=8192, help="second row: keep the top hard-k negatives (0: skip)")
    p.add_argument("--global-share", type=float, default=0.5, help="share of hard-k taken from the global columns")
    p.add_argument("--repeats", type=int, default=1, help="forward+backward runs per process; the fastest counts")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each process")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs (the same in every process)")
    p.add_argument("--mem-margin-gb", type=float, default=3.0,
                   help="memory left free: the dense version runs at a size whose predicted peak fits in "
                        "MemAvailable minus this")
    p.add_argument("--out", default=str(ROOT / "bench" / "loss_results.md"), help="where the table is written")
    p.add_argument("--section", choices=("sampled", "full"), default="sampled",
                   help="sampled: ours against dense (the options above); full: the full-catalogue softmax against "
                        "the sampled loss, per --full-cases")
    p.add_argument("--full-cases", default=FULL_CASES,
                   help="--section full: B:N:D:M[:max_candidates],... (B x N target rows, D hidden, M items)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    torch.set_num_threads(args.threads)
    if args.section == "full":
        return full_main(args, argv)
    load_before = os.getloadavg()[0]
    t_start = time.time()

    checks = oracle_check(args)
    print("\n".join(checks), flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="bench_loss."))
    base = dict(rows_per_seq=args.rows_per_seq, dim=args.dim, catalogue=args.catalogue, zipf=args.zipf,
                seed=args.seed, temperature=args.temperature, chunk_rows=args.chunk_rows, threads=args.threads,
                global_share=args.global_share, repeats=args.repeats)

    # calibration: the dense version's peak bytes per logit, at a small batch
    cal_b = max(1, min(args.batch, 24))
    cal = run_child({**base, "impl": "dense", "batch": cal_b, "hard_k": 0, "grads_path": str(tmp / "cal.pt")})
    if "error" in cal:
        raise SystemExit(f"dense calibration run failed: {cal['error']}")
    cal_r = cal_b * args.rows_per_seq
    per_logit = cal["peak_mb"] * 2**20 / (cal_r * 2 * cal_r)
    budget = mem_available() - args.mem_margin_gb * 2**30
    predict = lambda b: per_logit * (b * args.rows_per_seq) * 2 * (b * args.rows_per_seq)  # noqa: E731
    fit_b = args.batch
    while fit_b > 1 and 1.05 * predict(fit_b) > budget:  # 5%: the prediction is from a small size
        fit_b -= 1
    growth_cap = budget + min(1.5 * 2**30, args.mem_margin_gb * 2**30 / 2)  # address space, a little above RSS
    size_note = (f"dense peak predicted from a B={cal_b} calibration run: {per_logit:.1f} bytes per logit, "
                 f"{predict(args.batch) / 2**30:.1f} GB at B={args.batch}; memory budget {budget / 2**30:.1f} GB "
                 f"(MemAvailable minus {args.mem_margin_gb:g} GB)")
    if fit_b < args.batch:
        size_note += (f" -> does not fit: compared at B={fit_b}, the largest batch whose predicted peak (+5%) fits; "
                      f"ours also at B={args.batch}")
    size_note += f"; the dense process's address space may grow by at most {growth_cap / 2**30:.1f} GB"
    print(size_note, flush=True)

    rows = []  # (negatives, impl, batch, result, comparison)
    settings = [(0, "all negatives")] + ([(args.hard_k, f"hard_k={args.hard_k}, share {args.global_share:g}")]
                                         if args.hard_k else [])
    for hard_k, label in settings:
        res = {}
        for impl in ("ours", "dense"):
            spec = {**base, "impl": impl, "batch": fit_b, "hard_k": hard_k, "grads_path": str(tmp / f"{impl}.pt"),
                    "mem_growth": growth_cap if impl == "dense" else None}
            res[impl] = run_child(spec)
            print(f"{label} {impl} B={fit_b}: {res[impl]}", flush=True)
        cmp = {}
        if "error" not in res["ours"] and "error" not in res["dense"]:
            a, b = torch.load(tmp / "ours.pt"), torch.load(tmp / "dense.pt")
            cmp = dict(dv=abs(float(a["loss"] - b["loss"])) / abs(float(b["loss"])), dg=grad_diff(a["grads"], b["grads"]))
        rows.append((label, "ours: loss.sampled_softmax_loss", fit_b, res["ours"], cmp, res["dense"]))
        rows.append((label, "dense: full (R, C) logits and mask", fit_b, res["dense"], {}, res["dense"]))
        if fit_b < args.batch:
            full = run_child({**base, "impl": "ours", "batch": args.batch, "hard_k": hard_k,
                              "grads_path": str(tmp / "ours_full.pt")})
            print(f"{label} ours B={args.batch}: {full}", flush=True)
            if "error" not in full and "error" not in res["dense"]:  # dense at full size: scaled by its logits
                scale = (args.batch / fit_b) ** 2
                full["note"] = (f"dense not run at this size; its peak scaled from B={fit_b} by the logit count "
                                f"(x{scale:.2f}): {res['dense']['peak_mb'] * scale:,.0f} MB, ours / that = "
                                f"{full['peak_mb'] / (res['dense']['peak_mb'] * scale):.3f}")
            rows.append((label, "ours: loss.sampled_softmax_loss (full size)", args.batch, full, {}, {}))
        for f in tmp.glob("*.pt"):
            f.unlink()

    given = sys.argv[1:] if argv is None else argv
    cmd = " ".join(["python bench/loss.py", *given])
    r_full = args.batch * args.rows_per_seq
    lines = [
        "# Sampled softmax loss: memory-efficient (chunked, checkpointed) against dense, CPU",
        "",
        f"B = {args.batch} sequences x N = {args.rows_per_seq} target rows (R = {r_full:,}), D = {args.dim}, "
        f"C = 2R = {2 * r_full:,} candidates (R global negatives + R in-batch positives), temperature "
        f"{args.temperature:g}, log q on every logit, item ids Zipf(s={args.zipf:g}) over a catalogue of "
        f"{args.catalogue:,}; ours with chunk_rows {args.chunk_rows}. Forward + backward, fp32; "
        f"{args.repeats} timed run(s) per process after an untimed tiny warm-up, the fastest counts. Peak memory: the process's high-water RSS "
        "minus its RSS after building the inputs (each implementation in its own process).",
        "",
        f"- command: `{cmd}`",
        f"- date: {datetime.date.today().isoformat()}; torch {torch.__version__}, {args.threads} thread(s) per "
        f"process; CPU count {os.cpu_count()} ({platform.processor() or platform.machine()}); 1-min load average "
        f"{load_before:.1f} before the run, {os.getloadavg()[0]:.1f} after; {time.time() - t_start:.0f} s in all",
        f"- {size_note}",
        "- check against loss.sampled_softmax_loss_reference (float64, B=6, N=9, D=16, 60 items, 10% padding ids; "
        "relative differences): " + "; ".join(checks),
        "",
        "| negatives | method | B | R | C | fwd+bwd s | fwd s | time vs dense | peak MB | peak vs dense | "
        "loss | value rel diff | grad rel diff | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for label, name, b, r, cmp, dense in rows:
        rr = b * args.rows_per_seq
        if "error" in r:
            lines.append(f"| {label} | {name} | {b} | {rr:,} | {2 * rr:,} | - | - | - | - | - | - | - | - | "
                         f"failed: {r['error']} |")
            continue
        same_size = "error" not in dense and dense.get("rows") == r["rows"]
        t_ratio = f"{r['seconds'] / dense['seconds']:.2f}" if same_size else "-"
        m_ratio = f"{r['peak_mb'] / dense['peak_mb']:.3f}" if same_size and dense["peak_mb"] > 0 else "-"
        note = r.get("note", "")
        if cmp:
            note = (note + "; " if note else "") + ("target peak <= 0.25 x dense: "
                                                      + ("met" if r["peak_mb"] <= 0.25 * dense["peak_mb"] else "MISSED"))
        dv = f"{cmp['dv']:.1e}" + ("" if cmp["dv"] <= 1e-5 else " (> 1e-5)") if cmp else ""
        dg = f"{cmp['dg']:.1e}" if cmp else ""
        lines.append(f"| {label} | {name} | {b} | {rr:,} | {2 * rr:,} | {r['seconds']:.3g} | {r['fwd_seconds']:.3g} | "
                     f"{t_ratio} | {r['peak_mb']:,.0f} | {m_ratio} | {r['loss']:.4f} | {dv} | {dg} | {note} |")
    lines += ["", "value rel diff: |ours - dense| / |dense|; grad rel diff: the largest |difference| of a gradient "
              "entry over that gradient's largest |entry|, for the query gradient and for the pos and neg gradients "
              "summed per item (with hard negatives, top-k may keep either of two tied duplicate columns: that moves "
              "gradient between their rows, not between items)."]
    table = "\n".join(lines) + "\n"
    print(table)
    write_section(Path(args.out), table)
    try:
        tmp.rmdir()
    except OSError:
        pass
    return table


if __name__ == "__main__":
    main()
