"""rmsjax.quantized: low-bit (8/4-bit) optimizer state.

Reference values come from outside the code under test: the code maps and the quantizer are
re-implemented here in NumPy from the formula in the docs (``x = s sign(c) (|c|/Q)**p``, ``s``
the power of two above the block's absmax), and training with quantized state is compared
with the same optimizer keeping float32 state.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import pathlib
import sys
from typing import Any, NamedTuple

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsjax
from rmsjax import _quantization as qz
from rmsjax.compat import keras as keras_compat

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The documented maps (docs/low_bit.md, rmsjax/_quantization.py): (bits, signed) -> (Q, p).
MAPS = {(8, True): (127, 4), (8, False): (253, 4), (4, True): (7, 2), (4, False): (14, 4)}


def np_levels(bits: int, signed: bool) -> np.ndarray:
    """All decoded levels of a map for scale 1, in code order, in float64."""
    q, p = MAPS[(bits, signed)]
    c = np.arange(-q, q + 1) if signed else np.arange(0, q + 1)
    return np.sign(c) * (np.abs(c) / q) ** p


def np_scale(block: np.ndarray) -> float:
    """The documented scale: the smallest power of two at or above the block's absmax
    (``2**ceil(log2 m)``: an exact power of two is its own scale)."""
    m = float(np.max(np.abs(block)))
    return 0.0 if m == 0 else 2.0 ** math.ceil(math.log2(m))


def np_nearest(x: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """Round-to-nearest quantize-dequantize of the rows of ``x`` (one block per row);
    a positive value never rounds to zero."""
    out = np.empty_like(x)
    for i, row in enumerate(np.atleast_2d(x)):
        s = np_scale(row)
        levels = np_levels(bits, signed) * s
        if not signed:
            levels = levels[1:]  # zero is kept for exact zeros
        mid = (levels[1:] + levels[:-1]) / 2
        value = levels[np.searchsorted(mid, row)]
        out[i] = value if signed else np.where(row > 0, value, 0.0)
    return out


def state_bytes(state) -> int:
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))


def big_tree():
    return {
        "dense1": {"kernel": jnp.zeros((1024, 1024)), "bias": jnp.zeros(1024)},
        "dense2": {"kernel": jnp.zeros((1024, 4096)), "bias": jnp.zeros(4096)},
        "embed": jnp.zeros((2048, 512)),
        "norm": jnp.zeros(512),
    }


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("bits", [16, 2, 0, True, "8", 8.0])
def test_bad_bits_raise(bits):
    with pytest.raises(ValueError, match="bits"):
        rmsjax.quantized(rmsjax.adam(1e-3), bits=bits)


@pytest.mark.parametrize("block_size", [0, -2, 3, 1, 2.5, 1 << 20, "256", False])
def test_bad_block_size_raise(block_size):
    with pytest.raises(ValueError, match="block_size"):
        rmsjax.quantized(rmsjax.adam(1e-3), block_size=block_size)


@pytest.mark.parametrize("min_size", [-1, 1.5, None, True])
def test_bad_min_size_raise(min_size):
    with pytest.raises(ValueError, match="min_size"):
        rmsjax.quantized(rmsjax.adam(1e-3), min_size=min_size)


def test_inner_must_be_a_transformation():
    with pytest.raises(TypeError, match="inner .*got function .*call it"):
        rmsjax.quantized(rmsjax.adam)
    for wrapper in (rmsjax.packed, rmsjax.one_pass, rmsjax.low_precision):
        with pytest.raises(TypeError, match=f"{wrapper.__name__}: .* must be an optax.GradientTrans"):
            wrapper(None)


def test_state_that_is_not_its_own_raises():
    """Another optimizer's state, a second quantized wrapper, and codes of the other map
    (a checkpoint of another optimizer restored into this state) each fail by name instead
    of running."""
    params = {"w": jnp.ones((64, 64))}
    tx = rmsjax.quantized(rmsjax.adam(1e-3), min_size=1)
    with pytest.raises(TypeError, match="quantized: expected a QuantizedState"):
        tx.update(params, rmsjax.adam(1e-3).init(params), params)
    with pytest.raises(ValueError, match="already holds quantized moments"):
        rmsjax.quantized(rmsjax.quantized(rmsjax.adam(1e-3)), bits=4).init(params)
    state = tx.init(params)
    restored = flax.serialization.to_state_dict(state)
    mu = restored["inner"]["0"]["mu"]["w"]
    mu["codes"] = np.asarray(mu["codes"]).astype(np.uint8)  # unsigned codes for Adam's mu
    wrong = flax.serialization.from_state_dict(state, restored)
    with pytest.raises(ValueError, match="signed moment is stored with uint8 codes"):
        tx.update(params, wrong, params)


# --------------------------------------------------------------------------- which leaves


def test_moment_leaves_are_quantized_and_the_rest_kept():
    tx = rmsjax.quantized(rmsjax.adam(1e-3))
    state = tx.init(big_tree())
    adam = state.inner[0]
    assert state.count.dtype == jnp.int32 and adam.count.dtype == jnp.int32
    mu, nu = adam.mu, adam.nu
    assert isinstance(mu["dense1"]["kernel"], qz.QuantizedArray)
    assert mu["dense1"]["kernel"].codes.dtype == jnp.int8  # signed map for mu
    assert nu["dense1"]["kernel"].codes.dtype == jnp.uint8  # unsigned map for nu
    assert mu["dense1"]["kernel"].codes.shape == (1024, 1024)  # shaped like the parameter
    assert mu["dense1"]["kernel"].scale.shape == (1024, 4)
    for small in (mu["dense1"]["bias"], nu["norm"]):  # fewer than 4096 elements
        assert isinstance(small, jax.Array) and small.dtype == jnp.float32
    assert isinstance(mu["dense2"]["bias"], qz.QuantizedArray)  # 4096 elements


def _state_of(state, cls):
    """The first state of type ``cls`` in a quantized chain's inner state."""
    return next(s for s in state.inner if isinstance(s, cls))


def test_compat_torch_complex_moments_keep_pairs_in_one_block():
    tx = rmsjax.quantized(rmsjax.compat.torch.RMSprop(lr=1e-2, centered=True, momentum=0.9), bits=4)
    params = {"z": jnp.ones((64, 128), jnp.complex64)}
    state = tx.init(params)
    nu = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, qz.PackedQuantizedArray))
    packed = [x for x in nu if isinstance(x, qz.PackedQuantizedArray)]
    assert len(packed) == 2  # nu (unsigned) and mu (signed), both real views (64, 128, 2)
    assert sorted(str(x.codes.dtype) for x in packed) == ["int8", "uint8"]
    # the momentum buffer is complex: complex leaves stay as they are
    assert _state_of(state, rmsjax.transforms.MomentumState).mu["z"].dtype == jnp.complex64
    # the real view (64, 128, 2): its last two axes form a row of 256, two blocks of 64 pairs
    assert all(x.codes.shape == (64, 64, 2) and x.scale.shape == (64, 2, 1) for x in packed)
    g = {"z": (jnp.arange(64 * 128, dtype=jnp.float32).reshape(64, 128) % 7 - 3).astype(jnp.complex64)}
    updates, _ = tx.update(g, state, params)
    assert updates["z"].dtype == jnp.complex64 and bool(jnp.all(jnp.isfinite(jnp.abs(updates["z"]))))


def test_nothing_to_quantize_means_identical_to_inner():
    params = {"w": jnp.ones((8, 8)), "b": jnp.ones(8)}
    grads = {"w": jnp.full((8, 8), 0.3), "b": jnp.full(8, -0.2)}
    inner = rmsjax.rmsprop(1e-2, centered=True, momentum=0.9)
    tx = rmsjax.quantized(inner)
    s_q, s_f = tx.init(params), inner.init(params)
    for _ in range(3):
        u_q, s_q = tx.update(grads, s_q, params)
        u_f, s_f = inner.update(grads, s_f, params)
        chex_equal(u_q, u_f)
    chex_equal(s_q.inner, s_f)


def chex_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("bits", [8, 4])
def test_bfloat16_moments_keep_their_dtype(bits):
    inner = rmsjax.rmsprop(1e-2, state_dtype=jnp.bfloat16)
    tx = rmsjax.quantized(inner, bits=bits)
    params = {"w": jnp.ones((32, 256), jnp.bfloat16)}
    state = tx.init(params)
    updates, state = tx.update({"w": jnp.ones((32, 256), jnp.bfloat16)}, state, params)
    assert updates["w"].dtype == jnp.bfloat16
    assert _state_of(state, rmsjax.transforms.ScaleByRmsState).nu["w"].scale.dtype == jnp.bfloat16
    assert qz.dequantize(_state_of(state, rmsjax.transforms.ScaleByRmsState).nu["w"]).dtype == jnp.bfloat16


