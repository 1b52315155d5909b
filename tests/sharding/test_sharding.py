"""Optimizer state lives where its parameters live, on 8 simulated devices.

Run by ``tests/test_sharding_subprocess.py`` (see ``conftest.py`` here for the flag).

Checked for every optimizer, eager and jitted ``init``:

1. each state leaf that mirrors a parameter has that parameter's sharding (same mesh, same
   partition spec); scalars (step counts, the readable learning rate) are replicated over
   the same mesh;
2. the compiled update of sharded parameters holds no collective;
3. data parallel training (replicated parameters, sharded batch) equals a one-device run;
4. fully sharded (FSDP-style) training of a Flax NNX model equals a one-device run.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import registry
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import rmsjax

COLLECTIVE = re.compile(r"\b(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(-start)?\(")


# --------------------------------------------------------------------------- optimizers


# The cases of tests/registry.py tagged "sharding"; rmsjax.packed's state is checked apart.
_CASES = registry.tagged("sharding")
OPTIMIZERS = {name: case.make for name, case in _CASES.items() if case.factory is not rmsjax.packed}
PACKED = {name: case.make for name, case in _CASES.items() if case.factory is rmsjax.packed}


# --------------------------------------------------------------------------- helpers

SPECS = {
    "w": ((8, 4), P("data", "model")),
    # Same shape as "w", other sharding: each state leaf must follow its own parameter.
    "w_t": ((8, 4), P("model", "data")),
    "b": ((4,), P("model")),
    "v": ((16,), P(("data", "model"))),
    "u": ((3, 8), P(None, "data")),
    "r": ((3, 2), P()),
    "s": ((), P()),
}


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def sharded_tree(mesh, seed=0):
    rng = np.random.default_rng(seed)
    return {
        name: jax.device_put(rng.normal(size=shape).astype(np.float32), NamedSharding(mesh, spec))
        for name, (shape, spec) in SPECS.items()
    }


def _same_place(leaf, param) -> bool:
    """Same mesh (devices and axes) and same partition spec, up to trailing ``None``s."""
    got, want = leaf.sharding, param.sharding
    if not (isinstance(got, NamedSharding) and isinstance(want, NamedSharding)):
        return False
    return (
        got.mesh.devices.tolist() == want.mesh.devices.tolist()
        and got.mesh.axis_names == want.mesh.axis_names
        and got.is_equivalent_to(want, leaf.ndim)
        and _normalise(got.spec, leaf.ndim) == _normalise(want.spec, leaf.ndim)
    )


def _normalise(spec, ndim):
    return tuple(spec) + (None,) * (ndim - len(spec))


def placement_report(state, params, mesh):
    """Counts state leaves that mirror a parameter (matched by the end of their tree path)
    and sit like it, and scalars that are replicated over ``mesh``."""
    param_paths = {
        jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }
    mirrored = mirrored_ok = scalars = scalars_ok = 0
    misplaced = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        key = jax.tree_util.keystr(path)
        param = next((p for suffix, p in param_paths.items() if key.endswith(suffix)), None)
        if param is not None and leaf.shape == param.shape:
            mirrored += 1
            ok = _same_place(leaf, param)
            mirrored_ok += ok
        else:
            scalars += 1
            sharding = leaf.sharding
            ok = (
                leaf.ndim == 0
                and sharding.is_fully_replicated
                and sharding.device_set == set(mesh.devices.flat)
            )
            scalars_ok += ok
        if not ok:
            misplaced.append(f"{key}: {leaf.shape} {leaf.sharding}")
    return mirrored, mirrored_ok, scalars, scalars_ok, misplaced


def count_collectives(hlo_text: str) -> int:
    return len(COLLECTIVE.findall(hlo_text))


# --------------------------------------------------------------------------- 1. placement


@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_is_sharded_like_params(name, jitted, mesh):
    tx = OPTIMIZERS[name]()
    params = sharded_tree(mesh)
    state = jax.jit(tx.init)(params) if jitted else tx.init(params)
    mirrored, mirrored_ok, scalars, scalars_ok, misplaced = placement_report(state, params, mesh)
    assert mirrored >= len(SPECS)
    assert (mirrored_ok, scalars_ok) == (mirrored, scalars), misplaced


def test_explicit_mesh_axes(mesh):
    """The same holds for meshes with explicit axes, under ``jax.set_mesh``."""
    explicit = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    params = sharded_tree(explicit)
    for tx in (rmsjax.rmsprop(1e-3, centered=True, momentum=0.9), rmsjax.adam(1e-3)):
        with jax.set_mesh(explicit):
            for state in (tx.init(params), jax.jit(tx.init)(params)):
                mirrored, mirrored_ok, scalars, scalars_ok, misplaced = placement_report(
                    state, params, explicit
                )
                assert (mirrored_ok, scalars_ok) == (mirrored, scalars), misplaced
            _, state = jax.jit(tx.update)(params, jax.jit(tx.init)(params), params)
            mirrored, mirrored_ok, scalars, scalars_ok, misplaced = placement_report(state, params, explicit)
            assert (mirrored_ok, scalars_ok) == (mirrored, scalars), misplaced


@pytest.mark.parametrize("wrapper", ["quantized", "low_precision"])
def test_wrapper_counters_are_replicated_over_the_mesh(wrapper, mesh):
    """The step counters of ``quantized`` and ``low_precision`` sit on every device of the
    parameters' mesh after an eager init, as the wrapped optimizer's do (they sat on the
    default device alone)."""
    wrap = {"quantized": rmsjax.quantized, "low_precision": rmsjax.low_precision}[wrapper]
    params = sharded_tree(mesh)
    state = wrap(rmsjax.adam(1e-3)).init(params)
    counters = [leaf for leaf in jax.tree.leaves(state) if leaf.ndim == 0 and leaf.dtype == jnp.int32]
    assert len(counters) == 2  # the wrapper's count and Adam's
    for leaf in counters:
        assert leaf.sharding.is_fully_replicated and leaf.sharding.device_set == set(mesh.devices.flat)


@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
def test_low_precision_error_record_is_placed_like_its_parameter(jitted, mesh):
    """``low_precision(..., compensated=True)`` keeps an int8 record per 16-bit parameter; it
    is made from the parameter, so it sits like it (it was made from the shape alone: whole
    on one device eagerly, replicated under jit, and the ZeRO step then moved it with
    all-to-alls), and the update compiles to no collective."""
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), sharded_tree(mesh))
    grads = jax.tree.map(lambda x: x.astype(jnp.bfloat16), sharded_tree(mesh, 1))
    tx = rmsjax.low_precision(rmsjax.adam(1e-3), compensated=True)
    state = jax.jit(tx.init)(params) if jitted else tx.init(params)
    records = jax.tree.leaves(state.error)
    assert len(records) == len(SPECS) and all(r.dtype == jnp.int8 for r in records)
    mirrored, mirrored_ok, scalars, scalars_ok, misplaced = placement_report(state, params, mesh)
    assert mirrored >= 3 * len(SPECS)  # mu, nu and the record
    assert (mirrored_ok, scalars_ok) == (mirrored, scalars), misplaced
    hlo = jax.jit(_step(tx)).lower(params, grads, state).compile().as_text()
    assert count_collectives(hlo) == 0, COLLECTIVE.findall(hlo)


# --------------------------------------------------------------------------- 1b. rmsjax.packed


def _packed_report(state, params, mesh):
    """``placement_report`` for ``rmsjax.packed``: its state holds one buffer per group of
    leaves; a buffer must sit where ``pack`` puts the parameters (a leaf alone: the leaf)."""
    layout = rmsjax.packing.state_layout(state, params)
    buffers, _ = rmsjax.packing.pack(params, layout)
    report = placement_report(state.inner, buffers, mesh)
    offsets = placement_report(state.offsets, (), mesh)
    return tuple(a + b for a, b in zip(report[:4], offsets[:4])) + (report[4] + offsets[4],)


def test_leaves_on_different_devices_are_never_packed_together(mesh):
    """``rmsjax.packing`` groups small leaves only with leaves that live where they do: a
    sharded leaf stays alone, leaves on one device go together, a leaf on another device
    goes apart. (Moved here from tests/test_packing.py, where one device made it skip.)"""
    devices = list(mesh.devices.flat)
    split = jax.device_put(jnp.ones(8), NamedSharding(mesh, P("data")))
    on0 = jax.device_put(jnp.ones(3), devices[0])
    on1 = jax.device_put(jnp.ones(3), devices[1])
    # leaves in key order: on0 (0), on0b (1), on1 (2), split (3)
    layout = rmsjax.packing.layout_of({"split": split, "on0": on0, "on1": on1, "on0b": on0 * 2})
    assert sorted(layout.groups) == [(0, 1), (2,), (3,)]


@pytest.mark.parametrize("axes", [AxisType.Auto, AxisType.Explicit], ids=["auto-axes", "explicit-axes"])
@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", sorted(PACKED))
def test_packed_state_is_placed_like_params(name, jitted, axes):
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axes,) * 2)
    tx = PACKED[name]()
    params = sharded_tree(mesh)
    state = jax.jit(tx.init)(params) if jitted else tx.init(params)
    layout = rmsjax.packing.state_layout(state, params)
    leaves = jax.tree.leaves(params)
    # A parameter split across devices is never packed with others.
    for group in layout.groups:
        if len(group) > 1:
            assert all(leaves[i].sharding.is_fully_replicated for i in group), group
    mirrored, mirrored_ok, scalars, scalars_ok, misplaced = _packed_report(state, params, mesh)
    assert mirrored >= len(layout.groups)
    assert (mirrored_ok, scalars_ok) == (mirrored, scalars), misplaced
    # The update needs no communication, and keeps the state where it was.
    compiled = jax.jit(_step(tx)).lower(params, sharded_tree(mesh, 1), state).compile()
    assert count_collectives(compiled.as_text()) == 0
    _, state = compiled(params, sharded_tree(mesh, 1), state)
    mirrored, mirrored_ok, scalars, scalars_ok, misplaced = _packed_report(state, params, mesh)
    assert (mirrored_ok, scalars_ok) == (mirrored, scalars), misplaced


# --------------------------------------------------------------------------- 2. no collectives


def _step(tx):
    def step(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def test_collective_detector_sees_a_reduction(mesh):
    """Positive control: a sum over a sharded array needs an all-reduce, and is found."""
    x = sharded_tree(mesh)["w"]
    assert count_collectives(jax.jit(jnp.sum).lower(x).compile().as_text()) >= 1


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_update_compiles_to_no_collective(name, mesh):
    tx = OPTIMIZERS[name]()
    params, grads = sharded_tree(mesh, 0), sharded_tree(mesh, 1)
    state = jax.jit(tx.init)(params)
    compiled = jax.jit(_step(tx)).lower(params, grads, state).compile()
    hlo = compiled.as_text()
    assert count_collectives(hlo) == 0, COLLECTIVE.findall(hlo)
    # The state that comes out of the update stays where it was.
    new_params, new_state = compiled(params, grads, state)
    mirrored, mirrored_ok, scalars, scalars_ok, misplaced = placement_report(new_state, params, mesh)
    assert (mirrored_ok, scalars_ok) == (mirrored, scalars), misplaced
    assert all(_same_place(a, b) for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(params)))


# --------------------------------------------------------------------------- 3. data parallel


def _mlp(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def _loss(params, x, y):
    return jnp.mean(jnp.square(_mlp(params, x) - y))


def _train(tx, params, x, y, steps):
    """``steps`` full-batch steps; returns the final params and state and the step's HLO."""

    def step(params, state, x, y):
        grads = jax.grad(_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    compiled = jax.jit(step).lower(params, state, x, y).compile()
    for _ in range(steps):
        params, state = jax.block_until_ready(compiled(params, state, x, y))  # see conftest.py
    return params, state, compiled.as_text()


def _max_difference(a, b):
    return max(
        float(jnp.max(jnp.abs(np.asarray(p) - np.asarray(q))))
        for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


@pytest.mark.parametrize(
    "make",
    [lambda: rmsjax.rmsprop(1e-2, centered=True, momentum=0.9), lambda: rmsjax.adam(1e-2)],
    ids=["rmsprop-centered-momentum", "adam"],
)
def test_data_parallel_equals_one_device(make):
    rng = np.random.default_rng(0)
    params = {
        "w1": rng.normal(size=(4, 32)).astype(np.float32) / 2,
        "b1": np.zeros(32, np.float32),
        "w2": rng.normal(size=(32, 1)).astype(np.float32) / 6,
        "b2": np.zeros(1, np.float32),
    }
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = np.sin(x.sum(axis=1, keepdims=True)).astype(np.float32)

    one = jax.devices()[0]
    single, _, _ = _train(
        make(), jax.device_put(params, one), jax.device_put(x, one), jax.device_put(y, one), 10
    )

    mesh = jax.make_mesh((8,), ("batch",), axis_types=(AxisType.Auto,))
    replicated, by_batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))
    sharded_params = jax.device_put(params, replicated)
    xs, ys = jax.device_put(x, by_batch), jax.device_put(y, by_batch)
    parallel, state, hlo = _train(make(), sharded_params, xs, ys, 10)

    # The compiler averaged the gradients over the batch shards ...
    assert count_collectives(hlo) >= 1
    # ... everything stayed replicated, and the result is the one-device result.
    assert all(
        leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
        for leaf in jax.tree.leaves(state)
    )
    difference = _max_difference(parallel, single)
    print(f"data parallel: largest difference from one device {difference:.3g}")
    assert difference <= 1e-6


