"""Chat JSONL -> memory-mapped token cache. Only assistant content and the end-of-turn token(s) the chat template
writes after it are trained; everything else gets label -100.

    python tokenize_data.py --config configs/quickstart.yaml

The cache is a directory keyed by a hash of the input files, the tokenizer, its chat template and the options, so a
changed input is never served stale. It holds flat `input_ids` (int32) and `loss_mask` (uint8), per-sample `offsets`
(int64, n+1) and supervised target counts `loss_tokens`, and `meta.json` (counts, drops by reason, percentiles).
"""

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CACHE_VERSION = 1  # bump when the tokenization logic changes, so old caches are not reused
ROLES = ("system", "user", "assistant")


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)  # chat JSONL paths: {"messages": [{"role", "content"}]}
    eval_files: list[str] = field(default_factory=list)  # chat JSONL for the eval loss (train.eval_every_steps)
    max_seq_len: int = 4096  # longest sample kept, in tokens; longer ones are dropped and counted
    cache_dir: str = ".cache/tokens"  # where token caches live (one subdirectory per hash)
    num_proc: int = 1  # tokenizer processes; >1 helps on large files


class DataError(ValueError):
    pass


def _render(tokenizer, messages, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """Splits the rendered conversation into (text, trained) pieces. For assistant turn i, what rendering
    messages[:i+1] adds to rendering messages[:i] with the generation prompt is exactly what the model must
    generate: the content plus the end-of-turn token(s). Trailing whitespace after them (ChatML's newline) is
    not generated at inference, so it is not trained. Works for any template, with or without generation markers."""
    full = _render(tokenizer, messages)
    pieces, done = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, turn = _render(tokenizer, messages[:i], True), _render(tokenizer, messages[: i + 1])
        if not (turn.startswith(prompt) and full.startswith(turn) and prompt.startswith(full[:done])):
            raise DataError("the chat template does not render conversations as prefixes of each other "
                            "(it rewrites earlier turns); it cannot be masked by rendering prefixes")
        answer = turn[len(prompt):].rstrip()
        pieces += [(prompt[done:], False), (answer, True)]
        done = len(prompt) + len(answer)
    return [(t, trained) for t, trained in pieces + [(full[done:], False)] if t]


def tokenize_sample(sample: dict, tokenizer) -> dict:
    """One JSONL record -> {"input_ids": [...], "labels": [...]}, labels aligned with input_ids (not shifted),
    -100 where not trained. Pieces are tokenized separately, so token boundaries match inference, where the
    prompt is tokenized and the answer generated after it."""
    ids, labels = [], []
    for text, trained in _segments(sample["messages"], tokenizer):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [-100] * len(piece)
    return {"input_ids": ids, "labels": labels}


def _validate(record, where: str) -> dict:
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise DataError(f'{where}: expected an object with a "messages" list, got {str(record)[:80]}')
    msgs = record["messages"]
    if not msgs:
        raise DataError(f"{where}: \"messages\" is empty")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise DataError(f"{where}: messages[{j}] has role {m.get('role') if isinstance(m, dict) else m!r}; "
                            f"expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{j}].content must be a string, got "
                            f"{type(m.get('content')).__name__}")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: no assistant message, so nothing would be trained; add one or remove the line")
    return record


def read_jsonl(path: str) -> list[tuple[int, dict]]:
    """Parses and validates a chat JSONL file into (line number, record); raises DataError naming the file and
    line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\n"))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            records.append((n, _validate(record, f"{path}:{n}")))
    if not records:
        raise DataError(f"{path}: the file has no samples")
    return records


def _fingerprint(files: list[str], tokenizer, cfg: DataConfig) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION} max_seq_len={cfg.max_seq_len}".encode())
    for path in files:
        h.update(path.encode() + Path(path).read_bytes())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend else json.dumps(tokenizer.get_vocab(), sort_keys=True)).encode())
    h.update(f"{tokenizer.chat_template}|{tokenizer.special_tokens_map}".encode())
    return h.hexdigest()[:16]


def _tokenize_file(args):
    path, tokenizer = args
    out = []
    for n, record in read_jsonl(path):
        try:
            out.append(tokenize_sample(record, tokenizer))
        except DataError as e:
            raise DataError(f"{path}:{n}: {e}") from None
    return out


def build_cache(files: list[str], tokenizer, cfg: DataConfig, key: str = "data.train_files") -> Path:
    """Tokenizes `files` into the cache (once) and returns its directory. Writes to a temporary directory and
    renames it, so a crash never leaves a half-written cache behind."""
    if not files:
        raise DataError(f"no input files: set {key} to a list of chat JSONL paths")
    for path in files:
        if not Path(path).is_file():
            raise DataError(f"{path}: no such file (listed in {key})")
    out = Path(cfg.cache_dir) / _fingerprint(files, tokenizer, cfg)
    if (out / "meta.json").exists():
        return out
    if cfg.num_proc > 1:
        from multiprocessing import Pool

        with Pool(cfg.num_proc) as pool:  # one file per task; split big files to use more processes
            per_file = pool.map(_tokenize_file, [(p, tokenizer) for p in files])
    else:
        per_file = [_tokenize_file((p, tokenizer)) for p in files]
    samples = [s for f in per_file for s in f]
    kept = [s for s in samples if len(s["input_ids"]) <= cfg.max_seq_len]
    dropped = {"longer_than_max_seq_len": len(samples) - len(kept)}
    if not kept:
        raise DataError(f"all {len(samples)} samples are longer than data.max_seq_len={cfg.max_seq_len}; raise it")
    lengths = np.array([len(s["input_ids"]) for s in kept], dtype=np.int64)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "input_ids.npy", np.fromiter((t for s in kept for t in s["input_ids"]), np.int32, lengths.sum()))
    np.save(tmp / "loss_mask.npy",
            np.fromiter((lab != -100 for s in kept for lab in s["labels"]), np.uint8, lengths.sum()))
    np.save(tmp / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]))
    # supervised targets per sample after the per-sample shift: the first token is never a target
    loss_tokens = np.array([sum(x != -100 for x in s["labels"][1:]) for s in kept], dtype=np.int64)
    np.save(tmp / "loss_tokens.npy", loss_tokens)
    meta = {"files": files, "samples_read": len(samples), "samples_kept": len(kept), "dropped": dropped,
            "tokens": int(lengths.sum()), "loss_tokens": int(loss_tokens.sum()),
            "length_percentiles": {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 95, 99, 100)}}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        tmp.rename(out)
    except OSError:  # another process finished the same cache first; its result is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return out


class TokenCache:
    """Read-only, memory-mapped view of a cache directory; `cache[i]` -> (input_ids, loss_mask) numpy views."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text())
        self.input_ids = np.load(self.path / "input_ids.npy", mmap_mode="r")
        self.loss_mask = np.load(self.path / "loss_mask.npy", mmap_mode="r")
        self.offsets = np.load(self.path / "offsets.npy")
        self.lengths = np.diff(self.offsets)
        self.loss_tokens = np.load(self.path / "loss_tokens.npy")

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[a:b], self.loss_mask[a:b]


def summary(cache: TokenCache) -> str:
    m = cache.meta
    dropped = ", ".join(f"{k}: {v}" for k, v in m["dropped"].items())
    return (f"tokenized {len(m['files'])} file(s): {m['samples_read']} samples read, {m['samples_kept']} kept, "
            f"dropped {dropped}; {m['tokens']:,} tokens, {m['loss_tokens']:,} supervised; lengths "
            + " ".join(f"{k}={v}" for k, v in m["length_percentiles"].items()) + f"\ncache: {cache.path}")


def main(argv: list[str]):
    import config
    from model_setup import load_tokenizer
    from train import SECTIONS

    cfg = config.cli(SECTIONS, argv)
    tokenizer = load_tokenizer(cfg["model"])
    try:
        for key in ("train_files", "eval_files") if cfg["data"].eval_files else ("train_files",):
            print(summary(TokenCache(build_cache(getattr(cfg["data"], key), tokenizer, cfg["data"], f"data.{key}"))))
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
