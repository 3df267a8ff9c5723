"""Peak memory per rank of each strategy on a ~0.3B-parameter random-init Llama shape, fp32 weights and AdamW, a
few steps on CPU (micro-batches of at most 256 tokens per rank), beside what the arithmetic predicts (weights +
gradients + 2 Adam moments, divided by the ranks that shard them, + the resident footprint of an idle process that
has imported the trainer).

    python bench/bench_memory.py [--steps 3] [--only none,fsdp2,...] [--checkpointing] [--itemize]

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
    ap.add_argument("--itemize", action="store_true", help="under torch's profiler (FSDP2 and none): what the "
                    "tensors at each rank's peak are (the RSS figures then include the profiler's own)")
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
        script = ["bench/bench_memory.py", "--itemize-rank"] if a.itemize else ["train.py"]
        cmd = [sys.executable, *script, *args] if nproc == 0 else \
            [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *script, *args]
        p = subprocess.run([sys.executable, "-c", WHOLE_RUN, *cmd], cwd=ROOT, capture_output=True, text=True)
        if p.returncode:
            rows.append((name, None, None, None, p.stderr.strip().splitlines()[-1][:120]))
            continue
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        peak = metrics[-1].get("peak_mem_gib_ranks") or [metrics[-1]["peak_mem_gib"]]  # peak RSS never falls
        whole = float(p.stdout.splitlines()[-1])
        rows.append((name, params, predict(params, max(nproc, 1)) / 2**30, peak, whole))
        for f in sorted(run.glob("items-rank*.json")):
            items = json.loads(f.read_text())
            print(f"{name}, {f.stem[6:]}: " + ", ".join(f"{k} {v:.3f}" for k, v in items.items() if v >= 0.005))
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


def itemize(argv: list[str]):
    """Runs as one rank of train.py (`bench_memory.py --itemize-rank ARGS` under torchrun): torch's profiler
    records every CPU tensor allocation of steps 2-3; writes to items-rankN.json in the output directory the
    tensor bytes live at this rank's peak: the state held from before (weights, optimizer moments), and what was
    allocated since, by what allocated it (the nearest FSDP, autograd or optimizer scope, else the top-level op)."""
    import os
    from collections import Counter

    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch._C._profiler import _EventType

    sys.path.insert(0, str(ROOT))
    import sharding
    import train

    device = "cuda" if torch.cuda.is_available() else "cpu"  # the tensors training holds
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    prof = profile(activities=activities, profile_memory=True)
    step, calls, held = sharding.clip_and_step, [], {}

    def origin(node) -> str:
        names = []
        while node is not None:
            names.append(node.name)
            node = node.parent
        return next((n for n in names if n.startswith(("FSDP::", "Optimizer.", "autograd::engine"))), names[-1])

    def watched(*args, **kwargs):
        out = step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:  # the state: weights and optimizer moments (gradients are freed at each step)
            model, optimizer = args[:2]
            state = list(model.parameters()) + [v for s in optimizer.state.values() for v in s.values()]
            local = [t.to_local() if hasattr(t, "to_local") else t for t in state if isinstance(t, torch.Tensor)]
            held.update({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in local})
            prof.start()
        elif len(calls) == 3:
            prof.stop()
            todo, events = list(prof.profiler.kineto_results.experimental_event_tree()), []
            while todo:
                node = todo.pop()
                todo += node.children
                if node.tag == _EventType.Allocation and node.extra_fields.device.type == device:
                    events.append((node.start_time_ns, node.extra_fields, node.parent))
            events.sort(key=lambda e: e[0])
            live, peak, at_peak = {}, 0, {}
            for _, f, parent in events:
                if f.alloc_size > 0:
                    live[f.ptr] = (f.alloc_size, origin(parent) if parent else "?")
                else:
                    live.pop(f.ptr, None)
                if f.total_allocated > peak:
                    peak, at_peak = f.total_allocated, dict(live)
            items = Counter({"state: weights and optimizer moments": sum(held.values()) / 2**30})
            for size, name in at_peak.values():
                items[name] += size / 2**30
            out_dir = next(a.split("=", 1)[1] for a in argv if a.startswith("--train.output_dir="))
            Path(out_dir, f"items-rank{os.environ.get('RANK', '0')}.json").write_text(
                json.dumps({"tensors_at_peak_gib": sum(items.values())} | dict(items.most_common())))
        return out

    sharding.clip_and_step = watched
    train.main(argv)


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
    itemize(sys.argv[2:]) if sys.argv[1:2] == ["--itemize-rank"] else main()
