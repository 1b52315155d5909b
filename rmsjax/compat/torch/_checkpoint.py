"""PyTorch optimizer checkpoints: ``torch.optim.<Optimizer>.state_dict()`` in and out.

:func:`load_state_dict` turns a PyTorch optimizer's ``state_dict()`` into the optax state of
the matching :mod:`rmsjax.compat.torch` transformation, so that a run started in PyTorch
continues in JAX exactly; :func:`state_dict` goes the other way and returns a dict that
``torch.optim.<Optimizer>.load_state_dict`` accepts. Neither imports torch unless asked to
return tensors: numpy arrays are accepted wherever PyTorch has tensors.

The mapping (PyTorch 2.13's per-parameter state keys, rmsjax's state fields):

==========  =========================================  ==========================================
optimizer   PyTorch keys                               rmsjax state
==========  =========================================  ==========================================
RMSprop     ``step, square_avg[, grad_avg]``            ``ScaleByRmsState`` / ``ScaleByStddevState``
            ``[, momentum_buffer]``                    ``(count, [mu,] nu)``, ``MomentumState.mu``
Adagrad     ``step, sum``                              ``ScaleByRssState(count, nu)``
Adam(W)     ``step, exp_avg, exp_avg_sq``              ``ScaleByAdamState(count, mu, nu)``
            ``[, max_exp_avg_sq]``                     ``ScaleByAmsgradState.nu_max``
Adadelta    ``step, square_avg, acc_delta``            ``ScaleByAdaDeltaState(count, nu, nu_delta)``
SGD         ``[momentum_buffer]`` (no step)            ``MomentumState.mu``
==========  =========================================  ==========================================

PyTorch keeps a ``step`` per parameter; rmsjax one ``count`` per transformation of a group.
Loading sets every count of the group's chain (scaling, momentum, learning rate) to the
group's ``step`` (all parameters of a group must have the same); exporting writes each
parameter's ``step`` from the scaling's count.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsjax import _validation as check
from rmsjax import transforms as T
from rmsjax.compat import _common as common
from rmsjax.compat import _groups

__all__ = ["load_state_dict", "state_dict"]

PyTree = Any
Layout = Callable[[str, np.ndarray], np.ndarray]

# PyTorch 2.13's param_groups keys (in its order) beside the constructor's own, per class.
_GROUP_KEYS = {
    "RMSprop": ("lr", "momentum", "alpha", "eps", "centered", "weight_decay", "capturable",
                "foreach", "maximize", "differentiable"),
    "Adagrad": ("lr", "lr_decay", "eps", "weight_decay", "initial_accumulator_value", "foreach",
                "maximize", "differentiable", "fused"),
    "Adam": ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
             "differentiable", "fused", "decoupled_weight_decay"),
    "Adadelta": ("lr", "rho", "eps", "weight_decay", "maximize", "capturable", "foreach",
                 "differentiable"),
    "SGD": ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "foreach",
            "differentiable", "fused"),
}
_GROUP_KEYS["AdamW"] = _GROUP_KEYS["Adam"]
_SWITCHES = {"capturable": False, "foreach": None, "differentiable": False, "fused": None}
_SCALINGS = (T.ScaleByRmsState, T.ScaleByStddevState, T.ScaleByRssState, T.ScaleByAdamState,
             T.ScaleByAmsgradState, T.ScaleByAdaDeltaState)
# rmsjax field of the scaling state behind each PyTorch key (momentum_buffer: MomentumState.mu).
_FIELDS = {
    T.ScaleByRmsState: {"square_avg": "nu"},
    T.ScaleByStddevState: {"square_avg": "nu", "grad_avg": "mu"},
    T.ScaleByRssState: {"sum": "nu"},
    T.ScaleByAdamState: {"exp_avg": "mu", "exp_avg_sq": "nu"},
    T.ScaleByAmsgradState: {"exp_avg": "mu", "exp_avg_sq": "nu", "max_exp_avg_sq": "nu_max"},
    T.ScaleByAdaDeltaState: {"square_avg": "nu", "acc_delta": "nu_delta"},
}


# --------------------------------------------------------------------------- chain parts

_BUFFERS = (T.MomentumState, T.DampenedMomentumState)
_RATES = (T.ScaleByLearningRateState, T.ScaleByScheduleState)
_PARTS = (*_SCALINGS, *_BUFFERS, *_RATES)


def _is_part(node: Any) -> bool:
    """A part of a chain whose fields a checkpoint reads or writes (found by its type)."""
    return isinstance(node, _PARTS)


def _parts(state: Any) -> list:
    """The parts inside a (nested, possibly masked) chain state, in tree order."""
    return [node for node in jax.tree.leaves(state, is_leaf=_is_part) if _is_part(node)]


def _rebuild(state: Any, fn: Callable[[Any], Any]) -> Any:
    """``state`` with each part :func:`_parts` finds replaced by ``fn(part)``."""
    return jax.tree.map(lambda node: fn(node) if _is_part(node) else node, state, is_leaf=_is_part)


def _of_type(parts: list, *types) -> Any:
    found = [p for p in parts if isinstance(p, types)]
    return found[0] if found else None


def _count(part: Any) -> Any:
    """A part's step count, ``None`` where it keeps none (a field, never ``tuple.count``)."""
    return part.count if "count" in getattr(part, "_fields", ()) else None


