"""Checkpoints: resumable state during the run, and the final export in Hugging Face format.

Resumable state goes to `<output_dir>/checkpoints/step-N/`: model and optimizer (torch.distributed.checkpoint:
each rank writes its own shards, and any world size or sharding can read them back; DeepSpeed's own format under
DeepSpeed), each rank's RNG states, the trainer state (step, sampler position, counters) and the resolved config.
Every save is written to `step-N.tmp` and renamed when complete; `checkpoints/latest` (a one-line file) is
updated only after that, and old checkpoints are removed last, so a crash at any moment leaves the previous
checkpoint usable. The file system must be shared by all ranks (every rank writes into the same directory).

`export_hf` gathers the full weights (every rank takes part; only rank 0 holds and writes them) and writes
safetensors (sharded with an index above `max_shard_size`), the model and generation config, and the tokenizer
with its chat template, again through a temporary directory, to `<output_dir>/hf`. With LoRA, `hf/` is the PEFT
adapter and `hf/merged/` the model with the adapters merged into its 16-bit base weights.
"""

import json
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

import sharding


@dataclass
class CheckpointConfig:
    save_every_steps: int = 0  # resumable state every N optimizer steps; it is always saved at the end (and on
    #   SIGTERM/SIGUSR1); 0 = only then
    keep_last: int = 2  # keep the newest N checkpoints (never deleting the one `latest` names); 0 = keep all
    resume: str = "auto"  # auto: continue from <output_dir>/checkpoints/latest when it exists; never: start
    #   afresh (an existing checkpoints/ is overwritten step by step); or a checkpoint directory (any run's step-N)


class ResumeError(ValueError):
    pass


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _state_dicts(model: nn.Module, optimizer) -> dict:
    """FQN-keyed model and optimizer state; sharded (DTensor) under FSDP2. Frozen weights are left out: a LoRA
    run rebuilds its base from model.path (or the seed) exactly as it did at the start."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": model_sd, "optim": optim_sd}


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _replace_dir(tmp: Path, final: Path):
    """Renames `tmp` to `final`; an existing `final` is moved aside first and deleted only afterwards."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _write_latest(root: Path, name: str):
    tmp = root / "latest.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / "latest")  # atomic: `latest` names either the old or the new checkpoint


def _rotate(root: Path, keep_last: int):
    """Deletes complete checkpoints older than the newest `keep_last`, never the one `latest` names."""
    latest = (root / "latest").read_text().strip()
    done = sorted((p for p in root.glob("step-*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
    for p in done[:-keep_last] if keep_last > 0 else []:
        if p.name != latest:
            shutil.rmtree(p)


def catch_preemption() -> dict:
    """From now on SIGTERM (what torchrun forwards when a scheduler stops the job) and SIGUSR1 (SLURM's
    `--signal=USR1@120`) only set the returned dict's "signal"; the loop finishes its step, agrees with the
    other ranks, saves and exits."""
    caught = {}

    def handler(signum, frame):
        caught["signal"] = signal.Signals(signum).name

    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, handler)
    return caught


def save(output_dir: Path, step: int, model: nn.Module, optimizer, state: dict, config_text: str,
         cfg: CheckpointConfig, rank: int) -> Path:
    """Every rank calls it. `state` (JSON) is the trainer's: step, sampler position, counters."""
    t0 = time.perf_counter()
    root = Path(output_dir) / "checkpoints"
    final, tmp = root / f"step-{step}", root / f"step-{step}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # the leftover of a save that crashed
        tmp.mkdir(parents=True)
    _barrier()
    if sharding.is_deepspeed(model):
        model.save_checkpoint(str(tmp), tag="deepspeed", save_latest=False, exclude_frozen_parameters=True)
    else:
        dcp.save(_state_dicts(model, optimizer), checkpoint_id=tmp / "dcp")
    torch.save(_rng_state(), tmp / f"rng-rank{rank}.pt")
    if rank == 0:
        (tmp / "config.yaml").write_text(config_text)
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    _barrier()  # every rank's files are complete
    if rank == 0:
        _replace_dir(tmp, final)
        _write_latest(root, final.name)
        _rotate(root, cfg.keep_last)
        size_mib = sum(f.stat().st_size for f in final.rglob("*") if f.is_file()) / 2**20
        print(f"saved {final} ({size_mib:.1f} MiB) in {time.perf_counter() - t0:.1f}s", flush=True)
    _barrier()
    return final


def find(output_dir: Path, cfg: CheckpointConfig) -> tuple[Path, dict] | None:
    """The checkpoint that `checkpoint.resume` asks for and its trainer state (with the saved config under
    "config"), or None to start afresh. Reads no tensors: the caller checks the state before loading a model."""
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        latest = Path(output_dir) / "checkpoints" / "latest"
        if not latest.exists():
            return None
        path = latest.parent / latest.read_text().strip()
        fix = "set checkpoint.resume to another checkpoints/step-N directory, or never"
    else:
        path, fix = Path(cfg.resume), "give a checkpoints/step-N directory, auto or never"
    if not (path / "trainer_state.json").is_file():
        raise ResumeError(f"checkpoint.resume: {path} is missing or not a complete checkpoint; {fix}")
    state = json.loads((path / "trainer_state.json").read_text())
    return path, state | {"config": yaml.safe_load((path / "config.yaml").read_text())}


def load(path: Path, model: nn.Module, optimizer, rank: int):
    """Every rank calls it; restores model, optimizer and this rank's RNG states in place (a rank the saved run
    did not have keeps its seeded RNG)."""
    if sharding.is_deepspeed(model):
        # not strict: frozen weights were left out at save (exclude_frozen_parameters)
        model.load_checkpoint(str(path), tag="deepspeed", load_module_strict=False, load_lr_scheduler_states=False)
    else:
        sd = _state_dicts(model, optimizer)
        dcp.load(sd, checkpoint_id=path / "dcp")  # fails on any key of `sd` that the checkpoint lacks
        # not strict: the frozen weights are absent on purpose (see _state_dicts)
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))
    if (path / f"rng-rank{rank}.pt").exists():
        _set_rng_state(torch.load(path / f"rng-rank{rank}.pt", weights_only=False))


