# cython: language_level=3
# distutils: define_macros=NPY_NO_DEPRECATED_API=NPY_1_7_API_VERSION
"""ruvpy's KV caches: every layer of many sequences, attended in place.

- `PagedKVCache`: one preallocated pool of fixed-size fp16/fp32 blocks, per-sequence block
  tables, reference-counted blocks, copy-on-write forks (csrc/kvcache/rv_paged.c).
- `TwoTierKVCache`: an fp16 hot tail of the most recent tokens and a cold store of packed
  quantized groups in one of the codec table's formats (csrc/kvcache/rv_twotier.c,
  rv_codec.h).
- `AttentionPlan` (cache.plan(...)): one step's attention over a cache, converted and
  validated once; each layer's call then appends and attends in one C call.

Both caches attend through ruvpy's one attention scheduler (csrc/attention/rv_attention.c),
their storage being one more KV source. This module is the thin, validating face: it
converts the arguments (scalars and ids first, arrays last, pointers right after validating
them) and calls C; the eviction policy is C's (rv_tt_make_room), the stats and the export
format are plain Python (ruvpy.kvstats, ruvpy.kvexport). Calls on one cache are serialised
by a lock (attention runs without the GIL).
"""
import math
import weakref
from operator import index as _index

import numpy as np

cimport numpy as cnp
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from cpython.exc cimport PyErr_CheckSignals
from cpython.pythread cimport (PyThread_type_lock, PyThread_allocate_lock, PyThread_free_lock,
                               PyThread_acquire_lock, PyThread_release_lock, NOWAIT_LOCK,
                               PyLockStatus, PY_LOCK_ACQUIRED)
from libc.stdint cimport int32_t, int64_t, uint16_t
from libc.string cimport memset

from ruvpy._kernels cimport active_ops, num_threads, team_check, team_precheck, raise_team_error
from ruvpy._openmp_helpers cimport rv_team_bind
from ruvpy._attention cimport (rv_kv_query, rv_kv_source, rv_attn_plan, rv_attn_plan_make,
                               rv_attn_run, rv_attn_reserve, thread_count, softmax_scale, elem_stride,
                               overlap)
from ruvpy._memory cimport BufferPool, ScratchSpace, rv_scratch, rv_scratch_fits
from ruvpy.c_ops cimport rv_ops

from ruvpy._kernels import (MAX_HEAD_DIM, MAX_GROUP_TOKENS, MAX_GROUP_VALUES, MAX_HOT_TOKENS, MAX_INT, TURBO_BITS,
                            TURBO_MAX_BITS)
from ruvpy import kvexport

rv_team_bind(team_check)   # this extension's regions check through the process's record
from ruvpy.kvstats import (KVCacheStats, PagedKVStats, TwoTierKVStats, paged_stats,
                           twotier_stats)

cdef extern from "pythread.h":
    PyLockStatus PyThread_acquire_lock_timed(PyThread_type_lock lock, long long microseconds,
                                             int intr_flag) nogil
    unsigned long PyThread_get_thread_ident() nogil

# how long a call waiting for another thread's call on the same cache sleeps without the GIL
# between looks at pending signals (so Ctrl-C gets through a wait of any length)
cdef long long _LOCK_POLL_US = 20000

cnp.import_array()

__all__ = ["PagedKVCache", "TwoTierKVCache", "AttentionPlan", "KVCacheFull", "KVCacheStats",
           "PagedKVStats", "TwoTierKVStats", "COLD_FORMATS"]

_F32 = np.dtype(np.float32)
_F16 = np.dtype(np.float16)
# the codec table's formats, in its order (csrc/kvcache/rv_codec.c)
COLD_FORMATS = tuple([rv_codecs[i].name.decode() for i in range(RV_CODEC_COUNT)])
_POLICIES = ("error", "evict-oldest")
# K/V screened for unstorable values without the GIL from this many values on: a decode step's
# few hundred take less time than releasing and retaking it (twice per layer, each a chance
# for another thread to hold it for a switch interval)
cdef int64_t _SCREEN_WITHOUT_GIL = 1 << 16


def _mapped_bytes():
    """Bytes the caches hold in mappings of their own (a paged pool of 4 MiB or more, a
    two-tier cache's cold-group slabs): malloc's counts (mallinfo2) do not see them."""
    return rv_kv_mapped_bytes()


class KVCacheFull(MemoryError):
    """The KV cache has no room for the tokens asked for; nothing was written."""


cdef inline int _check_status(int rc, str what) except -1:
    if rc == RV_OK:
        return 0
    if rc == RV_ENOMEM:
        raise MemoryError(f"{what}: out of memory")
    if rc == RV_EFULL:
        raise KVCacheFull(f"{what}: the cache is full")
    if rc == RV_ETHREAD:
        raise_team_error(what)
    raise ValueError(f"{what}: invalid arguments (status {rc})")


cdef int _positive_int(object value, str name) except -1:
    if type(value) is int and 0 < <object>value <= MAX_INT:
        return <int>value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    v = _index(value)     # an exact int: an int subclass's own comparisons are not called
    if v <= 0 or v > MAX_INT:
        raise ValueError(f"{name} must be a positive int (< 2**31), got {v}")
    return <int>v


cdef int64_t _token_count(object value, str what) except -1:
    """A token count as int64: an int >= 0 (numpy ints too; not bool, float or str)."""
    if type(value) is int and 0 <= <object>value <= MAX_INT:
        return <int64_t>value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what}: token counts must be ints, got {type(value).__name__} {value!r}")
    v = _index(value)
    if v < 0:
        raise ValueError(f"{what}: token counts must be >= 0, got {v}")
    if v > MAX_INT:
        raise ValueError(f"{what}: a token count of {v} is more than any cache holds")
    return v


cdef object _seq_id(object seq):
    """A sequence id as a plain int. Called before the cache's lock is taken: converting an
    int subclass or a numpy int, like hashing or comparing one, may run Python code, which
    must not run while the lock is held (it may call back into the cache, or into a Runtime
    whose other thread holds the Runtime's lock and waits for this cache's). Ids are ints:
    anything else is an unknown id (KeyError)."""
    if type(seq) is int:
        return seq
    if isinstance(seq, (int, np.integer)) and not isinstance(seq, (bool, np.bool_)):
        return _index(seq)        # an exact int; an int subclass's own methods are not called
    raise KeyError(f"unknown sequence id {seq!r} (sequence ids are ints)")


cdef list _id_list(object seqs, str what):
    """seqs (any iterable of ids) as a new list of plain ints without repeats; before the lock
    (iterating a caller's object runs its code; a copy cannot change under the lock)."""
    if type(seqs) is list or type(seqs) is tuple:
        ids = list(seqs)
    else:
        try:
            ids = list(seqs)
        except TypeError:
            raise TypeError(f"{what}: seqs must be a sequence of ids, got {type(seqs).__name__}") from None
    for i in range(len(ids)):
        if type(ids[i]) is not int:
            ids[i] = _seq_id(ids[i])
    if len(ids) > 1 and len(set(ids)) != len(ids):
        raise ValueError(f"{what}: sequence ids repeat: {ids}")
    return ids


cdef list _count_list(object n_tokens, Py_ssize_t nseq, str what):
    """n_tokens as a new list of plain ints >= 0, one per sequence; before the lock."""
    try:
        items = list(n_tokens)
    except TypeError:
        raise TypeError(f"{what}: n_tokens must be a sequence of ints") from None
    counts = [_token_count(n, what) for n in items]
    if len(counts) != nseq:
        raise ValueError(f"{what}: {nseq} sequences but {len(counts)} token counts")
    return counts


# ---------------------------------------------------------------------------------------
# array checks (validate, then take pointers right away)
# ---------------------------------------------------------------------------------------

cdef inline int _native_type(cnp.ndarray a):
    """a's numpy type number for the fast paths, -1 unless its bytes are in this machine's
    order: a '>f4' array has NPY_FLOAT32's number too, and C would read it as native floats
    (the slow paths compare whole dtypes, which refuse it by name)"""
    return cnp.PyArray_TYPE(a) if cnp.PyArray_ISNOTSWAPPED(a) else -1


cdef inline bint _rows_layout(cnp.ndarray a):
    """3-D, last axis contiguous, every stride a whole number of elements (queries, outputs)"""
    cdef Py_ssize_t item = cnp.PyArray_ITEMSIZE(a)
    cdef int i
    if cnp.PyArray_NDIM(a) != 3:
        return False
    if a.shape[2] > 1 and a.strides[2] != item:
        return False
    for i in range(3):
        if a.shape[i] > 1 and a.strides[i] % item != 0:
            return False
    return True


cdef bint _same_view(cnp.ndarray a, cnp.ndarray b):
    return cnp.PyArray_DATA(a) == cnp.PyArray_DATA(b) and a.strides[0] == b.strides[0] and \
        a.strides[1] == b.strides[1] and a.strides[2] == b.strides[2]


cdef cnp.ndarray _plain(object x, str name):
    """x as an exact numpy array: a subclass is viewed as a plain ndarray (at C level, running
    none of its code), so no Python-level property (shape, dtype, flags ...) can report other
    than what C then reads."""
    if type(x) is np.ndarray:
        return <cnp.ndarray>x
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(x).__name__}")
    return <cnp.ndarray>np.asarray(x)


cdef cnp.ndarray _q_rows(object q, int head_dim, int num_kv_heads):
    """q as an array the scheduler reads in place (strided tokens and heads are fine; a last
    axis that is not contiguous is copied)."""
    cdef cnp.ndarray a
    if type(q) is np.ndarray:
        a = <cnp.ndarray>q
        if _native_type(a) == cnp.NPY_FLOAT32 and cnp.PyArray_NDIM(a) == 3 and a.shape[2] == head_dim and \
                a.shape[1] > 0 and a.shape[1] % num_kv_heads == 0:
            return a if _rows_layout(a) else np.ascontiguousarray(a)
    a = _plain(q, "q")
    if a.dtype != _F32:
        raise TypeError(f"q must be float32, got {a.dtype}")
    if a.ndim != 3 or a.shape[2] != head_dim or a.shape[1] == 0 or a.shape[1] % num_kv_heads:
        raise ValueError(f"q must have shape [q_len, num_heads, head_dim={head_dim}] with "
                         f"num_heads a multiple of num_kv_heads={num_kv_heads}, got {(<object>a).shape}")
    return a if _rows_layout(a) else np.ascontiguousarray(a)