def _expected_keys(parts: list) -> set[str]:
    keys = set()
    scaling = _of_type(parts, *_SCALINGS)
    if scaling is not None:
        keys |= {"step", *_FIELDS[type(scaling)]}
    if _of_type(parts, *_BUFFERS) is not None:
        keys.add("momentum_buffer")
    return keys


# --------------------------------------------------------------------------- groups and order


class _Group(NamedTuple):
    """One PyTorch parameter group: its state, leaf indices, optimizer and hyperparameters."""

    state: Any
    leaves: list
    kind: str
    hyper: dict
    label: str | None  # its key in a ParamGroupsState; None for a plain transformation


_NOT_DECLARED = (
    "tx is not an rmsjax.compat.torch optimizer nor param_groups of one: it declares no PyTorch "
    "optimizer (got {what}). Wrappers such as rmsjax.quantized, optax.inject_hyperparams or "
    "optax.chain return transformations of their own, and their states are not PyTorch's "
    "(quantized moments are stored in 8 or 4 bits); pass the compat.torch optimizer itself "
    "and its own state"
)


def _torch_kind(tx: Any, where: str) -> tuple[str, dict]:
    """``(optimizer, hyperparameters)`` declared by a compat.torch transformation."""
    declaration = common.declaration_of(tx)
    if declaration is None:
        raise ValueError(_NOT_DECLARED.format(what=f"{type(tx).__name__} {where}".strip()))
    if declaration.framework != "torch" or declaration.optimizer not in _GROUP_KEYS:
        raise ValueError(
            f"PyTorch checkpoints are for rmsjax.compat.torch's optimizers, not "
            f"rmsjax.compat.{declaration.framework}.{declaration.optimizer}"
        )
    return declaration.optimizer, dict(declaration.hyperparameters)


def _check_new_groups_state(opt_state: Any) -> None:
    inner = getattr(opt_state, "inner_states", None)
    if isinstance(inner, (tuple, list)):
        raise ValueError(
            "opt_state is a param_groups state made by rmsjax 0.2 (group states over lists of "
            "leaves); 0.3 keeps them over the parameter tree. Convert it with "
            "tx.upgrade_state(opt_state, params)"
        )


def _groups_of(tx, opt_state, params, hyperparams: Mapping[str, Any] | None = None) -> list[_Group]:
    if isinstance(tx, _groups.ParamGroups):
        _check_new_groups_state(opt_state)
        if not isinstance(opt_state, _groups.ParamGroupsState):
            raise TypeError(f"tx is a param_groups transformation, opt_state is a {type(opt_state).__name__}")
        out = []
        for group, leaves in _groups._assign(tx, params):
            kind, _ = _torch_kind(group.tx, f"(param group {group.index} of {tx.factory!r})")
            label = str(group.index)
            if label not in opt_state.inner_states:
                raise ValueError(
                    f"opt_state holds groups {sorted(opt_state.inner_states)}, tx gives group {label} "
                    "for params"
                )
            out.append(_Group(opt_state.inner_states[label].inner_state, leaves, kind,
                              dict(group.hyperparameters), label))
        return out
    if isinstance(opt_state, _groups.ParamGroupsState):
        raise TypeError("opt_state is a param_groups state: pass the param_groups transformation as tx")
    kind, hyper = _torch_kind(tx, "")
    if hyperparams is not None:
        for key in hyperparams:
            if key not in hyper:
                raise ValueError(f"hyperparams: {kind} takes no argument {key!r}")
        hyper.update(hyperparams)
    return [_Group(opt_state, list(range(len(jax.tree.leaves(params)))), kind, hyper, None)]


