/* GGUF block matmul kernels and the dense element-wise parts of a transformer layer (see
 * rv_ops.h for the contracts, rv_wmat.h for the formats), written once and compiled per ISA.
 *
 * Matrix-vector (decode, a few columns): each weight row is streamed once, block by block, in
 * registers -- codes unpacked to unsigned bytes, an integer dot product with the int8
 * activations (AVX-512 VNNI: VPDPBUSD; AVX-512BW / AVX2: VPMADDUBSW + VPMADDWD; NEON: SMULL +
 * SADALP), then one float multiply-add by the sub-block's scale per vector; the zero points and
 * minimums become one multiply-add per block with the activations' block sums (rv_wmat.h).
 * Weight rows stay in the file's layout: nothing is repacked or copied.
 *
 * Matrix-matrix (prefill, many columns; x86): RV_WMM_PANEL rows at a time are unpacked into
 * scratch with their codes interleaved 4 bytes per row ("lane = row"), so one vector of codes
 * times one broadcast group of 4 activation codes adds 4 products to every row's lane; the
 * integer sums of a sub-block are scaled once per (row panel, column, sub-block). The panel is
 * built per call (RV_WMM_PANEL x cols bytes) and reused for every column: a BLAS-style pack, not
 * a copy of the model.
 *
 * The portable C below is the reference for every format and serves the scalar table, tails
 * and the packing; ISA sections override the hot loops.
 */
#ifndef RV_QMATMUL_IMPL_H
#define RV_QMATMUL_IMPL_H

#include <float.h>
#include <math.h>
#include <string.h>
#include "rv_simd.h"
#include "rv_fp16.h"
#include "kernels/rv_ops.h"

#if defined(RV_ISA_AVX512) || defined(RV_ISA_AVX2)
#define QM_X86 1
#endif

/* Matrix-vector software prefetch distance and locality (see wmatmul): 2 KiB ahead over every
 * line, into L1 (T0). On the Zen 4 VM (tools/bench_matmul.py, paired cold Q4_1 rows) 4, 8 and
 * 16 KiB, T0 / T1 / NTA, every other line or only each page's first lines were no better than
 * 2 KiB (8 KiB and more, or only page starts, were worse), and no prefetch was clearly worse.
 * On the Intel Xeon of stops 23-25 NTA was the worst of all: SmolLM2 decode spent most of the
 * row kernel stalled on its prefetchnta (10.6 ms a token with 2 threads; no prefetch 6.9 ms,
 * T2 / T1 / T0 4.6-5.4 ms), so T0, which the Zen 4 measured as good as NTA. */
#ifndef QM_PF_BYTES
#define QM_PF_BYTES 2048
#endif
#ifndef QM_PF_LOCALITY
#define QM_PF_LOCALITY 3
#endif

/* ---- half / bfloat16 scalars ---- */
RV_INLINE float qm_h2f(const uint8_t *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
#if defined(QM_X86)
    return _cvtsh_ss(h);
#elif defined(RV_ISA_NEON)
    return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0);
#else
    return rv_f16_to_f32(h);
#endif
}

RV_INLINE float qm_bf2f(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

RV_INLINE uint32_t qm_load_u32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* The 6-bit scales and minimums of a Q4_K / Q5_K block's 8 sub-blocks (12 bytes, ggml's
 * get_scale_min_k4): sub-blocks 0-3 in the low 6 bits of bytes 0-3 / 4-7, sub-blocks 4-7 from
 * the nibbles of bytes 8-11 plus the top 2 bits of bytes 0-3 / 4-7. */
RV_INLINE void qm_kscales(const uint8_t *s, uint8_t *sc, uint8_t *m)
{
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        m[j] = s[j + 4] & 63;
        sc[j + 4] = (uint8_t)((s[j + 8] & 0x0F) | ((s[j] >> 6) << 4));
        m[j + 4] = (uint8_t)((s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4));
    }
}

/* Sub-block size of a quantized type's scales (Q6_K: 16, the others 32). */
RV_INLINE int qm_sub(int type) { return type == RV_WT_Q6_K ? 16 : 32; }

/* One block of a quantized type: unsigned codes u[block values] and per sub-block the scale sw
 * and the coefficient cw of the activations' sum (mw - zp sw): w[i] = sw u[i] + cw. */
static void qm_unpack_block(int type, const uint8_t *b, uint8_t *u, float *sw, float *cw)
{
    switch (type) {
    case RV_WT_Q4_0: {
        const float d = qm_h2f(b);
        for (int i = 0; i < 16; i++) {
            u[i] = b[2 + i] & 0x0F;
            u[16 + i] = b[2 + i] >> 4;
        }
        sw[0] = d;
        cw[0] = -8.0f * d;
        break;
    }
    case RV_WT_Q4_1: {
        for (int i = 0; i < 16; i++) {
            u[i] = b[4 + i] & 0x0F;
            u[16 + i] = b[4 + i] >> 4;
        }
        sw[0] = qm_h2f(b);
        cw[0] = qm_h2f(b + 2);
        break;
    }
    case RV_WT_Q8_0: {
        const float d = qm_h2f(b);
        for (int i = 0; i < 32; i++)
            u[i] = (uint8_t)(b[2 + i] ^ 0x80);   /* q + 128 */
        sw[0] = d;
        cw[0] = -128.0f * d;
        break;
    }
    case RV_WT_Q4_K:
    case RV_WT_Q5_K: {
        const float d = qm_h2f(b), dmin = qm_h2f(b + 2);
        uint8_t sc[8], m[8];
        qm_kscales(b + 4, sc, m);
        const uint8_t *qh = b + 16, *qs = type == RV_WT_Q5_K ? b + 48 : b + 16;
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++) {
                uint8_t lo = qs[32 * c + l] & 0x0F, hi = qs[32 * c + l] >> 4;
                if (type == RV_WT_Q5_K) {
                    lo |= (uint8_t)(((qh[l] >> (2 * c)) & 1) << 4);
                    hi |= (uint8_t)(((qh[l] >> (2 * c + 1)) & 1) << 4);
                }
                u[64 * c + l] = lo;
                u[64 * c + 32 + l] = hi;
            }
        for (int j = 0; j < 8; j++) {
            sw[j] = d * sc[j];
            cw[j] = -dmin * m[j];
        }
        break;
    }
    case RV_WT_Q6_K: {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *sc = (const int8_t *)(b + 192);
        const float d = qm_h2f(b + 208);
        for (int h = 0; h < 2; h++)
            for (int l = 0; l < 32; l++) {
                const uint8_t a = ql[64 * h + l], c = ql[64 * h + 32 + l], e = qh[32 * h + l];
                u[128 * h + l] = (uint8_t)((a & 0x0F) | ((e & 3) << 4));
                u[128 * h + 32 + l] = (uint8_t)((c & 0x0F) | (((e >> 2) & 3) << 4));
                u[128 * h + 64 + l] = (uint8_t)((a >> 4) | (((e >> 4) & 3) << 4));
                u[128 * h + 96 + l] = (uint8_t)((c >> 4) | (((e >> 6) & 3) << 4));
            }
        for (int j = 0; j < 16; j++) {
            sw[j] = d * sc[j];
            cw[j] = -32.0f * sw[j];
        }
        break;
    }
    default:
        break;
    }
}

/* w[i] of one row as floats (any supported type) */
static void qm_row_to_f32(const rv_wmat *w, const uint8_t *row, float *out)
{
    const int type = w->type, n = w->cols;
    if (type == RV_WT_F32) {
        memcpy(out, row, sizeof(float) * (size_t)n);
        return;
    }
    if (type == RV_WT_F16 || type == RV_WT_BF16) {
        for (int i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, row + 2 * i, 2);
            out[i] = type == RV_WT_F16 ? rv_f16_to_f32(h) : qm_bf2f(h);
        }
        return;
    }
    const int bv = rv_wtype_block_values(type), bb = rv_wtype_block_bytes(type), g = qm_sub(type);
    uint8_t u[256];
    float sw[16], cw[16];
    for (int b = 0; b < n / bv; b++) {
        qm_unpack_block(type, row + (size_t)b * bb, u, sw, cw);
        for (int i = 0; i < bv; i++)
            out[b * bv + i] = sw[i / g] * u[i] + cw[i / g];
    }
}

/* Portable dot product of blocks [b0, b1) of a quantized row with column c of a: the
 * reference every ISA path is compared with, and the tail of the vector loops. */
static float qm_dot_blocks_ref(int type, const uint8_t *row, int b0, int b1, const rv_qact *a, int c)
{
    const int bv = rv_wtype_block_values(type), bb = rv_wtype_block_bytes(type), g = qm_sub(type);
    const int8_t *q = a->q + (size_t)c * a->k;
    const float *d = a->d + (size_t)c * (a->k / 32);
    const float *s = g == 16 ? a->s16 + (size_t)c * (a->k / 16) : a->s32 + (size_t)c * (a->k / 32);
    uint8_t u[256];
    float sw[16], cw[16], acc = 0.0f;
    for (int b = b0; b < b1; b++) {
        qm_unpack_block(type, row + (size_t)b * bb, u, sw, cw);
        const int e0 = b * bv;
        for (int j = 0; j < bv / g; j++) {
            int32_t isum = 0;
            for (int i = 0; i < g; i++)
                isum += (int32_t)u[j * g + i] * q[e0 + j * g + i];
            acc += d[(e0 + j * g) / 32] * (sw[j] * (float)isum) + cw[j] * s[(e0 + j * g) / g];
        }
    }
    return acc;
}

