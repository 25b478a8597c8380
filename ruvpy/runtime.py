"""The Runtime: what an application (or ruvpy.models) drives a decode loop with.

    cfg = RuntimeConfig(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64)
    with Runtime(cfg) as rt:
        seq = rt.add_sequence()
        with rt.step([seq], [n]) as step:          # plans the step's KV slots
            pos = step.positions                    # absolute positions (RoPE)
            for layer in range(cfg.num_layers):
                out = step.attention(layer, q, k, v)    # append k/v, attend, [n, H, d]
        print(rt.stats().format())

A Runtime owns every byte its steps use: the step arena, the buffer pool (whose size class
for cold groups backs a two-tier cache), the scratch the attention kernels work in (sized
from the config, grown by a step that needs more) and one KV cache holding every layer of
every sequence. A step is a transaction over its sequences, planned once (the cache's
AttentionPlan): it commits when the `with` block ends normally after every layer was
attended once, and otherwise rolls every sequence back to where it was.

The parts live beside this module: RuntimeConfig (config.py), the sequence-file format
(seqfile.py), RuntimeStats (stats.py), the KV cache's sizing (sizing.py).
"""
from __future__ import annotations

import collections
import itertools
import operator
import os
import sys
import _signal     # signal's C functions: signal.signal and getsignal add enum wrapping per call
import threading

import numpy as np

from ruvpy import _kernels, _kvcache
from ruvpy._kvcache import KVCacheFull
from ruvpy._closing import Closing
from ruvpy._memory import Arena, BufferPool, ScratchSpace
from ruvpy.config import (COLD_FORMATS, DEFAULT_MAX_TOKENS, KV_CACHE_KINDS, KV_DTYPES, MAX_HEAD_DIM,
                          POLICIES, TURBO_BITS, MiB, RuntimeConfig)
from ruvpy.seqfile import (FILE_MAGIC, FILE_VERSION, SequenceFileError, decode_sequence,
                           encode_sequence, read_sequence_file, write_sequence_file)
from ruvpy.sizing import METADATA_ALLOWANCE_MAX, METADATA_ALLOWANCE_MIN, size_kv
from ruvpy.stats import RuntimeStats, _kv_sequence, _ranges, kv_free_tokens, kv_summary

__all__ = ["RuntimeConfig", "Runtime", "Step", "RuntimeStats", "SequenceFileError",
           "IncompleteStepError", "KV_CACHE_KINDS"]


# the largest position a sequence file may give (RoPE positions are int64; a step adds to it)
MAX_POSITION = 2 ** 62


class IncompleteStepError(RuntimeError):
    """A step's `with` block ended normally without attending every layer exactly once; the
    step was rolled back (committing it would leave layers with different lengths)."""


# ----------------------------------------------------------------------------------------
# steps
# ----------------------------------------------------------------------------------------

_PLANNED, _OPEN, _CLOSED = "planned", "open", "closed"
# closed by another thread while the step was being opened or open: the runtime's memory is
# gone, the step's own thread ends it (Step.__exit__ releases the step slot it took)
_ABANDONED = "abandoned"
_F32 = np.dtype(np.float32)
_F16 = np.dtype(np.float16)


