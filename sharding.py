"""Process groups, sharding strategies and LoRA wrapping.

`init_distributed()` reads torchrun's environment (nccl on CUDA, gloo on CPU; a plain single process
without it). `shard_model()` wraps LoRA adapters (peft) when asked, then applies the strategy; under
FSDP2, ranks other than 0 built the model on the meta device (model_setup.load_model) and receive
their shards from rank 0 here, so CPU memory does not grow with the number of local ranks.
`combine_gradients()` is the one place gradients cross ranks (`none`: once per step, from
`reduce_gradients()`; FSDP2: each block's, in backward). Gradients are averaged over ranks (FSDP2's
default, which gloo's lack of pre-multiplied sums keeps us from changing), so train.py
backpropagates loss_sum * world_size / N_step, where N_step counts the supervised tokens of the
whole step over all ranks: the mean then gives sum / N_step. Everything DeepSpeed-specific is here
too, behind the functions the loop and checkpoint.py call for every strategy: attach_optimizer,
backward, clip_and_step, save_state, load_state, full_state_dict.
"""

import dataclasses
import math
import os
import pickle
import sys
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_model_state_dict,
                                                     set_state_dict)

import config


# a quiet run: what libraries warn about but is meant (DCP in one process; peft reading the flag
# transformers 5 renamed; DeepSpeed calling collectives torch renamed, and finding no GPU when
# accelerate imports it to save a model)
warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninitialized")
warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated")  # DeepSpeed's calls
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


@config.section("sharding")
@dataclass
class ShardingConfig:
    # none: every rank holds the whole model; fsdp2: fully_shard per block; deepspeed: ZeRO (extra)
    strategy: Literal["none", "fsdp2", "deepspeed"] = "none"
    # fsdp2: dtype of forward/backward (weights and gradient reduction stay in model.dtype)
    compute_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    reshard_after_forward: bool = True  # fsdp2: free gathered weights after forward (less memory)
    hybrid: bool = False  # fsdp2: shard inside each node, replicate across nodes (--nnodes > 1)
    # fsdp2: sharded weights, gradients and optimizer state in CPU memory; deepspeed: optimizer
    #   state (and with ZeRO-3 the weights) in CPU memory
    cpu_offload: bool = False
    zero_stage: Literal[1, 2, 3] = 2  # deepspeed: 1 shards optimizer state, 2 gradients, 3 weights
    lora_rank: Annotated[int, config.ge(0)] = 0  # > 0: train LoRA adapters (peft) of this rank on
    #   frozen base weights; 0 = full fine-tuning
    lora_alpha: Annotated[float, config.gt(0)] = 16.0  # LoRA scale: the update times alpha / rank
    lora_dropout: Annotated[float, config.ge(0, 1)] = 0.0  # dropout on the adapter input
    # module names, or all-linear (every linear layer but the output layer)
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


@dataclass
class Dist:
    rank: int
    world_size: int
    device: torch.device
    local_world_size: int = 1  # ranks on this node


def init_distributed(timeout_s: float = 300) -> Dist:
    """Reads torchrun's RANK/LOCAL_RANK/WORLD_SIZE once; multi-node works through torchrun's
    rendezvous. Creating the group and every collective fail after `timeout_s` instead of waiting on
    a stalled rank."""
    if "RANK" not in os.environ:
        return Dist(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timedelta(seconds=timeout_s))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    # waiting for work only rank 0 does (tokenizing, verifying, writing) is not bounded
    global _RANK0_WORK
    _RANK0_WORK = dist.new_group(backend="gloo", timeout=timedelta(days=7))
    return Dist(dist.get_rank(), dist.get_world_size(), device, int(os.environ["LOCAL_WORLD_SIZE"]))


_RANK0_WORK = None


