"""Generate the fixtures of ``tests/test_recipes.py`` and ``tests/test_torch_checkpoint.py``.

Recorded offline from real PyTorch 2.13 (CPU) and timm 1.0 (its ``timm/optim/rmsprop_tf.py``
loaded on its own: the rest of timm needs torchvision), in four families, written to
``fixtures_recipes/<case>.npz``:

* ``timm_*``: ``timm.optim.RMSpropTF`` on the problem of ``generate.py`` (the explicit field
  ``g(p) = a*p + b*sin(p) + c`` on the tree ``{"w": (3,), "b": (2, 2)}``, float64, 60 steps),
  optionally with ``StepLR``. Arrays and ``meta`` as in ``generate.py``.
* ``groups_*``: a PyTorch (or timm) optimizer with two parameter groups on the same problem:
  ``meta["groups"]`` lists each group's leaves and overrides, in PyTorch's group order;
  ``meta["lambdas"]`` (optional) a per-group ``LambdaLR`` factor ``gamma ** (step // k)``.
* ``ckpt_*``: a PyTorch run of ``STEPS`` steps that saves ``optimizer.state_dict()`` after
  ``meta["save_at"]`` steps. The saved dict is stored as arrays ``sd/<index>/<key>`` (the
  ``step`` tensors too) with its ``param_groups`` in ``meta["param_groups"]``;
  ``meta["torch_order"]`` names the leaf of each PyTorch index. ``traj_<leaf>`` is the whole
  uninterrupted run; the generator checks that a *fresh* PyTorch optimizer loading the saved
  dict continues it bit for bit.
* ``recipe_mlp_float32``: a small MLP trained end to end in float32 with a whole PyTorch
  recipe (RMSprop with momentum, two parameter groups -- no weight decay on biases -- and
  ``SequentialLR(LinearLR warm-up, StepLR)``), on a fixed data set and batch order. Stored:
  the data, the initial weights, the per-step losses, the per-step learning rates, and the
  one-ulp noise floor: the same PyTorch run repeated ``NUDGES`` times from initial weights
  that each differ from the original by one ulp in every entry (independent random
  directions), and ``NUDGES`` times with every gradient entry moved by one ulp (random
  direction) at every step -- the rounding a forward and backward pass summed in another
  order makes, which is what differs between two frameworks --;
  ``floor[t] = max_k |loss_k[t] - loss[t]|`` over both families. ``foreach_gap`` records the largest loss gap
  between PyTorch's foreach and for-loop implementations (an other floor, often zero).

Usage (torch==2.13.0 and timm installed; ``pip install --no-deps timm``)::

    python tests/reference/generate_recipes.py          # (re)write changed fixtures
    python tests/reference/generate_recipes.py --check  # regenerate in memory, compare bit for bit
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import LEAVES, STEPS, compare, problem  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures_recipes"
SAVE_AT = 25
NUDGES = 8
S = {"kind": "step", "step_size": 15, "gamma": 0.5}


# --------------------------------------------------------------------------- imports


def _torch():
    import torch

    torch.set_num_threads(1)
    return torch


def _timm_rmsprop_tf():
    """``timm.optim.rmsprop_tf.RMSpropTF`` without importing ``timm/__init__`` (torchvision)."""
    if "timm.optim.rmsprop_tf" in sys.modules:
        return sys.modules["timm.optim.rmsprop_tf"].RMSpropTF
    spec = importlib.util.find_spec("timm")
    if spec is None:
        raise ImportError("timm is not installed (pip install --no-deps timm)")
    root = Path(spec.submodule_search_locations[0])
    for name, path in (("timm", root), ("timm.optim", root / "optim")):
        if name not in sys.modules or not hasattr(sys.modules[name], "__path__"):
            module = types.ModuleType(name)
            module.__path__ = [str(path)]
            sys.modules[name] = module
    import timm.optim.rmsprop_tf as rmsprop_tf

    return rmsprop_tf.RMSpropTF


def versions() -> dict:
    torch = _torch()
    out = {"numpy": np.__version__, "torch": torch.__version__}
    try:
        from importlib.metadata import version

        out["timm"] = version("timm")
    except Exception:  # pragma: no cover
        pass
    return out


# --------------------------------------------------------------------------- cases


def _case(name, family, optimizer, kwargs, **extra):
    return {
        "name": name,
        "family": family,
        "optimizer": optimizer,
        "kwargs": kwargs,
        "schedule": None,
        "complex": False,
        **extra,
    }


CASES = [
    # ---- timm RMSpropTF
    _case("timm_rmsproptf_default", "timm", "RMSpropTF", {}),
    _case("timm_rmsproptf_momentum", "timm", "RMSpropTF", {"lr": 0.005, "momentum": 0.9}),
    _case(
        "timm_rmsproptf_centered",
        "timm",
        "RMSpropTF",
        {"lr": 0.005, "centered": True, "momentum": 0.8, "eps": 1e-3},
    ),
    _case(
        "timm_rmsproptf_wd_coupled", "timm", "RMSpropTF", {"lr": 0.005, "weight_decay": 0.1, "momentum": 0.9}
    ),
    _case(
        "timm_rmsproptf_wd_decoupled",
        "timm",
        "RMSpropTF",
        {"lr": 0.005, "weight_decay": 0.5, "momentum": 0.9, "decoupled_decay": True},
    ),
    _case(
        "timm_rmsproptf_lr_outside_momentum",
        "timm",
        "RMSpropTF",
        {"lr": 0.005, "momentum": 0.9, "lr_in_momentum": False},
        schedule=S,
    ),
    _case(
        "timm_rmsproptf_schedule",
        "timm",
        "RMSpropTF",
        {"lr": 0.01, "momentum": 0.9, "alpha": 0.95},
        schedule=S,
    ),
    _case(
        "timm_rmsproptf_schedule_decoupled",
        "timm",
        "RMSpropTF",
        {"lr": 0.01, "weight_decay": 0.5, "decoupled_decay": True, "centered": True},
        schedule=S,
    ),
    # ---- parameter groups (PyTorch group order: w's group, then b's)
    _case(
        "groups_rmsprop_momentum_no_bias_decay",
        "groups",
        "RMSprop",
        {"lr": 0.005, "momentum": 0.9, "weight_decay": 0.1},
        groups=[{"params": ["w"]}, {"params": ["b"], "weight_decay": 0.0, "lr": 0.01}],
    ),
    _case(
        "groups_adam_betas",
        "groups",
        "Adam",
        {"lr": 0.01},
        groups=[{"params": ["w"], "betas": [0.8, 0.9]}, {"params": ["b"], "amsgrad": True}],
    ),
    _case(
        "groups_sgd_momentum",
        "groups",
        "SGD",
        {"lr": 0.02, "weight_decay": 0.05},
        groups=[
            {"params": ["w"], "momentum": 0.9, "nesterov": True},
            {"params": ["b"], "momentum": 0.0, "lr": 0.01},
        ],
    ),
    _case(
        "groups_rmsprop_schedule",
        "groups",
        "RMSprop",
        {"lr": 0.005, "momentum": 0.9},
        groups=[{"params": ["w"]}, {"params": ["b"], "lr": 0.01, "centered": True}],
        lambdas=[None, {"step_size": 15, "gamma": 0.5}],
    ),
    _case(
        "groups_timm_decoupled",
        "groups",
        "RMSpropTF",
        {"lr": 0.005, "momentum": 0.9},
        groups=[
            {"params": ["w"], "weight_decay": 0.5, "decoupled_decay": True},
            {"params": ["b"], "lr_in_momentum": False},
        ],
    ),
    # ---- checkpoints: saved after SAVE_AT steps, PyTorch order = jax.tree.leaves order (b, w)
    _case("ckpt_rmsprop_default", "ckpt", "RMSprop", {}),
    _case("ckpt_rmsprop_momentum", "ckpt", "RMSprop", {"lr": 0.005, "momentum": 0.9}),
    _case(
        "ckpt_rmsprop_centered_momentum_wd",
        "ckpt",
        "RMSprop",
        {"lr": 0.005, "alpha": 0.95, "centered": True, "momentum": 0.8, "weight_decay": 0.1},
    ),
    _case(
        "ckpt_rmsprop_schedule_maximize",
        "ckpt",
        "RMSprop",
        {"momentum": 0.9, "maximize": True, "weight_decay": 0.05},
        schedule=S,
    ),
    _case(
        "ckpt_rmsprop_complex",
        "ckpt",
        "RMSprop",
        {"centered": True, "momentum": 0.5, "weight_decay": 0.1},
        complex=True,
    ),
    _case(
        "ckpt_adagrad_lr_decay",
        "ckpt",
        "Adagrad",
        {"lr": 0.2, "lr_decay": 0.05, "weight_decay": 0.1, "initial_accumulator_value": 0.1},
    ),
    _case("ckpt_adagrad_complex", "ckpt", "Adagrad", {"lr": 0.1}, complex=True),
    _case("ckpt_adam_default", "ckpt", "Adam", {"lr": 0.01}),
    _case("ckpt_adam_amsgrad_wd", "ckpt", "Adam", {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1}),
    _case("ckpt_adam_complex", "ckpt", "Adam", {"lr": 0.01, "amsgrad": True}, complex=True),
    _case(
        "ckpt_adamw_amsgrad", "ckpt", "AdamW", {"lr": 0.01, "weight_decay": 0.2, "amsgrad": True, "eps": 0.01}
    ),
    _case("ckpt_adamw_schedule", "ckpt", "AdamW", {"lr": 0.02, "weight_decay": 0.1}, schedule=S),
    _case("ckpt_adadelta_default", "ckpt", "Adadelta", {}),
    _case("ckpt_adadelta_wd", "ckpt", "Adadelta", {"lr": 0.5, "rho": 0.8, "eps": 1e-3, "weight_decay": 0.1}),
    _case("ckpt_sgd_plain", "ckpt", "SGD", {"lr": 0.02}),
    _case(
        "ckpt_sgd_momentum_dampening",
        "ckpt",
        "SGD",
        {"lr": 0.02, "momentum": 0.9, "dampening": 0.5, "weight_decay": 0.1},
    ),
    _case(
        "ckpt_sgd_nesterov_schedule",
        "ckpt",
        "SGD",
        {"lr": 0.02, "momentum": 0.9, "nesterov": True},
        schedule=S,
    ),
    _case("ckpt_sgd_complex", "ckpt", "SGD", {"lr": 0.02, "momentum": 0.9}, complex=True),
    _case(
        "ckpt_groups_rmsprop",
        "ckpt",
        "RMSprop",
        {"lr": 0.005, "momentum": 0.9, "weight_decay": 0.1},
        groups=[{"params": ["w"]}, {"params": ["b"], "weight_decay": 0.0, "lr": 0.01}],
    ),
    # ---- float32 end-to-end recipe
    {"name": "recipe_mlp_float32", "family": "recipe"},
]


# --------------------------------------------------------------------------- the problem in torch


def _optimizer(case, groups_spec, defaults):
    torch = _torch()
    if case["optimizer"] == "RMSpropTF":
        cls = _timm_rmsprop_tf()
    else:
        cls = getattr(torch.optim, case["optimizer"])

    def fix(kw):
        kw = dict(kw)
        if "betas" in kw:
            kw["betas"] = tuple(kw["betas"])
        return kw

    return cls([fix(g) for g in groups_spec], foreach=False, **fix(defaults))


def _schedulers(case, opt):
    torch = _torch()
    if case["schedule"] is not None:
        spec = case["schedule"]
        return torch.optim.lr_scheduler.StepLR(opt, step_size=spec["step_size"], gamma=spec["gamma"])
    if case.get("lambdas"):

        def factor(spec):
            if spec is None:
                return lambda step: 1.0
            return lambda step: spec["gamma"] ** (step // spec["step_size"])

        return torch.optim.lr_scheduler.LambdaLR(opt, [factor(s) for s in case["lambdas"]])
    return None


def _torch_groups(case, tensors):
    """PyTorch's group list and the leaf name of each PyTorch index."""
    if case.get("groups"):
        spec = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": [tensors[n] for n in g["params"]]}
            for g in case["groups"]
        ]
        order = [n for g in case["groups"] for n in g["params"]]
    else:
        order = sorted(LEAVES)  # = jax.tree.leaves({"w": ..., "b": ...})
        spec = [{"params": [tensors[n] for n in order]}]
    return spec, order


