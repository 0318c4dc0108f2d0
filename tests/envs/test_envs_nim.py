"""Nim-v0: take 1-3 stones against an opponent, the last stone wins. Rules, opponent, teachers, bad input."""

import pytest

from hybrid_rl import envs

ENV_ID = "hybrid_rl/Nim-v0"


def _play(policy: str, n: int = 200, **kwargs):
    """(success rate, mean moves, invalid moves) of a teacher on the first n train seeds."""
    wins = moves = invalid = 0
    for seed in envs.seeds(ENV_ID, "train", n):
        env = envs.make(ENV_ID, **kwargs)
        env.reset(seed=seed)
        game = env.unwrapped
        while True:
            action = {"expert": game.expert_action, "heuristic": game.heuristic_action, "random": game.random_action}[policy]()
            _, _, terminated, truncated, info = env.step(action)
            moves += 1
            invalid += info["invalid_action"]
            if terminated or truncated:
                break
        wins += info["success"]
    return wins / n, moves / n, invalid


def test_nim_passes_the_check_and_is_listed(check_and_list):
    row = check_and_list(ENV_ID)
    assert row.split()[1] == "12" and "last stone" in row


def test_nim_rules_opponent_and_rewards():
    env = envs.make(ENV_ID, opponent_skill=1.0)
    obs, _ = env.reset(seed=0)
    game = env.unwrapped
    assert obs == f"{game.pile} stones. Take 1, 2 or 3 each turn; whoever takes the last stone wins."
    game.pile = 9
    obs, reward, terminated, _, info = env.step("1")  # 8 left: a multiple of 4, the opponent can only guess
    assert not terminated and info["reward_components"] == {"turn": -0.01} and reward == pytest.approx(-0.01)
    took = 8 - game.pile
    assert obs == f"I take {took}: {game.pile} left." and 1 <= took <= 3
    game.pile = 6
    obs, *_ = env.step("1")  # 5 left: a skilled opponent takes 1 and hands back a multiple of 4
    assert obs == "I take 1: 4 left." and game.pile == 4
    obs, reward, terminated, _, info = env.step("3")  # 1 left: the opponent takes it
    assert obs == "I take the last 1: you lose." and terminated and not info["success"]
    env.reset(seed=0)
    game.pile = 3
    obs, reward, terminated, _, info = env.step("I take 3")
    assert obs == "You took the last stone: you win." and terminated and info["success"]
    assert info["reward_components"] == {"success": 1.0, "turn": -0.01} and reward == pytest.approx(0.99)


@pytest.mark.parametrize("action, words", [("4", "4 stones cannot be taken"), ("0", "0 stones"), ("none", "no number"),
                                            ("3", "at most 2")])
def test_nim_bad_moves_take_nothing_and_say_what_is_allowed(action, words):
    env = envs.make(ENV_ID)
    env.reset(seed=1)
    game = env.unwrapped
    if action == "3":
        game.pile = 2
    before = game.pile
    obs, reward, terminated, _, info = env.step(action)
    assert info["invalid_action"] and not terminated and game.pile == before
    assert obs.startswith("Invalid:") and words in obs and "take 1, 2 or 3" in obs
    assert info["reward_components"] == {"invalid": -0.05}


def test_nim_starts_are_winnable_and_seeded():
    piles = []
    for seed in envs.seeds(ENV_ID, "train", 300):
        env = envs.make(ENV_ID)
        env.reset(seed=seed)
        piles.append(env.unwrapped.pile)
    assert all(9 <= p <= 23 and p % 4 for p in piles) and len(set(piles)) == 12  # every winnable start in 9..23
    a, b = envs.make(ENV_ID), envs.make(ENV_ID)
    assert a.reset(seed=5) == b.reset(seed=5)
    assert [a.step("1")[0] for _ in range(3)] == [b.step("1")[0] for _ in range(3)]  # the opponent too


def test_nim_teachers_expert_always_wins_heuristic_is_worse():
    for skill in (0.0, 0.7, 1.0):
        assert _play("expert", 100, opponent_skill=skill)[0] == 1.0  # leaves a multiple of 4 every turn
    expert, heuristic, random = _play("expert"), _play("heuristic"), _play("random")
    assert heuristic[2] == 0 and expert[2] == 0  # never an illegal move
    assert random[0] < 0.35 < heuristic[0] < 0.65 < expert[0]  # docs/ENVIRONMENTS.md: 0.21 / 0.535 / 1.0
    assert _play("heuristic", opponent_skill=1.0)[0] < heuristic[0] < _play("heuristic", opponent_skill=0.0)[0]


def _heuristic_moves(pile: int, n: int = 60, **kwargs) -> set[int]:
    env = envs.make(ENV_ID, **kwargs)
    env.reset(seed=0)
    game = env.unwrapped
    moves = set()
    for _ in range(n):
        game.pile = pile
        moves.add(int(game.heuristic_action()))
    return moves


def test_nim_heuristic_wins_where_it_sees_a_win_and_guesses_elsewhere():
    for pile in (1, 2, 3):
        assert _heuristic_moves(pile) == {pile}  # the last stones: a win now
    for pile in (5, 6, 7):
        assert _heuristic_moves(pile) == {pile % 4}  # leaves 4: the one losing pile it knows
    assert _heuristic_moves(4) == {1}  # every move loses
    for pile in (8, 9, 13, 14, 23):  # no win it can see: any of 1-3, the right move (pile % 4) among them
        assert _heuristic_moves(pile) == {1, 2, 3}
    for pile in (9, 10, 11):  # two moves of lookahead: it knows that 8 loses too
        assert _heuristic_moves(pile, heuristic_lookahead=2) == {pile % 4}
    assert _heuristic_moves(13, heuristic_lookahead=2) == {1, 2, 3}
    assert _heuristic_moves(21, heuristic_lookahead=5) == {1}
    for pile in (9, 13, 14, 23):  # the heuristic before guessing: 3 from every big pile
        assert _heuristic_moves(pile, heuristic_guess=False) == {3}
    assert _heuristic_moves(6, heuristic_guess=False) == {2}


def test_nim_heuristic_guesses_are_seeded():
    def game_of(seed):
        env = envs.make(ENV_ID)
        env.reset(seed=seed)
        moves = []
        for _ in range(4):
            env.unwrapped.pile = 19
            moves.append(env.unwrapped.heuristic_action())
        return moves

    assert game_of(3) == game_of(3)
    assert len({tuple(game_of(s)) for s in range(8)}) > 1


@pytest.mark.parametrize("guess", ["yes", 1, None])
def test_nim_bad_heuristic_guess_is_named(guess):
    with pytest.raises(ValueError, match="heuristic_guess.*true or false"):
        envs.make(ENV_ID, heuristic_guess=guess)


@pytest.mark.parametrize("lookahead", [0, -1, 1.5, "2", True])
def test_nim_bad_heuristic_lookahead_is_named(lookahead):
    with pytest.raises(ValueError, match="heuristic_lookahead.*at least 1"):
        envs.make(ENV_ID, heuristic_lookahead=lookahead)


@pytest.mark.parametrize("kwargs, words", [({"min_stones": 10, "max_stones": 5}, "min_stones"),
                                           ({"min_stones": 8, "max_stones": 8}, "multiples of 4"),
                                           ({"opponent_skill": 1.5}, "opponent_skill")])
def test_nim_bad_settings_are_named(kwargs, words):
    with pytest.raises(ValueError, match=words):
        envs.make(ENV_ID, **kwargs)
