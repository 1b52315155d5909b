r"""Low-bit optimizer state: moments stored as 8- or 4-bit codes plus one scale per block.

:func:`quantized` wraps any transformation (an rmsjax optimizer, a layer-2 transformation, a
``rmsjax.compat`` optimizer, or an optax chain of them). Every *moment leaf* of the wrapped
state, i.e. a floating-point leaf with the shape of a parameter (or the parameter's shape plus a
trailing axis of 2, the real view of a complex parameter) and at least ``min_size`` elements,
is stored as

* ``codes``: one signed or unsigned integer code per element, 8 bits, or 4 bits with two codes
  packed in each byte;
* ``scale``: the absolute maximum of each block of ``block_size`` consecutive elements along the
  last axis, in the moment's own dtype.

Each update dequantizes, runs the wrapped update in float32 (or the moment's dtype if wider),
and quantizes the new moments again, all inside one jitted step.

The code maps (``Q`` levels on each side of zero, exponent ``p``; ``c`` is the integer code,
``s`` the block scale):

.. math::

   x = s\,\operatorname{sign}(c)\,\left(\frac{|c|}{Q}\right)^{p}

=========================  ===  ===  =================================  ======================
map                        Q    p    smallest non-zero level (of ``s``)  step near the maximum
=========================  ===  ===  =================================  ======================
8-bit signed (``mu``...)   127  4    3.8e-9                             3.1 %
8-bit unsigned (``nu``...) 255  4    2.4e-10                            1.6 %
4-bit signed               7    2    2.0e-2                             27 %
4-bit unsigned             15   4    2.0e-5                             24 %
=========================  ===  ===  =================================  ======================

Fields named ``nu``, ``nu_max`` or ``nu_delta`` (second moments, running sums of squares: never
negative) use the unsigned map; every other moment field (``mu``, momentum traces) the signed
one. In the unsigned map code 0 is kept for an exact zero: a positive second moment always
decodes to at least the smallest positive level, never to zero, so ``m / (sqrt(v) + eps)``
cannot turn into ``m / eps`` through rounding.

Block scales at 8 bits come from a bound, not from a pass over the new moment. Every moment
update of :mod:`rmsjax.averages` (leaky average, running sum, momentum buffer) reports itself to
an observer while the wrapped update runs; for ``new = keep * old + take * x**order`` with
``old`` a decoded stored moment, ``max|new| <= |keep| max|old| + |take| max|x|**order`` on every
block, where ``max|old|`` is read from the stored codes (the maps are monotone in ``|code|``)
and ``max|x|`` from the input (a max and a min reduction over the gradient). Both are
reductions over *inputs* of the step, so the decode-update-encode loop runs once: XLA:CPU does
not fuse a reduction with the arithmetic feeding it, and reducing the new moment exactly made
it compute the new moment once more. The bound re-anchors on the decoded maximum every step,
so it never drifts. Moments produced any other way, and all moments at 4 bits (where the
rounding of the largest element biases such a bound upward by up to a 27 % level step), are
reduced exactly.

Rounding is unbiased (stochastic): the value lands on one of its two neighbouring levels with
probabilities that make the expected decoded value equal to the exact one. The random number
comes from a counter-based hash of (leaf, element index, step), so the state is a pure function
of the gradients (bit-identical on resume, on any sharding) and costs a few integer operations
per element instead of a PRNG draw. Round-to-nearest would freeze an element whose per-step
change is below half a level step while its block maximum stays put (``b2=0.999`` moves an
average by 0.1 % a step); unbiased rounding lets it move on average at the right rate.
"""

from __future__ import annotations

import functools
import numbers
import sys
from typing import Any, NamedTuple

import jax
import jax.core  # jax deletes its own alias; named here so type checkers see jax.core
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from rmsjax import averages
from rmsjax.transforms import ScaleByStddevState

__all__ = [
    "PackedQuantizedArray",
    "QuantizedArray",
    "QuantizedState",
    "dequantize",
    "dequantize_state",
    "quantized",
]

UNSIGNED_FIELDS = frozenset({"nu", "nu_max", "nu_delta"})
"""State fields stored with the unsigned (non-negative) map; every other moment is signed."""

DEFAULT_BLOCK_SIZE = {8: 256, 4: 128}

# (bits, signed) -> (levels on each side of zero Q, exponent p)
CODE_MAPS = {
    (8, True): (127, 4),
    (8, False): (255, 4),
    (4, True): (7, 2),
    (4, False): (15, 4),
}

SCALE_SLACK = 4
"""A block's scale is a power of two; it stays put while the block's absmax is in (scale/4, scale]."""

