"""The candidate code of benchmarks/minifloat_codec_probe.py (issue 20): exact where it should
be, unbiased where it rounds, and the script runs end to end. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "minifloat_codec_probe.py"


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("minifloat_codec_probe", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("signed", [True, False], ids=["first", "second"])
def test_representable_values_round_trip_exactly(probe, signed):
    """Every value 2**e * (1 + k / 2**m) with e in [-15, -1] is a code: any rounding keeps it."""
    m = probe.FIRST_MANTISSA if signed else probe.SECOND_MANTISSA
    values = np.array([2.0**e * (1 + k / 2**m) for e in range(-15, 0) for k in range(2**m)], np.float32)
    if signed:
        values = np.concatenate([values, -values])
    x = jnp.asarray(values)[None, :]
    scale = jnp.full((1, 1), 4.0, jnp.float32)  # values are relative to the scale
    for salt in range(3):
        bits = probe._random_bits(x.shape, jnp.int32(salt), 11)
        codes = probe.encode(x * 4.0, 1 / scale, bits, m, signed)
        np.testing.assert_array_equal(np.asarray(probe.decode(codes, scale, m, signed))[0], values * 4.0)


@pytest.mark.parametrize("signed", [True, False], ids=["first", "second"])
def test_stochastic_rounding_is_unbiased(probe, signed):
    """Over many steps the mean decoded value of a fixed x is x (a NumPy mean, float64), for
    values between two codes, across a binade boundary, and below the lowest binade (first
    moment only: a second moment never rounds to 0). Values stay below the top code, as the
    probe's scales keep them (``HEADROOM``)."""
    m = probe.FIRST_MANTISSA if signed else probe.SECOND_MANTISSA
    picks = [0.3, 0.7, 0.93, 0.49, 2.0**-10 * 1.01, 2.0**-15 * 1.5]
    if signed:
        picks += [-0.3, 2.0**-17]
    x = jnp.asarray(np.repeat(np.array(picks, np.float32), 4096))[None, :]
    scale = jnp.ones((1, 1), jnp.float32)
    def trip(count):
        codes = probe.encode(x, 1 / scale, probe._random_bits(x.shape, count, 5), m, signed)
        return probe.decode(codes, scale, m, signed)

    trips = jax.jit(trip)
    mean = np.mean([np.asarray(trips(jnp.int32(c)), np.float64) for c in range(32)], axis=0)
    mean = mean.reshape(len(picks), -1).mean(axis=1)
    np.testing.assert_allclose(mean, np.array(picks, np.float64), rtol=2e-3)


@pytest.mark.slow  # times three steps and runs the precision and tracking tables
def test_quick_run_writes_the_tables(probe, tmp_path):
    result = probe.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "minifloat_codec_probe_quick.json").read_text())
    assert saved["speed"] == result["speed"]
    names = [row["variant"] for row in saved["speed"]]
    assert names == ["float32 Adam", "rmsjax.quantized(adam), 8 bits", "minifloat 8-bit Adam (probe)"]
    assert saved["speed"][0]["ratio"] == 1.0
    assert [row["steps"] for row in saved["tracking"]] == [20, 20]
    assert all(row["ms"] > 0 for row in saved["speed"])
    # the probe's state is 2 bytes per parameter plus scales, like rmsjax's 8-bit Adam
    rows = {(r["code"], r["moment"], r["binades"]): r for r in saved["precision"]}
    assert len(rows) == 12
    for moment in ("first (signed)", "second"):
        assert abs(rows[("minifloat (probe)", moment, 12)]["mean_relative_bias"]) < 2e-3
        # 20 binades reach below the probe's lowest binade: the power map keeps its precision there
        assert rows[("minifloat (probe)", moment, 20)]["rms_relative_error"] > \
            rows[("rmsjax power map", moment, 20)]["rms_relative_error"]


def test_probe_step_tracks_float32_adam(probe):
    """After 20 steps both 8-bit runs end near float32 Adam (optax, independent): a median
    distance under 3 % of the largest possible travel (a run that did not move at all would
    be about as far as float32 Adam travelled, a median of ~10 % or more), 99 % of elements
    under 15 %; and the probe's scales do not run away (a scale that only grows would round
    every moment to zero)."""
    for row in probe.tracking_rows(shape=(8, 512), steps=20):
        assert row["median"] < 0.03 and row["p99"] < 0.15, row
    init, step = probe.minifloat_adam((8, 512))
    params = jnp.zeros((8, 512), jnp.float32)
    state = init(params)
    rng = np.random.default_rng(4)
    for _ in range(30):
        params, state = jax.jit(step)(params, state, jnp.asarray(rng.standard_normal((8, 512)), jnp.float32))
    # |g| of a standard normal stays under ~6, so scales stay under 2 * 9/8 * 6 and 2 * 17/16 * 36
    assert float(jnp.max(state[2])) <= 16.0 and float(jnp.max(state[4])) <= 128.0
