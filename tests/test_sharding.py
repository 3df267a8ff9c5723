"""Sharding strategies change memory and speed, not the mathematics: five steps of each strategy (none, FSDP2,
hybrid, CPU offload, DeepSpeed ZeRO 2 and 3) x {full, LoRA} (the runs fixture, in conftest.py) give the losses of
the single-process run; a two-"node" run matches one node; only rank 0 reads weights."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import config
import train  # noqa: F401  (imports every stage, which registers its section)
from conftest import LORA, QS_CONFIG, ROOT, VARIANTS, metrics, run_args, strategy_args, torchrun, write_jsonl

def assert_same_losses(ref, got, rtol=1e-4):
    assert len(ref) == len(got) == 5
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) <= rtol * abs(a["loss"]), (a["loss"], b["loss"])


@pytest.mark.parametrize("name", [n for n in VARIANTS if not n.startswith("ref")])
def test_strategy_matches_single_process(runs, name):
    ref = "ref_lora" if name.endswith("lora") else "ref"
    # bf16 compute rounds activations to 8 bits of mantissa; the master weights and reduction stay fp32
    assert_same_losses(metrics(runs / ref), metrics(runs / name), rtol=2e-3 if name.endswith("bf16") else 1e-4)
    if VARIANTS[name][1].get("model.compile"):  # dynamic shapes: a few graphs, not one per row length
        graphs = json.loads((runs / name / "summary.json").read_text())["compiled_graphs"]
        assert 0 < graphs <= 12, graphs
    hf = runs / name / "hf"
    if name.endswith("lora"):
        assert json.loads((hf / "adapter_config.json").read_text())["r"] == 4
        merged = AutoModelForCausalLM.from_pretrained(hf / "merged")
        base = AutoModelForCausalLM.from_config(merged.config)
        PeftModel.from_pretrained(base, hf)  # the adapter loads onto the architecture
    else:
        model = AutoModelForCausalLM.from_pretrained(hf)
        assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights, also after bf16 compute
    if VARIANTS[name][0] > 1:  # a quiet run: no library warnings in torchrun's output (in-process: none captured)
        assert "warning" not in (runs / f"{name}.log").read_text().lower()


def test_lora_export_base_plus_adapter_equals_merged(runs):
    """The random-init base is rebuilt from the seed; base + saved adapter must compute what merged/ computes,
    and merging may only have changed the weights LoRA targets."""
    hf = runs / "fsdp2_compile_checkpointing_lora" / "hf"
    merged = AutoModelForCausalLM.from_pretrained(hf / "merged").eval()
    torch.manual_seed(42)  # train.seed: the base as the run initialized it
    base = AutoModelForCausalLM.from_config(merged.config)
    init = {n: p.clone() for n, p in base.named_parameters()}
    with_adapter = PeftModel.from_pretrained(base, hf).eval()
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(ids).logits, merged(ids).logits, atol=1e-5, rtol=0)
    changed = {n for n, p in merged.named_parameters() if not torch.equal(p, init[n])}
    assert changed and all(n.endswith("proj.weight") for n in changed), changed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_match_one(runs, tmp_path, hybrid="true"):
    """Two torchrun launches (--nnodes=2, one rank each) rendezvous on localhost, hybrid FSDP2 over them (plain
    FSDP2 across ranks is the fsdp2 variant)."""
    data = str(runs / "data.jsonl")
    a = strategy_args(tmp_path, data, "two_nodes", {"sharding.strategy": "fsdp2", "sharding.hybrid": hybrid})
    port = free_port()
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={r}",
                               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                               "train.py", *a], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    assert_same_losses(metrics(runs / "ref"), metrics(tmp_path / "two_nodes"))


RANK0_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {root!r})
import model_setup, sampler, sharding
d = sharding.init_distributed()
cfg = model_setup.ModelConfig(path={path!r}, random_init=True, dtype="float32")
torch.manual_seed(0)
model = model_setup.load_model(cfg, d.device, on_meta=d.rank != 0)
on_meta = all(p.is_meta for p in model.parameters())
total = sum(p.numel() for p in model.parameters())
model = sharding.shard_model(model, sharding.ShardingConfig(strategy="fsdp2", compute_dtype="float32"), d)
local = sum(p.to_local().numel() for p in model.parameters())
units = sum(isinstance(m, torch.distributed.fsdp.FSDPModule) for m in model.modules())
def batch_of(r):  # one sample per rank, of different lengths
    b = sampler.collate([(torch.arange(3, 40 + 9 * r).int().numpy(), torch.ones(37 + 9 * r).byte().numpy())], d.device)
    del b["loss_seg"]
    return b
batch = batch_of(d.rank)
loss = model(**batch)["loss"]
loss.backward()
norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).full_tensor()  # of the mean over ranks
result = {{"meta_before_sharding": on_meta, "local": local, "total": total, "units": units, "loss": loss.item(),
           "norm": norm.item(), "grads": [p.grad.full_tensor().norm().item() for p in model.parameters()]}}
if d.rank == 0:  # the same model unsharded, on both ranks' batches: its gradient norm is the sharded one's
    torch.manual_seed(0)
    ref = model_setup.load_model(cfg, d.device)
    result["ref_losses"] = []
    for r in (0, 1):
        ref_loss = ref(**batch_of(r))["loss"]
        (ref_loss / 2).backward()
        result["ref_losses"].append(ref_loss.item())
    result["ref_norm"] = torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf")).item()
    result["ref_grads"] = [p.grad.norm().item() for p in ref.parameters()]
del model  # freed at interpreter exit, its sharded tensors can abort the process (gloo threads)

# ZeRO-3 builds partitioned: each rank's peak memory while building, over the model's size
import deepspeed, train
def mem(key):  # bytes, from /proc/self/status
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) * 1024
big = model_setup.ModelConfig(path={big!r}, random_init=True, dtype="float32")
zero3 = sharding.deepspeed_config(sharding.ShardingConfig(strategy="deepspeed", zero_stage=3,
                                                          compute_dtype="float32"))
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
before = mem("VmRSS:")
torch.manual_seed(0)
model = model_setup.load_model(big, d.device, on_meta=d.rank != 0, zero3=zero3)
result["zero3_gain"], result["zero3_bytes"] = mem("VmHWM:") - before, 4 * sum(p.ds_numel for p in model.parameters())
decay = train.build_optimizer(model, train.TrainConfig(weight_decay=0.1)).param_groups[0]["params"]
result["zero3_decayed"] = len(decay)
result["zero3_sums"] = []
for p in model.parameters():
    with deepspeed.zero.GatheredParameters([p]):
        result["zero3_sums"].append(p.double().sum().item())
if d.rank == 0:  # built as `none` builds it
    torch.manual_seed(0)
    ref = model_setup.load_model(big, d.device)
    result["ref_sums"] = [p.double().sum().item() for p in ref.parameters()]
    result["ref_decayed"] = sum(p.ndim >= 2 for p in ref.parameters())
with open(f"{out}/rank{{d.rank}}.json", "w") as f:  # one file per rank: printed lines can interleave
    json.dump(result, f)
del model
torch.distributed.destroy_process_group()
"""


