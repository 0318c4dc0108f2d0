"""The model's fast implementation, beside the readable reference of model/ (mamba.py, moe.py, norms.py).

* ``layers.py``: the reference modules subclassed with the same parameters, each forward sent to the
  fastest path that applies (hand-written backwards in training, extension kernels, padded dispatch);
* ``train_ops.py``: the autograd Functions with hand-written backwards, and their CPU kernels' calls;
* ``fused.py``: a decode step's whole layer stack as one kernel call (the decode program);
* ``kernels/``: the C sources (decode.c, train.c, gemm.c, vec.h) and their build.

``HybridLM(config, impl=...)`` picks the implementation once, when the model is built: ``"fast"``
(these layers with the C kernels on CPU fp32), ``"torch"`` (these layers in PyTorch ops only: what
other devices and dtypes run anyway) or ``"reference"`` (model/'s modules alone).  Tests hold all
three to the same values and gradients.
"""

from __future__ import annotations

from .layers import FastAttention, FastLinear, FastMamba2Mixer, FastMLP, FastMoE, FastRMSNorm, use_kernel_linears


def layers(use_kernels: bool) -> dict:
    """The fast layer builders: layer kind -> module of ``cfg``, and ``"norm"`` -> RMSNorm of (size, eps)."""
    return {
        "M": lambda cfg: FastMamba2Mixer(cfg, use_kernels),
        "*": lambda cfg: FastAttention(cfg, use_kernels),
        "E": lambda cfg: FastMoE(cfg, use_kernels),
        "-": lambda cfg: FastMLP(cfg.hidden_size, cfg.intermediate_size, use_kernels),
        "norm": lambda size, eps: FastRMSNorm(size, eps, use_kernels),
    }
