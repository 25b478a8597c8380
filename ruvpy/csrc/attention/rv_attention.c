/* Functional attention driver (see rv_attention.h). ISA-independent: all arithmetic on K/V goes
 * through the kernel table; this file only schedules work and merges context splits. */
#include "attention/rv_attention.h"
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

/* A KV head's query rows at most this many go to the streaming kernel (decode) */
#define STREAM_MAX_ROWS 8
/* no context split shorter than this many keys */
#define MIN_SPLIT_KEYS 256

static int imin(int a, int b) { return a < b ? a : b; }
static int imax(int a, int b) { return a > b ? a : b; }

/* ---- per-calling-thread scratch, grown to the largest call and kept ----
 * One block per thread, registered with a pthread key whose destructor frees it at thread
 * exit. Header: capacity in bytes; the data starts RV_ALIGN bytes in. */
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static int scratch_key_ok;

static void scratch_destroy(void *block) { free(block); }
static void scratch_key_create(void) { scratch_key_ok = pthread_key_create(&scratch_key, scratch_destroy) == 0; }

static float *thread_scratch(size_t floats)
{
    pthread_once(&scratch_once, scratch_key_create);
    if (!scratch_key_ok)
        return NULL;
    char *block = pthread_getspecific(scratch_key);
    size_t need = floats * sizeof(float);
    if (block && *(size_t *)block >= need)
        return (float *)(block + RV_ALIGN);
    size_t cap = (need + need / 4 + RV_ALIGN - 1) / RV_ALIGN * RV_ALIGN;  /* room to grow */
    char *fresh = aligned_alloc(RV_ALIGN, cap + RV_ALIGN);
    if (!fresh)
        return NULL;
    *(size_t *)fresh = cap;
    if (pthread_setspecific(scratch_key, fresh) != 0) {
        free(fresh);
        return NULL;
    }
    free(block);
    return (float *)(fresh + RV_ALIGN);
}

void rv_attention_release_scratch(void)
{
    pthread_once(&scratch_once, scratch_key_create);
    if (!scratch_key_ok)
        return;
    free(pthread_getspecific(scratch_key));
    pthread_setspecific(scratch_key, NULL);
}

size_t rv_attention_scratch_bytes(void)
{
    pthread_once(&scratch_once, scratch_key_create);
    if (!scratch_key_ok)
        return 0;
    char *block = pthread_getspecific(scratch_key);
    return block ? *(size_t *)block + RV_ALIGN : 0;
}

/* Context splits per tile when tiles are few: enough items for every thread (at least 4 each,
 * a multiple of the thread count so the shares are even), none shorter than MIN_SPLIT_KEYS. */
static int choose_splits(int items, int nthreads, int kv_len)
{
    if (nthreads <= 1 || items >= 4 * nthreads)
        return 1;
    int s = (4 * nthreads + items - 1) / items;
    for (int t = s; t < s + nthreads; t++)
        if ((items * t) % nthreads == 0) {
            s = t;
            break;
        }
    int max_s = imax(1, kv_len / MIN_SPLIT_KEYS);
    return imin(s, max_s);
}

static int split_begin(int s, int splits, int kv_len) { return (int)((int64_t)kv_len * s / splits); }

static const void *kv_at(const void *base, int f16, ptrdiff_t elems)
{
    return (const char *)base + elems * (f16 ? 2 : 4);
}

/* keys query token t sees (absolute), causal */
static int visible_of(const rv_attn_args *a, int t) { return a->kv_len - a->q_len + t + 1; }

/* ---- streaming path: q_len * group <= STREAM_MAX_ROWS rows per KV head ----
 * Work items are (token range, range of KV heads). Long contexts are split by tokens only, so
 * that each item streams one contiguous stretch of the NHD tensors with attend_heads_* (every
 * head of a token block together: heads share every page); short ones by heads as well. */
