# Mirror of csrc/gguf/rv_gguf.h (memory-mapped GGUF files).
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t

cdef extern from "gguf/rv_gguf.h" nogil:
    enum:
        RV_EIO
        RV_GGUF_U8, RV_GGUF_I8, RV_GGUF_U16, RV_GGUF_I16, RV_GGUF_U32, RV_GGUF_I32, RV_GGUF_F32
        RV_GGUF_BOOL, RV_GGUF_STRING, RV_GGUF_ARRAY, RV_GGUF_U64, RV_GGUF_I64, RV_GGUF_F64
        RV_GGUF_MAX_DIMS
    ctypedef struct rv_gguf_kv:
        const char *key
        uint64_t key_len
        uint32_t type
        uint32_t elem_type
        uint64_t count
        const uint8_t *value
        uint64_t value_bytes
    ctypedef struct rv_gguf_tensor:
        const char *name
        uint64_t name_len
        uint32_t n_dims
        uint64_t dims[4]
        uint32_t type
        uint64_t offset
        uint64_t nbytes
        const uint8_t *data
    ctypedef struct rv_gguf:
        void *map
        size_t size
        uint32_t version
        uint64_t n_kv, n_tensors
        rv_gguf_kv *kv
        rv_gguf_tensor *tensors
        uint64_t alignment
        uint64_t data_offset
        int sys_errno
        char error[320]
    int rv_gguf_open(rv_gguf *g, const char *path, int populate)
    void rv_gguf_close(rv_gguf *g)
    int64_t rv_gguf_resident_bytes(const rv_gguf *g, const void *p, size_t n)
    int rv_ggml_type_block(uint32_t type, uint64_t *values, uint64_t *bytes)
    const char *rv_ggml_type_name(uint32_t type)
