"""Checkpoints against the run that was never interrupted: killed (kill -9), stopped (SIGTERM, SIGUSR1) or
crashed in the middle of a save, a run resumes to bit-identical losses and weights; on another world size it
continues the same data order. Exports reload with the logits of the model in memory. Faults are injected by
tests/faults.py."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import time

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import checkpoint
import config
import model_setup
import sharding
import tokenize_data
import train
from conftest import QS_CONFIG, QS_MODEL, ROOT, metrics, run_args, torchrun, write_jsonl

FSDP2 = {"sharding.strategy": "fsdp2", "train.max_steps": 10, "checkpoint.save_every_steps": 5}


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    write_jsonl(tmp / "data.jsonl", (ROOT / "data/quickstart/train.jsonl").read_text().splitlines()[:192])
    return tmp


def args(tmp, name, **over):
    return run_args(tmp, str(tmp / "data.jsonl"), **FSDP2 | {"train.output_dir": str(tmp / name)} | over)


@pytest.fixture(scope="module")
def ref(tmp):
    """2 ranks, FSDP2, 10 steps, uninterrupted; checkpoints at steps 5 and 10."""
    torchrun(2, args(tmp, "ref"))
    return tmp / "ref"


def with_fault(nproc: int, args: list[str], fault: str, rank: int | None = None) -> subprocess.CompletedProcess:
    launcher = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc_per_node={nproc}"] if nproc else [])
    env = os.environ | {"OMP_NUM_THREADS": "1", "FAULT": fault} | ({} if rank is None else {"FAULT_RANK": str(rank)})
    p = subprocess.run(launcher + ["tests/faults.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=env)
    assert p.returncode != 0, p.stdout[-2000:]
    return p


def our_traceback(text: str) -> bool:
    """A traceback through the trainer's files (torchrun prints its own ChildFailedError one when a rank fails)."""
    return f'File "{ROOT}/' in text


def latest(run) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


def losses(run) -> list[float]:
    return [m["loss"] for m in metrics(run)]


def weights(run):
    return load_file(str(run / "hf" / "model.safetensors"))


def test_kill9_and_sigterm_then_resume_is_bit_identical(tmp, ref):
    run = tmp / "run"
    with_fault(2, args(tmp, "run"), "sharding.clip_and_step:7:kill")  # both ranks die during step 7
    assert latest(run) == "step-5" and [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5, 6]
    # resumed at step 5; in step 7 torchrun gets SIGTERM (as from a scheduler) and forwards it to both ranks
    p = with_fault(2, args(tmp, "run"), "sharding.clip_and_step:2:term-parent", rank=0)
    stopped = int(latest(run).removeprefix("step-"))
    assert 7 <= stopped < 10 and f"stopped at step {stopped} of 10 (SIGTERM)" in p.stdout
    assert len(metrics(run)) == stopped and not (run / "hf").exists()
    torchrun(2, args(tmp, "run"))
    assert [m["step"] for m in metrics(run)] == list(range(1, 11))
    assert losses(run) == losses(ref)  # bit-identical on CPU
    w, w_ref = weights(run), weights(ref)
    assert all(torch.equal(w[k], w_ref[k]) for k in w_ref)


def test_resume_on_another_world_size_continues_the_same_data_order(tmp, ref):
    """2 ranks -> 1 rank (from step 5, saving every 2 steps) -> 2 ranks (from step 8); rank 1 alone gets SIGUSR1
    in step 9, and both ranks stop after it."""
    p = torchrun(1, args(tmp, "one", **{"checkpoint.resume": ref / "checkpoints/step-5",
                                        "checkpoint.save_every_steps": 2}))
    assert "resuming from" in p.stdout and "changed: train.output_dir" in p.stdout
    one = metrics(tmp / "one")
    assert [m["step"] for m in one] == [6, 7, 8, 9, 10]
    assert sorted(os.listdir(tmp / "one/checkpoints")) == ["latest", "step-10", "step-8"]  # keep_last: 2
    p = with_fault(2, args(tmp, "two", **{"checkpoint.resume": tmp / "one/checkpoints/step-8"}),
                   "sampler.collate:1:usr1", rank=1)
    assert "stopped at step 9 of 10 (another rank was signalled)" in p.stdout and latest(tmp / "two") == "step-9"
    two = metrics(tmp / "two")
    assert [m["step"] for m in two] == [9]
    expected = losses(ref)
    for m in one + two:  # another reduction order: equal to fp32 rounding
        assert m["loss"] == pytest.approx(expected[m["step"] - 1], abs=1e-5)


