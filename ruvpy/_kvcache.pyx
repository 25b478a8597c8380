# cython: language_level=3
# distutils: define_macros=NPY_NO_DEPRECATED_API=NPY_1_7_API_VERSION
"""ruvpy's KV caches: every layer of many sequences, attended in place.

- `PagedKVCache`: one preallocated pool of fixed-size fp16/fp32 blocks, per-sequence block
  tables, reference-counted blocks, copy-on-write forks (csrc/kvcache/rv_paged.c).
- `TwoTierKVCache`: an fp16 hot tail of the most recent tokens and a cold store of packed
  quantized groups (q8, q4, TurboQuant) (csrc/kvcache/rv_twotier.c).

Both attend over their storage in place through the kernel table's attention block
(csrc/kvcache/rv_kvattn.c). This module is the thin, validating Python face: every argument
is checked before anything is written, so a bad call leaves the cache exactly as it was.
Calls on one cache are serialised by a lock (attention runs without the GIL).
"""
import math

import numpy as np

cimport numpy as cnp
from cpython.pythread cimport (PyThread_type_lock, PyThread_allocate_lock, PyThread_free_lock,
                               PyThread_acquire_lock, PyThread_release_lock, WAIT_LOCK,
                               NOWAIT_LOCK)
from libc.stdint cimport int32_t, int64_t, uint16_t
from libc.stdlib cimport malloc, free

from ruvpy._kernels cimport active_ops, num_threads
from ruvpy.c_ops cimport rv_ops

cnp.import_array()

__all__ = ["PagedKVCache", "TwoTierKVCache", "KVCacheFull", "KVCacheStats", "PagedKVStats",
           "TwoTierKVStats"]

_F32 = np.dtype(np.float32)
_F16 = np.dtype(np.float16)
_FORMAT = "ruvpy.kvcache"
_FORMAT_VERSION = 3   # 2: q4 outliers as split nibbles, turbo outlier channels (2026-11-23)
                      # 3: turbo groups of a fixed size: key means, int8 codebooks, no QJL


class KVCacheFull(MemoryError):
    """The KV cache has no room for the tokens asked for; nothing was written."""


class KVCacheStats:
    """A snapshot of a KV cache. Every cache's stats have:

    kind, num_layers, num_kv_heads, head_dim, capacity_tokens (tokens per layer the cache
    may hold, all sequences together), tokens (tokens held: the sum over sequences of their
    longest layer), bytes (allocated now, everything: == cache.nbytes), tiers {name:
    {"tokens", "bytes"}}, layers [{"layer", "tokens", "bytes"}], sequences {id: {"tokens",
    "bytes", ...}} (a shared block's bytes are split among its holders), plus the
    cache-specific fields documented on PagedKVStats / TwoTierKVStats."""

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def as_dict(self):
        """A JSON-able dict (sequence ids become strings)."""
        return _jsonable(self.__dict__)

    def __repr__(self):
        return (f"<{type(self).__name__} {self.kind}: {self.tokens} tokens, "
                f"{self.bytes} bytes, {len(self.sequences)} sequences>")


class PagedKVStats(KVCacheStats):
    """KVCacheStats of a PagedKVCache, plus: dtype, block_size, bytes_per_block,
    blocks_total, blocks_used, blocks_shared (held by more than one sequence), blocks_free,
    pool_bytes, metadata_bytes, internal_fragmentation (fraction of the used blocks' token
    slots, over all layers, that hold no token; shared blocks counted once); per sequence
    also "blocks" and "shared_blocks"."""


class TwoTierKVStats(KVCacheStats):
    """KVCacheStats of a TwoTierKVCache, plus: cold ("q8", "q4", "turbo"), hot_tokens_limit,
    migration_batch, group_size, policy, cold_groups (allocated), cold_groups_shared (held by
    more than one sequence, or kept for a rollback), hot_bytes, cold_bytes, metadata_bytes,
    stored_tokens, cold_bytes_per_token (cold bytes / stored cold tokens, all layers), fp16
    bytes_per_token (what a token costs in the hot tier's format), compression_ratio (fp16
    bytes of the stored cold tokens / their cold bytes), cold_bits_per_value, evicted_tokens
    (tokens dropped from sequences since creation); tiers "hot" and "cold"; per sequence also
    "hot_tokens" and "cold_tokens".

    Stored vs held: forks share cold groups. `tokens` and the per-sequence counts are what
    each sequence holds (a shared token counts for every sequence holding it, as in the paged
    cache's stats). `stored_tokens` -- what max_tokens bounds -- the tiers' tokens and each
    layer's tokens count a shared cold token ONCE: every sequence's hot tokens (a fork copies
    its parent's) plus each cold group's tokens that some sequence still holds. stored_tokens
    and the tiers are those of the fullest layer (stored_tokens == hot + cold tokens there);
    bytes are allocations, a shared group's counted once (split among holders per sequence)."""


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    return x


cdef inline int _check_status(int rc, str what) except -1:
    if rc == RV_OK:
        return 0
    if rc == RV_ENOMEM:
        raise MemoryError(f"{what}: out of memory")
    if rc == RV_EFULL:
        raise KVCacheFull(f"{what}: the cache is full")
    raise ValueError(f"{what}: invalid arguments (status {rc})")


cdef int _positive_int(object value, str name) except -1:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0 or value > 2**31 - 1:
        raise ValueError(f"{name} must be a positive int (< 2**31), got {value}")
    return <int>value


