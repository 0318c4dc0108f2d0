"""Rollout ids under a real BPE tokenizer with a Nemotron-style chat template (``HFChatTokenizer``).

1. A model that writes one expert conversation token by token (``ScriptedLM``): the engine's ids are a
   prefix of the template's rendering at every forward, at every turn they extend the template's rendering
   of the conversation so far plus the generation prompt, and the finished trajectory *is*
   ``apply_chat_template`` of the conversation, tool calls as structured ``tool_calls`` included.
2. A random NemotronH checkpoint written by transformers, sampling freely: the only difference from the
   template's rendering of the same messages is inside generated turns, where the rollout keeps the ids it
   sampled and the template tokenizes their text canonically (docs/INTERFACES.md, "Real tokenizers").
"""

from __future__ import annotations

import json
import pickle
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bpe_chat_fixtures import build_tokenizer, write_checkpoint
from hybrid_rl import envs
from hybrid_rl.envs.tools import OPEN_TAG, parse_tool_call
from hybrid_rl.model.tokenizer import HFChatTokenizer
from hybrid_rl.rollout.config import EpisodeConfig, SamplingConfig
from hybrid_rl.rollout.engine import Engine, GroupRequest


@pytest.fixture(scope="module")
def hf():
    return build_tokenizer()


@pytest.fixture(scope="module")
def tok(hf):
    return HFChatTokenizer(hf)


def template_ids(hf, messages, add_generation_prompt=False) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def structured(messages: list[dict]) -> list[dict]:
    """The project's tool-call text in an assistant message -> OpenAI-style ``tool_calls``."""
    out = []
    for m in messages:
        call = parse_tool_call(m["content"]) if m["role"] == "assistant" else None
        if call is None:
            out.append(dict(m))
            continue
        assert m["content"].endswith("</tool_call>")  # the expert writes the call and nothing after it
        out.append({"role": "assistant", "content": m["content"][: m["content"].index(OPEN_TAG)],
                    "tool_calls": [{"type": "function", "function": {"name": call.name, "arguments": call.arguments}}]})
    return out


def expert_messages(env_id: str, seed: int) -> list[dict]:
    messages = list(envs.expert_episode(env_id, seed).messages)
    while messages[-1]["role"] != "assistant":  # the final observation is never fed to the model
        messages.pop()
    return messages


# ------------------------------------------------------------------------------ a model that writes one conversation


class ScriptedCache:
    """Each row's fed ids; the row operations of ``HybridCache``."""

    def __init__(self, rows: list[list[int]]):
        self.rows = rows

    @property
    def lengths(self) -> torch.Tensor:
        return torch.tensor([len(r) for r in self.rows])

    def fork(self, row: int, n: int) -> "ScriptedCache":
        return ScriptedCache([list(self.rows[row]) for _ in range(n)])

    def select(self, rows) -> "ScriptedCache":
        return ScriptedCache([list(self.rows[r]) for r in rows])

    @staticmethod
    def cat(caches) -> "ScriptedCache":
        return ScriptedCache([r for c in caches for r in c.rows])


class ScriptedLM(nn.Module):
    """Puts all its mass on ``target[len(history)]``; fails at once when a history is not a prefix of ``target``."""

    def __init__(self, target: list[int], vocab_size: int):
        super().__init__()
        self.target, self.config = target, SimpleNamespace(vocab_size=vocab_size)

    def new_cache(self, batch_size: int) -> ScriptedCache:
        return ScriptedCache([[] for _ in range(batch_size)])

    def extend(self, cache: ScriptedCache, feeds) -> torch.Tensor:
        for row, fed in zip(cache.rows, feeds):
            row += [int(i) for i in fed]
        return self._next(cache)

    def decode_step(self, cache: ScriptedCache, tokens_b: torch.Tensor) -> torch.Tensor:
        return self.extend(cache, [[t] for t in tokens_b.tolist()])

    def _next(self, cache: ScriptedCache) -> torch.Tensor:
        logits_bv = torch.zeros(len(cache.rows), self.config.vocab_size)
        for b, row in enumerate(cache.rows):
            assert row == self.target[: len(row)], f"fed ids leave the template's rendering at position {len(row)}"
            logits_bv[b, self.target[len(row)]] = 30.0
        return logits_bv


