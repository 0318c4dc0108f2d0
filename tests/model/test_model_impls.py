"""The model's implementations (``HybridLM(config, impl=...)``) against the reference, on tiny models
with every layer kind: the training forward's values and every parameter's gradient (plain and packed
rows, a sequence length that is and one that is not a multiple of the chunk, the MTP block), scoring
without autograd, cache extension and decode steps with their routes and expert loads; and how the
implementation is chosen."""

import pytest
import torch

from hybrid_rl.model import HybridLM
from hybrid_rl.model.mamba import Mamba2Mixer
from hybrid_rl.model.moe import MLP, MoE
from hybrid_rl.model.norms import RMSNorm
from model_test_utils import randomize, small_config, twin

FAST_IMPLS = ["fast", "torch"]
CONFIGS = {"base": {}, "latent_mtp": dict(moe_latent_size=24, num_mtp_layers=1)}


def _models(impl, config, seed):
    """(reference model, a twin of implementation ``impl`` with the same weights)."""
    reference = randomize(HybridLM(small_config(**CONFIGS[config]), impl="reference"), seed).eval()
    return reference, twin(reference, impl)


def _loss_and_grads(model, ids, doc_ids, weights):
    out = model(ids, doc_ids=doc_ids, return_hidden=True)
    loss = (out.logits.log_softmax(-1) * weights).sum()
    if model.config.num_mtp_layers:
        loss = loss + model.mtp_logits(ids, hidden=out.hidden_states).logsumexp(-1).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    return out.logits, torch.autograd.grad(loss, params, allow_unused=True)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("t", [21, 32])  # 32: whole chunks, where the fused mixer Function applies
@pytest.mark.parametrize("packed", [False, True])
def test_training_forward_values_and_gradients_equal_reference(impl, config, t, packed):
    reference, model = _models(impl, config, seed=3)
    gen = torch.Generator().manual_seed(t)
    ids = torch.randint(0, 97, (2, t), generator=gen)
    doc_ids = torch.tensor([[0] * 9 + [1] * (t - 9), [0] * 4 + [1] * 3 + [2] * (t - 7)]) if packed else None
    weights = torch.randn(2, t, 97, generator=gen)
    logits_ref, grads_ref = _loss_and_grads(reference, ids, doc_ids, weights)
    logits, grads = _loss_and_grads(model, ids, doc_ids, weights)
    torch.testing.assert_close(logits, logits_ref, atol=1e-4, rtol=1e-4)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert (g is None) == (g_ref is None), name
        if g is not None:
            torch.testing.assert_close(g, g_ref, atol=1e-4 * max(1.0, g_ref.abs().max().item()), rtol=1e-4, msg=name)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@torch.no_grad()
def test_scoring_and_replayed_routes_without_autograd_equal_reference(impl):
    reference, model = _models(impl, "base", seed=4)
    ids = torch.randint(0, 97, (3, 19), generator=torch.Generator().manual_seed(4))
    ref = reference(ids, record_routing=True)
    out = model(ids, routing=ref.routed_experts)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_extend_and_decode_equal_reference(impl, config):
    """Ragged prefill, a second ragged extension, then decode steps: logits, routes, caches, loads."""
    reference, model = _models(impl, config, seed=5)
    gen = torch.Generator().manual_seed(5)
    turns = [[torch.randint(0, 97, (n,), generator=gen) for n in lengths] for lengths in ((9, 3, 14), (2, 0, 5))]
    steps = torch.randint(0, 97, (4, 3), generator=gen)
    runs = []
    for m in (reference, model):
        cache, outs = m.new_cache(3), []
        for tokens in turns:
            outs.append(m.extend(cache, tokens, record_routing=True))
        outs += [m.decode_step(cache, tok, record_routing=True) for tok in steps]
        loads = [layer.expert_load.clone() for layer in m.modules() if isinstance(layer, MoE)]
        runs.append((outs, cache, loads))
    (ref_outs, ref_cache, ref_loads), (outs, cache, loads) = runs
    for (a, ra), (b, rb) in zip(ref_outs, outs):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
        assert torch.equal(ra.sort(-1).values, rb.sort(-1).values)  # same experts (slot order is free)
    for a, b in zip(ref_loads, loads):
        assert torch.equal(a, b)
    for store in ("conv", "ssm"):
        for layer, tensor in getattr(ref_cache, store).items():
            torch.testing.assert_close(getattr(cache, store)[layer], tensor, atol=1e-4, rtol=0)


