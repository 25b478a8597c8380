"""A step whose exit fails still ends: it is rolled back (unless it committed), its slot is
freed, the stepping thread's count restored, the first failure raised -- and the Runtime
stays usable. The failures: the arena closed by hand inside the step, a cache commit that
raises (an error, or Ctrl-C), a rollback that raises."""
import contextlib
import signal

import numpy as np
import pytest

import ruvpy
from ruvpy import Runtime, RuntimeConfig

SMALL = dict(num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, max_tokens=1024)
KINDS = {"paged": dict(kv_cache="paged"),
         "two-tier": dict(kv_cache="two-tier", cold="q4", hot_tokens=16, migration_batch=16)}


def qkv(rng, n):
    return (rng.standard_normal((n, 4, 16), dtype=np.float32),
            rng.standard_normal((n, 2, 16), dtype=np.float32),
            rng.standard_normal((n, 2, 16), dtype=np.float32))


def full_step(rt, seq, n, rng):
    with rt.step([seq], [n]) as step:
        for layer in range(3):
            step.attention(layer, *qkv(rng, n))


def state(rt, seq):
    return (rt.position(seq), [rt.seq_len(seq, layer) for layer in range(3)],
            [tuple(a.tobytes() for a in rt.get_kv(seq, layer)) for layer in range(3)])


@contextlib.contextmanager
def fed_runtime(kind, seed):
    """A runtime of `kind` whose one sequence holds 20 tokens: (runtime, sequence, rng, the
    sequence's state)."""
    rng = np.random.default_rng(seed)
    with Runtime(RuntimeConfig(**SMALL, threads=1, **KINDS[kind])) as rt:
        a = rt.add_sequence()
        full_step(rt, a, 20, rng)
        yield rt, a, rng, state(rt, a)


class Failing:
    """An object's stand-in whose `method` raises `error` once (then it is the object again);
    on a cache, the step plans it makes fail that way."""

    def __init__(self, target, method, error):
        self._target, self._method, self._error = target, method, error

    def __getattr__(self, name):
        attr = getattr(self._target, name)
        if name == self._method and self._error is not None:
            def failing(*args, **kwargs):
                error, self._error = self._error, None
                raise error
            return failing
        if name == "plan":                  # the step's commit / rollback go through its plan
            return lambda *args, **kwargs: Failing(attr(*args, **kwargs), self._method, self._error)
        return attr


@pytest.mark.parametrize("kind", list(KINDS))
def test_an_arena_closed_inside_a_step_rolls_it_back_and_heals(kind):
    rng = np.random.default_rng(0)
    previous = ruvpy.get_num_threads()
    with Runtime(RuntimeConfig(**SMALL, threads=1, **KINDS[kind])) as rt:
        a = rt.add_sequence()
        full_step(rt, a, 20, rng)
        before = state(rt, a)
        with pytest.raises(RuntimeError, match="closed"):
            with rt.step([a], [3]) as step:
                for layer in range(3):
                    step.attention(layer, *qkv(rng, 3))
                rt.arena.close()
        assert state(rt, a) == before                     # rolled back, not committed
        assert ruvpy.get_num_threads() == previous
        assert rt.stats().rollbacks == 1 and rt.stats().steps == 1
        full_step(rt, a, 2, rng)                          # usable: a fresh arena
        assert rt.position(a) == 22 and not rt.arena.closed
        rt.add_sequence()


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("error", [RuntimeError("commit failed"), KeyboardInterrupt()],
                         ids=["error", "ctrl-c"])
def test_a_commit_that_raises_rolls_back_and_frees_the_step(kind, error):
    rng = np.random.default_rng(1)
    with Runtime(RuntimeConfig(**SMALL, threads=1, **KINDS[kind])) as rt:
        a, b = rt.add_sequence(), rt.add_sequence()
        full_step(rt, a, 40, rng)
        before = state(rt, a), state(rt, b)
        cache = rt._cache
        rt._cache = Failing(cache, "commit", error)
        try:
            with pytest.raises(type(error)):
                with rt.step([a, b], [5, 2]) as step:
                    for layer in range(3):
                        step.attention(layer, *qkv(rng, 7))
        finally:
            rt._cache = cache
        assert (state(rt, a), state(rt, b)) == before
        assert not cache.in_transaction(a) and not cache.in_transaction(b)
        full_step(rt, b, 3, rng)                          # the step slot is free again
        assert rt.position(b) == 3


def test_a_rollback_that_raises_still_frees_the_step():
    rng = np.random.default_rng(2)
    previous = ruvpy.get_num_threads()
    with Runtime(RuntimeConfig(**SMALL, threads=1)) as rt:
        a = rt.add_sequence()
        cache = rt._cache
        rt._cache = Failing(cache, "rollback", RuntimeError("rollback failed"))
        try:
            with pytest.raises(RuntimeError, match="rollback failed"):
                with rt.step([a], [2]):
                    raise ValueError("the model failed")
        finally:
            rt._cache = cache
        assert ruvpy.get_num_threads() == previous
        assert cache.in_transaction(a)        # the rollback could not run ...
        full_step(rt, a, 2, rng)              # ... the next step finishes it first
        assert rt.position(a) == 2 and not cache.in_transaction(a)
        assert [rt.seq_len(a, layer) for layer in range(3)] == [2, 2, 2]


