"""The 4-bit encode on halves of blocks (rmsjax._halves): re-running a jaxpr's elementwise
operations on the low and high half of each block gives what cutting the whole result does, and
gives up (None) where an operation on the way is not elementwise."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsjax
from rmsjax import _codec, _halves
from rmsjax import _quantization as qz

BLOCKED, HALF = (4, 2, 8), (4, 8)


def _halves_of(fn, *args):
    """The halves of ``fn(*args)``, its first argument standing for a stored moment (its halves
    cut from it, as the caller would decode them from the codes)."""
    closed, _, flat = _halves.traced(fn, *args)
    given = {0: lambda: _halves.split(args[0], BLOCKED, HALF)}
    return _halves.halves(closed, flat, [0], BLOCKED, HALF, given, {0}, _halves.Memo())[0]


def _check(fn, *args):
    """The halves equal the cut of the whole result, both computed in one jit (as in a step), to
    float32 rounding: XLA:CPU may fuse a multiply-add or a division by a scalar differently in
    the two loops (1 ulp)."""
    pair, want = jax.jit(lambda *a: (_halves_of(fn, *a), _halves.split(fn(*a), BLOCKED, HALF)))(*args)
    assert pair is not None
    for got, w in zip(pair, want, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(w), rtol=2.5e-7, atol=0)


def test_operations_on_the_moment_are_rerun_on_each_half():
    m = jnp.linspace(0.0, 3.0, 64).reshape(4, 16)
    g = jnp.cos(jnp.arange(64.0)).reshape(4, 16)
    count = jnp.int32(3)

    def fn(m, g, count):  # scalars from the count, a nested jit (jnp.where), a broadcast scalar
        correction = 1.0 - 0.9 ** count.astype(jnp.float32)
        y = jnp.where(m > 1, jnp.sqrt(m) / correction, jnp.zeros_like(m) + 0.5)
        return 0.9 * y + 0.1 * g**2

    _check(fn, m, g, count)


def test_the_whole_moment_as_one_piece():
    """With no half shape the evaluator re-runs the same operations on the whole moment, given as
    one piece (the 8-bit encode's computation of its own): the update's result, to float32
    rounding."""
    m = jnp.linspace(0.0, 3.0, 64).reshape(4, 16)
    g = jnp.cos(jnp.arange(64.0)).reshape(4, 16)

    def fn(m, g):
        nu = 0.99 * m + 0.01 * g * g
        return 0.9 * m + g / (jnp.sqrt(nu) + 1e-8) + jnp.sum(g)

    def both(m, g):
        closed, _, flat = _halves.traced(fn, m, g)
        pieces = _halves.halves(closed, flat, [0], BLOCKED, None, {0: lambda: (m,)}, {0}, _halves.Memo())[0]
        return pieces, fn(m, g)

    pieces, want = jax.jit(both)(m, g)
    assert pieces is not None and len(pieces) == 1
    np.testing.assert_allclose(np.asarray(pieces[0]), np.asarray(want), rtol=2.5e-7, atol=0)


def test_what_does_not_depend_on_the_moment_is_computed_whole():
    """A global norm of the gradient (optax.clip_by_global_norm ahead of the moment), a
    broadcast along an axis, elements moving: all on the gradient, computed as in the update."""
    m = jnp.linspace(0.0, 3.0, 64).reshape(4, 16)
    g = jnp.cos(jnp.arange(64.0)).reshape(4, 16)
    _check(lambda m, g: 0.9 * m + 0.1 * (g / jnp.linalg.norm(g) * jnp.arange(16.0))[:, ::-1] ** 2, m, g)


def test_a_nested_jit_on_the_gradient_is_computed_like_the_update():
    """A nested jit that reduces the gradient (whole, from the halves it was given) and one that
    is elementwise on the moment (re-run on halves)."""
    m = jnp.linspace(0.0, 3.0, 64).reshape(4, 16)
    g = jnp.cos(jnp.arange(64.0)).reshape(4, 16)
    normalised = jax.jit(lambda g: g / jnp.sum(jnp.abs(g)))
    _check(lambda m, g: jnp.where(m > 1.0, m, 0.5 * m) + normalised(g) ** 2, m, g)
    both = jax.jit(lambda m, g: 0.9 * m + g / jnp.sum(jnp.abs(g)))  # the moment and a reduced gradient
    _check(lambda m, g: both(m, g) ** 2, m, g)


@pytest.mark.parametrize("fn", [
    lambda m: m / jnp.sum(m),  # a reduction over the moment's elements
    lambda m: m[:, ::-1],  # its elements move
    lambda m: m * jnp.arange(16.0),  # a broadcast along an axis
])
def test_anything_else_on_the_moment_gives_up(fn):
    assert _halves_of(fn, jnp.ones((4, 16))) is None


def test_a_stored_moment_without_halves_is_unknown():
    closed, _, flat = _halves.traced(lambda m, other: 0.5 * m + other, jnp.ones((4, 16)), jnp.ones((4, 16)))
    given = {0: lambda: _halves.split(jnp.ones((4, 16)), BLOCKED, HALF)}
    assert _halves.halves(closed, flat, [0], BLOCKED, HALF, given, {0, 1}, _halves.Memo()) == [None]


import registry  # noqa: E402  (tests/ is on the path: conftest.py)

_PARAMS = {"a": jnp.linspace(-1.0, 1.0, 8 * 64).reshape(8, 64), "b": jnp.linspace(0.5, -0.5, 64)}


def _stored(state):
    """The moments stored in low bits, in tree order."""
    return [x for x in jax.tree.leaves(state, is_leaf=qz.is_quantized) if qz.is_quantized(x)]


def _both_ways(run, monkeypatch):
    """``run()`` as shipped, then with no moment computed again from the update's jaxpr."""
    on = run()
    monkeypatch.setattr(qz, "_ENCODE_ON_HALVES", False)
    return on, run()


def _two_steps(tx):
    """Two jitted steps, the second from non-trivial codes; a scan traces the step once (two
    unrolled steps took 3-4x as long to trace and compile)."""
    @jax.jit
    def run(params, state):
        def step(carry, i):
            params, state = carry
            grads = jax.tree.map(lambda p: jnp.cos((3 + i) * p) + 0.1 * i, params)
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(step, (params, state), jnp.arange(2, dtype=jnp.float32))[0]

    return run(_PARAMS, tx.init(_PARAMS))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", sorted(n for n in registry.CASES if not n.startswith("quantized(")))
def test_codes_encoded_on_halves_are_the_same_bits(name, bits, monkeypatch):
    """Over every case of the test registry, two jitted steps: the stored codes and scales are
    the same bits whether each new 4-bit moment is encoded on the halves of its blocks or packed
    whole, and whether the block maxima of a new 8-bit moment without a bound are reduced over
    its halves or over the whole moment. The parameters agree to float32 rounding (two float32
    spacings at their largest magnitude): the two programs fuse the parameter update differently,
    and XLA:CPU may then round a multiply-add once or twice (centred RMSprop: up to 6e-8 on
    parameters near 1; with jax 0.12.1, PyTorch's RMSprop at 4 bits: one spacing, 1.2e-7, on
    parameters near 1)."""
    make = registry.CASES[name].make
    on, off = _both_ways(lambda: _two_steps(rmsjax.quantized(make(), bits=bits, min_size=1)), monkeypatch)
    stored_on, stored_off = _stored(on[1]), _stored(off[1])
    assert len(stored_on) == len(stored_off)
    for a, b in zip(stored_on, stored_off, strict=True):
        np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
        np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))
    leaves_on, leaves_off = jax.tree.leaves(on), jax.tree.leaves(off)
    assert len(leaves_on) == len(leaves_off)
    for a, b in zip(leaves_on, leaves_off, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if np.issubdtype(a.dtype, np.floating):
            largest = np.float32(max(1.0, float(np.max(np.abs(b)))))
            np.testing.assert_allclose(a, b, rtol=0, atol=2 * float(np.spacing(largest)))
        else:
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("make", [
    lambda: rmsjax.adam(1e-3), lambda: rmsjax.rmsprop(1e-3), lambda: rmsjax.adagrad(1e-2),
    lambda: rmsjax.adadelta(),
    lambda: rmsjax.rmsprop(1e-3, centered=True, momentum=0.9), lambda: optax.adam(1e-3),
    lambda: optax.chain(optax.clip_by_global_norm(1.0), rmsjax.adamw(1e-3, weight_decay=0.1)),
    lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-3),
    lambda: rmsjax.compat.torch.RMSprop(1e-2, momentum=0.9, centered=True),
], ids=["adam", "rmsprop", "adagrad", "adadelta", "centred_momentum", "optax_adam", "clipped_adamw",
        "inject", "torch_centred"])
