# cython: language_level=3
"""Functional attention: ruvpy.attention(q, k, v, *, causal=True, scale=None, out=None,
threads=None).

A thin layer: it converts the arguments, checks shapes, dtypes and strides, then runs the
attention scheduler (csrc/attention/rv_attention.c, the same one the KV caches use) over the
tensors with the GIL released on the active ISA's kernel table.
"""
import numpy as np

cimport numpy as cnp
from libc.math cimport sqrt, isfinite
from libc.stdint cimport uint16_t, uint64_t
from libc.string cimport memset

from ruvpy.c_ops cimport rv_ops
from ruvpy._kernels cimport active_ops, num_threads, team_check, raise_team_error
from ruvpy._openmp_helpers cimport rv_team_bind
from ruvpy._kernels import MAX_HEAD_DIM, MAX_KV_LEN, MAX_INT
from ruvpy._common cimport RV_OK, RV_ENOMEM, RV_EINVAL, RV_ETHREAD

rv_team_bind(team_check)   # this extension's regions check through the process's record

cnp.import_array()

cdef extern from "float.h":
    float FLT_MAX


cdef cnp.ndarray _kernel_layout(object x, str name):
    """x as an ndarray the kernels can read in place: last axis contiguous and every stride a
    whole number of elements. Anything else (a transposed or byte-strided view) is copied."""
    # exact ndarrays only: a subclass's Python-level shape, dtype or flags could differ from
    # what C reads, so it is viewed as a plain ndarray first (np.asarray runs none of its code)
    cdef cnp.ndarray a = x if type(x) is np.ndarray else np.asarray(x)
    if a.ndim != 3:
        raise ValueError(f"{name} must be 3-D [tokens, heads, head_dim], got shape {(<object>a).shape}")
    cdef Py_ssize_t item = a.itemsize
    cdef int i
    cdef bint ok = a.shape[2] <= 1 or a.strides[2] == item
    for i in range(3):
        if a.shape[i] > 1 and a.strides[i] % item != 0:
            ok = False
    return a if ok else np.ascontiguousarray(a)


cdef ptrdiff_t elem_stride(cnp.ndarray a, int axis) noexcept:
    """element stride of an axis (0 for an axis of length 1, whose stride numpy leaves free)"""
    return 0 if a.shape[axis] <= 1 else a.strides[axis] // cnp.PyArray_ITEMSIZE(a)


cdef void _extent(cnp.ndarray a, char **lo, char **hi) noexcept:
    """the bytes [lo, hi) an array can touch"""
    cdef char *base = <char *>cnp.PyArray_DATA(a)
    cdef Py_ssize_t lo_off = 0, hi_off = cnp.PyArray_ITEMSIZE(a), span
    cdef int i
    for i in range(a.ndim):
        if a.shape[i] == 0:
            lo[0] = base
            hi[0] = base
            return
        span = (a.shape[i] - 1) * a.strides[i]
        if span < 0:
            lo_off += span
        else:
            hi_off += span
    lo[0] = base + lo_off
    hi[0] = base + hi_off


cdef bint overlap(cnp.ndarray a, cnp.ndarray b) noexcept:
    cdef char *alo
    cdef char *ahi
    cdef char *blo
    cdef char *bhi
    _extent(a, &alo, &ahi)
    _extent(b, &blo, &bhi)
    return alo < bhi and blo < ahi


cdef int thread_count(object threads) except -1:
    """threads as a C int: None -> ruvpy's process-wide setting (read, never changed); else
    an int >= 1 (more than OpenMP has are capped by it)."""
    if threads is None:
        return num_threads()
    if isinstance(threads, (bool, np.bool_)) or not isinstance(threads, (int, np.integer)):
        raise TypeError(f"threads must be an int or None, got {type(threads).__name__}")
    n = int(threads)
    if n < 1:
        raise ValueError(f"threads must be >= 1 (or None), got {n}")
    return <int>min(n, MAX_INT)


cdef float softmax_scale(object scale, int head_dim) except? -1:
    """scale as a float32 (None: 1 / sqrt(head_dim)); ValueError unless finite in float32."""
    cdef double s
    if scale is None:
        return <float>(1.0 / sqrt(<double>head_dim))
    if isinstance(scale, (str, bytes, bytearray)):     # float() would parse it
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__} {scale!r}")
    s = float(scale)
    if not isfinite(s) or abs(s) > FLT_MAX:
        raise ValueError(f"scale must be finite in float32, got {scale!r}")
    return <float>s