def test_crash_during_a_save_leaves_the_previous_checkpoint_usable(tmp):
    """One process, checkpoints every 3 steps, killed between the files of the step-6 save (the model and
    optimizer shards are written, the RNG states and trainer state are not): the resume continues from step 3."""
    a = args(tmp, "crash", **{"sharding.strategy": "none", "checkpoint.save_every_steps": 3})
    run = tmp / "crash"
    with_fault(0, a, "checkpoint._rng_state:2:kill")
    assert latest(run) == "step-3" and (run / "checkpoints/step-6.tmp/dcp").is_dir()
    first = losses(run)
    assert len(first) == 6
    torchrun(0, a)
    assert losses(run)[:6] == first and len(losses(run)) == 10
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step-10", "step-9"]  # no leftover step-6.tmp


def test_a_save_stopped_before_latest_is_updated_is_not_resumed(tmp_path, monkeypatch):
    """Stopped after step-2 was renamed into place but before `latest` named it: resuming takes step-1, whole."""
    model = torch.nn.Linear(3, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(3)).sum().backward()
    optimizer.step()
    saved = model.weight.detach().clone()
    cfg = checkpoint.CheckpointConfig(keep_last=1)
    checkpoint.save(tmp_path, 1, model, optimizer, {"step": 1}, "train: {}\n", cfg, 0)
    optimizer.step()

    def stop(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "_write_latest", stop)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 2, model, optimizer, {"step": 2}, "train: {}\n", cfg, 0)
    assert (tmp_path / "checkpoints/step-2/trainer_state.json").exists()
    path, state = checkpoint.find(tmp_path, checkpoint.CheckpointConfig())
    assert path.name == "step-1" and state["step"] == 1
    checkpoint.load(path, model, optimizer, 0)
    assert torch.equal(model.weight, saved) and optimizer.state[model.weight]["step"] == 1


def test_rotation_never_deletes_the_checkpoint_latest_names(tmp_path):
    for step in (2, 4, 6, 8):
        (tmp_path / f"step-{step}").mkdir()
    (tmp_path / "step-10.tmp").mkdir()
    checkpoint._write_latest(tmp_path, "step-4")  # e.g. step-6 and -8 are left from a crashed run
    checkpoint._rotate(tmp_path, keep_last=1)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-10.tmp", "step-4", "step-8"]


def test_bad_resume_settings_are_refused_with_the_fix(tmp, ref):
    """train.main checks the checkpoint's trainer state and config before it loads a model."""
    def resume_point(**over):
        cfg = config.load(QS_CONFIG, args(tmp, "bad", **over)[2:])
        cache = tokenize_data.TokenCache(tokenize_data.build_cache(
            cfg.data.train_files, tokenize_data.load_tokenizer(cfg.model.path), cfg.data))
        with pytest.raises(checkpoint.ResumeError) as e:
            checkpoint.resume_point(tmp / "bad", cfg, cache.path.name)
        return str(e.value)

    msg = resume_point(**{"checkpoint.resume": ref / "checkpoints/step-5", "sampler.batch_size": 16,
                          "data.max_seq_len": 300, "sharding.strategy": "deepspeed"})
    assert "sampler.batch_size: 32 in the checkpoint, 16 now" in msg and "token cache differs" in msg
    assert "sharding.strategy: 'fsdp2' in the checkpoint, 'deepspeed' now" in msg
    assert "checkpoint.resume: never" in msg
    assert "nowhere cannot be used" in resume_point(**{"checkpoint.resume": tmp / "nowhere"})