def test_the_family_is_encoded_on_halves(make, monkeypatch):
    """Every stored moment of these optimizers is encoded on halves (none falls back to packing
    the whole moment, which makes XLA copy the codes)."""
    results = []
    real = _halves.halves

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        results.extend(o is not None for o in out)
        return out

    monkeypatch.setattr(_halves, "halves", spy)
    tx = rmsjax.quantized(make(), bits=4, min_size=1)
    with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes a float and an int32
        jax.jit(tx.update).lower(_PARAMS, tx.init(_PARAMS), _PARAMS)
    assert results and all(results), results


@pytest.mark.parametrize("make,bits,expected", [
    (lambda: rmsjax.adadelta(), 8, 1),  # nu_delta: no bound, and the step does not read it
    (lambda: rmsjax.adam(1e-3), 8, 0),  # both bounded
    (lambda: rmsjax.rmsprop(1e-3, momentum=0.9), 8, 1),  # the step reads g / (sqrt(nu') + eps)
    (lambda: rmsjax.rmsprop(1e-3, momentum=0.9), 4, 1),  # ... its own copy of g / (sqrt(nu') + eps)
    (lambda: rmsjax.rmsprop(1e-3, centered=True, momentum=0.9), 4, 1),
    (lambda: rmsjax.adam(1e-3), 4, 0),  # no root or division on the way to the moments
], ids=["adadelta-8", "adam-8", "momentum-8", "momentum-4", "centred_momentum-4", "adam-4"])
def test_maxima_on_halves_where_they_save_a_float32_copy(make, bits, expected, monkeypatch):
    """The block maxima of a new moment are reduced over the halves of its blocks, recomputed
    from the old codes' halves, where XLA would otherwise write a full-size float32 value out for
    several loops to share: at 8 bits for a moment without a bound that the step does not read
    (8-bit AdaDelta compiled in place: 14.11 -> 10.13 B/param at its peak), and at both widths
    for a moment the step reads that comes through a square root or a division of a stored
    moment (RMSprop with momentum: 14.09 -> 10.11 at 8 bits, where the encode gets a whole
    computation of its own too; 13.09 -> 9.16 at 4, from halves XLA cannot merge with the
    encode's)."""
    calls = []
    real = _codec.halves_scale
    monkeypatch.setattr(_codec, "halves_scale", lambda *a, **k: calls.append(1) or real(*a, **k))
    tx = rmsjax.quantized(make(), bits=bits, min_size=1)
    jax.jit(tx.update).lower(_PARAMS, tx.init(_PARAMS), _PARAMS)
    assert len(calls) == expected * 2  # two leaves


