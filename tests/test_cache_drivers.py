"""The KV cache drivers in C (tests/c/cache_check.c), natively on every x86 ISA and
cross-compiled for aarch64 under qemu-aarch64: the paged cache (float16 and float32) and the
two-tier cache with every cold format of the codec table, the attention scheduler over both and
the encoders behind them, driven through steps, decode, forks with copy-on-write, a rolled-back
step, truncation, eviction, and export / import (tests/c/cache_harness.py writes the scripts).

Each run is checked against float64 references computed here from the inputs (what a READ must
hold, attention over what the cache holds) and the two architectures against each other: on
AArch64 `char` is unsigned, and the NEON kernels meet the caches' layouts, which the kernel
table check (test_neon.py) never runs."""
import os
import struct

import numpy as np
import pytest

from ruvpy import _kernels

from _helpers import (CODES_EVALUATION_ORDER_BOUND, COLD_LEVELS, FP32_ATTENTION_BOUND, TURBO_BITS,
                      as_stored_fp16, attention_error, quantization_bound, reference_attention,
                      require_tool, turbo_mse)
from _helpers import kernel_harness as kh
from _helpers import cache_harness as ch

CONFIGS = [ch.Config("paged-f16"), ch.Config("paged-f32", dtype="f32"),
           ch.Config("q8", cold="q8"), ch.Config("q4", cold="q4", pool=False)]
CONFIGS += [ch.Config(f"turbo-{b}", cold="turbo", bits=b) for b in TURBO_BITS]
IDS = [c.name for c in CONFIGS]

# TurboQuant's cold tokens against their inputs, over the channels it codes in the rotated
# domain (the x20 ones are kept apart in 8 bits): relative value error against the Lloyd-Max
# MSE of its bits, key inner-product error against the paper's distortion bound (both from
# _helpers; test_twotier.py holds them over 2,048 tokens). Measured worst over the ~100 cold
# tokens of a run, every ISA and both architectures: 0.79 (values) and 0.75 (keys) of the
# bound; allowed: 1.1x (sampling noise over so few values).
TURBO_SAMPLE_SLACK = 1.1


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """cache_check natively and, where the tools exist, for aarch64 (cached like kernel_check)."""
    targets = [ch.cache_target(kh.native_target())]
    if kh.aarch64_target().available():
        targets.append(ch.cache_target(kh.aarch64_target()))
    return kh.build_targets(targets, tmp_path_factory.getbasetemp().parent / "ruvpy-kernel-check")


@pytest.fixture(scope="module")
def runs(builds, tmp_path_factory):
    """run(config, target name, isa) -> (script, Run), each run once per session."""
    workdir, done = tmp_path_factory.mktemp("cache_check"), {}

    def run(config, target_name, isa):
        key = (config.name, target_name, isa)
        if key not in done:
            if target_name not in builds:
                t = kh.aarch64_target()
                require_tool(t.cc, *t.run_prefix[:1])
            target, binary, _ = builds[target_name]
            script = ch.driver_script(config)
            done[key] = script, ch.run(target, binary, script, isa, workdir, config.name)
        return done[key]
    return run


# ---------------------------------------------------------------- one run against float64

def _stored(config, x):
    return x if config.paged and config.dtype == "f32" else as_stored_fp16(x)


