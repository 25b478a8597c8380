/* TurboQuant attention kernel (rv_ops.attend_tgroup): one KV head of a cold group, read in
 * place through struct rv_thead (kernels/rv_qview.h). Included by quant_impl.h, once per ISA.
 *
 * Scores: the rotated query is an int8 vector q8 (scale qscale); a key's codes unpack to bytes
 * (c + 64) through one 16-entry table per 16 coordinates (vpshufb / tbl), and
 *     score_t = a_t * qscale * (sum_i (c_ti + 64) q8_i - 64 sum_i q8_i) + flag_t (q . mu)
 * is an integer dot product (no overflow: 0 < c + 64 < 128, |q8| <= 127).
 * Values: the rows' weights times the token's scale, times its codebook values, accumulate in
 * the rotated domain (the caller rotates back once per head and call).
 * AVX-512 has two bodies (turbo_body.h): plain AVX-512BW, and one for CPUs with AVX512-VNNI
 * (vpdpbusd: the key dot products in one instruction, and the values accumulated as integers,
 * four tokens per instruction, with 8-bit weights per group and row), the avx512vnni table's
 * (ops_avx512vnni.c); the avx512 table keeps the plain body. */
#ifndef RV_TURBO_IMPL_H
#define RV_TURBO_IMPL_H

#include <string.h>
#include "rv_simd.h"
#include "kernels/rv_ops.h"
#include "kernels/rv_qview.h"

#define TQ_TB 16          /* tokens per score block */

/* ---- a token's D codes -> D bytes tab[i / 16 * 16 + code_i] ---- */
#if defined(RV_ISA_AVX512)
/* per 64-coordinate chunk j, worked out once per call: the crumbs' shift counts, the four
 * tables, and where chunk j's bits of each plane are */
typedef struct {
    __m512i cnt[4], tab[4];
    int plane[2][4];         /* byte offset in the token of the 64-bit word ending with chunk j's
                              * bits of plane p (bit 2 / bit 3), or -1 */
    int shift[2][4];         /* those bits are the word's top 64 - shift */
    int D;
} tq_unpacker;

RV_INLINE void tq_unpacker_init(tq_unpacker *u, int D, int n3, int n4, const uint8_t *tab)
{
    u->D = D;
    const int Q = D / 4;
    for (int j = 0; j < D / 64 && j < 4; j++) {
        int c[4];
        for (int L = 0; L < 4; L++)
            c[L] = 2 * ((64 * j + 16 * L) / Q);
        u->cnt[j] = _mm512_setr_epi32(c[0], c[0], c[0], c[0], c[1], c[1], c[1], c[1], c[2], c[2], c[2], c[2], c[3],
                                      c[3], c[3], c[3]);
        u->tab[j] = _mm512_loadu_si512(tab + 64 * j);
        const int lo = 64 * j;
        for (int p = 0; p < 2; p++) {
            const int n = p ? n4 : n3;            /* a multiple of 16 */
            const int bits = n - lo < 64 ? n - lo : 64;
            /* the word ends where the chunk's bits end (reading past them could leave the
             * group); it starts at most 6 bytes before the plane, in the crumbs (Q >= 16) */
            u->plane[p][j] = bits > 0 ? Q + (p ? n3 / 8 : 0) + (lo + bits) / 8 - 8 : -1;
            u->shift[p][j] = 64 - bits;
        }
    }
}

/* coordinates [64j, 64j + 64) of a token (D >= 64) */
RV_INLINE __m512i tq_chunk(const tq_unpacker *u, const uint8_t *tok, int j)
{
    const int Q = u->D / 4;
    __m512i src;
    if (Q == 16)
        src = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)tok));
    else if (Q == 32)
        src = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)tok));
    else
        src = _mm512_loadu_si512(tok + (64 * j) % Q);
    __m512i code = _mm512_and_si512(_mm512_srlv_epi32(src, u->cnt[j]), _mm512_set1_epi8(3));
    for (int p = 0; p < 2; p++) {
        const int off = u->plane[p][j];
        if (off >= 0) {
            uint64_t w;
            memcpy(&w, tok + off, 8);
            code = _mm512_mask_add_epi8(code, _cvtu64_mask64(w >> u->shift[p][j]), code, _mm512_set1_epi8(p ? 8 : 4));
        }
    }
    return _mm512_shuffle_epi8(u->tab[j], code);
}

