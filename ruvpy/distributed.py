"""ruvpy Runtimes as Ray actors: sequences placed by free KV memory, moved between workers as
snapshots, and restored when a worker dies.

    from ruvpy.distributed import Cluster
    with Cluster(num_workers=2, kv_cache="two-tier", cold="q4") as cluster:
        seq = cluster.new_sequence()                       # on the worker with most free KV
        logits = cluster.forward(seq, [1, 2, 3])           # last position's logits [vocab]
        cluster.migrate(seq, 1)                            # its KV, as stored, to worker 1
        print(cluster.generate("The capital of France is", 16, on_token=print))

Needs Ray (`pip install ruvpy[distributed]`). The Cluster calls ray.init() when Ray is not
initialised -- which joins the cluster named by RAY_ADDRESS or started on this machine with
`ray start`, or else starts a local one -- and otherwise uses the cluster Ray is connected to.

Each worker is a Ray actor holding a model (`ruvpy.models.load`) and so its Runtime. The
driver (the process holding the Cluster) keeps, per sequence: the worker it lives on, every
token id appended to it (in the chunks they were appended in), and a snapshot of its KV taken
every `checkpoint_every` tokens (`Runtime.export_sequence`: versioned, SHA-256 checked, in the
cache's stored format). The snapshot is a return value of a call the driver made, so the
driver owns it; it stays in Ray's object store (the shared-memory store of the node that made
it, which outlives the worker process) until a newer one replaces it.

When a call to a worker fails because the worker died (or restarted: a restarted actor runs
its constructor again and holds no sequence), each of its sequences is restored on a live
worker -- the one with the most free KV memory -- from its last snapshot, and the tokens
recorded after the snapshot are replayed in their original chunks, so the restored KV is
bit-identical to what was lost. The call that saw the failure retries; a generation
interrupted in the middle resumes where it was (same tokens, same sampler state). If the
snapshot cannot be read (its node is gone too, or it is corrupt) the whole recorded history is
replayed. A worker Ray cannot restart is dropped from placement and the reason is logged
(logger "ruvpy.distributed").
"""
from __future__ import annotations

import array
import bisect
import collections
import itertools
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ruvpy._closing import Closing
from ruvpy._kvcache import KVCacheFull

try:
    import ray
    from ray.exceptions import (ActorUnavailableError, ObjectLostError, RayActorError, RayError,
                                RayTaskError)
except ImportError as exc:      # pragma: no cover - the extra is not installed
    raise ImportError("ruvpy.distributed needs Ray: pip install 'ruvpy[distributed]' "
                      "(or pip install ray)") from exc

__all__ = ["Cluster", "NoLiveWorkerError", "SequenceNotOnWorker", "ALIVE", "RESTARTING",
           "DROPPED"]

log = logging.getLogger("ruvpy.distributed")

ALIVE, RESTARTING, DROPPED = "alive", "restarting", "dropped"


class NoLiveWorkerError(RuntimeError):
    """No live worker can take the work (all were dropped, or none has room)."""


class SequenceNotOnWorker(KeyError):
    """A worker was asked about a sequence it does not hold: it restarted since (a restarted
    actor has lost every sequence). The driver restores the sequence and retries."""

    def __init__(self, seq, incarnation):
        super().__init__(seq, incarnation)
        self.seq, self.incarnation = seq, incarnation

    def __str__(self):
        return f"sequence {self.seq} is not on this worker (incarnation {self.incarnation})"


class _StaleJob(Exception):
    """A generation whose sequence was removed or restored under it (the driver abandoned
    it): it stops without stepping."""


# ----------------------------------------------------------------------------------------
# the worker (a Ray actor)
# ----------------------------------------------------------------------------------------

class TurnLock:
    """A lock granted in arrival order, where urgent waiters (short control calls: stats,
    free memory, export) go before ordinary ones (model steps). A worker's steps run one at
    a time; the generations waiting for it take turns token by token."""

    def __init__(self):
        self._cond = threading.Condition()
        self._held = False
        self._waiting = (collections.deque(), collections.deque())   # ordinary, urgent

    def acquire(self, urgent=False):
        with self._cond:
            ordinary, hurry = self._waiting
            if not self._held and not ordinary and not hurry:
                self._held = True
                return
            ticket = object()
            queue = hurry if urgent else ordinary
            queue.append(ticket)
            try:
                while self._held or (hurry[0] if hurry else ordinary[0]) is not ticket:
                    self._cond.wait()
            except BaseException:
                queue.remove(ticket)
                self._cond.notify_all()
                raise
            queue.popleft()
            self._held = True

    def release(self):
        with self._cond:
            if not self._held:
                raise RuntimeError("TurnLock.release: the lock is not held")
            self._held = False
            self._cond.notify_all()

    def __call__(self, urgent=False):
        """`with lock(urgent=True):`"""
        return _Held(self, urgent)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


class _Held:
    __slots__ = ("lock", "urgent")

    def __init__(self, lock, urgent):
        self.lock, self.urgent = lock, urgent

    def __enter__(self):
        self.lock.acquire(self.urgent)

    def __exit__(self, *exc):
        self.lock.release()


def _as_snapshot_array(data):
    """Snapshot bytes as a uint8 array: Ray stores numpy arrays out of band, so a reader on
    the same node maps the object store's copy instead of unpickling one."""
    return np.frombuffer(data, dtype=np.uint8)


