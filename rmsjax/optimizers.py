"""Layer 3: optimizers, each an ``optax.chain`` of layer-2 transformations.

No optimizer does arithmetic of its own: each one lists, in order, the transformations of
:mod:`rmsjax.transforms` that make it up, ending with the learning-rate step.

State layout rule: the layout is decided by the *signature*, never by a value. An optional
part (``momentum``, ``weight_decay``) is absent when its argument is ``None`` (the
default, as in optax) and present when any value is given, 0 included; an absent part
keeps its slot in the chain as ``transforms.absent()`` (an empty state), so ``nu`` is at the
same path with and without momentum or weight decay. Flags (``centered``, ``nesterov``,
``bias_correction``, ...), ``state_dtype`` and whether ``learning_rate`` is a schedule
also decide the layout. So ``optax.inject_hyperparams(f)(**kwargs)``, which turns every
given number into an array, has the inner state of ``f(**kwargs)``.

``learning_rate`` may be a number, a jax array, or a schedule ``f(step)`` with ``step``
counting updates from 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

from rmsjax import _validation as check
from rmsjax import transforms
from rmsjax.transforms import MaskOrFn, Scalar, ScalarOrSchedule

__all__ = ["adadelta", "adagrad", "adam", "adamw", "rmsprop", "sgd"]


def _if_given(
    value: Any, make: Callable[[Any], optax.GradientTransformation]
) -> optax.GradientTransformation:
    """``make(value)``, or ``transforms.absent()`` when ``value`` is ``None`` (the part is absent).

    Any given value, 0 included, makes the part present: the layout follows the signature,
    not the value. The absent part keeps the slot in the chain with an empty state
    (``transforms.AbsentState``, an ``optax.EmptyState``).
    """
    return transforms.absent() if value is None else make(value)


def _optional(name: str, value: Any, **bounds: Any) -> Any:
    """``None`` (the part is absent), or the value normalised by ``check.hyperparameter``."""
    return None if value is None else check.hyperparameter(name, value, **bounds)


def _check_nesterov(nesterov: bool, momentum: Any) -> None:
    check.check_flag("nesterov", nesterov)
    if nesterov and momentum is None:
        raise ValueError("nesterov=True needs a momentum: give momentum in [0, 1), got momentum=None")


def rmsprop(
    learning_rate: ScalarOrSchedule,
    decay: Scalar = 0.9,
    eps: Scalar = 1e-8,
    *,
    centered: bool = False,
    momentum: Scalar | None = None,
    nesterov: bool = False,
    weight_decay: Scalar | None = None,
    bias_correction: bool = False,
    eps_in_sqrt: bool = False,
    initial_scale: Scalar = 0.0,
    state_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""RMSprop: gradient descent scaled by the root of a leaky average of squared gradients.

    .. math::

       g_t \leftarrow g_t + \lambda\theta_{t-1}, \quad
       \nu_t = \gamma\nu_{t-1} + (1-\gamma) g_t^2, \quad
       s_t = \frac{g_t}{\sqrt{\nu_t} + \epsilon}, \quad
       b_t = \mu b_{t-1} + s_t, \quad
       \theta_t = \theta_{t-1} - \eta_t b_t

    With ``centered``, :math:`\nu_t` is replaced by :math:`\nu_t - \bar g_t^2` where
    :math:`\bar g_t` is the leaky average of :math:`g_t`. Without momentum,
    :math:`b_t = s_t`. The chain is ``[L2 weight decay] -> scale_by_rms | scale_by_stddev
    -> [momentum] -> learning rate``.

    Args:
      learning_rate: :math:`\eta`: number, jax array or schedule ``f(step)``.
      decay: :math:`\gamma`, in [0, 1).
      eps: :math:`\epsilon`, >= 0, outside the root unless ``eps_in_sqrt``.
      centered: divide by a leaky standard deviation instead of the RMS.
      momentum: :math:`\mu`, in [0, 1), or ``None`` (the default: no momentum buffer);
        the buffer accumulates the scaled gradient and the learning rate multiplies it
        from outside (PyTorch's form). Any value given, 0 included, keeps a buffer.
      nesterov: Nesterov's look-ahead on the momentum buffer (needs a ``momentum``).
      weight_decay: :math:`\lambda`, >= 0, or ``None`` (the default: none, and ``update``
        needs no ``params``): L2 penalty added to the gradient before scaling. Any value
        given, 0 included, needs ``params`` in ``update``.
      bias_correction: debias the averages as Adam does.
      eps_in_sqrt: ``eps`` inside the root (Keras, TF1, d2l).
      initial_scale: :math:`\nu_0` (1 in TF1).
      state_dtype: dtype of the averages; ``None`` keeps the parameters' dtype.

    Defaults, and where they differ from ``optax.rmsprop``:
      ``decay=0.9, eps=1e-8`` as optax, but ``eps`` *outside* the root (PyTorch's place;
      optax's default is ``eps_in_sqrt=True``); with ``momentum`` the learning rate
      multiplies the buffer from outside (optax, Keras and TF1 put it inside, which differs
      under a schedule); ``momentum=None`` and ``weight_decay=None`` (no such parts) as
      optax, which has no ``weight_decay``; flags are keyword-only.

    Example:
      >>> import jax.numpy as jnp, optax, rmsjax
      >>> tx = rmsjax.rmsprop(0.4, decay=0.9, eps=1e-6, eps_in_sqrt=True)  # d2l's setting
      >>> params = jnp.array([-5.0, -2.0])
      >>> state = tx.init(params)
      >>> for _ in range(20):
      ...     grads = jnp.array([0.2, 4.0]) * params  # f = 0.1*x1**2 + 2*x2**2
      ...     updates, state = tx.update(grads, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print(f"{params[0]:.6f} {params[1]:.6f}")
      -0.010599 0.000000

    Warning:
      Defaults differ between frameworks: PyTorch uses ``alpha=0.99, eps=1e-8`` outside
      the root; Keras ``rho=0.9, epsilon=1e-7`` inside it, with the learning rate inside
      the momentum buffer and decoupled weight decay; TF1 starts ``nu`` at 1. Use
      :mod:`rmsjax.compat` to reproduce them exactly.

    Reference:
      Tieleman and Hinton, *Lecture 6.5 - RMSProp*, 2012; Graves, arXiv:1308.0850, 2013.
    """
    check.check_flag("centered", centered)
    momentum = _optional("momentum", momentum, high=1.0)
    weight_decay = _optional("weight_decay", weight_decay)
    _check_nesterov(nesterov, momentum)
    scaling = transforms.scale_by_stddev if centered else transforms.scale_by_rms
    return optax.chain(
        _if_given(weight_decay, transforms.add_decayed_weights),
        scaling(
            decay,
            eps,
            eps_in_sqrt=eps_in_sqrt,
            initial_scale=initial_scale,
            bias_correction=bias_correction,
            state_dtype=state_dtype,
        ),
        _if_given(momentum, lambda m: transforms.momentum(m, nesterov=nesterov)),
        transforms.scale_by_learning_rate(learning_rate),
    )