# --------------------------------------------------------------------------- memory


MEMORY_LIMITS = {  # state bytes per parameter (acceptance)
    ("adam", 8): 2.1, ("adam", 4): 1.1, ("rmsprop", 8): 1.1, ("rmsprop", 4): 0.6,
    ("adagrad", 8): 1.1, ("adagrad", 4): 0.6,
}


@pytest.mark.parametrize("name,bits", sorted(MEMORY_LIMITS))
def test_state_bytes_per_parameter(name, bits):
    make = {"adam": lambda: rmsjax.adam(1e-3), "rmsprop": lambda: rmsjax.rmsprop(1e-3),
            "adagrad": lambda: rmsjax.adagrad(1e-2)}[name]
    params = big_tree()
    n = sum(p.size for p in jax.tree.leaves(params))
    f32 = state_bytes(jax.eval_shape(make().init, params)) / n
    low = state_bytes(jax.eval_shape(rmsjax.quantized(make(), bits=bits).init, params)) / n
    assert f32 == pytest.approx(8.0 if name == "adam" else 4.0, rel=1e-3)
    assert low <= MEMORY_LIMITS[(name, bits)], low


# --------------------------------------------------------------------------- tracking (staleness)

SHAPE = (16, 256)  # 16 blocks of 256 (8-bit) / 32 of 128 (4-bit); column 0 holds each block's max


def _staleness_grads(t):
    """Column 0 (every block's maximum) sees a constant gradient 1; the others a gradient
    in [0.3, 0.6] that drops by 20 % at step 200, so their moments move while the block
    maximum's does not."""
    base = jnp.asarray(np.random.default_rng(0).uniform(0.3, 0.6, SHAPE), jnp.float32)
    late = jnp.where(t < 200, jnp.float32(1.0), jnp.float32(0.8))
    return jnp.zeros(SHAPE, bool).at[:, 0].set(True), base * late


def _final_update(tx, steps=3000):
    params = {"w": jnp.zeros(SHAPE)}

    def body(state, t):
        is_max, g = _staleness_grads(t)
        g = jnp.where(is_max, jnp.float32(1.0), g)
        updates, state = tx.update({"w": g}, state, params)
        return state, updates["w"]

    _, updates = jax.lax.scan(body, tx.init(params), jnp.arange(steps))
    return np.asarray(updates[-1])[:, 1:]


def _np_rmsprop_nearest(decay, steps=3000, lr=1e-2, eps=1e-8, accumulate=False):
    """NumPy: rmsprop (or adagrad with ``accumulate``) whose nu is stored round-to-nearest
    in the documented 8-bit unsigned map, per block of 256, re-quantized every step."""
    is_max, base = (np.asarray(a) for a in _staleness_grads(jnp.int32(0)))
    nu = np.zeros(SHAPE)
    update = None
    for t in range(steps):
        g = np.where(is_max, 1.0, base * (1.0 if t < 200 else 0.8))
        nu = nu + g * g if accumulate else decay * nu + (1 - decay) * g * g
        update = -lr * g / (np.sqrt(nu) + eps)
        nu = np_nearest(nu, 8, False)
    return update[:, 1:]


def _median_rel(a, b):
    return float(np.median(np.abs(a - b) / np.abs(b)))


TRACKED = {
    "rmsprop-0.999": (lambda: rmsjax.rmsprop(1e-2, decay=0.999), 0.999, False),
    "adam": (lambda: rmsjax.adam(1e-3), None, False),
    "adagrad": (lambda: rmsjax.adagrad(1e-2, eps=1e-8), None, True),
}


@pytest.mark.parametrize("name", sorted(TRACKED))
def test_quantized_update_tracks_float32_where_nearest_goes_stale(name):
    make, decay, accumulate = TRACKED[name]
    reference = _final_update(make())
    eight = _median_rel(_final_update(rmsjax.quantized(make(), bits=8)), reference)
    four = _median_rel(_final_update(rmsjax.quantized(make(), bits=4)), reference)
    nearest = _median_rel(_final_update(qz._wrap(make(), 8, 256, 4096, nearest=True)), reference)
    assert eight < 0.10, eight
    assert four < 0.25, four
    assert nearest > 0.5, nearest  # the same storage with round-to-nearest is stale
    if decay is not None or accumulate:  # and so is an independent NumPy version of it
        np_nearest_rel = _median_rel(_np_rmsprop_nearest(decay, accumulate=accumulate), reference)
        assert np_nearest_rel > 0.5, np_nearest_rel


# --------------------------------------------------------------------------- wrappers


def _toy():
    params = {"w": jnp.linspace(-1.0, 1.0, 64 * 128).reshape(64, 128), "b": jnp.zeros(128)}

    def loss(p, x):
        return jnp.mean(jnp.square(jnp.tanh(x @ p["w"] + p["b"]) - 0.5))

    x = jnp.cos(jnp.arange(16 * 64, dtype=jnp.float32).reshape(16, 64))
    return params, jax.grad(loss), x


def test_jit_with_donation_compiles_once():
    params, grad, x = _toy()
    tx = rmsjax.quantized(rmsjax.adam(1e-2))
    traces = []

    @jax.jit
    def _step(p, s):
        traces.append(1)
        u, s = tx.update(grad(p, x), s, p)
        return optax.apply_updates(p, u), s

    step = jax.jit(_step, donate_argnums=(0, 1))
    state = tx.init(params)
    for _ in range(4):
        params, state = step(params, state)
    assert len(traces) == 1
    assert bool(jnp.all(jnp.isfinite(params["w"])))


def test_inject_hyperparams_learning_rate_is_read_and_changed():
    params, grad, x = _toy()
    tx = rmsjax.quantized(optax.inject_hyperparams(rmsjax.adam)(learning_rate=1e-2))
    state = tx.init(params)
    update = jax.jit(tx.update)  # compiled once, called with both learning rates
    state.inner.hyperparams["learning_rate"] = jnp.asarray(1e-3, jnp.float32)
    u_small, _ = update(grad(params, x), state, params)
    state.inner.hyperparams["learning_rate"] = jnp.asarray(1e-2, jnp.float32)
    u_big, _ = update(grad(params, x), state, params)
    np.testing.assert_allclose(np.asarray(u_big["w"]), 10 * np.asarray(u_small["w"]), rtol=1e-5)
    assert float(rmsjax.learning_rate(state)) == pytest.approx(1e-2)


def test_apply_if_finite_keeps_the_quantized_state():
    params, grad, x = _toy()
    tx = optax.apply_if_finite(rmsjax.quantized(rmsjax.adam(1e-2)), max_consecutive_errors=3)
    state = tx.init(params)
    update = jax.jit(tx.update)
    _, state = update(grad(params, x), state, params)
    bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grad(params, x))
    updates, after = update(bad, state, params)
    assert int(after.notfinite_count) == 1
    chex_equal(after.inner_state, state.inner_state)
    assert float(jnp.max(jnp.abs(updates["w"]))) == 0.0


def test_multisteps_accumulates_then_updates():
    params, grad, x = _toy()
    tx = optax.MultiSteps(rmsjax.quantized(rmsjax.adam(1e-2)), every_k_schedule=3)
    ref = optax.MultiSteps(rmsjax.adam(1e-2), every_k_schedule=3)
    s, r = tx.init(params), ref.init(params)
    with jax.numpy_dtype_promotion("standard"):  # optax.MultiSteps itself mixes int32 and float32
        update, ref_update = jax.jit(tx.update), jax.jit(ref.update)
        for _ in range(3):
            u, s = update(grad(params, x), s, params)
            v, r = ref_update(grad(params, x), r, params)
    assert int(rmsjax.step_count(s)) == 1
    assert _median_rel(np.asarray(u["w"]), np.asarray(v["w"])) < 0.02


def test_nnx_optimizer():
    from flax import nnx

    model = nnx.Linear(128, 64, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, rmsjax.quantized(rmsjax.adam(1e-2), bits=4), wrt=nnx.Param)
    x = jnp.ones((8, 128))

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer)) for _ in range(20)]
    assert losses[-1] < 0.5 * losses[0]
    eff = rmsjax.effective_learning_rate(optimizer, eps=1e-8, decay=0.999)
    assert eff.per_leaf["kernel"].shape == (128, 64)


