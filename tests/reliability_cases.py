"""Every optimizer of layers 3 and 4, by name, for the reliability tests.

``OPTIMIZERS`` maps a name to a zero-argument factory (the cases of ``registry.py`` tagged
"reliability"); the same names are used by
``test_edge_cases.py``, ``test_checkpoint.py`` and the checkpoint helper script (which runs
in a fresh process and rebuilds the optimizer from its name). Hyperparameters are chosen so
that every optional part of each chain (momentum, Nesterov, weight decay, centring,
AMSGrad, ...) is switched on in at least one entry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import registry

import rmsjax

OPTIMIZERS = {name: case.make for name, case in registry.tagged("reliability").items()}


def make_params(seed: int = 0, dtype=jnp.float32) -> dict:
    """A small two-leaf tree (no exact zeros, so no ``-0.0`` either)."""
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(size=(3, 4)) + 0.5, dtype),
        "b": jnp.asarray(rng.normal(size=(4,)) - 0.5, dtype),
    }


def gradient(params: dict, step: int) -> dict:
    """A deterministic gradient of a shifting quadratic, different at every step."""
    shift = jnp.asarray(np.sin(step + 1.0), jnp.float32)
    return jax.tree.map(lambda p: 2 * p - shift.astype(p.dtype), params)


def bits(tree) -> list[tuple[str, tuple, bytes]]:
    """Every leaf as (dtype, shape, raw bytes): equal lists mean bit-for-bit equal trees."""
    return [(str(np.asarray(x).dtype), np.shape(x), np.asarray(x).tobytes()) for x in jax.tree.leaves(tree)]


def assert_bitwise_equal(actual, expected) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for index, (a, b) in enumerate(zip(bits(actual), bits(expected))):
        assert a == b, f"leaf {index} differs: {a[:2]} vs {b[:2]}"


# Checkpointed in test_checkpoint.py: every optimizer, plus states with other kinds of leaves
# (bfloat16 moments, apply_if_finite's booleans, inject_hyperparams' dict of arrays).
CHECKPOINTED = {
    **OPTIMIZERS,
    "rmsprop_bfloat16_state": registry.CASES["rmsprop_bfloat16_state"].make,
    "apply_if_finite_adam": lambda: optax.apply_if_finite(rmsjax.adam(0.01), max_consecutive_errors=3),
    "inject_hyperparams_rmsprop": lambda: optax.inject_hyperparams(rmsjax.rmsprop)(
        learning_rate=lambda count: 0.01 / (1.0 + count.astype(jnp.float32)), decay=0.9, momentum=0.5
    ),
}
