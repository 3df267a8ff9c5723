"""Model loading, and what makes packed training exact and cheap: `packed_attention` (any HF causal
LM attends only within each sample of a packed row, no T x T mask); `token_loss`, the one loss a
fork edits, run by `compute_loss` and `compute_loss_chunked` (fused: never all logits at once); a
family's logit modifiers and MoE router loss; `self_check`. `load_model` returns a `PackedCausalLM`,
to FSDP2 and DeepSpeed one module that owns every parameter the loss touches."""

import importlib.util
import inspect
import os
import re
import sys
import time
from functools import cache, partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from config import ModelConfig


def _sdpa_per_sample(query, key, value, bounds, scaling, dropout, window, softcap, sinks):
    """(1, H, T, D) tensors, bounds = cu_seqlens list -> (1, T, H, D), causal in each sample: one
    SDPA call per length (exact, unpadded); a mask only for window < L, softcap (Gemma-2), sinks."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: share each K/V head among `groups` query heads
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    out = torch.empty_like(query)
    by_len: dict[int, list[int]] = {}
    for a, b in zip(bounds[:-1], bounds[1:]):
        by_len.setdefault(b - a, []).append(a)
    for L, starts in by_len.items():
        n = len(starts)
        pos = (torch.tensor(starts)[:, None] + torch.arange(L)).flatten().to(query.device)
        q, k, v = (x[0][:, pos].unflatten(1, (n, L)).transpose(0, 1) for x in (query, key, value))
        if softcap is None and sinks is None and (window is None or L <= window):
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling)
        else:
            i = torch.arange(L, device=q.device)
            allowed = i[None, :] <= i[:, None]  # causal
            if window is not None:  # as transformers: the last `window` tokens, self included
                allowed &= i[None, :] > i[:, None] - window
            scores = (q @ k.transpose(-1, -2)).float() * scaling
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            scores = scores.masked_fill(~allowed, float("-inf"))
            if sinks is not None:  # a learned logit per head joins each softmax, attending nowhere
                scores = torch.cat([scores, sinks.float()[:, None, None].expand(n, -1, L, 1)], -1)
            o = F.dropout(scores.softmax(-1)[..., :L].to(v.dtype), dropout) @ v
        out[0][:, pos] = o.transpose(0, 1).flatten(1, 2)
    return out.transpose(1, 2)


@cache
def _varlen_kernels():
    """(flash-attn's varlen function, PyTorch's `varlen_attn`, whether that takes grouped KV heads
    itself), each None if absent. Cached: Python does not cache a failed import."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        flash_attn_varlen_func = None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        varlen_attn = None
    params = inspect.signature(varlen_attn).parameters if varlen_attn else {}
    if "window_size" not in params:  # torch 2.10's takes no scale or window
        varlen_attn = None
    return flash_attn_varlen_func, varlen_attn, "enable_gqa" in params  # 2.11's: no grouped KV


