# ruvpy._kvcache for Cython users: mirrors of the KV-cache C headers (csrc/kvcache/*.h).
from libc.stdint cimport int32_t, int64_t
from ruvpy.c_ops cimport rv_ops

cdef extern from "rv_common.h" nogil:
    enum:
        RV_OK
        RV_ENOMEM
        RV_EINVAL
        RV_EFULL

cdef extern from "kvcache/rv_kvattn.h" nogil:
    ctypedef struct rv_kv_query:
        int seq
        int q_len
        int64_t kv_len
        const float *q
        float *out

cdef extern from "kvcache/rv_paged.h" nogil:
    enum:
        RV_KV_F32
        RV_KV_F16

    ctypedef struct rv_paged_seq:
        int live
        int32_t *blocks
        int64_t nblocks
        int64_t *ntok
        int in_txn

    ctypedef struct rv_paged:
        int num_layers, num_kv_heads, head_dim, block_size, dtype
        size_t elem
        size_t block_bytes
        int32_t num_blocks
        int32_t *refcount
        int32_t nfree
        rv_paged_seq *seqs
        int open_txns
        size_t meta_bytes
        size_t pool_bytes

    ctypedef struct rv_paged_stats:
        int64_t blocks_used, blocks_shared, blocks_free
        int64_t slots_used
        int64_t tokens_stored

    size_t rv_paged_block_bytes(int num_layers, int num_kv_heads, int head_dim, int block_size,
                                int dtype)
    int rv_paged_create(rv_paged **out, int num_layers, int num_kv_heads, int head_dim,
                        int block_size, int64_t num_blocks, int dtype)
    void rv_paged_destroy(rv_paged *c)
    int rv_paged_add(rv_paged *c, int *slot)
    int rv_paged_fork(rv_paged *c, int parent, int *child)
    void rv_paged_release(rv_paged *c, int slot)
    int64_t rv_paged_blocks_needed(const rv_paged *c, int nseq, const int *slots, const int64_t *n,
                                   int layer)
    int rv_paged_append(rv_paged *c, int slot, int layer, const void *k, const void *v, int64_t n,
                        int src_dtype, const rv_ops *ops)
    void rv_paged_read(const rv_paged *c, int slot, int layer, void *k, void *v, int as_f32,
                       const rv_ops *ops)
    int rv_paged_begin(rv_paged *c, int slot)
    void rv_paged_commit(rv_paged *c, int slot)
    void rv_paged_rollback(rv_paged *c, int slot)
    int rv_paged_attend(const rv_paged *c, int layer, int num_heads, const rv_kv_query *queries,
                        int nq, float scale, int causal, const rv_ops *ops, int nthreads)
    void rv_paged_get_stats(const rv_paged *c, rv_paged_stats *st)
