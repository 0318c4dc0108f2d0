"""Batched cached generation over ``HybridLM.extend`` / ``decode_step`` (benchmarks and quick checks).

The rollout engine (rollout/) does continuous batching on the same cache API; this is the simple
fixed-batch loop: prefill every prompt in one ``extend``, then one ``decode_step`` per new token.
"""

from __future__ import annotations

import torch


def sample(logits_bv, greedy: bool = True, temperature: float = 1.0, top_k: int | None = None, generator=None):
    """Next token per row [B] from fp32 logits."""
    if greedy or temperature <= 0:
        return logits_bv.argmax(-1)
    logits = logits_bv / temperature
    if top_k is not None:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if generator is not None and generator.device != probs.device:  # e.g. a CPU generator for a model on a GPU
        return torch.multinomial(probs.to(generator.device), 1, generator=generator)[:, 0].to(probs.device)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def check_prompts(prompts, config) -> None:
    """Each prompt is at least one token, every id inside the vocabulary; else a ValueError naming the
    prompt and the fix (not an IndexError from the embedding, or logits of an empty row)."""
    for i, prompt in enumerate(prompts):
        ids = torch.as_tensor(prompt)
        if ids.ndim != 1 or ids.numel() == 0:
            raise ValueError(f"prompt {i} is {'empty' if ids.numel() == 0 else f'of shape {tuple(ids.shape)}'}: each "
                             "prompt is a non-empty list of token ids; start one with the BOS id "
                             f"({config.bos_token_id}) if it has nothing else")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"prompt {i} holds {ids.dtype} values; token ids are integers")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"prompt {i} holds token id {bad}, outside the model's vocabulary [0, {config.vocab_size}): "
                             "encode prompts with the tokenizer the model was trained with")


@torch.no_grad()
def generate(model, input_ids, max_new_tokens: int, greedy: bool = True, temperature: float = 1.0,
             top_k: int | None = None, eos_token_id: int | None = None, generator=None):
    """Prompts as a [B, T] tensor or a list of token lists (ragged is fine).

    Returns the new tokens [B, max_new_tokens]; after a row emits ``eos_token_id`` the rest of the row
    is ``config.pad_token_id``."""
    prompts = list(input_ids) if not torch.is_tensor(input_ids) else list(input_ids.unbind(0))
    check_prompts(prompts, model.config)
    longest = max((len(p) for p in prompts), default=0)
    cache = model.new_cache(len(prompts), capacity=max(1, longest + max_new_tokens))  # no KV growth
    logits = model.extend(cache, prompts)
    device = cache.lengths.device
    out = torch.full((len(prompts), max_new_tokens), model.config.pad_token_id, dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for i in range(max_new_tokens):
        tok = sample(logits, greedy, temperature, top_k, generator)
        tok = torch.where(done, torch.full_like(tok, model.config.pad_token_id), tok)
        out[:, i] = tok
        if eos_token_id is not None:
            done |= tok == eos_token_id
            if bool(done.all()):
                break
        if i + 1 < max_new_tokens:
            logits = model.decode_step(cache, tok)
    return out
