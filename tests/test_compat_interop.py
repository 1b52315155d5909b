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

import rmsjax
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


@pytest.mark.parametrize("clip", ["clipnorm", "clipvalue", "global_clipnorm"])
@pytest.mark.parametrize("limit", [0.0, 0.3, 5.0])
def test_injected_keras_clipping_gives_the_plain_updates(clip, limit):
    # An injected limit is a jax array, unknown at construction: the clip part is built, and
    # must still do what the plain one does (0: no clipping, as Keras's ``if clipnorm > 0``),
    # jitted as well, with the same numbers. (With no test in the program, an injected 0
    # zeroed every gradient; an injected global_clipnorm failed to trace.)
    grads = {"w": jnp.array([0.5, 0.25, -1.0]), "b": jnp.array([0.0])}
    plain = kc.SGD(0.1, **{clip: limit})
    tx = optax.inject_hyperparams(kc.SGD)(learning_rate=0.1, **{clip: limit})
    theirs, _ = plain.update(grads, plain.init(PARAMS), PARAMS)
    for update in (tx.update, jax.jit(tx.update)):
        ours, _ = update(grads, tx.init(PARAMS), PARAMS)
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
    if limit == 0.3:  # the limit binds here, so the test above compared clipped updates
        unclipped, _ = kc.SGD(0.1).update(grads, kc.SGD(0.1).init(PARAMS), PARAMS)
        assert not np.allclose(theirs["w"], unclipped["w"])


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


# ---------------------------------------------------------------- checkpoints: bad input


def _adam_dict(**group):
    sd = {
        "state": {0: {"step": np.float32(3), "exp_avg": np.ones(2), "exp_avg_sq": np.ones(2)}},
        "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0,
                          "amsgrad": False, "maximize": False, "params": [0]}],
    }
    sd["param_groups"][0].update(group)
    return sd


W = {"w": jnp.ones(2)}


@pytest.mark.parametrize(
    ("group", "key"), [({"lr": 0.5}, "lr"), ({"betas": (0.5, 0.9)}, "betas")], ids=["lr", "betas"]
)
def test_load_refuses_other_hyperparameters(group, key):
    with pytest.raises(ValueError, match=rf"\['param_groups'\]\[0\]\['{key}'\] is"):
        pt.load_state_dict(pt.Adam(lr=0.01), _adam_dict(**group), W)


@pytest.mark.parametrize(
    "step", [-5.0, float("nan"), float("inf"), 3e9, 2.5, np.array([1.0, 2.0])], ids=repr
)
def test_load_refuses_bad_steps_naming_the_key(step):
    sd = _adam_dict()
    sd["state"][0]["step"] = step
    with pytest.raises(ValueError, match=r"state_dict\['state'\]\[0\]\['step'\]"):
        pt.load_state_dict(pt.Adam(lr=0.01), sd, W)


def test_load_names_a_bad_state_key_and_param_groups_as_a_dict():
    sd = _adam_dict()
    sd["state"] = {"first": sd["state"][0]}
    with pytest.raises(ValueError, match="'first', which is not a parameter index"):
        pt.load_state_dict(pt.Adam(lr=0.01), sd, W)
    sd = _adam_dict()
    sd["param_groups"] = sd["param_groups"][0]
    with pytest.raises(ValueError, match=r"state_dict\['param_groups'\] must be a list"):
        pt.load_state_dict(pt.Adam(lr=0.01), sd, W)


def test_scheduled_sgd_without_step_raises():
    tx = pt.SGD(lr=pt.lr_scheduler.StepLR(0.1, 1, gamma=0.5), momentum=0.9)
    params = {"w": jnp.array([1.0, -2.0])}
    state = tx.init(params)
    for _ in range(3):
        _, state = tx.update(params, state, params)
    sd = pt.state_dict(tx, state, params, arrays="numpy")
    with pytest.raises(ValueError, match="pass step="):
        pt.load_state_dict(tx, sd, params)
    resumed = pt.load_state_dict(tx, sd, params, step=3)
    ours, _ = tx.update(params, resumed, params)
    theirs, _ = tx.update(params, state, params)
    np.testing.assert_array_equal(ours["w"], theirs["w"])


def test_complex_parameter_from_real_arrays_names_the_key():
    params = {"w": jnp.ones(2, jnp.complex64)}
    with pytest.raises(ValueError, match=r"\['state'\]\[0\]\['exp_avg'\] is float64.*complex64"):
        pt.load_state_dict(pt.Adam(lr=0.01), _adam_dict(), params)


def test_complex_gradient_for_a_real_parameter_is_refused():
    tx = pt.Adam()
    state = tx.init(W)
    grads = {"w": jnp.ones(2, jnp.complex64)}
    with pytest.raises(ValueError, match=r"\['w'\].*complex64.*float32"):
        tx.update(grads, state, W)
    with pytest.raises(ValueError, match=r"complex updates at \['w'\]"):
        tx.update(grads, state)


