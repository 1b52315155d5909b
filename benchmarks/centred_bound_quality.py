"""Centred RMSprop with low-bit state against float32 state: a check of the 8-bit bound.

Centred RMSprop stores its second moment as the variance ``nu - mu**2``; at 8 bits its block
scales come from the declared bound ``max(M_var, (M_g + M_mu)**2)`` (``rmsjax._moments.bound``).
This trains a small MLP (64 -> 256 -> 10, ReLU) on a fixed synthetic classification task
(2048 examples, batches of 128, 400 steps) with centred RMSprop, with and without momentum,
for three seeds, and prints the final training loss of 8- and 4-bit state as a ratio to
float32 state's (same initialisation, same batches). ``--json`` writes the table.

    python benchmarks/centred_bound_quality.py
    python benchmarks/centred_bound_quality.py --steps 50 --seeds 1 --json /tmp/c.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rmsjax

OPTIMIZERS = {
    "centred RMSprop": lambda: rmsjax.rmsprop(1e-3, centered=True),
    "centred RMSprop + momentum": lambda: rmsjax.rmsprop(3e-4, centered=True, momentum=0.9),
}


def final_loss(make, bits: int, seed: int, steps: int) -> float:
    """Training loss on the whole set after ``steps`` steps (``bits=32``: float32 state)."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(2048, 64)), jnp.float32)
    teacher = rng.normal(size=(64, 10))
    y = jnp.asarray(np.argmax(np.asarray(x) @ teacher + 0.5 * rng.normal(size=(2048, 10)), axis=1))
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    params = {"w1": jax.random.normal(k1, (64, 256)) * 0.1, "b1": jnp.zeros(256),
              "w2": jax.random.normal(k2, (256, 10)) * 0.1, "b2": jnp.zeros(10)}
    tx = make() if bits == 32 else rmsjax.quantized(make(), bits=bits, min_size=0)
    state = tx.init(params)

    def loss(p, xb, yb):
        hidden = jax.nn.relu(xb @ p["w1"] + p["b1"])
        return optax.softmax_cross_entropy_with_integer_labels(hidden @ p["w2"] + p["b2"], yb).mean()

    @jax.jit
    def step(p, s, i):
        batch = jax.random.choice(jax.random.PRNGKey(i), x.shape[0], (128,))
        grads = jax.grad(loss)(p, x[batch], y[batch])
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    for i in range(steps):
        params, state = step(params, state, i)
    return float(loss(params, x, y))


def main(argv=None):
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    rows = []
    for name, make in OPTIMIZERS.items():
        for seed in range(args.seeds):
            base = final_loss(make, 32, seed, args.steps)
            row = {"optimizer": name, "seed": seed, "float32_loss": base}
            for bits in (8, 4):
                row[f"ratio_{bits}"] = final_loss(make, bits, seed, args.steps) / base
            rows.append(row)
            print(f"{name:28s} seed {seed}  float32 {base:.4g}  8-bit {row['ratio_8']:.3f}x  "
                  f"4-bit {row['ratio_4']:.3f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"jax": jax.__version__, "steps": args.steps, "rows": rows},
                                              indent=1))
    return rows


if __name__ == "__main__":
    main()
