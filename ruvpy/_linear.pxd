# Mirror of csrc/linear/rv_linear.h (the GGUF block matmul drivers).
from libc.stdint cimport int64_t
from ruvpy.c_ops cimport rv_ops, rv_wmat

cdef extern from "linear/rv_linear.h" nogil:
    ctypedef struct rv_linear_out:
        const rv_wmat *w
        float *y
        ptrdiff_t ldy
        int accumulate

    size_t rv_linear_work_bytes(int n, int k, int nthreads)
    int rv_linear(const rv_ops *ops, int nthreads, const float *x, ptrdiff_t x_stride, int n, int k,
                  const rv_linear_out *outs, int nouts, void *work, size_t work_bytes)
    int rv_linear_team(const rv_ops *ops, int team, const float *x, ptrdiff_t x_stride, int n, int k,
                       const rv_linear_out *outs, int nouts, void *work, size_t work_bytes)

    ctypedef struct rv_block_dims:
        int hidden, heads, kv_heads, head_dim, ffn
        float eps

    ctypedef struct rv_block_weights:
        rv_wmat q, k, v, o, gate, up, down
        const float *attn_norm
        const float *ffn_norm

    ctypedef struct rv_block_head:
        rv_wmat out
        const float *norm
        float *logits
        ptrdiff_t ld
        int first

    ctypedef struct rv_block_step:
        int n
        float *x
        const float *attn
        float *q
        float *k
        float *v
        const float *rope_cos
        const float *rope_sin
        void *work
        size_t work_bytes

    size_t rv_block_work_bytes(const rv_block_dims *dims, int n, int nthreads)
    int rv_block_between(const rv_ops *ops, int nthreads, const rv_block_dims *dims,
                         const rv_block_weights *prev, const rv_block_weights *next,
                         const rv_block_head *head, const rv_block_step *s)
    void rv_rope_angles(const int64_t *positions, int n, int dim, double base, float *cos, float *sin)
    void *rv_linear_thread_work(size_t bytes)
    void rv_linear_release_work()
    int rv_block_threads(int nthreads, const rv_block_dims *dims, const rv_block_weights *prev,
                         const rv_block_weights *next, const rv_block_head *head, int n)
