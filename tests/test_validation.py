"""Bad input fails loudly: one table of invalid hyperparameters over every public factory.

Each row builds a factory of layer 2, 3 or 4 with exactly one bad argument and expects a
``ValueError`` (a value out of range) or a ``TypeError`` (not a number, not a bool, not a
dtype) at construction, with a message that names the argument and the value given, and,
for a value out of range, the allowed range. Jax arrays and tracers are not inspected and
keep working (``optax.inject_hyperparams``, schedules, ``jax.jit``). Trees that do not match
the state fail at the first update, naming the first differing path and both sides.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsjax
from rmsjax.compat import keras as kc
from rmsjax.compat import tf1
from rmsjax.compat import torch as pt

NAN, INF = float("nan"), float("inf")

# Bad values by the kind of argument; (value, expected exception).
LEARNING_RATE = [
    (-0.1, ValueError), (-1e-12, ValueError), (NAN, ValueError), (INF, ValueError), (-INF, ValueError),
    ("0.1", TypeError), (None, TypeError), (True, TypeError), (1 + 0j, TypeError),
    (np.array([0.1, 0.2]), TypeError),
]
UNIT = [  # [0, 1)
    (-0.1, ValueError), (1.0, ValueError), (1.5, ValueError), (NAN, ValueError), (INF, ValueError),
    ("0.9", TypeError), (None, TypeError),
]
CLOSED_UNIT = [  # [0, 1]
    (-0.1, ValueError), (1.5, ValueError), (NAN, ValueError), ("0", TypeError),
]
NON_NEGATIVE = [
    (-1e-8, ValueError), (-1.0, ValueError), (NAN, ValueError), (INF, ValueError),
    ("1e-8", TypeError), (None, TypeError),
]
NON_NEGATIVE_OR_NONE = [row for row in NON_NEGATIVE if row[0] is not None]
UNIT_OR_NONE = [row for row in UNIT if row[0] is not None]  # an optional part: None = absent
FLAG = [(1, TypeError), ("yes", TypeError), (None, TypeError)]
DTYPE = [(jnp.int32, ValueError), (jnp.bool_, ValueError), ("float33", TypeError)]

KINDS = {
    "lr": LEARNING_RATE, "unit": UNIT, "closed": CLOSED_UNIT, "nonneg": NON_NEGATIVE,
    "flag": FLAG, "dtype": DTYPE, "nonneg_or_none": NON_NEGATIVE_OR_NONE, "unit_or_none": UNIT_OR_NONE,
}

# factory name -> (factory, required positional arguments, {argument: kind})
RMS_ARGS = {
    "decay": "unit", "eps": "nonneg", "initial_scale": "nonneg", "eps_in_sqrt": "flag",
    "bias_correction": "flag", "state_dtype": "dtype",
}
FACTORIES = {
    # layer 2
    "scale_by_rms": (rmsjax.scale_by_rms, {}, RMS_ARGS),
    "scale_by_stddev": (rmsjax.scale_by_stddev, {}, RMS_ARGS),
    "scale_by_rss": (rmsjax.scale_by_rss, {}, {
        "initial_accumulator_value": "nonneg", "eps": "nonneg", "eps_in_sqrt": "flag"}),
    "scale_by_adam": (rmsjax.scale_by_adam, {}, {
        "b1": "unit", "b2": "unit", "eps": "nonneg", "eps_root": "nonneg", "nesterov": "flag",
        "amsgrad": "flag", "eps_hat": "flag", "state_dtype": "dtype"}),
    "scale_by_adadelta": (rmsjax.scale_by_adadelta, {}, {"rho": "unit", "eps": "nonneg"}),
    "leaky_average": (rmsjax.leaky_average, {"decay": 0.9}, {
        "decay": "unit", "debias": "flag", "state_dtype": "dtype"}),
    "momentum": (rmsjax.momentum, {"decay": 0.9}, {
        "decay": "unit", "nesterov": "flag", "dampening": "closed"}),  # dampening=None: none
    # layer 3
    "rmsprop": (rmsjax.rmsprop, {"learning_rate": 0.1}, {
        "learning_rate": "lr", "decay": "unit", "eps": "nonneg", "centered": "flag",
        "momentum": "unit_or_none", "nesterov": "flag", "weight_decay": "nonneg_or_none",
        "bias_correction": "flag",
        "eps_in_sqrt": "flag", "initial_scale": "nonneg", "state_dtype": "dtype"}),
    "adagrad": (rmsjax.adagrad, {"learning_rate": 0.1}, {
        "learning_rate": "lr", "initial_accumulator_value": "nonneg", "eps": "nonneg"}),
    "adam": (rmsjax.adam, {"learning_rate": 0.1}, {
        "learning_rate": "lr", "b1": "unit", "b2": "unit", "eps": "nonneg", "eps_root": "nonneg",
        "nesterov": "flag"}),
    "adamw": (rmsjax.adamw, {"learning_rate": 0.1}, {
        "learning_rate": "lr", "b1": "unit", "b2": "unit", "eps": "nonneg",
        "weight_decay": "nonneg_or_none"}),
    "adadelta": (rmsjax.adadelta, {}, {
        "learning_rate": "lr", "rho": "unit", "eps": "nonneg", "weight_decay": "nonneg_or_none"}),
    "sgd": (rmsjax.sgd, {"learning_rate": 0.1}, {
        "learning_rate": "lr", "momentum": "unit_or_none", "nesterov": "flag"}),
    # layer 4
    "torch.RMSprop": (pt.RMSprop, {}, {
        "lr": "lr", "alpha": "unit", "eps": "nonneg", "weight_decay": "nonneg", "momentum": "unit",
        "centered": "flag", "maximize": "flag"}),
    "torch.Adagrad": (pt.Adagrad, {}, {
        "lr": "lr", "lr_decay": "nonneg", "weight_decay": "nonneg",
        "initial_accumulator_value": "nonneg", "eps": "nonneg", "maximize": "flag"}),
    "torch.Adam": (pt.Adam, {}, {
        "lr": "lr", "eps": "nonneg", "weight_decay": "nonneg", "amsgrad": "flag", "maximize": "flag"}),
    "torch.AdamW": (pt.AdamW, {}, {
        "lr": "lr", "eps": "nonneg", "weight_decay": "nonneg", "amsgrad": "flag", "maximize": "flag"}),
    "torch.Adadelta": (pt.Adadelta, {}, {
        "lr": "lr", "rho": "unit", "eps": "nonneg", "weight_decay": "nonneg", "maximize": "flag"}),
    "torch.SGD": (pt.SGD, {}, {
        "lr": "lr", "momentum": "unit", "dampening": "closed", "weight_decay": "nonneg",
        "nesterov": "flag", "maximize": "flag"}),
    "keras.RMSprop": (kc.RMSprop, {}, {
        "learning_rate": "lr", "rho": "unit", "momentum": "unit", "epsilon": "nonneg",
        "centered": "flag", "weight_decay": "nonneg_or_none"}),
    "keras.Adagrad": (kc.Adagrad, {}, {
        "learning_rate": "lr", "initial_accumulator_value": "nonneg", "epsilon": "nonneg"}),
    "keras.Adam": (kc.Adam, {}, {
        "learning_rate": "lr", "beta_1": "unit", "beta_2": "unit", "epsilon": "nonneg",
        "amsgrad": "flag"}),
    "keras.Adadelta": (kc.Adadelta, {}, {"learning_rate": "lr", "rho": "unit", "epsilon": "nonneg"}),
    "tf1.RMSPropOptimizer": (tf1.RMSPropOptimizer, {"learning_rate": 0.1}, {
        "learning_rate": "lr", "decay": "unit", "momentum": "unit", "epsilon": "nonneg",
        "centered": "flag"}),
}


def _table():
    """(id, make, exception, argument name, bad value) for every factory, argument and bad value."""
    rows = []
    for factory_name, (factory, required, arguments) in FACTORIES.items():
        for argument, kind in arguments.items():
            for value, error in KINDS[kind]:
                kwargs = {**required, argument: value}
                name = f"{factory_name}({argument}={value!r})"
                rows.append((name, factory, kwargs, error, argument, value))
    # Arguments that are not a plain keyword with a plain value.
    for name, factory in (("torch.Adam", pt.Adam), ("torch.AdamW", pt.AdamW)):
        for index in (0, 1):
            for value, error in UNIT:
                betas = [0.9, 0.999]
                betas[index] = value
                rows.append((f"{name}(betas={tuple(betas)!r})", factory, {"betas": tuple(betas)}, error,
                             "betas", value))
        rows.append((f"{name}(betas=(0.9,))", factory, {"betas": (0.9,)}, ValueError, "betas", (0.9,)))
        rows.append((f"{name}(betas=0.9)", factory, {"betas": 0.9}, ValueError, "betas", 0.9))
        # unordered: a set would unpack in hash order, swapping the two without a word
        rows.append((f"{name}(betas={{0.9, 0.99}})", factory, {"betas": {0.9, 0.99}}, ValueError, "betas",
                     {0.9, 0.99}))
    # Nesterov without momentum, where rmsjax (and PyTorch's SGD) forbid it.
    rows += [
        ("rmsprop(nesterov, momentum=0)", rmsjax.rmsprop, {"learning_rate": 0.1, "nesterov": True},
         ValueError, "momentum", 0),
        ("sgd(nesterov, momentum=0)", rmsjax.sgd, {"learning_rate": 0.1, "nesterov": True},
         ValueError, "momentum", 0),
        ("torch.SGD(nesterov, momentum=0)", pt.SGD, {"nesterov": True}, ValueError, "momentum", 0.0),
        ("torch.SGD(nesterov, dampening=0.5)", pt.SGD, {"nesterov": True, "momentum": 0.9, "dampening": 0.5},
         ValueError, "dampening", 0.5),
    ]
    # Layer-2 transformations the optimizers use internally, with schedules' rival: a string.
    rows += [
        ("scale_by_learning_rate(-1)", rmsjax.transforms.scale_by_learning_rate, {"learning_rate": -1.0},
         ValueError, "learning_rate", -1.0),
        ("scale_by_learning_rate('x')", rmsjax.transforms.scale_by_learning_rate, {"learning_rate": "x"},
         TypeError, "learning_rate", "x"),
        ("add_decayed_weights(-1)", rmsjax.transforms.add_decayed_weights, {"weight_decay": -1.0},
         ValueError, "weight_decay", -1.0),
        ("add_decayed_weights(nan)", rmsjax.transforms.add_decayed_weights, {"weight_decay": NAN},
         ValueError, "weight_decay", NAN),
    ]
    return rows


TABLE = _table()
assert len({row[0] for row in TABLE}) == len(TABLE), "two rows of TABLE share an id"
RANGE_WORDS = ("[0, 1)", "(0, 1)", "[0, 1]", ">= 0", "> 0", "pair", "dampening == 0", "floating dtype")


@pytest.mark.parametrize("row", TABLE, ids=[row[0] for row in TABLE])
def test_bad_input_is_rejected_naming_the_argument(row):
    _, factory, kwargs, error, argument, value = row
    with pytest.raises(error) as raised:
        factory(**kwargs)
    message = str(raised.value)
    assert argument in message, message
    if isinstance(value, np.ndarray):
        assert str(value.shape) in message or repr(value) in message, message  # its shape or value
    else:
        assert repr(value) in message, message  # the value given (nan included)
    if error is ValueError:
        assert any(word in message for word in RANGE_WORDS), message


# ---------------------------------------------------------------- good edge values pass

GOOD = [
    lambda: rmsjax.rmsprop(0.0, decay=0.0, eps=0.0, momentum=0.0, weight_decay=0.0, initial_scale=0.0),
    lambda: rmsjax.rmsprop(np.float32(0.1), decay=np.float64(0.5), eps=np.array(1e-8)),
    lambda: rmsjax.momentum(0.9, dampening=1.0),
    lambda: rmsjax.sgd(optax.linear_schedule(0.1, 0.0, 10), momentum=0.9, nesterov=True),
    lambda: pt.SGD(momentum=0.9, nesterov=True),
    lambda: kc.RMSprop(weight_decay=None),
    lambda: rmsjax.scale_by_rms(state_dtype="bfloat16"),
]


@pytest.mark.parametrize("make", GOOD)
def test_boundary_values_are_accepted(make):
    assert isinstance(make(), optax.GradientTransformation)


# ---------------------------------------------------------------- arrays and tracers are not inspected


def test_jax_array_hyperparameters_are_not_inspected():
    # A jax array's value is not read at construction (it may be a tracer); the factory
    # builds, and the numbers flow into the update.
    tx = rmsjax.rmsprop(jnp.asarray(0.1), decay=jnp.asarray(0.9), eps=jnp.asarray(1e-8),
                        momentum=jnp.asarray(0.5), weight_decay=jnp.asarray(0.01))
    params = jnp.ones(3)
    updates, _ = tx.update(jnp.ones(3), tx.init(params), params)
    assert jnp.all(jnp.isfinite(updates))


def test_tracer_hyperparameters_under_jit():
    params = jnp.array([1.0, -2.0])

    @jax.jit
    def step(lr, decay, momentum):
        tx = rmsjax.rmsprop(lr, decay=decay, momentum=momentum)
        return tx.update(2 * params, tx.init(params), params)[0]

    eager = rmsjax.rmsprop(0.1, decay=0.9, momentum=0.5)
    expected = eager.update(2 * params, eager.init(params), params)[0]
    # Traced, the scalars (1 - decay, ...) are float32 operations on the device; concrete, they
    # are rounded once on the host. Bit for bit on XLA:CPU (measured); XLA:GPU's float32
    # arithmetic leaves one element one ulp off (measured on an H200).
    maxulp = 0 if jax.default_backend() == "cpu" else 1
    np.testing.assert_array_max_ulp(step(0.1, 0.9, 0.5), expected, maxulp=maxulp)


@pytest.mark.parametrize(
    "factory,hyper",
    [
        (rmsjax.rmsprop, dict(learning_rate=0.1, decay=0.9, eps=1e-8, momentum=0.5, weight_decay=0.01)),
        (rmsjax.adam, dict(learning_rate=0.1, b1=0.9, b2=0.99, eps=1e-8)),
        (rmsjax.adagrad, dict(learning_rate=0.1, initial_accumulator_value=0.1, eps=1e-10)),
        (rmsjax.adadelta, dict(learning_rate=1.0, rho=0.9, eps=1e-6)),
        (rmsjax.sgd, dict(learning_rate=0.1, momentum=0.9)),
        (pt.RMSprop, dict(lr=0.1, alpha=0.99, eps=1e-8, momentum=0.5)),
        (kc.RMSprop, dict(learning_rate=0.1, rho=0.9, momentum=0.5, epsilon=1e-7)),
        (tf1.RMSPropOptimizer, dict(learning_rate=0.1, decay=0.9, momentum=0.5, epsilon=1e-10)),
    ],
    ids=lambda x: getattr(x, "__qualname__", None) or getattr(x, "__name__", "") or "",
)
def test_inject_hyperparams_keeps_working(factory, hyper):
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    grads = {"w": jnp.array([0.5, -1.0, 2.0])}
    plain = factory(**hyper)
    injected = optax.inject_hyperparams(factory)(**hyper)
    state, plain_state = injected.init(params), plain.init(params)
    update = jax.jit(injected.update)
    for _ in range(3):
        got, state = update(grads, state, params)
        want, plain_state = plain.update(grads, plain_state, params)
        np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6)
    # Changing a hyperparameter in the state changes the step, without a new construction.
    state.hyperparams[next(iter(hyper))] = jnp.asarray(0.0)
    zero, _ = update(grads, state, params)
    assert not np.allclose(zero["w"], got["w"])


# ---------------------------------------------------------------- trees that do not match


def _rms():
    return rmsjax.rmsprop(0.1, weight_decay=0.1)


def test_wrong_key_names_both_paths():
    tx = _rms()
    params = {"w": jnp.ones(3), "b": jnp.ones(2)}
    with pytest.raises(ValueError) as raised:
        tx.update({"w": jnp.ones(3), "c": jnp.ones(2)}, tx.init(params), params)
    message = str(raised.value)
    assert "['c']" in message and "['b']" in message, message


def test_extra_leaf_names_it():
    tx = rmsjax.scale_by_rms()
    state = tx.init({"w": jnp.ones(3)})
    with pytest.raises(ValueError) as raised:
        tx.update({"w": jnp.ones(3), "x": jnp.ones(1)}, state)
    assert "['x']" in str(raised.value) and "scale_by_rms" in str(raised.value)


def test_different_structure_is_named():
    tx = rmsjax.adam(0.1)
    state = tx.init([jnp.ones(2), jnp.ones(2)])
    with pytest.raises(ValueError, match="scale_by_adam"):
        tx.update((jnp.ones(2), jnp.ones(2)), state)


def test_wrong_shape_names_path_and_both_shapes():
    tx = rmsjax.adagrad(0.1)
    state = tx.init({"layer": {"kernel": jnp.ones((3, 4))}})
    with pytest.raises(ValueError) as raised:
        tx.update({"layer": {"kernel": jnp.ones((4, 3))}}, state)
    message = str(raised.value)
    assert "['layer']['kernel']" in message and "[4, 3]" in message and "[3, 4]" in message, message


def test_complex_gradient_for_real_parameter_is_named():
    tx = _rms()
    params = {"w": jnp.ones(2)}
    state = tx.init(params)
    with pytest.raises(ValueError) as raised:
        tx.update({"w": jnp.ones(2, jnp.complex64)}, state, params)
    message = str(raised.value)
    assert "['w']" in message and "complex64" in message and "float32" in message, message


def test_precision_may_differ_between_gradient_and_parameter():
    # A float32 gradient for a bfloat16 parameter is ordinary mixed precision, not an error.
    tx = _rms()
    params = {"w": jnp.ones(2, jnp.bfloat16)}
    updates, _ = tx.update({"w": jnp.ones(2, jnp.float32)}, tx.init(params), params)
    assert updates["w"].dtype == jnp.float32


def test_check_trees_match_exact_dtypes():
    from rmsjax import _validation

    with pytest.raises(ValueError, match="bfloat16"):
        _validation.check_trees_match(
            {"w": jnp.ones(2)}, {"w": jnp.ones(2, jnp.bfloat16)}, what="params", who="t", dtypes="exact"
        )
    _validation.check_trees_match({"w": jnp.ones(2)}, {"w": jnp.ones(2, jnp.bfloat16)}, what="p", who="t")
    with pytest.raises(ValueError, match="dtypes"):
        _validation.check_trees_match({}, {}, what="p", who="t", dtypes="close")


@pytest.mark.parametrize(
    "make",
    [
        lambda: rmsjax.rmsprop(0.1, weight_decay=0.1),
        lambda: rmsjax.adamw(0.1),
        lambda: rmsjax.adadelta(weight_decay=0.1),
        lambda: pt.SGD(lr=0.1, weight_decay=0.1),
        lambda: pt.AdamW(),
        lambda: kc.RMSprop(weight_decay=0.1),
    ],
)
def test_weight_decay_without_params_says_so(make):
    tx = make()
    grads = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="needs the current parameters"):
        tx.update(grads, tx.init(grads))
