"""Every model family trains its own loss exactly: our packed row against the family's own forward of each sample
alone (transformers' eager attention, its own *ForCausalLM head), on tiny random models, fp32."""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM

import model_setup
import sampler

SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MOE = dict(num_local_experts=4, num_experts_per_tok=2)
MAMBA = dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=4)
# family -> (model_type, what differs from SHAPE); what each one tests beyond a Llama: in the comment
FAMILIES = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),  # q/k/v biases
    "qwen3": ("qwen3", dict(head_dim=8)),  # q/k norms
    "qwen3-moe": ("qwen3_moe", dict(head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "mistral": ("mistral", dict(sliding_window=5)),  # sliding window shorter than samples
    "mixtral": ("mixtral", MOE),
    "phi3": ("phi3", {}),  # fused qkv
    "olmo2": ("olmo2", {}),  # post-norms
    "olmo3": ("olmo3", dict(sliding_window=5)),
    "granite": ("granite", dict(logits_scaling=4.0)),  # logits divided
    "gemma2": ("gemma2", dict(head_dim=8, sliding_window=5)),  # attention and final logit soft-caps
    "gemma3": ("gemma3_text", dict(head_dim=8, sliding_window=5)),
    "smollm3": ("smollm3", dict(no_rope_layer_interval=2)),  # layers without RoPE
    "deepseek-v3": ("deepseek_v3", dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
                                        v_head_dim=8, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                                        topk_group=1, moe_intermediate_size=32, first_k_dense_replace=1)),  # MLA
    "glm4": ("glm4", {}),
    "exaone4": ("exaone4", dict(sliding_window=5)),
    "gpt-oss": ("gpt_oss", dict(head_dim=8, sliding_window=5, **MOE)),  # attention sinks
    "cohere2": ("cohere2", dict(logit_scale=0.5, sliding_window=5)),  # logits multiplied
    # hybrids: layers that carry a state along the row, trained one sample per row on CPU
    "granite-4-hybrid": ("granitemoehybrid", dict(layer_types=["mamba", "attention"], shared_intermediate_size=32,
                                                  **MAMBA, **MOE)),  # Mamba-2
    "bamba": ("bamba", dict(attn_layer_indices=[1], **MAMBA)),
    "falcon-h1": ("falcon_h1", dict(head_dim=8, mamba_d_ssm=64, **MAMBA)),  # Mamba-2 beside attention
    "jamba": ("jamba", dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                            num_experts=4, num_experts_per_tok=2, mamba_d_state=8)),  # Mamba-1
    "nemotron-h": ("nemotron_h", dict(hybrid_override_pattern="M*", mamba_num_heads=4, mamba_head_dim=16,
                                      ssm_state_size=8, chunk_size=4, n_groups=1, head_dim=8)),
    "lfm2": ("lfm2", dict(layer_types=["conv", "full_attention"])),  # short convolution
    "minimax": ("minimax", dict(layer_types=["linear_attention", "full_attention"], head_dim=8, block_size=4,
                                **MOE)),  # lightning (linear) attention
    "qwen3-next": ("qwen3_next", dict(layer_types=["linear_attention", "full_attention"], head_dim=8,
                                      linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
                                      linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2,
                                      moe_intermediate_size=32, shared_expert_intermediate_size=32)),  # gated delta
}
HYBRIDS = ["granite-4-hybrid", "bamba", "falcon-h1", "jamba", "nemotron-h", "lfm2", "minimax", "qwen3-next"]
LENGTHS = [7, 3, 12, 5, 12]  # longer than the sliding window and the Mamba chunk, two of equal length


def config(name: str, **extra):
    model_type, fields = FAMILIES[name]
    return AutoConfig.for_model(model_type, **SHAPE | fields | extra)


def models(name: str, device: torch.device = torch.device("cpu"), **extra) -> tuple[model_setup.PackedCausalLM,
                                                                                   torch.nn.Module]:
    """The same random weights twice: ours (packed attention, on `device`) and the family's own (eager attention)."""
    AttentionInterface.register("packed", model_setup.packed_attention)  # as load_model does
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(config(name, **extra), attn_implementation="eager", dtype=torch.float32)
    ours = AutoModelForCausalLM.from_config(config(name, **extra), attn_implementation="packed", dtype=torch.float32)
    ours.load_state_dict(ref.state_dict())
    return model_setup.PackedCausalLM(ours.to(device), device=device), ref


def samples(n: int = len(LENGTHS)) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [(rng.integers(3, 64, k).astype(np.int32), (rng.random(k) < 0.6).astype(np.uint8)) for k in LENGTHS[:n]]


def batch_of(samples_: list) -> dict:
    batch = sampler.collate(samples_, torch.device("cpu"))
    del batch["loss_seg"]  # the loop's, not the model's
    return batch


