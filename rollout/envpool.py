"""Environment instances for the engine: made once, reused across episodes, called with a time limit.

Env calls run on reused daemon threads. An environment that raises or outlives ``timeout_s`` is dropped
(a hung one keeps its thread; we cannot kill a thread, only stop waiting for it) and the episode is marked
``env_error`` / ``timeout``. An environment that declares its calls instant (``instant_steps``, see
``steps_instantly``) is called on the caller's thread instead: no hand-off to a worker and back.
"""

from __future__ import annotations

import functools
import importlib
import os
import queue
import threading
import time
import traceback
from collections import defaultdict
from typing import Any, Callable


class EnvTimeout(Exception):
    pass


class EnvFailure(Exception):
    """An env call raised; ``str()`` is the one-line cause, ``.trace`` the traceback."""

    def __init__(self, message: str, trace: str = ""):
        super().__init__(message)
        self.trace = trace


def make_env(env_id: str, **kwargs):
    """``envs.make`` (the project's registry, with did-you-mean); ``module:id`` imports ``module`` first.

    Only a ':' before the arguments ``(...)`` separates a module (``envs.registry.split_args`` parses them off):
    ``Dataset-v0(path=/data/x:1/q.jsonl)`` is an id with an argument, not the module ``Dataset-v0(path=/data/x``."""
    try:
        from hybrid_rl import envs
        from hybrid_rl.envs.registry import split_args

        maker = getattr(envs, "make", None)
    except ImportError:
        maker, split_args = None, None
    base = split_args(env_id)[0] if split_args is not None else env_id.partition("(")[0]
    if ":" in base:
        module, _, env_id = env_id.partition(":")  # the first ':' is in ``base``: before any argument
        importlib.import_module(module)
    if maker is None:
        import gymnasium

        maker = gymnasium.make
    return maker(env_id, **kwargs)


class _Workers:
    """Daemon threads that run env calls and are reused: starting a thread per call cost the engine ~1 ms
    per env step (~6% of a rollout of an instant env). Every submitted call gets a worker at once: idle
    workers are reserved for it and the missing ones started, so calls never queue behind one another. A
    call that hangs keeps its worker (we cannot kill a thread), which then never counts as idle again."""

    def __init__(self):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # workers waiting for a task and not reserved for one already queued

    def submit(self, tasks: list[Callable[[], None]]) -> None:
        with self._lock:
            reuse = min(self._idle, len(tasks))
            self._idle -= reuse
        for _ in range(len(tasks) - reuse):
            threading.Thread(target=self._loop, daemon=True, name="env-call").start()
        for task in tasks:
            self._tasks.put(task)

    def _loop(self) -> None:
        while True:
            task = self._tasks.get()
            task()  # never raises: EnvCalls._run keeps the error
            with self._lock:
                self._idle += 1


_workers: tuple[int, _Workers] | None = None


def _shared_workers() -> _Workers:
    """The process's workers (a forked child gets its own: it inherits the object, not the threads)."""
    global _workers
    if _workers is None or _workers[0] != os.getpid():
        _workers = (os.getpid(), _Workers())
    return _workers[1]


def steps_instantly(env) -> bool:
    """Whether ``env`` declares that its ``reset`` and ``step`` return at once and never block: an
    ``instant_steps`` attribute (or property) that is true on the unwrapped environment. Pure computations
    (board games, puzzles, arithmetic) can; anything that waits on a process, a server or a clock should
    not. Such calls run on the caller's thread, where a hand-off to a worker thread and back costs more
    than the step itself (~1 ms per step on a busy 2-core VM, ~8% of a multi-turn rollout), and where no
    timeout can stop them."""
    return bool(getattr(getattr(env, "unwrapped", env), "instant_steps", False))


