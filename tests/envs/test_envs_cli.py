"""``hybrid-rl envs`` through the real command table."""

from hybrid_rl.cli import main


def test_list_prints_ids_turn_limits_and_descriptions(capsys):
    assert main(["envs", "list"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("hybrid_rl/GuessNumber-v0"))
    assert row.split()[1] == "8" and "higher/lower" in row
    assert len([l for l in out.splitlines() if l.startswith("hybrid_rl/")]) >= 8


def test_check_one_env_passes_and_prints_the_expert_rate(capsys):
    assert main(["envs", "check", "GuessNumber-v0", "--episodes", "50"]) == 0
    out = capsys.readouterr().out
    assert "hybrid_rl/GuessNumber-v0: PASS" in out and "expert on 50 eval seeds: success 100.0%" in out


def test_check_names_the_id_with_its_arguments(capsys):
    """``envs check GuessNumber-v0(n=100)`` checks n=100 and says so (the report named the bare id)."""
    assert main(["envs", "check", "GuessNumber-v0(n=100)", "--episodes", "20"]) == 0
    assert "hybrid_rl/GuessNumber-v0(n=100): PASS" in capsys.readouterr().out


def test_check_every_env_through_the_cli(capsys):
    assert main(["envs", "check", "--episodes", "20"]) == 0
    out = capsys.readouterr().out
    assert out.count(": PASS") >= 8 and "FAIL" not in out


def test_expert_command_prints_success_rate_and_transcripts(capsys):
    assert main(["envs", "expert", "FrozenLake-v1", "--episodes", "30", "--show", "1", "--arg", "size=5",
                 "--arg", "max_episode_steps=40"]) == 0
    out = capsys.readouterr().out
    assert "--- hybrid_rl/FrozenLake-v1 seed 1000000000" in out and "[assistant]" in out
    assert "on 30 eval seeds: success 100.0%" in out


def test_expert_command_plays_the_heuristic_and_random_teachers(capsys):
    assert main(["envs", "expert", "GuessNumber-v0", "--policy", "heuristic", "--episodes", "20", "--show", "1",
                 "--arg", "n=100"]) == 0
    out = capsys.readouterr().out
    assert "[assistant] 10\n" in out and "hybrid_rl/GuessNumber-v0 heuristic (noise default) on 20 eval seeds" in out
    assert main(["envs", "expert", "FrozenLake-v1", "--policy", "random", "--episodes", "5"]) == 0
    assert "FrozenLake-v1 random (noise n/a) on 5 eval seeds" in capsys.readouterr().out
    assert main(["envs", "expert", "Mastermind-v0", "--policy", "heuristic", "--episodes", "5"]) == 2
    assert "Mastermind-v0 has no heuristic_action()" in capsys.readouterr().err


def test_unknown_id_exits_2_with_did_you_mean_and_the_list(capsys):
    assert main(["envs", "check", "Mastermnd-v0"]) == 2
    err = capsys.readouterr().err
    assert "Did you mean: `Mastermind`" in err and "hybrid_rl/GuessNumber-v0" in err


def test_bad_env_argument_exits_2_naming_it(capsys):
    assert main(["envs", "expert", "FrozenLake-v1", "--arg", "sise=8"]) == 2
    assert "sise" in capsys.readouterr().err


def test_expert_command_plays_the_val_split(capsys):
    """--split val: a teacher is judged on the seeds a recipe is chosen on, not on the held-out ones."""
    assert main(["envs", "expert", "GuessNumber-v0", "--episodes", "3", "--show", "1", "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "--- hybrid_rl/GuessNumber-v0 seed 500000000" in out and "on 3 val seeds: success 100.0%" in out
