"""The trainer core of the SFT and RL stages: processes, sharding strategy, precision, and the collectives
the two loops need. Both loops call the same few methods, whatever the strategy:

    ``train.strategy``   single: one process; ddp: a full replica per process, gradients all-reduced
                         (accelerate's DDP); fsdp: FSDP2 (``torch.distributed.fsdp.fully_shard``) per hybrid
                         block and once more at the root (embeddings, final norm, lm_head), so a process
                         holds 1/N of the parameters, gradients and AdamW state
    ``train.processes``  N; ``hybrid-rl rl|sft ... train.processes=N`` starts its N processes itself
                         (``spawn``: torch's elastic launcher, the machinery of ``torchrun``, on loopback);
                         ``accelerate launch`` / ``torchrun`` of the same command work as well (the
                         launcher's WORLD_SIZE is then the process count). gloo on CPU, NCCL on GPUs.
    ``train.dtype``      fp32, or bf16: bf16 compute with fp32 master weights and fp32 AdamW state. ddp and
                         single use ``torch.autocast`` (not accelerate's mixed_precision, which is fixed
                         once per process: a test process runs fp32 and bf16 trainers); fsdp uses FSDP2's
                         ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``, which all-gathers bf16
                         parameters and reduces gradients in fp32. Keeping the masters in fp32 is what lets
                         small RL updates (lr 1e-6 x a 1e-3 gradient) change a weight at all: bf16 has 8
                         mantissa bits, so most such updates to a bf16 weight round to nothing.
    ``train.activation_checkpointing``  keep one tensor per block for the backward, recompute the rest
                         (``HybridLM.set_activation_checkpointing``).

Rank 0 is the main process: it owns the run directory, the logger, the rollout pool, evals and checkpoint
files; every rank runs the same optimizer steps on its share of each batch. Checkpoints are full (the HF
folder transformers loads, and an optimizer state keyed by parameter name), so a run saved with one
strategy or process count resumes under another.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import torch

log = logging.getLogger("hybrid_rl.distributed")

STRATEGIES = ("single", "ddp", "fsdp")


@dataclass
class ParallelTrainConfig:
    """The train-section fields of the trainer core, shared by ``sft.train`` and ``rl.train``."""

    strategy: Literal["single", "ddp", "fsdp"] = "single"
    processes: int = 1  # trainer processes (one device each: a GPU, else a CPU core)
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 on a GPU, fp32 on CPU
    activation_checkpointing: bool = False  # recompute each block in the backward instead of keeping its internals

    def __post_init__(self):
        if self.processes < 1:
            raise ValueError(f"processes must be >= 1, got {self.processes}")
        if self.strategy == "single" and self.processes > 1:
            raise ValueError(f"strategy=single runs one process, but processes={self.processes}; use "
                             f"train.strategy=ddp (a replica per process) or train.strategy=fsdp (sharded) with it")
        if self.strategy in ("ddp", "fsdp") and self.processes == 1 and not launched_world_size() > 1:
            # `accelerate launch` without --multi_gpu starts one process, even with --num_processes 2
            launcher = any(key.startswith("ACCELERATE_") for key in os.environ) or "LOCAL_RANK" in os.environ
            raise ValueError(f"strategy={self.strategy} needs train.processes >= 2 (with one process there is nothing "
                             f"to {'shard' if self.strategy == 'fsdp' else 'replicate'}); e.g. train.processes=2, "
                             "or train.strategy=single" + (
                                 ". A launcher started this command as one process: `accelerate launch` starts several "
                                 "only with --multi_gpu (on CPUs too), e.g. `accelerate launch --multi_gpu "
                                 "--num_processes 2 -m hybrid_rl.cli ...`" if launcher else ""))


def check_adam_betas(beta1: float, beta2: float) -> None:
    """AdamW's moment decays must lie in [0, 1): refused with the config keys when a config is made, not by
    torch's AdamW once the run has started."""
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"train.{name} must be in [0, 1) (AdamW's moment decay), got {value}: e.g. "
                             f"train.{name}={0.9 if name == 'beta1' else 0.99}")


