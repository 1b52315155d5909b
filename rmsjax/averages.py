"""Layer 1: leaky averages, running sums and bias correction as pure tree functions.

Every formula that the transformations in :mod:`rmsjax.transforms` use lives here,
once. Each function maps over a pytree leaf by leaf and returns a new tree; nothing is
mutated.

Dtype rules, shared by every function in this module:

* arithmetic happens in the leaf's *compute dtype*: the leaf's own dtype, widened to at
  least float32 (so a bfloat16 or float16 leaf is computed in float32, a float64 leaf in
  float64, a complex64 leaf in complex64);
* hyperparameter scalars are computed once per call, never per leaf: a concrete number's
  complement ``1 - decay`` is computed on the host in float64 and then rounded to the
  compute dtype (float32 gets the correctly rounded ``f32(1 - 0.999)`` that optax and
  PyTorch use, not ``f32(1) - f32(0.999)``, which is 1.3e-5 off); a jax array
  (``optax.inject_hyperparams``) is complemented once, in its own dtype. Every scalar is
  cast explicitly to the leaf's compute dtype, so a Python float never promotes a
  low-precision leaf and a float32 hyperparameter never promotes a float64 leaf under
  strict dtype promotion;
* formulas are chosen when the update is traced: a term or a guard that a concrete
  hyperparameter makes dead (``+ eps_root`` with ``eps_root = 0``, the 0/0 guard when
  ``eps > 0``, a dampening of 0) is not emitted;
* the only overflow policy is :func:`_saturate`, used when storing second moments: a
  state narrower than its compute dtype (float16, bfloat16) saturates at its largest
  finite value instead of becoming ``inf``;
* results that are *stored* (averages, sums, counters) are cast back to the dtype of the
  state they replace; results that are *returned as updates* are cast to the gradient's
  dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.core  # jax deletes its own alias; named here so type checkers see jax.core
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rmsjax import _validation as check

__all__ = [
    "add_scaled",
    "bias_correction",
    "cast_like",
    "centered_variance",
    "common_compute_dtype",
    "compute_dtype",
    "divide_by_root",
    "full_like",
    "multiply_by_root_correction",
    "multiply_by_root_ratio",
    "scale",
    "increment_count",
    "real_dtype",
    "replicated_like",
    "squared_magnitude",
    "update_leaky_average",
    "update_momentum_buffer",
    "update_running_sum",
    "update_step_average",
]

PyTree = Any
Scalar = Any  # a Python number or a scalar jax array (possibly a tracer)

_INT32_MAX = jnp.iinfo(jnp.int32).max


def compute_dtype(dtype: Any) -> jnp.dtype:
    """The dtype arithmetic on a leaf of ``dtype`` is done in: at least float32.

    >>> import jax.numpy as jnp
    >>> compute_dtype(jnp.bfloat16)
    dtype('float32')
    """
    dtype = _canonical(dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return dtype
    if jnp.issubdtype(dtype, jnp.floating):
        return dtype if dtype.itemsize >= 4 else jnp.dtype(jnp.float32)
    raise TypeError(f"rmsjax works on floating or complex leaves, got dtype {dtype}")


def common_compute_dtype(first: Any, second: Any) -> jnp.dtype:
    """The compute dtype for arithmetic mixing leaves of two dtypes: the wider of the two.

    Complex wins over real; widths are compared explicitly, so this works under strict
    dtype promotion.
    """
    first, second = compute_dtype(first), compute_dtype(second)
    width = max(real_dtype(first).itemsize, real_dtype(second).itemsize)
    real = jnp.dtype(jnp.float64) if width == 8 else jnp.dtype(jnp.float32)
    if jnp.issubdtype(first, jnp.complexfloating) or jnp.issubdtype(second, jnp.complexfloating):
        return jnp.dtype(jnp.complex128) if width == 8 else jnp.dtype(jnp.complex64)
    return real


def real_dtype(dtype: Any) -> jnp.dtype:
    """The real dtype matching ``dtype`` (float32 for complex64, else ``dtype`` itself)."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return jnp.finfo(dtype).dtype
    return dtype


def _canonical(dtype: Any) -> jnp.dtype:
    """``dtype`` as jax has it: float64 is float32 (and complex128 complex64) without x64.

    So that NumPy float64 parameters with ``jax_enable_x64`` off get float32 state and
    updates, as ``optax`` gives them, with no warning about a truncated dtype.
    """
    return jnp.dtype(jax.dtypes.canonicalize_dtype(dtype))


