r"""Low-bit optimizer state: declared moments stored as 8- or 4-bit codes plus one scale per block.

:func:`quantized` wraps any transformation. It stores in low bits exactly the moments that the
wrapped state's types *declare* (:mod:`rmsjax._moments`): ``nu`` and ``mu`` of the
RMSprop-family states, momentum buffers, optax's Adam/RMSprop/AdaGrad/trace states. Nothing
else is touched: counters, learning rates, Keras's EMA of the parameters, gradient
accumulators and any state type that declares nothing keep their dtype. Each stored moment
is

* ``codes``: one code per element (8 bits), shaped like the moment, or two per byte
  (4 bits), shaped like the moment with its blocked axis halved;
* ``scale``: one scale per block of ``block_size`` consecutive elements along the last axis
  (the last axes, when the last is shorter than a block), in the moment's own dtype.

The codec (maps, rounding, packing) is :mod:`rmsjax._codec`. Each update decodes, runs the
wrapped update in float32 (or the moment's dtype if wider) and encodes the new moments, in
one jitted step; XLA fuses the decode, the update and the encode of each leaf into the loops
that read the codes and write the new codes and parameters.

Block scales at 8 bits come from a bound, not from a pass over the new moment, for declared
moments with an update rule (leaky average, running sum, momentum, peak) whose input is the
gradient ``quantized`` receives: the state of the first transformation of a chain, past the
parts that declare they hand their input on unchanged (an absent optional part,
``transforms.AbsentState``) and into declared wrappers (``optax.inject_hyperparams``); see
:func:`rmsjax._moments.input_path`. The bound is ``|new| <= f(max|old|, max|g|)`` on each
block (:func:`rmsjax._moments.bound`; a centred variance's also takes the first moment's
``max|old|``): ``max|old|`` is read from the stored codes (the maps are monotone in
``|code|``) and ``max|g|`` from the gradient, so the encode runs in the same loop as the
update. All other
moments, and all moments at 4 bits, are reduced exactly: the bound ignores the rule's
coefficients (a leaky average's ``take = 1 - b2`` included), so one large gradient element
lifts its block's scale far above the new moment, which the 4-bit map's narrow range cannot
absorb (with the bound at 4 bits, ``examples/low_bit_state.py``'s language model ended at
1.19x float32 state's loss instead of 1.005x; 8-bit held at 1.00x).
"""

from __future__ import annotations

import functools
import numbers
import sys
from typing import Any, NamedTuple

import jax
import jax.core  # jax deletes its own alias; named here so type checkers see jax.core
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import optax

from rmsjax import _codec, _halves, _moments, _validation, averages

__all__ = [
    "PackedQuantizedArray",
    "QuantizedArray",
    "QuantizedState",
    "dequantize",
    "dequantize_state",
    "is_quantized",
    "quantized",
]

DEFAULT_BLOCK_SIZE = {8: 256, 4: 128}
CODE_MAPS = _codec.MAPS

# Whether to trace the new state a second time, from optimization_barrier copies of the
# inputs, so that the loop writing the parameters and the loops writing the codes each
# recompute the moments they need. With 0.3.0's codec it kept a full-size float32 copy of the
# new moments out of the XLA:CPU step (8-bit Adam: 18 B/param of temporaries without it); with
# the codec that encodes in the moment's own shape, the CPU peaks are the same either way
# (8-bit Adam 12.09 B/param; centred RMSprop with momentum at 4 bits 19.69 against 18.69) and
# so are the CPU step times, within noise. An H200 measured 0.3.0's step, traced twice, at 2.3x
# float32's time and 18 B/param (0.2, traced once: 1.09x, 10.1), so it is off.
# `benchmarks/bench_quantized.py --second-trace` measures the step with it, to compare.
_TRACE_NEW_STATE_AGAIN = False

# Whether a traced update recomputes new moments from the update's jaxpr (:mod:`rmsjax._halves`):
# each 4-bit one on the halves of its blocks, so that XLA writes the new codes over the old ones,
# and, where loops would share a full-size float32 value, their own computations for the block
# maxima and the 8-bit encode (:func:`_separate_computations`). Off only to compare against
# computing each new moment once (tests, benchmarks).
_ENCODE_ON_HALVES = True

# A block smaller than this fraction of block_size (when the row is longer than a block) would
# cost more in scales than it saves; such a leaf stays in full precision.
_MIN_BLOCK_FRACTION = 4


class QuantizedArray(NamedTuple):
    """A moment leaf stored in 8 bits: one code per element, one scale per block.

    Attributes:
      codes: ``int8`` (signed map) or ``uint8`` (unsigned map), shaped like the moment.
      scale: each block's scale, in the moment's dtype, of shape ``moment.shape[:-k] +
        (n_blocks,)``, where the last ``k`` axes of the moment (one, or more when the last
        axis is shorter than a block) are the blocked row.
    """

    codes: jax.Array
    scale: jax.Array


class PackedQuantizedArray(NamedTuple):
    """A moment leaf stored in 4 bits: two codes per byte, one scale per block.

    Attributes:
      codes: ``int8`` (signed map) or ``uint8`` (unsigned map) bytes, shaped like the moment
        with the first axis of its blocked row halved; within each block of ``B`` elements,
        byte ``j`` holds element ``j`` (low nibble) and element ``j + B/2`` (high nibble).
      scale: as in :class:`QuantizedArray`.
    """

    codes: jax.Array
    scale: jax.Array


class QuantizedState(NamedTuple):
    """State of :func:`quantized`.

    Attributes:
      count: int32 number of updates made (it seeds the unbiased rounding); saturates.
      inner: the wrapped transformation's state, each stored moment leaf replaced by a
        :class:`QuantizedArray` or :class:`PackedQuantizedArray`.
    """

    count: jax.Array
    inner: Any


def is_quantized(x: Any) -> bool:
    """Whether ``x`` is a moment stored by :func:`quantized` (a :class:`QuantizedArray` or
    :class:`PackedQuantizedArray`).

    It is the ``is_leaf`` that lets a tree map treat each stored moment as one node, as the
    parameter it stands for. ``optax.tree.map_params`` with an extra tree shaped like the
    parameters needs it, since a stored moment is two arrays (codes and scale) where the
    parameters have one::

        specs = optax.tree.map_params(tx, lambda x, spec: ..., state, param_specs,
                                      is_leaf=rmsjax.is_quantized)

    There ``x`` is the stored moment node (or a plain array, for the moments kept wide);
    its ``codes`` have the parameter's shape (8 bits) or the parameter's shape with the
    first axis of the blocked row halved (4 bits).
    """
    return isinstance(x, (QuantizedArray, PackedQuantizedArray))


_is_variable = _validation.is_flax_variable


def _value(x: Any) -> Any:
    if _is_partitioned(x):
        return x.value
    if not _is_variable(x):
        return x
    # Flax >= 0.12.x has Variable.get_value(); older ones (0.12.0, the tested floor) only .value.
    return x.get_value() if hasattr(type(x), "get_value") else x.value


def _is_declared(x: Any) -> bool:
    return _moments.declared(x) is not None


def _is_partitioned(x: Any) -> bool:
    """A Flax Linen ``Partitioned`` box (``nn.with_partitioning`` / logical partitioning)."""
    meta = sys.modules.get("flax.core.meta")
    return meta is not None and isinstance(x, meta.Partitioned)


def _stop(x: Any) -> bool:
    return is_quantized(x) or _is_variable(x) or _is_partitioned(x)


