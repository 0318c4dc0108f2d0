"""The update on a real micro model: micro-batch split invariance, ratio 1 on policy, routing replay."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from hybrid_rl.config import load_config
from hybrid_rl.model import HybridConfig, HybridLM
from hybrid_rl.rl.batch import collate
from hybrid_rl.rl.config import RLStageConfig
from hybrid_rl.rl.train import make_batch, policy_update
from hybrid_rl.rollout.trajectory import Trajectory


class GradRecorder:
    """An optimizer stand-in that keeps the gradients of its step instead of applying them."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)

    def step(self):
        self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}


def _model():
    torch.manual_seed(0)
    return HybridLM(HybridConfig.from_preset("micro"))


def _trajectories(model, n=6, seed=0, routing=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        t = int(torch.randint(6, 30, (1,), generator=g))
        ids = torch.randint(3, 250, (t,), generator=g).tolist()
        action = [0] * 3 + (torch.rand(t - 3, generator=g) > 0.4).long().tolist()
        routed = None
        if routing:
            with torch.no_grad():
                routed = model(torch.tensor([ids]), record_routing=True).routed_experts[0].tolist()
        out.append(Trajectory(env_id="hybrid_rl/GuessNumber-v0", seed=i // 2, group_id=i // 2, status="terminated",
                              token_ids=ids, is_action=action, logprobs=[-1.0 * a for a in action],
                              sample_logprobs=[0.0] * t, policy_version=[0] * t, routed_experts=routed,
                              episode_return=float(i % 2) + 0.1 * i))
    return out


def _cfg(*overrides):
    return load_config(RLStageConfig, None, ["rollout.max_episode_tokens=32", "train.max_grad_norm=0", *overrides])


@pytest.mark.parametrize("loss, agg", [("grpo", "token-mean"), ("gspo", "seq-mean-token-mean"), ("dapo", "seq-mean-token-sum")])
def test_micro_batch_split_does_not_change_the_update(loss, agg):
    model = _model()
    trajs = _trajectories(model)
    grads = []
    for tokens in (4096, 64):  # everything in one micro-batch, then 2-row micro-batches
        cfg = _cfg(f"train.micro_batch_tokens={tokens}", f"algo.policy_loss={loss}", f"algo.loss_agg={agg}")
        batch, _ = make_batch(trajs, cfg, pad_id=0)
        m = copy.deepcopy(model)
        rec = GradRecorder(m)
        policy_update(m, rec, batch, cfg)
        grads.append(rec.grads)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("extra", [[], ["algo.routing_replay=true"], ["algo.kl_beta=0.1", "algo.entropy_coef=0.01"]])
def test_packed_rows_give_the_update_of_one_episode_per_row(extra):
    # episodes of 6..29 tokens; packed into rows as long as the longest, several micro-batches
    model = _model()
    trajs = _trajectories(model, n=10, routing="algo.routing_replay=true" in extra)
    results = []
    for packed in ("false", "true"):
        cfg = _cfg("train.micro_batch_tokens=64", f"train.pack_sequences={packed}", *extra)
        batch, _ = make_batch(trajs, cfg, pad_id=0)
        m = copy.deepcopy(model)
        rec = GradRecorder(m)
        ref = copy.deepcopy(model) if "algo.kl_beta=0.1" in extra else None
        stats = policy_update(m, rec, batch, cfg, ref_model=ref)
        results.append((rec.grads, stats))
    (g_rows, s_rows), (g_packed, s_packed) = results
    assert g_rows.keys() == g_packed.keys() and len(g_rows) > 10
    for name in g_rows:
        torch.testing.assert_close(g_packed[name], g_rows[name], rtol=1e-4, atol=1e-6, msg=name)
    for key in ("train/loss", "train/entropy", "train/ratio_mean", "train/kl", "train/routing_mismatch"):
        if key in s_rows:
            assert s_packed[key] == pytest.approx(s_rows[key], rel=1e-4, abs=1e-7), key


def test_packing_fills_rows_and_is_skipped_for_per_sequence_losses():
    from hybrid_rl.rl.batch import pack, packed_plan, trained_lengths
    from hybrid_rl.rl.train import packs

    model = _model()
    trajs = _trajectories(model, n=10)
    cfg = _cfg("train.micro_batch_tokens=64")
    batch, _ = make_batch(trajs, cfg, pad_id=0)
    lengths = trained_lengths(batch)
    plan, row_len = packed_plan(lengths, 64)
    rows = [row for mb in plan for row in mb]
    assert sorted(i for row in rows for i in row) == list(range(batch.num_rows))  # every episode once
    assert row_len == max(lengths) and all(sum(lengths[i] for i in row) <= row_len for row in rows)
    assert all(len(mb) * row_len <= 64 for mb in plan)
    assert sum(len(mb) for mb in plan) < batch.num_rows  # fewer rows than episodes: the point of packing
    mb = pack(batch, plan[0], lengths)
    for r, row in enumerate(plan[0]):
        at = 0
        for d, i in enumerate(row):
            n = lengths[i]
            assert torch.equal(mb.input_ids_bt[r, at:at + n], batch.input_ids_bt[i, :n])
            assert torch.equal(mb.adv_bt[r, at:at + n], batch.adv_bt[i, :n])
            assert (mb.doc_ids_bt[r, at:at + n] == d).all()
            at += n
        assert not mb.action_mask_bt[r, at:].any()  # padding is never trained
    assert packs(cfg) and not packs(_cfg("train.pack_sequences=false"))
    assert not packs(_cfg("algo.loss_agg=seq-mean-token-mean")) and not packs(_cfg("algo.policy_loss=gspo", "algo.loss_agg=seq-mean-token-mean"))


def _with_own_logprobs(model, trajectories, shift=0.0):
    """The trajectories with ``sample_logprobs`` = the model's own log-prob of each token (plain softmax, what the
    trainer scores without a sampling distribution), minus ``shift`` on the action tokens."""
    with torch.no_grad():
        for tr in trajectories:
            ids = torch.tensor([tr.token_ids])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
            tr.sample_logprobs = [0.0] + [lp - shift * a for lp, a in zip(logp.tolist(), tr.is_action[1:])]
    return trajectories


def test_ratios_are_taken_against_the_rollout_logprobs():
    """``old_from_rollout`` (async steps, several updates per batch): the ratio is the trainer's log-prob against the
    rollout's. Rollout log-probs equal to the model's own give ratio 1 and nothing clipped; rollout log-probs 0.5 lower
    on every action token give ratio e^0.5 (above grpo's 1.2: clipped wherever the advantage is positive)."""
    cfg = _cfg()
    for shift, ratio in ((0.0, 1.0), (0.5, math.exp(0.5))):
        model = _model()
        batch, _ = make_batch(_with_own_logprobs(model, _trajectories(model), shift), cfg, pad_id=0)
        stats = policy_update(model, torch.optim.AdamW(model.parameters(), lr=1e-3), batch, cfg, old_from_rollout=True)
        assert stats["train/ratio_mean"] == pytest.approx(ratio, rel=1e-4)
        assert (stats["train/clip_fraction"] == 0.0) == (shift == 0.0)
        assert stats["train/grad_norm"] > 0


def test_failed_and_zero_advantage_episodes_are_not_trained():
    model = _model()
    trajs = _trajectories(model, n=6)
    trajs[0].status = "env_error"  # excluded from its group and from the loss
    trajs[2].episode_return = trajs[3].episode_return  # group 1 all equal: advantage 0, skipped
    batch, stats = make_batch(trajs, _cfg(), pad_id=0)
    assert batch.num_rows == 2  # group 0 has one valid episode (no baseline), group 1 is all-equal: only group 2
    assert stats["train/trained_episodes_frac"] == pytest.approx(2 / 6)


def test_routing_replay_of_own_routing_changes_nothing_and_reports_zero_mismatch():
    model = _model()
    trajs = _trajectories(model, routing=True)
    grads, stats = [], []
    for replay in (False, True):
        cfg = _cfg(f"algo.routing_replay={str(replay).lower()}", "algo.log_routing_mismatch=true")
        batch, _ = make_batch(trajs, cfg, pad_id=0)
        assert batch.routing_btlk is not None
        m = copy.deepcopy(model)
        rec = GradRecorder(m)
        stats.append(policy_update(m, rec, batch, cfg))
        grads.append(rec.grads)
    for s in stats:
        assert s["train/routing_mismatch"] == 0.0
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_routing_replay_of_other_routing_is_used_and_measured():
    model = _model()
    trajs = _trajectories(model, routing=True)
    n_exp = model.config.n_routed_experts
    for t in trajs:  # pretend the rollout picked other experts everywhere
        t.routed_experts = [[[(e + 1) % n_exp for e in layer] for layer in tok] for tok in t.routed_experts]
    cfg = _cfg("algo.routing_replay=true", "algo.log_routing_mismatch=true")
    batch, _ = make_batch(trajs, cfg, pad_id=0)
    counted = CountingModel(model)
    stats = policy_update(counted, GradRecorder(model), batch, cfg)
    assert stats["train/routing_mismatch"] > 0.5
    measured_calls = counted.calls
    # not asked for: no metric, and one forward per micro-batch fewer
    cfg = _cfg("algo.routing_replay=true")
    counted = CountingModel(model)
    stats = policy_update(counted, GradRecorder(model), batch, cfg)
    assert "train/routing_mismatch" not in stats and 2 * counted.calls == measured_calls


class CountingModel(torch.nn.Module):
    """A model wrapper that counts its forward calls."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0
        self.config = model.config

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


@pytest.mark.parametrize("offload", [False, True])
def test_reference_log_probs_are_scored_once_per_batch_and_kept_for_the_next_updates(offload):
    """kl_beta > 0: the frozen reference scores each micro-batch once; the second update on the batch reuses
    the cached log-probs and equals an update that scores them again (offloaded or not)."""
    model = _model()
    cfg = _cfg("algo.kl_beta=0.1", "train.micro_batch_tokens=64", f"train.ref_offload={str(offload).lower()}")
    batch, _ = make_batch(_trajectories(model), cfg, 0)
    ref = CountingModel(copy.deepcopy(model).requires_grad_(False))
    with torch.no_grad():  # a reference that differs from the policy, so that the KL term has a gradient
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    twin, fresh = copy.deepcopy(model), copy.deepcopy(ref)
    cache, rec = {}, [GradRecorder(model), GradRecorder(twin)]
    policy_update(model, rec[0], batch, cfg, ref, ref_cache=cache)
    first = ref.calls
    assert first == len(cache) >= 2  # one pass per micro-batch
    policy_update(model, rec[0], batch, cfg, ref, ref_cache=cache)
    assert ref.calls == first  # the second update scored nothing again
    stats = policy_update(twin, rec[1], batch, cfg, fresh)  # no cache: scores again
    assert fresh.calls == first and stats["train/kl"] != 0
    for name, grad in rec[1].grads.items():
        torch.testing.assert_close(rec[0].grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_reference_equal_to_the_policy_gives_a_kl_of_exactly_zero(dtype):
    """The reference's pass takes the policy's code path (autograd on, nothing requiring a gradient), so at the
    first update, where the two models are equal, the KL is 0 and not the gap between the model's inference and
    training paths (2.7e-6 in bf16 before); the KL term then has no gradient."""
    from hybrid_rl.distributed import LocalProcess

    model = _model()
    cfg = _cfg("algo.kl_beta=0.1", "train.micro_batch_tokens=64")
    batch, _ = make_batch(_trajectories(model), cfg, 0)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    stats = policy_update(model, GradRecorder(model), batch, cfg, ref, par=LocalProcess(dtype))
    assert stats["train/kl"] == 0.0
    assert all(p.grad is None for p in ref.parameters())


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
def test_the_moe_load_counts_the_episodes_tokens_and_not_padding(packed):
    """What the selection-bias step balances: each MoE layer's routed slots are k per position holding an episode's
    token (as in SFT); padding counted too (300 slots against 248 here) and pushed the experts it routed to away."""
    from hybrid_rl.rl.batch import trained_lengths

    model = _model()
    k, layers = model.config.num_experts_per_tok, [model.backbone.layers[i].mixer for i in model.moe_layers]
    cfg = _cfg("train.micro_batch_tokens=100000", f"train.pack_sequences={str(packed).lower()}", "algo.skip_zero_advantage=false")
    trajs = _trajectories(model)
    batch, _ = make_batch(trajs, cfg, 0)
    width = max(trained_lengths(batch))  # one micro-batch; unpacked rows are cut after the last action (trim)
    real = sum(trained_lengths(batch)) if packed else sum(min(len(t.token_ids) - 1, width) for t in trajs)
    assert real < len(trajs) * width  # there is padding to leave out
    for mixer in layers:
        mixer.expert_load.zero_()
    policy_update(model, GradRecorder(model), batch, cfg)
    assert layers and all(float(mixer.expert_load.sum()) == k * real for mixer in layers)


@pytest.mark.parametrize("chunk", [0, 5], ids=["one-pass", "chunked"])
@pytest.mark.parametrize("truncated", [False, True], ids=["plain", "top-p"])
def test_score_reads_only_action_positions_with_the_full_logits_values_and_gradients(chunk, truncated):
    """``score`` runs lm_head and the log-softmax at the action positions only: there its log-probs,
    entropies and the parameters' gradients are those of the full [B, T, V] logits path; elsewhere 0."""
    from hybrid_rl.rl.losses import ScoringDist, policy_logprobs
    from hybrid_rl.rl.train import score

    model = _model()
    cfg = _cfg(f"train.logprob_chunk_tokens={chunk}")
    mb = collate(_trajectories(model), [1.0] * 6)
    dist = ScoringDist(temperature=0.7, top_p=0.9) if truncated else None
    on = mb.action_mask_bt.bool()
    assert 0 < int(on.sum()) < on.numel()
    g = torch.Generator().manual_seed(3)
    c_logp, c_ent = torch.randn(on.shape, generator=g), torch.randn(on.shape, generator=g)

    def run(full):
        model.zero_grad(set_to_none=True)
        if full:
            out = model(mb.input_ids_bt)
            logp, ent = policy_logprobs(out.logits, mb.target_ids_bt, mb.action_mask_bt, dist, with_entropy=True)
        else:
            _, (logp, ent) = score(model, mb, None, dist, cfg.train)
        (c_logp * logp * mb.action_mask_bt + c_ent * ent * mb.action_mask_bt).sum().backward()
        return logp, ent, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (ref_logp, ref_ent, ref_grads), (logp, ent, grads) = run(full=True), run(full=False)
    torch.testing.assert_close(logp[on], ref_logp[on], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent[on], ref_ent[on], rtol=1e-5, atol=1e-6)
    assert not logp[~on].any() and not ent[~on].any()
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():  # fp32 round-off of sums that reach ~10: an absolute floor scaled to the tensor
        scale = max(1.0, float(ref_grads[name].abs().max()))
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6 * scale, msg=name)