def _cast(x: jax.Array, dtype: Any) -> jax.Array:
    """``x`` in ``dtype``; ``x`` itself when it already is (no work at trace time)."""
    dtype = _canonical(dtype)
    return x if x.dtype == dtype else x.astype(dtype)


def _as(value: Scalar, dtype: Any) -> jax.Array:
    """Casts a hyperparameter (number, array or tracer) explicitly to ``dtype``.

    A concrete number becomes a constant rounded once to ``dtype`` on the host. A complex
    hyperparameter (``optax.inject_hyperparams`` gives hyperparameters the parameters'
    dtype, so complex parameters make them complex) keeps its real part when ``dtype`` is
    real.
    """
    if check.is_concrete(value):
        # A jax scalar (never a NumPy one: NumPy would do the arithmetic itself when the
        # other operand is a NumPy array, e.g. a state just restored from a checkpoint).
        return jnp.asarray(np.asarray(value, dtype=dtype))  # pyright: ignore[reportReturnType]
    value = jnp.asarray(value)
    if jnp.iscomplexobj(value) and not jnp.issubdtype(jnp.dtype(dtype), jnp.complexfloating):
        value = jnp.real(value)
    return _cast(value, dtype)


def _complement(value: Scalar) -> Scalar:
    """``1 - value``, once per call: on the host in float64 for a concrete number."""
    if check.is_concrete(value):
        return 1.0 - float(value)
    value = jnp.asarray(value)
    return jnp.ones_like(value) - value


_FLOAT32_TINY = float(np.finfo(np.float32).tiny)


def _is_positive(value: Scalar) -> bool:
    """Whether ``value`` is a static number known to stay > 0 in every compute dtype.

    That is: at least float32's smallest normal number (1.2e-38). A smaller positive
    ``eps`` (1e-45, 1e-50) is 0 or denormal in float32, and XLA:CPU flushes denormals to
    zero, so the 0/0 guard must stay. An array is never known to be positive.
    """
    return check.is_concrete(value) and float(value) >= _FLOAT32_TINY


class _PerDtype:
    """A scalar computed on first use for each real dtype of the leaves, then reused."""

    def __init__(self, compute: Any):
        self._compute, self._cache = compute, {}

    def __call__(self, dtype: Any) -> jax.Array:
        dtype = jnp.dtype(dtype)
        if dtype not in self._cache:
            self._cache[dtype] = self._compute(dtype)
        return self._cache[dtype]


def _scalar(value: Scalar) -> _PerDtype:
    """``value`` cast by :func:`_as` to each dtype the leaves ask for, once per dtype per call.

    Making the constant (or casting a traced hyperparameter) once per call rather than once
    per leaf keeps tracing time per leaf at the arithmetic itself.
    """
    return _PerDtype(lambda dtype: _as(value, dtype))


def _widest_float() -> jnp.dtype:
    """float64 when ``jax_enable_x64`` is on, else float32."""
    return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


def _correction_factor(decay: Scalar, count: jax.Array, exact: bool = False) -> _PerDtype:
    """The bias-correction factor ``1 - decay**count``, computed once per call.

    By default it is computed as optax computes it: the literal formula in the widest
    float JAX has on (float64 with ``jax_enable_x64``; float32 otherwise, where
    ``1 - f32(decay)**count`` loses digits to cancellation, 1.3e-5 relative at
    ``decay = 0.999, count = 1``), then rounded once to each real dtype of the leaves.
    With ``exact`` (PyTorch's double-precision factor, for :mod:`rmsjax.compat.torch`) a
    concrete ``decay`` gives ``-expm1(count * log(decay))`` with ``log(decay)`` taken on the
    host in float64: within about one ulp of the correctly rounded factor in every dtype.
    A concrete ``decay`` below 1 that rounds to 1 in that widest float (``1 - 1e-9`` in
    float32) takes the exact form too: the literal one would give a factor of 0, and the
    corrected moment would be infinite. A traced ``decay`` always uses the literal formula,
    in its own dtype.
    """
    if check.is_concrete(decay) and float(decay) == 0.0:
        return _PerDtype(lambda dtype: jnp.ones((), dtype))
    rounds_to_one = check.is_concrete(decay) and float(np.asarray(decay, _widest_float())) == 1.0
    if check.is_concrete(decay) and (exact or rounds_to_one):
        log_decay = float(np.log(float(decay)))
        return _PerDtype(lambda dtype: -jnp.expm1(_cast(count, dtype) * _as(log_decay, dtype)))
    if check.is_concrete(decay):
        wide = _widest_float()
    else:
        wide = common_compute_dtype(real_dtype(jnp.asarray(decay).dtype), jnp.float32)
    rate = _as(decay, wide)
    factor = jnp.ones_like(rate) - rate ** _cast(count, wide)
    return _PerDtype(lambda dtype: _cast(factor, dtype))