def own_loss(ref: torch.nn.Module, samples_: list) -> torch.Tensor:
    """The family's own loss, summed over the trained tokens, each sample alone: its logits (its head's scaling and
    soft-capping included), F.cross_entropy on the next tokens where the mask says."""
    total = 0.0
    for ids, mask in samples_:
        ids = torch.from_numpy(ids).long()
        logits = ref(input_ids=ids[None]).logits[0, :-1]
        targets = torch.where(torch.from_numpy(mask[1:]).bool(), ids[1:], -100)
        total = total + F.cross_entropy(logits, targets, reduction="sum", ignore_index=-100)
    return total


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("name", FAMILIES)
def test_packed_loss_and_gradients_equal_the_familys_own(name):
    """fp32, <= 1e-5 relative: the loss, and every parameter's gradient (relative to its largest entry)."""
    ours, ref = models(name)
    assert ours.packs == (name not in HYBRIDS)  # on CPU, hybrids get one sample per row
    out = ours(**batch_of(samples()))
    out["loss"].backward()
    expected = own_loss(ref, samples())
    expected.backward()
    assert relative(out["loss"], expected) <= 1e-5
    assert len(out["token_losses"]) == sum(int(m[1:].sum()) for _, m in samples())
    assert not out["token_losses"].requires_grad
    torch.testing.assert_close(out["token_losses"].sum(), out["loss"].detach())
    for (key, p), q in zip(ours.lm.named_parameters(), ref.parameters()):
        if q.grad is not None and q.grad.any():
            assert relative(p.grad, q.grad) <= 1e-5, key


@pytest.mark.parametrize("name", ["mixtral", "qwen3-moe", "gpt-oss", "granite-4-hybrid"])
def test_router_aux_loss_is_the_familys_over_the_same_tokens(name):
    """output_router_logits: true. One micro-batch is the family's batch: its loss (mean token loss + coef * aux over
    the real tokens of a right-padded batch) equals ours divided by the trained tokens; the term is reported."""
    ours, ref = models(name, output_router_logits=True, router_aux_loss_coef=0.1)
    samples_ = samples()
    batch = batch_of(samples_)
    out = ours(**batch)
    n = len(batch["targets"])
    lens = [len(s[0]) for s in samples_]
    ids = torch.zeros(len(lens), max(lens), dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, (tokens, trained) in enumerate(samples_):
        ids[i, :len(tokens)] = torch.from_numpy(tokens)
        labels[i, :len(tokens)] = torch.where(torch.from_numpy(trained).bool(), ids[i, :len(tokens)], -100)
        mask[i, :len(tokens)] = 1
    theirs = ref(input_ids=ids, attention_mask=mask, labels=labels)
    assert relative(out["loss"] / n, theirs.loss) <= 1e-5
    assert relative(out["terms"]["router_aux_loss"] / n, 0.1 * theirs.aux_loss) <= 1e-5
    assert out["terms"]["router_aux_loss"] > 0


@pytest.mark.parametrize("name", ["gpt-oss", "cohere2", "granite-4-hybrid", "qwen3-next"])
def test_self_check_passes_on_the_families_that_failed(name):
    ours, _ = models(name)
    line = model_setup.self_check(ours, batch_of(samples()), "float32")
    assert float(re.search(r"within (\S+) ", line)[1]) <= 1e-5, line


def test_self_check_refuses_a_family_made_wrong():
    """The two silent bugs this check exists for, made on purpose: Cohere2 with its logit_scale forgotten, gpt-oss
    with its attention sinks ignored."""
    ours, _ = models("cohere2")
    ours.scale = 1.0
    with pytest.raises(ValueError, match=r"cohere2: a packed row of \d+ of the run's samples differs"):
        model_setup.self_check(ours, batch_of(samples()), "float32")
    ours, _ = models("gpt-oss")
    AttentionInterface.register("packed", lambda *args, s_aux=None, **kw: model_setup.packed_attention(*args, **kw))
    with pytest.raises(ValueError, match="gpt_oss: a packed row"):
        model_setup.self_check(ours, batch_of(samples()), "float32")


def family_dir(tmp_path, name: str, **extra) -> str:
    """A model directory of a tiny `name` (random_init) with the quickstart tokenizer."""
    import shutil

    from conftest import QS_MODEL

    path = tmp_path / name
    shutil.copytree(QS_MODEL, path)
    config(name, vocab_size=334, **extra).save_pretrained(path)
    return str(path)


def test_the_trainer_refuses_a_wrong_family_in_one_line(tmp_path, small_data, monkeypatch):
    """Cohere2 with its logit scale forgotten (as before this check): one `error:` line naming the family, the
    difference and the way out; no step is trained."""
    from conftest import in_process, run_args

    monkeypatch.setattr(model_setup, "_logit_modifiers", lambda c: (1.0, None))
    args = run_args(tmp_path, small_data, **{"model.path": family_dir(tmp_path, "cohere2", logit_scale=0.25),
                                             "sharding.strategy": "none"})
    with pytest.raises(AssertionError) as exit_:
        in_process(args)
    message = str(exit_.value).splitlines()[0]
    assert message.startswith("train.py exited with \"error: model cohere2: a packed row of 4 of the run's samples")
    assert "float32 allows 1e-04" in message and "model.self_check: false" in message
    assert not (tmp_path / "run/metrics.jsonl").exists()


def test_a_hybrid_moe_trains_one_sample_per_row_and_logs_its_router_loss(tmp_path, small_data):
    """Granite-4 (Mamba-2 + attention + MoE) end to end on CPU: start-up says it trains one sample per row and
    which packages would pack it, the self-check passes, and the router aux loss is its own metric."""
    from conftest import in_process, metrics, run_args

    path = family_dir(tmp_path, "granite-4-hybrid", output_router_logits=True, router_aux_loss_coef=0.01)
    p = in_process(run_args(tmp_path, small_data, **{"model.path": path, "sharding.strategy": "none",
                                                     "train.max_steps": 2}))
    assert "training one sample per row" in p.stdout and "mamba-ssm" in p.stdout
    assert "self-check: granitemoehybrid" in p.stdout
    rows = metrics(tmp_path / "run")
    assert all(m["router_aux_loss"] > 0 and np.isfinite(m["loss"]) for m in rows)
