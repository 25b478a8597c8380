"""ruvpy.distributed on a local Ray: decode throughput with 1 and 2 workers, migration time
against sequence size per KV format, recovery time against checkpoint_every.

    python tools/bench_distributed.py [--sequences 8] [--new-tokens 24] [--sizes 256 1024 4096]
                                      [--checkpoints 16 64 256] [--json out.json]

1. Throughput: `--sequences` generations of `--new-tokens` greedy tokens each, all submitted
   at once (Cluster.generate_many: one driver thread per sequence, placed by free KV), as
   aggregate generated tokens per second of wall time. Side by side in one run: the same
   generations one after another on an in-process model (no Ray) with 1 kernel thread,
   1 worker with 1 thread, 1 worker with 2 threads, 2 workers with 1 thread each, and 2
   workers checkpointing every 8 tokens (the snapshot cost on a short sequence). Against
   the machine: weights_GB_s is tok/s x the weight bytes a decode step reads, x_bandwidth
   that over the memory read bandwidth measured in the same run.
2. Migration: for each KV format (paged fp16, two-tier q8, two-tier q4, turbo; the default
   256-token hot tier), one sequence grown to each size (real SmolLM2 K/V), migrated back and
   forth `--moves` times: bytes moved (the snapshot, header and checksum included), bytes per
   token, that against fp16, median time and MB/s.
3. Recovery: for each checkpoint_every, a sequence with a 512-token prompt decoded until
   checkpoint_every - 1 tokens are recorded after its last snapshot (the worst case); then
   the actor holding it is killed (Ray restarts it, as in production, while the other worker
   restores the sequence) and the next forward is timed. Both replay modes: "exact" (the
   recorded chunks: bit-identical) and "prefill" (one chunk: faster), with the largest logit
   difference of the next step against an exact copy made before the kill.

What 2 cores can show: one worker runs one model step at a time on one core, so 2 workers
use both cores; the driver, Ray's raylet and the object store share the same 2 cores, and the
workers share one memory bus (each decode step reads the model's weights). Scaling to many
machines is not measured here (see the README's "Scaling out").
"""
import argparse
import inspect
import os
import statistics
import sys
import time

import numpy as np

from _bench_common import emit_json, machine_info, print_table, read_bandwidth, settle

import ray  # noqa: E402  (after _bench_common puts the checkout on sys.path)

import ruvpy.models  # noqa: E402
from ruvpy.distributed import Cluster  # noqa: E402

TEXT = ("The history of the city begins with a small settlement on the river, where traders "
        "met to exchange salt, grain and cloth. Over the centuries the market grew into a "
        "town, the town into a city, and the city into the capital of a kingdom whose kings "
        "built bridges, cathedrals and a university that still teaches law and medicine. ")
PROMPTS = ["Once upon a time", "The best way to learn a language is", "Water boils at",
           "The capital of France is", "In 1969, the first", "A good recipe for bread",
           "The three laws of motion", "My favourite season is"]
FORMATS = {"paged fp16": dict(kv_cache="paged"),
           "two-tier q8": dict(kv_cache="two-tier", cold="q8"),
           "two-tier q4": dict(kv_cache="two-tier", cold="q4"),
           "turbo 3.5": dict(kv_cache="turbo")}


