r"""PyTorch's ``torch.optim.lr_scheduler``, as jittable schedules of the update count.

Each factory takes the arguments PyTorch 2.13's class of the same name takes after the
optimizer, with PyTorch's names and defaults, plus the optimizer's initial learning rate
``lr`` first and a keyword-only ``steps_per_epoch``. It returns a schedule ``f(count)``:
the learning rate PyTorch uses for the update made after ``count`` updates, when the
scheduler is stepped once every ``steps_per_epoch`` updates in the standard way
(``optimizer.step(); scheduler.step()``). Pass it as ``lr`` to any
:mod:`rmsjax.compat.torch` optimizer::

    tx = rmsjax.compat.torch.SGD(lr=StepLR(0.1, step_size=30, steps_per_epoch=len(loader)))

is ``torch.optim.SGD(params, lr=0.1)`` with ``StepLR(opt, step_size=30)`` stepped once per
epoch of ``len(loader)`` batches.

Exactness. Most PyTorch schedulers are *chainable*: each ``step()`` computes the new
learning rate from the one in the optimizer, so what PyTorch produces is a running product
rounded at every epoch, not its closed form. These schedules reproduce the recursion:

* :func:`MultiStepLR`, :func:`ConstantLR`, :func:`LinearLR`, :func:`PolynomialLR`,
  :func:`CosineAnnealingLR` and :func:`OneCycleLR` replay PyTorch's arithmetic on the
  host in float64 once, at construction, and look the result up (a table of
  ``total_iters + 1``, distinct milestones + 1, ``3 * T_max + 1`` or ``total_steps + 1``
  values): bit for bit PyTorch's numbers (past ``3 * T_max``, CosineAnnealingLR repeats
  its last period; see there).
* :func:`StepLR` and :func:`ExponentialLR` multiply host-computed powers
  ``gamma ** 2**j`` selected by the bits of the number of decays (at most 31 products):
  within 1e-14 relative of PyTorch's running product over 10^4 decays (measured), as
  long as the rate stays a normal float.
* :func:`CosineAnnealingWarmRestarts` is not recursive in PyTorch; it uses PyTorch's
  formula with integer epoch arithmetic (equal to PyTorch over 10^5 epochs, measured; the
  only possible difference is XLA's ``cos`` against the C library's).

Counts are integers; the epoch is ``count // steps_per_epoch`` in int32. The schedule
computes in float64 when ``jax_enable_x64`` is on and in float32 otherwise; constants are
computed on the host in float64.

:func:`ReduceLROnPlateau` is not a schedule but an optax transformation driven by the
loss; see its docstring.

Reference:
  PyTorch 2.13, ``torch/optim/lr_scheduler.py``; the numbers are checked against fixtures
  recorded from it (``tests/reference/generate_schedulers.py``).
"""

from __future__ import annotations

import bisect
import math
import numbers
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsjax import _validation as check
from rmsjax.compat import _common as common

__all__ = [
    "ConstantLR",
    "CosineAnnealingLR",
    "CosineAnnealingWarmRestarts",
    "ExponentialLR",
    "LinearLR",
    "MultiStepLR",
    "OneCycleLR",
    "PolynomialLR",
    "ReduceLROnPlateau",
    "ReduceLROnPlateauState",
    "SequentialLR",
    "StepLR",
    "TorchSchedule",
]

# A program maps an int32 epoch (a jax array, >= 0) and a float dtype to the learning rate.
_Program = Callable[[jax.Array, Any], jax.Array]

# Cosine tables hold 3 * T_max + 1 float64 values; beyond this they would be unreasonable.
_MAX_TABLE = 1 << 22


# --------------------------------------------------------------------------- helpers


def _float_dtype():
    """float64 when x64 is on, else float32 (read at trace time)."""
    return common.widest_float(jnp.float64)


_integer = common.check_integer


def _real(name: str, value: Any, *, low: float = 0.0, high: float | None = None,
          high_open: bool = True, low_open: bool = False) -> float:
    """A concrete finite real number in the range, as a Python float (jax arrays fail)."""
    if isinstance(value, jax.Array):
        raise TypeError(
            f"{name} must be a concrete number (schedules are tabulated at construction), "
            f"got a jax array"
        )
    check.check_range(name, value, low=low, high=high, high_open=high_open)
    if low_open and float(value) == low:
        bound = f"in ({low:g}, {high:g}{')' if high_open else ']'}" if high is not None else f"> {low:g}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def _choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def _epoch(count: Any, steps_per_epoch: int) -> jax.Array:
    """``count // steps_per_epoch`` in int32, floored at 0."""
    if isinstance(count, numbers.Integral) and not 0 <= int(count) <= common.MAX_COUNT:
        raise ValueError(
            f"the update count must be in [0, {common.MAX_COUNT}] (rmsjax counts updates in int32), "
            f"got {count!r}"
        )
    count = jnp.asarray(count)
    if not jnp.issubdtype(count.dtype, jnp.integer):
        raise TypeError(f"the update count must be an integer, got dtype {count.dtype}")
    count = count.astype(jnp.int32)
    return jnp.maximum(jnp.floor_divide(count, jnp.int32(steps_per_epoch)), 0)


def _const(table: np.ndarray, dtype) -> jax.Array:
    """A host float64 table as a jax array of ``dtype`` (rates beyond float32's range become inf or 0)."""
    with np.errstate(over="ignore", under="ignore"):
        return jnp.asarray(table.astype(dtype))


def _dense(values: list[float]) -> _Program:
    """``values[min(epoch, len - 1)]``: a recursion replayed on the host, constant after."""
    table = np.asarray(values, np.float64)
    last = len(values) - 1

    def program(epoch, dtype):
        return _const(table, dtype)[jnp.minimum(epoch, last)]

    return program


def _piecewise(starts: list[int], values: list[float]) -> _Program:
    """``values[i]`` for ``starts[i] <= epoch < starts[i + 1]`` (``starts[0] == 0``)."""
    if len(values) == 1:
        value = values[0]
        return lambda epoch, dtype: jnp.full(jnp.shape(epoch), value, dtype)
    bounds = np.asarray(starts[1:], np.int32)
    table = np.asarray(values, np.float64)

    def program(epoch, dtype):
        index = jnp.searchsorted(jnp.asarray(bounds), epoch, side="right")
        return _const(table, dtype)[index]

    return program