static int attend_streaming(const rv_ops *ops, int nthreads, const rv_attn_args *a)
{
    const int G = a->num_heads / a->num_kv_heads, KVH = a->num_kv_heads, d = a->head_dim;
    const int rows = a->q_len * G;
    int S = 1, HG = 1;   /* token splits, head groups */
    if (nthreads > 1) {
        const int s_max = imax(1, a->kv_len / MIN_SPLIT_KEYS);
        S = imin(4 * nthreads, s_max);          /* a few per thread: balance under load */
        if (S >= nthreads)
            S -= S % nthreads;
        else
            HG = imin(KVH, (nthreads + S - 1) / S);
    }
    const int items = S * HG;
    const int T = imin(nthreads, items);
    const size_t per_state = rv_pad16((size_t)rows * d) + 2 * rv_pad16((size_t)rows);
    const size_t per_thread = rv_pad16(RV_ATTN_SCRATCH_FLOATS(rows, d)) + 16;
    const size_t state_floats = rv_pad16((sizeof(rv_attn_state) * (size_t)S * KVH + 3) / sizeof(float));
    float *buf = thread_scratch(rv_pad16((size_t)KVH * rows * d) + (size_t)S * KVH * per_state +
                                (size_t)T * per_thread + state_floats);
    if (!buf)
        return RV_ENOMEM;
    float *qs = buf;
    float *states_mem = qs + rv_pad16((size_t)KVH * rows * d);      /* [S][KVH] (acc, m, l) */
    float *kscratch = states_mem + (size_t)S * KVH * per_state;
    rv_attn_state *states = (rv_attn_state *)(kscratch + (size_t)T * per_thread);

    /* scaled queries of each KV head's group, rows ordered (token, head in group) */
    for (int hk = 0; hk < KVH; hk++)
        for (int t = 0; t < a->q_len; t++)
            for (int g = 0; g < G; g++) {
                const float *src = a->q + t * a->q_tok + (hk * G + g) * a->q_head;
                float *dst = qs + ((size_t)hk * rows + t * G + g) * d;
                for (int c = 0; c < d; c++)
                    dst[c] = src[c] * a->scale;
            }
    const int f16 = a->kv_f16;

#pragma omp parallel num_threads(T) if (T > 1)
    {
        float *ks = kscratch + (size_t)RV_THREAD_ID() * per_thread;
        int vis[STREAM_MAX_ROWS];
#pragma omp for schedule(dynamic, 1)
        for (int it = 0; it < items; it++) {
            const int s = it / HG, hg = it % HG;
            const int h0 = (int)((int64_t)KVH * hg / HG), h1 = (int)((int64_t)KVH * (hg + 1) / HG);
            const int k0 = split_begin(s, S, a->kv_len), k1 = split_begin(s + 1, S, a->kv_len);
            rv_attn_state *st = states + (size_t)s * KVH + h0;
            for (int h = h0; h < h1; h++) {
                float *acc = states_mem + ((size_t)s * KVH + h) * per_state;
                float *m = acc + rv_pad16((size_t)rows * d), *l = m + rv_pad16((size_t)rows);
                rv_attn_state init = {rows, d, qs + (size_t)h * rows * d, d, m, l, acc, ks};
                st[h - h0] = init;
                rv_attn_state_clear(m, l, acc, rows, d);
            }
            const int *visible = NULL;
            if (a->causal && a->q_len > 1) {
                for (int r = 0; r < rows; r++)
                    vis[r] = imax(0, imin(k1 - k0, visible_of(a, r / G) - k0));
                visible = vis;
            }
            const ptrdiff_t ko = h0 * a->k_head + (ptrdiff_t)k0 * a->k_tok;
            const ptrdiff_t vo = h0 * a->v_head + (ptrdiff_t)k0 * a->v_tok;
            if (f16)
                ops->attend_heads_f16(st, h1 - h0, (const uint16_t *)a->k + ko, a->k_tok, a->k_head,
                                      (const uint16_t *)a->v + vo, a->v_tok, a->v_head, k1 - k0, visible);
            else
                ops->attend_heads_f32(st, h1 - h0, (const float *)a->k + ko, a->k_tok, a->k_head,
                                      (const float *)a->v + vo, a->v_tok, a->v_head, k1 - k0, visible);
        }
        /* implicit barrier: every split is done */
#pragma omp for schedule(static)
        for (int hk = 0; hk < KVH; hk++) {
            float *acc = states_mem + (size_t)hk * per_state;
            float *m = acc + rv_pad16((size_t)rows * d), *l = m + rv_pad16((size_t)rows);
            for (int s = 1; s < S; s++) {
                const float *oacc = states_mem + ((size_t)s * KVH + hk) * per_state;
                const float *om = oacc + rv_pad16((size_t)rows * d), *ol = om + rv_pad16((size_t)rows);
                ops->attn_merge(rows, d, m, l, acc, om, ol, oacc);
            }
            for (int t = 0; t < a->q_len; t++)
                ops->attn_finalize(G, d, l + t * G, acc + (size_t)t * G * d,
                                   a->out + t * a->o_tok + hk * G * a->o_head, a->o_head);
        }
    }
    return RV_OK;
}