/* ---- quantizing activations (Q8 per block of 32, round to nearest even) ----
 * A block holding a NaN or an infinity gets scale NaN (its codes 0), so every product it
 * enters is NaN, as in float arithmetic: the maximum skips NaN, and the codes alone would
 * give a finite, ISA-dependent sum. `nonfinite` is the sum of x - x over the block (NaN iff
 * one is not finite). */
RV_INLINE float qm_block_scale(float amax, float nonfinite)
{
    return nonfinite == nonfinite ? amax / 127.0f : NAN;
}

/* A block whose maximum is below 127 / FLT_MAX (~3.7e-37) has a scale whose inverse is
 * infinite in float32: x * (1 / d) made every code +-inf, which the scalar path clamped to the
 * sign alone and cvtps2dq turned into -127 whatever the sign. Such blocks (id = 1 / d > FLT_MAX)
 * go through qm_quantize_block_ref, which scales the values and d by 2^64 first (exact: powers
 * of two), so their codes are those of any other block; the vector paths keep their one
 * multiply for every other block. */
RV_INLINE int qm_tiny_block(float id) { return id > FLT_MAX; }

RV_INLINE void qm_finish_block(const rv_qact *a, int c, int b, float d, int32_t sum_lo, int32_t sum_hi)
{
    const size_t nb = (size_t)a->k / 32, at = (size_t)c * nb + b;
    a->d[at] = d;
    a->s32[at] = d * (float)(sum_lo + sum_hi);
    a->s16[2 * at] = d * (float)sum_lo;
    a->s16[2 * at + 1] = d * (float)sum_hi;
    a->ds[2 * at] = d;
    a->ds[2 * at + 1] = a->s32[at];
}

static void qm_quantize_block_ref(const rv_qact *a, int c, int b)
{
    const float *x = a->x + (ptrdiff_t)c * a->x_stride + 32 * b;
    int8_t *q = a->q + (size_t)c * a->k + 32 * b;
    float amax = 0.0f, nonfinite = 0.0f;
    for (int i = 0; i < 32; i++) {
        amax = fmaxf(amax, fabsf(x[i]));
        nonfinite += x[i] - x[i];
    }
    const float d = qm_block_scale(amax, nonfinite);
    float pre = 1.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
    if (id > FLT_MAX) {         /* see qm_tiny_block: x * 2^64 * (1 / (d * 2^64)), all exact scalings */
        pre = 0x1p64f;
        id = 1.0f / (d * pre);
    }
    int32_t sums[2] = {0, 0};
    for (int i = 0; i < 32; i++) {
        float v = nearbyintf(x[i] * pre * id);
        v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);   /* NaN stays NaN: cast below */
        q[i] = v == v ? (int8_t)v : 0;
        sums[i / 16] += q[i];
    }
    qm_finish_block(a, c, b, d, sums[0], sums[1]);
}


#if defined(QM_X86)
/* The 8 scales and minimums of a Q4_K / Q5_K block as floats (qm_kscales on 32-bit words) */
RV_INLINE void qm_kscales_f32(const uint8_t *s, __m256 *sc, __m256 *m)
{
    const uint32_t u0 = qm_load_u32(s), u1 = qm_load_u32(s + 4), u2 = qm_load_u32(s + 8);
    const uint32_t scl = u0 & 0x3f3f3f3fu, mnl = u1 & 0x3f3f3f3fu;
    const uint32_t sch = (u2 & 0x0f0f0f0fu) | ((u0 >> 2) & 0x30303030u);
    const uint32_t mnh = ((u2 >> 4) & 0x0f0f0f0fu) | ((u1 >> 2) & 0x30303030u);
    *sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, (int)sch, (int)scl)));
    *m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, (int)mnh, (int)mnl)));
}
#endif

/* ==== AVX-512 (with VNNI when RV_HAVE_VNNI) ==== */
#if defined(RV_ISA_AVX512)

#if defined(RV_HAVE_VNNI)
RV_INLINE __m512i qm_dot512(__m512i acc, __m512i u, __m512i q) { return _mm512_dpbusd_epi32(acc, u, q); }
#define QM_Q8_ZERO_POINT -128.0f
#else
/* u <= 63 here (Q8_0 uses the sign trick below), so the pairwise 16-bit sums never saturate */
RV_INLINE __m512i qm_dot512(__m512i acc, __m512i u, __m512i q)
{
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, q), _mm512_set1_epi16(1)));
}
#define QM_Q8_ZERO_POINT 0.0f
#endif

RV_INLINE float qm_hsum256(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Q8_0: two blocks per step from two 32-byte loads; each block's scale times the activations'
 * (VNNI: the codes + 128 as unsigned bytes, the zero point -128 applied with the block sums
 * in the odd lanes of f; without VNNI: |w| against q with w's sign); an odd last block the
 * portable code. */
RV_INLINE float qm_dot_q80_512(const uint8_t *row, int nb, const rv_qact *a, int c)
{
    const size_t kb = (size_t)a->k / 32;
    const int8_t *q = a->q + (size_t)c * a->k;
    const float *ds = a->ds + (size_t)c * kb * 2;
    const __m512 cm = _mm512_maskz_mov_ps(0x00AA, _mm512_set1_ps(QM_Q8_ZERO_POINT));   /* odd lanes of f */
    const __m512i pidx = _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
    __m512 acc = _mm512_setzero_ps();
    int b = 0;
    for (; b + 2 <= nb; b += 2) {
        const uint8_t *p0 = row + (size_t)b * 34, *p1 = p0 + 34;
        __m512i u, qv = _mm512_loadu_si512(q + 32 * b);
        const __m512i wv = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(p0 + 2))),
                                              _mm256_loadu_si256((const __m256i *)(p1 + 2)), 1);
#if defined(RV_HAVE_VNNI)
        u = _mm512_xor_si512(wv, _mm512_set1_epi8((char)0x80));
#else
        u = _mm512_abs_epi8(wv);
        qv = _mm512_mask_sub_epi8(qv, _mm512_movepi8_mask(wv), _mm512_setzero_si512(), qv);
#endif
        const uint32_t h0 = (qm_load_u32(p0) & 0xFFFF) * 0x10001u, h1 = (qm_load_u32(p1) & 0xFFFF) * 0x10001u;
        const __m512 f = _mm512_zextps128_ps512(_mm_mul_ps(
            _mm_cvtph_ps(_mm_insert_epi32(_mm_cvtsi32_si128((int)h0), (int)h1, 1)), _mm_loadu_ps(ds + 2 * b)));
        acc = _mm512_fmadd_ps(f, cm, acc);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(qm_dot512(_mm512_setzero_si512(), u, qv)),
                              _mm512_permutexvar_ps(pidx, f), acc);
    }
    const float tail = b < nb ? qm_dot_blocks_ref(RV_WT_Q8_0, row, b, nb, a, c) : 0.0f;
    return _mm512_reduce_add_ps(acc) + tail;
}

/* Q4_0 / Q4_1 matrix-vector: 4 rows x 4 blocks per step, so the activations' loads, the
 * float scaling and the final reduction are shared by 4 rows and no row waits on a chain of
 * its own (one row at a time ran at ~17 GB/s from cache, 4 at ~26; Zen 4, 1 thread).
 * Per row: two loads cover 4 blocks (Q4_1: 80 bytes); one word permute gathers their 64
 * nibble bytes; low nibbles against one load of the activations' nibble-order copy
 * (rv_qact.q4), high nibbles against the next, 16 int32 lanes, 4 per block. The 4 rows' lanes
 * are then summed per block and transposed into one vector (lane 4j + r: block j, row r),
 * the 4 rows' f16 headers gathered by two word permutes into the same lane order (d in the
 * low half, Q4_1's m / Q4_0's d in the high half), and one multiply-add by d * d_x and one by
 * m * s_x (Q4_0: -8 d * s_x) cover all 16 (row, block) pairs. 1-3 blocks past the last whole
 * group go through the same step with masked loads (zeros contribute nothing). */
static const uint16_t qm_idx_codes[2][32] = {   /* 4 blocks' nibble bytes from two loads */
    {1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17,                   /* Q4_0: 9 words */
     19, 20, 21, 22, 23, 24, 25, 26, 28, 29, 30, 31, 32, 33, 34, 35},
    {2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 14, 15, 16, 17, 18, 19,                   /* Q4_1: 10 words */
     22, 23, 24, 25, 26, 27, 28, 29, 32, 33, 34, 35, 36, 37, 38, 39}};
/* word 4j + r (and 16 + 4j + r) of a permute of rows (r & ~1, r | 1)'s first loads: block j's
 * d (and Q4_1's m, Q4_0's d again) of row r; rows 0/1 and 2/3 use the same indices */
