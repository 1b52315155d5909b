"""How many float32 elements of rmsjax.adam's updates differ from optax.adam's, step by step.

Run from the repository root: ``PYTHONPATH=$PWD python benchmarks/adam_bits_vs_optax.py``.
Prints, for eager execution, ``jax.jit(tx.update)`` and a jitted train step (update and
apply in one program), the fraction of the 100 000 elements whose update differs, over 10
steps, and the largest difference in ulps. 0.00 everywhere means bit for bit on this backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rmsjax

N, STEPS = 100_000, 10
params = jax.random.normal(jax.random.PRNGKey(0), (N,), jnp.float32)
grads = [jax.random.normal(jax.random.PRNGKey(i + 1), (N,), jnp.float32) for i in range(STEPS)]


def run(tx, mode):
    state, p, out = tx.init(params), params, []

    def step(p, state, g):
        u, state = tx.update(g, state, p)
        return optax.apply_updates(p, u), state, u

    f = {"eager": step, "jit(update)": None, "jit(train step)": jax.jit(step)}[mode]
    update = jax.jit(tx.update)
    for g in grads:
        if f is None:
            u, state = update(g, state, p)
            p = optax.apply_updates(p, u)
        else:
            p, state, u = f(p, state, g)
        out.append(np.asarray(u))
    return out


def ulps(a, b):
    ia, ib = a.view(np.int32).astype(np.int64), b.view(np.int32).astype(np.int64)
    return int(np.max(np.abs(ia - ib)))


print("backend:", jax.default_backend(), "jax", jax.__version__, "optax", optax.__version__)
for name, ours, theirs in [
    ("adam", lambda: rmsjax.adam(1e-3), lambda: optax.adam(1e-3)),
    ("rmsprop", lambda: rmsjax.rmsprop(1e-3, decay=0.9, eps=1e-8), None),
]:
    if theirs is None:
        continue
    for mode in ("eager", "jit(update)", "jit(train step)"):
        a, b = run(ours(), mode), run(theirs(), mode)
        fractions = " ".join(f"{np.mean(x != y):.2f}" for x, y in zip(a, b))
        print(f"{name:8s} {mode:16s} differing fraction per step: {fractions}  max ulps "
              f"{max(ulps(x, y) for x, y in zip(a, b))}")
