"""An independent float64 numpy reading of the TurboQuant cold-group format
(ruvpy/csrc/kvcache/rv_turbo.h), for tests: code widths, the packing of a token's codes, the
codebooks, the Hadamard rotation and a whole group blob decoded back to K and V."""
import math

import numpy as np

BOOK_SCALE = 23
BOOKS = {2: np.array([-35, -10, 10, 35]),
         3: np.array([-49, -31, -17, -6, 6, 17, 31, 49]),
         4: np.array([-63, -48, -37, -29, -22, -15, -9, -3, 3, 9, 15, 22, 29, 37, 48, 63])}


def lloyd_max_gauss(bits, iters=3000, grid=400001):
    """Lloyd-Max centroids of N(0, 1) with 2^bits levels (float64), computed here from scratch."""
    x = np.linspace(-9, 9, grid)
    p = np.exp(-0.5 * x * x)
    p /= p.sum()
    c = np.interp((np.arange(1 << bits) + 0.5) / (1 << bits), np.cumsum(p), x)
    # a cell's mass and first moment as differences of prefix sums: the grid is sorted, so a
    # cell is the run of points between two boundaries (x on a boundary goes to the lower cell)
    mass, moment = np.concatenate([[0.0], np.cumsum(p)]), np.concatenate([[0.0], np.cumsum(p * x)])
    for _ in range(iters):
        ends = np.concatenate([[0], np.searchsorted(x, (c[1:] + c[:-1]) / 2, side="right"), [grid]])
        c = np.diff(moment[ends]) / np.diff(mass[ends])
    return c


def padded_dim(d):
    D = 16
    while D < d:
        D *= 2
    return D


