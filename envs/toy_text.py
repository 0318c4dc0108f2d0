"""Text adapters over gymnasium's toy-text environments: the real env underneath, text on top.

Each adapter keeps gymnasium's environment as ``self.inner`` (its dynamics, its transition table),
renders its state as a short line or grid, and parses a move name leniently (the first known word
counts: "left", "I go left" -> left). Rewards are rescaled to hybrid-rl's convention (success 1.0,
a small per-turn penalty) and the inner reward is kept in ``info["gym_reward"]``.

Experts: for the grid worlds (FrozenLake, Taxi, CliffWalking) value iteration on the inner
environment's own transition table ``P`` gives the move with the best chance of reaching the goal
soonest (the shortest path when moves are deterministic). Blackjack's expert is basic strategy.

Heuristics (``heuristic_action``: weaker teachers whose mistakes are consistent, for SFT that RL can
improve on): FrozenLake and Taxi head greedily for their target by Manhattan distance, never into a
hole or a wall, with no lookahead and no memory, so they can go round in circles until the turn limit.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from gymnasium.envs.toy_text.blackjack import BlackjackEnv, sum_hand
from gymnasium.envs.toy_text.cliffwalking import CliffWalkingEnv
from gymnasium.envs.toy_text.frozen_lake import FrozenLakeEnv, is_valid
from gymnasium.envs.toy_text.taxi import TaxiEnv
from gymnasium.utils import seeding

from hybrid_rl.envs.core import TextEnv, first_word, quote
from hybrid_rl.envs.registry import bool_arg, int_arg, number_arg

__all__ = ["FrozenLake", "Taxi", "CliffWalking", "Blackjack", "best_actions"]


def best_actions(P: dict, is_goal, gamma: float = 0.9, sweeps: int = 500) -> np.ndarray:
    """Greedy action per state from value iteration on a toy-text transition table.

    ``P[s][a] = [(prob, next_state, reward, terminated), ...]``. Reaching a goal transition
    (``is_goal(next_state, reward, terminated)``) is worth 1, any other termination 0; ``gamma < 1``
    makes sooner better. Ties go to the lowest action index, so the expert is deterministic.
    """
    n_states, n_actions = len(P), len(P[0])
    value = np.zeros(n_states)
    for _ in range(sweeps):
        q = _q_values(P, value, is_goal, gamma, n_states, n_actions)
        new_value = q.max(axis=1)
        if np.abs(new_value - value).max() < 1e-12:
            break
        value = new_value
    return _q_values(P, value, is_goal, gamma, n_states, n_actions).argmax(axis=1)


def _q_values(P, value, is_goal, gamma, n_states, n_actions) -> np.ndarray:
    q = np.zeros((n_states, n_actions))  # [S, A]
    for s in range(n_states):
        for a in range(n_actions):
            for prob, s2, reward, terminated in P[s][a]:
                if terminated:
                    q[s, a] += prob * (1.0 if is_goal(s2, reward, terminated) else 0.0)
                else:
                    q[s, a] += prob * gamma * value[s2]
    return q


class GridAdapter(TextEnv):
    """Shared by the grid worlds: move parsing, the inner step, the value-iteration expert."""

    instant_steps = True  # a pure game: the engine steps it on its own thread

    MOVES: tuple[str, ...] = ()  # move names in the inner env's action order
    turn_penalty = 0.01

    def __init__(self, render_mode: str | None = None, expert_noise: float = 0.0):
        super().__init__(render_mode=render_mode, expert_noise=expert_noise)
        self.move_index = {name: i for i, name in enumerate(self.MOVES)}
        self.state = 0
        self.policy = np.zeros(1, dtype=int)

    def parse_move(self, text: str) -> int | None:
        return first_word(text, self.move_index)

    def step_text(self, text: str):
        move = self.parse_move(text)
        if move is None:
            return self.invalid(f"unknown move {quote(text)}; say one of: {' '.join(self.MOVES)}.")
        state, gym_reward, terminated, _, _ = self.inner.step(move)
        previous, self.state = self.state, int(state)
        obs, components, success = self.describe_move(previous, move, gym_reward, terminated)
        out = self.result(obs, components, terminated=terminated, success=success)
        out[4]["gym_reward"] = float(gym_reward)
        return out

    def expert_action(self, noise: float | None = None) -> str:
        if self.wants_noise(noise):
            return self.random_move()
        return self.MOVES[int(self.policy[self.state])]

    def random_move(self) -> str:
        return self.MOVES[int(self.expert_rng.integers(len(self.MOVES)))]

    def describe_move(self, previous: int, move: int, gym_reward: float, terminated: bool):
        """-> (observation, reward components, success)"""
        raise NotImplementedError


class FrozenLake(GridAdapter):
    """Cross a frozen lake to the goal G without falling into a hole H (a new solvable map per seed).

    Observation: the map with P for the player, e.g. after "Reach G, avoid H. Moves: left down right up.":
    ``PFFF/FHFH/FFFH/HFFG`` (one row per line). Actions: left, down, right, up.
    Options: ``size`` (4: 4x4), ``frozen_prob`` (share of frozen tiles in a random map, in (0, 1]), ``is_slippery``
    (False: moves do what they say; True: gymnasium's slippery ice, and the expert can no longer win always).
    The turn limit (20) fits 4x4 maps; for bigger ones pass ``max_episode_steps`` (e.g. 4 * size * size).
    """

    MOVES = ("left", "down", "right", "up")

    def __init__(self, size: int = 4, frozen_prob: float = 0.8, is_slippery: bool = False,
                 render_mode: str | None = None, expert_noise: float = 0.0):
        super().__init__(render_mode=render_mode, expert_noise=expert_noise)
        size = int_arg("FrozenLake", "size", size, minimum=2, note="(the map's side: at least 2x2 tiles)")
        # gymnasium's generate_random_map never returns at frozen_prob=0 (no map has a path), and this env is
        # stepped on the engine's own thread, where no timeout can stop it: refuse it here
        frozen_prob = number_arg("FrozenLake", "frozen_prob", frozen_prob, low=0, high=1, low_open=True,
                                 note="(the share of frozen tiles; at 0 no map with a path exists)")
        is_slippery = bool_arg("FrozenLake", "is_slippery", is_slippery)
        self.size, self.frozen_prob, self.is_slippery = size, frozen_prob, is_slippery
        self.solvable = not is_slippery
        self.inner = FrozenLakeEnv(desc=["SF", "FG"], is_slippery=is_slippery)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        map_seed = int(self.np_random.integers(2**31))
        self.desc = random_map(self.size, self.frozen_prob, map_seed)
        self.inner = FrozenLakeEnv(desc=self.desc, is_slippery=self.is_slippery)
        self.state = int(self.inner.reset(seed=map_seed)[0])
        self.policy = best_actions(self.inner.P, lambda s2, r, t: r > 0)
        return self.observe(f"Reach G, avoid H. Moves: {' '.join(self.MOVES)}.\n{self.grid()}")

    def heuristic_action(self, noise: float | None = None) -> str:
        """Myopic "head for the goal": the first move, in ``MOVES`` order (so down before right), that brings
        the player closer to G (Manhattan distance) without stepping into a hole or off the map; when no such
        move is safe, the first safe move in ``MOVES`` order. No lookahead and no memory: a hole pocket or a
        wall of holes makes it step back and forth until the turn limit (it never falls in a hole itself).
        On default 4x4 maps it succeeds on about 70% of seeds, the expert on all of them.
        """
        if self.wants_noise(noise):
            return self.random_move()
        size = self.size
        row, col = divmod(self.state, size)
        goal_row, goal_col = next((r, c) for r in range(size) for c in range(size) if self.desc[r][c] == "G")
        steps = {"left": (0, -1), "down": (1, 0), "right": (0, 1), "up": (-1, 0)}

        def safe(move: str) -> bool:
            r, c = row + steps[move][0], col + steps[move][1]
            return 0 <= r < size and 0 <= c < size and self.desc[r][c] != "H"

        def closer(move: str) -> bool:
            r, c = row + steps[move][0], col + steps[move][1]
            return abs(r - goal_row) + abs(c - goal_col) < abs(row - goal_row) + abs(col - goal_col)

        for candidates in ([m for m in self.MOVES if closer(m)], self.MOVES):
            for move in candidates:
                if safe(move):
                    return move
        return self.MOVES[0]  # boxed in by holes: every move loses

    def grid(self) -> str:
        rows = [list(row) for row in self.desc]
        r, c = divmod(self.state, self.size)
        rows[r][c] = "P"
        return "\n".join("".join(row) for row in rows)

    def describe_move(self, previous, move, gym_reward, terminated):
        turn = {"turn": -self.turn_penalty}
        if terminated and gym_reward > 0:
            return f"{self.grid()}\nYou reached the goal.", {"goal": 1.0, **turn}, True
        if terminated:
            return f"{self.grid()}\nYou fell into a hole.", turn, False
        return self.grid(), turn, False


MAP_DRAWS = 100_000  # a few seconds at 4x4; the default frozen_prob needs a handful of draws


def random_map(size: int, frozen_prob: float, seed: int, draws: int = MAP_DRAWS) -> list[str]:
    """gymnasium's ``generate_random_map`` (the same maps for the same seed), but with at most ``draws`` tries:
    gymnasium's draws until a map has a path, which at a small ``frozen_prob`` (or a big map well below the
    default) takes practically forever, on the engine's own thread where no timeout can stop it."""
    np_random, _ = seeding.np_random(seed)
    for _ in range(draws):
        board = np_random.choice(["F", "H"], (size, size), p=[frozen_prob, 1 - frozen_prob])
        board[0][0], board[-1][-1] = "S", "G"
        if is_valid(board, size):
            return ["".join(row) for row in board]
    raise ValueError(f"FrozenLake: no {size}x{size} map with a path from S to G in {draws} random maps at "
                     f"frozen_prob={frozen_prob}; raise frozen_prob (default 0.8) or lower size.")