/* the 16 int32 sums of 16 vectors, in order (a transposing tree) */
RV_INLINE __m512i tq_hsum16(const __m512i *x)
{
    __m512i t[8], u[4];
    for (int k = 0; k < 8; k++)
        t[k] = _mm512_add_epi32(_mm512_unpacklo_epi32(x[2 * k], x[2 * k + 1]),
                                _mm512_unpackhi_epi32(x[2 * k], x[2 * k + 1]));
    for (int k = 0; k < 4; k++)
        u[k] = _mm512_add_epi32(_mm512_unpacklo_epi64(t[2 * k], t[2 * k + 1]),
                                _mm512_unpackhi_epi64(t[2 * k], t[2 * k + 1]));
    /* u[k] lane L holds the partial sums of vectors 4k..4k+3 over lane L */
    __m512i w01 = _mm512_add_epi32(_mm512_shuffle_i32x4(u[0], u[1], 0x88), _mm512_shuffle_i32x4(u[0], u[1], 0xDD));
    __m512i w23 = _mm512_add_epi32(_mm512_shuffle_i32x4(u[2], u[3], 0x88), _mm512_shuffle_i32x4(u[2], u[3], 0xDD));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(w01, w23, 0x88), _mm512_shuffle_i32x4(w01, w23, 0xDD));
}
#endif

#if defined(RV_ISA_AVX2)
/* What unpacking a 32-coordinate chunk m of a token needs, worked out once per call (the
 * per-token code is then loads and vector ops only: computed per token, the planes' offsets
 * and bounds were most of the scalar work of the AVX2 key scores). nc = D / 32 <= 8. */
typedef struct {
    __m256i cnt[8];          /* chunk m's crumbs: shift per qword (then & 3) */
    __m256i tab[8];          /* its two 16-entry tables */
    __m256i spread[2][8];    /* plane p's word: which byte each coordinate's bit is in */
    __m256i step[2][8];      /* and what the bit adds to the code (4 / 8; 0 past the plane) */
    __m256i bit, three;
    int plane[2][8];         /* byte offset in the token of the word holding chunk m's bits of
                              * plane p, or -1 */
} tq_unpacker256;

