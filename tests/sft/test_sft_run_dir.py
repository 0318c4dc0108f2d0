"""A run that fails on a bad input leaves the run directory it would replace as it was; resume=true continues
only a run of its own stage that has a checkpoint, and says why not otherwise."""

from __future__ import annotations

from hybrid_rl.checkpoint import TRAINER_STATE, list_checkpoints
from hybrid_rl.cli import main as cli_main
from sft_testlib import FAST, losses, run_sft


def _sft(tmp_path, name, *overrides, data):
    return cli_main(["sft", f"run.output_dir={tmp_path / 'runs'}", f"run.name={name}", *FAST,
                     f"data.jsonl_paths=[{data}]", "data.envs=[]", *overrides])


def test_overwrite_with_a_bad_input_keeps_the_previous_run(tmp_path, chat_jsonl, capsys):
    run = run_sft(tmp_path, "s1", "train.max_steps=3", "train.save_every=3", data=chat_jsonl)
    before = sorted(p.name for p in run.iterdir())
    assert "step_3" in before and "metrics.jsonl" in before
    # init_from its own checkpoint, and the checkpoint the clearing would delete: loaded first, so the new run
    # starts from it (the inputs load before anything of the old run goes)
    bad = [["init_from=" + str(tmp_path / "nowhere")], [f"data.jsonl_paths=[{tmp_path / 'typo.jsonl'}]"]]
    for overrides in bad:
        rc = _sft(tmp_path, "s1", "run.overwrite=true", "train.max_steps=2", *overrides, data=chat_jsonl)
        assert rc != 0, overrides
        assert sorted(p.name for p in run.iterdir()) == before, overrides  # nothing of s1 went
        assert sorted(losses(run)) == [1, 2, 3]
    # a good overwrite from the run's own last checkpoint: it loads, then the old outputs make way
    rc = _sft(tmp_path, "s1", "run.overwrite=true", "train.max_steps=2", "train.save_every=2",
              f"init_from={run / 'step_3'}", data=chat_jsonl)
    assert rc == 0
    assert [s for s, _ in list_checkpoints(run)] == [2] and sorted(losses(run)) == [1, 2]


def test_resume_refuses_a_missing_run_another_stage_s_run_and_a_torn_trainer_state(tmp_path, chat_jsonl, capsys):
    rc = _sft(tmp_path, "typo", "resume=true", "train.max_steps=2", data=chat_jsonl)
    err = capsys.readouterr().err
    assert rc == 2 and "runs/typo does not exist" in err and "check run.name" in err, err
    assert not (tmp_path / "runs" / "typo").exists()  # refused before anything was made

    run = run_sft(tmp_path, "s2", "train.max_steps=2", "train.save_every=2", data=chat_jsonl)
    # an RL run directory (a trainer state without SFT's data cursor) is not SFT's to resume
    rl = tmp_path / "runs" / "rl-like"
    (rl / "step_2").mkdir(parents=True)
    import torch

    torch.save({"stage": "rl", "optimizer": {}, "step": 2}, rl / "step_2" / TRAINER_STATE)
    (rl / "config.yaml").write_text("kept: true\n")
    rc = _sft(tmp_path, "rl-like", "resume=true", "train.max_steps=4", data=chat_jsonl)
    err = capsys.readouterr().err
    assert rc == 2 and "is a run of the rl stage and this is the sft stage" in err and "init_from=" in err, err
    assert (rl / "config.yaml").read_text() == "kept: true\n"  # its config was not replaced by SFT's
    assert sorted(p.name for p in rl.iterdir()) == ["config.yaml", "step_2"]

    # a torn trainer state: a clear error that names the file and the way out, not torch's zip error
    state = run / "step_2" / TRAINER_STATE
    state.write_bytes(state.read_bytes()[:1000])
    rc = _sft(tmp_path, "s2", "resume=true", "train.max_steps=4", data=chat_jsonl)
    err = capsys.readouterr().err
    assert rc == 2 and str(state) in err and "incomplete or damaged" in err and "Traceback" not in err, err
