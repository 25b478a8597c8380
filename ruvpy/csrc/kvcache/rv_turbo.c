/* The TurboQuant cold-group format (see rv_turbo.h). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "rv_common.h"
#include "rv_fp16.h"
#include "rv_limits.h"
#include "kvcache/rv_turbo.h"
#include "kvcache/rv_kvmem.h"
#include "kvcache/rv_coldq.h"   /* the channel helpers both formats share */

typedef struct rv_turbo rv_turbo;

#define BOOK_STRIDE 32     /* floats per codebook (2^5, room for the widest permute) */
#define TQ_PI 3.14159265358979323846

struct rv_turbo {
    int kvh, d, D, G, Gp;
    int kbits_hi, kbits_lo, vbits_hi, vbits_lo;
    float *signs;                          /* [D] +-1: the randomized Hadamard's diagonal */
    float *S;                              /* [D][D] QJL projections (row j = projection j) */
    float books[RV_TURBO_MAX_BITS + 1][BOOK_STRIDE];   /* centroids / sqrt(D), ascending */
    float bounds[RV_TURBO_MAX_BITS + 1][BOOK_STRIDE];  /* decision thresholds between them */
    int max_outliers;                      /* per head, group and K / V */
    size_t bytes;
};

static size_t rv_turbo_head_floats(const rv_turbo *t);
static void rv_turbo_destroy(rv_turbo *t);

/* ---- fixed pseudo-random tables: the same for every cache of a shape, so exports load ---- */

static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static double uniform01(uint64_t *s) { return ((splitmix(s) >> 11) + 0.5) * (1.0 / 9007199254740992.0); }

static double gaussian(uint64_t *s)
{
    return sqrt(-2.0 * log(uniform01(s))) * cos(6.283185307179586 * uniform01(s));
}

