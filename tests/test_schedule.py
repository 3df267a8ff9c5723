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