def test_effective_learning_rate_reads_through_the_codes():
    params, grad, x = _toy()
    tx = rmsjax.quantized(rmsjax.rmsprop(1e-2, decay=0.9))
    state = tx.init(params)
    for _ in range(3):
        _, state = tx.update(grad(params, x), state, params)
    nu = _state_of(state, rmsjax.transforms.ScaleByRmsState).nu["w"]
    q, p = MAPS[(8, False)]
    codes = np.asarray(nu.codes, np.float64).reshape(64, 1, 128)  # one block of 128 per row
    decoded = (codes / q) ** p * np.asarray(nu.scale, np.float64)[..., None]
    expected = 1e-2 / (np.sqrt(decoded.reshape(64, 128)) + 1e-8)
    eff = rmsjax.effective_learning_rate(state, eps=1e-8)
    np.testing.assert_allclose(np.asarray(eff.per_leaf["w"]), expected, rtol=1e-5)


# --------------------------------------------------------------------------- checkpoints


@functools.cache
def _train_step(tx, grad):
    """One jitted training step per (tx, grad), reused by every _train call of a test."""
    return jax.jit(lambda p, s, x: (lambda u_s: (optax.apply_updates(p, u_s[0]), u_s[1]))(
        tx.update(grad(p, x), s, p)))


def _train(tx, params, state, steps, grad, x):
    step = functools.partial(_train_step(tx, grad), x=x)
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


@pytest.mark.parametrize("bits", [8, 4])
def test_flax_serialization_round_trip_and_bitwise_resume(bits):
    params, grad, x = _toy()
    tx = rmsjax.quantized(rmsjax.compat.torch.Adam(lr=1e-2, amsgrad=True), bits=bits)
    p5, s5 = _train(tx, params, tx.init(params), 5, grad, x)
    blob = flax.serialization.to_bytes({"params": p5, "opt_state": s5})
    restored = flax.serialization.from_bytes({"params": params, "opt_state": tx.init(params)}, blob)
    assert jax.tree.structure(restored["opt_state"]) == jax.tree.structure(s5)
    chex_equal(restored["opt_state"], s5)
    straight = _train(tx, p5, s5, 5, grad, x)
    resumed = _train(tx, restored["params"], restored["opt_state"], 5, grad, x)
    chex_equal(resumed, straight)


