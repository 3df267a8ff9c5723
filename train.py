"""Supervised fine-tuning of a Hugging Face causal LM on packed, padding-free batches.

    torchrun --nproc_per_node=N train.py --config configs/quickstart.yaml [--section.key=value ...]
    python train.py --config configs/quickstart.yaml                      # a single process, no torchrun

Stages, in order: tokenize_data -> sampler -> model_setup -> sharding -> this loop -> checkpoint, with
logging_utils throughout. Swap points here: `build_optimizer` and `lr_at`.
"""

import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist

import checkpoint
import config
import logging_utils
import model_setup
import sampler
import sharding
import tokenize_data
from logging_utils import print0


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"  # everything of the run goes here (config, metrics, checkpoints, hf/)
    epochs: int = 1  # passes over data.train_files (ignored when max_steps > 0)
    max_steps: int = 0  # stop after this many optimizer steps; 0 = run the epochs
    lr: float = 2e-5  # peak learning rate
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warmup, down to min_lr_ratio*lr
    warmup_steps: int = 0  # linear warmup from 0 over this many steps
    min_lr_ratio: float = 0.0  # final lr as a fraction of lr (cosine and linear)
    weight_decay: float = 0.0  # AdamW decoupled weight decay, on matrices only (not norms or biases)
    beta2: float = 0.95  # AdamW second-moment decay (beta1 = 0.9)
    max_grad_norm: float = 1.0  # clip the global gradient norm to this; 0 = no clipping
    seed: int = 42  # model init, data order and every other random choice
    eval_every_steps: int = 0  # eval loss on data.eval_files every N steps; it is always computed at the end
    heldout_file: str = ""  # chat JSONL; after export, report greedy exact match on its last messages
    collective_timeout_s: float = 300  # a collective (or the process group's creation) that waits longer than
    #   this on a stalled or dead rank ends the job, naming the step and phase


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): stopped early, run again to continue

SECTIONS = {"data": tokenize_data.DataConfig, "model": model_setup.ModelConfig,
            "sharding": sharding.ShardingConfig, "sampler": sampler.SamplerConfig, "train": TrainConfig,
            "checkpoint": checkpoint.CheckpointConfig, "logging": logging_utils.LogConfig}


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8)


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    decay = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay[cfg.lr_schedule])


# (key, lowest, highest, whether the lowest is allowed): numbers out of range are refused at start-up
RANGES = [("train.lr", 0, None, False), ("train.epochs", 1, None, True), ("train.max_steps", 0, None, True),
          ("train.warmup_steps", 0, None, True), ("train.min_lr_ratio", 0, 1, True),
          ("train.weight_decay", 0, None, True), ("train.beta2", 0, 1, True), ("train.max_grad_norm", 0, None, True),
          ("train.eval_every_steps", 0, None, True), ("train.collective_timeout_s", 0, None, False),
          ("sharding.lora_rank", 0, None, True), ("sharding.lora_alpha", 0, None, False),
          ("sharding.lora_dropout", 0, 1, True), ("sampler.batch_size", 1, None, True),
          ("sampler.max_tokens_per_rank", 1, None, True), ("data.max_seq_len", 1, None, True),
          ("data.num_proc", 1, None, True), ("checkpoint.save_every_steps", 0, None, True),
          ("checkpoint.keep_last", 0, None, True), ("logging.log_every_steps", 1, None, True)]


