"""rmsjax.compat against PyTorch 2.13, Keras 3 and TF1.

The fixtures in ``tests/reference/fixtures`` were recorded by ``tests/reference/generate.py``
from the real frameworks (TF1: a NumPy transcription of its kernel) in float64. Each test
here replays one fixture's problem -- the explicit gradient field ``a*p + b*sin(p) + c`` on
a two-leaf tree -- through the matching ``rmsjax.compat`` factory and compares the whole
parameter trajectory. Neither torch nor keras is needed, except by the live test, which is
skipped when torch cannot be imported.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import api_contract
import fixture_replay
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from fixture_replay import RTOL64

from rmsjax import compat

FIXTURES = fixture_replay.REFERENCE / "fixtures"
FIXTURE_NAMES = fixture_replay.names(FIXTURES)
MODULES = {"torch": compat.torch, "keras": compat.keras, "tf1": compat.tf1}
# float32 replays of the float64 fixtures: the tightest bound each family holds, about twice
# the worst relative error measured (x86-64 CPU, jax 0.10, after the lean core): torch
# 5.7e-7 (torch_adagrad_schedule_maximize), tf1 7.4e-7 (tf1_rmsprop_centered), keras 1.1e-6
# (keras_rmsprop_centered). That is a few float32 roundings (6e-8 each) accumulated over
# 50+ steps. The margin leaves room for other CPUs' FMA contraction and vector widths.
RTOL32 = {"torch": 1.2e-6, "tf1": 1.5e-6, "keras": 2.2e-6}
# Keras's Adam (eps_hat) with the optax bias factor: 1 - beta_2**t is computed in float32, up to
# 1.3e-5 relative off at beta_2 = 0.999 (test_optimizers.py); measured 4.2e-6
# (keras_adam_default), 4.0e-6 (keras_adam_schedule), 3.5e-6 (keras_adam_amsgrad), bound 8e-6.
# keras_adam_epsilon_hat (beta_2 = 0.9, epsilon = 0.05: 2.7e-7) keeps its family's bound.
RTOL32_BY_FIXTURE = {"keras_adam_default": 8e-6, "keras_adam_schedule": 8e-6, "keras_adam_amsgrad": 8e-6}
assert set(RTOL32_BY_FIXTURE) <= set(FIXTURE_NAMES)


def _factories(module) -> list[str]:
    """The framework optimizers of a compat module: its CamelCase names (``compat.torch`` also
    exports ``lr_scheduler``, ``param_groups``, ``load_state_dict`` and ``state_dict``)."""
    return [name for name in module.__all__ if name[0].isupper()]


def _load(name: str) -> tuple[dict, dict]:
    return fixture_replay.load(FIXTURES / f"{name}.npz")


def _replay(name: str, real_dtype, tx=None) -> float:
    """The relative error of one fixture replayed through its own ``rmsjax.compat`` optimizer,
    or through ``tx`` when given."""
    meta, arrays = _load(name)
    if tx is None:
        factory = getattr(MODULES[meta["framework"]], meta["optimizer"])
        tx = factory(**fixture_replay.constructor_kwargs(meta, factory, jnp.dtype(real_dtype)))
    return fixture_replay.replay_error(meta, arrays, tx, real_dtype, fast_compile=True)


def test_every_option_has_a_fixture():
    assert len(FIXTURE_NAMES) >= 50
    frameworks = {name.split("_")[0] for name in FIXTURE_NAMES}
    assert frameworks == {"torch", "keras", "tf1"}
    for name in FIXTURE_NAMES:
        meta, arrays = _load(name)
        assert meta["steps"] >= 50
        assert arrays["traj_w"].shape[0] == meta["steps"]


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_float64_matches_framework(name):
    with jax.enable_x64(True):
        err = _replay(name, jnp.float64)
    assert err <= RTOL64, f"{name}: relative error {err:.3e}"


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_float32_matches_framework(name):
    err = _replay(name, jnp.float32)
    tolerance = RTOL32_BY_FIXTURE.get(name, RTOL32[name.split("_")[0]])
    assert err <= tolerance, f"{name}: relative error {err:.3e} > {tolerance:.1e}"


# ---------------------------------------------------------------- the conventions matter


def _wrong_conventions():
    """(fixture, the same optimizer with one convention swapped, built from rmsjax's core)."""
    import rmsjax
    from rmsjax.compat import _common
    from rmsjax.transforms import add_decayed_weights, scale_by_learning_rate

    def sched(lr):
        return fixture_replay.step_schedule(lr, 15, 0.5, jnp.float64)

    return [
        # eps outside vs inside the root
        (
            "torch_rmsprop_eps",
            lambda: optax.chain(
                rmsjax.scale_by_rms(0.9, 0.1, eps_in_sqrt=True), scale_by_learning_rate(0.02)
            ),
        ),
        (
            "keras_rmsprop_eps",
            lambda: optax.chain(rmsjax.scale_by_rms(0.8, 0.1), scale_by_learning_rate(0.02)),
        ),
        # centered: sqrt(v - m**2) + eps (PyTorch) vs sqrt(v - m**2 + eps) (Keras, TF1)
        (
            "torch_rmsprop_centered",
            lambda: optax.chain(
                rmsjax.scale_by_stddev(0.99, 0.01, eps_in_sqrt=True), scale_by_learning_rate(0.01)
            ),
        ),
        (
            "keras_rmsprop_centered",
            lambda: optax.chain(rmsjax.scale_by_stddev(0.9, 0.01), scale_by_learning_rate(0.01)),
        ),
        # TF1's accumulator starting at 1, not 0
        (
            "tf1_rmsprop_default",
            lambda: optax.chain(
                rmsjax.scale_by_rms(0.9, 1e-10, eps_in_sqrt=True), scale_by_learning_rate(0.01)
            ),
        ),
        # learning rate outside (PyTorch) vs inside (Keras, TF1) the momentum buffer
        (
            "torch_rmsprop_schedule_momentum",
            lambda: optax.chain(
                rmsjax.scale_by_rms(0.99, 1e-8), scale_by_learning_rate(sched(0.01)), rmsjax.momentum(0.9)
            ),
        ),
        (
            "keras_rmsprop_schedule_momentum",
            lambda: optax.chain(
                rmsjax.scale_by_rms(0.9, 1e-7, eps_in_sqrt=True),
                rmsjax.momentum(0.9),
                scale_by_learning_rate(sched(0.01)),
            ),
        ),
        (
            "tf1_rmsprop_schedule_momentum",
            lambda: optax.chain(
                rmsjax.scale_by_rms(0.9, 1e-10, eps_in_sqrt=True, initial_scale=1.0),
                rmsjax.momentum(0.9),
                scale_by_learning_rate(sched(0.01)),
            ),
        ),
        (
            "torch_sgd_schedule_momentum",
            lambda: optax.chain(scale_by_learning_rate(sched(0.05)), rmsjax.momentum(0.9)),
        ),
        # L2 weight decay (PyTorch) vs decoupled (Keras)
        (
            "torch_rmsprop_centered_momentum_wd",
            lambda: optax.chain(
                rmsjax.scale_by_stddev(0.95, 1e-8),
                rmsjax.momentum(0.8),
                scale_by_learning_rate(0.005),
                _common.decoupled_weight_decay(0.1, 0.005),
            ),
        ),
        (
            "keras_rmsprop_centered_momentum_wd",
            lambda: optax.chain(
                add_decayed_weights(0.1),
                rmsjax.scale_by_stddev(0.95, 1e-7, eps_in_sqrt=True),
                scale_by_learning_rate(0.005),
                rmsjax.momentum(0.8),
            ),
        ),
        # Adam's epsilon: after bias correction (PyTorch) vs epsilon hat (Keras)
        (
            "torch_adam_eps",
            lambda: optax.chain(
                rmsjax.scale_by_adam(0.8, 0.9, 0.05, eps_hat=True), scale_by_learning_rate(0.01)
            ),
        ),
        (
            "keras_adam_epsilon_hat",
            lambda: optax.chain(rmsjax.scale_by_adam(0.8, 0.9, 0.05), scale_by_learning_rate(0.01)),
        ),
        # complex numbers: two reals (PyTorch) vs the modulus (rmsjax's own transformations)
        (
            "torch_rmsprop_complex",
            lambda: optax.chain(
                add_decayed_weights(0.1),
                rmsjax.scale_by_stddev(0.99, 1e-8),
                rmsjax.momentum(0.5),
                scale_by_learning_rate(0.01),
            ),
        ),
        # PyTorch Adagrad's lr_decay
        (
            "torch_adagrad_lr_decay_wd",
            lambda: optax.chain(
                add_decayed_weights(0.1), rmsjax.scale_by_rss(0.1, 1e-10), scale_by_learning_rate(0.2)
            ),
        ),
    ]


WRONG = _wrong_conventions()


@pytest.mark.parametrize("name,make", WRONG, ids=[name for name, _ in WRONG])
def test_the_other_convention_does_not_match(name, make):
    """Each convention in docs/porting.md's table changes the trajectory, far beyond rounding."""
    with jax.enable_x64(True):
        assert _replay(name, jnp.float64, tx=make()) > 1e-4


# ---------------------------------------------------------------- coverage of the options


def _fixture_metas() -> list[dict]:
    return [_load(name)[0] for name in FIXTURE_NAMES]


# Keras's optimizers have their own fixtures and this check in tests/test_keras_recipes.py.
@pytest.mark.parametrize(
    "framework,optimizer",
    [(fw, name) for fw, module in MODULES.items() if fw != "keras" for name in _factories(module)],
)
def test_every_argument_is_exercised_by_a_fixture(framework, optimizer):
    """Each argument of each factory takes a non-default value in at least one fixture."""
    factory = getattr(MODULES[framework], optimizer)
    metas = [m for m in _fixture_metas() if (m["framework"], m["optimizer"]) == (framework, optimizer)]
    assert metas, optimizer
    for parameter in inspect.signature(factory).parameters.values():
        used = [m["kwargs"][parameter.name] for m in metas if parameter.name in m["kwargs"]]
        default = parameter.default
        if isinstance(default, tuple):
            default = list(default)
        assert any(value != default for value in used), f"{optimizer}({parameter.name}=...)"
    if framework == "torch":
        assert any(m["complex"] for m in metas), f"{optimizer}: no complex fixture"


@pytest.mark.parametrize("framework", sorted(MODULES))
def test_step_schedule_with_momentum_and_the_combination_are_covered(framework):
    metas = [m for m in _fixture_metas() if m["framework"] == framework]
    assert any(m["schedule"] and m["kwargs"].get("momentum") for m in metas)
    assert any(m["kwargs"].get("centered") and m["kwargs"].get("momentum") for m in metas)
    if framework != "tf1":  # TF1's RMSPropOptimizer has no weight decay
        assert any(
            m["kwargs"].get("centered") and m["kwargs"].get("momentum") and m["kwargs"].get("weight_decay")
            for m in metas
        )


# ---------------------------------------------------------------- signatures (docs/api.md, layer 4)


def _contract() -> list[tuple[str, str, list]]:
    """(module, name, [(argument, default or empty, kind)]) for each layer-4 signature of the
    contract block in docs/api.md."""
    items = []
    for line in api_contract.signatures("rmsjax.compat."):
        text = ast.unparse(ast.parse(line).body[0].value)
        path, _, arguments = text.partition("(")
        fn = ast.parse(f"def f({arguments[:-1]}): pass").body[0].args
        required = len(fn.args) - len(fn.defaults)
        params = []
        for i, arg in enumerate(fn.args):
            default = inspect.Parameter.empty if i < required else ast.literal_eval(fn.defaults[i - required])
            params.append((arg.arg, default, inspect.Parameter.POSITIONAL_OR_KEYWORD))
        *_, module, name = path.split(".")
        items.append((module, name, params))
    return items


CONTRACT_ITEMS = _contract()


def test_contract_covers_every_public_name():
    assert len(CONTRACT_ITEMS) == 11
    # 0.2 adds Keras optimizers (tests/test_keras_recipes.py); the 0.1 ones stay.
    assert {(m, n) for m, n, _ in CONTRACT_ITEMS} <= {
        (fw, name) for fw, module in MODULES.items() for name in _factories(module)
    }
    assert {(m, n) for m, n, _ in CONTRACT_ITEMS if m != "keras"} == {
        (fw, name) for fw, module in MODULES.items() for name in _factories(module) if fw != "keras"
    }


@pytest.mark.parametrize("module,name,params", CONTRACT_ITEMS, ids=[f"{m}.{n}" for m, n, _ in CONTRACT_ITEMS])
def test_signature_is_exactly_the_contract(module, name, params):
    signature = inspect.signature(getattr(MODULES[module], name))
    actual = [(p.name, p.default, p.kind) for p in signature.parameters.values()]
    if module == "keras":  # 0.2: Keras's shared options follow, each with a default
        assert actual[: len(params)] == params
        assert all(default is not inspect.Parameter.empty for _, default, _ in actual[len(params):])
        return
    assert actual == params


def _parameters(arguments: str) -> list[tuple[str, object, object]]:
    """[(argument, default or empty, kind)] of a written argument list (``*`` markers kept)."""
    fn = ast.parse(f"def f({arguments}): pass").body[0].args
    required = len(fn.args) - len(fn.defaults)
    empty, positional = inspect.Parameter.empty, inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [(a.arg, empty if i < required else ast.literal_eval(fn.defaults[i - required]), positional)
              for i, a in enumerate(fn.args)]
    params += [(a.arg, ast.literal_eval(d), inspect.Parameter.KEYWORD_ONLY)
               for a, d in zip(fn.kwonlyargs, fn.kw_defaults, strict=True)]
    return params


def _porting_contract() -> dict[str, list]:
    """Dotted name -> parameters of each signature of docs/api.md's 0.2 porting block; the
    Keras line (``<Optimizer>(..., shared options)``) under ``"keras"``."""
    items = {}
    for line in api_contract.signatures("rmsjax.compat.", block="contract-0.2"):
        call = line.split(" -> ")[0]
        path, _, arguments = call.partition("(")
        arguments = arguments.rsplit(")", 1)[0]
        if "<Optimizer>" in path:
            items["keras"] = _parameters(arguments.replace("...,", "", 1))
        else:
            items[path.removeprefix("rmsjax.compat.")] = _parameters(arguments)
    return items


PORTING_ITEMS = _porting_contract()


def test_porting_contract_block_is_the_code():
    """docs/api.md's 0.2 block (timm, lr_scheduler, state_dict, Keras's shared options) gives
    each signature exactly; every Keras optimizer ends with the shared options."""
    assert set(PORTING_ITEMS) == {"timm.RMSpropTF", "torch.lr_scheduler.StepLR", "torch.state_dict",
                                  "torch.load_state_dict", "keras"}
    for dotted, params in PORTING_ITEMS.items():
        if dotted == "keras":
            continue
        target = compat
        for part in dotted.split("."):
            target = getattr(target, part)
        actual = [(p.name, p.default, p.kind) for p in inspect.signature(target).parameters.values()]
        assert actual == params, dotted
    shared = {name: default for name, default, _ in PORTING_ITEMS["keras"]}
    for name in _factories(compat.keras):
        actual = inspect.signature(getattr(compat.keras, name)).parameters
        # the shared options come last (AdamW's weight decay is among its own arguments)
        tail = [n for n in actual if n in shared and n != "weight_decay"]
        assert tail == list(actual)[-len(tail):] and "weight_decay" in actual, name
        for option, default in shared.items():
            if option == "weight_decay" and actual[option].default != default:
                continue  # AdamW's weight decay is its own argument, with Keras's default 0.004
            assert actual[option].default == default, (name, option)


@pytest.mark.parametrize("module,name,params", CONTRACT_ITEMS, ids=[f"{m}.{n}" for m, n, _ in CONTRACT_ITEMS])
def test_public_names_are_documented(module, name, params):
    doc = inspect.getdoc(getattr(MODULES[module], name))
    assert doc and "Args:" in doc and "Example:" in doc and ">>>" in doc and "math::" in doc
    for argument, _, _ in params:
        assert f"{argument}:" in doc, f"{module}.{name}: {argument} undocumented"
    assert inspect.getdoc(compat) and inspect.getdoc(MODULES[module])


# ---------------------------------------------------------------- errors

pt, kc, tf1 = compat.torch, compat.keras, compat.tf1

BAD = [
    (lambda: pt.SGD(nesterov=True), ValueError, "nesterov"),
    (lambda: pt.SGD(momentum=0.9, dampening=0.1, nesterov=True), ValueError, "dampening"),
    (lambda: pt.SGD(lr=-1.0), ValueError, "lr"),
    (lambda: pt.SGD(momentum=-0.5), ValueError, "momentum"),
    (lambda: pt.SGD(weight_decay=-0.5), ValueError, "weight_decay"),
    (lambda: pt.RMSprop(lr="0.1"), TypeError, "lr"),
    (lambda: pt.RMSprop(alpha=-0.1), ValueError, "alpha"),
    (lambda: pt.RMSprop(eps=-1.0), ValueError, "eps"),
    (lambda: pt.RMSprop(momentum=-0.1), ValueError, "momentum"),
    (lambda: pt.RMSprop(weight_decay=-0.1), ValueError, "weight_decay"),
    (lambda: pt.RMSprop(centered="yes"), TypeError, "centered"),
    (lambda: pt.RMSprop(maximize=1), TypeError, "maximize"),
    (lambda: pt.Adagrad(lr_decay=-0.1), ValueError, "lr_decay"),
    (lambda: pt.Adagrad(initial_accumulator_value=-0.1), ValueError, "initial_accumulator_value"),
    (lambda: pt.Adam(betas=(1.0, 0.999)), ValueError, "betas[0]"),
    (lambda: pt.Adam(betas=(0.9, -0.1)), ValueError, "betas[1]"),
    (lambda: pt.Adam(betas=0.9), ValueError, "betas"),
    (lambda: pt.AdamW(weight_decay=-1e-2), ValueError, "weight_decay"),
    (lambda: pt.AdamW(amsgrad=None), TypeError, "amsgrad"),
    (lambda: pt.Adadelta(rho=1.5), ValueError, "rho"),
    (lambda: kc.RMSprop(learning_rate=-0.1), ValueError, "learning_rate"),
    (lambda: kc.RMSprop(rho=1.0), ValueError, "rho"),
    (lambda: kc.RMSprop(epsilon=-1e-7), ValueError, "epsilon"),
    (lambda: kc.RMSprop(weight_decay=-0.1), ValueError, "weight_decay"),
    (lambda: kc.Adagrad(initial_accumulator_value=-1.0), ValueError, "initial_accumulator_value"),
    (lambda: kc.Adam(beta_2=1.0), ValueError, "beta_2"),
    (lambda: kc.Adadelta(rho=float("nan")), ValueError, "rho"),
    (lambda: tf1.RMSPropOptimizer(-0.1), ValueError, "learning_rate"),
    (lambda: tf1.RMSPropOptimizer(0.1, decay=1.0), ValueError, "decay"),
    (lambda: tf1.RMSPropOptimizer(0.1, momentum=-0.9), ValueError, "momentum"),
    (lambda: tf1.RMSPropOptimizer(0.1, epsilon=-1e-10), ValueError, "epsilon"),
]


@pytest.mark.parametrize("make,error,argument", BAD, ids=[f"{i}-{a}" for i, (_, _, a) in enumerate(BAD)])
def test_bad_arguments_raise_naming_the_argument(make, error, argument):
    with pytest.raises(error, match=argument.replace("[", r"\[").replace("]", r"\]")):
        make()


def test_jax_array_hyperparameters_and_inject_hyperparams():
    """Hyperparameters may be jax arrays, so inject_hyperparams can change them without recompiling."""
    params = {"w": jnp.array([0.5, -1.5]), "b": jnp.array(2.0)}
    plain = pt.RMSprop(lr=0.01, momentum=0.9, weight_decay=0.1, centered=True)
    injected = optax.inject_hyperparams(pt.RMSprop, static_args=("centered", "maximize"))(
        lr=0.01, momentum=0.9, weight_decay=0.1, centered=True
    )
    outs = []
    for tx in (plain, injected):
        state, p = tx.init(params), params
        step = jax.jit(tx.update)
        for _ in range(5):
            updates, state = step(jax.tree.map(lambda x: 2 * x, p), state, p)
            p = optax.apply_updates(p, updates)
        outs.append(p)
    # Injected, the hyperparameters are float32 arrays and the scalars made from them (1 - alpha,
    # ...) are rounded in float32 on the device, not once on the host: after 5 steps the runs
    # part by 7.0e-7 relative on XLA:CPU, 1.02e-6 on an H200.
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-6)


