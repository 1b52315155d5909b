"""rmsjax.packed: the same numbers as the wrapped optimizer, on ordinary trees."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import registry

import rmsjax
from rmsjax import packing

OPTIMIZERS = {name: case.make for name, case in registry.tagged("packing").items()}


def _tree(seed: int = 0):
    rng = np.random.default_rng(seed)

    def arr(shape, dtype=np.float32):
        return jnp.asarray(rng.normal(size=shape).astype(np.float32)).astype(dtype)

    return {
        "dense": {"w": arr((3, 4)), "b": arr((4,))},
        "scalar": arr(()),
        "many": [arr((5,)) for _ in range(7)],
        "half": {"w": arr((2, 3), jnp.bfloat16), "b": arr((3,), jnp.bfloat16)},
        "wide": arr((6,), jnp.float64) if jax.config.jax_enable_x64 else arr((6,)),
        "big": arr((300,)),
    }


def _run(tx, params, steps, jit):
    update = jax.jit(tx.update) if jit else tx.update
    state = tx.init(params)
    history = []
    for k in range(steps):
        grads = jax.tree.map(lambda p, k=k: (p * (1.5 + k) - 0.3).astype(p.dtype), params)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        history.append((updates, params))
    return history, state


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_bit_for_bit(name, jit):
    params = _tree()
    # A small max_leaf_size so that "big" stays unpacked and the rest is packed.
    wrapped, _ = _run(packing.packed(OPTIMIZERS[name](), max_leaf_size=100), params, 4, jit)
    plain, _ = _run(OPTIMIZERS[name](), params, 4, jit)
    for (u1, p1), (u2, p2) in zip(wrapped, plain):
        assert jax.tree.structure(u1) == jax.tree.structure(u2)
        for a, b in zip(jax.tree.leaves((u1, p1)), jax.tree.leaves((u2, p2))):
            assert a.dtype == b.dtype and a.shape == b.shape
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            if not jit and a.ndim > 0:
                np.testing.assert_array_equal(a, b)
            elif not jit:
                # A 0-d leaf is divided by a broadcast scalar (Adam's bias correction) in
                # XLA:CPU's scalar code when alone and in its vector code once packed, and the
                # vector code is not correctly rounded there (1 ulp, measured: 0.74999976 alone,
                # 0.74999982 packed, for 0.075/0.100000024).
                np.testing.assert_allclose(a, b, rtol=2.5e-7, atol=0)
            else:
                # Compiled, XLA:CPU contracts multiply-adds into FMAs, and the vectorised
                # body and the scalar remainder of a loop may contract differently: an
                # element's last bit can depend on its position in the array, which
                # packing moves (docs/performance.md). Eager, every operation rounds
                # alone and the numbers are equal bit for bit (above).
                np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-12)


def test_groups_by_dtype_and_size():
    params = _tree()
    layout = packing.layout_of(params, max_leaf_size=100)
    leaves = jax.tree.leaves(params)
    by_group = [{leaves[i].dtype for i in g} for g in layout.groups]
    assert all(len(dtypes) == 1 for dtypes in by_group)
    big = [i for i, x in enumerate(leaves) if x.size > 100]
    assert all((i,) in layout.groups for i in big)
    assert len(layout.groups) == 1 + 2  # float32 buffer, bfloat16 buffer, "big" alone


def test_state_is_a_few_buffers_and_readable():
    params = {f"w{i}": jnp.ones(10) for i in range(50)}
    tx = rmsjax.packed(rmsjax.rmsprop(optax.constant_schedule(0.5)))
    state = tx.init(params)
    big = [x for x in jax.tree.leaves(state.inner) if x.ndim]
    assert [x.shape for x in big] == [(500,)]
    _, state = tx.update(params, state, params)
    assert float(rmsjax.learning_rate(state)) == 0.5
    assert int(rmsjax.step_count(state)) == 1


def test_pack_unpack_roundtrip_and_gradient():
    params = _tree()
    buffers, layout = packing.pack(params)
    back = packing.unpack(buffers, layout)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))

    def loss(bufs):
        tree = packing.unpack(bufs, layout)
        return sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(tree))

    grads = jax.grad(loss)(buffers)
    expected, _ = packing.pack(jax.tree.map(lambda x: (2 * x.astype(jnp.float32)).astype(x.dtype),
                                            params), layout)
    for a, b in zip(grads, expected):
        np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))


def test_mismatched_tree_is_named():
    tx = rmsjax.packed(rmsjax.rmsprop(0.1))
    state = tx.init({"a": jnp.ones(3), "b": jnp.ones(2)})
    with pytest.raises(ValueError, match="leaf 1 of updates"):
        tx.update({"a": jnp.ones(3), "b": jnp.ones(4)}, state)
    with pytest.raises(ValueError, match="3 leaves"):
        tx.update({"a": jnp.ones(3), "b": jnp.ones(2), "c": jnp.ones(1)}, state)
    with pytest.raises(ValueError, match="max_leaf_size"):
        rmsjax.packed(rmsjax.rmsprop(0.1), max_leaf_size=-1)


def test_compiles_once_and_one_slice_kernel_per_size():
    params = {f"w{i}": jnp.ones(8) for i in range(30)}
    tx = rmsjax.packed(rmsjax.rmsprop(0.1))
    traces = []

    def step(p, s, g):
        traces.append(1)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    jitted = jax.jit(step)
    state = tx.init(params)
    for _ in range(3):
        params, state = jitted(params, state, params)
    assert len(traces) == 1
    # The slices take their offsets from the state, so they are not constant-folded
    # into 30 different kernels.
    text = jitted.lower(params, state, params).as_text()
    assert "dynamic_slice" in text


def test_nnx_optimizer():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Sequential(*[nnx.Linear(4, 4, rngs=nnx.Rngs(i)) for i in range(5)])
    reference = nnx.Sequential(*[nnx.Linear(4, 4, rngs=nnx.Rngs(i)) for i in range(5)])
    opt = nnx.Optimizer(model, rmsjax.packed(rmsjax.rmsprop(0.01)), wrt=nnx.Param)
    ref = nnx.Optimizer(reference, rmsjax.rmsprop(0.01), wrt=nnx.Param)
    x = jnp.ones((2, 4))

    def loss(m):
        return jnp.sum(m(x) ** 2)

    for _ in range(3):
        opt.update(model, nnx.grad(loss)(model))
        ref.update(reference, nnx.grad(loss)(reference))
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                    jax.tree.leaves(nnx.state(reference, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharded_leaves_are_never_packed_across_devices():
    devices = jax.devices()
    if len(devices) < 2:
        pytest.skip("needs two devices (XLA_FLAGS=--xla_force_host_platform_device_count=2)")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(devices[:2]), ("x",))
    split = jax.device_put(jnp.ones(8), NamedSharding(mesh, PartitionSpec("x")))
    on0 = jax.device_put(jnp.ones(3), devices[0])
    on1 = jax.device_put(jnp.ones(3), devices[1])
    layout = packing.layout_of({"split": split, "on0": on0, "on1": on1, "on0b": on0 * 2})
    assert len(layout.groups) == 3  # split alone, the two device-0 leaves, device 1 alone