def _geometric(lr: float, gamma: float, period: int) -> _Program:
    """``lr * gamma ** (epoch // period)`` as a product of host-computed ``gamma ** 2**j``."""
    def power(j):
        try:
            return math.pow(gamma, 2.0**j)
        except OverflowError:
            return math.inf

    powers = np.asarray([power(j) for j in range(31)], np.float64)

    def program(epoch, dtype):
        decays = jnp.floor_divide(epoch, jnp.int32(period))
        factors = _const(powers, dtype)
        result = jnp.asarray(lr, dtype)
        for j in range(31):
            bit = jnp.bitwise_and(jnp.right_shift(decays, j), 1) == 1
            result = jnp.where(bit, result * factors[j], result)
        return result

    return program


class TorchSchedule:
    """A PyTorch learning-rate scheduler as a schedule of the update count.

    Call it with the number of updates made so far (a Python int or an integer jax array,
    traced or not) to get the learning rate of the next update, as a float64 scalar when
    x64 is on (else float32). Made by the factories of this module; ``lr`` is the
    optimizer's initial learning rate, ``steps_per_epoch`` the number of updates between
    two ``scheduler.step()`` calls.
    """

    def __init__(self, name: str, lr: float, steps_per_epoch: int, fresh: _Program,
                 restarted: _Program | None = None, *, momentum: TorchSchedule | None = None):
        self.name = name
        self.lr = lr
        self.steps_per_epoch = steps_per_epoch
        self._fresh = fresh
        self._restarted = restarted
        self.momentum = momentum

    def __call__(self, count: Any) -> jax.Array:
        return self._fresh(_epoch(count, self.steps_per_epoch), _float_dtype())

    def __repr__(self) -> str:
        return (f"<rmsjax.compat.torch.lr_scheduler.{self.name}(lr={self.lr!r}, "
                f"steps_per_epoch={self.steps_per_epoch})>")


def _start(name: str, lr: Any, steps_per_epoch: Any) -> tuple[float, int]:
    return _real("lr", lr), _integer("steps_per_epoch", steps_per_epoch, low=1)


# --------------------------------------------------------------------------- schedulers


def StepLR(lr, step_size, gamma=0.1, *, steps_per_epoch=1) -> TorchSchedule:
    r"""``torch.optim.lr_scheduler.StepLR``: decay by ``gamma`` every ``step_size`` epochs.

    .. math::

       \eta_e = \eta_0\, \gamma^{\lfloor e / s \rfloor}, \qquad
       e = \lfloor \text{count} / \text{steps\_per\_epoch} \rfloor

    PyTorch multiplies the optimizer's rate by :math:`\gamma` at every non-zero multiple of
    :math:`s` (a running product); the schedule multiplies host-computed powers
    :math:`\gamma^{2^j}`, within 1e-14 relative of the product.

    Args:
      lr: :math:`\eta_0`, the optimizer's initial learning rate, >= 0.
      step_size: :math:`s`, the period in epochs, an integer >= 1 (PyTorch tests
        ``epoch % step_size``, so a float would decay at other epochs; it is refused).
      gamma: :math:`\gamma`, > 0.
      steps_per_epoch: updates per ``scheduler.step()``, >= 1.

    Example:
      >>> from rmsjax.compat.torch.lr_scheduler import StepLR
      >>> schedule = StepLR(0.1, step_size=2, gamma=0.5)
      >>> [round(float(schedule(n)), 4) for n in range(6)]
      [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    """
    lr, steps_per_epoch = _start("StepLR", lr, steps_per_epoch)
    step_size = _integer("step_size", step_size, low=1)
    gamma = _real("gamma", gamma, low_open=True)
    program = _geometric(lr, gamma, step_size)
    return TorchSchedule("StepLR", lr, steps_per_epoch, program, program)


def MultiStepLR(lr, milestones, gamma=0.1, *, steps_per_epoch=1) -> TorchSchedule:
    r"""``torch.optim.lr_scheduler.MultiStepLR``: decay by ``gamma`` at each milestone.

    .. math::

       \eta_e = \eta_0 \prod_{m \in M,\ m \le e} \gamma

    A milestone listed :math:`n` times multiplies by :math:`\gamma^n` at once, as in
    PyTorch (which counts them). PyTorch's running product is replayed on the host: exact.

    Args:
      lr: :math:`\eta_0`, the optimizer's initial learning rate, >= 0.
      milestones: epochs (integers >= 0) at which to decay, in any order, repeats allowed.
      gamma: :math:`\gamma`, > 0.
      steps_per_epoch: updates per ``scheduler.step()``, >= 1.

    Example:
      >>> from rmsjax.compat.torch.lr_scheduler import MultiStepLR
      >>> schedule = MultiStepLR(1.0, milestones=[2, 4, 4], gamma=0.5)
      >>> [float(schedule(n)) for n in range(6)]
      [1.0, 1.0, 0.5, 0.5, 0.125, 0.125]
    """
    lr, steps_per_epoch = _start("MultiStepLR", lr, steps_per_epoch)
    if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Sequence):
        raise TypeError(f"milestones must be a list of integers, got {milestones!r}")
    counts = Counter(_integer(f"milestones[{i}]", m, low=0) for i, m in enumerate(milestones))
    gamma = _real("gamma", gamma, low_open=True)

    # Epoch 0: PyTorch's initial step (and, restarted, its closed form: the same number)
    # applies the milestones at 0; each later milestone multiplies the running rate.
    value = lr * gamma ** counts[0] if counts[0] else lr
    starts, values = [0], [value]
    for m in sorted(counts):
        if m > 0:
            value = value * gamma ** counts[m]
            starts.append(m)
            values.append(value)
    program = _piecewise(starts, values)
    return TorchSchedule("MultiStepLR", lr, steps_per_epoch, program, program)