static const uint16_t qm_idx_heads4[2][32] = {
    {0, 32, 0, 32, 9, 41, 9, 41, 18, 50, 18, 50, 27, 59, 27, 59,
     0, 32, 0, 32, 9, 41, 9, 41, 18, 50, 18, 50, 27, 59, 27, 59},
    {0, 32, 0, 32, 10, 42, 10, 42, 20, 52, 20, 52, 30, 62, 30, 62,
     1, 33, 1, 33, 11, 43, 11, 43, 21, 53, 21, 53, 31, 63, 31, 63}};

/* lane 4j + r: the sum of p_r's 4 lanes of block j */
RV_INLINE __m512i qm_transpose_sum4(__m512i p0, __m512i p1, __m512i p2, __m512i p3)
{
    const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(p0, p1), _mm512_unpackhi_epi32(p0, p1));
    const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(p2, p3), _mm512_unpackhi_epi32(p2, p3));
    return _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
}

/* the dot products of rows[0..3] (nb blocks each; rows may repeat) with column c */
RV_INLINE __m128 qm_dot4_q4_512(const int type, const uint8_t *const rows[4], int nb, const rv_qact *a, int c)
{
    const int bb = type == RV_WT_Q4_0 ? 18 : 20, t = type == RV_WT_Q4_1;
    const __mmask64 rest = (__mmask64)((1ull << (4 * bb - 64)) - 1);   /* bytes of the second load */
    const int8_t *q = a->q + (size_t)c * a->k, *q4 = a->q4 + (size_t)c * a->k;
    const float *ds = a->ds + (size_t)c * (a->k / 32) * 2;
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512i cidx = _mm512_loadu_si512(qm_idx_codes[t]), hidx = _mm512_loadu_si512(qm_idx_heads4[t]);
    const __m512i didx = _mm512_set_epi32(6, 6, 6, 6, 4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0);
    const __m512i sidx = _mm512_add_epi32(didx, _mm512_set1_epi32(1));
    __m512 acc = _mm512_setzero_ps(), macc = _mm512_setzero_ps();
    const int full = (a->k / 128) * 4;   /* blocks in whole groups of the nibble-order copy */
    for (int b = 0; b < nb; b += 4) {
        __m512i qlo, qhi, w0[4], w1[4];
        __m512 dsv;
        if (b + 4 <= full) {
            qlo = _mm512_loadu_si512(q4 + 32 * b);
            qhi = _mm512_loadu_si512(q4 + 32 * b + 64);
            dsv = _mm512_castps256_ps512(_mm256_loadu_ps(ds + 2 * b));
            for (int r = 0; r < 4; r++) {
                const uint8_t *p = rows[r] + (size_t)b * bb;
                w0[r] = _mm512_loadu_si512(p);
                w1[r] = _mm512_maskz_loadu_epi8(rest, p + 64);
            }
        } else {   /* nt = 1-3 blocks, codes in natural order [lo b, hi b, lo b+1, ...] */
            const int nt = nb - b;
            const __m512i qa = _mm512_maskz_loadu_epi8(nt >= 2 ? ~0ull : 0xFFFFFFFFull, q + 32 * b);
            const __m512i qb = _mm512_maskz_loadu_epi8(nt == 3 ? 0xFFFFFFFFull : 0, q + 32 * b + 64);
            qlo = _mm512_permutex2var_epi64(qa, _mm512_set_epi64(9, 8, 9, 8, 5, 4, 1, 0), qb);
            qhi = _mm512_permutex2var_epi64(qa, _mm512_set_epi64(11, 10, 11, 10, 7, 6, 3, 2), qb);
            dsv = _mm512_maskz_loadu_ps((__mmask16)((1u << (2 * nt)) - 1), ds + 2 * b);
            const __mmask64 wm = (__mmask64)((1ull << (bb * nt)) - 1);
            for (int r = 0; r < 4; r++) {
                w0[r] = _mm512_maskz_loadu_epi8(wm, rows[r] + (size_t)b * bb);
                w1[r] = _mm512_setzero_si512();
            }
        }
        __m512i pi[4];
        for (int r = 0; r < 4; r++) {
            const __m512i codes = _mm512_permutex2var_epi16(w0[r], cidx, w1[r]);
            const __m512i lo = _mm512_and_si512(codes, m4), hi = _mm512_and_si512(_mm512_srli_epi16(codes, 4), m4);
            pi[r] = qm_dot512(qm_dot512(_mm512_setzero_si512(), lo, qlo), hi, qhi);
        }
        const __m512i h = _mm512_mask_blend_epi16(0xCCCCCCCCu, _mm512_permutex2var_epi16(w0[0], hidx, w0[1]),
                                                  _mm512_permutex2var_epi16(w0[2], hidx, w0[3]));
        const __m512 dw = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
        const __m512 mw = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
        __m512 sx = _mm512_permutexvar_ps(sidx, dsv);
        if (type == RV_WT_Q4_0)
            sx = _mm512_mul_ps(sx, _mm512_set1_ps(-8.0f));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(qm_transpose_sum4(pi[0], pi[1], pi[2], pi[3])),
                              _mm512_mul_ps(dw, _mm512_permutexvar_ps(didx, dsv)), acc);
        macc = _mm512_fmadd_ps(mw, sx, macc);
    }
    acc = _mm512_add_ps(acc, macc);
    const __m256 v = _mm256_add_ps(_mm512_castps512_ps256(acc), _mm512_extractf32x8_ps(acc, 1));
    return _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
}

/* rows [r0, r1) of a Q4_0 / Q4_1 matrix, 4 at a time (a last partial 4 repeats its last row
 * and keeps only its own sums); prefetches `ahead` rows on */
static void qm_rows_q4_512(const rv_wmat *w, int r0, int r1, const rv_qact *a, float *y, ptrdiff_t ldy,
                           int accumulate, int ahead)
{
    const int nb = w->cols / 32;
    for (int r = r0; r < r1; r += 4) {
        const uint8_t *row = w->data + (size_t)r * w->row_bytes;
        if (r + 4 + ahead <= r1) {
            const uint8_t *pf = row + (size_t)ahead * w->row_bytes;
            for (size_t o = 0; o < 4 * w->row_bytes; o += 64)
                __builtin_prefetch(pf + o, 0, QM_PF_LOCALITY);
        }
        const uint8_t *rows[4];
        for (int i = 0; i < 4; i++)
            rows[i] = w->data + (size_t)(r + i < r1 ? r + i : r1 - 1) * w->row_bytes;
        for (int c = 0; c < a->n; c++) {
            float s[4];
            _mm_storeu_ps(s, w->type == RV_WT_Q4_1 ? qm_dot4_q4_512(RV_WT_Q4_1, rows, nb, a, c)
                                                   : qm_dot4_q4_512(RV_WT_Q4_0, rows, nb, a, c));
            float *out = y + (ptrdiff_t)c * ldy + (r - r0);
            for (int i = 0; i < 4 && r + i < r1; i++)
                out[i] = accumulate ? out[i] + s[i] : s[i];
        }
    }
}
#define QM_HAVE_ROWS_Q4 1
/* Q4_K / Q5_K: a 64-value chunk is 32 bytes of nibbles (low: sub-block 2j, high: 2j+1) */
RV_INLINE float qm_dot_q45k_512(const int type, const uint8_t *row, int nsb, const rv_qact *a, int c)
{
    const int bb = type == RV_WT_Q5_K ? 176 : 144;
    const int8_t *q = a->q + (size_t)c * a->k;
    const float *d = a->d + (size_t)c * (a->k / 32), *s = a->s32 + (size_t)c * (a->k / 32);
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    __m512 acc = _mm512_setzero_ps();
    __m256 macc = _mm256_setzero_ps();
    for (int sb = 0; sb < nsb; sb++) {
        const uint8_t *b = row + (size_t)sb * bb;
        __m256 scf, mf;
        qm_kscales_f32(b + 4, &scf, &mf);
        const __m256 sa = _mm256_mul_ps(_mm256_mul_ps(scf, _mm256_set1_ps(qm_h2f(b))), _mm256_loadu_ps(d + 8 * sb));
        macc = _mm256_fmadd_ps(_mm256_mul_ps(mf, _mm256_set1_ps(qm_h2f(b + 2))), _mm256_loadu_ps(s + 8 * sb), macc);
        const __m512 sv = _mm512_castps256_ps512(sa);
        const uint8_t *qs = b + (type == RV_WT_Q5_K ? 48 : 16);
        const __m512i hb = type == RV_WT_Q5_K ? _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b + 16)))
                                              : _mm512_setzero_si512();
        for (int j = 0; j < 4; j++) {
            const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(qs + 32 * j)));
            __m512i u = _mm512_and_si512(_mm512_mask_srli_epi16(v, 0xFFFF0000u, v, 4), m4);
            if (type == RV_WT_Q5_K) {
                const __m512i sel = _mm512_inserti64x4(_mm512_set1_epi8((char)(1 << (2 * j))),
                                                       _mm256_set1_epi8((char)(1 << (2 * j + 1))), 1);
                u = _mm512_mask_add_epi8(u, _mm512_test_epi8_mask(hb, sel), u, _mm512_set1_epi8(16));
            }
            const __m512i p = qm_dot512(_mm512_setzero_si512(), u, _mm512_loadu_si512(q + 256 * sb + 64 * j));
            const __m512i idx = _mm512_set_epi32(2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1,
                                                 2 * j + 1, 2 * j + 1, 2 * j, 2 * j, 2 * j, 2 * j, 2 * j, 2 * j,
                                                 2 * j, 2 * j);
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_permutexvar_ps(idx, sv), acc);
        }
    }
    return _mm512_reduce_add_ps(acc) - qm_hsum256(macc);
}