def test_orbax_round_trip_is_bitwise(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    params, grad, x = _toy()
    tx = rmsjax.quantized(rmsjax.adam(1e-2), bits=4)
    p3, s3 = _train(tx, params, tx.init(params), 3, grad, x)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", {"params": p3, "opt_state": s3})
    with ocp.StandardCheckpointer() as ckpt:
        abstract = jax.eval_shape(lambda: {"params": params, "opt_state": tx.init(params)})
        restored = ckpt.restore(tmp_path / "ckpt", abstract)
    chex_equal(restored, {"params": p3, "opt_state": s3})
    chex_equal(_train(tx, restored["params"], restored["opt_state"], 3, grad, x),
               _train(tx, p3, s3, 3, grad, x))


# --------------------------------------------------------------------------- example and benchmark


def _load(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def test_benchmark_smoke(tmp_path):
    bench = _load(ROOT / "benchmarks" / "bench_quantized.py")
    result = bench.main(["--size", "256", "--trials", "2", "--optimizers", "adam",
                         "--out", str(tmp_path)])
    assert (tmp_path / "bench_quantized.json").exists() and (tmp_path / "bench_quantized.md").exists()
    memory = {(row["optimizer"], row["bits"]): row["bytes_per_param"] for row in result["memory"]}
    assert memory[("adam", 32)] == pytest.approx(8.0, rel=1e-3)
    assert memory[("adam", 8)] < 2.1
    assert all(row["ratio"] > 0 for row in result["speed"])


def test_benchmark_vector_width_compiles_every_step_with_it(tmp_path):
    bench = _load(ROOT / "benchmarks" / "bench_quantized.py")
    result = bench.main(["--size", "128", "--trials", "1", "--steps", "1", "--optimizers", "adagrad",
                         "--vector-width", "512", "--out", str(tmp_path)])
    try:
        assert result["vector_width"] == 512
        assert (tmp_path / "bench_quantized_vw512.json").exists()
        assert "xla_cpu_prefer_vector_width=512" in (tmp_path / "bench_quantized_vw512.md").read_text()
    finally:
        bench.COMPILER_OPTIONS.clear()


def test_vector_width_probe_times_each_step_at_both_widths(tmp_path):
    probe = _load(ROOT / "benchmarks" / "vector_width_probe.py")
    rows = probe.main(["--shape", "128x128", "--trials", "1", "--steps", "1", "--optimizers", "adagrad",
                       "--bits", "32,8", "--out", str(tmp_path)])
    assert (tmp_path / "vector_width_probe.json").exists()
    assert {(r["bits"], r["in_place"], r["wide"]) for r in rows} == {
        (b, i, w) for b in (32, 8) for i in (False, True) for w in (False, True)}
    assert probe.compile_options(True, True) == {"xla_cpu_copy_insertion_use_region_analysis": True,
                                                 "xla_cpu_prefer_vector_width": 512}
    assert probe.compile_options(False, False) is None
    assert all(r["ms"] > 0 for r in rows)


def test_benchmark_runs_combine_into_medians_and_ranges():
    bench = _load(ROOT / "benchmarks" / "bench_quantized.py")

    def run(ratio, ms):
        return {"speed": [{"optimizer": "adam", "bits": 8, "in_place": False, "shape": [4, 4],
                           "ratio": ratio, "ms": ms}], "peak": [], "memory": [], "trials": 9,
                "steps": 3}

    combined = bench.combine_runs([run(3.0, 30.0), run(2.0, 20.0), run(2.5, 40.0)])
    (row,) = combined["speed"]
    assert (row["ratio"], row["ms"], row["ratios"], combined["runs"]) == (2.5, 30.0, [3.0, 2.0, 2.5], 3)
    assert bench._ratio_cell(row) == "2.50x (2.00-3.00)"
    assert bench._ratio_cell(run(2.0, 1.0)["speed"][0]) == "2.00x"


def test_centred_bound_quality_script(tmp_path):
    """benchmarks/centred_bound_quality.py runs end to end; after 30 steps the 8-bit state's
    loss (its variance scaled by the centred bound) is within 5 % of float32 state's."""
    script = _load(ROOT / "benchmarks" / "centred_bound_quality.py")
    rows = script.main(["--steps", "30", "--seeds", "1", "--json", str(tmp_path / "c.json")])
    assert (tmp_path / "c.json").exists() and len(rows) == 2
    assert all(abs(row["ratio_8"] - 1) < 0.05 for row in rows), rows


# --------------------------------------------------------------------------- declared moments only

import jax.extend.core as jex_core  # noqa: E402
import registry  # noqa: E402  (tests/ is on the path: conftest.py)

from rmsjax import _moments  # noqa: E402

_REG_PARAMS = {"a": jnp.linspace(-1.0, 1.0, 8 * 64).reshape(8, 64), "b": jnp.linspace(0.5, -0.5, 64)}


def _declared_moment_leaves(state):
    """(quantized nodes reached through declared moment fields, declared float leaves left wide)."""
    found, wide = [], []
    nodes = jax.tree.leaves(state, is_leaf=lambda x: _moments.declared(x) is not None)
    for node in nodes:
        for name, moment in (_moments.declared(node) or {}).items():
            for leaf in jax.tree.leaves(getattr(node, name), is_leaf=qz.is_quantized):
                if qz.is_quantized(leaf):
                    found.append((leaf, moment))
                elif jnp.issubdtype(leaf.dtype, jnp.floating):
                    wide.append(leaf)
    return found, wide


# Moment buffers per parameter of each registry case, from the algorithm and the case's
# arguments (not from the declarations): Adam mu, nu (+ nu_max with amsgrad); RMSprop nu
# (+ mu centred, + a momentum buffer); AdaDelta nu, nu_delta; AdaGrad's sum; a momentum
# buffer; Adamax mu and its peak nu. Keras's EMA copy of the parameters (keras.Nadam here)
# is not a moment; neither is anything of sgd without momentum or of the scaling parts.
MOMENTS_PER_PARAMETER = {
    "absent": 0, "add_decayed_weights": 0, "add_decayed_weights_mask": 0, "scale_by_learning_rate": 0,
    "sgd": 0,
    "adagrad": 1, "keras.Adagrad": 1, "torch.Adagrad": 1, "scale_by_rss": 1, "scale_by_rms": 1,
    "rmsprop": 1, "rmsprop_bias_correction": 1, "rmsprop_bias_correction_schedule": 1,
    "rmsprop_eps_in_sqrt_tf1_start": 1, "rmsprop_wd_debias": 1, "rmsprop_weight_decay": 1,
    "tf1.RMSPropOptimizer_plain": 1, "torch.RMSprop_plain": 1,
    "leaky_average": 1, "leaky_average_debias_bfloat16": 1, "momentum_dampening": 1,
    "momentum_nesterov": 1, "sgd_momentum": 1, "sgd_nesterov": 1, "keras.SGD": 1, "torch.SGD": 1,
    "adam": 2, "adam_eps_root": 2, "adam_nesterov": 2, "adamw": 2, "adamw_mask": 2, "adamw_mask_fn": 2,
    "scale_by_adam": 2, "low_precision(adam)": 2, "one_pass(adam)": 2, "torch.AdamW": 2,
    "keras.Adamax": 2, "keras.Nadam": 2, "adadelta": 2, "adadelta_l2": 2, "adadelta_weight_decay": 2,
    "scale_by_adadelta": 2, "keras.Adadelta": 2, "torch.Adadelta": 2, "rmsprop_bfloat16_state": 2,
    "rmsprop_centered": 2, "rmsprop_centered_l2": 2, "scale_by_stddev": 2,
    "scale_by_stddev_float32_state": 2, "rmsprop_momentum": 2, "rmsprop_nesterov": 2,
    "keras.RMSprop": 2, "timm.RMSpropTF": 2, "torch.param_groups(RMSprop)": 2,
    "keras.Adam": 3, "keras.AdamW": 3, "torch.Adam": 3, "scale_by_adam_amsgrad_bfloat16": 3,
    "rmsprop_centered_momentum": 3, "rmsprop_centered_momentum_wd": 3, "rmsprop_centered_nesterov_wd": 3,
    "one_pass(rmsprop_centered_momentum_wd)": 3, "tf1.RMSPropOptimizer": 3, "torch.RMSprop": 3,
    "packed(adam)": 2, "packed(rmsprop_bfloat16_state)": 1, "packed(rmsprop_centered_momentum)": 3,
}
# Parameter buffers a moment has: the two parameters, or fewer where rmsjax.packed joins them
# (max_leaf_size=16 keeps both of _REG_PARAMS's leaves apart).
BUFFERS = {"packed(adam)": 1, "packed(rmsprop_bfloat16_state)": 1}


def test_the_moment_table_covers_the_registry():
    assert set(MOMENTS_PER_PARAMETER) == {n for n in registry.CASES if not n.startswith("quantized(")}


@pytest.mark.parametrize("name", sorted(registry.CASES))
def test_only_declared_moments_are_quantized(name):
    case = registry.CASES[name]
    if name.startswith("quantized("):
        pytest.skip("already quantized")
    tx = rmsjax.quantized(case.make(), min_size=1)
    state = tx.init(_REG_PARAMS)
    grads = jax.tree.map(lambda p: jnp.cos(3 * p) + 0.1, _REG_PARAMS)
    updates, state = jax.jit(tx.update)(grads, state, _REG_PARAMS)
    everything = [x for x in jax.tree.leaves(state, is_leaf=qz.is_quantized) if qz.is_quantized(x)]
    found, wide = _declared_moment_leaves(state)
    assert len(everything) == len(found)  # every quantized leaf is a declared moment...
    assert not wide  # ...and every real declared moment of these shapes is quantized...
    # ...and every moment of the algorithm is declared
    assert len(found) == MOMENTS_PER_PARAMETER[name] * BUFFERS.get(name, 2)
    for q, moment in found:
        assert (q.codes.dtype == jnp.int8) == moment.signed
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def _steps(tx, params, grads, n):
    """``n`` train steps of ``tx`` with a fixed gradient: (params, state)."""
    state = tx.init(params)
    for _ in range(n):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def test_keras_ema_is_not_quantized_and_overwrites_with_the_exact_average():
    kc = rmsjax.compat.keras
    params = {"w": jnp.linspace(-1.0, 1.0, 64 * 128).reshape(64, 128)}
    grads = {"w": jnp.sin(jnp.arange(64 * 128, dtype=jnp.float32).reshape(64, 128))}
    plain = kc.SGD(1e-3, use_ema=True, ema_overwrite_frequency=5)
    low = rmsjax.quantized(kc.SGD(1e-3, use_ema=True, ema_overwrite_frequency=5), min_size=1)
    p_p, s_p = _steps(plain, params, grads, 10)
    p_q, s_q = _steps(low, params, grads, 10)
    chex_equal(p_q, p_p)
    ema_q, ema_p = kc.ema_params(s_q), kc.ema_params(s_p)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(ema_q))
    chex_equal(ema_q, ema_p)
    # Adam with EMA: the moments are quantized, the EMA is not. It is the exact moving average
    # (Keras's rule, in float64 NumPy, momentum 0.99) of the parameters the quantized run took.
    adam = rmsjax.quantized(kc.Adam(1e-3, use_ema=True), min_size=1)
    state, p, ema = adam.init(params), params, None
    for _ in range(5):
        updates, state = adam.update(grads, state, p)
        p = optax.apply_updates(p, updates)
        moved = np.asarray(p["w"], np.float64)
        ema = moved if ema is None else 0.99 * ema + 0.01 * moved
    ema_a = kc.ema_params(state)
    assert all(isinstance(x, jax.Array) and x.dtype == jnp.float32 for x in jax.tree.leaves(ema_a))
    np.testing.assert_allclose(np.asarray(ema_a["w"], np.float64), ema, rtol=0, atol=4 * 2.0**-24)


# --------------------------------------------------------------------------- non-finite and overflow


def _run(tx, grads_seq, params):
    state, out = tx.init(params), []
    update = jax.jit(tx.update)
    for g in grads_seq:
        u, state = update(g, state, params)
        out.append(np.asarray(u))
    return out, state


def test_float16_state_scale_saturates_instead_of_overflowing():
    """Issue 22 item 1: float16 moments of 600**2 saturate at 65504, as plain rmsprop stores them."""
    p16 = jnp.zeros(4096, jnp.float16)
    g = [jnp.full(4096, 600.0, jnp.float16)] * 3
    plain, _ = _run(rmsjax.rmsprop(1e-3), g, p16)
    for bits in (8, 4):
        low, state = _run(rmsjax.quantized(rmsjax.rmsprop(1e-3), bits=bits), g, p16)
        assert np.all(np.isfinite(low[-1]))
        np.testing.assert_allclose(low[-1].astype(np.float64), plain[-1].astype(np.float64), rtol=2e-3)
        # the saturated float16 second moment: lr * g / sqrt(65504)
        assert float(plain[-1][0]) == pytest.approx(-1e-3 * 600 / np.sqrt(65504), rel=1e-3)


def _bad_grads(bad_value, steps=6, shape=(4, 256)):
    rng = np.random.default_rng(0)
    out = []
    for t in range(steps):
        g = rng.uniform(0.2, 1.0, shape).astype(np.float32) * np.where(rng.random(shape) < 0.5, -1, 1)
        if t == 1:
            g[0, 0] = bad_value
        out.append(jnp.asarray(g))
    return out


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("bad", ["1e20", "inf", "nan"])
def test_a_non_finite_or_overflowing_element_stays_in_its_element(bits, bad):
    """Issue 22 items 2 and 15: a gradient element of 1e20 (its square overflows), +inf or NaN
    changes only its own element; the other 255 of its block follow float32 state."""
    value = {"1e20": 1e20, "inf": np.inf, "nan": np.nan}[bad]
    params = jnp.zeros((4, 256))
    grads = _bad_grads(value)
    ref, ref_state = _run(rmsjax.adam(1e-2), grads, params)
    low, low_state = _run(rmsjax.quantized(rmsjax.adam(1e-2), bits=bits, min_size=1), grads, params)
    for t in range(2, 6):
        def error(row, start=0):
            diff = np.abs(low[t][row, start:] - ref[t][row, start:])
            return float(np.median(diff) / np.mean(np.abs(ref[t][row, start:])))

        clean = max(error(1), error(2), error(3))  # rows without a bad element: quantization error
        assert error(0, start=1) <= 1.5 * clean + 1e-3, (t, error(0, start=1), clean)
        # the bad element itself does what float32 state does: a 0 step for 1e20, NaN for inf/NaN
        if bad == "1e20":
            assert ref[t][0, 0] == 0.0 and low[t][0, 0] == 0.0
        else:
            assert np.isnan(ref[t][0, 0]) and np.isnan(low[t][0, 0])
    nu = qz.dequantize(low_state.inner[0].nu)
    assert bool(jnp.all(jnp.isfinite(nu.reshape(-1)[1:])))  # no other element of the block
    if bad == "nan" and bits == 8:
        assert bool(jnp.isnan(nu[0, 0]))  # NaN stays NaN (8 bits; 4 bits store +inf)
    else:
        assert float(nu[0, 0]) == np.inf


@pytest.mark.parametrize("case", ["bfloat16_state", "keras_adamax"])
def test_an_overflowing_element_whose_moments_stay_finite_stays_in_the_bound(case):
    """The 8-bit bound leaves out an element whose gradient squared overflows only where
    that makes its moment, or the moment it is divided by, +inf. A bfloat16 second moment
    saturates at its largest value instead (finite), and Keras's Adamax divides by a running
    maximum of ``|g|`` (finite): such an element stays in the bound. (Left out, its second
    moment was stored as 16 instead of about 3e38 and it took steps of about 0.3 where
    bfloat16 state takes 1e-19; Adamax's first moment was clipped and its step was 1e-19
    where float32 state's is 0.3.)"""
    rng = np.random.default_rng(0)
    first = rng.normal(size=(4, 64)).astype(np.float32)
    first[0, 5] = 1e20
    grads = [first] + [rng.normal(size=(4, 64)).astype(np.float32) for _ in range(3)]
    if case == "bfloat16_state":
        make, dtype = (lambda: rmsjax.rmsprop(1.0, decay=0.9)), jnp.bfloat16
    else:
        make, dtype = (lambda: keras_compat.Adamax(learning_rate=1.0)), jnp.float32
    params = jnp.zeros((4, 64), dtype)
    grads = [jnp.asarray(g, dtype) for g in grads]
    ref, _ = _run(make(), grads, params)
    low, low_state = _run(rmsjax.quantized(make(), min_size=1), grads, params)
    for t in range(1, 4):
        want, got = float(ref[t][0, 5]), float(low[t][0, 5])
        if case == "bfloat16_state":
            assert abs(want) < 1e-15 and abs(got) < 1e-15, (t, want, got)
        else:
            assert got == pytest.approx(want, rel=0.05), t
    if case == "bfloat16_state":
        (rms,) = [part for part in low_state.inner if hasattr(part, "nu")]
        nu = qz.dequantize(rms.nu)
        # stored at its block's top level (2**126) at the first step and decayed three times
        # since (bfloat16 state: 3.4e38 decayed alike); left out of the bound it was 16
        assert float(nu[0, 5]) >= 0.9**3 * 2.0**126 * 0.99


def test_effective_learning_rate_of_a_quantized_centred_state():
    """Issue 22 item 4: centred RMSprop stores the variance; the diagnostic reads nu back."""
    params, grad, x = _toy()
    inner, ref = rmsjax.rmsprop(1e-2, centered=True), rmsjax.rmsprop(1e-2, centered=True)
    s_q, s_r = rmsjax.quantized(inner).init(params), ref.init(params)
    tx = rmsjax.quantized(inner)
    for _ in range(5):
        _, s_q = tx.update(grad(params, x), s_q, params)
        _, s_r = ref.update(grad(params, x), s_r, params)
    for centered in (True, False):
        got = rmsjax.effective_learning_rate(s_q, eps=1e-8, centered=centered)
        want = rmsjax.effective_learning_rate(s_r, eps=1e-8, centered=centered)
        assert float(got.median) == pytest.approx(float(want.median), rel=0.05)


# --------------------------------------------------------------------------- trees and layouts


def test_nnx_state_tree():
    from flax import nnx

    model = nnx.Linear(128, 64, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    tx, ref = rmsjax.quantized(rmsjax.adam(1e-2)), rmsjax.adam(1e-2)
    grads = jax.tree.map(lambda p: jnp.cos(p) * 0.1, params)
    s, r = tx.init(params), ref.init(params)
    for _ in range(3):
        u, s = tx.update(grads, s, params)
        v, r = ref.update(grads, r, params)
    assert jax.tree.structure(u) == jax.tree.structure(v)
    def read(variable):  # flax 0.12.0 (the floor) has no Variable.get_value
        return variable.get_value() if hasattr(type(variable), "get_value") else variable.value

    assert _median_rel(np.asarray(read(u["kernel"])), np.asarray(read(v["kernel"]))) < 0.02


def test_optax_tree_map_params_reaches_the_quantized_moments():
    params = {"w": jnp.ones((64, 256)), "b": jnp.zeros(256)}
    tx = rmsjax.quantized(rmsjax.adam(1e-3))
    state = tx.init(params)
    seen = []
    out = optax.tree.map_params(tx, lambda x: seen.append(x.shape) or x, state)
    assert jax.tree.structure(out) == jax.tree.structure(state)
    # the function reaches each moment's arrays (codes and scales of "w", the wide "b"),
    # not the counters
    assert sorted(seen) == sorted([(256,), (64, 256), (64, 1)] * 2)


@pytest.mark.parametrize("bits", [8, 4])
def test_no_leaf_takes_more_bytes_than_float32(bits):
    """A (N, 1) head, a prime row and tiny leaves: each stored leaf is at most its float32 size."""
    params = {"head": jnp.zeros((4096, 1)), "prime": jnp.zeros((8, 4099)), "col": jnp.zeros((8192, 3)),
              "w": jnp.zeros((64, 256))}
    tx = rmsjax.quantized(rmsjax.adam(1e-3), bits=bits, min_size=1)
    state = tx.init(params)
    for name, moment in (("mu", state.inner[0].mu), ("nu", state.inner[0].nu)):
        for key, leaf in moment.items():
            stored = state_bytes(leaf)
            assert stored <= 4 * params[key].size, (name, key, stored)
    assert qz.is_quantized(state.inner[0].mu["head"])  # blocks of 256 over the merged (4096, 1)
    assert not qz.is_quantized(state.inner[0].mu["prime"])  # no divisor of 4099 makes a block
    u, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))


