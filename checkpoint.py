"""Checkpoints: resumable state during the run, and the final export in Hugging Face format.

Resumable state goes to `<output_dir>/checkpoints/step-N/`: model and optimizer
(torch.distributed.checkpoint: each rank writes its own shards, and any world size or sharding can
read them back; DeepSpeed's own format under DeepSpeed), each rank's RNG states, the trainer state
(step, counters) and the resolved config. Every save is written to `step-N.tmp` and renamed when
complete; `checkpoints/latest` (a one-line file) is updated only after that, and old checkpoints are
removed last, so a crash at any moment leaves the previous checkpoint usable. The file system must
be shared by all ranks (every rank writes into the same directory).

`export_hf` gathers the full weights (every rank takes part; only rank 0 holds and writes them) and
writes safetensors (sharded with an index above `max_shard_size`), the model and generation config,
and the tokenizer with its chat template, again through a temporary directory, to `<output_dir>/hf`.
With LoRA, `hf/` is the PEFT adapter and `hf/merged/` the model with the adapters merged into its
16-bit base weights.
"""

import json
import os
import pickle
import random
import shutil
import signal
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch import nn

import config
import sharding


@config.section("checkpoint")
@dataclass
class CheckpointConfig:
    save_every_steps: Annotated[int, config.ge(0)] = 0  # resumable state every N optimizer steps; it is always
    #   saved at the end (and on SIGTERM/SIGUSR1); 0 = only then
    keep_last: Annotated[int, config.ge(0)] = 2  # keep the newest N checkpoints (never deleting the one `latest`
    #   names); 0 = keep all
    resume: str = "auto"  # auto: continue from <output_dir>/checkpoints/latest when it exists; never: start
    #   afresh (an existing checkpoints/ is overwritten step by step); or a checkpoint directory (any run's step-N)


class ResumeError(ValueError):
    pass


