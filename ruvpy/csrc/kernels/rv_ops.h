/* The kernel table: every ISA-specific function ruvpy has, one table per ISA.
 * ops_<isa>.c fills its table from the kernel templates (*_impl.h) compiled with that ISA's
 * flags; rv_dispatch.c picks one table at import (cpuid + XCR0, or RUVPY_ISA). Drivers in other
 * extensions receive a `const rv_ops *` and call through it, so they stay ISA-independent.
 *
 * To add a kernel family: declare its function pointers in a section here, write its template
 * header, and call its fill function from each ops_<isa>.c. */
#ifndef RV_OPS_H
#define RV_OPS_H

#include <stddef.h>
#include <stdint.h>

typedef enum {
    RV_ISA_ID_SCALAR = 0,
    RV_ISA_ID_AVX2 = 1,
    RV_ISA_ID_AVX512 = 2,
    RV_ISA_ID_NEON = 3,
    RV_ISA_COUNT = 4
} rv_isa_id;

typedef struct rv_ops {
    const char *isa;   /* "scalar", "avx2", "avx512", "neon" */
    int lanes;         /* float32 lanes of one vector */

    /* ---- basic vector kernels (basic_impl.h) ---- */
    float (*dot_f32)(const float *a, const float *b, size_t n);
    void (*axpy_f32)(size_t n, float alpha, const float *x, float *y);     /* y += alpha x */
    void (*scale_f32)(size_t n, float alpha, float *x);                   /* x *= alpha */
    float (*max_f32)(const float *x, size_t n);                           /* -inf if n == 0 */
    /* out[i] = exp(x[i] - shift) (out may be NULL or alias x); returns the sum */
    float (*sum_exp_f32)(const float *x, float shift, float *out, size_t n);
    void (*f32_to_f16)(const float *src, uint16_t *dst, size_t n);
    void (*f16_to_f32)(const uint16_t *src, float *dst, size_t n);
} rv_ops;

/* rv_dispatch.c */
int rv_isa_supported(int isa);                 /* built into this binary and usable on this CPU */
int rv_isa_built(int isa);                     /* compiled into this binary at all */
const char *rv_isa_name(int isa);
int rv_isa_from_name(const char *name);        /* -1 if unknown */
int rv_best_isa(void);
const rv_ops *rv_ops_for(int isa);             /* NULL unless rv_isa_supported(isa) */
int rv_set_active_isa(int isa);                /* 0, or -1 if not supported */
const rv_ops *rv_active_ops(void);

/* Thread count every parallel driver uses (0 or less = all OpenMP threads). */
void rv_set_num_threads(int n);
int rv_get_num_threads(void);

/* each ISA translation unit */
void rv_fill_ops_scalar(rv_ops *ops);
void rv_fill_ops_avx2(rv_ops *ops);
void rv_fill_ops_avx512(rv_ops *ops);
void rv_fill_ops_neon(rv_ops *ops);

#endif
