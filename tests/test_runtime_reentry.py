"""Caller code run from inside a runtime call, and a step ended from the wrong thread.

- Arguments whose conversions run code (a scale's __float__, an id's __index__ / __hash__, a
  count's __index__, a causal flag's __bool__, an iterable of ids, an import's mapping): the
  Runtime and its KV cache convert them before taking any lock. Such code calling back into
  the runtime while another thread holds the runtime's state lock and waits for the cache's
  lock used to deadlock both threads (it ran under the cache's lock); it now waits for that
  thread, which finishes, and then works. The interleaving is forced with events; every
  thread is joined with a deadlock guard (a timeout, not a timing: the calls take
  milliseconds), so a deadlock fails the test instead of hanging it.
- Called back from the same thread, such code either works (a read, a call on another
  layer) or raises a clear error that changes nothing (the same layer again, a step it
  ended), and the step's outcome is consistent.
- Step.__exit__ from a thread that did not enter the step raises and leaves the step, its
  slot and its sequences as they were; the owning thread then ends it normally.
- So does every other Step call that touches the arena, the KV cache or the step (attention,
  alloc), open or being opened, before it converts an argument; the step's plan (seqs,
  positions, ...) reads from any thread.
"""
import threading

import numpy as np
import pytest

from ruvpy import KVCacheFull, Runtime, RuntimeConfig
from ruvpy.runtime import IncompleteStepError

from _helpers import Evil, EvilCount, EvilId, runtime_snapshot

JOIN_SECONDS = 30        # a deadlock guard, not a timing: each call takes milliseconds
CFG = dict(num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, max_tokens=256, threads=1)


def qkv(cfg, n, value=0.5):
    return tuple(np.full((n, h, cfg.head_dim), value, np.float32)
                 for h in (cfg.num_heads, cfg.num_kv_heads, cfg.num_kv_heads))


def make_runtime(kv_cache="paged", tokens=3):
    extra = {} if kv_cache == "paged" else dict(hot_tokens=16, migration_batch=16)
    rt = Runtime(RuntimeConfig(**CFG, kv_cache=kv_cache, **extra))
    seq = rt.add_sequence()
    with rt.step([seq], [tokens]) as step:
        for layer in range(rt.config.num_layers):
            step.attention(layer, *qkv(rt.config, tokens))
    return rt, seq


# ----------------------------------------------------------------------------------------
# 1. caller code calling back into the runtime while another thread waits in it
# ----------------------------------------------------------------------------------------

def _attend_with_a_scale(rt, seq, hook):
    cfg = rt.config
    with rt.step([seq], [1]) as step:
        out = step.attention(0, *qkv(cfg, 1), scale=Evil(0.125, hook)).copy()
        step.attention(1, *qkv(cfg, 1))
    return out


class _Ids:
    """An iterable of sequence ids whose iteration runs `hook` first."""

    def __init__(self, ids, hook):
        self.ids, self.hook = ids, hook

    def __iter__(self):
        self.hook()
        return iter(self.ids)


class _Mapping(dict):
    """An import's arrays whose __getitem__ runs `hook` first."""

    def __init__(self, arrays, hook):
        super().__init__(arrays)
        self.hook = hook

    def __getitem__(self, name):
        self.hook()
        return dict.__getitem__(self, name)


def _set_id_hook(hook, seq):
    EvilId.callback = hook
    return EvilId(seq)


def _set_count_hook(hook, n):
    EvilCount.callback = hook
    return EvilCount(n)


