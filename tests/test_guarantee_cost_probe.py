"""benchmarks/guarantee_cost_probe.py (issue 20): each variant takes out what it says and nothing
else, the shipped codec is untouched afterwards, and the script runs end to end. No timing is
asserted."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from rmsjax import _codec

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "guarantee_cost_probe.py"


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("guarantee_cost_probe", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _levels(probe, dropped, x, count=3, signed=False):
    scale = jnp.ones((x.shape[0], 1), jnp.float32)
    with probe.without(dropped):
        u = _codec.uniform(x.shape, jnp.int32(count), 1)
        return np.asarray(_codec.encode(x, _codec.inverse_scale(scale), u, 8, signed))


def test_variants_swap_only_their_part_and_restore_the_codec(probe):
    shipped = (_codec.uniform, _codec.encode, _codec.decode)
    rng = np.random.default_rng(0)
    x = jnp.asarray(np.abs(rng.standard_normal((4, 256))).astype(np.float32) / 8)
    reference = _levels(probe, (), x)
    # the probe's own encode, with only the non-finite codes taken out, gives the library's
    # codes for finite values
    np.testing.assert_array_equal(_levels(probe, ("non-finite encode",), x), reference)
    # taking out the hash or the value-unbiased rounding does change them
    assert not np.array_equal(_levels(probe, ("hash",), x), reference)
    assert not np.array_equal(_levels(probe, ("value-unbiased",), x), reference)
    assert (_codec.uniform, _codec.encode, _codec.decode) == shipped


def test_non_finite_variants_lose_the_reserved_codes(probe):
    x = jnp.asarray(np.array([[np.inf, np.nan, 0.5, 0.25]], np.float32))
    kept = _levels(probe, (), x)
    assert kept[0, 0] == _codec._INF[(8, False)] and kept[0, 1] == _codec._NAN[(8, False)]
    lost = _levels(probe, ("non-finite encode",), x)
    assert lost[0, 0] <= _codec.MAPS[(8, False)][0]
    scale = jnp.ones((1, 1), jnp.float32)
    level = jnp.asarray(kept, jnp.float32)
    assert np.isinf(np.asarray(_codec.decode(level, scale, 8, False))[0, 0])
    with probe.without(("reserved decode",)):
        assert np.isfinite(np.asarray(_codec.decode(level, scale, 8, False))[0, 0])


def test_what_is_given_up_is_measured(probe):
    """The shipped codec is unbiased (within the 256-step mean's noise) and keeps non-finite
    moments; code-domain rounding is biased at low levels; dropping the reserved codes loses
    a non-finite second moment."""
    assert probe.largest_bias(()) < 5e-3
    assert probe.largest_bias(("value-unbiased",)) > 0.05
    assert probe.inf_gradient_kept(())
    assert not probe.inf_gradient_kept(("reserved decode",))


@pytest.mark.slow  # compiles 21 steps and 20 peak analyses
def test_quick_run_writes_the_tables(probe, tmp_path):
    result = probe.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "guarantee_cost_probe_quick.json").read_text())
    assert saved["speed"] == result["speed"]
    assert [r["variant"] for r in saved["speed"][:7]] == ["float32 state", *probe.VARIANTS]
    assert {r["optimizer"] for r in saved["speed"]} == set(probe.TIMED)
    assert all(r["ms"] > 0 for r in saved["speed"])
    assert [(r["optimizer"], r["bits"]) for r in saved["peak"]] == \
        [(name, bits) for name in probe.OPTIMIZERS for bits in (8, 4)]
    for row in saved["peak"]:  # the arguments alone are what the state allows
        assert row["default"] >= row["allowed"] - 0.01
        assert row["region_analysis"] is None or row["region_analysis"] >= row["allowed"] - 0.01
