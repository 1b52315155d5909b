"""rmsjax.quantized on 8 simulated devices: codes and scales live where their parameter lives.

Run by ``tests/test_quantized_sharding_subprocess.py`` (see ``conftest.py`` here for the flag).

Rule checked: codes are shaped like the parameter and blocks run along its last axis, so a
leaf sharded along any other
axis keeps whole blocks on each device; when the last axis itself is sharded, the block
divides the per-shard length (eager init picks it from the sharding, and so does a jitted
init on a mesh with explicit axes; with automatic axes under jit the default block must divide
it, as 256 divides 4096 / 8 = 512 here).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import rmsjax
from rmsjax import _quantization as qz

COLLECTIVE = re.compile(r"\b(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(-start)?\(")

MESH = jax.make_mesh((8,), ("x",))
SPECS = {"rows": P("x", None), "cols": P(None, "x")}
SHAPE = (64, 4096)


def _params(spec):
    w = jnp.arange(np.prod(SHAPE), dtype=jnp.float32).reshape(SHAPE) / 1e5
    return {"w": jax.device_put(w, NamedSharding(MESH, spec))}


def _quantized_leaves(state):
    return [x for x in jax.tree.leaves(state, is_leaf=qz.is_quantized) if qz.is_quantized(x)]


def _padded(x):
    """``x``'s partition spec with one entry per axis (jax 0.8 drops trailing Nones)."""
    spec = tuple(x.sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def _check_blocks_inside_shards(q, spec):
    """Each device holds whole blocks: its scale shard covers exactly its codes shard, and
    both are sharded along the parameter's sharded axis."""
    assert _padded(q.codes)[: len(spec)] == tuple(spec), q.codes.sharding.spec
    assert _padded(q.scale)[: len(spec)] == tuple(spec), q.scale.sharding.spec
    codes_shard = q.codes.sharding.shard_shape(q.codes.shape)
    scale_shard = q.scale.sharding.shard_shape(q.scale.shape)
    packed = isinstance(q, qz.PackedQuantizedArray)
    # codes are shaped like the parameter (4 bits: its last axis halved); one scale per block
    assert codes_shard[:-1] == scale_shard[:-1]
    assert codes_shard[-1] * (2 if packed else 1) == scale_shard[-1] * qz._layout_of(q).block
    assert np.prod(codes_shard) * (2 if packed else 1) == np.prod(SHAPE) // 8


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("where", sorted(SPECS))
@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
def test_codes_and_scales_are_sharded_like_their_parameter(bits, where, jitted):
    spec = SPECS[where]
    params = _params(spec)
    tx = rmsjax.quantized(rmsjax.adam(1e-3), bits=bits)
    state = jax.jit(tx.init)(params) if jitted else tx.init(params)
    leaves = _quantized_leaves(state)
    assert len(leaves) == 2
    for q in leaves:
        _check_blocks_inside_shards(q, spec)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("where", sorted(SPECS))
def test_update_compiles_to_no_collectives_and_matches_one_device(bits, where):
    spec = SPECS[where]
    params = _params(spec)
    tx = rmsjax.quantized(rmsjax.adam(1e-3), bits=bits)
    state = tx.init(params)
    grads = {"w": jax.device_put(jnp.cos(params["w"] * 7.0), NamedSharding(MESH, spec))}
    step = jax.jit(tx.update)
    hlo = step.lower(grads, state, params).compile().as_text()
    assert not COLLECTIVE.search(hlo), COLLECTIVE.search(hlo).group(0)
    updates, new_state = step(grads, state, params)
    for q in _quantized_leaves(new_state):
        _check_blocks_inside_shards(q, spec)
    # the same step on one device gives the same bits (the rounding hash uses global indices)
    local = jax.tree.map(lambda a: jax.device_put(np.asarray(a), jax.devices()[0]), (grads, state, params))
    ref_updates, ref_state = jax.jit(tx.update)(*local)
    np.testing.assert_array_equal(np.asarray(updates["w"]), np.asarray(ref_updates["w"]))
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_eager_init_picks_a_block_that_fits_the_shard():
    # last axis 1024 over 8 devices: 128 per shard, smaller than the default block of 256
    w = jax.device_put(jnp.ones((64, 1024)), NamedSharding(MESH, P(None, "x")))
    state = rmsjax.quantized(rmsjax.adam(1e-3)).init({"w": w})
    for q in _quantized_leaves(state):
        assert q.codes.shape == (64, 1024) and q.scale.shape == (64, 8)  # blocks of 128
        assert q.scale.sharding.spec[:2] == (None, "x")


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape,spec", [((64, 8, 8), P(None, None, "x")), ((64, 8, 8), P(None, "x", None)),
                                        ((64, 16, 8), P(None, "x", None))],
                         ids=["last", "middle", "middle-2-per-shard"])
def test_a_sharded_row_of_several_axes_keeps_the_leaf_wide(bits, shape, spec):
    """The last axis (8) is too short for a block, so the row is the last two axes, stored in
    low bits when unsharded. Sharded 8 ways along either axis of that row, the leaf stays in
    full precision (docs/low_bit.md, *Blocks and scales*): along the last axis a block would
    not be contiguous in a shard, and along the middle one eager init used to fail in jax's
    reshape of the sharded moment into blocks. The update is float32 state's, bit for bit."""
    w = jnp.linspace(-1.0, 1.0, int(np.prod(shape))).reshape(shape)
    tx, wide = rmsjax.quantized(rmsjax.adam(1e-3), bits=bits, min_size=1), rmsjax.adam(1e-3)
    assert len(_quantized_leaves(tx.init({"w": w}))) == 2  # mu and nu, unsharded
    params = {"w": jax.device_put(w, NamedSharding(MESH, spec))}
    state = tx.init(params)
    assert not _quantized_leaves(state)
    grads = {"w": jnp.cos(3.0 * params["w"])}
    updates, _ = jax.jit(tx.update)(grads, state, params)
    ref, _ = jax.jit(wide.update)(grads, wide.init(params), params)
    np.testing.assert_array_equal(np.asarray(updates["w"]), np.asarray(ref["w"]))


