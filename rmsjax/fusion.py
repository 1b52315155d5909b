"""An opt-in arrangement of a chain's update for a one-loop step on XLA:CPU.

By default XLA:CPU emits one loop per output of an element-wise computation, so an
optimizer step that writes new parameters and new state reads its inputs once per output.
With multi-output fusion (``XLA_FLAGS=--xla_backend_extra_options=xla_cpu_use_multi_output_fusion``)
it can emit a single loop, but only when the outputs are *siblings*: independent
computations of the same inputs rather than one feeding the next. :func:`one_pass` traces
the update so that they are. Nothing here reads the environment: the wrapper is explicit,
and on other backends or without the flag it only costs compile time.
See ``docs/performance.md`` for the measurements.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.core  # jax deletes its own alias; named here so type checkers see jax.core
import optax

from rmsjax import _validation

__all__ = ["one_pass"]


def one_pass(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` with its update traced as sibling computations (one loop on XLA:CPU).

    The update is traced once for each part of ``inner``'s state that holds arrays (each
    element of a chain's state tuple, or the whole state otherwise) and once for the
    updates: the first from the inputs, every later one from its own copy of the inputs
    behind ``jax.lax.optimization_barrier``; dead-code elimination keeps, from each trace,
    only the computation of its one output. The numbers
    are those of ``inner`` up to where XLA contracts a multiply-add into an FMA. Outside a
    trace (eager calls), or when no leaf is traced, this is ``inner`` itself.

    Worth it only under ``jax.jit`` with a few large leaves and XLA:CPU's multi-output
    fusion: compile time grows with the number of traced copies (one per chain part).

    Args:
      inner: any gradient transformation, typically an rmsjax optimizer.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with ``inner``'s init and state.

    Example:
      >>> import jax, jax.numpy as jnp, rmsjax
      >>> tx = rmsjax.one_pass(rmsjax.rmsprop(0.1))
      >>> params = jnp.ones(3)
      >>> step = jax.jit(lambda g, s, p: tx.update(g, s, p))
      >>> updates, state = step(params, tx.init(params), params)
      >>> updates.round(4)
      Array([-0.3162, -0.3162, -0.3162], dtype=float32)
    """
    _validation.check_transformation("inner", inner, "one_pass")
    inner = optax.with_extra_args_support(inner)

    def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any):
        if not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((updates, state))):
            return inner.update(updates, state, params, **extra_args)

        def run(copy: bool = True):
            inputs = (updates, state, params)
            if copy:
                inputs = jax.lax.optimization_barrier(inputs)
            return inner.update(*inputs, **extra_args)

        if not (isinstance(state, tuple) and not hasattr(state, "_fields")):
            return run()[0], run(False)[1]
        # The first part that holds arrays reads the inputs themselves, every later one a copy.
        parts, copy = [], False
        for i, part in enumerate(state):
            if not jax.tree.leaves(part):
                parts.append(part)
                continue
            parts.append(run(copy)[1][i])  # pyright: ignore[reportIndexIssue]
            copy = True
        return run()[0], tuple(parts)

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)
