"""CUDA paths: the varlen kernels and Liger's loss against the per-sample reference. Run on a GPU machine with
`python -m pytest -m gpu tests`; on CPU these are skipped (their CPU counterparts are in test_model.py)."""

import pytest
import torch

import model_setup
from test_model import CONFIGS, assert_packed_equals_per_sample

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", CONFIGS)
def test_cuda_packed_attention_equals_per_sample(name):
    assert_packed_equals_per_sample(name, torch.device("cuda"), atol=2e-3, rtol=2e-3)  # TF32/flash accumulation


def test_liger_loss_equals_chunked():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 64, generator=g).cuda().requires_grad_()
    weight = torch.randn(1000, 64, generator=g).cuda().requires_grad_()
    batch = {"loss_idx": torch.arange(0, 300, 3).cuda(), "targets": torch.randint(0, 1000, (100,), generator=g).cuda()}
    ours, _ = model_setup.compute_loss_chunked(hidden, weight, batch)
    liger, _ = model_setup.compute_loss_liger(hidden, weight, batch)
    torch.testing.assert_close(liger, ours, rtol=1e-4, atol=1e-3)


def test_mfu_peak_is_known_for_this_gpu():
    """MFU needs the device's peak: the GPUs the project is benchmarked on must be in PEAK_TFLOPS."""
    import logging_utils

    assert logging_utils._peak_tflops(logging_utils.LogConfig(), torch.device("cuda")), torch.cuda.get_device_name()
