"""Quality of bfloat16 parameters: float32 against bfloat16 rounded three ways, same batches.

Two tasks of ``examples/low_bit_state.py`` (the digits classifier and the small transformer
language model), Adam, each trained from the same initialisation on the same batches with

* ``float32``: float32 parameters, float32 state (the reference);
* ``float32 + 8-bit state``: float32 parameters, ``rmsjax.quantized`` state (what the state's
  8 bits cost alone);
* ``bf16 nearest``: bfloat16 parameters, 8-bit state, ``optax.apply_updates`` rounding to
  nearest (the control: updates below half an ulp are lost);
* ``bf16 SR``: ``rmsjax.low_precision(rmsjax.quantized(adam))``, stochastic rounding;
* ``bf16 compensated``: the same with ``compensated=True`` (int8 error record).

The forward pass runs in float32 in every variant (the parameters are cast up inside the
loss), so the differences come from how the parameters are stored and updated only.
Writes JSON (``--json``) and a figure (``--figure``); prints a table.

    python benchmarks/low_memory_quality.py                      # 1000 steps each (minutes)
    python benchmarks/low_memory_quality.py --steps 50 --tasks digits
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import rmsjax  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import low_bit_state as lbs  # noqa: E402

VARIANTS = ("float32", "float32 + 8-bit state", "bf16 nearest", "bf16 SR", "bf16 compensated")


def _optimizer(variant: str, lr: float) -> optax.GradientTransformation:
    if variant == "float32":
        return rmsjax.adam(lr)
    inner = rmsjax.quantized(rmsjax.adam(lr))
    if variant in ("bf16 nearest", "float32 + 8-bit state"):
        return inner
    return rmsjax.low_precision(inner, compensated=variant == "bf16 compensated")


def _digits(steps: int):
    from sklearn.datasets import load_digits  # noqa: PLC0415
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_tr, _, y_tr, _ = train_test_split(x, y, test_size=0.25, random_state=0)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(x_tr), (steps, 128))
    batches = [(x_tr[i], y_tr[i]) for i in idx]
    graphdef, params = nnx.split(lbs.MLP(rngs=nnx.Rngs(0)), nnx.Param)

    def loss_fn(params, batch):
        xb, yb = batch
        model = nnx.merge(graphdef, jax.tree.map(lambda p: p.astype(jnp.float32), params))
        return optax.softmax_cross_entropy_with_integer_labels(model(xb), yb).mean()

    return nnx.as_pure(params), loss_fn, batches, 1e-3


def _lm(steps: int):
    text = lbs.corpus()
    chars = sorted(set(text))
    data = np.asarray([chars.index(c) for c in text], np.int32)
    rng = np.random.default_rng(0)
    context = 64
    starts = rng.integers(0, len(data) - context - 1, (steps, 16))
    batches = [np.stack([data[s: s + context + 1] for s in row]) for row in starts]
    graphdef, params = nnx.split(lbs.TinyLM(len(chars), context, rngs=nnx.Rngs(0)), nnx.Param)

    def loss_fn(params, tokens):
        model = nnx.merge(graphdef, jax.tree.map(lambda p: p.astype(jnp.float32), params))
        logits = model(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return nnx.as_pure(params), loss_fn, batches, 3e-3


TASKS = {"digits": _digits, "lm": _lm}


def run(task: str, variant: str, steps: int) -> list[float]:
    params, loss_fn, batches, lr = TASKS[task](steps)
    if variant.startswith("bf16"):
        params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    tx = _optimizer(variant, lr)
    state = tx.init(params)

    @jax.jit
    def step(params, state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for batch in batches:
        params, state, loss = step(params, state, jax.tree.map(jnp.asarray, batch))
        losses.append(float(loss))
    return losses


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "low_memory_quality.json"))
    parser.add_argument("--figure", default=str(ROOT / "docs" / "img" / "low_memory_quality.png"))
    args = parser.parse_args(argv)
    tail = max(1, min(50, args.steps // 10))
    results: dict = {"steps": args.steps, "final_loss_is": f"mean of the last {tail} training losses",
                     "jax": jax.__version__, "tasks": {}}
    curves: dict = {}
    for task in args.tasks:
        per = {}
        for variant in VARIANTS:
            losses = run(task, variant, args.steps)
            assert np.isfinite(losses).all(), (task, variant)
            per[variant] = losses
        base = float(np.mean(per["float32"][-tail:]))
        results["tasks"][task] = {}
        for variant, losses in per.items():
            final = float(np.mean(losses[-tail:]))
            results["tasks"][task][variant] = {"final_loss": final, "ratio": final / base}
            print(f"{task:7s} {variant:22s} final loss {final:.5f}  ({final / base:.4f}x float32)",
                  flush=True)
        curves[task] = per
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 3.8), squeeze=False)
    for ax, (task, per) in zip(axes[0], curves.items()):
        for variant, losses in per.items():
            k = max(1, len(losses) // 50)
            smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
            ax.plot(np.arange(len(smooth)) + k - 1, smooth, label=variant, lw=1.0)
        ax.set_title(f"{task} (Adam; running mean of {max(1, args.steps // 50)} steps)")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=110)
    plt.close(fig)
    return results


if __name__ == "__main__":
    main()
