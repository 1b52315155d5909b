"""Tests of rmsjax.diagnostics against NumPy recomputations of the formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import rmsjax

RNG = np.random.default_rng(0)
GRADS = [
    {"w": RNG.normal(size=(3, 2)).astype(np.float32), "b": RNG.normal(size=(2,)).astype(np.float32)}
    for _ in range(5)
]
PARAMS = {"w": np.zeros((3, 2), np.float32), "b": np.zeros((2,), np.float32)}


def run(tx: optax.GradientTransformation, grads=GRADS, params=PARAMS):
    params = jax.tree.map(jnp.asarray, params)
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, updates)
    return state


def numpy_nu(decay: float | None, grads=GRADS, initial: float = 0.0):
    """Leaky average (decay given) or running sum (decay None) of g**2, in float64."""
    nu = {k: np.full(v.shape, initial, np.float64) for k, v in PARAMS.items()}
    for g in grads:
        for k in nu:
            g2 = np.asarray(g[k], np.float64) ** 2
            nu[k] = g2 + nu[k] if decay is None else decay * nu[k] + (1 - decay) * g2
    return nu


def assert_tree_close(actual, expected, rtol=1e-5):
    assert set(actual) == set(expected)
    for k in expected:
        np.testing.assert_allclose(np.asarray(actual[k]), expected[k], rtol=rtol)


def assert_summary(eff, expected):
    flat = np.concatenate([np.ravel(v) for v in expected.values()])
    np.testing.assert_allclose(float(eff.min), flat.min(), rtol=1e-5)
    np.testing.assert_allclose(float(eff.median), np.median(flat), rtol=1e-5)
    np.testing.assert_allclose(float(eff.mean), flat.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(eff.max), flat.max(), rtol=1e-5)


def test_rmsprop_eps_outside_and_summary():
    eff = rmsjax.effective_learning_rate(run(rmsjax.rmsprop(0.01, decay=0.9, eps=1e-3)), eps=1e-3)
    expected = {k: 0.01 / (np.sqrt(v) + 1e-3) for k, v in numpy_nu(0.9).items()}
    assert_tree_close(eff.per_leaf, expected)
    assert_summary(eff, expected)
    assert isinstance(eff, rmsjax.EffectiveLearningRate)
    assert eff.per_leaf["w"].dtype == jnp.float32 and eff.median.shape == ()


def test_rmsprop_eps_in_sqrt_d2l_form():
    tx = rmsjax.rmsprop(0.4, decay=0.9, eps=1e-6, eps_in_sqrt=True)
    eff = rmsjax.effective_learning_rate(run(tx), eps=1e-6, eps_in_sqrt=True)
    expected = {k: 0.4 / np.sqrt(v + 1e-6) for k, v in numpy_nu(0.9).items()}
    assert_tree_close(eff.per_leaf, expected)


def test_adagrad_running_sum():
    eff = rmsjax.effective_learning_rate(run(rmsjax.adagrad(0.1, initial_accumulator_value=0.1)),
                                         eps=1e-10)
    expected = {k: 0.1 / (np.sqrt(v) + 1e-10) for k, v in numpy_nu(None, initial=0.1).items()}
    assert_tree_close(eff.per_leaf, expected)


def test_adagrad_rate_only_shrinks_rmsprop_recovers():
    """The seeds' claim in numbers: with small gradients after big ones AdaGrad stays slow."""
    big = [{k: np.full(v.shape, 10.0, np.float32) for k, v in PARAMS.items()}] * 5
    small = [{k: np.full(v.shape, 0.1, np.float32) for k, v in PARAMS.items()}] * 50
    ada = [rmsjax.effective_learning_rate(run(rmsjax.adagrad(0.1), g)).mean for g in (big, big + small)]
    rms = [rmsjax.effective_learning_rate(run(rmsjax.rmsprop(0.1), g)).mean for g in (big, big + small)]
    assert float(ada[1]) < float(ada[0])
    assert float(rms[1]) > 10 * float(rms[0])


def test_adam_bias_correction():
    state = run(rmsjax.adam(1e-3, b2=0.99, eps=1e-8))
    eff = rmsjax.effective_learning_rate(state, eps=1e-8, decay=0.99)
    t = len(GRADS)
    expected = {k: 1e-3 / (np.sqrt(v / (1 - 0.99**t)) + 1e-8) for k, v in numpy_nu(0.99).items()}
    assert_tree_close(eff.per_leaf, expected)
    raw = rmsjax.effective_learning_rate(state, eps=1e-8)
    expected_raw = {k: 1e-3 / (np.sqrt(v) + 1e-8) for k, v in numpy_nu(0.99).items()}
    assert_tree_close(raw.per_leaf, expected_raw)


