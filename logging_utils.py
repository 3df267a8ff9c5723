"""Logging and monitoring, all on rank 0: console lines, a tqdm progress bar, `metrics.jsonl` (one object per
optimizer step), `summary.json` at the end, and greedy exact-match accuracy of an exported model on held-out chats.

    python logging_utils.py exact-match <hf_dir> <heldout.jsonl>
"""

import json
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class LogConfig:
    log_every_steps: int = 10  # console line every N steps (metrics.jsonl gets every step)


def print0(*args, rank: int = 0, **kwargs):
    if rank == 0:
        print(*args, **kwargs, flush=True)


def peak_mem_gib(device: torch.device) -> float:
    """CUDA: peak allocated memory; CPU: peak resident set size of this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class MetricsLogger:
    """Writes metrics.jsonl and summary.json and drives the progress bar; does nothing off rank 0. `resume` is a
    `state_dict()` saved in a checkpoint: counters continue from it, and metrics.jsonl keeps only the steps up to
    it (later lines were written by the run that died, and those steps are trained again)."""

    def __init__(self, output_dir: Path, cfg: LogConfig, rank: int, total_steps: int, resume: dict | None = None):
        resume = resume or {"totals": dict.fromkeys(["steps", "tokens", "loss_tokens", "micro_steps",
                                                     "nonfinite_steps"], 0),
                             "packing_sum": 0.0, "imbalance": 0.0, "elapsed_s": 0.0, "last": None}
        self.cfg, self.on, self.last = cfg, rank == 0, resume["last"]
        self.totals, self.packing_sum, self.imbalance = dict(resume["totals"]), resume["packing_sum"], resume["imbalance"]
        self.start = time.perf_counter() - resume["elapsed_s"]
        if self.on:
            from tqdm import tqdm

            output_dir.mkdir(parents=True, exist_ok=True)
            path, done = output_dir / "metrics.jsonl", self.totals["steps"]
            kept = [line for line in path.read_text().splitlines(keepends=True)
                    if json.loads(line)["step"] <= done] if done and path.exists() else []
            path.with_suffix(".tmp").write_text("".join(kept))
            os.replace(path.with_suffix(".tmp"), path)
            self.file = open(path, "a")
            # redraw at most every 30 s when the output is a log file rather than a terminal
            self.bar = tqdm(total=total_steps, initial=done, desc="train", unit="step", dynamic_ncols=True,
                            mininterval=0.1 if sys.stderr.isatty() else 30)
            self.summary_path = output_dir / "summary.json"

    def state_dict(self) -> dict:
        return {"totals": self.totals, "packing_sum": self.packing_sum, "imbalance": self.imbalance,
                "elapsed_s": time.perf_counter() - self.start, "last": self.last}

    def log(self, m: dict):
        for k in ("tokens", "loss_tokens", "micro_steps"):
            self.totals[k] += m[k]
        self.totals["steps"] += 1
        self.totals["nonfinite_steps"] += not m["finite"]
        self.packing_sum += m["packing_efficiency"]
        self.imbalance = max(self.imbalance, m["rank_imbalance"])
        self.last = m
        if not self.on:
            return
        m = m | {"elapsed_s": round(time.perf_counter() - self.start, 3)}
        self.file.write(json.dumps(m) + "\n")
        self.file.flush()
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}", refresh=False)
        if m["step"] % self.cfg.log_every_steps == 0:
            self.bar.write(f"step {m['step']} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | grad_norm "
                           f"{m['grad_norm']:.3f} | {m['tokens_per_s']:.0f} tok/s | packing "
                           f"{m['packing_efficiency']:.2f} | imbalance {m['rank_imbalance']:.3f} | "
                           f"{m['peak_mem_gib']:.2f} GiB")

    def close(self, extra: dict) -> dict:
        wall_s = time.perf_counter() - self.start
        steps = max(1, self.totals["steps"])
        summary = self.totals | {
            "wall_s": round(wall_s, 2), "tokens_per_s": self.totals["tokens"] / wall_s,
            "final_loss": self.last["loss"] if self.last else None,
            "peak_mem_gib": self.last["peak_mem_gib"] if self.last else 0,
            "micro_steps_mean": self.totals["micro_steps"] / steps,
            "packing_efficiency_mean": self.packing_sum / steps, "rank_imbalance_max": self.imbalance} | extra
        if self.on:
            self.bar.close()
            self.file.close()
            self.summary_path.write_text(json.dumps(summary, indent=1))
        return summary


@torch.no_grad()
def exact_match(hf_dir: str, heldout_file: str, batch_size: int = 64) -> float:
    """Greedy-generates the last message of each held-out chat from the ones before it, with the exported
    model as `from_pretrained` loads it; returns the fraction generated exactly (whitespace-stripped)."""
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
        longest = max(len(tok(c[-1]["content"], add_special_tokens=False)["input_ids"]) for c in batch)
        out = model.generate(**enc, max_new_tokens=longest + 8, do_sample=False, pad_token_id=pad)
        for c, ids in zip(batch, out[:, enc["input_ids"].shape[1]:]):
            hits += tok.decode(ids, skip_special_tokens=True).strip() == c[-1]["content"].strip()
    return hits / len(chats)


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "exact-match":
        sys.exit(__doc__)
    print(json.dumps({"exact_match": exact_match(sys.argv[2], sys.argv[3])}))
