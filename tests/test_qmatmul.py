"""The GGUF block matmuls (ruvpy._linear.QMatrix, kernels in csrc/kernels/qmatmul_impl.h) on every
ISA path this CPU has, for every block format, against gguf.quants.dequantize and a float64
matmul; random valid blocks (tests/qblocks.py), awkward shapes, threads, concurrent callers and
bad input. (tests/test_neon.py runs the same kernels from C, and the NEON table under qemu.)"""
import threading

import numpy as np
import pytest

pytest.importorskip("gguf")

import qblocks  # noqa: E402
from ruvpy import _kernels  # noqa: E402
from ruvpy._linear import (QMatrix, SUPPORTED_TYPES, block_shape, matmul_shared,  # noqa: E402
                           quantize_activations, rmsnorm, rope_angles, rope_pairs, swiglu)

# (rows, cols per block-32 format, n): one row; vector tails; partial 16-row panels; 2-3
# columns (matrix-vector per column) and 4+ (packed GEMM) with column-tile tails
SHAPES = [(1, 32, 1), (7, 96, 1), (33, 160, 2), (18, 64, 3), (50, 96, 4), (17, 32, 5), (16, 128, 7),
          (40, 224, 13), (3, 576, 1)]


def _shape(name, rows, cols, n):
    if qblocks.BLOCKS[name][0] == 256:      # K-quants: whole super-blocks
        cols = max(256, cols // 32 * 256 // 4 // 256 * 256)
    return rows, cols, n


@pytest.mark.parametrize("name", qblocks.ALL_TYPES)
def test_matmul_matches_gguf_dequantize(isa, name):
    rng = np.random.default_rng([len(isa), len(name)])
    for shape in SHAPES:
        rows, cols, n = _shape(name, *shape)
        data, w = qblocks.random_matrix(rng, name, rows, cols)
        m = QMatrix(data.reshape(-1), name, rows, cols)
        x = (rng.standard_normal((n, cols)) * rng.uniform(0.1, 10)).astype(np.float32)
        ref, tol = qblocks.matmul_reference(w, x, name)
        y = m.matmul(x)
        assert y.shape == (n, rows) and y.dtype == np.float32
        bad = np.abs(y - ref) > tol
        assert not bad.any(), f"{name} {rows}x{cols} n={n}: worst {np.abs(y - ref).max():.3g}"
        # accumulate into out
        out = rng.standard_normal((n, rows)).astype(np.float32)
        expected = out + ref
        m.matmul(x, out, accumulate=True)
        assert (np.abs(out - expected) <= tol + 2 * qblocks.F32_EPS * np.abs(expected)).all()


def test_matmul_error_is_float32_rounding(isa):
    """What the tolerance of qblocks.matmul_reference bounds, measured: the error relative to
    sum |w x_hat| stays at a few float32 epsilons (the integer dot products are exact)."""
    rng = np.random.default_rng(3)
    worst = 0.0
    for name in qblocks.ALL_TYPES:
        rows, cols, n = _shape(name, 64, 512, 5)
        data, w = qblocks.random_matrix(rng, name, rows, cols)
        x = rng.standard_normal((n, cols)).astype(np.float32)
        xh = qblocks.activations(x, name)
        y = QMatrix(data.reshape(-1), name, rows, cols).matmul(x)
        rel = np.abs(y - xh @ w.astype(np.float64).T) / (np.abs(xh) @ np.abs(w.astype(np.float64)).T)
        worst = max(worst, rel.max())
    print(f"\n{isa}: worst error / sum|w x| = {worst:.2e} ({worst / qblocks.F32_EPS:.1f} eps)")
    assert worst < 8 * qblocks.F32_EPS


def test_quantize_activations_bit_exact(isa):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((6, 576)) * 5).astype(np.float32)
    x[1, :32] = 0
    x[2, 64:96] = 127 * np.float32(0.5) + np.arange(32, dtype=np.float32)   # ties at .5
    x = np.concatenate([x, x[:, :96]], axis=1)      # 672 values: a partial group of 4 blocks
    got = quantize_activations(x)
    want = qblocks.quantize_q8(x)
    for a, b in zip(got, want + (qblocks.nibble_order(want[0]),)):
        assert np.array_equal(a, b)
    assert len(got) == 5