# A block smaller than this fraction of block_size (when the row is longer than a block) would
# cost more in scales than it saves; such a leaf stays in full precision.
_MIN_BLOCK_FRACTION = 4


class QuantizedArray(NamedTuple):
    """A moment leaf stored in 8 bits: one code per element, one scale per block.

    Attributes:
      codes: ``int8`` (signed map) or ``uint8`` (unsigned map), of shape
        ``scale.shape + (block,)`` (or ``scale.shape + (block // 2, 2)`` for the real view
        ``(..., n, 2)`` of a complex parameter's moment).
      scale: the absolute maximum of each block, in the moment's dtype, of shape
        ``leaf.shape[:-1] + (n_blocks,)`` (``leaf.shape[:-2] + (n_blocks,)`` for a real view).
    """

    codes: jax.Array
    scale: jax.Array


class PackedQuantizedArray(NamedTuple):
    """A moment leaf stored in 4 bits: two codes per byte, one scale per block.

    Attributes:
      codes: ``int8`` (signed map) or ``uint8`` (unsigned map) bytes, each holding two 4-bit
        codes (element ``2k`` in the low nibble, ``2k + 1`` in the high one), of shape
        ``scale.shape + (block // 2,)`` (``scale.shape + (block // 2, 1)`` for a real view of a
        complex moment, whose real and imaginary parts share a byte).
      scale: as in :class:`QuantizedArray`.
    """

    codes: jax.Array
    scale: jax.Array


class QuantizedState(NamedTuple):
    """State of :func:`quantized`.

    Attributes:
      count: int32 number of updates made (it seeds the unbiased rounding); saturates.
      inner: the wrapped transformation's state, each moment leaf replaced by a
        :class:`QuantizedArray` or :class:`PackedQuantizedArray`.
    """

    count: jax.Array
    inner: Any


def _is_quantized(x: Any) -> bool:
    return isinstance(x, (QuantizedArray, PackedQuantizedArray))


# --------------------------------------------------------------------------- validation


def _check_int(name: str, value: Any, allowed: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be {allowed}, got {value!r} of type {type(value).__name__}")
    return int(value)


def _check_arguments(inner: Any, bits: Any, block_size: Any, min_size: Any) -> tuple[int, int, int]:
    if not (hasattr(inner, "init") and hasattr(inner, "update")):
        raise TypeError(
            f"inner must be an optax.GradientTransformation (with init and update), got {inner!r}"
        )
    if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, numbers.Integral) or bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    bits = int(bits)
    if block_size is None:
        block = DEFAULT_BLOCK_SIZE[bits]
    else:
        block = _check_int("block_size", block_size, "an even integer in [2, 65536] or None")
        if not (2 <= block <= 65536 and block % 2 == 0):
            raise ValueError(f"block_size must be an even integer in [2, 65536] or None, got {block}")
    minimum = _check_int("min_size", min_size, "an integer >= 0")
    if minimum < 0:
        raise ValueError(f"min_size must be an integer >= 0, got {minimum}")
    return bits, block, minimum


# --------------------------------------------------------------------------- layout


