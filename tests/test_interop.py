"""optax's own tools read, inject and change rmsjax states as they do optax's (issue 19).

Driven by the test registry: every case whose factory is in ``INTEROP_FACTORIES`` runs
every battery here. The wrappers (``quantized``, ``packed``, ``one_pass``) and the compat
factories join by adding their factories to that set (and, where a battery cannot hold for
them by design, a reason in ``EXPECTED_DIFFERENCES``).

What is checked, for each case (after optax's own ``inject_hyperparams``, ``tree_utils``
and ``map_params`` tests):

* ``optax.inject_hyperparams(f)(*args, **kwargs)`` keeps the plain ``f(*args, **kwargs)``
  state structure (as its ``inner_state``), gives the same updates, and needs ``params``
  only where the plain one does;
* ``optax.tree.set(state, count=...)`` changes a count without the structure changing
  across steps: a ``lax.scan`` over steps after it runs;
* ``optax.tree.map_params`` maps a tree shaped like the parameters (with an extra
  params-shaped tree) over the state.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import registry

import rmsjax
from rmsjax import optimizers, transforms

# The factories whose registry cases run here.
INTEROP_FACTORIES = {
    getattr(optimizers, name) for name in optimizers.__all__
} | {
    getattr(transforms, name) for name in transforms.__all__
    if not name[0].isupper() and name != "upgrade_0_2_state_dict"  # a checkpoint migration
}

# case name -> why a battery is skipped for it (none for rmsjax's own factories).
EXPECTED_DIFFERENCES: dict[str, str] = {}


def _cases():
    out = {}
    for name, case in registry.CASES.items():
        if case.factory not in INTEROP_FACTORIES:
            continue
        if any(isinstance(a, registry.Case) for a in (*case.args, *case.kwargs.values())):
            continue
        out[name] = case
    return dict(sorted(out.items()))


CASES = _cases()
PARAMS = {"a": jnp.array([0.5, -1.5, 2.0], jnp.float32), "b": jnp.array([[1.0, -0.25]], jnp.float32)}
GRADS = [jax.tree.map(lambda p, k=k: jnp.sin(p * (k + 1)) + 0.1 * k, PARAMS) for k in range(3)]


def _non_schedule_callables(case) -> set[str]:
    """Arguments that are callables but not schedules (a mask function): static under injection."""
    return {k for k, v in case.kwargs.items() if callable(v) and k == "mask"}


def _injected(case):
    static = _non_schedule_callables(case)
    return optax.inject_hyperparams(case.factory, static_args=static)(*case.args, **case.kwargs)


def _has_schedule(case) -> bool:
    names = list(inspect.signature(case.factory).parameters)
    bound = {**dict(zip(names, case.args)), **case.kwargs}
    return any(callable(v) and k not in _non_schedule_callables(case) for k, v in bound.items())


def test_the_battery_covers_every_rmsjax_factory():
    covered = {case.factory for case in CASES.values()}
    missing = sorted(f.__name__ for f in INTEROP_FACTORIES - covered)
    assert not missing, f"no registry case runs the interop battery for {missing}"


def _needs_params(tx, state) -> bool:
    try:
        tx.update(GRADS[0], state)
    except ValueError as error:
        assert "needs the current parameters" in str(error), error
        return True
    return False


@pytest.mark.parametrize("name", [n for n in CASES if not _has_schedule(CASES[n])])
def test_inject_hyperparams_keeps_the_plain_structure_and_updates(name):
    case = CASES[name]
    plain, injected = case.make(), _injected(case)
    plain_state, injected_state = plain.init(PARAMS), injected.init(PARAMS)
    assert jax.tree.structure(injected_state.inner_state) == jax.tree.structure(plain_state)
    assert _needs_params(injected, injected_state) == _needs_params(plain, plain_state)
    with jax.numpy_dtype_promotion("standard"):  # optax's own count arithmetic
        for grads in GRADS:
            u_plain, plain_state = plain.update(grads, plain_state, PARAMS)
            u_injected, injected_state = injected.update(grads, injected_state, PARAMS)
            assert jax.tree.structure(injected_state.inner_state) == jax.tree.structure(plain_state)
            # Injected hyperparameters are float32 arrays (1 - decay rounded in float32, not
            # on the host): equal to a few float32 ulps.
            jax.tree.map(
                lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), u_injected, u_plain
            )


@pytest.mark.parametrize(
    "factory", [rmsjax.rmsprop, rmsjax.sgd, rmsjax.adadelta, rmsjax.adam, rmsjax.adagrad],
    ids=lambda f: f.__name__,
)
def test_injected_defaults_add_no_buffers_and_need_no_params(factory):
    """Issue 19, reproduction 1: injecting only the learning rate changes nothing else."""
    plain, injected = factory(1e-3), optax.inject_hyperparams(factory)(learning_rate=1e-3)
    p = jnp.ones(3)
    plain_state, injected_state = plain.init(p), injected.init(p)
    assert jax.tree.structure(injected_state.inner_state) == jax.tree.structure(plain_state)
    assert sum(x.size for x in jax.tree.leaves(injected_state.inner_state)) == sum(
        x.size for x in jax.tree.leaves(plain_state)
    )
    with jax.numpy_dtype_promotion("standard"):
        injected.update(p, injected_state)  # no params: no weight decay was asked for


def test_a_given_zero_is_present_and_none_is_absent():
    """The layout follows the signature: None is absent, any given value (even 0) present."""
    p = jnp.ones(3)
    without, with_zero = rmsjax.sgd(0.1).init(p), rmsjax.sgd(0.1, momentum=0.0).init(p)
    assert isinstance(without[0], optax.EmptyState)
    assert isinstance(with_zero[0], transforms.MomentumState)
    with pytest.raises(ValueError, match="needs the current parameters"):
        tx = rmsjax.rmsprop(0.1, weight_decay=0.0)
        tx.update(p, tx.init(p))
    with pytest.raises(ValueError, match="momentum"):
        rmsjax.sgd(0.1, nesterov=True)
    state = rmsjax.momentum(0.9, dampening=0.0).init(p)
    assert isinstance(state, transforms.DampenedMomentumState)
    assert isinstance(rmsjax.momentum(0.9).init(p), transforms.MomentumState)


def test_tree_get_finds_the_injected_learning_rate_as_with_optax():
    """Issue 19, reproduction 2: no state field shadows the injected hyperparameter."""
    p = jnp.ones(3)
    for factory in (rmsjax.adam, rmsjax.rmsprop, rmsjax.sgd, optax.adam):
        state = optax.inject_hyperparams(factory)(learning_rate=0.5).init(p)
        assert float(optax.tree.get(state, "learning_rate")) == 0.5, factory


@pytest.mark.parametrize("name", list(CASES))
def test_tree_set_count_then_scan_keeps_the_structure(name):
    """Issue 19, reproduction 3: optax.tree.set fills nothing that the next update drops."""
    tx = CASES[name].make()
    state = tx.init(PARAMS)
    counts = optax.tree_utils.tree_get_all_with_path(state, "count")
    if counts:
        state = optax.tree.set(state, count=jnp.asarray(3, jnp.int32))
    grads = jax.tree.map(lambda *g: jnp.stack(g), *GRADS)

    def step(carry, g):
        params, state = carry
        updates, state = tx.update(g, state, params)
        return (optax.apply_updates(params, updates), state), None

    (_, final), _ = jax.lax.scan(step, (PARAMS, state), grads)
    assert jax.tree.structure(final) == jax.tree.structure(state)
    if counts:
        for _, count in optax.tree_utils.tree_get_all_with_path(final, "count"):
            assert int(count) == 3 + len(GRADS)


@pytest.mark.parametrize("name", list(CASES))
def test_map_params_with_a_params_shaped_tree(name):
    """Issue 19, reproduction 4: map_params reaches every params-shaped tree of the state."""
    tx = CASES[name].make()
    state = tx.init(PARAMS)
    specs = jax.tree.map(lambda p: p.ndim, PARAMS)
    calls = []

    def fill(value, spec):
        calls.append(value.shape)
        return jnp.full(value.shape, spec, value.dtype)

    mapped = optax.tree.map_params(tx, fill, state, specs)
    assert jax.tree.structure(mapped) == jax.tree.structure(state)
    # Every state leaf that belongs to a parameter (its path ends in the parameter's key and
    # it has its shape) was filled with that parameter's spec; every other leaf (counts,
    # rates) is unchanged.
    param_paths = {jax.tree_util.keystr(path): p for path, p in jax.tree_util.tree_leaves_with_path(PARAMS)}
    reached = 0
    mapped_leaves = jax.tree_util.tree_leaves_with_path(mapped)
    for (path, new), old in zip(mapped_leaves, jax.tree.leaves(state), strict=True):
        key = jax.tree_util.keystr(path)
        param = next((p for suffix, p in param_paths.items()
                      if key.endswith(suffix) and p.shape == jnp.shape(old)), None)
        if param is None:
            np.testing.assert_array_equal(new, old)
        else:
            np.testing.assert_array_equal(new, np.full(param.shape, param.ndim))
            reached += 1
    assert reached == len(calls)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_map_params_with_a_params_shaped_tree_through_quantized(name, bits):
    """map_params with an extra params-shaped tree over every case wrapped in ``quantized``:
    with ``is_leaf=rmsjax.is_quantized`` each stored moment is one node, paired with its own
    parameter's entry (without it optax cannot pair two arrays, codes and scale, with one)."""
    tx = rmsjax.quantized(CASES[name].make(), bits=bits, min_size=1)
    params = {"a": jnp.ones((64, 256), jnp.float32), "b": jnp.ones((8,), jnp.float32)}  # PARAMS' keys
    state = tx.init(params)
    specs = {"a": "matrix", "b": "vector"}
    seen = []

    def tag(value, spec):
        array = value.codes if rmsjax.is_quantized(value) else value
        seen.append((rmsjax.is_quantized(value), array.shape[0], spec))
        return spec

    mapped = optax.tree.map_params(tx, tag, state, specs, is_leaf=rmsjax.is_quantized)
    stored = [x for x in jax.tree.leaves(state, is_leaf=rmsjax.is_quantized) if rmsjax.is_quantized(x)]
    assert sum(1 for q, _, _ in seen if q) == len(stored)
    assert all(spec == ("matrix" if rows == 64 else "vector") for _, rows, spec in seen)
    if seen:
        assert {"matrix", "vector"} & {x for x in jax.tree.leaves(mapped) if isinstance(x, str)}
    identity = optax.tree.map_params(tx, lambda value: value, state)
    jax.tree.map(np.testing.assert_array_equal, identity, state)