# name -> (call(rt, seq, hook) running the hook from an argument's conversion, check(rt, seq,
# result) of what the call did)
CALLS = {
    # the defect as found: Step.attention's scale converted under the cache's lock
    "step.attention scale __float__": (
        _attend_with_a_scale,
        lambda rt, seq, out: np.array_equal(out, np.full_like(out, 0.5)) and
        [rt.seq_len(seq, layer) for layer in (0, 1)] == [4, 4] and rt.position(seq) == 4),
    # the same shape, found in the audit: the KV cache's calls
    "cache.seq_len layer __index__": (
        lambda rt, seq, hook: rt.cache.seq_len(seq, _set_count_hook(hook, 1)),
        lambda rt, seq, n: n == 3),
    "cache.get_kv id __index__/__hash__": (
        lambda rt, seq, hook: rt.cache.get_kv(_set_id_hook(hook, seq), 0),
        lambda rt, seq, kv: kv[0].shape[0] == 3),
    "cache.plan count __index__": (
        lambda rt, seq, hook: rt.cache.plan([seq], [_set_count_hook(hook, 1)], num_heads=2),
        lambda rt, seq, plan: plan.n_tokens == (1,)),
    "cache.attention causal __bool__": (
        lambda rt, seq, hook: rt.cache.attention(seq, 0, qkv(rt.config, 1)[0],
                                                 causal=Evil(True, hook)),
        lambda rt, seq, out: np.array_equal(out, np.full_like(out, 0.5))),
    "cache.reserve ids __iter__": (
        lambda rt, seq, hook: rt.cache.reserve(_Ids([seq], hook), [1]),
        lambda rt, seq, result: result is None and rt.cache.seq_len(seq, 0) == 3),
    "cache.import_sequence mapping __getitem__": (
        lambda rt, seq, hook: rt.cache.import_sequence(
            *(lambda meta, arrays: (meta, _Mapping(arrays, hook)))(*rt.cache.export_sequence(seq))),
        lambda rt, seq, new: rt.cache.seq_len(new, 1) == 3),
}

def _refused_during_a_step(read):
    """read(rt, seq), or "refused" if A's step covered seq then (its K/V are not committed:
    another thread's seq_len / get_kv is refused)"""
    def reader(rt, seq):
        try:
            return read(rt, seq)
        except RuntimeError as exc:
            if "while a step on it is open" not in str(exc):
                raise
            return "refused"
    return reader


READERS = {"seq_len": _refused_during_a_step(lambda rt, seq: rt.seq_len(seq, 1)),
           "stats": lambda rt, seq: rt.stats(),
           "get_kv": _refused_during_a_step(lambda rt, seq: rt.get_kv(seq, 1))}


def _run_both(rt, check_open, a, b, errors, deadlock):
    """Run a and b in two daemon threads with rt._check_open replaced by `check_open` (the
    state-lock hook the tests synchronise on); fail naming `deadlock` if either never ends,
    then with the first error either collected."""
    rt._check_open = check_open
    both = [threading.Thread(target=a, daemon=True), threading.Thread(target=b, daemon=True)]
    for t in both:
        t.start()
    for t in both:
        t.join(JOIN_SECONDS)
    hung = [name for name, t in zip("AB", both) if t.is_alive()]
    assert not hung, f"threads {hung} deadlocked: {deadlock}"
    del rt._check_open
    assert not errors, errors[0]


def _race(rt, seq, call, reader):
    """Thread A runs call(rt, seq, hook); the first time an argument's conversion runs
    hook(), it lets thread B into reader(rt, seq) and waits until B holds the runtime's state
    lock (B next needs the KV cache's lock), then reads the runtime itself (memory_bytes: the
    state lock). Returns (A's result, B's result, what A read)."""
    a_converting, b_holds_state = threading.Event(), threading.Event()
    b_thread, results, errors = [], {}, []
    check_open = rt._check_open

    def check_open_and_say_so():      # runs under the state lock in every reader
        check_open()
        if threading.get_ident() in b_thread:
            b_holds_state.set()

    def hook():
        if a_converting.is_set():
            return
        a_converting.set()
        assert b_holds_state.wait(JOIN_SECONDS), "B never took the state lock"
        results["a read"] = rt.memory_bytes()

    def a():
        try:
            results["a"] = call(rt, seq, hook)
        except BaseException as exc:       # reported below
            errors.append(exc)

    def b():
        b_thread.append(threading.get_ident())
        try:
            assert a_converting.wait(JOIN_SECONDS), "A's argument was never converted"
            results["b"] = reader(rt, seq)
        except BaseException as exc:       # reported below
            errors.append(exc)

    _run_both(rt, check_open_and_say_so, a, b, errors,
              "A's argument conversion called back into the runtime while holding the KV cache's "
              "lock, B held the state lock")
    return results["a"], results["b"], results["a read"]


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("reader", sorted(READERS))
def test_a_conversion_calling_back_while_another_thread_reads_does_not_deadlock(call, reader):
    rt, seq = make_runtime()
    do, check = CALLS[call]
    try:
        result, read, memory = _race(rt, seq, do, READERS[reader])
    finally:
        EvilId.callback = EvilCount.callback = None
    assert check(rt, seq, result)
    assert memory["kv"] > 0
    if read == "refused":               # during A's step
        assert reader != "stats" and call == "step.attention scale __float__"
    elif reader == "seq_len":
        assert read in (3, 4)           # before or after A's step
    elif reader == "get_kv":
        assert read[0].shape[0] in (3, 4)
    else:
        assert read.kv["tokens"] >= 3
    rt.close()                          # (not after a deadlock: its threads hold the locks)


