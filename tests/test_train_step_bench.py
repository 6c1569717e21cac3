"""bench/train_step.py --variant: each variant builds its own model from the shared options, and the variants are
measured in turn, --rounds times over."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "bench"))
import train_step  # noqa: E402  (bench/train_step.py)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_variants_alternate_and_each_builds_its_own_model(tmp_path):
    out, js = tmp_path / "r.md", tmp_path / "r.json"
    train_step.main(["--preset", "small", "--batch-size", "4", "--steps", "1", "--warmup", "0", "--batches", "1",
                     "--users", "60", "--items", "50", "--no-compile", "--workdir", str(tmp_path / "w"),
                     "--set", "maxlen=12", "--set", "hidden=16", "--rounds", "2",
                     "--variant", "sasrec:model=sasrec", "--variant", "wide:linear_dim=32,num_layers=3",
                     "--variant", "narrow:num_layers=3", "--out", str(out), "--json", str(js)])
    rows = json.loads(js.read_text())["rows"]
    assert [r["preset"] for r in rows] == ["small: sasrec", "small: wide", "small: narrow"] * 2
    params = {r["preset"].split(": ")[1]: r["params"] for r in rows}
    # counted by hand: at hidden 16 (the shared --set) and the small preset's 2 heads, dv 32 instead of 8 adds to
    # each of the 3 layers U, V weights 16 x 2 x 2 x 24 and biases 2 x 2 x 24, the LayerNorm on A·V 2 x 2 x 24,
    # and the output projection's 2 x 24 x 16 weights
    assert params["wide"] - params["narrow"] == 3 * (1536 + 96 + 96 + 768)
    assert params["sasrec"] != params["narrow"]
    assert "| small: wide |" in out.read_text()
    with pytest.raises(SystemExit):
        train_step.parse_variants(["no_colon"], {})
    assert train_step.parse_variants([], {"hidden": 8}) == [("", {"hidden": 8})]
    assert train_step.parse_variants(["a:hidden=8,num_layers=3"], {"hidden": 4, "seed": 1}) == [
        ("a", {"hidden": 8, "num_layers": 3, "seed": 1})]
