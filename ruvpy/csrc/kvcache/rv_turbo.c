/* The TurboQuant cold-group format (see rv_turbo.h). Encoding runs once per migrated group and
 * is plain C; attention reads the codes in place through the kernel table (attend_tgroup). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "rv_common.h"
#include "rv_fp16.h"
#include "rv_limits.h"
#include "kvcache/rv_turbo.h"
#include "kvcache/rv_kvmem.h"

typedef struct rv_turbo rv_turbo;

struct rv_turbo {
    int kvh, d, D, G, Gp;
    int k_n3, k_n4, v_n3, v_n4;
    int kbytes, vbytes;                   /* codes per token */
    size_t off_mu, off_flag, off_kn, off_vn, off_kc, off_vc, seg;
    float *signs;                         /* [D] +-1: the randomized Hadamard's diagonal */
    uint8_t *tabs;                        /* [2][D]: the kernels' tables (rv_thead.ktab, vtab) */
    size_t bytes;
};

enum { P_KMU_LO, P_KMU_STEP, P_KN_LO, P_KN_STEP, P_VN_LO, P_VN_STEP, P_COUNT };

/* ---- the fixed sign pattern: the same for every cache of a padded dimension, so exports load ---- */

static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* in-place unnormalised Walsh-Hadamard transform of x[0..n), n a power of two */
static void fwht(float *x, int n)
{
    for (int h = 1; h < n; h *= 2)
        for (int i = 0; i < n; i += 2 * h)
            for (int j = i; j < i + h; j++) {
                float a = x[j], b = x[j + h];
                x[j] = a + b;
                x[j + h] = a - b;
            }
}

/* Code widths for a budget of `bits` per stored value, metadata included: values get
 * floor(bits - 0.5) bits per coordinate (2 / 3 / 4), keys what is left, in blocks of 16
 * coordinates, 2 to 4 bits each. Keys' errors pass through the softmax: at 3.5 bits per value
 * on SmolLM2 a key bit bought about twice what a value bit did (tools/kv_quant_lab.py). */
static void choose_widths(rv_turbo *t, double bits)
{
    const int D = t->D, d = t->d;
    const int vb = bits < 3.0 ? 2 : (bits < 4.0 ? 3 : 4);
    /* per token: two scale codes and a flag bit; per group: 12 bytes of ranges and the mean */
    const double meta = 17.0 + (96.0 + 8.0 * ((d + 1) / 2)) / t->G;
    const double codes = ((bits + 0.06) * 2.0 * d - meta) * t->G / t->Gp;
    double extra = codes - (double)vb * D - 2.0 * D;
    int n3 = extra > 0 ? (int)(extra / 16) * 16 : 0;
    n3 = n3 > D ? D : n3;
    extra -= n3;
    int n4 = extra > 0 ? (int)(extra / 16) * 16 : 0;
    n4 = n4 > n3 ? n3 : n4;
    t->k_n3 = n3;
    t->k_n4 = n4;
    t->v_n3 = vb >= 3 ? D : 0;
    t->v_n4 = vb >= 4 ? D : 0;
}

/* Coordinates above 2 bits for `bits` per rotated coordinate, or -1 if that is no width the
 * format has: 2 <= bits <= RV_TURBO_MAX_BITS, (bits - 2) D a multiple of 16 (the tables are per
 * 16 coordinates). Exact in double: D <= RV_MAX_HEAD_DIM, the steps are multiples of 1/16. */
static int extra_coordinates(double bits, int D)
{
    if (!(bits >= 2.0 && bits <= RV_TURBO_MAX_BITS))
        return -1;
    const double extra = (bits - 2.0) * D;
    return extra == 16.0 * floor(extra / 16.0) ? (int)extra : -1;
}

/* The widths of explicit code bits per coordinate (cfg.key_bits / value_bits): n3 the
 * coordinates with 3 bits or more, n4 those with 4, the widest first. RV_EINVAL unless both
 * are widths the format has. */
