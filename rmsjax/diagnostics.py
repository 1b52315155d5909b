"""Read what an optimizer is doing out of its state: effective learning rate, learning rate, step.

An rmsjax optimizer is an ``optax.chain`` of small transformations, so its state is a tuple of
NamedTuples, often wrapped again by ``optax.inject_hyperparams``, ``optax.MultiSteps``,
``optax.apply_if_finite``, ``optax.masked`` or Flax's ``nnx.Optimizer``. The functions here walk
that pytree and find rmsjax's states by their types (another library's NamedTuples, such as
optax's, by their field names), so that nobody has to write ``opt_state[1].inner_state[0].nu``;
the numbers are computed with the formulas of :mod:`rmsjax.averages` the transformations use:

* ``nu``: the second-moment state (leaky average of squared gradients in ``scale_by_rms``,
  ``scale_by_stddev`` and ``scale_by_adam``; the running sum of squares in ``scale_by_rss``);
* ``mu``: the first moment (the mean gradient of the centered form);
* ``rate``: the rate the next update will apply (the learning-rate step of every rmsjax
  optimizer); under ``optax.inject_hyperparams`` the ``learning_rate`` (or ``lr``) entry of
  its ``hyperparams`` wins, since that is what the next update will use;
* ``count``: the number of updates applied.

All three functions are pure and can be called inside ``jax.jit``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.core  # jax deletes its own alias; named here so type checkers see jax.core
import jax.numpy as jnp
import numpy as np
import optax

from rmsjax import _low_precision, _moments, _quantization, averages, transforms
from rmsjax import _validation as check
from rmsjax.compat import _common, _keras_parts

__all__ = ["EffectiveLearningRate", "effective_learning_rate", "learning_rate", "step_count"]


class EffectiveLearningRate(NamedTuple):
    """Per-coordinate effective learning rate and its summary statistics.

    Attributes:
      per_leaf: a pytree shaped like the ``nu`` state it was computed from (like the
        parameters, except under ``rmsjax.packed``, whose ``nu`` is its packed buffers)
        holding, for every coordinate, the step size that multiplies its gradient.
      min: the smallest effective learning rate over all coordinates (float32 scalar).
      median: the median over all coordinates (float32 scalar).
      mean: the mean over all coordinates (float32 scalar).
      max: the largest over all coordinates (float32 scalar).
    """

    per_leaf: Any
    min: jax.Array
    median: jax.Array
    mean: jax.Array
    max: jax.Array


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _is_optimizer(value: Any) -> bool:
    """True for an ``nnx.Optimizer`` (anything holding an ``opt_state`` and its ``tx``)."""
    return hasattr(value, "opt_state") and hasattr(value, "tx")


def _to_pure(opt_state: Any) -> Any:
    """Accept an ``nnx.Optimizer`` or its state, and strip Flax ``Variable`` boxes."""
    if _is_optimizer(opt_state):
        opt_state = opt_state.opt_state
    return _unwrap_variables(opt_state)


def _unwrap_variables(opt_state: Any) -> Any:
    """The one ``nnx.Variable`` unwrapper: ``opt_state`` with every Flax box replaced by its value.

    A no-op when Flax is not imported (nothing can hold a Variable then).
    """
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None:
        # nnx.as_pure is flax >= 0.12.7; flax 0.12.0-0.12.6 call it nnx.pure.
        to_pure = getattr(nnx, "as_pure", None) or getattr(nnx, "pure", None)
        if to_pure is not None:
            opt_state = to_pure(opt_state)
        else:
            opt_state = jax.tree.map(
                lambda x: x.value if isinstance(x, nnx.Variable) else x,
                opt_state,
                is_leaf=lambda x: isinstance(x, nnx.Variable),
            )
    return opt_state


def _namedtuples(tree: Any) -> Iterator[Any]:
    """Yield every NamedTuple in ``tree``, outer ones before the ones they contain."""
    nodes = jax.tree_util.tree_leaves(tree, is_leaf=_is_namedtuple)
    for node in nodes:
        if _is_namedtuple(node) and node._fields:
            yield node
            for value in node:
                yield from _namedtuples(value)


_ROUNDING_COUNTERS = (_quantization.QuantizedState, _low_precision.LowPrecisionState)
"""Wrapper states whose ``count`` seeds stochastic rounding (one per call of ``update``)."""
_MINI_STEP_COUNTERS = (*_ROUNDING_COUNTERS, _keras_parts.GradientAccumulationState)
"""States whose ``count`` moves at every call, real update or not (Keras's accumulator counts
its micro-steps, Keras's ``iterations``): read only when nothing else counts."""


def _find(tree: Any, field: str) -> list[Any]:
    return [node for node in _namedtuples(tree) if field in node._fields]


# The states of rmsjax's own transformations that hold the second moment a step divides by.
_SECOND_MOMENT_STATES = (
    transforms.ScaleByRmsState,
    transforms.ScaleByStddevState,
    transforms.ScaleByRssState,
    transforms.ScaleByAdamState,
    transforms.ScaleByAmsgradState,
    transforms.ScaleByAdaDeltaState,
)


def _by_type(states: list[Any], types: tuple[type, ...]) -> list[Any]:
    """The states of rmsjax's own ``types`` if any; else all (another library's, by field)."""
    own = [state for state in states if isinstance(state, types)]
    return own or states


def _scalar(x: Any) -> jax.Array:
    return jnp.asarray(x)


def _describe(node: Any) -> str:
    return f"{type(node).__name__}({', '.join(node._fields)})"


def _available(tree: Any) -> str:
    names = sorted({_describe(node) for node in _namedtuples(tree)})
    return ", ".join(names) if names else "no NamedTuple states at all"


# The names a learning rate goes by in optax.inject_hyperparams' hyperparams: rmsjax's and
# optax's factories, and rmsjax.compat.torch's (PyTorch's own name).
_RATE_NAMES = ("learning_rate", "lr")
_RATE_STATES = (transforms.ScaleByLearningRateState, transforms.ScaleByScheduleState)
# optax.inject_hyperparams' states, found by name through optax.tree_utils.
_INJECT_STATES = ("InjectStatefulHyperparamsState", "InjectHyperparamsState")


def _injected_rates(tree: Any, schedule: Any) -> list[jax.Array]:
    """The next rate of each ``optax.inject_hyperparams`` state in ``tree`` that injects one.

    An injected number (or array) is what the next update uses, edits to
    ``state.hyperparams`` included. An injected schedule is not in the state (only its
    step count is), so its next value needs the schedule itself: ``schedule``.
    """
    rates = []
    nodes = [
        node
        for name in _INJECT_STATES
        for _, node in optax.tree_utils.tree_get_all_with_path(tree, name)
    ]
    for node in nodes:
        if not isinstance(getattr(node, "hyperparams", None), dict):
            continue
        found = [name for name in _RATE_NAMES if name in node.hyperparams]
        if not found:
            continue
        name = found[0]
        states = dict(getattr(node, "hyperparams_states", None) or {})
        if name in states:
            if schedule is None:
                raise ValueError(
                    f"the {name!r} injected by optax.inject_hyperparams is a schedule, and its "
                    f"state holds only the step count (hyperparams[{name!r}] is the rate the "
                    "last update used): pass the schedule, learning_rate(state, schedule=...), "
                    "to get the rate the next update will use, or inject with "
                    f"static_args=({name!r},) so that the optimizer's own step counts and "
                    "holds it"
                )
            count = getattr(states[name], "count", None)
            if count is None:
                raise ValueError(
                    f"the {name!r} injected by optax.inject_hyperparams is a stateful schedule "
                    "with no step count; read its state yourself"
                )
            rate = schedule(count)
        else:
            rate = node.hyperparams[name]
        if "lr_decay" in node.hyperparams:  # compat.torch.Adagrad: lr / (1 + count * lr_decay)
            rate = _common.divided_by_decay(rate, node.hyperparams["lr_decay"])(node.count)
        else:
            _check_not_rescheduled(node, name, rate)
        rates.append(_readable(rate))
    return rates


def _check_not_rescheduled(node: Any, name: str, rate: Any) -> None:
    """Refuses an injected rate that the optimizer inside turns into another schedule.

    ``inject_hyperparams(compat.torch.Adagrad, static_args=("lr_decay",))`` divides the
    injected ``lr`` by ``1 + count * lr_decay`` inside, with ``lr_decay`` held by the update
    function, not the state: the next rate cannot be read, and the injected number is not it.
    Seen as a schedule step inside whose last rate differs from the injected number."""
    inner = [s for s in _namedtuples(node.inner_state) if isinstance(s, transforms.ScaleByScheduleState)]
    if len(inner) != 1 or any(isinstance(x, jax.core.Tracer) for x in (rate, inner[0].rate)):
        return  # traced (inside jit): nothing to compare
    if np.allclose(np.asarray(_readable(inner[0].rate)), np.asarray(_readable(rate)), rtol=1e-6, atol=0):
        return
    raise ValueError(
        f"the optimizer inside optax.inject_hyperparams turns the injected {name!r} into a "
        f"schedule of its own (its last rate was {float(_readable(inner[0].rate)):.6g}, the "
        f"injected value is {float(_readable(rate)):.6g}); a hyperparameter listed in "
        "static_args, such as compat.torch.Adagrad's lr_decay, is held by the update function, "
        "not the state, so the next rate cannot be read from the state: inject it too (leave "
        "it out of static_args)"
    )


def _readable(rate: Any) -> jax.Array:
    rate = jnp.asarray(rate)
    return (jnp.real(rate) if jnp.iscomplexobj(rate) else rate).astype(jnp.float32)


def _learning_rates(tree: Any, schedule: Any = None) -> list[jax.Array]:
    # optax.inject_hyperparams first: its hyperparameter is what the next update uses.
    injected = _injected_rates(tree, schedule)
    if injected:
        return injected
    # rmsjax's learning-rate step by its type; another library's state by its field name.
    own = [state for state in _namedtuples(tree) if isinstance(state, _RATE_STATES)]
    if own:
        return [_scalar(state.rate) for state in own]
    return [_scalar(state.learning_rate) for state in _find(tree, "learning_rate")]


def learning_rate(opt_state: Any, *, schedule: Any = None) -> jax.Array:
    """Return the learning rate that the next update of an optimizer will apply.

    Reads, in this order: the ``learning_rate`` (or ``lr``) hyperparameter of an
    ``optax.inject_hyperparams`` state (what its next update uses, so an edit of
    ``state.hyperparams["learning_rate"]`` shows at once); else the ``rate`` of rmsjax's
    learning-rate step (with a schedule, the schedule's value at the current step count);
    else the ``learning_rate`` field of another library's NamedTuple.

    An injected *schedule* (``inject_hyperparams(f)(learning_rate=schedule)``) is not held
    in the state, only its step count: pass it as ``schedule=`` and its value at the next
    step is returned (without it a ValueError says so, rather than the last update's rate).

    Args:
      opt_state: the state of an rmsjax optimizer, as returned by ``init``/``update``, possibly
        chained or wrapped (``optax.chain``, ``inject_hyperparams``, ``MultiSteps``,
        ``apply_if_finite``, ``masked``), or a Flax ``nnx.Optimizer`` (or its ``opt_state``).
      schedule: the schedule given to ``optax.inject_hyperparams`` as the learning rate, if
        one was.

    Returns:
      The learning rate as a scalar array (float32 for rmsjax optimizers).

    Raises:
      ValueError: if the state holds no learning rate, or several different ones (for
        example two optimizers under ``optax.multi_transform``), or an injected schedule
        and no ``schedule=``, or an injected rate that the optimizer inside reschedules with
        a hyperparameter held in ``static_args`` (``compat.torch.Adagrad``'s ``lr_decay``).
      TypeError: if ``schedule`` is not a callable of the step count.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import rmsjax
      >>> tx = rmsjax.rmsprop(optax.linear_schedule(0.1, 0.0, transition_steps=10))
      >>> params = {"w": jnp.ones(3)}
      >>> state = tx.init(params)
      >>> _, state = tx.update({"w": jnp.ones(3)}, state, params)
      >>> round(float(rmsjax.learning_rate(state)), 4)
      0.09
    """
    if schedule is not None:
        if not check.is_schedule(schedule):
            raise TypeError(f"schedule must be None or a schedule f(step), got {schedule!r}")
        check.check_learning_rate("schedule", schedule)
    tree = _to_pure(opt_state)
    rates = _learning_rates(tree, schedule)
    if not rates:
        raise ValueError(
            "opt_state holds no learning rate: found no rmsjax learning-rate step, no "
            "NamedTuple with a 'learning_rate' field and no inject_hyperparams 'hyperparams' "
            f"entry 'learning_rate' (states present: {_available(tree)})."
        )
    return _single(rates, "learning rates")


def _single(values: list[jax.Array], what: str) -> jax.Array:
    first = values[0]
    if len(values) > 1:
        try:
            same = all(bool(jnp.all(v == first)) for v in values[1:])
        except jax.errors.ConcretizationTypeError:
            same = True  # under jit: cannot compare, trust the first one
        if not same:
            raise ValueError(
                f"opt_state holds {len(values)} different {what} "
                f"({', '.join(str(v) for v in values)}); read the sub-state you mean "
                "(for example the one of a single optax.multi_transform partition)."
            )
    return first


def step_count(opt_state: Any) -> jax.Array:
    """Return the number of updates an optimizer has applied.

    Reads the ``count`` field of the learning-rate step's state, or, where that keeps none
    (a constant rate), of the outermost state that holds one, or else an ``nnx.Optimizer``'s own
    ``step``. Under ``optax.MultiSteps`` this counts the real (outer)
    updates, not the accumulated mini-steps, also when ``rmsjax.quantized`` or
    ``rmsjax.low_precision`` wraps it (their own counts, which seed the rounding, are read only
    when nothing else counts); so does it under ``compat.keras``'s
    ``gradient_accumulation_steps``, whose micro-step count (Keras's ``iterations``) is read only
    when nothing inside counts (``compat.keras.SGD`` with a constant rate keeps no other count).

    Args:
      opt_state: the state of an rmsjax optimizer, possibly chained or wrapped, or a Flax
        ``nnx.Optimizer`` (or its ``opt_state``).

    Returns:
      The step count as an int32 scalar array.

    Raises:
      ValueError: if the state holds no count (``rmsjax.sgd`` with a constant rate keeps
        none, like ``optax.sgd``).

    Example:
      >>> import jax.numpy as jnp
      >>> import rmsjax
      >>> tx = rmsjax.adam(1e-3)
      >>> params = {"w": jnp.ones(3)}
      >>> state = tx.init(params)
      >>> for _ in range(5):
      ...     _, state = tx.update({"w": jnp.ones(3)}, state, params)
      >>> int(rmsjax.step_count(state))
      5
    """
    tree = _to_pure(opt_state)
    states = _find(tree, "count")
    # The count of quantized and low_precision seeds their rounding: it moves at every call,
    # so under optax.MultiSteps it counts the mini-steps. It is the last resort.
    own = [state for state in states if not isinstance(state, _MINI_STEP_COUNTERS)]
    accumulating = [node for node in _namedtuples(tree) if isinstance(node, optax.MultiStepsState)]
    if not own and accumulating:
        return _scalar(accumulating[0].gradient_step).astype(jnp.int32)
    if not states and _is_optimizer(opt_state) and hasattr(opt_state, "step"):
        # An nnx.Optimizer counts its updates itself.
        return _scalar(_to_pure(opt_state.step)).astype(jnp.int32)
    if not states:
        raise ValueError(
            "opt_state holds no step count: found no NamedTuple with a 'count' field that "
            f"holds one (states present: {_available(tree)}). A constant learning rate without "
            "dampening keeps none (rmsjax.sgd, as optax.sgd): give a schedule, or wrap the "
            "optimizer in optax.inject_hyperparams, whose state counts the steps."
        )
    preferred = [state for state in states if isinstance(state, transforms.ScaleByScheduleState)]
    return _scalar((preferred or own or states)[0].count)


def _second_moment(
    state: Any, *, centered: bool, decay: float | jax.Array | None
) -> Any:
    """The (bias-corrected, centred) second moment the optimizer divides by, in float32.

    Computed with the formulas of :mod:`rmsjax.averages` that the transformations use
    (``bias_correction``, ``centered_variance``), on float32 copies of the state.
    """
    # AMSGrad divides by the running maximum of nu, kept in nu_max.
    amsgrad = "nu_max" in state._fields
    nu = state.nu_max if amsgrad else state.nu
    # rmsjax's nu_max is the maximum of nu; optax's (scale_by_amsgrad) that of the
    # bias-corrected nu, what its step divides by: not corrected again.
    corrected = amsgrad and not isinstance(state, transforms.ScaleByAmsgradState)
    nu = jax.tree.map(lambda v: jnp.asarray(v).astype(jnp.float32), nu)
    mu = None
    if centered:
        if "mu" not in state._fields:
            raise ValueError(
                f"centered=True needs the mean gradient 'mu' next to 'nu', but the state is "
                f"{_describe(state)}."
            )
        mu = jax.tree.map(lambda m: jnp.asarray(m).astype(jnp.float32), state.mu)
    if decay is not None:
        if "count" not in state._fields:
            raise ValueError(
                f"decay= asks for bias correction, but {_describe(state)} has no 'count' field."
            )
        count = jnp.asarray(state.count)
        # Before the first update there is nothing to correct (1 - decay**0 = 0 would make
        # 0/0): the state's initial value is used as it is.
        started = count > 0
        safe = jnp.maximum(count, jnp.ones_like(count))
        keep = lambda old, new: jax.tree.map(lambda o, n: jnp.where(started, n, o), old, new)
        if not corrected:
            nu = keep(nu, averages.bias_correction(nu, decay, safe))
        if mu is not None:
            mu = keep(mu, averages.bias_correction(mu, decay, safe))
    if mu is not None:
        nu = averages.centered_variance(nu, mu)
    return nu


def effective_learning_rate(
    opt_state: Any,
    *,
    eps: float | jax.Array = 1e-8,
    eps_in_sqrt: bool = False,
    learning_rate: float | jax.Array | None = None,
    centered: bool = False,
    decay: float | jax.Array | None = None,
) -> EffectiveLearningRate:
    r"""Return the per-coordinate effective learning rate of an adaptive optimizer.

    RMSprop, AdaGrad and Adam divide each coordinate's step by the root of a second-moment
    state :math:`\nu`. The step size a coordinate actually gets is

    .. math::

       \eta_\text{eff} = \frac{\alpha}{\sqrt{\nu} + \epsilon}
       \quad\text{or, with } \texttt{eps\_in\_sqrt=True},\quad
       \eta_\text{eff} = \frac{\alpha}{\sqrt{\nu + \epsilon}},

    where :math:`\alpha` is the current learning rate. For ``rmsprop``, ``nu`` is the leaky
    average of :math:`g^2` and the effective rate follows the recent gradient size; for
    ``adagrad`` it is the running sum :math:`G` and the effective rate can only shrink. For
    ``adadelta`` (a state with a ``nu_delta`` field :math:`\Delta`) the rate is
    :math:`\alpha\sqrt{\Delta + \epsilon}/\sqrt{\nu + \epsilon}` and ``eps_in_sqrt`` is
    ignored.

    The state does not record ``eps`` or where it sits, so pass the values the optimizer was
    built with (the defaults match ``rmsjax.rmsprop``'s). The result is the rate the state
    gives now (before any momentum): ``nu`` as the most recent update used it, with
    :math:`\alpha` as :func:`learning_rate` reads it, the rate the *next* update applies.
    So it is the step per unit gradient of the most recent update for a constant learning
    rate; under a schedule :math:`\alpha` is one step ahead of that update. For
    ``adadelta`` :math:`\Delta` is the average after that update (the update used the
    one before), so the result is the rate a next update would use if ``nu`` stayed put.

    Args:
      opt_state: the state of an rmsjax optimizer, possibly chained or wrapped
        (``optax.chain``, ``inject_hyperparams``, ``MultiSteps``, ``apply_if_finite``,
        ``masked``), or a Flax ``nnx.Optimizer`` (or its ``opt_state``). It must hold exactly
        one second-moment state (a NamedTuple with a ``nu`` field).
      eps: the optimizer's epsilon.
      eps_in_sqrt: whether the optimizer adds ``eps`` inside the square root.
      learning_rate: :math:`\alpha`; by default read from the state with
        :func:`learning_rate`. Pass it when the chain has no rmsjax learning-rate step.
      centered: for ``rmsprop(centered=True)`` (``scale_by_stddev``): use
        :math:`\nu - \mu^2`, the variance estimate, in place of :math:`\nu`.
      decay: if given, bias-correct first, :math:`\hat\nu = \nu / (1 - \text{decay}^t)` with
        :math:`t` the state's step count (and :math:`\mu` too when ``centered``): pass ``b2``
        for ``adam``, or ``decay`` for ``rmsprop(bias_correction=True)``. With
        ``scale_by_adam(amsgrad=True)`` the running maximum ``nu_max`` is used in place of
        ``nu``, as the optimizer does; ``optax.amsgrad``'s ``nu_max`` is already the maximum
        of the bias-corrected ``nu``, so it is used as it is, ``decay`` given or not.

    Returns:
      An :class:`EffectiveLearningRate`: ``per_leaf`` (a float32 pytree shaped like the
      state's ``nu``: the parameters, or ``rmsjax.packed``'s buffers) and its ``min``,
      ``median``, ``mean`` and ``max`` over all coordinates.

    Raises:
      ValueError: if the state holds no second-moment ``nu`` (e.g. ``sgd``), several of them,
        or no learning rate when none is passed; if its ``nu`` is an infinity norm
        (``compat.keras.Adamax``); if ``eps`` or ``learning_rate`` is negative or not finite,
        or ``decay`` is outside ``[0, 1)``. (``optax.adamax`` keeps its infinity norm in an
        ``optax.ScaleByAdamState``, which cannot be told from Adam's: do not pass it.)
      TypeError: if a number is not a real scalar, or a flag not a bool.

    Example:
      >>> import jax.numpy as jnp
      >>> import rmsjax
      >>> tx = rmsjax.rmsprop(0.01, decay=0.9)
      >>> params = {"w": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> _, state = tx.update({"w": jnp.array([1.0, 0.1])}, state, params)
      >>> eff = rmsjax.effective_learning_rate(state, eps=1e-8)
      >>> [round(float(x), 4) for x in eff.per_leaf["w"]]  # 0.01 / sqrt(0.1 * g**2)
      [0.0316, 0.3162]
    """
    check.check_non_negative("eps", eps)
    check.check_flag("eps_in_sqrt", eps_in_sqrt)
    check.check_flag("centered", centered)
    if learning_rate is not None:
        check.check_non_negative("learning_rate", learning_rate)
    if decay is not None:
        check.check_unit_interval("decay", decay)
    tree = _to_pure(opt_state)
    low_bit = sys.modules.get("rmsjax._quantization")
    if low_bit is not None:  # rmsjax.quantized: decode the moments its state stores as codes
        tree = low_bit.dequantize_state(tree)
    states = _by_type(_find(tree, "nu"), _SECOND_MOMENT_STATES)
    if not states:
        raise ValueError(
            "opt_state holds no second-moment state (a NamedTuple with a 'nu' field), so it "
            "has no effective learning rate; it needs an adaptive optimizer such as rmsprop, "
            f"adagrad or adam (states present: {_available(tree)})."
        )
    if len(states) > 1:
        raise ValueError(
            f"opt_state holds {len(states)} second-moment states "
            f"({', '.join(_describe(s) for s in states)}); pass the sub-state you mean."
        )
    if learning_rate is None:
        rates = _learning_rates(tree)
        if not rates:
            raise ValueError(
                "opt_state holds no learning rate (no NamedTuple with a 'learning_rate' "
                "field); pass learning_rate= explicitly."
            )
        alpha = _single(rates, "learning rates")
    else:
        alpha = learning_rate
    alpha = jnp.asarray(alpha, jnp.float32)
    # eps as given: a number lets the formulas below drop the 0/0 guard, as the optimizer does.
    eps32 = eps if isinstance(eps, (int, float)) else jnp.asarray(eps, jnp.float32)

    state = states[0]
    moments = _moments.declared(state) or {}
    if "nu" in moments and moments["nu"].rule == "peak":
        raise ValueError(
            f"the 'nu' of {_describe(state)} is an infinity norm (Adamax's), not a second "
            "moment: its step divides by nu + eps, not by a square root, so "
            "effective_learning_rate does not apply; read the state yourself."
        )
    nu = _second_moment(state, centered=centered, decay=decay)
    ones = jax.tree.map(jnp.ones_like, nu)
    # The step of a unit gradient, with the formulas the transformations use.
    if "nu_delta" in state._fields:  # AdaDelta: sqrt(delta + eps) / sqrt(nu + eps)
        delta = jax.tree.map(lambda d: jnp.asarray(d).astype(jnp.float32), state.nu_delta)
        unit = averages.multiply_by_root_ratio(ones, delta, nu, eps=eps32)
    elif eps_in_sqrt:
        unit = averages.divide_by_root(ones, nu, eps=0.0, eps_root=eps32)
    else:
        unit = averages.divide_by_root(ones, nu, eps=eps32)
    per_leaf = averages.scale(unit, alpha)
    leaves = jax.tree_util.tree_leaves(per_leaf)
    if not leaves:
        raise ValueError("the second-moment state 'nu' holds no arrays (no parameters?).")
    flat = jnp.concatenate([jnp.ravel(leaf) for leaf in leaves])
    return EffectiveLearningRate(
        per_leaf=per_leaf,
        min=jnp.min(flat),
        median=jnp.median(flat),
        mean=jnp.mean(flat),
        max=jnp.max(flat),
    )
