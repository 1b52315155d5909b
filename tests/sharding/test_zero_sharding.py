"""ZeRO-1 on 8 simulated CPU devices: rmsjax.zero_shardings and the train step of the docs.

The step under test is ``examples/low_memory_training.py``'s ``zero_train_step``, the recipe
docs/low_memory.md prints. Run by ``tests/test_zero.py`` (and ``test_sharding_subprocess.py``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import rmsjax

ROOT = Path(__file__).resolve().parents[2]


def _example():
    name = "low_memory_training"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _mesh(n=8):
    return jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


def _params(dtype=jnp.float32, width=256):
    rng = np.random.default_rng(0)
    return {
        "w1": jnp.asarray(rng.standard_normal((64, width)) / 8, dtype),
        "b1": jnp.zeros(width, dtype),
        "w2": jnp.asarray(rng.standard_normal((width, width)) / 16, dtype),
        "w3": jnp.asarray(rng.standard_normal((width, 16)) / 16, dtype),
    }


def _loss(params, batch):
    x, y = batch[:, :64], batch[:, 64:80]
    dtype = params["w1"].dtype
    h = jnp.tanh(x.astype(dtype) @ params["w1"] + params["b1"])
    h = jnp.tanh(h @ params["w2"])
    return jnp.mean(((h @ params["w3"]).astype(jnp.float32) - y) ** 2)


def _batches(steps, size=64):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((steps, size, 64)).astype(np.float32)
    y = np.sin(x[..., :16] * 2.0)
    return np.concatenate([x, y], axis=-1)


def _run_zero(tx, params, mesh, steps, batches, step_maker="zero_train_step"):
    ex = _example()
    params = jax.device_put(params, NamedSharding(mesh, P()))
    step, shardings = getattr(ex, step_maker)(tx, _loss, params, mesh)
    state = jax.jit(tx.init, out_shardings=shardings)(params)
    sharding = NamedSharding(mesh, P("data"))
    for b in batches[:steps]:
        params, state, _ = jax.block_until_ready(
            step(params, state, jax.device_put(jnp.asarray(b), sharding)))  # see conftest.py
    return params, state, step, shardings


def _run_one_device(tx, params, steps, batches):
    state = tx.init(params)

    @jax.jit
    def step(params, state, b):
        g = jax.grad(_loss)(params, b)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    for b in batches[:steps]:
        params, state = step(params, state, jnp.asarray(b))
    return params, state


# --------------------------------------------------------------------------- placement and memory


@pytest.mark.parametrize("inner", ["adam", "quantized", "low_precision_quantized"])
def test_state_per_device_is_one_eighth(inner):
    mesh = _mesh()
    dtype = jnp.float32 if inner == "adam" else jnp.bfloat16
    tx = {"adam": rmsjax.adam(1e-3),
          "quantized": rmsjax.quantized(rmsjax.adam(1e-3), min_size=1024),
          "low_precision_quantized": rmsjax.low_precision(rmsjax.quantized(rmsjax.adam(1e-3), min_size=1024),
                                                          compensated=True)}[inner]
    params = jax.device_put(_params(dtype), NamedSharding(mesh, P()))
    shardings = rmsjax.zero_shardings(tx, params, mesh)
    state = jax.jit(tx.init, out_shardings=shardings)(params)
    total = scalars = on_device0 = 0
    for leaf in jax.tree.leaves(state):
        total += leaf.nbytes
        if leaf.ndim == 0:
            scalars += leaf.nbytes
        for shard in leaf.addressable_shards:
            if shard.device == jax.devices()[0]:
                on_device0 += shard.data.nbytes
    assert on_device0 == (total - scalars) // 8 + scalars
    # quantized: a block never crosses a shard (the block axis of the codes is never split)
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    for path, s in flat:
        if "codes" in jax.tree_util.keystr(path):
            assert s.spec[-1] is None, (path, s.spec)


def test_quantized_codes_and_scales_split_on_the_same_dimension():
    mesh = _mesh()
    tx = rmsjax.quantized(rmsjax.adam(1e-3), min_size=1)
    params = {"w": jnp.ones((4, 8 * 256)), "v": jnp.ones((16, 512))}  # w: rows 4, 8 blocks per row
    sh = rmsjax.zero_shardings(tx, params, mesh)
    mu = sh.inner[0].mu
    assert tuple(mu["w"].codes.spec)[:2] == (None, "data") and tuple(mu["w"].scale.spec) == (None, "data")
    assert tuple(mu["v"].codes.spec)[0] == "data" and tuple(mu["v"].scale.spec)[0] == "data"


@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_leaf_is_split_only_between_whole_blocks(bits):
    """A dimension of the codes is split only where its scale's dimension divides too: each
    device then holds whole blocks and their scales. (3, 8 * 256) and (2, 3, 1024) have no
    such dimension at 8 bits (3 blocks of 256 and 2 x 3 x 4 blocks over 8 devices), so they
    stay replicated with the warning; before, the codes were split inside their blocks while
    the scales stayed whole. (3, 2048) has 8 blocks of 256 (8 bits) or 16 of 128 (4 bits) per
    row: split there."""
    mesh = _mesh()
    tx = rmsjax.quantized(rmsjax.adam(1e-3), bits=bits, min_size=1)
    params = {"a": jnp.ones((3, 768)), "b": jnp.ones((2, 3, 1024)), "c": jnp.ones((3, 2048))}
    with pytest.warns(UserWarning, match="stay replicated"):
        sh = rmsjax.zero_shardings(tx, params, mesh)
    state = tx.init(params)
    for key in params:
        q, spec = state.inner[0].mu[key], sh.inner[0].mu[key]
        codes, scale = tuple(spec.codes.spec), tuple(spec.scale.spec)
        assert codes[: len(scale)] == scale, (key, codes, scale)  # the same split, or none
        if "data" in scale:
            d = scale.index("data")
            block_bytes = q.codes.shape[d] // q.scale.shape[d]
            assert (q.codes.shape[d] // 8) % block_bytes == 0  # whole blocks on each device
    assert "data" in tuple(sh.inner[0].mu["c"].codes.spec)


@pytest.mark.parametrize("tx", [optax.trace(0.0), optax.adam(1e-3), rmsjax.adam(1e-3)],
                         ids=["optax.trace", "optax.adam", "rmsjax.adam"])
def test_a_mesh_with_explicit_axes_works_as_docs_low_memory_builds_it(tx):
    # jax.make_mesh's default axes are Explicit (jax 0.9 on); an init that makes arrays of its
    # own (optax's zeros_like) then traces only inside the mesh's context, and zero_shardings
    # failed with jax's "enter your jit into a mesh context" for docs/low_memory.md's recipe.
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:8])
    params = {"w": jnp.ones((16, 8)), "b": jnp.ones(128)}
    shardings = rmsjax.zero_shardings(tx, params, mesh, uneven="replicate")
    specs = {tuple(s.spec) for s in jax.tree.leaves(shardings) if len(s.spec)}
    assert specs == {("data", None), ("data",)}


def test_errors_name_the_argument_and_the_leaf():
    mesh = _mesh()
    tx = rmsjax.adam(1e-3)
    with pytest.raises(ValueError, match=r"axis 'model' is not an axis of mesh.*'data'"):
        rmsjax.zero_shardings(tx, {"w": jnp.ones(8)}, mesh, axis="model")
    with pytest.raises(ValueError, match=r"cannot split state\[0\]\.mu\['b'\] \(10,\).*8 devices"):
        rmsjax.zero_shardings(tx, {"w": jnp.ones(8), "b": jnp.ones(10)}, mesh, uneven="error")
    with pytest.warns(UserWarning, match=r"stay replicated.*mu\['b'\]"):
        sh = rmsjax.zero_shardings(tx, {"w": jnp.ones(8), "b": jnp.ones(10)}, mesh)
    assert tuple(sh[0].mu["b"].spec) == (None,) and tuple(sh[0].mu["w"].spec) == ("data",)
    with pytest.raises(TypeError, match="mesh"):
        rmsjax.zero_shardings(tx, {"w": jnp.ones(8)}, "data")
    with pytest.raises(TypeError, match="AbstractMesh has no devices"):
        rmsjax.zero_shardings(tx, {"w": jnp.ones(8)}, mesh.abstract_mesh)
    with pytest.raises(ValueError, match="uneven"):
        rmsjax.zero_shardings(tx, {"w": jnp.ones(8)}, mesh, uneven="pad")


def test_memory_per_parameter():
    """eval_shape and memory_analysis: bf16 + 8-bit Adam <= 4.1 B/param, compensated <= 5.1;
    ZeRO-1: state per device 1/8, and the optimizer's temporaries within 0.15 B/param of it.

    The optimizer's temporaries are the ZeRO step's, less those of the same step with a
    stateless optimizer (``low_precision(optax.sgd)``): the full local gradient before its
    reduce-scatter and the gathered parameters are in every train step, whatever its state.
    """
    mesh = _mesh()
    big = {"w1": jax.ShapeDtypeStruct((1024, 1024), jnp.bfloat16),
           "w2": jax.ShapeDtypeStruct((1024, 1024), jnp.bfloat16),
           "b": jax.ShapeDtypeStruct((1024,), jnp.bfloat16)}
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(big))
    ex = _example()
    params = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, P()))
              for k, v in big.items()}
    batch = jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=NamedSharding(mesh, P("data")))

    def loss(p, batch):  # the gradient of a linear loss: no activations
        return sum(jnp.sum(p[k].astype(jnp.float32)) for k in p) * jnp.mean(batch)

    def zero_step_temporaries(tx):
        """(temporaries of the ZeRO step in B/param, state bytes on one device)."""
        state = jax.eval_shape(tx.init, big)
        zstep, shardings = ex.zero_train_step(tx, loss, params, mesh)
        abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                      state, shardings)
        mem = zstep.lower(params, abstract_state, batch).compile().memory_analysis()
        assert mem is not None
        return mem.temp_size_in_bytes / count, ex.per_device_bytes(state, shardings)

    stateless_temp, _ = zero_step_temporaries(rmsjax.low_precision(optax.sgd(1e-3)))
    for compensated, limit in ((False, 4.1), (True, 5.1)):
        tx = rmsjax.low_precision(rmsjax.quantized(rmsjax.adam(1e-3)), compensated=compensated)
        state = jax.eval_shape(tx.init, big)
        per_param = (ex.tree_bytes(big) + ex.tree_bytes(state)) / count
        assert per_param <= limit, per_param

        def step(params, state, grads, tx=tx):
            u, state = tx.update(grads, state, params)
            return optax.apply_updates(params, u), state

        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(big, state, big).compile()
        mem = compiled.memory_analysis()
        assert mem is not None
        held = (mem.argument_size_in_bytes - ex.tree_bytes(big)) / count  # gradients aside
        assert held <= limit, held

        # ZeRO-1 over 8 devices, the documented step
        zero_temp, state_device = zero_step_temporaries(tx)
        scalars = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state) if x.ndim == 0)
        assert state_device == (ex.tree_bytes(state) - scalars) // 8 + scalars
        replicated_state = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())), state)
        rmem = ex.replicated_train_step(tx, loss, mesh).lower(params, replicated_state, batch).compile(
        ).memory_analysis()
        assert rmem is not None
        plain_temp = rmem.temp_size_in_bytes / count
        optimizer_temp = zero_temp - stateless_temp
        print(f"compensated={compensated}: {per_param:.3f} B/param (compiled step: {held:.3f}), "
              f"state/device {state_device / count:.3f}, temporaries: ZeRO {zero_temp:.3f} "
              f"(stateless optimizer {stateless_temp:.3f}: the optimizer's {optimizer_temp:.3f}), "
              f"replicated {plain_temp:.3f} B/param")
        # The optimizer's own temporaries stay within 0.15 B/param of its state shard: no
        # full-size copy of the state is made (0.126 / 0.251 on jax 0.10.2, 0.127 / 0.188 on
        # 0.8.0, 0.000 / -0.248 on 0.12.0). And from jax 0.10 on, ZeRO adds no temporaries to the
        # plain data-parallel step (0.8.0's XLA:CPU keeps a larger gradient step under ZeRO:
        # 7.13 against 6.02 B/param, with a stateless optimizer already 7.00).
        if jax.__version_info__ >= (0, 10):
            assert zero_temp <= plain_temp + 0.15, (zero_temp, plain_temp)
        assert optimizer_temp <= state_device / count + 0.15, (optimizer_temp, state_device / count)


# --------------------------------------------------------------------------- communication


def test_collectives_of_the_documented_step():
    """Ring bytes per device: shard_map recipe <= the replicated step's all-reduce; jit-only 1.5x."""
    mesh = _mesh()
    ex = _example()
    tx = rmsjax.adam(1e-3)
    params = jax.device_put(_params(), NamedSharding(mesh, P()))
    batch = jax.device_put(jnp.asarray(_batches(1)[0]), NamedSharding(mesh, P("data")))
    state = jax.device_put(tx.init(params), NamedSharding(mesh, P()))
    plain = ex.replicated_train_step(tx, _loss, mesh).lower(params, state, batch).compile().as_text()
    plain_bytes = ex.collective_bytes(plain, 8)
    assert set(plain_bytes) == {"all-reduce"}
    grad_bytes = ex.tree_bytes(params) * 2 * 7 / 8
    assert plain_bytes["all-reduce"] >= grad_bytes  # (+ the loss)

    zstep, shardings = ex.zero_train_step(tx, _loss, params, mesh)
    zstate = jax.jit(tx.init, out_shardings=shardings)(params)
    zero = ex.collective_bytes(zstep.lower(params, zstate, batch).compile().as_text(), 8)
    assert "reduce-scatter" in zero and "all-gather" in zero
    assert sum(zero.values()) <= sum(plain_bytes.values()), (zero, plain_bytes)

    jstep, _ = ex.jit_zero_train_step(tx, _loss, params, mesh)
    jit_only = ex.collective_bytes(jstep.lower(params, zstate, batch).compile().as_text(), 8)
    ratio = sum(jit_only.values()) / sum(plain_bytes.values())
    print("collective bytes per device:", plain_bytes, zero, jit_only, f"jit-only ratio {ratio:.3f}")
    assert ratio <= 1.51