static int given_widths(rv_turbo *t, double key_bits, double value_bits)
{
    const int ke = extra_coordinates(key_bits, t->D), ve = extra_coordinates(value_bits, t->D);
    if (ke < 0 || ve < 0)
        return RV_EINVAL;
    t->k_n3 = ke < t->D ? ke : t->D;
    t->k_n4 = ke - t->k_n3;
    t->v_n3 = ve < t->D ? ve : t->D;
    t->v_n4 = ve - t->v_n3;
    return RV_OK;
}

static int token_bytes(int D, int n3, int n4) { return D / 4 + n3 / 8 + n4 / 8; }

/* width of rotated coordinate i */
static int width(int i, int n3, int n4) { return 2 + (i < n3) + (i < n4); }

static const int8_t *book(int w) { return w == 2 ? rv_turbo_book2 : (w == 3 ? rv_turbo_book3 : rv_turbo_book4); }

/* t's scalar fields (its shape) for the configuration, or RV_EINVAL: arithmetic only */
static int turbo_shape(rv_turbo *t, const rv_codec_cfg *cfg)
{
    static const double rates[RV_TURBO_BITS_COUNT] = RV_TURBO_BITS_LIST;
    int known = 0;
    for (int i = 0; i < RV_TURBO_BITS_COUNT; i++)
        known |= cfg->bits == rates[i];
    if (!known || cfg->num_kv_heads <= 0 || cfg->head_dim <= 0 || cfg->head_dim > RV_MAX_HEAD_DIM ||
        cfg->group_tokens <= 0 || cfg->group_tokens > RV_MAX_GROUP_TOKENS ||
        (int64_t)cfg->num_kv_heads * cfg->head_dim * cfg->group_tokens > RV_MAX_GROUP_VALUES)
        return RV_EINVAL;
    memset(t, 0, sizeof *t);
    t->kvh = cfg->num_kv_heads;
    t->d = cfg->head_dim;
    t->D = 16;
    while (t->D < t->d)
        t->D *= 2;
    t->G = cfg->group_tokens;
    t->Gp = (t->G + 15) / 16 * 16;
    if (cfg->key_bits != 0.0 || cfg->value_bits != 0.0) {
        if (given_widths(t, cfg->key_bits, cfg->value_bits) != RV_OK)
            return RV_EINVAL;
    } else {
        choose_widths(t, cfg->bits);
    }
    t->kbytes = token_bytes(t->D, t->k_n3, t->k_n4);
    t->vbytes = token_bytes(t->D, t->v_n3, t->v_n4);
    size_t o = 2 * P_COUNT;
    t->off_mu = o;   o += (size_t)(t->d + 1) / 2;
    t->off_flag = o; o += (size_t)t->Gp / 8;
    t->off_kn = o;   o += (size_t)t->Gp;
    t->off_vn = o;   o += (size_t)t->Gp;
    t->off_kc = o;   o += (size_t)t->Gp * t->kbytes;
    t->off_vc = o;   o += (size_t)t->Gp * t->vbytes;
    t->seg = (o + 1) & ~(size_t)1;
    /* the tables: the struct, the signs [D], the kernels' lookup tables [2][D] */
    t->bytes = sizeof(rv_turbo) + rv_kv_alloc_size(sizeof(float) * (size_t)t->D) + rv_kv_alloc_size(2 * (size_t)t->D);
    return RV_OK;
}

static void turbo_free(rv_turbo *t)
{
    if (!t)
        return;
    rv_kv_free(t->signs);
    rv_kv_free(t->tabs);
    free(t);
}

static int turbo_create(const rv_codec_cfg *cfg, void **state)
{
    rv_turbo shape;
    *state = NULL;
    int rc = turbo_shape(&shape, cfg);
    if (rc != RV_OK)
        return rc;
    rv_turbo *t = (rv_turbo *)malloc(sizeof(rv_turbo));
    if (!t)
        return RV_ENOMEM;
    *t = shape;
    t->signs = (float *)rv_kv_alloc(sizeof(float) * (size_t)t->D);
    t->tabs = (uint8_t *)rv_kv_alloc(2 * (size_t)t->D);
    if (!t->signs || !t->tabs) {
        turbo_free(t);
        return RV_ENOMEM;
    }
    uint64_t seed = 0x7572767079ull ^ ((uint64_t)t->D << 32);   /* "ruvpy", per padded dim */
    for (int i = 0; i < t->D; i++)
        t->signs[i] = (splitmix(&seed) >> 63) ? 1.0f : -1.0f;
    for (int b = 0; b < t->D; b += 16)
        for (int k = 0; k < 16; k++) {
            const int kw = width(b, t->k_n3, t->k_n4), vw = width(b, t->v_n3, t->v_n4);
            t->tabs[b + k] = k < (1 << kw) ? (uint8_t)(book(kw)[k] + 64) : 0;
            t->tabs[t->D + b + k] = k < (1 << vw) ? (uint8_t)book(vw)[k] : 0;
        }
    *state = t;
    return RV_OK;
}