def test_only_rank0_reads_weights_and_untied_embeddings_are_units_of_their_own(tmp_path):
    """FSDP2 from rank 0's weights on a model whose input and output embeddings are not tied: rank 1 never
    holds the full weights, each rank keeps half, each embedding is sharded as its own unit (blocks + input
    embedding + output layer + root; the loss a forward method of the output layer's unit), and each parameter's
    gradient equals the unsharded model's on the same two batches. ZeRO-3 (same launch) on a
    model of 0.5 GB: rank 1's peak while building stays well under its size, the weights are rank 0's random init
    (as `none` builds it) and weight decay still finds the matrices."""
    import shutil

    path, big = tmp_path / "untied", tmp_path / "big"
    shutil.copytree(ROOT / "data/quickstart/model", path)
    shutil.copytree(ROOT / "data/quickstart/model", big)
    cfg = json.loads((path / "config.json").read_text()) | {"tie_word_embeddings": False}
    (path / "config.json").write_text(json.dumps(cfg))
    (big / "config.json").write_text(json.dumps(cfg | {"hidden_size": 1024, "intermediate_size": 4096,
                                                       "num_hidden_layers": 8, "num_attention_heads": 16,
                                                       "num_key_value_heads": 16, "head_dim": 64}))
    script = tmp_path / "rank0.py"
    script.write_text(RANK0_SCRIPT.format(root=str(ROOT), path=str(path), big=str(big), out=tmp_path))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script)],
                       capture_output=True, text=True, timeout=120,
                       # big blocks mapped and unmapped as they come, not kept in the heap: RSS shows what is held
                       env=os.environ | {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(2**20)})
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["meta_before_sharding"] is False
    assert ranks[1]["meta_before_sharding"] is True  # rank 1 never held real full weights
    for r in ranks:  # after sharding each rank holds about half
        assert r["local"] <= r["total"] // 2 + 1000
        assert r["units"] == cfg["num_hidden_layers"] + 3
    assert [r["loss"] for r in ranks] == pytest.approx(ranks[0]["ref_losses"], rel=1e-6)
    assert ranks[0]["norm"] == pytest.approx(ranks[0]["ref_norm"], rel=1e-5)
    assert ranks[0]["grads"] == ranks[1]["grads"] == pytest.approx(ranks[0]["ref_grads"], rel=1e-5)
    size = ranks[0]["zero3_bytes"]
    # rank 0 builds the whole model (measured: 1.66x its size), rank 1 its half and one module at a time (0.63x)
    assert size > 500e6 and ranks[0]["zero3_gain"] > size and ranks[1]["zero3_gain"] < 0.75 * size
    assert ranks[0]["zero3_sums"] == ranks[1]["zero3_sums"] == ranks[0]["ref_sums"]
    assert ranks[0]["zero3_decayed"] == ranks[1]["zero3_decayed"] == ranks[0]["ref_decayed"]


