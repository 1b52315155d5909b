"""rmsjax.zero_shardings on one device, and the 8-device ZeRO-1 tests in a subprocess.

The 8-device tests (``tests/sharding/test_zero_sharding.py``) need
``--xla_force_host_platform_device_count=8``, read when jax starts, hence the subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType

import rmsjax

ROOT = Path(__file__).resolve().parents[1]


def _mesh():
    return jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:1])


def test_one_device_mesh_puts_axis_on_every_leaf_with_a_dimension():
    tx = rmsjax.quantized(rmsjax.adam(1e-3), min_size=1)
    params = {"w": jnp.ones((4, 512)), "b": jnp.ones(3)}
    sh = rmsjax.zero_shardings(tx, params, _mesh())
    mu = sh.inner[0].mu
    assert tuple(mu["w"].codes.spec)[0] == "data" and tuple(mu["w"].scale.spec)[0] == "data"
    assert tuple(mu["b"].codes.spec)[0] == "data"
    assert tuple(sh.count.spec) == ()
    state = jax.jit(tx.init, out_shardings=sh)(params)
    assert jax.tree.structure(state) == jax.tree.structure(tx.init(params))


def test_bad_arguments():
    mesh = _mesh()
    with pytest.raises(ValueError, match="axis 'batch' is not an axis of mesh"):
        rmsjax.zero_shardings(rmsjax.adam(1e-3), {"w": jnp.ones(4)}, mesh, axis="batch")
    with pytest.raises(TypeError, match="tx must be"):
        rmsjax.zero_shardings(0.1, {"w": jnp.ones(4)}, mesh)
    with pytest.raises(TypeError, match=r"params\['w'\] is a str"):
        rmsjax.zero_shardings(rmsjax.adam(1e-3), {"w": "x"}, mesh)


@pytest.mark.slow
def test_zero_suite_passes_on_8_simulated_devices():
    env = dict(os.environ)
    flag = "--xla_force_host_platform_device_count=8"
    env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), flag]).strip()
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/sharding/test_zero_sharding.py", "-q",
         "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    report = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert " passed" in result.stdout and "skipped" not in result.stdout, report
