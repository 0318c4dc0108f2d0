"""Snake-v0: eat the apples without hitting a wall or the body. Rules, rewards, teachers, bad input."""

from collections import deque

import pytest

from hybrid_rl import envs

ENV_ID = "hybrid_rl/Snake-v0"


def _set(game, body, apple):
    """Put the game in a chosen position: body cells head first, and the apple."""
    game.body, game.apple = deque(body), apple


def test_snake_passes_the_check_and_is_listed(check_and_list):
    row = check_and_list(ENV_ID)
    assert row.split()[1] == "30" and "apple" in row


def test_snake_board_moves_growth_and_rewards():
    env = envs.make(ENV_ID)
    obs, _ = env.reset(seed=0)
    game = env.unwrapped
    assert obs.startswith("Eat 3 apples (*). Do not hit a wall or your body (o). Moves: left down right up.\n")
    board = obs.split("\n")[1:]
    assert len(board) == 5 and all(len(row) == 5 for row in board)
    assert "".join(board).count("@") == 1 and "".join(board).count("o") == 2 and "".join(board).count("*") == 1
    _set(game, [(2, 2), (2, 3), (2, 4)], (0, 0))
    obs, reward, terminated, _, info = env.step("left")
    assert obs == "*....\n.....\n.@oo.\n.....\n....." and not terminated
    assert info["reward_components"] == {"turn": -0.01} and reward == pytest.approx(-0.01)
    _set(game, [(0, 1), (0, 2), (0, 3)], (0, 0))
    obs, reward, terminated, _, info = env.step("go left")
    assert obs.startswith("Apple eaten, 2 to go.\n") and not terminated and len(game.body) == 4
    assert list(game.body) == [(0, 0), (0, 1), (0, 2), (0, 3)] and game.apple not in game.body
    assert info["reward_components"] == {"apple": 0.1, "turn": -0.01} and reward == pytest.approx(0.09)
    game.eaten = 2
    _set(game, [(0, 0), (0, 1), (0, 2), (0, 3)], (1, 0))
    obs, reward, terminated, _, info = env.step("down")
    assert obs.endswith("You ate all 3 apples.") and terminated and info["success"]
    assert info["reward_components"] == {"success": 1.0, "turn": -0.01} and reward == pytest.approx(0.99)


@pytest.mark.parametrize("body, move, ending", [
    ([(0, 2), (1, 2), (2, 2)], "up", "You hit the wall."),
    ([(2, 2), (2, 3), (2, 4)], "right", "You bit your body."),  # straight back: into the neck
    ([(2, 2), (2, 3), (3, 3), (3, 2), (3, 1)], "down", "You bit your body."),
])
def test_snake_crashes_end_the_episode_without_success(body, move, ending):
    env = envs.make(ENV_ID)
    env.reset(seed=1)
    _set(env.unwrapped, body, (0, 0))
    obs, reward, terminated, _, info = env.step(move)
    assert obs.endswith(ending) and terminated and not info["success"]
    assert info["reward_components"] == {"turn": -0.01}


def test_snake_tail_cell_is_free_unless_the_snake_grows():
    env = envs.make(ENV_ID)
    env.reset(seed=2)
    game = env.unwrapped
    ring = [(1, 1), (1, 2), (2, 2), (2, 1)]  # the head next to its own tail
    _set(game, ring, (4, 4))
    _, _, terminated, _, _ = env.step("down")  # into the tail's cell, which moves away
    assert not terminated and list(game.body) == [(2, 1), (1, 1), (1, 2), (2, 2)]
    _set(game, ring, (0, 1))
    _, _, terminated, _, _ = env.step("up")  # a bite: the tail stays where it is
    assert not terminated and list(game.body) == [(0, 1), *ring]


def test_snake_bad_text_moves_nothing_and_names_the_moves():
    env = envs.make(ENV_ID)
    env.reset(seed=3)
    game = env.unwrapped
    before = (list(game.body), game.apple)
    obs, reward, terminated, _, info = env.step("eat it")
    assert obs.startswith("Invalid: no move") and "left, down, right, up" in obs
    assert info["invalid_action"] and not terminated and reward == pytest.approx(-0.05)
    assert (list(game.body), game.apple) == before


def test_snake_heuristic_is_blind_to_its_body_and_the_expert_is_not():
    env = envs.make(ENV_ID)
    env.reset(seed=4)
    game = env.unwrapped
    _set(game, [(2, 2), (2, 1), (2, 0)], (2, 4))  # the apple ahead: both head for it
    assert game.heuristic_action() == game.expert_action() == "right"
    _set(game, [(2, 2), (2, 3), (1, 3)], (2, 4))  # the only closer move is into the neck
    assert game.heuristic_action() == "right"
    assert game.expert_action() in ("down", "up")  # round the body: 4 moves
    _set(game, [(0, 0), (1, 0), (2, 0)], (0, 4))  # in a corner, the apple along the wall
    assert game.heuristic_action() == "right"


def test_snake_teachers_measured():
    """The figures docs/ENVIRONMENTS.md gives (200 train seeds): the expert always wins; the heuristic wins
    about a third of the time and loses by biting itself, never by the turn limit."""
    expert = envs.expert_stats(ENV_ID, 200, split="train", policy="expert")
    heuristic = envs.expert_stats(ENV_ID, 200, split="train", policy="heuristic")
    rand = envs.expert_stats(ENV_ID, 200, split="train", policy="random")
    assert expert["success_rate"] == 1.0
    assert 0.2 < heuristic["success_rate"] < 0.45 and rand["success_rate"] < 0.05
    assert heuristic["mean_turns"] < expert["mean_turns"]  # its failures end early, in its own body


@pytest.mark.parametrize("kwargs, words", [({"size": 2}, "at least 3x3"), ({"length": 6}, "1 <= length <= size=5"),
                                           ({"apples": 22}, "need 1 <= apples <= 21")])
def test_snake_bad_options_say_what_is_allowed(kwargs, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        envs.make(ENV_ID, **kwargs)