/* Q6_K: per 128-value half, 64 bytes of low nibbles and 32 of 2-bit highs; scales per 16 */
RV_INLINE float qm_dot_q6k_512(const uint8_t *row, int nsb, const rv_qact *a, int c)
{
    const int8_t *q = a->q + (size_t)c * a->k;
    const float *d = a->d + (size_t)c * (a->k / 32), *s16 = a->s16 + (size_t)c * (a->k / 16);
    const __m512i m4 = _mm512_set1_epi8(0x0F), m3 = _mm512_set1_epi8(3);
    const __m512i dup = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    __m512 acc = _mm512_setzero_ps(), macc = _mm512_setzero_ps();
    for (int sb = 0; sb < nsb; sb++) {
        const uint8_t *b = row + (size_t)sb * 210;
        const __m512 sw = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 192)))),
                                        _mm512_set1_ps(qm_h2f(b + 208)));
        const __m512 d16 = _mm512_permutexvar_ps(dup, _mm512_castps256_ps512(_mm256_loadu_ps(d + 8 * sb)));
        const __m512 sa = _mm512_mul_ps(sw, d16);
        macc = _mm512_fmadd_ps(sw, _mm512_loadu_ps(s16 + 16 * sb), macc);
        for (int h = 0; h < 2; h++) {
            const __m512i L = _mm512_loadu_si512(b + 64 * h);
            const __m512i H = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h)));
            const __m512i H4 = _mm512_srli_epi16(H, 4);
            const __m512i u0 = _mm512_or_si512(_mm512_and_si512(L, m4),
                _mm512_slli_epi16(_mm512_and_si512(_mm512_mask_srli_epi16(H, 0xFFFF0000u, H, 2), m3), 4));
            const __m512i u1 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(L, 4), m4),
                _mm512_slli_epi16(_mm512_and_si512(_mm512_mask_srli_epi16(H4, 0xFFFF0000u, H4, 2), m3), 4));
            const int8_t *qh = q + 256 * sb + 128 * h;
            const __m512i p0 = qm_dot512(_mm512_setzero_si512(), u0, _mm512_loadu_si512(qh));
            const __m512i p1 = qm_dot512(_mm512_setzero_si512(), u1, _mm512_loadu_si512(qh + 64));
            const int k0 = 8 * h, k1 = 8 * h + 4;   /* first sub-block of each chunk */
            const __m512i i0 = _mm512_set_epi32(k0 + 3, k0 + 3, k0 + 3, k0 + 3, k0 + 2, k0 + 2, k0 + 2, k0 + 2,
                                                k0 + 1, k0 + 1, k0 + 1, k0 + 1, k0, k0, k0, k0);
            const __m512i i1 = _mm512_add_epi32(i0, _mm512_set1_epi32(k1 - k0));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0), _mm512_permutexvar_ps(i0, sa), acc);
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p1), _mm512_permutexvar_ps(i1, sa), acc);
        }
    }
    return _mm512_reduce_add_ps(acc) - 32.0f * _mm512_reduce_add_ps(macc);
}

static float qm_dot_row(int type, const uint8_t *row, int nblocks, const rv_qact *a, int c)
{
    switch (type) {
    case RV_WT_Q8_0: return qm_dot_q80_512(row, nblocks, a, c);
    case RV_WT_Q4_K: return qm_dot_q45k_512(RV_WT_Q4_K, row, nblocks, a, c);
    case RV_WT_Q5_K: return qm_dot_q45k_512(RV_WT_Q5_K, row, nblocks, a, c);
    case RV_WT_Q6_K: return qm_dot_q6k_512(row, nblocks, a, c);
    default: return qm_dot_blocks_ref(type, row, 0, nblocks, a, c);
    }
}

static void qm_quantize_cols(rv_qact *a, int c0, int c1)
{
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    for (int c = c0; c < c1; c++) {
        const float *x = a->x + (ptrdiff_t)c * a->x_stride;
        int8_t *q = a->q + (size_t)c * a->k;
        for (int b = 0; b < a->k / 32; b++) {
            const __m512 x0 = _mm512_loadu_ps(x + 32 * b), x1 = _mm512_loadu_ps(x + 32 * b + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
            const __m512 z = _mm512_add_ps(_mm512_sub_ps(x0, x0), _mm512_sub_ps(x1, x1));
            const float d = qm_block_scale(amax, _mm512_cmp_ps_mask(z, z, _CMP_UNORD_Q) ? NAN : 0.0f);
            const float id = d > 0.0f ? 1.0f / d : 0.0f;
            if (qm_tiny_block(id)) {
                qm_quantize_block_ref(a, c, b);
                continue;
            }
            const __m512 vid = _mm512_set1_ps(id);
            const __m512i i0 = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(x0, vid)), lo), hi);
            const __m512i i1 = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(x1, vid)), lo), hi);
            _mm_storeu_si128((__m128i *)(q + 32 * b), _mm512_cvtsepi32_epi8(i0));
            _mm_storeu_si128((__m128i *)(q + 32 * b + 16), _mm512_cvtsepi32_epi8(i1));
            qm_finish_block(a, c, b, d, _mm512_reduce_add_epi32(i0), _mm512_reduce_add_epi32(i1));
        }
    }
}

RV_INLINE rv_vf qm_vf_load_bf16(const uint16_t *p)
{
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
RV_INLINE rv_vf qm_vf_div(rv_vf a, rv_vf b) { return _mm512_div_ps(a, b); }

/* ==== AVX2 (+FMA, F16C) ==== */
#elif defined(RV_ISA_AVX2)

RV_INLINE __m256i qm_dot256(__m256i u, __m256i q)
{
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, q), _mm256_set1_epi16(1));
}

/* Q4_0 / Q4_1 / Q8_0 as on AVX-512: each pair of header fields times the activations' (d, s)
 * pair in one vector (even lanes: the block's scale, odd lanes: its sum's coefficient, folded
 * into the accumulator); two Q4 blocks per vector against the nibble-order activations, one
 * Q8_0 block per vector as |w| times q with w's sign (16-bit pair sums below 2^15). */
RV_INLINE float qm_dot_b32_256(const int type, const uint8_t *row, int nb, const rv_qact *a, int c)
{
    const int bb = type == RV_WT_Q4_0 ? 18 : type == RV_WT_Q4_1 ? 20 : 34;
    const int off = type == RV_WT_Q4_1 ? 4 : 2;
    const size_t kb = (size_t)a->k / 32;
    const int8_t *q = a->q + (size_t)c * a->k, *q4 = a->q4 + (size_t)c * a->k;
    const float *ds = a->ds + (size_t)c * kb * 2;
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const float corr = type == RV_WT_Q4_0 ? -8.0f : type == RV_WT_Q4_1 ? 1.0f : 0.0f;
    const __m256 cm = _mm256_setr_ps(0, corr, 0, corr, 0, 0, 0, 0);
    const int full = (a->k / 128) * 4;   /* blocks in whole groups of the nibble-order copy */
    __m256 acc = _mm256_setzero_ps();
    int b = 0;
    if (type == RV_WT_Q8_0) {
        for (; b < nb; b++) {
            const uint8_t *p = row + (size_t)b * bb;
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(p + 2));
            const __m256i qv = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(q + 32 * b)), wv);
            const __m256i pi = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(wv), qv), ones);
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pi), _mm256_set1_ps(qm_h2f(p) * ds[2 * b]), acc);
        }
        return rv_vf_hsum(acc);
    }
    for (; b + 2 <= nb; b += 2) {
        const uint8_t *p0 = row + (size_t)b * bb, *p1 = p0 + bb;
        const __m256i v = _mm256_loadu2_m128i((const __m128i *)(p1 + off), (const __m128i *)(p0 + off));
        const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        __m256i qlo, qhi;
        if (b + 2 <= full) {   /* low halves of blocks b, b+1 contiguous in q4, high halves 64 on */
            const int8_t *qq = q4 + 128 * (b / 4) + 16 * (b % 4);
            qlo = _mm256_loadu_si256((const __m256i *)qq);
            qhi = _mm256_loadu_si256((const __m256i *)(qq + 64));
        } else {
            const int8_t *q0 = q + 32 * b;
            qlo = _mm256_loadu2_m128i((const __m128i *)(q0 + 32), (const __m128i *)q0);
            qhi = _mm256_loadu2_m128i((const __m128i *)(q0 + 48), (const __m128i *)(q0 + 16));
        }
        /* two pair sums of <= 2 * 15 * 127 each: still below 2^15 */
        const __m256i pi = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, qlo),
                                                              _mm256_maddubs_epi16(hi, qhi)), ones);
        uint32_t h0 = qm_load_u32(p0), h1 = qm_load_u32(p1);
        if (type != RV_WT_Q4_1) {
            h0 = (h0 & 0xFFFF) * 0x10001u;
            h1 = (h1 & 0xFFFF) * 0x10001u;
        }
        const __m256 f = _mm256_castps128_ps256(_mm_mul_ps(
            _mm_cvtph_ps(_mm_insert_epi32(_mm_cvtsi32_si128((int)h0), (int)h1, 1)), _mm_loadu_ps(ds + 2 * b)));
        acc = _mm256_fmadd_ps(_mm256_insertf128_ps(f, _mm_setzero_ps(), 1), cm, acc);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pi),
                              _mm256_permutevar8x32_ps(f, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2)), acc);
    }
    const float tail = b < nb ? qm_dot_blocks_ref(type, row, b, nb, a, c) : 0.0f;
    return rv_vf_hsum(acc) + tail;
}