def test_learning_rate_is_the_next_rate_plain_and_injected():
    """Issue 19: after one step of a linear schedule both read 0.09; an edit shows at once."""
    schedule = optax.linear_schedule(0.1, 0.0, 10)
    p = jnp.ones(3)
    plain = rmsjax.rmsprop(schedule)
    injected = optax.inject_hyperparams(rmsjax.rmsprop)(learning_rate=schedule)
    plain_state, injected_state = plain.init(p), injected.init(p)
    with jax.numpy_dtype_promotion("standard"):
        _, plain_state = plain.update(p, plain_state, p)
        _, injected_state = injected.update(p, injected_state, p)
    expected = np.float32(0.1) * np.float32(9) / np.float32(10)
    np.testing.assert_allclose(float(rmsjax.learning_rate(plain_state)), expected, rtol=1e-6)
    np.testing.assert_allclose(
        float(rmsjax.learning_rate(injected_state, schedule=schedule)), expected, rtol=1e-6
    )
    with pytest.raises(ValueError, match=r"schedule=.*static_args=\('learning_rate',\)"):
        rmsjax.learning_rate(injected_state)  # not the last update's rate, silently
    # With the schedule static, the optimizer's own step counts it: no schedule= needed.
    static = optax.inject_hyperparams(rmsjax.rmsprop, static_args=("learning_rate",))(learning_rate=schedule)
    static_state = static.init(p)
    with jax.numpy_dtype_promotion("standard"):
        _, static_state = static.update(p, static_state, p)
    np.testing.assert_allclose(float(rmsjax.learning_rate(static_state)), expected, rtol=1e-6)


