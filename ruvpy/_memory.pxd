# ruvpy._memory for Cython users: the C layer (csrc/memory/rv_memory.h) and the classes'
# C-level state, so kernels can take arena memory, pool buffers and per-thread scratch
# without the GIL. Python users see the same objects through ruvpy.Arena & co.
from cpython.object cimport PyObject
from libc.stdint cimport uint64_t

# Only the header's types and inline functions are declared here: rv_pool.c is linked into
# ruvpy._memory alone, so other extensions reach the pool through the cdef functions below
# (shared by Cython across modules).
cdef extern from "memory/rv_memory.h" nogil:
    enum:
        RV_ALIGN
        RV_POISON_BYTE
        RV_POOL_CLASSES
        RV_POOL_MAX_CLASSES
    size_t rv_align_up(size_t n)
    bint rv_mul_size(size_t a, size_t b, size_t *out)

    ctypedef struct rv_arena:
        unsigned char *base
        size_t capacity
        size_t offset
        size_t high_water
        size_t allocation_count
        size_t reset_count
        int debug
    void *rv_arena_bump(rv_arena *a, size_t nbytes)
    void rv_arena_reset(rv_arena *a)

    ctypedef struct rv_pool_class:
        size_t nbytes
        size_t max_buffers

    ctypedef struct rv_pool:
        int nclasses
        size_t max_buffers
        rv_pool_class cls[1]        # nclasses of them (a flexible array member in C)

    # a driver's work memory: one shared region, one region per thread
    ctypedef struct rv_scratch:
        unsigned char *shared
        size_t shared_bytes
        unsigned char *threads
        size_t thread_stride
        size_t thread_bytes
        int nthreads
    bint rv_scratch_fits(const rv_scratch *s, size_t shared, size_t per_thread, int nthreads)


# A 64-byte aligned buffer of at least nbytes from the pool's smallest fitting class, or NULL
# (nbytes above its largest class, or out of memory); give it back with the same nbytes.
cdef void *pool_acquire(BufferPool pool, size_t nbytes) noexcept nogil
cdef void pool_release(BufferPool pool, void *buffer, size_t nbytes) noexcept nogil


cdef class _Block:
    """One 64-byte aligned block; freed when the last holder (arena, scratch or a numpy
    array using it as its base) lets go."""
    cdef void *ptr
    cdef size_t nbytes


cdef class Arena:
    cdef rv_arena state
    cdef _Block block          # None once closed
    cdef int _check_open(self) except -1

    # Raw arena memory for C code (nbytes rounded up to 64 bytes): NULL when closed or full.
    # Valid until the next reset; the caller must hold a reference to the arena.
    cdef inline void *bump(self, size_t nbytes) noexcept nogil:
        if self.state.base == NULL:
            return NULL
        return rv_arena_bump(&self.state, nbytes)


cdef class BufferPool:
    cdef rv_pool *pool


cdef class PooledBuffer:
    cdef PyObject *owner       # the BufferPool (strong reference, managed by hand)
    cdef rv_pool *pool
    cdef unsigned char *data
    cdef Py_ssize_t nbytes
    cdef int size_class
    cdef int exports           # live views (arrays over it, through their _PoolView base)
    cdef int state             # _RELEASED, _LIVE or _RELEASE_PENDING (see _memory.pyx)
    cdef void _give_back(self) noexcept
    cdef int _check_live(self) except -1
    cdef void _end_export(self) noexcept


cdef class ScratchSpace:
    cdef _Block block
    cdef unsigned char *base                    # thread 0's region
    cdef readonly Py_ssize_t bytes_per_thread
    cdef readonly Py_ssize_t stride            # bytes between threads' regions (64-aligned)
    cdef readonly int max_threads
    cdef readonly Py_ssize_t shared_bytes      # the region every thread reads (before thread 0's)
    cdef rv_scratch view                        # all of it, for C drivers

    # Thread `thread`'s region (bytes_per_thread bytes, 64-byte aligned; threads never share
    # a cache line), or NULL when thread is outside [0, max_threads).
    cdef inline void *thread_ptr(self, int thread) noexcept nogil:
        if thread < 0 or thread >= self.max_threads:
            return NULL
        return self.base + <size_t>thread * <size_t>self.stride

