"""Bad input to :mod:`rmsjax.compat.keras` fails at once, naming what is wrong.

The Keras-only pieces (``_keras_parts``: loss scaling, clipping, accumulation, EMA, Adamax,
Nadam) and the Keras schedules: a gradient tree that does not match the parameters, a
non-floating gradient, another optimizer's state, a ``dtype`` that is not a dtype, and
``boundaries``/``values`` that are not sequences. Valid inputs (0-d jax arrays,
``optax.inject_hyperparams``, 1-d arrays as boundaries) keep working.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsjax
from rmsjax.compat import _keras_parts as parts
from rmsjax.compat import keras as kc
from rmsjax.compat.keras import schedules as ks

P = {"w": jnp.zeros(3), "b": jnp.zeros(2)}
G = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array([0.5, -0.5])}

GRADIENT_OPTIONS = {
    "clipnorm": dict(clipnorm=1.0),
    "clipvalue": dict(clipvalue=1.0),
    "global_clipnorm": dict(global_clipnorm=1.0),
    "loss_scale_factor": dict(loss_scale_factor=2.0),
}


# ---------------------------------------------------------------- gradients against params


@pytest.mark.parametrize("option", list(GRADIENT_OPTIONS))
@pytest.mark.parametrize(
    "grads, where",
    [
        ({"w": jnp.ones(3), "b": jnp.ones(2), "c": jnp.ones(2)}, r"updates\['c'\] vs params\['w'\]"),
        ({"w": jnp.ones(3), "a": jnp.ones(2)}, r"updates\['a'\] vs params\['b'\]"),
    ],
    ids=["extra leaf", "renamed leaf"],
)
def test_a_gradient_tree_unlike_the_params_is_named_by_the_option(option, grads, where):
    tx = kc.Adam(**GRADIENT_OPTIONS[option])
    with pytest.raises(ValueError, match=rf"^{option}: the updates do not match the params tree: .*{where}"):
        tx.update(grads, tx.init(P), P)


@pytest.mark.parametrize("option", list(GRADIENT_OPTIONS))
@pytest.mark.parametrize("with_params", [True, False], ids=["params", "no params"])
def test_a_bool_gradient_is_refused_by_the_option(option, with_params):
    tx = kc.Nadam(**GRADIENT_OPTIONS[option])
    grads = {"w": jnp.ones(3, bool), "b": jnp.ones(2, bool)}
    with pytest.raises(TypeError, match=rf"^{option}: updates\['b'\] has dtype bool"):
        tx.update(grads, tx.init(P), P if with_params else None)


@pytest.mark.parametrize("option", list(GRADIENT_OPTIONS))
def test_the_gradient_options_still_run_with_and_without_params(option):
    tx = kc.Adam(learning_rate=0.1, **GRADIENT_OPTIONS[option])
    reference = kc.Adam(learning_rate=0.1)
    for params in (P, None):
        updates, _ = jax.jit(tx.update)(G, tx.init(P), params)
        expected, _ = reference.update(G, reference.init(P), P)
        # Adam's first step is -lr * sign(g) whatever the scale of g.
        np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-5)


@pytest.mark.parametrize("option", ["clipnorm", "clipvalue", "global_clipnorm"])
def test_injected_clipping_limits_still_work(option):
    tx = optax.inject_hyperparams(kc.SGD)(learning_rate=1.0, **{option: 0.5})
    state = tx.init(P)
    updates, _ = tx.update(G, state, P)
    assert float(jnp.max(jnp.abs(updates["w"]))) <= 0.5 + 1e-6
    state.hyperparams[option] = jnp.asarray(0.0)  # 0 turns clipping off, as in Keras
    updates, _ = tx.update(G, state, P)
    np.testing.assert_allclose(updates["w"], -G["w"])


def test_zero_d_jax_array_options_still_work():
    tx = kc.SGD(
        learning_rate=jnp.asarray(1.0), clipvalue=jnp.asarray(0.5), loss_scale_factor=jnp.asarray(2.0)
    )
    updates, _ = tx.update(G, tx.init(P), P)
    np.testing.assert_allclose(updates["w"], [-0.5, 0.5, -0.5])


# ---------------------------------------------------------------- foreign states


def _trained_adam_state():
    adam = kc.Adam()
    state = adam.init(P)
    for _ in range(3):
        _, state = adam.update(G, state, P)
    return state


@pytest.mark.parametrize(
    "make, expected",
    [(kc.Adamax, "ScaleByAdamaxState"), (kc.Nadam, "ScaleByNadamState")],
    ids=["Adamax", "Nadam"],
)
def test_adamax_and_nadam_refuse_adams_state(make, expected):
    with pytest.raises(TypeError, match=rf"expected a {expected} .*got ScaleByAdamState"):
        make().update(G, _trained_adam_state(), P)


def test_accumulation_refuses_another_optimizers_state():
    tx = kc.SGD(gradient_accumulation_steps=2)
    expected = r"^gradient_accumulation_steps: expected a GradientAccumulationState"
    with pytest.raises(TypeError, match=expected):
        tx.update(G, rmsjax.adadelta().init(P), P)


def test_ema_refuses_another_state():
    with pytest.raises(TypeError, match=r"^use_ema: expected a EmaState .*got AbsentState"):
        kc.SGD(use_ema=True, weight_decay=0.1).update(G, kc.SGD(weight_decay=0.1).init(P), P)
    with pytest.raises(TypeError, match=r"^use_ema: expected a EmaState"):
        parts.ema(0.9, None).update(G, parts.accumulate_gradients(optax.identity(), 2).init(P), P)


def test_a_clipping_slot_refuses_a_state_that_is_not_empty():
    with pytest.raises(TypeError, match=r"^clipnorm: expected a EmptyState .*got ScaleByAdamaxState"):
        parts.clip_by_norm(1.0).update(G, parts.scale_by_adamax(0.9, 0.999, 1e-7).init(P), P)


@pytest.mark.parametrize(
    "make",
    [
        kc.Adamax,
        kc.Nadam,
        lambda: kc.SGD(gradient_accumulation_steps=2, use_ema=True, clipnorm=1.0, loss_scale_factor=2.0),
        lambda: kc.Adam(clipvalue=0.5, use_ema=True, ema_overwrite_frequency=2),
    ],
    ids=["Adamax", "Nadam", "SGD accumulation ema", "Adam clipvalue ema"],
)
def test_own_states_still_work_jitted(make):
    tx = make()
    state = tx.init(P)
    step = jax.jit(tx.update)
    params = P
    for _ in range(4):
        updates, state = step(G, state, params)
        params = optax.apply_updates(params, updates)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))


# ---------------------------------------------------------------- schedules


SCHEDULES = {
    "ExponentialDecay": lambda **kw: ks.ExponentialDecay(0.1, 10, 0.9, **kw),
    "PiecewiseConstantDecay": lambda **kw: ks.PiecewiseConstantDecay([10, 20], [0.1, 0.01, 0.001], **kw),
    "CosineDecay": lambda **kw: ks.CosineDecay(0.1, 10, **kw),
    "InverseTimeDecay": lambda **kw: ks.InverseTimeDecay(0.1, 10, 0.5, **kw),
    "PolynomialDecay": lambda **kw: ks.PolynomialDecay(0.1, 10, **kw),
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize(
    "dtype",
    [-0.1, 0, 1.5, True, "0.1", [1, 2], 0.5 + 1j],
    ids=["-0.1", "0", "1.5", "True", "str", "list", "complex"],
)
def test_a_schedule_dtype_that_is_not_a_dtype_is_named(schedule, dtype):
    with pytest.raises(TypeError, match=r"^dtype must be None or a floating dtype"):
        SCHEDULES[schedule](dtype=dtype)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize(
    "dtype",
    [jnp.ones(2), jnp.asarray(1.0), np.ones(2), np.float32(1.0)],
    ids=["jnp 1-d", "jnp 0-d", "np 1-d", "np scalar"],
)
def test_a_schedule_dtype_that_is_an_array_is_refused(schedule, dtype):
    with pytest.raises(TypeError, match=r"^dtype must be None or a floating dtype .*got a value"):
        SCHEDULES[schedule](dtype=dtype)


@pytest.mark.parametrize("dtype", ["int32", jnp.complex64, "f4,f4"])
def test_a_schedule_dtype_that_is_not_floating_is_a_value_error(dtype):
    with pytest.raises(ValueError, match=r"^dtype must be None or a floating dtype"):
        ks.ExponentialDecay(0.1, 10, 0.9, dtype=dtype)


@pytest.mark.parametrize("dtype", [None, jnp.float32, "float32", np.dtype("float32"), jnp.bfloat16])
def test_a_schedule_dtype_that_is_a_dtype_still_works(dtype):
    schedule = ks.ExponentialDecay(0.1, 10, 0.5, dtype=dtype)
    assert float(schedule(10)) == pytest.approx(0.05, rel=1e-2)


@pytest.mark.parametrize("argument", ["boundaries", "values"])
@pytest.mark.parametrize(
    "value", [10, 0.1, None, True, "ab", {10, 20}, np.array(10), jnp.asarray(0.5)],
    ids=["int", "float", "None", "True", "str", "set", "np 0-d", "jnp 0-d"],
)
def test_piecewise_boundaries_and_values_must_be_sequences(argument, value):
    arguments = {"boundaries": [10], "values": [0.1, 0.01], argument: value}
    with pytest.raises(TypeError, match=rf"^{argument} must be a sequence of numbers"):
        ks.PiecewiseConstantDecay(**arguments)


@pytest.mark.parametrize(
    "boundaries, values",
    [
        ((10, 20), (0.1, 0.01, 0.001)),
        (np.array([10, 20]), np.array([0.1, 0.01, 0.001])),
        (jnp.array([10, 20]), [0.1, 0.01, 0.001]),
        (range(10, 30, 10), [0.1, 0.01, 0.001]),
    ],
    ids=["tuples", "numpy", "jax", "range"],
)
def test_piecewise_sequences_of_any_kind_still_work(boundaries, values):
    schedule = ks.PiecewiseConstantDecay(boundaries, values, dtype=jnp.float32)
    np.testing.assert_allclose([float(schedule(s)) for s in (5, 15, 25)], [0.1, 0.01, 0.001], rtol=1e-6)


def test_piecewise_lengths_are_still_named():
    with pytest.raises(ValueError, match=r"boundaries must have one element less than values"):
        ks.PiecewiseConstantDecay([10, 20], [0.1, 0.01])
