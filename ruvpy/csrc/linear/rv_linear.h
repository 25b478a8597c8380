/* ISA-independent drivers of the GGUF block matmuls (kernels: qmatmul_impl.h via rv_ops).
 *
 * rv_linear: y_i = W_i x for several matrices that share one input (Q, K and V of a layer; gate
 * and up), in one parallel region: the input is quantized once, the rows of all matrices are
 * cut into chunks that threads take in turn.
 *
 * rv_block_between: everything a pre-norm decoder block (Llama: RMSNorm, attention, RMSNorm,
 * SwiGLU MLP, residuals) computes between two attention calls -- finish block `prev` (output
 * projection + residual, MLP + residual), start block `next` (RMSNorm, Q/K/V, RoPE), or the
 * final RMSNorm and LM head -- in ONE parallel region whose phases are separated by barriers:
 * a decode step of a 30-layer model makes 31 such calls instead of ~300 small ones (each
 * region costs a fork and a join; see rv_threads.h). All memory is the caller's: a work buffer
 * of rv_block_work_bytes() (the step arena) and the outputs.
 *
 * Threads: the team size comes from the weight bytes streamed and the integer multiply-adds
 * (rv_team_size, rv_threads.h); small calls run on the calling thread. */
#ifndef RV_LINEAR_H
#define RV_LINEAR_H

#include <stddef.h>
#include <stdint.h>

#include "rv_common.h"
#include "kernels/rv_ops.h"

/* ---- several matrices, one input ---- */
typedef struct rv_linear_out {
    const rv_wmat *w;
    float *y;            /* y[c * ldy + r]: column (token) c, row r of w */
    ptrdiff_t ldy;
    int accumulate;      /* y += W x instead of y = W x */
} rv_linear_out;

/* Work bytes rv_linear needs for n columns of k values with nthreads threads. */
size_t rv_linear_work_bytes(int n, int k, int nthreads);

/* y_i = W_i x for every out (all W_i have k = cols columns; x is n columns of k floats, column c
 * at x + c * x_stride). RV_OK, RV_EINVAL (shapes, unsupported type, small work), RV_ETHREAD
 * (the OpenMP workers could not be started: nothing computed; rv_threads.h). */
int rv_linear(const rv_ops *ops, int nthreads, const float *x, ptrdiff_t x_stride, int n, int k,
              const rv_linear_out *outs, int nouts, void *work, size_t work_bytes);

/* rv_linear on exactly `team` threads, whatever the work (benchmarks of the parallel path). */
int rv_linear_team(const rv_ops *ops, int team, const float *x, ptrdiff_t x_stride, int n, int k,
                   const rv_linear_out *outs, int nouts, void *work, size_t work_bytes);

/* ---- a decoder block's dense parts ---- */
typedef struct rv_block_dims {
    int hidden, heads, kv_heads, head_dim, ffn;
    float eps;               /* RMSNorm epsilon */
} rv_block_dims;

typedef struct rv_block_weights {
    rv_wmat q, k, v;         /* [heads * head_dim | kv_heads * head_dim, hidden] */
    rv_wmat o;               /* [hidden, heads * head_dim] */
    rv_wmat gate, up;        /* [ffn, hidden] */
    rv_wmat down;            /* [hidden, ffn] */
    const float *attn_norm;  /* [hidden] RMSNorm gains */
    const float *ffn_norm;
} rv_block_weights;

typedef struct rv_block_head {
    rv_wmat out;             /* [vocab, hidden] (tied: the embedding table) */
    const float *norm;       /* [hidden] final RMSNorm gain */
    float *logits;           /* [n - first][vocab], row stride ld */
    ptrdiff_t ld;
    int first;               /* logits of tokens first..n-1 */
} rv_block_head;

typedef struct rv_block_step {
    int n;                   /* tokens in the step */
    float *x;                /* [n][hidden] residual stream, updated in place */
    const float *attn;       /* [n][heads * head_dim] attention output of `prev` */
    float *q, *k, *v;        /* [n][heads * head_dim], [n][kv_heads * head_dim] x 2: `next`'s */
    const float *rope_cos;   /* [n][head_dim / 2] */
    const float *rope_sin;
    void *work;              /* rv_block_work_bytes(dims, n, nthreads), 64-byte aligned */
    size_t work_bytes;
} rv_block_step;

size_t rv_block_work_bytes(const rv_block_dims *dims, int n, int nthreads);

/* prev != NULL: x += O attn; x += Down(SwiGLU(Gate n(x), Up n(x))), n = RMSNorm with ffn_norm.
 * next != NULL: (q, k, v) = (Q, K, V) n(x) with attn_norm, RoPE (adjacent pairs) on q and k.
 * head != NULL: logits = Out n(x) with head->norm, for tokens head->first..n-1.
 * (next and head exclude each other.) RV_OK, RV_EINVAL, or RV_ETHREAD (the OpenMP workers
 * could not be started: nothing computed, x untouched; rv_threads.h). */
int rv_block_between(const rv_ops *ops, int nthreads, const rv_block_dims *dims,
                     const rv_block_weights *prev, const rv_block_weights *next,
                     const rv_block_head *head, const rv_block_step *s);

/* cos/sin[t][i] of angle positions[t] * base^(-2i/dim), i < dim/2 (computed in double) */
void rv_rope_angles(const int64_t *positions, int n, int dim, double base, float *cos, float *sin);

/* The calling thread's cached work buffer of at least `bytes` (64-byte aligned), grown to the
 * largest request and kept until the thread exits or rv_linear_release_work(); NULL when out
 * of memory. For callers without an arena (ruvpy._linear's functional entry points). */
void *rv_linear_thread_work(size_t bytes);
void rv_linear_release_work(void);

/* Threads rv_block_between would use (for tests and benchmarks). */
int rv_block_threads(int nthreads, const rv_block_dims *dims, const rv_block_weights *prev,
                     const rv_block_weights *next, const rv_block_head *head, int n);

#endif
