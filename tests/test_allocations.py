"""Every byte a Runtime uses is memory it owns: measured with a counting allocator.

The test builds an LD_PRELOAD shim (gcc) that wraps malloc & co. of the whole process: it
counts the allocations of at least 4 KiB made while counting is on, remembers who made them
(the calling library, via dladdr) and tracks the live heap bytes (malloc_usable_size). A
subprocess preloaded with it then, per KV cache kind (paged fp16, two-tier q4, TurboQuant),
context (256 and 8192 tokens) and Runtime thread count (1 and 2):

- fills a sequence to the context through the Runtime's KV cache (cache.append per layer: a
  prefill's attention is not what is measured, and 8192 tokens of it took two of this file's
  two and a half minutes), runs warm-up decode steps (two
  migration batches and more: rings, tables and pools reach their steady size), then counts
  during 80 more decode steps (a two-tier cache migrates a cold group among them) made the
  way the issue measured them: step.attention(..., out=...) with preallocated inputs;
- compares RuntimeStats.total_bytes with the live heap bytes the process gained since just
  before the Runtime was made (plus the mappings of a paged pool of 4 MiB or more, which
  maps its own memory: ruvpy._kvcache._mapped_bytes, checked by tests/test_kvmem.py).

Process-wide counting is stricter than "in ruvpy code": an allocation of numpy or CPython in
the window counts too. Expected: zero, and total_bytes within 1% + 64 KiB of the live bytes
(what it may miss: the allocator's own rounding, a few Python objects of the Runtime)."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from _helpers import skip_under_sanitizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <malloc.h>
#include <stddef.h>
#include <string.h>

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void __libc_free(void *);
extern void *__libc_memalign(size_t, size_t);

#define BIG 4096
#define LOG 64
static int counting;
static long long big, live;
static size_t log_size[LOG];
static void *log_caller[LOG];

static void noted(void *p, size_t n, void *caller)
{
    if (!p)
        return;
    __atomic_add_fetch(&live, (long long)malloc_usable_size(p), __ATOMIC_RELAXED);
    if (__atomic_load_n(&counting, __ATOMIC_RELAXED) && n >= BIG) {
        long long i = __atomic_fetch_add(&big, 1, __ATOMIC_RELAXED);
        if (i < LOG) {
            log_size[i] = n;
            log_caller[i] = caller;
        }
    }
}

static void gone(void *p)
{
    if (p)
        __atomic_sub_fetch(&live, (long long)malloc_usable_size(p), __ATOMIC_RELAXED);
}

void *malloc(size_t n) { void *p = __libc_malloc(n); noted(p, n, __builtin_return_address(0)); return p; }
void *calloc(size_t a, size_t b) { void *p = __libc_calloc(a, b); noted(p, a * b, __builtin_return_address(0)); return p; }
void free(void *p) { gone(p); __libc_free(p); }
void *realloc(void *p, size_t n)
{
    size_t old = p ? malloc_usable_size(p) : 0;
    void *q = __libc_realloc(p, n);
    if (q || n == 0)
        __atomic_sub_fetch(&live, (long long)old, __ATOMIC_RELAXED);
    noted(q, n, __builtin_return_address(0));
    return q;
}
void *memalign(size_t a, size_t n) { void *p = __libc_memalign(a, n); noted(p, n, __builtin_return_address(0)); return p; }
void *aligned_alloc(size_t a, size_t n) { void *p = __libc_memalign(a, n); noted(p, n, __builtin_return_address(0)); return p; }
void *valloc(size_t n) { void *p = __libc_memalign(4096, n); noted(p, n, __builtin_return_address(0)); return p; }
int posix_memalign(void **out, size_t a, size_t n)
{
    void *p = __libc_memalign(a, n);
    if (!p)
        return ENOMEM;
    noted(p, n, __builtin_return_address(0));
    *out = p;
    return 0;
}

void rvcount_start(void) { big = 0; __atomic_store_n(&counting, 1, __ATOMIC_SEQ_CST); }
long long rvcount_stop(void) { __atomic_store_n(&counting, 0, __ATOMIC_SEQ_CST); return big; }
long long rvcount_live(void) { return __atomic_load_n(&live, __ATOMIC_SEQ_CST); }
size_t rvcount_size(int i) { return i < LOG ? log_size[i] : 0; }
const char *rvcount_where(int i)
{
    Dl_info info;
    if (i >= LOG || !dladdr(log_caller[i], &info) || !info.dli_fname)
        return "?";
    return info.dli_fname;
}
"""

# what both scripts start with: the shim's functions, and what a Runtime imports
PRELUDE = r"""
import ctypes, gc, json, sys
import numpy as np
import psutil  # the Runtime's stats import it: loaded before anything is counted

shim = ctypes.CDLL(sys.argv[1])
shim.rvcount_stop.restype = ctypes.c_longlong
shim.rvcount_live.restype = ctypes.c_longlong
shim.rvcount_size.restype = ctypes.c_size_t
shim.rvcount_where.restype = ctypes.c_char_p
"""

