"""Fused fp32 CPU kernels, compiled on first use and called through ctypes.

The decode step of a small model on a CPU is dominated by per-op overhead, by passes over the Mamba
state and by streaming the weights, not by arithmetic.  ``decode.c`` fuses each of those stretches:

* ``mamba_scan``: the Mamba-2 mixer between its projections for the new tokens of every row (one in
  a decode step, a turn's worth in a cache extension): conv window, depthwise conv, SiLU, dt
  softplus/clamp, the SSM recurrence with the state in fp32, the D skip, the SiLU gate and the
  grouped RMS norm;
* ``moe_route`` / ``moe_experts``: the sigmoid router with selection bias, top-k, renormalisation and
  scaling, then every routed expert as one small GEMM over its own tokens (no padding, no gathers);
* ``decode_layers``: a whole decode step's layer stack in one call (model/fast/fused.py), its
  projections through a GEMM over weights kept in 16-column panels (``pack_panels``);
  ``extend_layers``: the same stack over the new tokens of some rows of a cache (a turn's observation),
  packed without padding, the other rows untouched; past the last layer that writes the cache only each
  row's last token is carried on (the others feed no logit), unless every token's routes are recorded.

``sample.c`` draws the rollout engine's tokens from their cumulative distributions (rollout/sampling.py).
``train.c`` holds the training kernels (forward and backward) that model/fast/train_ops.py's autograd
Functions call; ``gemm.c`` the strided GEMM (``mm``) of their dense layers and routed experts; ``vec.h`` the
vector helpers they share.

The sources are compiled once per machine with the system C compiler (``cc -O3 -march=native
-fopenmp``; fused multiply-adds allowed) into one library in ``$HYBRID_RL_KERNEL_DIR`` (default
``~/.cache/hybrid_rl/kernels``), named by a hash of sources, flags, compiler and CPU, written
atomically.  OpenMP threads come from the runtime torch already loaded (libgomp), so
``torch.set_num_threads`` governs them too.

The kernels are an accelerator only, used by models built with ``impl="fast"`` (the default): every
caller keeps its PyTorch path, used on other devices and dtypes, under autocast, and when no compiler
is found.  ``HYBRID_RL_KERNELS=0`` builds such models as ``impl="torch"`` (``enabled``, read when a
model is built).  Tests check that the paths agree.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_SOURCES = sorted(Path(__file__).parent.glob("*.c"))  # decode.c, train.c: one library
_HEADERS = sorted(Path(__file__).parent.glob("*.h"))  # vec.h: helpers they share
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
_lib = None
_failed: str | None = None

_F = ctypes.c_void_p  # float* / long* (data pointers)
_SIGNATURES = {
    "mamba_scan": [_F] * 12 + [ctypes.c_int] * 9 + [ctypes.c_float] * 2,
    "moe_route": [_F] * 5 + [ctypes.c_int] * 5 + [ctypes.c_float],
    "moe_experts": [_F] * 7 + [ctypes.c_int] * 9,
    "add_rms_norm": [_F] * 4 + [ctypes.c_int] * 2 + [ctypes.c_float],
    "linear_packed": [_F] * 3 + [ctypes.c_int] * 5,
    "decode_work_size": [ctypes.c_int, _F, _F, ctypes.c_int, ctypes.c_int],
    "decode_layers": [ctypes.c_int] + [_F] * 9 + [ctypes.c_int] * 2 + [ctypes.c_float],
    "extend_work_size": [ctypes.c_int, _F, _F] + [ctypes.c_int] * 3,
    "extend_layers": [ctypes.c_int] + [_F] * 12 + [ctypes.c_int] * 3 + [ctypes.c_float],
    "sample_pick": [_F] * 8 + [ctypes.c_int] * 3,
    "mm_available": [],
    "mm_strided": [_F, ctypes.c_int64, ctypes.c_int64, _F, ctypes.c_int64, ctypes.c_int64, _F, ctypes.c_int64]
    + [ctypes.c_int] * 3,
}
_RESULTS = {"decode_work_size": ctypes.c_int64, "extend_work_size": ctypes.c_int64, "mm_available": ctypes.c_int,
            "mm_strided": ctypes.c_int, "sample_pick": ctypes.c_int}


def enabled() -> bool:
    """False when the environment turns the kernels off (``HYBRID_RL_KERNELS=0``)."""
    return os.environ.get("HYBRID_RL_KERNELS", "1") not in ("0", "false", "no", "off")


def _cpu_id() -> str:
    """Machine type and CPU feature flags (Linux), so that a build for one CPU is never loaded on another."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return platform.machine() + platform.processor() + flags


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    text = "".join(src.name + src.read_text() for src in [*_SOURCES, *_HEADERS])
    # -march=native: a cache directory shared by different CPUs (NFS homes) keeps one build per CPU
    key = hashlib.sha256((text + " ".join(_FLAGS) + version + _cpu_id()).encode()).hexdigest()[:16]
    out_dir = Path(os.environ.get("HYBRID_RL_KERNEL_DIR", Path.home() / ".cache" / "hybrid_rl" / "kernels"))
    out = out_dir / f"decode-{key}.so"
    if not out.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        try:
            proc = subprocess.run([cc, *_FLAGS, *map(str, _SOURCES), "-o", tmp, "-lm"], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{cc} failed on {', '.join(s.name for s in _SOURCES)}:\n{proc.stderr[-2000:]}")
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(out))
    for name, args in _SIGNATURES.items():
        _bind(lib, name, args, _RESULTS.get(name))
    return lib