def test_centered_rmsprop_uses_variance():
    state = run(rmsjax.rmsprop(0.01, decay=0.9, eps=1e-3, centered=True))
    eff = rmsjax.effective_learning_rate(state, eps=1e-3, centered=True)
    mean = {k: np.zeros(v.shape) for k, v in PARAMS.items()}
    for g in GRADS:
        for k in mean:
            mean[k] = 0.9 * mean[k] + 0.1 * np.asarray(g[k], np.float64)
    expected = {k: 0.01 / (np.sqrt(v - mean[k] ** 2) + 1e-3) for k, v in numpy_nu(0.9).items()}
    assert_tree_close(eff.per_leaf, expected, rtol=1e-4)


def test_adadelta_ratio_of_roots():
    rho, eps = 0.9, 1e-6
    state = run(rmsjax.adadelta(1.0, rho=rho, eps=eps))
    nu = {k: np.zeros(v.shape) for k, v in PARAMS.items()}
    delta = {k: np.zeros(v.shape) for k, v in PARAMS.items()}
    for g in GRADS:
        for k in nu:
            g64 = np.asarray(g[k], np.float64)
            nu[k] = rho * nu[k] + (1 - rho) * g64**2
            u = np.sqrt(delta[k] + eps) / np.sqrt(nu[k] + eps) * g64
            delta[k] = rho * delta[k] + (1 - rho) * u**2
    eff = rmsjax.effective_learning_rate(state, eps=eps)
    expected = {k: np.sqrt(delta[k] + eps) / np.sqrt(nu[k] + eps) for k in nu}
    assert_tree_close(eff.per_leaf, expected, rtol=1e-4)


def test_learning_rate_and_step_count_follow_a_schedule():
    schedule = optax.linear_schedule(0.1, 0.0, transition_steps=10)
    state = run(rmsjax.rmsprop(schedule, momentum=0.9))
    assert int(rmsjax.step_count(state)) == 5
    assert rmsjax.step_count(state).dtype == jnp.int32
    np.testing.assert_allclose(float(rmsjax.learning_rate(state)), 0.05, rtol=1e-6)
    eff = rmsjax.effective_learning_rate(state)
    expected = {k: 0.05 / (np.sqrt(v) + 1e-8) for k, v in numpy_nu(0.9).items()}
    assert_tree_close(eff.per_leaf, expected)


def test_explicit_learning_rate_overrides_state():
    state = run(rmsjax.rmsprop(0.01))
    eff = rmsjax.effective_learning_rate(state, learning_rate=2.0)
    expected = {k: 2.0 / (np.sqrt(v) + 1e-8) for k, v in numpy_nu(0.9).items()}
    assert_tree_close(eff.per_leaf, expected)


WRAPPERS = {
    "chain": lambda tx: optax.chain(optax.clip_by_global_norm(100.0), tx),
    "multi_steps": lambda tx: optax.MultiSteps(tx, every_k_schedule=1),
    "apply_if_finite": lambda tx: optax.apply_if_finite(tx, max_consecutive_errors=3),
    "masked_all": lambda tx: optax.masked(tx, {"w": True, "b": True}),
}


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_wrapped_states(wrapper):
    # optax.MultiSteps itself mixes int32 and float32, so it needs standard promotion.
    with jax.numpy_dtype_promotion("standard" if wrapper == "multi_steps" else "strict"):
        state = run(WRAPPERS[wrapper](rmsjax.rmsprop(0.01, eps=1e-3)))
    eff = rmsjax.effective_learning_rate(state, eps=1e-3)
    assert_tree_close(eff.per_leaf, {k: 0.01 / (np.sqrt(v) + 1e-3) for k, v in numpy_nu(0.9).items()})
    assert int(rmsjax.step_count(state)) == len(GRADS)
    np.testing.assert_allclose(float(rmsjax.learning_rate(state)), 0.01, rtol=1e-6)


def test_multi_steps_counts_outer_updates():
    with jax.numpy_dtype_promotion("standard"):  # optax.MultiSteps mixes int32 and float32
        state = run(optax.MultiSteps(rmsjax.adam(1e-3), every_k_schedule=2), GRADS[:4])
    assert int(rmsjax.step_count(state)) == 2