/* Lloyd-Max quantizer of N(0, 1) with 2^bits levels: centroids and thresholds. */
static void lloyd_max(int bits, double *c, double *t)
{
    const int K = 1 << bits;
    for (int i = 0; i < K; i++)
        c[i] = -3.0 + 6.0 * (i + 0.5) / K;
    for (int it = 0; it < 500; it++) {
        for (int i = 0; i + 1 < K; i++)
            t[i] = 0.5 * (c[i] + c[i + 1]);
        for (int i = 0; i < K; i++) {
            double lo = i ? t[i - 1] : -INFINITY, hi = i + 1 < K ? t[i] : INFINITY;
            double plo = isinf(lo) ? 0.0 : exp(-0.5 * lo * lo), phi = isinf(hi) ? 0.0 : exp(-0.5 * hi * hi);
            double mass = 0.5 * (erf(hi / sqrt(2.0)) - erf(lo / sqrt(2.0)));
            if (mass > 1e-300)
                c[i] = (plo - phi) / sqrt(2.0 * TQ_PI) / mass;     /* E[X | lo < X < hi] */
        }
    }
    for (int i = 0; i + 1 < K; i++)
        t[i] = 0.5 * (c[i] + c[i + 1]);
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

/* t's scalar fields (its shape) for the configuration, or RV_EINVAL: arithmetic only */
static int turbo_shape(rv_turbo *t, int num_kv_heads, int head_dim, int group_tokens, double bits)
{
    static const double widths[RV_TURBO_BITS_COUNT] = RV_TURBO_BITS_LIST;
    int known = 0;
    for (int i = 0; i < RV_TURBO_BITS_COUNT; i++)
        known |= bits == widths[i];
    if (!known || num_kv_heads <= 0 || head_dim <= 0 || head_dim > RV_MAX_HEAD_DIM || group_tokens <= 0 ||
        group_tokens > RV_MAX_GROUP_TOKENS || (int64_t)num_kv_heads * head_dim * group_tokens > RV_MAX_GROUP_VALUES)
        return RV_EINVAL;
    memset(t, 0, sizeof *t);
    t->kvh = num_kv_heads;
    t->d = head_dim;
    t->D = 1;
    while (t->D < head_dim)
        t->D *= 2;
    t->G = group_tokens;
    t->Gp = (group_tokens + 15) / 16 * 16;
    /* b.5 bits: b + 1 for the first half of the rotated coordinates, b for the rest */
    t->vbits_hi = (int)ceil(bits);
    t->vbits_lo = (int)floor(bits);
    t->kbits_hi = t->vbits_hi - 1;           /* keys give one bit to QJL */
    t->kbits_lo = t->vbits_lo - 1;
    t->max_outliers = RV_OUTLIERS_FOR(head_dim);
    /* the tables: the struct, the signs [D] and the projections [D][D] */
    t->bytes = sizeof(rv_turbo) + rv_kv_alloc_size(sizeof(float) * (size_t)t->D) +
               rv_kv_alloc_size(sizeof(float) * (size_t)t->D * (size_t)t->D);
    return RV_OK;
}

static rv_turbo *rv_turbo_create(int num_kv_heads, int head_dim, int group_tokens, double bits)
{
    rv_turbo shape;
    if (turbo_shape(&shape, num_kv_heads, head_dim, group_tokens, bits) != RV_OK)
        return NULL;
    rv_turbo *t = (rv_turbo *)malloc(sizeof(rv_turbo));
    if (!t)
        return NULL;
    *t = shape;
    const int D = t->D;
    t->signs = (float *)rv_kv_alloc(sizeof(float) * (size_t)D);
    t->S = (float *)rv_kv_alloc(sizeof(float) * (size_t)D * D);
    if (!t->signs || !t->S) {
        rv_turbo_destroy(t);
        return NULL;
    }
    uint64_t seed = 0x7572767079ull ^ ((uint64_t)D << 32);   /* "ruvpy", per padded dim */
    for (int i = 0; i < D; i++)
        t->signs[i] = (splitmix(&seed) >> 63) ? 1.0f : -1.0f;
    for (size_t i = 0; i < (size_t)D * D; i++)
        t->S[i] = (float)gaussian(&seed);
    for (int b = 1; b <= RV_TURBO_MAX_BITS; b++) {
        double c[1 << RV_TURBO_MAX_BITS], th[1 << RV_TURBO_MAX_BITS];
        lloyd_max(b, c, th);
        for (int i = 0; i < BOOK_STRIDE; i++) {
            t->books[b][i] = i < (1 << b) ? (float)(c[i] / sqrt((double)D)) : 0.0f;
            t->bounds[b][i] = i + 1 < (1 << b) ? (float)(th[i] / sqrt((double)D)) : INFINITY;
        }
    }
    return t;
}

static void rv_turbo_destroy(rv_turbo *t)
{
    if (!t)
        return;
    rv_kv_free(t->signs);
    rv_kv_free(t->S);
    free(t);
}

static size_t rv_turbo_bytes(const rv_turbo *t) { return t->bytes; }
static int rv_turbo_padded_dim(const rv_turbo *t) { return t->D; }
static int rv_turbo_state_dim(const rv_turbo *t) { return t->D + t->d; }

/* ---- layout ---- */

static size_t plane_bytes(const rv_turbo *t) { return (size_t)t->Gp / 8; }

/* planes before rotated coordinate i, with `hi` bits for the first half and `lo` after */
static size_t planes_before(const rv_turbo *t, int i, int hi, int lo)
{
    int half = t->D / 2;
    return i < half ? (size_t)i * hi : (size_t)half * hi + (size_t)(i - half) * lo;
}

/* offsets in a head segment with nk / nv outlier channels; `counts` is where the part that
 * depends on them starts */
typedef struct {
    size_t knorm, kgamma, vnorm, kplanes, qjl, vplanes, counts, idx, kparams, vparams, kcodes, vcodes, total;
} tq_layout;

static void layout(const rv_turbo *t, int nk, int nv, tq_layout *L)
{
    const size_t pb = plane_bytes(t);
    size_t o = 0;
    L->knorm = o;   o += 2 * (size_t)t->Gp;
    L->kgamma = o;  o += 2 * (size_t)t->Gp;
    L->vnorm = o;   o += 2 * (size_t)t->Gp;
    L->kplanes = o; o += planes_before(t, t->D, t->kbits_hi, t->kbits_lo) * pb;
    L->qjl = o;     o += (size_t)t->D * pb;
    L->vplanes = o; o += planes_before(t, t->D, t->vbits_hi, t->vbits_lo) * pb;
    L->counts = o;  o += 2;   /* even so far: Gp is a multiple of 16 */
    L->idx = o;     o += (size_t)(nk + nv + 1) / 2 * 2;
    L->kparams = o; o += 4 * (size_t)nk;    /* scale[nk], zero[nk] */
    L->vparams = o; o += 4 * (size_t)nv;
    L->kcodes = o;  o += (size_t)nk * t->Gp;
    L->vcodes = o;  o += (size_t)nv * t->Gp;
    L->total = o;
}

static size_t segment_bytes(const rv_turbo *t, int nk, int nv)
{
    tq_layout L;
    layout(t, nk, nv, &L);
    return L.total;
}

static size_t header_bytes(const rv_turbo *t) { return 4 * (size_t)t->kvh; }

static size_t rv_turbo_blob_bytes(const rv_turbo *t) { return header_bytes(t) + (size_t)t->kvh * segment_bytes(t, 0, 0); }

static const unsigned char *rv_turbo_segment(const rv_turbo *t, const unsigned char *blob, int head)
{
    (void)t;
    uint32_t off;
    memcpy(&off, blob + 4 * (size_t)head, 4);
    return blob + off;
}

/* a segment's outlier counts (where every segment has them) */
static void outlier_counts(const rv_turbo *t, const unsigned char *seg, int *nk, int *nv)
{
    tq_layout L;
    layout(t, 0, 0, &L);
    *nk = seg[L.counts];
    *nv = seg[L.counts + 1];
}

static size_t rv_turbo_head_bytes(const rv_turbo *t, const unsigned char *blob, int head)
{
    int nk, nv;
    outlier_counts(t, rv_turbo_segment(t, blob, head), &nk, &nv);
    return segment_bytes(t, nk, nv);
}

static int rv_turbo_validate(const rv_turbo *t, const unsigned char *blob, size_t bytes)
{
    const size_t fixed = segment_bytes(t, 0, 0);
    size_t expect = header_bytes(t);
    if (bytes < expect)
        return -1;
    for (int h = 0; h < t->kvh; h++) {
        uint32_t off;
        memcpy(&off, blob + 4 * (size_t)h, 4);
        if (off != expect || bytes - expect < fixed)
            return -1;
        int nk, nv;
        outlier_counts(t, blob + expect, &nk, &nv);
        tq_layout L;
        layout(t, nk, nv, &L);
        if (nk > t->max_outliers || nv > t->max_outliers || bytes - expect < L.total ||
            !rv_coldq_valid_channels(blob + expect + L.idx, nk, t->d) ||
            !rv_coldq_valid_channels(blob + expect + L.idx + nk, nv, t->d))
            return -1;
        expect += L.total;
    }
    return expect == bytes ? 0 : -1;
}

/* ---- encoding ---- */

static size_t rv_turbo_scratch_floats(const rv_turbo *t)
{
    return 4 * (size_t)t->D;    /* y, y_hat, the vector without its outliers (the selection: 2 d) */
}

/* Outlier channels of x [G][d]: those whose root mean square over the tokens exceeds
 * RV_TURBO_OUTLIER_RATIO x the median channel's, the heaviest max_outliers of them, ascending.
 * What the rotation spreads is a channel's share of |x|^2: SmolLM2's keys have channels far
 * from zero on every token (4 of 64 hold half the energy, with ranges only ~2.5x the median),
 * which a range rule misses. */
static int pick_heavy(const rv_turbo *t, const float *x, uint8_t *idx, float *scratch)
{
    const int d = t->d;
    float *ms = scratch;
    for (int c = 0; c < d; c++) {
        double s2 = 0.0;
        for (int tok = 0; tok < t->G; tok++)
            s2 += (double)x[(size_t)tok * d + c] * x[(size_t)tok * d + c];
        ms[c] = (float)s2;
    }
    /* sums of squares: the RMS ratio squared */
    return rv_coldq_pick_channels(ms, d, RV_TURBO_OUTLIER_RATIO * RV_TURBO_OUTLIER_RATIO, t->max_outliers, idx,
                                  scratch + d);
}

static void select_outliers(const rv_turbo *t, const float *k, const float *v, int *nk, uint8_t *kidx, int *nv,
                            uint8_t *vidx, float *scratch)
{
    *nk = pick_heavy(t, k, kidx, scratch);
    *nv = pick_heavy(t, v, vidx, scratch);
}

RV_INLINE void put_bit(uint8_t *plane, int tok, int bit)
{
    if (bit)
        plane[tok >> 3] |= (uint8_t)(1u << (tok & 7));
}

RV_INLINE int get_bit(const uint8_t *plane, int tok) { return (plane[tok >> 3] >> (tok & 7)) & 1; }

/* y = R x / |x| (zero-padded to D); returns |x| */
static float rotate_unit(const rv_turbo *t, const float *x, float *y)
{
    double n2 = 0.0;
    for (int i = 0; i < t->d; i++)
        n2 += (double)x[i] * x[i];
    const float norm = (float)sqrt(n2);
    const float inv = norm > 0.0f ? 1.0f / norm / sqrtf((float)t->D) : 0.0f;
    for (int i = 0; i < t->D; i++)
        y[i] = i < t->d ? x[i] * inv * t->signs[i] : 0.0f;
    fwht(y, t->D);
    return norm;
}

/* codes of y into the planes at `planes` for token tok; the centroids into yhat */
static void quantize_coords(const rv_turbo *t, const float *y, int hi, int lo, uint8_t *planes, int tok,
                            float *yhat)
{
    const size_t pb = plane_bytes(t);
    for (int i = 0; i < t->D; i++) {
        const int bits = i < t->D / 2 ? hi : lo;
        const float *bound = t->bounds[bits];
        int code = 0;
        while (code + 1 < (1 << bits) && y[i] > bound[code])
            code++;
        yhat[i] = t->books[bits][code];
        uint8_t *p = planes + planes_before(t, i, hi, lo) * pb;
        for (int b = 0; b < bits; b++)
            put_bit(p + (size_t)b * pb, tok, (code >> b) & 1);
    }
}

/* Outlier channels idx[n] of x [G][d]: 8-bit codes per channel over the G tokens with
 * binary16 scale[n], zero[n] (codes against the rounded parameters, so decoding matches). */
static void encode_outliers(const rv_turbo *t, const float *x, int n, const uint8_t *idx, uint16_t *params,
                            uint8_t *codes)
{
    for (int o = 0; o < n; o++)
        rv_coldq_channel_q8(x + idx[o], t->G, (size_t)t->d, &params[o], &params[n + o], codes + (size_t)o * t->Gp);
}

/* x with its outlier channels zeroed, into out[d] */
static const float *without(const rv_turbo *t, const float *x, int n, const uint8_t *idx, float *out)
{
    if (!n)
        return x;
    memcpy(out, x, sizeof(float) * (size_t)t->d);
    for (int o = 0; o < n; o++)
        out[idx[o]] = 0.0f;
    return out;
}

/* Head h's segment at seg (nk / nv outliers as chosen, their layout L): k, v [G][d] floats.
 * work: 3 D floats (y, y_hat, the vector without its outliers). */
static void encode_head(const rv_turbo *t, const float *kh, const float *vh, int nk, const uint8_t *kidx, int nv,
                        const uint8_t *vidx, const tq_layout *L, unsigned char *seg, float *work, const rv_ops *ops)
{
    const int D = t->D, d = t->d, G = t->G;
    const size_t pb = plane_bytes(t);
    float *y = work, *yhat = y + D, *rest = yhat + D;
    memset(seg, 0, L->total);
    seg[L->counts] = (unsigned char)nk;
    seg[L->counts + 1] = (unsigned char)nv;
    memcpy(seg + L->idx, kidx, (size_t)nk);
    memcpy(seg + L->idx + nk, vidx, (size_t)nv);
    encode_outliers(t, kh, nk, kidx, (uint16_t *)(seg + L->kparams), seg + L->kcodes);
    encode_outliers(t, vh, nv, vidx, (uint16_t *)(seg + L->vparams), seg + L->vcodes);
    uint16_t *knorm = (uint16_t *)(seg + L->knorm), *kgamma = (uint16_t *)(seg + L->kgamma);
    uint16_t *vnorm = (uint16_t *)(seg + L->vnorm);
    for (int tok = 0; tok < G; tok++) {
        const float *kx = kh + (size_t)tok * d, *vx = vh + (size_t)tok * d;
        /* keys: (bits - 1)-bit codes, then one sign bit per projection of the residual */
        knorm[tok] = rv_f32_to_f16(rotate_unit(t, without(t, kx, nk, kidx, rest), y));
        quantize_coords(t, y, t->kbits_hi, t->kbits_lo, seg + L->kplanes, tok, yhat);
        double g2 = 0.0;
        for (int i = 0; i < D; i++) {
            y[i] -= yhat[i];
            g2 += (double)y[i] * y[i];
        }
        kgamma[tok] = rv_f32_to_f16((float)sqrt(g2));
        for (int j = 0; j < D; j++)
            put_bit(seg + L->qjl + (size_t)j * pb, tok, ops->dot_f32(t->S + (size_t)j * D, y, (size_t)D) >= 0.0f);
        /* values: bits-bit codes */
        vnorm[tok] = rv_f32_to_f16(rotate_unit(t, without(t, vx, nv, vidx, rest), y));
        quantize_coords(t, y, t->vbits_hi, t->vbits_lo, seg + L->vplanes, tok, yhat);
    }
}

/* ---- decoding (inspection) and attention support ---- */

/* rotated-domain vector y -> x[0..d) = R^T y (scratch D floats) */
static void unrotate(const rv_turbo *t, const float *y, float *x, float *tmp)
{
    memcpy(tmp, y, sizeof(float) * (size_t)t->D);
    fwht(tmp, t->D);
    const float inv = 1.0f / sqrtf((float)t->D);
    for (int i = 0; i < t->d; i++)
        x[i] = tmp[i] * inv * t->signs[i];
}

static void centroids_of(const rv_turbo *t, const uint8_t *planes, int hi, int lo, int tok, float *yhat)
{
    const size_t pb = plane_bytes(t);
    for (int i = 0; i < t->D; i++) {
        const int bits = i < t->D / 2 ? hi : lo;
        const uint8_t *p = planes + planes_before(t, i, hi, lo) * pb;
        int code = 0;
        for (int b = 0; b < bits; b++)
            code |= get_bit(p + (size_t)b * pb, tok) << b;
        yhat[i] = t->books[bits][code];
    }
}

static void rv_turbo_decode(const rv_turbo *t, const unsigned char *blob, int head, float *k, float *v,
                     float *scratch, const rv_ops *ops)
{
    (void)ops;
    const int D = t->D, d = t->d;
    const size_t pb = plane_bytes(t);
    const float c = sqrtf((float)TQ_PI / 2.0f) / (float)D;
    const unsigned char *seg = rv_turbo_segment(t, blob, head);
    int nk, nv;
    outlier_counts(t, seg, &nk, &nv);
    tq_layout L;
    layout(t, nk, nv, &L);
    const uint16_t *knorm = (const uint16_t *)(seg + L.knorm), *kgamma = (const uint16_t *)(seg + L.kgamma);
    const uint16_t *vnorm = (const uint16_t *)(seg + L.vnorm);
    float *y = scratch, *tmp = y + D;
    for (int tok = 0; tok < t->G; tok++) {
        centroids_of(t, seg + L.kplanes, t->kbits_hi, t->kbits_lo, tok, y);
        const float cg = c * rv_f16_to_f32(kgamma[tok]);
        for (int j = 0; j < D; j++) {
            const float sgn = get_bit(seg + L.qjl + (size_t)j * pb, tok) ? cg : -cg;
            for (int i = 0; i < D; i++)
                y[i] += sgn * t->S[(size_t)j * D + i];
        }
        const float kn = rv_f16_to_f32(knorm[tok]), vn = rv_f16_to_f32(vnorm[tok]);
        unrotate(t, y, k + (size_t)tok * d, tmp);
        centroids_of(t, seg + L.vplanes, t->vbits_hi, t->vbits_lo, tok, y);
        unrotate(t, y, v + (size_t)tok * d, tmp);
        for (int i = 0; i < d; i++) {
            k[(size_t)tok * d + i] *= kn;
            v[(size_t)tok * d + i] *= vn;
        }
    }
    /* plus the outlier channels (the TurboQuant part holds zeros there, up to its error) */
    for (int kv = 0; kv < 2; kv++) {
        const int n = kv ? nv : nk;
        const uint8_t *idx = seg + L.idx + (kv ? nk : 0), *codes = seg + (kv ? L.vcodes : L.kcodes);
        const uint16_t *params = (const uint16_t *)(seg + (kv ? L.vparams : L.kparams));
        float *x = kv ? v : k;
        for (int o = 0; o < n; o++) {
            const float sf = rv_f16_to_f32(params[o]), zf = rv_f16_to_f32(params[n + o]);
            for (int tok = 0; tok < t->G; tok++)
                x[(size_t)tok * d + idx[o]] += sf * (float)codes[(size_t)o * t->Gp + tok] + zf;
        }
    }
}

static size_t rv_turbo_attend_floats(const rv_turbo *t, int rows, int nh)
{
    const size_t r16 = rv_pad16((size_t)rows);
    const size_t rd = rv_pad16((size_t)rows * rv_turbo_state_dim(t));
    /* per head: [R q | q], S R q, their sums, the state (m, l, acc); then the norms and
     * outlier parameters, the kernel's scratch and one vector for the transforms */
    return (size_t)nh * (3 * rd + 3 * r16) + rv_turbo_head_floats(t) + RV_TATTN_SCRATCH_FLOATS(t->Gp, t->D) +
           (size_t)t->D + 64;
}

static void rv_turbo_prepare_queries(const rv_turbo *t, const float *q, ptrdiff_t q_stride, int rows,
                              float *q_rot, float *qjl_q, float *qjl_sum, const rv_ops *ops)
{
    const int D = t->D, W = rv_turbo_state_dim(t);
    for (int r = 0; r < rows; r++) {
        float *y = q_rot + (size_t)r * W;
        const float *x = q + r * q_stride;
        memcpy(y + D, x, sizeof(float) * (size_t)t->d);
        for (int i = 0; i < D; i++)
            y[i] = i < t->d ? x[i] * t->signs[i] : 0.0f;
        fwht(y, D);
        ops->scale_f32((size_t)D, 1.0f / sqrtf((float)D), y);
        float sum = 0.0f;
        for (int j = 0; j < D; j++) {
            qjl_q[(size_t)r * D + j] = ops->dot_f32(t->S + (size_t)j * D, y, (size_t)D);
            sum += qjl_q[(size_t)r * D + j];
        }
        qjl_sum[r] = sum;
    }
}

static size_t rv_turbo_head_floats(const rv_turbo *t) { return rv_pad16(3 * (size_t)t->Gp + 4 * RV_MAX_OUTLIERS); }

static void rv_turbo_head(const rv_turbo *t, const unsigned char *blob, int head, const float *qjl_q,
                   const float *qjl_sum, float *norms, struct rv_thead *h, const rv_ops *ops)
{
    const unsigned char *seg = rv_turbo_segment(t, blob, head);
    int nk, nv;
    outlier_counts(t, seg, &nk, &nv);
    tq_layout L;
    layout(t, nk, nv, &L);
    ops->f16_to_f32((const uint16_t *)(seg + L.knorm), norms, 3 * (size_t)t->Gp);   /* knorm, kgamma, vnorm */
    float *params = norms + 3 * (size_t)t->Gp;
    if (nk + nv)   /* kscale, kzero, vscale, vzero: adjacent */
        ops->f16_to_f32((const uint16_t *)(seg + L.kparams), params, 2 * (size_t)(nk + nv));
    *h = (struct rv_thead){.G = t->G, .Gp = t->Gp, .D = t->D, .kbits_hi = t->kbits_hi, .kbits_lo = t->kbits_lo,
                           .vbits_hi = t->vbits_hi, .vbits_lo = t->vbits_lo, .plane_bytes = plane_bytes(t),
                           .kplanes = seg + L.kplanes, .qjl = seg + L.qjl, .vplanes = seg + L.vplanes,
                           .knorm = norms, .kgamma = norms + t->Gp, .vnorm = norms + 2 * (size_t)t->Gp,
                           .kbook_hi = t->books[t->kbits_hi], .kbook_lo = t->books[t->kbits_lo],
                           .vbook_hi = t->books[t->vbits_hi], .vbook_lo = t->books[t->vbits_lo],
                           .qjl_q = qjl_q, .qjl_sum = qjl_sum, .qjl_scale = sqrtf((float)TQ_PI / 2.0f) / (float)t->D,
                           .d = t->d, .nk = nk, .nv = nv, .kidx = seg + L.idx, .vidx = seg + L.idx + nk,
                           .kcodes = seg + L.kcodes, .vcodes = seg + L.vcodes, .kscale = params,
                           .kzero = params + nk, .vscale = params + 2 * nk, .vzero = params + 2 * nk + nv};
}

static void rv_turbo_unrotate(const rv_turbo *t, float *acc, int rows, float *out, ptrdiff_t out_stride)
{
    for (int r = 0; r < rows; r++) {
        float *y = acc + (size_t)r * rv_turbo_state_dim(t), *plain = y + t->D;
        fwht(y, t->D);
        const float inv = 1.0f / sqrtf((float)t->D);
        for (int i = 0; i < t->d; i++)
            out[r * out_stride + i] = y[i] * inv * t->signs[i] + plain[i];
    }
}

/* ---- the codec entry (kvcache/rv_codec.h) ---- */

static size_t turbo_encode_floats(const rv_turbo *t);

static int turbo_sizes(const rv_codec_cfg *cfg, rv_codec_sizes *out)
{
    rv_turbo t;
    int rc = turbo_shape(&t, cfg->num_kv_heads, cfg->head_dim, cfg->group_tokens, cfg->bits);
    if (rc != RV_OK)
        return rc;
    out->state_bytes = t.bytes;
    out->blob_min = rv_turbo_blob_bytes(&t);
    out->blob_max = header_bytes(&t) + (size_t)t.kvh * segment_bytes(&t, t.max_outliers, t.max_outliers);
    out->encode_floats = turbo_encode_floats(&t);
    out->decode_floats = rv_turbo_scratch_floats(&t);
    return RV_OK;
}

static int turbo_create(const rv_codec_cfg *cfg, void **state)
{
    rv_turbo shape;
    *state = NULL;
    int rc = turbo_shape(&shape, cfg->num_kv_heads, cfg->head_dim, cfg->group_tokens, cfg->bits);
    if (rc != RV_OK)
        return rc;
    *state = rv_turbo_create(cfg->num_kv_heads, cfg->head_dim, cfg->group_tokens, cfg->bits);
    return *state ? RV_OK : RV_ENOMEM;
}

static void turbo_destroy(void *state) { rv_turbo_destroy((rv_turbo *)state); }

static size_t turbo_encode_floats(const rv_turbo *t)
{
    return rv_codec_encoding_floats((size_t)t->G * t->d, rv_turbo_scratch_floats(t), t->kvh);
}

/* the encoding scratch's parts (rv_codec.h); head h's keys and values as floats */
static rv_codec_encoding turbo_encoding_at(const rv_turbo *t, float *scratch, const uint16_t *k, const uint16_t *v,
                                           int h, const rv_ops *ops)
{
    return rv_codec_encoding_at(scratch, (size_t)t->G * t->d, rv_turbo_scratch_floats(t), t->kvh, k, v, h, ops);
}

static size_t turbo_encoded_bytes(const void *state, const uint16_t *k, const uint16_t *v, float *scratch,
                                  const rv_ops *ops)
{
    const rv_turbo *t = (const rv_turbo *)state;
    size_t n = header_bytes(t);
    for (int h = 0; h < t->kvh; h++) {
        rv_codec_encoding e = turbo_encoding_at(t, scratch, k, v, h, ops);
        select_outliers(t, e.kf, e.vf, &e.nk[h], e.kidx + (size_t)h * RV_MAX_OUTLIERS, &e.nv[h],
                        e.vidx + (size_t)h * RV_MAX_OUTLIERS, e.work);
        n += segment_bytes(t, e.nk[h], e.nv[h]);
    }
    return n;
}

static void turbo_encode(const void *state, const uint16_t *k, const uint16_t *v, unsigned char *blob, float *scratch,
                         const rv_ops *ops)
{
    const rv_turbo *t = (const rv_turbo *)state;
    size_t off = header_bytes(t);
    for (int h = 0; h < t->kvh; h++) {
        rv_codec_encoding e = turbo_encoding_at(t, scratch, k, v, h, ops);
        const int nk = e.nk[h], nv = e.nv[h];
        tq_layout L;
        layout(t, nk, nv, &L);
        uint32_t off32 = (uint32_t)off;
        memcpy(blob + 4 * (size_t)h, &off32, 4);
        encode_head(t, e.kf, e.vf, nk, e.kidx + (size_t)h * RV_MAX_OUTLIERS, nv, e.vidx + (size_t)h * RV_MAX_OUTLIERS,
                    &L, blob + off, e.work, ops);
        off += L.total;
    }
}

static int turbo_validate(const void *state, const unsigned char *blob, size_t bytes)
{
    return rv_turbo_validate((const rv_turbo *)state, blob, bytes);
}

static void turbo_decode_head(const void *state, const unsigned char *blob, int head, float *k, float *v,
                              float *scratch, const rv_ops *ops)
{
    rv_turbo_decode((const rv_turbo *)state, blob, head, k, v, scratch, ops);
}

static size_t turbo_attend_floats(const void *state, int rows, int nh)
{
    return rv_turbo_attend_floats((const rv_turbo *)state, rows, nh);
}

/* Attention in the rotated domain. Per head j of a task, in scratch: [R q | q] (q_rot), S R q
 * (qjl_q), the state's acc, the QJL sums, m and l; after the nh heads the group head's norms
 * and outlier parameters, then the fused kernel's scratch. */
typedef struct {
    float *q_rot, *qjl_q, *acc, *qjl_sum, *m, *l;
} tq_head_state;

static tq_head_state turbo_head_state(const rv_turbo *t, float *scratch, int rows, int j)
{
    const size_t rd = rv_pad16((size_t)rows * rv_turbo_state_dim(t)), r16 = rv_pad16((size_t)rows);
    tq_head_state s;
    s.q_rot = scratch + (size_t)j * (3 * rd + 3 * r16);
    s.qjl_q = s.q_rot + rd;
    s.acc = s.qjl_q + rd;
    s.qjl_sum = s.acc + rd;
    s.m = s.qjl_sum + r16;
    s.l = s.m + r16;
    return s;
}

static float *turbo_norms(const rv_turbo *t, float *scratch, int rows, int nh)
{
    const size_t rd = rv_pad16((size_t)rows * rv_turbo_state_dim(t)), r16 = rv_pad16((size_t)rows);
    return scratch + (size_t)nh * (3 * rd + 3 * r16);
}

static void turbo_attend_begin(const void *state, rv_attn_state *states, int nh, float *scratch, const rv_ops *ops)
{
    const rv_turbo *t = (const rv_turbo *)state;
    const int rows = states[0].rows;
    for (int j = 0; j < nh; j++) {
        tq_head_state s = turbo_head_state(t, scratch, rows, j);
        rv_turbo_prepare_queries(t, states[j].q, states[j].q_stride, rows, s.q_rot, s.qjl_q, s.qjl_sum, ops);
        rv_attn_state_clear(s.m, s.l, s.acc, rows, rv_turbo_state_dim(t));
    }
}

static void turbo_attend_group(const void *state, const unsigned char *blob, int head, int j, int nh, int a, int n,
                               const int *visible, rv_attn_state *states, const unsigned char *next_blob,
                               int next_head, float *scratch, const rv_ops *ops)
{
    const rv_turbo *t = (const rv_turbo *)state;
    const int rows = states[0].rows, W = rv_turbo_state_dim(t);
    tq_head_state s = turbo_head_state(t, scratch, rows, j);
    float *norms = turbo_norms(t, scratch, rows, nh), *kscratch = norms + rv_turbo_head_floats(t);
    rv_attn_state rot = {rows, W, s.q_rot, W, s.m, s.l, s.acc, states[0].scratch};
    struct rv_thead th;
    rv_turbo_head(t, blob, head, s.qjl_q, s.qjl_sum, norms, &th, ops);
    if (next_blob) {
        th.prefetch = rv_turbo_segment(t, next_blob, next_head);
        th.prefetch_bytes = rv_turbo_head_bytes(t, next_blob, next_head);
    }
    ops->attend_tgroup(&rot, &th, a, n, visible, kscratch);
}

static void turbo_attend_end(const void *state, rv_attn_state *states, int nh, float *scratch, const rv_ops *ops)
{
    const rv_turbo *t = (const rv_turbo *)state;
    const int rows = states[0].rows, d = t->d;
    for (int j = 0; j < nh; j++) {
        tq_head_state s = turbo_head_state(t, scratch, rows, j);
        rv_turbo_unrotate(t, s.acc, rows, s.q_rot, d);     /* q_rot is free now: [rows][d] */
        ops->attn_merge(rows, d, states[j].m, states[j].l, states[j].acc, s.m, s.l, s.q_rot);
    }
}

const rv_codec rv_codec_turbo = {
    .name = "turbo", .sizes = turbo_sizes, .create = turbo_create, .destroy = turbo_destroy,
    .encoded_bytes = turbo_encoded_bytes, .encode = turbo_encode, .validate = turbo_validate,
    .decode_head = turbo_decode_head,
    .attend_scratch_floats = turbo_attend_floats, .attend_begin = turbo_attend_begin,
    .attend_group = turbo_attend_group, .attend_end = turbo_attend_end,
};