@pytest.mark.parametrize("bits", [8, 4])
def test_jit_init_on_a_mesh_with_explicit_axes_reads_the_shard(bits):
    """With explicit mesh axes the traced parameter carries its sharding, so ``jax.jit(init)``
    picks the same layout as eager init: blocks of 128 for a last axis of 1024 over 8 devices,
    blocks of 8 for a last axis of 64 (before, the jitted init planned on the whole row and
    failed in jax's reshape, since a block would have crossed shards)."""
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    spec = P(None, "x")
    params = {"w": jax.device_put(jnp.ones((64, 1024)), NamedSharding(mesh, spec)),
              "v": jax.device_put(jnp.ones((512, 64)), NamedSharding(mesh, spec))}
    tx = rmsjax.quantized(rmsjax.adam(1e-3), bits=bits)
    eager, jitted = tx.init(params), jax.jit(tx.init)(params)
    assert jax.tree.structure(eager) == jax.tree.structure(jitted)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
    mu = jitted.inner[0].mu
    assert qz.is_quantized(mu["w"]) and mu["w"].scale.shape == (64, 8)
    assert qz.is_quantized(mu["v"]) and mu["v"].scale.shape == (512, 8)
    grads = jax.tree.map(jnp.cos, params)
    updates, _ = jax.jit(tx.update)(grads, jitted, params)
    ref, _ = jax.jit(tx.update)(grads, eager, params)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("bits", [8, 4])
def test_flax_linen_logical_partitioning_onto_an_fsdp_mesh(bits):
    """flax examples/lm1b's setup: logical partition specs of ``jax.eval_shape(tx.init)`` onto a
    mesh. The parameter's last axis is sharded with 128 elements per shard; the abstract init
    cannot see that, so the blocks are set to fit (``block_size=128``). Codes take the
    parameter's axis names; scales are replicated along the blocked axis."""
    import flax.linen as nn

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1024, kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("embed", "mlp")), use_bias=False)(x)

    rules = (("embed", None), ("mlp", "x"))
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))  # as lm1b's
    x = jnp.ones((4, 64))
    boxed = Model().init(jax.random.PRNGKey(0), x)
    tx = rmsjax.quantized(rmsjax.adam(1e-3), bits=bits, block_size=128)
    abstract = jax.eval_shape(tx.init, boxed)
    specs = nn.get_partition_spec(abstract)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    param_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    params = jax.jit(lambda b: nn.meta.unbox(b), out_shardings=nn.meta.unbox(param_shardings))(boxed)
    state = jax.jit(tx.init, out_shardings=shardings)(boxed)
    state = nn.meta.unbox(state)
    q = _quantized_leaves(state)[0]
    assert q.codes.sharding.spec[:2] == (None, "x")
    grads = jax.tree.map(lambda p: jnp.cos(p), params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    ref_updates, _ = jax.jit(tx.update)(
        *jax.tree.map(lambda a: jax.device_put(np.asarray(a), jax.devices()[0]),
                      (grads, nn.meta.unbox(jax.jit(tx.init)(boxed)), params)))
    np.testing.assert_allclose(np.asarray(updates["params"]["Dense_0"]["kernel"]),
                               np.asarray(ref_updates["params"]["Dense_0"]["kernel"]), rtol=1e-6)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("shape", [(64, 16, 8), (64, 64, 8)])
def test_a_row_of_several_axes_split_along_a_leading_axis_on_an_explicit_mesh(shape, jitted, bits):
    """A leaf whose last axis (8) is too short for a block, so that its row is its last two
    axes, split along its first axis on a mesh with Explicit axes (a stack of conv kernels).
    jax's sharding rule for reshape refused to merge the row into blocks ((64, 16, 8) ->
    (64, 1, 128)): init raised a ShardingTypeError. Such a leaf now stays in full precision,
    eagerly and under jit alike, and its update is float32 state's, bit for bit. On a mesh with
    Auto axes it is stored in low bits, as before."""
    w = jnp.linspace(-1.0, 1.0, int(np.prod(shape))).reshape(shape)
    tx, wide = rmsjax.quantized(rmsjax.adam(1e-3), bits=bits, min_size=1), rmsjax.adam(1e-3)
    auto_mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    auto = {"w": jax.device_put(w, NamedSharding(auto_mesh, P("x")))}
    assert len(_quantized_leaves(tx.init(auto))) == 2
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    params = {"w": jax.device_put(w, NamedSharding(mesh, P("x")))}
    state = jax.jit(tx.init)(params) if jitted else tx.init(params)
    assert not _quantized_leaves(state)
    grads = {"w": jnp.cos(3.0 * params["w"])}
    updates, _ = jax.jit(tx.update)(grads, state, params)
    ref, _ = jax.jit(wide.update)(grads, wide.init(params), params)
    np.testing.assert_array_equal(np.asarray(updates["w"]), np.asarray(ref["w"]))