def damaged_copy(tmp, ref, name, damage) -> tuple:
    """ref's checkpoints (steps 5 and 10, `latest` naming step-10) under a new run, step-10's largest file damaged."""
    shutil.copytree(ref / "checkpoints", tmp / name / "checkpoints")
    target = max((f for f in (tmp / name / "checkpoints/step-10").rglob("*") if f.is_file()),
                 key=lambda f: f.stat().st_size)
    data = bytearray(target.read_bytes())
    target.write_bytes(data[:len(data) // 2] if damage == "truncate" else
                       data[:1000] + bytes([data[1000] ^ 1]) + data[1001:])
    return tmp / name, target


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_resumed(tmp, ref):
    run, target = damaged_copy(tmp, ref, "damaged", "truncate")
    p = torchrun(2, args(tmp, "damaged"))
    assert f"checkpoint {run}/checkpoints/step-10 is damaged ({target}" in p.stdout
    assert "resuming from" in p.stdout and "step-5" in p.stdout
    assert (run / "checkpoints/step-10.damaged").is_dir()  # kept for a human to look at
    assert [m["step"] for m in metrics(run)] == list(range(6, 11))
    assert losses(run) == losses(ref)[5:]  # bit for bit


def test_no_intact_checkpoint_is_refused_and_an_explicit_damaged_one_too(tmp, ref):
    """A flipped bit (step-10) and a truncation (step-5): checkpoint.find, which train.py runs on rank 0 before
    anything is loaded, refuses both and names the files; an explicit path that is damaged is refused too."""
    run, target = damaged_copy(tmp, ref, "all-damaged", "flip")
    step5 = max((f for f in (run / "checkpoints/step-5").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    step5.write_bytes(step5.read_bytes()[:-10])
    with pytest.raises(checkpoint.ResumeError) as e:
        checkpoint.find(run, checkpoint.CheckpointConfig())
    msg = str(e.value)
    assert f"no intact checkpoint under {run}/checkpoints" in msg and "checkpoint.resume: never" in msg
    assert f"{target.name} does not match its checksum" in msg and f"{step5} has" in msg
    shutil.copytree(ref / "checkpoints/step-5", tmp / "explicit-src")
    (tmp / "explicit-src/trainer_state.json").write_text("{}")
    with pytest.raises(checkpoint.ResumeError, match="cannot be used: .*trainer_state.json"):
        checkpoint.find(tmp, checkpoint.CheckpointConfig(resume=str(tmp / "explicit-src")))


def test_a_crafted_rng_file_is_refused_and_its_code_never_runs(tmp, ref, monkeypatch):
    """Someone else's checkpoint whose RNG file unpickles to code (its manifest made to match)."""
    ckpt, marker = tmp / "crafted", tmp / "crafted-ran"
    shutil.copytree(ref / "checkpoints/step-5", ckpt)

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"python": Evil()}, ckpt / "rng-rank0.pt")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["rng-rank0.pt"] = [(ckpt / "rng-rank0.pt").stat().st_size, checkpoint._crc32(ckpt / "rng-rank0.pt")]
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    a = args(tmp, "crafted-run", **{"sharding.strategy": "none", "checkpoint.resume": ckpt})
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:  # train.py's main, in this process: the error it exits with
        train.main(a)
    assert f"{ckpt} holds more than tensors and numbers; refused" in str(e.value.code)
    assert not marker.exists()


@pytest.mark.parametrize("where", [".metadata", "an optimizer setting", "no .metadata"])
def test_a_crafted_dcp_file_is_refused_and_its_code_never_runs(tmp, ref, monkeypatch, where):
    """torch.distributed.checkpoint unpickles its .metadata and its non-tensor items (the optimizer's
    settings): someone else's checkpoint whose pickles would call code, its manifest made to match."""
    ckpt, marker = tmp / f"crafted-dcp-{where}", tmp / f"crafted-dcp-{where}-ran"
    shutil.copytree(ref / "checkpoints/step-5", ckpt)

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    a = args(tmp, f"crafted-dcp-run-{where}", **{"sharding.strategy": "none", "checkpoint.resume": ckpt})
    if where == ".metadata":
        (ckpt / "dcp/.metadata").write_bytes(pickle.dumps(Evil()))
    elif where == "no .metadata":  # nothing to run, but nothing DCP can read either
        (ckpt / "dcp/.metadata").unlink()
    else:  # the run's whole state, written by DCP itself, with a learning rate that unpickles to code
        cfg = config.load(QS_CONFIG, a[2:])
        model = model_setup.load_model(cfg.model, torch.device("cpu"))
        sd = sharding._state_dicts(model, train.build_optimizer(model, cfg.train))
        sd["optim"]["param_groups"][0]["lr"] = Evil()
        shutil.rmtree(ckpt / "dcp")
        torch.distributed.checkpoint.save(sd, checkpoint_id=ckpt / "dcp")
    manifest = {p.relative_to(ckpt).as_posix(): [p.stat().st_size, checkpoint._crc32(p)]
                for p in ckpt.rglob("*") if p.is_file() and p.name != "manifest.json"}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        train.main(a)
    refusal = "cannot be read" if where == "no .metadata" else "holds more than tensors and numbers; refused"
    assert f"error: {ckpt} {refusal}" in str(e.value.code)
    assert not marker.exists()


def test_a_failed_save_keeps_the_previous_checkpoint_and_says_what_was_lost(tmp, ref):
    """Rank 1 alone cannot write during the step-10 save (ENOSPC): both ranks stop, `latest` still names step-5,
    no step-10 leftovers; the relaunch resumes from step-5 bit for bit."""
    run = tmp / "nospace"
    p = with_fault(2, args(tmp, "nospace"), "checkpoint._rng_state:2:enospc", rank=1)
    assert "No space left on device" in p.stderr and "steps 6-10 are lost" in p.stderr
    assert not our_traceback(p.stderr)
    assert latest(run) == "step-5" and sorted(os.listdir(run / "checkpoints")) == ["latest", "step-5"]
    torchrun(2, args(tmp, "nospace"))
    assert losses(run)[-5:] == losses(ref)[5:]


def test_a_stalled_rank_ends_the_job_within_the_timeout(tmp):
    """Rank 1 sleeps 10 s before step 2's reduction; with a 5 s collective timeout the job ends well within
    timeout + 30 s of the stall, and each rank names the step and phase it was in."""
    a = args(tmp, "stall", **{"train.collective_timeout_s": 5, "train.max_steps": 3})
    p = with_fault(2, a, "sharding.reduce_gradients:2:sleep10", rank=1)
    stalled_at = float(p.stdout.split("sleeps 10 s at ")[1].split()[0])
    assert time.time() - stalled_at < 5 + 30
    assert "error: rank 0 at step 2 (reduce): a collective failed" in p.stderr
    assert "error: rank 1 at step 2 (reduce): a collective failed" in p.stderr  # when it wakes: its peer is gone
    assert "train.collective_timeout_s=5" in p.stderr and not our_traceback(p.stderr)


def in_memory_logits(model, ids):
    """The packed model's logits for one sample, through its own attention."""
    cu = torch.tensor([0, ids.shape[1]], dtype=torch.int32)
    kw = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": ids.shape[1], "max_length_k": ids.shape[1]}
    return model.lm(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None], **kw).logits


