"""Mastermind: find a hidden code of letters from per-guess exact/near feedback."""

from __future__ import annotations

import itertools
import re
from collections import Counter
from functools import lru_cache

import numpy as np

from hybrid_rl.envs.core import TextEnv, quote

__all__ = ["Mastermind", "score"]

LETTERS = "ABCDEFGH"
MINIMAX_BUDGET = 5_000_000  # table cells per expert move; beyond it the expert plays the first consistent code


def score(secret: str, guess: str) -> tuple[int, int]:
    """(exact, near): letters in the right place, and right letters in the wrong place."""
    exact = sum(s == g for s, g in zip(secret, guess))
    common = sum((Counter(secret) & Counter(guess)).values())
    return exact, common - exact


class Mastermind(TextEnv):
    """Crack a hidden code (default 3 letters from A-D) from exact/near feedback on each guess.

    Observation: "Find the 3-letter code, letters A-D." then "exact=1 near=1" after each guess
    (exact: right letter, right place; near: right letter, wrong place). Action: a code such as "ABD".
    Reward: 1.0 for cracking it, minus ``turn_penalty`` per guess. Expert: Knuth's minimax over the codes
    still consistent with the feedback (solves 4 colors x 3 pegs in at most 5 guesses).
    """

    instant_steps = True  # a pure game: the engine steps it on its own thread

    def __init__(self, colors: int = 4, pegs: int = 3, turn_penalty: float = 0.02,
                 render_mode: str | None = None, expert_noise: float = 0.0):
        super().__init__(render_mode=render_mode, expert_noise=expert_noise)
        if not 2 <= colors <= len(LETTERS) or not 1 <= pegs <= 6:
            raise ValueError(f"colors={colors}, pegs={pegs}: need 2 <= colors <= {len(LETTERS)} and 1 <= pegs <= 6.")
        self.letters, self.pegs, self.turn_penalty = LETTERS[:colors], pegs, turn_penalty
        self.codes = ["".join(c) for c in itertools.product(self.letters, repeat=pegs)]
        self.feedback = feedback_table(self.letters, pegs)  # [C, C] feedback id of (secret, guess)
        self.code_re = re.compile(rf"\b[{self.letters}]{{{pegs}}}\b")
        self.secret = self.codes[0]
        self.history: list[tuple[str, tuple[int, int]]] = []

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.secret = self.codes[int(self.np_random.integers(len(self.codes)))]
        self.history = []
        return self.observe(f"Find the {self.pegs}-letter code, letters {self.letters[0]}-{self.letters[-1]}.")

    def parse_guess(self, text: str) -> str | None:
        """"ABD", "abd", "A B D", "guess: ABD" -> "ABD"."""
        upper = text.upper()
        match = self.code_re.search(upper)
        if match:
            return match.group()
        squeezed = re.sub(r"[\s,;.\-]", "", upper)
        return squeezed if len(squeezed) == self.pegs and all(c in self.letters for c in squeezed) else None

    def step_text(self, text: str):
        guess = self.parse_guess(text)
        if guess is None:
            return self.invalid(f"{quote(text)} is not a code; guess {self.pegs} letters from {self.letters}, e.g. {self.codes[1]}.")
        exact, near = score(self.secret, guess)
        self.history.append((guess, (exact, near)))
        turn = {"turn": -self.turn_penalty}
        if exact == self.pegs:
            return self.result(f"exact={exact} solved", {"success": 1.0, **turn}, terminated=True, success=True)
        return self.result(f"exact={exact} near={near}", turn)

    def consistent_codes(self) -> np.ndarray:
        """Indices of the codes that would have given every feedback seen so far."""
        keep = np.ones(len(self.codes), dtype=bool)
        for guess, (exact, near) in self.history:
            keep &= self.feedback[:, self.codes.index(guess)] == exact * (self.pegs + 1) + near
        return np.flatnonzero(keep)

    def expert_action(self, noise: float | None = None) -> str:
        if self.wants_noise(noise):
            return self.codes[int(self.expert_rng.integers(len(self.codes)))]
        candidates = self.consistent_codes()
        if len(candidates) <= 2 or len(candidates) * len(self.codes) > MINIMAX_BUDGET:
            return self.codes[int(candidates[0])]
        worst = worst_case_sizes(self.feedback, candidates, n_feedback=(self.pegs + 1) ** 2)
        is_candidate = np.zeros(len(self.codes), dtype=bool)
        is_candidate[candidates] = True
        # smallest worst case first, then a guess that could win now, then the first code: np.lexsort's last key leads
        return self.codes[int(np.lexsort((np.arange(len(self.codes)), ~is_candidate, worst))[0])]


@lru_cache(maxsize=8)
def feedback_table(letters: str, pegs: int) -> np.ndarray:
    """``table[s, g] = exact * (pegs + 1) + near`` for every secret ``s`` and guess ``g`` (codes in product order)."""
    codes = np.array(list(itertools.product(range(len(letters)), repeat=pegs)))  # [C, P]
    exact = (codes[:, None, :] == codes[None, :, :]).sum(-1)  # [C, C]
    counts = np.stack([(codes == i).sum(1) for i in range(len(letters))], axis=1)  # [C, L]
    common = np.minimum(counts[:, None, :], counts[None, :, :]).sum(-1)  # [C, C]
    return exact * (pegs + 1) + (common - exact)


def worst_case_sizes(table: np.ndarray, candidates: np.ndarray, n_feedback: int) -> np.ndarray:
    """For every guess, the size of the largest group of candidates that would give it the same feedback."""
    fb = table[candidates, :].T  # [C guesses, K candidates]
    rows = np.arange(fb.shape[0])[:, None] * n_feedback
    counts = np.bincount((fb + rows).ravel(), minlength=fb.shape[0] * n_feedback).reshape(fb.shape[0], n_feedback)
    return counts.max(axis=1)
