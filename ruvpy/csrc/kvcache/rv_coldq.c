/* The q8 / q4 cold-group format (see rv_coldq.h). Encoding runs once per migrated group and
 * is plain C; decoding runs in every attention call and goes through the kernel table. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "rv_common.h"
#include "rv_fp16.h"
#include "rv_limits.h"
#include "kvcache/rv_coldq.h"

typedef struct {
    size_t kscale, kzero, vscale, vzero, vcodes, counts, idx, voscale, vozero, vocodes, kcodes, total;
} seg_layout;

/* the state of a q8 / q4 codec: one cache shape */
typedef struct {
    int num_kv_heads, head_dim;
    int group_tokens;       /* G */
    int group_size;         /* value channel group */
    int bits;               /* 8 or 4 */
    int max_outliers;       /* per head, group and K / V (0 for 8 bits) */
    seg_layout fixed;       /* a segment's places up to its outlier counts (they fix the rest):
                             * worked out once, not per head and group read */
} rv_coldq_cfg;

/* Pointers into one head's segment. */
typedef struct {
    const uint16_t *kscale, *kzero, *vscale, *vzero;
    const uint8_t *kcodes, *vcodes;
    int nk, nv;
    const uint8_t *kidx, *vidx;
    const uint16_t *voscale, *vozero;
    const uint8_t *vocodes;
} rv_coldq_head;

/* bytes of a row of n codes */
static int row_bytes(const rv_coldq_cfg *cfg, int n) { return cfg->bits == 8 ? n : (n + 1) / 2; }
static int key_row(const rv_coldq_cfg *cfg) { return row_bytes(cfg, cfg->group_tokens); }     /* a channel */
static int value_row(const rv_coldq_cfg *cfg) { return row_bytes(cfg, cfg->head_dim); }      /* a token */
static int value_groups(const rv_coldq_cfg *cfg) { return (cfg->head_dim + cfg->group_size - 1) / cfg->group_size; }

/* the places that do not depend on the outlier counts (cfg->fixed) */
static void layout_fixed(const rv_coldq_cfg *cfg, seg_layout *L)
{
    const size_t d = (size_t)cfg->head_dim, G = (size_t)cfg->group_tokens;
    const size_t ng = (size_t)value_groups(cfg), vb = (size_t)value_row(cfg);
    size_t o = 0;
    L->kscale = o;  o += 2 * d;
    L->kzero = o;   o += 2 * d;
    L->vscale = o;  o += 2 * G * ng;
    L->vzero = o;   o += 2 * G * ng;
    L->vcodes = o;  o += G * vb;
    L->counts = o;                    /* where the counts sit does not depend on them */
}

static void layout(const rv_coldq_cfg *cfg, int nk, int nv, seg_layout *L)
{
    const size_t d = (size_t)cfg->head_dim, G = (size_t)cfg->group_tokens, kb = (size_t)key_row(cfg);
    *L = cfg->fixed;
    size_t o = L->counts + 2;
    L->idx = o;     o += (size_t)(nk + nv);
    o = (o + 1) & ~(size_t)1;
    L->voscale = o; o += 2 * (size_t)nv;
    L->vozero = o;  o += 2 * (size_t)nv;
    L->vocodes = o; o += (size_t)nv * G;       /* a row of G 8-bit codes per outlier */
    L->kcodes = o;  o += ((size_t)d + (size_t)nk) * kb;
    L->total = (o + 1) & ~(size_t)1;
}

static size_t rv_coldq_segment_bytes(const rv_coldq_cfg *cfg, int nk, int nv)
{
    seg_layout L;
    layout(cfg, nk, nv, &L);
    return L.total;
}

static size_t header_bytes(const rv_coldq_cfg *cfg) { return 4 * (size_t)cfg->num_kv_heads; }

static size_t rv_coldq_blob_bytes(const rv_coldq_cfg *cfg, const int *nk, const int *nv)
{
    size_t n = header_bytes(cfg);
    for (int h = 0; h < cfg->num_kv_heads; h++)
        n += rv_coldq_segment_bytes(cfg, nk ? nk[h] : 0, nv ? nv[h] : 0);
    return n;
}

static size_t rv_coldq_scratch_floats(const rv_coldq_cfg *cfg)
{
    return 2 * (size_t)cfg->head_dim;     /* channel ranges and their sorted copy */
}

