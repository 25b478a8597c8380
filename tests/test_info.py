"""ruvpy.info(), ISA selection (set_isa / RUVPY_ISA) and the thread count.

The ISAs offered are checked against /proc/cpuinfo, and on x86-64 the import itself is run on
emulated CPUs without AVX2 (qemu-x86_64 -cpu Nehalem): the proof that ruvpy works there."""
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ruvpy
from ruvpy import _kernels as K

from _helpers import require_tool, skip_under_sanitizer

ROOT = Path(__file__).resolve().parents[1]
MACHINE = platform.machine().lower()
IS_X86_64 = MACHINE in ("x86_64", "amd64")
KNOWN_ISAS = ["scalar", "avx2", "avx512", "neon", "avx512vnni"]


def run_python(code, isa_env=None, prefix=()):
    """Runs code in a fresh interpreter (optionally under an emulator) with RUVPY_ISA set to
    isa_env (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "RUVPY_ISA"}
    if isa_env is not None:
        env["RUVPY_ISA"] = isa_env
    return subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def cpu_flags():
    """The CPU's feature flags as Linux reports them (an independent view of cpuid)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("needs /proc/cpuinfo")
    m = re.search(r"^(?:flags|Features)\s*:(.*)$", text, re.M)
    return set(m.group(1).split())


@pytest.fixture
def restore_threads():
    before = K.get_num_threads()
    yield
    K.set_num_threads(before)


# ---- info() ----

def test_info_reports_version_isa_openmp_threads_and_build():
    info = ruvpy.info()
    assert {"version", "isa", "isa_available", "openmp", "threads", "build"} <= info.keys()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert info["version"] == ruvpy.__version__ == re.search(r'^version = "(.+)"', pyproject, re.M).group(1)
    assert info["isa"] == ruvpy.get_isa() and info["isa"] in info["isa_available"]
    assert "scalar" in info["isa_available"]
    assert set(info["isa_available"]) <= set(info["isa_built"]) <= set(KNOWN_ISAS)
    assert isinstance(info["openmp"], bool) and info["openmp"] == info["build"]["openmp"]
    assert isinstance(info["threads"], int) and 1 <= info["threads"] <= max(info["max_threads"], 1)
    if not info["openmp"]:
        assert info["threads"] == 1
    build = info["build"]
    assert build["isas"] == info["isa_built"]
    flags = build["cflags"] + [f for isa_flags in build["isa_flags"].values() for f in isa_flags]
    assert all(isinstance(f, str) for f in flags)
    assert not any(f.startswith(("-march=native", "-mtune=native", "-mcpu=native")) for f in flags), \
        "a build must run on any CPU of its architecture"
    info["isa_available"].append("bogus")          # a fresh dict: callers cannot corrupt state
    assert "bogus" not in ruvpy.info()["isa_available"]


