"""Model loading and the modifications that make packed training exact and cheap:

- `packed_attention`, registered with transformers' attention interface as "packed", so any HF causal LM attends
  only within each sample of a packed row (no dense T x T mask), attention sinks included;
- the loss over supervised positions only: `token_loss`, the one definition a fork edits, run by `compute_loss`
  (plain) and `compute_loss_chunked` (fused and chunked: the (tokens, vocab) logits are never held at once);
- what a family's own forward adds to its loss (logit modifiers, the MoE router's auxiliary loss), and one sample
  per row for families whose layers carry a state along the row;
- `self_check`: a packed row against the family's own forward, before the first step.

`load_model` wraps the HF model in `PackedCausalLM`, whose forward returns a dict (loss, token_losses, terms): FSDP2
and DeepSpeed then see one module that owns every parameter the loss touches."""

import importlib.util
import inspect
import os
import re
import sys
from functools import cache, partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from config import ModelConfig


def _sdpa_per_sample(query, key, value, bounds, scaling, dropout, window, softcap, sinks):
    """(1, H, T, D) tensors, bounds = cu_seqlens as a list -> (1, T, H, D). Causal attention within each sample,
    never across a boundary, without a T x T mask: samples of equal length are stacked into one SDPA call
    (exact, no padding). A mask of a sample's own size is built only for a sliding window shorter than the
    sample, for logit soft-capping (Gemma-2) or for attention sinks (gpt-oss)."""
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
        if softcap is None and sinks is None and (window is None or L <= window):  # (n, H, L, D)
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling)
        else:
            i = torch.arange(L, device=q.device)
            allowed = i[None, :] <= i[:, None]  # (L, L) causal
            if window is not None:  # as transformers: the last `window` tokens, self included
                allowed &= i[None, :] > i[:, None] - window
            scores = (q @ k.transpose(-1, -2)).float() * scaling
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            scores = scores.masked_fill(~allowed, float("-inf"))
            if sinks is not None:  # one learned logit per head joins each softmax and attends to nothing
                scores = torch.cat([scores, sinks.float()[None, :, None, None].expand(len(starts), -1, L, 1)], -1)
            o = F.dropout(scores.softmax(-1)[..., :L].to(v.dtype), dropout) @ v
        out[0][:, pos] = o.transpose(0, 1).flatten(1, 2)
    return out.transpose(1, 2)


@cache
def _varlen_kernels():
    """(flash-attn's varlen function, PyTorch's `varlen_attn` where it takes a scale, a window and grouped-query
    heads (torch >= 2.10)), None for one that is absent. Looked up once: Python does not cache a failed import, and
    this is asked in every attention call."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        flash_attn_varlen_func = None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        varlen_attn = None
    if varlen_attn is not None and "enable_gqa" not in inspect.signature(varlen_attn).parameters:
        varlen_attn = None
    return flash_attn_varlen_func, varlen_attn


def _varlen_cuda(query, key, value, cu, max_len, scaling, window, softcap):
    """A varlen flash kernel on (1, H, T, D) 16-bit CUDA tensors -> (1, T, H, D), or None if none applies (fp32,
    or no kernel): flash-attn (FA2/FA3 builds; supports soft-capping) when installed, else PyTorch's own."""
    if query.dtype not in (torch.float16, torch.bfloat16):
        return None
    flash_attn_varlen_func, varlen_attn = _varlen_kernels()
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, H, D)
    if flash_attn_varlen_func is not None:
        return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, softmax_scale=scaling, causal=True,
                                      window_size=(window - 1, 0) if window else (-1, -1),
                                      softcap=softcap or 0.0).unsqueeze(0)
    if softcap is None and varlen_attn is not None:
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scaling, enable_gqa=q.shape[1] != k.shape[1],
                           window_size=(window - 1, 0) if window else (-1, 0)).unsqueeze(0)  # (-1, 0) = causal
    return None


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                     softcap=None, s_aux=None, **kwargs):
    """transformers attention-interface signature. Reads the sample boundaries from the `cu_seq_lens_q` and
    `max_length_q` kwargs (the names transformers' flash-attention path uses) that `PackedCausalLM` passes.
    `s_aux`: gpt-oss's attention sinks (H,). No varlen kernel here takes them, and correcting a kernel's output by
    its log-sum-exp would not be exact in backward (neither flash-attn nor PyTorch's varlen kernel differentiates
    its LSE output), so rows with sinks take the per-sample path, on CUDA too."""
    if "cu_seq_lens_q" not in kwargs:
        raise ValueError("packed attention needs the sample boundaries (cu_seq_lens_q); call the model through "
                         "PackedCausalLM, or load it with attn_implementation='sdpa' to generate")
    cu, max_len = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    dropout = dropout if module.training else 0.0
    if query.is_cuda and dropout == 0.0 and s_aux is None:
        out = _varlen_cuda(query, key, value, cu, max_len, scaling, sliding_window, softcap)
        if out is not None:
            return out, None
    return _sdpa_per_sample(query, key, value, cu.tolist(), scaling, dropout, sliding_window, softcap, s_aux), None


