"""Smoke test of benchmarks/low_bit_lm_quality.py (issue 20): a 20-step run, no quality asserted."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

# Trains the small transformer LM several times (about a minute on CPU): `slow`.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "low_bit_lm_quality.py"


def _load():
    spec = importlib.util.spec_from_file_location("low_bit_lm_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_schedule_is_lm1b_warmup_then_rsqrt():
    schedule = _load().lm1b_schedule(3.2e-3, 40)
    for step, rate in [(0, 0.0), (20, 1.6e-3), (40, 3.2e-3), (160, 1.6e-3), (640, 0.8e-3)]:
        assert float(schedule(step)) == pytest.approx(rate, rel=1e-6, abs=1e-12)


def test_quick_run_writes_three_variants(tmp_path):
    _load().main(["--quick", "--alternatives", "never", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "low_bit_lm_quality.json").read_text())
    variants = report["variants"]
    assert {"float32", "8-bit", "4-bit"} <= set(variants)
    assert report["settings"]["steps"] == 20
    for result in variants.values():
        assert math.isfinite(result["final_eval_loss"])
        assert len(result["train_losses"]) == 20
        assert all(math.isfinite(loss) for loss in result["train_losses"])
        # eval at step 0, every 10 steps, and after the last one
        assert [step for step, _ in result["eval_curve"]] == [0, 10, 20]
    assert variants["float32"]["ratio"] == 1.0
    per_param = [variants[name]["state_bytes_per_param"] for name in ("float32", "8-bit", "4-bit")]
    assert per_param[0] == pytest.approx(8.0, abs=1e-3)  # mu and nu, plus a counter
    assert per_param[0] > per_param[1] > per_param[2]
    table = (tmp_path / "low_bit_lm_quality.md").read_text()
    assert table.startswith("# rmsjax.quantized: small transformer LM")
    assert "| 4-bit |" in table
