"""Packing many small leaves into a few contiguous buffers.

A model with thousands of small tensors costs an optimizer step thousands of tiny loops,
and the compiler thousands of kernels. :func:`packed` wraps any element-wise
transformation so that it runs on a few flat buffers instead, one per dtype and
placement, and hands back updates shaped like the gradients: a drop-in
``optax.GradientTransformation`` with the same numbers, bit for bit, as the transformation
it wraps.

:func:`pack` and :func:`unpack` are the same packing for parameters: keeping the parameters
packed from one step to the next (the model unpacks them inside its loss) takes the
thousands of leaves out of the jitted step's inputs and outputs altogether; see
``docs/performance.md``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, cast

import jax
import jax.core  # jax deletes its own alias; named here so type checkers see jax.core
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, SingleDeviceSharding

from rmsjax import averages

__all__ = ["PackedState", "PackingLayout", "pack", "packed", "unpack"]

PyTree = Any

# Offsets are int32 scalars: a buffer never holds more elements than int32 can count.
_MAX_BUFFER = int(np.iinfo(np.int32).max)


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
    if sharding is None or isinstance(sharding, SingleDeviceSharding):
        devices = getattr(leaf, "devices", None)
        return ("device", tuple(sorted(d.id for d in devices()))) if devices else "host"
    if sharding.is_fully_replicated:
        if isinstance(sharding, NamedSharding):
            return ("replicated", sharding.mesh, sharding.memory_kind)
        return ("replicated", sharding)
    return None


def layout_of(tree: PyTree, *, max_leaf_size: int = 4096) -> PackingLayout:
    """The packing of ``tree``: leaves of one dtype and placement share a buffer.

    Leaves with more than ``max_leaf_size`` elements, and leaves split across devices,
    stay on their own (a big leaf gains nothing from being copied into a buffer).
    """
    leaves = jax.tree.leaves(tree)
    shapes = tuple(tuple(int(d) for d in np.shape(x)) for x in leaves)
    dtypes = tuple(jnp.dtype(x.dtype).name for x in leaves)
    groups: dict[Any, list[list[int]]] = {}
    alone: list[tuple[int]] = []
    for i, leaf in enumerate(leaves):
        size = math.prod(shapes[i])
        place = _placement(leaf)
        if place is None or size > max_leaf_size:
            alone.append((i,))
            continue
        buffers = groups.setdefault((dtypes[i], place), [[]])
        used = sum(math.prod(shapes[j]) for j in buffers[-1])
        if used + size > _MAX_BUFFER:
            buffers.append([])
        buffers[-1].append(i)
    packed_groups = [tuple(b) for bs in groups.values() for b in bs if b]
    ordered = sorted(packed_groups + alone, key=lambda g: g[0])
    return PackingLayout(
        shapes=shapes, dtypes=dtypes, groups=tuple(ordered), treedef=jax.tree.structure(tree)
    )


def _check_matches(leaves: list[Any], layout: PackingLayout, what: str) -> None:
    if len(leaves) != len(layout.shapes):
        raise ValueError(
            f"packed: {what} has {len(leaves)} leaves, the packed state was built for "
            f"{len(layout.shapes)}"
        )
    for i, leaf in enumerate(leaves):
        shape = tuple(np.shape(leaf))
        dtype = jnp.dtype(leaf.dtype).name
        if shape != layout.shapes[i] or dtype != layout.dtypes[i]:
            raise ValueError(
                f"packed: leaf {i} of {what} is {dtype}{list(shape)}, the packed state was "
                f"built for {layout.dtypes[i]}{list(layout.shapes[i])}"
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
        leaves[g[0]] if len(g) == 1 else _concatenate([leaves[i] for i in g]) for g in layout.groups
    )
    return buffers, layout


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
    """
    return jax.tree.unflatten(layout.treedef, _unpack_leaves(buffers, layout))


@jax.tree_util.register_pytree_node_class
class _Offsets:
    """The start of each packed leaf in its buffer, as int32 scalars, plus the layout.

    The starts are state (values), not constants, so that XLA compiles one slicing kernel
    per leaf size rather than one per leaf; the layout rides along as static data.
    """

    def __init__(self, starts: tuple[Any, ...], layout: PackingLayout):
        self.starts = tuple(starts)
        self.layout = layout

    def tree_flatten(self):
        return self.starts, self.layout

    @classmethod
    def tree_unflatten(cls, layout, starts):
        return cls(tuple(starts), layout)

    def __repr__(self) -> str:
        return f"_Offsets({len(self.starts)} leaves in {len(self.layout.groups)} buffers)"


class PackedState(NamedTuple):
    """State of :func:`packed`: the wrapped transformation's state over the buffers.

    Attributes:
      inner: the state of the wrapped transformation, whose leaves are buffers.
      offsets: where each packed leaf starts in its buffer (and, as static data, the
        layout).
    """

    inner: Any
    # An _Offsets; typed Any so that the state is an optax.OptState (an array tree) to
    # type checkers, as the pytree it is at run time.
    offsets: Any


def packed(
    tx: optax.GradientTransformation, *, max_leaf_size: int = 4096
) -> optax.GradientTransformationExtraArgs:
    """Runs ``tx`` on a few contiguous buffers instead of many small leaves.

    ``init`` and ``update`` take and return ordinary trees; inside, the leaves of each
    dtype and placement are concatenated into one flat buffer, ``tx`` runs on the buffers
    and its updates are cut back into leaves. For an element-wise transformation (every
    rmsjax optimizer, most of optax's) the numbers are those of ``tx`` itself: bit for bit
    when evaluated eagerly; compiled, up to the last bit where XLA contracts multiply-adds
    into FMAs differently at another position in the buffer (``docs/performance.md``).

    Leaves with more than ``max_leaf_size`` elements stay as they are: the packed gradient
    and update buffers are extra memory passes (and fresh temporaries) every step, which
    only pay for leaves small enough that the per-leaf cost dominates. Leaves split across
    devices stay as they are too: arrays on different devices, or with different
    shardings, are never packed together.

    Args:
      tx: the transformation to wrap.
      max_leaf_size: the largest leaf (in elements) that is packed.

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
    if not isinstance(max_leaf_size, int) or max_leaf_size < 0:
        raise ValueError(f"max_leaf_size must be an int >= 0, got {max_leaf_size!r}")
    inner_tx = optax.with_extra_args_support(tx)

    def init_fn(params: optax.Params) -> PackedState:
        buffers, layout = pack(params, layout_of(params, max_leaf_size=max_leaf_size))
        starts = []
        for group in layout.groups:
            if len(group) > 1:
                # Replicated over the buffers' mesh, like the inner transformation's counts.
                for offset in layout.offsets(group):
                    starts.append(averages.replicated_like(jnp.asarray(offset, jnp.int32), buffers))
        return PackedState(inner=inner_tx.init(buffers), offsets=_Offsets(tuple(starts), layout))

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, PackedState]:
        state = cast(PackedState, state)  # what init_fn returned
        layout = state.offsets.layout
        leaves, treedef = jax.tree.flatten(updates)
        _check_matches(leaves, layout, "updates")
        grads, _ = pack(leaves, layout)
        where = None
        if params is not None:
            param_leaves = jax.tree.leaves(params)
            _check_matches(param_leaves, layout, "params")
            where, _ = pack(param_leaves, layout)
        steps, inner = inner_tx.update(grads, state.inner, where, **extra_args)
        out = _unpack_leaves(steps, layout, state.offsets.starts)
        return jax.tree.unflatten(treedef, out), PackedState(inner=inner, offsets=state.offsets)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
