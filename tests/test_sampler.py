"""Properties of the global step plan and of the packed rows."""

import math
import os
import signal

import numpy as np
import pytest
import torch

import sampler
from conftest import ROOT, in_process, metrics, run_args, write_jsonl
from sampler import MultipackPlan, SamplerConfig, collate, plan_stats, step_targets, targets


def distributions():
    rng = np.random.default_rng(0)
    yield "uniform", rng.integers(1, 300, 500)
    yield "long-tail", np.clip(rng.lognormal(4, 1, 700).astype(int), 1, 1000)
    yield "constant", np.full(333, 64)
    yield "bimodal", np.concatenate([rng.integers(1, 20, 300), rng.integers(900, 1000, 40)])
    yield "tiny", rng.integers(1, 5, 7)


@pytest.mark.parametrize("name,lengths", list(distributions()), ids=lambda x: x if isinstance(x, str) else "")
@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_plan_properties(name, lengths, world_size):
    cfg = SamplerConfig(batch_size=64, max_tokens_per_rank=1000)
    p = MultipackPlan(lengths, cfg, world_size, seed=3)
    for epoch in (0, 1):
        seen = []
        for step in range(p.steps_per_epoch):
            full = p.plan(epoch, step)
            assert len({len(r) for r in full}) == 1  # same number of micro-steps everywhere
            assert all(sum(lengths[i] for i in mb) <= cfg.max_tokens_per_rank for r in full for mb in r)
            step_samples = [i for r in full for mb in r for i in mb]
            assert sorted(step_samples) == sorted(p.step_samples(epoch, step).tolist())
            seen += step_samples
        assert sorted(seen) == list(range(len(lengths)))  # each sample exactly once per epoch
    other = MultipackPlan(lengths, cfg, world_size, seed=3)  # another rank's copy
    assert [other.plan(1, s) for s in range(p.steps_per_epoch)] == [p.plan(1, s) for s in range(p.steps_per_epoch)]


def test_step_composition_does_not_depend_on_world_size():
    lengths = np.random.default_rng(1).integers(1, 500, 1000)
    cfg = SamplerConfig(batch_size=100, max_tokens_per_rank=2000)
    per_world = {}
    for w in (1, 2, 8):
        p = MultipackPlan(lengths, cfg, w, seed=7)
        per_world[w] = [sorted(i for r in p.plan(2, s) for mb in r for i in mb) for s in range(p.steps_per_epoch)]
    assert per_world[1] == per_world[2] == per_world[8]


def test_targets_shift_per_sample_and_the_step_normalizer_counts_them():
    a = (np.array([5, 6, 7, 8]), np.array([0, 1, 1, 1], np.uint8))
    b = (np.array([9, 10, 11]), np.array([1, 0, 1], np.uint8))
    pos, tgt, seg, weight = targets([a, b])
    # a: positions 0-2 predict 6, 7, 8; its last position (3) predicts nothing; b: position 5 predicts 11
    assert pos.tolist() == [0, 1, 2, 5] and tgt.tolist() == [6, 7, 8, 11] and seg.tolist() == [0, 0, 0, 1]
    assert weight is None
    counts, weights, n = step_targets([a, b, a])
    assert counts.tolist() == [3, 1, 3] and weights.tolist() == [3, 1, 3] and n == 7


def test_too_long_sample_is_a_startup_error():
    with pytest.raises(ValueError, match=r"sample 2 has 900 tokens, more than sampler.max_tokens_per_rank=800 "
                                         r"\(1 such samples\); raise sampler.max_tokens_per_rank"):
        MultipackPlan(np.array([10, 20, 900]), SamplerConfig(batch_size=2, max_tokens_per_rank=800), 1, 0)


def test_realistic_sft_distribution_is_balanced_at_the_lower_bound():
    """Long-tailed lengths (median ~500, p95 ~1,700), 8 ranks, cap 8,192, 1,024 samples per step."""
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(500), np.log(1700 / 500) / 1.645, 1024 * 60).astype(int), 8, 8192)
    assert 450 < np.median(lengths) < 550 and 1500 < np.percentile(lengths, 95) < 1900
    p = MultipackPlan(lengths, SamplerConfig(batch_size=1024, max_tokens_per_rank=8192), 8, seed=0)
    at_bound = 0
    for step in range(p.steps_per_epoch):
        per_rank = [sum(lengths[i] for mb in r for i in mb) for r in p.plan(0, step)]
        bound = math.ceil(sum(per_rank) / (8 * 8192))
        micro = len(p.plan(0, step)[0])
        assert max(per_rank) / np.mean(per_rank) <= 1.02
        assert micro <= bound + 1
        at_bound += micro == bound
    assert at_bound >= 0.95 * p.steps_per_epoch
    stats = plan_stats(p)
    assert stats["steps"] == 60 and stats["rank_imbalance_max"] <= 1.02 and stats["packing_efficiency"] > 0.9