def _like(x: Any, value: Any) -> Any:
    """``value`` in a Flax NNX Variable of ``x``'s type when ``x`` is one (state trees of
    ``nnx.State``), else ``value`` itself."""
    return x.replace(value=value) if _is_variable(x) else value


def _plain(q: Any) -> Any:
    """A quantized node with its codes and scale unwrapped from NNX Variables."""
    return type(q)(codes=_value(q.codes), scale=_value(q.scale))


def _wrapped(x: Any, q: Any) -> Any:
    """The quantized node ``q`` of the moment leaf ``x``: its codes and scale each wrapped
    like ``x`` (so that an ``nnx.State`` of Variables stays one). In a Flax Linen
    ``Partitioned`` box, the codes (shaped like the moment) keep its axis names; the scales
    keep the names of the axes before the blocked row and are replicated along it (whether a
    block fits in one shard of a sharded row is not known when the state is built
    abstractly, as ``nn.get_partition_spec`` does)."""
    if _is_variable(x):
        return type(q)(codes=_like(x, q.codes), scale=_like(x, q.scale))
    if _is_partitioned(x):
        layout = _layout_of(q)
        names = tuple(x.names)[: len(layout.lead)] + (None,) * layout.k
        return type(q)(codes=x.replace(value=q.codes), scale=x.replace(value=q.scale, names=names))
    return q


# --------------------------------------------------------------------------- validation