class Taxi(GridAdapter):
    """Drive the taxi to the passenger, pick them up, drive to the destination and drop them off.

    Observation: "taxi=2,3 passenger=4,0 dest=4,3" (row,col on the 5x5 map; passenger=taxi once aboard).
    Actions: south, north, east, west, pickup, dropoff. Walls are gymnasium's Taxi map.
    """

    MOVES = ("south", "north", "east", "west", "pickup", "dropoff")
    illegal_penalty = 0.05

    def __init__(self, render_mode: str | None = None, expert_noise: float = 0.0):
        super().__init__(render_mode=render_mode, expert_noise=expert_noise)
        self.inner = TaxiEnv()
        self.policy = _taxi_policy()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.state = int(self.inner.reset(seed=int(self.np_random.integers(2**31)))[0])
        return self.observe(f"Pick up the passenger, drop them at dest. Moves: {' '.join(self.MOVES)}.\n{self.line()}")

    def heuristic_action(self, noise: float | None = None) -> str:
        """Greedy driver: pick up / drop off when at the target (the passenger, then the destination);
        otherwise the first move, east and west before south and north, that brings the taxi closer to the
        target (Manhattan distance) and is not into a wall; when every such move is walled, the first open
        move in ``MOVES`` order. It knows the walls but plans no detour around them and has no memory, so
        behind a wall it goes back and forth until the turn limit: it delivers on about half the seeds.
        """
        if self.wants_noise(noise):
            return self.random_move()
        row, col, passenger, dest = self.inner.decode(self.state)
        target = self.inner.locs[passenger] if passenger < 4 else self.inner.locs[dest]
        if (row, col) == target:
            return "pickup" if passenger < 4 else "dropoff"
        steps = {"east": (0, 1), "west": (0, -1), "south": (1, 0), "north": (-1, 0)}

        def open_(move: str) -> bool:  # moving into a wall (or off the map) leaves the taxi where it is
            return self.inner.P[self.state][self.move_index[move]][0][1] != self.state

        def closer(move: str) -> bool:
            r, c = row + steps[move][0], col + steps[move][1]
            return abs(r - target[0]) + abs(c - target[1]) < abs(row - target[0]) + abs(col - target[1])

        for move in steps:
            if closer(move) and open_(move):
                return move
        return next((m for m in self.MOVES[:4] if open_(m)), self.MOVES[0])

    def line(self) -> str:
        row, col, passenger, dest = self.inner.decode(self.state)
        where = "taxi" if passenger == 4 else "%d,%d" % self.inner.locs[passenger]
        return f"taxi={row},{col} passenger={where} dest=%d,%d" % self.inner.locs[dest]

    def describe_move(self, previous, move, gym_reward, terminated):
        turn = {"turn": -self.turn_penalty}
        if terminated:
            return "Passenger delivered.", {"success": 1.0, **turn}, True
        if gym_reward <= -10:  # gymnasium's penalty for a pickup/dropoff where there is none to do
            return f"{self.line()} illegal {self.MOVES[move]}", {**turn, "illegal": -self.illegal_penalty}, False
        return self.line(), turn, False


