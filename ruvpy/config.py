"""RuntimeConfig: everything a Runtime is built from, validated on construction. The limits it
checks (head_dim, TurboQuant bit widths, cold formats) are C's, read from the extensions
(csrc/rv_limits.h, the codec table)."""
from __future__ import annotations

import dataclasses
import operator

import numpy as np

from ruvpy._kernels import MAX_HEAD_DIM, MAX_INT, TURBO_BITS
from ruvpy._kvcache import COLD_FORMATS, turbo_widths_tuple

__all__ = ["RuntimeConfig", "KV_CACHE_KINDS", "KV_DTYPES", "COLD_FORMATS", "POLICIES", "TURBO_BITS",
           "DEFAULT_MAX_TOKENS", "MAX_HEAD_DIM", "MiB"]

KV_CACHE_KINDS = ("paged", "two-tier", "turbo")
KV_DTYPES = ("float16", "float32")
POLICIES = ("error", "evict-oldest")
DEFAULT_MAX_TOKENS = 8192
MiB = 1 << 20


INT64_MAX = 2 ** 63 - 1
MAX_THREADS = 1 << 16       # a ScratchSpace's (ruvpy._memory) most threads


def _int_field(config, name, *, minimum=1, maximum=INT64_MAX, optional=False):
    """config.<name> must be an int (numpy ints too; not bool, float or str) in [minimum,
    maximum]: every count and size is a 64-bit number in C, so a larger one is a ValueError
    here rather than an OverflowError later. It is stored back as an exact int, so that neither
    this check nor any later one calls an int subclass's own comparisons."""
    value = getattr(config, name)
    if value is None and optional:
        return
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        kind = "an int or None" if optional else "an int"
        raise TypeError(f"RuntimeConfig.{name} must be {kind}, got {type(value).__name__} "
                        f"{value!r}")
    value = operator.index(value)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum == INT64_MAX else f"in [{minimum}, {maximum}]"
        if value > maximum == INT64_MAX:
            bound = f"below 2**63"
        raise ValueError(f"RuntimeConfig.{name} must be {bound}, got {value}")
    object.__setattr__(config, name, value)


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
    turbo_bits 2.5/3.5/4.5 bits per value, or turbo_widths: each layer's own code widths, a
    (key_bits, value_bits) pair per layer, as ruvpy.kvplan.plan_turbo_widths picks them).
    max_tokens: token capacity of the cache (all sequences together, per layer).
    memory_budget: bytes the KV cache may allocate (storage and metadata) -- the capacity
    becomes what fits in it, capped by max_tokens when both are given; neither: 8192 tokens.
    A paged cache preallocates it: budget less a metadata allowance (1/64, 8 KiB..1 MiB) over
    its bytes_per_token. A two-tier cache also keeps an
    fp16 hot tier per sequence: the budget reserves hot tiers for max_sequences sequences
    (1 if None) and sizes the cold store at its worst-case bytes per token (q4 outlier
    channels included); adding a sequence whose hot tier no longer fits raises KVCacheFull.
    (Inside a step nothing migrates -- a rollback needs the sequence as it was: every token
    the step appends stays in fp16 until it ends, next to the up to hot_tokens +
    migration_batch - 1 the sequence held hot before, and cold groups it evicts keep their
    memory until then. Only one-token (decode) steps stay inside the budget throughout; a
    step appending n tokens to a sequence may exceed it by up to n - 1 of that sequence's
    fp16 tokens (all layers) and the groups it evicts -- with n = hot_tokens +
    migration_batch, 3 sequences of a 300 kB q4 budget reached 117%. Chunk long prefills
    small to stay close to a tight budget.)
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
    turbo_widths: tuple | None = None
    policy: str = "error"
    arena_bytes: int = 64 * MiB
    scratch_bytes_per_thread: int = 256 * 1024
    pool_buffers_per_class: int = 32

    def __post_init__(self):
        _int_field(self, "num_layers")
        _int_field(self, "num_heads")
        _int_field(self, "num_kv_heads")
        _int_field(self, "head_dim", maximum=MAX_HEAD_DIM)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"RuntimeConfig: num_heads ({self.num_heads}) must be a multiple "
                             f"of num_kv_heads ({self.num_kv_heads})")
        _int_field(self, "max_tokens", optional=True, maximum=MAX_INT)    # (what any cache holds)
        _int_field(self, "memory_budget", optional=True)
        _int_field(self, "threads", optional=True, maximum=MAX_THREADS)
        _int_field(self, "max_sequences", optional=True)
        _int_field(self, "block_size")
        _int_field(self, "hot_tokens")
        _int_field(self, "group_size")
        _int_field(self, "migration_batch")
        _int_field(self, "arena_bytes")
        _int_field(self, "scratch_bytes_per_thread")
        _int_field(self, "pool_buffers_per_class")
        _choice_field("kv_cache", self.kv_cache, KV_CACHE_KINDS)
        _choice_field("kv_dtype", self.kv_dtype, KV_DTYPES)
        _choice_field("cold", self.cold, COLD_FORMATS, optional=True)
        _choice_field("policy", self.policy, POLICIES)
        if self.turbo_bits not in TURBO_BITS or isinstance(self.turbo_bits, bool):
            raise ValueError(f"RuntimeConfig.turbo_bits must be one of {TURBO_BITS}, "
                             f"got {self.turbo_bits!r}")
        if self.turbo_widths is not None:
            if self.cold_format != "turbo":
                raise ValueError("RuntimeConfig.turbo_widths apply to the TurboQuant cold store "
                                 "(kv_cache 'turbo', or 'two-tier' with cold 'turbo') only")
            try:
                widths = turbo_widths_tuple(self.turbo_widths, self.num_layers, self.head_dim)
            except TypeError as e:
                raise TypeError(f"RuntimeConfig.{e}") from None
            except ValueError as e:
                raise ValueError(f"RuntimeConfig.{e}") from None
            object.__setattr__(self, "turbo_widths", widths)    # hashable, exact floats
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
        if self.memory_budget is not None:
            # the budget's sizing counts cold slabs holding the capacity's largest groups: with
            # blocks of one size any freed block serves any group, and the slabs stay within it
            options["uniform_slabs"] = True
        if self.cold_format == "turbo":
            options["turbo_bits"] = self.turbo_bits
            if self.turbo_widths is not None:
                options["turbo_widths"] = self.turbo_widths
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
                if self.turbo_widths is not None:
                    fields["turbo_widths"] = [list(w) for w in self.turbo_widths]
        return fields

    def as_dict(self):
        return dataclasses.asdict(self)
