"""rmsjax inside optax and Flax; equivalences that pin the composition; the seeds' claims."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import optax
import pytest
import registry

import rmsjax

# optax's own MultiSteps, adam and adamw mix Python floats with int32 counters, which strict
# promotion rejects; the tests that run optax's code relax it to "standard" for that code.
optax_promotion = jax.numpy_dtype_promotion("standard")

# name -> a factory of the learning rate (an argument called ``lr``, for inject_hyperparams)
OPTIMIZERS = {
    name: (lambda lr, case=case: case.with_rate(lr)) for name, case in registry.tagged("composition").items()
}


def _params(dtype=jnp.float32):
    return {k: jnp.asarray(v, dtype) for k, v in ref.INITIAL_PARAMS.items()}


def _run(tx, steps=20, params=None):
    params = _params() if params is None else params
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(ref.gradient(params, jnp), state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params, state


# ---------------------------------------------------------------- optax wrappers


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_chain_with_clip_by_global_norm(name):
    """Clipping first equals feeding the optimizer clipped gradients by hand."""
    max_norm = 0.5
    chained, _ = _run(optax.chain(optax.clip_by_global_norm(max_norm), OPTIMIZERS[name](0.05)))

    tx = OPTIMIZERS[name](0.05)
    params = _params()
    state = tx.init(params)
    for _ in range(20):
        grads = ref.gradient(params, jnp)
        norm = optax.tree.norm(grads)
        factor = jnp.minimum(jnp.ones_like(norm), max_norm / norm)
        grads = jax.tree.map(lambda g: g * factor, grads)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    chex.assert_trees_all_close(chained, params, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_schedule_equals_stepwise_constants(name):
    """A schedule gives, at step t, the same update as a constant rate schedule(t)."""
    schedule = optax.exponential_decay(0.1, transition_steps=1, decay_rate=0.8)
    scheduled = OPTIMIZERS[name](schedule)
    params = _params()
    state = scheduled.init(params)
    grads = ref.gradient(params, jnp)
    for step in range(4):
        updates, state = scheduled.update(grads, state, params)
        constant = OPTIMIZERS[name](float(schedule(step)))
        expected = _params()
        inner = constant.init(expected)
        for _ in range(step + 1):
            want, inner = constant.update(grads, inner, expected)
        chex.assert_trees_all_close(updates, want, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_inject_hyperparams_gives_the_same_numbers(name):
    plain, _ = _run(OPTIMIZERS[name](0.05))
    injected_tx = optax.inject_hyperparams(OPTIMIZERS[name])(lr=0.05)
    injected, state = _run(injected_tx)
    # atol: jax 0.8.0 compiles the two with a 1e-8 difference on an entry near 0.
    chex.assert_trees_all_close(plain, injected, rtol=1e-6, atol=1e-7)
    assert float(state.hyperparams["lr"]) == pytest.approx(0.05)


def test_inject_hyperparams_changes_rate_without_recompiling():
    tx = optax.inject_hyperparams(rmsjax.rmsprop)(learning_rate=0.1, momentum=0.9)
    params = _params()
    state = tx.init(params)
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)
        updates, state = tx.update(ref.gradient(params, jnp), state, params)
        return optax.apply_updates(params, updates), state

    params, state = step(params, state)
    state.hyperparams["learning_rate"] = jnp.asarray(0.01, jnp.float32)
    state.hyperparams["momentum"] = jnp.asarray(0.5, jnp.float32)
    # The edit takes effect: the next step is the plain optimizer's with the new values,
    # from the same inner state.
    edited = rmsjax.rmsprop(0.01, momentum=0.5)
    grads = ref.gradient(params, jnp)
    want, _ = edited.update(grads, state.inner_state, params)
    before = params
    params, state = step(params, state)
    assert len(traces) == 1
    got = jax.tree.map(lambda a, b: a - b, params, before)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_multi_steps_accumulates_then_steps(name):
    """MultiSteps(k=2) on gradients (g, g) equals one plain step on g."""
    multi = optax.MultiSteps(OPTIMIZERS[name](0.05), every_k_schedule=2)
    plain = OPTIMIZERS[name](0.05)
    params = _params()
    grads = ref.gradient(params, jnp)
    with optax_promotion:
        state = multi.init(params)
        first, state = multi.update(grads, state, params)
        second, state = multi.update(grads, state, params)
    chex.assert_trees_all_close(first, jax.tree.map(jnp.zeros_like, grads))
    want, _ = plain.update(grads, plain.init(params), params)
    chex.assert_trees_all_close(second, want, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_flax_nnx_optimizer_loop_loss_falls(name):
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(4, 16, rngs=rngs)
            self.out = nnx.Linear(16, 1, rngs=rngs)

        def __call__(self, x):
            return self.out(jax.nn.tanh(self.hidden(x)))

    key = jax.random.key(0)
    x = jax.random.normal(key, (64, 4))
    y = jnp.sin(x.sum(axis=1, keepdims=True))
    model = Model(nnx.Rngs(1))
    rate = {"adadelta": 1.0, "adagrad": 0.1}.get(name, 0.01)
    optimizer = nnx.Optimizer(model, OPTIMIZERS[name](rate), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            return jnp.mean((model(x) - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer, x, y)) for _ in range(60)]
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------- equivalences


def test_scale_by_rms_with_bias_correction_is_adam_without_first_moment():
    b2 = 0.95
    rms = optax.chain(rmsjax.scale_by_rms(decay=b2, eps_in_sqrt=False, bias_correction=True),
                      optax.scale(-0.01))
    adam = optax.chain(rmsjax.scale_by_adam(b1=0.0, b2=b2), optax.scale(-0.01))
    with jax.enable_x64(True):
        params = _params(jnp.float64)
        # atol: an entry that cancels to ~1e-18 keeps the rounding of its O(1) terms, which
        # the compiler's fused multiply-adds place differently in the two chains.
        chex.assert_trees_all_close(_run(rms, 30, params)[0], _run(adam, 30, params)[0],
                                    rtol=1e-14, atol=1e-16)


@pytest.mark.parametrize("nesterov", [False, True])
def test_adam_equals_optax_adam(nesterov):
    with jax.enable_x64(True):
        params = _params(jnp.float64)
        ours, _ = _run(rmsjax.adam(0.02, b1=0.8, b2=0.99, eps=1e-6, eps_root=1e-9,
                                   nesterov=nesterov), 50, params)
        with optax_promotion:
            theirs, _ = _run(optax.adam(0.02, b1=0.8, b2=0.99, eps=1e-6, eps_root=1e-9,
                                        nesterov=nesterov), 50, params)
        # atol: an entry that cancels to ~1e-6 keeps the rounding of its O(1) terms (jax
        # 0.8.0-0.10.0 compile the two chains with a 5e-18 difference there).
        chex.assert_trees_all_close(ours, theirs, rtol=1e-12, atol=1e-16)


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_rmsprop_eps_in_sqrt_equals_optax_rmsprop(centered, momentum):
    settings = dict(decay=0.95, eps=1e-6, centered=centered, momentum=momentum)
    with jax.enable_x64(True):
        params = _params(jnp.float64)
        ours, _ = _run(rmsjax.rmsprop(0.01, eps_in_sqrt=True, **settings), 50, params)
        theirs, _ = _run(optax.rmsprop(0.01, **settings), 50, params)
        chex.assert_trees_all_close(ours, theirs, rtol=1e-12)


def test_adamw_equals_optax_adamw_with_mask():
    mask = {"a": True, "b": False}
    with jax.enable_x64(True):
        params = _params(jnp.float64)
        ours, _ = _run(rmsjax.adamw(0.02, weight_decay=0.3, mask=mask), 50, params)
        with optax_promotion:
            theirs, _ = _run(optax.adamw(0.02, weight_decay=0.3, mask=mask), 50, params)
        chex.assert_trees_all_close(ours, theirs, rtol=1e-12)


# ---------------------------------------------------------------- the seeds


def test_d2l_rmsprop_trajectory():
    """d2l 12.8: f = 0.1*x1**2 + 2*x2**2 from (-5, -2), eta 0.4, gamma 0.9, eps 1e-6 in the root.

    The book prints ``epoch 20, x1: -0.010599, x2: 0.000000``.
    """
    tx = rmsjax.rmsprop(0.4, decay=0.9, eps=1e-6, eps_in_sqrt=True)
    with jax.enable_x64(True):
        x = jnp.array([-5.0, -2.0], jnp.float64)
        state = tx.init(x)
        for _ in range(20):
            updates, state = tx.update(jnp.array([0.2, 4.0], jnp.float64) * x, state, x)
            x = optax.apply_updates(x, updates)
    assert f"{float(x[0]):.6f}" == "-0.010599"
    assert f"{abs(float(x[1])):.6f}" == "0.000000"


def test_adagrad_stalls_where_rmsprop_does_not():
    """The seeds' central claim, on 5 000 steps of a stationary noisy gradient stream.

    The effective step size alpha/sqrt(G + eps) of AdaGrad decays like 1/sqrt(t); RMSprop's
    alpha/sqrt(v + eps) stays near alpha/rms(g).
    """
    alpha, eps, steps = 0.01, 1e-8, 5000
    grads = jax.random.normal(jax.random.key(42), (steps, 8))
    adagrad, rmsprop = rmsjax.adagrad(alpha, eps=0.0), rmsjax.rmsprop(alpha, decay=0.9, eps=0.0)
    params = jnp.zeros(8)

    def second_moment(tx):
        def body(state, g):
            _, state = tx.update(g, state, params)
            return state, None

        state, _ = jax.lax.scan(body, tx.init(params), grads)
        return optax.tree.get(state, "nu")

    adagrad_rate = alpha / jnp.sqrt(second_moment(adagrad) + eps)
    rmsprop_rate = alpha / jnp.sqrt(second_moment(rmsprop) + eps)
    ratio = float(jnp.median(adagrad_rate / rmsprop_rate))
    # sqrt(E[g^2]) / sqrt(5000 E[g^2]) = 1/sqrt(5000) ~ 0.014
    assert ratio < 0.03
    assert float(jnp.min(rmsprop_rate)) > 0.2 * alpha
    assert float(jnp.max(adagrad_rate)) < 0.03 * alpha
    np.testing.assert_allclose(ratio, 1 / np.sqrt(steps), rtol=0.5)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_inject_hyperparams_on_complex_parameters(name):
    """inject_hyperparams gives hyperparameters the parameters' (complex) dtype; no warning."""
    tx = optax.inject_hyperparams(OPTIMIZERS[name])(lr=0.05)
    params = jnp.array([1.0 + 2.0j, -0.5j], jnp.complex64)
    updates, state = tx.update(params, tx.init(params), params)
    assert updates.dtype == jnp.complex64
    chex.assert_tree_all_finite(updates)
