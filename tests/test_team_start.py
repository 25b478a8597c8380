"""A parallel region whose OpenMP workers cannot be started raises MemoryError instead of
ending the process (csrc/rv_threads.h): libgomp exits ("libgomp: Thread creation failed")
when pthread_create of a worker fails, as it does under an address-space limit (RLIMIT_AS)
that leaves no room for the worker's stack. Each scenario runs in a fresh child process --
where no region has run yet, so libgomp has no workers -- that caps its address space a
little above what it uses, so the first 2-thread region finds no room for a worker stack,
then checks that the state is intact: the call under the cap on one thread, and with the cap
lifted on two, give the results a serial run gave before the cap."""
import os
import resource
import subprocess
import sys
import textwrap

import pytest

from ruvpy import _build_info

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ASan reserves terabytes of address space, so no RLIMIT_AS fits a sanitized process: the
# sanitized CI pass (tools/sanitize.sh) does not run this file, and under such a build it cannot
# run at all. A serial build (no OpenMP) runs it: there the calls need no workers and must
# simply work under the cap.
pytestmark = pytest.mark.skipif(bool(_build_info.BUILD_INFO.get("sanitize")),
                                reason="ASan's shadow memory fits no RLIMIT_AS cap")

MiB = 1 << 20
# room the cap leaves above the child's current size: plenty for the calls' own buffers, far
# less than one worker stack (STACKS)
MARGIN = 16 * MiB

PRELUDE = """
import os, resource, sys
import numpy as np
import ruvpy

SOFT, HARD = resource.getrlimit(resource.RLIMIT_AS)

def vsize():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")

def cap():
    resource.setrlimit(resource.RLIMIT_AS, (vsize() + MARGIN, HARD))

def uncap():
    resource.setrlimit(resource.RLIMIT_AS, (SOFT, HARD))

def refused(call):
    from ruvpy._build_info import BUILD_INFO
    if not BUILD_INFO["openmp"]:
        call()      # a serial build starts no workers: the call runs under the cap
        print("refused: nothing (serial build: no OpenMP workers)", flush=True)
        return
    try:
        call()
    except MemoryError as e:
        assert "OpenMP worker thread" in str(e) and "2-thread" in str(e), e
        print("refused:", e, flush=True)
        return
    raise AssertionError("the 2-thread call under the cap did not raise MemoryError")
"""