static void turbo_destroy(void *state) { turbo_free((rv_turbo *)state); }

static size_t blob_bytes(const rv_turbo *t) { return (size_t)t->kvh * t->seg; }

static const unsigned char *segment(const rv_turbo *t, const unsigned char *blob, int head)
{
    return blob + (size_t)head * t->seg;
}

static float param(const unsigned char *seg, int which)
{
    uint16_t h;
    memcpy(&h, seg + 2 * which, 2);
    return rv_f16_to_f32(h);
}

static void put_param(unsigned char *seg, int which, uint16_t h) { memcpy(seg + 2 * which, &h, 2); }

static int validate_blob(const rv_turbo *t, const unsigned char *blob, size_t bytes)
{
    if (bytes != blob_bytes(t))
        return -1;
    for (int h = 0; h < t->kvh; h++)
        for (int p = 0; p < P_COUNT; p++)
            if (!isfinite(param(blob + (size_t)h * t->seg, p)))
                return -1;
    return 0;
}

/* ---- codes ---- */

static void put_code(uint8_t *tok, int D, int n3, int n4, int i, int code)
{
    const int q = D / 4;
    tok[i % q] |= (uint8_t)((code & 3) << (2 * (i / q)));
    if (i < n3 && (code & 4))
        tok[q + i / 8] |= (uint8_t)(1u << (i % 8));
    if (i < n4 && (code & 8))
        tok[q + n3 / 8 + i / 8] |= (uint8_t)(1u << (i % 8));
}

/* y = R x (x [d], zero-padded to D) */
static void rotate(const rv_turbo *t, const float *x, float *y)
{
    for (int i = 0; i < t->D; i++)
        y[i] = i < t->d ? x[i] * t->signs[i] : 0.0f;
    fwht(y, t->D);
    const float inv = 1.0f / sqrtf((float)t->D);
    for (int i = 0; i < t->D; i++)
        y[i] *= inv;
}

/* x[0..d) = R^T y (y [D] is overwritten) */
static void unrotate(const rv_turbo *t, float *y, float *x)
{
    fwht(y, t->D);
    const float inv = 1.0f / sqrtf((float)t->D);
    for (int i = 0; i < t->d; i++)
        x[i] = y[i] * inv * t->signs[i];
}

/* Scales tried for a vector's codes, relative to its norm's: the nearest codes at one scale
 * are not the best codes for a free scale; trying a few around it and keeping the codes whose
 * least-squares fit leaves the least error cut SmolLM2's worst-layer attention error by about a
 * tenth (1 - cosine 0.0220 -> 0.0193 at 3.5 bits, tools/kv_quant_lab.py, README). */
static const float code_scales_tried[] = {1.0f, 0.85f, 0.9f, 0.95f, 1.05f, 1.1f, 1.15f};

/* the indices k[16] of the centroids of book(w) nearest y[0..16) * s (ties and NaN: the lower
 * one): the count of midpoints below, branch-free over the 16 coordinates of a block */
static void nearest_block(const float *y, float s, int w, int *k)
{
    const int8_t *b = book(w);
    for (int i = 0; i < 16; i++)
        k[i] = 0;
    for (int j = 0; j + 1 < (1 << w); j++) {
        const float mid = 0.5f * (float)(b[j] + b[j + 1]);
        for (int i = 0; i < 16; i++)
            k[i] += y[i] * s > mid;
    }
}

/* (y . c)^2 / (c . c) for the nearest codes c of y * s: what their least-squares fit explains of
 * |y|^2 (the larger, the smaller the error); yc, cc returned, the codes into k [D] */
