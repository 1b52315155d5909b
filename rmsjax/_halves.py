"""The new value of a packed 4-bit moment, computed on the two halves of its blocks.

A 4-bit block of ``B`` elements is stored in ``B/2`` bytes: element ``j`` in the low nibble of
byte ``j``, element ``j + B/2`` in its high nibble (:mod:`rmsjax._codec`). XLA writes the new
bytes over the old ones (no copy of the codes, as donation asks) only when the loop that
writes them reads the old bytes element by element: byte ``j`` from byte ``j``. The new moment
that the wrapped update returns is computed from the *unpacked* old codes, so a loop that
packs it reads each old byte through a broadcast, and XLA copies the codes first (0.5 B/param
per moment at the step's peak).

:func:`halves` recomputes that new moment on each half of the blocks separately,
``new[..., :B/2]`` from the low nibbles and ``new[..., B/2:]`` from the high ones, by
re-running the operations of the update's jaxpr that lead to it on half-sized arrays. That is
possible where those operations are elementwise (every RMSprop-family rule is: a leaky average,
a running sum, a momentum buffer, bias corrections computed on scalars), and it gives the same
bits, since each element goes through the same operations on the same values. Anything else on
the way (a reduction over the moment's elements, a reshape, a broadcast along an axis) makes it
give up, and :func:`rmsjax.quantized` packs the new moment as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.core  # jax deletes its own alias; named here so type checkers see jax.core
import jax.extend.core as jex
from jax import lax

__all__ = ["Memo", "halves", "split", "traced"]

# Primitives that apply one scalar function to each element (their operands: the same shape,
# or rank 0). Only these are re-run on halves.
ELEMENTWISE = frozenset({
    "abs", "acos", "acosh", "add", "and", "asin", "asinh", "atan", "atan2", "atanh", "cbrt",
    "ceil", "clamp", "convert_element_type", "copy", "copy_p", "cos", "cosh", "div", "eq", "erf",
    "erf_inv", "erfc", "exp", "exp2", "expm1", "floor", "ge", "gt", "integer_pow", "is_finite",
    "le", "log", "log1p", "logistic", "lt", "max", "min", "mul", "ne", "neg", "nextafter", "not",
    "or", "pow", "reduce_precision", "rem", "round", "rsqrt", "select_n", "sign", "sin", "sinh",
    "sqrt", "square", "sub", "tan", "tanh", "xor",
})

# Parameters under which a call primitive (a nested jit, a custom derivative rule) keeps the
# jaxpr it runs.
_CALLED = ("jaxpr", "call_jaxpr")

Pair = tuple[jax.Array, jax.Array]


def split(x: jax.Array, blocked: tuple[int, ...], shape: tuple[int, ...]) -> Pair:
    """``x`` (any shape with ``prod(blocked)`` elements) cut into the low and the high half of
    each block, each reshaped to ``shape`` (that of the packed codes: the halves are computed
    in it, since a loop that reshapes the codes it reads cannot write them in place)."""
    half = blocked[-1] // 2
    b = x.reshape(blocked)
    return b[..., :half].reshape(shape), b[..., half:].reshape(shape)


def _literal(v: Any) -> bool:
    return isinstance(v, jex.Literal)


def _shape(v: Any) -> tuple[int, ...] | None:
    """The variable's shape; None for one that is not an array (a token)."""
    shape = getattr(v.aval, "shape", None)
    return None if shape is None else tuple(shape)


class Memo:
    """What :func:`halves` keeps between the moments of one update: the rank-0 values computed
    so far (they do not depend on the moment) and, for each jaxpr, which equation computes
    each variable and in what order."""

    def __init__(self) -> None:
        self.scalars: dict[Any, Any] = {}
        self._programs: dict[int, tuple[Any, dict[Any, Any], dict[int, int]]] = {}

    def program(self, jaxpr: Any) -> tuple[dict[Any, Any], dict[int, int]]:
        if id(jaxpr) not in self._programs:  # the jaxpr is kept, so its id is not reused
            producer = {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}
            order = {id(e): i for i, e in enumerate(jaxpr.eqns)}
            self._programs[id(jaxpr)] = (jaxpr, producer, order)
        return self._programs[id(jaxpr)][1:]


