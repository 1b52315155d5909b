"""Checks of hyperparameters at construction and of trees at the first update.

A concrete bad value fails loudly, with a message that names the argument, its value and
the allowed range. Values that are jax arrays (or tracers, as under
``optax.inject_hyperparams`` and schedules) are not inspected: their value is unknown at
construction and reading it would force a device sync.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, TypeGuard

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "check_flag",
    "check_learning_rate",
    "check_non_negative",
    "check_range",
    "check_state_dtype",
    "check_trees_match",
    "check_unit_interval",
    "is_concrete",
    "is_concrete_zero",
    "require_params",
]


def _concrete(name: str, value: Any, allowed: str = "") -> float | None:
    """The value as a Python float, ``None`` if it is a jax array or tracer.

    Raises TypeError for anything that is not a real number (strings, None, bools,
    complex numbers, arrays of more than one element); ``allowed`` (e.g. ``"in [0, 1)"``)
    is repeated in the message.
    """
    if isinstance(value, jax.Array):
        return None
    wanted = f"a real number {allowed}".rstrip()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.ndarray)):
        raise TypeError(f"{name} must be {wanted}, got {value!r} of type {type(value).__name__}")
    if isinstance(value, np.ndarray):
        if value.ndim != 0 or not np.issubdtype(value.dtype, np.number):
            raise TypeError(
                f"{name} must be {wanted}, got an array of shape {value.shape} and dtype {value.dtype}"
            )
        if np.iscomplexobj(value):
            raise TypeError(f"{name} must be {wanted}, got the complex value {value!r}")
    return float(value)


def _interval(low: float, high: float | None, high_open: bool) -> str:
    if high is None:
        return f">= {low:g}"
    return f"in [{low:g}, {high:g}{')' if high_open else ']'}"


def check_range(
    name: str, value: Any, *, low: float = 0.0, high: float | None = None, high_open: bool = True
) -> None:
    """``value`` must be a finite real number with ``low <= value`` and ``value < high``.

    ``high=None`` means no upper bound; ``high_open=False`` allows ``value == high``. NaN
    and infinities always fail. A jax array or tracer is not inspected.

    >>> check_range("momentum", 0.5, high=1.0)
    >>> check_range("momentum", 1.0, high=1.0)
    Traceback (most recent call last):
    ...
    ValueError: momentum must be a finite number in [0, 1), got 1.0
    """
    allowed = _interval(low, high, high_open)
    x = _concrete(name, value, allowed)
    if x is None:
        return
    ok = math.isfinite(x) and x >= low
    if high is not None:
        ok = ok and (x < high if high_open else x <= high)
    if not ok:
        raise ValueError(f"{name} must be a finite number {allowed}, got {value!r}")


def check_non_negative(name: str, value: Any) -> None:
    """``value`` must be finite and ``>= 0``."""
    check_range(name, value)


def check_unit_interval(name: str, value: Any, *, include_one: bool = False) -> None:
    """``value`` must lie in ``[0, 1)`` (or ``[0, 1]`` with ``include_one``); NaN fails."""
    check_range(name, value, high=1.0, high_open=not include_one)


def check_state_dtype(name: str, value: Any) -> Any:
    """``None`` or a floating dtype (what ``state_dtype`` accepts); returns it as a ``jnp.dtype``.

    >>> import jax.numpy as jnp
    >>> check_state_dtype("state_dtype", jnp.bfloat16)
    dtype(bfloat16)
    """
    if value is None:
        return None
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        raise TypeError(
            f"{name} must be None or a floating dtype such as jnp.float32, got {value!r}"
        ) from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{name} must be None or a floating dtype such as jnp.float32, got {value!r} ({dtype})"
        )
    return dtype


def is_schedule(value: Any) -> TypeGuard[Callable[..., Any]]:
    """True if ``value`` is a schedule ``f(step)``, not a number or an array."""
    return callable(value) and not isinstance(value, jax.Array)


def check_learning_rate(name: str, value: Any) -> None:
    """A learning rate: a finite number ``>= 0``, a jax array, or a schedule ``f(step)``."""
    if is_schedule(value):
        return
    check_non_negative(name, value)


def check_flag(name: str, value: Any) -> None:
    """Boolean flags decide the structure of the computation, so they must be Python bools."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a Python bool, got {value!r} of type {type(value).__name__}")


