/* A GGUF file, memory-mapped read-only and indexed in place: metadata key/values and tensor
 * descriptors point into the mapping; nothing is copied. Every read is bounds-checked against
 * the file size, so a truncated or corrupt file is an error (with a message naming what is
 * wrong), never a read past the mapping. Versions 2 and 3 (little-endian).
 *
 * Tensor data: tensor i occupies nbytes at data + offset; types whose block size is unknown
 * get nbytes 0 and data NULL (the caller decides whether it needs them). */
#ifndef RV_GGUF_H
#define RV_GGUF_H

#include <stddef.h>
#include <stdint.h>

#include "rv_common.h"

#define RV_EIO (-4)            /* open / stat / mmap failed (errno in rv_gguf.sys_errno) */

enum rv_gguf_vtype {           /* metadata value types */
    RV_GGUF_U8 = 0, RV_GGUF_I8 = 1, RV_GGUF_U16 = 2, RV_GGUF_I16 = 3, RV_GGUF_U32 = 4,
    RV_GGUF_I32 = 5, RV_GGUF_F32 = 6, RV_GGUF_BOOL = 7, RV_GGUF_STRING = 8, RV_GGUF_ARRAY = 9,
    RV_GGUF_U64 = 10, RV_GGUF_I64 = 11, RV_GGUF_F64 = 12, RV_GGUF_VTYPE_COUNT = 13
};

#define RV_GGUF_MAX_DIMS 4

typedef struct rv_gguf_kv {
    const char *key;           /* not NUL-terminated: key_len bytes */
    uint64_t key_len;
    uint32_t type;             /* enum rv_gguf_vtype */
    uint32_t elem_type;        /* arrays: the element type; otherwise = type */
    uint64_t count;            /* arrays: elements; otherwise 1 */
    const uint8_t *value;      /* the value (strings: the u64 length, then bytes; arrays: the
                                  first element) */
    uint64_t value_bytes;      /* bytes of the value (arrays: of all elements) */
} rv_gguf_kv;

typedef struct rv_gguf_tensor {
    const char *name;
    uint64_t name_len;
    uint32_t n_dims;
    uint64_t dims[RV_GGUF_MAX_DIMS];   /* ne0 (contiguous) first; unused dims are 1 */
    uint32_t type;             /* ggml type id */
    uint64_t offset;           /* from the start of the data section */
    uint64_t nbytes;           /* 0 if the type's block size is unknown */
    const uint8_t *data;       /* NULL if the type is unknown */
} rv_gguf_tensor;

typedef struct rv_gguf {
    void *map;                 /* the whole file, PROT_READ */
    size_t size;
    uint32_t version;
    uint64_t n_kv, n_tensors;
    rv_gguf_kv *kv;
    rv_gguf_tensor *tensors;
    uint64_t alignment;
    uint64_t data_offset;      /* start of the tensor data section */
    int sys_errno;
    char error[320];           /* what was wrong, when open failed */
} rv_gguf;

/* Maps and indexes `path`. RV_OK; RV_EIO (open/mmap: g->sys_errno), RV_EINVAL (not a GGUF file
 * or malformed: g->error says where), RV_ENOMEM. On failure nothing stays mapped or allocated.
 * populate: ask the kernel to read the file in now (MAP_POPULATE), as llama.cpp does. */
int rv_gguf_open(rv_gguf *g, const char *path, int populate);
void rv_gguf_close(rv_gguf *g);

/* Bytes of [p, p + n) (inside the mapping) resident in memory now (mincore); -1 on error. */
int64_t rv_gguf_resident_bytes(const rv_gguf *g, const void *p, size_t n);

/* Values and bytes per block of ggml type `type` (any type ggml defines), 0 if unknown. */
int rv_ggml_type_block(uint32_t type, uint64_t *values, uint64_t *bytes);
const char *rv_ggml_type_name(uint32_t type);   /* "Q4_K", ...; NULL if unknown */

#endif
