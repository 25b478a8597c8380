/* C-level check of one ISA's kernel table (rv_ops) against float64 numpy reference vectors.
 *
 *   kernel_check CASES ISA     run every case of the file CASES on the table of ISA
 *   kernel_check --runners     list the rv_ops fields this program can exercise
 *
 * tests/c/kernel_harness.py writes CASES, builds this program natively (every x86 ISA) and for
 * aarch64 (run under qemu-aarch64), so one set of references checks every ISA's table.
 * Output: "table ISA lanes N slots S best B", then "PASS kernel label" / "FAIL kernel label:
 * why" per case, "NULL slot I" / "UNTESTED slot I" for table slots that are empty or have no
 * runner, and "done PASSED FAILED". Exit 0 if all passed, 1 if not, 77 if the CPU (or this
 * binary) lacks ISA.
 *
 * Case file: a sequence of cases, little-endian. A case is
 *   "RVKC" u32 | str kernel | str label | u32 n_arrays | n_arrays x (str key | u32 dtype |
 *   u64 count | count elements)       with str = u32 length + bytes, dtype 0 f32, 1 u16, 2 i32,
 *                                       3 f64, 4 u8 (the DT_* enum below)
 * Keys: inputs by name ("x", "q", ...), scalar parameters as 1-element f64 arrays ("alpha"),
 * and for each output NAME either "exact:NAME" (bits must match) or "expect:NAME" (f64) with
 * "tol:NAME" (f64, absolute tolerance per element; NaN expects NaN, inf expects the same inf).
 *
 * Every input and output buffer ends right before an inaccessible page, so a kernel that
 * reads or writes past the end of its data crashes here instead of passing by luck.
 *
 * To test a new kernel appended to rv_ops:
 *   1. write `static int run_NAME(const rv_ops *ops, rv_case *c)` below: fetch inputs with
 *      in_f32/in_u16/in_i32/param, get output buffers with out_f32/out_u16 (or out_copy_*
 *      for in/out arrays), call ops->NAME; return 0, or fail(c, ...) for malformed cases;
 *   2. add RUNNER(NAME) to `runners`;
 *   3. add a generator for its cases (inputs + float64 expectations) in kernel_harness.py.
 * Until then the table slot is reported UNTESTED and test_neon.py fails naming it.
 */
#define _DEFAULT_SOURCE
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "kernels/rv_ops.h"
#include "kernels/rv_qview.h"

/* ---- case storage ---- */

enum { DT_F32 = 0, DT_U16 = 1, DT_I32 = 2, DT_F64 = 3, DT_U8 = 4, DT_COUNT };
static const size_t dt_size[DT_COUNT] = {4, 2, 4, 8, 1};

typedef struct {
    char *key;
    uint32_t dtype;
    uint64_t count;
    void *data;          /* guarded allocation, see guarded_alloc */
    size_t map_bytes;
    void *map;
} rv_array;

#define MAX_ARRAYS 64
typedef struct rv_case {
    char *kernel, *label;
    rv_array in[MAX_ARRAYS];       /* from the file */
    int n_in;
    rv_array out[MAX_ARRAYS];      /* produced by the runner */
    int n_out;
    char error[512];               /* set by fail() */
} rv_case;

/* `bytes` of memory ending right before a PROT_NONE page (align: alignment of the start) */
static void *guarded_alloc(size_t bytes, size_t align, rv_array *a)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t span = (bytes + align - 1) / align * align;
    size_t body = (span + page - 1) / page * page;
    char *map = mmap(NULL, body + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED)
        return NULL;
    if (mprotect(map + body, page, PROT_NONE) != 0) {
        munmap(map, body + page);
        return NULL;
    }
    a->map = map;
    a->map_bytes = body + page;
    /* ends at the guard page when bytes is a multiple of align, else within align bytes of it */
    a->data = map + body - span;
    return a->data;
}

static void free_array(rv_array *a)
{
    if (a->map)
        munmap(a->map, a->map_bytes);
    free(a->key);
    memset(a, 0, sizeof *a);
}

static void free_case(rv_case *c)
{
    for (int i = 0; i < c->n_in; i++)
        free_array(&c->in[i]);
    for (int i = 0; i < c->n_out; i++)
        free_array(&c->out[i]);
    free(c->kernel);
    free(c->label);
    memset(c, 0, sizeof *c);
}

static int fail(rv_case *c, const char *fmt, const char *what)
{
    if (!c->error[0])
        snprintf(c->error, sizeof c->error, fmt, what);
    return -1;
}

/* ---- reading ---- */

static int read_exact(FILE *f, void *p, size_t n) { return fread(p, 1, n, f) == n ? 0 : -1; }

static char *read_str(FILE *f)
{
    uint32_t n;
    if (read_exact(f, &n, 4) || n > 4096)
        return NULL;
    char *s = malloc(n + 1);
    if (!s || read_exact(f, s, n)) {
        free(s);
        return NULL;
    }
    s[n] = 0;
    return s;
}

/* 1: a case was read, 0: end of file, -1: malformed */
static int read_case(FILE *f, rv_case *c)
{
    char magic[4];
    size_t got = fread(magic, 1, 4, f);
    if (got == 0)
        return 0;
    if (got != 4 || memcmp(magic, "RVKC", 4))
        return -1;
    uint32_t n;
    if (!(c->kernel = read_str(f)) || !(c->label = read_str(f)) || read_exact(f, &n, 4) || n > MAX_ARRAYS)
        return -1;
    for (uint32_t i = 0; i < n; i++) {
        rv_array *a = &c->in[c->n_in++];
        if (!(a->key = read_str(f)) || read_exact(f, &a->dtype, 4) || a->dtype >= DT_COUNT ||
            read_exact(f, &a->count, 8) || a->count > ((uint64_t)1 << 32))
            return -1;
        size_t bytes = (size_t)a->count * dt_size[a->dtype];
        if (!guarded_alloc(bytes, dt_size[a->dtype], a) || read_exact(f, a->data, bytes))
            return -1;
    }
    return 1;
}

/* ---- what runners use ---- */

static rv_array *find(rv_array *arr, int n, const char *key)
{
    for (int i = 0; i < n; i++)
        if (strcmp(arr[i].key, key) == 0)
            return &arr[i];
    return NULL;
}

static const void *input(rv_case *c, const char *key, uint32_t dtype, size_t *count, int required)
{
    rv_array *a = find(c->in, c->n_in, key);
    if (count)
        *count = 0;
    if (!a) {
        if (required)
            fail(c, "missing input %s", key);
        return NULL;
    }
    if (a->dtype != dtype) {
        fail(c, "input %s has the wrong dtype", key);
        return NULL;
    }
    if (count)
        *count = (size_t)a->count;
    return a->data;
}

