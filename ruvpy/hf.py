"""ruvpy under Hugging Face transformers: a `transformers.Cache` backed by a ruvpy Runtime.

    import ruvpy.hf
    model = AutoModelForCausalLM.from_pretrained(...)            # any Llama-family model, on CPU
    cache = ruvpy.hf.RuvpyCache(model, kv_cache="two-tier", cold="q4")
    out = model.generate(input_ids, attention_mask=mask, past_key_values=cache, max_new_tokens=64)
    print(cache.runtime.stats().format())

Needs the optional dependencies torch, transformers (5.x) and accelerate (`pip install ruvpy[hf]`).

How it meets transformers' contracts:

- Importing this module registers the attention function `"ruvpy"` with transformers'
  `AttentionInterface`, and sdpa's mask builder under the same name with `AttentionMaskInterface`
  (so the model builds the boolean masks sdpa would). Creating a RuvpyCache switches its model to
  `"ruvpy"`. With any other cache (DynamicCache, StaticCache, none) the `"ruvpy"` attention hands
  the call to sdpa unchanged, so the same model object keeps working with them.
- `cache.update(k, v, layer)` keeps nothing and copies nothing: it notes the new K/V and returns
  them. The `"ruvpy"` attention that the layer calls next recognises them (by identity) and runs
  `Step.attention`, which appends them to every row's sequence and attends over the stored
  codes in place, writing the output straight into a torch-owned tensor.
- One Runtime step per forward: the first layer's attention opens it for the rows that have new
  tokens, the last layer's commits it. A forward that fails part-way leaves every sequence as
  it was (the step is rolled back at once when the failure goes through ruvpy, else as soon as
  the cache is used again).
- Each batch row is one ruvpy sequence. Which new tokens are pads is read from the mask
  transformers built (a token whose own entry is masked is a pad); pads are stored nowhere, and
  the columns a row has already seen must be exactly the ones it stored (ValueError otherwise).
  `get_seq_length()` counts columns, pads included, as DynamicCache does.
- Beam search and batch edits (`reorder_cache`, `batch_select_indices`,
  `batch_repeat_interleave`) keep or duplicate rows with copy-on-write forks, never copies.

Boundary conversions: ruvpy takes float32 queries, float32 or float16 K/V and writes float32
outputs. A float32 model crosses without copies (numpy views of the torch tensors, both ways); a
float16 model's K/V cross as they are while q and the output are converted; bfloat16 (which numpy
lacks) is converted to float32 (exactly). Conversions and the valid-row gather of a padded
prefill go through per-forward buffers from the step arena.
"""
from __future__ import annotations

import threading
import weakref

import numpy as np
import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from ruvpy import Runtime, RuntimeConfig

__all__ = ["RuvpyCache", "ATTENTION", "ruvpy_attention_forward"]

ATTENTION = "ruvpy"
_TORCH_KV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Keyword arguments some models pass to their attention function, for features ruvpy's causal
# attention does not have: refused by name rather than ignored.
_UNSUPPORTED_ATTENTION_KWARGS = {
    "softcap": "logit soft-capping",
    "sliding_window": "sliding-window attention",
    "s_aux": "attention sinks",
    "position_bias": "an additive position bias",
}

# Between a RuvpyCache's update() and the attention call of the same layer: the cache, the layer
# and the very K/V tensors update() returned (per thread: a model runs one forward per thread).
_local = threading.local()


def ruvpy_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                            is_causal=None, **kwargs):
    """The attention function registered as "ruvpy". When `key`/`value` are what a RuvpyCache's
    update() just returned, ruvpy appends and attends (one Step.attention call); otherwise (any
    other cache, or none) the call goes to transformers' sdpa attention unchanged."""
    pending = getattr(_local, "pending", None)
    if pending is None or pending[2] is not key or pending[3] is not value:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    _local.pending = None
    cache, layer = pending[0], pending[1]
    return cache._attend(layer, query, key, value, attention_mask, dropout=dropout,
                         scaling=scaling, is_causal=is_causal, extra=kwargs,
                         model_layers=getattr(getattr(module, "config", None), "num_hidden_layers", None)), None


AttentionInterface.register(ATTENTION, ruvpy_attention_forward)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def _text_config(model):
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"RuvpyCache(model, ...) needs a transformers PreTrainedModel, got "
                        f"{type(model).__name__}")
    config = model.config.get_text_config(decoder=True)
    if getattr(config, "is_encoder_decoder", False) or model.config.is_encoder_decoder:
        raise NotImplementedError("RuvpyCache supports decoder-only models; "
                                  f"{type(model).__name__} is an encoder-decoder")
    return config


