"""Distributed multipack sampling: every rank computes the same global step plan from (seed, epoch).

    python sampler.py --config configs/quickstart.yaml --world-size 64   # plan statistics, no model

Step k of an epoch takes samples [k*B, (k+1)*B) of a seeded permutation, whatever the world size.
Its samples are spread over ranks x micro-steps by longest-processing-time balancing of tokens,
using the fewest micro-steps that fit under the token cap. Every rank runs the same number of
micro-steps (an empty micro-batch contributes zero loss and still joins the collectives). The
position is the step number: resuming is O(1), on any world size.
"""

import heapq
import json
import math
import sys
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import torch

import config


@config.section("sampler")
@dataclass
class SamplerConfig:
    # samples per optimizer step, over all ranks (the last step of an epoch may have fewer)
    batch_size: Annotated[int, config.ge(1)] = 64
    # token cap of one micro-batch on one rank (memory), >= the longest sample
    max_tokens_per_rank: Annotated[int, config.ge(1)] = 8192


def _balance(lengths: np.ndarray, bins: int, cap: int) -> list[list[int]] | None:
    """Longest-processing-time: each sample, longest first, goes to the least-loaded bin. Returns
    the bins' sample positions, or None if a sample does not fit under `cap`."""
    heap = [(0, b) for b in range(bins)]
    out = [[] for _ in range(bins)]
    for i in np.argsort(-lengths, kind="stable"):
        load, b = heapq.heappop(heap)
        if load + lengths[i] > cap:
            return None
        out[b].append(int(i))
        heapq.heappush(heap, (load + int(lengths[i]), b))
    return out