def _check_order(order: Any) -> None:
    """``order`` must be ``None`` or a sequence of leaf paths (str) and indices (int, not bool)."""
    wanted = "None or a sequence of leaf paths (str) or leaf indices (int)"
    if order is None:
        return
    if isinstance(order, (str, bytes, Mapping)) or not isinstance(order, (Sequence, np.ndarray)):
        raise TypeError(f"order must be {wanted}, got {order!r} of type {type(order).__name__}")
    for item in order:
        if isinstance(item, (bool, np.bool_)) or not isinstance(item, (str, numbers.Integral)):
            raise TypeError(
                f"order must be {wanted}, got the item {item!r} of type {type(item).__name__}"
            )


def _check_layout(layout: Any) -> None:
    if layout is not None and not callable(layout):
        raise TypeError(
            f"layout must be None or a callable layout(path, array) -> array, got {layout!r} of "
            f"type {type(layout).__name__}"
        )


def _torch_order(groups: list[_Group], names: list[str], order) -> dict[int, int]:
    """``{leaf index: PyTorch index}``."""
    n = len(names)
    if order is None:
        flat = [j for g in groups for j in g.leaves]
    else:
        flat = []
        for item in order:
            if isinstance(item, str):
                if item not in names:
                    raise ValueError(f"order names {item!r}, which is not a leaf path ({names})")
                flat.append(names.index(item))
            else:
                flat.append(int(item))
    if sorted(flat) != list(range(n)):
        given = list(order) if order is not None else flat
        raise ValueError(f"order must list each of the {n} parameters exactly once, got {given}")
    return {j: i for i, j in enumerate(flat)}


# --------------------------------------------------------------------------- arrays


def _to_numpy(x: Any) -> np.ndarray:
    """A torch tensor (or anything array-like) as a NumPy array of the same dtype.

    A tensor of a dtype NumPy lacks (``torch.bfloat16``, the float8 types) has no ``.numpy()``;
    it goes through float32, which holds each of its values exactly, to the same-named
    ``ml_dtypes`` type that jax uses."""
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu()
        if hasattr(x, "resolve_conj"):
            x = x.resolve_conj()
        try:
            return x.numpy()
        except TypeError:
            name = str(x.dtype).removeprefix("torch.")
            return x.float().numpy().astype(jnp.dtype(name))
    return np.asarray(x)


def _as_torch(array: np.ndarray, kind: str) -> Any:
    """``array`` as a torch tensor (``kind == "torch"``) or as is. An ``ml_dtypes`` array
    (bfloat16, float8), which torch cannot read, goes through float32 (exact) to torch's
    dtype of the same name."""
    if kind == "numpy":
        return array
    import torch

    if array.dtype.kind == "V":  # an ml_dtypes type
        wide = torch.from_numpy(np.asarray(array, np.float32))  # pyright: ignore[reportAttributeAccessIssue]
        return wide.to(getattr(torch, array.dtype.name))
    return torch.from_numpy(np.array(array, copy=True))  # pyright: ignore[reportAttributeAccessIssue]


def _step_value(step: int, kind: str) -> Any:
    if kind == "numpy":
        return np.asarray(float(step), np.float32)
    import torch

    return torch.tensor(float(step), dtype=torch.float32)  # pyright: ignore[reportAttributeAccessIssue]


def _array_kind(arrays: str) -> str:
    if arrays not in ("auto", "torch", "numpy"):
        raise ValueError(f"arrays must be 'auto', 'torch' or 'numpy', got {arrays!r}")
    if arrays != "auto":
        return arrays
    try:
        import torch  # noqa: F401
    except ImportError:
        return "numpy"
    return "torch"


def _plain(value: Any) -> Any:
    if isinstance(value, jax.Array | np.ndarray | np.generic):
        return np.asarray(value).item()
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    return value


def _rate(lr: Any, step: int) -> float:
    return float(np.asarray(T.rate_at(lr, jnp.asarray(step, jnp.int32))))


# --------------------------------------------------------------------------- state_dict


