"""Supervised fine-tuning of a Hugging Face causal LM on packed, padding-free batches.

    torchrun --nproc_per_node=N train.py --config configs/quickstart.yaml [--section.key=value ...]
    python train.py --config configs/quickstart.yaml            # a single process, no torchrun
    python train.py --config configs/quickstart.yaml --check    # validate only, print the config

Stages, in order: tokenize_data -> sampler -> model_setup -> sharding -> this loop -> checkpoint,
with logging_utils throughout. Swap points here: `build_optimizer` and `lr_at`.
"""

import math
import os
import random
import sys
import time
from pathlib import Path

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
from config import TrainConfig
from logging_utils import print0

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): stopped early, run again to continue


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, weight decay on matrices only; fused on CPU and CUDA (one kernel for all parameters: 4x
    the per-tensor loop on CPU, BENCHMARKS.md; tests check it equals the unfused one)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = {p for p in params if len(getattr(p, "ds_shape", p.shape)) >= 2}  # ZeRO-3: 1-D parts
    groups = [{"params": [p for p in params if p in decay], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p not in decay], "weight_decay": 0.0}]
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8, fused=fused)


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    decay = {"cosine": cosine, "linear": 1 - progress, "constant": 1.0}
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay[cfg.lr_schedule])


@torch.no_grad()
def evaluate(model: torch.nn.Module, cache: tokenize_data.TokenCache, micro_batches: list,
             n_eval: float, d: sharding.Dist) -> float:
    """Token-weighted loss over the whole eval set: sum of its token losses / its supervised tokens
    (`n_eval`)."""
    model.eval()
    loss_sum = torch.zeros((), device=d.device)
    for mb in micro_batches:
        result = model(**sampler.collate([cache[i] for i in mb], d.device))
        # the main loss, without the extra terms
        loss_sum += result["loss"] - sum(result["terms"].values())
    model.train()
    if d.world_size > 1:
        dist.all_reduce(loss_sum)
    return loss_sum.item() / (n_eval or 1)  # host sync, meant: once per evaluation


def _token_cache(cfg: tokenize_data.DataConfig, key: str, tokenizer, d: sharding.Dist
                 ) -> tokenize_data.TokenCache:
    """The cache of the files listed under `key`. Rank 0 tokenizes (or finds the cache); the others
    wait, then all memory-map it."""
    files = getattr(cfg, key)
    path = sharding.on_rank0(d, lambda: tokenize_data.build_cache(files, tokenizer, cfg, f"data.{key}"),
                     tokenize_data.DataError)
    cache = tokenize_data.TokenCache(path)
    print0(tokenize_data.summary(cache), rank=d.rank)
    return cache


def main(argv: list[str]):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its loading and saving bars would cut through ours
    only_check = "--check" in argv
    cfg = config.cli([a for a in argv if a != "--check"])
    if problems := config.check(cfg, launch=not only_check):
        sys.exit("error: " + "\n       ".join(problems))
    if only_check:
        print(config.dump(cfg), end="")
        return
    d = sharding.init_distributed(cfg.train.collective_timeout_s)
    try:
        _train(cfg, d)
    # the user's to fix (every rank meets it alike): one line
    except (tokenize_data.DataError, checkpoint.ResumeError, checkpoint.SaveError) as e:
        sys.exit(f"error: {e}")
    # a collective that timed out or lost a rank ends the job, naming where
    except RuntimeError as e:
        if not sharding.collective_failed(e):
            raise
        timeout = cfg.train.collective_timeout_s
        sys.exit(f"error: rank {d.rank} at step {WHERE['step']} ({WHERE['phase']}): a collective "
                 f"failed ({str(e).splitlines()[0][-200:]}); another rank stalled or died (see its "
                 f"output), or train.collective_timeout_s={timeout:g} is too short")


# what the loop is doing, for the message when a collective fails
WHERE = {"step": 0, "phase": "set-up"}


