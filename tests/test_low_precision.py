"""rmsjax.low_precision: 16-bit parameters whose updates land on the rounded exact value.

The references are computed here from the bit patterns with NumPy (the two bfloat16 / float16
neighbours of a float32 number), not with the code under test.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
import registry
from flax import nnx

import rmsjax


def _neighbours(s: Any, dtype) -> tuple[np.ndarray, np.ndarray]:
    """The two numbers of ``dtype`` that bracket float32 ``s`` (lo <= s <= hi), from the bits."""
    s = np.asarray(s, np.float32)
    if np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16):
        bits = s.view(np.uint32)
        toward_zero = (bits & np.uint32(0xFFFF0000)).view(np.float32)
        away = ((bits & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).view(np.float32)
        exact = toward_zero == s
        away = np.where(exact, toward_zero, away)
    else:
        near = s.astype(np.float16)
        nf = near.astype(np.float32)
        other = np.nextafter(near, np.where(nf > s, -np.inf, np.inf).astype(np.float16)).astype(np.float32)
        toward_zero, away = nf, np.where(nf == s, nf, other)
    return np.minimum(toward_zero, away), np.maximum(toward_zero, away)


def _spacing(s: np.ndarray) -> np.ndarray:
    """The bfloat16 spacing just above |s| (float32 bits with the low 16 cleared, plus one)."""
    bits = np.abs(np.asarray(s, np.float32)).view(np.uint32) & np.uint32(0xFFFF0000)
    return (bits + np.uint32(0x10000)).view(np.float32) - bits.view(np.float32)


def _apply(tx, params, updates_in, state):
    @jax.jit
    def step(params, state):
        u, state = tx.update(updates_in, state, params)
        return optax.apply_updates(params, u), state

    return step(params, state)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_landing_is_one_of_the_two_neighbours_of_the_exact_sum(dtype):
    """Over many random magnitudes: apply_updates lands on a neighbour of p + u, exactly."""
    rng = np.random.default_rng(0)
    n = 1 << 16
    p = (rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 2, n)).astype(np.float32)
    rel = 10.0 ** rng.uniform(-6, 0.5, n) * rng.choice([-1, 1], n)
    p16 = jnp.asarray(p, dtype)
    pf = np.asarray(p16.astype(jnp.float32))
    u = (pf * rel).astype(np.float32)
    tx = rmsjax.low_precision(optax.identity())
    new, _ = _apply(tx, {"w": p16}, {"w": jnp.asarray(u)}, tx.init({"w": p16}))
    landed = np.asarray(new["w"].astype(jnp.float32))
    s = pf + u
    lo, hi = _neighbours(s, jnp.dtype(dtype))
    hit = (landed == lo) | (landed == hi)
    # Sterbenz: t - p is exact whenever t / 2 <= p <= 2 t, hence the landing is exact there.
    sterbenz = (lo / 2 <= pf) & (pf <= 2 * lo) & (hi / 2 <= pf) & (pf <= 2 * hi) & (lo > 0) | (
        (hi / 2 >= pf) & (pf >= 2 * hi) & (lo / 2 >= pf) & (pf >= 2 * lo) & (hi < 0))
    assert sterbenz.mean() > 0.9
    assert hit[sterbenz].all(), (pf[sterbenz & ~hit][:5], u[sterbenz & ~hit][:5])
    assert hit.mean() > 0.95  # updates up to 3x the parameter: crossing zero is common here
    # Everywhere else it misses by less than the update's own ulp.
    miss = ~hit
    gap = np.abs(landed - s)[miss]
    assert (gap <= np.abs(u[miss]) * 2.0**-7 + (hi - lo)[miss]).all()


@pytest.mark.parametrize("compensated", [False, True], ids=["stochastic", "compensated"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_a_step_past_the_largest_value_saturates_on_both_sides(dtype, compensated):
    """-max - step lands on -max, as max + step lands on max (it landed on -inf; with
    ``compensated`` on +-inf both ways). The step keeps the float32 sum finite (bfloat16's
    largest value is within 0.4 % of float32's; an infinite sum stays infinite, as in
    float32)."""
    big = float(jnp.finfo(dtype).max)
    tx = rmsjax.low_precision(rmsjax.sgd(1.0), compensated=compensated)
    for sign in (1.0, -1.0):
        p = {"w": jnp.full(4, sign * big, dtype)}
        g = {"w": jnp.full(4, -sign * big * 0.002, jnp.float32)}  # sgd steps by -g: past the edge
        new, _ = _apply(tx, p, g, tx.init(p))
        np.testing.assert_array_equal(np.asarray(new["w"].astype(jnp.float32)), sign * big)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_rounding_is_unbiased(dtype):
    """Updates far below half an ulp: the mean landing equals p + u (nearest would give p)."""
    n = 1 << 16
    params = {"w": jnp.full(n, 1.0, dtype)}
    for step_size in (1e-4, 1e-3, 3e-3):
        tx = rmsjax.low_precision(optax.identity())
        new, _ = _apply(tx, params, {"w": jnp.full(n, -step_size, jnp.float32)}, tx.init(params))
        values = np.asarray(new["w"].astype(jnp.float32))
        lo, hi = _neighbours(np.float32(1.0 - step_size), jnp.dtype(dtype))
        assert set(np.unique(values)) <= {float(lo), float(hi)}
        # the rounding of each element is a Bernoulli choice between lo and hi: 5 standard errors
        f = (1.0 - step_size - float(lo)) / float(hi - lo)
        sigma = float(hi - lo) * np.sqrt(f * (1 - f) / n)
        assert abs(values.mean() - (1.0 - step_size)) < 5 * sigma + 1e-7


def test_many_small_steps_follow_the_float32_run():
    """SGD 300 steps of 1e-3 on bfloat16 ones: SR and compensation follow float32; nearest stalls."""
    n = 4096
    grads = {"w": jnp.ones(n, jnp.bfloat16)}
    exact = 1.0 - 300 * 1e-3  # the wrapped sgd works in float32
    results = {}
    for name, tx in {"nearest": rmsjax.sgd(1e-3), "sr": rmsjax.low_precision(rmsjax.sgd(1e-3)),
                     "comp": rmsjax.low_precision(rmsjax.sgd(1e-3), compensated=True)}.items():
        params = {"w": jnp.ones(n, jnp.bfloat16)}

        def step(carry, _, tx=tx):  # 300 steps compiled once (a fresh jit per step took 2 min)
            p, s = carry
            u, s = tx.update(grads, s, p)
            return (optax.apply_updates(p, u), s), None

        results[name], _ = jax.lax.scan(step, (params, tx.init(params)), None, length=300)
    assert np.all(np.asarray(results["nearest"][0]["w"], np.float32) == 1.0)
    sr = np.asarray(results["sr"][0]["w"], np.float32)
    assert abs(sr.mean() - exact) < 1e-3
    params, state = results["comp"]
    w = np.asarray(params["w"], np.float32)
    master = w + np.asarray(state.error["w"], np.float32) * _spacing(w) / 254
    # each step's record is rounded stochastically: an unbiased walk of steps of ulp / 254
    assert abs(master.mean() - exact) < 1e-5  # ~5 standard errors of 4096 such walks
    assert np.abs(master - exact).max() < 0.05 * 2**-8
    assert np.abs(w - exact).max() <= 2**-8


def test_float32_parameters_pass_through():
    params = {"w": jnp.linspace(-1, 1, 64, dtype=jnp.float32), "h": jnp.ones(8, jnp.bfloat16)}
    grads = {"w": jnp.cos(params["w"]), "h": jnp.ones(8, jnp.bfloat16)}
    inner = rmsjax.adam(1e-2)
    tx = rmsjax.low_precision(rmsjax.adam(1e-2), compensated=True)
    u_ref, _ = inner.update(grads, inner.init(_f32(params)), _f32(params))
    state = tx.init(params)
    u, state = tx.update(grads, state, params)
    np.testing.assert_array_equal(np.asarray(u["w"]), np.asarray(u_ref["w"]))
    assert state.error["w"] is None and state.error["h"].dtype == jnp.int8
    # the wrapped optimizer sees float32 parameters and gradients: float32 state
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.inner[0].nu))


def test_resume_is_bit_identical():
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.standard_normal((64, 64)), jnp.bfloat16)}
    for compensated in (False, True):
        tx = rmsjax.low_precision(rmsjax.quantized(rmsjax.adam(1e-3), min_size=1), compensated=compensated)

        @jax.jit
        def step(p, s, k, tx=tx):
            g = jax.tree.map(lambda x: (jnp.sin(x.astype(jnp.float32) * k)).astype(x.dtype), p)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        p, s = params, tx.init(params)
        for k in range(20):
            p, s = step(p, s, jnp.float32(k))
            if k == 9:
                saved = jax.device_get((p, s))
        p2, s2 = jax.device_put(saved)
        for k in range(10, 20):
            p2, s2 = step(p2, s2, jnp.float32(k))
        for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves((p2, s2)), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.skipif(not hasattr(nnx, "as_pure"), reason="nnx.as_pure is new in flax 0.12.7")
@pytest.mark.parametrize("compensated", [False, True])
def test_nnx_optimizer_matches_the_optax_loop(compensated):
    def make():
        return nnx.Linear(16, 32, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))

    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 16)), jnp.bfloat16)

    def loss(model):
        return jnp.mean(model(x).astype(jnp.float32) ** 2)

    model = make()
    tx = rmsjax.low_precision(rmsjax.adam(1e-3), compensated=compensated)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, opt):
        opt.update(model, nnx.grad(loss)(model))

    for _ in range(5):
        nnx_step(model, opt)

    ref_model = make()
    graphdef, params = nnx.split(ref_model, nnx.Param)
    params = nnx.as_pure(params)
    tx = rmsjax.low_precision(rmsjax.adam(1e-3), compensated=compensated)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: loss(nnx.merge(graphdef, p)))(params)
        u, state = tx.update(grads, state, params)
        return optax.apply_updates(params, u), state

    for _ in range(5):
        params, state = step(params, state)
    got = nnx.as_pure(nnx.state(model, nnx.Param))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params), strict=True):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert not np.array_equal(np.asarray(got["kernel"], np.float32),
                              np.asarray(nnx.state(make(), nnx.Param)["kernel"][...], np.float32))


def _f32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def _registry_params():
    rng = np.random.default_rng(2)
    return {"a": jnp.asarray(rng.standard_normal((4, 8)), jnp.bfloat16),
            "b": jnp.asarray(rng.standard_normal(8), jnp.bfloat16)}


@pytest.mark.parametrize("name", sorted(registry.CASES))
def test_wraps_every_registered_optimizer(name):
    """Each registered case, wrapped: the landing brackets p + (the case's own update)."""
    case = registry.CASES[name]
    params = _registry_params()
    grads = jax.tree.map(lambda p: (p.astype(jnp.float32) * 0.3 + 0.1).astype(p.dtype), params)
    for compensated in (False, True):
        inner = case.make()
        tx = rmsjax.low_precision(case.make(), compensated=compensated)
        state = tx.init(params)
        inner_state = inner.init(_f32(params))  # the wrapped optimizer works in float32
        p = params
        for _ in range(3):
            u_inner, inner_state = inner.update(_f32(grads), inner_state, _f32(p))
            u, state = tx.update(grads, state, p)
            new = optax.apply_updates(p, u)
            for key in p:
                assert new[key].dtype == jnp.bfloat16
                s = np.asarray(p[key], np.float32) + np.asarray(u_inner[key], np.float32)
                got = np.asarray(new[key], np.float32)
                assert np.isfinite(got).all()
                p32 = np.asarray(p[key], np.float32)
                u32 = np.asarray(u_inner[key], np.float32)
                # an update that takes p below half its size or across zero may miss by half an
                # ulp of the update; compensation adds the carried record (<= ulp(p) / 2)
                bound = _spacing(s) + _spacing(u32) + (_spacing(p32) if compensated else 0)
                assert (np.abs(got - s) <= bound).all(), (name, key)
                if not compensated:
                    lo, hi = _neighbours(s, ml_dtypes.bfloat16)
                    small = np.abs(u32) <= np.abs(p32) / 4
                    assert ((got == lo) | (got == hi))[small].all(), (name, key)
            p = new
            if compensated:  # the inner optimizer runs on the same parameters from here on
                inner_state = state.inner


def test_composes_with_quantized_either_way():
    params = {"w": jnp.asarray(np.random.default_rng(3).standard_normal((32, 256)), jnp.bfloat16)}
    grads = {"w": jnp.ones((32, 256), jnp.bfloat16)}
    for tx in (rmsjax.low_precision(rmsjax.quantized(rmsjax.adam(1e-3))),
               rmsjax.quantized(rmsjax.low_precision(rmsjax.adam(1e-3), compensated=True))):
        p, s = _apply(tx, params, grads, tx.init(params))
        p, s = _apply(tx, p, grads, s)
        moved = np.asarray(p["w"], np.float32) - np.asarray(params["w"], np.float32)
        assert abs(moved.mean() + 2e-3) < 2e-4


def test_errors_are_loud():
    with pytest.raises(ValueError, match=r"params\['n'\].*int32.*not a floating"):
        rmsjax.low_precision(rmsjax.adam(1e-3)).init({"w": jnp.ones(3), "n": jnp.ones(3, jnp.int32)})
    tx = rmsjax.low_precision(rmsjax.adam(1e-3))
    params = {"w": jnp.ones(3, jnp.bfloat16)}
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, tx.init(params))
    comp = rmsjax.low_precision(rmsjax.adam(1e-3), compensated=True)
    state = comp.init({"w": jnp.ones(3)})  # float32 at init, bfloat16 at update
    with pytest.raises(ValueError, match=r"params\['w'\] is bfloat16 at update"):
        comp.update(params, state, params)
    with pytest.raises(TypeError, match="inner"):
        rmsjax.low_precision(0.1)  # pyright: ignore[reportArgumentType]
    plain = rmsjax.low_precision(rmsjax.sgd(0.1))
    state = plain.init(params)
    # checked before the gradient is widened to float32: a complex gradient would lose its
    # imaginary part, a shape mismatch would broadcast or fail inside jax
    with pytest.raises(ValueError, match=r"updates\['w'\] is complex64\[3\], params\['w'\] is bfloat16"):
        plain.update({"w": jnp.ones(3, jnp.complex64)}, state, params)
    with pytest.raises(ValueError, match=r"updates\['w'\] is float32\[1\], params\['w'\] is bfloat16\[3\]"):
        plain.update({"w": jnp.ones(1)}, state, params)
    with pytest.raises(ValueError, match=r"updates\['x'\] has no counterpart"):
        plain.update({"w": jnp.ones(3), "x": jnp.ones(1)}, state, params)
    with pytest.raises(TypeError, match="low_precision: expected a LowPrecisionState"):
        plain.update(params, optax.EmptyState(), params)
    with pytest.raises(TypeError, match="compensated"):
        rmsjax.low_precision(rmsjax.adam(1e-3), compensated="yes")  # pyright: ignore[reportArgumentType]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_only_non_sterbenz_updates_miss_and_by_at_most_an_ulp_of_the_update(dtype):
    """The docs said only a step below half the parameter (or across zero) misses, by half an
    ulp of the update: a step past twice it misses too (4 + 1028 -> 1024, not 1032, a whole ulp
    of the update 1024). ``compensated`` rounds to nearest, so the target is known."""
    tx = rmsjax.low_precision(optax.identity(), compensated=True)
    if dtype == jnp.bfloat16:  # the docstring's example (1028 is a float16 number)
        p = {"w": jnp.asarray([4.0, -4.0], dtype)}
        new, _ = _apply(tx, p, {"w": jnp.asarray([1028.0, -1028.0])}, tx.init(p))
        np.testing.assert_array_equal(np.asarray(new["w"].astype(jnp.float32)), [1024.0, -1024.0])

    rng = np.random.default_rng(1)
    n = 1 << 14
    p16 = jnp.asarray(rng.standard_normal(n) * 10.0 ** rng.uniform(-2, 1, n), dtype)
    pf = np.asarray(p16.astype(jnp.float32))
    u = (pf * 10.0 ** rng.uniform(-3, 3, n) * rng.choice([-1, 1], n)).astype(np.float32)
    updates, _ = jax.jit(tx.update)({"w": jnp.asarray(u)}, tx.init({"w": p16}), {"w": p16})
    landed = np.asarray(optax.apply_updates({"w": p16}, updates)["w"].astype(jnp.float32))
    target = np.asarray(jnp.asarray(pf + u).astype(dtype).astype(jnp.float32))  # nearest
    step = np.abs(np.asarray(updates["w"]))
    ulp = np.nextafter(step, np.asarray(np.inf, step.dtype)).astype(np.float32) - step.astype(np.float32)
    same_side = np.sign(target) == np.sign(pf)
    sterbenz = same_side & (np.abs(target) <= 2 * np.abs(pf)) & (np.abs(pf) <= 2 * np.abs(target))
    miss = landed != target
    assert not (miss & sterbenz).any()
    grow = same_side & (np.abs(target) > 2 * np.abs(pf))
    assert (miss & grow).sum() > 50  # the case the docs left out
    assert (np.abs(landed - target)[miss] <= ulp[miss]).all()
    assert (np.abs(landed - target)[miss] > ulp[miss] / 2).any()  # not half an ulp
