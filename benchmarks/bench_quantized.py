"""Low-bit optimizer state (rmsjax.quantized): memory and step time on the train-step recipe.

The step measured is what a user runs (docs/performance.md): ``tx.update`` and
``optax.apply_updates`` in one ``jax.jit``, parameters and state donated, the gradient an
argument. float32 state, 8-bit and 4-bit run side by side in one process, trials interleaved
(each trial times a few steps of every variant in turn), medians reported, ratios against
float32 state.

* Memory: compile-time ``memory_analysis()`` of that step (arguments + temporaries, bytes per
  parameter; deterministic) against what the stored state allows (parameters + gradient +
  state), and state bytes per parameter on a transformer-block-like tree.
* Speed: one leaf per run: 4096 x 4096 and a 20M-element 1-D leaf on CPU; 16384 x 16384 and
  the 20M leaf with ``--gpu`` (the default when JAX's default backend is a GPU).
* On CPU, low-bit state is also measured with the step compiled in place (``IN_PLACE``:
  XLA:CPU's region-analysis copy insertion, docs/low_bit.md *In place on CPU*), the recipe for
  low-bit state there; the JSON rows say which (``"in_place"``).
* ``--vector-width 512`` compiles every step, float32's too, with XLA:CPU's
  ``xla_cpu_prefer_vector_width`` at 512 bits (AVX-512 registers; XLA's default is 256), as
  ``XLA_FLAGS=--xla_cpu_prefer_vector_width=512`` would for a whole program: the low-bit
  steps are arithmetic, not memory, bound on CPU (docs/low_bit.md *Speed*). Outputs get a
  ``_vw512`` suffix.

    python benchmarks/bench_quantized.py            # CPU: 4096 x 4096 and 20M, 9 trials
    python benchmarks/bench_quantized.py --quick    # a 1024 x 1024 leaf, 3 trials
    python benchmarks/bench_quantized.py --gpu      # 16384 x 16384 and 20M
    python benchmarks/bench_quantized.py --shapes 2048x2048 --optimizers adam --trials 5
    python benchmarks/bench_quantized.py --runs 5   # five processes; per cell the median and range
    python benchmarks/bench_quantized.py --vector-width 512   # AVX-512 vectors on CPU

The step time of one process moves by up to 40 % between runs on a shared machine (and the
ratios with it), so ``--runs`` repeats the whole measurement in fresh processes and reports,
for each cell, the median ratio over the runs and the lowest and highest.

Writes ``bench_quantized.json`` and ``bench_quantized.md`` to ``--out``
(default ``benchmarks/results``; ``--gpu`` adds a ``_gpu`` suffix).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rmsjax

OPTIMIZERS = {
    "adam": lambda: rmsjax.adam(1e-3),
    "rmsprop": lambda: rmsjax.rmsprop(1e-3),
    "adagrad": lambda: rmsjax.adagrad(1e-2),
    "adadelta": lambda: rmsjax.adadelta(),
    "rmsprop_centered_momentum": lambda: rmsjax.rmsprop(1e-3, centered=True, momentum=0.9),
    "rmsprop_momentum": lambda: rmsjax.rmsprop(1e-3, momentum=0.9),
}
# Steps whose peak memory is reported (compile only) besides the timed optimizers.
PEAK_ONLY = ("adadelta", "rmsprop_centered_momentum", "rmsprop_momentum")
BITS = (32, 8, 4)
IN_PLACE = {"xla_cpu_copy_insertion_use_region_analysis": True}
COMPILER_OPTIONS: dict = {}
"""Options every step is compiled with (``--vector-width``), the in-place one added where asked."""


def variants(backend: str) -> list[tuple[int, bool]]:
    """(bits, compiled in place) of each step measured: in place only for low-bit state on CPU."""
    cpu = backend == "cpu"
    return [(32, False), (8, False), *([(8, True)] if cpu else []), (4, False), *([(4, True)] if cpu else [])]


COLUMNS = {(8, False): "8-bit", (8, True): "8-bit in place", (4, False): "4-bit", (4, True): "4-bit in place"}


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


def make(name: str, bits: int) -> optax.GradientTransformation:
    inner = OPTIMIZERS[name]()
    return inner if bits == 32 else rmsjax.quantized(inner, bits=bits)


def nbytes(tree) -> int:
    return sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


def train_step(tx, in_place=False, options=None):
    """The donated train step of ``tx``, compiled with ``options`` (default
    :data:`COMPILER_OPTIONS`) and, when ``in_place``, :data:`IN_PLACE`."""
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    options = {**(COMPILER_OPTIONS if options is None else options), **(IN_PLACE if in_place else {})}
    return jax.jit(step, donate_argnums=(0, 1), compiler_options=options or None)


def parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(float(part)) for part in text.lower().split("x"))


def state_rows(optimizers):
    params = large_tree()
    n = sum(p.size for p in jax.tree.leaves(params))
    rows = []
    for name in optimizers:
        for bits in BITS:
            state = jax.eval_shape(make(name, bits).init, params)
            rows.append({"optimizer": name, "bits": bits, "bytes_per_param": nbytes(state) / n})
    return rows


def peak_rows(optimizers, shape):
    """Compile-time memory of the donated train step, bytes per parameter."""
    p = {"w": jax.ShapeDtypeStruct(shape, jnp.float32)}
    n = int(np.prod(shape))
    rows = []
    for name in optimizers:
        for bits, in_place in variants(jax.default_backend()):
            tx = make(name, bits)
            s = jax.eval_shape(tx.init, p)
            m = train_step(tx, in_place).lower(p, s, p).compile().memory_analysis()
            assert m is not None, "this backend reports no compile-time memory analysis"
            rows.append({
                "optimizer": name, "bits": bits, "in_place": in_place, "shape": list(shape),
                "arguments": m.argument_size_in_bytes / n, "temporaries": m.temp_size_in_bytes / n,
                "peak": (m.argument_size_in_bytes + m.temp_size_in_bytes) / n,
                "allowed": (2 * 4 * n + nbytes(s)) / n,
            })
    return rows


def speed_rows(optimizers, shape, trials, steps):
    rng = np.random.default_rng(0)
    grads = {"w": jnp.asarray(rng.standard_normal(shape, np.float32))}
    rows = []
    keys = variants(jax.default_backend())
    for name in optimizers:
        runs = {}
        for bits, in_place in keys:
            tx = make(name, bits)
            params = {"w": jnp.zeros(shape, jnp.float32)}
            state = tx.init(params)
            step = train_step(tx, in_place)
            params, state = step(params, state, grads)  # compile
            jax.block_until_ready((params, state))
            runs[(bits, in_place)] = [step, params, state, []]
        for _ in range(trials):
            for key in keys:
                run = runs[key]
                step, params, state = run[0], run[1], run[2]
                start = time.perf_counter()
                for _ in range(steps):
                    params, state = step(params, state, grads)
                jax.block_until_ready((params, state))
                run[3].append((time.perf_counter() - start) / steps)
                run[1], run[2] = params, state
        base = statistics.median(runs[(32, False)][3])
        for bits, in_place in keys:
            median = statistics.median(runs[(bits, in_place)][3])
            rows.append({"optimizer": name, "bits": bits, "in_place": in_place, "shape": list(shape),
                         "ms": 1e3 * median, "ratio": median / base})
    return rows


def cpu_model() -> str:
    """The host CPU's model name and vector extensions that decide the low-bit step's speed
    (the ratios differ between CPUs: docs/low_bit.md, *Speed*), or the platform's processor
    field where /proc/cpuinfo is not there."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    name = fields.get("model name", platform.machine())
    family = fields.get("cpu family")
    flags = fields.get("flags", "").split()
    widest = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name}{f' (family {family})' if family else ''}, {widest}"


