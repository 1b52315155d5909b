"""rmsjax.compat.torch.lr_scheduler against PyTorch 2.13's schedulers.

The fixture (tests/reference/generate_schedulers.py) holds, per configuration, the learning
rate PyTorch's optimizer has before each ``optimizer.step()`` when the scheduler is stepped
after it; a schedule with ``steps_per_epoch=k`` must give epoch ``count // k``'s rate.
float64 is checked to 1e-12 relative at every count, float32 to 1e-6 of the largest rate.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rmsjax.compat import torch as pt
from rmsjax.compat.torch import lr_scheduler as lrs

# Recorded-framework fixtures (hundreds of cases): run by the default `pytest`, left out of
# the pinned-version CI stages (-m "not slow"), which check the core on other jax versions.
pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).parent / "reference" / "fixtures_schedulers" / "schedulers.json"
DATA = json.loads(FIXTURE.read_text())
CONFIGS = {c["name"]: c for c in DATA["configurations"]}
SCHEDULES = [n for n, c in CONFIGS.items() if c["scheduler"] != "ReduceLROnPlateau"]
PLATEAUS = [n for n, c in CONFIGS.items() if c["scheduler"] == "ReduceLROnPlateau"]
RTOL64 = 1e-12
RTOL32 = 1e-6  # of the largest rate of the configuration


def _build(spec: dict, steps_per_epoch: int = 1):
    kwargs = dict(spec["kwargs"])
    if spec["scheduler"] == "SequentialLR":
        kwargs["schedulers"] = [_build({**part, "lr": spec["lr"]}) for part in kwargs["schedulers"]]
    if spec["scheduler"] != "OneCycleLR" and steps_per_epoch != 1:
        kwargs["steps_per_epoch"] = steps_per_epoch
    return getattr(lrs, spec["scheduler"])(spec["lr"], **kwargs)


def _steps_per_epoch(spec: dict) -> list[int]:
    # OneCycleLR is stepped per update (its steps_per_epoch is PyTorch's, for total_steps)
    return [1] if spec["scheduler"] == "OneCycleLR" else [1, 3]


def _relative(ours: np.ndarray, theirs: np.ndarray) -> float:
    differ = ours != theirs
    if not differ.any():
        return 0.0
    return float(np.max(np.abs(ours - theirs)[differ] / np.abs(theirs)[differ]))


def _evaluate(schedule, counts: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(jax.vmap(schedule))(jnp.asarray(counts, jnp.int32)), np.float64)


# ---------------------------------------------------------------- the fixture itself


def test_fixture_covers_every_scheduler():
    assert DATA["torch"] == "2.13.0"
    per_scheduler = {}
    for spec in CONFIGS.values():
        per_scheduler.setdefault(spec["scheduler"], []).append(spec["name"])
        assert 100 <= spec["epochs"] <= 301, spec["name"]
        assert len(spec["lrs"]) == spec["epochs"]
    wanted = {name for name in lrs.__all__ if name not in ("TorchSchedule", "ReduceLROnPlateauState")}
    assert set(per_scheduler) == wanted
    for name, configs in per_scheduler.items():
        assert len(configs) >= 2, name


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("name", SCHEDULES)
def test_float64_matches_torch(name):
    spec = CONFIGS[name]
    theirs = np.asarray(spec["lrs"])
    with jax.enable_x64(True):
        for k in _steps_per_epoch(spec):
            counts = np.arange(spec["epochs"] * k)
            ours = _evaluate(_build(spec, k), counts)
            assert ours.dtype == np.float64
            err = _relative(ours, theirs[counts // k])
            assert err <= RTOL64, f"{name}, steps_per_epoch={k}: relative error {err:.2e}"


@pytest.mark.parametrize("name", SCHEDULES)
def test_float32_close_to_torch(name):
    spec = CONFIGS[name]
    theirs = np.asarray(spec["lrs"])
    schedule = _build(spec)
    assert schedule(0).dtype == jnp.float32
    ours = _evaluate(schedule, np.arange(spec["epochs"]))
    err = float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))
    assert err <= RTOL32, f"{name}: error {err:.2e} of the largest rate"


@pytest.mark.parametrize("name", [n for n in SCHEDULES if CONFIGS[n]["scheduler"] == "OneCycleLR"])
def test_one_cycle_momentum_matches_torch(name):
    spec = CONFIGS[name]
    with jax.enable_x64(True):
        momentum = _build(spec).momentum
        ours = _evaluate(momentum, np.arange(spec["epochs"]))
    assert _relative(ours, np.asarray(spec["momenta"])) <= RTOL64
    assert lrs.OneCycleLR(0.1, 1.0, total_steps=10, cycle_momentum=False).momentum is None


def test_exact_where_pytorch_recursion_is_replayed():
    """Tabulated schedulers give PyTorch's float64 numbers bit for bit."""
    with jax.enable_x64(True):
        for name in SCHEDULES:
            spec = CONFIGS[name]
            if spec["scheduler"] in ("MultiStepLR", "LinearLR", "ConstantLR", "PolynomialLR", "OneCycleLR"):
                ours = _evaluate(_build(spec), np.arange(spec["epochs"]))
                np.testing.assert_array_equal(ours, spec["lrs"], err_msg=name)