def squared_magnitude(x: jax.Array) -> jax.Array:
    """``|x|**2`` in the compute dtype: ``x*x`` for reals, ``re**2 + im**2`` for complex."""
    x = _cast(x, compute_dtype(x.dtype))
    if jnp.iscomplexobj(x):
        return jnp.square(x.real) + jnp.square(x.imag)
    return jnp.square(x)


def _check_inputs(who: str, state: PyTree, x: PyTree, what: str, order: int | None = None) -> None:
    """What a layer-1 update checks, at trace time only: ``order`` is 1 or 2, and ``x`` has
    the structure and leaf shapes of ``state`` (a smaller ``x`` would broadcast silently).
    Hyperparameter values are checked by the factories of :mod:`rmsjax.transforms` and
    above, once, not here at every update."""
    if order is not None and (isinstance(order, bool) or order not in (1, 2)):
        raise ValueError(f"{who}: order must be 1 or 2, got {order!r}")
    check.check_trees_match(x, state, what=what, who=who)


def _moment(x: jax.Array, order: int) -> jax.Array:
    """``x`` (order 1) or ``|x|**2`` (order 2), in the compute dtype."""
    return squared_magnitude(x) if order == 2 else _cast(x, compute_dtype(x.dtype))


def full_like(tree: PyTree, value: Scalar = 0.0, dtype: Any = None, *, real: bool = False) -> PyTree:
    """A tree shaped like ``tree`` filled with ``value``.

    Each new leaf lives where the matching leaf of ``tree`` lives (same devices, same
    sharding), whatever its dtype: eagerly, ``jnp.full_like`` keeps a committed array's
    sharding; under a trace (``jax.jit``) the sharding of an input is not known yet, so the
    new leaf is computed from its source (see ``_tie_sharding``) and the compiler's sharding
    propagation gives it the source's sharding (a plain constant would land on one device).

    Args:
      tree: the tree whose structure and shapes are copied.
      value: the fill value.
      dtype: the leaves' dtype; ``None`` keeps each leaf's own dtype. Unless ``real``, a
        complex leaf gets the complex dtype that holds ``dtype`` (complex64 for float32 and
        the 16-bit floats, complex128 for float64): a moment of complex values keeps its
        imaginary part whatever its storage precision.
      real: if true, complex leaves get a real dtype (the dtype of a second moment
        ``|g|**2``): ``dtype``, or the leaf's real dtype when ``dtype`` is ``None``.

    """

    def fill(path, leaf):
        _check_leaf(path, leaf)
        leaf_dtype = dtype
        if leaf_dtype is None:
            leaf_dtype = real_dtype(leaf.dtype) if real else leaf.dtype
        elif not real and jnp.iscomplexobj(leaf) and not jnp.issubdtype(leaf_dtype, jnp.complexfloating):
            leaf_dtype = jnp.complex128 if jnp.dtype(leaf_dtype).itemsize >= 8 else jnp.complex64
        leaf_dtype = _canonical(leaf_dtype)
        out = jnp.full_like(leaf, _as(value, leaf_dtype), dtype=leaf_dtype)
        if isinstance(leaf, jax.core.Tracer):
            out = _tie_sharding(leaf, out)
        return out

    return jax.tree_util.tree_map_with_path(fill, tree)


def _check_leaf(path: Any, leaf: Any) -> None:
    """A parameter leaf must be a floating or complex array; the error names its path."""
    key = jax.tree_util.keystr(path)
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not hasattr(leaf, "shape"):
        raise TypeError(
            f"params{key} is {leaf!r} of type {type(leaf).__name__}; rmsjax needs an array at "
            "every leaf of the parameters (wrap numbers in jnp.asarray, with a floating dtype)"
        )
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.complexfloating)):
        raise TypeError(
            f"params{key} has dtype {dtype}; rmsjax works on floating or complex leaves (mask "
            "other leaves out, e.g. with optax.masked or nnx.Optimizer(..., wrt=nnx.Param))"
        )


