"""Eval loss of an lm1b-shaped transformer LM with float32, 8-bit and 4-bit AdamW state (issue 20).

Issue 20 reports that Flax's ``examples/lm1b`` (2 layers x 128, byte-level text, 400 steps) ends
with a 4-bit eval loss 49 % above float32 state's. ``low_bit_lm_quality.py`` trains this repo's
own small LM and does not show it. This script trains a model built the way lm1b's
``TransformerLM`` is built, to see whether its architecture is what 4-bit state trips on:

* pre-LayerNorm decoder blocks, causal self-attention without biases, a ReLU MLP;
* dropout 0.1 on the embeddings, after attention, inside and after the MLP;
* token embeddings initialised from N(0, 1), fixed sinusoidal positions;
* Xavier-uniform kernels, biases initialised from N(0, 1e-6), untied output logits;
* byte-level tokens (vocabulary 256) of the repo's Markdown, context 128, batch 32;
* AdamW b1 0.9, b2 0.98, eps 1e-9, weight decay 0.1, lm1b's warm-up + rsqrt schedule.

Every state starts from the same initialisation and sees the same batches and dropout masks.
Eval loss = mean cross-entropy (nats per byte, no dropout) over fixed held-out windows of the
last 10 % of the text. Prints a table and writes ``lm1b_like_quality.{json,md}`` under ``--out``.

    python benchmarks/lm1b_like_quality.py            # 400 steps, about 7 minutes on 2 cores
    python benchmarks/lm1b_like_quality.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import rmsjax

ROOT = Path(__file__).resolve().parents[1]
for folder in ("examples", "benchmarks"):
    if str(ROOT / folder) not in sys.path:
        sys.path.insert(0, str(ROOT / folder))

import low_bit_lm_quality as quality  # noqa: E402
import low_bit_state as lbs  # noqa: E402

STATES = {"float32": None, "8-bit": {"bits": 8}, "4-bit": {"bits": 4}}
XAVIER = nnx.initializers.xavier_uniform()
TINY = nnx.initializers.normal(1e-6)


def sinusoids(length: int, width: int) -> jax.Array:
    """Fixed position encodings: sines then cosines of geometrically spaced frequencies."""
    position = np.arange(length)[:, None]
    frequency = 1.0 / 10000 ** (2 * np.arange(width // 2)[None] / width)
    return jnp.asarray(np.concatenate([np.sin(position * frequency), np.cos(position * frequency)], -1),
                       jnp.float32)


def dropout(x: jax.Array, key: jax.Array | None, rate: float) -> jax.Array:
    if key is None or rate == 0:
        return x
    return jnp.where(jax.random.bernoulli(key, 1 - rate, x.shape), x / (1 - rate), 0)


class DecoderBlock(nnx.Module):
    def __init__(self, width: int, heads: int, mlp: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(width, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, width, qkv_features=width, kernel_init=XAVIER,
                                           use_bias=False, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, mlp, kernel_init=XAVIER, bias_init=TINY, rngs=rngs)
        self.down = nnx.Linear(mlp, width, kernel_init=XAVIER, bias_init=TINY, rngs=rngs)

    def __call__(self, x, mask, key, rate):
        keys = [None] * 3 if key is None else list(jax.random.split(key, 3))
        x = x + dropout(self.attn(self.norm1(x), mask=mask), keys[0], rate)
        hidden = dropout(jax.nn.relu(self.up(self.norm2(x))), keys[1], rate)
        return x + dropout(self.down(hidden), keys[2], rate)


class Lm1bLikeLM(nnx.Module):
    def __init__(self, vocab: int, context: int, width: int, heads: int, mlp: int, layers: int, *,
                 rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, width, embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
        self.blocks = nnx.List([DecoderBlock(width, heads, mlp, rngs=rngs) for _ in range(layers)])
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.logits = nnx.Linear(width, vocab, kernel_init=XAVIER, bias_init=TINY, rngs=rngs)
        self.positions = nnx.Variable(sinusoids(context, width))  # not a parameter

    def __call__(self, tokens, key=None, rate=0.1):
        n = len(self.blocks) + 1
        keys = [None] * n if key is None else list(jax.random.split(key, n))
        x = dropout(self.embed(tokens) + self.positions[: tokens.shape[-1]], keys[0], rate)
        mask = nnx.make_causal_mask(tokens)
        for block, block_key in zip(self.blocks, keys[1:], strict=True):
            x = block(x, mask, block_key, rate)
        return self.logits(self.norm(x))


def byte_data(steps: int, batch: int, context: int, eval_windows: int):
    """Byte tokens of the repo's Markdown: training batches from the first 90 %, eval windows
    evenly spaced over the last 10 %."""
    data = np.frombuffer(lbs.corpus().encode("utf-8"), np.uint8).astype(np.int32)
    split = int(0.9 * len(data))
    train, held = data[:split], data[split:]
    starts = np.random.default_rng(0).integers(0, len(train) - context - 1, (steps, batch))
    batches = np.stack([np.stack([train[s: s + context + 1] for s in row]) for row in starts])
    eval_starts = np.linspace(0, len(held) - context - 1, eval_windows).astype(np.int64)
    info = {"bytes": int(len(data)), "distinct_bytes": int(len(np.unique(data))), "train_bytes": split}
    return batches, np.stack([held[s: s + context + 1] for s in eval_starts]), info


def train(tx, graphdef, params, rest, batches, eval_tokens, rate, eval_every):
    def loss_fn(params, tokens, key):
        logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1], key, rate)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def step(params, state, tokens, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, key)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    evaluate = jax.jit(lambda params, tokens: loss_fn(params, tokens, None))
    eval_tokens = jnp.asarray(eval_tokens)
    state, start, curve = tx.init(params), time.perf_counter(), []
    for i, tokens in enumerate(batches, start=1):
        params, state, _ = step(params, state, jnp.asarray(tokens), jax.random.fold_in(jax.random.key(1), i))
        if i % eval_every == 0 or i == len(batches):
            curve.append((i, float(evaluate(params, eval_tokens))))
    return {"final_eval_loss": curve[-1][1], "eval_curve": curve, "wall_s": time.perf_counter() - start}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--mlp", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--peak-lr", type=float, default=3.2e-3)
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: steps // 10)")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-windows", type=int, default=128)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 10 steps, batch 4 x 32, 8 eval windows")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.context, args.eval_every, args.eval_windows = 10, 4, 32, 5, 8
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 10)
    batches, eval_tokens, data_info = byte_data(args.steps, args.batch, args.context, args.eval_windows)
    model = Lm1bLikeLM(256, args.context, args.width, args.heads, args.mlp, args.layers, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.as_pure(params)
    n_params = int(sum(p.size for p in jax.tree.leaves(params)))
    schedule = quality.lm1b_schedule(args.peak_lr, warmup)

    runs = {}
    for name, kwargs in STATES.items():
        tx = quality.make_optimizer(kwargs, schedule, args.weight_decay)
        runs[name] = train(tx, graphdef, params, rest, batches, eval_tokens, args.dropout, args.eval_every)
        runs[name]["state_bytes_per_param"] = quality.state_bytes(tx, params) / n_params
        print(f"{name:8s} eval loss {runs[name]['final_eval_loss']:.4f}  "
              f"{runs[name]['state_bytes_per_param']:.3f} B/param  {runs[name]['wall_s']:.0f} s", flush=True)
    base = runs["float32"]["final_eval_loss"]
    lines = ["# lm1b-shaped LM: float32, 8-bit and 4-bit AdamW state", "",
             f"{n_params} parameters ({args.layers} layers, width {args.width}, MLP {args.mlp}, "
             f"{args.heads} heads), byte-level ({data_info['distinct_bytes']} distinct bytes of "
             f"{data_info['bytes']}), batch {args.batch} x {args.context}, {args.steps} steps, dropout "
             f"{args.dropout}; jax {jax.__version__}, {platform.machine()}.", "",
             "| state | held-out eval loss | ratio to float32 | state bytes / param |",
             "|---|---:|---:|---:|"]
    for name, run in runs.items():
        lines.append(f"| {name} | {run['final_eval_loss']:.4f} | {run['final_eval_loss'] / base:.3f} | "
                     f"{run['state_bytes_per_param']:.2f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    result = {"args": vars(args), "warmup": warmup, "params": n_params, "data": data_info, "runs": runs,
              "jax": jax.__version__, "rmsjax": rmsjax.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.quick:
        (out / "lm1b_like_quality.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / "lm1b_like_quality.md").write_text(table)
    return result


if __name__ == "__main__":
    main()
