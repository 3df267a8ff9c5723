"""Packed attention and the chunked loss against transformers' own unpacked computation (every family's loss and
gradients: test_families.py)."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

import model_setup
import sampler

SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
CONFIGS = {
    "llama": LlamaConfig(**SHAPE),
    "qwen2": Qwen2Config(**SHAPE),
    "mistral-sliding-window": MistralConfig(**SHAPE, sliding_window=5),
    "gemma2-softcap-sliding": Gemma2Config(**SHAPE, head_dim=8, sliding_window=5, attn_logit_softcapping=5.0,
                                           final_logit_softcapping=3.0),
}
LENGTHS = [7, 3, 12, 5, 12]  # several samples longer than the sliding window, two of equal length


def models(name):
    """The same random weights twice: ours (packed attention) and transformers' eager reference."""
    from transformers import AttentionInterface

    AttentionInterface.register("packed", model_setup.packed_attention)  # as load_model does
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(CONFIGS[name]), attn_implementation="eager",
                                           dtype=torch.float32)
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(CONFIGS[name]), attn_implementation="packed",
                                            dtype=torch.float32)
    ours.load_state_dict(ref.state_dict())
    return model_setup.PackedCausalLM(ours), ref


def samples(vocab=64):
    g = torch.Generator().manual_seed(1)
    out = []
    for n in LENGTHS:
        ids = torch.randint(1, vocab, (n,), generator=g).numpy().astype("int32")
        mask = (torch.rand(n, generator=g) < 0.6).numpy().astype("uint8")
        out.append((ids, mask))
    return out