def test_learning_rate_reflects_an_edit_of_the_injected_hyperparameter():
    """Issue 22, item 5: state.hyperparams["learning_rate"] = 0.5 is what the next update uses."""
    tx = optax.inject_hyperparams(rmsjax.sgd)(learning_rate=0.1)
    p, g = jnp.zeros(2), jnp.ones(2)
    state = tx.init(p)
    state.hyperparams["learning_rate"] = jnp.asarray(0.5, jnp.float32)
    assert float(rmsjax.learning_rate(state)) == 0.5
    with jax.numpy_dtype_promotion("standard"):
        updates, state = tx.update(g, state, p)
    np.testing.assert_array_equal(updates, -0.5 * np.ones(2, np.float32))
    assert float(rmsjax.learning_rate(state)) == 0.5


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="measured bit for bit on XLA:CPU; "
                    "other backends: benchmarks/adam_bits_vs_optax.py")
def test_float32_adam_follows_optax_bit_for_bit_under_jit_on_cpu():
    """The leaky averages are written as optax writes them, ``(1 - d) * x + d * s``.

    Eagerly the order of a sum does not matter; inside one fused XLA kernel it does, since
    the compiler contracts a multiply and an add into one fused multiply-add, and which
    product is fused follows the operand order (with ``d * s + (1 - d) * x``, 36-66 % of the
    elements differed by an ulp or more from step 2 on).
    """
    p = jax.random.normal(jax.random.PRNGKey(0), (4096,), jnp.float32)
    grads = [jax.random.normal(jax.random.PRNGKey(i + 1), (4096,), jnp.float32) for i in range(5)]

    def trajectory(tx):
        state, q, out = tx.init(p), p, []

        @jax.jit
        def step(q, state, g):
            u, state = tx.update(g, state, q)
            return optax.apply_updates(q, u), state, u

        for g in grads:
            q, state, u = step(q, state, g)
            out.append(np.asarray(u))
        return out

    with jax.numpy_dtype_promotion("standard"):
        theirs = trajectory(optax.adam(1e-3))
    for a, b in zip(trajectory(rmsjax.adam(1e-3)), theirs, strict=True):
        np.testing.assert_array_equal(a, b)


