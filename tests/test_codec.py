"""rmsjax._codec: the block codec of rmsjax.quantized, against NumPy written from the docs.

The maps (``x = s sign(c) (|c|/Q)**p``, reserved codes for non-finite values), the scale (the
power of two above the block's largest finite magnitude) and the 4-bit packing (element ``j``
and ``j + B/2`` of a block share byte ``j``) are re-implemented here in NumPy.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmsjax import _codec

# The documented maps (docs/low_bit.md, rmsjax/_codec.py): (bits, signed) -> (Q, p).
MAPS = {(8, True): (127, 4), (8, False): (253, 4), (4, True): (7, 2), (4, False): (14, 4)}
BLOCK = {8: 256, 4: 128}


def np_levels(bits: int, signed: bool) -> np.ndarray:
    q, p = MAPS[(bits, signed)]
    c = np.arange(-q, q + 1) if signed else np.arange(0, q + 1)
    return np.sign(c) * (np.abs(c) / q) ** p


def np_scale(block: np.ndarray) -> float:
    finite = np.abs(block[np.isfinite(block)])
    m = float(np.max(finite)) if finite.size else 0.0
    # the smallest power of two at or above, at most 2**126 (whose float32 inverse is normal)
    return 0.0 if m == 0 else 2.0 ** min(math.ceil(math.log2(m)), 126)


def roundtrip(x: np.ndarray, bits: int, signed: bool, count=None):
    xb = jnp.asarray(x, jnp.float32)
    scale = _codec.block_scale(xb, None, jnp.float32)
    u = None if count is None else _codec.uniform(x.shape, jnp.int32(count), 0)
    level = _codec.encode(xb, _codec.inverse_scale(scale)[..., None], u, bits, signed)
    if bits == 4:
        level = _codec.levels_of(_codec.pack(level, signed), 4, signed, jnp.float32)
    return np.asarray(scale), np.asarray(_codec.decode(level, scale[..., None], bits, signed), np.float64)


@pytest.mark.parametrize("bits,signed", sorted(MAPS))
def test_decoded_levels_follow_the_documented_map(bits, signed):
    expected = 0.5 * np_levels(bits, signed)
    got = np.asarray(_codec.decode(jnp.asarray(np.arange(-MAPS[(bits, signed)][0] if signed else 0,
                                                         MAPS[(bits, signed)][0] + 1), jnp.float32),
                                   jnp.float32(0.5), bits, signed), np.float64)
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=0)
    assert np.all(np.diff(got) > 0)
    assert got[-1] == 0.5 and (got[0] == -0.5 if signed else got[0] == 0.0)


@pytest.mark.parametrize("bits,signed", sorted(MAPS))
def test_encode_picks_a_neighbouring_level_and_a_power_of_two_scale(bits, signed):
    rng = np.random.default_rng(bits + signed)
    x = rng.standard_normal((8, BLOCK[bits])) * np.exp(rng.standard_normal((8, BLOCK[bits])) * 2)
    x = (x if signed else np.abs(x)).astype(np.float32)
    scale, got = roundtrip(x, bits, signed, count=5)
    for row in range(8):
        s = np_scale(x[row])
        assert float(scale[row]) == s
        levels = np.sort(np_levels(bits, signed) * s)
        xr = x[row].astype(np.float64)
        hi = levels[np.clip(np.searchsorted(levels, xr), 0, len(levels) - 1)]
        lo = levels[np.clip(np.searchsorted(levels, xr, side="right") - 1, 0, len(levels) - 1)]
        ok = np.isclose(got[row], lo, rtol=1e-5, atol=0) | np.isclose(got[row], hi, rtol=1e-5, atol=0)
        if not signed:  # below the smallest positive level a positive value rounds up to it
            ok |= (xr > 0) & (xr < levels[1]) & np.isclose(got[row], levels[1], rtol=1e-5)
        assert ok.all(), (row, xr[~ok][:4], got[row][~ok][:4])


@pytest.mark.parametrize("bits,signed", sorted(MAPS))
def test_nearest_rounding_matches_numpy(bits, signed):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, BLOCK[bits])).astype(np.float32)
    x = x if signed else np.abs(x)
    _, got = roundtrip(x, bits, signed)
    for row in range(4):
        levels = np_levels(bits, signed) * np_scale(x[row])
        if not signed:
            levels = levels[1:]
        mid = (levels[1:] + levels[:-1]) / 2
        np.testing.assert_allclose(got[row], levels[np.searchsorted(mid, x[row].astype(np.float64))],
                                   rtol=1e-5)


def test_a_positive_second_moment_never_decodes_to_zero():
    for bits in (8, 4):
        x = np.zeros((1, BLOCK[bits]), np.float32)
        x[0, 0] = 1.0
        x[0, 1:100] = 1e-30  # far below the smallest positive level
        _, got = roundtrip(x, bits, False, count=1)
        assert np.all(got[0, 1:100] > 0), bits
        assert np.all(got[0, 100:] == 0), bits  # exact zeros stay exact
        # |x| / scale below float32's smallest normal number: XLA:CPU flushes it to zero,
        # and the element decoded to 0 while the zero point was tested on the quotient
        x[0, 0] = 1e36
        _, got = roundtrip(x, bits, False, count=1)
        assert np.all(got[0, 1:100] > 0), bits
        assert np.all(got[0, 100:] == 0), bits


@pytest.mark.parametrize("bits,signed", sorted(MAPS))
def test_non_finite_elements_keep_their_own_code_and_stay_out_of_the_scale(bits, signed):
    x = np.linspace(0.1, 1.0, BLOCK[bits]).astype(np.float32) * (np.where(np.arange(BLOCK[bits]) % 2, -1, 1)
                                                                if signed else 1)
    x = x[None].copy()
    x[0, 3], x[0, 10], x[0, 20] = np.inf, np.nan, -np.inf if signed else np.inf
    scale, got = roundtrip(x, bits, signed, count=2)
    finite = np.isfinite(x[0])
    assert float(scale[0]) == np_scale(x[0]) == 1.0  # the block's scale ignores them
    assert np.all(np.isfinite(got[0, finite]))
    q, p = MAPS[(bits, signed)]
    step = 1.0 - ((q - 1) / q) ** p  # the largest level spacing at scale 1
    assert np.max(np.abs(got[0, finite] - x[0, finite])) <= step
    if signed:
        assert np.all(np.isnan(got[0, ~finite]))  # any non-finite signed moment: NaN
    else:
        assert got[0, 3] == np.inf and got[0, 20] == np.inf
        assert np.isnan(got[0, 10]) if bits == 8 else got[0, 10] == np.inf


def test_float16_scale_saturates_at_the_dtype_maximum():
    x = jnp.full((1, 256), 65504.0, jnp.float32)
    scale = _codec.block_scale(x, None, jnp.float16)
    assert scale.dtype == jnp.float16 and float(scale[0]) == 65504.0
    again = _codec.block_scale(x, scale, jnp.float16)  # kept from step to step
    assert float(again[0]) == 65504.0
    level = _codec.encode(x, _codec.inverse_scale(scale.astype(jnp.float32))[..., None], None, 8, False)
    assert float(_codec.decode(level, scale.astype(jnp.float32)[..., None], 8, False)[0, 0]) == 65504.0


@pytest.mark.parametrize("bits,signed", sorted(MAPS))
def test_a_huge_finite_element_saturates_instead_of_zeroing_its_block(bits, signed):
    """Magnitudes from 2**126 up to float32's largest: the scale stops at 2**126 (its inverse
    2**-126 is normal; 2**127's would be subnormal, flushed to zero by XLA, and every element
    of the block, the huge one included, would decode to 0). The huge element decodes to the
    scale; the others to what the map resolves below it."""
    x = np.full((3, BLOCK[bits]), 0.5, np.float32)
    x[0, 3], x[1, 3], x[2, 3] = 1e38, np.finfo(np.float32).max, 2.0**126
    if signed:
        x[1, 3] = -x[1, 3]
    scale, back = roundtrip(x, bits, signed)
    np.testing.assert_array_equal(scale, [2.0**126] * 3)
    np.testing.assert_array_equal(np.abs(back[:, 3]), [2.0**126] * 3)
    assert back[1, 3] < 0 if signed else back[1, 3] > 0
    q, p = MAPS[(bits, signed)]
    lowest = 2.0**126 * (1 / q) ** p  # the smallest non-zero magnitude the block can hold
    others = np.delete(back, 3, axis=1)
    assert np.all((others == 0) | (np.abs(others) >= lowest * (1 - 1e-6)))


def test_scale_is_kept_while_the_maximum_stays_within_the_slack():
    x = jnp.full((1, 256), 1.5, jnp.float32)
    s1 = _codec.block_scale(x, None, jnp.float32)
    assert float(s1[0]) == 2.0
    assert float(_codec.block_scale(x * 0.4, s1, jnp.float32)[0]) == 2.0  # 0.6 > 2/4
    assert float(_codec.block_scale(x * 0.2, s1, jnp.float32)[0]) == 0.5  # 0.3 <= 2/4
    assert float(_codec.bound_scale(jnp.asarray([0.6]), s1, jnp.float32)[0]) == 2.0
    assert float(_codec.bound_scale(jnp.asarray([0.3]), s1, jnp.float32)[0]) == 0.5


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("signed", [True, False])
def test_packing_puts_element_j_and_j_plus_half_in_byte_j(signed, fuse):
    q = MAPS[(4, signed)][0]
    rng = np.random.default_rng(0)
    levels = rng.integers(-q if signed else 0, q + 1, size=(3, 16)).astype(np.float32)
    packed = np.asarray(_codec.pack(jnp.asarray(levels), signed)).view(np.uint8)
    nib = (levels + (7 if signed else 0)).astype(np.uint8)
    np.testing.assert_array_equal(packed, nib[:, :8] | (nib[:, 8:] << 4))
    # Both ways of unpacking (a broadcast shift, a concatenation) give the same levels.
    back = np.asarray(_codec.levels_of(jnp.asarray(packed.view(np.int8 if signed else np.uint8)), 4, signed,
                                       jnp.float32, fuse=fuse))
    np.testing.assert_array_equal(back, levels)


@pytest.mark.parametrize("signed", [True, False], ids=["int8", "uint8"])
def test_to_bytes_gives_each_level_its_byte(signed):
    """Every level of the byte's range (and -0.0) comes back as NumPy's integer of that value."""
    levels = np.arange(-128, 128) if signed else np.arange(0, 256)
    got = np.asarray(_codec.to_bytes(jnp.asarray(levels, jnp.float32), signed))
    assert got.dtype == (np.int8 if signed else np.uint8)
    np.testing.assert_array_equal(got.astype(np.int64), levels)
    assert int(np.asarray(_codec.to_bytes(jnp.asarray([-0.0], jnp.float32), signed))[0]) == 0


@pytest.mark.parametrize("signed", [True, False])
def test_largest_level_bounds_the_finite_levels(signed):
    """8-bit codes: exact on blocks of finite codes, whichever sign holds the block's largest
    magnitude (signed map: rows 2 and 3 have their largest element negative, row 4 positive);
    Q on a block holding a reserved (non-finite) code (a bound read straight from the stored
    codes)."""
    x = np.random.default_rng(1).standard_normal((5, BLOCK[8])).astype(np.float32) * 0.4
    if not signed:
        x = np.abs(x)
    x[2, 0] = -1.0 if signed else 1.0
    x[3, 9] = -3.0 if signed else 3.0
    x[3, 10] = 2.5
    x[4, 4] = 2.0
    x[4, 5] = -1.5 if signed else 1.5
    x[0, 5] = np.nan
    x[1, 7] = np.inf
    xb = jnp.asarray(x)
    scale = _codec.block_scale(xb, None, jnp.float32)
    level = _codec.encode(xb, _codec.inverse_scale(scale)[..., None], None, 8, signed)
    top = np.asarray(_codec.largest_level(_codec.to_bytes(level, signed), signed))
    finite = np.where(np.isfinite(x), np.abs(np.asarray(level)), 0).max(axis=-1)
    q = MAPS[(8, signed)][0]
    np.testing.assert_array_equal(top[2:], finite[2:])
    np.testing.assert_array_equal(top[:2], [q, q])
    # the largest magnitudes are where they were put, with the sign they were given
    assert np.abs(np.asarray(level))[3].argmax() == 9 and np.abs(np.asarray(level))[4].argmax() == 4


def _reference_scales(x, keep, old, block):
    """Block scales from the rule itself, in NumPy (float64): the smallest power of two at or
    above each block's largest finite kept magnitude (0 for none), replaced by the old scale
    while that is at most 4 times larger."""
    a = np.where(np.isfinite(x) & keep, np.abs(x.astype(np.float64)), 0.0)
    m = a.reshape(x.shape[0], -1, block).max(axis=-1)
    mantissa, exponent = np.frexp(m)  # m = mantissa * 2**exponent, mantissa in [0.5, 1)
    fresh = np.where(m > 0, np.ldexp(1.0, exponent - (mantissa == 0.5)), 0.0)
    return np.where((fresh <= old) & (4 * fresh > old), old, fresh)


@pytest.mark.parametrize("block", [256, 128, 48])
def test_block_scales_follow_the_rule(block):
    """The block maxima reduced in 32-bit lanes, in windows of 32 (or in one stage when 32
    does not divide the block), give the scales the rule gives, computed in NumPy: with
    non-finite, left-out and all-zero elements and blocks, and old scales kept or not."""
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((6, 2 * block)) * np.exp(rng.uniform(-30, 30, (6, 1)))).astype(np.float32)
    x[1, 3], x[2, 7], x[3, :] = np.inf, np.nan, 0.0
    keep = rng.uniform(size=x.shape) > 0.1
    old = (2.0 ** rng.integers(-40, 40, (6, 2))).astype(np.float32)
    got = np.asarray(_codec.block_scale(jnp.asarray(x), jnp.asarray(old), jnp.float32, keep=jnp.asarray(keep),
                                        blocked=(6, 2, block)))
    np.testing.assert_array_equal(got, _reference_scales(x, keep, old.astype(np.float64), block))
    assert len(np.unique(got)) > 3  # the case is not degenerate


@pytest.mark.parametrize("block", [256, 128, 48])
def test_scales_reduced_together_follow_the_rule(block):
    """Several arrays' scales reduced in one variadic reduction (``block_scales``: a moment and
    its divisor) are each the rule's, as ``block_scale`` gives them one by one."""
    rng = np.random.default_rng(5)
    xs, keeps, olds = [], [], []
    for k in range(3):
        x = (rng.standard_normal((6, 2 * block)) * np.exp(rng.uniform(-30, 30, (6, 1)))).astype(np.float32)
        x[k, 3], x[k + 1, 7], x[k + 2, :] = np.inf, np.nan, 0.0
        xs.append(x)
        keeps.append(rng.uniform(size=x.shape) > 0.1 if k != 1 else None)
        olds.append((2.0 ** rng.integers(-40, 40, (6, 2))).astype(np.float32))
    got = _codec.block_scales(tuple(jnp.asarray(x) for x in xs), tuple(jnp.asarray(o) for o in olds),
                              jnp.float32, keeps=tuple(None if k is None else jnp.asarray(k) for k in keeps),
                              blocked=(6, 2, block))
    assert len(got) == 3
    for x, keep, old, scale in zip(xs, keeps, olds, got, strict=True):
        keep = np.ones(x.shape, bool) if keep is None else keep
        expected = _reference_scales(x, keep, old.astype(np.float64), block)
        np.testing.assert_array_equal(np.asarray(scale), expected)
        one = _codec.block_scale(jnp.asarray(x), jnp.asarray(old), jnp.float32, keep=jnp.asarray(keep),
                                 blocked=(6, 2, block))
        np.testing.assert_array_equal(np.asarray(scale), np.asarray(one))
        assert len(np.unique(np.asarray(scale))) > 3


