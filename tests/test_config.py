"""The strict loader: unknown keys with suggestions, type errors, override precedence, every shipped YAML."""

from pathlib import Path

import pytest

import config
from conftest import ROOT
from train import SECTIONS


def load_text(tmp_path, text, *overrides):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return config.load(str(path), SECTIONS, list(overrides))


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
    assert cfg["train"].lr == 1e-3 and isinstance(cfg["train"].lr, float)  # YAML 1.1 reads 1e-3 as a string
    with pytest.raises(config.ConfigError, match=r"data.train_files\[1\]: expected str, got int"):
        load_text(tmp_path, "data:\n  train_files: [a.jsonl, 3]\n")
    with pytest.raises(config.ConfigError, match="train.max_steps: expected int, got bool"):
        load_text(tmp_path, "train:\n  max_steps: true\n")


def test_override_precedence(tmp_path):
    cfg = load_text(tmp_path, "train:\n  lr: 1.0e-4\n  seed: 3\n", "--train.lr=5e-4", "--sampler.batch_size=7")
    assert cfg["train"].lr == 5e-4  # override beats the file
    assert cfg["train"].seed == 3  # the file beats the default
    assert cfg["train"].epochs == 1  # default
    assert cfg["sampler"].batch_size == 7
    with pytest.raises(config.ConfigError, match="train.lrr: unknown key; did you mean 'train.lr'"):
        load_text(tmp_path, "", "--train.lrr=1")
    with pytest.raises(config.ConfigError, match="expected --section.key=value"):
        load_text(tmp_path, "", "--lr=1")


def test_dump_round_trips(tmp_path):
    cfg = load_text(tmp_path, "train:\n  lr: 1.0e-4\n")
    (tmp_path / "d.yaml").write_text(config.dump(cfg))
    assert config.load(str(tmp_path / "d.yaml"), SECTIONS) == cfg


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path):
    cfg = config.load(str(path), SECTIONS)
    assert set(cfg) == set(SECTIONS)


def test_readme_documents_every_key():
    import dataclasses
    import re

    documented = set(re.findall(r"^\| `(\w+\.\w+)` \|", (ROOT / "README.md").read_text(), re.M))
    keys = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert documented == keys