def attention(q, k, v, *, causal=True, scale=None, out=None, threads=None):
    """softmax(scale * q k^T + mask) v for every query head.

    q: [q_len, num_heads, head_dim] float32. k, v: [kv_len, num_kv_heads, head_dim], both
    float32 or both float16 (token-major "NHD"); num_heads must be a multiple of num_kv_heads
    (MHA, GQA, MQA: query head h uses KV head h // (num_heads // num_kv_heads)).
    causal: query i sits at position kv_len - q_len + i and sees keys 0 .. that position.
    scale: defaults to 1 / sqrt(head_dim).
    out: optional float32 array of q's shape; the result is written there and nothing is
    allocated. Returns out (or a new array). head_dim may be 1..256 (multiples of 16 fastest).
    threads: kernel threads for this call (None: ruvpy.get_num_threads()).
    Arrays may be strided (whole elements); arrays whose last axis is not contiguous are copied.
    """
    # every scalar first (their conversions may run Python code), the arrays last
    cdef bint is_causal = bool(causal)
    cdef int nthreads = thread_count(threads)
    scale_given = scale
    cdef double scl = 0.0
    if scale is not None:
        scl = softmax_scale(scale, 1)
    cdef cnp.ndarray qa = _kernel_layout(q, "q")
    cdef cnp.ndarray ka = _kernel_layout(k, "k")
    cdef cnp.ndarray va = _kernel_layout(v, "v")
    if qa.dtype != np.float32:
        raise TypeError(f"q must be float32, got {qa.dtype}")
    if ka.dtype != va.dtype:
        raise TypeError(f"k and v must have the same dtype, got {ka.dtype} and {va.dtype}")
    if ka.dtype != np.float32 and ka.dtype != np.float16:
        raise TypeError(f"k and v must be float32 or float16, got {ka.dtype}")
    cdef Py_ssize_t q_len = qa.shape[0], num_heads = qa.shape[1], head_dim = qa.shape[2]
    cdef Py_ssize_t kv_len = ka.shape[0], num_kv_heads = ka.shape[1]
    qs, ks, vs = (<object>qa).shape, (<object>ka).shape, (<object>va).shape
    if ks != vs:
        raise ValueError(f"k and v shapes differ: k {ks}, v {vs}")
    if ka.shape[2] != head_dim:
        raise ValueError(f"head_dim differs: q {qs} has {head_dim}, k {ks} has {ka.shape[2]}")
    if head_dim < 1 or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be 1..{MAX_HEAD_DIM}, got {head_dim} (q {qs})")
    if kv_len < 1 or num_kv_heads < 1:
        raise ValueError(f"k and v are empty: shape {ks}")
    if kv_len > MAX_KV_LEN:
        raise ValueError(f"kv_len {kv_len} exceeds the supported {MAX_KV_LEN} tokens")
    if num_heads < 1 or num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads ({num_heads}, q {qs}) must be a positive multiple of "
                         f"num_kv_heads ({num_kv_heads}, k {ks})")
    if is_causal and q_len > kv_len:
        raise ValueError(f"causal attention needs q_len <= kv_len, got q {qs} and k {ks}")
    if scale_given is None:
        scl = 1.0 / sqrt(<double>head_dim)

    cdef cnp.ndarray oa
    if out is None:
        oa = np.empty((q_len, num_heads, head_dim), dtype=np.float32)
    else:
        if not cnp.PyArray_Check(out):
            raise TypeError(f"out must be a numpy array, got {type(out).__name__}")
        oa = out if type(out) is np.ndarray else np.asarray(out)   # as _kernel_layout
        if oa.dtype != np.float32:
            raise TypeError(f"out must be float32, got {oa.dtype}")
        if (<object>oa).shape != qs:
            raise ValueError(f"out has shape {(<object>oa).shape}, expected q's shape {qs}")
        if not oa.flags.writeable:
            raise ValueError("out is read-only")
        if _kernel_layout(oa, "out") is not oa:
            raise ValueError(f"out needs a contiguous last axis and whole-element strides, "
                             f"got strides {(<object>oa).strides}")
        if overlap(oa, ka) or overlap(oa, va):
            raise ValueError("out overlaps k or v")
        if overlap(oa, qa) and (cnp.PyArray_DATA(oa) != cnp.PyArray_DATA(qa)
                                   or (<object>oa).strides != (<object>qa).strides):
            raise ValueError("out overlaps q without being q itself (in place is fine)")
    if q_len == 0:
        return oa

    cdef rv_attn_args args
    args.q = <const float *>cnp.PyArray_DATA(qa)
    args.q_tok = elem_stride(qa, 0)
    args.q_head = elem_stride(qa, 1)
    args.k = cnp.PyArray_DATA(ka)
    args.k_tok = elem_stride(ka, 0)
    args.k_head = elem_stride(ka, 1)
    args.v = cnp.PyArray_DATA(va)
    args.v_tok = elem_stride(va, 0)
    args.v_head = elem_stride(va, 1)
    args.out = <float *>cnp.PyArray_DATA(oa)
    args.o_tok = elem_stride(oa, 0)
    args.o_head = elem_stride(oa, 1)
    args.q_len = <int>q_len
    args.kv_len = <int>kv_len
    args.num_heads = <int>num_heads
    args.num_kv_heads = <int>num_kv_heads
    args.head_dim = <int>head_dim
    args.kv_f16 = ka.dtype == np.float16
    args.causal = is_causal
    args.scale = <float>scl
    cdef int status
    with nogil:
        status = rv_attention(active_ops(), nthreads, &args, NULL)
    if status == RV_ENOMEM:
        raise MemoryError("attention: could not allocate its scratch buffer")
    if status == RV_ETHREAD:
        raise_team_error("attention")
    if status != RV_OK:
        raise ValueError(f"attention: invalid arguments (q {qs}, k {ks})")
    return oa


