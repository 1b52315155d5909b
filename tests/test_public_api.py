"""The public surface: names and signatures exactly as in DESIGN.md, docstrings, errors."""

from __future__ import annotations

import inspect
import re

import jax.numpy as jnp
import pytest

import rmsjax

# DESIGN.md, layers 2 and 3, verbatim, except the 0.3 change of issue 19: an optional part
# (momentum, weight decay, dampening) defaults to None (absent), as in optax.
CONTRACT = """
rmsjax.scale_by_rms(decay=0.9, eps=1e-8, *, eps_in_sqrt=False, initial_scale=0.0,
                    bias_correction=False, state_dtype=None)
rmsjax.scale_by_stddev(decay=0.9, eps=1e-8, *, eps_in_sqrt=False, initial_scale=0.0,
                       bias_correction=False, state_dtype=None)
rmsjax.scale_by_rss(initial_accumulator_value=0.0, eps=1e-10, *, eps_in_sqrt=False)
rmsjax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8, *, eps_root=0.0, nesterov=False,
                     state_dtype=None)
rmsjax.scale_by_adadelta(rho=0.9, eps=1e-6)
rmsjax.leaky_average(decay, *, debias=False, state_dtype=None)
rmsjax.momentum(decay, *, nesterov=False, dampening=None)
rmsjax.rmsprop(learning_rate, decay=0.9, eps=1e-8, *, centered=False, momentum=None,
               nesterov=False, weight_decay=None, bias_correction=False,
               eps_in_sqrt=False, initial_scale=0.0, state_dtype=None)
rmsjax.adagrad(learning_rate, initial_accumulator_value=0.0, eps=1e-10)
rmsjax.adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8, *, eps_root=0.0, nesterov=False)
rmsjax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, *, mask=None)
rmsjax.adadelta(learning_rate=1.0, rho=0.9, eps=1e-6, weight_decay=None)
rmsjax.sgd(learning_rate, momentum=None, *, nesterov=False)
"""


def _contract():
    text = " ".join(CONTRACT.split())
    for match in re.finditer(r"rmsjax\.(\w+)\((.*?)\)(?= rmsjax\.|$)", text):
        yield match.group(1), match.group(2)


def _parse(arguments):
    """[(name, default or <required>, keyword_only)] from 'a, b=1, *, c=2'."""
    parsed, keyword_only = [], False
    for part in (p.strip() for p in arguments.split(",")):
        if part == "*":
            keyword_only = True
            continue
        name, _, default = part.partition("=")
        value = eval(default) if default else inspect.Parameter.empty  # noqa: S307 (our literal)
        parsed.append((name, value, keyword_only))
    return parsed


CONTRACT_ITEMS = list(_contract())


def test_contract_parsed():
    assert len(CONTRACT_ITEMS) == 13


@pytest.mark.parametrize("name,arguments", CONTRACT_ITEMS, ids=[n for n, _ in CONTRACT_ITEMS])
def test_signature_is_exactly_the_contract(name, arguments):
    signature = inspect.signature(getattr(rmsjax, name))
    actual = [
        (p.name, p.default, p.kind == inspect.Parameter.KEYWORD_ONLY)
        for p in signature.parameters.values()
    ]
    expected = _parse(arguments)
    assert actual[: len(expected)] == expected
    # Options added later for rmsjax.compat must be keyword-only with a default, so that
    # every call written against the contract keeps working.
    for name_, default, keyword_only in actual[len(expected):]:
        assert keyword_only and default is not inspect.Parameter.empty, name_


def test_all_is_sorted_and_complete():
    assert rmsjax.__all__ == sorted(rmsjax.__all__)
    for name in rmsjax.__all__:
        assert hasattr(rmsjax, name), name