@pytest.mark.parametrize("env_id, seed", [("hybrid_rl/Calculator-v0", 3), ("hybrid_rl/GuessNumber-v0", 5)])
def test_rollout_ids_are_the_chat_template_rendering(hf, tok, env_id, seed):
    messages = expert_messages(env_id, seed)
    target = template_ids(hf, structured(messages))
    engine = Engine(ScriptedLM(target, len(hf)), tok, SamplingConfig(temperature=0.0), EpisodeConfig(max_turn_tokens=64))
    traj = engine.play([GroupRequest(env_id, seed)])[0]

    assert traj.status == "terminated" and traj.success and traj.num_turns >= 3
    assert traj.messages == messages  # the decoded actions are the expert's text, tool calls included
    assert traj.token_ids == target  # == apply_chat_template of the whole conversation
    for k, m in enumerate(messages):  # turn after turn: the prompt of turn k is a prefix of the ids
        if m["role"] == "assistant":
            prompt = template_ids(hf, structured(messages[:k]), add_generation_prompt=True)
            assert traj.token_ids[: len(prompt)] == prompt
    # the SFT view of the same conversation: the same ids, and the mask is exactly what was generated
    assert tok.render_chat(messages) == (traj.token_ids, traj.is_action)
    generated = [i for i, a in zip(traj.token_ids, traj.is_action) if a]
    assert generated.count(tok.end_id) == traj.num_turns
    assert tok.end_suffix == hf.encode("\n", add_special_tokens=False) and tok.bos_prefix == []
    if env_id.startswith("hybrid_rl/Calculator"):
        assert sum(bool(m.get("tool_calls")) for m in structured(messages)) >= 1
        assert any(m["role"] == "tool" for m in messages)
    again = pickle.loads(pickle.dumps(tok))  # what Ray workers receive
    assert again.render_chat(messages) == tok.render_chat(messages)


# ------------------------------------------------------------------------------ free sampling: where ids must differ


def canonical(tok, traj) -> list[int]:
    """The trajectory with each generated turn's sampled ids replaced by the tokenization of their text."""
    out, i, n = [], 0, len(traj.token_ids)
    while i < n:
        if not traj.is_action[i]:
            out.append(traj.token_ids[i])
            i += 1
            continue
        j = i
        while j < n and traj.is_action[j]:
            j += 1
        sampled = traj.token_ids[i:j]
        closed = sampled[-1] == tok.end_id
        text_ids = sampled[:-1] if closed else sampled
        out += tok.encode(tok.decode(text_ids)) + sampled[len(text_ids):]
        i = j
    return out


def test_sampled_ids_differ_from_the_template_only_inside_generated_turns(hf, tok, tmp_path):
    from hybrid_rl.model.hf import load_pretrained

    model = load_pretrained(write_checkpoint(tmp_path / "ckpt", hf)).float()
    engine = Engine(model, tok, SamplingConfig(temperature=1.0, seed=0), EpisodeConfig(max_turn_tokens=12))
    trajs = engine.play([GroupRequest("hybrid_rl/Calculator-v0", 0, num_samples=3),
                         GroupRequest("hybrid_rl/GuessNumber-v0", 1, num_samples=3)])
    resampled = 0
    for traj in trajs:
        assert traj.num_turns >= 2
        rendered = template_ids(hf, traj.messages)
        assert canonical(tok, traj) == rendered, json.dumps(traj.messages)[:300]
        resampled += canonical(tok, traj) != traj.token_ids
        # the prompt is the template's generation prompt, token for token
        first = next(k for k, m in enumerate(traj.messages) if m["role"] == "assistant")
        prompt = template_ids(hf, traj.messages[:first], add_generation_prompt=True)
        assert traj.token_ids[: len(prompt)] == prompt
    assert resampled > 0  # a random model samples non-canonical tokenizations: the difference is real
