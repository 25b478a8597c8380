# cython: language_level=3
"""The kernel dispatcher: picks one ISA's kernel table at import and exposes the basic
vector kernels (mainly for tests and benchmarks; the real users are the C drivers)."""
import os

import numpy as np

from libc.stdint cimport uint16_t
from ruvpy.c_ops cimport (rv_ops, RV_ISA_COUNT, rv_isa_supported, rv_isa_built, rv_isa_name,
                          rv_isa_from_name, rv_best_isa, rv_set_active_isa, rv_active_ops,
                          rv_set_num_threads, rv_get_num_threads)
from ruvpy._openmp_helpers cimport (effective_n_threads, RV_OPENMP_ENABLED, omp_get_max_threads,
                                    rv_team_check_here, rv_team_precheck_here, rv_team_here,
                                    rv_team_state)
from ruvpy._limits cimport (RV_MAX_HEAD_DIM, RV_MAX_KV_LEN, RV_MAX_INT, RV_MAX_GROUP_TOKENS,
                            RV_MAX_GROUP_VALUES, RV_MAX_HOT_TOKENS, RV_MAX_OUTLIERS, RV_TURBO_MAX_BITS)

cdef extern from *:
    """
    #include "rv_limits.h"
    static const double rv_turbo_bits_exported[RV_TURBO_BITS_COUNT] = RV_TURBO_BITS_LIST;
    """
    const double rv_turbo_bits_exported[3]
    int RV_TURBO_BITS_COUNT

# Every limit of ruvpy as C defines it (csrc/rv_limits.h); the rest of the package reads them
# from here. The cold formats come from the codec table (ruvpy._kvcache.COLD_FORMATS).
MAX_HEAD_DIM = RV_MAX_HEAD_DIM
MAX_KV_LEN = RV_MAX_KV_LEN
MAX_INT = RV_MAX_INT
MAX_GROUP_TOKENS = RV_MAX_GROUP_TOKENS
MAX_GROUP_VALUES = RV_MAX_GROUP_VALUES
MAX_HOT_TOKENS = RV_MAX_HOT_TOKENS
MAX_OUTLIERS = RV_MAX_OUTLIERS
TURBO_MAX_BITS = RV_TURBO_MAX_BITS
TURBO_BITS = tuple([rv_turbo_bits_exported[i] for i in range(RV_TURBO_BITS_COUNT)])
LIMITS = {"max_head_dim": MAX_HEAD_DIM, "max_kv_len": MAX_KV_LEN, "max_int": MAX_INT,
          "max_group_tokens": MAX_GROUP_TOKENS, "max_group_values": MAX_GROUP_VALUES,
          "max_hot_tokens": MAX_HOT_TOKENS, "max_outliers": MAX_OUTLIERS,
          "turbo_bits": TURBO_BITS, "turbo_max_bits": TURBO_MAX_BITS}


cdef extern from *:
    """
    /* The calling thread's own kernel thread count while a Runtime step runs in it (0: none,
     * the process-wide setting applies). Per OS thread: Runtimes stepping in different
     * Python threads never see each other's. */
    static _Thread_local int rv_thread_count_override = 0;
    """
    int rv_thread_count_override


cdef extern from *:
    """
    /* The kernel table the calling thread's kernel calls use while a Runtime step runs in it
     * (NULL: none, the process-wide table applies): a step runs on one table, the one active
     * when it opened, whatever set_isa() another thread calls meanwhile. */
    static _Thread_local const void *rv_thread_ops_override = 0;
    """
    const void *rv_thread_ops_override


cdef const rv_ops *active_ops() noexcept nogil:
    if rv_thread_ops_override != NULL:
        return <const rv_ops *>rv_thread_ops_override
    return rv_active_ops()


cdef void set_pinned_table(bint pin) noexcept nogil:
    """pin=True pins the calling thread's kernel table to the process-wide one active now (its
    calls keep using it whatever set_isa() does meanwhile), False unpins; other threads are
    untouched. Cannot fail."""
    global rv_thread_ops_override
    if not pin:
        rv_thread_ops_override = NULL
    elif rv_thread_ops_override == NULL:
        rv_thread_ops_override = <const void *>rv_active_ops()


cdef int team_check(int nthreads) noexcept nogil:
    """The process's check before a parallel region of nthreads threads (csrc/rv_threads.h):
    RV_OK, or RV_ETHREAD when its OpenMP workers cannot be started. Instantiated here only, so
    its per-thread record of libgomp's pool is one for every extension (they bind to it)."""
    return rv_team_check_here(nthreads)


cdef int team_precheck(int nthreads) noexcept nogil:
    """team_check asked ahead of work that must not be done unless the region can run (a
    cache's appends before its attention): records nothing, so the region's own check probes
    again rather than trust workers libgomp may never have started."""
    return rv_team_precheck_here(nthreads)