RV_INLINE void tq_unpacker256_init(tq_unpacker256 *u, const int nc, int n3, int n4, const uint8_t *tab)
{
    const int D = 32 * nc, Q = D / 4;
    for (int m = 0; m < nc; m++) {
        const int lo = 32 * m;
        if (Q >= 32)          /* coordinate i at byte i % Q, bits 2 (i / Q): one shift per chunk */
            u->cnt[m] = _mm256_set1_epi64x(2 * (lo / Q));
        else if (Q == 16)     /* D 64: both 128-bit lanes the 16 bytes, a shift per lane */
            u->cnt[m] = _mm256_setr_epi64x(4 * m, 4 * m, 4 * m + 2, 4 * m + 2);
        else                  /* D 32: the 8 bytes in every qword, a shift per qword */
            u->cnt[m] = _mm256_setr_epi64x(0, 2, 4, 6);
        u->tab[m] = _mm256_loadu_si256((const __m256i *)(tab + lo));
        for (int p = 0; p < 2; p++) {
            const int n = p ? n4 : n3;    /* a multiple of 16 */
            const int8_t v = (int8_t)(p ? 8 : 4);
            const int half = n - lo == 16;
            /* a 32-bit word always: when the plane has only the chunk's first 16 coordinates,
             * the word ending with their 2 bytes (reading past them could leave the group) */
            u->plane[p][m] = n > lo ? Q + (p ? n3 / 8 : 0) + lo / 8 - (half ? 2 : 0) : -1;
            const int8_t b0 = (int8_t)(half ? 2 : 0);
            u->spread[p][m] = _mm256_setr_epi8(b0, b0, b0, b0, b0, b0, b0, b0, b0 + 1, b0 + 1, b0 + 1, b0 + 1, b0 + 1,
                                               b0 + 1, b0 + 1, b0 + 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
            u->step[p][m] = half ? _mm256_setr_m128i(_mm_set1_epi8(v), _mm_setzero_si128()) : _mm256_set1_epi8(v);
        }
    }
    u->bit = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    u->three = _mm256_set1_epi8(3);
}

/* coordinates [32 m, 32 m + 32) of a token as table bytes: the crumbs shifted into place, the
 * planes' bits spread to bytes, then one table per 16 coordinates (vpshufb stays in its lane).
 * nc is a constant at every call (the loads and loops fold). */
RV_INLINE __m256i tq_chunk32(const tq_unpacker256 *u, const uint8_t *tok, const int nc, int m)
{
    const int Q = 8 * nc;
    __m256i src;
    if (Q >= 32) {
        src = _mm256_loadu_si256((const __m256i *)(tok + (32 * m) % Q));
    } else if (Q == 16) {
        src = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)tok));
    } else {
        long long w;
        memcpy(&w, tok, 8);
        src = _mm256_set1_epi64x(w);
    }
    __m256i code = _mm256_and_si256(_mm256_srlv_epi64(src, u->cnt[m]), u->three);
    for (int p = 0; p < 2; p++) {
        const int off = u->plane[p][m];
        if (off >= 0) {
            int32_t w;
            memcpy(&w, tok + off, 4);
            __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32(w), u->spread[p][m]);
            b = _mm256_cmpeq_epi8(_mm256_and_si256(b, u->bit), u->bit);
            code = _mm256_add_epi8(code, _mm256_and_si256(b, u->step[p][m]));
        }
    }
    return _mm256_shuffle_epi8(u->tab[m], code);
}

/* the 8 int32 sums of 8 vectors, in order */
RV_INLINE __m256i tq_hsum8(const __m256i *x)
{
    const __m256i u0 = _mm256_hadd_epi32(_mm256_hadd_epi32(x[0], x[1]), _mm256_hadd_epi32(x[2], x[3]));
    const __m256i u1 = _mm256_hadd_epi32(_mm256_hadd_epi32(x[4], x[5]), _mm256_hadd_epi32(x[6], x[7]));
    /* u0 lane 0: x0..x3's sums over their low lanes, lane 1 over their high ones; u1 x4..x7 */
    return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}
#endif

/* generic: one token to bytes (D any multiple of 16) */
RV_INLINE void tq_unpack_bytes(const uint8_t *tok, int D, int n3, int n4, const uint8_t *tab, uint8_t *out)
{
#if defined(RV_ISA_AVX2) || defined(RV_ISA_AVX512)
    const int Q = D / 4;
    const __m128i bit = _mm_setr_epi8(1, 2, 4, 8, 16, 32, 64, (char)128, 1, 2, 4, 8, 16, 32, 64, (char)128);
    const __m128i spread = _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    for (int b = 0; b < D; b += 16) {
        __m128i src;
        if (Q >= 16) {
            src = _mm_srl_epi16(_mm_loadu_si128((const __m128i *)(tok + b % Q)), _mm_cvtsi32_si128(2 * (b / Q)));
        } else if (Q == 8) {
            long long w;
            memcpy(&w, tok, 8);
            src = _mm_srlv_epi64(_mm_set1_epi64x(w), _mm_setr_epi32(4 * (b / 16), 0, 4 * (b / 16) + 2, 0));
        } else {
            int w;
            memcpy(&w, tok, 4);
            src = _mm_srlv_epi32(_mm_set1_epi32(w), _mm_setr_epi32(0, 2, 4, 6));
        }
        __m128i code = _mm_and_si128(src, _mm_set1_epi8(3));
        for (int p = 0; p < 2; p++) {
            const int n = p ? n4 : n3;
            if (n > b) {
                uint16_t w;
                memcpy(&w, tok + Q + (p ? n3 / 8 : 0) + b / 8, 2);
                __m128i m = _mm_shuffle_epi8(_mm_set1_epi16((short)w), spread);
                m = _mm_cmpeq_epi8(_mm_and_si128(m, bit), bit);
                code = _mm_add_epi8(code, _mm_and_si128(m, _mm_set1_epi8(p ? 8 : 4)));
            }
        }
        _mm_storeu_si128((__m128i *)(out + b), _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(tab + b)), code));
    }
