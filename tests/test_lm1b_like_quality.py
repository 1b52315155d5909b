"""Smoke test of benchmarks/lm1b_like_quality.py (issue 20): a 10-step run, no quality asserted."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

# Trains the LM three times (several seconds on CPU): `slow`.
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not hasattr(nnx, "as_pure"), reason="nnx.as_pure is new in flax 0.12.7")]

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "lm1b_like_quality.py"


def _load():
    spec = importlib.util.spec_from_file_location("lm1b_like_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_positions_are_sines_then_cosines():
    table = np.asarray(_load().sinusoids(5, 8))
    np.testing.assert_allclose(table[:, 0], np.sin(np.arange(5)), rtol=1e-6)
    np.testing.assert_allclose(table[:, 4], np.cos(np.arange(5)), rtol=1e-6)
    np.testing.assert_allclose(table[3, 1], np.sin(3 / 10000 ** 0.25), rtol=1e-6)


def test_dropout_only_while_training():
    module = _load()
    model = module.Lm1bLikeLM(256, 16, 32, 4, 64, 1, rngs=nnx.Rngs(0))
    tokens = jnp.arange(16)[None] % 256
    key = jax.random.key(0)
    assert jnp.array_equal(model(tokens, key, rate=0.0), model(tokens))  # no key: evaluation
    assert not jnp.allclose(model(tokens, key), model(tokens))


def test_quick_run_trains_three_states():
    result = _load().main(["--quick"])
    assert set(result["runs"]) == {"float32", "8-bit", "4-bit"}
    for run in result["runs"].values():
        assert math.isfinite(run["final_eval_loss"])
        assert [step for step, _ in run["eval_curve"]] == [5, 10]
    per_param = [result["runs"][name]["state_bytes_per_param"] for name in ("float32", "8-bit", "4-bit")]
    assert per_param[0] == pytest.approx(8.0, abs=1e-3)
    assert per_param[0] > per_param[1] > per_param[2]