class _Evaluator:
    """Values of one jaxpr's variables on halves (a :data:`Pair` for a variable shaped like
    the moment, the whole value for a rank-0 one, ``None`` where neither is known). ``inputs``:
    the jaxpr's inputs, each computed when first read."""

    def __init__(self, jaxpr: Any, shape: tuple[int, ...], half: tuple[int, ...],
                 inputs: dict[Any, Callable[[], Any]], scalars: dict[Any, Any], memo: Memo):
        self.jaxpr, self.shape, self.half, self.memo = jaxpr, shape, half, memo
        self.inputs = inputs
        self.values: dict[Any, Any] = {}
        self.scalars = scalars
        self.producer, self.order = memo.program(jaxpr)

    def read(self, v: Any) -> Any:
        if _literal(v):
            return v.val
        if v not in self.values and v in self.inputs:
            self.values[v] = self.inputs[v]()
        if v in self.values:
            return self.values[v]
        return self.scalars.get(v)

    def run(self, targets: Sequence[Any]) -> list[Any]:
        needed: list[Any] = []
        seen: set[int] = set()
        stack = [v for v in targets if not _literal(v)]
        while stack:
            v = stack.pop()
            eqn = self.producer.get(v)
            if eqn is None or id(eqn) in seen or v in self.values or v in self.scalars or v in self.inputs:
                continue
            seen.add(id(eqn))
            needed.append(eqn)
            stack.extend(x for x in eqn.invars if not _literal(x))
        for eqn in sorted(needed, key=lambda e: self.order[id(e)]):
            outs = self.apply(eqn)
            for v, value in zip(eqn.outvars, outs, strict=True):
                if _shape(v) == ():
                    self.scalars[v] = value
                else:
                    self.values[v] = value
        return [self.read(v) for v in targets]

    def apply(self, eqn: Any) -> list[Any]:
        unknown = [None] * len(eqn.outvars)
        args = [self.read(v) for v in eqn.invars]
        shapes = [() if _literal(v) else _shape(v) for v in eqn.invars]
        if any(a is None for a in args):
            return unknown
        if all(s == () for s in shapes) and all(_shape(v) == () for v in eqn.outvars):
            return _bind(eqn, args)
        if any(s not in ((), self.shape) for s in shapes) \
                or any(_shape(v) != self.shape for v in eqn.outvars):
            return unknown
        name = eqn.primitive.name
        if name in ELEMENTWISE and eqn.params.get("sharding") is None:
            return [tuple(eqn.primitive.bind(*(a[k] if s else a for a, s in zip(args, shapes, strict=True)),
                                             **eqn.params) for k in (0, 1))]
        if name == "broadcast_in_dim" and shapes == [()]:
            return [tuple(lax.broadcast_in_dim(args[0], self.half, ()) for _ in (0, 1))]
        called = [eqn.params[k] for k in _CALLED if isinstance(eqn.params.get(k), jex.ClosedJaxpr)]
        if len(called) == 1:
            sub = called[0]
            values = zip((*sub.jaxpr.constvars, *sub.jaxpr.invars), (*sub.consts, *args), strict=True)
            inputs = {v: (lambda value=value: value) for v, value in values}
            return _Evaluator(sub.jaxpr, self.shape, self.half, inputs, {}, self.memo).run(sub.jaxpr.outvars)
        return unknown


def _bind(eqn: Any, args: Sequence[Any]) -> list[Any]:
    """``eqn`` applied to ``args`` (its whole values). jax 0.8's ``get_bind_params`` returns
    ``(subfuns, params)``, later versions the params alone."""
    bind = eqn.primitive.get_bind_params(eqn.params)
    subfuns, params = bind if isinstance(bind, tuple) else ((), bind)
    out = eqn.primitive.bind(*subfuns, *args, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def halves(closed: Any, args: Sequence[Any], targets: Sequence[int], blocked: tuple[int, ...],
           half: tuple[int, ...], given: dict[int, Callable[[], Pair]], memo: Memo) -> list[Pair | None]:
    """The low and high halves of the blocks of outputs ``targets`` of the jaxpr ``closed``,
    evaluated at ``args``, re-running only elementwise operations on halves.

    Args:
      closed: a ``ClosedJaxpr``.
      args: its arguments.
      targets: indices of its outputs, each shaped like the moment.
      blocked: the moment's blocked shape (its leading axes, blocks, elements per block).
      half: the shape each half is computed in (that of the packed codes).
      given: how to compute the halves of some arguments (by index), from the caller (the
        decoded stored moments, straight from their codes); every other argument shaped like
        the moment is cut with :func:`split`.
      memo: a :class:`Memo`, shared between calls on the same ``closed``.

    Returns:
      Each target's halves, or ``None`` where an operation on its way is not elementwise.
    """
    jaxpr = closed.jaxpr
    shape = _shape(jaxpr.outvars[targets[0]]) if targets else None
    if not shape:  # no target, or not an array: nothing to compute
        return [None] * len(targets)
    inputs: dict[Any, Callable[[], Any]] = {}
    for i, (v, a) in enumerate(zip((*jaxpr.constvars, *jaxpr.invars), (*closed.consts, *args), strict=True)):
        j = i - len(jaxpr.constvars)
        if j in given:
            inputs[v] = given[j]
        elif _shape(v) == shape:
            inputs[v] = lambda a=a: split(a, blocked, half)
        elif _shape(v) == ():
            memo.scalars.setdefault(v, a)
    evaluator = _Evaluator(jaxpr, shape, half, inputs, memo.scalars, memo)
    out = evaluator.run([jaxpr.outvars[t] for t in targets])
    return [o if isinstance(o, tuple) else None for o in out]


def traced(fn: Callable[..., Any], *args: Any) -> tuple[Any, Any, list[Any]]:
    """``fn(*args)`` traced to a jaxpr: (the ``ClosedJaxpr``, the output tree, the flat
    arguments). Leaves of ``args`` that are not arrays stay Python values (closed over)."""
    leaves, treedef = jax.tree.flatten(args)
    dynamic = [i for i, x in enumerate(leaves) if isinstance(x, (jax.Array, jax.core.Tracer))]

    def flat_fn(*dyn: Any) -> Any:
        full = list(leaves)
        for i, x in zip(dynamic, dyn, strict=True):
            full[i] = x
        return fn(*jax.tree.unflatten(treedef, full))

    dyn_args = [leaves[i] for i in dynamic]
    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*dyn_args)
    return closed, jax.tree.structure(out_shape), dyn_args