SCENARIOS = {
    # the functional attention (csrc/attention rv_attention, the calling thread's scratch)
    "attention": """
        H, KV, D, L = 32, 8, 128, 1024
        assert ruvpy._attention._threads_for(1, L, H, KV, D, np.float16, True, 2) == 2
        rng = np.random.default_rng(0)
        q = rng.standard_normal((1, H, D), dtype=np.float32)
        k = rng.standard_normal((L, KV, D)).astype(np.float16)
        v = rng.standard_normal((L, KV, D)).astype(np.float16)
        ref = ruvpy.attention(q, k, v, threads=1)
        cap()
        refused(lambda: ruvpy.attention(q, k, v, threads=2))
        np.testing.assert_allclose(ruvpy.attention(q, k, v, threads=1), ref, atol=1e-5)
        uncap()
        np.testing.assert_allclose(ruvpy.attention(q, k, v, threads=2), ref, atol=1e-5)
        cap()     # libgomp keeps the worker it now has: no new stack, no refusal
        np.testing.assert_allclose(ruvpy.attention(q, k, v, threads=2), ref, atol=1e-5)
    """,
    # a quantized-weight matmul (csrc/linear rv_linear_team: exactly 2 threads)
    "matmul": """
        from ruvpy._linear import QMatrix
        rng = np.random.default_rng(0)
        w = QMatrix(rng.standard_normal((256, 512), dtype=np.float32).tobytes(), "F32", 256, 512)
        x = rng.standard_normal((4, 512), dtype=np.float32)
        ref = w.matmul(x, threads=1)
        cap()
        refused(lambda: w.matmul(x, threads=2))
        np.testing.assert_array_equal(w.matmul(x, threads=1), ref)
        uncap()
        np.testing.assert_allclose(w.matmul(x, threads=2), ref, rtol=1e-6)
    """,
    # a Runtime step (the KV cache's AttentionPlan): the step rolls back, the runtime goes on
    "runtime-step": """
        from ruvpy import Runtime, RuntimeConfig
        shape = dict(num_layers=2, num_heads=32, num_kv_heads=8, head_dim=128, max_tokens=1024)
        n = 512
        assert ruvpy._attention._threads_for(n, n, 32, 8, 128, np.float16, True, 2) == 2
        rng = np.random.default_rng(0)
        q = rng.standard_normal((n, 32, 128), dtype=np.float32)
        k = rng.standard_normal((n, 8, 128), dtype=np.float32)
        v = rng.standard_normal((n, 8, 128), dtype=np.float32)

        def prefill(rt, seq):
            with rt.step([seq], [n]) as step:
                return [step.attention(layer, q, k, v).copy() for layer in range(2)]

        with Runtime(RuntimeConfig(**shape, threads=1)) as serial:
            ref = prefill(serial, serial.add_sequence())
        with Runtime(RuntimeConfig(**shape, threads=2)) as rt:
            seq = rt.add_sequence()
            cap()
            refused(lambda: prefill(rt, seq))
            assert rt.position(seq) == 0 and rt.seq_len(seq, 0) == 0 and rt.seq_len(seq, 1) == 0
            uncap()
            for got, want in zip(prefill(rt, seq), ref):
                np.testing.assert_allclose(got, want, atol=1e-5)
            assert rt.seq_len(seq, 1) == n
    """,
    # a cache's own append_attend, outside any step: the workers are checked before the
    # appends, so the refused call leaves the sequences as they were (paged and two-tier)
    "append_attend": """
        from ruvpy import PagedKVCache, TwoTierKVCache
        n = 512
        rng = np.random.default_rng(0)
        q = rng.standard_normal((n, 32, 128), dtype=np.float32)
        k = rng.standard_normal((n, 8, 128), dtype=np.float32)
        v = rng.standard_normal((n, 8, 128), dtype=np.float32)
        makers = (lambda: PagedKVCache(1, 8, 128, max_tokens=2048),
                  lambda: TwoTierKVCache(1, 8, 128, hot_tokens=64, cold="q4", max_tokens=2048))
        refs = []
        for make in makers:
            serial = make()
            refs.append(serial.append_attend(0, [serial.add_sequence()], [n], q, k, v, threads=1))
        caches = [make() for make in makers]
        seqs = [cache.add_sequence() for cache in caches]
        cap()
        for cache, s in zip(caches, seqs):
            refused(lambda: cache.append_attend(0, [s], [n], q, k, v, threads=2))
            assert cache.seq_len(s, 0) == 0, cache.seq_len(s, 0)
        uncap()
        for cache, s, ref in zip(caches, seqs, refs):
            np.testing.assert_allclose(cache.append_attend(0, [s], [n], q, k, v, threads=2), ref, atol=1e-5)
            assert cache.seq_len(s, 0) == n
    """,
    # the read-bandwidth probe of the benchmarks (its region has no other failure)
    "stream_read": """
        buf = bytes(range(256)) * 4096
        ref = ruvpy._attention._stream_read(buf, 1)
        cap()
        refused(lambda: ruvpy._attention._stream_read(buf, 2))
        uncap()
        assert ruvpy._attention._stream_read(buf, 2) == ref
    """,
}

# how the child's workers get their stack size: OMP_STACKSIZE (which libgomp reads), or the
# pthread default, which glibc takes from the stack limit the process started with
STACKS = {"OMP_STACKSIZE": ({"OMP_STACKSIZE": "64M"}, None),
          "default": ({}, 32 * MiB)}