SCRIPT = PRELUDE + r"""

import ruvpy
from ruvpy import Runtime, RuntimeConfig
from ruvpy._kvcache import _mapped_bytes   # a paged pool of >= 4 MiB maps its own memory
from ruvpy.seqfile import write_sequence_file


def live_bytes():
    # the shim's live heap bytes plus the caches' own mappings (checked against
    # /proc/self/smaps by tests/test_kvmem.py)
    return shim.rvcount_live() + _mapped_bytes()

LAYERS, HEADS, KV_HEADS, D = 4, 16, 4, 128
KINDS = {"paged fp16": dict(kv_cache="paged"),
         "two-tier q4": dict(kv_cache="two-tier", cold="q4"),
         "turbo": dict(kv_cache="turbo")}
WARMUP, MEASURED, CHUNK = 144, 80, 1024
rng = np.random.default_rng(0)
# every input exists before anything is measured (the issue's setting: preallocated inputs)
q1 = rng.standard_normal((1, HEADS, D), dtype=np.float32)
k1 = rng.standard_normal((1, KV_HEADS, D), dtype=np.float32)
v1 = rng.standard_normal((1, KV_HEADS, D), dtype=np.float32)
out1 = np.empty_like(q1)
kf = rng.standard_normal((CHUNK, KV_HEADS, D), dtype=np.float32)
vf = rng.standard_normal((CHUNK, KV_HEADS, D), dtype=np.float32)
# OpenMP's team for this thread, the scheduler's own buffer: made before anything is counted
ruvpy.attention(q1, kf, vf, threads=2)


def decode(rt, seq, steps):
    for _ in range(steps):
        with rt.step([seq], [1]) as step:
            for layer in range(LAYERS):
                step.attention(layer, q1, k1, v1, out=out1)


def run(kind, context, threads, saved):
    # saved: where the filled context is saved (threads 1 fills and saves it, both load it:
    # filling 8192 tokens once per kind is enough)
    gc.collect()
    live_before = live_bytes()
    cfg = RuntimeConfig(num_layers=LAYERS, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=D,
                        max_tokens=context + WARMUP + MEASURED + 64, threads=threads,
                        arena_bytes=1 << 20, **KINDS[kind])
    rt = Runtime(cfg)
    if threads == 1:
        # the K/V go in through the cache; the file then carries the position steps would
        # have left (a Runtime's position is its own, not the cache's)
        filling = rt.add_sequence()
        for done in range(0, context, CHUNK):
            n = min(CHUNK, context - done)
            for layer in range(LAYERS):
                rt.cache.append(filling, layer, kf[:n], vf[:n])
        meta, arrays = rt.cache.export_sequence(filling)
        write_sequence_file(saved, {"format": "ruvpy-sequence", "config": cfg.storage_fields(),
                                    "position": context, "meta": meta}, arrays)
        del meta, arrays
        rt.remove_sequence(filling)
    seq = rt.load_sequence(saved)
    decode(rt, seq, WARMUP)
    shim.rvcount_start()
    decode(rt, seq, MEASURED)
    big = shim.rvcount_stop()
    where = [(shim.rvcount_size(i), shim.rvcount_where(i).decode()) for i in range(min(big, 64))]
    team = rt.cache.plan([seq], [1], num_heads=HEADS, threads=threads).team
    gc.collect()
    stats = rt.stats()
    live = live_bytes() - live_before
    result = {"kind": kind, "context": context, "threads": threads, "big_allocations": big,
              "per_step": big / MEASURED, "where": where, "total_bytes": stats.total_bytes,
              "live_bytes": live, "memory": stats.memory, "team": team}
    rt.close()
    return result


results = []
saved = sys.argv[2]
for kind in KINDS:
    for context in (256, 8192):
        results += [run(kind, context, 1, saved), run(kind, context, 2, saved)]
print(json.dumps(results))
"""


def _gcc():
    return shutil.which("gcc") or shutil.which("cc")


