"""Small internal pieces shared by :mod:`rmsjax.compat`'s framework modules.

Nothing here does optimizer maths of its own: the transformations below only negate,
re-view, or route updates through the transformations of :mod:`rmsjax.transforms`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import numbers
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsjax import _validation as check
from rmsjax import averages, transforms

PyTree = Any


# --------------------------------------------------------------------------- concrete values


def is_concrete(value: Any) -> bool:
    """True for a hyperparameter known at construction: a real Python or NumPy number.

    A NumPy 0-d array of a real dtype counts, as a NumPy scalar does (``np.array(0.0)``
    behaves as ``0.0``); a jax array or tracer never does (its value is only known when the
    update runs, e.g. under ``optax.inject_hyperparams``), nor does a bool.

    (The core is moving to one such predicate in ``rmsjax._validation``; this is the same
    rule, kept here so that compat decides every optional part by it.)
    """
    if isinstance(value, jax.Array) or isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, np.ndarray):
        real = np.issubdtype(value.dtype, np.integer) or np.issubdtype(value.dtype, np.floating)
        return value.ndim == 0 and bool(real)
    return isinstance(value, (int, float, np.integer, np.floating))


def is_concrete_zero(value: Any) -> bool:
    """True for a concrete number (see :func:`is_concrete`) equal to zero."""
    return is_concrete(value) and float(value) == 0.0


def unless_zero(value: Any, make: Callable[[], optax.GradientTransformation]) -> optax.GradientTransformation:
    """``make()``, or ``transforms.absent()`` when ``value`` is ``None`` or a concrete zero.

    A framework's signature default of 0 (momentum, weight decay) means "no such part";
    ``None`` (Keras's options) too. A jax array is never known to be zero, so under
    ``optax.inject_hyperparams`` a default of 0 switches the part on (with updates equal to
    the plain ones) unless it is listed in ``static_args`` (``docs/porting.md``). The
    absent part keeps the slot in the chain with an empty state.
    """
    return transforms.absent() if value is None or is_concrete_zero(value) else make()


def widest_float(*dtypes: Any) -> jnp.dtype:
    """The widest real floating dtype among ``dtypes``, float32 at least (float64 only with x64).

    Non-floating dtypes are passed over; complex ones count as their real part.
    ``widest_float(jnp.float64)`` is JAX's default float (float64 with x64, else float32).
    """
    widest = jnp.dtype(jnp.float32)
    for dtype in dtypes:
        dtype = jnp.dtype(dtype)
        if jnp.issubdtype(dtype, jnp.complexfloating):
            dtype = jnp.finfo(dtype).dtype
        if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize > widest.itemsize:
            widest = dtype
    return jnp.dtype(jax.dtypes.canonicalize_dtype(widest))


# --------------------------------------------------------------------------- validation


# The framework classes validate with the core's checks, under names that read well there.
require = check.check_range


def require_learning_rate(name: str, value: Any) -> None:
    """A learning rate: a finite number >= 0, a jax array, or a schedule returning a number.

    A schedule is called once, at step 0, to check that it returns a number or an array
    (a schedule returning ``None`` would otherwise fail deep inside the update).
    """
    check.check_learning_rate(name, value)
    if check.is_schedule(value):
        rate = value(jnp.zeros((), jnp.int32))
        numeric = isinstance(rate, (jax.Array, np.ndarray, numbers.Real)) and not isinstance(rate, bool)
        if not numeric or not jnp.issubdtype(jnp.result_type(rate), jnp.number):
            raise TypeError(
                f"{name}: the schedule {value!r} returned {rate!r} of type {type(rate).__name__} at "
                "step 0; a schedule f(step) must return a number or a numeric array"
            )

MAX_COUNT = 2**31 - 1  # step counts are int32


def check_integer(name: str, value: Any, *, low: int, high: int = MAX_COUNT, optional: bool = False) -> Any:
    """``value`` as a Python int in ``[low, high]`` (``None`` too when ``optional``).

    The one integer check of :mod:`rmsjax.compat`: a bool, a float or any non-integer
    raises ``TypeError``, an integer out of range ``ValueError``, both naming ``name``. The
    default upper bound is the largest int32 step count (larger values would overflow the
    counts they are compared with).
    """
    wanted = f"{'None or ' if optional else ''}an integer in [{low}, {high}]"
    if value is None and optional:
        return None
    if isinstance(value, jax.Array):
        raise TypeError(
            f"{name} must be {wanted} known when the optimizer is built (it decides the "
            f"structure of the step), got a jax array; under optax.inject_hyperparams pass "
            f"static_args=({name!r},)"
        )
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {wanted}, got {value!r} of type {type(value).__name__}")
    if not low <= int(value) <= high:
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------- transformations


def negate() -> optax.GradientTransformation:
    """Flips the sign of the updates (PyTorch's ``maximize=True``, applied to the gradient)."""

    def flip(updates, params):
        del params
        return averages.scale(updates, -1.0)

    return optax.stateless(flip)


def _to_real(tree: PyTree) -> PyTree:
    def leaf(x):
        if jnp.iscomplexobj(x):
            return jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
        return x

    return jax.tree.map(leaf, tree)


def _to_complex(tree: PyTree, like: PyTree) -> PyTree:
    def leaf(x, ref):
        if jnp.iscomplexobj(ref):
            return jax.lax.complex(x[..., 0], x[..., 1]).astype(ref.dtype)
        return x

    return jax.tree.map(leaf, tree, like)


def complex_as_real(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Runs ``inner`` on complex leaves viewed as pairs of reals, as PyTorch does.

    PyTorch's adaptive optimizers call ``torch.view_as_real`` on complex parameters, so the
    real and imaginary parts get separate second moments (``re**2`` and ``im**2``), where
    rmsjax's transformations would use one per complex number (``|g|**2``). Each complex leaf
    of shape ``s`` is seen by ``inner`` as a real leaf of shape ``s + (2,)``; real leaves pass
    through unchanged. The state of ``inner`` keeps that real view.
    """

    def init_fn(params):
        return inner.init(_to_real(params))

    def update_fn(updates, state, params=None):
        if params is not None:
            check.check_trees_match(updates, params, what="params", who="complex_as_real", dtypes="kind")
        real_params = None if params is None else _to_real(params)
        try:
            out, state = inner.update(_to_real(updates), state, real_params)
        except ValueError as error:
            complex_paths = [
                jax.tree_util.keystr(path)
                for path, x in jax.tree_util.tree_flatten_with_path(updates)[0]
                if jnp.iscomplexobj(x)
            ]
            if not complex_paths:
                raise
            raise ValueError(
                f"{error} (the complex updates at {', '.join(complex_paths)} are seen as pairs of reals, "
                "shape + (2,), as PyTorch does: a complex gradient needs a complex parameter, and a "
                "state made by init from it)"
            ) from None
        return _to_complex(out, updates), state

    return optax.GradientTransformation(init_fn, update_fn)


class DecoupledWeightDecayState(NamedTuple):
    """State of :func:`decoupled_weight_decay`: the number of updates made (for the schedule)."""

    count: jax.Array


def decoupled_weight_decay(weight_decay: Any, learning_rate: Any) -> optax.GradientTransformation:
    r"""Adds :math:`-\eta_t \lambda \theta_{t-1}` to the updates, outside any momentum buffer.

    Keras's ``weight_decay``: ``params -= lr_t * weight_decay * params``, with the learning
    rate of the current step (``learning_rate`` may be a schedule of the update count).
    Placed last in a chain, it bypasses everything before it.
    """

    def init_fn(params):
        return DecoupledWeightDecayState(count=transforms.zero_count(params))

    def update_fn(updates, state, params=None):
        check.check_state_type(state, DecoupledWeightDecayState, "weight_decay")
        check.require_params(params, "decoupled weight decay")
        check.check_trees_match(updates, params, what="params", who="weight_decay", dtypes="kind")
        rate = jnp.asarray(transforms.rate_at(learning_rate, state.count))
        decayed = averages.scale(params, weight_decay)
        updates = averages.add_scaled(updates, decayed, -rate)
        return updates, DecoupledWeightDecayState(count=averages.increment_count(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------- schedules


def divided_by_decay(learning_rate: Any, lr_decay: Any) -> Any:
    """PyTorch Adagrad's rate ``lr_t / (1 + count * lr_decay)``, ``count`` = updates made so far.

    Returns ``learning_rate`` itself when ``lr_decay`` is a concrete zero.
    """
    if is_concrete_zero(lr_decay):
        return learning_rate

    def schedule(count):
        base = jnp.asarray(transforms.rate_at(learning_rate, count))
        decay = jnp.asarray(lr_decay)
        dtype = widest_float(base.dtype, decay.dtype)  # (explicit: strict promotion)
        decay = decay.astype(dtype)
        steps = jnp.asarray(count).astype(dtype)
        return base.astype(dtype) / (jnp.ones_like(decay) + steps * decay)

    return schedule


# --------------------------------------------------------------------------- declarations


@dataclasses.dataclass(frozen=True)
class Declaration:
    """What a framework optimizer's transformation is, declared by the factory that made it.

    Attributes:
      framework: ``"torch"``, ``"keras"``, ``"tf1"`` or ``"timm"``.
      optimizer: the framework's class name, e.g. ``"Adam"``.
      hyperparameters: every keyword argument of the factory, its defaults included.
    """

    framework: str
    optimizer: str
    hyperparameters: Mapping[str, Any]


class Declared(optax.GradientTransformationExtraArgs):
    """An ``optax`` transformation that carries the :class:`Declaration` of its optimizer.

    It is the ``(init, update)`` pair of any optax transformation (``optax.chain`` and the
    wrappers take it as one); ``declaration`` is set once, when the factory returns it, and
    is what :func:`rmsjax.compat.torch.state_dict` reads: nothing is inferred from the
    state's layout. A wrapper (``optax.chain``, ``optax.inject_hyperparams``,
    :func:`rmsjax.quantized`) returns a transformation of its own, without it.
    """

    declaration: Declaration | None

    def __new__(cls, init, update, declaration: Declaration | None = None):
        # (``declaration=None`` only while copy or pickle rebuild one: they call
        # ``__new__(cls, init, update)`` and then restore the attribute.)
        self = super().__new__(cls, init, update)
        self.declaration = declaration
        return self


Factory = Callable[..., optax.GradientTransformation]


def declares(framework: str) -> Callable[[Factory], Callable[..., Declared]]:
    """Decorates a framework factory so that its result declares ``framework``, its name and arguments.

    The arguments are bound to the factory's signature (its defaults applied): the
    declaration holds exactly what the caller asked for.
    """

    def decorate(factory: Factory) -> Callable[..., Declared]:
        signature = inspect.signature(factory)

        @functools.wraps(factory)
        def wrapper(*args: Any, **kwargs: Any) -> Declared:
            tx = optax.with_extra_args_support(factory(*args, **kwargs))
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            declaration = Declaration(framework, factory.__name__, dict(bound.arguments))
            return Declared(tx.init, tx.update, declaration)

        return wrapper

    return decorate


def declaration_of(tx: Any) -> Declaration | None:
    """The :class:`Declaration` a transformation carries, ``None`` if it carries none."""
    return getattr(tx, "declaration", None) if isinstance(tx, Declared) else None
