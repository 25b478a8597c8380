"""ruvpy: an embeddable LLM inference memory and attention runtime.

ruvpy owns the memory of a transformer decode loop (arena, buffer pool, scratch), keeps the KV
cache (paged, or two-tier with quantized cold storage) and computes attention with SIMD + OpenMP
kernels that release the GIL.
"""
import os as _os


# libgomp spins this many pause loops (~65 us on the Zen 4 test machine) before a waiting thread
# sleeps, instead of its default 300000 (milliseconds).
_GOMP_SPINCOUNT = "3000"


def _bound_openmp_spinning():
    """Ask libgomp (it reads its environment once, when the first extension loads it) to spin
    briefly before sleeping, unless the user chose a wait policy. Why, measured on the 2-core
    test machine with one busy process beside the run (tools/bench_threads.py, decode at 4096
    keys): with libgomp's default spinning every parallel call waited out scheduler slices,
    16-32 ms instead of 0.2-1.3 ms serially; with 3000 spins 0.15-1.8 ms. OMP_WAIT_POLICY=passive
    did as well under load but made idle decode up to 2x slower (a futex wake per barrier),
    while 3000 spins keep idle timings at the default's (tools/bench_attention.py). Returns what
    the setting is and where it came from, and whether this function set it."""
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        if name in _os.environ:
            return f"{name}={_os.environ[name]} (from the environment)", False
    if _libgomp_loaded():
        return "libgomp was loaded before ruvpy: its own settings apply", False
    _os.environ["GOMP_SPINCOUNT"] = _GOMP_SPINCOUNT
    return f"GOMP_SPINCOUNT={_GOMP_SPINCOUNT} (ruvpy's default)", True


def _libgomp_loaded():
    """Whether another module already loaded libgomp (it read its environment then)."""
    import ctypes
    if not hasattr(_os, "RTLD_NOLOAD"):     # cannot ask without loading it
        return False
    try:
        ctypes.CDLL("libgomp.so.1", mode=_os.RTLD_NOLOAD)
    except OSError:
        return False
    return True


_OPENMP_WAITING, _SET_SPINCOUNT = _bound_openmp_spinning()
try:
    from ruvpy import _kernels  # noqa: E402  (libgomp reads its environment now)
except ImportError as _exc:
    _checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    if _os.path.exists(_os.path.join(_checkout, "setup.py")):   # the bare sources of a checkout
        raise ImportError(
            f"ruvpy was imported from the source checkout {_checkout}, whose C extensions are not "
            "built. Install it in place with `pip install -e .` (which builds them next to the "
            "sources), or run Python outside the checkout to use an installed copy.") from _exc
    raise
finally:
    if _SET_SPINCOUNT:  # only for this process's libgomp: child processes get the user's environment
        del _os.environ["GOMP_SPINCOUNT"]
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
        "avx512_vnni": _kernels.avx512_vnni(),
        "openmp": _kernels.openmp_enabled(),
        "threads": get_num_threads(),
        "max_threads": _kernels.max_threads(),
        "openmp_waiting": _OPENMP_WAITING,
        "build": BUILD_INFO,
    }
