r"""The block codec of :func:`rmsjax.quantized`: code maps, rounding, scales, 4-bit packing.

Pure array functions on *blocked* arrays (the last axis, or the last two for packed 4-bit
codes, is one block); nothing here knows about optimizer states. Every function is
elementwise over the blocks except the two scale reductions, so that XLA can fuse a whole
decode-update-encode into the loops that produce and consume it.

A code ``c`` of a map with ``Q`` levels on each side of zero and exponent ``p`` decodes to

.. math::

   x = s\,\operatorname{sign}(c)\,\left(\frac{|c|}{Q}\right)^{p}

with ``s`` the block's scale (the smallest power of two at or above the block's largest
finite magnitude). Codes outside ``[-Q, Q]`` are reserved for non-finite elements, so that an
``inf`` or ``NaN`` stays in its own element and never reaches its block's scale:

=====================  ===  ===  =======================================================
map                    Q    p    reserved codes
=====================  ===  ===  =======================================================
8-bit signed (int8)    127  4    -128: NaN (any non-finite signed moment)
8-bit unsigned         253  4    254: +inf, 255: NaN
4-bit signed           7    2    nibble 15 (level 8): NaN
4-bit unsigned         14   4    15: +inf (a NaN non-negative moment is stored as +inf)
=====================  ===  ===  =======================================================

4-bit codes are packed two to a byte: in each block of ``B`` elements, element ``j`` and
element ``j + B/2`` share byte ``j`` (low and high nibble). Splitting a block into halves
(rather than interleaving neighbours) lets packing be a sum over an axis of two and unpacking
a broadcast shift, which XLA fuses into the surrounding loop (neighbours measured slower:
4-bit Adam 65.8 against 57.8 ms at 4096 x 4096 on XLA:CPU).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "MAPS",
    "block_scale",
    "block_scales",
    "bound_scale",
    "decode",
    "encode",
    "finite_absmax",
    "inverse_scale",
    "largest_level",
    "levels_of",
    "half_levels",
    "pack",
    "pack_halves",
    "to_bytes",
    "half_indices",
    "uniform",
    "uniform_at",
]

MAPS = {(8, True): (127, 4), (8, False): (253, 4), (4, True): (7, 2), (4, False): (14, 4)}
"""(bits, signed) -> (levels on each side of zero Q, exponent p)."""

_NAN = {(8, True): -128.0, (8, False): 255.0, (4, True): 8.0, (4, False): 15.0}
"""The level stored for NaN (and, for signed maps, for any non-finite value)."""
_INF = {(8, False): 254.0, (4, False): 15.0}
"""The level stored for +inf in the unsigned maps."""

SCALE_SLACK = 4
"""A block's scale is a power of two; it stays put while the block's absmax is in (scale/4, scale]."""


_ROUNDING_MAGIC = 1.5 * 2.0**23
"""Adding it to an integer-valued float32 ``k`` with ``|k| < 2**22`` gives a float whose bit
pattern ends in ``k``'s two's-complement bits."""


def to_bytes(level: jax.Array, signed: bool) -> jax.Array:
    """Integer-valued levels in ``[-128, 255]`` as codes: int8 when ``signed`` (the codes of
    the signed maps), else uint8 (unsigned maps, and 4-bit nibbles before packing).

    The same bytes as ``level.astype(jnp.int8 if signed else jnp.uint8)``, without its
    saturation: the low byte of ``level + 1.5 * 2**23``'s float32 bit pattern. On XLA:CPU the
    saturating conversion took about nine vector instructions per 8 elements (a clamp, a
    compare and four packs); this one is an add and a truncation (8-bit steps 5-7 % faster)."""
    pattern = lax.bitcast_convert_type(level.astype(jnp.float32) + jnp.float32(_ROUNDING_MAGIC), jnp.uint32)
    byte = pattern.astype(jnp.uint8)
    return lax.bitcast_convert_type(byte, jnp.int8) if signed else byte


# --------------------------------------------------------------------------- rounding noise


def _u32(x: int) -> jax.Array:
    return jnp.uint32(x & 0xFFFFFFFF)


def _mix(x: jax.Array) -> jax.Array:
    """A 32-bit integer finalizer (xor-shift-multiply), a bijection with good avalanche."""
    x = x ^ (x >> _u32(16))
    x = x * _u32(0x7FEB352D)
    x = x ^ (x >> _u32(15))
    x = x * _u32(0x846CA68B)
    return x ^ (x >> _u32(16))


def uniform(shape: tuple[int, ...], count: jax.Array, leaf_id: int | jax.Array) -> jax.Array:
    """float32 numbers in [0, 1) for the rounding of one leaf at step ``count``.

    Each number is a hash of (leaf, row-major element index, step): the key
    ``(index * C) ^ salt(leaf) + count * (golden ratio)`` goes through an avalanche mixer, so
    the numbers are uniform over the elements at every step and unrelated from one step to
    the next. A pure function of (leaf, element, step): bit-identical on resume and sharding.

    An earlier design added ``count * (golden ratio)`` *after* hashing (a Weyl sequence per
    element: evenly spread along its steps). That made each element's number at one step a
    function of its numbers at the steps before, on which the moment being rounded depends,
    and the rounding of a moment that carries over from step to step was biased: a 4-bit
    RMSprop second moment ended 3.9 % high after 200 steps (0.2727 against 0.2624; numbers
    drawn with ``jax.random`` instead: 0.2624).
    """
    return uniform_at(_indices(shape), count, leaf_id)


def _indices(shape: tuple[int, ...]) -> jax.Array:
    return lax.iota(jnp.uint32, int(np.prod(shape, dtype=np.int64))).reshape(shape)


def half_indices(shape: tuple[int, ...], half: int, high: bool) -> jax.Array:
    """The row-major element indices (uint32) of the low (``high=False``) or high half of each
    block of ``2 * half`` elements, laid out like the packed codes (shape ``shape``): byte ``c``
    holds elements ``c + (c // half) * half`` and ``half`` after it."""
    c = _indices(shape)
    h = _u32(half)
    first = c + (c // h) * h
    return first + h if high else first


def uniform_at(index: jax.Array, count: jax.Array, leaf_id: int | jax.Array) -> jax.Array:
    """:func:`uniform`'s numbers at the row-major element indices ``index`` (uint32)."""
    step = jnp.asarray(count).astype(jnp.uint32)
    if isinstance(leaf_id, int):
        salt = _u32(leaf_id * 0x85EBCA77 + 0x27D4EB2F)
    else:  # an array (a jitted init shared by leaves of one shape): the same bits, mod 2**32
        salt = jnp.asarray(leaf_id).astype(jnp.uint32) * _u32(0x85EBCA77) + _u32(0x27D4EB2F)
    bits = _mix(((index * _u32(0xC2B2AE3D)) ^ salt) + step * _u32(0x9E3779B9))
    return (bits >> _u32(8)).astype(jnp.float32) * jnp.float32(2.0**-24)


# --------------------------------------------------------------------------- the maps


def _root(y: jax.Array, p: int) -> jax.Array:
    return jnp.sqrt(y) if p == 2 else jnp.sqrt(jnp.sqrt(y))


def _power(y: jax.Array, p: int) -> jax.Array:
    y2 = y * y
    return y2 if p == 2 else y2 * y2


def inverse_scale(scale: jax.Array, *, by_bits: bool = False) -> jax.Array:
    """``1 / scale`` of each block, with 1 for a zero scale (an all-zero block): what
    :func:`encode` multiplies by. The scale is a power of two (or a dtype's largest value),
    so the product is the quotient. Taken once per block, not per element.

    ``by_bits``: for a float32 or float64 ``scale`` that is 0 or a power of two (every scale
    :func:`block_scale` makes, except float16's clamped largest value), the inverse is formed
    from the bit pattern, ``2**-k`` as the exponent field ``2 * bias - (k + bias)``: the same
    number, with no division, so that XLA computes it inside the loop that reads it instead of
    writing one per block out first (4-bit steps compiled in place: 0.03-0.06 B/param lower at
    their peak; at 8 bits the loop got slower, 8-bit Adam 2.85x -> 3.36x float32's time)."""
    one = jnp.ones((), scale.dtype)
    if by_bits:
        utype, mantissa, mask, _ = _EXPONENT[jnp.dtype(scale.dtype)]
        bits = lax.bitcast_convert_type(scale, utype)
        inverse = lax.bitcast_convert_type(jnp.asarray((mask - 1) << mantissa, utype) - bits, scale.dtype)
        return jnp.where(scale > 0, inverse, one)
    return one / jnp.where(scale > 0, scale, one)


def encode(x: jax.Array, inverse: jax.Array, u: jax.Array | None, bits: int, signed: bool) -> jax.Array:
    """Integer-valued levels (in ``x.dtype``) of ``x`` against its block scale, given as
    ``inverse`` (:func:`inverse_scale`, broadcast to ``x``).

    ``u``: uniform numbers for unbiased rounding (``None``: round to nearest). A positive
    value never rounds to level 0 of an unsigned map (a second moment never decodes to
    zero); non-finite values get their reserved level.
    """
    levels, p = MAPS[(bits, signed)]
    ct = x.dtype
    q = jnp.asarray(levels, ct)
    one = jnp.asarray(1, ct)
    y = jnp.minimum(jnp.abs(x) * inverse.astype(ct), one)
    t = q * _root(y, p)
    # t is in [0, Q] (y <= 1 and the root of 1 is exact), so no clamp is needed: at t = Q the
    # level stays Q, since y - f_lo = 0 rounds nothing up. (A NaN-propagating clamp took four
    # vector instructions per element on XLA:CPU, about 7 % of the 8-bit step.)
    lo = jnp.floor(t)
    inv_q = jnp.asarray(1 / levels, ct)
    f_lo = _power(lo * inv_q, p)
    f_hi = _power((lo + one) * inv_q, p)
    if u is None:
        up = y + y >= f_lo + f_hi
    else:
        up = u.astype(ct) * (f_hi - f_lo) < y - f_lo
    level = lo + up.astype(ct)
    finite = jnp.isfinite(x)
    nan = jnp.asarray(_NAN[(bits, signed)], ct)
    if signed:
        level = jnp.where(x < 0, -level, level)
        return jnp.where(finite, level, nan)
    # x > 0, not y > 0: y = |x| / scale flushes to zero below the smallest normal number (a
    # block whose scale is 2**60 above the element's), and the element would decode to 0.
    level = jnp.where(x > 0, jnp.maximum(level, one), jnp.zeros_like(level))
    inf = jnp.asarray(_INF[(bits, signed)], ct)
    return jnp.where(finite, level, jnp.where(jnp.isnan(x), nan, inf))


def decode(level: jax.Array, scale: jax.Array, bits: int, signed: bool) -> jax.Array:
    """Values of integer ``level``s (any real dtype) against their block ``scale``, in
    ``scale.dtype``; reserved levels decode to NaN or +inf."""
    levels, p = MAPS[(bits, signed)]
    ct = scale.dtype
    r = level.astype(ct) * jnp.asarray(1 / levels, ct)
    # sign(r) |r|**p, with the sign carried by r * |r| (exactly -r**2 for negative r)
    signed_square = r * jnp.abs(r) if signed else r * r
    value = signed_square if p == 2 else (r * r) * signed_square
    value = value * scale
    nan = jnp.asarray(_NAN[(bits, signed)], ct)
    special = level.astype(ct)
    if signed:
        return jnp.where(special == nan, jnp.asarray(jnp.nan, ct), value)
    inf = jnp.asarray(_INF[(bits, signed)], ct)
    value = jnp.where(special == inf, jnp.asarray(jnp.inf, ct), value)
    if _NAN[(bits, signed)] != _INF[(bits, signed)]:
        value = jnp.where(special == nan, jnp.asarray(jnp.nan, ct), value)
    return value


# --------------------------------------------------------------------------- 4-bit packing


def _nibble_shifts() -> jax.Array:
    """Shifts 0 and 4 on an axis of two (the low and the high half of each block)."""
    return lax.broadcasted_iota(jnp.uint8, (2, 1), 0) * jnp.uint8(4)


def pack(level: jax.Array, signed: bool) -> jax.Array:
    """Levels of shape ``(..., B)`` to bytes ``(..., B/2)``: element ``j`` in the low nibble of
    byte ``j``, element ``j + B/2`` in its high nibble.

    The two halves are combined by a sum over an axis of two (the nibbles do not overlap),
    not by two slices: XLA:CPU then runs the fused encode on the block's own shape (a pair of
    slices feeding a reshaped output measured 5x slower there)."""
    half = level.shape[-1] // 2
    nib = to_bytes(level + jnp.asarray(7, level.dtype) if signed else level, False)
    nib = nib.reshape(*level.shape[:-1], 2, half)
    byte = jnp.sum(nib << _nibble_shifts(), axis=-2, dtype=jnp.uint8)
    return lax.bitcast_convert_type(byte, jnp.int8) if signed else byte


def pack_halves(low: jax.Array, high: jax.Array, signed: bool) -> jax.Array:
    """Levels of the low and the high half of each block (each ``(..., B/2)``) to bytes
    ``(..., B/2)``: the same bytes as :func:`pack` of the whole blocks, computed element by
    element, so that XLA can write them over the bytes they were decoded from
    (:mod:`rmsjax._halves`)."""
    def nibble(level: jax.Array) -> jax.Array:
        return to_bytes(level + jnp.asarray(7, level.dtype) if signed else level, False)

    byte = nibble(low) | (nibble(high) << jnp.uint8(4))
    return lax.bitcast_convert_type(byte, jnp.int8) if signed else byte


def half_levels(codes: jax.Array, high: bool, signed: bool, ct: Any, *, wide: bool = False) -> jax.Array:
    """Levels (in ``ct``) of the low (``high=False``) or high nibbles of packed 4-bit codes:
    the first or second half of each block, read element by element from its bytes.
    ``wide``: the bytes are widened to 32 bits before the nibble is taken (the same levels)."""
    raw = lax.bitcast_convert_type(codes, jnp.uint8)
    if wide:
        raw = raw.astype(jnp.uint32)
    nib = (raw >> jnp.asarray(4, raw.dtype)) if high else (raw & jnp.asarray(15, raw.dtype))
    level = nib.astype(ct)
    return level - jnp.asarray(7, ct) if signed else level


def levels_of(codes: jax.Array, bits: int, signed: bool, ct: Any, *, fuse: bool = True) -> jax.Array:
    """Levels (in ``ct``) of blocked codes: ``(..., B)`` for 8 bits, bytes ``(..., B/2)`` for
    4 bits (unpacked to ``(..., B)``).

    ``fuse`` chooses how the two halves of a 4-bit block are put back, which decides what
    XLA:CPU writes out when it cannot fuse the unpacking into every loop that reads it
    (measured on the donated train step): ``True``, a broadcast shift (the inverse of
    :func:`pack`), fuses where it can and otherwise writes out float32 levels (4 B/param);
    ``False``, a concatenation, is always written out, as bytes (1 B/param for the two halves
    and 1 for the whole). The shift fuses for a moment that only the parameter update and the
    moment's own encode read (4-bit Adam: 11.63 B/param with the shift, 12.13 concatenated);
    it does not for the first moment of centred RMSprop, which the encode of the centred
    second moment reads too (it decodes ``nu`` as the stored variance plus ``mu**2``), so
    :func:`rmsjax.quantized` passes ``False`` there (centred RMSprop with momentum: 21.69
    B/param with the shift on both first moments, 18.19 with the concatenation for the
    centred one only).
    """
    if bits == 8:
        return codes.astype(ct)
    raw = lax.bitcast_convert_type(codes, jnp.uint8)
    if fuse:
        # Widened to 32 bits before the shift: with byte lanes XLA:CPU emulated the per-half
        # shift by three shifts and blends per 8 elements (4-bit steps 9-16 % slower).
        wide = raw.astype(jnp.uint32)
        shifts = lax.broadcasted_iota(jnp.uint32, (2, 1), 0) * jnp.uint32(4)
        both = (wide[..., None, :] >> shifts) & jnp.uint32(15)
        both = both.reshape(*raw.shape[:-1], 2 * raw.shape[-1])
    else:
        both = jnp.concatenate([raw & jnp.uint8(15), raw >> jnp.uint8(4)], axis=-1)
    both = both.astype(ct)
    return both - jnp.asarray(7, ct) if signed else both


def largest_level(codes: jax.Array, signed: bool) -> jax.Array:
    """An upper bound on the largest finite ``|level|`` of each block of blocked 8-bit codes
    (float32): exact unless the block holds a reserved (non-finite) code, then ``Q``. The
    maps are monotone in ``|level|``, so this decodes to a bound on the block's largest
    finite magnitude (the ``max|old|`` of an 8-bit block bound; 4-bit moments are reduced
    exactly, so they never need it). It reduces the stored codes themselves, so XLA reads them
    in place instead of writing a converted copy; for the signed map the max and the min are
    one reduction of two outputs (reduced apart, XLA:CPU kept byte temporaries between them,
    and the donated 8-bit Adam step, compiled with default options, copied both code arrays:
    12.08 against 11.10 B/param at 4096 x 4096)."""
    q = MAPS[(8, signed)][0]
    if signed:  # -128 (NaN) reads as 128: clipped to Q below
        def max_and_min(a: tuple[jax.Array, jax.Array], b: tuple[jax.Array, jax.Array]):
            return lax.max(a[0], b[0]), lax.min(a[1], b[1])

        start = (jnp.array(-128, codes.dtype), jnp.array(127, codes.dtype))
        high, low = lax.reduce((codes, codes), start, max_and_min, (codes.ndim - 1,))
        top = jnp.maximum(high.astype(jnp.float32), -low.astype(jnp.float32))
    else:
        top = jnp.max(codes, axis=-1).astype(jnp.float32)
    return jnp.minimum(top, jnp.float32(q))


# --------------------------------------------------------------------------- scales


_EXPONENT = {  # compute dtype -> (same-width unsigned int, mantissa bits, exponent mask, byte type)
    jnp.dtype(jnp.float32): (jnp.uint32, 23, 0xFF, jnp.uint8),
    jnp.dtype(jnp.float64): (jnp.uint64, 52, 0x7FF, jnp.uint16),
}


def _biased_exponent(x: jax.Array, utype: Any, mantissa: int, mask: int) -> jax.Array:
    """The biased exponent field of each element of ``x`` (in ``utype``)."""
    raw = lax.bitcast_convert_type(x, utype)
    return (raw >> jnp.asarray(mantissa, utype)) & jnp.asarray(mask, utype)


def _exponent_below(x: jax.Array, utype: Any, mantissa: int, mask: int) -> jax.Array:
    """The biased exponent of the largest float below ``|x|`` (of 0 for a zero ``x``), in
    ``utype``: the same as ``|x|``'s own, except for an exact power of two ``2**k``, whose
    scale is then ``2**k`` itself rather than ``2**(k + 1)``. (The top level of every map
    decodes to exactly the scale, so a block re-encoded unchanged, as a running maximum or
    a step skipped by ``optax.apply_if_finite`` is, must keep its scale; with the exponent of
    ``|x|`` it doubled, and every element of the block was rounded again.)"""
    sign = jnp.asarray(1 << (8 * jnp.dtype(utype).itemsize - 1), utype)
    raw = lax.bitcast_convert_type(x, utype) & ~sign
    # Above the smallest normal number only: it (and anything smaller) keeps its own exponent,
    # so that its block is not read as all zero.
    below = raw - (raw > jnp.asarray(1 << mantissa, utype)).astype(utype)
    return (below >> jnp.asarray(mantissa, utype)) & jnp.asarray(mask, utype)


_FUSED_WINDOW = 32
"""Elements per stage of a :func:`_block_max` reduction kept in XLA's own loop."""


def _windowed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` with its last axis (one block) split into windows of :data:`_FUSED_WINDOW`
    elements where they divide it, else ``shape`` itself: the stages of a block maximum."""
    n = shape[-1]
    return (*shape[:-1], n // _FUSED_WINDOW, _FUSED_WINDOW) \
        if n > _FUSED_WINDOW and n % _FUSED_WINDOW == 0 else tuple(shape)


def _block_max(x: jax.Array, blocked: tuple[int, ...] | None) -> jax.Array:
    """The maximum of each block (last axis, after reshaping to ``blocked`` when given) of
    unsigned integers ``x``, reduced in 32-bit lanes, in stages of :data:`_FUSED_WINDOW`
    elements.

    XLA:CPU hands a reduction over bytes to its YNNPACK library, which reads its operand from
    memory, so the elementwise loop that feeds it (decode, update, exponent of each new
    element) was written out first, one byte per element, and run as a loop of its own. A
    32-bit reduction over windows of at most 32 stays in XLA's own loop, fused with that
    producer, and nothing is written out; the values are the same. Donated train step,
    4096 x 4096, XLA:CPU, both ways in one process: 4-bit Adam 88 -> 61 ms and 11.63 -> 9.69
    B/param at its peak, RMSprop 35 -> 31 ms and 10.06 -> 9.09; at 8 bits RMSprop with momentum
    114 -> 103 ms, AdaDelta 153 -> 135 ms and 20.08 -> 19.09 B/param, and, compiled in place
    (docs/low_bit.md), every 8-bit step 1 B/param lower (the gradient's maxima for the bound
    included: 8-bit Adam 11.07 -> 10.11)."""
    if jnp.dtype(x.dtype).itemsize < 4:
        x = x.astype(jnp.uint32)  # widened before the reshape: a convert after it is not fused
    if blocked is not None:
        x = x.reshape(blocked)
    windowed = _windowed(x.shape)
    if windowed != x.shape:
        x = jnp.max(x.reshape(windowed), axis=-1)
    return jnp.max(x, axis=-1)


def _block_maxima(xs: tuple[jax.Array, ...], blocked: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """:func:`_block_max` of several arrays of one shape in one variadic reduction: one loop
    that computes them all and reads their operands once. Each window stage of
    :func:`_block_max` is a dimension of the same reduction: reduced in two, XLA:CPU wrote the
    first stage's maxima out, 4 bytes per window of each array (4-bit Adam compiled in place:
    9.38 against 9.13 B/param at its peak)."""
    if len(xs) == 1:
        return (_block_max(xs[0], blocked),)
    windowed = _windowed(blocked)
    operands = tuple(x.astype(jnp.uint32).reshape(windowed) for x in xs)
    start = tuple(jnp.array(0, jnp.uint32) for _ in xs)

    def maxima(a: tuple[jax.Array, ...], b: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        return tuple(lax.max(u, v) for u, v in zip(a, b, strict=True))

    return tuple(lax.reduce(operands, start, maxima, tuple(range(len(blocked) - 1, len(windowed)))))


def _power_of_two_above(biased: jax.Array, utype: Any, mantissa: int, mask: int) -> jax.Array:
    """Bits of ``2**(e - bias + 1)`` for biased exponents ``e`` (0 where ``e == 0``), at most
    ``2**(bias - 1)`` (float32: ``2**126``, float64: ``2**1022``): the largest power of two
    whose inverse is a normal number. A larger scale's inverse is subnormal, which XLA flushes
    to zero, and every element of its block would encode to level 0; magnitudes of
    ``2**126`` and above saturate at the top level instead."""
    largest = mask - 3  # the biased exponent e whose 2**(e - bias + 1) is 2**(bias - 1)
    biased = jnp.minimum(biased.astype(utype), jnp.asarray(largest, utype))
    return jnp.where(biased > 0, (biased + jnp.asarray(1, utype)) << jnp.asarray(mantissa, utype),
                     jnp.zeros_like(biased))


def _finish(fresh: jax.Array, old: jax.Array | None, utype: Any, mantissa: int, ct: Any,
            dtype: Any) -> jax.Array:
    """Keeps the old scale while the fresh one is within ``SCALE_SLACK`` below it, and stores
    the scale in ``dtype``, clamped to its largest finite value (a float16 block whose
    maximum is above 2**15 gets scale 65504, not an overflowing 2**16)."""
    largest = float(jnp.finfo(dtype).max)
    clamps = largest < 2.0 ** (jnp.finfo(ct).maxexp - 2)  # float16; never bfloat16
    if old is not None:
        old_c = old.astype(ct)
        if clamps:  # a clamped old scale stands for the power of two above the dtype's maximum
            above = 2.0 ** int(np.ceil(np.log2(largest)))
            old_c = jnp.where(old_c == jnp.asarray(largest, ct), jnp.asarray(above, ct), old_c)
        old_raw = lax.bitcast_convert_type(old_c, utype)
        slack = jnp.asarray(SCALE_SLACK.bit_length() - 1, utype) << jnp.asarray(mantissa, utype)
        keep = (fresh <= old_raw) & (fresh + slack > old_raw)
        fresh = jnp.where(keep, old_raw, fresh)
    scale = lax.bitcast_convert_type(fresh, ct)
    if clamps:
        scale = jnp.minimum(scale, jnp.asarray(largest, ct))
    return scale.astype(dtype)


def block_scale(x: jax.Array, old: jax.Array | None, dtype: Any, *,
                keep: jax.Array | None = None, blocked: tuple[int, ...] | None = None) -> jax.Array:
    """Each block's scale (last axis) from its values: the smallest power of two at or above
    its largest *finite* magnitude, in ``dtype``. Only the biased exponents are reduced, in
    XLA's own loop (:func:`_block_max`); non-finite elements (exponent all ones), and those
    where ``keep`` is false, are left out.

    ``blocked``: when given, ``x`` (and ``keep``) are in their own shape and the exponents are
    reshaped to ``blocked`` just before the reduction. XLA:CPU runs an elementwise loop whose
    output shape differs from its operands' several times slower, so the elementwise part
    stays in the shape of the arrays it reads."""
    utype, mantissa, mask, _ = _EXPONENT[jnp.dtype(x.dtype)]
    fresh = _power_of_two_above(_largest_exponent(x, keep, blocked), utype, mantissa, mask)
    return _finish(fresh, old, utype, mantissa, x.dtype, dtype)


def block_scales(xs: tuple[jax.Array, ...], olds: tuple[jax.Array | None, ...], dtype: Any, *,
                 keeps: tuple[jax.Array | None, ...], blocked: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """:func:`block_scale` of several arrays of one shape and dtype (the new moments of one
    parameter), reduced in one loop (:func:`_block_maxima`): the same scales, each
    array's elements computed once for all of them instead of once per reduction."""
    utype, mantissa, mask, _ = _EXPONENT[jnp.dtype(xs[0].dtype)]
    exponents = tuple(_finite_exponent(x, keep) for x, keep in zip(xs, keeps, strict=True))
    tops = _block_maxima(exponents, blocked)
    return tuple(_finish(_power_of_two_above(top, utype, mantissa, mask), old, utype, mantissa,
                         xs[0].dtype, dtype) for top, old in zip(tops, olds, strict=True))


def _finite_exponent(x: jax.Array, keep: jax.Array | None) -> jax.Array:
    """:func:`_exponent_below` of each element of ``x`` (one byte for float32), 0 where the
    element is not finite or ``keep`` is false."""
    utype, mantissa, mask, etype = _EXPONENT[jnp.dtype(x.dtype)]
    drop = _biased_exponent(x, utype, mantissa, mask) == jnp.asarray(mask, utype)  # inf or NaN
    exponent = _exponent_below(x, utype, mantissa, mask).astype(etype)
    if keep is not None:
        drop = drop | ~keep
    return jnp.where(drop, jnp.zeros_like(exponent), exponent)


def _largest_exponent(x: jax.Array, keep: jax.Array | None, blocked: tuple[int, ...] | None) -> jax.Array:
    """Each block's largest :func:`_exponent_below` of its finite elements (and those where
    ``keep`` is true), reduced in XLA's own loop (:func:`_block_max`)."""
    return _block_max(_finite_exponent(x, keep), blocked)


def halves_scale(low: jax.Array, high: jax.Array, old: jax.Array | None, dtype: Any,
                 blocked: tuple[int, ...]) -> jax.Array:
    """:func:`block_scale` of blocks given as their low and high halves (each reshaped to
    ``blocked``, of ``B/2`` elements per block, just before the reduction): the larger of
    the two halves' exponents."""
    utype, mantissa, mask, _ = _EXPONENT[jnp.dtype(low.dtype)]
    top = jnp.maximum(_largest_exponent(low, None, blocked), _largest_exponent(high, None, blocked))
    return _finish(_power_of_two_above(top, utype, mantissa, mask), old, utype, mantissa, low.dtype, dtype)


def bound_scale(bound: jax.Array, old: jax.Array | None, dtype: Any) -> jax.Array:
    """:func:`block_scale` from an upper bound on each block's largest finite magnitude."""
    utype, mantissa, mask, _ = _EXPONENT[jnp.dtype(bound.dtype)]
    biased = _exponent_below(bound, utype, mantissa, mask)
    return _finish(_power_of_two_above(biased, utype, mantissa, mask), old, utype, mantissa,
                   bound.dtype, dtype)


def finite_absmax(x: jax.Array, ct: Any, *, square_finite: bool = False,
                  blocked: tuple[int, ...] | None = None) -> jax.Array:
    """A bound on the largest finite ``|x|`` of each block (last axis), in ``ct``: the
    input term of a moment's bound (a second moment squares it). With ``square_finite``,
    elements whose ``x**2`` overflows are left out too: they give a non-finite second
    moment, stored in its own element. ``blocked``: as in :func:`block_scale`.

    Only biased exponents are reduced (a plain, partitionable max), so what comes back is
    the largest number with the block's largest exponent: at most twice the true maximum,
    with the same power of two above it, hence the same scale for the rules whose bound is a
    maximum. (A filtered float32 ``|x|`` took four bytes per element, which XLA:CPU writes out
    before reducing; a custom reduction body that read ``x`` in place could not be
    partitioned under ZeRO-1 or FSDP shardings.)

    The reduction runs in XLA's own loop (:func:`_block_max`), so nothing is written out.
    With XLA:CPU's byte-reduction library the exponents were written out first (1 B/param),
    and no step could get within 0.15 B/param of its stored state: with the loop reduction
    and XLA:CPU's region-analysis copy insertion (docs/low_bit.md, *In place on CPU*), the
    donated 8-bit Adam step peaks at 10.11 B/param (10.03 allowed) and runs faster (4096 x
    4096: 48.5 against 56.3 ms, one process). Without that compiler option XLA:CPU copies two
    donated code arrays at once: 8-bit Adam 12.08 (11.10 with the byte reduction) and 64 ms.
    """
    utype, mantissa, mask, etype = _EXPONENT[jnp.dtype(ct)]
    a = jnp.abs(x.astype(ct))

    def exponent_of(v: jax.Array) -> jax.Array:
        return _biased_exponent(v, utype, mantissa, mask).astype(etype)

    exponent = exponent_of(a)
    drop = exponent == jnp.asarray(mask, etype)  # inf or NaN
    if square_finite:
        drop = drop | (exponent_of(a * a) == jnp.asarray(mask, etype))
    exponent = jnp.where(drop, jnp.zeros_like(exponent), exponent)
    top = _block_max(exponent, blocked).astype(utype)
    # The largest number of that exponent (all mantissa bits set); 0 for an all-zero block.
    ones = jnp.asarray((1 << mantissa) - 1, utype)
    bits = jnp.where(top > 0, (top << jnp.asarray(mantissa, utype)) | ones, jnp.zeros_like(top))
    return lax.bitcast_convert_type(bits, ct)