static double codes_fit(const float *y, int D, int n3, int n4, float s, int *k, double *yc_out, double *cc_out)
{
    double yc = 0.0, cc = 0.0;
    for (int b0 = 0; b0 < D; b0 += 16) {     /* n3, n4 are multiples of 16: one width per block */
        const int w = width(b0, n3, n4);
        nearest_block(y + b0, s, w, k + b0);
        for (int i = b0; i < b0 + 16; i++) {
            const float c = (float)book(w)[k[i]];
            yc += (double)y[i] * c;
            cc += (double)c * c;
        }
    }
    *yc_out = yc;
    *cc_out = cc;
    return cc > 0.0 ? yc * yc / cc : 0.0;
}

/* Codes of x [d] into tok (kbytes/vbytes, zeroed) with widths n3/n4; returns the scale a with
 * R x ~= a c (least squares for the chosen codes), 0 for a zero (or non-finite) vector. */
static float code_vector(const rv_turbo *t, const float *x, int n3, int n4, uint8_t *tok, float *y)
{
    const int D = t->D;
    double n2 = 0.0;
    for (int i = 0; i < t->d; i++)
        n2 += (double)x[i] * x[i];
    if (!(n2 > 0.0) || !isfinite(n2))
        return 0.0f;
    rotate(t, x, y);
    /* coordinates of R x / |x| are ~N(0, 1/D): in codebook units N(0, BOOK_SCALE^2) */
    const float s0 = (float)(sqrt((double)D) * RV_TURBO_BOOK_SCALE / sqrt(n2));
    int k[RV_MAX_HEAD_DIM], best_k[RV_MAX_HEAD_DIM];
    double best = -1.0, yc = 0.0, cc = 0.0;
    for (size_t m = 0; m < sizeof code_scales_tried / sizeof code_scales_tried[0]; m++) {
        double yc_m, cc_m;
        const double fit = codes_fit(y, D, n3, n4, s0 * code_scales_tried[m], k, &yc_m, &cc_m);
        if (fit > best) {
            best = fit;
            yc = yc_m;
            cc = cc_m;
            memcpy(best_k, k, sizeof(int) * (size_t)D);
        }
    }
    for (int i = 0; i < D; i++)
        put_code(tok, D, n3, n4, i, best_k[i]);
    const double a = cc > 0.0 ? yc / cc : 0.0;
    return a > 0.0 && isfinite(a) ? (float)a : 0.0f;
}

/* 8-bit codes of log a over the group: 0 for a = 0, else 1 + round((log a - lo) / step) */
static void code_scales(const float *a, int n, uint8_t *codes, unsigned char *seg, int p_lo, int p_step)
{
    float lo = INFINITY, hi = -INFINITY;
    for (int t = 0; t < n; t++)
        if (a[t] > 0.0f) {
            float l = logf(a[t]);
            lo = l < lo ? l : lo;
            hi = l > hi ? l : hi;
        }
    uint16_t lo16 = 0, step16 = 0;
    if (lo <= hi) {
        lo16 = rv_f32_to_f16(lo);
        float lof = rv_f16_to_f32(lo16);
        step16 = rv_f32_to_f16((hi - lof) / 254.0f);
        if (!(rv_f16_to_f32(step16) >= 0.0f) || !isfinite(rv_f16_to_f32(step16)))
            step16 = 0;
    }
    put_param(seg, p_lo, lo16);
    put_param(seg, p_step, step16);
    const float lof = rv_f16_to_f32(lo16), stf = rv_f16_to_f32(step16);
    for (int t = 0; t < n; t++) {
        if (!(a[t] > 0.0f)) {
            codes[t] = 0;
            continue;
        }
        float k = stf > 0.0f ? rintf((logf(a[t]) - lof) / stf) : 0.0f;
        codes[t] = (uint8_t)(1 + (k <= 0.0f ? 0 : (k >= 254.0f ? 254 : (int)k)));
    }
}

static float scale_of(int code, float lo, float step) { return code ? expf(lo + (float)(code - 1) * step) : 0.0f; }

