"""The strict loader: unknown keys with suggestions, type errors, override precedence, every shipped YAML."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import config
import train  # noqa: F401  (imports every stage, which registers its section)
from config import SECTIONS
from conftest import ROOT


def load_text(tmp_path, text, *overrides):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return config.load(str(path), list(overrides))


def test_unknown_key_suggests_nearest(tmp_path):
    with pytest.raises(config.ConfigError) as e:
        load_text(tmp_path, "train:\n  lr: 1.0e-4\n  warmup_step: 3\n")
    assert "c.yaml:3: train.warmup_step: unknown key; did you mean 'train.warmup_steps'?" in str(e.value)


def test_unknown_section_suggests_nearest(tmp_path):
    with pytest.raises(config.ConfigError, match="unknown section; did you mean 'sampler'"):
        load_text(tmp_path, "samplr:\n  batch_size: 4\n")


def test_all_problems_reported_at_once(tmp_path):
    with pytest.raises(config.ConfigError) as e:
        load_text(tmp_path, "train:\n  lr: fast\n  epochs: 1.5\n  seeed: 1\nsharding:\n  strategy: fsdp\n")
    msg = str(e.value)
    assert msg.startswith("4 problem(s)")
    assert "train.lr: expected a number, got 'fast'" in msg
    assert "train.epochs: expected int, got float 1.5" in msg
    assert "did you mean 'train.seed'" in msg
    assert "sharding.strategy: 'fsdp' is not one of 'none', 'fsdp2'" in msg


def test_types(tmp_path):
    cfg = load_text(tmp_path, "train:\n  lr: 1e-3\n  max_steps: 5\ndata:\n  train_files: [a.jsonl]\n")
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)  # YAML 1.1 reads 1e-3 as a string
    with pytest.raises(config.ConfigError, match=r"data.train_files\[1\]: expected str, got int"):
        load_text(tmp_path, "data:\n  train_files: [a.jsonl, 3]\n")
    with pytest.raises(config.ConfigError, match="train.max_steps: expected int, got bool"):
        load_text(tmp_path, "train:\n  max_steps: true\n")


def test_override_precedence(tmp_path):
    cfg = load_text(tmp_path, "train:\n  lr: 1.0e-4\n  seed: 3\n", "--train.lr=5e-4", "--sampler.batch_size=7")
    assert cfg.train.lr == 5e-4  # override beats the file
    assert cfg.train.seed == 3  # the file beats the default
    assert cfg.train.epochs == 1  # default
    assert cfg.sampler.batch_size == 7
    with pytest.raises(config.ConfigError, match="train.lrr: unknown key; did you mean 'train.lr'"):
        load_text(tmp_path, "", "--train.lrr=1")
    with pytest.raises(config.ConfigError, match="expected --section.key=value"):
        load_text(tmp_path, "", "--lr=1")


def test_dump_round_trips(tmp_path):
    cfg = load_text(tmp_path, "train:\n  lr: 1.0e-4\n")
    (tmp_path / "d.yaml").write_text(config.dump(cfg))
    assert config.load(str(tmp_path / "d.yaml")) == cfg


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path):
    cfg = config.load(str(path))
    assert all(getattr(cfg, name) is not None for name in SECTIONS)
    assert config.check(cfg, launch=False) == []


def test_readme_documents_every_key():
    import dataclasses
    import re

    documented = set(re.findall(r"^\| `(\w+\.\w+)` \|", (ROOT / "README.md").read_text(), re.M))
    keys = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert documented == keys


def test_setup_mistakes_end_in_one_error_naming_the_key_and_the_fix(tmp_path):
    """A mistake seen at start-up and one seen after tokenizing, each run as a plain `python train.py`: exit code 1,
    at most 3 lines, the key or file named, no traceback."""
    from conftest import run_args, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", (ROOT / "data/quickstart/train.jsonl").read_text().splitlines()[:40])
    (tmp_path / "no_config").mkdir()
    (tmp_path / "a_file").write_text("")
    cases = {  # overrides: what the error must say
        "model_path": ({"model.path": tmp_path / "nowhere"}, "model.path: " + str(tmp_path / "nowhere") + " does not"),
        "too_long": ({"sampler.max_tokens_per_rank": 16, "data.max_seq_len": 4096},
                     "more than sampler.max_tokens_per_rank=16"),
    }  # the other mistakes are checked in this process (test_bounds_and_paths_are_checked_before_anything_runs)
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    names = list(cases)
    for pair in (names[i:i + 2] for i in range(0, len(names), 2)):  # two at a time: imports are most of it
        procs = {n: subprocess.Popen([sys.executable, "train.py",
                                      *run_args(tmp_path / n, data, **{"sharding.strategy": "none"} | cases[n][0])],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for n in pair}
        for n, p in procs.items():
            out, err = p.communicate(timeout=120)
            assert p.returncode == 1, (n, out, err)
            assert "Traceback" not in err and len(err.strip().splitlines()) <= 3, (n, err)
            assert err.startswith("error: ") and cases[n][1] in err, (n, err)


def test_bounds_and_paths_are_checked_before_anything_runs(tmp_path):
    """Numbers out of range are config errors with their YAML line; paths are config.check's, which creates nothing."""
    with pytest.raises(config.ConfigError) as e:
        load_text(tmp_path, "train:\n  lr: 0\n  min_lr_ratio: 1.5\nsharding:\n  lora_rank: -4\n",
                  "--data.train_files=[{path: a.jsonl, weight: 0}]")
    msg = str(e.value)
    assert "c.yaml:2: train.lr: 0.0 is out of range; it must be > 0" in msg
    assert "c.yaml:3: train.min_lr_ratio: 1.5 is out of range; it must be >= 0 and <= 1" in msg
    assert "c.yaml:5: sharding.lora_rank: -4 is out of range; it must be >= 0" in msg
    assert "command line: --data.train_files[0].weight: 0.0 is out of range; it must be > 0" in msg
    with pytest.raises(config.ConfigError, match="command line: --train.max_steps: expected int, got str 'many'"):
        load_text(tmp_path, "", "--train.max_steps=many")
    (tmp_path / "no_config").mkdir()
    (tmp_path / "a_file").write_text("")
    cfg = load_text(tmp_path, f"model:\n  path: {tmp_path / 'no_config'}\ndata:\n  train_files: [{tmp_path / 'x.jsonl'}]\n"
                    f"train:\n  output_dir: {tmp_path / 'out/run'}\n")
    problems = config.check(cfg)
    assert any("has no config.json" in p for p in problems) and any("x.jsonl does not exist" in p for p in problems)
    assert len(problems) == 3 and not (tmp_path / "out").exists()  # no tokenizer either; nothing created
    cfg.train.output_dir = str(tmp_path / "a_file/run")
    assert f"train.output_dir: {tmp_path}/a_file/run cannot be written" in config.check(cfg)[-1]
    cfg.train.output_dir = "/proc/forbidden/run"  # root may write anywhere, by os.access; not here
    assert "train.output_dir: /proc/forbidden/run cannot be written (/proc is not a writable" in config.check(cfg)[-1]


