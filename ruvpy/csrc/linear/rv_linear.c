/* Drivers of the GGUF block matmuls (see rv_linear.h): chunking, threads, phases. All
 * arithmetic goes through the kernel table. */
#include "linear/rv_linear.h"
#include "rv_thread_block.h"
#include "rv_threads.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#define RV_THREAD_ID() omp_get_thread_num()
#else
#define RV_THREAD_ID() 0
#endif

/* Serial-time model for the team size (rv_threads.h): streaming a weight byte through the
 * decode kernels, and one integer multiply-add of the packed GEMM (prefill). Fitted to
 * tools/bench_matmul.py on the Zen 4 test machine, 1 thread, avx512vnni: ~20 GB/s of Q4_1 /
 * Q8_0 rows (0.05 ns per byte) and ~60 G multiply-adds per second (0.017 ns). */
#define RV_NS_PER_WEIGHT_BYTE 0.05
#define RV_NS_PER_GEMM_MAC 0.017
#define GEMM_MIN_COLS 4          /* the kernels' switch to packed panels (qmatmul_impl.h) */

static int imin(int a, int b) { return a < b ? a : b; }
static int imax(int a, int b) { return a > b ? a : b; }
static size_t align64(size_t b) { return (b + 63) & ~(size_t)63; }

static int wmat_ok(const rv_wmat *w, int k)
{
    const int bv = rv_wtype_block_values(w->type);
    return w->data && bv > 0 && w->rows > 0 && w->cols == k && k % bv == 0 && k % 32 == 0 &&
           w->row_bytes == (size_t)(k / bv) * (size_t)rv_wtype_block_bytes(w->type);
}

static double matmul_ns(const rv_wmat *w, int n)
{
    const double bytes = (double)w->rows * (double)w->row_bytes;
    if (n < GEMM_MIN_COLS)
        return bytes * RV_NS_PER_WEIGHT_BYTE * n;
    return (double)w->rows * w->cols * n * RV_NS_PER_GEMM_MAC + bytes * RV_NS_PER_WEIGHT_BYTE;
}

/* rows per chunk: a multiple of `unit`, about 4 chunks per thread (balance under load), at
 * least 16 rows (a packed panel) */
static int chunk_rows(int rows, int nthreads, int unit)
{
    int want = (rows + 4 * nthreads - 1) / (4 * nthreads);
    want = imax(want, 16);
    want = (want + unit - 1) / unit * unit;
    return imin(want, imax(unit, (rows + unit - 1) / unit * unit));
}

/* per-thread piece of a work buffer: wmatmul scratch for k values */
static size_t thread_scratch_bytes(int k) { return align64(RV_WMATMUL_SCRATCH_BYTES(k)); }

/* ---- rv_linear ---- */

size_t rv_linear_work_bytes(int n, int k, int nthreads)
{
    return align64(RV_QACT_BYTES(n, k)) + (size_t)imax(nthreads, 1) * thread_scratch_bytes(k) + 64;
}

static int linear_run(const rv_ops *ops, int nthreads, int team, const float *x, ptrdiff_t x_stride,
                      int n, int k, const rv_linear_out *outs, int nouts, void *work, size_t work_bytes)
{
    if (!ops || !x || n < 0 || k <= 0 || k % 32 || nouts < 0 || (nouts && !outs) || !work)
        return RV_EINVAL;
    if (n == 0 || nouts == 0)
        return RV_OK;
    double ns = 0.0;
    int total_rows = 0;
    for (int i = 0; i < nouts; i++) {
        if (!wmat_ok(outs[i].w, k) || !outs[i].y || outs[i].ldy < outs[i].w->rows)
            return RV_EINVAL;
        ns += matmul_ns(outs[i].w, n);
        total_rows += outs[i].w->rows;
    }
    const int T = team > 0 ? team : rv_team_size(nthreads, ns);
    if (work_bytes < rv_linear_work_bytes(n, k, T) || ((uintptr_t)work & 63))
        return RV_EINVAL;
    const int started = rv_team_start(T);
    if (started != RV_OK)
        return started;
    char *base = (char *)work;
    rv_qact act;
    rv_qact_bind(&act, base, n, k);
    act.x = x;
    act.x_stride = x_stride;
    char *scratch = base + align64(RV_QACT_BYTES(n, k));
    const int ch = chunk_rows(total_rows, T, 16);
    /* chunk index -> (matrix, row range): chunks never straddle two matrices */
    int nchunks = 0;
    for (int i = 0; i < nouts; i++)
        nchunks += (outs[i].w->rows + ch - 1) / ch;

#pragma omp parallel num_threads(T) if (T > 1)
    {
        void *mine = scratch + (size_t)RV_THREAD_ID() * thread_scratch_bytes(k);
#pragma omp for schedule(static)
        for (int c = 0; c < n; c++)
            ops->quantize_act(&act, c, c + 1);
#pragma omp for schedule(dynamic, 1)
        for (int it = 0; it < nchunks; it++) {
            int i = 0, rem = it, per;
            while (rem >= (per = (outs[i].w->rows + ch - 1) / ch)) {
                rem -= per;
                i++;
            }
            const int r0 = rem * ch, r1 = imin(outs[i].w->rows, r0 + ch);
            ops->wmatmul(outs[i].w, r0, r1, &act, outs[i].y + r0, outs[i].ldy, outs[i].accumulate, mine);
        }
    }
    return RV_OK;
}

