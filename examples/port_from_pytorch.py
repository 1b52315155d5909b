"""Port a whole PyTorch training recipe to JAX with rmsjax.compat, and check it against PyTorch.

The recipe: a 64-32-10 tanh perceptron on scikit-learn's 8x8 digits (no download), float32,
minibatches of 64 from a fixed permutation per epoch, cross-entropy, and

    opt = torch.optim.RMSprop(
        [{"params": weights, "weight_decay": 1e-4}, {"params": biases, "weight_decay": 0.0}],
        lr=3e-3, alpha=0.9, momentum=0.9)
    sched = SequentialLR(opt, [LinearLR(opt, start_factor=0.1, total_iters=3),
                               StepLR(opt, step_size=10, gamma=0.5)], milestones=[3])

with ``sched.step()`` once per epoch. The JAX port is the same model as pure functions on a
params dict, the same initial weights (drawn in NumPy and given to both) and the same
batches, trained with

    tx = rmsjax.compat.torch.param_groups(rmsjax.compat.torch.RMSprop, [...groups...], ...)

and ``lr=rmsjax.compat.torch.lr_scheduler.SequentialLR(...)`` with ``steps_per_epoch``.
As a control, optax's nearest optimizer (``optax.rmsprop(..., momentum=0.9,
eps_in_sqrt=False)`` after a masked ``optax.add_decayed_weights``, with the same per-epoch
schedule built from optax's schedules) is trained on the same batches.

With PyTorch installed the script also runs PyTorch's recipe, and PyTorch again from
initial weights nudged by one ulp (``--nudges`` runs): the largest loss gap between those
runs and the unnudged one, at each step, is PyTorch's own noise floor. The figure shows the
three loss curves and, on a log scale, |rmsjax - PyTorch| and |optax - PyTorch| beside that
floor. Without PyTorch (or with ``--no-torch``) only rmsjax and the optax control are
trained and plotted.

    python examples/port_from_pytorch.py                   # writes docs/img/port_from_pytorch.png
    python examples/port_from_pytorch.py --epochs 5 --out /tmp/port.png
    python examples/port_from_pytorch.py --no-torch
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # write files only; no display needed

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from rmsjax.compat import torch as pt  # noqa: E402
from rmsjax.compat.torch import lr_scheduler  # noqa: E402

# The recipe, as one would read it off a PyTorch training script.
RECIPE = {
    "hidden": 32, "batch": 64, "lr": 3e-3, "alpha": 0.9, "eps": 1e-8, "momentum": 0.9,
    "weight_decay": 1e-4, "warmup": {"start_factor": 0.1, "total_iters": 3},
    "step": {"step_size": 10, "gamma": 0.5},
}
NAMES = ("w1", "b1", "w2", "b2")  # PyTorch's model.parameters() order


def data(epochs: int, seed: int):
    """Inputs (float32, in [0, 1]), labels, initial weights and per-step batch indices."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)

    def uniform(shape, fan_in):  # torch.nn.Linear's default initialisation
        bound = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape).astype(np.float32)

    h, d, c = RECIPE["hidden"], x.shape[1], 10
    init = {"w1": uniform((h, d), d), "b1": uniform((h,), d),
            "w2": uniform((c, h), h), "b2": uniform((c,), h)}
    # One permutation per epoch, drawn after the weights: a shorter run is a prefix of a longer one.
    steps_per_epoch = len(x) // RECIPE["batch"]  # the last, partial batch is dropped
    batches = np.concatenate([
        rng.permutation(len(x))[: steps_per_epoch * RECIPE["batch"]].reshape(steps_per_epoch, RECIPE["batch"])
        for _ in range(epochs)
    ])
    return x, y, init, batches, steps_per_epoch