class _Layout(NamedTuple):
    """Static description of how one leaf is blocked (derived from the codes' shapes)."""

    lead: tuple[int, ...]  # leaf shape before the blocked axis
    n_blocks: int
    block: int  # elements of the leaf per block
    pairs: bool  # leaf is (..., n, 2): a block runs over n and holds both parts of each pair

    def leaf_shape(self) -> tuple[int, ...]:
        if self.pairs:
            return (*self.lead, self.n_blocks * self.block // 2, 2)
        return (*self.lead, self.n_blocks * self.block)

    def blocked_shape(self) -> tuple[int, ...]:
        if self.pairs:
            return (*self.lead, self.n_blocks, self.block // 2, 2)
        return (*self.lead, self.n_blocks, self.block)


def _layout_of(q: QuantizedArray | PackedQuantizedArray) -> _Layout:
    lead, n_blocks = tuple(q.scale.shape[:-1]), int(q.scale.shape[-1])
    extra = q.codes.shape[q.scale.ndim :]
    pairs = len(extra) == 2
    if isinstance(q, PackedQuantizedArray):
        block = 2 * int(extra[0])
    else:
        block = int(extra[0]) * (2 if pairs else 1)
    return _Layout(lead, n_blocks, block, pairs)


def _largest_divisor(n: int, limit: int, *, even: bool) -> int:
    for d in range(min(n, limit), 0, -1):
        if n % d == 0 and (d % 2 == 0 or not even):
            return d
    return 0


def _plan(path: tuple[Any, ...], leaf: Any, param_shapes: set[tuple[int, ...]], bits: int,
          block_size: int, min_size: int) -> _Layout | None:
    """The layout of a state leaf that is stored quantized, or None to keep it as it is."""
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        return None
    dtype = jnp.dtype(leaf.dtype)
    if not jnp.issubdtype(dtype, jnp.floating) or leaf.ndim == 0 or leaf.size < max(min_size, 1):
        return None
    shape = tuple(leaf.shape)
    if shape in param_shapes:
        pairs = False
    elif leaf.ndim >= 2 and shape[-1] == 2 and shape[:-1] in param_shapes:
        pairs = True
    else:
        return None
    axis = leaf.ndim - 2 if pairs else leaf.ndim - 1
    row = shape[axis]
    local = row
    if not isinstance(leaf, jax.core.Tracer):
        # Eager init: the state leaf already lives where its parameter lives. Blocks must stay
        # inside one shard, so they divide the per-shard length of the blocked axis.
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            try:
                shard = tuple(sharding.shard_shape(shape))
            except Exception:  # noqa: BLE001 - an exotic sharding: assume unsharded
                shard = shape
            if pairs and shard[-1] != 2:
                return None  # the pair axis itself is split: keep full precision
            local = shard[axis]
    if pairs:
        per_block = _largest_divisor(local, block_size // 2, even=False)
        block = 2 * per_block
        limit = block_size // 2
        unit = per_block
    else:
        unit = block = _largest_divisor(local, block_size, even=bits == 4)
        limit = block_size
    if unit == 0 or (unit < local and unit * _MIN_BLOCK_FRACTION < limit):
        return None
    lead = shape[:axis]
    return _Layout(lead, row // unit, block, pairs)


# --------------------------------------------------------------------------- hashing


def _u32(x: int) -> jax.Array:
    return jnp.uint32(x & 0xFFFFFFFF)


def _mix(x: jax.Array) -> jax.Array:
    """A 32-bit integer finalizer (xor-shift-multiply), a bijection with good avalanche."""
    x = x ^ (x >> _u32(16))
    x = x * _u32(0x7FEB352D)
    x = x ^ (x >> _u32(15))
    x = x * _u32(0x846CA68B)
    return x ^ (x >> _u32(16))


def _uniform(shape: tuple[int, ...], count: jax.Array, leaf_id: int, *, weyl: bool = True) -> jax.Array:
    """float32 numbers in [0, 1) for the rounding of one leaf at step ``count``.

    Each element gets a fixed random phase, a hash of (leaf, global element index); at step
    ``count`` its number is ``phase + count * (golden ratio)`` modulo 1 (a Weyl sequence, in
    32-bit fixed point). Over the elements of a leaf the numbers are uniform at every step, so
    rounding is unbiased; along the steps of one element they are spread evenly (low
    discrepancy), so the rounding errors of consecutive steps largely cancel instead of adding
    up like independent draws. ``weyl=False``: an independent hash per step instead.
    """
    index = lax.iota(jnp.uint32, int(np.prod(shape, dtype=np.int64))).reshape(shape)  # row-major
    step = jnp.asarray(count).astype(jnp.uint32)
    if weyl:
        bits = _mix((index * _u32(0xC2B2AE3D)) ^ _u32(leaf_id * 0x85EBCA77 + 0x27D4EB2F))
        bits = bits + step * _u32(0x9E3779B9)
    else:
        key = _mix(step * _u32(0x9E3779B9) + _u32(leaf_id * 0x85EBCA77 + 1))
        bits = _mix((index * _u32(0xC2B2AE3D)) ^ key)
    return (bits >> _u32(8)).astype(jnp.float32) * jnp.float32(2.0**-24)


# --------------------------------------------------------------------------- the maps


def _root(y: jax.Array, p: int) -> jax.Array:
    if p == 2:
        return jnp.sqrt(y)
    if p == 3:
        return jnp.cbrt(y)
    if p == 4:
        return jnp.sqrt(jnp.sqrt(y))
    raise AssertionError(p)


def _power(y: jax.Array, p: int) -> jax.Array:
    if p == 2:
        return y * y
    if p == 3:
        return y * y * y
    if p == 4:
        y2 = y * y
        return y2 * y2
    raise AssertionError(p)


def _code_dtype(signed: bool) -> Any:
    return jnp.int8 if signed else jnp.uint8


def _compute_dtype(dtype: Any) -> Any:
    """float32, or float64 for float64 moments (never narrower than float32)."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype).itemsize > 4 else jnp.dtype(jnp.float32)


def _encode(x: jax.Array, scale: jax.Array, u: jax.Array | None, bits: int, signed: bool) -> jax.Array:
    """Integer levels in [-Q, Q] (signed) or [0, Q] (unsigned), integer-valued in ``x.dtype``;
    ``u=None``: nearest."""
    levels, p = CODE_MAPS[(bits, signed)]
    ct = x.dtype
    q = jnp.asarray(levels, ct)
    # The scale is a power of two, so multiplying by its reciprocal (computed per block) is
    # exact and spares a division per element.
    inverse = jnp.where(scale > 0, jnp.asarray(1, ct) / jnp.where(scale > 0, scale, jnp.ones_like(scale)),
                        jnp.ones_like(scale))
    y = jnp.minimum(jnp.abs(x) * inverse, jnp.asarray(1, ct))
    t = q * _root(y, p)
    lo = jnp.clip(jnp.floor(t), jnp.asarray(0, ct), q - 1)
    inv_q = jnp.asarray(1 / levels, ct)  # as in _decode: a product, not a division
    f_lo = _power(lo * inv_q, p)
    f_hi = _power((lo + 1) * inv_q, p)
    if u is None:
        up = y + y >= f_lo + f_hi
    else:
        up = u.astype(ct) * (f_hi - f_lo) < y - f_lo
    # Levels stay in floating point (integer-valued) until the one conversion to the code
    # dtype: on XLA:CPU each float-to-integer conversion costs about as much as the map itself.
    level = lo + up.astype(ct)
    if signed:
        return jnp.where(x < 0, -level, level)
    # A positive value never decodes to zero; only an exact zero (or less) keeps code 0.
    return jnp.where(y > 0, jnp.maximum(level, jnp.asarray(1, ct)), jnp.zeros_like(level))


def _decode(level: jax.Array, scale: jax.Array, bits: int, signed: bool) -> jax.Array:
    levels, p = CODE_MAPS[(bits, signed)]
    ct = scale.dtype
    # A product with 1/Q (within an ulp of the quotient, exact at the top level Q).
    r = level.astype(ct) * jnp.asarray(1 / levels, ct)
    if p % 2 == 1 or not signed:
        value = _power(r, p)
    else:
        value = jnp.sign(r) * _power(r, p)
    return value * scale


# --------------------------------------------------------------------------- leaf codecs


def _signed(q: QuantizedArray | PackedQuantizedArray) -> bool:
    return jnp.dtype(q.codes.dtype) == jnp.dtype(jnp.int8)


def _levels_of(q: QuantizedArray | PackedQuantizedArray, layout: _Layout) -> jax.Array:
    """Integer levels (int32) in the blocked shape."""
    signed = _signed(q)
    if isinstance(q, QuantizedArray):
        return q.codes.reshape(layout.blocked_shape()).astype(jnp.int32)
    raw = lax.bitcast_convert_type(q.codes, jnp.uint8).astype(jnp.int32)
    low, high = raw & 15, raw >> 4
    if signed:
        low, high = low - 7, high - 7
    both = jnp.stack([low, high], axis=-1)
    return both.reshape(layout.blocked_shape())


def dequantize(q: QuantizedArray | PackedQuantizedArray) -> jax.Array:
    """Decode a quantized moment leaf to an array of its original shape and dtype.

    Args:
      q: a :class:`QuantizedArray` or :class:`PackedQuantizedArray`.

    Returns:
      The decoded moment, in the scale's dtype (the moment's own dtype).
    """
    layout = _layout_of(q)
    bits = 4 if isinstance(q, PackedQuantizedArray) else 8
    dtype = q.scale.dtype
    scale = q.scale.astype(_compute_dtype(dtype))
    scale = scale.reshape(scale.shape + (1,) * (2 if layout.pairs else 1))
    value = _decode(_levels_of(q, layout), scale, bits, _signed(q))
    return value.reshape(layout.leaf_shape()).astype(dtype)


_EXPONENT = {  # compute dtype -> (same-width unsigned int, mantissa bits, exponent mask, byte type)
    jnp.dtype(jnp.float32): (jnp.uint32, 23, 0xFF, jnp.uint8),
    jnp.dtype(jnp.float64): (jnp.uint64, 52, 0x7FF, jnp.uint16),
}


def _power_of_two_above(biased: jax.Array, utype: Any, mantissa: int, mask: int) -> jax.Array:
    """Bits of ``2**(e - bias + 1)`` for biased exponents ``e`` (0 where ``e == 0``)."""
    top = mask - 1  # largest finite biased exponent
    biased = jnp.minimum(biased.astype(utype), jnp.asarray(top - 1, utype))
    return jnp.where(biased > 0, (biased + jnp.asarray(1, utype)) << jnp.asarray(mantissa, utype),
                     jnp.zeros_like(biased))


def _keep_old(fresh: jax.Array, old: jax.Array | None, utype: Any, mantissa: int,
              dtype: Any) -> jax.Array:
    if old is not None:
        old_raw = lax.bitcast_convert_type(old.astype(dtype), utype)
        slack = jnp.asarray(SCALE_SLACK.bit_length() - 1, utype) << jnp.asarray(mantissa, utype)
        keep = (fresh <= old_raw) & (fresh + slack > old_raw)
        fresh = jnp.where(keep, old_raw, fresh)
    return lax.bitcast_convert_type(fresh, dtype)


def _block_scale(x: jax.Array, axes: tuple[int, ...], old: jax.Array | None) -> jax.Array:
    """Each block's scale: the power of two just above its largest magnitude.

    The scale changes only when that power of two leaves ``(old / SCALE_SLACK, old]``, so
    that the level grid stays put from step to step. Only the biased exponents are reduced
    (one byte per element): XLA:CPU writes the operand of a reduction out in full, and one
    byte costs a quarter of the float32 values themselves.
    """
    utype, mantissa, mask, etype = _EXPONENT[jnp.dtype(x.dtype)]
    raw = lax.bitcast_convert_type(x, utype)
    exponent = ((raw >> jnp.asarray(mantissa, utype)) & jnp.asarray(mask, utype)).astype(etype)
    fresh = _power_of_two_above(jnp.max(exponent, axis=axes), utype, mantissa, mask)
    return _keep_old(fresh, old, utype, mantissa, x.dtype)


def _bound_scale(bound: jax.Array, old: jax.Array | None) -> jax.Array:
    """:func:`_block_scale` from an upper bound on each block's largest magnitude."""
    utype, mantissa, mask, _ = _EXPONENT[jnp.dtype(bound.dtype)]
    raw = lax.bitcast_convert_type(jnp.abs(bound), utype)
    biased = (raw >> jnp.asarray(mantissa, utype)) & jnp.asarray(mask, utype)
    return _keep_old(_power_of_two_above(biased, utype, mantissa, mask), old, utype, mantissa,
                     bound.dtype)


def _block_absmax(x: jax.Array, layout: _Layout, ct: Any) -> jax.Array:
    """Largest magnitude of each block of ``x`` (leaf shape), in ``ct``, shaped like the scales.

    Reduced as a maximum and a minimum straight from ``x``, so that no ``|x|`` is written out."""
    blocked = x.reshape(layout.blocked_shape())
    axes = (-2, -1) if layout.pairs else (-1,)
    top = jnp.max(blocked, axis=axes).astype(ct)
    bottom = jnp.min(blocked, axis=axes).astype(ct)
    return jnp.maximum(top, -bottom)


def _decoded_max(q: QuantizedArray | PackedQuantizedArray, layout: _Layout) -> jax.Array:
    """Largest decoded magnitude of each block of a stored moment, from its codes (no decode
    of the elements: the maps are monotone in ``|code|``)."""
    signed = _signed(q)
    axes = tuple(range(q.scale.ndim, q.codes.ndim))
    if isinstance(q, QuantizedArray):
        top = jnp.max(q.codes, axis=axes).astype(jnp.int32)
        level = jnp.maximum(top, -jnp.min(q.codes, axis=axes).astype(jnp.int32)) if signed else top
    else:
        raw = lax.bitcast_convert_type(q.codes, jnp.uint8)
        low, high = raw & jnp.uint8(15), raw >> jnp.uint8(4)
        if signed:  # |nibble - 7|, in uint8
            low = jnp.maximum(low, jnp.uint8(7)) - jnp.minimum(low, jnp.uint8(7))
            high = jnp.maximum(high, jnp.uint8(7)) - jnp.minimum(high, jnp.uint8(7))
        level = jnp.max(jnp.maximum(low, high), axis=axes).astype(jnp.int32)
    ct = _compute_dtype(q.scale.dtype)
    return _decode(level, q.scale.astype(ct), 4 if isinstance(q, PackedQuantizedArray) else 8, signed)


class _BoundObserver:
    """Pushed on ``rmsjax.averages``' observer stack while the wrapped update runs.

    For a moment update ``new = keep * old + take * x**order`` (a leaky average, a momentum
    buffer) or ``new = old + x**order`` (a running sum) whose ``old`` is a decoded stored
    moment, it records the bound ``|keep| max|old| + |take| max|x|**order`` on each block of
    ``new``: ``max|old|`` comes from the stored codes and ``max|x|`` from the input, so the
    new scales need no pass over the new moment. Any other way of producing a moment gets
    no bound and is reduced exactly."""

    def __init__(self) -> None:
        self.sources: dict[int, tuple[Any, Any, _Layout]] = {}
        self.bounds: dict[int, tuple[Any, jax.Array]] = {}

    def source(self, decoded: jax.Array, q: QuantizedArray | PackedQuantizedArray) -> None:
        self.sources[id(decoded)] = (decoded, q, _layout_of(q))

    def bound(self, new: Any) -> jax.Array | None:
        entry = self.bounds.get(id(new))
        return entry[1] if entry is not None and entry[0] is new else None

    def __call__(self, kind: str, old: Any, x: Any, new: Any, *, order: int, keep: Any = 1.0,
                 take: Any = 1.0) -> None:
        entry = self.sources.get(id(old))
        if entry is None or entry[0] is not old or order not in (1, 2):
            return
        _, q, layout = entry
        if (not hasattr(x, "shape") or tuple(x.shape) != tuple(old.shape)
                or tuple(getattr(new, "shape", ())) != tuple(old.shape)
                or not jnp.issubdtype(jnp.result_type(x), jnp.floating)):
            return
        ct = _compute_dtype(q.scale.dtype)
        m_old = _decoded_max(q, layout)
        m_x = _block_absmax(x, layout, ct)
        if order == 2:
            m_x = m_x * m_x
        if kind == "sum":
            bound = m_old + m_x
        else:
            bound = (jnp.abs(jnp.asarray(keep).astype(ct)) * m_old
                     + jnp.abs(jnp.asarray(take).astype(ct)) * m_x)
            if kind == "momentum":  # the first step takes x itself
                bound = jnp.maximum(bound, m_x)
        self.bounds[id(new)] = (new, bound)


@functools.partial(jax.jit, static_argnames=("layout", "bits", "signed", "leaf_id", "nearest"))
def _quantize(x: jax.Array, layout: _Layout, bits: int, signed: bool, count: jax.Array | None,
              leaf_id: int, *, old_scale: jax.Array | None = None, bound: jax.Array | None = None,
              nearest: bool = False) -> QuantizedArray | PackedQuantizedArray:
    """Encode ``x`` (the leaf's shape) with ``layout``; ``count=None`` or ``nearest``: nearest.

    ``old_scale``: the scales stored at the previous step (kept where they still fit).
    ``bound``: an upper bound on each block's largest magnitude; the scales then come from
    it instead of from a reduction over ``x``."""
    dtype = x.dtype
    ct = _compute_dtype(dtype)
    blocked = x.astype(ct).reshape(layout.blocked_shape())
    block_axes = (-2, -1) if layout.pairs else (-1,)
    if bound is None:
        scale = _block_scale(blocked, block_axes, old_scale)
    else:
        scale = _bound_scale(bound.astype(ct), old_scale)
    scale = scale.astype(dtype)
    scale_c = scale.astype(ct).reshape(scale.shape + (1,) * len(block_axes))
    u = None if (nearest or count is None) else _uniform(layout.blocked_shape(), count, leaf_id)
    level = _encode(blocked, scale_c, u, bits, signed)
    if bits == 8:
        codes = level.astype(_code_dtype(signed))
        if layout.pairs:
            codes = codes.reshape(*scale.shape, layout.block // 2, 2)
        return QuantizedArray(codes=codes, scale=scale)
    nib = (level + jnp.asarray(7, ct) if signed else level).astype(jnp.uint8)
    nib = nib.reshape(*scale.shape, layout.block // 2, 2)
    byte = nib[..., 0] | (nib[..., 1] << jnp.uint8(4))
    if layout.pairs:
        byte = byte[..., None]
    if signed:
        byte = lax.bitcast_convert_type(byte, jnp.int8)
    return PackedQuantizedArray(codes=byte, scale=scale)


def _field(path: tuple[Any, ...]) -> str | None:
    """The name of the innermost NamedTuple field on ``path`` (``nu``, ``mu``, ...)."""
    name = None
    for key in path:
        if isinstance(key, jax.tree_util.GetAttrKey):
            name = key.name
    return name


def dequantize_state(tree: Any) -> Any:
    """Replace every quantized moment in ``tree`` by its decoded array (for reading a state).

    ``rmsjax.effective_learning_rate`` calls this, so it reads through :func:`quantized`.
    Leaves that are not quantized are returned as they are.
    """
    return jax.tree_util.tree_map(
        lambda x: dequantize(x) if _is_quantized(x) else x, tree, is_leaf=_is_quantized
    )


def _increment(count: jax.Array) -> jax.Array:
    top = jnp.iinfo(jnp.int32).max
    return jnp.where(count < top, count + jnp.int32(1), count)


# --------------------------------------------------------------------------- the wrapper


def quantized(
    inner: optax.GradientTransformation,
    *,
    bits: int = 8,
    block_size: int | None = None,
    min_size: int = 4096,
) -> optax.GradientTransformation:
    r"""Store the moments of ``inner``'s state in 8 or 4 bits: codes plus one scale per block.

    The wrapped update is unchanged; only storage changes. At each step, for every moment
    leaf :math:`s` (stored as codes :math:`c` and block scales :math:`a`):

    .. math::

       \tilde s = \operatorname{decode}(c)\, a, \qquad
       (u, s') = \texttt{inner.update}(g, \tilde s), \qquad
       a' = \max_{\text{block}} |s'|, \qquad
       c' = \operatorname{round}(\operatorname{decode}^{-1}(s' / a'))

    where :math:`\operatorname{decode}` is a non-linear map dense near zero (signed for first
    moments, unsigned and zero-free for second moments) and :math:`\operatorname{round}` is
    unbiased stochastic rounding driven by a hash of (leaf, element, step). All arithmetic
    runs in float32, or in the moment's dtype when that is wider.

    Which leaves are quantized: floating-point leaves of the wrapped state whose shape is a
    parameter's shape (or a parameter's shape plus a trailing 2: the real view of a complex
    parameter, as ``rmsjax.compat.torch`` keeps it), with at least ``min_size`` elements.
    Counters, learning rates, scalars and small leaves (biases, norms) stay as they are. Fields
    ``nu``, ``nu_max`` and ``nu_delta`` use the unsigned map, all others the signed one.

    Blocking: blocks run along the last axis of the parameter (for a real view, along the
    parameter's last axis with both parts of each element in the same block). The block is the
    largest divisor of the row length not above ``block_size`` (even for 4 bits), so no
    padding is ever stored; when ``init`` runs eagerly on sharded parameters, the per-shard
    row length is used, so that a block never crosses a shard boundary. A leaf whose row has
    no divisor of at least ``block_size / 4`` (say a prime length longer than a block) stays
    in full precision.

    Args:
      inner: the transformation whose state is stored in low precision (any rmsjax
        optimizer or transformation, ``rmsjax.compat`` ones included, or an optax chain).
      bits: 8 (one code per byte) or 4 (two codes per byte).
      block_size: elements per block, an even integer; ``None`` means 256 for 8 bits and 128
        for 4 bits.
      min_size: leaves with fewer elements than this stay in full precision.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`QuantizedState`.

    Raises:
      ValueError: if ``bits`` is not 8 or 4, ``block_size`` is not an even integer in
        [2, 65536] (or None), or ``min_size`` is not an integer >= 0.
      TypeError: if ``inner`` is not a gradient transformation.

    Example:
      >>> import jax.numpy as jnp
      >>> import rmsjax
      >>> tx = rmsjax.quantized(rmsjax.adam(1e-3))
      >>> params = {"w": jnp.ones((64, 256)), "b": jnp.zeros(256)}
      >>> state = tx.init(params)
      >>> mu = state.inner[0].mu
      >>> mu["w"].codes.dtype, mu["w"].codes.shape, mu["w"].scale.shape, mu["b"].dtype
      (dtype('int8'), (64, 1, 256), (64, 1), dtype('float32'))
      >>> updates, state = tx.update({"w": jnp.ones((64, 256)), "b": jnp.ones(256)}, state, params)
      >>> float(updates["w"][0, 0])
      -0.001
    """
    bits, block, minimum = _check_arguments(inner, bits, block_size, min_size)
    return _wrap(inner, bits, block, minimum, nearest=False)


def _is_variable(x: Any) -> bool:
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(x, nnx.Variable)


def _value(x: Any) -> Any:
    if not _is_variable(x):
        return x
    # Flax >= 0.12.x has Variable.get_value(); older ones (0.12.0, the tested floor) only .value.
    return x.get_value() if hasattr(type(x), "get_value") else x.value


def _is_centered(x: Any) -> bool:
    return isinstance(x, ScaleByStddevState)


def _centered_to_variance(state: Any, stored: Any, *, forward: bool) -> Any:
    """In every ``ScaleByStddevState`` whose ``nu`` leaf is (to be) quantized, swap between
    ``nu`` and the variance ``nu - mu**2``. ``stored`` is a tree shaped like ``state`` with a
    truthy leaf (or a quantized node) where ``nu`` is stored quantized."""

    def swap(node: Any, flags: Any) -> Any:
        if not _is_centered(node):
            return node

        def leaf(nu: Any, mu: Any, flag: Any) -> Any:
            if not (flag is True or _is_quantized(flag)):
                return nu
            nu, mu = _value(nu), _value(mu)
            ct = _compute_dtype(nu.dtype)
            n, m = nu.astype(ct), mu.astype(ct)
            if forward:  # nu -> variance; the one rounding can never make negative
                out = jnp.maximum(n - m * m, jnp.zeros_like(n))
            else:
                out = n + m * m
            return out.astype(nu.dtype)

        nu = jax.tree_util.tree_map(leaf, node.nu, node.mu, flags.nu,
                                    is_leaf=lambda x: _is_quantized(x) or _is_variable(x))
        return node._replace(nu=nu)

    return jax.tree_util.tree_map(swap, state, stored, is_leaf=lambda x: _is_centered(x) or _is_variable(x))


def _wrap(inner: optax.GradientTransformation, bits: int, block: int, minimum: int, *,
          nearest: bool, bound_scales: bool | None = None) -> optax.GradientTransformation:
    """:func:`quantized` without validation; ``nearest=True`` rounds to nearest (for tests).

    ``bound_scales``: take the new block scales from the bound of :class:`_BoundObserver`
    (True) or from an exact reduction over every new moment (False); ``None``: the bound at 8
    bits, exact at 4 bits. At 4 bits a level step near the top is 24-37 %, the largest decoded
    element of a block is biased upward by its rounding, and a bound built on it keeps the
    scales too high: the 600-step digits classifier reached 20x the float32 loss that way
    (exact: 0.96x)."""
    if bound_scales is None:
        bound_scales = bits == 8

    def init_fn(params: Any) -> QuantizedState:
        state = inner.init(params)
        shapes = {
            tuple(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(params) if hasattr(leaf, "shape")
        }
        # A Flax NNX Variable (init called on nnx.Param leaves) is taken as one leaf; where its
        # value is quantized, the quantized node replaces the Variable.
        flat, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_variable)
        plans = [
            (_plan(path, _value(leaf), shapes, bits, block, minimum), _field(path) not in UNSIGNED_FIELDS)
            for path, leaf in flat
        ]
        flags = treedef.unflatten([layout is not None for layout, _ in plans])
        state = _centered_to_variance(state, flags, forward=True)
        leaves = []
        for leaf_id, (leaf, (layout, signed)) in enumerate(zip(treedef.flatten_up_to(state), plans,
                                                                strict=True)):
            if layout is None:
                leaves.append(leaf)
            else:
                leaves.append(_quantize(jnp.asarray(_value(leaf)), layout, bits, signed, jnp.int32(0),
                                        leaf_id, nearest=nearest))
        return QuantizedState(count=jnp.zeros([], jnp.int32), inner=treedef.unflatten(leaves))

    def update_fn(updates: Any, state: QuantizedState, params: Any = None, **extra_args: Any):
        stored, treedef = jax.tree_util.tree_flatten(state.inner, is_leaf=_is_quantized)
        observer = _BoundObserver()
        decoded = []
        for x in stored:
            if _is_quantized(x):
                decoded.append(dequantize(x))
                if bound_scales:
                    observer.source(decoded[-1], x)
            else:
                decoded.append(x)
        inner_state = _centered_to_variance(treedef.unflatten(decoded), state.inner, forward=False)
        with averages._observing(observer):
            updates, new_inner = inner.update(updates, inner_state, params, **extra_args)
        new_inner = _centered_to_variance(new_inner, state.inner, forward=True)
        count = state.count + jnp.int32(1)
        leaves = []
        for leaf_id, (old, new) in enumerate(zip(stored, treedef.flatten_up_to(new_inner))):
            if _is_quantized(old):
                leaves.append(
                    _quantize(jnp.asarray(new).astype(old.scale.dtype), _layout_of(old),
                              4 if isinstance(old, PackedQuantizedArray) else 8, _signed(old),
                              count, leaf_id, old_scale=old.scale, bound=observer.bound(new),
                              nearest=nearest)
                )
            else:
                leaves.append(new)
        return updates, QuantizedState(count=_increment(state.count), inner=treedef.unflatten(leaves))

    return optax.GradientTransformation(init_fn, update_fn)  # pyright: ignore[reportArgumentType]
