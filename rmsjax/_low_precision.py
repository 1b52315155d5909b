r"""Low-precision parameters: bfloat16 or float16 weights whose small updates are not lost.

A bfloat16 number keeps 8 significant bits, so ``p + u`` rounded to nearest drops every update
smaller than half a unit in the last place (ulp) of ``p``, about 0.4 % of ``|p|``: with Adam's
steps of ``1e-3`` on weights of order ``0.1`` nearly every update vanishes and training stalls.
:func:`low_precision` wraps an optimizer so that ``optax.apply_updates(params, updates)`` lands
on a value whose *expected* value is the exact ``params + update``:

* ``compensated=False``: unbiased stochastic rounding of ``p + u`` into the parameter's dtype,
  the random number coming from a counter-based hash of (step, leaf, element index), the same
  hash as the low-bit state of :func:`rmsjax.quantized`;
* ``compensated=True``: ``p + c + u`` rounded to nearest, where ``c`` is the rounding error of
  the previous step, kept in the state as one ``int8`` per parameter in units of
  ``ulp(p) / 254`` (itself rounded stochastically). Parameter plus record is a 16-bit
  significand: bfloat16 weights of 2 bytes plus 1 byte of state behave like 24-bit masters.

The returned update is ``t - p`` in the parameter's dtype, where ``t`` is the rounded target;
the difference of two nearby floating-point numbers of one format is exact in that format
(Sterbenz's lemma: whenever ``t / 2 <= p <= 2 t``), so optax's ``p + u`` gives back ``t`` bit
for bit. Only an update that takes a parameter to less than half or more than twice its
magnitude (or across zero) can miss ``t``; it then lands within one ulp *of the update* of it,
as in plain low-precision arithmetic (bfloat16 ``4 + 1028`` lands on 1024, not 1032). With
``compensated=True`` that miss is carried forward only as far as the record reaches: up to
127 units (half an ulp of the value landed on), and not at all when it lands on 0 (whose ulp
is flushed to zero); the rest is lost, as without the record.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from rmsjax import _validation, averages
from rmsjax._codec import uniform as _uniform  # the counter-based hash of the low-bit state

__all__ = ["LowPrecisionState", "low_precision"]

LOW_PRECISION_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
"""Parameter dtypes whose updates are rounded; any other floating dtype passes through."""

ERROR_LEVELS = 254
"""The int8 error record counts in units of ``ulp(p) / ERROR_LEVELS`` (codes in [-127, 127])."""

# Salts that keep these random streams apart from each other and from rmsjax.quantized's
# (which numbers its state leaves 0, 1, 2, ...).
_SALT_ROUND = 0x3C6EF372
_SALT_ERROR = 0x1B873593


class LowPrecisionState(NamedTuple):
    """State of :func:`low_precision`.

    Attributes:
      count: int32 number of updates made (it seeds the rounding); saturates.
      inner: the wrapped transformation's state.
      error: ``None`` without compensation; with it, a tree shaped like the parameters holding,
        for each 16-bit floating parameter, an ``int8`` array of its rounding error in units of
        ``ulp(p) / 254``, and ``None`` for every other parameter.
    """

    count: jax.Array
    inner: Any
    error: Any


_is_variable = _validation.is_flax_variable


def _value(x: Any) -> Any:
    if not _is_variable(x):
        return x
    return x.get_value() if hasattr(type(x), "get_value") else x.value


def _is_low(dtype: Any) -> bool:
    return jnp.dtype(dtype) in LOW_PRECISION_DTYPES


def _check_params(params: Any) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(params, is_leaf=_is_variable):
        leaf = _value(leaf)
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
            raise ValueError(
                f"low_precision: params{jax.tree_util.keystr(path)} has dtype {dtype}, not a floating "
                "dtype; only floating parameters can be trained (keep integer leaves out of the "
                "optimized tree, e.g. with optax.masked or nnx.Optimizer(wrt=nnx.Param))"
            )


def _widen(tree: Any) -> Any:
    """16-bit floating leaves cast to float32 (the wrapped optimizer works and keeps its state
    in float32); every other leaf as it is."""

    def widen(x: Any) -> Any:
        value = _value(x)
        if value is None or not hasattr(value, "dtype") or not _is_low(value.dtype):
            return x
        return jnp.asarray(value).astype(jnp.float32)

    return jax.tree_util.tree_map(widen, tree, is_leaf=_is_variable)


def _ulp(t: jax.Array) -> jax.Array:
    """float32 spacing of ``t``'s dtype just above ``|t|`` (0 where that is not finite)."""
    a = jnp.abs(t)
    up = jnp.nextafter(a, jnp.full_like(a, jnp.inf)).astype(jnp.float32) - a.astype(jnp.float32)
    return jnp.where(jnp.isfinite(up), up, jnp.zeros_like(up))


