# Mirror of csrc/rv_common.h for the Cython layers: the status codes every C function returns.
cdef extern from "rv_common.h" nogil:
    enum:
        RV_OK
        RV_ENOMEM
        RV_EINVAL
        RV_EFULL
        RV_ETHREAD
