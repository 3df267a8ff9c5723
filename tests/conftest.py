import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ["SFT_COMPILE_BACKEND"] = "eager"  # model.compile captures the graphs without inductor's minute of codegen
sys.path.insert(0, str(ROOT))
QS_MODEL = str(ROOT / "data/quickstart/model")
QS_CONFIG = str(ROOT / "configs/quickstart.yaml")


def write_jsonl(path: Path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


@pytest.fixture
def small_data(tmp_path) -> str:
    """The first 192 quickstart chats, in a temporary file."""
    lines = (ROOT / "data/quickstart/train.jsonl").read_text().splitlines()[:192]
    return write_jsonl(tmp_path / "small.jsonl", lines)


def run_args(tmp_path: Path, data: str, **overrides) -> list[str]:
    """Arguments of train.py for a short fp32 run of the quickstart model on `data`."""
    base = {"data.train_files": f"[{data}]", "data.cache_dir": str(tmp_path / "cache"),
            "train.output_dir": str(tmp_path / "run"), "train.heldout_file": "", "data.eval_files": "[]",
            "train.max_steps": 3,
            "train.warmup_steps": 0, "sampler.batch_size": 32, "logging.log_every_steps": 1,
            "sharding.compute_dtype": "float32", "model.dtype": "float32", "train.lr": 1e-3}
    base |= {k.replace("__", "."): v for k, v in overrides.items()}
    return ["--config", QS_CONFIG] + [f"--{k}={v}" for k, v in base.items()]


def torchrun(nproc: int, args: list[str], *extra, timeout: int = 300) -> subprocess.CompletedProcess:
    """train.py with `nproc` ranks: 0 is a plain process, 1 a one-rank process group, both run in this process;
    more are launched by torchrun."""
    if nproc <= 1 and not extra:
        return in_process(args, one_rank=nproc == 1)
    return torchrun_in(ROOT, nproc, args, *extra, timeout=timeout)


def in_process(args: list[str], one_rank: bool = False) -> subprocess.CompletedProcess:
    """train.main(args) in this process, as `python train.py` (or torchrun with one rank) would run it with
    OMP_NUM_THREADS=1, without the seconds of imports a new interpreter costs; its stdout is returned, the signal
    handlers and environment it needs undone."""
    import contextlib
    import io
    import signal
    import socket

    import torch
    import train

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    threads, out, cwd, environ = torch.get_num_threads(), io.StringIO(), os.getcwd(), dict(os.environ)
    torch.set_num_threads(1)
    os.chdir(ROOT)
    if one_rank:  # what torchrun sets for its one worker
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    try:
        with contextlib.redirect_stdout(out):
            train.main(list(args))
    except SystemExit as e:
        raise AssertionError(f"train.py exited with {e.code!r}\n{out.getvalue()[-3000:]}") from None
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)
        for s, h in handlers.items():
            signal.signal(s, h)
    return subprocess.CompletedProcess(["train.py", *args], 0, out.getvalue(), "")


