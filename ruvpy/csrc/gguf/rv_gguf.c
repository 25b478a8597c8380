/* GGUF reader (see rv_gguf.h). The format: "GGUF", u32 version, u64 tensor count, u64 kv count;
 * kv pairs (string key, u32 type, value); tensor infos (string name, u32 n_dims, u64 dims[],
 * u32 type, u64 offset); padding to general.alignment (default 32); tensor data. Strings are a
 * u64 length and bytes; arrays a u32 element type, a u64 count and the elements. */
#define _DEFAULT_SOURCE
#include "gguf/rv_gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* ggml's types: name, values and bytes per block (ggml.c's type_traits; gguf-py's
 * GGML_QUANT_SIZES; tests/test_gguf.py checks this table against the latter) */
static const struct {
    const char *name;
    uint32_t values, bytes;
} ggml_types[] = {
    [0] = {"F32", 1, 4},        [1] = {"F16", 1, 2},         [2] = {"Q4_0", 32, 18},
    [3] = {"Q4_1", 32, 20},     [6] = {"Q5_0", 32, 22},      [7] = {"Q5_1", 32, 24},
    [8] = {"Q8_0", 32, 34},     [9] = {"Q8_1", 32, 40},      [10] = {"Q2_K", 256, 84},
    [11] = {"Q3_K", 256, 110},  [12] = {"Q4_K", 256, 144},   [13] = {"Q5_K", 256, 176},
    [14] = {"Q6_K", 256, 210},  [15] = {"Q8_K", 256, 292},   [16] = {"IQ2_XXS", 256, 66},
    [17] = {"IQ2_XS", 256, 74}, [18] = {"IQ3_XXS", 256, 98}, [19] = {"IQ1_S", 256, 50},
    [20] = {"IQ4_NL", 32, 18},  [21] = {"IQ3_S", 256, 110},  [22] = {"IQ2_S", 256, 82},
    [23] = {"IQ4_XS", 256, 136}, [24] = {"I8", 1, 1},        [25] = {"I16", 1, 2},
    [26] = {"I32", 1, 4},       [27] = {"I64", 1, 8},        [28] = {"F64", 1, 8},
    [29] = {"IQ1_M", 256, 56},  [30] = {"BF16", 1, 2},       [34] = {"TQ1_0", 256, 54},
    [35] = {"TQ2_0", 256, 66},  [39] = {"MXFP4", 32, 17},    [40] = {"NVFP4", 64, 36},
    [41] = {"Q1_0", 128, 18},
};
#define N_GGML_TYPES (sizeof ggml_types / sizeof ggml_types[0])

int rv_ggml_type_block(uint32_t type, uint64_t *values, uint64_t *bytes)
{
    if (type >= N_GGML_TYPES || !ggml_types[type].name)
        return 0;
    *values = ggml_types[type].values;
    *bytes = ggml_types[type].bytes;
    return 1;
}

const char *rv_ggml_type_name(uint32_t type)
{
    return type < N_GGML_TYPES ? ggml_types[type].name : NULL;
}

/* bytes of a scalar metadata value; 0 for strings / arrays / unknown */
static uint64_t scalar_bytes(uint32_t t)
{
    static const uint8_t sizes[RV_GGUF_VTYPE_COUNT] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    return t < RV_GGUF_VTYPE_COUNT ? sizes[t] : 0;
}

/* ---- a cursor over the mapping ---- */
typedef struct {
    const uint8_t *base;
    uint64_t size, pos;
    rv_gguf *g;
} cursor;

static int fail(rv_gguf *g, const char *fmt, ...)
{
    if (!g->error[0]) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(g->error, sizeof g->error, fmt, ap);
        va_end(ap);
    }
    return RV_EINVAL;
}

static int take(cursor *c, uint64_t n, const uint8_t **p, const char *what)
{
    if (n > c->size - c->pos)
        return fail(c->g, "truncated file: %s at byte %llu needs %llu bytes, %llu remain", what,
                    (unsigned long long)c->pos, (unsigned long long)n,
                    (unsigned long long)(c->size - c->pos));
    *p = c->base + c->pos;
    c->pos += n;
    return RV_OK;
}