int rv_linear(const rv_ops *ops, int nthreads, const float *x, ptrdiff_t x_stride, int n, int k,
              const rv_linear_out *outs, int nouts, void *work, size_t work_bytes)
{
    return linear_run(ops, nthreads, 0, x, x_stride, n, k, outs, nouts, work, work_bytes);
}

int rv_linear_team(const rv_ops *ops, int team, const float *x, ptrdiff_t x_stride, int n, int k,
                   const rv_linear_out *outs, int nouts, void *work, size_t work_bytes)
{
    return linear_run(ops, team, team < 1 ? 1 : team, x, x_stride, n, k, outs, nouts, work, work_bytes);
}

/* ---- rv_block_between ---- */

/* rows of a gate/up chunk: their outputs go to a per-thread buffer before SwiGLU */
#define FFN_CHUNK_MAX 128

static int block_max_k(const rv_block_dims *d)
{
    return imax(imax(d->hidden, d->heads * d->head_dim), d->ffn);
}

/* work layout: xn [n][hidden] | h [n][ffn] | act (max k) | per thread: scratch + gate/up chunk */
static size_t per_thread_bytes(const rv_block_dims *d, int n)
{
    return thread_scratch_bytes(block_max_k(d)) + align64(2 * (size_t)n * FFN_CHUNK_MAX * sizeof(float));
}

size_t rv_block_work_bytes(const rv_block_dims *d, int n, int nthreads)
{
    return align64((size_t)n * d->hidden * sizeof(float)) + align64((size_t)n * d->ffn * sizeof(float)) +
           align64(RV_QACT_BYTES(n, block_max_k(d))) + (size_t)imax(nthreads, 1) * per_thread_bytes(d, n) + 64;
}

static int block_weights_ok(const rv_block_dims *d, const rv_block_weights *w)
{
    const int qd = d->heads * d->head_dim, kvd = d->kv_heads * d->head_dim;
    return wmat_ok(&w->q, d->hidden) && w->q.rows == qd && wmat_ok(&w->k, d->hidden) && w->k.rows == kvd &&
           wmat_ok(&w->v, d->hidden) && w->v.rows == kvd && wmat_ok(&w->o, qd) && w->o.rows == d->hidden &&
           wmat_ok(&w->gate, d->hidden) && w->gate.rows == d->ffn && wmat_ok(&w->up, d->hidden) &&
           w->up.rows == d->ffn && wmat_ok(&w->down, d->ffn) && w->down.rows == d->hidden &&
           w->attn_norm && w->ffn_norm;
}

int rv_block_threads(int nthreads, const rv_block_dims *dims, const rv_block_weights *prev,
                     const rv_block_weights *next, const rv_block_head *head, int n)
{
    double ns = 0.0;
    if (prev)
        ns += matmul_ns(&prev->o, n) + matmul_ns(&prev->gate, n) + matmul_ns(&prev->up, n) +
              matmul_ns(&prev->down, n);
    if (next)
        ns += matmul_ns(&next->q, n) + matmul_ns(&next->k, n) + matmul_ns(&next->v, n);
    if (head)
        ns += matmul_ns(&head->out, n - head->first);
    (void)dims;
    return rv_team_size(nthreads, ns);
}

