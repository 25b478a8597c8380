/* The TurboQuant cold-group format of the two-tier cache (Zandieh et al., arXiv 2504.19874).
 *
 * Every key / value vector x of one head (head_dim d, zero-padded to D = the next power of
 * two) is stored as its norm and the codes of its direction rotated by a fixed randomized
 * Hadamard transform R = H diag(signs) / sqrt(D): the coordinates of R x / |x| are close to
 * N(0, 1/D) whatever x was (outlier channels are spread over all of them), so one Lloyd-Max
 * scalar codebook for that Gaussian serves every coordinate. Rates b = 2.5 / 3.5 / 4.5 bits
 * per value: values use ceil(b) bits for the first D/2 rotated coordinates and floor(b) for
 * the rest (MSE quantizer); keys use one bit less for the codes and spend it on QJL: the
 * signs of S r for the residual r = y - y_hat (S a fixed D x D Gaussian matrix) and |r|, which
 * make the inner products unbiased:
 *     q . k  ~=  |k| ( (R q) . y_hat  +  |r| sqrt(pi/2) / D  (S R q) . sign(S r) ).
 * Attention scores with the rotated query (and S R q) straight from the codes; values are
 * accumulated in the rotated domain and rotated back once per call (R is orthogonal).
 *
 * Outlier channels (dense-and-sparse, as the q4 format): per head and group, the channels of
 * K and of V whose root mean square over the G tokens exceeds RV_TURBO_OUTLIER_RATIO x the
 * median channel's (the heaviest, at most max(1, head_dim / 16) and RV_MAX_OUTLIERS) are
 * taken out before the norm and the rotation and kept as 8-bit codes per channel over the
 * group with a binary16 scale and zero. Left in, a x20 channel would dominate |x| and the
 * rotation would spread it over every coordinate: the error of every score would be of the
 * order of the whole key norm, in a softmax made peaked by those very channels. By energy
 * rather than range (q4's rule): a channel far from zero on every token is as heavy as a wide
 * one, and cheap at 8 bits over its range. A vector is the sum of
 * its TurboQuant part (zero in the outlier channels up to its quantization error) and its
 * outliers, and so is every inner product.
 *
 * Group layout (G tokens of one sequence and layer; Gp = G rounded up to 16; a "plane" is
 * one bit of a code for the Gp tokens, Gp / 8 bytes, token t at bit t % 8 of byte t / 8):
 *   uint32 head_off[num_kv_heads], then per head:
 *   knorm[Gp], kgamma[Gp], vnorm[Gp]   f16  |k|, |r| (of the unit direction), |v|
 *   kplanes: rotated coordinate i's code bits, bit 0 first (kbits(i) planes each)
 *   qjl: D planes, projection j's sign bit (1: >= 0)
 *   vplanes: as kplanes with vbits(i)
 *   (the part above has the same size in every group; then)
 *   nk, nv                        u8   outlier channels of keys / values
 *   kidx[nk], vidx[nv]            u8   their channel numbers, ascending; 1 pad byte if odd
 *   kscale[nk], kzero[nk], vscale[nv], vzero[nv]   f16   x = scale * code + zero
 *   kcodes[nk][Gp], vcodes[nv][Gp]                  u8    channel-major codes over the tokens
 * Padding tokens (G .. Gp) are zero. */
#ifndef RV_TURBO_H
#define RV_TURBO_H

#include "kernels/rv_qview.h"     /* struct rv_thead: what the fused kernel reads of a head */
#include "kvcache/rv_codec.h"     /* the codec entry, rv_codec_turbo */

#define RV_TURBO_MAX_OUTLIERS RV_MAX_OUTLIERS   /* per head, group and K / V (rv_limits.h) */
#define RV_TURBO_OUTLIER_RATIO 3.0f  /* a channel's RMS over the median channel's */

#endif