cdef class _KVCache:
    """What both caches share: sequence ids, argument checks, transactions, the lock."""

    cdef readonly int num_layers
    cdef readonly int num_kv_heads
    cdef readonly int head_dim
    cdef readonly int64_t max_tokens
    cdef dict _slot_of           # sequence id -> C slot
    cdef int64_t _next_id
    cdef set _txn                # ids inside an open transaction
    cdef PyThread_type_lock _mutex
    cdef bint _closed

    def __cinit__(self, *args, **kwargs):
        self._mutex = PyThread_allocate_lock()
        if self._mutex == NULL:
            raise MemoryError("KV cache: cannot allocate its lock")
        self._slot_of = {}
        self._txn = set()
        self._next_id = 0
        self._closed = True      # until the subclass's C cache exists

    def __dealloc__(self):
        if self._mutex != NULL:
            PyThread_free_lock(self._mutex)

    cdef int _init_shape(self, num_layers, num_kv_heads, head_dim, max_tokens) except -1:
        self.num_layers = _positive_int(num_layers, "num_layers")
        self.num_kv_heads = _positive_int(num_kv_heads, "num_kv_heads")
        self.head_dim = _positive_int(head_dim, "head_dim")
        if self.head_dim > 256:
            raise ValueError(f"head_dim must be at most 256, got {head_dim}")
        if isinstance(max_tokens, (bool, np.bool_)) or not isinstance(max_tokens, (int, np.integer)):
            raise TypeError(f"max_tokens must be an int, got {type(max_tokens).__name__}")
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        self.max_tokens = max_tokens
        return 0

    # ---- locking: every public method holds the cache's lock ----
    cdef int _enter(self) except -1:
        if not PyThread_acquire_lock(self._mutex, NOWAIT_LOCK):
            with nogil:
                PyThread_acquire_lock(self._mutex, WAIT_LOCK)
        if self._closed:
            PyThread_release_lock(self._mutex)
            raise RuntimeError(f"this {type(self).__name__} is closed")
        return 0

    cdef inline void _leave(self) noexcept:
        PyThread_release_lock(self._mutex)

    # ---- argument checks ----
    cdef int _slot(self, seq) except -1:
        slot = self._slot_of.get(seq)
        if slot is None:
            raise KeyError(f"unknown sequence id {seq!r} (live: {sorted(self._slot_of)[:16]})")
        return <int>slot

    cdef int _layer(self, layer) except -1:
        if isinstance(layer, (bool, np.bool_)) or not isinstance(layer, (int, np.integer)):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is out of range (the cache has {self.num_layers} layers)")
        return <int>layer

    cdef object _kv_array(self, x, str name):
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{name} must be a numpy array, got {type(x).__name__}")
        dt = x.dtype
        if dt != _F32 and dt != _F16:
            raise TypeError(f"{name} must be float32 or float16, got {dt}")
        if x.ndim != 3 or x.shape[1] != self.num_kv_heads or x.shape[2] != self.head_dim:
            raise ValueError(f"{name} must have shape [tokens, num_kv_heads={self.num_kv_heads}, "
                             f"head_dim={self.head_dim}], got {x.shape}")
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        return x

    cdef tuple _kv_pair(self, k, v):
        k = self._kv_array(k, "k")
        v = self._kv_array(v, "v")
        if k.shape != v.shape or k.dtype != v.dtype:
            raise ValueError(f"k and v must have the same shape and dtype, got k {k.shape} "
                             f"{k.dtype} and v {v.shape} {v.dtype}")
        return k, v

    cdef object _q_array(self, q):
        if not isinstance(q, np.ndarray):
            raise TypeError(f"q must be a numpy array, got {type(q).__name__}")
        if q.dtype != _F32:
            raise TypeError(f"q must be float32, got {q.dtype}")
        if q.ndim != 3 or q.shape[2] != self.head_dim or q.shape[1] == 0 or \
                q.shape[1] % self.num_kv_heads:
            raise ValueError(f"q must have shape [q_len, num_heads, head_dim={self.head_dim}] with "
                             f"num_heads a multiple of num_kv_heads={self.num_kv_heads}, got {q.shape}")
        if not q.flags.c_contiguous:
            q = np.ascontiguousarray(q)
        return q

    cdef object _out_array(self, out, tuple shape):
        if out is None:
            return np.empty(shape, dtype=np.float32)
        if not isinstance(out, np.ndarray) or out.dtype != _F32:
            raise TypeError(f"out must be a float32 numpy array, got "
                            f"{getattr(out, 'dtype', type(out).__name__)}")
        if out.shape != shape:
            raise ValueError(f"out must have shape {shape}, got {out.shape}")
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("out must be C-contiguous and writeable")
        return out

    cdef float _scale(self, scale) except? -1:
        if scale is None:
            return 1.0 / math.sqrt(self.head_dim)
        s = float(scale)
        if not math.isfinite(s):
            raise ValueError(f"scale must be finite, got {scale}")
        return s

    cdef list _seq_list(self, seqs, str what):
        try:
            ids = list(seqs)
        except TypeError:
            raise TypeError(f"{what}: seqs must be a sequence of ids, got {type(seqs).__name__}") from None
        if len(set(ids)) != len(ids):
            raise ValueError(f"{what}: sequence ids repeat: {ids}")
        for s in ids:
            self._slot(s)
        return ids

    cdef list _counts(self, n_tokens, Py_ssize_t nseq, str what):
        try:
            counts = [int(n) for n in n_tokens]
        except TypeError:
            raise TypeError(f"{what}: n_tokens must be a sequence of ints") from None
        if len(counts) != nseq:
            raise ValueError(f"{what}: {nseq} sequences but {len(counts)} token counts")
        for n in counts:
            if n < 0:
                raise ValueError(f"{what}: token counts must be >= 0, got {counts}")
        return counts

    # ---- what each cache implements ----
    cdef int _h_add(self) except -1:
        raise NotImplementedError
    cdef int _h_fork(self, int slot) except -1:
        raise NotImplementedError
    cdef int _h_release(self, int slot) except -1:
        raise NotImplementedError
    cdef int64_t _h_len(self, int slot, int layer) except -1:
        raise NotImplementedError
    cdef int _h_room(self, list ids, int *slots, int64_t *n, int nseq, int layer) except -1:
        """Make sure appending n[i] tokens to slots[i] in `layer` (< 0: every layer) fits:
        raise KVCacheFull (or evict, by the cache's policy) before anything is written."""
        raise NotImplementedError
    cdef int _h_append(self, int slot, int layer, const void *k, const void *v, int64_t n,
                       int dtype) except -1:
        raise NotImplementedError
    cdef int _h_attend(self, int layer, int num_heads, rv_kv_query *queries, int nq, float scale,
                       bint causal) except -1:
        raise NotImplementedError
    cdef int _h_begin(self, int slot) except -1:
        raise NotImplementedError
    cdef int _h_commit(self, int slot) except -1:
        raise NotImplementedError
    cdef int _h_rollback(self, int slot) except -1:
        raise NotImplementedError
    cdef int _h_read(self, int slot, int layer, k, v) except -1:
        raise NotImplementedError
    cdef size_t _h_nbytes(self):
        return 0
    cdef object _h_stats(self):
        raise NotImplementedError
    cdef tuple _h_export(self, int slot):
        raise NotImplementedError
    cdef int _h_import(self, dict meta, arrays) except -1:
        raise NotImplementedError
    cdef int _h_close(self) except -1:
        raise NotImplementedError

    # ---- sequences ----
    def add_sequence(self):
        """A new empty sequence; returns its id (ids are never reused)."""
        self._enter()
        try:
            return self._register(self._h_add())
        finally:
            self._leave()

    cdef object _register(self, int slot):
        seq = self._next_id
        self._next_id += 1
        self._slot_of[seq] = slot
        return seq

    cdef int _no_open_transaction(self, str what) except -1:
        if self._txn:
            raise RuntimeError(f"cannot {what} while a transaction is open on sequences "
                               f"{sorted(self._txn)} (commit or roll it back first)")
        return 0

    def fork(self, seq):
        """A new sequence holding the same tokens as `seq` in every layer, sharing its
        storage; writes to either copy what they change (copy-on-write)."""
        self._enter()
        try:
            slot = self._slot(seq)
            self._no_open_transaction("fork")
            return self._register(self._h_fork(slot))
        finally:
            self._leave()

    def free(self, seq):
        """Drop a sequence and give its storage back."""
        self._enter()
        try:
            slot = self._slot(seq)
            self._no_open_transaction("free a sequence")
            self._h_release(slot)
            del self._slot_of[seq]
        finally:
            self._leave()

    def seq_len(self, seq, layer=0):
        """Tokens `seq` holds in `layer`."""
        self._enter()
        try:
            return self._h_len(self._slot(seq), self._layer(layer))
        finally:
            self._leave()

    def sequences(self):
        """Ids of the live sequences, oldest first."""
        self._enter()
        try:
            return sorted(self._slot_of)
        finally:
            self._leave()

    def __contains__(self, seq):
        return seq in self._slot_of

    # ---- writing ----
    def append(self, seq, layer, k, v):
        """Append tokens to `seq` in `layer`: k, v [n, num_kv_heads, head_dim], float32 or
        float16. KVCacheFull (or an eviction, by policy) before anything is written."""
        cdef int slot, lay
        cdef int64_t n
        self._enter()
        try:
            slot = self._slot(seq)
            lay = self._layer(layer)
            k, v = self._kv_pair(k, v)
            n = k.shape[0]
            if n == 0:
                return
            self._h_room([seq], &slot, &n, 1, lay)
            self._h_append(slot, lay, cnp.PyArray_DATA(k), cnp.PyArray_DATA(v), n,
                           RV_KV_F32 if k.dtype == _F32 else RV_KV_F16)
        finally:
            self._leave()

    def reserve(self, seqs, n_tokens):
        """Make sure appending n_tokens[i] tokens to seqs[i] in every layer will succeed:
        raises KVCacheFull (policy "error": nothing changes) or evicts the oldest cold tokens
        (policy "evict-oldest")."""
        cdef int64_t *n
        cdef int *slots
        self._enter()
        try:
            ids = self._seq_list(seqs, "reserve")
            counts = self._counts(n_tokens, len(ids), "reserve")
            slots = <int *>malloc(sizeof(int) * (len(ids) + 1))
            n = <int64_t *>malloc(sizeof(int64_t) * (len(ids) + 1))
            try:
                if slots == NULL or n == NULL:
                    raise MemoryError("reserve: out of memory")
                for i, s in enumerate(ids):
                    slots[i] = self._slot_of[s]
                    n[i] = counts[i]
                self._h_room(ids, slots, n, len(ids), -1)
            finally:
                free(slots)
                free(n)
        finally:
            self._leave()

    # ---- attention ----
    def attention(self, seq, layer, q, *, causal=True, scale=None, out=None):
        """softmax(scale q K^T [+ causal mask]) V over every token of `seq` in `layer`.
        q [q_len, num_heads, head_dim] float32; with causal masking query i sits at
        position kv_len - q_len + i. Returns out [q_len, num_heads, head_dim] float32."""
        cdef rv_kv_query query
        cdef int lay, slot
        self._enter()
        try:
            slot = self._slot(seq)
            lay = self._layer(layer)
            q = self._q_array(q)
            out = self._out_array(out, q.shape)
            sc = self._scale(scale)
            kv_len = self._h_len(slot, lay)
            if kv_len == 0:
                raise ValueError(f"attention on an empty sequence: sequence {seq} holds no tokens "
                                 f"in layer {layer}")
            if causal and q.shape[0] > kv_len:
                raise ValueError(f"causal attention with q_len {q.shape[0]} > kv_len {kv_len} "
                                 f"(sequence {seq}, layer {layer}; q shape {q.shape})")
            if q.shape[0] == 0:
                return out
            query.seq = slot
            query.q_len = q.shape[0]
            query.kv_len = kv_len
            query.q = <const float *>cnp.PyArray_DATA(q)
            query.out = <float *>cnp.PyArray_DATA(out)
            self._h_attend(lay, q.shape[1], &query, 1, sc, causal)
            return out
        finally:
            self._leave()

    def append_attend(self, layer, seqs, n_tokens, q, k, v, *, out=None, causal=True, scale=None):
        """One layer of a model step: append each sequence's new K/V rows, then attend every
        (sequence, kv head) in one parallel call. q [sum(n), num_heads, head_dim] float32,
        k, v [sum(n), num_kv_heads, head_dim] float32/float16: the concatenation over seqs
        in order. Everything is validated (and room made) before anything is written."""
        cdef int lay, nseq, i, nq
        cdef int64_t total, off
        cdef int *slots = NULL
        cdef int64_t *counts = NULL
        cdef rv_kv_query *queries = NULL
        cdef char *kp
        cdef char *vp
        cdef char *qp
        cdef char *op
        cdef Py_ssize_t krow, qrow
        self._enter()
        try:
            lay = self._layer(layer)
            ids = self._seq_list(seqs, "append_attend")
            nseq = len(ids)
            ns = self._counts(n_tokens, nseq, "append_attend")
            total = sum(ns)
            q = self._q_array(q)
            k, v = self._kv_pair(k, v)
            if q.shape[0] != total or k.shape[0] != total:
                raise ValueError(f"append_attend: the token counts {ns} add up to {total}, but q "
                                 f"has shape {q.shape} and k, v {k.shape}")
            out = self._out_array(out, q.shape)
            sc = self._scale(scale)
            if nseq == 0 or total == 0:
                return out
            slots = <int *>malloc(sizeof(int) * nseq)
            counts = <int64_t *>malloc(sizeof(int64_t) * nseq)
            queries = <rv_kv_query *>malloc(sizeof(rv_kv_query) * nseq)
            if slots == NULL or counts == NULL or queries == NULL:
                raise MemoryError("append_attend: out of memory")
            for i in range(nseq):
                slots[i] = self._slot_of[ids[i]]
                counts[i] = ns[i]
            self._h_room(ids, slots, counts, nseq, lay)
            dtype = RV_KV_F32 if k.dtype == _F32 else RV_KV_F16
            kp = <char *>cnp.PyArray_DATA(k)
            vp = <char *>cnp.PyArray_DATA(v)
            qp = <char *>cnp.PyArray_DATA(q)
            op = <char *>cnp.PyArray_DATA(out)
            krow = k.strides[0]
            qrow = q.strides[0]
            off = 0
            nq = 0
            for i in range(nseq):
                if counts[i] == 0:
                    continue
                self._h_append(slots[i], lay, kp + off * krow, vp + off * krow, counts[i], dtype)
                queries[nq].seq = slots[i]
                queries[nq].q_len = <int>counts[i]
                queries[nq].kv_len = self._h_len(slots[i], lay)
                queries[nq].q = <const float *>(qp + off * qrow)
                queries[nq].out = <float *>(op + off * qrow)
                nq += 1
                off += counts[i]
            self._h_attend(lay, q.shape[1], queries, nq, sc, causal)
            return out
        finally:
            free(slots)
            free(counts)
            free(queries)
            self._leave()

    # ---- transactions ----
    def begin(self, seqs):
        """Open a transaction on seqs: rollback() restores each of them, in every layer,
        exactly as it is now. fork() and free() are refused until it is closed."""
        self._enter()
        try:
            ids = self._seq_list(seqs, "begin")
            again = [s for s in ids if s in self._txn]
            if again:
                raise ValueError(f"begin: sequences {again} are already inside a transaction")
            done = []
            try:
                for s in ids:
                    self._h_begin(self._slot_of[s])
                    done.append(s)
            except BaseException:
                for s in done:
                    self._h_commit(self._slot_of[s])
                raise
            self._txn.update(ids)
        finally:
            self._leave()

    cdef list _txn_list(self, seqs, str what):
        ids = self._seq_list(seqs, what)
        outside = [s for s in ids if s not in self._txn]
        if outside:
            raise ValueError(f"{what}: sequences {outside} are not inside a transaction")
        return ids

    def commit(self, seqs):
        """Make the transaction's changes to seqs permanent."""
        self._enter()
        try:
            for s in self._txn_list(seqs, "commit"):
                self._h_commit(self._slot_of[s])
                self._txn.discard(s)
        finally:
            self._leave()

    def rollback(self, seqs):
        """Restore seqs to exactly their state at begin()."""
        self._enter()
        try:
            for s in self._txn_list(seqs, "rollback"):
                self._h_rollback(self._slot_of[s])
                self._txn.discard(s)
        finally:
            self._leave()

    # ---- inspection ----
    def get_kv(self, seq, layer):
        """(k, v): float32 copies [len, num_kv_heads, head_dim] of `seq` in `layer`, in
        append order (dequantized where stored quantized)."""
        self._enter()
        try:
            slot = self._slot(seq)
            lay = self._layer(layer)
            n = self._h_len(slot, lay)
            k = np.empty((n, self.num_kv_heads, self.head_dim), dtype=np.float32)
            v = np.empty_like(k)
            self._h_read(slot, lay, k, v)
            return k, v
        finally:
            self._leave()

    @property
    def nbytes(self):
        """Bytes this cache has allocated now (storage of every tier and all metadata)."""
        self._enter()
        try:
            return self._h_nbytes()
        finally:
            self._leave()

    def stats(self):
        """A KVCacheStats snapshot (see the stats class's docstring)."""
        self._enter()
        try:
            return self._h_stats()
        finally:
            self._leave()

    def export_sequence(self, seq):
        """(meta, arrays): `seq`'s K/V in the stored format (quantized tiers stay codes).
        meta is JSON-able; arrays maps names to numpy arrays. See import_sequence."""
        self._enter()
        try:
            slot = self._slot(seq)
            if seq in self._txn:
                raise RuntimeError(f"export_sequence: sequence {seq} is inside an open transaction")
            return self._h_export(slot)
        finally:
            self._leave()

    def import_sequence(self, meta, arrays):
        """A new sequence holding what export_sequence returned (from a cache of the same
        configuration); returns its id. Everything is checked first: a mismatch raises
        ValueError naming it, a full cache KVCacheFull, and nothing changes."""
        self._enter()
        try:
            if not isinstance(meta, dict):
                raise TypeError(f"import_sequence: meta must be a dict, got {type(meta).__name__}")
            if meta.get("format") != _FORMAT or meta.get("version") != _FORMAT_VERSION:
                raise ValueError(f"import_sequence: not a {_FORMAT} v{_FORMAT_VERSION} export "
                                 f"(format {meta.get('format')!r}, version {meta.get('version')!r})")
            self._check_meta(meta)
            return self._register(self._h_import(meta, arrays))
        finally:
            self._leave()

    cdef dict _meta(self, str kind):
        return {"format": _FORMAT, "version": _FORMAT_VERSION, "kind": kind,
                "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim}

    cdef int _check_meta(self, dict meta) except -1:
        """ValueError naming every configuration field of meta that differs from ours."""
        mine = self._config_fields()
        diffs = [f"{k}: export {meta.get(k)!r}, cache {v!r}" for k, v in mine.items()
                 if meta.get(k) != v]
        if diffs:
            raise ValueError("import_sequence: the export is from another configuration (" +
                             "; ".join(diffs) + ")")
        return 0

    cdef dict _config_fields(self):
        raise NotImplementedError

    def close(self):
        """Free the cache's memory now. Idempotent; afterwards every method raises
        RuntimeError."""
        if not PyThread_acquire_lock(self._mutex, NOWAIT_LOCK):
            with nogil:
                PyThread_acquire_lock(self._mutex, WAIT_LOCK)
        try:
            if not self._closed:
                self._h_close()
                self._closed = True
                self._slot_of = {}
                self._txn = set()
        finally:
            self._leave()

    @property
    def closed(self):
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


cdef inline int64_t _ceil_div(int64_t a, int64_t b) noexcept nogil:
    return (a + b - 1) // b


cdef int _dtype_code(dtype) except -1:
    if dtype in ("float16", np.float16) or (isinstance(dtype, np.dtype) and dtype == _F16):
        return RV_KV_F16
    if dtype in ("float32", np.float32) or (isinstance(dtype, np.dtype) and dtype == _F32):
        return RV_KV_F32
    raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")


cdef class PagedKVCache(_KVCache):
    """PagedKVCache(num_layers, num_kv_heads, head_dim, *, block_size=16, max_tokens,
    dtype="float16")

    One preallocated pool of ceil(max_tokens / block_size) blocks; a block holds block_size
    tokens of every layer (K and V, `dtype`). Sequences own tables of reference-counted
    blocks; fork() shares them and copies a shared block only when a write lands in it.
    A full pool raises KVCacheFull before anything is written."""

    cdef rv_paged *c
    cdef readonly int block_size
    cdef readonly str dtype

    def __init__(self, num_layers, num_kv_heads, head_dim, *, block_size=16, max_tokens,
                 dtype="float16"):
        self._init_shape(num_layers, num_kv_heads, head_dim, max_tokens)
        self.block_size = _positive_int(block_size, "block_size")
        code = _dtype_code(dtype)
        self.dtype = "float16" if code == RV_KV_F16 else "float32"
        num_blocks = _ceil_div(self.max_tokens, self.block_size)
        if num_blocks > 2**31 - 1:
            raise ValueError(f"max_tokens {max_tokens} needs {num_blocks} blocks of {block_size}; "
                             f"at most 2**31 - 1 blocks")
        rc = rv_paged_create(&self.c, self.num_layers, self.num_kv_heads, self.head_dim,
                             self.block_size, num_blocks, code)
        if rc == RV_ENOMEM:
            raise MemoryError(f"PagedKVCache: cannot allocate the pool of {num_blocks} blocks x "
                              f"{rv_paged_block_bytes(self.num_layers, self.num_kv_heads, self.head_dim, self.block_size, code)} bytes")
        _check_status(rc, "PagedKVCache")
        self._closed = False

    def __dealloc__(self):
        rv_paged_destroy(self.c)
        self.c = NULL

    @classmethod
    def bytes_per_token(cls, num_layers, num_kv_heads, head_dim, *, block_size=16,
                        dtype="float16", max_tokens=None):
        """Bytes one token of one sequence costs across all layers: a block's allocation
        divided by its token slots."""
        bb = rv_paged_block_bytes(_positive_int(num_layers, "num_layers"),
                                  _positive_int(num_kv_heads, "num_kv_heads"),
                                  _positive_int(head_dim, "head_dim"),
                                  _positive_int(block_size, "block_size"), _dtype_code(dtype))
        if bb == 0:
            raise ValueError("bytes_per_token: the block size in bytes overflows")
        return bb / block_size

    @property
    def capacity_tokens(self):
        """Tokens the pool holds (per layer, all sequences together)."""
        return self.c.num_blocks * self.block_size if self.c else 0

    def block_refcounts(self):
        """Reference count of every block of the pool (int32 copy; 0 = free). For tests and
        inspection."""
        self._enter()
        try:
            counts = np.empty(self.c.num_blocks, dtype=np.int32)
            for b in range(self.c.num_blocks):
                counts[b] = self.c.refcount[b]
            return counts
        finally:
            self._leave()

    def block_table(self, seq):
        """The block ids of `seq`, in token order (a copy). For tests and inspection."""
        cdef rv_paged_seq *s
        self._enter()
        try:
            s = &self.c.seqs[self._slot(seq)]
            return [s.blocks[b] for b in range(s.nblocks)]
        finally:
            self._leave()

    cdef int _h_add(self) except -1:
        cdef int slot
        _check_status(rv_paged_add(self.c, &slot), "add_sequence")
        return slot

    cdef int _h_fork(self, int slot) except -1:
        cdef int child
        _check_status(rv_paged_fork(self.c, slot, &child), "fork")
        return child

    cdef int _h_release(self, int slot) except -1:
        rv_paged_release(self.c, slot)
        return 0

    cdef int64_t _h_len(self, int slot, int layer) except -1:
        return self.c.seqs[slot].ntok[layer]

    cdef int _h_room(self, list ids, int *slots, int64_t *n, int nseq, int layer) except -1:
        need = rv_paged_blocks_needed(self.c, nseq, slots, n, layer)
        if need > self.c.nfree:
            requested = sum(n[i] for i in range(nseq))
            where = f"layer {layer}" if layer >= 0 else "every layer"
            raise KVCacheFull(
                f"KV cache full: {requested} tokens requested for sequences {ids} in {where} need "
                f"{need} free blocks of {self.block_size} tokens, but only {self.c.nfree} are free "
                f"({self.c.nfree * self.block_size} tokens of {self.capacity_tokens}); nothing was written")
        return 0

    cdef int _h_append(self, int slot, int layer, const void *k, const void *v, int64_t n,
                       int dtype) except -1:
        _check_status(rv_paged_append(self.c, slot, layer, k, v, n, dtype, active_ops()), "append")
        return 0

    cdef int _h_attend(self, int layer, int num_heads, rv_kv_query *queries, int nq, float scale,
                       bint causal) except -1:
        cdef int rc
        with nogil:
            rc = rv_paged_attend(self.c, layer, num_heads, queries, nq, scale, causal, active_ops(),
                                 num_threads())
        _check_status(rc, "attention")
        return 0

    cdef int _h_begin(self, int slot) except -1:
        _check_status(rv_paged_begin(self.c, slot), "begin")
        return 0

    cdef int _h_commit(self, int slot) except -1:
        rv_paged_commit(self.c, slot)
        return 0

    cdef int _h_rollback(self, int slot) except -1:
        rv_paged_rollback(self.c, slot)
        return 0

    cdef int _h_read(self, int slot, int layer, k, v) except -1:
        rv_paged_read(self.c, slot, layer, cnp.PyArray_DATA(k), cnp.PyArray_DATA(v), 1, active_ops())
        return 0

    cdef size_t _h_nbytes(self):
        return self.c.pool_bytes + self.c.meta_bytes

    cdef object _h_stats(self):
        cdef rv_paged_stats st
        cdef rv_paged_seq *s
        rv_paged_get_stats(self.c, &st)
        bb = self.c.block_bytes
        seqs = {}
        layer_tokens = [0] * self.num_layers
        total = 0
        for seq, slot in sorted(self._slot_of.items()):
            s = &self.c.seqs[<int>slot]
            nb = s.nblocks
            shared = 0
            share_bytes = 0
            for b in range(nb):
                r = self.c.refcount[s.blocks[b]]
                shared += r > 1
                share_bytes += bb // r
            longest = 0
            for l in range(self.num_layers):
                layer_tokens[l] += s.ntok[l]
                longest = max(longest, s.ntok[l])
            total += longest
            seqs[seq] = {"tokens": longest, "bytes": share_bytes, "blocks": nb, "shared_blocks": shared}
        used_bytes = st.blocks_used * bb
        nbytes = self._h_nbytes()
        return PagedKVStats(
            kind="paged", num_layers=self.num_layers, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, dtype=self.dtype, block_size=self.block_size,
            capacity_tokens=self.capacity_tokens, tokens=total, bytes=nbytes,
            tiers={"paged": {"tokens": total, "bytes": used_bytes}},
            layers=[{"layer": l, "tokens": layer_tokens[l], "bytes": used_bytes // self.num_layers}
                    for l in range(self.num_layers)],
            sequences=seqs, bytes_per_block=bb, blocks_total=self.c.num_blocks,
            blocks_used=st.blocks_used, blocks_shared=st.blocks_shared, blocks_free=st.blocks_free,
            pool_bytes=self.c.pool_bytes, metadata_bytes=self.c.meta_bytes,
            internal_fragmentation=(1.0 - <double>st.tokens_stored / st.slots_used) if st.slots_used else 0.0)

    cdef dict _config_fields(self):
        return {"kind": "paged", "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "dtype": self.dtype}

    cdef tuple _h_export(self, int slot):
        meta = self._meta("paged")
        meta["dtype"] = self.dtype
        lengths = [self.c.seqs[slot].ntok[l] for l in range(self.num_layers)]
        meta["lengths"] = lengths
        arrays = {}
        for l in range(self.num_layers):
            k = np.empty((lengths[l], self.num_kv_heads, self.head_dim), dtype=self.dtype)
            v = np.empty_like(k)
            rv_paged_read(self.c, slot, l, cnp.PyArray_DATA(k), cnp.PyArray_DATA(v), 0, active_ops())
            arrays[f"k.{l}"] = k
            arrays[f"v.{l}"] = v
        return meta, arrays

    cdef int _h_import(self, dict meta, arrays) except -1:
        cdef int slot
        cdef int64_t n
        lengths = _import_lengths(meta, self.num_layers)
        dt = np.dtype(self.dtype)
        pairs = []
        for l in range(self.num_layers):
            shape = (lengths[l], self.num_kv_heads, self.head_dim)
            pair = []
            for name in (f"k.{l}", f"v.{l}"):
                a = _import_array(arrays, name, shape, dt)
                pair.append(a)
            pairs.append(pair)
        n = max(lengths) if lengths else 0
        need = _ceil_div(n, self.block_size)
        if need > self.c.nfree:
            raise KVCacheFull(f"import_sequence: {n} tokens need {need} free blocks, only "
                              f"{self.c.nfree} are free; nothing was written")
        slot = self._h_add()
        try:
            for l in range(self.num_layers):
                k, v = pairs[l]
                if lengths[l]:
                    self._h_append(slot, l, cnp.PyArray_DATA(k), cnp.PyArray_DATA(v), lengths[l],
                                   RV_KV_F16 if dt == _F16 else RV_KV_F32)
        except BaseException:
            rv_paged_release(self.c, slot)
            raise
        return slot

    cdef int _h_close(self) except -1:
        rv_paged_destroy(self.c)
        self.c = NULL
        return 0

    def __repr__(self):
        if self._closed:
            return "<ruvpy.PagedKVCache (closed)>"
        return (f"<ruvpy.PagedKVCache {self.num_layers} layers x {self.num_kv_heads} kv heads x "
                f"{self.head_dim}, {self.dtype}, {self.c.num_blocks} blocks of {self.block_size}, "
                f"{len(self._slot_of)} sequences>")


def _import_lengths(dict meta, int num_layers):
    lengths = meta.get("lengths")
    if (not isinstance(lengths, list) or len(lengths) != num_layers or
            any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in lengths)):
        raise ValueError(f"import_sequence: meta['lengths'] must be {num_layers} token counts "
                         f"(>= 0), got {lengths!r}")
    return lengths


def _import_array(arrays, str name, tuple shape, dtype):
    try:
        a = arrays[name]
    except (KeyError, TypeError):
        raise ValueError(f"import_sequence: array {name!r} is missing") from None
    if not isinstance(a, np.ndarray):
        raise ValueError(f"import_sequence: {name!r} must be a numpy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise ValueError(f"import_sequence: {name!r} must be {np.dtype(dtype)}, got {a.dtype}")
    if a.shape != shape:
        raise ValueError(f"import_sequence: {name!r} must have shape {shape}, got {a.shape}")
    return np.ascontiguousarray(a)


_COLD_FORMATS = {"q8": RV_TT_Q8, "q4": RV_TT_Q4, "turbo": RV_TT_TURBO}
_TURBO_BITS = (2.5, 3.5, 4.5)
_POLICIES = ("error", "evict-oldest")
# a cold group's blob addresses its head segments with 32-bit offsets: 2^28 values of K and as
# many of V stay under 4 GiB in every format (q8 with parameters: < 5 bytes per K+V value pair)
_MAX_GROUP_VALUES = 1 << 28


cdef int _tt_params(rv_tt_params *p, num_layers, num_kv_heads, head_dim, hot_tokens, cold,
                    group_size, migration_batch, max_tokens, turbo_bits) except -1:
    p.num_layers = _positive_int(num_layers, "num_layers")
    p.num_kv_heads = _positive_int(num_kv_heads, "num_kv_heads")
    p.head_dim = _positive_int(head_dim, "head_dim")
    if p.head_dim > 256:
        raise ValueError(f"head_dim must be at most 256, got {head_dim}")
    if isinstance(hot_tokens, (bool, np.bool_)) or not isinstance(hot_tokens, (int, np.integer)):
        raise TypeError(f"hot_tokens must be an int, got {type(hot_tokens).__name__}")
    if not 0 <= hot_tokens < 2**31 - 2**20:
        raise ValueError(f"hot_tokens must be >= 0, got {hot_tokens}")
    p.hot_tokens = hot_tokens
    if cold not in _COLD_FORMATS:
        raise ValueError(f"cold must be one of {sorted(_COLD_FORMATS)}, got {cold!r}")
    p.cold = _COLD_FORMATS[cold]
    p.group_size = _positive_int(group_size, "group_size")
    p.group_tokens = _positive_int(migration_batch, "migration_batch")
    if p.group_tokens > 4096:
        raise ValueError(f"migration_batch must be at most 4096 tokens, got {migration_batch}")
    if p.num_kv_heads * p.head_dim * p.group_tokens > _MAX_GROUP_VALUES:
        raise ValueError(f"a cold group would hold num_kv_heads * head_dim * migration_batch = "
                         f"{p.num_kv_heads * p.head_dim * p.group_tokens} values of K (and as many of V), "
                         f"more than {_MAX_GROUP_VALUES}: use fewer KV heads per cache or a smaller "
                         f"migration_batch")
    p.max_tokens = 1 if max_tokens is None else max_tokens
    if isinstance(turbo_bits, (bool, np.bool_)) or not isinstance(turbo_bits, (int, float, np.integer, np.floating)):
        raise TypeError(f"turbo_bits must be a number, got {type(turbo_bits).__name__}")
    if cold == "turbo" and float(turbo_bits) not in _TURBO_BITS:
        raise ValueError(f"turbo_bits must be one of {_TURBO_BITS} (bits per value), got {turbo_bits}")
    p.turbo_bits = float(turbo_bits)
    return 0


cdef class TwoTierKVCache(_KVCache):
    """TwoTierKVCache(num_layers, num_kv_heads, head_dim, *, hot_tokens=256, cold="q4",
    group_size=32, migration_batch=64, max_tokens, policy="error", turbo_bits=3.5)

    Per sequence and layer, the most recent tokens stay in an fp16 hot ring; once it holds
    hot_tokens + migration_batch tokens, its oldest migration_batch tokens are quantized into
    one immutable cold group: "q8" (int8) or "q4" (two 4-bit codes per byte). Keys are
    quantized per channel over the group, values per token in channel groups of group_size,
    scales and zero points in fp16; with q4, up to max(1, head_dim / 16) channels of K and of V
    per head and group whose range over the group is more than 3x the median channel range
    keep 8-bit codes per channel over the group. Attention dequantizes the cold codes chunk by chunk inside the kernel and folds
    them and the hot tokens into one online softmax.

    max_tokens bounds the tokens stored per layer, all sequences together: each sequence's hot
    tokens plus the cold tokens, a cold token shared by forks counted once. fork() shares the
    cold groups and copies the hot tail, so a fork costs only its hot tokens (KVCacheFull, and
    nothing changes, if they do not fit; fork never evicts). Policy "error": appends past
    max_tokens raise KVCacheFull (nothing written); "evict-oldest": the oldest tokens are
    dropped until exactly the room asked for is free -- first of the sequences being appended
    to (so each keeps its newest tokens), then of the others, longest first; while a
    transaction is open, a request from its sequences evicts only from them and a request
    from other sequences only from sequences outside it (so a rollback never goes over the
    budget; a request mixing both raises). A dropped token that another sequence still holds
    frees no room, so its other holders drop it next: the oldest shared tokens go from every
    holder, and a fork that appends loses about as many tokens as it adds, not its whole
    shared prefix. A shared cold group's memory is freed when its last holder drops it.
    import_sequence() stores its own copy of everything (it costs all its tokens).

    cold="turbo": TurboQuant at turbo_bits 2.5 / 3.5 / 4.5 bits per value, metadata included
    (rotated codes with Lloyd-Max codebooks, the keys' group mean taken out; values get
    floor(bits - 0.5) bits per coordinate, keys the rest; see csrc/kvcache/rv_turbo.h)."""

    cdef rv_tt *c
    cdef readonly int hot_tokens
    cdef readonly int group_size
    cdef readonly int migration_batch
    cdef readonly str cold
    cdef readonly str policy
    cdef readonly double turbo_bits

    def __init__(self, num_layers, num_kv_heads, head_dim, *, hot_tokens=256, cold="q4",
                 group_size=32, migration_batch=64, max_tokens, policy="error", turbo_bits=3.5):
        cdef rv_tt_params p
        self._init_shape(num_layers, num_kv_heads, head_dim, max_tokens)
        _tt_params(&p, num_layers, num_kv_heads, head_dim, hot_tokens, cold, group_size,
                   migration_batch, max_tokens, turbo_bits)
        if policy not in _POLICIES:
            raise ValueError(f"policy must be one of {_POLICIES}, got {policy!r}")
        self.hot_tokens = p.hot_tokens
        self.group_size = p.group_size
        self.migration_batch = p.group_tokens
        self.cold = cold
        self.policy = policy
        self.turbo_bits = p.turbo_bits
        _check_status(rv_tt_create(&self.c, &p), "TwoTierKVCache")
        self._closed = False

    def __dealloc__(self):
        rv_tt_destroy(self.c)
        self.c = NULL

    @classmethod
    def bytes_per_token(cls, num_layers, num_kv_heads, head_dim, *, hot_tokens=256, cold="q4",
                        group_size=32, migration_batch=64, turbo_bits=3.5, policy=None,
                        max_tokens=None):
        """Bytes one cold token of one sequence costs across all layers: a cold group's
        allocation (without outlier channels) divided by its tokens. A sequence's hot tier
        adds up to hot_tier_bytes(...)."""
        cdef rv_tt_params p
        _tt_params(&p, num_layers, num_kv_heads, head_dim, hot_tokens, cold, group_size,
                   migration_batch, max_tokens, turbo_bits)
        return p.num_layers * rv_tt_group_alloc_bytes(&p) / p.group_tokens

    @classmethod
    def hot_tier_bytes(cls, num_layers, num_kv_heads, head_dim, *, hot_tokens=256, cold="q4",
                       group_size=32, migration_batch=64, turbo_bits=3.5, policy=None,
                       max_tokens=None):
        """The most one sequence's hot tier holds between steps, all layers: fp16 rings of
        hot_tokens + migration_batch tokens. (A step that appends more grows them until it
        ends.)"""
        cdef rv_tt_params p
        _tt_params(&p, num_layers, num_kv_heads, head_dim, hot_tokens, cold, group_size,
                   migration_batch, max_tokens, turbo_bits)
        return p.num_layers * rv_tt_hot_alloc_bytes(&p, p.hot_tokens + p.group_tokens)

    @property
    def capacity_tokens(self):
        return self.max_tokens

    cdef int _h_add(self) except -1:
        cdef int slot
        _check_status(rv_tt_add(self.c, &slot), "add_sequence")
        return slot

    cdef int _h_fork(self, int slot) except -1:
        cdef int child
        rc = rv_tt_fork(self.c, slot, &child)
        if rc == RV_EFULL:
            hot = [rv_tt_len(self.c, slot, l) - rv_tt_cold_len(self.c, slot, l)
                   for l in range(self.num_layers)]
            l = max(range(self.num_layers), key=lambda l: self.c.used[l] + hot[l])
            raise KVCacheFull(f"fork: the copy's {hot[l]} hot tokens (layer {l}; its cold groups are "
                              f"shared and take no room) do not fit: {self.max_tokens - self.c.used[l]} "
                              f"free of max_tokens={self.max_tokens}; nothing was written")
        _check_status(rc, "fork")
        return child

    cdef int _h_release(self, int slot) except -1:
        rv_tt_release(self.c, slot)
        return 0

    cdef int64_t _h_len(self, int slot, int layer) except -1:
        return rv_tt_len(self.c, slot, layer)

    cdef int _fullest_layer(self, int lo, int hi) noexcept:
        cdef int l, best = lo
        for l in range(lo, hi):
            if self.c.used[l] > self.c.used[best]:
                best = l
        return best

    cdef int _h_room(self, list ids, int *slots, int64_t *n, int nseq, int layer) except -1:
        cdef int64_t requested = 0, over, take, before
        cdef bint evicted
        cdef int i, bind, sl
        cdef int lo = 0 if layer < 0 else layer
        cdef int hi = self.num_layers if layer < 0 else layer + 1
        for i in range(nseq):
            requested += n[i]
        bind = self._fullest_layer(lo, hi)
        over = self.c.used[bind] + requested - self.max_tokens
        if over <= 0:
            return 0
        where = f"layer {layer}" if layer >= 0 else "every layer"
        if self.policy == "error" or requested > self.max_tokens:
            raise KVCacheFull(
                f"KV cache full: {requested} tokens requested for sequences {ids} in {where}, "
                f"{self.max_tokens - self.c.used[bind]} free of max_tokens={self.max_tokens}"
                + ("" if self.policy == "error" else " (more than the cache holds: eviction cannot help)")
                + "; nothing was written")
        # evict-oldest: the requesting sequences' oldest tokens first, then the others'. While a
        # transaction is open, a request from its sequences evicts only from them (a rollback
        # restores what they gave up) and a request from other sequences only from sequences
        # outside it (a rollback must not bring back tokens whose room was given away); a
        # request mixing both raises. A token another sequence still holds (a shared cold
        # group) frees no room when dropped: its other holders give it up next (the oldest
        # shared tokens go from every holder), not the requester ever more of its own.
        requesting = [slots[i] for i in range(nseq)]
        allowed = None
        if self._txn:
            in_txn = {self._slot_of[s] for s in self._txn}
            inside = [x in in_txn for x in requesting]
            if all(inside):
                allowed = in_txn
            elif not any(inside):
                allowed = {x for x in self._slot_of.values() if x not in in_txn}
            else:
                raise KVCacheFull(
                    f"KV cache full: {requested} tokens requested for sequences {ids} in {where}, some "
                    f"inside the open transaction on {sorted(self._txn)} and some outside: eviction could "
                    f"not be rolled back consistently; nothing was written")
        others = sorted([x for x in self._slot_of.values() if x not in requesting and
                         (allowed is None or x in allowed)], key=lambda x: -rv_tt_len(self.c, x, 0))
        victims = [x for x in requesting if allowed is None or x in allowed] + others
        for l in range(lo, hi):
            # all sequences may give up tokens outside a transaction: emptying them frees all
            if allowed is not None and self._stored_without(l, victims) + requested > self.max_tokens:
                raise KVCacheFull(
                    f"KV cache full: {requested} tokens requested for sequences {ids} in {where}; while "
                    f"the transaction on {sorted(self._txn)} is open only sequences on the same side of it "
                    f"may give up tokens, and the tokens only they hold are too few (tokens shared with "
                    f"other sequences stay stored); nothing was written")
        while over > 0:
            evicted = False
            for sl in victims:
                take = min(over, rv_tt_len(self.c, sl, bind))
                if take > 0:
                    before = self.c.used[bind]
                    rv_tt_evict(self.c, sl, take)
                    evicted = True
                    if self.c.used[bind] < before:
                        break
                    # only tokens others still hold: the next victims drop theirs
            if not evicted:
                raise AssertionError("evict-oldest: nothing left to evict")   # unreachable
            bind = self._fullest_layer(lo, hi)
            over = self.c.used[bind] + requested - self.max_tokens
        return 0

    cdef int64_t _stored_without(self, int layer, list victims) except -1:
        """what `layer` would store if the sequences in slots `victims` held nothing"""
        cdef int *sl = <int *>malloc(sizeof(int) * (len(victims) + 1))
        if sl == NULL:
            raise MemoryError("reserve: out of memory")
        try:
            for i, x in enumerate(victims):
                sl[i] = x
            return rv_tt_stored_without(self.c, layer, sl, len(victims))
        finally:
            free(sl)

    cdef int _h_append(self, int slot, int layer, const void *k, const void *v, int64_t n,
                       int dtype) except -1:
        _check_status(rv_tt_append(self.c, slot, layer, k, v, n, 0 if dtype == RV_KV_F32 else 1,
                                   active_ops()), "append")
        return 0

    cdef int _h_attend(self, int layer, int num_heads, rv_kv_query *queries, int nq, float scale,
                       bint causal) except -1:
        cdef int rc
        with nogil:
            rc = rv_tt_attend(self.c, layer, num_heads, queries, nq, scale, causal, active_ops(),
                              num_threads())
        _check_status(rc, "attention")
        return 0

    cdef int _h_begin(self, int slot) except -1:
        _check_status(rv_tt_begin(self.c, slot), "begin")
        return 0

    cdef int _h_commit(self, int slot) except -1:
        rv_tt_commit(self.c, slot, active_ops())
        return 0

    cdef int _h_rollback(self, int slot) except -1:
        rv_tt_rollback(self.c, slot)
        return 0

    cdef int _h_read(self, int slot, int layer, k, v) except -1:
        _check_status(rv_tt_read(self.c, slot, layer, <float *>cnp.PyArray_DATA(k),
                                 <float *>cnp.PyArray_DATA(v), active_ops()), "get_kv")
        return 0

    cdef size_t _h_nbytes(self):
        return self.c.hot_bytes + self.c.cold_bytes + self.c.meta_bytes

    cdef object _h_stats(self):
        cdef rv_tt_usage u
        L = self.num_layers
        # layers: tokens stored (what max_tokens bounds: a shared cold token once)
        layer_rows = [{"layer": l, "tokens": self.c.used[l], "bytes": 0} for l in range(L)]
        layer_hot = [0] * L
        seqs = {}
        tokens = 0
        for seq, slot in sorted(self._slot_of.items()):
            entry = {"tokens": 0, "bytes": 0, "hot_tokens": 0, "cold_tokens": 0}
            for l in range(L):
                rv_tt_seq_usage(self.c, slot, l, &u)
                entry["tokens"] = max(entry["tokens"], u.hot_tokens + u.cold_tokens)
                entry["hot_tokens"] = max(entry["hot_tokens"], u.hot_tokens)
                entry["cold_tokens"] = max(entry["cold_tokens"], u.cold_tokens)
                entry["bytes"] += u.hot_bytes + u.cold_bytes
                layer_rows[l]["bytes"] += u.hot_bytes + u.cold_bytes
                layer_hot[l] += u.hot_tokens
            seqs[seq] = entry
            tokens += entry["tokens"]
        fullest = max(range(L), key=lambda l: self.c.used[l])
        hot_tokens = layer_hot[fullest]
        cold_tokens = self.c.used[fullest] - hot_tokens
        cold_token_layers = sum(self.c.used[l] - layer_hot[l] for l in range(L))
        fp16_token = 2 * 2 * self.num_kv_heads * self.head_dim      # K and V, one layer
        cold_bytes = self.c.cold_bytes
        return TwoTierKVStats(
            kind="two-tier", num_layers=L, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            cold=self.cold, hot_tokens_limit=self.hot_tokens, migration_batch=self.migration_batch,
            group_size=self.group_size, policy=self.policy, capacity_tokens=self.max_tokens,
            tokens=tokens, stored_tokens=self.c.used[fullest], bytes=self._h_nbytes(),
            tiers={"hot": {"tokens": hot_tokens, "bytes": self.c.hot_bytes},
                   "cold": {"tokens": cold_tokens, "bytes": cold_bytes}},
            layers=layer_rows, sequences=seqs, cold_groups=self.c.cold_groups,
            cold_groups_shared=self.c.shared_groups,
            hot_bytes=self.c.hot_bytes, cold_bytes=cold_bytes, metadata_bytes=self.c.meta_bytes,
            fp16_bytes_per_token=fp16_token * L,
            cold_bytes_per_token=(cold_bytes / cold_token_layers * L) if cold_token_layers else 0.0,
            compression_ratio=(fp16_token * cold_token_layers / cold_bytes) if cold_bytes else 0.0,
            cold_bits_per_value=(8.0 * cold_bytes / (cold_token_layers * 2 * self.num_kv_heads *
                                                     self.head_dim)) if cold_token_layers else 0.0,
            evicted_tokens=self.c.evicted)

    cdef dict _config_fields(self):
        fields = {"kind": "two-tier", "num_layers": self.num_layers,
                  "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim, "cold": self.cold,
                  "migration_batch": self.migration_batch, "group_size": self.group_size}
        if self.cold == "turbo":
            fields["turbo_bits"] = self.turbo_bits
        return fields

    cdef tuple _h_export(self, int slot):
        cdef int32_t skip
        cdef int64_t ng, hot_len
        meta = self._meta("two-tier")
        meta.update(self._config_fields())
        skips, lengths = [], []
        arrays = {}
        for l in range(self.num_layers):
            ng = rv_tt_export_groups(self.c, slot, l)
            blobs = np.empty(rv_tt_export_bytes(self.c, slot, l), dtype=np.uint8)
            sizes = np.empty(ng, dtype=np.int64)
            hot_len = rv_tt_len(self.c, slot, l) - rv_tt_cold_len(self.c, slot, l)
            hot_k = np.empty((hot_len, self.num_kv_heads, self.head_dim), dtype=np.float16)
            hot_v = np.empty_like(hot_k)
            rv_tt_export_layer(self.c, slot, l, <unsigned char *>cnp.PyArray_DATA(blobs),
                               <int64_t *>cnp.PyArray_DATA(sizes), &skip,
                               <uint16_t *>cnp.PyArray_DATA(hot_k), <uint16_t *>cnp.PyArray_DATA(hot_v))
            skips.append(skip if ng else 0)
            lengths.append(rv_tt_len(self.c, slot, l))
            arrays[f"cold.{l}"] = blobs
            arrays[f"cold_sizes.{l}"] = sizes
            arrays[f"hot_k.{l}"] = hot_k
            arrays[f"hot_v.{l}"] = hot_v
        meta["skip"] = skips
        meta["lengths"] = lengths
        return meta, arrays

    cdef int _h_import(self, dict meta, arrays) except -1:
        cdef int slot
        cdef int64_t G = self.migration_batch
        cdef int64_t off, size
        cdef const unsigned char *base
        lengths = _import_lengths(meta, self.num_layers)
        skips = meta.get("skip")
        if (not isinstance(skips, list) or len(skips) != self.num_layers or
                any(isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < G for x in skips)):
            raise ValueError(f"import_sequence: meta['skip'] must be {self.num_layers} ints in "
                             f"[0, {G}), got {skips!r}")
        layers = []
        for l in range(self.num_layers):
            try:
                sizes = arrays[f"cold_sizes.{l}"]
            except (KeyError, TypeError):
                raise ValueError(f"import_sequence: array 'cold_sizes.{l}' is missing") from None
            if not isinstance(sizes, np.ndarray) or sizes.dtype != np.int64 or sizes.ndim != 1:
                raise ValueError(f"import_sequence: 'cold_sizes.{l}' must be a 1-d int64 array")
            sizes = np.ascontiguousarray(sizes)
            blobs = _import_array(arrays, f"cold.{l}", (int(sizes.sum()) if len(sizes) else 0,),
                                  np.dtype(np.uint8))
            ng = len(sizes)
            hot_len = lengths[l] - (ng * G - skips[l])
            if ng == 0 and skips[l]:
                raise ValueError(f"import_sequence: layer {l} skips {skips[l]} tokens of no cold group")
            if hot_len < 0:
                raise ValueError(f"import_sequence: layer {l}: length {lengths[l]} is shorter than its "
                                 f"{ng} cold groups of {G} tokens")
            shape = (hot_len, self.num_kv_heads, self.head_dim)
            hot_k = _import_array(arrays, f"hot_k.{l}", shape, _F16)
            hot_v = _import_array(arrays, f"hot_v.{l}", shape, _F16)
            off = 0
            base = <const unsigned char *>cnp.PyArray_DATA(blobs)
            for g in range(ng):
                size = sizes[g]
                if size <= 0 or size > blobs.shape[0] - off or rv_tt_validate_blob(self.c, base + off, size) != 0:
                    raise ValueError(f"import_sequence: cold group {g} of layer {l} is malformed "
                                     f"({size} bytes)")
                off += size
            layers.append((blobs, sizes, hot_k, hot_v, hot_len))
        for l in range(self.num_layers):
            if self.c.used[l] + lengths[l] > self.max_tokens:
                raise KVCacheFull(f"import_sequence: {lengths[l]} tokens do not fit layer {l} "
                                  f"({self.max_tokens - self.c.used[l]} free of {self.max_tokens}); "
                                  f"nothing was written")
        slot = self._h_add()
        try:
            for l, (blobs, sizes, hot_k, hot_v, hot_len) in enumerate(layers):
                _check_status(rv_tt_import_layer(
                    self.c, slot, l, <const unsigned char *>cnp.PyArray_DATA(blobs),
                    <const int64_t *>cnp.PyArray_DATA(sizes), len(sizes), skips[l],
                    <const uint16_t *>cnp.PyArray_DATA(hot_k), <const uint16_t *>cnp.PyArray_DATA(hot_v),
                    hot_len), "import_sequence")
        except BaseException:
            rv_tt_release(self.c, slot)
            raise
        return slot

    cdef int _h_close(self) except -1:
        rv_tt_destroy(self.c)
        self.c = NULL
        return 0

    def __repr__(self):
        if self._closed:
            return "<ruvpy.TwoTierKVCache (closed)>"
        return (f"<ruvpy.TwoTierKVCache {self.num_layers} layers x {self.num_kv_heads} kv heads x "
                f"{self.head_dim}, hot {self.hot_tokens} fp16 + cold {self.cold}, "
                f"{len(self._slot_of)} sequences>")