def run_problem(case, init, coef, *, save_at=None):
    torch = _torch()
    tensors = {n: torch.tensor(init[n]).requires_grad_(True) for n in LEAVES}
    co = {n: {k: torch.tensor(v) for k, v in coef[n].items()} for n in LEAVES}

    def build():
        spec, order = _torch_groups(case, tensors)
        opt = _optimizer(case, spec, case["kwargs"])
        return opt, _schedulers(case, opt), order

    opt, sched, order = build()
    traj = {n: [] for n in LEAVES}
    saved = None
    for step in range(STEPS):
        if save_at is not None and step == save_at:
            saved = copy.deepcopy(opt.state_dict())  # load_state_dict keeps tensors by reference
            checkpoint = (
                {n: t.detach().clone() for n, t in tensors.items()},
                None if sched is None else sched.state_dict(),
            )
        with torch.no_grad():
            for n in LEAVES:
                p, c = tensors[n], co[n]
                p.grad = c["a"] * p + c["b"] * torch.sin(p) + c["c"]
        opt.step()
        if sched is not None:
            sched.step()
        for n in LEAVES:
            traj[n].append(tensors[n].detach().numpy().copy())
    traj = {n: np.stack(traj[n]) for n in LEAVES}
    if save_at is None:
        return traj, None, order
    # A fresh optimizer loading the checkpoint must continue the run bit for bit.
    values, sched_state = checkpoint
    with torch.no_grad():
        for n in LEAVES:
            tensors[n].copy_(values[n])
    opt, sched, _ = build()
    if sched is not None:
        sched.load_state_dict(sched_state)
    opt.load_state_dict(copy.deepcopy(saved))
    for step in range(save_at, STEPS):
        with torch.no_grad():
            for n in LEAVES:
                p, c = tensors[n], co[n]
                p.grad = c["a"] * p + c["b"] * torch.sin(p) + c["c"]
        opt.step()
        if sched is not None:
            sched.step()
        for n in LEAVES:
            if not np.array_equal(tensors[n].detach().numpy(), traj[n][step]):
                raise RuntimeError(f"{case['name']}: torch's own resume differs at step {step}")
    return traj, saved, order


