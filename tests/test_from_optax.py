"""The one-line swaps from optax that README's "From optax" section lists, checked numerically.

Each pair is an optax optimizer as optax's users write it and the rmsjax call the README offers
in its place. Both run the same few steps on the same problem (a gradient that depends on the
parameters, so that any difference feeds back); their updates must agree within float32
rounding. optax is the independent reference here: rmsjax's code computes none of its numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsjax


class Swap(NamedTuple):
    optax_call: str  # as README writes it, with `lr` for the learning rate
    rmsjax_call: str
    # a bound on the relative gap after STEPS steps: a few float32 roundings (6e-8 each)
    rtol: float = 2e-6


LR = 0.01
STEPS = 8

SWAPS = [
    Swap("optax.rmsprop(lr)", "rmsjax.rmsprop(lr, eps_in_sqrt=True)"),
    Swap("optax.rmsprop(lr, centered=True)", "rmsjax.rmsprop(lr, centered=True, eps_in_sqrt=True)"),
    # optax puts the learning rate inside the momentum buffer, rmsjax outside (PyTorch's form):
    # the same updates with a constant rate, not with a schedule.
    Swap("optax.rmsprop(lr, momentum=0.9)", "rmsjax.rmsprop(lr, momentum=0.9, eps_in_sqrt=True)"),
    Swap("optax.rmsprop(lr, eps_in_sqrt=False)", "rmsjax.rmsprop(lr)"),
    Swap("optax.adam(lr)", "rmsjax.adam(lr)"),
    Swap("optax.adam(lr, eps_root=1e-8)", "rmsjax.adam(lr, eps_root=1e-8)"),
    Swap("optax.adam(lr, nesterov=True)", "rmsjax.adam(lr, nesterov=True)"),
    Swap("optax.adamw(lr)", "rmsjax.adamw(lr, weight_decay=1e-4)"),
    Swap("optax.adamw(lr, weight_decay=0.01)", "rmsjax.adamw(lr, weight_decay=0.01)"),
    Swap("optax.sgd(lr)", "rmsjax.sgd(lr)"),
    Swap("optax.sgd(lr, momentum=0.9)", "rmsjax.sgd(lr, momentum=0.9)"),
    Swap("optax.sgd(lr, momentum=0.9, nesterov=True)", "rmsjax.sgd(lr, momentum=0.9, nesterov=True)"),
    Swap("optax.adadelta(lr)", "rmsjax.adadelta(lr)"),
    Swap(
        "optax.adagrad(lr)",
        "optax.chain(rmsjax.scale_by_rss(0.1, 1e-7, eps_in_sqrt=True), optax.scale_by_learning_rate(lr))",
    ),
]


def _build(call: str) -> optax.GradientTransformation:
    return eval(call, {"optax": optax, "rmsjax": rmsjax, "lr": LR})  # noqa: S307 (our own strings)


def _trajectory(tx: optax.GradientTransformation, scale: float = 1.0) -> list[dict]:
    """The updates of STEPS steps; ``scale`` shrinks the gradients (1e-4: eps then matters)."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}

    def grad(p):
        return {k: scale * (2.0 * v + jnp.sin(3.0 * v)) for k, v in p.items()}

    state = tx.init(params)
    step = jax.jit(tx.update)
    out = []
    for _ in range(STEPS):
        updates, state = step(grad(params), state, params)
        params = optax.apply_updates(params, updates)
        out.append(updates)
    return out


@pytest.mark.parametrize("scale", [1.0, 1e-4], ids=["unit-gradients", "small-gradients"])
@pytest.mark.parametrize("swap", SWAPS, ids=[s.optax_call for s in SWAPS])
def test_swap_gives_optax_updates(swap, scale):
    # optax's own code is not strict-promotion clean (Python-float constants meet float32).
    with jax.numpy_dtype_promotion("standard"):
        theirs = _trajectory(_build(swap.optax_call), scale)
    ours = _trajectory(_build(swap.rmsjax_call), scale)
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        for key in b:
            scale = float(np.max(np.abs(b[key])))
            assert scale > 0
            np.testing.assert_allclose(a[key], b[key], rtol=swap.rtol, atol=swap.rtol * scale,
                                       err_msg=f"{swap.rmsjax_call}, step {step}, {key}")


def test_the_swaps_matter():
    """Without the flags the README names, the same calls part far beyond rounding (small
    gradients, where the placement of eps shows)."""
    unswapped = [("optax.rmsprop(lr)", "rmsjax.rmsprop(lr)"),
                 ("optax.adamw(lr)", "rmsjax.adamw(lr)")]
    for optax_call, rmsjax_call in unswapped:
        with jax.numpy_dtype_promotion("standard"):
            theirs = _trajectory(_build(optax_call), 1e-4)
        ours = _trajectory(_build(rmsjax_call), 1e-4)
        gap = max(float(np.max(np.abs(a[k] - b[k]) / np.max(np.abs(b[k]))))
                  for a, b in zip(ours, theirs) for k in b)
        assert gap > 1e-4, (rmsjax_call, gap)


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("page", ["README.md", "docs/composition.md"])
def test_pages_list_exactly_the_checked_swaps(page):
    """Every swap row of the page's "From optax" table is a pair checked above, and back."""
    section = (ROOT / page).read_text().split("## From optax", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `optax.")]
    listed = set()
    for row in rows:
        cells = [c.strip().strip("`") for c in row.strip("|").split("|")]
        listed.add((cells[0], cells[1]))
    assert listed == {(s.optax_call, s.rmsjax_call) for s in SWAPS}