@pytest.mark.parametrize("bits", [8, 4])
def test_rounding_is_unbiased_over_steps(bits):
    x = np.abs(np.random.default_rng(0).standard_normal((4, BLOCK[bits]))).astype(np.float32)
    enc = jax.jit(lambda c: _roundtrip_traced(jnp.asarray(x), bits, c))
    mean = np.mean([np.asarray(enc(jnp.int32(c)), np.float64) for c in range(400)], axis=0)
    rel = np.abs(mean - x) / x
    assert np.median(rel) < 0.01, np.median(rel)
    one = np.asarray(enc(jnp.int32(0)), np.float64)
    assert np.median(np.abs(one - x) / x) > 3 * np.median(rel)


@pytest.mark.parametrize("bits,signed", [(8, True), (8, False), (4, True), (4, False)])
def test_rounding_of_a_carried_moment_is_unbiased(bits, signed):
    """A leaky average rounded at every step, each step starting from the last rounded value:
    its mean over 65536 elements stays on the exact value (within 4 standard errors). With the
    step added after the hash (a Weyl sequence per element) the numbers at one step depended
    on those before, as the value being rounded does, and the mean drifted (8-bit signed:
    -2.9e-3, 100 standard errors)."""
    n, steps, b = 1 << 16, 200, 0.99
    x, v0 = (0.2, 0.5) if signed else (0.3, 0.05)
    one = jnp.ones((n,), jnp.float32)

    def body(t, v):
        s = b * v + (1 - b) * x
        level = _codec.encode(s, one, _codec.uniform((n,), t + 1, 5), bits, signed)
        return _codec.decode(level, one[0], bits, signed)

    v = np.asarray(jax.jit(lambda v: jax.lax.fori_loop(0, steps, body, v))(jnp.full((n,), v0, jnp.float32)))
    exact = x + (v0 - x) * b**steps
    assert abs(v.mean() - exact) < 4 * v.std() / np.sqrt(n), (v.mean(), exact)