# --------------------------------------------------------------------------- 4. FSDP with Flax NNX


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        kernel = nnx.initializers.lecun_normal()
        zeros = nnx.initializers.zeros_init()
        # FSDP: every parameter sharded along the 'fsdp' axis on one of its dimensions.
        self.hidden = nnx.Linear(
            8,
            32,
            kernel_init=nnx.with_partitioning(kernel, (None, "fsdp")),
            bias_init=nnx.with_partitioning(zeros, ("fsdp",)),
            rngs=rngs,
        )
        self.out = nnx.Linear(
            32,
            8,
            kernel_init=nnx.with_partitioning(kernel, ("fsdp", None)),
            bias_init=nnx.with_partitioning(zeros, ("fsdp",)),
            rngs=rngs,
        )

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


def _nnx_data():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 8)).astype(np.float32)
    y = np.tanh(x @ rng.normal(size=(8, 8)).astype(np.float32) / 3)
    return x, y


@nnx.jit
def _nnx_step(model, optimizer, x, y):
    def loss(model):
        return jnp.mean(jnp.square(model(x) - y))

    value, grads = nnx.value_and_grad(loss)(model)
    optimizer.update(model, grads)
    return value


def _nnx_train(model, optimizer, x, y, steps=8):
    for _ in range(steps):
        jax.block_until_ready(_nnx_step(model, optimizer, x, y))  # see conftest.py
    return nnx.state(model, nnx.Param)


