"""Keras 3's own pieces, as optax transformations: clipping, EMA, accumulation, Adamax, Nadam.

Each factory here reproduces one step of ``keras.optimizers.Optimizer.apply`` (Keras 3.15,
``keras/src/optimizers/base_optimizer.py`` and the JAX backend's ``JaxOptimizer``) or the
``update_step`` of one Keras optimizer; :mod:`rmsjax.compat.keras` chains them. The leaf
arithmetic uses :mod:`rmsjax.averages` wherever a formula exists there.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rmsjax import _moments, averages, transforms
from rmsjax import _validation as check
from rmsjax.compat import _common as common

PyTree = Any


def _real(value: Any, dtype: Any) -> jax.Array:
    """A hyperparameter as a scalar of the real ``dtype`` (explicit: strict promotion)."""
    return jnp.asarray(value).astype(dtype)


def _opaque(value: Any, dtype: Any) -> jax.Array:
    """A constant divisor hidden from XLA, which would otherwise multiply by its reciprocal
    (rounding differently from Keras's division)."""
    return jax.lax.optimization_barrier(_real(value, dtype))


def _widest(tree: PyTree) -> jnp.dtype:
    """The widest real compute dtype of a tree's leaves (float32 at least)."""
    return common.widest_float(*(averages.compute_dtype(x.dtype) for x in jax.tree.leaves(tree)))


# --------------------------------------------------------------------------- gradients


def _check_gradients(updates: PyTree, params: PyTree, who: str) -> None:
    """At trace time: the gradients match ``params`` (when given) and are floating or complex.

    Checked before a leaf-by-leaf map, so that a mismatch is named as everywhere else in
    rmsjax, not reported by ``jax.tree.map``.
    """
    if params is not None:
        check.check_trees_match(updates, params, what="params", who=who)
    for path, g in jax.tree_util.tree_leaves_with_path(updates):
        dtype = getattr(g, "dtype", None)
        if dtype is not None and not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"{who}: updates{jax.tree_util.keystr(path)} has dtype {dtype}; rmsjax works on "
                "floating or complex leaves"
            )


def _leafwise(leaf: Any, who: str) -> optax.GradientTransformation:
    """A stateless transformation applying ``leaf`` to each gradient (the gradients checked
    first: :func:`_check_gradients`)."""

    def update_fn(updates, state, params=None):
        check.check_state_type(state, optax.EmptyState, who)
        _check_gradients(updates, params, who)
        return jax.tree.map(leaf, updates), optax.EmptyState()

    def init_fn(params):
        del params
        return optax.EmptyState()

    return optax.GradientTransformation(init_fn, update_fn)


def divide_gradients(factor: float) -> optax.GradientTransformation:
    """``g / factor``: Keras's ``loss_scale_factor`` (the loss was multiplied by it)."""

    def leaf(g):
        dtype = averages.compute_dtype(g.dtype)
        return (g.astype(dtype) / _opaque(factor, averages.real_dtype(dtype))).astype(g.dtype)

    return _leafwise(leaf, "loss_scale_factor")


def _unless_off(limit: Any, clipped: PyTree, given: PyTree) -> PyTree:
    """``clipped`` where the clipping ``limit`` is on (``> 0``, as Keras tests it), else
    ``given``. A concrete limit is known to be on here (:func:`common.unless_zero` leaves a
    zero out and validation rejects negatives); a jax array (``optax.inject_hyperparams``)
    is tested in the program, so that an injected 0 turns clipping off as Keras's does."""
    if common.is_concrete(limit):
        return clipped
    on = jnp.asarray(limit) > 0
    return jax.tree.map(lambda c, g: jnp.where(on, c, g), clipped, given)


def clip_by_norm(clipnorm: float) -> optax.GradientTransformation:
    r"""Keras's ``clipnorm``: each leaf rescaled to an L2 norm of at most ``clipnorm``.

    :math:`g \leftarrow g\,c / \max(\lVert g\rVert_2, c)`, leaf by leaf (Keras's
    ``_clip_by_norm``: the product ``g*c`` first, then the division); no clipping for
    ``c <= 0``.
    """

    def leaf(g):
        dtype = averages.compute_dtype(g.dtype)
        rdtype = averages.real_dtype(dtype)
        norm = jnp.sqrt(jnp.sum(averages.squared_magnitude(g)).astype(rdtype))
        c = _real(clipnorm, rdtype)
        clipped = ((g.astype(dtype) * c.astype(dtype)) / jnp.maximum(norm, c).astype(dtype)).astype(g.dtype)
        return _unless_off(clipnorm, clipped, g)

    return _leafwise(leaf, "clipnorm")


