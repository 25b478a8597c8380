# Mirror of csrc/rv_limits.h: every limit of ruvpy, defined once in C.
cdef extern from "rv_limits.h" nogil:
    enum:
        RV_MAX_HEAD_DIM
        RV_MAX_KV_LEN
        RV_MAX_INT
        RV_MAX_GROUP_TOKENS
        RV_MAX_GROUP_VALUES
        RV_MAX_HOT_TOKENS
        RV_MAX_OUTLIERS
        RV_TURBO_BITS_COUNT
        RV_TURBO_MAX_BITS
