"""Token sampling with temperature, top-k and top-p, and the two log-probabilities RL needs.

Shapes: ``B`` rows, ``V`` vocabulary. For each sampled token we return
  - ``sample_logp``: its log-prob under the distribution actually sampled from (banned tokens removed,
    logits / temperature, top-k, then top-p, renormalised; 0 for greedy, which picks with probability 1),
  - ``plain_logp``: its log-prob under the plain softmax of the raw logits (temperature 1, nothing
    removed): what the training forward recomputes, so the two can be compared token for token.

The order temperature -> top-k -> top-p follows transformers' logits processors. Top-p keeps the
smallest prefix of the sorted distribution whose mass reaches ``top_p`` (the token that crosses the
threshold is kept; the most likely token always is). ``naive_*`` twins loop over rows in plain Python
and are what the tests hold the fast path to.

A token is drawn by inverting its row's cumulative distribution at one uniform number per row
(``inverse_cdf``). The engine takes that number from ``keyed_uniforms``: a hash of the sampler's stream
seed, the episode (env, seed, group, sample) and the token's position in it, so what an episode samples
depends on nothing else: not on the other rows of its batch, their order, the batch size, or which
worker plays it (up to logits that differ at round-off, where a token flips only when its uniform falls
within that round-off of a boundary of the cumulative distribution). It is also cheaper than
``torch.multinomial`` (one number per row instead of an exponential per vocabulary entry).
"""

from __future__ import annotations

import hashlib
import math

import torch

from hybrid_rl.model.fast import kernels

NEG_INF = float("-inf")


