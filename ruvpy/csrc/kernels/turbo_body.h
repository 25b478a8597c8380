/* One body of the TurboQuant kernel (see turbo_impl.h), included with TQ_VNNI 0 (every ISA)
 * and, on AVX-512, again with TQ_VNNI 1: TQ_FN names the functions, TQ_ATTR gives them their
 * target. */

#if defined(RV_ISA_AVX512)
/* acc + u . q over 4-byte groups (u unsigned, q signed; int32 lanes) */
TQ_ATTR RV_INLINE __m512i TQ_FN(tq_dp)(__m512i acc, __m512i u, __m512i q)
{
#if TQ_VNNI
    return _mm512_dpbusd_epi32(acc, u, q);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, q), _mm512_set1_epi16(1)));
#endif
}

/* K scores, D = 64 nc: the block's tokens unpacked once, dot products for every row, 16
 * tokens' sums transposed into one vector */
TQ_ATTR RV_INLINE void TQ_FN(tq_scores512)(const int NR, const int nc, const struct rv_thead *h, int r0,
                                           const float *kn, const float *fl, const float *qmu, float *s,
                                           int s_stride, int tb0, int tb1, uint8_t *ub, qk_pf *pf)
{
    const int D = 64 * nc;
    tq_unpacker up;
    tq_unpacker_init(&up, D, h->k_n3, h->k_n4, h->ktab);
    __m512i q[RV_TATTN_ROWS][4];
    rv_vf qs[RV_TATTN_ROWS], bias[RV_TATTN_ROWS], qm[RV_TATTN_ROWS];
    for (int r = 0; r < NR; r++) {
        for (int j = 0; j < nc; j++)
            q[r][j] = _mm512_loadu_si512(h->q8 + (size_t)(r0 + r) * D + 64 * j);
        qs[r] = rv_vf_set1(h->qscale[r0 + r]);
        bias[r] = rv_vf_set1(-64.0f * (float)h->qsum[r0 + r]);
        qm[r] = rv_vf_set1(qmu[r]);
    }
    for (int t0 = tb0; t0 < tb1; t0 += TQ_TB) {
        for (int t = 0; t < TQ_TB; t++) {
            for (int j = 0; j < nc; j++)
                _mm512_storeu_si512(ub + (size_t)t * D + 64 * j, tq_chunk(&up, h->kcodes + (size_t)(t0 + t) * h->kbytes, j));
            qk_pf_lines(pf, nc);       /* spread: a burst of prefetches stalls on fill buffers */
        }
        const rv_vf k = rv_vf_load(kn + t0), f = rv_vf_load(fl + t0);
        for (int r = 0; r < NR; r++) {
            __m512i x[TQ_TB];
            for (int t = 0; t < TQ_TB; t++) {
                __m512i acc = _mm512_setzero_si512();
                for (int j = 0; j < nc; j++)
                    acc = TQ_FN(tq_dp)(acc, _mm512_loadu_si512(ub + (size_t)t * D + 64 * j), q[r][j]);
                x[t] = acc;
            }
            rv_vf dot = rv_vf_add(_mm512_cvtepi32_ps(tq_hsum16(x)), bias[r]);
            rv_vf_store(s + r * s_stride + t0, rv_vf_fmadd(rv_vf_mul(k, qs[r]), dot, rv_vf_mul(f, qm[r])));
        }
    }
}

#if TQ_VNNI
/* Values as integers: per 16-token block and row, weights w8 = round(255 w / max) (u8); four
 * tokens' codes of a coordinate interleaved into one int32 lane, so vpdpbusd adds four
 * tokens per instruction; each block's sums go into the float accumulators scaled back. The
 * interleave permutes coordinates within 64 (lane L, int m, byte j <- 16 L + 4 m + j); the
 * flush puts them back. w8 / wsc: scratch for [NR][blocks][16] bytes and [NR][blocks] floats. */