@pytest.mark.parametrize("make", [lambda: rmsjax.adadelta(), lambda: rmsjax.rmsprop(1e-3, momentum=0.9)],
                         ids=["adadelta", "momentum"])
@pytest.mark.parametrize("shape", [(1001, 2), (999, 3, 8)])
def test_8_bit_rows_over_an_odd_axis(make, shape, monkeypatch):
    """An 8-bit row may span several axes whose first is odd (blocks along the flattened row),
    where the halves of _half_shape do not exist: such a moment is computed once, as before
    (the same codes as with no computation of its own anywhere)."""
    params = {"w": jnp.cos(jnp.arange(np.prod(shape), dtype=jnp.float32)).reshape(shape)}

    def run():
        tx = rmsjax.quantized(make(), bits=8, min_size=16)
        step = jax.jit(lambda p, s: tx.update(jax.tree.map(lambda x: jnp.sin(3 * x), p), s, p))
        return _stored(step(params, tx.init(params))[1])

    on, off = _both_ways(run, monkeypatch)
    assert len(on) == len(off) == 2
    for a, b in zip(on, off, strict=True):
        np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
        np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))


@pytest.mark.parametrize("make,bits,traces", [
    (lambda: optax.chain(optax.clip_by_global_norm(1.0), rmsjax.adamw(1e-3, weight_decay=0.1)), 8, 0),
    (lambda: rmsjax.adam(1e-3), 8, 0),
    (lambda: rmsjax.adadelta(), 8, 1),
    (lambda: rmsjax.rmsprop(1e-3, momentum=0.9), 8, 1),
    (lambda: rmsjax.adam(1e-3), 4, 1),
], ids=["clipped_adamw-8", "adam-8", "adadelta-8", "momentum-8", "adam-4"])
def test_the_update_is_traced_again_only_where_a_moment_may_use_it(make, bits, traces, monkeypatch):
    """The second trace of the wrapped update (to a jaxpr) costs as much as the first; it is
    made only when some stored moment may be computed from it."""
    calls = []
    real = _halves.traced
    monkeypatch.setattr(_halves, "traced", lambda *a, **k: calls.append(1) or real(*a, **k))
    tx = rmsjax.quantized(make(), bits=bits, min_size=1)
    jax.jit(tx.update).lower(_PARAMS, tx.init(_PARAMS), _PARAMS)
    assert len(calls) == traces


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_narrow_moments_on_halves(dtype, monkeypatch):
    """Moments in the parameters' 16-bit dtype: float16 codes are the same bits on halves as
    packed whole; with bfloat16, XLA:CPU may keep an intermediate in float32 in one program and
    round it in the other, so a rare element rounds to the neighbouring code (1 in 8192 after
    three steps when measured); at most 0.2 % may."""
    params = {"w": jnp.linspace(-1, 1, 64 * 256).reshape(64, 256).astype(dtype)}

    def run():
        tx = rmsjax.quantized(rmsjax.rmsprop(1e-2, centered=True, momentum=0.9), bits=4)
        step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
        p, s = params, tx.init(params)
        for i in range(3):
            grads = jax.tree.map(lambda x, i=i: jnp.cos((i + 2) * x.astype(jnp.float32)).astype(dtype), p)
            p, s = step(p, s, grads)
        return _stored(s)

    on, off = _both_ways(run, monkeypatch)
    assert len(on) == len(off) == 3
    for a, b in zip(on, off, strict=True):
        differ = np.mean(np.asarray(a.codes) != np.asarray(b.codes))
        assert differ == 0 if dtype == jnp.float16 else differ <= 0.002, differ
        np.testing.assert_array_equal(np.asarray(a.scale, np.float32), np.asarray(b.scale, np.float32))
