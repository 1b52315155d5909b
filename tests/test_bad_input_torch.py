"""Bad input to rmsjax.compat.torch fails at once, naming what is wrong.

ReduceLROnPlateau's ``value`` and state, the state ``state_dict`` exports, the arrays and
arguments ``load_state_dict`` reads, and OneCycleLR's ``epochs`` and ``steps_per_epoch``
beside ``total_steps``. Each bad case has a valid neighbour that keeps working.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsjax
from rmsjax.compat import torch as pt
from rmsjax.compat.torch.lr_scheduler import OneCycleLR, ReduceLROnPlateau, ReduceLROnPlateauState

P = jnp.zeros(2)
G = jnp.ones(2)

# ---------------------------------------------------------------- ReduceLROnPlateau


@pytest.mark.parametrize(
    "value",
    [jnp.array([1.0, 2.0]), jnp.linspace(1.0, 2.0, 8), np.ones(1), None, "1.0", True, np.bool_(True),
     1.0 + 2.0j, np.complex64(1.0), jnp.asarray(1.0 + 2.0j), jnp.asarray(True), 10**400],
    ids=["shape2", "shape8", "np-shape1", "None", "str", "bool", "np-bool", "complex", "np-complex",
         "jax-complex", "jax-bool", "huge-int"],
)
def test_plateau_value_must_be_a_real_scalar(value):
    tx = ReduceLROnPlateau(1.0, patience=0)
    with pytest.raises((TypeError, ValueError), match=r"value must be a real scalar"):
        tx.update(G, tx.init(P), value=value)


@pytest.mark.parametrize(
    "value", [2, 2.5, float("nan"), np.float32(2.0), np.int64(2), np.array(2.0), jnp.asarray(2.0),
              jnp.asarray(2, jnp.int32)],
    ids=["int", "float", "nan", "np-float32", "np-int64", "np-0d", "jax-0d", "jax-int"],
)
def test_plateau_value_real_scalars_still_work(value):
    tx = ReduceLROnPlateau(1.0, patience=0)
    updates, state = tx.update(G, tx.init(P), value=value)
    assert all(jnp.shape(x) == () for x in jax.tree.leaves(state))
    np.testing.assert_array_equal(updates, np.ones(2, np.float32))


def test_plateau_value_is_checked_under_jit():
    tx = ReduceLROnPlateau(1.0, patience=0)
    step = jax.jit(lambda s, v: tx.update(G, s, value=v))
    _, state = step(tx.init(P), jnp.asarray(3.0))
    assert isinstance(state, ReduceLROnPlateauState) and state.best.shape == ()
    with pytest.raises(TypeError, match=r"value must be a real scalar.*shape \(2,\)"):
        step(tx.init(P), jnp.ones(2))


@pytest.mark.parametrize(
    "state", [rmsjax.adam(0.1).init(P), optax.EmptyState(), rmsjax.sgd(0.1).init(P)[1]],
    ids=["adam", "EmptyState", "ScaleByLearningRateState"],
)
def test_plateau_refuses_another_transformations_state(state):
    with pytest.raises(TypeError, match=r"ReduceLROnPlateau\.update: expected a ReduceLROnPlateauState"):
        ReduceLROnPlateau(0.1).update(G, state, value=1.0)


# ---------------------------------------------------------------- OneCycleLR


@pytest.mark.parametrize("name", ["epochs", "steps_per_epoch"])
@pytest.mark.parametrize("bad", [-1, 0, "x", float("nan"), 1.5, True], ids=str)
def test_one_cycle_checks_epochs_and_steps_per_epoch_beside_total_steps(name, bad):
    with pytest.raises((TypeError, ValueError), match=name):
        OneCycleLR(0.1, max_lr=1.0, total_steps=100, **{name: bad})


def test_one_cycle_total_steps_still_wins_over_valid_epochs():
    alone = OneCycleLR(0.1, max_lr=1.0, total_steps=100)
    beside = OneCycleLR(0.1, max_lr=1.0, total_steps=100, epochs=3, steps_per_epoch=7)
    counts = jnp.arange(101)
    np.testing.assert_array_equal(jax.vmap(alone)(counts), jax.vmap(beside)(counts))
    by_epochs = OneCycleLR(0.1, max_lr=1.0, epochs=4, steps_per_epoch=25)
    np.testing.assert_array_equal(jax.vmap(alone)(counts), jax.vmap(by_epochs)(counts))


# ---------------------------------------------------------------- state_dict

PARAMS = {"a": jnp.ones(2), "b": jnp.full(3, 2.0)}


def _stepped(tx, params=PARAMS):
    _, state = tx.update(params, tx.init(params), params)
    return state


def test_state_dict_refuses_another_optimizers_state():
    sgd_state = _stepped(pt.SGD(lr=0.01, momentum=0.9))
    match = r"opt_state is not a state of this tx.*MomentumState.*ScaleByAdamState"
    with pytest.raises(ValueError, match=match):
        pt.state_dict(pt.Adam(lr=0.01), sgd_state, PARAMS, arrays="numpy")


@pytest.mark.parametrize(
    "params, match",
    [({"a": jnp.ones(2)}, r"first difference at opt_state\[2\]\.mu\['b'\]"),
     ({**PARAMS, "c": jnp.ones(1)}, r"first difference"),
     ({"a": jnp.ones(5), "b": jnp.ones(7)}, r"at \[2\]\.mu\['a'\]: opt_state has float32\[2\], "
                                             r"tx.init\(params\) float32\[5\]"),
     ({"a": jnp.ones(2, jnp.bfloat16), "b": jnp.ones(3, jnp.bfloat16)}, r"bfloat16\[2\]")],
    ids=["fewer-leaves", "more-leaves", "other-shapes", "other-dtypes"],
)
def test_state_dict_refuses_a_state_made_for_other_params(params, match):
    tx = pt.Adam(lr=0.01)
    with pytest.raises(ValueError, match=match):
        pt.state_dict(tx, _stepped(tx), params, arrays="numpy")


def test_state_dict_of_the_matching_state_still_exports():
    tx = pt.Adam(lr=0.01)
    sd = pt.state_dict(tx, _stepped(tx), PARAMS, arrays="numpy")
    assert {i: e["exp_avg"].shape for i, e in sd["state"].items()} == {0: (2,), 1: (3,)}
    groups = pt.param_groups(pt.RMSprop, lr=0.1, momentum=0.9)
    sd = pt.state_dict(groups, _stepped(groups), PARAMS, arrays="numpy")
    assert sorted(sd["state"][1]) == ["momentum_buffer", "square_avg", "step"]


@pytest.mark.parametrize("order", [[True, False], [1.0, 0.0], "ab", 1, [None, 0]],
                         ids=["bools", "floats", "str", "int", "None-item"])
def test_state_dict_checks_order(order):
    tx = pt.Adam(lr=0.01)
    with pytest.raises(TypeError, match=r"order must be None or a sequence"):
        pt.state_dict(tx, _stepped(tx), PARAMS, order=order, arrays="numpy")


def test_state_dict_checks_layout():
    tx = pt.Adam(lr=0.01)
    with pytest.raises(TypeError, match=r"layout must be None or a callable"):
        pt.state_dict(tx, _stepped(tx), PARAMS, layout=3, arrays="numpy")  # pyright: ignore[reportArgumentType]


# ---------------------------------------------------------------- load_state_dict

ADAM_GROUP = {"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0, "amsgrad": False,
              "maximize": False, "params": [0, 1]}
RMSPROP_GROUP = {"lr": 0.01, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0, "momentum": 0,
                 "centered": False, "maximize": False, "params": [0, 1]}


def _adam_sd(**entry0):
    return {"state": {0: {"step": np.float32(3), "exp_avg": np.ones(2, np.float32),
                          "exp_avg_sq": np.ones(2, np.float32), **entry0},
                      1: {"step": np.float32(3), "exp_avg": np.ones(3, np.float32),
                          "exp_avg_sq": np.ones(3, np.float32)}},
            "param_groups": [dict(ADAM_GROUP)]}


def _amsgrad_sd(max_exp_avg_sq):
    sd = _adam_sd(max_exp_avg_sq=max_exp_avg_sq)
    sd["state"][1]["max_exp_avg_sq"] = np.ones(3, np.float32)
    sd["param_groups"][0]["amsgrad"] = True
    return sd


@pytest.mark.parametrize(
    "tx, sd, key",
    [(pt.Adam(lr=0.01), _adam_sd(exp_avg_sq=np.array([0.5, -1.0], np.float32)), "exp_avg_sq"),
     (pt.Adam(lr=0.01, amsgrad=True), _amsgrad_sd(np.array([-1e-30, 1.0], np.float32)), "max_exp_avg_sq"),
     (pt.RMSprop(lr=0.01),
      {"state": {0: {"step": np.float32(3), "square_avg": np.full(2, -5.0, np.float32)},
                 1: {"step": np.float32(3), "square_avg": np.ones(3, np.float32)}},
       "param_groups": [RMSPROP_GROUP]}, "square_avg")],
    ids=["adam", "amsgrad", "rmsprop"],
)
def test_load_refuses_a_negative_second_moment(tx, sd, key):
    match = rf"state_dict\['state'\]\[0\]\['{key}'\] \(parameter 0, 'a'\) has a negative value"
    with pytest.raises(ValueError, match=match):
        pt.load_state_dict(tx, sd, PARAMS)


def test_load_refuses_a_negative_part_of_a_complex_second_moment():
    params = {"z": jnp.ones(2, jnp.complex64)}
    tx = pt.Adam(lr=0.01)
    sd = {"state": {0: {"step": np.float32(1), "exp_avg": np.ones(2, np.complex64),
                        "exp_avg_sq": np.array([1 + 1j, 1 - 1j], np.complex64)}},
          "param_groups": [ADAM_GROUP | {"params": [0]}]}
    match = r"'exp_avg_sq'\] \(parameter 0, 'z'\) has a negative value at index \(1,\)"
    with pytest.raises(ValueError, match=match):
        pt.load_state_dict(tx, sd, params)
    sd["state"][0]["exp_avg_sq"] = np.array([1 + 1j, 0.0], np.complex64)
    pt.load_state_dict(tx, sd, params)


@pytest.mark.parametrize("value", [np.array(["1.5", "2.5"]), np.array([True, False]), None],
                         ids=["strings", "bools", "None"])
def test_load_refuses_state_arrays_that_are_not_numbers(value):
    with pytest.raises(ValueError, match=r"\['exp_avg'\] must be an array of numbers"):
        pt.load_state_dict(pt.Adam(lr=0.01), _adam_sd(exp_avg=value), PARAMS)


def test_load_of_valid_state_arrays_still_works():
    sd = _adam_sd(exp_avg=[1.0, 2.0], exp_avg_sq=np.array([0.0, -0.0], np.float64))
    state = pt.load_state_dict(pt.Adam(lr=0.01), sd, PARAMS)
    np.testing.assert_array_equal(state[2].mu["a"], [1.0, 2.0])
    np.testing.assert_array_equal(state[2].nu["a"], [0.0, 0.0])


@pytest.mark.parametrize("order", [[True, False], [1.0, 0.0], "ab", 1, [None, 0]],
                         ids=["bools", "floats", "str", "int", "None-item"])
def test_load_checks_order(order):
    with pytest.raises(TypeError, match=r"order must be None or a sequence"):
        pt.load_state_dict(pt.Adam(lr=0.01), _adam_sd(), PARAMS, order=order)


@pytest.mark.parametrize("order", [[0, 1], ("a", "b"), np.array([0, 1]), [np.int64(0), "b"]],
                         ids=["ints", "paths", "np-array", "mixed"])
def test_valid_orders_still_work(order):
    state = pt.load_state_dict(pt.Adam(lr=0.01), _adam_sd(), PARAMS, order=order)
    assert state[2].mu["b"].shape == (3,)
    tx = pt.Adam(lr=0.01)
    assert set(pt.state_dict(tx, _stepped(tx), PARAMS, order=order, arrays="numpy")["state"]) == {0, 1}


def test_load_checks_layout():
    with pytest.raises(TypeError, match=r"layout must be None or a callable.*got 3 of type int"):
        pt.load_state_dict(pt.Adam(lr=0.01), _adam_sd(), PARAMS, layout=3)  # pyright: ignore[reportArgumentType]
