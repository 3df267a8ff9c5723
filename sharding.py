"""Process groups, sharding strategies and LoRA wrapping.

`init_distributed()` reads torchrun's environment (nccl on CUDA, gloo on CPU; a plain single process without it).
`shard_model()` wraps LoRA adapters (peft) when asked, then applies the strategy; under FSDP2, ranks other than 0
built the model on the meta device (model_setup.load_model) and receive their shards from rank 0 here, so CPU
memory does not grow with the number of local ranks. `reduce_gradients()` is the one place gradients are combined
across ranks before the optimizer step. Gradients are averaged over ranks (FSDP2's default, which gloo's lack of
pre-multiplied sums keeps us from changing), so train.py backpropagates loss_sum * world_size / N_step, where
N_step counts the supervised tokens of the whole step over all ranks: the mean then gives sum / N_step.
"""

import math
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class ShardingConfig:
    strategy: Literal["none", "fsdp2", "deepspeed"] = "none"  # none: every rank holds the whole model;
    #   fsdp2: fully_shard per block; deepspeed: ZeRO (deepspeed extra)
    compute_dtype: Literal["bfloat16", "float32"] = "bfloat16"  # fsdp2: dtype of forward/backward (weights and
    #   gradient reduction stay in model.dtype, the master dtype)
    reshard_after_forward: bool = True  # fsdp2: free gathered weights after forward (less memory, more comms)
    hybrid: bool = False  # fsdp2: shard inside each node, replicate across nodes (torchrun --nnodes > 1)
    cpu_offload: bool = False  # fsdp2: sharded weights, gradients and optimizer state in CPU memory;
    #   deepspeed: optimizer state (and with ZeRO-3 the weights) in CPU memory
    zero_stage: Literal[1, 2, 3] = 2  # deepspeed: 1 shards optimizer state, 2 also gradients, 3 also weights
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank (peft) on frozen base weights; 0 = full fine-tuning
    lora_alpha: float = 16.0  # LoRA scale numerator: the adapter update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on the adapter input
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # module names, or all-linear
    #   (every linear layer but the output layer)


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    local_world_size: int = 1  # ranks on this node


def init_distributed(timeout_s: float = 300) -> Dist:
    """Reads torchrun's RANK/LOCAL_RANK/WORLD_SIZE once; multi-node works through torchrun's rendezvous. Creating
    the group and every collective fail after `timeout_s` instead of waiting on a stalled rank."""
    if "RANK" not in os.environ:
        return Dist(0, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timedelta(seconds=timeout_s))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    global _RANK0_WORK  # waiting for work only rank 0 does (tokenizing, verifying, writing) is not bounded
    _RANK0_WORK = dist.new_group(backend="gloo", timeout=timedelta(days=7))
    return Dist(dist.get_rank(), local_rank, dist.get_world_size(), device, int(os.environ["LOCAL_WORLD_SIZE"]))


_RANK0_WORK = None