def assert_packed_equals_per_sample(name: str, device: torch.device, atol: float, rtol: float):
    """Hidden states of one packed row (ours) == transformers' eager forward of each sample alone."""
    ours, ref = (m.to(device) for m in models(name))
    batch = sampler.collate(samples(), device)
    hidden = ours.lm.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                   cu_seq_lens_q=batch["cu_seqlens"], max_length_q=batch["max_seqlen"]
                                   ).last_hidden_state[0]
    bounds = batch["cu_seqlens"].tolist()
    for (ids, _), a, b in zip(samples(), bounds[:-1], bounds[1:]):
        expected = ref.get_decoder()(input_ids=torch.from_numpy(ids).long()[None].to(device)).last_hidden_state[0]
        torch.testing.assert_close(hidden[a:b], expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("name", CONFIGS)
def test_packed_hidden_states_equal_per_sample(name):
    assert_packed_equals_per_sample(name, torch.device("cpu"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("scale,softcap,weighted", [(1.0, None, False), (0.25, None, True), (1.0, 3.0, True)])
def test_chunked_loss_equals_the_plain_one(scale, softcap, weighted):
    """model.loss chunked (fused, gradients in forward) == plain (the readable one a fork edits): values, token
    losses and gradients, fp32, <= 1e-6; with softcap and scale (Gemma-2, Granite) and per-token weights."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g, requires_grad=True)
    batch = {"loss_idx": torch.tensor([0, 3, 4, 10, 11, 12, 30, 49]), "targets": torch.randint(0, 40, (8,), generator=g)}
    if weighted:
        batch["loss_weight"] = torch.rand(8, generator=g) * 2
    plain, plain_tokens = model_setup.compute_loss(hidden, weight, batch, scale, softcap)
    fused, fused_tokens = model_setup.compute_loss_chunked(hidden, weight, batch, scale, softcap, chunk=3)
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fused_tokens, plain_tokens, atol=1e-6, rtol=1e-6)
    for a, b in zip(torch.autograd.grad(fused, (hidden, weight)), torch.autograd.grad(plain, (hidden, weight))):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_weights_of_one_reproduce_the_unweighted_loss_exactly():
    ours, _ = models("llama")
    batch = sampler.collate(samples(), torch.device("cpu"))
    del batch["loss_seg"]
    out = ours(**batch)
    ones = ours(**batch | {"loss_weight": torch.ones(len(batch["targets"]))})
    assert torch.equal(out["loss"], ones["loss"]) and torch.equal(out["token_losses"], ones["token_losses"])


def test_empty_micro_batch_has_zero_loss_but_reaches_every_parameter():
    ours, _ = models("llama")
    batch = sampler.collate([], torch.device("cpu"))
    del batch["loss_seg"]
    out = ours(**batch)
    out["loss"].backward()
    assert len(out["token_losses"]) == 0 and out["loss"].item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in ours.parameters())


def test_selective_activation_checkpointing_gives_identical_gradients():
    """model.gradient_checkpointing with checkpoint_every: 2 recomputes blocks 0 and 2 only; loss and every
    gradient are bit-identical to no checkpointing (and to checkpointing every block)."""
    from config import ModelConfig
    from conftest import QS_MODEL

    grads = {}
    for name, kw in {"none": {}, "every": {"gradient_checkpointing": True},
                     "every_2": {"gradient_checkpointing": True, "checkpoint_every": 2}}.items():
        torch.manual_seed(0)
        model = model_setup.load_model(ModelConfig(path=QS_MODEL, random_init=True, dtype="float32", **kw),
                                       torch.device("cpu"))
        model.train()
        flags = [b.gradient_checkpointing for b in model.lm.get_decoder().layers]
        assert flags == {"none": [False] * 4, "every": [True] * 4, "every_2": [True, False, True, False]}[name]
        batch = sampler.collate(samples(), torch.device("cpu"))
        del batch["loss_seg"]
        loss = model(**batch)["loss"]
        loss.backward()
        grads[name] = [loss.detach()] + [p.grad for p in model.parameters()]
    for name in ("every", "every_2"):
        assert all(torch.equal(a, b) for a, b in zip(grads["none"], grads[name])), name


def random_batch(rng: np.random.Generator, max_len: int, device: torch.device) -> dict:
    """The model's input for 1 to 5 random samples of 5 to `max_len` tokens (ids below 300), ~60% of them trained."""
    samples_ = [(rng.integers(1, 300, n).astype(np.int32), (rng.random(n) < 0.6).astype(np.uint8))
                for n in rng.integers(5, max_len, rng.integers(1, 6))]
    batch = sampler.collate(samples_, device)
    del batch["loss_seg"]  # the loop's, not the model's
    return batch


def test_compiled_blocks_give_the_eager_losses_and_stop_compiling():
    """model.compile on vs off over 20 micro-batches of different lengths: the same losses and gradients (fp32), and
    no new graph after the first lengths (dynamic shapes). Dynamo's eager backend (conftest) captures the graphs
    inductor would compile, without generating kernels (seconds instead of a minute on this CPU). With LoRA and
    activation checkpointing under FSDP2: test_sharding.py (fsdp2_compile_checkpointing_lora)."""
    import torch._dynamo

    from config import ModelConfig
    from conftest import QS_MODEL

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # graphs compiled by earlier tests in this process
    rng = np.random.default_rng(0)
    batches = [random_batch(rng, 60, torch.device("cpu")) for _ in range(20)]
    runs = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = model_setup.load_model(ModelConfig(path=QS_MODEL, random_init=True, dtype="float32", compile=compiled),
                                       torch.device("cpu"))
        model.train()
        losses, graphs = [], []
        for batch in batches:
            loss = model(**batch)["loss"]
            loss.backward()
            losses.append(loss.detach())
            graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        runs[compiled] = losses, [p.grad for p in model.parameters() if p.grad is not None]
    for a, b in zip(runs[False][0], runs[True][0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(runs[False][1], runs[True][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # compiled while the first lengths were seen, then reused: two per block's code (before and after the
    # attention) and its backward
    assert 0 < graphs[2] == graphs[-1] <= 4, graphs


def test_an_edit_to_token_loss_changes_the_default_run(tmp_path, small_data, monkeypatch):
    """The fused default (model.loss: chunked) takes its gradient from autograd through `token_loss`: an edit to
    that one function changes the default run (weights of 2: the first step's loss doubles), and with another edit
    (label smoothing, a scale and a soft-cap) the fused path still equals the plain one, values and gradients."""
    from conftest import in_process, metrics, run_args

    runs = {}
    shipped = model_setup.token_loss
    for name in ("as shipped", "edited"):
        if name == "edited":
            monkeypatch.setattr(model_setup, "token_loss", lambda logits, targets, w: 2 * shipped(logits, targets, w))
        in_process(run_args(tmp_path / name, small_data, **{"sharding.strategy": "none", "train.max_steps": 1}))
        runs[name] = metrics(tmp_path / name / "run")[0]["loss"]
    assert runs["edited"] == pytest.approx(2 * runs["as shipped"], rel=1e-6)

    def smoothed(logits, targets, weight):
        losses = F.cross_entropy(logits, targets, reduction="none", label_smoothing=0.1)
        return losses if weight is None else losses * weight

    monkeypatch.setattr(model_setup, "token_loss", smoothed)
    g = torch.Generator().manual_seed(0)
    hidden, weight = (torch.randn(n, 16, generator=g, requires_grad=True) for n in (50, 40))
    batch = {"loss_idx": torch.arange(0, 50, 3), "targets": torch.randint(0, 40, (17,), generator=g)}
    plain, _ = model_setup.compute_loss(hidden, weight, batch, 0.5, 3.0)
    fused, _ = model_setup.compute_loss_chunked(hidden, weight, batch, 0.5, 3.0, chunk=4)
    logits = torch.tanh((hidden[batch["loss_idx"]] @ weight.t()) * 0.5 / 3.0) * 3.0
    torch.testing.assert_close(fused, smoothed(logits, batch["targets"], None).sum(), atol=1e-5, rtol=1e-6)
    for a, b in zip(torch.autograd.grad(fused, (hidden, weight)), torch.autograd.grad(plain, (hidden, weight))):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
