"""Environment instances for the engine: made once, reused across episodes, called with a time limit.

An environment that raises or outlives ``timeout_s`` is dropped (a hung one keeps its daemon thread; we
cannot kill a thread, only stop waiting for it) and the episode is marked ``env_error`` / ``timeout``.
"""

from __future__ import annotations

import importlib
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
    """``envs.make`` (the project's registry, with did-you-mean); ``module:id`` imports ``module`` first."""
    if ":" in env_id:
        module, _, env_id = env_id.partition(":")
        importlib.import_module(module)
    try:
        from hybrid_rl import envs

        maker = getattr(envs, "make", None)
    except ImportError:
        maker = None
    if maker is None:
        import gymnasium

        maker = gymnasium.make
    return maker(env_id, **kwargs)


def call_with_timeout(fn: Callable[[], Any], timeout_s: float) -> Any:
    """Run ``fn()``; raise EnvTimeout after ``timeout_s`` (0 = wait forever) and EnvFailure if it raised."""
    if not timeout_s:
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - an env's own error becomes the episode's status
            raise EnvFailure(f"{type(err).__name__}: {err}", traceback.format_exc()) from err
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001
            box["error"], box["trace"] = err, traceback.format_exc()

    thread = threading.Thread(target=target, daemon=True, name="env-call")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise EnvTimeout(f"no answer within {timeout_s:g} s")
    if "error" in box:
        err = box["error"]
        raise EnvFailure(f"{type(err).__name__}: {err}", box["trace"]) from err
    return box["value"]


class EnvCalls:
    """Env calls started now, each in its own daemon thread, so that the caller works while they run
    (the engine decodes the batch while the environments of the rows whose turn ended step).
    ``results(timeout_s)`` waits for them: all share one deadline ``timeout_s`` from the start (0 = wait
    for all); each result is the call's value, or the EnvFailure / EnvTimeout it ended with."""

    def __init__(self, fns: list[Callable[[], Any]]):
        self._boxes: list[dict[str, Any]] = [{} for _ in fns]
        self._threads = [threading.Thread(target=self._run, args=(fn, box), daemon=True, name="env-call")
                         for fn, box in zip(fns, self._boxes)]
        self._started = time.monotonic()
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _run(fn, box):
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001
            box["error"], box["trace"] = err, traceback.format_exc()

    def results(self, timeout_s: float) -> list[Any]:
        deadline = self._started + timeout_s
        out: list[Any] = []
        for thread, box in zip(self._threads, self._boxes):
            thread.join(max(deadline - time.monotonic(), 0.0) if timeout_s else None)
            if thread.is_alive():
                out.append(EnvTimeout(f"no answer within {timeout_s:g} s"))
            elif "error" in box:
                err = box["error"]
                out.append(EnvFailure(f"{type(err).__name__}: {err}", box["trace"]))
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

    def close(self) -> None:
        for envs in self._idle.values():
            for env in envs:
                _quiet_close(env)
        self._idle.clear()

    def __len__(self) -> int:
        return sum(len(v) for v in self._idle.values())


def _quiet_close(env) -> None:
    try:
        env.close()
    except Exception:  # noqa: BLE001
        pass