# --------------------------------------------------------------------------- trajectories, restart


@pytest.mark.parametrize("recipe", ["zero_train_step", "jit_zero_train_step"])
def test_100_steps_equal_the_one_device_run(recipe):
    batches = _batches(100)
    tx = rmsjax.adam(1e-3)
    ref, _ = _run_one_device(tx, _params(), 100, batches)
    got, _, _, _ = _run_zero(tx, _params(), _mesh(), 100, batches, recipe)
    for k in ref:
        scale = float(jnp.max(jnp.abs(ref[k]))) + 1e-3
        diff = float(jnp.max(jnp.abs(ref[k] - got[k])))
        assert diff <= 2e-5 * scale, (k, diff)


def test_low_precision_under_jit_sharding_is_bit_identical_to_replicated():
    """The hash reads global element indices: sharding the state changes no random number."""
    batches = _batches(20)
    mesh = _mesh()
    tx = rmsjax.low_precision(rmsjax.quantized(rmsjax.adam(1e-3), min_size=1024))
    ex = _example()
    params = jax.device_put(_params(jnp.bfloat16), NamedSharding(mesh, P()))
    plain = ex.replicated_train_step(tx, _loss, mesh)
    state = jax.device_put(tx.init(params), NamedSharding(mesh, P()))
    p1 = params
    for b in batches:
        p1, state, _ = jax.block_until_ready(
            plain(p1, state, jax.device_put(jnp.asarray(b), NamedSharding(mesh, P("data")))))
    p2, _, _, _ = _run_zero(tx, _params(jnp.bfloat16), mesh, 20, batches, "jit_zero_train_step")
    for k in p1:
        np.testing.assert_array_equal(np.asarray(p1[k], np.float32), np.asarray(p2[k], np.float32))