@pytest.mark.parametrize("pattern", ["M*E-ME", "ME*E", "EM*", "E-"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
@torch.no_grad()
def test_extension_computes_past_the_last_cache_writer_for_last_tokens_only(pattern, config):
    """Without recorded routes, a fused extension computes the output of the last layer that writes the
    cache (Mamba or attention) and every layer after it for each row's last new token alone; the logits,
    the caches and the next decode steps are those of the full computation (the routed path, bit for bit)
    and of the reference, and the experts past that point count only those tokens."""
    reference = randomize(HybridLM(small_config(layer_pattern=pattern, **CONFIGS[config]), impl="reference"), 9).eval()
    gen = torch.Generator().manual_seed(9)
    turns = [[torch.randint(0, 97, (n,), generator=gen) for n in lengths] for lengths in ((9, 1, 14, 6), (2, 0, 5, 1))]
    steps = torch.randint(0, 97, (3, 4), generator=gen)
    writer = max((i for i, kind in enumerate(pattern) if kind in "M*"), default=-1)
    runs = {}
    for name, record in (("reference", False), ("routed", True), ("last_only", False)):
        model = reference if name == "reference" else twin(reference, "fast")
        cache, outs = model.new_cache(4), []
        for tokens in turns:
            out = model.extend(cache, tokens, record_routing=record)
            outs.append(out[0] if record else out)
            if name == "last_only":
                for i, layer in enumerate(model.backbone.layers):
                    if isinstance(layer.mixer, MoE):
                        fed = [len(t) for t in tokens if len(t)]
                        counted = sum(fed) if i < writer else len(fed)
                        assert layer.mixer.expert_load.sum() == counted * model.config.num_experts_per_tok, (i, fed)
                        layer.mixer.expert_load.zero_()
        outs += [model.decode_step(cache, tok) for tok in steps]
        runs[name] = (outs, cache)
    (ref_outs, ref_cache), (full_outs, full_cache), (outs, cache) = runs["reference"], runs["routed"], runs["last_only"]
    for a, full, b in zip(ref_outs, full_outs, outs):
        assert torch.equal(b, full)
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
    for t_full, t in zip(full_cache.tensors(), cache.tensors()):
        assert torch.equal(t, t_full)


def test_implementations_share_parameters_and_the_reference_is_the_plain_modules():
    models = {impl: HybridLM(small_config(num_mtp_layers=1), impl=impl) for impl in ("fast", "torch", "reference")}
    keys = {impl: list(m.state_dict()) for impl, m in models.items()}
    assert keys["fast"] == keys["torch"] == keys["reference"]
    plain = (Mamba2Mixer, MoE, MLP, RMSNorm)
    for impl, m in models.items():
        kinds = [type(layer) for layer in m.modules() if isinstance(layer, plain)]
        assert all(kind in plain for kind in kinds) == (impl == "reference"), impl


def test_implementation_is_chosen_once_when_the_model_is_built(monkeypatch):
    with pytest.raises(ValueError, match="unknown model implementation 'cuda'.*fast, torch, reference"):
        HybridLM(small_config(), impl="cuda")
    assert HybridLM(small_config()).impl == "fast"
    monkeypatch.setenv("HYBRID_RL_KERNELS", "0")
    model = HybridLM(small_config())
    assert model.impl == "torch"
    assert HybridLM(small_config(), impl="reference").impl == "reference"
    monkeypatch.setenv("HYBRID_RL_KERNELS", "1")  # read when the model was built, not per call
    model.eval()
    cache = model.new_cache(1)
    model.extend(cache, [torch.arange(4)])
    model.decode_step(cache, torch.tensor([4]))
    assert model.impl == "torch" and "_program" not in model.__dict__
