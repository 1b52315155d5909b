"""Smoke test of an installed rmsjax (run by .ci/run from outside the source tree).

Checks that the import comes from site-packages, that the version agrees with the
distribution's metadata, and that an optimizer, a schedule, packing and the diagnostics
work with only the declared runtime dependencies installed (no flax, no test extras).
"""

import importlib.metadata
import pathlib

import jax
import jax.numpy as jnp
import optax

import rmsjax

here = pathlib.Path(rmsjax.__file__).resolve()
assert "site-packages" in here.parts, f"rmsjax imported from {here}, not from the installed wheel"
assert rmsjax.__version__ == importlib.metadata.version("rmsjax"), rmsjax.__version__

tx = rmsjax.packed(rmsjax.rmsprop(optax.linear_schedule(0.1, 0.01, transition_steps=10), momentum=0.9))
params = {"w": jnp.array([-5.0, -2.0]), "b": jnp.zeros(3)}


def loss(p):
    return 0.1 * p["w"][0] ** 2 + 2.0 * p["w"][1] ** 2 + jnp.sum(p["b"] ** 2)


@jax.jit
def step(p, s):
    updates, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, updates), s


state = tx.init(params)
start = float(loss(params))
for _ in range(20):
    params, state = step(params, state)
assert float(loss(params)) < start, (start, float(loss(params)))
assert int(rmsjax.step_count(state)) == 20
assert abs(float(rmsjax.learning_rate(state)) - 0.01) < 1e-6
final = float(loss(params))
print(f"smoke: rmsjax {rmsjax.__version__} from {here.parent}, loss {start:.3f} -> {final:.3g}: ok")
