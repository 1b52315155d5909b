"""Optimizer state sharded over the data-parallel devices (ZeRO stage 1).

With data parallelism every device holds the whole parameter tree and, by default, the whole
optimizer state. :func:`zero_shardings` gives each state leaf a sharding that splits it over
the data-parallel mesh axis instead, so that each device stores and updates ``1/N`` of the
state; ``jax.jit`` then moves the gradients and parameters between the layouts (see
docs/low_memory.md for the train step and its communication).
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rmsjax import _validation

__all__ = ["zero_shardings"]

_UNEVEN = ("warn", "replicate", "error")


_is_variable = _validation.is_flax_variable


def _same_mesh(a: Any, b: Any) -> bool:
    try:
        return a.axis_names == b.axis_names and a.shape_tuple == b.shape_tuple and (
            getattr(a, "devices", None) is None or getattr(b, "devices", None) is None
            or (a.devices == b.devices).all())
    except Exception:  # noqa: BLE001 - an abstract mesh against a concrete one
        return a.axis_names == b.axis_names and a.shape_tuple == b.shape_tuple


def _abstract(mesh: Any, path: Any, leaf: Any) -> jax.ShapeDtypeStruct:
    if _is_variable(leaf):
        raise TypeError(
            f"zero_shardings: params{jax.tree_util.keystr(path)} is a Flax nnx.Variable; pass the "
            "plain arrays (nnx.as_pure(nnx.state(model, nnx.Param))), whose state tree the "
            "shardings are for")
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        raise TypeError(
            f"zero_shardings: params{jax.tree_util.keystr(path)} is a {type(leaf).__name__}, not an "
            "array or jax.ShapeDtypeStruct")
    sharding = getattr(leaf, "sharding", None)
    if not (isinstance(sharding, NamedSharding) and _same_mesh(sharding.mesh, mesh)):
        sharding = NamedSharding(mesh, P())  # a parameter off this mesh is taken as replicated
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def _uses(spec: tuple[Any, ...], axis: str) -> bool:
    for entry in spec:
        if entry == axis or (isinstance(entry, tuple) and axis in entry):
            return True
    return False


def _base_spec(path: Any, shape: tuple[int, ...], sharding: Any) -> tuple[Any, ...]:
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec)
        return spec + (None,) * (len(shape) - len(spec))
    if sharding is None or getattr(sharding, "is_fully_replicated", False):
        return (None,) * len(shape)
    raise ValueError(
        f"zero_shardings: state{jax.tree_util.keystr(path)} comes out of tx.init with a "
        f"{type(sharding).__name__} ({sharding}), which is not a NamedSharding of the mesh; give "
        "the parameters NamedShardings on the mesh (or none: replicated)")


def _key_name(entry: Any) -> str | None:
    for attr in ("name", "key"):
        value = getattr(entry, attr, None)
        if isinstance(value, str):
            return value
    return None


def zero_shardings(tx: Any, params: Any, mesh: Any, axis: str = "data", *, uneven: str = "warn") -> Any:
    """Shardings for ``tx.init(params)``'s state that split it over the mesh axis ``axis``.

    ZeRO stage 1: each state leaf of a parameter that is replicated over ``axis`` is sharded
    over it along its first dimension whose length is a multiple of the axis size (keeping
    whatever sharding over other axes the leaf already has, e.g. tensor parallelism), so that
    each of the ``N`` devices on ``axis`` holds ``1/N`` of it. Leaves already sharded over
    ``axis`` (FSDP) and scalars (step counts, learning rates) keep the sharding ``tx.init``
    gives them. For :func:`rmsjax.quantized` state, codes and block scales are split along
    the same dimension, one that holds whole blocks on every device (a leading dimension, or
    the blocks of a row when their number divides), so a block never crosses a shard.

    The result is what ``jax.jit(tx.init, out_shardings=...)`` and the train step's state
    shardings take::

        shardings = rmsjax.zero_shardings(tx, params, mesh)
        opt_state = jax.jit(tx.init, out_shardings=shardings)(params)

    A leaf with no dimension divisible by the axis size cannot be split evenly: with
    ``uneven="warn"`` (default) it stays as it is (replicated over ``axis``) and one
    ``UserWarning`` names every such leaf; ``"replicate"`` does the same silently;
    ``"error"`` raises.

    Args:
      tx: the optimizer (any ``optax.GradientTransformation``).
      params: the parameter tree ``tx.init`` takes: arrays or ``jax.ShapeDtypeStruct``; a leaf
        with a ``NamedSharding`` on ``mesh`` keeps its layout, any other leaf is taken as
        replicated on ``mesh``. Nothing is computed or allocated: ``tx.init`` is only compiled.
      mesh: a ``jax.sharding.Mesh`` (not an ``AbstractMesh``: ``tx.init`` is compiled for
        its devices).
      axis: the name of the data-parallel axis of ``mesh``.
      uneven: what to do with a leaf that cannot be split evenly: ``"warn"``, ``"replicate"``
        or ``"error"``.

    Returns:
      A tree shaped like ``tx.init(params)`` with a ``NamedSharding`` on ``mesh`` per leaf.

    Raises:
      TypeError: if ``mesh`` is not a mesh, or a leaf of ``params`` is not an array.
      ValueError: if ``axis`` is not an axis of ``mesh``, ``uneven`` is not one of the three
        choices, or (with ``uneven="error"``) a state leaf cannot be split evenly; the message
        names the leaf's path, its shape and the axis size.

    Example:
      >>> import jax, jax.numpy as jnp, rmsjax
      >>> mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> shardings = rmsjax.zero_shardings(rmsjax.adam(1e-3), {"w": jnp.ones((8, 4))}, mesh)
      >>> tuple(shardings[0].mu["w"].spec), tuple(shardings[0].count.spec)
      (('data', None), ())
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"zero_shardings: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__} (an "
            "AbstractMesh has no devices to compile tx.init for)")
    if axis not in mesh.axis_names:
        raise ValueError(
            f"zero_shardings: axis {axis!r} is not an axis of mesh (its axes: {tuple(mesh.axis_names)})")
    if uneven not in _UNEVEN:
        raise ValueError(f"zero_shardings: uneven must be one of {_UNEVEN}, got {uneven!r}")
    _validation.check_transformation("tx", tx, "zero_shardings")
    size = int(mesh.shape[axis])
    types = dict(zip(mesh.axis_names, getattr(mesh, "axis_types", ()), strict=False))
    explicit = types.get(axis) == jax.sharding.AxisType.Explicit

    abstract = jax.tree_util.tree_map_with_path(lambda path, leaf: _abstract(mesh, path, leaf), params,
                                                is_leaf=_is_variable)
    # Inside the mesh's context: with Explicit axes (jax.make_mesh's default since jax 0.9)
    # an init that makes arrays of its own, as optax's zeros_like does, needs it to trace.
    with jax.set_mesh(mesh):
        compiled = jax.jit(tx.init).lower(abstract).compile()
        shapes = jax.eval_shape(tx.init, abstract)
    out_shardings = compiled.output_shardings
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    natural = treedef.flatten_up_to(out_shardings)

    # Quantized leaves: codes and scale under one parent, split on the same dimension, one
    # that both divide (dimension d < scale.ndim of the codes runs over whole blocks when the
    # scale's dimension d, its blocks there, divides): a block never crosses a shard.
    pairs: dict[tuple[Any, ...], dict[str, tuple[int, ...]]] = {}
    for path, leaf in flat:
        name = _key_name(path[-1]) if path else None
        if name in ("codes", "scale"):
            pairs.setdefault(tuple(path[:-1]), {})[name] = tuple(leaf.shape)
    pairs = {parent: pair for parent, pair in pairs.items() if len(pair) == 2}

    result, skipped = [], []
    for (path, leaf), sharding in zip(flat, natural, strict=True):
        shape = tuple(leaf.shape)
        spec = _base_spec(path, shape, sharding)
        if not shape or _uses(spec, axis):
            result.append(NamedSharding(mesh, P(*spec)))
            continue
        dims = list(range(len(shape)))
        pair = pairs.get(tuple(path[:-1])) if path else None
        if pair is not None:
            codes, scale = pair["codes"], pair["scale"]
            dims = [d for d in range(len(scale)) if codes[d] % size == 0 and scale[d] % size == 0]
            if explicit and codes[:-1] != scale[:-1]:
                # A row of several axes (blocks over the trailing axes): on an Explicit axis
                # jax's reshape rule refuses to merge a split leaf's row into blocks, and the
                # update raised a ShardingTypeError; such a leaf stays whole.
                dims = []
        chosen = next((d for d in dims if spec[d] is None and shape[d] % size == 0), None)
        if chosen is None:
            skipped.append(f"state{jax.tree_util.keystr(path)} {shape}")
            result.append(NamedSharding(mesh, P(*spec)))
            continue
        new = list(spec)
        new[chosen] = axis
        result.append(NamedSharding(mesh, P(*new)))
    if skipped:
        reason = (f"no dimension (outside a quantization block) is a multiple of the {size} devices of "
                  f"mesh axis {axis!r}" + (", or a quantized row of several axes on an Explicit axis"
                                           if explicit else ""))
        if uneven == "error":
            raise ValueError(f"zero_shardings: cannot split {', '.join(skipped)} evenly: {reason} "
                             "(uneven='warn' or 'replicate' keeps such leaves replicated)")
        if uneven == "warn":
            warnings.warn(f"zero_shardings: {len(skipped)} state leaves stay replicated over {axis!r} "
                          f"({reason}): {', '.join(skipped)}", UserWarning, stacklevel=2)
    return treedef.unflatten(result)
