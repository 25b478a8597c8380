"""The Runtime: what an application (or ruvpy.models) drives a decode loop with.

    cfg = RuntimeConfig(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64)
    with Runtime(cfg) as rt:
        seq = rt.add_sequence()
        with rt.step([seq], [n]) as step:          # plans the step's KV slots
            pos = step.positions                    # absolute positions (RoPE)
            for layer in range(cfg.num_layers):
                out = step.attention(layer, q, k, v)    # append k/v, attend, [n, H, d]
        print(rt.stats().format())

A Runtime owns the step arena, the buffer pool and per-thread scratch (ruvpy._memory) and
one KV cache (ruvpy._kvcache) holding every layer of every sequence. A step is a
transaction over its sequences: it commits when the `with` block ends normally after every
layer was attended once, and otherwise rolls every sequence back to where it was.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import struct
import tempfile
import threading

import numpy as np

from ruvpy import _kernels, _kvcache
from ruvpy._kvcache import KVCacheFull

__all__ = ["RuntimeConfig", "Runtime", "Step", "RuntimeStats", "SequenceFileError",
           "IncompleteStepError", "KV_CACHE_KINDS"]

KV_CACHE_KINDS = ("paged", "two-tier", "turbo")
KV_DTYPES = ("float16", "float32")
COLD_FORMATS = ("q8", "q4", "turbo")
POLICIES = ("error", "evict-oldest")
TURBO_BITS = (2.5, 3.5, 4.5)
DEFAULT_MAX_TOKENS = 8192
MAX_HEAD_DIM = 256
MiB = 1 << 20
METADATA_ALLOWANCE_MIN = 8 * 1024     # of a memory_budget, kept for the cache's bookkeeping
METADATA_ALLOWANCE_MAX = MiB


class IncompleteStepError(RuntimeError):
    """A step's `with` block ended normally without attending every layer exactly once; the
    step was rolled back (committing it would leave layers with different lengths)."""


class SequenceFileError(ValueError):
    """A saved sequence file is corrupt, truncated, of another format version or made for a
    different configuration. Nothing was changed."""


# ----------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------

def _int_field(name, value, *, minimum=1, maximum=None, optional=False):
    if value is None and optional:
        return
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        kind = "an int or None" if optional else "an int"
        raise TypeError(f"RuntimeConfig.{name} must be {kind}, got {type(value).__name__} "
                        f"{value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"RuntimeConfig.{name} must be {bound}, got {value}")


def _choice_field(name, value, choices, *, optional=False):
    if value is None and optional:
        return
    if value not in choices:
        raise ValueError(f"RuntimeConfig.{name} must be one of "
                         f"{', '.join(repr(c) for c in choices)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """Everything a Runtime is built from; validated on construction (TypeError / ValueError
    naming the field).

    Model shape: num_layers, num_heads (query heads), num_kv_heads (divides num_heads),
    head_dim (1..256).

    KV cache: kv_cache "paged" (fp16/fp32 blocks), "two-tier" (recent hot_tokens in fp16,
    older tokens packed as cold "q8"/"q4") or "turbo" (two-tier with TurboQuant cold store of
    turbo_bits 2.5/3.5/4.5 bits per value). max_tokens: token capacity of the cache (all
    sequences together, per layer). memory_budget: bytes the KV cache may allocate (storage
    and metadata) -- the capacity becomes what fits in it, capped by max_tokens when both are
    given; neither: 8192 tokens. A paged cache preallocates it: budget less a metadata
    allowance (1/64, 8 KiB..1 MiB) over its bytes_per_token. A two-tier cache also keeps an
    fp16 hot tier per sequence: the budget reserves hot tiers for max_sequences sequences
    (1 if None) and sizes the cold store at its worst-case bytes per token (q4 outlier
    channels included); adding a sequence whose hot tier no longer fits raises KVCacheFull.
    (A step appending more than hot_tokens + migration_batch tokens to one sequence holds
    them in fp16 until it ends: chunk long prefills to stay inside a tight budget.)
    max_sequences: live sequences at once (None: as many as fit). policy: when the cache is
    full, "error" raises KVCacheFull before anything is written; "evict-oldest" drops the
    oldest tokens (two-tier/turbo only; the paged cache keeps every token). block_size:
    tokens per paged block. group_size / migration_batch: cold quantisation group and
    hot-to-cold batch.

    Memory: arena_bytes for step-scoped buffers (step.alloc, attention outputs),
    scratch_bytes_per_thread, pool_buffers_per_class for the BufferPool. threads: kernel
    threads during this runtime's steps (None: leave the process-wide setting).
    """

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_tokens: int | None = None
    kv_cache: str = "paged"
    kv_dtype: str = "float16"
    memory_budget: int | None = None
    threads: int | None = None
    max_sequences: int | None = None
    block_size: int = 16
    hot_tokens: int = 256
    cold: str | None = None
    group_size: int = 32
    migration_batch: int = 64
    turbo_bits: float = 3.5
    policy: str = "error"
    arena_bytes: int = 64 * MiB
    scratch_bytes_per_thread: int = 256 * 1024
    pool_buffers_per_class: int = 32

    def __post_init__(self):
        _int_field("num_layers", self.num_layers)
        _int_field("num_heads", self.num_heads)
        _int_field("num_kv_heads", self.num_kv_heads)
        _int_field("head_dim", self.head_dim, maximum=MAX_HEAD_DIM)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"RuntimeConfig: num_heads ({self.num_heads}) must be a multiple "
                             f"of num_kv_heads ({self.num_kv_heads})")
        _int_field("max_tokens", self.max_tokens, optional=True)
        _int_field("memory_budget", self.memory_budget, optional=True)
        _int_field("threads", self.threads, optional=True)
        _int_field("max_sequences", self.max_sequences, optional=True)
        _int_field("block_size", self.block_size)
        _int_field("hot_tokens", self.hot_tokens)
        _int_field("group_size", self.group_size)
        _int_field("migration_batch", self.migration_batch)
        _int_field("arena_bytes", self.arena_bytes)
        _int_field("scratch_bytes_per_thread", self.scratch_bytes_per_thread)
        _int_field("pool_buffers_per_class", self.pool_buffers_per_class)
        _choice_field("kv_cache", self.kv_cache, KV_CACHE_KINDS)
        _choice_field("kv_dtype", self.kv_dtype, KV_DTYPES)
        _choice_field("cold", self.cold, COLD_FORMATS, optional=True)
        _choice_field("policy", self.policy, POLICIES)
        if self.turbo_bits not in TURBO_BITS or isinstance(self.turbo_bits, bool):
            raise ValueError(f"RuntimeConfig.turbo_bits must be one of {TURBO_BITS}, "
                             f"got {self.turbo_bits!r}")
        if self.kv_cache == "paged":
            if self.policy != "error":
                raise ValueError("RuntimeConfig.policy 'evict-oldest' needs kv_cache "
                                 "'two-tier' or 'turbo' (the paged cache keeps every token "
                                 "and raises KVCacheFull when full)")
            if self.cold is not None:
                raise ValueError(f"RuntimeConfig.cold={self.cold!r} applies to the two-tier "
                                 f"caches, not kv_cache 'paged'")
        else:
            if self.kv_dtype != "float16":
                raise ValueError(f"RuntimeConfig.kv_dtype={self.kv_dtype!r}: the two-tier "
                                 f"caches keep their hot tier in float16 (kv_dtype applies to "
                                 f"kv_cache 'paged')")
            if self.kv_cache == "turbo" and self.cold not in (None, "turbo"):
                raise ValueError(f"RuntimeConfig: kv_cache 'turbo' has a TurboQuant cold store; "
                                 f"cold={self.cold!r} contradicts it")

    @property
    def cold_format(self):
        """The cold store's format ("q8", "q4", "turbo"), or None for the paged cache."""
        if self.kv_cache == "paged":
            return None
        if self.kv_cache == "turbo":
            return "turbo"
        return self.cold or "q4"

    def cache_options(self):
        """Keyword options of the KV cache class (besides shape and max_tokens)."""
        if self.kv_cache == "paged":
            return {"block_size": self.block_size, "dtype": self.kv_dtype}
        options = {"hot_tokens": self.hot_tokens, "cold": self.cold_format,
                   "group_size": self.group_size, "migration_batch": self.migration_batch,
                   "policy": self.policy}
        if self.cold_format == "turbo":
            options["turbo_bits"] = self.turbo_bits
        return options

    def storage_fields(self):
        """The fields that fix how a sequence's K/V are stored: a saved sequence loads only
        into a runtime whose fields agree."""
        fields = {"kv_cache": "paged" if self.kv_cache == "paged" else "two-tier",
                  "num_layers": self.num_layers, "num_heads": self.num_heads,
                  "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim}
        if self.kv_cache == "paged":
            fields["kv_dtype"] = self.kv_dtype
        else:
            fields.update(cold=self.cold_format, group_size=self.group_size)
            if self.cold_format == "turbo":
                fields["turbo_bits"] = self.turbo_bits
        return fields

    def as_dict(self):
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------
# sequence files
# ----------------------------------------------------------------------------------------
# Layout (little-endian):
#   preamble   magic "RUVPYSEQ", u32 format version, u32 reserved (0), u64 header bytes,
#              u64 data bytes
#   header     UTF-8 JSON: {"config": storage fields, "position": int, "meta": cache meta,
#              "arrays": [{"name", "dtype", "shape", "offset", "nbytes"}, ...]}
#   padding    zeros up to a multiple of 64 bytes from the start of the file
#   data       the arrays' raw bytes at their offsets (multiples of 64, relative to data)
#   checksum   SHA-256 of every byte before it
FILE_MAGIC = b"RUVPYSEQ"
FILE_VERSION = 1
_PREAMBLE = struct.Struct("<8sIIQQ")
_DIGEST_BYTES = 32
_ALLOWED_DTYPE_KINDS = "fiub"   # plain numbers only: never objects or structured records


def _align64(n):
    return (n + 63) & ~63


def _array_dtype(a, name):
    if a.dtype.kind not in _ALLOWED_DTYPE_KINDS or a.dtype.fields is not None:
        raise TypeError(f"array {name!r} has dtype {a.dtype}; only numeric arrays can be saved")
    return a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype


def write_sequence_file(path, header, arrays):
    """Write `header` (JSON-able dict) and `arrays` (name -> numpy array) to `path`
    atomically: into a temporary file in the same directory, fsync'ed, then renamed over
    `path`, so a reader sees the old file or the whole new one."""
    directory, entries, blobs, offset = [], [], [], 0
    for name, array in arrays.items():
        a = np.asarray(array)
        dtype = _array_dtype(a, name)
        a = np.ascontiguousarray(a, dtype=dtype)
        entries.append({"name": str(name), "dtype": dtype.str, "shape": list(a.shape),
                        "offset": offset, "nbytes": a.nbytes})
        blobs.append((offset, a))
        offset = _align64(offset + a.nbytes)
    data_bytes = offset
    header = dict(header, arrays=entries)
    header_json = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    data_start = _align64(_PREAMBLE.size + len(header_json))
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".",
                               suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            digest = hashlib.sha256()

            def put(chunk):
                digest.update(chunk)
                f.write(chunk)

            put(_PREAMBLE.pack(FILE_MAGIC, FILE_VERSION, 0, len(header_json), data_bytes))
            put(header_json)
            put(bytes(data_start - _PREAMBLE.size - len(header_json)))
            written = 0
            for blob_offset, a in blobs:
                put(bytes(blob_offset - written))
                put(a.reshape(-1).view(np.uint8).data)
                written = blob_offset + a.nbytes
            put(bytes(data_bytes - written))
            f.write(digest.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_sequence_file(path):
    """(header dict, {name: array}) of a file written by write_sequence_file. Raises
    SequenceFileError naming the problem (not a sequence file, other version, truncated,
    checksum mismatch, malformed header or array directory)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buffer = bytearray(size)
        if f.readinto(buffer) != size:
            raise SequenceFileError(f"{path}: could not read all {size} bytes")
    where = f"{path}"
    if size < _PREAMBLE.size + _DIGEST_BYTES:
        if buffer[:len(FILE_MAGIC)] != FILE_MAGIC[:min(size, len(FILE_MAGIC))] or size == 0:
            raise SequenceFileError(f"{where}: not a ruvpy sequence file (bad magic)")
        raise SequenceFileError(f"{where}: truncated ({size} bytes, shorter than the "
                                f"{_PREAMBLE.size + _DIGEST_BYTES}-byte minimum)")
    magic, version, _, header_bytes, data_bytes = _PREAMBLE.unpack_from(buffer)
    if magic != FILE_MAGIC:
        raise SequenceFileError(f"{where}: not a ruvpy sequence file (bad magic {magic!r})")
    if version != FILE_VERSION:
        raise SequenceFileError(f"{where}: format version {version}; this ruvpy reads "
                                f"version {FILE_VERSION}")
    data_start = _align64(_PREAMBLE.size + header_bytes)
    expected = data_start + data_bytes + _DIGEST_BYTES
    if size != expected:
        state = "truncated" if size < expected else "has trailing bytes"
        raise SequenceFileError(f"{where}: {state} ({size} bytes, the preamble says "
                                f"{expected})")
    body = memoryview(buffer)[:size - _DIGEST_BYTES]
    if hashlib.sha256(body).digest() != bytes(buffer[size - _DIGEST_BYTES:]):
        raise SequenceFileError(f"{where}: corrupt (SHA-256 checksum mismatch)")
    try:
        header = json.loads(bytes(buffer[_PREAMBLE.size:_PREAMBLE.size + header_bytes]))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SequenceFileError(f"{where}: malformed JSON header ({exc})") from None
    if not isinstance(header, dict) or not isinstance(header.get("arrays"), list):
        raise SequenceFileError(f"{where}: the header has no array directory")
    arrays = {}
    data = memoryview(buffer)[data_start:data_start + data_bytes]
    for entry in header.pop("arrays"):
        name, array = _array_from_entry(entry, data, where)
        if name in arrays:
            raise SequenceFileError(f"{where}: array {name!r} appears twice")
        arrays[name] = array
    return header, arrays


def _array_from_entry(entry, data, where):
    try:
        name = entry["name"]
        dtype = np.dtype(entry["dtype"])
        shape = tuple(int(s) for s in entry["shape"])
        offset, nbytes = int(entry["offset"]), int(entry["nbytes"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SequenceFileError(f"{where}: malformed array entry {entry!r} ({exc})") from None
    if not isinstance(name, str) or dtype.kind not in _ALLOWED_DTYPE_KINDS or dtype.fields:
        raise SequenceFileError(f"{where}: array entry {entry!r} has a bad name or dtype")
    if any(s < 0 for s in shape) or math.prod(shape) * dtype.itemsize != nbytes:
        raise SequenceFileError(f"{where}: array {name!r}: shape {list(shape)} of {dtype} "
                                f"does not make {nbytes} bytes")
    if offset < 0 or offset % 64 or offset + nbytes > len(data):
        raise SequenceFileError(f"{where}: array {name!r} lies outside the data section "
                                f"(offset {offset}, {nbytes} bytes of {len(data)})")
    array = np.frombuffer(data, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset)
    return name, array.reshape(shape)


# ----------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------

def _human_bytes(n):
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def _table(title, header, rows):
    """An aligned text table: numbers right-aligned, text left-aligned."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(_looks_numeric(r[i]) for r in cells[1:]) and len(cells) > 1
               for i in range(len(header))]

    def line(row):
        return "  ".join(c.rjust(w) if num else c.ljust(w)
                         for c, w, num in zip(row, widths, numeric)).rstrip()

    rule = "-" * len(line(cells[0]))
    return "\n".join([title, line(cells[0]), rule] + [line(r) for r in cells[1:]])


def _looks_numeric(text):
    head = text.split(" ")[0].rstrip("%")
    try:
        float(head)
        return True
    except ValueError:
        return text in ("-", "")


@dataclasses.dataclass
class RuntimeStats:
    """Where a Runtime's memory is, at one moment. All sizes in bytes.

    arena: capacity, used, remaining, high_water_mark, allocation_count, reset_count;
    pool: hits, misses, allocations, returns, drops, pooled_bytes, outstanding_bytes;
    scratch_bytes; kv: kind, capacity_tokens, tokens (held now), bytes (allocated now, all
    tiers and metadata: what the budget caps), bytes_in_use (token storage in use),
    bytes_per_token, details (the cache's own counters: blocks, fragmentation, ...), tiers
    {name: {tokens, bytes}}, layers [{layer, tokens, bytes}], sequences [{seq, position,
    tokens, bytes}] (position: tokens ever appended = next RoPE position; tokens: held now,
    fewer after evictions; bytes: a shared block's bytes are split among its holders);
    budget_bytes / budget_used_pct (None without a memory_budget); rss_bytes /
    rss_growth_bytes (process resident memory, and its growth since the runtime was
    created); steps (committed), rollbacks, attention_calls, arena_fallbacks (attention
    outputs that did not fit the arena and were allocated by numpy).
    """

    arena: dict
    pool: dict
    scratch_bytes: int
    kv: dict
    budget_bytes: int | None
    budget_used_pct: float | None
    rss_bytes: int
    rss_growth_bytes: int
    steps: int
    rollbacks: int
    attention_calls: int
    arena_fallbacks: int
    weights: dict | None = None   # attach_weights(): path, mapped_bytes, resident_bytes, nbytes

    def as_dict(self):
        """A JSON-able dict (plain ints, floats, strings, lists, dicts)."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=_json_default))

    def format(self):
        """The statistics as aligned text tables."""
        a, p, kv = self.arena, self.pool, self.kv
        budget = ("-" if self.budget_bytes is None else
                  f"{_human_bytes(self.budget_bytes)}, {self.budget_used_pct:.1f}% used")
        summary = [
            ("KV cache", f"{kv['kind']}, capacity {kv['capacity_tokens']} tokens, "
                         f"{_human_bytes(kv['bytes'])} allocated"),
            ("KV in use", f"{kv['tokens']} tokens held ("
                          f"{100 * kv['tokens'] / max(1, kv['capacity_tokens']):.1f}% of "
                          f"capacity), {_human_bytes(kv['bytes_in_use'])} of token storage"),
            ("KV details", ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in kv.get("details", {}).items()
                                     if k not in _DETAILS_SHOWN_ELSEWHERE) or "-"),
            ("KV budget", budget),
            ("arena", f"{_human_bytes(a['used'])} used of {_human_bytes(a['capacity'])}, "
                      f"high water {_human_bytes(a['high_water_mark'])}"),
            ("buffer pool", f"{p['hits']} hits, {p['misses']} misses, {p['allocations']} "
                            f"allocations, {p['returns']} returns, {p['drops']} drops, "
                            f"{_human_bytes(p['pooled_bytes'])} pooled"),
            ("scratch", _human_bytes(self.scratch_bytes)),
            ("weights", "-" if self.weights is None else
             f"{_human_bytes(self.weights['mapped_bytes'])} mapped, "
             f"{_human_bytes(self.weights['resident_bytes'])} resident "
             f"({os.path.basename(self.weights['path'])})"),
            ("process RSS", f"{_human_bytes(self.rss_bytes)} "
                            f"({self.rss_growth_bytes / MiB:+.2f} MiB since start)"),
            ("steps", f"{self.steps} committed, {self.rollbacks} rolled back, "
                      f"{self.attention_calls} attention calls, {self.arena_fallbacks} "
                      f"arena fallbacks"),
        ]
        width = max(len(k) for k, _ in summary)
        parts = ["ruvpy runtime memory",
                 "\n".join(f"  {k.ljust(width)}  {v}" for k, v in summary)]
        parts.append(_table("KV tiers", ("tier", "tokens", "bytes"),
                            [(name, t["tokens"], t["bytes"]) for name, t in kv["tiers"].items()]))
        parts.append(_table("KV per layer", ("layers", "tokens", "bytes"),
                            _layer_runs(kv["layers"])))
        parts.append(_table("KV per sequence", ("seq", "position", "tokens", "bytes"),
                            [(r["seq"], r["position"], r["tokens"], r["bytes"])
                             for r in kv["sequences"]]))
        return "\n\n".join(parts)

    def __str__(self):
        return self.format()


# cache stats fields that format() leaves out of "KV details" (shown elsewhere or shape)
_DETAILS_SHOWN_ELSEWHERE = {"num_layers", "num_kv_heads", "head_dim", "tokens"}


def _layer_runs(layers):
    """Table rows for per-layer stats, consecutive layers with equal counts on one row
    ("0-29", tokens, bytes: each)."""
    rows = []
    for r in layers:
        if rows and rows[-1][1:] == [r["tokens"], r["bytes"]] and \
                rows[-1][0][-1] == r["layer"] - 1:
            rows[-1][0].append(r["layer"])
        else:
            rows.append([[r["layer"]], r["tokens"], r["bytes"]])
    return [(_ranges(run), tokens, nbytes) for run, tokens, nbytes in rows]


def _json_default(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if hasattr(value, "_asdict"):
        return value._asdict()
    raise TypeError(f"{type(value).__name__} is not JSON-able")


# ----------------------------------------------------------------------------------------
# steps
# ----------------------------------------------------------------------------------------

_PLANNED, _OPEN, _CLOSED = "planned", "open", "closed"
_F32 = np.dtype(np.float32)
_F16 = np.dtype(np.float16)


class Step:
    """One forward step over some sequences: made by `Runtime.step(seqs, n_tokens)`, used as
    a context manager.

    Entering plans it: the KV cache reserves room for n_tokens[i] more tokens of seqs[i] in
    every layer (KVCacheFull, or eviction of the oldest cold tokens under policy
    "evict-oldest") and opens a transaction. Inside, `attention(layer, q, k, v)` appends the
    step's K/V to `layer` and attends, once per layer, for all sequences in one call.
    Leaving commits when the block ended normally and every layer was attended exactly once.
    An exception rolls every sequence back to its state before the step and propagates; a
    block that ends normally with layers left unattended is rolled back too and raises
    IncompleteStepError. The arena is reset either way: arrays from step.alloc() and the
    attention outputs are only valid inside the step (copy what you keep).

    q is [num_tokens, num_heads, head_dim] float32 and k, v are [num_tokens, num_kv_heads,
    head_dim] float32 or float16: the concatenation over the step's sequences in order
    (rows seq_offsets[i]:seq_offsets[i+1] belong to seqs[i]).
    """

    __slots__ = ("_runtime", "_cache", "_arena", "_seqs", "_n_tokens", "num_tokens",
                 "_starts", "_positions", "_offsets", "_attended", "_remaining", "_q_shape",
                 "_kv_shape", "_num_layers", "_state", "_failed", "_calls", "_fallbacks",
                 "_threads_before", "_txn_seqs")

    def __init__(self, runtime, seqs, n_tokens):
        cfg = runtime.config
        self._runtime = runtime
        self._cache = runtime._cache
        self._arena = runtime._memory.arena
        self._seqs = seqs
        self._n_tokens = n_tokens
        self.num_tokens = sum(n_tokens)
        self._q_shape = (self.num_tokens, cfg.num_heads, cfg.head_dim)
        self._kv_shape = (self.num_tokens, cfg.num_kv_heads, cfg.head_dim)
        self._num_layers = cfg.num_layers
        self._attended = [False] * cfg.num_layers
        self._remaining = cfg.num_layers
        self._state = _PLANNED
        self._failed = False
        self._calls = self._fallbacks = 0
        self._starts = self._positions = self._offsets = None
        self._threads_before = None
        self._txn_seqs = self._seqs      # the sequences its KV transaction covers

    # -- the plan ---------------------------------------------------------------------------
    @property
    def seqs(self):
        """The step's sequence ids, in the order of q/k/v's rows."""
        return tuple(self._seqs)

    @property
    def n_tokens(self):
        return tuple(self._n_tokens)

    @property
    def seq_offsets(self):
        """int64 [len(seqs) + 1]: sequence i's rows are seq_offsets[i]:seq_offsets[i+1]."""
        if self._offsets is None:
            self._offsets = np.zeros(len(self._seqs) + 1, np.int64)
            np.cumsum(self._n_tokens, out=self._offsets[1:])
        return self._offsets

    @property
    def positions(self):
        """int64 [num_tokens]: each row's absolute position in its sequence (for RoPE):
        sequence i's rows are start_i, start_i + 1, ..., where start_i counts every token
        ever appended to it (evicted ones too)."""
        self._check_open()
        if self._positions is None:
            offsets = self.seq_offsets
            shift = np.asarray(self._starts, np.int64) - offsets[:-1]
            self._positions = np.arange(self.num_tokens, dtype=np.int64) + \
                np.repeat(shift, self._n_tokens)
        return self._positions

    @property
    def attended_layers(self):
        return [i for i, done in enumerate(self._attended) if done]

    # -- work -------------------------------------------------------------------------------
    def alloc(self, shape, dtype=np.float32):
        """Step-scoped arena memory: a C-contiguous, 64-byte aligned, uninitialised array,
        reclaimed when the step ends. ArenaExhausted when it does not fit."""
        self._check_open()
        return self._arena.alloc(shape, dtype)

    def attention(self, layer, q, k, v, *, scale=None, out=None):
        """Append k, v (this step's new tokens of every sequence) to `layer` and attend q
        over each sequence's whole context, causally; returns [num_tokens, num_heads,
        head_dim] float32 (`out` if given, else step-scoped arena memory). One call per
        layer per step. Bad input raises before anything is written."""
        if self._state is not _OPEN:
            self._check_open()
        if type(layer) is not int or not 0 <= layer < self._num_layers or self._attended[layer]:
            layer = self._layer_index(layer)
        try:
            ok = (q.shape == self._q_shape and k.shape == self._kv_shape and
                  v.shape == self._kv_shape and q.dtype is _F32 and
                  (k.dtype is _F16 or k.dtype is _F32) and v.dtype is k.dtype)
        except AttributeError:
            ok = False
        if not ok:
            self._check_inputs(q, k, v)
        if out is None:
            try:
                out = self._arena.alloc(self._q_shape)
            except MemoryError:
                # too large for what is left of the arena: numpy memory, counted in stats
                out = np.empty(self._q_shape, np.float32)
                self._fallbacks += 1
        else:
            self._check_out(out)
        try:
            self._cache.append_attend(layer, self._seqs, self._n_tokens, q, k, v, out=out,
                                      scale=scale)
        except (ValueError, TypeError, KeyError):
            raise   # the cache validates before writing: this layer is unchanged
        except BaseException:
            self._failed = True   # the cache may be half-way: the step can only roll back
            raise
        self._attended[layer] = True
        self._remaining -= 1
        self._calls += 1
        return out

    # -- checks (off the hot path) ----------------------------------------------------------
    def _check_open(self):
        if self._state is _OPEN:
            return
        self._runtime._check_open()
        if self._state is _PLANNED:
            raise RuntimeError("the step is not open: use it as `with runtime.step(seqs, "
                               "n_tokens) as step:`")
        raise RuntimeError("the step has ended (its arena memory is reclaimed); start a new "
                           "step")

    def _layer_index(self, layer):
        if isinstance(layer, (bool, np.bool_)) or not isinstance(layer, (int, np.integer)):
            raise TypeError(f"step.attention: layer must be an int, got "
                            f"{type(layer).__name__} {layer!r}")
        layer = int(layer)
        if not 0 <= layer < self._num_layers:
            raise ValueError(f"step.attention: layer {layer} is out of range (the runtime "
                             f"has layers 0..{self._num_layers - 1})")
        if self._attended[layer]:
            raise ValueError(f"step.attention: layer {layer} was already attended in this "
                             f"step (each layer appends its K/V once per step)")
        return layer

    def _check_inputs(self, q, k, v):
        plan = (f"the step plans {self.num_tokens} tokens (sequences {list(self._seqs)} with "
                f"{list(self._n_tokens)} tokens)")
        for name, a, shape in (("q", q, self._q_shape), ("k", k, self._kv_shape),
                               ("v", v, self._kv_shape)):
            if not isinstance(a, np.ndarray):
                raise TypeError(f"step.attention: {name} must be a numpy array, got "
                                f"{type(a).__name__}")
            if a.shape != shape:
                raise ValueError(f"step.attention: {name} has shape {list(a.shape)}, expected "
                                 f"{list(shape)}: {plan}")
        if q.dtype != _F32:
            raise TypeError(f"step.attention: q must be float32, got {q.dtype}")
        if k.dtype not in (_F32, _F16) or v.dtype != k.dtype:
            raise TypeError(f"step.attention: k and v must both be float32 or both float16, "
                            f"got {k.dtype} and {v.dtype}")

    def _check_out(self, out):
        if not isinstance(out, np.ndarray) or out.dtype != _F32 or out.shape != self._q_shape \
                or not out.flags.c_contiguous or not out.flags.writeable:
            desc = (f"{type(out).__name__}" if not isinstance(out, np.ndarray) else
                    f"{out.dtype} {list(out.shape)}")
            raise ValueError(f"step.attention: out must be a writeable C-contiguous float32 "
                             f"array of shape {list(self._q_shape)}, got {desc}")

    # -- lifecycle --------------------------------------------------------------------------
    def __enter__(self):
        self._runtime._open_step(self)
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._state is not _OPEN:
            return False     # the runtime was closed inside the step
        self._runtime._close_step(self, exc_type is None)
        return False

    def __repr__(self):
        return (f"<ruvpy.Step {self._state}: sequences {list(self._seqs)}, tokens "
                f"{list(self._n_tokens)}, {self._num_layers - self._remaining}/"
                f"{self._num_layers} layers attended>")


# ----------------------------------------------------------------------------------------
# the runtime
# ----------------------------------------------------------------------------------------

def _sequence_id(seq):
    if isinstance(seq, (bool, np.bool_)) or not isinstance(seq, (int, np.integer)):
        raise TypeError(f"a sequence id must be an int, got {type(seq).__name__} {seq!r}")
    return int(seq)


def _worst_cold_bytes_per_token(cache_class, cfg, options):
    """Bytes per token (all layers) of a cold group at its largest: a one-layer probe cache
    migrates one group of keys/values whose every head has as many outlier channels as the
    q4 format allows (channel ranges 1000 vs 1 for all but the lower half)."""
    group = cfg.migration_batch
    probe_options = dict(options, hot_tokens=0, policy="error")
    probe = cache_class(1, cfg.num_kv_heads, cfg.head_dim, max_tokens=2 * group,
                        **probe_options)
    try:
        seq = probe.add_sequence()
        wide = (np.arange(cfg.head_dim) < (cfg.head_dim - 1) // 2).astype(np.float32)
        ranges = 1.0 + 999.0 * wide
        signs = np.where(np.arange(group) % 2, 1.0, -1.0).astype(np.float32)
        kv = (signs[:, None, None] * ranges[None, None, :] *
              np.ones((group, cfg.num_kv_heads, 1), np.float32))
        probe.append(seq, 0, kv, kv)
        cold = probe.stats().tiers.get("cold", {}).get("bytes", 0)
        return cfg.num_layers * cold / group
    finally:
        probe.close()


def _process_rss():
    import psutil
    return psutil.Process().memory_info().rss


class Runtime:
    """Runtime(config): the arena, buffer pool, scratch and KV cache of one model, and the
    step lifecycle of its decode loop. See the module docstring and `Step`.

    Not for concurrent use from several Python threads: one step at a time (opening a second
    one raises RuntimeError); the kernels themselves run in parallel (config.threads).
    """

    _instances = itertools.count(1)
    # until __init__ completes (a failed construction leaves a closed, printable object)
    name = "Runtime"
    _closed = True
    _positions = {}

    def __init__(self, config):
        if not isinstance(config, RuntimeConfig):
            raise TypeError(f"Runtime needs a RuntimeConfig, got {type(config).__name__}")
        from ruvpy._memory import MemoryManager

        self.config = cfg = config
        self.name = f"Runtime#{next(Runtime._instances)}"
        cache_class = _kvcache.PagedKVCache if cfg.kv_cache == "paged" else \
            _kvcache.TwoTierKVCache
        options = cfg.cache_options()
        shape = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
        self.bytes_per_token = float(cache_class.bytes_per_token(*shape, **options))
        # What a memory budget must hold per token (worst case) and per sequence (the fp16 hot
        # tier of a two-tier cache); public, read-only by convention
        self.budget_bytes_per_token = self.bytes_per_token
        self.hot_tier_bytes = 0
        if cfg.kv_cache != "paged":
            self.hot_tier_bytes = int(cache_class.hot_tier_bytes(*shape, **options))
            if cfg.memory_budget is not None:
                self.budget_bytes_per_token = max(
                    self.bytes_per_token, _worst_cold_bytes_per_token(cache_class, cfg, options))
        self._cache = self._make_cache(cache_class, shape, options)
        self.capacity_tokens = int(getattr(self._cache, "capacity_tokens", 0)) or \
            self._kv_capacity()
        self.max_sequences = self._sequence_limit()
        self._memory = MemoryManager(cfg.arena_bytes, cfg.scratch_bytes_per_thread,
                                     pool_buffers_per_class=cfg.pool_buffers_per_class)
        self._positions = {}         # sequence id -> tokens ever appended (next position)
        self._step_lock = threading.Lock()
        self._step = None
        self._steps = self._rollbacks = self._attention_calls = self._arena_fallbacks = 0
        self._rss_at_start = _process_rss()
        self._weights = None
        self._closed = False

    def _make_cache(self, cache_class, shape, options):
        """The KV cache, sized by max_tokens and/or memory_budget. Under a budget, token
        storage gets the budget less a metadata allowance; should the cache still allocate
        more than the budget, it is rebuilt smaller."""
        cfg = self.config
        capacity = self._kv_capacity()
        for _ in range(8):
            cache = cache_class(*shape, max_tokens=capacity, **options)
            excess = 0 if cfg.memory_budget is None else cache.nbytes - cfg.memory_budget
            if excess <= 0:
                return cache
            cache.close()
            capacity -= max(1, math.ceil(excess / self.budget_bytes_per_token))
            if cfg.kv_cache == "paged":
                capacity -= capacity % cfg.block_size
            if capacity < 1:
                break
        raise ValueError(f"RuntimeConfig.memory_budget={cfg.memory_budget} bytes cannot hold a "
                         f"{cfg.kv_cache} KV cache of even one token with its metadata")

    def _metadata_allowance(self):
        return min(max(METADATA_ALLOWANCE_MIN, self.config.memory_budget // 64),
                   METADATA_ALLOWANCE_MAX)

    def _kv_capacity(self):
        """Tokens the KV cache is built for: max_tokens, and what fits in the memory budget
        less a metadata allowance (block tables, bookkeeping) and the reserved hot tiers."""
        cfg = self.config
        capacity = cfg.max_tokens
        if cfg.memory_budget is not None:
            allowance = self._metadata_allowance()
            hot = self.hot_tier_bytes * (cfg.max_sequences or 1)
            fitting = int(max(0, cfg.memory_budget - allowance - hot) //
                          self.budget_bytes_per_token)
            if cfg.kv_cache == "paged":
                fitting -= fitting % cfg.block_size
            if fitting < 1:
                raise ValueError(
                    f"RuntimeConfig.memory_budget={cfg.memory_budget} bytes holds no token: one "
                    f"token of all {cfg.num_layers} layers costs "
                    f"{self.budget_bytes_per_token:.0f} bytes in a {cfg.kv_cache} cache"
                    + (f" (blocks of {cfg.block_size})" if cfg.kv_cache == "paged" else
                       f", after fp16 hot tiers of {hot} bytes for "
                       f"{cfg.max_sequences or 1} sequence(s)")
                    + f" and a {allowance}-byte metadata allowance")
            capacity = fitting if capacity is None else min(capacity, fitting)
        return DEFAULT_MAX_TOKENS if capacity is None else capacity

    def _sequence_limit(self):
        """Live sequences allowed at once: max_sequences, and for a two-tier cache under a
        budget, as many hot tiers as the budget holds next to a full cold store."""
        cfg = self.config
        if cfg.memory_budget is None or not self.hot_tier_bytes:
            return cfg.max_sequences
        spare = (cfg.memory_budget - self._metadata_allowance() -
                 self.capacity_tokens * self.budget_bytes_per_token)
        fitting = max(1, int(spare // self.hot_tier_bytes))
        return fitting if cfg.max_sequences is None else min(fitting, cfg.max_sequences)

    def _check_room_for_sequence(self, action):
        if self.max_sequences is not None and len(self._positions) >= self.max_sequences:
            why = (f"max_sequences={self.config.max_sequences}"
                   if self.config.max_sequences == self.max_sequences else
                   f"memory_budget={self.config.memory_budget} bytes has room for the fp16 hot "
                   f"tiers ({self.hot_tier_bytes} bytes each) of {self.max_sequences} "
                   f"sequence(s) next to a full cold store; set RuntimeConfig.max_sequences "
                   f"to plan for more")
            raise KVCacheFull(f"{self.name}: cannot {action}: {len(self._positions)} sequences "
                              f"are live and {why}")

    # -- state checks -----------------------------------------------------------------------
    def _check_open(self):
        if self._closed:
            raise RuntimeError(f"{self.name} is closed: it has no KV cache or arena any more "
                               f"(make a new Runtime)")

    def _check_no_step(self, action):
        self._check_open()
        if self._step is not None:
            raise RuntimeError(f"{self.name}: cannot {action} while a step is open (sequences "
                               f"{list(self._step._seqs)}); finish the step first")

    def _known(self, seq):
        seq = _sequence_id(seq)
        if seq not in self._positions:
            raise KeyError(f"unknown sequence {seq} ({self.name} has sequences "
                           f"{sorted(self._positions)})")
        return seq

    # -- sequences --------------------------------------------------------------------------
    @property
    def sequences(self):
        """Ids of the live sequences, in creation order."""
        self._check_open()
        return list(self._positions)

    def add_sequence(self):
        """A new, empty sequence; returns its id."""
        self._check_no_step("add a sequence")
        self._check_room_for_sequence("add a sequence")
        seq = self._cache.add_sequence()
        self._positions[seq] = 0
        return seq

    def fork_sequence(self, seq):
        """A new sequence with the same context as `seq` (sharing its storage until either
        one appends); returns its id."""
        self._check_no_step("fork a sequence")
        seq = self._known(seq)
        self._check_room_for_sequence("fork a sequence")
        child = self._cache.fork(seq)
        self._positions[child] = self._positions[seq]
        return child

    def remove_sequence(self, seq):
        """Free `seq`'s KV storage; its id becomes unknown."""
        self._check_no_step("remove a sequence")
        seq = self._known(seq)
        self._cache.free(seq)
        del self._positions[seq]

    def position(self, seq):
        """Tokens ever appended to `seq`: the position its next token takes."""
        self._check_open()
        return self._positions[self._known(seq)]

    def seq_len(self, seq, layer=0):
        """Tokens of `seq` held in the KV cache now (less than position() after evictions)."""
        self._check_open()
        return self._cache.seq_len(self._known(seq), layer)

    def get_kv(self, seq, layer):
        """(k, v) float32 copies [seq_len, num_kv_heads, head_dim] of `seq` in `layer`."""
        self._check_open()
        return self._cache.get_kv(self._known(seq), layer)

    @property
    def cache(self):
        """The KV cache (PagedKVCache or TwoTierKVCache) the runtime drives."""
        self._check_open()
        return self._cache

    @property
    def arena(self):
        self._check_open()
        return self._memory.arena

    @property
    def pool(self):
        self._check_open()
        return self._memory.pool

    @property
    def scratch(self):
        self._check_open()
        return self._memory.scratch

    # -- steps ------------------------------------------------------------------------------
    def step(self, seqs, n_tokens):
        """A Step appending n_tokens[i] tokens to seqs[i] (use it as a context manager).
        Sequences are unique live ids; each count >= 1."""
        self._check_open()
        try:
            seqs = [self._known(s) for s in seqs]
            n_tokens = list(n_tokens)
        except TypeError as exc:
            if "sequence id" in str(exc):
                raise
            raise TypeError(f"step(seqs, n_tokens) takes two sequences of ints, got "
                            f"{type(seqs).__name__} and {type(n_tokens).__name__}") from None
        if not seqs:
            raise ValueError("a step needs at least one sequence")
        if len(n_tokens) != len(seqs):
            raise ValueError(f"step: {len(seqs)} sequences but {len(n_tokens)} token counts")
        if len(set(seqs)) != len(seqs):
            raise ValueError(f"step: sequences {seqs} repeat an id (each sequence appears "
                             f"once; give it all its tokens)")
        for seq, n in zip(seqs, n_tokens):
            if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
                raise TypeError(f"step: token count of sequence {seq} must be an int, got "
                                f"{type(n).__name__} {n!r}")
            if n < 1:
                raise ValueError(f"step: token count of sequence {seq} must be >= 1, got {n}")
        return Step(self, seqs, [int(n) for n in n_tokens])

    def _open_step(self, step):
        """Step.__enter__: take the step slot, reserve KV room, begin the transaction."""
        self._check_open()
        if step._state is not _PLANNED:
            raise RuntimeError("a Step can be entered only once; make a new one with "
                               "runtime.step(...)")
        if not self._step_lock.acquire(blocking=False):
            raise RuntimeError(f"{self.name}: another step is open (sequences "
                               f"{list(self._step._seqs) if self._step else '?'}); steps of "
                               f"one runtime run one at a time")
        try:
            for seq in step._seqs:     # still alive since step() checked them?
                self._known(seq)
            step._starts = [self._positions[s] for s in step._seqs]
            step._txn_seqs = self._reserve_in_transaction(step._seqs, step._n_tokens)
        except BaseException:
            self._step_lock.release()
            raise
        if self.config.threads is not None:
            step._threads_before = _kernels.get_num_threads()
            _kernels.set_num_threads(self.config.threads)
        self._step = step
        step._state = _OPEN

    def _reserve_in_transaction(self, seqs, n_tokens):
        """Open the step's KV transaction, then reserve its room inside it: whatever eviction
        (policy "evict-oldest") takes to make room comes back if the step rolls back. Inside
        a transaction only its own sequences may give up tokens, so when the step's
        sequences cannot make the room the transaction is widened to every live sequence.
        Returns the sequences the transaction covers."""
        cache = self._cache
        cache.begin(seqs)
        try:
            cache.reserve(seqs, n_tokens)
            return seqs
        except KVCacheFull:
            cache.rollback(seqs)
            if self.config.policy != "evict-oldest" or len(self._positions) == len(seqs):
                raise
        except BaseException:
            cache.rollback(seqs)
            raise
        everyone = list(self._positions)
        cache.begin(everyone)
        try:
            cache.reserve(seqs, n_tokens)
        except BaseException:
            cache.rollback(everyone)
            raise
        return everyone

    def _close_step(self, step, ok):
        """Step.__exit__: commit or roll back, reset the arena, free the step slot."""
        step._state = _CLOSED
        cache, seqs = self._cache, step._txn_seqs
        try:
            if ok and not step._failed and step._remaining == 0:
                try:
                    cache.commit(seqs)
                except BaseException:
                    cache.rollback(seqs)
                    self._rollbacks += 1
                    raise
                for seq, n in zip(seqs, step._n_tokens):
                    self._positions[seq] += n
                self._steps += 1
                return
            cache.rollback(seqs)
            self._rollbacks += 1
            if ok:
                if step._failed:
                    raise RuntimeError("the step was rolled back: a KV cache call inside it "
                                       "failed (its exception was caught inside the step)")
                missing = [i for i, done in enumerate(step._attended) if not done]
                raise IncompleteStepError(
                    f"the step ended with layers {_ranges(missing)} of {step._num_layers} not "
                    f"attended; it was rolled back (every layer must be attended once per "
                    f"step, or raise inside the step to abandon it)")
        finally:
            self._attention_calls += step._calls
            self._arena_fallbacks += step._fallbacks
            self._memory.arena.reset()
            if step._threads_before is not None:
                _kernels.set_num_threads(step._threads_before)
            self._step = None
            self._step_lock.release()

    # -- whole runtime ----------------------------------------------------------------------
    def reset(self):
        """Drop every sequence (their KV storage is freed) and reset the arena."""
        self._check_no_step("reset")
        for seq in list(self._positions):
            self._cache.free(seq)
            del self._positions[seq]
        self._memory.arena.reset()

    def close(self):
        """Free the KV cache, arena, pool and scratch. Idempotent; afterwards every method
        raises RuntimeError. Closing inside a step abandons the step."""
        if self._closed:
            return
        self._closed = True
        step, self._step = self._step, None
        if step is not None:
            step._state = _CLOSED
            self._step_lock.release()
        cache, self._cache = self._cache, None
        memory, self._memory = self._memory, None
        self._positions = {}
        close_cache = getattr(cache, "close", None)
        if close_cache is not None:
            close_cache()
        memory.close()

    @property
    def closed(self):
        return self._closed

    def __enter__(self):
        self._check_open()
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        cfg = self.config
        state = "closed" if self._closed else f"{len(self._positions)} sequences"
        return (f"<ruvpy.{self.name} {cfg.kv_cache} KV, {cfg.num_layers} layers, "
                f"{cfg.num_heads}/{cfg.num_kv_heads} heads x {cfg.head_dim}: {state}>")

    # -- persistence ------------------------------------------------------------------------
    def save_sequence(self, seq, path):
        """Write `seq`'s K/V (in the cache's stored format: quantized tiers stay quantized)
        to `path`: versioned, SHA-256 checksummed, written atomically."""
        self._check_open()
        seq = self._known(seq)
        if self._step is not None and seq in self._step._txn_seqs:
            # the open step's transaction covers it (its own, or one eviction may take from)
            raise RuntimeError(f"{self.name}: cannot save sequence {seq} while a step on it is "
                               f"open")
        meta, arrays = self._cache.export_sequence(seq)
        header = {"format": "ruvpy-sequence", "config": self.config.storage_fields(),
                  "position": self._positions[seq], "meta": meta}
        write_sequence_file(path, header, arrays)

    def load_sequence(self, path):
        """A new sequence holding the K/V saved in `path`; returns its id. A corrupt,
        truncated or mismatched file raises SequenceFileError (a ValueError) and changes
        nothing; a full cache raises KVCacheFull."""
        self._check_no_step("load a sequence")
        header, arrays = read_sequence_file(path)
        path = os.fspath(path)
        mine = self.config.storage_fields()
        theirs = header.get("config")
        if header.get("format") != "ruvpy-sequence" or not isinstance(theirs, dict):
            raise SequenceFileError(f"{path}: not a ruvpy sequence snapshot header")
        if theirs != mine:
            diffs = [f"{k}: file {theirs.get(k)!r}, runtime {mine.get(k)!r}"
                     for k in sorted(set(mine) | set(theirs)) if theirs.get(k) != mine.get(k)]
            raise SequenceFileError(f"{path}: saved for another configuration ("
                                    + "; ".join(diffs) + ")")
        position, meta = header.get("position"), header.get("meta")
        if type(position) is not int or position < 0 or not isinstance(meta, dict):
            raise SequenceFileError(f"{path}: the header's position/meta are malformed")
        self._check_room_for_sequence("load a sequence")
        try:
            seq = self._cache.import_sequence(meta, arrays)
        except (ValueError, TypeError, KeyError) as exc:
            raise SequenceFileError(f"{path}: the KV cache rejects its contents: {exc}") \
                from exc
        self._positions[seq] = position
        return seq

    def attach_weights(self, weights):
        """Report `weights` in stats(): an object with .path, .mapped_bytes, .nbytes and
        .resident_bytes() (a model's memory-mapped GGUF weights, ruvpy.models.LlamaWeights)."""
        self._check_open()
        self._weights = weights

    # -- statistics -------------------------------------------------------------------------
    def stats(self):
        """A RuntimeStats snapshot (see its docstring); .format() for a table."""
        self._check_open()
        memory = self._memory.stats()
        kv = self._cache.stats()
        kv_bytes = int(self._cache.nbytes)
        tiers = _kv_tiers(kv)
        budget = self.config.memory_budget
        rss = _process_rss()
        return RuntimeStats(
            arena=memory.arena._asdict(),
            pool={k: v for k, v in memory.pool._asdict().items() if k != "free_buffers"},
            scratch_bytes=int(memory.scratch_bytes),
            kv={"kind": self.config.kv_cache, "capacity_tokens": self.capacity_tokens,
                "tokens": int(kv.tokens), "bytes": kv_bytes,
                "bytes_in_use": sum(t["bytes"] for t in tiers.values()),
                "bytes_per_token": self.bytes_per_token, "details": _kv_details(kv),
                "tiers": tiers, "layers": _kv_layers(kv),
                "sequences": [{"seq": s, "position": p, **_kv_sequence(kv, s)}
                              for s, p in self._positions.items()]},
            budget_bytes=budget,
            budget_used_pct=None if budget is None else 100.0 * kv_bytes / budget,
            rss_bytes=rss, rss_growth_bytes=rss - self._rss_at_start,
            steps=self._steps, rollbacks=self._rollbacks,
            attention_calls=self._attention_calls, arena_fallbacks=self._arena_fallbacks,
            weights=None if self._weights is None else {
                "path": self._weights.path, "mapped_bytes": int(self._weights.mapped_bytes),
                "resident_bytes": int(self._weights.resident_bytes()),
                "nbytes": int(self._weights.nbytes)})


def _ranges(indices):
    """[0, 1, 2, 5] -> '0-2, 5'."""
    parts, start = [], None
    for i, x in enumerate(indices):
        if start is None:
            start = x
        if i + 1 == len(indices) or indices[i + 1] != x + 1:
            parts.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ", ".join(parts)


def _kv_tiers(kv):
    return {str(name): {"tokens": int(t["tokens"]), "bytes": int(t["bytes"])}
            for name, t in kv.tiers.items()}


def _kv_layers(kv):
    return [{"layer": int(r["layer"]), "tokens": int(r["tokens"]), "bytes": int(r["bytes"])}
            for r in kv.layers]


def _kv_sequence(kv, seq):
    row = kv.sequences.get(seq, {})
    return {"tokens": int(row.get("tokens", 0)), "bytes": int(row.get("bytes", 0))}


def _kv_details(kv):
    """The cache-specific scalar fields of its stats (blocks, fragmentation, ...)."""
    return {k: v for k, v in kv.as_dict().items()
            if k not in ("tiers", "layers", "sequences", "bytes", "capacity_tokens", "kind")
            and isinstance(v, (int, float, str, bool))}