TQ_ATTR RV_INLINE void TQ_FN(tq_values512)(const int NR, const int nc, const struct rv_thead *h, const float *w,
                                           int w_stride, int t0, int t1, float *acc, int acc_stride,
                                           uint8_t *w8, float *wsc, qk_pf *pf)
{
    const int D = 64 * nc, b0 = t0 / TQ_TB * TQ_TB, nb = (t1 - b0 + TQ_TB - 1) / TQ_TB;
    for (int b = 0; b < nb; b++) {
        const int s0 = b0 + b * TQ_TB;
        const int lo = t0 > s0 ? t0 - s0 : 0, hi = t1 - s0 < TQ_TB ? t1 - s0 : TQ_TB;
        const __mmask16 in = (__mmask16)(((1u << hi) - 1) & ~((1u << lo) - 1));
        for (int r = 0; r < NR; r++) {
            const __m512 wv = _mm512_maskz_loadu_ps(in, w + r * w_stride + s0);
            const float mx = _mm512_reduce_max_ps(wv);       /* weights are >= 0 */
            const float inv = mx > 0.0f ? 255.0f / mx : 0.0f;
            __m512i c = _mm512_cvtps_epi32(_mm512_mul_ps(wv, _mm512_set1_ps(inv)));
            _mm_storeu_si128((__m128i *)(w8 + ((size_t)r * nb + b) * TQ_TB), _mm512_cvtusepi32_epi8(c));
            wsc[r * nb + b] = mx / 255.0f;
        }
    }
    tq_unpacker up;
    tq_unpacker_init(&up, D, h->v_n3, h->v_n4, h->vtab);
    for (int j = 0; j < nc; j++) {
        rv_vf a[RV_TATTN_ROWS][4];
        for (int r = 0; r < NR; r++)
            for (int k = 0; k < 4; k++)
                a[r][k] = rv_vf_load(acc + r * acc_stride + 64 * j + 16 * k);
        for (int b = 0; b < nb; b++) {
            const int s0 = b0 + b * TQ_TB;
            __m512i ia[RV_TATTN_ROWS][4];
            for (int r = 0; r < NR; r++)
                for (int m = 0; m < 4; m++)
                    ia[r][m] = _mm512_setzero_si512();
            for (int t = s0; t < s0 + TQ_TB; t += 4) {
                if (t + 4 <= t0 || t >= t1)
                    continue;                          /* four tokens no row weighs */
                const uint8_t *p = h->vcodes + (size_t)t * h->vbytes;
                __m512i A = tq_chunk(&up, p, j), B = tq_chunk(&up, p + h->vbytes, j);
                __m512i C = tq_chunk(&up, p + 2 * (size_t)h->vbytes, j), E = tq_chunk(&up, p + 3 * (size_t)h->vbytes, j);
                const __m512i T[4] = {A, B, C, E};
                __m512i X[4];
                rv_interleave4_epi8(T, X);
                for (int r = 0; r < NR; r++) {
                    int32_t ww;
                    memcpy(&ww, w8 + ((size_t)r * nb + b) * TQ_TB + (t - s0), 4);
                    const __m512i W = _mm512_set1_epi32(ww);
                    for (int m = 0; m < 4; m++)
                        ia[r][m] = _mm512_dpbusd_epi32(ia[r][m], W, X[m]);
                }
            }
            if ((b & 1) == 0)
                qk_pf_lines(pf, 1);
            /* back to coordinate order: natural 16-block L = lane L of ia[0..3] */
            for (int r = 0; r < NR; r++) {
                const rv_vf sc = rv_vf_set1(wsc[r * nb + b]);
                __m512i nl[4];                                                    /* m0..3 of lane L */
                rv512_transpose_lanes4(ia[r], nl);
                for (int k = 0; k < 4; k++)
                    a[r][k] = rv_vf_fmadd(sc, _mm512_cvtepi32_ps(nl[k]), a[r][k]);
            }
        }
        for (int r = 0; r < NR; r++)
            for (int k = 0; k < 4; k++)
                rv_vf_store(acc + r * acc_stride + 64 * j + 16 * k, a[r][k]);
    }
}
#else
/* Values in float: each token's codes to floats once, FMAs for every row */
TQ_ATTR RV_INLINE void TQ_FN(tq_values512)(const int NR, const int nc, const struct rv_thead *h, const float *w,
                                           int w_stride, int t0, int t1, float *acc, int acc_stride,
                                           uint8_t *w8, float *wsc, qk_pf *pf)
{
    (void)w8;
    (void)wsc;
    tq_unpacker up;
    tq_unpacker_init(&up, 64 * nc, h->v_n3, h->v_n4, h->vtab);
    for (int j = 0; j < nc; j++) {
        rv_vf a[RV_TATTN_ROWS][4];
        for (int r = 0; r < NR; r++)
            for (int k = 0; k < 4; k++)
                a[r][k] = rv_vf_load(acc + r * acc_stride + 64 * j + 16 * k);
        for (int t = t0; t < t1; t++) {
            __m512i c = tq_chunk(&up, h->vcodes + (size_t)t * h->vbytes, j);
            rv_vf x[4];
            x[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_castsi512_si128(c)));
            x[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(c, 1)));
            x[2] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(c, 2)));
            x[3] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(c, 3)));
            if ((t & 31) == 0)
                qk_pf_lines(pf, 1);
            for (int r = 0; r < NR; r++) {
                rv_vf p = rv_vf_set1(w[r * w_stride + t]);
                for (int k = 0; k < 4; k++)
                    a[r][k] = rv_vf_fmadd(p, x[k], a[r][k]);
            }
        }
        for (int r = 0; r < NR; r++)
            for (int k = 0; k < 4; k++)
                rv_vf_store(acc + r * acc_stride + 64 * j + 16 * k, a[r][k]);
    }
}
#endif
#endif /* RV_ISA_AVX512 */