def _save_merged(peft_model: nn.Module, state: dict, path: Path, max_shard_size: str):
    """The adapters merged into the 16-bit base weights, as a plain HF model, on rank 0's CPU. A 4-bit base is
    read again from its directory in 16 bits (merging into dequantized NF4 weights would bake the quantization
    error into the model); otherwise the gathered state dict is assigned to a meta-built copy (no third copy)."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base, config = peft_model.get_base_model(), peft_model.peft_config["default"]
    if getattr(base, "is_loaded_in_4bit", False):
        copy = get_peft_model(AutoModelForCausalLM.from_pretrained(base.config._name_or_path, dtype=base.dtype),
                              config)
        set_peft_model_state_dict(copy, get_peft_model_state_dict(peft_model, state_dict=state))
    else:
        with torch.device("meta"):
            copy = get_peft_model(AutoModelForCausalLM.from_config(base.config, dtype=base.dtype), config)
        # merging writes into the base weights: on a CPU run the gathered tensors can be the live model's own
        live = {p.data_ptr() for p in peft_model.parameters()}
        copy.load_state_dict({k: v.clone() if v.data_ptr() in live else v for k, v in state.items()}, strict=False,
                             assign=True)
        copy.tie_weights()
    copy.merge_and_unload().save_pretrained(path, max_shard_size=max_shard_size)


def export_hf(model: nn.Module, tokenizer, output_dir: Path, rank: int, max_shard_size: str = "5GB") -> Path:
    """`model` is model_setup.PackedCausalLM (possibly sharded). Returns the export directory."""
    if sharding.is_deepspeed(model) and model.zero_optimization_stage() == 3:  # ZeRO-3: gathered on rank 0
        state = model._zero3_consolidated_16bit_state_dict() or {}  # None on the other ranks
        state = {k.removeprefix("lm."): v for k, v in state.items()}
    else:  # full_state_dict gathers sharded (DTensor) weights; cpu_offload: the gathered copy on rank 0's CPU only
        state = get_model_state_dict(model.lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first = {}  # tied weights (input/output embeddings) are one parameter under two names: save it once
    for name, p in model.lm.named_parameters(remove_duplicate=False):
        if first.setdefault(id(p), name) != name:
            state.pop(name, None)
    final = Path(output_dir) / "hf"
    if rank == 0:
        tmp = final.with_name("hf.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.lm.save_pretrained(tmp, state_dict=state, max_shard_size=max_shard_size)  # peft: the adapter only
        tokenizer.save_pretrained(tmp)
        if hasattr(model.lm, "peft_config"):
            _save_merged(model.lm, state, tmp / "merged", max_shard_size)
            tokenizer.save_pretrained(tmp / "merged")
        _replace_dir(tmp, final)
    _barrier()
    return final
