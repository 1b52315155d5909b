"""PyTorch-style parameter groups for any :mod:`rmsjax.compat` optimizer.

``torch.optim.RMSprop([{"params": weights}, {"params": biases, "weight_decay": 0.0}],
lr=0.01, momentum=0.9, weight_decay=1e-4)`` runs one optimizer whose hyperparameters differ
between groups of parameters. :func:`param_groups` is the same recipe for a parameter *tree*:
each group selects leaves by path or by a function of path and leaf, and overrides any of
the factory's arguments; each group gets its own instance of the factory's transformation,
run on that group's leaves only (exactly what PyTorch does: a group is an independent
optimizer over its parameters with its own hyperparameters and step counts).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import optax

from rmsjax import _validation as check

PyTree = Any
Selector = str | Sequence[str] | Callable[[str, Any], bool]

__all__ = ["ParamGroup", "ParamGroups", "ParamGroupsState", "param_groups", "path_name"]


class ParamGroupsState(NamedTuple):
    """State of :func:`param_groups`: ``optax.partition``'s, one inner state per group.

    ``inner_states`` maps each group's label (its position in PyTorch's order, as a string:
    ``"0"``, ``"1"``, ...) to an ``optax.MaskedState`` whose ``inner_state`` is that group's
    transformation state over the *whole* parameter tree, the other groups' leaves masked
    out (``optax.MaskedNode``): state paths keep the parameter names, e.g.
    ``inner_states/"1"/inner_state/2/nu/dense/bias``.

    Changed in 0.3: in 0.2 ``inner_states`` was a tuple of states over *lists* of leaves;
    :meth:`ParamGroups.upgrade_state` converts such a state.
    """

    inner_states: dict


def _key_name(key: Any) -> str:
    for attribute in ("key", "idx", "name"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)  # pragma: no cover (a key type jax adds later)


def path_name(path: Sequence[Any]) -> str:
    """The ``"/"``-joined name of a jax key path: ``{"dense": {"bias": x}}`` -> ``"dense/bias"``.

    Dict keys, sequence indices and attribute names are written as they are, e.g.
    ``"layers/0/kernel"``. This is the path :func:`param_groups` selectors and
    :mod:`rmsjax.compat.torch`'s checkpoint functions use.

    >>> import jax
    >>> [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path({"a": [1, 2]})[0]]
    ['a/0', 'a/1']
    """
    return "/".join(_key_name(k) for k in path)


def _named_leaves(tree: PyTree) -> list[tuple[str, Any]]:
    """(path name, leaf) of every leaf, in tree order. A Flax NNX Variable is named by its own
    path: ``nnx.Optimizer`` initialises on Variables (whose array sits one level down) and
    updates with the bare arrays, and a selector must see the same names both times."""
    return [(path_name(path) + ("" if i is None else f"/{i}"), array)
            for path, i, array in check.leaves_with_path(tree)]


def _selects(selector: Selector, name: str, leaf: Any) -> bool:
    if callable(selector):
        return bool(selector(name, leaf))
    names = [selector] if isinstance(selector, str) else list(selector)
    return any(name == s or name.startswith(s.rstrip("/") + "/") for s in names)


def _check_selector(index: int, selector: Any) -> None:
    if callable(selector):
        try:
            signature = inspect.signature(selector)
        except (TypeError, ValueError):  # no signature to read (some builtins): left to the call
            return
        try:
            signature.bind("path", "leaf")
        except TypeError:
            raise TypeError(
                f"param group {index}: a function in 'params' is called as f(path, leaf) -> bool, "
                f"but {selector!r} cannot take those two arguments (its signature is {signature})"
            ) from None
        return
    if isinstance(selector, str):
        return
    if isinstance(selector, Sequence) and all(isinstance(s, str) for s in selector):
        return
    raise TypeError(
        f"param group {index}: 'params' must be a path, a list of paths or a function "
        f"f(path, leaf) -> bool, got {selector!r}"
    )


class ParamGroup(NamedTuple):
    """One group of :class:`ParamGroups`, as declared.

    Attributes:
      index: its position in PyTorch's order (and its label in the state, as a string).
      selector: the group's ``"params"``; ``None`` for the group of the remaining leaves.
      hyperparameters: the factory's full keyword arguments for this group (its own
        defaults, then the shared ones, then the group's overrides).
      tx: the group's transformation, ``factory(**overrides)``.
    """

    index: int
    selector: Any
    hyperparameters: dict
    tx: optax.GradientTransformationExtraArgs


class ParamGroups(optax.GradientTransformationExtraArgs):
    """The transformation :func:`param_groups` returns: an ``optax.partition`` that declares its groups.

    Besides ``init`` and ``update`` it carries, set once when it is made, ``factory``,
    ``defaults`` (the keyword arguments shared by all groups), ``groups`` (a
    :class:`ParamGroup` per group given) and ``implicit`` (the group of the leaves no group
    selects, when no group takes "the rest"), which :func:`rmsjax.compat.torch.state_dict`
    reads to write PyTorch's ``param_groups``.
    """

    factory: Callable[..., optax.GradientTransformation] | None
    defaults: dict
    groups: tuple[ParamGroup, ...]
    implicit: ParamGroup | None

    def __new__(cls, init, update, factory=None, defaults=None, groups=(), implicit=None):
        # (The declared attributes are set here, once; the defaults only serve copy and
        # pickle, which call ``__new__(cls, init, update)`` and then restore them.)
        self = super().__new__(cls, init, update)
        self.factory = factory
        self.defaults = dict(defaults or {})
        self.groups = tuple(groups)
        self.implicit = implicit
        return self

    def assign(self, tree: PyTree) -> list[tuple[dict, list[int]]]:
        """``[(hyperparameters, leaf indices)]`` per group, in PyTorch's group order.

        The leaf indices are positions in ``jax.tree.leaves(tree)``, in tree order; the
        hyperparameters are the factory's full keyword arguments (its own defaults
        included) for that group. Raises ``ValueError`` for a group that selects no leaf
        and for a leaf that two groups select.
        """
        return [(g.hyperparameters, leaves) for g, leaves in _assign(self, tree)]

    def labels(self, tree: PyTree) -> PyTree:
        """The tree of group labels (``"0"``, ``"1"``, ...) that ``optax.partition`` gets."""
        labels = [""] * len(jax.tree.leaves(tree))
        for g, leaves in _assign(self, tree):
            for j in leaves:
                labels[j] = str(g.index)
        return jax.tree.unflatten(jax.tree.structure(tree), labels)

    def upgrade_state(self, state: Any, params: PyTree) -> ParamGroupsState:
        """The 0.3 state of a :class:`ParamGroupsState` saved by rmsjax 0.2.

        0.2 kept each group's state over the *list* of the group's leaves; 0.3 keeps it over
        the whole tree (``optax.partition``). The leaves are the same, in the same order:
        they are moved into ``self.init(params)``'s structure, shapes checked.
        """
        fresh: Any = self.init(params)
        old = getattr(state, "inner_states", None)
        if not isinstance(old, (tuple, list)):
            raise TypeError(f"upgrade_state: expected a 0.2 ParamGroupsState, got {type(state).__name__}")
        if len(old) != len(fresh.inner_states):
            raise ValueError(
                f"upgrade_state: the 0.2 state has {len(old)} groups, this transformation "
                f"{len(fresh.inner_states)} for these params"
            )
        inner = {}
        for (label, masked), previous in zip(fresh.inner_states.items(), old, strict=True):
            leaves, treedef = jax.tree.flatten(masked.inner_state)
            saved = jax.tree.leaves(previous)
            shapes = [jax.numpy.shape(x) for x in leaves]
            if [jax.numpy.shape(x) for x in saved] != shapes:
                raise ValueError(
                    f"upgrade_state: group {label}'s 0.2 state does not match these params "
                    f"(leaf shapes {[jax.numpy.shape(x) for x in saved]}, expected {shapes})"
                )
            inner[label] = optax.MaskedState(jax.tree.unflatten(treedef, saved))
        return ParamGroupsState(inner)


def _full_kwargs(factory: Callable, kwargs: dict) -> dict:
    out = {}
    for name, p in inspect.signature(factory).parameters.items():
        if p.default is not inspect.Parameter.empty:
            out[name] = p.default
    out.update(kwargs)
    return out


def _masked_names(tree: PyTree) -> list[str]:
    """Path names of the ``optax.MaskedNode`` placeholders in ``tree``: the parameters that an
    ``optax.masked`` around the groups leaves out (they have no leaf)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    return [path_name(path) for path, leaf in flat if isinstance(leaf, optax.MaskedNode)]


