"""Property-based tests: invariants that hold for any tree, shape, dtype and hyperparameters.

Hypothesis draws a tree of one to three leaves (ranks 0 to 2, each dimension 1 to 4), a
parameter dtype (float32, bfloat16 or float16), hyperparameters, and a few steps of
gradients (zeros, tiny and large values and both signs included). The invariants:

1. zero-initialised accumulator, no momentum: every RMSprop update obeys
   ``|u| <= lr / sqrt(1 - decay)`` (up to the rounding of the parameter dtype);
2. each such update has the opposite sign of its gradient (and is 0 where it is 0);
3. with ``eps = 0``, RMSprop and Adam steps do not change when all gradients are scaled
   by ``c > 0``: bit for bit when ``c`` is a power of two, to float32 rounding otherwise;
4. jitted and eager updates agree (float32 and bfloat16 parameters);
5. ``rmsjax.rmsprop`` equals ``optax.chain`` of its documented parts, bit for bit;
6. ``init`` then ``update`` never changes the state's tree structure, shapes or dtypes.

Example counts are kept small (``EXAMPLES`` per property) so that the file runs in seconds;
set ``RMSJAX_HYPOTHESIS_EXAMPLES`` to run more.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import registry
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import rmsjax

EXAMPLES = int(os.environ.get("RMSJAX_HYPOTHESIS_EXAMPLES", "8"))
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every run and machine: CI is reproducible
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Relative rounding of one operation in each dtype, with a margin for a handful of them.
ROUNDING = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 4e-3}

shapes = st.lists(st.integers(1, 4), min_size=0, max_size=2).map(tuple)
magnitudes = st.sampled_from([0.0, 1e-3, 0.1, 0.5, 1.0, 3.0, 100.0, 1e3])


@st.composite
def trees(draw, *, dtype_names=tuple(DTYPES)):
    """(dtype name, params, [grads per step]) with 1-3 leaves and 1-4 steps."""
    dtype_name = draw(st.sampled_from(dtype_names))
    dtype = DTYPES[dtype_name]
    leaf_shapes = draw(st.lists(shapes, min_size=1, max_size=3))
    steps = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(magnitudes)
    rng = np.random.default_rng(seed)

    def leaf(shape):
        values = rng.normal(size=shape) * scale * rng.choice([0.0, 0.01, 1.0, 10.0], size=shape)
        return jnp.asarray(values, dtype)

    names = [f"leaf{i}" for i in range(len(leaf_shapes))]
    params = {n: jnp.asarray(rng.normal(size=s), dtype) for n, s in zip(names, leaf_shapes)}
    grads = [{n: leaf(s) for n, s in zip(names, leaf_shapes)} for _ in range(steps)]
    return dtype_name, params, grads


learning_rates = st.floats(1e-4, 1.0)
decays = st.one_of(st.just(0.0), st.floats(0.0, 0.999), st.just(0.999))
epsilons = st.one_of(st.just(0.0), st.floats(1e-10, 1e-3))


def _f32(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def _state_dtype_for(dtype_name):
    # float16 rounds second moments below 6e-5 to subnormals (or zero): keep them in float32,
    # as docs/reliability.md recommends for float16 parameters.
    return jnp.float32 if dtype_name == "float16" else None


# ---------------------------------------------------------------- 1 and 2: the RMSprop bound and sign


@PROPERTY
@given(
    case=trees(),
    learning_rate=learning_rates,
    decay=decays,
    eps=epsilons,
    eps_in_sqrt=st.booleans(),
    bias_correction=st.booleans(),
)
def test_rmsprop_step_is_bounded_and_descends(case, learning_rate, decay, eps, eps_in_sqrt, bias_correction):
    dtype_name, params, grads = case
    tx = rmsjax.rmsprop(
        learning_rate, decay=decay, eps=eps, eps_in_sqrt=eps_in_sqrt,
        bias_correction=bias_correction, state_dtype=_state_dtype_for(dtype_name),
    )
    bound = learning_rate / math.sqrt(1.0 - decay) * (1.0 + ROUNDING[dtype_name])
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(g, state, params)
        for u, gradient in zip(jax.tree.leaves(updates), jax.tree.leaves(g)):
            assert u.dtype == gradient.dtype
            u, gradient = _f32(u), _f32(gradient)
            assert np.all(np.abs(u) <= bound), (np.abs(u).max(), bound)  # (1)
            assert np.all(u * gradient <= 0.0)  # (2) never along the gradient
            assert np.all(u[gradient == 0.0] == 0.0)  # (2) and no step without a gradient


# ---------------------------------------------------------------- 3: scale invariance with eps = 0


def _run(tx, params, grads):
    state = tx.init(params)
    out = []
    for g in grads:
        updates, state = tx.update(g, state, params)
        out.append(updates)
    return out


def _scaled(grads, c):
    return [jax.tree.map(lambda g: (g.astype(jnp.float32) * jnp.float32(c)).astype(g.dtype), step)
            for step in grads]


def _centred(decay):
    """A decay for centred RMSprop away from 0.

    With decay near 0 the centred variance ``nu - mu**2`` is a difference of two nearly equal
    numbers (exactly equal at decay 0, where the variance is always 0): it is pure rounding,
    which a fused multiply-add under jit or a rescaled gradient changes completely.
    """
    return max(decay, 0.1)


def _scale_invariant_optimizers(learning_rate, decay, b1, state_dtype):
    return {
        "rmsprop": rmsjax.rmsprop(learning_rate, decay=decay, eps=0.0, state_dtype=state_dtype),
        "rmsprop_centered": rmsjax.rmsprop(learning_rate, decay=_centred(decay), eps=0.0, centered=True,
                                           state_dtype=state_dtype),
        "adam": rmsjax.adam(learning_rate, b1=b1, b2=decay, eps=0.0),
    }


@PROPERTY
@given(
    case=trees(),
    learning_rate=learning_rates,
    decay=decays,
    b1=st.floats(0.0, 0.99),
    power=st.integers(-6, 6),
)
def test_eps_zero_steps_ignore_power_of_two_gradient_scale_exactly(case, learning_rate, decay, b1, power):
    dtype_name, params, grads = case
    state_dtype = _state_dtype_for(dtype_name)
    for name, tx in _scale_invariant_optimizers(learning_rate, decay, b1, state_dtype).items():
        if name == "adam" and dtype_name == "float16":
            continue  # scale_by_adam via rmsjax.adam keeps float16 moments: subnormals round
        scaled_grads = _scaled(grads, 2.0**power)
        # Scaling by a power of two is exact unless it leaves the dtype's normal range.
        assume(all(
            np.array_equal(_f32(a) * 2.0**power, _f32(b))
            for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(scaled_grads))
        ))
        base = _run(tx, params, grads)
        scaled = _run(tx, params, scaled_grads)
        for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(scaled)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


@PROPERTY
@given(
    case=trees(dtype_names=("float32",)),
    learning_rate=learning_rates,
    decay=decays,
    b1=st.floats(0.0, 0.99),
    c=st.floats(1e-3, 1e3),
)
def test_eps_zero_steps_ignore_any_positive_gradient_scale(case, learning_rate, decay, b1, c):
    _, params, grads = case
    for name, tx in _scale_invariant_optimizers(learning_rate, decay, b1, None).items():
        base = _run(tx, params, grads)
        scaled = _run(tx, params, _scaled(grads, c))
        for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(scaled)):
            # Centring subtracts nearly equal numbers, which magnifies rounding.
            np.testing.assert_allclose(a, b, rtol=1e-3 if "centered" in name else 2e-5,
                                       atol=1e-6 * learning_rate, err_msg=name)


# ---------------------------------------------------------------- 4, 5, 6: over many transformations


# How the drawn hyperparameters reach each case of registry.py tagged "properties" (the
# case's other settings, e.g. centred, AMSGrad, debiased, stay as the registry has them).
_DRAWN = {
    "rmsprop": lambda lr, decay, eps, momentum, state_dtype: dict(
        learning_rate=lr, decay=decay, eps=eps, momentum=momentum, state_dtype=state_dtype),
    "rmsprop_centered_l2": lambda lr, decay, eps, momentum, state_dtype: dict(
        learning_rate=lr, decay=_centred(decay), eps=eps, state_dtype=state_dtype),
    "adagrad": lambda lr, decay, eps, momentum, state_dtype: dict(learning_rate=lr, eps=eps),
    "adam": lambda lr, decay, eps, momentum, state_dtype: dict(
        learning_rate=lr, b2=decay, eps=eps, nesterov=momentum > 0),
    "adamw": lambda lr, decay, eps, momentum, state_dtype: dict(learning_rate=lr, b2=decay, eps=eps),
    "adadelta": lambda lr, decay, eps, momentum, state_dtype: dict(learning_rate=lr, rho=decay, eps=eps),
    "sgd": lambda lr, decay, eps, momentum, state_dtype: dict(learning_rate=lr, momentum=momentum),
    "scale_by_adam": lambda lr, decay, eps, momentum, state_dtype: dict(
        b2=decay, eps=eps, state_dtype=state_dtype),
    "leaky_average": lambda lr, decay, eps, momentum, state_dtype: dict(decay=decay, state_dtype=state_dtype),
    "torch.RMSprop_plain": lambda lr, decay, eps, momentum, state_dtype: dict(
        lr=lr, alpha=decay, eps=eps, momentum=momentum),
    "keras.Adam": lambda lr, decay, eps, momentum, state_dtype: dict(
        learning_rate=lr, beta_2=decay, epsilon=eps),
    "tf1.RMSPropOptimizer_plain": lambda lr, decay, eps, momentum, state_dtype: dict(
        learning_rate=lr, decay=decay, momentum=momentum, epsilon=eps),
}
assert set(_DRAWN) == set(registry.names("properties")), set(_DRAWN) ^ set(registry.names("properties"))


def _transformations(learning_rate, decay, eps, momentum, state_dtype):
    return {
        name: case.make(**_DRAWN[name](learning_rate, decay, eps, momentum, state_dtype))
        for name, case in registry.tagged("properties").items()
    }


transformation_names = st.sampled_from(sorted(_transformations(0.1, 0.9, 1e-8, 0.5, None)))
momenta = st.one_of(st.just(0.0), st.floats(0.1, 0.99))
state_dtypes = st.sampled_from([None, jnp.float32, jnp.bfloat16])


def _structure(state):
    return jax.tree.structure(state), [(x.shape, x.dtype) for x in jax.tree.leaves(state)]


@PROPERTY
@given(
    case=trees(),
    name=transformation_names,
    learning_rate=learning_rates,
    decay=decays,
    eps=st.floats(1e-10, 1e-3),
    momentum=momenta,
    state_dtype=state_dtypes,
)
def test_jit_eager_and_state_structure(case, name, learning_rate, decay, eps, momentum, state_dtype):
    dtype_name, params, grads = case
    tx = _transformations(learning_rate, decay, eps, momentum, state_dtype)[name]
    update = jax.jit(tx.update)
    state = jitted_state = tx.init(params)
    initial = _structure(state)
    for g in grads:
        updates, state = tx.update(g, state, params)
        jitted, jitted_state = update(g, jitted_state, params)
        # (6) the state keeps its tree structure, shapes and dtypes; updates the gradients' dtype
        assert _structure(state) == initial == _structure(jitted_state)
        for u, gradient in zip(jax.tree.leaves(updates), jax.tree.leaves(g)):
            assert u.dtype == gradient.dtype and u.shape == gradient.shape
        # (4) jit and eager agree (XLA may fuse differently: to a few roundings). Not checked
        # for float16: under jit, XLA (on GPU) may drop a float32 -> float16 -> float32 round
        # trip of an intermediate value, so a square that underflows float16 eagerly does not
        # under jit, and the two differ by far more than a rounding (docs/reliability.md).
        if dtype_name == "float16":
            continue
        for a, b in zip(jax.tree.leaves((updates, state)), jax.tree.leaves((jitted, jitted_state))):
            if jnp.issubdtype(a.dtype, jnp.integer):
                np.testing.assert_array_equal(a, b)
            else:
                np.testing.assert_allclose(_f32(a), _f32(b), rtol=ROUNDING[dtype_name] * 4, atol=1e-6)


# ---------------------------------------------------------------- 5: rmsprop is its documented chain


@PROPERTY
@given(
    case=trees(),
    learning_rate=learning_rates,
    decay=decays,
    eps=epsilons,
    momentum=momenta,
    nesterov=st.booleans(),
    weight_decay=st.one_of(st.just(0.0), st.floats(1e-4, 0.1)),
    centered=st.booleans(),
    eps_in_sqrt=st.booleans(),
    bias_correction=st.booleans(),
    initial_scale=st.sampled_from([0.0, 1.0]),
)
def test_rmsprop_is_its_documented_chain(case, learning_rate, decay, eps, momentum, nesterov, weight_decay,
                                         centered, eps_in_sqrt, bias_correction, initial_scale):
    """``rmsjax.rmsprop`` is ``[L2] -> scale_by_rms | scale_by_stddev -> [momentum] -> rate``.

    Built here from the public parts (``transforms.absent()`` where a part is off), the chain
    gives the same state tree and the same numbers, bit for bit.
    """
    dtype_name, params, grads = case
    nesterov = nesterov and momentum > 0
    decay = _centred(decay) if centered else decay
    state_dtype = _state_dtype_for(dtype_name)
    settings = dict(eps_in_sqrt=eps_in_sqrt, initial_scale=initial_scale, bias_correction=bias_correction,
                    state_dtype=state_dtype)
    # A drawn 0 stands for "off": None in the 0.3 signature (a given 0 keeps the part).
    ours = rmsjax.rmsprop(learning_rate, decay, eps, centered=centered, momentum=momentum or None,
                          nesterov=nesterov, weight_decay=weight_decay or None, **settings)
    parts = optax.chain(
        rmsjax.transforms.add_decayed_weights(weight_decay) if weight_decay else rmsjax.transforms.absent(),
        (rmsjax.scale_by_stddev if centered else rmsjax.scale_by_rms)(decay, eps, **settings),
        rmsjax.momentum(momentum, nesterov=nesterov) if momentum else rmsjax.transforms.absent(),
        rmsjax.transforms.scale_by_learning_rate(learning_rate),
    )
    state, chain_state = ours.init(params), parts.init(params)
    for g in grads:
        assert jax.tree.structure(state) == jax.tree.structure(chain_state)
        updates, state = ours.update(g, state, params)
        chain_updates, chain_state = parts.update(g, chain_state, params)
        for a, b in zip(jax.tree.leaves((updates, state)), jax.tree.leaves((chain_updates, chain_state)),
                        strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
