"""Shared helpers of ``test_recipes.py`` and ``test_torch_checkpoint.py``: fixtures and replays.

The fixtures in ``tests/reference/fixtures_recipes`` were written by
``tests/reference/generate_recipes.py`` from PyTorch 2.13 and timm 1.0 (see its docstring).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsjax import compat

FIXTURES = Path(__file__).resolve().parent / "reference" / "fixtures_recipes"
RTOL64 = 1e-9
RTOL32 = 1e-4
MODULES = {"torch": compat.torch, "timm": compat.timm}


def names(prefix: str) -> list[str]:
    return sorted(p.stem for p in FIXTURES.glob(f"{prefix}*.npz"))


def load(name: str) -> tuple[dict, dict]:
    with np.load(FIXTURES / f"{name}.npz") as data:
        arrays = {key: data[key] for key in data.files}
    return json.loads(str(arrays.pop("meta"))), arrays


def step_schedule(base: float, step_size: int, gamma: float, dtype):
    """``base * gamma ** (step // step_size)``: torch's StepLR or a LambdaLR of that factor."""

    def schedule(step):
        k = jnp.floor_divide(step, step_size).astype(dtype)
        return jnp.asarray(base, dtype) * jnp.asarray(gamma, dtype) ** k

    return schedule


def _fix(kwargs: dict) -> dict:
    kwargs = dict(kwargs)
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return kwargs


def factory(meta: dict):
    return getattr(MODULES[meta["framework"]], meta["optimizer"])


def hyperparams(meta: dict, dtype) -> dict:
    """The fixture's constructor keywords, a StepLR schedule folded into ``lr``."""
    kwargs = _fix(meta["kwargs"])
    if meta["schedule"] is not None:
        base = kwargs.get("lr", inspect.signature(factory(meta)).parameters["lr"].default)
        spec = meta["schedule"]
        kwargs["lr"] = step_schedule(base, spec["step_size"], spec["gamma"], dtype)
    return kwargs


def make(meta: dict, dtype, *, grouped: bool | None = None) -> optax.GradientTransformation:
    """The rmsjax transformation of a fixture: a plain factory call, or ``param_groups``."""
    fac = factory(meta)
    defaults = hyperparams(meta, dtype)
    if grouped is None:
        grouped = bool(meta.get("groups"))
    if not grouped:
        return fac(**defaults)
    groups = []
    lambdas = meta.get("lambdas") or [None] * len(meta.get("groups") or [])
    for spec, lam in zip(meta.get("groups") or [], lambdas, strict=True):
        group = _fix(spec)
        if lam is not None:
            base = group.get("lr", defaults.get("lr", inspect.signature(fac).parameters["lr"].default))
            group["lr"] = step_schedule(base, lam["step_size"], lam["gamma"], dtype)
        groups.append(group)
    return compat.param_groups(fac, groups, **defaults)


def problem(meta: dict, arrays: dict, real_dtype):
    """(initial params, gradient function) of the fixture's problem, in ``real_dtype``."""
    leaves = meta["leaves"]
    dtype = jnp.dtype(real_dtype)
    leaf_dtype = dtype
    if meta["complex"]:
        leaf_dtype = jnp.dtype(jnp.complex128 if dtype == jnp.float64 else jnp.complex64)

    def arr(key):
        return jnp.asarray(arrays[key].astype(leaf_dtype))

    coef = {n: (arr(f"a_{n}"), arr(f"b_{n}"), arr(f"c_{n}")) for n in leaves}
    params = {n: arr(f"init_{n}") for n in leaves}

    def grad(p):
        return {n: coef[n][0] * p[n] + coef[n][1] * jnp.sin(p[n]) + coef[n][2] for n in leaves}

    return params, grad


def run(tx, grad, params, state, steps: int):
    """``steps`` updates in one compiled scan: (params after each step, final params, final state)."""

    def body(carry, _):
        p, s = carry
        updates, s = tx.update(grad(p), s, p)
        p = optax.apply_updates(p, updates)
        return (p, s), p

    (p, s), traj = jax.jit(lambda p, s: jax.lax.scan(body, (p, s), None, length=steps))(params, state)
    return traj, p, s


def relative_error(ours: dict, theirs: dict) -> float:
    """Worst over steps and leaves of ``max|ours - theirs| / max|theirs|`` at that step."""
    worst = 0.0
    for n, b in theirs.items():
        a = np.asarray(ours[n]).astype(b.dtype)
        steps = b.shape[0]
        diff = np.abs(a - b).reshape(steps, -1).max(axis=1)
        scale = np.abs(b).reshape(steps, -1).max(axis=1)
        worst = max(worst, float(np.max(diff / scale)))
    return worst


def trajectory(meta: dict, arrays: dict, start: int = 0) -> dict:
    return {n: arrays[f"traj_{n}"][start:] for n in meta["leaves"]}


def saved_state_dict(meta: dict, arrays: dict) -> dict:
    """The fixture's PyTorch ``state_dict()`` with numpy arrays in place of tensors."""
    state: dict[int, dict] = {}
    for key, value in arrays.items():
        if key.startswith("sd/"):
            _, index, field = key.split("/")
            state.setdefault(int(index), {})[field] = value
    groups = [dict(g) for g in meta["param_groups"]]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}
