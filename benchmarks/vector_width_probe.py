"""XLA:CPU's vector width and the low-bit train step: 256-bit (XLA's default) against 512-bit.

Every step of ``benchmarks/bench_quantized.py`` (update + apply in one ``jax.jit``,
parameters and state donated) compiled twice, with and without
``xla_cpu_prefer_vector_width=512``, both in place (its ``IN_PLACE`` option) and both without
it: float32, 8-bit and 4-bit state of Adam, RMSprop and AdaGrad, all in one process, trials
interleaved, medians in milliseconds. The gain of the wider vectors is each pair's ratio.

    python benchmarks/vector_width_probe.py                   # 4096 x 4096, 9 trials
    python benchmarks/vector_width_probe.py --shape 20e6 --trials 7

Writes ``vector_width_probe.json`` to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quantized as bench  # noqa: E402

WIDE = {"xla_cpu_prefer_vector_width": 512}


def compile_options(in_place: bool, wide: bool) -> dict | None:
    return {**(bench.IN_PLACE if in_place else {}), **(WIDE if wide else {})} or None


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--shape", default="4096x4096")
    parser.add_argument("--optimizers", default="adam,rmsprop,adagrad")
    parser.add_argument("--bits", default="32,8,4")
    parser.add_argument("--trials", type=int, default=9)
    parser.add_argument("--steps", type=int, default=3, help="steps per trial")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    shape = bench.parse_shape(args.shape)
    grads = {"w": jax.numpy.asarray(np.random.default_rng(0).standard_normal(shape, np.float32))}
    runs = []
    for name in args.optimizers.split(","):
        for bits in (int(b) for b in args.bits.split(",")):
            for in_place in (False, True):
                for wide in (False, True):
                    tx = bench.make(name, bits)
                    step = bench.train_step(tx, options=compile_options(in_place, wide) or {})
                    params = {"w": jax.numpy.zeros(shape, jax.numpy.float32)}
                    params, state = step(params, tx.init(params), grads)  # compile
                    jax.block_until_ready(params)
                    runs.append({"optimizer": name, "bits": bits, "in_place": in_place, "wide": wide,
                                 "_run": [step, params, state], "times": []})
    for _ in range(args.trials):
        for run in runs:
            step, params, state = run["_run"]
            start = time.perf_counter()
            for _ in range(args.steps):
                params, state = step(params, state, grads)
            jax.block_until_ready(params)
            run["times"].append(1e3 * (time.perf_counter() - start) / args.steps)
            run["_run"] = [step, params, state]
    rows = []
    for run in runs:
        run.pop("_run")
        rows.append(dict(run, shape=list(shape), ms=statistics.median(run["times"])))
    ms = {(r["optimizer"], r["bits"], r["in_place"], r["wide"]): r["ms"] for r in rows}
    print(f"jax {jax.__version__}; leaf {args.shape}; medians of {args.trials} interleaved trials (ms)")
    print("| optimizer | bits | compile | 256-bit | 512-bit | 512 / 256 |")
    print("|---|---:|---|---:|---:|---:|")
    for (name, bits, in_place, wide), value in ms.items():
        if wide:
            continue
        wider = ms[(name, bits, in_place, True)]
        print(f"| {name} | {bits} | {'in place' if in_place else 'default'} | {value:.1f} | {wider:.1f} | "
              f"{wider / value:.2f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vector_width_probe.json").write_text(json.dumps(
        {"jax": jax.__version__, "shape": list(shape), "trials": args.trials, "steps": args.steps,
         "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