def wait_for_rank0(obj=None):
    """Every rank calls it; returns rank 0's `obj` once rank 0 gets there, however long its work took (a plain
    collective would time out after train.collective_timeout_s). Without a process group it returns `obj`."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_RANK0_WORK)
    return box[0]


def collective_failed(e: BaseException) -> bool:
    """Whether `e` is a collective that timed out or lost its peer (gloo raises these as plain RuntimeErrors)."""
    return isinstance(e, dist.DistError) or any(s in str(e) for s in ("Timed out", "timed out", "Connection closed",
                                                                       "Connection reset"))


def _apply_lora(model: nn.Module, cfg: ShardingConfig):
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if cfg.lora_target_modules == ["all-linear"] else cfg.lora_target_modules
    model.lm = get_peft_model(model.lm, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, task_type="CAUSAL_LM",
                                                   lora_dropout=cfg.lora_dropout, target_modules=targets))


def _apply_fsdp2(model: nn.Module, cfg: ShardingConfig, d: Dist):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    master = next(model.parameters()).dtype
    offload = CPUOffloadPolicy(pin_memory=d.device.type == "cuda") if cfg.cpu_offload else OffloadPolicy()
    kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=getattr(torch, cfg.compute_dtype), reduce_dtype=master),
          "offload_policy": offload}
    if cfg.hybrid:  # 2-D mesh: replicate over nodes (dim 0), shard over the ranks of a node (dim 1)
        nodes = d.world_size // d.local_world_size
        kw["mesh"] = init_device_mesh(d.device.type, (nodes, d.local_world_size), mesh_dim_names=("replicate", "shard"))
    # Each decoder block is its own unit, so only one block's full weights exist at a time; the root unit
    # holds the rest (embeddings, final norm, output layer), which stays gathered after forward because
    # backward needs it first.
    for block in model.lm.get_decoder().layers:
        fully_shard(block, reshard_after_forward=cfg.reshard_after_forward, **kw)
    fully_shard(model, reshard_after_forward=False, **kw)


def shard_model(model: nn.Module, cfg: ShardingConfig, d: Dist, from_rank0: bool = True) -> nn.Module:
    """`model` is model_setup.PackedCausalLM, real on rank 0; with fsdp2 and `from_rank0`, on the meta device on
    the other ranks, which then receive their shards from rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if cfg.lora_rank:
        _apply_lora(model, cfg)
    if cfg.strategy == "fsdp2":
        full = model.state_dict() if d.rank == 0 and from_rank0 else {}  # rank 0's weights and adapters
        _apply_fsdp2(model, cfg, d)
        if d.world_size > 1 and from_rank0:
            if d.rank != 0:  # allocate this rank's shards (uninitialized; filled from rank 0 below)
                model.to_empty(device="cpu" if cfg.cpu_offload else d.device)
            set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
            for b in model.buffers():  # buffers that no state dict holds (rotary frequencies)
                dist.broadcast(b, src=0)
    elif d.world_size > 1:  # replicate: every rank starts from rank 0's weights
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)
    return model


def wrap_deepspeed(model: nn.Module, optimizer, cfg: ShardingConfig, max_grad_norm: float):
    """DeepSpeed's engine around our model and optimizer, configured from our YAML. The loop keeps its own
    accumulation (a boundary flag per micro-step, since the number of micro-steps varies) and loss scaling, so
    DeepSpeed runs with one micro-batch per 'step' and averages gradients over ranks as FSDP2 does."""
    try:
        import deepspeed
    except ImportError:
        raise ImportError("sharding.strategy: deepspeed needs the deepspeed extra: pip install -e '.[deepspeed]'")
    zero = {"stage": cfg.zero_stage}
    if cfg.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if cfg.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    if cfg.zero_stage == 3:  # the output layer is used in our loss, outside its own module's forward
        deepspeed.zero.register_external_parameter(model, model.lm.get_output_embeddings().weight)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": zero,
                 "gradient_clipping": max_grad_norm, "bf16": {"enabled": cfg.compute_dtype == "bfloat16"}}
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, optimizer


def is_deepspeed(model: nn.Module) -> bool:
    """Whether `model` is the engine that wrap_deepspeed returned."""
    return hasattr(model, "set_gradient_accumulation_boundary")


def backward(model: nn.Module, loss: torch.Tensor, last_micro_step: bool):
    if is_deepspeed(model):
        model.set_gradient_accumulation_boundary(last_micro_step)
        model.backward(loss)
    else:
        loss.backward()


def clip_and_step(model: nn.Module, optimizer, max_grad_norm: float, update: bool) -> float:
    """Clips to `max_grad_norm` (0 = no clipping) and, if `update`, steps; returns the gradient norm before
    clipping (DeepSpeed clips inside its step and reports the norm after it)."""
    if is_deepspeed(model):
        if update:
            model.step()
        else:
            model.optimizer.zero_grad()
        return float(model.get_global_grad_norm() or 0.0)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP2
    if update and math.isfinite(norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def reduce_gradients(model: nn.Module, cfg: ShardingConfig, d: Dist):
    """Averages gradients over ranks. FSDP2 and DeepSpeed already reduced them during backward; with `none` they
    are all-reduced here in one flat buffer. Edit this to aggregate gradients differently."""
    if cfg.strategy != "none" or d.world_size == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)  # gloo has no AVG
    flat /= d.world_size
    for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(chunk.view_as(g))