static int read_u32(cursor *c, uint32_t *v, const char *what)
{
    const uint8_t *p = NULL;
    int rc = take(c, 4, &p, what);
    if (rc == RV_OK)
        memcpy(v, p, 4);
    return rc;
}

static int read_u64(cursor *c, uint64_t *v, const char *what)
{
    const uint8_t *p = NULL;
    int rc = take(c, 8, &p, what);
    if (rc == RV_OK)
        memcpy(v, p, 8);
    return rc;
}

static int read_string(cursor *c, const char **s, uint64_t *len, const char *what)
{
    const uint8_t *p = NULL;
    int rc = read_u64(c, len, what);
    if (rc == RV_OK)
        rc = take(c, *len, &p, what);
    if (rc == RV_OK)
        *s = (const char *)p;
    return rc;
}

/* skips one value of type t (not an array), counting its bytes */
static int skip_value(cursor *c, uint32_t t, const char *what)
{
    if (t == RV_GGUF_STRING) {
        const char *s;
        uint64_t len;
        return read_string(c, &s, &len, what);
    }
    const uint64_t n = scalar_bytes(t);
    const uint8_t *p = NULL;
    if (!n)
        return fail(c->g, "%s: unknown metadata value type %u", what, t);
    return take(c, n, &p, what);
}

static int read_kv(cursor *c, rv_gguf_kv *kv, uint64_t i)
{
    char what[96];
    snprintf(what, sizeof what, "metadata entry %llu", (unsigned long long)i);
    int rc = read_string(c, &kv->key, &kv->key_len, what);
    if (rc == RV_OK)
        rc = read_u32(c, &kv->type, what);
    if (rc != RV_OK)
        return rc;
    if (kv->type == RV_GGUF_ARRAY) {
        rc = read_u32(c, &kv->elem_type, what);
        if (rc == RV_OK)
            rc = read_u64(c, &kv->count, what);
        if (rc != RV_OK)
            return rc;
        if (kv->elem_type == RV_GGUF_ARRAY || kv->elem_type >= RV_GGUF_VTYPE_COUNT)
            return fail(c->g, "%s (%.*s): unsupported array element type %u", what,
                        (int)(kv->key_len < 200 ? kv->key_len : 200), kv->key, kv->elem_type);
        kv->value = c->base + c->pos;
        const uint64_t start = c->pos, es = scalar_bytes(kv->elem_type);
        if (es) {   /* a fixed-size array: one bounds check */
            if (kv->count > (c->size - c->pos) / es)
                return fail(c->g, "truncated file: %s holds %llu elements past the end", what,
                            (unsigned long long)kv->count);
            c->pos += kv->count * es;
        } else {
            /* strings: each at least 8 bytes, which bounds the count before the loop */
            if (kv->count > (c->size - c->pos) / 8)
                return fail(c->g, "truncated file: %s holds %llu strings past the end", what,
                            (unsigned long long)kv->count);
            for (uint64_t j = 0; j < kv->count; j++)
                if ((rc = skip_value(c, RV_GGUF_STRING, what)) != RV_OK)
                    return rc;
        }
        kv->value_bytes = c->pos - start;
        return RV_OK;
    }
    kv->elem_type = kv->type;
    kv->count = 1;
    kv->value = c->base + c->pos;
    const uint64_t start = c->pos;
    rc = skip_value(c, kv->type, what);
    kv->value_bytes = c->pos - start;
    return rc;
}