def _tie_sharding(source: jax.Array, out: jax.Array) -> jax.Array:
    """``out`` (a traced constant) given the sharding ``source`` will have when compiled.

    A select that never picks ``source`` but reads it, so that the compiler's sharding
    propagation gives ``out`` the sharding of ``source``, leaf by leaf (checked on jax 0.10
    and 0.11, Auto and Explicit mesh axes); the value is ``out``'s, bit for bit.
    ``jax.experimental.shard_alike`` is not used: besides being gone from jax 0.11, in jax
    0.10 its lowering is cached by shape, so leaves of one shape shared one sharding group
    and two same-shaped parameters sharded differently were forced (with their states) onto
    one sharding.
    """
    part = jnp.real(source) if jnp.iscomplexobj(source) and not jnp.iscomplexobj(out) else source
    never = jnp.isnan(part) & jnp.zeros((), bool)
    return jnp.where(never, _cast(part, out.dtype), out)


def replicated_like(x: jax.Array, tree: PyTree) -> jax.Array:
    """The scalar ``x`` replicated over the mesh of the first leaf of ``tree`` that has one.

    Used for step counters, so that a state initialised eagerly next to sharded parameters
    keeps its scalars on the same devices. Under a trace ``x`` is returned as is (the
    compiler replicates scalars over the computation's devices), as it is when no leaf of
    ``tree`` is a concrete array with a ``NamedSharding``.
    """
    if isinstance(x, jax.core.Tracer):
        return x
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(leaf, jax.Array) and isinstance(sharding, NamedSharding):
            # From a host value, so that this also works when the mesh spans several hosts.
            return jax.device_put(np.asarray(x), NamedSharding(sharding.mesh, PartitionSpec()))
    return x


def increment_count(count: jax.Array) -> jax.Array:
    """``count + 1`` for an int32 step counter, saturating at the int32 maximum.

    >>> import jax.numpy as jnp
    >>> int(increment_count(jnp.asarray(jnp.iinfo(jnp.int32).max, jnp.int32)))
    2147483647
    """
    return jnp.where(count < _INT32_MAX, count + jnp.ones_like(count), count)


def _saturate(second_moment: jax.Array, dtype: Any) -> jax.Array:
    """Stores a second moment in ``dtype``; saturating where ``dtype`` is the narrower one.

    The one overflow policy of rmsjax. When the state dtype is narrower than the compute
    dtype (a float16 or bfloat16 state, where ``|g| > 256`` already overflows float16's
    square) the stored average stops at the dtype's largest finite value instead of
    ``inf``, so the step stays finite and the average can decay again; finite values are
    unchanged bit for bit and NaN still propagates (``jnp.minimum`` keeps NaN). A state in
    the compute dtype itself (float32, float64) is stored as computed, as optax and PyTorch
    do: only ``|g|`` above about 1.8e19 (float32) overflows it, the average is then ``inf``
    and that element's step ``g / inf`` is 0.
    """
    if jnp.dtype(dtype).itemsize >= jnp.dtype(second_moment.dtype).itemsize:
        return _cast(second_moment, dtype)
    largest = jnp.asarray(np.asarray(jnp.finfo(dtype).max, dtype=second_moment.dtype))
    return _cast(jnp.minimum(second_moment, largest), dtype)


def update_leaky_average(average: PyTree, x: PyTree, decay: Scalar, *, order: int = 1) -> PyTree:
    """The leaky (exponential moving) average ``s <- decay*s + (1-decay)*x**order``.

    For ``order=2`` and complex ``x``, ``x**2`` means ``|x|**2``, and the new average is
    stored with :func:`_saturate`. ``1 - decay`` is computed once per call (on the host,
    for a number).

    >>> import jax.numpy as jnp
    >>> update_leaky_average(jnp.zeros(2), jnp.array([1.0, 2.0]), 0.9, order=2).round(4)
    Array([0.1, 0.4], dtype=float32)
    """
    _check_inputs("update_leaky_average", average, x, "average", order)
    leaky = _leaky(decay)

    def leaf(s, g):
        return leaky(s, _moment(g, order), saturate=order == 2)

    return jax.tree.map(leaf, average, x)