static const float *in_f32(rv_case *c, const char *key, size_t *n) { return input(c, key, DT_F32, n, 1); }
static const uint16_t *in_u16(rv_case *c, const char *key, size_t *n) { return input(c, key, DT_U16, n, 1); }
/* optional: NULL (and no error) when the case has no such array */
static const uint8_t *in_u8(rv_case *c, const char *key, size_t *n) { return input(c, key, DT_U8, n, 1); }
static const int32_t *in_i32_opt(rv_case *c, const char *key, size_t *n) { return input(c, key, DT_I32, n, 0); }

/* a scalar parameter (1-element f64 array); 0 and an error if missing */
static double param(rv_case *c, const char *key)
{
    const double *p = input(c, key, DT_F64, NULL, 1);
    return p ? p[0] : 0.0;
}

static int has(rv_case *c, const char *key) { return find(c->in, c->n_in, key) != NULL; }

static void *output(rv_case *c, const char *key, uint32_t dtype, size_t count, size_t align)
{
    if (c->n_out == MAX_ARRAYS) {
        fail(c, "too many outputs (%s)", key);
        return NULL;
    }
    rv_array *a = &c->out[c->n_out];
    memset(a, 0, sizeof *a);
    if (!guarded_alloc(count * dt_size[dtype], align, a) || !(a->key = strdup(key))) {
        free_array(a);
        fail(c, "out of memory for %s", key);
        return NULL;
    }
    a->dtype = dtype;
    a->count = count;
    c->n_out++;
    return a->data;
}

static float *out_f32(rv_case *c, const char *key, size_t n) { return output(c, key, DT_F32, n, 4); }
static uint16_t *out_u16(rv_case *c, const char *key, size_t n) { return output(c, key, DT_U16, n, 2); }

/* an output that starts as a copy of the input of the same name (in-place kernels) */
static float *out_copy_f32(rv_case *c, const char *key, size_t *n)
{
    const float *src = in_f32(c, key, n);
    float *dst = src ? out_f32(c, key, *n) : NULL;
    if (dst)
        memcpy(dst, src, *n * sizeof *dst);
    return dst;
}

/* ---- runners: one per rv_ops kernel ---- */

static int run_dot_f32(const rv_ops *ops, rv_case *c)
{
    size_t n = 0, nb = 0;
    const float *a = in_f32(c, "a", &n), *b = in_f32(c, "b", &nb);
    float *r = out_f32(c, "r", 1);
    if (!a || !b || !r || n != nb)
        return fail(c, "%s: needs a, b of one length", "dot_f32");
    r[0] = ops->dot_f32(a, b, n);
    return 0;
}

static int run_axpy_f32(const rv_ops *ops, rv_case *c)
{
    size_t n = 0, ny = 0;
    const float *x = in_f32(c, "x", &n);
    float *y = out_copy_f32(c, "y", &ny);
    double alpha = param(c, "alpha");
    if (c->error[0] || !x || !y || n != ny)
        return fail(c, "%s: needs x, y of one length and alpha", "axpy_f32");
    ops->axpy_f32(n, (float)alpha, x, y);
    return 0;
}

static int run_scale_f32(const rv_ops *ops, rv_case *c)
{
    size_t n = 0;
    float *x = out_copy_f32(c, "x", &n);
    double alpha = param(c, "alpha");
    if (c->error[0] || !x)
        return fail(c, "%s: needs x and alpha", "scale_f32");
    ops->scale_f32(n, (float)alpha, x);
    return 0;
}

static int run_max_f32(const rv_ops *ops, rv_case *c)
{
    size_t n = 0;
    const float *x = in_f32(c, "x", &n);
    float *r = out_f32(c, "r", 1);
    if (!x || !r)
        return fail(c, "%s: needs x", "max_f32");
    r[0] = ops->max_f32(x, n);
    return 0;
}

/* mode param: 0 separate out, 1 out == NULL (only the sum), 2 out aliases x (in place) */
static int run_sum_exp_f32(const rv_ops *ops, rv_case *c)
{
    size_t n = 0;
    const float *x = in_f32(c, "x", &n);
    double shift = param(c, "shift"), mode = param(c, "mode");
    float *sum = out_f32(c, "sum", 1);
    if (c->error[0] || !x || !sum)
        return fail(c, "%s: needs x, shift, mode", "sum_exp_f32");
    if (mode == 1) {
        sum[0] = ops->sum_exp_f32(x, (float)shift, NULL, n);
    } else if (mode == 2) {
        float *xo = out_copy_f32(c, "x", &n);
        if (!xo)
            return -1;
        sum[0] = ops->sum_exp_f32(xo, (float)shift, xo, n);
    } else {
        float *out = out_f32(c, "out", n);
        if (!out)
            return -1;
        sum[0] = ops->sum_exp_f32(x, (float)shift, out, n);
    }
    return 0;
}

static int run_f32_to_f16(const rv_ops *ops, rv_case *c)
{
    size_t n = 0;
    const float *x = in_f32(c, "x", &n);
    uint16_t *h = x ? out_u16(c, "h", n) : NULL;
    if (!h)
        return fail(c, "%s: needs x", "f32_to_f16");
    ops->f32_to_f16(x, h, n);
    return 0;
}

static int run_f16_to_f32(const rv_ops *ops, rv_case *c)
{
    size_t n = 0;
    const uint16_t *h = in_u16(c, "h", &n);
    float *x = h ? out_f32(c, "x", n) : NULL;
    if (!x)
        return fail(c, "%s: needs h", "f16_to_f32");
    ops->f16_to_f32(h, x, n);
    return 0;
}

/* The attention state as outputs the harness can compare without depending on how m is
 * chosen: out = acc / l and lse = m + log(l) per row; a row with l == 0 must be untouched,
 * so it reports out = acc (zeros) and lse = m (-inf). */
static int report_state(rv_case *c, int rows, int d, const float *m, const float *l, const float *acc)
{
    float *out = out_f32(c, "out", (size_t)rows * d), *lse = out_f32(c, "lse", (size_t)rows);
    if (!out || !lse)
        return -1;
    for (int r = 0; r < rows; r++) {
        lse[r] = l[r] > 0 ? m[r] + logf(l[r]) : m[r];
        for (int j = 0; j < d; j++)
            out[(size_t)r * d + j] = l[r] > 0 ? acc[(size_t)r * d + j] / l[r] : acc[(size_t)r * d + j];
    }
    return 0;
}

/* state buffers with guard pages; acc rows x d, scratch 64-byte aligned as rv_ops.h asks */
typedef struct {
    float *m, *l, *acc, *scratch;
} state_bufs;

static int alloc_state(rv_case *c, int rows, int d, state_bufs *s)
{
    s->m = output(c, "_m", DT_F32, (size_t)rows, 4);
    s->l = output(c, "_l", DT_F32, (size_t)rows, 4);
    s->acc = output(c, "_acc", DT_F32, (size_t)rows * d, 4);
    s->scratch = output(c, "_scratch", DT_F32, RV_ATTN_SCRATCH_FLOATS(rows, d), 64);
    return s->m && s->l && s->acc && s->scratch ? 0 : -1;
}