@pytest.mark.parametrize(
    "module,name", [(m, n) for m in ("torch", "keras", "tf1") for n in _factories(MODULES[m])]
)
def test_dtypes_state_and_single_compilation(module, name):
    """Updates come out in each leaf's dtype (bfloat16, float32, complex64), state keeps its dtypes."""
    kwargs = {"learning_rate": 0.01} if name == "RMSPropOptimizer" else {}
    if name == "RMSprop":
        kwargs = {"momentum": 0.9, "weight_decay": 0.1, "centered": True}
    tx = getattr(MODULES[module], name)(**kwargs)
    params = {"a": jnp.ones(3, jnp.bfloat16), "b": jnp.full((2,), 2.0, jnp.float32)}
    if module == "torch":
        params["c"] = jnp.full((2,), 1.0 + 1.0j, jnp.complex64)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for _ in range(3):
        updates, new_state = step(params, state, params)
        assert jax.tree.map(lambda x: x.dtype, updates) == jax.tree.map(lambda x: x.dtype, params)
        assert jax.tree.map(lambda x: (x.dtype, x.shape), new_state) == jax.tree.map(
            lambda x: (x.dtype, x.shape), state
        )
        state = new_state
    assert step._cache_size() == 1


# ---------------------------------------------------------------- live, side by side with PyTorch