def test_dequantize_matches_gguf(isa):
    rng = np.random.default_rng(9)
    for name in qblocks.ALL_TYPES:
        rows, cols, _ = _shape(name, 5, 96, 1)
        data, w = qblocks.random_matrix(rng, name, rows, cols)
        m = QMatrix(data.reshape(-1), name, rows, cols)
        np.testing.assert_allclose(m.dequantize(), w, rtol=1e-6, atol=1e-6 * np.abs(w).max())
        np.testing.assert_allclose(m.dequantize([4, 0]), w[[4, 0]], rtol=1e-6, atol=1e-6 * np.abs(w).max())


def test_reads_the_buffer_in_place():
    rng = np.random.default_rng(1)
    data, w = qblocks.random_matrix(rng, "Q8_0", 4, 64)
    buf = data.reshape(-1).copy()
    m = QMatrix(buf, "Q8_0", 4, 64)
    x = np.ones((1, 64), np.float32)
    before = m.matmul(x)
    buf[2:34] = 0                                   # row 0's first block: codes 0
    after = m.matmul(x)
    assert after[0, 0] != before[0, 0] and np.array_equal(after[0, 1:], before[0, 1:])
    assert m.data is buf


def test_threads_agree_and_run_concurrently():
    """The same results on 1 and 2 threads (rows are split, never a row's sum), and from several
    Python threads at once (the GIL is released; each caller has its own work memory)."""
    rng = np.random.default_rng(2)
    data, _ = qblocks.random_matrix(rng, "Q8_0", 8192, 576)    # 5 MB: above the parallel threshold
    m = QMatrix(data.reshape(-1), "Q8_0", 8192, 576)
    xs = [rng.standard_normal((n, 576)).astype(np.float32) for n in (1, 2, 9)]
    before = _kernels.get_num_threads()
    try:
        _kernels.set_num_threads(1)
        serial = [m.matmul(x) for x in xs]
        _kernels.set_num_threads(2)
        assert all(np.array_equal(m.matmul(x), s) for x, s in zip(xs, serial))
    finally:
        _kernels.set_num_threads(before)
    results, errors = {}, []

    def worker(i):
        try:
            for _ in range(5):
                results[i] = m.matmul(xs[i % 3])
        except Exception as exc:   # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(np.array_equal(results[i], serial[i % 3]) for i in range(6))


@pytest.mark.parametrize("threads", [None, 1, 2])
def test_matmul_shared_equals_separate_products(isa, threads):
    """Several matrices over one input in one region (Q/K/V, gate/up) give each matrix's own
    product bit for bit: a row's sum never depends on which chunk or thread computed it."""
    rng = np.random.default_rng([7, len(isa)])
    mats = []
    for name, rows in (("Q4_1", 70), ("Q8_0", 33), ("Q6_K", 16), ("F16", 5)):
        data, _ = qblocks.random_matrix(rng, name, rows, 256)
        mats.append(QMatrix(data.reshape(-1), name, rows, 256))
    for n in (1, 2, 6):
        x = rng.standard_normal((n, 256)).astype(np.float32)
        outs = matmul_shared(x, mats, threads=threads)
        assert [o.shape for o in outs] == [(n, m.shape[0]) for m in mats]
        for m, o in zip(mats, outs):
            np.testing.assert_array_equal(o, m.matmul(x))
    with pytest.raises(ValueError, match="at least one"):
        matmul_shared(x, [])
    with pytest.raises(TypeError, match="QMatrix"):
        matmul_shared(x, [mats[0], "q"])
    other = QMatrix(np.zeros(34 * 2, np.uint8), "Q8_0", 1, 64)
    with pytest.raises(ValueError, match="256 columns"):
        matmul_shared(x, [mats[0], other])
    with pytest.raises(ValueError, match="threads"):
        matmul_shared(x, mats, threads=0)


