# Mirror of csrc/attention/rv_attention.h (the functional attention driver).
from libc.stdint cimport uint64_t
from ruvpy.c_ops cimport rv_ops

cdef extern from "attention/rv_attention.h" nogil:
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

    int rv_attention(const rv_ops *ops, int nthreads, const rv_attn_args *a)
    int rv_attention_threads(int nthreads, const rv_attn_args *a)
    void rv_attention_release_scratch()
    size_t rv_attention_scratch_bytes()
    uint64_t rv_stream_read(const void *buf, size_t nbytes, int nthreads)
