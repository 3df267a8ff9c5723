"""Peak memory per rank of each strategy on a ~0.3B-parameter random-init Llama shape, fp32 weights and AdamW, a
few steps on CPU (micro-batches of at most 256 tokens per rank), beside what the arithmetic predicts (weights +
gradients + 2 Adam moments, divided by the ranks that shard them, + the resident footprint of an idle process that
has imported the trainer).

    python bench/bench_memory.py [--steps 3] [--only none,fsdp2,...] [--checkpointing]

Writes the Markdown table to stdout; each run's metrics are under runs/bench_memory/.
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from bench_sft import make_data  # noqa: E402

SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=20, num_attention_heads=16,
             num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False)
EMB = 2 * SHAPE["vocab_size"] * SHAPE["hidden_size"]  # input and output embeddings (QLoRA keeps them in bf16)
LORA = {"sharding.lora_rank": 16, "sharding.lora_alpha": 32.0}
# name: (processes, overrides, bytes per parameter held by each rank: predicted as weights + gradients + moments)
RUNS = {
    "none, 1 process": (0, {}, lambda n, w: 16 * n),
    "fsdp2, 2 ranks": (2, {"sharding.strategy": "fsdp2"}, lambda n, w: 16 * n / w),
    "fsdp2 + cpu_offload, 2 ranks": (2, {"sharding.strategy": "fsdp2", "sharding.cpu_offload": "true"},
                                     lambda n, w: 16 * n / w),
    "deepspeed ZeRO-2, 2 ranks": (2, {"sharding.strategy": "deepspeed", "sharding.zero_stage": 2},
                                  lambda n, w: 4 * n + 12 * n / w),
    "deepspeed ZeRO-3, 2 ranks": (2, {"sharding.strategy": "deepspeed", "sharding.zero_stage": 3},
                                  lambda n, w: 16 * n / w),
    "LoRA r=16, 1 process": (0, LORA, lambda n, w: 4 * n),
    "QLoRA r=16, 1 process": (0, LORA | {"model.load_in_4bit": "true", "model.random_init": "false",
                                         "model.dtype": "bfloat16"}, lambda n, w: 0.5 * (n - EMB) + 2 * EMB),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated names (prefixes) of RUNS to run")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing on")
    a = ap.parse_args()
    out = ROOT / "runs/bench_memory"
    out.mkdir(parents=True, exist_ok=True)
    model = out / "model"
    if not (model / "model.safetensors.index.json").exists() and not (model / "model.safetensors").exists():
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig

        shutil.copytree(ROOT / "data/quickstart/model", model, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("config.json"))
        cfg = LlamaConfig(**SHAPE, max_position_embeddings=4096, pad_token_id=0, bos_token_id=None, eos_token_id=2)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(model)  # for QLoRA to read
    params = parameters()
    data = out / "data.jsonl"
    make_data(data, 64, median=96, p95=240, cap=256)
    rows = []
    for name, (nproc, over, predict) in RUNS.items():
        if a.only and not any(name.startswith(o) for o in a.only.split(",")):
            continue
        run = out / name.split(",")[0].replace(" ", "_").replace("+", "").replace("=", "")
        shutil.rmtree(run, ignore_errors=True)
        args = ["--config", str(ROOT / "configs/quickstart.yaml"), f"--model.path={model}", "--model.random_init=true",
                "--model.dtype=float32", "--sharding.compute_dtype=float32", f"--data.train_files=[{data}]",
                "--data.eval_files=[]", "--train.heldout_file=", f"--data.cache_dir={out / 'cache'}",
                f"--train.output_dir={run}", f"--train.max_steps={a.steps}", "--sampler.batch_size=8",
                "--sampler.max_tokens_per_rank=256", "--sharding.strategy=none", "--checkpoint.keep_last=1",
                f"--model.gradient_checkpointing={str(a.checkpointing).lower()}"]
        args += [f"--{k}={v}" for k, v in over.items()]
        cmd = [sys.executable, "train.py", *args] if nproc == 0 else \
            [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "train.py", *args]
        p = subprocess.run([sys.executable, "-c", WHOLE_RUN, *cmd], cwd=ROOT, capture_output=True, text=True)
        if p.returncode:
            rows.append((name, None, None, None, p.stderr.strip().splitlines()[-1][:120]))
            continue
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        peak = metrics[-1].get("peak_mem_gib_ranks") or [metrics[-1]["peak_mem_gib"]]  # peak RSS never falls
        whole = float(p.stdout.splitlines()[-1])
        rows.append((name, params, predict(params, max(nproc, 1)) / 2**30, peak, whole))
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
    base, unsharded = idle_gib(), next((max(r[3]) for r in rows if r[0].startswith("none") and r[3]), None)
    print(f"| strategy | parameters | predicted state (GiB) | predicted + idle process {base:.2f} GiB | peak RSS "
          "of each rank in training (GiB) | max / (predicted + idle) | max / `none`'s | whole run, largest process |")
    print("|---|---|---|---|---|---|---|---|")
    for name, params, pred, peak, whole in rows:
        if peak is None:
            print(f"| {name} | – | – | – | failed: {whole} | – | – | – |")
        else:
            ratio = f"{max(peak) / unsharded:.2f}" if unsharded else "–"
            print(f"| {name} | {params / 1e6:.0f}M | {pred:.2f} | {pred + base:.2f} | "
                  f"{' / '.join(f'{p:.2f}' for p in peak)} | {max(peak) / (pred + base):.2f} | {ratio} | "
                  f"{whole:.2f} |")


# runs a command and prints the peak RSS of the largest process it waited for (torchrun waits for its ranks),
# over the whole run: loading, training, saving, the export
WHOLE_RUN = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]).returncode; "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20); sys.exit(r)")


def parameters() -> int:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE)).parameters())


def idle_gib() -> float:
    """Peak RSS of a process that imports the trainer and builds nothing: the floor every rank pays."""
    code = "import resource, train; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)"
    return float(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True).stdout)


if __name__ == "__main__":
    main()
