"""Whole recipes: timm's RMSpropTF, PyTorch parameter groups, a float32 MLP trained end to end.

Fixtures: ``tests/reference/fixtures_recipes`` (``tests/reference/generate_recipes.py``,
PyTorch 2.13 and timm 1.0, offline). Neither torch nor timm is needed here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from recipe_fixtures import RTOL32, RTOL64, load, make, names, problem, relative_error, run, trajectory

from rmsjax import compat

pt = compat.torch
TIMM = names("timm_")
GROUPS = names("groups_")


def _replay(name, dtype):
    meta, arrays = load(name)
    params, grad = problem(meta, arrays, dtype)
    tx = make(meta, dtype)
    traj, _, _ = run(tx, grad, params, tx.init(params), meta["steps"])
    return relative_error(traj, trajectory(meta, arrays))


def test_fixtures_cover_the_options():
    assert len(TIMM) >= 7 and len(GROUPS) >= 5
    timm_kwargs = [load(n)[0]["kwargs"] for n in TIMM]
    for option in ("momentum", "centered", "weight_decay", "decoupled_decay", "lr_in_momentum"):
        assert any(option in kw for kw in timm_kwargs), option
    assert any(load(n)[0]["schedule"] for n in TIMM)
    assert any(load(n)[0].get("lambdas") for n in GROUPS)


@pytest.mark.parametrize("name", TIMM + GROUPS)
def test_float64_matches_framework(name):
    with jax.enable_x64(True):
        err = _replay(name, jnp.float64)
    assert err <= RTOL64, f"{name}: relative error {err:.3e}"


@pytest.mark.parametrize("name", TIMM + GROUPS)
def test_float32_matches_framework(name):
    err = _replay(name, jnp.float32)
    assert err <= RTOL32, f"{name}: relative error {err:.3e}"


def test_lr_in_momentum_matters_only_with_a_schedule():
    params = {"p": jnp.array([1.0, -2.0])}
    grads = {"p": jnp.array([0.5, 0.25])}

    def final(**kw):
        tx = compat.timm.RMSpropTF(momentum=0.9, **kw)
        state, p = tx.init(params), params
        for _ in range(4):
            u, state = tx.update(grads, state, p)
            p = optax.apply_updates(p, u)
        return np.asarray(p["p"])

    np.testing.assert_allclose(final(lr_in_momentum=True), final(lr_in_momentum=False), rtol=1e-6)
    halving = optax.exponential_decay(0.01, 1, 0.5)
    assert not np.allclose(final(lr=halving, lr_in_momentum=True), final(lr=halving, lr_in_momentum=False))


# ---------------------------------------------------------------- parameter groups


TREE = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}, "head": {"kernel": jnp.ones((3, 1))}}


def test_groups_by_path_predicate_and_rest():
    tx = compat.param_groups(
        pt.SGD,
        [{"params": "head", "lr": 0.5}, {"params": lambda path, leaf: leaf.ndim == 1, "lr": 0.25}],
        lr=0.1,
    )
    updates, _ = tx.update(TREE, tx.init(TREE), TREE)
    assert float(updates["head"]["kernel"][0, 0]) == -0.5
    assert float(updates["dense"]["bias"][0]) == -0.25
    assert float(updates["dense"]["kernel"][0, 0]) == pytest.approx(-0.1)  # implicit last group
    hyper = [(h["lr"], leaves) for h, leaves in tx.assign(TREE)]
    # leaves in tree order: dense/bias, dense/kernel, head/kernel
    assert hyper == [(0.5, [2]), (0.25, [0]), (0.1, [1])]


def test_explicit_rest_group_takes_its_place():
    tx = compat.param_groups(pt.SGD, [{"lr": 0.3}, {"params": ["dense/bias"], "lr": 0.2}], lr=0.1)
    assert [(h["lr"], leaves) for h, leaves in tx.assign(TREE)] == [(0.3, [1, 2]), (0.2, [0])]


def test_groups_keep_separate_step_counts_and_work_under_jit():
    sched = optax.exponential_decay(1.0, 1, 0.5)
    tx = compat.param_groups(pt.SGD, [{"params": "head", "lr": sched}], lr=0.1)
    step = jax.jit(tx.update)
    state = tx.init(TREE)
    for _ in range(3):
        updates, state = step(TREE, state, TREE)
    assert float(updates["head"]["kernel"][0, 0]) == -0.25
    assert isinstance(state, compat.ParamGroupsState) and len(state.inner_states) == 2


def test_groups_accept_extra_args_and_timm():
    tx = compat.param_groups(compat.timm.RMSpropTF, [{"params": "head", "momentum": 0.9}], lr=0.01)
    updates, _ = tx.update(TREE, tx.init(TREE), TREE, value=jnp.zeros([]))
    assert jax.tree.structure(updates) == jax.tree.structure(TREE)


BAD_GROUPS = [
    (lambda: compat.param_groups(pt.RMSprop, [{"params": "head", "betas": (0.9, 0.9)}]), TypeError, "betas"),
    (lambda: compat.param_groups(pt.RMSprop, [], learning_rate=0.1), TypeError, "learning_rate"),
    (lambda: compat.param_groups(pt.RMSprop, [{"params": "head", "momentum": 1.5}]), ValueError,
     "param group 0.*momentum"),
    (lambda: compat.param_groups(pt.RMSprop, [{"lr": 0.1}, {"lr": 0.2}]), ValueError, "at most one"),
    (lambda: compat.param_groups(pt.RMSprop, [{"params": 3}]), TypeError, "'params'"),
    (lambda: compat.param_groups(pt.RMSprop, {"params": "head"}), TypeError, "list of dicts"),
    (lambda: compat.param_groups(pt.RMSprop, [{"params": "nothing/here"}]).init(TREE), ValueError,
     "param group 0 selects no parameter"),
    (lambda: compat.param_groups(pt.RMSprop, [{"params": "head"}, {"params": "head/kernel"}]).init(TREE),
     ValueError, "'head/kernel' is selected by more than one"),
    (lambda: compat.param_groups(pt.RMSprop, [{"params": ["dense", "head"]}, {}]).init(TREE), ValueError,
     "param group 1 selects no parameter"),
]


@pytest.mark.parametrize("make_it,error,pattern", BAD_GROUPS, ids=[b[2] for b in BAD_GROUPS])
def test_bad_groups_raise_naming_the_problem(make_it, error, pattern):
    with pytest.raises(error, match=pattern):
        make_it()


# ---------------------------------------------------------------- the float32 recipe


def torch_warmup_then_step(lr, steps, *, start_factor, end_factor, total_iters, step_size, gamma):
    """The learning rates of ``SequentialLR([LinearLR, StepLR], milestones=[total_iters])``.

    PyTorch's schedulers update the rate recursively (``lr *= factor`` at every step), so
    this replays that arithmetic in Python floats rather than a closed form (which differs in
    the last bits). ``rmsjax.compat.torch.lr_scheduler.SequentialLR`` is the library's way.
    """
    out, cur = [], lr * start_factor
    for t in range(steps):
        if 0 < t < total_iters:
            cur = cur * (1.0 + (end_factor - start_factor)
                         / (total_iters * start_factor + (t - 1) * (end_factor - start_factor)))
        elif t == total_iters:
            cur = lr  # StepLR restarts at the milestone: lr * gamma ** 0
        elif t > total_iters and (t - total_iters) % step_size == 0:
            cur = cur * gamma
        out.append(cur)
    return np.asarray(out)


def mlp_loss(params, x, y):
    h = jnp.tanh(x @ params["w1"].T + params["b1"])
    logp = jax.nn.log_softmax(h @ params["w2"].T + params["b2"])
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def recipe_losses(arrays, recipe):
    table = torch_warmup_then_step(recipe["lr"], recipe["steps"], **recipe["warmup"], **recipe["step"])
    assert np.array_equal(table, arrays["lrs"])  # exactly PyTorch's rates
    rates = jnp.asarray(table, jnp.float32)

    def schedule(count):
        return rates[jnp.minimum(count, rates.shape[0] - 1)]

    tx = pt.param_groups(
        pt.RMSprop,
        [{"params": ["w1", "w2"]}, {"params": ["b1", "b2"], "weight_decay": 0.0}],
        lr=schedule, alpha=recipe["alpha"], eps=recipe["eps"], momentum=recipe["momentum"],
        weight_decay=recipe["weight_decay"],
    )
    params = {k: jnp.asarray(arrays[f"init_{k}"]) for k in ("w1", "b1", "w2", "b2")}
    x = jnp.asarray(arrays["x"])
    y = jnp.asarray(arrays["y"].astype(np.int32))

    def body(carry, idx):
        p, s = carry
        loss, g = jax.value_and_grad(mlp_loss)(p, x[idx], y[idx])
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), loss

    batches = jnp.asarray(arrays["batches"].astype(np.int32))
    _, losses = jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), batches))(params)
    return np.asarray(losses, np.float64)


def test_float32_recipe_stays_within_torch_noise_floor():
    """rmsjax's loss curve stays within PyTorch's own one-ulp noise floor for the whole run.

    The floor (recorded by the generator, see its docstring) is the largest loss gap, over
    the whole run, between the PyTorch run and PyTorch runs that differ from it by one ulp:
    in every initial weight, or in every gradient entry at every step (the rounding another
    summation order makes). rmsjax computes a different (equally valid) rounding of the same
    forward and backward passes, so its gap is compared with that scalar floor.
    """
    meta, arrays = load("recipe_mlp_float32")
    losses = recipe_losses(arrays, meta["recipe"])
    assert losses[-1] < 0.1 * losses[0]  # it trains
    deviation = np.abs(losses - arrays["losses"])
    floor = float(np.max(arrays["floor"]))
    assert 0 < floor < 1e-4
    assert float(np.max(deviation)) <= floor, (float(np.max(deviation)), floor)