def _json_value(v):
    if isinstance(v, tuple):
        return list(v)
    return v


def build_problem_case(case, vers):
    init, coef = problem(case["complex"])
    save_at = SAVE_AT if case["family"] == "ckpt" else None
    traj, saved, order = run_problem(case, init, coef, save_at=save_at)
    used = {"numpy": vers["numpy"], "torch": vers["torch"]}
    if case["optimizer"] == "RMSpropTF":
        used["timm"] = vers["timm"]
    framework = "timm" if case["optimizer"] == "RMSpropTF" else "torch"
    meta = {
        "framework": framework,
        "optimizer": case["optimizer"],
        "kwargs": case["kwargs"],
        "schedule": case["schedule"],
        "complex": case["complex"],
        "steps": STEPS,
        "leaves": list(LEAVES),
        "versions": used,
        "torch_order": order,
    }
    for key in ("groups", "lambdas"):
        if case.get(key):
            meta[key] = case[key]
    arrays = {}
    if saved is not None:
        meta["save_at"] = SAVE_AT
        meta["param_groups"] = [{k: _json_value(v) for k, v in g.items()} for g in saved["param_groups"]]
        for i, entry in saved["state"].items():
            for key, value in entry.items():
                arrays[f"sd/{i}/{key}"] = value.detach().numpy().copy()
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    for n in LEAVES:
        if not np.all(np.isfinite(traj[n])):
            raise RuntimeError(f"{case['name']}: non-finite trajectory for leaf {n!r}")
        arrays[f"init_{n}"] = init[n]
        arrays[f"traj_{n}"] = traj[n]
        for k in ("a", "b", "c"):
            arrays[f"{k}_{n}"] = coef[n][k]
    return arrays