@pytest.mark.parametrize("kv_cache", ["paged", "two-tier"])
def test_the_scale_race_on_both_caches(kv_cache):
    """The defect as found, on both caches, with stats() as the other thread's read."""
    rt, seq = make_runtime(kv_cache)
    out, read, _ = _race(rt, seq, _attend_with_a_scale, READERS["stats"])
    np.testing.assert_array_equal(out, np.full_like(out, 0.5))
    assert [rt.seq_len(seq, layer) for layer in (0, 1)] == [4, 4]
    assert rt.position(seq) == 4 and not rt._step_lock.locked()
    rt.close()


# ----------------------------------------------------------------------------------------
# 1b. a finalizer run by the GC inside a KV cache call, while another thread reads
# ----------------------------------------------------------------------------------------

def _under_cache_lock(rt, seq):
    """Whether the calling thread is inside a call of rt's KV cache (it refuses re-entry)."""
    try:
        rt.cache.sequences()
        return False
    except RuntimeError as exc:
        return "re-entered" in str(exc)


def _open_step(rt, seq):
    with rt.step([seq], [1]) as step:        # its cache.plan() collects
        for layer in range(rt.config.num_layers):
            step.attention(layer, *qkv(rt.config, 1))


def _attend_refused_input(rt, seq):
    with rt.step([seq], [1]) as step:
        q, k, v = qkv(rt.config, 1)
        with pytest.raises(TypeError):       # refused under the cache's lock: it collects
            step.attention(0, q, k.astype(np.float64), v.astype(np.float64))
        for layer in range(rt.config.num_layers):
            step.attention(layer, q, k, v)


@pytest.mark.parametrize("kv_cache", ["paged", "two-tier"])
@pytest.mark.parametrize("call", [_open_step, _attend_refused_input])
def test_a_finalizer_calling_back_from_inside_a_cache_call_does_not_deadlock(call, kv_cache):
    """Thread A's step allocates under the KV cache's lock; with gen-0 threshold 1 that runs a
    collection there, and a collected object's __del__ reads the runtime (memory_bytes: the
    state lock). Thread B's stats() is let in first (the state lock, then the cache's). The
    runtime's opening and attention used to take the cache's lock without the state lock: A
    waited for B's state lock, B for A's cache lock, forever. Now A holds the state lock
    around every cache call: B waits for A, A's read re-enters the state lock and its cache
    read is refused (the cache's re-entry check), and both finish."""
    import gc
    rt, seq = make_runtime(kv_cache)
    a_inside, b_holds_state = threading.Event(), threading.Event()
    threads, seen, errors = {}, {}, []
    check_open = rt._check_open

    def check_open_and_say_so():          # under the state lock in stats()
        check_open()
        if threading.get_ident() == threads.get("b"):
            b_holds_state.set()

    class Garbage:
        def __init__(self):
            self.me = self                # a cycle: only the GC frees it

        def __del__(self):
            if a_inside.is_set() or threading.get_ident() != threads.get("a"):
                return
            if not _under_cache_lock(rt, seq):
                Garbage()                 # not there yet: one more for the next collection
                return
            a_inside.set()
            try:
                if not rt._state_lock._is_owned():     # else B cannot take it before A is done
                    assert b_holds_state.wait(JOIN_SECONDS), "B never took the state lock"
                seen["a read"] = rt.memory_bytes()
            except RuntimeError as exc:   # the cache's refusal of a re-entering call
                seen["a read"] = exc
            except BaseException as exc:  # (a finalizer's exceptions are only printed)
                errors.append(exc)

    def a():
        threads["a"] = threading.get_ident()
        old = gc.get_threshold()
        gc.collect()
        Garbage()
        gc.set_threshold(1)
        try:
            call(rt, seq)
        except BaseException as exc:      # reported below
            errors.append(exc)
        finally:
            gc.set_threshold(*old)

    def b():
        threads["b"] = threading.get_ident()
        try:
            assert a_inside.wait(JOIN_SECONDS), "no collection ran inside a KV cache call"
            seen["b"] = rt.stats()
        except BaseException as exc:      # reported below
            errors.append(exc)

    _run_both(rt, check_open_and_say_so, a, b, errors,
              "A's finalizer, run under the KV cache's lock, waited for the state lock B held "
              "while B waited for the cache")
    assert "re-entered" in str(seen["a read"]) or seen["a read"]["kv"] > 0
    assert seen["b"].kv["tokens"] in (3, 4)
    assert [rt.seq_len(seq, layer) for layer in (0, 1)] == [4, 4]
    assert rt.position(seq) == 4 and not rt._step_lock.locked()
    rt.close()