def _rng_state() -> dict:
    """Every RNG state as tensors and numbers only, so it loads with torch.load(weights_only=True).
    """
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": (version, torch.tensor(mt), gauss), "numpy": torch.from_numpy(keys.astype(np.int64)),
             "numpy_pos": pos, "numpy_gauss": (has_gauss, cached), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict):
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt.tolist()), gauss))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         *state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _replace_dir(tmp: Path, final: Path):
    """Renames `tmp` to `final`; an existing `final` is moved aside first and deleted only
    afterwards."""
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
    """Deletes complete checkpoints older than the newest `keep_last`, never the one `latest` names.
    """
    latest = (root / "latest").read_text().strip()
    done = sorted((p for p in root.glob("step-*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
    for p in done[:-keep_last] if keep_last > 0 else []:
        if p.name != latest:
            shutil.rmtree(p)


def catch_preemption() -> dict:
    """From now on SIGTERM (what torchrun forwards when a scheduler stops the job) and SIGUSR1
    (SLURM's `--signal=USR1@120`) only set the returned dict's "signal"; the loop finishes its step,
    agrees with the other ranks, saves and exits."""
    caught = {}

    def handler(signum, frame):
        caught["signal"] = signal.Signals(signum).name

    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, handler)
    return caught


class SaveError(RuntimeError):
    pass


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _all_ok(ok: bool) -> bool:
    """Whether every rank is ok; also a barrier."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device="cuda" if torch.cuda.is_available() else "cpu")  # nccl: CUDA
    dist.all_reduce(flag)
    return flag.item() == 0


def verify(path: Path) -> str | None:
    """None when every file the checkpoint's manifest lists is there with its size and checksum;
    else what is wrong, naming the file."""
    manifest = path / "manifest.json"
    try:
        files = json.loads(manifest.read_text())
    except (OSError, ValueError) as e:
        return f"{manifest} is missing or unreadable ({type(e).__name__}): the save did not complete"
    for name, (size, crc) in files.items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} has {f.stat().st_size} bytes, {size} were written (truncated)"
        if _crc32(f) != crc:
            return f"{f} does not match its checksum (corrupted)"
    return None


def save(output_dir: Path, step: int, model: nn.Module, optimizer, state: dict, config_text: str,
         cfg: CheckpointConfig, rank: int) -> Path:
    """Every rank calls it. `state` (JSON) is the trainer's: step, counters. The manifest (size and
    CRC32 of every file) is written last, before the rename. If any rank cannot write (disk full,
    permission), the partial directory is removed, `latest` keeps naming the previous checkpoint and
    SaveError is raised on every rank."""
    t0 = time.perf_counter()
    root = Path(output_dir) / "checkpoints"
    final, tmp = root / f"step-{step}", root / f"step-{step}.tmp"
    error = None
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # the leftover of a save that crashed
            tmp.mkdir(parents=True)
    except OSError as e:
        error = e
    if _all_ok(error is None):
        try:
            sharding.save_state(model, optimizer, tmp)
            torch.save(_rng_state(), tmp / f"rng-rank{rank}.pt")
            if rank == 0:
                (tmp / "config.yaml").write_text(config_text)
                (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        except (OSError, dcp.CheckpointException) as e:
            error = e
    if not _all_ok(error is None):  # every rank's files are complete, or some rank failed
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        last = (root / "latest").read_text().strip() if (root / "latest").exists() else None
        lost = f"steps {int(last[5:]) + 1}-{step}" if last else f"all {step} steps"
        raise SaveError(f"saving {final} failed ({error or 'on another rank'}); {lost} are lost: `latest` still "
                        f"names {last or 'no checkpoint'}; free space or fix the permission, then run the same "
                        "command again to resume from there")
    if rank == 0:
        files = sorted(f for f in tmp.rglob("*") if f.is_file())
        manifest = {str(f.relative_to(tmp)): [f.stat().st_size, _crc32(f)] for f in files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=0))
        _replace_dir(tmp, final)
        _write_latest(root, final.name)
        _rotate(root, cfg.keep_last)
        size_mib = sum(size for size, _ in manifest.values()) / 2**20
        print(f"saved {final} ({size_mib:.1f} MiB) in {time.perf_counter() - t0:.1f}s", flush=True)
    sharding.wait_for_rank0()  # the checksums take rank 0 a while on a large checkpoint
    return final


def _state(path: Path) -> dict:
    state = json.loads((path / "trainer_state.json").read_text())
    return state | {"config": yaml.safe_load((path / "config.yaml").read_text())}


def find(output_dir: Path, cfg: CheckpointConfig) -> tuple[Path, dict] | None:
    """The checkpoint that `checkpoint.resume` asks for and its trainer state (with the saved config
    under "config"), or None to start afresh; rank 0 alone calls it. Each candidate is verified
    against its manifest: with `auto`, a damaged newest checkpoint is renamed to step-N.damaged
    (kept, never deleted) and the newest intact one before it is taken. Reads no tensors into
    memory."""
    if cfg.resume == "never":
        return None
    if cfg.resume != "auto":
        path = Path(cfg.resume)
        if problem := verify(path):
            raise ResumeError(f"checkpoint.resume: {path} cannot be used: {problem}; give another checkpoints/step-N "
                              "directory, auto or never")
        return path, _state(path)
    root = Path(output_dir) / "checkpoints"
    if not (root / "latest").exists():
        return None
    latest = root / (root / "latest").read_text().strip()
    older = [p for p in root.glob("step-*") if p.name[5:].isdigit() and int(p.name[5:]) < int(latest.name[5:])]
    damaged = []
    for path in [latest] + sorted(older, key=lambda p: -int(p.name[5:])):
        if not (problem := verify(path)):
            if damaged:
                print(f"resuming from {path}, the newest intact checkpoint", flush=True)
                _write_latest(root, path.name)
            return path, _state(path)
        damaged.append(f"{path.name}: {problem}")
        if path.exists():
            aside = path.with_name(path.name + ".damaged")
            aside = aside if not aside.exists() else aside.with_name(f"{aside.name}-{time.time_ns()}")
            path.rename(aside)
            print(f"checkpoint {path} is damaged ({problem}); kept as {aside.name}", flush=True)
    raise ResumeError(f"no intact checkpoint under {root}:\n  " + "\n  ".join(damaged) + "\n  set "
                      "checkpoint.resume: never to start afresh, or to the path of a checkpoint from elsewhere")


# A resumed run must go on training the same model on the same data in the same order; anything else
# may change (and is printed). The data is compared through the token cache's fingerprint; DeepSpeed
# checkpoints are its own format (fsdp2 and none read each other's).
MUST_MATCH = ("model.path", "model.random_init", "model.load_in_4bit", "sharding.lora_rank",
              "sharding.lora_target_modules", "sampler.batch_size", "train.seed", "data.train_files")


def compare(state: dict, run: dict, data: str) -> tuple[list[str], dict]:
    """(what stops this run from resuming from the checkpoint of trainer `state`, every setting that
    changed since it was saved as {key: (then, now)}); `run`: the run's config as a dict, `data`:
    the name of its token cache."""
    then, now = ({f"{s}.{k}": v for s, kv in c.items() for k, v in kv.items()} for c in (state["config"], run))
    changed = {k: (then.get(k), v) for k, v in now.items() if then.get(k) != v}
    bad = [f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in changed.items()
           if k in MUST_MATCH or (k == "sharding.strategy" and "deepspeed" in (a, b))]
    if state["data"] != data:
        bad.append(f"data: the token cache differs ({state['data']} in the checkpoint, {data} now): "
                   "other data.train_files (paths or content), data.max_seq_len or tokenizer")
    return bad, changed


def resume_point(output_dir: Path, cfg: config.Config, data: str) -> tuple[Path, dict] | None:
    """`find`'s checkpoint, if this run (`data`: its token cache's name) can continue from it
    (`compare`), else ResumeError; prints every setting that changed since it was saved."""
    found = find(output_dir, cfg.checkpoint)
    if not found:
        return None
    path, state = found
    bad, changed = compare(state, config.to_dict(cfg), data)
    if bad:
        raise ResumeError(f"cannot resume from {path}:\n  " + "\n  ".join(bad)
                          + "\n  set them back, or set checkpoint.resume: never to start afresh")
    changes = "".join(f"\n  changed: {k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
    print(f"resuming from {path} at step {state['step']} (saved by {state['world_size']} rank(s))"
          + changes, flush=True)
    return path, state


def load(path: Path, model: nn.Module, optimizer, rank: int):
    """Every rank calls it; restores model, optimizer and this rank's RNG states in place (a rank
    the saved run did not have keeps its seeded RNG)."""
    # nothing unpickled but data (tensors, numbers, containers), even from a checkpoint made elsewhere
    try:
        sharding.load_state(model, optimizer, path)
        if (path / f"rng-rank{rank}.pt").exists():
            _set_rng_state(torch.load(path / f"rng-rank{rank}.pt", weights_only=True))
    except (pickle.UnpicklingError, OSError, dcp.api.CheckpointException) as e:
        # DCP wraps what failed (a weights-only load of a non-tensor item) with its traceback
        cause = next(iter(e.failures.values()))[0] if isinstance(e, dcp.api.CheckpointException) else e
        if isinstance(cause, OSError):  # a file its manifest does not list (one made elsewhere)
            raise ResumeError(f"{path} cannot be read ({cause}); give another checkpoint") from None
        if not isinstance(cause, pickle.UnpicklingError):
            raise
        raise ResumeError(f"{path} holds more than tensors and numbers; refused to load it "
                          f"({str(cause).splitlines()[0]})") from None


def _save_merged(peft_model: nn.Module, state: dict, path: Path, max_shard_size: str):
    """The adapters merged into the 16-bit base weights, as a plain HF model, on rank 0's CPU. A
    4-bit base is read again from its directory in 16 bits (merging into dequantized NF4 weights
    would bake the quantization error into the model); otherwise the gathered state dict is assigned
    to a meta-built copy (no third copy)."""
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
        # merging writes into the base weights: on a CPU run the gathered tensors can be the live
        # model's own
        live = {p.data_ptr() for p in peft_model.parameters()}
        copy.load_state_dict({k: v.clone() if v.data_ptr() in live else v for k, v in state.items()}, strict=False,
                             assign=True)
        copy.tie_weights()
    copy.merge_and_unload().save_pretrained(path, max_shard_size=max_shard_size)


def export_hf(model: nn.Module, tokenizer, output_dir: Path, rank: int, card: str = "",
              max_shard_size: str = "5GB") -> Path:
    """`model` is model_setup.PackedCausalLM (possibly sharded); `card` the model card (README.md).
    Returns the export directory."""
    state = sharding.full_state_dict(model)
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
            (tmp / "merged/README.md").write_text(card)
        (tmp / "README.md").write_text(card)  # replaces peft's template card
        _replace_dir(tmp, final)
    sharding.wait_for_rank0()  # rank 0 wrote the export
    return final
