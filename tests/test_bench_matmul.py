"""tools/bench_matmul.py's measuring helpers: the cold copies are the matrix's bytes, back to
back and page-aligned in one mapping that the paired stream pass reads whole; the paired
measurement times both sides of every pair. (No timing is asserted: only the bookkeeping.)"""
import mmap
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import bench_matmul  # noqa: E402
import qblocks  # noqa: E402
from _bench_common import read_bandwidth  # noqa: E402
from ruvpy._linear import QMatrix  # noqa: E402


def test_copies_hold_the_matrix_back_to_back_on_their_own_pages():
    data, _ = qblocks.random_matrix(np.random.default_rng(1), "Q4_1", 48, 96, std=0.05)
    m = QMatrix(data.reshape(-1), "Q4_1", 48, 96)
    mats, region = bench_matmul.copies(m, 3)
    stride = -(-m.nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    assert region.nbytes == 3 * stride
    x = np.random.default_rng(2).standard_normal((2, 96)).astype(np.float32)
    want = m.matmul(x)
    base = region.ctypes.data
    for i, c in enumerate(mats):
        view = np.frombuffer(c.data, np.uint8)
        assert view.ctypes.data == base + i * stride and view.ctypes.data % mmap.PAGESIZE == 0
        assert np.array_equal(view, np.frombuffer(m.data, np.uint8, count=m.nbytes))
        np.testing.assert_array_equal(c.matmul(x), want)


def test_paired_times_every_pair_and_returns_medians():
    calls = []
    region = np.ones(1 << 16, np.uint8)
    ts, tk, ratio = bench_matmul.paired(lambda: calls.append(1), region, 1, 5)
    assert len(calls) == 6                       # one warm-up call, then one per pair
    assert ts > 0 and tk > 0 and ratio > 0


def test_read_bandwidth_stat():
    assert read_bandwidth(nbytes=1 << 20, repeats=3, threads=1, stat="median") > 0
    with pytest.raises(ValueError, match="stat"):
        read_bandwidth(nbytes=1 << 20, repeats=1, threads=1, stat="mean")