def _check_paths(tx: ParamGroups, names: list[str]) -> None:
    """Each path a group lists names a parameter (or a parameter masked out): a typo in a
    list of paths is an error, as a group that selects nothing is."""
    for g in tx.groups:
        if g.selector is None or callable(g.selector):
            continue
        paths = [g.selector] if isinstance(g.selector, str) else list(g.selector)
        for path in paths:
            if not any(_selects(path, name, None) for name in names):
                raise ValueError(
                    f"param group {g.index} selects no parameter with the path {path!r} "
                    f"(params={g.selector!r}); the tree's paths are {names}"
                )


def _assign(tx: ParamGroups, tree: PyTree) -> list[tuple[ParamGroup, list[int]]]:
    named = _named_leaves(tree)
    masked = _masked_names(tree)
    _check_paths(tx, [n for n, _ in named] + masked)
    explicit = [g for g in tx.groups if g.selector is not None]
    rest = [g for g in tx.groups if g.selector is None]
    members: dict[int, list[int]] = {g.index: [] for g in tx.groups}
    unmatched = []
    for j, (name, leaf) in enumerate(named):
        hits = [g for g in explicit if _selects(g.selector, name, leaf)]
        if len(hits) > 1:
            raise ValueError(
                f"parameter {name!r} is selected by more than one parameter group "
                f"(groups {[g.index for g in hits]}); PyTorch puts each parameter in exactly one"
            )
        if hits:
            members[hits[0].index].append(j)
        else:
            unmatched.append(j)
    groups = list(tx.groups)
    if rest:
        members[rest[0].index] = unmatched
    elif unmatched and tx.implicit is not None:
        groups.append(tx.implicit)
        members[tx.implicit.index] = unmatched
    for g in groups:
        if not members[g.index]:
            if masked and g.selector is not None:  # its parameters may all be masked out
                continue
            what = "the remaining parameters" if g.selector is None else repr(g.selector)
            raise ValueError(
                f"param group {g.index} selects no parameter (params={what}); "
                f"the tree's paths are {[n for n, _ in named]}"
            )
    return [(g, members[g.index]) for g in sorted(groups, key=lambda g: g.index)]


