"""Moment declarations: which fields of a state type are moments, and how they move.

A state type declares its moments once, next to its definition, with :func:`declare`.
:func:`rmsjax.quantized` stores exactly the declared moments in low bits and nothing else
(no guessing from shapes or field names): counters, copies of the parameters (Keras's EMA),
gradient accumulators and every state type that declares nothing keep their dtype.

A declaration says, for each moment field:

* ``signed``: whether the moment can be negative (a first moment, a momentum buffer) or is
  never negative (a second moment, a running sum of squares);
* ``rule``: how one update moves it, in terms of the transformation's *input* ``x``:

  ==============  ============================================  ==========================
  rule            update                                        bound on ``max|new|``
  ==============  ============================================  ==========================
  ``"leaky"``     ``keep*old + take*x**order``, keep + take = 1  ``max(M_old, M_x**order)``
  ``"sum"``       ``old + x**order``                            ``M_old + M_x**order``
  ``"momentum"``  ``keep*old + take*x`` (``x`` on step one),    ``M_old + M_x``
                  keep, take in [0, 1]
  ``"peak"``      ``max(keep*old, |x|)``, keep in [0, 1]        ``max(M_old, M_x)``
  ``None``        anything else (no bound)                      (reduced exactly)
  ==============  ============================================  ==========================

  where ``M`` is the largest magnitude over a block. The bounds need no hyperparameter;
  :func:`bound` is where they are computed.
* ``centered``: the name of the first-moment field when the moment is a centred second moment
  (``nu`` of centred RMSprop); it is then stored as the variance ``nu - |mu|**2``, whose
  relative precision does not collapse when ``nu`` and ``mu**2`` nearly cancel. With the
  ``"leaky"`` rule, the first moment a leaky average of ``x`` with the same ``keep``, the
  variance moves by ``var' = keep*var + keep*take*(x - mu)**2``, so its bound is
  ``max(M_var, (M_x + M_mu)**2)`` (``keep + keep*take <= 1``), with ``M_mu`` the first
  moment's largest magnitude *before* the step. (``max(M_var, M_x**2)`` is no bound: after
  steady gradients that change sign the variance jumps far above both.)
* ``divided_by``: the second-moment field this moment is divided by in the step (``nu`` for
  Adam's ``mu``). Where that one is not finite (a gradient whose square overflows) the step
  does not depend on this moment's value, so the element is kept out of its block's scale
  (it saturates) instead of taking the block's resolution with it.

A state type can also declare that its transformation hands its input on unchanged
(:func:`declare_passes_input`): an absent optional part of a chain, or a wrapper such as
``optax.inject_hyperparams`` that gives the input to the transformation whose state is one of
its fields. :func:`rmsjax.quantized` follows those to find the moments that see the gradient
it receives (whose bound it can take from that gradient). Any other part before a moment
(clipping, scaling, weight decay) hides the gradient: that moment's blocks are reduced exactly.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp

__all__ = ["Moment", "bound", "declare", "declare_passes_input", "declared", "input_path"]

RULES = (None, "leaky", "sum", "momentum", "peak")


class Moment(NamedTuple):
    """One declared moment field (see the module docstring)."""

    signed: bool
    rule: str | None = None
    order: int = 1
    centered: str | None = None
    divided_by: str | None = None


_DECLARED: dict[type, dict[str, Moment]] = {}


def bound(moment: Moment, m_old: Any, m_x: Any, m_first: Any = None) -> Any:
    """The declared rule's bound on the largest magnitude of the new moment over a block
    (the table above), from the block's largest magnitudes: ``m_old`` of the stored moment,
    ``m_x`` of the input (not yet raised to ``order``) and, for a centred moment, ``m_first``
    of the first moment before the step. Arrays of any shape, broadcast together.

    >>> float(bound(Moment(False, "leaky", 2), 3.0, 2.0)), float(bound(Moment(True, "sum"), 3.0, 2.0))
    (4.0, 5.0)
    """
    if moment.rule is None:
        raise ValueError(f"bound: {moment!r} declares no update rule, so it has no bound")
    if moment.centered is not None:
        if moment.rule != "leaky" or moment.order != 2 or m_first is None:
            raise ValueError(f"bound: a centred moment's bound needs the leaky rule of order 2 and "
                             f"the first moment's largest magnitude, got {moment!r}")
        spread = m_x + m_first
        return jnp.maximum(m_old, spread * spread)
    m_in = m_x * m_x if moment.order == 2 else m_x
    if moment.rule in ("leaky", "peak"):
        return jnp.maximum(m_old, m_in)
    return m_old + m_in  # "sum", "momentum"


def declare(cls: type, **fields: Moment) -> None:
    """Declares the moment fields of the NamedTuple state type ``cls``.

    >>> from typing import NamedTuple
    >>> class S(NamedTuple):
    ...     count: int
    ...     nu: object
    >>> declare(S, nu=Moment(signed=False, rule="leaky", order=2))
    >>> declared(S(0, None))
    {'nu': Moment(signed=False, rule='leaky', order=2, centered=None, divided_by=None)}
    """
    names = getattr(cls, "_fields", None)
    if names is None:
        raise TypeError(f"declare: {cls!r} is not a NamedTuple state type")
    for name, moment in fields.items():
        if name not in names:
            raise ValueError(f"declare: {cls.__name__} has no field {name!r} (fields: {names})")
        if not isinstance(moment, Moment) or moment.rule not in RULES or moment.order not in (1, 2):
            raise ValueError(f"declare: {cls.__name__}.{name}: bad declaration {moment!r}")
        if moment.centered is not None and (moment.order != 2 or moment.rule not in (None, "leaky")):
            raise ValueError(f"declare: {cls.__name__}.{name}: a centred moment is a second moment "
                             f"(order 2) with the leaky rule or none, got {moment!r}")
        for other in (moment.centered, moment.divided_by):
            if other is not None and other not in names:
                raise ValueError(f"declare: {cls.__name__}.{name}: no field {other!r}")
    _DECLARED[cls] = dict(fields)


def declared(node: Any) -> dict[str, Moment] | None:
    """The moment declarations of ``node``'s type, or ``None`` if it declares none."""
    return _DECLARED.get(type(node))