def test_an_exact_power_of_two_keeps_its_scale():
    """The top level decodes to exactly the scale, so a block re-encoded unchanged (a running
    maximum, a step that optax.apply_if_finite skips) keeps its scale: the smallest power of
    two at or above the maximum, from the values and from a bound alike."""
    x = jnp.asarray([[1.0, 0.5, 0.25, 0.1], [0.75, 0.5, 0.25, 0.1], [0.25, 0.1, 0.1, 0.1]], jnp.float32)
    old = jnp.ones(3, jnp.float32)
    np.testing.assert_array_equal(_codec.block_scale(x, None, jnp.float32), [1.0, 1.0, 0.25])
    np.testing.assert_array_equal(_codec.block_scale(x, old, jnp.float32), [1.0, 1.0, 0.25])
    np.testing.assert_array_equal(_codec.bound_scale(jnp.asarray([1.0, 1.5, 0.25]), old, jnp.float32),
                                  [1.0, 2.0, 0.25])
    # the smallest normal number keeps its own exponent: its block does not read as all zero
    tiny = float(np.finfo(np.float32).tiny)
    smallest = jnp.asarray([[tiny, 0.0]], jnp.float32)
    np.testing.assert_array_equal(_codec.block_scale(smallest, None, jnp.float32), [2 * tiny])