# ------------------------------------------------------------------------------ processes


def launched_world_size() -> int:
    """The process count a launcher (this module's ``spawn``, torchrun, accelerate launch) started us in; 1 if none."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def available_devices() -> tuple[int, str]:
    """(how many trainer processes this machine can give a device of their own, what they are)."""
    if torch.cuda.is_available():
        return torch.cuda.device_count(), "GPUs"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores, "CPU cores (no GPU)"


def check_processes(tc: ParallelTrainConfig) -> None:
    """Before any work: the process count fits the devices, and agrees with an outside launcher's."""
    world = launched_world_size()
    if world > 1:
        if tc.processes not in (1, world):
            raise ValueError(f"train.processes={tc.processes} but the launcher started {world} processes; "
                             f"drop train.processes or set it to {world}")
        if tc.strategy == "single":
            log.warning("the launcher started %d processes and train.strategy=single: running ddp "
                        "(set train.strategy=ddp or fsdp to choose)", world)
        return
    have, what = available_devices()
    if tc.processes > have:
        raise ValueError(f"train.processes={tc.processes} but this machine has {have} {what}: each trainer process needs "
                         f"a device of its own. Use train.processes={have} or fewer, or a machine with more devices.")


def start_processes(tc: ParallelTrainConfig) -> bool:
    """Checks the process count against the devices (a ``ConfigError`` before any work); True in the command
    the user typed when it must start ``train.processes`` processes itself (``spawn``)."""
    from hybrid_rl.config import ConfigError

    try:
        check_processes(tc)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return tc.processes > 1 and launched_world_size() == 1