# --------------------------------------------------------------------------- the float32 recipe

RECIPE = {
    "inputs": 8,
    "hidden": 32,
    "classes": 4,
    "samples": 256,
    "batch": 32,
    "steps": 300,
    "lr": 0.01,
    "alpha": 0.99,
    "eps": 1e-8,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "warmup": {"start_factor": 0.1, "end_factor": 1.0, "total_iters": 20},
    "step": {"step_size": 100, "gamma": 0.5},
}


def recipe_data():
    """Data set, batch order and initial weights (float32), from a fixed seed."""
    r = RECIPE
    rng = np.random.default_rng(20261202)
    x = rng.standard_normal((r["samples"], r["inputs"])).astype(np.float32)
    teacher = rng.standard_normal((r["inputs"], r["classes"]))
    y = np.argmax(np.tanh(x @ teacher) + 0.3 * rng.standard_normal((r["samples"], r["classes"])), axis=1)
    order = np.concatenate(
        [rng.permutation(r["samples"]) for _ in range(r["steps"] * r["batch"] // r["samples"] + 1)]
    )
    batches = order[: r["steps"] * r["batch"]].reshape(r["steps"], r["batch"])

    def uniform(shape, fan_in):
        bound = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape).astype(np.float32)

    init = {
        "w1": uniform((r["hidden"], r["inputs"]), r["inputs"]),
        "b1": uniform((r["hidden"],), r["inputs"]),
        "w2": uniform((r["classes"], r["hidden"]), r["hidden"]),
        "b2": uniform((r["classes"],), r["hidden"]),
    }
    return x, y.astype(np.int64), batches.astype(np.int64), init


def run_recipe(init, x, y, batches, *, foreach=False, grad_nudge=None):
    """Per-step losses (before each step) and learning rates of the PyTorch recipe.

    ``grad_nudge=k`` moves every gradient entry by one ulp in a random direction (seed
    ``k``) at every step: the size of the rounding differences of a forward and backward
    pass summed in another (equally valid) order, which is what differs between frameworks.
    """
    rng = None if grad_nudge is None else np.random.default_rng(5000 + grad_nudge)
    torch = _torch()
    r = RECIPE
    t = {k: torch.tensor(v).requires_grad_(True) for k, v in init.items()}
    opt = torch.optim.RMSprop(
        [{"params": [t["w1"], t["w2"]]}, {"params": [t["b1"], t["b2"]], "weight_decay": 0.0}],
        lr=r["lr"],
        alpha=r["alpha"],
        eps=r["eps"],
        momentum=r["momentum"],
        weight_decay=r["weight_decay"],
        foreach=foreach,
    )
    warm = torch.optim.lr_scheduler.LinearLR(opt, **r["warmup"])
    decay = torch.optim.lr_scheduler.StepLR(opt, **r["step"])
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, decay], milestones=[r["warmup"]["total_iters"]])
    xt, yt = torch.tensor(x), torch.tensor(y)
    losses, lrs = [], []
    for step in range(r["steps"]):
        idx = torch.tensor(batches[step])
        h = torch.tanh(xt[idx] @ t["w1"].T + t["b1"])
        loss = torch.nn.functional.cross_entropy(h @ t["w2"].T + t["b2"], yt[idx])
        opt.zero_grad()
        loss.backward()
        if rng is not None:
            with torch.no_grad():
                for p in t.values():
                    up = torch.from_numpy(rng.random(tuple(p.shape)) < 0.5)
                    inf = torch.tensor(float("inf"), dtype=p.grad.dtype)
                    p.grad.copy_(torch.where(up, torch.nextafter(p.grad, inf), torch.nextafter(p.grad, -inf)))
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return np.asarray(losses, np.float64), np.asarray(lrs, np.float64)


