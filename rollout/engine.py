"""The generation engine: multi-turn episodes played with batched, cached, continuous decoding.

One ``Engine`` holds a model, a tokenizer and a set of environment instances. ``play(requests)`` runs
GRPO groups (``GroupRequest``: env id, seed, G samples) to completion and returns one ``Trajectory`` per
episode. A row of the batch samples, waits for its environment, or waits to feed its observation; each
pass of the loop:

1. admit: fill free rows of the batch (at most ``max_batch_episodes``) with waiting episodes. New groups
   reset their environments (all together, on the env workers), render the prompt ``bos_prefix + system +
   observation + generation_prefix``, prefill it ONCE and fork that cache row for the G samples (identical
   prompts share one prefill; the forks of one admission are one ``select`` of the prefill and one ``cat``).
2. sample one token for every row that has fed all its tokens (``sampling.sample``: the token, its
   log-prob under the sampling distribution and under the plain softmax). A turn ends at ``<|end|>``, at
   ``max_turn_tokens``, at the episode token limit or at a stop string (then ``<|end|>`` is appended as a
   NON-action token), followed by the tokenizer's ``end_suffix`` (none for the byte tokenizer, ChatML's
   newline), also NON-action, so the ids stay identical to ``render_chat`` of the conversation. A row whose
   turn ended hands the action to its environment, which steps on a worker thread (``EnvCalls``), or at
   once on this thread when it declares its steps instant (``envpool.steps_instantly``: pure games and
   puzzles; the hand-off to a worker and back costs more than such a step).
3. collect the environments that have answered (without waiting, unless no row has anything to feed). A
   finished episode leaves its row; finished rows are dropped from the batch (``cache.select``; their slots
   refilled at step 1 at once) when episodes are waiting for the room or a quarter of the rows are done;
   until then they stay, left out of every forward (``_compact``). Each next observation is rendered as
   one message plus the generation prefix.
4. forward, once per pass: the rows whose turn goes on feed the token they just sampled, and the rows whose
   environment answered feed their unfed tokens (the turn's closing tokens, the end suffix and the
   observation; only the new tokens, the history is never re-prefilled or re-tokenized), all in one
   ``model.extend`` of those rows alone (``HybridLM.extend(rows=...)``: packed without padding, in place,
   the other rows not touched), or one ``model.decode_step`` when every row feeds one token. A row waiting
   for its environment is not in it: a slow environment holds its own row, not the batch, and an
   observation costs no call of its own (a decode step costs nearly the same for 20 rows as for 32, so
   the weights are read once for both kinds of rows). Before the forward, a pass in which turns ended
   waits a moment (``ENV_GRACE_S``, 2 ms at most) for those environments: an instant one answers within
   it, and its row feeds the observation in this forward instead of sitting one out (the bench's 32
   episodes: 64 forwards instead of 67).

No schedule changes an episode: a row's arithmetic in the model's kernels does not depend on the other rows
of its forward (nor on whether its tokens come one per step or together), and each sampled token is drawn
from a uniform keyed by its episode and position (``sampling.keyed_uniforms``). Environment errors and
time-outs end only their own episode (status ``env_error`` / ``timeout``, kept in the records). An env
without hybrid-rl's info keys plays as it is: ``success`` defaults to "terminated with a positive reward"
(``envs.episode_success``), ``invalid_action`` to False. ``reprefill=True`` is the baseline the benchmark
compares against: rebuild a row's cache from the whole history at every turn.

Where the time goes (``hybrid-rl bench rollout``'s throughput run: ``tiny``, 32 four-turn FixedTurns
episodes on 32 rows, one torch thread, 2-core machine). The engine feeds ~2,650 observation and prompt
tokens besides the ~1,940 it generates, while the raw decode loop it is compared with feeds only what it
generates; so its share of the raw loop is bounded by how cheaply a forward takes an observation token.
A decode step of ``tiny`` costs ~2.7 ms plus ~0.26 ms per row (1 row 2.1 ms, 32 rows 10.9 ms): each
forward call has a fixed price, so this loop makes one per pass. Before it, extensions went through
PyTorch (MKL re-packs every weight on each call: a ~4 ms floor, and 13 of 16 boundary extensions had 1-4
rows) with the rows copied out and back, the decode GEMMs used 8-lane vectors, and every pass waited for
every stepping environment: the engine ran at 38% of the raw loop, and a 50 ms environment doubled the wall
time (2.0x). Now an extension is one kernel call over the packed new tokens in place
(``fused.DecodeProgram.extend``), the GEMMs take two panels at a time in 16 lanes where the CPU has them
(the same sums, bit for bit), and the environments step beside the batch: the engine ran at 42-46% of
the raw loop on a quiet machine (best of 10 alternating runs; this shared machine's speed moves by up to
2x from minute to minute), and the 50 ms environment costs 1.0-1.1x the instant one's wall time. Schedules
measured there: feeding observations in an extension of their own as soon as they arrive, 0.434; only
once half the batch waits, 0.427; in the same forward as the decoding rows (this loop), 0.459. Then the
per-position kernels (the Mamba scan in 16 lanes with B and C held in registers, attention eight keys at a
time with its value sum in registers), one flat token tensor per extension, a cheaper draw (banned columns
left out instead of exp(-inf), one inverse-CDF pass) and the grace wait above: the recorded run is 0.50
(the median of five paired rounds, 0.42-0.54), with 64 forwards. Instant environments then stepped on this
thread (no worker hand-off): 10% less wall time in alternating runs; the run recorded after it, in a slow
stretch of the machine, is 0.47 (rounds 0.44-0.49), the engine's own work 7% of its time; the next recorded
run (4fb614d) 0.51 (rounds 0.46-0.54). Of a run, the model's kernels are ~87%, their Python wrappers ~5%;
sampling, bookkeeping and env calls the rest. On an AMD EPYC machine (AVX-512; both kernels' GEMMs at the
core's peak) the ratio was 0.43 (14a50af): an observation token cost ~0.7 of a decode token there. Then
extensions stopped computing what no logit reads: past the last layer that writes the cache only each row's
last new token goes on (``tiny``: the last attention layer's queries and output and the final MoE layer,
~10% of an extension), 0.48 (32423a9; rounds 0.45-0.49). What is left there: the decode steps run at ~107
us a token against ~87 in a bare loop of 30-32 rows over 32-token rows; about half of that is attention
over the engine's longer rows (100-180 tokens against the raw loop's 32-96; a bare loop over 100-150-token
rows takes 94-96 us: the fp32 keys and values of 32 rows stream from memory at every step), the rest per-call
Python on cold caches, page faults of grown buffers and fewer rows per step; the engine's own work is ~9%.
The benchmark now plays two untimed rounds of each side first (a process's first full-size plays ran at
0.34-0.39 of the raw loop, the later ones at 0.45-0.52): 0.48 again (dc0e63c; rounds 0.46-0.50). A sampling
profile of steady-state plays there: the kernels ~80% of the time (GEMMs ~55% at the core's peak, the Mamba
scan ~10%, attention ~6%), the Python around the model's calls ~7% (the weights-signature check ~1.3%),
sampling ~4%, the rest of the engine's work ~9%; with no own work and the engine's decode steps at the raw
loop's speed the ratio would be ~0.53, so the bar of 0.5 is in the engine's per-pass Python, spread over many
~1% pieces. Two of those pieces were larger than they looked: between two kernel calls the caches hold
the weights, not Python's objects, so the weights check of each forward (every parameter's identity,
version and storage) took ~150 us instead of the ~20 us it takes in a loop, and the dozen small tensor ops
of a draw were as slow. The engine now plays inside ``HybridLM.steady_weights()`` (the weights are checked at
the first forward and after each load by the step hook, not at every forward), the draw after the softmax
is one kernel call (``kernels/sample.c``, the same cumulative sums bit for bit), the first pre-norm runs
inside the layer kernels and the embedding rows are read without a module call: the same tokens, 4-8% less
time in alternating in-process runs. Timed directly (``perf_counter`` around each kernel call, which a
sampling profiler does not give: its pauses cool the caches and inflate Python's share), the kernels are
87% of a play (extensions 68%, decode steps 18%) and the engine's Python 13%. The decode-like forwards run
at ~93 us a token (the raw loop: ~87), the observation extensions at 52-60. Five runs of the benchmark on
the AMD machine since: 0.467, 0.506, 0.491, 0.547, 0.534 (65213c2) and 0.510 (the recorded one, f4579ce;
medians of five paired rounds, rounds 0.44-0.61). The ratio moves with the machine: it was highest in the runs where the
raw loop was slowest (7,800-8,000 tokens/s against 9,200-10,600), as when the memory the weights stream
from is shared with other work. See docs/BENCHMARKS.md for the recorded figures.

Departure from plain sampling: only text tokens and ``<|end|>`` may be sampled (other specials and ids
past the tokenizer's vocabulary are banned; ``banned_token_mask``), so a generated action is text only
(with the byte tokenizer it renders back to the same ids; a BPE tokenizer may tokenize the text otherwise
than it was sampled, and the trajectory keeps the sampled ids). ``Trajectory.sample_logprobs`` are under
that renormalised distribution; ``Trajectory.logprobs`` under the plain softmax, which is what the
trainer's forward recomputes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from hybrid_rl.envs.contract import read_step, reset_problem, text_problem
from hybrid_rl.envs.core import episode_success
from hybrid_rl.model.cache import HybridCache
from hybrid_rl.rollout.config import EpisodeConfig, SamplingConfig
from hybrid_rl.rollout.envpool import EnvCalls, EnvFailure, EnvPool, EnvTimeout, steps_instantly
from hybrid_rl.rollout.sampling import episode_ident, keyed_uniforms, sample
from hybrid_rl.rollout.trajectory import Trajectory

log = logging.getLogger("hybrid_rl.rollout")


@dataclass
class GroupRequest:
    """G episodes of one environment seed (a GRPO group); G = 1 for evaluation."""

    env_id: str
    seed: int
    group_id: int = 0
    num_samples: int = 1
    env_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples} (group {self.group_id})")


class _Episode:
    """One episode in flight: its record, its env, and how many of its tokens the cache row holds."""

    __slots__ = ("traj", "env", "request", "fed", "turn_start", "routing", "ident", "call")

    def __init__(self, traj: Trajectory, env, request: GroupRequest):
        self.traj, self.env, self.request = traj, env, request
        self.ident = episode_ident(traj.env_id, traj.seed, traj.group_id, traj.sample_index)  # its sampling key
        self.fed = 0  # tokens of traj.token_ids already in the cache row
        self.turn_start = 0  # index of this turn's first generated token
        self.routing: list | None = None  # routed experts per fed token (record_routing)
        self.call: EnvCalls | None = None  # its env's step, while it runs


class _Prefix:
    """A prefilled prompt (row ``row`` of the prefill's cache, shared with the other prompts prefilled with it, and
    its last logits) waiting to be forked into free rows."""

    __slots__ = ("cache", "row", "logits_1v", "routing", "episodes")

    def __init__(self, cache, row, logits_1v, routing, episodes):
        self.cache, self.row, self.logits_1v, self.routing = cache, row, logits_1v, routing
        self.episodes = deque(episodes)


def model_vocab_size(model) -> int:
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "vocab_size", 0) or getattr(model, "vocab_size"))


def banned_token_mask(tokenizer, vocab_size: int, ascii_only: bool = False) -> torch.Tensor:
    """``[V]`` bool: ids the policy may not sample. Every special but the stop token, every id past the
    tokenizer's vocabulary (the model's embedding is padded), and with ``ascii_only`` bytes >= 128.
    Generated ids thus always decode to text that ``render_chat`` turns back into the same ids."""
    banned = torch.zeros(vocab_size, dtype=torch.bool)
    banned[min(int(tokenizer.vocab_size), vocab_size):] = True
    offset = getattr(tokenizer, "byte_offset", None)
    if offset is not None:  # the byte tokenizer: ids below the first byte are specials
        banned[:offset] = True
        if ascii_only:
            banned[offset + 128: offset + 256] = True
    else:
        hf = getattr(tokenizer, "hf", None)
        for i in getattr(hf, "all_special_ids", []) or []:
            if 0 <= i < vocab_size:
                banned[i] = True
        if ascii_only:
            raise ValueError("sampling.ascii_only is only supported with the byte tokenizer")
    banned[tokenizer.end_id] = False
    return banned


class Engine:
    def __init__(self, model, tokenizer, sampling: SamplingConfig | None = None, episode: EpisodeConfig | None = None,
                 *, policy_version: int = 0, worker_name: str = "", reprefill: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.sampling = sampling or SamplingConfig()
        self.episode = episode or EpisodeConfig()
        self.policy_version = policy_version
        self.worker_name = worker_name
        self.reprefill = reprefill
        self.end_id = int(tokenizer.end_id)
        self.end_suffix = [int(i) for i in tokenizer.end_suffix]  # after a turn's end token, not generated
        self.banned_v = banned_token_mask(tokenizer, model_vocab_size(model), self.sampling.ascii_only)
        # the sampler's stream seed: with the episode and the token's position it fixes every sampled token
        # (``sampling.keyed_uniforms``); the pools reseed it per policy version (``reseed``)
        self.stream_seed = self.sampling.seed if self.sampling.seed is not None else int.from_bytes(os.urandom(8), "little")
        self.envs = EnvPool()
        self._answered = threading.Event()  # set by every env step that ends (``_collect`` waits on it)
        self._not_instant: set[type] = set()  # env classes that declared instant steps and took too long
        self._no_room_warned: set[str] = set()  # env ids whose prompt did not fit max_episode_tokens (warned once)
        self._slow_inline: dict[type, int] = {}  # inline calls of such a class over the limit so far
        self._inline_calls: dict[type, int] = {}  # ... and all its inline calls
        # called before every decode step (weight updates); returns False when it changed no weight (anything
        # else: the model checks its weights before the next forward, ``HybridLM.steady_weights``)
        self.step_hook: Callable[[], bool | None] | None = None
        self.batch_trace: list[int] | None = None  # set to [] to record the episodes in the batch at every pass
        # counts, and seconds inside the model's decode steps and cache extensions (prefills included): the
        # rest of a ``play`` is the engine's own work (sampling, bookkeeping, waiting on environments)
        self.stats = dict(forward_calls=0, decode_steps=0, extend_calls=0, prefill_tokens=0, fed_tokens=0,
                          generated_tokens=0, episodes=0, decode_tokens=0, decode_s=0.0, extend_s=0.0, idle_row_steps=0,
                          compactions=0)

    def reseed(self, stream_seed: int) -> None:
        """Sample from the stream ``stream_seed`` from the next token on (the pools: one per policy version)."""
        self.stream_seed = int(stream_seed)

    # ------------------------------------------------------------------ the loop
    def play(self, requests: Iterable[GroupRequest]) -> list[Trajectory]:
        """Play every episode of every request; trajectories come back in completion order.

        A row of the batch is at any time in one of four states: it has fed every token and samples next;
        its turn ended and its environment is stepping (``ep.call``); its environment answered and its
        closing tokens and next observation wait to be fed; or it is finished (``None``). Each pass samples
        the rows that can, collects the environments that have answered, and then feeds in ONE forward the
        token just sampled by every row whose turn goes on and the observation of every row whose
        environment answered (``_forward``); the rows still waiting for their environment are not in it."""
        pending = deque(requests)
        prefixes: deque[_Prefix] = deque()
        finished: list[Trajectory] = []
        rows: list[_Episode] = []
        cache, logits_bv = None, None
        was_training = self.model.training
        self.model.eval()
        try:
            # the weights change only in the step hook: the model checks them then, not at every forward
            steady = getattr(self.model, "steady_weights", contextlib.nullcontext)
            changed = getattr(self.model, "weights_changed", lambda: None)
            with torch.inference_mode(), steady():
                while True:
                    if self.step_hook is not None and self.step_hook() is not False:
                        changed()  # the hook loaded weights (or may have)
                    cache, logits_bv = self._admit(rows, cache, logits_bv, prefixes, pending, finished)
                    if all(ep is None for ep in rows):
                        break
                    if self.batch_trace is not None:
                        self.batch_trace.append(sum(ep is not None for ep in rows))
                    live = [i for i, ep in enumerate(rows) if ep is not None and ep.call is None
                            and ep.fed == len(ep.traj.token_ids)]
                    started = []  # rows whose turn ended in this pass: their env steps now
                    if live:
                        uniforms_b = None if self.sampling.temperature == 0 else keyed_uniforms(
                            self.stream_seed, [rows[i].ident for i in live], [len(rows[i].traj.token_ids) for i in live])
                        tokens_b, sample_logp_b, plain_logp_b = sample(
                            (logits_bv if len(live) == len(rows) else logits_bv[live]).float().cpu(),
                            self.sampling.temperature, self.sampling.top_k, self.sampling.top_p, self.banned_v,
                            uniforms_b=uniforms_b)
                        for i, token, sample_logp, plain_logp in zip(live, tokens_b.tolist(), sample_logp_b.tolist(),
                                                                     plain_logp_b.tolist()):
                            ep = rows[i]
                            action = self._append_sampled(ep, token, sample_logp, plain_logp)
                            if action is not None:  # the env steps (a worker thread, or here if instant)
                                ep.call = self._env_calls([ep.env], [_step_fn(ep.env, action)])
                                started.append(i)
                    unfed = lambda: [i for i, ep in enumerate(rows)  # noqa: E731
                                     if ep is not None and ep.call is None and ep.fed < len(ep.traj.token_ids)]
                    others_feed = bool(unfed())  # rows with tokens to feed: nothing to block on
                    if started and others_feed:
                        self._grace(rows, started)
                    self._collect(rows, finished, block=not others_feed)
                    cache, logits_bv = self._compact(rows, cache, logits_bv, bool(prefixes or pending))
                    if not rows:
                        cache, logits_bv = None, None
                        continue
                    feeding = unfed()
                    if feeding:
                        cache, logits_bv = self._forward(cache, rows, feeding, logits_bv)
        except BaseException:
            self._abandon(rows, prefixes)
            raise
        finally:
            self.model.train(was_training)
        return finished

    def _abandon(self, rows, prefixes) -> None:
        """An exception ends ``play``: the environments of the episodes still in flight are closed (in the
        background, as a broken env is), not left open outside the pool."""
        eps = [ep for ep in rows if ep is not None] + [ep for prefix in prefixes for ep in prefix.episodes]
        for ep in eps:
            if ep.env is not None:
                self.envs.discard(ep.env)
                ep.env = None

    def _collect(self, rows, finished: list, block: bool) -> None:
        """Book the answers of the environments that have answered (or timed out); with ``block`` and nothing
        answered yet, wait for the first. A finished episode leaves its row (``None``); the others get their
        next observation appended, to be fed."""
        stepping = [i for i, ep in enumerate(rows) if ep is not None and ep.call is not None]
        timeout_s = self.episode.env_timeout_s
        while stepping:
            self._answered.clear()  # before looking: an answer from now on sets it again
            done = [i for i in stepping if rows[i].call.finished(timeout_s)]
            for i in done:
                ep = rows[i]
                (outcome,) = ep.call.results(timeout_s)
                ep.call = None
                if self._after_step(ep, outcome):
                    finished.append(self._finish(ep))
                    rows[i] = None
            if done or not block:
                return
            self._answered.wait(min(rows[i].call.time_left(timeout_s) for i in stepping) if timeout_s else None)

    ENV_GRACE_S = 0.002  # how long a pass waits for the environments of the turns that ended in it
    INSTANT_LIMIT_S = 0.005  # an env call declared instant that takes longer: its class goes to the workers
    SLOW_INLINE_CALLS = 2  # ... once this many of its inline calls did, and at least half of them

    def _env_calls(self, envs: list, fns: list) -> EnvCalls:
        """``fns`` (one call of each env in ``envs``) on the env workers, or here and now when every one of
        those envs declares instant steps (``steps_instantly``). A class whose inline calls took longer than
        ``INSTANT_LIMIT_S`` ``SLOW_INLINE_CALLS`` times is stepped on the workers from then on (a warning says
        which): a slow step here would hold every row of the batch, and no timeout can stop it. Slow calls now and
        then do not move it: only ``SLOW_INLINE_CALLS`` of them that are also at least half of its inline calls.
        The clock also counts the moments this thread was not running (another process on the cores, a first
        call's lazy set-up), which an instant environment has now and then (the quickstart's eval logged two
        such stalls of 5-6 ms among hundreds of FrozenLake calls of well under 1 ms)."""
        kinds = [type(getattr(env, "unwrapped", env)) for env in envs]
        inline = all(steps_instantly(env) and kind not in self._not_instant for env, kind in zip(envs, kinds))
        t0 = time.perf_counter()
        calls = EnvCalls(fns, on_done=self._answered.set, inline=inline)
        took_s = time.perf_counter() - t0
        if inline and fns:
            for kind in set(kinds):
                self._inline_calls[kind] = self._inline_calls.get(kind, 0) + 1
        if inline and fns and took_s > self.INSTANT_LIMIT_S * len(fns):
            slow = set(kinds)
            for kind in slow:
                self._slow_inline[kind] = self._slow_inline.get(kind, 0) + 1
            # slow often (SLOW_INLINE_CALLS times) and for at least half of its calls: an env that is slow is slow
            # at most calls, a stall of this thread (another process on the cores) hits one call now and then
            moved = {kind for kind in slow if self._slow_inline[kind] >= self.SLOW_INLINE_CALLS
                     and 2 * self._slow_inline[kind] >= self._inline_calls[kind]}
            self._not_instant |= moved
            if moved:
                log.warning("%s declare instant_steps, but %d of their inline calls took over %.0f ms (the last: %d "
                            "call(s) in %.1f ms): stepping them on worker threads from now on (set instant_steps = "
                            "False on an environment that can wait or block)", ", ".join(sorted(k.__name__ for k in moved)),
                            self.SLOW_INLINE_CALLS, self.INSTANT_LIMIT_S * 1e3, len(fns), took_s * 1e3)
        return calls

    def _grace(self, rows, started: list[int]) -> None:
        """Wait a moment (at most ``ENV_GRACE_S``) for the environments of the turns that ended in this pass.
        One that answers within it has its observation fed in this pass's forward instead of sitting out a
        forward and feeding it in the next (an instant environment answers in a fraction of a millisecond,
        once its worker thread gets the interpreter); a slower one costs the pass that moment only."""
        deadline = time.monotonic() + self.ENV_GRACE_S
        timeout_s = self.episode.env_timeout_s
        while True:
            self._answered.clear()  # before looking: an answer from now on sets it again
            if all(rows[i].call.finished(timeout_s) for i in started):
                return
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                return
            self._answered.wait(left_s)

    DEAD_ROWS_FRACTION = 0.25  # finished rows stay in the batch (left out of every step) until this share of it

    def _compact(self, rows, cache, logits_bv, more_to_admit: bool):
        """Drop the finished rows (``None`` in ``rows``) from the batch, or leave them in it for now.

        Copying the cache of the rows that go on (``select``) costs milliseconds (``tiny``'s 64 rows: 32 MB),
        while a finished row left in the batch costs nothing (the decode steps leave it out). The rows are
        compacted once a quarter of them are done, or when waiting episodes need the room."""
        dead = sum(ep is None for ep in rows)
        if not dead or (not more_to_admit and dead < len(rows) and dead < self.DEAD_ROWS_FRACTION * len(rows)):
            return cache, logits_bv
        live = [i for i, ep in enumerate(rows) if ep is not None]
        rows[:] = [rows[i] for i in live]
        if not live:
            return None, None
        self.stats["compactions"] += 1
        return cache.select(live), logits_bv[live]

    # ------------------------------------------------------------------ admission and prefill
    def _admit(self, rows, cache, logits_bv, prefixes, pending, finished):
        """Fill the free rows with waiting episodes, each a fork of its prompt's prefilled row. The new rows are
        copied out of each prefill's cache by one ``select`` (its rows repeated, one per episode) and joined to
        the batch by one ``cat``: a cache copy per prefill, not one per prompt and a growing batch per group."""
        free = self.episode.max_batch_episodes - len(rows)
        picks: list[tuple[object, list[int]]] = []  # (prefill cache, its rows to copy, in order)
        new_logits = []
        while free > 0 and (prefixes or pending):
            if not prefixes:
                prefixes.extend(self._start_groups(pending, free, finished))
                continue
            prefix = prefixes[0]
            n = min(free, len(prefix.episodes))
            new_eps = [prefix.episodes.popleft() for _ in range(n)]
            for ep in new_eps:
                ep.routing = list(prefix.routing) if prefix.routing is not None else None
            rows.extend(new_eps)
            if picks and picks[-1][0] is prefix.cache:
                picks[-1][1].extend([prefix.row] * n)
            else:
                picks.append((prefix.cache, [prefix.row] * n))
            new_logits.append(prefix.logits_1v.expand(n, -1))
            free -= n
            if not prefix.episodes:
                prefixes.popleft()
        if picks:
            parts = [c.select(picked) for c, picked in picks]
            if cache is not None:
                parts.insert(0, cache)
            cache = parts[0] if len(parts) == 1 else type(parts[0]).cat(parts)
            logits_bv = torch.cat(([logits_bv] if logits_bv is not None else []) + new_logits)
        return cache, logits_bv

    def _start_groups(self, pending: deque, free: int, finished: list) -> list[_Prefix]:
        """Reset the environments of the next groups (at least one, up to ``free`` episodes; the resets run
        together on the env workers, one wait for all), prefill each distinct prompt once in one batched extend."""
        by_prompt: dict[tuple, list[_Episode]] = {}
        eps: list[_Episode] = []
        try:
            while pending and (not eps or len(eps) + pending[0].num_samples <= free):
                req = pending.popleft()
                for k in range(req.num_samples):
                    traj = Trajectory(env_id=req.env_id, seed=req.seed, group_id=req.group_id, sample_index=k,
                                      worker=self.worker_name)
                    eps.append(_Episode(traj, self.envs.acquire(req.env_id, req.env_kwargs), req))  # an unknown id raises here
        except BaseException:  # the envs taken for the groups before it go back to the pool, untouched
            for ep in eps:
                self.envs.release(ep.request.env_id, ep.request.env_kwargs, ep.env)
            raise
        resets = self._env_calls([ep.env for ep in eps], [_reset_fn(ep.env, ep.request.seed) for ep in eps])
        resets = resets.results(self.episode.env_timeout_s)
        for ep, outcome in zip(eps, resets):
            self._started(ep, outcome)
            if ep.traj.status in ("env_error", "timeout") or ep.fed < 0:
                finished.append(self._finish(ep))
            else:
                by_prompt.setdefault((ep.request.group_id, tuple(ep.traj.token_ids)), []).append(ep)
        if not by_prompt:
            return []
        prompts = [list(key[1]) for key in by_prompt]
        cache = self.model.new_cache(len(prompts))
        logits_bv, routing = self._call_extend(cache, prompts)
        self.stats["prefill_tokens"] += sum(map(len, prompts))
        out = []
        for r, eps in enumerate(by_prompt.values()):
            for ep in eps:
                ep.fed = len(ep.traj.token_ids)
            out.append(_Prefix(cache, r, logits_bv[r:r + 1], routing[r] if routing else None, eps))
        return out

    def _started(self, ep: _Episode, outcome) -> None:
        """The episode's first prompt from its env's reset (``outcome``: (obs, info), or the EnvFailure /
        EnvTimeout it ended with)."""
        traj, env = ep.traj, ep.env
        if isinstance(outcome, (EnvFailure, EnvTimeout)):
            self._env_failed(ep, outcome, "reset")
            return
        problem = reset_problem(outcome, env)
        if problem:
            self._env_failed(ep, EnvFailure(problem), "reset")
            return
        obs, info = outcome
        tok = self.tokenizer
        system = getattr(env.unwrapped, "system_prompt", None)
        ids = list(tok.bos_prefix)
        if system:
            ids += tok.render_message("system", system)
            traj.messages.append({"role": "system", "content": system})
        role = _obs_role(info)
        ids += tok.render_message(role, obs) + tok.generation_prefix()
        traj.messages.append({"role": role, "content": obs})
        traj.states.append(_state(info))
        self._append(traj, ids, action=False)
        ep.turn_start = len(ids)
        if len(ids) + 2 + len(self.end_suffix) > self.episode.max_episode_tokens:
            traj.status = "truncated"
            traj.error = (f"prompt of {len(ids)} tokens leaves no room under max_episode_tokens="
                          f"{self.episode.max_episode_tokens}: the episode ends before the model's first turn")
            ep.fed = -1  # never enters the batch
            if traj.env_id not in self._no_room_warned:  # once per env: it is the config, not one episode
                self._no_room_warned.add(traj.env_id)
                log.warning("%s seed %d: %s (it is scored, with no action to train on); raise max_episode_tokens "
                            "(rollout.max_episode_tokens, or the eval's episode.max_episode_tokens)", traj.env_id,
                            traj.seed, traj.error)

    # ------------------------------------------------------------------ one token of one episode
    def _append_sampled(self, ep: _Episode, token: int, sample_logp: float, plain_logp: float) -> str | None:
        """Append a sampled token; return the turn's action text when the turn is over, else None."""
        traj, cfg = ep.traj, self.episode
        traj.token_ids.append(token)
        traj.is_action.append(1)
        traj.logprobs.append(plain_logp)
        traj.sample_logprobs.append(sample_logp)
        traj.policy_version.append(self.policy_version)
        self.stats["generated_tokens"] += 1
        if token != self.end_id:
            n_turn = len(traj.token_ids) - ep.turn_start
            room = cfg.max_episode_tokens - 1 - len(self.end_suffix)  # for the closing token and the suffix
            if not (n_turn >= cfg.max_turn_tokens or len(traj.token_ids) >= room
                    or self._hit_stop_string(traj.token_ids, ep.turn_start)):
                return None
            self._append(traj, [self.end_id], action=False)  # forced close: same ids as render_chat
            if n_turn >= cfg.max_turn_tokens:
                traj.overlong_turns.append(traj.num_turns)
        action = self.tokenizer.decode(traj.token_ids[ep.turn_start:-1])
        self._append(traj, self.end_suffix, action=False)
        traj.messages.append({"role": "assistant", "content": action})
        traj.num_turns += 1
        return action

    def _after_step(self, ep: _Episode, outcome) -> bool:
        traj, cfg = ep.traj, self.episode
        if isinstance(outcome, (EnvFailure, EnvTimeout)):
            self._env_failed(ep, outcome, "step")
            return True
        try:  # a malformed value ends this episode as an env error (recorded), not play() (the whole batch)
            obs, reward, terminated, truncated, info, invalid, components = read_step(outcome)
        except ValueError as err:
            self._env_failed(ep, EnvFailure(str(err)), "step")
            return True
        traj.step_rewards.append(reward)
        traj.reward_components.append(components)
        traj.num_invalid_actions += invalid
        if terminated or truncated:
            traj.status = "terminated" if terminated else "truncated"
            traj.success = episode_success(info, reward, terminated)
            return True
        if invalid and cfg.end_on_invalid_action:
            traj.status = "invalid_action"
            return True
        problem = text_problem(obs, "step returned an observation that")
        if problem:
            self._env_failed(ep, EnvFailure(problem), "step")
            return True
        role = _obs_role(info)
        obs_ids = self.tokenizer.render_message(role, obs) + self.tokenizer.generation_prefix()
        if len(traj.token_ids) + len(obs_ids) + 2 + len(self.end_suffix) > cfg.max_episode_tokens:
            traj.status = "truncated"
            traj.error = f"max_episode_tokens ({cfg.max_episode_tokens}) reached after turn {traj.num_turns}"
            return True
        traj.messages.append({"role": role, "content": obs})
        traj.states.append(_state(info))
        self._append(traj, obs_ids, action=False)
        ep.turn_start = len(traj.token_ids)
        return False

    def _hit_stop_string(self, token_ids: list[int], turn_start: int) -> bool:
        stops = self.sampling.stop_strings
        if not stops:
            return False
        tail = max(len(s.encode()) for s in stops) + 4
        text = self.tokenizer.decode(token_ids[max(turn_start, len(token_ids) - tail):])
        return any(text.endswith(s) for s in stops)

    def _append(self, traj: Trajectory, ids: list[int], action: bool) -> None:
        n = len(ids)
        traj.token_ids += ids
        traj.is_action += [int(action)] * n
        traj.logprobs += [0.0] * n
        traj.sample_logprobs += [0.0] * n
        traj.policy_version += [self.policy_version] * n

    def _env_failed(self, ep: _Episode, err: Exception, where: str) -> None:
        timeout = isinstance(err, EnvTimeout)
        ep.traj.status = "timeout" if timeout else "env_error"
        ep.traj.error = f"env.{where} at turn {ep.traj.num_turns}: {err}"
        log.warning("%s seed %d: %s", ep.traj.env_id, ep.traj.seed, ep.traj.error)
        self.envs.discard(ep.env)
        ep.env = None

    def _finish(self, ep: _Episode) -> Trajectory:
        traj = ep.traj
        if ep.env is not None:
            self.envs.release(ep.request.env_id, ep.request.env_kwargs, ep.env)
            ep.env = None
        traj.episode_return = float(sum(traj.step_rewards))
        if self.episode.record_routing:
            traj.routed_experts = _pad_routing(ep.routing or [], len(traj.token_ids))
        traj.check()
        self.stats["episodes"] += 1
        return traj

    # ------------------------------------------------------------------ model calls
    def _forward(self, cache, rows: list[_Episode], feeding: list[int], logits_bv):
        """One forward of the rows ``feeding``: each feeds its unfed tokens, the token it just sampled, or the
        closing tokens of its turn, the end suffix and its next observation (only the new tokens: the history
        is never re-prefilled or re-tokenized) -> (cache, logits [B, V]). A ``decode_step`` when every row of
        the batch feeds one token; else one ``extend`` of those rows alone (``HybridLM.extend(rows=...)``, in
        place; another cache through a copy of those rows), so an observation never pads the other rows'
        forward and a row waiting for its environment is not touched. Booked as a decode step when every
        row feeds one token, else as an extension. ``reprefill``: the rows that feed an observation rebuild
        their cache from the whole history instead (the benchmark's baseline), in a forward of their own."""
        eps = [rows[i] for i in feeding]
        feeds = [ep.traj.token_ids[ep.fed:] for ep in eps]
        if self.reprefill and any(len(f) > 1 for f in feeds):
            whole = [i for i, f in zip(feeding, feeds) if len(f) > 1]
            sub = self.model.new_cache(len(whole))
            sub_logits, routing = self._call_extend(sub, [rows[i].traj.token_ids for i in whole])
            cache = _put_rows(cache, len(rows), whole, sub)
            for i in whole:
                rows[i].fed = len(rows[i].traj.token_ids)
            self.stats["fed_tokens"] += sum(len(rows[i].traj.token_ids) for i in whole)
            logits_bv = logits_bv.index_copy(0, torch.tensor(whole, device=logits_bv.device), sub_logits.to(logits_bv.dtype))
            rebuilt = set(whole)
            feeding = [i for i in feeding if i not in rebuilt]
            if not feeding:
                return cache, logits_bv
            eps, feeds = [rows[i] for i in feeding], [rows[i].traj.token_ids[rows[i].fed:] for i in feeding]
        step = all(len(f) == 1 for f in feeds)
        self.stats["fed_tokens"] += sum(map(len, feeds))
        self.stats["idle_row_steps"] += len(rows) - len(feeding)  # rows left out: finished, or waiting on their env
        call = self._call_decode if step else self._call_extend
        if len(feeding) == len(rows) and step:
            new_logits, routing = call(cache, torch.tensor([f[0] for f in feeds]))
        elif len(feeding) == len(rows):
            new_logits, routing = call(cache, feeds)
        elif isinstance(cache, HybridCache):
            new_logits, routing = call(cache, feeds, feeding)
        else:
            sub = cache.select(feeding)
            new_logits, routing = call(sub, feeds)
            cache = _put_rows(cache, len(rows), feeding, sub)
        for k, ep in enumerate(eps):
            if routing is not None and ep.routing is not None:
                ep.routing.extend(routing[k])
            ep.fed = len(ep.traj.token_ids)
        if len(feeding) == len(rows):
            return cache, new_logits
        # (the index on the logits' device: a CPU index into CUDA logits fails)
        return cache, logits_bv.index_copy(0, torch.tensor(feeding, device=logits_bv.device), new_logits.to(logits_bv.dtype))

    def _call_extend(self, cache, feeds, rows=None):
        """``model.extend`` of ``feeds`` into every row of ``cache``, or into its rows ``rows`` only."""
        self.stats["forward_calls"] += 1
        self.stats["extend_calls"] += 1
        t0 = time.perf_counter()
        try:
            return self._model_extend(cache, feeds, rows)
        finally:
            self.stats["extend_s"] += time.perf_counter() - t0

    def _model_extend(self, cache, feeds, rows=None):
        named = {} if rows is None else {"rows": rows}
        if self.episode.record_routing:
            logits_bv, routed = self.model.extend(cache, feeds, record_routing=True, **named)
            return logits_bv, _routing_rows(routed, [len(f) for f in feeds])
        return self.model.extend(cache, feeds, **named), None

    def _call_decode(self, cache, tokens, rows=None):
        """A decode step: ``tokens`` a tensor [B] (``decode_step`` of every row), or one-token lists, one per
        row of ``cache`` or of its rows ``rows`` (``extend``, which for one token is the same step)."""
        self.stats["forward_calls"] += 1
        self.stats["decode_steps"] += 1
        self.stats["decode_tokens"] += len(tokens)
        t0 = time.perf_counter()
        try:
            if not isinstance(tokens, torch.Tensor):
                return self._model_extend(cache, tokens, rows)
            if self.episode.record_routing:
                logits_bv, routed = self.model.decode_step(cache, tokens, record_routing=True)
                return logits_bv, _routing_rows(routed, [1] * len(tokens))
            return self.model.decode_step(cache, tokens), None
        finally:
            self.stats["decode_s"] += time.perf_counter() - t0

    def close(self) -> None:
        self.envs.close()


def _reset_fn(env, seed):
    def reset():
        return env.reset(seed=seed)

    return reset


def _step_fn(env, action: str):
    def step():
        obs, reward, terminated, truncated, info = env.step(action)  # a wrong arity is the env's error too
        return obs, reward, terminated, truncated, info

    return step


def _state(info) -> str:
    """The env's name for its state (``info["state"]``, for anchor-state credit); "" when it gives none."""
    state = (info or {}).get("state")
    return "" if state is None else str(state)


def _obs_role(info) -> str:
    role = (info or {}).get("role")
    return "tool" if isinstance(role, str) and role == "tool" else "user"  # an array's == is no bool


def _routing_rows(routed, counts: list[int]) -> list[list]:
    """Routed experts from extend/decode_step -> per row, a list (one per fed token) of [n_moe_layers][k].

    Accepts a padded tensor ``[B, T, L, k]`` (row r's first counts[r] positions), a ``[B, L, k]`` tensor
    for one token per row, or a list of per-row tensors ``[n_r, L, k]``.
    """
    if isinstance(routed, torch.Tensor):
        if routed.dim() == 3:
            routed = routed[:, None]
        return [routed[r, :n].tolist() for r, n in enumerate(counts)]
    return [torch.as_tensor(x)[:n].tolist() if n else [] for x, n in zip(routed, counts)]


def _put_rows(cache, n_rows: int, rows: list[int], sub):
    """``cache`` (``n_rows`` rows) with its rows ``rows`` replaced by the rows of ``sub``, in order. A ``HybridCache`` is written
    in place (only those rows are copied, the KV buffers grown first if ``sub``'s did); another cache goes
    through the row operations every cache has (one cat, one select: copies of the whole cache)."""
    if not isinstance(cache, HybridCache):
        order = list(range(n_rows))
        for i, r in enumerate(rows):
            order[r] = n_rows + i
        return type(cache).cat([cache, sub]).select(order)
    cache.put_rows(rows, sub)
    return cache


def _pad_routing(routing: list, n_tokens: int) -> list:
    """Tokens never fed (the closing token of the last turn) repeat the previous token's experts: a token's
    routing only affects its own position, whose output no loss term reads."""
    out = list(routing[:n_tokens])
    while len(out) < n_tokens and out:
        out.append(out[-1])
    return out
