"""Metrics against independent computations: the FLOPs formula against hand arithmetic for known shapes; one
epoch's token counts against the token cache; the eval loss against a plain transformers forward of the export;
TensorBoard, W&B (offline) and the plot against metrics.jsonl; every metric documented in the README."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

import logging_utils
import model_setup
import sampler
import sharding
import tokenize_data
from conftest import ROOT, metrics, run_args

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
LLAMA32_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, head_dim=64)


def meta_model(shape: dict, lora_rank: int = 0):
    with torch.device("meta"):
        model = model_setup.PackedCausalLM(AutoModelForCausalLM.from_config(LlamaConfig(**shape)))
    if lora_rank:
        sharding._apply_lora(model, sharding.ShardingConfig(lora_rank=lora_rank))
    return model


def test_flops_of_a_llama3_8b_shape():
    per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336  # q, o; k, v (8 kv heads x 128); MLP
    matmul = 32 * per_layer + 128256 * 4096  # + output layer (untied; the input embedding is a lookup)
    assert matmul == 8_030_261_248 - 128256 * 4096 - 65 * 4096  # Llama-3-8B's parameters - embedding - norms
    lengths = [100, 4096, 1]
    expected = 6 * matmul * 4197 + 6 * 32 * 32 * 128 * (100**2 + 4096**2 + 1)
    step_flops = logging_utils.flop_counter(meta_model(LLAMA3_8B))
    assert step_flops(lengths) == expected
    # from each sample's length: two 4096-token samples packed in a row cost half the attention of 8192 tokens
    dense = 6 * matmul * 8192
    assert 2 * (step_flops([4096, 4096]) - dense) == step_flops([8192]) - dense


def test_flops_of_a_tied_1b_shape_full_and_lora():
    per_layer = 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192
    matmul = 16 * per_layer + 128256 * 2048  # the tied output layer is a matmul all the same
    assert matmul == 1_235_814_400 - 33 * 2048  # Llama-3.2-1B's parameters (tied) - its 33 norm vectors
    attention = 6 * 16 * 32 * 64 * 1000**2
    assert logging_utils.flop_counter(meta_model(LLAMA32_1B))([1000]) == 6 * matmul * 1000 + attention
    # LoRA r=8 on every linear layer of the blocks: adapters cost 6 per weight, the frozen base 4 (no weight grad)
    adapters = 16 * 8 * (2 * (2048 + 2048) + 2 * (2048 + 512) + 3 * (2048 + 8192))
    assert logging_utils.flop_counter(meta_model(LLAMA32_1B, 8))([1000]) == \
        (6 * adapters + 4 * matmul) * 1000 + attention


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One process, one epoch (6 steps) of 192 quickstart chats, eval loss on the held-out chats every 3 steps,
    TensorBoard and W&B (offline) on."""
    tmp = tmp_path_factory.mktemp("logging")
    data = tmp / "data.jsonl"
    data.write_text("\n".join((ROOT / "data/quickstart/train.jsonl").read_text().splitlines()[:192]) + "\n")
    args = run_args(tmp, str(data), **{"sharding.strategy": "none", "train.max_steps": 0, "train.epochs": 1,
                                       "data.eval_files": f"[{ROOT / 'data/quickstart/heldout.jsonl'}]",
                                       "train.eval_every_steps": 3, "logging.tensorboard": "true",
                                       "logging.wandb_project": "sft-trainer-test"})
    env = os.environ | {"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "false"}
    p = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return tmp / "run", p.stdout + p.stderr, str(data)


def test_an_epoch_of_metrics_adds_up_to_the_token_cache(run):
    run_dir, _, data = run
    rows, summary = metrics(run_dir), json.loads((run_dir / "summary.json").read_text())
    cache = tokenize_data.TokenCache(tokenize_data.build_cache(
        [data], AutoTokenizer.from_pretrained(run_dir / "hf"), tokenize_data.DataConfig(max_seq_len=128)))
    assert len(rows) == 6
    targets = sum(len(sampler.targets([cache[i]])[0]) for i in range(len(cache)))
    for key, total in (("samples", len(cache)), ("tokens", cache.meta["tokens"]), ("loss_tokens", targets)):
        assert sum(m[key] for m in rows) == summary[key] == total, key
    for m in rows:
        assert m["step_time_s"] == pytest.approx(m["data_wait_s"] + m["compute_s"])
        assert m["tokens_per_s"] == pytest.approx(m["tokens"] / m["step_time_s"])
        assert m["tflops"] > 0 and m["mfu"] is None  # CPU: achieved TFLOP/s, no peak to divide by
    assert summary["tflops"] > 0 and summary["samples_dropped"] == {"longer_than_max_seq_len": 0}


def test_eval_loss_equals_a_direct_computation(run):
    """The last eval runs on the final weights, which the export holds: recompute it with transformers."""
    run_dir = run[0]
    rows, summary = metrics(run_dir), json.loads((run_dir / "summary.json").read_text())
    assert [m["step"] for m in rows if "eval_loss" in m] == [3, 6]
    tok = AutoTokenizer.from_pretrained(run_dir / "hf")
    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf", dtype=torch.float32).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for line in (ROOT / "data/quickstart/heldout.jsonl").read_text().splitlines():
            s = tokenize_data.tokenize_sample(json.loads(line), tok)
            logits = model(torch.tensor([s["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(s["labels"][1:])
            total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            n += int((labels != -100).sum())
    assert rows[-1]["eval_loss"] == summary["final_eval_loss"] == pytest.approx(total / n, rel=1e-5)
    assert summary["best_eval_loss"] == min(m["eval_loss"] for m in rows if "eval_loss" in m)


def test_tensorboard_wandb_and_plot_hold_the_metrics(run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, output, _ = run
    rows = metrics(run_dir)
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    for key in ("loss", "eval_loss", "lr", "tokens_per_s", "tflops", "peak_mem_gib"):
        logged = {e.step: e.value for e in events.Scalars(key)}
        assert logged == pytest.approx({m["step"]: m[key] for m in rows if key in m}, rel=1e-6), key
    assert list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))  # W&B wrote its offline run
    assert re.search(r"wandb:\s+loss ", output)  # ... whose history has the loss
    fig = logging_utils.plot([run_dir, run_dir], tmp_path / "two.png")  # overlay: one line per run and panel
    assert [len(ax.lines) for ax in fig.axes] == [4, 2, 2, 2]  # loss panel: train and eval of each run
    p = subprocess.run([sys.executable, "logging_utils.py", "plot", str(run_dir)], cwd=ROOT, capture_output=True,
                       text=True)
    png = run_dir / "metrics.png"
    assert p.returncode == 0 and png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_every_metric_and_summary_key_is_documented(run):
    run_dir = run[0]
    readme = (ROOT / "README.md").read_text()
    keys = set().union(*(m.keys() for m in metrics(run_dir)))
    keys |= json.loads((run_dir / "summary.json").read_text()).keys()
    missing = sorted(k for k in keys if f"`{k}`" not in readme)
    assert not missing, f"README.md does not describe: {missing}"


@pytest.mark.parametrize("reduced", [False, True])
def test_noise_scale_estimate_on_a_known_gradient_variance(reduced):
    """Per-token gradients g = mu + sigma z in D dimensions: B_simple = tr(Sigma) / |mu|^2 = D sigma^2 / |mu|^2 = 100
    tokens. Each step is 400 tokens on 2 ranks whose first micro-batches hold 50 tokens each, fed to NoiseScale
    as the loop does: the gradient held after the first micro-step is that micro-batch's token sum x world / N
    (`none`: each rank's own; FSDP2: averaged over ranks in backward). Within 10%."""
    g = torch.Generator().manual_seed(0)
    D, N, n, world = 50, 400, 50, 2
    mu = torch.randn(D, generator=g)
    mu *= (0.5 / mu.pow(2).sum()).sqrt()  # |mu|^2 = 0.5, tr(Sigma) = D = 50
    noise = logging_utils.NoiseScale(reduced, world, beta=0.999)
    for _ in range(3000):
        tokens = mu + torch.randn(N, D, generator=g)
        first = [tokens[r * N // world:r * N // world + n] for r in range(world)]  # each rank's first micro-batch
        held = [f.sum(0) * world / N for f in first]
        if reduced:  # combined over ranks in backward; each rank holds one half of the vector (its shard)
            full = sum(held) / world
            parts = sum(noise.parts(full[r * D // 2:(r + 1) * D // 2].pow(2).sum(), n, N) for r in range(world))
        else:
            parts = sum(noise.parts(h.pow(2).sum(), n, N) for h in held)
        estimate = noise.update(parts.tolist(), tokens.mean(0).norm().item(), N)
    assert estimate == pytest.approx(100, rel=0.1)