def _make_fsdp_optimizer():
    return rmsjax.rmsprop(1e-2, centered=True, momentum=0.9)


@pytest.fixture(scope="module")
def fsdp_one_device():
    """The parameters after training on one device, without sharding."""
    x, y = _nnx_data()
    with nnx.use_eager_sharding(False):
        model = MLP(nnx.Rngs(0))
    return _nnx_train(model, nnx.Optimizer(model, _make_fsdp_optimizer(), wrt=nnx.Param), x, y)


@pytest.mark.skipif(not hasattr(nnx, "use_eager_sharding"),
                    reason="no nnx.use_eager_sharding in this flax (0.12.0, with jax 0.8.0, lacks it)")
@pytest.mark.parametrize("jitted_init", [False, True], ids=["eager-init", "jit-init"])
def test_fsdp_nnx_equals_one_device(jitted_init, fsdp_one_device):
    x, y = _nnx_data()
    make = _make_fsdp_optimizer
    single = fsdp_one_device

    # Eight devices. Flax's own eager sharding is switched off, so that the parameters are
    # placed here by hand and the optimizer state is placed by rmsjax alone (Flax would
    # otherwise re-shard the optimizer's variables from their copied annotations).
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
    with nnx.use_eager_sharding(False):
        model = MLP(nnx.Rngs(0))
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, nnx.get_named_sharding(state, mesh)))
    if jitted_init:
        optimizer = nnx.jit(lambda m: nnx.Optimizer(m, make(), wrt=nnx.Param))(model)
    else:
        optimizer = nnx.Optimizer(model, make(), wrt=nnx.Param)

    params = nnx.state(model, nnx.Param)
    assert all(
        len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated
        for leaf in jax.tree.leaves(params)
    )
    # The transformation's state (Flax keeps its own step counter beside it, in optimizer.step).
    opt_state = nnx.state(optimizer, nnx.OptState)["opt_state"]
    mirrored, mirrored_ok, scalars, scalars_ok, misplaced = placement_report(opt_state, params, mesh)
    assert mirrored == 3 * len(jax.tree.leaves(params))  # centred mu, nu and the momentum buffer
    assert (mirrored_ok, scalars_ok) == (mirrored, scalars), misplaced

    sharded = _nnx_train(model, optimizer, x, y)
    difference = _max_difference(sharded, single)
    print(f"FSDP: largest difference from one device {difference:.3g}")
    # Sharded contractions add partial sums in another order than one device does; measured
    # about 7e-7 on x86 CPUs, the bound leaves room for other kernels.
    assert difference <= 1e-5
    opt_state = nnx.state(optimizer, nnx.OptState)["opt_state"]
    mirrored, mirrored_ok, scalars, scalars_ok, misplaced = placement_report(opt_state, sharded, mesh)
    assert (mirrored_ok, scalars_ok) == (mirrored, scalars), misplaced