SHAPES = [(514, 16), (2, 2), (1024, 1), (1024, 16), (512, 8, 8), (1024, 64), (16, 64), (3, 2, 16),
          (6, 10), (200, 24), (64, 48), (128, 3, 32)]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block_size", [None, 16])
def test_every_layout_reads_back_from_its_codes_and_scales(bits, block_size):
    """The update finds each leaf's layout from the stored shapes alone. At 4 bits a blocked
    row of several axes whose block is twice its last axis would be read as a one-axis row
    of another shape ((514, 16) in blocks of 32 stores what a (257, 32) moment does), which
    failed at the first update; such blocks are not picked (a smaller block, or the leaf
    stays wide), and each stored leaf decodes to its parameter's shape."""
    params = {f"p{i}": jnp.linspace(-1.0, 1.0, math.prod(s)).reshape(s) for i, s in enumerate(SHAPES)}
    tx = rmsjax.quantized(rmsjax.adam(1e-3), bits=bits, block_size=block_size, min_size=1)
    state = tx.init(params)
    for key, leaf in state.inner[0].nu.items():
        if qz.is_quantized(leaf):
            assert qz._layout_of(leaf).shape == params[key].shape, key
    grads = jax.tree.map(jnp.cos, params)
    u, _ = jax.jit(tx.update)(grads, state, params)
    plain = rmsjax.adam(1e-3)
    ref, _ = jax.jit(plain.update)(grads, plain.init(params), params)
    for key in params:  # first step: Adam's update is lr * sign(g) up to eps and rounding
        np.testing.assert_allclose(np.asarray(u[key]), np.asarray(ref[key]), rtol=0.05, atol=1e-6)


# --------------------------------------------------------------------------- one pass: the bound is used


def _reductions_over_new_moments(tx, params):
    """Reductions in the traced update whose operand depends on both the stored codes and the
    gradient: a pass over a new moment (a bound reads the codes or the gradient alone)."""
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    closed = jax.make_jaxpr(tx.update)(grads, state, params)
    n_grad = len(jax.tree.leaves(grads))
    state_leaves = jax.tree.leaves(state, is_leaf=qz.is_quantized)
    codes_ids = set()
    flat_state = jax.tree.leaves(state)
    for i, leaf in enumerate(flat_state):
        if leaf.dtype in (jnp.int8, jnp.uint8):
            codes_ids.add(i)
    del state_leaves
    marks = {}
    invars = closed.jaxpr.invars
    for i, v in enumerate(invars):
        tags = set()
        if i < n_grad:
            tags.add("grad")
        elif (i - n_grad) in codes_ids:
            tags.add("codes")
        marks[v] = tags
    sizes = {int(np.size(leaf)) for leaf in jax.tree.leaves(grads)}
    return _count(closed.jaxpr, marks, sizes)[0]


def _tags(v, marks):
    return set() if isinstance(v, jex_core.Literal) else marks.get(v, set())


