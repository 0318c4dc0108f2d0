"""SFT data: sources, validation with line numbers, skip/error policy, rendering = render_chat."""

from __future__ import annotations

import json
import re

import pytest

from hybrid_rl.model.tokenizer import ByteTokenizer, render_chat
from hybrid_rl.sft.config import DataConfig, EnvDemoConfig
from hybrid_rl.sft.data import DataError, expert_conversation, load_samples, read_jsonl

TOK = ByteTokenizer()
GOOD = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "hello"}]}
TOOL = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "calc(2+2)"},
                     {"role": "tool", "content": "4"}, {"role": "assistant", "content": "4"}]}


def _write_bad_file(path):
    lines = [
        json.dumps(GOOD),                                                        # 1 ok
        "{not json",                                                             # 2 not JSON
        json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),   # 3 no assistant turn
        "",                                                                      # 4 blank: ignored
        json.dumps({"messages": [{"role": "robot", "content": "x"},
                                 {"role": "assistant", "content": "y"}]}),      # 5 unknown role
        json.dumps({"messages": [{"role": "user", "content": "q" * 500},
                                 {"role": "assistant", "content": "a"}]}),      # 6 longer than the budget
        json.dumps(TOOL),                                                        # 7 ok
        json.dumps({"text": "not a conversation"}),                             # 8 wrong format
    ]
    path.write_text("\n".join(lines) + "\n")


def test_jsonl_bad_lines_are_skipped_counted_and_reported_with_line_numbers(tmp_path, caplog):
    path = tmp_path / "chat.jsonl"
    _write_bad_file(path)
    cfg = DataConfig(jsonl_paths=[str(path)], on_bad_sample="skip", max_seq_tokens=256)
    with caplog.at_level("WARNING"):
        samples, report = load_samples(cfg, TOK)
    assert [s.source for s in samples] == [f"{path}:1", f"{path}:7"]
    assert dict(report.skipped) == {"not_json": 1, "no_assistant": 1, "unknown_role": 1, "too_long": 1, "format": 1}
    assert report.metrics()["train/skipped_samples"] == 5 and report.metrics()["train/samples/jsonl"] == 2
    text = caplog.text
    for lineno, why in [(2, "not valid JSON"), (3, "no assistant turn"), (5, "unknown role 'robot'"),
                        (6, "longer than data.max_seq_tokens=256"), (8, '"messages"')]:
        assert f"{path}:{lineno}: " in text and why in text
    assert f"{path}:4" not in text


@pytest.mark.parametrize("bad_line, lineno, why", [
    ("{not json", 2, "not valid JSON"),
    (json.dumps({"messages": [{"role": "user", "content": "?"}]}), 2, "no assistant turn"),
    (json.dumps({"messages": [{"role": "bot", "content": "?"}, {"role": "assistant", "content": "!"}]}), 2, "unknown role"),
    (json.dumps({"messages": [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "!"}]}), 2, "longer than"),
])
def test_on_bad_sample_error_stops_naming_the_line_and_the_fix(tmp_path, bad_line, lineno, why):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + bad_line + "\n")
    with pytest.raises(DataError) as err:
        load_samples(DataConfig(jsonl_paths=[str(path)], on_bad_sample="error", max_seq_tokens=256), TOK)
    assert f"{path}:{lineno}" in str(err.value) and why in str(err.value) and "on_bad_sample=skip" in str(err.value)


def test_a_line_that_is_not_utf8_is_a_bad_sample_not_replacement_characters(tmp_path):
    """A Latin-1 line ("naïve") was read with U+FFFD in place of the byte and trained on; now it is a bad sample."""
    path = tmp_path / "chat.jsonl"
    latin1 = json.dumps({"messages": [{"role": "user", "content": "na\u00efve?"}, {"role": "assistant", "content": "!"}]},
                        ensure_ascii=False).encode("latin-1")
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + latin1 + b"\n")
    samples, report = load_samples(DataConfig(jsonl_paths=[str(path)], on_bad_sample="skip", max_seq_tokens=256), TOK)
    assert [s.source for s in samples] == [f"{path}:1"] and dict(report.skipped) == {"not_utf8": 1}
    with pytest.raises(DataError, match=re.escape(f"{path}:2") + ".*not UTF-8 \\(byte 0xef"):
        load_samples(DataConfig(jsonl_paths=[str(path)], on_bad_sample="error", max_seq_tokens=256), TOK)


