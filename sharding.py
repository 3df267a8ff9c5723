"""Process groups and sharding strategies.

`init_distributed()` reads torchrun's environment (nccl on CUDA, gloo on CPU; a plain single process without it).
`shard_model()` applies the configured strategy; `reduce_gradients()` is the one place gradients are combined
across ranks before the optimizer step. Gradients are averaged over ranks (FSDP2's default, which gloo's lack of
pre-multiplied sums keeps us from changing), so train.py backpropagates loss_sum * world_size / N_step, where
N_step counts the supervised tokens of the whole step over all ranks: the mean then gives sum / N_step.
"""

import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class ShardingConfig:
    strategy: Literal["none", "fsdp2"] = "none"  # none: every rank holds the whole model; fsdp2: fully_shard
    compute_dtype: Literal["bfloat16", "float32"] = "bfloat16"  # fsdp2: dtype of forward/backward (weights and
    #   gradient reduction stay in model.dtype, the master dtype)
    reshard_after_forward: bool = True  # fsdp2: free gathered weights after forward (less memory, more comms)


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def init_distributed() -> Dist:
    """Reads torchrun's RANK/LOCAL_RANK/WORLD_SIZE once; multi-node works through torchrun's rendezvous."""
    if "RANK" not in os.environ:
        return Dist(0, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return Dist(dist.get_rank(), local_rank, dist.get_world_size(), device)


def _apply_fsdp2(model: nn.Module, cfg: ShardingConfig):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    master = next(model.parameters()).dtype
    mp = MixedPrecisionPolicy(param_dtype=getattr(torch, cfg.compute_dtype), reduce_dtype=master)
    # Each decoder block is its own unit, so only one block's full weights exist at a time; the root unit
    # holds the rest (embeddings, final norm, output layer), which stays gathered after forward because
    # backward needs it first.
    for block in model.lm.get_decoder().layers:
        fully_shard(block, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)


def shard_model(model: nn.Module, cfg: ShardingConfig, d: Dist) -> nn.Module:
    if cfg.strategy == "fsdp2":
        _apply_fsdp2(model, cfg)
    elif d.world_size > 1:  # replicate: every rank starts from rank 0's weights
        for p in model.parameters():
            dist.broadcast(p.data, src=0)
    return model


def reduce_gradients(model: nn.Module, cfg: ShardingConfig, d: Dist):
    """Averages gradients over ranks. FSDP2 already reduce-scattered them during backward; with `none` they are
    all-reduced here in one flat buffer. Edit this to aggregate gradients differently."""
    if cfg.strategy != "none" or d.world_size == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)  # gloo has no AVG
    flat /= d.world_size
    for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(chunk.view_as(g))