/* The key mean mu of x [G][d] over the tokens whose key is nearer it than zero (two rounds from
 * the plain mean), as 4-bit codes over its range into seg; mu decoded into mu[d]. */
static void code_mean(const rv_turbo *t, const float *x, unsigned char *seg, float *mu, float *tmp)
{
    const int d = t->d, G = t->G;
    for (int c = 0; c < d; c++)
        mu[c] = 0.0f;
    for (int round = 0; round < 3; round++) {
        for (int c = 0; c < d; c++)
            tmp[c] = 0.0f;
        int n = 0;
        for (int tok = 0; tok < G; tok++) {
            const float *xt = x + (size_t)tok * d;
            double far = 0.0, near = 0.0;
            for (int c = 0; c < d; c++) {
                far += (double)xt[c] * xt[c];
                near += (double)(xt[c] - mu[c]) * (xt[c] - mu[c]);
            }
            if (round == 0 || near < far) {
                for (int c = 0; c < d; c++)
                    tmp[c] += xt[c];
                n++;
            }
        }
        for (int c = 0; c < d; c++)
            mu[c] = n ? tmp[c] / (float)n : 0.0f;
    }
    float lo = INFINITY, hi = -INFINITY;
    for (int c = 0; c < d; c++)
        if (isfinite(mu[c])) {
            lo = mu[c] < lo ? mu[c] : lo;
            hi = mu[c] > hi ? mu[c] : hi;
        }
    uint16_t lo16 = 0, step16 = 0;
    if (lo <= hi) {
        lo16 = rv_f32_to_f16(lo);
        step16 = rv_f32_to_f16((hi - rv_f16_to_f32(lo16)) / 15.0f);
        if (!isfinite(rv_f16_to_f32(lo16)) || !(rv_f16_to_f32(step16) >= 0.0f) || !isfinite(rv_f16_to_f32(step16)))
            lo16 = step16 = 0;
    }
    put_param(seg, P_KMU_LO, lo16);
    put_param(seg, P_KMU_STEP, step16);
    const float lof = rv_f16_to_f32(lo16), stf = rv_f16_to_f32(step16);
    uint8_t *codes = seg + t->off_mu;
    for (int c = 0; c < d; c++) {
        float k = stf > 0.0f ? rintf((mu[c] - lof) / stf) : 0.0f;
        int code = k <= 0.0f ? 0 : (k >= 15.0f ? 15 : (int)k);      /* NaN: 0 */
        codes[c / 2] |= (uint8_t)(code << (4 * (c & 1)));
        mu[c] = lof + (float)code * stf;
    }
}

static void decode_mean(const rv_turbo *t, const unsigned char *seg, float *mu)
{
    const float lo = param(seg, P_KMU_LO), step = param(seg, P_KMU_STEP);
    const uint8_t *codes = seg + t->off_mu;
    int c = 0;
    for (; c + 2 <= t->d; c += 2) {
        const int b = codes[c / 2];
        mu[c] = lo + (float)(b & 15) * step;
        mu[c + 1] = lo + (float)(b >> 4) * step;
    }
    if (c < t->d)
        mu[c] = lo + (float)(codes[c / 2] & 15) * step;
}

/* floats of the encoder's / decoder's own work: y [D], mu, tmp, r [d], scales [Gp] */
static size_t work_floats(const rv_turbo *t)
{
    return 2 * (size_t)t->D + 3 * (size_t)t->d + (size_t)t->Gp;
}

/* head h's keys and values kh, vh [G][d] into its segment (zeroed) */
static void encode_head(const rv_turbo *t, const float *kh, const float *vh, unsigned char *seg, float *work)
{
    const int d = t->d, G = t->G;
    float *y = work, *mu = y + t->D, *tmp = mu + d, *r = tmp + d, *a = r + d;
    /* keys: the group mean out where that shrinks the key */
    code_mean(t, kh, seg, mu, tmp);
    for (int tok = 0; tok < G; tok++) {
        const float *x = kh + (size_t)tok * d;
        double far = 0.0, near = 0.0;
        for (int c = 0; c < d; c++) {
            r[c] = x[c] - mu[c];
            far += (double)x[c] * x[c];
            near += (double)r[c] * r[c];
        }
        const int flag = near < far;
        if (flag)
            seg[t->off_flag + tok / 8] |= (uint8_t)(1u << (tok % 8));
        a[tok] = code_vector(t, flag ? r : x, t->k_n3, t->k_n4, seg + t->off_kc + (size_t)tok * t->kbytes, y);
    }
    code_scales(a, G, seg + t->off_kn, seg, P_KN_LO, P_KN_STEP);
    for (int tok = 0; tok < G; tok++)
        a[tok] = code_vector(t, vh + (size_t)tok * d, t->v_n3, t->v_n4, seg + t->off_vc + (size_t)tok * t->vbytes, y);
    code_scales(a, G, seg + t->off_vn, seg, P_VN_LO, P_VN_STEP);
}