def test_checkpoint_round_trip_and_restore_onto_four_devices(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    batches = _batches(20)
    tx = rmsjax.low_precision(rmsjax.quantized(rmsjax.adam(1e-3), min_size=1024), compensated=True)
    mesh8 = _mesh(8)
    p, s, step, shardings = _run_zero(tx, _params(jnp.bfloat16), mesh8, 10, batches)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", {"params": p, "opt_state": s})
    saved = jax.device_get({"params": p, "opt_state": s})

    # resume on the same mesh: bit for bit the run that never stopped
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            {"params": p, "opt_state": s})
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(tmp_path / "ckpt", abstract)
    sharding = NamedSharding(mesh8, P("data"))
    straight = (p, s)
    resumed = (restored["params"], restored["opt_state"])
    for b in batches[10:]:
        b = jax.device_put(jnp.asarray(b), sharding)
        straight = jax.block_until_ready(step(*straight, b)[:2])
        resumed = jax.block_until_ready(step(*resumed, b)[:2])
    for a, c in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))

    # restore onto 4 devices with that mesh's ZeRO shardings: the same numbers, split in 4
    mesh4 = _mesh(4)
    replicated4 = NamedSharding(mesh4, P())
    params4 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated4),
                           saved["params"])
    sh4 = rmsjax.zero_shardings(tx, params4, mesh4)
    abstract4 = {"params": params4,
                 "opt_state": jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                           jax.eval_shape(lambda: saved["opt_state"]), sh4)}
    with ocp.StandardCheckpointer() as ckpt:
        on4 = ckpt.restore(tmp_path / "ckpt", abstract4)
    for a, c in zip(jax.tree.leaves(saved), jax.tree.leaves(on4), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    for leaf, sh in zip(jax.tree.leaves(on4["opt_state"]), jax.tree.leaves(sh4), strict=True):
        assert leaf.sharding.is_equivalent_to(sh, leaf.ndim)
    # and training continues there
    step4, _ = _example().zero_train_step(tx, _loss, on4["params"], mesh4)
    out = step4(on4["params"], on4["opt_state"], jax.device_put(jnp.asarray(batches[10]),
                                                                 NamedSharding(mesh4, P("data"))))
    assert all(bool(jnp.isfinite(x.astype(jnp.float32)).all()) for x in jax.tree.leaves(out[0]))


@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_row_of_several_axes_stays_whole_on_an_explicit_axis(bits):
    """docs/low_memory.md's jit-only step on a mesh with Explicit axes (``jax.make_mesh``'s
    default since jax 0.9). A quantized leaf whose row spans several axes ((64, 16, 8), an
    (n, 1) head) was split along its first axis, and the step raised jax's ShardingTypeError:
    its reshape rule refuses to merge a split leaf's row into blocks. Such leaves now stay
    whole (listed in the warning); one-axis rows are still split, and the step gives the bits
    of the step on one device."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:8])
    replicated = NamedSharding(mesh, P())
    params = jax.device_put({"conv": jnp.linspace(-1.0, 1.0, 64 * 16 * 8).reshape(64, 16, 8),
                             "head": jnp.linspace(-1.0, 1.0, 4096).reshape(4096, 1),
                             "w": jnp.linspace(-1.0, 1.0, 64 * 1024).reshape(64, 1024)}, replicated)
    tx = rmsjax.quantized(rmsjax.adam(1e-3), bits=bits, min_size=1)
    with pytest.warns(UserWarning, match=r"stay replicated.*mu\['conv'\].*mu\['head'\]"):
        shardings = rmsjax.zero_shardings(tx, params, mesh)
    mu = shardings.inner[0].mu
    assert "data" not in tuple(mu["conv"].codes.spec) + tuple(mu["head"].codes.spec)
    assert tuple(mu["w"].codes.spec)[0] == "data"
    state = jax.jit(tx.init, out_shardings=shardings)(params)
    grads = jax.tree.map(jnp.cos, params)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    out = jax.jit(step, in_shardings=(replicated, shardings, replicated),
                  out_shardings=(replicated, shardings))(params, state, grads)
    local = jax.tree.map(lambda a: jax.device_put(np.asarray(a), jax.devices()[0]),
                         (params, tx.init(params), grads))
    ref = jax.jit(step)(*local)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
