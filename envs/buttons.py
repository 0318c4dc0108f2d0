"""Buttons: reach a target number from a start number with two keys, "+a" and "*b"."""

from __future__ import annotations

import re

import numpy as np

from hybrid_rl.envs.core import TextEnv, first_int, quote

__all__ = ["Buttons", "presses_to"]

KEY_RE = re.compile(r"([+*])\s*(-?\d+)?")


def presses_to(target: int, add: int, mul: int) -> np.ndarray:
    """``dist[x]``: the fewest presses from ``x`` (0 <= x <= target) to ``target``; -1 where it cannot be reached.

    Both keys only ever increase a positive number, so a value past the target is lost, and the table is
    filled from the target down.
    """
    dist = np.full(target + 1, -1, dtype=np.int64)
    dist[target] = 0
    for x in range(target - 1, 0, -1):
        best = [int(dist[y]) for y in (x + add, x * mul) if y <= target and dist[y] >= 0]
        dist[x] = 1 + min(best) if best else -1
    return dist


def presses_from(start: int, add: int, mul: int, limit: int) -> dict[int, int]:
    """The fewest presses from ``start`` to every number up to ``limit`` it can reach (BFS)."""
    dist, queue = {start: 0}, [start]
    for x in queue:
        for y in (x + add, x * mul):
            if y <= limit and y not in dist:
                dist[y] = dist[x] + 1
                queue.append(y)
    return dist


class Buttons(TextEnv):
    """Reach a target number from a start with two keys, +a and *b (past the target is lost).

    Observation: "Reach 23 from 1. Keys: +3 *2", then "now 4" after each press, and at the end "23 reached"
    or "25 is past 23, lost" (both keys only increase the number, so passing the target ends the episode).
    Action: a key, "+3" or "*2" (the first "+" or "*" in the text counts; a number after it must be the
    key's). A new puzzle per seed: start in 1-9, +a with a in 2-9, *b with b in 2-3, and a target up to
    ``max_target`` whose shortest solution takes ``min_presses`` to ``max_presses`` presses (drawn uniformly
    among those targets). Reward: 1.0 on the target, minus ``turn_penalty`` per press.
    Expert: the shortest path (a distance table from the target down). Heuristic (``heuristic_action``):
    greedy, the biggest step that does not pass the target (multiply first), which often multiplies too early
    and is left with a gap the +a key cannot fill exactly.
    """

    instant_steps = True  # a pure game: the engine steps it on its own thread

    START = (1, 9)  # inclusive ranges the puzzles are drawn from
    ADD = (2, 9)
    MUL = (2, 3)

    def __init__(self, max_target: int = 99, min_presses: int = 3, max_presses: int = 8, turn_penalty: float = 0.02,
                 render_mode: str | None = None, expert_noise: float = 0.0):
        super().__init__(render_mode=render_mode, expert_noise=expert_noise)
        if not 1 <= min_presses <= max_presses:
            raise ValueError(f"min_presses={min_presses}, max_presses={max_presses}: need 1 <= min_presses <= max_presses.")
        self.max_target, self.min_presses, self.max_presses = max_target, min_presses, max_presses
        self.turn_penalty = turn_penalty
        # every (start, add, mul) with at least one target at the wanted distance, and those targets
        self.puzzles: list[tuple[int, int, int, list[int]]] = []
        for start in range(self.START[0], self.START[1] + 1):
            for add in range(self.ADD[0], self.ADD[1] + 1):
                for mul in range(self.MUL[0], self.MUL[1] + 1):
                    reach = presses_from(start, add, mul, max_target)
                    targets = sorted(t for t, d in reach.items() if min_presses <= d <= max_presses)
                    if targets:
                        self.puzzles.append((start, add, mul, targets))
        if not self.puzzles:
            raise ValueError(f"no puzzle has a target <= max_target={max_target} that takes {min_presses} to "
                             f"{max_presses} presses; raise max_target or max_presses.")
        self.start, self.add, self.mul, self.target = 1, 2, 2, 4
        self.value = 1
        self.dist = presses_to(self.target, self.add, self.mul)

    @property
    def keys(self) -> tuple[str, str]:
        return f"+{self.add}", f"*{self.mul}"

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        start, add, mul, targets = self.puzzles[int(self.np_random.integers(len(self.puzzles)))]
        self.start, self.add, self.mul = start, add, mul
        self.target = int(targets[int(self.np_random.integers(len(targets)))])
        self.value = start
        self.dist = presses_to(self.target, add, mul)
        return self.observe(f"Reach {self.target} from {start}. Keys: {' '.join(self.keys)}")

    def parse_key(self, text: str) -> str | None:
        """"+3", "press +3", "* 2", "+" -> "+" or "*"; None when there is no key or its number is wrong."""
        match = KEY_RE.search(text)
        if match is None:
            return None
        op, number = match.group(1), match.group(2)
        if number is not None and first_int(number) != (self.add if op == "+" else self.mul):
            return None
        return op

    def step_text(self, text: str):
        op = self.parse_key(text)
        if op is None:
            return self.invalid(f"{quote(text, 12)} is no key; press {' or '.join(self.keys)}.")
        self.value = self.value + self.add if op == "+" else self.value * self.mul
        turn = {"turn": -self.turn_penalty}
        if self.value == self.target:
            return self.result(f"{self.target} reached", {"success": 1.0, **turn}, terminated=True, success=True)
        if self.value > self.target:
            return self.result(f"{self.value} is past {self.target}, lost", turn, terminated=True)
        return self.result(f"now {self.value}", turn)

    def _next(self, op: str) -> int:
        return self.value + self.add if op == "+" else self.value * self.mul

    def random_key(self) -> str:
        return self.keys[int(self.expert_rng.integers(2))]

    def expert_action(self, noise: float | None = None) -> str:
        """A key on a shortest path ("+" first on ties); from a number the target cannot be reached from
        any more (after a bad press), the key that stays at or below the target, else "+"."""
        if self.wants_noise(noise):
            return self.random_key()
        here = int(self.dist[self.value]) if self.value <= self.target else -1
        for op, key in zip("+*", self.keys):
            nxt = self._next(op)
            if nxt <= self.target and (here < 0 or self.dist[nxt] == here - 1):
                return key
        return self.keys[0]

    def heuristic_action(self, noise: float | None = None) -> str:
        """Greedy: "*b" whenever the product does not pass the target, else "+a". It takes the biggest step
        that is still safe and looks no further, so it multiplies too early and is often left with a gap that
        is not a multiple of a: the next "+a" passes the target and the episode is lost. It depends only on
        the current number, the target and b (easy to imitate). With ``noise``, a random key."""
        if self.wants_noise(noise):
            return self.random_key()
        return self.keys[1] if self._next("*") <= self.target else self.keys[0]

    def random_action(self) -> str:
        """Either key, at random."""
        return self.random_key()
