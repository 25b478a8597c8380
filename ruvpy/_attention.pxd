# Mirror of csrc/attention/rv_attention.h: the attention scheduler (every attention call:
# contiguous tensors here, the caches' blocks and tiers in ruvpy._kvcache).
cimport numpy as cnp
from libc.stdint cimport int64_t, uint64_t
from ruvpy.c_ops cimport rv_ops, rv_attn_state
from ruvpy._memory cimport rv_scratch

cdef extern from "attention/rv_attention.h" nogil:
    enum:
        RV_STREAM_MAX_ROWS
        RV_MIN_SPLIT_KEYS

    ctypedef struct rv_kv_query:
        int seq
        int q_len
        int64_t kv_len
        const float *q
        ptrdiff_t q_tok, q_head
        float *out
        ptrdiff_t o_tok, o_head

    ctypedef struct rv_kv_source:
        const void *data
        int layer
        int num_heads, num_kv_heads, head_dim
        int kv_elem_bytes
        int split_align

    ctypedef struct rv_attn_plan:
        int nthreads
        int64_t ntasks
        size_t shared_bytes
        size_t thread_bytes

    int rv_attn_plan_make(rv_attn_plan *plan, const rv_kv_source *src, const rv_kv_query *queries,
                          int nq, int causal, int nthreads)
    int rv_attn_run(const rv_attn_plan *plan, const rv_kv_source *src, const rv_kv_query *queries,
                    int nq, float scale, int causal, const rv_ops *ops, const rv_scratch *scratch)
    int rv_attn_reserve(const rv_attn_plan *plan)
    int rv_kv_attend(const rv_kv_source *src, const rv_kv_query *queries, int nq, float scale,
                     int causal, const rv_ops *ops, int nthreads, const rv_scratch *scratch)

    ctypedef struct rv_attn_args:
        const float *q
        ptrdiff_t q_tok, q_head
        const void *k
        ptrdiff_t k_tok, k_head
        const void *v
        ptrdiff_t v_tok, v_head
        float *out
        ptrdiff_t o_tok, o_head
        int q_len, kv_len, num_heads, num_kv_heads, head_dim
        int kv_f16
        int causal
        float scale

    int rv_attention(const rv_ops *ops, int nthreads, const rv_attn_args *a, const rv_scratch *scratch)
    int rv_attention_threads(int nthreads, const rv_attn_args *a)
    void rv_attention_release_scratch()
    size_t rv_attention_scratch_bytes()
    int rv_stream_read(const void *buf, size_t bytes, int nthreads, uint64_t *sum)

# argument conversions shared with ruvpy._kvcache (scalars are converted before any array is
# looked at: their conversions may run Python code)
cdef int thread_count(object threads) except -1
cdef float softmax_scale(object scale, int head_dim) except? -1

# array helpers shared with ruvpy._kvcache
cdef ptrdiff_t elem_stride(cnp.ndarray a, int axis) noexcept   # 0 for an axis of length 1
cdef bint overlap(cnp.ndarray a, cnp.ndarray b) noexcept         # the bytes they touch overlap