class MultipackPlan:
    """The step plan of one run: `plan(epoch, step)` -> [rank][micro-step] lists of sample indices
    into the token cache. It owns the schedule: the loop asks it for the run's length
    (`total_steps`) and where a step falls (`position`), tells it each step's per-sample losses
    (`observe`), and checkpoints its `state_dict`."""

    def __init__(self, lengths: np.ndarray, cfg: SamplerConfig, world_size: int, seed: int,
                 sources: np.ndarray | None = None, weights: list[float] | None = None):
        self.lengths, self.cfg, self.world_size = np.asarray(lengths), cfg, world_size
        self.seed, self._order = seed, (None, None)
        n = len(self.lengths)
        self.sources = np.zeros(n, np.int64) if sources is None else np.asarray(sources)
        self.weights = list(weights or [1.0] * (int(self.sources.max(initial=0)) + 1))
        too_long = np.flatnonzero(self.lengths > cfg.max_tokens_per_rank)
        if len(too_long):
            i = int(too_long[0])
            cap, n = cfg.max_tokens_per_rank, len(too_long)
            raise ValueError(f"sample {i} has {self.lengths[i]} tokens, more than "
                             f"sampler.max_tokens_per_rank={cap} ({n} such samples); raise "
                             "sampler.max_tokens_per_rank or lower data.max_seq_len")
        self.samples_per_epoch = len(self.epoch_samples(0))
        if not self.samples_per_epoch:
            raise ValueError("the source weights leave no sample in an epoch; raise a weight "
                             "above 0")
        self.steps_per_epoch = math.ceil(self.samples_per_epoch / cfg.batch_size)

    def steps_in_epoch(self, epoch: int) -> int:
        """Optimizer steps of `epoch`: the same for every epoch here; a sampler may vary it."""
        return self.steps_per_epoch

    def total_steps(self, epochs: int) -> int:
        return sum(self.steps_in_epoch(e) for e in range(epochs))

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of the run's step `step` (0-based)."""
        epoch = 0
        while step >= self.steps_in_epoch(epoch):
            step -= self.steps_in_epoch(epoch)
            epoch += 1
        return epoch, step

    def epoch_samples(self, epoch: int) -> np.ndarray:
        """The samples of one epoch, unshuffled. A source of weight w and n samples gives
        round(w * n): each of its samples floor(w) times, plus a subset drawn by (seed, epoch,
        source) for the fractional part, so a weight of 0.5 sees another half of the source each
        epoch."""
        parts = []
        for s, w in enumerate(self.weights):
            idx = np.flatnonzero(self.sources == s)
            whole, extra = divmod(round(w * len(idx)), len(idx)) if len(idx) else (0, 0)
            rng = np.random.default_rng([self.seed, epoch, s])
            parts += [idx] * whole + [np.sort(rng.choice(idx, extra, replace=False))]
        return np.concatenate(parts)

    def step_samples(self, epoch: int, step: int) -> np.ndarray:
        """Sample indices of global step `step` of `epoch`: a function of (seed, epoch, step)."""
        if self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = (epoch, rng.permutation(self.epoch_samples(epoch)))
        return self._order[1][step * self.cfg.batch_size:(step + 1) * self.cfg.batch_size]

    def plan(self, epoch: int, step: int) -> list[list[list[int]]]:
        """[rank][micro-step] -> sample indices, the same on every rank. Uses the fewest micro-steps
        m that balancing fits into world_size * m bins of the cap; bin b goes to rank
        b % world_size."""
        idx = self.step_samples(epoch, step)
        lens, R = self.lengths[idx], self.world_size
        m = max(1, math.ceil(lens.sum() / (R * self.cfg.max_tokens_per_rank)))  # the lower bound
        while (bins := _balance(lens, R * m, self.cfg.max_tokens_per_rank)) is None:
            m += 1
        return [[[int(idx[i]) for i in bins[b]] for b in range(r, R * m, R)] for r in range(R)]

    def observe(self, epoch: int, samples: np.ndarray, losses: np.ndarray) -> dict:
        """The mean loss of each sample of the step of `epoch` just trained (`samples` unique), on
        every rank alike; returns metrics of the sampler to log with the step. This plan uses none;
        a loss-driven sampler keeps them in the state it checkpoints
        (forks/loss_prioritized_sampler.patch)."""
        return {}

    def state_dict(self) -> dict:
        """What the plan learned in the run (JSON types), saved with every checkpoint: none here."""
        return {}

    def load_state_dict(self, state: dict):
        """Restores `state_dict()` on resume, before the loop asks for the schedule."""


Sample = tuple[np.ndarray, np.ndarray]  # (input_ids, loss_mask), as the token cache holds them


def targets(samples: list[Sample]) -> tuple[np.ndarray, np.ndarray, np.ndarray, None]:
    """The one definition of what is trained, for [(input_ids, loss_mask)] packed into one row:
    (positions that have a target, their target ids, the sample of each target, per-target weights,
    None for all 1). Position i of a sample predicts its token i + 1 where that token's loss_mask is
    set; a sample's last position predicts nothing, so nothing is predicted across a boundary.
    `collate` builds every micro-batch from it, and the loop normalizes each step by it over the
    whole step (`step_targets`): return weights for a per-token-weighted loss."""
    ids, mask = np.concatenate([s[0] for s in samples]), np.concatenate([s[1] for s in samples])
    ends = np.cumsum([len(s[0]) for s in samples])
    predicts = np.append(mask[1:] > 0, False)
    predicts[ends - 1] = False
    pos = np.flatnonzero(predicts)
    return pos, ids[pos + 1].astype(np.int64), np.searchsorted(ends, pos, side="right"), None


def step_targets(samples: list[Sample]) -> tuple[np.ndarray, np.ndarray, float]:
    """(targets of each sample, their total weight per sample, the step's total weight N_step) of a
    whole step, all ranks: the loss normalizer, known without communication because every rank has
    the plan."""
    _, _, seg, weight = targets(samples)
    counts = np.bincount(seg, minlength=len(samples))
    weights = counts.astype(np.float64) if weight is None else np.bincount(seg, weight, len(counts))
    return counts, weights, float(weights.sum())