/* head's G tokens back as floats k, v [G][d] (what attention computes with); work: y [D], mu [d] */
static void decode_head(const rv_turbo *t, const unsigned char *blob, int head, float *k, float *v, float *work)
{
    const int D = t->D, d = t->d;
    const unsigned char *seg = segment(t, blob, head);
    float *y = work, *mu = y + D;
    decode_mean(t, seg, mu);
    const float kl = param(seg, P_KN_LO), ks = param(seg, P_KN_STEP);
    const float vl = param(seg, P_VN_LO), vs = param(seg, P_VN_STEP);
    for (int tok = 0; tok < t->G; tok++) {
        for (int kv = 0; kv < 2; kv++) {
            const int n3 = kv ? t->v_n3 : t->k_n3, n4 = kv ? t->v_n4 : t->k_n4;
            const uint8_t *codes = seg + (kv ? t->off_vc + (size_t)tok * t->vbytes : t->off_kc + (size_t)tok * t->kbytes);
            const float a = kv ? scale_of(seg[t->off_vn + tok], vl, vs) : scale_of(seg[t->off_kn + tok], kl, ks);
            for (int i = 0; i < D; i++) {
                const int w = width(i, n3, n4);
                y[i] = a * (float)book(w)[rv_thead_code(codes, D, n3, n4, i)];
            }
            float *x = (kv ? v : k) + (size_t)tok * d;
            unrotate(t, y, x);
            if (!kv && ((seg[t->off_flag + tok / 8] >> (tok % 8)) & 1))
                for (int c = 0; c < d; c++)
                    x[c] += mu[c];
        }
    }
}

/* ---- attention support ---- */

/* prepared query rows: int8 rotated queries [rows][D] bytes, then scales [rows], sums [rows] */
static size_t query_floats(const rv_turbo *t, int rows)
{
    return rv_pad16(((size_t)rows * t->D + 3) / 4) + 2 * rv_pad16((size_t)rows);
}

static void query_parts(const rv_turbo *t, const float *prep, int rows, const int8_t **q8, const float **qscale,
                        const int32_t **qsum)
{
    const size_t b = rv_pad16(((size_t)rows * t->D + 3) / 4);
    *q8 = (const int8_t *)prep;
    *qscale = prep + b;
    *qsum = (const int32_t *)(prep + b + rv_pad16((size_t)rows));
}

/* the (scaled) query rows q [rows][d] (stride q_stride), rotated and made int8, into `prep` */
static void prepare_queries(const rv_turbo *t, const float *q, ptrdiff_t q_stride, int rows, float *prep)
{
    const int D = t->D;
    const size_t b = rv_pad16(((size_t)rows * D + 3) / 4);
    int8_t *q8 = (int8_t *)prep;
    float *qscale = prep + b;
    int32_t *qsum = (int32_t *)(prep + b + rv_pad16((size_t)rows));
    float y[RV_MAX_HEAD_DIM];
    for (int r = 0; r < rows; r++) {
        rotate(t, q + r * q_stride, y);
        float mx = 0.0f;
        for (int i = 0; i < D; i++)
            mx = fabsf(y[i]) > mx ? fabsf(y[i]) : mx;
        const float sc = isfinite(mx) && mx > 0.0f ? mx / 127.0f : 0.0f;
        const float inv = sc > 0.0f ? 1.0f / sc : 0.0f;
        int32_t sum = 0;
        for (int i = 0; i < D; i++) {
            float k = rintf(y[i] * inv);
            int v = k >= 127.0f ? 127 : (k <= -127.0f ? -127 : (int)k);     /* NaN: 0 */
            q8[(size_t)r * D + i] = (int8_t)v;
            sum += v;
        }
        qscale[r] = sc;
        qsum[r] = sum;
    }
}