def _roundtrip_traced(x, bits, count):
    scale = _codec.block_scale(x, None, jnp.float32)
    u = _codec.uniform(x.shape, count, 3)
    level = _codec.encode(x, _codec.inverse_scale(scale)[..., None], u, bits, False)
    return _codec.decode(level, scale[..., None], bits, False)


@pytest.mark.parametrize("leaf_id", [0, 5, 2**20 + 7, 2**30 - 1])
def test_uniform_of_a_traced_leaf_number_is_the_same_bits(leaf_id):
    """Initial codes are compiled once per layout with the leaf's number as an argument; its
    salt is the same 32-bit value as the Python integer's (products wrap mod 2**32)."""
    count = jnp.int32(3)
    plain = np.asarray(_codec.uniform((4, 64), count, leaf_id))
    traced = np.asarray(jax.jit(lambda i: _codec.uniform((4, 64), count, i))(jnp.uint32(leaf_id)))
    np.testing.assert_array_equal(plain, traced)


def test_finite_absmax_leaves_out_overflowing_squares():
    """The bound is the largest float32 with the exponent of the true finite maximum: at least
    the maximum, below twice it, so the power of two above it is the maximum's own."""
    x = jnp.asarray([[1.0, -3.0, 1e20, jnp.inf, jnp.nan, 2.0]], jnp.float32)
    largest_below = lambda p: float(np.nextafter(np.float32(2.0**p), np.float32(0)))  # noqa: E731
    assert float(_codec.finite_absmax(x, jnp.float32)[0]) == largest_below(67)  # 1e20 < 2**67
    assert float(_codec.finite_absmax(x, jnp.float32, square_finite=True)[0]) == largest_below(2)
    assert float(_codec.finite_absmax(jnp.zeros((1, 4)), jnp.float32)[0]) == 0.0