/* min and max of x[t * stride] over t < n */
static void strided_range(const float *x, int n, size_t stride, float *mn, float *mx)
{
    float lo = x[0], hi = x[0];
    for (int t = 1; t < n; t++) {
        float v = x[(size_t)t * stride];
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
    }
    *mn = lo;
    *mx = hi;
}

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

static int cmp_u8(const void *a, const void *b) { return (int)*(const uint8_t *)a - (int)*(const uint8_t *)b; }

int rv_coldq_pick_channels(float *score, int d, float factor, int most, uint8_t *idx, float *sorted)
{
    memcpy(sorted, score, sizeof(float) * (size_t)d);
    qsort(sorted, (size_t)d, sizeof(float), cmp_float);
    const float thresh = factor * sorted[d / 2];
    int n = 0;
    while (n < most) {
        int best = -1;
        for (int c = 0; c < d; c++)
            if (score[c] > thresh && score[c] > 0.0f && (best < 0 || score[c] > score[best]))
                best = c;
        if (best < 0)
            break;
        idx[n++] = (uint8_t)best;
        score[best] = -1.0f;
    }
    qsort(idx, (size_t)n, 1, cmp_u8);
    return n;
}

/* Channels of x [G][d] whose range over the tokens exceeds RV_COLDQ_OUTLIER_RATIO x the median
 * range: the widest max_outliers of them, ascending. */
static int pick_outliers(const rv_coldq_cfg *cfg, const float *x, uint8_t *idx, float *scratch)
{
    const int d = cfg->head_dim, G = cfg->group_tokens;
    if (cfg->max_outliers <= 0)
        return 0;
    float *r = scratch;
    for (int c = 0; c < d; c++) {
        float mn, mx;
        strided_range(x + c, G, (size_t)d, &mn, &mx);
        r[c] = mx - mn;
    }
    return rv_coldq_pick_channels(r, d, RV_COLDQ_OUTLIER_RATIO, cfg->max_outliers, idx, scratch + d);
}

static void rv_coldq_select(const rv_coldq_cfg *cfg, const float *kf, const float *vf, int *nk, uint8_t *kidx,
                     int *nv, uint8_t *vidx, float *scratch)
{
    *nk = pick_outliers(cfg, kf, kidx, scratch);
    *nv = pick_outliers(cfg, vf, vidx, scratch);
}

static void rv_coldq_write_header(const rv_coldq_cfg *cfg, unsigned char *blob, const int *nk, const int *nv)
{
    uint32_t off = (uint32_t)header_bytes(cfg);
    for (int h = 0; h < cfg->num_kv_heads; h++) {
        memcpy(blob + 4 * (size_t)h, &off, 4);
        off += (uint32_t)rv_coldq_segment_bytes(cfg, nk[h], nv[h]);
    }
}

static uint32_t head_offset(const unsigned char *blob, int head)
{
    uint32_t off;
    memcpy(&off, blob + 4 * (size_t)head, 4);
    return off;
}

/* Asymmetric quantization parameters of [mn, mx] with levels 0..L, rounded to binary16 (the
 * codes are computed against the rounded values, so decoding matches encoding). The step is
 * rounded up where the nearest binary16 would leave the top code short of mx: below a range of
 * L * 6.1e-5 the step is subnormal, its rounding up to 2^-25 absolute, and a q8 group spanning
 * 1e-4 decoded up to ~19 steps off its maximum; now every value is within half a stored step. */
static void params(float mn, float mx, int L, uint16_t *s16, uint16_t *z16, float *sf, float *zf)
{
    *s16 = rv_f32_to_f16((mx - mn) / (float)L);
    *z16 = rv_f32_to_f16(mn);
    *zf = rv_f16_to_f32(*z16);
    while (*s16 < 0x7BFF && *zf + (float)L * rv_f16_to_f32(*s16) < mx)   /* finite, positive steps */
        ++*s16;
    *sf = rv_f16_to_f32(*s16);
}

static int code_of(float x, float sf, float zf, int L)
{
    if (!(sf > 0.0f) || !isfinite(sf))
        return 0;
    float c = rintf((x - zf) / sf);
    return c <= 0.0f ? 0 : (c >= (float)L ? L : (int)c);   /* NaN x gives 0 */
}

void rv_coldq_channel_q8(const float *x, int n, size_t stride, uint16_t *scale, uint16_t *zero, uint8_t *codes)
{
    float mn, mx, sf, zf;
    strided_range(x, n, stride, &mn, &mx);
    params(mn, mx, 255, scale, zero, &sf, &zf);
    for (int t = 0; t < n; t++)
        codes[t] = (uint8_t)code_of(x[(size_t)t * stride], sf, zf, 255);
}