#elif defined(RV_ISA_NEON)
    const int Q = D / 4;
    static const uint8_t bitv[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    static const uint8_t q8idx[16] = {0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7};
    static const uint8_t q4idx[16] = {0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3};
    static const int8_t s4[16] = {0, 0, 0, 0, -2, -2, -2, -2, -4, -4, -4, -4, -6, -6, -6, -6};
    for (int b = 0; b < D; b += 16) {
        uint8x16_t src;
        int8x16_t sh;
        if (Q >= 16) {
            src = vld1q_u8(tok + b % Q);
            sh = vdupq_n_s8((int8_t)(-2 * (b / Q)));
        } else if (Q == 8) {
            src = vqtbl1q_u8(vcombine_u8(vld1_u8(tok), vdup_n_u8(0)), vld1q_u8(q8idx));
            sh = vcombine_s8(vdup_n_s8((int8_t)(-4 * (b / 16))), vdup_n_s8((int8_t)(-4 * (b / 16) - 2)));
        } else {
            uint8_t w[16] = {0};
            memcpy(w, tok, 4);
            src = vqtbl1q_u8(vld1q_u8(w), vld1q_u8(q4idx));
            sh = vld1q_s8(s4);
        }
        uint8x16_t code = vandq_u8(vshlq_u8(src, sh), vdupq_n_u8(3));
        for (int p = 0; p < 2; p++) {
            const int n = p ? n4 : n3;
            if (n > b) {
                const uint8_t *pl = tok + Q + (p ? n3 / 8 : 0) + b / 8;
                uint8x16_t m = vcombine_u8(vdup_n_u8(pl[0]), vdup_n_u8(pl[1]));
                m = vtstq_u8(m, vld1q_u8(bitv));
                code = vaddq_u8(code, vandq_u8(m, vdupq_n_u8(p ? 8 : 4)));
            }
        }
        vst1q_u8(out + b, vqtbl1q_u8(vld1q_u8(tab + b), code));
    }
#else
    for (int i = 0; i < D; i++)
        out[i] = tab[(i / 16) * 16 + rv_thead_code(tok, D, n3, n4, i)];
#endif
}

/* sum_i u[i] * s[i] (u: bytes below 128, s: int8), D a multiple of 16 */
RV_INLINE int32_t tq_dot(const uint8_t *u, const int8_t *s, int D)
{
#if defined(RV_ISA_AVX512) || defined(RV_ISA_AVX2)
    __m256i acc = _mm256_setzero_si256();
    int i = 0;
    for (; i + 32 <= D; i += 32) {
        __m256i p = _mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i *)(u + i)),
                                         _mm256_loadu_si256((const __m256i *)(s + i)));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
    }
    __m128i a = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    if (i < D) {
        __m128i p = _mm_maddubs_epi16(_mm_loadu_si128((const __m128i *)(u + i)), _mm_loadu_si128((const __m128i *)(s + i)));
        a = _mm_add_epi32(a, _mm_madd_epi16(p, _mm_set1_epi16(1)));
    }
    a = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0x4E));
    a = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0xB1));
    return _mm_cvtsi128_si32(a);