def _nearest(s: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """``(s', n)``: ``s`` (float32) with finite values beyond ``dtype``'s largest finite one
    saturated to it, on both sides, and ``n``, the value of ``dtype`` nearest to ``s'``, in
    float32 (exactly representable in ``dtype``).

    ``n`` comes from an op that XLA keeps: with excess precision allowed (XLA:GPU's default)
    a round trip ``s -> dtype -> float32`` is simplified away. Saturating first keeps a value
    just beyond the largest from rounding to ``inf`` (and, below ``-max``, ``inf / inf`` from
    making the stochastic rounding pick ``-inf``)."""
    info = jnp.finfo(dtype)
    big = jnp.float32(float(info.max))
    s = jnp.where(jnp.isfinite(s), jnp.clip(s, -big, big), s)
    nf = lax.reduce_precision(s, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    quantum = float(info.smallest_subnormal)
    if quantum >= float(np.finfo(np.float32).tiny):  # float16: its subnormals, by hand
        subnormal = jnp.round(s / jnp.float32(quantum)) * jnp.float32(quantum)  # exact: a power of 2
        nf = jnp.where(jnp.abs(s) < jnp.float32(float(info.tiny)), subnormal, nf)
    return s, nf


def _round_stochastic(s: jax.Array, dtype: Any, r: jax.Array) -> jax.Array:
    """``s`` (float32) rounded into ``dtype``: up with probability (s - lo) / (hi - lo).

    ``lo`` and ``hi`` are the neighbours of ``s`` in ``dtype``; ``s - lo`` and ``hi - lo`` are
    exact in float32 and their ratio has at most 16 significant bits, so comparing it with a
    24-bit uniform ``r`` makes the rounding exactly unbiased. A finite ``s`` beyond the
    largest finite number (on either side) saturates to it; an infinite one stays infinite and
    NaN stays NaN.
    """
    s, nf = _nearest(s, dtype)
    near = nf.astype(dtype)
    inf = jnp.full_like(near, jnp.inf)
    other = jnp.nextafter(near, jnp.where(nf > s, -inf, inf))
    of = other.astype(jnp.float32)
    lo, hi = jnp.minimum(nf, of), jnp.maximum(nf, of)
    frac = (s - lo) / (hi - lo)
    t = jnp.where(r < frac, jnp.maximum(near, other), jnp.minimum(near, other))
    return jnp.where(jnp.isnan(s), near, t)


def _increment(count: jax.Array) -> jax.Array:
    top = jnp.iinfo(jnp.int32).max
    return jnp.where(count < top, count + jnp.int32(1), count)


def low_precision(inner: optax.GradientTransformation, *, compensated: bool = False
                  ) -> optax.GradientTransformation:
    r"""Train bfloat16 or float16 parameters without losing the updates too small for them.

    For each parameter ``p`` of a 16-bit floating dtype, with ``u`` the update of ``inner``:

    .. math::

       t = \operatorname{SR}(p + u), \qquad \texttt{update} = t - p

    where :math:`\operatorname{SR}` rounds into ``p``'s dtype up or down with the probabilities
    that make :math:`\mathbb{E}[t] = p + u` (the uniform numbers come from a hash of the step
    count, the leaf and the element index: bit-identical on resume and under any sharding of a
    jitted step). ``optax.apply_updates(params, updates)`` (which computes ``p + update`` in
    ``p``'s dtype) then returns ``t`` exactly. With ``compensated=True``:

    .. math::

       s = p + c + u, \qquad t = \operatorname{RN}(s), \qquad
       c' = \operatorname{SR}_{\mathrm{ulp}(t)/254}(s - t)

    with :math:`c` kept in the state as ``int8`` codes (one byte per parameter, counting
    :math:`\mathrm{ulp}(p)/254`), so the parameter with its record carries about 16
    significant bits. float32 and float64 parameters receive ``inner``'s update unchanged.

    Must be the *last* transformation before ``optax.apply_updates`` (or ``nnx.Optimizer``):
    anything that rescales its updates afterwards breaks the exact landing. The wrapped
    optimizer works in float32: 16-bit parameters and their gradients are cast up before it
    sees them, so its state is float32 (wrap it in :func:`rmsjax.quantized` for 8-bit state
    with float32 block scales) and its update is rounded only once, into the parameter. A
    bfloat16 state would round every moment update to nearest too: Adam's ``nu`` with
    ``b2=0.999`` moves by 0.1 % a step, below half a bfloat16 ulp, and stalls.

    Args:
      inner: any rmsjax or ``rmsjax.compat`` optimizer, :func:`rmsjax.quantized` of one, or an
        optax chain of them.
      compensated: keep an ``int8`` record of each 16-bit parameter's rounding error and carry
        it into the next step (round to nearest plus error feedback) instead of rounding
        stochastically.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`LowPrecisionState`; its
      ``update`` requires ``params``.

    Raises:
      TypeError: if ``inner`` is not a gradient transformation or ``compensated`` not a bool.
      ValueError: (at ``init``) if a parameter has a non-floating dtype; (at ``update``) if
        ``params`` is not given.

    Example:
      >>> import jax.numpy as jnp, optax, rmsjax
      >>> tx = rmsjax.low_precision(rmsjax.sgd(1e-3))
      >>> params = {"w": jnp.ones(4096, jnp.bfloat16)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.ones(4096, jnp.bfloat16)}, state, params)
      >>> new = optax.apply_updates(params, updates)
      >>> float(jnp.mean(new["w"].astype(jnp.float32)))  # 1 - 1e-3 on average; nearest: 1.0
      0.999
    """
    _validation.check_transformation("inner", inner, "low_precision")
    if not isinstance(compensated, (bool, np.bool_)):
        raise TypeError(f"low_precision: compensated must be a bool, got {compensated!r}")
    compensated = bool(compensated)

    def init_fn(params: Any) -> LowPrecisionState:
        _check_params(params)
        error = None
        if compensated:
            error = jax.tree_util.tree_map(
                # made from the parameter, so that it is placed (sharded) like it
                lambda p: averages.full_like(_value(p), 0, jnp.int8) if _is_low(_value(p).dtype) else None,
                params, is_leaf=_is_variable)
        inner_state = inner.init(_widen(params))
        values = jax.tree.map(_value, params, is_leaf=_is_variable)
        count = averages.replicated_like(jnp.zeros([], jnp.int32), values)
        return LowPrecisionState(count=count, inner=inner_state, error=error)

    def update_fn(updates: Any, state: LowPrecisionState, params: Any = None, **extra_args: Any):
        if params is None:
            raise ValueError(
                "low_precision: update needs params (tx.update(grads, state, params)): the rounded "
                "update is computed from the parameter it will be added to"
            )
        _validation.check_state_type(state, LowPrecisionState, "low_precision")
        # Checked before the gradients are widened: a complex gradient cast to float32 would
        # lose its imaginary part, and a shape or tree mismatch would surface inside jax.
        values = jax.tree_util.tree_map(_value, params, is_leaf=_is_variable)
        _validation.check_trees_match(updates, values, what="params", who="low_precision", dtypes="kind")
        widened = _widen(params)

        def widen_grad(g: Any, p: Any) -> Any:
            if g is None or not _is_low(jnp.result_type(_value(p))):
                return g
            return jnp.asarray(g).astype(jnp.float32)

        grads = jax.tree_util.tree_map(widen_grad, updates, params, is_leaf=lambda x: x is None)
        updates, new_inner = inner.update(grads, state.inner, widened, **extra_args)
        count = state.count
        flat_p, treedef = jax.tree_util.tree_flatten(params, is_leaf=_is_variable)
        paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)[0]]
        flat_u = treedef.flatten_up_to(updates)
        flat_e = treedef.flatten_up_to(state.error) if compensated else [None] * len(flat_p)
        out_u, out_e = [], []
        for i, (p, u, e) in enumerate(zip(flat_p, flat_u, flat_e, strict=True)):
            p = _value(p)
            if u is None or p is None or not _is_low(p.dtype):
                out_u.append(u)
                out_e.append(None)
                continue
            dtype = p.dtype
            pf = p.astype(jnp.float32)
            s = pf + jnp.asarray(u).astype(jnp.float32)
            if not compensated:
                t = _round_stochastic(s, dtype, _uniform(p.shape, count, _SALT_ROUND + 2 * i))
                out_u.append((t.astype(jnp.float32) - pf).astype(dtype))
                out_e.append(None)
                continue
            if e is None:
                path = jax.tree_util.keystr(paths[i])
                raise ValueError(
                    f"low_precision: params{path} is {dtype} at update but had another dtype when the "
                    "state was made (no error record for it); call init with the parameters you train")
            s = s + jnp.asarray(e).astype(jnp.float32) * (_ulp(p) * jnp.float32(1.0 / ERROR_LEVELS))
            s, nearest = _nearest(s, dtype)  # saturated, as the stochastic rounding is
            step = (nearest - pf).astype(dtype)
            landed = jnp.asarray(p + step).astype(dtype)  # what optax.apply_updates will compute
            unit = _ulp(landed) * jnp.float32(1.0 / ERROR_LEVELS)
            ratio = jnp.where(unit > 0, (s - landed.astype(jnp.float32)) / jnp.where(unit > 0, unit, 1.0),
                              jnp.zeros_like(s))
            ratio = jnp.clip(ratio, -127.0, 127.0)
            r = _uniform(p.shape, count, _SALT_ERROR + 2 * i)
            low = jnp.floor(ratio)
            code = low + (r < ratio - low).astype(jnp.float32)
            code = jnp.where(jnp.isfinite(code), code, jnp.zeros_like(code))
            out_u.append(step)
            out_e.append(code.astype(jnp.int8))
        new_updates = treedef.unflatten(out_u)
        error = treedef.unflatten(out_e) if compensated else None
        return new_updates, LowPrecisionState(count=_increment(count), inner=new_inner, error=error)

    return optax.GradientTransformation(init_fn, update_fn)  # pyright: ignore[reportArgumentType]