def _leaky(decay: Scalar) -> Callable[..., jax.Array]:
    """``(s, value) -> decay*s + (1-decay)*value`` in ``s``'s dtype (the one leaky-average
    formula), saturating with :func:`_saturate` when ``value`` is a second moment."""
    keep_as, take_as = _scalar(decay), _scalar(_complement(decay))

    def step(s: jax.Array, value: jax.Array, *, saturate: bool) -> jax.Array:
        dtype = common_compute_dtype(s.dtype, real_dtype(value.dtype))
        new = take_as(dtype) * _cast(value, dtype) + keep_as(dtype) * _cast(s, dtype)
        return _saturate(new, s.dtype) if saturate else _cast(new, s.dtype)

    return step


def update_running_sum(total: PyTree, x: PyTree, *, order: int = 1) -> PyTree:
    """The running sum ``s <- s + x**order`` (AdaGrad's accumulator for ``order=2``).

    >>> import jax.numpy as jnp
    >>> update_running_sum(jnp.ones(2), jnp.array([1.0, 2.0]), order=2)
    Array([2., 5.], dtype=float32)
    """
    _check_inputs("update_running_sum", total, x, "total", order)

    def leaf(s, g):
        value = _moment(g, order)
        dtype = common_compute_dtype(s.dtype, real_dtype(value.dtype))
        new = _cast(s, dtype) + _cast(value, dtype)
        return _saturate(new, s.dtype) if order == 2 else _cast(new, s.dtype)

    return jax.tree.map(leaf, total, x)


def update_momentum_buffer(
    buffer: PyTree, x: PyTree, decay: Scalar, dampening: Scalar, count: jax.Array | None
) -> PyTree:
    """The heavy-ball buffer ``b <- decay*b + (1-dampening)*x``; ``b = x`` on the first step.

    ``count`` is the number of updates made *before* this one; when it is zero the buffer
    takes ``x`` undampened (PyTorch's convention). With no ``dampening`` (``None``) or a
    static 0 that is what ``decay*0 + x`` gives anyway, so the buffer is the plain
    ``decay*b + x`` and ``count`` is not read (it may be ``None``).
    """
    _check_inputs("update_momentum_buffer", buffer, x, "buffer")
    decay_as = _scalar(decay)
    if dampening is None or check.is_concrete_zero(dampening):

        def plain(b, g):
            dtype = common_compute_dtype(b.dtype, g.dtype)
            g = _cast(g, dtype)
            return _cast(decay_as(dtype) * _cast(b, dtype) + g, b.dtype)

        return jax.tree.map(plain, buffer, x)
    if count is None:
        raise ValueError("update_momentum_buffer: a dampening that may be nonzero needs the count")
    keep = _complement(dampening)
    keep_as = _scalar(keep)
    first = count == 0

    def dampened(b, g):
        dtype = common_compute_dtype(b.dtype, g.dtype)
        g = _cast(g, dtype)
        new = decay_as(dtype) * _cast(b, dtype) + keep_as(dtype) * g
        return _cast(jnp.where(first, g, new), b.dtype)

    return jax.tree.map(dampened, buffer, x)


def bias_correction(average: PyTree, decay: Scalar, count: jax.Array, *, exact: bool = False) -> PyTree:
    """Adam's bias correction ``s_hat = s / (1 - decay**count)``.

    The factor ``1 - decay**count`` is computed once per call (as optax does, or to about
    one ulp with ``exact``, as PyTorch does; see :func:`_correction_factor`), and each leaf
    is divided in its compute dtype and cast back. With a concrete ``decay = 0`` the factor
    is 1 and the average is returned as it is.

    >>> import jax.numpy as jnp
    >>> bias_correction(jnp.array([0.1]), 0.9, jnp.asarray(1, jnp.int32))
    Array([1.], dtype=float32)
    """
    if check.is_concrete_zero(decay):
        return average
    factor = _correction_factor(decay, count, exact)

    def leaf(s):
        dtype = compute_dtype(s.dtype)
        return _cast(_cast(s, dtype) / _cast(factor(real_dtype(dtype)), dtype), s.dtype)

    return jax.tree.map(leaf, average)


