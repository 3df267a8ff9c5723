"""Throughput of this trainer against the Hugging Face stack on the same data and model, in one invocation.

    python bench/bench_sft.py                                  # CPU, small Llama-style model
    bash bench/gpu.sh                                          # one GPU: the table of BENCHMARKS.md's GPU section

Systems: ours (packed, padding-free, per-sample attention, chunked loss over supervised tokens), ours_compile (the
same with model.compile), ours_lora (LoRA on every linear layer of `--lora-shape`), TRL SFTTrainer with
packing=True (BFD, padding-free), TRL SFTTrainer with padding, the HF Trainer with padding. Each runs in its own
process, one epoch over the same synthetic chats (long-tailed lengths) with the same model (random init), seed,
optimizer (AdamW), dtype and samples per optimizer step. Reported: real (non-pad) tokens per second of the training
loop (model loading and tokenization excluded), MFU (the same model FLOPs for every system, logging_utils'
accounting over the real tokens, against the GPU's peak), peak memory, and ours / theirs on the same model.
"""

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHAPES = {  # LlamaConfig fields; bench/models/*.json hold real architectures (--shape llama-3.2-1b)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024),  # bench/gpu.sh --device cpu (CI)
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=32000),
}
SYSTEMS = ["ours", "trl_packing_bfd", "trl_padding", "hf_trainer_padding"]  # also ours_compile, ours_lora
GPU_TABLE = {  # --gpu-table (bench/gpu.sh): BENCHMARKS.md's GPU table for one H100/H200 in about 8 minutes; on CPU
    # the same table with tiny shapes, in seconds (tests/test_bench.py). Options given after it still apply.
    "cuda": "--shape llama-3.2-1b --lora-shape llama-3.1-8b --samples 1500 --median 600 --p95 2400 --cap 8192 "
            "--batch 64",
    "cpu": "--shape tiny --samples 48 --median 40 --p95 120 --cap 512 --batch 16",
}
GPU_SYSTEMS = "ours,ours_compile,hf_trainer_padding,trl_packing_bfd,ours_lora"
LETTERS = list("abcdefghijklmnopqrstuvwxyz")  # " x" is one token of the shipped tokenizer


def make_data(path: Path, n: int, median: int, p95: int, cap: int, seed: int = 0):
    """Chats whose token lengths are log-normal (median, p95), as in real SFT mixtures, capped at `cap`."""
    rng = np.random.default_rng(seed)
    sigma = np.log(p95 / median) / 1.645
    lengths = np.clip(rng.lognormal(np.log(median), sigma, n), 16, cap).astype(int) - 12  # 12: template tokens
    with open(path, "w") as f:
        for w in lengths:
            q = int(max(2, w * rng.uniform(0.2, 0.6)))
            text = [" ".join(rng.choice(LETTERS, k)) for k in (q, w - q)]
            f.write(json.dumps({"messages": [{"role": "user", "content": text[0]},
                                             {"role": "assistant", "content": text[1]}]}) + "\n")


def make_model(path: Path, shape: str):
    """A model directory: the shipped tokenizer (it uses the first ids of the vocabulary) and the shape's config."""
    from transformers import AutoConfig

    shutil.copytree(ROOT / "data/quickstart/model", path, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("config.json"))
    fields = SHAPES.get(shape) or json.loads((ROOT / f"bench/models/{shape}.json").read_text())
    fields = {"model_type": "llama", "max_position_embeddings": 4096} | fields
    AutoConfig.for_model(**fields | dict(pad_token_id=0, bos_token_id=None, eos_token_id=2)).save_pretrained(path)