def _torch_live_cases():
    return [
        ("RMSprop", {"lr": 0.01, "alpha": 0.9, "centered": True, "momentum": 0.9, "weight_decay": 0.05}, 7),
        ("Adam", {"lr": 0.02, "amsgrad": True, "maximize": True}, None),
        ("AdamW", {"lr": 0.02, "betas": (0.8, 0.99), "weight_decay": 0.3}, 5),
        ("Adagrad", {"lr": 0.1, "lr_decay": 0.02, "initial_accumulator_value": 0.2}, 5),
        ("Adadelta", {"lr": 0.7, "rho": 0.8, "weight_decay": 0.1}, None),
        ("SGD", {"lr": 0.03, "momentum": 0.8, "dampening": 0.3, "weight_decay": 0.01}, 6),
    ]


@pytest.mark.parametrize("complex_params", [False, True], ids=["real", "complex"])
def test_live_side_by_side_with_pytorch(complex_params):
    """Runs torch itself on a fresh random problem (skipped when torch is not installed)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    shapes = {"u": (4,), "v": (2, 3)}
    steps, gamma = 20, 0.5

    def draw(shape):
        x = rng.normal(size=shape)
        return x + 1j * rng.normal(size=shape) if complex_params else x

    init = {n: draw(s) for n, s in shapes.items()}
    target = {n: draw(s) for n, s in shapes.items()}
    with jax.enable_x64(True):
        for optimizer, kwargs, step_size in _torch_live_cases():
            # torch, with an explicit parameter-dependent gradient 3*(p - target) + sin(p)
            tensors = {n: torch.tensor(x, requires_grad=True) for n, x in init.items()}
            opt = getattr(torch.optim, optimizer)(list(tensors.values()), foreach=False, **kwargs)
            sched = None if step_size is None else torch.optim.lr_scheduler.StepLR(opt, step_size, gamma)
            theirs = []
            for _ in range(steps):
                with torch.no_grad():
                    for n, t in tensors.items():
                        t.grad = 3 * (t - torch.tensor(target[n])) + torch.sin(t)
                opt.step()
                if sched is not None:
                    sched.step()
                theirs.append({n: t.detach().numpy().copy() for n, t in tensors.items()})

            # rmsjax.compat.torch, same arguments
            jkwargs = dict(kwargs)
            if step_size is not None:
                jkwargs["lr"] = fixture_replay.step_schedule(kwargs["lr"], step_size, gamma, jnp.float64)
            tx = getattr(compat.torch, optimizer)(**jkwargs)
            p = {n: jnp.asarray(x) for n, x in init.items()}
            tgt = {n: jnp.asarray(x) for n, x in target.items()}
            state = tx.init(p)
            update = jax.jit(tx.update)
            for t in range(steps):
                grads = {n: 3 * (p[n] - tgt[n]) + jnp.sin(p[n]) for n in p}
                updates, state = update(grads, state, p)
                p = optax.apply_updates(p, updates)
                for n in p:
                    np.testing.assert_allclose(
                        np.asarray(p[n]), theirs[t][n], rtol=1e-9, atol=1e-12, err_msg=f"{optimizer} step {t}"
                    )


# ---------------------------------------------------------------- docs/porting.md's worked example

PORTING = Path(__file__).resolve().parents[1] / "docs" / "porting.md"


def _porting_block(marker: str) -> str:
    """The fenced block that follows ``<!-- marker -->`` in docs/porting.md, without fences."""
    after = PORTING.read_text().split(f"<!-- {marker} -->", 1)[1]
    return after.split("```", 2)[1].split("\n", 1)[1]


def test_porting_example_prints_what_the_page_shows(capsys):
    assert _porting_block("porting-output:jax") == _porting_block("porting-output:torch")
    exec(compile(_porting_block("porting-example:jax"), str(PORTING), "exec"), {"__name__": "porting"})
    assert capsys.readouterr().out == _porting_block("porting-output:jax")


def test_porting_example_pytorch_side_prints_what_the_page_shows(capsys):
    pytest.importorskip("torch")
    exec(compile(_porting_block("porting-example:torch"), str(PORTING), "exec"), {"__name__": "porting"})
    assert capsys.readouterr().out == _porting_block("porting-output:torch")