def ExponentialLR(lr, gamma, *, steps_per_epoch=1) -> TorchSchedule:
    r"""``torch.optim.lr_scheduler.ExponentialLR``: decay by ``gamma`` every epoch.

    .. math:: \eta_e = \eta_0\, \gamma^{e}

    PyTorch's running product is matched within 1e-14 relative for 10^4 epochs (see
    :func:`StepLR`).

    Args:
      lr: :math:`\eta_0`, the optimizer's initial learning rate, >= 0.
      gamma: :math:`\gamma`, > 0.
      steps_per_epoch: updates per ``scheduler.step()``, >= 1.

    Example:
      >>> from rmsjax.compat.torch.lr_scheduler import ExponentialLR
      >>> schedule = ExponentialLR(1.0, gamma=0.5, steps_per_epoch=2)
      >>> [float(schedule(n)) for n in range(6)]
      [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    """
    lr, steps_per_epoch = _start("ExponentialLR", lr, steps_per_epoch)
    gamma = _real("gamma", gamma, low_open=True)
    program = _geometric(lr, gamma, 1)
    return TorchSchedule("ExponentialLR", lr, steps_per_epoch, program, program)


def ConstantLR(lr, factor=1.0 / 3, total_iters=5, *, steps_per_epoch=1) -> TorchSchedule:
    r"""``torch.optim.lr_scheduler.ConstantLR``: ``factor * lr`` for ``total_iters`` epochs.

    .. math::

       \eta_e = \begin{cases} f\,\eta_0 & e < T \\ (f\,\eta_0)\cdot(1/f) & e \ge T \end{cases}

    PyTorch multiplies by :math:`f` at epoch 0 and by :math:`1/f` at epoch :math:`T`, so
    the rate after :math:`T` can differ from :math:`\eta_0` by an ulp; that is reproduced.
    With ``total_iters=0`` PyTorch never undoes the factor (the rate stays
    :math:`f\eta_0`), except as a later part of :func:`SequentialLR`, where its closed form
    gives :math:`\eta_0 (f + (1 - f))`; both are reproduced.

    Args:
      lr: :math:`\eta_0`, the optimizer's initial learning rate, >= 0.
      factor: :math:`f`, in (0, 1] (PyTorch accepts 0 and then divides by zero at
        ``total_iters``).
      total_iters: :math:`T`, an integer >= 0.
      steps_per_epoch: updates per ``scheduler.step()``, >= 1.

    Example:
      >>> from rmsjax.compat.torch.lr_scheduler import ConstantLR
      >>> schedule = ConstantLR(1.0, factor=0.5, total_iters=2)
      >>> [float(schedule(n)) for n in range(4)]
      [0.5, 0.5, 1.0, 1.0]
    """
    lr, steps_per_epoch = _start("ConstantLR", lr, steps_per_epoch)
    factor = _real("factor", factor, high=1.0, high_open=False, low_open=True)
    total_iters = _integer("total_iters", total_iters, low=0)

    def build(restarted: bool) -> _Program:
        if restarted:
            first = lr * (factor + (0 >= total_iters) * (1 - factor))
        else:
            first = lr * factor
        if total_iters == 0:
            return _piecewise([0], [first])
        return _piecewise([0, total_iters], [first, first * (1.0 / factor)])

    return TorchSchedule("ConstantLR", lr, steps_per_epoch, build(False), build(True))


def LinearLR(lr, start_factor=1.0 / 3, end_factor=1.0, total_iters=5, *, steps_per_epoch=1) -> TorchSchedule:
    r"""``torch.optim.lr_scheduler.LinearLR``: a factor moving linearly over ``total_iters`` epochs.

    .. math::

       \eta_e = \eta_0 \left(f_s + (f_e - f_s)\,\frac{\min(e, T)}{T}\right)

    PyTorch gets there recursively, multiplying the running rate at epoch
    :math:`1 \le e \le T` by
    :math:`1 + \frac{f_e - f_s}{T f_s + (e - 1)(f_e - f_s)}`; the recursion is replayed on
    the host (a table of :math:`T + 1` values): exact.

    Args:
      lr: :math:`\eta_0`, the optimizer's initial learning rate, >= 0.
      start_factor: :math:`f_s`, in (0, 1].
      end_factor: :math:`f_e`, in [0, 1].
      total_iters: :math:`T`, an integer >= 0 (0: the rate stays :math:`f_s \eta_0`, as in
        PyTorch).
      steps_per_epoch: updates per ``scheduler.step()``, >= 1.

    Example:
      >>> from rmsjax.compat.torch.lr_scheduler import LinearLR
      >>> schedule = LinearLR(1.0, start_factor=0.25, total_iters=3)
      >>> [float(schedule(n)) for n in range(5)]
      [0.25, 0.5, 0.75, 1.0, 1.0]
    """
    lr, steps_per_epoch = _start("LinearLR", lr, steps_per_epoch)
    start = _real("start_factor", start_factor, high=1.0, high_open=False, low_open=True)
    end = _real("end_factor", end_factor, high=1.0, high_open=False)
    total_iters = _integer("total_iters", total_iters, low=0)
    values = [lr * start]
    for e in range(1, total_iters + 1):
        values.append(values[-1] * (1.0 + (end - start) / (total_iters * start + (e - 1) * (end - start))))
    program = _dense(values)
    # Restarted (a later part of SequentialLR), PyTorch's closed form at epoch 0 is the same
    # number, except that it divides by total_iters.
    return TorchSchedule("LinearLR", lr, steps_per_epoch, program, program if total_iters else None)