def test_masked_leaf_is_skipped_in_summary():
    state = run(optax.masked(rmsjax.rmsprop(0.01), {"w": True, "b": False}))
    eff = rmsjax.effective_learning_rate(state)
    assert isinstance(eff.per_leaf["b"], optax.MaskedNode)
    expected = {"w": 0.01 / (np.sqrt(numpy_nu(0.9)["w"]) + 1e-8)}
    np.testing.assert_allclose(np.asarray(eff.per_leaf["w"]), expected["w"], rtol=1e-5)
    np.testing.assert_allclose(float(eff.max), expected["w"].max(), rtol=1e-5)


def test_inject_hyperparams():
    tx = optax.inject_hyperparams(rmsjax.rmsprop)(learning_rate=0.03, decay=0.9)
    state = run(tx)
    np.testing.assert_allclose(float(rmsjax.learning_rate(state)), 0.03, rtol=1e-6)
    assert int(rmsjax.step_count(state)) == len(GRADS)
    state.hyperparams["learning_rate"] = jnp.asarray(0.5, jnp.float32)
    _, state = tx.update(jax.tree.map(jnp.asarray, GRADS[0]), state, jax.tree.map(jnp.asarray, PARAMS))
    np.testing.assert_allclose(float(rmsjax.learning_rate(state)), 0.5, rtol=1e-6)


def test_inject_hyperparams_fallback_without_rmsjax_rate_state():
    def factory(learning_rate):
        return optax.chain(rmsjax.scale_by_rms(), optax.scale(-learning_rate))

    state = optax.inject_hyperparams(factory)(learning_rate=0.2).init(jax.tree.map(jnp.asarray, PARAMS))
    np.testing.assert_allclose(float(rmsjax.learning_rate(state)), 0.2, rtol=1e-6)


def test_nnx_optimizer():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, rmsjax.rmsprop(0.01, eps=1e-3), wrt=nnx.Param)
    x = jnp.asarray(RNG.normal(size=(4, 3)).astype(np.float32))
    nu = {"kernel": np.zeros((3, 2)), "bias": np.zeros(2)}
    for _ in range(3):
        grads = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(model)
        for k in nu:
            nu[k] = 0.9 * nu[k] + 0.1 * np.asarray(grads[k][...], np.float64) ** 2
        optimizer.update(model, grads)
    expected = {k: 0.01 / (np.sqrt(v) + 1e-3) for k, v in nu.items()}
    for source in (optimizer, optimizer.opt_state):
        eff = rmsjax.effective_learning_rate(source, eps=1e-3)
        for k, v in expected.items():
            np.testing.assert_allclose(np.asarray(eff.per_leaf[k]), v, rtol=1e-5)
        assert int(rmsjax.step_count(source)) == 3
        np.testing.assert_allclose(float(rmsjax.learning_rate(source)), 0.01, rtol=1e-6)


def test_step_count_of_constant_rate_sgd():
    # rmsjax.sgd with a constant rate keeps no counter (as optax.sgd): asked for one, its
    # bare state says how to get one, an nnx.Optimizer answers with its own step, and
    # inject_hyperparams' state has its count.
    with pytest.raises(ValueError, match="no step count.*inject_hyperparams"):
        rmsjax.step_count(run(rmsjax.sgd(0.1, momentum=0.9)))
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, rmsjax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    x = jnp.ones((4, 3))
    for _ in range(2):
        optimizer.update(model, nnx.grad(lambda m: jnp.sum(m(x)))(model))
    assert int(rmsjax.step_count(optimizer)) == 2
    state = run(optax.inject_hyperparams(rmsjax.sgd)(learning_rate=0.1, momentum=0.9))
    assert int(rmsjax.step_count(state)) == len(GRADS)
    assert int(rmsjax.step_count(run(rmsjax.sgd(optax.constant_schedule(0.1))))) == len(GRADS)


def test_works_under_jit():
    state = run(rmsjax.rmsprop(0.01))
    eff = jax.jit(lambda s: rmsjax.effective_learning_rate(s))(state)
    assert_tree_close(eff.per_leaf, {k: 0.01 / (np.sqrt(v) + 1e-8) for k, v in numpy_nu(0.9).items()})
    assert int(jax.jit(rmsjax.step_count)(state)) == len(GRADS)
    np.testing.assert_allclose(float(jax.jit(rmsjax.learning_rate)(state)), 0.01, rtol=1e-6)


def test_bfloat16_state_is_read_in_float32():
    tx = rmsjax.rmsprop(0.01, state_dtype=jnp.bfloat16)
    state = run(tx)
    eff = rmsjax.effective_learning_rate(state)
    assert eff.per_leaf["w"].dtype == jnp.float32
    expected = {k: 0.01 / (np.sqrt(v) + 1e-8) for k, v in numpy_nu(0.9).items()}
    assert_tree_close(eff.per_leaf, expected, rtol=2e-2)


