/* The TurboQuant cold-group format of the two-tier cache, the codec table's entry "turbo"
 * (kvcache/rv_codec.h; after Zandieh et al., arXiv
 * 2504.19874: random rotation + Lloyd-Max scalar codes), with what measurements on SmolLM2's own
 * K/V showed a small head_dim needs (tools/kv_quant_lab.py, README "TurboQuant"):
 *
 *  - MSE codes only. The paper's 1-bit QJL residual makes key inner products unbiased but adds
 *    variance that the softmax amplifies (perplexity +29% against +1.9% for MSE-only codes at
 *    the same bits);
 *  - keys lose their group mean first: real keys sit far from zero along a few channels on every
 *    token, and after a rotation that offset costs every coordinate's bits. Each group stores
 *    its per-channel key mean mu (4-bit codes, binary16 range) and, per token, whether mu was
 *    taken out: a token whose key is nearer zero than mu (an attention sink) keeps its key, else
 *    mu + a residual quantized far more finely than the whole key would be. Scores add
 *    flag_t (q . mu) per token;
 *  - keys get more bits than values (3.75 / 3 at 3.5 bits per value, head_dim 64): their
 *    errors pass through the softmax;
 *  - per token a least-squares scale (not the norm) for the chosen codes, stored as an 8-bit code
 *    of its logarithm over the group's range; the codes are the nearest ones at whichever of 7
 *    scales around the norm's leaves the least error after that fit (an encoder choice: the
 *    format does not change);
 *  - every byte counted: turbo_bits is the budget per stored value, metadata included.
 *
 * A vector x (head_dim d, zero-padded to D = max(16, the next power of two)) is stored as a
 * scale a and codes c[D] with R x ~= a c, R = H diag(signs) / sqrt(D) a randomized Hadamard
 * rotation: the coordinates of R x / |x| are close to N(0, 1/D) whatever x is, so one scalar
 * codebook per width serves every coordinate. Codebooks are int8 (Lloyd-Max for N(0, 1) times
 * RV_TURBO_BOOK_SCALE, rounded): the encoder picks among exactly the values the kernels use,
 * and the kernels take integer dot products with an int8 copy of the rotated query.
 *
 * Code widths: rotated coordinates [0, n4) have 4 bits, [n4, n3) 3 bits, [n3, D) 2 bits (n3, n4
 * multiples of 16, so every block of 16 coordinates has one width and one lookup table). A
 * token's codes are D/4 bytes of "crumbs" (the low 2 bits; byte i holds coordinate
 * i + k D/4 at bits 2k, k = 0..3), then n3/8 bytes of bit 2 (coordinate i at bit i % 8 of byte
 * i / 8), then n4/8 bytes of bit 3. Unpacking is a broadcast, a shift per lane and a mask per
 * 64 coordinates, and a mask-to-bytes per plane.
 *
 * Group layout (G tokens of one sequence and layer; Gp = G rounded up to 16; fixed size):
 * kvh head segments of rv_turbo_head_bytes bytes back to back, each:
 *   f16  kmu_lo, kmu_step, kn_lo, kn_step, vn_lo, vn_step
 *   u8   kmu[ceil(d / 2)]     key mean codes: mu_c = kmu_lo + kmu_step * code (channel c in
 *                             byte c / 2, low nibble for even c)
 *   u8   kflag[Gp / 8]        bit t: token t's key had mu taken out
 *   u8   knorm[Gp], vnorm[Gp] scale codes: 0 is a zero vector, else
 *                             a = exp(lo + (code - 1) * step)
 *   u8   kcodes[Gp][kbytes], vcodes[Gp][vbytes]   token-major codes as above
 *   (padding to an even size). Padding tokens (G .. Gp) are zero vectors. */
#ifndef RV_TURBO_H
#define RV_TURBO_H

#include <stdint.h>

#include "kernels/rv_qview.h"     /* struct rv_thead: what the fused kernel reads of a head */
#include "kvcache/rv_codec.h"     /* the codec entry, rv_codec_turbo */

/* int8 codebooks: round(RV_TURBO_BOOK_SCALE * Lloyd-Max centroids of N(0, 1)), ascending; |c| <= 63
 * so that (c + 64) is a u8 below 128 and (c + 64) * q8 pair sums fit int16 (vpmaddubsw) */
#define RV_TURBO_BOOK_SCALE 23
#if defined(__GNUC__) || defined(__clang__)
#define RV_TURBO_TABLE static const __attribute__((unused))
#else
#define RV_TURBO_TABLE static const
#endif
RV_TURBO_TABLE int8_t rv_turbo_book2[4] = {-35, -10, 10, 35};
RV_TURBO_TABLE int8_t rv_turbo_book3[8] = {-49, -31, -17, -6, 6, 17, 31, 49};
RV_TURBO_TABLE int8_t rv_turbo_book4[16] = {-63, -48, -37, -29, -22, -15, -9, -3, 3, 9, 15, 22, 29, 37, 48, 63};

#endif