def nudged(init: dict, k: int) -> dict:
    """``init`` with every entry moved by one ulp, up or down at random (seed ``k``)."""
    rng = np.random.default_rng(1000 + k)
    out = {}
    for name, value in init.items():
        up = rng.random(value.shape) < 0.5
        out[name] = np.where(up, np.nextafter(value, np.float32(np.inf)),
                             np.nextafter(value, np.float32(-np.inf))).astype(np.float32)
    return out


# ----------------------------------------------------------------------------- PyTorch


def train_torch(init, x, y, batches, steps_per_epoch):
    """The PyTorch recipe: (loss before each step, learning rate of each step)."""
    import torch

    r = RECIPE
    torch.manual_seed(0)
    p = {k: torch.tensor(v).requires_grad_(True) for k, v in init.items()}
    weights, biases = [p["w1"], p["w2"]], [p["b1"], p["b2"]]
    opt = torch.optim.RMSprop(
        [{"params": weights, "weight_decay": r["weight_decay"]}, {"params": biases, "weight_decay": 0.0}],
        lr=r["lr"], alpha=r["alpha"], eps=r["eps"], momentum=r["momentum"],
    )
    warmup = torch.optim.lr_scheduler.LinearLR(opt, **r["warmup"])
    decay = torch.optim.lr_scheduler.StepLR(opt, **r["step"])
    sched = torch.optim.lr_scheduler.SequentialLR(
        opt, [warmup, decay], milestones=[r["warmup"]["total_iters"]])
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    losses, lrs = [], []
    for step, idx in enumerate(torch.from_numpy(batches)):
        h = torch.tanh(xt[idx] @ p["w1"].T + p["b1"])
        loss = torch.nn.functional.cross_entropy(h @ p["w2"].T + p["b2"], yt[idx])
        opt.zero_grad()
        loss.backward()
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        losses.append(loss.item())
        if (step + 1) % steps_per_epoch == 0:
            sched.step()  # once per epoch
    return np.asarray(losses), np.asarray(lrs)


# ----------------------------------------------------------------------------- JAX


def loss_fn(params, x, y):
    h = jnp.tanh(x @ params["w1"].T + params["b1"])
    logp = jax.nn.log_softmax(h @ params["w2"].T + params["b2"])
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def rmsjax_schedule(steps_per_epoch: int):
    """``SequentialLR(LinearLR, StepLR)`` stepped once per epoch of ``steps_per_epoch`` updates."""
    r = RECIPE
    return lr_scheduler.SequentialLR(
        r["lr"],
        [lr_scheduler.LinearLR(r["lr"], **r["warmup"]), lr_scheduler.StepLR(r["lr"], **r["step"])],
        milestones=[r["warmup"]["total_iters"]],
        steps_per_epoch=steps_per_epoch,
    )


def is_bias(path: str, leaf) -> bool:
    del leaf
    return path.startswith("b")


def rmsjax_recipe(steps_per_epoch: int) -> optax.GradientTransformation:
    """The port: PyTorch's constructor, groups and scheduler, argument for argument."""
    r = RECIPE
    return pt.param_groups(
        pt.RMSprop,
        [{"params": lambda path, leaf: not is_bias(path, leaf), "weight_decay": r["weight_decay"]},
         {"params": is_bias, "weight_decay": 0.0}],
        lr=rmsjax_schedule(steps_per_epoch), alpha=r["alpha"], eps=r["eps"], momentum=r["momentum"],
    )