def _varlen_cuda(query, key, value, cu, max_len, scaling, window, softcap):
    """A varlen kernel on (1, H, T, D) 16-bit CUDA tensors -> (1, T, H, D), or None: flash-attn's
    (FA2/FA3; soft-caps too) if installed, else PyTorch's; None where their head sizes cannot be
    (values of another size, sizes not a multiple of 8)."""
    d = query.shape[-1]
    if query.dtype not in (torch.float16, torch.bfloat16) or value.shape[-1] != d or d % 8:
        return None
    flash_attn_varlen_func, varlen_attn, takes_gqa = _varlen_kernels()
    # (T, H, D) copies: a view may start misaligned for the kernels' vector loads (DeepSeek-V3's
    # values, a slice, ended in "CUDA error: misaligned address" on an H200)
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))
    if flash_attn_varlen_func is not None:
        return flash_attn_varlen_func(
            q, k, v, cu, cu, max_len, max_len, softmax_scale=scaling, softcap=softcap or 0.0,
            causal=True, window_size=(window - 1, 0) if window else (-1, -1)).unsqueeze(0)
    if softcap is None and varlen_attn is not None:
        groups = q.shape[1] // k.shape[1]
        gqa = {"enable_gqa": groups > 1} if takes_gqa else {}
        if groups > 1 and not takes_gqa:  # torch 2.11: each KV head repeated for its group
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scaling, **gqa,
                           window_size=(window - 1, 0) if window else (-1, 0)).unsqueeze(0)  # causal
    return None


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     sliding_window=None, softcap=None, s_aux=None, **kwargs):
    """transformers' attention-interface signature; `PackedCausalLM` passes the sample boundaries as
    cu_seq_lens_q, max_length_q (transformers' flash-attention names). gpt-oss's sinks `s_aux` (H,)
    take the per-sample path: no varlen kernel takes them or differentiates the LSE to add them."""
    if "cu_seq_lens_q" not in kwargs:
        raise ValueError(
            "packed attention needs the sample boundaries (cu_seq_lens_q); call the model through "
            "PackedCausalLM, or load it with attn_implementation='sdpa' to generate")
    cu, max_len = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    dropout = dropout if module.training else 0.0
    if query.is_cuda and dropout == 0.0 and s_aux is None:
        out = _varlen_cuda(query, key, value, cu, max_len, scaling, sliding_window, softcap)
        if out is not None:
            return out, None
    return _sdpa_per_sample(query, key, value, cu.tolist(), scaling, dropout, sliding_window,
                            softcap, s_aux), None


def token_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """fp32 (S, V) logits, modifiers applied, targets (S,), weights (S,) or None -> (S,) weighted
    token losses: every loss path runs it; edit it (label smoothing, a z-loss...) to train that."""
    losses = F.cross_entropy(logits, targets, reduction="none")
    return losses if weight is None else losses * weight