def test_available_isas_match_the_cpu():
    flags = cpu_flags()
    built = K.built_isas()
    if IS_X86_64:
        avx2 = {"avx2", "fma", "f16c"} <= flags
        avx512 = avx2 and {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags
        vnni = avx512 and "avx512_vnni" in flags
        expected = ["scalar"] + ["avx2"] * avx2 + ["avx512"] * avx512 + ["avx512vnni"] * vnni
    elif MACHINE in ("aarch64", "arm64"):
        expected = ["scalar"] + ["neon"] * ("asimd" in flags)
    else:
        expected = ["scalar"]
    assert K.available_isas() == [isa for isa in expected if isa in built]


def test_import_picks_the_best_available_isa():
    proc = run_python("import ruvpy, ruvpy._kernels as K; print(ruvpy.get_isa(), K.best_isa(), K.available_isas()[-1])")
    assert proc.returncode == 0, proc.stderr
    isa, best, last = proc.stdout.split()
    assert isa == best == last


# ---- set_isa / get_isa ----

def test_set_isa_round_trip(isa):
    # the fixture switched with set_isa; switch away and back
    assert ruvpy.get_isa() == isa == ruvpy.info()["isa"]
    ruvpy.set_isa("scalar")
    assert ruvpy.get_isa() == "scalar"
    ruvpy.set_isa(isa)
    assert ruvpy.get_isa() == isa == ruvpy.info()["isa"]
    a = np.arange(37, dtype=np.float32)
    assert K.dot(a, a) == float(np.dot(a.astype(np.int64), a.astype(np.int64)))


def test_set_isa_rejects_bad_names_and_keeps_the_active_isa():
    before = ruvpy.get_isa()
    with pytest.raises(ValueError, match=r"unknown ISA 'sse9'.*scalar"):
        ruvpy.set_isa("sse9")
    for bad in (None, 2, b"scalar"):
        with pytest.raises(TypeError):
            ruvpy.set_isa(bad)
    missing = [isa for isa in KNOWN_ISAS if isa not in ruvpy.available_isas()]
    assert missing, "some ISA is always missing (neon on x86, avx2 on ARM)"
    for isa in missing:
        with pytest.raises(RuntimeError, match=isa):
            ruvpy.set_isa(isa)
    assert ruvpy.get_isa() == before


def test_set_isa_takes_the_whole_name_and_only_the_str_itself():
    """The name as its characters say: C compares up to a NUL, so "scalar\\0junk" used to
    select scalar; a str subclass's encode() used to pick the table (another one than the
    name's), its __repr__ was asked for the error message; a lone surrogate raised a codec
    error. All are unknown names now, and the active ISA stays."""
    before = ruvpy.get_isa()
    other = "scalar" if before != "scalar" else ruvpy.available_isas()[-1]

    class Encodes(str):
        def encode(self, *args, **kwargs):
            return other.encode()

    class BadRepr(str):
        def __repr__(self):
            raise RuntimeError("__repr__ asked")

    for bad in (other + "\0junk", other + "\0", Encodes("bogus"), BadRepr("bogus"), "\ud800",
                other + "\u0131"):
        with pytest.raises(ValueError, match="unknown ISA"):
            ruvpy.set_isa(bad)
        assert ruvpy.get_isa() == before, repr(str.__str__(bad))
    with pytest.raises(RuntimeError, match="not compiled|not supported"):    # not its __repr__
        ruvpy.set_isa(BadRepr("neon" if IS_X86_64 else "avx2"))
    ruvpy.set_isa(Encodes(other))          # a subclass with the right characters is that name
    assert ruvpy.get_isa() == other
    ruvpy.set_isa(before)


# ---- RUVPY_ISA ----

@pytest.mark.parametrize("value", ["scalar", " Scalar "])
def test_ruvpy_isa_scalar_forces_the_scalar_kernels(value):
    proc = run_python("import ruvpy; print(ruvpy.get_isa(), ruvpy.info()['isa'])", isa_env=value)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["scalar", "scalar"]


def test_ruvpy_isa_empty_means_best():
    proc = run_python("import ruvpy; print(ruvpy.get_isa(), ruvpy.available_isas()[-1])", isa_env="")
    assert proc.returncode == 0, proc.stderr
    isa, best = proc.stdout.split()
    assert isa == best


@pytest.mark.parametrize("value", ["bogus", "neon" if IS_X86_64 else "avx2"])
def test_ruvpy_isa_unusable_value_fails_the_import_clearly(value):
    proc = run_python("import ruvpy", isa_env=value)
    assert proc.returncode != 0
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith("RuntimeError: RUVPY_ISA=") and repr(value) in last_line
    for isa in K.available_isas():                    # it says what would work
        assert isa in last_line


# ---- a CPU without AVX2 (emulated) ----

def _emulated(code, cpu, isa_env=None):
    if not IS_X86_64:
        pytest.skip("x86-64 CPU models")
    skip_under_sanitizer("ASan cannot run under user-mode qemu (its shadow memory does not map "
                         "there) and the sanitized ruvpy does not load without it (test_neon.py "
                         "runs the uninstrumented kernel tables on these emulated CPUs)")
    require_tool("qemu-x86_64", install="Debian: qemu-user")
    return run_python(code, isa_env, prefix=["qemu-x86_64", "-cpu", cpu])


def test_import_and_kernels_on_a_cpu_without_avx():
    """Nehalem: SSE4.2, no AVX. Importing must not execute an AVX instruction anywhere."""
    code = """if True:
        import numpy as np, ruvpy, ruvpy._kernels as K
        print(ruvpy.get_isa(), ",".join(ruvpy.available_isas()))
        x = np.arange(1, 40, dtype=np.float32)
        assert K.dot(x, x) == float((x.astype(np.int64) ** 2).sum())
        h = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
        assert np.array_equal(K.f16_to_f32(h).view(np.uint32), h.astype(np.float32).view(np.uint32))
        try:
            ruvpy.set_isa("avx2")
        except RuntimeError as e:
            print("refused:", e)
    """
    proc = _emulated(code, "Nehalem")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "scalar scalar"
    assert lines[1].startswith("refused:") and "not supported by this CPU" in lines[1]


def test_ruvpy_isa_asking_for_avx2_on_a_cpu_without_it():
    proc = _emulated("import ruvpy", "Nehalem", isa_env="avx2")
    assert proc.returncode != 0
    last_line = proc.stderr.strip().splitlines()[-1]
    assert "RUVPY_ISA='avx2'" in last_line and "not supported by this CPU" in last_line and "scalar" in last_line


# ---- threads ----

def test_set_num_threads(restore_threads):
    info = ruvpy.info()
    ruvpy.set_num_threads(None)
    all_threads = ruvpy.get_num_threads()
    assert all_threads == (max(info["max_threads"], 1) if info["openmp"] else 1)
    ruvpy.set_num_threads(1)
    assert ruvpy.get_num_threads() == 1 == ruvpy.info()["threads"]
    ruvpy.set_num_threads(np.int64(1))
    assert ruvpy.get_num_threads() == 1
    ruvpy.set_num_threads(0)
    assert ruvpy.get_num_threads() == all_threads
    ruvpy.set_num_threads(10**12)                  # more than there are: capped, not an error
    assert ruvpy.get_num_threads() == all_threads


@pytest.mark.parametrize("bad,error", [(-1, ValueError), (np.int32(-4), ValueError), (1.5, TypeError),
                                       ("2", TypeError), (True, TypeError), ([1], TypeError)])
def test_set_num_threads_bad_input(restore_threads, bad, error):
    ruvpy.set_num_threads(1)
    with pytest.raises(error):
        ruvpy.set_num_threads(bad)
    assert ruvpy.get_num_threads() == 1


# ---- libgomp's wait policy ----

def _import_with_env(extra, drop=("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")):
    """Imports ruvpy in a fresh interpreter with OMP_DISPLAY_ENV=verbose (libgomp prints the
    settings it read at load to stderr, the spin count among them); returns (info's
    openmp_waiting, "OMP_WAIT_POLICY GOMP_SPINCOUNT" as the script's environment has them after
    the import, libgomp's stderr)."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra, OMP_DISPLAY_ENV="verbose")
    code = ("import os, ruvpy; print(ruvpy.info()['openmp_waiting']); "
            "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    waiting, after = r.stdout.splitlines()[-2:]
    return waiting, after, r.stderr


@pytest.mark.skipif(not K.openmp_enabled(), reason="built without OpenMP: there is no libgomp to configure")
def test_libgomp_spins_briefly_unless_the_user_chose():
    waiting, after, gomp = _import_with_env({})
    assert waiting == "GOMP_SPINCOUNT=3000 (ruvpy's default)"
    assert "GOMP_SPINCOUNT = '3000'" in gomp            # libgomp really read it
    assert after == "None None"                         # and child processes do not inherit it
    waiting, after, gomp = _import_with_env({"OMP_WAIT_POLICY": "active"})
    assert waiting == "OMP_WAIT_POLICY=active (from the environment)"
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in gomp and after == "active None"
    waiting, after, gomp = _import_with_env({"GOMP_SPINCOUNT": "1000"})
    assert waiting == "GOMP_SPINCOUNT=1000 (from the environment)" and after == "None 1000"
    assert "GOMP_SPINCOUNT = '1000'" in gomp


@pytest.mark.skipif(not K.openmp_enabled(), reason="built without OpenMP: there is no libgomp to configure")
def test_libgomp_loaded_before_ruvpy_keeps_its_settings():
    """Another extension may have loaded libgomp first: it read its environment then, so ruvpy
    must neither claim its spin count applies nor leave GOMP_SPINCOUNT behind."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = ("import ctypes, os; ctypes.CDLL('libgomp.so.1', mode=ctypes.RTLD_GLOBAL); import ruvpy; "
            "print(ruvpy.info()['openmp_waiting']); print(os.environ.get('GOMP_SPINCOUNT'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-2:] == ["libgomp was loaded before ruvpy: its own settings apply", "None"]
