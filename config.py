"""The strict YAML loader and the typed `Config`: YAML sections, each a dataclass its stage module
registers with `@config.section("name")` (`model`, `train` are here). Unknown keys (with the nearest
name), wrong types and ranges, in the file or `--section.key=value`, are reported at once with their
YAML line. A command checks only its sections: data prep imports no model code."""

import dataclasses
import difflib
import os
import sys
import tempfile
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import yaml

if TYPE_CHECKING:  # Config's type hints only; each stage module imports this one, not the reverse
    from checkpoint import CheckpointConfig
    from logging_utils import LogConfig
    from sampler import SamplerConfig
    from sharding import ShardingConfig
    from tokenize_data import DataConfig

SECTIONS: dict[str, type] = {}  # section name -> dataclass, filled as stage modules are imported


def section(name: str):
    """Class decorator: registers a dataclass as section `name` (each stage module has its own)."""
    def register(cls):
        SECTIONS[name] = cls
        return cls
    return register


def ge(low, high=None):  # a number >= low (and <= high), checked at load with the key's YAML line
    return ("ge", low, high)


def gt(low):  # a number > low
    return ("gt", low, None)


@section("model")
@dataclass
class ModelConfig:
    path: str = ""  # HF model directory (config, tokenizer, weights) or hub id
    random_init: bool = False  # true: build the architecture from `path`'s config, random weights
    dtype: Literal["float32", "bfloat16"] = "bfloat16"  # dtype of the weights as loaded
    # "packed": ours (per-sample attention on packed rows); others: transformers' own, to compare
    attn_implementation: Literal["packed", "sdpa", "eager", "flash_attention_2"] = "packed"
    gradient_checkpointing: bool = False  # recompute in backward: less memory, ~30% more compute
    compile: bool = False  # torch.compile per decoder block, dynamic shapes; packed attention eager
    checkpoint_every: Annotated[int, ge(1)] = 1  # gradient checkpointing of blocks 0, k, 2k, ...
    # chunked: fused, fast; plain: all logits at once (same values, more memory)
    loss: Literal["chunked", "plain"] = "chunked"
    load_in_4bit: bool = False  # QLoRA: NF4, double-quant (bitsandbytes); needs LoRA, real weights
    self_check: bool = True  # stop before step 1 if packed and per-sample forwards differ (README)


@section("train")
@dataclass
class TrainConfig:
    output_dir: str = "runs/default"  # all of the run's files: config, metrics, checkpoints, hf/
    epochs: Annotated[int, ge(1)] = 1  # passes over data.train_files (ignored when max_steps > 0)
    max_steps: Annotated[int, ge(0)] = 0  # stop after this many optimizer steps; 0 = run the epochs
    lr: Annotated[float, gt(0)] = 2e-5  # peak learning rate
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay to min_lr_ratio*lr
    warmup_steps: Annotated[int, ge(0)] = 0  # linear warmup from 0 over this many steps
    min_lr_ratio: Annotated[float, ge(0, 1)] = 0.0  # final lr as a fraction of lr (cosine, linear)
    weight_decay: Annotated[float, ge(0)] = 0.0  # AdamW's, on matrices only (not norms or biases)
    beta2: Annotated[float, ge(0, 1)] = 0.95  # AdamW second-moment decay (beta1 = 0.9)
    max_grad_norm: Annotated[float, ge(0)] = 1.0  # clip the global gradient norm to this; 0 = none
    seed: int = 42  # model init, data order and every other random choice
    eval_every_steps: Annotated[int, ge(0)] = 0  # data.eval_files loss every N steps and at the end
    heldout_file: str = ""  # chat JSONL; after export, greedy exact match on its last messages
    collective_timeout_s: Annotated[float, gt(0)] = 300  # a collective (or process group creation)
    #   waiting longer on a stalled or dead rank ends the job, naming the step and phase


@dataclass
class Config:
    """A run's config: a checked dataclass per section (`cfg.train.lr`), None where unused."""
    data: "DataConfig | None" = None
    model: ModelConfig | None = None
    sharding: "ShardingConfig | None" = None
    sampler: "SamplerConfig | None" = None
    train: TrainConfig | None = None
    checkpoint: "CheckpointConfig | None" = None
    logging: "LogConfig | None" = None


class ConfigError(ValueError):
    """Raised by `load` with every problem of the config, one a line."""