def peak_gib(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_ours(a, system: str) -> dict:
    out = a.work / system
    lora = system == "ours_lora"
    args = ["--config", str(ROOT / "configs/quickstart.yaml"),
            f"--data.train_files=[{a.work / 'data.jsonl'}]", f"--data.cache_dir={a.work / 'cache'}",
            f"--data.max_seq_len={a.cap}", f"--model.path={a.work / ('model_lora' if lora else 'model')}",
            f"--model.dtype={'bfloat16' if a.device == 'cuda' else 'float32'}", "--sharding.strategy=none",
            f"--sampler.batch_size={a.batch}", f"--sampler.max_tokens_per_rank={a.cap}", f"--train.output_dir={out}",
            "--train.heldout_file=", "--data.eval_files=[]", f"--train.lr={2e-4 if lora else 1e-4}",
            "--train.warmup_steps=0",
            f"--model.gradient_checkpointing={str(lora and a.device == 'cuda').lower()}",
            f"--model.compile={str(system == 'ours_compile').lower()}", "--checkpoint.save_every_steps=0"]
    if lora:
        args += [f"--sharding.lora_rank={a.lora_rank}", f"--sharding.lora_alpha={2.0 * a.lora_rank}"]
    import train  # in this process, which runs this system alone

    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        train.main(args)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    steady = rows[2:]  # after the first steps, which compile (model.compile) or warm up allocators
    return {"tokens": summary["tokens"], "train_s": rows[-1]["elapsed_s"], "peak_mem_gib": summary["peak_mem_gib"],
            "steps": len(rows), "flops": summary["tflops"] * 1e12 * summary["train_s"],
            "steady_tokens_per_s": sum(r["tokens"] for r in steady) / sum(r["step_time_s"] for r in steady)}


def run_hf(a, system: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments)

    import tokenize_data

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.work / "model")
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    try:  # TRL's packing is padding-free only with a varlen flash kernel; without flash-attn, SDPA and a block mask
        import flash_attn  # noqa: F401
        attn = "flash_attention_2" if a.device == "cuda" and system == "trl_packing_bfd" else "sdpa"
    except ImportError:
        attn = "sdpa"
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(a.work / "model"), dtype=dtype,
                                             attn_implementation=attn)  # random init, as ours
    records = [json.loads(line) for line in (a.work / "data.jsonl").read_text().splitlines()]
    # padded systems: samples per micro-batch, accumulated to `batch` per step (on an H200, 8 padded
    # samples of the GPU table ran out of its 140 GiB: (8, 4k, 128k) fp32 logits alone are 15 GiB)
    micro = 8 if a.device == "cpu" else 2
    common = dict(output_dir=str(a.work / system), num_train_epochs=1, learning_rate=1e-4, lr_scheduler_type="cosine",
                  adam_beta2=0.95, max_grad_norm=1.0, save_strategy="no", report_to=[], logging_steps=10**6,
                  seed=0, bf16=a.device == "cuda", use_cpu=a.device == "cpu", dataloader_num_workers=0,
                  disable_tqdm=True)
    if system == "hf_trainer_padding":
        rows = [tokenize_data.tokenize_sample(r, tok) for r in records]
        ds = Dataset.from_list(rows)
        args = TrainingArguments(per_device_train_batch_size=micro, gradient_accumulation_steps=a.batch // micro,
                                 **common)
        trainer = Trainer(model=model, args=args, train_dataset=ds,
                          data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    else:
        from trl import SFTConfig, SFTTrainer

        ds = Dataset.from_list(records)
        packing = system == "trl_packing_bfd"
        args = SFTConfig(max_length=a.cap, packing=packing, packing_strategy="bfd",
                         per_device_train_batch_size=1 if packing else micro,
                         gradient_accumulation_steps=a.packed_rows_per_step if packing else a.batch // micro,
                         **common)
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    tokens = sum(len(tokenize_data.tokenize_sample(r, tok)["input_ids"]) for r in records)
    return {"tokens": tokens, "train_s": train_s, "peak_mem_gib": peak_gib(a.device),
            "steps": trainer.state.global_step, "attention": attn}


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    shapes = list(SHAPES) + sorted(f.stem for f in (ROOT / "bench/models").glob("*.json"))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shape", default="small", choices=shapes)
    p.add_argument("--lora-shape", default=None, choices=shapes, help="ours_lora's model (default: --shape)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--median", type=int, default=200, help="median sample length in tokens (CPU-sized default)")
    p.add_argument("--p95", type=int, default=680, help="95th percentile sample length in tokens")
    p.add_argument("--cap", type=int, default=4096, help="tokens per micro-batch (ours) / packed row (TRL)")
    p.add_argument("--batch", type=int, default=32, help="samples per optimizer step")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--work", type=Path, default=Path("/tmp/sft-bench"))
    p.add_argument("--out", type=Path, help="also write the Markdown table here")
    p.add_argument("--gpu-table", action="store_true", help="the sizes and systems of bench/gpu.sh")
    p.add_argument("--run", help=argparse.SUPPRESS)  # internal: run one system in this process
    a = p.parse_args(argv)
    if a.gpu_table:
        a = p.parse_args(GPU_TABLE[a.device].split() + ["--systems", GPU_SYSTEMS] + argv)
    # TRL packs rows of `cap` tokens: accumulate as many rows as hold `batch` samples on average
    a.packed_rows_per_step = max(1, round(a.batch * a.median * 1.3 / a.cap))  # mean length ~ 1.3 x median
    if a.run:
        result = run_ours(a, a.run) if a.run.startswith("ours") else run_hf(a, a.run)
        (a.work / f"{a.run}.json").write_text(json.dumps(result))
        return
    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    make_data(a.work / "data.jsonl", a.samples, a.median, a.p95, a.cap)
    make_model(a.work / "model", a.shape)
    systems = a.systems.split(",")
    if "ours_lora" in systems:
        make_model(a.work / "model_lora", a.lora_shape or a.shape)
    results = {}
    for system in systems:
        launch(argv, system)
        r = json.loads((a.work / f"{system}.json").read_text())
        r["tokens_per_s"] = r["tokens"] / r["train_s"]
        results[system] = r
        print(f"{system:20s} {r['tokens_per_s']:10.0f} tok/s  {r['peak_mem_gib']:6.2f} GiB  {r['steps']} steps",
              flush=True)
    print(table(a, results))
    if a.out:
        a.out.write_text(table(a, results) + "\n")
    (a.work / "results.json").write_text(json.dumps(results, indent=1))


def launch(argv: list[str], system: str):
    """Runs `system` in a process of its own (its peak memory and compile caches are its own)."""
    subprocess.run([sys.executable, __file__, *argv, "--run", system], check=True, cwd=ROOT)


def table(a, results: dict) -> str:
    """One Markdown table: each system's real tokens/s, MFU and peak memory, and ours / system on the same model.
    The peers' model FLOPs are ours' (the same model and tokens); MFU needs a GPU in logging_utils.PEAK_TFLOPS."""
    import torch

    import logging_utils

    peak = logging_utils._peak_tflops(logging_utils.LogConfig(), torch.device(a.device))
    ours = results.get("ours")
    lines = ["| system | model | real tokens/s | MFU | peak memory (GiB) | ours / system |",
             "|---|---|---|---|---|---|"]
    for system, r in results.items():
        flops = r.get("flops") or (ours["flops"] if ours and system != "ours_lora" else None)
        mfu = f"{flops / r['train_s'] / (peak * 1e12):.1%}" if peak and flops else "–"
        same_model = ours and system != "ours_lora"
        ratio = f"{ours['tokens_per_s'] / r['tokens_per_s']:.2f}x" if same_model else "–"
        model = f"{a.lora_shape or a.shape}, LoRA r={a.lora_rank}" if system == "ours_lora" else f"{a.shape}, full"
        name = system + (f" ({r['attention']})" if "attention" in r else "")
        lines.append(f"| {name} | {model} | {r['tokens_per_s']:.0f} | {mfu} | {r['peak_mem_gib']:.2f} | {ratio} |")
    if "ours" in results and "ours_compile" in results:
        steady = [results[s]["steady_tokens_per_s"] for s in ("ours", "ours_compile")]
        lines.append(f"\nSteady state (steps 3 on): eager {steady[0]:.0f} tokens/s, compiled {steady[1]:.0f} "
                     f"tokens/s: {steady[1] / steady[0]:.2f}x.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
