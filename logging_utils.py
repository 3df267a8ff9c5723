"""Logging on rank 0: `metrics.jsonl` (an object per optimizer step), console lines, tqdm, optional
TensorBoard and W&B, `summary.json` at the end; the plot of a run, or of several; exact match on
held-out chats.

    python logging_utils.py plot <output_dir> [<output_dir> ...] [--out FILE.png]   # draw, or overlay runs
    python logging_utils.py exact-match <hf_dir> <heldout.jsonl>
"""

import json
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import config


@config.section("logging")
@dataclass
class LogConfig:
    log_every_steps: Annotated[int, config.ge(1)] = 10  # console every N steps; metrics.jsonl: all
    tensorboard: bool = False  # TensorBoard events in <output_dir>/tensorboard (tensorboard extra)
    wandb_project: str = ""  # W&B project to log to too (wandb extra); offline: WANDB_MODE=offline
    peak_tflops: float = 0.0  # a device's dense bf16 peak TFLOP/s for MFU; 0 = look up PEAK_TFLOPS
    sample_losses: bool = False  # per step, each sample's mean loss, tokens in sample_losses.jsonl
    noise_scale: bool = False  # log `noise_scale`, B_simple in tokens (McCandlish et al. 2018)


# One device's dense bf16 peak TFLOP/s (vendors' datasheets); the first key in the GPU's name wins
PEAK_TFLOPS = {"B200": 2250.0, "H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
               "L40S": 362.0, "L4": 121.0, "MI300X": 1307.0}
PANELS = {"loss": "loss (nats/token)", "lr": "learning rate", "tokens_per_s": "tokens/s",
          "grad_norm": "gradient norm"}  # metrics.png's panels: key -> title


def print0(*args, rank: int = 0, **kwargs):
    if rank == 0:
        print(*args, **kwargs, flush=True)