def state_dict(
    tx: optax.GradientTransformation,
    opt_state: PyTree,
    params: PyTree,
    *,
    order: Sequence[str | int] | None = None,
    layout: Layout | None = None,
    hyperparams: Mapping[str, Any] | None = None,
    arrays: str = "auto",
) -> dict:
    r"""The PyTorch ``state_dict()`` of a :mod:`rmsjax.compat.torch` optimizer's state.

    Returns ``{"state": {i: {"step": ..., "square_avg": ..., ...}}, "param_groups": [...]}``
    in PyTorch 2.13's format, which ``torch.optim.<Optimizer>.load_state_dict`` accepts:
    constructed on the same parameters (in PyTorch's order, see ``order``) and groups, the
    PyTorch optimizer then continues this run. Parameters that have made no step have no
    entry (as in PyTorch; Adagrad's always have one).

    Args:
      tx: the transformation: a compat factory's result, or
        :func:`rmsjax.compat.param_groups` of one (which also records the
        hyperparameters PyTorch's ``param_groups`` hold).
      opt_state: its state.
      params: the parameters (their tree gives the order and paths).
      order: PyTorch's parameter order, as leaf paths (``"dense/kernel"``, see
        :func:`rmsjax.compat.path_name`) or indices into ``jax.tree.leaves(params)``;
        default: the tree's leaf order (with groups: the groups' order, each group's leaves
        in tree order).
      layout: ``layout(path, array) -> array`` applied to every exported state array of the
        leaf at ``path`` (in PyTorch's complex form), e.g. ``lambda path, a: a.T if
        path.endswith("kernel") else a`` for a Flax ``Dense`` kernel ``(in, out)`` that is a
        PyTorch ``Linear`` weight ``(out, in)``.
      hyperparams: the factory's keyword arguments, needed for ``param_groups`` when ``tx``
        is a plain factory result (it does not record them); ignored otherwise.
      arrays: ``"torch"`` (tensors; imports torch), ``"numpy"``, or ``"auto"`` (tensors if
        torch can be imported).

    Returns:
      The state dict. A scheduled learning rate is written as its current value ``lr``.

    Raises:
      ValueError: ``tx`` is not a compat.torch optimizer, ``hyperparams`` are missing for a
        plain ``tx`` or name an unknown argument, ``order`` is not a permutation, or
        ``opt_state`` does not match ``tx.init(params)`` (its parts, leaf paths, shapes or
        dtypes: the state of another optimizer, or made for other parameters).
      TypeError: ``order`` is not a sequence of paths and integers, or ``layout`` is not
        callable.

    Example:
      >>> import jax.numpy as jnp
      >>> from rmsjax.compat import torch as pt
      >>> params = {"w": jnp.ones(2)}
      >>> tx = pt.param_groups(pt.RMSprop, lr=0.1, momentum=0.9)
      >>> _, state = tx.update(params, tx.init(params), params)
      >>> sd = pt.state_dict(tx, state, params, arrays="numpy")
      >>> sorted(sd["state"][0]), float(sd["state"][0]["step"])
      (['momentum_buffer', 'square_avg', 'step'], 1.0)
      >>> sd["param_groups"][0]["lr"], sd["param_groups"][0]["params"]
      (0.1, [0])

    Warning:
      PyTorch's ``load_state_dict`` replaces each group's hyperparameters by the saved
      ones, so they must be right: build ``tx`` with :func:`param_groups` or pass
      ``hyperparams``. The learning-rate *scheduler* has its own state in PyTorch
      (``scheduler.state_dict()``); this dict holds only the current rate.
    """
    kind_of_arrays = _array_kind(arrays)
    _check_order(order)
    _check_layout(layout)
    groups = _groups_of(tx, opt_state, params, hyperparams)
    _check_state(tx, opt_state, params)
    names = [n for n, _ in _groups._named_leaves(params)]
    leaves = jax.tree.leaves(params)
    index = _torch_order(groups, names, order)
    out_state: dict[int, dict] = {}
    out_groups = []
    for g in groups:
        kind, hyper = g.kind, g.hyper
        parts = _parts(g.state)
        scaling = _of_type(parts, *_SCALINGS)
        buffer = _of_type(parts, *_BUFFERS)
        step = _step_of(scaling, buffer, _of_type(parts, *_RATES))
        has_buffers = buffer is not None and _buffer_started(buffer, step)
        for k, j in enumerate(g.leaves):
            param = leaves[j]
            entry: dict[str, Any] = {}
            if scaling is not None and (step > 0 or kind == "Adagrad"):
                entry["step"] = _step_value(step, kind_of_arrays)
                for key, field in _FIELDS[type(scaling)].items():
                    value = jax.tree.leaves(getattr(scaling, field))[k]
                    entry[key] = _export_leaf(value, param, names[j], layout)
            if buffer is not None and has_buffers:  # (the first test narrows the type)
                value = jax.tree.leaves(buffer.mu)[k]
                entry["momentum_buffer"] = _export_leaf(value, param, names[j], layout)
            if entry:
                out_state[index[j]] = {key: _as_torch(v, kind_of_arrays) if key != "step" else v
                                       for key, v in entry.items()}
        group: dict[str, Any] = {}
        for key in _GROUP_KEYS[kind]:
            if key == "decoupled_weight_decay":
                group[key] = kind == "AdamW"
            elif key in _SWITCHES:
                group[key] = _SWITCHES[key]
            elif key == "lr":
                group[key] = _rate(hyper["lr"], step)
            else:
                group[key] = _plain(hyper[key])
        group["params"] = sorted(index[j] for j in g.leaves)
        out_groups.append(group)
    return {"state": dict(sorted(out_state.items())), "param_groups": out_groups}