class Step:
    """One forward step over some sequences: made by `Runtime.step(seqs, n_tokens)`, used as
    a context manager.

    Entering plans it: the KV cache reserves room for n_tokens[i] more tokens of seqs[i] in
    every layer (KVCacheFull, or eviction of the oldest cold tokens under policy
    "evict-oldest"), opens a transaction and plans the step's attention once (the cache's
    AttentionPlan: ids resolved, counts checked, the kernels' work sized into the Runtime's
    scratch). Inside, `attention(layer, q, k, v)` appends the step's K/V to `layer` and
    attends, once per layer, for all sequences in one call. Leaving commits when the block
    ended normally and every layer was attended exactly once. An exception rolls every
    sequence back to its state before the step and propagates; a block that ends normally
    with layers left unattended is rolled back too and raises IncompleteStepError. The arena
    is reset either way: arrays from step.alloc() and the attention outputs are only valid
    inside the step (copy what you keep).

    q is [num_tokens, num_heads, head_dim] float32 (tokens and heads may be strided, e.g. a
    slice of a fused QKV projection) and k, v are [num_tokens, num_kv_heads, head_dim]
    float32 or float16: the concatenation over the step's sequences in order (rows
    seq_offsets[i]:seq_offsets[i+1] belong to seqs[i]).

    A step belongs to the thread that entered it: attention(), alloc() and the end of the
    block from any other thread raise RuntimeError and change nothing (its plan -- seqs,
    n_tokens, seq_offsets, positions, attended_layers -- may be read from any thread).
    """

    __slots__ = ("_runtime", "_arena", "_seqs", "_n_tokens", "num_tokens", "_starts",
                 "_positions", "_offsets", "_attended", "_remaining", "_q_shape", "_kv_shape",
                 "_num_layers", "_state", "_failed", "_calls", "_fallbacks", "_plan",
                 "_threads_before", "_table_before", "_txn_seqs", "_owner_ident", "_owner_thread")

    def __init__(self, runtime, seqs, n_tokens):
        cfg = runtime.config
        self._runtime = runtime
        self._arena = None
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
        self._starts = self._positions = self._offsets = self._plan = None
        self._threads_before = None
        self._table_before = None        # whether the thread's table was pinned (None: not set)
        self._txn_seqs = self._seqs      # the sequences its KV transaction covers
        self._set_owner(None)

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
        self._check_thread("step.alloc")
        self._check_open()
        return self._arena.alloc(shape, dtype)

    def attention(self, layer, q, k, v, *, scale=None, out=None):
        """Append k, v (this step's new tokens of every sequence) to `layer` and attend q
        over each sequence's whole context, causally; returns [num_tokens, num_heads,
        head_dim] float32 (`out` if given, else step-scoped arena memory). One call per
        layer per step. Bad input raises before anything is written."""
        # another thread's step: refused before the caller's code below runs
        self._check_thread("step.attention")
        # the caller's scalars first: their conversions (__index__, __float__) run its code,
        # which may call back into the runtime (from this thread or, waiting on it, another)
        # or even end this step; the step's checks come after them, and no lock is held here
        if type(layer) is not int:
            layer = _layer_number(layer, self._num_layers, "step.attention")
        if scale is not None and type(scale) is not float:
            scale = _scale_value(scale, "step.attention")
        if self._state is not _OPEN:
            self._check_open()
        if not 0 <= layer < self._num_layers or self._attended[layer]:
            self._check_layer(layer)
        if out is None:
            try:
                out = self._arena.alloc(self._q_shape)
            except MemoryError:
                # too large for what is left of the arena: numpy memory, counted in stats
                out = np.empty(self._q_shape, np.float32)
                self._fallbacks += 1
        try:
            # the state lock before the cache's (the runtime's one lock order): see _while_open
            with self._runtime._state_lock:
                self._plan.attend(layer, q, k, v, out=out, scale=scale)
        except (ValueError, TypeError, KeyError):
            # the plan checks before writing: this layer is unchanged; say it in step terms
            self._check_inputs(q, k, v)
            self._check_out(out)
            raise
        except BaseException:
            self._failed = True   # the cache may be half-way: the step can only roll back
            if self._state is not _OPEN:
                self._check_open()     # say so: the cache's own "closed" names no runtime
            raise
        self._attended[layer] = True
        self._remaining -= 1
        self._calls += 1
        return out

    # -- the owning thread ------------------------------------------------------------------
    def _set_owner(self, thread):
        """The step belongs to `thread` (None: nobody entered it). Its ident is kept beside
        it: _entered_here() compares it per layer, without a lookup through the Thread. The
        Thread says whether it ended (an ident alone is reused by the next thread)."""
        self._owner_thread = thread
        self._owner_ident = None if thread is None else thread.ident

    def _check_thread(self, what):
        """Refuse `what` (a call that uses or ends the step) from a thread other than the one
        that entered it, before anything is converted or touched: the step's transaction, its
        arena memory and its thread count belong to that thread, which may still be using
        them. A step nobody entered has no owner (its own checks say it is not open)."""
        if self._owner_ident is not None and not self._entered_here():
            raise RuntimeError(
                f"{self._runtime.name}: {what} from another thread: a step can be used and "
                f"ended only by the thread that entered it (sequences {list(self._seqs)}); "
                f"nothing was changed (to stop it from this thread, close() the runtime: the "
                f"step's own thread then gets a RuntimeError from it)")

    def _entered_here(self):
        """Whether the calling thread is the one that entered the step (only it uses it)."""
        return self._owner_ident == threading.get_ident()

    def _owner_gone(self):
        """Whether the thread that entered the step has ended: nothing can use the step any
        more, so any thread may roll it back (a generator holding it, finalized elsewhere)."""
        return self._owner_thread is not None and not self._owner_thread.is_alive()

    # -- checks (off the hot path) ----------------------------------------------------------
    def _check_open(self):
        if self._state is _OPEN:
            return
        if self._state is _ABANDONED:
            raise self._runtime._abandoned_error()
        self._runtime._check_open()
        if self._state is _PLANNED:
            raise RuntimeError("the step is not open: use it as `with runtime.step(seqs, "
                               "n_tokens) as step:`")
        raise RuntimeError("the step has ended (its arena memory is reclaimed); start a new "
                           "step")

    def _check_layer(self, layer):
        """layer (a plain int) names a layer not attended yet in this step"""
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
                or not out.flags.writeable:
            desc = (f"{type(out).__name__}" if not isinstance(out, np.ndarray) else
                    f"{out.dtype} {list(out.shape)}")
            raise ValueError(f"step.attention: out must be a writeable float32 array of shape "
                             f"{list(self._q_shape)}, got {desc}")

    # -- lifecycle --------------------------------------------------------------------------
    def __enter__(self):
        opened = False
        try:
            with _InterruptsHeld() as held:
                self._runtime._open_step(self)
                opened = True
            held.deliver()
        except BaseException:
            if opened and self._state is _OPEN:    # opened here, then Ctrl-C: rolled back whole
                self._roll_back_held()
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self._entered_here() and self._owner_gone():
            # its thread ended with the step open (a generator finalized in another thread:
            # GeneratorExit here): rolled back, or the runtime refused every step after it;
            # already ended (the next step reclaimed it): nothing to do
            if self._state is _OPEN or self._state is _ABANDONED:
                self._roll_back_held()
                if exc_type is None:
                    raise RuntimeError(f"{self._runtime.name}: step.__exit__ from another thread "
                                       f"after the step's own thread ended: it was rolled back")
            return False
        try:
            self._check_thread("step.__exit__")
            if self._state is _OPEN or self._state is _ABANDONED:
                with _InterruptsHeld() as held:
                    self._runtime._close_step(self, exc_type is None)
                held.deliver()       # after the step committed or rolled back whole
        except BaseException:
            # before the hold began (Ctrl-C, or whatever a program's own SIGINT handler raises:
            # SystemExit, its own exception): the step has not ended, so it is rolled back
            if (self._state is _OPEN or self._state is _ABANDONED) and self._entered_here():
                self._roll_back_held()
            raise
        return False         # (closed: the runtime was closed inside the step, by its thread)

    def _roll_back_held(self):
        """Roll the step back whole with Ctrl-C held, on the way out of an exception (a held
        SIGINT's handler runs after, unless it is Python's default one)."""
        with _InterruptsHeld() as held:
            self._runtime._close_step(self, False)
        held.deliver(raising=True)

    def __repr__(self):
        return (f"<ruvpy.Step {self._state}: sequences {list(self._seqs)}, tokens "
                f"{list(self._n_tokens)}, {self._num_layers - self._remaining}/"
                f"{self._num_layers} layers attended>")