RV_INLINE uint8_t code_at(const uint8_t *row, int i, int n, int bits)
{
    int half = (n + 1) / 2;
    return bits == 8 ? row[i] : (uint8_t)(i < half ? row[i] & 15 : row[i - half] >> 4);
}

RV_INLINE void put_code(uint8_t *row, int c, int code, int bits, int half)
{
    if (bits == 8)
        row[c] = (uint8_t)code;
    else if (c < half)
        row[c] = (uint8_t)((row[c] & 0xF0) | code);
    else
        row[c - half] = (uint8_t)((row[c - half] & 0x0F) | (code << 4));
}

static void rv_coldq_encode_head(const rv_coldq_cfg *cfg, unsigned char *blob, int head, const float *kf,
                          const float *vf, int nk, const uint8_t *kidx, int nv, const uint8_t *vidx)
{
    const int d = cfg->head_dim, G = cfg->group_tokens, bits = cfg->bits, gs = cfg->group_size;
    const int ng = value_groups(cfg), kb = key_row(cfg), vb = value_row(cfg);
    const int khalf = (G + 1) / 2, vhalf = (d + 1) / 2;
    const int L = bits == 8 ? 255 : 15;
    seg_layout S;
    layout(cfg, nk, nv, &S);
    unsigned char *seg = blob + head_offset(blob, head);
    memset(seg, 0, S.total);    /* pad bytes too: exports are deterministic and leak no heap */
    uint16_t *kscale = (uint16_t *)(seg + S.kscale), *kzero = (uint16_t *)(seg + S.kzero);
    uint16_t *vscale = (uint16_t *)(seg + S.vscale), *vzero = (uint16_t *)(seg + S.vzero);
    uint8_t *kcodes = seg + S.kcodes, *vcodes = seg + S.vcodes;
    uint16_t *voscale = (uint16_t *)(seg + S.voscale), *vozero = (uint16_t *)(seg + S.vozero);
    uint8_t *vocodes = seg + S.vocodes;
    signed char kslot[RV_MAX_HEAD_DIM], vslot[RV_MAX_HEAD_DIM];   /* channel -> outlier number, or -1 */
    memset(kslot, -1, sizeof kslot);
    memset(vslot, -1, sizeof vslot);
    for (int o = 0; o < nk; o++)
        kslot[kidx[o]] = (signed char)o;
    for (int o = 0; o < nv; o++)
        vslot[vidx[o]] = (signed char)o;
    seg[S.counts] = (uint8_t)nk;
    seg[S.counts + 1] = (uint8_t)nv;
    memcpy(seg + S.idx, kidx, (size_t)nk);
    memcpy(seg + S.idx + nk, vidx, (size_t)nv);

    /* keys: per channel over the G tokens; outlier channels in 8 bits, low nibble in the
     * channel's row, high nibble in row d + o */
    for (int c = 0; c < d; c++) {
        float mn, mx;
        strided_range(kf + c, G, (size_t)d, &mn, &mx);
        int o = kslot[c];
        float sf, zf;
        params(mn, mx, o >= 0 ? 255 : L, &kscale[c], &kzero[c], &sf, &zf);
        for (int t = 0; t < G; t++) {
            int code = code_of(kf[(size_t)t * d + c], sf, zf, o >= 0 ? 255 : L);
            if (o >= 0) {
                put_code(kcodes + (size_t)c * kb, t, code & 15, bits, khalf);
                put_code(kcodes + ((size_t)d + (size_t)o) * kb, t, code >> 4, bits, khalf);
            } else {
                put_code(kcodes + (size_t)c * kb, t, code, bits, khalf);
            }
        }
    }

    /* values: per token in channel groups, outlier channels left out of the range */
    for (int t = 0; t < G; t++) {
        const float *x = vf + (size_t)t * d;
        for (int gi = 0; gi < ng; gi++) {
            int c0 = gi * gs, c1 = c0 + gs < d ? c0 + gs : d;
            float mn = INFINITY, mx = -INFINITY;
            for (int c = c0; c < c1; c++)
                if (vslot[c] < 0) {
                    mn = x[c] < mn ? x[c] : mn;
                    mx = x[c] > mx ? x[c] : mx;
                }
            if (mn > mx)
                mn = mx = 0.0f;     /* every channel of the group is an outlier */
            float sf, zf;
            params(mn, mx, L, &vscale[(size_t)t * ng + gi], &vzero[(size_t)t * ng + gi], &sf, &zf);
            for (int c = c0; c < c1; c++)
                if (vslot[c] < 0)
                    put_code(vcodes + (size_t)t * vb, c, code_of(x[c], sf, zf, L), bits, vhalf);
        }
    }
    /* outlier value channels: 8 bits per channel over the G tokens, in the channel's row of
     * vocodes (its slots in the token rows stay 0) */
    for (int o = 0; o < nv; o++) {
        const int c = vidx[o];
        float mn, mx, sf, zf;
        strided_range(vf + c, G, (size_t)d, &mn, &mx);
        params(mn, mx, 255, &voscale[o], &vozero[o], &sf, &zf);
        for (int t = 0; t < G; t++) {
            vocodes[(size_t)o * G + t] = (uint8_t)code_of(vf[(size_t)t * d + c], sf, zf, 255);
        }
    }
}