def _check_state(tx: Any, opt_state: Any, params: Any) -> None:
    """``opt_state`` must have the parts, leaf paths, shapes and dtypes of ``tx.init(params)``:
    the state of another optimizer or configuration, or of other parameters, would be exported
    as if it were this one's. Containers may differ where the paths agree (a dict for an
    ``nnx.State``), and Flax NNX Variables are seen through (``nnx.Optimizer`` wraps its state
    in them)."""
    expected = jax.eval_shape(tx.init, params)
    mine, theirs = [type(p).__name__ for p in _parts(opt_state)], [type(p).__name__ for p in _parts(expected)]
    if mine != theirs:
        raise ValueError(
            f"state_dict: opt_state is not a state of this tx: its parts are {mine}, "
            f"tx.init(params)'s are {theirs} (the state of another optimizer or configuration?)"
        )
    mine_leaves, theirs_leaves = check.leaves_with_path(opt_state), check.leaves_with_path(expected)
    for (path, i, a), (other, k, b) in zip(mine_leaves, theirs_leaves):
        here, there = _keystr(path, i), _keystr(other, k)
        if here != there:
            raise ValueError(
                f"state_dict: opt_state does not match tx.init(params): first difference at "
                f"opt_state{here} vs tx.init(params){there} (a state made for other params?)"
            )
        if np.shape(a) != tuple(b.shape) or jnp.result_type(a) != b.dtype:
            raise ValueError(
                f"state_dict: opt_state does not match tx.init(params) at {here}: opt_state has "
                f"{jnp.result_type(a)}{list(np.shape(a))}, tx.init(params) {b.dtype}{list(b.shape)} "
                "(a state made for params of other shapes or dtypes?)"
            )
    if len(mine_leaves) != len(theirs_leaves):
        longer, name = ((mine_leaves, "opt_state") if len(mine_leaves) > len(theirs_leaves)
                        else (theirs_leaves, "tx.init(params)"))
        path, i, _ = longer[min(len(mine_leaves), len(theirs_leaves))]
        raise ValueError(
            f"state_dict: opt_state does not match tx.init(params): {name}{_keystr(path, i)} has no "
            f"counterpart ({len(mine_leaves)} arrays in opt_state, {len(theirs_leaves)} in "
            "tx.init(params); a state made for other params?)"
        )


def _keystr(path: Any, i: int | None) -> str:
    return jax.tree_util.keystr(path) + (f"[{i}]" if i is not None else "")


def _step_of(*parts: Any) -> int:
    """The group's step: the first count its chain keeps (0 where it keeps none).

    A chain keeps none only with a constant learning rate and no dampening (``SGD``), where
    the step changes nothing PyTorch saves.
    """
    counts = [_count(p) for p in parts if _count(p) is not None]
    return int(np.asarray(counts[0])) if counts else 0


def _buffer_started(buffer: T.MomentumState | T.DampenedMomentumState, step: int) -> bool:
    """Whether PyTorch would hold this group's momentum buffers (it makes them at step 1).

    Without a counter of its own (``dampening=0``) a buffer counts as made once it is
    nonzero or the chain's step is past 0: PyTorch's first step ``b = g`` and an all-zero
    buffer's ``b = mu * 0 + g`` are then the same step.
    """
    if _count(buffer) is not None:
        return int(np.asarray(_count(buffer))) > 0
    return step > 0 or any(bool(np.any(np.asarray(b) != 0)) for b in jax.tree.leaves(buffer.mu))


def _export_leaf(value: Any, param: Any, name: str, layout: Layout | None) -> np.ndarray:
    array = np.asarray(value)
    if jnp.iscomplexobj(param) and not np.iscomplexobj(array) and array.shape == (*param.shape, 2):
        array = (array[..., 0] + 1j * array[..., 1]).astype(param.dtype)
    return np.asarray(layout(name, array)) if layout is not None else array


# --------------------------------------------------------------------------- load_state_dict


