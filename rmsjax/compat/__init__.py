"""Framework conventions: optimizers that follow PyTorch's, Keras's and TF1's trajectories.

* :mod:`rmsjax.compat.torch`: ``RMSprop``, ``Adagrad``, ``Adam``, ``AdamW``, ``Adadelta``,
  ``SGD`` with ``torch.optim``'s argument names and defaults;
* :mod:`rmsjax.compat.keras`: ``RMSprop``, ``Adagrad``, ``Adam``, ``AdamW``, ``Adadelta``,
  ``Adamax``, ``Nadam``, ``SGD`` with ``keras.optimizers``' arguments (Keras 3, all of them:
  clipping, EMA, accumulation), and :mod:`rmsjax.compat.keras.schedules`;
* :mod:`rmsjax.compat.tf1`: ``RMSPropOptimizer`` with ``tf.compat.v1.train``'s;
* :mod:`rmsjax.compat.timm`: ``RMSpropTF`` with ``timm.optim``'s.

:func:`param_groups` gives any of them PyTorch-style parameter groups (per-group
overrides of any constructor argument).

Each factory returns an ``optax.GradientTransformation`` built from rmsjax's own
transformations; applied with ``optax.apply_updates``, its updates reproduce the
framework's parameters step after step (to rounding). Neither PyTorch, Keras nor TensorFlow
is imported or needed. See ``docs/porting.md`` for the conventions that differ.

Example:
  >>> import jax.numpy as jnp
  >>> from rmsjax import compat
  >>> tx = compat.torch.RMSprop(lr=0.01, momentum=0.9)
  >>> updates, state = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)), jnp.zeros(2))
  >>> print(updates)  # -lr * g / (sqrt((1 - alpha) * g**2) + eps)
  [-0.1 -0.1]
"""

from rmsjax.compat import keras, tf1, timm, torch
from rmsjax.compat._groups import ParamGroupsState, param_groups, path_name

__all__ = ["ParamGroupsState", "keras", "param_groups", "path_name", "tf1", "timm", "torch"]