def _modified(logits: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """The family's output-logit modifiers (_logit_modifiers) on raw (S, V) fp32 logits."""
    logits = logits * scale
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def compute_loss(hidden: torch.Tensor, weight: torch.Tensor, batch: dict, scale: float = 1.0,
                 softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Final-norm hidden (T, H), output weight (V, H), batch (sampler.targets) -> (summed token
    losses, (S,) token losses without gradient), all (S, V) logits at once (model.loss: plain)."""
    logits = (hidden.index_select(0, batch["loss_idx"]) @ weight.t()).float()  # (S, V)
    losses = token_loss(_modified(logits, scale, softcap), batch["targets"], batch.get("loss_weight"))
    return losses.sum(), losses.detach()


class _ChunkedHead(torch.autograd.Function):
    """sum(token_loss(h @ W^T)) chunk by chunk, each chunk's gradient taken by autograd in forward
    and its logits dropped: no (S, V) logits held, 3 matmuls a chunk (4 with checkpointing)."""

    @staticmethod
    def forward(ctx, h, weight, targets, token_weight, scale: float, softcap: float | None, chunk: int):
        token_losses = torch.empty(len(targets), dtype=torch.float32, device=h.device)  # to log
        need_h, need_w = ctx.needs_input_grad[:2]  # LoRA: no output-layer gradient
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for a in range(0, len(targets), chunk):
            hc = h[a:a + chunk]
            logits = (hc @ weight.t()).float().requires_grad_(need_h or need_w)  # (c, V), a leaf
            w = None if token_weight is None else token_weight[a:a + chunk]
            with torch.enable_grad():  # forward runs without autograd; this part needs it
                losses = token_loss(_modified(logits, scale, softcap), targets[a:a + chunk], w)
                if need_h or need_w:
                    (g,) = torch.autograd.grad(losses.sum(), logits)  # (c, V) d loss / d logits
            token_losses[a:a + chunk] = losses.detach()
            if need_h:
                grad_h[a:a + chunk] = (g.to(weight.dtype) @ weight).to(h.dtype)
            if need_w:
                grad_w.addmm_(g.t(), hc.float())
        # on ctx, not saved for backward: backward holds the only reference, so it scales them in
        # place and autograd takes them as they are (no second weight-sized buffer at the peak)
        ctx.grads = [grad_h, None if grad_w is None else grad_w.to(weight.dtype)]
        ctx.mark_non_differentiable(token_losses)
        return token_losses.sum(), token_losses

    @staticmethod
    def backward(ctx, grad_loss, _):
        grads, ctx.grads = ctx.grads, None
        grads = [None if g is None else g.mul_(grad_loss) for g in grads]
        return *grads, None, None, None, None, None


def compute_loss_chunked(
        hidden: torch.Tensor, weight: torch.Tensor, batch: dict, scale: float = 1.0,
        softcap: float | None = None, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """`compute_loss` by `chunk` positions (model.loss: chunked, default); tests keep them equal."""
    h = hidden.index_select(0, batch["loss_idx"])  # (S, H)
    if not torch.is_grad_enabled():  # evaluation: tell the function that no gradient is needed
        h, weight = h.detach(), weight.detach()
    return _ChunkedHead.apply(h, weight, batch["targets"], batch.get("loss_weight"), scale, softcap, chunk)


# model.compile's backend; SFT_COMPILE_BACKEND=eager (or aot_eager) makes the same graphs, no
# kernels: for the tests (seconds, not a minute, on CPU) and to bisect a compile problem
COMPILE_BACKEND = os.environ.get("SFT_COMPILE_BACKEND", "inductor")

LOSSES = {"chunked": compute_loss_chunked, "plain": compute_loss}


def _logit_modifiers(c) -> tuple[float, float | None]:
    """(multiplier, soft-cap: Gemma, RecurrentGemma, xLSTM) that *ForCausalLM.forward applies after
    `self.lm_head(` and our loss bypasses (read in transformers 5.24; self_check refuses others)."""
    t, scale = c.model_type, 1.0
    if t.startswith("cohere"):  # Command-R: logits * logit_scale
        scale = c.logit_scale or 1.0
    elif t.startswith("granite") or t == "minicpm3":  # logits / logits_scaling (MiniCPM3: hidden)
        scale = 1.0 / c.logits_scaling
    elif t == "hyperclovax":  # the same key as Granite's, multiplied
        scale = c.logits_scaling
    elif t == "falcon_h1":
        scale = c.lm_head_multiplier
    softcaps = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
    return scale, next((v for k in softcaps if (v := getattr(c, k, None))), None)


def _router_aux_loss(lm: nn.Module):
    """(the family's load_balancing_loss_func, bound as its *ForCausalLM.forward calls it (26 MoE
    families of transformers 5.24), router_aux_loss_coef) if output_router_logits, else None."""
    if not getattr(lm.config, "output_router_logits", False):
        return None
    fn = getattr(sys.modules[type(lm).__module__], "load_balancing_loss_func", None)
    names = ["gate_logits", "num_experts", "top_k", "attention_mask"]
    if fn is None or list(inspect.signature(fn).parameters) != names or not hasattr(lm, "router_aux_loss_coef"):
        raise ValueError(
            f"{lm.config.model_type}: its MoE router auxiliary loss (output_router_logits: true) "
            "is not supported yet; set output_router_logits: false in the model's config.json")
    return partial(fn, num_experts=lm.num_experts, top_k=lm.num_experts_per_tok), lm.router_aux_loss_coef


def _stateful_layers(lm: nn.Module) -> list[str]:
    """Names of the layer classes that carry a state along the row, across samples (state-space,
    convolution, linear attention): in transformers they cache a conv/recurrent/ssm/linear state."""
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
    """Modules whose kernels (given seq_idx / cu_seqlens) keep packed samples apart in stateful
    layers; transformers' PyTorch fallbacks cannot (integrations/hub_kernels.py)."""
    source = inspect.getsource(sys.modules[type(lm).__module__])
    return sorted(set(re.findall(r'use_kernel_func_from_hub_with_fallback\(\s*"\w+",\s*"(\w+)"', source)))


def _one_row_per_sample(input_ids, cu_seqlens, max_seqlen: int):
    """A packed (1, T) row -> (B, L) rows of one sample each, right-padded, and their real tokens."""
    real = torch.arange(max_seqlen, device=input_ids.device) < cu_seqlens.diff()[:, None]
    rows = input_ids.new_zeros(real.shape)
    rows[real] = input_ids[0]
    return rows, real


class PackedCausalLM(nn.Module):
    """The unchanged transformers (or peft) model `lm` plus our loss. `packs`: a micro-batch's
    samples share one row; False: one right-padded sample per row (exact for stateful layers)."""

    def __init__(self, lm: nn.Module, loss_fn=compute_loss_chunked, device: torch.device = torch.device("cpu")):
        super().__init__()
        self.lm, self.loss_fn = lm, loss_fn
        self.scale, self.softcap = _logit_modifiers(lm.config)
        self.router_aux = _router_aux_loss(lm)
        stateful = _stateful_layers(lm)
        kernels = _packing_kernels(lm) if stateful else []
        self.packs = not stateful or (device.type == "cuda" and bool(kernels)
                                      and all(importlib.util.find_spec(k) for k in kernels))
        self.seq_idx = bool(stateful)
        self.note = ""  # printed once at start-up
        if not self.packs:
            names = " and ".join({"fla": "flash-linear-attention"}.get(k, k.replace("_", "-")) for k in kernels)
            self.note = (f"model: {lm.config.model_type}'s {', '.join(stateful)} layers carry a state along the row: "
                         "training one sample per row (exact, padded; packing needs "
                         + (f"a CUDA GPU with {names} installed)" if kernels else "kernels this family has not)"))
            lm.set_attn_implementation("sdpa" if lm._supports_sdpa else "eager")  # no mask needed

    def forward(self, input_ids, position_ids, cu_seqlens, max_seqlen: int,
                family_forward: bool = False, **batch) -> dict:
        """`batch`: loss_idx, targets, loss_weight (sampler.collate) -> {"loss": summed token losses
        + terms, "token_losses": (S,), "terms": detached}. `family_forward`: see self_check."""
        if family_forward:
            return self._family_losses(input_ids, cu_seqlens, max_seqlen, batch)
        hidden, out, real = self._hidden(input_ids, position_ids, cu_seqlens, max_seqlen)
        terms = {}
        if self.router_aux:  # weighted by this micro-batch's share: a token-weighted mean per step
            fn, coef = self.router_aux
            n = batch["loss_weight"].sum() if batch.get("loss_weight") is not None else len(batch["targets"])
            terms["router_aux_loss"] = coef * fn(out.router_logits, attention_mask=real) * n
        # through the output layer's own FSDP2 unit where it has one (sharding._apply_fsdp2)
        head = self.lm.get_output_embeddings()
        loss, token_losses = getattr(head, "fsdp_head_loss", self.head_loss)(hidden, batch)
        return {"loss": loss + sum(terms.values()), "token_losses": token_losses,
                "terms": {k: v.detach() for k, v in terms.items()}}

    def head_loss(self, hidden, batch: dict):
        """Final-norm hidden states (T, H) -> loss_fn's (summed token losses, (S,) token losses)
        through the output layer; under FSDP2 a forward method of that layer's own unit."""
        weight = self.lm.get_output_embeddings().weight  # (V, H)
        if batch["targets"].numel() == 0:  # empty: a zero reaching every parameter, for backward
            return hidden.sum() * 0.0 + weight.sum() * 0.0, batch["targets"].float()
        return self.loss_fn(hidden, weight, batch, self.scale, self.softcap)

    def _hidden(self, input_ids, position_ids, cu_seqlens, max_seqlen: int):
        """(T, H) final-norm hidden states in packed order; decoder output; (B, L) mask or None."""
        kw = {"use_cache": False} | ({"output_router_logits": True} if self.router_aux else {})
        decoder = self.lm.get_decoder()
        if self.packs:
            if self.seq_idx:  # each token's sample, for the state-space and convolution kernels
                samples = torch.arange(len(cu_seqlens) - 1, device=input_ids.device, dtype=torch.int32)
                kw["seq_idx"] = samples.repeat_interleave(cu_seqlens.diff(), output_size=input_ids.shape[1])[None]
            out = decoder(input_ids=input_ids, position_ids=position_ids, cu_seq_lens_q=cu_seqlens,
                          cu_seq_lens_k=cu_seqlens, max_length_q=max_seqlen, max_length_k=max_seqlen, **kw)
            return out.last_hidden_state[0], out, None
        rows, real = _one_row_per_sample(input_ids, cu_seqlens, max_seqlen)
        out = decoder(input_ids=rows, **kw)
        return out.last_hidden_state[real], out, real

    @torch.no_grad()
    def _family_losses(self, input_ids, cu_seqlens, max_seqlen: int, batch) -> dict:
        """Token losses by the family's own forward and eager attention, one padded row a sample."""
        implementation = self.lm.config._attn_implementation
        self.lm.set_attn_implementation("eager")
        rows, real = _one_row_per_sample(input_ids, cu_seqlens, max_seqlen)
        try:
            logits = self.lm(input_ids=rows, attention_mask=real.long(), use_cache=False).logits[real]
        finally:
            self.lm.set_attn_implementation(implementation)
        # its own head and modifiers, through our token_loss: a fork's loss is not a bug
        token_losses = token_loss(logits[batch["loss_idx"]].float(), batch["targets"], batch.get("loss_weight"))
        return {"loss": token_losses.sum(), "token_losses": token_losses, "terms": {}}


# self_check's limit by compute dtype. On CPU, tiny random models of 17 families: fp32 within 2e-7,
# bf16 1.3e-3; Cohere2 without its logit scale is off by 5e-2 in bf16 (trained weights: far more)
SELF_CHECK_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}


