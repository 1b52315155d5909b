"""The one fixture-replay harness: a recorded framework run replayed through an optax transformation.

Every fixture set under ``tests/reference`` (``fixtures``: ``generate.py``; ``fixtures_keras``:
``generate_keras.py``; ``fixtures_recipes``: ``generate_recipes.py``) records the same problem
-- the explicit gradient field ``a*p + b*sin(p) + c`` on a small tree of leaves -- as run by the
real framework in float64, with the parameters after every step. A test loads one fixture
(:func:`load`), rebuilds its problem in the dtype it checks (:func:`problem`), runs the rmsjax
transformation over it in one compiled scan (:func:`run`) and measures the worst relative gap
to the recorded trajectory (:func:`relative_error`). ``test_compat.py``, ``test_keras_recipes.py``,
``test_recipes.py`` and ``test_torch_checkpoint.py`` (through ``recipe_fixtures.py``) all replay
through here.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

REFERENCE = Path(__file__).resolve().parent / "reference"
# float64 replays of float64 framework runs agree to a few roundings: the bound every set meets.
RTOL64 = 1e-9


def names(folder: Path, pattern: str = "*") -> list[str]:
    """The fixtures of one set whose names match ``pattern`` (without ``.npz``), sorted."""
    return sorted(p.stem for p in folder.glob(f"{pattern}.npz"))


def load(path: Path) -> tuple[dict, dict]:
    """(meta, arrays) of one fixture file: its JSON description and its NumPy arrays."""
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    return json.loads(str(arrays.pop("meta"))), arrays


def step_schedule(base: float, step_size: int, gamma: float, dtype) -> Callable[[Any], jax.Array]:
    """``base * gamma ** (step // step_size)``: torch's StepLR (or a LambdaLR of that factor),
    or the Keras/TF1 equivalent that the generators recorded."""

    def schedule(step):
        k = jnp.floor_divide(step, step_size).astype(dtype)
        return jnp.asarray(base, dtype) * jnp.asarray(gamma, dtype) ** k

    return schedule


def tuples(kwargs: dict) -> dict:
    """A copy of recorded keywords with PyTorch's ``betas`` a tuple again (JSON made it a list)."""
    kwargs = dict(kwargs)
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return kwargs


def constructor_kwargs(meta: dict, factory: Callable, dtype) -> dict:
    """The keywords of the fixture's framework call, its recorded step schedule folded into the
    learning-rate argument (``lr`` or ``learning_rate``, whichever ``factory`` takes) as a
    :func:`step_schedule` of the recorded (or default) rate."""
    kwargs = tuples(meta["kwargs"])
    spec = meta["schedule"]
    if spec is not None:
        parameters = inspect.signature(factory).parameters
        name = "lr" if "lr" in parameters else "learning_rate"
        base = kwargs.get(name, parameters[name].default)
        kwargs[name] = step_schedule(base, spec["step_size"], spec["gamma"], dtype)
    return kwargs


def problem(meta: dict, arrays: dict, real_dtype) -> tuple[dict, Callable[[dict], dict]]:
    """(initial parameters, gradient function) of a fixture, in ``real_dtype``.

    A fixture with ``meta["complex"]`` has complex leaves, of the complex dtype as wide as
    ``real_dtype``.
    """
    leaves = meta["leaves"]
    dtype = jnp.dtype(real_dtype)
    if meta.get("complex"):
        dtype = jnp.dtype(jnp.complex128 if dtype == jnp.float64 else jnp.complex64)

    def arr(key):
        return jnp.asarray(arrays[key].astype(dtype))

    coef = {n: (arr(f"a_{n}"), arr(f"b_{n}"), arr(f"c_{n}")) for n in leaves}
    params = {n: arr(f"init_{n}") for n in leaves}

    def grad(p):
        return {n: coef[n][0] * p[n] + coef[n][1] * jnp.sin(p[n]) + coef[n][2] for n in leaves}

    return params, grad


def _compile_fast(lowered):
    """Compiles with XLA's backend optimisations off: a third less compile time, same numbers."""
    try:
        return lowered.compile({"xla_backend_optimization_level": 0})
    except Exception:  # an XLA without that option: compile as usual
        return lowered.compile()


def run(
    tx: optax.GradientTransformation,
    grad: Callable[[dict], dict],
    params: dict,
    state: Any,
    steps: int,
    *,
    observe: Callable[[dict, Any], Any] | None = None,
    fast_compile: bool = False,
) -> tuple[Any, dict, Any]:
    """``steps`` updates in one compiled scan: (what ``observe(params, state)`` gives after each
    step -- the parameters by default --, the final parameters, the final state).

    ``fast_compile`` compiles without XLA's backend optimisations (the numbers are the same).
    """
    look = observe if observe is not None else (lambda p, s: p)

    def body(carry, _):
        p, s = carry
        updates, s = tx.update(grad(p), s, p)
        p = optax.apply_updates(p, updates)
        return (p, s), look(p, s)

    lowered = jax.jit(lambda p, s: jax.lax.scan(body, (p, s), None, length=steps)).lower(params, state)
    compiled = _compile_fast(lowered) if fast_compile else lowered.compile()
    (p, s), out = compiled(params, state)
    return out, p, s


def trajectory(meta: dict, arrays: dict, start: int = 0, prefix: str = "traj") -> dict:
    """The fixture's recorded parameters per step (from step ``start``), one array per leaf."""
    return {n: arrays[f"{prefix}_{n}"][start:] for n in meta["leaves"]}


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


def replay_error(
    meta: dict,
    arrays: dict,
    tx: optax.GradientTransformation,
    real_dtype,
    *,
    fast_compile: bool = False,
) -> float:
    """Replays a whole fixture through ``tx`` from its start; the :func:`relative_error` of the
    trajectory. Every step's leaves must keep the fixture's dtype."""
    params, grad = problem(meta, arrays, real_dtype)
    traj, _, _ = run(tx, grad, params, tx.init(params), meta["steps"], fast_compile=fast_compile)
    for n, leaf in params.items():
        assert traj[n].dtype == leaf.dtype, (n, traj[n].dtype, leaf.dtype)
    return relative_error(traj, trajectory(meta, arrays))