/* Attention of `rows` query rows over T keys, fed to attend_chunk_* in chunks of `chunk`
 * tokens, as a driver does. Optional "visible": per row, how many of the T keys it sees (a
 * prefix; causal masks); each chunk gets them clipped to the chunk. */
#define ATTEND_RUNNER(NAME, T_KV, IN_KV)                                                        \
    static int run_##NAME(const rv_ops *ops, rv_case *c)                                        \
    {                                                                                           \
        size_t nq = 0, nk = 0, nv = 0, nvis = 0;                                                            \
        int rows = (int)param(c, "rows"), d = (int)param(c, "head_dim"), T = (int)param(c, "T"); \
        int chunk = (int)param(c, "chunk");                                                     \
        ptrdiff_t qs = (ptrdiff_t)param(c, "q_stride"), ks = (ptrdiff_t)param(c, "k_stride");   \
        ptrdiff_t vs = (ptrdiff_t)param(c, "v_stride");                                         \
        const float *q = in_f32(c, "q", &nq);                                                   \
        const T_KV *k = IN_KV(c, "k", &nk), *v = IN_KV(c, "v", &nv);                            \
        const int32_t *vis_total = in_i32_opt(c, "visible", &nvis);                             \
        state_bufs s;                                                                           \
        if (c->error[0] || !q || !k || !v || rows < 1 || d < 1 || T < 1 || chunk < 1 ||         \
            chunk > RV_ATTN_CHUNK || nq < (size_t)((rows - 1) * qs + d) ||                      \
            nk < (size_t)((T - 1) * ks + d) || nv < (size_t)((T - 1) * vs + d) ||               \
            (vis_total && nvis != (size_t)rows) || alloc_state(c, rows, d, &s))                 \
            return fail(c, "%s: malformed case", #NAME);                                        \
        int *vis = vis_total ? output(c, "_visible", DT_I32, (size_t)rows, 4) : NULL;           \
        if (vis_total && !vis)                                                                  \
            return -1;                                                                          \
        for (int r = 0; r < rows; r++)                                                          \
            s.m[r] = -INFINITY;                                                                 \
        rv_attn_state st = {rows, d, q, qs, s.m, s.l, s.acc, s.scratch};                        \
        for (int c0 = 0; c0 < T; c0 += chunk) {                                                 \
            int n = T - c0 < chunk ? T - c0 : chunk;                                            \
            for (int r = 0; vis && r < rows; r++) {                                             \
                int left = vis_total[r] - c0;                                                   \
                vis[r] = left < 0 ? 0 : left > n ? n : left;                                    \
            }                                                                                   \
            ops->NAME(&st, k + c0 * ks, ks, v + c0 * vs, vs, n, vis);                           \
        }                                                                                       \
        return report_state(c, rows, d, s.m, s.l, s.acc);                                       \
    }
ATTEND_RUNNER(attend_chunk_f32, float, in_f32)
ATTEND_RUNNER(attend_chunk_f16, uint16_t, in_u16)

/* The K/V span list of a case: "span_starts" / "span_lens" (i32) give, per span, its first
 * token row in the k / v arrays and its length; the logical key order is the list order, so
 * blocks can sit anywhere in memory, as in a paged cache. NULL (and an error) if malformed. */
static rv_kv_span *case_spans(rv_case *c, const void *k, size_t nk, const void *v, size_t nv,
                              ptrdiff_t ks, ptrdiff_t vs, int d, size_t elem, int *nspans)
{
    size_t ns = 0, nl = 0;
    const int32_t *starts = in_i32_opt(c, "span_starts", &ns), *lens = in_i32_opt(c, "span_lens", &nl);
    if (!starts || !lens || ns != nl || ns == 0) {
        fail(c, "%s: needs span_starts and span_lens of one length", "spans");
        return NULL;
    }
    rv_kv_span *spans = output(c, "_spans", DT_F64, ns * sizeof(rv_kv_span) / 8 + 1, 8);
    if (!spans)
        return NULL;
    for (size_t i = 0; i < ns; i++) {
        if (lens[i] > 0 && (starts[i] < 0 || nk < (size_t)((starts[i] + lens[i] - 1) * ks + d) ||
                            nv < (size_t)((starts[i] + lens[i] - 1) * vs + d))) {
            fail(c, "%s: a span reaches past k or v", "spans");
            return NULL;
        }
        ptrdiff_t first = starts[i] < 0 ? 0 : starts[i];
        spans[i] = (rv_kv_span){(const char *)k + first * ks * (ptrdiff_t)elem,
                                (const char *)v + first * vs * (ptrdiff_t)elem, ks, vs, lens[i]};
    }
    *nspans = (int)ns;
    return spans;
}

/* attend_spans_*: the same state and outputs as attend_chunk_*, keys from a span list;
 * optional "visible" counts keys over the whole list */
#define SPANS_RUNNER(NAME, T_KV, IN_KV)                                                         \
    static int run_##NAME(const rv_ops *ops, rv_case *c)                                        \
    {                                                                                           \
        size_t nq = 0, nk = 0, nv = 0, nvis = 0;                                                \
        int rows = (int)param(c, "rows"), d = (int)param(c, "head_dim"), nspans = 0;            \
        ptrdiff_t qs = (ptrdiff_t)param(c, "q_stride"), ks = (ptrdiff_t)param(c, "k_stride");   \
        ptrdiff_t vs = (ptrdiff_t)param(c, "v_stride");                                         \
        const float *q = in_f32(c, "q", &nq);                                                   \
        const T_KV *k = IN_KV(c, "k", &nk), *v = IN_KV(c, "v", &nv);                            \
        const int32_t *visible = in_i32_opt(c, "visible", &nvis);                               \
        state_bufs s;                                                                           \
        if (c->error[0] || !q || !k || !v || rows < 1 || d < 1 || ks < d || vs < d ||           \
            nq < (size_t)((rows - 1) * qs + d) || (visible && nvis != (size_t)rows) ||          \
            alloc_state(c, rows, d, &s))                                                        \
            return fail(c, "%s: malformed case", #NAME);                                        \
        rv_kv_span *spans = case_spans(c, k, nk, v, nv, ks, vs, d, sizeof(T_KV), &nspans);      \
        if (!spans)                                                                             \
            return -1;                                                                          \
        for (int r = 0; r < rows; r++)                                                          \
            s.m[r] = -INFINITY;                                                                 \
        rv_attn_state st = {rows, d, q, qs, s.m, s.l, s.acc, s.scratch};                        \
        ops->NAME(&st, spans, nspans, visible);                                                 \
        return report_state(c, rows, d, s.m, s.l, s.acc);                                      \
    }
SPANS_RUNNER(attend_spans_f32, float, in_f32)
SPANS_RUNNER(attend_spans_f16, uint16_t, in_u16)

/* attend_rows_*: complete attention of rows query rows (not pre-scaled; "scale") over a span
 * list. "out" (rows x out_stride) is the output buffer's starting content: its gaps must
 * survive; with in_place = 1 the query rows are read from it (q is then unused). With
 * want_ml = 1 the kernel also returns (m, l), reported as "lse" (-inf where l == 0). */
#define ROWS_RUNNER(NAME, T_KV, IN_KV)                                                          \
    static int run_##NAME(const rv_ops *ops, rv_case *c)                                        \
    {                                                                                           \
        size_t nq = 0, nk = 0, nv = 0, nvis = 0, no = 0;                                        \
        int rows = (int)param(c, "rows"), d = (int)param(c, "head_dim"), nspans = 0;            \
        int in_place = param(c, "in_place") != 0, want_ml = param(c, "want_ml") != 0;           \
        ptrdiff_t qs = (ptrdiff_t)param(c, "q_stride"), ks = (ptrdiff_t)param(c, "k_stride");   \
        ptrdiff_t vs = (ptrdiff_t)param(c, "v_stride"), os = (ptrdiff_t)param(c, "out_stride"); \
        float scale = (float)param(c, "scale");                                                 \
        const float *q = in_f32(c, "q", &nq);                                                   \
        const T_KV *k = IN_KV(c, "k", &nk), *v = IN_KV(c, "v", &nv);                            \
        const int32_t *visible = in_i32_opt(c, "visible", &nvis);                               \
        float *out = out_copy_f32(c, "out", &no);                                               \
        float *scratch = output(c, "_scratch", DT_F32, RV_ATTN_TILE_SCRATCH_FLOATS(d), 64);     \
        float *m = want_ml ? out_f32(c, "_m", (size_t)rows) : NULL;                             \
        float *l = want_ml ? out_f32(c, "_l", (size_t)rows) : NULL;                             \
        if (c->error[0] || !q || !k || !v || !out || !scratch || rows < 1 ||                    \
            rows > RV_ATTN_TILE_ROWS || d < 1 || ks < d || vs < d || qs < d || os < d ||        \
            nq < (size_t)((rows - 1) * qs + d) || no < (size_t)((rows - 1) * os + d) ||         \
            (visible && nvis != (size_t)rows))                                                  \
            return fail(c, "%s: malformed case", #NAME);                                        \
        rv_kv_span *spans = case_spans(c, k, nk, v, nv, ks, vs, d, sizeof(T_KV), &nspans);      \
        if (!spans)                                                                             \
            return -1;                                                                          \
        const float *qp[RV_ATTN_TILE_ROWS];                                                     \
        float *op[RV_ATTN_TILE_ROWS];                                                           \
        for (int r = 0; r < rows; r++) {                                                        \
            op[r] = out + r * os;                                                               \
            qp[r] = in_place ? op[r] : q + r * qs;                                              \
        }                                                                                       \
        rv_attn_rows job = {rows, d, scale, qp, op, visible, spans, nspans, m, l};              \
        ops->NAME(&job, scratch);                                                               \
        if (want_ml) {                                                                          \
            float *lse = out_f32(c, "lse", (size_t)rows);                                       \
            if (!lse)                                                                           \
                return -1;                                                                      \
            for (int r = 0; r < rows; r++)                                                      \
                lse[r] = l[r] > 0 ? m[r] + logf(l[r]) : -INFINITY;                              \
        }                                                                                       \
        return 0;                                                                               \
    }
ROWS_RUNNER(attend_rows_f32, float, in_f32)
ROWS_RUNNER(attend_rows_f16, uint16_t, in_u16)

/* attend_heads_*: num_heads states over token-major K/V (head h's row of a key k_head after
 * head 0's), the keys a span list over the stored token rows ("span_starts" / "span_lens",
 * k_tok / v_tok apart: blocks in any order). Head h's query rows start at q + h*rows*q_stride;
 * states sit one after another in (m, l, acc) and share one scratch, so out / lse list head
 * 0's rows first. */
#define HEADS_RUNNER(NAME, T_KV, IN_KV)                                                         \
    static int run_##NAME(const rv_ops *ops, rv_case *c)                                        \
    {                                                                                           \
        size_t nq = 0, nk = 0, nv = 0, nvis = 0;                                                \
        int rows = (int)param(c, "rows"), d = (int)param(c, "head_dim");                        \
        int heads = (int)param(c, "num_heads"), n = (int)param(c, "n");                         \
        ptrdiff_t qs = (ptrdiff_t)param(c, "q_stride");                                         \
        ptrdiff_t kt = (ptrdiff_t)param(c, "k_tok"), kh = (ptrdiff_t)param(c, "k_head");        \
        ptrdiff_t vt = (ptrdiff_t)param(c, "v_tok"), vh = (ptrdiff_t)param(c, "v_head");        \
        const float *q = in_f32(c, "q", &nq);                                                   \
        const T_KV *k = IN_KV(c, "k", &nk), *v = IN_KV(c, "v", &nv);                            \
        const int32_t *visible = in_i32_opt(c, "visible", &nvis);                               \
        state_bufs s;                                                                           \
        rv_attn_state *st = output(c, "_states", DT_F64,                                        \
                                   (size_t)heads * sizeof(rv_attn_state) / 8 + 1, 8);           \
        if (c->error[0] || !q || !k || !v || !st || rows < 1 || d < 1 || heads < 1 || n < 1 ||  \
            nq < (size_t)((heads * rows - 1) * qs + d) ||                                       \
            nk < (size_t)((n - 1) * kt + (heads - 1) * kh + d) ||                               \
            nv < (size_t)((n - 1) * vt + (heads - 1) * vh + d) ||                               \
            (visible && nvis != (size_t)rows) || alloc_state(c, heads * rows, d, &s))           \
            return fail(c, "%s: malformed case", #NAME);                                        \
        for (int r = 0; r < heads * rows; r++)                                                  \
            s.m[r] = -INFINITY;                                                                 \
        for (int h = 0; h < heads; h++)                                                         \
            st[h] = (rv_attn_state){rows, d, q + (ptrdiff_t)h * rows * qs, qs, s.m + h * rows,  \
                                    s.l + h * rows, s.acc + (size_t)h * rows * d, s.scratch};   \
        int nspans = 0, keys = 0;                                                               \
        rv_kv_span *spans = case_spans(c, k, nk, v, nv, kt, vt, d, sizeof(T_KV), &nspans);      \
        if (!spans)                                                                             \
            return -1;                                                                          \
        for (int i = 0; i < nspans; i++) {     /* every head of a span's last row is stored */  \
            const ptrdiff_t last = ((const T_KV *)spans[i].k - k) / kt + spans[i].n - 1;       \
            if (spans[i].n > 0 && (nk < (size_t)(last * kt + (heads - 1) * kh + d) ||          \
                                   nv < (size_t)(last * vt + (heads - 1) * vh + d)))           \
                return fail(c, "%s: a span's heads reach past k or v", #NAME);                  \
            keys += spans[i].n > 0 ? spans[i].n : 0;                                            \
        }                                                                                       \
        if (keys != n)                                                                          \
            return fail(c, "%s: the spans do not hold n keys", #NAME);                          \
        ops->NAME(st, heads, spans, nspans, kh, vh, visible);                                   \
        return report_state(c, heads * rows, d, s.m, s.l, s.acc);                               \
    }
HEADS_RUNNER(attend_heads_f32, float, in_f32)
HEADS_RUNNER(attend_heads_f16, uint16_t, in_u16)

/* dequant_rows_*: n rows of d codes (bits 8 or 4), row_bytes apart, into "out" (n x d) */
static int run_dequant_rows_channel(const rv_ops *ops, rv_case *c)
{
    size_t nc = 0, ns = 0, nz = 0;
    int n = (int)param(c, "n"), d = (int)param(c, "head_dim"), bits = (int)param(c, "bits");
    ptrdiff_t rb = (ptrdiff_t)param(c, "row_bytes");
    const uint8_t *codes = in_u8(c, "codes", &nc);
    const float *scale = in_f32(c, "scale", &ns), *zero = in_f32(c, "zero", &nz);
    float *out = out_f32(c, "out", (size_t)(n > 0 ? n : 0) * (d > 0 ? d : 0));
    if (c->error[0] || !codes || !scale || !zero || !out || n < 1 || d < 1 || (bits != 8 && bits != 4) ||
        ns != (size_t)d || nz != (size_t)d || nc < (size_t)((n - 1) * rb + (bits == 8 ? d : (d + 1) / 2)))
        return fail(c, "%s: malformed case", "dequant_rows_channel");
    ops->dequant_rows_channel(codes, rb, n, d, bits, scale, zero, out);
    return 0;
}

static int run_dequant_rows_group(const rv_ops *ops, rv_case *c)
{
    size_t nc = 0, ns = 0, nz = 0;
    int n = (int)param(c, "n"), d = (int)param(c, "head_dim"), bits = (int)param(c, "bits");
    int group = (int)param(c, "group");
    ptrdiff_t rb = (ptrdiff_t)param(c, "row_bytes"), ps = (ptrdiff_t)param(c, "param_stride");
    const uint8_t *codes = in_u8(c, "codes", &nc);
    const uint16_t *scale = in_u16(c, "scale", &ns), *zero = in_u16(c, "zero", &nz);
    float *out = out_f32(c, "out", (size_t)(n > 0 ? n : 0) * (d > 0 ? d : 0));
    int groups = group > 0 ? (d + group - 1) / group : 0;
    if (c->error[0] || !codes || !scale || !zero || !out || n < 1 || d < 1 || group < 1 ||
        (bits != 8 && bits != 4) || ps < groups || ns < (size_t)((n - 1) * ps + groups) ||
        nz < (size_t)((n - 1) * ps + groups) || nc < (size_t)((n - 1) * rb + (bits == 8 ? d : (d + 1) / 2)))
        return fail(c, "%s: malformed case", "dequant_rows_group");
    ops->dequant_rows_group(codes, rb, n, d, bits, group, scale, zero, ps, out);
    return 0;
}

static int run_attn_merge(const rv_ops *ops, rv_case *c)
{
    int rows = (int)param(c, "rows"), d = (int)param(c, "head_dim");
    size_t n[6] = {0};
    const float *m0 = in_f32(c, "m", &n[0]), *l0 = in_f32(c, "l", &n[1]), *a0 = in_f32(c, "acc", &n[2]);
    const float *m1 = in_f32(c, "m_other", &n[3]), *l1 = in_f32(c, "l_other", &n[4]);
    const float *a1 = in_f32(c, "acc_other", &n[5]);
    state_bufs s;
    if (c->error[0] || rows < 1 || d < 1 || n[0] != (size_t)rows || n[1] != (size_t)rows ||
        n[3] != (size_t)rows || n[4] != (size_t)rows || n[2] != (size_t)rows * d ||
        n[5] != (size_t)rows * d || alloc_state(c, rows, d, &s))
        return fail(c, "%s: malformed case", "attn_merge");
    memcpy(s.m, m0, rows * sizeof(float));
    memcpy(s.l, l0, rows * sizeof(float));
    memcpy(s.acc, a0, (size_t)rows * d * sizeof(float));
    ops->attn_merge(rows, d, s.m, s.l, s.acc, m1, l1, a1);
    return report_state(c, rows, d, s.m, s.l, s.acc);
}

/* "out" starts as the input "out" (its gaps between rows must survive) */
static int run_attn_finalize(const rv_ops *ops, rv_case *c)
{
    int rows = (int)param(c, "rows"), d = (int)param(c, "head_dim");
    ptrdiff_t os = (ptrdiff_t)param(c, "out_stride");
    size_t nl = 0, na = 0, no = 0;
    const float *l = in_f32(c, "l", &nl), *acc = in_f32(c, "acc", &na);
    float *out = out_copy_f32(c, "out", &no);
    if (c->error[0] || rows < 1 || d < 1 || os < d || nl != (size_t)rows ||
        na != (size_t)rows * d || no < (size_t)((rows - 1) * os + d))
        return fail(c, "%s: malformed case", "attn_finalize");
    ops->attn_finalize(rows, d, l, acc, out, os);
    return 0;
}

/* attend_qgroup: one KV head of a quantized group, arrays named after struct rv_qhead's
 * fields (kscale, kzero, vscale, vzero as binary16; outlier arrays omitted when there are none), tokens [a, a + n) folded into a fresh
 * state of `rows` query rows; optional "visible" counts tokens from a. */
static int run_attend_qgroup(const rv_ops *ops, rv_case *c)
{
    size_t nq = 0, nkc = 0, nks = 0, nkz = 0, nki = 0, nvc = 0, nvs = 0, nvz = 0;
    size_t nvi = 0, nos = 0, noz = 0, nvo = 0, nvis = 0;
    int rows = (int)param(c, "rows"), d = (int)param(c, "head_dim"), G = (int)param(c, "G");
    int bits = (int)param(c, "bits"), gs = (int)param(c, "group_size");
    int a = (int)param(c, "a"), n = (int)param(c, "n");
    ptrdiff_t krow = (ptrdiff_t)param(c, "krow"), vrow = (ptrdiff_t)param(c, "vrow");
    const float *q = in_f32(c, "q", &nq);
    const uint8_t *kcodes = in_u8(c, "kcodes", &nkc), *vcodes = in_u8(c, "vcodes", &nvc);
    const uint16_t *kscale = in_u16(c, "kscale", &nks), *kzero = in_u16(c, "kzero", &nkz);
    const uint16_t *vscale = in_u16(c, "vscale", &nvs), *vzero = in_u16(c, "vzero", &nvz);
    const uint8_t *kidx = input(c, "kidx", DT_U8, &nki, 0), *vidx = input(c, "vidx", DT_U8, &nvi, 0);
    const uint8_t *vocodes = input(c, "vocodes", DT_U8, &nvo, 0);
    const float *voscale = input(c, "voscale", DT_F32, &nos, 0), *vozero = input(c, "vozero", DT_F32, &noz, 0);
    const int32_t *visible = in_i32_opt(c, "visible", &nvis);
    int ng = gs > 0 ? (d + gs - 1) / gs : 0;
    state_bufs s;
    if (c->error[0] || !q || !kcodes || !vcodes || !kscale || !kzero || !vscale || !vzero || rows < 1 ||
        d < 1 || G < 1 || gs < 1 || (bits != 8 && bits != 4) || a < 0 || n < 1 || a + n > G ||
        nq != (size_t)rows * d || nkc < (size_t)((d + (int)nki - 1) * krow + (bits == 8 ? G : (G + 1) / 2)) ||
        nvc < (size_t)((G - 1) * vrow + (bits == 8 ? d : (d + 1) / 2)) || nks != (size_t)d ||
        nkz != (size_t)d || nvs != (size_t)G * ng || nvz != (size_t)G * ng ||
        nki > RV_MAX_OUTLIERS || nvi > RV_MAX_OUTLIERS || ((nki || nvi) && bits != 4) ||
        nos != nvi || noz != nvi ||
        nvo != nvi * (size_t)G || (visible && nvis != (size_t)rows) ||
        alloc_state(c, rows, d, &s))
        return fail(c, "%s: malformed case", "attend_qgroup");
    float *scratch = output(c, "_qscratch", DT_F32, RV_QATTN_SCRATCH_FLOATS(G, d), 64);
    if (!scratch)
        return -1;
    struct rv_qhead h = {G, d, bits, gs, kcodes, krow, kscale, kzero, (int)nki, kidx,
                         vcodes, vrow, vscale, vzero, (int)nvi, vidx, voscale, vozero, vocodes, NULL, 0};
    for (int r = 0; r < rows; r++)
        s.m[r] = -INFINITY;
    rv_attn_state st = {rows, d, q, d, s.m, s.l, s.acc, s.scratch};
    ops->attend_qgroup(&st, &h, a, n, visible, scratch);
    return report_state(c, rows, d, s.m, s.l, s.acc);
}

/* attend_tgroup: one KV head of a TurboQuant group (arrays named after struct rv_thead's
 * fields; "q8" as bytes), tokens [a, a + n) folded into a fresh state of `rows` rows and
 * head_dim D (the rotated domain); optional "visible". */
static int run_attend_tgroup(const rv_ops *ops, rv_case *c)
{
    size_t nkc = 0, nvc = 0, nkt = 0, nvt = 0, nkn = 0, nvn = 0, nkf = 0, nmu = 0, nqp = 0, nq8 = 0, nqs = 0;
    size_t nqsum = 0, nvis = 0;
    int rows = (int)param(c, "rows"), D = (int)param(c, "D"), d = (int)param(c, "d");
    int G = (int)param(c, "G"), Gp = (int)param(c, "Gp");
    int kn3 = (int)param(c, "k_n3"), kn4 = (int)param(c, "k_n4"), vn3 = (int)param(c, "v_n3"), vn4 = (int)param(c, "v_n4");
    int a = (int)param(c, "a"), n = (int)param(c, "n");
    const uint8_t *kcodes = in_u8(c, "kcodes", &nkc), *vcodes = in_u8(c, "vcodes", &nvc);
    const uint8_t *ktab = in_u8(c, "ktab", &nkt), *vtab = in_u8(c, "vtab", &nvt);
    const uint8_t *knorm = in_u8(c, "knorm", &nkn), *vnorm = in_u8(c, "vnorm", &nvn), *kflag = in_u8(c, "kflag", &nkf);
    const float *kmu = in_f32(c, "kmu", &nmu), *qplain = in_f32(c, "qplain", &nqp), *qscale = in_f32(c, "qscale", &nqs);
    const uint8_t *q8 = in_u8(c, "q8", &nq8);
    const int32_t *qsum = input(c, "qsum", DT_I32, &nqsum, 1);
    const int32_t *visible = in_i32_opt(c, "visible", &nvis);
    const int kb = D / 4 + kn3 / 8 + kn4 / 8, vb = D / 4 + vn3 / 8 + vn4 / 8;
    state_bufs s;
    if (c->error[0] || rows < 1 || D < 16 || (D & (D - 1)) || d < 1 || d > D || G < 1 || Gp < G || Gp % 16 ||
        a < 0 || n < 1 || a + n > G || kn3 % 16 || kn4 % 16 || vn3 % 16 || vn4 % 16 || kn4 > kn3 || kn3 > D ||
        vn4 > vn3 || vn3 > D || nkc != (size_t)Gp * kb || nvc != (size_t)Gp * vb || nkt != (size_t)D ||
        nvt != (size_t)D || nkn != (size_t)Gp || nvn != (size_t)Gp || nkf != (size_t)Gp / 8 || nmu != (size_t)d ||
        nqp != (size_t)rows * d || nq8 != (size_t)rows * D || nqs != (size_t)rows || nqsum != (size_t)rows ||
        (visible && nvis != (size_t)rows) || alloc_state(c, rows, D, &s))
        return fail(c, "%s: malformed case", "attend_tgroup");
    float *scratch = output(c, "_tscratch", DT_F32, RV_TATTN_SCRATCH_FLOATS(Gp, D), 64);
    if (!scratch)
        return -1;
    struct rv_thead h = {.G = G, .Gp = Gp, .D = D, .d = d, .k_n3 = kn3, .k_n4 = kn4, .v_n3 = vn3, .v_n4 = vn4,
                         .kbytes = kb, .vbytes = vb, .kcodes = kcodes, .vcodes = vcodes, .ktab = ktab, .vtab = vtab,
                         .knorm = knorm, .vnorm = vnorm, .kn_lo = (float)param(c, "kn_lo"),
                         .kn_step = (float)param(c, "kn_step"), .vn_lo = (float)param(c, "vn_lo"),
                         .vn_step = (float)param(c, "vn_step"), .kflag = kflag, .kmu = kmu, .qplain = qplain,
                         .qplain_stride = d, .q8 = (const int8_t *)q8, .qscale = qscale, .qsum = qsum};
    for (int r = 0; r < rows; r++)
        s.m[r] = -INFINITY;
    rv_attn_state st = {rows, D, NULL, D, s.m, s.l, s.acc, s.scratch};
    ops->attend_tgroup(&st, &h, a, n, visible, scratch);
    return report_state(c, rows, D, s.m, s.l, s.acc);
}

/* ---- GGUF block matmul family (qmatmul_impl.h) ---- */

/* an rv_qact of n columns of k values over malloc'ed memory, x bound; NULL on failure */
static void *make_qact(rv_qact *a, const float *x, int n, int k)
{
    void *mem = aligned_alloc(64, (RV_QACT_BYTES(n, k) + 63) / 64 * 64);
    if (!mem)
        return NULL;
    rv_qact_bind(a, mem, n, k);
    a->x = x;
    a->x_stride = k;
    return mem;
}

/* x [n][k] -> q and q4 (as floats), d, s32, s16 */
static int run_quantize_act(const rv_ops *ops, rv_case *c)
{
    size_t nx = 0;
    const float *x = in_f32(c, "x", &nx);
    int n = (int)param(c, "n"), k = (int)param(c, "k");
    if (c->error[0] || !x || n < 1 || k < 32 || k % 32 || nx != (size_t)n * k)
        return fail(c, "%s: malformed case", "quantize_act");
    rv_qact a;
    void *mem = make_qact(&a, x, n, k);
    float *q = out_f32(c, "q", (size_t)n * k), *d = out_f32(c, "d", (size_t)n * (k / 32));
    float *s32 = out_f32(c, "s32", (size_t)n * (k / 32)), *s16 = out_f32(c, "s16", (size_t)n * (k / 16));
    float *q4 = out_f32(c, "q4", (size_t)n * k);
    if (!mem || !q || !d || !s32 || !s16 || !q4) {
        free(mem);
        return fail(c, "%s: out of memory", "quantize_act");
    }
    /* two calls over column ranges: c0/c1 must be honoured */
    ops->quantize_act(&a, 0, n / 2);
    ops->quantize_act(&a, n / 2, n);
    for (size_t i = 0; i < (size_t)n * k; i++) {
        q[i] = a.q[i];
        q4[i] = a.q4[i];
    }
    memcpy(d, a.d, sizeof(float) * (size_t)n * (k / 32));
    memcpy(s32, a.s32, sizeof(float) * (size_t)n * (k / 32));
    memcpy(s16, a.s16, sizeof(float) * (size_t)n * (k / 16));
    free(mem);
    return 0;
}

static int wmat_from_case(rv_case *c, rv_wmat *w, const char *what)
{
    size_t nw = 0;
    w->data = in_u8(c, "w", &nw);
    w->type = (int)param(c, "type");
    w->rows = (int)param(c, "rows");
    w->cols = (int)param(c, "cols");
    const int bv = rv_wtype_block_values(w->type);
    if (c->error[0] || !w->data || bv < 1 || w->rows < 1 || w->cols < 1 || w->cols % bv)
        return fail(c, "%s: malformed matrix", what);
    w->row_bytes = (size_t)(w->cols / bv) * rv_wtype_block_bytes(w->type);
    if (nw != w->row_bytes * (size_t)w->rows)
        return fail(c, "%s: matrix bytes do not match its shape", what);
    return 0;
}

/* y [n][r1 - r0] (+)= W[r0:r1] x_c; x [n][cols] quantized by the table's own quantize_act */
static int run_wmatmul(const rv_ops *ops, rv_case *c)
{
    rv_wmat w;
    if (wmat_from_case(c, &w, "wmatmul"))
        return -1;
    size_t nx = 0, ny = 0;
    const float *x = in_f32(c, "x", &nx);
    int n = (int)param(c, "n"), r0 = (int)param(c, "r0"), r1 = (int)param(c, "r1");
    int accumulate = (int)param(c, "accumulate");
    float *y = out_copy_f32(c, "y", &ny);
    if (c->error[0] || !x || !y || n < 1 || nx != (size_t)n * w.cols || r0 < 0 || r1 > w.rows ||
        r0 >= r1 || ny != (size_t)n * (r1 - r0) || w.cols % 32)
        return fail(c, "%s: malformed case", "wmatmul");
    rv_qact a;
    void *mem = make_qact(&a, x, n, w.cols);
    void *scratch = aligned_alloc(64, (RV_WMATMUL_SCRATCH_BYTES(w.cols) + 63) / 64 * 64);
    if (!mem || !scratch) {
        free(mem);
        free(scratch);
        return fail(c, "%s: out of memory", "wmatmul");
    }
    if (!rv_wtype_is_float(w.type))
        ops->quantize_act(&a, 0, n);
    ops->wmatmul(&w, r0, r1, &a, y, r1 - r0, accumulate, scratch);
    free(mem);
    free(scratch);
    return 0;
}

static int run_wrow_f32(const rv_ops *ops, rv_case *c)
{
    rv_wmat w;
    if (wmat_from_case(c, &w, "wrow_f32"))
        return -1;
    int row = (int)param(c, "row");
    float *out = out_f32(c, "out", (size_t)w.cols);
    if (c->error[0] || !out || row < 0 || row >= w.rows)
        return fail(c, "%s: malformed case", "wrow_f32");
    ops->wrow_f32(&w, row, out);
    return 0;
}

/* has_gain 0: gain NULL; in_place 1: out aliases x */
static int run_rmsnorm_f32(const rv_ops *ops, rv_case *c)
{
    size_t n = 0, ng = 0;
    const float *x = in_f32(c, "x", &n);
    const float *gain = has(c, "gain") ? in_f32(c, "gain", &ng) : NULL;
    double eps = param(c, "eps");
    if (c->error[0] || !x || n < 1 || (gain && ng != n))
        return fail(c, "%s: malformed case", "rmsnorm_f32");
    if (param(c, "in_place") != 0) {
        float *xo = out_copy_f32(c, "x", &n);
        if (!xo)
            return -1;
        ops->rmsnorm_f32(xo, gain, (float)eps, xo, (int)n);
        return 0;
    }
    float *out = out_f32(c, "x", n);
    if (!out)
        return -1;
    ops->rmsnorm_f32(x, gain, (float)eps, out, (int)n);
    return 0;
}

static int run_rope_pairs_f32(const rv_ops *ops, rv_case *c)
{
    size_t n = 0, nc = 0, ns = 0;
    float *x = out_copy_f32(c, "x", &n);
    const float *cs = in_f32(c, "cos", &nc), *sn = in_f32(c, "sin", &ns);
    int vectors = (int)param(c, "vectors"), dim = (int)param(c, "dim");
    if (c->error[0] || !x || !cs || !sn || vectors < 1 || dim < 2 || dim % 2 || n != (size_t)vectors * dim ||
        nc != (size_t)dim / 2 || ns != nc)
        return fail(c, "%s: malformed case", "rope_pairs_f32");
    ops->rope_pairs_f32(x, vectors, dim, cs, sn);
    return 0;
}

static int run_swiglu_f32(const rv_ops *ops, rv_case *c)
{
    size_t n = 0, nu = 0;
    const float *g = in_f32(c, "gate", &n), *u = in_f32(c, "up", &nu);
    float *out = out_f32(c, "out", n);
    if (c->error[0] || !g || !u || !out || n != nu)
        return fail(c, "%s: malformed case", "swiglu_f32");
    ops->swiglu_f32(g, u, out, (int)n);
    return 0;
}

typedef struct {
    const char *name;
    size_t offset;   /* of the kernel's slot in rv_ops */
    int (*run)(const rv_ops *ops, rv_case *c);
} runner;

#define RUNNER(NAME) {#NAME, offsetof(rv_ops, NAME), run_##NAME}
static const runner runners[] = {
    RUNNER(dot_f32), RUNNER(axpy_f32), RUNNER(scale_f32), RUNNER(max_f32), RUNNER(sum_exp_f32),
    RUNNER(f32_to_f16), RUNNER(f16_to_f32),
    RUNNER(attend_chunk_f32), RUNNER(attend_chunk_f16), RUNNER(attn_merge), RUNNER(attn_finalize),
    RUNNER(attend_spans_f32), RUNNER(attend_spans_f16), RUNNER(attend_rows_f32), RUNNER(attend_rows_f16),
    RUNNER(dequant_rows_channel), RUNNER(dequant_rows_group), RUNNER(attend_heads_f32), RUNNER(attend_heads_f16),
    RUNNER(attend_qgroup), RUNNER(attend_tgroup),
    RUNNER(quantize_act), RUNNER(wmatmul), RUNNER(wrow_f32), RUNNER(rmsnorm_f32), RUNNER(rope_pairs_f32),
    RUNNER(swiglu_f32),
};
#define N_RUNNERS (sizeof runners / sizeof runners[0])

/* ---- comparing ---- */

static double element(const rv_array *a, size_t i)
{
    switch (a->dtype) {
    case DT_F32: return ((const float *)a->data)[i];
    case DT_U16: return ((const uint16_t *)a->data)[i];
    case DT_I32: return ((const int32_t *)a->data)[i];
    case DT_U8: return ((const uint8_t *)a->data)[i];
    default: return ((const double *)a->data)[i];
    }
}

static int same_value(double got, double want, double tol)
{
    if (isnan(want))
        return isnan(got);
    if (isinf(want))
        return got == want;
    return fabs(got - want) <= tol;   /* false for a NaN or inf got */
}

/* every "exact:" / "expect:" array of the case against the runner's output of that name */
static int compare(rv_case *c)
{
    for (int i = 0; i < c->n_in; i++) {
        const rv_array *want = &c->in[i];
        int exact = strncmp(want->key, "exact:", 6) == 0;
        if (!exact && strncmp(want->key, "expect:", 7) != 0)
            continue;
        const char *name = strchr(want->key, ':') + 1;
        const rv_array *got = find(c->out, c->n_out, name);
        if (!got || got->count != want->count)
            return fail(c, "output %s missing or of the wrong length", name);
        if (exact) {
            if (dt_size[got->dtype] != dt_size[want->dtype])
                return fail(c, "exact:%s: dtype differs from the output's", name);
            size_t es = dt_size[got->dtype];
            for (size_t j = 0; j < got->count; j++) {
                if (memcmp((const char *)got->data + j * es, (const char *)want->data + j * es, es)) {
                    uint32_t g = 0, w = 0;
                    memcpy(&g, (const char *)got->data + j * es, es);
                    memcpy(&w, (const char *)want->data + j * es, es);
                    snprintf(c->error, sizeof c->error, "%s[%zu]: bits 0x%x, want 0x%x", name, j, g, w);
                    return -1;
                }
            }
            continue;
        }
        char tol_key[128];
        snprintf(tol_key, sizeof tol_key, "tol:%s", name);
        const rv_array *tol = find(c->in, c->n_in, tol_key);
        if (!tol || tol->dtype != DT_F64 || tol->count != want->count)
            return fail(c, "no tol: array for %s", name);
        for (size_t j = 0; j < got->count; j++) {
            double g = element(got, j), w = element(want, j), t = element(tol, j);
            if (!same_value(g, w, t)) {
                snprintf(c->error, sizeof c->error, "%s[%zu] = %.9g, want %.9g +- %.3g", name, j, g, w, t);
                return -1;
            }
        }
    }
    return 0;
}

/* ---- main ---- */

/* the table's kernel slots: every field from the first kernel on is a function pointer */
#define FIRST_SLOT offsetof(rv_ops, dot_f32)
#define SLOT_SIZE sizeof(void (*)(void))
#define N_SLOTS ((sizeof(rv_ops) - FIRST_SLOT) / SLOT_SIZE)

/* prints NULL and UNTESTED slots; returns the number of NULL ones */
static int check_table(const rv_ops *ops)
{
    int null_slots = 0;
    for (size_t s = 0; s < N_SLOTS; s++) {
        void (*fn)(void);
        memcpy(&fn, (const char *)ops + FIRST_SLOT + s * SLOT_SIZE, sizeof fn);
        int covered = 0;
        for (size_t r = 0; r < N_RUNNERS; r++)
            covered |= runners[r].offset == FIRST_SLOT + s * SLOT_SIZE;
        if (!fn)
            printf("NULL slot %zu\n", s);
        if (!covered)
            printf("UNTESTED slot %zu\n", s);
        null_slots += !fn;
    }
    return null_slots;
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "--runners") == 0) {
        for (size_t r = 0; r < N_RUNNERS; r++)
            printf("%s\n", runners[r].name);
        return 0;
    }
    if (argc != 3) {
        fprintf(stderr, "usage: %s CASES ISA | --runners\n", argv[0]);
        return 2;
    }
    int isa = rv_isa_from_name(argv[2]);
    const rv_ops *ops = isa < 0 ? NULL : rv_ops_for(isa);
    if (!ops) {
        printf("unsupported %s (best here: %s)\n", argv[2], rv_isa_name(rv_best_isa()));
        return 77;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);   /* keep what ran visible if a kernel crashes */
    printf("table %s lanes %d slots %zu best %s\n", ops->isa, ops->lanes, (size_t)N_SLOTS,
           rv_isa_name(rv_best_isa()));
    int failed = check_table(ops), passed = 0;
    FILE *f = fopen(argv[1], "rb");
    if (!f) {
        perror(argv[1]);
        return 2;
    }
    for (;;) {
        rv_case c;
        memset(&c, 0, sizeof c);
        int got = read_case(f, &c);
        if (got <= 0) {
            free_case(&c);
            if (got < 0) {
                printf("FAIL file %s: malformed case file\n", argv[1]);
                failed++;
            }
            break;
        }
        const runner *run = NULL;
        for (size_t r = 0; r < N_RUNNERS; r++)
            if (strcmp(runners[r].name, c.kernel) == 0)
                run = &runners[r];
        if (!run)
            fail(&c, "no runner for kernel %s", c.kernel);
        else if (run->run(ops, &c) == 0)
            compare(&c);
        if (c.error[0]) {
            printf("FAIL %s %s: %s\n", c.kernel, c.label, c.error);
            failed++;
        } else {
            printf("PASS %s %s\n", c.kernel, c.label);
            passed++;
        }
        free_case(&c);
    }
    fclose(f);
    printf("done %d %d\n", passed, failed);
    return failed ? 1 : 0;
}
