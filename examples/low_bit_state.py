"""Low-bit optimizer state: the same optimizer with float32, 8-bit and 4-bit state, side by side.

Three tasks, each trained three times (float32 state, ``rmsjax.quantized(tx)`` and
``rmsjax.quantized(tx, bits=4)``) from the same initialisation on the same batches:

* ``classifier``: a Flax NNX perceptron (64 -> 256 -> 256 -> 10) on scikit-learn's 8x8 digits,
  Adam; reports the final training loss and the test accuracy;
* ``lm``: a small Flax NNX transformer language model (2 layers, width 64, 4 heads, context 64)
  on the characters of the Markdown files shipped in this repository (``docs/*.md``,
  ``README.md``), Adam; reports the final training loss (mean of the last 20 steps);
* ``quadratic``: d2l's ill-conditioned quadratic ``0.1 x1**2 + 2 x2**2``, 8192 independent
  copies (so the state leaf is large enough to be quantized), RMSprop with d2l's settings
  (lr 0.4, decay 0.9, eps 1e-6 inside the square root); reports the final loss.

Writes ``low_bit_loss.png`` (loss curves) and ``low_bit_results.json`` to ``--out`` and prints
a table.

    python examples/low_bit_state.py                 # all tasks, full length (a few minutes on CPU)
    python examples/low_bit_state.py --steps-scale 0.05 --tasks classifier   # a quick look
    python examples/low_bit_state.py --steps lm=400 quadratic=200            # per-task lengths
"""

from __future__ import annotations

import argparse
import json
import os
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
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import rmsjax  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"float32": None, "8-bit": 8, "4-bit": 4}


def with_state(tx: optax.GradientTransformation, bits: int | None) -> optax.GradientTransformation:
    return tx if bits is None else rmsjax.quantized(tx, bits=bits)


def _train(model_fn, tx, batches, loss_fn):
    model = model_fn()
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, batch)) for batch in batches]
    return model, losses


# --------------------------------------------------------------------------- classifier


class MLP(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(64, 256, rngs=rngs)
        self.l2 = nnx.Linear(256, 256, rngs=rngs)
        self.l3 = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x):
        return self.l3(jax.nn.relu(self.l2(jax.nn.relu(self.l1(x)))))


def classifier(steps: int, bits: int | None) -> dict:
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(steps):
        idx = rng.integers(0, len(x_tr), 128)
        batches.append((jnp.asarray(x_tr[idx]), jnp.asarray(y_tr[idx])))

    def loss_fn(model, batch):
        xb, yb = batch
        return optax.softmax_cross_entropy_with_integer_labels(model(xb), yb).mean()

    model, losses = _train(lambda: MLP(rngs=nnx.Rngs(0)), with_state(rmsjax.adam(1e-3), bits), batches,
                           loss_fn)
    accuracy = float(jnp.mean(jnp.argmax(model(jnp.asarray(x_te)), -1) == jnp.asarray(y_te)))
    return {"losses": losses, "final_loss": float(np.mean(losses[-20:])), "test_accuracy": accuracy}


# --------------------------------------------------------------------------- language model


def corpus() -> str:
    files = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
    return "\n".join(f.read_text(encoding="utf-8") for f in files if f.exists())


class Block(nnx.Module):
    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(width, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, width, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, 4 * width, rngs=rngs)
        self.down = nnx.Linear(4 * width, width, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class TinyLM(nnx.Module):
    def __init__(self, vocab: int, context: int, width: int = 64, heads: int = 4, layers: int = 2, *,
                 rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, width, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (context, width)))
        self.blocks = nnx.List([Block(width, heads, rngs=rngs) for _ in range(layers)])
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, vocab, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[-1]]
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))


