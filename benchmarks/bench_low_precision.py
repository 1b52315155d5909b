"""Step time and measured peak device memory: bfloat16 + 8-bit Adam against float32 Adam.

A parameter tree of ``--leaves`` matrices of ``--dim`` x ``--dim`` (default 16 x 8192 x 8192 =
1.07e9 parameters) on one device; each configuration runs in a fresh process (so that the
device's ``peak_bytes_in_use`` is its own):

* ``float32``: float32 parameters and gradients, ``rmsjax.adam`` (float32 state);
* ``bf16_8bit``: bfloat16 parameters and gradients,
  ``rmsjax.low_precision(rmsjax.quantized(rmsjax.adam))``;
* ``bf16_8bit_compensated``: the same with ``compensated=True``.

The step is ``tx.update`` + ``optax.apply_updates``, jitted with the parameters and the state
donated; the gradients are an input (a fixed tree, as a backward pass would leave them).
Reports per configuration: bytes per parameter of parameters + state (from the arrays),
the device's peak bytes in use (``memory_stats()``) per parameter, compile time, and the
median step time over ``--steps`` steps after two warm-up steps. JSON goes to
``$OUT/bench_low_precision.json`` when ``OUT`` is set (and to ``--json`` if given).

    python benchmarks/bench_low_precision.py                 # GPU, ~1B parameters (< 3 min on an H200)
    python benchmarks/bench_low_precision.py --dim 1024 --leaves 4 --steps 3   # CPU smoke run

XLA's constant folding is switched off in the child processes (``--xla_disable_hlo_passes=
constant_folding``): the rounding hash of a leaf's element indices does not depend on the
step, and folding it for 67-million-element leaves takes XLA minutes; ``--keep-folding``
leaves XLA's default.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

CONFIGS = ("float32", "bf16_8bit", "bf16_8bit_compensated")


def _child(config: str, dim: int, leaves: int, steps: int) -> dict:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    import optax  # noqa: PLC0415

    import rmsjax  # noqa: PLC0415

    dtype = jnp.float32 if config == "float32" else jnp.bfloat16
    if config == "float32":
        tx = rmsjax.adam(1e-4)
    else:
        tx = rmsjax.low_precision(rmsjax.quantized(rmsjax.adam(1e-4)),
                                  compensated=config == "bf16_8bit_compensated")
    device = jax.devices()[0]

    @jax.jit
    def make():
        keys = jax.random.split(jax.random.key(0), leaves)
        params = {f"w{i:02d}": (0.02 * jax.random.normal(keys[i], (dim, dim), jnp.float32)).astype(dtype)
                  for i in range(leaves)}
        grads = {k: (1e-3 * jnp.sin(v.astype(jnp.float32) * 100.0)).astype(dtype) for k, v in params.items()}
        return params, grads

    params, grads = make()
    state = jax.jit(tx.init)(params)
    jax.block_until_ready(state)
    count = leaves * dim * dim
    nbytes = lambda t: sum(x.nbytes for x in jax.tree.leaves(t))  # noqa: E731
    held = (nbytes(params) + nbytes(state)) / count

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
    compile_s = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        params, state = compiled(params, state, grads)
        jax.block_until_ready((params, state))
        if i >= 2:
            times.append(time.perf_counter() - start)
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    finite = bool(all(bool(jnp.isfinite(x.astype(jnp.float32)).all()) for x in jax.tree.leaves(params)))
    return {
        "config": config, "device": str(device), "platform": device.platform, "jax": jax.__version__,
        "parameters": count, "params_plus_state_bytes_per_param": held,
        "gradient_bytes_per_param": nbytes(grads) / count,
        "peak_bytes_in_use": peak, "peak_bytes_per_param": None if peak is None else peak / count,
        "temp_bytes_per_param": None if analysis is None else analysis.temp_size_in_bytes / count,
        "compile_s": compile_s, "step_ms_median": 1e3 * float(np.median(times)),
        "step_ms_all": [1e3 * t for t in times], "finite": finite,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--leaves", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--json", default=None)
    parser.add_argument("--keep-folding", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.dim, args.leaves, args.steps)))
        return {}
    env = dict(os.environ)
    if not args.keep_folding:
        flag = "--xla_disable_hlo_passes=constant_folding"
        env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), flag]).strip()
    results = []
    for config in args.configs:
        proc = subprocess.run([sys.executable, __file__, "--child", config, "--dim", str(args.dim),
                               "--leaves", str(args.leaves), "--steps", str(args.steps)],
                              env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            results.append({"config": config, "error": proc.stderr[-3000:]})
            print(config, "FAILED", proc.stderr[-1500:], flush=True)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(row)
        peak = row["peak_bytes_per_param"]
        print(f"{config:24s} params+state {row['params_plus_state_bytes_per_param']:.3f} B/param, "
              f"peak {'n/a' if peak is None else f'{peak:.3f}'} B/param, "
              f"step {row['step_ms_median']:.2f} ms, compile {row['compile_s']:.1f} s", flush=True)
    out = {"dim": args.dim, "leaves": args.leaves, "steps": args.steps, "results": results}
    base = next((r for r in results if r.get("config") == "float32" and "error" not in r), None)
    if base:
        for r in results:
            if "error" not in r:
                r["step_time_vs_float32"] = r["step_ms_median"] / base["step_ms_median"]
                if r["peak_bytes_in_use"] and base["peak_bytes_in_use"]:
                    r["peak_vs_float32"] = r["peak_bytes_in_use"] / base["peak_bytes_in_use"]
    targets = [args.json] if args.json else []
    if os.environ.get("OUT"):
        targets.append(str(Path(os.environ["OUT"]) / "bench_low_precision.json"))
    for target in targets:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
