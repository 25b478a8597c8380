"""Build ruvpy's extensions.

Layout of the C sources (ruvpy/csrc; `pip install -e .` builds the extensions next to the
sources, so `python -m ruvpy` typed in the checkout imports a working package):
  kernels/ops_<isa>.c   one translation unit per ISA, compiled with that ISA's flags only
                        (baseline, AVX2+FMA+F16C, AVX-512, AVX-512+VNNI on x86-64; NEON on
                        aarch64).
                        They all go into ruvpy._kernels, whose dispatcher picks one at import.
  kernels/*.c           the dispatcher and other baseline code of ruvpy._kernels.
  <name>/*.c            ISA-independent drivers (threading, tiling, bookkeeping) of the
                        extension ruvpy._<name>; they call kernels through the ops table.

Environment knobs:
  RUVPY_NO_OPENMP=1     build without OpenMP (serial kernels).
  RUVPY_BUILD_ONLY=a,b  build only these extensions (e.g. "_attention"), for quick rebuilds.
  RUVPY_DEBUG=1         -O0 -g, for debugging.
  RUVPY_SANITIZE=address,undefined
                        build with these -fsanitize= checkers (any gcc list), -O1 -g, frame
                        pointers, -fno-wrapv (so UBSan sees signed overflow, which Python's
                        default -fwrapv would make defined) and recovery after a report, so
                        one run lists every finding. Python itself is not instrumented: run
                        it with the sanitizer runtimes preloaded (tools/sanitize.sh does).
"""
import concurrent.futures
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from glob import glob

import numpy
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
PKG = "ruvpy"
CSRC = os.path.join(PKG, "csrc")
MACHINE = platform.machine().lower()
IS_X86_64 = MACHINE in ("x86_64", "amd64")
IS_AARCH64 = MACHINE in ("aarch64", "arm64")

# Per-ISA flags only, never a host-specific -march: a build must run on any CPU of its architecture.
ISA_FLAGS = {
    "scalar": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma", "-mf16c", "-mavx2"],
    # the avx512 table again plus the int8 dot product (VPDPBUSD) of the quantized matmuls
    "avx512vnni": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni", "-mfma",
                   "-mf16c", "-mavx2"],
    "neon": [],
}
if IS_X86_64:
    BUILD_ISAS = ["scalar", "avx2", "avx512", "avx512vnni"]
elif IS_AARCH64:
    BUILD_ISAS = ["scalar", "neon"]
else:
    BUILD_ISAS = ["scalar"]
# RUVPY_BUILD_ISAS=scalar,avx512 builds only those kernel tables (scalar always): the sanitized
# CI pass compiles two tables instead of four, since each one under ASan + UBSan takes minutes
_only_isas = {s.strip() for s in os.environ.get("RUVPY_BUILD_ISAS", "").split(",") if s.strip()}
if _only_isas:
    BUILD_ISAS = [isa for isa in BUILD_ISAS if isa == "scalar" or isa in _only_isas]

DEBUG = os.environ.get("RUVPY_DEBUG") == "1"
SANITIZE = ",".join(s.strip() for s in os.environ.get("RUVPY_SANITIZE", "").split(",") if s.strip())
if SANITIZE:
    BASE_CFLAGS = ["-O1", "-g", "-fno-omit-frame-pointer", "-fno-wrapv",
                   "-fsanitize=" + SANITIZE, "-fsanitize-recover=all"]
    SANITIZE_LDFLAGS = ["-fsanitize=" + SANITIZE]
else:
    BASE_CFLAGS = ["-O0", "-g"] if DEBUG else ["-O3"]
    SANITIZE_LDFLAGS = []
BASE_CFLAGS += ["-std=c11", "-fno-math-errno", "-fno-trapping-math", "-Wall", "-Wno-unused-function"]


def isa_of(source):
    """The ISA a kernel translation unit is built for, from its name (ops_avx2.c -> avx2)."""
    stem = os.path.splitext(os.path.basename(source))[0]
    for isa in ISA_FLAGS:
        if stem.endswith("_" + isa):
            return isa
    return None


def probe_openmp():
    if os.environ.get("RUVPY_NO_OPENMP") == "1":
        return []
    cc = sysconfig.get_config_var("CC") or "cc"
    cc = cc.split()[0]
    code = "#include <omp.h>\nint main(void){int n=0;\n#pragma omp parallel reduction(+:n)\nn+=1;\nreturn n>0?0:1;}\n"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(code)
        try:
            subprocess.run([cc, "-fopenmp", src, "-o", os.path.join(tmp, "probe")],
                           check=True, capture_output=True)
            return ["-fopenmp"]
        except (OSError, subprocess.CalledProcessError):
            warnings.warn("ruvpy: the C compiler has no OpenMP; building serial kernels")
            return []


