"""ruvpy: an embeddable LLM inference memory and attention runtime.

ruvpy owns the memory of a transformer decode loop (arena, buffer pool, scratch), keeps the KV
cache (paged, or two-tier with quantized cold storage) and computes attention with SIMD + OpenMP
kernels that release the GIL.
"""
from ruvpy import _kernels
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
        "build": BUILD_INFO,
    }