def _attention_shape(config):
    try:
        num_layers = int(config.num_hidden_layers)
        num_heads = int(config.num_attention_heads)
        num_kv_heads = int(getattr(config, "num_key_value_heads", None) or num_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    except AttributeError as exc:
        raise NotImplementedError(f"RuvpyCache: {type(config).__name__} does not describe a "
                                  f"Llama-style attention ({exc})") from None
    return {"num_layers": num_layers, "num_heads": num_heads, "num_kv_heads": num_kv_heads,
            "head_dim": int(head_dim)}


def _check_layer_types(config):
    layer_types, _ = get_layer_types_and_kwargs(config)
    other = sorted(set(layer_types) - {"full_attention"})
    if other:
        raise NotImplementedError(f"RuvpyCache supports full causal attention layers only; "
                                  f"{type(config).__name__} has layer types {other}")


def _use_ruvpy_attention(model):
    if model.config._attn_implementation != ATTENTION:
        model.set_attn_implementation(ATTENTION)
    if model.config._attn_implementation != ATTENTION:
        raise NotImplementedError(f"{type(model).__name__} cannot switch its attention "
                                  f"implementation to {ATTENTION!r} (it does not call "
                                  f"transformers' AttentionInterface)")


class _ForwardPlan:
    """What one forward's step needs besides the Step: the batch geometry, the valid-row gather
    of a padded forward and the per-forward conversion buffers (step arena memory)."""

    __slots__ = ("step", "batch", "q_len", "n", "valid", "gather", "buffers", "created",
                 "remaining")

    def __init__(self, step, batch, q_len, valid, created, num_layers):
        self.step = step
        self.remaining = num_layers         # layers still to attend in this forward
        self.batch = batch
        self.q_len = q_len
        self.valid = valid                  # np.bool_ [batch, q_len], or None: every token
        self.created = created              # sequences this forward created (dropped on failure)
        if valid is None:
            self.n = batch * q_len
            self.gather = None
        else:
            rows = np.flatnonzero(valid.reshape(-1))
            self.n = int(rows.size)
            self.gather = torch.from_numpy(rows)
        self.buffers = {}

    def buffer(self, name, shape, dtype):
        """A buffer reused by every layer of this forward: step arena memory, or numpy memory
        when the arena is too small for it."""
        buf = self.buffers.get(name)
        if buf is None or buf.dtype != dtype:
            try:
                buf = self.step.alloc(shape, dtype)
            except MemoryError:
                buf = np.empty(shape, dtype)
            self.buffers[name] = buf
        return buf


class _Rows:
    """A cache's rows (the ruvpy sequence of each batch row) in a holder its finalizer reads:
    assigning cache._seqs replaces holder.seqs, so the rows freed when the cache is dropped
    are the ones it holds then."""

    __slots__ = ("seqs",)

    def __init__(self, seqs):
        self.seqs = seqs


def _free_rows(runtime, pending):
    """Remove the sequences listed in `pending` (rows of dropped caches) from `runtime`. Those
    it refuses now (a step is open) stay listed for the next try; a closed runtime has
    nothing left to free."""
    refused = []
    try:
        while pending:
            seq = pending.pop()
            try:
                runtime.remove_sequence(seq)
            except KeyError:            # removed already (runtime.reset(), a cut-short reset)
                pass
            except RuntimeError:        # a step is open, or the runtime is closed
                refused.append(seq)
                break
    finally:
        if runtime.closed:
            pending.clear()
        else:
            pending.extend(refused)


def _free_rows_of_dropped_cache(runtime, rows, pending):
    """weakref.finalize of a RuvpyCache: its rows leave the Runtime its twins may still use.
    It runs wherever the cache is collected: in any thread, or in a GC inside a runtime call
    of this thread, whose change may be half-way (the state lock is an RLock: a remove here
    would re-enter it). So the rows are freed here only when no thread holds the state lock;
    otherwise, or while a step is open, they stay listed in `pending`, shared by the twins,
    and the next use of one of them frees them. Never waits: a finalizer must not block."""
    pending.extend(rows.seqs)
    rows.seqs = []
    if runtime.closed:
        pending.clear()
        return
    lock = runtime._state_lock
    if lock._is_owned() or not lock.acquire(blocking=False):
        return
    try:
        _free_rows(runtime, pending)
    finally:
        lock.release()


def _foreign_forward(what):
    return RuntimeError(f"{what} from another thread: a forward of this RuvpyCache can be used and "
                        f"ended only by the thread that began it, which is part-way through it; "
                        f"nothing was changed (use the cache from one thread at a time, or give "
                        f"each thread its own)")


class RuvpyCache(Cache):
    """A transformers Cache whose K/V live in a ruvpy Runtime, and whose attention runs in ruvpy.

    RuvpyCache(model, kv_cache="paged" | "two-tier" | "turbo", **runtime_options)

    The Runtime is sized from model.config (layers, query and KV heads, head_dim); the other
    keyword arguments go to `ruvpy.RuntimeConfig` (kv_dtype, cold, hot_tokens, max_tokens,
    memory_budget, threads, ...). Without max_tokens or memory_budget the cache holds
    config.max_position_embeddings tokens (all rows together). Creating the cache switches the
    model's attention implementation to "ruvpy" (see the module docstring).

    `cache.runtime` is the Runtime (`cache.runtime.stats()`); `cache.sequences` the ruvpy
    sequence of each batch row. Use it from one thread at a time, like the model: while a
    forward is part-way, its step belongs to its thread, and from another thread a layer's
    update/attention, a row edit, crop, reset or deepcopy raises RuntimeError and changes
    nothing (close() is the way to stop it from there).
    """

    def __init__(self, model, kv_cache="paged", **runtime_options):
        config = _text_config(model)
        _check_layer_types(config)
        if model.device.type != "cpu":
            raise NotImplementedError(f"RuvpyCache runs on the CPU; the model is on "
                                      f"{model.device}")
        shape = _attention_shape(config)
        options = dict(runtime_options)
        if options.get("max_tokens") is None and options.get("memory_budget") is None:
            options["max_tokens"] = int(getattr(config, "max_position_embeddings", 0) or 8192)
        runtime = Runtime(RuntimeConfig(**shape, kv_cache=kv_cache, **options))
        try:
            _use_ruvpy_attention(model)
        except BaseException:
            runtime.close()
            raise
        self.runtime = runtime
        self.num_layers = shape["num_layers"]
        self.num_heads = shape["num_heads"]
        self.num_kv_heads = shape["num_kv_heads"]
        self.head_dim = shape["head_dim"]
        self._config = config
        self._model_dtype = model.dtype              # of the K/V that iteration gives out
        super().__init__(layers=[_RuvpyLayer(self) for _ in range(self.num_layers)])
        # rows of dropped caches of this Runtime not freed yet (shared with every twin)
        self._dropped_rows = []
        self._track_rows([])                         # _seqs: ruvpy sequence of each batch row
        self._stored = np.zeros((0, 0), np.bool_)    # [rows, capacity]: column c of row b stored
        self._columns = 0                            # columns seen (pads included)
        self._plan = None                            # the open forward, if any
        self._attended = [False] * self.num_layers
        # shared with every twin (deepcopy: same Runtime): which one has a forward open
        self._runtime_forward = {"open": None}       # a weakref to that cache
        # the thread whose forward is open (from its first layer until it ends): claimed under
        # the lock, so that two threads starting forwards at once cannot both create rows
        self._forward_thread = None
        self._claim = threading.Lock()

    def _track_rows(self, seqs):
        """Hold `seqs` as this cache's rows, freed from the shared Runtime when the cache is
        dropped (a deepcopy dropped without reset() kept them until close())."""
        self._rows = _Rows(seqs)
        finalizer = weakref.finalize(self, _free_rows_of_dropped_cache, self.runtime,
                                     self._rows, self._dropped_rows)
        finalizer.atexit = False        # at exit the Runtime goes as a whole

    @property
    def _seqs(self):
        return self._rows.seqs

    @_seqs.setter
    def _seqs(self, seqs):
        self._rows.seqs = seqs

    def _free_dropped_rows(self):
        """Free what dropped caches of this Runtime left listed (see
        _free_rows_of_dropped_cache); called where no forward of this cache is open."""
        if self._dropped_rows:
            _free_rows(self.runtime, self._dropped_rows)

    # -- what generate() and the model ask ----------------------------------------------------
    def get_seq_length(self, layer_idx=0):
        """Columns seen so far, pads included (DynamicCache's count); 0 for a layer the
        model does not have, as DynamicCache says."""
        if type(layer_idx) is int and not 0 <= layer_idx < self.num_layers:
            return 0
        return self._columns

    def get_mask_sizes(self, query_length, layer_idx=0):
        return self._columns + int(query_length), 0

    def get_max_length(self, layer_idx=None):
        return -1

    @property
    def sequences(self):
        """The ruvpy sequence id of each batch row."""
        return list(self._seqs)

    @property
    def batch_size(self):
        return len(self._seqs) if self._seqs else -1

    @property
    def is_compileable(self):
        return False

    @property
    def is_initialized(self):
        return bool(self._seqs)

    @property
    def is_croppable(self):
        return hasattr(self.runtime, "truncate_sequence")

    @property
    def is_sliding(self):
        return [False] * self.num_layers

    @property
    def is_linear(self):
        return [False] * self.num_layers

    @property
    def is_dummy(self):
        return [False] * self.num_layers

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Note this layer's new K/V (no copy) and return them: the "ruvpy" attention function
        the layer calls next appends and attends them in one Runtime call."""
        pending = getattr(_local, "pending", None)
        if pending is not None and pending[0] is self:
            _local.pending = None
            self._abandon_forward("RuvpyCache.update")
            raise RuntimeError(f"the attention of layer {pending[1]} did not run through the "
                               f"{ATTENTION!r} attention function after cache.update(); the "
                               f"forward was rolled back")
        if type(layer_idx) is not int or not 0 <= layer_idx < self.num_layers:
            layer_idx = self._layer_index(layer_idx)
        if self._plan is not None and self._attended[layer_idx]:
            self._abandon_forward("RuvpyCache.update")   # the previous forward stopped part-way
        if self._plan is None:                # the first layer of a forward
            self._check_usable()
            if self._config._attn_implementation != ATTENTION:
                raise RuntimeError(f"RuvpyCache needs the model's attention implementation "
                                   f"{ATTENTION!r}, but it is "
                                   f"{self._config._attn_implementation!r} now: RuvpyCache "
                                   f"returns only the new K/V, the rest stays in ruvpy "
                                   f"(model.set_attn_implementation({ATTENTION!r}))")
        # the common case in one test; _check_kv says what is wrong otherwise
        if not (type(key_states) is torch.Tensor and type(value_states) is torch.Tensor and
                key_states.shape == value_states.shape and key_states.dtype is value_states.dtype
                and key_states.is_cpu and value_states.is_cpu and
                key_states.dtype in _TORCH_KV_DTYPES and key_states.dim() == 4 and
                key_states.shape[1] == self.num_kv_heads and
                key_states.shape[3] == self.head_dim and key_states.shape[2] > 0 and
                (not self._seqs or key_states.shape[0] == len(self._seqs))):
            self._check_kv(key_states, value_states)
        _local.pending = (self, layer_idx, key_states, value_states)
        return key_states, value_states

    # -- the attention --------------------------------------------------------------------------
    def _attend(self, layer, query, key, value, mask, *, dropout, scaling, is_causal, extra,
                model_layers=None):
        """Append `key`/`value` of every row to `layer` and attend `query` (one Step.attention
        call); returns [batch, q_len, num_heads, head_dim] in the query's dtype."""
        self._check_forward_thread("ruvpy_attention_forward")
        if model_layers is not None and model_layers != self.num_layers and self._plan is None:
            # its forwards would never reach the last layer, never commit, and each next one
            # would roll the last back: wrong attention, no error
            raise ValueError(f"this RuvpyCache was made for a model of {self.num_layers} layers; "
                             f"the model using it has {model_layers}")
        try:
            if dropout or is_causal is False or extra and self._unsupported(extra) or \
                    (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)) or \
                    type(query) is not torch.Tensor or query.dim() != 4 or \
                    query.shape[1] != self.num_heads or query.shape[3] != self.head_dim or \
                    query.shape[0] != key.shape[0] or query.shape[2] != key.shape[2] or \
                    query.dtype not in _TORCH_KV_DTYPES or not query.is_cpu:
                self._check_query(query, key, dropout, is_causal, extra)
            plan = self._plan
            if plan is None:
                self._begin_forward(query.shape[0], query.shape[2], mask)
                plan = self._plan
            elif query.shape[0] != plan.batch or query.shape[2] != plan.q_len:
                raise ValueError(f"layer {layer}: query shape {list(query.shape)} differs from the "
                                 f"forward's batch {plan.batch} x {plan.q_len} tokens")
            output = self._attend_rows(plan, layer, query, key, value, scaling)
        except BaseException:
            self._abandon_forward("ruvpy_attention_forward")
            raise
        self._attended[layer] = True
        plan.remaining -= 1
        if not plan.remaining:
            self._finish_forward()
        return output

    @staticmethod
    def _unsupported(extra):
        return any(extra.get(name) is not None for name in _UNSUPPORTED_ATTENTION_KWARGS)

    def _attend_rows(self, plan, layer, query, key, value, scaling):
        batch, heads, q_len, head_dim = query.shape
        result = torch.empty((batch, q_len, heads, head_dim), dtype=query.dtype)
        if plan.step is None:             # every new token of every row is a pad
            return result.zero_()
        q = self._token_rows(plan, query, "q", float16_ok=False)
        k = self._token_rows(plan, key, "k", float16_ok=True)
        v = self._token_rows(plan, value, "v", float16_ok=True)
        if result.dtype == torch.float32 and plan.gather is None:
            out = result.numpy().reshape(plan.n, heads, head_dim)   # ruvpy writes into torch
            plan.step.attention(layer, q, k, v, scale=scaling, out=out)
            return result
        out = plan.buffer("out", (plan.n, heads, head_dim), np.float32)
        plan.step.attention(layer, q, k, v, scale=scaling, out=out)
        rows = torch.from_numpy(out)
        if plan.gather is None:
            result.view(plan.n, heads, head_dim).copy_(rows)
        else:
            result.zero_()
            result.view(batch * q_len, heads, head_dim).index_copy_(
                0, plan.gather, rows.to(result.dtype))
        return result

    def _token_rows(self, plan, t, name, *, float16_ok):
        """t [batch, heads, q_len, head_dim] as the token-major numpy rows ruvpy takes,
        [n, heads, head_dim]: a view of t's memory when it already is token-major in an accepted
        dtype; else converted (bfloat16, float16 queries) or gathered (padded rows) into a
        buffer of this forward."""
        rows = (t.detach() if t.requires_grad else t).transpose(1, 2)   # [batch, q_len, heads, d]
        heads, head_dim = t.shape[1], t.shape[3]
        accepted = rows.dtype == torch.float32 or (float16_ok and rows.dtype == torch.float16)
        if accepted and plan.gather is None and rows.is_contiguous():
            return rows.numpy().reshape(plan.n, heads, head_dim)
        dtype = np.float16 if (float16_ok and rows.dtype == torch.float16) else np.float32
        buf = plan.buffer(name, (plan.n, heads, head_dim), dtype)
        dst = torch.from_numpy(buf)
        if plan.gather is None:
            dst.view(rows.shape).copy_(rows)
        else:
            flat = rows.reshape(-1, heads, head_dim)
            if flat.dtype == dst.dtype:
                torch.index_select(flat, 0, plan.gather, out=dst)
            else:
                dst.copy_(flat.index_select(0, plan.gather))
        return buf

    # -- one forward = one Runtime step -----------------------------------------------------------
    def _claim_forward(self, what):
        """This thread's forward from now until it ends; RuntimeError (nothing changed) while
        another thread's is open, including one still creating its rows and step."""
        me = threading.get_ident()
        with self._claim:
            owner = self._forward_thread
            if owner is not None and owner != me:
                raise _foreign_forward(what)
            self._forward_thread = me

    def _abandon_twins_forward(self, what):
        """Roll back a forward another cache sharing this Runtime (a deepcopy twin) left open in
        this thread: a forward runs to its end before this thread does anything else with the
        Runtime, so one still open failed part-way (an exception, Ctrl-C). Left to that cache's
        next use, its open step refused every other cache's forward and row change, and for
        good once that cache was dropped. Another thread's is that thread's."""
        ref = self._runtime_forward["open"]
        other = ref() if ref is not None else None
        if other is not None and other is not self and other._plan is not None and \
                other._forward_thread == threading.get_ident():
            other._abandon_forward(what)

    def _begin_forward(self, batch, q_len, mask):
        self._abandon_twins_forward("ruvpy_attention_forward")
        self._free_dropped_rows()
        self._claim_forward("ruvpy_attention_forward")
        try:
            self._open_forward(batch, q_len, mask)
        except BaseException:
            self._forward_thread = None
            raise

    def _open_forward(self, batch, q_len, mask):
        created = []
        if not self._seqs:
            try:
                for _ in range(batch):
                    created.append(self.runtime.add_sequence())
            except BaseException:
                for seq in created:
                    self.runtime.remove_sequence(seq)
                raise
            self._seqs = list(created)
            self._stored = np.zeros((batch, max(64, q_len)), np.bool_)
            self._columns = 0
        try:
            if batch != len(self._seqs):
                raise ValueError(f"the forward has batch size {batch}, but the cache holds "
                                 f"{len(self._seqs)} rows (reset() it, or reorder/select rows "
                                 f"first)")
            valid = self._new_tokens(mask, batch, q_len)
            counts = [q_len] * batch if valid is None else valid.sum(axis=1).tolist()
            seqs = [s for s, n in zip(self._seqs, counts) if n]
            step = None
            if seqs:
                step = self.runtime.step(seqs, [n for n in counts if n])
                step.__enter__()
        except BaseException:
            self._drop_created(created)
            raise
        self._plan = _ForwardPlan(step, batch, q_len, valid, created, self.num_layers)
        self._attended = [False] * self.num_layers
        self._runtime_forward["open"] = weakref.ref(self)

    def _forward_closed(self):
        ref = self._runtime_forward["open"]
        if ref is not None and ref() is self:
            self._runtime_forward["open"] = None

    def _finish_forward(self):
        plan, self._plan = self._plan, None
        self._forward_closed()
        try:
            if plan.step is not None:
                try:
                    plan.step.__exit__(None, None, None)     # commits
                except BaseException:
                    self._drop_created(plan.created)
                    raise
            self._append_columns(plan.valid, plan.batch, plan.q_len)
        finally:
            self._forward_thread = None

    def _check_forward_thread(self, what):
        """Refuse `what` while the forward open on this cache is another thread's, and change
        nothing: one being opened or whose rows are all pads (this cache's claim), or one with
        a step (that thread's, Step's own check; after close() it says so)."""
        plan = self._plan
        if plan is not None and plan.step is not None:
            plan.step._check_thread(what)
        owner = self._forward_thread
        if owner is not None and owner != threading.get_ident() and not self.runtime.closed:
            raise _foreign_forward(what)

    def _abandon_forward(self, what):
        """Roll back the open forward's step, if any (its sequences are as before it); `what`
        (the call doing it) is refused while that forward is another thread's."""
        self._check_forward_thread(what)
        self._abandon_twins_forward(what)
        pending = getattr(_local, "pending", None)
        if pending is not None and pending[0] is self:
            _local.pending = None
        plan, self._plan = self._plan, None
        self._forward_closed()
        if plan is not None:
            try:
                if plan.step is not None:
                    # rolls back (a step the runtime's close() abandoned: gives back its slot;
                    # one closed by this thread: nothing)
                    plan.step.__exit__(RuntimeError, None, None)
                self._drop_created(plan.created)
            finally:
                self._forward_thread = None
        self._free_dropped_rows()

    def _drop_created(self, created):
        if not created:
            return
        for seq in created:
            if not self.runtime.closed and seq in self.runtime.sequences:
                self.runtime.remove_sequence(seq)
        self._seqs = []
        self._stored = np.zeros((0, 0), np.bool_)
        self._columns = 0

    def _append_columns(self, valid, batch, q_len):
        start, end = self._columns, self._columns + q_len
        if end > self._stored.shape[1]:
            grown = np.zeros((batch, max(end, 2 * self._stored.shape[1])), np.bool_)
            grown[:, :start] = self._stored[:, :start]
            self._stored = grown
        self._stored[:, start:end] = True if valid is None else valid
        self._columns = end

    def _new_tokens(self, mask, batch, q_len):
        """Which of this forward's tokens are real (np.bool_ [batch, q_len]), or None when all
        are, read from the boolean mask transformers built; checks that each row's history in
        the mask is exactly what the row stored."""
        cols = self._columns
        if mask is None:
            if cols and not self._stored[:, :cols].all():
                raise ValueError("the forward has no attention mask, but rows of the cache have "
                                 "padding (stored nowhere); pass the attention_mask")
            return None
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 4:
            raise TypeError(f"ruvpy attention takes the boolean [batch, 1, q_len, kv_len] masks "
                            f"transformers builds for it, got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)} "
                            f"{list(getattr(mask, 'shape', []))}")
        if mask.shape[0] not in (1, batch) or mask.shape[1] != 1 or mask.shape[2] != q_len or \
                mask.shape[3] != cols + q_len:
            raise ValueError(f"attention mask of shape {list(mask.shape)} does not fit a forward "
                             f"of {batch} rows x {q_len} new tokens after {cols} cached columns "
                             f"(expected [{batch}, 1, {q_len}, {cols + q_len}])")
        m = mask[:, 0].expand(batch, q_len, cols + q_len)
        idx = torch.arange(q_len)
        valid = m[:, idx, cols + idx].numpy()          # a token sees itself unless it is a pad
        any_valid = valid.any(axis=1)
        rows = np.flatnonzero(any_valid)
        if rows.size:
            last = q_len - 1 - np.argmax(valid[rows, ::-1], axis=1)
            seen = m[torch.from_numpy(rows), torch.from_numpy(last)].numpy()
            expected = np.concatenate([self._stored[rows, :cols], valid[rows]], axis=1)
            bad = np.flatnonzero((seen != expected).any(axis=1))
            if bad.size:
                row = int(rows[bad[0]])
                raise ValueError(f"the attention mask of row {row} does not match what the cache "
                                 f"stored for it: ruvpy stores the unmasked tokens of each "
                                 f"forward and attends to exactly those (causal attention over "
                                 f"left/right padding only; tokens already cached cannot be "
                                 f"masked later)")
        return None if valid.all() else np.ascontiguousarray(valid)

    # -- rows: beam search and batch edits through copy-on-write forks -------------------------
    def reorder_cache(self, beam_idx):
        """Row i becomes old row beam_idx[i] (beam search): repeated rows are forks sharing
        storage copy-on-write, rows left out are freed."""
        self._select_rows(self._row_indices(beam_idx, "reorder_cache"),
                          "RuvpyCache.reorder_cache")

    def batch_select_indices(self, indices):
        """Keep the rows `indices` selects (int indices or a boolean mask), in that order."""
        self._select_rows(self._row_indices(indices, "batch_select_indices"),
                          "RuvpyCache.batch_select_indices")

    def batch_repeat_interleave(self, repeats):
        """Repeat each row `repeats` times in place (row r becomes rows r*repeats...)."""
        if isinstance(repeats, bool) or not isinstance(repeats, (int, np.integer)) or repeats < 1:
            raise ValueError(f"batch_repeat_interleave: repeats must be an int >= 1, got "
                             f"{repeats!r}")
        self._select_rows([r for r in range(len(self._seqs)) for _ in range(int(repeats))],
                          "RuvpyCache.batch_repeat_interleave")

    def _row_indices(self, indices, what):
        rows = len(self._seqs)
        if isinstance(indices, torch.Tensor):
            indices = indices.detach().cpu()
            if indices.dtype == torch.bool:
                if indices.shape != (rows,):
                    raise ValueError(f"{what}: a boolean row mask must have shape [{rows}], got "
                                     f"{list(indices.shape)}")
                return torch.nonzero(indices).flatten().tolist()
            if indices.is_floating_point() or indices.dim() != 1:
                raise TypeError(f"{what}: row indices must be a 1-D integer tensor, got "
                                f"{indices.dtype} {list(indices.shape)}")
            indices = indices.tolist()
        try:
            out = [int(i) for i in indices]
        except (TypeError, ValueError):
            raise TypeError(f"{what}: row indices must be integers, got {indices!r}") from None
        bad = [i for i in out if not 0 <= i < rows]
        if bad and rows:
            raise IndexError(f"{what}: row indices {bad[:8]} out of range for {rows} rows")
        return out

    def _select_rows(self, rows, what):
        self._check_usable()
        self._abandon_forward(what)
        if not self._seqs:
            return                       # nothing cached: the next forward makes the rows
        runtime, forks, kept = self.runtime, [], set()
        new_seqs = []
        try:
            for r in rows:
                if r in kept:
                    seq = runtime.fork_sequence(self._seqs[r])
                    forks.append(seq)
                else:
                    kept.add(r)
                    seq = self._seqs[r]
                new_seqs.append(seq)
        except BaseException:
            for seq in forks:
                runtime.remove_sequence(seq)
            raise
        for r, seq in enumerate(self._seqs):
            if r not in kept:
                runtime.remove_sequence(seq)
        self._seqs = new_seqs
        self._stored = self._stored[np.asarray(rows, np.intp)] if rows else \
            np.zeros((0, 0), np.bool_)
        if not new_seqs:
            self._columns = 0

    def crop(self, tokens_to_remove):
        """Remove the last -tokens_to_remove columns (DynamicCache's convention: a negative
        count; 0 does nothing) from every row, truncating each row's ruvpy sequence by the
        tokens it stored in those columns."""
        if isinstance(tokens_to_remove, bool) or not isinstance(tokens_to_remove,
                                                                (int, np.integer)):
            raise TypeError(f"crop: tokens_to_remove must be an int, got {tokens_to_remove!r}")
        if tokens_to_remove > 0:
            raise ValueError(f"Calling `crop` with a positive value (`{tokens_to_remove}`) is not "
                             f"supported. Please use a negative integer to remove that number "
                             f"of tokens from the cache instead.")
        self._check_usable()
        self._abandon_forward("RuvpyCache.crop")
        truncate = getattr(self.runtime, "truncate_sequence", None)
        if truncate is None:
            raise NotImplementedError("RuvpyCache.crop needs Runtime.truncate_sequence, which "
                                      "this ruvpy does not have")
        n = min(-int(tokens_to_remove), self._columns)
        if n == 0 or not self._seqs:
            return
        keep = self._columns - n
        dropped = self._stored[:, keep:self._columns].sum(axis=1)
        # positions count every token a row appended (evicted ones too): cut the last ones
        targets = [self.runtime.position(seq) - int(d) for seq, d in zip(self._seqs, dropped)]
        for seq, target in zip(self._seqs, targets):
            truncate(seq, target)
        self._stored[:, keep:] = False
        self._columns = keep

    def reset(self):
        """Drop every row (their KV storage is freed); the next forward starts a new batch."""
        self._check_usable()
        self._abandon_forward("RuvpyCache.reset")
        for seq in self._seqs:
            self.runtime.remove_sequence(seq)
        self._seqs = []
        self._stored = np.zeros((0, 0), np.bool_)
        self._columns = 0

    def __iter__(self):
        """Per layer, (keys, values, None) as DynamicCache yields them: [batch, num_kv_heads,
        columns, head_dim] copies in the model's dtype ((None, None, None) per layer before
        the first forward). ruvpy stores no pads, so a pad's column holds zeros, as does the
        column of a token a two-tier cache evicted. len(cache) is the number of layers."""
        self._check_usable()
        self._abandon_forward("iter(RuvpyCache)")
        return self._layers_kv(list(self._seqs), self._stored[:, :self._columns].copy())

    def _layers_kv(self, seqs, stored):
        if not seqs:
            for _ in range(self.num_layers):
                yield None, None, None
            return
        shape = (len(seqs), self.num_kv_heads, stored.shape[1], self.head_dim)
        # a row's columns holding tokens; eviction drops the oldest, so the K/V it still
        # holds are those of its last columns
        columns = [np.flatnonzero(row) for row in stored]
        for layer in range(self.num_layers):
            keys = torch.zeros(shape, dtype=self._model_dtype)
            values = torch.zeros(shape, dtype=self._model_dtype)
            for row, seq in enumerate(seqs):
                k, v = self.runtime.get_kv(seq, layer)           # [held, heads, head_dim]
                held = torch.from_numpy(columns[row][columns[row].size - len(k):])
                keys[row].index_copy_(1, held, torch.from_numpy(k).transpose(0, 1).to(
                    self._model_dtype))
                values[row].index_copy_(1, held, torch.from_numpy(v).transpose(0, 1).to(
                    self._model_dtype))
            yield keys, values, None

    def __deepcopy__(self, memo):
        """A cache holding the same rows as forks in the same Runtime (copy-on-write: nothing is
        copied until one of them appends), e.g. to reuse a prefilled prompt
        (`copy.deepcopy(prompt_cache)`). Both caches share the Runtime: close() closes it for
        both. A cache that is dropped frees its rows (reset() does it at once)."""
        self._check_usable()
        self._abandon_forward("copy.deepcopy(RuvpyCache)")
        forks = []
        try:
            for seq in self._seqs:
                forks.append(self.runtime.fork_sequence(seq))
        except BaseException:
            for seq in forks:
                self.runtime.remove_sequence(seq)
            raise
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        twin.layers = [_RuvpyLayer(twin) for _ in range(self.num_layers)]
        twin._track_rows(forks)         # its own holder: `twin._seqs = ` would set ours
        twin._stored = self._stored.copy()
        twin._attended = [False] * self.num_layers
        twin._forward_thread = None
        twin._claim = threading.Lock()
        memo[id(self)] = twin
        return twin

    def __copy__(self):
        raise TypeError("copy.copy(RuvpyCache) would make two caches of the same rows; "
                        "copy.deepcopy(cache) makes one with rows of its own (copy-on-write "
                        "forks)")

    def close(self):
        """Free the Runtime (all KV storage) now; the cache cannot be used afterwards. A
        forward running in another thread fails at its next layer (Runtime.close abandons its
        step; that thread rolls its own forward back)."""
        if self.runtime.closed:
            return
        pending = getattr(_local, "pending", None)
        if pending is not None and pending[0] is self:
            _local.pending = None
        # The Runtime knows whose step the forward is: this thread's ends here, another
        # thread's is abandoned (that thread rolls its forward back at its next layer, where
        # the step raises the Runtime's "closed by another thread"). A forward of this thread
        # left open fails the same way if the model goes on.
        self.runtime.close()

    # -- not supported ------------------------------------------------------------------------
    def offload(self, *args, **kwargs):
        raise NotImplementedError("RuvpyCache: offloading is not supported (the KV cache lives "
                                  "in ruvpy's CPU memory)")

    def prefetch(self, *args, **kwargs):
        raise NotImplementedError("RuvpyCache: prefetch/offloading is not supported")

    def early_initialization(self, *args, **kwargs):
        raise NotImplementedError("RuvpyCache: early_initialization (torch.export) is not "
                                  "supported")

    # -- checks ---------------------------------------------------------------------------------
    def _check_usable(self):
        if self.runtime.closed:
            raise RuntimeError("this RuvpyCache is closed")

    def _layer_index(self, layer_idx):
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, (int, np.integer)) or \
                not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"RuvpyCache.update: layer_idx must be an int in 0..."
                             f"{self.num_layers - 1}, got {layer_idx!r}")
        return int(layer_idx)

    def _check_kv(self, key, value):
        for name, t in (("key_states", key), ("value_states", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"RuvpyCache.update: {name} must be a torch.Tensor, got "
                                f"{type(t).__name__}")
            if t.device.type != "cpu":
                raise NotImplementedError(f"RuvpyCache.update: {name} is on {t.device}; ruvpy "
                                          f"runs on the CPU")
            if t.dtype not in _TORCH_KV_DTYPES:
                raise TypeError(f"RuvpyCache.update: {name} must be float32, float16 or "
                                f"bfloat16, got {t.dtype}")
            if t.dim() != 4 or t.shape[1] != self.num_kv_heads or t.shape[3] != self.head_dim:
                raise ValueError(f"RuvpyCache.update: {name} must be [batch, "
                                 f"num_kv_heads={self.num_kv_heads}, tokens, "
                                 f"head_dim={self.head_dim}], got {list(t.shape)}")
        if key.shape != value.shape or key.dtype != value.dtype:
            raise ValueError(f"RuvpyCache.update: key_states {list(key.shape)} {key.dtype} and "
                             f"value_states {list(value.shape)} {value.dtype} differ")
        if self._seqs and key.shape[0] != len(self._seqs):
            raise ValueError(f"RuvpyCache.update: batch size {key.shape[0]}, but the cache holds "
                             f"{len(self._seqs)} rows (reset() it, or reorder/select rows first)")
        if key.shape[2] < 1:
            raise ValueError("RuvpyCache.update: no new tokens (key_states has 0 tokens)")

    def _check_query(self, query, key, dropout, is_causal, extra):
        if dropout:
            raise NotImplementedError(f"ruvpy attention has no dropout (got dropout={dropout}); "
                                      f"put the model in eval() mode")
        if is_causal is False:
            raise NotImplementedError("ruvpy attention is causal; is_causal=False (bidirectional "
                                      "attention) is not supported")
        for name, feature in _UNSUPPORTED_ATTENTION_KWARGS.items():
            if extra.get(name) is not None:
                raise NotImplementedError(f"ruvpy attention does not support {feature} "
                                          f"({name}={extra[name]!r})")
        if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
            raise RuntimeError("ruvpy attention is inference-only (no autograd): run the model "
                               "under torch.no_grad() or torch.inference_mode()")
        if not isinstance(query, torch.Tensor) or query.dim() != 4 or \
                query.shape[1] != self.num_heads or query.shape[3] != self.head_dim or \
                query.shape[0] != key.shape[0] or query.shape[2] != key.shape[2]:
            raise ValueError(f"ruvpy attention: query must be [batch, num_heads={self.num_heads}, "
                             f"tokens, head_dim={self.head_dim}] matching the keys "
                             f"{list(key.shape)}, got {list(getattr(query, 'shape', []))}")
        if query.dtype not in _TORCH_KV_DTYPES or query.device.type != "cpu":
            raise TypeError(f"ruvpy attention: query must be a CPU float32/float16/bfloat16 "
                            f"tensor, got {query.dtype} on {query.device}")

    def __repr__(self):
        cfg = self.runtime.config
        return (f"RuvpyCache({cfg.kv_cache}, {len(self._seqs)} rows, {self._columns} columns, "
                f"{self.num_layers} layers)")


class _RuvpyLayer(CacheLayerMixin):
    """What transformers introspects per layer (`cache.layers`). A row's layers live in one
    ruvpy sequence, so the cache-wide methods of RuvpyCache do the work; there are no per-layer
    key/value tensors."""

    is_compileable = False
    is_sliding = False
    supports_early_init = False
    keys = None
    values = None

    def __init__(self, cache):      # noqa: D107 (no per-layer tensors to set up)
        self._cache = cache

    @property
    def is_croppable(self):
        return self._cache.is_croppable

    @property
    def is_initialized(self):
        return self._cache.is_initialized

    def get_seq_length(self):
        return self._cache.get_seq_length()

    def get_mask_sizes(self, query_length):
        return self._cache.get_mask_sizes(query_length)

    def get_max_length(self):
        return -1

    def _per_layer(self, what):
        raise NotImplementedError(f"RuvpyCache keeps all layers of a row in one ruvpy sequence: "
                                  f"call cache.{what}(...), not cache.layers[i].{what}(...)")

    def lazy_initialization(self, key_states, value_states):
        self._per_layer("update")

    def update(self, key_states, value_states, *args, **kwargs):
        self._per_layer("update")

    def reset(self):
        self._per_layer("reset")

    def reorder_cache(self, beam_idx):
        self._per_layer("reorder_cache")

    def crop(self, tokens_to_remove):
        self._per_layer("crop")

    def batch_repeat_interleave(self, repeats):
        self._per_layer("batch_repeat_interleave")

    def batch_select_indices(self, indices):
        self._per_layer("batch_select_indices")

    def offload(self):
        self._cache.offload()

    def prefetch(self):
        self._cache.prefetch()
