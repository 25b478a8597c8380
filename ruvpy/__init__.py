"""ruvpy: an embeddable LLM inference memory and attention runtime.

ruvpy owns the memory of a transformer decode loop (arena, buffer pool, scratch), keeps the KV
cache (paged, or two-tier with quantized cold storage) and computes attention with SIMD + OpenMP
kernels that release the GIL.
"""
import os as _os


def _prefer_passive_openmp_waiting():
    """Ask libgomp (read once, when the first extension loads it) to let idle workers sleep,
    unless the user chose a wait policy. Why: libgomp's default spins, and when any other
    process wants a core a 2-thread region's join waits out scheduler slices -- measured by
    tools/bench_threads.py on the 2-core test machine with one busy process beside it: 16-32 ms
    per decode call instead of 0.2-1.2 ms serial; passive waiting stays within ~1.2x of serial
    and costs idle calls a wake-up (tens of microseconds; calls under ~100 us of work run
    serially anyway, see csrc/rv_threads.h). Returns what the policy is and where it came from."""
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        if name in _os.environ:
            return f"{name}={_os.environ[name]} (from the environment)", False
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return "OMP_WAIT_POLICY=PASSIVE (ruvpy's default)", True


_OPENMP_WAITING, _SET_WAIT_POLICY = _prefer_passive_openmp_waiting()
from ruvpy import _kernels  # noqa: E402  (libgomp reads its environment now)
if _SET_WAIT_POLICY:  # only for this process's libgomp: child processes get the user's environment
    del _os.environ["OMP_WAIT_POLICY"]
from ruvpy._kernels import get_isa, set_isa, available_isas, set_num_threads, get_num_threads
from ruvpy._attention import attention
from ruvpy._memory import (Arena, ArenaExhausted, ArenaStats, BufferPool, PooledBuffer, PoolStats,
                           ScratchSpace, MemoryManager)
from ruvpy._kvcache import (PagedKVCache, TwoTierKVCache, KVCacheFull, KVCacheStats, PagedKVStats,
                           TwoTierKVStats)
from ruvpy.runtime import Runtime, RuntimeConfig, RuntimeStats, Step

__version__ = "0.1.0"


def info():
    """What this copy of ruvpy is and how it runs: version, ISA (active and available),
    OpenMP, threads and the flags it was built with."""
    try:
        from ruvpy._build_info import BUILD_INFO
    except ImportError:  # pragma: no cover - only when the package was not built by setup.py
        BUILD_INFO = {}
    return {
        "version": __version__,
        "isa": get_isa(),
        "isa_available": available_isas(),
        "isa_built": _kernels.built_isas(),
        "openmp": _kernels.openmp_enabled(),
        "threads": get_num_threads(),
        "max_threads": _kernels.max_threads(),
        "openmp_waiting": _OPENMP_WAITING,
        "build": BUILD_INFO,
    }
