"""What Buttons asks of a policy, and what a checkpoint has learned of it. Used for docs/RESULTS.md ("What
Buttons asks for").

1. Three fixed policies on the val seeds (300) and the held-out eval seeds (100), no noise: the greedy
   heuristic (the teacher's rule: multiply whenever the product stays at or below the target), a rule that
   looks one press ahead with the remainder ``(target - x) mod a`` (multiply when the product is safe and
   the gap it leaves is a multiple of ``a``; else add when the gap left now is a multiple of ``a``; else
   greedy), and the optimal expert.
2. For each checkpoint given: along the remainder rule's path through every val puzzle, the probability of
   the rule's key as the checkpoint's next token (read off one forward over the rendered conversation, no
   sampling), split by whether the greedy heuristic would press the same key there. Where the two
   disagree is where greedy loses; a policy that learned the remainder puts its mass on the rule's key there.

    .venv/bin/python scripts/probe_buttons.py [runs/NAME/sft/step_400 runs/NAME/rl/step_240 ...]
"""

from __future__ import annotations

import statistics
import sys

import torch

from hybrid_rl import envs
from hybrid_rl.envs.buttons import Buttons

ENV = "hybrid_rl/Buttons-v0"


def greedy(env: Buttons) -> str:
    return "*" if env.value * env.mul <= env.target else "+"


def remainder_rule(env: Buttons) -> str:
    gap_after_mul = env.target - env.value * env.mul
    if gap_after_mul >= 0 and gap_after_mul % env.add == 0:
        return "*"
    if (env.target - env.value) % env.add == 0:
        return "+"
    return greedy(env)


def expert(env: Buttons) -> str:
    return env.expert_action(noise=0.0)[0]


def press(env: Buttons, op: str) -> str | None:
    """Apply a key; the observation, or None when the episode ended (reached or past the target)."""
    env.value = env.value + env.add if op == "+" else env.value * env.mul
    return None if env.value >= env.target else f"now {env.value}"


def success(policy, seeds: list[int]) -> float:
    env, wins = Buttons(), 0
    for seed in seeds:
        env.reset(seed=seed)
        while press(env, policy(env)) is not None:
            pass
        wins += env.value == env.target
    return wins / len(seeds)


def key_probs(model, tok, messages) -> dict[str, float]:
    ids, _ = tok.render_chat(messages)
    with torch.no_grad():
        out = model(torch.tensor([ids + tok.generation_prefix()]))
    probs = torch.softmax((out.logits if hasattr(out, "logits") else out)[0, -1].float(), -1)
    return {op: float(probs[tok.encode(op)[0]]) for op in "+*"}


def probe(path: str, seeds: list[int]) -> dict[str, list[float]]:
    """p(the remainder rule's key) at the states of its path, by whether greedy agrees there."""
    from hybrid_rl.model.hf import load_pretrained
    from hybrid_rl.model.tokenizer import checkpoint_tokenizer

    model, tok = load_pretrained(path).float().eval(), checkpoint_tokenizer(path)
    env, out = Buttons(), {"agree": [], "disagree": []}
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        messages = [{"role": "user", "content": obs}]
        while True:
            op = remainder_rule(env)
            out["agree" if op == greedy(env) else "disagree"].append(key_probs(model, tok, messages)[op])
            key = f"+{env.add}" if op == "+" else f"*{env.mul}"
            obs = press(env, op)
            if obs is None:
                break
            messages += [{"role": "assistant", "content": key}, {"role": "user", "content": obs}]
    return out


def main(paths: list[str]) -> None:
    val, held_out = envs.seeds(ENV, "val", 300), envs.seeds(ENV, "eval", 100)
    for name, policy in (("greedy heuristic", greedy), ("remainder rule", remainder_rule), ("optimal expert", expert)):
        print(f"{name:18s} success: val {success(policy, val):.2f}, eval {success(policy, held_out):.2f}")
    for path in paths:
        got = probe(path, val)
        print(path)
        for where, ps in got.items():
            print(f"  greedy {where}s with the rule ({len(ps)} states): mean p(rule's key) {statistics.fmean(ps):.3f}, "
                  f"share above 0.5 {sum(p > 0.5 for p in ps) / len(ps):.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
