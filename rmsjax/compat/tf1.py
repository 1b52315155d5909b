"""TensorFlow 1's ``tf.compat.v1.train.RMSPropOptimizer``, reproduced with rmsjax.

The update is that of TF1's ``ApplyRMSProp`` and ``ApplyCenteredRMSProp`` kernels
(``tensorflow/core/kernels/training_ops.cc``), with the slots that
``RMSPropOptimizer._create_slots`` makes (``tensorflow/python/training/rmsprop.py``): the
mean-square accumulator starts at **one**, ``epsilon`` sits inside the square root, and the
learning rate sits inside the momentum buffer. ``learning_rate`` may be a schedule
``f(step)`` with ``step`` the global step (0 at the first update), as a decayed learning-rate
tensor such as ``tf.compat.v1.train.exponential_decay(lr, global_step, ...)`` gives when
``apply_gradients(..., global_step=global_step)`` increments it after each update.

A ``momentum`` of 0 leaves the buffer out; under ``optax.inject_hyperparams`` pass
``static_args=("momentum",)`` to keep it out (an injected 0 is an array and keeps it).
"""

from __future__ import annotations

import optax

from rmsjax import _validation as check
from rmsjax import transforms
from rmsjax.compat import _common as common

__all__ = ["RMSPropOptimizer"]


@common.declares("tf1")
def RMSPropOptimizer(
    learning_rate,
    decay=0.9,
    momentum=0.0,
    epsilon=1e-10,
    centered=False,
) -> optax.GradientTransformation:
    r"""``tf.compat.v1.train.RMSPropOptimizer`` (dense update).

    .. math::

       ms_t = \rho\, ms_{t-1} + (1-\rho) g_t^2, \quad
       mg_t = \rho\, mg_{t-1} + (1-\rho) g_t \ \text{(centered)}

       mom_t = \mu\, mom_{t-1} + \frac{\eta_t\, g_t}{\sqrt{ms_t + \epsilon}}
       \ \text{ or, centered, }\
       \mu\, mom_{t-1} + \frac{\eta_t\, g_t}{\sqrt{ms_t - mg_t^2 + \epsilon}}, \quad
       \theta_t = \theta_{t-1} - mom_t

    with :math:`ms_0 = 1` and :math:`mg_0 = mom_0 = 0`. Chain: ``scale_by_rms |
    scale_by_stddev (eps_in_sqrt, initial_scale=1) -> learning rate -> [momentum]``.

    Args:
      learning_rate: :math:`\eta` (no default, as in TF1), >= 0, or a schedule ``f(step)``.
      decay: :math:`\rho`, in [0, 1).
      momentum: :math:`\mu`, in [0, 1); the learning rate sits inside the buffer.
      epsilon: :math:`\epsilon`, inside the square root, >= 0.
      centered: divide by the leaky standard deviation. TF1's fifth positional argument
        is ``use_locking`` (meaningless in JAX, not taken here): pass ``centered`` by keyword.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from rmsjax.compat import tf1
      >>> tx = tf1.RMSPropOptimizer(learning_rate=0.1, momentum=0.9)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = tx.init(params)
      >>> for _ in range(3):
      ...     updates, state = tx.update(2 * params, state, params)  # grad of sum(p**2)
      ...     params = optax.apply_updates(params, updates)
      >>> print(params.tolist())  # the NumPy transcription of TF1's kernel agrees
      [0.1745, -0.8220]

    Warning:
      The accumulator starting at 1 makes TF1's first steps much smaller than Keras's or
      PyTorch's when gradients are small: :math:`ms_1 = 0.9 + 0.1 g_1^2` rather than
      :math:`0.1 g_1^2`. Keras 3's RMSprop (:mod:`rmsjax.compat.keras`) starts it at 0.
      TF1 itself validates none of these arguments; here out-of-range values raise
      ``ValueError`` naming the argument.
    """
    common.require_learning_rate("learning_rate", learning_rate)
    common.require("decay", decay, high=1.0)
    common.require("momentum", momentum, high=1.0)
    common.require("epsilon", epsilon)
    check.check_flag("centered", centered)
    scaling = transforms.scale_by_stddev if centered else transforms.scale_by_rms
    return optax.chain(
        scaling(decay, epsilon, eps_in_sqrt=True, initial_scale=1.0),
        transforms.scale_by_learning_rate(learning_rate),
        common.unless_zero(momentum, lambda: transforms.momentum(momentum)),
    )