def collate(samples: list[tuple[np.ndarray, np.ndarray]], device: torch.device) -> dict:
    """[(input_ids, loss_mask)] -> one padding-free packed row: input_ids and position_ids
    (restarting at 0 per sample) of shape (1, T); cu_seqlens (int32 offsets) and max_seqlen for
    varlen kernels; and `targets`' loss_idx, targets, loss_seg (the sample of each target) and
    loss_weight (None: all 1), computed here on the host so the loss needs no device sync. An empty
    micro-batch becomes one untrained token."""
    if not samples:
        samples = [(np.zeros(1, np.int32), np.zeros(1, np.uint8))]
    lens = [len(s[0]) for s in samples]
    loss_idx, tgt, seg, weight = targets(samples)
    ids = np.concatenate([s[0] for s in samples]).astype(np.int64)
    batch = {"input_ids": torch.from_numpy(ids)[None],
             "position_ids": torch.cat([torch.arange(n) for n in lens])[None],
             "cu_seqlens": torch.tensor(np.cumsum([0] + lens), dtype=torch.int32),
             "loss_idx": torch.from_numpy(loss_idx), "targets": torch.from_numpy(tgt),
             "loss_seg": torch.from_numpy(seg)}
    if weight is not None:
        batch["loss_weight"] = torch.from_numpy(weight.astype(np.float32))
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return batch | {"max_seqlen": max(lens)}


def step_stats(step_plan: list[list[list[int]]], lengths: np.ndarray, cap: int) -> dict:
    """Real tokens, micro-steps, packing efficiency (tokens / (micro-steps x cap x ranks)) and rank
    imbalance (max / mean tokens per rank) of one step's plan."""
    per_rank = [sum(int(lengths[i]) for mb in r for i in mb) for r in step_plan]
    tokens, micro = sum(per_rank), len(step_plan[0])
    efficiency = tokens / (micro * cap * len(step_plan))
    return {"tokens": tokens, "micro_steps": micro, "packing_efficiency": efficiency,
            "rank_imbalance": max(per_rank) / (tokens / len(step_plan))}


def plan_stats(plan: MultipackPlan, epoch: int = 0) -> dict:
    """Statistics of one epoch's plan, for sizing batches for a cluster without running it."""
    cap, R = plan.cfg.max_tokens_per_rank, plan.world_size
    steps = plan.steps_in_epoch(epoch)
    stats = [step_stats(plan.plan(epoch, k), plan.lengths, cap) for k in range(steps)]
    # the fewest micro-steps any plan could use: ceil(step tokens / (ranks x cap))
    bound = [math.ceil(s["tokens"] / (R * cap)) for s in stats]
    return {"steps": steps, "micro_steps_mean": float(np.mean([s["micro_steps"] for s in stats])),
            "micro_steps_lower_bound_mean": float(np.mean(bound)),
            "packing_efficiency": float(np.mean([s["packing_efficiency"] for s in stats])),
            "rank_imbalance_max": float(max(s["rank_imbalance"] for s in stats))}


def main(argv: list[str]):
    from tokenize_data import TokenCache, build_cache, load_tokenizer, sources

    world_size = 1
    if "--world-size" in argv:
        i = argv.index("--world-size")
        world_size, argv = int(argv[i + 1]), argv[:i] + argv[i + 2:]
    cfg = config.cli(argv, ("data", "model", "sampler", "train"))
    cache = TokenCache(build_cache(cfg.data.train_files, load_tokenizer(cfg.model.path), cfg.data))
    weights = [s.weight for s in sources(cfg.data.train_files)]
    plan = MultipackPlan(cache.lengths, cfg.sampler, world_size, cfg.train.seed, cache.source,
                         weights)
    print(json.dumps(plan_stats(plan)))


if __name__ == "__main__":
    main(sys.argv[1:])
