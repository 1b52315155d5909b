r"""Keras 3's ``keras.optimizers``, reproduced with rmsjax's transformations.

Each factory takes the arguments, argument order and defaults of the Keras 3 class of the
same name -- the optimizer's own, then the options every Keras optimizer shares
(``weight_decay``, ``clipnorm``, ``clipvalue``, ``global_clipnorm``, ``use_ema``,
``ema_momentum``, ``ema_overwrite_frequency``, ``loss_scale_factor``,
``gradient_accumulation_steps``, ``name``) -- and returns an ``optax.GradientTransformation``
that follows Keras's parameter trajectory (checked to 1e-9 relative in float64 against
fixtures recorded from Keras 3.15 on its JAX backend). Learning-rate schedules with Keras's
arithmetic are in :mod:`rmsjax.compat.keras.schedules`.

What Keras does, and these factories therefore do:

* ``epsilon`` goes *inside* the square root (``sqrt(v + epsilon)``), except in Adam, which
  adds it to the root of the uncorrected second moment ("epsilon hat").
* the learning rate sits *inside* the momentum buffer: ``m = momentum * m + lr * g / den``,
  ``params -= m``; this matters when the learning rate changes over time.
* one step of ``optimizer.apply`` is, in this order: gradients divided by
  ``loss_scale_factor``; [accumulated]; clipped (``clipnorm`` per variable, or
  ``global_clipnorm``, or ``clipvalue``); decoupled ``weight_decay``
  ``params -= lr_t * weight_decay * params``; the optimizer's own update; the moving
  average of the parameters (``use_ema``) updated, and every ``ema_overwrite_frequency``
  iterations written back into the parameters -- here the update of that step is
  ``ema - params``, so ``optax.apply_updates`` lands on the average (Keras assigns it;
  the added difference is rounded twice, so the parameters land within about one spacing
  of their dtype, at the larger of their and the average's magnitude, of it).
* ``learning_rate`` may be a schedule ``f(step)`` (``step`` = ``optimizer.iterations``, 0 at
  the first update), as a ``keras.optimizers.schedules.LearningRateSchedule`` is.

The chain of every factory has the same slots whatever the values: ``loss scale -> clip ->
optimizer parts -> learning rate -> [momentum] -> weight decay -> EMA``, each unused slot a
``transforms.absent()``; with ``gradient_accumulation_steps`` the middle (clip to weight decay)
is wrapped in one accumulation part. The moving average lives in the optimizer state (it is
checkpointed with it); :func:`ema_params` reads it.

Shared options (the arguments every factory here takes after its own, as Keras's
``Optimizer`` does; ``mask`` is keyword-only):

  weight_decay: :math:`\lambda`, ``None`` or >= 0: decoupled decay
    ``params -= lr_t * weight_decay * params``, with the current learning rate, outside
    any momentum buffer.
  clipnorm: ``None`` or >= 0: each leaf's gradient rescaled to an L2 norm of at most
    this (0: no clipping, as in Keras).
  clipvalue: ``None`` or >= 0: each gradient element clipped to ``[-clipvalue,
    clipvalue]`` (0: no clipping).
  global_clipnorm: ``None`` or >= 0: the whole gradient tree rescaled to a global L2 norm
    of at most this (0: no clipping). At most one of the three clipping options may be
    set.
  use_ema: keep a moving average of the parameters in the state (:func:`ema_params`).
  ema_momentum: :math:`m`, in [0, 1]: ``ema = m * ema + (1 - m) * params`` after each
    update; the first update sets ``ema = params``.
  ema_overwrite_frequency: ``None`` or an integer >= 1: every that many iterations the
    parameters are replaced by their moving average (the update of that step is
    ``ema - params``). ``None``: never (Keras's ``finalize_variable_values`` at the end of
    ``fit`` is ``ema_params(opt_state)``).
  loss_scale_factor: ``None`` or > 0: the gradients are divided by it first (they are
    gradients of the loss multiplied by it).
  gradient_accumulation_steps: ``None`` or an integer >= 2: the parameters change every
    that many updates, with the mean of the gradients since the last change (the
    updates in between are zero). As in Keras, schedules and the weight decay see the
    count of all updates, the bias corrections and the EMA the count of real ones.
  name: ``None`` or a string; accepted for Keras's signature and ignored.
  mask: where weight decay applies (Keras's ``exclude_from_weight_decay``): a tree of
    bools like the parameters, or a function of the parameters returning one (True:
    decay). Keyword-only.

Keras itself checks few hyperparameters; here out-of-range values raise ``ValueError``
naming the argument, and an argument Keras does not have raises ``TypeError``.

``momentum=0`` (SGD's and RMSprop's default) leaves the buffer out; under
``optax.inject_hyperparams`` pass ``static_args=("momentum",)`` to keep it out (an injected 0
is an array and keeps the buffer, with the same updates). The shared options default to
``None``, which is never injected.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

from rmsjax import _validation as check
from rmsjax import transforms
from rmsjax.compat import _common as common
from rmsjax.compat import _keras_parts as parts
from rmsjax.compat._keras_parts import EmaState as EmaState
from rmsjax.compat.keras import schedules as schedules
from rmsjax.transforms import MaskOrFn, ScalarOrSchedule

# The optimizers; also public: ``schedules`` (the submodule), ``ema_params`` and ``EmaState``.
__all__ = ["SGD", "Adadelta", "Adagrad", "Adam", "AdamW", "Adamax", "Nadam", "RMSprop"]

PyTree = Any
Parts = Callable[[ScalarOrSchedule], list[optax.GradientTransformation]]



def _check_shared(
    weight_decay,
    clipnorm,
    clipvalue,
    global_clipnorm,
    use_ema,
    ema_momentum,
    ema_overwrite_frequency,
    loss_scale_factor,
    gradient_accumulation_steps,
    name,
) -> None:
    for label, value in (
        ("weight_decay", weight_decay),
        ("clipnorm", clipnorm),
        ("clipvalue", clipvalue),
        ("global_clipnorm", global_clipnorm),
    ):
        if value is not None:
            common.require(label, value)
    given = [
        label
        for label, value in (
            ("clipnorm", clipnorm),
            ("clipvalue", clipvalue),
            ("global_clipnorm", global_clipnorm),
        )
        if value is not None
    ]
    if len(given) > 1:
        raise ValueError(
            f"only one of clipnorm, clipvalue and global_clipnorm can be set, got {', '.join(given)}: "
            f"clipnorm={clipnorm!r}, clipvalue={clipvalue!r}, global_clipnorm={global_clipnorm!r}"
        )
    check.check_flag("use_ema", use_ema)
    common.require("ema_momentum", ema_momentum, high=1.0, high_open=False)
    common.check_integer("ema_overwrite_frequency", ema_overwrite_frequency, low=1, optional=True)
    if loss_scale_factor is not None:
        common.require("loss_scale_factor", loss_scale_factor)
        if common.is_concrete_zero(loss_scale_factor):
            raise ValueError(
                f"loss_scale_factor must be None or a finite number > 0, got {loss_scale_factor!r}"
            )
    common.check_integer("gradient_accumulation_steps", gradient_accumulation_steps, low=2, optional=True)
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be None or a string, got {name!r} of type {type(name).__name__}")


def _assemble(
    learning_rate: ScalarOrSchedule,
    optimizer_parts: Parts,
    weight_decay,
    clipnorm,
    clipvalue,
    global_clipnorm,
    use_ema,
    ema_momentum,
    ema_overwrite_frequency,
    loss_scale_factor,
    gradient_accumulation_steps,
    name,
    mask,
) -> optax.GradientTransformation:
    """The chain ``loss scale -> [accumulate: clip -> optimizer -> weight decay] -> EMA``.

    The shared options come in the order of the factories' signatures (AdamW's
    ``weight_decay``, which comes second there, included), passed by position.
    """
    _check_shared(
        weight_decay,
        clipnorm,
        clipvalue,
        global_clipnorm,
        use_ema,
        ema_momentum,
        ema_overwrite_frequency,
        loss_scale_factor,
        gradient_accumulation_steps,
        name,
    )
    steps = gradient_accumulation_steps
    rate = learning_rate if steps is None else parts.real_step_rate(learning_rate, steps)
    if clipnorm is not None:
        clip = common.unless_zero(clipnorm, lambda: parts.clip_by_norm(clipnorm))
    elif global_clipnorm is not None:
        clip = common.unless_zero(global_clipnorm, lambda: parts.clip_by_global_norm(global_clipnorm))
    else:
        clip = common.unless_zero(clipvalue, lambda: parts.clip_by_value(clipvalue))

    def decay():
        tx = common.decoupled_weight_decay(weight_decay, rate)
        return tx if mask is None else optax.masked(tx, mask)

    middle = [clip, *optimizer_parts(rate), common.unless_zero(weight_decay, decay)]
    scale = common.unless_zero(loss_scale_factor, lambda: parts.divide_gradients(loss_scale_factor))
    if use_ema:
        average = parts.ema(ema_momentum, ema_overwrite_frequency, 1 if steps is None else steps)
    else:
        average = transforms.absent()
    if steps is None:
        return optax.chain(scale, *middle, average)
    return optax.chain(scale, parts.accumulate_gradients(optax.chain(*middle), steps), average)


def ema_params(opt_state: Any) -> PyTree:
    """The moving average of the parameters kept by an optimizer made with ``use_ema=True``.

    What Keras's ``optimizer.finalize_variable_values(model.trainable_variables)`` (called at
    the end of ``fit``) writes into the model: use it as the final parameters.

    Args:
      opt_state: the state of a :mod:`rmsjax.compat.keras` optimizer (or of any chain
        holding one).

    Returns:
      A tree like the parameters (the ``ema`` field of the :class:`EmaState` in the state).

    Raises:
      ValueError: the state holds no moving average (``use_ema=False``), or more than one.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from rmsjax.compat import keras as kc
      >>> tx = kc.SGD(learning_rate=0.1, use_ema=True, ema_momentum=0.5)
      >>> params = jnp.array([1.0])
      >>> state = tx.init(params)
      >>> for _ in range(2):
      ...     updates, state = tx.update(2 * params, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print(params.tolist(), kc.ema_params(state).tolist())  # 0.8, 0.64; 0.5*0.8 + 0.5*0.64
      [0.64] [0.72]
    """
    found = parts.find_ema(opt_state)
    if len(found) != 1:
        raise ValueError(
            f"ema_params needs the state of an optimizer made with use_ema=True; found {len(found)} "
            "moving averages in opt_state"
        )
    return found[0]


@common.declares("keras")
def RMSprop(
    learning_rate: ScalarOrSchedule = 0.001,
    rho: float = 0.9,
    momentum: float = 0.0,
    epsilon: float = 1e-7,
    centered: bool = False,
    weight_decay: float | None = None,
    clipnorm: float | None = None,
    clipvalue: float | None = None,
    global_clipnorm: float | None = None,
    use_ema: bool = False,
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: float | None = None,
    gradient_accumulation_steps: int | None = None,
    name: str | None = None,
    *,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
    r"""``keras.optimizers.RMSprop``.

    .. math::

       v_t = \rho v_{t-1} + (1-\rho) g_t^2, \quad
       \bar g_t = \rho \bar g_{t-1} + (1-\rho) g_t \ \text{(centered)}

       m_t = \mu m_{t-1} + \frac{\eta_t\, g_t}{\sqrt{v_t + \epsilon}}
       \ \text{ or, centered, }\
       \mu m_{t-1} + \frac{\eta_t\, g_t}{\sqrt{v_t - \bar g_t^2 + \epsilon}}, \quad
       \theta_t = \theta_{t-1} - \eta_t\lambda\theta_{t-1} - m_t

    with :math:`v_0 = \bar g_0 = m_0 = 0`. Chain: ``scale_by_rms | scale_by_stddev
    (eps_in_sqrt) -> learning rate -> [momentum]``, inside the shared slots (module notes).

    The options every Keras optimizer shares (``clipnorm``, ``clipvalue``,
    ``global_clipnorm``, ``use_ema``, ``ema_momentum``, ``ema_overwrite_frequency``,
    ``loss_scale_factor``, ``gradient_accumulation_steps``, ``name``, and ``mask``,
    keyword-only) are described under "Shared options" in :mod:`rmsjax.compat.keras`.

    Args:
      learning_rate: :math:`\eta`, >= 0, or a schedule ``f(step)``.
      rho: :math:`\rho`, in [0, 1).
      momentum: :math:`\mu`, in [0, 1); the learning rate sits inside the buffer.
      epsilon: :math:`\epsilon`, inside the square root, >= 0.
      centered: divide by the leaky standard deviation.
      weight_decay: ``None`` or >= 0: decoupled decay ``params -= lr_t * weight_decay * params``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from rmsjax.compat import keras as kc
      >>> tx = kc.RMSprop(learning_rate=0.1, momentum=0.9, centered=True)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = tx.init(params)
      >>> for _ in range(3):
      ...     updates, state = tx.update(2 * params, state, params)  # grad of sum(p**2)
      ...     params = optax.apply_updates(params, updates)
      >>> print(params.tolist())  # keras.optimizers.RMSprop(0.1, momentum=0.9, centered=True) agrees
      [-0.3381, -0.4994]

    Warning:
      PyTorch puts ``eps`` outside the root, the learning rate outside the momentum buffer
      and adds ``weight_decay`` to the gradient (:func:`rmsjax.compat.torch.RMSprop`).
    """
    common.require_learning_rate("learning_rate", learning_rate)
    common.require("rho", rho, high=1.0)
    common.require("momentum", momentum, high=1.0)
    common.require("epsilon", epsilon)
    check.check_flag("centered", centered)
    scaling = transforms.scale_by_stddev if centered else transforms.scale_by_rms

    def optimizer(rate):
        return [
            scaling(rho, epsilon, eps_in_sqrt=True),
            transforms.scale_by_learning_rate(rate),
            common.unless_zero(momentum, lambda: transforms.momentum(momentum)),
        ]

    return _assemble(
        learning_rate, optimizer, weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema, ema_momentum,
        ema_overwrite_frequency, loss_scale_factor, gradient_accumulation_steps, name, mask,
    )


@common.declares("keras")
def Adagrad(
    learning_rate: ScalarOrSchedule = 0.001,
    initial_accumulator_value: float = 0.1,
    epsilon: float = 1e-7,
    weight_decay: float | None = None,
    clipnorm: float | None = None,
    clipvalue: float | None = None,
    global_clipnorm: float | None = None,
    use_ema: bool = False,
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: float | None = None,
    gradient_accumulation_steps: int | None = None,
    name: str | None = None,
    *,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
    r"""``keras.optimizers.Adagrad``.

    .. math::

       G_t = G_{t-1} + g_t^2, \quad
       \theta_t = \theta_{t-1} - \eta_t\lambda\theta_{t-1} - \eta_t \frac{g_t}{\sqrt{G_t + \epsilon}}

    with :math:`G_0` = ``initial_accumulator_value`` (0.1). Chain: ``scale_by_rss
    (eps_in_sqrt) -> learning rate``, inside the shared slots.

    The options every Keras optimizer shares (``clipnorm``, ``clipvalue``,
    ``global_clipnorm``, ``use_ema``, ``ema_momentum``, ``ema_overwrite_frequency``,
    ``loss_scale_factor``, ``gradient_accumulation_steps``, ``name``, and ``mask``,
    keyword-only) are described under "Shared options" in :mod:`rmsjax.compat.keras`.

    Args:
      learning_rate: :math:`\eta`, >= 0, or a schedule ``f(step)``.
      initial_accumulator_value: :math:`G_0`, >= 0.
      epsilon: :math:`\epsilon`, inside the root, >= 0.
      weight_decay: ``None`` or >= 0: decoupled decay ``params -= lr_t * weight_decay * params``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from rmsjax.compat import keras as kc
      >>> tx = kc.Adagrad(learning_rate=0.5)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = tx.init(params)
      >>> for _ in range(3):
      ...     updates, state = tx.update(2 * params, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print(params.tolist())  # as keras.optimizers.Adagrad(learning_rate=0.5)
      [0.1615, -0.9857]

    Warning:
      PyTorch's Adagrad starts the accumulator at 0 and puts ``eps`` outside the root.
    """
    common.require_learning_rate("learning_rate", learning_rate)
    common.require("initial_accumulator_value", initial_accumulator_value)
    common.require("epsilon", epsilon)

    def optimizer(rate):
        return [
            transforms.scale_by_rss(initial_accumulator_value, epsilon, eps_in_sqrt=True),
            transforms.scale_by_learning_rate(rate),
        ]

    return _assemble(
        learning_rate, optimizer, weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema, ema_momentum,
        ema_overwrite_frequency, loss_scale_factor, gradient_accumulation_steps, name, mask,
    )


def _adam_checks(learning_rate, beta_1, beta_2, epsilon, amsgrad) -> None:
    common.require_learning_rate("learning_rate", learning_rate)
    common.require("beta_1", beta_1, high=1.0)
    common.require("beta_2", beta_2, high=1.0)
    common.require("epsilon", epsilon)
    check.check_flag("amsgrad", amsgrad)


def _adam_parts(beta_1, beta_2, epsilon, amsgrad) -> Parts:
    def optimizer(rate):
        return [
            transforms.scale_by_adam(beta_1, beta_2, epsilon, amsgrad=amsgrad, eps_hat=True),
            transforms.scale_by_learning_rate(rate),
        ]

    return optimizer


@common.declares("keras")
def Adam(
    learning_rate: ScalarOrSchedule = 0.001,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
    amsgrad: bool = False,
    weight_decay: float | None = None,
    clipnorm: float | None = None,
    clipvalue: float | None = None,
    global_clipnorm: float | None = None,
    use_ema: bool = False,
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: float | None = None,
    gradient_accumulation_steps: int | None = None,
    name: str | None = None,
    *,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
    r"""``keras.optimizers.Adam``, with Keras's "epsilon hat".

    .. math::

       m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
       v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \quad
       \theta_t = \theta_{t-1} - \eta_t\lambda\theta_{t-1} - \eta_t \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
       \frac{m_t}{\sqrt{\hat v_t} + \epsilon}

    with :math:`\hat v_t = v_t`, or :math:`\max(\hat v_{t-1}, v_t)` with ``amsgrad``.
    Chain: ``scale_by_adam(eps_hat=True) -> learning rate``, inside the shared slots.

    The options every Keras optimizer shares (``clipnorm``, ``clipvalue``,
    ``global_clipnorm``, ``use_ema``, ``ema_momentum``, ``ema_overwrite_frequency``,
    ``loss_scale_factor``, ``gradient_accumulation_steps``, ``name``, and ``mask``,
    keyword-only) are described under "Shared options" in :mod:`rmsjax.compat.keras`.

    Args:
      learning_rate: :math:`\eta`, >= 0, or a schedule ``f(step)``.
      beta_1: :math:`\beta_1`, in [0, 1).
      beta_2: :math:`\beta_2`, in [0, 1).
      epsilon: :math:`\epsilon`, added to the root of the *uncorrected* :math:`v_t`, >= 0.
      amsgrad: use the running maximum of :math:`v_t`.
      weight_decay: ``None`` or >= 0: decoupled decay ``params -= lr_t * weight_decay * params``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from rmsjax.compat import keras as kc
      >>> tx = kc.Adam(learning_rate=0.1, amsgrad=True)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = tx.init(params)
      >>> for _ in range(3):
      ...     updates, state = tx.update(2 * params, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print(params.tolist())  # as keras.optimizers.Adam(learning_rate=0.1, amsgrad=True)
      [0.7016, -1.7006]

    Warning:
      PyTorch and optax add ``eps`` after bias-correcting :math:`v_t`, i.e. Keras's
      ``epsilon`` acts like PyTorch's ``eps / sqrt(1 - beta_2**t)``; the two differ most in
      the first steps and whenever :math:`\sqrt{v_t}` is comparable to ``epsilon``.
    """
    _adam_checks(learning_rate, beta_1, beta_2, epsilon, amsgrad)
    optimizer = _adam_parts(beta_1, beta_2, epsilon, amsgrad)
    return _assemble(
        learning_rate, optimizer, weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema, ema_momentum,
        ema_overwrite_frequency, loss_scale_factor, gradient_accumulation_steps, name, mask,
    )


@common.declares("keras")
def AdamW(
    learning_rate: ScalarOrSchedule = 0.001,
    weight_decay: float = 0.004,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
    amsgrad: bool = False,
    clipnorm: float | None = None,
    clipvalue: float | None = None,
    global_clipnorm: float | None = None,
    use_ema: bool = False,
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: float | None = None,
    gradient_accumulation_steps: int | None = None,
    name: str | None = None,
    *,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
    r"""``keras.optimizers.AdamW``: :func:`Adam` with decoupled weight decay 0.004 by default.

    .. math::

       \theta_t = \theta_{t-1} - \eta_t\lambda\theta_{t-1} - \eta_t
       \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t} \frac{m_t}{\sqrt{\hat v_t} + \epsilon}

    with :math:`m_t, v_t, \hat v_t` as in :func:`Adam`. As in Keras, ``weight_decay`` comes
    second and must be a number (``None`` raises).

    The options every Keras optimizer shares (``clipnorm``, ``clipvalue``,
    ``global_clipnorm``, ``use_ema``, ``ema_momentum``, ``ema_overwrite_frequency``,
    ``loss_scale_factor``, ``gradient_accumulation_steps``, ``name``, and ``mask``,
    keyword-only) are described under "Shared options" in :mod:`rmsjax.compat.keras`.

    Args:
      learning_rate: :math:`\eta`, >= 0, or a schedule ``f(step)``.
      weight_decay: :math:`\lambda`, >= 0 (not ``None``).
      beta_1: :math:`\beta_1`, in [0, 1).
      beta_2: :math:`\beta_2`, in [0, 1).
      epsilon: :math:`\epsilon`, added to the root of the *uncorrected* :math:`v_t`, >= 0.
      amsgrad: use the running maximum of :math:`v_t`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from rmsjax.compat import keras as kc
      >>> tx = kc.AdamW(learning_rate=0.1, weight_decay=0.5)
      >>> params = jnp.array([1.0, -2.0])
      >>> updates, state = tx.update(2 * params, tx.init(params), params)
      >>> print(optax.apply_updates(params, updates).tolist())  # p - 0.1*0.5*p - 0.1*sign(g)
      [0.85, -1.8]

    Warning:
      PyTorch's AdamW multiplies the parameters by ``1 - lr * weight_decay`` too, but with
      default 0.01 and ``eps`` after the bias correction (:func:`rmsjax.compat.torch.AdamW`).
    """
    _adam_checks(learning_rate, beta_1, beta_2, epsilon, amsgrad)
    if weight_decay is None:
        raise TypeError("weight_decay of AdamW must be a real number >= 0, got None (as in Keras)")
    optimizer = _adam_parts(beta_1, beta_2, epsilon, amsgrad)
    return _assemble(
        learning_rate, optimizer, weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema, ema_momentum,
        ema_overwrite_frequency, loss_scale_factor, gradient_accumulation_steps, name, mask,
    )


@common.declares("keras")
def Adadelta(
    learning_rate: ScalarOrSchedule = 0.001,
    rho: float = 0.95,
    epsilon: float = 1e-7,
    weight_decay: float | None = None,
    clipnorm: float | None = None,
    clipvalue: float | None = None,
    global_clipnorm: float | None = None,
    use_ema: bool = False,
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: float | None = None,
    gradient_accumulation_steps: int | None = None,
    name: str | None = None,
    *,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
    r"""``keras.optimizers.Adadelta``.

    .. math::

       v_t = \rho v_{t-1} + (1-\rho) g_t^2, \quad
       \Delta_t = \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}}\, g_t, \quad
       u_t = \rho u_{t-1} + (1-\rho)\Delta_t^2, \quad
       \theta_t = \theta_{t-1} - \eta_t\lambda\theta_{t-1} - \eta_t \Delta_t

    Chain: ``scale_by_adadelta -> learning rate``, inside the shared slots.

    The options every Keras optimizer shares (``clipnorm``, ``clipvalue``,
    ``global_clipnorm``, ``use_ema``, ``ema_momentum``, ``ema_overwrite_frequency``,
    ``loss_scale_factor``, ``gradient_accumulation_steps``, ``name``, and ``mask``,
    keyword-only) are described under "Shared options" in :mod:`rmsjax.compat.keras`.

    Args:
      learning_rate: :math:`\eta`, >= 0 (Keras's default 0.001; the paper and PyTorch use
        1.0), or a schedule ``f(step)``.
      rho: :math:`\rho`, in [0, 1).
      epsilon: :math:`\epsilon`, inside both roots, >= 0.
      weight_decay: ``None`` or >= 0: decoupled decay ``params -= lr_t * weight_decay * params``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from rmsjax.compat import keras as kc
      >>> tx = kc.Adadelta(learning_rate=1.0)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = tx.init(params)
      >>> for _ in range(3):
      ...     updates, state = tx.update(2 * params, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print(params.tolist())  # as keras.optimizers.Adadelta(learning_rate=1.0)
      [0.9957, -1.9957]
    """
    common.require_learning_rate("learning_rate", learning_rate)
    common.require("rho", rho, high=1.0)
    common.require("epsilon", epsilon)

    def optimizer(rate):
        return [transforms.scale_by_adadelta(rho, epsilon), transforms.scale_by_learning_rate(rate)]

    return _assemble(
        learning_rate, optimizer, weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema, ema_momentum,
        ema_overwrite_frequency, loss_scale_factor, gradient_accumulation_steps, name, mask,
    )


@common.declares("keras")
def Adamax(
    learning_rate: ScalarOrSchedule = 0.001,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
    weight_decay: float | None = None,
    clipnorm: float | None = None,
    clipvalue: float | None = None,
    global_clipnorm: float | None = None,
    use_ema: bool = False,
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: float | None = None,
    gradient_accumulation_steps: int | None = None,
    name: str | None = None,
    *,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
    r"""``keras.optimizers.Adamax``: Adam with the infinity norm.

    .. math::

       m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
       u_t = \max(\beta_2 u_{t-1}, |g_t|), \quad
       \theta_t = \theta_{t-1} - \eta_t\lambda\theta_{t-1}
       - \frac{\eta_t\, m_t}{(1-\beta_1^t)(u_t + \epsilon)}

    with :math:`m_0 = u_0 = 0`. Chain: ``Adamax scaling -> learning rate``, inside the
    shared slots; the state keeps :math:`u` as ``nu``.

    The options every Keras optimizer shares (``clipnorm``, ``clipvalue``,
    ``global_clipnorm``, ``use_ema``, ``ema_momentum``, ``ema_overwrite_frequency``,
    ``loss_scale_factor``, ``gradient_accumulation_steps``, ``name``, and ``mask``,
    keyword-only) are described under "Shared options" in :mod:`rmsjax.compat.keras`.

    Args:
      learning_rate: :math:`\eta`, >= 0, or a schedule ``f(step)``.
      beta_1: :math:`\beta_1`, in [0, 1).
      beta_2: :math:`\beta_2`, in [0, 1): the decay of the infinity norm.
      epsilon: :math:`\epsilon`, added to :math:`u_t`, >= 0.
      weight_decay: ``None`` or >= 0: decoupled decay ``params -= lr_t * weight_decay * params``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from rmsjax.compat import keras as kc
      >>> tx = kc.Adamax(learning_rate=0.1)
      >>> params = jnp.array([1.0, -2.0])
      >>> updates, state = tx.update(2 * params, tx.init(params), params)
      >>> print(optax.apply_updates(params, updates).tolist())  # the first step is lr*sign(g)
      [0.9, -1.9]

    Warning:
      PyTorch's Adamax adds ``eps`` inside the maximum (``max(b2*u, |g| + eps)``), not to it.

    Reference:
      Kingma and Ba, *Adam: A Method for Stochastic Optimization*, ICLR 2015, section 7.1.
    """
    common.require_learning_rate("learning_rate", learning_rate)
    common.require("beta_1", beta_1, high=1.0)
    common.require("beta_2", beta_2, high=1.0)
    common.require("epsilon", epsilon)

    def optimizer(rate):
        return [parts.scale_by_adamax(beta_1, beta_2, epsilon), transforms.scale_by_learning_rate(rate)]

    return _assemble(
        learning_rate, optimizer, weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema, ema_momentum,
        ema_overwrite_frequency, loss_scale_factor, gradient_accumulation_steps, name, mask,
    )


@common.declares("keras")
def Nadam(
    learning_rate: ScalarOrSchedule = 0.001,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
    weight_decay: float | None = None,
    clipnorm: float | None = None,
    clipvalue: float | None = None,
    global_clipnorm: float | None = None,
    use_ema: bool = False,
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: float | None = None,
    gradient_accumulation_steps: int | None = None,
    name: str | None = None,
    *,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
    r"""``keras.optimizers.Nadam``, with Dozat's momentum schedule (Keras's ``u_product``).

    .. math::

       \mu_t = \beta_1\left(1 - \tfrac12\, 0.96^{t}\right), \quad
       \Pi_t = \prod_{i \le t} \mu_i, \quad
       \hat m_t = \frac{\mu_{t+1}\, m_t}{1 - \Pi_t\mu_{t+1}} + \frac{(1-\mu_t)\, g_t}{1 - \Pi_t}

       \theta_t = \theta_{t-1} - \eta_t\lambda\theta_{t-1}
       - \eta_t \frac{\hat m_t}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}

    with :math:`m_t, v_t` the leaky averages of :math:`g_t` and :math:`g_t^2` (decays
    :math:`\beta_1, \beta_2`). The product :math:`\Pi_t` is part of the state
    (``mu_product``), accumulated step by step as Keras does.

    The options every Keras optimizer shares (``clipnorm``, ``clipvalue``,
    ``global_clipnorm``, ``use_ema``, ``ema_momentum``, ``ema_overwrite_frequency``,
    ``loss_scale_factor``, ``gradient_accumulation_steps``, ``name``, and ``mask``,
    keyword-only) are described under "Shared options" in :mod:`rmsjax.compat.keras`.

    Args:
      learning_rate: :math:`\eta`, >= 0, or a schedule ``f(step)``.
      beta_1: :math:`\beta_1`, in [0, 1).
      beta_2: :math:`\beta_2`, in [0, 1).
      epsilon: :math:`\epsilon`, outside the root of the bias-corrected :math:`v_t`, >= 0.
      weight_decay: ``None`` or >= 0: decoupled decay ``params -= lr_t * weight_decay * params``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from rmsjax.compat import keras as kc
      >>> tx = kc.Nadam(learning_rate=0.1)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = tx.init(params)
      >>> for _ in range(3):
      ...     updates, state = tx.update(2 * params, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print(params.tolist())  # as keras.optimizers.Nadam(learning_rate=0.1)
      [0.7547, -1.7497]

    Warning:
      PyTorch's NAdam uses the same schedule but with ``momentum_decay=0.004``
      (:math:`\mu_t = \beta_1(1 - \tfrac12 0.96^{0.004\,t})`), and :func:`rmsjax.adam` with
      ``nesterov=True`` has no schedule at all: the three differ from the first step.

    Reference:
      Dozat, *Incorporating Nesterov Momentum into Adam*, ICLR workshop 2016.
    """
    common.require_learning_rate("learning_rate", learning_rate)
    common.require("beta_1", beta_1, high=1.0)
    common.require("beta_2", beta_2, high=1.0)
    common.require("epsilon", epsilon)

    def optimizer(rate):
        return [parts.scale_by_nadam(beta_1, beta_2, epsilon), transforms.scale_by_learning_rate(rate)]

    return _assemble(
        learning_rate, optimizer, weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema, ema_momentum,
        ema_overwrite_frequency, loss_scale_factor, gradient_accumulation_steps, name, mask,
    )


@common.declares("keras")
def SGD(
    learning_rate: ScalarOrSchedule = 0.01,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float | None = None,
    clipnorm: float | None = None,
    clipvalue: float | None = None,
    global_clipnorm: float | None = None,
    use_ema: bool = False,
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: float | None = None,
    gradient_accumulation_steps: int | None = None,
    name: str | None = None,
    *,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
    r"""``keras.optimizers.SGD``, the learning rate inside the momentum buffer.

    .. math::

       b_t = \mu b_{t-1} - \eta_t g_t, \quad
       \theta_t = \theta_{t-1} - \eta_t\lambda\theta_{t-1} + b_t
       \ \text{ or, with } \texttt{nesterov},\ \ldots + \mu b_t - \eta_t g_t

    with :math:`b_0 = 0`; without momentum :math:`\theta_t = \theta_{t-1} - \eta_t g_t`
    (``nesterov`` is then ignored, as in Keras). Chain: ``learning rate -> [momentum]``,
    inside the shared slots.

    The options every Keras optimizer shares (``clipnorm``, ``clipvalue``,
    ``global_clipnorm``, ``use_ema``, ``ema_momentum``, ``ema_overwrite_frequency``,
    ``loss_scale_factor``, ``gradient_accumulation_steps``, ``name``, and ``mask``,
    keyword-only) are described under "Shared options" in :mod:`rmsjax.compat.keras`.

    Args:
      learning_rate: :math:`\eta`, >= 0, or a schedule ``f(step)``.
      momentum: :math:`\mu`, in [0, 1) (Keras also accepts 1).
      nesterov: Nesterov's look-ahead.
      weight_decay: ``None`` or >= 0: decoupled decay ``params -= lr_t * weight_decay * params``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from rmsjax.compat import keras as kc
      >>> tx = kc.SGD(learning_rate=0.1, momentum=0.9, nesterov=True)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = tx.init(params)
      >>> for _ in range(3):
      ...     updates, state = tx.update(2 * params, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print(params.tolist())  # as keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True)
      [-0.1084, 0.2167]

    Warning:
      PyTorch's SGD keeps the learning rate outside the buffer (``b = mu*b + g``,
      ``p -= lr*b``), which differs once the learning rate changes, and adds
      ``weight_decay`` to the gradient (:func:`rmsjax.compat.torch.SGD`).
    """
    common.require_learning_rate("learning_rate", learning_rate)
    common.require("momentum", momentum, high=1.0)
    check.check_flag("nesterov", nesterov)

    def optimizer(rate):
        return [
            transforms.scale_by_learning_rate(rate),
            common.unless_zero(momentum, lambda: transforms.momentum(momentum, nesterov=nesterov)),
        ]

    return _assemble(
        learning_rate, optimizer, weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema, ema_momentum,
        ema_overwrite_frequency, loss_scale_factor, gradient_accumulation_steps, name, mask,
    )
