"""Keras 3's ``keras.optimizers``, reproduced with rmsjax's transformations.

Each factory takes the argument names and defaults of the Keras 3 class of the same name
(less the options every Keras optimizer shares: ``clipnorm``, ``use_ema``,
``loss_scale_factor``, ``gradient_accumulation_steps`` and the like) and returns an
``optax.GradientTransformation`` that follows Keras's parameter trajectory (checked to
1e-9 relative in float64 against fixtures recorded from Keras 3 on its JAX backend).

What Keras does, and these factories therefore do:

* ``epsilon`` goes *inside* the square root (``sqrt(v + epsilon)``), except in Adam, which
  adds it to the root of the uncorrected second moment ("epsilon hat").
* the learning rate sits *inside* the momentum buffer: ``m = momentum * m + lr * g / den``,
  ``params -= m``; this matters when the learning rate changes over time.
* ``weight_decay`` is decoupled: ``params -= lr * weight_decay * params`` before the step,
  outside any momentum buffer.
* ``learning_rate`` may be a schedule ``f(step)`` (``step`` = ``optimizer.iterations``, 0 at
  the first update), as a ``keras.optimizers.schedules.LearningRateSchedule`` is.

Keras itself checks few hyperparameters; here out-of-range values raise ``ValueError``
naming the argument.
"""

from __future__ import annotations

import optax

from rmsjax import _validation as check
from rmsjax import transforms
from rmsjax.compat import _common as common

__all__ = ["Adadelta", "Adagrad", "Adam", "RMSprop"]


def RMSprop(
    learning_rate=0.001,
    rho=0.9,
    momentum=0.0,
    epsilon=1e-7,
    centered=False,
    weight_decay=None,
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
    (eps_in_sqrt) -> learning rate -> [momentum] -> [decoupled weight decay]``.

    Args:
      learning_rate: :math:`\eta`, >= 0, or a schedule ``f(step)``.
      rho: :math:`\rho`, in [0, 1).
      momentum: :math:`\mu`, in [0, 1); the learning rate sits inside the buffer.
      epsilon: :math:`\epsilon`, inside the square root, >= 0.
      centered: divide by the leaky standard deviation.
      weight_decay: :math:`\lambda`, ``None`` or >= 0: decoupled decay, scaled by the
        current learning rate and applied outside the momentum buffer.

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
    if weight_decay is not None:
        common.require("weight_decay", weight_decay)
    scaling = transforms.scale_by_stddev if centered else transforms.scale_by_rms
    return optax.chain(
        scaling(rho, epsilon, eps_in_sqrt=True),
        transforms.scale_by_learning_rate(learning_rate),
        common.unless_zero(momentum, lambda: transforms.momentum(momentum)),
        common.unless_zero(
            0.0 if weight_decay is None else weight_decay,
            lambda: common.decoupled_weight_decay(weight_decay, learning_rate),
        ),
    )


def Adagrad(
    learning_rate=0.001,
    initial_accumulator_value=0.1,
    epsilon=1e-7,
) -> optax.GradientTransformation:
    r"""``keras.optimizers.Adagrad``.

    .. math::

       G_t = G_{t-1} + g_t^2, \quad
       \theta_t = \theta_{t-1} - \eta_t \frac{g_t}{\sqrt{G_t + \epsilon}}

    with :math:`G_0` = ``initial_accumulator_value`` (0.1). Chain: ``scale_by_rss
    (eps_in_sqrt) -> learning rate``.

    Args:
      learning_rate: :math:`\eta`, >= 0, or a schedule ``f(step)``.
      initial_accumulator_value: :math:`G_0`, >= 0.
      epsilon: :math:`\epsilon`, inside the root, >= 0.

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
    return optax.chain(
        transforms.scale_by_rss(initial_accumulator_value, epsilon, eps_in_sqrt=True),
        transforms.scale_by_learning_rate(learning_rate),
    )


def Adam(
    learning_rate=0.001,
    beta_1=0.9,
    beta_2=0.999,
    epsilon=1e-7,
    amsgrad=False,
) -> optax.GradientTransformation:
    r"""``keras.optimizers.Adam``, with Keras's "epsilon hat".

    .. math::

       m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
       v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \quad
       \theta_t = \theta_{t-1} - \eta_t \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
       \frac{m_t}{\sqrt{\hat v_t} + \epsilon}

    with :math:`\hat v_t = v_t`, or :math:`\max(\hat v_{t-1}, v_t)` with ``amsgrad``.
    Chain: ``scale_by_adam(eps_hat=True) -> learning rate``.

    Args:
      learning_rate: :math:`\eta`, >= 0, or a schedule ``f(step)``.
      beta_1: :math:`\beta_1`, in [0, 1).
      beta_2: :math:`\beta_2`, in [0, 1).
      epsilon: :math:`\epsilon`, added to the root of the *uncorrected* :math:`v_t`, >= 0.
      amsgrad: use the running maximum of :math:`v_t`.

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
    common.require_learning_rate("learning_rate", learning_rate)
    common.require("beta_1", beta_1, high=1.0)
    common.require("beta_2", beta_2, high=1.0)
    common.require("epsilon", epsilon)
    check.check_flag("amsgrad", amsgrad)
    return optax.chain(
        transforms.scale_by_adam(beta_1, beta_2, epsilon, amsgrad=amsgrad, eps_hat=True),
        transforms.scale_by_learning_rate(learning_rate),
    )


def Adadelta(
    learning_rate=0.001,
    rho=0.95,
    epsilon=1e-7,
) -> optax.GradientTransformation:
    r"""``keras.optimizers.Adadelta``.

    .. math::

       v_t = \rho v_{t-1} + (1-\rho) g_t^2, \quad
       \Delta_t = \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}}\, g_t, \quad
       u_t = \rho u_{t-1} + (1-\rho)\Delta_t^2, \quad
       \theta_t = \theta_{t-1} - \eta_t \Delta_t

    Chain: ``scale_by_adadelta -> learning rate``.

    Args:
      learning_rate: :math:`\eta`, >= 0 (Keras's default 0.001; the paper and PyTorch use
        1.0), or a schedule ``f(step)``.
      rho: :math:`\rho`, in [0, 1).
      epsilon: :math:`\epsilon`, inside both roots, >= 0.

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
    return optax.chain(
        transforms.scale_by_adadelta(rho, epsilon),
        transforms.scale_by_learning_rate(learning_rate),
    )