@torch.no_grad()
def test_exports_reload_with_the_logits_of_the_model_in_memory(tmp_path):
    """Full model (sharded safetensors with an index) and LoRA (adapter + merged/), fp32, one process."""
    cfg = model_setup.ModelConfig(path=QS_MODEL, random_init=True, dtype="float32")
    ids = torch.arange(3, 60)[None]
    torch.manual_seed(0)
    model = model_setup.load_model(cfg, torch.device("cpu"))
    checkpoint.export_hf(model, tokenize_data.load_tokenizer(cfg.path), tmp_path / "full", 0, max_shard_size="200KB")
    hf = tmp_path / "full/hf"
    assert (hf / "model.safetensors.index.json").exists() and len(list(hf.glob("model-*.safetensors"))) > 1
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(hf)(ids).logits, in_memory_logits(model, ids),
                               atol=1e-5, rtol=0)

    torch.manual_seed(0)
    model = model_setup.load_model(cfg, torch.device("cpu"))
    base_state = {k: v.clone() for k, v in model.lm.state_dict().items()}
    lora = sharding.ShardingConfig(strategy="none", lora_rank=4, lora_alpha=8.0)
    model = sharding.shard_model(model, lora, sharding.Dist(0, 1, torch.device("cpu")))
    for name, p in model.named_parameters():  # trained-looking adapters (peft initializes lora_B to zero)
        if "lora_B" in name:
            p.normal_(0, 0.1)
    checkpoint.export_hf(model, tokenize_data.load_tokenizer(cfg.path), tmp_path / "lora", 0)
    hf, expected = tmp_path / "lora/hf", in_memory_logits(model, ids)
    merged = AutoModelForCausalLM.from_pretrained(hf / "merged")
    torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=0)
    base = AutoModelForCausalLM.from_config(merged.config)
    base.load_state_dict(base_state)
    torch.testing.assert_close(PeftModel.from_pretrained(base, hf)(ids).logits, expected, atol=1e-5, rtol=0)