def _check_int(name: str, value: Any, allowed: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be {allowed}, got {value!r} of type {type(value).__name__}")
    return int(value)


def _check_arguments(inner: Any, bits: Any, block_size: Any, min_size: Any) -> tuple[int, int, int]:
    _validation.check_transformation("inner", inner, "quantized")
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
    """Static description of how one moment leaf is blocked."""

    shape: tuple[int, ...]  # the moment's shape
    k: int  # trailing axes that form the blocked row
    block: int  # elements per block
    bits: int

    @property
    def lead(self) -> tuple[int, ...]:
        return self.shape[: len(self.shape) - self.k]

    @property
    def n_blocks(self) -> int:
        return int(np.prod(self.shape[len(self.shape) - self.k :], dtype=np.int64)) // self.block

    def blocked(self) -> tuple[int, ...]:
        return (*self.lead, self.n_blocks, self.block)

    def scale_shape(self) -> tuple[int, ...]:
        return (*self.lead, self.n_blocks, *(1,) * (self.k - 1))

    def code_shape(self) -> tuple[int, ...]:
        if self.bits == 8:
            return self.shape
        axis = len(self.lead)
        return (*self.shape[:axis], self.shape[axis] // 2, *self.shape[axis + 1 :])

    def blocked_codes(self) -> tuple[int, ...]:
        return (*self.lead, self.n_blocks, self.block if self.bits == 8 else self.block // 2)


def _layout_of(q: QuantizedArray | PackedQuantizedArray) -> _Layout:
    bits = 4 if isinstance(q, PackedQuantizedArray) else 8
    return _layout_from(tuple(q.codes.shape), tuple(q.scale.shape), bits)


def _layout_from(codes: tuple[int, ...], scale: tuple[int, ...], bits: int) -> _Layout:
    """The layout that stored codes and scales of these shapes have: the fewest trailing axes
    that fit (:func:`_plan` only picks layouts that read back as themselves)."""
    rank = len(codes)
    for k in range(1, rank + 1):
        lead = rank - k
        if scale[:lead] != codes[:lead] or any(n != 1 for n in scale[lead + 1 :]):
            continue
        shape = codes if bits == 8 else (*codes[:lead], 2 * codes[lead], *codes[lead + 1 :])
        row = int(np.prod(shape[lead:], dtype=np.int64))
        if row % scale[lead] == 0 and row // scale[lead] >= 2:
            return _Layout(shape, k, row // scale[lead], bits)
    raise ValueError(f"codes of shape {codes} do not fit scales of shape {scale}")


def _divisors(n: int, limit: int, *, even: bool) -> list[int]:
    """Divisors of ``n`` up to ``limit`` (even ones only when ``even``), largest first."""
    return [d for d in range(min(n, limit), 0, -1) if n % d == 0 and (d % 2 == 0 or not even)]


def _reads_back(layout: _Layout) -> bool:
    """Whether the codes and scales of ``layout`` are read back as ``layout``. At 4 bits a
    blocked row of two or more axes whose block is twice its last axis is not: a (514, 16)
    moment in blocks of 32 stores codes (257, 16) and scales (257, 1), the shapes of a
    (257, 32) moment in blocks of 32 along its last axis."""
    try:
        return _layout_from(layout.code_shape(), layout.scale_shape(), layout.bits) == layout
    except ValueError:
        return False


def _shard_shape(leaf: Any, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of one shard of ``leaf``: blocks must stay inside one shard, so they divide
    the per-shard length of the blocked row.

    Eager ``init`` reads the sharding of the array (the state leaf lives where its parameter
    lives). Under tracing (``jax.jit``, ``jax.eval_shape``) only a mesh with explicit axes
    puts the sharding in the traced value's type; with automatic axes the sharding is not
    known yet and the whole shape is taken (docs/low_bit.md, *Sharding rule*)."""
    if isinstance(leaf, jax.core.Tracer):
        sharding = getattr(jax.typeof(leaf), "sharding", None)
    else:
        sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        return shape
    try:
        return tuple(int(n) for n in sharding.shard_shape(shape))
    except Exception:  # noqa: BLE001 - an exotic sharding: assume unsharded
        return shape


def _explicitly_sharded(leaf: Any) -> bool:
    """Whether ``leaf`` is split along a mesh axis of type Explicit (its sharding is then part
    of its type, and jax checks each reshape of it against that type)."""
    sharding = getattr(jax.typeof(leaf), "sharding", None) if isinstance(leaf, jax.core.Tracer) \
        else getattr(leaf, "sharding", None)
    mesh, spec = getattr(sharding, "mesh", None), getattr(sharding, "spec", None)
    if mesh is None or spec is None:
        return False
    explicit = {name for name, kind in zip(mesh.axis_names, getattr(mesh, "axis_types", ()), strict=False)
                if kind == jax.sharding.AxisType.Explicit}
    used = {a for entry in spec if entry is not None
            for a in (entry if isinstance(entry, tuple) else (entry,))}
    return bool(used & explicit)


def _plan(leaf: Any, bits: int, block_size: int, min_size: int) -> _Layout | None:
    """The layout of a declared moment leaf stored quantized, or None to keep it as it is."""
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        return None
    dtype = jnp.dtype(leaf.dtype)
    if not jnp.issubdtype(dtype, jnp.floating) or leaf.ndim == 0 or leaf.size < max(min_size, 1):
        return None
    shape = tuple(int(n) for n in leaf.shape)
    # The blocked row: the last axis, or the last axes when the last is too short for a block
    # (a (n, 1) head, the (n, 2) real view of a complex moment).
    k = 1
    while k < len(shape) and int(np.prod(shape[-k:])) < max(block_size // _MIN_BLOCK_FRACTION, 2):
        k += 1
    local = _shard_shape(leaf, shape)
    if k > 1 and local[len(shape) - k :] != shape[len(shape) - k :]:
        # A row of several axes, sharded. Along a trailing axis a block would not be contiguous
        # in a shard; along its first axis, reshaping the sharded moment into blocks is not a
        # reshape jax can shard by itself (eager init failed there), and at 4 bits the halved
        # axis may not split like the parameter's.
        return None
    if k > 1 and local != shape and _explicitly_sharded(leaf):
        # A row of several axes of a leaf split along a leading axis, on a mesh with Explicit
        # axes: jax's sharding rule for reshape refuses to merge the row's axes into blocks
        # ((64, 16, 8) split along its first axis, to (64, 1, 128)), and init raised.
        return None
    row_local = int(np.prod(local[len(shape) - k :], dtype=np.int64))
    if bits == 4 and shape[len(shape) - k] % 2:
        return None  # the packed axis must halve
    for block in _divisors(row_local, block_size, even=bits == 4):
        if block < row_local and block * _MIN_BLOCK_FRACTION < block_size:
            return None  # too small a block (and the rest are smaller)
        # Never more bytes than the moment itself: codes plus one scale (moment dtype) per block.
        if bits / 8 + dtype.itemsize / block >= dtype.itemsize:
            return None
        layout = _Layout(shape, k, block, bits)
        if _reads_back(layout):
            return layout
    return None


# --------------------------------------------------------------------------- leaf codec


def _compute_dtype(dtype: Any) -> Any:
    """float32, or float64 for float64 moments (never narrower than float32)."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype).itemsize > 4 else jnp.dtype(jnp.float32)


def _signed(q: QuantizedArray | PackedQuantizedArray) -> bool:
    return jnp.dtype(q.codes.dtype) == jnp.dtype(jnp.int8)


def dequantize(q: QuantizedArray | PackedQuantizedArray) -> jax.Array:
    """Decode a quantized moment leaf to an array of its original shape and dtype.

    Args:
      q: a :class:`QuantizedArray` or :class:`PackedQuantizedArray`.

    Returns:
      The decoded moment, in the scale's dtype (the moment's own dtype).
    """
    return _dequantize(q)


def _dequantize(q: QuantizedArray | PackedQuantizedArray, *, fuse: bool = True) -> jax.Array:
    """:func:`dequantize`; ``fuse``: how 4-bit codes are unpacked (:func:`_codec.levels_of`)."""
    layout = _layout_of(q)
    dtype = q.scale.dtype
    ct = _compute_dtype(dtype)
    if layout.bits == 8:  # elementwise in the moment's own shape, the scales spread over it
        level = _codec.levels_of(q.codes, 8, _signed(q), ct)
        return _codec.decode(level, _spread(q.scale.astype(ct), layout), 8, _signed(q)).astype(dtype)
    codes = q.codes.reshape(layout.blocked_codes())
    level = _codec.levels_of(codes, layout.bits, _signed(q), ct, fuse=fuse)
    scale = q.scale.astype(ct).reshape(layout.blocked()[:-1])[..., None]
    value = _codec.decode(level, scale, layout.bits, _signed(q))
    return value.reshape(layout.shape).astype(dtype)


def _spread(scale: jax.Array, layout: _Layout) -> jax.Array:
    """Each block's scale at each of its elements, in the moment's shape. (XLA:CPU runs an
    elementwise loop several times slower when its output is a reshape of the shape it
    computes in, so 8-bit codes are decoded and encoded in the moment's own shape.)"""
    blocks = scale.reshape(layout.blocked()[:-1])[..., None]
    return jnp.broadcast_to(blocks, layout.blocked()).reshape(layout.shape)


def _spread_over_halves(scale: jax.Array, layout: _Layout) -> jax.Array:
    """Each block's scale at each element of a half of its block, in :func:`_half_shape` (at 4
    bits, each byte of its packed codes, in the codes' shape)."""
    blocks = scale.reshape(layout.blocked()[:-1])[..., None]
    return jnp.broadcast_to(blocks, (*layout.blocked()[:-1], layout.block // 2)).reshape(_half_shape(layout))


def _decoded_max(q: QuantizedArray, layout: _Layout) -> jax.Array:
    """Largest finite decoded magnitude of each block of a stored 8-bit moment, from its codes."""
    signed = _signed(q)
    top = _codec.largest_level(q.codes.reshape(layout.blocked_codes()), signed)
    ct = _compute_dtype(q.scale.dtype)
    return _codec.decode(top.astype(ct), q.scale.astype(ct).reshape(top.shape), 8, signed)


def _new_scale(x: jax.Array, layout: _Layout, *, old_scale: jax.Array | None = None,
               bound: jax.Array | None = None, keep: jax.Array | None = None) -> jax.Array:
    """Each block's scale for encoding ``x`` (shaped ``layout.blocked()[:-1]``, in ``x``'s
    dtype). ``old_scale``: the scales stored at the previous step (kept where they still
    fit). ``bound``: an upper bound on each block's largest finite magnitude; the scales then
    come from it instead of from a reduction over ``x``. ``keep``: where false, the element is
    left out of its block's exact scale (it saturates)."""
    ct = _compute_dtype(x.dtype)
    old = None if old_scale is None else old_scale.reshape(layout.blocked()[:-1])
    if bound is None:
        return _codec.block_scale(x.astype(ct), old, x.dtype, keep=keep, blocked=layout.blocked())
    return _codec.bound_scale(bound.astype(ct), old, x.dtype)


def _encode(x: jax.Array, layout: _Layout, signed: bool, count: jax.Array | None, leaf_id: int | jax.Array, *,
            nearest: bool = False, scale: jax.Array | None = None,
            halves: _halves.Pair | None = None) -> QuantizedArray | PackedQuantizedArray:
    """Encode ``x`` (the moment's shape and dtype) with ``layout``; ``count=None`` or
    ``nearest``: round to nearest. ``scale``: each block's scale (:func:`_new_scale`), else
    the exact scales of ``x``. ``halves`` (4 bits): ``x`` as the low and high halves of its
    blocks (:func:`_halves.split`), computed element by element from the old codes; the codes
    are then packed from them (the same bytes), so that XLA writes them in place."""
    dtype = x.dtype
    ct = _compute_dtype(dtype)
    wide = x.astype(ct)
    blocked = wide.reshape(layout.blocked())
    if scale is None:
        scale = _new_scale(x, layout)
    # The inverse is taken on the blocks and then spread over their elements: dividing the
    # spread scale made XLA:CPU divide once per element (8-bit Adam's step 73 ms against
    # 56 ms at 4096 x 4096, one process).
    powers_of_two = jnp.dtype(scale.dtype) != jnp.dtype(jnp.float16)  # float16 clamps at 65504
    inverse = _codec.inverse_scale(scale.astype(ct), by_bits=layout.bits == 4 and powers_of_two)
    if layout.bits == 8:  # the uniform numbers depend on the row-major index only: same in both shapes
        u = None if (nearest or count is None) else _codec.uniform(layout.shape, count, leaf_id)
        level = _codec.encode(wide, _spread(inverse, layout), u, 8, signed)
        codes = _codec.to_bytes(level, signed)
        return QuantizedArray(codes=codes, scale=scale.reshape(layout.scale_shape()))
    scale = scale.reshape(layout.scale_shape())
    if halves is not None:
        # The rounding noise is drawn in the codes' shape: cutting the blocks' noise in halves
        # made XLA:CPU's step 2.5x slower.
        noise = (None, None) if nearest or count is None else tuple(
            _codec.uniform_at(_codec.half_indices(layout.code_shape(), layout.block // 2, high),
                              count, leaf_id)
            for high in (False, True))
        spread = _spread_over_halves(inverse, layout)
        low, high = (_codec.encode(h.astype(ct), spread, n, layout.bits, signed)
                     for h, n in zip(halves, noise, strict=True))
        codes = _codec.pack_halves(low, high, signed)
        return PackedQuantizedArray(codes=codes, scale=scale)
    u = None if (nearest or count is None) else _codec.uniform(layout.blocked(), count, leaf_id)
    level = _codec.encode(blocked, inverse[..., None], u, layout.bits, signed)
    codes = _codec.pack(level, signed).reshape(layout.code_shape())
    return PackedQuantizedArray(codes=codes, scale=scale)


@functools.partial(jax.jit, static_argnames=("layout", "signed", "nearest"))
def _initial_codes(x: jax.Array, leaf_id: jax.Array, *, layout: _Layout, signed: bool,
                   nearest: bool) -> QuantizedArray | PackedQuantizedArray:
    """:func:`_encode` of an initial moment (step 0), compiled once per layout: an eager
    ``init`` ran the codec one operation at a time, and each new leaf shape compiled each of
    them anew (about 1.7 s per leaf shape on a 2-core CPU; a dozen shapes took 20 s). The
    leaf's number is an argument, so leaves of one shape share the program; the codes are
    the same bits as the operation-by-operation ones."""
    return _encode(x, layout, signed, jnp.int32(0), leaf_id, nearest=nearest)


def _saturates(dtype: Any) -> bool:
    """Whether a second moment stored in ``dtype`` stops at its largest finite value where
    its square overflows (a 16-bit state, :func:`rmsjax.averages._saturate`) instead of
    becoming ``inf``."""
    return jnp.dtype(dtype).itemsize < _compute_dtype(dtype).itemsize


def _overflow_is_infinite(q: QuantizedArray, moment: _moments.Moment, divisor: _moments.Moment | None,
                          d: Any) -> bool:
    """Whether an element whose gradient squared overflows gets a non-finite new moment, or
    a non-finite divisor (hence no finite step), so that :func:`_bound` may leave it out.

    True for a second moment stored in its compute dtype, and for a moment divided by one;
    not for a 16-bit state (it saturates, finite) nor for a divisor of order 1 (Keras's
    Adamax divides by a running maximum of ``|g|``, which stays finite)."""
    if moment.order == 2 and not _saturates(q.scale.dtype):
        return True
    return (divisor is not None and divisor.order == 2 and d is not None
            and not _saturates(jnp.asarray(d).dtype))


def _bound(q: QuantizedArray, layout: _Layout, moment: _moments.Moment, x: jax.Array,
           first: QuantizedArray | None = None, *, overflow_is_infinite: bool) -> jax.Array:
    """The declared rule's bound (:func:`rmsjax._moments.bound`) on each block's largest
    finite magnitude of the new 8-bit moment; ``first``: the stored first moment of a
    centred one, before the step; ``overflow_is_infinite``: :func:`_overflow_is_infinite`."""
    ct = _compute_dtype(q.scale.dtype)
    m_old = _decoded_max(q, layout)
    m_first = None if first is None else _decoded_max(first, layout)
    # Where an overflowing gradient squared makes the new moment, or the second moment it is
    # divided by, +inf (then its step is 0), those elements are left out of the bound. A
    # second moment's input term is the square of that same first-order term (at most 4x
    # the block's largest finite x**2, where a pass over x**2 itself gives at most 2x): the
    # computation is then the same for Adam's two moments, and XLA makes one exponent pass
    # over the gradient for both instead of two (8-bit Adam on XLA:CPU: 1 B/param less peak,
    # a step about 15 % faster).
    m_x = _codec.finite_absmax(x, ct, square_finite=overflow_is_infinite, blocked=layout.blocked())
    return _moments.bound(moment, m_old, m_x, m_first)


# --------------------------------------------------------------------------- state walks


def _entry(state: Any) -> Any:
    """The declared state that receives the gradient given to the whole state's
    transformation (through chains, absent optional parts and declared wrappers such as
    ``optax.inject_hyperparams``), or None."""
    node = _moments.input_path(state)
    return node if _is_declared(node) else None


def _centered_pairs(node: Any) -> dict[str, str]:
    decl = _moments.declared(node) or {}
    return {name: m.centered for name, m in decl.items() if m.centered is not None}


def _variance(nu: jax.Array, mu: Any) -> jax.Array:
    """What a centred second moment is stored as: ``max(nu - |mu|**2, 0)``, in ``nu``'s dtype."""
    ct = _compute_dtype(nu.dtype)
    return jnp.maximum(nu.astype(ct) - _sq(mu), jnp.zeros((), ct)).astype(nu.dtype)


def _sq(m: Any) -> jax.Array:
    m = jnp.asarray(_value(m))
    ct = _compute_dtype(averages.real_dtype(m.dtype))
    if jnp.iscomplexobj(m):
        return (jnp.square(m.real) + jnp.square(m.imag)).astype(ct)
    return jnp.square(m.astype(ct))


Decoder = Any  # (stored quantized node, fuse) -> its decoded array


def _decode(x: Any, fuse: bool) -> jax.Array:
    return _dequantize(_plain(x), fuse=fuse)


def _decoded(x: Any, decode: Decoder, *, fuse: bool = True) -> Any:
    return _like(x.codes, decode(x, fuse)) if is_quantized(x) else x


def _decode_node(node: Any, decode: Decoder = _decode) -> Any:
    """A declared state node with its quantized moments decoded (by ``decode``), centred ones
    back to ``nu``."""
    decl = _moments.declared(node) or {}
    pairs = _centered_pairs(node)
    # A first moment that a centred second moment's encode reads too is unpacked so that
    # XLA writes out bytes, not float32 levels (see _codec.levels_of).
    read_by_another = set(pairs.values())
    fields = {}
    for name in decl:
        fuse = name not in read_by_another
        fields[name] = jax.tree.map(lambda x, fuse=fuse: _decoded(x, decode, fuse=fuse), getattr(node, name),
                                    is_leaf=_stop)
    for name, first in pairs.items():
        stored = getattr(node, name)

        def back(s: Any, v: Any, m: Any) -> Any:
            if not is_quantized(s):
                return v
            a = _value(v)
            ct = _compute_dtype(a.dtype)
            return _like(v, (a.astype(ct) + _sq(m)).astype(a.dtype))

        fields[name] = jax.tree.map(back, stored, fields[name], fields[first], is_leaf=_stop)
    return node._replace(**fields)


def dequantize_state(tree: Any) -> Any:
    """Replace every quantized moment in ``tree`` by its decoded array (for reading a state).

    ``rmsjax.effective_learning_rate`` calls this, so it reads through :func:`quantized`; a
    centred second moment (stored as the variance) is given back as ``nu``. Leaves that are
    not quantized are returned as they are.
    """
    return _decode_state(tree, _decode)


def _decode_state(tree: Any, decode: Decoder) -> Any:
    return jax.tree.map(lambda n: _decode_node(n, decode) if _is_declared(n) else n, tree,
                        is_leaf=_is_declared)


class _OnHalves:
    """The wrapped update traced to a jaxpr, to compute new moments again from their old
    codes (:mod:`rmsjax._halves`): each new 4-bit moment on the two halves of its blocks, from
    the two nibbles of its old codes, and the computations of its own that
    :func:`_separate_computations` gives a moment at either width."""

    def __init__(self, inner: optax.GradientTransformation, updates: Any, stored: Any, params: Any,
                 extra_args: dict[str, Any]):
        # Each stored node's decoded value, keyed by the node's identity: the nodes are held by
        # ``stored`` for the whole call, so no two share an id.
        decoded: dict[int, tuple[Any, jax.Array]] = {}

        def remember(x: Any, fuse: bool) -> jax.Array:
            value = _decode(x, fuse)
            decoded[id(x)] = (_plain(x), value)
            return value

        _decode_state(stored, remember)
        keys = list(decoded)

        def update(updates: Any, params: Any, values: list[jax.Array]) -> Any:
            table = dict(zip(keys, values, strict=True))
            state = _decode_state(stored, lambda x, fuse: table[id(x)])
            return inner.update(updates, state, params, **extra_args)

        self.closed, out_tree, self.args = _halves.traced(
            update, updates, params, [decoded[k][1] for k in keys])
        first = len(self.args) - len(keys)  # the decoded moments are the last arguments
        self.stored = {first + i: decoded[k][0] for i, k in enumerate(keys)}
        # The stored moments of each layout (found once: each moment's computation is given
        # those of its own layout, and asking every moment for its layout at each of them made
        # lowering a 300-leaf update quadratic).
        self.by_layout: dict[_Layout, dict[int, Any]] = {}
        for i, q in self.stored.items():
            self.by_layout.setdefault(_layout_of(q), {})[i] = q
        # The update's output tree (updates, new state) with each leaf's output index.
        self.index = jax.tree.unflatten(out_tree, range(out_tree.num_leaves))
        self.memo = _halves.Memo()

    @functools.cached_property
    def _read_by_updates(self) -> set[Any]:
        """The jaxpr's variables that the output updates are computed from (found once)."""
        jaxpr = self.closed.jaxpr
        return _halves.ancestors(jaxpr, [jaxpr.outvars[i] for i in jax.tree.leaves(self.index[0])])

    @functools.cached_property
    def _costly(self) -> _halves.Costly:
        jaxpr = self.closed.jaxpr
        return _halves.Costly(jaxpr, {jaxpr.invars[i] for i in self.stored})

    def feeds_updates(self, output: int) -> bool:
        """Whether the update's output updates are computed from output ``output``."""
        v = self.closed.jaxpr.outvars[output]
        return not isinstance(v, jex.Literal) and v in self._read_by_updates

    def shares_costly(self, output: int) -> bool:
        """Whether output ``output`` feeds the updates and is computed through an operation
        that XLA will not repeat in two loops (a square root, a division) on a value that
        depends on a stored moment: XLA then writes that value out for the parameter loop and
        the reduction over the new moment to share, unless the reduction computes its own copy
        (:func:`_decoded_halves` with ``separate``)."""
        return self.feeds_updates(output) and self._costly(self.closed.jaxpr.outvars[output])

    def halves(self, output: int, layout: _Layout, dtype: Any, *,
               separate: bool = False) -> _halves.Pair | None:
        """The halves of the blocks of output ``output`` (a new moment stored with ``layout``
        in ``dtype``), or None when they cannot be computed element by element. Each half is
        in the shape of the moment with its blocked axis halved (the packed codes' shape at 4
        bits). ``separate`` (4 bits; ignored at 8): decoded so that XLA cannot merge them with
        the halves computed without it (:func:`_decoded_halves`)."""
        given = {i: functools.partial(_decoded_halves, q, layout, separate=separate)
                 for i, q in self.by_layout.get(layout, {}).items()}
        pair = _halves.halves(self.closed, self.args, [output], layout.blocked(), _half_shape(layout),
                              given, set(self.stored), self.memo)[0]
        return None if pair is None else (pair[0].astype(dtype), pair[1].astype(dtype))

    def separate_whole(self, output: int, layout: _Layout, dtype: Any) -> jax.Array | None:
        """Output ``output`` (a new 8-bit moment stored with ``layout``, in ``dtype``) computed
        again, whole, from the stored 8-bit moments of its layout decoded by other operations
        than :func:`dequantize`'s (the same values), so that XLA cannot merge it with the
        update's own computation; None when it cannot be computed element by element."""
        given = {i: functools.partial(_decoded_separately, q, layout)
                 for i, q in self.by_layout.get(layout, {}).items()}
        pieces = _halves.halves(self.closed, self.args, [output], layout.blocked(), None,
                                given, set(self.stored), self.memo)[0]
        return None if pieces is None else pieces[0].astype(dtype)


def _decoded_halves(q: QuantizedArray | PackedQuantizedArray, layout: _Layout, *,
                    separate: bool = False) -> _halves.Pair:
    """The decoded low and high halves of each block of a stored moment (the same values as
    :func:`dequantize`'s, cut with :func:`_halves.split`): at 4 bits read from its nibbles in
    the codes' own shape, at 8 bits sliced from its codes.

    ``separate`` (4 bits): the nibbles are taken in 32-bit lanes instead of bytes, the same
    values by other operations, so that XLA computes what depends on them as a computation of
    its own, not merged with the one on the plain halves: a reduction over the new moment then
    repeats its square roots and divisions instead of reading a float32 copy written out for
    the parameter loop (4-bit RMSprop with momentum compiled in place: 13.09 -> 9.16 B/param)."""
    ct = _compute_dtype(q.scale.dtype)
    if layout.bits == 8:
        shape = _half_shape(layout)
        spread = _spread_over_halves(q.scale.astype(ct), layout)
        return tuple(_codec.decode(c.astype(ct), spread, 8, _signed(q)).astype(q.scale.dtype)
                     for c in _halves.split(q.codes, layout.blocked(), shape))  # pyright: ignore[reportReturnType]
    scale = _spread_over_halves(q.scale.astype(ct), layout)

    def half(high: bool) -> jax.Array:
        level = _codec.half_levels(q.codes, high, _signed(q), ct, wide=separate)
        return _codec.decode(level, scale, layout.bits, _signed(q)).astype(q.scale.dtype)

    return half(False), half(True)


def _separate_computations(on_halves: _OnHalves, output: int, layout: _Layout,
                           dtype: Any) -> tuple[_halves.Pair | None, jax.Array | None]:
    """Computations of the new moment (update output ``output``) of its own for the reduction
    of its block maxima and, at 8 bits, for its encode, where they save XLA a full-size float32
    copy of a value several loops would otherwise share: (the halves to reduce the maxima
    over, or None to reduce the new moment itself; the value to encode, or None for the new
    moment itself).

    * 8 bits, a moment the step does not read (AdaDelta's ``nu_delta``): the reduction and the
      encode would share the whole new moment; reduced over halves, each computes its own.
    * A moment the step reads that comes through a square root or a division of a stored
      moment (a momentum buffer after ``g / (sqrt(nu') + eps)``): the parameter loop, the
      reduction and the encode would share that quotient. The reduction gets halves of its
      own; at 4 bits the encode already runs on halves, so the reduction's are decoded apart
      (``separate``); at 8 bits the encode gets a whole computation of its own.
    """
    if layout.block % 2 or layout.shape[len(layout.lead)] % 2:  # no halves in _half_shape
        return None, None
    reads = on_halves.feeds_updates(output)
    if layout.bits == 8 and not reads:
        return on_halves.halves(output, layout, dtype), None
    if not (reads and on_halves.shares_costly(output)):
        return None, None
    if layout.bits == 4:
        return on_halves.halves(output, layout, dtype, separate=True), None
    whole = on_halves.separate_whole(output, layout, dtype)
    return (None, None) if whole is None else (on_halves.halves(output, layout, dtype), whole)


def _new_scale_of_halves(pair: _halves.Pair, layout: _Layout, old_scale: jax.Array) -> jax.Array:
    """:func:`_new_scale` of a new moment given as the halves of its blocks (each in
    :func:`_half_shape`)."""
    ct = _compute_dtype(pair[0].dtype)
    old = old_scale.reshape(layout.blocked()[:-1])
    return _codec.halves_scale(pair[0].astype(ct), pair[1].astype(ct), old, pair[0].dtype,
                               (*layout.blocked()[:-1], layout.block // 2))


def _decoded_separately(q: QuantizedArray, layout: _Layout) -> tuple[jax.Array]:
    """A stored 8-bit moment decoded whole (the values of :func:`dequantize`), its codes
    widened to 32-bit integers before they become floats: other operations than
    :func:`dequantize`'s, which XLA does not merge with them (:meth:`_OnHalves.separate_whole`)."""
    ct = _compute_dtype(q.scale.dtype)
    level = q.codes.astype(jnp.int32).astype(ct)
    return (_codec.decode(level, _spread(q.scale.astype(ct), layout), 8, _signed(q)).astype(q.scale.dtype),)


def _needs_second_trace(stored: Any, bits: int) -> bool:
    """Whether some moment stored in low bits may be computed again from the update's jaxpr
    (:class:`_OnHalves`), which costs a second trace of the wrapped update: every 4-bit moment
    (its encode runs on halves); at 8 bits, only a moment whose rule is not declared (AdaDelta's
    ``nu_delta``, whose maxima :func:`_separate_computations` reduces over halves) or one in a
    state after the first that declares moments (a momentum buffer fed by ``g / (sqrt(nu') +
    eps)``). The other 8-bit moments never get a computation of their own, and tracing again
    for them doubled the time to lower a 300-leaf clipped AdamW (9.7 -> 18.2 s)."""
    nodes = [n for n in jax.tree.leaves(stored, is_leaf=_is_declared) if _is_declared(n)]
    for position, node in enumerate(nodes):
        for name, moment in (_moments.declared(node) or {}).items():
            if not any(is_quantized(x) for x in jax.tree.leaves(getattr(node, name), is_leaf=_stop)):
                continue
            if bits == 4 or moment.rule is None or position > 0:
                return True
    return False


def _half_shape(layout: _Layout) -> tuple[int, ...]:
    """The shape each half of a block is computed in (:meth:`_OnHalves.halves`)."""
    axis = len(layout.lead)
    return (*layout.shape[:axis], layout.shape[axis] // 2, *layout.shape[axis + 1 :])


def _increment(count: jax.Array) -> jax.Array:
    return averages.increment_count(count)


# --------------------------------------------------------------------------- the wrapper


def quantized(
    inner: optax.GradientTransformation,
    *,
    bits: int = 8,
    block_size: int | None = None,
    min_size: int = 4096,
) -> optax.GradientTransformation:
    r"""Store the declared moments of ``inner``'s state in 8 or 4 bits: codes plus block scales.

    The wrapped update is unchanged; only storage changes. At each step, for every stored
    moment :math:`s` (codes :math:`c`, block scales :math:`a`):

    .. math::

       \tilde s = \operatorname{decode}(c)\, a, \qquad
       (u, s') = \texttt{inner.update}(g, \tilde s), \qquad
       a' \ge \max_{\text{block}} |s'|, \qquad
       c' = \operatorname{round}(\operatorname{decode}^{-1}(s' / a'))

    where :math:`\operatorname{decode}` is a non-linear map dense near zero (signed for first
    moments, unsigned and zero-free for second moments), :math:`a'` a power of two (from a
    bound at 8 bits where the moment's rule gives one, else from the block's maximum) and
    :math:`\operatorname{round}` unbiased stochastic rounding driven by a hash of (leaf,
    element, step). All arithmetic runs in float32, or in the moment's dtype when wider.

    Which leaves are stored in low bits: the moments that the state types of ``inner``
    declare (``nu``, ``mu``, ``nu_max``, ``nu_delta`` and momentum buffers of rmsjax's own
    and ``rmsjax.compat``'s states; ``mu``/``nu``/``nu_max`` of ``optax.ScaleByAdamState``
    and ``optax.ScaleByAmsgradState``, ``nu`` of ``optax.ScaleByRmsState``,
    ``sum_of_squares`` of ``optax.ScaleByRssState``, ``trace`` of ``optax.TraceState``),
    real floating-point, with at least ``min_size`` elements. Everything else keeps its
    dtype: counters, learning rates, Keras's EMA of the parameters, gradient accumulators,
    complex moments, and any state type that declares no moments.

    Non-finite values stay in their element: an ``inf`` or ``NaN`` moment element is stored
    with a reserved code and left out of its block's scale (a signed moment stores any
    non-finite value as NaN; a non-negative one keeps +inf, and NaN at 8 bits; at 4 bits a
    NaN second moment is stored as +inf).

    Blocking: blocks run along the last axis of the moment (along its last axes, flattened,
    when the last is shorter than a block). The block is the largest divisor of that row's
    length not above ``block_size`` (even for 4 bits), so no padding is stored; when ``init``
    runs eagerly on sharded parameters, or traced on a mesh with explicit axes, the per-shard
    length is used, so that a block never crosses a shard boundary (with automatic axes under
    ``jax.jit``, pass a ``block_size`` that divides it). A leaf whose row has no divisor of at
    least ``block_size / 4``, or that would take as many bytes as it does now, stays in full
    precision (docs/low_bit.md lists the other cases).

    On CPU, compile the donated train step in place, ``jax.jit(step, donate_argnums=(0, 1),
    compiler_options={"xla_cpu_copy_insertion_use_region_analysis": True})``: XLA:CPU then
    overwrites the codes instead of copying them first (Adam's step: 10.10 B/param at its peak
    against 11.10 at 8 bits, 9.13 against 10.16 at 4; docs/low_bit.md, *In place on CPU*). At 4
    bits each new moment is recomputed on the two halves of its blocks from the old codes'
    two nibbles (``rmsjax._halves``), so that the new bytes can overwrite the old ones; where
    several loops would share a full-size float32 value (a momentum buffer's
    ``g / (sqrt(nu') + eps)``, AdaDelta's new ``nu_delta`` at 8 bits), each gets a computation
    of its own from the codes (docs/low_bit.md, *Nothing full-size shared between loops*).
    On a CPU with AVX-512, add ``"xla_cpu_prefer_vector_width": 512`` to those options: the
    low-bit step is arithmetic there, and 512-bit vectors make it 12-32 % faster
    (docs/low_bit.md, *Speed*).

    Args:
      inner: the transformation whose state is stored in low precision (any rmsjax
        optimizer or transformation, ``rmsjax.compat`` ones included, or an optax chain).
      bits: 8 (one code per byte) or 4 (two codes per byte).
      block_size: elements per block, an even integer; ``None`` means 256 for 8 bits and 128
        for 4 bits.
      min_size: moments with fewer elements than this stay in full precision.

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
      (dtype('int8'), (64, 256), (64, 1), dtype('float32'))
      >>> updates, state = tx.update({"w": jnp.ones((64, 256)), "b": jnp.ones(256)}, state, params)
      >>> round(float(updates["w"][0, 0]), 6)
      -0.001
    """
    bits, block, minimum = _check_arguments(inner, bits, block_size, min_size)
    return _wrap(inner, bits, block, minimum, nearest=False)


def _check_stored(q: QuantizedArray | PackedQuantizedArray, moment: _moments.Moment) -> None:
    """A stored moment must have the codes its declaration gets (int8 for a signed moment,
    uint8 for a non-negative one): a state restored from another checkpoint could otherwise
    be decoded with the other map and silently give wrong moments."""
    want = jnp.dtype(jnp.int8 if moment.signed else jnp.uint8)
    if jnp.dtype(q.codes.dtype) != want:
        kind = "signed" if moment.signed else "non-negative"
        raise ValueError(
            f"quantized: a {kind} moment is stored with {jnp.dtype(q.codes.dtype)} codes, not "
            f"{want}: was this state restored from a checkpoint of another optimizer or wrapper?"
        )


def _wrap(inner: optax.GradientTransformation, bits: int, block: int, minimum: int, *,
          nearest: bool) -> optax.GradientTransformation:
    """:func:`quantized` without validation; ``nearest=True`` rounds to nearest (for tests)."""

    def init_fn(params: Any) -> QuantizedState:
        state = inner.init(params)
        if any(is_quantized(x) for x in jax.tree.leaves(state, is_leaf=_stop)):
            raise ValueError(
                "quantized: the inner transformation's state already holds quantized moments "
                "(quantized(quantized(...))): wrap the optimizer once, with the bits you want"
            )
        ids = iter(range(1 << 30))

        def node(n: Any) -> Any:
            decl = _moments.declared(n) or {}
            centered = _centered_pairs(n)
            fields: dict[str, Any] = {}
            for name, moment in decl.items():
                first = getattr(n, centered[name]) if name in centered else None

                def leaf(x: Any, m: Any = None, moment: _moments.Moment = moment,
                         centered: bool = name in centered) -> Any:
                    value = _value(x)
                    layout = _plan(value, bits, block, minimum)
                    if layout is None:
                        return x
                    value = jnp.asarray(value)
                    if centered:  # stored as the variance nu - |mu|**2
                        value = _variance(value, m)
                    return _wrapped(x, _initial_codes(value, jnp.uint32(next(ids)), layout=layout,
                                                      signed=moment.signed, nearest=nearest))

                if first is None:
                    fields[name] = jax.tree.map(leaf, getattr(n, name), is_leaf=_stop)
                else:
                    fields[name] = jax.tree.map(leaf, getattr(n, name), first, is_leaf=_stop)
            return n._replace(**fields)

        inner_state = jax.tree.map(lambda n: node(n) if _is_declared(n) else n, state, is_leaf=_is_declared)
        return QuantizedState(count=averages.replicated_like(jnp.zeros([], jnp.int32), params),
                              inner=inner_state)

    def update_fn(updates: Any, state: QuantizedState, params: Any = None, **extra_args: Any):
        _validation.check_state_type(state, QuantizedState, "quantized")
        stored = state.inner
        traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((updates, stored)))
        entry = _entry(stored)
        on_halves = _OnHalves(inner, updates, stored, params, extra_args) \
            if traced and _ENCODE_ON_HALVES and _needs_second_trace(stored, bits) else None
        outputs = None if on_halves is None else on_halves.index[1]
        # Encoded on halves, a centred moment reads its first moment's nibbles itself, so every
        # moment is unpacked for the update the same way (see _codec.levels_of).
        decode = _decode if on_halves is None or bits == 8 else (lambda x, fuse: _decode(x, True))
        updates_out, new_inner = inner.update(updates, _decode_state(stored, decode), params, **extra_args)
        if _TRACE_NEW_STATE_AGAIN and traced:
            # Traced again, from copies XLA may not merge with the first trace: the loop that
            # writes the new parameters and the one that writes the new codes each compute
            # the moments they need from the stored codes and the gradient, instead of
            # sharing one full-size float32 copy of the new moments.
            updates, stored, params = jax.lax.optimization_barrier((updates, stored, params))
            _, new_inner = inner.update(updates, dequantize_state(stored), params, **extra_args)
        count = state.count + jnp.int32(1)
        ids = iter(range(1 << 30))
        # Each stored moment leaf's parameter (its position among the update's leaves), to
        # order the encodes of one parameter's moments (_Pending.encode).
        flat, treedef = jax.tree.flatten(updates)
        positions = jax.tree.unflatten(treedef, list(range(len(flat))))
        pending: list[_Pending] = []
        # Scales of a divisor's leaves (keyed by the stored leaf's id), reduced in one loop with
        # those of the moment divided by it (_encode_field), which computes the new divisor
        # anyway for its ``keep``.
        joint: dict[int, jax.Array] = {}

        stages = iter(range(1 << 30))

        def node(old: Any, new: Any, out: Any = None) -> Any:
            decl = _moments.declared(old) or {}
            stage = next(stages)
            fields = {}
            # In declaration order (it numbers the leaves, and so their rounding): a moment
            # declared before its divisor, as rmsjax's are, reduces the divisor's maxima with
            # its own (_encode_field); declared after it, each is reduced on its own.
            for name, moment in decl.items():
                olds, news = getattr(old, name), getattr(new, name)
                if not any(is_quantized(x) for x in jax.tree.leaves(olds, is_leaf=_stop)):
                    continue
                aux = {}
                if bits == 8 and old is entry and moment.rule is not None:
                    grads = _matching(olds, updates)
                    if grads is not None:
                        aux["g"] = grads
                        if moment.centered is not None:  # its bound needs the old first moment
                            aux["f"] = getattr(old, moment.centered)
                if moment.centered is not None:
                    aux["m"] = getattr(new, moment.centered)
                if moment.divided_by is not None:
                    aux["d"] = getattr(new, moment.divided_by)
                    aux["dq"] = getattr(old, moment.divided_by)
                where = _matching(olds, positions)
                if where is not None:
                    aux["i"] = where
                if out is not None:
                    index = _matching(olds, getattr(out, name))
                    if index is not None:
                        aux["o"] = index
                        if moment.centered is not None:
                            first = _matching(olds, getattr(out, moment.centered))
                            if first is None:
                                del aux["o"]
                            else:
                                aux["mo"] = first
                divisor = None if moment.divided_by is None else decl.get(moment.divided_by)
                fields[name] = _encode_field(olds, news, aux, moment, divisor, count, ids, stage)
            return new._replace(**fields)

        def _encode_field(olds: Any, news: Any, aux: dict[str, Any], moment: _moments.Moment,
                          divisor: _moments.Moment | None, count: jax.Array, ids: Any, stage: int) -> Any:
            names = list(aux)

            def leaf(q: Any, x: Any, *rest: Any) -> Any:
                if not is_quantized(q):
                    return x
                given = joint.pop(id(q), None)  # this leaf's scales, reduced with another's
                stored_divisor = rest[names.index("dq")] if "dq" in names else None
                extra = {k: _value(v) for k, v in zip(names, rest, strict=True)}
                q = _plain(q)
                _check_stored(q, moment)
                layout = _layout_of(q)
                value = jnp.asarray(_value(x)).astype(q.scale.dtype)
                m = extra.get("m")
                if m is not None:
                    value = _variance(value, m)
                keep = None
                d = extra.get("d")
                if d is not None and tuple(jnp.shape(d)) == layout.shape:
                    keep = jnp.isfinite(jnp.asarray(d))
                bound = None
                g = extra.get("g")
                first = extra.get("f")
                if first is not None:  # a centred moment: bounded only with an 8-bit first moment
                    first = _plain(first) if isinstance(first, QuantizedArray) else None
                    if first is None or _layout_of(first) != layout:
                        g = None
                if g is not None and tuple(jnp.shape(g)) == layout.shape \
                        and jnp.issubdtype(jnp.asarray(g).dtype, jnp.floating):
                    bound = _bound(q, layout, moment, jnp.asarray(g), first,
                                   overflow_is_infinite=_overflow_is_infinite(q, moment, divisor, d))
                maxima = None  # the new moment's halves to reduce its block maxima over
                if on_halves is not None and "o" in extra and bound is None and keep is None and m is None:
                    maxima, separate = _separate_computations(on_halves, extra["o"], layout, value.dtype)
                    if separate is not None:
                        value = separate
                if maxima is not None:
                    scale = _new_scale_of_halves(maxima, layout, q.scale)
                elif bound is None and keep is None and m is None and given is not None:
                    scale = given
                elif bound is None and keep is not None and m is None and "g" not in extra \
                        and _joins(stored_divisor, q, divisor):
                    # The keep reads the new divisor: its maxima are reduced in the same loop.
                    ct, blocks = _compute_dtype(value.dtype), layout.blocked()[:-1]
                    divisor_q = _plain(stored_divisor)
                    new_divisor = jnp.asarray(d).astype(divisor_q.scale.dtype)
                    scale, joint[id(stored_divisor)] = _codec.block_scales(
                        (value.astype(ct), new_divisor.astype(ct)),
                        (q.scale.reshape(blocks), divisor_q.scale.reshape(blocks)),
                        value.dtype, keeps=(keep, None), blocked=layout.blocked())
                else:
                    scale = _new_scale(value, layout, old_scale=q.scale, bound=bound, keep=keep)
                pair = None
                if bits == 4 and on_halves is not None and "o" in extra:
                    pair = on_halves.halves(extra["o"], layout, value.dtype)
                    if pair is not None and m is not None:
                        firsts = on_halves.halves(extra["mo"], layout, value.dtype)
                        pair = None if firsts is None else (_variance(pair[0], firsts[0]),
                                                            _variance(pair[1], firsts[1]))
                job = _Pending(x, value, layout, moment.signed, next(ids), scale, exact=bound is None,
                               position=extra.get("i"), stage=stage, halves=pair)
                pending.append(job)
                return job

            return jax.tree.map(leaf, olds, news, *aux.values(), is_leaf=_stop)

        if outputs is None:
            new_stored = jax.tree.map(lambda o, n: node(o, n) if _is_declared(o) else n, stored, new_inner,
                                      is_leaf=_is_declared)
        else:
            new_stored = jax.tree.map(lambda o, n, i: node(o, n, i) if _is_declared(o) else n, stored,
                                      new_inner, outputs, is_leaf=_is_declared)
        exact: dict[int | None, list[_Pending]] = {}
        for job in pending:
            if job.exact and job.position is not None:
                exact.setdefault(job.position, []).append(job)
        new_stored = jax.tree.map(
            lambda x: x.encode(exact.get(x.position, []), count, nearest) if isinstance(x, _Pending) else x,
            new_stored, is_leaf=lambda x: isinstance(x, _Pending) or _stop(x))
        return updates_out, QuantizedState(count=_increment(state.count), inner=new_stored)

    return optax.GradientTransformation(init_fn, update_fn)  # pyright: ignore[reportArgumentType]


class _Pending:
    """One new moment leaf between its scale and its encode (inside ``quantized``'s update).

    A moment is encoded only after the exact block maxima of the same parameter's moments in
    *later* states of the chain (a data dependency of its scales, which are small:
    :func:`_after`). A later part's input is computed from this moment's old codes (RMSprop with
    momentum: the momentum's input ``g / (sqrt(nu') + eps)``, written out once), and the
    reduction over its new moment reads it; so the encode then follows every loop that reads
    the old codes except the parameter update, and XLA:CPU writes the new codes in place instead
    of copying the old ones first. 2048 x 2048, XLA:CPU, B/param at the step's peak: RMSprop with
    momentum 16.07 -> 15.09 (8-bit) and 14.16 -> 13.66 (4-bit), centred RMSprop with momentum
    17.11 -> 16.12 and 15.25 -> 14.72; nothing else moves. Moments of one state are not ordered
    after each other's maxima through :func:`_after` (Adam's two do not read each other's
    codes); an exactly reduced moment and its divisor share one reduction instead
    (``_encode_field``). The values are unchanged.
    """

    def __init__(self, leaf: Any, value: jax.Array, layout: _Layout, signed: bool, leaf_id: int,
                 scale: jax.Array, *, exact: bool, position: int | None, stage: int,
                 halves: _halves.Pair | None = None):
        self.leaf, self.value, self.layout, self.signed, self.leaf_id = leaf, value, layout, signed, leaf_id
        self.scale, self.exact, self.position, self.stage = scale, exact, position, stage
        self.halves = halves

    def encode(self, exact: list[_Pending], count: jax.Array, nearest: bool) -> Any:
        scale = self.scale
        for other in exact:
            if other.stage > self.stage:
                scale = _after(scale, other.scale)
        q = _encode(self.value, self.layout, self.signed, count, self.leaf_id, nearest=nearest, scale=scale,
                    halves=self.halves)
        return _wrapped(self.leaf, q)


def _joins(stored_divisor: Any, q: QuantizedArray | PackedQuantizedArray,
           divisor: _moments.Moment | None) -> bool:
    """Whether the moment stored as ``q`` can reduce its divisor's block maxima with its own
    (:func:`rmsjax._codec.block_scales`): the divisor is stored in low bits with the same
    layout and scale dtype, and its scales are those of its new value as the update returns
    it. Not for a centred divisor (stored as the variance, whose scales differ: centred
    RMSprop's ``nu``) nor one divided by another moment (its own scales leave elements out):
    reduced with the moment they would not be used, and the extra work moved the peak of 4-bit
    centred RMSprop with momentum, compiled in place on jax 0.8, from 9.72 to 9.75 B/param."""
    if divisor is None or divisor.centered is not None or divisor.divided_by is not None:
        return False
    if stored_divisor is None or not is_quantized(stored_divisor):
        return False
    stored = _plain(stored_divisor)
    return _layout_of(stored) == _layout_of(q) and stored.scale.dtype == q.scale.dtype


def _after(x: jax.Array, other: jax.Array) -> jax.Array:
    """``x``, made to depend on ``other`` (block scales of the same shape, never NaN) so that
    XLA computes what reads the result only after ``other``: an ``optimization_barrier``
    orders nothing there (XLA:CPU removes it before it schedules), a data dependency does.
    Elementwise, so it adds no communication between the shards of a sharded state. Scales of
    another shape are not waited for (a reduction to match them would be a collective)."""
    if other.shape != x.shape:
        return x
    return jnp.where(jnp.isnan(other), other.astype(x.dtype), x)


def _matching(field: Any, updates: Any) -> Any:
    """``updates`` if it has the moment field's structure (up to its stored leaves), else None."""
    try:
        treedef = jax.tree.structure(field, is_leaf=_stop)
        leaves = treedef.flatten_up_to(updates)
    except (ValueError, TypeError):
        return None
    return treedef.unflatten(leaves)