def _as_0_2(state):
    """The state an rmsjax 0.2 optimizer kept, as a flax state dict (written from the 0.2 layout)."""
    from flax import serialization

    def old(node):
        if isinstance(node, transforms.MomentumState):
            return {"count": None, "mu": serialization.to_state_dict(node.mu)}
        if isinstance(node, transforms.ScaleByLearningRateState):
            return {"count": None, "learning_rate": node.rate}
        if isinstance(node, transforms.ScaleByScheduleState):
            return {"count": node.count, "learning_rate": node.rate}
        return serialization.to_state_dict(node)

    return {str(i): old(part) for i, part in enumerate(state)}


@pytest.mark.parametrize("make", [
    lambda: rmsjax.rmsprop(0.1, momentum=0.9, weight_decay=0.01),
    lambda: rmsjax.sgd(optax.linear_schedule(0.1, 0.0, 10), momentum=0.9),
    lambda: rmsjax.adam(0.1),
], ids=["rmsprop_momentum_wd", "sgd_schedule_momentum", "adam"])
def test_a_0_2_checkpoint_loads_through_the_upgrade_or_fails_naming_the_fields(make):
    from flax import serialization

    tx = make()
    state = tx.init(PARAMS)
    for g in GRADS[:2]:
        _, state = tx.update(g, state, PARAMS)
    old = serialization.msgpack_restore(serialization.to_bytes(_as_0_2(state)))
    if any(isinstance(part, (transforms.MomentumState, transforms.ScaleByLearningRateState,
                             transforms.ScaleByScheduleState)) for part in state):
        with pytest.raises(ValueError, match="field names"):
            serialization.from_state_dict(tx.init(PARAMS), old)
    restored = serialization.from_state_dict(tx.init(PARAMS), transforms.upgrade_0_2_state_dict(old))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    jax.tree.map(np.testing.assert_array_equal, restored, state)