/* RMSNorm then quantize tokens [t0, t1) of x (row stride `hidden`) into act */
static void norm_quantize(const rv_ops *ops, const float *x, int hidden, const float *gain, float eps,
                          float *xn, rv_qact *act, int t0, int t1)
{
    for (int t = t0; t < t1; t++)
        ops->rmsnorm_f32(x + (size_t)t * hidden, gain, eps, xn + (size_t)t * hidden, hidden);
    ops->quantize_act(act, t0, t1);
}

int rv_block_between(const rv_ops *ops, int nthreads, const rv_block_dims *d,
                     const rv_block_weights *prev, const rv_block_weights *next,
                     const rv_block_head *head, const rv_block_step *s)
{
    if (!ops || !d || !s || s->n < 1 || d->hidden < 32 || d->hidden % 32 || d->ffn % 32 ||
        d->heads < 1 || d->kv_heads < 1 || d->head_dim < 2 || d->head_dim % 2 ||
        (d->heads * d->head_dim) % 32 || (next && head) || !s->x || !s->work || ((uintptr_t)s->work & 63))
        return RV_EINVAL;
    if ((prev && (!block_weights_ok(d, prev) || !s->attn)) ||
        (next && (!block_weights_ok(d, next) || !s->q || !s->k || !s->v || !s->rope_cos || !s->rope_sin)) ||
        (head && (!wmat_ok(&head->out, d->hidden) || !head->norm || !head->logits || head->first < 0 ||
                  head->first >= s->n || head->ld < head->out.rows)))
        return RV_EINVAL;
    const int n = s->n, H = d->hidden, qd = d->heads * d->head_dim, kvd = d->kv_heads * d->head_dim;
    const int T = rv_block_threads(nthreads, d, prev, next, head, n);
    if (s->work_bytes < rv_block_work_bytes(d, n, T))
        return RV_EINVAL;
    const int started = rv_team_start(T);
    if (started != RV_OK)
        return started;
    char *p = (char *)s->work;
    float *xn = (float *)p;
    p += align64((size_t)n * H * sizeof(float));
    float *h = (float *)p;
    p += align64((size_t)n * d->ffn * sizeof(float));
    void *act_mem = p;
    p += align64(RV_QACT_BYTES(n, block_max_k(d)));
    char *threads_mem = p;
    const size_t ptb = per_thread_bytes(d, n);

    /* one rv_qact per input width, all over the same memory (phases never overlap) */
    rv_qact act_attn, act_x, act_h;
    rv_qact_bind(&act_attn, act_mem, n, qd);
    act_attn.x = s->attn;
    act_attn.x_stride = qd;
    rv_qact_bind(&act_x, act_mem, n, H);
    act_x.x = xn;
    act_x.x_stride = H;
    rv_qact_bind(&act_h, act_mem, n, d->ffn);
    act_h.x = h;
    act_h.x_stride = d->ffn;

    const int ch_o = chunk_rows(H, T, 16);
    const int ch_f = imin(FFN_CHUNK_MAX, chunk_rows(d->ffn, T, 16));
    const int heads_all = d->heads + 2 * d->kv_heads;
    const int ch_heads = imax(1, (heads_all + 4 * T - 1) / (4 * T));
    const int first = head ? head->first : 0;
    const int ch_v = head ? chunk_rows(head->out.rows, T, 16) : 1;

#pragma omp parallel num_threads(T) if (T > 1)
    {
        char *mine = threads_mem + (size_t)RV_THREAD_ID() * ptb;
        float *tg = (float *)(mine + thread_scratch_bytes(block_max_k(d)));
        float *tu = tg + (size_t)n * FFN_CHUNK_MAX;
        if (prev) {
            /* attention output projection, added to the residual stream */
#pragma omp for schedule(static)
            for (int t = 0; t < n; t++)
                ops->quantize_act(&act_attn, t, t + 1);
#pragma omp for schedule(dynamic, 1)
            for (int r0 = 0; r0 < H; r0 += ch_o)
                ops->wmatmul(&prev->o, r0, imin(H, r0 + ch_o), &act_attn, s->x + r0, H, 1, mine);
            /* MLP: gate and up of the same rows, SwiGLU straight into h */
#pragma omp for schedule(static)
            for (int t = 0; t < n; t++)
                norm_quantize(ops, s->x, H, prev->ffn_norm, d->eps, xn, &act_x, t, t + 1);
#pragma omp for schedule(dynamic, 1)
            for (int r0 = 0; r0 < d->ffn; r0 += ch_f) {
                const int r1 = imin(d->ffn, r0 + ch_f);
                ops->wmatmul(&prev->gate, r0, r1, &act_x, tg, ch_f, 0, mine);
                ops->wmatmul(&prev->up, r0, r1, &act_x, tu, ch_f, 0, mine);
                for (int t = 0; t < n; t++)
                    ops->swiglu_f32(tg + (size_t)t * ch_f, tu + (size_t)t * ch_f, h + (size_t)t * d->ffn + r0, r1 - r0);
            }
#pragma omp for schedule(static)
            for (int t = 0; t < n; t++)
                ops->quantize_act(&act_h, t, t + 1);
#pragma omp for schedule(dynamic, 1)
            for (int r0 = 0; r0 < H; r0 += ch_o)
                ops->wmatmul(&prev->down, r0, imin(H, r0 + ch_o), &act_h, s->x + r0, H, 1, mine);
        }
        if (next) {
#pragma omp for schedule(static)
            for (int t = 0; t < n; t++)
                norm_quantize(ops, s->x, H, next->attn_norm, d->eps, xn, &act_x, t, t + 1);
            /* Q, K, V as one list of heads; RoPE on the Q and K heads of each chunk */
#pragma omp for schedule(dynamic, 1)
            for (int h0 = 0; h0 < heads_all; h0 += ch_heads) {
                const int h1 = imin(heads_all, h0 + ch_heads);
                for (int hh = h0; hh < h1;) {
                    const rv_wmat *w;
                    float *y;
                    int base, ld, count, rope;
                    if (hh < d->heads) {
                        w = &next->q, y = s->q, base = 0, ld = qd, count = d->heads, rope = 1;
                    } else if (hh < d->heads + d->kv_heads) {
                        w = &next->k, y = s->k, base = d->heads, ld = kvd, count = d->kv_heads, rope = 1;
                    } else {
                        w = &next->v, y = s->v, base = d->heads + d->kv_heads, ld = kvd, count = d->kv_heads, rope = 0;
                    }
                    const int e = imin(h1, base + count);   /* heads of this matrix in the chunk */
                    const int r0 = (hh - base) * d->head_dim, r1 = (e - base) * d->head_dim;
                    ops->wmatmul(w, r0, r1, &act_x, y + r0, ld, 0, mine);
                    if (rope)
                        for (int t = 0; t < n; t++)
                            ops->rope_pairs_f32(y + (size_t)t * ld + r0, e - hh, d->head_dim,
                                                s->rope_cos + (size_t)t * (d->head_dim / 2),
                                                s->rope_sin + (size_t)t * (d->head_dim / 2));
                    hh = e;
                }
            }
        }
        if (head) {
            rv_qact act_last = act_x;   /* only the tokens whose logits are wanted */
#pragma omp for schedule(static)
            for (int t = first; t < n; t++)
                norm_quantize(ops, s->x, H, head->norm, d->eps, xn, &act_x, t, t + 1);
            act_last.n = n - first;
            act_last.x = xn + (size_t)first * H;
            act_last.q += (size_t)first * H;
            act_last.d += (size_t)first * (H / 32);
            act_last.s32 += (size_t)first * (H / 32);
            act_last.s16 += (size_t)first * (H / 16);
            act_last.q4 += (size_t)first * H;
            act_last.ds += (size_t)first * (H / 32) * 2;
#pragma omp for schedule(dynamic, 1)
            for (int r0 = 0; r0 < head->out.rows; r0 += ch_v)
                ops->wmatmul(&head->out, r0, imin(head->out.rows, r0 + ch_v), &act_last, head->logits + r0,
                             head->ld, 0, mine);
        }
    }
    return RV_OK;
}

void rv_rope_angles(const int64_t *positions, int n, int dim, double base, float *cos_out, float *sin_out)
{
    const int half = dim / 2;
    for (int t = 0; t < n; t++)
        for (int i = 0; i < half; i++) {
            const double angle = (double)positions[t] * pow(base, -2.0 * i / dim);
            cos_out[(size_t)t * half + i] = (float)cos(angle);
            sin_out[(size_t)t * half + i] = (float)sin(angle);
        }
}

/* ---- per-thread cached work: rv_thread_block.h ---- */
void *rv_linear_thread_work(size_t bytes) { return rv_thread_block(bytes); }

void rv_linear_release_work(void) { rv_thread_block_release(); }