def test_export_of_a_wrapped_optimizer_says_why_not():
    import rmsjax

    params = {"w": jnp.zeros(4096)}
    for tx in (rmsjax.quantized(pt.Adam()), optax.chain(pt.Adam()), optax.inject_hyperparams(pt.Adam)()):
        with pytest.raises(ValueError, match="declares no PyTorch optimizer.*quantized"):
            pt.state_dict(tx, tx.init(params), params, arrays="numpy")


def test_export_of_another_framework_names_it():
    tx = timm.RMSpropTF()
    with pytest.raises(ValueError, match=r"not rmsjax.compat.timm.RMSpropTF"):
        pt.state_dict(tx, tx.init(W), W, arrays="numpy")


# ---------------------------------------------------------------- param_groups


def test_param_groups_state_paths_keep_parameter_names():
    tx = pt.param_groups(pt.Adam, [{"params": "b", "lr": 0.1}], lr=0.01)
    state = tx.init(PARAMS)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert any(p.endswith("mu['b']") for p in paths) and any(p.endswith("nu['w']") for p in paths)
    assert state.inner_states["0"].inner_state[2].mu["b"].shape == (1,)


def test_param_groups_refuse_other_keys_naming_them():
    tx = pt.param_groups(pt.Adam, [{"params": "a", "lr": 0.1}], lr=0.01)
    params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    state = tx.init(params)
    other = {"x": jnp.ones(2), "y": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"\['x'\].*\['a'\]"):
        tx.update(other, state, params)
    with pytest.raises(ValueError, match=r"selects no parameter.*\['x', 'y'\]"):
        tx.update(other, state)


def test_param_groups_errors_name_paths():
    tx = pt.param_groups(pt.Adam, [{"params": "a", "lr": 0.1}], lr=0.01)
    params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"\['b'\]"):
        tx.update({"a": jnp.ones(2), "b": jnp.ones(4)}, state)


def test_param_groups_0_2_state_fails_with_what_changed_and_upgrades():
    tx = pt.param_groups(pt.RMSprop, [{"params": "b", "lr": 0.1}], lr=0.01, momentum=0.9)
    state = tx.init(PARAMS)
    _, state = tx.update(GRADS, state, PARAMS)
    # A 0.2 state: the same leaves, each group's state over the list of its leaves.
    old_groups = []
    for label, leaves in (("0", [PARAMS["b"]]), ("1", [PARAMS["w"]])):
        inner = tx.groups[0].tx if label == "0" else tx.implicit.tx  # type: ignore[union-attr]
        fresh = inner.init(leaves)
        saved = jax.tree.leaves(state.inner_states[label].inner_state)
        old_groups.append(jax.tree.unflatten(jax.tree.structure(fresh), saved))
    old = pt.param_groups.__globals__["ParamGroupsState"](tuple(old_groups))
    with pytest.raises(ValueError, match="rmsjax 0.2.*upgrade_state"):
        tx.update(GRADS, old, PARAMS)
    upgraded = tx.upgrade_state(old, PARAMS)
    assert jax.tree.structure(upgraded) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(upgraded), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- schedules


def test_piecewise_constant_boundaries_must_increase():
    with pytest.raises(ValueError, match="boundaries must increase"):
        kc.schedules.PiecewiseConstantDecay([10, 5], [1.0, 0.5, 0.1])


@pytest.mark.parametrize(
    "make",
    [
        lambda: pt.lr_scheduler.StepLR(0.1, 2**31),
        lambda: pt.lr_scheduler.MultiStepLR(0.1, [10, 2**31]),
        lambda: pt.lr_scheduler.StepLR(0.1, 10, steps_per_epoch=2**32),
    ],
    ids=["step_size", "milestones", "steps_per_epoch"],
)
def test_schedule_counts_beyond_int32_name_the_argument(make):
    with pytest.raises(ValueError, match=r"(step_size|milestones\[1\]|steps_per_epoch) must be an integer"):
        make()


def test_schedule_called_beyond_int32_says_so():
    with pytest.raises(ValueError, match="update count must be in"):
        pt.lr_scheduler.StepLR(0.1, 10)(3_000_000_000)


def test_schedule_returning_none_is_a_type_error_naming_the_argument():
    with pytest.raises(TypeError, match="lr: the schedule .* returned None"):
        pt.SGD(lr=lambda count: None)
    with pytest.raises(TypeError, match="learning_rate: the schedule"):
        kc.Adam(learning_rate=lambda count: None)


# ---------------------------------------------------------------- declarations


def test_declaration_is_data_that_copies_and_survives_jit():
    import copy

    tx = pt.RMSprop(lr=0.1, momentum=0.5)
    assert tx.declaration is not None
    assert (tx.declaration.framework, tx.declaration.optimizer) == ("torch", "RMSprop")
    assert tx.declaration.hyperparameters["alpha"] == 0.99  # the default, declared too
    assert copy.deepcopy(tx).declaration == tx.declaration
    state = tx.init(W)
    _, state = jax.jit(tx.update)(W, state, W)  # a state made under jit exports as any other
    (group,) = pt.state_dict(tx, state, W, arrays="numpy")["param_groups"]
    assert (group["lr"], group["momentum"], group["alpha"]) == (0.1, 0.5, 0.99)
    grouped = pt.param_groups(pt.Adam, [{"params": "w", "lr": 0.5}], lr=0.1)
    clone = copy.deepcopy(grouped)
    assert [g.hyperparameters["lr"] for g in clone.groups] == [0.5]
    assert clone.factory is pt.Adam and clone.defaults == {"lr": 0.1}