def nudged(init, k):
    """``init`` with every entry moved by one ulp, up or down at random (seed ``k``)."""
    rng = np.random.default_rng(1000 + k)
    out = {}
    for name, value in init.items():
        up = rng.random(value.shape) < 0.5
        out[name] = np.where(
            up, np.nextafter(value, np.float32(np.inf)), np.nextafter(value, np.float32(-np.inf))
        ).astype(np.float32)
    return out


def build_recipe(case, vers):
    x, y, batches, init = recipe_data()
    losses, lrs = run_recipe(init, x, y, batches)
    runs = np.stack([run_recipe(nudged(init, k), x, y, batches)[0] for k in range(NUDGES)])
    grad_runs = np.stack([run_recipe(init, x, y, batches, grad_nudge=k)[0] for k in range(NUDGES)])
    floor_init = np.max(np.abs(runs - losses), axis=0)
    floor_grad = np.max(np.abs(grad_runs - losses), axis=0)
    floor = np.maximum(floor_init, floor_grad)
    foreach_losses, _ = run_recipe(init, x, y, batches, foreach=True)
    meta = {
        "recipe": RECIPE,
        "nudges": NUDGES,
        "versions": {"numpy": vers["numpy"], "torch": vers["torch"]},
        "foreach_gap": float(np.max(np.abs(foreach_losses - losses))),
        "floor": "floor[t] = max(floor_init[t], floor_grad[t]); floor_init[t] = max over NUDGES runs of "
        "|loss_k[t] - loss[t]|, run k starting from the initial weights each moved by one ulp in a "
        "random direction; floor_grad[t]: the same for runs whose gradients are each moved by one "
        "ulp in a random direction at every step",
    }
    arrays = {
        "meta": np.array(json.dumps(meta, sort_keys=True)),
        "x": x,
        "y": y,
        "batches": batches,
        "losses": losses,
        "lrs": lrs,
        "floor": floor,
        "floor_init": floor_init,
        "floor_grad": floor_grad,
        "nudged_losses": runs,
        "grad_nudged_losses": grad_runs,
    }
    for name, value in init.items():
        arrays[f"init_{name}"] = value
    return arrays


