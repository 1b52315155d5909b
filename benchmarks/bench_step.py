"""Times one optimizer step of rmsjax against optax and PyTorch, side by side.

Every (tree, optimizer) case runs in its own subprocess, in which all implementations are
timed in interleaved trials (medians), next to a bandwidth probe (an in-place
read-modify-write of a float32 array as large as the tree) measured in the same trials.
Each JAX step is ``update`` + ``apply`` in one ``jax.jit`` with the parameters and the
optimizer state donated, which is the recipe of ``docs/performance.md``. Peak memory is
measured in separate subprocesses, one per implementation.

Usage::

    python benchmarks/bench_step.py              # the full CPU run (a few minutes)
    python benchmarks/bench_step.py --quick      # a short run
    python benchmarks/bench_step.py --sizes 1e9 --trees one_leaf,many_leaves  # on a GPU

Results go to ``benchmarks/results/`` as JSON and Markdown (``--out`` to change).
Nothing here assumes a CPU: arrays live on JAX's default device, peak memory is read from
the device's memory statistics where it has them (``ru_maxrss`` otherwise), and PyTorch
runs on CUDA when JAX does and PyTorch can, and is skipped when it cannot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

# The multi-output-fusion recipe of docs/performance.md: XLA reads XLA_FLAGS once, when
# the backend starts, so a worker sets it before importing jax.
MOF_FLAG = "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion"

# Bytes each parameter must move at least (float32): reads + writes of p, g and state.
MIN_BYTES = {"rmsprop": 20, "centered_momentum": 36, "adagrad": 20, "adam": 28}
OPTIMIZERS = tuple(MIN_BYTES)
BALLAST = "optax, built first (ballast, not reported)"
TREES = ("one_leaf", "many_leaves", "small_leaves", "small_leaves_1000", "flax_transformer")

# ----------------------------------------------------------------------------- workers


def _set_xla_mode(mode: str) -> None:
    # JAX and PyTorch share the accelerator in a worker: no 75% preallocation by JAX.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    flags = os.environ.get("XLA_FLAGS", "")
    if mode == "mof" and MOF_FLAG not in flags:
        os.environ["XLA_FLAGS"] = (flags + " " + MOF_FLAG).strip()
    if mode == "default" and MOF_FLAG in flags:
        os.environ["XLA_FLAGS"] = flags.replace(MOF_FLAG, "").strip()


def _shapes(tree: str, size: int, many: int, small: tuple[int, int]) -> list[tuple[int, ...]]:
    if tree == "one_leaf":
        return [(size,)]
    if tree == "many_leaves":
        per = max(size // many, 1)
        return [(per,)] * many
    if tree == "small_leaves":
        return [(small[1],)] * small[0]
    if tree == "small_leaves_1000":
        return [(small[1],)] * min(1000, small[0])
    raise ValueError(tree)


def _flax_params(seed: int = 0) -> Any:
    """The parameters of a small transformer built with flax.nnx (a pure dict of arrays)."""
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, d: int, heads: int, rngs: nnx.Rngs):
            self.norm1 = nnx.LayerNorm(d, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
            self.norm2 = nnx.LayerNorm(d, rngs=rngs)
            self.up = nnx.Linear(d, 4 * d, rngs=rngs)
            self.down = nnx.Linear(4 * d, d, rngs=rngs)

        def __call__(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.down(nnx.gelu(self.up(self.norm2(x))))

    class Transformer(nnx.Module):
        def __init__(self, vocab=8192, d=256, heads=8, layers=6, rngs=None):
            self.embed = nnx.Embed(vocab, d, rngs=rngs)
            self.blocks = nnx.List([Block(d, heads, rngs) for _ in range(layers)])
            self.norm = nnx.LayerNorm(d, rngs=rngs)
            self.head = nnx.Linear(d, vocab, rngs=rngs)

        def __call__(self, tokens):
            x = self.embed(tokens)
            for block in self.blocks:
                x = block(x)
            return self.head(self.norm(x))

    model = Transformer(rngs=nnx.Rngs(seed))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _make_tree(spec: dict) -> Any:
    import jax
    import jax.numpy as jnp

    if spec["tree"] == "flax_transformer":
        params = _flax_params()
    else:
        shapes = _shapes(spec["tree"], spec["size"], spec["many"], tuple(spec["small"]))
        params = {f"w{i:05d}": jnp.full(s, 1.0, jnp.float32) for i, s in enumerate(shapes)}
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(0), len(leaves))

    @jax.jit
    def normal(k, x):  # one fused loop: no temporary as large as the leaf
        return (jax.random.normal(k, x.shape, jnp.float32) * 0.01).astype(x.dtype)

    if spec.get("lean"):  # peak memory: one allocation per gradient, nothing else
        grads = [jnp.full(x.shape, 0.01, x.dtype) for x in leaves]
    else:
        grads = [normal(k, x) for k, x in zip(keys, leaves)]
    return params, jax.tree.unflatten(treedef, grads)


class _KeptPacked:
    """Marks the recipe in which the parameters stay packed from one step to the next."""

    def __init__(self, tx: Any):
        self.tx = tx


def _jax_txs(name: str, packed_ok: bool) -> dict[str, Any]:
    import optax

    import rmsjax

    lr = 1e-3
    if name == "rmsprop":
        pair = (optax.rmsprop(lr, decay=0.9, eps=1e-8), rmsjax.rmsprop(lr, decay=0.9, eps=1e-8))
    elif name == "centered_momentum":
        pair = (
            optax.rmsprop(lr, decay=0.9, eps=1e-8, centered=True, momentum=0.9),
            rmsjax.rmsprop(lr, decay=0.9, eps=1e-8, centered=True, momentum=0.9),
        )
    elif name == "adagrad":
        pair = (optax.adagrad(lr, eps=1e-10), rmsjax.adagrad(lr, eps=1e-10))
    elif name == "adam":
        pair = (optax.adam(lr), rmsjax.adam(lr))
    else:
        raise ValueError(name)
    txs = {"optax": pair[0], "rmsjax": pair[1]}
    if not packed_ok:  # the opt-in one-loop arrangement, meant for a few big leaves
        txs["rmsjax.one_pass"] = rmsjax.one_pass(pair[1])
    if packed_ok:
        txs["rmsjax.packed"] = rmsjax.packed(pair[1])
        txs["rmsjax, params kept packed"] = _KeptPacked(pair[1])
    return txs


def _jax_case(label: str, tx: Any, params: Any, grads: Any, copy: bool = True) -> dict:
    """A jitted, donated step; returns a runner and its first-call time."""
    import jax
    import optax

    from rmsjax import packing

    if isinstance(tx, _KeptPacked):  # the recipe: parameters (so gradients) stay packed
        tx = tx.tx
        params, _ = packing.pack(params)
        grads, _ = packing.pack(grads)

    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    jitted = jax.jit(step, donate_argnums=(0, 1))
    if copy:  # the step donates its parameters; keep the caller's
        params = jax.tree.map(lambda x: x.copy(), params)
    state = tx.init(params)
    jax.block_until_ready((params, state))
    start = time.perf_counter()
    carry = jitted(params, state, grads)
    jax.block_until_ready(carry)
    first = time.perf_counter() - start
    holder = {"carry": carry}

    def run(reps: int) -> float:
        p, s = holder["carry"]
        start = time.perf_counter()
        for _ in range(reps):
            p, s = jitted(p, s, grads)
        jax.block_until_ready((p, s))
        holder["carry"] = (p, s)
        return time.perf_counter() - start

    return {"label": label, "run": run, "first_call_s": first, "jitted": jitted,
            "args": (holder, grads)}


def _loop_report(case: dict) -> dict | None:
    """Loops and copies of parameter-sized arrays in the compiled step (XLA's HLO)."""
    import re

    import jax

    try:
        holder, grads = case["args"]
        text = case["jitted"].lower(*holder["carry"], grads).compile().as_text()
    except Exception:  # noqa: BLE001 - a report, not a requirement
        return None
    entry = text[text.index("ENTRY"):] if "ENTRY" in text else text
    biggest = max(x.size for x in jax.tree.leaves(holder["carry"][0]))
    fusions = copies = 0
    for line in entry.splitlines():
        m = re.match(r"\s*(?:ROOT )?%\S+ = (.*?) (fusion|copy)\(", line)
        if not m:
            continue
        dims = [int(d) for d in re.findall(r"\[(\d+)\]", m.group(1))]
        if dims and max(dims) >= biggest:
            if m.group(2) == "fusion":
                fusions += 1
            else:
                copies += 1
    return {"loops": fusions, "copies": copies}


def _torch_cases(name: str, params: Any, grads: Any, jax_platform: str) -> list[dict]:
    try:
        import torch
    except ImportError:
        return []
    import jax
    import numpy as np

    if jax_platform == "cpu":
        device = "cpu"
    elif jax_platform == "gpu" and torch.cuda.is_available():
        device = "cuda"
    else:
        return []
    lr = 1e-3
    variants = {
        "rmsprop": (torch.optim.RMSprop, dict(lr=lr, alpha=0.9, eps=1e-8)),
        "centered_momentum": (
            torch.optim.RMSprop,
            dict(lr=lr, alpha=0.9, eps=1e-8, centered=True, momentum=0.9),
        ),
        "adagrad": (torch.optim.Adagrad, dict(lr=lr, eps=1e-10)),
        "adam": (torch.optim.Adam, dict(lr=lr)),
    }
    cls, kwargs = variants[name]
    cases = []
    for impl in ("foreach", "for-loop", "fused"):
        flags = {"foreach": dict(foreach=True), "for-loop": dict(foreach=False),
                 "fused": dict(fused=True)}[impl]
        try:
            tensors = [torch.tensor(np.asarray(x), device=device) for x in jax.tree.leaves(params)]
            for t, g in zip(tensors, jax.tree.leaves(grads)):
                t.grad = torch.tensor(np.asarray(g), device=device)
            opt = cls(tensors, **kwargs, **flags)
            start = time.perf_counter()
            opt.step()
            if device == "cuda":
                torch.cuda.synchronize()
            first = time.perf_counter() - start
        except (TypeError, RuntimeError, ValueError):
            continue  # this variant does not exist for this optimizer or device

        def run(reps: int, opt=opt) -> float:
            start = time.perf_counter()
            with torch.no_grad():
                for _ in range(reps):
                    opt.step()
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start

        cases.append({"label": f"torch {impl}", "run": run, "first_call_s": first})
    return cases


def _bandwidth_case(elements: int) -> dict:
    """In-place read-modify-write ``x <- a*x + b`` of a float32 array (8 bytes/element)."""
    import jax
    import jax.numpy as jnp

    jitted = jax.jit(lambda x: x * 1.0000001 + 1e-7, donate_argnums=0)
    holder = {"x": jitted(jnp.ones((elements,), jnp.float32))}
    jax.block_until_ready(holder["x"])

    def run(reps: int) -> float:
        x = holder["x"]
        start = time.perf_counter()
        for _ in range(reps):
            x = jitted(x)
        jax.block_until_ready(x)
        holder["x"] = x
        return time.perf_counter() - start

    return {"label": "bandwidth probe", "run": run, "first_call_s": 0.0}


def _tree_bytes(tree: Any) -> int:
    import jax

    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def timing_worker(spec: dict) -> dict:
    """One (tree, optimizer) case: every implementation, interleaved trials."""
    _set_xla_mode(spec["mode"])
    import jax

    params, grads = _make_tree(spec)
    leaves = jax.tree.leaves(params)
    n_params = int(sum(x.size for x in leaves))
    jax_platform = jax.default_backend()
    cases = [_bandwidth_case(n_params)]
    txs = _jax_txs(spec["optimizer"], packed_ok=len(leaves) > 1)
    # On XLA:CPU the first step compiled for a many-leaf tree runs about 20 % faster than
    # every step compiled after it, identical programs included (1 000 leaves of 1 000,
    # measured: optax compiled first 1.00, the same optax compiled again 1.20-1.36, rmsjax
    # 1.06-1.26; a second copy sharing the first executable is as fast as the first). So a
    # copy of optax's step is compiled first as ballast, timed like the others and left
    # out of the table: no reported implementation gets that head start.
    ballast = _jax_case(BALLAST, txs["optax"], params, grads)
    cases.append(ballast)
    for label, tx in txs.items():
        if label in spec.get("skip", []):
            continue
        cases.append(_jax_case(label, tx, params, grads))
    if spec.get("torch", True):
        cases.extend(_torch_cases(spec["optimizer"], params, grads, jax_platform))
    times: dict[str, list[float]] = {c["label"]: [] for c in cases}
    reps = spec["reps"]
    for c in cases:  # warm-up
        c["run"](1)
    for _ in range(spec["trials"]):
        for c in cases:
            times[c["label"]].append(c["run"](reps) / reps)
    bandwidth_s = statistics.median(times["bandwidth probe"])
    bandwidth = 8 * n_params / bandwidth_s
    rows = []
    min_bytes = MIN_BYTES[spec["optimizer"]] * n_params
    for c in cases:
        if c["label"] in ("bandwidth probe", BALLAST):
            continue
        t = statistics.median(times[c["label"]])
        row = {
            "tree": spec["tree"],
            "optimizer": spec["optimizer"],
            "impl": c["label"],
            "mode": spec["mode"],
            "ms_per_step": 1e3 * t,
            "gb_per_s": min_bytes / t / 1e9,
            "fraction_of_bandwidth": min_bytes / t / bandwidth,
            "first_call_s": c["first_call_s"],
            "trials_ms": [1e3 * x for x in times[c["label"]]],
        }
        if "jitted" in c and spec.get("hlo", True):
            row["hlo"] = _loop_report(c)
        rows.append(row)
    return {
        "tree": spec["tree"],
        "optimizer": spec["optimizer"],
        "mode": spec["mode"],
        "n_params": n_params,
        "n_leaves": len(leaves),
        "bandwidth_gb_per_s": bandwidth / 1e9,
        "ballast_ms_per_step": 1e3 * statistics.median(times[BALLAST]),
        "platform": jax_platform,
        "device": str(jax.devices()[0].device_kind),
        "rows": rows,
    }


def _peak_bytes() -> tuple[int, str]:
    import jax

    stats = None
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - not every backend has statistics
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    import resource

    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "process ru_maxrss"


def memory_worker(spec: dict) -> dict:
    """Peak memory of one implementation: 3 steps, from a fresh process."""
    _set_xla_mode(spec["mode"])
    import jax

    label = spec["impl"]
    txs = {**_jax_txs(spec["optimizer"], packed_ok=False), **_jax_txs(spec["optimizer"], packed_ok=True)}
    tx = txs[label]
    # The runtime's own: the same step compiled and run on a tiny tree first.
    spec = dict(spec, lean=True)
    # (as many leaves as the real tree, 8 elements each: the compiler's own memory too)
    tiny = dict(spec, size=8 * spec["many"] if spec["tree"] == "many_leaves" else 1000,
                small=[spec["small"][0], 8])
    warm = _jax_case(label, tx, *_make_tree(tiny))
    warm["run"](2)
    del warm
    base_peak, source = _peak_bytes()
    params, grads = _make_tree(spec)
    jax.block_until_ready((params, grads))
    case = _jax_case(label, tx, params, grads, copy=False)
    del params
    case["run"](3)
    holder, _ = case["args"]
    state_bytes = _tree_bytes(holder["carry"][1])
    peak, source = _peak_bytes()
    param_bytes = _tree_bytes(holder["carry"][0])
    return {
        "tree": spec["tree"],
        "optimizer": spec["optimizer"],
        "impl": label,
        "mode": spec["mode"],
        "peak_bytes": peak,
        "runtime_bytes": base_peak,
        "source": source,
        "params_bytes": param_bytes,
        "grads_bytes": _tree_bytes(grads),
        "state_bytes": state_bytes,
    }


# ----------------------------------------------------------------------------- parent


def _run_worker(kind: str, spec: dict, timeout: float) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, json.dumps(spec)]
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        print(f"  timed out after {timeout:.0f} s: {kind} {spec}", file=sys.stderr)
        return None
    if out.returncode != 0:
        print(f"  failed: {kind} {spec}\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt(x: float | None, digits: int = 2) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _find(results: list[dict], **match) -> dict | None:
    for case in results:
        for row in case["rows"]:
            if all(row.get(k) == v for k, v in match.items()):
                return {**row, "bandwidth_gb_per_s": case["bandwidth_gb_per_s"]}
    return None


def targets(results: list[dict], memory: list[dict]) -> list[dict]:
    """The issue's targets, as ratios measured in this run."""
    out = []

    def add(name, value, goal, ok, note=""):
        out.append({"target": name, "value": value, "goal": goal,
                    "met": None if value is None else bool(ok), "note": note})

    for mode in sorted({c["mode"] for c in results}):
        for opt in ("rmsprop", "adam"):
            # The one-loop target is the opt-in wrapper's with the flag (mof); with default
            # flags, plain rmsjax must take at most optax's time.
            impl = "rmsjax.one_pass" if mode == "mof" else "rmsjax"
            rj = _find(results, tree="one_leaf", optimizer=opt, impl=impl, mode=mode)
            ox = _find(results, tree="one_leaf", optimizer=opt, impl="optax", mode=mode)
            if rj and ox:
                r = rj["ms_per_step"] / ox["ms_per_step"]
                goal = 0.8 if mode == "mof" else 1.0
                add(f"one leaf, {opt}: {impl} / optax time [{mode}]", r, f"<= {goal}", r <= goal)
                if opt == "rmsprop":
                    f = rj["fraction_of_bandwidth"]
                    add(f"one leaf, rmsprop: fraction of measured bandwidth [{mode}]", f, ">= 0.9",
                        f >= 0.9)
        rj = _find(results, tree="many_leaves", optimizer="rmsprop", impl="rmsjax", mode=mode)
        ox = _find(results, tree="many_leaves", optimizer="rmsprop", impl="optax", mode=mode)
        if rj and ox:
            r = rj["ms_per_step"] / ox["ms_per_step"]
            add(f"200 leaves, rmsprop: rmsjax / optax time [{mode}]", r, "<= 1", r <= 1)
        for impl in ("rmsjax.packed", "rmsjax, params kept packed"):
            pk = _find(results, tree="small_leaves", optimizer="rmsprop", impl=impl, mode=mode)
            ox = _find(results, tree="small_leaves", optimizer="rmsprop", impl="optax", mode=mode)
            if pk and ox:
                add(f"small leaves, {impl}: first call s [{mode}]", pk["first_call_s"], "<= 10",
                    pk["first_call_s"] <= 10)
                r = pk["ms_per_step"] / ox["ms_per_step"]
                add(f"small leaves, {impl}: step / optax step [{mode}]", r, "<= 1", r <= 1)
            pk = _find(results, tree="small_leaves_1000", optimizer="rmsprop", impl=impl, mode=mode)
            ox = _find(results, tree="small_leaves_1000", optimizer="rmsprop", impl="optax",
                       mode=mode)
            if pk and ox:
                r = pk["first_call_s"] / ox["first_call_s"]
                add(f"1000 small leaves, {impl}: first call / optax first call [{mode}]", r,
                    "<= 0.5", r <= 0.5)
    for m in memory:
        need = m["params_bytes"] + m["grads_bytes"] + m["state_bytes"]
        extra = m["peak_bytes"] - m["runtime_bytes"] - need
        add(f"peak memory, {m['tree']} {m['optimizer']} {m['impl']} [{m['mode']}]: "
            f"(peak - runtime - p - g - state) / p",
            extra / m["params_bytes"], "<= ~0 (no extra copies)", extra <= 0.1 * m["params_bytes"],
            note=m["source"])
    return out


def markdown(report: dict) -> str:
    lines = [
        "# Optimizer step benchmark",
        "",
        f"Machine: {report['machine']}; {report['versions']}. Run: `{report['command']}`"
        + ("." if report.get("complete", True) else " (cut short: the cases finished so far)."),
        "Median of interleaved trials; GB/s at the minimal traffic (bytes every parameter "
        "must move: RMSprop and AdaGrad 20 B, Adam 28 B, centred RMSprop with momentum 36 B, "
        "float32); bandwidth = in-place read-modify-write probe measured in the same trials. "
        "`mof` = the multi-output-fusion recipe (docs/performance.md), `default` = no XLA flags. "
        "loops/copies = parameter-sized loops and copies in the compiled JAX step. Each case "
        "first compiles an untimed copy of optax's step as ballast (on XLA:CPU the first "
        "step compiled runs about 20 % faster than every later one, identical ones included).",
        "",
        "| tree | optimizer | impl | XLA | ms/step | GB/s | of bw | vs optax | first call s "
        "| loops/copies |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for case in report["results"]:
        ox = next((r for r in case["rows"] if r["impl"] == "optax"), None)
        tree = f"{case['tree']} ({case['n_leaves']} leaves, {case['n_params'] / 1e6:.3g}M)"
        for r in case["rows"]:
            vs = r["ms_per_step"] / ox["ms_per_step"] if ox else None
            hlo = r.get("hlo") or {}
            lc = f"{hlo['loops']}/{hlo['copies']}" if hlo else ""
            lines.append(
                f"| {tree} | {r['optimizer']} | {r['impl']} | {r['mode']} | "
                f"{_fmt(r['ms_per_step'])} | {_fmt(r['gb_per_s'], 1)} | "
                f"{_fmt(r['fraction_of_bandwidth'])} | {_fmt(vs)} | {_fmt(r['first_call_s'])} "
                f"| {lc} |"
            )
    bws = ", ".join(
        f"{c['tree']}/{c['optimizer']}/{c['mode']}: {c['bandwidth_gb_per_s']:.1f}"
        for c in report["results"]
    )
    lines += ["", f"Bandwidth probe (GB/s, per case): {bws}.", ""]
    if report["memory"]:
        lines += ["| peak memory | impl | XLA | peak MB | runtime MB | p + g + state MB | source |",
                  "|---|---|---|---:|---:|---:|---|"]
        for m in report["memory"]:
            need = m["params_bytes"] + m["grads_bytes"] + m["state_bytes"]
            lines.append(
                f"| {m['tree']} {m['optimizer']} | {m['impl']} | {m['mode']} | "
                f"{m['peak_bytes'] / 1e6:.0f} | {m['runtime_bytes'] / 1e6:.0f} | "
                f"{need / 1e6:.0f} | {m['source']} |"
            )
        lines.append("")
    lines += ["| target | measured | goal | met |", "|---|---:|---|---|"]
    for t in report["targets"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {_fmt(t['value'])} | {t['goal']} | {met} |")
    return "\n".join(lines) + "\n"


def _versions() -> str:
    parts = []
    for mod in ("jax", "optax", "flax", "torch"):
        try:
            parts.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            pass
    return ", ".join(parts)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = f"{names[0]} x{len(names)}" if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short run: 10M parameters, 1 000 small "
                   "leaves, RMSprop and Adam, 3 trials, no peak memory")
    p.add_argument("--sizes", default=None, help="parameters in the one-leaf and many-leaves "
                   "trees (comma-separated list allowed; e.g. 1e9 on a GPU); default 5e7")
    p.add_argument("--trees", default=None, help=f"comma-separated subset of {TREES}")
    p.add_argument("--optimizers", default=None, help=f"comma-separated subset of {OPTIMIZERS}")
    p.add_argument("--many", type=int, default=200, help="leaves in the many-leaves tree")
    p.add_argument("--small", default="5000x1000", help="small-leaves tree, COUNTxSIZE")
    p.add_argument("--modes", default=None, help="XLA modes: mof,default (default: both on "
                   "CPU; 'default' alone elsewhere, where the flag does not apply)")
    p.add_argument("--trials", type=int, default=None)
    p.add_argument("--reps", type=int, default=None, help="steps per trial")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--timeout", type=float, default=900, help="seconds per subprocess")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "results"))
    p.add_argument("--name", default="bench_step", help="base name of the result files")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _default_modes() -> list[str]:
    """Both XLA modes on a CPU backend; elsewhere the CPU flag means nothing: default only.

    The backend is asked in a subprocess, so that the parent never holds the accelerator.
    """
    probe = "import jax; print(jax.default_backend())"
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             timeout=300)
        backend = out.stdout.strip().splitlines()[-1]
    except (subprocess.SubprocessError, IndexError):
        backend = "cpu"
    return ["mof", "default"] if backend == "cpu" else ["default"]


def plan(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    quick = args.quick
    sizes = [int(float(s)) for s in (args.sizes or ("1e7" if quick else "5e7")).split(",")]
    trees = (args.trees.split(",") if args.trees else
             ["one_leaf", "many_leaves", "small_leaves_1000", "flax_transformer"] if quick
             else list(TREES))
    opts = (args.optimizers.split(",") if args.optimizers else
            ["rmsprop", "adam"] if quick else list(OPTIMIZERS))
    count, size = (int(x) for x in args.small.lower().split("x"))
    if quick and not args.small_given:
        count = 1000
    modes = args.modes.split(",") if args.modes else _default_modes()
    trials = args.trials or (3 if quick else 5)
    reps = args.reps or (3 if quick else 5)
    timing, memory = [], []
    for mode in modes:
        for tree in trees:
            for size_total in (sizes if tree in ("one_leaf", "many_leaves") else sizes[:1]):
                small_tree = tree.startswith("small")
                # The small-leaves trees time RMSprop only: their targets are about it, and
                # optax's first call there costs tens of seconds per optimizer.
                for opt in (["rmsprop"] if small_tree else opts):
                    spec = {"kind": "timing", "tree": tree, "optimizer": opt, "mode": mode,
                            "size": size_total, "many": args.many, "small": [count, size],
                            "trials": trials if not small_tree else max(3, trials // 2),
                            "reps": reps,
                            # PyTorch does not read XLA's flags: time it in the first mode only.
                            "torch": not args.no_torch and mode == modes[0]}
                    if tree == "one_leaf":
                        spec["skip"] = ["rmsjax.packed", "rmsjax, params kept packed"]
                    timing.append(spec)
            if not (args.no_memory or quick) and tree in ("one_leaf", "many_leaves"):
                for impl in ("optax", "rmsjax"):
                    memory.append({"kind": "memory", "tree": tree, "optimizer": "rmsprop",
                                   "mode": mode, "impl": impl, "size": sizes[0],
                                   "many": args.many, "small": [count, size]})
    return timing, memory


def main(argv: list[str] | None = None) -> dict | None:
    raw = sys.argv[1:] if argv is None else argv
    args = parse(raw)
    args.small_given = any(a.startswith("--small") for a in raw)
    if args.worker:
        kind, spec = args.worker
        result = (timing_worker if kind == "timing" else memory_worker)(json.loads(spec))
        print(json.dumps(result))
        return None
    timing, memory = plan(args)
    results, mem = [], []
    report = {
        "command": "python benchmarks/bench_step.py " + " ".join(raw),
        "machine": _machine(),
        "versions": _versions(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "results": results,
        "memory": mem,
        "complete": False,
    }
    os.makedirs(args.out, exist_ok=True)

    def save() -> None:
        # Written after every case, so that a run cut short (a device session's time
        # limit) still leaves its results; "complete" tells a finished run apart.
        report["targets"] = targets(results, mem)
        with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
            f.write(markdown(report))

    for spec in timing:
        print(f"timing {spec['mode']:7s} {spec['tree']:18s} {spec['optimizer']}", flush=True)
        r = _run_worker("timing", spec, args.timeout)
        if r:
            results.append(r)
            for row in r["rows"]:
                print(f"    {row['impl']:28s} {row['ms_per_step']:9.2f} ms  "
                      f"{row['fraction_of_bandwidth']:.2f} of bw  first {row['first_call_s']:.2f} s",
                      flush=True)
            save()
    for spec in memory:
        print(f"memory {spec['mode']:7s} {spec['tree']:18s} {spec['impl']}", flush=True)
        r = _run_worker("memory", spec, args.timeout)
        if r:
            mem.append(r)
            save()
    report["complete"] = True
    save()
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