def load_state_dict(
    tx: optax.GradientTransformation,
    state_dict: Mapping[str, Any],
    params: PyTree,
    *,
    order: Sequence[str | int] | None = None,
    layout: Layout | None = None,
    step: int | None = None,
) -> PyTree:
    r"""The optax state that continues a PyTorch run from its optimizer's ``state_dict()``.

    ``tx`` must be the :mod:`rmsjax.compat.torch` optimizer (or
    :func:`rmsjax.compat.param_groups` of one) with the hyperparameters of the PyTorch
    optimizer that saved ``state_dict``, and ``params`` the parameters saved with it
    (``model.state_dict()`` converted to a tree). Then
    ``tx.update(grads, load_state_dict(tx, sd, params), params)`` makes the very step that
    PyTorch's ``optimizer.step()`` would have made next.

    Each parameter's state is copied into the fields of the chain's parts, found by their
    type (see the module's table); every step count of a group is set to the group's
    ``step``, and the recorded learning rate to the rate of the next update.

    Args:
      tx: the transformation to continue with.
      state_dict: ``optimizer.state_dict()`` (tensors or numpy arrays; integer or
        numeric-string parameter keys).
      params: the parameters, in rmsjax's tree.
      order: PyTorch's parameter order (paths or leaf indices), as for :func:`state_dict`.
      layout: ``layout(path, array) -> array`` applied to every PyTorch state array of the
        leaf at ``path`` before it is stored (e.g. transposing a ``Linear`` weight's
        ``(out, in)`` into a Flax kernel's ``(in, out)``).
      step: the number of ``optimizer.step()`` calls made, for ``SGD``, whose state has no
        step count (needed when its learning rate is a schedule); default: 1 if the
        momentum buffers exist, else 0.

    Returns:
      The optax state, with the structure of ``tx.init(params)``.

    Raises:
      ValueError: naming what is wrong: a state dict for another optimizer or
        configuration (an unexpected or missing key), a different number of groups or
        parameters, a hyperparameter that differs from ``tx``'s, a parameter whose saved
        state has another shape (its index, the key and both shapes) or is not an array of
        numbers, a sum or average of squares (``exp_avg_sq``, ``square_avg``, ...) with a
        negative value, or steps that differ within a group.
      TypeError: ``order`` or ``layout`` as for :func:`state_dict`.

    Example:
      >>> import jax.numpy as jnp, numpy as np
      >>> from rmsjax.compat import torch as pt
      >>> params = {"w": jnp.ones(2)}
      >>> sd = {  # torch.optim.Adam([w], lr=0.01).state_dict() after 3 steps, as numpy
      ...     "state": {0: {"step": np.float32(3), "exp_avg": np.ones(2), "exp_avg_sq": np.ones(2)}},
      ...     "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0,
      ...                       "amsgrad": False, "maximize": False, "params": [0]}]}
      >>> state = pt.load_state_dict(pt.Adam(lr=0.01), sd, params)
      >>> adam = state[2]  # the chain's ScaleByAdamState
      >>> int(adam.count), adam.mu["w"].tolist()
      (3, [1.0, 1.0])
    """
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("state_dict must be a PyTorch optimizer state dict with 'state' and 'param_groups'")
    if step is not None:
        step = _saved_step(step, "step=")
    _check_order(order)
    _check_layout(layout)
    init = tx.init(params)
    groups = _groups_of(tx, init, params)
    names = [n for n, _ in _groups._named_leaves(params)]
    leaves = jax.tree.leaves(params)
    index = _torch_order(groups, names, order)
    saved_groups = _saved_groups(state_dict["param_groups"])
    saved_state = _saved_entries(state_dict["state"])
    if len(saved_groups) != len(groups):
        raise ValueError(
            f"state_dict has {len(saved_groups)} parameter groups, tx has {len(groups)} for these params"
        )
    new_states = {}
    for position, (g, saved) in enumerate(zip(groups, saved_groups, strict=True)):
        kind = g.kind
        where = f"state_dict['param_groups'][{position}]"
        wanted = sorted(index[j] for j in g.leaves)
        if sorted(int(i) for i in saved.get("params", [])) != wanted:
            raise ValueError(
                f"{where}['params'] is {saved.get('params')}, tx's group holds parameters {wanted}"
            )
        _check_group(kind, saved, g.hyper, where)
        parts = _parts(g.state)
        expected = _expected_keys(parts)
        entries = {}
        for j in g.leaves:
            i = index[j]
            entry = saved_state.get(i, {})
            if entry:
                keys = set(entry)
                for key in sorted(keys - expected):
                    raise ValueError(
                        f"state_dict['state'][{i}] has the key {key!r}, which {_describe(kind, parts)} "
                        f"does not keep (a state dict for another optimizer or configuration?)"
                    )
                for key in sorted(expected - keys):
                    raise ValueError(
                        f"state_dict['state'][{i}] lacks the key {key!r} that {_describe(kind, parts)} keeps"
                    )
            entries[j] = entry
        steps = set()
        for j, entry in entries.items():
            if "step" in entry:
                steps.add(_saved_step(entry["step"], f"state_dict['state'][{index[j]}]['step']"))
            elif entry or kind != "SGD":
                steps.add(0)
        if kind == "SGD":
            has = {bool(e) for e in entries.values()}
            # A parameter that never had a gradient (frozen, unused) has no buffer in PyTorch.
            # Without dampening its first buffer is the gradient, as a zero buffer's is, so
            # it loads as zeros; with dampening its first step would differ from the others'.
            if len(has) > 1 and not common.is_concrete_zero(g.hyper.get("dampening", 0.0)):
                raise ValueError(
                    f"{where}: some parameters have a momentum buffer and some do not; with "
                    f"dampening={g.hyper.get('dampening')!r} a parameter without one takes PyTorch's "
                    "first-step rule (buffer = gradient) while the others do not, and rmsjax keeps "
                    "one step count per group"
                )
            if step is not None:
                steps = {step}
            elif check.is_schedule(g.hyper["lr"]):
                raise ValueError(
                    f"{where}: SGD's state_dict has no step count and this tx's lr is a schedule: "
                    "pass step= (the optimizer.step() calls made) so that the schedule resumes"
                )
            else:
                steps = {1 if True in has else 0}
        if len(steps) != 1:
            raise ValueError(
                f"{where}: the parameters' steps differ ({sorted(steps)}); rmsjax keeps one per group"
            )
        count = steps.pop()
        if kind != "SGD" and count > 0 and any(not e for e in entries.values()):
            raise ValueError(f"{where}: some parameters have no saved state")
        lr = g.hyper["lr"]
        if kind == "Adagrad":  # the rate rmsjax records is the decayed one
            lr = common.divided_by_decay(lr, g.hyper["lr_decay"])
        new_states[g.label] = _rebuild(
            g.state, lambda part: _fill(part, entries, g, count, lr, index, leaves, names, layout)
        )
    if isinstance(tx, _groups.ParamGroups):
        return _groups.ParamGroupsState({label: optax.MaskedState(s) for label, s in new_states.items()})
    return new_states[None]