def is_main_process() -> bool:
    """Rank 0 of a launched group, or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


def spawn(command: str, argv: list[str], processes: int, threads_per_process: int = 1) -> int:
    """Run ``hybrid-rl <command> <argv...>`` in ``processes`` processes on this machine (one node) and wait;
    returns 0, or 1 after naming the failed process (its traceback is printed above by the process)."""
    return spawn_python(["-m", "hybrid_rl.cli", command, *argv], processes, threads_per_process, f"hybrid-rl {command}")


def spawn_python(args: list[str], processes: int, threads_per_process: int = 1, name: str = "python") -> int:
    """``python <args...>`` in ``processes`` processes, through torch's elastic launcher (what ``torchrun
    --standalone`` runs): a c10d rendezvous on a free loopback port; each process gets RANK / LOCAL_RANK /
    WORLD_SIZE / MASTER_ADDR / MASTER_PORT. If one process fails, the others are stopped."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=f"hybrid-rl-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.2)
    env_threads, env_faults = os.environ.get("OMP_NUM_THREADS"), os.environ.get("PYTHONFAULTHANDLER")
    os.environ["OMP_NUM_THREADS"] = str(threads_per_process)  # inherited by the processes
    # a process killed by a signal (an abort in native code) prints every thread's Python stack first
    os.environ["PYTHONFAULTHANDLER"] = "1"
    try:
        elastic_launch(config, sys.executable)(*args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        print(f"{name}: trainer process {rank} of {processes} failed (exit code {failure.exitcode}); "
              "its error is above", file=sys.stderr)
        return 1
    finally:
        for key, value in (("OMP_NUM_THREADS", env_threads), ("PYTHONFAULTHANDLER", env_faults)):
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return 0


def cli_argv(args) -> list[str]:
    """The config path and overrides of a stage command's parsed args, to hand to the spawned processes."""
    return [a for a in [args.config, *(args.overrides or [])] if a is not None]


# ------------------------------------------------------------------------------ the core


def resolved_dtype(dtype: str) -> str:
    return ("bf16" if torch.cuda.is_available() else "fp32") if dtype == "auto" else dtype


class Parallel:
    """One process's view of the trainers: device, rank, the wrapped model and the collectives.

    ``wrap(model, make_optimizer)`` -> (the model to train, its optimizer). ``core`` is the unwrapped module
    (its ``config``, MoE helpers). ``full_model()`` (a collective) returns, on the main process, a plain
    ``HybridLM`` with the current full weights: the model itself unless it is sharded, else a copy kept for
    evals, rollouts and saving."""

    def __init__(self, tc: ParallelTrainConfig):
        from accelerate import Accelerator, DistributedDataParallelKwargs
        from accelerate.state import PartialState

        check_processes(tc)
        world = launched_world_size()
        self.strategy = "single" if world == 1 else ("ddp" if tc.strategy == "single" else tc.strategy)
        self.dtype = resolved_dtype(tc.dtype)
        self.activation_checkpointing = tc.activation_checkpointing
        on_gpu = torch.cuda.is_available()
        # fsdp brings its own mixed precision (the policy in wrap); autocast is for single and ddp
        self._autocast = self.dtype == "bf16" and self.strategy != "fsdp"
        # accelerate keeps its state process-wide (one shared dict); made here, it is dropped again at close
        # so that the process can make another Accelerator with other settings. If the host made one before
        # us, ours shares it and it stays the host's.
        self._own_state = not PartialState._shared_state
        self._closed = False
        self.acc = Accelerator(cpu=not on_gpu, kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        self.is_main, self.device = self.acc.is_main_process, self.acc.device
        self.model = self.core = None
        self._shadow = None  # fsdp: the main process's full copy
        if not self.is_main:
            logging.getLogger("hybrid_rl").setLevel(logging.WARNING)  # one process reports

    # ---------------------------------------------------------------- model and optimizer
    def wrap(self, model, make_optimizer):
        """Place, shard or replicate ``model``; ``make_optimizer(params_model)`` builds the optimizer on
        the parameters as they will be trained (sharded ones under fsdp)."""
        import warnings

        model.set_activation_checkpointing(self.activation_checkpointing)
        if getattr(model, "mtp", None) is not None:  # no loss of these trainers reaches the MTP block: frozen, so
            model.mtp.requires_grad_(False)          # DDP does not wait for gradients that never come
        if self.strategy == "fsdp":
            if self.is_main:
                self._shadow = copy.deepcopy(model).requires_grad_(False)
            self._shard(model)
            self.model = self.core = model
            return model, make_optimizer(model)
        optimizer = make_optimizer(model)
        with warnings.catch_warnings():  # torch renames broadcast_buffers; accelerate's DDP kwargs still use the old name
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            self.model, optimizer = self.acc.prepare(model, optimizer)
        self.core = self.acc.unwrap_model(self.model)
        return self.model, optimizer

    def frozen_copy(self, model, offload: bool = False):
        """A frozen copy of ``model`` (call before ``wrap``): RL's reference policy for the KL term. It computes
        as the trained model does at its first step, so the KL starts at exactly 0 (and measures the update,
        not a precision gap), and it is placed as the trained model is placed:

        * single / ddp: a full copy on the device (on the CPU between its passes with ``offload``; the caller
          moves it); under bf16 it runs in the same autocast as the policy.
        * fsdp: sharded like the policy (per hybrid block and at the root), so each process holds 1/N of it;
          under bf16 its shards are stored in bf16 (the dtype the policy's ``MixedPrecisionPolicy``
          all-gathers, so the same values: the reference has no fp32 masters to keep), half the fp32 bytes.
          ``offload``: the shards live in host memory and each unit comes to the device for its all-gather
          (FSDP2's ``CPUOffloadPolicy``). Its forwards are collectives: every process runs the same number.
        """
        ref = copy.deepcopy(model).eval().requires_grad_(False)
        if getattr(ref, "mtp", None) is not None:  # (no loss reaches the MTP block)
            ref.mtp = None
        if self.strategy != "fsdp":
            return ref.to("cpu" if offload else self.device)
        if self.dtype == "bf16":  # parameters only: buffers (the MoE correction bias) stay fp32, as the policy's do
            for p in ref.parameters():
                p.data = p.data.to(torch.bfloat16)
        self._shard(ref, offload)
        return ref

    def _shard(self, model, offload: bool = False) -> None:
        """FSDP2 on the device, per hybrid block and once more at the root, with the run's mixed precision (bf16:
        bf16 all-gathers, fp32 gradient reduction); ``offload``: the shards in host memory (``CPUOffloadPolicy``)."""
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.dtype == "bf16" \
            else MixedPrecisionPolicy()
        place = CPUOffloadPolicy(pin_memory=self.device.type == "cuda") if offload else OffloadPolicy()
        model.to(self.device)
        for block in model.backbone.layers:
            fully_shard(block, mp_policy=mp, offload_policy=place)
        fully_shard(model, mp_policy=mp, offload_policy=place)

    def autocast(self):
        if not self._autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def no_sync(self, last: bool):
        """Gradient sync only on the last micro-batch of a step (the others accumulate locally)."""
        if self.world == 1 or last:
            if self.strategy == "fsdp" and self.world > 1:
                self.model.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.strategy == "fsdp":
            self.model.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss) -> None:
        self.acc.backward(loss)

    def clip_grad_norm_(self, params, max_norm: float) -> float:
        return clip_grad_norm(params, max_norm)

    # ---------------------------------------------------------------- full weights
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full fp32 state dict on the main process ({} on the others): on the CPU under fsdp (a collective), else
        the model's own tensors, on its device."""
        if self.strategy != "fsdp":
            return self.core.state_dict() if self.is_main else {}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.is_main else {}  # persistent buffers (the MoE correction bias) included

    def full_model(self):
        """The main process's plain model with the current weights (None elsewhere). A collective under fsdp."""
        if self.strategy != "fsdp":
            return self.core if self.is_main else None
        state = self.full_state_dict()
        if self.is_main:
            self._shadow.load_state_dict(state)
            return self._shadow
        return None

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a full state dict (every process passes the same one) into the trained model."""
        if self.strategy != "fsdp":
            self.core.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True, strict=False))
        for name, buf in self.model.named_buffers():
            if name in state:
                buf.copy_(state[name])

    def optimizer_state(self, optimizer) -> dict:
        """The optimizer state keyed by parameter name, full (unsharded), on the main process. A collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(self.model, optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=self.world > 1))
        return state if self.is_main else {}

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        """Restore ``optimizer_state``'s output (any strategy or process count); an older checkpoint's
        state keyed by parameter index loads as it was saved (same strategy and process count only).

        The moments and step counts come from the checkpoint; the hyperparameters of each parameter group (betas,
        weight decay, eps, lr) stay those the optimizer was built with, from the resumed run's config (which the
        run directory's config.yaml records), not those the checkpoint was trained with."""
        configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        keys = list(state.get("state", {}))
        if keys and all(isinstance(k, int) for k in keys):
            optimizer.load_state_dict(state)
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        for group, hyper in zip(optimizer.param_groups, configured):
            group.update(hyper)

    # ---------------------------------------------------------------- collectives
    def sum(self, values: list[float]) -> list[float]:
        """Elementwise sum over processes (float64)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def max(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return t.tolist()

    def broadcast(self, obj: Any) -> Any:
        """The main process's ``obj`` on every process (pickled)."""
        if self.world == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj if self.is_main else None])[0]

    def barrier(self) -> None:
        self.acc.wait_for_everyone()

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def close(self, clean: bool = True) -> None:
        """End the trackers and tear down the process group. ``clean`` (the run did not fail): first wait
        until every process is here, so that no process closes its connections while a peer still has a
        collective in flight against it. After a failure the peers may never arrive, so there is no wait.
        Closing again does nothing."""
        if self._closed:
            return
        self._closed = True
        if clean and self.world > 1 and torch.distributed.is_initialized():
            self.barrier()
        self.acc.end_training()  # (accelerate's may destroy the process group itself)
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if self._own_state:
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
            self._own_state = False


