# cython: language_level=3
# distutils: define_macros=NPY_NO_DEPRECATED_API=NPY_1_7_API_VERSION
"""ruvpy's memory layer: a step arena, a size-classed buffer pool and per-thread scratch.

- `Arena`: one 64-byte aligned block and a bump pointer. `alloc` hands out numpy arrays that
  view the block (no OS allocator on the hot path); `reset` makes all of it reusable in O(1).
  Arrays hold the block as their numpy base, so they stay valid after `reset`, `close` or
  `del arena` (after a reset they alias later allocations, as step buffers do; `debug=True`
  fills the memory with NaN on every reset so that stale use shows).
- `BufferPool`: free lists of 1, 4, 16, 64 and 256 KiB buffers (or classes of the caller's
  choosing, each with its own limit), one C mutex per class, taken with the GIL released. A `PooledBuffer` goes back on `release()`, on leaving its `with`
  block or when garbage collected; views of it postpone that until the last view is gone.
- `ScratchSpace`: one 64-byte aligned region per thread for kernels (`thread_ptr` in
  _memory.pxd for nogil code), and optionally one region they share; C drivers take both as
  an rv_scratch (`view`).
- `MemoryManager`: the three sized for a model, with `reset_step()` between decode steps.

The C side is csrc/memory/rv_memory.h and rv_pool.c.
"""
from collections import namedtuple

import numpy as np

cimport cython
cimport numpy as cnp
from cpython.long cimport PyLong_CheckExact
from cpython.object cimport PyObject, PyTypeObject
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from cython.parallel cimport prange
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memset

from ruvpy._openmp_helpers cimport omp_get_max_threads
from ruvpy._kernels cimport team_check, raise_team_error

cnp.import_array()

cdef extern from "Python.h":
    Py_ssize_t PY_SSIZE_T_MAX
    # raw reference counting on PyObject* (cpython.ref only takes `object`)
    void _incref "Py_INCREF"(PyObject *o)
    void _decref "Py_DECREF"(PyObject *o)
    # no `except`: the caller tells an error from a negative value itself (both are refused)
    Py_ssize_t _long_as_ssize "PyLong_AsSsize_t"(object o) noexcept
    Py_ssize_t _ptr_as_ssize "PyLong_AsSsize_t"(PyObject *o) noexcept
    bint _is_exact_int "PyLong_CheckExact"(PyObject *o) noexcept
    void PyErr_Clear() noexcept

cdef extern from "numpy/arrayobject.h":
    enum:
        NPY_ITEM_REFCOUNT
        NPY_NEEDS_INIT
    ctypedef struct PyArray_Descr
    ctypedef struct PyArrayObject
    # `descr` is stolen; NULL with an exception set on failure
    PyObject *PyArray_NewFromDescr(PyTypeObject *subtype, PyArray_Descr *descr, int nd,
                                   cnp.npy_intp *dims, cnp.npy_intp *strides, void *data,
                                   int flags, PyObject *obj) noexcept
    int PyArray_SetBaseObject(PyArrayObject *arr, PyObject *base) noexcept   # steals `base`

cdef extern from "memory/rv_memory.h" nogil:
    size_t RV_POOL_MAX_BUFFERS_PER_CLASS
    void *rv_aligned_alloc(size_t nbytes)
    void rv_aligned_free(void *block)
    ctypedef struct rv_pool_stats:
        uint64_t hits, misses, allocations, returns, drops
        size_t pooled_bytes, outstanding_bytes
        size_t free_buffers[8]
    const size_t rv_pool_class_bytes[5]
    int rv_pool_class_for(const rv_pool *p, size_t nbytes)
    rv_pool *rv_pool_create(size_t max_buffers_per_class)
    rv_pool *rv_pool_create_classes(const size_t *nbytes, const size_t *max_buffers, int n)
    void rv_pool_destroy(rv_pool *p)
    void *rv_pool_acquire(rv_pool *p, int c)
    void rv_pool_release(rv_pool *p, int c, void *buffer)
    int rv_pool_prewarm(rv_pool *p, int c, size_t count, size_t *added)
    void rv_pool_clear(rv_pool *p)
    void rv_pool_get_stats(rv_pool *p, rv_pool_stats *out)
    size_t rv_pool_meta_bytes(const rv_pool *p)

cdef enum:
    # NumPy 1.x's limit (2.x allows 64): views must work on both
    MAX_NDIM = 32

cdef enum:
    # PooledBuffer.state
    _RELEASED = 0          # back in the pool (or never handed out): inert
    _LIVE = 1
    _RELEASE_PENDING = 2   # released while views existed: goes back when the last one ends

cdef PyTypeObject *_NDARRAY = <PyTypeObject *>np.ndarray