static void rv_coldq_head_view(const rv_coldq_cfg *cfg, const unsigned char *blob, int head, rv_coldq_head *h)
{
    const unsigned char *seg = blob + head_offset(blob, head);
    seg_layout S;
    const int nk = seg[cfg->fixed.counts], nv = seg[cfg->fixed.counts + 1];
    layout(cfg, nk, nv, &S);
    h->kscale = (const uint16_t *)(seg + S.kscale);
    h->kzero = (const uint16_t *)(seg + S.kzero);
    h->vscale = (const uint16_t *)(seg + S.vscale);
    h->vzero = (const uint16_t *)(seg + S.vzero);
    h->kcodes = seg + S.kcodes;
    h->vcodes = seg + S.vcodes;
    h->nk = nk;
    h->nv = nv;
    h->kidx = seg + S.idx;
    h->vidx = seg + S.idx + nk;
    h->voscale = (const uint16_t *)(seg + S.voscale);
    h->vozero = (const uint16_t *)(seg + S.vozero);
    h->vocodes = seg + S.vocodes;
}

/* Where head `head`'s segment of the blob that comes next starts, and the bytes of it worth
 * prefetching: all of it, outlier rows included (the key outlier rows and the values' outlier
 * codes sit at its end, and were demand-missed when the span stopped before them). Within the
 * blob being read (`same_blob`) the header is in cache and gives the segment's size, up to its
 * last head; otherwise reading the segment's outlier counts, or the header of a group not yet
 * touched, would wait for memory before the kernel could start (14% of q4 decode), so the span
 * is the largest a segment can be: any excess is the start of the head after it, read next. */
static size_t rv_coldq_prefetch_span(const rv_coldq_cfg *cfg, const unsigned char *blob, int head, int same_blob,
                                     const unsigned char **start)
{
    *start = head ? blob + head_offset(blob, head) : blob + header_bytes(cfg);
    if (same_blob && head + 1 < cfg->num_kv_heads)
        return head_offset(blob, head + 1) - (head ? head_offset(blob, head) : (uint32_t)header_bytes(cfg));
    return rv_coldq_segment_bytes(cfg, cfg->max_outliers, cfg->max_outliers);
}

/* the floats a head's view converts: the outlier value channels' parameters (the kernel reads
 * the others as binary16 in place), then room for the keys' scales and zeros as floats (only
 * dequantizing needs them: dequant_rows_channel takes floats) */
static size_t rv_coldq_param_floats(const rv_coldq_cfg *cfg)
{
    return 2 * RV_MAX_OUTLIERS + 2 * (size_t)cfg->head_dim;
}

static void rv_coldq_qhead(const rv_coldq_cfg *cfg, const rv_coldq_head *v, float *params, struct rv_qhead *q)
{
    float *vos = params, *voz = vos + RV_MAX_OUTLIERS;
    for (int o = 0; o < v->nv; o++) {
        vos[o] = rv_f16_to_f32(v->voscale[o]);
        voz[o] = rv_f16_to_f32(v->vozero[o]);
    }
    *q = (struct rv_qhead){.G = cfg->group_tokens, .head_dim = cfg->head_dim, .bits = cfg->bits,
                           .group_size = cfg->group_size, .kcodes = v->kcodes, .krow = key_row(cfg),
                           .kscale = v->kscale, .kzero = v->kzero, .nk = v->nk, .kidx = v->kidx,
                           .vcodes = v->vcodes, .vrow = value_row(cfg), .vscale = v->vscale, .vzero = v->vzero,
                           .nv = v->nv, .vidx = v->vidx, .voscale = vos, .vozero = voz, .vocodes = v->vocodes};
}