class LocalProcess:
    """``Parallel``'s calls for one process without accelerate's process state: for code that runs one update
    outside a trainer (tests, tools). ``device``: where the model is (the batch is moved there), the CPU by default."""

    rank, world, is_main, strategy = 0, 1, True, "single"

    def __init__(self, dtype: str = "fp32", device: torch.device | str = "cpu"):
        self.dtype = resolved_dtype(dtype)  # bf16: the forwards under autocast, as Parallel does
        self.device = torch.device(device)

    def no_sync(self, last: bool):
        return contextlib.nullcontext()

    def autocast(self):
        if self.dtype != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def backward(self, loss) -> None:
        loss.backward()

    def clip_grad_norm_(self, params, max_norm: float) -> float:
        return clip_grad_norm(params, max_norm)

    def sum(self, values: list[float]) -> list[float]:
        return list(values)

    def max(self, values: list[float]) -> list[float]:
        return list(values)

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def end_forward_only_pass(module) -> None:
    """After a forward of an FSDP2 module that no backward follows (``Parallel.frozen_copy``'s reference): reshard
    its root unit, which FSDP2 keeps gathered after a forward for the backward, and drop the forward-order
    records FSDP2 keeps for that backward's prefetching (a list entry per unit and pass, otherwise cleared only
    by a backward: they grew for the whole run). The records are FSDP2 internals; tests/distributed checks them."""
    module.reshard()
    state = module._get_fsdp_state()
    state._comm_ctx.post_forward_order.clear()
    for unit in state._state_ctx.all_states:
        for group in unit._fsdp_param_groups:
            group._post_forward_indices.clear()


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with its fused kernel where every parameter is a plain floating tensor on a CPU
    or GPU (what TRL's default ``adamw_torch_fused`` uses): one kernel per parameter instead of ~10 PyTorch
    ops each. On the CPU its step for ``tiny`` takes ~15 ms against ~90-240 ms for the per-op loop (same
    process, alternating, under load). FSDP2's sharded parameters (DTensors) keep the default."""
    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = all(type(p) in (torch.Tensor, torch.nn.Parameter) and p.dtype.is_floating_point
                and p.device.type in ("cpu", "cuda") for p in tensors)
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)