def optax_control(steps_per_epoch: int) -> optax.GradientTransformation:
    """optax's nearest optimizer: same hyperparameters, same per-epoch schedule, optax's conventions."""
    r = RECIPE
    warm = r["warmup"]["total_iters"]
    per_epoch = optax.join_schedules(
        [optax.linear_schedule(r["lr"] * r["warmup"]["start_factor"], r["lr"], warm),
         optax.exponential_decay(r["lr"], r["step"]["step_size"], r["step"]["gamma"], staircase=True)],
        boundaries=[warm],
    )

    def schedule(count):
        return per_epoch(count // steps_per_epoch)

    weights_only = {"w1": True, "b1": False, "w2": True, "b2": False}
    return optax.chain(
        optax.add_decayed_weights(r["weight_decay"], mask=weights_only),
        optax.rmsprop(schedule, decay=r["alpha"], eps=r["eps"], eps_in_sqrt=False, momentum=r["momentum"]),
    )


def trainer(tx, x, y):
    """``train(init, batches)``: loss before each step, final params and state, in one compiled scan."""
    x, y = jnp.asarray(x), jnp.asarray(y.astype(np.int32))

    def body(carry, idx):
        params, state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, x[idx], y[idx])
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), loss

    @jax.jit
    def run(params, batches):
        (params, state), losses = jax.lax.scan(body, (params, tx.init(params)), batches)
        return losses, params, state

    def train(init, batches):
        params = {k: jnp.asarray(v) for k, v in init.items()}
        losses, params, state = run(params, jnp.asarray(batches.astype(np.int32)))
        return np.asarray(losses, np.float64), params, state

    return train


# ----------------------------------------------------------------------------- the comparison


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--nudges", type=int, default=8,
                        help="PyTorch runs from one-ulp-nudged initial weights (the noise floor)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join("docs", "img", "port_from_pytorch.png"),
                        help="the figure's file (or a folder for port_from_pytorch.png)")
    parser.add_argument("--no-torch", action="store_true", help="train rmsjax and optax only")
    return parser.parse_args(argv)


