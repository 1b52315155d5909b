"""rmsjax.zero_shardings on one device.

The 8-device ZeRO-1 tests (``tests/sharding/test_zero_sharding.py``) run with the rest of
``tests/sharding`` in the subprocess of ``tests/test_sharding_subprocess.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType

import rmsjax


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
