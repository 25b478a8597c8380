/* The q8 / q4 cold-group format of the two-tier cache (KIVI style, with dense-and-sparse
 * outlier channels).
 *
 * A group holds `G` consecutive tokens (one migration batch) of one (sequence, layer), every
 * KV head. Its blob starts with uint32 head_off[num_kv_heads] (byte offset of each head's
 * segment), then the segments. A head segment, every binary16 field 2-byte aligned:
 *
 *   kscale[d], kzero[d]      f16  keys: per channel over the G tokens
 *   vscale[G][ng], vzero[G][ng]  f16  values: per token, channel groups of group_size
 *                                     (ng = ceil(d / group_size))
 *   vcodes[G][vb]            u8   values token-major: vb = d or ceil(d/2) (4-bit rows: see
 *                                 kernels/quant_impl.h)
 *   nk, nv                   u8   outlier channels of keys / values (4-bit only)
 *   kidx[nk], vidx[nv]       u8   their channel numbers (ascending), then 1 pad byte if odd
 *   voscale[nv], vozero[nv]  f16  values' outliers: 8 bits per channel over the G tokens
 *   vocodes[nv][G]           u8   their 8-bit codes, a row of the G tokens per outlier (their
 *                                 slots in vcodes hold 0)
 *   kcodes[d + nk][kb]       u8   keys channel-major: kb = G (8 bits) or ceil(G/2) (4 bits);
 *                                 rows d.. hold the high nibbles of the outlier channels
 *
 * Keys: each channel is quantized over the G tokens with its own scale/zero; an outlier key
 * channel (range > RV_COLDQ_OUTLIER_RATIO x the median channel range of the head and group)
 * gets 8-bit codes instead of 4-bit: low nibble in its own row, high nibble in an extra row,
 * so scoring treats the extra row as one more channel whose query weight is 16x (an outlier
 * costs 4 bits per token more, nothing is stored twice).
 * Values: each token is quantized in channel groups with the outlier channels left out of the
 * group's range (a x20 channel in a per-token group would flatten the other channels of the
 * group); an outlier value channel gets 8-bit codes per channel over the G tokens (4 bits
 * would not do: the attention output of such data is dominated by these channels, and q4
 * cosine fell from 0.998 to 0.978), in a row of its own over the G tokens, which attention
 * sums as one dot product per channel after it decoded the token rows (whose slot for the
 * channel, code 0, it overwrites). An outlier value channel costs 4 bits per token more than
 * the split it replaced (low nibble in the slot, high nibble channel-major): summing the low
 * nibbles out of the token rows took a gather per 16 tokens, 11% of q4 decode at 9/3/64. */
#ifndef RV_COLDQ_H
#define RV_COLDQ_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/rv_qview.h"     /* struct rv_qhead: what the fused kernel reads of a head */
#include "kvcache/rv_codec.h"     /* the q8 / q4 codec entries, rv_codec_q8 and rv_codec_q4 */

#define RV_COLDQ_OUTLIER_RATIO 3.0f
#define RV_COLDQ_MAX_OUTLIERS RV_MAX_OUTLIERS     /* (rv_limits.h) */

/* ---- channel helpers shared with the TurboQuant format (rv_turbo.c) ---- */
/* The channels whose score exceeds factor x the median score (and 0), the `most` highest of
 * them, into idx ascending; returns how many. score [d] is overwritten; sorted: d floats. */
int rv_coldq_pick_channels(float *score, int d, float factor, int most, uint8_t *idx, float *sorted);
/* 1 if idx[0..n) are ascending channel numbers below d */
int rv_coldq_valid_channels(const uint8_t *idx, int n, int d);
/* x[t * stride], t < n, as 8-bit codes over their range: binary16 scale and zero, codes
 * computed against the rounded parameters (so decoding matches encoding), NaN -> 0 */
void rv_coldq_channel_q8(const float *x, int n, size_t stride, uint16_t *scale, uint16_t *zero, uint8_t *codes);

#endif
