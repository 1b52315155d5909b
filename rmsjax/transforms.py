"""Layer 2: gradient transformations of the RMSprop family.

Each factory validates its hyperparameters, then returns an
``optax.GradientTransformation`` whose state is a small NamedTuple with the paper's
symbols: ``count`` (int32 number of updates made, saturating), ``mu`` (first moment or
momentum buffer), ``nu`` (second moment). The arithmetic itself lives in
:mod:`rmsjax.averages`; the functions here only wire it together.

State layout: decided by a factory's flags and by which optional arguments are given
(``None`` is absent), never by a hyperparameter's value; no state field is ever ``None``
(a part that reads no step count has no ``count`` field: :class:`MomentumState`,
:class:`ScaleByLearningRateState`). Each ``update`` checks, at trace time, that it got its
own state type, that the gradient tree matches the state's, and that no complex gradient
meets a real parameter.

Gradients ``g`` below are the incoming updates; ``t`` is the step number counted from 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsjax import _moments, averages
from rmsjax import _validation as check

__all__ = [
    "AbsentState",
    "DampenedMomentumState",
    "LeakyAverageState",
    "MomentumState",
    "ScaleByAdaDeltaState",
    "ScaleByAdamState",
    "ScaleByAmsgradState",
    "ScaleByLearningRateState",
    "ScaleByRmsState",
    "ScaleByRssState",
    "ScaleByScheduleState",
    "ScaleByStddevState",
    "absent",
    "add_decayed_weights",
    "leaky_average",
    "momentum",
    "scale_by_adadelta",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_rms",
    "scale_by_rss",
    "scale_by_stddev",
    "upgrade_0_2_state_dict",
]

PyTree = Any
Scalar = float | jax.Array
Schedule = Callable[[jax.Array], Any]
ScalarOrSchedule = float | jax.Array | Schedule
MaskOrFn = PyTree | Callable[[PyTree], PyTree] | None


def zero_count(params: PyTree = None) -> jax.Array:
    """An int32 zero, replicated over the mesh that holds ``params`` (if any)."""
    return averages.replicated_like(jnp.zeros([], jnp.int32), params)


def _adaptive_step(updates: PyTree, nu: PyTree, eps: Scalar, eps_in_sqrt: bool) -> PyTree:
    """``g / (sqrt(nu) + eps)``, or ``g / sqrt(nu + eps)`` when ``eps_in_sqrt``."""
    if eps_in_sqrt:
        return averages.divide_by_root(updates, nu, eps=0.0, eps_root=eps)
    return averages.divide_by_root(updates, nu, eps=eps)


def _state_dtype(state_dtype: Any) -> Any:
    return check.check_state_dtype("state_dtype", state_dtype)


def _check_inputs(
    updates: PyTree, state: Any, params: PyTree, *, expected: type | tuple[type, ...], who: str,
    moment: str, first_moment: str | None = None,
) -> None:
    """The checks every update makes at trace time (no operations are emitted).

    ``state`` must be of the ``expected`` type; ``updates`` must match the state's
    ``moment`` tree; a complex update for a real parameter fails, judged against the
    parameters when given, else against the state's ``first_moment`` field (a moment kept
    in the parameters' dtype).
    """
    check.check_state_type(state, expected, who)
    check.check_trees_match(updates, getattr(state, moment), what=moment, who=who)
    if params is not None:
        check.check_real_for_real(updates, params, what="params", who=who)
    elif first_moment is not None:
        check.check_real_for_real(
            updates, getattr(state, first_moment), what=f"{first_moment} (in the parameters' dtype)", who=who
        )


class ScaleByRmsState(NamedTuple):
    """State of :func:`scale_by_rms`: step count and leaky average ``nu`` of ``g**2``."""

    count: jax.Array
    nu: PyTree


_moments.declare(ScaleByRmsState, nu=_moments.SECOND)

def scale_by_rms(
    decay: Scalar = 0.9,
    eps: Scalar = 1e-8,
    *,
    eps_in_sqrt: bool = False,
    initial_scale: Scalar = 0.0,
    bias_correction: bool = False,
    state_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Divides the gradient by the root of a leaky average of its square (RMSprop).

    .. math::

       \nu_t = \gamma \nu_{t-1} + (1-\gamma) g_t^2, \qquad
       u_t = \frac{g_t}{\sqrt{\hat\nu_t} + \epsilon}
       \quad\text{or, with } \texttt{eps\_in\_sqrt},\quad
       u_t = \frac{g_t}{\sqrt{\hat\nu_t + \epsilon}}

    where :math:`\hat\nu_t = \nu_t / (1-\gamma^t)` with ``bias_correction`` and
    :math:`\nu_t` otherwise; :math:`\nu_0` is ``initial_scale``.

    Args:
      decay: :math:`\gamma`, the leaky average's decay, in [0, 1).
      eps: :math:`\epsilon`, added to the root (or inside it), >= 0.
      eps_in_sqrt: put ``eps`` inside the square root (Keras, TF1, d2l) instead of
        outside it (PyTorch, the default).
      initial_scale: :math:`\nu_0` (TF1 starts its accumulator at 1, everyone else at 0).
      bias_correction: divide ``nu`` by :math:`1-\gamma^t` as Adam does.
      state_dtype: dtype of ``nu``; ``None`` keeps the parameters' (real) dtype.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScaleByRmsState`.

    Example:
      >>> import jax.numpy as jnp, rmsjax
      >>> tx = rmsjax.scale_by_rms(decay=0.9, eps=0.0)
      >>> u, _ = tx.update(jnp.array([2.0]), tx.init(jnp.zeros(1)))
      >>> u.round(4)  # 2 / sqrt(0.1 * 4)
      Array([3.1623], dtype=float32)

    Warning:
      PyTorch puts ``eps`` outside the root, Keras and TF1 inside; TF1 starts ``nu`` at 1.
      See :mod:`rmsjax.compat` for exact framework behaviour.

    Reference:
      Tieleman and Hinton, *Lecture 6.5 - RMSProp*, COURSERA: Neural Networks for
      Machine Learning, 2012.
    """
    decay = check.hyperparameter("decay", decay, high=1.0)
    eps = check.hyperparameter("eps", eps)
    check.check_flag("eps_in_sqrt", eps_in_sqrt)
    initial_scale = check.hyperparameter("initial_scale", initial_scale)
    check.check_flag("bias_correction", bias_correction)
    nu_dtype = _state_dtype(state_dtype)

    def init_fn(params):
        nu = averages.full_like(params, initial_scale, nu_dtype, real=True)
        return ScaleByRmsState(count=zero_count(params), nu=nu)

    def update_fn(updates, state, params=None):
        _check_inputs(updates, state, params, expected=ScaleByRmsState, who="scale_by_rms", moment="nu")
        count = averages.increment_count(state.count)
        nu = averages.update_leaky_average(state.nu, updates, decay, order=2)
        nu_hat = averages.bias_correction(nu, decay, count) if bias_correction else nu
        updates = _adaptive_step(updates, nu_hat, eps, eps_in_sqrt)
        return updates, ScaleByRmsState(count=count, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


class ScaleByStddevState(NamedTuple):
    """State of :func:`scale_by_stddev`: count, leaky averages ``mu`` of ``g`` and ``nu`` of ``g**2``."""

    count: jax.Array
    mu: PyTree
    nu: PyTree


_moments.declare(ScaleByStddevState, mu=_moments.ADAM_FIRST,
                 nu=_moments.Moment(False, "leaky", 2, centered="mu"))

def scale_by_stddev(
    decay: Scalar = 0.9,
    eps: Scalar = 1e-8,
    *,
    eps_in_sqrt: bool = False,
    initial_scale: Scalar = 0.0,
    bias_correction: bool = False,
    state_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Divides the gradient by a leaky estimate of its standard deviation (centred RMSprop).

    .. math::

       \mu_t = \gamma \mu_{t-1} + (1-\gamma) g_t, \quad
       \nu_t = \gamma \nu_{t-1} + (1-\gamma) g_t^2, \quad
       u_t = \frac{g_t}{\sqrt{\nu_t - \mu_t^2} + \epsilon}

    (or :math:`g_t / \sqrt{\nu_t - \mu_t^2 + \epsilon}` with ``eps_in_sqrt``). With
    ``bias_correction`` both averages are divided by :math:`1-\gamma^t` first. A variance
    that rounding makes slightly negative is treated as zero.

    Args:
      decay: :math:`\gamma`, in [0, 1).
      eps: :math:`\epsilon`, >= 0.
      eps_in_sqrt: ``eps`` inside the root (Keras, TF1) instead of outside (PyTorch).
      initial_scale: :math:`\nu_0`; :math:`\mu_0` is 0.
      bias_correction: debias both averages.
      state_dtype: dtype of ``mu`` and ``nu``; ``None`` keeps the parameters' dtype (a
        complex parameter's ``mu`` is complex of that precision, at least complex64).

    Example:
      >>> import jax.numpy as jnp, rmsjax
      >>> tx = rmsjax.scale_by_stddev(decay=0.5, eps=0.0)
      >>> u, _ = tx.update(jnp.array([2.0]), tx.init(jnp.zeros(1)))
      >>> u  # 2 / sqrt(0.5*4 - (0.5*2)**2)
      Array([2.], dtype=float32)

    Warning:
      PyTorch computes ``sqrt(nu - mu**2) + eps``; Keras and TF1 ``sqrt(nu - mu**2 + eps)``.

    Reference:
      Graves, *Generating Sequences With Recurrent Neural Networks*, arXiv:1308.0850, 2013.
    """
    decay = check.hyperparameter("decay", decay, high=1.0)
    eps = check.hyperparameter("eps", eps)
    check.check_flag("eps_in_sqrt", eps_in_sqrt)
    initial_scale = check.hyperparameter("initial_scale", initial_scale)
    check.check_flag("bias_correction", bias_correction)
    moment_dtype = _state_dtype(state_dtype)

    def init_fn(params):
        return ScaleByStddevState(
            count=zero_count(params),
            mu=averages.full_like(params, 0.0, moment_dtype),
            nu=averages.full_like(params, initial_scale, moment_dtype, real=True),
        )

    def update_fn(updates, state, params=None):
        _check_inputs(
            updates, state, params, expected=ScaleByStddevState, who="scale_by_stddev", moment="nu",
            first_moment="mu" if moment_dtype is None else None,
        )
        count = averages.increment_count(state.count)
        mu = averages.update_leaky_average(state.mu, updates, decay, order=1)
        nu = averages.update_leaky_average(state.nu, updates, decay, order=2)
        mu_hat, nu_hat = mu, nu
        if bias_correction:
            mu_hat = averages.bias_correction(mu, decay, count)
            nu_hat = averages.bias_correction(nu, decay, count)
        variance = averages.centered_variance(nu_hat, mu_hat)
        updates = _adaptive_step(updates, variance, eps, eps_in_sqrt)
        return updates, ScaleByStddevState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


class ScaleByRssState(NamedTuple):
    """State of :func:`scale_by_rss`: count and the running sum ``nu`` of ``g**2``."""

    count: jax.Array
    nu: PyTree


_moments.declare(ScaleByRssState, nu=_moments.Moment(False, "sum", 2))

def scale_by_rss(
    initial_accumulator_value: Scalar = 0.0,
    eps: Scalar = 1e-10,
    *,
    eps_in_sqrt: bool = False,
) -> optax.GradientTransformation:
    r"""Divides the gradient by the root of the running sum of its squares (AdaGrad).

    .. math::

       G_t = G_{t-1} + g_t^2, \qquad u_t = \frac{g_t}{\sqrt{G_t} + \epsilon}

    (or :math:`g_t/\sqrt{G_t + \epsilon}` with ``eps_in_sqrt``); :math:`G_0` is
    ``initial_accumulator_value``. The sum never forgets, so the effective step
    :math:`1/\sqrt{G_t}` only shrinks: AdaGrad's stall, which RMSprop's leaky average cures.

    Args:
      initial_accumulator_value: :math:`G_0`, >= 0.
      eps: :math:`\epsilon`, >= 0.
      eps_in_sqrt: ``eps`` inside the root (Keras) instead of outside (PyTorch).

    Example:
      >>> import jax.numpy as jnp, rmsjax
      >>> tx = rmsjax.scale_by_rss(eps=0.0)
      >>> u, _ = tx.update(jnp.array([3.0]), tx.init(jnp.zeros(1)))
      >>> u
      Array([1.], dtype=float32)

    Warning:
      PyTorch's default ``initial_accumulator_value`` is 0 with ``eps`` outside the root;
      Keras's is 0.1 with ``eps`` inside it.

    Reference:
      Duchi, Hazan and Singer, *Adaptive Subgradient Methods for Online Learning and
      Stochastic Optimization*, JMLR 12, 2011.
    """
    initial_accumulator_value = check.hyperparameter("initial_accumulator_value", initial_accumulator_value)
    eps = check.hyperparameter("eps", eps)
    check.check_flag("eps_in_sqrt", eps_in_sqrt)

    def init_fn(params):
        nu = averages.full_like(params, initial_accumulator_value, real=True)
        return ScaleByRssState(count=zero_count(params), nu=nu)

    def update_fn(updates, state, params=None):
        _check_inputs(updates, state, params, expected=ScaleByRssState, who="scale_by_rss", moment="nu")
        nu = averages.update_running_sum(state.nu, updates, order=2)
        updates = _adaptive_step(updates, nu, eps, eps_in_sqrt)
        return updates, ScaleByRssState(count=averages.increment_count(state.count), nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam`: count, first moment ``mu``, second moment ``nu``."""

    count: jax.Array
    mu: PyTree
    nu: PyTree


_moments.declare(ScaleByAdamState, mu=_moments.ADAM_FIRST, nu=_moments.SECOND)

class ScaleByAmsgradState(NamedTuple):
    """State of :func:`scale_by_adam` with ``amsgrad=True``: adds ``nu_max``, the running max of ``nu``."""

    count: jax.Array
    mu: PyTree
    nu: PyTree
    nu_max: PyTree


_moments.declare(ScaleByAmsgradState, mu=_moments.ADAM_FIRST, nu=_moments.SECOND,
                 nu_max=_moments.Moment(False))

def scale_by_adam(
    b1: Scalar = 0.9,
    b2: Scalar = 0.999,
    eps: Scalar = 1e-8,
    *,
    eps_root: Scalar = 0.0,
    nesterov: bool = False,
    state_dtype: Any = None,
    amsgrad: bool = False,
    eps_hat: bool = False,
    exact_bias_correction: bool = False,
) -> optax.GradientTransformation:
    r"""Adam's scaling: bias-corrected first moment over the root of the second.

    .. math::

       \mu_t = \beta_1\mu_{t-1} + (1-\beta_1) g_t, \quad
       \nu_t = \beta_2\nu_{t-1} + (1-\beta_2) g_t^2, \quad
       u_t = \frac{\hat\mu_t}{\sqrt{\hat\nu_t + \epsilon_{root}} + \epsilon}

    with :math:`\hat\mu_t = \mu_t/(1-\beta_1^t)`, :math:`\hat\nu_t = \nu_t/(1-\beta_2^t)`.
    With ``nesterov`` (NAdam), :math:`\hat\mu_t = \beta_1 \mu_t/(1-\beta_1^{t+1}) +
    (1-\beta_1) g_t/(1-\beta_1^t)`. Built from the leaky average and bias correction of
    :mod:`rmsjax.averages`: ``scale_by_adam(b1=0, b2=d)`` is ``scale_by_rms(decay=d,
    bias_correction=True)``.

    Args:
      b1: :math:`\beta_1`, in [0, 1).
      b2: :math:`\beta_2`, in [0, 1).
      eps: :math:`\epsilon`, outside the root, >= 0.
      eps_root: :math:`\epsilon_{root}`, inside the root, >= 0.
      nesterov: use Nesterov's look-ahead on the first moment (NAdam).
      state_dtype: dtype of ``mu`` and ``nu``; ``None`` keeps the parameters' dtype (a
        complex parameter's ``mu`` is complex of that precision, at least complex64).
      amsgrad: divide by the root of :math:`\nu^{max}_t = \max(\nu^{max}_{t-1}, \nu_t)`
        instead of :math:`\nu_t` (AMSGrad). As in PyTorch and Keras, the maximum is taken
        of the uncorrected :math:`\nu` and then bias-corrected. The state is then a
        :class:`ScaleByAmsgradState` (an extra field ``nu_max``).
      eps_hat: add :math:`\epsilon` to the root of the *uncorrected* second moment,
        :math:`u_t = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,
        \frac{\mu_t}{\sqrt{\nu_t + \epsilon_{root}} + \epsilon}`: the
        ":math:`\hat\epsilon`" form of Kingma and Ba's section 2, used by Keras and TF2
        (equivalently :math:`\epsilon` is scaled by :math:`1/\sqrt{1-\beta_2^t}` in the
        default form). ``False`` (the default) is PyTorch's and optax's form.
      exact_bias_correction: compute :math:`1-\beta^t` to about one ulp, as PyTorch does
        in double precision, instead of as optax does (in float32 without
        ``jax_enable_x64``, which is up to 1.3e-5 relative off at :math:`\beta = 0.999`,
        and 1.3e-4 at 0.9999, in the first steps). ``rmsjax.compat.torch`` sets it.

    Example:
      >>> import jax.numpy as jnp, rmsjax
      >>> tx = rmsjax.scale_by_adam(eps=0.0)
      >>> u, _ = tx.update(jnp.array([-3.0]), tx.init(jnp.zeros(1)))
      >>> u  # the first Adam step is sign(g)
      Array([-1.], dtype=float32)

    Warning:
      Keras adds ``epsilon`` after folding the bias corrections into the step size
      ("epsilon hat"), which differs from this (PyTorch's and optax's) form while
      :math:`\sqrt{\hat\nu}` is small; see :mod:`rmsjax.compat.keras`.

    Reference:
      Kingma and Ba, *Adam: A Method for Stochastic Optimization*, ICLR 2015; Dozat,
      *Incorporating Nesterov Momentum into Adam*, ICLR workshop 2016.
    """
    b1 = check.hyperparameter("b1", b1, high=1.0)
    b2 = check.hyperparameter("b2", b2, high=1.0)
    eps = check.hyperparameter("eps", eps)
    eps_root = check.hyperparameter("eps_root", eps_root)
    check.check_flag("nesterov", nesterov)
    check.check_flag("amsgrad", amsgrad)
    check.check_flag("eps_hat", eps_hat)
    check.check_flag("exact_bias_correction", exact_bias_correction)
    exact = exact_bias_correction
    moment_dtype = _state_dtype(state_dtype)

    def init_fn(params):
        count = zero_count(params)
        mu = averages.full_like(params, 0.0, moment_dtype)
        nu = averages.full_like(params, 0.0, moment_dtype, real=True)
        if amsgrad:
            return ScaleByAmsgradState(count=count, mu=mu, nu=nu, nu_max=nu)
        return ScaleByAdamState(count=count, mu=mu, nu=nu)

    def update_fn(updates, state, params=None):
        expected = ScaleByAmsgradState if amsgrad else ScaleByAdamState
        _check_inputs(
            updates, state, params, expected=expected, who="scale_by_adam", moment="nu",
            first_moment="mu" if moment_dtype is None else None,
        )
        count = averages.increment_count(state.count)
        mu = averages.update_leaky_average(state.mu, updates, b1, order=1)
        nu = averages.update_leaky_average(state.nu, updates, b2, order=2)
        if nesterov:
            ahead = averages.bias_correction(mu, b1, averages.increment_count(count), exact=exact)
            fresh = averages.bias_correction(averages.cast_like(updates, mu), b1, count, exact=exact)
            mu_hat = averages.update_leaky_average(ahead, fresh, b1, order=1)
        else:
            mu_hat = averages.bias_correction(mu, b1, count, exact=exact)
        nu_used = nu
        if amsgrad:
            nu_used = jax.tree.map(jnp.maximum, state.nu_max, nu)
        if eps_hat:
            steps = averages.divide_by_root(mu_hat, nu_used, eps=eps, eps_root=eps_root)
            steps = averages.multiply_by_root_correction(steps, b2, count, exact=exact)
        else:
            nu_hat = averages.bias_correction(nu_used, b2, count, exact=exact)
            steps = averages.divide_by_root(mu_hat, nu_hat, eps=eps, eps_root=eps_root)
        steps = averages.cast_like(steps, updates)
        if amsgrad:
            return steps, ScaleByAmsgradState(count=count, mu=mu, nu=nu, nu_max=nu_used)
        return steps, ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


class ScaleByAdaDeltaState(NamedTuple):
    """State of :func:`scale_by_adadelta`: count, leaky averages of ``g**2`` and of ``u**2``."""

    count: jax.Array
    nu: PyTree
    nu_delta: PyTree


# nu_delta averages the squared *output*: declared without a rule (reduced exactly).
_moments.declare(ScaleByAdaDeltaState, nu=_moments.SECOND, nu_delta=_moments.Moment(False))

def scale_by_adadelta(rho: Scalar = 0.9, eps: Scalar = 1e-6) -> optax.GradientTransformation:
    r"""AdaDelta's unit-correcting scaling.

    .. math::

       \nu_t = \rho\nu_{t-1} + (1-\rho) g_t^2, \quad
       u_t = \frac{\sqrt{\Delta_{t-1} + \epsilon}}{\sqrt{\nu_t + \epsilon}}\, g_t, \quad
       \Delta_t = \rho\Delta_{t-1} + (1-\rho) u_t^2

    The state field ``nu_delta`` holds :math:`\Delta`. The learning rate multiplies
    :math:`u_t` afterwards (1.0 in the paper).

    Args:
      rho: :math:`\rho`, in [0, 1).
      eps: :math:`\epsilon`, inside both roots, >= 0.

    Example:
      >>> import jax.numpy as jnp, rmsjax
      >>> tx = rmsjax.scale_by_adadelta(rho=0.0, eps=1.0)
      >>> u, _ = tx.update(jnp.array([0.0]), tx.init(jnp.zeros(1)))
      >>> u
      Array([0.], dtype=float32)

    Warning:
      PyTorch's default ``rho`` is 0.9 and ``lr`` 1.0; Keras's ``rho`` 0.95 and
      ``learning_rate`` 0.001.

    Reference:
      Zeiler, *ADADELTA: An Adaptive Learning Rate Method*, arXiv:1212.5701, 2012.
    """
    rho = check.hyperparameter("rho", rho, high=1.0)
    eps = check.hyperparameter("eps", eps)

    def init_fn(params):
        return ScaleByAdaDeltaState(
            count=zero_count(params),
            nu=averages.full_like(params, 0.0, real=True),
            nu_delta=averages.full_like(params, 0.0, real=True),
        )

    def update_fn(updates, state, params=None):
        _check_inputs(
            updates, state, params, expected=ScaleByAdaDeltaState, who="scale_by_adadelta", moment="nu"
        )
        nu = averages.update_leaky_average(state.nu, updates, rho, order=2)
        nu_delta = averages.update_step_average(state.nu_delta, updates, state.nu_delta, nu, rho, eps=eps)
        updates = averages.multiply_by_root_ratio(updates, state.nu_delta, nu, eps=eps)
        count = averages.increment_count(state.count)
        return updates, ScaleByAdaDeltaState(count=count, nu=nu, nu_delta=nu_delta)

    return optax.GradientTransformation(init_fn, update_fn)


class LeakyAverageState(NamedTuple):
    """State of :func:`leaky_average`: count and the leaky average ``mu`` of the updates."""

    count: jax.Array
    mu: PyTree


_moments.declare(LeakyAverageState, mu=_moments.FIRST)

def leaky_average(
    decay: Scalar, *, debias: bool = False, state_dtype: Any = None
) -> optax.GradientTransformation:
    r"""Replaces the updates by their leaky (exponential moving) average.

    .. math::

       \mu_t = \gamma\mu_{t-1} + (1-\gamma) g_t, \qquad
       u_t = \mu_t \ \text{ or, with } \texttt{debias},\ \mu_t/(1-\gamma^t)

    The weight of the gradient from :math:`k` steps ago is :math:`(1-\gamma)\gamma^k`, so
    the average looks back about :math:`1/(1-\gamma)` steps.

    Args:
      decay: :math:`\gamma`, in [0, 1).
      debias: divide by :math:`1-\gamma^t` so early averages are not pulled to zero.
      state_dtype: dtype of ``mu``; ``None`` keeps the parameters' dtype (a
        complex parameter's ``mu`` is complex of that precision, at least complex64).

    Example:
      >>> import jax.numpy as jnp, rmsjax
      >>> tx = rmsjax.leaky_average(0.9, debias=True)
      >>> u, _ = tx.update(jnp.array([5.0]), tx.init(jnp.zeros(1)))
      >>> u
      Array([5.], dtype=float32)

    Reference:
      Zhang, Lipton, Li and Smola, *Dive into Deep Learning*, section 12.6 (leaky averages).
    """
    decay = check.hyperparameter("decay", decay, high=1.0)
    check.check_flag("debias", debias)
    mu_dtype = _state_dtype(state_dtype)

    def init_fn(params):
        return LeakyAverageState(count=zero_count(params), mu=averages.full_like(params, 0.0, mu_dtype))

    def update_fn(updates, state, params=None):
        _check_inputs(
            updates, state, params, expected=LeakyAverageState, who="leaky_average", moment="mu",
            first_moment="mu" if mu_dtype is None else None,
        )
        count = averages.increment_count(state.count)
        mu = averages.update_leaky_average(state.mu, updates, decay, order=1)
        out = averages.bias_correction(mu, decay, count) if debias else mu
        return averages.cast_like(out, updates), LeakyAverageState(count=count, mu=mu)

    return optax.GradientTransformation(init_fn, update_fn)


class MomentumState(NamedTuple):
    """State of :func:`momentum` without ``dampening``: the momentum buffer ``mu``."""

    mu: PyTree


class DampenedMomentumState(NamedTuple):
    """State of :func:`momentum` with a ``dampening`` given (even 0).

    Attributes:
      count: number of updates made (the first step is never dampened, so it is read).
      mu: the momentum buffer.
    """

    count: jax.Array
    mu: PyTree


_moments.declare(MomentumState, mu=_moments.Moment(True, "momentum", 1))
_moments.declare(DampenedMomentumState, mu=_moments.Moment(True, "momentum", 1))

def momentum(
    decay: Scalar, *, nesterov: bool = False, dampening: Scalar | None = None
) -> optax.GradientTransformation:
    r"""Heavy-ball momentum (or Nesterov's look-ahead) on the updates.

    .. math::

       b_1 = g_1, \quad b_t = \mu b_{t-1} + (1-d)\, g_t, \qquad
       u_t = b_t \ \text{ or, with } \texttt{nesterov},\ g_t + \mu b_t

    where :math:`\mu` is ``decay`` and :math:`d` is ``dampening``. Without ``dampening``
    this is the usual buffer started from zero (``optax.trace``).

    Args:
      decay: :math:`\mu`, the momentum coefficient, in [0, 1).
      nesterov: return Nesterov's look-ahead :math:`g_t + \mu b_t`.
      dampening: :math:`d`, in [0, 1], or ``None`` (the default: no dampening and no step
        counter). Any value given, even 0, keeps a step counter, because the first step is
        never dampened (PyTorch's rule): the state is then a :class:`DampenedMomentumState`
        instead of a :class:`MomentumState`, so that ``optax.inject_hyperparams`` (which
        turns a given 0 into an array) gives the same state as the plain call.

    Example:
      >>> import jax.numpy as jnp, rmsjax
      >>> tx = rmsjax.momentum(0.9)
      >>> state = tx.init(jnp.zeros(1))
      >>> u, state = tx.update(jnp.array([1.0]), state)
      >>> u, state = tx.update(jnp.array([1.0]), state)
      >>> u
      Array([1.9], dtype=float32)

    Warning:
      In ``rmsjax.rmsprop`` and PyTorch the learning rate multiplies the buffer from
      outside; Keras and TF1 put it inside (:math:`b_t = \mu b_{t-1} + \eta_t g_t`), which
      differs when the learning rate changes over time.

    Reference:
      Polyak, *Some methods of speeding up the convergence of iteration methods*, 1964;
      Sutskever, Martens, Dahl and Hinton, *On the importance of initialization and
      momentum in deep learning*, ICML 2013.
    """
    decay = check.hyperparameter("decay", decay, high=1.0)
    check.check_flag("nesterov", nesterov)
    if dampening is not None:
        dampening = check.hyperparameter("dampening", dampening, high=1.0, high_open=False)
    counts = dampening is not None
    expected = DampenedMomentumState if counts else MomentumState

    def init_fn(params):
        mu = averages.full_like(params, 0.0)
        if counts:
            return DampenedMomentumState(count=zero_count(params), mu=mu)
        return MomentumState(mu=mu)

    def update_fn(updates, state, params=None):
        _check_inputs(
            updates, state, params, expected=expected, who="momentum", moment="mu", first_moment="mu"
        )
        count = state[0] if counts else None  # DampenedMomentumState.count
        mu = averages.update_momentum_buffer(state.mu, updates, decay, dampening, count)
        out = averages.add_scaled(updates, mu, decay) if nesterov else averages.cast_like(mu, updates)
        if count is not None:
            return out, DampenedMomentumState(count=averages.increment_count(count), mu=mu)
        return out, MomentumState(mu=mu)

    return optax.GradientTransformation(init_fn, update_fn)


class ScaleByLearningRateState(NamedTuple):
    """State of :func:`scale_by_learning_rate` for a constant rate (a number or an array).

    Attributes:
      rate: the rate the *next* update will apply (float32), for reading. Not named
        ``learning_rate``, so that it never shadows the hyperparameter of that name that
        ``optax.inject_hyperparams`` keeps (``optax.tree.get(state, "learning_rate")``).
    """

    rate: jax.Array


class ScaleByScheduleState(NamedTuple):
    """State of :func:`scale_by_learning_rate` for a schedule.

    Attributes:
      count: number of updates made (the step the schedule is evaluated at).
      rate: the rate the *next* update will apply, ``schedule(count)`` (float32).
    """

    count: jax.Array
    rate: jax.Array


def rate_at(learning_rate: ScalarOrSchedule, count: Any) -> Any:
    """The learning rate at ``count``: a schedule is called, a number or array returned as is."""
    if check.is_schedule(learning_rate):
        rate = learning_rate(count)
        if not isinstance(rate, (int, float, np.integer, np.floating, np.ndarray, jax.Array)) or isinstance(
            rate, bool
        ):
            raise TypeError(
                f"the learning_rate schedule returned {rate!r} of type {type(rate).__name__} at "
                "a step count; a schedule must return a real number or a 0-d array"
            )
        if np.shape(rate) != ():
            raise ValueError(
                f"the learning_rate schedule returned an array of shape {np.shape(rate)}; a "
                "schedule must return a scalar"
            )
        dtype = getattr(rate, "dtype", None)
        if dtype is not None and not jnp.issubdtype(dtype, jnp.number):
            raise TypeError(
                f"the learning_rate schedule returned an array of dtype {dtype}; "
                "a schedule must return a real number or a 0-d array"
            )
        return rate
    return learning_rate


def _readable_rate(rate: Any) -> jax.Array:
    rate = jnp.asarray(rate)
    return (jnp.real(rate) if jnp.iscomplexobj(rate) else rate).astype(jnp.float32)


def scale_by_learning_rate(
    learning_rate: ScalarOrSchedule, *, flip_sign: bool = True
) -> optax.GradientTransformation:
    r"""The learning-rate step :math:`u_t = -\eta_t\, g_t`.

    Args:
      learning_rate: :math:`\eta`: a number, a jax array, or a schedule ``f(step)`` with
        ``step`` counting updates from 0.
      flip_sign: negate, so that ``optax.apply_updates`` descends (the default).

    The state records, for reading, the rate the next update will use: a
    :class:`ScaleByLearningRateState` for a constant rate (no step counter: one compiled
    kernel less, as in ``optax.sgd``), a :class:`ScaleByScheduleState` (with the step
    count the schedule is evaluated at) for a schedule.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from rmsjax.transforms import scale_by_learning_rate
      >>> tx = scale_by_learning_rate(optax.exponential_decay(0.1, 1, decay_rate=0.5))
      >>> u, state = tx.update(jnp.array([1.0]), tx.init(jnp.zeros(1)))
      >>> u, state.rate
      (Array([-0.1], dtype=float32), Array(0.05, dtype=float32))
    """
    scheduled = check.is_schedule(learning_rate)
    if scheduled:
        check.check_learning_rate("learning_rate", learning_rate)
    else:
        learning_rate = check.hyperparameter("learning_rate", learning_rate)
    check.check_flag("flip_sign", flip_sign)
    sign = -1.0 if flip_sign else 1.0
    expected = ScaleByScheduleState if scheduled else ScaleByLearningRateState

    def init_fn(params):
        if scheduled:
            count = zero_count(params)
            rate = averages.replicated_like(_readable_rate(rate_at(learning_rate, count)), params)
            return ScaleByScheduleState(count, rate)
        return ScaleByLearningRateState(averages.replicated_like(_readable_rate(learning_rate), params))

    def update_fn(updates, state, params=None):
        check.check_state_type(state, expected, "scale_by_learning_rate")
        if params is not None:  # the only tree to check against: this state has none
            check.check_real_for_real(updates, params, what="params", who="scale_by_learning_rate")
            check.check_trees_match(
                updates, params, what="params", who="scale_by_learning_rate", dtypes="kind"
            )
        count = state.count if scheduled else None
        rate = rate_at(learning_rate, count)
        # A number is negated on the host (one constant per leaf); an array once per update.
        step = sign * rate if check.is_concrete(rate) else sign * jnp.asarray(rate)
        updates = averages.scale(updates, step)
        if scheduled:
            count = averages.increment_count(state.count)
            return updates, ScaleByScheduleState(count, _readable_rate(rate_at(learning_rate, count)))
        return updates, ScaleByLearningRateState(_readable_rate(rate))

    return optax.GradientTransformation(init_fn, update_fn)


class AbsentState(optax.EmptyState):
    """State of an absent optional part of a chain (:func:`absent`): an ``optax.EmptyState``
    that also declares that its part hands the updates on unchanged."""

    __slots__ = ()


_moments.declare_passes_input(AbsentState)


def absent() -> optax.GradientTransformation:
    """The slot of an optional part that is not there (its argument is ``None``): the updates
    pass unchanged, as through ``optax.identity()``.

    Its state, :class:`AbsentState`, is an ``optax.EmptyState`` that says so, which lets
    :func:`rmsjax.quantized` see that the moments after it receive the chain's own input
    (and bound their 8-bit blocks from the gradient instead of reducing the new moments).
    """

    def init_fn(params):
        del params
        return AbsentState()

    def update_fn(updates, state, params=None):
        del params
        check.check_state_type(state, optax.EmptyState, "absent")
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def add_decayed_weights(weight_decay: Scalar, mask: MaskOrFn = None) -> optax.GradientTransformation:
    r"""Adds :math:`\lambda\,\theta` to the updates (L2 decay, or decoupled if placed after scaling).

    Placed before an adaptive scaling, this is L2 regularisation added to the gradient
    (``rmsjax.rmsprop``, PyTorch's ``weight_decay``); placed after it and before the
    learning rate, it is decoupled weight decay (``rmsjax.adamw``).

    Args:
      weight_decay: :math:`\lambda`, >= 0.
      mask: a tree of bools shaped like the parameters (or a function of the parameters
        returning one); decay applies only where it is true.
    """
    weight_decay = check.hyperparameter("weight_decay", weight_decay)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        check.check_state_type(state, optax.EmptyState, "add_decayed_weights")
        check.require_params(params, "weight decay")
        check.check_trees_match(updates, params, what="params", who="add_decayed_weights", dtypes="kind")
        return averages.add_scaled(updates, params, weight_decay), state

    tx = optax.GradientTransformation(init_fn, update_fn)
    return tx if mask is None else optax.masked(tx, mask)


def upgrade_0_2_state_dict(state_dict: Any) -> Any:
    """A state dict of an rmsjax 0.2 optimizer state, in the 0.3 layout.

    0.3 has no ``None`` placeholder fields and renamed the learning-rate step's field:

    * ``MomentumState(count=None, mu)`` (0.2, no dampening) is ``MomentumState(mu)``;
    * ``ScaleByLearningRateState(count=None, learning_rate)`` (0.2, a constant rate) is
      ``ScaleByLearningRateState(rate)``, and with a schedule's count it is
      ``ScaleByScheduleState(count, rate)``.

    ``state_dict`` is what ``flax.serialization.msgpack_restore`` (or ``to_state_dict``)
    gives for a 0.2 state; restore with ``flax.serialization.from_state_dict(tx.init(params),
    upgrade_0_2_state_dict(state_dict))``. Other nodes are returned unchanged. A 0.2
    optimizer built with a momentum or weight decay of exactly 0 had no such part; build the
    0.3 one with ``None`` there (the default) to load it.

    Example:
      >>> import jax.numpy as jnp
      >>> upgrade_0_2_state_dict({"0": {"count": None, "learning_rate": jnp.float32(0.1)}})
      {'0': {'rate': Array(0.1, dtype=float32)}}
    """
    if isinstance(state_dict, dict):
        keys = set(state_dict)
        if keys == {"count", "learning_rate"}:
            rate = state_dict["learning_rate"]
            if state_dict["count"] is None:
                return {"rate": rate}
            return {"count": state_dict["count"], "rate": rate}
        if keys == {"count", "mu"} and state_dict["count"] is None:
            return {"mu": upgrade_0_2_state_dict(state_dict["mu"])}
        return {key: upgrade_0_2_state_dict(value) for key, value in state_dict.items()}
    return state_dict