def token_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """The loss, plainly: logits (S, V) of the supervised positions in fp32, the family's modifiers applied,
    targets (S,), per-token weights (S,) or None -> the (S,) weighted token losses. The one definition that every
    loss path runs (compute_loss, and compute_loss_chunked chunk by chunk, which takes its gradient from autograd):
    edit it for another loss (label smoothing, a z-loss, focal weights) and every run trains that."""
    losses = F.cross_entropy(logits, targets, reduction="none")
    return losses if weight is None else losses * weight


def _modified(logits: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """The family's output-logit modifiers (_logit_modifiers) on raw (S, V) fp32 logits."""
    logits = logits * scale
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def compute_loss(hidden: torch.Tensor, weight: torch.Tensor, batch: dict, scale: float = 1.0,
                 softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (T, H) after the final norm, weight (V, H) of the output layer, and the batch's loss_idx (S,)
    positions that have a target, targets (S,) and loss_weight (S,) or None (sampler.targets) -> (sum of the
    weighted token losses, the (S,) token losses without gradient). All (S, V) logits at once (model.loss: plain);
    `compute_loss_chunked` computes the same in chunks."""
    logits = (hidden.index_select(0, batch["loss_idx"]) @ weight.t()).float()  # (S, V)
    losses = token_loss(_modified(logits, scale, softcap), batch["targets"], batch.get("loss_weight"))
    return losses.sum(), losses.detach()


class _ChunkedHead(torch.autograd.Function):
    """sum(token_loss(logits)) with logits = h @ W^T, chunk by chunk. Each chunk's logits are made, their gradient
    taken by autograd through `token_loss`, and dropped: no (S, V) logits are ever held, and the output layer's
    matmul is not recomputed in backward (3 matmuls per chunk instead of 4 with activation checkpointing). The
    gradients of h and W are kept for backward."""

    @staticmethod
    def forward(ctx, h, weight, targets, token_weight, scale: float, softcap: float | None, chunk: int):
        token_losses = torch.empty(len(targets), dtype=torch.float32, device=h.device)  # (S,), for logging
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
        for a in range(0, len(targets), chunk):
            hc = h[a:a + chunk]
            logits = (hc @ weight.t()).float().requires_grad_(need_grad)  # (c, V): a leaf, not h's or W's
            w = None if token_weight is None else token_weight[a:a + chunk]
            with torch.enable_grad():  # forward runs without autograd; this part needs it
                losses = token_loss(_modified(logits, scale, softcap), targets[a:a + chunk], w)
                if need_grad:
                    (g,) = torch.autograd.grad(losses.sum(), logits)  # (c, V) d loss / d logits
            token_losses[a:a + chunk] = losses.detach()
            if need_grad:
                grad_h[a:a + chunk] = (g.to(weight.dtype) @ weight).to(h.dtype)
                grad_w.addmm_(g.t(), hc.float())
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if need_grad else None)
        ctx.mark_non_differentiable(token_losses)
        return token_losses.sum(), token_losses

    @staticmethod
    def backward(ctx, grad_loss, _):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None, None, None, None


def compute_loss_chunked(hidden: torch.Tensor, weight: torch.Tensor, batch: dict, scale: float = 1.0,
                         softcap: float | None = None, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """`compute_loss` (model.loss: chunked, the default), with logits for `chunk` supervised positions at a
    time, their gradients taken in forward; tests keep the two equal."""
    h = hidden.index_select(0, batch["loss_idx"])  # (S, H)
    if not torch.is_grad_enabled():  # evaluation: tell the function that no gradient is needed
        h, weight = h.detach(), weight.detach()
    return _ChunkedHead.apply(h, weight, batch["targets"], batch.get("loss_weight"), scale, softcap, chunk)


def compute_loss_liger(hidden: torch.Tensor, weight: torch.Tensor, batch: dict, scale: float = 1.0,
                       softcap: float | None = None) -> tuple[torch.Tensor, None]:
    """The same contract with Liger's fused linear cross-entropy (CUDA, Triton): the logits are computed and
    consumed block by block inside one kernel, and never stored for backward. Its loss is its own cross-entropy,
    not `token_loss`, and it returns no token losses (no loss_by_source, no per-sample loss with it)."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        raise ImportError("model.loss: liger needs the liger extra: pip install -e '.[liger]'") from None
    if scale != 1.0 or batch.get("loss_weight") is not None:
        raise ValueError("model.loss: liger neither scales logits (this model sets logits_scaling) nor weights "
                         "tokens; use chunked")
    h = hidden.index_select(0, batch["loss_idx"])
    return LigerFusedLinearCrossEntropyLoss(reduction="sum", softcap=softcap)(weight, h, batch["targets"]), None


# model.compile's torch.compile backend; SFT_COMPILE_BACKEND=eager (or aot_eager) captures the same graphs without
# generating kernels: what the tests use (seconds instead of a minute on CPU), and a way to bisect a compile problem
COMPILE_BACKEND = os.environ.get("SFT_COMPILE_BACKEND", "inductor")

LOSSES = {"chunked": compute_loss_chunked, "plain": compute_loss, "liger": compute_loss_liger}


def _logit_modifiers(c) -> tuple[float, float | None]:
    """(multiplier, soft-cap) that the family's *ForCausalLM.forward applies to the logits after its output layer,
    which our loss bypasses. Found by reading `self.lm_head(` in every *ForCausalLM of transformers 5.24; a family
    whose head does something else is refused by the start-up self-check (`self_check`)."""
    t = c.model_type
    if t.startswith("cohere"):  # Command-R: logits * logit_scale
        scale = c.logit_scale or 1.0
    elif t.startswith("granite") or t == "minicpm3":  # logits / logits_scaling (MiniCPM3 divides the hidden states)
        scale = 1.0 / c.logits_scaling
    elif t == "hyperclovax":  # the same key as Granite's, multiplied
        scale = c.logits_scaling
    elif t == "falcon_h1":
        scale = c.lm_head_multiplier
    else:
        scale = 1.0
    softcaps = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")  # Gemma, RecurrentGemma, xLSTM
    return scale, next((v for k in softcaps if (v := getattr(c, k, None))), None)


def _router_aux_loss(lm: nn.Module):
    """(the family's load_balancing_loss_func with its experts and top-k bound, router_aux_loss_coef) when the config
    asks for the MoE router's auxiliary loss (output_router_logits: true), else None. It is the family's own
    function, called as its *ForCausalLM.forward calls it (26 MoE families of transformers 5.24)."""
    c = lm.config
    if not getattr(c, "output_router_logits", False):
        return None
    fn = getattr(sys.modules[type(lm).__module__], "load_balancing_loss_func", None)
    names = ["gate_logits", "num_experts", "top_k", "attention_mask"]
    if fn is None or list(inspect.signature(fn).parameters) != names or not hasattr(lm, "router_aux_loss_coef"):
        raise ValueError(f"{c.model_type}: its MoE router auxiliary loss (output_router_logits: true) is not supported "
                         "yet; set output_router_logits: false in the model's config.json")
    return partial(fn, num_experts=lm.num_experts, top_k=lm.num_experts_per_tok), lm.router_aux_loss_coef


def _stateful_layers(lm: nn.Module) -> list[str]:
    """Class names of the layers that carry a state along the sequence (state-space, convolution, linear attention),
    which would carry it from one sample into the next in a packed row. transformers' own code tells: such a
    layer keeps that state in the generation cache as a conv, recurrent, ssm or linear-attention state."""
    found = set()
    for cls in {type(m) for m in lm.modules()}:
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            continue
        if re.search(r"(conv|recurrent|ssm)_state|linear_cache", source):
            found.add(cls.__name__)
    return sorted(found)


def _packing_kernels(lm: nn.Module) -> list[str]:
    """The modules whose kernels keep the samples of a packed row apart in the family's stateful layers (they take
    seq_idx / cu_seqlens); transformers' PyTorch fallbacks cannot (integrations/hub_kernels.py)."""
    source = inspect.getsource(sys.modules[type(lm).__module__])
    return sorted(set(re.findall(r'use_kernel_func_from_hub_with_fallback\(\s*"\w+",\s*"(\w+)"', source)))


class PackedCausalLM(nn.Module):
    """The HF model plus our loss; `lm` is the unchanged transformers (or peft) model. `packs`: the samples of a
    micro-batch share one row; False: one sample per row, right-padded (exact for layers that carry a state along
    the row: the padding comes after each sample, so causal layers never see it)."""

    def __init__(self, lm: nn.Module, loss_fn=compute_loss_chunked, device: torch.device = torch.device("cpu")):
        super().__init__()
        self.lm, self.loss_fn = lm, loss_fn
        self.scale, self.softcap = _logit_modifiers(lm.config)
        self.router_aux = _router_aux_loss(lm)
        stateful = _stateful_layers(lm)
        kernels = _packing_kernels(lm) if stateful else []
        # a stateful layer keeps packed samples apart only in its CUDA kernels, which read each token's sample
        self.packs = not stateful or (device.type == "cuda" and bool(kernels)
                                      and all(importlib.util.find_spec(k) for k in kernels))
        self.seq_idx = bool(stateful)
        self.note = ""  # printed once at start-up
        if not self.packs:
            names = " and ".join({"fla": "flash-linear-attention"}.get(k, k.replace("_", "-")) for k in kernels)
            self.note = (f"model: {lm.config.model_type}'s {', '.join(stateful)} layers carry a state along the row: "
                         "training one sample per row (exact, padded; packing needs "
                         + (f"a CUDA GPU with {names} installed)" if kernels else "kernels this family has not)"))
            # right-padded rows need no mask in causal attention: transformers' own, not our packed one
            lm.set_attn_implementation("sdpa" if lm._supports_sdpa else "eager")

    def forward(self, input_ids, position_ids, cu_seqlens, max_seqlen: int, family_forward: bool = False,
                **batch) -> dict:
        """`batch`: loss_idx, targets, loss_weight (sampler.collate). Returns {"loss": what is back-propagated (the
        weighted token losses summed, plus the extra terms), "token_losses": (S,) without gradient, "terms": each
        extra term by name, detached}. `family_forward`: the family's own forward instead (see self_check)."""
        if family_forward:
            return self._family_losses(input_ids, cu_seqlens, batch)
        hidden, out, real = self._hidden(input_ids, position_ids, cu_seqlens, max_seqlen)
        weight = self.lm.get_output_embeddings().weight  # (V, H)
        terms = {}
        if self.router_aux:  # the micro-batch's aux loss, weighted by its share of the step's normalizer: the
            fn, coef = self.router_aux  # step's term is then the token-weighted mean of the micro-batches'
            n = batch["loss_weight"].sum() if batch.get("loss_weight") is not None else len(batch["targets"])
            terms["router_aux_loss"] = coef * fn(out.router_logits, attention_mask=real) * n
        if batch["targets"].numel() == 0:  # an empty micro-batch: a zero that still reaches every parameter, so
            loss = hidden.sum() * 0.0 + weight.sum() * 0.0  # backward runs everywhere
            token_losses = batch["targets"].float()
        else:
            loss, token_losses = self.loss_fn(hidden, weight, batch, self.scale, self.softcap)
        return {"loss": loss + sum(terms.values()), "token_losses": token_losses,
                "terms": {k: v.detach() for k, v in terms.items()}}

    def _hidden(self, input_ids, position_ids, cu_seqlens, max_seqlen: int):
        """(T, H) hidden states after the final norm, in packed order; the decoder's output; the (B, L) mask of real
        tokens when each sample has its own row (None when packed)."""
        kw = {"use_cache": False, "output_router_logits": True} if self.router_aux else {"use_cache": False}
        decoder = self.lm.get_decoder()
        if self.packs:
            if self.seq_idx:  # each token's sample, for the state-space and convolution kernels
                samples = torch.arange(len(cu_seqlens) - 1, device=input_ids.device, dtype=torch.int32)
                kw["seq_idx"] = samples.repeat_interleave(cu_seqlens.diff(), output_size=input_ids.shape[1])[None]
            out = decoder(input_ids=input_ids, position_ids=position_ids, cu_seq_lens_q=cu_seqlens,
                          cu_seq_lens_k=cu_seqlens, max_length_q=max_seqlen, max_length_k=max_seqlen, **kw)
            return out.last_hidden_state[0], out, None
        real = torch.arange(max_seqlen, device=input_ids.device) < cu_seqlens.diff()[:, None]  # (B, L)
        rows = input_ids.new_zeros(real.shape)
        rows[real] = input_ids[0]
        out = decoder(input_ids=rows, **kw)
        return out.last_hidden_state[real], out, real

    @torch.no_grad()
    def _family_losses(self, input_ids, cu_seqlens, batch) -> dict:
        """The token losses of the family's own *ForCausalLM forward, with its own eager attention, of each sample
        alone: one right-padded row per sample, with its attention mask."""
        implementation = self.lm.config._attn_implementation
        self.lm.set_attn_implementation("eager")
        real = torch.arange(int(cu_seqlens.diff().max()), device=input_ids.device) < cu_seqlens.diff()[:, None]
        rows = input_ids.new_zeros(real.shape)  # (B, L)
        rows[real] = input_ids[0]
        try:
            logits = self.lm(input_ids=rows, attention_mask=real.long(), use_cache=False).logits[real]  # (T, V)
        finally:
            self.lm.set_attn_implementation(implementation)
        # the family's logits (its own head and modifiers) through our token_loss: a fork's loss is not a bug
        token_losses = token_loss(logits[batch["loss_idx"]].float(), batch["targets"], batch.get("loss_weight"))
        return {"loss": token_losses.sum(), "token_losses": token_losses, "terms": {}}


# the largest relative difference of a token's loss the self-check accepts, by compute dtype. Measured on CPU, tiny
# random models of 17 families: fp32 agrees to <= 2e-7, bf16 to <= 1.3e-3; Cohere2 without its logit scale differs
# by 5e-2 in bf16 even on random weights (on trained ones, where logits are large, by far more)
SELF_CHECK_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}


@torch.no_grad()
def self_check(model: nn.Module, batch: dict) -> float:
    """The packed row `batch` (sampler.collate) through `model` as it trains (sharded, with adapters, in its compute
    dtype) against the family's own forward of each of its samples alone: the largest difference of a token's loss,
    relative to their mean. The caller compares it with SELF_CHECK_TOLERANCE. Every rank must call it alike."""
    inner = getattr(model, "module", model)  # DeepSpeed's engine holds ours as .module
    loss_fn = inner.loss_fn
    if loss_fn is compute_loss_liger:  # it gives no token losses; the same logits go into the plain loss
        inner.loss_fn = compute_loss
    was_training = model.training
    model.eval()  # dropout off in both
    # compiled blocks run eagerly here: eval mode and eager attention would each compile graphs of their own (10 s
    # apiece on a CPU) that training never uses; tests keep compiled blocks equal to eager ones
    with torch.compiler.set_stance("force_eager"):
        ours = model(**batch)["token_losses"].float()
        theirs = model(**batch, family_forward=True)["token_losses"].float()
    model.train(was_training)
    inner.loss_fn = loss_fn
    return ((ours - theirs).abs().max() / theirs.abs().mean().clamp_min(1e-12)).item()  # host sync, meant: once


def _apply_liger_kernels(lm: nn.Module):
    """Liger's RMSNorm, SwiGLU MLP and RoPE in place of the model's own (its families only; a process-wide patch of
    the family's modeling module). Our loss stays; Liger's fused one is model.loss: liger."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        raise ImportError("model.liger_kernels needs the liger extra: pip install -e '.[liger]'") from None
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(lm.config.model_type)
    if apply is None:
        raise ValueError(f"model.liger_kernels: Liger has no kernels for model_type {lm.config.model_type!r}; set it "
                         "to false")
    apply(model=lm, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)


def load_model(cfg: ModelConfig, device: torch.device, on_meta: bool = False) -> PackedCausalLM:
    """`on_meta`: build the architecture on the meta device without reading weights (ranks that receive their
    shards from rank 0 later, see sharding.shard_model). `load_in_4bit` quantizes the linear layers of the
    decoder to NF4 as they are read (QLoRA; the adapters are added by sharding.shard_model)."""
    from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    # compiled blocks call the packed attention eagerly: its per-sample grouping is host logic (a graph break
    # confined to it), and a varlen kernel is one opaque call anyway
    AttentionInterface.register("packed", torch.compiler.disable(packed_attention) if cfg.compile else packed_attention)
    kw = {"dtype": getattr(torch, cfg.dtype), "attn_implementation": cfg.attn_implementation}
    if on_meta:
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.path), **kw)
    elif cfg.random_init:  # initialized where it will train (an 8B model initializes in seconds on a GPU)
        with torch.device(device):
            lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.path), **kw)
    elif cfg.load_in_4bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ImportError("model.load_in_4bit needs the bitsandbytes extra: pip install -e '.[bitsandbytes]'")
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=kw["dtype"], bnb_4bit_quant_storage=kw["dtype"])
        lm = AutoModelForCausalLM.from_pretrained(cfg.path, quantization_config=q, device_map={"": device}, **kw)
        for m in lm.modules():  # bitsandbytes repacks a CPU weight in place on its first no-grad forward in eval
            if hasattr(m, "support_avx512bf16_for_cpu"):  # mode; FSDP2 would all-gather the old layout into it next
                m.support_avx512bf16_for_cpu = False
    else:
        lm = AutoModelForCausalLM.from_pretrained(cfg.path, **kw)
    if cfg.liger_kernels:
        _apply_liger_kernels(lm)
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for i, block in enumerate(lm.get_decoder().layers):  # selective: every k-th block
            block.gradient_checkpointing = i % cfg.checkpoint_every == 0
    if cfg.compile:  # each block's forward on its own; module hooks (FSDP2's) stay outside, and LoRA and FSDP2
        for block in lm.get_decoder().layers:  # wrap the blocks later (compiling is lazy, at the first call)
            forward = torch.compile(block.forward, backend=COMPILE_BACKEND, dynamic=True)
            if block.gradient_checkpointing:  # HF checkpoints inside forward, which dynamo would trace as one
                block.gradient_checkpointing = False  # region: the attention's graph break in it makes the whole
                forward = partial(checkpoint, forward, use_reentrant=False)  # block eager; checkpoint around it
            block.forward = forward
    return PackedCausalLM(lm if cfg.load_in_4bit or on_meta else lm.to(device), LOSSES[cfg.loss], device)