def wait_for_rank0(obj=None):
    """Every rank calls it; returns rank 0's `obj` once rank 0 gets there, however long its work
    took (a plain collective would time out after train.collective_timeout_s). Without a process
    group it returns `obj`."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_RANK0_WORK)
    return box[0]


def on_rank0(d: Dist, work, error: type):
    """`work()` on rank 0 alone, its result on every rank; an `error` it raises ends every rank with
    its message."""
    result = None
    if d.rank == 0:
        try:
            result = work()
        except error as e:
            result = e
    result = wait_for_rank0(result)
    if isinstance(result, Exception):
        sys.exit(f"error: {result}")
    return result


def all_reduce_sum(named: dict[str, torch.Tensor | float], d: Dist) -> dict[str, np.ndarray]:
    """Each named tensor (or number) summed over the ranks in one all-reduce, in fp64, returned by
    name on the host (a host sync, meant: the caller decides from the result)."""
    tensors = [torch.as_tensor(t, device=d.device).double() for t in named.values()]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if d.world_size > 1:
        dist.all_reduce(flat)
    chunks = flat.cpu().split([t.numel() for t in tensors])
    # [()]: a number for a 0-d tensor, the array otherwise
    return {name: c.reshape(t.shape).numpy()[()] for name, c, t in zip(named, chunks, tensors)}


def collective_failed(e: BaseException) -> bool:
    """Whether `e` is a collective that timed out or lost its peer (gloo raises these as plain
    RuntimeErrors)."""
    signs = ("Timed out", "timed out", "Connection closed", "Connection reset")
    return isinstance(e, dist.DistError) or any(s in str(e) for s in signs)


def _apply_lora(model: nn.Module, cfg: ShardingConfig):
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if cfg.lora_target_modules == ["all-linear"] else cfg.lora_target_modules
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      task_type="CAUSAL_LM", target_modules=targets)
    model.lm = get_peft_model(model.lm, lora)


def _apply_fsdp2(model: nn.Module, cfg: ShardingConfig, d: Dist):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy,
                                        OffloadPolicy, fully_shard, register_fsdp_forward_method)

    master = next(model.parameters()).dtype
    pinned = d.device.type == "cuda"
    offload = CPUOffloadPolicy(pin_memory=pinned) if cfg.cpu_offload else OffloadPolicy()
    compute = getattr(torch, cfg.compute_dtype)
    precision = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=master)
    kw = {"mp_policy": precision, "offload_policy": offload}
    if cfg.hybrid:  # 2-D mesh: replicate over nodes (dim 0), shard over the ranks of a node (dim 1)
        shape = (d.world_size // d.local_world_size, d.local_world_size)
        kw["mesh"] = init_device_mesh(d.device.type, shape, mesh_dim_names=("replicate", "shard"))
    # Each decoder block is its own unit, so only one block's full weights exist at a time; the root
    # unit holds the rest (final norm, and the embeddings when tied), which stays gathered after
    # forward because backward needs it first.
    for block in model.lm.get_decoder().layers:
        fully_shard(block, reshard_after_forward=cfg.reshard_after_forward, **kw)
    embedding, head = model.lm.get_input_embeddings(), model.lm.get_output_embeddings()
    no_cast = dataclasses.replace(precision, cast_forward_inputs=False)  # loss_weight stays fp32
    # Untied embeddings are units of their own (Llama-3.1-8B: 1 GiB each in fp32 per rank that the
    # root would hold all step). The input embedding is gathered in forward only (its backward does
    # not read it); the output layer runs our loss (head_loss) as a forward method of its unit, so
    # its gradient is reduced as backward starts, not with the root's at the end.
    if embedding.weight is not head.weight:
        fully_shard(embedding, **kw)
        if type(embedding) is nn.Embedding:
            embedding.set_unshard_in_backward(False)
        fully_shard(head, reshard_after_forward=False, **kw | {"mp_policy": no_cast})
        head.fsdp_head_loss = model.head_loss
        register_fsdp_forward_method(head, "fsdp_head_loss")
    fully_shard(model, reshard_after_forward=False, **kw | {"mp_policy": no_cast})
    # FSDP2 reduce-scatters each unit's gradients in backward, through ours
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_custom_reduce_scatter(_CombineInBackward())


def shard_model(model: nn.Module, cfg: ShardingConfig, d: Dist, from_rank0: bool = True
                ) -> nn.Module:
    """`model` is model_setup.PackedCausalLM, real on rank 0; with fsdp2 and `from_rank0`, on the
    meta device on the other ranks, which then receive their shards from rank 0."""
    if cfg.lora_rank:
        _apply_lora(model, cfg)
    if cfg.strategy == "fsdp2":
        # rank 0's weights and adapters
        full = model.state_dict() if d.rank == 0 and from_rank0 else {}
        _apply_fsdp2(model, cfg, d)
        if d.world_size > 1 and from_rank0:
            if d.rank != 0:  # allocate this rank's shards (uninitialized; filled from rank 0 below)
                model.to_empty(device="cpu" if cfg.cpu_offload else d.device)
            options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
            set_model_state_dict(model, full, options=options)
            for b in model.buffers():  # buffers that no state dict holds (rotary frequencies)
                dist.broadcast(b, src=0)
    elif d.world_size > 1:  # replicate: every rank starts from rank 0's weights
        for t in list(model.parameters()) + list(model.buffers()):
            if not hasattr(t, "ds_id"):  # a ZeRO-3 partition is filled already (model_setup)
                dist.broadcast(t.data, src=0)
    return model


def attach_optimizer(model: nn.Module, optimizer, cfg: ShardingConfig, max_grad_norm: float):
    """(model, optimizer) as the loop uses them: unchanged, or under `deepspeed` its engine around
    both, configured from our YAML. The loop keeps its own accumulation (a boundary flag per
    micro-step, since the number of micro-steps varies) and loss scaling, so DeepSpeed runs with one
    micro-batch per 'step' and averages gradients over ranks as FSDP2 does."""
    if cfg.strategy != "deepspeed":
        return model, optimizer
    import deepspeed

    if cfg.zero_stage == 3:  # the output layer is used in our loss, outside its module's forward
        deepspeed.zero.register_external_parameter(model, model.lm.get_output_embeddings().weight)
    ds_config = deepspeed_config(cfg, model.lm.config.hidden_size, max_grad_norm)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                   config=ds_config)
    return engine, optimizer


def deepspeed_config(cfg: ShardingConfig, h: int = 0, max_grad_norm: float = 0.0) -> dict:
    """DeepSpeed's config from our YAML; `h`: the model's hidden size, for the buckets (zero.Init
    needs none)."""
    zero = {"stage": cfg.zero_stage}
    # Our (fused) AdamW steps the offloaded fp32 state on the CPU; DeepSpeed would insist on its
    # CPUAdam, a C++ extension compiled at first use.
    if cfg.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if cfg.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    # DeepSpeed's default buckets hold 5e8 elements (2 GB in fp32) each; sized to the model instead,
    # as the HF Trainer's "auto" values do (BENCHMARKS.md, Memory)
    zero |= {} if not h else {"reduce_bucket_size": h * h, "allgather_bucket_size": h * h,
             "stage3_prefetch_bucket_size": int(0.9 * h * h),
             "stage3_param_persistence_threshold": 10 * h}
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "zero_optimization": zero, "zero_force_ds_cpu_optimizer": False,
            "gradient_clipping": max_grad_norm, "bf16": {"enabled": cfg.compute_dtype == "bfloat16"}}


def _is_deepspeed(model: nn.Module) -> bool:
    return hasattr(model, "set_gradient_accumulation_boundary")


def backward(model: nn.Module, loss: torch.Tensor, last_micro_step: bool):
    if _is_deepspeed(model):
        model.set_gradient_accumulation_boundary(last_micro_step)
        model.backward(loss)
    else:
        loss.backward()


# torch 2.13 renamed reduce_scatter_tensor, whose old name now warns at every call
_reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


def combine_gradients(grads: torch.Tensor, out: torch.Tensor | None, group, op=dist.ReduceOp.SUM):
    """The one place gradients cross ranks (`none` and `fsdp2`; DeepSpeed reduces its own way).
    `grads` is one flat buffer of this rank's gradients: all of them, once per step, under `none`
    (reduce_gradients); under FSDP2 one unit's, in its reduce dtype (model.dtype), at each backward.
    The result goes back into `grads` (out is None: an all-reduce) or into `out`, this rank's shard
    (FSDP2: a reduce-scatter). `op`: a sum under `none` (the caller divides by the world size),
    FSDP2's choice under fsdp2 (an average for fp32 and bf16 reduction). Edit this to change what
    is reduced, in which dtype, or over which group."""
    if out is None:
        dist.all_reduce(grads, op=op, group=group)
    else:
        _reduce_scatter(out, grads, op=op, group=group)


class _CombineInBackward:
    """FSDP2's reduce-scatter communication (FSDPModule.set_custom_reduce_scatter), routed to
    combine_gradients; FSDP2 still chooses the buffers and the division by the world size."""

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        combine_gradients(input_tensor, output_tensor, group, op)


def reduces_in_backward(cfg: ShardingConfig) -> bool:
    """Whether gradients are already combined over ranks after each backward (FSDP2, DeepSpeed) or
    only by reduce_gradients after the last micro-step (`none`)."""
    return cfg.strategy != "none"


def grad_sq_norm(model: nn.Module) -> torch.Tensor:
    """The sum of squares of the gradients this rank holds (its shards under FSDP2: summed over
    ranks, the global one), without communication."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return sum((g.to_local() if hasattr(g, "to_local") else g).float().pow(2).sum() for g in grads)


