"""Documented usage that a type checker must accept (pyright checks this file; see
[tool.pyright] in pyproject.toml). It also runs: `python .ci/typing_usage.py`.

Every line here is a call the documentation shows. A factory whose parameters are left
unannotated gets its types inferred from the defaults (``lr=1e-2`` reads as ``float``), and
then passing a schedule, as the docs do, is reported as an error in users' code.
"""

import jax.numpy as jnp
import optax

import rmsjax
from rmsjax.compat import keras, tf1, torch

schedule = optax.linear_schedule(0.1, 0.01, transition_steps=100)

transformations: list[optax.GradientTransformation] = [
    rmsjax.rmsprop(schedule),
    rmsjax.adam(schedule),
    rmsjax.packed(rmsjax.rmsprop(0.1)),
    torch.RMSprop(lr=schedule),
    torch.Adagrad(lr=schedule),
    torch.Adam(lr=schedule, betas=(0.9, 0.999)),
    torch.AdamW(lr=schedule),
    torch.Adadelta(lr=schedule),
    torch.SGD(lr=schedule, momentum=0.9, nesterov=True),
    keras.RMSprop(learning_rate=schedule),
    keras.Adagrad(learning_rate=schedule),
    keras.Adam(learning_rate=schedule),
    keras.Adadelta(learning_rate=schedule),
    tf1.RMSPropOptimizer(schedule),
]

params = {"w": jnp.ones(3)}
tx = rmsjax.rmsprop(schedule)
state = tx.init(params)
updates, state = tx.update(params, state, params)
rate: jnp.ndarray = rmsjax.learning_rate(state)
step: jnp.ndarray = rmsjax.step_count(state)
print(f"{len(transformations)} transformations built; learning rate {float(rate):.4f} at step {int(step)}")
