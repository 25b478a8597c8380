# cython: language_level=3
"""GGUF block matmuls and the dense parts of a decoder block, over weights used in place.

A thin layer over csrc/linear/rv_linear.c (drivers) and the kernel table's matmul family
(csrc/kernels/qmatmul_impl.h): it checks shapes, dtypes and buffers, then runs the C code with
the GIL released on the active ISA's kernels.

- QMatrix(data, type, rows, cols): a weight matrix in one GGUF block format (F32, F16, BF16,
  Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K) read straight from `data` (any buffer: a memory-mapped
  GGUF file's bytes); .matmul(x) computes x @ W.T, .dequantize() gives float32 rows.
- DecoderBlocks: a stack of pre-norm decoder blocks (Llama: RMSNorm, Q/K/V with RoPE on
  adjacent pairs, output projection, RMSNorm, SwiGLU MLP, residuals) plus embedding and LM
  head; a step runs begin() then, after each layer's attention, between() -- one C call and one
  parallel region per layer (rv_block_between). Memory is the caller's (StepBuffers over the
  step arena); nothing is allocated per call.
"""
import numpy as np

cimport numpy as cnp
from libc.stdint cimport uint8_t, int8_t, int64_t
from libc.string cimport memcpy
from libc.stdlib cimport malloc, free

from ruvpy.c_ops cimport (rv_ops, rv_wmat, rv_qact, rv_qact_bind, rv_wtype_block_values,
                          rv_wtype_block_bytes, RV_QACT_BYTES)
from ruvpy._attention cimport overlap
from ruvpy._kernels cimport active_ops, num_threads, team_check, raise_team_error
from ruvpy._kernels import _converted_first
from ruvpy._linear cimport (rv_linear_out, rv_linear_work_bytes, rv_linear, rv_linear_team, rv_block_dims,
                            rv_block_weights, rv_block_head, rv_block_step, rv_block_work_bytes,
                            rv_block_between, rv_rope_angles, rv_linear_thread_work,
                            rv_block_threads)
from ruvpy._openmp_helpers cimport omp_get_max_threads, rv_team_bind
from ruvpy._common cimport RV_OK, RV_ENOMEM, RV_EINVAL, RV_ETHREAD

rv_team_bind(team_check)   # this extension's regions check through the process's record

cnp.import_array()

# ggml type ids of the formats the kernels run
TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 8: "Q8_0", 12: "Q4_K", 13: "Q5_K",
              14: "Q6_K", 30: "BF16"}
TYPE_IDS = {name: i for i, name in TYPE_NAMES.items()}
SUPPORTED_TYPES = tuple(TYPE_NAMES.values())


def block_shape(type):
    """(values, bytes) of one block of a supported type (a name or ggml id)."""
    cdef int t = _type_id(type)
    return rv_wtype_block_values(t), rv_wtype_block_bytes(t)


cdef int _type_id(object type) except -1:
    if isinstance(type, str):
        if type.upper() not in TYPE_IDS:
            raise ValueError(f"unsupported weight type {type!r}; ruvpy runs "
                             f"{', '.join(SUPPORTED_TYPES)}")
        return TYPE_IDS[type.upper()]
    if isinstance(type, (bool, np.bool_)) or not isinstance(type, (int, np.integer)):
        raise TypeError(f"a weight type is a name or a ggml type id, got {type!r}")
    if int(type) not in TYPE_NAMES:
        raise ValueError(f"unsupported weight type id {int(type)}; ruvpy runs "
                         f"{', '.join(SUPPORTED_TYPES)}")
    return int(type)


cdef _raise(int rc, str what):
    if rc == RV_ENOMEM:
        raise MemoryError(f"{what}: out of memory")
    if rc == RV_ETHREAD:
        raise_team_error(what)
    raise ValueError(f"{what}: inconsistent arguments (error {rc})")


cdef cnp.ndarray _f32_matrix(object x, int cols, str name):
    """x as a C-contiguous float32 [n, cols] array (a 1-D x is one row); copies only if needed"""
    cdef cnp.ndarray a = np.asarray(x)
    if a.dtype != np.float32:
        raise TypeError(f"{name} must be float32, got {a.dtype}")
    if a.ndim == 1:
        a = a.reshape(1, -1)
    if a.ndim != 2 or a.shape[1] != cols:
        raise ValueError(f"{name} must have shape [n, {cols}], got {list((<object>a).shape)}")
    return np.ascontiguousarray(a)


