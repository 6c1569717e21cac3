"""bench/scale.py's memory estimates against direct measurements at a tiny size, and bench/embedding_grad.py's
row-wise AdamW against its references."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import scale  # noqa: E402
from model import HSTUModel, ModelConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# reference-like (dropout on, rel-pos bias, HSTU) but tiny; the real feature list at a 300-item catalogue
TINY = ModelConfig(id_dim=8, feat_dim=4, hidden=16, num_layers=2, num_heads=2, maxlen=11, num_time_buckets=8)
ITEMS = 300
SCHEMA = scale.real_schema(ITEMS)


def test_param_count_is_the_real_models():
    pc = scale.count_params(TINY, SCHEMA, ITEMS)
    real = HSTUModel(TINY, SCHEMA, ITEMS)  # on the CPU, with real storage
    assert pc["total"] == sum(p.numel() for p in real.parameters())
    assert pc["id_table"] == (ITEMS + 1) * TINY.id_dim
    assert sum(v for k, v in pc.items() if " " in k) == pc["total"]  # the groups partition the parameters
    # 111 (one value an item) is in the schema, as in item_feat.npy, but not embedded
    assert pc["item feature tables"] == TINY.feat_dim * sum(v for f, v in SCHEMA["item_sparse"].items() if f != "111")


def test_activation_fit_matches_measured_peak():
    # fitted at B = 2, 3 from saved-tensor bytes, checked at B = 5 against the allocator's peak over the same
    # forward (which also holds transients and the outputs, so it may exceed the saved bytes a little, never less)
    fit = scale.fit_activations(TINY, SCHEMA, (2, 3), amp=True, itemnum=ITEMS)
    est = sum(fit.at(5).values())
    small = scale.small_vocab(SCHEMA)
    torch.manual_seed(0)
    model = HSTUModel(TINY, small, ITEMS)
    peak = scale.forward_peak_bytes(model, scale.synthetic_batch(TINY, small, ITEMS, 5), amp=True)
    assert 1.0 <= peak / est <= 1.3, (peak, est)


def test_loss_estimate_matches_measured_peak():
    rows, dim, chunk_rows = 1200, 16, 300  # four checkpointed chunks of (300, 2400) logits
    est = scale.loss_bytes(rows, rows, dim, hard_k=None, chunk_logits=chunk_rows * 2 * rows)
    assert est["chunk_rows"] == chunk_rows
    inside = est["total"] - 4.0 * rows * dim * 3  # the query, pos and neg vectors exist before the loss starts
    measured = scale.loss_peak_measured(rows, dim, chunk_rows)
    assert 0.9 <= measured / inside <= 1.1, (measured, inside)