RV_INLINE float qm_dot_q45k_256(const int type, const uint8_t *row, int nsb, const rv_qact *a, int c)
{
    const int bb = type == RV_WT_Q5_K ? 176 : 144;
    const int8_t *q = a->q + (size_t)c * a->k;
    const float *d = a->d + (size_t)c * (a->k / 32), *s = a->s32 + (size_t)c * (a->k / 32);
    const __m256i m4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
    __m256 acc = _mm256_setzero_ps(), macc = _mm256_setzero_ps();
    float sa[8];
    for (int sb = 0; sb < nsb; sb++) {
        const uint8_t *b = row + (size_t)sb * bb;
        __m256 scf, mf;
        qm_kscales_f32(b + 4, &scf, &mf);
        _mm256_storeu_ps(sa, _mm256_mul_ps(_mm256_mul_ps(scf, _mm256_set1_ps(qm_h2f(b))), _mm256_loadu_ps(d + 8 * sb)));
        macc = _mm256_fmadd_ps(_mm256_mul_ps(mf, _mm256_set1_ps(qm_h2f(b + 2))), _mm256_loadu_ps(s + 8 * sb), macc);
        const uint8_t *qs = b + (type == RV_WT_Q5_K ? 48 : 16);
        const __m256i hb = _mm256_loadu_si256((const __m256i *)(b + 16));
        for (int j = 0; j < 4; j++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));
            __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            if (type == RV_WT_Q5_K) {
                lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(
                         _mm256_srl_epi16(hb, _mm_cvtsi32_si128(2 * j)), one), 4));
                hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(
                         _mm256_srl_epi16(hb, _mm_cvtsi32_si128(2 * j + 1)), one), 4));
            }
            const int8_t *qc = q + 256 * sb + 64 * j;
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(qm_dot256(lo, _mm256_loadu_si256((const __m256i *)qc))),
                                  _mm256_set1_ps(sa[2 * j]), acc);
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(qm_dot256(hi, _mm256_loadu_si256((const __m256i *)(qc + 32)))),
                                  _mm256_set1_ps(sa[2 * j + 1]), acc);
        }
    }
    return rv_vf_hsum(acc) - rv_vf_hsum(macc);
}

RV_INLINE float qm_dot_q6k_256(const uint8_t *row, int nsb, const rv_qact *a, int c)
{
    const int8_t *q = a->q + (size_t)c * a->k;
    const float *d = a->d + (size_t)c * (a->k / 32), *s16 = a->s16 + (size_t)c * (a->k / 16);
    const __m256i m4 = _mm256_set1_epi8(0x0F), m3 = _mm256_set1_epi8(3);
    const __m256i dup_lo = _mm256_set_epi32(3, 3, 2, 2, 1, 1, 0, 0), dup_hi = _mm256_set_epi32(7, 7, 6, 6, 5, 5, 4, 4);
    __m256 acc = _mm256_setzero_ps(), macc = _mm256_setzero_ps();
    for (int sb = 0; sb < nsb; sb++) {
        const uint8_t *b = row + (size_t)sb * 210;
        const __m256 dd = _mm256_set1_ps(qm_h2f(b + 208));
        const __m128i scb = _mm_loadu_si128((const __m128i *)(b + 192));
        const __m256 d8 = _mm256_loadu_ps(d + 8 * sb);
        __m256 sa[2];
        for (int h = 0; h < 2; h++) {
            const __m256 sw = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(h ? _mm_srli_si128(scb, 8) : scb)), dd);
            sa[h] = _mm256_mul_ps(sw, _mm256_permutevar8x32_ps(d8, h ? dup_hi : dup_lo));
            macc = _mm256_fmadd_ps(sw, _mm256_loadu_ps(s16 + 16 * sb + 8 * h), macc);
        }
        for (int h = 0; h < 2; h++) {
            const __m256i L0 = _mm256_loadu_si256((const __m256i *)(b + 64 * h));
            const __m256i L1 = _mm256_loadu_si256((const __m256i *)(b + 64 * h + 32));
            const __m256i H = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h));
            __m256i u[4];
            u[0] = _mm256_or_si256(_mm256_and_si256(L0, m4), _mm256_slli_epi16(_mm256_and_si256(H, m3), 4));
            u[1] = _mm256_or_si256(_mm256_and_si256(L1, m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(H, 2), m3), 4));
            u[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(L0, 4), m4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(H, 4), m3), 4));
            u[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(L1, 4), m4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(H, 6), m3), 4));
            for (int i = 0; i < 4; i++) {
                const __m256i idx = _mm256_set_epi32(2 * i + 1, 2 * i + 1, 2 * i + 1, 2 * i + 1, 2 * i, 2 * i, 2 * i, 2 * i);
                const __m256i p = qm_dot256(u[i], _mm256_loadu_si256((const __m256i *)(q + 256 * sb + 128 * h + 32 * i)));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_permutevar8x32_ps(sa[h], idx), acc);
            }
        }
    }
    return rv_vf_hsum(acc) - 32.0f * rv_vf_hsum(macc);
}

static float qm_dot_row(int type, const uint8_t *row, int nblocks, const rv_qact *a, int c)
{
    switch (type) {
    case RV_WT_Q4_0: return qm_dot_b32_256(RV_WT_Q4_0, row, nblocks, a, c);
    case RV_WT_Q4_1: return qm_dot_b32_256(RV_WT_Q4_1, row, nblocks, a, c);
    case RV_WT_Q8_0: return qm_dot_b32_256(RV_WT_Q8_0, row, nblocks, a, c);
    case RV_WT_Q4_K: return qm_dot_q45k_256(RV_WT_Q4_K, row, nblocks, a, c);
    case RV_WT_Q5_K: return qm_dot_q45k_256(RV_WT_Q5_K, row, nblocks, a, c);
    case RV_WT_Q6_K: return qm_dot_q6k_256(row, nblocks, a, c);
    default: return qm_dot_blocks_ref(type, row, 0, nblocks, a, c);
    }
}

static void qm_quantize_cols(rv_qact *a, int c0, int c1)
{
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
    const __m256i order = _mm256_set_epi32(7, 3, 6, 2, 5, 1, 4, 0);
    for (int c = c0; c < c1; c++) {
        const float *x = a->x + (ptrdiff_t)c * a->x_stride;
        int8_t *q = a->q + (size_t)c * a->k;
        for (int b = 0; b < a->k / 32; b++) {
            __m256 v[4], m = _mm256_setzero_ps(), z = _mm256_setzero_ps();
            for (int i = 0; i < 4; i++) {
                v[i] = _mm256_loadu_ps(x + 32 * b + 8 * i);
                m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
                z = _mm256_add_ps(z, _mm256_sub_ps(v[i], v[i]));
            }
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
            const float d = qm_block_scale(_mm_cvtss_f32(m4),
                                           _mm256_movemask_ps(_mm256_cmp_ps(z, z, _CMP_UNORD_Q)) ? NAN : 0.0f);
            const float id = d > 0.0f ? 1.0f / d : 0.0f;
            if (qm_tiny_block(id)) {
                qm_quantize_block_ref(a, c, b);
                continue;
            }
            __m256i iv[4];
            for (int i = 0; i < 4; i++)
                iv[i] = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(id))), lo), hi);
            const __m256i s01 = _mm256_add_epi32(iv[0], iv[1]), s23 = _mm256_add_epi32(iv[2], iv[3]);
            const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]), _mm256_packs_epi32(iv[2], iv[3]));
            _mm256_storeu_si256((__m256i *)(q + 32 * b), _mm256_permutevar8x32_epi32(p, order));
            const __m256 f = _mm256_cvtepi32_ps(_mm256_hadd_epi32(s01, s23));
            /* hadd lanes: [s01 pairs | s23 pairs] per 128-bit half; totals are exact small ints */
            float t[8];
            _mm256_storeu_ps(t, f);
            qm_finish_block(a, c, b, d, (int32_t)(t[0] + t[1] + t[4] + t[5]), (int32_t)(t[2] + t[3] + t[6] + t[7]));
        }
    }
}