def _saved_groups(groups: Any) -> list:
    if isinstance(groups, Mapping) or not isinstance(groups, Sequence) or isinstance(groups, str):
        raise ValueError(
            f"state_dict['param_groups'] must be a list of group dicts (PyTorch's format), got "
            f"{type(groups).__name__}"
        )
    for i, group in enumerate(groups):
        if not isinstance(group, Mapping):
            raise ValueError(f"state_dict['param_groups'][{i}] must be a dict, got {type(group).__name__}")
    return list(groups)


def _saved_entries(state: Any) -> dict[int, Mapping]:
    if not isinstance(state, Mapping):
        raise ValueError(
            f"state_dict['state'] must be a dict of parameter states, got {type(state).__name__}"
        )
    out = {}
    for key, entry in state.items():
        try:
            if isinstance(key, bool) or isinstance(key, float):
                raise ValueError
            index = int(key)
        except (TypeError, ValueError):
            raise ValueError(
                f"state_dict['state'] has the key {key!r}, which is not a parameter index (an int or a "
                f"numeric string)"
            ) from None
        if not isinstance(entry, Mapping):
            raise ValueError(f"state_dict['state'][{key!r}] must be a dict, got {type(entry).__name__}")
        out[index] = entry
    return out


_MAX_STEP = 2**31 - 1  # rmsjax's int32 step counts


def _saved_step(value: Any, where: str) -> int:
    """A saved ``step`` as an int: a scalar, finite, whole number in [0, 2**31 - 1]."""
    array = _to_numpy(value)
    numeric = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    if array.shape != () or not numeric:
        raise ValueError(
            f"{where} must be a scalar step count, got an array of shape {array.shape} and dtype "
            f"{array.dtype}"
        )
    x = float(array)
    if not math.isfinite(x) or x != math.floor(x) or not 0 <= x <= _MAX_STEP:
        raise ValueError(
            f"{where} must be a whole number of steps in [0, {_MAX_STEP}] (rmsjax counts in int32), got {x!r}"
        )
    return int(x)