/* the kernel's view of head `head` of a group, given prepared queries (the key mean decoded
 * into mu [d]) */
static void head_view(const rv_turbo *t, const unsigned char *blob, int head, const float *prep, int rows,
                      const float *q, ptrdiff_t q_stride, float *mu, struct rv_thead *h)
{
    const unsigned char *seg = segment(t, blob, head);
    decode_mean(t, seg, mu);
    const int8_t *q8;
    const float *qscale;
    const int32_t *qsum;
    query_parts(t, prep, rows, &q8, &qscale, &qsum);
    *h = (struct rv_thead){.G = t->G, .Gp = t->Gp, .D = t->D, .d = t->d, .k_n3 = t->k_n3, .k_n4 = t->k_n4,
                           .v_n3 = t->v_n3, .v_n4 = t->v_n4, .kbytes = t->kbytes, .vbytes = t->vbytes,
                           .kcodes = seg + t->off_kc, .vcodes = seg + t->off_vc, .ktab = t->tabs,
                           .vtab = t->tabs + t->D, .knorm = seg + t->off_kn,
                           .vnorm = seg + t->off_vn, .kn_lo = param(seg, P_KN_LO), .kn_step = param(seg, P_KN_STEP),
                           .vn_lo = param(seg, P_VN_LO), .vn_step = param(seg, P_VN_STEP),
                           .kflag = seg + t->off_flag, .kmu = mu, .qplain = q, .qplain_stride = q_stride,
                           .q8 = q8, .qscale = qscale, .qsum = qsum};
}

/* ---- the codec entry (kvcache/rv_codec.h) ---- */

static size_t encode_floats(const rv_turbo *t)
{
    return rv_codec_encoding_floats((size_t)t->G * t->d, work_floats(t), t->kvh);
}

static int turbo_sizes(const rv_codec_cfg *cfg, rv_codec_sizes *out)
{
    rv_turbo t;
    int rc = turbo_shape(&t, cfg);
    if (rc != RV_OK)
        return rc;
    out->state_bytes = t.bytes;
    out->blob_min = out->blob_max = blob_bytes(&t);     /* groups have a fixed size */
    out->encode_floats = encode_floats(&t);
    out->decode_floats = work_floats(&t);
    return RV_OK;
}

static size_t turbo_encoded_bytes(const void *state, const uint16_t *k, const uint16_t *v, float *scratch,
                                  const rv_ops *ops)
{
    (void)k, (void)v, (void)scratch, (void)ops;
    return blob_bytes((const rv_turbo *)state);
}

static void turbo_encode(const void *state, const uint16_t *k, const uint16_t *v, unsigned char *blob, float *scratch,
                         const rv_ops *ops)
{
    const rv_turbo *t = (const rv_turbo *)state;
    memset(blob, 0, blob_bytes(t));      /* padding tokens: zero vectors; pad bytes defined */
    for (int h = 0; h < t->kvh; h++) {
        rv_codec_encoding e = rv_codec_encoding_at(scratch, (size_t)t->G * t->d, work_floats(t), t->kvh, k, v, h, ops);
        encode_head(t, e.kf, e.vf, blob + (size_t)h * t->seg, e.work);
    }
}

static int turbo_validate(const void *state, const unsigned char *blob, size_t bytes)
{
    return validate_blob((const rv_turbo *)state, blob, bytes);
}

static void turbo_decode_head(const void *state, const unsigned char *blob, int head, float *k, float *v,
                              float *scratch, const rv_ops *ops)
{
    (void)ops;
    decode_head((const rv_turbo *)state, blob, head, k, v, scratch);
}

/* Attention in the rotated domain. Scratch: per head j of a task its prepared queries and a
 * rotated-domain state (m, l, acc [rows][D]); after the nh heads the group head's key mean
 * [d], the rows rotated back [rows][d], then the fused kernel's scratch. */
