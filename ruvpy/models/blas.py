"""Control of the thread count of the OpenBLAS that numpy's matmuls run on.

The model alternates numpy matmuls (OpenBLAS thread pool) with ruvpy's kernels (OpenMP pool).
OpenBLAS workers busy-wait for work: when the machine has fewer free cores than threads (a
shared box, or ruvpy's OpenMP workers still spinning), a decode matvec slows down several fold.
`LlamaModel.blas_threads` pins the count during the model's steps and restores it after.
Best effort: numpy wheels bundle (scipy-)OpenBLAS; other BLAS builds are left alone.
"""
from __future__ import annotations

import ctypes
import glob
import os

_SYMBOLS = (("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
            ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
            ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
            ("openblas_set_num_threads", "openblas_get_num_threads"))


class BlasThreads:
    """get() / set(n) on numpy's OpenBLAS."""

    def __init__(self, set_fn, get_fn, path):
        self._set, self._get, self.path = set_fn, get_fn, path

    def get(self) -> int:
        return int(self._get())

    def set(self, n: int):
        self._set(int(n))


def _candidate_libraries():
    import numpy

    root = os.path.dirname(os.path.dirname(numpy.__file__))
    patterns = ("numpy.libs/*openblas*", "numpy/.dylibs/*openblas*", "numpy.libs/*blas*")
    for pattern in patterns:
        yield from sorted(glob.glob(os.path.join(root, pattern)))


def find_blas() -> BlasThreads | None:
    """numpy's OpenBLAS thread control, or None when it cannot be found."""
    for path in _candidate_libraries():
        try:
            lib = ctypes.CDLL(path)    # already loaded by numpy: the same handle
        except OSError:
            continue
        for set_name, get_name in _SYMBOLS:
            set_fn, get_fn = getattr(lib, set_name, None), getattr(lib, get_name, None)
            if set_fn is not None and get_fn is not None:
                set_fn.argtypes, set_fn.restype = [ctypes.c_int], None
                get_fn.argtypes, get_fn.restype = [], ctypes.c_int
                return BlasThreads(set_fn, get_fn, path)
    return None
