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
re-running the operations of the update's jaxpr that lead to it: on half-sized arrays for the
operations that depend on a stored moment, which must be elementwise (every RMSprop-family
rule is: a leaky average, a running sum, a momentum buffer); whole, as in the update itself,
for those that do not (bias corrections, learning rates, a global norm of the gradient), whose
results are then cut in halves where needed. It gives the same bits, since each element goes
through the same operations on the same values. An operation that is not elementwise on a
value that depends on a stored moment (a norm of the moment, a reshape, a broadcast along an
axis) makes it give up, and :func:`rmsjax.quantized` packs the whole new moment as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.core  # jax deletes its own alias; named here so type checkers see jax.core
import jax.extend.core as jex

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
    """What :func:`halves` keeps between the moments of one update: the whole values computed
    so far of variables that do not depend on any stored moment (they are the same for every
    moment), and, for each jaxpr, which equation computes each variable and in what order."""

    def __init__(self) -> None:
        self.whole: dict[Any, Any] = {}
        self._programs: dict[int, tuple[Any, dict[Any, Any], dict[int, int]]] = {}

    def program(self, jaxpr: Any) -> tuple[dict[Any, Any], dict[int, int]]:
        if id(jaxpr) not in self._programs:  # the jaxpr is kept, so its id is not reused
            producer = {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}
            order = {id(e): i for i, e in enumerate(jaxpr.eqns)}
            self._programs[id(jaxpr)] = (jaxpr, producer, order)
        return self._programs[id(jaxpr)][1:]


class _Whole(NamedTuple):
    """A variable that depends on no stored moment: its whole value (any shape)."""

    value: Any


class _Halves(NamedTuple):
    """A variable that depends on a stored moment: its halves (shaped like the moment)."""

    pair: Pair


Value = _Whole | _Halves | None  # None: depends on a stored moment, halves not computable


class _Evaluator:
    """The values of one jaxpr's variables, computed on demand.

    A variable that depends on no stored moment is computed whole, by the same operation as in
    the update (XLA merges the two), whatever the operation: a global norm of the gradient is
    fine. A variable that depends on one is computed on halves, which only elementwise
    operations allow; anything else makes it (and what depends on it) unknown.

    ``inputs``: the jaxpr's input variables, each with a function giving its :data:`Value`.
    ``whole``: the whole values known so far (shared between moments for the update's jaxpr).
    """

    def __init__(self, jaxpr: Any, shape: tuple[int, ...], blocked: tuple[int, ...], half: tuple[int, ...],
                 inputs: dict[Any, Callable[[], Value]], whole: dict[Any, Any], memo: Memo):
        self.shape, self.blocked, self.half, self.memo = shape, blocked, half, memo
        self.inputs, self.whole = inputs, whole
        self.values: dict[Any, Value] = {}
        self.splits: dict[Any, Pair] = {}
        self.producer, self.order = memo.program(jaxpr)

    def known(self, v: Any) -> bool:
        return _literal(v) or v in self.values or v in self.whole or v in self.inputs

    def read(self, v: Any) -> Value:
        if _literal(v):
            return _Whole(v.val)
        if v in self.whole:
            return _Whole(self.whole[v])
        if v not in self.values and v in self.inputs:
            self.values[v] = self.inputs[v]()
        return self.values.get(v)

    def pair(self, v: Any, value: Value) -> Any:
        """An operand of an operation on halves: its halves, or a rank-0 value itself."""
        if isinstance(value, _Halves):
            return value.pair
        assert isinstance(value, _Whole)
        if _shape(v) == ():
            return (value.value, value.value)
        if v not in self.splits:
            self.splits[v] = split(value.value, self.blocked, self.half)
        return self.splits[v]

    def run(self, targets: Sequence[Any]) -> list[Value]:
        needed: list[Any] = []
        seen: set[int] = set()
        stack = [v for v in targets if not self.known(v)]
        while stack:
            v = stack.pop()
            eqn = self.producer.get(v)
            if eqn is None or id(eqn) in seen:
                continue
            seen.add(id(eqn))
            needed.append(eqn)
            stack.extend(x for x in eqn.invars if not self.known(x))
        for eqn in sorted(needed, key=lambda e: self.order[id(e)]):
            for v, value in zip(eqn.outvars, self.apply(eqn), strict=True):
                if isinstance(value, _Whole):
                    self.whole[v] = value.value
                else:
                    self.values[v] = value
        return [self.read(v) for v in targets]

    def apply(self, eqn: Any) -> list[Value]:
        args = [self.read(v) for v in eqn.invars]
        if all(isinstance(a, _Whole) for a in args):
            return [_Whole(x) for x in _bind(eqn, [a.value for a in args])]  # pyright: ignore
        unknown: list[Value] = [None] * len(eqn.outvars)
        if any(a is None for a in args):
            return unknown
        if any(_shape(v) not in ((), self.shape) for v in eqn.invars if not _literal(v)) \
                or any(_shape(v) != self.shape for v in eqn.outvars):
            return unknown
        pairs = [self.pair(v, a) for v, a in zip(eqn.invars, args, strict=True)]
        if eqn.primitive.name in ELEMENTWISE and eqn.params.get("sharding") is None:
            return [_Halves(tuple(eqn.primitive.bind(*(p[k] for p in pairs), **eqn.params)
                                  for k in (0, 1)))]  # pyright: ignore[reportArgumentType]
        called = [eqn.params[k] for k in _CALLED if isinstance(eqn.params.get(k), jex.ClosedJaxpr)]
        if len(called) == 1:
            sub = called[0]
            inputs: dict[Any, Callable[[], Value]] = {
                v: (lambda c=c: _Whole(c)) for v, c in zip(sub.jaxpr.constvars, sub.consts, strict=True)}
            inputs.update({v: (lambda a=a: a) for v, a in zip(sub.jaxpr.invars, args, strict=True)})
            sub_evaluator = _Evaluator(sub.jaxpr, self.shape, self.blocked, self.half, inputs, {}, self.memo)
            return sub_evaluator.run(sub.jaxpr.outvars)
        return unknown