def _public_objects():
    modules = [
        rmsjax, rmsjax.averages, rmsjax.transforms, rmsjax.optimizers, rmsjax.diagnostics,
        rmsjax.compat.torch, rmsjax.compat.keras, rmsjax.compat.tf1,
    ]
    for module in modules:
        for name in getattr(module, "__all__", []):
            yield f"{module.__name__}.{name}", getattr(module, name)


@pytest.mark.parametrize("qualified,obj", list(_public_objects()), ids=lambda x: str(x)[:60])
def test_every_public_name_has_a_docstring(qualified, obj):
    assert inspect.getdoc(obj), qualified


def test_factories_document_rule_example_and_reference():
    for name, _ in CONTRACT_ITEMS:
        doc = inspect.getdoc(getattr(rmsjax, name))
        assert "Example" in doc and ">>>" in doc, name
        assert "Reference" in doc, name
        assert "math::" in doc, name


# ---------------------------------------------------------------- errors

BAD = [
    (lambda: rmsjax.rmsprop(-0.1), ValueError, "learning_rate"),
    (lambda: rmsjax.rmsprop(float("nan")), ValueError, "learning_rate"),
    (lambda: rmsjax.rmsprop("0.1"), TypeError, "learning_rate"),
    (lambda: rmsjax.rmsprop(0.1, decay=1.0), ValueError, "decay"),
    (lambda: rmsjax.rmsprop(0.1, decay=float("nan")), ValueError, "decay"),
    (lambda: rmsjax.rmsprop(0.1, eps=-1e-8), ValueError, "eps"),
    (lambda: rmsjax.rmsprop(0.1, momentum=1.2), ValueError, "momentum"),
    (lambda: rmsjax.rmsprop(0.1, nesterov=True), ValueError, "momentum"),
    (lambda: rmsjax.rmsprop(0.1, weight_decay=-1.0), ValueError, "weight_decay"),
    (lambda: rmsjax.rmsprop(0.1, initial_scale=-1.0), ValueError, "initial_scale"),
    (lambda: rmsjax.rmsprop(0.1, centered=1), TypeError, "centered"),
    (lambda: rmsjax.rmsprop(0.1, state_dtype=jnp.int32), ValueError, "state_dtype"),
    (lambda: rmsjax.adagrad(0.1, initial_accumulator_value=-0.1), ValueError,
     "initial_accumulator_value"),
    (lambda: rmsjax.adam(0.1, b1=-0.1), ValueError, "b1"),
    (lambda: rmsjax.adam(0.1, b2=1.5), ValueError, "b2"),
    (lambda: rmsjax.adam(0.1, eps_root=-1.0), ValueError, "eps_root"),
    (lambda: rmsjax.adamw(0.1, weight_decay=-0.1), ValueError, "weight_decay"),
    (lambda: rmsjax.adadelta(rho=1.0), ValueError, "rho"),
    (lambda: rmsjax.sgd(0.1, nesterov=True), ValueError, "momentum"),
    (lambda: rmsjax.sgd(0.1, momentum="0.9"), TypeError, "momentum"),
    (lambda: rmsjax.momentum(0.9, dampening=2.0), ValueError, "dampening"),
    (lambda: rmsjax.leaky_average(-0.5), ValueError, "decay"),
]


@pytest.mark.parametrize("make,error,argument", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_hyperparameters_fail_at_construction(make, error, argument):
    with pytest.raises(error, match=argument):
        make()


def test_mismatched_tree_names_the_path():
    tx = rmsjax.rmsprop(0.1)
    state = tx.init({"w": jnp.ones(3), "b": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"\['w'\]"):
        tx.update({"w": jnp.ones(4), "b": jnp.ones(2)}, state)
    with pytest.raises(ValueError, match="first difference"):
        tx.update({"w": jnp.ones(3), "c": jnp.ones(2)}, state)


def test_weight_decay_without_params_says_so():
    tx = rmsjax.rmsprop(0.1, weight_decay=0.1)
    grads = jnp.ones(3)
    with pytest.raises(ValueError, match="needs the current parameters"):
        tx.update(grads, tx.init(grads))