#if defined(RV_ISA_AVX2)
/* K scores, D = 32 nc: a block's tokens unpacked once, dot products for every row
 * (vpmaddubsw: (c + 64) unsigned times q8 signed), 8 tokens' sums transposed into one vector */
RV_INLINE void tq_scores256(const int NR, const int nc, const struct rv_thead *h, int r0, const float *kn,
                            const float *fl, const float *qmu, float *s, int s_stride, int tb0, int tb1, uint8_t *ub,
                            qk_pf *pf)
{
    const int D = 32 * nc;
    const __m256i ones = _mm256_set1_epi16(1);
    tq_unpacker256 up;
    tq_unpacker256_init(&up, nc, h->k_n3, h->k_n4, h->ktab);
    for (int t0 = tb0; t0 < tb1; t0 += TQ_TB) {
        for (int t = 0; t < TQ_TB; t++) {
            const uint8_t *tok = h->kcodes + (size_t)(t0 + t) * h->kbytes;
            for (int m = 0; m < nc; m++)
                _mm256_storeu_si256((__m256i *)(ub + (size_t)t * D + 32 * m), tq_chunk32(&up, tok, nc, m));
            qk_pf_lines(pf, (D + 63) / 64);   /* spread: a burst of prefetches stalls on fill buffers */
        }
        for (int r = 0; r < NR; r++) {
            const int8_t *q8 = h->q8 + (size_t)(r0 + r) * D;
            const rv_vf qs = rv_vf_set1(h->qscale[r0 + r]), bias = rv_vf_set1(-64.0f * (float)h->qsum[r0 + r]);
            const rv_vf qm = rv_vf_set1(qmu[r]);
            for (int e = 0; e < TQ_TB; e += 8) {
                __m256i x[8];
                for (int t = 0; t < 8; t++) {
                    __m256i acc = _mm256_setzero_si256();
                    for (int m = 0; m < nc; m++)
                        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(
                            _mm256_loadu_si256((const __m256i *)(ub + (size_t)(e + t) * D + 32 * m)),
                            _mm256_loadu_si256((const __m256i *)(q8 + 32 * m))), ones));
                    x[t] = acc;
                }
                const rv_vf dot = rv_vf_add(_mm256_cvtepi32_ps(tq_hsum8(x)), bias);
                const int t = t0 + e;
                rv_vf_store(s + r * s_stride + t, rv_vf_fmadd(rv_vf_mul(rv_vf_load(kn + t), qs), dot,
                                                              rv_vf_mul(rv_vf_load(fl + t), qm)));
            }
        }
    }
}

/* Values as integers, D = 32 nc (VPMADDUBSW + VPMADDWD), with the VNNI body's 8-bit
 * weights: per 16-token block and row w8 = round(255 w / max) (u8), four tokens' codebook
 * values of a coordinate interleaved into one int32 lane (a pair of products is at most
 * 2 * 255 * 63 < 32768), so one VPMADDUBSW + VPMADDWD adds four tokens; each block's sums go
 * into the float accumulators scaled back. The interleave permutes coordinates within 32
 * (int32 m of 128-bit lane L <- coordinates 16 L + 4 m ..); the flush puts them back. ub:
 * the block's interleaved codes (TQ_TB D bytes). */