typedef struct {
    float *prep, *m, *l, *acc;
} tq_head_state;

static size_t head_state_floats(const rv_turbo *t, int rows)
{
    return query_floats(t, rows) + 2 * rv_pad16((size_t)rows) + rv_pad16((size_t)rows * t->D);
}

static tq_head_state head_state(const rv_turbo *t, float *scratch, int rows, int j)
{
    tq_head_state s;
    s.prep = scratch + (size_t)j * head_state_floats(t, rows);
    s.m = s.prep + query_floats(t, rows);
    s.l = s.m + rv_pad16((size_t)rows);
    s.acc = s.l + rv_pad16((size_t)rows);
    return s;
}

static float *after_heads(const rv_turbo *t, float *scratch, int rows, int nh)
{
    return scratch + (size_t)nh * head_state_floats(t, rows);
}

static size_t turbo_attend_floats(const void *state, int rows, int nh)
{
    const rv_turbo *t = (const rv_turbo *)state;
    return (size_t)nh * head_state_floats(t, rows) + rv_pad16((size_t)t->d) + rv_pad16((size_t)rows * t->d) +
           rv_pad16(RV_TATTN_SCRATCH_FLOATS(t->Gp, t->D));
}

static void turbo_attend_begin(const void *state, rv_attn_state *states, int nh, float *scratch, const rv_ops *ops)
{
    (void)ops;
    const rv_turbo *t = (const rv_turbo *)state;
    const int rows = states[0].rows;
    for (int j = 0; j < nh; j++) {
        tq_head_state s = head_state(t, scratch, rows, j);
        prepare_queries(t, states[j].q, states[j].q_stride, rows, s.prep);
        rv_attn_state_clear(s.m, s.l, s.acc, rows, t->D);
    }
}

static void turbo_attend_group(const void *state, const unsigned char *blob, int head, int j, int nh, int a, int n,
                               const int *visible, rv_attn_state *states, const unsigned char *next_blob,
                               int next_head, float *scratch, const rv_ops *ops)
{
    const rv_turbo *t = (const rv_turbo *)state;
    const int rows = states[0].rows;
    tq_head_state s = head_state(t, scratch, rows, j);
    float *mu = after_heads(t, scratch, rows, nh);
    float *kscratch = mu + rv_pad16((size_t)t->d) + rv_pad16((size_t)rows * t->d);
    rv_attn_state rot = {rows, t->D, NULL, t->D, s.m, s.l, s.acc, states[0].scratch};
    struct rv_thead th;
    head_view(t, blob, head, s.prep, rows, states[j].q, states[j].q_stride, mu, &th);
    if (next_blob) {     /* fixed-size segments: where the next one is needs no read */
        th.prefetch = segment(t, next_blob, next_head);
        th.prefetch_bytes = t->seg;
    }
    ops->attend_tgroup(&rot, &th, a, n, visible, kscratch);
}

static void turbo_attend_end(const void *state, rv_attn_state *states, int nh, float *scratch, const rv_ops *ops)
{
    const rv_turbo *t = (const rv_turbo *)state;
    const int rows = states[0].rows, d = t->d;
    float *out = after_heads(t, scratch, rows, nh) + rv_pad16((size_t)d);     /* [rows][d] */
    for (int j = 0; j < nh; j++) {
        tq_head_state s = head_state(t, scratch, rows, j);
        for (int r = 0; r < rows; r++)     /* acc [rows][D], rotated domain -> out */
            unrotate(t, s.acc + (size_t)r * t->D, out + (size_t)r * d);
        ops->attn_merge(rows, d, states[j].m, states[j].l, states[j].acc, s.m, s.l, out);
    }
}

const rv_codec rv_codec_turbo = {
    .name = "turbo", .sizes = turbo_sizes, .create = turbo_create, .destroy = turbo_destroy,
    .encoded_bytes = turbo_encoded_bytes, .encode = turbo_encode, .validate = turbo_validate,
    .decode_head = turbo_decode_head,
    .attend_scratch_floats = turbo_attend_floats, .attend_begin = turbo_attend_begin,
    .attend_group = turbo_attend_group, .attend_end = turbo_attend_end,
};