def flop_counter(model: nn.Module):
    """Returns step_flops(lengths): forward + backward model FLOPs over samples of these token
    lengths (PaLM's accounting, arXiv:2204.02311 appendix B; no recomputation) for PackedCausalLM
    before DeepSpeed wraps it. A linear weight (output layer too, tied or not; the embedding is a
    lookup) costs 6 FLOPs a token, 4 if frozen (LoRA's base); causal attention, 6 * layers * heads *
    head_dim * L^2 a sample of L tokens (QK^T, AV on half the scores; forward, 2x backward)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]  # Linear4bit and LoRA's too
    trained = sum(m.in_features * m.out_features for m in linears if m.weight.requires_grad)
    frozen = sum(m.in_features * m.out_features for m in linears if not m.weight.requires_grad)
    c = model.lm.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    attn = 6 * c.num_hidden_layers * c.num_attention_heads * head_dim

    def step_flops(lengths) -> float:
        lengths = np.asarray(lengths, dtype=np.float64)
        return (6 * trained + 4 * frozen) * lengths.sum() + attn * (lengths**2).sum()

    return step_flops


def _peak_tflops(cfg: LogConfig, device: torch.device) -> float | None:
    if cfg.peak_tflops or device.type != "cuda":
        return cfg.peak_tflops or None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def _memory(device: torch.device) -> dict:
    """Peak memory: CUDA, allocated and reserved on this rank; CPU, ru_maxrss (KiB on Linux)."""
    if device.type == "cuda":
        return {"peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    return {"peak_mem_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class NoiseScale:
    """The gradient noise scale B_simple = tr(Sigma) / |G|^2 in tokens (McCandlish et al. 2018, "An
    Empirical Model of Large-Batch Training", app. A), no extra backward: E|g_B|^2 = |G|^2 +
    tr(Sigma) / B for the step (B = N_step tokens) and the first micro-step (read before the next
    backward; `none`: each rank's, averaged; FSDP2: combined), EMA-smoothed as advised."""

    def __init__(self, reduced_in_backward: bool, world_size: int, beta: float = 0.95):
        self.reduced, self.world_size, self.beta = reduced_in_backward, world_size, beta
        self.g2 = self.s = self.n = 0.0

    def parts(self, sq: torch.Tensor, n: int, n_step: float) -> torch.Tensor:
        """This rank's small-batch statistics, for the step's all-reduce to sum. `sq`: the sum of
        squares of the gradient after micro-step 1 (n targets' loss sum x world / n_step)."""
        if self.reduced:  # one small batch, all first micro-batches: sq sums to its squared norm
            return torch.stack([sq * n_step**2, torch.tensor(float(n), device=sq.device), torch.ones_like(sq)])
        if not n:  # an empty micro-batch on this rank: no small batch here
            return torch.zeros(3, device=sq.device)
        mean_sq = sq * (n_step / (self.world_size * n)) ** 2  # |mean gradient of the n targets|^2
        return torch.stack([mean_sq, torch.tensor(1.0 / n, device=sq.device), torch.ones_like(sq)])

    def update(self, parts, grad_norm: float, n_step: float) -> float | None:
        """The estimate after this step's parts (summed over ranks); None until it has one."""
        a, b, ranks = parts
        if self.reduced:  # E|g_small|^2 and 1/B_small
            small_sq, inv_small = (a / b**2, 1 / b) if b else (0.0, 0.0)
        else:
            small_sq, inv_small = (a / ranks, b / ranks) if ranks else (0.0, 0.0)
        if inv_small <= 1 / n_step or not math.isfinite(grad_norm):  # one micro-batch = the step
            return None if not self.n else self.s / self.g2
        big_sq, b_small = grad_norm**2, 1 / inv_small
        g2 = (n_step * big_sq - b_small * small_sq) / (n_step - b_small)
        s = (small_sq - big_sq) / (inv_small - 1 / n_step)
        self.g2, self.s = self.beta * self.g2 + (1 - self.beta) * g2, self.beta * self.s + (1 - self.beta) * s
        self.n += 1
        return self.s / self.g2  # the bias corrections of the two averages cancel in the ratio


def _open_at(path: Path, done: int):
    """`path` (JSON lines with a "step") opened to append after step `done` (later steps rerun)."""
    kept = [line for line in path.read_text().splitlines(keepends=True)
            if json.loads(line)["step"] <= done] if done and path.exists() else []
    path.with_suffix(".tmp").write_text("".join(kept))
    path.with_suffix(".tmp").replace(path)
    return open(path, "a")


class StepLosses:
    """One step's token losses summed per sample, for the sampler and the per-sample/source logs."""

    def __init__(self, samples: np.ndarray, counts: np.ndarray, weights: np.ndarray, device: torch.device):
        """The step's samples (twice if a source's weight > 1), targets, weights (step_targets)."""
        self.samples, self.counts = samples, counts
        self.uniq, slot = np.unique(samples, return_inverse=True)
        self.tokens = np.bincount(slot, counts, len(self.uniq))  # per unique sample
        self.weights = np.bincount(slot, weights, len(self.uniq))
        self.sums = torch.zeros(len(self.uniq), device=device)  # summed token losses on this rank

    def add(self, micro_batch: list[int], segment: torch.Tensor, token_losses: torch.Tensor):
        """A micro-batch's (S,) token losses; `segment`: each target's index in `micro_batch`."""
        if micro_batch:
            slot = torch.as_tensor(np.searchsorted(self.uniq, micro_batch), device=self.sums.device)
            self.sums.index_add_(0, slot[segment], token_losses)

    def means(self, sums: np.ndarray) -> np.ndarray:
        """Each unique sample's mean token loss, from its `sums` over all ranks."""
        return sums / np.maximum(self.weights, 1e-30)

    def by_source(self, sums: np.ndarray, source: np.ndarray, names: list[str]) -> dict:
        """loss_by_source (token-weighted), loss_tokens_by_source; `source`: each cache sample's."""
        weight = np.bincount(source[self.uniq], self.weights, len(names))
        loss = np.bincount(source[self.uniq], sums, len(names))
        tokens = np.bincount(source[self.samples], self.counts, len(names))
        present = [(name, s) for s, name in enumerate(names) if weight[s]]
        return {"loss_by_source": {name: loss[s] / weight[s] for name, s in present},
                "loss_tokens_by_source": {name: int(tokens[s]) for name, s in present}}

    def rows(self, means: np.ndarray, source: np.ndarray, names: list[str]) -> list[dict]:
        """sample_losses.jsonl's lines of the step: sample index, source, mean loss, tokens."""
        return [{"sample": int(i), "source": names[source[i]], "loss": float(x), "tokens": int(n)}
                for i, x, n in zip(self.uniq, means, self.tokens)]


class MetricsLogger:
    """Counters on every rank, output on rank 0; `resume`: a checkpoint's `state_dict()`."""

    def __init__(self, output_dir: Path, cfg: LogConfig, total_steps: int, rank: int, world_size: int,
                 device: torch.device, run_config: dict | None = None, resume: dict | None = None):
        counters = ["steps", "samples", "tokens", "loss_tokens", "micro_steps", "nonfinite_steps",
                    "flops", "train_s", "packing_sum", "imbalance_max"]
        resume = resume or {"totals": dict.fromkeys(counters, 0), "elapsed_s": 0.0, "last": None, "wandb_id": None}
        self.totals, self.last = dict(resume["totals"]), resume["last"]
        self.cfg, self.on, self.world_size, self.device = cfg, rank == 0, world_size, device
        self.peak_tflops, self.output_dir = _peak_tflops(cfg, device), Path(output_dir)
        self.start = time.perf_counter() - resume["elapsed_s"]
        self.tb, self.wandb, self.wandb_id = None, None, resume["wandb_id"]
        if not self.on:
            return
        from tqdm import tqdm

        self.output_dir.mkdir(parents=True, exist_ok=True)
        done = self.totals["steps"]
        self.file = _open_at(self.output_dir / "metrics.jsonl", done)
        self.sample_file = _open_at(self.output_dir / "sample_losses.jsonl", done) if cfg.sample_losses else None
        # redraw at most every 30 s when the output is a log file rather than a terminal
        self.bar = tqdm(total=total_steps, initial=done, desc="train", unit="step",
                        dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("logging.tensorboard needs the tensorboard extra: pip install -e '.[tensorboard]'")
            self.tb = SummaryWriter(self.output_dir / "tensorboard", purge_step=done + 1 if done else None)
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError:
                raise ImportError("logging.wandb_project needs the wandb extra: pip install -e '.[wandb]'")
            self.wandb = wandb.init(project=cfg.wandb_project, config=run_config, id=self.wandb_id,
                                    dir=self.output_dir, name=self.output_dir.name, resume="allow")
            self.wandb_id = self.wandb.id

    def _speed(self, flops: float, seconds: float) -> dict:
        tflops = flops / seconds / self.world_size / 1e12  # achieved, per device
        return {"tflops": tflops, "mfu": tflops / self.peak_tflops if self.peak_tflops else None}

    def _peak_memory(self) -> dict:
        """_memory's figures, max over ranks, and each rank's peak_mem_gib (a tiny collective)."""
        mem = _memory(self.device)
        if self.world_size > 1 and dist.is_initialized():
            mine = torch.tensor(list(mem.values()), dtype=torch.float64, device=self.device)
            ranks = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(ranks, mine)
            table = torch.stack(ranks)  # (ranks, figures)
            mem = dict(zip(mem, table.amax(0).tolist()), peak_mem_gib_ranks=table[:, 0].tolist())
        return mem

    def state_dict(self) -> dict:
        return {"totals": self.totals, "elapsed_s": time.perf_counter() - self.start,
                "last": self.last, "wandb_id": self.wandb_id}

    def samples(self, step: int, rows: list[dict]):
        if self.on:
            self.sample_file.write("".join(json.dumps({"step": step} | r) + "\n" for r in rows))
            self.sample_file.flush()

    def log(self, m: dict):
        """`m`: step, epoch, loss, lr, grad_norm, samples, tokens, loss_tokens, micro_steps, finite,
        packing_efficiency, rank_imbalance, flops, step_time_s, data_wait_s; eval_loss, noise_scale,
        loss_by_source, loss_tokens_by_source and extra loss terms if any. Other keys reach
        metrics.jsonl as they are; numbers (and loss_by_source) TensorBoard and W&B too."""
        t, tot = m["step_time_s"], self.totals
        sums = {k: m[k] for k in ("samples", "tokens", "loss_tokens", "micro_steps", "flops")} | {
            "steps": 1, "train_s": t, "nonfinite_steps": not m["finite"], "packing_sum": m["packing_efficiency"]}
        for k, v in sums.items():
            tot[k] += v
        tot["imbalance_max"] = max(tot["imbalance_max"], m["rank_imbalance"])
        rates = {"compute_s": t - m["data_wait_s"], "tokens_per_s": m["tokens"] / t,
                 "samples_per_s": m["samples"] / t, "loss_tokens_per_s": m["loss_tokens"] / t}
        m = {k: v for k, v in m.items() if k != "flops"} | rates | self._speed(m["flops"], t) | {
            "nonfinite_steps": tot["nonfinite_steps"]} | self._peak_memory()
        m["elapsed_s"] = round(time.perf_counter() - self.start, 3)
        self.last = m
        if "eval_loss" in m:
            tot["final_eval_loss"] = m["eval_loss"]
            tot["best_eval_loss"] = min(m["eval_loss"], tot.get("best_eval_loss", float("inf")))
        if not self.on:
            return
        self.file.write(json.dumps(m) + "\n")
        self.file.flush()
        scalars = {k: v for k, v in m.items() if isinstance(v, (int, float)) and k != "step"}
        scalars |= {f"loss_by_source/{k}": v for k, v in m.get("loss_by_source", {}).items()}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, m["step"])
        if self.wandb:
            self.wandb.log(scalars, step=m["step"])
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}", refresh=False)
        if m["step"] % self.cfg.log_every_steps == 0 or "eval_loss" in m:
            speed = f"MFU {m['mfu']:.1%}" if m["mfu"] is not None else f"{m['tflops']:.3f} TFLOP/s"
            evals = f" | eval loss {m['eval_loss']:.4f}" if "eval_loss" in m else ""
            self.bar.write(f"step {m['step']} | loss {m['loss']:.4f}{evals} | lr {m['lr']:.2e} | "
                           f"grad_norm {m['grad_norm']:.3f} | {m['tokens_per_s']:.0f} tok/s | "
                           f"{speed} | data wait {m['data_wait_s'] / t:.0%} | packing "
                           f"{m['packing_efficiency']:.2f} | {m['peak_mem_gib']:.2f} GiB")

    def close(self, extra: dict) -> dict:
        """Writes summary.json, prints the run's last line and returns the summary.
        `extra`: train.py's (samples_skipped, samples_dropped, export, ...)."""
        tot, last = self.totals, self.last or {}
        steps, train_s = max(1, tot["steps"]), max(tot["train_s"], 1e-9)
        counts = ("steps", "samples", "tokens", "loss_tokens", "micro_steps", "nonfinite_steps")
        memory = ("peak_mem_gib", "peak_mem_gib_ranks", "peak_reserved_gib")
        summary = {k: tot[k] for k in counts} | {
            "wall_s": round(time.perf_counter() - self.start, 2), "train_s": round(train_s, 2),
            "tokens_per_s": tot["tokens"] / train_s} | self._speed(tot["flops"], train_s) | {
            "final_loss": last.get("loss"), "final_eval_loss": tot.get("final_eval_loss"),
            "best_eval_loss": tot.get("best_eval_loss")} | {k: last.get(k) for k in memory} | {
            "micro_steps_mean": tot["micro_steps"] / steps,
            "packing_efficiency_mean": tot["packing_sum"] / steps,
            "rank_imbalance_max": tot["imbalance_max"]} | extra
        if self.on:
            for sink in (self.bar, self.file, self.sample_file, self.tb):
                if sink is not None:
                    sink.close()
            if self.wandb:
                self.wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
                self.wandb.finish()
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            skipped, dropped = sum(summary["samples_skipped"].values()), summary["samples_dropped"]
            print(f"done: {summary['steps']} steps, {summary['tokens']:,} tokens in "
                  f"{summary['wall_s']:.1f}s; final loss {summary['final_loss']:.4f}; {skipped} bad "
                  f"samples skipped, {dropped['longer_than_max_seq_len']} longer than "
                  f"data.max_seq_len dropped; exported to {summary['export']}", flush=True)
        return summary


def model_card(run: dict, by_source: dict, state: dict, from_hub: bool) -> str:
    """The export's README.md, as the HF Trainer writes one. `run`: the resolved config as a dict;
    `state`: MetricsLogger.state_dict(); `from_hub`: the weights came from a hub id (base_model)."""
    m, t, sh, last, tot = run["model"], run["train"], run["sharding"], state["last"] or {}, state["totals"]
    head = ["---"] + ([f"base_model: {m['path']}"] if from_hub else []) + [
        f"library_name: {'peft' if sh['lora_rank'] else 'transformers'}", "tags: [sft-trainer, sft]", "---", ""]
    base = f"`{m['path']}`" + (" (its architecture, randomly initialized)" if m["random_init"] else "")
    rows = [f"| {name} | {s['samples']:,} | {s['per_epoch']:,} | {sum(s['skipped'].values())} | "
            f"{s['longer_than_max_seq_len']} |" for name, s in by_source.items()]
    tuning = f"LoRA r={sh['lora_rank']}, alpha={sh['lora_alpha']:g}" if sh["lora_rank"] else "full fine-tuning"
    loss, final, best = ("n/a" if v is None else f"{v:.4f}" for v in
                         (last.get("loss"), tot.get("final_eval_loss"), tot.get("best_eval_loss")))
    return "\n".join(head + [
        f"# {Path(t['output_dir']).name}", "", f"Supervised fine-tuning of {base} with sft-trainer.", "",
        "## Data", "", "| source | samples | per epoch | skipped (bad) | longer than max_seq_len |",
        "|---|---|---|---|---|", *rows, "", "## Settings", "",
        f"- {tuning}{' on 4-bit NF4 weights (QLoRA)' if m['load_in_4bit'] else ''}; sharding: {sh['strategy']}; "
        f"weights in {m['dtype']}",
        f"- {tot['steps']} steps of {run['sampler']['batch_size']} samples; lr {t['lr']:g} ({t['lr_schedule']}, "
        f"{t['warmup_steps']} warmup steps); AdamW, weight decay {t['weight_decay']:g}; seed {t['seed']}",
        f"- samples of at most {run['data']['max_seq_len']} tokens, packed; loss on the assistant turns only", "",
        "## Results", "", f"- final training loss: {loss}", f"- final eval loss: {final}; best: {best}",
        f"- {tot['tokens']:,} tokens trained on", ""])


def plot(run_dirs: list, out: Path):
    """Loss (eval: dots), lr, tokens/s, grad norm by step per run, in `out`; returns the Figure."""
    from matplotlib.figure import Figure  # no pyplot: nothing global to open or close

    fig = Figure(figsize=(12, 7), layout="tight")
    axes = fig.subplots(2, 2, sharex=True)
    for i, run in enumerate(run_dirs):
        rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
        steps, colour = [r["step"] for r in rows], f"C{i}"
        for ax, key in zip(axes.flat, PANELS):
            ax.plot(steps, [r[key] for r in rows], color=colour, lw=1, label=str(run))
        evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        if evals:
            axes[0, 0].plot(*zip(*evals), "o--", color=colour, ms=4, label=f"{run} (eval)")
    for ax, (key, title) in zip(axes.flat, PANELS.items()):
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if key in ("loss", "grad_norm"):  # they span orders of magnitude
            ax.set_yscale("log")
    axes[0, 0].legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.savefig(out, dpi=100)
    return fig


@torch.no_grad()
def exact_match(hf_dir: str, heldout_file: str, batch_size: int = 64) -> float:
    """Greedy-generates each held-out chat's last message from the ones before, with the export as
    `from_pretrained` loads it; returns the fraction generated exactly (whitespace-stripped)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    chats = [json.loads(line)["messages"] for line in open(heldout_file) if line.strip()]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    hits = 0
    for a in range(0, len(chats), batch_size):
        batch = chats[a:a + batch_size]
        prompts = [tok.apply_chat_template(c[:-1], tokenize=False, add_generation_prompt=True) for c in batch]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        longest = max(len(tok(c[-1]["content"], add_special_tokens=False).input_ids) for c in batch)
        out = model.generate(**enc, max_new_tokens=longest + 8, do_sample=False, pad_token_id=pad)
        for c, ids in zip(batch, out[:, enc["input_ids"].shape[1]:]):
            hits += tok.decode(ids, skip_special_tokens=True).strip() == c[-1]["content"].strip()
    return hits / len(chats)


if __name__ == "__main__":
    cmd, args = sys.argv[1:2], sys.argv[2:]
    if cmd == ["plot"] and args:
        out = Path(args.pop(args.index("--out") + 1)) if "--out" in args else None
        runs = [a for a in args if a != "--out"]
        out = out or (Path(runs[0]) / "metrics.png" if len(runs) == 1 else Path("compare.png"))
        plot(runs, out)
        print(out)
    elif cmd == ["exact-match"] and len(args) == 2:
        print(json.dumps({"exact_match": exact_match(*args)}))
    else:
        sys.exit(__doc__)