# ----------------------------------------------------------------------------------------
# 2. caller code calling back from the same thread
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kv_cache", ["paged", "two-tier"])
def test_a_scale_reading_the_runtime_from_inside_a_step_works(kv_cache):
    rt, seq = make_runtime(kv_cache)
    seen = {}

    def read_everything():
        seen["seq_len"] = rt.seq_len(seq, 0)
        seen["cache"] = rt.cache.seq_len(seq, 0)
        seen["kv"] = rt.get_kv(seq, 1)[0].shape[0]
        seen["bytes"] = rt.memory_bytes()["kv"]
        seen["stats"] = rt.stats().kv["tokens"]

    with rt:
        with rt.step([seq], [1]) as step:
            out = step.attention(0, *qkv(rt.config, 1), scale=Evil(0.125, read_everything))
            np.testing.assert_array_equal(out, np.full_like(out, 0.5))
            step.attention(1, *qkv(rt.config, 1))
        assert seen["seq_len"] == seen["cache"] == seen["kv"] == 3 and seen["bytes"] > 0
        assert [rt.seq_len(seq, layer) for layer in (0, 1)] == [4, 4]


def test_a_scale_attending_the_same_layer_again_is_refused_and_the_step_stays_whole():
    rt, seq = make_runtime()
    cfg = rt.config
    with rt:
        with rt.step([seq], [1]) as step:
            inner = Evil(0.125, lambda: step.attention(0, *qkv(cfg, 1)))
            with pytest.raises(ValueError, match="layer 0 was already attended"):
                step.attention(0, *qkv(cfg, 1), scale=inner)
            assert step.attended_layers == [0]          # the inner call's, once
            step.attention(1, *qkv(cfg, 1))
        # one token in every layer, not two in layer 0
        assert [rt.seq_len(seq, layer) for layer in (0, 1)] == [4, 4] and rt.position(seq) == 4


def test_a_scale_attending_another_layer_works():
    rt, seq = make_runtime()
    cfg = rt.config
    with rt:
        with rt.step([seq], [1]) as step:
            step.attention(0, *qkv(cfg, 1), scale=Evil(0.125, lambda: step.attention(1, *qkv(cfg, 1))))
        assert [rt.seq_len(seq, layer) for layer in (0, 1)] == [4, 4] and rt.position(seq) == 4


@pytest.mark.parametrize("swallow", [False, True])
def test_a_scale_ending_its_own_step_leaves_it_rolled_back(swallow):
    """The conversion ends the step (an incomplete step: rolled back). Whether or not it lets
    that error out, the attention call that converted it writes nothing."""
    rt, seq = make_runtime()
    cfg = rt.config
    before = runtime_snapshot(rt)

    def end_step():
        try:
            step.__exit__(None, None, None)
        except IncompleteStepError:
            if not swallow:
                raise

    with rt:
        with pytest.raises(IncompleteStepError if not swallow else RuntimeError,
                           match="rolled back" if not swallow else "the step has ended"):
            with rt.step([seq], [1]) as step:
                step.attention(0, *qkv(cfg, 1), scale=Evil(0.125, end_step))
        assert runtime_snapshot(rt) == before and not rt._step_lock.locked()
        with rt.step([seq], [1]) as step:           # usable
            for layer in (0, 1):
                step.attention(layer, *qkv(cfg, 1))
        assert [rt.seq_len(seq, layer) for layer in (0, 1)] == [4, 4]


def test_a_scale_closing_the_runtime_raises_the_runtimes_error():
    rt, seq = make_runtime()
    with pytest.raises(RuntimeError, match="is closed"):
        with rt.step([seq], [1]) as step:
            step.attention(0, *qkv(rt.config, 1), scale=Evil(0.125, rt.close))
    assert rt.closed and not rt._step_lock.locked()


