"""Numerical edge cases and the non-finite-gradient policy, for every optimizer.

* A NaN or Inf gradient under ``optax.apply_if_finite`` leaves the parameters and every
  state array bit-for-bit unchanged, and training carries on exactly as if the bad step
  had never been offered. Without the wrapper, the NaN stays confined to the elements it
  hit, but it stays there for good (measured below).
* Zero gradients with ``eps = 0`` give a zero step (0/0 is taken as 0), not NaN.
* Gradients whose square overflows the state give no NaN steps: a float16/bfloat16 second
  moment saturates at its maximum and decays again afterwards; a float32 one stores inf,
  and that element's step is 0.
* float16 and bfloat16 parameters with float32 state, a bfloat16 second moment, the step
  counter at int32's maximum, and complex parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reliability_cases import OPTIMIZERS, assert_bitwise_equal, gradient, make_params

import rmsjax
from rmsjax import averages
from rmsjax.compat import keras as kc
from rmsjax.compat import tf1
from rmsjax.compat import torch as pt

NAMES = sorted(OPTIMIZERS)
F32_MAX = float(jnp.finfo(jnp.float32).max)


def _finite(tree) -> bool:
    return all(
        bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)
    )


def _poisoned(grads, value):
    return {"w": grads["w"].at[1, 2].set(value), "b": grads["b"]}


# ---------------------------------------------------------------- non-finite gradients


@pytest.mark.parametrize("name", NAMES)
def test_apply_if_finite_skips_bad_steps_bit_for_bit(name):
    tx = optax.apply_if_finite(OPTIMIZERS[name](), max_consecutive_errors=5)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = make_params()
    state = tx.init(params)
    clean_params, clean_state = params, state
    for k in range(3):  # the same good steps on both runs
        params, state = step(params, state, gradient(params, k))
        clean_params, clean_state = step(clean_params, clean_state, gradient(clean_params, k))
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        before_params, before_inner = params, state.inner_state
        params, state = step(params, state, _poisoned(gradient(params, 3), bad))
        assert_bitwise_equal(params, before_params)
        assert_bitwise_equal(state.inner_state, before_inner)  # every state array, counters included
    assert int(state.total_notfinite) == 3 and int(state.notfinite_count) == 3
    for k in range(3, 6):  # ...and it carries on as if the bad steps had never been offered
        params, state = step(params, state, gradient(params, k))
        clean_params, clean_state = step(clean_params, clean_state, gradient(clean_params, k))
    assert int(state.notfinite_count) == 0
    assert_bitwise_equal(params, clean_params)
    assert_bitwise_equal(state.inner_state, clean_state.inner_state)


def test_apply_if_finite_gives_up_after_max_consecutive_errors():
    tx = optax.apply_if_finite(rmsjax.rmsprop(0.01), max_consecutive_errors=2)
    params = make_params()
    state = tx.init(params)
    bad = _poisoned(gradient(params, 0), jnp.nan)
    for _ in range(2):
        updates, state = tx.update(bad, state, params)
        assert _finite(updates)
    updates, state = tx.update(bad, state, params)  # the third in a row goes through
    assert not _finite(updates)


@pytest.mark.parametrize("name", NAMES)
def test_nan_without_the_wrapper_is_confined_but_permanent(name):
    # Measured policy without apply_if_finite: every rmsjax transformation works element by
    # element, so a NaN in one gradient element makes exactly that element's update and
    # state NaN; it then never recovers (a leaky average of NaN is NaN), while every other
    # element follows the clean trajectory exactly.
    tx = OPTIMIZERS[name]()
    params = make_params()
    dirty_params, dirty_state = params, tx.init(params)
    clean_params, clean_state = params, tx.init(params)
    for k in range(4):
        grads = gradient(dirty_params, k)
        if k == 0:
            grads = _poisoned(grads, jnp.nan)
        updates, dirty_state = tx.update(grads, dirty_state, dirty_params)
        dirty_params = optax.apply_updates(dirty_params, updates)
        clean_updates, clean_state = tx.update(gradient(clean_params, k), clean_state, clean_params)
        clean_params = optax.apply_updates(clean_params, clean_updates)
    nan_mask = np.zeros((3, 4), bool)
    nan_mask[1, 2] = True
    np.testing.assert_array_equal(np.isnan(dirty_params["w"]), nan_mask)
    np.testing.assert_array_equal(dirty_params["w"][~nan_mask], clean_params["w"][~nan_mask])
    np.testing.assert_array_equal(dirty_params["b"], clean_params["b"])


@pytest.mark.parametrize("name", NAMES)
def test_inf_without_the_wrapper_gives_a_non_finite_step_there_only(name):
    # SGD steps by -lr * inf. An adaptive method's second moment becomes inf as well, so its
    # step is inf/inf = NaN, as in PyTorch and optax (float32 states store what they compute).
    tx = OPTIMIZERS[name]()
    params = make_params()
    for bad, expected in ((jnp.inf, -np.inf), (-jnp.inf, np.inf)):
        updates, _ = tx.update(_poisoned(gradient(params, 0), bad), tx.init(params), params)
        step = float(updates["w"][1, 2])
        if "sgd" in name.lower():
            assert step == expected
        else:
            assert np.isnan(step), step
        others = np.delete(np.asarray(updates["w"]).ravel(), 1 * 4 + 2)
        assert np.all(np.isfinite(others)) and bool(jnp.all(jnp.isfinite(updates["b"])))


# ---------------------------------------------------------------- zero gradients with eps = 0

EPS_ZERO = {
    "rmsprop": lambda: rmsjax.rmsprop(0.1, eps=0.0),
    "rmsprop_centered": lambda: rmsjax.rmsprop(0.1, eps=0.0, centered=True, momentum=0.9),
    "rmsprop_eps_in_sqrt": lambda: rmsjax.rmsprop(0.1, eps=0.0, eps_in_sqrt=True),
    "rmsprop_debias": lambda: rmsjax.rmsprop(0.1, eps=0.0, bias_correction=True),
    "adagrad": lambda: rmsjax.adagrad(0.1, eps=0.0),
    "adam": lambda: rmsjax.adam(0.1, eps=0.0),
    "adam_nesterov": lambda: rmsjax.adam(0.1, eps=0.0, nesterov=True),
    "adamw": lambda: rmsjax.adamw(0.1, eps=0.0, weight_decay=0.0),
    "adadelta": lambda: rmsjax.adadelta(1.0, eps=0.0),
    "torch.RMSprop": lambda: pt.RMSprop(eps=0.0, centered=True),
    "torch.Adam": lambda: pt.Adam(eps=0.0, amsgrad=True),
    "keras.RMSprop": lambda: kc.RMSprop(epsilon=0.0),
    "keras.Adam": lambda: kc.Adam(epsilon=0.0),
    "keras.Adagrad": lambda: kc.Adagrad(initial_accumulator_value=0.0, epsilon=0.0),
    "tf1.RMSPropOptimizer": lambda: tf1.RMSPropOptimizer(0.1, epsilon=0.0, centered=True),
}


@pytest.mark.parametrize("name", sorted(EPS_ZERO))
def test_zero_gradient_with_eps_zero_is_a_zero_step(name):
    tx = EPS_ZERO[name]()
    params = make_params()
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    for _ in range(2):
        updates, state = tx.update(zeros, state, params)
        for leaf in jax.tree.leaves(updates):
            np.testing.assert_array_equal(leaf, 0.0)
        assert _finite(state)
    updates, state = tx.update(gradient(params, 0), state, params)  # and then it moves normally
    assert _finite(updates) and _finite(state)


def test_rmsprop_after_zero_gradients_with_eps_zero_takes_the_full_step():
    tx = rmsjax.rmsprop(1.0, decay=0.9, eps=0.0)
    params = jnp.zeros(2)
    state = tx.init(params)
    updates, state = tx.update(jnp.zeros(2), state, params)
    updates, state = tx.update(jnp.array([2.0, -3.0]), state, params)
    np.testing.assert_allclose(updates, [-(0.1**-0.5), 0.1**-0.5], rtol=1e-6)  # -g / sqrt(0.1 g^2)


def test_zero_over_zero_rule_changes_no_nonzero_quotient():
    # The 0/0 guard must give exactly the plain quotient wherever the denominator is not 0.
    rng = np.random.default_rng(1)
    g = jnp.asarray(rng.normal(size=1000), jnp.float32)
    v = jnp.asarray(rng.exponential(size=1000), jnp.float32)
    for eps, eps_root in ((1e-8, 0.0), (0.0, 1e-7), (0.0, 0.0)):
        plain = g / (jnp.sqrt(v + jnp.float32(eps_root)) + jnp.float32(eps))
        np.testing.assert_array_equal(averages.divide_by_root(g, v, eps=eps, eps_root=eps_root), plain)
    a = jnp.asarray(rng.exponential(size=1000), jnp.float32)
    plain = g * (jnp.sqrt(a + jnp.float32(1e-6)) / jnp.sqrt(v + jnp.float32(1e-6)))
    np.testing.assert_array_equal(averages.multiply_by_root_ratio(g, a, v, eps=1e-6), plain)


def test_nan_still_propagates_through_the_guards():
    nan = jnp.array([jnp.nan])
    assert jnp.isnan(averages.divide_by_root(nan, nan, eps=0.0))[0]
    assert jnp.isnan(averages.divide_by_root(jnp.ones(1), nan, eps=0.0))[0]
    assert jnp.isnan(averages.update_leaky_average(jnp.zeros(1), nan, 0.9, order=2))[0]
    assert jnp.isnan(averages.update_running_sum(jnp.zeros(1), nan, order=2))[0]


# ---------------------------------------------------------------- gradients whose square overflows


# Configurations whose formulas subtract or extrapolate an overflowed moment (centred
# variance nu - mu**2 = inf - inf; Nesterov's look-ahead of a bias-corrected 3e38): there, as
# in optax and PyTorch, the overflowing elements may step by NaN (PyTorch's exact Adam factor lets a
# bias-corrected 3e38 round to inf, and inf/inf is NaN). Clipping the gradients
# first (``optax.clip``) is the remedy, checked below.
MAY_BE_NAN_WHERE_OVERFLOWED = {
    "rmsprop_centered", "adam_nesterov", "torch.RMSprop", "torch.Adam", "torch.AdamW", "tf1.RMSPropOptimizer",
    "keras.Nadam", "keras.AdamW",
}


@pytest.mark.parametrize("name", NAMES)
def test_overflowing_gradient_squares_stay_in_their_elements(name):
    tx = OPTIMIZERS[name]()
    params = make_params()
    huge = {
        "w": jnp.full((3, 4), 1e20, jnp.float32).at[0].set(-3e38).at[1].set(2e19),
        "b": jnp.array([1.0, -1.0, 1e25, -F32_MAX], jnp.float32),
    }
    assert not bool(jnp.all(jnp.isfinite(jnp.square(huge["w"]))))  # g**2 does overflow
    updates, state = tx.update(huge, tx.init(params), params)
    if name not in MAY_BE_NAN_WHERE_OVERFLOWED:
        assert not any(bool(jnp.any(jnp.isnan(u))) for u in jax.tree.leaves(updates))
        for leaf in jax.tree.leaves(state):
            if jnp.issubdtype(leaf.dtype, jnp.inexact):
                assert not bool(jnp.any(jnp.isnan(leaf)))
    if "sgd" not in name.lower():  # adaptive methods: the moderate elements are unaffected
        small = tx.update(
            {"w": jnp.ones((3, 4)), "b": jnp.array([1.0, -1.0, 1.0, 1.0])}, tx.init(params), params
        )[0]
        np.testing.assert_array_equal(updates["b"][:2], small["b"][:2])
    clipped = optax.chain(optax.clip(1e15), tx)
    updates, _ = clipped.update(huge, clipped.init(params), params)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_saturated_second_moment_decays_again():
    # A float16 second moment (computed in float32) saturates at float16's maximum when
    # g**2 exceeds it, keeps the step finite, and decays again afterwards.
    f16_max = float(jnp.finfo(jnp.float16).max)
    tx = rmsjax.scale_by_rms(decay=0.5, eps=0.0, state_dtype=jnp.float16)
    state = tx.init(jnp.zeros(1, jnp.float32))
    updates, state = tx.update(jnp.array([1e3]), state)
    assert float(state.nu[0]) == f16_max and np.isfinite(updates[0]) and updates[0] > 0
    for _ in range(12):
        updates, state = tx.update(jnp.array([1.0]), state)
    assert float(state.nu[0]) < f16_max / 1000 and np.isfinite(updates[0]) and updates[0] > 0


def test_float32_second_moment_is_stored_as_computed():
    # No saturation in the compute dtype itself (as optax and PyTorch): an overflowing square
    # stores inf, and that element's step g / inf is 0.
    tx = rmsjax.scale_by_rms(decay=0.5, eps=0.0)
    updates, state = tx.update(jnp.array([1e30, 1.0]), tx.init(jnp.zeros(2)))
    assert np.isposinf(float(state.nu[0])) and float(updates[0]) == 0.0
    assert float(updates[1]) == pytest.approx(2**0.5)


def test_leaky_average_uses_the_correctly_rounded_complement():
    # 1 - decay is rounded once from the double, as optax and PyTorch do; f32(1) - f32(decay)
    # would be off by 1.3e-5 (0.999) and 1.7e-4 (0.9999) relative. Reference: NumPy float32.
    rng = np.random.default_rng(2)
    s = rng.exponential(size=500).astype(np.float32)
    g = (rng.normal(size=500) * 1e3).astype(np.float32)
    for decay in (0.9, 0.999, 0.9999):
        keep, take = np.float32(decay), np.float32(1.0 - decay)
        assert take != np.float32(1) - np.float32(decay)
        expected = keep * s + take * (g * g)
        np.testing.assert_array_equal(
            averages.update_leaky_average(jnp.asarray(s), jnp.asarray(g), decay, order=2), expected
        )
        np.testing.assert_array_equal(
            averages.update_leaky_average(jnp.asarray(s), jnp.asarray(g), decay, order=1), keep * s + take * g
        )
    np.testing.assert_array_equal(
        averages.update_running_sum(jnp.asarray(s), jnp.asarray(g), order=2), s + g * g
    )


# ---------------------------------------------------------------- low-precision parameters


def _scaling_state(state):
    """The first part of a chain's state with moments (the scaling's, before any momentum)."""
    return next(part for part in state if hasattr(part, "nu") or hasattr(part, "mu"))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: rmsjax.rmsprop(0.05, state_dtype=jnp.float32),
        lambda: rmsjax.rmsprop(0.05, centered=True, momentum=0.5, state_dtype=jnp.float32),
        lambda: optax.chain(rmsjax.scale_by_adam(state_dtype=jnp.float32), optax.scale(-0.05)),
        lambda: optax.chain(
            rmsjax.leaky_average(0.9, debias=True, state_dtype=jnp.float32), optax.scale(-0.05)
        ),
    ],
    ids=["rmsprop", "rmsprop_centered_momentum", "scale_by_adam", "leaky_average"],
)
def test_low_precision_params_with_float32_state(dtype, make):
    tx = make()
    target = jnp.asarray([1.0, -2.0, 0.5], dtype)
    params = jnp.zeros(3, dtype)
    state = tx.init(params)
    moments = _scaling_state(state)  # what state_dtype governs (not a momentum buffer)
    moment_dtypes = {x.dtype for x in jax.tree.leaves(moments) if x.shape == (3,)}
    assert moment_dtypes == {jnp.dtype(jnp.float32)}, moment_dtypes

    @jax.jit
    def step(params, state):
        updates, state = tx.update(params - target, state, params)
        return optax.apply_updates(params, updates), state, updates.dtype == params.dtype

    for _ in range(120):
        params, state, same_dtype = step(params, state)
        assert params.dtype == dtype and bool(same_dtype)
    assert {x.dtype for x in jax.tree.leaves(_scaling_state(state)) if x.shape == (3,)} == moment_dtypes
    np.testing.assert_allclose(params.astype(jnp.float32), target.astype(jnp.float32), atol=0.1)


def test_float16_gradients_beyond_the_float16_square_need_float32_state():
    # |g| = 1000 squares to 1e6 > float16's max 65504: a float16 second moment saturates (and
    # the step is too large); a float32 one keeps RMSprop's first step -lr * sign(g)/sqrt(1-decay).
    params = jnp.zeros(2, jnp.float16)
    grads = jnp.array([1000.0, -1000.0], jnp.float16)
    narrow = rmsjax.rmsprop(1.0, decay=0.9)
    wide = rmsjax.rmsprop(1.0, decay=0.9, state_dtype=jnp.float32)
    narrow_updates, narrow_state = narrow.update(grads, narrow.init(params), params)
    wide_updates, _ = wide.update(grads, wide.init(params), params)
    assert optax.tree.get(narrow_state, "nu").dtype == jnp.float16
    np.testing.assert_array_equal(optax.tree.get(narrow_state, "nu"), 65504.0)
    assert bool(jnp.all(jnp.isfinite(narrow_updates)))
    np.testing.assert_allclose(wide_updates.astype(jnp.float32), [-(0.1**-0.5), 0.1**-0.5], rtol=2e-3)


def test_bfloat16_second_moment_is_close_to_float32():
    params = make_params(3)
    wide, narrow = rmsjax.rmsprop(0.01), rmsjax.rmsprop(0.01, state_dtype=jnp.bfloat16)
    wide_state, narrow_state = wide.init(params), narrow.init(params)
    assert {x.dtype for x in jax.tree.leaves(optax.tree.get(narrow_state, "nu"))} == {jnp.dtype(jnp.bfloat16)}
    p_wide = p_narrow = params
    for k in range(50):
        u, wide_state = wide.update(gradient(p_wide, k), wide_state, p_wide)
        p_wide = optax.apply_updates(p_wide, u)
        u, narrow_state = narrow.update(gradient(p_narrow, k), narrow_state, p_narrow)
        assert u["w"].dtype == jnp.float32
        p_narrow = optax.apply_updates(p_narrow, u)
    # bfloat16 keeps 8 bits of mantissa: the root of nu is off by up to ~0.2%, so the
    # trajectories drift apart slowly but stay close.
    for a, b in zip(jax.tree.leaves(p_wide), jax.tree.leaves(p_narrow)):
        np.testing.assert_allclose(a, b, atol=5e-3)


# ---------------------------------------------------------------- the step counter at int32's maximum

INT32_MAX = int(jnp.iinfo(jnp.int32).max)


def _counters(state):
    return [x for x in jax.tree.leaves(state) if x.dtype == jnp.int32]


# SGD with a constant rate and no dampening reads no step count, so it keeps none (as optax.sgd).
KEEP_NO_COUNTER = {"keras.SGD", "sgd", "sgd_nesterov"}


def test_only_constant_rate_sgd_keeps_no_counter():
    counterless = {n for n in NAMES if not _counters(OPTIMIZERS[n]().init(make_params()))}
    assert counterless == KEEP_NO_COUNTER


@pytest.mark.parametrize("name", [n for n in NAMES if n not in KEEP_NO_COUNTER])
def test_counter_at_int32_max_saturates(name):
    tx = OPTIMIZERS[name]()
    params = make_params()
    state = tx.init(params)
    for k in range(2):  # fill the moments first
        updates, state = tx.update(gradient(params, k), state, params)
    state = jax.tree.map(lambda x: jnp.full_like(x, INT32_MAX) if x.dtype == jnp.int32 else x, state)
    for k in range(2):
        updates, state = tx.update(gradient(params, k), state, params)
        assert _finite(updates) and _finite(state)
    counts = [int(x) for x in _counters(state)]
    assert counts and all(c == INT32_MAX for c in counts), counts


def test_bias_correction_at_int32_max_is_one():
    # 1 - b**t = 1 at t = 2**31 - 1, so Adam's step is mu / (sqrt(nu) + eps) there.
    tx = rmsjax.scale_by_adam(b1=0.9, b2=0.999, eps=0.0)
    state = tx.init(jnp.zeros(2))
    state = state._replace(
        count=jnp.asarray(INT32_MAX, jnp.int32), mu=jnp.array([1.0, -2.0]), nu=jnp.array([4.0, 9.0])
    )
    grads = jnp.array([3.0, 1.0])
    updates, new_state = tx.update(grads, state)
    # Closed form from the inputs, in float64 (float32 rounds each of these by < 1e-7).
    mu = 0.9 * np.array([1.0, -2.0]) + 0.1 * np.array([3.0, 1.0])  # [1.2, -1.7]
    nu = 0.999 * np.array([4.0, 9.0]) + 0.001 * np.array([9.0, 1.0])  # [4.005, 8.992]
    np.testing.assert_allclose(new_state.mu, mu, rtol=1e-6)
    np.testing.assert_allclose(new_state.nu, nu, rtol=1e-6)
    np.testing.assert_allclose(updates, mu / np.sqrt(nu), rtol=1e-6)  # both bias factors are 1
    assert int(new_state.count) == INT32_MAX


# ---------------------------------------------------------------- complex parameters


# One per family and per way of handling complex numbers (|g|**2 in rmsjax and Keras, two
# reals in compat.torch), to keep the file fast.
COMPLEX_NAMES = [
    "rmsprop_centered",
    "rmsprop_nesterov",
    "adagrad",
    "adam_nesterov",
    "adamw",
    "adadelta_l2",
    "sgd_nesterov",
    "torch.RMSprop",
    "torch.Adam",
    "torch.SGD",
    "keras.RMSprop",
    "tf1.RMSPropOptimizer",
]


@pytest.mark.parametrize("name", COMPLEX_NAMES)
def test_complex_parameters(name):
    tx = OPTIMIZERS[name]()
    target = jnp.array([1.0 + 2.0j, -0.5 + 0.25j, 0.0 - 1.0j], jnp.complex64)
    params = {"z": jnp.zeros(3, jnp.complex64), "x": jnp.ones(2, jnp.float32)}
    state = tx.init(params)

    def distance(p):
        return float(jnp.sum(jnp.abs(p["z"] - target) ** 2) + jnp.sum(p["x"] ** 2))

    start = distance(params)
    update = jax.jit(tx.update)
    for _ in range(15):
        grads = {"z": 2 * (params["z"] - target), "x": 2 * params["x"]}  # conj. Wirtinger gradient
        updates, state = update(grads, state, params)
        assert updates["z"].dtype == jnp.complex64 and updates["x"].dtype == jnp.float32
        params = optax.apply_updates(params, updates)
    assert params["z"].dtype == jnp.complex64
    assert _finite(params) and _finite(state)
    assert distance(params) < start


def test_complex_second_moment_is_real_and_uses_the_modulus():
    tx = rmsjax.scale_by_rms(decay=0.0, eps=0.0)
    state = tx.init(jnp.zeros(2, jnp.complex64))
    assert state.nu.dtype == jnp.float32
    grads = jnp.array([3.0 + 4.0j, -1.0j], jnp.complex64)
    updates, state = tx.update(grads, state)
    np.testing.assert_allclose(state.nu, [25.0, 1.0])
    unit = grads / jnp.abs(grads).astype(jnp.complex64)
    np.testing.assert_allclose(updates, unit, rtol=1e-6)  # unit modulus, same phase


@pytest.mark.parametrize(
    "make",
    [
        lambda dtype: rmsjax.scale_by_adam(state_dtype=dtype),
        lambda dtype: rmsjax.scale_by_adam(nesterov=True, state_dtype=dtype),
        lambda dtype: rmsjax.scale_by_stddev(state_dtype=dtype),
        lambda dtype: rmsjax.leaky_average(0.9, state_dtype=dtype),
    ],
    ids=["adam", "adam_nesterov", "stddev", "leaky_average"],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_a_real_state_dtype_keeps_a_complex_first_moment_complex(make, dtype):
    # state_dtype sets the storage precision; a complex parameter's first moment stays complex
    # (complex64 for float32 and the 16-bit floats). It used to be stored real, and the
    # imaginary part of every update was dropped without a word.
    params = jnp.zeros(2, jnp.complex64)
    grads = jnp.array([1.0 + 1.0j, -1.5 + 1.0j], jnp.complex64)
    ref, tx = make(None), make(dtype)
    state, ref_state = tx.init(params), ref.init(params)
    assert state.mu.dtype == jnp.complex64
    for _ in range(3):
        ours, state = tx.update(grads, state, params)
        theirs, ref_state = ref.update(grads, ref_state, params)
    tolerance = 1e-6 if dtype == jnp.float32 else 2e-2  # bfloat16 nu (the stddev's and Adam's)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=tolerance)
    assert np.all(np.abs(np.asarray(ours).imag) > 0.1)