def _check_settings(cfg: dict):
    """Settings out of range or that cannot work together, refused at start-up with what to change."""
    m, sh = cfg["model"], cfg["sharding"]
    problems = [(f"{key}: {v} is out of range; it must be {'>=' if closed else '>'} {low}"
                 + (f" and <= {high}" if high is not None else ""))
                for key, low, high, closed in RANGES
                for v in [getattr(cfg[key.split(".")[0]], key.split(".")[1])]
                if v < low or (v == low and not closed) or (high is not None and v > high)]
    problems += [f"data.train_files: {s.path} has weight {s.weight}; weights must be > 0"
                 for s in tokenize_data.sources(cfg["data"].train_files) if s.weight <= 0]
    combinations = [
        (m.load_in_4bit and m.random_init, "model.load_in_4bit quantizes weights as they are read: set "
         "model.random_init: false and model.path to a directory with weights"),
        (m.load_in_4bit and not sh.lora_rank, "model.load_in_4bit: 4-bit weights cannot be trained; set "
         "sharding.lora_rank > 0 (QLoRA)"),
        (m.load_in_4bit and sh.cpu_offload, "model.load_in_4bit with sharding.cpu_offload is not supported; "
         "set one of them to false"),
        (m.load_in_4bit and sh.strategy == "deepspeed", "model.load_in_4bit (QLoRA) does not work with DeepSpeed; "
         "use sharding.strategy: fsdp2 or none"),
        (sh.strategy == "fsdp2" and "RANK" not in os.environ, "sharding.strategy: fsdp2 needs torchrun "
         "(torchrun --nproc_per_node=N train.py ...); for a plain process set --sharding.strategy=none"),
    ]
    problems += [msg for bad, msg in combinations if bad]
    if problems:
        sys.exit("error: " + "\n       ".join(problems))