def progress(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def thread_options(threads):
    """Runtime threads, and numpy's BLAS threads where the model has that option."""
    options = {"threads": threads}
    if "blas_threads" in inspect.signature(ruvpy.models.load).parameters:
        options["blas_threads"] = threads
    return options


# ----------------------------------------------------------------------------------------
# 1. throughput
# ----------------------------------------------------------------------------------------

def weight_bytes_per_step(model):
    """Bytes of weights one decode step reads: every matrix in its GGUF format, the
    embedding once (a step gathers one row of it, but a tied LM head reads all of it; an
    untied model's embedding rows are left out)."""
    weights = model.weights
    return weights.nbytes - (0 if weights.tied else weights.embedding.nbytes)


def bench_throughput(args):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.sequences)]
    rows = []

    def row(name, workers, threads, seconds, generated, **extra):
        rows.append({"setup": name, "workers": workers, "threads": threads,
                     "sequences": len(prompts), "tokens": generated,
                     "seconds": seconds, "tok_s": generated / seconds, **extra})
        progress(f"  {name}: {generated / seconds:.1f} tok/s")

    progress(f"throughput: {len(prompts)} sequences x {args.new_tokens} tokens")
    model = ruvpy.models.load(max_tokens=4096, **thread_options(1))
    model.generate(prompts[0], 4)
    step_bytes = weight_bytes_per_step(model)
    settle()
    bandwidth = read_bandwidth(threads=2) * 1e9
    progress(f"  weights read per decode step {step_bytes / 1e6:.0f} MB; memory read bandwidth "
             f"{bandwidth / 1e9:.1f} GB/s: at most {bandwidth / step_bytes:.1f} steps/s "
             f"on this machine, however many workers")
    times, generated = [], 0
    for _ in range(args.repeats):
        settle()
        start = time.perf_counter()
        generated = 0
        for p in prompts:
            model.generate(p, args.new_tokens)
            generated += model.last_generation.generated_tokens
        times.append(time.perf_counter() - start)
    row("in-process model, sequential (no Ray)", 0, 1, statistics.median(times), generated)
    model.close()
    del model

    setups = [("1 worker", 1, 1, 64), ("1 worker, 2 threads", 1, 2, 64),
              ("2 workers", 2, 1, 64), ("2 workers, checkpoint every 8", 2, 1, 8)]
    for name, workers, threads, every in setups:
        progress(f"  starting {name}")
        with Cluster(workers, max_tokens=4096, checkpoint_every=every,
                     **thread_options(threads)) as cluster:
            cluster.generate_many(prompts[:workers], 4)          # warm-up
            times = []
            for _ in range(args.repeats):
                settle()
                before = cluster.counters["generated_tokens"]
                start = time.perf_counter()
                cluster.generate_many(prompts, args.new_tokens)
                times.append(time.perf_counter() - start)
                generated = cluster.counters["generated_tokens"] - before
            row(name, workers, threads, statistics.median(times), generated,
                checkpoint_every=every)
    base = rows[0]["tok_s"]
    one = rows[1]["tok_s"]
    for r in rows:
        r["x_in_process"] = r["tok_s"] / base
        r["x_1_worker"] = r["tok_s"] / one
        # each sequence's decode step reads every weight once (a worker steps one sequence
        # at a time): aggregate tok/s is bounded by the memory bus the workers share
        r["weights_GB_s"] = r["tok_s"] * step_bytes / 1e9
        r["x_bandwidth"] = r["tok_s"] * step_bytes / bandwidth
    return rows, {"weight_bytes_per_step": step_bytes, "read_bandwidth_GB_s": bandwidth / 1e9}


# ----------------------------------------------------------------------------------------
# 2. migration
# ----------------------------------------------------------------------------------------

def bench_migration(args, ids):
    rows = []
    for name, options in FORMATS.items():
        if args.formats and name not in args.formats:
            continue
        progress(f"migration: {name}")
        with Cluster(2, max_tokens=max(args.sizes) + 64, checkpoint_every=None,
                     **options) as cluster:
            seq = cluster.new_sequence()
            for size in sorted(args.sizes):
                while cluster.position(seq) < size:
                    begin = cluster.position(seq)
                    cluster.forward(seq, ids[begin:min(size, begin + 512)])
                moves = []
                for _ in range(args.moves):
                    settle(0.05)
                    moves.append(cluster.migrate(seq, 1 - cluster.worker_of(seq)))
                seconds = statistics.median(m["seconds"] for m in moves)
                nbytes = moves[0]["bytes"]
                rows.append({"format": name, "tokens": size, "bytes": nbytes,
                             "bytes_per_token": nbytes / size, "ms": seconds * 1e3,
                             "us_per_token": seconds / size * 1e6,
                             "MB_s": nbytes / seconds / 1e6})
                progress(f"  {size} tokens: {nbytes} bytes in {seconds * 1e3:.1f} ms")
    fp16 = {r["tokens"]: r["bytes"] for r in rows if r["format"] == "paged fp16"}
    for r in rows:
        r["vs_fp16"] = r["bytes"] / fp16[r["tokens"]] if r["tokens"] in fp16 else None
    return rows


# ----------------------------------------------------------------------------------------
# 3. recovery
# ----------------------------------------------------------------------------------------