def clip_grad_norm(params, max_norm: float) -> float:
    """Clip the global gradient norm (over all shards of sharded parameters); returns the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def balance_experts(core, rate: float, par: Parallel) -> dict[str, float]:
    """The MoE bias update from this step's expert loads, summed over processes (every replica must see the
    same loads, so that the biases stay identical); returns the load metrics."""
    from hybrid_rl.metrics import moe_load_metrics

    loads = {i: core.backbone.layers[i].mixer.expert_load for i in core.moe_layers}
    for buf in loads.values():
        par.all_reduce_(buf)
    metrics = moe_load_metrics({i: buf.cpu() for i, buf in loads.items()})
    core.moe_balance_update(rate)
    return metrics


def rank_share(n: int, rank: int, world: int) -> list[int]:
    """Indices of ``n`` work items (micro-batches) for ``rank``: round-robin. Every rank must run the same
    number of forwards under fsdp, so a rank left short repeats its last index as a zero-weight filler
    (``rank_share_weights``)."""
    mine = list(range(rank, n, world))
    per_rank = -(-n // world) if n else 1
    filler = mine[-1:] if mine else [0]
    return mine + filler * (per_rank - len(mine))


def rank_share_weights(n: int, rank: int, world: int) -> list[float]:
    """1.0 for the rank's real items, 0.0 for the fillers of ``rank_share``."""
    real = len(range(rank, n, world))
    return [1.0] * real + [0.0] * (len(rank_share(n, rank, world)) - real)