@pytest.fixture(scope="module")
def qlora(runs):
    """A base model with real weights on disk (QLoRA quantizes as it reads), then QLoRA runs."""
    from transformers import AutoConfig, AutoTokenizer

    base = runs / "qbase"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ROOT / "data/quickstart/model")).save_pretrained(base)
    AutoTokenizer.from_pretrained(ROOT / "data/quickstart/model").save_pretrained(base)
    data = str(runs / "data.jsonl")
    held = write_jsonl(runs / "qeval.jsonl", open(data).read().splitlines()[:16])
    # an evaluation (eval mode, no grad) between steps must leave the 4-bit weights as they were
    over = LORA | {"model.path": str(base), "model.random_init": "false", "model.load_in_4bit": "true",
                   "train.lr": 1e-2, "train.max_steps": 6, "checkpoint.save_every_steps": 3,
                   "data.eval_files": f"[{held}]", "train.eval_every_steps": 2}
    torchrun(0, strategy_args(runs, data, "qlora_single", over) + ["--train.max_steps=6"])
    torchrun(2, strategy_args(runs, data, "qlora_fsdp2", over | {"sharding.strategy": "fsdp2"})
             + ["--train.max_steps=6"])
    return runs


@pytest.mark.parametrize("name", ["qlora_single", "qlora_fsdp2"])
def test_qlora_trains_adapters_only_and_exports(qlora, name):
    rows = metrics(qlora / name)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3  # it learns
    ref = metrics(qlora / "qlora_single")
    for key in "loss", "eval_loss":
        assert all(abs(a[key] - b[key]) <= 1e-4 * a[key] for a, b in zip(ref, rows) if key in a)
    assert sum("eval_loss" in m for m in rows) == 3
    hf = qlora / name / "hf"
    base16 = AutoModelForCausalLM.from_pretrained(qlora / "qbase").eval()
    before = {n: p.clone() for n, p in base16.named_parameters()}
    merged = AutoModelForCausalLM.from_pretrained(hf / "merged").eval()
    changed = {n for n, p in merged.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith("proj.weight") for n in changed), changed  # only where adapters sit
    with_adapter = PeftModel.from_pretrained(base16, hf).eval()  # the adapter saves and loads
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():  # merged into the 16-bit base, not into dequantized 4-bit weights
        torch.testing.assert_close(with_adapter(ids).logits, merged(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name,nproc,step,over", [
    ("zero3_lora", 2, 4, VARIANTS["zero3_lora"][1]),
    ("qlora_fsdp2", 2, 3, {"sharding.strategy": "fsdp2"} | LORA | {"model.load_in_4bit": "true", "train.lr": 1e-2,
                                                                  "train.max_steps": 6, "model.random_init": "false"})])
def test_resume_keeps_frozen_weights_out(qlora, name, nproc, step, over):
    """LoRA checkpoints hold the adapters and their optimizer state only (the frozen base is rebuilt from
    model.path or the seed), in DeepSpeed's format or in DCP's around 4-bit weights; resuming is bit-identical."""
    ckpt = qlora / name / f"checkpoints/step-{step}"
    size_mib = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / 2**20
    assert size_mib < 2  # the full model with AdamW state is ~10 MiB
    over = over | {"checkpoint.resume": ckpt} | ({"model.path": str(qlora / "qbase")} if name == "qlora_fsdp2" else {})
    torchrun(nproc, strategy_args(qlora, str(qlora / "data.jsonl"), name + "_resumed", over))
    assert [m["loss"] for m in metrics(qlora / f"{name}_resumed")] == [m["loss"] for m in metrics(qlora / name)][step:]


@pytest.mark.parametrize("over,message", [
    ({"model.load_in_4bit": "true"}, "model.load_in_4bit: 4-bit weights cannot be trained; set sharding.lora_rank"),
    ({"model.load_in_4bit": "true", "sharding.lora_rank": 4}, "set model.random_init: false"),
    ({"sharding.strategy": "fsdp2"}, "sharding.strategy: fsdp2 needs torchrun"),
    ({"sharding.strategy": "deepspeed"}, "sharding.strategy: deepspeed needs torchrun"),
    ({"model.load_in_4bit": "true", "sharding.lora_rank": 4, "sharding.strategy": "deepspeed"},
     "model.load_in_4bit (QLoRA) does not work with DeepSpeed"),
])
def test_rejected_combinations(tmp_path, small_data, over, message):
    """train.main checks these first, before anything is loaded, and exits with the message (no traceback)."""
    problems = config.check(config.load(QS_CONFIG, run_args(tmp_path, small_data, **over)[2:]))
    assert any(message in p for p in problems), problems


def test_deepspeed_without_its_extra_is_refused_at_start_up(tmp_path, small_data, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find_spec(name, *a))
    cfg = config.load(QS_CONFIG, run_args(tmp_path, small_data, **{"sharding.strategy": "deepspeed"})[2:])
    assert "sharding.strategy: deepspeed needs the deepspeed extra: pip install -e '.[deepspeed]'" in config.check(cfg)
