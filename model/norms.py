"""RMSNorm variants of Nemotron-H, and the fp32 island used under bf16 autocast (the reference: one
path, autograd through PyTorch's ops; model/fast/train_ops.py has the hand-written backwards).

The block norms and the final norm normalise over the hidden size; the Mamba output norm gates first
(``y * silu(z)``) and then normalises each of the ``n_groups`` slices of ``d_inner`` separately, as
transformers' ``NemotronHRMSNormGated`` does.  Both compute in fp32 and cast back to the input dtype.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


def fp32_region(x: torch.Tensor):
    """Disable autocast (the SSM scan and the router must run in fp32); a no-op when autocast is off."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(device_type=x.device.type, enabled=False)
    return contextlib.nullcontext()


def rms_norm(x, weight, eps):
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def rms_norm_naive(x, weight, eps):
    xf = x.float()
    return (weight.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


def gated_group_rms_norm(y, z, weight, group_size, eps):
    """norm(y * silu(z)) with one RMS statistic per group of ``group_size`` channels."""
    g = (y.float() * F.silu(z.float())).unflatten(-1, (-1, group_size))
    return (F.rms_norm(g, (group_size,), None, eps).flatten(-2) * weight.float()).to(z.dtype)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)
