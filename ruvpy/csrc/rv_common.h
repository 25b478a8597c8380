/* Shared C conventions of ruvpy.
 * Functions that can fail return an int status (RV_OK or a negative RV_E* code) and clean up
 * with goto; pure kernels return their result and never fail. */
#ifndef RV_COMMON_H
#define RV_COMMON_H

#include <stddef.h>
#include <stdint.h>

#define RV_OK 0
#define RV_ENOMEM (-1)   /* allocation failed */
#define RV_EINVAL (-2)   /* bad argument (checked again in C, after Python's checks) */
#define RV_EFULL (-3)    /* a fixed-size store has no room */
/* (-4 is rv_gguf.h's RV_EIO) */
#define RV_ETHREAD (-5)  /* a parallel region's OpenMP workers could not be started (rv_threads.h) */

#define RV_ALIGN 64      /* cache line; also the widest SIMD register */

#if defined(__GNUC__) || defined(__clang__)
#define RV_INLINE static inline __attribute__((always_inline))
#define RV_NOINLINE __attribute__((noinline))
#define RV_LIKELY(x) __builtin_expect(!!(x), 1)
#define RV_UNLIKELY(x) __builtin_expect(!!(x), 0)
#else
#define RV_INLINE static inline
#define RV_NOINLINE
#define RV_LIKELY(x) (x)
#define RV_UNLIKELY(x) (x)
#endif

#define RV_RESTRICT __restrict

/* n rounded up to a multiple of 16 floats (one cache line), for carving scratch into arrays */
RV_INLINE size_t rv_pad16(size_t n) { return (n + 15) & ~(size_t)15; }

#endif