def _check(value, tp, where: str, problems: list[str]):
    """Returns `value` converted to type `tp`, or appends a problem naming `where`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:  # a number with bounds: ge(low, high) or gt(low)
        value = _check(value, args[0], where, problems)
        kind, low, high = args[1]
        if isinstance(value, (int, float)) and (value < low or (kind == "gt" and value == low)
                                                or (high is not None and value > high)):
            problems.append(f"{where}: {value} is out of range; it must be {'>=' if kind == 'ge' else '>'} {low}"
                            + (f" and <= {high}" if high is not None else ""))
        return value
    if origin in (typing.Union, types.UnionType):  # str | Source: a dict -> the dataclass, else str
        cls = next((a for a in args if dataclasses.is_dataclass(a)), None)
        return _check(value, cls if isinstance(value, dict) and cls else args[0], where, problems)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return tp(**_check_fields(value, tp, where, problems))
        problems.append(f"{where}: expected a mapping with keys {', '.join(typing.get_type_hints(tp))}")
    elif origin is typing.Literal:
        if value in args:
            return value
        problems.append(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
    elif origin is list:
        if isinstance(value, list):
            return [_check(v, args[0], f"{where}[{i}]", problems) for i, v in enumerate(value)]
        problems.append(f"{where}: expected a list, got {type(value).__name__} {value!r}")
    # YAML 1.1 reads `1e-3` (no dot) as a string
    elif tp is float and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            problems.append(f"{where}: expected a number, got {value!r}")
    elif isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    else:
        problems.append(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _check_fields(body: dict, cls: type, prefix: str, problems: list[str], at=lambda key: key) -> dict:
    """`cls`'s checked keyword arguments from `body`; an unknown key gets the nearest name."""
    hints, kwargs = typing.get_type_hints(cls, include_extras=True), {}
    for key, value in body.items():
        if key not in hints:
            hint = difflib.get_close_matches(str(key), hints, n=1)
            path = prefix.rpartition(": ")[2]  # the key's path, without the file
            end = f"; did you mean '{path}.{hint[0]}'?" if hint else f"; valid keys: {', '.join(hints)}"
            problems.append(f"{at(f'{prefix}.{key}')}: unknown key{end}")
        else:
            kwargs[key] = _check(value, hints[key], at(f"{prefix}.{key}"), problems)
    return kwargs


def _key_lines(text: str) -> dict[str, int]:
    """`section.key` -> line number in the YAML text, for error messages."""
    lines, root = {}, yaml.compose(text)
    if isinstance(root, yaml.MappingNode):
        for s_node, section in root.value:
            lines[s_node.value] = s_node.start_mark.line + 1
            if isinstance(section, yaml.MappingNode):
                for k_node, _ in section.value:
                    lines[f"{s_node.value}.{k_node.value}"] = k_node.start_mark.line + 1
    return lines


def parse_overrides(args: list[str]) -> dict[str, dict]:
    """['--train.lr=1e-3'] -> {'train': {'lr': 0.001}}; values are parsed as YAML."""
    out: dict[str, dict] = {}
    for arg in args:
        key, eq, raw = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq or key.count(".") != 1:
            raise ConfigError(f"override {arg!r}: expected --section.key=value, e.g. --train.lr=1e-4")
        section, name = key.split(".")
        out.setdefault(section, {})[name] = yaml.safe_load(raw) if raw else ""
    return out


def load(path: str, overrides: list[str] = (), sections: tuple[str, ...] | None = None) -> Config:
    """The Config of `path` with `overrides`: only `sections` (default: every registered one; their
    modules must be imported) checked and built, absent ones with defaults, the others None."""
    text = Path(path).read_text()
    try:
        raw = yaml.safe_load(text) or {}
        lines = _key_lines(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    names = [f.name for f in dataclasses.fields(Config)]
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections ({', '.join(names)})")
    overridden = set()
    for name, values in parse_overrides(list(overrides)).items():
        if isinstance(body := raw.setdefault(name, {}), dict):
            body.update(values)
        overridden |= {f"{name}.{key}" for key in values} | ({name} if name not in lines else set())
    problems, out = [], {}

    def at(key):
        line = f":{lines[key]}" if key in lines else ""
        return f"command line: --{key}" if key in overridden else f"{path}{line}: {key}"

    for name, body in raw.items():
        if name not in names:
            hint = difflib.get_close_matches(str(name), names, n=1)
            end = f"; did you mean '{hint[0]}'?" if hint else f"; valid: {', '.join(names)}"
            problems.append(f"{at(name)}: unknown section{end}")
        elif not isinstance(body, dict):
            problems.append(f"{at(name)}: expected a mapping of keys, got {body!r}")
    for name in sections or SECTIONS:
        body = raw.get(name) or {}
        if isinstance(body, dict):
            out[name] = SECTIONS[name](**_check_fields(body, SECTIONS[name], name, problems, at))
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) in the config:\n  " + "\n  ".join(problems))
    return Config(**out)


