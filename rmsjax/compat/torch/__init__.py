"""PyTorch's ``torch.optim`` optimizers, reproduced with rmsjax's transformations.

Each factory takes the argument names and defaults of the PyTorch 2.13 class of the same
name (less ``params`` and the implementation switches such as ``foreach``, ``fused``,
``capturable`` and ``differentiable``) and returns an ``optax.GradientTransformation`` whose
updates, applied with ``optax.apply_updates``, follow PyTorch's parameter trajectory: for
the same parameters and gradients, the parameters after each step agree with PyTorch's to
rounding (checked to 1e-9 relative in float64 against fixtures recorded from PyTorch 2.13).

What PyTorch does, and these factories therefore do:

* ``weight_decay`` is an L2 penalty added to the gradient before anything else (in
  :func:`AdamW` it is decoupled: ``params *= 1 - lr * weight_decay``).
* ``maximize=True`` negates the gradient first (before weight decay is added).
* the learning rate multiplies the update, momentum buffer included, from outside.
* ``lr`` may be a schedule ``f(step)`` (``step`` = 0 at the first update): it behaves like a
  ``torch.optim.lr_scheduler`` stepped once after every ``optimizer.step()``, e.g.
  ``StepLR(opt, step_size=k, gamma=g)`` is ``lambda step: lr * g ** (step // k)``.
* complex parameters are treated as pairs of reals: the real and imaginary parts get
  separate second moments (``torch.view_as_real``); rmsjax's own transformations use
  ``|g|**2`` instead.

Invalid hyperparameters raise ``ValueError`` naming the argument, as PyTorch does; rmsjax
also requires decay rates (``alpha``, ``rho``, ``betas``, ``momentum``) below 1.

A ``momentum``, ``weight_decay``, ``dampening`` or ``lr_decay`` of 0 (PyTorch's defaults)
leaves its part out. Under ``optax.inject_hyperparams`` they become arrays and the parts
are kept (same updates, larger state, ``params`` needed): name them in ``static_args``,
e.g. ``optax.inject_hyperparams(SGD, static_args=("momentum", "weight_decay",
"dampening", "nesterov"))`` (the table in ``docs/porting.md`` lists them per optimizer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optax

from rmsjax import _validation as check
from rmsjax import transforms
from rmsjax.compat import _common as common
from rmsjax.compat._groups import param_groups
from rmsjax.compat.torch import lr_scheduler
from rmsjax.compat.torch._checkpoint import load_state_dict, state_dict

__all__ = [
    "SGD",
    "Adadelta",
    "Adagrad",
    "Adam",
    "AdamW",
    "RMSprop",
    "load_state_dict",
    "lr_scheduler",
    "param_groups",
    "state_dict",
]


def _maximize(maximize: bool) -> optax.GradientTransformation:
    check.check_flag("maximize", maximize)
    return common.negate() if maximize else transforms.absent()


def _l2(weight_decay: Any) -> optax.GradientTransformation:
    return common.unless_zero(weight_decay, lambda: transforms.add_decayed_weights(weight_decay))


@common.declares("torch")
def RMSprop(
    lr=1e-2,
    alpha=0.99,
    eps=1e-8,
    weight_decay=0.0,
    momentum=0.0,
    centered=False,
    maximize=False,
) -> optax.GradientTransformation:
    r"""``torch.optim.RMSprop``.

    .. math::

       g_t \leftarrow \pm g_t + \lambda\theta_{t-1}, \quad
       v_t = \alpha v_{t-1} + (1-\alpha) g_t^2, \quad
       \bar g_t = \alpha \bar g_{t-1} + (1-\alpha) g_t \ \text{(centered)}

       s_t = \frac{g_t}{\sqrt{v_t} + \epsilon}
       \ \text{ or, centered, }\ \frac{g_t}{\sqrt{v_t - \bar g_t^2} + \epsilon}, \quad
       b_t = \mu b_{t-1} + s_t, \quad
       \theta_t = \theta_{t-1} - \eta_t b_t

    :math:`v_0 = \bar g_0 = b_0 = 0`; without momentum :math:`b_t = s_t`. Chain:
    ``[negate] -> [L2 weight decay] -> scale_by_rms | scale_by_stddev -> [momentum] ->
    learning rate``, with complex leaves seen as pairs of reals by the scaling.

    Args:
      lr: :math:`\eta`, >= 0, or a schedule ``f(step)`` (an ``lr_scheduler`` stepped after
        each ``optimizer.step()``).
      alpha: :math:`\alpha`, the smoothing constant, in [0, 1).
      eps: :math:`\epsilon`, added *outside* the square root, >= 0.
      weight_decay: :math:`\lambda`, L2 penalty added to the gradient, >= 0.
      momentum: :math:`\mu`, in [0, 1); the learning rate multiplies the buffer from outside.
      centered: divide by the leaky standard deviation :math:`\sqrt{v_t - \bar g_t^2}`.
      maximize: ascend instead of descend (negate the gradient first).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from rmsjax.compat import torch as pt
      >>> tx = pt.RMSprop(lr=0.1, momentum=0.9)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = tx.init(params)
      >>> for _ in range(3):
      ...     updates, state = tx.update(2 * params, state, params)  # grad of sum(p**2)
      ...     params = optax.apply_updates(params, updates)
      >>> print(params.tolist())  # torch.optim.RMSprop([p], lr=0.1, momentum=0.9) gives the same
      [-1.0373, 1.4075]

    Warning:
      Keras and TF1 put :math:`\epsilon` inside the root and the learning rate inside the
      momentum buffer; see :mod:`rmsjax.compat.keras`, :mod:`rmsjax.compat.tf1`.
    """
    common.require_learning_rate("lr", lr)
    common.require("eps", eps)
    common.require("momentum", momentum, high=1.0)
    common.require("weight_decay", weight_decay)
    common.require("alpha", alpha, high=1.0)
    check.check_flag("centered", centered)
    scaling = transforms.scale_by_stddev if centered else transforms.scale_by_rms
    return optax.chain(
        _maximize(maximize),
        _l2(weight_decay),
        common.complex_as_real(scaling(alpha, eps)),
        common.unless_zero(momentum, lambda: transforms.momentum(momentum)),
        transforms.scale_by_learning_rate(lr),
    )


@common.declares("torch")
def Adagrad(
    lr=1e-2,
    lr_decay=0.0,
    weight_decay=0.0,
    initial_accumulator_value=0.0,
    eps=1e-10,
    maximize=False,
) -> optax.GradientTransformation:
    r"""``torch.optim.Adagrad``.

    .. math::

       g_t \leftarrow \pm g_t + \lambda\theta_{t-1}, \quad
       G_t = G_{t-1} + g_t^2, \quad
       \theta_t = \theta_{t-1} - \frac{\eta_t}{1 + (t-1)\,\delta}\,
       \frac{g_t}{\sqrt{G_t} + \epsilon}

    with :math:`G_0` = ``initial_accumulator_value``, :math:`\delta` = ``lr_decay`` and
    :math:`t` counted from 1. Chain: ``[negate] -> [L2 weight decay] -> scale_by_rss ->
    learning rate`` (the decayed rate is a schedule wrapped around ``lr``).

    Args:
      lr: :math:`\eta`, >= 0, or a schedule ``f(step)``.
      lr_decay: :math:`\delta`, >= 0.
      weight_decay: :math:`\lambda`, L2 penalty added to the gradient, >= 0.
      initial_accumulator_value: :math:`G_0`, >= 0.
      eps: :math:`\epsilon`, outside the root, >= 0.
      maximize: ascend instead of descend.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from rmsjax.compat import torch as pt
      >>> tx = pt.Adagrad(lr=0.5, lr_decay=0.1)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = tx.init(params)
      >>> for _ in range(3):
      ...     updates, state = tx.update(2 * params, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print(params.tolist())  # as torch.optim.Adagrad([p], lr=0.5, lr_decay=0.1)
      [0.1898, -1.0437]

    Warning:
      Keras's Adagrad starts the accumulator at 0.1 and puts ``epsilon`` inside the root.
    """
    common.require_learning_rate("lr", lr)
    common.require("lr_decay", lr_decay)
    common.require("weight_decay", weight_decay)
    common.require("initial_accumulator_value", initial_accumulator_value)
    common.require("eps", eps)
    return optax.chain(
        _maximize(maximize),
        _l2(weight_decay),
        common.complex_as_real(transforms.scale_by_rss(initial_accumulator_value, eps)),
        transforms.scale_by_learning_rate(common.divided_by_decay(lr, lr_decay)),
    )


def _check_adam(lr, betas, eps, weight_decay, amsgrad):
    common.require_learning_rate("lr", lr)
    common.require("eps", eps)
    # Indexed as PyTorch does: an unordered container (a set) would unpack in hash order.
    try:
        if isinstance(betas, (str, bytes, Mapping)) or len(betas) != 2:
            raise TypeError
        beta1, beta2 = betas[0], betas[1]
    except (TypeError, KeyError, IndexError):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
    common.require("betas[0]", beta1, high=1.0)
    common.require("betas[1]", beta2, high=1.0)
    common.require("weight_decay", weight_decay)
    check.check_flag("amsgrad", amsgrad)
    return beta1, beta2


def _adam_scaling(beta1: Any, beta2: Any, eps: Any, amsgrad: bool) -> optax.GradientTransformation:
    """Adam's scaling with PyTorch's double-precision bias-correction factors."""
    return transforms.scale_by_adam(beta1, beta2, eps, amsgrad=amsgrad, exact_bias_correction=True)


@common.declares("torch")
def Adam(
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    amsgrad=False,
    maximize=False,
) -> optax.GradientTransformation:
    r"""``torch.optim.Adam``.

    .. math::

       g_t \leftarrow \pm g_t + \lambda\theta_{t-1}, \quad
       m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
       v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2

       \theta_t = \theta_{t-1} - \eta_t\,
       \frac{m_t / (1-\beta_1^t)}{\sqrt{\hat v_t / (1-\beta_2^t)} + \epsilon}

    with :math:`\hat v_t = v_t`, or :math:`\max(\hat v_{t-1}, v_t)` with ``amsgrad``.
    Chain: ``[negate] -> [L2 weight decay] -> scale_by_adam -> learning rate``.

    Args:
      lr: :math:`\eta`, >= 0, or a schedule ``f(step)``.
      betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
      eps: :math:`\epsilon`, added after bias-correcting the second moment, >= 0.
      weight_decay: :math:`\lambda`, L2 penalty added to the gradient (not AdamW's decay).
      amsgrad: use the running maximum of :math:`v_t` (AMSGrad).
      maximize: ascend instead of descend.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from rmsjax.compat import torch as pt
      >>> tx = pt.Adam(lr=0.1, amsgrad=True)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = tx.init(params)
      >>> for _ in range(3):
      ...     updates, state = tx.update(2 * params, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print(params.tolist())  # as torch.optim.Adam([p], lr=0.1, amsgrad=True)
      [0.7016, -1.7006]

    Warning:
      Keras adds ``epsilon`` to the root of the *uncorrected* second moment
      (:func:`rmsjax.compat.keras.Adam`), which differs while :math:`\sqrt{v_t}` is small.
    """
    beta1, beta2 = _check_adam(lr, betas, eps, weight_decay, amsgrad)
    return optax.chain(
        _maximize(maximize),
        _l2(weight_decay),
        common.complex_as_real(_adam_scaling(beta1, beta2, eps, amsgrad)),
        transforms.scale_by_learning_rate(lr),
    )


@common.declares("torch")
def AdamW(
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=1e-2,
    amsgrad=False,
    maximize=False,
) -> optax.GradientTransformation:
    r"""``torch.optim.AdamW``: Adam with decoupled weight decay.

    .. math::

       \theta_t = \theta_{t-1} - \eta_t \left(
       \frac{m_t / (1-\beta_1^t)}{\sqrt{\hat v_t / (1-\beta_2^t)} + \epsilon}
       + \lambda\theta_{t-1} \right)

    with :math:`m_t, \hat v_t` as in :func:`Adam` (of the possibly negated gradient, without
    L2 term). PyTorch writes the decay as ``params *= 1 - lr * weight_decay`` before the
    Adam step; it uses the current (scheduled) learning rate. Chain: ``[negate] ->
    scale_by_adam -> decayed weights -> learning rate``.

    Args:
      lr: :math:`\eta`, >= 0, or a schedule ``f(step)``.
      betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
      eps: :math:`\epsilon`, >= 0.
      weight_decay: :math:`\lambda`, >= 0 (default 0.01), multiplied by the learning rate.
      amsgrad: use the running maximum of :math:`v_t`.
      maximize: ascend instead of descend (the decay still shrinks the parameters).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from rmsjax.compat import torch as pt
      >>> tx = pt.AdamW(lr=0.1, weight_decay=0.5)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = tx.init(params)
      >>> for _ in range(3):
      ...     updates, state = tx.update(2 * params, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print(params.tolist())  # as torch.optim.AdamW([p], lr=0.1, weight_decay=0.5)
      [0.5750, -1.4310]
    """
    beta1, beta2 = _check_adam(lr, betas, eps, weight_decay, amsgrad)
    return optax.chain(
        _maximize(maximize),
        common.complex_as_real(_adam_scaling(beta1, beta2, eps, amsgrad)),
        _l2(weight_decay),
        transforms.scale_by_learning_rate(lr),
    )


@common.declares("torch")
def Adadelta(
    lr=1.0,
    rho=0.9,
    eps=1e-6,
    weight_decay=0.0,
    maximize=False,
) -> optax.GradientTransformation:
    r"""``torch.optim.Adadelta``.

    .. math::

       g_t \leftarrow \pm g_t + \lambda\theta_{t-1}, \quad
       v_t = \rho v_{t-1} + (1-\rho) g_t^2, \quad
       \Delta_t = \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}}\, g_t, \quad
       u_t = \rho u_{t-1} + (1-\rho)\Delta_t^2, \quad
       \theta_t = \theta_{t-1} - \eta_t \Delta_t

    Chain: ``[negate] -> [L2 weight decay] -> scale_by_adadelta -> learning rate``.

    Args:
      lr: :math:`\eta`, >= 0 (1.0, as in the paper), or a schedule ``f(step)``.
      rho: :math:`\rho`, in [0, 1).
      eps: :math:`\epsilon`, inside both roots, >= 0.
      weight_decay: :math:`\lambda`, L2 penalty added to the gradient, >= 0.
      maximize: ascend instead of descend.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from rmsjax.compat import torch as pt
      >>> tx = pt.Adadelta()
      >>> params = jnp.array([1.0, -2.0])
      >>> state = tx.init(params)
      >>> for _ in range(3):
      ...     updates, state = tx.update(2 * params, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print(params.tolist())  # as torch.optim.Adadelta([p])
      [0.9903, -1.9903]

    Warning:
      Keras's Adadelta defaults to ``rho=0.95`` and ``learning_rate=0.001``.
    """
    common.require_learning_rate("lr", lr)
    common.require("rho", rho, high=1.0)
    common.require("eps", eps)
    common.require("weight_decay", weight_decay)
    return optax.chain(
        _maximize(maximize),
        _l2(weight_decay),
        common.complex_as_real(transforms.scale_by_adadelta(rho, eps)),
        transforms.scale_by_learning_rate(lr),
    )


@common.declares("torch")
def SGD(
    lr=1e-3,
    momentum=0.0,
    dampening=0.0,
    weight_decay=0.0,
    nesterov=False,
    maximize=False,
) -> optax.GradientTransformation:
    r"""``torch.optim.SGD``, with PyTorch's momentum buffer.

    .. math::

       g_t \leftarrow \pm g_t + \lambda\theta_{t-1}, \quad
       b_1 = g_1, \quad b_t = \mu b_{t-1} + (1-d)\, g_t, \quad
       \theta_t = \theta_{t-1} - \eta_t \cdot
       \begin{cases} b_t & \\ g_t + \mu b_t & \text{(nesterov)} \end{cases}

    The buffer starts at the first gradient, undampened; without momentum the step is
    :math:`\eta_t g_t`. Chain: ``[negate] -> [L2 weight decay] -> [momentum] -> learning
    rate``.

    Args:
      lr: :math:`\eta`, >= 0, or a schedule ``f(step)``.
      momentum: :math:`\mu`, in [0, 1).
      dampening: :math:`d`, in [0, 1].
      weight_decay: :math:`\lambda`, L2 penalty added to the gradient, >= 0.
      nesterov: Nesterov momentum; needs ``momentum > 0`` and ``dampening == 0`` (else
        ``ValueError``, as in PyTorch).
      maximize: ascend instead of descend.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from rmsjax.compat import torch as pt
      >>> tx = pt.SGD(lr=0.1, momentum=0.9, nesterov=True)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = tx.init(params)
      >>> for _ in range(3):
      ...     updates, state = tx.update(2 * params, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print(params.tolist())  # as torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True)
      [-0.1084, 0.2167]

    Warning:
      Keras's SGD puts the learning rate inside the buffer; the two differ when it changes.
    """
    common.require_learning_rate("lr", lr)
    common.require("momentum", momentum, high=1.0)
    common.require("dampening", dampening, high=1.0, high_open=False)
    common.require("weight_decay", weight_decay)
    check.check_flag("nesterov", nesterov)
    dampened = common.is_concrete(dampening) and float(dampening) != 0.0  # an array: unknown, allowed
    if nesterov and (common.is_concrete_zero(momentum) or dampened):
        raise ValueError(
            "Nesterov momentum requires a momentum and zero dampening: nesterov=True needs "
            f"momentum > 0 and dampening == 0, got momentum={momentum!r}, dampening={dampening!r}"
        )
    return optax.chain(
        _maximize(maximize),
        _l2(weight_decay),
        common.unless_zero(
            momentum,
            # PyTorch's default dampening 0 is no dampening: no part, no step counter.
            lambda: transforms.momentum(
                momentum, nesterov=nesterov,
                dampening=None if common.is_concrete_zero(dampening) else dampening),
        ),
        transforms.scale_by_learning_rate(lr),
    )