class Interrupting:
    """An object's stand-in whose `method` returns normally, then Ctrl-C arrives (SIGINT,
    handled by Python's default handler at its next chance): the moment where a
    KeyboardInterrupt inside the Runtime's bookkeeping used to leave the step slot taken, the
    KV transaction open, or tokens committed without their position."""

    def __init__(self, target, method):
        self._target, self._method = target, method

    def __getattr__(self, name):
        attr = getattr(self._target, name)
        if name == "plan":                  # the step's commit / rollback go through its plan
            def planned(*args, **kwargs):
                plan = Interrupting(attr(*args, **kwargs), self._method)
                if self._method == "plan":
                    signal.raise_signal(signal.SIGINT)
                return plan
            return planned
        if name == self._method:
            def interrupted(*args, **kwargs):
                result = attr(*args, **kwargs)
                signal.raise_signal(signal.SIGINT)
                return result
            return interrupted
        return attr


class OwnHandler:
    """A program's own SIGINT handler: it counts the calls, and raises KeyboardInterrupt like
    Python's default does (raises) or only records them (flag)."""

    def __init__(self, raises):
        self.raises, self.calls = raises, 0

    def __call__(self, signum, frame):
        self.calls += 1
        if self.raises:
            raise KeyboardInterrupt


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("method,body_fails", [("plan", False), ("commit", False), ("rollback", True)])
@pytest.mark.parametrize("handler", ["default", "own raising", "own flag"])
def test_ctrl_c_as_a_step_opens_or_ends_loses_nothing(kind, method, body_fails, handler):
    """Ctrl-C right after the KV cache planned (opened the transaction), committed or rolled
    back: the step ends whole -- rolled back, or committed with its position -- then the
    handler runs: Python's default raises KeyboardInterrupt, and so may a program's own (held
    the same way: before, it ran inside the bookkeeping, and 4 of these 6 failed with it), or
    it only records the Ctrl-C, and the step goes on as if none came. The next step runs.
    (Before the hold, 4 of the 6 failed with the default handler too: "another step is
    open", "already inside a transaction", or a position behind its tokens.)"""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    own = None if handler == "default" else OwnHandler(raises=handler == "own raising")
    with fed_runtime(kind, seed=3) as (rt, a, rng, before):
        cache = rt._cache
        rt._cache = Interrupting(cache, method)
        if own is not None:
            signal.signal(signal.SIGINT, own)
        try:
            expected = ValueError if handler == "own flag" and body_fails else (
                None if handler == "own flag" else KeyboardInterrupt)
            with pytest.raises(expected) if expected else contextlib.nullcontext():
                with rt.step([a], [3]) as step:
                    for layer in range(3):
                        step.attention(layer, *qkv(rng, 3))
                    if body_fails:
                        raise ValueError("the model failed")
        finally:
            rt._cache = cache
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if own is not None:
            assert own.calls == 1                         # run once, after the bookkeeping
        after = state(rt, a)
        if method == "commit" or (handler == "own flag" and not body_fails):
            assert after[0] == before[0] + 3 and after[1] == [23] * 3   # committed whole
        else:                                             # rolled back whole
            assert after == before
        assert not cache.in_transaction(a)
        full_step(rt, a, 2, rng)                          # the step slot is free again
        assert rt.position(a) == after[0] + 2 and [rt.seq_len(a, layer) for layer in range(3)] == [after[0] + 2] * 3

@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("change, method", [
    ("add", "add_sequence"), ("fork", "fork"), ("remove", "free"), ("truncate", "truncate"),
    ("import", "import_sequence"), ("reset", "free")])
def test_ctrl_c_right_after_a_sequence_change_in_the_cache_loses_nothing(kind, change, method):
    """Ctrl-C just as the KV cache returns from a sequence change: the runtime's record of it
    (positions) is made too, then KeyboardInterrupt. Before, it came in between: a fork or
    import left the cache holding a sequence the runtime did not know (its storage lost), a
    remove left the runtime listing one the cache had freed (nothing could use or remove it),
    a truncate left the position where it was. (Found by a SIGINT storm, 7 runs of 7.)"""
    with fed_runtime(kind, seed=7) as (rt, a, rng, before):
        data = rt.export_sequence(a)
        actions = {"add": rt.add_sequence, "fork": lambda: rt.fork_sequence(a),
                   "remove": lambda: rt.remove_sequence(a), "truncate": lambda: rt.truncate_sequence(a, 5),
                   "import": lambda: rt.import_sequence(data), "reset": rt.reset}
        cache = rt._cache
        rt._cache = Interrupting(cache, method)
        try:
            with pytest.raises(KeyboardInterrupt):
                actions[change]()
        finally:
            rt._cache = cache
        assert sorted(rt.sequences) == sorted(cache.sequences())        # the same sequences
        expected = {"add": 2, "fork": 2, "import": 2, "remove": 0, "truncate": 1, "reset": 0}[change]
        assert len(rt.sequences) == expected                             # the change whole
        for seq in rt.sequences:
            assert rt.position(seq) == rt.seq_len(seq) == (5 if change == "truncate" else rt.seq_len(seq))
        rt.add_sequence()                                                 # and it goes on
        if a in rt.sequences:
            full_step(rt, a, 2, rng)


