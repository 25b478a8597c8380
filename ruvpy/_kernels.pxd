# What other ruvpy extensions cimport: the active kernel table and the thread count.
# (Cython shares these across extension modules through a capsule, so there is exactly one
# dispatch state per process.)
from ruvpy.c_ops cimport rv_ops

cdef const rv_ops *active_ops() noexcept nogil
cdef int num_threads() noexcept nogil