def sampling_logprobs(logits_bv: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      banned_v: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probs ``[B, V]`` (fp32) of the sampling distribution; removed tokens get -inf. temperature > 0."""
    if temperature <= 0:
        raise ValueError(f"sampling_logprobs needs temperature > 0 (greedy has no distribution), got {temperature}")
    x_bv = logits_bv.float() / temperature
    if banned_v is not None:
        x_bv = x_bv.masked_fill(banned_v, NEG_INF)
    vocab = x_bv.shape[-1]
    if 0 < top_k < vocab:
        kth_b1 = torch.topk(x_bv, top_k, dim=-1).values[:, -1:]
        x_bv = x_bv.masked_fill(x_bv < kth_b1, NEG_INF)
    if top_p < 1.0:
        sorted_bv, order_bv = torch.sort(x_bv, dim=-1, descending=True)
        probs_bv = torch.softmax(sorted_bv, dim=-1)
        mass_before_bv = torch.cumsum(probs_bv, dim=-1) - probs_bv
        drop_sorted_bv = mass_before_bv >= top_p
        drop_sorted_bv[:, 0] = False
        drop_bv = torch.zeros_like(drop_sorted_bv).scatter(-1, order_bv, drop_sorted_bv)
        x_bv = x_bv.masked_fill(drop_bv, NEG_INF)
    return torch.log_softmax(x_bv, dim=-1)


def inverse_cdf(probs_bv: torch.Tensor, u_b: torch.Tensor) -> torch.Tensor:
    """``[B]`` long: per row the first token whose cumulative probability exceeds ``u * total``, ``u`` in
    [0, 1): token i is drawn with probability ``p_i / total``, and a token of probability 0 never is (the
    cumulative sum, in fp64, does not rise there). Non-finite or all-zero rows are an error."""
    cdf_bv = probs_bv.double().cumsum(-1)
    total_b = cdf_bv[:, -1]
    totals = total_b.tolist()
    if not all(math.isfinite(t) and t > 0 for t in totals):
        bad = [i for i, t in enumerate(totals) if not (math.isfinite(t) and t > 0)]
        raise ValueError(f"cannot sample rows {bad[:8]}: their probabilities are not finite or sum to 0 (NaN/inf "
                         "logits from the model, or every token banned or truncated away); check the model's "
                         "weights and the sampling settings (top_k, top_p, banned ids)")
    tokens_b = torch.searchsorted(cdf_bv, (u_b.to(cdf_bv.device, torch.float64) * total_b)[:, None], right=True).squeeze(-1)
    # Below the total the first cdf entry past u * total is a token of positive probability (the cdf rises
    # there); only where u * total rounds up to the total does the search run off the end: the last token of
    # positive probability is drawn then.
    over_b = tokens_b >= cdf_bv.shape[-1]
    if bool(over_b.any()):
        last_b = (cdf_bv < total_b[:, None]).sum(-1)
        tokens_b = torch.where(over_b, last_b, tokens_b)
    return tokens_b


def episode_ident(env_id: str, seed: int, group_id: int, sample_index: int) -> bytes:
    """The bytes ``keyed_uniforms`` hashes for one episode: which env, seed, group and sample it is."""
    return f"{env_id}\x1f{seed}\x1f{group_id}\x1f{sample_index}\x1f".encode()


_KEYED: dict[tuple[int, bytes], "hashlib._Hash"] = {}  # (stream, ident) -> the keyed hash after the ident


def keyed_uniforms(stream: int, idents: list[bytes], positions: list[int]) -> torch.Tensor:
    """``[B]`` fp64 uniforms in [0, 1) with 53 random bits, row b's a function of (``stream``, ``idents[b]``,
    ``positions[b]``) only: BLAKE2b keyed by the stream seed over the episode's ident and the position.
    Each episode's hash state after its ident is kept and copied for each position (the key block and the
    ident are hashed once per episode, not once per token: the same digests)."""
    out = []
    for ident, pos in zip(idents, positions):
        prefix = _KEYED.get((stream, ident))
        if prefix is None:
            if len(_KEYED) >= 65536:  # episodes come and go: forget the old ones
                _KEYED.clear()
            key = (stream % (1 << 128)).to_bytes(16, "little")
            prefix = _KEYED[(stream, ident)] = hashlib.blake2b(ident, key=key, digest_size=8)
        h = prefix.copy()
        h.update(pos.to_bytes(8, "little"))
        out.append((int.from_bytes(h.digest(), "little") >> 11) * 2.0 ** -53)
    return torch.tensor(out, dtype=torch.float64)


def sample(logits_bv: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           banned_v: torch.Tensor | None = None, generator: torch.Generator | None = None,
           uniforms_b: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one token per row -> (tokens [B] long, sample_logp [B], plain_logp [B]) (fp32).

    ``uniforms_b``: the row's uniform numbers (``keyed_uniforms``); else drawn from ``generator``."""
    if not temperature >= 0:
        raise ValueError(f"sample needs temperature >= 0 (0: greedy), got {temperature}")
    logits_bv = logits_bv.float()
    if banned_v is not None and banned_v.device != logits_bv.device:
        banned_v = banned_v.to(logits_bv.device)
    plain_bv = torch.log_softmax(logits_bv, dim=-1)
    if temperature == 0:
        masked_bv = logits_bv if banned_v is None else logits_bv.masked_fill(banned_v, NEG_INF)
        tokens_b = masked_bv.argmax(dim=-1)
        sample_logp_b = torch.zeros(tokens_b.shape, dtype=torch.float32, device=tokens_b.device)
        return tokens_b, sample_logp_b, plain_bv.gather(-1, tokens_b[:, None]).squeeze(-1)
    allowed_a = None
    if banned_v is not None and top_k == 0 and top_p == 1.0:
        # only the allowed columns (exp of -inf is a slow path): the same distribution, drawn from the
        # same cumulative sums (a banned token adds an exact 0 to them)
        allowed_a = _allowed(banned_v)
        x_ba = logits_bv.index_select(-1, allowed_a)
        # x / 1.0 is x: the division only where it changes something (sampling_logprobs' arithmetic)
        logp_bv = torch.log_softmax(x_ba if temperature == 1.0 else x_ba / temperature, dim=-1)
    else:
        logp_bv = sampling_logprobs(logits_bv, temperature, top_k, top_p, banned_v)
    if uniforms_b is None:
        uniforms_b = torch.rand(logits_bv.shape[0], generator=generator, dtype=torch.float64)
    probs_bv = logp_bv.exp()
    picked = _pick(probs_bv, logp_bv, plain_bv, allowed_a, uniforms_b)
    if picked is not None:
        return picked
    tokens_b = inverse_cdf(probs_bv, uniforms_b)
    sample_logp_b = logp_bv.gather(-1, tokens_b[:, None]).squeeze(-1)
    if allowed_a is not None:
        tokens_b = allowed_a.index_select(0, tokens_b)
    return tokens_b, sample_logp_b, plain_bv.gather(-1, tokens_b[:, None]).squeeze(-1)


