"""Training in a quarter of the memory: bfloat16 parameters, 8-bit state, ZeRO-1 over 8 devices.

The small transformer language model of ``examples/low_bit_state.py`` trained twice on the
same batches: once with float32 parameters and float32 Adam state on one device (the
reference), once with

* bfloat16 parameters updated by :func:`rmsjax.low_precision` (unbiased stochastic rounding,
  or ``--compensated`` for the int8 error record),
* Adam's moments stored in 8 bits by :func:`rmsjax.quantized`,
* the optimizer state split over 8 simulated CPU devices by :func:`rmsjax.zero_shardings`,
  with the ZeRO-1 train step below (gradients reduce-scattered, each device updating its
  shard of the parameters, parameters all-gathered).

Prints the bytes per parameter per device of each part (parameters, optimizer state,
gradients, the step's temporaries from ``memory_analysis``), the bytes each device sends per
step against the plain data-parallel step's all-reduce, and the loss against the float32 run.

    python examples/low_memory_training.py               # 300 steps (a few minutes on CPU)
    python examples/low_memory_training.py --steps 20    # a quick look

:func:`zero_train_step` is the recipe of docs/low_memory.md; the tests use it as it is here.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # the device count is read when jax starts
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import rmsjax  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the ZeRO-1 recipe


def _axis_dim(sharding: NamedSharding, axis: str) -> int | None:
    for dim, entry in enumerate(sharding.spec):
        if entry == axis or (isinstance(entry, tuple) and axis in entry):
            return dim
    return None


def zero_train_step(tx: optax.GradientTransformation, loss_fn: Callable[[Any, Any], jax.Array], params: Any,
                    mesh: jax.sharding.Mesh, axis: str = "data", *, uneven: str = "warn"):
    """A jitted ZeRO-1 step ``(params, opt_state, batch) -> (params, opt_state, loss)``.

    ``params`` replicated over ``axis``, ``opt_state`` sharded by :func:`rmsjax.zero_shardings`,
    ``batch`` split over ``axis`` along its first dimension. Each device computes the
    gradient of its part of the batch; ``psum_scatter`` sums the gradients and leaves each
    device the shard that matches its shard of the state (one reduce-scatter); the update runs
    on that shard (no communication); the new parameters are gathered again (one
    all-gather). Parameters with no evenly divisible dimension stay replicated and their
    gradients are all-reduced.

    Returns ``(step, state_shardings)``; ``jax.jit(tx.init, out_shardings=state_shardings)``
    makes the state.
    """
    n = mesh.shape[axis]
    state_shardings = rmsjax.zero_shardings(tx, params, mesh, axis, uneven=uneven)
    # The ZeRO sharding of each parameter is the one a parameter-shaped state leaf gets.
    param_shardings = rmsjax.zero_shardings(optax.trace(0.0), params, mesh, axis, uneven="replicate").trace
    replicated = NamedSharding(mesh, P())

    def local_gradients(params, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)

        def scatter(g, sharding):
            dim = _axis_dim(sharding, axis)
            if dim is None:
                return jax.lax.psum(g, axis) / jnp.asarray(n, g.dtype)
            return jax.lax.psum_scatter(g, axis, scatter_dimension=dim, tiled=True) / jnp.asarray(n, g.dtype)

        return jax.tree.map(scatter, grads, param_shardings), jax.lax.pmean(loss, axis)

    gradients = jax.shard_map(local_gradients, mesh=mesh, in_specs=(P(), P(axis)),
                              out_specs=(jax.tree.map(lambda s: s.spec, param_shardings), P()),
                              check_vma=False)

    def step(params, opt_state, batch):
        grads, loss = gradients(params, batch)
        shard = jax.lax.with_sharding_constraint(params, param_shardings)  # a local slice
        updates, opt_state = tx.update(grads, opt_state, shard)
        new = optax.apply_updates(shard, updates)
        return jax.lax.with_sharding_constraint(new, replicated), opt_state, loss

    batch_sharding = NamedSharding(mesh, P(axis))
    jitted = jax.jit(step, in_shardings=(replicated, state_shardings, batch_sharding),
                     out_shardings=(replicated, state_shardings, replicated), donate_argnums=(0, 1))
    return jitted, state_shardings


def jit_zero_train_step(tx, loss_fn, params, mesh, axis="data", *, uneven="warn"):
    """The jit-only ZeRO-1 step: state shardings alone, the compiler places the collectives.

    On XLA:CPU this keeps the gradient all-reduce and adds an all-gather of the parameters
    (1.5x the plain data-parallel step's traffic); the state memory is split all the same.
    """
    state_shardings = rmsjax.zero_shardings(tx, params, mesh, axis, uneven=uneven)
    replicated = NamedSharding(mesh, P())

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    jitted = jax.jit(step, in_shardings=(replicated, state_shardings, NamedSharding(mesh, P(axis))),
                     out_shardings=(replicated, state_shardings, replicated), donate_argnums=(0, 1))
    return jitted, state_shardings


def replicated_train_step(tx, loss_fn, mesh, axis="data"):
    """Plain data parallelism: parameters and state replicated, the gradients all-reduced."""
    replicated = NamedSharding(mesh, P())

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, in_shardings=(replicated, replicated, NamedSharding(mesh, P(axis))),
                   out_shardings=(replicated, replicated, replicated), donate_argnums=(0, 1))


_COLLECTIVE = re.compile(
    r"=\s*(\([^)]*\)|\S+)\s+(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(-start)?\(")
_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
          "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def collective_bytes(hlo_text: str, devices: int) -> dict[str, float]:
    """Bytes each device sends per step, by collective, counted as a ring from compiled HLO.

    all-reduce of S bytes: 2 (n - 1) / n S; reduce-scatter with an output shard of S bytes:
    (n - 1) S; all-gather with an output of S bytes: (n - 1) / n S; collective-permute: S;
    all-to-all of S bytes: (n - 1) / n S.
    """
    totals: dict[str, float] = {}
    for result, op, _ in _COLLECTIVE.findall(hlo_text):
        size = sum(_BYTES[t] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                   for t, dims in _SHAPE.findall(result))
        n = devices
        factor = {"all-reduce": 2 * (n - 1) / n, "reduce-scatter": n - 1, "all-gather": (n - 1) / n,
                  "collective-permute": 1.0, "all-to-all": (n - 1) / n}[op]
        totals[op] = totals.get(op, 0.0) + factor * size
    return totals


def tree_bytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def per_device_bytes(tree: Any, shardings: Any) -> int:
    """Bytes of ``tree`` (arrays or ShapeDtypeStructs) that one device holds under ``shardings``."""
    total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
        shard = s.shard_shape(tuple(x.shape))
        total += int(np.prod(shard)) * jnp.dtype(x.dtype).itemsize
    return total


# --------------------------------------------------------------------------- the language model


def _lm_module():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import low_bit_state  # noqa: PLC0415 - the model and corpus of the low-bit example

    return low_bit_state


def lm_problem(context: int = 64, seed: int = 0):
    """(params (float32), loss_fn(params, tokens), batches(steps, batch) -> array) of the tiny LM."""
    from flax import nnx  # noqa: PLC0415

    lbs = _lm_module()
    text = lbs.corpus()
    chars = sorted(set(text))
    data = np.asarray([chars.index(c) for c in text], np.int32)
    model = lbs.TinyLM(len(chars), context, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.as_pure(params)
    params = jax.tree.map(lambda x: x, dict(params.to_pure_dict()) if hasattr(params, "to_pure_dict")
                          else params)

    def loss_fn(params, tokens):
        model = nnx.merge(graphdef, params)
        logits = model(tokens[:, :-1]).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def batches(steps: int, batch: int, start: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed + 1)
        starts = rng.integers(0, len(data) - context - 1, (start + steps, batch))[start:]
        return np.stack([np.stack([data[s: s + context + 1] for s in row]) for row in starts])

    return params, loss_fn, batches


def _bf16(tree):
    return jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--compensated", action="store_true")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

    params32, loss_fn, batches = lm_problem()
    data = batches(args.steps, args.batch)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params32))

    # Reference: float32 parameters and state, one device.
    ref_tx = rmsjax.adam(args.lr)
    ref_step = jax.jit(lambda p, s, b: (lambda loss, g: (lambda u, s: (optax.apply_updates(p, u), s, loss))(
        *ref_tx.update(g, s, p)))(*jax.value_and_grad(loss_fn)(p, b)))
    p, s = params32, ref_tx.init(params32)
    ref_losses = []
    for b in data:
        p, s, loss = ref_step(p, s, jnp.asarray(b))
        ref_losses.append(float(loss))

    # Low memory: bfloat16 parameters, 8-bit state, ZeRO-1.
    tx = rmsjax.low_precision(rmsjax.quantized(rmsjax.adam(args.lr)), compensated=args.compensated)
    params = jax.device_put(_bf16(params32), NamedSharding(mesh, P()))
    step, state_shardings = zero_train_step(tx, loss_fn, params, mesh, uneven="replicate")
    opt_state = jax.jit(tx.init, out_shardings=state_shardings)(params)
    batch0 = jax.device_put(jnp.asarray(data[0]), NamedSharding(mesh, P("data")))
    compiled = step.lower(params, opt_state, batch0).compile()
    plain = replicated_train_step(tx, loss_fn, mesh).lower(
        params, jax.device_put(opt_state, NamedSharding(mesh, P())), batch0).compile()
    sent = sum(collective_bytes(compiled.as_text(), n).values())
    sent_plain = sum(collective_bytes(plain.as_text(), n).values())
    memory = compiled.memory_analysis()
    state_total = tree_bytes(opt_state)
    state_device = per_device_bytes(opt_state, state_shardings)
    losses = []
    for b in data:
        params, opt_state, loss = step(params, opt_state, jax.device_put(jnp.asarray(b), batch0.sharding))
        losses.append(float(loss))

    tail = max(1, min(20, args.steps // 5))
    final, ref_final = float(np.mean(losses[-tail:])), float(np.mean(ref_losses[-tail:]))
    per = {
        "parameters (bfloat16, replicated)": tree_bytes(params) / count,
        f"optimizer state on one device (of {state_total / count:.3f} in all)": state_device / count,
        "gradients (bfloat16, transient)": tree_bytes(params) / count,
        "step temporaries (memory_analysis)": memory.temp_size_in_bytes / count if memory else float("nan"),
    }
    print(f"{count} parameters, {n} devices, {args.steps} steps")
    print("bytes per parameter per device:")
    for name, value in per.items():
        print(f"  {name:55s} {value:7.3f}")
    print(f"  {'float32 Adam, replicated (params + state)':55s} {12.0:7.3f}")
    print(f"bytes sent per device per step: {sent / 1e6:.3f} MB "
          f"(plain data parallel: {sent_plain / 1e6:.3f} MB, {sent / sent_plain:.2f}x)")
    print(f"final loss (mean of last {tail}): {final:.4f}, "
          f"float32 run {ref_final:.4f} ({final / ref_final:.3f}x)")
    result = {"parameters": count, "devices": n, "steps": args.steps, "bytes_per_parameter": per,
              "collective_ratio": sent / sent_plain, "final_loss": final, "float32_final_loss": ref_final,
              "loss_ratio": final / ref_final, "losses": losses, "float32_losses": ref_losses}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
