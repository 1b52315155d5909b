"""One process of the multi-process ZeRO-1 test (``tests/test_zero_multiprocess.py``).

Not a test module (no ``test_`` prefix): the launcher starts it as a script, either as one of
``--processes 2`` processes joined by ``jax.distributed.initialize`` (4 simulated CPU devices
each), or as ``--processes 1`` with all 8 devices in one process (the reference). Both build
the same 8-device mesh over ``"data"`` and run the two ZeRO-1 steps of
``examples/low_memory_training.py`` (``zero_train_step``, ``jit_zero_train_step``) on the MLP
of ``tests/sharding/test_zero_sharding.py``, for three optimizers. Each process checks its own
shards of the state, then writes the final parameters, the whole state (gathered) and the
losses to ``--out``/``result_<process>.npz`` and a JSON summary to stdout.

By hand::

    python tests/sharding/multiprocess_zero_worker.py --processes 1 --out /tmp/ref
    python tests/sharding/multiprocess_zero_worker.py --processes 2 --process-id 0 --port 1234 --out /tmp/mp &
    python tests/sharding/multiprocess_zero_worker.py --processes 2 --process-id 1 --port 1234 --out /tmp/mp
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

DEVICES = 8
STEPS = 20
RECIPES = ("zero_train_step", "jit_zero_train_step")
OPTIMIZERS = ("adam_f32", "low_precision_quantized_bf16", "low_precision_quantized_compensated_bf16")
HERE = Path(__file__).resolve().parent


def _load(name: str, path: Path):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _optimizer(name: str):
    """(tx, parameter dtype): float32 Adam, and the example's bfloat16 + 8-bit Adam (both roundings)."""
    import jax.numpy as jnp  # noqa: PLC0415

    import rmsjax  # noqa: PLC0415

    if name == "adam_f32":
        return rmsjax.adam(1e-3), jnp.float32
    eight_bit = rmsjax.quantized(rmsjax.adam(1e-3), min_size=1024)
    return rmsjax.low_precision(eight_bit, compensated=name.endswith("compensated_bf16")), jnp.bfloat16


def _global_array(sharding, value):
    """A global array from the full value every process holds: each process passes its own part."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    value = np.asarray(value)
    shape = value.shape
    if not sharding.is_fully_replicated:  # split along the first dimension: this process's rows
        rows = [idx[0] for idx in sharding.addressable_devices_indices_map(value.shape).values()]
        start, stop = min(r.start for r in rows), max(r.stop for r in rows)
        assert (stop - start) * jax.process_count() == shape[0], (start, stop)
        value = value[start:stop]
    return jax.make_array_from_process_local_data(sharding, value, shape)


def _check_shards(state, shardings) -> dict:
    """This process's shards of ``state``: each sharded leaf 1/8 per device, 8 distinct parts."""
    import jax  # noqa: PLC0415

    ex = sys.modules["low_memory_training"]
    per_device: dict[str, int] = {str(d.id): 0 for d in jax.local_devices()}
    total = scalars = leaves = 0
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    for (path, leaf), sharding in zip(flat, jax.tree.leaves(shardings), strict=True):
        name = jax.tree_util.keystr(path)
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (name, leaf.sharding, sharding)
        total += leaf.nbytes
        shards = leaf.addressable_shards
        assert len(shards) == jax.local_device_count(), (name, len(shards))
        for shard in shards:
            per_device[str(shard.device.id)] += shard.data.nbytes
        if leaf.ndim == 0:
            scalars += leaf.nbytes
            continue
        leaves += 1
        # every non-scalar leaf of this model divides by 8: each is split, none replicated
        assert ex._axis_dim(sharding, "data") is not None, (name, sharding.spec)
        if "codes" in name:  # 8-bit moments: a block (the last axis of the codes) is never split
            assert (tuple(sharding.spec) + (None,) * leaf.ndim)[leaf.ndim - 1] is None, (name, sharding.spec)
        for shard in shards:
            assert shard.data.size * DEVICES == leaf.size, (name, shard.data.shape, leaf.shape)
        parts = {tuple((s.start, s.stop) for s in shard.index) for shard in shards}
        assert len(parts) == len(shards), (name, parts)  # this process's devices hold different parts
    expected = (total - scalars) // DEVICES + scalars
    assert all(b == expected for b in per_device.values()), (per_device, expected)
    return {"state_bytes": int(total), "scalar_bytes": int(scalars), "split_leaves": leaves,
            "bytes_per_local_device": per_device, "expected_per_device": int(expected)}


def _host(tree):
    """Leaf name -> numpy value (float leaves as float32, exact for bfloat16) of a global tree."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from jax.experimental import multihost_utils  # noqa: PLC0415

    gathered = multihost_utils.process_allgather(tree, tiled=True) if jax.process_count() > 1 \
        else jax.device_get(tree)
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(gathered)[0]:
        leaf = np.asarray(leaf)
        if leaf.dtype.kind == "V" or str(leaf.dtype) == "bfloat16":
            leaf = leaf.astype(np.float32)
        out[jax.tree_util.keystr(path)] = leaf
    return out


def run(args) -> dict:
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from jax.sharding import AxisType, NamedSharding  # noqa: PLC0415
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    jax.config.update("jax_numpy_dtype_promotion", "strict")  # as tests/conftest.py
    if args.processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}",
                                   num_processes=args.processes, process_id=args.process_id,
                                   initialization_timeout=120)
    assert jax.process_count() == args.processes, jax.process_count()
    assert jax.device_count() == DEVICES and jax.local_device_count() == DEVICES // args.processes

    ex = _load("low_memory_training", HERE.parents[1] / "examples" / "low_memory_training.py")
    model = _load("test_zero_sharding", HERE / "test_zero_sharding.py")
    mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(AxisType.Auto,))
    assert {d.process_index for d in mesh.devices.flat} == set(range(args.processes))
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    batches = model._batches(STEPS)

    summary: dict = {"process": jax.process_index(), "processes": jax.process_count(),
                     "jax": jax.__version__, "runs": {}}
    arrays: dict[str, np.ndarray] = {}
    for opt in OPTIMIZERS:
        for recipe in RECIPES:
            start = time.perf_counter()
            tx, dtype = _optimizer(opt)
            params = jax.tree.map(lambda x: _global_array(replicated, np.asarray(x)), model._params(dtype))
            step, shardings = getattr(ex, recipe)(tx, model._loss, params, mesh)
            state = jax.jit(tx.init, out_shardings=shardings)(params)
            losses = []
            for b in batches:
                params, state, loss = step(params, state, _global_array(split, b.astype(np.float32)))
                losses.append(float(loss.addressable_data(0)))
            key = f"{opt}/{recipe}"
            summary["runs"][key] = {"shards": _check_shards(state, shardings), "losses": losses,
                                    "seconds": round(time.perf_counter() - start, 2)}
            for name, value in _host(params).items():
                arrays[f"{key}/params{name}"] = value
            for name, value in _host(state).items():
                arrays[f"{key}/state{name}"] = value
            arrays[f"{key}/losses"] = np.asarray(losses, np.float32)
            assert all(np.isfinite(losses)), losses
            del params, state, step
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / f"result_{jax.process_index()}.npz", **arrays)
    if args.processes > 1:
        jax.distributed.shutdown()
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, choices=(1, 2), required=True)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    # the device count is read when jax starts: set it before the first import of jax
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""),
         f"--xla_force_host_platform_device_count={DEVICES // args.processes}"]).strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.append(str(HERE.parents[1]))  # rmsjax from this checkout if none is importable
    summary = run(args)
    print("RESULT " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