OPENMP_FLAGS = probe_openmp()


# C directories an extension links besides its own: the KV caches run the one attention
# scheduler (csrc/attention) and take cold groups from the buffer pool (csrc/memory).
LINKED_DIRS = {"_kvcache": ["attention", "memory"]}


def extension_sources(name):
    """Sources of ruvpy.<name>: its .pyx plus the C of csrc/<name without '_'>/ (and of
    LINKED_DIRS[name])."""
    sources = [os.path.join(PKG, name + ".pyx")]
    for directory in [name.lstrip("_")] + LINKED_DIRS.get(name, []):
        for c in sorted(glob(os.path.join(CSRC, directory, "*.c"))):
            isa = isa_of(c)
            if isa is None or isa in BUILD_ISAS:
                sources.append(c)
    return sources


def make_extensions():
    only = {s.strip() for s in os.environ.get("RUVPY_BUILD_ONLY", "").split(",") if s.strip()}
    exts = []
    for pyx in sorted(glob(os.path.join(PKG, "_*.pyx"))):
        name = os.path.splitext(os.path.basename(pyx))[0]
        if only and name not in only:
            continue
        exts.append(Extension(
            "ruvpy." + name,
            sources=extension_sources(name),
            # headers are the kernel templates: a change in any of them must rebuild
            depends=sorted(glob(os.path.join(CSRC, "**", "*.h"), recursive=True)),
            include_dirs=[CSRC, numpy.get_include()],
            define_macros=[("RUVPY_BUILD_ISAS", '"' + ",".join(BUILD_ISAS) + '"'),
                           ("RUVPY_HAVE_OPENMP", "1" if OPENMP_FLAGS else "0")] +
                          [("RUVPY_BUILD_" + isa.upper(), "1") for isa in BUILD_ISAS],
            extra_compile_args=BASE_CFLAGS + OPENMP_FLAGS,
            extra_link_args=OPENMP_FLAGS + SANITIZE_LDFLAGS + ["-lm"],
        ))
    from Cython.Build import cythonize
    return cythonize(exts, language_level=3, include_path=["."], nthreads=os.cpu_count() or 1, compiler_directives={
        "boundscheck": False, "wraparound": False, "cdivision": True,
        "initializedcheck": False, "embedsignature": True,
    })


class BuildExt(build_ext):
    """Adds each ISA translation unit's own flags (the rest of the extension stays baseline),
    and compiles an extension's sources on every CPU (`-j N` / `--parallel N` sets the number):
    setuptools compiles them one after another, and `pip install -e .` spent minutes on the
    kernel tables alone."""

    def build_extensions(self):
        compiler = self.compiler
        compile_one = compiler._compile

        def _compile(obj, src, ext, cc_args, extra_postargs, pp_opts):
            isa = isa_of(src)
            extra = list(extra_postargs) + (ISA_FLAGS[isa] if isa else [])
            return compile_one(obj, src, ext, cc_args, extra, pp_opts)

        jobs = self.parallel if isinstance(self.parallel, int) and self.parallel > 0 else (os.cpu_count() or 1)

        def compile_sources(sources, output_dir=None, macros=None, include_dirs=None, debug=0,
                            extra_preargs=None, extra_postargs=None, depends=None):
            # CCompiler.compile's steps, its objects compiled concurrently (each one a compiler
            # process); only the out-of-date ones (`build`), as there
            macros, objects, extra_postargs, pp_opts, build = compiler._setup_compile(
                output_dir, macros, include_dirs, sources, depends, extra_postargs)
            cc_args = compiler._get_cc_args(pp_opts, debug, extra_preargs)
            todo = [(obj, *build[obj]) for obj in objects if obj in build]
            with concurrent.futures.ThreadPoolExecutor(max(1, min(jobs, len(todo)))) as pool:
                for done in [pool.submit(_compile, obj, src, ext, cc_args, extra_postargs, pp_opts)
                             for obj, src, ext in todo]:
                    done.result()
            return objects

        compiler._compile = _compile
        compiler.compile = compile_sources
        # extensions one after another: their sources already use every CPU
        self.parallel = None
        super().build_extensions()


BUILD_INFO = {"isas": BUILD_ISAS, "openmp": bool(OPENMP_FLAGS), "cflags": BASE_CFLAGS,
              "sanitize": SANITIZE or None,
              "isa_flags": {k: ISA_FLAGS[k] for k in BUILD_ISAS}, "machine": MACHINE}
with open(os.path.join(HERE, PKG, "_build_info.py"), "w") as f:
    f.write("# Written by setup.py; describes how this copy of ruvpy was built.\n")
    f.write("BUILD_INFO = %r\n" % (BUILD_INFO,))

setup(ext_modules=make_extensions(), cmdclass={"build_ext": BuildExt})