_PASSES_INPUT: dict[type, str | None] = {}


def declare_passes_input(cls: type, into: str | None = None) -> None:
    """Declares that the transformation whose state type is ``cls`` hands its input on
    unchanged: to the next part of its chain (``into=None``), or to the transformation whose
    state is ``cls``'s field ``into`` (a wrapper)."""
    names = getattr(cls, "_fields", None)
    if names is None:
        raise TypeError(f"declare_passes_input: {cls!r} is not a NamedTuple state type")
    if into is not None and into not in names:
        raise ValueError(f"declare_passes_input: {cls.__name__} has no field {into!r} (fields: {names})")
    _PASSES_INPUT[cls] = into


def input_path(state: Any) -> Any:
    """The first part of ``state`` that does not declare that it hands the input on: through
    chains (a plain tuple, whose leading parts may hand it to the next one) and into declared
    wrappers. Its transformation receives the whole transformation's input unchanged."""

    def passes_on(node: Any) -> bool:  # to the next part of its chain
        return type(node) in _PASSES_INPUT and _PASSES_INPUT[type(node)] is None

    node = state
    while True:
        if type(node) is tuple and node:  # noqa: E721 - an optax.chain state, not a NamedTuple
            parts = list(node)
            while len(parts) > 1 and passes_on(parts[0]):
                parts.pop(0)
            node = parts[0]
            continue
        into = _PASSES_INPUT.get(type(node))
        if into is None:
            return node
        node = getattr(node, into)


FIRST = Moment(signed=True, rule="leaky", order=1)
"""A leaky average of the input (a first moment)."""
ADAM_FIRST = Moment(signed=True, rule="leaky", order=1, divided_by="nu")
"""A leaky average of the input divided by the root of the second moment ``nu`` in the step."""
SECOND = Moment(signed=False, rule="leaky", order=2)
"""A leaky average of the input's square (a second moment)."""


def _declare_optax() -> None:
    """optax's own states that hold Adam/RMSprop-family moments, declared without an update
    rule (optax reuses ``ScaleByAdamState`` for Adamax, whose ``nu`` is no average of
    squares), so their blocks are reduced exactly; and optax's wrappers that hand the
    gradient on unchanged."""
    import optax

    declare(optax.ScaleByAdamState, mu=Moment(True, divided_by="nu"), nu=Moment(False))
    declare(optax.ScaleByAmsgradState, mu=Moment(True, divided_by="nu"), nu=Moment(False),
            nu_max=Moment(False))
    declare(optax.ScaleByRmsState, nu=Moment(False))
    declare(optax.ScaleByRssState, sum_of_squares=Moment(False))
    declare(optax.TraceState, trace=Moment(True))
    # optax.inject_hyperparams gives the gradient to the transformation it builds.
    for name in ("InjectHyperparamsState", "InjectStatefulHyperparamsState"):
        cls = getattr(optax, name, None) or getattr(optax.schedules, name, None)
        if cls is not None:
            declare_passes_input(cls, into="inner_state")


_declare_optax()