def device_description() -> str:
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    host = f"; host {cpu_model()}" if device.platform == "cpu" else ""
    return f"{device.platform}: {kind} ({len(jax.devices())} device(s)){host}"


def _ratio_cell(row) -> str:
    if "ratios" not in row:
        return f"{row['ratio']:.2f}x"
    return f"{row['ratio']:.2f}x ({min(row['ratios']):.2f}-{max(row['ratios']):.2f})"


def combine_runs(runs: list[dict]) -> dict:
    """One result from several runs of the same command: each speed row's ``ratio`` and
    ``ms`` become the medians over the runs, with every run's ratio in ``ratios``; memory
    and peak rows are compile-time figures, the same in every run, taken from the last."""
    result: dict = dict(runs[-1], runs=len(runs))
    key = ("optimizer", "bits", "in_place", "shape")
    rows = {}
    for run in runs:
        for row in run["speed"]:
            rows.setdefault(tuple(str(row.get(k)) for k in key), []).append(row)
    result["speed"] = [dict(group[-1], ratio=statistics.median(r["ratio"] for r in group),
                            ms=statistics.median(r["ms"] for r in group),
                            ratios=[r["ratio"] for r in group]) for group in rows.values()]
    return result


def markdown(result) -> str:
    keys = [k for k in COLUMNS if any((r["bits"], r.get("in_place", False)) == k for r in result["speed"])]
    in_place = any(k[1] for k in keys)
    lines = [f"# rmsjax.quantized on {result['device']}", "",
             f"jax {result['jax']}, {result['machine']}; train step (update + apply, donated), "
             f"medians of {result['trials']} interleaved trials of {result['steps']} steps"
             + (f"; each ratio is the median over {result['runs']} runs (separate processes), "
                "lowest and highest in brackets." if result.get("runs", 1) > 1 else ".")
             + (" In place: compiled with XLA:CPU's region-analysis copy insertion." if in_place else "")
             + (f" Every step compiled with xla_cpu_prefer_vector_width={result['vector_width']}."
                if result.get("vector_width") else ""), ""]
    lines += ["## Step time", "",
              "| leaf | optimizer | float32 ms | " + " | ".join(COLUMNS[k] for k in keys) + " |",
              "|---|---|---:|" + "---:|" * len(keys)]
    by = {(r["optimizer"], tuple(r["shape"]), r["bits"], r.get("in_place", False)): r
          for r in result["speed"]}
    for (name, shape, bits, _), row in by.items():
        if bits != 32:
            continue
        leaf = " x ".join(str(s) for s in shape)
        cells = [_ratio_cell(by[(name, shape, *k)]) for k in keys]
        lines.append(f"| {leaf} | {name} | {row['ms']:.3f} | " + " | ".join(cells) + " |")
    lines += ["", "## Peak memory of the step (arguments + temporaries, bytes per parameter)", "",
              "| leaf | optimizer | float32 | " + " | ".join(f"{COLUMNS[k]} (allowed)" for k in keys) + " |",
              "|---|---|---:|" + "---:|" * len(keys)]
    peak = {(r["optimizer"], r["bits"], r.get("in_place", False)): r for r in result["peak"]}
    for name in dict.fromkeys(r["optimizer"] for r in result["peak"]):
        leaf = " x ".join(str(s) for s in peak[(name, 32, False)]["shape"])
        cells = [f"{peak[(name, 32, False)]['peak']:.2f}"]
        for key in keys:
            r = peak[(name, *key)]
            cells.append(f"{r['peak']:.2f} ({r['allowed']:.2f}; temp {r['temporaries']:.2f})")
        lines.append(f"| {leaf} | {name} | " + " | ".join(cells) + " |")
    lines += ["", "## State bytes per parameter (transformer-block tree, ~25M parameters)", "",
              "| optimizer | float32 | 8-bit | 4-bit |", "|---|---:|---:|---:|"]
    mem = {(r["optimizer"], r["bits"]): r["bytes_per_param"] for r in result["memory"]}
    for name in dict.fromkeys(r["optimizer"] for r in result["memory"]):
        lines.append(f"| {name} | {mem[(name, 32)]:.2f} | {mem[(name, 8)]:.2f} | {mem[(name, 4)]:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 1024 x 1024 leaf, 3 trials")
    parser.add_argument("--gpu", action="store_true", default=None,
                        help="GPU sizes (default when JAX's default backend is a GPU)")
    parser.add_argument("--shapes", default=None, help="comma-separated leaf shapes, e.g. 4096x4096,20e6")
    parser.add_argument("--size", type=int, default=None, help="one size x size leaf (smoke tests)")
    parser.add_argument("--optimizers", default="adam,rmsprop,adagrad")
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="steps per trial")
    parser.add_argument("--peak-shape", default=None, help="leaf shape for the memory analysis")
    parser.add_argument("--second-trace", action="store_true",
                        help="trace the new quantized state a second time from optimization_barrier "
                        "copies (0.3.0's default), to compare the two on a backend; outputs get a "
                        "_second_trace suffix")
    parser.add_argument("--vector-width", type=int, default=None, choices=(128, 256, 512),
                        help="compile every step with XLA:CPU's xla_cpu_prefer_vector_width (bits); "
                        "outputs get a _vw<N> suffix")
    parser.add_argument("--runs", type=int, default=1,
                        help="repeat the whole measurement in this many fresh processes; report "
                        "each cell's median and range")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    if args.runs > 1:
        return _repeat(args, list(sys.argv[1:] if argv is None else argv))
    from rmsjax import _quantization
    _quantization._TRACE_NEW_STATE_AGAIN = args.second_trace
    COMPILER_OPTIONS.clear()
    if args.vector_width is not None:
        COMPILER_OPTIONS["xla_cpu_prefer_vector_width"] = args.vector_width
    gpu = jax.default_backend() == "gpu" if args.gpu is None else args.gpu
    if args.size is not None:
        shapes = [(args.size, args.size)]
    elif args.shapes is not None:
        shapes = [parse_shape(s) for s in args.shapes.split(",")]
    elif args.quick:
        shapes = [(1024, 1024)]
    elif gpu:
        shapes = [(16384, 16384), (20_000_000,)]
    else:
        shapes = [(4096, 4096), (20_000_000,)]
    trials = args.trials or (3 if args.quick else 9)
    steps = args.steps or (2 if args.quick or args.size is not None else 5)
    optimizers = [o for o in args.optimizers.split(",") if o]
    for name in optimizers:
        if name not in OPTIMIZERS:
            parser.error(f"--optimizers: unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)})")
    peak_shape = parse_shape(args.peak_shape) if args.peak_shape else shapes[0]
    result = {
        "device": device_description(), "backend": jax.default_backend(), "jax": jax.__version__,
        "vector_width": args.vector_width,
        "machine": platform.machine() + " " + platform.processor(), "trials": trials, "steps": steps,
        "memory": state_rows(optimizers),
        "peak": peak_rows(optimizers + [o for o in PEAK_ONLY if o not in optimizers and args.size is None],
                          peak_shape),
        "speed": [row for shape in shapes for row in speed_rows(optimizers, shape, trials, steps)],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = _stem(gpu and args.size is None, args.second_trace, args.vector_width)
    result["second_trace"] = args.second_trace
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return result


def _stem(gpu: bool, second_trace: bool, vector_width: int | None) -> str:
    """The name of the output files of one configuration."""
    stem = "bench_quantized_gpu" if gpu else "bench_quantized"
    stem += "_second_trace" if second_trace else ""
    return stem + (f"_vw{vector_width}" if vector_width else "")


def _repeat(args, argv: list[str]) -> dict:
    """Runs this script ``args.runs`` times in fresh processes and writes the combined result."""
    forwarded, skip = [], False
    for item in argv:  # drop --runs and --out (with their values); each run writes to its own folder
        if skip:
            skip = False
        elif item in ("--runs", "--out"):
            skip = True
        elif not item.startswith(("--runs=", "--out=")):
            forwarded.append(item)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.runs):
            folder = Path(tmp) / str(index)
            subprocess.run([sys.executable, str(Path(__file__).resolve()), *forwarded, "--out", str(folder)],
                           check=True, stdout=subprocess.DEVNULL)
            runs.append(json.loads(next(folder.glob("*.json")).read_text()))
    result = combine_runs(runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = result["backend"] == "gpu" if args.gpu is None else args.gpu
    stem = _stem(gpu and args.size is None, args.second_trace, args.vector_width)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