def multiply_by_root_correction(x: PyTree, decay: Scalar, count: jax.Array, *, exact: bool = False) -> PyTree:
    """``x * sqrt(1 - decay**count)``: folds a second moment's bias correction into a step.

    Keras's "epsilon hat" Adam divides by the root of the *uncorrected* second moment and
    multiplies the step by this factor instead. The factor is computed once per call, as
    in :func:`bias_correction`.
    """
    correction = _correction_factor(decay, count, exact)
    root = _PerDtype(lambda dtype: jnp.sqrt(correction(dtype)))

    def leaf(a):
        dtype = compute_dtype(a.dtype)
        return _cast(_cast(a, dtype) * _cast(root(real_dtype(dtype)), dtype), a.dtype)

    return jax.tree.map(leaf, x)


def centered_variance(nu: PyTree, mu: PyTree) -> PyTree:
    """The centred second moment ``max(nu - |mu|**2, 0)``, in ``nu``'s compute dtype.

    ``nu`` is the leaky average of ``g**2`` and ``mu`` that of ``g``; rounding can push
    their difference a hair below zero, which is clamped so the root stays real.
    """

    def leaf(v, m):
        dtype = compute_dtype(v.dtype)
        variance = _cast(v, dtype) - _cast(squared_magnitude(m), dtype)
        return jnp.maximum(variance, jnp.zeros((), dtype))

    return jax.tree.map(leaf, nu, mu)