def widths(bits, d, G):
    """(k_n3, k_n4, v_n3, v_n4) of a rate `bits`: values floor(bits - 0.5) bits per
    coordinate, keys what the budget (bits + 0.06 per value, metadata included) leaves, in
    blocks of 16, 2..4 bits. `bits` a (key_bits, value_bits) pair (a layer's turbo_widths):
    (b - 2) D coordinates above 2 bits each, all of them at 3 before any gets 4."""
    D, Gp = padded_dim(d), -(-G // 16) * 16
    if isinstance(bits, tuple):
        extra = [round((b - 2) * D) for b in bits]
        return min(D, extra[0]), extra[0] - min(D, extra[0]), min(D, extra[1]), extra[1] - min(D, extra[1])
    vb = 2 if bits < 3 else (3 if bits < 4 else 4)
    meta = 17.0 + (96.0 + 8.0 * ((d + 1) // 2)) / G
    extra = ((bits + 0.06) * 2.0 * d - meta) * G / Gp - vb * D - 2.0 * D
    n3 = min(D, int(extra / 16) * 16) if extra > 0 else 0
    extra -= n3
    n4 = min(n3, int(extra / 16) * 16) if extra > 0 else 0
    return n3, n4, (D if vb >= 3 else 0), (D if vb >= 4 else 0)


def coord_widths(D, n3, n4):
    i = np.arange(D)
    return 2 + (i < n3) + (i < n4)


def token_bytes(D, n3, n4):
    return D // 4 + n3 // 8 + n4 // 8


def pack_codes(codes, n3, n4):
    """codes [T][D] (ints) -> [T][token_bytes] uint8 in the format's layout."""
    T, D = codes.shape
    q = D // 4
    out = np.zeros((T, token_bytes(D, n3, n4)), np.uint8)
    i = np.arange(D)
    for k in range(4):
        sel = i // q == k
        out[:, :q] |= ((codes[:, sel] & 3) << (2 * k)).astype(np.uint8)
    out[:, q:q + n3 // 8] = np.packbits(((codes[:, :n3] >> 2) & 1).astype(np.uint8), axis=1, bitorder="little")
    out[:, q + n3 // 8:] = np.packbits(((codes[:, :n4] >> 3) & 1).astype(np.uint8), axis=1, bitorder="little")
    return out


def unpack_codes(packed, D, n3, n4):
    """[T][token_bytes] uint8 -> codes [T][D]."""
    q = D // 4
    i = np.arange(D)
    crumbs = packed[:, i % q].astype(np.int64) >> (2 * (i // q))
    codes = crumbs & 3
    if n3:
        codes[:, :n3] |= np.unpackbits(packed[:, q:q + n3 // 8], axis=1, bitorder="little").astype(np.int64) << 2
    if n4:
        codes[:, :n4] |= np.unpackbits(packed[:, q + n3 // 8:q + n3 // 8 + n4 // 8], axis=1,
                                       bitorder="little").astype(np.int64) << 3
    return codes


def centroids(codes, n3, n4):
    """codes [T][D] -> their int8 codebook values (float64)."""
    w = coord_widths(codes.shape[1], n3, n4)
    out = np.empty(codes.shape)
    for b in (2, 3, 4):
        sel = w == b
        out[:, sel] = BOOKS[b][codes[:, sel]]
    return out


def tables(D, n3, n4):
    """The kernels' per-16-coordinate tables for these widths: as keys use them ((c + 64) as
    u8) and as values do (c as int8 bytes)."""
    w = coord_widths(D, n3, n4)
    kt, vt = np.zeros(D, np.uint8), np.zeros(D, np.uint8)
    for b in range(0, D, 16):
        book = BOOKS[w[b]]
        kt[b:b + len(book)] = book + 64
        vt[b:b + len(book)] = book.astype(np.int8).view(np.uint8)
    return kt, vt


def signs(D):
    """The randomized Hadamard's diagonal: splitmix64 from "ruvpy" ^ (D << 32), top bit."""
    s = (0x7572767079 ^ (D << 32)) & 0xFFFFFFFFFFFFFFFF
    out = np.empty(D)
    M = 0xFFFFFFFFFFFFFFFF
    for i in range(D):
        s = (s + 0x9E3779B97F4A7C15) & M
        z = s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
        z ^= z >> 31
        out[i] = 1.0 if z >> 63 else -1.0
    return out


def hadamard(D):
    h = np.ones((1, 1))
    while h.shape[0] < D:
        h = np.block([[h, h], [h, -h]])
    return h


def rotation(D):
    """R (y = R x): H diag(signs) / sqrt(D)."""
    return hadamard(D) * signs(D)[None, :] / math.sqrt(D)


def f16(raw):
    return np.frombuffer(np.asarray(raw, np.uint8).tobytes(), np.float16).astype(np.float64)


def segment_layout(d, G, bits):
    """Byte offsets of a head segment's parts and its size."""
    D, Gp = padded_dim(d), -(-G // 16) * 16
    kn3, kn4, vn3, vn4 = widths(bits, d, G)
    o = {"params": 0}
    pos = 12
    for name, size in (("mu", (d + 1) // 2), ("flag", Gp // 8), ("knorm", Gp), ("vnorm", Gp),
                       ("kcodes", Gp * token_bytes(D, kn3, kn4)), ("vcodes", Gp * token_bytes(D, vn3, vn4))):
        o[name] = pos
        pos += size
    o["size"] = pos + (pos & 1)
    return o


def scales(codes, lo, step):
    codes = codes.astype(np.float64)
    return np.where(codes > 0, np.exp(np.float32(lo) + (codes - 1) * np.float32(step)), 0.0)


def decode_blob(blob, kvh, d, G, bits):
    """A group blob -> (k, v) float64 [G, kvh, d], exactly as the format defines them."""
    blob = np.asarray(blob, np.uint8)
    D, Gp = padded_dim(d), -(-G // 16) * 16
    kn3, kn4, vn3, vn4 = widths(bits, d, G)
    L = segment_layout(d, G, bits)
    assert len(blob) == kvh * L["size"], (len(blob), kvh, L["size"])
    R = rotation(D)
    k, v = np.zeros((G, kvh, d)), np.zeros((G, kvh, d))
    for h in range(kvh):
        seg = blob[h * L["size"]:(h + 1) * L["size"]]
        p = f16(seg[:12])
        mu_codes = np.stack([seg[L["mu"]:L["mu"] + (d + 1) // 2] & 15, seg[L["mu"]:L["mu"] + (d + 1) // 2] >> 4],
                            1).reshape(-1)[:d]
        mu = np.float32(p[0]) + mu_codes * np.float32(p[1])
        flags = np.unpackbits(seg[L["flag"]:L["flag"] + Gp // 8], bitorder="little")[:G].astype(bool)
        ka = scales(seg[L["knorm"]:L["knorm"] + G], p[2], p[3])
        va = scales(seg[L["vnorm"]:L["vnorm"] + G], p[4], p[5])
        kb, vb = token_bytes(D, kn3, kn4), token_bytes(D, vn3, vn4)
        kc = unpack_codes(seg[L["kcodes"]:L["kcodes"] + Gp * kb].reshape(Gp, kb)[:G], D, kn3, kn4)
        vc = unpack_codes(seg[L["vcodes"]:L["vcodes"] + Gp * vb].reshape(Gp, vb)[:G], D, vn3, vn4)
        k[:, h] = ((ka[:, None] * centroids(kc, kn3, kn4)) @ R)[:, :d] + flags[:, None] * mu
        v[:, h] = ((va[:, None] * centroids(vc, vn3, vn4)) @ R)[:, :d]
    return k, v


def group_parts(blob, kvh, d, G, bits):
    """Per head of a group blob: dict(ka, kc, flag, mu, va, vc) -- the keys' scales [G], their
    rotated codebook values [G][D], mean flags [G], the mean [d], and the same for values."""
    blob = np.asarray(blob, np.uint8)
    D, Gp = padded_dim(d), -(-G // 16) * 16
    kn3, kn4, vn3, vn4 = widths(bits, d, G)
    L = segment_layout(d, G, bits)
    heads = []
    for h in range(kvh):
        seg = blob[h * L["size"]:(h + 1) * L["size"]]
        p = f16(seg[:12]).astype(np.float32)
        mu_codes = np.stack([seg[L["mu"]:L["mu"] + (d + 1) // 2] & 15, seg[L["mu"]:L["mu"] + (d + 1) // 2] >> 4],
                            1).reshape(-1)[:d]
        kb, vb = token_bytes(D, kn3, kn4), token_bytes(D, vn3, vn4)
        heads.append(dict(
            mu=(p[0] + mu_codes.astype(np.float32) * p[1]).astype(np.float64),
            flag=np.unpackbits(seg[L["flag"]:L["flag"] + Gp // 8], bitorder="little")[:G].astype(bool),
            ka=scales(seg[L["knorm"]:L["knorm"] + G], p[2], p[3]),
            va=scales(seg[L["vnorm"]:L["vnorm"] + G], p[4], p[5]),
            kc=centroids(unpack_codes(seg[L["kcodes"]:L["kcodes"] + Gp * kb].reshape(Gp, kb)[:G], D, kn3, kn4), kn3, kn4),
            vc=centroids(unpack_codes(seg[L["vcodes"]:L["vcodes"] + Gp * vb].reshape(Gp, vb)[:G], D, vn3, vn4), vn3, vn4)))
    return heads


def int8_rotated_query(q_scaled, D):
    """The rotated query as the C code makes it, in float32 step by step (same operations in
    the same order, so the same bits): y = fwht(q * signs) * (1 / sqrt(D)); qscale =
    max|y| / 127; q8 = rint(y * (1 / qscale)) clipped to +-127."""
    x = np.zeros(D, np.float32)
    x[:len(q_scaled)] = np.asarray(q_scaled, np.float32) * signs(D)[:len(q_scaled)].astype(np.float32)
    h = 1
    while h < D:
        x = x.reshape(-1, 2, h)
        x = np.stack([x[:, 0] + x[:, 1], x[:, 0] - x[:, 1]], 1).reshape(-1)
        h *= 2
    y = x * (np.float32(1.0) / np.sqrt(np.float32(D)))
    mx = np.abs(y).max()
    sc = mx / np.float32(127.0) if np.isfinite(mx) and mx > 0 else np.float32(0.0)
    inv = np.float32(1.0) / sc if sc > 0 else np.float32(0.0)
    q8 = np.clip(np.rint(y * inv), -127, 127)
    return float(sc), q8.astype(np.float64)


# the kernel tables whose TurboQuant value sums are integer, with 8-bit weights per 16-token
# block and row (turbo_body.h: VPDPBUSD under VNNI, VPMADDUBSW + VPMADDWD on AVX2)
VALUE_WEIGHTS_8BIT_TABLES = ("avx512vnni", "avx2")


def kernel_reference(cache, seq, layer, q, causal=True, bits=None, value_weights_8bit=True):
    """float64 attention of q [q_len, H, d] over `seq` in `layer` exactly as the kernels define
    it: cold keys scored by the int8 rotated query (int8_rotated_query) against their codes
    plus the mean term, hot tokens in fp16; cold values decoded. Returns (out, bound): bound
    [q_len, H] is what the kernels' float32 arithmetic may add (1e-5 * max|v|, as every cold
    format) plus, with value_weights_8bit (the avx512vnni and avx2 tables' kernels,
    VALUE_WEIGHTS_8BIT_TABLES), the 8-bit weights of their integer value sums: half of max/255 per 16-token block and row (the sum over blocks of
    max w / 510 * sum |v_t|, over the row's sum of weights)."""
    if bits is None:
        bits = cache.turbo_bits if cache.turbo_widths is None else cache.turbo_widths[layer]
    meta, arrays = cache.export_sequence(seq)
    kvh, d, G = cache.num_kv_heads, cache.head_dim, cache.migration_batch
    D = padded_dim(d)
    R = rotation(D)
    sizes, blobs = arrays[f"cold_sizes.{layer}"], arrays[f"cold.{layer}"]
    skip, cut = meta["skip"][layer], meta["cut"][layer]
    groups, off = [], 0
    for s in sizes:
        groups.append(group_parts(blobs[off:off + s], kvh, d, G, bits))
        off += s
    hot_k = arrays[f"hot_k.{layer}"].astype(np.float64)
    hot_v = arrays[f"hot_v.{layer}"].astype(np.float64)
    n_cold = len(groups) * G - skip - cut       # the last group lost `cut` tokens
    n = n_cold + len(hot_k)
    q = np.asarray(q, np.float32)
    q_len, H, _ = q.shape
    g = H // kvh
    scale = np.float32(1.0 / math.sqrt(d))
    out = np.zeros((q_len, H, d))
    bound = np.zeros((q_len, H))
    for h in range(kvh):
        # per token: cold (group, index) or hot
        a_k = np.concatenate([p[h]["ka"] for p in groups])[skip:skip + n_cold] if groups else np.zeros(0)
        kc = np.concatenate([p[h]["kc"] for p in groups])[skip:skip + n_cold] if groups else np.zeros((0, D))
        flag = np.concatenate([p[h]["flag"] for p in groups])[skip:skip + n_cold] if groups else np.zeros(0, bool)
        mus = np.concatenate([np.repeat(p[h]["mu"][None], G, 0) for p in groups])[skip:skip + n_cold] if groups else np.zeros((0, d))
        a_v = np.concatenate([p[h]["va"] for p in groups])[skip:skip + n_cold] if groups else np.zeros(0)
        vc = np.concatenate([p[h]["vc"] for p in groups])[skip:skip + n_cold] if groups else np.zeros((0, D))
        values = np.concatenate([((a_v[:, None] * vc) @ R)[:, :d], hot_v[:, h]])
        vmax = np.abs(values).max() if len(values) else 0.0
        for i in range(q_len):
            seen = n if not causal else n - q_len + i + 1
            for j in range(g):
                qs = q[i, h * g + j] * scale
                qsc, q8 = int8_rotated_query(qs, D)
                s = np.concatenate([a_k * (qsc * (kc @ q8)) + flag * (mus @ qs.astype(np.float64)),
                                    hot_k[:, h] @ qs.astype(np.float64)])[:seen]
                if seen <= 0:
                    continue
                p = np.exp(s - s.max())
                out[i, h * g + j] = p @ values[:seen] / p.sum()
                # the VNNI body's 8-bit weights over the cold tokens, blocks of 16 from each
                # group's first token seen
                w = p[:min(seen, n_cold)] * a_v[:min(seen, n_cold)]
                err = 0.0
                pos = np.arange(len(w)) + skip
                for grp in np.unique(pos // G):
                    in_g = pos // G == grp
                    wg, vg, pg = w[in_g], np.abs(vc[:len(w)][in_g]).sum(1), pos[in_g] % G
                    for blk in np.unique(pg // 16):
                        sel = pg // 16 == blk
                        err += wg[sel].max() / 510 * vg[sel].sum()
                bound[i, h * g + j] = 1e-5 * vmax + (1.01 * err / p.sum() / math.sqrt(D) if value_weights_8bit else 0.0)
    return out, bound