def build(case, vers):
    if case["family"] == "recipe":
        return build_recipe(case, vers)
    return build_problem_case(case, vers)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="compare with the committed fixtures, write nothing"
    )
    parser.add_argument("--only", default=None, help="run only cases whose name contains this string")
    args = parser.parse_args(argv)
    vers = versions()
    if not vers["torch"].startswith("2.13."):
        print(f"warning: fixtures were made with torch 2.13.x, found {vers['torch']}", file=sys.stderr)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    failures, written = [], 0
    cases = [c for c in CASES if args.only is None or args.only in c["name"]]
    for case in cases:
        arrays = build(case, vers)
        path = FIXTURES / f"{case['name']}.npz"
        diffs = compare(arrays, path, 0.0)
        if args.check:
            failures.extend(diffs)
        elif diffs:
            np.savez_compressed(path, **arrays)
            written += 1
    if args.only is None:
        known = {f"{c['name']}.npz" for c in CASES}
        extra = sorted(p.name for p in FIXTURES.glob("*.npz") if p.name not in known)
        if args.check:
            failures.extend(f"{name}: no case generates it" for name in extra)
        else:
            for name in extra:
                (FIXTURES / name).unlink()
    if args.check:
        for line in failures:
            print(line, file=sys.stderr)
        print(f"{len(cases)} cases checked, {len(failures)} differences")
        return 1 if failures else 0
    print(f"{len(cases)} cases, {written} fixtures written to {FIXTURES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