def param_groups(
    factory: Callable[..., optax.GradientTransformation],
    groups: Sequence[Mapping[str, Any]] = (),
    **defaults: Any,
) -> ParamGroups:
    r"""Per-group hyperparameters, as PyTorch's ``param_groups``, for any compat optimizer.

    ``param_groups(factory, [{"params": selector, **overrides}, ...], **defaults)`` is the
    optimizer ``torch.optim.<Optimizer>([{"params": ..., **overrides}, ...], **defaults)``:
    each group's leaves are updated by ``factory(**{**defaults, **overrides})`` with its own
    state (step counts included), so a group's learning rate, schedule, weight decay,
    momentum, betas... may be anything the factory accepts.

    Selecting leaves: ``"params"`` is a path (``"dense/bias"``: that leaf and every leaf
    under it, paths as :func:`path_name` writes them), a list of paths, or a function
    ``f(path, leaf) -> bool`` (``leaf`` is the parameter, or the update when ``update`` is
    called without parameters: test shapes and names, not values). A group without a
    ``"params"`` key takes every leaf no other group selects (at most one such group).
    Leaves that no group selects, when there is no such group, form an implicit last group
    with the defaults alone. PyTorch's parameter order is the groups' order, each group's
    leaves in tree order; this is the order :func:`rmsjax.compat.torch.state_dict` uses.

    Args:
      factory: a compat optimizer factory, e.g. :func:`rmsjax.compat.torch.RMSprop` or
        :func:`rmsjax.compat.timm.RMSpropTF` (any function of keyword arguments returning
        an ``optax.GradientTransformation``).
      groups: the group dicts; may be empty (one group: the whole tree).
      **defaults: the arguments every group shares (PyTorch's constructor keywords).

    Returns:
      A :class:`ParamGroups` transformation, built on ``optax.partition`` (each group's
      transformation runs masked to its leaves), with state :class:`ParamGroupsState`.

    Raises:
      TypeError: an argument (in ``defaults`` or a group) that ``factory`` does not take,
        naming it, or a malformed selector.
      ValueError: a hyperparameter out of range (naming the group), two groups without
        ``"params"``; at ``init``/``update``, a group that selects no leaf, a leaf that two
        groups select, updates whose tree differs from the parameters' or the state's
        (naming the first path that differs), or a 0.2 state (see
        :meth:`ParamGroups.upgrade_state`).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from rmsjax import compat
      >>> params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
      >>> tx = compat.param_groups(
      ...     compat.torch.RMSprop,
      ...     [{"params": lambda path, leaf: path.endswith("bias"), "weight_decay": 0.0, "lr": 0.1}],
      ...     lr=0.01, momentum=0.9, weight_decay=1e-4,
      ... )
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)
      >>> print(updates["dense"]["bias"].round(4))  # lr 0.1, no decay: -0.1 / sqrt(1 - 0.99)
      [-1. -1.]

    Warning:
      PyTorch requires every parameter to be in exactly one group and raises otherwise;
      here the leaves no group selects get the defaults (an implicit last group). Write
      an explicit group for them (one without ``"params"``) to choose their position.
    """
    if not callable(factory):
        raise TypeError(f"param_groups: factory must be an optimizer factory, got {factory!r}")
    accepted = {n for n in inspect.signature(factory).parameters if n != "params"}
    name = getattr(factory, "__name__", repr(factory))

    def check_names(where: str, keys) -> None:
        for key in keys:
            if key not in accepted:
                raise TypeError(
                    f"param_groups: {where} sets {key!r}, which {name} does not take "
                    f"(its arguments: {', '.join(sorted(accepted))})"
                )

    def make(where: str, kwargs: dict):
        try:
            return optax.with_extra_args_support(factory(**kwargs))
        except (TypeError, ValueError) as error:
            raise type(error)(f"{where} of {name}: {error}") from None

    check_names("the defaults", defaults)
    if isinstance(groups, Mapping) or not isinstance(groups, Sequence):
        raise TypeError(f"param_groups: groups must be a list of dicts, got {groups!r}")
    built = []
    rest_count = 0
    for i, group in enumerate(groups):
        if not isinstance(group, Mapping):
            raise TypeError(f"param group {i} must be a dict, got {group!r}")
        overrides = {k: v for k, v in group.items() if k != "params"}
        check_names(f"param group {i}", overrides)
        selector = group.get("params")
        if "params" in group:
            _check_selector(i, selector)
        else:
            rest_count += 1
        kwargs = {**defaults, **overrides}
        built.append(ParamGroup(i, selector, _full_kwargs(factory, kwargs), make(f"param group {i}", kwargs)))
    if rest_count > 1:
        raise ValueError("param_groups: at most one group may omit 'params' (the remaining leaves)")
    implicit = ParamGroup(
        len(built), None, _full_kwargs(factory, dict(defaults)), make("the defaults", dict(defaults))
    )

    def partition(tree):
        """``optax.partition`` over the groups that ``tree``'s leaves fall in."""
        assigned = _assign(tx, tree)
        transforms: dict[Any, optax.GradientTransformation] = {str(g.index): g.tx for g, _ in assigned}
        return transforms, optax.partition(transforms, tx.labels(tree))

    def init_fn(params):
        if check.is_params_placeholder(params):
            raise TypeError(
                "param_groups: optax.tree.map_params cannot map a param_groups state: which "
                "group a parameter belongs to depends on its path, and map_params initialises "
                "the optimizer without parameters. Map the groups' states (state.inner_states, "
                "one per group) with jax.tree.map or with optax.tree.map_params of each "
                "group's own optimizer instead"
            )
        _, inner = partition(params)
        state: Any = inner.init(params)
        return ParamGroupsState(dict(state.inner_states))

    def update_fn(updates, state, params=None, **extra_args):
        check.check_state_type(state, ParamGroupsState, "param_groups")
        if isinstance(getattr(state, "inner_states", None), (tuple, list)):
            raise ValueError(
                "param_groups: this state was made by rmsjax 0.2, whose groups kept their states "
                "over lists of leaves; 0.3 keeps them over the parameter tree (optax.partition, "
                "paths keep the parameter names). Convert it once with "
                "tx.upgrade_state(state, params)"
            )
        if params is not None:
            check.check_trees_match(updates, params, what="params", who="param_groups")
        transforms, inner = partition(updates if params is None else params)
        if set(state.inner_states) != set(transforms):
            raise ValueError(
                f"param_groups: the state holds groups {sorted(state.inner_states)}, the tree's "
                f"leaves fall in groups {sorted(transforms)}"
            )
        partitioned = optax.transforms.PartitionState(state.inner_states)
        new: Any
        updates, new = inner.update(updates, partitioned, params, **extra_args)
        return updates, ParamGroupsState(dict(new.inner_states))

    tx = ParamGroups(init_fn, update_fn, factory, defaults, built, implicit)
    return tx