@lru_cache(maxsize=1)
def _taxi_policy() -> np.ndarray:
    return best_actions(TaxiEnv().P, lambda s2, r, t: t)  # Taxi terminates only on a delivery


class CliffWalking(GridAdapter):
    """Walk along a 4x12 grid from the start to the goal without stepping off the cliff between them.

    Observation: "at 2,5" (row,col). Stepping onto the cliff sends you back to the start.
    Actions: up, right, down, left.
    """

    MOVES = ("up", "right", "down", "left")
    cliff_penalty = 0.1

    def __init__(self, is_slippery: bool = False, render_mode: str | None = None, expert_noise: float = 0.0):
        super().__init__(render_mode=render_mode, expert_noise=expert_noise)
        self.is_slippery = is_slippery = bool_arg("CliffWalking", "is_slippery", is_slippery)
        self.solvable = not is_slippery
        self.inner = CliffWalkingEnv(is_slippery=is_slippery)
        self.policy = _cliff_policy(is_slippery)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.state = int(self.inner.reset(seed=int(self.np_random.integers(2**31)))[0])
        return self.observe(f"Walk from 3,0 to 3,11; row 3 between them is a cliff. Moves: {' '.join(self.MOVES)}.\n{self.position()}")

    def position(self) -> str:
        return "at %d,%d" % divmod(self.state, 12)

    def describe_move(self, previous, move, gym_reward, terminated):
        turn = {"turn": -self.turn_penalty}
        if terminated:
            return "at 3,11 goal reached.", {"success": 1.0, **turn}, True
        if gym_reward <= -100:
            return f"You fell off the cliff, back {self.position()}", {**turn, "cliff": -self.cliff_penalty}, False
        return self.position(), turn, False