static int read_tensor_info(cursor *c, rv_gguf_tensor *t, uint64_t i)
{
    char what[64];
    snprintf(what, sizeof what, "tensor info %llu", (unsigned long long)i);
    int rc = read_string(c, &t->name, &t->name_len, what);
    if (rc == RV_OK)
        rc = read_u32(c, &t->n_dims, what);
    if (rc != RV_OK)
        return rc;
    if (t->n_dims < 1 || t->n_dims > RV_GGUF_MAX_DIMS)
        return fail(c->g, "tensor %.*s has %u dimensions (1..%d allowed)", (int)(t->name_len < 200 ? t->name_len : 200),
                    t->name, t->n_dims, RV_GGUF_MAX_DIMS);
    for (int d = 0; d < RV_GGUF_MAX_DIMS; d++)
        t->dims[d] = 1;
    for (uint32_t d = 0; d < t->n_dims; d++)
        if ((rc = read_u64(c, &t->dims[d], what)) != RV_OK)
            return rc;
    if ((rc = read_u32(c, &t->type, what)) != RV_OK || (rc = read_u64(c, &t->offset, what)) != RV_OK)
        return rc;
    return RV_OK;
}

/* element count and bytes of a tensor, with overflow checks; 0 bytes for unknown types */
static int tensor_bytes(rv_gguf *g, rv_gguf_tensor *t)
{
    uint64_t values, bytes, n = 1;
    const int nl = (int)(t->name_len < 200 ? t->name_len : 200);
    for (uint32_t d = 0; d < t->n_dims; d++)
        if (t->dims[d] == 0 || __builtin_mul_overflow(n, t->dims[d], &n) || n > ((uint64_t)1 << 50))
            return fail(g, "tensor %.*s has an impossible shape", nl, t->name);
    t->nbytes = 0;
    if (!rv_ggml_type_block(t->type, &values, &bytes))
        return RV_OK;
    if (t->dims[0] % values)
        return fail(g, "tensor %.*s: %llu values per row is not a multiple of the %s block (%llu)", nl, t->name,
                    (unsigned long long)t->dims[0], rv_ggml_type_name(t->type), (unsigned long long)values);
    t->nbytes = n / values * bytes;
    return RV_OK;
}

static const rv_gguf_kv *find_kv(const rv_gguf *g, const char *key)
{
    const size_t len = strlen(key);
    for (uint64_t i = 0; i < g->n_kv; i++)
        if (g->kv[i].key_len == len && memcmp(g->kv[i].key, key, len) == 0)
            return &g->kv[i];
    return NULL;
}

static int parse(rv_gguf *g)
{
    cursor c = {(const uint8_t *)g->map, g->size, 0, g};
    const uint8_t *magic = NULL;
    int rc;
    if (take(&c, 4, &magic, "magic") != RV_OK || memcmp(magic, "GGUF", 4) != 0) {
        g->error[0] = 0;
        return fail(g, "not a GGUF file (no GGUF magic)");
    }
    if ((rc = read_u32(&c, &g->version, "version")) != RV_OK)
        return rc;
    if (g->version != 2 && g->version != 3)
        return fail(g, "GGUF version %u is not supported (2 and 3 are)", g->version);
    if ((rc = read_u64(&c, &g->n_tensors, "tensor count")) != RV_OK ||
        (rc = read_u64(&c, &g->n_kv, "metadata count")) != RV_OK)
        return rc;
    /* each entry takes at least 12 (kv) / 24 (tensor) bytes: bounds the allocations */
    if (g->n_kv > g->size / 12 || g->n_tensors > g->size / 24)
        return fail(g, "corrupt header: %llu metadata entries and %llu tensors cannot fit in %zu bytes",
                    (unsigned long long)g->n_kv, (unsigned long long)g->n_tensors, g->size);
    g->kv = calloc(g->n_kv ? g->n_kv : 1, sizeof *g->kv);
    g->tensors = calloc(g->n_tensors ? g->n_tensors : 1, sizeof *g->tensors);
    if (!g->kv || !g->tensors)
        return RV_ENOMEM;
    for (uint64_t i = 0; i < g->n_kv; i++)
        if ((rc = read_kv(&c, &g->kv[i], i)) != RV_OK)
            return rc;
    for (uint64_t i = 0; i < g->n_tensors; i++)
        if ((rc = read_tensor_info(&c, &g->tensors[i], i)) != RV_OK)
            return rc;
    g->alignment = 32;
    const rv_gguf_kv *al = find_kv(g, "general.alignment");
    if (al) {
        uint32_t a;
        if (al->type != RV_GGUF_U32)
            return fail(g, "general.alignment must be a u32");
        memcpy(&a, al->value, 4);
        if (a == 0 || (a & (a - 1)))
            return fail(g, "general.alignment %u is not a power of two", a);
        g->alignment = a;
    }
    g->data_offset = (c.pos + g->alignment - 1) / g->alignment * g->alignment;
    const uint64_t data_size = g->data_offset <= g->size ? g->size - g->data_offset : 0;
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        rv_gguf_tensor *t = &g->tensors[i];
        const int nl = (int)(t->name_len < 200 ? t->name_len : 200);
        if ((rc = tensor_bytes(g, t)) != RV_OK)
            return rc;
        if (t->offset % g->alignment)
            return fail(g, "tensor %.*s: data offset %llu is not aligned to %llu", nl, t->name,
                        (unsigned long long)t->offset, (unsigned long long)g->alignment);
        if (t->offset > data_size || t->nbytes > data_size - t->offset)
            return fail(g, "truncated file: tensor %.*s needs bytes %llu..%llu of the data section, "
                        "which has %llu", nl, t->name, (unsigned long long)t->offset,
                        (unsigned long long)(t->offset + t->nbytes), (unsigned long long)data_size);
        t->data = t->nbytes ? (const uint8_t *)g->map + g->data_offset + t->offset : NULL;
    }
    return RV_OK;
}

