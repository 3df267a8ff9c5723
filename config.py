"""The one strict YAML loader: a run's config is one YAML file of sections, each checked against the dataclass
that its stage module owns. Unknown keys (with the nearest valid name), wrong types and bad values are all
reported at once; `--section.key=value` overrides go through the same checks.

    python config.py --config configs/quickstart.yaml [--train.lr=1e-3]   # prints the resolved config
"""

import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


def _check(value, tp, where: str, problems: list[str]):
    """Returns `value` converted to type `tp`, or appends a problem naming `where`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # str | Source: a mapping is the dataclass, the rest the str
        cls = next((a for a in args if dataclasses.is_dataclass(a)), None)
        return _check(value, cls if isinstance(value, dict) and cls else args[0], where, problems)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping with keys {', '.join(typing.get_type_hints(tp))}")
            return value
        return tp(**_check_fields(value, tp, where, problems))
    if origin is typing.Literal:
        if value in args:
            return value
        problems.append(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
    elif origin is list:
        if isinstance(value, list):
            return [_check(v, args[0], f"{where}[{i}]", problems) for i, v in enumerate(value)]
        problems.append(f"{where}: expected a list, got {type(value).__name__} {value!r}")
    elif tp is float and isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            problems.append(f"{where}: expected a number, got {value!r}")
    elif tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    else:
        problems.append(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _check_fields(body: dict, cls: type, prefix: str, problems: list[str], at=lambda key: key) -> dict:
    """The checked keyword arguments of dataclass `cls` from mapping `body`; unknown keys get the nearest name."""
    hints, kwargs = typing.get_type_hints(cls), {}
    for key, value in body.items():
        if key not in hints:
            hint = difflib.get_close_matches(str(key), hints, n=1)
            name = f"{prefix.rpartition(': ')[2]}.{hint[0]}" if hint else ""  # the key path, not the file
            problems.append(f"{at(f'{prefix}.{key}')}: unknown key" + (f"; did you mean '{name}'?" if hint else
                                                                      f"; valid keys: {', '.join(hints)}"))
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


def load(path: str, sections: dict[str, type], overrides: list[str] = ()) -> dict:
    """Reads `path`, applies `overrides` and returns {section: dataclass instance}; raises ConfigError listing
    every problem. A section absent from the file gets its defaults."""
    text = Path(path).read_text()
    try:
        raw = yaml.safe_load(text) or {}
        lines = _key_lines(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections ({', '.join(sections)})")
    overridden = set()
    for section, values in parse_overrides(list(overrides)).items():
        raw.setdefault(section, {})
        if isinstance(raw[section], dict):
            raw[section].update(values)
        overridden |= {f"{section}.{key}" for key in values} | ({section} if section not in lines else set())
    problems, out = [], {}

    def at(key):
        if key in overridden:
            return f"command line: --{key}"
        return f"{path}:{lines[key]}: {key}" if key in lines else f"{path}: {key}"

    for section, body in raw.items():
        if section not in sections:
            hint = difflib.get_close_matches(str(section), sections, n=1)
            problems.append(f"{at(section)}: unknown section" + (f"; did you mean '{hint[0]}'?" if hint else
                                                                 f"; valid: {', '.join(sections)}"))
        elif not isinstance(body, dict):
            problems.append(f"{at(section)}: expected a mapping of keys, got {body!r}")
    for section, cls in sections.items():
        body = raw.get(section) or {}
        if not isinstance(body, dict):
            continue
        out[section] = cls(**_check_fields(body, cls, section, problems, at))
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) in the config:\n  " + "\n  ".join(problems))
    return out


def to_dict(cfg: dict) -> dict:
    return {section: dataclasses.asdict(value) for section, value in cfg.items()}


def dump(cfg: dict) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def cli(sections: dict[str, type], argv: list[str]) -> dict:
    """`--config FILE [--section.key=value ...]` -> config; a config problem exits with its message, no
    traceback."""
    if len(argv) < 2 or argv[0] != "--config":
        sys.exit(f"usage: {sys.argv[0]} --config FILE [--section.key=value ...]")
    try:
        return load(argv[1], sections, argv[2:])
    except (ConfigError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    from train import SECTIONS

    print(dump(cli(SECTIONS, sys.argv[1:])), end="")