def _check_read(config, run, read):
    """What a READ returned against the inputs the model fed: every token it kept, in order."""
    k, v = run.kv(read, config)
    lengths, cold_lengths = run.lengths(read.stats_op, config)
    n, cold = lengths[read.seq, read.layer], max(cold_lengths[read.seq, read.layer], 0)   # paged: -1
    where = f"op {read.op} (seq {read.seq}, layer {read.layer})"
    assert len(k) == n <= len(read.k), where
    if config.paged:
        assert n == len(read.k), f"{where}: the paged cache never drops tokens"
    # eviction drops a sequence's oldest tokens: it keeps the newest n of those fed in
    want_k, want_v = read.k[len(read.k) - n:], read.v[len(read.v) - n:]
    # the hot tail (all of a paged cache) holds exactly what was stored
    np.testing.assert_array_equal(k[cold:], _stored(config, want_k[cold:]), err_msg=where)
    np.testing.assert_array_equal(v[cold:], _stored(config, want_v[cold:]), err_msg=where)
    if cold == 0:
        return {}
    ck, cv, wk, wv = k[:cold], v[:cold], want_k[:cold], want_v[:cold]
    if config.cold in COLD_LEVELS:
        # keys per channel over a group's tokens (the bound over every token the sequence was
        # fed holds each group's range; outlier channels get 8 bits, within it); values per
        # token over its channels, or, in an outlier channel, in 8 bits over the channel
        levels = COLD_LEVELS[config.cold]
        assert np.all(np.abs(ck - wk) <= quantization_bound(read.k, levels, axis=0)), where
        value_bound = np.maximum(quantization_bound(wv, levels, axis=-1), quantization_bound(read.v, 255, axis=0))
        assert np.all(np.abs(cv - wv) <= value_bound), where
        return {}
    # TurboQuant (format v3) codes every channel with Lloyd-Max codebooks in a rotated domain:
    # relative errors of values and of key scores against what its code widths' MSE says
    q = np.random.default_rng(read.op).standard_normal((64, config.head_dim))
    value_rel = np.linalg.norm(cv - wv) / np.linalg.norm(wv)
    exact, estimate = (np.einsum("thd,qd->thq", x, q) for x in (wk, ck))
    key_rel = np.linalg.norm(estimate - exact) / np.linalg.norm(exact)
    ratios = {"value": value_rel / np.sqrt(turbo_mse(config.bits, config.head_dim, part="v")),
              "key": key_rel / np.sqrt(turbo_mse(config.bits, config.head_dim, part="k"))}
    assert max(ratios.values()) <= TURBO_SAMPLE_SLACK, f"{where}: error / bound {ratios}"
    return ratios


# q4 and TurboQuant score cold keys with int8 query weights (per 16-channel block, rounded to
# 1/254 of the block's largest; TurboQuant's value sums use 8-bit weights under VNNI), which
# float64 attention over the K/V the cache held does not: their outputs differ from it by
# that rounding, largest on these outlier-channel K/V. Measured worst here: q4 5.2e-3, turbo
# 6.5e-3 x max|v| (NEON against AVX-512 VNNI: turbo 1.5e-3); the exact references of those
# kernels are in test_twotier.py (q4_kernel_reference, turbo_format.kernel_reference).
INT8_QUERY_BOUND = 2e-2


def _attention_bound(config):
    if config.paged:
        return FP32_ATTENTION_BOUND
    return INT8_QUERY_BOUND if config.cold in ("q4", "turbo") else CODES_EVALUATION_ORDER_BOUND


def _check_attend(config, run, attend):
    """Attention against float64 attention over the K/V the cache held (its READ right after)."""
    k, v = run.kv(attend.read, config)
    out = run.outputs[attend.op, 0].reshape(attend.q.shape)
    ref = reference_attention(attend.q, k, v, causal=attend.causal)
    bound = _attention_bound(config)
    err = attention_error(out, ref, v)
    if os.environ.get("RUVPY_PRINT_ERRORS"):
        print(f"ATTN {config.name} {err:.3g}")
    assert err <= bound, f"op {attend.op}: attention error {err:.3g} * max|v| > {bound:.3g}"
    return err


def check_run(config, script, run):
    """Everything one run reported, against the float64 model; returns the worst errors."""
    assert run.problems() == ""
    worst = {"attention": 0.0}
    for read in script.reads:
        for name, ratio in _check_read(config, run, read).items():
            worst[name] = max(worst.get(name, 0.0), ratio)
    for attend in script.attends:
        worst["attention"] = max(worst["attention"], _check_attend(config, run, attend))
    for a, b in script.compare:         # rollback, export / import: the very same bytes
        fields = sorted(f for op, f in run.outputs if op == a)
        assert fields == sorted(f for op, f in run.outputs if op == b) != []
        for f in fields:
            np.testing.assert_array_equal(run.outputs[a, f], run.outputs[b, f], err_msg=f"ops {a} / {b}")
    if not config.paged:                # the budget holds in every layer, at every STATS
        for (op, f), counters in run.outputs.items():
            if f == 0 and struct.unpack_from("<I", script.ops[op], 4)[0] == ch.OP_STATS:
                assert np.all(counters[3:3 + config.layers] <= config.max_tokens), f"op {op}"
    return worst