def _count(jaxpr, marks, sizes):
    """(reductions over full-size operands tagged both "grad" and "codes", tags of the
    outputs); tags follow data flow, through sub-jaxprs and element by element through
    optimization barriers. Full-size: as many elements as a gradient leaf (the later stages
    of a reduction made in stages read partial maxima, not a new moment); a reduction over
    half as many counts one half (a moment's maxima reduced over the halves of its blocks)."""
    found = 0
    for eqn in jaxpr.eqns:
        tags = set().union(*[_tags(v, marks) for v in eqn.invars]) if eqn.invars else set()
        sub = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
        if eqn.primitive.name == "optimization_barrier":
            for out, v in zip(eqn.outvars, eqn.invars, strict=True):
                marks[out] = _tags(v, marks)
            continue
        if sub is not None and eqn.primitive.name != "reduce":
            inner = sub.jaxpr if hasattr(sub, "jaxpr") else sub
            inner_marks = {iv: _tags(v, marks) for iv, v in zip(inner.invars, eqn.invars)}
            n, out_tags = _count(inner, inner_marks, sizes)
            found += n
            if len(out_tags) == len(eqn.outvars):
                for out, t in zip(eqn.outvars, out_tags, strict=True):
                    marks[out] = t
                continue
        if eqn.primitive.name in ("reduce_max", "reduce_min", "argmax", "argmin", "reduce") \
                and {"grad", "codes"} <= tags:
            size = int(np.size(eqn.invars[0].aval))
            found += 1 if size in sizes else 0.5 if 2 * size in sizes else 0
        for v in eqn.outvars:
            marks[v] = tags
    return found, [_tags(v, marks) for v in jaxpr.outvars]


def test_the_bound_replaces_the_pass_over_new_moments():
    params = {"w": jnp.zeros((64, 1024))}
    # Moments that see the gradient quantized receives: through absent optional parts (the
    # AbsentState slots of rmsprop, adadelta and the compat chains) and through
    # optax.inject_hyperparams.
    bounded = (lambda: rmsjax.adam(1e-3), lambda: rmsjax.adagrad(1e-2),
               lambda: rmsjax.adamw(1e-3, weight_decay=0.1), lambda: rmsjax.rmsprop(1e-3),
               lambda: optax.inject_hyperparams(rmsjax.rmsprop)(learning_rate=1e-3),
               lambda: optax.inject_hyperparams(rmsjax.adam)(learning_rate=optax.linear_schedule(1e-3, 0, 9)),
               lambda: rmsjax.compat.torch.RMSprop(1e-3), lambda: rmsjax.compat.torch.Adam(1e-3))
    for make in bounded:
        assert _reductions_over_new_moments(rmsjax.quantized(make(), bits=8), params) == 0
    # A centred second moment (stored as the variance) has its own bound, which reads the
    # stored first moment too (test_the_centred_variance_is_not_clipped).
    assert _reductions_over_new_moments(rmsjax.quantized(rmsjax.rmsprop(1e-3, centered=True), bits=8),
                                        params) == 0
    # One exact pass for each moment whose input is not the gradient: the momentum buffer after
    # the scaling, AdaDelta's nu_delta, a second moment after L2 decay or clipping...
    centred_momentum = rmsjax.quantized(rmsjax.rmsprop(1e-3, centered=True, momentum=0.9), bits=8)
    assert _reductions_over_new_moments(centred_momentum, params) == 1  # the momentum buffer
    one_pass_each = (lambda: rmsjax.adadelta(),
                     lambda: rmsjax.rmsprop(1e-3, weight_decay=1e-4),
                     lambda: optax.chain(optax.clip_by_global_norm(1.0), rmsjax.rmsprop(1e-3)))
    for make in one_pass_each:
        assert _reductions_over_new_moments(rmsjax.quantized(make(), bits=8), params) == 1
    # ...and at 4 bits, where no bound is used, one for each moment, except that a moment and
    # the second moment it is divided by (Adam's) share one: its keep reads the new divisor
    # (test_a_moment_and_its_divisor_are_reduced_in_one_loop).
    assert _reductions_over_new_moments(rmsjax.quantized(rmsjax.adam(1e-3), bits=4), params) == 1
    assert _reductions_over_new_moments(rmsjax.quantized(rmsjax.rmsprop(1e-3, momentum=0.9), bits=4),
                                        params) == 2


BOUNDED_RULES = {
    "leaky, Adam": lambda: rmsjax.adam(1e-3),
    "leaky, RMSprop": lambda: rmsjax.rmsprop(1e-3),
    "leaky, centred RMSprop": lambda: rmsjax.rmsprop(1e-3, centered=True),
    "momentum": lambda: rmsjax.sgd(1e-2, momentum=0.9),
    "momentum, dampened": lambda: rmsjax.compat.torch.SGD(1e-2, momentum=0.9, dampening=0.1),
    "sum": lambda: rmsjax.adagrad(1e-1),
    "peak": lambda: rmsjax.compat.keras.Adamax(1e-3),
}


@pytest.mark.parametrize("make", BOUNDED_RULES.values(), ids=list(BOUNDED_RULES))
def test_the_bound_holds_when_the_gradient_shrinks(make):
    """The 8-bit bound is an upper bound: six steps of large mixed-sign gradients, then six a
    hundred times smaller, so that each block's largest new magnitude comes from the stored
    moment (of either sign), not from the gradient. A bound below it would saturate the block
    (a bound from the gradient alone: update error 68 % to 10000 %); a true one keeps the
    8-bit updates within 10 % (RMS) of float32 state's (measured 0.5-4.5 %)."""
    shape = (32, 512)
    rng = np.random.default_rng(0)
    grads = [rng.uniform(0.5, 1.0, shape) * rng.choice([-1.0, 1.0], shape) * (1.0 if t < 6 else 0.01)
             for t in range(12)]
    params = {"w": jnp.zeros(shape)}
    tx32, tx8 = make(), rmsjax.quantized(make(), bits=8)
    assert _reductions_over_new_moments(tx8, params) == 0  # the bound is what runs
    s32, s8 = tx32.init(params), tx8.init(params)
    step32, step8 = jax.jit(tx32.update), jax.jit(tx8.update)
    for g in grads:
        g = {"w": jnp.asarray(g, jnp.float32)}
        u32, s32 = step32(g, s32, params)
        u8, s8 = step8(g, s8, params)
    a, b = np.asarray(u8["w"]), np.asarray(u32["w"])
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.1


def test_the_centred_variance_is_not_clipped():
    """Centred RMSprop stores nu - mu**2; after 150 steady gradients of -100 and two of +1 the
    variance jumps from ~0 to 1570, past the leaky bound max(old, g**2) = 1 that it once took,
    which clipped it to 8 (updates 41 % high). Its own bound max(var, (|g| + |mu|)**2) covers
    it: the 8-bit variance is within 3 % of float32's (measured 0.7 %) and the updates within
    5 % (measured 3.0 %; 2 % at the median)."""
    p = jnp.zeros(256)
    plain = rmsjax.scale_by_stddev(decay=0.9)
    tx = rmsjax.quantized(plain, min_size=0)
    assert _reductions_over_new_moments(tx, p) == 0  # the bound is what runs
    sq, sr = tx.init(p), plain.init(p)
    step_q, step_r = jax.jit(tx.update), jax.jit(plain.update)
    for g in [jnp.full(256, -100.0)] * 150 + [jnp.ones(256)] * 2:
        uq, sq = step_q(g, sq, p)
        ur, sr = step_r(g, sr, p)
    decoded = qz.dequantize_state(sq.inner)
    exact_var = float(sr.nu[0] - sr.mu[0] ** 2)
    assert abs(float(decoded.nu[0] - decoded.mu[0] ** 2) / exact_var - 1) < 0.03
    rel = np.abs(np.asarray(uq) / np.asarray(ur) - 1)
    assert rel.max() < 0.05 and np.median(rel) < 0.02, (rel.max(), np.median(rel))


