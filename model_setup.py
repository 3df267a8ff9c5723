"""Model loading and the two modifications that make packed training exact and cheap:

- `packed_attention`, registered with transformers' attention interface as "packed", so any HF causal LM attends
  only within each sample of a packed row (no dense T x T mask);
- `compute_loss`, a chunked cross-entropy over supervised positions only, so the (tokens, vocab) logits are
  never held at once.

`load_model` wraps the HF model in `PackedCausalLM`, whose forward returns (loss_sum, n_targets): FSDP2 and
DeepSpeed then see one module that owns every parameter the loss touches.
"""

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelConfig:
    path: str = ""  # HF model directory (config, tokenizer, weights) or hub id
    random_init: bool = False  # true: build the architecture from `path`'s config with random weights
    dtype: Literal["float32", "bfloat16"] = "bfloat16"  # dtype of the weights as loaded
    # "packed": ours (per-sample attention on packed rows); the others are transformers' own, for comparison
    attn_implementation: Literal["packed", "sdpa", "eager", "flash_attention_2"] = "packed"
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute


def _sdpa_per_sample(query, key, value, bounds, scaling, dropout, window, softcap):
    """(1, H, T, D) tensors, bounds = cu_seqlens as a list -> (1, T, H, D). Causal attention within each sample,
    never across a boundary, without a T x T mask: samples of equal length are stacked into one SDPA call
    (exact, no padding). A mask of a sample's own size is built only for a sliding window shorter than the
    sample or for logit soft-capping (Gemma-2)."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: share each K/V head among `groups` query heads
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    out = torch.empty_like(query)
    by_len: dict[int, list[int]] = {}
    for a, b in zip(bounds[:-1], bounds[1:]):
        by_len.setdefault(b - a, []).append(a)
    for L, starts in by_len.items():
        pos = (torch.tensor(starts)[:, None] + torch.arange(L)).flatten().to(query.device)  # (n * L,)
        q, k, v = (x[0][:, pos].unflatten(1, (len(starts), L)).transpose(0, 1) for x in (query, key, value))
        if softcap is None and (window is None or L <= window):  # (n, H, L, D)
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling)
        else:
            i = torch.arange(L, device=q.device)
            allowed = i[None, :] <= i[:, None]  # (L, L) causal
            if window is not None:  # as transformers: the last `window` tokens, self included
                allowed &= i[None, :] > i[:, None] - window
            scores = (q @ k.transpose(-1, -2)).float() * scaling
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            o = F.dropout(scores.masked_fill(~allowed, float("-inf")).softmax(-1).to(v.dtype), dropout) @ v
        out[0][:, pos] = o.transpose(0, 1).flatten(1, 2)
    return out.transpose(1, 2)


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                     softcap=None, **kwargs):
    """transformers attention-interface signature. Reads the sample boundaries from the `cu_seq_lens_q` and
    `max_length_q` kwargs (the names transformers' flash-attention path uses) that `PackedCausalLM` passes."""
    if "cu_seq_lens_q" not in kwargs:
        raise ValueError("packed attention needs the sample boundaries (cu_seq_lens_q); call the model through "
                         "PackedCausalLM, or load it with attn_implementation='sdpa' to generate")
    cu, max_len = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    dropout = dropout if module.training else 0.0
    if query.is_cuda and softcap is None and dropout == 0.0 and hasattr(torch.nn.attention, "varlen"):
        from torch.nn.attention.varlen import varlen_attn

        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, H, D)
        window = (sliding_window - 1, 0) if sliding_window else (-1, 0)  # (-1, 0) = causal
        out = varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scaling, window_size=window,
                          enable_gqa=q.shape[1] != k.shape[1])
        return out.unsqueeze(0), None
    return _sdpa_per_sample(query, key, value, cu.tolist(), scaling, dropout, sliding_window, softcap), None


def _ce_sum(h, weight, targets, scale: float, softcap: float | None):
    logits = (h @ weight.t()).float() * scale  # (chunk, V), fp32 for a stable log-softmax
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def compute_loss(hidden: torch.Tensor, weight: torch.Tensor, loss_idx: torch.Tensor, targets: torch.Tensor,
                 scale: float = 1.0, softcap: float | None = None, chunk: int = 2048) -> tuple[torch.Tensor, int]:
    """hidden (T, H) after the final norm, weight (V, H) of the output layer, loss_idx (S,) positions that have a
    target, targets (S,) -> (sum of the S token losses, S). Each chunk's logits are recomputed in backward
    (activation checkpointing), so at most (chunk, V) logits exist at a time."""
    h = hidden.index_select(0, loss_idx)  # (S, H)
    S = targets.numel()
    if S == 0:  # an empty micro-batch: a zero that still reaches every parameter, so backward runs everywhere
        return hidden.sum() * 0.0 + weight.sum() * 0.0, 0
    total = 0.0
    for a in range(0, S, chunk):
        total = total + checkpoint(_ce_sum, h[a:a + chunk], weight, targets[a:a + chunk], scale, softcap,
                                   use_reentrant=False)
    return total, S


class PackedCausalLM(nn.Module):
    """The HF model plus our loss; `lm` is the unchanged transformers (or peft) model."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, position_ids, cu_seqlens, max_seqlen: int, loss_idx, targets):
        hidden = self.lm.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                       cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens,
                                       max_length_q=max_seqlen, max_length_k=max_seqlen).last_hidden_state
        c = self.lm.config
        # Output-logit modifiers some families apply in their *ForCausalLM.forward, which we bypass:
        # Granite divides the logits by `logits_scaling`, Gemma-2 soft-caps them.
        scale = 1.0 / getattr(c, "logits_scaling", 1.0)
        return compute_loss(hidden[0], self.lm.get_output_embeddings().weight, loss_idx, targets, scale,
                            getattr(c, "final_logit_softcapping", None))


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    if not cfg.path:
        raise ValueError("model.path is empty: set it to an HF model directory (or hub id)")
    tokenizer = AutoTokenizer.from_pretrained(cfg.path)
    if not tokenizer.chat_template:
        raise ValueError(f"{cfg.path}: the tokenizer has no chat template; add `chat_template` to its "
                         "tokenizer_config.json (or chat_template.jinja)")
    return tokenizer


def load_model(cfg: ModelConfig, device: torch.device) -> PackedCausalLM:
    from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM

    AttentionInterface.register("packed", packed_attention)
    dtype = getattr(torch, cfg.dtype)
    if cfg.random_init:
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.path), dtype=dtype,
                                              attn_implementation=cfg.attn_implementation)
    else:
        lm = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype, attn_implementation=cfg.attn_implementation)
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return PackedCausalLM(lm.to(device))
