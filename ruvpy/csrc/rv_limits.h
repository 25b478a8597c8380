/* Every limit of ruvpy, defined once. C code uses these macros; Python reads the same values
 * from ruvpy._kernels.LIMITS (and the cold formats from the codec table, ruvpy._kvcache
 * COLD_FORMATS), so a limit is never written twice. */
#ifndef RV_LIMITS_H
#define RV_LIMITS_H

/* head_dim of every attention path and cache: the quantized formats keep a channel number in
 * one byte and the kernels map channels with 256-entry tables */
#define RV_MAX_HEAD_DIM 256
/* keys of one functional attention call: the tiled kernel compares key indices as float32,
 * exact up to 2^24 */
#define RV_MAX_KV_LEN (1 << 24)
/* Python-facing counts (layers, heads, blocks, token counts per call) travel as C int */
#define RV_MAX_INT 2147483647
/* tokens of a two-tier cold group (one migration batch) */
#define RV_MAX_GROUP_TOKENS 4096
/* K values of one cold group (kv heads x head_dim x group tokens), and as many of V: a
 * group's blob addresses its head segments with 32-bit offsets, and 2^28 values of K and of V
 * stay under 4 GiB in every format (q8 with parameters: < 5 bytes per K+V value pair) */
#define RV_MAX_GROUP_VALUES (1 << 28)
/* hot-tier tokens of a two-tier cache: ring positions stay far from int overflow */
#define RV_MAX_HOT_TOKENS (RV_MAX_INT - (1 << 20))
/* outlier channels a quantized cold group keeps per head, group and K / V (dense-and-sparse:
 * max(1, head_dim / 16), at most this many) */
#define RV_MAX_OUTLIERS 8
#define RV_OUTLIERS_FOR(head_dim) ((head_dim) / 16 < 1 ? 1 : ((head_dim) / 16 > RV_MAX_OUTLIERS ? RV_MAX_OUTLIERS : (head_dim) / 16))
/* TurboQuant bit widths (bits per value) */
#define RV_TURBO_BITS_COUNT 3
#define RV_TURBO_BITS_LIST {2.5, 3.5, 4.5}
/* the widest TurboQuant code (4.5 bits: 5-bit codes for half the coordinates) */
#define RV_TURBO_MAX_BITS 5

#endif