cdef class QMatrix:
    """QMatrix(data, type, rows, cols, name=""): rows x cols weights in a GGUF block format,
    row-major as GGUF stores them (ne0 = cols contiguous), read in place from `data` (a buffer
    of at least rows * row_bytes bytes, kept alive -- and exported, so a memory map under it
    cannot be closed -- as long as this object lives). type: a name ("Q4_1") or ggml type id.
    cols must be a multiple of 32 and of the format's block."""

    cdef rv_wmat m
    cdef const uint8_t[::1] _view
    cdef readonly object data
    cdef readonly str name

    def __cinit__(self, data, type, int rows, int cols, name=""):
        cdef int t = _type_id(type)
        cdef int bv = rv_wtype_block_values(t)
        self.name = str(name)
        label = f" {self.name!r}" if self.name else ""
        if rows < 1 or cols < 1:
            raise ValueError(f"weight matrix{label}: shape [{rows}, {cols}] is empty")
        if cols % bv or cols % 32:
            raise ValueError(f"weight matrix{label}: {cols} columns are not a multiple of the "
                             f"{TYPE_NAMES[t]} block ({bv} values) and of 32")
        self._view = data
        cdef size_t row_bytes = <size_t>(cols // bv) * <size_t>rv_wtype_block_bytes(t)
        if <size_t>self._view.shape[0] < <size_t>rows * row_bytes:
            raise ValueError(f"weight matrix{label}: {TYPE_NAMES[t]} [{rows}, {cols}] needs "
                             f"{rows * row_bytes} bytes, the buffer has {self._view.shape[0]}")
        self.data = data
        self.m.data = &self._view[0]
        self.m.type = t
        self.m.rows = rows
        self.m.cols = cols
        self.m.row_bytes = row_bytes

    @property
    def type(self):
        return TYPE_NAMES[self.m.type]

    @property
    def type_id(self):
        return self.m.type

    @property
    def shape(self):
        return (self.m.rows, self.m.cols)

    @property
    def nbytes(self):
        return self.m.rows * self.m.row_bytes

    def matmul(self, x, out=None, *, accumulate=False, threads=None):
        """x @ W.T: x [n, cols] (or [cols]) float32 -> [n, rows] float32 (into `out` if
        given; accumulate=True adds to it). Quantized formats multiply x quantized to int8 per
        block of 32 (as llama.cpp does); float formats multiply float32. threads: None runs on
        ruvpy's threads, fewer for small products (rv_threads.h); a number runs on exactly that
        many (benchmarks of the parallel path)."""
        # the scalars first (their conversions may run Python code), then x, then out
        cdef bint add = bool(accumulate)
        cdef int team = _forced_team(threads)
        cdef cnp.ndarray xa = _f32_matrix(x, self.m.cols, "x")
        cdef int n = <int>xa.shape[0]
        cdef cnp.ndarray o
        if out is None:
            if add:
                raise ValueError("accumulate=True needs out")
            o = np.empty((n, self.m.rows), np.float32)
        else:
            if not cnp.PyArray_Check(out):
                raise TypeError(f"out must be a numpy array, got {type(out).__name__}")
            # a subclass is checked through a plain view: its Python-level dtype, shape or
            # flags cannot lie about the memory written
            o = out if type(out) is np.ndarray else np.asarray(out)
            if o.dtype != np.float32 or (<object>o).shape != (n, self.m.rows) or \
                    not o.flags.c_contiguous or not o.flags.writeable:
                raise ValueError(f"out must be a writeable C-contiguous float32 [{n}, "
                                 f"{self.m.rows}] array")
            if overlap(o, xa):     # rows written while x is still read (float weights)
                raise ValueError("out overlaps x: the product would overwrite its own input; "
                                 "pass another array")
        if n == 0:
            return out if out is not None else o
        cdef rv_linear_out job
        job.w = &self.m
        job.y = <float *>cnp.PyArray_DATA(o)
        job.ldy = self.m.rows
        job.accumulate = 1 if add else 0
        _run_linear(xa, n, self.m.cols, &job, 1, team, "QMatrix.matmul")
        return out if out is not None else o

    def dequantize(self, rows=None):
        """float32 [len(rows), cols] of the given rows (default: all)."""
        idx = np.arange(self.m.rows) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.m.rows):
            raise IndexError(f"row index out of range for {self.m.rows} rows")
        cdef cnp.ndarray out = np.empty((idx.size, self.m.cols), np.float32)
        cdef const int64_t[::1] ids = np.ascontiguousarray(idx, dtype=np.int64)
        cdef const rv_ops *ops = active_ops()
        cdef Py_ssize_t i
        cdef float *o = <float *>cnp.PyArray_DATA(out)
        with nogil:
            for i in range(ids.shape[0]):
                ops.wrow_f32(&self.m, <int>ids[i], o + i * self.m.cols)
        return out

    def __repr__(self):
        label = f" {self.name!r}" if self.name else ""
        return f"<QMatrix{label} {TYPE_NAMES[self.m.type]} [{self.m.rows}, {self.m.cols}]>"