# ---------------------------------------------------------------------------------------
# argument checking
# ---------------------------------------------------------------------------------------

cdef object _count_arg(object value, str name):
    """value as a non-negative Python int: ints and numpy integers pass; bool, float, str,
    None ... raise TypeError; negatives raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    v = int(value)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


cdef inline int _fail() except -1:
    """Propagates the exception a C call has already set (e.g. numpy's MemoryError)."""
    return -1


cdef Py_ssize_t _dim(object d, object shape) except -1:
    cdef Py_ssize_t v
    if PyLong_CheckExact(d):
        v = _long_as_ssize(d)
        if v >= 0:
            return v
        PyErr_Clear()   # OverflowError for huge ints: reported below as a ValueError
    elif isinstance(d, bool) or not isinstance(d, (int, np.integer)):
        raise TypeError(f"shape entries must be ints, got {type(d).__name__} {d!r} in shape "
                        f"{shape!r}")
    else:
        d = int(d)
        if 0 <= d <= PY_SSIZE_T_MAX:
            return d
    if d < 0:
        raise ValueError(f"shape entries must be >= 0, got {d} in shape {shape!r}")
    raise ValueError(f"shape entry {d} in shape {shape!r} is too large")


cdef inline int _parse_shape(object shape, cnp.npy_intp *dims, size_t itemsize,
                             size_t *nbytes) except -1:
    """Fills dims from an int or a sequence of ints and nbytes with the array's size in bytes;
    returns ndim. Entries must be ints (numpy integers too), >= 0, and the product must fit
    numpy's limits (it ignores zero entries, so do we). Plain non-negative ints are read
    without touching reference counts; anything else goes through _dim."""
    cdef Py_ssize_t nd, i, d
    cdef PyObject *item
    cdef size_t product = itemsize
    cdef bint overflow = False, empty = False
    if type(shape) is not tuple:
        # a list, or one dimension (_dim says if it is not an int)
        shape = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
    nd = PyTuple_GET_SIZE(shape)
    if nd > MAX_NDIM:
        raise ValueError(f"at most {MAX_NDIM} dimensions, got {nd}")
    for i in range(nd):
        item = PyTuple_GET_ITEM(shape, i)
        d = _ptr_as_ssize(item) if _is_exact_int(item) else -1
        if d < 0:
            PyErr_Clear()   # a huge int's OverflowError: _dim reports it as a ValueError
            d = _dim(<object>item, shape)
        dims[i] = d
        if d == 0:
            empty = True
        else:
            overflow |= rv_mul_size(product, <size_t>d, &product)
    if overflow or product > <size_t>PY_SSIZE_T_MAX:
        raise ValueError(f"shape {shape!r} with {itemsize}-byte items is too large")
    nbytes[0] = 0 if empty else product
    return <int>nd


cdef object _FLOAT32 = np.float32
cdef cnp.dtype _FLOAT32_DESCR = np.dtype(np.float32)
cdef dict _descr_cache = {}


cdef int _check_descr(cnp.dtype descr, object requested) except -1:
    # Raw memory is uninitialised (or poisoned): only plain fixed-size dtypes may live there.
    if (descr.type_num >= cnp.NPY_NTYPES_LEGACY or descr.itemsize == 0
            or descr.flags & (NPY_ITEM_REFCOUNT | NPY_NEEDS_INIT)
            or cnp.PyDataType_HASSUBARRAY(descr)):
        raise TypeError(f"dtype {requested!r} cannot live in raw ruvpy memory: it must be a "
                        f"fixed-size numeric, bytes or record dtype without Python objects")
    return 0


cdef cnp.dtype _descr_lookup(object dtype):
    cdef cnp.dtype descr
    if dtype is None:
        return _FLOAT32_DESCR
    if isinstance(dtype, cnp.dtype):
        _check_descr(dtype, dtype)
        return dtype
    try:
        return _descr_cache[dtype]
    except (KeyError, TypeError):   # not seen yet, or unhashable
        pass
    descr = np.dtype(dtype)        # TypeError for names numpy does not know
    _check_descr(descr, dtype)
    if isinstance(dtype, (type, str)) and len(_descr_cache) < 256:
        _descr_cache[dtype] = descr
    return descr


cdef inline cnp.dtype _descr_for(object dtype):
    """The validated numpy descriptor for `dtype` (None means float32), cached."""
    if dtype is _FLOAT32:
        return _FLOAT32_DESCR
    return _descr_lookup(dtype)


cdef PyObject *_new_view(void *data, int nd, cnp.npy_intp *dims, cnp.dtype descr,
                         PyObject *base) noexcept:
    """A C-contiguous, writeable ndarray over `data` keeping `base` alive; NULL with an
    exception set on failure."""
    _incref(<PyObject *>descr)
    cdef PyObject *arr = PyArray_NewFromDescr(_NDARRAY, <PyArray_Descr *>descr, nd, dims, NULL,
                                              data, cnp.NPY_ARRAY_CARRAY, NULL)
    if arr == NULL:
        return NULL
    _incref(base)
    if PyArray_SetBaseObject(<PyArrayObject *>arr, base) < 0:
        _decref(arr)
        return NULL
    return arr


cdef inline object _steal(PyObject *o):
    result = <object>o
    _decref(o)
    return result


# ---------------------------------------------------------------------------------------
# blocks
# ---------------------------------------------------------------------------------------

cdef class _Block:
    def __dealloc__(self):
        rv_aligned_free(self.ptr)


cdef _Block _new_block(object nbytes, int fill_byte):
    """A block of nbytes (rounded up to 64), filled with fill_byte unless it is -1.
    MemoryError when the system cannot give it (absurd sizes included)."""
    cdef _Block block = _Block.__new__(_Block)
    cdef size_t n
    if nbytes > PY_SSIZE_T_MAX - RV_ALIGN:
        raise MemoryError(f"cannot allocate {nbytes} bytes: larger than the address space")
    n = nbytes
    with nogil:
        block.ptr = rv_aligned_alloc(n)
    if block.ptr == NULL:
        raise MemoryError(f"cannot allocate {nbytes} bytes")
    block.nbytes = rv_align_up(n if n else 1)
    if fill_byte >= 0:
        with nogil:
            memset(block.ptr, fill_byte, block.nbytes)
    return block


# ---------------------------------------------------------------------------------------
# arena
# ---------------------------------------------------------------------------------------

class ArenaExhausted(MemoryError):
    """An arena has too little room left for an allocation. The arena is unchanged and
    stays usable (reset it, or make a larger one)."""

    def __init__(self, requested, remaining, capacity):
        super().__init__(f"arena exhausted: requested {requested} bytes, but only {remaining} "
                         f"of its {capacity} bytes remain (reset() it or use a larger arena)")
        self.requested = requested
        self.remaining = remaining
        self.capacity = capacity

    def __reduce__(self):
        return type(self), (self.requested, self.remaining, self.capacity)


class ArenaStats(namedtuple("ArenaStats", "capacity used remaining high_water_mark "
                                          "allocation_count reset_count")):
    """Bytes of an arena (used + remaining == capacity; each allocation takes its size rounded
    up to 64 bytes), the most ever used, allocations since the last reset, resets so far."""
    __slots__ = ()

    @property
    def utilization(self):
        return self.used / self.capacity


cdef inline object _arena_alloc(Arena self, object shape, object dtype, bint zero):
    cdef cnp.npy_intp dims[MAX_NDIM]
    cdef size_t nbytes
    cdef cnp.dtype descr = _descr_for(dtype)
    cdef int nd = _parse_shape(shape, dims, descr.itemsize, &nbytes)
    cdef rv_arena *state = &self.state
    cdef size_t offset = state.offset, high_water = state.high_water
    if state.base == NULL:
        raise ValueError("the arena is closed")
    cdef void *data = rv_arena_bump(state, nbytes)
    if data == NULL:
        raise ArenaExhausted(nbytes, state.capacity - state.offset, state.capacity)
    cdef PyObject *arr = _new_view(data, nd, dims, descr, <PyObject *>self.block)
    if arr == NULL:
        # Undo the bump unless a finaliser run by numpy's allocation bumped since.
        if state.offset == offset + rv_align_up(nbytes):
            state.offset = offset
            state.high_water = high_water
            state.allocation_count -= 1
        _fail()
    if zero:
        memset(data, 0, nbytes)
    return _steal(arr)


cdef class Arena:
    """Arena(capacity_bytes, *, debug=False): a bump allocator over one 64-byte aligned
    block of capacity_bytes (rounded up to 64).

    alloc(shape, dtype=np.float32) returns a C-contiguous array viewing the block, 64-byte
    aligned, contents unspecified (zeros() clears them). reset() makes the whole block
    available again in O(1). Arrays keep the block alive through close() / del; after a reset
    they alias newer allocations, so drop them at the end of each step. With debug=True the
    block starts, and is refilled on every reset, as 0xFF bytes: NaN in any float dtype.

    Calls are serialised by the GIL (alloc never releases it); the memory itself is plain
    memory any thread may use.
    """

    def __cinit__(self, capacity_bytes, *, debug=False):
        capacity = _count_arg(capacity_bytes, "capacity_bytes")
        if capacity == 0:
            raise ValueError("capacity_bytes must be > 0")
        self.block = _new_block(capacity, RV_POISON_BYTE if debug else -1)
        self.state.base = <unsigned char *>self.block.ptr
        self.state.capacity = self.block.nbytes
        self.state.debug = bool(debug)

    @cython.binding(False)   # hot: called as a C method, no bound-method object
    def alloc(self, shape, dtype=np.float32):
        """A C-contiguous array of `shape` and `dtype` in arena memory (64-byte aligned,
        contents unspecified). ArenaExhausted when it does not fit."""
        return _arena_alloc(self, shape, dtype, False)

    @cython.binding(False)
    def zeros(self, shape, dtype=np.float32):
        """alloc(), filled with zeros."""
        return _arena_alloc(self, shape, dtype, True)

    @cython.binding(False)
    def reset(self):
        """Make the whole arena available again: O(1), whatever was allocated (debug mode
        also refills everything ever used with NaN bytes). Arrays from before alias new ones."""
        self._check_open()
        rv_arena_reset(&self.state)

    def stats(self):
        self._check_open()
        return ArenaStats(self.state.capacity, self.state.offset,
                          self.state.capacity - self.state.offset, self.state.high_water,
                          self.state.allocation_count, self.state.reset_count)

    cdef int _check_open(self) except -1:
        if self.state.base == NULL:
            raise ValueError("the arena is closed")
        return 0

    def close(self):
        """Give up the arena's block: freed now if no array uses it, else when the last one
        goes. Further alloc/reset/stats raise ValueError. Idempotent."""
        self.state.base = NULL
        self.state.capacity = self.state.offset = 0
        self.block = None

    @property
    def closed(self):
        return self.state.base == NULL

    @property
    def capacity(self):
        return self.state.capacity

    @property
    def debug(self):
        return bool(self.state.debug)

    def __enter__(self):
        self._check_open()
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        if self.state.base == NULL:
            return "<ruvpy.Arena closed>"
        return (f"<ruvpy.Arena {self.state.offset}/{self.state.capacity} bytes used, "
                f"{self.state.allocation_count} allocations{', debug' if self.state.debug else ''}>")


# ---------------------------------------------------------------------------------------
# buffer pool
# ---------------------------------------------------------------------------------------

_SIZE_CLASSES = tuple([rv_pool_class_bytes[i] for i in range(RV_POOL_CLASSES)])


class PoolStats(namedtuple("PoolStats", "hits misses allocations returns drops pooled_bytes "
                                        "outstanding_bytes free_buffers")):
    """hits/misses: acquires served from a free list / not; allocations: buffers ever
    allocated (misses + prewarm); returns: buffers put back on a free list; drops: buffers
    freed because their class was full; pooled_bytes: bytes on the free lists;
    outstanding_bytes: bytes handed out and not yet back; free_buffers: free-list lengths per
    size class."""
    __slots__ = ()

    @property
    def hit_rate(self):
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@cython.final
@cython.freelist(64)
cdef class _PoolView:
    """The numpy base of every view of a PooledBuffer: it counts as one of the buffer's
    exports for exactly its own lifetime. Unlike a memoryview it has no release(), so no
    Python code can end that early while an array still points into the buffer (the
    pattern of scikit-learn's _vector_sentinel)."""
    cdef PooledBuffer buf

    def __init__(self, *args, **kwargs):
        raise TypeError("_PoolView objects come from PooledBuffer.array()")

    def __dealloc__(self):
        if self.buf is not None:
            self.buf._end_export()


@cython.final
@cython.freelist(64)
cdef class PooledBuffer:
    """A buffer from a BufferPool: `nbytes` usable bytes (its size class may be larger),
    64-byte aligned, contents unspecified. array(shape, dtype) and np.asarray(buf) give
    numpy views (memoryview(buf.array()) a memoryview). release() - or leaving a `with`
    block, or garbage collection - gives it back; while views exist that waits for the last
    one. Using it after release, or releasing twice, raises ValueError.

    Not the raw buffer protocol: numpy would base its arrays on a memoryview, whose
    release() a caller may invoke while the array lives, letting the block go back to the
    pool under it. The views' base (a _PoolView) cannot be released early."""

    def __init__(self, *args, **kwargs):
        raise TypeError("PooledBuffer objects come from BufferPool.acquire()")

    cdef void _give_back(self) noexcept:
        cdef void *data = self.data
        cdef PyObject *owner = self.owner
        self.state = _RELEASED
        self.data = NULL
        self.owner = NULL
        with nogil:
            rv_pool_release(self.pool, self.size_class, data)
        _decref(owner)   # last: it may free the pool

    @cython.binding(False)
    def release(self):
        """Give the buffer back to its pool (once the last view of it is gone)."""
        if self.state != _LIVE:
            raise ValueError("PooledBuffer was already released")
        if self.exports:
            self.state = _RELEASE_PENDING
        else:
            self._give_back()

    def __dealloc__(self):
        if self.state != _RELEASED:
            self._give_back()

    cdef int _check_live(self) except -1:
        if self.state != _LIVE:
            raise ValueError("operation on a released PooledBuffer")
        return 0

    @cython.binding(False)
    def array(self, shape=None, dtype=np.uint8):
        """A C-contiguous view of the buffer's first bytes as an array (shape None: as many
        `dtype` items as fit in nbytes). The buffer stays out of the pool while it lives."""
        cdef cnp.npy_intp dims[MAX_NDIM]
        cdef size_t nbytes
        cdef int nd
        # dtype and shape first: converting them may run Python code (an __index__ that
        # releases this very buffer); liveness and the data pointer are read after them
        cdef cnp.dtype descr = _descr_for(dtype)
        if shape is None:
            self._check_live()
            shape = self.nbytes // descr.itemsize
        nd = _parse_shape(shape, dims, descr.itemsize, &nbytes)
        self._check_live()
        if nbytes > <size_t>self.nbytes:
            raise ValueError(f"shape {shape!r} of {descr} needs {nbytes} bytes; the buffer "
                             f"has {self.nbytes}")
        cdef _PoolView view = _PoolView.__new__(_PoolView)   # an export until the array dies
        view.buf = self
        self.exports += 1
        cdef PyObject *arr = _new_view(self.data, nd, dims, descr, <PyObject *>view)
        if arr == NULL:
            _fail()
        return _steal(arr)

    def __array__(self, dtype=None, copy=None):
        """np.asarray(buf): the whole buffer as uint8 (a view, as array())."""
        view = self.array()
        if copy:
            return np.array(view, dtype=dtype, copy=True)
        if dtype is None or np.dtype(dtype) == view.dtype:
            return view
        if copy is False:
            raise ValueError(f"a PooledBuffer is uint8 bytes: a {np.dtype(dtype)} array of it "
                             f"needs a copy (or buf.array(dtype={np.dtype(dtype)}))")
        return view.astype(dtype)

    cdef void _end_export(self) noexcept:
        self.exports -= 1
        if self.exports == 0 and self.state == _RELEASE_PENDING:
            self._give_back()

    def __enter__(self):
        self._check_live()
        return self

    def __exit__(self, *exc):
        if self.state == _LIVE:
            self.release()

    def __len__(self):
        return self.nbytes

    @property
    def nbytes(self):
        return self.nbytes

    @property
    def capacity(self):
        """Bytes of the buffer's size class."""
        return self.pool.cls[self.size_class].nbytes

    @property
    def released(self):
        return self.state != _LIVE

    @property
    def address(self):
        """The buffer's address (0 once released)."""
        return <size_t>self.data if self.state == _LIVE else 0

    def __repr__(self):
        state = "released" if self.state != _LIVE else f"{self.nbytes} bytes"
        return f"<ruvpy.PooledBuffer {state}, class {self.pool.cls[self.size_class].nbytes}>"


cdef class BufferPool:
    """BufferPool(max_buffers_per_class=32, *, size_classes=None): reusable 64-byte aligned
    buffers in size classes (SIZE_CLASSES by default: 1, 4, 16, 64, 256 KiB). acquire(nbytes)
    takes the smallest class that fits (a free one if any: a hit; else a new allocation: a
    miss). A buffer given back to a class already holding its limit of free ones is freed (a
    drop). size_classes: ascending buffer sizes (rounded up to 64 bytes), each an int or an
    (nbytes, max_free_buffers) pair (an int keeps max_buffers_per_class), at most MAX_CLASSES
    (72: the defaults and a class for each size a two-tier cache's cold groups can have).
    Thread-safe: one C mutex per class, taken with the GIL released."""

    SIZE_CLASSES = _SIZE_CLASSES
    MAX_CLASSES = RV_POOL_MAX_CLASSES

    def __cinit__(self, max_buffers_per_class=32, *, size_classes=None):
        cdef size_t limit = RV_POOL_MAX_BUFFERS_PER_CLASS
        cdef size_t nbytes[RV_POOL_MAX_CLASSES]
        cdef size_t limits[RV_POOL_MAX_CLASSES]
        cdef int n = 0
        default = _count_arg(max_buffers_per_class, "max_buffers_per_class")
        if default > limit:
            raise ValueError(f"max_buffers_per_class must be <= {limit}, got {default}")
        if size_classes is None:
            self.pool = rv_pool_create(default)
        else:
            classes = list(size_classes)
            if not 1 <= len(classes) <= RV_POOL_MAX_CLASSES:
                raise ValueError(f"size_classes must list 1 to {RV_POOL_MAX_CLASSES} classes, "
                                 f"got {len(classes)}")
            previous = 0
            for entry in classes:
                size, most = entry if isinstance(entry, tuple) else (entry, default)
                size = _count_arg(size, "a size class")
                most = _count_arg(most, "a size class's max_buffers")
                rounded = (size + RV_ALIGN - 1) // RV_ALIGN * RV_ALIGN
                if size == 0 or rounded <= previous or rounded > PY_SSIZE_T_MAX // 2:
                    raise ValueError(f"size_classes must be ascending positive byte counts "
                                     f"(distinct after rounding up to {RV_ALIGN}), got {size_classes!r}")
                if most > limit:
                    raise ValueError(f"a size class keeps at most {limit} free buffers, got {most}")
                nbytes[n] = rounded
                limits[n] = most
                previous = rounded
                n += 1
            self.pool = rv_pool_create_classes(nbytes, limits, n)
        if self.pool == NULL:
            raise MemoryError("cannot allocate the buffer pool")

    def __dealloc__(self):
        # Buffers hold a reference to their pool: none is out when this runs.
        rv_pool_destroy(self.pool)

    @cython.binding(False)
    def acquire(self, nbytes):
        """A PooledBuffer of nbytes (<= 256 KiB) from the smallest size class that fits."""
        cdef Py_ssize_t n = _long_as_ssize(nbytes) if PyLong_CheckExact(nbytes) else -1
        cdef int c
        if n < 0:
            PyErr_Clear()
            n = min(_count_arg(nbytes, "nbytes"), PY_SSIZE_T_MAX)
        c = rv_pool_class_for(self.pool, n)
        if c < 0:
            raise ValueError(f"cannot pool {nbytes} bytes: the largest size class is "
                             f"{self.pool.cls[self.pool.nclasses - 1].nbytes} bytes")
        cdef PooledBuffer buf = PooledBuffer.__new__(PooledBuffer)
        cdef void *data
        with nogil:
            data = rv_pool_acquire(self.pool, c)
        if data == NULL:
            raise MemoryError(f"cannot allocate a {self.pool.cls[c].nbytes}-byte pool buffer")
        buf.data = <unsigned char *>data
        buf.nbytes = n
        buf.size_class = c
        buf.pool = self.pool
        buf.owner = <PyObject *>self
        _incref(buf.owner)
        buf.state = _LIVE
        return buf

    def prewarm(self, size_class, count):
        """Allocate up to `count` buffers of `size_class` (one of size_classes) onto its free
        list, never beyond its limit. Returns how many were added."""
        cdef size_t added = 0, want
        cdef int status
        classes = self.size_classes
        if _count_arg(size_class, "size_class") not in classes:
            raise ValueError(f"size_class must be one of {classes}, got {size_class!r}")
        cdef int c = classes.index(size_class)
        want = min(_count_arg(count, "count"), RV_POOL_MAX_BUFFERS_PER_CLASS)
        with nogil:
            status = rv_pool_prewarm(self.pool, c, want, &added)
        if status != 0:
            raise MemoryError(f"cannot allocate {classes[c]}-byte buffers "
                              f"(added {added} before running out)")
        return added

    @property
    def size_classes(self):
        """This pool's buffer sizes, ascending."""
        return tuple([self.pool.cls[i].nbytes for i in range(self.pool.nclasses)])

    @property
    def metadata_bytes(self):
        """Bytes the pool itself takes (its struct and the classes' free lists)."""
        return rv_pool_meta_bytes(self.pool)

    @property
    def class_limits(self):
        """Free buffers each class keeps at most."""
        return tuple([self.pool.cls[i].max_buffers for i in range(self.pool.nclasses)])

    def clear(self):
        """Free every buffer on the free lists (buffers handed out are unaffected)."""
        with nogil:
            rv_pool_clear(self.pool)

    def stats(self):
        cdef rv_pool_stats s
        with nogil:
            rv_pool_get_stats(self.pool, &s)
        return PoolStats(s.hits, s.misses, s.allocations, s.returns, s.drops, s.pooled_bytes,
                         s.outstanding_bytes,
                         tuple([s.free_buffers[i] for i in range(self.pool.nclasses)]))

    @property
    def max_buffers_per_class(self):
        return self.pool.max_buffers

    def __repr__(self):
        s = self.stats()
        return (f"<ruvpy.BufferPool {s.pooled_bytes} bytes pooled, {s.outstanding_bytes} out, "
                f"hit rate {s.hit_rate:.2f}>")


cdef void *pool_acquire(BufferPool pool, size_t nbytes) noexcept nogil:
    cdef int c = rv_pool_class_for(pool.pool, nbytes)
    return rv_pool_acquire(pool.pool, c) if c >= 0 else NULL


cdef void pool_release(BufferPool pool, void *buffer, size_t nbytes) noexcept nogil:
    rv_pool_release(pool.pool, rv_pool_class_for(pool.pool, nbytes), buffer)


def _hammer_pool(BufferPool pool not None, int threads, int iterations):
    """Test hook: `threads` OpenMP threads each take two buffers, tag them, check the tags and
    give them back, `iterations` times, entirely without the GIL (the most concurrency the
    pool can see). Returns how many tags were found overwritten by another thread."""
    cdef int t, i, c, clobbered = 0
    cdef int64_t *first
    cdef int64_t *second
    if threads < 1 or iterations < 0:
        raise ValueError("threads must be >= 1 and iterations >= 0")
    if team_check(threads) != 0:      # the workers cannot be started: MemoryError, not an exit
        raise_team_error("_hammer_pool")
    with nogil:
        for t in prange(threads, num_threads=threads, schedule="static", chunksize=1):
            for i in range(iterations):
                c = (i + t) % pool.pool.nclasses
                first = <int64_t *>rv_pool_acquire(pool.pool, c)
                second = <int64_t *>rv_pool_acquire(pool.pool, (c + 1) % pool.pool.nclasses)
                if first == NULL or second == NULL:   # out of memory: counted as a failure
                    clobbered += 1
                    if first != NULL:
                        rv_pool_release(pool.pool, c, first)
                    if second != NULL:
                        rv_pool_release(pool.pool, (c + 1) % pool.pool.nclasses, second)
                    continue
                first[0] = t
                first[1] = i
                second[0] = -t
                second[1] = -i
                if first[0] != t or first[1] != i or second[0] != -t or second[1] != -i:
                    clobbered += 1
                rv_pool_release(pool.pool, c, first)
                rv_pool_release(pool.pool, (c + 1) % pool.pool.nclasses, second)
    return clobbered


# ---------------------------------------------------------------------------------------
# scratch
# ---------------------------------------------------------------------------------------

cdef class ScratchSpace:
    """ScratchSpace(bytes_per_thread, max_threads=None, *, shared_bytes=0): one zeroed,
    64-byte aligned region of bytes_per_thread per thread (max_threads None: OpenMP's maximum
    thread count), regions never sharing a cache line, and (shared_bytes > 0) one region all
    threads read, before them. Kernels take theirs with `thread_ptr(omp_get_thread_num())`
    (see _memory.pxd) and C drivers the whole as an rv_scratch (`view`); Python gets views
    with get(thread_index, dtype)."""

    def __cinit__(self, bytes_per_thread, max_threads=None, *, shared_bytes=0):
        per_thread = _count_arg(bytes_per_thread, "bytes_per_thread")
        if per_thread == 0:
            raise ValueError("bytes_per_thread must be > 0")
        threads = omp_get_max_threads() if max_threads is None else \
            _count_arg(max_threads, "max_threads")
        if not 1 <= threads <= 1 << 16:
            raise ValueError(f"max_threads must be in [1, 65536], got {threads}")
        shared = _count_arg(shared_bytes, "shared_bytes")
        if per_thread > PY_SSIZE_T_MAX // threads - RV_ALIGN or \
                shared > PY_SSIZE_T_MAX // 2 - per_thread * threads:
            raise MemoryError(f"cannot allocate {per_thread} bytes for each of {threads} threads "
                              f"and {shared} shared bytes")
        stride = (per_thread + RV_ALIGN - 1) // RV_ALIGN * RV_ALIGN
        shared_rounded = (shared + RV_ALIGN - 1) // RV_ALIGN * RV_ALIGN
        self.block = _new_block(shared_rounded + stride * threads, 0)
        self.base = <unsigned char *>self.block.ptr + <size_t>shared_rounded
        self.bytes_per_thread = per_thread
        self.stride = stride
        self.max_threads = threads
        self.shared_bytes = shared
        self.view.shared = <unsigned char *>self.block.ptr if shared else NULL
        self.view.shared_bytes = shared
        self.view.threads = self.base
        self.view.thread_stride = stride
        self.view.thread_bytes = per_thread
        self.view.nthreads = threads

    def fits(self, shared_bytes, bytes_per_thread, threads):
        """Whether a driver needing these bytes on `threads` threads fits in this scratch."""
        return bool(self.shared_bytes >= shared_bytes and self.bytes_per_thread >= bytes_per_thread
                    and self.max_threads >= threads)

    @cython.binding(False)
    def get(self, thread_index, dtype=np.uint8):
        """Thread `thread_index`'s region as a 1-D array of as many `dtype` items as fit."""
        cdef cnp.npy_intp dims[1]
        cdef cnp.dtype descr = _descr_for(dtype)
        t = _count_arg(thread_index, "thread_index")
        if t >= self.max_threads:
            raise ValueError(f"thread_index must be < max_threads={self.max_threads}, got {t}")
        dims[0] = self.bytes_per_thread // descr.itemsize
        cdef PyObject *arr = _new_view(self.thread_ptr(t), 1, dims, descr,
                                       <PyObject *>self.block)
        if arr == NULL:
            _fail()
        return _steal(arr)

    @property
    def nbytes(self):
        """Bytes allocated for all threads and the shared region (padded to 64 bytes each)."""
        return self.block.nbytes

    def __repr__(self):
        shared = f" + {self.shared_bytes} shared" if self.shared_bytes else ""
        return (f"<ruvpy.ScratchSpace {self.max_threads} threads x {self.bytes_per_thread} "
                f"bytes{shared}>")


# ---------------------------------------------------------------------------------------
# memory manager
# ---------------------------------------------------------------------------------------

# MemoryManager.for_model's sizing rule, per decode step, all float32:
ACTIVATION_ROWS = 16   # [batch, hidden] buffers: residual, norms, q/k/v, attention output,
                       # projections and a 4x-wide MLP intermediate (counted as 4 + 4 rows)
LOGIT_ROWS = 2         # [batch, vocab] buffers: logits and probabilities
HEADROOM = 2           # x2 for what a model needs beyond that
SCRATCH_ROWS = 4       # per-thread scratch: 4 hidden-sized float32 rows (>= 4 KiB)


class MemoryStats(namedtuple("MemoryStats", "arena pool scratch_bytes reserved_bytes")):
    """ArenaStats, PoolStats, the scratch bytes, and all bytes the manager holds (arena
    capacity + pooled + outstanding pool bytes + scratch)."""
    __slots__ = ()


class MemoryManager:
    """An arena for one decode step's temporaries, a buffer pool and per-thread scratch.

    MemoryManager(arena_bytes, scratch_bytes_per_thread, *, max_threads=None,
    pool_buffers_per_class=32, debug=False); usually MemoryManager.for_model(...).
    Call reset_step() between steps."""

    def __init__(self, arena_bytes, scratch_bytes_per_thread, *, max_threads=None,
                 pool_buffers_per_class=32, debug=False):
        self.arena = Arena(arena_bytes, debug=debug)
        self.pool = BufferPool(pool_buffers_per_class)
        self.scratch = ScratchSpace(scratch_bytes_per_thread, max_threads)

    @staticmethod
    def arena_bytes_for(hidden_dim, vocab_size, batch_size):
        """HEADROOM x (ACTIVATION_ROWS [batch, hidden] + LOGIT_ROWS [batch, vocab] float32
        buffers, each with 64 bytes of alignment slack)."""
        hidden = _positive(hidden_dim, "hidden_dim")
        vocab = _positive(vocab_size, "vocab_size")
        batch = _positive(batch_size, "batch_size")
        buffers = ACTIVATION_ROWS * (batch * hidden * 4 + RV_ALIGN) + \
            LOGIT_ROWS * (batch * vocab * 4 + RV_ALIGN)
        return HEADROOM * buffers

    @staticmethod
    def scratch_bytes_for(hidden_dim):
        return max(SCRATCH_ROWS * _positive(hidden_dim, "hidden_dim") * 4, 4096)

    @classmethod
    def for_model(cls, hidden_dim, vocab_size, batch_size, **kwargs):
        """A manager sized for a model (see arena_bytes_for / scratch_bytes_for); keyword
        arguments go to the constructor."""
        return cls(cls.arena_bytes_for(hidden_dim, vocab_size, batch_size),
                   cls.scratch_bytes_for(hidden_dim), **kwargs)

    def reset_step(self):
        """Start a new step: the arena's memory is all available again (O(1))."""
        self.arena.reset()

    def stats(self):
        arena = self.arena.stats()
        pool = self.pool.stats()
        scratch = self.scratch.nbytes
        return MemoryStats(arena, pool, scratch, arena.capacity + pool.pooled_bytes +
                           pool.outstanding_bytes + scratch)

    def close(self):
        self.arena.close()
        self.pool.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<ruvpy.MemoryManager {self.arena!r} {self.pool!r} {self.scratch!r}>"


def _positive(value, name):
    v = _count_arg(value, name)
    if v == 0:
        raise ValueError(f"{name} must be > 0")
    return v