def _divide_or_zero(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """``numerator / denominator``, and 0 where the (real, >= 0) denominator is 0 or denormal.

    The denominators here are roots of second moments plus ``eps``; they are 0 only when
    ``eps = 0`` and the gradient is 0 (or so small that its square underflows), where the
    step is taken to be 0 rather than ``0/0 = NaN``. Every other quotient is the plain
    division, bit for bit, and a NaN denominator still gives NaN.
    """
    # "Exactly 0" includes a denormal denominator (only an eps below float32's smallest
    # normal number makes one): XLA:CPU flushes it to 0, a GPU division may too.
    zero = denominator < jnp.asarray(np.finfo(denominator.dtype).tiny, denominator.dtype)
    safe = jnp.where(zero, jnp.ones((), denominator.dtype), denominator)
    quotient = numerator / _cast(safe, numerator.dtype)
    return jnp.where(zero, jnp.zeros((), quotient.dtype), quotient)


def divide_by_root(x: PyTree, v: PyTree, *, eps: Scalar, eps_root: Scalar = 0.0) -> PyTree:
    """The adaptive step ``x / (sqrt(v + eps_root) + eps)``, in ``x``'s dtype.

    ``eps`` outside the root is PyTorch's form; ``eps_root`` inside it is Keras's, TF1's
    and the d2l book's (pass ``eps=0`` then). A term whose hyperparameter is a concrete 0
    is not emitted, and the 0/0 rule of :func:`_divide_or_zero` only where the denominator
    can be 0 (neither ``eps`` nor ``eps_root`` known to be positive).

    >>> import jax.numpy as jnp
    >>> divide_by_root(jnp.array([2.0]), jnp.array([4.0]), eps=0.0)
    Array([1.], dtype=float32)
    """
    add_inside, add_outside = not check.is_concrete_zero(eps_root), not check.is_concrete_zero(eps)
    guarded = not (_is_positive(eps) or _is_positive(eps_root))
    eps_as, eps_root_as = _scalar(eps), _scalar(eps_root)

    def leaf(g, s):
        dtype = compute_dtype(g.dtype)
        rdtype = real_dtype(dtype)
        s = _cast(s, rdtype)
        denominator = jnp.sqrt(s + eps_root_as(rdtype) if add_inside else s)
        if add_outside:
            denominator = denominator + eps_as(rdtype)
        if guarded:
            return _cast(_divide_or_zero(_cast(g, dtype), denominator), g.dtype)
        return _cast(_cast(g, dtype) / _cast(denominator, dtype), g.dtype)

    return jax.tree.map(leaf, x, v)


def multiply_by_root_ratio(x: PyTree, top: PyTree, bottom: PyTree, *, eps: Scalar) -> PyTree:
    """AdaDelta's step ``x * sqrt(top + eps) / sqrt(bottom + eps)``, in ``x``'s dtype.

    The 0/0 rule of :func:`_divide_or_zero` is emitted only when ``eps`` is not known to
    be positive.
    """
    guarded = not _is_positive(eps)
    eps_as = _scalar(eps)

    def leaf(g, a, b):
        dtype = compute_dtype(g.dtype)
        rdtype = real_dtype(dtype)
        e = eps_as(rdtype)
        top_root, bottom_root = jnp.sqrt(_cast(a, rdtype) + e), jnp.sqrt(_cast(b, rdtype) + e)
        ratio = _divide_or_zero(top_root, bottom_root) if guarded else top_root / bottom_root
        return _cast(_cast(g, dtype) * _cast(ratio, dtype), g.dtype)

    return jax.tree.map(leaf, x, top, bottom)


def update_step_average(
    average: PyTree, x: PyTree, top: PyTree, bottom: PyTree, decay: Scalar, *, eps: Scalar
) -> PyTree:
    """AdaDelta's leaky average of squared steps, ``s <- decay*s + (1-decay)*|u|**2`` for
    the step ``u = x * sqrt(top + eps) / sqrt(bottom + eps)`` of :func:`multiply_by_root_ratio`.

    For ``x`` in its own compute dtype (float32, float64) and an ``eps`` known to be
    positive, ``|u|**2`` is formed without the roots, as ``(x / (bottom + eps)) * x * (top +
    eps)``: the square of the step up to rounding (a few ulps), 0 where ``x**2`` overflows a
    float32 or float64 ``bottom`` (it is then ``inf``), as the step is. Its one expensive
    operation is then a division that a compiler can repeat in each loop that reads the new
    average, where the square of the step shares two square roots with the parameter update,
    which XLA:CPU writes out instead (AdaDelta's donated float32 step: 24 -> 16 bytes per
    parameter at its peak, compiled in place; under ``rmsjax.quantized`` at 4 bits, 17.1 ->
    9.2). Otherwise (complex or 16-bit ``x``, whose step is rounded to ``x``'s dtype before it
    is squared; ``eps`` traced or 0) it is the square of that step, whose 0/0 rule it then
    shares.
    """
    leaky = _leaky(decay)
    guarded = not _is_positive(eps)
    eps_as = _scalar(eps)

    def leaf(s, g, a, b):
        if guarded or jnp.iscomplexobj(g) or compute_dtype(g.dtype) != g.dtype:
            (step,) = jax.tree.leaves(multiply_by_root_ratio(g, a, b, eps=eps))
            return leaky(s, squared_magnitude(step), saturate=True)
        dtype = compute_dtype(g.dtype)
        e = eps_as(dtype)
        g = _cast(g, dtype)
        square = (g / (_cast(b, dtype) + e)) * g * (_cast(a, dtype) + e)
        return leaky(s, square, saturate=True)

    return jax.tree.map(leaf, average, x, top, bottom)


def add_scaled(x: PyTree, y: PyTree, factor: Scalar) -> PyTree:
    """``x + factor*y`` in ``x``'s dtype (L2 weight decay, Nesterov's look-ahead).

    >>> import jax.numpy as jnp
    >>> add_scaled(jnp.array([1.0]), jnp.array([2.0]), 0.5)
    Array([2.], dtype=float32)
    """
    factor_as = _scalar(factor)

    def leaf(a, b):
        dtype = common_compute_dtype(a.dtype, b.dtype)
        total = _cast(a, dtype) + factor_as(dtype) * _cast(b, dtype)
        return _cast(total, a.dtype)

    return jax.tree.map(leaf, x, y)


def scale(x: PyTree, factor: Scalar) -> PyTree:
    """``factor*x`` in ``x``'s dtype (the learning-rate step).

    >>> import jax.numpy as jnp
    >>> scale(jnp.array([2.0], jnp.bfloat16), -0.5)
    Array([-1], dtype=bfloat16)
    """
    factor_as = _scalar(factor)

    def leaf(a):
        dtype = compute_dtype(a.dtype)
        return _cast(factor_as(dtype) * _cast(a, dtype), a.dtype)

    return jax.tree.map(leaf, x)


def cast_like(tree: PyTree, reference: PyTree) -> PyTree:
    """Casts each leaf of ``tree`` to the dtype of the matching leaf of ``reference``."""
    return jax.tree.map(lambda a, r: _cast(a, r.dtype), tree, reference)