@pytest.mark.parametrize("kind", list(KINDS))
def test_ctrl_c_at_the_very_start_of_step_exit_loses_nothing(kind, monkeypatch):
    """Ctrl-C handled at the first instruction of Step.__exit__ (Python runs a pending
    signal's handler when a function starts, before the hold can begin): none of __exit__
    runs and the step stays open. While code can still reach it (the traceback being
    handled) the runtime says "another step is open"; once the KeyboardInterrupt is handled
    nothing can, and the thread's next step rolls it back first: the sequence is where it was
    before it, and the next step runs. (Before, the runtime stayed unusable: found by a
    random-SIGINT storm under a program's own handler, once in about 430 interrupted
    steps.)"""
    from ruvpy.runtime import Step
    with fed_runtime(kind, seed=5) as (rt, a, rng, before):
        real_exit = Step.__exit__

        def interrupted_exit(self, *exc):
            monkeypatch.setattr(Step, "__exit__", real_exit)      # once
            raise KeyboardInterrupt

        monkeypatch.setattr(Step, "__exit__", interrupted_exit)
        try:
            with rt.step([a], [3]) as step:
                for layer in range(3):
                    step.attention(layer, *qkv(rng, 3))
            raise AssertionError("the interrupted __exit__ did not raise")
        except KeyboardInterrupt:
            with pytest.raises(RuntimeError, match="another step is open"):
                rt.step([a], [1]).__enter__()         # the orphan is still reachable here
        del step
        assert rt._step is not None                     # open, and now unreachable
        full_step(rt, a, 2, rng)                        # rolled back first, then this step
        after = state(rt, a)
        assert after[0] == before[0] + 2 and after[1] == [before[0] + 2] * 3
        assert not rt._cache.in_transaction(a)


@pytest.mark.parametrize("take_slot", [True, False])
def test_reclaiming_an_orphaned_step_takes_its_slot_only_when_asked(take_slot, monkeypatch):
    """The orphan of an interrupted Step.__exit__ (as above) is rolled back by whoever finds
    it; Step.__enter__ asks for the step slot it frees, a sequence change (_whole) does not
    (before, the reclaim always took the slot and _whole released it again). The step's
    owner is one fact: its Thread, the ident compared per layer derived from it."""
    import threading

    from ruvpy.runtime import Step
    with fed_runtime("paged", seed=7) as (rt, a, rng, before):
        real_exit = Step.__exit__

        def interrupted_exit(self, *exc):
            monkeypatch.setattr(Step, "__exit__", real_exit)      # once
            raise KeyboardInterrupt

        monkeypatch.setattr(Step, "__exit__", interrupted_exit)
        with pytest.raises(KeyboardInterrupt):
            with rt.step([a], [3]) as step:
                assert step._owner_thread is threading.current_thread()
                assert step._owner_ident == threading.get_ident()
                for layer in range(3):
                    step.attention(layer, *qkv(rng, 3))
        del step
        assert rt._reclaim_orphaned_step(take_slot=take_slot)
        assert rt._step is None and state(rt, a) == before
        assert rt._step_lock.locked() == take_slot
        if take_slot:
            rt._step_lock.release()
        full_step(rt, a, 2, rng)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("error", [SystemExit(3), KeyboardInterrupt(), GeneratorExit()])
def test_whatever_a_sigint_handler_raises_before_the_exit_hold_rolls_the_step_back(kind, error, monkeypatch):
    """A program's own SIGINT handler may raise anything (SystemExit from sys.exit, its own
    exception) when the signal lands in Step.__exit__ before its hold begins: the step is
    rolled back there and then, not left open for the thread's next step to find (while the
    step is still reachable, that next step was refused with "another step is open")."""
    from ruvpy.runtime import Step
    with fed_runtime(kind, seed=6) as (rt, a, rng, before):
        real_check = Step._check_thread

        def interrupted_check(self, what):
            monkeypatch.setattr(Step, "_check_thread", real_check)   # once
            raise error

        with pytest.raises(type(error)):
            with rt.step([a], [3]) as step:
                for layer in range(3):
                    step.attention(layer, *qkv(rng, 3))
                monkeypatch.setattr(Step, "_check_thread", interrupted_check)   # __exit__'s
        assert rt._step is None and state(rt, a) == before   # rolled back whole, still reachable
        assert not rt._cache.in_transaction(a)
        full_step(rt, a, 2, rng)                             # the slot is free
        assert rt.position(a) == before[0] + 2
        assert step is not None