RV_INLINE void tq_values256(const int NR, const int nc, const struct rv_thead *h, const float *w, int w_stride,
                            int t0, int t1, float *acc, int acc_stride, uint8_t *ub, qk_pf *pf)
{
    const __m256i ones = _mm256_set1_epi16(1);
    tq_unpacker256 up;
    tq_unpacker256_init(&up, nc, h->v_n3, h->v_n4, h->vtab);
    for (int b0 = t0 / TQ_TB * TQ_TB; b0 < t1; b0 += TQ_TB) {
        const int lo = b0 > t0 ? 0 : t0 - b0, hi = t1 - b0 < TQ_TB ? t1 - b0 : TQ_TB;
        const __m256i in[2] = {rv256_lanes_in(0, lo, hi), rv256_lanes_in(8, lo, hi)};
        uint8_t w8[RV_TATTN_ROWS][TQ_TB];
        float wsc[RV_TATTN_ROWS];
        for (int r = 0; r < NR; r++) {
            const float *wr = w + r * w_stride + b0;           /* (masked: read in [lo, hi) only) */
            const __m256 w0 = _mm256_maskload_ps(wr, in[0]), w1 = _mm256_maskload_ps(wr + 8, in[1]);
            const float mx = rv_vf_hmax(_mm256_max_ps(w0, w1));   /* weights are >= 0 */
            const __m256 inv = _mm256_set1_ps(mx > 0.0f ? 255.0f / mx : 0.0f);
            const __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(w0, inv)), q1 = _mm256_cvtps_epi32(_mm256_mul_ps(w1, inv));
            _mm_storeu_si128((__m128i *)w8[r], rv256_pack_u8x16(q0, q1));
            wsc[r] = mx / 255.0f;
        }
        for (int qd = 0; qd < TQ_TB / 4; qd++) {
            if (4 * qd + 4 <= lo || 4 * qd >= hi)
                continue;                                  /* four tokens no row weighs */
            const uint8_t *tok = h->vcodes + (size_t)(b0 + 4 * qd) * h->vbytes;
            for (int m = 0; m < nc; m++) {
                __m256i T[4];
                for (int i = 0; i < 4; i++)
                    T[i] = tq_chunk32(&up, tok + (size_t)i * h->vbytes, nc, m);
                __m256i X[4], *dst = (__m256i *)ub + ((size_t)m * 4 + qd) * 4;
                rv_interleave4_epi8(T, X);
                for (int k = 0; k < 4; k++)
                    _mm256_storeu_si256(dst + k, X[k]);
            }
        }
        qk_pf_lines(pf, 1);
        for (int r = 0; r < NR; r++) {
            const __m256 sc = _mm256_set1_ps(wsc[r]);
            for (int m = 0; m < nc; m++) {
                __m256i ia[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                                 _mm256_setzero_si256()};
                for (int qd = 0; qd < TQ_TB / 4; qd++) {
                    if (4 * qd + 4 <= lo || 4 * qd >= hi)
                        continue;
                    int32_t u;
                    memcpy(&u, &w8[r][4 * qd], 4);
                    const __m256i W = _mm256_set1_epi32(u);
                    const __m256i *X = (const __m256i *)ub + ((size_t)m * 4 + qd) * 4;
                    for (int k = 0; k < 4; k++)
                        ia[k] = _mm256_add_epi32(ia[k], _mm256_madd_epi16(_mm256_maddubs_epi16(W, _mm256_loadu_si256(X + k)), ones));
                }
                /* back to coordinate order: ia[k] holds 4k.. | 16 + 4k.. */
                const __m256i n[4] = {_mm256_permute2x128_si256(ia[0], ia[1], 0x20), _mm256_permute2x128_si256(ia[2], ia[3], 0x20),
                                      _mm256_permute2x128_si256(ia[0], ia[1], 0x31), _mm256_permute2x128_si256(ia[2], ia[3], 0x31)};
                float *ap = acc + r * acc_stride + 32 * m;
                for (int k = 0; k < 4; k++)
                    _mm256_storeu_ps(ap + 8 * k, _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(n[k]), _mm256_loadu_ps(ap + 8 * k)));
            }
        }
    }
}
#endif /* RV_ISA_AVX2 */

