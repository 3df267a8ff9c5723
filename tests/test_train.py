"""The loop against itself: 2 ranks (replicated and FSDP2) == 1 rank; many micro-steps == one; and an
end-to-end torchrun run whose outputs are checked. The runs come from the `runs` fixture in conftest.py."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import sampler
import tokenize_data
from conftest import ROOT, metrics, run_args, strategy_args, torchrun, write_jsonl

KEYS = {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "loss_tokens", "tokens_per_s", "packing_efficiency",
        "elapsed_s", "peak_mem_gib", "micro_steps"}


def weights(run_dir):
    return load_file(str(run_dir / "hf" / "model.safetensors"))


@pytest.mark.parametrize("name", ["micro", "replicated2", "fsdp2"])
def test_same_losses_and_weights_as_one_rank_one_micro_step(runs, name):
    ref, got = metrics(runs / "ref"), metrics(runs / name)  # one process, one micro-step per step
    assert len(ref) == len(got) == 5
    if name == "micro":
        assert all(m["micro_steps"] > 4 for m in got) and all(m["micro_steps"] == 1 for m in ref)
    for a, b in zip(ref, got):
        assert a["loss_tokens"] == b["loss_tokens"] and a["tokens"] == b["tokens"]
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5
    assert ref[0]["loss"] - ref[-1]["loss"] > 0.1  # the weights did move
    w_ref, w_got = weights(runs / "ref"), weights(runs / name)
    assert w_ref.keys() == w_got.keys()
    for k in w_ref:
        assert (w_ref[k] - w_got[k]).abs().max() <= 1e-5, k


def test_end_to_end_outputs(runs):
    run = runs / "fsdp2"
    rows = metrics(run)
    assert [m["step"] for m in rows] == [1, 2, 3, 4, 5]
    assert all(KEYS <= m.keys() for m in rows)
    assert all(0 < m["packing_efficiency"] <= 1 and m["tokens_per_s"] > 0 for m in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["tokens"] == sum(m["tokens"] for m in rows)
    assert summary["loss_tokens"] == sum(m["loss_tokens"] for m in rows)
    assert summary["samples_dropped"] == {"longer_than_max_seq_len": 0}
    assert "train:\n  output_dir:" in (run / "config.yaml").read_text()
    card = (run / "hf/README.md").read_text()  # the model card
    assert "| data | 320 | 320 | 0 | 0 |" in card and f"final training loss: {rows[-1]['loss']:.4f}" in card
    assert "sharding: fsdp2" in card and "5 steps of 32 samples" in card
    model = AutoModelForCausalLM.from_pretrained(run / "hf")
    tok = AutoTokenizer.from_pretrained(run / "hf")
    assert model.config._attn_implementation != "packed"  # the export is a plain HF model
    ids = tok.apply_chat_template([{"role": "user", "content": "Count from a to e."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    assert model.generate(**ids, min_new_tokens=2, max_new_tokens=2).shape[1] == ids["input_ids"].shape[1] + 2
    loaded = {k: v for k, v in model.state_dict().items()}
    for k, v in weights(run).items():
        assert torch.equal(loaded[k], v)
    # the export's logits are those of the trained weights: its loss on the training chats is the run's
    # (the last step's loss was computed before its update, so the export's is lower than the first step's)
    batch = sampler.collate([cache_sample for cache_sample in _quickstart_samples(tok, 16)], torch.device("cpu"))
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    assert torch.nn.functional.cross_entropy(logits[batch["loss_idx"]], batch["targets"]).item() < rows[0]["loss"]


def _quickstart_samples(tok, n):
    lines = (ROOT / "data/quickstart/train.jsonl").read_text().splitlines()[:n]
    out = []
    for line in lines:
        s = tokenize_data.tokenize_sample(json.loads(line), tok)
        out.append((np.array(s["input_ids"]), (np.array(s["labels"]) != -100).astype(np.uint8)))
    return out


@pytest.mark.parametrize("name", ["micro", "replicated2", "fsdp2"])
def test_per_sample_losses_weight_sum_to_the_step_loss_and_the_noise_scale_is_logged(runs, name):
    """sample_losses.jsonl holds every sample of every step once (index, source, mean loss, tokens); token-weighted
    they give the step's loss. The noise scale is finite and positive (after the first step, which initializes it)."""
    rows = metrics(runs / name)
    per_step = {}
    for line in (runs / name / "sample_losses.jsonl").read_text().splitlines():
        r = json.loads(line)
        per_step.setdefault(r["step"], []).append(r)
    assert sorted(per_step) == [m["step"] for m in rows]
    for m in rows:
        samples = per_step[m["step"]]
        assert sum(r["tokens"] for r in samples) == m["loss_tokens"] and len(samples) <= m["samples"]
        weighted = sum(r["loss"] * r["tokens"] for r in samples) / m["loss_tokens"]
        assert weighted == pytest.approx(m["loss"], rel=1e-6)
        assert {r["source"] for r in samples} == {"data"}
    assert all(m["noise_scale"] is not None and m["noise_scale"] > 0 for m in rows[1:]), [m["noise_scale"] for m in rows]


