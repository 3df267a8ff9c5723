"""What docs/forks.md claims of each fork. tests/test_forks.py runs this file in a copy of the repository with
every patch of forks/ applied (each patch changes one stage file, so they apply together)."""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import model_setup  # noqa: E402
import sampler  # noqa: E402
import sharding  # noqa: E402
import tokenize_data  # noqa: E402
import train  # noqa: E402
from config import ModelConfig, TrainConfig  # noqa: E402

QS_MODEL = str(ROOT / "data/quickstart/model")


def quickstart_batch(n: int = 32) -> dict:
    import json

    tok = tokenize_data.load_tokenizer(QS_MODEL)
    samples = []
    for line in (ROOT / "data/quickstart/train.jsonl").read_text().splitlines()[:n]:
        s = tokenize_data.tokenize_sample(json.loads(line), tok)
        samples.append((np.array(s["input_ids"]), (np.array(s["labels"]) != -100).astype(np.uint8)))
    batch = sampler.collate(samples, torch.device("cpu"))
    del batch["loss_seg"]
    return batch


def test_loss_prioritized_sampler_draws_high_loss_samples_more_often():
    """Half the samples have 4x the loss of the other half: they are drawn about 4x as often (sampler.priority 1),
    every rank (each with its own plan, fed the same losses) draws the same steps, a plan restored from another's
    state_dict draws them too, and observe reports the samples not trained yet; priority 0 draws uniformly."""
    cfg = sampler.SamplerConfig(batch_size=20, max_tokens_per_rank=1000)
    ranks = [sampler.MultipackPlan(np.full(200, 10), cfg, 2, seed=0) for _ in range(2)]
    visits = np.zeros(200)
    for p in ranks:
        assert p.observe(0, np.arange(150), np.where(np.arange(150) < 100, 2.0, 0.5)) == {"samples_unseen": 50}
        p.observe(0, np.arange(150, 200), np.full(50, 0.5))
    restored = sampler.MultipackPlan(np.full(200, 10), cfg, 2, seed=0)
    restored.load_state_dict(json.loads(json.dumps(ranks[0].state_dict())))
    for step in range(100):
        epoch, k = ranks[0].position(step)
        assert ranks[0].plan(epoch, k) == ranks[1].plan(epoch, k) == restored.plan(epoch, k)
        np.add.at(visits, ranks[0].step_samples(epoch, k), 1)
    assert visits[:100].sum() / visits[100:].sum() > 3
    uniform = sampler.MultipackPlan(np.full(200, 10), sampler.SamplerConfig(batch_size=20, priority=0.0), 2, seed=0)
    uniform.load_state_dict(ranks[0].state_dict())
    visits = np.zeros(200)
    for step in range(100):
        np.add.at(visits, uniform.step_samples(*uniform.position(step)), 1)
    assert 0.8 < visits[:100].sum() / visits[100:].sum() < 1.25


def test_sign_compressed_gradients_send_int8_signs_and_one_scale(monkeypatch):
    dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    sent = []
    all_reduce, reduce_scatter = dist.all_reduce, sharding._reduce_scatter
    monkeypatch.setattr(dist, "all_reduce", lambda t, **kw: sent.append((t.dtype, t.numel())) or all_reduce(t, **kw))
    monkeypatch.setattr(sharding, "_reduce_scatter",
                        lambda o, t, **kw: sent.append((t.dtype, t.numel())) or reduce_scatter(o, t, **kw))
    g = torch.randn(1000)
    expected = torch.sign(g) * g.abs().mean()
    flat = g.clone()
    sharding.combine_gradients(flat, None, None)  # `none`: all-reduced in place
    out = torch.empty(1000)
    sharding.combine_gradients(g.clone(), out, None)  # FSDP2: reduce-scattered into this rank's shard
    dist.destroy_process_group()
    torch.testing.assert_close(flat, expected)
    torch.testing.assert_close(out, expected)
    assert sorted(map(str, sent)) == sorted(map(str, [(torch.float32, 1), (torch.int8, 1000)] * 2))  # 1/4 of fp32


def test_muon_orthogonalizes_the_update_of_each_decoder_matrix():
    torch.manual_seed(0)
    model = model_setup.load_model(ModelConfig(path=QS_MODEL, random_init=True, dtype="float32"), torch.device("cpu"))
    muon, adamw = train.build_optimizer(model, TrainConfig(lr=0.02))
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert in_muon == {n for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n and "lm_head" not in n}
    assert in_muon and all("proj" in n for n in in_muon)
    batch, before = quickstart_batch(), {n: p.detach().clone() for n, p in model.named_parameters()}
    model(**batch)["loss"].backward()
    train.Optimizers([muon, adamw]).step()
    for n, p in model.named_parameters():
        if n in in_muon:  # a whitened update: its largest singular values alike (Newton-Schulz leaves them within
            # ~0.7-1.2; the top quarter, as one small batch's gradient spans only part of a matrix), unlike the gradient's
            spread = [(s[0] / s[len(s) // 4]).item()
                      for s in (torch.linalg.svdvals(p.detach() - before[n]), torch.linalg.svdvals(p.grad))]
            assert spread[0] < 2 < spread[1], (n, spread)


def test_neftune_adds_length_scaled_noise_in_training_only():
    torch.manual_seed(0)
    model = model_setup.load_model(ModelConfig(path=QS_MODEL, random_init=True, dtype="float32"), torch.device("cpu"))
    batch, seen = quickstart_batch(8), []
    model.lm.get_decoder().layers[0].register_forward_pre_hook(
        lambda m, a, kw: seen.append((a[0] if a else kw["hidden_states"])[0].detach()), with_kwargs=True)
    clean = model.lm.get_input_embeddings()(batch["input_ids"])[0]
    model.train()
    model(**batch)
    model.eval()
    model(**batch)
    noisy, plain = seen
    assert torch.equal(plain, clean)  # evaluation: no noise
    bounds, H = batch["cu_seqlens"].tolist(), clean.shape[-1]
    for a, b in zip(bounds[:-1], bounds[1:]):  # each sample: uniform noise up to alpha / sqrt(its length * H)
        limit = model_setup.NEFTUNE_ALPHA / ((b - a) * H) ** 0.5
        largest = (noisy[a:b] - clean[a:b]).abs().max().item()
        assert 0.9 * limit < largest <= limit * (1 + 1e-5)
