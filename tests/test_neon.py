"""C-level tests of every ISA's kernel table (tests/c/kernel_check.c) against one set of float64
numpy reference vectors: the x86 tables natively, the NEON table cross-compiled with
aarch64-linux-gnu-gcc and run under qemu-aarch64, and the dispatcher on emulated x86 CPUs that
lack AVX-512 or AVX2 (qemu-x86_64). Every kernel of rv_ops is exercised, the attention building
block included; inputs and outputs sit against guard pages, so reading or writing past the end
of an array crashes the check instead of passing unnoticed."""
import platform

import pytest

from ruvpy import _kernels

from _helpers import kernel_harness as kh
from _helpers import require_tool

IS_X86_64 = platform.machine().lower() in ("x86_64", "amd64")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """(case file, case names in order), written once for every target."""
    path = tmp_path_factory.mktemp("kernel_cases") / "cases.bin"
    return path, kh.write_cases(path)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """kernel_check for this machine and, where the tools exist, for aarch64; cached across
    test sessions in pytest's temporary directory (keyed by a hash of sources and flags)."""
    targets = [kh.native_target()] + [t for t in [kh.aarch64_target()] if t.available()]
    return kh.build_targets(targets, tmp_path_factory.getbasetemp().parent / "ruvpy-kernel-check")


@pytest.fixture(scope="module")
def native(builds):
    return builds["native"]


@pytest.fixture(scope="module")
def aarch64(builds):
    if "aarch64" not in builds:
        require_tool(kh.aarch64_target().cc, *kh.aarch64_target().run_prefix[:1])
    return builds["aarch64"]


def _check(build, cases, isa, prefix=None):
    target, binary, _ = build
    path, names = cases
    result = target.run(binary, path, isa, prefix)
    if not result.unsupported:
        problems = result.problems(names)
        assert not problems, f"{target.name} {isa} kernel table:\n{problems}"
        assert result.table == isa
    return result


@pytest.mark.parametrize("isa", kh.native_target().isas)
def test_native_kernel_table(native, cases, isa):
    """Every table built: checked where this CPU runs it, and refused (exit 77, naming the
    best table here) where it does not."""
    result = _check(native, cases, isa)
    runnable = isa in _kernels.available_isas()
    assert result.unsupported == (not runnable), f"{isa}: runs here {runnable}, the check said {result.stdout[:200]!r}"
    if not runnable:
        assert result.best == _kernels.available_isas()[-1]


@pytest.mark.parametrize("isa", ["scalar", "neon"])
def test_aarch64_kernel_table_under_qemu(aarch64, cases, isa):
    result = _check(aarch64, cases, isa)
    assert not result.unsupported, f"{isa} must run on aarch64"
    assert result.lanes == (4 if isa == "neon" else 1)
    assert result.best == "neon", "the aarch64 dispatcher must prefer NEON"


def test_every_rv_ops_kernel_is_checked(native, cases):
    """A kernel appended to rv_ops needs a runner in kernel_check.c and cases in
    kernel_harness.py (see the comments there); the check of the table fails until it has."""
    target, binary, _ = native
    fields = kh.rv_ops_fields()
    runners = kh.runner_names(binary, target)
    case_kernels = {name.split()[0] for name in cases[1]}
    assert [f for f in fields if f not in runners] == [], "rv_ops kernels without a runner in tests/c/kernel_check.c"
    assert [f for f in fields if f not in case_kernels] == [], "rv_ops kernels without cases in tests/c/kernel_harness.py"
    result = target.run(binary, cases[0], "scalar")
    assert result.slots == len(fields), "rv_ops.h parsed differently from the compiled struct"
    assert result.untested_slots == []


def test_kernel_sources_compile_without_warnings(native):
    _, _, diagnostics = native
    assert {src: text for src, text in diagnostics.items() if text} == {}


def test_neon_sources_compile_without_warnings(aarch64):
    _, _, diagnostics = aarch64
    assert {src: text for src, text in diagnostics.items() if text} == {}


# qemu's x86 CPU models: Nehalem has SSE4.2 but no AVX; Haswell has AVX2 + FMA + F16C but no
# AVX-512. The dispatcher must offer exactly what the CPU has and choose the best of it.
EMULATED_CPUS = [("Nehalem", ["scalar"]), ("Haswell-v4", ["scalar", "avx2"])]


@pytest.fixture(scope="module")
def emulable(builds, tmp_path_factory):
    """The native build that runs under qemu-x86_64: under a sanitized ruvpy build, one without
    the sanitizers (AddressSanitizer cannot map its shadow memory under user-mode qemu)."""
    if not builds["native"][0].sanitize:
        return builds["native"]
    return kh.build_targets([kh.native_target(sanitize=False)],
                            tmp_path_factory.getbasetemp().parent / "ruvpy-kernel-check")["native"]


@pytest.mark.skipif(not IS_X86_64, reason="x86-64 CPU models")
@pytest.mark.parametrize("cpu,runs", EMULATED_CPUS)
def test_x86_dispatch_on_older_cpus(emulable, cases, cpu, runs):
    require_tool("qemu-x86_64", install="Debian: qemu-user")
    built = emulable[0].isas       # RUVPY_BUILD_ISAS may leave tables out of a build
    best = [isa for isa in runs if isa in built][-1]
    for isa in built:
        result = _check(emulable, cases, isa, prefix=["qemu-x86_64", "-cpu", cpu])
        assert result.unsupported == (isa not in runs), f"{isa} on {cpu}"
        assert result.best == best