def test_errors_name_what_is_missing():
    with pytest.raises(ValueError, match="no second-moment state.*'nu'"):
        rmsjax.effective_learning_rate(run(rmsjax.sgd(0.1, momentum=0.9)))
    with pytest.raises(ValueError, match="no learning rate"):
        rmsjax.effective_learning_rate(run(rmsjax.scale_by_rms()))
    with pytest.raises(ValueError, match="no learning rate"):
        rmsjax.learning_rate(run(rmsjax.scale_by_rms()))
    with pytest.raises(ValueError, match="no step count"):
        rmsjax.step_count(optax.EmptyState())
    with pytest.raises(ValueError, match="centered=True needs the mean gradient 'mu'"):
        rmsjax.effective_learning_rate(run(rmsjax.rmsprop(0.1)), centered=True)


def test_several_second_moments_or_rates_are_ambiguous():
    tx = optax.multi_transform({"a": rmsjax.rmsprop(0.1), "b": rmsjax.adagrad(0.2)},
                               {"w": "a", "b": "b"})
    state = run(tx)
    with pytest.raises(ValueError, match="2 second-moment states"):
        rmsjax.effective_learning_rate(state)
    with pytest.raises(ValueError, match="2 different learning rates"):
        rmsjax.learning_rate(state)
    # A single partition's sub-state answers.
    sub = state.inner_states["a"]
    eff = rmsjax.effective_learning_rate(sub)
    np.testing.assert_allclose(np.asarray(eff.per_leaf["w"]),
                               0.1 / (np.sqrt(numpy_nu(0.9)["w"]) + 1e-8), rtol=1e-5)


def test_amsgrad_uses_running_maximum():
    small = [{k: np.full(v.shape, 0.01, np.float32) for k, v in PARAMS.items()}] * 3
    grads = GRADS + small
    tx = optax.chain(rmsjax.scale_by_adam(b2=0.9, amsgrad=True),
                     rmsjax.transforms.scale_by_learning_rate(0.1))
    eff = rmsjax.effective_learning_rate(run(tx, grads), eps=1e-8)
    nu = {k: np.zeros(v.shape) for k, v in PARAMS.items()}
    nu_max = {k: np.zeros(v.shape) for k, v in PARAMS.items()}
    for g in grads:
        for k in nu:
            nu[k] = 0.9 * nu[k] + 0.1 * np.asarray(g[k], np.float64) ** 2
            nu_max[k] = np.maximum(nu_max[k], nu[k])
    assert_tree_close(eff.per_leaf, {k: 0.1 / (np.sqrt(v) + 1e-8) for k, v in nu_max.items()})


def test_centered_with_bias_correction():
    state = run(rmsjax.rmsprop(0.01, decay=0.9, eps=1e-3, centered=True, bias_correction=True))
    eff = rmsjax.effective_learning_rate(state, eps=1e-3, centered=True, decay=0.9)
    mean = {k: np.zeros(v.shape) for k, v in PARAMS.items()}
    for g in GRADS:
        for k in mean:
            mean[k] = 0.9 * mean[k] + 0.1 * np.asarray(g[k], np.float64)
    c = 1 - 0.9 ** len(GRADS)
    expected = {k: 0.01 / (np.sqrt(np.maximum(v / c - (mean[k] / c) ** 2, 0.0)) + 1e-3)
                for k, v in numpy_nu(0.9).items()}
    assert_tree_close(eff.per_leaf, expected, rtol=1e-4)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda tx: tx,
        lambda tx: rmsjax.low_precision(tx),
        lambda tx: rmsjax.quantized(tx, min_size=1),
        lambda tx: rmsjax.low_precision(rmsjax.quantized(tx, min_size=1)),
    ],
    ids=["plain", "low_precision", "quantized", "both"],
)
@pytest.mark.parametrize("inner", [lambda: rmsjax.adam(1e-3), lambda: rmsjax.sgd(0.1)], ids=["adam", "sgd"])
def test_step_count_under_multisteps_counts_real_updates_inside_rounding_wrappers(wrap, inner):
    # quantized and low_precision count every call (their count seeds the rounding); under
    # MultiSteps, step_count read that and gave the mini-steps (4 here instead of 2).
    tx = wrap(optax.MultiSteps(inner(), every_k_schedule=2))
    params = {"w": jnp.ones(4, jnp.bfloat16)}
    with jax.numpy_dtype_promotion("standard"):  # optax.MultiSteps mixes dtypes
        state = tx.init(params)
        for _ in range(5):
            _, state = tx.update({"w": jnp.ones(4, jnp.bfloat16)}, state, params)
    assert int(rmsjax.step_count(state)) == 2