def _clean_env(**extra):
    """The environment of a child: without a sanitized run's preload and options (the shim
    must own malloc; gcc must not run under LeakSanitizer)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS", "PYTHONMALLOC")}
    env.update(extra)
    return env


def _shim(tmp):
    """The counting allocator built in `tmp`, or a skip where it cannot be built."""
    if sys.platform != "linux" or _gcc() is None:
        pytest.skip("the counting allocator is an LD_PRELOAD shim built with gcc on Linux")
    src, lib = tmp / "rvcount.c", tmp / "librvcount.so"
    src.write_text(SHIM)
    subprocess.run([_gcc(), "-O2", "-shared", "-fPIC", str(src), "-o", str(lib), "-ldl"], check=True,
                   env=_clean_env())
    return lib


def _skip_under_sanitizer():
    skip_under_sanitizer("the counting allocator must own malloc to count, and ASan must own it "
                         "to check: the sanitized ruvpy cannot load under the shim")


def _run_counted(lib, script, *args):
    """`script` in a subprocess preloaded with the shim; the JSON of its last line."""
    env = _clean_env(LD_PRELOAD=str(lib), PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script), str(lib), *map(str, args)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    _skip_under_sanitizer()
    tmp = tmp_path_factory.mktemp("alloc")
    return _run_counted(_shim(tmp), SCRIPT, tmp / "seq.ruvkv")


def test_the_shim_counts(tmp_path):
    """The shim sees an allocation of numpy's (a control: a test that cannot fail is none)."""
    lib = _shim(tmp_path)
    code = ("import ctypes, sys, numpy as np; shim = ctypes.CDLL(sys.argv[1]); "
            "shim.rvcount_stop.restype = ctypes.c_longlong; shim.rvcount_live.restype = ctypes.c_longlong; "
            "before = shim.rvcount_live(); shim.rvcount_start(); a = np.empty(1 << 20, np.uint8); "
            "n = shim.rvcount_stop(); print(n, shim.rvcount_live() - before)")
    proc = subprocess.run([sys.executable, "-c", code, str(lib)], env=_clean_env(LD_PRELOAD=str(lib)),
                          capture_output=True, text=True, check=True)
    count, grown = map(int, proc.stdout.split())
    assert count == 1 and grown >= 1 << 20


def test_a_decode_step_allocates_nothing_after_warm_up(measured):
    assert len(measured) == 12
    for r in measured:
        what = f"{r['kind']} at {r['context']} tokens on {r['threads']} thread(s)"
        assert r["big_allocations"] == 0, f"{what}: {r['where']}"
    # both thread counts really ran: at 8192 tokens the second runtime's attention is parallel
    assert {r["team"] for r in measured if r["context"] == 8192 and r["threads"] == 2} == {2}


def test_total_bytes_is_what_the_runtime_holds(measured):
    for r in measured:
        what = f"{r['kind']} at {r['context']} tokens on {r['threads']} thread(s): {r['memory']}"
        assert abs(r["total_bytes"] - r["live_bytes"]) <= 0.01 * r["total_bytes"] + 64 * 1024, \
            f"{what}: total_bytes {r['total_bytes']}, live {r['live_bytes']}"


# -- the reference model: weights in place, activations in the step arena ---------------------
MODEL_SCRIPT = PRELUDE + r"""

import ruvpy.models as models

PROMPT, WARMUP, MEASURED = 300, 140, 80
SETUPS = {"paged fp16": dict(kv_cache="paged"),
          "two-tier q4": dict(kv_cache="two-tier", cold="q4", hot_tokens=64, migration_batch=32)}
results = []
for name, options in SETUPS.items():
    for threads in (1, 2):
        model = models.load(max_tokens=1024, threads=threads, **options)
        seq = model.new_sequence()
        logits = model.forward_last(seq, list(range(1000, 1000 + PROMPT)))
        for _ in range(WARMUP):
            logits = model.forward_last(seq, [int(logits.argmax())])
        tokens = [[t] for t in range(2000, 2000 + MEASURED)]     # made before counting
        del logits
        gc.collect()
        live_before = shim.rvcount_live()
        shim.rvcount_start()
        for ids in tokens:
            logits = model.forward_last(seq, ids)
            del logits
        big = shim.rvcount_stop()
        gc.collect()
        live_after = shim.rvcount_live()
        where = [(shim.rvcount_size(i), shim.rvcount_where(i).decode()) for i in range(min(big, 64))]
        stats = model.runtime.stats()
        results.append({"setup": name, "threads": threads, "steps": MEASURED, "big_allocations": big,
                        "where": where, "live_growth": live_after - live_before,
                        "vocab": model.config.vocab_size, "arena_fallbacks": stats.arena_fallbacks,
                        "cold_tokens": stats.kv["tiers"].get("cold", {}).get("tokens", 0)})
        model.close()
        model.weights.close()
        del model, seq
        gc.collect()
print(json.dumps(results))
"""


@pytest.mark.requires_model
def test_a_model_decode_step_allocates_only_its_logits(tmp_path):
    """SmolLM2 decode through ruvpy.models after warm-up (both KV kinds, 1 and 2 threads): the
    only heap allocation of 4 KiB or more in a step is the float32 logits it returns (numpy's,
    vocab x 4 bytes); every activation and the matmuls' work memory come from the step arena,
    the weights from the mapped file. The heap does not grow over 80 steps."""
    _skip_under_sanitizer()
    results = _run_counted(_shim(tmp_path), MODEL_SCRIPT)
    assert len(results) == 4
    for r in results:
        what = f"{r['setup']} on {r['threads']} thread(s): {r['where']}"
        logits_bytes = 4 * r["vocab"]
        assert r["big_allocations"] == r["steps"], what
        assert all(size == logits_bytes and "_multiarray_umath" in lib for size, lib in r["where"]), what
        assert abs(r["live_growth"]) < 16 * 1024, what
        assert r["arena_fallbacks"] == 0
    assert all(r["cold_tokens"] > 0 for r in results if r["setup"] == "two-tier q4")
