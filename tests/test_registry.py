"""The registry of tests/registry.py holds every public factory, and only sound cases.

Every name in the public ``__all__``s (rmsjax's and, through it, every public module's) is
either a factory with at least one case in the registry, or listed in ``NOT_FACTORIES`` with
the reason it has no case. A new public factory without a case fails
``test_every_public_factory_has_a_case``, which names it.
"""

from __future__ import annotations

import inspect

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import registry

import rmsjax

# Public names that are not factories of a transformation, each with its reason. A public
# module is walked (its own __all__ checked) unless it is listed here.
NOT_FACTORIES = {
    "rmsjax.averages": "a module of layer 1's pytree helpers (no transformation); not walked",
    "rmsjax.EffectiveLearningRate": "a diagnostics result (NamedTuple)",
    "rmsjax.effective_learning_rate": "a diagnostics reader of a state",
    "rmsjax.learning_rate": "a diagnostics reader of a state",
    "rmsjax.step_count": "a diagnostics reader of a state",
    "rmsjax.is_quantized": "a predicate on state nodes (map_params is_leaf; tests/test_interop.py)",
    "rmsjax.transforms.upgrade_0_2_state_dict": "a checkpoint migration (tests/test_interop.py)",
    "rmsjax.zero_shardings": "returns shardings of a state, not a transformation (tests/test_zero.py)",
    "rmsjax.compat.ParamGroupsState": "a state class",
    "rmsjax.transforms.AbsentState": "a state class (of transforms.absent, which has cases)",
    "rmsjax.compat.path_name": "a helper naming a tree path (for group selectors)",
    "rmsjax.compat.torch.load_state_dict": "a checkpoint reader (tests/test_torch_checkpoint.py)",
    "rmsjax.compat.torch.state_dict": "a checkpoint writer (tests/test_torch_checkpoint.py)",
    "rmsjax.compat.torch.lr_scheduler.ReduceLROnPlateau": (
        "driven by value=loss, which the batteries do not pass (tests/test_lr_scheduler.py)"
    ),
    "rmsjax.compat.torch.lr_scheduler.ReduceLROnPlateauState": "a state class",
    "rmsjax.compat.torch.lr_scheduler.TorchSchedule": "the schedules' type",
    **{
        f"rmsjax.compat.torch.lr_scheduler.{name}": (
            "a learning-rate schedule, not a transformation (tests/test_lr_scheduler.py)"
        )
        for name in [
            "ConstantLR", "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "ExponentialLR", "LinearLR",
            "MultiStepLR", "OneCycleLR", "PolynomialLR", "SequentialLR", "StepLR",
        ]
    },
    **{
        f"rmsjax.transforms.{name}": "a state class"
        for name in [
            "DampenedMomentumState", "LeakyAverageState", "MomentumState", "ScaleByAdaDeltaState",
            "ScaleByAdamState", "ScaleByAmsgradState", "ScaleByLearningRateState", "ScaleByRmsState",
            "ScaleByRssState", "ScaleByScheduleState", "ScaleByStddevState",
        ]
    },
}


def _public_names(module=rmsjax, prefix="rmsjax"):
    """(qualified name, object) for every name in the __all__ of rmsjax and of each public
    module reachable through the __all__s (rmsjax.transforms, rmsjax.compat.torch, ...).
    Modules themselves are walked, not returned."""
    found = []
    for name in module.__all__:
        qualified, obj = f"{prefix}.{name}", getattr(module, name)
        if inspect.ismodule(obj):
            if qualified not in NOT_FACTORIES:
                found += _public_names(obj, qualified)
        else:
            found.append((qualified, obj))
    return found


def test_the_walk_reaches_every_layer():
    reached = {name.rsplit(".", 1)[0] for name, _ in _public_names()}
    assert reached >= {"rmsjax", "rmsjax.transforms", "rmsjax.compat.torch", "rmsjax.compat.keras",
                       "rmsjax.compat.tf1"}, reached


def test_every_public_factory_has_a_case():
    missing = [
        qualified
        for qualified, obj in _public_names()
        if qualified not in NOT_FACTORIES and obj not in registry.FACTORIES
    ]
    assert not missing, (
        "public factories without a case in tests/registry.py (add cases there, or list a "
        f"non-factory in test_registry.NOT_FACTORIES with its reason): {missing}"
    )


def test_exclusions_are_public_and_not_factories():
    """Every exclusion names a public object (so none goes stale), and none is a factory."""
    public = dict(_public_names())
    stale = [name for name in NOT_FACTORIES if name not in public and name != "rmsjax.averages"]
    assert not stale, f"excluded names that are not public (any more): {stale}"
    assert inspect.ismodule(rmsjax.averages)
    assert not [name for name in NOT_FACTORIES if public.get(name) in registry.FACTORIES]


def test_the_check_sees_a_missing_factory(monkeypatch):
    """Negative control: a public factory without a case is reported by name."""
    monkeypatch.setattr(rmsjax, "__all__", [*rmsjax.__all__, "brand_new"], raising=True)
    monkeypatch.setattr(rmsjax, "brand_new", lambda: optax.identity(), raising=False)
    with pytest.raises(AssertionError, match="rmsjax.brand_new"):
        test_every_public_factory_has_a_case()


@pytest.mark.parametrize("name", sorted(registry.CASES))
def test_case_builds_a_transformation_of_its_factory(name):
    case = registry.CASES[name]
    assert case.tags, f"{name} is run by no battery"
    assert case.tags <= {"reference", "composition", "packing", "reliability", "properties", "sharding"}
    assert isinstance(case.make(), optax.GradientTransformation)


def test_with_rate_replaces_the_learning_rate():
    """A positional (rmsjax) and a keyword (Keras) rate: the first step scales with the rate."""
    grads = {"w": jnp.array([1.0, -2.0])}
    for name in ["sgd_momentum", "keras.Adagrad"]:
        steps = []
        for rate in (0.5, 0.125):
            tx = registry.CASES[name].with_rate(rate)
            steps.append(tx.update(grads, tx.init(grads), grads)[0]["w"])
        np.testing.assert_allclose(steps[0], 4 * steps[1], rtol=1e-6)
        assert float(steps[0][0]) < 0
