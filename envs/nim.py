"""Nim: take 1-3 stones from one pile, turn about with an opponent; whoever takes the last stone wins."""

from __future__ import annotations

from hybrid_rl.envs.core import TextEnv, first_int

__all__ = ["Nim"]


class Nim(TextEnv):
    """Take 1, 2 or 3 stones a turn from one pile against the environment's opponent; the last stone wins.

    Observation: "17 stones. Take 1, 2 or 3 each turn; whoever takes the last stone wins.", then after each
    of your moves the opponent's reply, "I take 2: 12 left.", and at the end "You took the last stone: you
    win." or "I take the last 3: you lose."
    Action: a number of stones ("2"; the first number in the text counts); more than 3, fewer than 1 or more
    than the pile is invalid (nothing is taken).
    A new pile per seed: ``min_stones`` to ``max_stones``, never a multiple of 4, so the first player (you)
    can always win: leave the opponent a multiple of 4 every turn (take ``pile % 4``). The opponent plays that
    rule too, with probability ``opponent_skill`` each turn, else it takes 1-3 at random (and always at random
    when handed a multiple of 4, where it has no winning move). A move that leaves it anything but a multiple
    of 4 hands it the win when it plays well; only perfect play wins every game.
    Reward: ``success`` 1.0 for the last stone, ``turn`` -``turn_penalty`` per move, ``invalid`` -0.05.
    Expert: ``pile % 4``. Heuristic (``heuristic_action``): one move of lookahead (win now if you can, leave
    4 stones if you can, never leave 1-3): it wins from 5-7 stones; from the bigger piles it starts on it sees
    no winning move and guesses 1-3. Teacher settings (the game does not depend on them):
    ``heuristic_lookahead`` (the heuristic knows that 4, 8, ... ``4 * heuristic_lookahead`` stones lose) and
    ``heuristic_guess`` (False: take 3 instead of guessing, the heuristic before docs/RESULTS.md's Nim runs; its
    demonstrations never depend on a pile above 7, and no RL run of the micro model got past them).
    """

    instant_steps = True  # a pure game: the engine steps it on its own thread

    def __init__(self, min_stones: int = 9, max_stones: int = 23, opponent_skill: float = 0.7, turn_penalty: float = 0.01,
                 render_mode: str | None = None, expert_noise: float = 0.0, heuristic_lookahead: int = 1,
                 heuristic_guess: bool = True):
        super().__init__(render_mode=render_mode, expert_noise=expert_noise)
        if not 1 <= min_stones <= max_stones:
            raise ValueError(f"min_stones={min_stones}, max_stones={max_stones}: need 1 <= min_stones <= max_stones.")
        if all(n % 4 == 0 for n in range(min_stones, max_stones + 1)):
            raise ValueError(f"stones {min_stones}-{max_stones} are all multiples of 4: the first player could never "
                             "force a win; widen the range (e.g. min_stones=9, max_stones=23).")
        if not 0.0 <= opponent_skill <= 1.0:
            raise ValueError(f"opponent_skill={opponent_skill} must be a probability in [0, 1].")
        self.min_stones, self.max_stones, self.turn_penalty = min_stones, max_stones, turn_penalty
        if isinstance(heuristic_lookahead, bool) or not isinstance(heuristic_lookahead, int) or heuristic_lookahead < 1:
            raise ValueError(f"heuristic_lookahead={heuristic_lookahead!r}: the heuristic looks a whole number of moves "
                             "ahead, at least 1 (1: it knows 4 stones lose; 2: 4 and 8).")
        if not isinstance(heuristic_guess, bool):
            raise ValueError(f"heuristic_guess={heuristic_guess!r} must be true or false (false: take 3 where the "
                             "heuristic sees no winning move).")
        self.opponent_skill, self.heuristic_lookahead = opponent_skill, heuristic_lookahead
        self.heuristic_guess = heuristic_guess
        self.pile = min_stones

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        starts = [n for n in range(self.min_stones, self.max_stones + 1) if n % 4]
        self.pile = starts[int(self.np_random.integers(len(starts)))]
        return self.observe(f"{self.pile} stones. Take 1, 2 or 3 each turn; whoever takes the last stone wins.")

    def step_text(self, text: str):
        take = first_int(text)
        if take is None or not 1 <= take <= min(3, self.pile):
            what = "no number" if take is None else f"{take} stones cannot be taken"
            return self.invalid(f"{what}; take 1, 2 or 3 (at most {self.pile}, the stones left).")
        turn = {"turn": -self.turn_penalty}
        self.pile -= take
        if self.pile == 0:
            return self.result("You took the last stone: you win.", {"success": 1.0, **turn}, terminated=True, success=True)
        random_reply = int(self.np_random.integers(1, min(3, self.pile) + 1))  # drawn every turn: one stream
        skilled = self.np_random.random() < self.opponent_skill
        reply = (self.pile % 4 if skilled else 0) or random_reply
        self.pile -= reply
        if self.pile == 0:
            return self.result(f"I take the last {reply}: you lose.", turn, terminated=True)
        return self.result(f"I take {reply}: {self.pile} left.", turn)

    def expert_action(self, noise: float | None = None) -> str:
        if self.wants_noise(noise):
            return self.random_action()
        return str(self.pile % 4 or 1)  # a multiple of 4 (only after a mistake): every move loses, take 1

    def heuristic_action(self, noise: float | None = None) -> str:
        """Lookahead of ``heuristic_lookahead`` moves: it knows that 4, 8, ... ``4 * heuristic_lookahead`` stones
        lose for the player to move, and leaves the opponent one of them when it can; else it takes the whole pile
        when 3 or fewer are left (a win now); else it sees no winning move and guesses among the moves that do
        not leave 1-3 stones (1-3 from the big piles; with ``heuristic_guess=False`` it takes the most of them,
        3). With lookahead 1 it is right from 5-7 stones and guesses from 8 up, where the right move is
        ``pile % 4``; each more move of lookahead makes it right on four more piles. With ``noise``, a random move."""
        if self.wants_noise(noise):
            return self.random_action()
        for k in (1, 2, 3):
            if k < self.pile and (self.pile - k) % 4 == 0 and self.pile - k <= 4 * self.heuristic_lookahead:
                return str(k)
        if self.pile <= 3:
            return str(self.pile)
        safe = [k for k in (1, 2, 3) if self.pile - k >= 4]
        if self.heuristic_guess and safe:
            return str(safe[int(self.expert_rng.integers(len(safe)))])
        return str(max(safe, default=1))  # 4 left: every move loses

    def random_action(self) -> str:
        return str(int(self.expert_rng.integers(1, min(3, self.pile) + 1)))