#elif defined(RV_ISA_NEON)
    int32x4_t acc = vdupq_n_s32(0);
    for (int i = 0; i < D; i += 16) {
        int8x16_t x = vreinterpretq_s8_u8(vld1q_u8(u + i)), y = vld1q_s8(s + i);
        acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(x), vget_low_s8(y)));
        acc = vpadalq_s16(acc, vmull_high_s8(x, y));
    }
    return vaddvq_s32(acc);
#else
    int32_t acc = 0;
    for (int i = 0; i < D; i++)
        acc += (int32_t)u[i] * s[i];
    return acc;
#endif
}

/* RV_VW int8 as floats */
RV_INLINE rv_vf tq_s8(const int8_t *p)
{
#if defined(RV_ISA_AVX512)
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif defined(RV_ISA_AVX2)
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#elif defined(RV_ISA_NEON)
    int32_t w;
    memcpy(&w, p, 4);
    return vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(w))))));
#else
    return (float)p[0];
#endif
}

/* out[t] = exp(lo + (code_t - 1) step) for code_t > 0, else 0; t in [t0, t1), multiples of RV_VW */
RV_INLINE void tq_scales(const uint8_t *codes, int t0, int t1, float lo, float step, float *out)
{
    const rv_vf vlo = rv_vf_set1(lo - step), vst = rv_vf_set1(step), one = rv_vf_set1(1.0f);
    for (int t = t0; t < t1; t += RV_VW) {
        rv_vf c = qk_u8(codes + t);
        rv_vf e = rv_vf_exp(rv_vf_fmadd(c, vst, vlo));
        rv_vf_store(out + t, rv_vf_mul(e, rv_vf_min(c, one)));
    }
}

/* the per-token floats every row block uses: scales of keys and values, mean flags */
RV_INLINE void tq_token_floats(const struct rv_thead *h, int t0, int t1, float *kn, float *vn, float *fl)
{
    tq_scales(h->knorm, t0, t1, h->kn_lo, h->kn_step, kn);
    tq_scales(h->vnorm, t0, t1, h->vn_lo, h->vn_step, vn);
#if defined(RV_ISA_AVX512)
    for (int t = t0; t < t1; t += 16) {
        uint16_t m;
        memcpy(&m, h->kflag + t / 8, 2);
        _mm512_storeu_ps(fl + t, _mm512_maskz_mov_ps((__mmask16)m, _mm512_set1_ps(1.0f)));
    }
#else
    for (int t = t0; t < t1; t++)
        fl[t] = (float)((h->kflag[t >> 3] >> (t & 7)) & 1);
#endif
}

/* the bodies: generic (and AVX-512BW), then AVX512-VNNI in the avx512vnni table only */
#define TQ_VNNI 0
#define TQ_FN(name) name
#define TQ_ATTR
#include "kernels/turbo_body.h"
#undef TQ_VNNI
#undef TQ_FN
#undef TQ_ATTR

#if defined(RV_ISA_AVX512) && defined(RV_HAVE_VNNI)
#define TQ_VNNI 1
#define TQ_FN(name) name##_vnni
#define TQ_ATTR __attribute__((target("avx512vnni")))
#include "kernels/turbo_body.h"
#undef TQ_VNNI
#undef TQ_FN
#undef TQ_ATTR
#endif

/* The table decides (RUVPY_ISA / set_isa): avx512 never runs a VNNI instruction. */
static void fill_turbo_ops(rv_ops *ops)
{
#if defined(RV_ISA_AVX512) && defined(RV_HAVE_VNNI)
    ops->attend_tgroup = attend_tgroup_vnni;
#else
    ops->attend_tgroup = attend_tgroup;
#endif
}

#endif