static size_t rv_coldq_dequant_floats(const rv_coldq_cfg *cfg)
{
    return rv_coldq_param_floats(cfg) + ((size_t)cfg->group_tokens * cfg->head_dim + 3) / 4;
}

static void rv_coldq_dequant(const rv_coldq_cfg *cfg, const rv_coldq_head *v, float *kf, float *vf, float *params,
                      const rv_ops *ops)
{
    const int d = cfg->head_dim, G = cfg->group_tokens;
    struct rv_qhead q;
    rv_coldq_qhead(cfg, v, params, &q);
    /* the segment holds kscale and kzero back to back (layout): one conversion */
    float *kscale = params + 2 * RV_MAX_OUTLIERS, *kzero = kscale + d;
    ops->f16_to_f32(v->kscale, kscale, 2 * (size_t)d);
    /* keys are stored channel-major: transpose the codes to token-major bytes first */
    uint8_t *codes = (uint8_t *)(params + rv_coldq_param_floats(cfg));
    for (int c = 0; c < d; c++)
        for (int t = 0; t < G; t++)
            codes[(size_t)t * d + c] = code_at(q.kcodes + (size_t)c * q.krow, t, G, cfg->bits);
    for (int o = 0; o < q.nk; o++)      /* outliers: the high nibble from row d + o */
        for (int t = 0; t < G; t++)
            codes[(size_t)t * d + q.kidx[o]] |= (uint8_t)(code_at(q.kcodes + (size_t)(d + o) * q.krow, t, G, 4) << 4);
    ops->dequant_rows_channel(codes, d, G, d, 8, kscale, kzero, kf);
    ops->dequant_rows_group(q.vcodes, q.vrow, G, d, cfg->bits, cfg->group_size, v->vscale, v->vzero,
                            value_groups(cfg), vf);
    for (int o = 0; o < q.nv; o++) {
        const int c = q.vidx[o];
        for (int t = 0; t < G; t++)
            vf[(size_t)t * d + c] = q.voscale[o] * (float)q.vocodes[(size_t)o * G + t] + q.vozero[o];
    }
}

int rv_coldq_valid_channels(const uint8_t *idx, int n, int d)
{
    for (int i = 0; i < n; i++)
        if (idx[i] >= d || (i && idx[i] <= idx[i - 1]))
            return 0;
    return 1;
}

/* whether n binary16 values at p (any alignment) are all finite (exponent not all ones) */
static int halves_finite(const unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, p + 2 * i, 2);
        if ((h & 0x7C00) == 0x7C00)
            return 0;
    }
    return 1;
}

/* 0 if a blob is well formed: offsets, counts, outlier channels, and every scale and zero
 * finite (a crafted file could hold what the encoder never writes, and attention would
 * return NaN) */
static int rv_coldq_validate(const rv_coldq_cfg *cfg, const unsigned char *blob, size_t bytes)
{
    size_t expect = header_bytes(cfg);
    if (bytes < expect)
        return -1;
    seg_layout S;
    layout(cfg, 0, 0, &S);
    for (int h = 0; h < cfg->num_kv_heads; h++) {
        if (head_offset(blob, h) != expect || expect + S.counts + 2 > bytes)
            return -1;
        const unsigned char *seg = blob + expect;
        int nk = seg[S.counts], nv = seg[S.counts + 1];
        if (nk > cfg->max_outliers || nv > cfg->max_outliers)
            return -1;
        seg_layout P;                 /* the parameters' places with these counts */
        layout(cfg, nk, nv, &P);
        size_t seg_bytes = P.total;
        if (expect + seg_bytes > bytes || !rv_coldq_valid_channels(seg + S.idx, nk, cfg->head_dim) ||
            !rv_coldq_valid_channels(seg + S.idx + nk, nv, cfg->head_dim) ||
            !halves_finite(seg + P.kscale, (P.vcodes - P.kscale) / 2) ||     /* k/v scales, zeros */
            !halves_finite(seg + P.voscale, (P.vocodes - P.voscale) / 2))    /* the outliers' */
            return -1;
        expect += seg_bytes;
    }
    return expect == bytes ? 0 : -1;
}