def reduce_gradients(model: nn.Module, cfg: ShardingConfig, d: Dist):
    """Averages gradients over ranks under `none`, after the last micro-step, in one flat buffer
    (FSDP2 and DeepSpeed reduced them during backward)."""
    if reduces_in_backward(cfg) or d.world_size == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    combine_gradients(flat, None, None)
    flat /= d.world_size  # gloo has no AVG
    for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(chunk.view_as(g))


def clip_and_step(model: nn.Module, optimizer, max_grad_norm: float, update: bool) -> float:
    """Clips to `max_grad_norm` (0 = no clipping) and, if `update`, steps; returns the gradient norm
    before clipping (DeepSpeed clips inside its step and reports the norm after it)."""
    if _is_deepspeed(model):
        if update:
            model.step()
        else:
            model.optimizer.zero_grad()
        return float(model.get_global_grad_norm() or 0.0)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
    # a DTensor under FSDP2
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if update and math.isfinite(norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def _state_dicts(model: nn.Module, optimizer) -> dict:
    """FQN-keyed model and optimizer state; sharded (DTensor) under FSDP2. Frozen weights are left
    out: a LoRA run rebuilds its base from model.path (or the seed) exactly as it did at the start.
    """
    options = StateDictOptions(ignore_frozen_params=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    return {"model": model_sd, "optim": optim_sd}


def save_state(model: nn.Module, optimizer, path: Path):
    """Every rank writes its part of the trained weights and the optimizer state under `path`
    (torch.distributed.checkpoint: readable on any world size and by `none` or `fsdp2`; DeepSpeed's
    own format)."""
    if _is_deepspeed(model):
        model.save_checkpoint(str(path), tag="deepspeed", save_latest=False,
                              exclude_frozen_parameters=True)
    else:
        dcp.save(_state_dicts(model, optimizer), checkpoint_id=path / "dcp")


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` as data: its own types, torch's sizes, dtypes and layouts, paths; else
    UnpicklingError before anything is called."""
    DCP = {"Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "_MEM_FORMAT_ENCODING",
           "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties"}
    OTHERS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
              ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}

    def find_class(self, module, name):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module == "torch.distributed.checkpoint.metadata" and name in self.DCP) or dtype \
                or (module, name) in self.OTHERS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint metadata type")


def load_state(model: nn.Module, optimizer, path: Path):
    """Every rank restores what `save_state` wrote, in place. Nothing is unpickled but tensors,
    numbers, containers and DCP's metadata types (pickle.UnpicklingError): a checkpoint from
    elsewhere cannot run code."""
    # every torch.load from here on (DCP's non-tensor items, DeepSpeed's files) weights-only,
    # whatever it asks
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    if _is_deepspeed(model):  # not strict: frozen weights were left out at save
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum,
                                               fragment_address]):
            model.load_checkpoint(str(path), tag="deepspeed", load_module_strict=False,
                                  load_lr_scheduler_states=False)
        return
    with open(path / "dcp/.metadata", "rb") as f:  # read as data first: DCP itself unpickles it
        _MetadataUnpickler(f).load()
    sd = _state_dicts(model, optimizer)
    # fails on any key of `sd` that the checkpoint lacks
    dcp.load(sd, checkpoint_id=path / "dcp")
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))


def full_state_dict(model: nn.Module) -> dict:
    """The full weights of `model.lm` (HF names) on rank 0's CPU, gathered from every rank (all take
    part); empty or partial on the others."""
    if _is_deepspeed(model) and model.zero_optimization_stage() == 3:
        state = model._zero3_consolidated_16bit_state_dict() or {}  # None on the other ranks
        return {k.removeprefix("lm."): v for k, v in state.items()}
    # full_state_dict gathers sharded (DTensor) weights; cpu_offload: the gathered copy on rank 0's
    # CPU only
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model.lm, options=options)