@pytest.mark.parametrize("bits", [8, 4])
def test_a_skipped_step_leaves_the_stored_moments_as_they_were(bits):
    """optax.apply_if_finite inside quantized hands the old moments back on a non-finite
    gradient; they are re-encoded to the same codes and scales (a block whose largest element
    sat on the top level used to get twice its scale, and all its elements rounded again)."""
    p = jnp.zeros(256)
    g = jnp.asarray(np.random.default_rng(0).normal(size=256), jnp.float32).at[0].set(9.999)
    tx = rmsjax.quantized(optax.apply_if_finite(rmsjax.adam(1e-3), 5), bits=bits, min_size=0)
    _, state = tx.update(g, tx.init(p), p)
    _, after = tx.update(jnp.full(256, jnp.nan), state, p)
    for a, b in zip(jax.tree.leaves(state.inner.inner_state), jax.tree.leaves(after.inner.inner_state),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_carried_4_bit_second_moment_is_unbiased():
    """200 steps of RMSprop's second moment (decay 0.99) at 4 bits, gradients sqrt(0.3) with
    10 % noise: the mean stored moment ends within 0.5 % of float32's (it ended 3.9 % high
    when each element's rounding numbers along the steps were a Weyl sequence)."""
    shape = (512, 128)
    p = jnp.zeros(shape)
    plain = rmsjax.scale_by_rms(decay=0.99)

    def run(tx):
        def body(i, carry):
            state, key = carry
            key, k = jax.random.split(key)
            g = jnp.sqrt(0.3) * (1 + 0.1 * jax.random.normal(k, shape))
            return tx.update(g, state, p)[1], key
        return jax.jit(lambda s: jax.lax.fori_loop(0, 200, body, (s, jax.random.PRNGKey(0)))[0])(tx.init(p))

    exact = float(run(plain).nu.mean())
    stored = float(qz.dequantize_state(run(rmsjax.quantized(plain, bits=4, min_size=0)).inner).nu.mean())
    assert abs(stored / exact - 1) < 0.005, (stored, exact)


def test_declare_rejects_what_it_cannot_read():
    class State(NamedTuple):
        mu: Any
        nu: Any

    with pytest.raises(TypeError, match="not a NamedTuple"):
        _moments.declare(dict, mu=_moments.FIRST)
    with pytest.raises(ValueError, match="State has no field 'm'"):
        _moments.declare(State, m=_moments.FIRST)
    for bad in (("leaky",), _moments.Moment(True, rule="ema"), _moments.Moment(False, "leaky", order=3)):
        with pytest.raises(ValueError, match="State.nu: bad declaration"):
            _moments.declare(State, nu=bad)
    with pytest.raises(ValueError, match="State.mu: no field 'v'"):
        _moments.declare(State, mu=_moments.Moment(True, "leaky", divided_by="v"))
    with pytest.raises(ValueError, match="State.nu: no field 'm'"):
        _moments.declare(State, nu=_moments.Moment(False, "leaky", 2, centered="m"))
    for bad in (_moments.Moment(False, "sum", 2, centered="mu"),
                _moments.Moment(False, "leaky", 1, centered="mu")):
        with pytest.raises(ValueError, match="State.nu: a centred moment is a second moment"):
            _moments.declare(State, nu=bad)
    assert _moments.declared(State(0, 0)) is None  # nothing was registered


def test_the_declared_bounds_are_upper_bounds():
    """``_moments.bound`` against the rules themselves, in NumPy: for random blocks of old
    moments and inputs, every new element (each rule at its extreme coefficients and in
    between) is at most the bound computed from the block maxima (in float32, hence the
    relative 1e-6)."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        old_mu = rng.normal(size=64) * rng.uniform(0, 10)
        x = rng.normal(size=64) * rng.uniform(0, 10)
        old_sq = np.abs(rng.normal(size=64)) * rng.uniform(0, 10)
        var = np.abs(rng.normal(size=64)) * rng.uniform(0, 10)
        m_x = np.abs(x).max()
        for keep in (0.0, 0.3, 0.9, 0.999, 1.0):
            take = 1 - keep
            cases = [
                (_moments.Moment(True, "leaky"), keep * old_mu + take * x, old_mu),
                (_moments.Moment(False, "leaky", 2), keep * old_sq + take * x**2, old_sq),
                (_moments.Moment(False, "sum", 2), old_sq + x**2, old_sq),
                (_moments.Moment(True, "momentum"), keep * old_mu + take * x, old_mu),
                (_moments.Moment(True, "momentum"), keep * old_mu + x, old_mu),  # take 1 (no dampening)
                (_moments.Moment(False, "peak"), np.maximum(keep * old_sq, np.abs(x)), old_sq),
            ]
            for moment, new, old in cases:
                assert np.abs(new).max() <= float(_moments.bound(moment, np.abs(old).max(), m_x)) * (1 + 1e-6)
            # centred: var' = nu' - mu'**2 with nu = var + mu**2 and one keep for both averages
            nu_new = keep * (var + old_mu**2) + take * x**2
            mu_new = keep * old_mu + take * x
            centred = _moments.Moment(False, "leaky", 2, centered="mu")
            limit = float(_moments.bound(centred, var.max(), m_x, np.abs(old_mu).max()))
            assert (nu_new - mu_new**2).max() <= limit * (1 + 1e-6) + 1e-12
    with pytest.raises(ValueError, match="declares no update rule"):
        _moments.bound(_moments.Moment(False), 1.0, 1.0)
    with pytest.raises(ValueError, match="needs the leaky rule of order 2 and the first moment"):
        _moments.bound(_moments.Moment(False, "leaky", 2, centered="mu"), 1.0, 1.0)


def test_input_path_follows_only_declared_pass_throughs():
    """``_moments.input_path`` skips absent parts and enters inject_hyperparams, nothing else."""
    p = {"w": jnp.zeros(4)}
    assert type(_moments.input_path(rmsjax.rmsprop(0.1).init(p))) is rmsjax.transforms.ScaleByRmsState
    injected = optax.inject_hyperparams(rmsjax.rmsprop)(learning_rate=0.1).init(p)
    assert type(_moments.input_path(injected)) is rmsjax.transforms.ScaleByRmsState
    # an empty state that does not declare it hands the gradient on stops the walk
    clipped = optax.chain(optax.clip(1.0), rmsjax.rmsprop(0.1)).init(p)
    assert type(_moments.input_path(clipped)) is optax.EmptyState
    # a chain of absent parts only: the last one
    assert type(_moments.input_path((rmsjax.transforms.AbsentState(),))) is rmsjax.transforms.AbsentState
    with pytest.raises(TypeError, match="not a NamedTuple"):
        _moments.declare_passes_input(dict)
    with pytest.raises(ValueError, match="has no field 'inner'"):
        _moments.declare_passes_input(rmsjax.transforms.ScaleByRmsState, into="inner")


# --------------------------------------------------------------------------- peak memory

PEAK = {
    "adam": lambda: rmsjax.adam(1e-3),
    "rmsprop": lambda: rmsjax.rmsprop(1e-3),
    "adagrad": lambda: rmsjax.adagrad(1e-2),
    "adadelta": lambda: rmsjax.adadelta(),
    "centered_momentum": lambda: rmsjax.rmsprop(1e-3, centered=True, momentum=0.9),
    "momentum": lambda: rmsjax.rmsprop(1e-3, momentum=0.9),  # not on the acceptance list
}
ACCEPTANCE = ("adam", "rmsprop", "adagrad", "adadelta", "centered_momentum")


# XLA:CPU's region-analysis copy insertion (docs/low_bit.md, *In place on CPU*).
IN_PLACE = {"xla_cpu_copy_insertion_use_region_analysis": True}
# XLA:CPU's 512-bit vectors (AVX-512; the default is 256), the fast compile of low-bit steps there.
WIDE_VECTORS = {"xla_cpu_prefer_vector_width": 512}


def peak_bytes_per_param(make, bits, n=2048, options=None):
    """Compile-time memory of the train step (update + apply, params and state donated),
    compiled with the compiler ``options``: (arguments + temporaries, what the stored state
    allows) in bytes per parameter."""
    p = {"w": jax.ShapeDtypeStruct((n, n), jnp.float32)}
    tx = make() if bits == 32 else rmsjax.quantized(make(), bits=bits)
    s = jax.eval_shape(tx.init, p)

    def step(params, state, grads):
        u, state = tx.update(grads, state, params)
        return optax.apply_updates(params, u), state

    step = jax.jit(step, donate_argnums=(0, 1), compiler_options=options)
    m = step.lower(p, s, p).compile().memory_analysis()
    allowed = 8 + state_bytes(s) / n / n  # params + gradient + stored state
    return (m.argument_size_in_bytes + m.temp_size_in_bytes) / n / n, allowed


# Bytes per parameter of temporaries measured at 2048 x 2048 on XLA:CPU (jax 0.10 and 0.12 give
# the same figures), the step compiled with default options, each rounded up by at most 0.08 as
# a regression ceiling: what the step needs beyond its arguments. `python
# benchmarks/bench_quantized.py --quick --peak-shape 2048x2048` prints them (the "temp" of its
# peak table). What is left is XLA:CPU's copy of a donated code array that the parameter update
# reads (1 byte per parameter at 8 bits, half a byte at 4: that loop is the user's apply_updates,
# which nothing orders before the encode; 8-bit centred RMSprop with momentum copies two, and so
# does 4-bit Adam, whose one reduction over both new moments reads both code arrays at once).
# Compiled IN_PLACE (below) no step copies any, and every one meets the target.
PEAK_TEMPORARIES = {
    ("adam", 8): 1.1, ("adam", 4): 1.1, ("rmsprop", 8): 1.1, ("rmsprop", 4): 0.6,
    ("adagrad", 8): 1.1, ("adagrad", 4): 0.6, ("adadelta", 8): 1.1, ("adadelta", 4): 1.1,
    ("centered_momentum", 8): 2.1, ("centered_momentum", 4): 0.7, ("momentum", 8): 1.1, ("momentum", 4): 0.7,
}


@functools.cache
def float32_peak(name):
    return peak_bytes_per_param(PEAK[name], 32)[0]


@pytest.mark.skipif(jax.default_backend() != "cpu" or jax.__version_info__[:2] not in {(0, 10), (0, 12)},
                    reason="ceilings measured on XLA:CPU with jax 0.10 and 0.12; jax 0.8 keeps other "
                    "temporaries (8-bit Adam 12.13 B/param, centred RMSprop with momentum 18.16); "
                    "the H200 figures are in docs/low_bit.md")
@pytest.mark.parametrize("name,bits", sorted(PEAK_TEMPORARIES))
def test_peak_memory_of_the_donated_train_step(name, bits):
    peak, allowed = peak_bytes_per_param(PEAK[name], bits)
    assert peak <= allowed + PEAK_TEMPORARIES[(name, bits)], (peak, allowed)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="compiled for XLA:CPU's buffer assignment")
@pytest.mark.parametrize("name,bits", sorted(PEAK_TEMPORARIES))
def test_low_bit_step_peaks_below_float32_state_on_every_jax(name, bits):
    """On every jax of the CI matrix (0.8 to 0.12), each step (those of the acceptance list and
    RMSprop with momentum) needs at least half a byte per parameter less than the same step
    with float32 state. (RMSprop with momentum at 8 bits peaked above float32 state's, 16.07
    against 16.00, until the encodes of the earlier moments of a chain were ordered after the
    exact maxima of the later ones: 15.09, 15.16 on jax 0.8.)"""
    peak, _ = peak_bytes_per_param(PEAK[name], bits)
    assert peak < float32_peak(name) - 0.5, (peak, float32_peak(name))


# The acceptance target, with the step compiled in place (IN_PLACE): met by every step of the
# acceptance list at 8 and 4 bits on XLA:CPU with jax 0.8 to 0.12. Measured (Adam, RMSprop,
# AdaGrad, AdaDelta, centred RMSprop with momentum) at 8 bits 10.10, 9.06, 9.06, 10.13, 11.15
# against 10.03, 9.02, 9.02, 10.03, 11.05 (jax 0.8: 10.11, 9.07, 9.07, 10.13, 11.18); at 4 bits
# 9.13, 8.56, 8.56, 9.13, 9.72 against 9.06, 8.53, 8.53, 9.06, 9.59. (8-bit centred RMSprop with
# momentum peaked at 11.21 on jax 0.8 while the codes' largest levels were a max and a min
# reduced apart; one reduction of both, `_codec.largest_level`, brought it to 11.18.) Skipped on
# other backends: not measured there on this release.


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="measured on XLA:CPU only in this release; "
                    "benchmarks/bench_quantized.py prints the peaks on any backend")
@pytest.mark.parametrize("name,bits", [(name, bits) for bits in (8, 4) for name in ACCEPTANCE])
@pytest.mark.parametrize("options", [IN_PLACE, {**IN_PLACE, **WIDE_VECTORS}],
                         ids=["in_place", "in_place_vw512"])
def test_peak_memory_meets_the_acceptance_target(name, bits, options):
    """Arguments + temporaries within 0.15 B/param of what the stored state allows (the
    acceptance target), the step compiled in place, with XLA's default vectors or AVX-512's."""
    peak, allowed = peak_bytes_per_param(PEAK[name], bits, options=options)
    assert peak <= allowed + 0.15, (peak, allowed)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU compiler option")
@pytest.mark.parametrize("bits", [32, 8, 4])
@pytest.mark.parametrize("name", ["adam", "rmsprop", "adagrad", "centered_momentum"])
def test_wide_vectors_change_no_bit(name, bits):
    """The train step compiled with 512-bit vectors (docs/low_bit.md, *Speed*) gives the
    parameters and the stored state of the default compile bit for bit, over steps whose
    gradients span six orders of magnitude. (Not AdaDelta: there XLA:CPU's 512-bit code moves
    about 0.3 % of the parameters by one or two ulps, with float32 state as with low-bit state.)"""
    shape = (64, 1024)

    def run(options):
        tx = PEAK[name]() if bits == 32 else rmsjax.quantized(PEAK[name](), bits=bits)

        def step(params, state, grads):
            u, state = tx.update(grads, state, params)
            return optax.apply_updates(params, u), state

        step = jax.jit(step, donate_argnums=(0, 1), compiler_options=options)
        params = jnp.ones(shape, jnp.float32)
        state = tx.init(params)
        for k in range(4):
            grads = jax.random.normal(jax.random.key(k), shape) * 10.0 ** (2 * k - 3)
            params, state = step(params, state, grads)
        return [np.asarray(x) for x in jax.tree.leaves((params, state))]

    default, wide = run(None), run({**IN_PLACE, **WIDE_VECTORS})
    assert len(default) == len(wide)
    for a, b in zip(default, wide, strict=True):
        np.testing.assert_array_equal(a, b)


JOINED = {
    "adam-4": (lambda: rmsjax.adam(1e-3), 4),
    "amsgrad-4": (lambda: optax.chain(rmsjax.transforms.scale_by_adam(amsgrad=True), optax.scale(-1e-3)), 4),
    "keras.Nadam-4": (lambda: keras_compat.Nadam(1e-3), 4),
    # At 8 bits, moments behind clipping are reduced exactly (no bound).
    "clipped-adamw-8": (lambda: optax.chain(optax.clip_by_global_norm(1.0),
                                            rmsjax.adamw(1e-3, weight_decay=0.1)), 8),
}


@pytest.mark.parametrize("name", list(JOINED))
def test_a_moment_and_its_divisor_are_reduced_in_one_loop(name, monkeypatch):
    """A moment divided by a second moment (Adam's ``mu``), reduced exactly, leaves out of
    its scales the elements whose new divisor is not finite, so its reduction computes the new
    divisor anyway: the divisor's maxima are reduced in the same loop. That changes no bit of
    the parameters or the stored state against reducing each moment on its own, over steps
    whose gradients span six orders of magnitude and hold an overflowing, an infinite and a
    NaN element; and the step has one reduction over the two new moments instead of two."""
    make, bits = JOINED[name]
    shape = (64, 1024)
    params = {"w": jnp.ones(shape, jnp.float32)}

    def run():
        tx = rmsjax.quantized(make(), bits=bits)

        def step(params, state, grads):
            u, state = tx.update(grads, state, params)
            return optax.apply_updates(params, u), state

        step = jax.jit(step)
        p, state = params, tx.init(params)
        for k in range(4):
            g = jax.random.normal(jax.random.key(k), shape) * 10.0 ** (2 * k - 3)
            if k == 2:
                g = g.at[3, 5].set(3e30).at[7, 9].set(jnp.inf).at[11, 700].set(jnp.nan)
            p, state = step(p, state, {"w": g})
        return [np.asarray(x) for x in jax.tree.leaves((p, state))], _reductions_over_new_moments(tx, params)

    joined, n_joined = run()
    monkeypatch.setattr(qz, "_joins", lambda *args: False)
    apart, n_apart = run()
    assert len(joined) == len(apart)
    for a, b in zip(joined, apart, strict=True):
        np.testing.assert_array_equal(a, b)
    assert n_apart - n_joined == 1, (n_joined, n_apart)


def test_a_centred_divisor_is_reduced_on_its_own(monkeypatch):
    """Centred RMSprop's ``mu`` is divided by ``nu``, but ``nu`` is stored as the variance,
    whose scales are not those of the new ``nu`` that ``mu``'s keep reads: the two are not
    reduced together (the reduction's second output would go unused, and its work moved the
    in-place peak of 4-bit centred RMSprop with momentum on jax 0.8 past the target)."""
    calls = []
    real = qz._codec.block_scales
    monkeypatch.setattr(qz._codec, "block_scales", lambda *a, **k: calls.append(1) or real(*a, **k))
    params = {"w": jnp.ones((64, 1024))}
    for make in (lambda: rmsjax.rmsprop(1e-3, centered=True),
                 lambda: rmsjax.rmsprop(1e-3, centered=True, momentum=0.9)):
        tx = rmsjax.quantized(make(), bits=4)
        jax.make_jaxpr(tx.update)(params, tx.init(params), params)
    assert not calls
    tx = rmsjax.quantized(rmsjax.adam(1e-3), bits=4)  # the same probe sees Adam's joint reduction
    jax.make_jaxpr(tx.update)(params, tx.init(params), params)
    assert calls
