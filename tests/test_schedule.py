"""The learning-rate schedule and the optimizer's parameter groups."""

import math

import pytest
import torch

from train import TrainConfig, build_optimizer, lr_at


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_then_decay_to_min(schedule):
    cfg = TrainConfig(lr=1.0, warmup_steps=4, lr_schedule=schedule, min_lr_ratio=0.1)
    lrs = [lr_at(s, 14, cfg) for s in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0
    if schedule == "constant":
        assert set(lrs[4:]) == {1.0}
    else:
        assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
        assert lr_at(14, 14, cfg) == pytest.approx(0.1)  # reaches min_lr_ratio * lr at the end
    if schedule == "cosine":
        assert lr_at(9, 14, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_no_weight_decay_on_vectors():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and [p.ndim for p in decayed["params"]] == [2]
    assert plain["weight_decay"] == 0.0 and all(p.ndim == 1 for p in plain["params"])


def test_fused_adamw_equals_the_unfused_one():
    """build_optimizer's fused AdamW (one kernel) == torch's per-tensor AdamW, over 5 steps with weight decay."""
    import model_setup
    from config import ModelConfig
    from conftest import QS_MODEL

    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(model_setup.load_model(ModelConfig(path=QS_MODEL, random_init=True, dtype="float32"),
                                             torch.device("cpu")))
    fused = build_optimizer(models[0], TrainConfig(lr=1e-2, weight_decay=0.1, beta2=0.95))
    plain = torch.optim.AdamW([{"params": [p for p in models[1].parameters() if p.ndim >= 2], "weight_decay": 0.1},
                               {"params": [p for p in models[1].parameters() if p.ndim < 2], "weight_decay": 0.0}],
                              lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        fused.step(), plain.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