/* ---- the codec entries (kvcache/rv_codec.h) ---- */

/* the format's configuration for cfg, or RV_EINVAL */
static int coldq_configure(const rv_codec_cfg *in, int bits, rv_coldq_cfg *cfg)
{
    if (in->num_kv_heads <= 0 || in->head_dim <= 0 || in->head_dim > RV_MAX_HEAD_DIM || in->group_tokens <= 0 ||
        in->group_tokens > RV_MAX_GROUP_TOKENS || in->group_size <= 0 ||
        (int64_t)in->num_kv_heads * in->head_dim * in->group_tokens > RV_MAX_GROUP_VALUES)
        return RV_EINVAL;
    cfg->num_kv_heads = in->num_kv_heads;
    cfg->head_dim = in->head_dim;
    cfg->group_tokens = in->group_tokens;
    cfg->group_size = in->group_size < in->head_dim ? in->group_size : in->head_dim;
    cfg->bits = bits;
    /* dense-and-sparse keys and values (4 bits): up to max(1, head_dim / 16) outlier channels */
    cfg->max_outliers = bits == 8 ? 0 : RV_OUTLIERS_FOR(in->head_dim);
    layout_fixed(cfg, &cfg->fixed);
    return RV_OK;
}

static size_t coldq_encode_floats(const rv_coldq_cfg *cfg);

static int coldq_sizes(const rv_codec_cfg *in, int bits, rv_codec_sizes *out)
{
    rv_coldq_cfg cfg;
    int rc = coldq_configure(in, bits, &cfg);
    if (rc != RV_OK)
        return rc;
    out->state_bytes = sizeof(rv_coldq_cfg);
    out->blob_min = rv_coldq_blob_bytes(&cfg, NULL, NULL);
    out->blob_max = header_bytes(&cfg) +
                    (size_t)cfg.num_kv_heads * rv_coldq_segment_bytes(&cfg, cfg.max_outliers, cfg.max_outliers);
    out->encode_floats = coldq_encode_floats(&cfg);
    out->decode_floats = rv_coldq_dequant_floats(&cfg);
    return RV_OK;
}

static int coldq_create(const rv_codec_cfg *in, int bits, void **state)
{
    rv_coldq_cfg cfg;
    *state = NULL;
    int rc = coldq_configure(in, bits, &cfg);
    if (rc != RV_OK)
        return rc;
    rv_coldq_cfg *copy = (rv_coldq_cfg *)malloc(sizeof(rv_coldq_cfg));
    if (!copy)
        return RV_ENOMEM;
    *copy = cfg;
    *state = copy;
    return RV_OK;
}

static int q8_sizes(const rv_codec_cfg *cfg, rv_codec_sizes *out) { return coldq_sizes(cfg, 8, out); }
static int q4_sizes(const rv_codec_cfg *cfg, rv_codec_sizes *out) { return coldq_sizes(cfg, 4, out); }
static int q8_create(const rv_codec_cfg *cfg, void **state) { return coldq_create(cfg, 8, state); }
static int q4_create(const rv_codec_cfg *cfg, void **state) { return coldq_create(cfg, 4, state); }
static void coldq_destroy(void *state) { free(state); }

static size_t coldq_encode_floats(const rv_coldq_cfg *cfg)
{
    return rv_codec_encoding_floats((size_t)cfg->group_tokens * cfg->head_dim, rv_coldq_scratch_floats(cfg),
                                    cfg->num_kv_heads);
}

/* the encoding scratch's parts (rv_codec.h); head h's keys and values as floats when k is given */
static rv_codec_encoding coldq_encoding_at(const rv_coldq_cfg *cfg, float *scratch, const uint16_t *k,
                                           const uint16_t *v, int h, const rv_ops *ops)
{
    return rv_codec_encoding_at(scratch, (size_t)cfg->group_tokens * cfg->head_dim, rv_coldq_scratch_floats(cfg),
                                cfg->num_kv_heads, k, v, h, ops);
}