def torchrun_in(repo: Path, nproc: int, args: list[str], *extra, timeout: int = 300) -> subprocess.CompletedProcess:
    """`repo`'s train.py under torchrun with `nproc` processes (0: a plain process); asserts it succeeded."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *extra, "train.py", *args]
    if nproc == 0:  # a plain process, no torchrun
        cmd = [sys.executable, "train.py", *args]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p


LORA = {"sharding.lora_rank": 4, "sharding.lora_alpha": 8.0}
SIGNALS = {"logging.sample_losses": "true", "logging.noise_scale": "true"}  # (they do not change the training)
VARIANTS = {  # name: (processes, overrides); "ref" and "ref_lora" are single processes without sharding
    "ref": (0, {}), "ref_lora": (0, LORA), "micro": (0, {"sampler.max_tokens_per_rank": 128} | SIGNALS),
    "replicated2": (2, SIGNALS), "fsdp2": (2, {"sharding.strategy": "fsdp2", "sampler.max_tokens_per_rank": 256} | SIGNALS),
    # one launch for CPU offload, activation checkpointing and bf16 compute (fp32 master weights and reduction)
    "fsdp2_offload_checkpointing_bf16": (2, {"sharding.strategy": "fsdp2", "sharding.cpu_offload": "true",
                                             "model.gradient_checkpointing": "true",
                                             "sharding.compute_dtype": "bfloat16"}),
    # and one for compiled blocks, with activation checkpointing (every 2nd block) and LoRA layers inside them
    "fsdp2_compile_checkpointing_lora": (2, {"sharding.strategy": "fsdp2", "model.compile": "true",
                                             "model.gradient_checkpointing": "true",
                                             "model.checkpoint_every": 2} | LORA),
    "zero2": (2, {"sharding.strategy": "deepspeed", "sharding.zero_stage": 2}),
    "zero3_lora": (2, {"sharding.strategy": "deepspeed", "sharding.zero_stage": 3} | LORA),
}  # one launch per path: hybrid FSDP2 runs across two launched "nodes" (test_two_nodes_match_one); LoRA under
#   `none` with 2 ranks is the replicated all-reduce of fewer tensors (replicated2), ZeRO-1 a subset of ZeRO-2
VARIANTS["zero3_lora"][1]["checkpoint.save_every_steps"] = 2  # resumed in test_resume_keeps_frozen_weights_out


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Five fp32 steps of every variant on the same 320 chats and seed (test_train.py, test_sharding.py)."""
    tmp = tmp_path_factory.mktemp("runs")
    data = write_jsonl(tmp / "data.jsonl", (ROOT / "data/quickstart/train.jsonl").read_text().splitlines()[:320])
    for name, (nproc, over) in VARIANTS.items():
        p = torchrun(nproc, strategy_args(tmp, data, name, over))
        (tmp / f"{name}.log").write_text(p.stdout + p.stderr)  # the process's output (stdout only in-process)
    return tmp


def strategy_args(tmp, data, name, over):
    return run_args(tmp, data, **{"sharding.strategy": "none", "train.output_dir": str(tmp / name),
                                  "train.max_steps": 5} | over)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    import torch

    for item in items:  # with -n 2 (pytest-xdist), tests that share a module or session fixture share a worker
        scopes = {defs[-1].scope for defs in item._fixtureinfo.name2fixturedefs.values()}
        group = "runs" if "runs" in item.fixturenames else item.module.__name__ if "module" in scopes else None
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
    # the longest work first (the strategy runs, the quickstart), so the workers end together
    items.sort(key=lambda item: ("runs" not in item.fixturenames, "quickstart" not in item.name))
    if torch.cuda.is_available():
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; run `python -m pytest -m gpu` on one"))


TEMPLATES = ROOT.parent / "shared" / "templates"  # real chat templates of 11 families (read-only fixtures)
HARMONY_TOKENS = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>"]


def family_tokenizer(family: str):
    """The quickstart BPE vocabulary plus a family's special tokens and its real chat template (tokens.json);
    "harmony" is tests/templates/harmony.jinja, a template of gpt-oss's kind written for these tests."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(QS_MODEL)
    if family == "harmony":
        tok.add_special_tokens({"eos_token": "<|return|>", "additional_special_tokens": HARMONY_TOKENS})
        tok.chat_template = (ROOT / "tests/templates/harmony.jinja").read_text()
        return tok
    meta = json.loads((TEMPLATES / "tokens.json").read_text())
    spec = meta.get(family) or (meta[family.split("_")[0]]
                                | {"template_file": meta["_variants"][family]["template_file"]})
    special = {f"{k}_token": spec[k] for k in ("bos", "eos", "pad", "unk") if spec.get(k)}
    extra = [t for t in spec.get("special_tokens", []) + spec.get("other_markup", []) if t not in special.values()]
    tok.add_special_tokens(special | {"additional_special_tokens": extra})
    tok.chat_template = (TEMPLATES / spec["template_file"]).read_text()
    return tok
