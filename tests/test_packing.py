"""rmsjax.packed: the same numbers as the wrapped optimizer, on ordinary trees."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import registry

import rmsjax
from rmsjax import packing

OPTIMIZERS = {name: case.make for name, case in registry.tagged("packing").items()}


def _tree(seed: int = 0):
    rng = np.random.default_rng(seed)

    def arr(shape, dtype=np.float32):
        return jnp.asarray(rng.normal(size=shape).astype(np.float32)).astype(dtype)

    return {
        "dense": {"w": arr((3, 4)), "b": arr((4,))},
        "scalar": arr(()),
        "many": [arr((5,)) for _ in range(7)],
        "half": {"w": arr((2, 3), jnp.bfloat16), "b": arr((3,), jnp.bfloat16)},
        "wide": arr((6,), jnp.float64) if jax.config.jax_enable_x64 else arr((6,)),
        "big": arr((300,)),
    }


def _run(tx, params, steps, jit):
    update = jax.jit(tx.update) if jit else tx.update
    state = tx.init(params)
    history = []
    for k in range(steps):
        grads = jax.tree.map(lambda p, k=k: (p * (1.5 + k) - 0.3).astype(p.dtype), params)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        history.append((updates, params))
    return history, state


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_bit_for_bit(name, jit):
    params = _tree()
    # A small max_leaf_size so that "big" stays unpacked and the rest is packed.
    wrapped, _ = _run(packing.packed(OPTIMIZERS[name](), max_leaf_size=100), params, 4, jit)
    plain, _ = _run(OPTIMIZERS[name](), params, 4, jit)
    for (u1, p1), (u2, p2) in zip(wrapped, plain):
        assert jax.tree.structure(u1) == jax.tree.structure(u2)
        for a, b in zip(jax.tree.leaves((u1, p1)), jax.tree.leaves((u2, p2))):
            assert a.dtype == b.dtype and a.shape == b.shape
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            if not jit and a.ndim > 0:
                np.testing.assert_array_equal(a, b)
            elif not jit:
                # A 0-d leaf is divided by a broadcast scalar (Adam's bias correction) in
                # XLA:CPU's scalar code when alone and in its vector code once packed, and the
                # vector code is not correctly rounded there (1 ulp, measured: 0.74999976 alone,
                # 0.74999982 packed, for 0.075/0.100000024).
                np.testing.assert_allclose(a, b, rtol=2.5e-7, atol=0)
            else:
                # Compiled, XLA:CPU contracts multiply-adds into FMAs, and the vectorised
                # body and the scalar remainder of a loop may contract differently: an
                # element's last bit can depend on its position in the array, which
                # packing moves (docs/performance.md). Eager, every operation rounds
                # alone and the numbers are equal bit for bit (above).
                np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-12)


def test_groups_by_dtype_and_size():
    params = _tree()
    layout = packing.layout_of(params, max_leaf_size=100)
    leaves = jax.tree.leaves(params)
    by_group = [{leaves[i].dtype for i in g} for g in layout.groups]
    assert all(len(dtypes) == 1 for dtypes in by_group)
    big = [i for i, x in enumerate(leaves) if x.size > 100]
    assert all((i,) in layout.groups for i in big)
    assert len(layout.groups) == 1 + 2  # float32 buffer, bfloat16 buffer, "big" alone


def test_state_is_a_few_buffers_and_readable():
    params = {f"w{i}": jnp.ones(10) for i in range(50)}
    tx = rmsjax.packed(rmsjax.rmsprop(optax.constant_schedule(0.5)))
    state = tx.init(params)
    big = [x for x in jax.tree.leaves(state.inner) if x.ndim]
    assert [x.shape for x in big] == [(500,)]
    _, state = tx.update(params, state, params)
    assert float(rmsjax.learning_rate(state)) == 0.5
    assert int(rmsjax.step_count(state)) == 1


def test_pack_unpack_roundtrip_and_gradient():
    params = _tree()
    buffers, layout = packing.pack(params)
    back = packing.unpack(buffers, layout)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))

    def loss(bufs):
        tree = packing.unpack(bufs, layout)
        return sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(tree))

    grads = jax.grad(loss)(buffers)
    expected, _ = packing.pack(jax.tree.map(lambda x: (2 * x.astype(jnp.float32)).astype(x.dtype),
                                            params), layout)
    for a, b in zip(grads, expected):
        np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))


def test_mismatched_tree_is_named():
    tx = rmsjax.packed(rmsjax.rmsprop(0.1))
    state = tx.init({"a": jnp.ones(3), "b": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"updates but not in the packed state: \['b'\] float32\[4\]"):
        tx.update({"a": jnp.ones(3), "b": jnp.ones(4)}, state)
    with pytest.raises(ValueError, match=r"3 leaves in the updates, 2 in the state.*\['c'\] float32\[1\]"):
        tx.update({"a": jnp.ones(3), "b": jnp.ones(2), "c": jnp.ones(1)}, state)
    with pytest.raises(ValueError, match=r"params.*\['b'\] bfloat16\[2\]"):
        params = {"a": jnp.ones(3), "b": jnp.ones(2, jnp.bfloat16)}
        tx.update({"a": jnp.ones(3), "b": jnp.ones(2)}, state, params)
    with pytest.raises(ValueError, match="max_leaf_size"):
        rmsjax.packed(rmsjax.rmsprop(0.1), max_leaf_size=-1)
    with pytest.raises(TypeError, match="max_leaf_size"):
        rmsjax.packed(rmsjax.rmsprop(0.1), max_leaf_size=2.5)


def test_other_keys_raise_naming_them_not_reattached_by_position():
    """Same shapes and count, other names: the plain optimizer raises, and so does packed
    (it used to hand the state of 'a' to 'x' by position)."""
    params = {"a": jnp.ones(3), "b": jnp.ones(3)}
    grads = {"x": jnp.ones(3), "y": jnp.ones(3)}
    plain = rmsjax.rmsprop(0.1)
    with pytest.raises(ValueError):
        plain.update(grads, plain.init(params))
    tx = rmsjax.packed(rmsjax.rmsprop(0.1))
    state = tx.init(params)
    with pytest.raises(ValueError) as info:
        tx.update(grads, state)
    message = str(info.value)
    for name in ("['x']", "['y']", "['a']", "['b']"):
        assert name in message, message
    with pytest.raises(ValueError, match=r"\['x'\]"):
        jax.jit(tx.update)(grads, state)


def test_state_serializes_with_flax_and_resumes_bit_for_bit():
    serialization = pytest.importorskip("flax.serialization")
    params = _tree()
    tx = rmsjax.packed(rmsjax.adam(0.1), max_leaf_size=100)
    _, state = _run(tx, params, 2, jit=False)
    restored = serialization.from_bytes(tx.init(params), serialization.to_bytes(state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))
    grads = jax.tree.map(lambda p: (0.5 * p).astype(p.dtype), params)
    for a, b in zip(jax.tree.leaves(tx.update(grads, restored, params)),
                    jax.tree.leaves(tx.update(grads, state, params)), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))


def _layout_seconds(n: int) -> float:
    import time

    tree = [np.zeros(3, np.float32) for _ in range(n)]
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        packing.layout_of(tree)
        best = min(best, time.perf_counter() - start)
    return best


def test_layout_is_linear_in_the_leaf_count():
    """Four times the leaves, about four times the time (a quadratic layout: sixteen)."""
    small, large = _layout_seconds(4000), _layout_seconds(16000)
    assert large < 8 * small, (small, large)
    layout = packing.layout_of([np.zeros(3, np.float32) for _ in range(16000)])
    assert layout.groups == (tuple(range(16000)),)


def test_numpy_float64_parameters_under_jit_as_eagerly():
    params = {f"w{i}": np.linspace(-1.0, 1.0, 3) * (i + 1) for i in range(5)}  # float64
    grads = jax.tree.map(lambda p: 0.5 * p, params)
    tx = rmsjax.packed(rmsjax.rmsprop(0.1))
    eager, _ = tx.update(grads, tx.init(params), params)
    jitted, _ = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)
    plain = rmsjax.rmsprop(0.1)
    as_jax = jax.tree.map(jnp.asarray, (grads, params))
    reference, _ = plain.update(as_jax[0], plain.init(as_jax[1]))
    leaves = (jax.tree.leaves(eager), jax.tree.leaves(jitted), jax.tree.leaves(reference))
    for a, b, c in zip(*leaves, strict=True):
        assert a.dtype == b.dtype == c.dtype
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(b), np.asarray(c), rtol=1e-6)


def test_map_params_identity_and_with_a_params_shaped_tree():
    params = {"a": jnp.ones(3), "b": jnp.ones((2, 2)), "big": jnp.ones(200)}
    tx = rmsjax.packed(rmsjax.rmsprop(0.1, momentum=0.9), max_leaf_size=100)
    state = tx.init(params)
    same = optax.tree.map_params(tx, lambda p: p, state)
    assert jax.tree.structure(same) == jax.tree.structure(state)
    specs = jax.tree.map(lambda p: p.shape, params)
    mapped = optax.tree.map_params(tx, lambda p, spec: spec, state, specs,
                                   transform_non_params=lambda x: "not params")
    # No part of a packed state is shaped like the parameters.
    assert mapped == rmsjax.packing.PackedState(inner="not params", offsets="not params")


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("wrapper", ["packed", "one_pass"])
def test_inject_hyperparams_over_the_wrappers_gives_the_plain_state(wrapper, jit):
    factory = getattr(rmsjax, wrapper)
    params = {f"w{i}": jnp.full(3, i + 1.0) for i in range(4)}
    plain = factory(rmsjax.rmsprop(0.1))
    injected = optax.inject_hyperparams(factory)(rmsjax.rmsprop(0.1))
    init = jax.jit(injected.init) if jit else injected.init
    state, reference = init(params), plain.init(params)
    assert jax.tree.structure(state.inner_state) == jax.tree.structure(reference)
    for _ in range(2):
        updates, state = injected.update(params, state, params)
        expected, reference = plain.update(params, reference, params)
        for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
            np.testing.assert_array_equal(a, b)
    assert jax.tree.structure(state.inner_state) == jax.tree.structure(reference)


def test_injected_max_leaf_size_must_be_static_under_jit():
    params = {f"w{i}": jnp.ones(3) for i in range(4)}
    injected = optax.inject_hyperparams(rmsjax.packed)(rmsjax.rmsprop(0.1), max_leaf_size=2)
    assert len(injected.init(params).inner_state.offsets) == 4  # eager: concrete, all alone
    with pytest.raises(ValueError, match=r"static_args=\('max_leaf_size',\)"):
        jax.jit(injected.init)(params)
    static = optax.inject_hyperparams(rmsjax.packed, static_args=("max_leaf_size",))
    assert len(jax.jit(static(rmsjax.rmsprop(0.1), max_leaf_size=2).init)(params).inner_state.offsets) == 4


def test_state_layout_gives_the_buffers_of_the_state():
    params = _tree()
    tx = rmsjax.packed(rmsjax.rmsprop(0.1), max_leaf_size=100)
    state = tx.init(params)
    layout = packing.state_layout(state, params)
    assert layout == packing.layout_of(params, max_leaf_size=100)
    buffers, _ = packing.pack(params, layout)
    nu = optax.tree.get(state.inner, "nu")
    assert [b.shape for b in buffers] == [b.shape for b in nu] == [(300,), (58,), (9,)]
    with pytest.raises(ValueError, match="tree"):
        packing.state_layout(state, {"a": jnp.ones(3)})


def test_compiles_once_and_one_slice_kernel_per_size():
    params = {f"w{i}": jnp.ones(8) for i in range(30)}
    tx = rmsjax.packed(rmsjax.rmsprop(0.1))
    traces = []

    def step(p, s, g):
        traces.append(1)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    jitted = jax.jit(step)
    state = tx.init(params)
    for _ in range(3):
        params, state = jitted(params, state, params)
    assert len(traces) == 1
    # The slices take their offsets from the state, so they are not constant-folded
    # into 30 different kernels.
    text = jitted.lower(params, state, params).as_text()
    assert "dynamic_slice" in text


def test_nnx_optimizer():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Sequential(*[nnx.Linear(4, 4, rngs=nnx.Rngs(i)) for i in range(5)])
    reference = nnx.Sequential(*[nnx.Linear(4, 4, rngs=nnx.Rngs(i)) for i in range(5)])
    opt = nnx.Optimizer(model, rmsjax.packed(rmsjax.rmsprop(0.01)), wrt=nnx.Param)
    ref = nnx.Optimizer(reference, rmsjax.rmsprop(0.01), wrt=nnx.Param)
    x = jnp.ones((2, 4))

    def loss(m):
        return jnp.sum(m(x) ** 2)

    for _ in range(3):
        opt.update(model, nnx.grad(loss)(model))
        ref.update(reference, nnx.grad(loss)(reference))
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                    jax.tree.leaves(nnx.state(reference, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_leaves_are_found_by_name_whatever_the_order_of_an_ordered_dict():
    # An OrderedDict flattens in insertion order: the same parameters rebuilt in another
    # order (or params ordered unlike the updates) used to be packed in the new order and
    # cut at the old offsets, so one leaf's moments were applied to another's gradient.
    from collections import OrderedDict

    values = {"a": jnp.arange(1.0, 4.0), "b": jnp.arange(10.0, 15.0), "c": jnp.ones((2, 2))}

    def ordered(order, tree=values):
        return OrderedDict((name, tree[name]) for name in order)

    def grads(k):
        return {name: jnp.sin(v * (k + 1)) * (10.0 if name == "b" else 1.0) for name, v in values.items()}

    tx, ref = rmsjax.packed(rmsjax.rmsprop(0.1, momentum=0.9)), rmsjax.rmsprop(0.1, momentum=0.9)
    state, ref_state = tx.init(ordered("abc")), ref.init(values)
    for k, (grad_order, param_order) in enumerate([("abc", "abc"), ("cba", "bca"), ("bac", "cab")]):
        ours, state = tx.update(ordered(grad_order, grads(k)), state, ordered(param_order))
        theirs, ref_state = ref.update(grads(k), ref_state, values)
        assert list(ours) == list(grad_order)
        for name in values:
            np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6, err_msg=f"step {k}, {name}")


@pytest.mark.parametrize("name", ["adam", "rmsprop"])
def test_float32_gradients_for_bfloat16_parameters_as_unpacked(name):
    # Mixed precision: each gradient leaf may have another precision than its parameter
    # (docs/reliability.md); packed refused that, naming the dtypes, where the optimizer alone
    # accepts it. Buffers of several gradient precisions are in the widest; each update comes
    # back in its gradient's dtype, bit for bit the unpacked optimizer's.
    make = {"adam": lambda: rmsjax.adam(0.1), "rmsprop": lambda: rmsjax.rmsprop(0.1, momentum=0.9)}[name]
    params = {"w": jnp.zeros(8, jnp.bfloat16), "b": jnp.zeros(4, jnp.bfloat16),
              "c": jnp.zeros((2, 3), jnp.bfloat16)}
    grads = {"w": jnp.linspace(-1.0, 1.0, 8), "b": jnp.full(4, 0.7, jnp.bfloat16),
             "c": jnp.full((2, 3), 0.3)}
    plain, packed_tx = make(), rmsjax.packed(make())
    plain_state, packed_state = plain.init(params), packed_tx.init(params)
    for _ in range(3):
        expected, plain_state = plain.update(grads, plain_state, params)
        got, packed_state = packed_tx.update(grads, packed_state, params)
        for key in params:
            assert got[key].dtype == expected[key].dtype == grads[key].dtype, key
            np.testing.assert_array_equal(np.asarray(got[key], np.float32),
                                          np.asarray(expected[key], np.float32), err_msg=key)
    with pytest.raises(ValueError, match=r"\['w'\] float32\[7\]"):  # a shape still tells
        packed_tx.update({**grads, "w": jnp.ones(7)}, packed_state, params)


def test_ordered_dict_of_float32_gradients_for_bfloat16_parameters():
    # An OrderedDict of gradients in another precision than the parameters: the leaves were
    # ranked under their gradient dtype but looked up under the state's, a KeyError.
    from collections import OrderedDict

    params = OrderedDict(b=jnp.full(3, 0.5, jnp.bfloat16), a=jnp.full(2, -0.25, jnp.bfloat16))
    grads = OrderedDict(a=jnp.linspace(-1.0, 1.0, 2), b=jnp.full(3, 0.7))
    in_params_order = OrderedDict((key, grads[key]) for key in params)  # as the plain one needs
    plain, packed_tx = rmsjax.rmsprop(0.1, momentum=0.9), rmsjax.packed(rmsjax.rmsprop(0.1, momentum=0.9))
    plain_state, packed_state = plain.init(params), packed_tx.init(params)
    for _ in range(2):
        expected, plain_state = plain.update(in_params_order, plain_state, params)
        got, packed_state = packed_tx.update(grads, packed_state, params)
        assert list(got) == ["a", "b"]
        for key in params:
            assert got[key].dtype == expected[key].dtype == jnp.float32, key
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_unpack_refuses_buffers_unlike_the_layouts():
    # Too few buffers gave a tree with None leaves, too many were ignored, and a buffer of a
    # leaf on its own came back whatever its shape.
    params = {"a": jnp.ones(3), "b": jnp.zeros(2), "big": jnp.ones(10)}
    buffers, layout = packing.pack(params, packing.layout_of(params, max_leaf_size=4))
    assert [b.shape for b in buffers] == [(5,), (10,)]
    with pytest.raises(ValueError, match="got 1 buffers, the layout has 2"):
        packing.unpack(buffers[:1], layout)
    with pytest.raises(ValueError, match="got 3 buffers, the layout has 2"):
        packing.unpack((*buffers, jnp.ones(3)), layout)
    with pytest.raises(ValueError, match=r"buffers\[0\] has shape \(6,\), the layout wants \(5,\)"):
        packing.unpack((jnp.ones(6), buffers[1]), layout)
    with pytest.raises(ValueError, match=r"buffers\[1\] has shape \(2, 5\), the layout wants \(10,\)"):
        packing.unpack((buffers[0], jnp.ones((2, 5))), layout)
    assert jax.tree.map(jnp.shape, packing.unpack(list(buffers), layout)) == jax.tree.map(jnp.shape, params)
    with pytest.raises(ValueError, match=r"pack: leaf 0 of the tree is float32\[4\], the layout was made"):
        packing.pack({"a": jnp.ones(4), "b": jnp.zeros(2), "big": jnp.ones(10)}, layout)


def test_gradients_narrower_than_their_buffer_are_computed_in_it():
    # The docstring said every update of a buffer of mixed gradient precisions was tx alone's;
    # a bfloat16 gradient beside float32 ones is computed in float32 (tx alone rounds its
    # steps to bfloat16), so momentum drifts from tx alone's by bfloat16 rounding.
    rng = np.random.default_rng(0)
    params = {f"l{i}": jnp.asarray(rng.normal(size=50), jnp.bfloat16) for i in range(4)}
    plain, packed_tx = rmsjax.rmsprop(0.1, momentum=0.9), rmsjax.packed(rmsjax.rmsprop(0.1, momentum=0.9))
    plain_state, packed_state = plain.init(params), packed_tx.init(params)
    differs = 0
    for _ in range(4):
        grads = {k: jnp.asarray(rng.normal(size=50), jnp.float32 if int(k[1]) % 2 else jnp.bfloat16)
                 for k in params}
        expected, plain_state = plain.update(grads, plain_state, params)
        got, packed_state = packed_tx.update(grads, packed_state, params)
        for k in params:
            assert got[k].dtype == grads[k].dtype
            a, b = np.asarray(got[k], np.float32), np.asarray(expected[k], np.float32)
            if grads[k].dtype == jnp.float32:
                np.testing.assert_array_equal(a, b)
            else:
                differs += int((a != b).sum())
                np.testing.assert_allclose(a, b, atol=4e-3)  # bfloat16 ulps of ~0.3
    assert differs > 0
    # one dtype for all the gradients: tx alone's numbers
    same = {k: jnp.asarray(rng.normal(size=50), jnp.float32) for k in params}
    plain_state, packed_state = plain.init(params), packed_tx.init(params)
    for _ in range(3):
        expected, plain_state = plain.update(same, plain_state, params)
        got, packed_state = packed_tx.update(same, packed_state, params)
        for k in params:
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(expected[k]))