class Worker:
    """One worker: a model and its Runtime, serving the sequences the driver placed on it.
    Sequences are named by the driver's ids. Model steps take turns through a TurnLock; the
    actor is threaded so that control calls and several generations can be in flight."""

    def __init__(self, index, model_path, kv_cache, runtime_options):
        import ruvpy.models

        start = time.perf_counter()
        self.index = index
        self.incarnation = uuid.uuid4().hex
        self._seqs = {}                  # driver's sequence id -> runtime sequence id
        self._epochs = {}                # driver's sequence id -> the driver's number of
                                         # that copy (0 if absent; see remove)
        self._lock = TurnLock()
        self.model = self.runtime = None
        # a failed load is kept and raised by info() and ping(): an exception escaping a
        # Ray actor's constructor reaches the driver only as text
        self.load_error = None
        try:
            self.model = ruvpy.models.load(model_path, kv_cache=kv_cache, **runtime_options)
        except Exception as exc:
            self.load_error = exc
        else:
            self.runtime = self.model.runtime
        self.load_seconds = time.perf_counter() - start

    # -- what the driver asks about the worker -----------------------------------------------
    def info(self):
        import dataclasses

        import ruvpy

        self.ping()
        ctx = ray.get_runtime_context()
        rt = self.runtime
        return {"index": self.index, "incarnation": self.incarnation, "pid": os.getpid(),
                "node_id": ctx.get_node_id(), "load_seconds": self.load_seconds,
                "model": dataclasses.asdict(self.model.config),
                "runtime": rt.config.as_dict(), "capacity_tokens": rt.capacity_tokens,
                "bytes_per_token": rt.bytes_per_token, "max_sequences": rt.max_sequences,
                "prefill_chunk": getattr(self.model, "prefill_chunk", 512),
                "isa": ruvpy.info().get("isa")}

    def ping(self):
        """This incarnation's id; the model's load error if it could not load one."""
        if self.load_error is not None:
            raise self.load_error
        return self.incarnation

    def free_kv(self):
        with self._lock(urgent=True):
            kv = self.runtime.stats().kv
        return {"incarnation": self.incarnation, "free_tokens": kv["free_tokens"],
                "free_bytes": kv["free_bytes"], "free_sequences": kv["free_sequences"],
                "sequences": len(self._seqs)}

    def stats(self):
        with self._lock(urgent=True):
            stats = self.runtime.stats().as_dict()
            local = {v: k for k, v in self._seqs.items()}
        for row in stats["kv"]["sequences"]:
            row["cluster_seq"] = local.get(row["seq"])
        stats["incarnation"] = self.incarnation
        return stats

    def tokenize(self, text, special=False):
        return self.model.tokenize(text, special=special)

    def detokenize(self, ids, special=False):
        return self.model.detokenize(ids, special=special)

    # -- sequences -----------------------------------------------------------------------------
    def _local(self, seq):
        try:
            return self._seqs[seq]
        except KeyError:
            raise SequenceNotOnWorker(seq, self.incarnation) from None

    def _drop(self, seq):
        self._epochs.pop(seq, None)
        local = self._seqs.pop(seq, None)
        if local is not None:
            self.runtime.remove_sequence(local)

    def new_sequence(self, seq):
        with self._lock:
            if seq in self._seqs:
                raise ValueError(f"worker {self.index} already holds sequence {seq}")
            self._seqs[seq] = self.model.new_sequence()
        return self.incarnation

    def remove(self, seq, epoch=None):
        """Drop `seq`; with `epoch`, only a copy no newer than that one. The remove of an
        abandoned generation is not waited for, and this actor is threaded: it may run
        after the restore the driver sent next, whose copy it must not drop."""
        with self._lock(urgent=True):
            dropped = seq in self._seqs and (epoch is None or self._epochs.get(seq, 0) <= epoch)
            if dropped:
                self._drop(seq)
        return dropped

    def retain(self, seqs):
        """Drop every sequence but `seqs` (copies the driver has restored elsewhere)."""
        keep = set(seqs)
        with self._lock(urgent=True):
            stale = [s for s in self._seqs if s not in keep]
            for seq in stale:
                self._drop(seq)
        return stale

    def forward(self, seq, token_ids, snapshot):
        """Append token_ids to seq in one step: ((last logits, position, snapshot bytes),
        snapshot array or None) -- two returns, so the driver keeps the snapshot in the
        object store without fetching it."""
        with self._lock:
            local = self._local(seq)
            logits = self.model.forward_last(local, token_ids)
            position = self.runtime.position(local)
            data = _as_snapshot_array(self.runtime.export_sequence(local)) if snapshot else None
        return (logits, position, 0 if data is None else data.nbytes), data

    def forward_only(self, seq, token_ids):
        """forward() without a snapshot, as one return."""
        return self.forward(seq, token_ids, False)[0]

    def export(self, seq):
        """((snapshot bytes, position), snapshot array)."""
        with self._lock(urgent=True):
            local = self._local(seq)
            data = _as_snapshot_array(self.runtime.export_sequence(local))
            position = self.runtime.position(local)
        return (data.nbytes, position), data

    def import_sequence(self, seq, data, epoch=0):
        """Hold `seq` from a snapshot; returns its position. A corrupt or mismatched snapshot
        raises SequenceFileError and changes nothing."""
        with self._lock:
            if seq in self._seqs:
                raise ValueError(f"worker {self.index} already holds sequence {seq}")
            local = self.runtime.import_sequence(data)
            self._seqs[seq], self._epochs[seq] = local, epoch
            return self.runtime.position(local)

    def restore(self, seq, data, chunks, merge=False, epoch=0):
        """Rebuild `seq` from a snapshot (None: empty) and the token chunks appended after
        it, replayed one step per chunk (merge=True: in prefill chunks instead -- faster,
        not bit-identical). A copy of `seq` held here is replaced; `epoch` is the driver's
        number of the new copy. Returns its position."""
        with self._lock:
            self._drop(seq)
            local = self.model.new_sequence() if data is None else \
                self.runtime.import_sequence(data)
            self._seqs[seq], self._epochs[seq] = local, epoch
        try:
            if merge:
                flat = [t for chunk in chunks for t in chunk]
                size = getattr(self.model, "prefill_chunk", 512)
                chunks = [flat[i:i + size] for i in range(0, len(flat), size)]
            for chunk in chunks:
                with self._lock:
                    self._owned(seq, local)
                    self.model.forward_last(local, chunk)
            with self._lock:
                return self.runtime.position(local)
        except BaseException:
            with self._lock:
                if self._seqs.get(seq) == local:
                    self._drop(seq)
            raise

    # -- generation --------------------------------------------------------------------------
    def generate(self, seq, job):
        """A streaming generation on `seq` (see Cluster.generate). Yields small event tuples:
        ("prompt", ids, chunk); ("token", id, piece, position); ("snapshot", position,
        nbytes) -- only right after a token event -- followed by the snapshot array itself;
        last ("done", stop_reason, position, text, tail). `position` is the sequence's
        committed position when the event was made: it tells the driver which of the tokens
        it sent are in. job["generated"] non-empty resumes a generation that had produced
        those tokens (the last one sampled, not yet appended). A job whose sequence the
        driver dropped or rebuilt meanwhile ends quietly at its next step."""
        from ruvpy.models.sampling import Sampler

        with self._lock(urgent=True):
            local = self._local(seq)
        sampler = Sampler(job["temperature"], job["top_p"], job["seed"])
        generated = list(job["generated"])
        if job["temperature"] > 0:
            dummy = np.zeros(2, np.float32)
            for _ in generated:          # one draw per sampled token: the same stream onwards
                sampler(dummy)
        stream = self.model.tokenizer.stream()
        for token in generated:
            stream.feed(token)
        try:
            yield from self._generation(seq, local, job, generated, sampler, stream)
        except _StaleJob:
            return

    def _owned(self, seq, local):
        """Raise _StaleJob unless `seq` is still the runtime sequence `local` (call with the
        lock held)."""
        if self._seqs.get(seq) != local:
            raise _StaleJob(f"sequence {seq} was removed or replaced")

    def _generation(self, seq, local, job, generated, sampler, stream):
        model, rt = self.model, self.runtime
        every, last_snapshot = job["checkpoint_every"], job["snapshot_position"]
        limit = model.config.context_length

        def step(ids):
            with self._lock:
                self._owned(seq, local)
                return model.forward_last(local, ids), rt.position(local)

        with self._lock(urgent=True):
            self._owned(seq, local)
            position = rt.position(local)
        if not generated:
            prompt = job["prompt"]
            ids = model.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
            self._check_prompt(ids, position, limit)
            chunk = getattr(model, "prefill_chunk", 512)
            yield ("prompt", ids, chunk)
            for begin in range(0, len(ids), chunk):
                logits, position = step(ids[begin:begin + chunk])
        else:
            logits, position = step([generated[-1]])
        eog = model.end_of_generation_ids
        while True:
            token = sampler(logits)
            if token in eog:
                reason = "eos"
                break
            generated.append(token)
            yield ("token", token, stream.feed(token), position)
            # a snapshot only right after a token event: the driver then knows that token is
            # the one to append first if the job resumes from this snapshot
            if every and position - last_snapshot >= every:
                with self._lock(urgent=True):
                    self._owned(seq, local)
                    data = _as_snapshot_array(rt.export_sequence(local))
                last_snapshot = position
                yield ("snapshot", position, data.nbytes)
                yield data
            if len(generated) >= job["max_new_tokens"]:
                reason = "length"
                break
            if position >= limit:
                reason = "context"
                break
            try:
                logits, position = step([token])
            except KVCacheFull:         # refused before anything was written, as locally
                reason = "kv_full"
                break
        yield ("done", reason, position, model.detokenize(generated), stream.flush())

    def _check_prompt(self, ids, position, limit):
        _check_prompt(ids, position, self.model.config.vocab_size, limit)