def is_concrete(value: Any) -> bool:
    """True if ``value`` is a plain number (Python or NumPy scalar), known at trace time.

    Arrays (jax or NumPy), tracers and bools are not: only a plain number lets a formula
    be chosen, or a part left out, when the update is traced.
    """
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def is_concrete_zero(value: Any) -> bool:
    """True if ``value`` is a plain number equal to zero (see :func:`is_concrete`)."""
    return is_concrete(value) and float(value) == 0.0


def require_params(params: Any, who: str) -> None:
    """Fails with a clear message when a transformation that needs ``params`` got none."""
    if params is None:
        raise ValueError(
            f"{who} needs the current parameters: call update(updates, state, params)"
        )


def _describe(leaf: Any) -> str:
    shape = getattr(leaf, "shape", None)
    dtype = getattr(leaf, "dtype", None)
    if shape is None:
        return repr(leaf)
    return f"{dtype}{list(shape)}"


def _kind(leaf: Any) -> str | None:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        return None
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return "complex"
    if jnp.issubdtype(dtype, jnp.floating):
        return "real floating"
    return str(dtype)


def check_trees_match(
    updates: Any, reference: Any, *, what: str, who: str, dtypes: str | None = None
) -> None:
    """Fails at trace time when ``updates`` and ``reference`` differ in structure or shapes.

    The message names the first path where they differ and both sides. Only static
    information (tree structure, shapes, dtypes) is compared, so this costs nothing at run
    time.

    ``dtypes`` says how far dtypes must agree:

    * ``None`` (for state trees, whose dtype ``state_dtype`` may legitimately change):
      not compared;
    * ``"kind"`` (for the parameters): a complex gradient for a real parameter, a real
      one for a complex parameter, or a non-floating leaf facing a floating one fails;
      precisions may differ (a float32 gradient for a bfloat16 parameter is fine);
    * ``"exact"``: the dtypes must be equal.

    >>> import jax.numpy as jnp
    >>> check_trees_match({"w": jnp.ones(2)}, {"w": jnp.ones(2)}, what="params", who="demo")
    >>> check_trees_match({"w": jnp.ones(2)}, {"w": jnp.ones(3)}, what="params", who="demo")
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: demo: the updates do not match the params tree at ['w']: ...
    """
    if dtypes not in (None, "kind", "exact"):
        raise ValueError(f"dtypes must be None, 'kind' or 'exact', got {dtypes!r}")
    update_leaves, update_def = jax.tree_util.tree_flatten_with_path(updates)
    reference_leaves, reference_def = jax.tree_util.tree_flatten_with_path(reference)
    if update_def != reference_def:
        update_paths = [jax.tree_util.keystr(p) for p, _ in update_leaves]
        reference_paths = [jax.tree_util.keystr(p) for p, _ in reference_leaves]
        for mine, theirs in zip(update_paths, reference_paths):
            if mine != theirs:
                raise ValueError(
                    f"{who}: the updates do not match the {what} tree: first difference at "
                    f"updates{mine} vs {what}{theirs}"
                )
        if len(update_paths) != len(reference_paths):
            longer, name = (
                (update_paths, "updates") if len(update_paths) > len(reference_paths)
                else (reference_paths, what)
            )
            extra = longer[min(len(update_paths), len(reference_paths))]
            raise ValueError(
                f"{who}: the updates do not match the {what} tree: {name}{extra} has no "
                f"counterpart ({len(update_paths)} leaves in updates, "
                f"{len(reference_paths)} in {what})"
            )
        raise ValueError(
            f"{who}: the updates do not match the {what} tree: structures differ "
            f"({update_def} vs {reference_def})"
        )
    for (path, mine), (_, theirs) in zip(update_leaves, reference_leaves):
        key = jax.tree_util.keystr(path)
        if getattr(mine, "shape", None) != getattr(theirs, "shape", None):
            raise ValueError(
                f"{who}: the updates do not match the {what} tree at {key}: "
                f"updates{key} is {_describe(mine)}, {what}{key} is {_describe(theirs)}"
            )
        if dtypes is None:
            continue
        mine_dtype, theirs_dtype = getattr(mine, "dtype", None), getattr(theirs, "dtype", None)
        if mine_dtype is None or theirs_dtype is None:
            continue
        differ = _kind(mine) != _kind(theirs) if dtypes == "kind" else mine_dtype != theirs_dtype
        if differ:
            raise ValueError(
                f"{who}: the updates do not match the {what} tree at {key}: "
                f"updates{key} is {_describe(mine)}, {what}{key} is {_describe(theirs)} "
                f"(dtypes must {'be of the same kind' if dtypes == 'kind' else 'be equal'})"
            )