def release_scratch():
    """Free the calling thread's cached attention scratch (kept between calls otherwise)."""
    rv_attention_release_scratch()


def scratch_bytes():
    """Bytes of attention scratch the calling thread holds."""
    return rv_attention_scratch_bytes()


def _threads_for(int q_len, int kv_len, int num_heads, int num_kv_heads, int head_dim, kv_dtype,
                 bint causal=True, int nthreads=0):
    """Threads attention(q, k, v) of these shapes runs on (0: ruvpy's thread count): 1 when
    the call is too small for a parallel region to pay (tests use it to pick sizes on both
    sides of that threshold)."""
    cdef rv_attn_args args
    memset(&args, 0, sizeof(args))
    args.q_len = q_len
    args.kv_len = kv_len
    args.num_heads = num_heads
    args.num_kv_heads = num_kv_heads
    args.head_dim = head_dim
    args.kv_f16 = np.dtype(kv_dtype) == np.float16
    args.causal = causal
    return rv_attention_threads(nthreads if nthreads > 0 else num_threads(), &args)


def _stream_read(buf, int nthreads=0):
    """Read every byte of a contiguous buffer with nthreads threads (0: ruvpy's thread count);
    returns a checksum. Benchmarks time it to measure the machine's read bandwidth."""
    cdef const unsigned char[::1] view = memoryview(buf).cast("B")
    cdef int nt = nthreads if nthreads > 0 else num_threads()
    cdef uint64_t r = 0
    cdef size_t n = view.shape[0]
    cdef int rc = RV_OK
    if n:
        with nogil:
            rc = rv_stream_read(&view[0], n, nt, &r)
    if rc == RV_ETHREAD:
        raise_team_error("_stream_read")
    return r


from libc.stdlib cimport malloc, free
from ruvpy.c_ops cimport (rv_attn_state, rv_kv_span, rv_attn_rows, RV_ATTN_CHUNK,
                          RV_ATTN_SCRATCH_FLOATS, RV_ATTN_TILE_ROWS, RV_ATTN_TILE_SCRATCH_FLOATS)


