"""A real BPE tokenizer with a Nemotron-style chat template, built in code (nothing from a hub), and a tiny
NemotronH checkpoint written by transformers beside it: what a user's ``init_from=DIR`` looks like.

The BPE is trained with the ``tokenizers`` library on the texts of a few hundred expert episodes of the
built-in environments (ByteLevel, so every byte string has a tokenization). The template is ChatML as in
Nemotron 3 (``<|im_start|>role\\n ... <|im_end|>\\n``, no bos, the generation prompt opens an empty
``<think></think>``), with tool calls: an assistant message's ``tool_calls`` are written in the project's
tool-call format (``<tool_call>{"name": ..., "arguments": ...}</tool_call>``, what
``envs.tools.format_tool_call`` writes) and a tool message is a user turn wrapped in ``<tool_response>``.
"""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
# added tokens that are text (the model may write them), not specials
MARKUP = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
ENVS = ["hybrid_rl/GuessNumber-v0", "hybrid_rl/Calculator-v0", "hybrid_rl/FrozenLake-v1"]

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n<think></think>' ~ (m['content'] or '') }}"
    "{% for tc in m.get('tool_calls') or [] %}{% set f = tc['function'] if tc['function'] is defined else tc %}"
    "{{ '<tool_call>{\"name\": ' ~ (f['name'] | tojson) ~ ', \"arguments\": ' ~ (f['arguments'] | tojson) ~ '}</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{% elif m['role'] == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' ~ m['content'] ~ '\\n</tool_response><|im_end|>\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' ~ m['role'] ~ '\\n' ~ m['content'] ~ '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think></think>' }}{% endif %}"
)


def corpus(episodes_per_env: int = 60) -> list[str]:
    """Observations and actions of expert episodes on train seeds (a few hundred strings)."""
    from hybrid_rl import envs

    texts = []
    for env_id in ENVS:
        for seed in envs.seeds(env_id, "train", episodes_per_env):
            texts += [m["content"] for m in envs.expert_episode(env_id, seed).messages]
    return texts


def build_tokenizer(vocab_size: int = 420):
    """A ``PreTrainedTokenizerFast``: ByteLevel BPE trained on ``corpus()``, specials, markup, the template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
        chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False, model_max_length=1 << 20,
    )


def tiny_nemotron_h(vocab_size: int, seed: int = 0, **overrides):
    """A random ``NemotronHForCausalLM`` (every layer kind, MoE included), as transformers builds it."""
    import torch
    from transformers import NemotronHConfig, NemotronHForCausalLM

    cfg = dict(vocab_size=vocab_size, hidden_size=48, hybrid_override_pattern="M*EM", num_attention_heads=4,
               num_key_value_heads=2, head_dim=12, intermediate_size=64, mamba_num_heads=4, mamba_head_dim=12,
               ssm_state_size=8, n_groups=2, chunk_size=16, n_routed_experts=4, num_experts_per_tok=2,
               moe_intermediate_size=32, moe_shared_expert_intermediate_size=32, routed_scaling_factor=1.0,
               pad_token_id=3, bos_token_id=1, eos_token_id=5, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return NemotronHForCausalLM(NemotronHConfig(**{**cfg, **overrides})).eval()


def write_checkpoint(directory: Path, tokenizer=None, model_vocab: int | None = None) -> Path:
    """``directory`` as transformers writes it: the model's ``save_pretrained``, then the tokenizer's."""
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    model = tiny_nemotron_h(model_vocab or len(tokenizer))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
