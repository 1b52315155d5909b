"""Checks of hyperparameters at construction and of trees at the first update.

A concrete bad value fails loudly, with a message that names the argument, its value and
the allowed range. Values that are jax arrays (or tracers, as under
``optax.inject_hyperparams`` and schedules) are not inspected: their value is unknown at
construction and reading it would force a device sync.
"""

from __future__ import annotations

import inspect
import math
import sys
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
    "hyperparameter",
    "is_concrete",
    "is_concrete_zero",
    "is_flax_variable",
    "is_schedule",
    "leaves_with_path",
    "require_params",
    "static_number",
]


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def is_flax_variable(x: Any) -> bool:
    """Whether ``x`` is a Flax NNX Variable (without importing Flax)."""
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(x, nnx.Variable)


def leaves_with_path(tree: Any) -> list[tuple[Any, int | None, Any]]:
    """``(path, i, array)`` for every array of ``tree``, in tree order. A Flax NNX Variable
    is named by its own path (``nnx.Optimizer`` initialises on Variables, whose array sits one
    level down, and updates with the bare arrays); ``i`` numbers the arrays of a Variable
    that holds several, else ``None``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_flax_variable)
    out = []
    for path, leaf in flat:
        inside = jax.tree.leaves(leaf) if is_flax_variable(leaf) else [leaf]
        for i, array in enumerate(inside):
            out.append((path, i if len(inside) > 1 else None, array))
    return out


def static_number(name: str, value: Any, allowed: str = "") -> float | None:
    """The one test of a static hyperparameter: the value as a Python float, or ``None``.

    Static (known when the update is traced, and free to decide a formula): Python ints
    and floats, NumPy scalars and 0-d NumPy arrays; they come back as a Python float.
    Traced (``None``): jax arrays and tracers, whatever their value (reading one would
    force a device sync). Anything else raises a TypeError naming ``name``: strings,
    ``None``, bools, complex numbers, ``Fraction`` and other objects, arrays (NumPy or
    jax) of a shape other than ``()``. An integer too large for a float raises a ValueError.
    ``allowed`` (e.g. ``"in [0, 1)"``) is repeated in the message.

    >>> import numpy as np
    >>> static_number("decay", np.float32(0.5)), static_number("decay", np.array(0.25))
    (0.5, 0.25)
    """
    wanted = f"a real number {allowed}".rstrip()
    if isinstance(value, jax.Array):
        if value.shape != ():
            raise TypeError(
                f"{name} must be a scalar ({wanted}), got an array of shape {value.shape}"
            )
        if not (jnp.issubdtype(value.dtype, jnp.number)):
            raise TypeError(f"{name} must be {wanted}, got an array of dtype {value.dtype}")
        return None
    if isinstance(value, np.ndarray):
        if value.ndim != 0:
            raise TypeError(
                f"{name} must be a scalar ({wanted}), got an array of shape {value.shape}"
            )
        value = value[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"{name} must be {wanted}, got {value!r} of type {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(
            f"{name} must be {wanted} that is finite in float32, got an integer of "
            f"{len(str(abs(int(value))))} digits"
        ) from None


def is_concrete(value: Any) -> bool:
    """True if ``value`` is a static number (see :func:`static_number`); never raises.

    The one predicate rmsjax uses to decide, when the update is traced, whether a formula
    may depend on a hyperparameter's value.
    """
    if isinstance(value, np.ndarray):
        return value.ndim == 0 and np.issubdtype(value.dtype, np.number) and not np.iscomplexobj(value)
    number = isinstance(value, (int, float, np.integer, np.floating))
    return number and not isinstance(value, (bool, np.bool_))


def is_concrete_zero(value: Any) -> bool:
    """True if ``value`` is a static number equal to zero (see :func:`is_concrete`)."""
    return is_concrete(value) and float(value) == 0.0


def hyperparameter(
    name: str, value: Any, *, low: float = 0.0, high: float | None = None, high_open: bool = True
) -> Any:
    """Normalises a hyperparameter once, at the factory boundary.

    Returns a Python float for a static value (checked: finite, finite in float32, in the
    allowed range) or the 0-d jax array itself for a traced one (its value unknown, so not
    checked). Everything downstream then tells the two apart with :func:`is_concrete`.

    >>> hyperparameter("momentum", 0.5, high=1.0)
    0.5
    >>> hyperparameter("learning_rate", 1e39)
    Traceback (most recent call last):
    ...
    ValueError: learning_rate must be a finite number >= 0, got 1e+39 (not finite in float32)
    """
    allowed = _interval(low, high, high_open)
    x = static_number(name, value, allowed)
    if x is None:
        return value
    ok = math.isfinite(x) and x >= low
    if high is not None:
        ok = ok and (x < high if high_open else x <= high)
    if not ok:
        raise ValueError(f"{name} must be a finite number {allowed}, got {value!r}")
    if abs(x) > _FLOAT32_MAX:
        raise ValueError(
            f"{name} must be a finite number {allowed}, got {value!r} (not finite in float32)"
        )
    return x


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
    hyperparameter(name, value, low=low, high=high, high_open=high_open)


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
    """A learning rate: a finite number ``>= 0``, a jax array, or a schedule ``f(step)``.

    A callable that cannot take the step count (Keras accepts zero-argument callables, which
    it calls at every step) fails here with a ``TypeError`` naming ``name``, not with the
    callable's own error at the first update."""
    if is_schedule(value):
        _check_takes_step(name, value)
        return
    check_non_negative(name, value)