#if !TQ_VNNI
/* any D (a multiple of 16): token by token */
RV_INLINE void tq_scores_any(const int NR, const struct rv_thead *h, int r0, const float *kn, const float *fl,
                             const float *qmu, float *s, int s_stride, int tb0, int tb1, uint8_t *ub, qk_pf *pf)
{
    const int D = h->D;
    for (int t = tb0; t < tb1; t++) {
        tq_unpack_bytes(h->kcodes + (size_t)t * h->kbytes, D, h->k_n3, h->k_n4, h->ktab, ub);
        if ((t & 15) == 0)
            qk_pf_lines(pf, 2);
        for (int r = 0; r < NR; r++) {
            const float dot = (float)(tq_dot(ub, h->q8 + (size_t)(r0 + r) * D, D) - 64 * h->qsum[r0 + r]);
            s[r * s_stride + t] = kn[t] * h->qscale[r0 + r] * dot + fl[t] * qmu[r];
        }
    }
}

RV_INLINE void tq_values_any(const int NR, const struct rv_thead *h, const float *w, int w_stride, int t0, int t1,
                             float *acc, int acc_stride, int8_t *cb, qk_pf *pf)
{
    const int D = h->D;
    for (int t = t0; t < t1; t++) {
        tq_unpack_bytes(h->vcodes + (size_t)t * h->vbytes, D, h->v_n3, h->v_n4, h->vtab, (uint8_t *)cb);
        if ((t & 15) == 0)
            qk_pf_lines(pf, 1);
        for (int i = 0; i < D; i += RV_VW) {
            rv_vf x = tq_s8(cb + i);
            for (int r = 0; r < NR; r++) {
                float *ap = acc + r * acc_stride + i;
                rv_vf_store(ap, rv_vf_fmadd(rv_vf_set1(w[r * w_stride + t]), x, rv_vf_load(ap)));
            }
        }
    }
}
#endif

TQ_ATTR RV_INLINE void TQ_FN(tq_rows)(const int NR, rv_attn_state *st, int r0, const struct rv_thead *h, int a,
                                      int n, const int *visible, const float *kn, const float *vn, const float *fl,
                                      float *scratch, qk_pf *pf)
{
    const int Gp = h->Gp, D = h->D;
    const int s_stride = Gp + 2 * TQ_TB;
    float *s = scratch;                                                  /* [RV_TATTN_ROWS][s_stride] */
    uint8_t *ub = (uint8_t *)(s + (size_t)RV_TATTN_ROWS * s_stride);   /* TQ_TB x D bytes */
    int vis[RV_TATTN_ROWS], n_eff = 0;
    for (int r = 0; r < NR; r++) {
        vis[r] = visible ? (visible[r0 + r] < n ? visible[r0 + r] : n) : n;
        n_eff = vis[r] > n_eff ? vis[r] : n_eff;
    }
    if (n_eff <= 0)
        return;
    const int tb0 = a / TQ_TB * TQ_TB, tb1 = (a + n_eff + TQ_TB - 1) / TQ_TB * TQ_TB;
    float qmu[RV_TATTN_ROWS];
    for (int r = 0; r < NR; r++)
        qmu[r] = dot_f32(h->qplain + (r0 + r) * h->qplain_stride, h->kmu, (size_t)h->d);
#if defined(RV_ISA_AVX512)
    switch (D) {
    case 64: TQ_FN(tq_scores512)(NR, 1, h, r0, kn, fl, qmu, s, s_stride, tb0, tb1, ub, pf); break;
    case 128: TQ_FN(tq_scores512)(NR, 2, h, r0, kn, fl, qmu, s, s_stride, tb0, tb1, ub, pf); break;
    case 256: TQ_FN(tq_scores512)(NR, 4, h, r0, kn, fl, qmu, s, s_stride, tb0, tb1, ub, pf); break;
    default: tq_scores_any(NR, h, r0, kn, fl, qmu, s, s_stride, tb0, tb1, ub, pf); break;
    }
#elif defined(RV_ISA_AVX2)
    switch (D) {              /* (D is a power of two, 16 to RV_MAX_HEAD_DIM) */
    case 32: tq_scores256(NR, 1, h, r0, kn, fl, qmu, s, s_stride, tb0, tb1, ub, pf); break;
    case 64: tq_scores256(NR, 2, h, r0, kn, fl, qmu, s, s_stride, tb0, tb1, ub, pf); break;
    case 128: tq_scores256(NR, 4, h, r0, kn, fl, qmu, s, s_stride, tb0, tb1, ub, pf); break;
    case 256: tq_scores256(NR, 8, h, r0, kn, fl, qmu, s, s_stride, tb0, tb1, ub, pf); break;
    default: tq_scores_any(NR, h, r0, kn, fl, qmu, s, s_stride, tb0, tb1, ub, pf); break;
    }
#else
    tq_scores_any(NR, h, r0, kn, fl, qmu, s, s_stride, tb0, tb1, ub, pf);
#endif
    qk_pf_lines(pf, 1 << 30);
    /* the online softmax over tokens [a, a + n): weights in s[r][a ..], then times the scales */
    for (int r = 0; r < NR; r++) {
        float *sr = s + r * s_stride;
        float corr = att_stream_softmax_row(sr + a, vis[r], n_eff, &st->m[r0 + r], &st->l[r0 + r]);
        if (corr != 1.0f)
            scale_f32((size_t)D, corr, st->acc + (size_t)(r0 + r) * D);
        for (int t = tb0; t < tb1; t += RV_VW)       /* (lanes outside [a, a + n_eff) unused) */
            rv_vf_store(sr + t, rv_vf_mul(rv_vf_load(sr + t), rv_vf_load(vn + t)));
    }
    float *acc = st->acc + (size_t)r0 * D;
#if defined(RV_ISA_AVX512)
    uint8_t *w8 = ub + (size_t)TQ_TB * D;                    /* after the key bytes */
    float *wsc = (float *)(w8 + (size_t)RV_TATTN_ROWS * (Gp + TQ_TB));
    switch (D) {
    case 64: TQ_FN(tq_values512)(NR, 1, h, s, s_stride, a, a + n_eff, acc, D, w8, wsc, pf); break;
    case 128: TQ_FN(tq_values512)(NR, 2, h, s, s_stride, a, a + n_eff, acc, D, w8, wsc, pf); break;
    case 256: TQ_FN(tq_values512)(NR, 4, h, s, s_stride, a, a + n_eff, acc, D, w8, wsc, pf); break;
    default: tq_values_any(NR, h, s, s_stride, a, a + n_eff, acc, D, (int8_t *)ub, pf); break;
    }
#elif defined(RV_ISA_AVX2)
    switch (D) {
    case 32: tq_values256(NR, 1, h, s, s_stride, a, a + n_eff, acc, D, ub, pf); break;
    case 64: tq_values256(NR, 2, h, s, s_stride, a, a + n_eff, acc, D, ub, pf); break;
    case 128: tq_values256(NR, 4, h, s, s_stride, a, a + n_eff, acc, D, ub, pf); break;
    case 256: tq_values256(NR, 8, h, s, s_stride, a, a + n_eff, acc, D, ub, pf); break;
    default: tq_values_any(NR, h, s, s_stride, a, a + n_eff, acc, D, (int8_t *)ub, pf); break;
    }
#else
    tq_values_any(NR, h, s, s_stride, a, a + n_eff, acc, D, (int8_t *)ub, pf);
#endif
}