def test_finite_absmax_gives_the_scale_of_the_true_maximum():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((64, 32)) * np.exp(rng.standard_normal((64, 32)) * 4)).astype(np.float32)
    x[3, 5], x[7, 1] = np.inf, np.nan
    exact = np.nanmax(np.where(np.isfinite(x), np.abs(x), np.nan), axis=-1).astype(np.float32)
    bound = np.asarray(_codec.finite_absmax(jnp.asarray(x), jnp.float32))
    assert np.all(bound >= exact) and np.all(bound < 2 * exact)
    np.testing.assert_array_equal(np.asarray(_codec.bound_scale(jnp.asarray(bound), None, jnp.float32)),
                                  np.asarray(_codec.bound_scale(jnp.asarray(exact), None, jnp.float32)))


# --------------------------------------------------------------------------- 4-bit halves


@pytest.mark.parametrize("signed", [False, True])
def test_halves_pack_and_unpack_like_whole_blocks(signed):
    """Packing the low and high halves of each block separately gives the bytes of packing the
    whole blocks, and reading one nibble of each byte gives that half of the levels; the row-major
    element index of each half matches, so the rounding noise is the same number per element."""
    q = 7 if signed else 14
    rng = np.random.default_rng(5)
    blocked, code_shape = (3, 4, 16), (3, 32)
    level = jnp.asarray(rng.integers(-q if signed else 0, q + 1, blocked), jnp.float32)
    whole = _codec.pack(level, signed).reshape(code_shape)
    low, high = (level[..., :8].reshape(code_shape), level[..., 8:].reshape(code_shape))
    np.testing.assert_array_equal(np.asarray(_codec.pack_halves(low, high, signed)), np.asarray(whole))
    for h, part in ((False, low), (True, high)):
        for wide in (False, True):
            np.testing.assert_array_equal(
                np.asarray(_codec.half_levels(whole, h, signed, jnp.float32, wide=wide)), np.asarray(part))
        index = np.arange(np.prod(blocked)).reshape(blocked)
        index = (index[..., 8:] if h else index[..., :8]).reshape(code_shape)
        np.testing.assert_array_equal(np.asarray(_codec.half_indices(code_shape, 8, h)), index)
    u = _codec.uniform(blocked, jnp.int32(3), 9)
    np.testing.assert_array_equal(
        np.asarray(_codec.uniform_at(_codec.half_indices(code_shape, 8, True), jnp.int32(3), 9)),
        np.asarray(u[..., 8:]).reshape(code_shape))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16])
def test_inverse_scale_by_bits_is_the_quotient(dtype):
    """The inverse formed from the bit pattern is ``1 / scale`` for 0 and every power of two a
    scale can take (``2**-125`` to ``2**126``; float64's whole normal range), written in
    NumPy as ``2.0**-k``."""
    top = 1022 if dtype == jnp.float64 else 126
    k = np.arange(-top + 1, top + 1)
    scale = np.concatenate([[0.0], 2.0 ** k])
    expected = np.concatenate([[1.0], 2.0 ** -k])
    with jax.enable_x64(dtype == jnp.float64):
        wide = jnp.asarray(scale, dtype).astype(jnp.float32 if dtype == jnp.bfloat16 else dtype)
        got = _codec.inverse_scale(wide, by_bits=True)
        assert got.dtype == wide.dtype
        np.testing.assert_array_equal(np.asarray(got, np.float64), expected)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(_codec.inverse_scale(wide)))