cdef int raise_team_error(str what) except -1:
    """Raise the MemoryError of the calling thread's last failed team_check."""
    cdef rv_team_state *st = rv_team_here()
    raise MemoryError(
        f"{what}: cannot start {st.missing} OpenMP worker thread(s) for a {st.threads}-thread "
        f"parallel region (pthread_create: {os.strerror(st.err)}): out of memory or address "
        f"space for their stacks; the region did not run (fewer threads, e.g. threads=1, need fewer)")


cdef int num_threads() noexcept nogil:
    if rv_thread_count_override > 0:
        return effective_n_threads(rv_thread_count_override)
    return effective_n_threads(rv_get_num_threads())


cdef void set_thread_count(int n) noexcept nogil:
    """_swap_thread_count's change, which cannot fail"""
    global rv_thread_count_override
    rv_thread_count_override = max(n, 0)


def _swap_thread_count(int n):
    """Test and Runtime hook: the calling thread's own thread count becomes n (0: the
    process-wide setting again); returns the previous override (0: none). Other threads and
    the process-wide setting are untouched."""
    previous = rv_thread_count_override
    set_thread_count(n)
    return previous


def _swap_thread_settings(threads, pin):
    """Runtime hook, a step's two swaps in one call: _swap_thread_count(threads) and the
    table pin (set_pinned_table(pin)), each skipped where its argument is None; returns the pair of
    previous values (None for a skipped one), which passed back restores both. All that can
    fail (the arguments' conversion, the result) comes first: an exception swaps neither."""
    cdef int n = 0
    cdef bint p = False
    if threads is not None:
        n = threads
    if pin is not None:
        p = pin
    previous = (None if threads is None else rv_thread_count_override,
                None if pin is None else rv_thread_ops_override != NULL)
    if threads is not None:
        set_thread_count(n)
    if pin is not None:
        set_pinned_table(p)
    return previous


def _names(predicate):
    return [rv_isa_name(i).decode() for i in range(RV_ISA_COUNT) if predicate(i)]


def available_isas():
    """ISAs this build has and this CPU runs, in preference order (slowest first)."""
    return _names(rv_isa_supported)


def built_isas():
    return _names(rv_isa_built)


def avx512_vnni():
    """Whether the active kernel table uses AVX512-VNNI (vpdpbusd): only the avx512vnni
    table does (its matmuls and TurboQuant kernels); the table alone decides, so RUVPY_ISA /
    set_isa("avx512") means no VNNI anywhere."""
    return get_isa() == "avx512vnni"


def best_isa():
    return rv_isa_name(rv_best_isa()).decode()


def get_isa():
    """The ISA whose kernels run now."""
    return rv_active_ops().isa.decode()


def set_isa(name):
    """Switch every kernel to ISA `name` ("scalar", "avx2", "avx512", "avx512vnni", "neon")."""
    if not isinstance(name, str):
        raise TypeError(f"ISA name must be a str, got {type(name).__name__}")
    # the str's own characters, once: a subclass's encode / __repr__ / __eq__ are never asked
    # (an overridden encode() used to pick another table than the name says)
    name = str.__str__(name)
    # C compares up to a NUL: "scalar\0junk" used to select scalar; and a name that is not
    # ASCII is no ISA's (a lone surrogate used to raise UnicodeEncodeError)
    cdef int isa = rv_isa_from_name(name.encode()) if name.isascii() and "\0" not in name else -1
    if isa < 0:
        raise ValueError(f"unknown ISA {name!r}; known: scalar, avx2, avx512, avx512vnni, neon")
    if not rv_isa_built(isa):
        raise RuntimeError(f"ISA {name!r} is not compiled into this build (built: {built_isas()})")
    if rv_set_active_isa(isa) != 0:
        raise RuntimeError(f"ISA {name!r} is not supported by this CPU (available: {available_isas()})")


