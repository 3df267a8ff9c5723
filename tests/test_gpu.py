"""CUDA paths: the varlen kernels, compiled blocks under inductor, and bf16 FSDP2 over nccl, each against
its reference. Run on a GPU machine with `python -m pytest -m gpu tests`; on CPU these are skipped (their CPU
counterparts are in test_model.py, test_sharding.py and test_train.py)."""

import json

import numpy as np
import pytest
import torch

import model_setup
import sampler
from conftest import QS_MODEL, ROOT, metrics, run_args, torchrun, write_jsonl
from test_families import FAMILIES, models, samples
from test_model import CONFIGS, assert_packed_equals_per_sample, random_batch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", CONFIGS)
def test_cuda_packed_attention_equals_per_sample(name):
    assert_packed_equals_per_sample(name, torch.device("cuda"), atol=2e-3, rtol=2e-3)  # TF32/flash accumulation


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_passes_the_self_check_in_bf16_on_cuda(name):
    """The varlen kernels (sinks: the per-sample path) and, where mamba-ssm / causal-conv1d / fla are installed,
    packed hybrids with seq_idx: each family's packed row within the bf16 tolerance of its own forward."""
    ours = models(name, torch.device("cuda"))[0].to(torch.bfloat16)
    batch = sampler.collate(samples(), torch.device("cuda"))
    del batch["loss_seg"]
    assert model_setup.self_check(ours, batch, "bfloat16").startswith("self-check: ")  # else ValueError


@pytest.mark.parametrize("window", [None, 5])
def test_varlen_kernel_runs_and_equals_per_sample_attention(window):
    """A varlen kernel (flash-attn, else PyTorch's) is what bf16 packed rows use on this GPU, not the per-sample
    fallback, and it computes the same attention: grouped-query heads, samples of unequal length, a window,
    values that are a slice of a wider tensor (as DeepSeek's are). fp32 rows take the per-sample path (flash
    kernels are 16-bit)."""
    g = torch.Generator().manual_seed(0)
    lengths = [37, 5, 120, 64, 1, 64]
    cu = torch.tensor(np.cumsum([0] + lengths), dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(1, h, sum(lengths), d, generator=g).to("cuda", torch.bfloat16)
               for h, d in ((8, 64), (2, 64), (2, 68)))
    v = v[..., 4:]  # starts 8 bytes into its storage
    assert model_setup._varlen_cuda(q.float(), k.float(), v.float(), cu, max(lengths), 0.125, window, None) is None
    out = model_setup._varlen_cuda(q, k, v, cu, max(lengths), 0.125, window, None)
    assert out is not None, "bf16 packed rows would fall back to per-sample SDPA on this GPU"
    ref = model_setup._sdpa_per_sample(q.float(), k.float(), v.float(), cu.tolist(), 0.125, 0.0, window, None,
                                       None)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=0)


def _losses_and_grads(steps=6, **model_kw):
    """Loss and gradients of the quickstart model (random init, fp32, CUDA) over `steps` packed micro-batches."""
    from config import ModelConfig

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    model = model_setup.load_model(ModelConfig(path=QS_MODEL, random_init=True, dtype="float32", **model_kw),
                                   torch.device("cuda"))
    losses = []
    for _ in range(steps):
        loss = model(**random_batch(rng, 200, torch.device("cuda")))["loss"]
        loss.backward()
        losses.append(loss.detach())
    return torch.stack(losses), [p.grad for p in model.parameters()]


def test_inductor_compiled_blocks_give_the_eager_losses(monkeypatch):
    """model.compile with the real backend (the CPU tests use dynamo's eager one), with activation checkpointing."""
    import torch._dynamo

    monkeypatch.setattr(model_setup, "COMPILE_BACKEND", "inductor")
    torch._dynamo.reset()
    ref_losses, ref_grads = _losses_and_grads(gradient_checkpointing=True)
    losses, grads = _losses_and_grads(gradient_checkpointing=True, compile=True)
    torch.testing.assert_close(losses, ref_losses, atol=1e-3, rtol=1e-4)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_bf16_fsdp2_over_nccl_matches_one_fp32_process(tmp_path):
    """FSDP2 on every GPU of this machine (nccl), bf16 compute with fp32 master weights and reduction, against
    one fp32 process without sharding: 5 steps, the same losses to bf16 precision; MFU and memory are reported."""
    data = write_jsonl(tmp_path / "d.jsonl", (ROOT / "data/quickstart/train.jsonl").read_text().splitlines()[:320])
    ref = run_args(tmp_path, data, **{"sharding.strategy": "none", "train.output_dir": tmp_path / "ref",
                                      "train.max_steps": 5})
    torchrun(0, ref)
    fsdp = run_args(tmp_path, data, **{"sharding.strategy": "fsdp2", "sharding.compute_dtype": "bfloat16",
                                       "train.output_dir": tmp_path / "fsdp2", "train.max_steps": 5})
    torchrun(torch.cuda.device_count(), fsdp)
    for a, b in zip(metrics(tmp_path / "ref"), metrics(tmp_path / "fsdp2")):
        assert abs(a["loss"] - b["loss"]) <= 2e-2 * a["loss"], (a["loss"], b["loss"])
    summary = json.loads((tmp_path / "fsdp2/summary.json").read_text())
    assert summary["mfu"] is not None and summary["peak_mem_gib"] > 0


def test_mfu_peak_is_known_for_this_gpu():
    """MFU needs the device's peak: the GPUs the project is benchmarked on must be in PEAK_TFLOPS."""
    import logging_utils

    assert logging_utils._peak_tflops(logging_utils.LogConfig(), torch.device("cuda")), torch.cuda.get_device_name()