cdef cnp.ndarray _out_rows(object out, tuple shape, cnp.ndarray q, cnp.ndarray k, cnp.ndarray v):
    """out as a writeable float32 array of `shape` overlapping none of q, k, v (or q itself,
    in place); None: a new array."""
    cdef cnp.ndarray o
    if out is None:
        return np.empty(shape, dtype=np.float32)
    if type(out) is np.ndarray and _native_type(<cnp.ndarray>out) == cnp.NPY_FLOAT32 and \
            cnp.PyArray_NDIM(<cnp.ndarray>out) == 3:
        o = <cnp.ndarray>out
        if o.shape[0] == q.shape[0] and o.shape[1] == q.shape[1] and o.shape[2] == q.shape[2] and \
                cnp.PyArray_ISWRITEABLE(o) and _rows_layout(o):
            if (k is not None and overlap(o, k)) or (v is not None and overlap(o, v)):
                raise ValueError("out overlaps k or v")
            if overlap(o, q) and not _same_view(o, q):
                raise ValueError("out overlaps q without being q itself (in place is fine)")
            return o
    out = o = _plain(out, "out")
    if out.dtype != _F32:
        raise TypeError(f"out must be a float32 numpy array, got {out.dtype}")
    if out.shape != shape:
        raise ValueError(f"out must have shape {shape}, got {out.shape}")
    if not o.flags.writeable or not _rows_layout(o):
        raise ValueError("out must be writeable, with a contiguous last axis and whole-element strides")
    if (k is not None and overlap(o, k)) or (v is not None and overlap(o, v)):
        raise ValueError("out overlaps k or v")
    if overlap(o, q) and not _same_view(o, q):
        raise ValueError("out overlaps q without being q itself (in place is fine)")
    return o