@lru_cache(maxsize=2)
def _cliff_policy(is_slippery: bool) -> np.ndarray:
    return best_actions(CliffWalkingEnv(is_slippery=is_slippery).P, lambda s2, r, t: t)


class Blackjack(TextEnv):
    """Beat the dealer at Blackjack: hit or stick (a game of chance: even the expert loses often).

    Observation: "sum=14 dealer=10 ace=no" (your hand's total, the dealer's open card with ace=1,
    whether you hold an ace counted as 11). Actions: hit, stick ("stand" works too).
    Reward: gymnasium's +1 win, 0 draw, -1 loss. Expert: basic strategy for hit/stick.
    """

    instant_steps = True  # a pure game: the engine steps it on its own thread

    solvable = False
    ACTIONS = {"stick": 0, "stand": 0, "hit": 1}

    def __init__(self, natural: bool = False, sab: bool = False, render_mode: str | None = None, expert_noise: float = 0.0):
        super().__init__(render_mode=render_mode, expert_noise=expert_noise)
        natural, sab = bool_arg("Blackjack", "natural", natural), bool_arg("Blackjack", "sab", sab)
        self.inner = BlackjackEnv(natural=natural, sab=sab)
        self.hand = (0, 0, 0)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.hand = tuple(int(x) for x in self.inner.reset(seed=int(self.np_random.integers(2**31)))[0])
        return self.observe(f"Blackjack: say hit or stick.\n{self.line()}")

    def line(self) -> str:
        total, dealer, ace = self.hand
        return f"sum={total} dealer={dealer} ace={'yes' if ace else 'no'}"

    def step_text(self, text: str):
        action = first_word(text, self.ACTIONS)
        if action is None:
            return self.invalid(f"unknown action {quote(text)}; say hit or stick.")
        obs, gym_reward, terminated, _, _ = self.inner.step(action)
        self.hand = tuple(int(x) for x in obs)
        if not terminated:
            return self.result(self.line(), {})
        outcome = "you win" if gym_reward > 0 else "draw" if gym_reward == 0 else "you lose"
        dealer = sum_hand(self.inner.dealer) if action == 0 else None  # an ace counts 11 where it can
        detail = f"sum={self.hand[0]}" + (f" dealer has {dealer}" if dealer is not None else " bust")
        out = self.result(f"{detail}. {outcome}", {"outcome": float(gym_reward)}, terminated=True, success=gym_reward > 0)
        out[4]["gym_reward"] = float(gym_reward)
        return out

    def expert_action(self, noise: float | None = None) -> str:
        if self.wants_noise(noise):
            return ("stick", "hit")[int(self.expert_rng.integers(2))]
        return "hit" if basic_strategy_hits(*self.hand) else "stick"


def basic_strategy_hits(total: int, dealer: int, usable_ace: int) -> bool:
    """Hit-or-stick basic strategy (no doubling or splitting here); ``dealer`` is 1 for an ace."""
    if usable_ace:
        return total <= 17 or (total == 18 and dealer in (9, 10, 1))
    if total <= 11:
        return True
    if total == 12:
        return dealer not in (4, 5, 6)
    if total <= 16:
        return dealer not in (2, 3, 4, 5, 6)
    return False