def test_check_prints_the_resolved_config_or_the_errors(capsys, monkeypatch):
    """`python train.py --check`'s main, in this process."""
    monkeypatch.chdir(ROOT)
    train.main(["--config", "configs/quickstart.yaml", "--check", "--train.lr=1e-3"])  # fsdp2, yet no torchrun
    assert "  lr: 0.001\n" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        train.main(["--config", "configs/quickstart.yaml", "--check", "--model.path=nowhere/at/all"])
    assert str(e.value.code).startswith("error: model.path: nowhere/at/all does not exist")


def test_import_graph():
    """No stage module imports train.py, at any depth of its functions, and the stage modules import each other
    without a cycle; the data stage's command line reaches no model code."""
    import ast

    stages = ["config", "tokenize_data", "model_setup", "sharding", "sampler", "checkpoint", "logging_utils", "train"]
    graph = {}
    for name in stages:
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        if_type_checking = [n for n in ast.walk(tree) if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]
        hints = {a.module for n in if_type_checking for a in ast.walk(n) if isinstance(a, ast.ImportFrom)}
        graph[name] = (imported - hints) & set(stages) - {name}
    assert not any("train" in deps for deps in graph.values())

    def reach(name, seen=()):
        assert name not in seen, f"import cycle: {' -> '.join(seen + (name,))}"
        return set().union({name}, *(reach(d, seen + (name,)) for d in graph[name]))

    assert reach("tokenize_data") == {"tokenize_data", "config"}
    assert reach("sampler") == {"sampler", "config", "tokenize_data"}
    reach("train")
