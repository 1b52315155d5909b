"""Records PyTorch 2.13's learning-rate schedulers, for tests/test_lr_scheduler.py.

For every configuration: one dummy parameter, ``torch.optim.SGD`` with the initial learning
rate, the scheduler, then ``epochs`` times ``optimizer.step(); scheduler.step()``, recording
``optimizer.param_groups[0]['lr']`` before each optimizer step (the rate of update number
``epoch`` when the scheduler is stepped once per update; the test expands it for
``steps_per_epoch > 1``). ReduceLROnPlateau is stepped with a fixed loss sequence. One
end-to-end trajectory of SGD with StepLR stepped per epoch of several batches is recorded
too. Floats are written with ``repr`` (JSON round-trips float64 exactly).

    python tests/reference/generate_schedulers.py          # writes the fixture
    python tests/reference/generate_schedulers.py --check  # regenerates in memory, compares bit for bit

Needs torch==2.13.0 (the ``reference`` extra); nothing at runtime does.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

FIXTURE = Path(__file__).parent / "fixtures_schedulers" / "schedulers.json"
TORCH_VERSION = "2.13.0"


def _plateau_losses() -> list[float]:
    """A loss with descents, exact plateaus, noise and a rise: 160 epochs, reproducible."""
    losses, x = [], 4.0
    for e in range(160):
        if e % 40 < 12:
            x = x * 0.9  # improving
        elif e % 40 < 25:
            pass  # exact plateau
        elif e % 40 < 30:
            x = x * (1 - 5e-5)  # below the default relative threshold
        else:
            x = x + 0.01 * math.sin(e)  # noise
        losses.append(x)
    return losses


def configurations() -> list[dict]:
    """(name, scheduler, kwargs, lr, epochs); SequentialLR's parts are nested specs."""
    c = []

    def add(name, scheduler, kwargs, lr=0.1, epochs=200, **extra):
        spec = {"name": name, "scheduler": scheduler, "kwargs": kwargs, "lr": lr, "epochs": epochs}
        c.append({**spec, **extra})

    add("step_basic", "StepLR", {"step_size": 3})
    add("step_gamma", "StepLR", {"step_size": 7, "gamma": 0.7}, lr=0.3, epochs=300)
    add("step_one", "StepLR", {"step_size": 1, "gamma": 0.97}, lr=1.0, epochs=300)
    add("multistep_basic", "MultiStepLR", {"milestones": [30, 80, 150]})
    add("multistep_repeated", "MultiStepLR", {"milestones": [10, 40, 40, 0, 90, 90, 90], "gamma": 0.3},
        lr=0.05)
    add("multistep_unsorted", "MultiStepLR", {"milestones": [120, 5, 60], "gamma": 0.5}, lr=1.0, epochs=150)
    add("exponential_basic", "ExponentialLR", {"gamma": 0.95}, epochs=300)
    add("exponential_slow", "ExponentialLR", {"gamma": 0.999}, lr=0.01, epochs=300)
    add("exponential_grow", "ExponentialLR", {"gamma": 1.01}, lr=0.001, epochs=150)
    add("cosine_basic", "CosineAnnealingLR", {"T_max": 50}, epochs=250)
    add("cosine_eta_min", "CosineAnnealingLR", {"T_max": 30, "eta_min": 0.001}, lr=0.05, epochs=300)
    add("cosine_short", "CosineAnnealingLR", {"T_max": 7}, lr=1.0, epochs=300)
    add("cosine_long", "CosineAnnealingLR", {"T_max": 100}, lr=0.3, epochs=300)
    add("cosine_one", "CosineAnnealingLR", {"T_max": 1, "eta_min": 0.01}, lr=0.1, epochs=100)
    add("linear_default", "LinearLR", {}, epochs=100)
    add("linear_warmup", "LinearLR", {"start_factor": 0.01, "total_iters": 120}, lr=0.5, epochs=200)
    add("linear_decay", "LinearLR", {"start_factor": 1.0, "end_factor": 0.0, "total_iters": 90}, epochs=150)
    add("linear_zero_iters", "LinearLR", {"start_factor": 0.2, "total_iters": 0}, epochs=100)
    add("constant_default", "ConstantLR", {}, epochs=100)
    add("constant_long", "ConstantLR", {"factor": 0.3, "total_iters": 77}, lr=0.7, epochs=150)
    add("constant_zero_iters", "ConstantLR", {"factor": 0.3, "total_iters": 0}, epochs=100)
    add("polynomial_default", "PolynomialLR", {}, epochs=100)
    add("polynomial_square", "PolynomialLR", {"total_iters": 150, "power": 2.0}, lr=0.2, epochs=200)
    add("polynomial_sqrt", "PolynomialLR", {"total_iters": 97, "power": 0.5}, epochs=150)
    add("polynomial_zero_power", "PolynomialLR", {"total_iters": 20, "power": 0.0}, epochs=100)
    add("warm_restarts_basic", "CosineAnnealingWarmRestarts", {"T_0": 10}, epochs=200)
    add("warm_restarts_mult", "CosineAnnealingWarmRestarts", {"T_0": 5, "T_mult": 2, "eta_min": 1e-4},
        lr=0.05, epochs=300)
    add("warm_restarts_mult3", "CosineAnnealingWarmRestarts", {"T_0": 1, "T_mult": 3}, lr=1.0, epochs=300)
    add("onecycle_default", "OneCycleLR", {"max_lr": 0.1, "total_steps": 200}, lr=0.01, epochs=201)
    add("onecycle_linear_three", "OneCycleLR",
        {"max_lr": 1.0, "total_steps": 150, "anneal_strategy": "linear", "three_phase": True,
         "pct_start": 0.25, "div_factor": 10.0, "final_div_factor": 100.0}, lr=0.5, epochs=151)
    add("onecycle_epochs", "OneCycleLR",
        {"max_lr": 0.3, "epochs": 12, "steps_per_epoch": 25, "pct_start": 0.4, "base_momentum": 0.8,
         "max_momentum": 0.9}, lr=0.1, epochs=301)
    add("onecycle_three_cos", "OneCycleLR", {"max_lr": 0.05, "total_steps": 123, "three_phase": True}, lr=0.1,
        epochs=124)
    add("onecycle_pct_zero", "OneCycleLR", {"max_lr": 0.5, "total_steps": 100, "pct_start": 0.0}, lr=0.1,
        epochs=101)
    add("sequential_warmup_cosine", "SequentialLR", {
        "schedulers": [{"scheduler": "LinearLR", "kwargs": {"start_factor": 0.1, "total_iters": 10}},
                       {"scheduler": "CosineAnnealingLR", "kwargs": {"T_max": 90}}],
        "milestones": [10]}, epochs=250)
    add("sequential_three", "SequentialLR", {
        "schedulers": [{"scheduler": "ConstantLR", "kwargs": {"factor": 0.5, "total_iters": 4}},
                       {"scheduler": "ExponentialLR", "kwargs": {"gamma": 0.9}},
                       {"scheduler": "StepLR", "kwargs": {"step_size": 5, "gamma": 0.5}}],
        "milestones": [8, 40]}, lr=0.2, epochs=150)
    add("sequential_quirks", "SequentialLR", {
        "schedulers": [{"scheduler": "ExponentialLR", "kwargs": {"gamma": 0.8}},
                       {"scheduler": "ConstantLR", "kwargs": {"factor": 0.25, "total_iters": 0}},
                       {"scheduler": "CosineAnnealingLR", "kwargs": {"T_max": 13, "eta_min": 0.003}},
                       {"scheduler": "MultiStepLR", "kwargs": {"milestones": [0, 5, 5], "gamma": 0.5}},
                       {"scheduler": "CosineAnnealingWarmRestarts", "kwargs": {"T_0": 4, "T_mult": 2}},
                       {"scheduler": "PolynomialLR", "kwargs": {"total_iters": 9, "power": 1.5}},
                       {"scheduler": "LinearLR", "kwargs": {"start_factor": 0.5, "total_iters": 6}}],
        "milestones": [5, 20, 60, 80, 120, 140]}, lr=0.1, epochs=200)
    add("sequential_milestone_zero", "SequentialLR", {
        "schedulers": [{"scheduler": "StepLR", "kwargs": {"step_size": 2}},
                       {"scheduler": "CosineAnnealingLR", "kwargs": {"T_max": 20}},
                       {"scheduler": "ExponentialLR", "kwargs": {"gamma": 0.9}}],
        "milestones": [0, 30]}, lr=0.1, epochs=100)
    add("sequential_repeated_milestone", "SequentialLR", {
        "schedulers": [{"scheduler": "LinearLR", "kwargs": {"start_factor": 0.2, "total_iters": 5}},
                       {"scheduler": "StepLR", "kwargs": {"step_size": 2}},
                       {"scheduler": "CosineAnnealingLR", "kwargs": {"T_max": 40, "eta_min": 0.01}}],
        "milestones": [15, 15]}, lr=0.1, epochs=120)

    losses = _plateau_losses()
    plateau = [
        ("plateau_default", {}),
        ("plateau_patience", {"patience": 2, "factor": 0.5}),
        ("plateau_abs_cooldown", {"patience": 1, "threshold": 0.05, "threshold_mode": "abs", "cooldown": 3}),
        ("plateau_min_lr", {"patience": 0, "factor": 0.5, "min_lr": 0.01, "threshold": 0.0}),
        ("plateau_eps", {"patience": 1, "factor": 0.9, "eps": 0.004}),
        ("plateau_max_rel", {"mode": "max", "patience": 2, "factor": 0.3, "threshold": 0.01}),
        ("plateau_max_abs", {"mode": "max", "patience": 3, "threshold_mode": "abs", "threshold": 0.02,
                             "cooldown": 2, "min_lr": 1e-3}),
    ]
    for name, kwargs in plateau:
        metric = [-x for x in losses] if kwargs.get("mode") == "max" else losses
        add(name, "ReduceLROnPlateau", kwargs, epochs=len(metric), metrics=metric)
    return c