def test_collate_packs_padding_free_rows():
    a = (np.array([5, 6, 7, 8], np.int32), np.array([0, 0, 1, 1], np.uint8))
    b = (np.array([9, 10, 11], np.int32), np.array([0, 1, 1], np.uint8))
    batch = collate([a, b], torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert batch["cu_seqlens"].tolist() == [0, 4, 7] and batch["cu_seqlens"].dtype == torch.int32
    assert batch["max_seqlen"] == 4
    # position i predicts token i+1 of the same sample; the last position of each sample predicts nothing
    assert batch["loss_idx"].tolist() == [1, 2, 4, 5]
    assert batch["targets"].tolist() == [7, 8, 10, 11]
    empty = collate([], torch.device("cpu"))
    assert empty["input_ids"].shape == (1, 1) and empty["targets"].numel() == 0


def test_plan_statistics_command(small_data, tmp_path, capsys, monkeypatch):
    """`python sampler.py`'s main, in this process (the command's imports are test_import_graph's)."""
    import json

    import sampler
    from conftest import QS_CONFIG, ROOT

    monkeypatch.chdir(ROOT)
    sampler.main(["--config", QS_CONFIG, "--world-size", "4", f"--data.train_files=[{small_data}]",
                  f"--data.cache_dir={tmp_path}", "--sampler.batch_size=48", "--sampler.max_tokens_per_rank=256"])
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["steps"] == 4  # 192 samples / 48
    assert stats["micro_steps_mean"] >= stats["micro_steps_lower_bound_mean"] >= 1
    assert 0 < stats["packing_efficiency"] <= 1 and stats["rank_imbalance_max"] >= 1


class ObservingPlan(sampler.MultipackPlan):
    """A sampler whose epochs differ in length and depend on what it observed: epoch e > 0 trains the samples of
    epoch e - 1 whose loss was above that epoch's median, the worst quarter twice. What it observed is its state."""

    stop_in_step = 0  # > 0: signal this process (SIGUSR1) while observing that step, as a preemption would

    def __init__(self, *args, **kwargs):
        self.seen, self.steps = {}, 0  # {epoch: {sample: loss}} (str keys: JSON)
        super().__init__(*args, **kwargs)

    def epoch_samples(self, epoch: int) -> np.ndarray:
        if epoch == 0:
            return super().epoch_samples(0)
        seen = self.seen[str(epoch - 1)]
        order = sorted(seen, key=lambda i: (-seen[i], int(i)))  # highest loss first
        above = [int(i) for i in order[:len(order) // 2]]
        return np.array(above + above[:len(above) // 2])

    def steps_in_epoch(self, epoch: int) -> int:
        return -(-len(self.epoch_samples(epoch)) // self.cfg.batch_size)

    def step_samples(self, epoch: int, step: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.epoch_samples(epoch))
        return order[step * self.cfg.batch_size:(step + 1) * self.cfg.batch_size]

    def observe(self, epoch, samples, losses):
        self.seen.setdefault(str(epoch), {}).update({str(i): float(x) for i, x in zip(samples, losses)})
        self.steps += 1
        if self.steps == ObservingPlan.stop_in_step:
            os.kill(os.getpid(), signal.SIGUSR1)
        return {}

    def state_dict(self) -> dict:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict):
        self.seen = state["seen"]


def test_a_sampler_with_epochs_of_different_lengths_resumes_bit_identically(tmp_path, monkeypatch):
    """9 steps over epochs of 4, 3 and 2 steps, each epoch's samples chosen from the losses of the one before.
    Interrupted in step 5 (it saves after step 6, inside epoch 1) and resumed, the run's losses are bit-identical
    to an uninterrupted one: the plan's state came back with the checkpoint."""
    lines = (ROOT / "data/quickstart/train.jsonl").read_text().splitlines()[:64]
    data = write_jsonl(tmp_path / "d.jsonl", lines)
    monkeypatch.setattr(sampler, "MultipackPlan", ObservingPlan)
    over = {"sharding.strategy": "none", "train.max_steps": 9, "sampler.batch_size": 16, "train.lr_schedule": "cosine"}
    in_process(run_args(tmp_path / "straight", data, **over))
    straight = metrics(tmp_path / "straight/run")
    assert [m["epoch"] for m in straight] == pytest.approx([0, 0.25, 0.5, 0.75, 1, 4 / 3, 5 / 3, 2, 2.5], abs=1e-4)
    monkeypatch.setattr(ObservingPlan, "stop_in_step", 5)
    with pytest.raises(AssertionError, match="exited with 75"):
        in_process(run_args(tmp_path / "resumed", data, **over))
    assert [m["step"] for m in metrics(tmp_path / "resumed/run")] == [1, 2, 3, 4, 5, 6]
    monkeypatch.setattr(ObservingPlan, "stop_in_step", 0)
    p = in_process(run_args(tmp_path / "resumed", data, **over))
    assert "resuming from" in p.stdout
    assert [m["loss"] for m in metrics(tmp_path / "resumed/run")] == [m["loss"] for m in straight]