/* Fold tokens [a, a + n) of one KV head of a TurboQuant group into st (head_dim D: the
 * rotated domain). Row r sees tokens [a, a + visible[r]) (NULL: all n). */
TQ_ATTR static void TQ_FN(attend_tgroup)(rv_attn_state *st, const struct rv_thead *h, int a, int n,
                                         const int *visible, float *scratch)
{
    qk_pf pf = {(const char *)h->prefetch, (const char *)h->prefetch + (h->prefetch ? h->prefetch_bytes : 0)};
    const int Gp = h->Gp;
    float *kn = scratch, *vn = kn + Gp, *fl = vn + Gp, *rest = fl + Gp + 16;
    const int t0 = a / TQ_TB * TQ_TB, t1 = (a + n + TQ_TB - 1) / TQ_TB * TQ_TB;
    tq_token_floats(h, t0, t1, kn, vn, fl);
    int r0 = 0;
    for (; r0 + RV_TATTN_ROWS <= st->rows; r0 += RV_TATTN_ROWS)
        TQ_FN(tq_rows)(RV_TATTN_ROWS, st, r0, h, a, n, visible, kn, vn, fl, rest, &pf);
    switch (st->rows - r0) {
    case 3: TQ_FN(tq_rows)(3, st, r0, h, a, n, visible, kn, vn, fl, rest, &pf); break;
    case 2: TQ_FN(tq_rows)(2, st, r0, h, a, n, visible, kn, vn, fl, rest, &pf); break;
    case 1: TQ_FN(tq_rows)(1, st, r0, h, a, n, visible, kn, vn, fl, rest, &pf); break;
    default: break;
    }
}
