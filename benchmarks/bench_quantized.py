"""Low-bit optimizer state (rmsjax.quantized): state bytes per parameter and step time.

Memory: state bytes per parameter on a large tree (from ``jax.eval_shape`` of ``init``, so
nothing is allocated), float32 state against 8-bit and 4-bit.

Speed: one jitted update (state donated) of one large leaf, float32 state and quantized
state side by side in one process, trials interleaved, medians reported; default XLA flags.

    python benchmarks/bench_quantized.py [--size 2048] [--trials 15] [--out benchmarks/results]

Writes ``bench_quantized.json`` and ``bench_quantized.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import rmsjax

OPTIMIZERS = {
    "adam": lambda: rmsjax.adam(1e-3),
    "rmsprop": lambda: rmsjax.rmsprop(1e-3),
    "adagrad": lambda: rmsjax.adagrad(1e-2),
}


def large_tree():
    """A transformer-block-like tree: ~25 M parameters, a few small leaves."""
    return {
        "embed": jax.ShapeDtypeStruct((8192, 1024), jnp.float32),
        "attn": {"qkv": jax.ShapeDtypeStruct((1024, 3072), jnp.float32),
                 "out": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)},
        "mlp": {"up": jax.ShapeDtypeStruct((1024, 4096), jnp.float32),
                "down": jax.ShapeDtypeStruct((4096, 1024), jnp.float32),
                "bias": jax.ShapeDtypeStruct((4096,), jnp.float32)},
        "norm": jax.ShapeDtypeStruct((1024,), jnp.float32),
    }


def state_bytes(tx, params) -> int:
    state = jax.eval_shape(tx.init, params)
    return sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(state))


def memory_rows():
    params = large_tree()
    n = sum(p.size for p in jax.tree.leaves(params))
    rows = []
    for name, make in OPTIMIZERS.items():
        for bits in (32, 8, 4):
            tx = make() if bits == 32 else rmsjax.quantized(make(), bits=bits)
            rows.append({"optimizer": name, "bits": bits, "parameters": n,
                         "bytes_per_param": state_bytes(tx, params) / n})
    return rows


def speed_rows(size: int, trials: int):
    params = {"w": jnp.ones((size, size), jnp.float32)}
    grads = {"w": jax.random.normal(jax.random.key(0), (size, size), jnp.float32)}
    rows = []
    for name, make in OPTIMIZERS.items():
        cases = {bits: (make() if bits == 32 else rmsjax.quantized(make(), bits=bits)) for bits in (32, 8, 4)}
        steps, states, times = {}, {}, {bits: [] for bits in cases}
        for bits, tx in cases.items():
            steps[bits] = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p), donate_argnums=1)
            states[bits] = tx.init(params)
            out, states[bits] = steps[bits](grads, states[bits], params)  # compile and warm up
            jax.block_until_ready((out, states[bits]))
        for _ in range(trials):  # interleaved, so that load on the machine hits all alike
            for bits in cases:
                start = time.perf_counter()
                out, states[bits] = steps[bits](grads, states[bits], params)
                jax.block_until_ready((out, states[bits]))
                times[bits].append(time.perf_counter() - start)
        base = float(np.median(times[32]))
        for bits in cases:
            median = float(np.median(times[bits]))
            rows.append({"optimizer": name, "bits": bits, "elements": size * size,
                         "median_ms": 1e3 * median, "ratio": median / base})
    return rows


def markdown(result) -> str:
    lines = ["# bench_quantized", "", f"Backend: {result['backend']} ({result['device']}), "
             f"jax {result['jax']}, default XLA flags. No GPU was available for this run.", "",
             "## State bytes per parameter", "",
             f"Tree of {result['memory'][0]['parameters']:,} parameters (see `large_tree`).", "",
             "| optimizer | float32 | 8-bit | 4-bit |", "|---|---|---|---|"]
    for name in OPTIMIZERS:
        row = {r["bits"]: r["bytes_per_param"] for r in result["memory"] if r["optimizer"] == name}
        lines.append(f"| {name} | {row[32]:.3f} | {row[8]:.3f} | {row[4]:.3f} |")
    lines += ["", f"## Step time, one leaf of {result['speed'][0]['elements']:,} elements", "",
              f"Median of {result['trials']} interleaved trials; ratio to the float32-state step.", "",
              "| optimizer | float32 ms | 8-bit ms (ratio) | 4-bit ms (ratio) |", "|---|---|---|---|"]
    for name in OPTIMIZERS:
        row = {r["bits"]: r for r in result["speed"] if r["optimizer"] == name}
        eight, four = row[8], row[4]
        lines.append(f"| {name} | {row[32]['median_ms']:.1f} "
                     f"| {eight['median_ms']:.1f} ({eight['ratio']:.2f}x) "
                     f"| {four['median_ms']:.1f} ({four['ratio']:.2f}x) |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="the leaf is size x size")
    parser.add_argument("--trials", type=int, default=15)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    result = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
              "jax": jax.__version__, "machine": platform.machine(), "trials": args.trials,
              "memory": memory_rows(), "speed": speed_rows(args.size, args.trials)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_quantized.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (out / "bench_quantized.md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