RV_INLINE rv_vf qm_vf_load_bf16(const uint16_t *p)
{
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
RV_INLINE rv_vf qm_vf_div(rv_vf a, rv_vf b) { return _mm256_div_ps(a, b); }

/* ==== NEON (baseline ARMv8; SDOT when the compiler targets it) ==== */
#elif defined(RV_ISA_NEON)

/* codes <= 63 (or Q8_0's signed ones), |q| <= 127: pairwise 16-bit sums stay below 2^15 */
RV_INLINE int32x4_t qm_dot_neon(int32x4_t acc, int8x16_t u, int8x16_t q)
{
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(acc, u, q);
#else
    int16x8_t p = vmull_s8(vget_low_s8(u), vget_low_s8(q));
    p = vmlal_s8(p, vget_high_s8(u), vget_high_s8(q));
    return vpadalq_s16(acc, p);
#endif
}

RV_INLINE int32_t qm_dot32_neon(uint8x16_t u0, uint8x16_t u1, const int8_t *q)
{
    int32x4_t acc = qm_dot_neon(vdupq_n_s32(0), vreinterpretq_s8_u8(u0), vld1q_s8(q));
    acc = qm_dot_neon(acc, vreinterpretq_s8_u8(u1), vld1q_s8(q + 16));
    return vaddvq_s32(acc);
}

RV_INLINE float qm_dot_b32_neon(const int type, const uint8_t *row, int nb, const rv_qact *a, int c)
{
    const int bb = type == RV_WT_Q4_0 ? 18 : type == RV_WT_Q4_1 ? 20 : 34;
    const int8_t *q = a->q + (size_t)c * a->k;
    const float *d = a->d + (size_t)c * (a->k / 32), *s = a->s32 + (size_t)c * (a->k / 32);
    const uint8x16_t m4 = vdupq_n_u8(0x0F);
    float acc = 0.0f, corr = 0.0f;
    for (int b = 0; b < nb; b++) {
        const uint8_t *p = row + (size_t)b * bb;
        int32_t isum;
        if (type == RV_WT_Q8_0) {   /* signed weights directly: no zero point */
            int32x4_t t = qm_dot_neon(vdupq_n_s32(0), vld1q_s8((const int8_t *)p + 2), vld1q_s8(q + 32 * b));
            t = qm_dot_neon(t, vld1q_s8((const int8_t *)p + 18), vld1q_s8(q + 32 * b + 16));
            isum = vaddvq_s32(t);
        } else {
            const uint8x16_t nib = vld1q_u8(p + (type == RV_WT_Q4_1 ? 4 : 2));
            isum = qm_dot32_neon(vandq_u8(nib, m4), vshrq_n_u8(nib, 4), q + 32 * b);
        }
        const float dw = qm_h2f(p);
        acc += dw * d[b] * (float)isum;
        if (type == RV_WT_Q4_1)
            corr += qm_h2f(p + 2) * s[b];
        else if (type == RV_WT_Q4_0)
            corr -= 8.0f * dw * s[b];
    }
    return acc + corr;
}

RV_INLINE float qm_dot_q45k_neon(const int type, const uint8_t *row, int nsb, const rv_qact *a, int c)
{
    const int bb = type == RV_WT_Q5_K ? 176 : 144;
    const int8_t *q = a->q + (size_t)c * a->k;
    const float *d = a->d + (size_t)c * (a->k / 32), *s = a->s32 + (size_t)c * (a->k / 32);
    const uint8x16_t m4 = vdupq_n_u8(0x0F), one = vdupq_n_u8(1);
    float acc = 0.0f;
    for (int sb = 0; sb < nsb; sb++) {
        const uint8_t *b = row + (size_t)sb * bb;
        uint8_t sc[8], m[8];
        qm_kscales(b + 4, sc, m);
        const float dd = qm_h2f(b), dmin = qm_h2f(b + 2);
        const uint8_t *qs = b + (type == RV_WT_Q5_K ? 48 : 16);
        const uint8x16_t h0 = vld1q_u8(b + 16), h1 = vld1q_u8(b + 32);
        for (int j = 0; j < 4; j++) {
            const uint8x16_t v0 = vld1q_u8(qs + 32 * j), v1 = vld1q_u8(qs + 32 * j + 16);
            uint8x16_t lo0 = vandq_u8(v0, m4), lo1 = vandq_u8(v1, m4), hi0 = vshrq_n_u8(v0, 4), hi1 = vshrq_n_u8(v1, 4);
            if (type == RV_WT_Q5_K) {
                const int8x16_t sl = vdupq_n_s8((int8_t)(-2 * j)), sh = vdupq_n_s8((int8_t)(-2 * j - 1));
                lo0 = vorrq_u8(lo0, vshlq_n_u8(vandq_u8(vshlq_u8(h0, sl), one), 4));
                lo1 = vorrq_u8(lo1, vshlq_n_u8(vandq_u8(vshlq_u8(h1, sl), one), 4));
                hi0 = vorrq_u8(hi0, vshlq_n_u8(vandq_u8(vshlq_u8(h0, sh), one), 4));
                hi1 = vorrq_u8(hi1, vshlq_n_u8(vandq_u8(vshlq_u8(h1, sh), one), 4));
            }
            const int8_t *qc = q + 256 * sb + 64 * j;
            const int e = 8 * sb + 2 * j;
            acc += dd * sc[2 * j] * d[e] * (float)qm_dot32_neon(lo0, lo1, qc) - dmin * m[2 * j] * s[e];
            acc += dd * sc[2 * j + 1] * d[e + 1] * (float)qm_dot32_neon(hi0, hi1, qc + 32) - dmin * m[2 * j + 1] * s[e + 1];
        }
    }
    return acc;
}

RV_INLINE float qm_dot_q6k_neon(const uint8_t *row, int nsb, const rv_qact *a, int c)
{
    const int8_t *q = a->q + (size_t)c * a->k;
    const float *d = a->d + (size_t)c * (a->k / 32), *s16 = a->s16 + (size_t)c * (a->k / 16);
    const uint8x16_t m4 = vdupq_n_u8(0x0F), m3 = vdupq_n_u8(3);
    float acc = 0.0f;
    for (int sb = 0; sb < nsb; sb++) {
        const uint8_t *b = row + (size_t)sb * 210;
        const int8_t *sc = (const int8_t *)(b + 192);
        const float dd = qm_h2f(b + 208);
        for (int h = 0; h < 2; h++)
            for (int half = 0; half < 2; half++) {   /* 16 of the 32 l indexes at a time */
                const int o = 16 * half;
                const uint8x16_t a0 = vld1q_u8(b + 64 * h + o), c0 = vld1q_u8(b + 64 * h + 32 + o);
                const uint8x16_t e = vld1q_u8(b + 128 + 32 * h + o);
                uint8x16_t u[4];
                u[0] = vorrq_u8(vandq_u8(a0, m4), vshlq_n_u8(vandq_u8(e, m3), 4));
                u[1] = vorrq_u8(vandq_u8(c0, m4), vshlq_n_u8(vandq_u8(vshrq_n_u8(e, 2), m3), 4));
                u[2] = vorrq_u8(vshrq_n_u8(a0, 4), vshlq_n_u8(vandq_u8(vshrq_n_u8(e, 4), m3), 4));
                u[3] = vorrq_u8(vshrq_n_u8(c0, 4), vshlq_n_u8(vshrq_n_u8(e, 6), 4));
                for (int i = 0; i < 4; i++) {
                    const int e0 = 128 * h + 32 * i + o, j = e0 / 16;   /* element, sub-block (global in sb) */
                    const int32_t isum = vaddvq_s32(qm_dot_neon(vdupq_n_s32(0), vreinterpretq_s8_u8(u[i]),
                                                                vld1q_s8(q + 256 * sb + e0)));
                    const float sw = dd * sc[j];
                    acc += sw * d[8 * sb + e0 / 32] * (float)isum - 32.0f * sw * s16[16 * sb + j];
                }
            }
    }
    return acc;
}

static float qm_dot_row(int type, const uint8_t *row, int nblocks, const rv_qact *a, int c)
{
    switch (type) {
    case RV_WT_Q4_0: return qm_dot_b32_neon(RV_WT_Q4_0, row, nblocks, a, c);
    case RV_WT_Q4_1: return qm_dot_b32_neon(RV_WT_Q4_1, row, nblocks, a, c);
    case RV_WT_Q8_0: return qm_dot_b32_neon(RV_WT_Q8_0, row, nblocks, a, c);
    case RV_WT_Q4_K: return qm_dot_q45k_neon(RV_WT_Q4_K, row, nblocks, a, c);
    case RV_WT_Q5_K: return qm_dot_q45k_neon(RV_WT_Q5_K, row, nblocks, a, c);
    case RV_WT_Q6_K: return qm_dot_q6k_neon(row, nblocks, a, c);
    default: return qm_dot_blocks_ref(type, row, 0, nblocks, a, c);
    }
}

static void qm_quantize_cols(rv_qact *a, int c0, int c1)
{
    for (int c = c0; c < c1; c++) {
        const float *x = a->x + (ptrdiff_t)c * a->x_stride;
        int8_t *q = a->q + (size_t)c * a->k;
        for (int b = 0; b < a->k / 32; b++) {
            float32x4_t v[8], m = vdupq_n_f32(0.0f), z = vdupq_n_f32(0.0f);
            for (int i = 0; i < 8; i++) {
                v[i] = vld1q_f32(x + 32 * b + 4 * i);
                m = vmaxq_f32(m, vabsq_f32(v[i]));
                z = vaddq_f32(z, vsubq_f32(v[i], v[i]));
            }
            const float d = qm_block_scale(vmaxvq_f32(m), vminvq_u32(vceqq_f32(z, z)) ? 0.0f : NAN);
            const float id = d > 0.0f ? 1.0f / d : 0.0f;
            if (qm_tiny_block(id)) {
                qm_quantize_block_ref(a, c, b);
                continue;
            }
            int32_t sums[2] = {0, 0};
            for (int i = 0; i < 8; i++) {
                int32x4_t iv = vcvtnq_s32_f32(vmulq_n_f32(v[i], id));
                iv = vminq_s32(vmaxq_s32(iv, vdupq_n_s32(-127)), vdupq_n_s32(127));
                sums[i / 4] += vaddvq_s32(iv);
                const int8x8_t n8 = vqmovn_s16(vcombine_s16(vqmovn_s32(iv), vdup_n_s16(0)));
                vst1_lane_s32((int32_t *)(void *)(q + 32 * b + 4 * i), vreinterpret_s32_s8(n8), 0);
            }
            qm_finish_block(a, c, b, d, sums[0], sums[1]);
        }
    }
}

RV_INLINE rv_vf qm_vf_load_bf16(const uint16_t *p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
RV_INLINE rv_vf qm_vf_div(rv_vf a, rv_vf b) { return vdivq_f32(a, b); }

/* ==== scalar: the portable reference ==== */
#else

static float qm_dot_row(int type, const uint8_t *row, int nblocks, const rv_qact *a, int c)
{
    return qm_dot_blocks_ref(type, row, 0, nblocks, a, c);
}

static void qm_quantize_cols(rv_qact *a, int c0, int c1)
{
    for (int c = c0; c < c1; c++)
        for (int b = 0; b < a->k / 32; b++)
            qm_quantize_block_ref(a, c, b);
}

RV_INLINE rv_vf qm_vf_load_bf16(const uint16_t *p) { return qm_bf2f(*p); }
RV_INLINE rv_vf qm_vf_div(rv_vf a, rv_vf b) { return a / b; }

#endif

/* ==== matrix-matrix: packed panels (x86) ====
 * Codes of RV_WMM_PANEL rows (QM_PR of them per vector, one 32-bit lane per row) laid out
 * [k/4][QM_PR][4 codes], so a vector holds 4 consecutive codes of each of QM_PR rows; the
 * sub-block scales and sum coefficients [k/g][QM_PR] beside them. */
#if defined(QM_X86)
#if defined(RV_ISA_AVX512)
#define QM_PR 16
#define QM_NC 6
typedef __m512i qm_vi;
RV_INLINE qm_vi qm_vi_zero(void) { return _mm512_setzero_si512(); }
RV_INLINE qm_vi qm_vi_load(const void *p) { return _mm512_loadu_si512(p); }
RV_INLINE qm_vi qm_vi_set1(uint32_t x) { return _mm512_set1_epi32((int)x); }
RV_INLINE rv_vf qm_vi_cvt(qm_vi v) { return _mm512_cvtepi32_ps(v); }
#if defined(RV_HAVE_VNNI)
RV_INLINE qm_vi qm_gdot(qm_vi acc, qm_vi w, qm_vi q) { return _mm512_dpbusd_epi32(acc, w, q); }
#define QM_GEMM_Q8 1      /* u = q + 128 fits VPDPBUSD (no 16-bit intermediate) */
#else
RV_INLINE qm_vi qm_gdot(qm_vi acc, qm_vi w, qm_vi q) { return qm_dot512(acc, w, q); }
#define QM_GEMM_Q8 0
#endif
#else
#define QM_PR 8
#define QM_NC 4
typedef __m256i qm_vi;
RV_INLINE qm_vi qm_vi_zero(void) { return _mm256_setzero_si256(); }
RV_INLINE qm_vi qm_vi_load(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
RV_INLINE qm_vi qm_vi_set1(uint32_t x) { return _mm256_set1_epi32((int)x); }
RV_INLINE rv_vf qm_vi_cvt(qm_vi v) { return _mm256_cvtepi32_ps(v); }
RV_INLINE qm_vi qm_gdot(qm_vi acc, qm_vi w, qm_vi q) { return _mm256_add_epi32(acc, qm_dot256(w, q)); }
#define QM_GEMM_Q8 0
#endif
#define QM_GEMM_MIN_COLS 4   /* fewer columns: streaming the rows once per column wins */

#if RV_WMM_PANEL % QM_PR
#error "RV_WMM_PANEL must be a multiple of the panel vector's rows"
#endif

/* Pack rows [r0, r0 + nr) (nr <= QM_PR) for the panel kernel; lanes past nr get zeros. */
static void qm_pack(const rv_wmat *w, int r0, int nr, uint8_t *pk, float *psw, float *pcw, uint8_t *tmp)
{
    const int K = w->cols, type = w->type, g = qm_sub(type), bv = rv_wtype_block_values(type);
    const int bb = rv_wtype_block_bytes(type), nsub = K / g, per_block = bv / g;
    float sw[16], cw[16];
    for (int i = 0; i < QM_PR; i++) {
        if (i >= nr) {
            memset(tmp, 0, (size_t)K);
            for (int j = 0; j < nsub; j++)
                psw[j * QM_PR + i] = pcw[j * QM_PR + i] = 0.0f;
        } else {
            const uint8_t *row = w->data + (size_t)(r0 + i) * w->row_bytes;
            for (int b = 0; b < K / bv; b++) {
                qm_unpack_block(type, row + (size_t)b * bb, tmp + (size_t)b * bv, sw, cw);
                for (int j = 0; j < per_block; j++) {
                    psw[(b * per_block + j) * QM_PR + i] = sw[j];
                    pcw[(b * per_block + j) * QM_PR + i] = cw[j];
                }
            }
        }
        uint32_t *dst = (uint32_t *)(void *)pk + i;
        for (int k4 = 0; k4 < K / 4; k4++)
            memcpy(dst + (size_t)k4 * QM_PR, tmp + 4 * k4, 4);
    }
}

/* nc (<= QM_NC, a compile-time constant where inlined) columns from c0 of one packed panel */
RV_INLINE void qm_panel_cols(const uint8_t *pk, const float *psw, const float *pcw, int K, int g,
                             const rv_qact *a, int c0, const int nc, float *y, ptrdiff_t ldy, int r0,
                             int nr, int accumulate)
{
    rv_vf facc[QM_NC];
    const int8_t *qc[QM_NC];
    const float *dc[QM_NC], *sc[QM_NC];
    for (int c = 0; c < nc; c++) {
        facc[c] = rv_vf_zero();
        qc[c] = a->q + (size_t)(c0 + c) * K;
        dc[c] = a->d + (size_t)(c0 + c) * (K / 32);
        sc[c] = g == 16 ? a->s16 + (size_t)(c0 + c) * (K / 16) : a->s32 + (size_t)(c0 + c) * (K / 32);
    }
    const int steps = g / 4, nsub = K / g;
    for (int j = 0; j < nsub; j++) {
        qm_vi iacc[QM_NC];
        for (int c = 0; c < nc; c++)
            iacc[c] = qm_vi_zero();
        const uint8_t *wp = pk + (size_t)j * steps * QM_PR * 4;
        for (int s = 0; s < steps; s++) {
            const qm_vi wv = qm_vi_load(wp + (size_t)s * QM_PR * 4);
            for (int c = 0; c < nc; c++)
                iacc[c] = qm_gdot(iacc[c], wv, qm_vi_set1(qm_load_u32((const uint8_t *)(qc[c] + j * g + 4 * s))));
        }
        const rv_vf swv = rv_vf_load(psw + (size_t)j * QM_PR), cwv = rv_vf_load(pcw + (size_t)j * QM_PR);
        const int blk = j * g / 32;
        for (int c = 0; c < nc; c++) {
            facc[c] = rv_vf_fmadd(qm_vi_cvt(iacc[c]), rv_vf_mul(swv, rv_vf_set1(dc[c][blk])), facc[c]);
            facc[c] = rv_vf_fmadd(cwv, rv_vf_set1(sc[c][j]), facc[c]);
        }
    }
    for (int c = 0; c < nc; c++) {
        float *out = y + (ptrdiff_t)(c0 + c) * ldy + r0;   /* r0: this panel's offset in y */
        if (nr == QM_PR) {
            rv_vf_store(out, accumulate ? rv_vf_add(rv_vf_load(out), facc[c]) : facc[c]);
        } else {
            float t[QM_PR];
            rv_vf_store(t, facc[c]);
            for (int i = 0; i < nr; i++)
                out[i] = accumulate ? out[i] + t[i] : t[i];
        }
    }
}

static void qm_gemm(const rv_wmat *w, int r0, int r1, const rv_qact *a, float *y, ptrdiff_t ldy,
                    int accumulate, void *scratch)
{
    const int K = w->cols, g = qm_sub(w->type);
    uint8_t *pk = (uint8_t *)scratch;
    float *psw = (float *)(void *)(pk + (size_t)RV_WMM_PANEL * K);
    float *pcw = psw + (size_t)RV_WMM_PANEL * (K / 16);
    uint8_t *tmp = (uint8_t *)(pcw + (size_t)RV_WMM_PANEL * (K / 16));
    for (int p = r0; p < r1; p += QM_PR) {
        const int nr = r1 - p < QM_PR ? r1 - p : QM_PR;
        qm_pack(w, p, nr, pk, psw, pcw, tmp);
        int c0 = 0;
        for (; c0 + QM_NC <= a->n; c0 += QM_NC)
            qm_panel_cols(pk, psw, pcw, K, g, a, c0, QM_NC, y, ldy, p - r0, nr, accumulate);
        switch (a->n - c0) {
#if QM_NC > 5
        case 5: qm_panel_cols(pk, psw, pcw, K, g, a, c0, 5, y, ldy, p - r0, nr, accumulate); break;
        case 4: qm_panel_cols(pk, psw, pcw, K, g, a, c0, 4, y, ldy, p - r0, nr, accumulate); break;
#endif
        case 3: qm_panel_cols(pk, psw, pcw, K, g, a, c0, 3, y, ldy, p - r0, nr, accumulate); break;
        case 2: qm_panel_cols(pk, psw, pcw, K, g, a, c0, 2, y, ldy, p - r0, nr, accumulate); break;
        case 1: qm_panel_cols(pk, psw, pcw, K, g, a, c0, 1, y, ldy, p - r0, nr, accumulate); break;
        default: break;
        }
    }
}

RV_INLINE int qm_use_gemm(int type, int ncols)
{
    return ncols >= QM_GEMM_MIN_COLS && !rv_wtype_is_float(type) && (type != RV_WT_Q8_0 || QM_GEMM_Q8);
}
#else
RV_INLINE int qm_use_gemm(int type, int ncols) { (void)type; (void)ncols; return 0; }
static void qm_gemm(const rv_wmat *w, int r0, int r1, const rv_qact *a, float *y, ptrdiff_t ldy,
                    int accumulate, void *scratch)
{
    (void)w; (void)r0; (void)r1; (void)a; (void)y; (void)ldy; (void)accumulate; (void)scratch;
}
#endif

/* ==== the table's entries ==== */


/* float weights: each row converted once (F16 / BF16) and dotted with every column */
static void qm_float_rows(const rv_wmat *w, int r0, int r1, const rv_qact *a, float *y, ptrdiff_t ldy,
                          int accumulate, float *rowbuf)
{
    const int K = w->cols;
    for (int r = r0; r < r1; r++) {
        const uint8_t *row = w->data + (size_t)r * w->row_bytes;
        const float *wf = rowbuf;
        if (w->type == RV_WT_F32) {
            wf = (const float *)(const void *)row;
        } else {
            const uint16_t *h = (const uint16_t *)(const void *)row;
            int i = 0;
#if RV_VW > 1
            for (; i + RV_VW <= K; i += RV_VW)
                rv_vf_store(rowbuf + i, w->type == RV_WT_F16 ? rv_vf_load_f16(h + i) : qm_vf_load_bf16(h + i));
#endif
            for (; i < K; i++)
                rowbuf[i] = w->type == RV_WT_F16 ? rv_f16_to_f32(h[i]) : qm_bf2f(h[i]);
        }
        for (int c = 0; c < a->n; c++) {
            const float v = dot_f32(wf, a->x + (ptrdiff_t)c * a->x_stride, (size_t)K);
            float *out = y + (ptrdiff_t)c * ldy + (r - r0);
            *out = accumulate ? *out + v : v;
        }
    }
}

static void wmatmul(const rv_wmat *w, int r0, int r1, const rv_qact *a, float *y, ptrdiff_t ldy,
                    int accumulate, void *scratch)
{
    if (r0 >= r1 || a->n <= 0)
        return;
    if (rv_wtype_is_float(w->type)) {
        qm_float_rows(w, r0, r1, a, y, ldy, accumulate, (float *)scratch);
        return;
    }
    if (qm_use_gemm(w->type, a->n)) {
        qm_gemm(w, r0, r1, a, y, ldy, accumulate, scratch);
        return;
    }
    const int nblocks = w->cols / rv_wtype_block_values(w->type);
    /* Software prefetch QM_PF_BYTES ahead: weights stream from DRAM once per token through 4 KiB
     * pages (a file mapping), where the hardware stream prefetchers stop at every page. */
    const int ahead = (int)((QM_PF_BYTES + w->row_bytes - 1) / w->row_bytes);
#if defined(QM_HAVE_ROWS_Q4)
    if (w->type == RV_WT_Q4_0 || w->type == RV_WT_Q4_1) {
        qm_rows_q4_512(w, r0, r1, a, y, ldy, accumulate, ahead);
        return;
    }
#endif
    for (int r = r0; r < r1; r++) {
        const uint8_t *row = w->data + (size_t)r * w->row_bytes;
        if (r + ahead < r1) {
            const uint8_t *pf = row + (size_t)ahead * w->row_bytes;
            for (size_t o = 0; o < w->row_bytes; o += 64)
                __builtin_prefetch(pf + o, 0, QM_PF_LOCALITY);
        }
        for (int c = 0; c < a->n; c++) {
            const float v = qm_dot_row(w->type, row, nblocks, a, c);
            float *out = y + (ptrdiff_t)c * ldy + (r - r0);
            *out = accumulate ? *out + v : v;
        }
    }
}

static void quantize_act(rv_qact *a, int c0, int c1)
{
    qm_quantize_cols(a, c0, c1);
    for (int c = c0; c < c1; c++) {   /* the nibble-order copy (rv_wmat.h) */
        const int8_t *q = a->q + (size_t)c * a->k;
        int8_t *q4 = a->q4 + (size_t)c * a->k;
        int g = 0;
        for (; g + 128 <= a->k; g += 128)
            for (int i = 0; i < 4; i++) {
                memcpy(q4 + g + 16 * i, q + g + 32 * i, 16);
                memcpy(q4 + g + 64 + 16 * i, q + g + 32 * i + 16, 16);
            }
        memcpy(q4 + g, q + g, (size_t)(a->k - g));
    }
}

static void wrow_f32(const rv_wmat *w, int row, float *out)
{
    qm_row_to_f32(w, w->data + (size_t)row * w->row_bytes, out);
}

static void rmsnorm_f32(const float *x, const float *gain, float eps, float *out, int n)
{
    rv_vf s0 = rv_vf_zero(), s1 = rv_vf_zero();
    int i = 0;
    for (; i + 2 * RV_VW <= n; i += 2 * RV_VW) {
        const rv_vf a = rv_vf_load(x + i), b = rv_vf_load(x + i + RV_VW);
        s0 = rv_vf_fmadd(a, a, s0);
        s1 = rv_vf_fmadd(b, b, s1);
    }
    float ss = rv_vf_hsum(rv_vf_add(s0, s1));
    for (; i < n; i++)
        ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    if (ss > FLT_MAX) {
        /* the squares overflowed (a row past ~1.8e19 / sqrt(n)), which made r 0 and the row
         * zeros: sum them over x * 2^-96 instead (exact scaling; eps is negligible there) */
        float t = 0.0f;
        for (i = 0; i < n; i++) {
            const float y = x[i] * 0x1p-96f;
            t += y * y;
        }
        r = 0x1p-96f / sqrtf(t / (float)n);
    }
    const rv_vf vr = rv_vf_set1(r);
    for (i = 0; i + RV_VW <= n; i += RV_VW) {
        const rv_vf v = rv_vf_mul(rv_vf_load(x + i), vr);
        rv_vf_store(out + i, gain ? rv_vf_mul(v, rv_vf_load(gain + i)) : v);
    }
    for (; i < n; i++)
        out[i] = x[i] * r * (gain ? gain[i] : 1.0f);
}

static void rope_pairs_f32(float *x, int vectors, int dim, const float *cos, const float *sin)
{
    for (int v = 0; v < vectors; v++) {
        float *p = x + (size_t)v * dim;
        for (int i = 0; i < dim / 2; i++) {
            const float x0 = p[2 * i], x1 = p[2 * i + 1];
            p[2 * i] = x0 * cos[i] - x1 * sin[i];
            p[2 * i + 1] = x0 * sin[i] + x1 * cos[i];
        }
    }
}

static void swiglu_f32(const float *gate, const float *up, float *out, int n)
{
    int i = 0;
    const rv_vf one = rv_vf_set1(1.0f), zero = rv_vf_zero();
    for (; i + RV_VW <= n; i += RV_VW) {
        const rv_vf g = rv_vf_load(gate + i);
        const rv_vf e = rv_vf_exp(rv_vf_sub(zero, g));
        rv_vf_store(out + i, qm_vf_div(rv_vf_mul(g, rv_vf_load(up + i)), rv_vf_add(one, e)));
    }
    for (; i < n; i++)
        out[i] = gate[i] * up[i] / (1.0f + expf(-gate[i]));
}

static void fill_qmatmul_ops(rv_ops *ops)
{
    ops->quantize_act = quantize_act;
    ops->wmatmul = wmatmul;
    ops->wrow_f32 = wrow_f32;
    ops->rmsnorm_f32 = rmsnorm_f32;
    ops->rope_pairs_f32 = rope_pairs_f32;
    ops->swiglu_f32 = swiglu_f32;
}

#endif