def have_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    x, y, init, batches, spe = data(args.epochs, args.seed)
    steps = len(batches)
    print(f"digits: {len(x)} images, {args.epochs} epochs of {spe} batches of {RECIPE['batch']} "
          f"({steps} steps)")

    tx = rmsjax_recipe(spe)
    train_rmsjax = trainer(tx, x, y)
    ours, params, state = train_rmsjax(init, batches)
    control, _, _ = trainer(optax_control(spe), x, y)(init, batches)
    result = {"rmsjax": ours, "optax": control, "steps": steps}
    print(f"rmsjax: loss {ours[0]:.4f} -> {ours[-1]:.4f}")
    print(f"optax control: loss {control[0]:.4f} -> {control[-1]:.4f}")

    # The state continues in PyTorch: this is what torch.optim.RMSprop.load_state_dict takes.
    exported = pt.state_dict(tx, state, params, arrays="numpy")
    print(f"rmsjax state exported for torch: {len(exported['state'])} parameters, "
          f"step {int(exported['state'][0]['step'])}, lr {exported['param_groups'][0]['lr']:.2e}")

    use_torch = not args.no_torch and have_torch()
    if use_torch:
        import torch

        torch.set_num_threads(1)  # 30 times faster than the default for a model this small
        theirs, lrs = train_torch(init, x, y, batches, spe)
        schedule = rmsjax_schedule(spe)
        ours_lr = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(steps)))
        lr_gap = float(np.max(np.abs(ours_lr - lrs.astype(np.float32))))
        runs = np.stack([train_torch(nudged(init, k), x, y, batches, spe)[0] for k in range(args.nudges)])
        floor = np.max(np.abs(runs - theirs), axis=0)
        own = np.stack([train_rmsjax(nudged(init, k), batches)[0] for k in range(args.nudges)])
        own_floor = np.max(np.abs(own - ours), axis=0)
        gap = np.abs(ours - theirs)
        control_gap = np.abs(control - theirs)
        result |= {"torch": theirs, "floor": floor, "own_floor": own_floor, "gap": gap,
                   "control_gap": control_gap,
                   "max_gap": float(gap.max()), "max_floor": float(floor.max()),
                   "max_own_floor": float(own_floor.max()),
                   "max_control_gap": float(control_gap.max()), "lr_gap": lr_gap}
        print(f"PyTorch: loss {theirs[0]:.4f} -> {theirs[-1]:.4f}; learning rates: rmsjax's schedule "
              f"{'equals' if lr_gap == 0 else f'is {lr_gap:.1e} from'} PyTorch's (in float32) at every step")
        print(f"max |rmsjax - PyTorch| loss gap:  {gap.max():.2e} (step {gap.argmax() + 1}; "
              f"equal bit for bit at {np.sum(gap == 0)} of {steps} steps)")
        print(f"PyTorch's one-ulp noise floor:    {floor.max():.2e} ({args.nudges} nudged runs; "
              f"gap / floor {gap.max() / floor.max():.2f})")
        print(f"rmsjax's own one-ulp noise floor: {own_floor.max():.2e} ({args.nudges} nudged runs; "
              f"gap / larger floor {gap.max() / max(floor.max(), own_floor.max()):.2f})")
        print(f"max |optax - PyTorch| (control):  {control_gap.max():.2e} "
              f"({control_gap.max() / floor.max():.0f}x the floor)")
    else:
        print("PyTorch is not installed (or --no-torch): the comparison with PyTorch needs torch; "
              "plotting rmsjax's curve and the optax control only.")

    t = np.arange(1, steps + 1)
    fig, axes = plt.subplots(2 if use_torch else 1, 1, figsize=(8, 6.5 if use_torch else 3.5),
                             sharex=True, squeeze=False)
    top = axes[0, 0]
    if use_torch:
        top.plot(t, theirs, color="k", linewidth=2.5, alpha=0.35, label="PyTorch")
    top.plot(t, ours, color="C0", linewidth=1, label="rmsjax.compat.torch")
    top.plot(t, control, color="C3", linewidth=1, linestyle="--", label="optax.rmsprop (control)")
    top.set_yscale("log")
    top.set_ylabel("minibatch loss")
    top.set_title("RMSprop(momentum=0.9), two parameter groups, SequentialLR(LinearLR, StepLR)", fontsize=10)
    top.legend(fontsize=8)
    if use_torch:
        bottom = axes[1, 0]
        def shown(v):  # log scale: steps where the losses are equal bit for bit are left blank
            return np.where(v > 0, v, np.nan)

        bottom.plot(t, shown(control_gap), color="C3", linewidth=0.8, label="|optax - PyTorch|")
        bottom.plot(t, shown(gap), color="C0", linewidth=0.8, label="|rmsjax - PyTorch|")
        bottom.plot(t, shown(floor), color="k", linewidth=0.8, alpha=0.6,
                    label=f"PyTorch's one-ulp noise floor ({args.nudges} runs)")
        bottom.plot(t, shown(own_floor), color="0.5", linewidth=0.6, linestyle=":",
                    label=f"rmsjax's one-ulp noise floor ({args.nudges} runs)")
        bottom.set_yscale("log")
        bottom.set_ylim(1e-9, 1e3)
        bottom.set_ylabel("|loss gap| (blank: equal bit for bit)")
        bottom.legend(fontsize=8, loc="upper right", ncol=2)
    warm, period = RECIPE["warmup"]["total_iters"], RECIPE["step"]["step_size"]
    for e in range(1, args.epochs):
        if e <= warm or (e - warm) % period == 0:
            for ax in axes[:, 0]:
                ax.axvline(e * spe, color="0.8", linewidth=0.6, zorder=0)
    axes[-1, 0].set_xlabel("step (grey lines: learning-rate changes)")
    fig.tight_layout()
    figure = args.out
    if os.path.isdir(figure):
        figure = os.path.join(figure, "port_from_pytorch.png")
    os.makedirs(os.path.dirname(figure) or ".", exist_ok=True)
    fig.savefig(figure, dpi=100)
    plt.close(fig)
    seconds = time.perf_counter() - start
    print(f"figure: {figure} ({seconds:.1f} s)")
    return result | {"figure": figure, "torch_used": use_torch, "seconds": seconds}


if __name__ == "__main__":
    main()
