"""Checkpoints: the final export in Hugging Face format, written atomically.

`export_hf` gathers the full weights (every rank takes part; only rank 0 writes) and writes safetensors, the
model and generation config, and the tokenizer with its chat template to a temporary directory, then renames it
to `<output_dir>/hf`, so a crash never leaves a half-written export behind. With LoRA, `hf/` is the PEFT adapter
and `hf/merged/` the model with the adapters merged into its base weights.
"""

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from torch import nn


@dataclass
class CheckpointConfig:
    save_every_steps: int = 0  # resumable state every N steps; 0 = only the export at the end (resumable
    #   state is not implemented yet: a value > 0 is refused at start-up rather than ignored)


def _replace_dir(tmp: Path, final: Path):
    """Renames `tmp` to `final`; an existing `final` is moved aside first and deleted only afterwards."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _save_merged(peft_model: nn.Module, state: dict, path: Path):
    """The adapters merged into the 16-bit base weights, as a plain HF model, on rank 0's CPU. A 4-bit base is
    read again from its directory in 16 bits (merging into dequantized NF4 weights would bake the quantization
    error into the model); otherwise the gathered state dict is assigned to a meta-built copy (no third copy)."""
    import torch
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
        copy.load_state_dict(state, strict=False, assign=True)
        copy.tie_weights()
    copy.merge_and_unload().save_pretrained(path)


def export_hf(model: nn.Module, tokenizer, output_dir: Path, rank: int) -> Path:
    """`model` is model_setup.PackedCausalLM (possibly sharded). Returns the export directory."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if getattr(model, "zero_optimization_stage", lambda: 0)() == 3:  # DeepSpeed ZeRO-3: gathered on rank 0
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
        model.lm.save_pretrained(tmp, state_dict=state)  # a peft model saves its adapter only
        tokenizer.save_pretrained(tmp)
        if hasattr(model.lm, "peft_config"):
            _save_merged(model.lm, state, tmp / "merged")
            tokenizer.save_pretrained(tmp / "merged")
        _replace_dir(tmp, final)
    if dist.is_initialized():
        dist.barrier()
    return final