def run_child(scenario, stack, margin=MARGIN):
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_STACKSIZE", "GOMP_STACKSIZE", "OMP_DYNAMIC", "OMP_THREAD_LIMIT")}
    extra, stack_limit = STACKS[stack]
    env.update(extra, OMP_NUM_THREADS="2")    # two threads on any machine

    def start():
        if stack_limit is not None:
            resource.setrlimit(resource.RLIMIT_STACK, (stack_limit, resource.getrlimit(resource.RLIMIT_STACK)[1]))

    body = SCENARIOS.get(scenario, scenario)
    code = f"MARGIN = {margin}\n" + PRELUDE + textwrap.dedent(body) + "\nprint('done')\n"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, preexec_fn=start,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("stack", sorted(STACKS))
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_workers_that_cannot_start_raise_memory_error(scenario, stack):
    proc = run_child(scenario, stack)
    report = f"exit status {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Thread creation failed" not in proc.stderr, report
    assert proc.returncode == 0, report
    assert "refused: " in proc.stdout and proc.stdout.rstrip().endswith("done"), report


# append_attend outside a step on one thread: no workers, but the scheduler's per-thread
# scratch (about 400 KB for this shape) must be had before the appends. It used to be taken
# after them, so its MemoryError left the 512 rows appended.
SCRATCH_SCENARIO = """
    import ctypes
    from ruvpy import PagedKVCache
    n = 512
    rng = np.random.default_rng(0)
    q = rng.standard_normal((n, 32, 128), dtype=np.float32)
    k = rng.standard_normal((n, 8, 128), dtype=np.float32)
    v = rng.standard_normal((n, 8, 128), dtype=np.float32)
    out = np.empty_like(q)
    make = lambda: PagedKVCache(1, 8, 128, max_tokens=2048)
    cache = make()
    seq = cache.add_sequence()
    shared, per_thread, team = cache.plan([seq], [n], num_heads=32, threads=1).scratch_needed
    assert team == 1
    # The scratch must need fresh address space, not free room in this thread's heap (glibc's
    # main arena) that the interpreter happened to leave: blocks of the plan's size are taken
    # from the heap until one has to extend it (without padding), so no free chunk and no top
    # of the heap is left that could serve the scratch's (larger) block.
    libc = ctypes.CDLL(None)
    libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p
    libc.sbrk.argtypes = [ctypes.c_ssize_t]
    M_TOP_PAD, M_MMAP_THRESHOLD = -2, -3
    assert libc.mallopt(M_TOP_PAD, 0) == 1 and libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1
    while True:
        end = libc.sbrk(0)
        assert libc.malloc(shared + per_thread)
        if libc.sbrk(0) != end:
            break
    # no attention has run on this thread: its scratch is still to be taken (a reference run
    # first, even on another Python thread, would leave room the cap cannot account for)
    cap()
    try:
        cache.append_attend(0, [seq], [n], q, k, v, out=out, threads=1)
        raise AssertionError("append_attend under the cap found room for its scratch")
    except MemoryError as e:
        assert str(e) == "attention: out of memory", e
        print("refused:", e, flush=True)
    assert cache.seq_len(seq, 0) == 0, cache.seq_len(seq, 0)
    uncap()
    got = cache.append_attend(0, [seq], [n], q, k, v, threads=1)
    serial = make()
    np.testing.assert_array_equal(got, serial.append_attend(0, [serial.add_sequence()], [n], q, k, v, threads=1))
    assert cache.seq_len(seq, 0) == n
"""


def test_a_scratch_that_cannot_grow_leaves_the_sequences_as_they_were():
    # a cap below the child's size: no new mapping at all, even after the interpreter frees
    # one of its arenas (1 MiB) between the cap and the scratch
    proc = run_child(SCRATCH_SCENARIO, "default", margin=-8 * MiB)
    report = f"exit status {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, report
    assert "refused: " in proc.stdout and proc.stdout.rstrip().endswith("done"), report