def _kernel_attend(q, k_pool, v_pool, table, int n_tokens, visible=None, str mode="spans"):
    """Test hook for the kernel table's attention block as a paged cache uses it: one KV head
    whose K/V rows live in blocks k_pool[table[i]] ([num_blocks, block, head_dim], float32 or
    float16). q: [rows, head_dim] float32, already scaled. visible: optional [rows] int counts.
    mode: "spans" (attend_spans_*, all blocks at once), "chunks" (attend_chunk_* per block,
    block <= RV_ATTN_CHUNK) or "rows" (attend_rows_*, rows <= RV_ATTN_TILE_ROWS, scale 1).
    Returns the [rows, head_dim] float32 output. Single-threaded."""
    cdef float[:, ::1] qv = np.ascontiguousarray(q, dtype=np.float32)
    kp = np.ascontiguousarray(k_pool)
    vp = np.ascontiguousarray(v_pool)
    if kp.dtype != vp.dtype or kp.dtype not in (np.float32, np.float16) or kp.shape != vp.shape or kp.ndim != 3:
        raise ValueError("k_pool and v_pool must be [blocks, block, head_dim] float32/float16 alike")
    cdef int rows = qv.shape[0], d = qv.shape[1], block = kp.shape[1]
    cdef int i, r, n
    cdef int imode = {"spans": 0, "chunks": 1, "rows": 2}[mode]
    if kp.shape[2] != d or rows < 1 or d < 1:
        raise ValueError("shape mismatch")
    cdef long[::1] tab = np.ascontiguousarray(table, dtype=np.int64).astype(np.int_)
    cdef int nb = (n_tokens + block - 1) // block
    if nb > tab.shape[0] or n_tokens < 0:
        raise ValueError("table too short")
    for i in range(nb):
        if not 0 <= tab[i] < kp.shape[0]:
            raise ValueError("bad block id")
    cdef int[::1] vis
    cdef const int *visp = NULL
    if visible is not None:
        vis = np.ascontiguousarray(visible, dtype=np.intc)
        if vis.shape[0] != rows:
            raise ValueError("visible needs one count per row")
        visp = &vis[0]
    if mode == "rows" and rows > RV_ATTN_TILE_ROWS or mode == "chunks" and block > RV_ATTN_CHUNK:
        raise ValueError("too many rows / too long blocks for this mode")
    cdef bint f16 = kp.dtype == np.float16
    cdef const unsigned char[:, :, ::1] kb = kp.view(np.uint8)
    cdef const unsigned char[:, :, ::1] vb = vp.view(np.uint8)
    cdef Py_ssize_t es = kp.itemsize
    out = np.zeros((rows, d), dtype=np.float32)
    cdef float[:, ::1] ov = out
    m = np.full(rows, -np.inf, dtype=np.float32)
    l = np.zeros(rows, dtype=np.float32)
    acc = np.zeros((rows, d), dtype=np.float32)
    cdef float[::1] mv = m, lv = l
    cdef float[:, ::1] accv = acc
    cdef size_t nscratch = max(RV_ATTN_SCRATCH_FLOATS(rows, d), RV_ATTN_TILE_SCRATCH_FLOATS(d))
    scratch_arr = np.zeros(nscratch + 16, dtype=np.float32)
    cdef float[::1] sc = scratch_arr
    cdef float *scratch = &sc[(16 - (<size_t>&sc[0] // 4) % 16) % 16]   # 64-byte aligned
    cdef rv_kv_span *spans = <rv_kv_span *>malloc(sizeof(rv_kv_span) * (nb + 1))
    cdef const float **qrows = <const float **>malloc(sizeof(float *) * rows)
    cdef float **orows = <float **>malloc(sizeof(float *) * rows)
    cdef int *cvis = <int *>malloc(sizeof(int) * rows)
    if not spans or not qrows or not orows or not cvis:
        free(spans); free(qrows); free(orows); free(cvis)
        raise MemoryError()
    cdef rv_attn_state st
    cdef rv_attn_rows job
    cdef const rv_ops *ops = active_ops()
    try:
        for i in range(nb):
            n = min(block, n_tokens - i * block)
            spans[i].k = &kb[tab[i], 0, 0]
            spans[i].v = &vb[tab[i], 0, 0]
            spans[i].k_stride = d
            spans[i].v_stride = d
            spans[i].n = n
        for r in range(rows):
            qrows[r] = &qv[r, 0]
            orows[r] = &ov[r, 0]
        with nogil:
            if imode == 2:
                job.rows = rows; job.head_dim = d; job.scale = 1.0
                job.q = qrows; job.out = orows; job.visible = visp
                job.spans = spans; job.nspans = nb; job.m_out = NULL; job.l_out = NULL
                if f16:
                    ops.attend_rows_f16(&job, scratch)
                else:
                    ops.attend_rows_f32(&job, scratch)
            else:
                st.rows = rows; st.head_dim = d; st.q = &qv[0, 0]; st.q_stride = d
                st.m = &mv[0]; st.l = &lv[0]; st.acc = &accv[0, 0]; st.scratch = scratch
                if imode == 0:
                    if f16:
                        ops.attend_spans_f16(&st, spans, nb, visp)
                    else:
                        ops.attend_spans_f32(&st, spans, nb, visp)
                else:
                    for i in range(nb):
                        if visp != NULL:
                            for r in range(rows):
                                cvis[r] = max(0, min(spans[i].n, visp[r] - i * block))
                        if f16:
                            ops.attend_chunk_f16(&st, <const uint16_t *>spans[i].k, d,
                                                 <const uint16_t *>spans[i].v, d, spans[i].n,
                                                 cvis if visp != NULL else NULL)
                        else:
                            ops.attend_chunk_f32(&st, <const float *>spans[i].k, d,
                                                 <const float *>spans[i].v, d, spans[i].n,
                                                 cvis if visp != NULL else NULL)
                ops.attn_finalize(rows, d, &lv[0], &accv[0, 0], &ov[0, 0], d)
    finally:
        free(spans); free(qrows); free(orows); free(cvis)
    return out