def test_learning_rate_of_an_injected_torch_adagrad_with_lr_decay_is_decayed():
    # PyTorch's rate lr / (1 + t * lr_decay) after t updates: the plain state gave it, the
    # injected one gave the undecayed lr.
    from rmsjax.compat import torch as pt

    params, grads = {"w": jnp.ones(4)}, {"w": jnp.full(4, 0.5)}
    expected = 0.1 / (1 + 4 * 0.5)
    for tx in (pt.Adagrad(lr=0.1, lr_decay=0.5), optax.inject_hyperparams(pt.Adagrad)(lr=0.1, lr_decay=0.5)):
        state = tx.init(params)
        for _ in range(4):
            _, state = tx.update(grads, state, params)
        np.testing.assert_allclose(float(rmsjax.learning_rate(state)), expected, rtol=1e-6)
    state.hyperparams["lr"] = jnp.asarray(0.2)  # an edit shows at once
    np.testing.assert_allclose(float(rmsjax.learning_rate(state)), 2 * expected, rtol=1e-6)


def test_learning_rate_refuses_an_injected_rate_rescheduled_by_a_static_lr_decay():
    # With lr_decay in static_args the decay lives in the update function, not the state:
    # the injected lr (0.1) is not the next rate (0.1 / 3 after 4 updates), so no answer.
    from rmsjax.compat import torch as pt

    params, grads = {"w": jnp.ones(4)}, {"w": jnp.full(4, 0.5)}
    tx = optax.inject_hyperparams(pt.Adagrad, static_args=("lr_decay",))(lr=0.1, lr_decay=0.5)
    state = tx.init(params)
    np.testing.assert_allclose(float(rmsjax.learning_rate(state)), 0.1)  # nothing decayed yet
    for _ in range(4):
        _, state = tx.update(grads, state, params)
    with pytest.raises(ValueError, match="static_args"):
        rmsjax.learning_rate(state)
    # A static lr_decay of 0 (docs/porting.md's plain layout) schedules nothing: still read.
    plain = optax.inject_hyperparams(pt.Adagrad, static_args=("lr_decay", "weight_decay"))(lr=0.1)
    state = plain.init(params)
    _, state = plain.update(grads, state, params)
    np.testing.assert_allclose(float(rmsjax.learning_rate(state)), 0.1)


def test_optax_amsgrad_nu_max_is_not_bias_corrected_twice():
    # optax.amsgrad keeps the maximum of the bias-corrected nu (rmsjax's keeps that of nu): the
    # step divides by it as it is. With decay=b2, as for Adam, it was corrected a second time.
    tx = optax.amsgrad(0.1, b1=0.9, b2=0.999)
    params = jax.tree.map(jnp.asarray, PARAMS)
    with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes dtypes
        state = run(tx, GRADS[:4])
        updates, state = tx.update(jax.tree.map(jnp.asarray, GRADS[4]), state, params)
    amsgrad_state = state[0]
    mu_hat = jax.tree.map(lambda m: np.asarray(m, np.float64) / (1 - 0.9**5), amsgrad_state.mu)
    expected = jax.tree.map(lambda u, m: -np.asarray(u, np.float64) / m, updates, mu_hat)
    for decay in (0.999, None):
        eff = rmsjax.effective_learning_rate(state, learning_rate=0.1, decay=decay)
        assert_tree_close(eff.per_leaf, expected, rtol=1e-4)


def test_keras_adamax_infinity_norm_is_refused():
    # Keras's Adamax divides by an infinity norm (its 'nu'), not by the root of a second
    # moment: alpha / (sqrt(nu) + eps) was returned, silently wrong.
    from rmsjax.compat import keras as kc

    state = run(kc.Adamax(learning_rate=0.1))
    with pytest.raises(ValueError, match="infinity norm"):
        rmsjax.effective_learning_rate(state, eps=1e-7)


@pytest.mark.parametrize("factory", ["RMSprop", "Adam"])
def test_step_count_under_keras_gradient_accumulation_counts_real_updates(factory):
    # The accumulator's count is Keras's micro-step count: with a constant rate step_count read
    # it (8 after 8 micro-steps of 2), with a schedule the learning-rate step's (4).
    from rmsjax.compat import keras as kc

    make = getattr(kc, factory)
    for rate in (0.1, optax.linear_schedule(0.1, 0.01, 20)):
        state = run(make(learning_rate=rate, gradient_accumulation_steps=2), GRADS * 2)
        assert int(rmsjax.step_count(state)) == len(GRADS)
