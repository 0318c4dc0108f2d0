"""What a Nim checkpoint would play: the probability of the right move (``pile % 4``) as its next token, at
the first move from every starting pile and in mid-game after "I take 2: N left.", read off one forward
over the rendered conversation (no sampling). Used for docs/RESULTS.md ("Why RL does not move Nim").

    .venv/bin/python scripts/probe_nim.py runs/NAME/sft/step_400 runs/NAME/rl/step_240
"""

from __future__ import annotations

import sys

import torch

from hybrid_rl.envs.nim import Nim
from hybrid_rl.model.hf import load_pretrained
from hybrid_rl.model.tokenizer import checkpoint_tokenizer

FIRST = "{} stones. Take 1, 2 or 3 each turn; whoever takes the last stone wins."


def next_move_probs(model, tok, messages) -> dict[int, float]:
    ids, _ = tok.render_chat(messages)
    with torch.no_grad():
        out = model(torch.tensor([ids + tok.generation_prefix()]))
    probs = torch.softmax((out.logits if hasattr(out, "logits") else out)[0, -1].float(), -1)
    return {k: float(probs[tok.encode(str(k))[0]]) for k in (1, 2, 3)}


def main(paths: list[str]) -> None:
    env = Nim()
    starts = [n for n in range(env.min_stones, env.max_stones + 1) if n % 4]
    for path in paths:
        model, tok = load_pretrained(path).float().eval(), checkpoint_tokenizer(path)
        first = {n: next_move_probs(model, tok, [{"role": "user", "content": FIRST.format(n)}])[n % 4] for n in starts}
        mid = {n: next_move_probs(model, tok, [{"role": "user", "content": FIRST.format(23)}, {"role": "assistant", "content": "3"},
                                               {"role": "user", "content": f"I take 2: {n} left."}]) for n in range(2, 19)}
        print(path)
        print("  first move, p(right):", " ".join(f"{n}:{p:.3f}" for n, p in first.items()))
        print("  mid-game, p(1/2/3):  ", " ".join(f"{n}:" + "/".join(f"{q[k]:.2f}" for k in (1, 2, 3)) for n, q in mid.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
