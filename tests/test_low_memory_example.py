"""Smoke test of examples/low_memory_training.py (8 simulated devices, a few steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_example_runs_and_reports(tmp_path):
    out = tmp_path / "result.json"
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, "examples/low_memory_training.py", "--steps", "4", "--batch", "8",
         "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "bytes per parameter per device" in result.stdout
    data = json.loads(out.read_text())
    assert data["devices"] == 8
    per = data["bytes_per_parameter"]
    assert per["parameters (bfloat16, replicated)"] == 2.0
    state = next(v for k, v in per.items() if k.startswith("optimizer state"))
    assert state < 0.5  # 8-bit Adam state split 8 ways (plus the small leaves kept whole)
    assert data["collective_ratio"] < 1.1
    assert 0.9 < data["loss_ratio"] < 1.1
