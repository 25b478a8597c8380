/* The TurboQuant cold-group format (see rv_turbo.h). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "rv_common.h"
#include "rv_fp16.h"
#include "kvcache/rv_turbo.h"
#include "kvcache/rv_kvmem.h"

#define BOOK_STRIDE 32     /* floats per codebook (2^5, room for the widest permute) */
#define TQ_PI 3.14159265358979323846

struct rv_turbo {
    int kvh, d, D, G, Gp;
    int kbits_hi, kbits_lo, vbits_hi, vbits_lo;
    float *signs;                          /* [D] +-1: the randomized Hadamard's diagonal */
    float *S;                              /* [D][D] QJL projections (row j = projection j) */
    float books[RV_TURBO_MAX_BITS + 1][BOOK_STRIDE];   /* centroids / sqrt(D), ascending */
    float bounds[RV_TURBO_MAX_BITS + 1][BOOK_STRIDE];  /* decision thresholds between them */
    size_t bytes;
};

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

rv_turbo *rv_turbo_create(int num_kv_heads, int head_dim, int group_tokens, double bits)
{
    int mse_hi, mse_lo;
    if (bits == 2.5) {
        mse_hi = 3, mse_lo = 2;
    } else if (bits == 3.5) {
        mse_hi = 4, mse_lo = 3;
    } else if (bits == 4.5) {
        mse_hi = 5, mse_lo = 4;
    } else {
        return NULL;
    }
    if (num_kv_heads <= 0 || head_dim <= 0 || head_dim > 256 || group_tokens <= 0)
        return NULL;
    rv_turbo *t = (rv_turbo *)calloc(1, sizeof(rv_turbo));
    if (!t)
        return NULL;
    t->kvh = num_kv_heads;
    t->d = head_dim;
    t->D = 1;
    while (t->D < head_dim)
        t->D *= 2;
    t->G = group_tokens;
    t->Gp = (group_tokens + 15) / 16 * 16;
    t->vbits_hi = mse_hi;
    t->vbits_lo = mse_lo;
    t->kbits_hi = mse_hi - 1;           /* keys give one bit to QJL */
    t->kbits_lo = mse_lo - 1;
    const int D = t->D;
    t->signs = (float *)rv_kv_alloc_counted(sizeof(float) * (size_t)D, &t->bytes);
    t->S = (float *)rv_kv_alloc_counted(sizeof(float) * (size_t)D * D, &t->bytes);
    if (!t->signs || !t->S) {
        rv_turbo_destroy(t);
        return NULL;
    }
    t->bytes += sizeof(rv_turbo);
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

void rv_turbo_destroy(rv_turbo *t)
{
    if (!t)
        return;
    rv_kv_free(t->signs);
    rv_kv_free(t->S);
    free(t);
}

size_t rv_turbo_bytes(const rv_turbo *t) { return t->bytes; }
int rv_turbo_padded_dim(const rv_turbo *t) { return t->D; }

/* ---- layout ---- */

static size_t plane_bytes(const rv_turbo *t) { return (size_t)t->Gp / 8; }

/* planes before rotated coordinate i, with `hi` bits for the first half and `lo` after */
static size_t planes_before(const rv_turbo *t, int i, int hi, int lo)
{
    int half = t->D / 2;
    return i < half ? (size_t)i * hi : (size_t)half * hi + (size_t)(i - half) * lo;
}

typedef struct {
    size_t knorm, kgamma, vnorm, kplanes, qjl, vplanes, total;
} tq_layout;

static void layout(const rv_turbo *t, tq_layout *L)
{
    const size_t pb = plane_bytes(t);
    size_t o = 0;
    L->knorm = o;   o += 2 * (size_t)t->Gp;
    L->kgamma = o;  o += 2 * (size_t)t->Gp;
    L->vnorm = o;   o += 2 * (size_t)t->Gp;
    L->kplanes = o; o += planes_before(t, t->D, t->kbits_hi, t->kbits_lo) * pb;
    L->qjl = o;     o += (size_t)t->D * pb;
    L->vplanes = o; o += planes_before(t, t->D, t->vbits_hi, t->vbits_lo) * pb;
    L->total = o;   /* even: Gp is a multiple of 16 */
}

size_t rv_turbo_segment_bytes(const rv_turbo *t)
{
    tq_layout L;
    layout(t, &L);
    return L.total;
}

size_t rv_turbo_blob_bytes(const rv_turbo *t) { return 4 * (size_t)t->kvh + (size_t)t->kvh * rv_turbo_segment_bytes(t); }

const unsigned char *rv_turbo_segment(const rv_turbo *t, const unsigned char *blob, int head)
{
    return blob + 4 * (size_t)t->kvh + (size_t)head * rv_turbo_segment_bytes(t);
}

int rv_turbo_validate(const rv_turbo *t, const unsigned char *blob, size_t bytes)
{
    if (bytes != rv_turbo_blob_bytes(t))
        return -1;
    for (int h = 0; h < t->kvh; h++) {
        uint32_t off;
        memcpy(&off, blob + 4 * (size_t)h, 4);
        if (off != (size_t)(rv_turbo_segment(t, blob, h) - blob))
            return -1;
    }
    return 0;
}

/* ---- encoding ---- */

size_t rv_turbo_scratch_floats(const rv_turbo *t)
{
    return 4 * (size_t)t->D;
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

void rv_turbo_encode(const rv_turbo *t, const float *k, const float *v, unsigned char *blob,
                     float *scratch, const rv_ops *ops)
{
    const int D = t->D, d = t->d, G = t->G;
    const size_t pb = plane_bytes(t);
    tq_layout L;
    layout(t, &L);
    float *y = scratch, *yhat = y + D;
    memset(blob, 0, rv_turbo_blob_bytes(t));
    for (int h = 0; h < t->kvh; h++) {
        unsigned char *seg = (unsigned char *)rv_turbo_segment(t, blob, h);
        uint32_t off = (uint32_t)(seg - blob);
        memcpy(blob + 4 * (size_t)h, &off, 4);
        uint16_t *knorm = (uint16_t *)(seg + L.knorm), *kgamma = (uint16_t *)(seg + L.kgamma);
        uint16_t *vnorm = (uint16_t *)(seg + L.vnorm);
        for (int tok = 0; tok < G; tok++) {
            const float *kx = k + ((size_t)h * G + tok) * d, *vx = v + ((size_t)h * G + tok) * d;
            /* keys: (bits - 1)-bit codes, then one sign bit per projection of the residual */
            knorm[tok] = rv_f32_to_f16(rotate_unit(t, kx, y));
            quantize_coords(t, y, t->kbits_hi, t->kbits_lo, seg + L.kplanes, tok, yhat);
            double g2 = 0.0;
            for (int i = 0; i < D; i++) {
                y[i] -= yhat[i];
                g2 += (double)y[i] * y[i];
            }
            kgamma[tok] = rv_f32_to_f16((float)sqrt(g2));
            for (int j = 0; j < D; j++)
                put_bit(seg + L.qjl + (size_t)j * pb, tok, ops->dot_f32(t->S + (size_t)j * D, y, (size_t)D) >= 0.0f);
            /* values: bits-bit codes */
            vnorm[tok] = rv_f32_to_f16(rotate_unit(t, vx, y));
            quantize_coords(t, y, t->vbits_hi, t->vbits_lo, seg + L.vplanes, tok, yhat);
        }
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

void rv_turbo_decode(const rv_turbo *t, const unsigned char *blob, int head, float *k, float *v,
                     float *scratch, const rv_ops *ops)
{
    (void)ops;
    const int D = t->D, d = t->d;
    const size_t pb = plane_bytes(t);
    const float c = sqrtf((float)TQ_PI / 2.0f) / (float)D;
    tq_layout L;
    layout(t, &L);
    const unsigned char *seg = rv_turbo_segment(t, blob, head);
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
}

size_t rv_turbo_attend_floats(const rv_turbo *t, int rows, int nh)
{
    const size_t r16 = ((size_t)rows + 15) & ~(size_t)15;
    const size_t rd = ((size_t)rows * t->D + 15) & ~(size_t)15;
    /* per head: q_rot, S q_rot, their sums, the rotated state (m, l, acc); then the norms,
     * the kernel's scratch and one vector for the transforms */
    return (size_t)nh * (3 * rd + 3 * r16) + 3 * (size_t)t->Gp + RV_TATTN_SCRATCH_FLOATS(t->Gp, t->D) +
           (size_t)t->D + 64;
}

void rv_turbo_prepare_queries(const rv_turbo *t, const float *q, ptrdiff_t q_stride, int rows,
                              float *q_rot, float *qjl_q, float *qjl_sum, const rv_ops *ops)
{
    const int D = t->D;
    for (int r = 0; r < rows; r++) {
        float *y = q_rot + (size_t)r * D;
        const float *x = q + r * q_stride;
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

void rv_turbo_head(const rv_turbo *t, const unsigned char *blob, int head, const float *qjl_q,
                   const float *qjl_sum, float *norms, struct rv_thead *h, const rv_ops *ops)
{
    tq_layout L;
    layout(t, &L);
    const unsigned char *seg = rv_turbo_segment(t, blob, head);
    ops->f16_to_f32((const uint16_t *)(seg + L.knorm), norms, 3 * (size_t)t->Gp);   /* knorm, kgamma, vnorm */
    *h = (struct rv_thead){.G = t->G, .Gp = t->Gp, .D = t->D, .kbits_hi = t->kbits_hi, .kbits_lo = t->kbits_lo,
                           .vbits_hi = t->vbits_hi, .vbits_lo = t->vbits_lo, .plane_bytes = plane_bytes(t),
                           .kplanes = seg + L.kplanes, .qjl = seg + L.qjl, .vplanes = seg + L.vplanes,
                           .knorm = norms, .kgamma = norms + t->Gp, .vnorm = norms + 2 * (size_t)t->Gp,
                           .kbook_hi = t->books[t->kbits_hi], .kbook_lo = t->books[t->kbits_lo],
                           .vbook_hi = t->books[t->vbits_hi], .vbook_lo = t->books[t->vbits_lo],
                           .qjl_q = qjl_q, .qjl_sum = qjl_sum, .qjl_scale = sqrtf((float)TQ_PI / 2.0f) / (float)t->D};
}

void rv_turbo_unrotate(const rv_turbo *t, float *acc, int rows, float *out, ptrdiff_t out_stride)
{
    for (int r = 0; r < rows; r++) {
        float *y = acc + (size_t)r * t->D;
        fwht(y, t->D);
        const float inv = 1.0f / sqrtf((float)t->D);
        for (int i = 0; i < t->d; i++)
            out[r * out_stride + i] = y[i] * inv * t->signs[i];
    }
}
