"""Low-bit optimizer state (rmsjax.quantized): state bytes per parameter and step time.

Memory: state bytes per parameter on a large tree (from ``jax.eval_shape`` of ``init``, so
nothing is allocated), float32 state against 8-bit and 4-bit.

Speed: one jitted update (state donated) of one large leaf, float32 state and quantized
state side by side in one process, trials interleaved, medians of wall-clock and process CPU
time reported; default XLA flags. The previous algorithm (exact block maxima of every new
moment, ``bound_scales=False``) runs alongside as the before/after reference.

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
from rmsjax import _quantization

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


def _case(make, bits, exact):
    if bits == 32:
        return make()
    if exact:  # the previous algorithm: every new moment reduced exactly for its scales
        return _quantization._wrap(make(), bits, _quantization.DEFAULT_BLOCK_SIZE[bits], 4096,
                                   nearest=False, bound_scales=False)
    return rmsjax.quantized(make(), bits=bits)


CASES = ((32, False), (8, False), (4, False), (8, True), (4, True))


def speed_rows(size: int, trials: int, names=tuple(OPTIMIZERS)):
    params = {"w": jnp.ones((size, size), jnp.float32)}
    grads = {"w": jax.random.normal(jax.random.key(0), (size, size), jnp.float32)}
    rows = []
    for name in names:
        make = OPTIMIZERS[name]
        steps, states = {}, {}
        wall, cpu = {case: [] for case in CASES}, {case: [] for case in CASES}
        for case in CASES:
            tx = _case(make, *case)
            steps[case] = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p), donate_argnums=1)
            states[case] = tx.init(params)
            for _ in range(2):  # compile and warm up
                out, states[case] = steps[case](grads, states[case], params)
                jax.block_until_ready((out, states[case]))
        for _ in range(trials):  # interleaved, so that load on the machine hits all alike
            for case in CASES:
                start, start_cpu = time.perf_counter(), time.process_time()
                out, states[case] = steps[case](grads, states[case], params)
                jax.block_until_ready((out, states[case]))
                wall[case].append(time.perf_counter() - start)
                cpu[case].append(time.process_time() - start_cpu)
        base, base_cpu = float(np.median(wall[CASES[0]])), float(np.median(cpu[CASES[0]]))
        for case in CASES:
            median, median_cpu = float(np.median(wall[case])), float(np.median(cpu[case]))
            rows.append({"optimizer": name, "bits": case[0], "exact_scales": case[1],
                         "elements": size * size, "median_ms": 1e3 * median,
                         "ratio": median / base, "cpu_median_ms": 1e3 * median_cpu,
                         "cpu_ratio": median_cpu / base_cpu})
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
              f"Median of {result['trials']} interleaved trials; ratio to the float32-state step, "
              "wall clock and process CPU time (the CPU time is less sensitive to other jobs on "
              "the machine). *exact scales*: the previous algorithm, every new moment reduced "
              "for its block maxima, measured in the same process.", "",
              "| optimizer | float32 ms | 8-bit ms (ratio) | 4-bit ms (ratio) "
              "| 8-bit CPU ratio | 4-bit CPU ratio | exact scales 8-bit (wall / CPU) "
              "| exact scales 4-bit (wall / CPU) |",
              "|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["optimizer"] for r in result["speed"]):
        row = {(r["bits"], r["exact_scales"]): r for r in result["speed"] if r["optimizer"] == name}
        eight, four, e8, e4 = row[8, False], row[4, False], row[8, True], row[4, True]
        lines.append(f"| {name} | {row[32, False]['median_ms']:.1f} "
                     f"| {eight['median_ms']:.1f} ({eight['ratio']:.2f}x) "
                     f"| {four['median_ms']:.1f} ({four['ratio']:.2f}x) "
                     f"| {eight['cpu_ratio']:.2f}x | {four['cpu_ratio']:.2f}x "
                     f"| {e8['ratio']:.2f}x / {e8['cpu_ratio']:.2f}x "
                     f"| {e4['ratio']:.2f}x / {e4['cpu_ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="the leaf is size x size")
    parser.add_argument("--trials", type=int, default=15)
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS),
                        help="optimizers timed (the memory table always has all)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    result = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
              "jax": jax.__version__, "machine": platform.machine(), "trials": args.trials,
              "memory": memory_rows(), "speed": speed_rows(args.size, args.trials, args.optimizers)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_quantized.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (out / "bench_quantized.md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