@pytest.mark.parametrize(
    "tx", [kc.Adam(), tf1.RMSPropOptimizer(0.1), timm.RMSpropTF()], ids=["keras", "tf1", "timm"]
)
def test_every_framework_declares(tx):
    assert tx.declaration.framework in ("keras", "tf1", "timm")
    state = optax.chain(tx).init(W)  # still an optax transformation to chain
    assert jax.tree.leaves(state)


def test_param_group_selectors_see_the_same_paths_inside_nnx_optimizer():
    # nnx.Optimizer initialises on Variables and updates with bare arrays; selectors saw
    # 'layers/0/bias/value' at init and 'layers/0/bias' at update, so a selector written
    # for one failed on the other ("selects no parameter" at nnx.Optimizer(...)).
    from flax import nnx

    def make():
        return nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1)))

    seen = []

    def biases(path, leaf):
        seen.append(path)
        return path.endswith("bias")

    model, reference = make(), make()
    x = jnp.ones((2, 3))

    def loss(m):
        return jnp.sum(m(x) ** 2)

    optimizer = nnx.Optimizer(model, pt.param_groups(pt.RMSprop, [{"params": biases, "lr": 0.1}], lr=0.01),
                              wrt=nnx.Param)
    at_init = sorted(set(seen))
    seen.clear()
    optimizer.update(model, nnx.grad(loss)(model))
    names = ["layers/0/bias", "layers/0/kernel", "layers/1/bias", "layers/1/kernel"]
    assert at_init == sorted(set(seen)) == names
    # the biases moved by the group's rate, the kernels by the default one (RMSprop's first
    # step is lr * sign(g) up to eps)
    grads = nnx.grad(loss)(reference)
    moved = jax.tree.map(lambda a, b: np.asarray(a - b),
                         nnx.state(model, nnx.Param), nnx.state(reference, nnx.Param))
    for layer in (0, 1):
        for name, lr in (("bias", 0.1), ("kernel", 0.01)):
            step = moved["layers"][layer][name]
            g = np.asarray(grads["layers"][layer][name])
            np.testing.assert_allclose(np.abs(step), lr * (np.abs(g) > 0) * 10.0, rtol=1e-4)


def test_a_param_group_whose_parameters_are_all_masked_out():
    # optax.masked around the groups freezes a whole group: its parameters become masked
    # placeholders, the group selects no leaf, and that is not an error there.
    params = {"emb": jnp.ones(4), "dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    groups = pt.param_groups(pt.RMSprop, [{"params": "emb", "lr": 0.1}], lr=0.01)
    tx = optax.masked(groups, {"emb": False, "dense": {"kernel": True, "bias": True}})
    updates, _ = tx.update(params, tx.init(params), params)
    np.testing.assert_array_equal(updates["emb"], params["emb"])  # masked: passed through
    plain = pt.RMSprop(lr=0.01)
    want, _ = plain.update(params["dense"], plain.init(params["dense"]), params["dense"])
    jax.tree.map(np.testing.assert_allclose, updates["dense"], want)
    with pytest.raises(ValueError, match="selects no parameter with the path 'embb'"):
        typo = pt.param_groups(pt.RMSprop, [{"params": "embb"}])
        optax.masked(typo, {"emb": False, "dense": True}).init(params)


@pytest.mark.parametrize("option", [{"gradient_accumulation_steps": 2},
                                    {"use_ema": True, "ema_overwrite_frequency": 2}])
def test_injected_keras_integer_options_must_be_static(option):
    # They decide the step's structure; injected (a jax array) they raised a bare range error.
    name = [k for k in option if k != "use_ema"][0]
    params, grads = {"w": jnp.ones(4)}, {"w": jnp.full(4, 0.5)}
    with pytest.raises(TypeError, match=rf"static_args=\('{name}',\)"):
        optax.inject_hyperparams(kc.Adam)(learning_rate=0.01, **option).init(params)
    tx = optax.inject_hyperparams(kc.Adam, static_args=(name,))(learning_rate=0.01, **option)
    plain = kc.Adam(learning_rate=0.01, **option)
    state, plain_state = tx.init(params), plain.init(params)
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        expected, plain_state = plain.update(grads, plain_state, params)
        # (injected, the betas are float32 arrays whose complements are rounded in float32)
        np.testing.assert_allclose(updates["w"], expected["w"], rtol=2e-5)


def test_map_params_over_param_groups_says_why_it_cannot():
    tx = rmsjax.compat.param_groups(pt.RMSprop, [{"params": "dense/bias", "lr": 0.1}], lr=0.01)
    params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}}
    with pytest.raises(TypeError, match="param_groups: optax.tree.map_params cannot map"):
        optax.tree.map_params(tx, lambda x: x, tx.init(params))