def test_a_lone_surrogate_escape_is_a_not_utf8_bad_sample_naming_it(tmp_path):
    """JSON's "\\ud83d" without its partner parses into a character that has no UTF-8 form; it was reported as a
    chat-template failure ("template") with an encoder's traceback text."""
    path = tmp_path / "chat.jsonl"
    lone = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "smile \\ud83d!"}]}'
    path.write_text(json.dumps(GOOD) + "\n" + lone + "\n")
    samples, report = load_samples(DataConfig(jsonl_paths=[str(path)], on_bad_sample="skip", max_seq_tokens=256), TOK)
    assert [s.source for s in samples] == [f"{path}:1"] and dict(report.skipped) == {"not_utf8": 1}
    with pytest.raises(DataError, match=re.escape(f"{path}:2") + r".*message 1's content holds a lone surrogate "
                                        r"\\ud83d at character 7.*write the whole character"):
        load_samples(DataConfig(jsonl_paths=[str(path)], on_bad_sample="error", max_seq_tokens=256), TOK)


def test_missing_file_and_all_bad_data_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_samples(DataConfig(jsonl_paths=[str(tmp_path / "nope.jsonl")]), TOK)
    path = tmp_path / "bad.jsonl"
    path.write_text("{\n")
    with pytest.raises(DataError, match="no usable training samples"):
        load_samples(DataConfig(jsonl_paths=[str(path)], on_bad_sample="skip"), TOK)


def test_rendering_is_render_chat_with_assistant_only_mask(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(TOOL) + "\n")
    (sample,), _ = load_samples(DataConfig(jsonl_paths=[str(path)]), TOK)
    ids, mask = render_chat(TOOL["messages"])
    assert sample.ids == ids and sample.mask == mask
    trained = TOK.decode([i for i, m in zip(ids, mask) if m], skip_special=False)
    assert trained == "calc(2+2)<|end|>4<|end|>"


def test_hf_datasets_directory(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([GOOD, TOOL, {"messages": [{"role": "user", "content": "?"}]}])
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "ds"))
    cfg = DataConfig(hf_dataset_dir=str(tmp_path / "ds"), on_bad_sample="skip")
    samples, report = load_samples(cfg, TOK)
    assert len(samples) == 2 and samples[1].ids == render_chat(TOOL["messages"])[0]
    assert report.skipped == {"no_assistant": 1} and report.examples[0].startswith(f"{tmp_path / 'ds'}[2]: ")
    with pytest.raises(DataError, match="hf_dataset_split"):
        load_samples(DataConfig(hf_dataset_dir=str(tmp_path / "ds"), hf_dataset_split="test"), TOK)


def test_expert_demonstrations_on_train_seeds_saved_to_jsonl_and_read_back(tmp_path):
    from hybrid_rl import envs

    cfg = DataConfig(envs=[EnvDemoConfig("hybrid_rl/GuessNumber-v0", 5), EnvDemoConfig("hybrid_rl/FrozenLake-v1", 3)])
    samples, report = load_samples(cfg, TOK, demos_path=tmp_path / "demos.jsonl")
    assert report.kept == {"hybrid_rl/GuessNumber-v0": 5, "hybrid_rl/FrozenLake-v1": 3}
    train_seeds = envs.seeds("hybrid_rl/GuessNumber-v0", "train", 5)
    assert [s.source for s in samples[:5]] == [f"hybrid_rl/GuessNumber-v0 seed {k}" for k in train_seeds]
    messages, success = expert_conversation("hybrid_rl/FrozenLake-v1", 0)
    assert success and messages[-1]["role"] == "assistant" and samples[5].ids == render_chat(messages)[0]
    rows = [obj for _, obj in read_jsonl(tmp_path / "demos.jsonl")]
    assert len(rows) == 8 and rows[5]["messages"] == messages
    again, _ = load_samples(DataConfig(jsonl_paths=[str(tmp_path / "demos.jsonl")]), TOK)
    assert [s.ids for s in again] == [s.ids for s in samples]


