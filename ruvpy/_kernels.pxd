# What other ruvpy extensions cimport: the active kernel table, the thread count and the
# check before a parallel region (csrc/rv_threads.h).
# (Cython shares these across extension modules through a capsule, so there is exactly one
# dispatch state per process.)
from ruvpy.c_ops cimport rv_ops

cdef const rv_ops *active_ops() noexcept nogil
cdef int num_threads() noexcept nogil
cdef int team_check(int nthreads) noexcept nogil
cdef int team_precheck(int nthreads) noexcept nogil
cdef int raise_team_error(str what) except -1