def PolynomialLR(lr, total_iters=5, power=1.0, *, steps_per_epoch=1) -> TorchSchedule:
    r"""``torch.optim.lr_scheduler.PolynomialLR``: polynomial decay to 0 over ``total_iters`` epochs.

    .. math:: \eta_e = \eta_0 \left(1 - \frac{\min(e, T)}{T}\right)^{p}

    PyTorch multiplies the running rate at epoch :math:`1 \le e \le T` by
    :math:`\left(\frac{1 - e/T}{1 - (e-1)/T}\right)^p`; replayed on the host: exact.

    Args:
      lr: :math:`\eta_0`, the optimizer's initial learning rate, >= 0.
      total_iters: :math:`T`, an integer >= 0 (0: constant, as in PyTorch).
      power: :math:`p`, >= 0 (PyTorch accepts a negative power and divides by zero at
        :math:`T`).
      steps_per_epoch: updates per ``scheduler.step()``, >= 1.

    Example:
      >>> from rmsjax.compat.torch.lr_scheduler import PolynomialLR
      >>> schedule = PolynomialLR(1.0, total_iters=4, power=2.0)
      >>> [float(schedule(n)) for n in range(6)]
      [1.0, 0.5625, 0.25, 0.0625, 0.0, 0.0]
    """
    lr, steps_per_epoch = _start("PolynomialLR", lr, steps_per_epoch)
    total_iters = _integer("total_iters", total_iters, low=0)
    power = _real("power", power)
    values = [lr]
    for e in range(1, total_iters + 1):
        values.append(values[-1] * ((1.0 - e / total_iters) / (1.0 - (e - 1) / total_iters)) ** power)
    program = _dense(values)
    return TorchSchedule("PolynomialLR", lr, steps_per_epoch, program, program if total_iters else None)


def _cosine_table(lr: float, T_max: int, eta_min: float, first: float) -> list[float]:
    """PyTorch's recursive cosine annealing for epochs 0 .. 3 * T_max, from ``first``."""
    values = [first]
    for e in range(1, 3 * T_max + 1):
        previous = values[-1]
        if (e - 1 - T_max) % (2 * T_max) == 0:
            # the trough: the ratio below would divide by 1 + cos(pi) = 0
            values.append(previous + (lr - eta_min) * (1 - math.cos(math.pi / T_max)) / 2)
        else:
            ratio = (1 + math.cos(math.pi * e / T_max)) / (1 + math.cos(math.pi * (e - 1) / T_max))
            values.append(ratio * (previous - eta_min) + eta_min)
    return values


def CosineAnnealingLR(lr, T_max, eta_min=0.0, *, steps_per_epoch=1) -> TorchSchedule:
    r"""``torch.optim.lr_scheduler.CosineAnnealingLR``: cosine annealing, without restarts.

    .. math::

       \eta_e = \eta_{\min} + \frac{\eta_0 - \eta_{\min}}{2}
                \left(1 + \cos\frac{\pi e}{T_{\max}}\right)

    is the closed form; PyTorch steps it recursively,
    :math:`\eta_e = \eta_{\min} + (\eta_{e-1} - \eta_{\min})
    \frac{1 + \cos(\pi e / T)}{1 + \cos(\pi (e-1) / T)}`, adding
    :math:`(\eta_0 - \eta_{\min})(1 - \cos(\pi/T))/2` after each trough, and the rounding
    of that recursion differs from the closed form by more than 1e-12 relative near the
    troughs when :math:`\eta_{\min} = 0` (the ratio of two small numbers). Past
    :math:`T_{\max}` the rate climbs back (period :math:`2T_{\max}`). The schedule replays
    PyTorch's recursion on the host for epochs :math:`0 \ldots 3T_{\max}` (exact) and
    repeats its last period :math:`T_{\max}+1 \ldots 3T_{\max}` beyond: PyTorch's
    recursion restarts bit for bit at each trough, and between them the repeated period
    differs from it by rounding only (measured below 1e-13 relative for
    :math:`T_{\max} \le 1000`, see ``docs/schedulers.md``).

    Args:
      lr: :math:`\eta_0`, the optimizer's initial learning rate, >= 0.
      T_max: :math:`T_{\max}`, the half period in epochs, an integer >= 1.
      eta_min: :math:`\eta_{\min}`, >= 0.
      steps_per_epoch: updates per ``scheduler.step()``, >= 1.

    Example:
      >>> from rmsjax.compat.torch.lr_scheduler import CosineAnnealingLR
      >>> schedule = CosineAnnealingLR(1.0, T_max=4)
      >>> [round(float(schedule(n)), 4) for n in range(9)]
      [1.0, 0.8536, 0.5, 0.1464, 0.0, 0.1464, 0.5, 0.8536, 1.0]
    """
    lr, steps_per_epoch = _start("CosineAnnealingLR", lr, steps_per_epoch)
    T_max = _integer("T_max", T_max, low=1)
    eta_min = _real("eta_min", eta_min)
    if 3 * T_max + 1 > _MAX_TABLE:
        raise ValueError(
            f"T_max must be at most {(_MAX_TABLE - 1) // 3} (a table of 3 * T_max + 1 rates), got {T_max}"
        )

    def build(first: float) -> _Program:
        table = np.asarray(_cosine_table(lr, T_max, eta_min, first), np.float64)
        size = 3 * T_max

        def program(epoch, dtype):
            beyond = T_max + 1 + jnp.remainder(epoch - (T_max + 1), 2 * T_max)
            index = jnp.where(epoch <= size, epoch, beyond)
            return _const(table, dtype)[index]

        return program

    closed_at_zero = eta_min + (lr - eta_min) * (1 + math.cos(math.pi * 0 / T_max)) / 2
    return TorchSchedule("CosineAnnealingLR", lr, steps_per_epoch, build(lr), build(closed_at_zero))