def to_dict(cfg: Config) -> dict:
    return {name: body for name, body in dataclasses.asdict(cfg).items() if body is not None}


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def cli(argv: list[str], sections: tuple[str, ...] | None = None) -> Config:
    """`--config FILE [--section.key=value ...]` -> Config; a bad config exits with its message."""
    if len(argv) < 2 or argv[0] != "--config":
        sys.exit(f"usage: {sys.argv[0]} --config FILE [--section.key=value ...]")
    try:
        return load(argv[1], argv[2:], sections)
    except (ConfigError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


def _can_make_dirs_in(path: Path) -> bool:
    """By making one (removed at once): os.access says yes to root anywhere, /proc included."""
    try:
        os.rmdir(tempfile.mkdtemp(dir=path))
    except OSError:
        return False
    return True


def check(cfg: Config, launch: bool = True) -> list[str]:
    """What config.load cannot see: settings that cannot work together, the files the run reads and
    writes (nothing is created) and, when `launch`, whether this process was launched as the
    strategy needs. Run before any weights are read or any process group is made, and by --check."""
    import importlib.util

    import tokenize_data

    m, sh = cfg.model, cfg.sharding
    problems = [msg for bad, msg in [
        (m.load_in_4bit and m.random_init, "model.load_in_4bit quantizes weights as they are read: set "
         "model.random_init: false and model.path to a directory with weights"),
        (m.load_in_4bit and not sh.lora_rank, "model.load_in_4bit: 4-bit weights cannot be trained; set "
         "sharding.lora_rank > 0 (QLoRA)"),
        (m.load_in_4bit and sh.cpu_offload, "model.load_in_4bit with sharding.cpu_offload is not supported; "
         "set one of them to false"),
        (m.load_in_4bit and sh.strategy == "deepspeed", "model.load_in_4bit (QLoRA) does not work with DeepSpeed; "
         "use sharding.strategy: fsdp2 or none"),
        (launch and sh.strategy != "none" and "RANK" not in os.environ, f"sharding.strategy: {sh.strategy} needs "
         "torchrun (torchrun --nproc_per_node=N train.py ...); for a plain process set --sharding.strategy=none"),
        (sh.strategy == "deepspeed" and not importlib.util.find_spec("deepspeed"), "sharding.strategy: "
         "deepspeed needs the deepspeed extra: pip install -e '.[deepspeed]'"),
        (m.compile and sh.strategy == "deepspeed", "model.compile is not tested with DeepSpeed; use "
         "sharding.strategy: none or fsdp2, or model.compile: false"),
        (cfg.logging.noise_scale and sh.strategy == "deepspeed", "logging.noise_scale does not work with DeepSpeed "
         "(its gradients are not ours to read between micro-steps); use sharding.strategy: none or fsdp2"),
    ] if bad]
    path = Path(m.path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            problems.append(f"model.path: {path} has no config.json; point it at a Hugging Face model directory")
        if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            problems.append(f"model.path: {path} has no tokenizer (tokenizer.json or tokenizer_config.json)")
    elif not tokenize_data.is_hub_id(m.path):
        problems.append(f"model.path: {m.path or '(empty)'} does not exist; give a model directory or a hub id "
                        "(owner/name)")
    for key in ("train_files", "eval_files"):
        problems += tokenize_data.check_paths(getattr(cfg.data, key), f"data.{key}")
    if cfg.train.heldout_file and not Path(cfg.train.heldout_file).is_file():
        problems.append(f"train.heldout_file: {cfg.train.heldout_file} does not exist; set it to '' to skip")
    out = Path(cfg.train.output_dir)
    there = next(p for p in [out, *out.parents] if p.exists())  # what mkdir would create it in
    if not there.is_dir() or not _can_make_dirs_in(there):
        problems.append(f"train.output_dir: {out} cannot be written ({there} is not a writable directory); "
                        "choose another directory")
    return problems