def test_sft_rendering_of_a_rollout_conversation_is_the_rollout_token_ids():
    """rollout plays episodes turn by turn; SFT renders the finished conversation: same ids, and every token
    rollout generated is trained by SFT (the only extra SFT-trained tokens are <|end|> that rollout forced
    after a turn hit max_turn_tokens, which the policy did not produce)."""
    import torch

    from hybrid_rl.model import HybridLM
    from hybrid_rl.model.config import HybridConfig
    from hybrid_rl.rollout.config import EpisodeConfig, SamplingConfig
    from hybrid_rl.rollout.evaluate import evaluate
    from hybrid_rl.sft.data import render_samples, DataReport

    torch.manual_seed(0)
    model = HybridLM(HybridConfig.from_preset("micro")).eval()
    result = evaluate(model, TOK, ["hybrid_rl/GuessNumber-v0", "hybrid_rl/FrozenLake-v1"], episodes=2,
                      sampling=SamplingConfig(temperature=1.0, ascii_only=True, seed=0),
                      episode=EpisodeConfig(max_turn_tokens=6, max_episode_tokens=512))
    trajs = [t for t in result.trajectories if any(t.is_action)]
    assert len(trajs) == 4
    samples = render_samples([(f"traj {k}", {"messages": t.messages}) for k, t in enumerate(trajs)], TOK, 512,
                             "error", DataReport(), "rollout")
    for t, s in zip(trajs, samples):
        assert s.ids == t.token_ids
        extra = [i for i, (m, a) in enumerate(zip(s.mask, t.is_action)) if m != a]
        assert all(s.mask[i] == 1 and t.is_action[i] == 0 and s.ids[i] == TOK.end_id for i in extra)


def test_truncate_keeps_the_first_max_seq_tokens_of_a_long_conversation(tmp_path):
    """data.truncate: a conversation longer than the budget is cut to its first max_seq_tokens tokens (ids
    and loss mask as render_chat gives them); one whose kept part has no assistant token is still bad."""
    long_conv = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * 40},
                              {"role": "user", "content": "more " * 40}, {"role": "assistant", "content": "b"}]}
    late_answer = {"messages": [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "!"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in (GOOD, long_conv, late_answer)) + "\n")
    full_ids, full_mask = render_chat(long_conv["messages"], TOK)
    assert len(full_ids) > 128
    cfg = DataConfig(jsonl_paths=[str(path)], on_bad_sample="skip", max_seq_tokens=128, truncate=True)
    samples, report = load_samples(cfg, TOK)
    assert [s.source for s in samples] == [f"{path}:1", f"{path}:2"]
    cut = samples[1]
    assert list(cut.ids) == list(full_ids[:128]) and list(cut.mask) == list(full_mask[:128]) and any(cut.mask)
    assert report.truncated == 1 and report.metrics()["train/truncated_samples"] == 1
    assert dict(report.skipped) == {"too_long": 1}  # the third: its first 128 tokens are all the user's
    with pytest.raises(DataError, match=f"{len(render_chat(late_answer['messages'], TOK)[0])} tokens is longer .* hold no "
                                        "assistant token"):
        load_samples(DataConfig(jsonl_paths=[str(path)], max_seq_tokens=128, truncate=True), TOK)
    with pytest.raises(DataError, match="data.truncate=true"):  # off (the default): too long is bad, the fix named
        load_samples(DataConfig(jsonl_paths=[str(path)], max_seq_tokens=128), TOK)


@pytest.mark.parametrize("content", ["", "  \n"])
def test_an_empty_assistant_message_is_a_bad_sample_naming_the_message(tmp_path, content):
    path = tmp_path / "chat.jsonl"
    rows = [GOOD, {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": content}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                          {"role": "user", "content": "and?"}, {"role": "assistant", "content": content}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples, report = load_samples(DataConfig(jsonl_paths=[str(path)], on_bad_sample="skip", max_seq_tokens=256), TOK)
    assert [s.source for s in samples] == [f"{path}:1"] and dict(report.skipped) == {"empty_assistant": 2}
    assert "message 1 (assistant) is empty" in report.examples[0] and "message 3 (assistant)" in report.examples[1]
    with pytest.raises(Exception, match="message 1 \\(assistant\\) is empty.*fill in the reply"):
        load_samples(DataConfig(jsonl_paths=[str(path)], on_bad_sample="error", max_seq_tokens=256), TOK)
