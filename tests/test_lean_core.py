"""The lean core: program size and float32 trajectories against optax, a stable state layout.

* Per-leaf program: the jitted step of each optimizer adds at most 10 % more StableHLO per
  parameter leaf than optax's equivalent optimizer (same maths, same hyperparameters).
* float32: after 300 steps on a well-conditioned problem, rmsjax's parameters are within
  max(1e-6, 4x the one-ulp noise floor) of optax's, the floor being how far optax's own run
  moves when every initial parameter is moved by one ulp.
* Composition: a moment's path in the state tree does not depend on whether weight decay or
  momentum are on, nor on ``optax.inject_hyperparams``; no module reads ``XLA_FLAGS``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsjax
from rmsjax.compat import keras as kc
from rmsjax.compat import tf1
from rmsjax.compat import torch as pt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import program_size  # noqa: E402

# ---------------------------------------------------------------- per-leaf program size


@pytest.mark.parametrize("name", sorted(program_size.CONFIGURATIONS))
def test_per_leaf_program_is_no_larger_than_optax(name):
    make_optax, make_rmsjax = program_size.CONFIGURATIONS[name]
    theirs = program_size.lines_per_leaf(make_optax(), standard=True)
    ours = program_size.lines_per_leaf(make_rmsjax())
    assert ours <= 1.10 * theirs, (name, ours, theirs)


def test_dead_terms_are_not_emitted():
    """A concrete zero or positive hyperparameter removes its term or guard from the program."""
    plain = program_size.lines_per_leaf(rmsjax.rmsprop(0.1, eps=1e-8))
    guarded = program_size.lines_per_leaf(rmsjax.rmsprop(0.1, eps=0.0))  # 0/0 can happen
    assert guarded > plain
    undamped = program_size.lines_per_leaf(rmsjax.sgd(0.1, momentum=0.9))
    damped = program_size.lines_per_leaf(optax.chain(rmsjax.momentum(0.9, dampening=0.1), optax.scale(-0.1)))
    assert damped > undamped


@pytest.mark.parametrize(
    "make",
    [
        lambda: rmsjax.rmsprop(0.1, eps=1e-8, momentum=0.9, weight_decay=0.01),
        lambda: rmsjax.adamw(0.1, weight_decay=0.01),
        lambda: optax.inject_hyperparams(rmsjax.rmsprop)(learning_rate=0.1, decay=0.9, eps=1e-8),
    ],
    ids=["rmsprop", "adamw", "injected rmsprop"],
)
def test_hyperparameter_scalars_are_made_once_per_call_not_per_leaf(make, monkeypatch):
    """Tracing a step on 20 leaves makes no more hyperparameter scalars than on 1 leaf."""
    from rmsjax import averages

    calls = []
    original = averages._as

    def counting(value, dtype):
        calls.append(dtype)
        return original(value, dtype)

    monkeypatch.setattr(averages, "_as", counting)

    def made(leaves: int) -> int:
        tx = make()
        params = {f"w{i}": jnp.ones(3) for i in range(leaves)}
        state = tx.init(params)
        calls.clear()
        jax.jit(program_size._step(tx)).trace(params, state, params)
        return len(calls)

    one, twenty = made(1), made(20)
    assert one > 0
    assert twenty == one, (one, twenty)


# ---------------------------------------------------------------- float32 against optax


def _problem() -> dict[str, jax.Array]:
    return {
        "a": jnp.linspace(-2.0, 2.0, 50, dtype=jnp.float32),
        "b": jnp.linspace(1.0, 3.0, 7, dtype=jnp.float32),
    }


def _gradient(params):
    # Well conditioned: curvature between 1.5 and 4.5 everywhere.
    return jax.tree.map(lambda p: 3.0 * p + 0.5 * jnp.sin(3.0 * p), params)


def _run(tx, params, steps=300):
    @jax.jit
    def step(p, s):
        updates, s = tx.update(_gradient(p), s, p)
        return optax.apply_updates(p, updates), s

    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params


def _relative(a, b) -> float:
    return max(
        float(jnp.max(jnp.abs(x - y) / jnp.maximum(jnp.abs(y), 1e-3)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


PARITY = {
    "rmsprop": (
        lambda: optax.rmsprop(1e-3, decay=0.9, eps=1e-8, eps_in_sqrt=False),
        lambda: rmsjax.rmsprop(1e-3, decay=0.9, eps=1e-8),
    ),
    "rmsprop_eps_in_root": (
        lambda: optax.rmsprop(1e-3, decay=0.9, eps=1e-8, eps_in_sqrt=True),
        lambda: rmsjax.rmsprop(1e-3, decay=0.9, eps=1e-8, eps_in_sqrt=True),
    ),
    "adam": (lambda: optax.adam(1e-3), lambda: rmsjax.adam(1e-3)),
    "adam_b2_0.9999": (lambda: optax.adam(1e-3, b2=0.9999), lambda: rmsjax.adam(1e-3, b2=0.9999)),
    "adamw": (
        lambda: optax.adamw(1e-3, weight_decay=1e-2),
        lambda: rmsjax.adamw(1e-3, weight_decay=1e-2),
    ),
    "sgd_momentum": (lambda: optax.sgd(1e-3, momentum=0.9), lambda: rmsjax.sgd(1e-3, momentum=0.9)),
}


@pytest.mark.parametrize("name", sorted(PARITY))
def test_float32_trajectory_matches_optax_at_the_noise_floor(name):
    make_optax, make_rmsjax = PARITY[name]
    params = _problem()
    ours = _run(make_rmsjax(), params)
    with jax.numpy_dtype_promotion("standard"):
        theirs = _run(make_optax(), params)
        one_ulp = jax.tree.map(lambda x: jnp.nextafter(x, jnp.full_like(x, jnp.inf)), params)
        floor = _relative(_run(make_optax(), one_ulp), theirs)
    assert ours["a"].dtype == jnp.float32
    assert floor > 0  # the perturbation is seen: the floor is a real measurement
    assert _relative(ours, theirs) <= max(1e-6, 4 * floor), (name, _relative(ours, theirs), floor)


# ---------------------------------------------------------------- stable state layout


def _paths(state, field: str) -> list[str]:
    """The paths of every state node that has ``field``, as key strings."""
    found = []

    def visit(path, node):
        if hasattr(node, "_fields") and field in node._fields:
            found.append(jax.tree_util.keystr(path))

    jax.tree_util.tree_map_with_path(
        visit, state, is_leaf=lambda x: hasattr(x, "_fields") and field in x._fields
    )
    return found


LAYOUT_PAIRS = {
    "rmsprop": (lambda: rmsjax.rmsprop(0.1), lambda: rmsjax.rmsprop(0.1, weight_decay=0.1, momentum=0.9)),
    "rmsprop_centered": (
        lambda: rmsjax.rmsprop(0.1, centered=True),
        lambda: rmsjax.rmsprop(0.1, centered=True, weight_decay=0.1, momentum=0.9, nesterov=True),
    ),
    "adamw": (lambda: rmsjax.adamw(0.1, weight_decay=0.0), lambda: rmsjax.adamw(0.1, weight_decay=0.1)),
    "adadelta": (lambda: rmsjax.adadelta(), lambda: rmsjax.adadelta(weight_decay=0.1)),
    "torch.RMSprop": (
        lambda: pt.RMSprop(),
        lambda: pt.RMSprop(weight_decay=0.1, momentum=0.9, maximize=True),
    ),
    "torch.Adam": (lambda: pt.Adam(), lambda: pt.Adam(weight_decay=0.1, maximize=True)),
    "torch.SGD": (
        lambda: pt.SGD(momentum=0.9),
        lambda: pt.SGD(momentum=0.9, weight_decay=0.1, maximize=True),
    ),
    "keras.RMSprop": (lambda: kc.RMSprop(), lambda: kc.RMSprop(momentum=0.9, weight_decay=0.1)),
    "tf1.RMSPropOptimizer": (
        lambda: tf1.RMSPropOptimizer(0.1),
        lambda: tf1.RMSPropOptimizer(0.1, momentum=0.9),
    ),
}


@pytest.mark.parametrize("name", sorted(LAYOUT_PAIRS))
def test_moment_paths_do_not_depend_on_optional_parts(name):
    bare, full = (make() for make in LAYOUT_PAIRS[name])
    params = {"w": jnp.ones(3)}
    bare_state, full_state = bare.init(params), full.init(params)
    assert len(bare_state) == len(full_state)
    # Every moment of the bare optimizer is at the same path in the full one (which may add
    # a momentum buffer of its own in its own slot).
    for field in ("nu", "mu"):
        assert set(_paths(bare_state, field)) <= set(_paths(full_state, field)), field
    assert _paths(bare_state, "nu") or _paths(bare_state, "mu")  # every one has a moment


def test_plain_and_injected_states_put_the_moments_at_the_same_paths():
    params = {"w": jnp.ones(3)}
    plain = rmsjax.rmsprop(0.1, momentum=0.0, weight_decay=0.0).init(params)
    injected = optax.inject_hyperparams(rmsjax.rmsprop)(learning_rate=0.1, momentum=0.0, weight_decay=0.0)
    inner = injected.init(params).inner_state
    assert len(plain) == len(inner)
    assert _paths(plain, "nu") == _paths(inner, "nu")


def test_no_module_reads_xla_flags_or_the_environment():
    for path in (ROOT / "rmsjax").rglob("*.py"):
        text = path.read_text()
        assert "XLA_FLAGS" not in text.replace("XLA_FLAGS=--xla_backend", ""), path
        assert "os.environ" not in text, path


def test_one_pass_changes_no_number():
    """The opt-in one-loop arrangement traces the same operations (no flag set here)."""
    params = {"w": jnp.linspace(-1.0, 1.0, 64), "b": jnp.ones((4, 4))}
    for make in (lambda: rmsjax.rmsprop(0.01, centered=True, momentum=0.9), lambda: rmsjax.adam(0.01)):
        plain, fused = make(), rmsjax.one_pass(make())
        p1 = p2 = params
        s1, s2 = plain.init(params), fused.init(params)
        step1 = jax.jit(lambda g, s, p, tx=plain: tx.update(g, s, p))
        step2 = jax.jit(lambda g, s, p, tx=fused: tx.update(g, s, p))
        for k in range(5):
            g = jax.tree.map(lambda x, k=k: jnp.cos(x * (k + 1.0)), p1)
            u1, s1 = step1(g, s1, p1)
            u2, s2 = step2(g, s2, p2)
            p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
        for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
