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
re-running the operations of the update's jaxpr that lead to it: on half-sized arrays where
they are elementwise, which those that depend on a stored moment must be (every
RMSprop-family rule is: a leaky average, a running sum, a momentum buffer); whole, as in the
update itself, for the others, which depend on no stored moment (bias corrections, learning
rates, a global norm of the gradient), cut in halves where needed. Each element goes through
the same operations on the same values, so the codes are those of packing the whole moment
(up to XLA contracting a multiply-add in one loop and not the other). An operation that is
not elementwise on a value that depends on a stored moment (a norm of the moment, a reshape,
a broadcast along an axis) makes it give up, and :func:`rmsjax.quantized` packs the whole new
moment as before.

The same evaluator gives :func:`rmsjax.quantized` computations of a new moment that XLA does
not merge with the update's own, so that two loops do not share a full-size float32 value: the
halves of an 8-bit moment's blocks (sliced from its codes) for the reduction of its block
maxima, and, with ``half=None``, the whole moment as one piece, from codes decoded by other
operations, for an 8-bit encode.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.core  # jax deletes its own alias; named here so type checkers see jax.core
import jax.extend.core as jex
import jax.numpy as jnp

__all__ = ["EXPENSIVE", "Costly", "Memo", "ancestors", "halves", "split", "traced"]

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
Pieces = tuple[jax.Array, ...]  # the halves of a moment's blocks, or the whole moment alone


