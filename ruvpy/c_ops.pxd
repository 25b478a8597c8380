# Mirror of csrc/kernels/rv_ops.h: the per-ISA kernel table (and kernels/rv_wmat.h, which it
# includes: GGUF block formats and the matmuls' Q8 activations).
from libc.stdint cimport int8_t, uint8_t, uint16_t

cdef extern from "kernels/rv_wmat.h" nogil:
    enum:
        RV_WT_F32, RV_WT_F16, RV_WT_Q4_0, RV_WT_Q4_1, RV_WT_Q8_0, RV_WT_Q4_K, RV_WT_Q5_K,
        RV_WT_Q6_K, RV_WT_BF16, RV_WT_MAX_ID
        RV_WMM_PANEL
    int rv_wtype_block_values(int type)
    int rv_wtype_block_bytes(int type)
    int rv_wtype_is_float(int type)

    ctypedef struct rv_wmat:
        const uint8_t *data
        int type, rows, cols
        size_t row_bytes

    ctypedef struct rv_qact:
        int n, k
        const float *x
        ptrdiff_t x_stride
        int8_t *q
        float *d
        float *s32
        float *s16
        int8_t *q4
        float *ds

    size_t RV_QACT_BYTES(int n, int k)
    size_t RV_WMATMUL_SCRATCH_BYTES(int k)
    void rv_qact_bind(rv_qact *a, void *buf, int n, int k)

cdef extern from "kernels/rv_ops.h" nogil:
    enum:
        RV_ATTN_CHUNK
    size_t RV_ATTN_SCRATCH_FLOATS(int rows, int head_dim)

    ctypedef struct rv_attn_state:
        int rows
        int head_dim
        const float *q
        ptrdiff_t q_stride
        float *m
        float *l
        float *acc
        float *scratch

    ctypedef struct rv_kv_span:
        const void *k
        const void *v
        ptrdiff_t k_stride
        ptrdiff_t v_stride
        int n

    enum:
        RV_ATTN_TILE_ROWS
        RV_ATTN_TILE_KEYS
    size_t RV_ATTN_TILE_SCRATCH_FLOATS(int head_dim)

    ctypedef struct rv_attn_rows:
        int rows
        int head_dim
        float scale
        const float *const *q
        float *const *out
        const int *visible
        const rv_kv_span *spans
        int nspans
        float *m_out
        float *l_out

    ctypedef struct rv_qhead "struct rv_qhead":
        pass
    ctypedef struct rv_thead "struct rv_thead":
        pass

    ctypedef struct rv_ops:
        const char *isa
        int lanes
        float (*dot_f32)(const float *a, const float *b, size_t n) noexcept nogil
        void (*axpy_f32)(size_t n, float alpha, const float *x, float *y) noexcept nogil
        void (*scale_f32)(size_t n, float alpha, float *x) noexcept nogil
        float (*max_f32)(const float *x, size_t n) noexcept nogil
        float (*sum_exp_f32)(const float *x, float shift, float *out, size_t n) noexcept nogil
        void (*f32_to_f16)(const float *src, uint16_t *dst, size_t n) noexcept nogil
        void (*f16_to_f32)(const uint16_t *src, float *dst, size_t n) noexcept nogil
        void (*attend_chunk_f32)(rv_attn_state *st, const float *k, ptrdiff_t k_stride,
                                 const float *v, ptrdiff_t v_stride, int n, const int *visible) noexcept nogil
        void (*attend_chunk_f16)(rv_attn_state *st, const uint16_t *k, ptrdiff_t k_stride,
                                 const uint16_t *v, ptrdiff_t v_stride, int n, const int *visible) noexcept nogil
        void (*attn_merge)(int rows, int head_dim, float *m, float *l, float *acc,
                           const float *m_other, const float *l_other, const float *acc_other) noexcept nogil
        void (*attn_finalize)(int rows, int head_dim, const float *l, const float *acc,
                              float *out, ptrdiff_t out_stride) noexcept nogil
        void (*attend_spans_f32)(rv_attn_state *st, const rv_kv_span *spans, int nspans,
                                 const int *visible) noexcept nogil
        void (*attend_spans_f16)(rv_attn_state *st, const rv_kv_span *spans, int nspans,
                                 const int *visible) noexcept nogil
        void (*attend_rows_f32)(const rv_attn_rows *job, float *scratch) noexcept nogil
        void (*attend_rows_f16)(const rv_attn_rows *job, float *scratch) noexcept nogil
        void (*dequant_rows_channel)(const uint8_t *codes, ptrdiff_t row_bytes, int n, int d, int bits,
                                     const float *scale, const float *zero, float *out) noexcept nogil
        void (*dequant_rows_group)(const uint8_t *codes, ptrdiff_t row_bytes, int n, int d, int bits,
                                   int group, const uint16_t *scale, const uint16_t *zero,
                                   ptrdiff_t param_stride, float *out) noexcept nogil
        void (*attend_heads_f32)(rv_attn_state *states, int num_heads, const rv_kv_span *spans,
                                 int nspans, ptrdiff_t k_head, ptrdiff_t v_head,
                                 const int *visible) noexcept nogil
        void (*attend_heads_f16)(rv_attn_state *states, int num_heads, const rv_kv_span *spans,
                                 int nspans, ptrdiff_t k_head, ptrdiff_t v_head,
                                 const int *visible) noexcept nogil
        void (*attend_qgroup)(rv_attn_state *st, const rv_qhead *h, int a, int n,
                              const int *visible, float *scratch) noexcept nogil
        void (*attend_tgroup)(rv_attn_state *st, const rv_thead *h, int a, int n,
                              const int *visible, float *scratch) noexcept nogil
        void (*quantize_act)(rv_qact *a, int c0, int c1) noexcept nogil
        void (*wmatmul)(const rv_wmat *w, int r0, int r1, const rv_qact *a, float *y, ptrdiff_t ldy,
                        int accumulate, void *scratch) noexcept nogil
        void (*wrow_f32)(const rv_wmat *w, int row, float *out) noexcept nogil
        void (*rmsnorm_f32)(const float *x, const float *gain, float eps, float *out, int n) noexcept nogil
        void (*rope_pairs_f32)(float *x, int vectors, int dim, const float *cos, const float *sin) noexcept nogil
        void (*swiglu_f32)(const float *gate, const float *up, float *out, int n) noexcept nogil

    enum:
        RV_ISA_COUNT

    # Only ruvpy._kernels links these; other modules use the cdef functions of _kernels.pxd.
    int rv_isa_supported(int isa)
    int rv_isa_built(int isa)
    const char *rv_isa_name(int isa)
    int rv_isa_from_name(const char *name)
    int rv_best_isa()
    const rv_ops *rv_ops_for(int isa)
    int rv_set_active_isa(int isa)
    const rv_ops *rv_active_ops()
    void rv_set_num_threads(int n)
    int rv_get_num_threads()