cdef int _forced_team(threads) except -1:
    """0 for threads=None (ruvpy's threads, fewer for small work), else exactly that many."""
    if threads is None:
        return 0
    if not isinstance(threads, (int, np.integer)) or isinstance(threads, (bool, np.bool_)):
        raise ValueError(f"threads must be None or an int >= 1, got {threads!r}")
    n = int(threads)        # once: an int subclass's __int__ may answer differently each time
    if n < 1:
        raise ValueError(f"threads must be None or an int >= 1, got {n}")
    return <int>min(n, 1024)


cdef int _run_linear(cnp.ndarray xa, int n, int k, const rv_linear_out *jobs, int njobs, int team,
                     str what) except -1:
    """rv_linear over xa [n, k] (validated) for jobs, the GIL released; team 0: ruvpy's own
    team size, else exactly `team` threads."""
    cdef int nt = team if team else num_threads(), rc
    cdef size_t work_bytes = rv_linear_work_bytes(n, k, nt)
    cdef const float *xp = <const float *>cnp.PyArray_DATA(xa)
    cdef void *work
    with nogil:
        work = rv_linear_thread_work(work_bytes)
        if work == NULL:
            rc = RV_ENOMEM
        elif team:
            rc = rv_linear_team(active_ops(), team, xp, k, n, k, jobs, njobs, work, work_bytes)
        else:
            rc = rv_linear(active_ops(), nt, xp, k, n, k, jobs, njobs, work, work_bytes)
    if rc != RV_OK:
        _raise(rc, what)
    return 0


def matmul_shared(x, matrices, *, threads=None):
    """[m.matmul(x) for m in matrices] in ONE parallel region: x is quantized once and the
    threads take chunks of every matrix's rows in turn -- how a layer's Q, K and V (or gate
    and up) run. x [n, cols] (or [cols]) float32; every matrix has cols columns. Results equal
    the separate products bit for bit. threads as in QMatrix.matmul."""
    mats = list(matrices)
    if not mats:
        raise ValueError("matmul_shared needs at least one matrix")
    for m in mats:
        if not isinstance(m, QMatrix):
            raise TypeError(f"matmul_shared takes QMatrix objects, got {type(m).__name__}")
    cdef QMatrix first = mats[0], qm
    cdef int k = first.m.cols, i, team = _forced_team(threads)
    for m in mats:
        if (<QMatrix>m).m.cols != k:
            raise ValueError(f"every matrix must have {k} columns, {m!r} has {m.shape[1]}")
    cdef cnp.ndarray xa = _f32_matrix(x, k, "x")
    cdef int n = <int>xa.shape[0]
    outs = [np.empty((n, (<QMatrix>m).m.rows), np.float32) for m in mats]
    if n == 0:
        return outs
    cdef rv_linear_out *jobs = <rv_linear_out *>malloc(len(mats) * sizeof(rv_linear_out))
    if jobs == NULL:
        raise MemoryError("matmul_shared: no memory for the job list")
    try:
        for i in range(len(mats)):
            qm = mats[i]
            jobs[i].w = &qm.m
            jobs[i].y = <float *>cnp.PyArray_DATA(outs[i])
            jobs[i].ldy = qm.m.rows
            jobs[i].accumulate = 0
        _run_linear(xa, n, k, jobs, len(mats), team, "matmul_shared")
    finally:
        free(jobs)
    return outs


