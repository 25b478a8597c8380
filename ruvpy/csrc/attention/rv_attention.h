/* Functional attention over contiguous (strided) NHD tensors: the ISA-independent driver of
 * ruvpy.attention. It schedules (kv head, query tile, context split) work items over OpenMP
 * threads and calls the active kernel table: attend_spans_* when a KV head's query rows are few
 * (decode), attend_rows_* (tiled flash attention) otherwise; splits are merged at the end.
 * Scratch lives in a per-calling-thread buffer that grows to the largest call and is reused, so
 * the steady state allocates nothing; several threads may call at once. */
#ifndef RV_ATTENTION_H
#define RV_ATTENTION_H

#include <stddef.h>
#include <stdint.h>

#include "rv_common.h"
#include "kernels/rv_ops.h"

/* Strides are in elements; the last (head_dim) axis of every tensor is contiguous. */
typedef struct rv_attn_args {
    const float *q;         /* [q_len, num_heads, head_dim] */
    ptrdiff_t q_tok, q_head;
    const void *k;          /* [kv_len, num_kv_heads, head_dim], float or binary16 */
    ptrdiff_t k_tok, k_head;
    const void *v;
    ptrdiff_t v_tok, v_head;
    float *out;             /* [q_len, num_heads, head_dim] */
    ptrdiff_t o_tok, o_head;
    int q_len, kv_len, num_heads, num_kv_heads, head_dim;
    int kv_f16;             /* K and V are binary16 */
    int causal;             /* query i sits at kv_len - q_len + i and sees keys 0..that */
    float scale;
} rv_attn_args;

/* RV_OK, RV_EINVAL (inconsistent arguments) or RV_ENOMEM (scratch). */
int rv_attention(const rv_ops *ops, int nthreads, const rv_attn_args *a);

/* Threads rv_attention uses for a (its shape fields only) when given nthreads: fewer, down to
 * 1, when the work is too small to pay for a parallel region (rv_threads.h). */
int rv_attention_threads(int nthreads, const rv_attn_args *a);

/* Frees the calling thread's cached scratch (it is also freed when the thread exits). */
void rv_attention_release_scratch(void);

/* Bytes of scratch the calling thread holds now. */
size_t rv_attention_scratch_bytes(void);

/* Reads `bytes` of buf with nthreads threads (each a contiguous share) and returns a checksum;
 * time it to measure the machine's read bandwidth. */
uint64_t rv_stream_read(const void *buf, size_t bytes, int nthreads);

#endif