def _torch_scheduler(torch, optimizer, spec):
    cls = getattr(torch.optim.lr_scheduler, spec["scheduler"])
    kwargs = dict(spec["kwargs"])
    if spec["scheduler"] == "SequentialLR":
        parts = [_torch_scheduler(torch, optimizer, part) for part in kwargs["schedulers"]]
        return cls(optimizer, parts, kwargs["milestones"])
    return cls(optimizer, **kwargs)


def run(spec: dict) -> dict:
    import torch

    param = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([param], lr=spec["lr"])
    scheduler = _torch_scheduler(torch, optimizer, spec)
    lrs, momenta = [], []
    for e in range(spec["epochs"]):
        group = optimizer.param_groups[0]
        lrs.append(float(group["lr"]))
        momenta.append(float(group["momentum"]))
        param.grad = torch.ones_like(param)
        optimizer.step()
        if e == spec["epochs"] - 1:
            break  # OneCycleLR raises when stepped past total_steps
        if spec["scheduler"] == "ReduceLROnPlateau":
            scheduler.step(spec["metrics"][e])
        else:
            scheduler.step()
    out = {"lrs": lrs}
    if spec["scheduler"] == "OneCycleLR":
        out["momenta"] = momenta
    return out


def end_to_end() -> dict:
    """SGD(momentum) on a small quadratic, StepLR stepped once per epoch of 4 batches."""
    import torch

    init, target = [1.0, -2.0, 0.5], [0.3, 0.1, -1.0]
    steps_per_epoch, epochs = 4, 12
    p = torch.tensor(init, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(target, dtype=torch.float64)
    optimizer = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    trajectory = []
    for _ in range(epochs):
        for _ in range(steps_per_epoch):
            with torch.no_grad():
                p.grad = 3 * (p - t) + torch.sin(p)
            optimizer.step()
            trajectory.append(p.detach().tolist())
        scheduler.step()
    return {"init": init, "target": target, "lr": 0.1, "momentum": 0.9, "step_size": 3, "gamma": 0.5,
            "steps_per_epoch": steps_per_epoch, "trajectory": trajectory}


def measure() -> None:
    """Worst relative error of rmsjax's float64 schedules against long PyTorch runs (not stored)."""
    import jax
    import numpy as np

    from rmsjax.compat.torch import lr_scheduler

    cases = [("CosineAnnealingLR", {"T_max": t, "eta_min": m}, 10 * t + 1)
             for t in (10, 100, 1000, 10000) for m in (0.0, 1e-3)]
    cases += [("ExponentialLR", {"gamma": 0.999}, 10000), ("ExponentialLR", {"gamma": 0.97}, 10000),
              ("StepLR", {"step_size": 1, "gamma": 0.99}, 10000),
              ("CosineAnnealingWarmRestarts", {"T_0": 1000, "T_mult": 2}, 100000),
              ("OneCycleLR", {"max_lr": 1.0, "total_steps": 100000}, 100001),
              ("PolynomialLR", {"total_iters": 100000, "power": 0.7}, 100001),
              ("LinearLR", {"start_factor": 1e-3, "total_iters": 100000}, 100001)]
    with jax.enable_x64(True):
        for name, kwargs, epochs in cases:
            spec = {"scheduler": name, "kwargs": kwargs, "lr": 0.1, "epochs": epochs}
            theirs = np.asarray(run(spec)["lrs"])
            schedule = getattr(lr_scheduler, name)(0.1, **kwargs)
            ours = np.asarray(jax.jit(jax.vmap(schedule))(np.arange(epochs, dtype=np.int32)))
            differ = ours != theirs
            rel = np.abs(ours - theirs)[differ] / np.abs(theirs)[differ]
            worst = float(rel.max()) if rel.size else 0.0
            print(f"{name:28s} {json.dumps(kwargs):40s} {epochs:7d} epochs: worst relative error {worst:.1e}")


def generate() -> dict:
    import torch

    if torch.__version__.split("+")[0] != TORCH_VERSION:
        raise SystemExit(f"needs torch=={TORCH_VERSION}, found {torch.__version__}")
    configs = configurations()
    for spec in configs:
        spec.update(run(spec))
    return {"torch": TORCH_VERSION, "configurations": configs, "end_to_end": end_to_end()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the stored fixture, bit for bit")
    parser.add_argument("--measure", action="store_true",
                        help="print rmsjax's errors on long runs, write nothing")
    args = parser.parse_args(argv)
    if args.measure:
        measure()
        return 0
    data = generate()
    text = json.dumps(data, indent=1) + "\n"
    if args.check:
        stored = FIXTURE.read_text()
        if json.loads(stored) != json.loads(text) or stored != text:
            print(f"{FIXTURE} differs from a fresh PyTorch run", file=sys.stderr)
            return 1
        print(f"{FIXTURE}: {len(data['configurations'])} configurations identical to PyTorch {TORCH_VERSION}")
        return 0
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(text)
    print(f"wrote {FIXTURE}: {len(data['configurations'])} configurations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