def test_elementwise_kernels(isa):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 576)).astype(np.float32)
    g = rng.uniform(0.5, 2, 576).astype(np.float32)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt((x64 ** 2).mean(1, keepdims=True) + 1e-5) * g
    np.testing.assert_allclose(rmsnorm(x, g, 1e-5), want, rtol=2e-6, atol=1e-7)
    c, s = rope_angles(np.array([0, 7, 4095]), 64, 10000.0)
    ang = np.array([0, 7, 4095])[:, None] * 10000.0 ** (-np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(c, np.cos(ang), atol=1e-7)
    np.testing.assert_allclose(s, np.sin(ang), atol=1e-7)
    v = rng.standard_normal((5, 64)).astype(np.float32)
    r = rope_pairs(v, c[1], s[1])
    np.testing.assert_allclose(r[:, 0::2], v[:, 0::2] * c[1] - v[:, 1::2] * s[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(r[:, 1::2], v[:, 0::2] * s[1] + v[:, 1::2] * c[1], rtol=1e-6, atol=1e-6)
    gate = (rng.standard_normal(1000) * 10).astype(np.float32)
    up = rng.standard_normal(1000).astype(np.float32)
    g64 = gate.astype(np.float64)
    np.testing.assert_allclose(swiglu(gate, up), g64 / (1 + np.exp(-g64)) * up, rtol=2e-6, atol=1e-30)


def test_rmsnorm_of_rows_whose_squares_overflow(isa):
    """rmsnorm summed x^2 in float32: a row past ~1.8e19 / sqrt(dim) overflowed the sum to
    inf and came back all zeros (1 / sqrt(inf)), where x / rms(x) is as defined as for any
    row. Such a row's sum is now taken over x * 2^-96 (exact scaling), on every table; an
    infinity in the row still gives NaN there and zeros elsewhere, as before."""
    rng = np.random.default_rng(41)
    g = rng.uniform(0.5, 2, 576).astype(np.float32)
    for dim in (576, 37):
        x = rng.standard_normal((4, dim)).astype(np.float32)
        x[0] *= np.float32(1e19)
        x[1] *= np.float32(1e30)
        x[2, 3] = np.float32(3e38)                     # one huge value among small ones
        x64 = x.astype(np.float64)
        want = x64 / np.sqrt((x64 ** 2).mean(1, keepdims=True) + 1e-5) * g[:dim]
        np.testing.assert_allclose(rmsnorm(x, g[:dim], 1e-5), want, rtol=4e-6, atol=1e-7)
    y = rmsnorm(np.array([1.0, np.inf, 2.0], np.float32))
    assert np.isnan(y[1]) and y[0] == 0 and y[2] == 0


def test_bad_input_is_refused():
    data = np.zeros(4 * 34 * 2, np.uint8)
    with pytest.raises(ValueError, match="unsupported weight type 'Q5_0'"):
        QMatrix(data, "Q5_0", 4, 64)
    with pytest.raises(ValueError, match="unsupported weight type id 6"):
        QMatrix(data, 6, 4, 64)
    with pytest.raises(TypeError):
        QMatrix(data, 8.0, 4, 64)
    with pytest.raises(ValueError, match="not a multiple of the Q4_K block"):
        QMatrix(data, "Q4_K", 1, 64)
    with pytest.raises(ValueError, match=r"needs 272 bytes, the buffer has 100"):
        QMatrix(data[:100], "Q8_0", 4, 64)
    with pytest.raises(ValueError, match="empty"):
        QMatrix(data, "Q8_0", 0, 64)
    m = QMatrix(data, "Q8_0", 4, 64)
    assert m.shape == (4, 64) and m.type == "Q8_0" and m.nbytes == 272
    with pytest.raises(TypeError, match="float32"):
        m.matmul(np.zeros((1, 64), np.float64))
    with pytest.raises(ValueError, match=r"\[n, 64\]"):
        m.matmul(np.zeros((1, 63), np.float32))
    with pytest.raises(ValueError, match="out must be"):
        m.matmul(np.zeros((2, 64), np.float32), np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="accumulate=True needs out"):
        m.matmul(np.zeros((2, 64), np.float32), accumulate=True)
    with pytest.raises(IndexError):
        m.dequantize([4])
    assert m.matmul(np.zeros((0, 64), np.float32)).shape == (0, 4)
    assert set(SUPPORTED_TYPES) == set(qblocks.ALL_TYPES)
    assert block_shape("Q6_K") == (256, 210) and block_shape(14) == (256, 210)


@pytest.mark.parametrize("name", [n for n in qblocks.ALL_TYPES if n not in ("F32", "F16", "BF16")])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_activation_gives_nan_on_every_isa(isa, name, bad):
    """Quantized weights meet int8 activations: the block maximum skipped a NaN and the codes
    alone gave a finite sum that differed between ISAs (63 on scalar, 62 on AVX2/AVX-512 for
    a row of ones). A block holding a NaN or an infinity now has scale NaN, so every row of
    that column is NaN, as float arithmetic gives; the other columns are untouched."""
    rng = np.random.default_rng([len(isa), len(name), int(np.isnan(bad))])
    rows, cols, _ = _shape(name, 5, 96, 1)
    data, w = qblocks.random_matrix(rng, name, rows, cols)
    m = QMatrix(data.reshape(-1), name, rows, cols)
    x = rng.standard_normal((5, cols)).astype(np.float32)    # 5 columns: the packed GEMM too
    clean = m.matmul(x)
    x[2, cols // 2] = bad
    y = m.matmul(x)
    assert np.isnan(y[2]).all()
    np.testing.assert_array_equal(np.delete(y, 2, axis=0), np.delete(clean, 2, axis=0))
    assert np.isnan(m.matmul(x[2:3])).all()                  # and one column (matrix-vector)


@pytest.mark.parametrize("name", [n for n in qblocks.ALL_TYPES if n not in ("F32", "F16", "BF16")])
def test_activation_blocks_whose_inverse_scale_overflows(isa, name):
    """A block of 32 activations with max |x| below ~3.7e-37 has a scale d = max / 127 whose
    inverse 1 / d is infinite in float32: every code became x * inf, the sign alone on the
    scalar table (+-127) and -127 whatever the sign (cvtps2dq's integer indefinite) on AVX2
    and AVX-512 -- products 2x to 13x off float64, and the tables disagreeing. Such blocks are
    now quantized as any other (their values scaled by 2^64 first, exactly): the product is the
    float64 one within the int8 rounding, on every table, and the codes keep the values' signs."""
    rng = np.random.default_rng([len(isa), len(name), 7])
    rows, cols, _ = _shape(name, 6, 128, 1)
    data, w = qblocks.random_matrix(rng, name, rows, cols)
    m = QMatrix(data.reshape(-1), name, rows, cols)
    w64 = w.astype(np.float64)
    for tiny in (1e-37, 1e-38, 1e-39):
        x = (rng.standard_normal((5, cols)) * tiny).astype(np.float32)   # normal and subnormal
        x[1, :32] = rng.standard_normal(32)                 # a normal block among tiny ones
        x[3, :cols // 2] = 0.0                              # and zero blocks
        y = m.matmul(x).astype(np.float64)
        ref = x.astype(np.float64) @ w64.T
        # int8 rounding: half a step (max |x| of the block / 127) per value, plus the float32
        # rounding of a subnormal scale (within 2^-9 of its value for these blocks)
        step = np.repeat(np.abs(x).reshape(5, -1, 32).max(-1).astype(np.float64) / 127, 32, axis=1)
        bound = (0.5 * step + 2.0 ** -9 * np.abs(x)) @ np.abs(w64).T * 1.01
        assert np.all(np.abs(y - ref) <= bound), f"{tiny}: worst {np.max(np.abs(y - ref) / bound):.3g} x the bound"
        assert np.all(np.abs(m.matmul(x[2:3]).astype(np.float64) - ref[2:3]) <= bound[2:3])   # matrix-vector
        q = quantize_activations(x)[0].reshape(x.shape)
        assert np.all(q * np.sign(x) >= 0), "a code of the other sign"
        assert np.array_equal(q, qblocks.quantize_q8(x)[0])


def test_matmul_refuses_out_overlapping_x(isa):
    """out=x (or a view sharing its memory) was accepted: float weights read x while its rows
    were written, garbage of order 1e8 (quantized weights hid it: x is quantized first)."""
    rng = np.random.default_rng(5)
    for name in ("F32", "Q8_0"):
        data, _ = qblocks.random_matrix(rng, name, 64, 64)
        m = QMatrix(data.reshape(-1), name, 64, 64)
        x = rng.standard_normal((4, 64)).astype(np.float32)
        before = x.copy()
        with pytest.raises(ValueError, match="out overlaps x"):
            m.matmul(x, out=x)
        block = np.zeros((5, 64), np.float32)
        block[:4] = x
        with pytest.raises(ValueError, match="out overlaps x"):
            m.matmul(block[:4], out=block[1:])
        np.testing.assert_array_equal(x, before)
        np.testing.assert_array_equal(m.matmul(x, out=np.empty_like(x)), m.matmul(before))


def test_rmsnorm_takes_one_row_or_rows_and_refuses_more_axes():
    """A 1-D x was read as dim rows of one value ([[1.], [1.]] for [3, 4]) and a 3-D one was
    flattened into rows silently; now [dim] is one row and more than 2 axes are refused."""
    x = np.array([3.0, 4.0], np.float32)
    want = x / np.sqrt((x.astype(np.float64) ** 2).mean() + 1e-5)
    np.testing.assert_allclose(rmsnorm(x), want, rtol=1e-6)
    np.testing.assert_allclose(rmsnorm(x, np.array([2.0, 0.5], np.float32)), want * [2.0, 0.5], rtol=1e-6)
    assert rmsnorm(x[None]).shape == (1, 2)
    with pytest.raises(ValueError, match=r"x must be \[n, dim\]"):
        rmsnorm(np.ones((2, 3, 4), np.float32))