_ALLOWED: tuple = (None, None, None)  # (banned mask, its version, the allowed ids): an engine's mask is fixed


def _allowed(banned_v: torch.Tensor) -> torch.Tensor:
    """``[A]`` long: the ids ``banned_v`` allows (kept for the last mask asked about, while its version counter
    says it is unchanged; an inference tensor keeps no such counter and is read every time)."""
    global _ALLOWED
    mask, version, allowed = _ALLOWED  # one read: another thread may replace the entry meanwhile
    if banned_v.is_inference():
        return (~banned_v).nonzero().squeeze(1)
    if mask is not banned_v or version != banned_v._version:
        allowed = (~banned_v).nonzero().squeeze(1)
        _ALLOWED = (banned_v, banned_v._version, allowed)
    return allowed


def _pick(probs_ba, logp_ba, plain_bv, allowed_a, uniforms_b):
    """``inverse_cdf`` and the three look-ups after it in one kernel call (kernels/sample.c: the same cumulative
    sums, bit for bit) -> (tokens, sample_logp, plain_logp); None where the kernels cannot take these tensors
    (not built or turned off, another device, not one uniform per row) or a row cannot be drawn
    (``inverse_cdf`` then raises its error)."""
    (rows, a), v = probs_ba.shape, plain_bv.shape[-1]
    uniforms_b = uniforms_b.double().contiguous()
    tensors = (probs_ba, logp_ba, plain_bv, uniforms_b) + (() if allowed_a is None else (allowed_a,))
    if uniforms_b.shape != (rows,) or any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        return None  # (one uniform per row only: the tensor path broadcasts or refuses other shapes)
    lib = kernels.library() if kernels.enabled() else None
    if lib is None:
        return None
    tokens_b = torch.empty(rows, dtype=torch.long)
    sample_logp_b, plain_logp_b = torch.empty(rows), torch.empty(rows)
    p = kernels.ptr
    bad = lib.sample_pick(p(probs_ba), p(logp_ba), p(plain_bv), p(allowed_a) if allowed_a is not None else None,
                          p(uniforms_b), p(tokens_b), p(sample_logp_b), p(plain_logp_b), rows, a, v)
    return None if bad else (tokens_b, sample_logp_b, plain_logp_b)


# ----------------------------------------------------------------------------- naive twins


def naive_sampling_probs(logits_v: list[float], temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                         banned: set[int] = frozenset()) -> list[float]:
    """One row, plain Python: the probability of every token under the sampling distribution."""
    scaled = [(x / temperature if i not in banned else NEG_INF) for i, x in enumerate(logits_v)]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    keep = [i for i in order if scaled[i] > NEG_INF]
    if 0 < top_k < len(keep):
        kth = scaled[keep[top_k - 1]]
        keep = [i for i in keep if scaled[i] >= kth]  # ties with the k-th are kept, like the fast path
    if top_p < 1.0:
        top = max(scaled[i] for i in keep)
        z = sum(math.exp(scaled[i] - top) for i in keep)
        kept, mass = [], 0.0
        for i in keep:
            if kept and mass >= top_p:
                break
            kept.append(i)
            mass += math.exp(scaled[i] - top) / z
        keep = kept
    top = max(scaled[i] for i in keep)
    z = sum(math.exp(scaled[i] - top) for i in keep)
    probs = [0.0] * len(scaled)
    for i in keep:
        probs[i] = math.exp(scaled[i] - top) / z
    return probs


def naive_plain_logprob(logits_v: list[float], token: int) -> float:
    top = max(logits_v)
    return logits_v[token] - top - math.log(sum(math.exp(x - top) for x in logits_v))