# ---- the element-wise kernels and activation quantization (tests, benchmarks) ----

def quantize_activations(x):
    """x [n, k] float32 (k a multiple of 32) in the matmuls' Q8 form: (q int8 [n, k],
    d [n, k/32], s32 [n, k/32], s16 [n, k/16], q4 int8 [n, k]) with x ~= d * q per block of 32,
    s = d * the sum of the codes of each block / half block, and q4 the codes in the Q4 kernels'
    order (per 4 blocks: their first halves, then their second halves; see rv_wmat.h)."""
    cdef cnp.ndarray xa = np.asarray(x)
    if xa.dtype != np.float32 or xa.ndim != 2 or xa.shape[1] % 32 or xa.shape[1] == 0:
        raise ValueError("x must be float32 [n, k] with k a multiple of 32")
    xa = np.ascontiguousarray(xa)
    cdef int n = <int>xa.shape[0], k = <int>xa.shape[1]
    cdef cnp.ndarray buf = np.empty(RV_QACT_BYTES(n, k) + 64, np.uint8)
    cdef size_t off = (-<size_t>cnp.PyArray_DATA(buf)) & 63
    cdef rv_qact a
    rv_qact_bind(&a, <char *>cnp.PyArray_DATA(buf) + off, n, k)
    a.x = <const float *>cnp.PyArray_DATA(xa)
    a.x_stride = k
    cdef const rv_ops *ops = active_ops()
    with nogil:
        ops.quantize_act(&a, 0, n)
    q = np.empty((n, k), np.int8)
    d = np.empty((n, k // 32), np.float32)
    s32 = np.empty((n, k // 32), np.float32)
    s16 = np.empty((n, k // 16), np.float32)
    q4 = np.empty((n, k), np.int8)
    memcpy(cnp.PyArray_DATA(q), a.q, n * k)
    memcpy(cnp.PyArray_DATA(d), a.d, n * (k // 32) * 4)
    memcpy(cnp.PyArray_DATA(s32), a.s32, n * (k // 32) * 4)
    memcpy(cnp.PyArray_DATA(s16), a.s16, n * (k // 16) * 4)
    memcpy(cnp.PyArray_DATA(q4), a.q4, n * k)
    return q, d, s32, s16, q4


def rmsnorm(x, gain=None, eps=1e-5):
    """x / sqrt(mean(x^2) + eps) * gain, per row of x [n, dim] (or of one row [dim]) float32."""
    cdef float e = eps          # first: its __float__ may run Python code
    x, gain = _converted_first(x, gain)
    cdef cnp.ndarray xa = np.asarray(x, dtype=np.float32)
    if xa.ndim == 0:
        raise TypeError("x must be [n, dim] float32, got a scalar")
    if xa.ndim > 2:        # (its trailing axes were flattened into one row each)
        raise ValueError(f"x must be [n, dim] (or one row [dim]), got shape {list((<object>xa).shape)}")
    one_row = xa.ndim == 1    # one vector, not dim rows of one value
    xa = np.ascontiguousarray(xa.reshape(1 if one_row else xa.shape[0], -1))
    cdef int n = <int>xa.shape[0], dim = <int>xa.shape[1], t
    cdef cnp.ndarray g
    cdef const float *gp = NULL
    if gain is not None:
        g = np.ascontiguousarray(gain, dtype=np.float32).reshape(-1)
        if g.shape[0] != dim:
            raise ValueError(f"gain has {g.shape[0]} values for rows of {dim}")
        gp = <const float *>cnp.PyArray_DATA(g)
    cdef cnp.ndarray out = np.empty_like(xa)
    cdef const rv_ops *ops = active_ops()
    cdef const float *xp = <const float *>cnp.PyArray_DATA(xa)
    cdef float *op = <float *>cnp.PyArray_DATA(out)
    with nogil:
        for t in range(n):
            ops.rmsnorm_f32(xp + t * dim, gp, e, op + t * dim, dim)
    return out.reshape(dim) if one_row else out


def rope_pairs(x, cos, sin):
    """x [vectors, dim] float32 with the adjacent pairs (x[2i], x[2i+1]) rotated by the angles
    whose cos/sin [dim/2] are given (a new array)."""
    x, cos, sin = _converted_first(x, cos, sin)
    cdef cnp.ndarray out = np.array(x, dtype=np.float32, order="C", copy=True)
    if out.ndim != 2 or out.shape[1] % 2:
        raise ValueError("x must be [vectors, dim] with an even dim")
    cdef cnp.ndarray c = np.ascontiguousarray(cos, dtype=np.float32).reshape(-1)
    cdef cnp.ndarray s = np.ascontiguousarray(sin, dtype=np.float32).reshape(-1)
    if c.shape[0] != out.shape[1] // 2 or s.shape[0] != c.shape[0]:
        raise ValueError("cos and sin need dim/2 values")
    cdef int v = <int>out.shape[0], dim = <int>out.shape[1]
    cdef const rv_ops *ops = active_ops()
    cdef float *op = <float *>cnp.PyArray_DATA(out)
    cdef const float *cp = <const float *>cnp.PyArray_DATA(c)
    cdef const float *sp = <const float *>cnp.PyArray_DATA(s)
    with nogil:
        ops.rope_pairs_f32(op, v, dim, cp, sp)
    return out


def swiglu(gate, up):
    """gate * sigmoid(gate) * up, float32 (same shapes)."""
    gate, up = _converted_first(gate, up)
    cdef cnp.ndarray g = np.ascontiguousarray(gate, dtype=np.float32)
    cdef cnp.ndarray u = np.ascontiguousarray(up, dtype=np.float32)
    if (<object>g).shape != (<object>u).shape:
        raise ValueError("gate and up must have the same shape")
    cdef cnp.ndarray out = np.empty_like(g)
    cdef const rv_ops *ops = active_ops()
    cdef int n = <int>g.size
    cdef const float *gp = <const float *>cnp.PyArray_DATA(g)
    cdef const float *up_ = <const float *>cnp.PyArray_DATA(u)
    cdef float *op = <float *>cnp.PyArray_DATA(out)
    with nogil:
        ops.swiglu_f32(gp, up_, op, n)
    return out


def rope_angles(positions, int dim, double base):
    """(cos, sin) float32 [n, dim/2] of positions[t] * base^(-2i/dim)."""
    cdef const int64_t[::1] pos = np.ascontiguousarray(positions, dtype=np.int64).reshape(-1)
    if dim < 2 or dim % 2:
        raise ValueError("dim must be even and >= 2")
    cdef int n = <int>pos.shape[0]
    cdef cnp.ndarray c = np.empty((n, dim // 2), np.float32)
    cdef cnp.ndarray s = np.empty((n, dim // 2), np.float32)
    if n:
        rv_rope_angles(&pos[0], n, dim, base, <float *>cnp.PyArray_DATA(c), <float *>cnp.PyArray_DATA(s))
    return c, s


# ---- a stack of decoder blocks ----

cdef rv_wmat _wmat(object m, int rows, int cols, str what) except *:
    if not isinstance(m, QMatrix):
        raise TypeError(f"{what} must be a QMatrix, got {type(m).__name__}")
    cdef QMatrix q = <QMatrix>m
    if q.m.rows != rows or q.m.cols != cols:
        raise ValueError(f"{what} has shape {list(q.shape)}, expected [{rows}, {cols}]")
    return q.m


cdef const float *_gain(object g, int n, str what, list keep) except NULL:
    cdef cnp.ndarray a = np.asarray(g)
    if a.dtype != np.float32 or a.ndim != 1 or a.shape[0] != n or not a.flags.c_contiguous:
        raise ValueError(f"{what} must be a contiguous float32 [{n}] array, got "
                         f"{a.dtype} {list((<object>a).shape)}")
    keep.append(a)
    return <const float *>cnp.PyArray_DATA(a)


cdef class DecoderBlocks:
    """DecoderBlocks(hidden, heads, kv_heads, head_dim, ffn, eps, rope_base, layers, embedding,
    output, output_norm): the dense parts of a stack of pre-norm decoder blocks.

    layers: one dict per block with QMatrix entries q [heads*head_dim, hidden], k and v
    [kv_heads*head_dim, hidden], o [hidden, heads*head_dim], gate and up [ffn, hidden], down
    [hidden, ffn], and float32 [hidden] gains attn_norm, ffn_norm. embedding: QMatrix [vocab,
    hidden] (token lookup); output: QMatrix [vocab, hidden] (the LM head; the embedding itself
    when tied); output_norm: float32 [hidden]. Everything is read in place and kept alive.

    A step: buffers = StepBuffers(blocks, ...) over step memory; begin(buffers, ids, positions)
    embeds the tokens and computes layer 0's q/k/v; then for each layer, after attention wrote
    buffers.attn, between(buffers, layer) finishes that layer and starts the next (the last one
    computes the logits, if the buffers have a logits array)."""

    cdef rv_block_dims dims
    cdef rv_block_weights *layers
    cdef rv_wmat embed, out
    cdef const float *out_norm
    cdef readonly int num_layers, vocab
    cdef readonly double rope_base
    cdef list _keep
    cdef bint _init_started, _ready

    def __cinit__(self):
        self.layers = NULL

    def __init__(self, int hidden, int heads, int kv_heads, int head_dim, int ffn, float eps,
                 double rope_base, layers, embedding, output, output_norm):
        # once: a second __init__ replaced the kept matrices and the shape under StepBuffers
        # checked against the first (a failed one left the old embedding freed and in use)
        if self._init_started:
            raise RuntimeError("DecoderBlocks is already initialized; make a new one")
        self._init_started = True
        if hidden < 32 or hidden % 32 or ffn < 32 or ffn % 32 or heads < 1 or kv_heads < 1 or \
                heads % kv_heads or head_dim < 2 or head_dim % 2 or (heads * head_dim) % 32:
            raise ValueError(f"unsupported block shape: hidden {hidden}, heads {heads}/{kv_heads} "
                             f"x {head_dim}, ffn {ffn} (widths must be multiples of 32)")
        layers = list(layers)
        self._keep = [embedding, output]
        self.dims.hidden, self.dims.heads, self.dims.kv_heads = hidden, heads, kv_heads
        self.dims.head_dim, self.dims.ffn, self.dims.eps = head_dim, ffn, eps
        self.rope_base = rope_base
        cdef int qd = heads * head_dim, kvd = kv_heads * head_dim
        cdef rv_block_weights *ws = <rv_block_weights *>malloc(
            max(1, len(layers)) * sizeof(rv_block_weights))
        if ws == NULL:
            raise MemoryError()
        self.layers = ws
        self.num_layers = 0
        cdef int i
        for i, spec in enumerate(layers):
            where = f"layer {i}"
            ws[i].q = _wmat(spec["q"], qd, hidden, f"{where} q")
            ws[i].k = _wmat(spec["k"], kvd, hidden, f"{where} k")
            ws[i].v = _wmat(spec["v"], kvd, hidden, f"{where} v")
            ws[i].o = _wmat(spec["o"], hidden, qd, f"{where} o")
            ws[i].gate = _wmat(spec["gate"], ffn, hidden, f"{where} gate")
            ws[i].up = _wmat(spec["up"], ffn, hidden, f"{where} up")
            ws[i].down = _wmat(spec["down"], hidden, ffn, f"{where} down")
            ws[i].attn_norm = _gain(spec["attn_norm"], hidden, f"{where} attn_norm", self._keep)
            ws[i].ffn_norm = _gain(spec["ffn_norm"], hidden, f"{where} ffn_norm", self._keep)
            self._keep.extend(spec[name] for name in ("q", "k", "v", "o", "gate", "up", "down"))
            self.num_layers = i + 1
        if not isinstance(embedding, QMatrix) or (<QMatrix>embedding).m.cols != hidden:
            raise ValueError(f"embedding must be a QMatrix [vocab, {hidden}]")
        self.embed = (<QMatrix>embedding).m
        self.vocab = self.embed.rows
        self.out = _wmat(output, self.vocab, hidden, "output")
        self.out_norm = _gain(output_norm, hidden, "output_norm", self._keep)
        self._ready = True

    cdef int _check_ready(self) except -1:
        if not self._ready:
            raise RuntimeError("DecoderBlocks: its __init__ did not complete (it raised); make a new one")
        return 0

    def __dealloc__(self):
        if self.layers != NULL:
            free(self.layers)
            self.layers = NULL

    def work_bytes(self, int n):
        """Bytes of work memory a step of n tokens needs (StepBuffers' work array)."""
        return rv_block_work_bytes(&self.dims, n, max(num_threads(), omp_get_max_threads(), 1))

    def threads(self, int n, bint with_head=False):
        """Threads a between() call of n tokens uses (small calls run serially)."""
        if self.num_layers == 0:
            return 1
        cdef rv_block_head hd
        hd.out = self.out
        hd.first = n - 1
        return rv_block_threads(num_threads(), &self.dims, &self.layers[0],
                                &self.layers[min(1, self.num_layers - 1)],
                                &hd if with_head else NULL, n)

    def begin(self, StepBuffers b not None, ids, positions):
        """Embed `ids` (int64 [n]) into b.x, RoPE angles of `positions` (int64 [n]), and layer
        0's q, k, v (or, with no layers, the logits)."""
        self._check_ready()
        if b.blocks is not self:
            raise ValueError("these StepBuffers belong to other DecoderBlocks")
        cdef const int64_t[::1] idv = np.ascontiguousarray(ids, dtype=np.int64)
        cdef const int64_t[::1] pos = np.ascontiguousarray(positions, dtype=np.int64)
        cdef int n = b.s.n, t, half = self.dims.head_dim // 2, rc
        if idv.shape[0] != n or pos.shape[0] != n:
            raise ValueError(f"ids and positions must have the step's {n} tokens")
        for t in range(n):
            if idv[t] < 0 or idv[t] >= self.vocab:
                raise ValueError(f"token id {idv[t]} is outside the vocabulary (0..{self.vocab - 1})")
        cdef const rv_ops *ops = active_ops()
        cdef int nt = num_threads()
        with nogil:
            for t in range(n):
                ops.wrow_f32(&self.embed, <int>idv[t], b.s.x + t * self.dims.hidden)
            rv_rope_angles(&pos[0], n, self.dims.head_dim, self.rope_base, <float *>b.s.rope_cos,
                           <float *>b.s.rope_sin)
            if self.num_layers:
                rc = rv_block_between(ops, nt, &self.dims, NULL, &self.layers[0], NULL, &b.s)
            else:
                rc = rv_block_between(ops, nt, &self.dims, NULL, NULL,
                                      &b.head if b.has_head else NULL, &b.s)
        if rc != RV_OK:
            _raise(rc, "DecoderBlocks.begin")

    def between(self, StepBuffers b not None, int layer):
        """After attention of `layer` (in b.attn): finish it (output projection, MLP,
        residuals) and compute the next layer's q, k, v -- or, after the last layer, the
        logits (if b has a logits array)."""
        self._check_ready()
        if layer < 0 or layer >= self.num_layers:
            raise IndexError(f"layer {layer} out of range (0..{self.num_layers - 1})")
        if b.blocks is not self:
            raise ValueError("these StepBuffers belong to other DecoderBlocks")
        cdef const rv_block_weights *nxt = &self.layers[layer + 1] if layer + 1 < self.num_layers else NULL
        cdef const rv_block_head *hd = &b.head if (nxt == NULL and b.has_head) else NULL
        cdef int rc
        with nogil:
            rc = rv_block_between(active_ops(), num_threads(), &self.dims, &self.layers[layer], nxt, hd, &b.s)
        if rc != RV_OK:
            _raise(rc, "DecoderBlocks.between")

    def __repr__(self):
        d = self.dims
        return (f"<DecoderBlocks {self.num_layers} x (hidden {d.hidden}, heads {d.heads}/"
                f"{d.kv_heads} x {d.head_dim}, ffn {d.ffn}), vocab {self.vocab}>")


cdef cnp.ndarray _f32_buffer(object a, tuple shape, str what):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{what} must be a numpy array")
    cdef cnp.ndarray arr = a
    if arr.dtype != np.float32 or (<object>arr).shape != shape or not arr.flags.c_contiguous \
            or not arr.flags.writeable:
        raise ValueError(f"{what} must be a writeable C-contiguous float32 {list(shape)} array, "
                         f"got {arr.dtype} {list((<object>arr).shape)}")
    return arr


cdef class StepBuffers:
    """StepBuffers(blocks, n, x, q, k, v, attn, rope, work, logits=None, first=0): the memory of
    one step of n tokens (all C-contiguous float32 and writeable; the arrays are kept alive):
    x [n, hidden] residual stream, q [n, heads, head_dim], k and v [n, kv_heads, head_dim],
    attn [n, heads, head_dim] (attention output), rope [2, n, head_dim/2], work uint8 of
    blocks.work_bytes(n) bytes (64-byte aligned), and logits [n - first, vocab] (optional) for
    the tokens first..n-1."""

    cdef rv_block_step s
    cdef rv_block_head head
    cdef bint has_head
    cdef readonly DecoderBlocks blocks
    cdef readonly object x, q, k, v, attn, rope, work, logits

    def __init__(self, DecoderBlocks blocks not None, int n, x, q, k, v, attn, rope, work, logits=None,
                 int first=0):
        blocks._check_ready()
        cdef rv_block_dims d = blocks.dims
        if n < 1:
            raise ValueError("a step has at least one token")
        self.blocks = blocks
        self.x = _f32_buffer(x, (n, d.hidden), "x")
        self.q = _f32_buffer(q, (n, d.heads, d.head_dim), "q")
        self.k = _f32_buffer(k, (n, d.kv_heads, d.head_dim), "k")
        self.v = _f32_buffer(v, (n, d.kv_heads, d.head_dim), "v")
        self.attn = _f32_buffer(attn, (n, d.heads, d.head_dim), "attn")
        self.rope = _f32_buffer(rope, (2, n, d.head_dim // 2), "rope")
        if not isinstance(work, np.ndarray) or work.dtype != np.uint8 or work.ndim != 1 or \
                not work.flags.c_contiguous or not work.flags.writeable:
            raise ValueError("work must be a writeable contiguous uint8 array")
        cdef cnp.ndarray w = work
        if (<size_t>cnp.PyArray_DATA(w)) & 63 or <size_t>w.shape[0] < blocks.work_bytes(n):
            raise ValueError(f"work must be 64-byte aligned and hold {blocks.work_bytes(n)} bytes")
        self.work = work
        self.s.n = n
        self.s.x = <float *>cnp.PyArray_DATA(<cnp.ndarray>self.x)
        self.s.attn = <const float *>cnp.PyArray_DATA(<cnp.ndarray>self.attn)
        self.s.q = <float *>cnp.PyArray_DATA(<cnp.ndarray>self.q)
        self.s.k = <float *>cnp.PyArray_DATA(<cnp.ndarray>self.k)
        self.s.v = <float *>cnp.PyArray_DATA(<cnp.ndarray>self.v)
        self.s.rope_cos = <const float *>cnp.PyArray_DATA(<cnp.ndarray>self.rope)
        self.s.rope_sin = self.s.rope_cos + n * (d.head_dim // 2)
        self.s.work = cnp.PyArray_DATA(w)
        self.s.work_bytes = w.shape[0]
        self.has_head = logits is not None
        if self.has_head:
            if not 0 <= first < n:
                raise ValueError(f"first must be in [0, {n}), got {first}")
            self.logits = _f32_buffer(logits, (n - first, blocks.vocab), "logits")
            self.head.out = blocks.out
            self.head.norm = blocks.out_norm
            self.head.logits = <float *>cnp.PyArray_DATA(<cnp.ndarray>self.logits)
            self.head.ld = blocks.vocab
            self.head.first = first