def adagrad(
    learning_rate: ScalarOrSchedule,
    initial_accumulator_value: Scalar = 0.0,
    eps: Scalar = 1e-10,
) -> optax.GradientTransformation:
    r"""AdaGrad: steps scaled by the root of the running sum of squared gradients.

    .. math::

       G_t = G_{t-1} + g_t^2, \qquad \theta_t = \theta_{t-1} - \eta_t\,\frac{g_t}{\sqrt{G_t} + \epsilon}

    The chain is ``scale_by_rss -> learning rate``.

    Args:
      learning_rate: :math:`\eta`: number, jax array or schedule.
      initial_accumulator_value: :math:`G_0`, >= 0.
      eps: :math:`\epsilon`, >= 0, outside the root (PyTorch's placement).

    Defaults, and where they differ from ``optax.adagrad``:
      ``initial_accumulator_value=0.0, eps=1e-10`` with ``eps`` outside the root, as
      PyTorch; optax's are ``0.1`` and ``1e-7`` with ``eps`` inside the root (and a 0
      step where the sum is 0).

    Example:
      >>> import jax.numpy as jnp, rmsjax
      >>> tx = rmsjax.adagrad(0.5, eps=0.0)
      >>> u, _ = tx.update(jnp.array([4.0]), tx.init(jnp.zeros(1)))
      >>> u
      Array([-0.5], dtype=float32)

    Warning:
      Keras puts ``epsilon`` inside the root and starts the accumulator at 0.1; PyTorch
      also offers ``lr_decay``. See :mod:`rmsjax.compat`.

    Reference:
      Duchi, Hazan and Singer, JMLR 12, 2011.
    """
    return optax.chain(
        transforms.scale_by_rss(initial_accumulator_value, eps),
        transforms.scale_by_learning_rate(learning_rate),
    )