def split(x: jax.Array, blocked: tuple[int, ...], shape: tuple[int, ...]) -> Pair:
    """``x`` (any shape with ``prod(blocked)`` elements) cut into the low and the high half of
    each block, each reshaped to ``shape`` (at 4 bits that of the packed codes: the halves are
    computed in it, since a loop that reshapes the codes it reads cannot write them in place)."""
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
    moment), which variables do, and, for each jaxpr, which equation computes each variable
    and in what order."""

    def __init__(self) -> None:
        self.whole: dict[Any, Any] = {}
        self.tainted: set[Any] | None = None
        self.reduced: set[Any] | None = None
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
    """A variable that depends on a stored moment: its halves (shaped like the moment), or the
    whole of it as one piece."""

    pair: Pieces


Value = _Whole | _Halves | None  # None: depends on a stored moment, halves not computable


def _tainted(jaxpr: Any, inputs: set[Any]) -> set[Any]:
    """The variables of ``jaxpr`` that depend on the variables ``inputs``."""
    tainted = set(inputs)
    for eqn in jaxpr.eqns:
        if any(not _literal(v) and v in tainted for v in eqn.invars):
            tainted.update(eqn.outvars)
    return tainted


def ancestors(jaxpr: Any, outputs: Sequence[Any]) -> set[Any]:
    """The variables of ``jaxpr`` that ``outputs`` (some of its variables) are computed from,
    themselves included."""
    producer = {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}
    found: set[Any] = set()
    stack = [v for v in outputs if not _literal(v)]
    while stack:
        v = stack.pop()
        if v in found:
            continue
        found.add(v)
        eqn = producer.get(v)
        if eqn is not None:
            stack.extend(x for x in eqn.invars if not _literal(x))
    return found


# Primitives that XLA counts as expensive: it computes one once and writes it out rather than
# repeat it in each loop that reads it.
EXPENSIVE = frozenset({
    "acos", "acosh", "asin", "asinh", "atan", "atan2", "atanh", "cbrt", "cos", "cosh", "div",
    "erf", "erf_inv", "erfc", "exp", "exp2", "expm1", "log", "log1p", "logistic", "pow", "rem",
    "rsqrt", "sin", "sinh", "sqrt", "tan", "tanh",
})


class Costly:
    """Which variables of ``jaxpr`` are computed through an :data:`EXPENSIVE` operation on a
    value that depends on the variables ``inputs`` (the stored moments), nested jits included.
    Built once per jaxpr; each question walks back only through the values that depend on
    ``inputs`` (one moment's rule, not the gradient's global norm that every leaf shares)."""

    def __init__(self, jaxpr: Any, inputs: set[Any]):
        self.jaxpr, self.tainted = jaxpr, _tainted(jaxpr, inputs)
        self.producer = {x: eqn for eqn in jaxpr.eqns for x in eqn.outvars}

    def __call__(self, v: Any) -> bool:
        stack, seen = [v], set()
        while stack:
            x = stack.pop()
            if _literal(x) or x in seen or x not in self.tainted:
                continue
            seen.add(x)
            eqn = self.producer.get(x)
            if eqn is None:
                continue
            if eqn.primitive.name in EXPENSIVE or self._inside(eqn):
                return True
            stack.extend(eqn.invars)
        return False

    def _inside(self, eqn: Any) -> bool:
        for k in _CALLED:
            sub = eqn.params.get(k)
            if isinstance(sub, jex.ClosedJaxpr):
                inner = Costly(sub.jaxpr, {i for i, o in zip(sub.jaxpr.invars, eqn.invars, strict=True)
                                           if not _literal(o) and o in self.tainted})
                if any(inner(out) for out in sub.jaxpr.outvars if not _literal(out)):
                    return True
        return False


def _reduced(jaxpr: Any) -> set[Any]:
    """The variables of ``jaxpr`` that depend on an operation other than an elementwise one
    over an array (a global norm of the gradient, for clipping)."""
    reduced: set[Any] = set()
    for eqn in jaxpr.eqns:
        if any(not _literal(v) and v in reduced for v in eqn.invars):
            reduced.update(eqn.outvars)
            continue
        called = [eqn.params[k] for k in _CALLED if isinstance(eqn.params.get(k), jex.ClosedJaxpr)]
        if len(called) == 1:  # a nested jit: as reduced as what it computes
            inner = _reduced(called[0].jaxpr)
            reduced.update(v for v, o in zip(eqn.outvars, called[0].jaxpr.outvars, strict=True)
                           if not _literal(o) and o in inner)
        elif eqn.primitive.name not in ELEMENTWISE \
                and any(not _literal(v) and _shape(v) != () for v in eqn.invars):
            reduced.update(eqn.outvars)
    return reduced


class _Evaluator:
    """The values of one jaxpr's variables, computed on demand.

    A variable shaped like the moment is computed on halves where it comes from an elementwise
    operation and depends on a stored moment, or on no reduction (``reduced``): cutting a whole
    intermediate of the moment's own computation in halves made XLA:CPU's loop several times
    slower. Any other variable that depends on no stored moment is computed whole, by the same
    operation as in the update (XLA merges the two), whatever the operation (a global norm of
    the gradient); its halves, where needed, are cut from it (recomputing a clipped gradient on
    halves made XLA write both out: 4-bit clipped Adam 17.13 B/param at its peak, against
    13.19 cut from the whole). A variable that depends on a stored moment through any other
    operation is unknown (None).

    ``inputs``: the jaxpr's input variables, each with a function giving its value.
    ``whole``: the whole values known so far (shared between moments for the update's jaxpr).
    ``tainted``: the variables that depend on a stored moment; ``reduced``: those that depend on
    a reduction (:func:`_reduced`). ``whole_inputs``: for a nested jaxpr, how to get the whole
    value of an input given as halves that depends on no stored moment.
    """

    def __init__(self, jaxpr: Any, shape: tuple[int, ...], blocked: tuple[int, ...],
                 half: tuple[int, ...] | None, inputs: dict[Any, Callable[[], Value]],
                 whole: dict[Any, Any], tainted: set[Any], reduced: set[Any], memo: Memo,
                 whole_inputs: dict[Any, Callable[[], Any]] | None = None):
        self.shape, self.blocked, self.half, self.memo = shape, blocked, half, memo
        self.inputs, self.whole, self.tainted, self.reduced = inputs, whole, tainted, reduced
        self.whole_inputs = whole_inputs or {}
        self.resolved: dict[Any, Value] = {}
        self.pairs: dict[Any, Pieces | None] = {}
        self.n = 1 if half is None else 2
        self.producer, self.order = memo.program(jaxpr)

    def input(self, v: Any) -> Value:
        if v not in self.resolved:
            self.resolved[v] = self.inputs[v]()
        return self.resolved[v]

    def whole_value(self, v: Any) -> Any:
        """The whole value of ``v``, which depends on no stored moment; the equations it needs
        are run in the jaxpr's order (no recursion: a global norm chains hundreds of them)."""
        needed: list[Any] = []
        seen: set[int] = set()
        stack = [v]
        while stack:
            x = stack.pop()
            if _literal(x) or x in self.whole or x in self.inputs:
                continue
            eqn = self.producer[x]
            if id(eqn) not in seen:
                seen.add(id(eqn))
                needed.append(eqn)
                stack.extend(eqn.invars)
        for eqn in sorted(needed, key=lambda e: self.order[id(e)]):
            outs = _bind(eqn, [self.read_whole(x) for x in eqn.invars])
            self.whole.update(zip(eqn.outvars, outs, strict=True))
        return self.read_whole(v)

    def read_whole(self, v: Any) -> Any:
        if _literal(v):
            return v.val
        if v in self.inputs:
            value = self.input(v)
            if isinstance(value, _Whole):
                return value.value
            if v not in self.whole:  # given as halves, and depends on no stored moment
                self.whole[v] = self.whole_inputs[v]()
        return self.whole[v]

    def cut(self, x: Any) -> Pieces:
        """A value shaped like the moment (or with as many elements) in pieces: its halves, or
        itself alone when ``half`` is None."""
        return (jnp.reshape(x, self.shape),) if self.half is None else split(x, self.blocked, self.half)

    def pair(self, v: Any) -> Pieces | None:
        """The halves of ``v`` (shaped like the moment), or None where they are unknown."""
        if v not in self.pairs:
            self.pairs[v] = self._pair(v)
        return self.pairs[v]

    def _pair(self, v: Any) -> Pieces | None:
        if v in self.inputs:
            value = self.input(v)
            if isinstance(value, _Whole):
                return self.cut(value.value)
            return None if value is None else value.pair
        eqn = self.producer.get(v)
        if eqn is None or (v in self.reduced and v not in self.tainted):  # an argument, or cut
            return self.cut(self.whole_of(v))
        shapes = [() if _literal(x) else _shape(x) for x in eqn.invars]
        eligible = all(s in ((), self.shape) for s in shapes) \
            and all(_shape(x) == self.shape for x in eqn.outvars)
        if eligible and eqn.primitive.name in ELEMENTWISE and eqn.params.get("sharding") is None:
            operands = []
            for x, s in zip(eqn.invars, shapes, strict=True):
                if s == ():
                    if not _literal(x) and x in self.tainted:
                        return None
                    whole = self.whole_of(x)
                    operands.append((whole,) * self.n)
                else:
                    pair = self.pair(x)
                    if pair is None:
                        return None
                    operands.append(pair)
            return tuple(eqn.primitive.bind(*(o[k] for o in operands), **eqn.params)
                         for k in range(self.n))
        called = [eqn.params[k] for k in _CALLED if isinstance(eqn.params.get(k), jex.ClosedJaxpr)]
        if eligible and len(called) == 1:
            sub = called[0]
            inputs: dict[Any, Callable[[], Value]] = {
                x: (lambda c=c: _Whole(c)) for x, c in zip(sub.jaxpr.constvars, sub.consts, strict=True)}
            inputs.update({x: functools.partial(self.value, outer)
                           for x, outer in zip(sub.jaxpr.invars, eqn.invars, strict=True)})
            inner_tainted = {x for x, outer in zip(sub.jaxpr.invars, eqn.invars, strict=True)
                             if not _literal(outer) and outer in self.tainted}
            inner_reduced = {x for x, outer in zip(sub.jaxpr.invars, eqn.invars, strict=True)
                             if not _literal(outer) and outer in self.reduced}
            whole_inputs = {x: functools.partial(self.whole_of, outer)
                            for x, outer in zip(sub.jaxpr.invars, eqn.invars, strict=True)
                            if not _literal(outer) and outer not in self.tainted}
            evaluator = _Evaluator(sub.jaxpr, self.shape, self.blocked, self.half, inputs, {},
                                   _tainted(sub.jaxpr, inner_tainted),
                                   _tainted(sub.jaxpr, inner_reduced) | _reduced(sub.jaxpr), self.memo,
                                   whole_inputs)
            for x, inner in zip(eqn.outvars, sub.jaxpr.outvars, strict=True):
                self.pairs[x] = evaluator.pair(inner) if not _literal(inner) else \
                    self.cut(jnp.broadcast_to(inner.val, self.shape))
            return self.pairs[v]
        if v not in self.tainted:
            return self.cut(self.whole_of(v))
        return None

    def value(self, v: Any) -> Value:
        """``v`` as an input of a nested jaxpr: halves for a variable shaped like the moment,
        the whole value for any other that depends on no stored moment."""
        if _literal(v):
            return _Whole(v.val)
        if _shape(v) == self.shape:
            pair = self.pair(v)
            return None if pair is None else _Halves(pair)
        if v in self.tainted:
            return None
        return _Whole(self.whole_of(v))

    def whole_of(self, v: Any) -> Any:
        """The whole value of ``v``, which depends on no stored moment."""
        known = _literal(v) or v in self.whole or v in self.inputs
        return self.read_whole(v) if known else self.whole_value(v)


def _bind(eqn: Any, args: Sequence[Any]) -> list[Any]:
    """``eqn`` applied to ``args`` (its whole values). jax 0.8's ``get_bind_params`` returns
    ``(subfuns, params)``, later versions the params alone."""
    bind = eqn.primitive.get_bind_params(eqn.params)
    subfuns, params = bind if isinstance(bind, tuple) else ((), bind)
    out = eqn.primitive.bind(*subfuns, *args, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def halves(closed: Any, args: Sequence[Any], targets: Sequence[int], blocked: tuple[int, ...],
           half: tuple[int, ...] | None, given: dict[int, Callable[[], Pieces]], stored: set[int],
           memo: Memo) -> list[Pieces | None]:
    """The low and high halves of the blocks of outputs ``targets`` of the jaxpr ``closed``,
    evaluated at ``args``.

    Args:
      closed: a ``ClosedJaxpr``.
      args: its arguments.
      targets: indices of its outputs, each shaped like the moment.
      blocked: the moment's blocked shape (its leading axes, blocks, elements per block).
      half: the shape each half is computed in (that of the packed codes); None: the outputs are
        computed whole, as one piece each (from whole arguments in ``given``).
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
    stored_vars = set()
    for i, (v, a) in enumerate(zip((*jaxpr.constvars, *jaxpr.invars), (*closed.consts, *args), strict=True)):
        j = i - n_const
        if j in given:
            inputs[v] = lambda j=j: _Halves(given[j]())
        elif j in stored:
            inputs[v] = lambda: None
        else:
            memo.whole.setdefault(v, a)
        if j in stored:
            stored_vars.add(v)
    if memo.tainted is None or memo.reduced is None:
        memo.tainted, memo.reduced = _tainted(jaxpr, stored_vars), _reduced(jaxpr)
    evaluator = _Evaluator(jaxpr, shape, blocked, half, inputs, memo.whole, memo.tainted, memo.reduced, memo)
    out: list[Pieces | None] = []
    for t in targets:
        v = jaxpr.outvars[t]
        out.append(evaluator.cut(jnp.broadcast_to(v.val, shape)) if _literal(v) else evaluator.pair(v))
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