def _bind(eqn: Any, args: Sequence[Any]) -> list[Any]:
    """``eqn`` applied to ``args`` (its whole values). jax 0.8's ``get_bind_params`` returns
    ``(subfuns, params)``, later versions the params alone."""
    bind = eqn.primitive.get_bind_params(eqn.params)
    subfuns, params = bind if isinstance(bind, tuple) else ((), bind)
    out = eqn.primitive.bind(*subfuns, *args, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def halves(closed: Any, args: Sequence[Any], targets: Sequence[int], blocked: tuple[int, ...],
           half: tuple[int, ...], given: dict[int, Callable[[], Pair]], stored: set[int],
           memo: Memo) -> list[Pair | None]:
    """The low and high halves of the blocks of outputs ``targets`` of the jaxpr ``closed``,
    evaluated at ``args``.

    Args:
      closed: a ``ClosedJaxpr``.
      args: its arguments.
      targets: indices of its outputs, each shaped like the moment.
      blocked: the moment's blocked shape (its leading axes, blocks, elements per block).
      half: the shape each half is computed in (that of the packed codes).
      given: how to compute the halves of some arguments (by index), from the caller (the
        decoded stored moments of this layout, straight from their codes).
      stored: the indices of every argument that is a decoded stored moment (those not in
        ``given`` have no halves here: what depends on them is unknown).
      memo: a :class:`Memo`, shared between calls on the same ``closed``.

    Returns:
      Each target's halves, or ``None`` where an operation that depends on a stored moment is
      not elementwise.
    """
    jaxpr = closed.jaxpr
    shape = _shape(jaxpr.outvars[targets[0]]) if targets else None
    if not shape:  # no target, or not an array: nothing to compute
        return [None] * len(targets)
    inputs: dict[Any, Callable[[], Value]] = {}
    n_const = len(jaxpr.constvars)
    for i, (v, a) in enumerate(zip((*jaxpr.constvars, *jaxpr.invars), (*closed.consts, *args), strict=True)):
        j = i - n_const
        if j in given:
            inputs[v] = lambda j=j: _Halves(given[j]())
        elif j in stored:
            inputs[v] = lambda: None
        else:
            memo.whole.setdefault(v, a)
    evaluator = _Evaluator(jaxpr, shape, blocked, half, inputs, memo.whole, memo)
    out: list[Pair | None] = []
    for value in evaluator.run([jaxpr.outvars[t] for t in targets]):
        if isinstance(value, _Halves):
            out.append(value.pair)
        elif isinstance(value, _Whole):  # a new moment that does not depend on the stored ones
            out.append(split(value.value, blocked, half))
        else:
            out.append(None)
    return out


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
