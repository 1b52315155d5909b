"""Per-leaf program size and compile time of a jitted optimizer step: rmsjax against optax.

For each configuration, the same jitted ``update + apply_updates`` step is lowered for
rmsjax and for optax's equivalent optimizer (same hyperparameters, the same maths):

* ``lines/leaf``: StableHLO lines added by each extra parameter leaf, from lowering the step
  on 1 and on 11 leaves of shape (8,) (the difference over 10);
* ``compile s``: trace + lower + compile time of the step on N leaves of shape (64,), for
  each N in ``--leaves`` (400 and 5000 by default), measured side by side in one process,
  alternating rmsjax and optax (and which goes first), after a garbage collection, the
  median of ``--trials`` runs each (``--large-trials`` for N above 1000, where one compile
  takes from half a minute to minutes).

optax is lowered under ``jax.numpy_dtype_promotion("standard")`` (it mixes Python floats with
int32 counters, which strict promotion rejects). Prints a Markdown table and writes
``benchmarks/results/program_size.{json,md}``.

    python benchmarks/program_size.py            # 400 leaves 5 trials, 5000 leaves 1 trial
    python benchmarks/program_size.py --quick    # 400 leaves, 1 trial
    python benchmarks/program_size.py --leaves 5000 --large-trials 4 \\
        --configurations "sgd, momentum 0.9" --out /tmp/sgd5000   # one row, more trials
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

import rmsjax

RESULTS = Path(__file__).parent / "results"

# name -> (optax factory, rmsjax factory): the same optimizer and hyperparameters.
CONFIGURATIONS: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
    "rmsprop": (
        lambda: optax.rmsprop(1e-3, decay=0.9, eps=1e-8, eps_in_sqrt=False),
        lambda: rmsjax.rmsprop(1e-3, decay=0.9, eps=1e-8),
    ),
    "rmsprop, eps in root": (
        lambda: optax.rmsprop(1e-3, decay=0.9, eps=1e-8, eps_in_sqrt=True),
        lambda: rmsjax.rmsprop(1e-3, decay=0.9, eps=1e-8, eps_in_sqrt=True),
    ),
    "adam": (lambda: optax.adam(1e-3), lambda: rmsjax.adam(1e-3)),
    "adamw": (
        lambda: optax.adamw(1e-3, weight_decay=1e-2),
        lambda: rmsjax.adamw(1e-3, weight_decay=1e-2),
    ),
    "sgd, momentum 0.9": (
        lambda: optax.sgd(1e-3, momentum=0.9),
        lambda: rmsjax.sgd(1e-3, momentum=0.9),
    ),
}
COMPILE_CONFIGURATIONS = ("rmsprop", "adam", "sgd, momentum 0.9")


def _step(tx: Any) -> Callable:
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def _params(leaves: int, size: int) -> dict[str, jax.Array]:
    return {f"w{i:05d}": jnp.ones((size,), jnp.float32) for i in range(leaves)}


def lowered_text(tx: Any, leaves: int, *, standard: bool = False) -> str:
    """The StableHLO text of the jitted step of ``tx`` on ``leaves`` leaves of shape (8,)."""
    params = _params(leaves, 8)
    promotion = "standard" if standard else jax.config.jax_numpy_dtype_promotion
    with jax.numpy_dtype_promotion(promotion):
        return jax.jit(_step(tx)).lower(params, tx.init(params), params).as_text()


def lines_per_leaf(tx: Any, *, standard: bool = False) -> float:
    """StableHLO lines that each extra parameter leaf adds to the jitted step of ``tx``."""
    one = len(lowered_text(tx, 1, standard=standard).splitlines())
    eleven = len(lowered_text(tx, 11, standard=standard).splitlines())
    return (eleven - one) / 10


def compile_seconds(tx: Any, leaves: int, *, standard: bool = False) -> tuple[float, float]:
    """(trace + lower, trace + lower + compile) seconds of the jitted step on ``leaves`` leaves.

    The leaves have shape (64,). Tracing and lowering are the Python side of the first call
    (what rmsjax's code decides); the rest is XLA compiling the program.
    """
    params = _params(leaves, 64)
    promotion = "standard" if standard else jax.config.jax_numpy_dtype_promotion
    with jax.numpy_dtype_promotion(promotion):
        state = tx.init(params)
        start = time.perf_counter()
        lowered = jax.jit(_step(tx)).lower(params, state, params)
        traced = time.perf_counter()
        lowered.compile()
        return traced - start, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", type=int, nargs="+", default=[400, 5000])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--large-trials", type=int, default=1, help="trials above 1000 leaves")
    parser.add_argument("--quick", action="store_true", help="400 leaves, 1 trial")
    parser.add_argument(
        "--configurations",
        nargs="+",
        choices=COMPILE_CONFIGURATIONS,
        default=list(COMPILE_CONFIGURATIONS),
        help="which configurations' compile time to measure",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.leaves, args.trials = [400], 1

    rows = []
    for name, (make_optax, make_rmsjax) in CONFIGURATIONS.items():
        theirs = lines_per_leaf(make_optax(), standard=True)
        ours = lines_per_leaf(make_rmsjax())
        rows.append(
            {"configuration": name, "optax_lines": theirs, "rmsjax_lines": ours, "ratio": ours / theirs}
        )
    compiles = []
    for leaves in args.leaves:
        for name in args.configurations:
            make_optax, make_rmsjax = CONFIGURATIONS[name]
            times: dict[str, list[tuple[float, float]]] = {"optax": [], "rmsjax": []}
            trials = args.trials if leaves <= 1000 else args.large_trials
            for trial in range(trials):
                # Alternate which goes first, so drifts of the machine hit both alike, and
                # collect the previous trial's garbage before each one is timed.
                order = ("rmsjax", "optax") if trial % 2 == 0 else ("optax", "rmsjax")
                for who in order:
                    gc.collect()
                    if who == "rmsjax":
                        times[who].append(compile_seconds(make_rmsjax(), leaves))
                    else:
                        times[who].append(compile_seconds(make_optax(), leaves, standard=True))
            ours = statistics.median(t[1] for t in times["rmsjax"])
            theirs = statistics.median(t[1] for t in times["optax"])
            ours_traced = statistics.median(t[0] for t in times["rmsjax"])
            theirs_traced = statistics.median(t[0] for t in times["optax"])
            compiles.append(
                {
                    "configuration": name,
                    "leaves": leaves,
                    "optax_s": theirs,
                    "rmsjax_s": ours,
                    "ratio": ours / theirs,
                    "optax_trace_s": theirs_traced,
                    "rmsjax_trace_s": ours_traced,
                    "trace_ratio": ours_traced / theirs_traced,
                    "trials": trials,
                }
            )

    lines = [
        "| configuration | optax lines/leaf | rmsjax lines/leaf | rmsjax/optax |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['configuration']} | {r['optax_lines']:.1f} | {r['rmsjax_lines']:.1f} | {r['ratio']:.2f} |"
        for r in rows
    ]
    lines += [
        "",
        "| configuration | leaves | trials | optax compile s | rmsjax compile s | rmsjax/optax "
        "| of which trace + lower: rmsjax/optax |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {c['configuration']} | {c['leaves']} | {c['trials']} | {c['optax_s']:.2f} | "
        f"{c['rmsjax_s']:.2f} | {c['ratio']:.2f} | {c['trace_ratio']:.2f} |"
        for c in compiles
    ]
    table = "\n".join(lines)
    print(table)
    result = {
        "lines_per_leaf": rows,
        "compile": compiles,
        "versions": {"jax": jax.__version__, "optax": optax.__version__, "python": platform.python_version()},
        "backend": jax.default_backend(),
        "machine": platform.machine(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "program_size.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "program_size.md").write_text(
        "# Per-leaf program size and compile time (benchmarks/program_size.py)\n\n" + table + "\n"
    )
    return result


if __name__ == "__main__":
    main()
