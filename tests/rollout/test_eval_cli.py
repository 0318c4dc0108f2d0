"""`hybrid-rl eval` end to end on a saved micro checkpoint: in-process and on 2 Ray workers."""

import json
import re

import pytest

from hybrid_rl.cli import main

pytest.importorskip("hybrid_rl.model.hf")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch

    from hybrid_rl.model import HybridConfig, HybridLM
    from hybrid_rl.model.hf import save_pretrained
    from hybrid_rl.model.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "micro"
    save_pretrained(HybridLM(HybridConfig.from_preset("micro")), path, ByteTokenizer())
    return path


def eval_args(checkpoint, tmp_path, workers, *extra):
    return ["eval", "--checkpoint", str(checkpoint), "--env", "hybrid_rl/GuessNumber-v0", "--episodes", "3",
            "--workers", str(workers), f"run.output_dir={tmp_path}", "run.name=ev", "episode.max_turn_tokens=6",
            "run.quiet=true", *extra]


def test_eval_in_process_prints_a_table_and_writes_json(checkpoint, tmp_path, capsys):
    assert main(eval_args(checkpoint, tmp_path, 0)) == 0
    out = capsys.readouterr().out
    assert "success" in out and "GuessNumber-v0" in out
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    stats = report["summary"]["hybrid_rl/GuessNumber-v0"]
    assert stats["episodes"] == 3 and stats["turns_mean"] >= 1
    assert "eval/success/GuessNumber-v0" in report["metrics"]
    played_by = [json.loads(line)["worker"] for line in (tmp_path / "ev" / "trajectories.jsonl").read_text().splitlines()]
    assert len(played_by) == 3 and not any(re.fullmatch(r"w\d+@\w+", w) for w in played_by), played_by  # no Ray worker


def test_eval_on_two_ray_workers(checkpoint, tmp_path, ray_session, capsys):
    assert main(eval_args(checkpoint, tmp_path, 2, "pool.num_cpus_per_worker=0.5")) == 0
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["summary"]["hybrid_rl/GuessNumber-v0"]["episodes"] == 3
    assert report["perf"]["episodes_per_s"] > 0
    # played by the Ray workers (named w<index>@<node>), not by an engine in this process ("local")
    played_by = [json.loads(line)["worker"] for line in (tmp_path / "ev" / "trajectories.jsonl").read_text().splitlines()]
    assert len(played_by) == 3 and all(re.fullmatch(r"w[01]@\w+", w) for w in played_by), played_by


def test_a_sampled_eval_plays_the_same_episodes_again(checkpoint, tmp_path):
    """``sampling.seed`` unset: the sampler's stream is ``run.seed``'s, so a run repeats (and another seed differs)."""
    def tokens(name, seed):
        assert main(eval_args(checkpoint, tmp_path, 0, "sampling.temperature=1.0", f"run.seed={seed}",
                              f"run.name={name}")) == 0
        lines = (tmp_path / name / "trajectories.jsonl").read_text().splitlines()
        return [json.loads(line)["token_ids"] for line in lines]

    first = tokens("a", 0)
    assert tokens("b", 0) == first
    assert tokens("c", 1) != first


def test_eval_errors_name_the_problem(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "nope"), "--env", "GuessNumber-v0"]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path), "eval.episodez=3"]) == 2
    assert "eval.episodes" in capsys.readouterr().err


def test_eval_takes_a_module_prefixed_env_id(checkpoint, tmp_path, monkeypatch):
    """``module:id``, as gymnasium.make takes it: the module (not imported before) registers the id."""
    (tmp_path / "evalplugin_mod.py").write_text(
        "import gymnasium\n"
        "from hybrid_rl.benchmarks.fixed_turns import FixedTurnsEnv\n"
        "gymnasium.register('evalplugin/Turns-v0', entry_point=FixedTurnsEnv, kwargs={'turns': 2}, disable_env_checker=True)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["eval", "--checkpoint", str(checkpoint), "--env", "evalplugin_mod:evalplugin/Turns-v0", "--episodes", "2",
            "--workers", "0", f"run.output_dir={tmp_path}", "run.name=plug", "episode.max_turn_tokens=4", "run.quiet=true"]
    assert main(args) == 0
    report = json.loads((tmp_path / "plug" / "eval.json").read_text())
    assert report["summary"]["evalplugin_mod:evalplugin/Turns-v0"]["episodes"] == 2


def test_the_in_process_eval_reads_the_checkpoint_onto_its_device(checkpoint, tmp_path, monkeypatch):
    """On a GPU machine the weights are read onto the GPU in fp32 (they were built on the host, then moved: a
    host copy of the whole model on the way)."""
    import torch

    import hybrid_rl.model.hf as hf

    class Loaded(Exception):
        pass

    def load(path, device=None, dtype=None):
        raise Loaded(device, dtype)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(hf, "load_pretrained", load)
    with pytest.raises(Loaded) as got:
        main(eval_args(checkpoint, tmp_path, 0))
    assert got.value.args == ("cuda", torch.float32)


def test_a_bf16_checkpoint_is_evaluated_in_fp32(tmp_path):
    import torch

    from hybrid_rl.model import HybridConfig, HybridLM
    from hybrid_rl.model.hf import save_pretrained
    from hybrid_rl.model.tokenizer import ByteTokenizer
    from hybrid_rl.rollout.pool import CheckpointModel

    torch.manual_seed(0)
    model = HybridLM(HybridConfig.from_preset("micro")).to(torch.bfloat16)
    save_pretrained(model, tmp_path / "bf16", ByteTokenizer())
    loaded = CheckpointModel(str(tmp_path / "bf16"), "cpu")()
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    want = dict(model.named_parameters())
    assert all(torch.equal(p, want[name].float()) for name, p in loaded.named_parameters())
