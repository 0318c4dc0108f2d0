"""``hybrid-rl pipeline init_from=DIR`` with a transformers-saved NemotronH checkpoint and its own BPE tokenizer.

Every bad DIR stops before any work with an error that names the problem and the fix. A good one runs
SFT -> RL -> eval -> export with that tokenizer in every engine, and the exported RL checkpoint loads in
transformers (AutoTokenizer + NemotronHForCausalLM) with our ids and logits.
"""

from __future__ import annotations

import json

import pytest
import torch

from bpe_chat_fixtures import build_tokenizer, tiny_nemotron_h, write_checkpoint
from hybrid_rl.cli import main
from hybrid_rl.model.tokenizer import HFChatTokenizer

ENV = "hybrid_rl/Calculator-v0"  # tool calls in the demonstrations, the rollouts and the eval
TOY = ["run.name=pipe", f"envs=[{ENV}]", "demos.teacher=expert", "demos.episodes_per_env=12",
       "sft.train.max_steps=3", "sft.train.warmup_steps=1", "sft.train.micro_batch_tokens=1024",
       "sft.eval.episodes_per_env=1", "sft.eval.max_turn_tokens=40",
       "rl.rollout.prompts_per_step=2", "rl.rollout.samples_per_prompt=2", "rl.rollout.pool.num_workers=0",
       "rl.rollout.max_turn_tokens=40", "rl.train.steps=1", "rl.train.micro_batch_tokens=1024",
       "rl.eval.episodes_per_env=1", "rl.eval.at_start=false",
       "eval.episodes_per_env=2", "eval.temperatures=[0.0]", "eval.max_turn_tokens=40",
       "logging.backends=[jsonl]", "logging.report=false", "run.quiet=true"]


@pytest.fixture(scope="module")
def hf_tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def ckpt(hf_tok, tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("nemotron_h"), hf_tok)


def bad_dirs(hf_tok, tmp):
    """(DIR, words its error must hold): the problem, and the fix."""
    no_tok = tmp / "no_tokenizer"
    tiny_nemotron_h(len(hf_tok)).save_pretrained(no_tok)
    big_vocab = write_checkpoint(tmp / "big_vocab", hf_tok, model_vocab=300)
    llama = tmp / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    no_template = write_checkpoint(tmp / "no_template", hf_tok)
    cfg_path = no_template / "tokenizer_config.json"
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path.write_text(json.dumps({k: v for k, v in json.loads(cfg_path.read_text()).items() if k != "chat_template"}))
    return [
        (no_tok, ["has no tokenizer", "tokenizer.save_pretrained(DIR)"]),
        (big_vocab, [f"tokenizer has {len(hf_tok)} tokens", "embeddings only 300", "resize_token_embeddings"]),
        (llama, ["not a NemotronH checkpoint", "'llama'", "expected 'nemotron_h'"]),
        (tmp / "missing", ["not a NemotronH checkpoint", "does not exist"]),
        (no_template, ["no chat_template", "set tokenizer.chat_template"]),
    ]


def test_bad_init_from_is_named_with_its_fix(hf_tok, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for directory, words in bad_dirs(hf_tok, tmp_path):
        assert main(["pipeline", f"init_from={directory}", *TOY]) == 2, directory
        err = capsys.readouterr().err
        assert f"init_from={directory}" in err
        for w in words:
            assert w in err, (w, err)
    assert not (tmp_path / "runs").exists()  # nothing started


@pytest.mark.slow
def test_pipeline_from_transformers_checkpoint_with_bpe_tokenizer_slow(hf_tok, ckpt, tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer, NemotronHForCausalLM

    from hybrid_rl.model.hf import load_pretrained
    from hybrid_rl.rollout.engine import Engine

    tokenizers_played, init = [], Engine.__init__

    def spy(self, model, tokenizer, *args, **kwargs):
        tokenizers_played.append(type(tokenizer).__name__)
        init(self, model, tokenizer, *args, **kwargs)

    monkeypatch.setattr(Engine, "__init__", spy)
    monkeypatch.chdir(tmp_path)
    assert main(["pipeline", f"init_from={ckpt}", *TOY]) == 0
    assert "Calculator-v0" in capsys.readouterr().out
    # SFT eval, RL rollouts, RL eval and the final eval of both checkpoints: every engine had the BPE tokenizer
    assert len(tokenizers_played) >= 4 and set(tokenizers_played) == {"HFChatTokenizer"}

    results = json.loads((tmp_path / "runs/pipe/results.json").read_text())
    assert set(results["results"]) == {"sft", "rl"} and results["checkpoints"]["rl"] == "runs/pipe/rl/step_1"
    export = tmp_path / results["checkpoints"]["rl"]
    before, after = load_pretrained(ckpt), load_pretrained(export)
    assert not torch.equal(before.lm_head.weight, after.lm_head.weight)  # SFT and RL trained the checkpoint
    assert after.config.vocab_size == len(hf_tok)

    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in export.iterdir()}
    loaded = AutoTokenizer.from_pretrained(str(export))  # the export carries the tokenizer and its template
    conversation = [{"role": "system", "content": "Use the calc tool."}, {"role": "user", "content": "What is (3+4)*5?"}]
    prompt = hf_tok.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    again = loaded.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True)
    assert list(again["input_ids"] if hasattr(again, "keys") else again) == prompt
    ours = HFChatTokenizer(loaded)
    assert ours.render_chat(conversation)[0] + ours.generation_prefix() == prompt

    hf_model = NemotronHForCausalLM.from_pretrained(str(export), dtype=torch.float32).eval()
    x = torch.tensor([prompt])
    with torch.no_grad():
        torch.testing.assert_close(hf_model(input_ids=x).logits.float(), after.eval()(x).logits.float(), atol=1e-4, rtol=0)
