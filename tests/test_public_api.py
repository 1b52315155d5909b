"""The public surface: names and signatures exactly as in docs/api.md's contract, docstrings, errors."""

from __future__ import annotations

import inspect
import re

import api_contract
import jax.numpy as jnp
import pytest

import rmsjax


# Layers 2 and 3 of the contract block in docs/api.md.
def _contract():
    for call in api_contract.signatures():
        if call.startswith("rmsjax.compat."):
            continue
        match = re.fullmatch(r"rmsjax\.(\w+)\((.*)\)", call)
        assert match, call
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


PUBLIC = list(_public_objects())


# ids are the qualified names: stable across processes (pytest-xdist's workers must collect
# the same tests), where an object's repr may hold its memory address.
@pytest.mark.parametrize("qualified,obj", PUBLIC, ids=[qualified for qualified, _ in PUBLIC])
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
