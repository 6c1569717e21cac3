"""Row-wise update of the item-id table (--id-update rowwise): only the rows a step looks up get a gradient and
an AdamW step, instead of a dense (itemnum+1, id_dim) gradient every step.

At the real catalogue (17.5M x 128) the dense gradient is 9 GB a step, all-reduced across ranks, plus AdamW
touching every row; a step looks up some 35k distinct rows (bench/embedding_grad_results.md: 33x faster at
2M rows on the CPU; bench/scale_results.md: what it saves on a GPU). The update is lazy Adam: a row not looked
up neither moves nor decays its moments, where dense AdamW keeps moving it on its momentum for a while; for
rows looked up at every step the two are the same update.
"""
from __future__ import annotations

import torch

from distributed import Dist, gather_rows, row_counts

Tensor = torch.Tensor


class RowWiseAdamW:
    """AdamW (no weight decay: the embedding group has none) on the rows of a (V, D) table a step touched.
    State: exp_avg, exp_avg_sq (V, D) and the step count, as AdamW keeps them."""

    def __init__(self, weight: Tensor, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-8):
        self.weight, self.lr, self.betas, self.eps = weight, lr, betas, eps
        self.exp_avg = torch.zeros_like(weight)
        self.exp_avg_sq = torch.zeros_like(weight)
        self.step_count = 0

    @torch.no_grad()
    def step(self, rows: Tensor, grad: Tensor, lr: float | None = None) -> None:
        """rows (U,) unique row ids, grad (U, D) their (summed, all-reduced) gradient; lr: this step's."""
        lr = self.lr if lr is None else lr
        b1, b2 = self.betas
        self.step_count += 1
        bc1, bc2 = 1 - b1 ** self.step_count, 1 - b2 ** self.step_count
        m = self.exp_avg.index_select(0, rows).mul_(b1).add_(grad, alpha=1 - b1)  # (U, D)
        v = self.exp_avg_sq.index_select(0, rows).mul_(b2).addcmul_(grad, grad, value=1 - b2)
        self.exp_avg.index_copy_(0, rows, m)
        self.exp_avg_sq.index_copy_(0, rows, v)
        upd = m.div_(v.div_(bc2).sqrt_().add_(self.eps)).mul_(-lr / bc1)  # in place: m and v are copies
        self.weight.index_add_(0, rows, upd)  # rows are unique: a plain add per row

    def state_dict(self) -> dict:
        return {"step": self.step_count, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step"])
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])


def rowwise_reference(weight: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, rows: list[int],
                      grads: Tensor, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-8) -> None:
    """RowWiseAdamW.step written row by row, element formulas as in torch.optim.AdamW's docs (slow; a test
    oracle). `step` is the step number after this update (1 for the first)."""
    b1, b2 = betas
    for j, r in enumerate(rows):
        g = grads[j]
        exp_avg[r] = b1 * exp_avg[r] + (1 - b1) * g
        exp_avg_sq[r] = b2 * exp_avg_sq[r] + (1 - b2) * g * g
        m_hat = exp_avg[r] / (1 - b1 ** step)
        v_hat = exp_avg_sq[r] / (1 - b2 ** step)
        weight[r] = weight[r] - lr * m_hat / (v_hat.sqrt() + eps)


def step_rows(batch: dict[str, Tensor], itemnum: int, d: Dist = Dist()) -> Tensor:
    """The sorted unique item ids a step looks up on any rank (0 included: id dropout looks it up), padded with
    itemnum + 1 (never looked up) to a length fixed by the batch shape, so every step and rank has one shape
    (compiled graphs, all-reduce). -> (L,) with L = world x the step's lookups + 1."""
    ids = torch.cat([batch[k].reshape(-1) for k in ("seq_item", "next_item", "neg_item")])
    uniq = torch.unique(torch.cat([ids, ids.new_zeros(1)]))
    if d.enabled:  # the union over ranks: every rank updates the same rows with the same gradient
        uniq = torch.unique(gather_rows(uniq, row_counts(uniq.numel(), uniq.device, d), d))
    length = ids.numel() * d.world + 1
    return torch.cat([uniq, uniq.new_full((length - uniq.numel(),), itemnum + 1)])