/* ---- tiled path: tiles of (query tokens x heads of a group) <= RV_ATTN_TILE_ROWS rows ---- */
static int attend_tiled(const rv_ops *ops, int nthreads, const rv_attn_args *a)
{
    const int G = a->num_heads / a->num_kv_heads, KVH = a->num_kv_heads, d = a->head_dim;
    const int GB = imin(G, RV_ATTN_TILE_ROWS);          /* heads of a group per tile */
    const int NG = (G + GB - 1) / GB;
    const int BQ = imax(1, RV_ATTN_TILE_ROWS / GB);     /* query tokens per tile */
    const int NQ = (a->q_len + BQ - 1) / BQ;
    const int tiles = KVH * NG * NQ;
    const int S = choose_splits(tiles, nthreads, a->kv_len);
    const int items = tiles * S;
    const int T = imin(nthreads, items);
    const size_t per_thread = rv_pad16(RV_ATTN_TILE_SCRATCH_FLOATS(d)) + 16;
    const size_t part_rows = S > 1 ? (size_t)items * RV_ATTN_TILE_ROWS : 0;
    float *buf = thread_scratch((size_t)T * per_thread + part_rows * (d + 2));
    if (!buf)
        return RV_ENOMEM;
    float *kscratch = buf;
    float *parts = kscratch + (size_t)T * per_thread;   /* [items][TILE_ROWS][d] when split */
    float *part_ml = parts + part_rows * d;             /* [items][TILE_ROWS][m, l] */
    const int f16 = a->kv_f16;

#pragma omp parallel num_threads(T) if (T > 1)
    {
        float *ks = kscratch + (size_t)RV_THREAD_ID() * per_thread;
        const float *qrow[RV_ATTN_TILE_ROWS];
        float *orow[RV_ATTN_TILE_ROWS];
        int vis[RV_ATTN_TILE_ROWS];
        float m_out[RV_ATTN_TILE_ROWS], l_out[RV_ATTN_TILE_ROWS];
        /* causal: the longest tiles (last query tokens) first, for a balanced finish */
#pragma omp for schedule(dynamic, 1)
        for (int it = 0; it < items; it++) {
            const int per_q = KVH * NG * S;
            const int qt = a->causal ? NQ - 1 - it / per_q : it / per_q;
            const int rem = it % per_q, hk = rem / (NG * S), gb = (rem / S) % NG, s = rem % S;
            const int tile = (qt * KVH + hk) * NG + gb;
            const int p0 = qt * BQ, bq = imin(BQ, a->q_len - p0);
            const int g0 = gb * GB, gn = imin(GB, G - g0);
            const int rows = bq * gn;
            const int k0 = split_begin(s, S, a->kv_len), k1 = split_begin(s + 1, S, a->kv_len);
            for (int pi = 0; pi < bq; pi++)
                for (int gi = 0; gi < gn; gi++) {
                    int r = pi * gn + gi, h = hk * G + g0 + gi;
                    qrow[r] = a->q + (p0 + pi) * a->q_tok + h * a->q_head;
                    orow[r] = S > 1 ? parts + ((size_t)(tile * S + s) * RV_ATTN_TILE_ROWS + r) * d
                                    : a->out + (p0 + pi) * a->o_tok + h * a->o_head;
                    vis[r] = a->causal ? imax(0, imin(k1 - k0, visible_of(a, p0 + pi) - k0)) : k1 - k0;
                }
            rv_kv_span span = {kv_at(a->k, f16, hk * a->k_head + (ptrdiff_t)k0 * a->k_tok),
                               kv_at(a->v, f16, hk * a->v_head + (ptrdiff_t)k0 * a->v_tok),
                               a->k_tok, a->v_tok, k1 - k0};
            rv_attn_rows job = {rows, d, a->scale, qrow, orow, a->causal ? vis : NULL, &span, 1,
                                S > 1 ? m_out : NULL, S > 1 ? l_out : NULL};
            if (f16)
                ops->attend_rows_f16(&job, ks);
            else
                ops->attend_rows_f32(&job, ks);
            if (S > 1) {
                float *ml = part_ml + (size_t)(tile * S + s) * RV_ATTN_TILE_ROWS * 2;
                for (int r = 0; r < rows; r++) {
                    ml[2 * r] = m_out[r];
                    ml[2 * r + 1] = l_out[r];
                }
            }
        }
        if (S > 1) {
            /* out = sum_s w_s o_s / sum_s w_s with w_s = l_s exp(m_s - max m) */
#pragma omp for schedule(static)
            for (int tile = 0; tile < tiles; tile++) {
                const int gb = tile % NG, hk = (tile / NG) % KVH, qt = tile / (NG * KVH);
                const int p0 = qt * BQ, bq = imin(BQ, a->q_len - p0);
                const int g0 = gb * GB, gn = imin(GB, G - g0);
                for (int r = 0; r < bq * gn; r++) {
                    const float *ml = part_ml + (size_t)tile * S * RV_ATTN_TILE_ROWS * 2 + 2 * r;
                    float mx = -INFINITY, wsum = 0.0f;
                    for (int s = 0; s < S; s++)
                        if (ml[s * RV_ATTN_TILE_ROWS * 2 + 1] > 0.0f && ml[s * RV_ATTN_TILE_ROWS * 2] > mx)
                            mx = ml[s * RV_ATTN_TILE_ROWS * 2];
                    float *o = a->out + (p0 + r / gn) * a->o_tok + (hk * G + g0 + r % gn) * a->o_head;
                    memset(o, 0, sizeof(float) * d);
                    for (int s = 0; s < S; s++) {
                        float ls = ml[s * RV_ATTN_TILE_ROWS * 2 + 1];
                        if (ls <= 0.0f)
                            continue;
                        float w = ls * expf(ml[s * RV_ATTN_TILE_ROWS * 2] - mx);
                        const float *po = parts + ((size_t)(tile * S + s) * RV_ATTN_TILE_ROWS + r) * d;
                        for (int c = 0; c < d; c++)
                            o[c] += w * po[c];
                        wsum += w;
                    }
                    float inv = wsum > 0.0f ? 1.0f / wsum : 0.0f;
                    for (int c = 0; c < d; c++)
                        o[c] *= inv;
                }
            }
        }
    }
    return RV_OK;
}