def clip_by_global_norm(global_clipnorm: float) -> optax.GradientTransformation:
    r"""Keras's ``global_clipnorm``: the whole tree rescaled to a global norm of at most ``c``.

    :math:`g \leftarrow g \cdot c \min(1/\lVert g\rVert, 1/c)` with the norm over all
    leaves; a non-finite norm makes every update NaN, as in Keras; no clipping for ``c <= 0``.
    """
    concrete = common.is_concrete(global_clipnorm)
    # Keras's Python ``1.0 / clip_norm`` for a number; a jax array's inverse is taken in the
    # program, in the norm's dtype.
    inverse = 1.0 / float(global_clipnorm) if concrete else None

    def clip(updates, params):
        _check_gradients(updates, params, "global_clipnorm")
        leaves = jax.tree.leaves(updates)
        if not leaves:
            return updates
        dtype = _widest(updates)
        squares = jnp.stack([jnp.sum(averages.squared_magnitude(g)).astype(dtype) for g in leaves])
        norm = jnp.sqrt(jnp.sum(squares))
        c = _real(global_clipnorm, dtype)
        limit_inverse = _real(inverse, dtype) if concrete else jnp.ones_like(c) / c
        factor = c * jnp.minimum(jnp.ones_like(norm) / norm, limit_inverse) + (norm - norm)
        return _unless_off(global_clipnorm, averages.scale(updates, factor), updates)

    return optax.stateless(clip)


def clip_by_value(clipvalue: float) -> optax.GradientTransformation:
    """Keras's ``clipvalue``: each element clipped to ``[-clipvalue, clipvalue]`` (no
    clipping for ``clipvalue <= 0``).

    Complex leaves (which Keras does not have) get their real and imaginary parts clipped
    separately.
    """

    def leaf(g):
        v = _real(clipvalue, averages.real_dtype(g.dtype))
        if jnp.iscomplexobj(g):
            clipped = jax.lax.complex(jnp.clip(g.real, -v, v), jnp.clip(g.imag, -v, v)).astype(g.dtype)
        else:
            clipped = jnp.clip(g, -v, v)
        return _unless_off(clipvalue, clipped, g)

    return _leafwise(leaf, "clipvalue")


# --------------------------------------------------------------------------- accumulation


class GradientAccumulationState(NamedTuple):
    """State of :func:`accumulate_gradients`.

    Attributes:
      count: micro-steps made (Keras's ``optimizer._iterations``).
      acc: the sum of the gradients since the last real update.
      inner: the state of the accumulated transformation (changed only on real updates).
    """

    count: jax.Array
    acc: PyTree
    inner: Any


def real_step_rate(learning_rate: Any, steps: int) -> Any:
    """The rate a transformation inside :func:`accumulate_gradients` must use.

    Inside, a schedule is called with the number of real updates ``n`` made so far; Keras
    calls it with the micro-step count at the update, ``n * steps + steps - 1``.
    """
    if check.is_schedule(learning_rate):

        def schedule(count):
            return learning_rate(count * steps + (steps - 1))

        return schedule
    return learning_rate


