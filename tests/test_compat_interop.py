"""rmsjax.compat in optax pipelines, and its answers to bad input.

* ``optax.inject_hyperparams`` of a compat factory: with the ``static_args`` that
  ``docs/porting.md`` lists, the state is the plain factory's (no extra buffers, no
  ``params`` needed where the plain one needs none); with every default injected, the
  updates are still the plain ones;
* one rule for a concrete hyperparameter: a NumPy scalar or 0-d array is a number, a jax
  array is not;
* errors of ``load_state_dict`` / ``state_dict``, ``param_groups`` and the schedules that
  name what is wrong.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rmsjax.compat import keras as kc
from rmsjax.compat import tf1, timm
from rmsjax.compat import torch as pt

PARAMS = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array([0.25])}
GRADS = {"w": jnp.array([0.5, 0.25, -1.0]), "b": jnp.array([2.0])}


def _f64(tree):
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x, np.float64)), tree)

# (factory, keyword arguments, static_args that keep the zero defaults off) as docs/porting.md.
INJECTED = {
    "torch.SGD": (pt.SGD, {"lr": 0.1}, ("momentum", "weight_decay", "dampening", "nesterov")),
    "torch.RMSprop": (pt.RMSprop, {"lr": 0.1}, ("momentum", "weight_decay")),
    "torch.Adagrad": (pt.Adagrad, {"lr": 0.1}, ("lr_decay", "weight_decay")),
    "torch.Adam": (pt.Adam, {"lr": 0.1}, ("weight_decay",)),
    "torch.AdamW": (pt.AdamW, {"lr": 0.1}, ()),
    "torch.Adadelta": (pt.Adadelta, {}, ("weight_decay",)),
    "keras.SGD": (kc.SGD, {"learning_rate": 0.1}, ("momentum",)),
    "keras.RMSprop": (kc.RMSprop, {"learning_rate": 0.1}, ("momentum",)),
    "keras.Adam": (kc.Adam, {"learning_rate": 0.1}, ()),
    "tf1.RMSPropOptimizer": (tf1.RMSPropOptimizer, {"learning_rate": 0.1}, ("momentum",)),
    "timm.RMSpropTF": (timm.RMSpropTF, {"lr": 0.1}, ("momentum", "weight_decay")),
}


def _needs_params(tx, state, grads) -> bool:
    try:
        tx.update(grads, state)
    except ValueError as error:
        assert "params" in str(error)
        return True
    return False


def _shapes(state):
    return jax.tree.map(lambda x: (jnp.shape(x), jnp.asarray(x).dtype), state)


@pytest.mark.parametrize("name", sorted(INJECTED))
def test_static_args_keep_the_plain_state(name):
    # (float64: an injected hyperparameter is an array of the default float dtype, and a
    # float32 ``1 - beta`` is 1e-5 off the plain one's, computed on the host in float64.)
    with jax.enable_x64(True):
        _static_args_keep_the_plain_state(name)


def _static_args_keep_the_plain_state(name):
    factory, kwargs, static = INJECTED[name]
    params, grads = _f64(PARAMS), _f64(GRADS)
    plain = factory(**kwargs)
    tx = optax.inject_hyperparams(factory, static_args=static)(**kwargs)
    state: Any = tx.init(params)
    plain_state = plain.init(params)
    assert jax.tree.structure(state.inner_state) == jax.tree.structure(plain_state)
    assert _shapes(state.inner_state) == _shapes(plain_state)
    assert _needs_params(tx, state, grads) == _needs_params(plain, plain_state, grads)
    ours, state = tx.update(grads, state, params)
    theirs, plain_state = plain.update(grads, plain_state, params)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    assert jax.tree.structure(state.inner_state) == jax.tree.structure(plain_state)


@pytest.mark.parametrize("name", sorted(INJECTED))
def test_injected_defaults_give_the_plain_updates(name):
    # Everything injected: the zero defaults become arrays and their parts are kept (a
    # momentum buffer of decay 0, a weight decay of 0), but the numbers do not change.
    factory, kwargs, _ = INJECTED[name]
    with jax.enable_x64(True):
        params, grads = _f64(PARAMS), _f64(GRADS)
        plain = factory(**kwargs)
        tx = optax.inject_hyperparams(factory)(**kwargs)
        state: Any = tx.init(params)
        plain_state = plain.init(params)
        for _ in range(3):
            ours, state = tx.update(grads, state, params)
            theirs, plain_state = plain.update(grads, plain_state, params)
            for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
            params = optax.apply_updates(params, theirs)


def test_injecting_a_zero_default_switches_its_part_on():
    # The documented behaviour that the static_args above avoid: pinned, so that the docs
    # stay true.
    plain = pt.SGD(lr=0.1).init(PARAMS)
    injected_state: Any = optax.inject_hyperparams(pt.SGD)(lr=0.1).init(PARAMS)
    injected = injected_state.inner_state
    assert len(jax.tree.leaves(injected)) > len(jax.tree.leaves(plain))


# ---------------------------------------------------------------- one concrete predicate


@pytest.mark.parametrize(
    "zero", [0.0, 0, np.float32(0.0), np.array(0.0), np.array(0, np.int32)], ids=repr
)
def test_numpy_zeros_are_numbers(zero):
    # Accepted with nesterov as PyTorch accepts dampening=0, and no buffer for momentum 0.
    pt.SGD(lr=0.1, momentum=0.9, dampening=zero, nesterov=True)
    assert jax.tree.leaves(pt.SGD(lr=0.1, momentum=zero).init(PARAMS)) == jax.tree.leaves(
        pt.SGD(lr=0.1).init(PARAMS)
    )
    assert len(jax.tree.leaves(kc.SGD(momentum=zero).init(PARAMS))) == len(
        jax.tree.leaves(kc.SGD().init(PARAMS))
    )


def test_jax_array_dampening_is_accepted_with_nesterov_and_a_nonzero_numpy_one_is_not():
    pt.SGD(lr=0.1, momentum=0.9, dampening=jnp.asarray(0.0), nesterov=True)  # unknown: allowed
    for nonzero in (0.5, np.array(0.5), np.float64(0.5)):
        with pytest.raises(ValueError, match="dampening"):
            pt.SGD(lr=0.1, momentum=0.9, dampening=nonzero, nesterov=True)