def _check_paths(cfg: dict):
    """What the run reads and writes, checked before any weights are read or any process group is made."""
    path, problems = cfg["model"].path, []
    if Path(path).is_dir():
        if not (Path(path) / "config.json").is_file():
            problems.append(f"model.path: {path} has no config.json; point it at a Hugging Face model directory")
        if not any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            problems.append(f"model.path: {path} has no tokenizer (tokenizer.json or tokenizer_config.json)")
    elif tokenize_data.is_hub_id(path):
        print0(f"model.path: {path} is not a local directory; it is fetched from the Hugging Face Hub")
    else:
        problems.append(f"model.path: {path or '(empty)'} does not exist; give a model directory or a hub id "
                        "(owner/name)")
    for key in ("train_files", "eval_files"):
        problems += tokenize_data.check_paths(getattr(cfg["data"], key), f"data.{key}")
    if cfg["train"].heldout_file and not Path(cfg["train"].heldout_file).is_file():
        problems.append(f"train.heldout_file: {cfg['train'].heldout_file} does not exist; set it to '' to skip")
    out = Path(cfg["train"].output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".writable-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        problems.append(f"train.output_dir: {out} cannot be written ({e.strerror}); choose another directory")
    if problems:
        sys.exit("error: " + "\n       ".join(problems))


# A resumed run must go on training the same model on the same data in the same order; anything else may change
# (and is printed). The data itself is compared through the token cache's fingerprint; DeepSpeed checkpoints are
# its own format (fsdp2 and none read each other's).
RESUME_MUST_MATCH = ("model.path", "model.random_init", "model.load_in_4bit", "sharding.lora_rank",
                     "sharding.lora_target_modules", "sampler.batch_size", "train.seed", "data.train_files")


@torch.no_grad()
def evaluate(model: torch.nn.Module, cache: tokenize_data.TokenCache, micro_batches: list, d: sharding.Dist) -> float:
    """Token-weighted loss over the whole eval set: sum of its token losses / its supervised tokens."""
    model.eval()
    loss_sum = torch.zeros((), device=d.device)
    for mb in micro_batches:
        batch = sampler.collate([cache[i] for i in mb], d.device)
        del batch["loss_seg"]
        loss_sum += model(**batch)[0]
    model.train()
    if d.world_size > 1:
        dist.all_reduce(loss_sum)
    return loss_sum.item() / max(int(cache.loss_tokens.sum()), 1)  # host sync, meant: once per evaluation


def _on_rank0(d: sharding.Dist, work, error: type):
    """`work()` on rank 0 alone, its result on every rank; an `error` it raises ends every rank with its message."""
    result = None
    if d.rank == 0:
        try:
            result = work()
        except error as e:
            result = e
    result = sharding.wait_for_rank0(result)
    if isinstance(result, Exception):
        sys.exit(f"error: {result}")
    return result


def _resume_point(out: Path, cfg: dict, cache: tokenize_data.TokenCache, d: sharding.Dist) -> tuple | None:
    """(checkpoint path, trainer state) per checkpoint.resume, or None; exits if the checkpoint cannot continue
    this run. Prints every setting that changed since it was saved."""
    # one rank verifies the checkpoints (and sets a damaged one aside); all get its choice
    found = _on_rank0(d, lambda: checkpoint.find(out, cfg["checkpoint"]), checkpoint.ResumeError)
    if not found:
        return None
    path, state = found
    flat = lambda c: {f"{s}.{k}": v for s, kv in c.items() for k, v in kv.items()}  # noqa: E731
    old, new = flat(state["config"]), flat(config.to_dict(cfg))
    changed = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
    bad = [f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in changed.items()
           if k in RESUME_MUST_MATCH or (k == "sharding.strategy" and "deepspeed" in (a, b))]
    if state["data"] != cache.path.name:
        bad.append(f"data: the token cache differs ({state['data']} in the checkpoint, {cache.path.name} now): "
                   "other data.train_files (paths or content), data.max_seq_len or tokenizer")
    if bad:
        sys.exit(f"error: cannot resume from {path}:\n  " + "\n  ".join(bad) + "\n  set them back, or set "
                 "checkpoint.resume: never to start afresh")
    print0(f"resuming from {path} at step {state['step']} (saved by {state['world_size']} rank(s))"
           + "".join(f"\n  changed: {k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()), rank=d.rank)
    return path, state


def _token_cache(cfg: tokenize_data.DataConfig, key: str, tokenizer, d: sharding.Dist) -> tokenize_data.TokenCache:
    """The cache of the files listed under `key`. Rank 0 tokenizes (or finds the cache); the others wait, then
    all memory-map it."""
    path = _on_rank0(d, lambda: tokenize_data.build_cache(getattr(cfg, key), tokenizer, cfg, f"data.{key}"),
                     tokenize_data.DataError)
    cache = tokenize_data.TokenCache(path)
    print0(tokenize_data.summary(cache), rank=d.rank)
    return cache


def main(argv: list[str]):
    cfg = config.cli(SECTIONS, argv)
    tc = cfg["train"]
    _check_settings(cfg)
    _check_paths(cfg)
    d = sharding.init_distributed(tc.collective_timeout_s)
    try:
        _train(cfg, d)
    except RuntimeError as e:  # a collective that timed out or lost a rank ends the job, naming where
        if not sharding.collective_failed(e):
            raise
        sys.exit(f"error: rank {d.rank} at step {WHERE['step']} ({WHERE['phase']}): a collective failed "
                 f"({str(e).splitlines()[0][-200:]}); another rank stalled or died (see its output), or "
                 f"train.collective_timeout_s={tc.collective_timeout_s:g} is too short")


WHERE = {"step": 0, "phase": "set-up"}  # what the loop is doing, for the message when a collective fails


def _train(cfg: dict, d: sharding.Dist):
    """The run, once the settings and paths are checked and the process group exists: data, model, loop, export."""
    tc = cfg["train"]
    out = Path(tc.output_dir)
    if d.rank == 0:  # _check_paths made the directory
        (out / "config.yaml").write_text(config.dump(cfg))
        print0(f"config ({d.world_size} rank(s), {d.device}):\n{config.dump(cfg)}")

    try:
        tokenizer = tokenize_data.load_tokenizer(cfg["model"].path)
    except tokenize_data.DataError as e:
        sys.exit(f"error: {e}")
    cache = _token_cache(cfg["data"], "train_files", tokenizer, d)
    eval_cache = _token_cache(cfg["data"], "eval_files", tokenizer, d) if cfg["data"].eval_files else None
    weights = [s.weight for s in tokenize_data.sources(cfg["data"].train_files)]
    try:
        plan = sampler.MultipackPlan(cache.lengths, cfg["sampler"], d.world_size, d.rank, tc.seed, cache.source,
                                     weights)
    except ValueError as e:  # a sample longer than the micro-batch cap, or weights that leave no sample
        sys.exit(f"error: {e}")
    n_sources = len(cache.source_names)
    total_steps = tc.max_steps or tc.epochs * plan.steps_per_epoch
    cap = cfg["sampler"].max_tokens_per_rank
    print0(f"{plan.samples_per_epoch} samples / {cfg['sampler'].batch_size} per step = {plan.steps_per_epoch} steps "
           f"per epoch; {total_steps} steps; micro-batches of <= {cap} tokens per rank", rank=d.rank)

    resume = _resume_point(out, cfg, cache, d)
    # seeded just before the model is built, so nothing the data stage does on rank 0 alone can leave the ranks'
    # random init (weights, LoRA adapters) in different RNG states
    random.seed(tc.seed), np.random.seed(tc.seed), torch.manual_seed(tc.seed)

    # under FSDP2 only rank 0 reads the weights; the others build on the meta device and get their shards
    # (4-bit weights are read by every rank: they are a quarter of the size, and quantized as they are read)
    from_rank0 = cfg["sharding"].strategy == "fsdp2" and not cfg["model"].load_in_4bit
    model = model_setup.load_model(cfg["model"], d.device, on_meta=from_rank0 and d.rank != 0)
    model = sharding.shard_model(model, cfg["sharding"], d, from_rank0)
    optimizer = build_optimizer(model, tc)
    print0(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, "
           f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trained", rank=d.rank)
    step_flops = logging_utils.flop_counter(model)  # before DeepSpeed, which hides the shapes under ZeRO-3
    if cfg["sharding"].strategy == "deepspeed":
        model, optimizer = sharding.wrap_deepspeed(model, optimizer, cfg["sharding"], tc.max_grad_norm)
    state = {"step": 0}
    if resume:
        t0 = time.perf_counter()
        try:
            checkpoint.load(resume[0], model, optimizer, d.rank)
        except checkpoint.ResumeError as e:
            sys.exit(f"error: {e}")
        print0(f"loaded {resume[0]} in {time.perf_counter() - t0:.1f}s", rank=d.rank)
        state = resume[1]
        plan.load_state_dict(state["sampler"])
    log = logging_utils.MetricsLogger(out, cfg["logging"], total_steps, d.rank, d.world_size, d.device,
                                      config.to_dict(cfg), state.get("metrics"))
    if eval_cache:  # all eval samples in one "step": every rank runs the same number of forward passes
        eval_cfg = sampler.SamplerConfig(batch_size=len(eval_cache), max_tokens_per_rank=cap)
        eval_plan = sampler.MultipackPlan(eval_cache.lengths, eval_cfg, d.world_size, d.rank, tc.seed)
        eval_plan = eval_plan.plan(0, 0)[d.rank]
    caught = checkpoint.catch_preemption()  # SIGTERM/SIGUSR1: finish the step, save, exit
    model.train()  # from_pretrained returns eval mode, in which dropout (LoRA's too) is off

    for step in range(state["step"], total_steps):
        t0 = time.perf_counter()
        epoch, k = divmod(step, plan.steps_per_epoch)
        lr = lr_at(step, total_steps, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_plan = plan.plan(epoch, k)
        n_step = plan.loss_tokens(epoch, k, cache.loss_tokens)  # supervised targets, all ranks
        loss_sum, data_wait_s = torch.zeros((), device=d.device), 0.0
        source_sums = torch.zeros(n_sources, device=d.device)  # token losses summed per data source
        micro_batches = step_plan[d.rank]
        WHERE.update(step=step + 1, phase="forward/backward")
        for j, mb in enumerate(micro_batches):
            t_data = time.perf_counter()
            batch = sampler.collate([cache[i] for i in mb], d.device)
            segment = batch.pop("loss_seg")  # (S,) the sample of each target
            data_wait_s += time.perf_counter() - t_data
            micro_loss, token_losses = model(**batch)
            if token_losses is not None and n_sources > 1:
                source_sums.index_add_(0, torch.as_tensor(cache.source[mb], device=d.device)[segment], token_losses)
            # gradients are averaged over ranks (sharding.py), hence * world_size: the step's gradient is that
            # of sum(token losses of the step, all ranks) / n_step
            sharding.backward(model, micro_loss * (d.world_size / max(n_step, 1)), j == len(micro_batches) - 1)
            loss_sum += micro_loss.detach()
        WHERE["phase"] = "reduce"
        sharding.reduce_gradients(model, cfg["sharding"], d)
        # one collective for the step's loss, whether any rank was asked to stop, and the per-source sums
        reduced = torch.cat([torch.stack([loss_sum, torch.tensor(float(bool(caught)), device=d.device)]),
                             source_sums])
        if d.world_size > 1:
            dist.all_reduce(reduced)
        # Host syncs, meant: the loss, the stop flag and the gradient norm, global, so all ranks decide alike.
        loss_sum, stop, *source_sums = reduced.tolist()
        loss = loss_sum / max(n_step, 1)
        WHERE["phase"] = "step"
        grad_norm = sharding.clip_and_step(model, optimizer, tc.max_grad_norm, update=math.isfinite(loss))
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        plan.epoch, plan.step = divmod(step + 1, plan.steps_per_epoch)

        step_time_s = time.perf_counter() - t0

        last_step, every = step + 1 == total_steps, cfg["checkpoint"].save_every_steps
        samples = plan.step_samples(epoch, k)
        m = {"step": step + 1, "epoch": round(step / plan.steps_per_epoch, 4), "loss": loss, "lr": lr,
             "grad_norm": grad_norm, "samples": len(samples), "loss_tokens": n_step, "finite": finite,
             "flops": step_flops(cache.lengths[samples]), "step_time_s": step_time_s, "data_wait_s": data_wait_s}
        if n_sources > 1 and cfg["model"].loss != "liger":  # token-weighted loss of each source in the step
            source_tokens = np.bincount(cache.source[samples], cache.loss_tokens[samples], n_sources)
            present = [(name, s) for s, name in enumerate(cache.source_names) if source_tokens[s]]
            m["loss_by_source"] = {name: source_sums[s] / source_tokens[s] for name, s in present}
            m["loss_tokens_by_source"] = {name: int(source_tokens[s]) for name, s in present}
        if eval_cache and (last_step or (tc.eval_every_steps and (step + 1) % tc.eval_every_steps == 0)):
            WHERE["phase"] = "eval"
            m["eval_loss"] = evaluate(model, eval_cache, eval_plan, d)
        log.log(m | sampler.step_stats(step_plan, cache.lengths, cap))
        if not finite:
            print0(f"step {step + 1}: non-finite loss {loss} or grad norm {grad_norm}; update skipped", rank=d.rank)
        if last_step or stop or (every and (step + 1) % every == 0):
            trainer_state = {"step": step + 1, "sampler": plan.state_dict(), "metrics": log.state_dict(),
                             "data": cache.path.name, "world_size": d.world_size}
            WHERE["phase"] = "save"
            try:
                path = checkpoint.save(out, step + 1, model, optimizer, trainer_state, config.dump(cfg),
                                       cfg["checkpoint"], d.rank)
            except checkpoint.SaveError as e:
                sys.exit(f"error: {e}")
        if stop and not last_step:
            print0(f"stopped at step {step + 1} of {total_steps} ({caught.get('signal', 'another rank was signalled')})"
                   f"; saved {path}; run the same command again to resume", rank=d.rank)
            sys.exit(PREEMPTED_EXIT_CODE)

    WHERE["phase"] = "export"
    hf_dir = checkpoint.export_hf(model, tokenizer, out, d.rank)
    per_epoch = np.bincount(cache.source[plan.epoch_samples(0)], None, n_sources)  # after the weights
    by_source = {s["name"]: {k: s[k] for k in ("samples", "skipped", "longer_than_max_seq_len")} | {"per_epoch": int(n)}
                 for s, n in zip(cache.meta["sources"], per_epoch)}
    extra = {"samples_dropped": cache.meta["dropped"], "samples_skipped": cache.meta["skipped"],
             "samples_by_source": by_source, "export": str(hf_dir)}
    if eval_cache:
        extra["eval_samples_dropped"] = eval_cache.meta["dropped"]
    if tc.heldout_file and d.rank == 0:
        extra["heldout_exact_match"] = logging_utils.exact_match(str(hf_dir), tc.heldout_file)
        print0(f"held-out exact match: {extra['heldout_exact_match']:.1%} ({tc.heldout_file})")
    summary = log.close(extra)
    print0(f"done: {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['wall_s']:.1f}s; "
           f"final loss {summary['final_loss']:.4f}; {sum(cache.meta['skipped'].values())} bad samples skipped, "
           f"{cache.meta['dropped']['longer_than_max_seq_len']} longer than data.max_seq_len dropped; "
           f"exported to {hf_dir}", rank=d.rank)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