@torch.no_grad()
def self_check(model: nn.Module, batch: dict, dtype: str) -> str:
    """A line to print if `batch` packed through `model` as it trains gives every token's loss that
    the family's own forward gives each sample alone, within SELF_CHECK_TOLERANCE[dtype] of their
    mean; else ValueError. Every rank must call it: all decide on the largest difference."""
    t0, was_training = time.perf_counter(), model.training
    model.eval()  # dropout off in both
    # eagerly: eval mode and eager attention would compile graphs (10 s each on CPU) training never
    # uses; tests keep compiled blocks equal to eager ones
    with torch.compiler.set_stance("force_eager"):
        ours = model(**batch)["token_losses"].float()
        theirs = model(**batch, family_forward=True)["token_losses"].float()
    model.train(was_training)
    diff = (ours - theirs).abs().max() / theirs.abs().mean().clamp_min(1e-12)
    if dist.is_initialized():
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    tolerance, n = SELF_CHECK_TOLERANCE[dtype], len(batch["cu_seqlens"]) - 1
    family = getattr(model, "module", model).lm.config.model_type  # DeepSpeed's engine: .module
    if not diff <= tolerance:  # NaN too
        raise ValueError(
            f"model {family}: a packed row of {n} of the run's samples differs from the family's "
            f"own forward of each by {diff:.1e} (largest token loss difference, relative; {dtype} "
            f"allows {tolerance:.0e}): its loss would be trained wrong. Not supported yet; "
            "model.self_check: false trains it anyway")
    return (f"self-check: {family}, a packed row of {n} samples ({int(batch['cu_seqlens'][-1])} "
            f"tokens) equals the family's own forward within {diff:.1e} (allowed {tolerance:.0e}), "
            f"{time.perf_counter() - t0:.2f}s")