int rv_attention_threads(int nthreads, const rv_attn_args *a)
{
    const int64_t q = a->q_len, kv = a->kv_len;
    const int64_t pairs = a->causal ? q * kv - q * (q - 1) / 2 : q * kv;
    return rv_attn_team_size(nthreads, a->num_heads, a->num_kv_heads, a->head_dim, pairs, kv,
                             a->kv_f16 ? 2 : 4);
}

int rv_attention(const rv_ops *ops, int nthreads, const rv_attn_args *a)
{
    if (!ops || !a || a->q_len < 0 || a->kv_len < 1 || a->num_kv_heads < 1 ||
        a->num_heads < a->num_kv_heads || a->num_heads % a->num_kv_heads != 0 ||
        a->head_dim < 1 || (a->causal && a->q_len > a->kv_len))
        return RV_EINVAL;
    if (a->q_len == 0)
        return RV_OK;
    nthreads = rv_attention_threads(nthreads, a);
    const int G = a->num_heads / a->num_kv_heads;
    if ((int64_t)a->q_len * G <= STREAM_MAX_ROWS)
        return attend_streaming(ops, nthreads, a);
    return attend_tiled(ops, nthreads, a);
}

uint64_t rv_stream_read(const void *buf, size_t bytes, int nthreads)
{
    const uint64_t *p = (const uint64_t *)buf;
    const size_t n = bytes / sizeof(uint64_t);
    uint64_t total = 0;
    if (nthreads < 1)
        nthreads = 1;
#pragma omp parallel num_threads(nthreads) reduction(+ : total)
    {
#ifdef _OPENMP
        const size_t t = (size_t)omp_get_thread_num(), nt = (size_t)omp_get_num_threads();
#else
        const size_t t = 0, nt = 1;
#endif
        size_t i = n * t / nt, hi = n * (t + 1) / nt;
        uint64_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};   /* independent sums: the loads run freely */
        for (; i + 8 <= hi; i += 8)
            for (int j = 0; j < 8; j++)
                s[j] += p[i + j];
        for (; i < hi; i++)
            s[0] += p[i];
        for (int j = 0; j < 8; j++)
            total += s[j];
    }
    return total;
}