def _train(cfg: config.Config, d: sharding.Dist):
    """The run, once the settings and paths are checked and the process group exists: data, model,
    loop, export."""
    tc = cfg.train
    out = Path(tc.output_dir)
    if d.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config.dump(cfg))
        print0(f"config ({d.world_size} rank(s), {d.device}):\n{config.dump(cfg)}")

    tokenizer = tokenize_data.load_tokenizer(cfg.model.path)
    cache = _token_cache(cfg.data, "train_files", tokenizer, d)
    eval_cache = _token_cache(cfg.data, "eval_files", tokenizer, d) if cfg.data.eval_files else None
    weights = [s.weight for s in tokenize_data.sources(cfg.data.train_files)]
    try:
        plan = sampler.MultipackPlan(cache.lengths, cfg.sampler, d.world_size, tc.seed,
                                     cache.source, weights)
    except ValueError as e:  # a sample longer than the micro-batch cap
        sys.exit(f"error: {e}")
    # one rank verifies the checkpoints (and sets a damaged one aside); all get its choice
    resume = sharding.on_rank0(d, lambda: checkpoint.resume_point(out, cfg, cache.path.name),
                               checkpoint.ResumeError)
    if resume:
        plan.load_state_dict(resume[1].get("sampler", {}))
    total_steps = tc.max_steps or plan.total_steps(tc.epochs)
    cap = cfg.sampler.max_tokens_per_rank
    print0(f"{plan.samples_per_epoch} samples / {cfg.sampler.batch_size} per step = "
           f"{plan.steps_in_epoch(0)} steps in the first epoch; {total_steps} steps; "
           f"micro-batches of <= {cap} tokens per rank", rank=d.rank)
    # seeded just before the model is built, so nothing the data stage does on rank 0 alone can
    # leave the ranks' random init (weights, LoRA adapters) in different RNG states
    random.seed(tc.seed), np.random.seed(tc.seed), torch.manual_seed(tc.seed)

    # under FSDP2 and ZeRO-3 only rank 0 reads the weights, the others get their shards (4-bit
    # weights, a quarter of the size and quantized as read, are read by every rank)
    zero3 = cfg.sharding.strategy == "deepspeed" and cfg.sharding.zero_stage == 3
    from_rank0 = (cfg.sharding.strategy == "fsdp2" or zero3) and not cfg.model.load_in_4bit
    try:
        model = model_setup.load_model(cfg.model, d.device, from_rank0 and d.rank != 0,
                                       sharding.deepspeed_config(cfg.sharding) if zero3 else None)
    except (ImportError, ValueError) as e:  # an extra not installed; a MoE loss not supported
        sys.exit(f"error: {e}")
    if model.note:
        print0(model.note, rank=d.rank)
    model = sharding.shard_model(model, cfg.sharding, d, from_rank0)
    optimizer = build_optimizer(model, tc)
    sizes = {p: getattr(p, "ds_numel", p.numel()) for p in model.parameters()}  # ZeRO-3: whole
    print0(f"model: {sum(sizes.values()):,} parameters, "
           f"{sum(n for p, n in sizes.items() if p.requires_grad):,} trained", rank=d.rank)
    # before DeepSpeed, which hides the shapes under ZeRO-3
    step_flops = logging_utils.flop_counter(model)
    model, optimizer = sharding.attach_optimizer(model, optimizer, cfg.sharding, tc.max_grad_norm)
    state = {"step": 0}
    if resume:
        t0 = time.perf_counter()
        checkpoint.load(resume[0], model, optimizer, d.rank)
        print0(f"loaded {resume[0]} in {time.perf_counter() - t0:.1f}s", rank=d.rank)
        state = resume[1]
    caught = checkpoint.catch_preemption()  # SIGTERM/SIGUSR1: finish the step, save, exit
    if cfg.model.self_check:  # on the 4 shortest samples of the first step that have a target
        first = [int(i) for i in plan.step_samples(0, 0) if cache[i][1][1:].any()]
        shortest = sorted(first, key=lambda i: cache.lengths[i])[:4]
        batch = sampler.collate([cache[i] for i in shortest], d.device)
        dtype = cfg.model.dtype if cfg.sharding.strategy == "none" else cfg.sharding.compute_dtype
        try:
            print0(model_setup.self_check(model, batch, dtype), rank=d.rank)
        except ValueError as e:
            sys.exit(f"error: {e}")
    log = logging_utils.MetricsLogger(out, cfg.logging, total_steps, d.rank, d.world_size, d.device,
                                      config.to_dict(cfg), state.get("metrics"))
    noise = logging_utils.NoiseScale(sharding.reduces_in_backward(cfg.sharding), d.world_size) \
        if cfg.logging.noise_scale else None
    # all eval samples in one "step": every rank runs the same number of forward passes
    if eval_cache:
        eval_cfg = sampler.SamplerConfig(batch_size=len(eval_cache), max_tokens_per_rank=cap)
        eval_plan = sampler.MultipackPlan(eval_cache.lengths, eval_cfg, d.world_size, tc.seed)
        eval_plan = eval_plan.plan(0, 0)[d.rank]
        n_eval = sampler.step_targets([eval_cache[i] for i in range(len(eval_cache))])[2]
    model.train()  # from_pretrained returns eval mode, in which dropout (LoRA's too) is off

    for step in range(state["step"], total_steps):
        t0 = time.perf_counter()
        epoch, k = plan.position(step)
        lr = lr_at(step, total_steps, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_plan, samples = plan.plan(epoch, k), plan.step_samples(epoch, k)
        # what the whole step trains (all ranks), as collate defines it: the normalizer n_step
        counts, sample_weight, n_step = sampler.step_targets([cache[i] for i in samples])
        per_sample = logging_utils.StepLosses(samples, counts, sample_weight, d.device)
        sums = {"loss_sum": torch.zeros((), device=d.device), "n_trained": 0.0,
                "noise_parts": torch.zeros(3)}
        terms = {}  # the model's extra loss terms (model_setup.PackedCausalLM), summed by name
        data_wait_s, micro_batches = 0.0, step_plan[d.rank]
        WHERE.update(step=step + 1, phase="forward/backward")
        for j, mb in enumerate(micro_batches):
            t_data = time.perf_counter()
            batch = sampler.collate([cache[i] for i in mb], d.device)
            segment = batch.pop("loss_seg")  # (S,) the sample of each target in the micro-batch
            data_wait_s += time.perf_counter() - t_data
            result = model(**batch)
            # gradients are averaged over ranks (sharding.py), hence * world_size: the step's
            # gradient is that of sum(token losses of the step, all ranks) / n_step
            last = j == len(micro_batches) - 1
            sharding.backward(model, result["loss"] * (d.world_size / (n_step or 1)), last)
            # the gradient of the first micro-batch: the small batch of the noise scale
            if noise and j == 0:
                sq = sharding.grad_sq_norm(model)
                sums["noise_parts"] = noise.parts(sq, len(batch["targets"]), n_step)
            per_sample.add(mb, segment, result["token_losses"])
            sums["n_trained"] += len(batch["targets"])
            sums["loss_sum"] += result["loss"].detach() - sum(result["terms"].values())
            for name, term in result["terms"].items():
                terms[name] = terms.get(name, 0.0) + term
        WHERE["phase"] = "reduce"
        sharding.reduce_gradients(model, cfg.sharding, d)
        # one collective for everything the step sums over ranks; global, so all ranks decide alike
        sums |= terms | {"stop": float(bool(caught)), "sample_sums": per_sample.sums}
        reduced = sharding.all_reduce_sum(sums, d)
        # the ranks' micro-batches must hold exactly the step's samples
        if reduced["n_trained"] != counts.sum():
            raise RuntimeError(f"step {step + 1}: the micro-batches trained "
                               f"{reduced['n_trained']:.0f} targets, the plan's step has "
                               f"{counts.sum()}: the step plan lost or repeated samples")
        loss = reduced["loss_sum"] / (n_step or 1)
        WHERE["phase"] = "step"
        grad_norm = sharding.clip_and_step(model, optimizer, tc.max_grad_norm, math.isfinite(loss))
        finite = math.isfinite(loss) and math.isfinite(grad_norm)

        m = {"step": step + 1, "epoch": round(epoch + k / plan.steps_in_epoch(epoch), 4),
             "loss": loss, "lr": lr, "grad_norm": grad_norm, "samples": len(samples),
             "loss_tokens": int(counts.sum()), "finite": finite,
             "flops": step_flops(cache.lengths[samples]), "step_time_s": time.perf_counter() - t0,
             "data_wait_s": data_wait_s}
        m |= {name: reduced[name] / (n_step or 1) for name in terms}
        # per-sample (and per-source) token-weighted losses
        means = per_sample.means(reduced["sample_sums"])
        m |= plan.observe(epoch, per_sample.uniq, means)
        if len(cache.source_names) > 1:
            m |= per_sample.by_source(reduced["sample_sums"], cache.source, cache.source_names)
        if cfg.logging.sample_losses:
            log.samples(step + 1, per_sample.rows(means, cache.source, cache.source_names))
        if noise:
            m["noise_scale"] = noise.update(reduced["noise_parts"], grad_norm, n_step)
        last_step, every = step + 1 == total_steps, cfg.checkpoint.save_every_steps
        evals = tc.eval_every_steps and (step + 1) % tc.eval_every_steps == 0
        if eval_cache and (last_step or evals):
            WHERE["phase"] = "eval"
            m["eval_loss"] = evaluate(model, eval_cache, eval_plan, n_eval, d)
        log.log(m | sampler.step_stats(step_plan, cache.lengths, cap))
        if not finite:
            print0(f"step {step + 1}: non-finite loss {loss} or grad norm {grad_norm}; update "
                   "skipped", rank=d.rank)
        if last_step or reduced["stop"] or (every and (step + 1) % every == 0):
            trainer_state = {"step": step + 1, "metrics": log.state_dict(), "data": cache.path.name,
                             "world_size": d.world_size, "sampler": plan.state_dict()}
            WHERE["phase"] = "save"
            path = checkpoint.save(out, step + 1, model, optimizer, trainer_state,
                                   config.dump(cfg), cfg.checkpoint, d.rank)
        if reduced["stop"] and not last_step:
            why = caught.get("signal", "another rank was signalled")
            print0(f"stopped at step {step + 1} of {total_steps} ({why}); saved {path}; run the "
                   "same command again to resume", rank=d.rank)
            sys.exit(PREEMPTED_EXIT_CODE)

    WHERE["phase"] = "export"
    by_source = cache.by_source(plan.epoch_samples(0))
    from_hub = tokenize_data.is_hub_id(cfg.model.path) and not cfg.model.random_init
    card = logging_utils.model_card(config.to_dict(cfg), by_source, log.state_dict(), from_hub)
    hf_dir = checkpoint.export_hf(model, tokenizer, out, d.rank, card)
    extra = {"samples_dropped": cache.meta["dropped"], "samples_skipped": cache.meta["skipped"],
             "samples_by_source": by_source, "export": str(hf_dir)}
    # graphs dynamo built: with dynamic shapes a few, however the row lengths vary
    if cfg.model.compile:
        extra["compiled_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    if eval_cache:
        extra["eval_samples_dropped"] = eval_cache.meta["dropped"]
    if tc.heldout_file and d.rank == 0:
        extra["heldout_exact_match"] = logging_utils.exact_match(str(hf_dir), tc.heldout_file)
        print0(f"held-out exact match: {extra['heldout_exact_match']:.1%} ({tc.heldout_file})")
    log.close(extra)  # and prints the run's last line
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # everything is written and closed; skips 1-2 s of tearing down torch's modules
