"""Shared helpers of ``test_recipes.py`` and ``test_torch_checkpoint.py``: the recipe fixtures.

The fixtures in ``tests/reference/fixtures_recipes`` were written by
``tests/reference/generate_recipes.py`` from PyTorch 2.13 and timm 1.0 (see its docstring).
They are replayed by ``fixture_replay`` (the one harness); this module adds what is particular
to them: the optimizer of a fixture (plain or in parameter groups) and its saved ``state_dict``.
"""

from __future__ import annotations

import inspect

import fixture_replay
import optax
from fixture_replay import RTOL64, problem, relative_error, run, step_schedule, trajectory

from rmsjax import compat

__all__ = [
    "RTOL32",
    "RTOL64",
    "factory",
    "hyperparams",
    "load",
    "make",
    "names",
    "problem",
    "relative_error",
    "run",
    "saved_state_dict",
    "step_schedule",
    "trajectory",
]

FIXTURES = fixture_replay.REFERENCE / "fixtures_recipes"
RTOL32 = 1e-4
MODULES = {"torch": compat.torch, "timm": compat.timm}


def names(prefix: str) -> list[str]:
    return fixture_replay.names(FIXTURES, f"{prefix}*")


def load(name: str) -> tuple[dict, dict]:
    return fixture_replay.load(FIXTURES / f"{name}.npz")


def factory(meta: dict):
    return getattr(MODULES[meta["framework"]], meta["optimizer"])


def hyperparams(meta: dict, dtype) -> dict:
    """The fixture's constructor keywords, a StepLR schedule folded into ``lr``."""
    return fixture_replay.constructor_kwargs(meta, factory(meta), dtype)


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
        group = fixture_replay.tuples(spec)
        if lam is not None:
            base = group.get("lr", defaults.get("lr", inspect.signature(fac).parameters["lr"].default))
            group["lr"] = step_schedule(base, lam["step_size"], lam["gamma"], dtype)
        groups.append(group)
    return compat.param_groups(fac, groups, **defaults)


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