def _check_prompt(ids, position, vocab_size, limit):
    """The prompt's token ids fit the model, appended at `position`: the worker checks them
    before its generation steps, the driver those of a generation of 0 tokens."""
    from ruvpy.models.llama import token_id_array

    if not ids:
        raise ValueError("the prompt is empty: there is nothing to continue")
    token_id_array(ids, vocab_size)
    if position + len(ids) > limit:
        raise ValueError(f"the prompt has {len(ids)} tokens after {position}: more than "
                         f"the model's context length {limit}")


_RemoteWorker = ray.remote(Worker)


# ----------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------

class _Slot:
    """The driver's view of one worker."""

    def __init__(self, index, handle):
        self.index, self.handle = index, handle
        self.state = ALIVE
        self.reason = None
        self.incarnation = None
        self.info = {}
        self.watcher = None


class _SequenceLock:
    """One call on a sequence at a time. A call from the thread already inside one (an
    on_token callback of the sequence's own generate()) raises instead of waiting for
    itself forever; a non-blocking attempt from it says busy."""

    __slots__ = ("_seq", "_lock", "_owner")

    def __init__(self, seq):
        self._seq, self._lock, self._owner = seq, threading.Lock(), None

    def acquire(self, blocking=True):
        if self._owner == threading.get_ident():
            if not blocking:
                return False
            raise RuntimeError(f"sequence {self._seq} is in a call of this same thread (its "
                               f"generate()'s on_token?): it cannot be used until that call "
                               f"returns")
        if not self._lock.acquire(blocking):
            return False
        self._owner = threading.get_ident()
        return True

    def release(self):
        self._owner = None
        self._lock.release()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


class _Record:
    """The driver's record of one sequence: its worker, every token appended to it in the
    chunks they were appended in, and its last snapshot (an ObjectRef the driver owns)."""

    def __init__(self, seq, worker):
        self.seq, self.worker = seq, worker
        self.lock = _SequenceLock(seq)    # one call on a sequence at a time
        self.tokens = array.array("i")
        self.ends = array.array("q")      # cumulative chunk ends
        self.snapshot = None              # ObjectRef, or None: the empty sequence
        self.snapshot_position = 0
        self.snapshot_bytes = 0
        self.dirty = False                # the worker's copy is lost or unknown: restore
        self.removed = False
        self.restores = 0
        self.last_restore = None          # {worker, seconds, replayed_tokens, ...}
        self.base = 0                     # tokens known only through the snapshot (imported)
        self.epoch = 0                    # the worker copy's number: +1 per restore attempt

    @property
    def position(self):
        return len(self.tokens)

    def append(self, chunk):
        self.tokens.extend(chunk)
        self.ends.append(len(self.tokens))

    def chunks_after(self, position):
        """The recorded chunks after `position` (a chunk end, or 0)."""
        i = bisect.bisect_right(self.ends, position)
        out, begin = [], position
        for end in self.ends[i:]:
            out.append(self.tokens[begin:end].tolist())
            begin = end
        return out

    def set_snapshot(self, ref, position, nbytes):
        self.snapshot, self.snapshot_position, self.snapshot_bytes = ref, position, nbytes

    def since_snapshot(self):
        return self.position - self.snapshot_position


def _token_list(token_ids):
    """Checked token ids as a list of ints (the vocabulary is the worker's to check)."""
    from ruvpy.models.llama import token_id_array

    return token_id_array(token_ids).tolist()