int rv_gguf_open(rv_gguf *g, const char *path, int populate)
{
    memset(g, 0, sizeof *g);
    const int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        g->sys_errno = errno;
        snprintf(g->error, sizeof g->error, "cannot open: %s", strerror(errno));
        return RV_EIO;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        g->sys_errno = errno ? errno : EINVAL;
        snprintf(g->error, sizeof g->error, "not a regular file");
        close(fd);
        return RV_EIO;
    }
    if (st.st_size == 0) {
        close(fd);
        return fail(g, "empty file");
    }
    g->size = (size_t)st.st_size;
    void *map = mmap(NULL, g->size, PROT_READ, MAP_SHARED | (populate ? MAP_POPULATE : 0), fd, 0);
    const int map_errno = errno;
    close(fd);   /* the mapping keeps the file */
    if (map == MAP_FAILED) {
        g->sys_errno = map_errno;
        snprintf(g->error, sizeof g->error, "cannot map: %s", strerror(map_errno));
        g->size = 0;
        return RV_EIO;
    }
    g->map = map;
    const int rc = parse(g);
    if (rc != RV_OK) {
        char error[sizeof g->error];
        memcpy(error, g->error, sizeof error);
        rv_gguf_close(g);
        memcpy(g->error, error, sizeof error);
        if (rc == RV_ENOMEM && !g->error[0])
            snprintf(g->error, sizeof g->error, "out of memory indexing the file");
    }
    return rc;
}

void rv_gguf_close(rv_gguf *g)
{
    if (g->map)
        munmap(g->map, g->size);
    free(g->kv);
    free(g->tensors);
    memset(g, 0, sizeof *g);
}

int64_t rv_gguf_resident_bytes(const rv_gguf *g, const void *p, size_t n)
{
    if (!g->map || (const char *)p < (const char *)g->map ||
        (const char *)p + n > (const char *)g->map + g->size)
        return -1;
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const uintptr_t lo = (uintptr_t)p / page * page, hi = ((uintptr_t)p + n + page - 1) / page * page;
    if (hi == lo)
        return 0;
    const size_t pages = (hi - lo) / page;
    unsigned char *vec = malloc(pages);
    if (!vec)
        return -1;
    int64_t resident = 0;
    if (mincore((void *)lo, hi - lo, vec) == 0) {
        /* bytes of [p, p + n) on each resident page (the first and last may be partial) */
        const uintptr_t begin = (uintptr_t)p, end = (uintptr_t)p + n;
        for (size_t i = 0; i < pages; i++) {
            if (!(vec[i] & 1))
                continue;
            const uintptr_t a = lo + i * page, b = a + page;
            resident += (int64_t)((b < end ? b : end) - (a > begin ? a : begin));
        }
    } else {
        resident = -1;
    }
    free(vec);
    return resident;
}