class EnvCalls:
    """Env calls started now on worker threads, so that the caller works while they run (the engine
    decodes the other rows while the environment of a row whose turn ended steps). ``results(timeout_s)``
    waits for them: all share one deadline ``timeout_s`` from the start (0 = wait for all); each result is
    the call's value, or the EnvFailure / EnvTimeout it ended with. ``finished`` asks without waiting, and
    ``on_done`` is told of each call that ends. ``inline``: the calls run here and now, on the caller's
    thread, before the constructor returns (for environments that ``steps_instantly``); their results and
    errors come back the same way, but no timeout applies to them."""

    def __init__(self, fns: list[Callable[[], Any]], on_done: Callable[[], None] | None = None, inline: bool = False):
        self._boxes: list[dict[str, Any]] = [{} for _ in fns]
        self._done = threading.Condition()
        self._left = len(fns)
        self._on_done = on_done  # called (on the worker thread, or here when inline) after each call ends
        self._started = time.monotonic()
        calls = [functools.partial(self._run, fn, box, inline) for fn, box in zip(fns, self._boxes)]
        if inline:
            for call in calls:
                call()
        elif calls:
            _shared_workers().submit(calls)

    def _run(self, fn, box, inline: bool = False) -> None:
        result: dict[str, Any] = {}
        try:
            result["value"] = fn()
        except BaseException as err:  # noqa: BLE001
            if inline and isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise  # on the caller's thread: Ctrl-C and exit stop the caller, as anywhere else
            result["error"], result["trace"] = err, traceback.format_exc()
        with self._done:
            box.update(result, done=True)
            self._left -= 1
            if not self._left:
                self._done.notify_all()
        if self._on_done is not None:
            self._on_done()

    def finished(self, timeout_s: float) -> bool:
        """Whether ``results(timeout_s)`` would return at once: every call has ended, or the deadline passed."""
        with self._done:
            return not self._left or self.time_left(timeout_s) <= 0

    def time_left(self, timeout_s: float) -> float:
        """Seconds to the deadline ``timeout_s`` after the start (infinite when ``timeout_s`` is 0)."""
        return self._started + timeout_s - time.monotonic() if timeout_s else float("inf")

    def results(self, timeout_s: float) -> list[Any]:
        with self._done:
            if timeout_s:
                deadline = self._started + timeout_s
                while self._left and (left_s := deadline - time.monotonic()) > 0:
                    self._done.wait(left_s)
            else:
                while self._left:
                    self._done.wait()
            boxes = [dict(box) for box in self._boxes]  # a late answer after the deadline changes nothing here
        out: list[Any] = []
        for box in boxes:
            if "done" not in box:
                out.append(EnvTimeout(f"no answer within {timeout_s:g} s"))
            elif "error" in box:
                err = box["error"]
                failure = EnvFailure(f"{type(err).__name__}: {err}", box["trace"])
                failure.__cause__ = err
                out.append(failure)
            else:
                out.append(box["value"])
        return out


class EnvPool:
    """Idle environment instances by (env id, kwargs); ``acquire`` makes one when none is idle."""

    def __init__(self):
        self._idle: dict[tuple, list] = defaultdict(list)

    @staticmethod
    def _key(env_id: str, kwargs: dict) -> tuple:
        return env_id, tuple(sorted((k, repr(v)) for k, v in kwargs.items()))

    def acquire(self, env_id: str, kwargs: dict | None = None):
        kwargs = kwargs or {}
        idle = self._idle[self._key(env_id, kwargs)]
        return idle.pop() if idle else make_env(env_id, **kwargs)

    def release(self, env_id: str, kwargs: dict | None, env) -> None:
        self._idle[self._key(env_id, kwargs or {})].append(env)

    @staticmethod
    def discard(env) -> None:
        """Drop a broken env; close it in the background (a hung env may hang in close too)."""
        threading.Thread(target=_quiet_close, args=(env,), daemon=True).start()

    def close(self, timeout_s: float | None = None) -> None:
        """Close every idle env, one after another on a thread of their own, waiting at most ``timeout_s``
        (``CLOSE_TIMEOUT_S``): an env whose close hangs is left to it (warned) rather than holding the caller
        (an eval or a run that has its results)."""
        envs = [env for idle in self._idle.values() for env in idle]
        self._idle.clear()
        if not envs:
            return
        closer = threading.Thread(target=lambda: [_quiet_close(env) for env in envs], name="env close", daemon=True)
        closer.start()
        closer.join(CLOSE_TIMEOUT_S if timeout_s is None else timeout_s)
        if closer.is_alive():
            import logging

            logging.getLogger("hybrid_rl.rollout").warning(
                "the environments did not all close within %g s (an env's close() hangs: %s); left to close in the "
                "background", CLOSE_TIMEOUT_S if timeout_s is None else timeout_s,
                ", ".join(sorted({type(getattr(env, "unwrapped", env)).__name__ for env in envs})))

    def __len__(self) -> int:
        return sum(len(v) for v in self._idle.values())


CLOSE_TIMEOUT_S = 10.0  # how long EnvPool.close waits for the envs' close() calls


def _quiet_close(env) -> None:
    try:
        env.close()
    except Exception:  # noqa: BLE001
        pass