def _task_cause(exc):
    """The exception a worker raised (RayTaskError wraps it)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _settle(refs):
    """Read the outcome of refs whose task failed, so that Ray does not report their errors
    as unhandled when they are released."""
    for ref in refs:
        try:
            ray.get(ref, timeout=0)
        except Exception:
            pass


def _death_reason(exc):
    """One line on why Ray says an actor is gone."""
    text = str(exc)
    for line in text.splitlines():
        if "dead because" in line or "restarted" in line or "unavailable" in line.lower():
            return line.strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


class Cluster(Closing):
    """Cluster(num_workers=2, model=None, kv_cache="paged", checkpoint_every=64,
    **runtime_options): `num_workers` Ray actors, each a model (`ruvpy.models.load(model,
    kv_cache=kv_cache, **runtime_options)`: None is the default SmolLM2 GGUF) and its Runtime.

    Sequences are ints of the cluster. forward/generate/migrate/remove_sequence on one
    sequence run one at a time (a second call from another thread waits); different
    sequences may be driven from different threads at once (each worker steps one sequence
    at a time, taking turns).

    checkpoint_every: a sequence's snapshot is refreshed every this many tokens (None: never;
    a lost worker's sequences are then rebuilt from their whole recorded history).
    max_restarts: how often Ray restarts a dead worker (its constructor reloads the model;
    it comes back empty). replay: "exact" (the default) replays the tokens recorded after a
    snapshot in the chunks they were appended in, so that a restored sequence is
    bit-identical; "prefill" replays them in prefill-sized chunks (faster; the next logits
    then differ by up to ~0.75 of a logit scale of ~34, 0.49-0.74 measured by
    tools/bench_distributed.py: a chunk's activations are quantized to int8 in the blocked
    matmul, a single token's in the matrix-vector kernel, and the two round differently).
    max_concurrency: calls a worker serves at once (generations in flight + control calls).
    worker_options: extra Ray actor options (num_cpus, resources, scheduling_strategy --
    "SPREAD" by default --, ...). restart_timeout: seconds a call waits for Ray to restart
    a worker when no other worker can take its sequences.
    ray_init: keyword arguments for ray.init() when the Cluster starts Ray (it then shuts
    Ray down in shutdown()).
    """

    def __init__(self, num_workers=2, model=None, kv_cache="paged", checkpoint_every=64, *,
                 max_restarts=3, replay="exact", max_concurrency=32, worker_options=None,
                 ray_init=None, restart_timeout=300.0, **runtime_options):
        from ruvpy.models import KV_CACHE_KINDS

        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}")
        if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or
                                             not isinstance(checkpoint_every, int) or
                                             checkpoint_every < 1):
            raise ValueError(f"checkpoint_every must be None or an int >= 1, got "
                             f"{checkpoint_every!r}")
        if kv_cache not in KV_CACHE_KINDS:
            raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHE_KINDS)}, got "
                             f"{kv_cache!r}")
        if replay not in ("exact", "prefill"):
            raise ValueError(f"replay must be 'exact' or 'prefill', got {replay!r}")
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < -1:
            raise ValueError(f"max_restarts must be an int >= -1 (-1: always), got "
                             f"{max_restarts!r}")
        if restart_timeout is not None and (isinstance(restart_timeout, bool) or
                                            not isinstance(restart_timeout, (int, float)) or
                                            not 0 < restart_timeout < float("inf")):
            raise ValueError(f"restart_timeout must be a number of seconds > 0 (or None: no "
                             f"limit), got {restart_timeout!r}")
        self._check_runtime_options(kv_cache, runtime_options)
        self.checkpoint_every = checkpoint_every
        self.replay = replay
        self.kv_cache = kv_cache
        self.restart_timeout = restart_timeout
        self.runtime_options = dict(runtime_options)
        self._lock = threading.RLock()
        self._records = {}
        self._ids = itertools.count()
        self._closed = False
        self._owns_ray = False
        self.last_generation = None
        self._counters = collections.Counter()
        self._placing = collections.Counter()    # worker -> new sequences being placed there
        if model is not None:
            model = os.fspath(model)
        if not ray.is_initialized():
            ray.init(**(ray_init or {}))
            self._owns_ray = True
        # SPREAD: on a multi-node cluster, workers (each a whole model) go to different
        # nodes when they can; on one machine it changes nothing
        options = {"max_restarts": max_restarts, "max_task_retries": 0,
                   "max_concurrency": max_concurrency, "scheduling_strategy": "SPREAD",
                   **(worker_options or {})}
        try:
            self._slots = [_Slot(i, _RemoteWorker.options(**options).remote(
                i, model, kv_cache, runtime_options)) for i in range(num_workers)]
            infos = [slot.handle.info.remote() for slot in self._slots]
            for slot, ref in zip(self._slots, infos):
                try:
                    slot.info = ray.get(ref)
                except RayTaskError as exc:          # e.g. the model file is missing
                    raise _task_cause(exc) from None
                slot.incarnation = slot.info["incarnation"]
        except BaseException:
            self.shutdown()
            raise
        info = self._slots[0].info
        self.model_config = info["model"]
        self.runtime_config = info["runtime"]
        self.prefill_chunk = info["prefill_chunk"]

    @staticmethod
    def _check_runtime_options(kv_cache, options):
        """Bad runtime options fail here, not in every worker's constructor."""
        from ruvpy.config import RuntimeConfig

        shape_free = {k: v for k, v in options.items() if k not in ("blas_threads",)}
        RuntimeConfig(num_layers=1, num_heads=1, num_kv_heads=1, head_dim=16,
                      kv_cache=kv_cache, **shape_free)

    # -- workers -------------------------------------------------------------------------------
    @property
    def workers(self):
        """The workers' Ray actor handles, in worker order (dropped ones included)."""
        return [slot.handle for slot in self._slots]

    @property
    def num_workers(self):
        return len(self._slots)

    def worker_states(self):
        """[(state, reason)] per worker: "alive", "restarting" (failed; Ray may restart it)
        or "dropped" (Ray cannot restart it; reason says why). After shutdown() there are no
        workers: RuntimeError, as from every other call."""
        with self._lock:
            self._check_open()
            return [(slot.state, slot.reason) for slot in self._slots]

    def live_workers(self):
        """Indexes of the "alive" workers (RuntimeError after shutdown())."""
        with self._lock:
            self._check_open()
            return [slot.index for slot in self._slots if slot.state == ALIVE]

    def wait_for_workers(self, timeout=None):
        """Wait until no worker is "restarting" (each comes back or is dropped); returns
        worker_states(). TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        me = threading.current_thread()
        while True:
            with self._lock:
                watchers = [s.watcher for s in self._slots
                            if s.watcher is not None and s.watcher is not me and
                            s.watcher.is_alive()]
            if not watchers:
                return self.worker_states()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"workers still restarting after {timeout} s: "
                                   f"{self.worker_states()}")
            watchers[0].join(left)

    def _worker_index(self, worker):
        if isinstance(worker, ray.actor.ActorHandle):
            for slot in self._slots:
                if slot.handle == worker:
                    return slot.index
            raise ValueError("that actor handle is not one of this cluster's workers")
        if isinstance(worker, bool) or not isinstance(worker, (int, np.integer)):
            raise TypeError(f"a worker is an int index or one of cluster.workers, got "
                            f"{type(worker).__name__} {worker!r}")
        if not 0 <= worker < len(self._slots):
            raise ValueError(f"there is no worker {worker}: the cluster has workers "
                             f"0..{len(self._slots) - 1}")
        return int(worker)

    def _on_worker_error(self, index, exc):
        """A call to worker `index` failed with a Ray actor error: its sequences are lost or
        in an unknown state. Out of placement until Ray restarts it (it comes back empty) or
        says it is gone for good."""
        with self._lock:
            slot = self._slots[index]
            if slot.state != ALIVE or self._closed:    # closed: shutdown() killed it
                return
            slot.state = RESTARTING
            slot.reason = _death_reason(exc)
            self._counters["worker_failures"] += 1
            orphans = [r for r in self._records.values() if r.worker == index]
            for rec in orphans:
                rec.dirty = True
            log.warning("ruvpy.distributed: worker %d failed (%s); restoring its %d "
                        "sequence(s) on live workers", index, slot.reason, len(orphans))
            slot.watcher = threading.Thread(target=self._watch, args=(slot, orphans),
                                            name=f"ruvpy-worker-{index}-watch", daemon=True)
            slot.watcher.start()

    def _on_restarted(self, index, incarnation):
        """Worker `index` answered with a new incarnation: it restarted and lost every
        sequence the driver placed on it."""
        with self._lock:
            slot = self._slots[index]
            if slot.incarnation == incarnation:
                return
            lost = [r for r in self._records.values() if r.worker == index]
            for rec in lost:
                rec.dirty = True
            slot.incarnation = incarnation
        log.warning("ruvpy.distributed: worker %d restarted (its %d sequence(s) are restored "
                    "from their snapshots)", index, len(lost))

    def _watch(self, slot, orphans):
        """After a worker failure: restore its idle sequences elsewhere, then learn whether
        Ray restarted it (back in placement, empty) or cannot (dropped, reason logged)."""
        for rec in orphans:
            if self._closed:
                return
            if rec.lock.acquire(blocking=False):   # busy ones are restored by their caller
                try:
                    if rec.dirty and not rec.removed:
                        self._restore(rec, exclude={slot.index})
                except Exception as exc:           # retried at the sequence's next use
                    if not self._closed:
                        log.warning("ruvpy.distributed: sequence %d not restored yet: %s",
                                    rec.seq, exc)
                finally:
                    rec.lock.release()
        try:
            incarnation = self._ping_until_settled(slot)
        except RayError as exc:
            with self._lock:
                slot.state = DROPPED
                slot.reason = _death_reason(exc)
            if not self._closed:
                log.warning("ruvpy.distributed: worker %d dropped from placement: %s",
                            slot.index, slot.reason)
            return
        self._on_restarted(slot.index, incarnation)
        with self._lock:
            keep = [r.seq for r in self._records.values()
                    if r.worker == slot.index and not r.dirty]
        try:
            ray.get(slot.handle.retain.remote(keep))   # stale copies of restored sequences
        except RayError as exc:
            if not self._closed:
                log.warning("ruvpy.distributed: worker %d failed again (%s)", slot.index, exc)
            with self._lock:
                slot.state = DROPPED
                slot.reason = _death_reason(exc)
            return
        with self._lock:
            slot.state, slot.reason = ALIVE, None
        log.warning("ruvpy.distributed: worker %d is back in placement (incarnation %s)",
                    slot.index, incarnation[:8])

    def _ping_until_settled(self, slot):
        """The worker's incarnation once Ray has restarted it; ActorDiedError (or another
        RayError) when it cannot. While it restarts Ray answers ActorUnavailableError: ask
        again, less and less often."""
        delay = 0.05
        while True:
            try:
                return ray.get(slot.handle.ping.remote())
            except ActorUnavailableError:
                if self._closed:
                    raise
                time.sleep(delay)
                delay = min(2.0, delay * 2)

    # -- placement -------------------------------------------------------------------------------
    def _free_kv(self, exclude=()):
        """{worker: its free_kv()} of the live workers (failing ones are handled)."""
        with self._lock:
            slots = [s for s in self._slots if s.state == ALIVE and s.index not in exclude]
        refs = [(s, s.handle.free_kv.remote()) for s in slots]
        free = {}
        for slot, ref in refs:
            try:
                answer = ray.get(ref)
            except RayActorError as exc:
                self._on_worker_error(slot.index, exc)
                continue
            self._on_restarted(slot.index, answer["incarnation"])
            free[slot.index] = answer
        return free

    def _choose(self, free, reserve):
        """The live worker to prefer (None: none can take a sequence): most free KV bytes,
        then fewest of our sequences -- those being placed right now included --, then
        lowest index. reserve=True counts the choice as being placed until _placed(): the
        sequences of concurrent new_sequence() calls, all empty when their free KV is read,
        then spread instead of all going to the lowest index."""
        with self._lock:
            counts = collections.Counter(r.worker for r in self._records.values())
            counts.update(self._placing)
            ranked = [w for w, f in free.items() if f["free_sequences"] != 0]
            if not ranked:
                return None
            best = min(ranked, key=lambda w: (-free[w]["free_bytes"], counts[w], w))
            if reserve:
                self._placing[best] += 1
            return best

    def _placed(self, worker):
        """A reserved placement on `worker` is now a record (or was given up)."""
        with self._lock:
            self._placing[worker] -= 1

    def _place(self, exclude=(), reserve=False):
        best = self._choose(self._free_kv(exclude), reserve)
        if best is None and self._restarting(exclude):
            # nothing else can take it: wait for Ray to restart the failed workers
            self.wait_for_workers(timeout=self.restart_timeout)
            best = self._choose(self._free_kv(exclude), reserve)
        if best is None:
            raise NoLiveWorkerError(self._no_worker_message())
        return best

    def _restarting(self, exclude=()):
        """Workers Ray may still bring back (not this thread's own watch)."""
        me = threading.current_thread()
        with self._lock:
            return [s.index for s in self._slots if s.state == RESTARTING and
                    s.index not in exclude and s.watcher is not me]

    def _no_worker_message(self):
        states = ", ".join(f"worker {i}: {s}" + (f" ({r})" if r else "")
                           for i, (s, r) in enumerate(self.worker_states()))
        return f"no live worker can take a sequence ({states})"

    # -- sequences -------------------------------------------------------------------------------
    def _check_open(self):
        if self._closed:
            raise RuntimeError("the Cluster is shut down")

    def _record(self, seq):
        self._check_open()
        if isinstance(seq, bool) or not isinstance(seq, (int, np.integer)):
            raise TypeError(f"a sequence id must be an int, got {type(seq).__name__} {seq!r}")
        with self._lock:
            rec = self._records.get(int(seq))
        if rec is None:
            raise KeyError(f"unknown sequence {seq} (the cluster has sequences "
                           f"{self.sequences})")
        return rec

    @property
    def sequences(self):
        with self._lock:
            return sorted(self._records)

    def new_sequence(self):
        """A new, empty sequence on the live worker with the most free KV memory."""
        self._check_open()
        seq = next(self._ids)
        tried = set()
        while True:
            self._check_open()         # shut down meanwhile: no remote call (Ray may be down)
            worker = self._place(exclude=tried, reserve=True)
            slot = self._slots[worker]
            try:
                ray.get(slot.handle.new_sequence.remote(seq))
            except RayActorError as exc:
                self._on_worker_error(worker, exc)
                tried.add(worker)
                continue
            except RayTaskError as exc:
                cause = _task_cause(exc)
                from ruvpy import KVCacheFull
                if isinstance(cause, KVCacheFull):
                    tried.add(worker)
                    continue
                raise cause from None
            else:
                with self._lock:
                    self._records[seq] = _Record(seq, worker)
                return seq
            finally:
                self._placed(worker)

    def worker_of(self, seq):
        """Index of the worker holding `seq`."""
        return self._record(seq).worker

    def position(self, seq):
        """Tokens appended to `seq` (the position its next token takes)."""
        return self._record(seq).position

    def tokens(self, seq):
        """Every token id appended to `seq`, in order (what the driver recorded; for a
        sequence made by import_sequence, those appended after the import)."""
        rec = self._record(seq)
        return rec.tokens[rec.base:].tolist()

    def remove_sequence(self, seq):
        rec = self._record(seq)
        with rec.lock:
            self._remove(rec)

    def _remove(self, rec):
        with self._lock:
            if rec.removed:
                return
            rec.removed = True
            self._records.pop(rec.seq, None)
            slot = self._slots[rec.worker]
            alive = slot.state == ALIVE and not self._closed   # (Ray may be down: a remote
                                                                # call would start a new one)
        rec.snapshot = None        # the object store frees it
        if alive:
            try:
                ray.get(slot.handle.remove.remote(rec.seq))
            except RayActorError as exc:
                self._on_worker_error(rec.worker, exc)

    # -- restoring -------------------------------------------------------------------------------
    def _ensure_ready(self, rec):
        """Restore `rec` first if its worker's copy is lost or unknown."""
        if rec.removed:
            raise KeyError(f"sequence {rec.seq} was removed")
        if rec.dirty or self._slots[rec.worker].state != ALIVE:
            self._restore(rec)

    def _restore(self, rec, target=None, exclude=()):
        """Rebuild `rec` from its snapshot and the chunks recorded after it: on `target`, or
        on its own worker if that is alive, or on the live worker with the most free KV. An
        unreadable snapshot (lost with its node, or corrupt) falls back to replaying the whole
        history. The caller holds rec.lock."""
        tried = set(exclude)
        use_snapshot = rec.snapshot is not None
        if not use_snapshot and rec.base:
            raise NoLiveWorkerError(f"sequence {rec.seq} cannot be restored: it was imported "
                                    f"with {rec.base} tokens the driver never saw, and its "
                                    f"snapshot is gone")
        while True:
            self._check_open()
            if target is not None and target not in tried:
                worker = target
            elif rec.worker not in tried and self._slots[rec.worker].state == ALIVE:
                worker = rec.worker
            else:
                worker = self._place(exclude=tried)
            slot = self._slots[worker]
            if use_snapshot:
                data, chunks = rec.snapshot, rec.chunks_after(rec.snapshot_position)
            else:
                data, chunks = None, rec.chunks_after(0)
            start = time.perf_counter()
            rec.epoch += 1             # a remove sent for an older copy leaves this one alone
            try:
                position = ray.get(slot.handle.restore.remote(
                    rec.seq, data, chunks, self.replay == "prefill", rec.epoch))
            except RayActorError as exc:
                self._on_worker_error(worker, exc)
                tried.add(worker)
                continue
            except (ObjectLostError, RayTaskError) as exc:
                cause = _task_cause(exc)
                from ruvpy import KVCacheFull
                from ruvpy.seqfile import SequenceFileError
                if use_snapshot and isinstance(cause, (ObjectLostError, SequenceFileError)) \
                        and not rec.base:
                    log.warning("ruvpy.distributed: sequence %d's snapshot is unusable (%s); "
                                "replaying its %d recorded tokens", rec.seq,
                                str(cause).splitlines()[0], rec.position)
                    use_snapshot = False
                    rec.snapshot = None
                    continue
                if isinstance(cause, KVCacheFull):
                    tried.add(worker)
                    continue
                raise cause from None
            if position != rec.position:
                raise RuntimeError(f"sequence {rec.seq} restored on worker {worker} at "
                                   f"position {position}, but {rec.position} tokens are "
                                   f"recorded")
            if not use_snapshot:
                rec.set_snapshot(None, 0, 0)
            with self._lock:
                rec.worker = worker
                rec.dirty = False
                rec.restores += 1
            self._count(restores=1)
            replayed = sum(map(len, chunks))
            steps = -(-replayed // self.prefill_chunk) if self.replay == "prefill" else len(chunks)
            rec.last_restore = {"worker": worker, "seconds": time.perf_counter() - start,
                                "replayed_tokens": replayed, "replayed_steps": steps,
                                "from_snapshot": use_snapshot}
            log.info("ruvpy.distributed: sequence %d restored on worker %d (%d tokens "
                     "replayed in %d steps) in %.3f s", rec.seq, worker, replayed, steps,
                     rec.last_restore["seconds"])
            return worker

    def _lost_by_worker(self, rec, worker, cause):
        """True if `cause` (what `worker` raised) says it restarted and lost `rec`, which is
        then marked for restoring."""
        if not isinstance(cause, SequenceNotOnWorker):
            return False
        self._on_restarted(worker, cause.incarnation)
        rec.dirty = True
        return True

    def _call(self, rec, submit):
        """Run submit(handle) -> ObjectRef for `rec` on its worker and get the result,
        restoring `rec` and retrying when the worker fails or has lost it. An exception the
        worker raised is re-raised as itself."""
        while True:
            self._check_open()
            self._ensure_ready(rec)
            worker = rec.worker
            try:
                return worker, ray.get(submit(self._slots[worker].handle))
            except RayActorError as exc:
                self._on_worker_error(worker, exc)
                rec.dirty = True
            except RayTaskError as exc:
                cause = _task_cause(exc)
                if self._lost_by_worker(rec, worker, cause):
                    continue
                raise cause from None

    # -- the API ---------------------------------------------------------------------------------
    def forward(self, seq, token_ids):
        """Append `token_ids` to `seq` in one step on its worker; the last position's logits
        (float32 [vocab]), like LlamaModel.forward_last. Bad input raises (ValueError /
        TypeError naming it) and leaves the sequence as it was."""
        ids = _token_list(token_ids)
        rec = self._record(seq)
        with rec.lock:
            every = self.checkpoint_every
            snapshot = bool(every) and rec.since_snapshot() + len(ids) >= every
            refs = []

            def submit(handle):
                if snapshot:
                    refs[:] = handle.forward.options(num_returns=2).remote(rec.seq, ids, True)
                else:
                    refs[:] = [handle.forward_only.remote(rec.seq, ids)]
                return refs[0]

            try:
                worker, (logits, position, nbytes) = self._call(rec, submit)
            except BaseException:
                _settle(refs[1:])
                raise
            if position != rec.position + len(ids):
                rec.dirty = True         # the worker's copy went its own way: rebuild it
                raise RuntimeError(f"sequence {rec.seq} on worker {worker} is at position "
                                   f"{position}, expected {rec.position + len(ids)}; it "
                                   f"is restored from its record at its next use")
            rec.append(ids)
            if snapshot:
                rec.set_snapshot(refs[1], rec.position, nbytes)
            self._count(forwarded_tokens=len(ids), checkpoints=int(snapshot))
            return np.array(logits, dtype=np.float32)

    def migrate(self, seq, worker):
        """Move `seq` to `worker` (an index or one of `workers`) as one snapshot of its KV in
        the stored format (quantized tiers stay quantized) through the object store; no
        token is recomputed. The snapshot becomes the sequence's checkpoint. Returns {"seq",
        "from", "to", "tokens", "bytes", "seconds"}. A bad sequence or worker, a corrupt
        snapshot or a full target raise and leave the sequence where it was."""
        rec = self._record(seq)
        target = self._worker_index(worker)
        with rec.lock:
            if rec.removed:            # while this call waited for the lock
                raise KeyError(f"sequence {rec.seq} was removed")
            self._check_target(target)
            source = rec.worker
            start = time.perf_counter()
            if rec.dirty or self._slots[source].state != ALIVE:
                # its worker's copy is lost anyway: rebuild it on the target from the record
                self._restore(rec, target=target)
                return {"seq": rec.seq, "from": source, "to": rec.worker, "tokens": rec.position,
                        "bytes": rec.snapshot_bytes, "seconds": time.perf_counter() - start,
                        "restored": True}
            if source == target:
                return {"seq": rec.seq, "from": source, "to": target, "tokens": rec.position,
                        "bytes": 0, "seconds": 0.0}
            meta_ref, data_ref = self._slots[source].handle.export.options(
                num_returns=2).remote(rec.seq)
            try:
                nbytes, position = ray.get(meta_ref)
            except (RayActorError, RayTaskError) as exc:
                _settle([data_ref])
                cause = _task_cause(exc) if isinstance(exc, RayTaskError) else exc
                if isinstance(exc, RayActorError):
                    self._on_worker_error(source, exc)
                elif isinstance(cause, SequenceNotOnWorker):
                    self._on_restarted(source, cause.incarnation)
                else:
                    raise cause from None
                # the source lost it: the sequence is rebuilt on the target from its record
                rec.dirty = True
                self._restore(rec, target=target)
                return {"seq": rec.seq, "from": source, "to": rec.worker, "tokens": rec.position,
                        "bytes": rec.snapshot_bytes, "seconds": time.perf_counter() - start,
                        "restored": True}
            if position != rec.position:
                rec.dirty = True
                raise RuntimeError(f"sequence {rec.seq} on worker {source} is at position "
                                   f"{position}, expected {rec.position}; it will be restored "
                                   f"from its record")
            data_ref = self._in_transit(data_ref)
            try:
                ray.get(self._slots[target].handle.import_sequence.remote(rec.seq, data_ref,
                                                                          rec.epoch))
            except RayActorError as exc:
                self._on_worker_error(target, exc)
                raise RuntimeError(f"worker {target} failed while importing sequence "
                                   f"{rec.seq}; the sequence stays on worker {source}") from None
            except RayTaskError as exc:
                cause = _task_cause(exc)
                raise type(cause)(f"migrate: worker {target} refused sequence {rec.seq} "
                                  f"({nbytes} bytes); it stays on worker {source}: "
                                  f"{cause}") from None
            with self._lock:
                rec.worker = target
            rec.set_snapshot(data_ref, position, nbytes)
            self._count(migrations=1)
            try:
                ray.get(self._slots[source].handle.remove.remote(rec.seq))
            except RayActorError as exc:
                self._on_worker_error(source, exc)
            return {"seq": rec.seq, "from": source, "to": target, "tokens": position,
                    "bytes": nbytes, "seconds": time.perf_counter() - start}

    def _in_transit(self, data_ref):
        """The snapshot on its way to the target (a hook for fault-injection tests)."""
        return data_ref

    def _check_target(self, target):
        state, reason = self.worker_states()[target]
        if state != ALIVE:
            raise RuntimeError(f"worker {target} is {state}" + (f" ({reason})" if reason else "")
                               + "; it takes no sequences")

    def export_sequence(self, seq):
        """`seq`'s snapshot as bytes (Runtime.export_sequence's format: versioned, SHA-256
        checked, the KV as stored)."""
        rec = self._record(seq)
        with rec.lock:
            refs = []

            def submit(handle):
                refs[:] = handle.export.options(num_returns=2).remote(rec.seq)
                return refs[0]

            self._call(rec, submit)
            return ray.get(refs[1]).tobytes()

    def import_sequence(self, data, worker=None):
        """A new sequence from bytes of export_sequence (or Runtime.export_sequence of a
        runtime of the same storage configuration), on `worker` or the one with the most
        free KV. Its recorded history starts at the snapshot: if the snapshot is lost with
        its worker before the next checkpoint, only the tokens after it can be replayed, so
        the sequence is checkpointed right away. Corrupt data raises SequenceFileError and
        nothing changes."""
        self._check_open()
        if not isinstance(data, (bytes, bytearray, memoryview)):   # (bytes(5) is five zeros)
            raise TypeError(f"import_sequence takes the bytes of export_sequence, got "
                            f"{type(data).__name__}")
        arr = _as_snapshot_array(bytes(data))
        target = self._place() if worker is None else self._worker_index(worker)
        self._check_target(target)
        seq = next(self._ids)
        ref = ray.put(arr)
        try:
            position = ray.get(self._slots[target].handle.import_sequence.remote(seq, ref))
        except RayActorError as exc:
            self._on_worker_error(target, exc)
            raise RuntimeError(f"worker {target} failed while importing a sequence") from None
        except RayTaskError as exc:
            raise _task_cause(exc) from None
        rec = _Record(seq, target)
        rec.base = position      # the tokens before the snapshot are not known to the driver
        rec.tokens.extend(array.array("i", bytes(4 * position)))
        if position:
            rec.ends.append(position)
        rec.set_snapshot(ref, position, arr.nbytes)
        with self._lock:
            self._records[seq] = rec
        return seq

    def generate(self, prompt, max_new_tokens=64, *, temperature=0.0, top_p=1.0, seed=None,
                 on_token=None, seq=None) -> str:
        """Continue `prompt` (text, or token ids) by up to `max_new_tokens` tokens and return
        the new text, as LlamaModel.generate: temperature 0 is greedy, otherwise temperature
        + top-p sampling with numpy Generator(seed); `on_token(piece)` receives each new piece
        of text as it is produced; stops at an end-of-generation token. seq: None runs on a
        fresh sequence removed afterwards; a sequence id appends the prompt and the
        generated tokens (but the last) to it.

        The loop runs on the sequence's worker and streams its tokens back. If the worker
        dies, the sequence is restored elsewhere and the generation resumes where it was
        (same tokens, same sampler state), so the text is what an uninterrupted run gives.
        If the caller abandons it (on_token raised, Ctrl-C), `seq` holds the prompt and the
        tokens generated before that."""
        from ruvpy.models import GenerationStats
        from ruvpy.models.sampling import check_sampling

        check_sampling(temperature, top_p)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
            raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty: there is nothing to continue")
        elif isinstance(prompt, (bytes, bytearray, memoryview)):
            raise TypeError(f"prompt must be text (str) or token ids, got {type(prompt).__name__} "
                            f"(decode it first)")
        else:
            prompt = _token_list(prompt)
        self._check_open()
        if max_new_tokens == 0:          # nothing to generate: the prompt is checked all the same
            position = 0 if seq is None else self._record(seq).position
            ids = self.tokenize(prompt) if isinstance(prompt, str) else prompt
            _check_prompt(ids, position, self.model_config["vocab_size"],
                          self.model_config["context_length"])
            self.last_generation = GenerationStats(prompt_tokens=len(ids), stop_reason="length")
            return ""
        own = seq is None
        rec = self._record(self.new_sequence() if own else seq)
        job = {"prompt": prompt, "max_new_tokens": int(max_new_tokens),
               "temperature": float(temperature), "top_p": float(top_p), "seed": seed,
               "generated": [], "checkpoint_every": self.checkpoint_every}
        try:
            with rec.lock:
                return self._generate(rec, job, on_token)
        finally:
            if own:
                with rec.lock:
                    self._remove(rec)

    def _generate(self, rec, job, on_token):
        from ruvpy.models import GenerationStats

        stats = GenerationStats(stop_reason="length")
        generated = job["generated"]
        pending = []                   # chunks appended on the worker, not yet known committed
        start = time.perf_counter()

        def commit_up_to(position):
            """The worker's committed position tells which pending chunks are in (the rest
            are not yet)."""
            while pending and rec.position < position:
                rec.append(pending.pop(0))
            if rec.position != position:
                raise RuntimeError(f"sequence {rec.seq}: the worker reports position "
                                   f"{position}, the driver recorded {rec.position}")

        while True:
            self._check_open()
            self._ensure_ready(rec)
            worker = rec.worker
            handle = self._slots[worker].handle
            job["snapshot_position"] = rec.snapshot_position
            pending.clear()
            if generated:              # resuming: the last sampled token goes in first
                pending.append([generated[-1]])
            stream = handle.generate.options(num_returns="streaming").remote(rec.seq, job)
            started = False
            try:
                for ref in stream:
                    event = ray.get(ref)
                    started = True
                    kind = event[0]
                    if kind == "prompt":
                        _, ids, chunk = event
                        job["prompt"] = ids
                        stats.prompt_tokens = len(ids)
                        pending[:] = [ids[i:i + chunk] for i in range(0, len(ids), chunk)]
                    elif kind == "token":
                        _, token, piece, position = event
                        commit_up_to(position)
                        if not generated:
                            stats.prefill_seconds = time.perf_counter() - start
                        generated.append(token)
                        pending.append([token])
                        if piece and on_token is not None:
                            on_token(piece)
                    elif kind == "snapshot":
                        _, position, nbytes = event
                        data_ref = next(stream)
                        commit_up_to(position)
                        rec.set_snapshot(data_ref, position, nbytes)
                        self._count(checkpoints=1)
                    elif kind == "done":
                        _, reason, position, text, tail = event
                        commit_up_to(position)
                        if tail and on_token is not None:
                            on_token(tail)
                        stats.stop_reason = reason
                        stats.generated_tokens = len(generated)
                        stats.token_ids = list(generated)
                        stats.decode_steps = max(0, len(generated) - 1)
                        stats.decode_seconds = time.perf_counter() - start - stats.prefill_seconds
                        self.last_generation = stats
                        self._count(generated_tokens=len(generated))
                        return text
                raise RuntimeError("the worker's generation ended without a result")
            except RayActorError as exc:
                self._on_worker_error(worker, exc)
                rec.dirty = True       # restored from the record, then the job resumes
            except RayTaskError as exc:
                cause = _task_cause(exc)
                if self._lost_by_worker(rec, worker, cause):
                    continue
                if started:            # failed mid-way: the worker's copy is past the record
                    rec.dirty = True
                raise cause from None
            except BaseException:
                # abandoned (on_token raised, Ctrl-C): the worker's copy is dropped, which
                # stops the job at its next step; the next use restores the sequence to what
                # the driver recorded
                rec.dirty = True
                if self._closed:       # shut down (by on_token, say): the worker is gone, and
                    raise RuntimeError("the Cluster was shut down during the generation") \
                        from None      # a call through Ray now would start a new Ray
                # not waited for (the worker may run it after the next call's restore):
                # the epoch makes it drop only the copy this job ran on
                handle.remove.remote(rec.seq, rec.epoch)
                raise

    def generate_many(self, prompts, max_new_tokens=64, *, threads=None, **options):
        """generate() of every prompt at once, each on its own sequence (placed by free KV
        memory), from `threads` driver threads (default: one per prompt, at most 64).
        Returns the texts in order."""
        if isinstance(prompts, (str, bytes, bytearray)):
            raise TypeError(f"generate_many takes a list of prompts, got one "
                            f"{type(prompts).__name__} (generate() takes one)")
        self._check_open()
        prompts = list(prompts)
        if not prompts:
            return []
        threads = threads or min(64, len(prompts))
        with ThreadPoolExecutor(threads, thread_name_prefix="ruvpy-generate") as pool:
            futures = [pool.submit(self.generate, p, max_new_tokens, **options)
                       for p in prompts]
            return [f.result() for f in futures]

    def tokenize(self, text, *, special=False):
        return self._any_worker(lambda h: h.tokenize.remote(text, special))

    def detokenize(self, ids, *, special=False):
        return self._any_worker(lambda h: h.detokenize.remote(list(ids), special))

    def _any_worker(self, submit):
        self._check_open()
        for index in self.live_workers():
            self._check_open()         # shut down meanwhile: no remote call (Ray may be down)
            try:
                return ray.get(submit(self._slots[index].handle))
            except RayActorError as exc:
                self._on_worker_error(index, exc)
            except RayTaskError as exc:
                raise _task_cause(exc) from None
        raise NoLiveWorkerError(self._no_worker_message())

    # -- statistics ------------------------------------------------------------------------------
    def _count(self, **amounts):
        with self._lock:
            self._counters.update(amounts)

    @property
    def counters(self):
        """What the cluster did since it started: forwarded_tokens, generated_tokens,
        checkpoints (snapshots kept), migrations, restores, worker_failures."""
        with self._lock:
            return {k: self._counters.get(k, 0) for k in
                    ("forwarded_tokens", "generated_tokens", "checkpoints", "migrations",
                     "restores", "worker_failures")}

    def stats(self):
        """Every worker's RuntimeStats as a dict (RuntimeStats.as_dict()), in worker order,
        with "worker", "state" and "node_id"; each kv sequence row has "cluster_seq". A
        worker that is not alive is {"worker", "state", "reason"}."""
        self._check_open()
        with self._lock:
            slots = list(self._slots)
            states = [(s.state, s.reason) for s in slots]
        refs = [s.handle.stats.remote() if st == ALIVE else None
                for s, (st, _) in zip(slots, states)]
        out = []
        for slot, (state, reason), ref in zip(slots, states, refs):
            entry = {"worker": slot.index, "state": state, "node_id": slot.info.get("node_id")}
            if ref is not None:
                try:
                    entry.update(ray.get(ref))
                except RayActorError as exc:
                    self._on_worker_error(slot.index, exc)
                    entry.update(state=RESTARTING, reason=_death_reason(exc))
            else:
                entry["reason"] = reason
            out.append(entry)
        return out

    def sequence_info(self, seq):
        """The driver's record of `seq`: worker, position, snapshot position and bytes,
        tokens since the snapshot, restores so far and what the last one took."""
        rec = self._record(seq)
        return {"seq": rec.seq, "worker": rec.worker, "position": rec.position,
                "snapshot_position": rec.snapshot_position, "snapshot_bytes": rec.snapshot_bytes,
                "since_snapshot": rec.since_snapshot(), "restores": rec.restores,
                "last_restore": rec.last_restore, "dirty": rec.dirty}

    # -- lifetime --------------------------------------------------------------------------------
    def shutdown(self):
        """Kill the workers and drop every snapshot; shuts Ray down if the Cluster started
        it. Idempotent. Calls in flight in other threads raise RuntimeError ("shut down");
        their workers' deaths are not reported as failures."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            records, self._records = list(self._records.values()), {}
        for rec in records:
            rec.removed = True
            rec.snapshot = None
        for slot in getattr(self, "_slots", []):
            try:
                ray.kill(slot.handle, no_restart=True)
            except Exception:          # already gone
                pass
        for slot in getattr(self, "_slots", []):
            if slot.watcher is not None:
                slot.watcher.join(timeout=30)
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()

    def close(self):
        """shutdown(): what `with Cluster(...) as cluster:` calls at the end."""
        self.shutdown()

    def __repr__(self):
        if self._closed:
            return "<ruvpy.distributed.Cluster: shut down>"
        states = collections.Counter(s for s, _ in self.worker_states())
        return (f"<ruvpy.distributed.Cluster {self.kv_cache} KV: {len(self._slots)} workers "
                f"({', '.join(f'{n} {s}' for s, n in states.items())}), "
                f"{len(self._records)} sequences, checkpoint every {self.checkpoint_every}>")