def _bind(lib, name, args, result):
    fn = getattr(lib, name)
    fn.argtypes, fn.restype = args, result


def declare(name: str, args: list, result=None) -> None:
    """Declare the ctypes signature of a kernel function (for kernel files other than decode.c)."""
    _SIGNATURES[name] = args
    if result is not None:
        _RESULTS[name] = result
    if _lib is not None:
        _bind(_lib, name, args, result)


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use, or None when they cannot be built (the reason is warned
    once)."""
    global _lib, _failed
    if _lib is not None or _failed is not None:
        return _lib
    try:
        _lib = _build()
    except Exception as exc:  # noqa: BLE001 - any build/load failure falls back to PyTorch
        _failed = str(exc)
        warnings.warn(f"hybrid-rl CPU decode kernels unavailable, using the PyTorch path: {exc}", stacklevel=2)
        return None
    return _lib


def usable(*tensors: torch.Tensor) -> bool:
    """True when the kernels can take these tensors: CPU, float32, contiguous, no autograd, no autocast."""
    if torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"):
        return False
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
            return False
    return library() is not None


def ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def mm_usable() -> bool:
    """Whether ``mm`` runs here: the kernels are built and the CPU has 16-lane registers (AVX-512)."""
    lib = library()
    return lib is not None and bool(lib.mm_available())


def mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a`` [M, K] @ ``b`` [K, N] through gemm.c (CPU fp32, no autograd; when ``mm_usable()``): both read
    through their strides (a transposed operand is not copied), the product written into ``out`` (rows of unit
    column stride) or a new [M, N]."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"kernels.mm multiplies [M, K] by [K, N]; got {tuple(a.shape)} and {tuple(b.shape)}")
    (m, k), n = a.shape, b.shape[1]
    if out is None:
        out = a.new_empty(m, n)
    elif out.shape != (m, n) or out.stride(1) != 1:
        raise ValueError(f"kernels.mm: out must be [{m}, {n}] with unit column stride; got {tuple(out.shape)}, "
                         f"strides {out.stride()}")
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in (a, b, out)):
        raise ValueError("kernels.mm takes CPU float32 tensors; use torch.mm for other devices and dtypes")
    if library().mm_strided(ptr(a), a.stride(0), a.stride(1), ptr(b), b.stride(0), b.stride(1), ptr(out),
                            out.stride(0), m, k, n):
        raise MemoryError(f"kernels.mm: no memory for the packed operands of a [{m}, {k}] x [{k}, {n}] product")
    return out


def pack_panels(b_ekn: torch.Tensor) -> torch.Tensor:
    """[E, K, n] -> [E, ceil(n/16), K, 16] contiguous: the 16-column panels the GEMMs of decode.c take
    (zero-padded), so that a weight streams sequentially."""
    e, k, n = b_ekn.shape
    rows = b_ekn.transpose(1, 2)  # [E, n, K]: contiguous when b is a transposed weight, as every caller's is
    panels = (n + 15) // 16
    if n % 16:
        full = rows.new_zeros(e, panels * 16, k)
        full[:, :n] = rows
    else:
        full = rows.contiguous()
    return full.view(e, panels, 16, k).transpose(2, 3).contiguous()


def linear_panels(weight_nk: torch.Tensor) -> torch.Tensor:
    """A linear layer's weight [N, K] (y = x @ W^T) as panels of W^T: [ceil(N/16), K, 16]."""
    return pack_panels(weight_nk.detach().t()[None])[0]


_optimizer_steps = 0


def _count_step(optimizer, args, kwargs):
    global _optimizer_steps
    _optimizer_steps += 1


# Some optimizers (e.g. AdamW(fused=True) on a CPU) update parameters without bumping their version
# counters; every optimizer step of the process therefore invalidates the derived weights as well.
register_optimizer_step_post_hook(_count_step)


def optimizer_steps() -> int:
    """Optimizer steps taken in this process (any optimizer)."""
    return _optimizer_steps


def version(t: torch.Tensor) -> int:
    """``t._version`` (in-place updates), 0 for inference tensors (which keep no version counter)."""
    return 0 if t.is_inference() else t._version


def weights_state(params) -> tuple:
    """What ``derived`` and the decode program compare to notice changed weights: the process's optimizer
    step count, and per tensor its identity, version, storage, dtype, device and shape.  In-place edits
    through ``.data`` bump no version: call ``invalidate(model)`` after them."""
    return (_optimizer_steps, *((id(p), version(p), p.data_ptr(), p.dtype, p.device, p.shape) for p in params))


def invalidate(module: torch.nn.Module) -> None:
    """Drop every derived weight copy and decode program kept on ``module`` and its submodules."""
    for m in module.modules():
        for name in [n for n in m.__dict__ if n.startswith("_derived_") or n == "_program"]:
            del m.__dict__[name]


def derived(owner, name: str, params, make):
    """``make()`` (a tensor or tuple, e.g. a contiguous transposed copy of weights), cached on ``owner``
    while ``params`` are unchanged: rebuilt when an optimizer steps, or a parameter's version counter
    (in-place updates, load_state_dict), identity, storage, dtype or device changes."""
    key = weights_state(params)
    cached = owner.__dict__.get("_derived_" + name)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, make())
        owner.__dict__["_derived_" + name] = cached
    return cached[1]

