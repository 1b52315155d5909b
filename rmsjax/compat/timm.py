"""timm's ``timm.optim.RMSpropTF``, reproduced with rmsjax's transformations.

``RMSpropTF`` is PyTorch's RMSprop modified by timm to behave like TensorFlow's (it is the
optimizer of timm's EfficientNet and MobileNet recipes): ``eps`` sits *inside* the square
root, the mean-square accumulator starts at **one**, and by default the learning rate is
accumulated *inside* the momentum buffer. The factory takes the argument names and defaults
of timm 1.0 (less ``params``, ``foreach`` and the timm-only extras ``caution`` and
``corrected_weight_decay``, which are not supported) and returns an
``optax.GradientTransformation`` whose updates, applied with ``optax.apply_updates``, follow
timm's parameter trajectory (checked to 1e-9 relative in float64 against fixtures recorded
from timm 1.0 on torch 2.13). Neither timm nor torch is imported or needed.

A ``momentum`` or ``weight_decay`` of 0 leaves its part out; under
``optax.inject_hyperparams`` pass ``static_args=("momentum", "weight_decay")`` to keep them
out (an injected 0 is an array and keeps the part, with the same updates).
"""

from __future__ import annotations

import optax

from rmsjax import _validation as check
from rmsjax import transforms
from rmsjax.compat import _common as common
from rmsjax.transforms import Scalar, ScalarOrSchedule

__all__ = ["RMSpropTF"]


@common.declares("timm")
def RMSpropTF(
    lr: ScalarOrSchedule = 0.01,
    alpha: Scalar = 0.9,
    eps: Scalar = 1e-10,
    weight_decay: Scalar = 0.0,
    momentum: Scalar = 0.0,
    centered: bool = False,
    decoupled_decay: bool = False,
    lr_in_momentum: bool = True,
) -> optax.GradientTransformation:
    r"""``timm.optim.RMSpropTF``: RMSprop with TensorFlow's conventions.

    .. math::

       g_t \leftarrow g_t + \lambda\theta_{t-1} \ \text{(coupled decay)}, \quad
       v_t = v_{t-1} + (1-\alpha)(g_t^2 - v_{t-1}), \quad
       \bar g_t = \bar g_{t-1} + (1-\alpha)(g_t - \bar g_{t-1}) \ \text{(centered)}

       s_t = \frac{g_t}{\sqrt{v_t + \epsilon}}
       \ \text{ or, centered, }\ \frac{g_t}{\sqrt{v_t - \bar g_t^2 + \epsilon}}

       b_t = \mu b_{t-1} + \eta_t s_t,\ \theta_t = \theta_{t-1} - b_t
       \ \text{ (lr\_in\_momentum) or }\
       b_t = \mu b_{t-1} + s_t,\ \theta_t = \theta_{t-1} - \eta_t b_t

    with :math:`v_0 = 1` and :math:`\bar g_0 = b_0 = 0`; without momentum
    :math:`\theta_t = \theta_{t-1} - \eta_t s_t`. With ``decoupled_decay`` the gradient gets
    no L2 term and instead :math:`\theta_{t-1}` is first multiplied by
    :math:`1 - \eta_t\lambda` (AdamW-style, with the current learning rate). Chain:
    ``[L2 weight decay] -> scale_by_rms | scale_by_stddev (eps_in_sqrt, initial_scale=1) ->
    learning rate -> [momentum]`` (``lr_in_momentum``) or ``... -> [momentum] -> learning
    rate``, then ``[decoupled weight decay]``.

    Args:
      lr: :math:`\eta`, >= 0, or a schedule ``f(step)`` (``step`` = 0 at the first update:
        a timm or PyTorch scheduler stepped after every ``optimizer.step()``).
      alpha: :math:`\alpha`, the smoothing constant, in [0, 1) (timm's default 0.9, not
        PyTorch's 0.99).
      eps: :math:`\epsilon`, added *inside* the square root, >= 0.
      weight_decay: :math:`\lambda`, >= 0: an L2 term added to the gradient, or with
        ``decoupled_decay`` a multiplicative decay of the parameters.
      momentum: :math:`\mu`, in [0, 1).
      centered: divide by the leaky standard deviation :math:`\sqrt{v_t - \bar g_t^2 + \epsilon}`.
      decoupled_decay: decay the parameters by :math:`\eta_t\lambda` instead of adding
        :math:`\lambda\theta` to the gradient.
      lr_in_momentum: accumulate :math:`\eta_t s_t` in the momentum buffer (TensorFlow's
        way, timm's default) instead of multiplying the buffer by :math:`\eta_t` (PyTorch's);
        the two differ only when the learning rate changes.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from rmsjax.compat import timm
      >>> tx = timm.RMSpropTF(lr=0.1, momentum=0.9)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = tx.init(params)
      >>> for _ in range(3):
      ...     updates, state = tx.update(2 * params, state, params)  # grad of sum(p**2)
      ...     params = optax.apply_updates(params, updates)
      >>> print(params.tolist())  # timm.optim.RMSpropTF([p], lr=0.1, momentum=0.9) gives the same
      [0.1745, -0.8220]

    Warning:
      ``torch.optim.RMSprop`` (:func:`rmsjax.compat.torch.RMSprop`) puts ``eps`` outside the
      root, starts the accumulator at 0 and defaults to ``alpha=0.99``: the same numbers
      give a very different run. The accumulator starting at 1 makes the first steps small
      when gradients are small. Complex parameters are not treated as pairs of reals here
      (timm squares them as complex numbers; rmsjax uses :math:`|g|^2`).
    """
    common.require_learning_rate("lr", lr)
    common.require("alpha", alpha, high=1.0)
    common.require("eps", eps)
    common.require("weight_decay", weight_decay)
    common.require("momentum", momentum, high=1.0)
    check.check_flag("centered", centered)
    check.check_flag("decoupled_decay", decoupled_decay)
    check.check_flag("lr_in_momentum", lr_in_momentum)
    scaling = transforms.scale_by_stddev if centered else transforms.scale_by_rms
    no_decay = common.is_concrete_zero(weight_decay)
    l2 = transforms.absent() if decoupled_decay or no_decay else transforms.add_decayed_weights(weight_decay)
    decoupled = (
        common.decoupled_weight_decay(weight_decay, lr)
        if decoupled_decay and not no_decay
        else transforms.absent()
    )
    buffer = common.unless_zero(momentum, lambda: transforms.momentum(momentum))
    rate = transforms.scale_by_learning_rate(lr)
    steps = (rate, buffer) if lr_in_momentum else (buffer, rate)
    return optax.chain(
        l2,
        scaling(alpha, eps, eps_in_sqrt=True, initial_scale=1.0),
        *steps,
        decoupled,
    )
