"""Generate the Keras 3 reference fixtures that ``tests/test_keras_recipes.py`` checks against.

Companion of ``generate.py`` (same problem, same fixture layout, same ``--check``), for
whole Keras recipes: every ``keras.optimizers`` class that ``rmsjax.compat.keras`` ports,
the options every Keras optimizer shares (``weight_decay``, ``clipnorm``, ``clipvalue``,
``global_clipnorm``, ``use_ema``, ``ema_momentum``, ``ema_overwrite_frequency``,
``loss_scale_factor``, ``gradient_accumulation_steps``, ``exclude_from_weight_decay``), and
Keras's learning-rate schedules. Keras 3 runs on its JAX backend in float64
(``jax_enable_x64``, ``floatx`` float64); the gradient field is ``generate.py``'s
``g(p) = a*p + b*sin(p) + c`` on the tree ``{"w": (3,), "b": (2, 2)}``, handed to
``apply_gradients`` by hand.

Two kinds of fixture in ``fixtures_keras/``:

* ``keras_<case>.npz``: an optimizer run of ``STEPS`` steps. ``meta`` (JSON) has
  ``optimizer``, ``kwargs`` (constructor arguments other than a schedule), ``schedule``
  (``null`` or ``{"class": name, "kwargs": {...}}``, a ``keras.optimizers.schedules`` class
  passed as ``learning_rate``), ``exclude`` (``null`` or the ``var_names`` given to
  ``optimizer.exclude_from_weight_decay``), ``steps``, ``leaves``, ``versions``. Arrays as in
  ``generate.py`` (``init_L``, ``traj_L``, ``a_L``, ``b_L``, ``c_L``), plus ``ema_L`` (the
  optimizer's moving average after each step) when ``use_ema`` is set.
* ``schedule_<case>.npz``: ``meta`` (``class``, ``kwargs``, ``steps``) and ``values``, the
  schedule at steps ``0 .. SCHEDULE_STEPS - 1`` (int32 steps, as ``optimizer.iterations``).

Usage (keras 3 must be installed)::

    KERAS_BACKEND=jax python tests/reference/generate_keras.py          # (re)write fixtures
    KERAS_BACKEND=jax python tests/reference/generate_keras.py --check  # compare, write nothing

``--check`` regenerates in memory and fails on any difference (bit for bit by default) and
on missing or extra files; writing leaves unchanged files untouched.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures_keras"
STEPS = 60
SCHEDULE_STEPS = 300


def _generate_module():
    spec = importlib.util.spec_from_file_location("_rmsjax_generate", HERE / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _generate_module()
LEAVES = GEN.LEAVES


# --------------------------------------------------------------------------- the cases


def _case(name, optimizer, kwargs, schedule=None, exclude=None):
    return {
        "name": f"keras_{name}",
        "optimizer": optimizer,
        "kwargs": kwargs,
        "schedule": schedule,
        "exclude": exclude,
    }


def _sched(cls, **kwargs):
    return {"class": cls, "kwargs": kwargs}


EXP = _sched("ExponentialDecay", initial_learning_rate=0.01, decay_steps=10, decay_rate=0.7)
PIECEWISE = _sched("PiecewiseConstantDecay", boundaries=[15, 30], values=[0.05, 0.02, 0.005])
COSINE = _sched("CosineDecay", initial_learning_rate=0.02, decay_steps=40, alpha=0.1)
COSINE_WARMUP = _sched(
    "CosineDecay",
    initial_learning_rate=0.001,
    decay_steps=40,
    alpha=0.05,
    warmup_target=0.02,
    warmup_steps=10,
)
INVERSE = _sched("InverseTimeDecay", initial_learning_rate=0.2, decay_steps=5, decay_rate=0.5, staircase=True)
POLY = _sched(
    "PolynomialDecay", initial_learning_rate=2.0, decay_steps=20, end_learning_rate=0.1, power=2.0, cycle=True
)

CASES = [
    # ---- every optimizer with Keras's defaults
    *[
        _case(f"{opt.lower()}_default", opt, {})
        for opt in ("RMSprop", "Adagrad", "Adam", "AdamW", "Adadelta", "Adamax", "Nadam", "SGD")
    ],
    # ---- the new optimizers' own arguments
    _case("adamax_betas", "Adamax", {"learning_rate": 0.02, "beta_1": 0.8, "beta_2": 0.95, "epsilon": 0.01}),
    _case("nadam_betas", "Nadam", {"learning_rate": 0.01, "beta_1": 0.85, "beta_2": 0.99, "epsilon": 1e-3}),
    _case("sgd_momentum", "SGD", {"learning_rate": 0.02, "momentum": 0.9}),
    _case("sgd_nesterov", "SGD", {"learning_rate": 0.02, "momentum": 0.9, "nesterov": True}),
    _case(
        "adamw_amsgrad",
        "AdamW",
        {
            "learning_rate": 0.01,
            "weight_decay": 0.1,
            "amsgrad": True,
            "epsilon": 0.01,
            "beta_1": 0.8,
            "beta_2": 0.95,
        },
    ),
    _case("adam_amsgrad_wd", "Adam", {"learning_rate": 0.01, "amsgrad": True, "weight_decay": 0.05}),
    # ---- weight_decay
    _case("sgd_wd", "SGD", {"learning_rate": 0.05, "weight_decay": 0.1}),
    _case("adagrad_wd", "Adagrad", {"learning_rate": 0.1, "weight_decay": 0.2}),
    _case("nadam_wd", "Nadam", {"learning_rate": 0.01, "weight_decay": 0.3}),
    _case("adadelta_wd", "Adadelta", {"learning_rate": 1.0, "weight_decay": 0.1}),
    _case("adamax_wd", "Adamax", {"learning_rate": 0.01, "weight_decay": 0.1}),
    _case("adamw_exclude", "AdamW", {"learning_rate": 0.01, "weight_decay": 0.2}, exclude=["b"]),
    # ---- clipping
    _case("rmsprop_clipnorm", "RMSprop", {"learning_rate": 0.01, "momentum": 0.9, "clipnorm": 0.5}),
    _case("sgd_clipnorm", "SGD", {"learning_rate": 0.05, "clipnorm": 0.3}),
    _case("adamax_clipnorm", "Adamax", {"learning_rate": 0.02, "clipnorm": 0.8}),
    _case("sgd_clipvalue", "SGD", {"learning_rate": 0.05, "momentum": 0.5, "clipvalue": 0.4}),
    _case("adagrad_clipvalue", "Adagrad", {"learning_rate": 0.1, "clipvalue": 0.5}),
    _case("sgd_global_clipnorm", "SGD", {"learning_rate": 0.05, "global_clipnorm": 0.5}),
    _case("adadelta_global_clipnorm", "Adadelta", {"learning_rate": 1.0, "global_clipnorm": 1.0}),
    _case("nadam_global_clipnorm", "Nadam", {"learning_rate": 0.01, "global_clipnorm": 0.7}),
    # ---- EMA
    _case("sgd_ema", "SGD", {"learning_rate": 0.05, "momentum": 0.9, "use_ema": True}),
    _case("adam_ema", "Adam", {"learning_rate": 0.01, "use_ema": True, "ema_momentum": 0.9}),
    _case(
        "rmsprop_ema_overwrite",
        "RMSprop",
        {"learning_rate": 0.01, "use_ema": True, "ema_momentum": 0.8, "ema_overwrite_frequency": 5},
    ),
    _case(
        "adamw_ema_overwrite",
        "AdamW",
        {"learning_rate": 0.01, "use_ema": True, "ema_momentum": 0.5, "ema_overwrite_frequency": 3},
    ),
    _case(
        "adagrad_ema_overwrite",
        "Adagrad",
        {"learning_rate": 0.1, "use_ema": True, "ema_overwrite_frequency": 7},
    ),
    _case(
        "adamax_ema_overwrite",
        "Adamax",
        {"learning_rate": 0.02, "use_ema": True, "ema_momentum": 0.7, "ema_overwrite_frequency": 1},
    ),
    # ---- loss_scale_factor, gradient_accumulation_steps, name
    _case("adam_loss_scale", "Adam", {"learning_rate": 0.01, "loss_scale_factor": 128.0, "name": "scaled"}),
    _case("sgd_loss_scale", "SGD", {"learning_rate": 2.0, "momentum": 0.5, "loss_scale_factor": 64.0}),
    _case(
        "sgd_accumulation", "SGD", {"learning_rate": 0.05, "momentum": 0.9, "gradient_accumulation_steps": 3}
    ),
    _case(
        "nadam_accumulation",
        "Nadam",
        {"learning_rate": 0.02, "gradient_accumulation_steps": 4, "weight_decay": 0.1, "clipnorm": 1.0},
    ),
    _case(
        "adam_accumulation_ema_schedule",
        "Adam",
        {
            "gradient_accumulation_steps": 2,
            "use_ema": True,
            "ema_momentum": 0.7,
            "ema_overwrite_frequency": 4,
            "weight_decay": 0.1,
        },
        _sched("ExponentialDecay", initial_learning_rate=0.02, decay_steps=7, decay_rate=0.6),
    ),
    # ---- an optimizer run with each schedule
    _case("rmsprop_exponential", "RMSprop", {"momentum": 0.9}, EXP),
    _case("sgd_piecewise", "SGD", {"momentum": 0.9}, PIECEWISE),
    _case("adam_cosine", "Adam", {}, COSINE),
    _case("nadam_cosine_warmup", "Nadam", {}, COSINE_WARMUP),
    _case("adagrad_inverse_time", "Adagrad", {}, INVERSE),
    _case("adadelta_polynomial", "Adadelta", {"rho": 0.9, "epsilon": 1e-4}, POLY),
    # ---- the whole recipe
    _case(
        "rmsprop_recipe",
        "RMSprop",
        {
            "rho": 0.95,
            "momentum": 0.8,
            "centered": True,
            "epsilon": 1e-6,
            "weight_decay": 0.1,
            "clipnorm": 0.8,
            "use_ema": True,
            "ema_momentum": 0.9,
            "ema_overwrite_frequency": 10,
        },
        _sched("CosineDecay", initial_learning_rate=0.01, decay_steps=50, alpha=0.05),
    ),
    _case(
        "adamw_recipe",
        "AdamW",
        {
            "weight_decay": 0.05,
            "amsgrad": True,
            "global_clipnorm": 1.0,
            "use_ema": True,
            "ema_momentum": 0.95,
            "gradient_accumulation_steps": 2,
        },
        _sched("CosineDecay", initial_learning_rate=0.0, decay_steps=30, warmup_target=0.02, warmup_steps=8),
        exclude=["b"],
    ),
]

SCHEDULE_CASES = [
    (
        "schedule_exponential",
        _sched("ExponentialDecay", initial_learning_rate=0.1, decay_steps=30, decay_rate=0.8),
    ),
    (
        "schedule_exponential_staircase",
        _sched("ExponentialDecay", initial_learning_rate=0.1, decay_steps=25, decay_rate=0.5, staircase=True),
    ),
    (
        "schedule_piecewise",
        _sched("PiecewiseConstantDecay", boundaries=[50, 120, 200], values=[0.1, 0.05, 0.01, 0.001]),
    ),
    ("schedule_cosine", _sched("CosineDecay", initial_learning_rate=0.1, decay_steps=250, alpha=0.02)),
    (
        "schedule_cosine_warmup",
        _sched(
            "CosineDecay",
            initial_learning_rate=0.001,
            decay_steps=200,
            alpha=0.1,
            warmup_target=0.05,
            warmup_steps=40,
        ),
    ),
    (
        "schedule_inverse_time",
        _sched("InverseTimeDecay", initial_learning_rate=0.1, decay_steps=10, decay_rate=0.3),
    ),
    (
        "schedule_inverse_time_staircase",
        _sched("InverseTimeDecay", initial_learning_rate=0.1, decay_steps=40, decay_rate=1.5, staircase=True),
    ),
    (
        "schedule_polynomial",
        _sched(
            "PolynomialDecay", initial_learning_rate=0.1, decay_steps=200, end_learning_rate=0.001, power=0.5
        ),
    ),
    (
        "schedule_polynomial_cycle",
        _sched(
            "PolynomialDecay",
            initial_learning_rate=0.1,
            decay_steps=70,
            end_learning_rate=0.005,
            power=2.0,
            cycle=True,
        ),
    ),
]


# --------------------------------------------------------------------------- runners


def _keras():
    keras = GEN._import_keras()
    keras.config.set_floatx("float64")
    return keras


def _schedule(keras, spec):
    return getattr(keras.optimizers.schedules, spec["class"])(**spec["kwargs"])


def run_optimizer(case: dict, init: dict, coef: dict) -> dict:
    keras = _keras()
    import jax.numpy as jnp
    from keras import ops

    variables = {n: keras.Variable(init[n], dtype="float64", name=n) for n in LEAVES}
    co = {n: {k: ops.convert_to_tensor(v, dtype="float64") for k, v in coef[n].items()} for n in LEAVES}
    kwargs = dict(case["kwargs"])
    if case["schedule"] is not None:
        kwargs["learning_rate"] = _schedule(keras, case["schedule"])
    opt = getattr(keras.optimizers, case["optimizer"])(**kwargs)
    if case["exclude"] is not None:
        opt.exclude_from_weight_decay(var_names=case["exclude"])
    ordered = [variables[n] for n in LEAVES]
    traj = {n: [] for n in LEAVES}
    ema = {n: [] for n in LEAVES}
    for _ in range(STEPS):
        # jnp.sin, not keras.ops.sin, which computes float64 in float32 (see generate.py).
        grads = [
            co[n]["a"] * variables[n].value + co[n]["b"] * jnp.sin(variables[n].value) + co[n]["c"]
            for n in LEAVES
        ]
        opt.apply_gradients(zip(grads, ordered))
        for i, n in enumerate(LEAVES):
            value = np.asarray(ops.convert_to_numpy(variables[n].value))
            assert value.dtype == np.float64, value.dtype
            traj[n].append(value.copy())
            if kwargs.get("use_ema"):
                average = np.asarray(ops.convert_to_numpy(opt._model_variables_moving_average[i].value))
                assert average.dtype == np.float64, average.dtype
                ema[n].append(average.copy())
    out = {f"traj_{n}": np.stack(traj[n]) for n in LEAVES}
    if kwargs.get("use_ema"):
        out.update({f"ema_{n}": np.stack(ema[n]) for n in LEAVES})
    return out


def build_optimizer_case(case: dict, versions: dict) -> dict:
    init, coef = GEN.problem(False)
    arrays = run_optimizer(case, init, coef)
    meta = {
        "framework": "keras",
        "optimizer": case["optimizer"],
        "kwargs": case["kwargs"],
        "schedule": case["schedule"],
        "exclude": case["exclude"],
        "steps": STEPS,
        "leaves": list(LEAVES),
        "versions": versions,
    }
    out = {"meta": np.array(json.dumps(meta, sort_keys=True))}
    for n in LEAVES:
        out[f"init_{n}"] = init[n]
        for k in ("a", "b", "c"):
            out[f"{k}_{n}"] = coef[n][k]
    for key, value in arrays.items():
        if not np.all(np.isfinite(value)):
            raise RuntimeError(f"{case['name']}: non-finite {key}")
        out[key] = value
    return out


def build_schedule_case(spec: dict, versions: dict) -> dict:
    keras = _keras()
    from keras import ops

    schedule = _schedule(keras, spec)
    values = []
    for step in range(SCHEDULE_STEPS):
        value = schedule(ops.convert_to_tensor(step, dtype="int32"))
        values.append(float(np.asarray(ops.convert_to_numpy(value)).astype(np.float64)))
    meta = {"class": spec["class"], "kwargs": spec["kwargs"], "steps": SCHEDULE_STEPS, "versions": versions}
    return {"meta": np.array(json.dumps(meta, sort_keys=True)), "values": np.asarray(values, np.float64)}


def versions() -> dict:
    import jax

    keras = _keras()
    return {"numpy": np.__version__, "keras": keras.__version__, "jax": jax.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="compare with the committed fixtures, write nothing"
    )
    parser.add_argument(
        "--rtol", type=float, default=0.0, help="tolerance for --check (default: bit-for-bit)"
    )
    parser.add_argument("--only", default=None, help="run only cases whose name contains this string")
    args = parser.parse_args(argv)

    vers = versions()
    jobs = [(c["name"], lambda c=c: build_optimizer_case(c, vers)) for c in CASES]
    jobs += [(name, lambda s=spec: build_schedule_case(s, vers)) for name, spec in SCHEDULE_CASES]
    names = [name for name, _ in jobs]
    assert len(set(names)) == len(names), "duplicate case names"
    jobs = [(name, build) for name, build in jobs if args.only is None or args.only in name]
    FIXTURES.mkdir(parents=True, exist_ok=True)
    failures, written = [], 0
    for name, build in jobs:
        arrays = build()
        path = FIXTURES / f"{name}.npz"
        diffs = GEN.compare(arrays, path, args.rtol)
        if args.check:
            failures.extend(diffs)
        elif diffs:
            np.savez_compressed(path, **arrays)
            written += 1
    if args.only is None:
        known = {f"{name}.npz" for name in names}
        extra = sorted(p.name for p in FIXTURES.glob("*.npz") if p.name not in known)
        if args.check:
            failures.extend(f"{name}: no case generates it" for name in extra)
        else:
            for name in extra:
                (FIXTURES / name).unlink()
    if args.check:
        for line in failures:
            print("MISMATCH", line)
        print(f"check {'FAILED' if failures else 'OK'}: {len(jobs)} cases, {len(failures)} mismatches")
        return 1 if failures else 0
    total = sum(p.stat().st_size for p in FIXTURES.glob("*.npz"))
    print(f"{len(jobs)} cases, {written} fixture(s) written, {total / 1024:.1f} KiB in total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