cdef class _KVCache:
    """What both caches share: sequence ids, argument checks, transactions, the lock."""

    cdef readonly int num_layers
    cdef readonly int num_kv_heads
    cdef readonly int head_dim
    cdef readonly int64_t max_tokens
    cdef dict _slot_of           # sequence id -> C slot
    cdef int64_t _next_id
    cdef set _txn                # ids inside an open transaction
    cdef dict _txn_owner         # id -> weakref to the plan whose transaction holds it
                                 # (plan(..., begin=True): only that plan closes it)
    cdef PyThread_type_lock _mutex
    cdef unsigned long _owner    # the thread inside a call (0: none); read under the GIL
    cdef bint _closed
    cdef bint _initialized
    cdef bint _stores_f16        # K/V are kept as float16 (a paged cache of float32: not)

    def __cinit__(self, *args, **kwargs):
        self._mutex = PyThread_allocate_lock()
        if self._mutex == NULL:
            raise MemoryError("KV cache: cannot allocate its lock")
        self._slot_of = {}
        self._txn = set()
        self._txn_owner = {}
        self._next_id = 0
        self._closed = True      # until the subclass's C cache exists
        self._stores_f16 = True

    def __dealloc__(self):
        if self._mutex != NULL:
            PyThread_free_lock(self._mutex)

    cdef int _refuse_reinit(self) except -1:
        if self._initialized:
            raise RuntimeError(f"this {type(self).__name__} is already initialized (a second "
                               f"__init__ would leak its C cache or leave its fields out of step "
                               f"with it); make a new one")
        return 0

    cdef tuple _check_shape(self, num_layers, num_kv_heads, head_dim, max_tokens):
        """(num_layers, num_kv_heads, head_dim, max_tokens) checked, into locals: the fields
        are set only once the C cache exists (_set_shape)."""
        layers = _positive_int(num_layers, "num_layers")
        kv_heads = _positive_int(num_kv_heads, "num_kv_heads")
        dim = _positive_int(head_dim, "head_dim")
        if dim > MAX_HEAD_DIM:
            raise ValueError(f"head_dim must be at most {MAX_HEAD_DIM}, got {head_dim}")
        if isinstance(max_tokens, (bool, np.bool_)) or not isinstance(max_tokens, (int, np.integer)):
            raise TypeError(f"max_tokens must be an int, got {type(max_tokens).__name__}")
        tokens = int(max_tokens)
        if tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {tokens}")
        if tokens >= 2**63:
            raise ValueError(f"max_tokens must be below 2**63, got {tokens}")
        return layers, kv_heads, dim, tokens

    cdef void _set_shape(self, tuple shape) noexcept:
        self.num_layers, self.num_kv_heads, self.head_dim, self.max_tokens = shape

    # ---- locking: every public method holds the cache's lock ----
    cdef int _lock(self) except -1:
        """Take the lock. Arguments are converted before it, so only code Python itself runs
        inside a call (a finalizer, a trace or profile hook) can call back into the cache
        from the thread holding the lock: that raises RuntimeError (the lock is not
        re-entrant and waiting would never end). Waiting for another thread's call sleeps
        without the GIL in short slices, checking for signals (Ctrl-C) between them."""
        cdef unsigned long me = PyThread_get_thread_ident()
        cdef PyLockStatus got
        if PyThread_acquire_lock(self._mutex, NOWAIT_LOCK):
            self._owner = me
            return 0
        if self._owner == me:
            raise RuntimeError(f"a {type(self).__name__} call re-entered the cache from code "
                               f"run inside a call of this thread that holds it (a finalizer, "
                               f"or a trace or profile hook); refused: waiting would never end")
        while True:
            with nogil:
                got = PyThread_acquire_lock_timed(self._mutex, _LOCK_POLL_US, 0)
            if got == PY_LOCK_ACQUIRED:
                self._owner = me
                return 0
            PyErr_CheckSignals()      # raises what a signal handler raised (KeyboardInterrupt)

    cdef int _enter(self) except -1:
        self._lock()
        if self._closed:
            self._leave()
            raise RuntimeError(f"this {type(self).__name__} is closed")
        return 0

    cdef inline void _leave(self) noexcept:
        self._owner = 0
        PyThread_release_lock(self._mutex)

    # ---- argument checks ----
    # Every public method converts its scalars and ids (_seq_id, _layer, _token_count,
    # _id_list, _count_list, softmax_scale, thread_count) BEFORE it takes the lock, and under
    # the lock only looks plain ints up: no caller's code (__index__, __float__, __hash__,
    # __eq__, __iter__ ...) runs while the lock is held. Such code may call back into this
    # cache, or into the Runtime driving it, whose other thread may hold the Runtime's lock
    # while it waits for this one. Arrays are checked under the lock (viewed as exact
    # ndarrays at C level, they run no caller's code), their pointers taken right after.
    cdef int _slot(self, seq) except -1:
        """the C slot of `seq`, a plain int id (under the lock)"""
        slot = self._slot_of.get(seq)
        if slot is None:
            raise KeyError(f"unknown sequence id {seq!r} (live: {sorted(self._slot_of)[:16]})")
        return <int>slot

    cdef int _layer(self, layer) except -1:
        """layer as a C int, checked against the cache's layers (before the lock)"""
        if type(layer) is int:
            if 0 <= <object>layer < self.num_layers:
                return <int>layer
        elif isinstance(layer, (bool, np.bool_)) or not isinstance(layer, (int, np.integer)):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        else:
            layer = _index(layer)
            if 0 <= layer < self.num_layers:
                return <int>layer
        raise ValueError(f"layer {layer} is out of range (the cache has {self.num_layers} layers)")

    cdef object _kv_array(self, x, str name):
        cdef cnp.ndarray a
        cdef int t
        if type(x) is np.ndarray:       # the usual case, checked at C level
            a = <cnp.ndarray>x
            t = _native_type(a)
            if (t == cnp.NPY_FLOAT32 or t == cnp.NPY_FLOAT16) and cnp.PyArray_NDIM(a) == 3 and \
                    a.shape[1] == self.num_kv_heads and a.shape[2] == self.head_dim and \
                    cnp.PyArray_IS_C_CONTIGUOUS(a):
                return x
        x = _plain(x, name)
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
        if (<cnp.ndarray>k).shape[0] != (<cnp.ndarray>v).shape[0] or \
                cnp.PyArray_TYPE(<cnp.ndarray>k) != cnp.PyArray_TYPE(<cnp.ndarray>v):
            raise ValueError(f"k and v must have the same shape and dtype, got k {k.shape} "
                             f"{k.dtype} and v {v.shape} {v.dtype}")
        self._check_storable(k, "k")
        self._check_storable(v, "v")
        return k, v

    cdef int _check_storable(self, cnp.ndarray x, str name) except -1:
        """ValueError naming the first value of x (C-contiguous, from _kv_array) the cache
        cannot keep: a NaN or an infinity, or beyond float16's range where it stores float16
        (it would be infinite there, and a cold group's scales with it)"""
        cdef int64_t i
        cdef const void *data = cnp.PyArray_DATA(x)
        cdef int64_t n = cnp.PyArray_SIZE(x)
        cdef int src_is_f16 = cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT16
        cdef int to_f16 = self._stores_f16
        if n < _SCREEN_WITHOUT_GIL:
            i = rv_first_unstorable(data, n, src_is_f16, to_f16)
        else:
            with nogil:
                i = rv_first_unstorable(data, n, src_is_f16, to_f16)
        if i < 0:
            return 0
        per_token = self.num_kv_heads * self.head_dim
        where = f"{name}[{i // per_token}, {(i // self.head_dim) % self.num_kv_heads}, {i % self.head_dim}]"
        value = float(x.reshape(-1)[i])
        if math.isfinite(value):
            raise ValueError(f"{where} = {value!r} is beyond float16's range: this cache keeps K/V as "
                             f"float16, whose largest value is 65504")
        raise ValueError(f"{where} is {value!r}: K/V must be finite")

    cdef int _check_imported(self, cnp.ndarray x, str name) except -1:
        """_check_storable for an imported array (named as in the export): a crafted file
        may hold what append refuses"""
        try:
            self._check_storable(x, name)
        except ValueError as exc:
            raise ValueError(f"import_sequence: {exc}") from None
        return 0

    cdef int _check_known(self, list ids) except -1:
        """KeyError unless every id of `ids` (plain ints, from _id_list) is live (under the lock)"""
        for s in ids:
            self._slot(s)
        return 0

    # ---- what each cache implements ----
    cdef int _h_add(self) except -1:
        raise NotImplementedError
    cdef int _h_fork(self, int slot) except -1:
        raise NotImplementedError
    cdef int _h_release(self, int slot) except -1:
        raise NotImplementedError
    cdef int64_t _h_len(self, int slot, int layer) except -1:
        raise NotImplementedError
    cdef int _h_room(self, object ids, const int *slots, const int64_t *n, int nseq, int layer) except -1:
        """Make sure appending n[i] tokens to slots[i] in `layer` (< 0: every layer) fits:
        raise KVCacheFull (or evict, by the cache's policy) before anything is written."""
        raise NotImplementedError
    cdef int _h_append(self, int slot, int layer, const void *k, const void *v, int64_t n,
                       int dtype) except -1:
        raise NotImplementedError
    cdef void _h_source(self, int layer, int num_heads, rv_kv_source *src) noexcept:
        pass
    cdef int _h_begin(self, int slot) except -1:
        raise NotImplementedError
    cdef int _h_commit(self, int slot) except -1:
        raise NotImplementedError
    cdef int _h_rollback(self, int slot) except -1:
        raise NotImplementedError
    cdef int _h_truncate(self, int slot, int64_t n) except -1:
        raise NotImplementedError
    cdef int _h_read(self, int slot, int layer, k, v) except -1:
        raise NotImplementedError
    cdef size_t _h_nbytes(self):
        return 0
    cdef object _h_stats(self):
        raise NotImplementedError
    cdef tuple _h_export(self, int slot):
        raise NotImplementedError
    cdef object _h_unpack(self, meta, arrays):
        """import_sequence's meta and arrays read and checked (before the lock): what
        _h_import takes"""
        raise NotImplementedError
    cdef int _h_import(self, unpacked) except -1:
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

    cdef int _check_unowned(self, object ids, str what, object plan=None) except -1:
        """Refuse sequences inside the transaction of a live plan other than `plan`: those of
        ids, or (ids None: a new transaction on an evicting cache) any, since inside
        transactions any sequence may give up tokens for another (rv_tt_make_room). A Runtime
        step's sequences change only through its plan, or the runtime's count of them and the
        cache's disagree (a raw commit mid-step kept half a step)."""
        if not self._txn_owner:
            return 0
        held = []
        for s in (self._txn_owner if ids is None else ids):
            ref = self._txn_owner.get(s)
            if ref is not None and ref() is not None and ref() is not plan:
                held.append(s)
        if held:
            raise RuntimeError(
                f"{what}: sequences {held} are inside the transaction of an AttentionPlan "
                f"(plan(..., begin=True), as a Runtime step opens); " +
                ("only that plan changes them until its commit() or rollback()" if ids is not None
                 else "with policy 'evict-oldest' another transaction could take their tokens, "
                      "so none opens until it closes"))
        return 0

    cdef int _check_no_rival_transaction(self, str what) except -1:
        if getattr(self, "policy", None) == "evict-oldest":
            self._check_unowned(None, what)
        return 0

    cdef int _no_open_transaction(self, str what) except -1:
        if self._txn:
            raise RuntimeError(f"cannot {what} while a transaction is open on sequences "
                               f"{sorted(self._txn)} (commit or roll it back first)")
        return 0

    def fork(self, seq):
        """A new sequence holding the same tokens as `seq` in every layer, sharing its
        storage; writes to either copy what they change (copy-on-write)."""
        seq = _seq_id(seq)
        self._enter()
        try:
            slot = self._slot(seq)
            self._no_open_transaction("fork")
            return self._register(self._h_fork(slot))
        finally:
            self._leave()

    def free(self, seq):
        """Drop a sequence and give its storage back."""
        seq = _seq_id(seq)
        self._enter()
        try:
            slot = self._slot(seq)
            self._no_open_transaction("free a sequence")
            self._h_release(slot)
            del self._slot_of[seq]
        finally:
            self._leave()

    def truncate(self, seq, n):
        """Keep the first n tokens of `seq` in every layer (n >= its length: nothing
        changes). Storage past them goes back: whole blocks / cold groups; a shared block or
        cold group the cut falls in stays shared (the next write copies a block; a cold group
        keeps serving the tokens before the cut). Refused while a transaction is open."""
        cdef int slot
        cdef int64_t keep = _token_count(n, "truncate")
        seq = _seq_id(seq)
        self._enter()
        try:
            slot = self._slot(seq)
            self._no_open_transaction("truncate a sequence")
            self._h_truncate(slot, keep)
        finally:
            self._leave()

    def seq_len(self, seq, layer=0):
        """Tokens `seq` holds in `layer`."""
        cdef int lay = self._layer(layer)
        seq = _seq_id(seq)
        self._enter()
        try:
            return self._h_len(self._slot(seq), lay)
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
        float16, finite and (where the cache keeps float16) |x| <= 65504: ValueError names the
        first value that is not. KVCacheFull (or an eviction, by policy) before anything is
        written."""
        cdef int slot
        cdef int lay = self._layer(layer)
        cdef int64_t n
        seq = _seq_id(seq)
        self._enter()
        try:
            slot = self._slot(seq)
            self._check_unowned([seq], "append")
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
        cdef _SeqArrays arr
        ids = _id_list(seqs, "reserve")
        counts = _count_list(n_tokens, len(ids), "reserve")
        self._enter()
        try:
            self._check_known(ids)
            self._check_unowned(ids, "reserve")
            arr = _SeqArrays(self, ids, counts)
            self._h_room(ids, arr.slots, arr.counts, arr.n, -1)
        finally:
            self._leave()

    # ---- attention ----
    def attention(self, seq, layer, q, *, causal=True, scale=None, out=None, threads=None):
        """softmax(scale q K^T [+ causal mask]) V over every token of `seq` in `layer`.
        q [q_len, num_heads, head_dim] float32 (tokens and heads may be strided); with causal
        masking query i sits at position kv_len - q_len + i. Returns out [q_len, num_heads,
        head_dim] float32. threads: kernel threads (None: ruvpy.get_num_threads())."""
        cdef rv_kv_query query
        cdef rv_kv_source src
        cdef int slot, rc
        cdef bint is_causal = bool(causal)
        cdef int nthreads = thread_count(threads)
        cdef float sc = softmax_scale(scale, self.head_dim)
        cdef int lay = self._layer(layer)
        cdef int64_t kv_len
        cdef cnp.ndarray qa, oa
        seq = _seq_id(seq)
        self._enter()
        try:
            slot = self._slot(seq)
            qa = _q_rows(q, self.head_dim, self.num_kv_heads)
            oa = _out_rows(out, (<object>qa).shape, qa, None, None)
            kv_len = self._h_len(slot, lay)
            if kv_len == 0:
                raise ValueError(f"attention on an empty sequence: sequence {seq} holds no tokens "
                                 f"in layer {lay}")
            if is_causal and qa.shape[0] > kv_len:
                raise ValueError(f"causal attention with q_len {qa.shape[0]} > kv_len {kv_len} "
                                 f"(sequence {seq}, layer {lay}; q shape {(<object>qa).shape})")
            if qa.shape[0] == 0:
                return oa
            query.seq = slot
            query.q_len = qa.shape[0]
            query.kv_len = kv_len
            query.q = <const float *>cnp.PyArray_DATA(qa)
            query.q_tok = elem_stride(qa, 0)
            query.q_head = elem_stride(qa, 1)
            query.out = <float *>cnp.PyArray_DATA(oa)
            query.o_tok = elem_stride(oa, 0)
            query.o_head = elem_stride(oa, 1)
            self._h_source(lay, qa.shape[1], &src)
            with nogil:
                rc = _attend_now(&src, &query, 1, sc, is_causal, nthreads)
            _check_status(rc, "attention")
            return oa
        finally:
            self._leave()

    def append_attend(self, layer, seqs, n_tokens, q, k, v, *, out=None, causal=True, scale=None,
                      threads=None):
        """One layer of a model step: append each sequence's new K/V rows, then attend every
        (sequence, kv head) in one parallel call. q [sum(n), num_heads, head_dim] float32,
        k, v [sum(n), num_kv_heads, head_dim] float32/float16: the concatenation over seqs
        in order. Everything is validated (and room made) before anything is written.
        (A step of many layers: plan it once with cache.plan(...).)"""
        cdef AttentionPlan plan
        if not isinstance(q, np.ndarray):
            raise TypeError(f"q must be a numpy array, got {type(q).__name__}")
        if q.ndim != 3:
            raise ValueError(f"q must have shape [q_len, num_heads, head_dim={self.head_dim}], "
                             f"got {q.shape}")
        plan = self.plan(seqs, n_tokens, num_heads=q.shape[1], causal=causal, threads=threads,
                         _what="append_attend")
        return plan._attend(layer, q, k, v, out, scale)

    def plan(self, seqs, n_tokens, *, num_heads, causal=True, threads=None, scratch=None,
             begin=False, cover=(), _what="plan"):
        """An AttentionPlan: one step of n_tokens[i] new tokens for seqs[i], num_heads query
        heads, planned once (ids resolved, counts checked, the scheduler's work sized). Its
        attend(layer, q, k, v, out=...) then appends and attends each layer in one C call.
        scratch: a ScratchSpace for the kernels' work buffers, used when it is large enough
        (plan.bound; plan.scratch_needed says what is); else a per-thread buffer of the
        scheduler's own. begin=True: also open a transaction on its sequences (as begin) and
        then make room for the step inside it in every layer (as reserve: what eviction takes
        comes back at a rollback), all or nothing; plan.commit() or plan.rollback() closes it
        -- one validated call for the start of a model step. The transaction is the plan's:
        until it closes, commit, rollback, append, reserve and plan on its sequences raise
        RuntimeError (a plan dropped unclosed gives them back to cache.commit / rollback).
        cover: more sequences the transaction covers (inside a transaction only its
        sequences may give up tokens)."""
        cdef AttentionPlan plan = AttentionPlan.__new__(AttentionPlan)
        cdef int heads, i
        plan.causal = bool(causal)
        plan.threads = thread_count(threads)
        heads = _positive_int(num_heads, "num_heads")
        if heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if scratch is not None and not isinstance(scratch, ScratchSpace):
            raise TypeError(f"scratch must be a ruvpy.ScratchSpace, got {type(scratch).__name__}")
        begin = bool(begin)
        ids = _id_list(seqs, _what)
        counts = _count_list(n_tokens, len(ids), _what)
        others = _id_list(cover, _what) if begin else []
        self._enter()
        try:
            plan._resolve(self, ids, counts, heads, _what)
            self._check_unowned(ids, _what)
            if begin:
                self._check_known(others)
                self._check_unowned(others, _what)
                mine = set(plan.seqs)
                txn = list(plan.seqs) + [s for s in others if s not in mine]
                txn_ids = tuple(txn)             # (allocated before anything is begun)
                owner = weakref.ref(plan)
                self._check_no_rival_transaction(_what)
                again = [s for s in txn if s in self._txn]
                if again:
                    raise ValueError(f"begin: sequences {again} are already inside a transaction")
                slots = [self._slot_of[s] for s in txn]
                for i in range(len(slots)):
                    try:
                        self._h_begin(slots[i])
                    except BaseException:
                        for j in range(i):
                            self._h_rollback(slots[j])   # as they were (a commit could migrate)
                        raise
                try:
                    self._txn.update(txn)
                    for s in txn:
                        self._txn_owner[s] = owner
                    plan._claim = owner
                    plan.txn = txn_ids
                except BaseException:            # (a MemoryError): as if never begun
                    for s in txn:
                        self._txn.discard(s)
                        self._txn_owner.pop(s, None)
                    for slot in slots:
                        self._h_rollback(slot)   # as they were
                    raise
                try:
                    self._h_room(plan.seqs, plan.slots, plan.counts, plan.nseq, -1)
                    plan._measure()              # (its ValueError too: no transaction left open)
                except BaseException:
                    for slot in slots:
                        self._h_rollback(slot)
                    self._txn.difference_update(txn)
                    for s in txn:
                        del self._txn_owner[s]
                    plan.txn = ()
                    raise
            else:
                plan._measure()
        finally:
            self._leave()
        if scratch is not None and rv_scratch_fits(&(<ScratchSpace>scratch).view, plan.cplan.shared_bytes,
                                                   plan.cplan.thread_bytes, plan.cplan.nthreads):
            plan.scratch = scratch
        return plan

    def scratch_for(self, num_heads, q_lens, kv_lens, *, causal=True, threads=None):
        """(shared_bytes, bytes_per_thread, team) of the scratch the attention scheduler
        needs for queries of q_lens[i] tokens over kv_lens[i] keys (lengths after the
        step's tokens), as a plan would size them: arithmetic, no sequence is needed."""
        cdef rv_attn_plan plan
        cdef rv_kv_source src
        cdef rv_kv_query *queries
        cdef int heads, nthreads, i, n, rc
        cdef bint is_causal = bool(causal)
        nthreads = thread_count(threads)
        heads = _positive_int(num_heads, "num_heads")
        qs = [_token_count(x, "scratch_for") for x in q_lens]
        ks = [_token_count(x, "scratch_for") for x in kv_lens]
        if len(qs) != len(ks) or heads % self.num_kv_heads:
            raise ValueError("scratch_for: q_lens and kv_lens differ in length, or num_heads is not a "
                             "multiple of num_kv_heads")
        n = len(qs)
        queries = <rv_kv_query *>PyMem_Malloc(sizeof(rv_kv_query) * (n + 1))
        if queries == NULL:
            raise MemoryError("scratch_for: out of memory")
        try:
            memset(queries, 0, sizeof(rv_kv_query) * (n + 1))
            for i in range(n):
                queries[i].q_len = qs[i]
                queries[i].kv_len = max(ks[i], qs[i])
            self._enter()
            try:
                self._h_source(0, heads, &src)
                rc = rv_attn_plan_make(&plan, &src, queries, n, is_causal, nthreads)
            finally:
                self._leave()
            _check_status(rc, "scratch_for")
            return (plan.shared_bytes, plan.thread_bytes, plan.nthreads)
        finally:
            PyMem_Free(queries)

    # ---- transactions ----
    def in_transaction(self, seq):
        """Whether `seq` is inside an open transaction."""
        return seq in self._txn

    def begin(self, seqs):
        """Open a transaction on seqs: rollback() restores each of them, in every layer,
        exactly as it is now. fork(), free() and truncate() are refused until it is closed."""
        ids = _id_list(seqs, "begin")
        self._enter()
        try:
            self._check_known(ids)
            self._check_no_rival_transaction("begin")
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
                    self._h_rollback(self._slot_of[s])   # as they were
                raise
            self._txn.update(ids)
        finally:
            self._leave()

    cdef list _txn_list(self, list ids, str what):
        """ids (plain ints, from _id_list) checked live and inside the transaction (under the lock)"""
        self._check_known(ids)
        self._check_unowned(ids, what)
        outside = [s for s in ids if s not in self._txn]
        if outside:
            raise ValueError(f"{what}: sequences {outside} are not inside a transaction")
        return ids

    def commit(self, seqs):
        """Make the transaction's changes to seqs permanent."""
        ids = _id_list(seqs, "commit")
        self._enter()
        try:
            for s in self._txn_list(ids, "commit"):
                self._h_commit(self._slot_of[s])
                self._txn.discard(s)
                self._txn_owner.pop(s, None)      # (a plan dropped with it open)
        finally:
            self._leave()

    def rollback(self, seqs):
        """Restore seqs to exactly their state at begin()."""
        ids = _id_list(seqs, "rollback")
        self._enter()
        try:
            for s in self._txn_list(ids, "rollback"):
                self._h_rollback(self._slot_of[s])
                self._txn.discard(s)
                self._txn_owner.pop(s, None)
        finally:
            self._leave()

    # ---- inspection ----
    def get_kv(self, seq, layer):
        """(k, v): float32 copies [len, num_kv_heads, head_dim] of `seq` in `layer`, in
        append order (dequantized where stored quantized)."""
        cdef int lay = self._layer(layer)
        seq = _seq_id(seq)
        self._enter()
        try:
            slot = self._slot(seq)
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

    @property
    def pooled_bytes(self):
        """Of nbytes: buffers taken from an attached BufferPool (its stats count them as
        outstanding)."""
        return 0

    def stats(self):
        """A KVCacheStats snapshot (see the stats class's docstring)."""
        self._enter()
        try:
            return self._h_stats()
        finally:
            self._leave()

    def export_sequence(self, seq):
        """(meta, arrays): `seq`'s K/V in the stored format (quantized tiers stay codes).
        meta is JSON-able; arrays maps names to numpy arrays (ruvpy.kvexport)."""
        seq = _seq_id(seq)
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
        # the caller's meta and arrays (a mapping's __getitem__, a dict subclass's get ... run
        # their code) are read and checked against the configuration before the lock
        unpacked = self._h_unpack(meta, arrays)
        self._enter()
        try:
            return self._register(self._h_import(unpacked))
        finally:
            self._leave()

    cdef dict _config_fields(self):
        raise NotImplementedError

    def close(self):
        """Free the cache's memory now. Idempotent; afterwards every method raises
        RuntimeError."""
        self._lock()
        try:
            if not self._closed:
                self._h_close()
                self._closed = True
                self._slot_of = {}
                self._txn = set()
                self._txn_owner = {}
        finally:
            self._leave()

    @property
    def closed(self):
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


cdef int _attend_now(const rv_kv_source *src, const rv_kv_query *queries, int nq, float scale,
                     bint causal, int nthreads) noexcept nogil:
    """plan and run one call in the scheduler's per-thread scratch"""
    cdef rv_attn_plan plan
    cdef int rc = rv_attn_plan_make(&plan, src, queries, nq, causal, nthreads)
    if rc != RV_OK:
        return rc
    return rv_attn_run(&plan, src, queries, nq, scale, causal, active_ops(), NULL)


cdef class _SeqArrays:
    """Slots and counts of some sequences as C arrays (freed with the object)."""
    cdef int *slots
    cdef int64_t *counts
    cdef int n

    def __cinit__(self, _KVCache cache not None, list ids not None, list counts not None):
        cdef int i
        self.n = len(ids)
        self.slots = <int *>PyMem_Malloc(sizeof(int) * (self.n + 1))
        self.counts = <int64_t *>PyMem_Malloc(sizeof(int64_t) * (self.n + 1))
        if self.slots == NULL or self.counts == NULL:
            raise MemoryError("out of memory")
        for i in range(self.n):
            self.slots[i] = cache._slot_of[ids[i]]
            self.counts[i] = counts[i]

    def __dealloc__(self):
        PyMem_Free(self.slots)
        PyMem_Free(self.counts)


cdef class AttentionPlan:
    """One step's attention over a KV cache, planned once (made by cache.plan(seqs, n_tokens,
    num_heads=...)): the sequence ids resolved to the cache's slots, the token counts
    checked, each sequence's rows of q/k/v located, and the attention scheduler's work sized
    for the step (its team, tasks, shared and per-thread scratch). Then, per layer,
    attend(layer, q, k, v, out=...) checks only what a layer call can change (the arrays, and
    the sequences' lengths in that layer), appends every sequence's new K/V and attends all of
    them in one C call, in the bound ScratchSpace (use_scratch) if any.

    Like vLLM's per-step attention metadata and llama.cpp's ggml_cplan. A plan is valid while
    its sequences live and the cache is not changed between its layer calls by anything but
    the plan itself (appending to the planned sequences elsewhere makes the next call
    re-plan that layer; freeing one raises KeyError)."""

    cdef _KVCache cache
    cdef readonly tuple seqs
    cdef readonly tuple n_tokens
    cdef readonly int num_heads
    cdef readonly int threads           # threads asked for (the team is at most this)
    cdef readonly bint causal
    cdef readonly Py_ssize_t num_tokens
    cdef int nseq
    cdef int *slots
    cdef int64_t *counts
    cdef int64_t *offsets               # first row of each sequence
    cdef int64_t *base                  # each sequence's length before the step (every layer)
    cdef rv_kv_query *queries
    cdef rv_attn_plan cplan             # the scheduler's plan for the base lengths
    cdef ScratchSpace scratch
    cdef tuple txn                      # the sequences of its open transaction (begin=True)
    cdef object __weakref__             # the cache's record of the transaction's owner
    cdef object _claim                  # that record (a weak reference to this plan)

    def __init__(self, *args, **kwargs):
        raise TypeError("AttentionPlan objects come from cache.plan(...)")

    def __dealloc__(self):
        PyMem_Free(self.queries)      # one block: the queries, then the per-sequence arrays

    cdef int _alloc(self, int n) except -1:
        self.queries = <rv_kv_query *>PyMem_Malloc((sizeof(rv_kv_query) + sizeof(int) + 3 * sizeof(int64_t)) * (n + 1))
        if self.queries == NULL:
            raise MemoryError("plan: out of memory")
        self.counts = <int64_t *>(self.queries + n + 1)
        self.offsets = self.counts + n + 1
        self.base = self.offsets + n + 1
        self.slots = <int *>(self.base + n + 1)
        self.nseq = n
        return 0

    cdef int _resolve(self, _KVCache cache, list ids, list counts, int num_heads, str what) except -1:
        """the sequences' slots, counts and row offsets (under the cache's lock): ids and
        counts are plain ints already (_id_list, _count_list), so no caller's code runs"""
        cdef int i, n = len(ids)
        cdef int64_t off = 0
        self.cache = cache
        self.num_heads = num_heads
        cache._check_known(ids)
        self._alloc(n)
        for i in range(n):
            self.slots[i] = cache._slot_of[ids[i]]
            self.counts[i] = counts[i]
            self.offsets[i] = off
            off += counts[i]
        self.seqs = tuple(ids)
        self.n_tokens = tuple(counts)
        self.num_tokens = off
        return 0

    cdef int _measure(self) except -1:
        """the lengths the step starts from (layer 0), and the scheduler's plan for them"""
        cdef int i, rc
        cdef rv_kv_source src
        for i in range(self.nseq):
            self.base[i] = self.cache._h_len(self.slots[i], 0)
        self._fill_lengths(NULL)
        self.cache._h_source(0, self.num_heads, &src)
        rc = rv_attn_plan_make(&self.cplan, &src, self.queries, self._nq(), self.causal, self.threads)
        if rc != RV_OK:
            raise ValueError(f"plan: the sequences' lengths do not allow this step (status {rc})")
        return 0

    @property
    def bound(self):
        """Whether the kernels work in a ScratchSpace given to the plan (use_scratch)."""
        return self.scratch is not None

    @property
    def in_transaction(self):
        """Whether the plan opened a transaction (plan(..., begin=True)) still open."""
        return bool(self.txn)

    @property
    def transaction_seqs(self):
        """The sequences the plan's open transaction covers: its own, then `cover`'s."""
        return self.txn or ()

    def commit(self):
        """Close the transaction plan(..., begin=True) opened, keeping the step. Only the
        plan closes it: cache.commit / rollback on its sequences are refused meanwhile."""
        self._close_txn(True)

    def rollback(self):
        """Close the transaction plan(..., begin=True) opened, undoing the step (as
        cache.rollback on its sequences would). Idempotent."""
        self._close_txn(False)

    cdef int _close_txn(self, bint keep) except -1:
        """Commit or roll back the sequences this plan's claim holds, each with its claim in
        one hold of the cache's lock: no moment where another call could take them (nothing
        in the loop runs Python code or can fail)."""
        cdef _KVCache cache = self.cache
        if not self.txn and not keep:
            return 0                         # (idempotent, even on a closed cache)
        cache._enter()
        try:
            if not self.txn:                 # (checked again: another thread may have closed it)
                if keep:
                    raise RuntimeError("commit: the plan has no open transaction (plan(..., begin=True))")
                return 0
            for seq in self.txn:             # the cache's own ids: plain ints
                if seq not in cache._txn or cache._txn_owner.get(seq) is not self._claim:
                    continue                 # (not its claim: never so while the cache is open)
                if keep:
                    cache._h_commit(cache._slot_of[seq])
                else:
                    cache._h_rollback(cache._slot_of[seq])
                cache._txn.discard(seq)
                del cache._txn_owner[seq]
            self.txn = ()
            self._claim = None
        finally:
            cache._leave()
        return 0

    cdef inline int _nq(self) noexcept:
        """queries with tokens: the first ones of self.queries"""
        cdef int i, nq = 0
        for i in range(self.nseq):
            nq += self.counts[i] > 0
        return nq

    cdef void _fill_lengths(self, const int64_t *lengths) noexcept:
        """queries[...] for the sequences with tokens: their slots, q_len and kv_len (lengths:
        each one's length before the step; NULL: the planned base)"""
        cdef int i, nq = 0
        for i in range(self.nseq):
            if self.counts[i] == 0:
                continue
            self.queries[nq].seq = self.slots[i]
            self.queries[nq].q_len = <int>self.counts[i]
            self.queries[nq].kv_len = (self.base[i] if lengths == NULL else lengths[i]) + self.counts[i]
            nq += 1

    @property
    def scratch_needed(self):
        """(shared_bytes, bytes_per_thread, threads) the planned step needs of a ScratchSpace
        (with the sequences' lengths at planning: a longer context may split into more pieces
        across the threads, up to a few per thread)."""
        return (self.cplan.shared_bytes, self.cplan.thread_bytes, self.cplan.nthreads)

    @property
    def team(self):
        """Threads the planned attention runs on (1: the calling thread)."""
        return self.cplan.nthreads

    def use_scratch(self, scratch):
        """Run the kernels' work in `scratch` (a ScratchSpace at least scratch_needed, or None
        for the scheduler's own per-thread buffer). ValueError if it is too small."""
        if scratch is None:
            self.scratch = None
            return
        if not isinstance(scratch, ScratchSpace):
            raise TypeError(f"scratch must be a ruvpy.ScratchSpace, got {type(scratch).__name__}")
        if not scratch.fits(*self.scratch_needed):
            raise ValueError(f"scratch {scratch!r} is smaller than the plan needs "
                             f"(shared, per thread, threads) = {self.scratch_needed}")
        self.scratch = scratch

    def attend(self, layer, q, k, v, *, out=None, scale=None):
        """This step's layer `layer`: append k, v (rows offsets[i]: of seqs[i]) and attend q
        over each sequence's whole context; returns out [num_tokens, num_heads, head_dim]
        float32. q (and out) may be strided; out must not overlap q (but may be q), k or v."""
        return self._attend(layer, q, k, v, out, scale)

    cdef object _attend(self, object layer, object q, object k, object v, object out, object scale):
        cdef _KVCache cache = self.cache
        cdef int lay, i, nq, dtype, rc
        cdef float sc
        cdef cnp.ndarray qa, ka, va, oa
        cdef char *kp
        cdef char *vp
        cdef char *qp
        cdef char *op
        cdef Py_ssize_t krow, qtok, otok
        cdef bint same = True
        cdef int64_t now
        cdef int64_t *lengths = NULL
        cdef rv_kv_source src
        cdef rv_attn_plan cplan
        cdef const rv_scratch *work = NULL
        # scalars first, before the lock (their conversions may run Python code); the arrays
        # under it, last
        sc = softmax_scale(scale, cache.head_dim)
        lay = cache._layer(layer)
        cache._enter()
        try:
            for i in range(self.nseq):     # still alive, at the same slot
                if cache._slot_of.get(self.seqs[i]) != self.slots[i]:
                    raise KeyError(f"the plan's sequence {self.seqs[i]!r} is gone")
            if cache._txn_owner and not self.txn:     # (its own transaction holds its sequences)
                cache._check_unowned(list(self.seqs), "attend", self)
            qa = _q_rows(q, cache.head_dim, cache.num_kv_heads)
            k, v = cache._kv_pair(k, v)
            ka, va = k, v
            if qa.shape[0] != self.num_tokens or ka.shape[0] != self.num_tokens or \
                    qa.shape[1] != self.num_heads:
                raise ValueError(f"append_attend: the token counts {list(self.n_tokens)} add up to "
                                 f"{self.num_tokens}, but q has shape {(<object>qa).shape} and k, v "
                                 f"{(<object>ka).shape}" if qa.shape[1] == self.num_heads else
                                 f"q has {qa.shape[1]} heads; the plan has {self.num_heads}")
            oa = _out_rows(out, (<object>qa).shape, qa, ka, va)
            if self.num_tokens == 0:
                return oa
            # the planned team's workers before anything changes (room made by eviction
            # included): their failure leaves the cache as it was (MemoryError)
            if team_precheck(self.cplan.nthreads) != RV_OK:
                raise_team_error("attention")
            work = self._work(&self.cplan)
            cache._h_room(self.seqs, self.slots, self.counts, self.nseq, lay)
            # what a layer call can change: the sequences' lengths in this layer
            for i in range(self.nseq):
                now = cache._h_len(self.slots[i], lay)
                if now != self.base[i]:
                    same = False
            if not same:
                lengths = <int64_t *>PyMem_Malloc(sizeof(int64_t) * (self.nseq + 1))
                if lengths == NULL:
                    raise MemoryError("attention: out of memory")
                for i in range(self.nseq):
                    lengths[i] = cache._h_len(self.slots[i], lay)
            # the arrays are checked: their pointers now
            dtype = RV_KV_F32 if cnp.PyArray_TYPE(ka) == cnp.NPY_FLOAT32 else RV_KV_F16
            kp = <char *>cnp.PyArray_DATA(ka)
            vp = <char *>cnp.PyArray_DATA(va)
            qp = <char *>cnp.PyArray_DATA(qa)
            op = <char *>cnp.PyArray_DATA(oa)
            krow = ka.strides[0] if ka.shape[0] > 1 else 0
            qtok = qa.strides[0] if qa.shape[0] > 1 else 0
            otok = oa.strides[0] if oa.shape[0] > 1 else 0
            self._fill_lengths(lengths)
            nq = 0
            for i in range(self.nseq):
                if self.counts[i] == 0:
                    continue
                self.queries[nq].q = <const float *>(qp + self.offsets[i] * qtok)
                self.queries[nq].q_tok = elem_stride(qa, 0)
                self.queries[nq].q_head = elem_stride(qa, 1)
                self.queries[nq].out = <float *>(op + self.offsets[i] * otok)
                self.queries[nq].o_tok = elem_stride(oa, 0)
                self.queries[nq].o_head = elem_stride(oa, 1)
                nq += 1
            cache._h_source(lay, self.num_heads, &src)
            cplan = self.cplan
            if lengths != NULL:          # re-plan this layer for its own lengths (the plan reads
                                         # the source's shape, not its tokens: before the appends)
                rc = rv_attn_plan_make(&cplan, &src, self.queries, nq, self.causal, self.threads)
                _check_status(rc, "attention")
                # its larger team and its scratch, before the appends too
                if cplan.nthreads > self.cplan.nthreads and team_precheck(cplan.nthreads) != RV_OK:
                    raise_team_error("attention")
                work = self._work(&cplan)
            for i in range(self.nseq):
                if self.counts[i]:
                    cache._h_append(self.slots[i], lay, kp + self.offsets[i] * krow,
                                    vp + self.offsets[i] * krow, self.counts[i], dtype)
            cache._h_source(lay, self.num_heads, &src)
            with nogil:
                rc = rv_attn_run(&cplan, &src, self.queries, nq, sc, self.causal, active_ops(), work)
            _check_status(rc, "attention")
            return oa
        finally:
            PyMem_Free(lengths)
            cache._leave()

    cdef const rv_scratch *_work(self, const rv_attn_plan *cplan) except? NULL:
        """The scratch a run of cplan takes: the plan's ScratchSpace when it fits, else NULL
        for the scheduler's per-thread buffer, grown here (MemoryError) so that the run
        cannot fail for it after the appends."""
        cdef const rv_scratch *work
        if self.scratch is not None:
            work = &self.scratch.view
            if rv_scratch_fits(work, cplan.shared_bytes, cplan.thread_bytes, cplan.nthreads):
                return work
        _check_status(rv_attn_reserve(cplan), "attention")
        return NULL

    def __repr__(self):
        return (f"<ruvpy.AttentionPlan sequences {list(self.seqs)}, tokens {list(self.n_tokens)}, "
                f"{self.num_heads} heads, team {self.cplan.nthreads}>")


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
        cdef rv_paged *created = NULL
        self._refuse_reinit()
        shape = self._check_shape(num_layers, num_kv_heads, head_dim, max_tokens)
        layers, kv_heads, dim, tokens = shape
        bs = _positive_int(block_size, "block_size")
        code = _dtype_code(dtype)
        num_blocks = _ceil_div(tokens, bs)
        if num_blocks > MAX_INT:
            raise ValueError(f"max_tokens {max_tokens} needs {num_blocks} blocks of {block_size}; "
                             f"at most 2**31 - 1 blocks")
        if rv_paged_block_bytes(layers, kv_heads, dim, bs, code) == 0:
            raise ValueError(f"PagedKVCache: a block of {bs} tokens x {layers} layers x {kv_heads} "
                             f"kv heads x {dim} is too many bytes to address")
        rc = rv_paged_create(&created, layers, kv_heads, dim, bs, num_blocks, code)
        if rc == RV_ENOMEM:
            raise MemoryError(f"PagedKVCache: cannot allocate the pool of {num_blocks} blocks x "
                              f"{rv_paged_block_bytes(layers, kv_heads, dim, bs, code)} bytes")
        _check_status(rc, "PagedKVCache")
        self._set_shape(shape)
        self.c = created
        self.block_size = bs
        self.dtype = "float16" if code == RV_KV_F16 else "float32"
        self._stores_f16 = code == RV_KV_F16
        self._initialized = True
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

    @classmethod
    def bytes_for(cls, num_layers, num_kv_heads, head_dim, *, max_tokens, block_size=16,
                  dtype="float16"):
        """Bytes a cache of these parameters allocates when created (its pool, rounded as the
        allocator takes it, and its block metadata): arithmetic, nothing is built. 0 if the
        parameters are invalid."""
        bs = _positive_int(block_size, "block_size")
        blocks = _ceil_div(max(1, int(max_tokens)), bs)
        if blocks > MAX_INT:
            return 0
        return rv_paged_create_bytes(_positive_int(num_layers, "num_layers"),
                                     _positive_int(num_kv_heads, "num_kv_heads"),
                                     _positive_int(head_dim, "head_dim"), bs, blocks,
                                     _dtype_code(dtype))

    @property
    def capacity_tokens(self):
        """Tokens the pool holds (per layer, all sequences together)."""
        return <int64_t>self.c.num_blocks * self.block_size if self.c else 0

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
        seq = _seq_id(seq)
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

    cdef int _h_room(self, object ids, const int *slots, const int64_t *n, int nseq, int layer) except -1:
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

    cdef void _h_source(self, int layer, int num_heads, rv_kv_source *src) noexcept:
        rv_paged_source(self.c, layer, num_heads, src)

    cdef int _h_begin(self, int slot) except -1:
        _check_status(rv_paged_begin(self.c, slot), "begin")
        return 0

    cdef int _h_commit(self, int slot) except -1:
        rv_paged_commit(self.c, slot)
        return 0

    cdef int _h_rollback(self, int slot) except -1:
        rv_paged_rollback(self.c, slot)
        return 0

    cdef int _h_truncate(self, int slot, int64_t n) except -1:
        _check_status(rv_paged_truncate(self.c, slot, n), "truncate")
        return 0

    cdef int _h_read(self, int slot, int layer, k, v) except -1:
        rv_paged_read(self.c, slot, layer, cnp.PyArray_DATA(k), cnp.PyArray_DATA(v), 1, active_ops())
        return 0

    cdef size_t _h_nbytes(self):
        return self.c.pool_bytes + self.c.meta_bytes

    cdef object _h_stats(self):
        cdef rv_paged_stats st
        cdef rv_paged_seq *s
        cdef int64_t b, r
        rv_paged_get_stats(self.c, &st)
        bb = self.c.block_bytes
        seqs = {}
        holders = {}     # shared block -> its holders counted so far
        for seq, slot in self._slot_of.items():
            s = &self.c.seqs[<int>slot]
            shared = 0
            share_bytes = 0
            for b in range(s.nblocks):
                r = self.c.refcount[s.blocks[b]]
                shared += r > 1
                share_bytes += bb // r
                if r > 1 and bb % r:
                    # whole bytes that add up to the block's over its holders: the first
                    # bb % r of them take one more (floor alone fell short of bytes_in_use)
                    seen = holders.get(s.blocks[b], 0)
                    share_bytes += seen < bb % r
                    holders[s.blocks[b]] = seen + 1
            seqs[seq] = (s.nblocks, shared, share_bytes, [s.ntok[l] for l in range(self.num_layers)])
        return paged_stats(
            shape=(self.num_layers, self.num_kv_heads, self.head_dim), dtype=self.dtype,
            block_size=self.block_size, capacity_tokens=self.capacity_tokens, nbytes=self._h_nbytes(),
            block_bytes=bb, blocks_total=self.c.num_blocks, blocks_used=st.blocks_used,
            blocks_shared=st.blocks_shared, blocks_free=st.blocks_free, slots_used=st.slots_used,
            tokens_stored=st.tokens_stored, pool_bytes=self.c.pool_bytes,
            metadata_bytes=self.c.meta_bytes, sequences=seqs)

    cdef dict _config_fields(self):
        return {"kind": "paged", "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "dtype": self.dtype}

    cdef tuple _h_export(self, int slot):
        lengths = [self.c.seqs[slot].ntok[l] for l in range(self.num_layers)]
        layers = []
        for l in range(self.num_layers):
            k = np.empty((lengths[l], self.num_kv_heads, self.head_dim), dtype=self.dtype)
            v = np.empty_like(k)
            rv_paged_read(self.c, slot, l, cnp.PyArray_DATA(k), cnp.PyArray_DATA(v), 0, active_ops())
            layers.append((k, v))
        return kvexport.pack_paged(self._config_fields(), lengths, layers)

    cdef object _h_unpack(self, meta, arrays):
        return kvexport.unpack_paged(meta, arrays, self._config_fields(), self.num_layers,
                                     self.num_kv_heads, self.head_dim, np.dtype(self.dtype))

    cdef int _h_import(self, unpacked) except -1:
        cdef int slot, l
        cdef int64_t n, need
        cdef cnp.ndarray k, v
        dt = np.dtype(self.dtype)
        lengths, layers = unpacked
        n = max(lengths) if lengths else 0
        need = _ceil_div(n, self.block_size)
        if need > self.c.nfree:
            raise KVCacheFull(f"import_sequence: {n} tokens need {need} free blocks, only "
                              f"{self.c.nfree} are free; nothing was written")
        for l in range(self.num_layers):      # our own arrays: checked again before their pointers
            for name, a in zip("kv", layers[l]):
                if type(a) is not np.ndarray or a.dtype != dt or not a.flags.c_contiguous or \
                        a.shape != (lengths[l], self.num_kv_heads, self.head_dim):
                    raise ValueError("import_sequence: malformed arrays")
                self._check_imported(a, f"{name}.{l}")
        slot = self._h_add()
        try:
            for l in range(self.num_layers):
                k, v = layers[l]
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


def turbo_width_steps(head_dim):
    """The code widths TurboQuant has at head_dim, in bits per rotated coordinate: 2 to
    TURBO_MAX_BITS in steps of 16 / D (D: head_dim padded to a power of two, at least 16), as
    exact floats."""
    padded = 16
    while padded < head_dim:
        padded *= 2
    return [2.0 + 16.0 * i / padded for i in range((TURBO_MAX_BITS - 2) * padded // 16 + 1)]


def turbo_widths_tuple(turbo_widths, num_layers, head_dim):
    """turbo_widths checked: a (key_bits, value_bits) pair of floats per layer, or None.
    Each is the code bits per rotated coordinate, 2 to 4 in steps of 16 / D (D: head_dim
    padded to a power of two, at least 16; 0.25 at head_dim 64). TypeError / ValueError naming
    what is wrong."""
    if turbo_widths is None:
        return None
    if isinstance(turbo_widths, (str, bytes)) or not isinstance(turbo_widths, (list, tuple, np.ndarray)) or \
            (isinstance(turbo_widths, np.ndarray) and turbo_widths.ndim != 2):
        raise TypeError(f"turbo_widths must be a sequence of (key_bits, value_bits) pairs, one per "
                        f"layer, got {type(turbo_widths).__name__}")
    rows = list(turbo_widths)
    if len(rows) != num_layers:
        raise ValueError(f"turbo_widths must have one (key_bits, value_bits) pair per layer "
                         f"({num_layers}), got {len(rows)}")
    steps = turbo_width_steps(head_dim)
    out = []
    for layer, row in enumerate(rows):
        if isinstance(row, (str, bytes)) or not isinstance(row, (list, tuple, np.ndarray)):
            raise TypeError(f"turbo_widths[{layer}] must be a (key_bits, value_bits) pair, got {row!r}")
        row = tuple(row)            # a copy: converting a number below may run code that edits the row
        if len(row) != 2:
            raise TypeError(f"turbo_widths[{layer}] must be a (key_bits, value_bits) pair, got {row!r}")
        pair = []
        for x in row:
            if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)):
                raise TypeError(f"turbo_widths[{layer}] must hold numbers, got {type(x).__name__}")
            try:
                bits = float(x)
            except OverflowError:
                bits = math.inf
            if bits not in steps:
                shown = repr(x) if len(repr(x)) <= 40 else repr(x)[:37] + "..."
                raise ValueError(f"turbo_widths[{layer}]: code bits per coordinate must be 2 to "
                                 f"{TURBO_MAX_BITS} in steps of {steps[1] - steps[0]} at head_dim "
                                 f"{head_dim}, got {shown}")
            pair.append(bits)
        out.append(tuple(pair))
    return tuple(out)


cdef tuple _tt_params(rv_tt_params *p, num_layers, num_kv_heads, head_dim, hot_tokens, cold,
                      group_size, migration_batch, max_tokens, turbo_bits,
                      uniform_slabs=False, turbo_widths=None):
    """Fill p; returns (the array p.turbo_widths points into: keep it while p is used, the
    checked widths as turbo_widths_tuple gives them), both None without widths. The widths are
    read from the caller's objects once, here."""
    p.num_layers = _positive_int(num_layers, "num_layers")
    p.num_kv_heads = _positive_int(num_kv_heads, "num_kv_heads")
    p.head_dim = _positive_int(head_dim, "head_dim")
    if p.head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be at most {MAX_HEAD_DIM}, got {head_dim}")
    if isinstance(hot_tokens, (bool, np.bool_)) or not isinstance(hot_tokens, (int, np.integer)):
        raise TypeError(f"hot_tokens must be an int, got {type(hot_tokens).__name__}")
    if not 0 <= hot_tokens <= MAX_HOT_TOKENS:
        raise ValueError(f"hot_tokens must be >= 0, got {hot_tokens}")
    p.hot_tokens = hot_tokens
    if cold not in COLD_FORMATS:
        raise ValueError(f"cold must be one of {sorted(COLD_FORMATS)}, got {cold!r}")
    p.cold = COLD_FORMATS.index(cold)
    p.group_size = _positive_int(group_size, "group_size")
    p.group_tokens = _positive_int(migration_batch, "migration_batch")
    if p.group_tokens > MAX_GROUP_TOKENS:
        raise ValueError(f"migration_batch must be at most {MAX_GROUP_TOKENS} tokens, got {migration_batch}")
    if <int64_t>p.num_kv_heads * p.head_dim * p.group_tokens > MAX_GROUP_VALUES:
        raise ValueError(f"a cold group would hold num_kv_heads * head_dim * migration_batch = "
                         f"{<int64_t>p.num_kv_heads * p.head_dim * p.group_tokens} values of K (and as many of V), "
                         f"more than {MAX_GROUP_VALUES}: use fewer KV heads per cache or a smaller "
                         f"migration_batch")
    p.max_tokens = 1 if max_tokens is None else max_tokens
    if isinstance(turbo_bits, (bool, np.bool_)) or not isinstance(turbo_bits, (int, float, np.integer, np.floating)):
        raise TypeError(f"turbo_bits must be a number, got {type(turbo_bits).__name__}")
    if cold == "turbo" and float(turbo_bits) not in TURBO_BITS:
        raise ValueError(f"turbo_bits must be one of {TURBO_BITS} (bits per value), got {turbo_bits}")
    p.turbo_bits = float(turbo_bits)
    p.uniform_slabs = 1 if uniform_slabs else 0
    p.turbo_widths = NULL
    widths = turbo_widths_tuple(turbo_widths, p.num_layers, p.head_dim)
    if widths is None:
        return None, None
    if cold != "turbo":
        raise ValueError(f"turbo_widths apply to cold='turbo' only, got cold={cold!r}")
    held = np.array(widths, dtype=np.float64)
    if held.shape != (p.num_layers, 2):     # (turbo_widths_tuple's promise; C reads 2 per layer)
        raise ValueError(f"turbo_widths must be {p.num_layers} pairs")
    p.turbo_widths = <const double *>cnp.PyArray_DATA(held)
    return held, widths


cdef class TwoTierKVCache(_KVCache):
    """TwoTierKVCache(num_layers, num_kv_heads, head_dim, *, hot_tokens=256, cold="q4",
    group_size=32, migration_batch=64, max_tokens, policy="error", turbo_bits=3.5,
    turbo_widths=None, pool=None)

    Per sequence and layer, the most recent tokens stay in an fp16 hot ring; once it holds
    hot_tokens + migration_batch tokens, its oldest migration_batch tokens are quantized into
    one immutable cold group in the cold format (one of COLD_FORMATS, the codec table's): "q8"
    (int8) or "q4" (two 4-bit codes per byte). Keys are quantized per channel over the
    group, values per token in channel groups of group_size, scales and zero points in fp16;
    with q4, up to max(1, head_dim / 16) channels of K and of V per head and group whose range
    over the group is more than 3x the median channel range keep 8-bit codes per channel over
    the group. Attention reads the cold codes in place inside the kernel and folds them and
    the hot tokens into one online softmax.

    max_tokens bounds the token slots stored per layer, all sequences together: each
    sequence's hot tokens plus migration_batch for every cold group some sequence holds, a
    group shared by forks counted once. A group is counted whole while any of its tokens is
    held (its memory is freed only with its last token): the oldest tokens evicted or the
    newest truncated inside a group free no room. fork() shares the
    cold groups and copies the hot tail, so a fork costs only its hot tokens (KVCacheFull, and
    nothing changes, if they do not fit; fork never evicts). Policy "error": appends past
    max_tokens raise KVCacheFull (nothing written); "evict-oldest": the oldest tokens are
    dropped until the room asked for is free, cold ones with the rest of their group (up to
    migration_batch - 1 more than asked), hot ones exactly -- first of the sequences being appended
    to (so each keeps its newest tokens), then of the others, longest first; while a
    transaction is open, a request from its sequences evicts only from them and a request
    from other sequences only from sequences outside it (so a rollback never goes over the
    budget; a request mixing both raises). A dropped token that another sequence still holds
    frees no room, so its other holders drop it next: the oldest shared tokens go from every
    holder, and a fork that appends loses about as many tokens as it adds, not its whole
    shared prefix. A shared cold group's memory is freed when its last holder drops it.
    import_sequence() stores its own copy of everything (it costs all its tokens, its cold
    groups whole).

    cold="turbo": TurboQuant at turbo_bits 2.5 / 3.5 / 4.5 bits per value, metadata included
    (rotated codes with Lloyd-Max codebooks, the keys' group mean taken out; values get
    floor(bits - 0.5) bits per coordinate, keys the rest; see csrc/kvcache/rv_turbo.h).
    turbo_widths: instead, each layer's own code widths, a (key_bits, value_bits) pair per
    layer of bits per rotated coordinate, 2 to 4 in steps of 16 / D (0.25 at head_dim 64):
    layers whose attention needs more bits get more (ruvpy.kvplan.plan_turbo_widths picks them
    on a calibration text). Each layer's groups then have a size of their own; exports record
    the widths and load only into a cache with the same.

    pool: a BufferPool with a size class at least group_bytes_max(...) bytes: each cold group
    takes its memory from the smallest class that holds it (of the classes from the smallest
    that holds some layer's largest group on; the Runtime sizes and prewarms them), so
    migration never calls the allocator while those classes have free buffers.

    uniform_slabs: without a pool, a large cache's cold groups come from its own huge-page
    slabs in blocks of a few size classes (a group takes the smallest that holds it); with
    uniform_slabs every block is of the largest group's size, so a block freed by any group
    serves any later one and the slabs never take more than cold_store_bytes(...) (a Runtime
    under a memory_budget sets it: with size classes, groups growing over time -- q4 outlier
    channels appearing -- could not reuse the smaller blocks freed and mapped more slabs)."""

    cdef rv_tt *c
    cdef readonly int hot_tokens
    cdef readonly int group_size
    cdef readonly int migration_batch
    cdef readonly str cold
    cdef readonly str policy
    cdef readonly double turbo_bits
    cdef readonly object turbo_widths
    cdef readonly object pool

    def __init__(self, num_layers, num_kv_heads, head_dim, *, hot_tokens=256, cold="q4",
                 group_size=32, migration_batch=64, max_tokens, policy="error", turbo_bits=3.5,
                 turbo_widths=None, pool=None, uniform_slabs=False):
        cdef rv_tt_params p
        cdef rv_tt *created = NULL
        cdef int cls = -1
        cdef size_t largest
        self._refuse_reinit()
        shape = self._check_shape(num_layers, num_kv_heads, head_dim, max_tokens)
        held, widths = _tt_params(&p, num_layers, num_kv_heads, head_dim, hot_tokens, cold, group_size,
                                  migration_batch, shape[3], turbo_bits, uniform_slabs, turbo_widths)
        if policy not in _POLICIES:
            raise ValueError(f"policy must be one of {_POLICIES}, got {policy!r}")
        if pool is not None:
            if not isinstance(pool, BufferPool):
                raise TypeError(f"pool must be a ruvpy.BufferPool, got {type(pool).__name__}")
            # groups take the smallest class that holds them, from the one of the smallest
            # layer's largest group on
            largest = rv_tt_group_alloc_bytes(&p, 1)
            if not any(size >= largest for size in pool.size_classes):
                raise ValueError(f"pool has no size class of {largest} bytes or more (a cold group at "
                                 f"most); its classes are {pool.size_classes}")
            smallest = min(rv_tt_layer_group_alloc_bytes(&p, l, 1) for l in range(p.num_layers))
            cls = [i for i, size in enumerate(pool.size_classes) if size >= smallest][0]
        # the checks above may run the caller's code (a number's __float__, a pool subclass's
        # properties), which could have initialized this object meanwhile
        self._refuse_reinit()
        _check_status(rv_tt_create(&created, &p), "TwoTierKVCache")
        if pool is not None:
            rv_tt_use_pool(created, (<BufferPool>pool).pool, cls)
        self._set_shape(shape)
        self.c = created
        self.pool = pool
        self.hot_tokens = p.hot_tokens
        self.group_size = p.group_size
        self.migration_batch = p.group_tokens
        self.cold = cold
        self.policy = policy
        self.turbo_bits = p.turbo_bits
        self.turbo_widths = widths       # what the C cache was built with
        self._initialized = True
        self._closed = False

    def __dealloc__(self):
        rv_tt_destroy(self.c)       # pool buffers go back to self.pool, still alive here
        self.c = NULL

    @classmethod
    def bytes_per_token(cls, num_layers, num_kv_heads, head_dim, *, hot_tokens=256, cold="q4",
                        group_size=32, migration_batch=64, turbo_bits=3.5, turbo_widths=None, policy=None,
                        max_tokens=None, pool=None, uniform_slabs=False):
        """Bytes one cold token of one sequence costs across all layers: a cold group's
        allocation (without outlier channels) divided by its tokens. A sequence's hot tier
        adds up to hot_tier_bytes(...)."""
        cdef rv_tt_params p
        held = _tt_params(&p, num_layers, num_kv_heads, head_dim, hot_tokens, cold, group_size,
                          migration_batch, max_tokens, turbo_bits, uniform_slabs, turbo_widths)[0]
        return rv_tt_groups_alloc_bytes(&p, 0) / p.group_tokens

    @classmethod
    def group_bytes_max(cls, num_layers, num_kv_heads, head_dim, *, hot_tokens=256, cold="q4",
                        group_size=32, migration_batch=64, turbo_bits=3.5, turbo_widths=None, policy=None,
                        max_tokens=None, pool=None, uniform_slabs=False):
        """Bytes one cold group (one layer, migration_batch tokens) takes at most: its
        format's largest blob (every outlier channel it allows) with the group's header,
        as allocated. Arithmetic from the codec, nothing is built."""
        cdef rv_tt_params p
        held = _tt_params(&p, num_layers, num_kv_heads, head_dim, hot_tokens, cold, group_size,
                          migration_batch, max_tokens, turbo_bits, uniform_slabs, turbo_widths)[0]
        return rv_tt_group_alloc_bytes(&p, 1)

    @classmethod
    def layer_group_bytes_max(cls, num_layers, num_kv_heads, head_dim, *, hot_tokens=256, cold="q4",
                              group_size=32, migration_batch=64, turbo_bits=3.5, turbo_widths=None,
                              policy=None, max_tokens=None, pool=None, uniform_slabs=False):
        """group_bytes_max(...) of each layer's groups (they differ with turbo_widths), a
        tuple. Arithmetic."""
        cdef rv_tt_params p
        held = _tt_params(&p, num_layers, num_kv_heads, head_dim, hot_tokens, cold, group_size,
                          migration_batch, max_tokens, turbo_bits, uniform_slabs, turbo_widths)[0]
        return tuple(rv_tt_layer_group_alloc_bytes(&p, l, 1) for l in range(p.num_layers))

    @classmethod
    def uses_slabs(cls, num_layers, num_kv_heads, head_dim, *, hot_tokens=256, cold="q4",
                   group_size=32, migration_batch=64, turbo_bits=3.5, turbo_widths=None, policy=None,
                   max_tokens=None, pool=None, uniform_slabs=False):
        """Whether such a cache, without a pool, takes its cold groups from its own huge-page
        slabs: when its capacity (max_tokens in every layer, in the largest groups) fills at
        least one slab (2 MiB or more). Smaller caches take them from malloc. Arithmetic."""
        cdef rv_tt_params p
        held = _tt_params(&p, num_layers, num_kv_heads, head_dim, hot_tokens, cold, group_size,
                          migration_batch, max_tokens, turbo_bits, uniform_slabs, turbo_widths)[0]
        return bool(rv_tt_uses_slabs(&p))

    @classmethod
    def fixed_bytes(cls, num_layers, num_kv_heads, head_dim, *, hot_tokens=256, cold="q4",
                    group_size=32, migration_batch=64, turbo_bits=3.5, turbo_widths=None, policy=None,
                    max_tokens=None, pool=None, uniform_slabs=False):
        """Bytes the cache allocates when created, before any token: its counters, the
        format's tables and the migration work buffer (arithmetic)."""
        cdef rv_tt_params p
        held = _tt_params(&p, num_layers, num_kv_heads, head_dim, hot_tokens, cold, group_size,
                          migration_batch, max_tokens, turbo_bits, uniform_slabs, turbo_widths)[0]
        return rv_tt_fixed_bytes(&p)

    @classmethod
    def cold_store_bytes(cls, num_layers, num_kv_heads, head_dim, *, hot_tokens=256, cold="q4",
                         group_size=32, migration_batch=64, turbo_bits=3.5, turbo_widths=None, policy=None,
                         max_tokens=None, pool=None, slabs=True, uniform_slabs=False):
        """The most bytes the cold store takes with max_tokens in every layer, in full groups
        of the largest size: whole 2 MiB-multiple slabs when `slabs` and the cache uses them
        (uses_slabs), else the groups' own allocations (a pool's, arithmetic)."""
        cdef rv_tt_params p
        held = _tt_params(&p, num_layers, num_kv_heads, head_dim, hot_tokens, cold, group_size,
                          migration_batch, max_tokens, turbo_bits, uniform_slabs, turbo_widths)[0]
        return rv_tt_cold_store_bytes(&p, 1 if slabs else 0)

    @classmethod
    def hot_tier_bytes(cls, num_layers, num_kv_heads, head_dim, *, hot_tokens=256, cold="q4",
                       group_size=32, migration_batch=64, turbo_bits=3.5, turbo_widths=None, policy=None,
                       max_tokens=None, pool=None, uniform_slabs=False):
        """The most one sequence's hot tier holds between steps, all layers: fp16 rings of
        hot_tokens + migration_batch tokens. (Inside a transaction nothing migrates: a step
        appending n tokens grows them to up to hot_tokens + migration_batch - 1 + n until it
        ends.)"""
        cdef rv_tt_params p
        held = _tt_params(&p, num_layers, num_kv_heads, head_dim, hot_tokens, cold, group_size,
                          migration_batch, max_tokens, turbo_bits, uniform_slabs, turbo_widths)[0]
        return p.num_layers * rv_tt_hot_alloc_bytes(&p, p.hot_tokens + p.group_tokens)

    @property
    def capacity_tokens(self):
        return self.max_tokens

    @property
    def pooled_bytes(self):
        """Of nbytes: cold groups whose memory is a buffer of `pool` (its stats count them as
        outstanding)."""
        return self.c.cold_pooled_bytes if self.c else 0

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

    cdef int _h_room(self, object ids, const int *slots, const int64_t *n, int nseq, int layer) except -1:
        cdef int bind = 0, i
        cdef int64_t requested = 0
        rc = rv_tt_make_room(self.c, slots, n, nseq, layer, self.policy == "evict-oldest", &bind)
        if rc == RV_TT_ROOM_OK:
            return 0
        for i in range(nseq):
            requested += n[i]
        where = f"layer {layer}" if layer >= 0 else "every layer"
        free = self.max_tokens - self.c.used[bind]
        if rc == RV_TT_ROOM_FULL or rc == RV_TT_ROOM_TOO_MANY:
            raise KVCacheFull(
                f"KV cache full: {requested} tokens requested for sequences {ids} in {where}, "
                f"{free} free of max_tokens={self.max_tokens}"
                + ("" if rc == RV_TT_ROOM_FULL else " (more than the cache holds: eviction cannot help)")
                + "; nothing was written")
        if rc == RV_TT_ROOM_MIXED:
            raise KVCacheFull(
                f"KV cache full: {requested} tokens requested for sequences {ids} in {where}, some "
                f"inside the open transaction on {sorted(self._txn)} and some outside: eviction could "
                f"not be rolled back consistently; nothing was written")
        if rc == RV_TT_ROOM_TXN_SIDE:
            raise KVCacheFull(
                f"KV cache full: {requested} tokens requested for sequences {ids} in {where}; while "
                f"the transaction on {sorted(self._txn)} is open only sequences on the same side of it "
                f"may give up tokens, and the tokens only they hold are too few (tokens shared with "
                f"other sequences stay stored); nothing was written")
        raise MemoryError("reserve: out of memory")

    cdef int _h_append(self, int slot, int layer, const void *k, const void *v, int64_t n,
                       int dtype) except -1:
        _check_status(rv_tt_append(self.c, slot, layer, k, v, n, 0 if dtype == RV_KV_F32 else 1,
                                   active_ops()), "append")
        return 0

    cdef void _h_source(self, int layer, int num_heads, rv_kv_source *src) noexcept:
        rv_tt_source(self.c, layer, num_heads, src)

    cdef int _h_begin(self, int slot) except -1:
        _check_status(rv_tt_begin(self.c, slot), "begin")
        return 0

    cdef int _h_commit(self, int slot) except -1:
        rv_tt_commit(self.c, slot, active_ops())
        return 0

    cdef int _h_rollback(self, int slot) except -1:
        rv_tt_rollback(self.c, slot)
        return 0

    cdef int _h_truncate(self, int slot, int64_t n) except -1:
        _check_status(rv_tt_truncate(self.c, slot, n), "truncate")
        return 0

    cdef int _h_read(self, int slot, int layer, k, v) except -1:
        rv_tt_read(self.c, slot, layer, <float *>cnp.PyArray_DATA(k), <float *>cnp.PyArray_DATA(v),
                   active_ops())
        return 0

    cdef size_t _h_nbytes(self):
        # the slabs' slack too: every byte the cache holds (cold_bytes stays the groups' own)
        return self.c.hot_bytes + self.c.cold_bytes + self.c.meta_bytes + rv_tt_slab_slack_bytes(self.c)

    cdef object _h_stats(self):
        cdef rv_tt_usage u
        usage = {}
        rv_tt_usage_begin(self.c)       # shared groups' bytes split in whole bytes that add up
        for seq, slot in self._slot_of.items():
            rows = []
            for l in range(self.num_layers):
                rv_tt_seq_usage(self.c, slot, l, &u)
                rows.append((u.hot_tokens, u.cold_tokens, u.hot_bytes, u.cold_bytes))
            usage[seq] = rows
        return twotier_stats(
            shape=(self.num_layers, self.num_kv_heads, self.head_dim),
            config={"cold": self.cold, "hot_tokens_limit": self.hot_tokens,
                    "migration_batch": self.migration_batch, "group_size": self.group_size,
                    "policy": self.policy},
            capacity_tokens=self.max_tokens, nbytes=self._h_nbytes(),
            used=[self.c.used[l] for l in range(self.num_layers)],
            stored=[self.c.stored[l] for l in range(self.num_layers)], usage=usage,
            hot_bytes=self.c.hot_bytes, cold_bytes=self.c.cold_bytes,
            metadata_bytes=self.c.meta_bytes, pooled_cold_bytes=self.c.cold_pooled_bytes,
            cold_groups=self.c.cold_groups, cold_groups_shared=self.c.shared_groups,
            evicted_tokens=self.c.evicted, slab_cold_bytes=self.c.cold_slab_bytes,
            slab_mapped_bytes=rv_tt_slab_mapped_bytes(self.c))

    cdef dict _config_fields(self):
        fields = {"kind": "two-tier", "num_layers": self.num_layers,
                  "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim, "cold": self.cold,
                  "migration_batch": self.migration_batch, "group_size": self.group_size}
        if self.cold == "turbo":
            fields["turbo_bits"] = self.turbo_bits
            # exports of caches without per-layer widths (and older ones) have none
            fields["turbo_widths"] = None if self.turbo_widths is None else [list(w) for w in self.turbo_widths]
        return fields

    cdef tuple _h_export(self, int slot):
        cdef int32_t skip, cut
        cdef int64_t ng, hot_len
        layers = []
        for l in range(self.num_layers):
            ng = rv_tt_export_groups(self.c, slot, l)
            blobs = np.empty(rv_tt_export_bytes(self.c, slot, l), dtype=np.uint8)
            sizes = np.empty(ng, dtype=np.int64)
            hot_len = rv_tt_len(self.c, slot, l) - rv_tt_cold_len(self.c, slot, l)
            hot_k = np.empty((hot_len, self.num_kv_heads, self.head_dim), dtype=np.float16)
            hot_v = np.empty_like(hot_k)
            rv_tt_export_layer(self.c, slot, l, <unsigned char *>cnp.PyArray_DATA(blobs),
                               <int64_t *>cnp.PyArray_DATA(sizes), &skip, &cut,
                               <uint16_t *>cnp.PyArray_DATA(hot_k), <uint16_t *>cnp.PyArray_DATA(hot_v))
            layers.append((rv_tt_len(self.c, slot, l), skip, cut, blobs, sizes, hot_k, hot_v))
        return kvexport.pack_twotier(self._config_fields(), layers)

    cdef object _h_unpack(self, meta, arrays):
        return kvexport.unpack_twotier(meta, arrays, self._config_fields(), self.num_layers,
                                       self.num_kv_heads, self.head_dim, self.migration_batch)

    cdef int _h_import(self, unpacked) except -1:
        cdef int slot, l
        cdef int64_t off, size, g
        cdef cnp.ndarray blobs, sizes, hot_k, hot_v
        cdef const unsigned char *base
        layers = unpacked
        for l in range(self.num_layers):
            length, skip, cut, blobs, sizes, hot_k, hot_v, hot_len = layers[l]
            if not (type(blobs) is np.ndarray and blobs.dtype == np.uint8 and blobs.flags.c_contiguous and
                    type(sizes) is np.ndarray and sizes.dtype == np.int64 and sizes.flags.c_contiguous and
                    sizes.ndim == 1 and blobs.ndim == 1):
                raise ValueError("import_sequence: malformed arrays")
            off = 0
            base = <const unsigned char *>cnp.PyArray_DATA(blobs)
            for g in range(sizes.shape[0]):
                size = (<const int64_t *>cnp.PyArray_DATA(sizes))[g]
                if size <= 0 or size > blobs.shape[0] - off or rv_tt_validate_blob(self.c, l, base + off, size) != 0:
                    raise ValueError(f"import_sequence: cold group {g} of layer {l} is malformed "
                                     f"({size} bytes)")
                off += size
            if off != blobs.shape[0]:
                raise ValueError(f"import_sequence: layer {l}'s cold blobs are malformed")
            if type(hot_k) is not np.ndarray or type(hot_v) is not np.ndarray or \
                    (<object>hot_k).shape != (hot_len, self.num_kv_heads, self.head_dim) or \
                    (<object>hot_v).shape != (<object>hot_k).shape or hot_k.dtype != _F16 or hot_v.dtype != _F16 or \
                    not hot_k.flags.c_contiguous or not hot_v.flags.c_contiguous:
                raise ValueError("import_sequence: malformed arrays")
            self._check_imported(hot_k, f"hot_k.{l}")
            self._check_imported(hot_v, f"hot_v.{l}")
        for l in range(self.num_layers):
            length, sizes, hot_len = layers[l][0], layers[l][4], layers[l][7]
            # its own copy of every group, each charged whole (a skip or cut frees no slot of it)
            charged = sizes.shape[0] * self.migration_batch + hot_len
            if self.c.used[l] + charged > self.max_tokens:
                raise KVCacheFull(f"import_sequence: {length} tokens ({charged} slots: cold groups "
                                  f"count whole) do not fit layer {l} "
                                  f"({self.max_tokens - self.c.used[l]} free of {self.max_tokens}); "
                                  f"nothing was written")
        slot = self._h_add()
        try:
            for l in range(self.num_layers):
                length, skip, cut, blobs, sizes, hot_k, hot_v, hot_len = layers[l]
                _check_status(rv_tt_import_layer(
                    self.c, slot, l, <const unsigned char *>cnp.PyArray_DATA(blobs),
                    <const int64_t *>cnp.PyArray_DATA(sizes), sizes.shape[0], skip, cut,
                    <const uint16_t *>cnp.PyArray_DATA(hot_k), <const uint16_t *>cnp.PyArray_DATA(hot_v),
                    hot_len, active_ops()), "import_sequence")
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
