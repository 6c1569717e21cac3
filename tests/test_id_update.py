"""--id-update rowwise: RowWiseAdamW against a row-by-row reference and torch's AdamW, the rows a step looks up,
and training with it: its first step is the dense update, and a resumed run equals an uninterrupted one."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import checkpoint
import get_stat
import train
from id_update import RowWiseAdamW, rowwise_reference, step_rows
from make_sample_data import generate
from test_train import args


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rowwise")
    generate(str(root), users=400, items=300, seed=5, progress=False)
    get_stat.run(root / "data", root / "cache")
    return root


def test_rowwise_adamw_matches_the_row_by_row_reference_and_is_lazy():
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(30, 4, generator=g)
    w, ref = w0.clone(), w0.clone()
    opt, m, v = RowWiseAdamW(w, lr=1e-2), torch.zeros(30, 4), torch.zeros(30, 4)
    for t in range(1, 4):
        rows = torch.randperm(30, generator=g)[:8].sort().values
        grad = torch.randn(8, 4, generator=g)
        opt.step(rows, grad)
        rowwise_reference(ref, m, v, t, rows.tolist(), grad, lr=1e-2)
        untouched = torch.ones(30, dtype=torch.bool)
        untouched[rows] = False
        assert torch.equal(opt.exp_avg[untouched], m[untouched])  # lazy: untouched moments do not decay
    torch.testing.assert_close(w, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt.exp_avg_sq, v, rtol=1e-6, atol=1e-9)


def test_rowwise_adamw_is_adamw_when_every_row_is_touched():
    g = torch.Generator().manual_seed(2)
    w0 = torch.randn(20, 4, generator=g)
    p = torch.nn.Parameter(w0.clone())
    adamw = torch.optim.AdamW([p], lr=1e-2, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)
    w = w0.clone()
    opt = RowWiseAdamW(w, lr=1e-2)
    for _ in range(3):
        grad = torch.randn(20, 4, generator=g)
        p.grad = grad.clone()
        adamw.step()
        opt.step(torch.arange(20), grad)
    torch.testing.assert_close(w, p.detach(), rtol=1e-6, atol=1e-7)


def test_step_rows_are_the_sorted_union_padded_to_a_fixed_length():
    batch = {"seq_item": torch.tensor([[0, 5, 3]]), "next_item": torch.tensor([[5, 3, 9]]),
             "neg_item": torch.tensor([[7, 7, 2]])}
    assert step_rows(batch, itemnum=10).tolist() == [0, 2, 3, 5, 7, 9] + [11] * 4  # 9 lookups + 1


def test_first_step_equals_the_dense_update_and_resume_is_exact(sample):
    """After one step, lazy and dense AdamW agree (untouched rows have zero moments either way); over 6 steps
    with a stop at 3, the resumed rowwise run ends with the uninterrupted one's weights, bit for bit."""
    one = ["--max-steps", "1", "--id-dropout", "0", "--full-softmax", "off"]
    dense = train.main(args(sample, "rw_dense", *one))["model"].state_dict()
    rows = train.main(args(sample, "rw_rows", *one, "--id-update", "rowwise"))["model"].state_dict()
    assert not torch.equal(dense["item_tower.id_emb.weight"], torch.zeros_like(dense["item_tower.id_emb.weight"]))
    for k, v in dense.items():
        torch.testing.assert_close(rows[k], v, rtol=1e-5, atol=1e-6, msg=k)

    six = ["--max-steps", "6", "--eval-every", "3", "--id-update", "rowwise"]
    straight = train.main(args(sample, "rw_a", *six))["model"].state_dict()
    train.main(args(sample, "rw_b", *six, "--stop-at", "3"))
    ck = sample / "rw_b" / "ck"
    assert checkpoint.load_checkpoint(ck / "global_step3" / "ckpt.pt")["id_optimizer"]["step"] == 3
    resumed = train.main(["--resume", "latest", "--ckpt-dir", str(ck), "--log-dir", str(sample / "rw_b" / "logs"),
                          "--tf-dir", str(sample / "rw_b" / "tf")])["model"].state_dict()
    for k, v in straight.items():
        assert torch.equal(resumed[k], v), k
