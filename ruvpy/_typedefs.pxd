# Fixed-width types shared by every ruvpy Cython module (one place, like scikit-learn's).
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

ctypedef float float32_t
ctypedef double float64_t
ctypedef uint16_t float16_bits_t     # IEEE binary16 stored as its bit pattern
ctypedef Py_ssize_t intp_t