# ----------------------------------------------------------------------------------------
# 3. a step ended from another thread
# ----------------------------------------------------------------------------------------

def _in_another_thread(fn):
    outcome = {}

    def run():
        try:
            outcome["result"] = fn()
        except BaseException as exc:        # returned
            outcome["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join(JOIN_SECONDS)
    assert not t.is_alive()
    return outcome.get("error")


@pytest.mark.parametrize("kv_cache", ["paged", "two-tier"])
@pytest.mark.parametrize("exc_type", [None, RuntimeError])
def test_a_step_exited_from_another_thread_raises_and_changes_nothing(kv_cache, exc_type):
    rt, seq = make_runtime(kv_cache)
    cfg = rt.config
    before = runtime_snapshot(rt)
    with rt:
        with rt.step([seq], [2]) as step:
            step.attention(0, *qkv(cfg, 2))
            arena_used = rt.arena.stats().used
            error = _in_another_thread(lambda: step.__exit__(exc_type, None, None))
            assert isinstance(error, RuntimeError), error
            assert "only by the thread that entered it" in str(error)
            # the step, its slot, its transaction and its arena are as they were
            assert rt._step_lock.locked() and rt._step is step and step._state == "open"
            assert rt.cache.in_transaction(seq) and rt.arena.stats().used == arena_used
            assert rt.cache.seq_len(seq, 0) == 5 and rt.cache.seq_len(seq, 1) == 3
            out = step.attention(1, *qkv(cfg, 2))       # the owner carries on
            np.testing.assert_array_equal(out, np.full_like(out, 0.5))
        assert not rt._step_lock.locked() and rt.stats().steps == 2
        assert [rt.seq_len(seq, layer) for layer in (0, 1)] == [5, 5] and rt.position(seq) == 5
        assert runtime_snapshot(rt) != before
        # and a rollback by the owner still rolls back
        with pytest.raises(KeyError):
            with rt.step([seq], [1]) as step:
                step.attention(0, *qkv(cfg, 1))
                assert isinstance(_in_another_thread(lambda: step.__exit__(None, None, None)),
                                  RuntimeError)
                raise KeyError("the application's own error")
        assert [rt.seq_len(seq, layer) for layer in (0, 1)] == [5, 5]


def test_an_abandoned_step_exited_from_another_thread_raises_too():
    """close() from another thread abandons the step; that thread (or a third one) cannot end
    it either: the owner does, and gets the runtime's "closed by another thread"."""
    rt, seq = make_runtime()
    with pytest.raises(RuntimeError, match="closed by another thread while this step was open"):
        with rt.step([seq], [1]) as step:
            step.attention(0, *qkv(rt.config, 1))
            assert _in_another_thread(rt.close) is None
            error = _in_another_thread(lambda: step.__exit__(None, None, None))
            assert "only by the thread that entered it" in str(error)
            assert rt._step_lock.locked(), "another thread released the step's slot"
    assert rt.closed and not rt._step_lock.locked()


def test_attached_weights_are_read_outside_the_state_lock():
    """stats() reads the attached weights object (the caller's code: resident_bytes()) before
    it takes the state lock. Weights with a lock of their own: thread B holds it and reads the
    runtime (the state lock) while thread A's stats() needs it. Run under the state lock, A's
    read deadlocked with B."""
    rt, seq = make_runtime()
    a_inside, b_holds_lock, b_thread, errors = threading.Event(), threading.Event(), [], []

    class Weights:
        path, mapped_bytes, nbytes = "weights.gguf", 4096, 4096

        def __init__(self):
            self.lock = threading.Lock()

        def resident_bytes(self):
            a_inside.set()
            with self.lock:
                return 1024

    weights = Weights()
    rt.attach_weights(weights)
    check_open = rt._check_open

    def check_open_and_say_so():            # A holds the state lock here
        check_open()
        if threading.get_ident() not in b_thread:
            a_inside.set()

    def b():
        b_thread.append(threading.get_ident())
        with weights.lock:
            b_holds_lock.set()
            try:
                assert a_inside.wait(JOIN_SECONDS)
                out["b"] = rt.memory_bytes()
            except BaseException as exc:    # reported below
                errors.append(exc)

    def a():
        try:
            out["a"] = rt.stats()
        except BaseException as exc:        # reported below
            errors.append(exc)

    out = {}
    rt._check_open = check_open_and_say_so
    threads = [threading.Thread(target=b, daemon=True), threading.Thread(target=a, daemon=True)]
    threads[0].start()
    assert b_holds_lock.wait(JOIN_SECONDS)  # B holds the weights' lock before A starts
    threads[1].start()
    for t in threads:
        t.join(JOIN_SECONDS)
    assert not any(t.is_alive() for t in threads), "stats() and the weights' reader deadlocked"
    del rt._check_open
    assert not errors, errors[0]
    assert out["a"].weights == {"path": "weights.gguf", "mapped_bytes": 4096,
                                "resident_bytes": 1024, "nbytes": 4096}
    assert out["b"]["kv"] > 0
    rt.close()


# ----------------------------------------------------------------------------------------
# 4. a step used from another thread
# ----------------------------------------------------------------------------------------

def _foreign_calls(cfg, witness, out):
    """name -> call(step) made from a thread that did not enter the step. witness() is the
    caller's code in an argument's conversion (an int's __index__ runs EvilCount.callback,
    which _witnessed sets to it; it must not run); `out` an output array (it must not be
    written)."""
    q, k, v = qkv(cfg, 2, 0.25)
    return {
        "step.attention": lambda step: step.attention(1, q, k, v),
        "step.attention out=": lambda step: step.attention(1, q, k, v, out=out),
        "step.attention layer __index__": lambda step: step.attention(EvilCount(1), q, k, v),
        "step.attention scale __float__":
            lambda step: step.attention(1, q, k, v, scale=Evil(0.125, witness)),
        "step.attention attended layer": lambda step: step.attention(0, q, k, v),
        "step.alloc": lambda step: step.alloc((64,)),
        "step.alloc shape __index__": lambda step: step.alloc((EvilCount(64),)),
        "step.__exit__": lambda step: step.__exit__(None, None, None),
        "step.__exit__ exception": lambda step: step.__exit__(RuntimeError, None, None),
    }


FOREIGN_CALLS = sorted(_foreign_calls(RuntimeConfig(**CFG), None, None))


class _witnessed:
    """Within it, EvilCount's conversions record that they ran in `ran`."""

    def __init__(self):
        self.ran = []

    def __call__(self):
        self.ran.append("converted")

    def __enter__(self):
        EvilCount.callback = self
        return self

    def __exit__(self, *exc):
        EvilCount.callback = None


def _step_state(rt, step):
    """What a refused call must leave as it was: the runtime's sequences, lengths, K/V and KV
    statistics (runtime_snapshot), the step, its slot and transaction, the arena and the
    buffer pool."""
    return {"runtime": runtime_snapshot(rt), "step": (step._state, step.attended_layers,
                                                      step._remaining, step._failed, step._calls),
            "slot": (rt._step_lock.locked(), rt._step is step),
            "transaction": [rt.cache.in_transaction(s) for s in step.seqs],
            "arena": rt.arena.stats(), "pool": rt.pool.stats()}


def _refused(error, name):
    """The error a call from another thread raises: RuntimeError naming the call and why."""
    assert type(error) is RuntimeError, repr(error)
    text = str(error)
    assert f"{name} from another thread" in text, text
    assert "only by the thread that entered it" in text and "nothing was changed" in text, text


def _stepped_twin(kv_cache):
    """The runtime a test's steps make without the refused call: what they must end as."""
    twin, seq = make_runtime(kv_cache)
    with twin.step([seq], [2]) as step:
        for layer in range(twin.config.num_layers):
            step.attention(layer, *qkv(twin.config, 2))
    return twin


def _same_as_twin(rt, kv_cache):
    twin = _stepped_twin(kv_cache)
    with twin:
        assert runtime_snapshot(rt) == runtime_snapshot(twin)
        counts = ("steps", "rollbacks", "attention_calls", "arena_fallbacks")
        assert [getattr(rt.stats(), c) for c in counts] == \
            [getattr(twin.stats(), c) for c in counts]


@pytest.mark.parametrize("kv_cache", ["paged", "two-tier", "turbo"])
@pytest.mark.parametrize("name", FOREIGN_CALLS)
def test_a_step_used_from_another_thread_is_refused_and_changes_nothing(kv_cache, name):
    """Every Step call that touches the arena, the KV cache or the step itself, made from a
    thread that did not enter the step, raises a RuntimeError saying so before it converts an
    argument or writes anything: the cache, arena, pool, step and its slot are as they were,
    and the owner's step then ends exactly as it would have without the call."""
    rt, seq = make_runtime(kv_cache)
    cfg = rt.config
    out = np.full((2, cfg.num_heads, cfg.head_dim), np.nan, np.float32)
    with rt, _witnessed() as witness:
        call = _foreign_calls(cfg, witness, out)[name]
        with rt.step([seq], [2]) as step:
            step.attention(0, *qkv(cfg, 2))
            before = _step_state(rt, step)
            _refused(_in_another_thread(lambda: call(step)), name.split()[0])
            assert witness.ran == [], "the caller's conversion ran for a refused call"
            assert np.isnan(out).all(), "a refused attention wrote its output"
            assert _step_state(rt, step) == before
            step.attention(1, *qkv(cfg, 2))         # the owner carries on
        _same_as_twin(rt, kv_cache)


@pytest.mark.parametrize("name", FOREIGN_CALLS)
def test_a_step_being_opened_is_refused_to_other_threads_too(name):
    """Thread A is inside Step.__enter__ (its transaction begun, its plan being made) when
    thread B calls the step: B is refused as the thread that did not enter it (not told the
    step is "not open", and no __exit__ passes silently), and A's step opens and commits as if
    B had not called."""
    rt, seq = make_runtime()
    cfg = rt.config
    seen = {}
    out = np.full((2, cfg.num_heads, cfg.head_dim), np.nan, np.float32)
    witness = _witnessed()
    call = _foreign_calls(cfg, witness, out)[name]
    plan_in_transaction = rt._plan_in_transaction

    def paused(seqs, n_tokens):
        plan = plan_in_transaction(seqs, n_tokens)      # the transaction is open now
        step = rt._step
        seen["before"] = runtime_snapshot(rt), step._state
        seen["error"] = _in_another_thread(lambda: call(step))
        seen["after"] = runtime_snapshot(rt), step._state
        return plan

    rt._plan_in_transaction = paused
    with rt, witness:
        with rt.step([seq], [2]) as step:
            del rt._plan_in_transaction
            for layer in range(cfg.num_layers):
                step.attention(layer, *qkv(cfg, 2))
        _refused(seen["error"], name.split()[0])
        assert seen["after"] == seen["before"] and seen["before"][1] == "planned"
        assert witness.ran == [] and np.isnan(out).all()
        _same_as_twin(rt, "paged")


def test_a_steps_plan_reads_from_another_thread_and_a_second_enter_is_refused():
    """What a step plans (seqs, n_tokens, seq_offsets, positions, attended_layers) touches no
    arena, cache or sequence: any thread may read it and sees the owner's values. Entering
    the step again from another thread is refused ("only once") and changes nothing."""
    rt, seq = make_runtime()
    cfg = rt.config
    with rt:
        with rt.step([seq], [2]) as step:
            step.attention(0, *qkv(cfg, 2))
            before = _step_state(rt, step)

            def read():
                return (step.seqs, step.n_tokens, step.seq_offsets.tolist(),
                        step.positions.tolist(), step.attended_layers, repr(step))

            theirs = {}
            assert _in_another_thread(lambda: theirs.setdefault("plan", read())) is None
            assert theirs["plan"] == read() == ((seq,), (2,), [0, 2], [3, 4], [0], repr(step))
            error = _in_another_thread(step.__enter__)
            assert type(error) is RuntimeError and "entered only once" in str(error)
            assert _step_state(rt, step) == before
            step.attention(1, *qkv(cfg, 2))
        _same_as_twin(rt, "paged")


def test_a_step_that_failed_to_open_has_no_owner():
    """A step whose __enter__ failed (KVCacheFull) was never entered: to any thread it says it
    is not open (it has no owning thread to refuse others for)."""
    rt, seq = make_runtime()
    cfg = rt.config
    with rt:
        step = rt.step([seq], [cfg.max_tokens])          # more than the cache has room for
        with pytest.raises(KVCacheFull):
            step.__enter__()
        for call in (lambda: step.alloc((4,)), lambda: step.attention(0, *qkv(cfg, 1))):
            error = _in_another_thread(call)
            assert type(error) is RuntimeError and "the step is not open" in str(error), error
        assert _in_another_thread(lambda: step.__exit__(None, None, None)) is None
        assert not rt._step_lock.locked() and rt.seq_len(seq, 0) == 3