def _check_takes_step(name: str, schedule: Callable[..., Any]) -> None:
    try:
        signature = inspect.signature(schedule)
    except (TypeError, ValueError):  # no signature to read (some builtins): left to the call
        return
    try:
        signature.bind(0)
    except TypeError:
        raise TypeError(
            f"{name}: a schedule is called with the step count, f(step), but {schedule!r} cannot "
            f"take one argument (its signature is {signature}); a callable of no arguments is "
            "not a schedule here: pass a number, a jax array or f(step)"
        ) from None


def check_flag(name: str, value: Any) -> None:
    """Boolean flags decide the structure of the computation, so they must be Python bools."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a Python bool, got {value!r} of type {type(value).__name__}")


def is_params_placeholder(params: Any) -> bool:
    """Whether ``params`` is the placeholder on which ``optax.tree.map_params`` initialises a
    transformation (to find which parts of its state are shaped like the parameters)."""
    kind = type(params)
    return kind.__name__ == "_ParamsPlaceholder" and kind.__module__.startswith("optax")


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
    """Fails at trace time when ``updates`` and ``reference`` differ in structure or shapes,
    or when an update leaf is not floating or complex (a TypeError naming its path).

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
        mine_dtype = getattr(mine, "dtype", None)
        if mine_dtype is not None and not jnp.issubdtype(mine_dtype, jnp.inexact):
            raise TypeError(
                f"{who}: updates{key} has dtype {mine_dtype}; rmsjax works on floating or complex "
                "leaves (is an integer or boolean array among the gradients?)"
            )
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


def check_transformation(name: str, value: Any, who: str) -> None:
    """Fails with a TypeError unless ``value`` has callable ``init`` and ``update`` (an
    ``optax.GradientTransformation``): a wrapper handed ``None`` or an unbuilt factory such as
    ``rmsjax.adam`` itself would otherwise fail later inside optax with a bare AttributeError."""
    if not (callable(getattr(value, "init", None)) and callable(getattr(value, "update", None))):
        hint = " (a factory: call it, e.g. rmsjax.adam(1e-3))" if callable(value) else ""
        raise TypeError(
            f"{who}: {name} must be an optax.GradientTransformation (with init and update), got "
            f"{type(value).__name__}{hint}"
        )


def check_state_type(state: Any, expected: type | tuple[type, ...], who: str) -> None:
    """Fails with a TypeError when ``update`` is handed another transformation's state.

    Each transformation declares its state type; a state of another type (another
    optimizer's, a wrapper's, ``optax.EmptyState``) would otherwise be read by field name
    and fail with a bare AttributeError, or worse, run.
    """
    types = expected if isinstance(expected, tuple) else (expected,)
    if not isinstance(state, types):
        names = " or ".join(t.__name__ for t in types)
        raise TypeError(
            f"{who}: expected a {names} (the state its init returns), got "
            f"{type(state).__name__}: is this the state of another optimizer, or of a wrapper "
            f"around this one?"
        )


def check_real_for_real(updates: Any, reference: Any, *, what: str, who: str) -> None:
    """A complex update for a real leaf of ``reference`` fails (its imaginary part would be lost).

    Only dtypes are read, at trace time. Leaves without a dtype are skipped (the shape
    check names those).
    """
    update_leaves = jax.tree_util.tree_leaves_with_path(updates)
    reference_leaves = jax.tree_util.tree_leaves(reference)
    if len(update_leaves) != len(reference_leaves):
        return
    for (path, mine), theirs in zip(update_leaves, reference_leaves):
        mine_dtype, theirs_dtype = getattr(mine, "dtype", None), getattr(theirs, "dtype", None)
        if mine_dtype is None or theirs_dtype is None:
            continue
        if jnp.issubdtype(mine_dtype, jnp.complexfloating) and not jnp.issubdtype(
            theirs_dtype, jnp.complexfloating
        ):
            key = jax.tree_util.keystr(path)
            raise TypeError(
                f"{who}: updates{key} is complex ({mine_dtype}) but {what}{key} is real "
                f"({theirs_dtype}); a complex gradient for a real parameter would lose its "
                "imaginary part"
            )