def test_non_finite_step_is_skipped_and_counted(tmp_path, small_data):
    """An absurd learning rate makes the weights overflow after step 1; later updates are skipped, counted in
    metrics and summary, and reported, not silently applied."""
    p = torchrun(0, run_args(tmp_path, small_data, **{"sharding.strategy": "none", "train.lr": 1e30,
                                                       "train.max_grad_norm": 0, "train.max_steps": 3}))
    rows = metrics(tmp_path / "run")
    assert rows[0]["finite"] and not rows[-1]["finite"]
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["nonfinite_steps"] == sum(not m["finite"] for m in rows) >= 1
    assert "update skipped" in p.stdout


def test_a_parquet_prompt_completion_source_trains_as_messages_jsonl(runs, tmp_path):
    """The same 320 chats as the `ref` run, as prompt/completion records in a Parquet file: identical losses."""
    import datasets

    lines = (ROOT / "data/quickstart/train.jsonl").read_text().splitlines()[:320]
    records = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1]["content"]}
               for r in map(json.loads, lines)]
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "d.parquet"))
    torchrun(0, strategy_args(tmp_path, str(tmp_path / "d.parquet"), "pc", {}))
    assert [m["loss"] for m in metrics(tmp_path / "pc")] == [m["loss"] for m in metrics(runs / "ref")]


def test_mixture_logs_per_source_losses_that_weight_sum_to_the_step_loss(tmp_path):
    lines = (ROOT / "data/quickstart/train.jsonl").read_text().splitlines()
    a = write_jsonl(tmp_path / "a.jsonl", lines[:128])
    b = write_jsonl(tmp_path / "b.jsonl", [{"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(
        m["role"], m["role"]), "value": m["content"]} for m in json.loads(x)["messages"]]} for x in lines[128:192]])
    files = f"[{a}, {{path: {b}, weight: 1.5}}]"
    p = torchrun(0, run_args(tmp_path, a, **{"data.train_files": files, "train.max_steps": 4,
                                             "sharding.strategy": "none"}))
    rows = metrics(tmp_path / "run")
    for m in rows:
        assert set(m["loss_by_source"]) == {"a", "b"}
        weighted = sum(m["loss_by_source"][s] * m["loss_tokens_by_source"][s] for s in ("a", "b"))
        assert sum(m["loss_tokens_by_source"].values()) == m["loss_tokens"]
        assert weighted / m["loss_tokens"] == pytest.approx(m["loss"], rel=1e-6)
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert {k: (v["samples"], v["per_epoch"]) for k, v in summary["samples_by_source"].items()} == \
        {"a": (128, 128), "b": (64, 96)}
    assert "224 samples / 32 per step = 7 steps in the first epoch" in p.stdout and "0 bad samples skipped" in p.stdout


# A tiny random-init model of each recipe's architecture family, with that family's real chat template
# (shared/templates): (template name, config fields beside the sizes)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
FAMILIES = {"meta-llama/Llama-3.1": ("llama3_1", dict(model_type="llama", tie_word_embeddings=False,
                                                      rope_scaling=LLAMA3_ROPE, max_position_embeddings=131072)),
            "Qwen/Qwen3": ("qwen3", dict(model_type="qwen3", max_position_embeddings=40960)),
            "ibm-granite/granite-3": ("granite3", dict(model_type="granite", logits_scaling=16.0))}
RECIPES = sorted(p.name for p in (ROOT / "configs").glob("*.yaml") if p.name != "quickstart.yaml")


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_trains_two_steps_on_a_tiny_model_of_its_family(tmp_path, recipe):
    """Each shipped recipe, as written, for 2 steps on one CPU process (a one-rank group where it shards), with
    only the model (a tiny one of the same family), the sizes and, where it names a hub dataset, the data swapped.
    model.compile is off here: tracing under FSDP2 costs ~10 s a run, and compiled blocks under FSDP2 are checked
    against eager in test_sharding.py (fsdp2_compile_checkpointing_lora)."""
    import config
    import train  # noqa: F401 (registers every section)
    from conftest import family_tokenizer
    from transformers import AutoConfig

    cfg = config.load(str(ROOT / "configs" / recipe))
    template, fields = next(v for k, v in FAMILIES.items() if cfg.model.path.startswith(k))
    tok = family_tokenizer(template)
    tok.save_pretrained(tmp_path / "model")
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        **fields, vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, eos_token_id=tok.eos_token_id))
    lm.save_pretrained(tmp_path / "model")  # real weights: QLoRA quantizes them as it reads them
    over = {"model.path": tmp_path / "model", "train.output_dir": tmp_path / "run",
            "data.cache_dir": tmp_path / "cache", "train.max_steps": 2, "sampler.batch_size": 2, "data.num_proc": 1,
            "model.compile": "false"}
    if any(tokenize_data.is_hub_id(f) for f in cfg.data.train_files):
        over["data.train_files"] = "[" + write_jsonl(tmp_path / "chats.jsonl", (
            ROOT / "data/quickstart/train.jsonl").read_text().splitlines()[:8]) + "]"
    torchrun(1 if cfg.sharding.strategy != "none" else 0,
             ["--config", str(ROOT / "configs" / recipe)] + [f"--{k}={v}" for k, v in over.items()])
    rows = metrics(tmp_path / "run")
    assert [m["step"] for m in rows] == [1, 2] and all(np.isfinite(m["loss"]) and m["loss_tokens"] > 0 for m in rows)
    assert (tmp_path / "run/hf/README.md").exists()
