"""GuessNumber: find a hidden number in [1, N] from "higher"/"lower" feedback."""

from __future__ import annotations

from hybrid_rl.envs.core import TextEnv, first_int
from hybrid_rl.envs.registry import int_arg, number_arg


class GuessNumber(TextEnv):
    """Find a hidden number in [1, N] from higher/lower feedback; fewer guesses score higher.

    Observations: "Guess a number between 1 and 16.", then "higher", "lower" or "correct".
    Actions: a number ("8"; the first number in the text counts).
    Reward: 1.0 for the right number, minus ``turn_penalty`` for every turn (so fewer turns is better).
    Expert: binary search over the interval the feedback so far allows; with noise, a random guess
    inside that interval (still consistent, just slower). Heuristic (``heuristic_action``): coarse then
    linear, steps of ``HEURISTIC_STEP`` (10, 20, 30, ... until "lower", then down by one): consistent with the
    feedback but slower than binary search (at n=100 it often runs out of turns).
    """

    instant_steps = True  # a pure game: the engine steps it on its own thread

    HEURISTIC_STEP = 10

    def __init__(self, n: int = 16, turn_penalty: float = 0.02, render_mode: str | None = None, expert_noise: float = 0.0):
        super().__init__(render_mode=render_mode, expert_noise=expert_noise)
        self.n = int_arg("GuessNumber", "n", n, minimum=2, note="(the range is [1, n])")
        self.turn_penalty = number_arg("GuessNumber", "turn_penalty", turn_penalty)
        self.target = 1
        self.low, self.high = 1, n  # the interval still consistent with the feedback

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.target = int(self.np_random.integers(1, self.n + 1))
        self.low, self.high = 1, self.n
        return self.observe(f"Guess a number between 1 and {self.n}.")

    def step_text(self, text: str):
        guess = first_int(text)
        if guess is None or not 1 <= guess <= self.n:
            what = "no number" if guess is None else f"{guess} is out of range"
            return self.invalid(f"{what}; answer with a number between 1 and {self.n}.")
        turn = {"turn": -self.turn_penalty}
        if guess == self.target:
            return self.result("correct", {"success": 1.0, **turn}, terminated=True, success=True)
        if guess < self.target:
            self.low = max(self.low, guess + 1)
            return self.result("higher", turn)
        self.high = min(self.high, guess - 1)
        return self.result("lower", turn)

    def state_key(self) -> str:
        """The interval the feedback so far allows ("51-75"): a "higher" is said from every interval, so the
        observation alone would pool turns taken from different states."""
        return f"{self.low}-{self.high}"

    def expert_action(self, noise: float | None = None) -> str:
        if self.wants_noise(noise):
            return str(int(self.expert_rng.integers(self.low, self.high + 1)))
        return str((self.low + self.high) // 2)

    def random_action(self) -> str:
        """Any number in [1, n], feedback ignored (the expert's noise guesses inside the consistent interval,
        which is far better than random)."""
        return str(int(self.expert_rng.integers(1, self.n + 1)))

    def heuristic_action(self, noise: float | None = None) -> str:
        """Coarse then linear: while no guess was too high, jump ``HEURISTIC_STEP`` past the last "higher"
        (10, 20, 30, ..., capped at n); after a "lower", walk down one at a time from the highest number
        still possible. Each guess depends only on the last guess and its feedback ("higher": +10,
        "lower": -1), so it is easy to imitate; it needs up to n/10 + 9 guesses where binary search needs
        log2(n). With ``noise``, a random guess inside the consistent interval, as the expert's noise.
        """
        if self.wants_noise(noise):
            return str(int(self.expert_rng.integers(self.low, self.high + 1)))
        if self.high < self.n:  # some guess was too high: linear search down
            return str(self.high)
        return str(min(self.low - 1 + self.HEURISTIC_STEP, self.high))
