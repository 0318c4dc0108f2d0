"""An SFT checkpoint is a transformers checkpoint: AutoModelForCausalLM loads it and TRL's SFTTrainer trains it."""

from __future__ import annotations

import json

import pytest
import torch

from hybrid_rl.model.hf import load_pretrained
from hybrid_rl.model.tokenizer import render_chat
from sft_testlib import run_sft


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory):
    from sft_testlib import write_chat_jsonl

    tmp = tmp_path_factory.mktemp("sft_hf")
    data = write_chat_jsonl(tmp / "chat.jsonl", n=24)
    run = run_sft(tmp, "hf", "train.max_steps=3", data=data)
    return run / "step_3", data


def test_checkpoint_loads_in_transformers_with_the_same_logits(sft_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt, data = sft_checkpoint
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "nemotron_h"
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    messages = json.loads(data.read_text().splitlines()[0])["messages"]
    ids = render_chat(messages)[0]
    assert tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"] == ids
    ours = load_pretrained(ckpt).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits.float(), ours(x).logits, rtol=1e-3, atol=1e-3)


def test_trl_sft_trainer_continues_training_the_checkpoint(sft_checkpoint, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    ckpt, data = sft_checkpoint
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    rows = [json.loads(line) for line in data.read_text().splitlines()[:16]]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = SFTConfig(output_dir=str(tmp_path / "trl"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                     logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False, max_length=256,
                     dataloader_num_workers=0, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    result = trainer.train()
    assert result.global_step == 3
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all(torch.isfinite(torch.tensor(logged)))
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "lm_head.weight" in changed and len(changed) > len(before) // 2