def set_num_threads(n):
    """Threads for ruvpy's parallel kernels, process-wide; None or 0 means all
    (OMP_NUM_THREADS / cores). More than there are is capped to that. (Inside a step of a
    Runtime with RuntimeConfig.threads set, the stepping thread uses the Runtime's count.)"""
    if n is None:
        n = 0
    if not isinstance(n, (int, np.integer)) or isinstance(n, (bool, np.bool_)):
        raise TypeError(f"thread count must be an int or None, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"thread count must be >= 0 (0 or None: all), got {n}")
    rv_set_num_threads(<int>min(int(n), 2**31 - 1))


def get_num_threads():
    """Threads the parallel kernels use now, in the calling thread."""
    return num_threads()


def openmp_enabled():
    return bool(RV_OPENMP_ENABLED)


def max_threads():
    return omp_get_max_threads()


def _select_from_environment():
    requested = os.environ.get("RUVPY_ISA", "").strip().lower()
    if not requested:
        rv_set_active_isa(rv_best_isa())
        return
    try:
        set_isa(requested)
    except (ValueError, RuntimeError) as exc:
        raise RuntimeError(f"RUVPY_ISA={requested!r} cannot be used: {exc}; this machine can "
                           f"run {', '.join(available_isas())} (unset RUVPY_ISA for the best)") from None


_select_from_environment()


# ---- basic kernels, over contiguous float32 / binary16 arrays ----
# Every array argument is converted (which may run Python code: __array__, a sequence's
# __getitem__) before any of them is validated and viewed; an ndarray subclass is read through
# a plain ndarray view, so Python-level dtype/shape/flags/reshape overrides are never asked.

def _converted_first(*xs):
    """xs with every argument that is not an ndarray converted by np.asarray, which may run
    Python code (__array__, a sequence's __getitem__): done for all of them before any view of
    an ndarray argument is made, so that code cannot resize an array under a view of it."""
    return tuple(x if x is None or isinstance(x, np.ndarray) else np.asarray(x) for x in xs)


def _f32(x, name):
    a = np.ascontiguousarray(x)
    if a.dtype != np.float32:
        raise TypeError(f"{name} must be float32, got {a.dtype}")
    return a.reshape(-1)


def _inplace_array(x, name):
    """x (updated in place) as a plain ndarray view of the same memory."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a float32 numpy array (updated in place), got {type(x).__name__}")
    return x if type(x) is np.ndarray else np.asarray(x)


def _inplace_f32(x, name):
    """The flat contiguous float32 buffer an in-place kernel updates for the plain ndarray x
    (_inplace_array): a view of x, or for a non-contiguous x a copy that _write_back stores
    into x afterwards."""
    if x.dtype != np.float32:
        raise TypeError(f"{name} must be float32, got {x.dtype}")
    if not x.flags.writeable:
        raise ValueError(f"{name} is read-only; it is updated in place")
    return x.reshape(-1) if x.flags.c_contiguous else np.ascontiguousarray(x).reshape(-1)


def _write_back(x, flat):
    if not x.flags.c_contiguous:
        x[...] = flat.reshape(x.shape)


def dot(a, b):
    a, b = _converted_first(a, b)
    a, b = _f32(a, "a"), _f32(b, "b")
    cdef const float[::1] x = a
    cdef const float[::1] y = b
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"dot: lengths differ ({x.shape[0]} vs {y.shape[0]})")
    cdef float r
    with nogil:
        r = rv_active_ops().dot_f32(&x[0] if x.shape[0] else NULL, &y[0] if y.shape[0] else NULL, x.shape[0])
    return r


def axpy(float alpha, x, y):
    """y += alpha * x, in place (y: float32 array, x: float32 of the same size)."""
    y = _inplace_array(y, "y")
    x, = _converted_first(x)
    x = _f32(x, "x")
    flat = _inplace_f32(y, "y")
    cdef const float[::1] xv = x
    cdef float[::1] yv = flat
    if xv.shape[0] != yv.shape[0]:
        raise ValueError(f"axpy: lengths differ ({xv.shape[0]} vs {yv.shape[0]})")
    if yv.shape[0]:
        with nogil:
            rv_active_ops().axpy_f32(yv.shape[0], alpha, &xv[0], &yv[0])
    _write_back(y, flat)


def scale(float alpha, x):
    """x *= alpha, in place (x: float32 array)."""
    x = _inplace_array(x, "x")
    flat = _inplace_f32(x, "x")
    cdef float[::1] xv = flat
    if xv.shape[0]:
        with nogil:
            rv_active_ops().scale_f32(xv.shape[0], alpha, &xv[0])
    _write_back(x, flat)


def vmax(x):
    cdef const float[::1] xv = _f32(x, "x")
    cdef float r
    with nogil:
        r = rv_active_ops().max_f32(&xv[0] if xv.shape[0] else NULL, xv.shape[0])
    return r


def sum_exp(x, float shift=0.0):
    """(sum(exp(x - shift)), exp(x - shift))"""
    cdef const float[::1] xv = _f32(x, "x")
    out = np.empty(xv.shape[0], dtype=np.float32)
    cdef float[::1] ov = out
    cdef float s = 0
    if xv.shape[0]:
        with nogil:
            s = rv_active_ops().sum_exp_f32(&xv[0], shift, &ov[0], xv.shape[0])
    return s, out


def f32_to_f16(x):
    """float32 -> float16, round to nearest even (bit-exact with numpy)."""
    cdef const float[::1] xv = _f32(x, "x")
    out = np.empty(xv.shape[0], dtype=np.uint16)
    cdef uint16_t[::1] ov = out
    if xv.shape[0]:
        with nogil:
            rv_active_ops().f32_to_f16(&xv[0], &ov[0], xv.shape[0])
    return out.view(np.float16).reshape(np.shape(x))


def f16_to_f32(h):
    """float16 -> float32 (exact)."""
    a = np.ascontiguousarray(h)
    if a.dtype != np.float16:
        raise TypeError(f"h must be float16, got {a.dtype}")
    cdef const uint16_t[::1] hv = a.reshape(-1).view(np.uint16)
    out = np.empty(hv.shape[0], dtype=np.float32)
    cdef float[::1] ov = out
    if hv.shape[0]:
        with nogil:
            rv_active_ops().f16_to_f32(&hv[0], &ov[0], hv.shape[0])
    return out.reshape(a.shape)