def adam(
    learning_rate: ScalarOrSchedule,
    b1: Scalar = 0.9,
    b2: Scalar = 0.999,
    eps: Scalar = 1e-8,
    *,
    eps_root: Scalar = 0.0,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    r"""Adam: bias-corrected leaky averages of the gradient and its square.

    .. math::

       \theta_t = \theta_{t-1} - \eta_t\,\frac{\hat\mu_t}{\sqrt{\hat\nu_t + \epsilon_{root}} + \epsilon}

    See :func:`rmsjax.scale_by_adam` for :math:`\hat\mu_t, \hat\nu_t`. The chain is
    ``scale_by_adam -> learning rate``; the numbers equal ``optax.adam``'s.

    Args:
      learning_rate: :math:`\eta`: number, jax array or schedule.
      b1: :math:`\beta_1`, in [0, 1).
      b2: :math:`\beta_2`, in [0, 1).
      eps: :math:`\epsilon`, >= 0.
      eps_root: :math:`\epsilon_{root}`, >= 0.
      nesterov: NAdam's look-ahead.

    Defaults, and where they differ from ``optax.adam``:
      ``b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0`` as optax; ``eps_root`` is keyword-only
      here (optax's fifth positional argument) and there is no ``mu_dtype``. The float32
      updates equal ``optax.adam``'s bit for bit under ``jax.jit`` on XLA:CPU, and eagerly
      leaf by leaf (eagerly on a tree of several leaves, optax's own result for a leaf can
      differ in the last bit from its result for that leaf alone; rmsjax's does not).

    Example:
      >>> import jax.numpy as jnp, rmsjax
      >>> tx = rmsjax.adam(0.1)
      >>> u, _ = tx.update(jnp.array([3.0]), tx.init(jnp.zeros(1)))
      >>> u
      Array([-0.1], dtype=float32)

    Warning:
      Keras's Adam adds ``epsilon`` after bias-correcting the step size ("epsilon hat")
      and defaults to ``epsilon=1e-7``. See :mod:`rmsjax.compat`.

    Reference:
      Kingma and Ba, ICLR 2015.
    """
    return optax.chain(
        transforms.scale_by_adam(b1, b2, eps, eps_root=eps_root, nesterov=nesterov),
        transforms.scale_by_learning_rate(learning_rate),
    )


def adamw(
    learning_rate: ScalarOrSchedule,
    b1: Scalar = 0.9,
    b2: Scalar = 0.999,
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 1e-2,
    *,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
    r"""AdamW: Adam with decoupled weight decay.

    .. math::

       \theta_t = \theta_{t-1} - \eta_t\left(\frac{\hat\mu_t}{\sqrt{\hat\nu_t} + \epsilon}
       + \lambda\,\theta_{t-1}\right)

    The decay bypasses the adaptive scaling. The chain is ``scale_by_adam -> weight decay
    -> learning rate``.

    Args:
      learning_rate: :math:`\eta`: number, jax array or schedule.
      b1: :math:`\beta_1`, in [0, 1).
      b2: :math:`\beta_2`, in [0, 1).
      eps: :math:`\epsilon`, >= 0.
      weight_decay: :math:`\lambda`, >= 0.
      mask: tree of bools (or a function of the params returning one): decay only where
        true, e.g. not on biases and norms.

    Defaults, and where they differ from ``optax.adamw``:
      ``weight_decay=1e-2`` (PyTorch's; optax's is ``1e-4``), and it is the *fifth*
      positional argument here, where optax's fifth is ``eps_root`` (pass ``weight_decay``
      by keyword when porting); no ``eps_root``, ``mu_dtype`` or ``nesterov``.
      ``weight_decay=None`` leaves the decay out (plain Adam); any value, 0 included,
      keeps it and needs ``params`` in ``update``.

    Example:
      >>> import jax.numpy as jnp, rmsjax
      >>> tx = rmsjax.adamw(0.1, weight_decay=0.5)
      >>> params = jnp.array([2.0])
      >>> u, _ = tx.update(jnp.array([3.0]), tx.init(params), params)
      >>> u  # -0.1 * (1 + 0.5 * 2)
      Array([-0.2], dtype=float32)

    Warning:
      PyTorch's ``AdamW`` multiplies the parameter by ``1 - lr*weight_decay`` before the
      Adam step, which is the same update up to rounding.

    Reference:
      Loshchilov and Hutter, *Decoupled Weight Decay Regularization*, ICLR 2019.
    """
    return optax.chain(
        transforms.scale_by_adam(b1, b2, eps),
        _if_given(weight_decay, lambda w: transforms.add_decayed_weights(w, mask)),
        transforms.scale_by_learning_rate(learning_rate),
    )


def adadelta(
    learning_rate: ScalarOrSchedule = 1.0,
    rho: Scalar = 0.9,
    eps: Scalar = 1e-6,
    weight_decay: Scalar | None = None,
) -> optax.GradientTransformation:
    r"""AdaDelta: steps in the units of the parameters, from two leaky averages.

    .. math::

       g_t \leftarrow g_t + \lambda\theta_{t-1}, \quad
       \theta_t = \theta_{t-1} - \eta_t\,\frac{\sqrt{\Delta_{t-1}+\epsilon}}{\sqrt{\nu_t+\epsilon}}\,g_t

    See :func:`rmsjax.scale_by_adadelta`. The chain is ``[L2 weight decay] ->
    scale_by_adadelta -> learning rate``.

    Args:
      learning_rate: :math:`\eta` (1.0 in the paper): number, jax array or schedule.
      rho: :math:`\rho`, in [0, 1).
      eps: :math:`\epsilon`, >= 0.
      weight_decay: :math:`\lambda`, >= 0, L2 added to the gradient, or ``None`` (the
        default: none, and ``update`` needs no ``params``).

    Defaults, and where they differ from ``optax.adadelta``:
      ``learning_rate=1.0`` (the paper's; optax's default ``None`` applies no learning-rate
      step, the same numbers), ``rho=0.9, eps=1e-6`` as optax; ``weight_decay=None`` (none,
      and ``update`` needs no ``params``) where optax has ``0.0``; no ``weight_decay_mask``.

    Example:
      >>> import jax.numpy as jnp, rmsjax
      >>> tx = rmsjax.adadelta(eps=1e-6)
      >>> u, _ = tx.update(jnp.array([1.0]), tx.init(jnp.zeros(1)))
      >>> float(u[0]) < 0
      True

    Warning:
      Keras defaults to ``rho=0.95`` and ``learning_rate=0.001``.

    Reference:
      Zeiler, arXiv:1212.5701, 2012.
    """
    return optax.chain(
        _if_given(weight_decay, transforms.add_decayed_weights),
        transforms.scale_by_adadelta(rho, eps),
        transforms.scale_by_learning_rate(learning_rate),
    )


def sgd(
    learning_rate: ScalarOrSchedule,
    momentum: Scalar | None = None,
    *,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    r"""Stochastic gradient descent, with optional heavy-ball or Nesterov momentum.

    .. math::

       b_t = \mu b_{t-1} + g_t, \qquad \theta_t = \theta_{t-1} - \eta_t b_t

    (:math:`\theta_t = \theta_{t-1} - \eta_t(g_t + \mu b_t)` with ``nesterov``). The chain
    is ``[momentum] -> learning rate``.

    Args:
      learning_rate: :math:`\eta`: number, jax array or schedule.
      momentum: :math:`\mu`, in [0, 1), or ``None`` (the default, as in ``optax.sgd``: no
        buffer). Any value given, 0 included, keeps a buffer.
      nesterov: Nesterov's look-ahead (needs a ``momentum``).

    Defaults, and where they differ from ``optax.sgd``:
      ``momentum=None`` (no buffer) as optax; ``nesterov`` is keyword-only here (optax's
      third positional argument); no ``accumulator_dtype``.

    Example:
      >>> import jax.numpy as jnp, rmsjax
      >>> tx = rmsjax.sgd(0.1)
      >>> u, _ = tx.update(jnp.array([2.0]), tx.init(jnp.zeros(1)))
      >>> u
      Array([-0.2], dtype=float32)

    Reference:
      Robbins and Monro, 1951; Polyak, 1964; Sutskever et al., ICML 2013.
    """
    momentum = _optional("momentum", momentum, high=1.0)
    _check_nesterov(nesterov, momentum)
    return optax.chain(
        _if_given(momentum, lambda m: transforms.momentum(m, nesterov=nesterov)),
        transforms.scale_by_learning_rate(learning_rate),
    )