def CosineAnnealingWarmRestarts(lr, T_0, T_mult=1, eta_min=0.0, *, steps_per_epoch=1) -> TorchSchedule:
    r"""``torch.optim.lr_scheduler.CosineAnnealingWarmRestarts`` (SGDR), stepped once per epoch.

    .. math::

       \eta_e = \eta_{\min} + \frac{\eta_0 - \eta_{\min}}{2}
                \left(1 + \cos\frac{\pi T_{cur}}{T_i}\right)

    where the :math:`i`-th period lasts :math:`T_i = T_0 T_{mult}^i` epochs and
    :math:`T_{cur}` counts the epochs since the last restart, both integers computed from
    :math:`e` exactly as PyTorch's ``step()`` updates them. Not recursive in PyTorch; the
    formula is PyTorch's, term for term.

    Args:
      lr: :math:`\eta_0`, the optimizer's initial learning rate, >= 0.
      T_0: the first period in epochs, an integer >= 1.
      T_mult: the growth of the period after each restart, an integer >= 1.
      eta_min: :math:`\eta_{\min}`, >= 0.
      steps_per_epoch: updates per ``scheduler.step()``, >= 1 (PyTorch recipes that step
        this scheduler with a fractional epoch, ``step(epoch + i / iters)``, are not
        covered).

    Example:
      >>> from rmsjax.compat.torch.lr_scheduler import CosineAnnealingWarmRestarts
      >>> schedule = CosineAnnealingWarmRestarts(1.0, T_0=2, T_mult=2)
      >>> [round(float(schedule(n)), 4) for n in range(7)]
      [1.0, 0.5, 1.0, 0.8536, 0.5, 0.1464, 1.0]
    """
    lr, steps_per_epoch = _start("CosineAnnealingWarmRestarts", lr, steps_per_epoch)
    T_0 = _integer("T_0", T_0, low=1)
    T_mult = _integer("T_mult", T_mult, low=1)
    eta_min = _real("eta_min", eta_min)
    # restart epochs and period lengths, while they fit in int32
    restarts, periods = [0], [T_0]
    if T_mult > 1:
        while restarts[-1] + periods[-1] < 2**31 - 1:
            restarts.append(restarts[-1] + periods[-1])
            periods.append(periods[-1] * T_mult)
    starts = np.asarray(restarts, np.int32)
    lengths = np.asarray(periods, np.float64)  # the last may exceed int32
    span = lr - eta_min

    def program(epoch, dtype):
        if T_mult == 1:
            t_cur, t_i = jnp.remainder(epoch, jnp.int32(T_0)), jnp.asarray(float(T_0), dtype)
        else:
            i = jnp.searchsorted(jnp.asarray(starts[1:]), epoch, side="right")
            t_cur, t_i = epoch - jnp.asarray(starts)[i], _const(lengths, dtype)[i]
        pi = jnp.asarray(math.pi, dtype)
        cosine = jnp.cos(pi * t_cur.astype(dtype) / t_i)
        return jnp.asarray(eta_min, dtype) + jnp.asarray(span, dtype) * (1 + cosine) / 2

    return TorchSchedule("CosineAnnealingWarmRestarts", lr, steps_per_epoch, program, program)