@pytest.mark.parametrize("isa", kh.native_target().isas)
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_native_cache_drivers(runs, config, isa):
    """Every table built: the driver's checks where this CPU runs it, a refusal (exit 77)
    where it does not."""
    script, run = runs(config, "native", isa)
    runnable = isa in _kernels.available_isas()
    assert run.unsupported == (not runnable), f"{isa}: runs here {runnable}"
    if runnable:
        check_run(config, script, run)


@pytest.mark.parametrize("isa", ["scalar", "neon"])
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_aarch64_cache_drivers_under_qemu(runs, config, isa):
    script, run = runs(config, "aarch64", isa)
    assert not run.unsupported, f"{isa} must run on aarch64"
    check_run(config, script, run)


# ---------------------------------------------------------------- the architectures agree

def _integer_outputs(script, run):
    """Statuses, counters, lengths, blocks needed, export sizes and layouts: exact everywhere."""
    return {key: a for key, a in run.outputs.items() if a.dtype == np.int64}


def best_native_isa():
    """The widest kernel table this CPU runs (the build also holds tables it may not run:
    on a CPU without AVX-512 the last built one is unsupported and reports nothing)."""
    return _kernels.available_isas()[-1]


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_aarch64_agrees_with_x86(runs, config):
    """The same script gives the same bookkeeping on both architectures (every count, length
    and blob size), the same bytes from the same ISA-independent code (the encoders: the
    exported blobs of the scalar tables), and attention within the float32 bound of each
    other."""
    x86_scalar, arm_scalar = runs(config, "native", "scalar")[1], runs(config, "aarch64", "scalar")[1]
    script, arm_neon = runs(config, "aarch64", "neon")
    x86_best = runs(config, "native", best_native_isa())[1]
    for run in (x86_best, arm_scalar, arm_neon):
        got, want = _integer_outputs(script, run), _integer_outputs(script, x86_scalar)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"op {key[0]} field {key[1]}")
    for layer, op in script.exports.items():
        for f in range(5):
            if (op, f) in x86_scalar.outputs:
                np.testing.assert_array_equal(arm_scalar.outputs[op, f], x86_scalar.outputs[op, f],
                                              err_msg=f"export of layer {layer}, field {f}")
    bound = 2 * _attention_bound(config)
    for attend in script.attends:
        a, b = (r.outputs[attend.op, 0] for r in (arm_neon, x86_best))
        v = x86_best.kv(attend.read, config)[1]
        err = attention_error(a, b.astype(np.float64), v)
        if os.environ.get("RUVPY_PRINT_ERRORS"):
            print(f"XARCH {config.name} {err:.3g}")
        assert err <= bound, f"op {attend.op}"


@pytest.mark.parametrize("direction", ["x86 to aarch64", "aarch64 to x86"])
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_exports_move_between_architectures(runs, builds, config, direction, tmp_path):
    """A sequence exported on one architecture imports on the other and reads back the same."""
    source, dest = ("native", "aarch64") if direction == "x86 to aarch64" else ("aarch64", "native")
    script, exporter = runs(config, source, "scalar")
    runs(config, dest, "scalar")        # skips or fails the same way if a toolchain is missing
    exported = {layer: ch.export_arrays(exporter, script, layer) for layer in script.exports}
    imports, reads = ch.import_script(config, exported)
    target, binary, _ = builds[dest]
    isa = "neon" if dest == "aarch64" else best_native_isa()
    result = ch.run(target, binary, imports, isa, tmp_path, "import")
    assert result.problems() == ""
    for layer, read in zip(script.exports, reads):
        for f in (0, 1):
            np.testing.assert_array_equal(result.outputs[read, f], exporter.outputs[script.export_reads[layer], f])


def test_cache_check_compiles_without_warnings(builds):
    """Both architectures (a missing cross toolchain fails under RUVPY_REQUIRE_CROSS=1)."""
    if "aarch64" not in builds:
        t = kh.aarch64_target()
        require_tool(t.cc, *t.run_prefix[:1])
    assert {name: {src: text for src, text in diag.items() if text}
            for name, (_, _, diag) in builds.items()} == {name: {} for name in builds}
