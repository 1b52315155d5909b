"""Keras 3's ``keras.optimizers.schedules``, with Keras's arithmetic.

Each class takes the arguments of the Keras class of the same name and is a schedule
``f(step) -> learning rate``, jittable, to pass as ``learning_rate`` to any
:mod:`rmsjax.compat.keras` optimizer (or any rmsjax or optax one). ``step`` is the number of
updates made so far (Keras's ``optimizer.iterations``, 0 at the first update). The values
are computed as Keras computes them, operation by operation, so that they agree with Keras
to rounding (checked to 1e-12 relative in float64 against Keras 3.15).

Dtype: Keras computes a schedule in the dtype of ``initial_learning_rate`` as a tensor,
``keras.config.floatx()`` (float32 unless set). Here the keyword-only ``dtype`` (default:
JAX's default float, float64 with ``jax_enable_x64`` and float32 otherwise) plays that role:
pass ``dtype=jnp.float32`` to reproduce Keras's default float32 schedules in an x64 program.

Example:
  >>> from rmsjax.compat import keras as kc
  >>> schedule = kc.schedules.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5, staircase=True)
  >>> print([round(float(schedule(step)), 4) for step in (0, 9, 10, 25)])
  [0.1, 0.1, 0.05, 0.025]
  >>> tx = kc.RMSprop(learning_rate=schedule, momentum=0.9)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rmsjax import _validation as check

__all__ = [
    "CosineDecay",
    "ExponentialDecay",
    "InverseTimeDecay",
    "LearningRateSchedule",
    "PiecewiseConstantDecay",
    "PolynomialDecay",
]


def _hyper(value: Any, dtype: Any) -> jax.Array:
    """A hyperparameter as an array the compiler treats as unknown.

    Keras runs a schedule operation by operation, so ``step / decay_steps`` is an IEEE
    division; under ``jax.jit`` XLA turns a division by a constant into a multiplication by
    its reciprocal, which rounds differently (``200 / 200`` is then ``1 - 2e-17``). The
    barrier keeps the divisor opaque, hence the division exact, in a jitted scalar call (as
    an optimizer makes). Under ``jax.vmap`` the vectorised division may still differ by an
    ulp.
    """
    return jax.lax.optimization_barrier(jnp.asarray(value, dtype))


def _positive(name: str, value: Any) -> None:
    check.check_range(name, value)
    if float(value) == 0.0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _dtype(value: Any) -> jnp.dtype | None:
    """``None`` or a floating dtype, as a ``jnp.dtype``; an array or scalar value (whose dtype
    ``jnp.dtype`` would quietly take) is refused."""
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        raise TypeError(
            f"dtype must be None or a floating dtype such as jnp.float32, got a value "
            f"({type(value).__name__} of shape {value.shape}, dtype {value.dtype}): pass x.dtype "
            "for x's dtype"
        )
    return check.check_state_dtype("dtype", value)


def _sequence(name: str, value: Any) -> list[Any]:
    """``value`` (a list, a tuple or a 1-d array) as a list; anything else raises a TypeError
    naming ``name``."""
    one_d = isinstance(value, (jax.Array, np.ndarray)) and value.ndim == 1
    if not (one_d or (isinstance(value, Sequence) and not isinstance(value, (str, bytes)))):
        raise TypeError(
            f"{name} must be a sequence of numbers (a list, a tuple or a 1-d array), got {value!r} "
            f"of type {type(value).__name__}"
        )
    return list(value)


def _name(value: Any) -> None:
    if not isinstance(value, str):
        raise TypeError(f"name must be a string, got {value!r} of type {type(value).__name__}")


class LearningRateSchedule:
    """Base of the schedules here: ``schedule(step)`` gives the learning rate at ``step``.

    ``dtype`` is the dtype the schedule computes in (``None``: JAX's default float).
    Subclasses define ``_value(step, dtype)``.
    """

    def __init__(self, name: str, dtype: Any = None) -> None:
        _name(name)
        self.name = name
        self.dtype = _dtype(dtype)

    def _dtype(self) -> jnp.dtype:
        if self.dtype is not None:
            return self.dtype
        return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))

    def __call__(self, step: Any) -> jax.Array:
        return self._value(jnp.asarray(step), self._dtype())

    def _value(self, step: jax.Array, dtype: jnp.dtype) -> jax.Array:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class ExponentialDecay(LearningRateSchedule):
    r"""``keras.optimizers.schedules.ExponentialDecay``.

    .. math::

       \eta(s) = \eta_0\, r^{s / d} \quad (\text{staircase: } r^{\lfloor s/d \rfloor})

    Args:
      initial_learning_rate: :math:`\eta_0`, >= 0.
      decay_steps: :math:`d`, > 0.
      decay_rate: :math:`r`, >= 0.
      staircase: decay in whole steps of :math:`d` updates.
      name: Keras's name (kept, unused).
      dtype: the dtype computed in (keyword-only; module notes).

    Example:
      >>> from rmsjax.compat.keras.schedules import ExponentialDecay
      >>> print(round(float(ExponentialDecay(1.0, 2, 0.25)(1)), 6))
      0.5
    """

    def __init__(
        self,
        initial_learning_rate: float,
        decay_steps: float,
        decay_rate: float,
        staircase: bool = False,
        name: str = "ExponentialDecay",
        *,
        dtype: Any = None,
    ) -> None:
        super().__init__(name, dtype)
        check.check_range("initial_learning_rate", initial_learning_rate)
        _positive("decay_steps", decay_steps)
        check.check_range("decay_rate", decay_rate)
        check.check_flag("staircase", staircase)
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = decay_steps
        self.decay_rate = decay_rate
        self.staircase = staircase

    def _value(self, step, dtype):
        lr = jnp.asarray(self.initial_learning_rate, dtype)
        p = step.astype(dtype) / _hyper(self.decay_steps, dtype)
        if self.staircase:
            p = jnp.floor(p)
        return lr * jnp.power(jnp.asarray(self.decay_rate, dtype), p)


class PiecewiseConstantDecay(LearningRateSchedule):
    r"""``keras.optimizers.schedules.PiecewiseConstantDecay``.

    .. math::

       \eta(s) = v_0 \ (s \le b_0), \quad v_i \ (b_{i-1} < s \le b_i), \quad
       v_n \ (s > b_{n-1})

    Args:
      boundaries: :math:`b_0 < \dots < b_{n-1}`, at least one; compared with the step in the
        step's integer dtype, as Keras casts them.
      values: :math:`v_0, \dots, v_n`, one more than ``boundaries``, each >= 0.
      name: Keras's name (kept, unused).
      dtype: the dtype of the values (keyword-only; module notes).

    Example:
      >>> from rmsjax.compat.keras.schedules import PiecewiseConstantDecay
      >>> schedule = PiecewiseConstantDecay([10, 20], [0.1, 0.05, 0.01])
      >>> print([float(schedule(s)) for s in (10, 11, 21)])
      [0.1, 0.05, 0.01]
    """

    def __init__(
        self,
        boundaries: Sequence[float],
        values: Sequence[float],
        name: str = "PiecewiseConstant",
        *,
        dtype: Any = None,
    ) -> None:
        super().__init__(name, dtype)
        boundaries, values = _sequence("boundaries", boundaries), _sequence("values", values)
        if len(boundaries) != len(values) - 1:
            raise ValueError(
                "boundaries must have one element less than values, got "
                f"boundaries={boundaries!r} of length {len(boundaries)} "
                f"and values={values!r} of length {len(values)}"
            )
        if not boundaries:
            raise ValueError(f"boundaries must have at least one element, got boundaries={boundaries!r}")
        for i, b in enumerate(boundaries):
            check.check_range(f"boundaries[{i}]", b, low=-math.inf)
        for i in range(1, len(boundaries)):
            if not float(boundaries[i]) > float(boundaries[i - 1]):
                raise ValueError(
                    f"boundaries must increase, got boundaries[{i - 1}]={boundaries[i - 1]!r} and "
                    f"boundaries[{i}]={boundaries[i]!r}"
                )
        for i, v in enumerate(values):
            check.check_range(f"values[{i}]", v)
        self.boundaries = boundaries
        self.values = values

    def _value(self, step, dtype):
        if not jnp.issubdtype(step.dtype, jnp.integer):
            bounds = jnp.asarray(self.boundaries).astype(step.dtype)
        else:
            bounds = jnp.asarray([int(b) for b in self.boundaries], step.dtype)
        index = jnp.sum((step > bounds).astype(jnp.int32))
        return jnp.asarray(self.values, dtype)[index]


class CosineDecay(LearningRateSchedule):
    r"""``keras.optimizers.schedules.CosineDecay``, with its optional linear warm-up.

    .. math::

       \eta(s) = \eta_{top}\left((1-\alpha)\,\tfrac12\left(1 + \cos\frac{\pi \min(s', d)}{d}\right)
       + \alpha\right), \quad s' = s - w

    after a warm-up :math:`\eta(s) = \eta_0 + (\eta_{top} - \eta_0)\, s / w` for
    :math:`s < w` (``warmup_steps``), where :math:`\eta_{top}` is ``warmup_target``, or
    :math:`\eta_0` and :math:`w = 0` without warm-up.

    Args:
      initial_learning_rate: :math:`\eta_0`, >= 0.
      decay_steps: :math:`d`, > 0.
      alpha: :math:`\alpha`, the final fraction of the rate, in [0, 1].
      name: Keras's name (kept, unused).
      warmup_target: :math:`\eta_{top}`, ``None`` (no warm-up) or >= 0.
      warmup_steps: :math:`w`, >= 0.
      dtype: the dtype computed in (keyword-only; module notes).

    Example:
      >>> from rmsjax.compat.keras.schedules import CosineDecay
      >>> schedule = CosineDecay(0.1, decay_steps=100, alpha=0.1)
      >>> print([round(float(schedule(s)), 4) for s in (0, 50, 100, 500)])
      [0.1, 0.055, 0.01, 0.01]

    Warning:
      Keras 3.15's ``keras.ops.cos`` computes the cosine of a float64 tensor in float32, so
      its CosineDecay values are float32 numbers (relative error up to about 1e-7) even with
      ``floatx`` float64. This class reproduces that: the decay part is computed in float32
      from the cosine on (the warm-up part in ``dtype``), then cast to ``dtype``.
    """

    def __init__(
        self,
        initial_learning_rate: float,
        decay_steps: float,
        alpha: float = 0.0,
        name: str = "CosineDecay",
        warmup_target: float | None = None,
        warmup_steps: float = 0,
        *,
        dtype: Any = None,
    ) -> None:
        super().__init__(name, dtype)
        check.check_range("initial_learning_rate", initial_learning_rate)
        _positive("decay_steps", decay_steps)
        check.check_range("alpha", alpha, high=1.0, high_open=False)
        if warmup_target is not None:
            check.check_range("warmup_target", warmup_target)
        check.check_range("warmup_steps", warmup_steps)
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = decay_steps
        self.alpha = alpha
        self.warmup_target = warmup_target
        self.warmup_steps = warmup_steps

    def _decay(self, step, decay_steps, decay_from, dtype):
        angle = jnp.asarray(math.pi, dtype) * (step / decay_steps)
        f32 = jnp.float32
        # Keras's keras.ops.cos computes in float32 (class Warning), and every operation after
        # it is a float32 one. Each is computed here in ``dtype`` and rounded to float32
        # explicitly: for a sum or product of two float32 numbers that is the float32
        # operation's own result, and it leaves the compiler nothing to fuse (a fused
        # multiply-add would round differently from Keras's one-by-one operations).
        cosine = jnp.cos(angle.astype(f32)).astype(dtype)

        def r32(x):
            return x.astype(f32).astype(dtype)

        def c32(value):
            return jnp.asarray(value, f32).astype(dtype)

        half = r32(c32(0.5) * r32(c32(1.0) + cosine))
        decayed = r32(r32(c32(1 - self.alpha) * half) + c32(self.alpha))
        return r32(r32(decay_from) * decayed)

    def _value(self, step, dtype):
        lr = jnp.asarray(self.initial_learning_rate, dtype)
        decay_steps = _hyper(self.decay_steps, dtype)
        s = step.astype(dtype)
        if self.warmup_target is None:
            return self._decay(jnp.minimum(s, decay_steps), decay_steps, lr, dtype)
        target = jnp.asarray(self.warmup_target, dtype)
        warmup = _hyper(self.warmup_steps, dtype)
        s = jnp.minimum(s, decay_steps + warmup)
        rising = (target - lr) * (s / warmup) + lr
        falling = self._decay(s - warmup, decay_steps, target, dtype)
        return jnp.where(s < warmup, rising, falling)


class InverseTimeDecay(LearningRateSchedule):
    r"""``keras.optimizers.schedules.InverseTimeDecay``.

    .. math::

       \eta(s) = \frac{\eta_0}{1 + r\, s/d} \quad (\text{staircase: } \lfloor s/d \rfloor)

    Args:
      initial_learning_rate: :math:`\eta_0`, >= 0.
      decay_steps: :math:`d`, > 0.
      decay_rate: :math:`r`, >= 0.
      staircase: decay in whole steps of :math:`d` updates.
      name: Keras's name (kept, unused).
      dtype: the dtype computed in (keyword-only; module notes).

    Example:
      >>> from rmsjax.compat.keras.schedules import InverseTimeDecay
      >>> print(float(InverseTimeDecay(0.1, 10, 1.0)(10)))
      0.05
    """

    def __init__(
        self,
        initial_learning_rate: float,
        decay_steps: float,
        decay_rate: float,
        staircase: bool = False,
        name: str = "InverseTimeDecay",
        *,
        dtype: Any = None,
    ) -> None:
        super().__init__(name, dtype)
        check.check_range("initial_learning_rate", initial_learning_rate)
        _positive("decay_steps", decay_steps)
        check.check_range("decay_rate", decay_rate)
        check.check_flag("staircase", staircase)
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = decay_steps
        self.decay_rate = decay_rate
        self.staircase = staircase

    def _value(self, step, dtype):
        lr = jnp.asarray(self.initial_learning_rate, dtype)
        p = step.astype(dtype) / _hyper(self.decay_steps, dtype)
        if self.staircase:
            p = jnp.floor(p)
        return lr / (jnp.ones((), dtype) + jnp.asarray(self.decay_rate, dtype) * p)


class PolynomialDecay(LearningRateSchedule):
    r"""``keras.optimizers.schedules.PolynomialDecay``.

    .. math::

       \eta(s) = (\eta_0 - \eta_{end}) \left(1 - \frac{\min(s, d)}{d}\right)^{k} + \eta_{end}

    or, with ``cycle``, :math:`d` replaced by :math:`d \lceil s/d \rceil` (:math:`d` at
    :math:`s = 0`) and no minimum.

    Args:
      initial_learning_rate: :math:`\eta_0`, >= 0.
      decay_steps: :math:`d`, > 0.
      end_learning_rate: :math:`\eta_{end}`, >= 0.
      power: :math:`k`, >= 0.
      cycle: restart the decay every :math:`d` steps.
      name: Keras's name (kept, unused).
      dtype: the dtype computed in (keyword-only; module notes).

    Example:
      >>> from rmsjax.compat.keras.schedules import PolynomialDecay
      >>> schedule = PolynomialDecay(0.1, 10, end_learning_rate=0.0, power=2.0)
      >>> print([round(float(schedule(s)), 6) for s in (0, 5, 10, 20)])
      [0.1, 0.025, 0.0, 0.0]
    """

    def __init__(
        self,
        initial_learning_rate: float,
        decay_steps: float,
        end_learning_rate: float = 0.0001,
        power: float = 1.0,
        cycle: bool = False,
        name: str = "PolynomialDecay",
        *,
        dtype: Any = None,
    ) -> None:
        super().__init__(name, dtype)
        check.check_range("initial_learning_rate", initial_learning_rate)
        _positive("decay_steps", decay_steps)
        check.check_range("end_learning_rate", end_learning_rate)
        check.check_range("power", power)
        check.check_flag("cycle", cycle)
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = decay_steps
        self.end_learning_rate = end_learning_rate
        self.power = power
        self.cycle = cycle

    def _value(self, step, dtype):
        lr = jnp.asarray(self.initial_learning_rate, dtype)
        end = jnp.asarray(self.end_learning_rate, dtype)
        s = step.astype(dtype)
        decay_steps = _hyper(self.decay_steps, dtype)
        one = jnp.ones((), dtype)
        if self.cycle:
            multiplier = jnp.where(s == jnp.zeros((), dtype), one, jnp.ceil(s / decay_steps))
            decay_steps = decay_steps * multiplier
        else:
            s = jnp.minimum(s, decay_steps)
        base = one - s / decay_steps
        power = jnp.asarray(self.power, dtype)
        # 0 ** power as Keras (0, or 1 for power 0), where XLA's pow may give NaN.
        zero = base == jnp.zeros((), dtype)
        raised = jnp.power(jnp.where(zero, one, base), power)
        raised = jnp.where(zero, jnp.where(power == jnp.zeros((), dtype), one, jnp.zeros((), dtype)), raised)
        return (lr - end) * raised + end