def bench_recovery(args, ids):
    rows = []
    prompt = ids[:512]
    with Cluster(2, max_tokens=4096, max_restarts=-1, checkpoint_every=64) as cluster:
        for every in args.checkpoints:
            for replay in ("exact", "prefill"):
                progress(f"recovery: checkpoint_every {every}, replay {replay}")
                cluster.checkpoint_every = every
                cluster.replay = replay
                seq = cluster.new_sequence()
                cluster.forward(seq, prompt)                  # snapshot: 512 >= every
                position = len(prompt)

                def step():
                    nonlocal position
                    start = time.perf_counter()
                    cluster.forward(seq, [ids[position % len(ids)]])
                    position += 1
                    return time.perf_counter() - start

                cluster.checkpoint_every = 1                 # what a checkpoint costs here
                snap_times = [step() for _ in range(3)]
                cluster.checkpoint_every = every
                step_times = []
                while cluster.sequence_info(seq)["since_snapshot"] < every - 1:
                    step_times.append(step())
                info = cluster.sequence_info(seq)
                # an exact copy before the kill, to measure what the replay mode changes
                victim = info["worker"]
                copy = cluster.import_sequence(cluster.export_sequence(seq), worker=1 - victim)
                ray.kill(cluster.workers[victim], no_restart=False)
                token = ids[position % len(ids)]
                start = time.perf_counter()
                logits = cluster.forward(seq, [token])
                seconds = time.perf_counter() - start
                after = cluster.sequence_info(seq)
                diff = float(np.abs(logits - cluster.forward(copy, [token])).max())
                step = statistics.median(step_times or snap_times)
                rows.append({"checkpoint_every": every, "replay": replay,
                             "recorded_after_snapshot": info["since_snapshot"],
                             "sequence_tokens": info["position"],
                             "snapshot_MB": info["snapshot_bytes"] / 1e6,
                             "recovery_s": seconds, "restore_s": after["last_restore"]["seconds"],
                             "replayed_steps": after["last_restore"]["replayed_steps"],
                             "decode_step_ms": step * 1e3,
                             "checkpoint_ms": (statistics.median(snap_times) - step) * 1e3,
                             "checkpoint_ms_per_token": (statistics.median(snap_times) - step)
                             * 1e3 / every,
                             "max_logit_diff": diff})
                progress(f"  recovered in {seconds:.2f} s ({after['last_restore']['replayed_steps']}"
                         f" steps replayed), logit diff {diff:.2e}")
                cluster.remove_sequence(seq)
                cluster.remove_sequence(copy)
                cluster.wait_for_workers(timeout=600)     # the killed actor is back, empty
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--moves", type=int, default=5)
    parser.add_argument("--formats", nargs="+", choices=list(FORMATS))
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--skip", nargs="+", choices=["throughput", "migration", "recovery"],
                        default=[])
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args()
    if max(args.checkpoints) > 512:
        parser.error("--checkpoints: at most 512 (the prompt is the first snapshot)")

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
             log_to_driver=False, logging_level="ERROR", object_store_memory=2 << 30)
    results = {"machine": machine_info(), "ray": ray.__version__, "args": vars(args)}
    tokenizer = ruvpy.models.load(max_tokens=64)
    ids = tokenizer.tokenize(TEXT * 64)
    assert len(ids) >= max(args.sizes)
    try:
        if "throughput" not in args.skip:
            results["throughput"], results["memory"] = bench_throughput(args)
            print("\nAggregate decode throughput (greedy, generated tokens / wall time); "
                  f"{results['memory']['weight_bytes_per_step'] / 1e6:.0f} MB of weights read "
                  f"per step, read bandwidth {results['memory']['read_bandwidth_GB_s']:.1f} GB/s")
            print_table(results["throughput"], ["setup", "workers", "threads", "sequences",
                                                "tokens", "seconds", "tok_s", "x_in_process",
                                                "x_1_worker", "weights_GB_s", "x_bandwidth"])
        if "migration" not in args.skip:
            results["migration"] = bench_migration(args, ids)
            print("\nMigration: one snapshot through the object store (median of "
                  f"{args.moves} moves)")
            print_table(results["migration"], ["format", "tokens", "bytes", "bytes_per_token",
                                               "vs_fp16", "ms", "us_per_token", "MB_s"])
        if "recovery" not in args.skip:
            results["recovery"] = bench_recovery(args, ids)
            print("\nRecovery: next forward after the worker holding the sequence is killed "
                  "(worst case: checkpoint_every - 1 tokens recorded after the snapshot)")
            print_table(results["recovery"], ["checkpoint_every", "replay",
                                              "recorded_after_snapshot", "sequence_tokens",
                                              "snapshot_MB", "recovery_s", "restore_s",
                                              "replayed_steps", "decode_step_ms",
                                              "checkpoint_ms", "checkpoint_ms_per_token",
                                              "max_logit_diff"])
    finally:
        tokenizer.close()
        ray.shutdown()
    print()
    emit_json(results, args.json)


if __name__ == "__main__":
    main()