class _InterruptsHeld:
    """Holds Ctrl-C off while a step opens or ends. Python raises KeyboardInterrupt between any
    two bytecodes of the main thread; in the middle of that bookkeeping (the step slot, the KV
    transaction, the positions) it left the slot taken for good, a transaction open, or tokens
    committed without their position (a hostile SIGINT timer found each). While held, a SIGINT
    is only recorded (`pending`); the caller finishes, then `deliver` runs the handler that was
    installed: Python's default raises KeyboardInterrupt, a program's own does what it does,
    now at a point where it cannot cut the bookkeeping in two. Only in the main thread (the
    one Python delivers signals to) and only over a handler set from Python (SIG_IGN and
    SIG_DFL have nothing to defer)."""

    __slots__ = ("pending", "_previous")

    def __enter__(self):
        self.pending = False
        self._previous = None
        if threading.get_ident() == threading.main_thread().ident:
            handler = _signal.getsignal(_signal.SIGINT)
            if callable(handler):
                self._previous = _signal.signal(_signal.SIGINT, self._record)
        return self

    def _record(self, signum, frame):
        self.pending = True

    def __exit__(self, exc_type, exc, tb):
        if self._previous is not None:
            _signal.signal(_signal.SIGINT, self._previous)
        return False

    def deliver(self, raising=False):
        """Run the held SIGINT's handler, once the hold has ended. raising: an exception is
        already on its way out, which the default handler's KeyboardInterrupt would only
        replace (a program's own handler still runs)."""
        if self.pending and not (raising and self._previous is _signal.default_int_handler):
            self.pending = False
            self._previous(_signal.SIGINT, sys._getframe(1))


# ----------------------------------------------------------------------------------------
# the runtime
# ----------------------------------------------------------------------------------------

def _restore_thread_settings(step):
    """The stepping thread's own thread count and kernel table as they were before `step`
    opened (call in that thread)."""
    _kernels._swap_thread_settings(step._threads_before, step._table_before)


def _refs_held_by_runtime_only():
    """What sys.getrefcount says in Runtime._reclaim_orphaned_step of a step nothing but the
    runtime holds (the runtime's attribute, the local copy, getrefcount's argument), measured
    the same way on this interpreter: CPython's counts of borrowed references differ between
    versions."""
    class Holder:
        pass
    holder = Holder()
    holder.item = object()
    old = holder.item
    return sys.getrefcount(old)


_UNREACHABLE_REFS = _refs_held_by_runtime_only()


# The caller's scalars and ids become plain ints / floats (these helpers) before the runtime
# takes its state lock or a KV cache its own: their conversions may run the caller's code,
# which may call back into the runtime. Run under a lock, such code re-entering from this
# thread meets a lock it holds; waiting there for another thread that holds the state lock
# and waits for the cache's lock, it deadlocks both.

def _sequence_id(seq):
    if type(seq) is int:
        return seq
    if isinstance(seq, (bool, np.bool_)) or not isinstance(seq, (int, np.integer)):
        raise TypeError(f"a sequence id must be an int, got {type(seq).__name__} {seq!r}")
    return operator.index(seq)


def _layer_number(layer, num_layers, what):
    if isinstance(layer, (bool, np.bool_)) or not isinstance(layer, (int, np.integer)):
        raise TypeError(f"{what}: layer must be an int, got {type(layer).__name__} {layer!r}")
    layer = operator.index(layer)
    if not 0 <= layer < num_layers:
        raise ValueError(f"{what}: layer {layer} is out of range (the runtime has layers "
                         f"0..{num_layers - 1})")
    return layer


def _scale_value(scale, what):
    try:
        if isinstance(scale, (str, bytes, bytearray)):     # float() would parse it
            raise TypeError
        return float(scale)
    except TypeError:
        raise TypeError(f"{what}: scale must be a float or None, got "
                        f"{type(scale).__name__}") from None


def _token_count(n, what):
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"{what} must be an int, got {type(n).__name__} {n!r}")
    n = operator.index(n)
    if n < 0:
        raise ValueError(f"{what} must be >= 0, got {n}")
    return n


def _process_rss():
    import psutil
    return psutil.Process().memory_info().rss