def _describe(kind: str, parts: list) -> str:
    return f"this tx (torch.optim.{kind}, keys {sorted(_expected_keys(parts))})"


def _check_group(kind: str, saved: Mapping, hyper: Mapping, where: str) -> None:
    for key in _GROUP_KEYS[kind]:
        if key not in _SWITCHES and key != "decoupled_weight_decay" and key not in saved:
            raise ValueError(
                f"{where} lacks {key!r}: not a torch.optim.{kind} state dict (its keys: {sorted(saved)})"
            )
    if "decoupled_weight_decay" in saved and bool(saved["decoupled_weight_decay"]) != (kind == "AdamW"):
        other = "AdamW" if saved["decoupled_weight_decay"] else "Adam"
        raise ValueError(f"{where} is a torch.optim.{other} state dict, tx is {kind}")
    for key in _GROUP_KEYS[kind]:
        if key in _SWITCHES or key == "decoupled_weight_decay" or key not in saved:
            continue
        ours = hyper[key]
        if key == "lr" and check.is_schedule(ours):
            continue
        a, b = _plain(ours), _plain(saved[key])
        same = a == b if isinstance(a, (bool, tuple)) or isinstance(b, (bool, tuple)) else (
            math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0))
        if not same:
            raise ValueError(f"{where}[{key!r}] is {saved[key]!r}, tx's group has {key}={ours!r}")


def _fill(part, entries, g, count, lr, index, leaves, names, layout):
    fields = part._asdict()
    if fields.get("count") is not None:
        fields["count"] = jnp.full_like(part.count, count)
    if isinstance(part, _RATES):
        # Its other field is the read-out of the next update's rate.
        rate = _rate(lr, count)
        for field, value in fields.items():
            if field != "count" and value is not None:
                fields[field] = jnp.full_like(value, rate)
    mapping = dict(_FIELDS.get(type(part), {}))
    if isinstance(part, _BUFFERS):
        mapping = {"momentum_buffer": "mu"}
    for key, field in mapping.items():
        current, treedef = jax.tree.flatten(fields[field])
        for k, j in enumerate(g.leaves):
            entry = entries[j]
            if key in entry:
                current[k] = _import_leaf(entry[key], current[k], leaves[j], names[j], index[j], key, layout)
        fields[field] = jax.tree.unflatten(treedef, current)
    return type(part)(**fields)


# PyTorch keys of sums or averages of squares: never negative (a negative one makes the next
# update NaN, through the square root of the denominator).
_NON_NEGATIVE = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "acc_delta")


def _import_leaf(value, like, param, name, i, key, layout) -> jax.Array:
    array = _to_numpy(value)
    where = f"state_dict['state'][{i}][{key!r}]"
    if not any(jnp.issubdtype(array.dtype, t) for t in (jnp.integer, jnp.floating, jnp.complexfloating)):
        raise ValueError(
            f"{where} must be an array of numbers (a tensor of a real or complex dtype), got "
            f"{type(value).__name__} of dtype {array.dtype}"
        )
    if key in _NON_NEGATIVE:
        parts = (np.real(array), np.imag(array)) if np.iscomplexobj(array) else (array,)
        negative = [np.argwhere(np.asarray(p < 0)) for p in parts]
        found = next((n for n in negative if n.size), None)
        if found is not None:
            at = tuple(int(x) for x in found[0])
            raise ValueError(
                f"{where} (parameter {i}, {name!r}) has a negative value at index {at}: a sum or "
                "average of squares, which PyTorch never makes negative (the next update would be NaN)"
            )
    if layout is not None:
        array = np.asarray(layout(name, array))
    if array.shape != tuple(param.shape):
        raise ValueError(
            f"state_dict['state'][{i}][{key!r}] has shape {array.shape}, but parameter {i} "
            f"({name!r}) has shape {tuple(param.shape)}; pass layout= to convert"
        )
    if np.iscomplexobj(array) != jnp.iscomplexobj(param):
        raise ValueError(
            f"state_dict['state'][{i}][{key!r}] is {array.dtype}, but parameter {i} ({name!r}) is "
            f"{param.dtype}: PyTorch keeps complex state for a complex parameter and real state for "
            "a real one (a checkpoint of other parameters?)"
        )
    if np.iscomplexobj(array) and not jnp.iscomplexobj(like):
        array = np.stack([array.real, array.imag], axis=-1)  # pyright: ignore[reportAttributeAccessIssue]
    return jnp.asarray(array.astype(like.dtype))
