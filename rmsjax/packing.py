"""Packing many small leaves into a few contiguous buffers.

A model with thousands of small tensors costs an optimizer step thousands of tiny loops,
and the compiler thousands of kernels. :func:`packed` wraps any element-wise
transformation so that it runs on a few flat buffers instead, one per dtype and
placement, and hands back updates shaped like the gradients: a drop-in
``optax.GradientTransformation`` with the same numbers as the transformation it wraps
(bit for bit when evaluated eagerly, but for one-element leaves; see :func:`packed`).

:func:`pack` and :func:`unpack` are the same packing for parameters: keeping the parameters
packed from one step to the next (the model unpacks them inside its loss) takes the
thousands of leaves out of the jitted step's inputs and outputs altogether; see
``docs/performance.md``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re
from typing import Any, NamedTuple, cast

import jax
import jax.core  # jax deletes its own alias; named here so type checkers see jax.core
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from rmsjax import _validation, averages

__all__ = ["PackedState", "PackingLayout", "pack", "packed", "state_layout", "unpack"]

PyTree = Any

# Offsets are int32 scalars: a buffer never holds more elements than int32 can count.
_MAX_BUFFER = int(np.iinfo(np.int32).max)


def _is_single_device(sharding: Any) -> bool:
    """Whether ``sharding`` places an array whole on one device (jax's own test where it has one).

    jax 0.12.1 deprecates ``jax.sharding.SingleDeviceSharding`` in favour of
    ``jax.sharding.is_single_device_sharding``; older jax has only the class.
    """
    test = getattr(jax.sharding, "is_single_device_sharding", None)
    if test is not None:
        return bool(test(sharding))
    return isinstance(sharding, jax.sharding.SingleDeviceSharding)


@dataclasses.dataclass(frozen=True)
class PackingLayout:
    """Where each leaf of a tree lives once packed (static, hashable).

    Attributes:
      shapes: each leaf's shape, in ``jax.tree.leaves`` order.
      dtypes: each leaf's dtype name.
      groups: for each buffer, the indices of the leaves it holds, in order. A group of
        one leaf is that leaf, unchanged (neither flattened nor copied).
      treedef: the structure of the packed tree, which :func:`unpack` rebuilds.
    """

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    groups: tuple[tuple[int, ...], ...]
    treedef: Any = None

    def sizes(self, group: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(math.prod(self.shapes[i]) for i in group)

    def offsets(self, group: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(int(x) for x in np.cumsum((0,) + self.sizes(group))[:-1])


def _placement(leaf: Any) -> Any:
    """A hashable key for where ``leaf`` lives, or ``None`` if it must stay on its own.

    Leaves are only packed together when they live in the same place: on one device, the
    device; replicated over a mesh, the sharding. A leaf split across devices is never
    packed (concatenating it with others would move data between devices).

    Under a trace (``jax.jit(tx.init)``) only the traced type is known. Without a mesh in
    it the leaf is on one device and is packed. On a mesh whose axes are all Explicit the
    type holds the partition spec: a split leaf stays alone, replicated ones are packed.
    On a mesh with Auto (or Manual) axes the type does not say how the leaf is split, so
    it stays alone: packing it could put a whole copy of sharded state on every device and
    make each update gather the shards (measured on 8 devices: 7 collectives per update).
    """
    if isinstance(leaf, jax.core.Tracer):
        sharding = getattr(jax.typeof(leaf), "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        if sharding is None or mesh is None or mesh.empty:
            return "traced"
        if not all(kind == AxisType.Explicit for kind in mesh.axis_types):
            return None
        if any(axis is not None for axis in sharding.spec):
            return None
        return ("traced", mesh)
    sharding = getattr(leaf, "sharding", None)
    if sharding is None or _is_single_device(sharding):
        devices = getattr(leaf, "devices", None)
        return ("device", tuple(sorted(d.id for d in devices()))) if devices else "host"
    if sharding.is_fully_replicated:
        if isinstance(sharding, NamedSharding):
            return ("replicated", sharding.mesh, sharding.memory_kind)
        return ("replicated", sharding)
    return None


def _dtype_name(leaf: Any) -> str:
    """The dtype ``leaf`` has once it is a jax array (NumPy float64 is float32 without x64)."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        dtype = np.asarray(leaf).dtype
    return jnp.dtype(jax.dtypes.canonicalize_dtype(dtype)).name


def layout_of(tree: PyTree, *, max_leaf_size: int = 4096) -> PackingLayout:
    """The packing of ``tree``: leaves of one dtype and placement share a buffer.

    Leaves with more than ``max_leaf_size`` elements, and leaves split across devices,
    stay on their own (a big leaf gains nothing from being copied into a buffer).
    Linear in the number of leaves.
    """
    leaves = jax.tree.leaves(tree)
    shapes = tuple(tuple(int(d) for d in np.shape(x)) for x in leaves)
    dtypes = tuple(_dtype_name(x) for x in leaves)
    # (dtype, placement) -> its buffers so far, each [elements used, leaf indices]
    groups: dict[Any, list[tuple[list[int], list[int]]]] = {}
    alone: list[tuple[int]] = []
    for i, leaf in enumerate(leaves):
        size = math.prod(shapes[i])
        place = _placement(leaf)
        if place is None or size > max_leaf_size:
            alone.append((i,))
            continue
        buffers = groups.setdefault((dtypes[i], place), [([0], [])])
        used, members = buffers[-1]
        if used[0] + size > _MAX_BUFFER:
            used, members = [0], []
            buffers.append((used, members))
        used[0] += size
        members.append(i)
    packed_groups = [tuple(members) for bs in groups.values() for _, members in bs if members]
    ordered = sorted(packed_groups + alone, key=lambda g: g[0])
    return PackingLayout(
        shapes=shapes, dtypes=dtypes, groups=tuple(ordered), treedef=jax.tree.structure(tree)
    )


def _check_matches(leaves: list[Any], layout: PackingLayout, what: str) -> None:
    if len(leaves) != len(layout.shapes):
        raise ValueError(
            f"pack: {what} has {len(leaves)} leaves, the layout was made for {len(layout.shapes)}"
        )
    for i, leaf in enumerate(leaves):
        shape = tuple(np.shape(leaf))
        dtype = _dtype_name(leaf)
        if shape != layout.shapes[i] or dtype != layout.dtypes[i]:
            raise ValueError(
                f"pack: leaf {i} of {what} is {dtype}{list(shape)}, the layout was made for "
                f"{layout.dtypes[i]}{list(layout.shapes[i])}"
            )


def _concatenate(parts: list[jax.Array]) -> jax.Array:
    """One flat buffer from many leaves, concatenated in two levels.

    XLA:CPU handles one concatenation of thousands of operands slowly, to compile and to
    run (5 000 leaves of 1 000: 6.5 s and 32 ms); groups of 16 or 64, then the groups,
    took 2.3 s / 21 ms and 1.7 s / 24 ms (32 is between). The barrier keeps XLA from
    flattening the two levels back into one.
    """
    flat = [jnp.ravel(p) for p in parts]
    width = 32
    if len(flat) > 4 * width:
        groups = [jnp.concatenate(flat[i : i + width]) for i in range(0, len(flat), width)]
        flat = list(jax.lax.optimization_barrier(groups))
    return jnp.concatenate(flat) if len(flat) > 1 else flat[0]


def pack(tree: PyTree, layout: PackingLayout | None = None) -> tuple[tuple[jax.Array, ...], PackingLayout]:
    """Packs the leaves of ``tree`` into a few flat buffers.

    Args:
      tree: a pytree of arrays.
      layout: the packing to follow; by default :func:`layout_of` ``(tree)``.

    Returns:
      ``(buffers, layout)``: one array per group of the layout (a flat concatenation, or
      the leaf itself for a group of one), and the layout that :func:`unpack` needs.

    Example:
      >>> import jax.numpy as jnp
      >>> from rmsjax.packing import pack, unpack
      >>> buffers, layout = pack({"a": jnp.ones((2, 2)), "b": jnp.zeros(3)})
      >>> [b.shape for b in buffers]
      [(7,)]
      >>> unpack(buffers, layout)["a"].shape
      (2, 2)
    """
    leaves = jax.tree.leaves(tree)
    if layout is None:
        layout = layout_of(tree)
    _check_matches(leaves, layout, "the tree")
    buffers = tuple(
        leaves[g[0]] if len(g) == 1 else _concatenate(_in_one_dtype([leaves[i] for i in g], layout, g))
        for g in layout.groups
    )
    return buffers, layout


def _in_one_dtype(parts: list[Any], layout: PackingLayout, group: tuple[int, ...]) -> list[Any]:
    """The leaves of one buffer, cast to the widest of their dtypes when they differ
    (gradients of several precisions for parameters of one: explicitly, so that it works
    under strict dtype promotion)."""
    names = {layout.dtypes[i] for i in group}
    if len(names) == 1:
        return parts
    widest = functools.reduce(averages.common_compute_dtype, sorted(names))
    return [jnp.asarray(p).astype(widest) for p in parts]


def _unpack_leaves(buffers: Any, layout: PackingLayout, offsets: Any = None) -> list[jax.Array]:
    leaves: list[Any] = [None] * len(layout.shapes)
    position = 0
    for group, buffer in zip(layout.groups, buffers):
        if len(group) == 1:
            leaves[group[0]] = buffer
            continue
        sizes = layout.sizes(group)
        if offsets is None:
            cuts = np.cumsum(sizes)[:-1].tolist()
            pieces = jnp.split(buffer, cuts)
        else:
            # Offsets that are values, not constants: every slice of one size is then the
            # same kernel, which XLA compiles once instead of once per leaf.
            starts = offsets[position : position + len(group)]
            pieces = [jax.lax.dynamic_slice(buffer, (s,), (n,)) for s, n in zip(starts, sizes)]
        position += len(group)
        for i, piece in zip(group, pieces):
            leaves[i] = piece.reshape(layout.shapes[i])
    return leaves


def unpack(buffers: Any, layout: PackingLayout) -> PyTree:
    """The tree that :func:`pack` packed: ``unpack(*pack(tree))`` equals ``tree``.

    Differentiable with a cheap transpose (the gradients of the pieces are concatenated
    back into one buffer), so a loss can take packed parameters and unpack them itself.

    Args:
      buffers: the buffers returned by :func:`pack` (or arrays shaped like them, such as
        their gradients or updates).
      layout: the layout returned by :func:`pack`.

    Raises:
      ValueError: ``buffers`` are not as many as the layout's, or one has another shape than
        its buffer.
    """
    buffers = tuple(buffers)
    if len(buffers) != len(layout.groups):
        raise ValueError(f"unpack: got {len(buffers)} buffers, the layout has {len(layout.groups)}")
    for k, (group, buffer) in enumerate(zip(layout.groups, buffers)):
        want = layout.shapes[group[0]] if len(group) == 1 else (sum(layout.sizes(group)),)
        if tuple(np.shape(buffer)) != want:
            shape = tuple(np.shape(buffer))
            raise ValueError(f"unpack: buffers[{k}] has shape {shape}, the layout wants {want}")
    return jax.tree.unflatten(layout.treedef, _unpack_leaves(buffers, layout))


def _leaf_keys(tree: PyTree) -> tuple[list[str], list[Any], Any]:
    """(a key per leaf: its path, dtype and shape; the leaves; the tree structure).

    The keys are what a packed state remembers of the tree it was built for: they name each
    leaf in errors, and assign each leaf to its buffer by name, never by position.
    """
    keys, leaves = [], []
    for path, i, array in _validation.leaves_with_path(tree):
        where = jax.tree_util.keystr(path) + ("" if i is None else f"#{i}")
        keys.append(f"{where} {_dtype_name(array)}{list(np.shape(array))}")
        leaves.append(array)
    return keys, leaves, jax.tree.structure(tree)


def _differences(what: str, keys: list[str], state_keys: list[str]) -> str:
    """Which leaves ``what`` has that the state has not, and the other way round."""
    theirs, ours = set(keys), set(state_keys)
    extra = [k for k in keys if k not in ours]
    missing = [k for k in state_keys if k not in theirs]

    def listing(items: list[str]) -> str:
        shown = ", ".join(items[:5])
        return shown + (f" and {len(items) - 5} more" if len(items) > 5 else "")

    parts = []
    if extra:
        parts.append(f"in the {what} but not in the packed state: {listing(extra)}")
    if missing:
        parts.append(f"in the packed state but not in the {what}: {listing(missing)}")
    return "; ".join(parts)


def _int32_scalars(values: list[int], buffers: Any) -> list[Any]:
    """``values`` as int32 scalars placed like the buffers' step counters: replicated over the
    buffers' mesh when they have one. Made in one transfer, not one per value."""
    host = [np.asarray(v, np.int32) for v in values]
    leaves = jax.tree.leaves(buffers)
    if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        return [jnp.asarray(h) for h in host]
    mesh = next(
        (leaf.sharding.mesh for leaf in leaves
         if isinstance(leaf, jax.Array) and isinstance(leaf.sharding, NamedSharding)),
        None,
    )
    return list(jax.device_put(host, None if mesh is None else NamedSharding(mesh, PartitionSpec())))


class PackedState(NamedTuple):
    """State of :func:`packed`: the wrapped transformation's state over the buffers.

    Only arrays, dicts and tuples: it serializes with ``flax.serialization`` and orbax as any
    optax state does.

    Attributes:
      inner: the state of the wrapped transformation, whose leaves are buffers.
      offsets: one dict per buffer, in the order of the buffers. Its keys name the leaves
        the buffer holds (``"['dense']['w'] float32[3, 4]"``: path, dtype, shape); its
        values are where each starts in the buffer (int32 scalars), or ``None`` for a leaf
        that is its buffer on its own. ``update`` finds the leaves by these names.
    """

    inner: Any
    offsets: tuple[dict[str, Any], ...]


def _is_ordered_dict(x: Any) -> bool:
    return isinstance(x, collections.OrderedDict)


def _canonical(tree: PyTree) -> PyTree:
    """``tree`` with every ``OrderedDict`` made a plain dict, whose keys jax flattens sorted:
    the same leaves, in an order that does not depend on the order of insertion. (The
    buffers of a packed state hold their leaves in this order, so that a tree rebuilt in
    another order is packed alike. Every other container jax knows flattens in an order
    fixed by its type or its keys.)"""
    if not any(_is_ordered_dict(x) for x in jax.tree.leaves(tree, is_leaf=_is_ordered_dict)):
        return tree

    def plain(node: Any) -> Any:
        return {k: _canonical(v) for k, v in node.items()} if _is_ordered_dict(node) else node

    return jax.tree.map(plain, tree, is_leaf=_is_ordered_dict)


def state_layout(state: PackedState, tree: PyTree) -> PackingLayout:
    """The :class:`PackingLayout` of a :func:`packed` state, for the tree it was built for.

    With it, :func:`pack` ``(tree, layout)`` gives the buffers of the state's ``inner``
    transformation (each buffer where the state's buffer is).

    Raises:
      ValueError: ``tree`` has other leaves (paths, dtypes or shapes) than the state's.
    """
    return _state_layout(state, tree, "tree")[0]


_KEY_DTYPE = re.compile(r" [A-Za-z0-9_]+(\[[0-9, ]*\])$")
"""The dtype in a leaf's key (:func:`_leaf_keys`): ``"['w'] float32[3, 4]"`` -> ``float32``."""


def _without_dtype(key: str) -> str:
    return _KEY_DTYPE.sub(r" \1", key)


def _state_layout(state: Any, tree: PyTree, what: str, *, any_precision: bool = False
                  ) -> tuple[PackingLayout, list[Any], list[Any]]:
    """(layout, leaves of ``tree``, the start of each packed leaf in buffer order).

    ``any_precision``: a leaf of ``tree`` may have another dtype than the leaf of the same
    path and shape the state was built for (float32 gradients for bfloat16 parameters)."""
    keys, leaves, treedef = _leaf_keys(tree)
    offsets = getattr(state, "offsets", None)
    if not isinstance(state, PackedState) or not isinstance(offsets, tuple):
        raise TypeError(f"packed: the state is not a packed state, got {type(state).__name__}")
    state_keys = [key for buffer in offsets for key in buffer]
    by_name = {_without_dtype(key): key for key in state_keys}

    def as_state_keys(keys: list[str]) -> list[str]:
        # the state's key for a leaf whose dtype differs from it (any_precision) only
        return [by_name.get(_without_dtype(key), key) for key in keys] if any_precision else keys

    keys = as_state_keys(keys)
    if len(keys) != len(state_keys) or set(keys) != set(state_keys):
        raise ValueError(
            f"packed: the {what} do not match the tree the packed state was built for "
            f"({len(keys)} leaves in the {what}, {len(state_keys)} in the state): "
            + _differences(what, keys, state_keys)
        )
    index = {key: i for i, key in enumerate(keys)}
    canonical = _canonical(tree)
    rank = index if canonical is tree else {
        key: r for r, key in enumerate(as_state_keys(_leaf_keys(canonical)[0]))}
    groups, starts = [], []
    for buffer in offsets:
        # in the order they were packed in at init (_canonical), whatever this tree's order
        group = tuple(sorted((index[key] for key in buffer), key=lambda i: rank[keys[i]]))
        groups.append(group)
        if len(group) > 1:
            starts.extend(buffer[keys[i]] for i in group)
    layout = PackingLayout(
        shapes=tuple(tuple(int(d) for d in np.shape(x)) for x in leaves),
        dtypes=tuple(_dtype_name(x) for x in leaves),
        groups=tuple(groups),
        treedef=treedef,
    )
    return layout, leaves, starts


def _static_leaf_size(max_leaf_size: Any) -> int | None:
    """``max_leaf_size`` as a Python int; ``None`` when it is traced (it is only needed by
    ``init``, which then says so)."""
    if max_leaf_size is None:
        return 4096
    if isinstance(max_leaf_size, jax.core.Tracer):
        return None
    if isinstance(max_leaf_size, bool) or not (
        isinstance(max_leaf_size, (int, np.integer))
        or (isinstance(max_leaf_size, (np.ndarray, jax.Array)) and np.ndim(max_leaf_size) == 0
            and jnp.issubdtype(max_leaf_size.dtype, jnp.integer))
    ):
        raise TypeError(f"packed: max_leaf_size must be an int >= 0 or None, got {max_leaf_size!r}")
    if int(max_leaf_size) < 0:
        raise ValueError(f"packed: max_leaf_size must be an int >= 0 or None, got {max_leaf_size!r}")
    return int(max_leaf_size)


def packed(
    tx: optax.GradientTransformation, *, max_leaf_size: int | None = None
) -> optax.GradientTransformationExtraArgs:
    """Runs ``tx`` on a few contiguous buffers instead of many small leaves.

    ``init`` and ``update`` take and return ordinary trees; inside, the leaves of each
    dtype and placement are concatenated into one flat buffer, ``tx`` runs on the buffers
    and its updates are cut back into leaves. For an element-wise transformation (every
    rmsjax optimizer, most of optax's) the numbers are those of ``tx`` itself: bit for bit
    when evaluated eagerly (but for leaves of one element, which XLA:CPU computes alone with
    other instructions: up to 1 ulp); compiled, up to the last bit where XLA contracts
    multiply-adds into FMAs differently at another position in the buffer
    (``docs/performance.md``).

    With :func:`rmsjax.quantized` on either side, the moments are the buffers: an 8 or
    4-bit block may span the end of one leaf and the start of the next and share one scale,
    and ``min_size`` applies to the buffer, not the leaf. Leaves whose gradients differ in
    size by orders of magnitude then lose precision to their neighbours (measured: leaves of
    300 elements with gradients of 1e-3 between leaves of 1e3 moved 2.3e-3 in 20 Adam steps
    where float32 state moves 4.2e-3); keep such leaves out of ``packed``.

    Leaves with more than ``max_leaf_size`` elements stay as they are: the packed gradient
    and update buffers are extra memory passes (and fresh temporaries) every step, which
    only pay for leaves small enough that the per-leaf cost dominates. Leaves split across
    devices stay as they are too: arrays on different devices, or with different
    shardings, are never packed together.

    The gradients may be of other precisions than the parameters (float32 gradients for
    bfloat16 parameters): a buffer of gradients of several precisions is in the widest, and
    each update comes back in its gradient's dtype. Where one buffer mixes precisions, a leaf
    whose gradient is narrower than the widest is computed in the wider one, where ``tx``
    alone rounds its intermediate steps to the gradient's dtype: its updates differ from
    ``tx`` alone's by that rounding (which state such as momentum accumulates), and come back
    in the gradient's dtype even where ``tx`` alone returns a wider one (optax's optimizers,
    for bfloat16 gradients of float32 parameters). Gradients all of one dtype give ``tx``
    alone's numbers.

    The state (:class:`PackedState`) names every leaf by its path, dtype and shape: an
    ``update`` with a tree of other leaves fails naming them, and the state serializes with
    ``flax.serialization`` and orbax. It holds no tree shaped like the parameters, so
    ``optax.tree.map_params`` leaves it as it is (``transform_non_params`` sees ``inner``
    and ``offsets`` whole).

    Args:
      tx: the transformation to wrap.
      max_leaf_size: the largest leaf (in elements) that is packed; ``None``: 4096. It
        decides the layout when the state is made, so it must be a concrete int then (under
        ``optax.inject_hyperparams`` and ``jax.jit``, name it in ``static_args``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`PackedState`.

    Warning:
      ``tx`` sees buffers, not the original leaves: transformations that act per leaf
      (per-tensor norms such as LARS/LAMB trust ratios, ``optax.masked`` with a tree mask)
      would see one tensor per buffer. Wrap those outside ``packed``, or do not pack.

    Example:
      >>> import jax.numpy as jnp, optax, rmsjax
      >>> params = {f"w{i}": jnp.ones(3) for i in range(100)}
      >>> tx = rmsjax.packed(rmsjax.rmsprop(0.1))
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)
      >>> bool((updates["w7"] == rmsjax.rmsprop(0.1).update(params["w7"],
      ...     rmsjax.rmsprop(0.1).init(params["w7"]))[0]).all())
      True
    """
    _validation.check_transformation("tx", tx, "packed")
    leaf_size = _static_leaf_size(max_leaf_size)
    inner_tx = optax.with_extra_args_support(tx)

    def init_fn(params: optax.Params) -> PackedState:
        if _validation.is_params_placeholder(params):
            # No part of the state is shaped like the parameters: map_params maps none of it.
            return PackedState(inner=0, offsets=0)  # pyright: ignore[reportArgumentType]
        if leaf_size is None:
            raise ValueError(
                "packed: max_leaf_size is traced (optax.inject_hyperparams under jax.jit makes "
                "it an array); it decides the layout and must be a concrete int: pass "
                "static_args=('max_leaf_size',) to optax.inject_hyperparams"
            )
        params = _canonical(params)  # packed in an order that does not depend on insertion
        keys, leaves, _ = _leaf_keys(params)
        layout = layout_of(params, max_leaf_size=leaf_size)
        buffers, _ = pack(leaves, layout)
        values = [offset for group in layout.groups if len(group) > 1 for offset in layout.offsets(group)]
        scalars = iter(_int32_scalars(values, buffers))
        offsets = tuple(
            {keys[i]: (next(scalars) if len(group) > 1 else None) for i in group}
            for group in layout.groups
        )
        return PackedState(inner=inner_tx.init(buffers), offsets=offsets)

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, PackedState]:
        state = cast(PackedState, state)  # what init_fn returned
        layout, leaves, starts = _state_layout(state, updates, "updates", any_precision=True)
        grads, _ = pack(leaves, layout)
        where = None
        if params is not None:
            # with their own layout: the same buffers, whatever the order of either tree
            params_layout, param_leaves, _ = _state_layout(state, params, "params")
            where, _ = pack(param_leaves, params_layout)
        steps, inner = inner_tx.update(grads, state.inner, where, **extra_args)
        # a buffer of gradients of several precisions is in the widest: each update is cast
        # back to its gradient's dtype, as rmsjax's transformations do per leaf
        out = [piece if piece.dtype == dtype else piece.astype(dtype)
               for piece, dtype in zip(_unpack_leaves(steps, layout, starts), layout.dtypes)]
        return jax.tree.unflatten(layout.treedef, out), PackedState(inner=inner, offsets=state.offsets)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
