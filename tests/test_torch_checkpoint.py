"""rmsjax.compat.torch.load_state_dict / state_dict against PyTorch 2.13 checkpoints.

Each ``ckpt_*`` fixture holds a PyTorch run of 60 steps on the problem of
``tests/reference/generate.py`` and ``optimizer.state_dict()`` saved after 25 steps (numpy
arrays). Checked, in float64:

* loading the saved dict (and the parameters saved with it) continues PyTorch's run (1e-9);
* ``state_dict`` of the loaded state gives back PyTorch's dict: arrays bit for bit,
  ``param_groups`` key for key;
* an rmsjax run exported and reloaded at step 25 continues *bit for bit* as the run that
  was not interrupted;
* (torch installed) the exported dict loads into ``torch.optim`` and continues there.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from recipe_fixtures import (
    RTOL64,
    hyperparams,
    load,
    make,
    names,
    problem,
    relative_error,
    run,
    saved_state_dict,
    trajectory,
)

from rmsjax import compat

# Recorded-framework fixtures (hundreds of cases): run by the default `pytest`, left out of
# the pinned-version CI stages (-m "not slow"), which check the core on other jax versions.
pytestmark = pytest.mark.slow

pt = compat.torch
CKPT = names("ckpt_")


def _setup(name, *, grouped=None):
    meta, arrays = load(name)
    params, grad = problem(meta, arrays, jnp.float64)
    tx = make(meta, jnp.float64, grouped=grouped)
    saved_params = {n: jnp.asarray(arrays[f"traj_{n}"][meta["save_at"] - 1]) for n in meta["leaves"]}
    return meta, arrays, params, grad, tx, saved_params


def _plain_kwargs(meta):
    return {} if meta.get("groups") else {"hyperparams": hyperparams(meta, jnp.float64)}


def test_every_compat_torch_optimizer_has_checkpoints():
    optimizers = {load(n)[0]["optimizer"] for n in CKPT}
    assert optimizers == set(["RMSprop", "Adagrad", "Adam", "AdamW", "Adadelta", "SGD"])
    assert any(load(n)[0]["complex"] for n in CKPT)
    assert any(load(n)[0].get("groups") for n in CKPT)


@pytest.mark.parametrize("grouped", [False, True], ids=["plain", "param_groups"])
@pytest.mark.parametrize("name", CKPT)
def test_loaded_checkpoint_continues_torch(name, grouped):
    meta = load(name)[0]
    if meta.get("groups") and not grouped:
        pytest.skip("a two-group run needs param_groups")
    with jax.enable_x64(True):
        meta, arrays, _, grad, tx, saved_params = _setup(name, grouped=grouped)
        sd = saved_state_dict(meta, arrays)
        step = meta["save_at"] if meta["optimizer"] == "SGD" else None
        state = pt.load_state_dict(tx, sd, saved_params, step=step)
        assert jax.tree.structure(state) == jax.tree.structure(tx.init(saved_params))
        traj, _, _ = run(tx, grad, saved_params, state, meta["steps"] - meta["save_at"])
    err = relative_error(traj, trajectory(meta, arrays, meta["save_at"]))
    assert err <= RTOL64, f"{name}: relative error {err:.3e}"


@pytest.mark.parametrize("name", CKPT)
def test_state_dict_gives_back_torch_dict(name):
    with jax.enable_x64(True):
        meta, arrays, _, _, tx, saved_params = _setup(name)
        sd = saved_state_dict(meta, arrays)
        step = meta["save_at"] if meta["optimizer"] == "SGD" else None
        state = pt.load_state_dict(tx, sd, saved_params, step=step)
        out = pt.state_dict(tx, state, saved_params, arrays="numpy", **_plain_kwargs(meta))
    assert sorted(out["state"]) == sorted(sd["state"])
    for i, entry in sd["state"].items():
        assert sorted(out["state"][i]) == sorted(entry), i
        for key, value in entry.items():
            ours = np.asarray(out["state"][i][key])
            assert ours.dtype == value.dtype and ours.shape == value.shape, (i, key)
            assert np.array_equal(ours, value), (i, key)
    for ours, theirs in zip(out["param_groups"], sd["param_groups"], strict=True):
        assert set(theirs) - set(ours) <= {"initial_lr"}  # the scheduler's key
        for key, value in ours.items():
            if key in ("foreach", "capturable", "differentiable", "fused"):
                continue  # implementation switches (the fixtures ran foreach=False)
            if key == "lr":
                assert value == pytest.approx(theirs[key], rel=1e-15)
            else:
                assert value == theirs[key], key


def _one_step(tx, grad):
    @jax.jit
    def step(p, s):
        updates, s = tx.update(grad(p), s, p)
        return optax.apply_updates(p, updates), s

    return step


@pytest.mark.parametrize("name", CKPT)
def test_export_and_reload_continues_bit_for_bit(name):
    with jax.enable_x64(True):
        meta, _, params, grad, tx, _ = _setup(name)
        step = _one_step(tx, grad)
        p, s = params, tx.init(params)
        straight = []
        for t in range(meta["steps"]):
            if t == meta["save_at"]:
                sd = pt.state_dict(tx, s, p, arrays="numpy", **_plain_kwargs(meta))
                resumed = pt.load_state_dict(tx, copy.deepcopy(sd), p, step=t)
                for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(s), strict=True):
                    assert a.dtype == b.dtype and np.array_equal(a, b)
                checkpoint = (p, resumed)
            p, s = step(p, s)
            straight.append(p)
        p, s = checkpoint
        for t in range(meta["save_at"], meta["steps"]):
            p, s = step(p, s)
            for n in meta["leaves"]:
                assert np.array_equal(p[n], straight[t][n]), (t, n)


@pytest.mark.parametrize("name", CKPT)
def test_exported_dict_loads_into_torch_and_continues(name):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    with jax.enable_x64(True):
        meta, arrays, params, grad, tx, _ = _setup(name)
        _, p, s = run(tx, grad, params, tx.init(params), meta["save_at"])
        sd = pt.state_dict(tx, s, p, arrays="torch", **_plain_kwargs(meta))
    tensors = {n: torch.tensor(np.asarray(p[n])).requires_grad_(True) for n in meta["leaves"]}
    if meta.get("groups"):
        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": [tensors[n] for n in g["params"]]}
            for g in meta["groups"]
        ]
    else:
        groups = [{"params": [tensors[n] for n in meta["torch_order"]]}]
    kwargs = dict(meta["kwargs"])
    opt = getattr(torch.optim, meta["optimizer"])(groups, foreach=False, **kwargs)
    sched = None
    if meta["schedule"] is not None:
        sched = torch.optim.lr_scheduler.StepLR(opt, meta["schedule"]["step_size"], meta["schedule"]["gamma"])
    opt.load_state_dict(sd)
    if sched is not None:
        sched.last_epoch = meta["save_at"]
    co = {n: {k: torch.tensor(arrays[f"{k}_{n}"]) for k in "abc"} for n in meta["leaves"]}
    traj = {n: [] for n in meta["leaves"]}
    for _ in range(meta["save_at"], meta["steps"]):
        with torch.no_grad():
            for n, t in tensors.items():
                t.grad = co[n]["a"] * t + co[n]["b"] * torch.sin(t) + co[n]["c"]
        opt.step()
        if sched is not None:
            sched.step()
        for n, t in tensors.items():
            traj[n].append(t.detach().numpy().copy())
    err = relative_error({n: np.stack(v) for n, v in traj.items()}, trajectory(meta, arrays, meta["save_at"]))
    assert err <= RTOL64, f"{name}: relative error {err:.3e}"


# ---------------------------------------------------------------- order and layout


def test_explicit_order_and_layout_hook():
    with jax.enable_x64(True):
        meta, arrays, _, _, _, saved_params = _setup("ckpt_adam_default")
        sd = saved_state_dict(meta, arrays)
        tx = pt.Adam(lr=0.01)
        reference = pt.load_state_dict(tx, sd, saved_params)
        # the same state with the parameters stored in the other order ...
        swapped = copy.deepcopy(sd)
        swapped["state"] = {1 - i: v for i, v in sd["state"].items()}
        by_path = pt.load_state_dict(tx, swapped, saved_params, order=["w", "b"])
        by_index = pt.load_state_dict(tx, swapped, saved_params, order=[1, 0])
        for a, b, c in zip(*(jax.tree.leaves(x) for x in (reference, by_path, by_index)), strict=True):
            assert np.array_equal(a, b) and np.array_equal(a, c)
        # ... and "b" stored transposed, as a Linear weight is against a Flax kernel
        transposed = copy.deepcopy(sd)
        for key in ("exp_avg", "exp_avg_sq"):
            transposed["state"][0][key] = sd["state"][0][key].T.copy()
        with pytest.raises(
            ValueError, match=r"\[0\]\['exp_avg'\] has shape \(1, 2, 2\).*parameter 0 \('b'\)"
        ):
            # a square leaf does not reveal the transpose: shapes match, so use a (3,) vs (1, 3) case
            bad = copy.deepcopy(sd)
            bad["state"][0]["exp_avg"] = np.ones((2, 2))[None]
            pt.load_state_dict(tx, bad, saved_params)
        hooked = pt.load_state_dict(
            tx, transposed, saved_params, layout=lambda path, a: a.T if path == "b" else a
        )
        for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(hooked), strict=True):
            assert np.array_equal(a, b)
        out = pt.state_dict(
            tx,
            hooked,
            saved_params,
            arrays="numpy",
            hyperparams={"lr": 0.01},
            layout=lambda path, a: a.T if path == "b" else a,
        )
        assert np.array_equal(out["state"][0]["exp_avg"], transposed["state"][0]["exp_avg"])


def test_shape_mismatch_names_index_key_and_shapes():
    with jax.enable_x64(True):
        meta, arrays, _, _, _, saved_params = _setup("ckpt_rmsprop_momentum")
        sd = saved_state_dict(meta, arrays)
        sd["state"][1]["square_avg"] = np.ones(4)
        with pytest.raises(
            ValueError,
            match=r"state_dict\['state'\]\[1\]\['square_avg'\] has shape \(4,\), "
            r"but parameter 1 \('w'\) has shape \(3,\)",
        ):
            pt.load_state_dict(pt.RMSprop(lr=0.005, momentum=0.9), sd, saved_params)


# ---------------------------------------------------------------- bad input


def _sd(name):
    meta, arrays = load(name)
    return saved_state_dict(meta, arrays), {n: jnp.asarray(arrays[f"traj_{n}"][24]) for n in meta["leaves"]}


def test_state_dict_for_another_optimizer_is_refused():
    with jax.enable_x64(True):
        sd, params = _sd("ckpt_adam_default")
        with pytest.raises(
            ValueError, match="lacks '(alpha|momentum)': not a torch.optim.RMSprop state dict"
        ):
            pt.load_state_dict(pt.RMSprop(), sd, params)
        sd["param_groups"][0].update(alpha=0.99, momentum=0, centered=False)
        with pytest.raises(ValueError, match="'exp_avg'"):
            pt.load_state_dict(pt.RMSprop(), sd, params)
        sd, params = _sd("ckpt_adam_default")
        with pytest.raises(ValueError, match="torch.optim.Adam state dict, tx is AdamW"):
            pt.load_state_dict(pt.AdamW(lr=0.01), sd, params)


def test_other_configuration_and_missing_keys_are_refused():
    with jax.enable_x64(True):
        sd, params = _sd("ckpt_rmsprop_momentum")
        with pytest.raises(ValueError, match=r"\['momentum'\] is 0.9, tx's group has momentum=0.0"):
            pt.load_state_dict(pt.RMSprop(lr=0.005), sd, params)  # tx without momentum
        del sd["state"][0]["momentum_buffer"]
        with pytest.raises(ValueError, match=r"\[0\] lacks the key 'momentum_buffer'"):
            pt.load_state_dict(pt.RMSprop(lr=0.005, momentum=0.9), sd, params)
        with pytest.raises(ValueError, match="'state' and 'param_groups'"):
            pt.load_state_dict(pt.RMSprop(), {"state": {}}, params)


def test_group_mismatches_are_refused():
    with jax.enable_x64(True):
        meta, arrays, _, _, tx, params = _setup("ckpt_groups_rmsprop")
        sd = saved_state_dict(meta, arrays)
        with pytest.raises(ValueError, match="2 parameter groups, tx has 1"):
            pt.load_state_dict(pt.RMSprop(lr=0.005, momentum=0.9), sd, params)
        other = compat.param_groups(
            pt.RMSprop,
            [{"params": ["w"]}, {"params": ["b"], "lr": 0.01}],
            lr=0.005,
            momentum=0.9,
            weight_decay=0.1,
        )
        with pytest.raises(ValueError, match=r"\['param_groups'\]\[1\]\['weight_decay'\] is 0.0"):
            pt.load_state_dict(other, sd, params)


def test_plain_tx_export_uses_the_recorded_arguments():
    params = {"w": jnp.ones(2)}
    tx = pt.RMSprop(lr=0.1, alpha=0.9, momentum=0.5)
    state = tx.init(params)
    (group,) = pt.state_dict(tx, state, params, arrays="numpy")["param_groups"]
    assert (group["lr"], group["alpha"], group["momentum"], group["params"]) == (0.1, 0.9, 0.5, [0])
    # A transformation rebuilt around the factory's functions records nothing: it must say.
    rebuilt = optax.GradientTransformation(tx.init, lambda u, s, p=None: tx.update(u, s, p))
    with pytest.raises(ValueError, match="param_groups"):
        pt.state_dict(rebuilt, state, params, arrays="numpy")
    with pytest.raises(ValueError, match="no argument 'learning_rate'"):
        pt.state_dict(tx, state, params, arrays="numpy", hyperparams={"learning_rate": 0.1})
    with pytest.raises(ValueError, match="order must list each"):
        pt.state_dict(tx, state, params, arrays="numpy", hyperparams={"lr": 0.1}, order=[0, 0])
    with pytest.raises(ValueError, match="not rmsjax.compat.torch|compat.torch's optimizers"):
        tx_timm = compat.param_groups(compat.timm.RMSpropTF)
        pt.state_dict(tx_timm, tx_timm.init(params), params, arrays="numpy")


@pytest.mark.parametrize("dampening", [0.0, 0.5])
def test_sgd_momentum_buffers_are_exported_from_the_first_step(dampening):
    # PyTorch's SGD makes its momentum buffers at the first step. With dampening 0 rmsjax
    # keeps no counter (the first step needs none), so the buffer's own values tell.
    tx = pt.SGD(lr=0.1, momentum=0.9, dampening=dampening)
    params = {"w": jnp.array([1.0, -2.0])}
    state = tx.init(params)
    keeps_count = [("count" in p._fields) for p in state if "mu" in getattr(p, "_fields", ())]
    assert keeps_count == [dampening != 0.0]
    fresh = pt.state_dict(tx, state, params, arrays="numpy", hyperparams={"lr": 0.1, "momentum": 0.9,
                                                                          "dampening": dampening})
    assert fresh["state"] == {}
    _, state = tx.update({"w": jnp.array([0.5, 0.25])}, state, params)
    after = pt.state_dict(tx, state, params, arrays="numpy", hyperparams={"lr": 0.1, "momentum": 0.9,
                                                                          "dampening": dampening})
    # The first step's buffer is the gradient itself, undampened (PyTorch's rule).
    np.testing.assert_array_equal(after["state"][0]["momentum_buffer"], [0.5, 0.25])
    reloaded = pt.load_state_dict(tx, after, params)
    for a, b in zip(jax.tree.leaves(reloaded), jax.tree.leaves(state), strict=True):
        assert np.array_equal(a, b)


# ---------------------------------------------------------------- bfloat16 parameters


class _TensorWithoutNumpyDtype:
    """Stands for a ``torch.bfloat16`` tensor where torch is not installed: like torch, its
    ``.numpy()`` refuses (NumPy has no bfloat16), and ``.float().numpy()`` gives float32."""

    dtype = "torch.bfloat16"

    def __init__(self, array):
        self._wide = np.asarray(array, np.float32)

    def detach(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        raise TypeError("Got unsupported ScalarType BFloat16")

    def float(self):
        wide = self._wide
        return type("_Float", (), {"numpy": lambda _: wide})()


def _bf16_run(tx):
    params = [jnp.array([0.5, -1.25, 3.0], jnp.bfloat16), jnp.array([[2.0, -0.375]], jnp.bfloat16)]
    state = tx.init(params)
    for _ in range(3):
        _, state = tx.update([p * jnp.bfloat16(2) for p in params], state, params)
    return params, state


def test_bfloat16_tensors_are_read_through_float32():
    # PyTorch's bfloat16 state tensors have no .numpy(); load_state_dict reads them through
    # float32, exactly, and gives back the very state that was exported (it used to fail
    # with torch's TypeError).
    tx = pt.Adam(lr=0.01)
    params, state = _bf16_run(tx)
    exported = pt.state_dict(tx, state, params, arrays="numpy")
    as_tensors = copy.deepcopy(exported)
    for entry in as_tensors["state"].values():
        for key, value in entry.items():
            if key != "step":
                assert value.dtype == jnp.bfloat16, key  # the case under test
                entry[key] = _TensorWithoutNumpyDtype(value)
    loaded = pt.load_state_dict(tx, as_tensors, params)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(state), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("optimizer", ["Adam", "RMSprop"])
def test_bfloat16_checkpoints_go_both_ways_with_torch(optimizer):
    torch = pytest.importorskip("torch")
    weight = torch.nn.Parameter(torch.tensor([0.5, -1.25, 3.0], dtype=torch.bfloat16))
    opt = getattr(torch.optim, optimizer)([weight], lr=0.01)
    for _ in range(2):
        weight.grad = 2 * weight.detach()
        opt.step()
    params = [jnp.asarray(weight.detach().float().numpy()).astype(jnp.bfloat16)]
    tx = getattr(pt, optimizer)(lr=0.01)
    state = pt.load_state_dict(tx, opt.state_dict(), params)
    exported = pt.state_dict(tx, state, params, arrays="torch")
    for key, theirs in opt.state_dict()["state"][0].items():
        ours = exported["state"][0][key]
        assert ours.dtype == theirs.dtype, key
        assert torch.equal(ours, theirs), key
    torch.optim.__dict__[optimizer]([weight], lr=0.01).load_state_dict(exported)


def test_sgd_parameters_without_a_momentum_buffer_load_as_first_steps():
    # PyTorch keeps no state for a parameter that never had a gradient (a frozen head). For
    # SGD without dampening its next step (buffer = gradient) is a zero buffer's, so the dict
    # loads; PyTorch's rule by hand: buf = momentum * buf + g, or buf = g at its first step.
    with jax.enable_x64(True):
        buffer = np.array([0.5, -0.25])
        saved = {"state": {0: {"momentum_buffer": buffer}},
                 "param_groups": [{"lr": 0.1, "momentum": 0.9, "dampening": 0, "weight_decay": 0,
                                   "nesterov": False, "maximize": False, "params": [0, 1]}]}
        params = [jnp.array([1.0, 2.0]), jnp.array([3.0, -1.0])]
        grads = [jnp.array([0.2, 0.4]), jnp.array([-0.6, 1.0])]
        tx = pt.SGD(lr=0.1, momentum=0.9)
        state = pt.load_state_dict(tx, saved, params)
        updates, _ = tx.update(grads, state, params)
        np.testing.assert_allclose(updates[0], -0.1 * (0.9 * buffer + np.asarray(grads[0])), rtol=1e-15)
        np.testing.assert_allclose(updates[1], -0.1 * np.asarray(grads[1]), rtol=1e-15)
        damped = copy.deepcopy(saved)
        damped["param_groups"][0]["dampening"] = 0.5
        with pytest.raises(ValueError, match="some parameters have a momentum buffer and some do not"):
            pt.load_state_dict(pt.SGD(lr=0.1, momentum=0.9, dampening=0.5), damped, params)