def _group_trajectories(n_groups=3, samples=4, prompt_len=6, seed=0):
    """GRPO-like groups: the samples of a group share their prompt (the first ``prompt_len`` tokens), then differ."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for grp in range(n_groups):
        prompt = torch.randint(3, 250, (prompt_len + grp,), generator=g).tolist()
        for k in range(samples):
            rest = int(torch.randint(2, 14, (1,), generator=g))
            ids = prompt + torch.randint(3, 250, (rest,), generator=g).tolist()
            action = [0] * len(prompt) + [1] * rest
            out.append(Trajectory(env_id="hybrid_rl/GuessNumber-v0", seed=grp, group_id=grp, status="terminated",
                                  token_ids=ids, is_action=action, logprobs=[0.0] * len(ids),
                                  sample_logprobs=[0.0] * len(ids), policy_version=[0] * len(ids),
                                  episode_return=float(k % 2) + 0.1 * k))
    return out


def test_shared_prompts_are_stored_once_per_row():
    from hybrid_rl.model.shared import PADDING
    from hybrid_rl.rl.batch import pack, packed_plan, share_units, trained_lengths, unit_length

    batch, _ = make_batch(_group_trajectories(), _cfg("algo.advantage=rloo"), pad_id=0)
    lengths = trained_lengths(batch)
    units = share_units(batch, lengths, cap=10_000)
    assert sorted(len(u[1]) for u in units) == [4, 4, 4] and sorted(u[0] for u in units) == [5, 6, 7]  # prompt - 1
    biggest = max(unit_length(u, lengths) for u in units)
    cut = share_units(batch, lengths, cap=biggest - 1)  # a group too long for the cap: several units, each with its prompt
    assert len(cut) > 3 and all(unit_length(u, lengths) <= biggest - 1 for u in cut)
    plan, row_len = packed_plan(lengths, 10_000, units)
    assert row_len == 10_000 and len(plan) == 1 and len(plan[0]) == 1  # one row per micro-batch
    assert sorted(u[0] for u in plan[0][0]) == [5, 6, 7]
    mb = pack(batch, plan[0], lengths)
    assert mb.input_ids_bt.shape == (1, sum(unit_length(u, lengths) for u in units))  # no filler at all
    s, members = plan[0][0][0]
    assert torch.equal(mb.input_ids_bt[0, :s], batch.input_ids_bt[members[0], :s])  # the prompt, once
    at = s
    for d, i in enumerate(members, start=1):
        n = lengths[i] - s
        assert torch.equal(mb.input_ids_bt[0, at:at + n], batch.input_ids_bt[i, s:lengths[i]])
        assert torch.equal(mb.adv_bt[0, at:at + n], batch.adv_bt[i, s:lengths[i]])
        assert (mb.doc_ids_bt[0, at:at + n] == d).all() and (mb.doc_parents_bt[0, at:at + n] == 0).all()
        at += n
    assert (mb.doc_parents_bt[0, :s] == -1).all() and not mb.action_mask_bt[0, :s].any()
    assert (mb.doc_parents_bt[0, at:] != PADDING).all()
    tight = pack(batch, [[units[0]], [units[1], units[2]]], lengths)  # two rows: the shorter one ends in filler
    fill = tight.doc_parents_bt[0] == PADDING
    assert fill.any() and not tight.action_mask_bt[0][fill].any()
    assert int(mb.action_mask_bt.sum()) == int(batch.action_mask_bt.sum())  # every action token, once


@pytest.mark.parametrize("loss", ["grpo", "dapo"])
def test_shared_prompts_give_the_update_of_unshared_rows(loss):
    """train.share_prefixes on and off: the same metrics and gradients (up to float summation order)."""
    trajs = _group_trajectories()
    results = []
    for share in (False, True):
        model = _model()
        rec = GradRecorder(model)
        cfg = _cfg("algo.advantage=rloo", f"algo.policy_loss={loss}", f"train.share_prefixes={str(share).lower()}")
        batch, _ = make_batch(trajs, cfg, pad_id=0)
        results.append((policy_update(model, rec, batch, cfg), rec.grads))
    (m_plain, g_plain), (m_shared, g_shared) = results
    assert m_plain.keys() == m_shared.keys()
    for key in m_plain:
        assert m_shared[key] == pytest.approx(m_plain[key], rel=1e-4, abs=1e-6), key
    for name, grad in g_plain.items():
        torch.testing.assert_close(g_shared[name], grad, rtol=0, atol=1e-5 * grad.abs().max().item() + 1e-12, msg=name)


def test_the_scoring_distribution_masks_on_the_model_device():
    # the banned-ids mask was made on the CPU: on a CUDA model every scoring at T != 1, with top-k/top-p or an
    # entropy bonus failed ("expected self and mask to be on the same device"); a meta model shows where it goes
    from hybrid_rl.model.tokenizer import ByteTokenizer
    from hybrid_rl.rl.train import scoring_dist

    with torch.device("meta"):
        model = HybridLM(HybridConfig.from_preset("micro"))
    dist = scoring_dist(_cfg("rollout.sampling.ascii_only=true"), ByteTokenizer(), model)
    assert dist.banned_v.device.type == "meta" and dist.banned_v.shape == (model.config.vocab_size,)
