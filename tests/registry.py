"""One registry of every public rmsjax optimizer and transformation, as named configured cases.

Every battery takes its cases from here, by tag, instead of keeping its own list:

=============  ====================================================================
tag            battery
=============  ====================================================================
reference      ``test_optimizers.py``: the NumPy references, compilation, dtypes
composition    ``test_composition.py``: optax wrappers, Flax (needs a learning rate)
packing        ``test_packing.py``: ``rmsjax.packed`` bit for bit
reliability    ``reliability_cases.py`` (edge cases and checkpoints)
properties     ``test_properties.py``: drawn hyperparameters override the case's
sharding       ``tests/sharding/test_sharding.py``: placement and collectives
=============  ====================================================================

A case is a public factory (the very object exported in some ``__all__``) with fixed
arguments; ``make()`` builds a fresh transformation. Arguments that are themselves cases
(the wrappers' inner optimizer) are built fresh too. ``test_registry.py`` checks that
every public factory has at least one case.

To add an optimizer: add its cases to ``_CASES`` below with the tags of the batteries that
should run it (and, for ``reference``, its NumPy reference in ``test_optimizers.py``); if
the public name is no factory at all, list it in ``test_registry.NOT_FACTORIES`` instead.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import optax

import rmsjax
from rmsjax import transforms
from rmsjax.compat import keras as kc
from rmsjax.compat import tf1, timm
from rmsjax.compat import torch as pt

# What a case's transformation computes, which decides how a battery drives it.
STEP = "step"  # a whole descent step (layers 3 and 4, and the learning-rate scaling)
DIRECTION = "direction"  # a layer-2 direction, to be scaled by -lr for a descent step
STATELESS = "stateless"  # a direction with no state at all (no step count)


@dataclasses.dataclass(frozen=True)
class Case:
    """``factory(*args, **kwargs)``, named, with the batteries (``tags``) that run it."""

    name: str
    factory: Callable[..., optax.GradientTransformation]
    args: tuple = ()
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    kind: str = STEP
    tags: frozenset[str] = frozenset()

    def make(self, **overrides: Any) -> optax.GradientTransformation:
        """A fresh transformation; ``overrides`` replace (or add) keyword arguments."""
        build = lambda x: x.make() if isinstance(x, Case) else x
        args = [build(a) for a in self.args]
        kwargs = {k: build(v) for k, v in {**self.kwargs, **overrides}.items()}
        # An override of a positional argument (the learning rate) takes its place.
        names = list(inspect.signature(self.factory).parameters)
        for i, name in enumerate(names[: len(args)]):
            if name in kwargs:
                args[i] = kwargs.pop(name)
        return self.factory(*args, **kwargs)

    def with_rate(self, learning_rate: Any) -> optax.GradientTransformation:
        """This case with its factory's first argument (its learning rate) replaced.

        For a wrapper (its first argument is a case: ``one_pass``, ``packed``, ``quantized``)
        the rate goes to the wrapped optimizer.
        """
        if self.args and isinstance(self.args[0], Case):
            inner = self.args[0].with_rate(learning_rate)
            build = lambda x: x.make() if isinstance(x, Case) else x
            return self.factory(inner, *[build(a) for a in self.args[1:]], **dict(self.kwargs))
        first = next(iter(inspect.signature(self.factory).parameters))
        return self.make(**{first: learning_rate})


LR = 0.01
_R, _C, _P, _REL, _PROP, _S = "reference", "composition", "packing", "reliability", "properties", "sharding"


def _case(name, factory, *args, kind=STEP, tags=(), **kwargs) -> Case:
    return Case(name, factory, args, kwargs, kind, frozenset(tags))


_CASES = [
    # ------------------------------------------------------------ layer 3
    _case("rmsprop", rmsjax.rmsprop, LR, tags={_R, _P, _REL, _PROP, _S}),
    _case("rmsprop_centered", rmsjax.rmsprop, LR, decay=0.95, centered=True, tags={_R, _REL}),
    _case("rmsprop_momentum", rmsjax.rmsprop, LR, momentum=0.9, tags={_R}),
    _case("rmsprop_nesterov", rmsjax.rmsprop, LR, momentum=0.8, nesterov=True, tags={_R, _REL}),
    _case("rmsprop_weight_decay", rmsjax.rmsprop, LR, weight_decay=0.1, tags={_R}),
    _case("rmsprop_eps_in_sqrt_tf1_start", rmsjax.rmsprop, LR, eps=1e-6, eps_in_sqrt=True,
          initial_scale=1.0, tags={_R, _REL}),
    _case("rmsprop_bias_correction", rmsjax.rmsprop, LR, decay=0.99, bias_correction=True, tags={_R}),
    _case("rmsprop_centered_momentum_wd", rmsjax.rmsprop, LR, centered=True, momentum=0.5,
          weight_decay=0.05, tags={_R, _P}),
    _case("rmsprop_centered_momentum", rmsjax.rmsprop, LR, centered=True, momentum=0.9, tags={_C}),
    _case("rmsprop_centered_l2", rmsjax.rmsprop, LR, centered=True, weight_decay=0.01, tags={_PROP}),
    _case("rmsprop_centered_nesterov_wd", rmsjax.rmsprop, 1e-3, centered=True, momentum=0.9,
          nesterov=True, weight_decay=1e-4, tags={_S}),
    _case("rmsprop_wd_debias", rmsjax.rmsprop, LR, weight_decay=0.1, bias_correction=True, tags={_REL}),
    _case("rmsprop_bias_correction_schedule", rmsjax.rmsprop, optax.exponential_decay(1e-3, 10, 0.5),
          bias_correction=True, eps_in_sqrt=True, initial_scale=1.0, tags={_P, _S}),
    _case("rmsprop_bfloat16_state", rmsjax.rmsprop, LR, centered=True, state_dtype=jnp.bfloat16,
          tags={_P, _S}),
    _case("adagrad", rmsjax.adagrad, 0.1, initial_accumulator_value=0.1, tags={_R, _C, _P, _REL, _PROP, _S}),
    _case("adam", rmsjax.adam, LR, tags={_R, _C, _P, _REL, _PROP}),
    _case("adam_nesterov", rmsjax.adam, LR, nesterov=True, eps_root=1e-8, tags={_R, _REL, _S}),
    _case("adam_eps_root", rmsjax.adam, LR, b1=0.8, b2=0.99, eps=1e-6, eps_root=1e-4, tags={_R}),
    _case("adamw", rmsjax.adamw, LR, weight_decay=0.1, tags={_R, _C, _P, _REL, _PROP}),
    _case("adamw_mask", rmsjax.adamw, LR, weight_decay=0.1, mask={"a": True, "b": False}, tags={_R}),
    _case("adamw_mask_fn", rmsjax.adamw, 1e-3, weight_decay=1e-2,
          mask=lambda p: {k: v.ndim > 1 for k, v in p.items()}, tags={_S}),
    _case("adadelta", rmsjax.adadelta, tags={_R, _C, _P, _PROP}),
    _case("adadelta_weight_decay", rmsjax.adadelta, 0.5, rho=0.95, eps=1e-5, weight_decay=0.1, tags={_R}),
    _case("adadelta_l2", rmsjax.adadelta, 1.0, weight_decay=0.01, tags={_REL, _S}),
    _case("sgd", rmsjax.sgd, LR, tags={_R, _REL, _PROP}),
    _case("sgd_momentum", rmsjax.sgd, LR, momentum=0.9, tags={_R, _C}),
    _case("sgd_nesterov", rmsjax.sgd, LR, momentum=0.9, nesterov=True, tags={_R, _P, _REL, _S}),
    # ------------------------------------------------------------ layer 2
    _case("scale_by_rms", rmsjax.scale_by_rms, 0.95, 1e-6, eps_in_sqrt=True, bias_correction=True,
          kind=DIRECTION, tags={_R}),
    _case("scale_by_stddev", rmsjax.scale_by_stddev, 0.9, 1e-8, initial_scale=0.5, kind=DIRECTION, tags={_R}),
    _case("scale_by_stddev_float32_state", rmsjax.scale_by_stddev, state_dtype=jnp.float32,
          kind=DIRECTION, tags={_S}),
    _case("scale_by_rss", rmsjax.scale_by_rss, 0.1, 1e-7, eps_in_sqrt=True, kind=DIRECTION, tags={_R, _S}),
    _case("scale_by_adam", rmsjax.scale_by_adam, 0.85, 0.995, 1e-7, kind=DIRECTION, tags={_R, _PROP}),
    _case("scale_by_adam_amsgrad_bfloat16", rmsjax.scale_by_adam, amsgrad=True, state_dtype=jnp.bfloat16,
          kind=DIRECTION, tags={_S}),
    _case("scale_by_adadelta", rmsjax.scale_by_adadelta, 0.8, 1e-4, kind=DIRECTION, tags={_R, _S}),
    _case("leaky_average", rmsjax.leaky_average, 0.9, debias=True, kind=DIRECTION, tags={_R, _PROP}),
    _case("leaky_average_debias_bfloat16", rmsjax.leaky_average, 0.9, debias=True, state_dtype=jnp.bfloat16,
          kind=DIRECTION, tags={_S}),
    _case("momentum_dampening", rmsjax.momentum, 0.9, dampening=0.3, kind=DIRECTION, tags={_R, _S}),
    _case("momentum_nesterov", rmsjax.momentum, 0.7, nesterov=True, kind=DIRECTION, tags={_R}),
    _case("scale_by_learning_rate", transforms.scale_by_learning_rate, LR, tags={_R}),
    _case("add_decayed_weights", transforms.add_decayed_weights, 0.1, kind=STATELESS, tags={_R}),
    _case("absent", transforms.absent, kind=STATELESS, tags={_R}),
    _case("add_decayed_weights_mask", transforms.add_decayed_weights, 0.1, mask={"a": False, "b": True},
          kind=STATELESS, tags={_R}),
    # ------------------------------------------------------------ layer 4
    _case("torch.RMSprop", pt.RMSprop, lr=LR, momentum=0.9, centered=True, weight_decay=0.01,
          tags={_REL, _S}),
    _case("torch.RMSprop_plain", pt.RMSprop, tags={_PROP}),
    _case("torch.Adagrad", pt.Adagrad, lr=0.1, lr_decay=0.01, tags={_REL, _S}),
    _case("torch.Adam", pt.Adam, lr=LR, amsgrad=True, tags={_REL, _S}),
    _case("torch.AdamW", pt.AdamW, lr=LR, tags={_REL, _S}),
    _case("torch.Adadelta", pt.Adadelta, tags={_REL, _S}),
    _case("torch.SGD", pt.SGD, lr=LR, momentum=0.9, dampening=0.1, weight_decay=0.01, tags={_REL, _S}),
    _case("keras.RMSprop", kc.RMSprop, learning_rate=LR, momentum=0.9, weight_decay=0.01, tags={_REL, _S}),
    _case("keras.Adagrad", kc.Adagrad, learning_rate=0.1, tags={_REL, _S}),
    _case("keras.Adam", kc.Adam, learning_rate=LR, amsgrad=True, tags={_REL, _PROP, _S}),
    _case("keras.Adadelta", kc.Adadelta, learning_rate=1.0, tags={_REL, _S}),
    # (no clipping in these: a NaN gradient makes a clipping norm NaN, hence the whole step)
    _case("keras.AdamW", kc.AdamW, learning_rate=LR, amsgrad=True, tags={_REL, _S}),
    _case("keras.Adamax", kc.Adamax, learning_rate=LR, tags={_REL, _S}),
    _case("keras.Nadam", kc.Nadam, learning_rate=LR, use_ema=True, tags={_REL, _S}),
    _case("keras.SGD", kc.SGD, learning_rate=LR, momentum=0.9, nesterov=True, tags={_REL, _S}),
    _case("tf1.RMSPropOptimizer", tf1.RMSPropOptimizer, LR, momentum=0.9, centered=True, tags={_REL, _S}),
    _case("tf1.RMSPropOptimizer_plain", tf1.RMSPropOptimizer, LR, tags={_PROP}),
    _case("timm.RMSpropTF", timm.RMSpropTF, lr=LR, momentum=0.9, weight_decay=0.01, decoupled_decay=True,
          tags={_REL}),
    _case("torch.param_groups(RMSprop)", pt.param_groups, pt.RMSprop,
          groups=[{"params": lambda path, leaf: leaf.ndim == 1, "weight_decay": 0.0, "lr": 2 * LR}],
          lr=LR, momentum=0.9, weight_decay=0.01, tags={_REL}),
]
_CASES += [
    # ------------------------------------------------------------ wrappers (inner: a case above)
    _case("one_pass(rmsprop_centered_momentum_wd)", rmsjax.one_pass,
          next(c for c in _CASES if c.name == "rmsprop_centered_momentum_wd"), tags={_R}),
    _case("one_pass(adam)", rmsjax.one_pass, next(c for c in _CASES if c.name == "adam"), tags={_R}),
    _case("packed(rmsprop_centered_momentum)", rmsjax.packed,
          _case("", rmsjax.rmsprop, 1e-3, centered=True, momentum=0.9), max_leaf_size=16, tags={_S}),
    _case("packed(adam)", rmsjax.packed, next(c for c in _CASES if c.name == "adam"), tags={_S}),
    # min_size=1: every moment of the small test trees is stored in 8 bits.
    _case("quantized(adam)", rmsjax.quantized, next(c for c in _CASES if c.name == "adam"), min_size=1,
          tags={_C}),
    # float32 test trees pass through; tests/test_low_precision.py wraps every case on bfloat16.
    _case("low_precision(adam)", rmsjax.low_precision, next(c for c in _CASES if c.name == "adam"),
          compensated=True, tags={_C}),
    _case("packed(rmsprop_bfloat16_state)", rmsjax.packed,
          _case("", rmsjax.rmsprop, 1e-3, state_dtype=jnp.bfloat16), tags={_S}),
]

CASES: dict[str, Case] = {case.name: case for case in _CASES}
assert len(CASES) == len(_CASES), "two cases share a name"

FACTORIES = {case.factory for case in _CASES}


def tagged(tag: str) -> dict[str, Case]:
    """The cases a battery runs, by name, in a stable (sorted) order."""
    return {name: CASES[name] for name in sorted(CASES) if tag in CASES[name].tags}


def names(tag: str) -> list[str]:
    return list(tagged(tag))