def OneCycleLR(
    lr,
    max_lr,
    total_steps=None,
    epochs=None,
    steps_per_epoch=None,
    pct_start=0.3,
    anneal_strategy="cos",
    cycle_momentum=True,
    base_momentum=0.85,
    max_momentum=0.95,
    div_factor=25.0,
    final_div_factor=1e4,
    three_phase=False,
) -> TorchSchedule:
    r"""``torch.optim.lr_scheduler.OneCycleLR``: the 1cycle policy, stepped once per update.

    The rate goes from :math:`\eta_{init} = \eta_{\max} / d` up to :math:`\eta_{\max}` over
    the first ``pct_start`` of the cycle, then down to :math:`\eta_{init} / d_f` (with
    ``three_phase``: back to :math:`\eta_{init}` symmetrically, then down to
    :math:`\eta_{init}/d_f`). Within a phase from step :math:`a` to :math:`b`, with
    :math:`p = (n - a)/(b - a)`:

    .. math::

       \eta_n = \eta_{end} + \frac{\eta_{start} - \eta_{end}}{2}(1 + \cos \pi p)
       \quad\text{or, linear,}\quad (\eta_{end} - \eta_{start})\,p + \eta_{start}

    with PyTorch's phase ends :math:`\lfloor\text{pct\_start}\cdot N\rfloor - 1` (as a
    float), :math:`N - 1` (and :math:`2\,\text{pct\_start}\,N - 2` for three phases). Not
    recursive in PyTorch; the schedule tabulates PyTorch's formula on the host for steps
    :math:`0 \ldots N` (exact; with XLA's ``cos`` instead, :math:`1 + \cos \pi p` near the
    end of a long cycle would differ by up to 3e-12 relative).

    ``lr`` is accepted for uniformity and ignored, as PyTorch ignores the optimizer's
    learning rate here: OneCycleLR overwrites it with ``max_lr / div_factor``.
    ``steps_per_epoch`` keeps PyTorch's meaning (with ``epochs``, it gives
    ``total_steps = epochs * steps_per_epoch``): the schedule is always stepped once per
    update, as PyTorch recipes do, so ``count`` is PyTorch's batch index. PyTorch raises
    once stepped more than ``total_steps`` times; the schedule holds the rate of step
    ``total_steps`` (the last one PyTorch computes) beyond.

    ``cycle_momentum`` makes PyTorch also cycle the optimizer's momentum (or Adam's
    :math:`\beta_1`) inversely between ``max_momentum`` and ``base_momentum``. The returned
    schedule is the learning rate only; its attribute ``.momentum`` is the momentum
    schedule (``None`` without ``cycle_momentum``), to pass as a hyperparameter, e.g.
    ``optax.inject_hyperparams(rmsjax.compat.torch.SGD)(lr=s, momentum=s.momentum)``.
    Without that, the optimizer keeps its own momentum, unlike PyTorch (which also sets
    the momentum to ``max_momentum`` at construction).

    Args:
      lr: the optimizer's learning rate, >= 0; ignored (see above).
      max_lr: :math:`\eta_{\max}`, >= 0.
      total_steps: :math:`N`, an integer >= 1; or give ``epochs`` and ``steps_per_epoch``.
      epochs: an integer >= 1, with ``steps_per_epoch`` (ignored beside ``total_steps``,
        as in PyTorch, but checked).
      steps_per_epoch: an integer >= 1, with ``epochs`` (PyTorch's meaning; ignored beside
        ``total_steps`` but checked).
      pct_start: the fraction of the cycle spent increasing the rate, in [0, 1].
      anneal_strategy: ``'cos'`` or ``'linear'``.
      cycle_momentum: also make the momentum schedule ``.momentum``.
      base_momentum: the momentum at the peak of the rate, in [0, 1].
      max_momentum: the momentum at the start and end, in [0, 1].
      div_factor: :math:`d`, > 0.
      final_div_factor: :math:`d_f`, > 0.
      three_phase: use PyTorch's three-phase variant.

    Example:
      >>> from rmsjax.compat.torch.lr_scheduler import OneCycleLR
      >>> schedule = OneCycleLR(0.0, max_lr=1.0, total_steps=10, anneal_strategy="linear")
      >>> [round(float(schedule(n)), 4) for n in (0, 1, 2, 5, 9)]
      [0.04, 0.52, 1.0, 0.5714, 0.0]
      >>> [round(float(schedule.momentum(n)), 4) for n in (0, 2, 9)]
      [0.95, 0.85, 0.95]
    """
    lr = _real("lr", lr)
    max_lr = _real("max_lr", max_lr)
    # Checked even beside total_steps (which PyTorch then uses alone): a bad value is a mistake.
    epochs = _integer("epochs", epochs, low=1, optional=True)
    steps_per_epoch = _integer("steps_per_epoch", steps_per_epoch, low=1, optional=True)
    if total_steps is not None:
        total = _integer("total_steps", total_steps, low=1)
    elif epochs is not None and steps_per_epoch is not None:
        total = epochs * steps_per_epoch
    else:
        raise ValueError("OneCycleLR needs total_steps, or both epochs and steps_per_epoch")
    pct_start = _real("pct_start", pct_start, high=1.0, high_open=False)
    anneal_strategy = _choice("anneal_strategy", anneal_strategy, ("cos", "linear"))
    check.check_flag("cycle_momentum", cycle_momentum)
    check.check_flag("three_phase", three_phase)
    base_momentum = _real("base_momentum", base_momentum, high=1.0, high_open=False)
    max_momentum = _real("max_momentum", max_momentum, high=1.0, high_open=False)
    div_factor = _real("div_factor", div_factor, low_open=True)
    final_div_factor = _real("final_div_factor", final_div_factor, low_open=True)

    initial_lr = max_lr / div_factor
    rates = {"initial_lr": initial_lr, "max_lr": max_lr, "min_lr": initial_lr / final_div_factor,
             "max_momentum": max_momentum, "base_momentum": base_momentum}
    if three_phase:
        phases = [(float(pct_start * total) - 1, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
                  (float(2 * pct_start * total) - 2, "max_lr", "initial_lr", "base_momentum", "max_momentum"),
                  (total - 1, "initial_lr", "min_lr", "max_momentum", "max_momentum")]
    else:
        phases = [(float(pct_start * total) - 1, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
                  (total - 1, "max_lr", "min_lr", "base_momentum", "max_momentum")]
    # PyTorch picks the first phase whose end is >= the step (else the last one), with
    # p = (step - previous end) / (end - previous end), the first phase starting at 0.0.
    starts = [0.0] + [float(p[0]) for p in phases[:-1]]
    lengths = [float(p[0]) - s for p, s in zip(phases, starts)]
    last = total
    if lengths[0] == 0:
        raise ValueError(
            f"pct_start * total_steps must not be 1 (PyTorch divides by zero at step 0), got "
            f"pct_start={pct_start!r}, total_steps={total}"
        )
    if lengths[-1] == 0:
        last = total - 1  # PyTorch divides by zero at step total_steps: hold step total_steps - 1

    if last + 1 > _MAX_TABLE:
        raise ValueError(
            f"total_steps must be at most {_MAX_TABLE - 1} (a table of total_steps + 1 rates), got {total}"
        )

    def table(first: int, second: int) -> list[float]:
        # PyTorch's formulas on the host, in float64 with the C library's cos (XLA's cos
        # differs by an ulp, which 1 + cos(pi * p) amplifies near the end of the cycle)
        values, phase = [], 0
        for n in range(last + 1):
            while phase < len(phases) - 1 and n > phases[phase][0]:
                phase += 1
            names = phases[phase][1:]
            a, b = rates[names[first]], rates[names[second]]
            pct = (n - starts[phase]) / lengths[phase]
            if anneal_strategy == "cos":
                values.append(b + (a - b) / 2.0 * (math.cos(math.pi * pct) + 1))
            else:
                values.append((b - a) * pct + a)
        return values

    momentum = TorchSchedule("OneCycleLR.momentum", lr, 1, _dense(table(2, 3))) if cycle_momentum else None
    return TorchSchedule("OneCycleLR", lr, 1, _dense(table(0, 1)), None, momentum=momentum)


def SequentialLR(lr, schedulers, milestones, *, steps_per_epoch=1) -> TorchSchedule:
    r"""``torch.optim.lr_scheduler.SequentialLR``: one schedule after another.

    .. math::

       \eta_e = S_j(e - m_j) \quad\text{for } m_j \le e < m_{j+1},
       \qquad m_0 = 0

    As PyTorch does, each later scheduler starts afresh at its milestone: PyTorch calls its
    closed form at epoch 0 there, then steps it recursively from that rate. The closed
    form at 0 equals the scheduler's usual first rate except for
    :func:`CosineAnnealingLR` (:math:`\eta_{\min} + (\eta_0 - \eta_{\min})`, an ulp off)
    and :func:`ConstantLR` with ``total_iters=0`` (the factor is undone at once); both
    quirks are reproduced. A milestone at 0 skips the schedulers before it.

    Args:
      lr: :math:`\eta_0`, the optimizer's initial learning rate, >= 0; every part must have
        been made with the same ``lr`` (in PyTorch they share the optimizer).
      schedulers: schedules of this module, each with ``steps_per_epoch=1`` (they advance
        once per epoch of this one). :func:`OneCycleLR` (which rewrites the optimizer's
        initial rate in PyTorch), nested :func:`SequentialLR` (PyTorch fails at its
        milestone) and, as in PyTorch, :func:`ReduceLROnPlateau` are refused; so are
        :func:`LinearLR` and :func:`PolynomialLR` with ``total_iters=0`` after a milestone
        (PyTorch divides by zero there).
      milestones: ``len(schedulers) - 1`` epochs, integers >= 0, non-decreasing.
      steps_per_epoch: updates per ``scheduler.step()``, >= 1.

    Example:
      >>> from rmsjax.compat.torch.lr_scheduler import ExponentialLR, LinearLR, SequentialLR
      >>> warmup = LinearLR(1.0, start_factor=0.5, total_iters=2)
      >>> decay = ExponentialLR(1.0, gamma=0.5)
      >>> schedule = SequentialLR(1.0, [warmup, decay], milestones=[3])
      >>> [float(schedule(n)) for n in range(6)]
      [0.5, 0.75, 1.0, 1.0, 0.5, 0.25]
    """
    lr, steps_per_epoch = _start("SequentialLR", lr, steps_per_epoch)
    if isinstance(schedulers, (str, bytes)) or not isinstance(schedulers, Sequence) or not schedulers:
        raise ValueError(f"schedulers must be a non-empty list of schedules, got {schedulers!r}")
    if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Sequence):
        raise TypeError(f"milestones must be a list of integers, got {milestones!r}")
    milestones = [_integer(f"milestones[{i}]", m, low=0) for i, m in enumerate(milestones)]
    if len(milestones) != len(schedulers) - 1:
        raise ValueError(
            f"milestones must have one entry fewer than schedulers, got {len(milestones)} milestones "
            f"for {len(schedulers)} schedulers"
        )
    if any(b < a for a, b in zip(milestones, milestones[1:])):
        raise ValueError(f"milestones must be non-decreasing, got {milestones}")
    first = bisect.bisect_right(milestones, 0)
    programs = []
    for j, part in enumerate(schedulers):
        where = f"schedulers[{j}]"
        if isinstance(part, ReduceLROnPlateauTransformation):
            raise ValueError(f"{where}: SequentialLR does not take ReduceLROnPlateau (neither does PyTorch)")
        if not isinstance(part, TorchSchedule):
            raise TypeError(f"{where} must be a schedule of rmsjax.compat.torch.lr_scheduler, got {part!r}")
        if part.name in ("OneCycleLR", "SequentialLR", "OneCycleLR.momentum"):
            raise ValueError(f"{where}: SequentialLR does not take {part.name}")
        if part.lr != lr:
            raise ValueError(
                f"{where} was made with lr={part.lr!r}, SequentialLR with lr={lr!r}: they must agree"
            )
        if part.steps_per_epoch != 1:
            raise ValueError(
                f"{where} must have steps_per_epoch=1 (give it to SequentialLR), got {part.steps_per_epoch}"
            )
        # parts before `first` (milestones at 0) never run
        program = part._fresh if j <= first else part._restarted  # pyright: ignore[reportAssignmentType]
        if program is None:
            raise ValueError(f"{where}: PyTorch divides by zero restarting {part.name} with total_iters=0")
        programs.append(program)
    starts = [0] + milestones
    bounds = np.asarray(milestones, np.int32)

    def program(epoch, dtype):
        values = jnp.stack([p(jnp.maximum(epoch - s, 0), dtype) for p, s in zip(programs, starts)])
        if not milestones:
            return values[0]
        return values[jnp.searchsorted(jnp.asarray(bounds), epoch, side="right")]

    return TorchSchedule("SequentialLR", lr, steps_per_epoch, program, None)


# --------------------------------------------------------------------------- ReduceLROnPlateau


class ReduceLROnPlateauState(NamedTuple):
    """State of :func:`ReduceLROnPlateau`, with PyTorch's names.

    Attributes:
      lr: the learning rate PyTorch's optimizer would have now.
      best: the best epoch metric so far (``inf`` in mode ``'min'`` before the first epoch).
      num_bad_epochs: epochs since the last improvement (int32).
      cooldown_counter: epochs of cooldown left (int32).
      count: updates made in the current epoch (int32).
      value: the running mean of the values passed in the current epoch.
    """

    lr: jax.Array
    best: jax.Array
    num_bad_epochs: jax.Array
    cooldown_counter: jax.Array
    count: jax.Array
    value: jax.Array


def _check_metric(value: Any) -> None:
    """``value`` of ``ReduceLROnPlateau.update`` must be a real scalar (the metric of the step)."""
    wanted = "a real scalar, the metric (a Python or NumPy real number, or an array of shape ())"
    where = "ReduceLROnPlateau.update: value"
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        if value.shape != ():
            raise TypeError(
                f"{where} must be {wanted}, got an array of shape {value.shape} (per-example "
                "losses? pass their mean)"
            )
        if not (jnp.issubdtype(value.dtype, jnp.integer) or jnp.issubdtype(value.dtype, jnp.floating)):
            raise TypeError(f"{where} must be {wanted}, got an array of dtype {value.dtype}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where} must be {wanted}, got {value!r} of type {type(value).__name__}")
    try:
        float(value)
    except OverflowError:
        raise ValueError(f"{where} must be {wanted}, got an integer too large for a float") from None


class ReduceLROnPlateauTransformation(optax.GradientTransformationExtraArgs):
    """The transformation :func:`ReduceLROnPlateau` returns (an ``optax.GradientTransformationExtraArgs``)."""


def ReduceLROnPlateau(
    lr,
    mode="min",
    factor=0.1,
    patience=10,
    threshold=1e-4,
    threshold_mode="rel",
    cooldown=0,
    min_lr=0,
    eps=1e-8,
    *,
    steps_per_epoch=1,
) -> optax.GradientTransformationExtraArgs:
    r"""``torch.optim.lr_scheduler.ReduceLROnPlateau``, as a transformation driven by the loss.

    Like ``optax.contrib.reduce_on_plateau``, its ``update(updates, state, params=None, *,
    value)`` takes the loss (a real scalar) and scales the updates. It keeps PyTorch's
    learning rate :math:`\eta` in its state and multiplies the updates by
    :math:`\eta / \eta_0`: chain it *after* a :mod:`rmsjax.compat.torch` optimizer made with
    ``lr=`` :math:`\eta_0`, so that the step is PyTorch's :math:`\eta \cdot (\ldots)`
    (AdamW's decoupled decay included)::

        tx = optax.chain(rmsjax.compat.torch.SGD(lr=0.1, momentum=0.9),
                         ReduceLROnPlateau(0.1, patience=5, steps_per_epoch=len(loader)))
        updates, state = tx.update(grads, state, params, value=loss)

    Every ``steps_per_epoch`` updates, the mean of the values passed during that epoch is
    the metric of ``scheduler.step(metric)``, and the rule is PyTorch's: the metric is
    better if :math:`a < b(1 - \tau)` (``'rel'``) or :math:`a < b - \tau` (``'abs'``), with
    ``>``, :math:`1 + \tau` and :math:`+\tau` in mode ``'max'``; after more than
    ``patience`` epochs without a better one (bad epochs during a cooldown do not count),

    .. math::

       \eta \leftarrow \max(\eta f, \eta_{\min}) \ \text{ if }\ \eta - \max(\eta f, \eta_{\min}) > \epsilon

    then ``cooldown`` epochs of rest. The new rate applies from the first update of the next
    epoch, as in PyTorch. The mean is a running one, exact when the values are all equal:
    to drive it by a validation loss, pass that loss at every update of the epoch (or use
    ``steps_per_epoch=1`` and call ``update`` once per epoch). Read the current rate as
    ``state.lr`` (in a chain, the last part of the state).

    Args:
      lr: :math:`\eta_0`, the optimizer's initial learning rate, >= 0.
      mode: ``'min'`` (the loss should fall) or ``'max'``.
      factor: :math:`f`, in [0, 1).
      patience: epochs without improvement tolerated, an integer >= 0.
      threshold: :math:`\tau`, >= 0.
      threshold_mode: ``'rel'`` or ``'abs'``.
      cooldown: epochs to wait after a reduction, an integer >= 0.
      min_lr: :math:`\eta_{\min}`, >= 0 (one number: rmsjax has one parameter group).
      eps: :math:`\epsilon`, the smallest reduction applied, >= 0.
      steps_per_epoch: updates per ``scheduler.step(metric)``, >= 1.

    Example:
      >>> import jax.numpy as jnp
      >>> from rmsjax.compat.torch.lr_scheduler import ReduceLROnPlateau
      >>> tx = ReduceLROnPlateau(1.0, patience=1)
      >>> state = tx.init(jnp.zeros(1))
      >>> scales = []
      >>> for loss in [3.0, 2.0, 2.0, 2.0, 2.0, 1.0]:
      ...     updates, state = tx.update(jnp.ones(1), state, value=loss)
      ...     scales.append(round(float(updates[0]), 4))
      >>> scales
      [1.0, 1.0, 1.0, 1.0, 0.1, 0.1]
    """
    lr, steps_per_epoch = _start("ReduceLROnPlateau", lr, steps_per_epoch)
    mode = _choice("mode", mode, ("min", "max"))
    factor = _real("factor", factor, high=1.0)
    patience = _integer("patience", patience, low=0)
    threshold = _real("threshold", threshold)
    threshold_mode = _choice("threshold_mode", threshold_mode, ("rel", "abs"))
    cooldown = _integer("cooldown", cooldown, low=0)
    min_lr = _real("min_lr", min_lr)
    eps = _real("eps", eps)
    rel = 1.0 - threshold if mode == "min" else threshold + 1.0

    def is_better(a, best, dtype):
        if threshold_mode == "rel":
            limit = best * jnp.asarray(rel, dtype)
        else:
            margin = jnp.asarray(threshold, dtype)
            limit = best - margin if mode == "min" else best + margin
        return a < limit if mode == "min" else a > limit

    def init_fn(params):
        del params
        dtype = _float_dtype()
        worst = jnp.inf if mode == "min" else -jnp.inf
        zero = jnp.zeros((), jnp.int32)
        return ReduceLROnPlateauState(
            jnp.asarray(lr, dtype), jnp.asarray(worst, dtype), zero, zero, zero, jnp.zeros((), dtype)
        )

    def update_fn(updates, state, params=None, *, value, **extra_args):
        del params, extra_args
        check.check_state_type(state, ReduceLROnPlateauState, "ReduceLROnPlateau.update")
        _check_metric(value)
        dtype = state.lr.dtype
        ratio = state.lr / jnp.asarray(lr, dtype) if lr > 0 else jnp.ones((), dtype)
        updates = jax.tree.map(lambda u: (u * ratio.astype(u.dtype)).astype(u.dtype), updates)

        value = jnp.asarray(value).astype(dtype)
        count = state.count + 1
        mean = state.value + (value - state.value) / count.astype(dtype)

        def epoch_end(state):
            better = is_better(mean, state.best, dtype)
            best = jnp.where(better, mean, state.best)
            bad = jnp.where(better, 0, state.num_bad_epochs + 1)
            cooling = state.cooldown_counter > 0
            cooldown_counter = jnp.where(cooling, state.cooldown_counter - 1, state.cooldown_counter)
            bad = jnp.where(cooling, 0, bad)
            reduce = bad > patience
            new_lr = jnp.maximum(state.lr * jnp.asarray(factor, dtype), jnp.asarray(min_lr, dtype))
            applied = reduce & (state.lr - new_lr > jnp.asarray(eps, dtype))
            return ReduceLROnPlateauState(
                jnp.where(applied, new_lr, state.lr),
                best,
                jnp.where(reduce, 0, bad).astype(jnp.int32),
                jnp.where(reduce, cooldown, cooldown_counter).astype(jnp.int32),
                jnp.zeros((), jnp.int32),
                jnp.zeros((), dtype),
            )

        ended = epoch_end(state)
        running = state._replace(count=count, value=mean)
        done = count >= steps_per_epoch
        new_state = jax.tree.map(lambda a, b: jnp.where(done, a, b), ended, running)
        return updates, new_state

    return ReduceLROnPlateauTransformation(init_fn, update_fn)  # pyright: ignore[reportArgumentType]
