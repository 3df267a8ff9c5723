"""Throughput of this trainer against the Hugging Face stack on the same data and model, in one invocation.

    python bench/bench_sft.py                                  # CPU, small Llama-style model
    python bench/bench_sft.py --device cuda --shape 1b         # one GPU, 1B-class Llama shape

Systems: ours (packed, padding-free, per-sample attention, chunked loss over supervised tokens), TRL SFTTrainer
with packing=True (BFD, padding-free), TRL SFTTrainer with padding, the HF Trainer with padding. Each runs in its
own process, one epoch over the same synthetic chats (long-tailed lengths) with the same model, seed, optimizer
(AdamW), dtype and samples per optimizer step. Reported: real (non-pad) tokens per second of the training loop
(model loading and tokenization excluded), peak memory, and ours / theirs.
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHAPES = {  # LlamaConfig fields; the vocabulary is that of a real model (the tokenizer uses the first ids only)
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}
SYSTEMS = ["ours", "trl_packing_bfd", "trl_padding", "hf_trainer_padding"]  # and ours_compile (model.compile)
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
    from transformers import LlamaConfig

    src = ROOT / "data/quickstart/model"
    shutil.copytree(src, path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("config.json"))
    LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, pad_token_id=0, bos_token_id=None,
                eos_token_id=2).save_pretrained(path)


def peak_gib(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_ours(a, compiled: bool = False) -> dict:
    out = a.work / ("ours_compile" if compiled else "ours")
    dtype = "bfloat16" if a.device == "cuda" else "float32"
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/quickstart.yaml"),
           f"--data.train_files=[{a.work / 'data.jsonl'}]", f"--data.cache_dir={a.work / 'cache'}",
           f"--data.max_seq_len={a.cap}", f"--model.path={a.work / 'model'}", f"--model.dtype={dtype}",
           "--sharding.strategy=none", f"--sampler.batch_size={a.batch}", f"--sampler.max_tokens_per_rank={a.cap}",
           f"--train.output_dir={out}", "--train.heldout_file=", "--train.lr=1e-4", "--train.warmup_steps=0",
           f"--model.gradient_checkpointing={str(a.device == 'cuda').lower()}", f"--model.compile={str(compiled).lower()}"]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    steady = rows[2:]  # after the first steps, which compile (model.compile) or warm up allocators
    return {"tokens": summary["tokens"], "train_s": rows[-1]["elapsed_s"], "peak_mem_gib": summary["peak_mem_gib"],
            "steps": len(rows), "steady_tokens_per_s": sum(r["tokens"] for r in steady) / sum(r["step_time_s"]
                                                                                          for r in steady)}


def run_hf(a, system: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments)

    import tokenize_data

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.work / "model")
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    attn = "flash_attention_2" if a.device == "cuda" and system == "trl_packing_bfd" else "sdpa"
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(a.work / "model"), dtype=dtype,
                                             attn_implementation=attn)  # random init, as ours
    records = [json.loads(line) for line in (a.work / "data.jsonl").read_text().splitlines()]
    micro = 8  # padded systems: 8 samples per micro-batch, accumulated to `batch` samples per step
    common = dict(output_dir=str(a.work / system), num_train_epochs=1, learning_rate=1e-4, lr_scheduler_type="cosine",
                  adam_beta2=0.95, max_grad_norm=1.0, save_strategy="no", report_to=[], logging_steps=10**6,
                  seed=0, bf16=a.device == "cuda", use_cpu=a.device == "cpu", dataloader_num_workers=0,
                  gradient_checkpointing=a.device == "cuda", disable_tqdm=True)
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
            "steps": trainer.state.global_step}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shape", default="small", choices=list(SHAPES))
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--median", type=int, default=200, help="median sample length in tokens (CPU-sized default)")
    p.add_argument("--p95", type=int, default=680, help="95th percentile sample length in tokens")
    p.add_argument("--cap", type=int, default=4096, help="tokens per micro-batch (ours) / packed row (TRL)")
    p.add_argument("--batch", type=int, default=32, help="samples per optimizer step")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--work", type=Path, default=Path("/tmp/sft-bench"))
    p.add_argument("--run", help=argparse.SUPPRESS)  # internal: run one system in this process
    a = p.parse_args()
    # TRL packs rows of `cap` tokens: accumulate as many rows as hold `batch` samples on average
    a.packed_rows_per_step = max(1, round(a.batch * a.median * 1.3 / a.cap))  # mean length ~ 1.3 x median
    if a.run:
        result = run_ours(a, a.run == "ours_compile") if a.run.startswith("ours") else run_hf(a, a.run)
        (a.work / f"{a.run}.json").write_text(json.dumps(result))
        return
    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    make_data(a.work / "data.jsonl", a.samples, a.median, a.p95, a.cap)
    make_model(a.work / "model", a.shape)
    results = {}
    for system in a.systems.split(","):
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--run", system], check=True, cwd=ROOT)
        r = json.loads((a.work / f"{system}.json").read_text())
        r["tokens_per_s"] = r["tokens"] / r["train_s"]
        results[system] = r
        print(f"{system:20s} {r['tokens_per_s']:10.0f} tok/s  {r['peak_mem_gib']:6.2f} GiB  {r['steps']} steps",
              flush=True)
    if "ours" in results and "ours_compile" in results:
        steady = [results[s]["steady_tokens_per_s"] for s in ("ours", "ours_compile")]
        print(f"\nsteady state (steps 3 on): eager {steady[0]:.0f} tok/s, compiled {steady[1]:.0f} tok/s: "
              f"{steady[1] / steady[0]:.2f}x")
    ours = results.get("ours", {}).get("tokens_per_s")
    print("\n| system | real tokens/s | peak memory (GiB) | ours / system |\n|---|---|---|---|")
    for system, r in results.items():
        ratio = f"{ours / r['tokens_per_s']:.2f}x" if ours else "-"
        print(f"| {system} | {r['tokens_per_s']:.0f} | {r['peak_mem_gib']:.2f} | {ratio} |")
    (a.work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