static size_t coldq_encoded_bytes(const void *state, const uint16_t *k, const uint16_t *v, float *scratch,
                                  const rv_ops *ops)
{
    const rv_coldq_cfg *cfg = (const rv_coldq_cfg *)state;
    rv_codec_encoding e = coldq_encoding_at(cfg, scratch, NULL, NULL, 0, ops);
    for (int h = 0; h < cfg->num_kv_heads; h++) {
        e.nk[h] = e.nv[h] = 0;
        if (cfg->max_outliers > 0) {
            e = coldq_encoding_at(cfg, scratch, k, v, h, ops);
            rv_coldq_select(cfg, e.kf, e.vf, &e.nk[h], e.kidx + (size_t)h * RV_MAX_OUTLIERS, &e.nv[h],
                            e.vidx + (size_t)h * RV_MAX_OUTLIERS, e.work);
        }
    }
    return rv_coldq_blob_bytes(cfg, e.nk, e.nv);
}

static void coldq_encode(const void *state, const uint16_t *k, const uint16_t *v, unsigned char *blob, float *scratch,
                         const rv_ops *ops)
{
    const rv_coldq_cfg *cfg = (const rv_coldq_cfg *)state;
    rv_codec_encoding e = coldq_encoding_at(cfg, scratch, NULL, NULL, 0, ops);
    rv_coldq_write_header(cfg, blob, e.nk, e.nv);
    for (int h = 0; h < cfg->num_kv_heads; h++) {
        e = coldq_encoding_at(cfg, scratch, k, v, h, ops);
        rv_coldq_encode_head(cfg, blob, h, e.kf, e.vf, e.nk[h], e.kidx + (size_t)h * RV_MAX_OUTLIERS, e.nv[h],
                             e.vidx + (size_t)h * RV_MAX_OUTLIERS);
    }
}

static int coldq_validate(const void *state, const unsigned char *blob, size_t bytes)
{
    return rv_coldq_validate((const rv_coldq_cfg *)state, blob, bytes);
}

static void coldq_decode_head(const void *state, const unsigned char *blob, int head, float *k, float *v,
                              float *scratch, const rv_ops *ops)
{
    const rv_coldq_cfg *cfg = (const rv_coldq_cfg *)state;
    rv_coldq_head view;
    rv_coldq_head_view(cfg, blob, head, &view);
    rv_coldq_dequant(cfg, &view, k, v, scratch, ops);
}

/* attention scratch: a head's converted parameters (rv_coldq_param_floats), then the fused
 * kernel's scratch */
static size_t coldq_attend_floats(const void *state, int rows, int nh)
{
    (void)rows;
    (void)nh;
    const rv_coldq_cfg *cfg = (const rv_coldq_cfg *)state;
    return rv_pad16(rv_coldq_param_floats(cfg)) + rv_pad16(RV_QATTN_SCRATCH_FLOATS(cfg->group_tokens, cfg->head_dim));
}

static void coldq_attend_nothing(const void *state, rv_attn_state *states, int nh, float *scratch, const rv_ops *ops)
{
    (void)state, (void)states, (void)nh, (void)scratch, (void)ops;
}

static void coldq_attend_group(const void *state, const unsigned char *blob, int head, int j, int nh, int a, int n,
                               const int *visible, rv_attn_state *states, const unsigned char *next_blob,
                               int next_head, float *scratch, const rv_ops *ops)
{
    (void)nh;
    const rv_coldq_cfg *cfg = (const rv_coldq_cfg *)state;
    float *params = scratch, *qscratch = params + rv_pad16(rv_coldq_param_floats(cfg));
    rv_coldq_head view;
    struct rv_qhead qh;
    rv_coldq_head_view(cfg, blob, head, &view);
    rv_coldq_qhead(cfg, &view, params, &qh);
    if (next_blob)
        qh.prefetch_bytes = rv_coldq_prefetch_span(cfg, next_blob, next_head, next_blob == blob, &qh.prefetch);
    ops->attend_qgroup(&states[j], &qh, a, n, visible, qscratch);
}

#define COLDQ_CODEC(NAME, SIZES, CREATE)                                                          \
    {                                                                                             \
        .name = NAME, .sizes = SIZES, .create = CREATE, .destroy = coldq_destroy,                 \
        .encoded_bytes = coldq_encoded_bytes, .encode = coldq_encode, .validate = coldq_validate, \
        .decode_head = coldq_decode_head, .attend_scratch_floats = coldq_attend_floats,           \
        .attend_begin = coldq_attend_nothing, .attend_group = coldq_attend_group,                 \
        .attend_end = coldq_attend_nothing,                                                       \
    }

const rv_codec rv_codec_q8 = COLDQ_CODEC("q8", q8_sizes, q8_create);
const rv_codec rv_codec_q4 = COLDQ_CODEC("q4", q4_sizes, q4_create);