def lm(steps: int, bits: int | None, context: int = 64, batch: int = 16) -> dict:
    text = corpus()
    chars = sorted(set(text))
    data = np.asarray([chars.index(c) for c in text], np.int32)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(steps):
        starts = rng.integers(0, len(data) - context - 1, batch)
        tokens = np.stack([data[s : s + context + 1] for s in starts])
        batches.append(jnp.asarray(tokens))

    def loss_fn(model, tokens):
        logits = model(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    _, losses = _train(lambda: TinyLM(len(chars), context, rngs=nnx.Rngs(0)),
                       with_state(rmsjax.adam(3e-3), bits), batches, loss_fn)
    return {"losses": losses, "final_loss": float(np.mean(losses[-20:])), "vocab": len(chars)}


# --------------------------------------------------------------------------- d2l quadratic


def quadratic(steps: int, bits: int | None, copies: int = 8192) -> dict:
    curvature = jnp.tile(jnp.asarray([0.1, 2.0], jnp.float32), copies)
    x = jnp.tile(jnp.asarray([-5.0, -2.0], jnp.float32), copies)
    x = x * (1.0 + 0.5 * jnp.sin(jnp.arange(2 * copies, dtype=jnp.float32)))  # distinct starts

    def f(x):
        return jnp.sum(curvature * x * x) / copies

    tx = with_state(rmsjax.rmsprop(0.4, decay=0.9, eps=1e-6, eps_in_sqrt=True), bits)
    state = tx.init(x)

    @jax.jit
    def step(x, state):
        loss, g = jax.value_and_grad(f)(x)
        u, state = tx.update(g * copies, state, x)  # per-copy gradient, as in d2l
        return optax.apply_updates(x, u), state, loss

    losses = []
    for _ in range(steps):
        x, state, loss = step(x, state)
        losses.append(float(loss))
    return {"losses": losses, "final_loss": float(np.mean(losses[-10:]))}


TASKS = {"classifier": (classifier, 600), "lm": (lm, 600), "quadratic": (quadratic, 100)}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every task's steps")
    parser.add_argument("--steps", nargs="*", default=[], metavar="TASK=N",
                        help="set one task's steps (overrides --steps-scale), e.g. lm=400")
    parser.add_argument("--out", default=str(ROOT / "docs" / "img"))
    args = parser.parse_args(argv)
    fixed = {}
    for item in args.steps:
        task, _, n = item.partition("=")
        if task not in TASKS or not n.isdigit():
            parser.error(f"--steps takes TASK=N with TASK in {sorted(TASKS)}, got {item!r}")
        fixed[task] = int(n)
    results: dict = {}
    for task in args.tasks:
        fn, steps = TASKS[task]
        steps = fixed.get(task, max(2, int(steps * args.steps_scale)))
        results[task] = {name: fn(steps, bits) for name, bits in VARIANTS.items()}
        base = results[task]["float32"]["final_loss"]
        for name, r in results[task].items():
            r["loss_ratio"] = r["final_loss"] / base
            acc = f"  test accuracy {r['test_accuracy']:.4f}" if "test_accuracy" in r else ""
            print(f"{task:10s} {name:8s} steps {len(r['losses'])} final loss {r['final_loss']:.6g} "
                  f"({r['loss_ratio']:.3f}x){acc}", flush=True)
            assert all(np.isfinite(r["losses"])), (task, name)
    os.makedirs(args.out, exist_ok=True)
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8), squeeze=False)
    for ax, (task, per) in zip(axes[0], results.items()):
        for name, r in per.items():
            ax.plot(r["losses"], label=name, lw=1.2 if name == "float32" else 0.9)
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    figure = os.path.join(args.out, "low_bit_loss.png")
    fig.savefig(figure, dpi=110)
    plt.close(fig)
    summary = {task: {name: {k: v for k, v in r.items() if k != "losses"} for name, r in per.items()}
               for task, per in results.items()}
    with open(os.path.join(args.out, "low_bit_results.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    return {"figure": figure, "results": summary}


if __name__ == "__main__":
    main()