# ---------------------------------------------------------------- jit, tracing, dtypes


@pytest.mark.parametrize("name", SCHEDULES)
def test_jit_and_eager_agree(name):
    """To an ulp: XLA may compile the cosine of CosineAnnealingWarmRestarts differently when fused."""
    spec = CONFIGS[name]
    counts = [0, 1, 2, 5, 17, 2 * spec["epochs"] - 1]
    for x64, dtype in ((True, jnp.float64), (False, jnp.float32)):
        with jax.enable_x64(x64):
            schedule = _build(spec, 2)
            jitted = jax.jit(schedule)
            for count in counts:
                eager = schedule(count)
                assert eager.shape == () and eager.dtype == dtype
                if x64:  # XLA's fused cos may differ from the eager one by an ulp
                    np.testing.assert_allclose(jitted(jnp.int32(count)), eager, rtol=5e-16, atol=0)
                else:
                    np.testing.assert_allclose(
                        jitted(jnp.int32(count)), eager, rtol=1e-6, atol=1e-6 * spec["lr"]
                    )
            # one compilation for every count
            assert jitted._cache_size() == 1


def test_traced_count_inside_a_loop():
    schedule = lrs.StepLR(0.1, 3, gamma=0.5, steps_per_epoch=2)

    def body(i, total):
        return total + schedule(i)

    total = jax.jit(lambda n: jax.lax.fori_loop(0, n, body, jnp.float32(0)))(12)
    expected = sum(0.1 * 0.5 ** ((i // 2) // 3) for i in range(12))
    np.testing.assert_allclose(total, expected, rtol=1e-6)


def test_counts_beyond_the_fixture():
    with jax.enable_x64(True):
        # OneCycleLR holds PyTorch's last computed rate (PyTorch raises beyond)
        one_cycle = lrs.OneCycleLR(0.0, 1.0, total_steps=50)
        assert float(one_cycle(50)) == float(one_cycle(10**6))
        # CosineAnnealingLR continues with period 2 * T_max
        cosine = lrs.CosineAnnealingLR(1.0, T_max=10)
        np.testing.assert_allclose(cosine(20 * 10**4 + 3), cosine(3), rtol=1e-12)
        # large counts do not overflow
        assert float(lrs.ExponentialLR(1.0, 0.5)(2**31 - 1)) == 0.0
        assert float(lrs.StepLR(1.0, 1, gamma=1.0)(2**31 - 1)) == 1.0


def test_counts_must_be_integers():
    with pytest.raises(TypeError, match="integer"):
        lrs.StepLR(0.1, 3)(1.5)


# ---------------------------------------------------------------- PyTorch quirks, spelled out


def test_quirks():
    with jax.enable_x64(True):
        # MultiStepLR: a milestone listed n times decays by gamma**n, in any order
        s = lrs.MultiStepLR(1.0, [5, 2, 5], gamma=0.5)
        assert [float(s(e)) for e in (1, 2, 4, 5)] == [1.0, 0.5, 0.5, 0.125]
        # ConstantLR(total_iters=0) never undoes its factor ...
        assert float(lrs.ConstantLR(1.0, 0.25, total_iters=0)(100)) == 0.25
        # ... but, after a SequentialLR milestone, PyTorch's closed form undoes it at once
        seq = lrs.SequentialLR(1.0, [lrs.StepLR(1.0, 100), lrs.ConstantLR(1.0, 0.25, total_iters=0)], [3])
        assert float(seq(3)) == 1.0 * (0.25 + 1 * (1 - 0.25))
        # CosineAnnealingLR restarted by SequentialLR starts from its closed form
        seq = lrs.SequentialLR(0.3, [lrs.StepLR(0.3, 100), lrs.CosineAnnealingLR(0.3, 5, eta_min=0.1)], [2])
        assert float(seq(2)) == 0.1 + (0.3 - 0.1) * (1 + math.cos(0.0)) / 2
        # LinearLR(total_iters=0) keeps start_factor
        assert float(lrs.LinearLR(1.0, 0.5, total_iters=0)(7)) == 0.5


# ---------------------------------------------------------------- ReduceLROnPlateau


def _plateau(spec, steps_per_epoch, *, jit=True):
    tx = lrs.ReduceLROnPlateau(spec["lr"], **spec["kwargs"], steps_per_epoch=steps_per_epoch)
    state = tx.init(jnp.zeros(2))
    update = jax.jit(tx.update) if jit else tx.update
    rates, ratios = [], []
    for metric in spec["metrics"]:
        for _ in range(steps_per_epoch):
            rates.append(float(state.lr))
            updates, state = update(jnp.ones(2), state, value=metric)
            ratios.append(float(updates[0]))
    return np.asarray(rates), np.asarray(ratios)


@pytest.mark.parametrize("name", PLATEAUS)
def test_reduce_on_plateau_matches_torch(name):
    spec = CONFIGS[name]
    theirs = np.asarray(spec["lrs"])
    assert len(np.unique(theirs)) >= 3, "the fixture should reduce the rate at least twice"
    with jax.enable_x64(True):
        for k in (1, 3):
            rates, ratios = _plateau(spec, k)
            expected = np.repeat(theirs, k)
            np.testing.assert_array_equal(rates, expected, err_msg=f"{name}, steps_per_epoch={k}")
            np.testing.assert_allclose(ratios, expected / spec["lr"], rtol=1e-15)
    rates32, _ = _plateau(spec, 1, jit=False)
    np.testing.assert_allclose(rates32, theirs, rtol=1e-6)


def test_reduce_on_plateau_averages_the_epoch():
    tx = lrs.ReduceLROnPlateau(1.0, patience=0, threshold=0.0, steps_per_epoch=2)
    state = tx.init(jnp.zeros(1))
    for value in [3.0, 1.0, 2.5, 1.5]:  # means 2.0 then 2.0: no improvement
        _, state = tx.update(jnp.ones(1), state, value=value)
    assert float(state.lr) == pytest.approx(0.1) and int(state.count) == 0


def test_reduce_on_plateau_chained_with_a_compat_optimizer():
    """optax.chain(pt.SGD(lr), ReduceLROnPlateau(lr)) steps with PyTorch's reduced rate."""
    spec = CONFIGS["plateau_patience"]
    with jax.enable_x64(True):
        lr = spec["lr"]
        plateau = lrs.ReduceLROnPlateau(lr, **spec["kwargs"], steps_per_epoch=2)
        tx = optax.chain(pt.SGD(lr=lr, momentum=0.5), plateau)
        params = jnp.array([1.0, -2.0])
        state = tx.init(params)
        buffer, reference = np.zeros(2), np.array([1.0, -2.0])
        step = jax.jit(tx.update)
        for epoch, metric in enumerate(spec["metrics"][:60]):
            for _ in range(2):
                grad = 2 * params
                updates, state = step(grad, state, params, value=metric)
                params = optax.apply_updates(params, updates)
                g = 2 * reference
                buffer = g if not buffer.any() else 0.5 * buffer + g
                reference = reference - spec["lrs"][epoch] * buffer
                np.testing.assert_allclose(params, reference, rtol=1e-12, atol=1e-300)


# ---------------------------------------------------------------- end to end


def test_sgd_with_step_lr_reproduces_torch_fixture():
    run = DATA["end_to_end"]
    with jax.enable_x64(True):
        schedule = lrs.StepLR(
            run["lr"], run["step_size"], gamma=run["gamma"], steps_per_epoch=run["steps_per_epoch"]
        )
        tx = pt.SGD(lr=schedule, momentum=run["momentum"])
        params, target = jnp.asarray(run["init"]), jnp.asarray(run["target"])
        state = tx.init(params)
        step = jax.jit(tx.update)
        for expected in run["trajectory"]:
            updates, state = step(3 * (params - target) + jnp.sin(params), state, params)
            params = optax.apply_updates(params, updates)
            np.testing.assert_allclose(params, expected, rtol=1e-12, atol=1e-15)


HAVE_TORCH = importlib.util.find_spec("torch") is not None


@pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed")
def test_sgd_with_step_lr_reproduces_live_torch():
    import torch

    init, target, k = [0.7, -1.3], [0.2, 0.4], 5
    p = torch.tensor(init, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(target, dtype=torch.float64)
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.8, nesterov=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3)
    theirs = []
    for _ in range(10):
        for _ in range(k):
            with torch.no_grad():
                p.grad = 3 * (p - t) + torch.sin(p)
            opt.step()
            theirs.append(p.detach().numpy().copy())
        sched.step()
    with jax.enable_x64(True):
        tx = pt.SGD(lr=lrs.StepLR(0.1, 3, steps_per_epoch=k), momentum=0.8, nesterov=True)
        params, tgt = jnp.asarray(init), jnp.asarray(target)
        state = tx.init(params)
        for expected in theirs:
            updates, state = tx.update(3 * (params - tgt) + jnp.sin(params), state, params)
            params = optax.apply_updates(params, updates)
            np.testing.assert_allclose(params, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed")
def test_live_torch_fresh_configurations():
    """Configurations not in the fixture, run through PyTorch now."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "reference"))
    try:
        import generate_schedulers as gen
    finally:
        sys.path.pop(0)
    specs = [
        {"scheduler": "CosineAnnealingLR", "kwargs": {"T_max": 17, "eta_min": 0.002}, "lr": 0.07,
         "epochs": 120},
        {"scheduler": "LinearLR", "kwargs": {"start_factor": 0.37, "end_factor": 0.11, "total_iters": 33},
         "lr": 0.9, "epochs": 60},
        {"scheduler": "PolynomialLR", "kwargs": {"total_iters": 41, "power": 3.3}, "lr": 0.4, "epochs": 60},
        {"scheduler": "OneCycleLR", "kwargs": {"max_lr": 0.8, "total_steps": 77, "pct_start": 0.45},
         "lr": 0.1, "epochs": 78},
        {"scheduler": "CosineAnnealingWarmRestarts", "kwargs": {"T_0": 3, "T_mult": 4, "eta_min": 0.01},
         "lr": 0.2, "epochs": 120},
        {"scheduler": "SequentialLR", "kwargs": {
            "schedulers": [{"scheduler": "ConstantLR", "kwargs": {"factor": 0.6, "total_iters": 3}},
                           {"scheduler": "PolynomialLR", "kwargs": {"total_iters": 30, "power": 2.0}},
                           {"scheduler": "CosineAnnealingLR", "kwargs": {"T_max": 9}}],
            "milestones": [7, 50]}, "lr": 0.3, "epochs": 120},
    ]
    with jax.enable_x64(True):
        for spec in specs:
            theirs = np.asarray(gen.run(spec)["lrs"])
            ours = _evaluate(_build(spec), np.arange(spec["epochs"]))
            assert _relative(ours, theirs) <= RTOL64, spec


# ---------------------------------------------------------------- validation

BAD = [
    (lambda: lrs.StepLR(0.1, -1), ValueError, "step_size"),
    (lambda: lrs.StepLR(0.1, 0), ValueError, "step_size"),
    (lambda: lrs.StepLR(0.1, 2.5), TypeError, "step_size"),
    (lambda: lrs.StepLR(0.1, 3, gamma=0.0), ValueError, "gamma"),
    (lambda: lrs.StepLR(0.1, 3, gamma=-0.5), ValueError, "gamma"),
    (lambda: lrs.StepLR(-0.1, 3), ValueError, "lr"),
    (lambda: lrs.StepLR(float("nan"), 3), ValueError, "lr"),
    (lambda: lrs.StepLR(0.1, 3, steps_per_epoch=0), ValueError, "steps_per_epoch"),
    (lambda: lrs.StepLR(0.1, 3, steps_per_epoch=1.5), TypeError, "steps_per_epoch"),
    (lambda: lrs.MultiStepLR(0.1, [3, -1]), ValueError, r"milestones\[1\]"),
    (lambda: lrs.MultiStepLR(0.1, [3, 4.5]), TypeError, r"milestones\[1\]"),
    (lambda: lrs.MultiStepLR(0.1, 3), TypeError, "milestones"),
    (lambda: lrs.MultiStepLR(0.1, [3], gamma=float("inf")), ValueError, "gamma"),
    (lambda: lrs.ExponentialLR(0.1, 0.0), ValueError, "gamma"),
    (lambda: lrs.CosineAnnealingLR(0.1, 0), ValueError, "T_max"),
    (lambda: lrs.CosineAnnealingLR(0.1, 10, eta_min=-1.0), ValueError, "eta_min"),
    (lambda: lrs.CosineAnnealingLR(0.1, 10**7), ValueError, "T_max"),
    (lambda: lrs.LinearLR(0.1, start_factor=0.0), ValueError, "start_factor"),
    (lambda: lrs.LinearLR(0.1, start_factor=1.5), ValueError, "start_factor"),
    (lambda: lrs.LinearLR(0.1, end_factor=-0.1), ValueError, "end_factor"),
    (lambda: lrs.LinearLR(0.1, total_iters=-1), ValueError, "total_iters"),
    (lambda: lrs.ConstantLR(0.1, factor=1.5), ValueError, "factor"),
    (lambda: lrs.ConstantLR(0.1, factor=0.0), ValueError, "factor"),
    (lambda: lrs.ConstantLR(0.1, total_iters=-2), ValueError, "total_iters"),
    (lambda: lrs.PolynomialLR(0.1, total_iters=-1), ValueError, "total_iters"),
    (lambda: lrs.PolynomialLR(0.1, power=-1.0), ValueError, "power"),
    (lambda: lrs.CosineAnnealingWarmRestarts(0.1, 0), ValueError, "T_0"),
    (lambda: lrs.CosineAnnealingWarmRestarts(0.1, 2.0), TypeError, "T_0"),
    (lambda: lrs.CosineAnnealingWarmRestarts(0.1, 5, T_mult=0), ValueError, "T_mult"),
    (lambda: lrs.CosineAnnealingWarmRestarts(0.1, 5, eta_min="0"), TypeError, "eta_min"),
    (lambda: lrs.OneCycleLR(0.1, 1.0), ValueError, "total_steps"),
    (lambda: lrs.OneCycleLR(0.1, 1.0, total_steps=0), ValueError, "total_steps"),
    (lambda: lrs.OneCycleLR(0.1, 1.0, epochs=0, steps_per_epoch=3), ValueError, "epochs"),
    (lambda: lrs.OneCycleLR(0.1, 1.0, epochs=2, steps_per_epoch=-3), ValueError, "steps_per_epoch"),
    (lambda: lrs.OneCycleLR(0.1, 1.0, total_steps=10, pct_start=1.5), ValueError, "pct_start"),
    (lambda: lrs.OneCycleLR(0.1, 1.0, total_steps=10, pct_start=0.1), ValueError, "pct_start"),
    (lambda: lrs.OneCycleLR(0.1, 1.0, total_steps=10, anneal_strategy="exp"), ValueError, "anneal_strategy"),
    (lambda: lrs.OneCycleLR(0.1, -1.0, total_steps=10), ValueError, "max_lr"),
    (lambda: lrs.OneCycleLR(0.1, 1.0, total_steps=10, div_factor=0.0), ValueError, "div_factor"),
    (lambda: lrs.OneCycleLR(0.1, 1.0, total_steps=10, final_div_factor=-1.0), ValueError, "final_div_factor"),
    (lambda: lrs.OneCycleLR(0.1, 1.0, total_steps=10, base_momentum=1.5), ValueError, "base_momentum"),
    (lambda: lrs.OneCycleLR(0.1, 1.0, total_steps=10, cycle_momentum=1), TypeError, "cycle_momentum"),
    (lambda: lrs.SequentialLR(0.1, [], []), ValueError, "schedulers"),
    (lambda: lrs.SequentialLR(0.1, [lrs.StepLR(0.1, 2)], [3]), ValueError, "milestones"),
    (lambda: lrs.SequentialLR(0.1, [lrs.StepLR(0.1, 2), lrs.StepLR(0.1, 3), lrs.StepLR(0.1, 4)], [5, 3]),
     ValueError, "milestones"),
    (lambda: lrs.SequentialLR(0.1, [lrs.StepLR(0.1, 2), lrs.StepLR(0.2, 3)], [5]), ValueError,
     r"schedulers\[1\]"),
    (lambda: lrs.SequentialLR(0.1, [lrs.StepLR(0.1, 2), lrs.StepLR(0.1, 3, steps_per_epoch=2)], [5]),
     ValueError, "steps_per_epoch"),
    (lambda: lrs.SequentialLR(0.1, [lrs.StepLR(0.1, 2), lrs.OneCycleLR(0.1, 1.0, total_steps=9)], [5]),
     ValueError, "OneCycleLR"),
    (lambda: lrs.SequentialLR(0.1, [lrs.StepLR(0.1, 2), lrs.ReduceLROnPlateau(0.1)], [5]), ValueError,
     "ReduceLROnPlateau"),
    (lambda: lrs.SequentialLR(0.1, [lrs.StepLR(0.1, 2), lambda n: 0.1], [5]), TypeError, r"schedulers\[1\]"),
    (lambda: lrs.SequentialLR(0.1, [lrs.StepLR(0.1, 2), lrs.LinearLR(0.1, total_iters=0)], [5]), ValueError,
     "total_iters"),
    (lambda: lrs.ReduceLROnPlateau(0.1, mode="mean"), ValueError, "mode"),
    (lambda: lrs.ReduceLROnPlateau(0.1, factor=1.0), ValueError, "factor"),
    (lambda: lrs.ReduceLROnPlateau(0.1, patience=-1), ValueError, "patience"),
    (lambda: lrs.ReduceLROnPlateau(0.1, threshold=-1e-4), ValueError, "threshold"),
    (lambda: lrs.ReduceLROnPlateau(0.1, threshold_mode="max"), ValueError, "threshold_mode"),
    (lambda: lrs.ReduceLROnPlateau(0.1, cooldown=-1), ValueError, "cooldown"),
    (lambda: lrs.ReduceLROnPlateau(0.1, min_lr=-0.1), ValueError, "min_lr"),
    (lambda: lrs.ReduceLROnPlateau(0.1, min_lr=[0.1]), TypeError, "min_lr"),
    (lambda: lrs.ReduceLROnPlateau(0.1, eps=-1.0), ValueError, "eps"),
    (lambda: lrs.ReduceLROnPlateau(0.1, steps_per_epoch=0), ValueError, "steps_per_epoch"),
]


@pytest.mark.parametrize("make,error,argument", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_arguments_fail_at_construction(make, error, argument):
    with pytest.raises(error, match=argument):
        make()


# ---------------------------------------------------------------- public surface


def test_public_names_are_documented():
    assert lrs.__all__ == sorted(lrs.__all__)
    assert "lr_scheduler" in pt.__all__ and pt.lr_scheduler is lrs
    for name in lrs.__all__:
        doc = inspect.getdoc(getattr(lrs, name))
        assert doc, name
        if name not in ("TorchSchedule", "ReduceLROnPlateauState"):
            assert "Example" in doc and ">>>" in doc and "math::" in doc, name


def test_signatures_follow_pytorch():
    import inspect as _inspect

    def params(f):
        return [(p.name, p.default) for p in _inspect.signature(f).parameters.values()]

    assert params(lrs.StepLR) == [("lr", _inspect.Parameter.empty), ("step_size", _inspect.Parameter.empty),
                                  ("gamma", 0.1), ("steps_per_epoch", 1)]
    assert params(lrs.LinearLR)[1:4] == [("start_factor", 1 / 3), ("end_factor", 1.0), ("total_iters", 5)]
    assert params(lrs.CosineAnnealingLR)[1:3] == [("T_max", _inspect.Parameter.empty), ("eta_min", 0.0)]
    assert [n for n, _ in params(lrs.OneCycleLR)] == [
        "lr", "max_lr", "total_steps", "epochs", "steps_per_epoch", "pct_start", "anneal_strategy",
        "cycle_momentum", "base_momentum", "max_momentum", "div_factor", "final_div_factor", "three_phase"]
    for f in (lrs.StepLR, lrs.MultiStepLR, lrs.ExponentialLR, lrs.SequentialLR, lrs.ReduceLROnPlateau):
        assert _inspect.signature(f).parameters["steps_per_epoch"].kind is _inspect.Parameter.KEYWORD_ONLY


@pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed")
def test_one_cycle_with_cycled_momentum_reproduces_live_torch():
    """optax.inject_hyperparams(pt.SGD)(lr=s, momentum=s.momentum) is SGD with OneCycleLR."""
    import torch

    init, target = [0.7, -1.3], [0.2, 0.4]
    p = torch.tensor(init, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(target, dtype=torch.float64)
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=30)
    theirs = []
    for _ in range(30):
        with torch.no_grad():
            p.grad = 3 * (p - t) + torch.sin(p)
        opt.step()
        sched.step()
        theirs.append(p.detach().numpy().copy())
    with jax.enable_x64(True):
        schedule = lrs.OneCycleLR(0.1, max_lr=0.5, total_steps=30)
        tx = optax.inject_hyperparams(pt.SGD)(lr=schedule, momentum=schedule.momentum)
        params, tgt = jnp.asarray(init), jnp.asarray(target)
        state = tx.init(params)
        step = jax.jit(tx.update)
        for expected in theirs:
            updates, state = step(3 * (params - tgt) + jnp.sin(params), state, params)
            params = optax.apply_updates(params, updates)
            np.testing.assert_allclose(params, expected, rtol=1e-12, atol=1e-15)
