# ruvpy._kvcache for Cython users: mirrors of the KV-cache C headers (csrc/kvcache/*.h).
from libc.stdint cimport int32_t, int64_t, uint16_t
from ruvpy.c_ops cimport rv_ops
from ruvpy._memory cimport rv_pool, rv_scratch
from ruvpy._attention cimport rv_kv_query, rv_kv_source, rv_attn_plan

from ruvpy._common cimport RV_OK, RV_ENOMEM, RV_EINVAL, RV_EFULL, RV_ETHREAD

cdef extern from "kvcache/rv_codec.h" nogil:
    enum:
        RV_CODEC_COUNT
    ctypedef struct rv_codec:
        const char *name
    const rv_codec *rv_codecs[3]

cdef extern from "rv_fp16.h" nogil:
    int64_t rv_first_unstorable(const void *src, int64_t n, int src_is_f16, int to_f16)

cdef extern from "kvcache/rv_kvmem.h" nogil:
    size_t rv_kv_mapped_bytes()

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
    size_t rv_paged_create_bytes(int num_layers, int num_kv_heads, int head_dim, int block_size,
                                 int64_t num_blocks, int dtype)
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
    int rv_paged_truncate(rv_paged *c, int slot, int64_t n)
    void rv_paged_source(const rv_paged *c, int layer, int num_heads, rv_kv_source *src)
    void rv_paged_get_stats(const rv_paged *c, rv_paged_stats *st)

cdef extern from "kvcache/rv_twotier.h" nogil:
    enum:
        RV_TT_ROOM_OK
        RV_TT_ROOM_FULL
        RV_TT_ROOM_TOO_MANY
        RV_TT_ROOM_MIXED
        RV_TT_ROOM_TXN_SIDE
        RV_TT_ROOM_NOMEM

    ctypedef struct rv_tt:
        int num_layers, num_kv_heads, head_dim
        int hot_tokens, group_tokens
        int64_t max_tokens
        int64_t *used
        int64_t *stored
        int open_txns
        size_t hot_bytes, cold_bytes, meta_bytes
        size_t cold_pooled_bytes
        size_t cold_slab_bytes
        int64_t cold_groups
        int64_t evicted
        int64_t shared_groups

    ctypedef struct rv_tt_params:
        int num_layers, num_kv_heads, head_dim
        int hot_tokens, group_tokens, group_size, cold
        double turbo_bits
        const double *turbo_widths
        int64_t max_tokens
        int uniform_slabs

    ctypedef struct rv_tt_usage:
        int64_t hot_tokens, cold_tokens
        size_t hot_bytes, cold_bytes

    int rv_tt_create(rv_tt **out, const rv_tt_params *p)
    void rv_tt_destroy(rv_tt *c)
    size_t rv_tt_group_alloc_bytes(const rv_tt_params *p, int most)
    size_t rv_tt_layer_group_alloc_bytes(const rv_tt_params *p, int layer, int most)
    size_t rv_tt_groups_alloc_bytes(const rv_tt_params *p, int most)
    size_t rv_tt_hot_alloc_bytes(const rv_tt_params *p, int64_t tokens)
    size_t rv_tt_fixed_bytes(const rv_tt_params *p)
    size_t rv_tt_cold_store_bytes(const rv_tt_params *p, int slabs)
    int rv_tt_uses_slabs(const rv_tt_params *p)
    size_t rv_tt_slab_mapped_bytes(const rv_tt *c)
    size_t rv_tt_slab_slack_bytes(const rv_tt *c)
    void rv_tt_use_pool(rv_tt *c, rv_pool *pool, int cls)
    int rv_tt_add(rv_tt *c, int *slot)
    int rv_tt_fork(rv_tt *c, int parent, int *child)
    void rv_tt_release(rv_tt *c, int slot)
    int64_t rv_tt_len(const rv_tt *c, int slot, int layer)
    int64_t rv_tt_cold_len(const rv_tt *c, int slot, int layer)
    void rv_tt_evict(rv_tt *c, int slot, int64_t n)
    int64_t rv_tt_used_without(rv_tt *c, int layer, const int *slots, int n)
    int rv_tt_truncate(rv_tt *c, int slot, int64_t n)
    int rv_tt_make_room(rv_tt *c, const int *slots, const int64_t *n, int nseq, int layer,
                        int evict, int *bind)
    int rv_tt_append(rv_tt *c, int slot, int layer, const void *k, const void *v, int64_t n,
                     int src_dtype, const rv_ops *ops)
    int rv_tt_begin(rv_tt *c, int slot)
    void rv_tt_commit(rv_tt *c, int slot, const rv_ops *ops)
    void rv_tt_rollback(rv_tt *c, int slot)
    void rv_tt_read(const rv_tt *c, int slot, int layer, float *k, float *v, const rv_ops *ops)
    void rv_tt_source(const rv_tt *c, int layer, int num_heads, rv_kv_source *src)
    int64_t rv_tt_export_groups(const rv_tt *c, int slot, int layer)
    size_t rv_tt_export_bytes(const rv_tt *c, int slot, int layer)
    void rv_tt_export_layer(const rv_tt *c, int slot, int layer, unsigned char *blobs, int64_t *sizes,
                            int32_t *skip, int32_t *cut, uint16_t *hot_k, uint16_t *hot_v)
    int rv_tt_validate_blob(const rv_tt *c, int layer, const unsigned char *blob, size_t bytes)
    int rv_tt_import_layer(rv_tt *c, int slot, int layer, const unsigned char *blobs,
                           const int64_t *sizes, int64_t ngroups, int32_t skip, int32_t cut,
                           const uint16_t *hot_k, const uint16_t *hot_v, int64_t hot_len,
                           const rv_ops *ops)
    void rv_tt_usage_begin(rv_tt *c)
    void rv_tt_seq_usage(rv_tt *c, int slot, int layer, rv_tt_usage *u)
