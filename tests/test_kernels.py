"""The basic kernels of ruvpy._kernels against float64 numpy, on every ISA path of this CPU.

Lengths run from 0 to ~5000 so every vector tail, the unrolled main loops and empty input are
covered. fp16 conversion must be bit-exact with numpy's astype over all 65,536 halves, millions
of random float32 bit patterns and every rounding edge. The rest of the kernel table (the
attention and dequantization kernels, which Python reaches only through ruvpy.attention and the
KV caches) is checked entry by entry in C by tests/test_neon.py, on every ISA, NEON included.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ruvpy import _kernels as K

from _helpers import kernel_harness as kh   # shared float64 references and fp16 edge cases

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# mostly the interesting short lengths (tails of 1..16 lanes), sometimes anything up to 5000
LENGTH = st.sampled_from(kh.LENGTHS) | st.integers(0, 70) | st.integers(0, 5000)
SEED = st.integers(0, 2**32 - 1)
ALPHA = st.floats(-1e3, 1e3, allow_nan=False, width=32)


def bits32(x):
    return np.asarray(x, np.float32).view(np.uint32)


def bits16(h):
    return np.asarray(h, np.float16).view(np.uint16)


def assert_within(got, expected, tol, what):
    got = np.asarray(got, np.float64)
    with np.errstate(invalid="ignore"):
        bad = ~(np.abs(got - expected) <= tol)
    same_special = ((np.isnan(expected) & np.isnan(got)) | (np.isinf(expected) & (got == expected)))
    bad &= ~same_special
    assert not bad.any(), (f"{what}: {bad.sum()} of {bad.size} off, first at {np.argmax(bad)}: "
                           f"{got.flat[np.argmax(bad)]!r} vs {np.asarray(expected).flat[np.argmax(bad)]!r}")


def test_isa_fixture_selects_the_kernels(isa):
    assert K.get_isa() == isa


# ---- dot, axpy, scale, vmax ----

@SETTINGS
@given(n=LENGTH, seed=SEED)
def test_dot_of_small_integers_is_exact(isa, n, seed):
    # every partial sum is an integer < 2^24: exact in any summation order, so a dropped or
    # doubled element (a tail bug) shows as a wrong result
    rng = np.random.default_rng(seed)
    a = rng.integers(-8, 9, n).astype(np.float32)
    b = rng.integers(-8, 9, n).astype(np.float32)
    assert K.dot(a, b) == np.dot(a.astype(np.int64), b.astype(np.int64))


@SETTINGS
@given(n=LENGTH, seed=SEED, magnitude=st.sampled_from([1e-30, 1.0, 1e15]))
def test_dot_matches_float64(isa, n, seed, magnitude):
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal(n) * magnitude).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    want = kh.expect_dot(a, b)
    assert_within(K.dot(a, b), want["expect:r"], want["tol:r"], "dot")


@SETTINGS
@given(n=LENGTH, seed=SEED, alpha=ALPHA)
def test_axpy_matches_float64(isa, n, seed, alpha):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32)
    y = rng.standard_normal(n).astype(np.float32)
    want = kh.expect_axpy(alpha, x, y)
    K.axpy(alpha, x, y)
    assert_within(y, want["expect:y"], want["tol:y"], "axpy")


@SETTINGS
@given(n=LENGTH, seed=SEED)
def test_axpy_of_small_integers_is_exact(isa, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(-100, 100, n).astype(np.float32)
    y = rng.integers(-100, 100, n).astype(np.float32)
    want = -3 * x.astype(np.int64) + y.astype(np.int64)
    K.axpy(-3.0, x, y)
    assert np.array_equal(y, want)


@SETTINGS
@given(n=LENGTH, seed=SEED, alpha=ALPHA)
def test_scale_is_bit_exact(isa, n, seed, alpha):
    # one correctly rounded multiply per element: the same bits as numpy's float32 product,
    # also for subnormal results and overflow
    rng = np.random.default_rng(seed)
    with np.errstate(over="ignore", invalid="ignore"):  # 0 * inf
        x = (rng.standard_normal(n) * 10.0 ** rng.integers(-42, 39, n)).astype(np.float32)
        want = np.float32(alpha) * x
    K.scale(alpha, x)
    assert np.array_equal(bits32(x), bits32(want))


@SETTINGS
@given(n=LENGTH.filter(lambda n: n > 0), seed=SEED, data=st.data())
def test_vmax_is_exact(isa, n, seed, data):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1e6, 1e6, n).astype(np.float32)
    where = data.draw(st.integers(0, n - 1), label="position of the maximum")
    x[where] = np.float32(2e6)
    assert K.vmax(x) == np.float32(2e6)
    assert K.vmax(-x) == np.max(-x)


def test_vmax_special_values(isa):
    assert K.vmax(np.zeros(0, np.float32)) == -np.inf
    for n in (1, 7, 16, 33):
        assert K.vmax(np.full(n, -np.inf, np.float32)) == -np.inf
        x = np.full(n, -np.inf, np.float32)
        x[-1] = np.inf
        assert K.vmax(x) == np.inf


# ---- sum_exp ----

@SETTINGS
@given(n=LENGTH, seed=SEED, spread=st.sampled_from([0.1, 5.0, 40.0]), softmax=st.booleans())
def test_sum_exp_matches_float64(isa, n, seed, spread, softmax):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * spread).astype(np.float32)
    shift = float(x.max()) if softmax and n else float(np.float32(rng.uniform(-20, 20)))
    want = kh.expect_sum_exp(x, shift, "out")
    total, out = K.sum_exp(x, shift)
    assert_within(out, want["expect:out"], want["tol:out"], "exp(x - shift)")
    assert_within(total, want["expect:sum"], want["tol:sum"], "sum")


@pytest.mark.parametrize("n", [1, 5, 16, 17, 64, 100, 1001])
def test_sum_exp_special_values(isa, n):
    total, out = K.sum_exp(np.zeros(n, np.float32))
    assert total == n and np.all(out == 1.0)                       # exact: catches lost tails
    for very_negative in (-np.inf, -1e30, -1000.0, -104.0):
        total, out = K.sum_exp(np.full(n, very_negative, np.float32))
        assert total == 0.0 and np.all(out == 0.0), very_negative
    x = np.full(n, -np.inf, np.float32)
    x[::3] = 0.0
    assert K.sum_exp(x)[0] == len(x[::3])
    for overflowing in (88.73, 89.0, 1e30, np.inf):
        total, out = K.sum_exp(np.full(n, overflowing, np.float32))
        assert total == np.inf and np.all(out == np.inf), overflowing
    big = np.float32(88.7)                                          # just below FLT_MAX
    _, out = K.sum_exp(np.full(n, big, np.float32))
    assert np.all(np.isfinite(out))
    assert_within(out, np.exp(np.float64(big)), 3e-7 * np.exp(np.float64(big)), "exp(88.7)")
    x = np.ones(n, np.float32)
    x[-1] = np.nan
    total, out = K.sum_exp(x)
    assert np.isnan(total) and np.isnan(out[-1]) and np.all(out[:-1] == np.float32(np.e))


def test_sum_exp_over_the_whole_range(isa):
    x = np.linspace(-110, 89.5, 40001).astype(np.float32)
    want = kh.expect_sum_exp(x, 0.0, "out")
    total, out = K.sum_exp(x)
    assert_within(out, want["expect:out"], want["tol:out"], "exp")
    assert total == np.inf


# ---- fp16 conversion: bit-exact with numpy ----

def test_f16_to_f32_all_halves(isa):
    h = kh.all_halves()
    assert np.array_equal(bits32(K.f16_to_f32(h)), bits32(h.astype(np.float32)))


def test_f32_to_f16_all_halves_round_trip(isa):
    h = kh.all_halves()
    back = K.f32_to_f16(h.astype(np.float32))
    assert np.array_equal(bits16(back), bits16(h))          # NaN payloads and sNaN survive


def test_f32_to_f16_random_bit_patterns(isa):
    rng = np.random.default_rng(7)
    x = rng.integers(0, 1 << 32, 1 << 22, dtype=np.uint64).astype(np.uint32).view(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(np.float16)
    got = K.f32_to_f16(x)
    bad = np.flatnonzero(bits16(got) != bits16(want))
    assert bad.size == 0, f"{bad.size} differ, e.g. f32 bits {bits32(x)[bad[:4]]}"


def test_f32_to_f16_rounding_edges(isa):
    x = kh.fp16_edge_floats()
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(np.float16)
    bad = np.flatnonzero(bits16(K.f32_to_f16(x)) != bits16(want))
    assert bad.size == 0, f"{bad.size} differ, e.g. f32 bits {[hex(b) for b in bits32(x)[bad[:4]]]}"


# hand-checked IEEE results, independent of numpy
KNOWN_F32_TO_F16 = [
    (65504.0, 0x7bff), (65519.996, 0x7bff), (65520.0, 0x7c00), (-65520.0, 0xfc00), (1e10, 0x7c00),
    (2.0 ** -24, 0x0001), (2.0 ** -25, 0x0000), (-(2.0 ** -25), 0x8000), (2.0 ** -25 * 1.0000001, 0x0001),
    (3 * 2.0 ** -25, 0x0002), (5 * 2.0 ** -25, 0x0002), (2.0 ** -14, 0x0400), (2.0 ** -14 - 2.0 ** -25, 0x0400),
    (1.0 + 2.0 ** -11, 0x3c00), (1.0 + 3 * 2.0 ** -11, 0x3c02), (2049.0, 0x6800), (2051.0, 0x6802),
    (-0.0, 0x8000), (1e-45, 0x0000), (np.inf, 0x7c00), (-np.inf, 0xfc00),
]
KNOWN_NAN_BITS = [(0x7fc00000, 0x7e00), (0x7f800001, 0x7c01), (0x7fa00000, 0x7d00), (0xffc00001, 0xfe00),
                  (0x7f802000, 0x7c01), (0x7f804000, 0x7c02)]
KNOWN_F16_TO_F32 = [(0x0001, 0x33800000), (0x03ff, 0x387fc000), (0x0400, 0x38800000), (0x7bff, 0x477fe000),
                    (0x8000, 0x80000000), (0x7c00, 0x7f800000), (0xfc00, 0xff800000), (0x7e00, 0x7fc00000),
                    (0x7c01, 0x7f802000), (0x7d00, 0x7fa00000), (0xfe01, 0xffc02000)]


@pytest.mark.parametrize("pad", [0, 5, 16])
def test_fp16_conversion_known_values(isa, pad):
    # padded to put the values at every position within a vector and in the scalar tail
    values = np.float32([v for v, _ in KNOWN_F32_TO_F16] + [np.uint32(b).view(np.float32) for b, _ in KNOWN_NAN_BITS])
    want = np.uint16([h for _, h in KNOWN_F32_TO_F16] + [h for _, h in KNOWN_NAN_BITS])
    x = np.concatenate([np.ones(pad, np.float32), values])
    assert [hex(g) for g in bits16(K.f32_to_f16(x))[pad:]] == [hex(w) for w in want]
    h = np.concatenate([np.ones(pad, np.float16).view(np.uint16), np.uint16([h for h, _ in KNOWN_F16_TO_F32])])
    got = bits32(K.f16_to_f32(h.view(np.float16)))[pad:]
    assert [hex(g) for g in got] == [hex(f) for _, f in KNOWN_F16_TO_F32]


@SETTINGS
@given(n=LENGTH, seed=SEED, special_at=st.sampled_from([None, 0, -1]))
def test_fp16_conversion_any_length(isa, n, seed, special_at):
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 1 << 16, n, dtype=np.uint32).astype(np.uint16)
    if special_at is not None and n:
        h[special_at] = 0x7c01            # a signalling NaN at the start or in the tail
    h = h.view(np.float16)
    assert np.array_equal(bits32(K.f16_to_f32(h)), bits32(h.astype(np.float32)))
    x = (rng.standard_normal(n) * 3e4).astype(np.float32)
    if special_at is not None and n:
        x[special_at] = np.uint32(0x7f800001).view(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        assert np.array_equal(bits16(K.f32_to_f16(x)), bits16(x.astype(np.float16)))


# ---- layouts and bad input ----

def test_non_contiguous_and_multidimensional_inputs(isa):
    rng = np.random.default_rng(3)
    base = rng.standard_normal((40, 30)).astype(np.float32)
    a, b = base[::2, 1::3], base[1::2, ::3]                      # strided 2-D views
    want = kh.expect_dot(a.ravel(), b.ravel())
    assert_within(K.dot(a, b), want["expect:r"], want["tol:r"], "strided dot")
    assert K.vmax(base[:, ::7]) == base[:, ::7].max()
    total, out = K.sum_exp(base.T, 1.0)
    assert out.shape == (base.size,)
    assert_within(out, np.exp(base.T.ravel().astype(np.float64) - 1.0), 3e-7 * np.exp(base.T.ravel() - 1.0) + 1e-38, "exp")
    half = K.f32_to_f16(base[:, ::2])
    assert half.shape == (40, 15) and np.array_equal(bits16(half), bits16(base[:, ::2].astype(np.float16)))
    back = K.f16_to_f32(half.T)
    assert back.shape == (15, 40) and np.array_equal(back, half.T.astype(np.float32))


def test_in_place_kernels_on_strided_arrays(isa):
    rng = np.random.default_rng(4)
    y = rng.standard_normal(101).astype(np.float32)
    x = rng.standard_normal(51).astype(np.float32)
    before = y.copy()
    K.axpy(2.0, x, y[::2])
    want = kh.expect_axpy(2.0, x, before[::2])
    assert_within(y[::2], want["expect:y"], want["tol:y"], "strided axpy")
    assert np.array_equal(y[1::2], before[1::2]), "elements between the strided ones changed"
    m = rng.standard_normal((6, 10)).astype(np.float32)
    before = m.copy()
    K.scale(-0.5, m[:, 2:5])
    assert np.array_equal(m[:, 2:5], np.float32(-0.5) * before[:, 2:5])
    assert np.array_equal(m[:, :2], before[:, :2]) and np.array_equal(m[:, 5:], before[:, 5:])
    K.scale(3.0, m)                                              # contiguous 2-D: in place too
    assert np.array_equal(m[:, :2], np.float32(3) * before[:, :2])


F32 = np.ones(4, np.float32)


@pytest.mark.parametrize("call", [
    lambda: K.dot(np.ones(4), F32), lambda: K.dot(F32, np.ones(4, np.float16)),
    lambda: K.dot([1.0, 2.0], [1.0, 2.0]), lambda: K.dot(None, F32),
    lambda: K.axpy(1.0, np.ones(4, np.int32), F32.copy()), lambda: K.axpy(1.0, F32, np.ones(4)),
    lambda: K.axpy(1.0, F32, [1.0, 2.0, 3.0, 4.0]), lambda: K.axpy("2", F32, F32.copy()),
    lambda: K.scale(2.0, np.ones(4)), lambda: K.scale(2.0, [1.0]), lambda: K.scale(None, F32.copy()),
    lambda: K.vmax(np.ones(3, np.float64)), lambda: K.sum_exp(np.arange(3)),
    lambda: K.sum_exp(F32, "x"), lambda: K.f32_to_f16(np.ones(3, np.float16)),
    lambda: K.f32_to_f16(np.ones(3)), lambda: K.f16_to_f32(F32), lambda: K.f16_to_f32(np.ones(3, np.uint16)),
])
def test_wrong_types_raise_type_error(call):
    with pytest.raises(TypeError):
        call()


def test_mismatched_lengths_and_read_only_raise_value_error():
    with pytest.raises(ValueError, match="lengths differ"):
        K.dot(np.ones(3, np.float32), np.ones(4, np.float32))
    with pytest.raises(ValueError, match="lengths differ"):
        K.axpy(1.0, np.ones(5, np.float32), np.ones(4, np.float32))
    frozen = np.ones(4, np.float32)
    frozen.flags.writeable = False
    for call in (lambda: K.axpy(1.0, F32, frozen), lambda: K.scale(2.0, frozen)):
        with pytest.raises(ValueError, match="read-only"):
            call()
    assert np.all(frozen == 1)