class Runtime(Closing):
    """Runtime(config): the arena, buffer pool, scratch and KV cache of one model, and the
    step lifecycle of its decode loop. See the module docstring and `Step`.

    Not for concurrent use from several Python threads: one step at a time (opening a second
    one raises RuntimeError); the kernels themselves run in parallel (config.threads). Several
    Runtimes may step at once in different threads: each passes its own thread count to its
    kernels and never changes the process-wide one.
    """

    _instances = itertools.count(1)
    # until __init__ completes (a failed construction leaves a closed, printable object)
    name = "Runtime"
    _closed = True
    _positions = {}

    def __init__(self, config):
        if self.__dict__.get("_initialized"):
            raise RuntimeError(f"{self.name} is already initialized (a second __init__ would drop "
                               f"its KV cache and sequences); make a new Runtime")
        if not isinstance(config, RuntimeConfig):
            raise TypeError(f"Runtime needs a RuntimeConfig, got {type(config).__name__}")
        self.config = cfg = config
        self.name = f"Runtime#{next(Runtime._instances)}"
        sizing = size_kv(cfg)
        self._sizing = sizing
        # public, read-only by convention: what a token costs (usually / at worst under a
        # budget), one sequence's hot tier, the capacity and the sequences it admits
        self.bytes_per_token = sizing.bytes_per_token
        self.budget_bytes_per_token = sizing.budget_bytes_per_token
        self.hot_tier_bytes = sizing.hot_tier_bytes
        self.capacity_tokens = sizing.capacity_tokens
        self.max_sequences = sizing.max_sequences
        options = dict(sizing.options)
        # a two-tier cache large enough for its own huge-page slabs takes its cold groups from
        # them (the decode kernels stream every group: on the pool's malloc'd 4 KiB pages they
        # ran 15-25% slower at 32/8/128); a smaller one, or one whose budget the slabs'
        # rounding would cost too many tokens (sizing), from the pool's class for them
        cold_from_pool = bool(sizing.group_bytes) and not sizing.cold_slabs
        self._pool = self._make_pool(sizing, cold_from_pool)
        if cold_from_pool:
            options["pool"] = self._pool
        self._cache = sizing.cache_class(*sizing.shape, max_tokens=sizing.capacity_tokens, **options)
        self._arena = Arena(cfg.arena_bytes)
        self._scratch = None
        # the kernels' work for a decode step of the largest context (and the batch the
        # config expects), and at least scratch_bytes_per_thread per thread
        batch = cfg.max_sequences or 1
        shared, per_thread, team = self._cache.scratch_for(
            cfg.num_heads, [1] * batch, [sizing.capacity_tokens] * batch, threads=cfg.threads)
        self._ensure_scratch(shared, max(per_thread, cfg.scratch_bytes_per_thread),
                             self._threads())
        self._positions = {}         # sequence id -> tokens ever appended (next position)
        # _step_lock: the step slot, held from Step.__enter__ to its exit. _state_lock (short
        # holds): _step is set under it as soon as the slot is taken, and sequence changes
        # check _step and make their change under it, so no change slips in while a step is
        # being opened (its transaction begun, its plan not yet made)
        self._step_lock = threading.Lock()
        self._state_lock = threading.RLock()
        self._step = None
        self._steps = self._rollbacks = self._attention_calls = self._arena_fallbacks = 0
        self._scratch_growths = 0
        self._unrolled = None        # the plan whose rollback a failed step exit left undone
        self._rss_at_start = _process_rss()
        self._weights = None
        self._closed = False
        self._initialized = True

    def _make_pool(self, sizing, cold_groups):
        """The buffer pool: the default size classes, plus (cold_groups: a two-tier cache's
        groups come from it) a class of the most a layer's cold group takes for each size they
        have (one, unless TurboQuant layers have widths of their own), holding the capacity's
        cold groups ready so that migration never calls the allocator."""
        cfg = self.config
        self._cold_classes = ()      # the pool's classes of the cold groups, if they come from it
        if not cold_groups:
            return BufferPool(cfg.pool_buffers_per_class)
        classes = {size: cfg.pool_buffers_per_class for size in BufferPool.SIZE_CLASSES}
        # a class per size of group (one, unless layers have TurboQuant widths of their own),
        # holding the capacity's groups of the layers of that size
        groups_per_layer = sizing.cold_groups // cfg.num_layers
        layers_of = collections.Counter(-(-b // 64) * 64 for b in sizing.layer_group_bytes)
        for size, layers in layers_of.items():
            classes[size] = max(classes.get(size, 0), (groups_per_layer + 1) * layers)
        self._cold_classes = tuple(sorted(layers_of))
        pool = BufferPool(cfg.pool_buffers_per_class,
                          size_classes=sorted(classes.items()))
        for size, layers in layers_of.items():
            pool.prewarm(size, groups_per_layer * layers)
        return pool

    def _live_arena(self):
        """The arena, replaced by a new one if somebody closed it: the runtime's memory is
        its own, and a closed arena must not wedge it."""
        if self._arena.closed:
            self._arena = Arena(self.config.arena_bytes)
        return self._arena

    def _threads(self):
        """Kernel threads of this runtime's calls: its own, or the process-wide setting."""
        return self.config.threads or _kernels.get_num_threads()

    def _ensure_scratch(self, shared, per_thread, threads):
        """The scratch holds a call needing shared / per_thread bytes on `threads` threads:
        kept if it does, else replaced by one large enough for it and all it held."""
        old = self._scratch
        if old is not None and old.fits(shared, per_thread, threads):
            return old
        if old is not None:
            shared = max(shared, old.shared_bytes)
            per_thread = max(per_thread, old.bytes_per_thread)
            threads = max(threads, old.max_threads)
            self._scratch_growths += 1
        self._scratch = ScratchSpace(max(per_thread, 64), threads, shared_bytes=shared)
        return self._scratch

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
        """Refuse `action` while a step is open or being opened (call under _state_lock, and
        make the change before releasing it)."""
        self._check_open()
        step = self._step
        if step is not None:
            raise RuntimeError(f"{self.name}: cannot {action} while a step is open (sequences "
                               f"{list(step._seqs)}); finish the step first")
        self._finish_rollbacks()

    def _check_not_stepped(self, seq, action):
        """Refuse to read `seq` while an open step's transaction covers it, or while a step is
        being opened (the sequences its transaction will cover are not known yet)."""
        step = self._step
        if step is not None and (step._state is not _OPEN or seq in step._txn_seqs):
            raise RuntimeError(f"{self.name}: cannot {action} sequence {seq} while a step on it "
                               f"is open")

    def _finish_rollbacks(self):
        """Roll back what a failed step exit left inside its transaction (its rollback raised,
        e.g. Ctrl-C): before anything else uses the cache."""
        if self._unrolled is not None:
            self._unrolled.rollback()       # (the plan's: only it closes its transaction)
            self._unrolled = None

    def _known(self, seq):
        seq = _sequence_id(seq)
        if seq not in self._positions:
            raise KeyError(f"unknown sequence {seq} ({self.name} has sequences "
                           f"{sorted(self._positions)})")
        return seq

    def _whole(self, change):
        """change() under the state lock with Ctrl-C held until it has returned: a KV cache
        call and the runtime's record of it (its positions) happen both or neither. Between
        the two, a KeyboardInterrupt left the cache holding a sequence the runtime did not
        know (a fork or import: its storage lost for good) or the runtime listing one the
        cache had freed (a remove: a sequence nothing could use or remove)."""
        with _InterruptsHeld() as held:
            try:
                with self._state_lock:
                    # a step of this thread nothing can end any more (its owner object was
                    # dropped mid-step, or its thread ended) would refuse the change: rolled
                    # back first, as the next step would (no step here: the slot stays free)
                    if self._step is not None and not self._closed:
                        self._reclaim_orphaned_step(take_slot=False)
                    result = change()
            except BaseException:
                held.deliver(raising=True)
                raise
        held.deliver()
        return result

    # -- sequences --------------------------------------------------------------------------
    @property
    def sequences(self):
        """Ids of the live sequences, in creation order."""
        self._check_open()
        return list(self._positions)

    def add_sequence(self):
        """A new, empty sequence; returns its id."""
        def add():
            self._check_no_step("add a sequence")
            self._check_room_for_sequence("add a sequence")
            seq = self._cache.add_sequence()
            self._positions[seq] = 0
            return seq
        return self._whole(add)

    def fork_sequence(self, seq):
        """A new sequence with the same context as `seq` (sharing its storage until either
        one appends); returns its id."""
        seq = _sequence_id(seq)       # user code (an int subclass) runs outside the lock

        def fork():
            self._check_no_step("fork a sequence")
            parent = self._known(seq)
            self._check_room_for_sequence("fork a sequence")
            child = self._cache.fork(parent)
            self._positions[child] = self._positions[parent]
            return child
        return self._whole(fork)

    def remove_sequence(self, seq):
        """Free `seq`'s KV storage; its id becomes unknown."""
        seq = _sequence_id(seq)

        def remove():
            self._check_no_step("remove a sequence")
            self._cache.free(self._known(seq))
            del self._positions[seq]
        self._whole(remove)

    def truncate_sequence(self, seq, n_tokens):
        """Cut `seq` back to its first n_tokens positions: the tokens after them leave the KV
        cache (their storage goes back, a block or cold group shared with a fork stays
        shared) and position(seq) becomes n_tokens, where its next token goes (n_tokens >=
        position: nothing changes). What transformers' Cache.crop does."""
        n = _token_count(n_tokens, "truncate_sequence: n_tokens")
        seq = _sequence_id(seq)

        def truncate():
            self._check_no_step("truncate a sequence")
            drop = self._positions[self._known(seq)] - n
            if drop <= 0:
                return
            held = max(self._cache.seq_len(seq, layer) for layer in range(self.config.num_layers))
            self._cache.truncate(seq, max(0, held - drop))
            self._positions[seq] = n
        self._whole(truncate)

    def position(self, seq):
        """Tokens ever appended to `seq`: the position its next token takes."""
        self._check_open()
        return self._positions[self._known(seq)]

    def seq_len(self, seq, layer=0):
        """Tokens of `seq` held in the KV cache now (less than position() after evictions).
        From another thread while a step covers `seq`: RuntimeError (see get_kv)."""
        seq = _sequence_id(seq)
        layer = _layer_number(layer, self.config.num_layers, "seq_len")
        with self._state_lock:      # a close() from another thread: before or after, not during
            self._check_open()
            return self._cache.seq_len(self._readable(seq, "read the length of"), layer)

    def get_kv(self, seq, layer):
        """(k, v) float32 copies [seq_len, num_kv_heads, head_dim] of `seq` in `layer`. The
        stepping thread reads its step's tokens as they are; another thread is refused
        (RuntimeError) while a step covers `seq`: those tokens are not committed (a rollback
        takes them back) and a layer not yet attended is shorter than one that was."""
        seq = _sequence_id(seq)
        layer = _layer_number(layer, self.config.num_layers, "get_kv")
        with self._state_lock:
            self._check_open()
            return self._cache.get_kv(self._readable(seq, "read the K/V of"), layer)

    def _readable(self, seq, action):
        """seq, known, and not covered by a step another thread is in (under _state_lock)."""
        seq = self._known(seq)
        step = self._step
        if step is not None and not step._entered_here():
            self._check_not_stepped(seq, action)
        return seq

    @property
    def cache(self):
        """The KV cache (PagedKVCache or TwoTierKVCache) the runtime drives."""
        self._check_open()
        return self._cache

    @property
    def arena(self):
        self._check_open()
        return self._arena

    @property
    def pool(self):
        self._check_open()
        return self._pool

    @property
    def scratch(self):
        """The ScratchSpace the attention kernels work in (replaced by a larger one when a
        step needs more)."""
        self._check_open()
        return self._scratch

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
        counts = []
        for seq, n in zip(seqs, n_tokens):
            if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
                raise TypeError(f"step: token count of sequence {seq} must be an int, got "
                                f"{type(n).__name__} {n!r}")
            n = operator.index(n)       # an exact int: a subclass's own comparisons are not called
            if n < 1:
                raise ValueError(f"step: token count of sequence {seq} must be >= 1, got {n}")
            counts.append(n)
        return Step(self, seqs, counts)

    def _reclaim_orphaned_step(self, take_slot):
        """Roll back this thread's open step if nothing can end it any more (True); with
        take_slot, also take the step slot it frees, for the caller (Step.__enter__; False if
        another thread took it first). Ctrl-C can land at the very start of Step.__exit__,
        before any of it runs (Python handles a pending signal when a function starts): the
        step stays open, and once the exception is handled no Python code holds it. Only a step
        that no code can reach (this runtime's reference and this check's are its only ones)
        counts: one still reachable (a `with` nested in its body, a kept traceback) is left
        alone, and the caller gets "another step is open" as before. A step whose own thread
        has ended is reclaimed by any thread: nothing can use it any more (a generator that
        holds it would have to resume in that thread)."""
        old = self._step
        if old is None or old._state is not _OPEN or (not old._owner_gone() and (
                not old._entered_here() or sys.getrefcount(old) > _UNREACHABLE_REFS)):
            return False
        # rolled back whole, its slot given back (Ctrl-C is held by both callers:
        # Step.__enter__ and _whole)
        self._close_step(old, False)
        return not take_slot or self._step_lock.acquire(blocking=False)

    def _open_step(self, step):
        """Step.__enter__: take the step slot, reserve KV room, begin the transaction, plan
        the step's attention into the runtime's scratch."""
        self._check_open()
        if step._state is not _PLANNED:
            raise RuntimeError("a Step can be entered only once; make a new one with "
                               "runtime.step(...)")
        if not self._step_lock.acquire(blocking=False) and \
                not self._reclaim_orphaned_step(take_slot=True):
            raise RuntimeError(f"{self.name}: another step is open (sequences "
                               f"{list(self._step._seqs) if self._step else '?'}); steps of "
                               f"one runtime run one at a time")
        with self._state_lock:      # waits for a sequence change in progress to finish
            if self._closed:        # by another thread, since the check above
                self._step_lock.release()
                self._check_open()
            self._step = step       # from here on, sequence changes are refused
            step._set_owner(threading.current_thread())
        try:
            self._while_open(self._finish_rollbacks)
            try:
                step._starts = [self._positions[s] for s in step._seqs]
            except KeyError:        # removed since step() checked it
                for seq in step._seqs:
                    self._known(seq)
                raise
            self._while_open(self._live_arena)
            plan = self._plan_in_transaction(step._seqs, step._n_tokens)
            step._txn_seqs = plan.transaction_seqs
            try:
                if not plan.bound:      # more than the scratch holds: it grows (once)
                    plan.use_scratch(self._while_open(lambda: self._ensure_scratch(*plan.scratch_needed)))
            except BaseException:
                self._while_open(plan.rollback)
                raise
        except BaseException as exc:
            with self._state_lock:
                abandoned = step._state is _ABANDONED
                if abandoned:
                    step._state = _CLOSED
                else:
                    step._set_owner(None)   # never entered (it may be entered again)
                self._step = None
                self._step_lock.release()
            if abandoned:           # e.g. the cache's "closed": say what happened
                raise self._abandoned_error("being opened") from exc
            raise
        with self._state_lock:
            if step._state is _ABANDONED:   # closed by another thread meanwhile: its cache
                step._state = _CLOSED       # (and the transaction in it) is gone
                self._step_lock.release()
                raise self._abandoned_error("being opened")
            step._plan = plan
            step._arena = self._arena
            # only the stepping thread's own count (for ruvpy calls inside the step; threads
            # None: left as it is): other threads and the process-wide setting are untouched;
            # and one kernel table for the whole step: set_isa() from another thread meanwhile
            # used to switch it between layers, a step computed half with each table
            step._threads_before, step._table_before = _kernels._swap_thread_settings(
                self.config.threads, True)
            step._state = _OPEN

    def _abandoned_error(self, when="open"):
        return RuntimeError(f"{self.name} was closed by another thread while this step was "
                            f"{when}: the step is abandoned (nothing of it was kept; the runtime's "
                            f"KV cache and arena are freed)")

    def _plan_in_transaction(self, seqs, n_tokens):
        """The step's plan, with its KV transaction open and its room reserved inside it
        (cache.plan(..., begin=True): the transaction first, then room, so whatever eviction
        (policy "evict-oldest") takes comes back if the step rolls back). Inside a transaction
        only its own sequences may give up tokens, so when the step's sequences cannot make
        the room the transaction is widened to every live sequence (plan.transaction_seqs)."""
        options = dict(num_heads=self.config.num_heads, threads=self.config.threads,
                       scratch=self._scratch, begin=True)
        try:
            return self._while_open(lambda: self._cache.plan(seqs, n_tokens, **options))
        except KVCacheFull:
            if self.config.policy != "evict-oldest" or len(self._positions) == len(seqs):
                raise
        mine = set(seqs)
        return self._while_open(lambda: self._cache.plan(
            seqs, n_tokens, cover=[s for s in self._positions if s not in mine], **options))

    def _while_open(self, call):
        """call() under the state lock, on an open runtime: a KV cache call, or making the
        arena or scratch a step needs (a close() from another thread in between left new ones
        on the closed runtime). Every cache call
        of the runtime holds the state lock around the cache's lock: one lock order. Code
        Python runs inside a cache call -- a finalizer or weakref callback of a collection an
        allocation under the cache's lock triggers -- may call back into the runtime. Were
        the cache's lock ever held without the state lock, that code would wait for the state
        lock while another thread holding it (stats(), seq_len(), close() ...) waits for the
        cache's lock: both threads deadlocked. Holding both, it re-enters the state lock (an
        RLock) and a cache call from it is refused at once (the cache's re-entry check).
        Short holds: close() and sequence changes from other threads still wait only for a
        cache call in progress, never for a step being opened."""
        with self._state_lock:
            self._check_open()          # closed by another thread: no cache to call
            return call()

    def _close_step(self, step, ok):
        """Step.__exit__: reset the arena, commit (or roll back), free the step slot. Whatever
        fails on the way, the step ends rolled back (unless it committed), the slot is freed
        and the thread count restored; the first failure is raised after that. Under the
        state lock: a close() from another thread waits for it (and never frees the arena or
        cache under it). Only the thread that entered the step ends it (Step.__exit__ refused
        any other: its slot, its thread count, its transaction and the arena its arrays view
        all belong to the stepping thread, which may still be using them); close() from
        another thread abandons the step instead."""
        with self._state_lock:
            if step._state is _ABANDONED:
                self._end_abandoned_step(step, ok)
            else:
                self._end_step(step, ok)

    def _end_abandoned_step(self, step, ok):
        """End a step that close() in another thread abandoned: its memory is gone, so only
        the stepping thread's own parts are undone here (thread count, the step slot)."""
        step._state = _CLOSED
        step._plan = None
        if step._entered_here():
            _restore_thread_settings(step)
        self._step_lock.release()
        if ok:      # the block ended normally: it must not look committed
            raise self._abandoned_error()

    def _end_step(self, step, ok):
        step._state = _CLOSED
        error, committed = None, False
        try:
            try:
                self._arena.reset()
            except Exception as exc:            # e.g. closed by hand: replaced by a new one
                error = RuntimeError(f"{self.name}: the step was rolled back: its arena could not "
                                     f"be reset ({exc})")
                error.__cause__ = exc
                try:
                    self._live_arena()
                except MemoryError:
                    pass                        # the next step tries again
            except BaseException as exc:        # Ctrl-C: rolled back, then raised
                error = exc
            # through the plan: the cache lets only the plan that opened a transaction close it
            plan = step._plan
            if ok and error is None and not step._failed and step._remaining == 0:
                try:
                    plan.commit()
                except BaseException as exc:     # (an exception from a signal handler can
                    error = exc                  # arrive after the commit itself is done)
                committed = not plan.in_transaction
            if not committed:
                self._unrolled = plan            # until the rollback is done
                self._rollbacks += 1
                plan.rollback()
                self._unrolled = None
            else:
                # one call: an exception between bytecodes cannot advance only some positions
                self._positions.update({seq: self._positions[seq] + n
                                        for seq, n in zip(step._seqs, step._n_tokens)})
                self._steps += 1
        finally:
            self._attention_calls += step._calls
            self._arena_fallbacks += step._fallbacks
            if step._entered_here():
                _restore_thread_settings(step)      # (that thread's own count and table)
            step._plan = None
            self._step = None
            self._step_lock.release()
        if error is not None:
            raise error
        if ok and not committed:
            if step._failed:
                raise RuntimeError("the step was rolled back: a KV cache call inside it "
                                   "failed (its exception was caught inside the step)")
            missing = [i for i, done in enumerate(step._attended) if not done]
            raise IncompleteStepError(
                f"the step ended with layers {_ranges(missing)} of {step._num_layers} not "
                f"attended; it was rolled back (every layer must be attended once per "
                f"step, or raise inside the step to abandon it)")

    # -- whole runtime ----------------------------------------------------------------------
    def reset(self):
        """Drop every sequence (their KV storage is freed) and reset the arena."""
        def reset():
            self._check_no_step("reset")
            for seq in list(self._positions):
                self._cache.free(seq)
                del self._positions[seq]
            self._live_arena().reset()
        self._whole(reset)

    def close(self):
        """Free the KV cache, arena, pool and scratch. Idempotent; afterwards every method
        raises RuntimeError. Closing inside a step abandons the step. Closing from another
        thread while a step is being opened or is open abandons that step too: close() waits
        only for a KV cache call in progress (never frees memory a kernel is using), and the
        step's thread gets a RuntimeError from its next call on the step, or from the end of
        its `with` block; the step slot stays that thread's until its step ends."""
        with self._state_lock:      # after a step exit or sequence change in progress
            if self._closed:
                return
            self._closed = True
            step, self._step = self._step, None
            if step is not None:
                if step._state is _OPEN and step._entered_here():
                    step._state = _CLOSED       # inside its own step: ended here
                    _restore_thread_settings(step)
                    self._step_lock.release()
                else:
                    step._state = _ABANDONED    # its own thread ends it
            cache, self._cache = self._cache, None
            self._positions = {}
            try:
                close_cache = getattr(cache, "close", None)
                if close_cache is not None:
                    close_cache()               # waits for a cache call in progress
            finally:
                self._arena.close()
                self._pool.clear()
                self._scratch = None

    def __repr__(self):
        cfg = self.config
        state = "closed" if self._closed else f"{len(self._positions)} sequences"
        return (f"<ruvpy.{self.name} {cfg.kv_cache} KV, {cfg.num_layers} layers, "
                f"{cfg.num_heads}/{cfg.num_kv_heads} heads x {cfg.head_dim}: {state}>")

    # -- persistence ------------------------------------------------------------------------
    def export_sequence(self, seq):
        """`seq`'s K/V (in the cache's stored format: quantized tiers stay quantized) and
        position as bytes: versioned and SHA-256 checksummed (the sequence-file format,
        ruvpy.seqfile). import_sequence takes them back, here or in another runtime of the
        same storage configuration (e.g. another worker's)."""
        return encode_sequence(*self._snapshot(seq, "export"))

    def import_sequence(self, data):
        """A new sequence holding what export_sequence returned; returns its id. Corrupt,
        truncated or mismatched data raises SequenceFileError (a ValueError) and changes
        nothing; a full cache raises KVCacheFull."""
        return self._restore(lambda: decode_sequence(data), "import a sequence", "sequence data")

    def save_sequence(self, seq, path):
        """Write `seq`'s K/V (in the cache's stored format: quantized tiers stay quantized)
        to `path`: versioned, SHA-256 checksummed, written atomically (the bytes of
        export_sequence)."""
        write_sequence_file(path, *self._snapshot(seq, "save"))

    def load_sequence(self, path):
        """A new sequence holding the K/V saved in `path`; returns its id. A corrupt,
        truncated or mismatched file raises SequenceFileError (a ValueError) and changes
        nothing; a full cache raises KVCacheFull."""
        return self._restore(lambda: read_sequence_file(path), "load a sequence", os.fspath(path))

    def _snapshot(self, seq, action):
        """(header, arrays) of `seq` for export/save (refused while a step covers it)."""
        self._check_open()
        seq = self._known(seq)
        with self._state_lock:
            self._check_not_stepped(seq, action)
            self._finish_rollbacks()
            meta, arrays = self._cache.export_sequence(seq)
            header = {"format": "ruvpy-sequence", "config": self.config.storage_fields(),
                      "position": self._positions[seq], "meta": meta}
        return header, arrays

    def _restore(self, read, action, where):
        """A new sequence from read() -> (header, arrays), for import/load: refused while a
        step is open, checked before it is read (fail fast) and again, with the change, under
        the state lock."""
        self._check_no_step(action)
        header, arrays = read()

        def restore():
            self._check_no_step(action)
            return self._restore_checked(header, arrays, where)
        return self._whole(restore)

    def _restore_checked(self, header, arrays, where):
        mine = self.config.storage_fields()
        theirs = header.get("config")
        if header.get("format") != "ruvpy-sequence" or not isinstance(theirs, dict):
            raise SequenceFileError(f"{where}: not a ruvpy sequence snapshot header")
        if theirs != mine:
            diffs = [f"{k}: file {theirs.get(k)!r}, runtime {mine.get(k)!r}"
                     for k in sorted(set(mine) | set(theirs)) if theirs.get(k) != mine.get(k)]
            raise SequenceFileError(f"{where}: saved for another configuration ("
                                    + "; ".join(diffs) + ")")
        position, meta = header.get("position"), header.get("meta")
        if type(position) is not int or not 0 <= position <= MAX_POSITION or \
                not isinstance(meta, dict):
            raise SequenceFileError(f"{where}: the header's position/meta are malformed (position "
                                    f"must be an int in [0, 2**62])")
        lengths = meta.get("lengths")
        if not isinstance(lengths, list) or not lengths or \
                any(type(n) is not int or n < 0 for n in lengths):
            raise SequenceFileError(f"{where}: the header's meta has no valid token counts")
        held = lengths[0]
        if any(n != held for n in lengths):
            raise SequenceFileError(f"{where}: its layers hold different token counts {lengths} "
                                    f"(a committed sequence holds the same in every layer)")
        # RoPE positions continue from `position`: it must be where the stored tokens end,
        # or (two-tier: evicted tokens leave no trace) beyond it
        if position < held or (position != held and self.config.kv_cache == "paged"):
            raise SequenceFileError(
                f"{where}: position {position} does not match the {held} tokens it holds "
                + ("(a paged cache never evicts: they must be equal)" if position > held else
                   "(a position is never behind the tokens held)"))
        self._check_room_for_sequence("load a sequence")
        try:
            seq = self._cache.import_sequence(meta, arrays)
        except (ValueError, TypeError, KeyError) as exc:
            raise SequenceFileError(f"{where}: the KV cache rejects its contents: {exc}") \
                from exc
        self._positions[seq] = position
        return seq

    def attach_weights(self, weights):
        """Report `weights` in stats(): an object with .path, .mapped_bytes, .nbytes and
        .resident_bytes() (a model's memory-mapped GGUF weights, ruvpy.models.LlamaWeights)."""
        self._check_open()
        self._weights = weights

    # -- statistics -------------------------------------------------------------------------
    def memory_bytes(self):
        """{part: bytes} of everything the runtime holds: "kv" (the cache's storage and
        metadata, and the buffers the pool holds ready for its cold groups), "arena", "pool"
        (the other free and handed-out buffers, and the pool's own lists), "scratch". Their
        sum is RuntimeStats.total_bytes."""
        with self._state_lock:      # reads the cache, arena and pool that close() frees
            self._check_open()
            return self._memory_bytes()

    def _memory_bytes(self, pool=None, reserved=None):
        """memory_bytes() from `pool` (the pool's stats) and `reserved` (its
        _reserved_cold_bytes), each taken now where not given."""
        pool = self._pool.stats() if pool is None else pool
        reserved = self._reserved_cold_bytes(pool) if reserved is None else reserved
        return {"kv": int(self._cache.nbytes) + reserved, "arena": int(self._live_arena().capacity),
                "pool": int(pool.pooled_bytes + pool.outstanding_bytes - self._cache.pooled_bytes -
                            reserved + self._pool.metadata_bytes),
                "scratch": int(self._scratch.nbytes)}

    def _reserved_cold_bytes(self, pool):
        """Bytes of the free buffers of the pool's cold-group classes (`pool`: its stats): the
        groups prewarmed for the cache, or given back by it, not in use now. The budget sized
        them as the KV cache's cold store, and they are allocated: they count as KV."""
        return sum(int(pool.free_buffers[self._pool.size_classes.index(size)]) * size
                   for size in self._cold_classes)

    def stats(self):
        """A RuntimeStats snapshot (see its docstring); .format() for a table."""
        # the attached weights are the caller's object: its code runs before the lock
        weights = self._weights_stats()
        with self._state_lock:      # a close() from another thread: before or after, not during
            self._check_open()
            return self._stats(weights)

    def _weights_stats(self):
        weights = self._weights
        if weights is None:
            return None
        return {"path": weights.path, "mapped_bytes": int(weights.mapped_bytes),
                "resident_bytes": int(weights.resident_bytes()), "nbytes": int(weights.nbytes)}

    def _stats(self, weights):
        arena = self._live_arena().stats()
        pool = self._pool.stats()
        kv = self._cache.stats()
        reserved = self._reserved_cold_bytes(pool)
        memory = self._memory_bytes(pool, reserved)
        kv_bytes = memory["kv"]
        tiers, layers, details = kv_summary(kv)
        budget = self.config.memory_budget
        rss = _process_rss()
        free_tokens = kv_free_tokens(kv)
        return RuntimeStats(
            arena=arena._asdict(),
            pool={k: v for k, v in pool._asdict().items() if k != "free_buffers"},
            scratch_bytes=int(self._scratch.nbytes),
            kv={"kind": self.config.kv_cache, "capacity_tokens": self.capacity_tokens,
                "tokens": int(kv.tokens), "bytes": kv_bytes,
                "bytes_in_use": sum(t["bytes"] for t in tiers.values()),
                "reserved_bytes": reserved,
                "bytes_per_token": self.bytes_per_token, "free_tokens": free_tokens,
                "free_bytes": int(free_tokens * self.bytes_per_token),
                "free_sequences": None if self.max_sequences is None else
                max(0, self.max_sequences - len(self._positions)),
                "details": details,
                "tiers": tiers, "layers": layers,
                "sequences": [{"seq": s, "position": p, **_kv_sequence(kv, s)}
                              for s, p in self._positions.items()]},
            budget_bytes=budget,
            budget_used_pct=None if budget is None else 100.0 * kv_bytes / budget,
            rss_bytes=rss, rss_growth_bytes=rss - self._rss_at_start,
            steps=self._steps, rollbacks=self._rollbacks,
            attention_calls=self._attention_calls, arena_fallbacks=self._arena_fallbacks,
            total_bytes=sum(memory.values()), memory=memory, weights=weights)