def accumulate_gradients(inner: optax.GradientTransformation, steps: int) -> optax.GradientTransformation:
    """Keras's ``gradient_accumulation_steps``: ``inner`` runs every ``steps`` micro-steps.

    On micro-steps ``steps - 1, 2*steps - 1, ...`` (counting from 0) ``inner`` receives
    ``(g + acc) / steps``, ``acc`` being the sum of the previous ``steps - 1`` gradients;
    on the others the gradient is added to ``acc`` and the update is zero, ``inner``'s state
    untouched.
    """

    def init_fn(params):
        return GradientAccumulationState(
            count=transforms.zero_count(params),
            acc=averages.full_like(params, 0.0),
            inner=inner.init(params),
        )

    def update_fn(updates, state, params=None, **extra):
        check.check_state_type(state, GradientAccumulationState, "gradient_accumulation_steps")
        check.check_trees_match(updates, state.acc, what="acc", who="gradient_accumulation_steps")
        is_update = (state.count + jnp.ones_like(state.count)) % steps == 0

        def leaf_mean(g, a):
            dtype = averages.common_compute_dtype(g.dtype, a.dtype)
            return ((g.astype(dtype) + a.astype(dtype)) / _opaque(steps, averages.real_dtype(dtype))).astype(
                g.dtype
            )

        def update():
            grads = jax.tree.map(leaf_mean, updates, state.acc)
            out, inner_state = inner.update(grads, state.inner, params, **extra)
            return averages.cast_like(out, updates), inner_state, averages.full_like(state.acc, 0.0)

        def skip():
            acc = jax.tree.map(lambda a, g: (a + g.astype(a.dtype)).astype(a.dtype), state.acc, updates)
            return jax.tree.map(jnp.zeros_like, updates), state.inner, acc

        out, inner_state, acc = jax.lax.cond(is_update, update, skip)
        count = averages.increment_count(state.count)
        return out, GradientAccumulationState(count=count, acc=acc, inner=inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------- EMA


class EmaState(NamedTuple):
    """State of :func:`ema`: Keras's moving average of the parameters (``use_ema=True``).

    Attributes:
      count: updates seen (Keras's ``optimizer._iterations``; micro-steps with accumulation).
      ema: the moving average of the parameters *after* each update, a tree like the params.
    """

    count: jax.Array
    ema: PyTree


def ema(
    momentum: float, overwrite_frequency: int | None, accumulation_steps: int = 1
) -> optax.GradientTransformation:
    r"""Keras's ``use_ema``: a moving average of the parameters, optionally written back.

    With :math:`\theta'_t = \theta_{t-1} + u_t` the parameters after the incoming update and
    :math:`k` Keras's ``iterations`` (the count of real updates with accumulation):

    .. math::

       e_t = \theta'_t \ (k = 0), \qquad e_t = m\, e_{t-1} + (1-m)\, \theta'_t \ (k > 0)

    and every ``overwrite_frequency`` iterations (when :math:`(k+1) \bmod f = 0`) the update
    becomes :math:`e_t - \theta_{t-1}`, so that the parameters take the average's value
    (up to the rounding of that difference and of its addition, in the parameters' dtype:
    Keras assigns the average instead).
    Placed last in a chain; needs ``params``.
    """

    def init_fn(params):
        return EmaState(count=transforms.zero_count(params), ema=averages.full_like(params, 0.0))

    def update_fn(updates, state, params=None):
        check.check_state_type(state, EmaState, "use_ema")
        check.require_params(params, "use_ema")
        check.check_trees_match(updates, params, what="params", who="use_ema", dtypes="kind")
        iterations = state.count // accumulation_steps
        first = iterations == 0
        moved = optax.apply_updates(params, updates)  # pyright: ignore[reportArgumentType]
        averaged = averages.update_leaky_average(state.ema, moved, momentum)
        new = jax.tree.map(lambda a, p, e: jnp.where(first, p.astype(e.dtype), a), averaged, moved, state.ema)
        if overwrite_frequency is not None:
            overwrite = (iterations + jnp.ones_like(iterations)) % overwrite_frequency == 0

            def leaf(u, p, e):
                jump = (e.astype(p.dtype) - p).astype(u.dtype)
                return jnp.where(overwrite, jump, u)

            updates = jax.tree.map(leaf, updates, params, new)
        return updates, EmaState(count=averages.increment_count(state.count), ema=new)

    return optax.GradientTransformation(init_fn, update_fn)


def find_ema(opt_state: Any) -> list[PyTree]:
    """The ``ema`` field of every :class:`EmaState` inside an optimizer state (``optax.tree_utils``)."""
    def in_ema_state(path, value) -> bool:
        del value
        return getattr(path[-1], "tuple_name", None) == EmaState.__name__

    found = optax.tree_utils.tree_get_all_with_path(opt_state, "ema", filtering=in_ema_state)
    return [value for _, value in found]


# --------------------------------------------------------------------------- Adamax, Nadam


class ScaleByAdamaxState(NamedTuple):
    """State of :func:`scale_by_adamax`: count, first moment ``mu``, infinity norm ``nu`` (Keras's ``u``)."""

    count: jax.Array
    mu: PyTree
    nu: PyTree


_moments.declare(ScaleByAdamaxState, mu=_moments.ADAM_FIRST, nu=_moments.Moment(False, "peak", 1))

def scale_by_adamax(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    r"""Keras's Adamax scaling (Kingma and Ba, section 7.1), ``epsilon`` added to ``u``.

    .. math::

       \mu_t = \beta_1 \mu_{t-1} + (1-\beta_1) g_t, \quad
       \nu_t = \max(\beta_2 \nu_{t-1}, |g_t|), \quad
       u_t = \frac{\mu_t}{(1-\beta_1^t)(\nu_t + \epsilon)}
    """

    def init_fn(params):
        return ScaleByAdamaxState(
            count=transforms.zero_count(params),
            mu=averages.full_like(params, 0.0),
            nu=averages.full_like(params, 0.0, real=True),
        )

    def update_fn(updates, state, params=None):
        del params
        check.check_state_type(state, ScaleByAdamaxState, "scale_by_adamax")
        check.check_trees_match(updates, state.nu, what="nu", who="scale_by_adamax")
        count = averages.increment_count(state.count)
        mu = averages.update_leaky_average(state.mu, updates, b1, order=1)

        def norm(u, g):
            magnitude = jnp.abs(g).astype(u.dtype)
            return jnp.maximum(averages.scale(u, b2), magnitude)

        nu = jax.tree.map(norm, state.nu, updates)
        mu_hat = averages.bias_correction(mu, b1, count)

        def step(m, u, g):
            dtype = averages.compute_dtype(m.dtype)
            rdtype = averages.real_dtype(dtype)
            denominator = u.astype(rdtype) + _real(eps, rdtype)
            return (m.astype(dtype) / denominator.astype(dtype)).astype(g.dtype)

        return jax.tree.map(step, mu_hat, nu, updates), ScaleByAdamaxState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


class ScaleByNadamState(NamedTuple):
    r"""State of :func:`scale_by_nadam`.

    Attributes:
      count: updates made.
      mu: first moment.
      nu: second moment.
      mu_product: :math:`\prod_{i \le t} \mu_i`, the product of the momentum schedule
        (Keras's ``u_product``), a scalar.
    """

    count: jax.Array
    mu: PyTree
    nu: PyTree
    mu_product: jax.Array


_moments.declare(ScaleByNadamState, mu=_moments.ADAM_FIRST, nu=_moments.SECOND)

def _momentum_schedule(b1: Any, t: jax.Array) -> jax.Array:
    r"""Dozat's :math:`\mu_t = \beta_1 (1 - \tfrac12 0.96^{t})`, in ``t``'s dtype."""
    half = _real(0.5, t.dtype)
    return _real(b1, t.dtype) * (jnp.ones_like(t) - half * _real(0.96, t.dtype) ** t)


def scale_by_nadam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    r"""Keras's Nadam scaling, with Dozat's momentum schedule :math:`\mu_t`.

    .. math::

       \mu_t = \beta_1(1 - \tfrac12 0.96^t), \quad \Pi_t = \Pi_{t-1}\mu_t, \quad
       \hat m_t = \frac{\mu_{t+1} m_t}{1 - \Pi_t \mu_{t+1}} + \frac{(1-\mu_t) g_t}{1-\Pi_t},
       \quad u_t = \frac{\hat m_t}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon}

    with :math:`m_t, v_t` the leaky averages of :math:`g_t, g_t^2` and :math:`\Pi_0 = 1`.
    """

    def init_fn(params):
        dtype = _widest(params)
        product = averages.replicated_like(jnp.ones((), dtype), params)
        return ScaleByNadamState(
            count=transforms.zero_count(params),
            mu=averages.full_like(params, 0.0),
            nu=averages.full_like(params, 0.0, real=True),
            mu_product=product,
        )

    def update_fn(updates, state, params=None):
        del params
        check.check_state_type(state, ScaleByNadamState, "scale_by_nadam")
        check.check_trees_match(updates, state.nu, what="nu", who="scale_by_nadam")
        count = averages.increment_count(state.count)
        dtype = state.mu_product.dtype
        t = count.astype(dtype)
        mu_t = _momentum_schedule(b1, t)
        mu_next = _momentum_schedule(b1, t + jnp.ones_like(t))
        # Keras's order: (u_product * beta_1) * (1 - 0.5 * 0.96**t).
        half = _real(0.5, dtype)
        product = state.mu_product * _real(b1, dtype) * (jnp.ones_like(t) - half * _real(0.96, dtype) ** t)
        product_next = product * mu_next
        one = jnp.ones_like(t)
        mu = averages.update_leaky_average(state.mu, updates, b1, order=1)
        nu = averages.update_leaky_average(state.nu, updates, b2, order=2)
        mu_hat = averages.add_scaled(
            averages.scale(mu, mu_next / (one - product_next)),
            averages.cast_like(updates, mu),
            (one - mu_t) / (one - product),
        )
        nu_hat = averages.bias_correction(nu, b2, count)
        steps = averages.cast_like(averages.divide_by_root(mu_hat, nu_hat, eps=eps), updates)
        return steps, ScaleByNadamState(count=count, mu=mu, nu=nu, mu_product=product)

    return optax.GradientTransformation(init_fn, update_fn)
