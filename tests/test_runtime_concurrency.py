"""Python threads and Runtimes.

- Eight Python threads, each driving its own Runtime at the same time, compute bit for bit
  what each Runtime computes alone (and that is float64 attention over what was fed, within
  the float32 bound). The speed-up over running them one after another, which shows the GIL
  is released in the kernels, is measured by tools/bench_runtime_threads.py (no timings in
  tests).
- One Runtime shared by two threads: every call either does its work or raises the Runtime's
  clear RuntimeError (another step is open, or being opened: never the KV cache's own refusal);
  nothing is corrupted -- each thread's attention equals float64 attention over exactly the
  K/V it fed -- and nothing deadlocks.
"""
import threading
import time

import numpy as np
import pytest

from ruvpy import Runtime, RuntimeConfig, _kernels

from _helpers import FP32_ATTENTION_BOUND, as_stored_fp16, attention_error, reference_attention

SHAPE = dict(num_layers=2, num_heads=8, num_kv_heads=2, head_dim=64)
PREFILL, DECODE, WORKERS = 192, 12, 8
JOIN_SECONDS = 300       # a deadlock guard, not a timing: the whole test takes seconds


def drive(kv_cache, seed, start=None):
    """A Runtime (one kernel thread, so results are deterministic) fed PREFILL tokens, then
    DECODE single-token steps; returns (outputs of every step and layer, K/V fed, qs)."""
    rng = np.random.default_rng(seed)
    extra = {} if kv_cache == "paged" else dict(hot_tokens=64)    # most of it cold (q4)
    cfg = RuntimeConfig(**SHAPE, max_tokens=PREFILL + DECODE + 8, threads=1, kv_cache=kv_cache,
                        **extra)
    H, KVH, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    outputs, fed = [], {layer: ([], []) for layer in range(cfg.num_layers)}
    with Runtime(cfg) as rt:
        seq = rt.add_sequence()
        if start is not None:
            start.wait()
        for n in [PREFILL] + [1] * DECODE:
            with rt.step([seq], [n]) as step:
                for layer in range(cfg.num_layers):
                    q = rng.standard_normal((n, H, D), dtype=np.float32)
                    k = rng.standard_normal((n, KVH, D), dtype=np.float32)
                    v = rng.standard_normal((n, KVH, D), dtype=np.float32)
                    fed[layer][0].append(k)
                    fed[layer][1].append(v)
                    outputs.append((q, step.attention(layer, q, k, v).copy()))
    return outputs, fed


@pytest.mark.parametrize("kv_cache", ["paged", "two-tier"])
def test_eight_runtimes_in_eight_threads_compute_what_each_computes_alone(kv_cache):
    alone = [drive(kv_cache, seed) for seed in range(WORKERS)]
    results, errors = [None] * WORKERS, []
    start = threading.Barrier(WORKERS)

    def worker(i):
        try:
            results[i] = drive(kv_cache, i, start)
        except BaseException as exc:     # pragma: no cover - reported below
            errors.append(exc)
            start.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_SECONDS)
    assert not any(t.is_alive() for t in threads), "a worker thread hangs"
    assert not errors, errors[0]
    for i in range(WORKERS):
        assert len(results[i][0]) == len(alone[i][0])
        for (q_a, out_a), (q_b, out_b) in zip(alone[i][0], results[i][0]):
            np.testing.assert_array_equal(q_a, q_b)
            np.testing.assert_array_equal(out_a, out_b)
    if kv_cache == "paged":      # and what each computes is right: the last step, every layer
        outputs, fed = results[0]
        for layer in range(SHAPE["num_layers"]):
            q, out = outputs[-SHAPE["num_layers"] + layer]
            k = as_stored_fp16(np.concatenate(fed[layer][0]))
            v = as_stored_fp16(np.concatenate(fed[layer][1]))
            assert attention_error(out, reference_attention(q, k, v), v) <= FP32_ATTENTION_BOUND