def _partitioned(full: nn.Module, zero3: dict, kw: dict) -> nn.Module:
    """`full` (real on rank 0, on the meta device elsewhere) rebuilt partitioned by ZeRO-3
    (deepspeed.zero.Init: no rank holds it whole), module by module from rank 0's weights."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep = HfDeepSpeedConfig(zero3)  # transformers builds under zero.Init while it lives
    # its initialization is overwritten: the seeded RNG goes on as if it had not run
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        lm = AutoModelForCausalLM.from_config(full.config, **kw)
    del keep
    unset_hf_deepspeed_config()  # a model built later (the merged export) is built whole
    for name, module in lm.named_modules():
        if params := dict(module.named_parameters(recurse=False)):
            with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
                if dist.get_rank() == 0:
                    for key, p in params.items():
                        p.data.copy_(getattr(full.get_submodule(name), key))
    return lm


def load_model(cfg: ModelConfig, device: torch.device, on_meta: bool = False,
               zero3: dict | None = None) -> PackedCausalLM:
    """`on_meta`: on the meta device, no weights read (ranks that get shards from rank 0 later:
    sharding.shard_model). `load_in_4bit`: linear layers to NF4 as read (QLoRA; adapters later).
    `zero3`: DeepSpeed's config; built partitioned from rank 0's weights (on_meta elsewhere)."""
    from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig
    # eager in compiled blocks: per-sample grouping is host logic, a varlen kernel one opaque call
    attention = torch.compiler.disable(packed_attention) if cfg.compile else packed_attention
    AttentionInterface.register("packed", attention)
    kw = {"dtype": getattr(torch, cfg.dtype), "attn_implementation": cfg.attn_implementation}
    # random_init: built where it trains (8B: seconds on GPU); under ZeRO-3 whole on rank 0's CPU
    if on_meta or cfg.random_init:
        with torch.device("meta" if on_meta else "cpu" if zero3 else device):
            lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.path), **kw)
    elif cfg.load_in_4bit:
        try:
            importlib.import_module("bitsandbytes")
        except ImportError:
            raise ImportError("model.load_in_4bit needs the bitsandbytes extra: pip install -e '.[bitsandbytes]'")
        q = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kw["dtype"], bnb_4bit_quant_storage=kw["dtype"])
        lm = AutoModelForCausalLM.from_pretrained(cfg.path, quantization_config=q, device_map={"": device}, **kw)
        # bitsandbytes repacks a CPU weight in place at its first no-grad eval forward: FSDP2 would
        # all-gather the old layout into it
        for m in lm.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
    else:
        lm = AutoModelForCausalLM.from_pretrained(cfg.path, **kw)
    if zero3:
        lm = _partitioned(lm, zero3, kw)
    if cfg.gradient_checkpointing:
        # transformers 5.24 renamed it (the old name warns); older 5.x have only the old one
        enable = getattr(lm, "activation_checkpointing_enable", lm.gradient_checkpointing_enable)
        enable({"use_reentrant": False})
        for i, block in enumerate(lm.get_decoder().layers):  # selective: every k-th block
            block.gradient_checkpointing = i % cfg.checkpoint_every == 0
    # each block's forward compiled alone, lazily: hooks (FSDP2's) stay outside; LoRA and FSDP2 wrap
    # blocks later. Checkpoint around it: inside, the attention's graph break makes the block eager
    if cfg.compile:
        for block in lm.get_decoder().layers:
            forward = torch.compile(block.forward, backend=COMPILE_BACKEND, dynamic=True)
            if block.gradient_checkpointing:
                block.gradient_checkpointing = False
                forward = partial(checkpoint, forward, use_reentrant=False)
            block.forward = forward
    return PackedCausalLM(lm if cfg.load_in_4bit or on_meta or zero3 else lm.to(device),
                          LOSSES[cfg.loss], device)