def test_one_runtime_shared_by_two_threads_is_serialized_or_refused_never_corrupted():
    """Two threads hammer one Runtime: each steps its own sequences (checking every output
    against float64 attention over the K/V it fed them), adds, forks, removes, exports and
    reads stats. Refusals must be the documented ones; both threads finish; afterwards every
    sequence holds exactly what was fed to it."""
    cfg = RuntimeConfig(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, max_tokens=4096,
                        kv_cache="paged", threads=1)
    H, KVH, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    rt = Runtime(cfg)
    refused = {"step": 0}
    start = threading.Barrier(2)
    done = {"steps": 0}
    fed = {}                       # seq -> per layer [k rows], [v rows] (float32 as fed)
    errors = []
    lock = threading.Lock()        # guards the test's own bookkeeping only

    def retry(fn):
        """fn() until it is not refused because the other thread's step is open."""
        while True:
            try:
                return fn()
            except RuntimeError as exc:
                # the Runtime's "a step is open", also while the other thread's step is being
                # opened (its transaction begun): never the cache's "a transaction is open"
                assert "step" in str(exc) and "transaction" not in str(exc), exc
                with lock:
                    refused["step"] += 1
                time.sleep(0.0002)

    def worker(seed):
        rng = np.random.default_rng(seed)
        mine = []
        try:
            start.wait()
            for i in range(60):
                action = rng.integers(0, 10) if mine else 0
                if action == 0 or (action == 1 and len(mine) > 3):
                    seq = retry(rt.add_sequence)
                    with lock:
                        fed[seq] = [([], []) for _ in range(cfg.num_layers)]
                    mine.append(seq)
                elif action == 1:
                    parent = mine[rng.integers(len(mine))]
                    child = retry(lambda: rt.fork_sequence(parent))
                    with lock:
                        fed[child] = [(list(k), list(v)) for k, v in fed[parent]]
                    mine.append(child)
                elif action == 2 and len(mine) > 1:
                    seq = mine.pop(rng.integers(len(mine)))
                    retry(lambda: rt.remove_sequence(seq))
                    with lock:
                        del fed[seq]
                elif action == 3:
                    retry(lambda: rt.export_sequence(mine[0]))
                    retry(rt.stats)
                else:
                    seqs = list(rng.choice(mine, size=min(len(mine), 2), replace=False))
                    counts = [int(rng.integers(1, 9)) for _ in seqs]
                    total = sum(counts)
                    try:
                        step = rt.step(seqs, counts)
                        step.__enter__()
                    except RuntimeError as exc:
                        assert "step" in str(exc) and "transaction" not in str(exc), exc
                        with lock:
                            refused["step"] += 1
                        continue
                    try:
                        for layer in range(cfg.num_layers):
                            q = rng.standard_normal((total, H, D), dtype=np.float32)
                            k = rng.standard_normal((total, KVH, D), dtype=np.float32)
                            v = rng.standard_normal((total, KVH, D), dtype=np.float32)
                            out = step.attention(layer, q, k, v)
                            row = 0
                            for seq, n in zip(seqs, counts):
                                fed[seq][layer][0].append(k[row:row + n])
                                fed[seq][layer][1].append(v[row:row + n])
                                kk = as_stored_fp16(np.concatenate(fed[seq][layer][0]))
                                vv = as_stored_fp16(np.concatenate(fed[seq][layer][1]))
                                ref = reference_attention(q[row:row + n], kk, vv)
                                err = attention_error(out[row:row + n], ref, vv)
                                assert err <= FP32_ATTENTION_BOUND, (seq, layer, err)
                                row += n
                    finally:
                        step.__exit__(None, None, None)
                    with lock:
                        done["steps"] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in (1, 2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(JOIN_SECONDS)
        assert not any(t.is_alive() for t in threads), "deadlock: a thread never finished"
        assert not errors, repr(errors[0])
        assert done["steps"] > 10
        assert refused["step"] > 0       # the threads did collide
        # nothing corrupted: every live sequence holds exactly what its thread fed it
        assert sorted(rt.sequences) == sorted(fed)
        for seq, layers in fed.items():
            for layer, (ks, vs) in enumerate(layers):
                k, v = rt.get_kv(seq, layer)
                want_k = as_stored_fp16(np.concatenate(ks)) if ks else np.zeros((0, KVH, D))
                want_v = as_stored_fp16(np.concatenate(vs)) if vs else np.zeros((0, KVH, D))
                np.testing.assert_array_equal(k, want_k.reshape(k.shape))
                np.testing.assert_array_equal(v, want_v.reshape(v.shape))
    finally:
        rt.close()


@pytest.mark.parametrize("action", ["add", "fork", "remove", "truncate", "import", "export"])
def test_a_step_being_opened_refuses_other_threads_with_the_runtimes_error(action):
    """Between Step.__enter__ taking the step slot and the step being open (its KV transaction
    begun, its plan made), another thread's add/fork/remove/truncate/import/export gets the
    Runtime's refusal -- not the KV cache's "transaction is open", and not a change made
    under the opening step's feet. Deterministic: the opening thread is paused inside
    _open_step, right after its transaction began, while the other thread calls."""
    cfg = RuntimeConfig(num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, max_tokens=256,
                        kv_cache="paged", threads=1)
    with Runtime(cfg) as rt:
        seq, other = rt.add_sequence(), rt.add_sequence()
        with rt.step([other], [3]) as step:
            step.attention(0, *(np.ones((3, h, 8), np.float32) for h in (2, 1, 1)))
        blob = rt.export_sequence(other)
        calls = {"add": rt.add_sequence, "fork": lambda: rt.fork_sequence(other),
                 "remove": lambda: rt.remove_sequence(other),
                 "truncate": lambda: rt.truncate_sequence(other, 1),
                 "import": lambda: rt.import_sequence(blob),
                 "export": lambda: rt.export_sequence(other)}
        outcome = {}

        def other_thread():
            try:
                outcome["result"] = calls[action]()
            except BaseException as exc:
                outcome["error"] = exc

        plan_in_transaction = rt._plan_in_transaction

        def paused(seqs, n_tokens):
            plan = plan_in_transaction(seqs, n_tokens)      # the transaction is open now
            t = threading.Thread(target=other_thread)
            t.start()
            t.join(JOIN_SECONDS)
            assert not t.is_alive(), "the other thread blocked on the opening step"
            return plan

        rt._plan_in_transaction = paused
        before = (rt.sequences, rt.position(other), rt.seq_len(other))
        with rt.step([seq], [2]) as step:
            step.attention(0, *(np.ones((2, h, 8), np.float32) for h in (2, 1, 1)))
        del rt._plan_in_transaction
        error = outcome.get("error")
        assert isinstance(error, RuntimeError), outcome
        assert "while a step" in str(error) and "transaction" not in str(error), error
        assert (rt.sequences, rt.position(other), rt.seq_len(other)) == before
        assert rt.position(seq) == 2
        # and once the step is over, the call goes through
        calls[action]()


# ----------------------------------------------------------------------------------------
# close() from another thread while a step is in flight
# ----------------------------------------------------------------------------------------

def _qkv(n, cfg, value=1.0):
    return tuple(np.full((n, h, cfg.head_dim), value, np.float32)
                 for h in (cfg.num_heads, cfg.num_kv_heads, cfg.num_kv_heads))


def _fed_runtime(cfg, n):
    """A Runtime of cfg with one sequence that holds n tokens (one full step)."""
    rt = Runtime(cfg)
    seq = rt.add_sequence()
    with rt.step([seq], [n]) as step:
        for layer in range(cfg.num_layers):
            step.attention(layer, *_qkv(n, cfg))
    return rt, seq


def _close_in_another_thread(rt):
    """rt.close() run (to its end) in a new thread that has its own kernel thread count set
    (close() must not touch it); returns (error or None, that thread's count after)."""
    outcome = {}

    def closer():
        _kernels._swap_thread_count(3)
        try:
            rt.close()
        except BaseException as exc:       # reported below
            outcome["error"] = exc
        outcome["threads"] = _kernels._swap_thread_count(0)

    t = threading.Thread(target=closer)
    t.start()
    t.join(JOIN_SECONDS)
    assert not t.is_alive(), "close() blocked on the other thread's step"
    return outcome.get("error"), outcome["threads"]


CLOSE_CFG = dict(num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, max_tokens=256,
                 kv_cache="paged", threads=1)


@pytest.mark.parametrize("kv_cache", ["paged", "two-tier"])
def test_close_from_another_thread_while_a_step_is_being_opened(kv_cache):
    """Thread A is paused inside Step.__enter__ (its transaction begun, its plan made) while
    thread B closes the runtime. B's close() finishes without waiting for A's step, does not
    release the step slot A holds, and leaves its own thread count alone; A's `with` then
    raises a RuntimeError saying the runtime was closed by another thread (not the cache's
    "closed", not "release unlocked lock"), and A gives its step slot back itself."""
    cfg = RuntimeConfig(**{**CLOSE_CFG, "kv_cache": kv_cache})
    rt, seq = _fed_runtime(cfg, 3)
    seen = {}
    plan_in_transaction = rt._plan_in_transaction

    def paused(seqs, n_tokens):
        plan = plan_in_transaction(seqs, n_tokens)
        seen["close"] = _close_in_another_thread(rt)
        seen["slot held"] = rt._step_lock.locked()
        return plan

    rt._plan_in_transaction = paused
    with pytest.raises(RuntimeError, match="closed by another thread while this step was being opened"):
        with rt.step([seq], [2]):
            pytest.fail("the step opened on a closed runtime")
    error, threads = seen["close"]
    assert error is None, repr(error)
    assert threads == 3, "close() changed the closing thread's kernel thread count"
    assert seen["slot held"], "close() released the step slot the opening thread held"
    assert rt.closed and not rt._step_lock.locked()
    with pytest.raises(RuntimeError, match="is closed"):
        rt.step([seq], [1])


@pytest.mark.parametrize("then", ["attend", "end the block", "raise"])
def test_close_from_another_thread_while_a_step_is_open(then):
    """Thread A's step is open (layer 0 attended) when thread B closes the runtime: B does not
    release A's step slot or change its own thread count; A's next step call raises a clear
    RuntimeError, and a block that ends normally raises it too (the step must not look
    committed); a block that raises keeps its own exception. A restores its own thread count
    and gives the slot back; the runtime is closed for both."""
    cfg = RuntimeConfig(**CLOSE_CFG)
    rt = Runtime(cfg)
    seq = rt.add_sequence()
    before = _kernels._swap_thread_count(5)       # the stepping thread's own count
    try:
        with pytest.raises(RuntimeError) as info:
            with rt.step([seq], [2]) as step:
                out = step.attention(0, *_qkv(2, cfg, 0.5))
                np.testing.assert_array_equal(out, np.full_like(out, 0.5))
                error, threads = _close_in_another_thread(rt)
                assert error is None, repr(error)
                assert threads == 3, "close() changed the closing thread's kernel thread count"
                assert rt._step_lock.locked(), "close() released the step slot of this thread"
                if then == "attend":
                    step.attention(1, *_qkv(2, cfg))
                elif then == "raise":
                    raise RuntimeError("the application's own error")
        if then == "raise":
            assert str(info.value) == "the application's own error"
        else:
            assert "closed by another thread while this step was open" in str(info.value)
        assert _kernels._swap_thread_count(0) == 5, "the step did not restore its thread count"
    finally:
        _kernels._swap_thread_count(before)
    assert rt.closed and not rt._step_lock.locked()
    with pytest.raises(RuntimeError, match="is closed"):
        step.alloc((4,))


def test_close_inside_its_own_step_still_ends_it():
    """The step's own thread closing the runtime inside the step ends the step there (the
    slot is free at once, the thread count restored); the block's end is then silent."""
    cfg = RuntimeConfig(**CLOSE_CFG)
    rt = Runtime(cfg)
    seq = rt.add_sequence()
    before = _kernels._swap_thread_count(5)
    try:
        with rt.step([seq], [2]) as step:
            step.attention(0, *_qkv(2, cfg))
            rt.close()
            assert not rt._step_lock.locked()
            assert _kernels._swap_thread_count(5) == 5
        with pytest.raises(RuntimeError, match="is closed"):
            step.attention(1, *_qkv(2, cfg))
    finally:
        _kernels._swap_thread_count(before)


@pytest.mark.parametrize("reader", ["seq_len", "get_kv", "memory_bytes", "stats"])
def test_close_from_another_thread_waits_for_a_read_of_the_runtimes_memory(reader):
    """A read of the runtime's memory (seq_len, get_kv, memory_bytes, stats) that has passed its
    "is it open" check when another thread calls close(): the close waits for the read, which
    returns what was there (it used to read a freed cache: AttributeError on None, and stats()
    made a new arena for the closed runtime), and then closes everything."""
    cfg = RuntimeConfig(**CLOSE_CFG)
    rt = Runtime(cfg)
    seq = rt.add_sequence()
    with rt.step([seq], [3]) as step:
        for layer in range(cfg.num_layers):
            step.attention(layer, *_qkv(3, cfg, 0.25))
    check_open = rt._check_open
    closer = threading.Thread(target=rt.close)

    def check_then_let_close_run():
        check_open()
        if not closer.is_alive() and not rt.closed:
            closer.start()
            closer.join(0.3)         # the whole close, unless it waits for this read

    rt._check_open = check_then_let_close_run
    calls = {"seq_len": lambda: rt.seq_len(seq, 1), "get_kv": lambda: rt.get_kv(seq, 1),
             "memory_bytes": rt.memory_bytes, "stats": rt.stats}
    result = calls[reader]()
    closer.join(JOIN_SECONDS)
    assert not closer.is_alive() and rt.closed
    if reader == "seq_len":
        assert result == 3
    elif reader == "get_kv":
        k, v = result
        np.testing.assert_array_equal(k, np.full((3, 1, cfg.head_dim), 0.25, np.float32))
        np.testing.assert_array_equal(v, k)
    elif reader == "memory_bytes":
        assert result["kv"] > 0 and result["arena"] == cfg.arena_bytes
    else:
        assert result.total_bytes == sum(result.memory.values()) > 0
    assert rt._arena.closed, "the read left a live arena behind on the closed runtime"


@pytest.mark.parametrize("making", ["_live_arena", "_ensure_scratch"])
def test_a_close_while_a_step_makes_its_arena_or_scratch_leaves_none_behind(making):
    """close() from another thread just as a step opening makes the arena (a closed one is
    replaced) or grows the scratch (a large prefill): they were made outside the state lock,
    so a close() that ran first left a new arena or scratch on the closed runtime (2-6 of 300
    random races). Now they are made under it on an open runtime: the close waits, frees
    them, and the step is abandoned with the runtime's RuntimeError."""
    cfg = RuntimeConfig(**{**CLOSE_CFG, "max_tokens": 2048, "threads": 2})
    rt = Runtime(cfg)
    seq = rt.add_sequence()
    real = getattr(rt, making)
    closer = threading.Thread(target=rt.close)

    def close_first(*args):
        if not closer.is_alive() and not rt.closed:
            closer.start()
            closer.join(0.5)        # the whole close, unless it waits for this call
        return real(*args)

    def finish_close():             # where the opening holds no lock: the close goes first
        closer.join(JOIN_SECONDS)

    setattr(rt, making, close_first)
    if making == "_live_arena":
        plan_in_transaction = rt._plan_in_transaction
        rt._plan_in_transaction = lambda *args: (finish_close(), plan_in_transaction(*args))[1]
    with pytest.raises(RuntimeError, match="closed"):
        with rt.step([seq], [1500]) as step:      # (more than the scratch made for decode)
            finish_close()
            for layer in range(cfg.num_layers):
                step.attention(layer, *_qkv(1500, cfg))
    assert rt.closed and rt._arena.closed and rt._scratch is None


def test_another_threads_reads_of_a_stepped_sequence_are_refused():
    """While a step covers a sequence, its K/V are the step's (a rollback takes them back) and
    a layer not yet attended is shorter than one that was: another thread's seq_len / get_kv
    of it used to return exactly that. They are refused now, as export is; the stepping
    thread still reads them, other sequences and stats() are read as before."""
    cfg = RuntimeConfig(**CLOSE_CFG)
    rt = Runtime(cfg)
    a, b = rt.add_sequence(), rt.add_sequence()
    with rt.step([b], [2]) as step:
        for layer in range(cfg.num_layers):
            step.attention(layer, *_qkv(2, cfg))
    seen = {}

    def other_thread():
        for name, read in (("seq_len", lambda s: rt.seq_len(s, 0)), ("get_kv", lambda s: rt.get_kv(s, 0))):
            try:
                seen[name, "a"] = read(a)
            except RuntimeError as exc:
                seen[name, "a"] = str(exc)
            seen[name, "b"] = read(b)
        seen["stats"] = rt.stats().kv["tokens"]

    with pytest.raises(ValueError, match="the model failed"):
        with rt.step([a], [5]) as step:
            step.attention(0, *_qkv(5, cfg))        # layer 0 attended, layer 1 not
            assert rt.seq_len(a, 0) == 5 and rt.seq_len(a, 1) == 0    # its own thread: as they are
            t = threading.Thread(target=other_thread)
            t.start()
            t.join(JOIN_SECONDS)
            raise ValueError("the model failed")    # rolled back: those 5 tokens never were
    assert "cannot read the length of sequence" in seen["seq_len", "a"]
    assert "cannot read the K/V of sequence" in seen["get_kv", "a"]
    assert seen["seq_len", "b"] == 2 and seen["get_kv", "b"][0].shape[0] == 2
    assert seen["stats"] >= 2
    assert rt.seq_len(a, 0) == rt.seq_len(a, 1) == 0
    rt.close()


def _held_in_a_generator(rt, seq, cfg):
    with rt.step([seq], [1]) as step:
        step.attention(0, *_qkv(1, cfg))
        yield "half-way"
        step.attention(1, *_qkv(1, cfg))


@pytest.mark.parametrize("dropped", [True, False])
def test_a_step_whose_thread_ended_does_not_wedge_the_runtime(dropped):
    """A step entered by a generator running in a worker thread that ends with the generator
    suspended inside it: dropped in the main thread, the generator's GeneratorExit ran
    Step.__exit__ there, which refused to end another thread's step, so the step stayed open
    and every later step or sequence change was refused until close(). Now a step whose own
    thread has ended is rolled back by whichever thread ends it (dropped), or by the next
    step from any thread (kept: nothing can use it, it could only resume in that thread)."""
    cfg = RuntimeConfig(**CLOSE_CFG)
    rt, seq = _fed_runtime(cfg, 2)
    box = {}

    def worker():
        box["gen"] = gen = _held_in_a_generator(rt, seq, cfg)
        next(gen)

    t = threading.Thread(target=worker)
    t.start()
    t.join(JOIN_SECONDS)
    gen = box.pop("gen")
    if dropped:
        del gen                                     # GeneratorExit -> Step.__exit__ here
        assert rt._step is None
    with rt.step([seq], [3]) as step:               # (kept: the orphan rolled back first)
        for layer in range(cfg.num_layers):
            step.attention(layer, *_qkv(3, cfg))
    assert rt.position(seq) == 5 and [rt.seq_len(seq, layer) for layer in range(2)] == [5, 5]
    rt.add_sequence()
    rt.close()
